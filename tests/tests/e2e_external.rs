//! End to end through the real controller and agents: externalIPs and load-balancer ingress
//! IPs (both traffic policies, `ipMode: Proxy`), ClientIP affinity on the external addresses,
//! and who gets masqueraded (with and without `--cluster-cidr`, with `--masquerade-all`).
//! Behaviour numbers refer to docs/behaviours.md §5; rows to
//! docs/semantics.md §1.
//!
//! External addresses (203.0.113.0/24) are only ever destinations routed inside the lab: ext
//! gets a /32 route to them via a node, and a packet the proxy does not DNAT follows the nodes'
//! default route to `cp`, which does not forward, so it dies there (a timeout). The two kinds
//! of timeout are told apart by the node's conntrack table: a connection the proxy dropped was
//! never confirmed there; one it let through undnatted expects its reply from the address
//! itself.
//!
//! "Masqueraded" for a host-network client is told from what the server saw: without SNAT it
//! sees the client's own (node address, source port); masquerading (`fully-random`) changes the
//! port, and towards a pod on the same node also the address (the pod veth's 169.254.1.1).

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use common::*;
use kubenft_lab::topology::EXT_V4;
use kubenft_lab::{
    Cond, Host, ProbeOpts, ProbeResult, Proto, Service, ServiceType, Slice, TrafficPolicy,
};

const EXTERNAL_IP: &str = "203.0.113.250";
const LB_IP: &str = "203.0.113.20";
const LB_PROXY_IP: &str = "203.0.113.21";

/// One TCP connection from `node`'s host network with source port `sport`; must be answered.
fn from_host(c: &Cluster, node: &str, target: SocketAddr, sport: u16) -> ProbeResult {
    let r = c
        .probe(
            Host::Node(node),
            Proto::Tcp,
            target,
            &ProbeOpts::default().source_port(sport),
        )
        .remove(0);
    assert!(r.is_ok(), "node {node} -> {target} (sport {sport}): {r}");
    r
}

/// A host-network connection from `node` (source port `sport`) was masqueraded: the server
/// saw one of the node's addresses, but not the connection's own (node IP, source port).
#[track_caller]
fn assert_host_masqueraded(c: &Cluster, node: &str, r: &ProbeResult, sport: u16, what: &str) {
    let seen = r.client().expect("answered");
    let own = sock(c.lab.node(node).ipv4, sport);
    assert_ne!(seen, own, "{what}: not masqueraded: {r}");
    assert!(
        c.ipv4_addresses(Host::Node(node)).contains(&seen.ip()),
        "{what}: masqueraded to {seen}, not to an address of node {node}"
    );
    eprintln!("{what}: server saw {seen} (own {own})");
}

/// A host-network connection from `node` (source port `sport`) kept its own source.
#[track_caller]
fn assert_host_not_masqueraded(c: &Cluster, node: &str, r: &ProbeResult, sport: u16, what: &str) {
    assert_eq!(
        r.client(),
        Some(sock(c.lab.node(node).ipv4, sport)),
        "{what}: the source was rewritten: {r}"
    );
}

/// Two attempts from `from` both time out (dropped, or not DNATed and lost beyond the node).
#[track_caller]
fn assert_times_out(c: &Cluster, from: Host<'_>, target: SocketAddr, what: &str) {
    let rs = c.probe(
        from,
        Proto::Tcp,
        target,
        &ProbeOpts::count(2).timeout(DROP_WAIT),
    );
    assert_eq!(
        rs,
        vec![ProbeResult::Timeout; 2],
        "{what}: {from:?} -> {target} must time out"
    );
}

/// `node`'s conntrack entries of unanswered TCP connections from `src` to `dst`, one line
/// each (answered ones of earlier probes are left out).
fn unanswered(c: &Cluster, node: &str, src: IpAddr, dst: SocketAddr) -> Vec<String> {
    let out = c
        .lab
        .exec(
            Host::Node(node),
            &[
                "conntrack",
                "-L",
                "-p",
                "tcp",
                "-s",
                &src.to_string(),
                "-d",
                &dst.ip().to_string(),
                "--dport",
                &dst.port().to_string(),
            ],
        )
        .unwrap_or_else(|e| panic!("conntrack on node {node}: {e}"));
    assert!(
        out.status.success(),
        "conntrack on node {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("[UNREPLIED]"))
        .map(str::to_string)
        .collect()
}

/// After a timeout: `node` dropped the connection itself (the proxy's filter verdict), so it
/// never confirmed a conntrack entry for it — it was not forwarded and lost further on.
#[track_caller]
fn assert_dropped_at(c: &Cluster, node: &str, src: IpAddr, dst: SocketAddr, what: &str) {
    let entries = unanswered(c, node, src, dst);
    assert!(
        entries.is_empty(),
        "{what}: node {node} let the connection through instead of dropping it: {entries:#?}"
    );
}

/// After a timeout: `node` forwarded the connection without DNAT — its conntrack entry
/// expects the reply from `dst` itself, not from an endpoint.
#[track_caller]
fn assert_not_dnated_at(c: &Cluster, node: &str, src: IpAddr, dst: SocketAddr, what: &str) {
    let entries = unanswered(c, node, src, dst);
    assert!(
        !entries.is_empty(),
        "{what}: node {node} has no conntrack entry {src} -> {dst} (dropped, not forwarded)"
    );
    for e in &entries {
        let reply_src = e
            .split_whitespace()
            .filter(|w| w.starts_with("src="))
            .nth(1);
        assert_eq!(
            reply_src,
            Some(format!("src={}", dst.ip()).as_str()),
            "{what}: node {node} DNATed the connection: {e}"
        );
    }
}

/// `ip kubenft` as listed on `node`.
fn table(c: &Cluster, node: &str) -> String {
    c.nft(node, &["list", "table", "ip", "kubenft"])
}

/// §5.35, rows 7 and 8: an externalIP is served on the Service port to a pod, to a
/// host-network process and to ext routed via node a; with ETP=Cluster every one of them is
/// masqueraded (pods too). Another port on it is not DNATed. Once the externalIP is removed
/// from the Service it is no longer DNATed anywhere (timeouts, no element left), while the
/// ClusterIP keeps working.
#[test]
fn external_ip_is_served_to_pods_hosts_and_ext_until_removed() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    let pod = client(&lab, "client", "b");
    let c = Cluster::start(lab);
    route_ext_via(&c, EXTERNAL_IP, "a");
    let svc = Service::cluster_ip("web", "10.96.0.35").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&web, Cond::READY);
    let target = sock(ip(EXTERNAL_IP), 80);
    let cluster_ip = vip("10.96.0.35:80");

    c.write(
        "web.yaml",
        &[&svc.clone().external_ip(ip(EXTERNAL_IP)), &slice],
    );
    c.wait_answers(Host::External, Proto::Tcp, target, START);
    c.wait_synced(START);

    let rs = all_ok(&c, Host::External, target, 8);
    assert_masqueraded_to(&c, &rs, "a", "ext -> externalIP via node a (ETP=Cluster)");
    c.assert_traces_agree("a", Host::External, (Proto::Tcp, target), &rs);
    let rs = all_ok(&c, Host::Pod("client"), target, 8);
    assert!(
        rs.iter()
            .all(|r| r.client().unwrap().ip() != IpAddr::from(pod.ipv4)),
        "pod -> externalIP (ETP=Cluster) must be masqueraded: {rs:?}"
    );
    assert_masqueraded_to(&c, &rs, "b", "pod -> externalIP (ETP=Cluster)");
    c.assert_trace_agrees("b", Host::Pod("client"), (Proto::Tcp, target), &rs);
    let r = from_host(&c, "b", target, 41035);
    assert_host_masqueraded(&c, "b", &r, 41035, "node b host -> externalIP");
    c.assert_trace_agrees("b", Host::Node("b"), (Proto::Tcp, target), &[r]);
    all_ok(&c, Host::Node("a"), target, 4);
    // Only the Service port is captured on the externalIP.
    assert_times_out(
        &c,
        Host::Pod("client"),
        sock(ip(EXTERNAL_IP), 81),
        "another port of the externalIP",
    );
    let pod_ip = IpAddr::from(pod.ipv4);
    let node_b = IpAddr::from(c.lab.node("b").ipv4);
    let what = "another port of the externalIP";
    assert_not_dnated_at(&c, "b", pod_ip, sock(ip(EXTERNAL_IP), 81), what);
    assert_trace_not_service(&c, "b", pod_ip, sock(ip(EXTERNAL_IP), 81));

    // The externalIP is removed: nothing DNATs it any more.
    c.write("web.yaml", &[&svc, &slice]);
    c.wait_probe(
        "ext -> removed externalIP times out",
        Host::External,
        Proto::Tcp,
        target,
        CONVERGE,
        |r| matches!(r, ProbeResult::Timeout),
    );
    c.wait_synced(START);
    assert_times_out(&c, Host::External, target, "removed externalIP from ext");
    assert_times_out(
        &c,
        Host::Pod("client"),
        target,
        "removed externalIP from a pod",
    );
    assert_times_out(
        &c,
        Host::Node("b"),
        target,
        "removed externalIP from node b",
    );
    let what = "removed externalIP";
    assert_not_dnated_at(&c, "a", EXT_V4.into(), target, what);
    assert_not_dnated_at(&c, "b", pod_ip, target, what);
    assert_not_dnated_at(&c, "b", node_b, target, what);
    assert_trace_not_service(&c, "a", EXT_V4.into(), target);
    assert_trace_not_service(&c, "b", pod_ip, target);
    for node in ["a", "b"] {
        let t = table(&c, node);
        assert!(
            !t.contains(EXTERNAL_IP),
            "node {node} still programs {EXTERNAL_IP}:\n{t}"
        );
    }
    all_ok(&c, Host::Pod("client"), cluster_ip, 4);
}

/// §5.36, rows 5, 8 and 14: an LB ingress IP (ipMode unset) is served to ext routed via a
/// node, masqueraded (ETP=Cluster); pod → LB IP and pod → NodePort are masqueraded too, while
/// the same pod → ClusterIP keeps its address. An `ipMode: Proxy` ingress IP of the same
/// Service is not programmed at all: no table mentions it and traffic to it is not DNATed.
#[test]
fn lb_ip_is_served_and_masqueraded_while_proxy_mode_ip_is_not_programmed() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]).remove(0);
    let pod = client(&lab, "client", "a");
    let c = Cluster::start(lab);
    route_ext_via(&c, LB_IP, "a");
    route_ext_via(&c, LB_PROXY_IP, "a");
    let svc = Service::cluster_ip("web", "10.96.0.36")
        .service_type(ServiceType::LoadBalancer)
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30036)
        .lb_ingress(ip(LB_IP))
        .lb_ingress_mode(ip(LB_PROXY_IP), "Proxy");
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoint(&web, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let lb = sock(ip(LB_IP), 80);
    c.wait_answers(Host::External, Proto::Tcp, lb, START);
    c.wait_synced(START);

    let rs = all_ok(&c, Host::External, lb, 6);
    assert!(
        rs.iter()
            .all(|r| r.client().unwrap().ip() != IpAddr::from(EXT_V4)),
        "ext -> LB IP (ETP=Cluster) must be masqueraded: {rs:?}"
    );
    assert_masqueraded_to(&c, &rs, "a", "ext -> LB IP via node a");
    c.assert_traces_agree("a", Host::External, (Proto::Tcp, lb), &rs);
    let pod_ip = IpAddr::from(pod.ipv4);
    // (what, target, the node that DNATs and masquerades)
    for (what, target, node) in [
        ("pod -> LB IP", lb, "a"),
        (
            "pod -> node a NodePort",
            sock(c.lab.node("a").ipv4, 30036),
            "a",
        ),
        (
            "pod -> node b NodePort",
            sock(c.lab.node("b").ipv4, 30036),
            "b",
        ),
    ] {
        let rs = all_ok(&c, Host::Pod("client"), target, 4);
        assert!(
            rs.iter().all(|r| r.client().unwrap().ip() != pod_ip),
            "{what} (ETP=Cluster) must be masqueraded: {rs:?}"
        );
        assert_masqueraded_to(&c, &rs, node, what);
        c.assert_trace_agrees(node, Host::Pod("client"), (Proto::Tcp, target), &rs);
    }
    let rs = all_ok(&c, Host::Pod("client"), vip("10.96.0.36:80"), 4);
    assert_all_from(&rs, pod_ip, "pod -> ClusterIP keeps its source");
    c.assert_trace_agrees(
        "a",
        Host::Pod("client"),
        (Proto::Tcp, vip("10.96.0.36:80")),
        &rs,
    );

    // ipMode Proxy: not programmed on any node, and not DNATed from anywhere.
    for node in ["a", "b"] {
        let t = table(&c, node);
        assert!(t.contains(LB_IP), "node {node} lacks {LB_IP}:\n{t}");
        assert!(
            !t.contains(LB_PROXY_IP),
            "node {node} programs the ipMode Proxy IP {LB_PROXY_IP}:\n{t}"
        );
    }
    let proxy = sock(ip(LB_PROXY_IP), 80);
    assert_times_out(&c, Host::External, proxy, "ext -> ipMode Proxy IP");
    assert_times_out(&c, Host::Pod("client"), proxy, "pod -> ipMode Proxy IP");
    assert_times_out(&c, Host::Node("a"), proxy, "node a -> ipMode Proxy IP");
    let node_a = IpAddr::from(c.lab.node("a").ipv4);
    for src in [EXT_V4.into(), pod_ip, node_a] {
        assert_not_dnated_at(&c, "a", src, proxy, "ipMode Proxy IP");
        assert_trace_not_service(&c, "a", src, proxy);
    }
}

/// §5.36 and §5.14-like, rows 7 and 9 (docs/semantics.md §5 item 1): ETP=Local on an
/// externalIP and an LB IP whose only endpoint is on node b. Ext routed via node b reaches it
/// with its own address; routed via node a (no local endpoint) it is dropped (timeout). A pod
/// on node a still reaches both, short-circuited to the cluster endpoints without SNAT
/// (kubernetes#131765), as it does node a's NodePort; a host-network client on node a
/// reaches both too, masqueraded.
#[test]
fn local_policy_external_and_lb_ips_keep_ext_source_drop_without_endpoint_and_admit_pods_and_hosts()
{
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]).remove(0);
    let pod = client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.37")
        .service_type(ServiceType::LoadBalancer)
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30037)
        .external_traffic_policy(TrafficPolicy::Local)
        .health_check_node_port(32037)
        .external_ip(ip(EXTERNAL_IP))
        .lb_ingress(ip(LB_IP));
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoint(&web, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    route_ext_via(&c, EXTERNAL_IP, "b");
    route_ext_via(&c, LB_IP, "b");
    c.wait_answers(Host::External, Proto::Tcp, sock(ip(LB_IP), 80), START);
    c.wait_synced(START);

    for (n, addr) in [EXTERNAL_IP, LB_IP].into_iter().enumerate() {
        let target = sock(ip(addr), 80);
        route_ext_via(&c, addr, "b");
        let rs = all_ok(&c, Host::External, target, 6);
        assert_all_from(&rs, EXT_V4.into(), &format!("ext -> {addr} via node b"));
        c.assert_traces_agree("b", Host::External, (Proto::Tcp, target), &rs);

        route_ext_via(&c, addr, "a");
        assert_times_out(
            &c,
            Host::External,
            target,
            &format!("ext -> {addr} via node a (no local endpoint)"),
        );
        assert_dropped_at(&c, "a", EXT_V4.into(), target, "ETP=Local without endpoint");
        let timeout = [ProbeResult::Timeout];
        c.assert_traces_agree("a", Host::External, (Proto::Tcp, target), &timeout);

        let rs = all_ok(&c, Host::Pod("client"), target, 6);
        let t = assert_all_from(&rs, pod.ipv4.into(), &format!("node a pod -> {addr}"));
        assert_eq!(t.get("web-1"), Some(&6), "{t:?}");
        c.assert_trace_agrees("a", Host::Pod("client"), (Proto::Tcp, target), &rs);

        let sport = 41037 + n as u16;
        let r = from_host(&c, "a", target, sport);
        assert_host_masqueraded(&c, "a", &r, sport, &format!("node a host -> {addr}"));
        c.assert_trace_agrees("a", Host::Node("a"), (Proto::Tcp, target), &[r]);
    }
    // The pod short-circuit holds for the node's own NodePort too.
    let np = sock(c.lab.node("a").ipv4, 30037);
    let rs = all_ok(&c, Host::Pod("client"), np, 4);
    assert_all_from(&rs, pod.ipv4.into(), "node a pod -> node a NodePort");
    c.assert_trace_agrees("a", Host::Pod("client"), (Proto::Tcp, np), &rs);
}

/// §5.24 (the variants e2e_affinity.rs leaves out): with ClientIP affinity, 15 consecutive
/// connections from one client hit one pod on an externalIP and on an LB IP (from ext), and on
/// a NodePort and the externalIP from a pod. Affinity is kept per address (README), so only
/// stickiness per address is asserted.
#[test]
fn client_ip_affinity_sticks_on_external_ip_lb_ip_and_nodeport() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a"), ("web-2", "b"), ("web-3", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    route_ext_via(&c, EXTERNAL_IP, "a");
    route_ext_via(&c, LB_IP, "a");
    let svc = Service::cluster_ip("web", "10.96.0.24")
        .service_type(ServiceType::LoadBalancer)
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30024)
        .external_ip(ip(EXTERNAL_IP))
        .lb_ingress(ip(LB_IP))
        .session_affinity_client_ip(None);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&web, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let (eip, lb) = (sock(ip(EXTERNAL_IP), 80), sock(ip(LB_IP), 80));
    let np = sock(c.lab.node("b").ipv4, 30024);
    c.wait_answers(Host::External, Proto::Tcp, lb, START);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, np, START);
    c.wait_synced(START);

    for (what, from, target, node) in [
        ("ext -> externalIP", Host::External, eip, "a"),
        ("ext -> LB IP", Host::External, lb, "a"),
        ("pod -> node b NodePort", Host::Pod("client"), np, "b"),
        ("pod -> externalIP", Host::Pod("client"), eip, "a"),
    ] {
        let rs = all_ok(&c, from, target, 15);
        let servers: BTreeSet<&str> = rs.iter().filter_map(ProbeResult::server).collect();
        assert_eq!(servers.len(), 1, "{what}: not sticky: {rs:?}");
        eprintln!("{what}: always {servers:?}");
        let t = c.assert_trace_agrees(node, from, (Proto::Tcp, target), &rs);
        assert_eq!(
            t.endpoints.len(),
            3,
            "{what}: a new client may reach any: {t:?}"
        );
    }
}

/// Row 14 and §5 item 3 of docs/semantics.md: ClusterIP traffic from outside the
/// cluster CIDR — the node's host network, ext routed to the ClusterIP via the node — is
/// masqueraded; a pod's is not. internalTrafficPolicy Local changes none of that.
#[test]
fn cluster_ip_masquerades_hosts_and_ext_but_not_pods_whatever_the_internal_policy() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a")]).remove(0);
    let pod = client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let slice = |svc: &str| {
        Slice::for_service(svc)
            .port("http", TCP)
            .endpoint(&web, Cond::READY)
    };
    let cluster = Service::cluster_ip("web", "10.96.0.41").port("http", 80, TCP, Proto::Tcp);
    let local = Service::cluster_ip("web-local", "10.96.0.42")
        .port("http", 80, TCP, Proto::Tcp)
        .internal_traffic_policy(TrafficPolicy::Local);
    c.write(
        "web.yaml",
        &[&cluster, &slice("web"), &local, &slice("web-local")],
    );
    route_ext_via(&c, "10.96.0.41", "a");
    route_ext_via(&c, "10.96.0.42", "a");
    for (n, (what, target)) in [
        ("ITP=Cluster", vip("10.96.0.41:80")),
        ("ITP=Local", vip("10.96.0.42:80")),
    ]
    .into_iter()
    .enumerate()
    {
        c.wait_answers(Host::Pod("client"), Proto::Tcp, target, START);
        let rs = all_ok(&c, Host::Pod("client"), target, 4);
        assert_all_from(&rs, pod.ipv4.into(), &format!("{what}: pod -> ClusterIP"));
        c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &rs);

        let sport = 41041 + n as u16;
        let r = from_host(&c, "a", target, sport);
        assert_host_masqueraded(&c, "a", &r, sport, &format!("{what}: node a -> ClusterIP"));
        let t = c.assert_trace_agrees("a", Host::Node("a"), (Proto::Tcp, target), &[r]);
        assert!(t.masquerade, "{what}: node a -> ClusterIP: {t:?}");

        let rs = all_ok(&c, Host::External, target, 4);
        assert!(
            rs.iter()
                .all(|r| r.client().unwrap().ip() != IpAddr::from(EXT_V4)),
            "{what}: ext -> ClusterIP must be masqueraded: {rs:?}"
        );
        assert_masqueraded_to(&c, &rs, "a", &format!("{what}: ext -> ClusterIP"));
        c.assert_trace_agrees("a", Host::External, (Proto::Tcp, target), &rs);
    }
}

/// Row 14 (iii): with `--masquerade-all`, pod → ClusterIP is masqueraded as well, to the
/// address of the client's node, whichever node the endpoint is on.
#[test]
fn masquerade_all_masquerades_pod_to_cluster_ip() {
    let lab = two_node_web("10.96.0.44");
    let pod = lab.pod("client");
    let c = Cluster::start_with(lab, &["--masquerade-all"]);
    let target = vip("10.96.0.44:80");
    wait_web_spread(&c, target, START);
    let rs = all_ok(&c, Host::Pod("client"), target, 12);
    assert!(
        rs.iter()
            .all(|r| r.client().unwrap().ip() != IpAddr::from(pod.ipv4)),
        "--masquerade-all: pod -> ClusterIP must be masqueraded: {rs:?}"
    );
    assert_masqueraded_to(&c, &rs, "a", "--masquerade-all: pod -> ClusterIP");
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &rs);
}

/// The controller's lab arguments without `--cluster-cidr` (no local-traffic detector).
fn args_without_cluster_cidr(c: &kubenft_lab::Lab) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = c.controller_default_args().into_iter();
    while let Some(a) = args.next() {
        if a == "--cluster-cidr" {
            args.next();
        } else {
            out.push(a);
        }
    }
    out
}

/// Rows 9, 14 and 15: without `--cluster-cidr` there is no local-traffic detector, so
/// ClusterIP traffic from the node and from ext keeps its source (only hairpin is still
/// masqueraded), and ETP=Local has no pod short-circuit: a pod on a node without local
/// endpoints is dropped on the LB IP and the NodePort, a pod on the endpoint's node reaches it
/// with its own address, while host-network clients are still short-circuited and masqueraded.
#[test]
fn without_cluster_cidr_cluster_ips_are_not_masqueraded_and_pods_get_local_only() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a")]).remove(0);
    let pod_a = client(&lab, "client-a", "a");
    let pod_b = client(&lab, "client-b", "b");
    let args = args_without_cluster_cidr(&lab);
    let c = Cluster::start_with_exact_args(lab, &args);
    let slice = |svc: &str| {
        Slice::for_service(svc)
            .port("http", TCP)
            .endpoint(&web, Cond::READY)
    };
    let plain = Service::cluster_ip("web", "10.96.0.45").port("http", 80, TCP, Proto::Tcp);
    let local = Service::cluster_ip("lb", "10.96.0.46")
        .service_type(ServiceType::LoadBalancer)
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30046)
        .external_traffic_policy(TrafficPolicy::Local)
        .health_check_node_port(32046)
        .lb_ingress(ip(LB_IP));
    c.write("web.yaml", &[&plain, &slice("web"), &local, &slice("lb")]);
    route_ext_via(&c, "10.96.0.45", "a");
    route_ext_via(&c, LB_IP, "a");
    let cluster_ip = vip("10.96.0.45:80");
    let lb = sock(ip(LB_IP), 80);
    c.wait_answers(Host::Node("a"), Proto::Tcp, cluster_ip, START);
    c.wait_answers(Host::External, Proto::Tcp, lb, START);
    c.wait_synced(START);

    // ClusterIP: node and ext keep their sources; hairpin is still masqueraded.
    let r = from_host(&c, "a", cluster_ip, 41045);
    assert_host_not_masqueraded(&c, "a", &r, 41045, "no detector: node a -> ClusterIP");
    let t = c.assert_trace_agrees("a", Host::Node("a"), (Proto::Tcp, cluster_ip), &[r]);
    assert!(!t.masquerade, "no detector: node a -> ClusterIP: {t:?}");
    let rs = all_ok(&c, Host::External, cluster_ip, 4);
    assert_all_from(&rs, EXT_V4.into(), "no detector: ext -> ClusterIP");
    c.assert_traces_agree("a", Host::External, (Proto::Tcp, cluster_ip), &rs);
    let rs = all_ok(&c, Host::Pod("web-1"), cluster_ip, 4);
    assert!(
        rs.iter()
            .all(|r| r.client().unwrap().ip() != IpAddr::from(web.ipv4)),
        "no detector: hairpin must still be masqueraded: {rs:?}"
    );
    c.assert_trace_agrees("a", Host::Pod("web-1"), (Proto::Tcp, cluster_ip), &rs);

    // ETP=Local: ext via the endpoint's node keeps its source.
    let rs = all_ok(&c, Host::External, lb, 4);
    assert_all_from(&rs, EXT_V4.into(), "no detector: ext -> LB IP via node a");
    c.assert_traces_agree("a", Host::External, (Proto::Tcp, lb), &rs);
    // A pod on the endpoint's node: local endpoint, own source.
    let rs = all_ok(&c, Host::Pod("client-a"), lb, 4);
    assert_all_from(&rs, pod_a.ipv4.into(), "no detector: node a pod -> LB IP");
    c.assert_trace_agrees("a", Host::Pod("client-a"), (Proto::Tcp, lb), &rs);
    // A pod on a node without local endpoints: no short-circuit, dropped.
    assert_times_out(
        &c,
        Host::Pod("client-b"),
        lb,
        "no detector: node b pod -> LB IP",
    );
    assert_times_out(
        &c,
        Host::Pod("client-b"),
        sock(c.lab.node("b").ipv4, 30046),
        "no detector: node b pod -> node b NodePort",
    );
    let pod_b_ip = IpAddr::from(pod_b.ipv4);
    assert_dropped_at(&c, "b", pod_b_ip, lb, "no detector: node b pod -> LB IP");
    let timeout = [ProbeResult::Timeout];
    c.assert_traces_agree("b", Host::Pod("client-b"), (Proto::Tcp, lb), &timeout);
    // ... but its ClusterIP works for it.
    all_ok(&c, Host::Pod("client-b"), vip("10.96.0.46:80"), 2);
    // The host of that node is still short-circuited (masqueraded).
    let r = from_host(&c, "b", lb, 41046);
    assert_host_masqueraded(&c, "b", &r, 41046, "no detector: node b host -> LB IP");
    let t = c.assert_trace_agrees("b", Host::Node("b"), (Proto::Tcp, lb), &[r]);
    assert!(t.masquerade, "no detector: node b host -> LB IP: {t:?}");
}

/// Trace on `node` says kubenft leaves `src` → `dst` alone, as the conntrack entry showed.
#[track_caller]
fn assert_trace_not_service(c: &Cluster, node: &str, src: IpAddr, dst: SocketAddr) {
    let t = c
        .agent_trace(node, src, dst, Proto::Tcp, None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.verdict, "NOT_SERVICE",
        "{src} -> {dst} on node {node}: {:#?}",
        t.raw
    );
}
