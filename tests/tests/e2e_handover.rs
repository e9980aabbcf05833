//! Two agents on one node, as in a DaemonSet rollout with maxSurge or a restart that
//! overlaps the old process: the second waits as a standby (it answers the probes, but
//! neither talks to the controller nor writes the tables) while the first keeps applying
//! changes, and takes over when the first stops — after SIGTERM and after SIGKILL — adopting
//! the tables as they are (connections to a Service keep working throughout), then applying
//! the next change.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kubenft_lab::{Cond, Host, Pod, ProbeOpts, Process, Proto, Service, Slice, wait_until};

const VIP: &str = "10.96.0.46:80";

/// Node a's acked version once the controller reports it SYNCED at a version other than
/// `previous`.
fn wait_new_ack(c: &Cluster, previous: &str, what: &str) -> String {
    let mut last = serde_json::Value::Null;
    wait_until(START, Duration::from_millis(100), || {
        let nodes = c.list_nodes()?;
        last = nodes.get("a").cloned().unwrap_or_default();
        Ok::<_, String>(
            last["state"] == "SYNCED"
                && last["ackedVersion"] == last["desiredVersion"]
                && last["ackedVersion"] != previous,
        )
    })
    .unwrap_or_else(|e| panic!("{what}: node a not SYNCED at a new version: {e}; last {last}"));
    last["ackedVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn wait_log(p: &Process, needle: &str, what: &str) -> Duration {
    wait_until(START, POLL, || Ok::<_, String>(p.logs().contains(needle))).unwrap_or_else(|e| {
        panic!(
            "{what}: {needle:?} not logged by {}: {e}\n{}",
            p.name(),
            p.log_tail(30)
        )
    })
}

fn set_endpoints(c: &Cluster, pods: &[&Pod]) {
    let svc = Service::cluster_ip("web", "10.96.0.46").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(pods.iter().copied(), Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
}

/// A second agent for node a, with the same arguments (state directory, ports) as the first.
fn second_agent(c: &Cluster, name: &str) -> Process {
    let bin = c.lab.binary("kubenft-agent").unwrap().display().to_string();
    let mut argv = vec![bin];
    argv.extend(c.lab.agent_default_args("a").unwrap());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    c.lab.spawn(name, Host::Node("a"), &argv).unwrap()
}

/// `/healthz` from inside node a, a few times: every answer is 200; returns how many came
/// from a standby (the two agents share the port).
fn healthz_answers(c: &Cluster) -> usize {
    let mut standby = 0;
    for _ in 0..16 {
        let (code, text) = c.http_get(Host::Node("a"), "http://127.0.0.1:10256/healthz");
        assert_eq!(code, 200, "{text}");
        standby += usize::from(text.contains(r#""standby":true"#));
    }
    standby
}

/// Waits until the only server answering on the VIP is `server`.
fn wait_served_by(c: &Cluster, server: &str) {
    c.wait_all_seen(
        Host::Pod("client"),
        Proto::Tcp,
        vip(VIP),
        &[server],
        CONVERGE,
    );
}

#[test]
fn a_standby_agent_takes_over_after_sigterm_and_sigkill_adopting_the_tables() {
    let lab = Cluster::lab(&["a"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "a"), ("web-3", "a")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let [w1, w2, w3] = [&backends[0], &backends[1], &backends[2]];
    set_endpoints(&c, &[w1]);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, vip(VIP), START);
    let mut acked = c.wait_synced(START)["a"].clone();
    let first = c.agent("a").clone();

    // B starts while A holds the node: it waits, answers the probes as a standby, and
    // neither connects to the controller nor touches the tables.
    let second = second_agent(&c, "agent-a-second");
    wait_log(&second, "standby", "the second agent");
    assert!(second.is_running(), "{}", second.log_tail(30));
    assert!(
        healthz_answers(&c) > 0,
        "no /healthz answer came from the standby"
    );

    // A keeps applying changes.
    set_endpoints(&c, &[w2]);
    acked = wait_new_ack(&c, &acked, "a change while B waits");
    wait_served_by(&c, "web-2");
    let logs = second.logs();
    assert!(
        !logs.contains("connected to controller") && !logs.contains("applied change"),
        "the standby acted:\n{logs}"
    );

    // SIGTERM A: B takes over, adopting the tables (same table, no transaction), while a
    // client keeps opening connections to the Service.
    let (handle, gen_before) = (c.table_handle("a"), c.generation("a"));
    let stop = AtomicBool::new(false);
    let results = std::thread::scope(|s| {
        // Bounded: at most 100 batches of 5 connections.
        let traffic = s.spawn(|| {
            let opts = ProbeOpts::count(5).timeout(Duration::from_secs(1));
            let to = (Host::Pod("client"), Proto::Tcp, vip(VIP));
            probe_until_stopped(&c, to, &opts, (100, Duration::ZERO), &stop)
        });
        std::thread::sleep(Duration::from_millis(200));
        first.stop().unwrap();
        let stopped = Instant::now();
        wait_log(&second, "took over the node", "after SIGTERM");
        wait_log(&second, "adopted the applied state", "after SIGTERM");
        wait_log(&second, "connected to controller", "after SIGTERM");
        eprintln!("took over {:?} after SIGTERM", stopped.elapsed());
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap()
    });
    let t = assert_all_ok(&results, "connections during the takeover");
    assert!(results.len() >= 10, "too little traffic: {t:?}");
    // The agent that adopted the tables traces what they did.
    let flow = (Proto::Tcp, vip(VIP));
    c.assert_trace_agrees("a", Host::Pod("client"), flow, &results);
    assert_eq!(c.table_handle("a"), handle, "the table was recreated");
    assert_eq!(
        c.generation("a"),
        gen_before,
        "a transaction ran at takeover"
    );
    // ... and applies the next change.
    set_endpoints(&c, &[w3]);
    acked = wait_new_ack(&c, &acked, "the first change after SIGTERM");
    wait_served_by(&c, "web-3");

    // A comes back: now it is the standby. SIGKILL B: A takes over the same way.
    first.start().unwrap();
    wait_log(&first, "standby", "the restarted first agent");
    let (handle, gen_before) = (c.table_handle("a"), c.generation("a"));
    second.kill().unwrap();
    let killed = Instant::now();
    wait_log(&first, "took over the node", "after SIGKILL");
    wait_log(&first, "adopted the applied state", "after SIGKILL");
    eprintln!("took over {:?} after SIGKILL", killed.elapsed());
    assert_eq!(c.table_handle("a"), handle, "the table was recreated");
    assert_eq!(
        c.generation("a"),
        gen_before,
        "a transaction ran at takeover"
    );
    set_endpoints(&c, &[w1]);
    wait_new_ack(&c, &acked, "the first change after SIGKILL");
    wait_served_by(&c, "web-1");
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        vip(VIP),
        &ProbeOpts::count(4),
    );
    c.assert_traces_agree("a", Host::Pod("client"), flow, &rs);
}
