//! End to end through the real controller and agents: each `--detect-local-mode` with real
//! traffic, with kube-proxy's meanings for ClusterIP masquerading and the externalTrafficPolicy
//! Local short-circuit.
//!
//! In every mode, on node a: a local pod's connections to a ClusterIP keep their source (IPv4
//! and IPv6), the node's own and ext's are masqueraded; a local pod reaching an
//! externalTrafficPolicy Local Service on its load-balancer IP or external IP is sent to every
//! endpoint, the remote one included, with its own source, while ext via node a gets only the
//! local endpoint, also with its own source.
//!
//! What tells the modes apart is who else counts as local. `ext` sends to a ClusterIP through
//! node a from two more addresses: one in the cluster CIDR but no node's pod range, one in node
//! a's pod range. ClusterCIDR calls both local (not masqueraded), NodeCIDR only the second, the
//! interface modes neither (they arrive on node a's fabric interface, not from a pod's). The
//! bridge mode's lab puts node a's pods behind `cbr0` (hairpin on), and node b's pods, on
//! routed veths, are then not local at all.
//!
//! "Masqueraded" for a host-network client is told from what the server saw: without SNAT its
//! own (address, source port); masquerading (`fully-random`) changes the port.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use kubenft_lab::manifest::ToJson;
use kubenft_lab::topology::{EXT_V4, NODES_MANIFEST};
use kubenft_lab::{
    Cond, Host, LabConfig, NodeConfig, ProbeOpts, Proto, Service, ServiceType, Slice, TrafficPolicy,
};

/// Dual-stack ClusterIP with web-1 (node a) and web-2 (node b).
const WEB_V4: &str = "10.96.0.60";
const WEB_V6: &str = "fd00:96::60";
/// ClusterIP with web-1 (node a) only: replies to ext's borrowed addresses return via node a.
const ONE: &str = "10.96.0.61";
/// externalTrafficPolicy Local LoadBalancer with web-1 and web-2.
const LB_CLUSTER_IP: &str = "10.96.0.62";
const LB_IP: &str = "203.0.113.62";
const EXTERNAL_IP: &str = "203.0.113.63";
const NODE_PORT: u16 = 30062;
/// An address of the cluster CIDR (10.244.0.0/16) that is no node's pod range.
const CLUSTER_ONLY_SRC: &str = "10.244.9.1";
/// An address of node a's pod range (10.244.1.0/24) that is no pod's.
const NODE_A_RANGE_SRC: &str = "10.244.1.250";

/// Who else than node a's pods each mode calls local.
struct Expect {
    /// ext from [`CLUSTER_ONLY_SRC`] is not masqueraded.
    cluster_cidr_local: bool,
    /// ext from [`NODE_A_RANGE_SRC`] is not masqueraded.
    node_cidr_local: bool,
}

/// One TCP connection from `node`'s host network with source port `sport`; it was
/// masqueraded: the server saw one of the node's addresses, not the connection's own.
#[track_caller]
fn assert_host_masqueraded(c: &Cluster, node: &str, target: SocketAddr, sport: u16, what: &str) {
    let r = c
        .probe(
            Host::Node(node),
            Proto::Tcp,
            target,
            &ProbeOpts::default().source_port(sport),
        )
        .remove(0);
    assert!(r.is_ok(), "{what}: node {node} -> {target}: {r}");
    let n = c.lab.node(node);
    let own_ip: IpAddr = if target.is_ipv6() {
        n.ipv6.into()
    } else {
        n.ipv4.into()
    };
    let seen = r.client().expect("answered");
    assert_ne!(seen, sock(own_ip, sport), "{what}: not masqueraded: {r}");
    assert_masqueraded_to(c, &[r], node, what);
}

/// The lab's Services: `web` (dual-stack), `one`, and the ETP=Local LoadBalancer `lb`.
fn write_services(c: &Cluster) {
    let (web_1, web_2) = (c.lab.pod("web-1"), c.lab.pod("web-2"));
    let both = [web_1.clone(), web_2];
    let web = Service::cluster_ips("web", &[WEB_V4, WEB_V6]).port("http", 80, TCP, Proto::Tcp);
    let web_v4 = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&both, Cond::READY);
    let web_v6 = web_v4.clone().named("web-v6").ipv6();
    let one = Service::cluster_ip("one", ONE).port("http", 80, TCP, Proto::Tcp);
    let one_slice = Slice::for_service("one")
        .port("http", TCP)
        .endpoint(&web_1, Cond::READY);
    let lb = Service::cluster_ip("lb", LB_CLUSTER_IP)
        .service_type(ServiceType::LoadBalancer)
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(NODE_PORT)
        .external_traffic_policy(TrafficPolicy::Local)
        .health_check_node_port(32062)
        .lb_ingress(ip(LB_IP))
        .external_ip(ip(EXTERNAL_IP));
    let lb_slice = Slice::for_service("lb")
        .port("http", TCP)
        .endpoints(&both, Cond::READY);
    let objects: [&dyn ToJson; 7] = [&web, &web_v4, &web_v6, &one, &one_slice, &lb, &lb_slice];
    c.write("services.yaml", &objects);
    for dest in [ONE, LB_IP, EXTERNAL_IP] {
        route_ext_via(c, dest, "a");
    }
}

/// A lab whose node a is `a` (routed, or bridged) and node b routed; pods web-1 and client on
/// a, web-2 and client-b on b.
fn lab(a: NodeConfig) -> kubenft_lab::Lab {
    let lab = Cluster::lab_with(LabConfig {
        nodes: vec![a, "b".into()],
        ..Default::default()
    });
    pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    client(&lab, "client", "a");
    client(&lab, "client-b", "b");
    lab
}

/// ext gets both borrowed addresses, and node a routes them back to it.
fn borrow_addresses(c: &Cluster) {
    for addr in [CLUSTER_ONLY_SRC, NODE_A_RANGE_SRC] {
        c.lab
            .exec_ok(
                Host::External,
                &["ip", "addr", "add", &format!("{addr}/32"), "dev", "eth0"],
            )
            .unwrap_or_else(|e| panic!("adding {addr} to ext: {e}"));
        c.lab
            .exec_ok(
                Host::Node("a"),
                &[
                    "ip",
                    "route",
                    "add",
                    &format!("{addr}/32"),
                    "via",
                    &EXT_V4.to_string(),
                ],
            )
            .unwrap_or_else(|e| panic!("route to {addr} on node a: {e}"));
    }
}

/// What every mode must do, then what tells it apart (`expect`).
fn check_mode(c: &Cluster, mode: &str, expect: Expect) {
    let client = c.lab.pod("client");
    let web_v4 = sock(ip(WEB_V4), 80);
    let web_v6 = sock(ip(WEB_V6), 80);
    let one = sock(ip(ONE), 80);
    c.wait_all_seen(
        Host::Pod("client"),
        Proto::Tcp,
        web_v4,
        &["web-1", "web-2"],
        START,
    );
    c.wait_answers(Host::External, Proto::Tcp, sock(ip(LB_IP), 80), START);
    c.wait_synced(START);

    // A local pod to a ClusterIP keeps its address, in both families, on both endpoints.
    for (target, src) in [
        (web_v4, IpAddr::from(client.ipv4)),
        (web_v6, client.ipv6.into()),
    ] {
        let rs = all_ok(c, Host::Pod("client"), target, 12);
        let t = assert_all_from(&rs, src, &format!("{mode}: local pod -> {target}"));
        eprintln!("{mode}: local pod -> {target}: {t:?}");
        c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &rs);
    }
    // The node itself and ext are masqueraded.
    assert_host_masqueraded(c, "a", one, 41061, &format!("{mode}: node a -> ClusterIP"));
    assert_host_masqueraded(
        c,
        "a",
        web_v6,
        41062,
        &format!("{mode}: node a -> IPv6 ClusterIP"),
    );
    let rs = all_ok(c, Host::External, one, 4);
    assert_masqueraded_to(c, &rs, "a", &format!("{mode}: ext -> ClusterIP via node a"));
    c.assert_trace_agrees("a", Host::External, (Proto::Tcp, one), &rs);
    // Hairpin is masqueraded whatever the detector says.
    let rs = all_ok(c, Host::Pod("web-1"), one, 4);
    assert_masqueraded_to(c, &rs, "a", &format!("{mode}: web-1 -> its own ClusterIP"));
    c.assert_trace_agrees("a", Host::Pod("web-1"), (Proto::Tcp, one), &rs);

    // externalTrafficPolicy Local: the local pod is sent to every endpoint with its own
    // address; ext via node a only to node a's, with its own address too.
    for addr in [LB_IP, EXTERNAL_IP] {
        let target = sock(ip(addr), 80);
        c.wait_all_seen(
            Host::Pod("client"),
            Proto::Tcp,
            target,
            &["web-1", "web-2"],
            CONVERGE,
        );
        let rs = all_ok(c, Host::Pod("client"), target, 8);
        assert_all_from(
            &rs,
            client.ipv4.into(),
            &format!("{mode}: local pod -> {addr}"),
        );
        c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &rs);
        let rs = all_ok(c, Host::External, target, 12);
        let t = assert_all_from(
            &rs,
            EXT_V4.into(),
            &format!("{mode}: ext -> {addr} via node a"),
        );
        assert_eq!(t.get("web-1"), Some(&12), "{mode}: ext -> {addr}: {t:?}");
        c.assert_trace_agrees("a", Host::External, (Proto::Tcp, target), &rs);
    }
    let np = sock(c.lab.node("a").ipv4, NODE_PORT);
    let rs = all_ok(c, Host::External, np, 8);
    let t = assert_all_from(
        &rs,
        EXT_V4.into(),
        &format!("{mode}: ext -> node a NodePort"),
    );
    assert_eq!(
        t.get("web-1"),
        Some(&8),
        "{mode}: ext -> node a NodePort: {t:?}"
    );
    c.assert_trace_agrees("a", Host::External, (Proto::Tcp, np), &rs);

    // Who else is local.
    borrow_addresses(c);
    for (src, local) in [
        (CLUSTER_ONLY_SRC, expect.cluster_cidr_local),
        (NODE_A_RANGE_SRC, expect.node_cidr_local),
    ] {
        route_ext_via_from(c, ONE, "a", Some(src));
        let rs = all_ok(c, Host::External, one, 4);
        let what = format!("{mode}: ext from {src} -> ClusterIP via node a");
        if local {
            assert_all_from(&rs, ip(src), &format!("{what} (local: not masqueraded)"));
        } else {
            assert_masqueraded_to(c, &rs, "a", &format!("{what} (not local: masqueraded)"));
        }
        let from = (Host::External, ip(src));
        c.assert_trace_agrees_from("a", from, (Proto::Tcp, one), &rs);
    }
}

/// One `--detect-local-mode` row: its flags, its lab, who else it calls local, and what it
/// leaves in the rules.
struct Mode {
    mode: &'static str,
    args: &'static [&'static str],
    /// Node a's pods sit behind the bridge `cbr0`.
    bridged_a: bool,
    expect: Expect,
    /// A pod on node b reaching a ClusterIP keeps its address (otherwise it is masqueraded
    /// to node b).
    b_pods_local: bool,
    /// (node, `nft` arguments, text the listing contains).
    rules: &'static [(&'static str, &'static [&'static str], &'static str)],
}

const MODES: [Mode; 4] = [
    // ClusterCIDR (the default): sources in `--cluster-cidr` are local wherever they come
    // from.
    Mode {
        mode: "ClusterCIDR",
        args: &["--detect-local-mode", "ClusterCIDR"],
        bridged_a: false,
        expect: Expect {
            cluster_cidr_local: true,
            node_cidr_local: true,
        },
        b_pods_local: true,
        rules: &[
            (
                "a",
                &["list", "chain", "ip", "kubenft", "svc-cluster"],
                "ip saddr != @local-pod-cidrs",
            ),
            (
                "a",
                &["list", "set", "ip", "kubenft", "local-pod-cidrs"],
                "10.244.0.0/16",
            ),
        ],
    },
    // NodeCIDR: only the node's own `spec.podCIDRs` are local (the lab's `--cluster-cidr`,
    // still given, is not used), in both families.
    Mode {
        mode: "NodeCIDR",
        args: &["--detect-local-mode", "NodeCIDR"],
        bridged_a: false,
        expect: Expect {
            cluster_cidr_local: false,
            node_cidr_local: true,
        },
        b_pods_local: true,
        rules: &[
            (
                "a",
                &["list", "set", "ip", "kubenft", "local-pod-cidrs"],
                "10.244.1.0/24",
            ),
            (
                "a",
                &["list", "set", "ip6", "kubenft", "local-pod-cidrs"],
                "fd00:244:1::/64",
            ),
            (
                "b",
                &["list", "set", "ip", "kubenft", "local-pod-cidrs"],
                "10.244.2.0/24",
            ),
        ],
    },
    // BridgeInterface cbr0: node a's pods sit behind `cbr0`, and only what enters through it
    // is local. Node b has no `cbr0` (its pods are on routed veths): nothing there is local,
    // so its pod's ClusterIP traffic is masqueraded, as kube-proxy would do on such a node.
    Mode {
        mode: "BridgeInterface",
        args: &[
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "cbr0",
        ],
        bridged_a: true,
        expect: Expect {
            cluster_cidr_local: false,
            node_cidr_local: false,
        },
        b_pods_local: false,
        rules: &[(
            "a",
            &["list", "chain", "ip6", "kubenft", "ext-local"],
            r#"iifname "cbr0""#,
        )],
    },
    // InterfaceNamePrefix `v`: the lab's pod veths are `v1`, `v2`, ... on the node side (as
    // Calico's are `cali…`, the AWS VPC CNI's `eni…`), so what enters through them is local.
    Mode {
        mode: "InterfaceNamePrefix",
        args: &[
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            "v",
        ],
        bridged_a: false,
        expect: Expect {
            cluster_cidr_local: false,
            node_cidr_local: false,
        },
        b_pods_local: true,
        rules: &[(
            "a",
            &["list", "chain", "ip", "kubenft", "svc-cluster"],
            r#"iifname != "v*""#,
        )],
    },
];

/// Every mode of [`MODES`], each in its own lab: what every mode must do
/// ([`check_mode`]), who else it calls local, where a pod on node b stands, and the rules
/// that say so. Every assertion names its mode.
#[test]
fn each_detect_local_mode_calls_its_own_sources_local() {
    for m in MODES {
        let a = if m.bridged_a {
            NodeConfig::new("a").pod_bridge()
        } else {
            "a".into()
        };
        let c = Cluster::start_with(lab(a), m.args);
        write_services(&c);
        check_mode(&c, m.mode, m.expect);
        let rs = all_ok(&c, Host::Pod("client-b"), sock(ip(ONE), 80), 4);
        let what = format!("{}: node b pod -> ClusterIP", m.mode);
        if m.b_pods_local {
            let src = c.lab.pod("client-b").ipv4.into();
            assert_all_from(&rs, src, &format!("{what} (local: not masqueraded)"));
        } else {
            assert_masqueraded_to(&c, &rs, "b", &format!("{what} (not local: masqueraded)"));
        }
        for (node, args, line) in m.rules {
            let listed = c.nft(node, args);
            assert!(listed.contains(line), "{}: node {node}: {listed}", m.mode);
        }
    }
}

/// NodeCIDR on a node without `spec.podCIDRs`: no detector there (nothing is local, as
/// kube-proxy's detector for no CIDR), so the node's own connections to a ClusterIP keep their
/// source. When the Node gets its podCIDRs, node a's settings change in one transaction: new
/// connections from the node are masqueraded at once, pods keep their source, and a
/// connection established before carries data after, with the source it started with.
#[test]
fn node_cidr_mode_follows_pod_cidrs_arriving_without_breaking_connections() {
    let lab = lab("a".into());
    let bare = [
        lab.node_manifest("a").pod_cidrs(&[]),
        lab.node_manifest("b"),
    ];
    let objects: Vec<&dyn ToJson> = bare.iter().map(|n| n as &dyn ToJson).collect();
    lab.write_manifest(NODES_MANIFEST, &kubenft_lab::manifest::list(&objects))
        .unwrap();
    let c = Cluster::start_with(lab, &["--detect-local-mode", "NodeCIDR"]);
    write_services(&c);
    let one = sock(ip(ONE), 80);
    let client = c.lab.pod("client");
    c.wait_answers(Host::Node("a"), Proto::Tcp, one, START);
    c.wait_synced(START);
    let own = sock(c.lab.node("a").ipv4, 41069);
    let r = c
        .probe(
            Host::Node("a"),
            Proto::Tcp,
            one,
            &ProbeOpts::default().source_port(41069),
        )
        .remove(0);
    assert_eq!(
        r.client(),
        Some(own),
        "no podCIDRs: node a -> ClusterIP keeps its source: {r}"
    );
    let s = c.nft("a", &["list", "set", "ip", "kubenft", "local-pod-cidrs"]);
    assert!(!s.contains("elements"), "node a has no podCIDRs: {s}");

    let (greeting, held) = hold_connection(&c, Host::Node("a"), one, Some(41070));
    let own_held = format!("web-1 {}:41070", c.lab.node("a").ipv4);
    assert_eq!(greeting, own_held, "the held connection kept its source");

    c.lab
        .write_manifest(NODES_MANIFEST, &c.lab.nodes_manifest())
        .unwrap();
    // Masqueraded towards a pod on the node, the source becomes the pod interface's address.
    let node_a = IpAddr::from(c.lab.node("a").ipv4);
    c.wait_probe(
        "node a -> ClusterIP masqueraded once node a has podCIDRs",
        Host::Node("a"),
        Proto::Tcp,
        one,
        CONVERGE,
        |r| r.client().is_some_and(|s| s.ip() != node_a),
    );
    c.wait_synced(START);
    assert_host_masqueraded(
        &c,
        "a",
        one,
        41071,
        "NodeCIDR after podCIDRs: node a -> ClusterIP",
    );
    let rs = all_ok(&c, Host::Pod("client"), one, 4);
    assert_all_from(
        &rs,
        client.ipv4.into(),
        "NodeCIDR after podCIDRs: local pod -> ClusterIP",
    );
    let s = c.nft("a", &["list", "set", "ip", "kubenft", "local-pod-cidrs"]);
    assert!(s.contains("10.244.1.0/24"), "{s}");

    assert_eq!(
        held.finish(),
        "echo:held-ping",
        "the connection established before the change was broken by it"
    );
}

/// Switching `--detect-local-mode` (the controllers restart with the new flag) reaches each
/// node as one change to its settings: the agent keeps its table (same kernel handle), new
/// connections follow the new mode at once, and a connection established under the old mode
/// carries data after, with the source it started with.
#[test]
fn switching_the_mode_keeps_the_table_and_established_connections() {
    let lab = lab("a".into());
    let mut c = Cluster::start_with(lab, &["--detect-local-mode", "ClusterCIDR"]);
    write_services(&c);
    let one = sock(ip(ONE), 80);
    c.wait_answers(Host::External, Proto::Tcp, one, START);
    c.wait_synced(START);
    borrow_addresses(&c);
    route_ext_via_from(&c, ONE, "a", Some(CLUSTER_ONLY_SRC));
    // ClusterCIDR: ext from the cluster CIDR is local, not masqueraded; hold one open.
    let rs = all_ok(&c, Host::External, one, 4);
    assert_all_from(
        &rs,
        ip(CLUSTER_ONLY_SRC),
        "ClusterCIDR: ext from the cluster CIDR",
    );
    let (greeting, held) = hold_connection(&c, Host::External, one, Some(41070));
    assert_eq!(greeting, format!("web-1 {CLUSTER_ONLY_SRC}:41070"));
    let handle = c.table_handle("a");

    c.controller.stop().unwrap();
    let args = [
        "--detect-local-mode",
        "InterfaceNamePrefix",
        "--pod-interface-name-prefix",
        "v",
    ];
    c.controller = c
        .lab
        .spawn_controller(&args)
        .unwrap_or_else(|e| panic!("restarting the controller: {e}"));
    c.wait_probe(
        "ext from the cluster CIDR masqueraded under InterfaceNamePrefix",
        Host::External,
        Proto::Tcp,
        one,
        START,
        |r| r.client().is_some_and(|s| s.ip() != ip(CLUSTER_ONLY_SRC)),
    );
    c.wait_synced(START);
    let rs = all_ok(&c, Host::External, one, 4);
    assert_masqueraded_to(
        &c,
        &rs,
        "a",
        "InterfaceNamePrefix: ext from the cluster CIDR",
    );
    let client = c.lab.pod("client");
    let rs = all_ok(&c, Host::Pod("client"), one, 4);
    assert_all_from(&rs, client.ipv4.into(), "InterfaceNamePrefix: local pod");
    assert_eq!(c.table_handle("a"), handle, "the table was recreated");
    assert_eq!(
        held.finish(),
        "echo:held-ping",
        "the connection established under ClusterCIDR was broken by the switch"
    );
}
