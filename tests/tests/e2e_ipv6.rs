//! End to end through the real controller and agents: §5.42, IPv6 single-stack and
//! dual-stack Services (`ipFamilies` [IPv6], [IPv4, IPv6] and [IPv6, IPv4]) — scenarios 1, 2,
//! 7, 14 and 24 on the IPv6 ClusterIPs and the nodes' IPv6 addresses — and each family's
//! health and metrics reported separately. Scenarios 11 and 17 are the IPv6 rows of the
//! family tables in `e2e_clusterip.rs`, 29 the IPv6 row of the one in `e2e_lb.rs`.
//! Behaviour numbers refer to docs/behaviours.md §5.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use common::*;
use kubenft_lab::manifest::ToJson;
use kubenft_lab::topology::EXT_V6;
use kubenft_lab::{
    Cond, Host, IpFamily, Pod, ProbeOpts, ProbeResult, Proto, Service, Slice, TrafficPolicy,
};
use serde_json::{Value, json};

/// A TCP http + UDP dns Service port pair's IPv6 slice (and the IPv4 one for dual-stack).
fn slices(service: &str, pods: &[Pod]) -> (Slice, Slice) {
    let v4 = Slice::for_service(service)
        .port("http", TCP)
        .port_proto("dns", UDP, Proto::Udp)
        .endpoints(pods, Cond::READY);
    let v6 = v4.clone().named(&format!("{service}-v6")).ipv6();
    (v4, v6)
}

/// §5.42 with 1, 2 and 24: a single-stack IPv6 Service and dual-stack ones in both family
/// orders, 3 pods on 2 nodes. On every IPv6 ClusterIP, 60 TCP connections and 45 UDP datagrams
/// from a pod are all answered, by all three pods, with the client's own IPv6 address as the
/// source (the dual-stack Services' IPv4 ClusterIPs too, with its IPv4 address). With
/// `sessionAffinity: ClientIP` on an IPv6 ClusterIP, 15 requests from each of two clients all
/// reach one pod per client.
#[test]
fn ipv6_and_dual_stack_clusterips_spread_tcp_and_udp_and_keep_client_ip_affinity() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b"), ("web-3", "b")]);
    let cl = client(&lab, "client", "a");
    client(&lab, "client-b", "b");
    let c = Cluster::start(lab);
    let with_ports = |s: Service| {
        s.port("http", 80, TCP, Proto::Tcp)
            .port("dns", 53, UDP, Proto::Udp)
    };
    let six = with_ports(Service::cluster_ip("six", "fd00:96::61"));
    let dual46 = with_ports(Service::cluster_ips(
        "dual46",
        &["10.96.0.62", "fd00:96::62"],
    ));
    let dual64 = with_ports(
        Service::cluster_ips("dual64", &["fd00:96::63", "10.96.0.63"])
            .ip_families(&[IpFamily::V6, IpFamily::V4]),
    );
    let sticky =
        with_ports(Service::cluster_ip("sticky6", "fd00:96::64")).session_affinity_client_ip(None);
    assert_eq!(
        six.to_json()["spec"]["ipFamilies"],
        json!(["IPv6"]),
        "single-stack IPv6"
    );
    assert_eq!(
        dual64.to_json()["spec"]["ipFamilies"],
        json!(["IPv6", "IPv4"])
    );
    for svc in [&six, &dual46, &dual64, &sticky] {
        let (v4, v6) = slices(svc.name(), &backends);
        let objects: Vec<&dyn ToJson> = if svc.name().starts_with("dual") {
            vec![svc, &v4, &v6]
        } else {
            vec![svc, &v6]
        };
        c.write(&format!("{}.yaml", svc.name()), &objects);
    }
    let all = ["web-1", "web-2", "web-3"];
    let (src4, src6) = (IpAddr::from(cl.ipv4), IpAddr::from(cl.ipv6));
    let spread = |proto: Proto, target: SocketAddr, count: u32, src: IpAddr| {
        let rs = c.probe(Host::Pod("client"), proto, target, &ProbeOpts::count(count));
        assert_spread(
            &rs,
            Some(src),
            &all,
            &format!("{count} {proto} to {target}"),
        );
        c.assert_trace_agrees("a", Host::Pod("client"), (proto, target), &rs);
    };
    for ip in ["fd00:96::61", "fd00:96::62", "fd00:96::63"] {
        let (tcp, udp) = (
            sock(ip.parse::<IpAddr>().unwrap(), 80),
            sock(ip.parse::<IpAddr>().unwrap(), 53),
        );
        c.wait_answers(Host::Pod("client"), Proto::Tcp, tcp, START);
        spread(Proto::Tcp, tcp, 60, src6);
        spread(Proto::Udp, udp, 45, src6);
    }
    for ip in ["10.96.0.62", "10.96.0.63"] {
        let tcp = sock(ip.parse::<IpAddr>().unwrap(), 80);
        c.wait_answers(Host::Pod("client"), Proto::Tcp, tcp, START);
        spread(Proto::Tcp, tcp, 24, src4);
    }

    // ClientIP affinity on the IPv6 ClusterIP, for a client on each node.
    let target = vip("[fd00:96::64]:80");
    c.wait_answers(Host::Pod("client"), Proto::Tcp, target, START);
    for who in ["client", "client-b"] {
        let rs = c.probe(Host::Pod(who), Proto::Tcp, target, &ProbeOpts::count(15));
        let t = assert_all_ok(&rs, &format!("{who} -> {target}"));
        assert_eq!(
            t.len(),
            1,
            "{who}: affinity must keep one pod over 15 requests: {t:?}"
        );
        eprintln!("{who} sticks to {t:?}");
        let node = c.lab.pod(who).node;
        let t = c.assert_traces_agree(&node, Host::Pod(who), (Proto::Tcp, target), &rs);
        assert!(t.says("affinity"), "{t:?}");
    }
    // Without affinity the same client spreads (so the check above can fail).
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        vip("[fd00:96::61]:80"),
        &ProbeOpts::count(15),
    );
    assert!(assert_all_ok(&rs, "no affinity").len() > 1);
}

/// §5.42 with 7 and 14: a single-stack IPv6 NodePort (externalTrafficPolicy Cluster) whose
/// only endpoint is on node b answers ext on both nodes' IPv6 addresses, the backend seeing a
/// node's IPv6 address (SNAT), never ext's. A dual-stack (IPv6 first) NodePort with
/// externalTrafficPolicy Local answers on node b's IPv6 address with ext's own IPv6 address as
/// the source, and node a (no local endpoint) drops — a timeout.
#[test]
fn ipv6_nodeports_answer_on_every_node_and_local_policy_keeps_the_source() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]);
    let c = Cluster::start(lab);
    let cluster = Service::cluster_ip("np6", "fd00:96::71")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30171)
        .external_traffic_policy(TrafficPolicy::Cluster);
    let local = Service::cluster_ips("local6", &["fd00:96::72", "10.96.0.72"])
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30172)
        .external_traffic_policy(TrafficPolicy::Local);
    let (_, np6_slice) = slices("np6", &web);
    let (l4, l6) = slices("local6", &web);
    c.write("np6.yaml", &[&cluster, &np6_slice]);
    c.write("local6.yaml", &[&local, &l4, &l6]);
    let (a, b) = (c.lab.node("a").ipv6, c.lab.node("b").ipv6);
    let mut node_addrs = c.ipv6_addresses(Host::Node("a"));
    node_addrs.extend(c.ipv6_addresses(Host::Node("b")));

    for node in [a, b] {
        let target = sock(node, 30171);
        c.wait_answers(Host::External, Proto::Tcp, target, START);
        let rs = c.probe(Host::External, Proto::Tcp, target, &ProbeOpts::count(6));
        let t = assert_all_ok(&rs, &format!("ext -> {target}"));
        assert_eq!(t.get("web-1"), Some(&6), "{t:?}");
        for r in &rs {
            let src = r.client().unwrap().ip();
            assert_ne!(src, IpAddr::from(EXT_V6), "ETP=Cluster must SNAT ext: {r}");
            assert!(
                node_addrs.contains(&src),
                "source {src} via {target} is not a node IPv6 address {node_addrs:?}"
            );
        }
        eprintln!("via {target}: backend saw {}", rs[0].client().unwrap());
        let on = if node == a { "a" } else { "b" };
        c.assert_traces_agree(on, Host::External, (Proto::Tcp, target), &rs);
    }

    let target = sock(b, 30172);
    c.wait_answers(Host::External, Proto::Tcp, target, START);
    let rs = c.probe(Host::External, Proto::Tcp, target, &ProbeOpts::count(6));
    let t = assert_all_from(&rs, EXT_V6.into(), "ETP=Local via the endpoint's node b");
    assert_eq!(t.get("web-1"), Some(&6), "{t:?}");
    c.assert_traces_agree("b", Host::External, (Proto::Tcp, target), &rs);
    c.wait_synced(START);
    let rs = c.probe(
        Host::External,
        Proto::Tcp,
        sock(a, 30172),
        &ProbeOpts::count(2).timeout(DROP_WAIT),
    );
    assert_eq!(
        rs,
        vec![ProbeResult::Timeout; 2],
        "ETP=Local via node a (no local endpoint) must be dropped"
    );
    c.assert_traces_agree("a", Host::External, (Proto::Tcp, sock(a, 30172)), &rs);
}

/// `GET http://127.0.0.1:PORT/PATH` in node `node`: (status code, body).
fn http_get(c: &Cluster, node: &str, port: u16, path: &str) -> (u16, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let out = c
        .lab
        .exec_ok(
            Host::Node(node),
            &[
                "curl",
                "-s",
                "--max-time",
                "2",
                "-w",
                "\n%{http_code}",
                &url,
            ],
        )
        .unwrap();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `<metric>{ip_family="<family>"}` samples of the agent's /metrics on `node`, by family.
fn per_family(c: &Cluster, node: &str, metric: &str) -> BTreeMap<String, f64> {
    let (code, text) = http_get(c, node, 10249, "/metrics");
    assert_eq!(code, 200, "{text}");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?.strip_prefix("{ip_family=\"")?;
            let (family, value) = rest.split_once("\"} ")?;
            Some((family.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// §5.42 (health and metrics): each family is reported on its own. A change to an IPv6-only
/// Service counts a sync for IPv6 only, one to an IPv4-only Service for IPv4 only
/// (`kubeproxy_sync_proxy_rules_duration_seconds{ip_family}`); EndpointSlices with a trigger
/// time give `kubeproxy_network_programming_duration_seconds` samples of their own family; and
/// `/healthz` and `/livez` carry a healthy `status` per family, as kube-proxy's do.
#[test]
fn each_ip_family_reports_its_own_health_and_metrics() {
    let lab = Cluster::lab(&["a"]);
    let web = pods(&lab, &[("web-1", "a"), ("web-2", "a")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc4 = Service::cluster_ip("four", "10.96.0.91").port("http", 80, TCP, Proto::Tcp);
    let svc6 = Service::cluster_ip("six", "fd00:96::91").port("http", 80, TCP, Proto::Tcp);
    let slice = |svc: &str, v6: bool, pods: &[&Pod]| {
        let s = Slice::for_service(svc)
            .port("http", TCP)
            .endpoints(pods.iter().copied(), Cond::READY)
            .merge(json!({"metadata": {"annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": c.rfc3339_now()
            }}}));
        if v6 { s.ipv6() } else { s }
    };
    c.write("four.yaml", &[&svc4, &slice("four", false, &[&web[0]])]);
    c.write("six.yaml", &[&svc6, &slice("six", true, &[&web[0]])]);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, vip("10.96.0.91:80"), START);
    c.wait_answers(
        Host::Pod("client"),
        Proto::Tcp,
        vip("[fd00:96::91]:80"),
        START,
    );
    c.wait_synced(START);
    let syncs = || per_family(&c, "a", "kubeproxy_sync_proxy_rules_duration_seconds_count");
    let programming = || {
        per_family(
            &c,
            "a",
            "kubeproxy_network_programming_duration_seconds_count",
        )
    };
    let base = syncs();
    eprintln!("syncs: {base:?}, programming: {:?}", programming());
    // One transaction is one sync: the first, which changed both families, is counted once
    // (under IPv4), so only the total is known here.
    assert!(base.values().sum::<f64>() >= 1.0, "{base:?}");
    for family in ["IPv4", "IPv6"] {
        assert!(
            programming().get(family).is_some_and(|n| *n >= 1.0),
            "{family}: {:?}",
            programming()
        );
    }

    // An IPv6-only change: only IPv6 counts a sync; then the same for IPv4.
    let mut last = base.clone();
    for (file, objects, changed) in [
        (
            "six.yaml",
            (&svc6, slice("six", true, &[&web[0], &web[1]])),
            "IPv6",
        ),
        (
            "four.yaml",
            (&svc4, slice("four", false, &[&web[0], &web[1]])),
            "IPv4",
        ),
    ] {
        c.write(file, &[objects.0, &objects.1]);
        let target = if changed == "IPv6" {
            vip("[fd00:96::91]:80")
        } else {
            vip("10.96.0.91:80")
        };
        c.wait_all_seen(
            Host::Pod("client"),
            Proto::Tcp,
            target,
            &["web-1", "web-2"],
            CONVERGE,
        );
        c.wait_synced(START);
        let now = syncs();
        eprintln!("after the {changed} change: {now:?}");
        for family in ["IPv4", "IPv6"] {
            let count = |m: &BTreeMap<String, f64>| m.get(family).copied().unwrap_or(0.0);
            let (was, is) = (count(&last), count(&now));
            if family == changed {
                assert!(is > was, "{family} sync not counted: {last:?} -> {now:?}");
            } else {
                assert_eq!(is, was, "a {changed}-only change counted a {family} sync");
            }
        }
        last = now;
    }

    for path in ["/healthz", "/livez"] {
        let (code, body) = http_get(&c, "a", 10256, path);
        assert_eq!(code, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} {body}: {e}"));
        for family in ["IPv4", "IPv6"] {
            assert_eq!(v["status"][family]["healthy"], true, "{path}: {body}");
            assert!(
                v["status"][family]["lastUpdated"]
                    .as_str()
                    .is_some_and(|s| s.ends_with('Z')),
                "{path}: {body}"
            );
        }
        eprintln!("{path}: {body}");
    }
}
