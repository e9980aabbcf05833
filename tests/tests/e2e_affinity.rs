//! End to end through the real controller and agents: ClientIP session affinity.
//! Behaviour numbers refer to docs/behaviours.md §5.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use kubenft_lab::{Cond, Host, ProbeOpts, Proto, Service, ServiceType, Slice};

fn web(affinity: Option<Option<u32>>) -> Service {
    let svc = Service::cluster_ip("web", "10.96.0.95")
        .service_type(ServiceType::NodePort)
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30095);
    match affinity {
        Some(timeout) => svc.session_affinity_client_ip(timeout),
        None => svc,
    }
}

/// The servers that answered `n` new connections from `from`.
fn servers(c: &Cluster, from: Host<'_>, target: std::net::SocketAddr, n: u32) -> Vec<String> {
    let rs = c.probe(from, Proto::Tcp, target, &ProbeOpts::count(n));
    assert_all_ok(&rs, "affinity probes");
    rs.iter()
        .filter_map(|r| r.server().map(str::to_owned))
        .collect()
}

fn distinct(servers: &[String]) -> BTreeSet<&str> {
    servers.iter().map(String::as_str).collect()
}

/// §5.24, 5.26, 5.27, 5.28: one client sticks to one pod on the ClusterIP and on a NodePort;
/// switching affinity off spreads it, on again sticks it; an agent restart keeps it on the
/// same pod; when that pod goes away the client moves at once and sticks to the new one.
#[test]
fn client_ip_affinity_sticks_switches_survives_restarts_and_releases() {
    let lab = Cluster::lab(&["a", "b"]);
    let p = pods(&lab, &[("web-1", "a"), ("web-2", "b"), ("web-3", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let slice = |pods: &[kubenft_lab::Pod]| {
        Slice::for_service("web")
            .port("http", TCP)
            .endpoints(pods, Cond::READY)
    };
    let cip = vip("10.96.0.95:80");
    let np = sock(c.lab.node("b").ipv4, 30095);

    c.write("web.yaml", &[&web(Some(None)), &slice(&p)]);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, cip, START);
    let first = servers(&c, Host::Pod("client"), cip, 15);
    assert_eq!(
        distinct(&first).len(),
        1,
        "ClusterIP: not sticky: {first:?}"
    );
    let via_np = servers(&c, Host::External, np, 10);
    assert_eq!(
        distinct(&via_np).len(),
        1,
        "NodePort: not sticky: {via_np:?}"
    );
    // Trace: any of the three for a new client, and the one this client sticks to among them.
    for (node, from, target) in [("a", Host::Pod("client"), cip), ("b", Host::External, np)] {
        let rs = c.probe(from, Proto::Tcp, target, &ProbeOpts::count(5));
        let t = c.assert_traces_agree(node, from, (Proto::Tcp, target), &rs);
        assert_eq!(t.endpoints.len(), 3, "{t:?}");
    }

    // Off: the same client spreads over the pods.
    c.write("web.yaml", &[&web(None), &slice(&p)]);
    kubenft_lab::wait_until(CONVERGE, POLL, || {
        Ok::<_, std::io::Error>(distinct(&servers(&c, Host::Pod("client"), cip, 12)).len() > 1)
    })
    .expect("affinity switched off but the client still sticks");

    // On again: sticky again (to whichever pod it picks now).
    c.write("web.yaml", &[&web(Some(None)), &slice(&p)]);
    kubenft_lab::wait_until(CONVERGE, POLL, || {
        Ok::<_, std::io::Error>(distinct(&servers(&c, Host::Pod("client"), cip, 12)).len() == 1)
    })
    .expect("affinity switched on but the client spreads");
    let sticky = servers(&c, Host::Pod("client"), cip, 1).remove(0);

    // The client's node agent is killed and restarted: the affinity state survives.
    let agent = c.agent("a").clone();
    agent.kill().unwrap();
    agent.restart().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = servers(&c, Host::Pod("client"), cip, 10);
    assert_eq!(
        distinct(&after),
        BTreeSet::from([sticky.as_str()]),
        "affinity lost across an agent restart"
    );

    // The sticky pod leaves the Service: the client moves at once, and sticks again.
    let rest: Vec<_> = p.iter().filter(|pod| pod.name != sticky).cloned().collect();
    c.write("web.yaml", &[&web(Some(None)), &slice(&rest)]);
    c.wait_probe(
        "client released",
        Host::Pod("client"),
        Proto::Tcp,
        cip,
        CONVERGE,
        |r| r.server().is_some_and(|s| s != sticky),
    );
    let moved = servers(&c, Host::Pod("client"), cip, 10);
    assert_eq!(
        distinct(&moved).len(),
        1,
        "not sticky after the move: {moved:?}"
    );
    assert!(!moved.contains(&sticky));
}

/// §5.25: with timeoutSeconds 1, the client sticks while it keeps coming, and after being idle
/// longer than the timeout it is balanced afresh (eventually reaching another pod).
#[test]
fn client_ip_affinity_times_out() {
    let lab = Cluster::lab(&["a", "b"]);
    let p = pods(&lab, &[("web-1", "a"), ("web-2", "b"), ("web-3", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&p, Cond::READY);
    let cip = vip("10.96.0.95:80");
    c.write("web.yaml", &[&web(Some(Some(1))), &slice]);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, cip, START);
    // Each idle period re-balances over 3 pods, so staying on one pod by chance through 19
    // re-balances has a probability of 3^-19; a timeout that is not applied stays every time.
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let round = servers(&c, Host::Pod("client"), cip, 10);
        assert_eq!(
            distinct(&round).len(),
            1,
            "not sticky within the timeout: {round:?}"
        );
        seen.insert(round[0].clone());
        if seen.len() > 1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(1300));
    }
    panic!(
        "after 20 idle periods the client always returned to {seen:?}: the timeout is not applied"
    );
}
