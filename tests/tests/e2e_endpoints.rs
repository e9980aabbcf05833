//! End to end through the real controller and agents: which endpoints a client reaches —
//! hairpin with several endpoints, internalTrafficPolicy Local, endpoint conditions (not
//! ready, terminating fallback, terminating and not serving), topology hints and
//! host-network endpoints.
//! Behaviour numbers refer to docs/behaviours.md §5; "row N" to the rows of
//! docs/semantics.md §1.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use kubenft_lab::topology::EXT_V4;
use kubenft_lab::{
    Cond, Host, ProbeOpts, ProbeResult, Proto, Service, ServiceType, Slice, TrafficPolicy,
    wait_until,
};

/// Waits until every node has acknowledged a rule set different from `before` (the versions
/// [`Cluster::wait_synced`] returned before a change), so the change is in every kernel.
/// Needed where the expected outcome (still answering, still dropped) is indistinguishable
/// from the change not having arrived yet.
fn wait_applied(c: &Cluster, before: &BTreeMap<String, String>, what: &str) {
    let mut last = BTreeMap::new();
    wait_until(CONVERGE, Duration::from_millis(100), || {
        last = c.list_nodes()?;
        Ok::<_, String>(before.iter().all(|(n, old)| {
            last.get(n).is_some_and(|s| {
                s["state"] == "SYNCED"
                    && s["ackedVersion"] == s["desiredVersion"]
                    && s["ackedVersion"].as_str() != Some(old.as_str())
            })
        }))
    })
    .unwrap_or_else(|e| {
        panic!("{what}: not applied on every node within {CONVERGE:?}: {e}; last: {last:#?}")
    });
}

/// `n` attempts from `from`, every one of which must time out (a drop, neither an answer nor
/// a refusal).
#[track_caller]
fn assert_dropped(c: &Cluster, from: Host<'_>, target: SocketAddr, n: u32, what: &str) {
    let rs = c.probe(
        from,
        Proto::Tcp,
        target,
        &ProbeOpts::count(n).timeout(DROP_WAIT),
    );
    assert!(
        rs.iter().all(|r| matches!(r, ProbeResult::Timeout)),
        "{what}: expected {n} timeouts (dropped), got {:?}",
        rs.iter().map(|r| r.to_string()).collect::<Vec<_>>()
    );
}

/// `n` attempts from `from`, every one answered by `server`; returns the results.
#[track_caller]
fn assert_only(
    c: &Cluster,
    from: Host<'_>,
    target: SocketAddr,
    n: u32,
    server: &str,
    what: &str,
) -> Vec<ProbeResult> {
    let rs = c.probe(from, Proto::Tcp, target, &ProbeOpts::count(n));
    let t = assert_all_ok(&rs, what);
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        vec![server],
        "{what}: only {server} may answer: {t:?}"
    );
    rs
}

/// The servers answering `n` attempts from `from` (all must succeed).
#[track_caller]
fn servers_seen(
    c: &Cluster,
    from: Host<'_>,
    target: SocketAddr,
    n: u32,
    what: &str,
) -> BTreeSet<String> {
    let rs = c.probe(from, Proto::Tcp, target, &ProbeOpts::count(n));
    assert_all_ok(&rs, what).into_keys().collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// §5.12: hairpin with several endpoints. web-1 (node a) connects to its own Service 30
/// times: every attempt succeeds, it reaches itself, the other pod on its node and the pod
/// on node b. When it lands on itself the source it sees is node a's (masquerade) address;
/// when it lands on another pod that pod sees web-1's own address (no SNAT).
#[test]
fn hairpin_with_several_endpoints_masquerades_only_the_self_hits() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a"), ("web-2", "a"), ("web-3", "b")]);
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.2.12").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&web, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let target = vip("10.96.2.12:80");
    c.wait_all_seen(
        Host::Pod("web-1"),
        Proto::Tcp,
        target,
        &["web-1", "web-2", "web-3"],
        START,
    );
    let rs = c.probe(
        Host::Pod("web-1"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(30),
    );
    let t = assert_all_ok(&rs, "web-1 -> its own Service, 30 times");
    eprintln!("hairpin spread: {t:?}");
    for p in ["web-1", "web-2", "web-3"] {
        assert!(t.contains_key(p), "{p} never answered: {t:?}");
    }
    let own = IpAddr::from(web[0].ipv4);
    let node_a = c.ipv4_addresses(Host::Node("a"));
    for r in &rs {
        let src = r.client().unwrap().ip();
        if r.server() == Some("web-1") {
            assert!(
                src != own && node_a.contains(&src),
                "landing on itself, web-1 must see a node-a address {node_a:?}, not {src}: {r}"
            );
        } else {
            assert_eq!(
                src, own,
                "another endpoint must see web-1's own address: {r}"
            );
        }
    }
    let t = c.assert_traces_agree("a", Host::Pod("web-1"), (Proto::Tcp, target), &rs);
    assert!(!t.masquerade && t.hairpin.len() == 1, "{t:?}");
}

/// §5.16: internalTrafficPolicy Local with the only endpoint on node a. A pod on node a
/// succeeds 5/5 (keeping its own address); a pod on node b is dropped 5/5 (timeouts, not
/// refusals). Host-network clients (the nodes themselves) give the same result.
#[test]
fn internal_traffic_policy_local_serves_only_clients_on_the_endpoint_node() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-a", "a")]);
    let ca = client(&lab, "client-a", "a");
    client(&lab, "client-b", "b");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.2.16")
        .port("http", 80, TCP, Proto::Tcp)
        .internal_traffic_policy(TrafficPolicy::Local);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&web, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let target = vip("10.96.2.16:80");
    c.wait_answers(Host::Pod("client-a"), Proto::Tcp, target, START);
    // Node b holds its rules, so a silence there is the policy, not a missing rule set.
    c.wait_synced(START);

    let rs = assert_only(&c, Host::Pod("client-a"), target, 5, "web-a", "pod on a");
    assert_all_from(&rs, ca.ipv4.into(), "pod on a keeps its address");
    let t = c.assert_traces_agree("a", Host::Pod("client-a"), (Proto::Tcp, target), &rs);
    assert!(t.says("internalTrafficPolicy Local"), "{t:?}");
    let rs = assert_only(
        &c,
        Host::Node("a"),
        target,
        5,
        "web-a",
        "node a (host network)",
    );
    c.assert_trace_agrees("a", Host::Node("a"), (Proto::Tcp, target), &rs);
    assert_dropped(&c, Host::Pod("client-b"), target, 5, "pod on b");
    assert_dropped(&c, Host::Node("b"), target, 5, "node b (host network)");
    let timeout = [ProbeResult::Timeout];
    c.assert_traces_agree("b", Host::Pod("client-b"), (Proto::Tcp, target), &timeout);
    c.assert_trace_agrees("b", Host::Node("b"), (Proto::Tcp, target), &timeout);
}

/// §5.20: an endpoint flipped to ready=false, serving=true, terminating=false gets no new
/// connections while another is ready, and gets them again once ready. Left alone (the
/// ready one gone), it is not usable at all: the Service has no endpoints and is refused.
#[test]
fn not_ready_endpoint_gets_no_new_traffic_while_others_are_ready() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.2.20").port("http", 80, TCP, Proto::Tcp);
    let slice = |c1: Option<Cond>, c2: Cond| {
        let s = Slice::for_service("web").port("http", TCP);
        let s = match c1 {
            Some(c1) => s.endpoint(&web[0], c1),
            None => s,
        };
        s.endpoint(&web[1], c2)
    };
    let target = vip("10.96.2.20:80");
    let from = Host::Pod("client");

    c.write("web.yaml", &[&svc, &slice(Some(Cond::READY), Cond::READY)]);
    c.wait_all_seen(from, Proto::Tcp, target, &["web-1", "web-2"], START);

    let before = c.wait_synced(START);
    c.write(
        "web.yaml",
        &[&svc, &slice(Some(Cond::READY), Cond::SERVING_NOT_READY)],
    );
    wait_applied(&c, &before, "web-2 not ready");
    let rs = assert_only(&c, from, target, 30, "web-1", "web-2 is not ready");
    c.assert_trace_agrees("a", from, (Proto::Tcp, target), &rs);

    // Ready again: it is used again (the exclusion was the condition, nothing else).
    c.write("web.yaml", &[&svc, &slice(Some(Cond::READY), Cond::READY)]);
    c.wait_all_seen(from, Proto::Tcp, target, &["web-1", "web-2"], CONVERGE);

    // Only the not-ready (serving, not terminating) endpoint left: not a fallback, refused.
    c.write("web.yaml", &[&svc, &slice(None, Cond::SERVING_NOT_READY)]);
    c.wait_probe(
        "only a not-ready endpoint: refused",
        from,
        Proto::Tcp,
        target,
        CONVERGE,
        |r| matches!(r, ProbeResult::Refused),
    );
    c.assert_trace_agrees("a", from, (Proto::Tcp, target), &[ProbeResult::Refused]);
}

/// §5.21: internal and external traffic policy Cluster, NodePort Service whose only
/// endpoint (on node b) becomes serving+terminating: the ClusterIP (from pods on both nodes)
/// and the NodePort of both nodes (from ext) still reach it, five checks over five seconds.
#[test]
fn terminating_fallback_keeps_clusterip_and_nodeports_with_cluster_policies() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-b", "b")]).remove(0);
    client(&lab, "client-a", "a");
    client(&lab, "client-b", "b");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.2.21")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30121)
        .internal_traffic_policy(TrafficPolicy::Cluster)
        .external_traffic_policy(TrafficPolicy::Cluster);
    let slice = |cond| {
        Slice::for_service("web")
            .port("http", TCP)
            .endpoint(&web, cond)
    };
    let cip = vip("10.96.2.21:80");
    let np_a = sock(c.lab.node("a").ipv4, 30121);
    let np_b = sock(c.lab.node("b").ipv4, 30121);
    c.write("web.yaml", &[&svc, &slice(Cond::READY)]);
    c.wait_answers(Host::External, Proto::Tcp, np_a, START);

    let before = c.wait_synced(START);
    c.write("web.yaml", &[&svc, &slice(Cond::TERMINATING_SERVING)]);
    wait_applied(&c, &before, "web-b terminating");
    let checks: [(Host<'_>, SocketAddr); 4] = [
        (Host::Pod("client-a"), cip),
        (Host::Pod("client-b"), cip),
        (Host::External, np_a),
        (Host::External, np_b),
    ];
    let start = Instant::now();
    for round in 0..5u32 {
        // One round per second, bounded: 5 rounds.
        let due = Duration::from_secs(round.into());
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        for (from, target) in checks {
            assert_only(
                &c,
                from,
                target,
                1,
                "web-b",
                &format!("round {round}: {from:?} -> {target} (terminating fallback)"),
            );
        }
    }
    for ((from, target), node) in checks.into_iter().zip(["a", "b", "a", "b"]) {
        let rs = assert_only(&c, from, target, 2, "web-b", "terminating fallback");
        let t = c.assert_traces_agree(node, from, (Proto::Tcp, target), &rs);
        assert!(t.says("terminating"), "{t:?}");
    }
}

/// §5.22: the only endpoint (web-a on node a) of a LoadBalancer Service with
/// internalTrafficPolicy and externalTrafficPolicy Local is terminating (still serving).
/// A pod on node a reaches the ClusterIP; a pod on node b is dropped; ext reaches node a's
/// NodePort (keeping its address) and is dropped on node b's; node a's healthCheckNodePort
/// says 503 (terminating endpoints do not count) while its traffic still flows.
#[test]
fn terminating_fallback_with_local_policies_stays_on_the_endpoint_node() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-a", "a")]).remove(0);
    client(&lab, "client-a", "a");
    client(&lab, "client-b", "b");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.2.22")
        .service_type(ServiceType::LoadBalancer)
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30122)
        .health_check_node_port(32122)
        .internal_traffic_policy(TrafficPolicy::Local)
        .external_traffic_policy(TrafficPolicy::Local);
    let slice = |cond| {
        Slice::for_service("web")
            .port("http", TCP)
            .endpoint(&web, cond)
    };
    let cip = vip("10.96.2.22:80");
    let np_a = sock(c.lab.node("a").ipv4, 30122);
    let np_b = sock(c.lab.node("b").ipv4, 30122);
    let hc_a = format!("http://{}:32122/healthz", c.lab.node("a").ipv4);
    let wait_hc = |want: u16| {
        let mut last = (0, String::new());
        wait_until(CONVERGE, POLL, || {
            last = c.http_get(Host::External, &hc_a);
            Ok::<_, std::io::Error>(last.0 == want)
        })
        .unwrap_or_else(|e| panic!("health check on a: wanted {want}, last {last:?}: {e}"));
        last.1
    };

    c.write("web.yaml", &[&svc, &slice(Cond::READY)]);
    c.wait_answers(Host::Pod("client-a"), Proto::Tcp, cip, START);
    // Give the health server its start-up cap too (first sync), then expect 200.
    wait_until(START, POLL, || {
        Ok::<_, std::io::Error>(c.http_get(Host::External, &hc_a).0 == 200)
    })
    .unwrap_or_else(|e| panic!("health check on a never said 200 with a ready endpoint: {e}"));

    let before = c.wait_synced(START);
    c.write("web.yaml", &[&svc, &slice(Cond::TERMINATING_SERVING)]);
    wait_applied(&c, &before, "web-a terminating");
    let body = wait_hc(503);
    assert!(body.contains(r#""localEndpoints":0"#), "{body}");

    assert_only(
        &c,
        Host::Pod("client-a"),
        cip,
        5,
        "web-a",
        "pod on a -> ClusterIP",
    );
    assert_dropped(&c, Host::Pod("client-b"), cip, 3, "pod on b -> ClusterIP");
    let timeout = [ProbeResult::Timeout];
    c.assert_trace_agrees("b", Host::Pod("client-b"), (Proto::Tcp, cip), &timeout);
    let rs = assert_only(
        &c,
        Host::External,
        np_a,
        5,
        "web-a",
        "ext -> node a NodePort",
    );
    assert_all_from(&rs, EXT_V4.into(), "ETP Local keeps ext's address");
    let t = c.assert_traces_agree("a", Host::External, (Proto::Tcp, np_a), &rs);
    assert!(t.says("terminating"), "{t:?}");
    assert_dropped(&c, Host::External, np_b, 3, "ext -> node b NodePort");
    c.assert_traces_agree("b", Host::External, (Proto::Tcp, np_b), &timeout);
    // Still 503 while the traffic above flowed.
    let (code, body) = c.http_get(Host::External, &hc_a);
    assert_eq!(code, 503, "{body}");
}

/// §5.23 (row 13, hasEndpoints): the only endpoint is terminating and no longer serving
/// (serving=false): within 2 s the ClusterIP and both NodePorts stop answering — refused,
/// as for a Service without endpoints, never answered by the dying pod.
#[test]
fn terminating_not_serving_endpoint_is_refused_on_clusterip_and_nodeports() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-b", "b")]).remove(0);
    client(&lab, "client-a", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.2.23")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30123);
    let slice = |cond| {
        Slice::for_service("web")
            .port("http", TCP)
            .endpoint(&web, cond)
    };
    let cip = vip("10.96.2.23:80");
    let np_a = sock(c.lab.node("a").ipv4, 30123);
    let np_b = sock(c.lab.node("b").ipv4, 30123);
    c.write("web.yaml", &[&svc, &slice(Cond::READY)]);
    c.wait_answers(Host::Pod("client-a"), Proto::Tcp, cip, START);
    c.wait_answers(Host::External, Proto::Tcp, np_a, CONVERGE);
    c.wait_answers(Host::External, Proto::Tcp, np_b, CONVERGE);

    c.write("web.yaml", &[&svc, &slice(Cond::TERMINATING)]);
    let refused = |r: &ProbeResult| matches!(r, ProbeResult::Refused);
    c.wait_probe(
        "ClusterIP refused",
        Host::Pod("client-a"),
        Proto::Tcp,
        cip,
        CONVERGE,
        refused,
    );
    c.wait_probe(
        "node a NodePort refused",
        Host::External,
        Proto::Tcp,
        np_a,
        CONVERGE,
        refused,
    );
    c.wait_probe(
        "node b NodePort refused",
        Host::External,
        Proto::Tcp,
        np_b,
        CONVERGE,
        refused,
    );
    // And it stays that way (the pod still runs and would answer if it were used).
    for (from, target) in [(Host::Pod("client-a"), cip), (Host::External, np_b)] {
        let rs = c.probe(
            from,
            Proto::Tcp,
            target,
            &ProbeOpts::count(3).timeout(DROP_WAIT),
        );
        assert_eq!(rs, vec![ProbeResult::Refused; 3], "{from:?} -> {target}");
        let node = if target == np_b { "b" } else { "a" };
        c.assert_traces_agree(node, from, (Proto::Tcp, target), &rs);
    }
}

/// Row 13, "chosen independently": web-a on node a is terminating (still serving), web-b on
/// node b is ready; NodePort Service with externalTrafficPolicy Local. Cluster-wide traffic
/// (pods on either node → ClusterIP) goes only to the ready remote web-b; ext → node a's
/// NodePort uses node a's local set, which falls back to the terminating web-a; ext → node
/// b's NodePort gets the ready local web-b.
#[test]
fn cluster_and_local_sets_fall_back_to_terminating_independently() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-a", "a"), ("web-b", "b")]);
    client(&lab, "client-a", "a");
    client(&lab, "client-b", "b");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.2.13")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30113)
        .external_traffic_policy(TrafficPolicy::Local);
    let slice = |cond_a| {
        Slice::for_service("web")
            .port("http", TCP)
            .endpoint(&web[0], cond_a)
            .endpoint(&web[1], Cond::READY)
    };
    let cip = vip("10.96.2.13:80");
    let np_a = sock(c.lab.node("a").ipv4, 30113);
    let np_b = sock(c.lab.node("b").ipv4, 30113);
    c.write("web.yaml", &[&svc, &slice(Cond::READY)]);
    c.wait_all_seen(
        Host::Pod("client-a"),
        Proto::Tcp,
        cip,
        &["web-a", "web-b"],
        START,
    );
    c.wait_answers(Host::External, Proto::Tcp, np_a, CONVERGE);

    let before = c.wait_synced(START);
    c.write("web.yaml", &[&svc, &slice(Cond::TERMINATING_SERVING)]);
    wait_applied(&c, &before, "web-a terminating");
    for from in ["client-a", "client-b"] {
        assert_only(
            &c,
            Host::Pod(from),
            cip,
            20,
            "web-b",
            &format!("{from} -> ClusterIP"),
        );
    }
    let rs = assert_only(
        &c,
        Host::External,
        np_a,
        10,
        "web-a",
        "ext -> node a NodePort",
    );
    assert_all_from(&rs, EXT_V4.into(), "ETP Local keeps ext's address");
    c.assert_traces_agree("a", Host::External, (Proto::Tcp, np_a), &rs);
    let rs = assert_only(
        &c,
        Host::External,
        np_b,
        10,
        "web-b",
        "ext -> node b NodePort",
    );
    c.assert_traces_agree("b", Host::External, (Proto::Tcp, np_b), &rs);
    let rs = assert_only(&c, Host::Pod("client-a"), cip, 10, "web-b", "ClusterIP");
    c.assert_trace_agrees("a", Host::Pod("client-a"), (Proto::Tcp, cip), &rs);
}

/// Row 18, topology hints (nodes labelled zone-a and zone-b). With zone hints on every
/// ready endpoint, a pod on node a reaches only the endpoints hinted for zone-a (web-a1, and
/// web-b2 which runs in zone-b but is hinted for zone-a) and a pod on node b only web-b1.
/// All or nothing: once one ready endpoint lacks hints, nobody filters. Node hints
/// (forNodes) on every endpoint win over zone hints.
#[test]
fn topology_hints_filter_cluster_endpoints_all_or_nothing() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-a1", "a"), ("web-b1", "b"), ("web-b2", "b")]);
    client(&lab, "client-a", "a");
    client(&lab, "client-b", "b");
    let c = Cluster::start(lab);
    assert_eq!(
        (c.lab.node("a").zone.as_str(), c.lab.node("b").zone.as_str()),
        ("zone-a", "zone-b")
    );
    let svc = Service::cluster_ip("web", "10.96.2.18")
        .port("http", 80, TCP, Proto::Tcp)
        .merge(serde_json::json!({"spec": {"trafficDistribution": "PreferClose"}}));
    let base = || Slice::for_service("web").port("http", TCP);
    let zone_hinted = base()
        .endpoint(&web[0], Cond::READY)
        .zone_hints(&["zone-a"])
        .endpoint(&web[1], Cond::READY)
        .zone_hints(&["zone-b"])
        .endpoint(&web[2], Cond::READY)
        .zone_hints(&["zone-a"]);
    let cip = vip("10.96.2.18:80");
    let (from_a, from_b) = (Host::Pod("client-a"), Host::Pod("client-b"));

    c.write("web.yaml", &[&svc, &zone_hinted]);
    c.wait_all_seen(from_a, Proto::Tcp, cip, &["web-a1", "web-b2"], START);
    c.wait_answers(from_b, Proto::Tcp, cip, CONVERGE);
    c.wait_synced(START);
    let seen = servers_seen(&c, from_a, cip, 30, "zone-a client");
    assert_eq!(seen, set(&["web-a1", "web-b2"]), "zone-a client");
    let seen = servers_seen(&c, from_b, cip, 20, "zone-b client");
    assert_eq!(seen, set(&["web-b1"]), "zone-b client");
    assert_topology_traced(&c, "a", from_a, cip);
    assert_topology_traced(&c, "b", from_b, cip);

    // web-b1 loses its hint: the hints are incomplete, so no endpoint is filtered anywhere.
    let partly_hinted = base()
        .endpoint(&web[0], Cond::READY)
        .zone_hints(&["zone-a"])
        .endpoint(&web[1], Cond::READY)
        .endpoint(&web[2], Cond::READY)
        .zone_hints(&["zone-a"]);
    c.write("web.yaml", &[&svc, &partly_hinted]);
    let all = ["web-a1", "web-b1", "web-b2"];
    c.wait_all_seen(from_a, Proto::Tcp, cip, &all, CONVERGE);
    c.wait_all_seen(from_b, Proto::Tcp, cip, &all, CONVERGE);

    // Node hints on every endpoint (zone hints kept): node a gets only web-a1, node b the
    // two endpoints hinted for it.
    let node_hinted = base()
        .endpoint(&web[0], Cond::READY)
        .zone_hints(&["zone-a"])
        .node_hints(&["a"])
        .endpoint(&web[1], Cond::READY)
        .zone_hints(&["zone-b"])
        .node_hints(&["b"])
        .endpoint(&web[2], Cond::READY)
        .zone_hints(&["zone-a"])
        .node_hints(&["b"]);
    let before = c.wait_synced(START);
    c.write("web.yaml", &[&svc, &node_hinted]);
    wait_applied(&c, &before, "node hints");
    assert_eq!(
        servers_seen(&c, from_a, cip, 20, "node a client"),
        set(&["web-a1"])
    );
    assert_eq!(
        servers_seen(&c, from_b, cip, 30, "node b client"),
        set(&["web-b1", "web-b2"])
    );
    assert_topology_traced(&c, "a", from_a, cip);
    assert_topology_traced(&c, "b", from_b, cip);
}

/// Trace on `node` agrees with `from`'s connections to `cip`, and the controller's says that
/// topology hints chose the endpoints.
#[track_caller]
fn assert_topology_traced(c: &Cluster, node: &str, from: Host<'_>, cip: SocketAddr) {
    let rs = c.probe(from, Proto::Tcp, cip, &ProbeOpts::count(10));
    c.assert_traces_agree(node, from, (Proto::Tcp, cip), &rs);
    let src = c.source_of(from, cip);
    let t = c
        .controller_trace(node, src, cip, Proto::Tcp, None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(t.says("topology hints"), "{:#?}", t.raw);
}

/// Starts an echo server named `name` in node `node`'s own network namespace (a
/// host-network pod) listening on TCP `port`.
fn host_network_echo(c: &Cluster, node: &str, name: &str, port: u16) {
    let echo = c.lab.binary("kubenft-echo").unwrap();
    let port = port.to_string();
    let p = c
        .lab
        .spawn(
            name,
            Host::Node(node),
            &[
                echo.to_str().unwrap(),
                "serve",
                "--name",
                name,
                "--tcp",
                &port,
            ],
        )
        .unwrap();
    p.wait_for_stdout("READY", Duration::from_secs(5)).unwrap();
}

/// §5.43: a host-network endpoint — node a's own namespace serving on 10180, Service
/// 80 → 10180, the endpoint address being node a's IP. Pods on both nodes (keeping their
/// own addresses) and both nodes themselves reach it. With internalTrafficPolicy Local it
/// behaves as §5.16: node a and its pod are served, node b and its pod are dropped.
#[test]
fn host_network_endpoint_serves_pods_and_nodes_and_honours_local_policy() {
    let lab = Cluster::lab(&["a", "b"]);
    let ca = client(&lab, "client-a", "a");
    let cb = client(&lab, "client-b", "b");
    let c = Cluster::start(lab);
    host_network_echo(&c, "a", "host-a", 10180);
    let svc = |itp| {
        Service::cluster_ip("hostnet", "10.96.2.43")
            .port("http", 80, 10180, Proto::Tcp)
            .internal_traffic_policy(itp)
    };
    let node_a = c.lab.node("a");
    let slice = Slice::for_service("hostnet")
        .port("http", 10180)
        .endpoint_addr(
            node_a.ipv4.into(),
            Some("a"),
            Some(&node_a.zone),
            Cond::READY,
        );
    let cip = vip("10.96.2.43:80");

    c.write("hostnet.yaml", &[&svc(TrafficPolicy::Cluster), &slice]);
    c.wait_answers(Host::Pod("client-b"), Proto::Tcp, cip, START);
    c.wait_synced(START);
    for (name, pod) in [("client-a", &ca), ("client-b", &cb)] {
        let rs = assert_only(&c, Host::Pod(name), cip, 5, "host-a", name);
        assert_all_from(&rs, pod.ipv4.into(), name);
    }
    for node in ["a", "b"] {
        assert_only(
            &c,
            Host::Node(node),
            cip,
            5,
            "host-a",
            &format!("node {node}"),
        );
    }

    let before = c.wait_synced(START);
    c.write("hostnet.yaml", &[&svc(TrafficPolicy::Local), &slice]);
    wait_applied(&c, &before, "internalTrafficPolicy Local");
    assert_only(
        &c,
        Host::Pod("client-a"),
        cip,
        5,
        "host-a",
        "pod on a, ITP Local",
    );
    assert_only(&c, Host::Node("a"), cip, 5, "host-a", "node a, ITP Local");
    assert_dropped(&c, Host::Pod("client-b"), cip, 5, "pod on b, ITP Local");
    assert_dropped(&c, Host::Node("b"), cip, 5, "node b, ITP Local");
}
