//! End to end through the real controller and agents: LoadBalancer source ranges,
//! health-check node ports and stale UDP conntrack entries.
//! Behaviour numbers refer to docs/behaviours.md §5.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use kubenft_lab::topology::EXT_V4;
use kubenft_lab::{
    Cond, Host, IpFamily, ProbeOpts, ProbeResult, Proto, Service, ServiceType, Slice, TrafficPolicy,
};

const LB_IP: &str = "203.0.113.10";

/// §5.37: loadBalancerSourceRanges admit only the listed sources to the LB IP (pods included,
/// checked before DNAT), violations are dropped, changes take effect, clearing admits all.
#[test]
fn load_balancer_source_ranges_admit_only_listed_sources() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]);
    let pod = client(&lab, "client", "a");
    let c = Cluster::start(lab);
    route_ext_via(&c, LB_IP, "a");
    let lb = |range: Option<String>| {
        let svc = Service::cluster_ip("web", "10.96.0.90")
            .service_type(ServiceType::LoadBalancer)
            .port("http", 80, TCP, Proto::Tcp)
            .node_port(30090)
            .lb_ingress(LB_IP.parse::<IpAddr>().unwrap());
        match range {
            Some(r) => svc.lb_source_range(&r),
            None => svc,
        }
    };
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&web, Cond::READY);
    let target = vip(&format!("{LB_IP}:80"));
    let ext_range = format!("{EXT_V4}/32");
    let pod_range = format!("{}/32", pod.ipv4);

    c.write("web.yaml", &[&lb(Some(ext_range)), &slice]);
    c.wait_answers(Host::External, Proto::Tcp, target, START);
    let rs = c.probe(Host::External, Proto::Tcp, target, &ProbeOpts::count(2));
    let t = c.assert_traces_agree("a", Host::External, (Proto::Tcp, target), &rs);
    assert!(t.says("loadBalancerSourceRanges"), "{t:?}");
    let r = c.probe1(Host::Pod("client"), Proto::Tcp, target, DROP_WAIT);
    assert!(
        matches!(r, ProbeResult::Timeout),
        "a pod outside the ranges must be dropped"
    );
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &[r]);
    // NodePorts are not subject to source ranges.
    let np = sock(c.lab.node("a").ipv4, 30090);
    let r = c.probe1(Host::Pod("client"), Proto::Tcp, np, DROP_WAIT);
    assert!(r.is_ok());
    c.assert_trace_agrees("a", Host::Pod("client"), (Proto::Tcp, np), &[r]);

    // Swap the ranges: roles swap.
    c.write("web.yaml", &[&lb(Some(pod_range)), &slice]);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, target, CONVERGE);
    c.wait_probe(
        "ext dropped",
        Host::External,
        Proto::Tcp,
        target,
        CONVERGE,
        |r| matches!(r, ProbeResult::Timeout),
    );
    let rs = c.probe(
        Host::External,
        Proto::Tcp,
        target,
        &ProbeOpts::count(1).timeout(DROP_WAIT),
    );
    c.assert_trace_agrees("a", Host::External, (Proto::Tcp, target), &rs);

    // No ranges: everybody.
    c.write("web.yaml", &[&lb(None), &slice]);
    c.wait_answers(Host::External, Proto::Tcp, target, CONVERGE);
    let r = c.probe1(Host::Pod("client"), Proto::Tcp, target, DROP_WAIT);
    assert!(r.is_ok());
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &[r]);
}

/// §5.15: the health-check node port of an ETP=Local LoadBalancer Service answers 200 with
/// `localEndpoints` on the endpoint's node and 503 elsewhere, follows the endpoint when it
/// moves, and closes when the policy becomes Cluster.
#[test]
fn health_check_node_port_follows_local_endpoints() {
    let lab = Cluster::lab(&["a", "b"]);
    let web_a = pods(&lab, &[("web-a", "a")]).remove(0);
    let web_b = pods(&lab, &[("web-b", "b")]).remove(0);
    let c = Cluster::start(lab);
    let svc = |policy| {
        let s = Service::cluster_ip("web", "10.96.0.91")
            .service_type(ServiceType::LoadBalancer)
            .port("http", 80, TCP, Proto::Tcp)
            .node_port(30091)
            .external_traffic_policy(policy);
        if policy == TrafficPolicy::Local {
            s.health_check_node_port(32091)
        } else {
            s
        }
    };
    let on = |pod| {
        Slice::for_service("web")
            .port("http", TCP)
            .endpoint(pod, Cond::READY)
    };
    let url = |node: &str| format!("http://{}:32091/healthz", c.lab.node(node).ipv4);
    let wait_code = |node: &str, want: u16| {
        let mut last = (0, String::new());
        kubenft_lab::wait_until(CONVERGE * 2, POLL, || {
            last = c.http_get(Host::External, &url(node));
            Ok::<_, std::io::Error>(last.0 == want)
        })
        .unwrap_or_else(|e| panic!("node {node}: wanted {want}, last {last:?}: {e}"));
        last.1
    };

    c.write("web.yaml", &[&svc(TrafficPolicy::Local), &on(&web_a)]);
    let body = wait_code("a", 200);
    assert!(body.contains(r#""localEndpoints":1"#), "{body}");
    assert!(
        body.contains(r#""service":{"name":"web","namespace":"default"}"#),
        "{body}"
    );
    assert!(
        body.to_lowercase()
            .contains("x-load-balancing-endpoint-weight: 1"),
        "{body}"
    );
    let body = wait_code("b", 503);
    assert!(body.contains(r#""localEndpoints":0"#), "{body}");

    // The endpoint moves to node b: the answers flip.
    c.write("web.yaml", &[&svc(TrafficPolicy::Local), &on(&web_b)]);
    wait_code("b", 200);
    wait_code("a", 503);

    // Terminating-only local endpoints do not count (traffic still flows, health says 503).
    let terminating = Slice::for_service("web")
        .port("http", TCP)
        .endpoint(&web_b, Cond::TERMINATING_SERVING);
    c.write("web.yaml", &[&svc(TrafficPolicy::Local), &terminating]);
    wait_code("b", 503);
    c.wait_answers(
        Host::External,
        Proto::Tcp,
        sock(c.lab.node("b").ipv4, 30091),
        CONVERGE,
    );

    // externalTrafficPolicy Cluster: the port is closed (nothing answers).
    c.write("web.yaml", &[&svc(TrafficPolicy::Cluster), &on(&web_b)]);
    wait_code("b", 0);
}

/// A UDP ClusterIP of one family whose endpoint is swapped between two pods on node b.
struct StaleUdp {
    family: IpFamily,
    service: &'static str,
    vip: &'static str,
    target: &'static str,
}

const STALE_UDP: [StaleUdp; 2] = [
    StaleUdp {
        family: IpFamily::V4,
        service: "dns",
        vip: "10.96.0.92",
        target: "10.96.0.92:53",
    },
    StaleUdp {
        family: IpFamily::V6,
        service: "dns6",
        vip: "fd00:96::83",
        target: "[fd00:96::83]:53",
    },
];

/// §5.29 and §5.32 (and §5.42 with 29), IPv4 and IPv6 ([`STALE_UDP`]): a UDP client that
/// keeps one source port keeps one conntrack entry. When its endpoint is replaced the agent
/// deletes the stale entry, so the client reaches the new endpoint within 2 s although the
/// old pod still runs, and no entry for the ClusterIP replies from the old pod; scaled to
/// zero it is refused rather than blackholed; after the Service is deleted no entry points at
/// the pod.
#[test]
fn stale_udp_conntrack_entries_are_cleaned() {
    let lab = Cluster::lab(&["a", "b"]);
    let p = pods(&lab, &[("udp-1", "b"), ("udp-2", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    for row in &STALE_UDP {
        stale_udp_row(&c, &p, row);
    }
}

/// One row of [`stale_udp_conntrack_entries_are_cleaned`]; every failure names the family.
fn stale_udp_row(c: &Cluster, p: &[kubenft_lab::Pod], row: &StaleUdp) {
    let f = row.family;
    let file = format!("{}.yaml", row.service);
    let svc = Service::cluster_ip(row.service, row.vip).port("dns", 53, UDP, Proto::Udp);
    let empty = Slice::for_service(row.service).port_proto("dns", UDP, Proto::Udp);
    let empty = if f == IpFamily::V6 {
        empty.ipv6()
    } else {
        empty
    };
    let on = |pod| empty.clone().endpoint(pod, Cond::READY);
    let target = vip(row.target);
    let opts = ProbeOpts::default()
        .timeout(Duration::from_millis(400))
        .source_port(12345);
    let send = || {
        c.probe(Host::Pod("client"), Proto::Udp, target, &opts)
            .remove(0)
    };
    let entries = || c.udp_entries("a", row.vip);

    c.write(&file, &[&svc, &on(&p[0])]);
    c.wait_probe(
        &format!("{f:?}: udp-1 answers"),
        Host::Pod("client"),
        Proto::Udp,
        target,
        START,
        |r| r.server() == Some("udp-1"),
    );
    assert_eq!(send().server(), Some("udp-1"), "{f:?}");
    let old = pod_addr(&p[0], f);
    assert!(
        entries().contains(&format!("src={old} ")),
        "{f:?}: no entry replies from udp-1:\n{}",
        entries()
    );

    // Swap the endpoint; udp-1 keeps running, so only the cleanup can move the client.
    c.write(&file, &[&svc, &on(&p[1])]);
    let mut last = None;
    kubenft_lab::wait_until(CONVERGE, Duration::from_millis(100), || {
        let r = send();
        let moved = r.server() == Some("udp-2");
        last = Some(r);
        Ok::<_, std::io::Error>(moved)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{f:?}: the client never left udp-1 (stale conntrack entry): {e}; last {last:?}\n{}",
            entries()
        )
    });
    assert!(
        !entries().contains(&format!("src={old} ")),
        "{f:?}: an entry still replies from udp-1:\n{}",
        entries()
    );

    // Scale to zero: the client is refused, not answered by a stale DNAT.
    c.write(&file, &[&svc, &empty]);
    kubenft_lab::wait_until(CONVERGE, Duration::from_millis(100), || {
        Ok::<_, std::io::Error>(matches!(send(), ProbeResult::Refused))
    })
    .unwrap_or_else(|e| panic!("{f:?}: scaled to zero but not refused: {e}\n{}", entries()));

    // Back to one endpoint, then delete the Service: no entry keeps pointing at the pod.
    c.write(&file, &[&svc, &on(&p[1])]);
    c.wait_probe(
        &format!("{f:?}: udp-2 again"),
        Host::Pod("client"),
        Proto::Udp,
        target,
        CONVERGE,
        |r| r.server() == Some("udp-2"),
    );
    c.lab.remove_manifest(&file).unwrap();
    let pod_ip = pod_addr(&p[1], f);
    kubenft_lab::wait_until(CONVERGE, Duration::from_millis(100), || {
        Ok::<_, std::io::Error>(!entries().contains(&format!("src={pod_ip} ")))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{f:?}: a stale entry survived the Service: {e}\n{}",
            entries()
        )
    });
}
