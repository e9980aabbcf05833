//! End to end through the real controller and agents: NodePorts from outside the cluster
//! and from the nodes themselves, with both externalTrafficPolicy values.
//! Behaviour numbers refer to docs/behaviours.md §5.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;

use common::*;
use kubenft_lab::topology::EXT_V4;
use kubenft_lab::{Cond, Host, ProbeOpts, ProbeResult, Proto, Service, Slice, TrafficPolicy};

/// Every IPv4 address configured on any lab node (fabric IPs, pod gateway addresses).
fn all_node_addresses(c: &Cluster) -> BTreeSet<IpAddr> {
    c.lab
        .nodes()
        .iter()
        .flat_map(|n| c.ipv4_addresses(Host::Node(&n.name)))
        .collect()
}

/// §5.7 and §5.13: a NodePort (ETP=Cluster) whose only endpoint is on node b answers ext on
/// every node — node a has no local endpoint — and the backend sees a node address (SNAT),
/// never ext's.
#[test]
fn nodeport_cluster_policy_answers_on_every_node_and_masquerades() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]).remove(0);
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.70")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30007)
        .external_traffic_policy(TrafficPolicy::Cluster);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoint(&web, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let node_addrs = all_node_addresses(&c);
    for node in ["a", "b"] {
        let target = sock(c.lab.node(node).ipv4, 30007);
        c.wait_answers(Host::External, Proto::Tcp, target, START);
        let rs = c.probe(Host::External, Proto::Tcp, target, &ProbeOpts::count(6));
        let t = assert_all_ok(&rs, &format!("ext -> node {node}:30007"));
        assert_eq!(t.get("web-1"), Some(&6), "{t:?}");
        for r in &rs {
            let src = r.client().unwrap().ip();
            assert_ne!(
                src,
                IpAddr::from(EXT_V4),
                "ETP=Cluster must SNAT ext's address: {r}"
            );
            assert!(
                node_addrs.contains(&src),
                "source {src} seen via node {node} is not a node address {node_addrs:?}"
            );
        }
        eprintln!("via node {node}: backend saw {}", rs[0].client().unwrap());
        c.assert_traces_agree(node, Host::External, (Proto::Tcp, target), &rs);
    }
}

/// §5.8: from a node's own host network (the OUTPUT path) to its own IP and to the other
/// node's IP on the NodePort.
#[test]
fn nodeport_from_the_nodes_themselves() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.80")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30008);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&backends, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let (a, b) = (c.lab.node("a").ipv4, c.lab.node("b").ipv4);
    c.wait_answers(Host::Node("a"), Proto::Tcp, sock(a, 30008), START);
    c.wait_synced(START);
    for (from, to) in [("a", a), ("a", b), ("b", b), ("b", a)] {
        let target = sock(to, 30008);
        let rs = c.probe(Host::Node(from), Proto::Tcp, target, &ProbeOpts::count(8));
        let t = assert_all_ok(&rs, &format!("node {from} -> {target}"));
        eprintln!("node {from} -> {target}: {t:?}");
        // The node whose address it is decides (the sender's rules leave it alone).
        let to_node = if to == a { "a" } else { "b" };
        c.assert_trace_agrees(to_node, Host::Node(from), (Proto::Tcp, target), &rs);
    }
}

/// §5.14: ETP=Local with the only endpoint on node b: ext → node b keeps ext's address;
/// ext → node a (no local endpoint) is dropped — a timeout, neither an answer nor a refusal.
#[test]
fn nodeport_local_policy_keeps_source_and_drops_without_local_endpoint() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]).remove(0);
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("local", "10.96.0.14")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30014)
        .external_traffic_policy(TrafficPolicy::Local);
    let slice = Slice::for_service("local")
        .port("http", TCP)
        .endpoint(&web, Cond::READY);
    c.write("local.yaml", &[&svc, &slice]);
    let (a, b) = (c.lab.node("a").ipv4, c.lab.node("b").ipv4);
    c.wait_answers(Host::External, Proto::Tcp, sock(b, 30014), START);
    let rs = c.probe(
        Host::External,
        Proto::Tcp,
        sock(b, 30014),
        &ProbeOpts::count(6),
    );
    let t = assert_all_from(&rs, EXT_V4.into(), "ext -> endpoint node b");
    assert_eq!(t.get("web-1"), Some(&6), "{t:?}");
    c.assert_traces_agree("b", Host::External, (Proto::Tcp, sock(b, 30014)), &rs);
    // Both agents are synced (node a has its rules), so a non-answer on a is the policy.
    c.wait_synced(START);
    let rs = c.probe(
        Host::External,
        Proto::Tcp,
        sock(a, 30014),
        &ProbeOpts::count(2).timeout(DROP_WAIT),
    );
    assert_eq!(
        rs,
        vec![ProbeResult::Timeout; 2],
        "ext -> node a (no local endpoint) must be dropped"
    );
    c.assert_traces_agree("a", Host::External, (Proto::Tcp, sock(a, 30014)), &rs);
}
