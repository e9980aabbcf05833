//! End to end through the real controller and agents: ClusterIP Services as a pod sees them.
//! Behaviour numbers refer to docs/behaviours.md §5. Where a scenario repeats for protocols,
//! families or clients, one test runs a table of rows in one lab, and every assertion names
//! its row.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use kubenft_lab::manifest::ToJson;
use kubenft_lab::{Cond, EchoPorts, Host, IpFamily, ProbeOpts, ProbeResult, Proto, Service, Slice};

/// A Service port spread over three pods on two nodes (the first on `a`, two on `b`).
struct Spread {
    row: &'static str,
    service: &'static str,
    vip: &'static str,
    port: (u16, u16, Proto),
    count: u32,
    pods: [&'static str; 3],
}

const SPREADS: [Spread; 2] = [
    Spread {
        row: "§5.1 TCP",
        service: "web",
        vip: "10.96.0.10",
        port: (80, TCP, Proto::Tcp),
        count: 60,
        pods: ["web-1", "web-2", "web-3"],
    },
    Spread {
        row: "§5.2 UDP 53 → 5353",
        service: "dns",
        vip: "10.96.0.53",
        port: (53, UDP, Proto::Udp),
        count: 45,
        pods: ["dns-1", "dns-2", "dns-3"],
    },
];

/// §5.1 and §5.2 ([`SPREADS`]): from a pod on node a, every new TCP connection (60) and
/// every UDP datagram (45) to a ClusterIP is answered, and all three pods are seen.
#[test]
fn clusterip_tcp_and_udp_spread_over_all_endpoints() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends: Vec<_> = SPREADS
        .iter()
        .map(|s| {
            pods(
                &lab,
                &[(s.pods[0], "a"), (s.pods[1], "b"), (s.pods[2], "b")],
            )
        })
        .collect();
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    for (s, backends) in SPREADS.iter().zip(&backends) {
        let (port, target, proto) = s.port;
        let svc = Service::cluster_ip(s.service, s.vip).port("p", port, target, proto);
        let slice = Slice::for_service(s.service)
            .port_proto("p", target, proto)
            .endpoints(backends, Cond::READY);
        c.write(&format!("{}.yaml", s.service), &[&svc, &slice]);
    }
    for s in &SPREADS {
        let (port, _, proto) = s.port;
        let target = sock(s.vip.parse::<IpAddr>().unwrap(), port);
        c.wait_answers(Host::Pod("client"), proto, target, START);
        let rs = c.probe(
            Host::Pod("client"),
            proto,
            target,
            &ProbeOpts::count(s.count),
        );
        let what = format!("{}: {} {proto} to {target}", s.row, s.count);
        assert_spread(&rs, None, &s.pods, &what);
        c.assert_traces_agree("a", Host::Pod("client"), (proto, target), &rs);
    }
}

/// §5.3: ports 80→`http` and 81→`alt`; pod1 has `http`=100 (and listens only there), pod2
/// has `alt`=101 (only there). :80 reaches only pod1:100 and :81 only pod2:101 — a wrong pod
/// or a wrong port would show as a refusal.
#[test]
fn multiport_named_ports_reach_the_right_pod_and_port() {
    let lab = Cluster::lab(&["a", "b"]);
    let pod1 = lab.add_pod("pod1", "a", &EchoPorts::tcp(&[100])).unwrap();
    let pod2 = lab.add_pod("pod2", "b", &EchoPorts::tcp(&[101])).unwrap();
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("multi", "10.96.0.30")
        .port("http", 80, "http", Proto::Tcp)
        .port("alt", 81, "alt", Proto::Tcp);
    let s1 = Slice::for_service("multi")
        .named("multi-1")
        .port("http", 100)
        .endpoint(&pod1, Cond::READY);
    let s2 = Slice::for_service("multi")
        .named("multi-2")
        .port("alt", 101)
        .endpoint(&pod2, Cond::READY);
    c.write("multi.yaml", &[&svc, &s1, &s2]);
    let (p80, p81) = (vip("10.96.0.30:80"), vip("10.96.0.30:81"));
    c.wait_answers(Host::Pod("client"), Proto::Tcp, p80, START);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, p81, CONVERGE);
    for (target, only) in [(p80, "pod1"), (p81, "pod2")] {
        let rs = c.probe(
            Host::Pod("client"),
            Proto::Tcp,
            target,
            &ProbeOpts::count(12),
        );
        let t = assert_all_ok(&rs, &format!("{target}"));
        assert_eq!(t.keys().collect::<Vec<_>>(), vec![only], "{target}: {t:?}");
    }
}

/// §5.4: Service port `web` 80 → targetPort `http`, which is 8080 on pod-a and 9090 on pod-b
/// (each listens only on its own). The slices carry the resolved numbers under the Service
/// port's name, as the EndpointSlice controller writes them; svc:80 reaches both, without
/// errors.
#[test]
fn named_target_port_resolves_per_endpoint() {
    let lab = Cluster::lab(&["a", "b"]);
    let pa = lab.add_pod("pod-a", "a", &EchoPorts::tcp(&[8080])).unwrap();
    let pb = lab.add_pod("pod-b", "b", &EchoPorts::tcp(&[9090])).unwrap();
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("named", "10.96.0.40").port("web", 80, "http", Proto::Tcp);
    let s1 = Slice::for_service("named")
        .named("named-a")
        .port("web", 8080)
        .endpoint(&pa, Cond::READY);
    let s2 = Slice::for_service("named")
        .named("named-b")
        .port("web", 9090)
        .endpoint(&pb, Cond::READY);
    c.write("named.yaml", &[&svc, &s1, &s2]);
    let target = vip("10.96.0.40:80");
    c.wait_answers(Host::Pod("client"), Proto::Tcp, target, START);
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(24),
    );
    let t = assert_all_ok(&rs, "svc:80 with per-endpoint target ports");
    assert!(
        t.contains_key("pod-a") && t.contains_key("pod-b"),
        "both endpoints must be reached: {t:?}"
    );
}

/// A client pod's connections to a ClusterIP: the backends see the client's own address of
/// the ClusterIP's family.
struct Source {
    row: &'static str,
    client: &'static str,
    target: &'static str,
}

const SOURCES: [Source; 4] = [
    Source {
        row: "§5.10 from the node of web-1",
        client: "client-a",
        target: "10.96.0.10:80",
    },
    Source {
        row: "§5.10 from the node of web-2",
        client: "client-b",
        target: "10.96.0.10:80",
    },
    Source {
        row: "dual-stack, its IPv4 ClusterIP",
        client: "client-a",
        target: "10.96.0.42:80",
    },
    Source {
        row: "dual-stack, its IPv6 ClusterIP",
        client: "client-a",
        target: "[fd00:96::42]:80",
    },
];

/// §5.10 and the dual-stack smoke ([`SOURCES`]): pod → ClusterIP is not SNATed. The backend
/// sees the client pod's own address, from a pod on the same node as a backend and from one
/// on the other node (both backends reached from each, so both the local and the remote path
/// are covered); a Service with an IPv4 and an IPv6 ClusterIP answers on both from both
/// backends, with the client's address of the matching family.
#[test]
fn pod_to_clusterip_keeps_the_pod_source_address_in_each_family() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    let clients = [client(&lab, "client-a", "a"), client(&lab, "client-b", "b")];
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.10").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&backends, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let dual = Service::cluster_ips("dual", &["10.96.0.42", "fd00:96::42"]).port(
        "http",
        80,
        TCP,
        Proto::Tcp,
    );
    let v4 = Slice::for_service("dual")
        .port("http", TCP)
        .endpoints(&backends, Cond::READY);
    let v6 = v4.clone().named("dual-v6").ipv6();
    c.write("dual.yaml", &[&dual as &dyn ToJson, &v4, &v6]);
    for s in &SOURCES {
        let target = vip(s.target);
        let pod = clients.iter().find(|p| p.name == s.client).unwrap();
        let src = pod_addr(pod, IpFamily::of(target.ip()));
        c.wait_answers(Host::Pod(s.client), Proto::Tcp, target, START);
        let rs = c.probe(
            Host::Pod(s.client),
            Proto::Tcp,
            target,
            &ProbeOpts::count(16),
        );
        let what = format!("{}: {} → {target}", s.row, s.client);
        assert_spread(&rs, Some(src), &["web-1", "web-2"], &what);
        let node = c.lab.pod(s.client).node;
        c.assert_trace_agrees(&node, Host::Pod(s.client), (Proto::Tcp, target), &rs);
    }
}

/// The only endpoint of a ClusterIP of one family.
struct Hairpin {
    family: IpFamily,
    service: &'static str,
    vip: &'static str,
    target: &'static str,
}

const HAIRPINS: [Hairpin; 2] = [
    Hairpin {
        family: IpFamily::V4,
        service: "solo",
        vip: "10.96.0.11",
        target: "10.96.0.11:80",
    },
    Hairpin {
        family: IpFamily::V6,
        service: "solo6",
        vip: "fd00:96::81",
        target: "[fd00:96::81]:80",
    },
];

/// §5.11 (and §5.42 with 11), IPv4 and IPv6 ([`HAIRPINS`]): the only endpoint reaches its own
/// ClusterIP 10/10, and what it sees as the source is not its own address (masqueraded) but
/// an address of its node of the same family.
#[test]
fn hairpin_to_own_clusterip_is_masqueraded_to_the_node() {
    let lab = Cluster::lab(&["a", "b"]);
    let solo = pods(&lab, &[("solo", "a")]).remove(0);
    let c = Cluster::start(lab);
    for h in &HAIRPINS {
        let svc = Service::cluster_ip(h.service, h.vip).port("http", 80, TCP, Proto::Tcp);
        let slice = Slice::for_service(h.service)
            .port("http", TCP)
            .endpoint(&solo, Cond::READY);
        let slice = if h.family == IpFamily::V6 {
            slice.ipv6()
        } else {
            slice
        };
        c.write(&format!("{}.yaml", h.service), &[&svc, &slice]);
    }
    for h in &HAIRPINS {
        let (family, target) = (h.family, vip(h.target));
        c.wait_answers(Host::Pod("solo"), Proto::Tcp, target, START);
        let rs = c.probe(Host::Pod("solo"), Proto::Tcp, target, &ProbeOpts::count(10));
        let t = assert_all_ok(&rs, &format!("{family:?} hairpin 10/10"));
        assert_eq!(t.get("solo"), Some(&10), "{family:?}: {t:?}");
        let node_addrs = c.addresses_of(Host::Node("a"), family);
        for r in &rs {
            let src = r.client().unwrap().ip();
            assert_ne!(
                src,
                pod_addr(&solo, family),
                "{family:?}: hairpin traffic must be masqueraded: {r}"
            );
            assert!(
                node_addrs.contains(&src),
                "{family:?}: hairpin source {src} is not an address of node a {node_addrs:?}"
            );
        }
        eprintln!(
            "{family:?} hairpin source: {}",
            rs[0].client().unwrap().ip()
        );
        let t = c.assert_trace_agrees("a", Host::Pod("solo"), (Proto::Tcp, target), &rs);
        assert!(
            t.masquerade,
            "{family:?}: Trace must say hairpin is masqueraded"
        );
    }
}

/// A Service of one family without endpoints: TCP and UDP ports, each with a NodePort.
struct Empty {
    family: IpFamily,
    service: &'static str,
    vip: &'static str,
    node_ports: (u16, u16),
}

const EMPTIES: [Empty; 2] = [
    Empty {
        family: IpFamily::V4,
        service: "empty",
        vip: "10.96.0.17",
        node_ports: (30017, 30053),
    },
    Empty {
        family: IpFamily::V6,
        service: "empty6",
        vip: "fd00:96::82",
        node_ports: (30181, 30182),
    },
];

/// §5.17 (and §5.42 with 17), IPv4 and IPv6 ([`EMPTIES`]): a Service without endpoints is
/// refused, fast (not a timeout), for TCP and UDP, on its ClusterIP from a pod and on its
/// NodePorts (on both nodes' addresses of its family) from ext. A squatter listens on node
/// a's NodePorts so that only the proxy's reject (not a closed port) can produce the refusal.
#[test]
fn no_endpoints_is_refused_fast_on_clusterip_and_nodeport() {
    let lab = Cluster::lab(&["a", "b"]);
    client(&lab, "client", "a");
    let tcp: Vec<u16> = EMPTIES.iter().map(|e| e.node_ports.0).collect();
    let udp: Vec<u16> = EMPTIES.iter().map(|e| e.node_ports.1).collect();
    let _squatter = squatter(&lab, "a", &tcp, &udp);
    // Without any proxy rule the squatter answers: the checks below can fail.
    for e in &EMPTIES {
        let target = sock(node_addr(&lab, "a", e.family), e.node_ports.0);
        let before = lab.probe_once(Host::External, Proto::Tcp, target).unwrap();
        assert_eq!(before.server(), Some("squatter"), "{target}: {before}");
    }
    let c = Cluster::start(lab);
    for e in &EMPTIES {
        let svc = Service::cluster_ip(e.service, e.vip)
            .port("http", 80, TCP, Proto::Tcp)
            .node_port(e.node_ports.0)
            .port("dns", 53, UDP, Proto::Udp)
            .node_port(e.node_ports.1);
        let slice =
            Slice::for_service(e.service)
                .port("http", TCP)
                .port_proto("dns", UDP, Proto::Udp);
        let slice = if e.family == IpFamily::V6 {
            slice.ipv6()
        } else {
            slice
        };
        c.write(&format!("{}.yaml", e.service), &[&svc, &slice]);
    }
    c.wait_synced(START);
    for e in &EMPTIES {
        let row = format!("{:?} {}", e.family, e.service);
        let ip: IpAddr = e.vip.parse().unwrap();
        c.wait_probe(
            &format!("{row}: ClusterIP refused"),
            Host::Pod("client"),
            Proto::Tcp,
            sock(ip, 80),
            START,
            |r| *r == ProbeResult::Refused,
        );
        // TCP to the ClusterIP was just refused within the wait's 300 ms attempt timeout;
        // each case below is probed once, because the kernel rate-limits the ICMP errors a
        // reject sends to one client (a small burst, then 1/s).
        let (na, nb) = (
            node_addr(&c.lab, "a", e.family),
            node_addr(&c.lab, "b", e.family),
        );
        let (tcp, udp) = e.node_ports;
        let cases = [
            (Host::Pod("client"), Proto::Udp, sock(ip, 53)),
            (Host::External, Proto::Tcp, sock(na, tcp)),
            (Host::External, Proto::Udp, sock(na, udp)),
            (Host::External, Proto::Tcp, sock(nb, tcp)),
            (Host::External, Proto::Udp, sock(nb, udp)),
        ];
        c.assert_trace_agrees(
            "a",
            Host::Pod("client"),
            (Proto::Tcp, sock(ip, 80)),
            &[ProbeResult::Refused],
        );
        for (from, proto, target) in cases {
            assert_refused_fast(&c, from, proto, target, &row);
            let node = if target.ip() == nb { "b" } else { "a" };
            c.assert_trace_agrees(node, from, (proto, target), &[ProbeResult::Refused]);
        }
    }
}

/// §5.18: 0 → 1 → 0 endpoints: refused, then served within 2 s of the slice appearing,
/// then refused again within 2 s of it emptying.
#[test]
fn zero_to_one_to_zero_endpoints() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]).remove(0);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.18").port("http", 80, TCP, Proto::Tcp);
    let empty = Slice::for_service("web").port("http", TCP);
    c.write("web.yaml", &[&svc, &empty]);
    let target = vip("10.96.0.18:80");
    c.wait_probe(
        "empty Service refused",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        START,
        |r| *r == ProbeResult::Refused,
    );
    let full = Slice::for_service("web")
        .port("http", TCP)
        .endpoint(&web, Cond::READY);
    c.write("web.yaml", &[&svc, &full]);
    c.wait_probe(
        "0→1: served",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        CONVERGE,
        |r| r.server() == Some("web-1"),
    );
    c.write("web.yaml", &[&svc, &empty]);
    c.wait_probe(
        "1→0: refused",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        CONVERGE,
        |r| *r == ProbeResult::Refused,
    );
    // And it stays that way: no flapping back to the endpoint. (Refused or timed out: the
    // kernel rate-limits the ICMP errors a reject sends to one client — a small burst, then
    // 1/s — so after the refusals above a further one may show as a timeout.)
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(2).timeout(Duration::from_millis(500)),
    );
    assert!(
        rs.iter()
            .all(|r| matches!(r, ProbeResult::Refused | ProbeResult::Timeout)),
        "the emptied Service answered again: {rs:?}"
    );
}

/// §5.19: removing one of three endpoints drains it — within 2 s no new connection reaches
/// it — while a TCP connection already established to it keeps working (it exchanges data
/// after the change).
#[test]
fn endpoint_removal_drains_new_connections_and_keeps_established_ones() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b"), ("web-3", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.19").port("http", 80, TCP, Proto::Tcp);
    let slice = |pods: &[&kubenft_lab::Pod]| {
        Slice::for_service("web")
            .port("http", TCP)
            .endpoints(pods.iter().copied(), Cond::READY)
    };
    let all: Vec<&kubenft_lab::Pod> = backends.iter().collect();
    c.write("web.yaml", &[&svc, &slice(&all)]);
    let target = vip("10.96.0.19:80");
    c.wait_all_seen(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &["web-1", "web-2", "web-3"],
        START,
    );

    // A long-lived connection through the ClusterIP: socat connects, the script reads the
    // greeting (which pod), waits for the go file, sends a line and records the echo.
    let (greeting, held) = hold_connection(&c, Host::Pod("client"), target, None);
    let held_pod = greeting.split_whitespace().next().unwrap().to_string();
    eprintln!("held connection is to {held_pod} ({})", greeting.trim());

    // Remove exactly that endpoint (the pod keeps running).
    let keep: Vec<&kubenft_lab::Pod> = backends.iter().filter(|p| p.name != held_pod).collect();
    c.write("web.yaml", &[&svc, &slice(&keep)]);
    let removed_at = Instant::now();
    let mut clean_batches = 0;
    kubenft_lab::wait_until(CONVERGE, POLL, || {
        let rs = c.lab.probe(
            Host::Pod("client"),
            Proto::Tcp,
            target,
            &ProbeOpts::count(6).timeout(Duration::from_millis(300)),
        )?;
        clean_batches = if rs
            .iter()
            .all(|r| r.is_ok() && r.server() != Some(&held_pod))
        {
            clean_batches + 1
        } else {
            0
        };
        Ok::<_, kubenft_lab::LabError>(clean_batches >= 2)
    })
    .unwrap_or_else(|e| panic!("{held_pod} still gets new connections 2 s after removal: {e}"));
    eprintln!("drained after {:?}", removed_at.elapsed());
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(24),
    );
    let t = assert_all_ok(&rs, "after removal");
    assert!(
        !t.contains_key(&held_pod),
        "{held_pod} got new traffic: {t:?}"
    );
    assert_eq!(t.len(), 2, "the two remaining endpoints serve: {t:?}");

    // The established connection still carries data.
    let outcome = held.finish();
    assert_eq!(
        outcome, "echo:held-ping",
        "the established connection to {held_pod} was broken by the endpoint removal"
    );
}
