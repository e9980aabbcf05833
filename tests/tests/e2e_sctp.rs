//! End to end through the real controller and agents: SCTP Services (row 20 of
//! docs/semantics.md §1).
//!
//! This CI kernel has SCTP conntrack and NAT but no SCTP sockets, so the echo tool speaks
//! SCTP through raw sockets there: a real INIT answered by a real INIT-ACK that carries the
//! greeting (see `kubenft_lab::sctp_raw`). The packets cross the proxy's nft rules exactly
//! as a real association's first two would, so which pod answered and which source it saw
//! mean the same as for TCP. On a kernel with SCTP sockets, real associations are used.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use kubenft_lab::manifest::ToJson;
use kubenft_lab::sctp_raw::kernel_has_sctp;
use kubenft_lab::topology::{EXT_V4, POD_GW_V4};
use kubenft_lab::{Cond, EchoPorts, Host, ProbeOpts, ProbeResult, Proto, Service, Slice};

const SCTP: u16 = 9999;

fn mode() -> &'static str {
    if kernel_has_sctp() {
        "kernel SCTP sockets"
    } else {
        "raw-socket INIT/INIT-ACK (no kernel SCTP sockets)"
    }
}

/// Row 20 and behaviours 1, 7, 10, 13 for SCTP: one port number (80) carried by TCP and
/// SCTP with different endpoints each; SCTP spreads over its two pods from a pod (source
/// kept), over IPv4 and IPv6, and a NodePort from ext answers on both nodes with a node
/// source address (ETP=Cluster masquerades).
#[test]
fn sctp_clusterip_and_nodeport_share_a_port_number_with_tcp() {
    eprintln!("SCTP mode: {}", mode());
    let lab = Cluster::lab(&["a", "b"]);
    let sctp_ports = EchoPorts {
        sctp: vec![SCTP],
        ..Default::default()
    };
    let s1 = lab.add_pod("sctp-1", "a", &sctp_ports).unwrap();
    let s2 = lab.add_pod("sctp-2", "b", &sctp_ports).unwrap();
    let t1 = pods(&lab, &[("tcp-1", "b")]).remove(0);
    let cl = client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ips("mixed", &["10.96.0.132", "fd00:96::132"])
        .port("http", 80, TCP, Proto::Tcp)
        .port("assoc", 80, SCTP, Proto::Sctp)
        .node_port(30132);
    let tcp_slice = Slice::for_service("mixed")
        .named("mixed-tcp")
        .port("http", TCP)
        .endpoint(&t1, Cond::READY);
    let sctp_v4 = Slice::for_service("mixed")
        .named("mixed-sctp")
        .port_proto("assoc", SCTP, Proto::Sctp)
        .endpoints([&s1, &s2], Cond::READY);
    let sctp_v6 = sctp_v4.clone().named("mixed-sctp-v6").ipv6();
    c.write(
        "mixed.yaml",
        &[&svc as &dyn ToJson, &tcp_slice, &sctp_v4, &sctp_v6],
    );

    for (target, src) in [
        (vip("10.96.0.132:80"), IpAddr::from(cl.ipv4)),
        (vip("[fd00:96::132]:80"), IpAddr::from(cl.ipv6)),
    ] {
        c.wait_all_seen(
            Host::Pod("client"),
            Proto::Sctp,
            target,
            &["sctp-1", "sctp-2"],
            START,
        );
        let rs = c.probe(
            Host::Pod("client"),
            Proto::Sctp,
            target,
            &ProbeOpts::count(20),
        );
        let t = assert_all_from(&rs, src, &format!("SCTP {target}"));
        assert_eq!(
            t.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            BTreeSet::from(["sctp-1", "sctp-2"]),
            "SCTP {target} must reach exactly the SCTP endpoints: {t:?}"
        );
        c.assert_traces_agree("a", Host::Pod("client"), (Proto::Sctp, target), &rs);
    }
    // TCP on the same number goes to its own endpoint only.
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        vip("10.96.0.132:80"),
        &ProbeOpts::count(10),
    );
    let t = assert_all_from(&rs, cl.ipv4.into(), "TCP 10.96.0.132:80");
    assert_eq!(t.get("tcp-1"), Some(&10), "{t:?}");
    let tcp = (Proto::Tcp, vip("10.96.0.132:80"));
    c.assert_trace_agrees("a", Host::Pod("client"), tcp, &rs);

    // The SCTP NodePort from outside, on both nodes: answered, and masqueraded.
    for node in ["a", "b"] {
        let n = c.lab.node(node);
        let target = sock(n.ipv4, 30132);
        c.wait_answers(Host::External, Proto::Sctp, target, START);
        let rs = c.probe(Host::External, Proto::Sctp, target, &ProbeOpts::count(8));
        assert_all_ok(&rs, &format!("ext -> SCTP {target}"));
        for r in &rs {
            let seen = r.client().unwrap().ip();
            assert_ne!(seen, IpAddr::from(EXT_V4), "ETP=Cluster must SNAT: {r}");
            // Masqueraded to the node: its fabric address, or its pod-gateway address when
            // the endpoint is on the same node (the address of the outgoing interface).
            let node_addr = seen == IpAddr::from(POD_GW_V4)
                || c.lab.nodes().iter().any(|n| IpAddr::from(n.ipv4) == seen);
            assert!(
                node_addr,
                "via node {node} the backend saw {seen}, not a node address"
            );
        }
        c.assert_traces_agree(node, Host::External, (Proto::Sctp, target), &rs);
    }
}

/// Behaviours 17 and 18 for SCTP: no endpoints → rejected fast (ICMP, not a timeout) on
/// the ClusterIP; an endpoint appearing is served within 2 s; the NodePort of an SCTP
/// Service with endpoints only elsewhere and ETP=Local drops ext (timeout).
#[test]
fn sctp_without_endpoints_is_rejected_then_served() {
    eprintln!("SCTP mode: {}", mode());
    let lab = Cluster::lab(&["a", "b"]);
    let sctp_ports = EchoPorts {
        sctp: vec![SCTP],
        ..Default::default()
    };
    let s1 = lab.add_pod("sctp-1", "b", &sctp_ports).unwrap();
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("assoc", "10.96.0.133")
        .port("assoc", 5000, SCTP, Proto::Sctp)
        .node_port(30133)
        .external_traffic_policy(kubenft_lab::TrafficPolicy::Local);
    let empty = Slice::for_service("assoc").port_proto("assoc", SCTP, Proto::Sctp);
    c.write("assoc.yaml", &[&svc, &empty]);
    c.wait_synced(START);
    let target = vip("10.96.0.133:5000");
    let start = Instant::now();
    let r = c.probe1(
        Host::Pod("client"),
        Proto::Sctp,
        target,
        Duration::from_secs(2),
    );
    assert_eq!(r, ProbeResult::Refused, "SCTP without endpoints: {r}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Sctp, target), &[r]);

    c.write("assoc.yaml", &[&svc, &empty.endpoint(&s1, Cond::READY)]);
    c.wait_probe(
        "SCTP endpoint served",
        Host::Pod("client"),
        Proto::Sctp,
        target,
        CONVERGE + Duration::from_secs(1),
        |r| r.server() == Some("sctp-1"),
    );
    // ETP=Local: node b has the endpoint, node a does not (drop, not reject).
    let (na, nb) = (c.lab.node("a").ipv4, c.lab.node("b").ipv4);
    let ok = c.probe1(Host::External, Proto::Sctp, sock(nb, 30133), DROP_WAIT * 2);
    assert_eq!(ok.server(), Some("sctp-1"), "{ok}");
    assert_eq!(
        ok.client().map(|a| a.ip()),
        Some(IpAddr::from(EXT_V4)),
        "{ok}"
    );
    let dropped = c.probe1(Host::External, Proto::Sctp, sock(na, 30133), DROP_WAIT);
    assert_eq!(dropped, ProbeResult::Timeout, "{dropped}");
    let np = |n| (Proto::Sctp, sock(n, 30133));
    c.assert_traces_agree("b", Host::External, np(nb), &[ok]);
    c.assert_traces_agree("a", Host::External, np(na), &[dropped]);
}
