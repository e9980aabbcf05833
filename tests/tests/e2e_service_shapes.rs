//! End to end through the real controller and agents: what happens to traffic when a Service
//! changes shape — its ports and protocols, its type, its labels — and the edges of what is
//! served (NodePort addresses, Service CIDR holes, large payloads, services sharing pods).
//! Behaviour numbers refer to docs/behaviours.md §5.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use kubenft_lab::manifest::{ToJson, list};
use kubenft_lab::{Cond, Host, Lab, ProbeOpts, ProbeResult, Proto, Service, Slice};

/// The IPv4 table as `nft` lists it in `node`.
fn table(c: &Cluster, node: &str) -> String {
    c.nft(node, &["list", "table", "ip", "kubenft"])
}

/// Whether `text` contains `token` as a whole address or number (not as part of a longer
/// one: `10.96.0.1` is not mentioned by `10.96.0.10`, `3003` not by `30038`).
fn mentions(text: &str, token: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '.';
    text.match_indices(token).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + token.len()..].chars().next();
        !before.is_some_and(part) && !after.is_some_and(part)
    })
}

/// Asserts that no node's table mentions any of `tokens` (addresses, ports).
#[track_caller]
fn assert_unmentioned(c: &Cluster, tokens: &[&str], what: &str) {
    for n in c.lab.nodes() {
        let t = table(c, &n.name);
        for tok in tokens {
            assert!(
                !mentions(&t, tok),
                "{what}: node {}'s table still mentions {tok}:\n{t}",
                n.name
            );
        }
    }
}

/// Asserts every result answered with the payload echoed intact.
#[track_caller]
fn assert_echoed(rs: &[ProbeResult], what: &str) {
    let bad: Vec<String> = rs
        .iter()
        .filter(|r| {
            !matches!(
                r,
                ProbeResult::Ok {
                    echo_ok: Some(true),
                    ..
                }
            )
        })
        .map(|r| r.to_string())
        .collect();
    assert!(bad.is_empty(), "{what}: not echoed intact: {bad:?}");
}

/// Asserts two probes both get no answer (a drop: every attempt times out), and the Trace of
/// the node they enter says DROP.
#[track_caller]
fn assert_dropped(c: &Cluster, from: Host<'_>, proto: Proto, target: SocketAddr, what: &str) {
    let rs = c.probe(from, proto, target, &ProbeOpts::count(2).timeout(DROP_WAIT));
    assert_eq!(
        rs,
        vec![ProbeResult::Timeout; 2],
        "{what}: {proto} {target} from {from:?} must be dropped"
    );
    c.assert_trace_agrees(&c.entry_node(from), from, (proto, target), &rs);
}

/// Asserts two probes both fail (no server answers), whatever the failure looks like.
#[track_caller]
fn assert_unanswered(c: &Cluster, from: Host<'_>, proto: Proto, target: SocketAddr, what: &str) {
    let rs = c.probe(from, proto, target, &ProbeOpts::count(2).timeout(DROP_WAIT));
    assert!(
        rs.iter().all(|r| !r.is_ok()),
        "{what}: {proto} {target} from {from:?} answered: {rs:?}"
    );
}

/// Asserts `gone` stops answering within 2 s and stays unanswered, while `kept` is still
/// served by both backends (12 connections or datagrams, every one answered), as the Trace
/// of the node they enter says.
#[track_caller]
fn assert_gone_while_kept(
    c: &Cluster,
    from: Host<'_>,
    gone: (Proto, SocketAddr, &str),
    kept: (Proto, SocketAddr, &str),
) {
    let (proto, target, what) = gone;
    c.wait_probe(what, from, proto, target, CONVERGE, |r| !r.is_ok());
    assert_unanswered(c, from, proto, target, what);
    let (proto, target, what) = kept;
    let rs = c.probe(from, proto, target, &ProbeOpts::count(12));
    let t = assert_all_ok(&rs, what);
    assert_eq!(t.len(), 2, "{what}: both backends still serve: {t:?}");
    c.assert_trace_agrees(&c.entry_node(from), from, (proto, target), &rs);
}

/// §5.5: one Service with TCP/80 and UDP/80 (to different target ports). Both answer;
/// removing the UDP port leaves TCP fully working while UDP stops answering within 2 s;
/// then the reverse (UDP back, TCP removed).
#[test]
fn same_port_tcp_and_udp_are_removed_independently() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let from = Host::Pod("client");
    let (tcp, udp) = (("tcp", 80, TCP, Proto::Tcp), ("udp", 80, UDP, Proto::Udp));
    let write = |ports: &[(&str, u16, u16, Proto)]| {
        let mut svc = Service::cluster_ip("dual", "10.96.5.5");
        let mut slice = Slice::for_service("dual").endpoints(&backends, Cond::READY);
        for &(name, port, target, proto) in ports {
            svc = svc.port(name, port, target, proto);
            slice = slice.port_proto(name, target, proto);
        }
        c.write("dual.yaml", &[&svc, &slice]);
    };
    let target = vip("10.96.5.5:80");

    write(&[tcp, udp]);
    c.wait_all_seen(from, Proto::Tcp, target, &["web-1", "web-2"], START);
    c.wait_all_seen(from, Proto::Udp, target, &["web-1", "web-2"], CONVERGE);

    write(&[tcp]);
    assert_gone_while_kept(
        &c,
        from,
        (Proto::Udp, target, "UDP/80 after its removal"),
        (Proto::Tcp, target, "TCP/80 after UDP/80 was removed"),
    );

    write(&[tcp, udp]);
    c.wait_answers(from, Proto::Udp, target, CONVERGE);
    write(&[udp]);
    assert_gone_while_kept(
        &c,
        from,
        (Proto::Tcp, target, "TCP/80 after its removal"),
        (Proto::Udp, target, "UDP/80 after TCP/80 was removed"),
    );
}

/// §5.6: a port added to a live Service answers within 2 s; removed, it stops answering
/// within 2 s; `port` renumbered 80 → 8081, the new number answers and the old one is dead
/// within 2 s — while the untouched port keeps working throughout.
#[test]
fn ports_added_removed_and_renumbered_take_effect_within_2s() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let from = Host::Pod("client");
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .port("alt", TCP)
        .endpoints(&backends, Cond::READY);
    let write = |ports: &[(&str, u16)]| {
        let svc = ports
            .iter()
            .fold(Service::cluster_ip("web", "10.96.6.6"), |s, &(n, p)| {
                s.port(n, p, TCP, Proto::Tcp)
            });
        c.write("web.yaml", &[&svc, &slice]);
    };
    let (p80, p81, p8081) = (
        vip("10.96.6.6:80"),
        vip("10.96.6.6:81"),
        vip("10.96.6.6:8081"),
    );

    write(&[("http", 80)]);
    c.wait_answers(from, Proto::Tcp, p80, START);
    c.wait_synced(START);

    write(&[("http", 80), ("alt", 81)]);
    c.wait_answers(from, Proto::Tcp, p81, CONVERGE);
    let rs = c.probe(from, Proto::Tcp, p81, &ProbeOpts::count(8));
    assert_all_ok(&rs, "the added port 81");

    write(&[("http", 80)]);
    assert_gone_while_kept(
        &c,
        from,
        (Proto::Tcp, p81, "port 81 after its removal"),
        (Proto::Tcp, p80, "port 80 while 81 came and went"),
    );

    write(&[("http", 8081)]);
    c.wait_answers(from, Proto::Tcp, p8081, CONVERGE);
    assert_gone_while_kept(
        &c,
        from,
        (Proto::Tcp, p80, "port 80 after the renumbering"),
        (Proto::Tcp, p8081, "the renumbered port 8081"),
    );
}

/// Service CIDRs (kube-proxy nftables' `cluster-ips-check`): on a live ClusterIP a wrong
/// port or a wrong protocol is rejected — refused at once, TCP and UDP — while an address
/// inside `--service-cidr` that no Service holds is dropped (times out). Each rejection is
/// probed from its own client, as the kernel rate-limits the ICMP errors sent to one host.
#[test]
fn service_cidr_holes_are_dropped_and_wrong_ports_on_live_clusterips_rejected() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    for (i, node) in ["a", "b", "a", "b", "a"].iter().enumerate() {
        client(&lab, &format!("client-{i}"), node);
    }
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.7.7").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&backends, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    c.wait_answers(
        Host::Pod("client-0"),
        Proto::Tcp,
        vip("10.96.7.7:80"),
        START,
    );
    c.wait_synced(START);

    // Wrong port (TCP, UDP), wrong protocol, from pods on both nodes and from a node.
    for (row, from, proto, target) in [
        (
            "wrong TCP port",
            Host::Pod("client-0"),
            Proto::Tcp,
            "10.96.7.7:81",
        ),
        (
            "wrong TCP port, other node",
            Host::Pod("client-1"),
            Proto::Tcp,
            "10.96.7.7:81",
        ),
        (
            "wrong protocol",
            Host::Pod("client-2"),
            Proto::Udp,
            "10.96.7.7:80",
        ),
        (
            "wrong UDP port",
            Host::Pod("client-3"),
            Proto::Udp,
            "10.96.7.7:53",
        ),
        (
            "wrong port from a node",
            Host::Node("b"),
            Proto::Tcp,
            "10.96.7.7:8080",
        ),
    ] {
        assert_refused_fast(&c, from, proto, vip(target), row);
        let rs = [ProbeResult::Refused];
        c.assert_trace_agrees(&c.entry_node(from), from, (proto, vip(target)), &rs);
    }
    // Unallocated addresses of the Service CIDR, next to the live one and far from it.
    for target in [vip("10.96.7.8:80"), vip("10.96.200.1:80")] {
        assert_dropped(&c, Host::Pod("client-4"), Proto::Tcp, target, "unallocated");
        assert_dropped(&c, Host::Pod("client-4"), Proto::Udp, target, "unallocated");
    }
    assert_dropped(
        &c,
        Host::Node("a"),
        Proto::Tcp,
        vip("10.96.7.8:80"),
        "unallocated, from a node",
    );
    // The live port is unaffected.
    let (from, live) = (Host::Pod("client-4"), vip("10.96.7.7:80"));
    let rs = c.probe(from, Proto::Tcp, live, &ProbeOpts::count(6));
    assert_all_ok(&rs, "the live port");
    c.assert_traces_agree("a", from, (Proto::Tcp, live), &rs);
}

// ---------------------------------------------------------------------------------------
// §5.9 nodePortAddresses

const NP9: u16 = 30009;

/// Gives `node` a second IPv4 address, 192.168.60.1x, on a veth pair whose both ends stay
/// in the node (a link of its own, as a second NIC would be), and routes it from ext via
/// the node's primary address. A squatter echo server listens on that address only, on the
/// NodePort: it answers whatever the proxy leaves untouched there, so "not DNATed" is seen
/// as the squatter answering, and DNAT as a pod answering. Returns the address.
fn add_secondary_address(lab: &Lab, node: &str) -> Ipv4Addr {
    let n = lab.node(node);
    let secondary = Ipv4Addr::new(192, 168, 60, 10 + n.index);
    let cidr = format!("{secondary}/24");
    let primary = n.ipv4.to_string();
    let host = Host::Node(node);
    for argv in [
        &[
            "ip", "link", "add", "sec0", "type", "veth", "peer", "name", "sec1",
        ][..],
        &["ip", "addr", "add", &cidr, "dev", "sec0"],
        &["ip", "link", "set", "sec0", "up"],
        &["ip", "link", "set", "sec1", "up"],
    ] {
        lab.exec_ok(host, argv)
            .unwrap_or_else(|e| panic!("{argv:?} on node {node}: {e}"));
    }
    let route = format!("{secondary}/32");
    lab.exec_ok(
        Host::External,
        &["ip", "route", "add", &route, "via", &primary],
    )
    .unwrap();
    let echo = lab.binary("kubenft-echo").unwrap();
    let squatter = lab
        .spawn(
            &format!("squatter-{node}"),
            host,
            &[
                echo.to_str().unwrap(),
                "serve",
                "--name",
                "squatter",
                "--tcp",
                &NP9.to_string(),
                "--bind",
                &secondary.to_string(),
            ],
        )
        .unwrap();
    squatter
        .wait_for_stdout("READY", Duration::from_secs(5))
        .unwrap();
    secondary
}

/// A NodePort Service whose only endpoint (`web-1`) is on node b.
fn nodeport_web(c: &Cluster, web: &kubenft_lab::Pod) {
    let svc = Service::cluster_ip("web", "10.96.9.9")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(NP9);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoint(web, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
}

/// Asserts every probe from `from` to `target` is answered by `server`; returns the results.
#[track_caller]
fn assert_served_by(
    c: &Cluster,
    from: Host<'_>,
    target: SocketAddr,
    server: &str,
    what: &str,
) -> Vec<ProbeResult> {
    let rs = c.probe(from, Proto::Tcp, target, &ProbeOpts::count(4));
    let t = assert_all_ok(&rs, &format!("{what}: {target} from {from:?}"));
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        vec![server],
        "{what}: {target} from {from:?} must be served by {server}: {t:?}"
    );
    rs
}

/// Where a §5.9 case connects to, on the NodePort.
#[derive(Debug, Clone, Copy)]
enum At {
    /// Node a's InternalIP.
    A,
    /// Node b's InternalIP.
    B,
    /// Node a's second address ([`add_secondary_address`]).
    Secondary,
    /// 127.0.0.`n` in node a.
    Loopback(u8),
}

/// Who answers a §5.9 case.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// The Service's endpoint (DNATed).
    Web,
    /// The squatter on the secondary address (left alone).
    Squatter,
    /// Nobody listens there and the proxy left it alone.
    Refused,
}

/// One `--node-port-addresses` value and what it serves.
struct NodePortAddresses {
    row: &'static str,
    args: &'static [&'static str],
    /// The address whose DNAT the row waits for before its cases.
    ready_at: At,
    /// (from, to, who answers).
    cases: &'static [(Host<'static>, At, Answer)],
    /// node a's `nodeport-ips` holds its InternalIP and not its secondary address.
    internal_ip_only: bool,
}

const NODE_PORT_ADDRESSES: [NodePortAddresses; 3] = [
    // The default, `primary`: the NodePort is served on the node's InternalIP only. Its
    // second address (another link) is left alone — the squatter listening there answers,
    // from ext (routed via the node) and from the node itself — and 127.0.0.1:nodePort is
    // not forwarded either (refused: nothing listens there), as in kube-proxy's nftables
    // mode, which does not support localhost NodePorts.
    NodePortAddresses {
        row: "primary (default)",
        args: &[],
        ready_at: At::A,
        cases: &[
            (Host::External, At::A, Answer::Web),
            (Host::Node("a"), At::A, Answer::Web),
            (Host::External, At::Secondary, Answer::Squatter),
            (Host::Node("a"), At::Secondary, Answer::Squatter),
            (Host::Node("a"), At::Loopback(1), Answer::Refused),
        ],
        internal_ip_only: true,
    },
    // `all`: the NodePort is served on every address of the node — the secondary address
    // too (the squatter there is bypassed), from ext and from the node itself — but still
    // not on 127.0.0.1 (refused: localhost NodePorts are unsupported).
    NodePortAddresses {
        row: "all",
        args: &["--node-port-addresses", "all"],
        ready_at: At::A,
        cases: &[
            (Host::External, At::A, Answer::Web),
            (Host::External, At::B, Answer::Web),
            (Host::External, At::Secondary, Answer::Web),
            (Host::Node("a"), At::A, Answer::Web),
            (Host::Node("a"), At::Secondary, Answer::Web),
            (Host::Node("a"), At::Loopback(1), Answer::Refused),
            (Host::Node("a"), At::Loopback(2), Answer::Refused),
        ],
        internal_ip_only: false,
    },
    // `192.168.60.0/24`: the NodePort is served on the node addresses inside the range only
    // (as the agent reports them): node a's secondary address is DNATed (the squatter there
    // is bypassed) while its InternalIP, outside the range, is left alone (refused: nothing
    // listens there), and so is node b, which has no address in the range.
    NodePortAddresses {
        row: "192.168.60.0/24",
        args: &["--node-port-addresses", "192.168.60.0/24"],
        ready_at: At::Secondary,
        cases: &[
            (Host::External, At::Secondary, Answer::Web),
            (Host::Node("a"), At::Secondary, Answer::Web),
            (Host::External, At::A, Answer::Refused),
            (Host::Node("a"), At::A, Answer::Refused),
            (Host::External, At::B, Answer::Refused),
        ],
        internal_ip_only: false,
    },
];

/// §5.9 ([`NODE_PORT_ADDRESSES`]), each value in its own lab: a NodePort whose only endpoint
/// is on node b, node a with a second address where a squatter listens. Every case names its
/// row.
#[test]
fn nodeport_addresses_serve_exactly_the_addresses_they_select() {
    for row in &NODE_PORT_ADDRESSES {
        let lab = Cluster::lab(&["a", "b"]);
        let web = pods(&lab, &[("web-1", "b")]).remove(0);
        let secondary = add_secondary_address(&lab, "a");
        let c = Cluster::start_with(lab, row.args);
        nodeport_web(&c, &web);
        let (a, b) = (c.lab.node("a").ipv4, c.lab.node("b").ipv4);
        let at = |to: At| match to {
            At::A => sock(a, NP9),
            At::B => sock(b, NP9),
            At::Secondary => sock(secondary, NP9),
            At::Loopback(n) => sock(Ipv4Addr::new(127, 0, 0, n), NP9),
        };
        c.wait_probe(
            &format!("{}: {:?} DNATed", row.row, row.ready_at),
            Host::External,
            Proto::Tcp,
            at(row.ready_at),
            START,
            |r| r.server() == Some("web-1"),
        );
        c.wait_synced(START);
        for &(from, to, answer) in row.cases {
            let (target, what) = (at(to), format!("{}: {to:?}", row.row));
            // Trace asks the node the connection enters, with the source it really has.
            let node = if matches!(to, At::B) { "b" } else { "a" };
            let src = match (from, to) {
                (Host::Node(_), At::Secondary) => IpAddr::from(secondary),
                (Host::Node(_), At::Loopback(_)) => IpAddr::from(Ipv4Addr::LOCALHOST),
                _ => c.source_of(from, target),
            };
            let flow = (Proto::Tcp, target);
            match answer {
                Answer::Web => {
                    let rs = assert_served_by(&c, from, target, "web-1", &what);
                    c.assert_trace_agrees_from(node, (from, src), flow, &rs);
                }
                Answer::Squatter => {
                    let rs = assert_served_by(&c, from, target, "squatter", &what);
                    c.assert_trace_leaves_alone(node, (from, src), flow, &rs);
                }
                Answer::Refused => {
                    let r = c.probe1(from, Proto::Tcp, target, DROP_WAIT);
                    let left_alone = "must be left alone (not forwarded)";
                    assert_eq!(
                        r,
                        ProbeResult::Refused,
                        "{what}: {target} from {from:?} {left_alone}"
                    );
                    c.assert_trace_leaves_alone(node, (from, src), flow, &[r]);
                }
            }
        }
        if row.internal_ip_only {
            let t = table(&c, "a");
            assert!(
                mentions(&t, &a.to_string()) && !mentions(&t, &secondary.to_string()),
                "{}: nodeport-ips must hold the InternalIP only:\n{t}",
                row.row
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// §5.38 type transitions

const LB38: &str = "203.0.113.38";

/// §5.38: ClusterIP → NodePort → LoadBalancer → ClusterIP → ExternalName. Each form is
/// reachable where it should be (ClusterIP from a pod; NodePort from ext on both nodes; the
/// LB IP from ext routed via node a); going back to ClusterIP kills the old nodePort and LB
/// IP within 2 s and leaves no table entry mentioning them on any node; ExternalName takes
/// the ClusterIP out of service (an unallocated Service address: dropped) and no entry
/// mentions it any more.
#[test]
fn type_transitions_serve_each_form_and_leave_no_entries_behind() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let (a, b) = (c.lab.node("a").ipv4, c.lab.node("b").ipv4);
    c.lab
        .exec_ok(
            Host::External,
            &[
                "ip",
                "route",
                "add",
                &format!("{LB38}/32"),
                "via",
                &a.to_string(),
            ],
        )
        .unwrap();
    let slice = Slice::for_service("shape")
        .port("http", TCP)
        .endpoints(&web, Cond::READY);
    let cluster_ip =
        || Service::cluster_ip("shape", "10.96.38.38").port("http", 80, TCP, Proto::Tcp);
    let node_port = || cluster_ip().node_port(30038);
    let load_balancer = || node_port().lb_ingress(LB38.parse::<IpAddr>().unwrap());
    let cip = vip("10.96.38.38:80");
    let (np_a, np_b, lb) = (sock(a, 30038), sock(b, 30038), vip(&format!("{LB38}:80")));
    let pod = Host::Pod("client");

    c.write("shape.yaml", &[&cluster_ip(), &slice]);
    c.wait_answers(pod, Proto::Tcp, cip, START);
    c.wait_synced(START);
    assert_unmentioned(&c, &["30038", LB38], "type ClusterIP");

    // NodePort, first on 30037, then renumbered to 30038: the old number dies.
    let first = sock(a, 30037);
    c.write("shape.yaml", &[&cluster_ip().node_port(30037), &slice]);
    c.wait_answers(Host::External, Proto::Tcp, first, CONVERGE);
    c.write("shape.yaml", &[&node_port(), &slice]);
    c.wait_answers(Host::External, Proto::Tcp, np_a, CONVERGE);
    c.wait_answers(Host::External, Proto::Tcp, np_b, CONVERGE);
    c.wait_probe(
        "renumbered nodePort 30037 dead",
        Host::External,
        Proto::Tcp,
        first,
        CONVERGE,
        |r| !r.is_ok(),
    );
    assert_all_ok(
        &c.probe(pod, Proto::Tcp, cip, &ProbeOpts::count(4)),
        "ClusterIP of the NodePort Service",
    );

    c.write("shape.yaml", &[&load_balancer(), &slice]);
    c.wait_answers(Host::External, Proto::Tcp, lb, CONVERGE);
    for (node, from, target) in [
        ("a", Host::External, np_a),
        ("b", Host::External, np_b),
        ("a", pod, cip),
        ("a", Host::External, lb),
    ] {
        let rs = c.probe(from, Proto::Tcp, target, &ProbeOpts::count(4));
        assert_all_ok(&rs, &format!("{target} of the LoadBalancer Service"));
        c.assert_traces_agree(node, from, (Proto::Tcp, target), &rs);
    }
    c.wait_synced(CONVERGE);
    for n in ["a", "b"] {
        let t = table(&c, n);
        assert!(
            mentions(&t, "30038") && mentions(&t, LB38),
            "node {n} should hold the NodePort and the LB IP:\n{t}"
        );
    }

    c.write("shape.yaml", &[&cluster_ip(), &slice]);
    for target in [np_a, np_b, lb] {
        c.wait_probe(
            "NodePort and LB IP gone",
            Host::External,
            Proto::Tcp,
            target,
            CONVERGE,
            |r| !r.is_ok(),
        );
    }
    c.wait_synced(CONVERGE);
    for target in [np_a, np_b, lb] {
        assert_unanswered(&c, Host::External, Proto::Tcp, target, "back to ClusterIP");
    }
    assert_all_ok(
        &c.probe(pod, Proto::Tcp, cip, &ProbeOpts::count(4)),
        "ClusterIP after going back to ClusterIP",
    );
    assert_unmentioned(&c, &["30037", "30038", LB38], "back to type ClusterIP");
    assert!(mentions(&table(&c, "a"), "10.96.38.38"));

    let external_name =
        Service::external_name("shape", "web.example.com").port("http", 80, TCP, Proto::Tcp);
    c.write("shape.yaml", &[&external_name, &slice]);
    c.wait_probe("ClusterIP released", pod, Proto::Tcp, cip, CONVERGE, |r| {
        *r == ProbeResult::Timeout
    });
    c.wait_synced(CONVERGE);
    assert_dropped(&c, pod, Proto::Tcp, cip, "the ClusterIP after ExternalName");
    assert_unmentioned(&c, &["10.96.38.38", "30038", LB38], "type ExternalName");
}

// ---------------------------------------------------------------------------------------
// §5.39 ignored services

/// §5.39: Services labelled `service.kubernetes.io/service-proxy-name: other` or
/// `service.kubernetes.io/headless` are not ours: their ClusterIPs are dropped like any
/// unallocated Service address and their NodePorts are not served, and no node programs
/// anything for them; removing the label makes each reachable within 2 s. A headless
/// (`clusterIP: None`) and an ExternalName Service, both with an EndpointSlice naming pod
/// `hidden` (which no proxied Service uses), program nothing: no agent holds a resource for
/// them and no table mentions `hidden`'s address.
#[test]
fn ignored_services_stay_unprogrammed_until_their_label_is_removed() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    let hidden = pods(&lab, &[("hidden", "b")]).remove(0);
    client(&lab, "client", "a");
    let slice = |svc: &str| {
        Slice::for_service(svc)
            .port("http", TCP)
            .endpoints(&backends, Cond::READY)
    };
    let labelled = |name: &str, ip: &str, np: u16, label: Option<(&str, &str)>| {
        let s = Service::cluster_ip(name, ip)
            .port("http", 80, TCP, Proto::Tcp)
            .node_port(np);
        match label {
            Some((k, v)) => s.label(k, v),
            None => s,
        }
    };
    let proxy_name = ("service.kubernetes.io/service-proxy-name", "other");
    let headless_label = ("service.kubernetes.io/headless", "");
    let other = |l| labelled("other", "10.96.39.11", 30392, l);
    let marked = |l| labelled("marked", "10.96.39.12", 30393, l);
    let web = labelled("web", "10.96.39.10", 30391, None);
    let headless = Service::headless("none").port("http", 80, TCP, Proto::Tcp);
    let ext_name =
        Service::external_name("extname", "web.example.com").port("http", 80, TCP, Proto::Tcp);
    let hidden_slice = |svc: &str| {
        Slice::for_service(svc)
            .port("http", TCP)
            .endpoint(&hidden, Cond::READY)
    };
    let write = |lab: &Lab, file: &str, objs: &[&dyn ToJson]| {
        lab.write_manifest(file, &list(objs)).unwrap();
    };
    write(&lab, "web.yaml", &[&web, &slice("web")]);
    write(
        &lab,
        "other.yaml",
        &[&other(Some(proxy_name)), &slice("other")],
    );
    write(
        &lab,
        "marked.yaml",
        &[&marked(Some(headless_label)), &slice("marked")],
    );
    write(&lab, "none.yaml", &[&headless, &hidden_slice("none")]);
    write(&lab, "extname.yaml", &[&ext_name, &hidden_slice("extname")]);
    let c = Cluster::start(lab);
    let pod = Host::Pod("client");
    let a = c.lab.node("a").ipv4;
    c.wait_answers(pod, Proto::Tcp, vip("10.96.39.10:80"), START);
    c.wait_answers(Host::External, Proto::Tcp, sock(a, 30391), START);
    c.wait_synced(START);

    for (cip, np) in [("10.96.39.11:80", 30392), ("10.96.39.12:80", 30393)] {
        assert_dropped(
            &c,
            pod,
            Proto::Tcp,
            vip(cip),
            "labelled Service's ClusterIP",
        );
        assert_unanswered(
            &c,
            Host::External,
            Proto::Tcp,
            sock(a, np),
            "labelled Service's NodePort",
        );
    }
    let hidden_ip = hidden.ipv4.to_string();
    for p in &backends {
        let ip = p.ipv4.to_string();
        assert!(
            mentions(&table(&c, "a"), &ip),
            "the proxied Service's endpoint {ip} should be in node a's table"
        );
    }
    assert_unmentioned(
        &c,
        &["10.96.39.11", "10.96.39.12", "30392", "30393", &hidden_ip],
        "ignored Services",
    );
    for n in ["a", "b"] {
        let applied = c.agent_call(n, "GetApplied").unwrap();
        let names: Vec<&str> = applied["resources"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["name"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            names.iter().any(|r| r.starts_with("default/web/")),
            "node {n} lacks the proxied Service: {names:?}"
        );
        for ignored in ["other", "marked", "none", "extname"] {
            let prefix = format!("default/{ignored}/");
            assert!(
                !names.iter().any(|r| r.starts_with(&prefix)),
                "node {n} holds a resource of ignored Service {ignored}: {names:?}"
            );
        }
    }

    // Unlabelled, each becomes an ordinary Service.
    c.write("other.yaml", &[&other(None), &slice("other")]);
    c.wait_answers(pod, Proto::Tcp, vip("10.96.39.11:80"), CONVERGE);
    c.wait_answers(Host::External, Proto::Tcp, sock(a, 30392), CONVERGE);
    c.write("marked.yaml", &[&marked(None), &slice("marked")]);
    c.wait_answers(pod, Proto::Tcp, vip("10.96.39.12:80"), CONVERGE);
    c.wait_answers(Host::External, Proto::Tcp, sock(a, 30393), CONVERGE);
    c.wait_synced(CONVERGE);
    for (from, target) in [
        (pod, vip("10.96.39.11:80")),
        (Host::External, sock(a, 30393)),
    ] {
        let rs = c.probe(from, Proto::Tcp, target, &ProbeOpts::count(4));
        assert_all_ok(&rs, &format!("{target} once unlabelled"));
        c.assert_trace_agrees("a", from, (Proto::Tcp, target), &rs);
    }

    // Labelled again, a live Service is given up within 2 s.
    c.write("other.yaml", &[&other(Some(proxy_name)), &slice("other")]);
    c.wait_probe(
        "relabelled Service dropped",
        pod,
        Proto::Tcp,
        vip("10.96.39.11:80"),
        CONVERGE,
        |r| *r == ProbeResult::Timeout,
    );
    c.wait_synced(CONVERGE);
    assert_unmentioned(&c, &["10.96.39.11", "30392"], "relabelled Service");
}

// ---------------------------------------------------------------------------------------
// §5.40 isolation

/// §5.40: two Services select the same two pods. Deleting one (Service and slice) takes
/// only it out of service (its ClusterIP dropped, its NodePort unanswered); the other keeps
/// working in full: its ClusterIP reaches both pods, its NodePort answers on both nodes,
/// and each pod reaches itself through it (the hairpin entries the two shared survive).
#[test]
fn deleting_one_of_two_services_sharing_pods_leaves_the_other_intact() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let both = |name: &str, ip: &str, np: u16| {
        let svc = Service::cluster_ip(name, ip)
            .port("http", 80, TCP, Proto::Tcp)
            .node_port(np);
        let slice = Slice::for_service(name)
            .port("http", TCP)
            .endpoints(&backends, Cond::READY);
        (svc, slice)
    };
    let (svc1, slice1) = both("one", "10.96.40.1", 30401);
    let (svc2, slice2) = both("two", "10.96.40.2", 30402);
    c.write("one.yaml", &[&svc1, &slice1]);
    c.write("two.yaml", &[&svc2, &slice2]);
    let pod = Host::Pod("client");
    let (a, b) = (c.lab.node("a").ipv4, c.lab.node("b").ipv4);
    let servers = ["web-1", "web-2"];
    for target in [vip("10.96.40.1:80"), vip("10.96.40.2:80")] {
        c.wait_all_seen(pod, Proto::Tcp, target, &servers, START);
    }
    for target in [
        sock(a, 30401),
        sock(b, 30401),
        sock(a, 30402),
        sock(b, 30402),
    ] {
        c.wait_answers(Host::External, Proto::Tcp, target, START);
    }

    c.lab.remove_manifest("one.yaml").unwrap();
    c.wait_probe(
        "deleted Service's ClusterIP dropped",
        pod,
        Proto::Tcp,
        vip("10.96.40.1:80"),
        CONVERGE,
        |r| *r == ProbeResult::Timeout,
    );
    for target in [sock(a, 30401), sock(b, 30401)] {
        c.wait_probe(
            "deleted Service's NodePort gone",
            Host::External,
            Proto::Tcp,
            target,
            CONVERGE,
            |r| !r.is_ok(),
        );
    }
    c.wait_synced(CONVERGE);
    assert_unmentioned(&c, &["10.96.40.1", "30401"], "the deleted Service");
    let deleted = (Proto::Tcp, vip("10.96.40.1:80"));
    c.assert_traces_agree("a", pod, deleted, &[ProbeResult::Timeout]);

    let surviving = vip("10.96.40.2:80");
    let rs = c.probe(pod, Proto::Tcp, surviving, &ProbeOpts::count(16));
    let t = assert_all_ok(&rs, "the surviving Service's ClusterIP");
    assert_eq!(t.len(), 2, "both pods still serve it: {t:?}");
    c.assert_traces_agree("a", pod, (Proto::Tcp, surviving), &rs);
    for (node, target) in [("a", sock(a, 30402)), ("b", sock(b, 30402))] {
        let rs = c.probe(Host::External, Proto::Tcp, target, &ProbeOpts::count(12));
        let t = assert_all_ok(&rs, &format!("the surviving Service's NodePort {target}"));
        assert_eq!(t.len(), 2, "{target}: both pods still serve it: {t:?}");
        c.assert_trace_agrees(node, Host::External, (Proto::Tcp, target), &rs);
    }
    for p in servers {
        let rs = c.probe(
            Host::Pod(p),
            Proto::Tcp,
            vip("10.96.40.2:80"),
            &ProbeOpts::count(12),
        );
        let t = assert_all_ok(&rs, &format!("{p} through the surviving Service"));
        assert!(
            t.contains_key(p),
            "{p} never reached itself (hairpin): {t:?}"
        );
        let node = c.entry_node(Host::Pod(p));
        c.assert_trace_agrees(&node, Host::Pod(p), (Proto::Tcp, surviving), &rs);
    }
}

// ---------------------------------------------------------------------------------------
// §5.41 large payloads

/// §5.41: a 2000-byte UDP datagram (fragmented on the 1500-byte links, both ways) and
/// 2000-byte and 1 MiB TCP payloads go through the ClusterIP (pod on node a → pod on node
/// b) and the NodePort (ext → node a → pod on node b, and ext → node b) and come back
/// intact. Node b's route into the pod is limited to an MTU of 1400 while every link is
/// 1500, so the clients' full-size TCP segments are refused there with ICMP "fragmentation
/// needed", which must find its way back through the proxy's NAT (path MTU discovery) for
/// the 1 MiB transfers to complete; the UDP fragments are re-fragmented there.
#[test]
fn large_payloads_are_echoed_intact_through_clusterip_and_nodeport() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]);
    let route = lab
        .exec_ok(
            Host::Node("b"),
            &["ip", "route", "show", &format!("{}/32", web[0].ipv4)],
        )
        .unwrap();
    let mut argv = vec!["ip", "route", "replace"];
    argv.extend(route.split_whitespace());
    argv.extend(["mtu", "lock", "1400"]);
    lab.exec_ok(Host::Node("b"), &argv).unwrap();
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("big", "10.96.41.41")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30041)
        .port("dns", 53, UDP, Proto::Udp)
        .node_port(30042);
    let slice = Slice::for_service("big")
        .port("http", TCP)
        .port_proto("dns", UDP, Proto::Udp)
        .endpoints(&web, Cond::READY);
    c.write("big.yaml", &[&svc, &slice]);
    let (a, b) = (c.lab.node("a").ipv4, c.lab.node("b").ipv4);
    let pod = Host::Pod("client");
    c.wait_answers(pod, Proto::Tcp, vip("10.96.41.41:80"), START);
    c.wait_answers(Host::External, Proto::Udp, sock(a, 30042), START);
    c.wait_synced(START);

    let timeout = Duration::from_secs(2);
    let paths = [
        ("a", pod, 80, 53, IpAddr::from([10, 96, 41, 41])),
        ("a", Host::External, 30041, 30042, IpAddr::from(a)),
        ("b", Host::External, 30041, 30042, IpAddr::from(b)),
    ];
    for (node, from, tcp, udp, ip) in paths {
        for (proto, port, bytes, count) in [
            (Proto::Udp, udp, 2000, 4),
            (Proto::Tcp, tcp, 2000, 4),
            (Proto::Tcp, tcp, 1 << 20, 3),
        ] {
            let target = sock(ip, port);
            let rs = c.probe(
                from,
                proto,
                target,
                &ProbeOpts::count(count).payload(bytes).timeout(timeout),
            );
            assert_echoed(
                &rs,
                &format!("{bytes} bytes {proto} {target} from {from:?}"),
            );
            c.assert_trace_agrees(node, from, (proto, target), &rs);
        }
        // The "fragmentation needed" reached the client translated back to the address it
        // used (the ClusterIP, a node IP), so it learnt the path MTU for that address.
        let learnt = c
            .lab
            .exec_ok(from, &["ip", "route", "get", &ip.to_string()])
            .unwrap();
        assert!(
            learnt.contains("mtu 1400"),
            "{from:?} did not learn the path MTU to {ip}: {learnt}"
        );
    }
}
