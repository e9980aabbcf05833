//! End to end: the drain gate (`ControllerInspect/DrainStatus` and the preStop helper
//! `kubenft-controller drain-wait`) and the cluster-wide network programming latency
//! (`ListChanges`, `kubenft_controller_network_programming_duration_seconds`), with the real
//! controller, real agents, real nft and real connections.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use kubenft_lab::topology::{CONTROLLER_GRPC_PORT, CONTROLLER_HTTP_PORT, CP_V4};
use kubenft_lab::{Cond, Host, Pod, ProbeOpts, Process, Proto, Service, Slice, wait_until};
use kubenft_metrics::exposition::{self, Exposition};
use serde_json::{Value, json};

const VIP: &str = "10.96.0.50:80";

/// Service `web` at [`VIP`] over `endpoints` (pod, condition), the slice triggered at
/// `trigger` when given.
fn write_web(c: &Cluster, endpoints: &[(&Pod, Cond)], trigger: Option<&str>) {
    let svc = Service::cluster_ip("web", "10.96.0.50").port("http", 80, TCP, Proto::Tcp);
    let mut slice = Slice::for_service("web").port("http", TCP);
    for (pod, cond) in endpoints {
        slice = slice.endpoint(pod, *cond);
    }
    if let Some(t) = trigger {
        slice = slice.merge(json!({"metadata": {"annotations": {
            "endpoints.kubernetes.io/last-change-trigger-time": t
        }}}));
    }
    c.write("web.yaml", &[&svc, &slice]);
}

/// The endpoint addresses of every Service port `node`'s agent has applied (its own
/// inspection: what it committed to nft).
fn applied_endpoints(c: &Cluster, node: &str) -> Vec<String> {
    let applied = c
        .agent_call(node, "GetApplied")
        .unwrap_or_else(|e| panic!("GetApplied on {node}: {e}"));
    applied["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("servicePort"))
        .flat_map(|sp| {
            ["clusterEndpoints", "localEndpoints"]
                .into_iter()
                .flat_map(|k| sp[k].as_array().cloned().unwrap_or_default())
        })
        .filter_map(|e| e["ip"].as_str().map(str::to_string))
        .collect()
}

/// The real `drain-wait` over TLS as the lab's operator, run on node `node` (the lab's pods
/// have no route to the control plane; the pod's node has, as pods have in a cluster);
/// `controller` is the address it asks.
fn drain_wait(c: &Cluster, node: &str, controller: &str, address: &str, timeout: &str) -> Process {
    let bin = c.lab.binary("kubenft-controller").unwrap();
    let tls = c.lab.tls();
    let files = [
        tls.operator.cert.display().to_string(),
        tls.operator.key.display().to_string(),
        tls.pki.ca().display().to_string(),
    ];
    let url = format!("https://{controller}");
    let argv = [
        bin.to_str().unwrap(),
        "drain-wait",
        "--controller",
        &url,
        "--address",
        address,
        "--timeout",
        timeout,
        "--tls-cert-file",
        &files[0],
        "--tls-private-key-file",
        &files[1],
        "--controller-ca-file",
        &files[2],
    ];
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    c.lab
        .spawn(&format!("drain-wait-{run}"), Host::Node(node), &argv)
        .unwrap_or_else(|e| panic!("starting drain-wait: {e}"))
}

/// Waits (bounded) for `p` to exit; its exit code.
fn exit_code(p: &Process, cap: Duration) -> i32 {
    wait_until(cap, POLL, || Ok::<_, String>(!p.is_running()))
        .unwrap_or_else(|e| panic!("drain-wait still running after {cap:?}: {e}"));
    p.exit_status()
        .and_then(|s| s.code())
        .unwrap_or_else(|| panic!("drain-wait ended without a code: {:?}", p.exit_status()))
}

/// Sends SIGSTOP or SIGCONT to `p`'s process group.
fn signal(p: &Process, sig: &str) {
    let group = format!("-{}", p.pid().expect("running"));
    let out = std::process::Command::new("kill")
        .args([sig, "--", &group])
        .output()
        .unwrap();
    assert!(out.status.success(), "kill {sig} {group}: {out:?}");
}

fn drain_status(c: &Cluster, address: &str) -> Value {
    c.controller_call(
        "DrainStatus",
        Some(&format!(r#"{{"address": "{address}"}}"#)),
    )
    .unwrap()
}

fn drain_states(v: &Value) -> BTreeMap<String, String> {
    v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["node"].as_str().unwrap_or_default().to_string(),
                n["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn scrape(c: &Cluster, host: Host<'_>, url: &str) -> Exposition {
    let text = c
        .lab
        .exec_ok(host, &["curl", "-s", "-m", "2", url])
        .unwrap_or_else(|e| panic!("curl {url}: {e}"));
    exposition::parse(&text).unwrap_or_else(|e| panic!("{url}: {e}\n{text}"))
}

/// `histogram`'s (count, sum) over all its series.
fn histogram(e: &Exposition, histogram: &str) -> (f64, f64) {
    let get = |suffix: &str| {
        e.get(histogram)
            .map_or(0.0, |f| f.sum(&format!("{histogram}_{suffix}"), &[]))
    };
    (get("count"), get("sum"))
}

const CONTROLLER_HISTOGRAM: &str = "kubenft_controller_network_programming_duration_seconds";
const AGENT_HISTOGRAM: &str = "kubeproxy_network_programming_duration_seconds";

fn controller_histogram(c: &Cluster) -> (f64, f64) {
    let url = format!("http://{CP_V4}:{CONTROLLER_HTTP_PORT}/metrics");
    histogram(&scrape(c, Host::ControlPlane, &url), CONTROLLER_HISTOGRAM)
}

fn agent_histogram(c: &Cluster, node: &str) -> (f64, f64) {
    let e = scrape(c, Host::Node(node), "http://127.0.0.1:10249/metrics");
    histogram(&e, AGENT_HISTOGRAM)
}

/// A pod is deleted under continuous traffic through a ClusterIP: its endpoint turns
/// terminating (others are ready, so it is not used as a fallback). Node b's agent is held
/// (SIGSTOP) while the change goes out, so node a acknowledges first: the real `drain-wait`,
/// started on the pod's node as its preStop hook would be, is still waiting then, and exits 0 only
/// after b's agent is let go and acknowledges. When it returns, both agents' applied state
/// lacks the address, and a bounded loop of new connections from clients on both nodes never
/// reaches the pod, while the traffic during the drain never failed.
///
/// The same change carries a trigger time: ListChanges (through grpcurl) shows it with both
/// nodes acknowledged, the controller's histogram counted it once, and its figure (to the
/// last node's ACK) is at least each agent's own `kubeproxy_network_programming_duration_seconds`
/// for it (trigger to that node's commit).
#[test]
fn the_gate_opens_after_every_agent_acked_and_no_new_connection_reaches_the_pod() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a"), ("web-2", "b"), ("web-3", "b")]);
    client(&lab, "client-a", "a");
    client(&lab, "client-b", "b");
    let c = Cluster::start(lab);
    let all_ready: Vec<(&Pod, Cond)> = web.iter().map(|p| (p, Cond::READY)).collect();
    write_web(&c, &all_ready, None);
    for client in ["client-a", "client-b"] {
        c.wait_all_seen(
            Host::Pod(client),
            Proto::Tcp,
            vip(VIP),
            &["web-1", "web-2", "web-3"],
            START,
        );
    }
    c.wait_synced(START);
    let address = web[0].ipv4.to_string();
    // Before: both nodes send to web-1; the gate is closed.
    let v = drain_status(&c, &address);
    assert_eq!(v["done"], Value::Null, "proto3 JSON omits false: {v}");
    assert_eq!(
        drain_states(&v),
        BTreeMap::from([
            ("a".into(), "DRAIN_PENDING".into()),
            ("b".into(), "DRAIN_PENDING".into())
        ]),
        "{v}"
    );
    let metrics_before = (
        controller_histogram(&c),
        agent_histogram(&c, "a"),
        agent_histogram(&c, "b"),
    );

    let stop = AtomicBool::new(false);
    let controller = format!("{CP_V4}:{CONTROLLER_GRPC_PORT}");
    let during = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let to = (Host::Pod("client-a"), Proto::Tcp, vip(VIP));
            probe_until_stopped(&c, to, &ProbeOpts::count(10), (300, POLL), &stop)
        });
        // Traffic flows before the pod goes.
        std::thread::sleep(Duration::from_millis(300));
        // The pod is deleted: its endpoint turns terminating, while b's agent is held.
        signal(c.agent("b"), "-STOP");
        let trigger = c.rfc3339_now();
        write_web(
            &c,
            &[
                (&web[0], Cond::TERMINATING_SERVING),
                (&web[1], Cond::READY),
                (&web[2], Cond::READY),
            ],
            Some(&trigger),
        );
        let hook = drain_wait(&c, "a", &controller, &address, "20s");
        // Node a acknowledges; b cannot: the gate names b and stays closed.
        let mut last = Value::Null;
        wait_until(START, Duration::from_millis(100), || {
            last = drain_status(&c, &address);
            let states = drain_states(&last);
            Ok::<_, String>(
                states.get("a").map(String::as_str) == Some("DRAIN_DONE")
                    && states.get("b").map(String::as_str) == Some("DRAIN_PENDING"),
            )
        })
        .unwrap_or_else(|e| panic!("node a never done with b pending: {e}; last {last}"));
        let b = last["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "b")
            .unwrap();
        assert!(
            b["neededVersion"].as_str().is_some_and(|v| !v.is_empty())
                && b["neededVersion"] != b["ackedVersion"],
            "b needs the version without the address: {last}"
        );
        assert!(
            hook.is_running(),
            "drain-wait returned while b's agent had not acknowledged: {}",
            stderr_of(&hook)
        );
        signal(c.agent("b"), "-CONT");
        let code = exit_code(&hook, START);
        // The instant the gate opened: every agent's committed state lacks the address.
        let applied: BTreeMap<&str, Vec<String>> = ["a", "b"]
            .into_iter()
            .map(|n| (n, applied_endpoints(&c, n)))
            .collect();
        stop.store(true, Ordering::Relaxed);
        let during = traffic.join().unwrap();
        assert_eq!(
            code,
            0,
            "drain-wait: {}{}",
            hook.current_stdout(),
            stderr_of(&hook)
        );
        assert!(
            hook.current_stdout()
                .contains("no node sends new connections"),
            "{}",
            hook.current_stdout()
        );
        for (node, eps) in &applied {
            assert!(
                !eps.contains(&address) && !eps.is_empty(),
                "node {node}'s agent still applies {address} when the gate opened: {eps:?}"
            );
        }
        during
    });
    assert_no_failed_request(&during, "while web-1 drained");

    // After the gate: no new connection reaches web-1, from either node, and neither node's
    // Trace has an endpoint at its address.
    for (node, client) in [("a", "client-a"), ("b", "client-b")] {
        let rs = c.probe(
            Host::Pod(client),
            Proto::Tcp,
            vip(VIP),
            &ProbeOpts::count(40),
        );
        let t = assert_all_ok(&rs, &format!("{client} after the drain"));
        assert!(
            !t.contains_key("web-1") && t.len() == 2,
            "{client}: {t:?} (web-1 must get nothing, web-2 and web-3 everything)"
        );
        let flow = (Proto::Tcp, vip(VIP));
        c.assert_trace_drained(node, Host::Pod(client), flow, &rs, web[0].ipv4.into());
    }

    // The change: recorded with both nodes acknowledged, and counted once.
    let changes = c.controller_call("ListChanges", None).unwrap();
    let last = &changes["changes"][0];
    assert_eq!(last["nodes"], 2, "{changes}");
    assert_eq!(last["acked"], 2, "{changes}");
    assert_eq!(last["done"], true, "{changes}");
    assert_eq!(last["slowestNode"], "b", "b was held: {changes}");
    assert!(
        last["triggerUnixMs"]
            .as_str()
            .is_some_and(|t| t.parse::<i64>().unwrap() > 0),
        "{changes}"
    );
    let ms = last["durationMs"]
        .as_str()
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("durationMs: {changes}"));
    let (controller_after, a_after, b_after) = (
        controller_histogram(&c),
        agent_histogram(&c, "a"),
        agent_histogram(&c, "b"),
    );
    let ((c0, c0_sum), (a0, a0_sum), (b0, b0_sum)) = metrics_before;
    assert_eq!(controller_after.0, c0 + 1.0, "one controller observation");
    let controller_seconds = controller_after.1 - c0_sum;
    assert!(
        (controller_seconds - ms as f64 / 1000.0).abs() < 1e-6,
        "the histogram observed ListChanges' figure: {controller_seconds} vs {ms} ms"
    );
    for (node, (count, sum), (count0, sum0)) in
        [("a", a_after, (a0, a0_sum)), ("b", b_after, (b0, b0_sum))]
    {
        assert_eq!(count, count0 + 1.0, "node {node}: one agent observation");
        let agent_seconds = sum - sum0;
        eprintln!(
            "programming latency: controller (to the last ACK) {controller_seconds:.3} s, agent {node} {agent_seconds:.3} s"
        );
        assert!(
            controller_seconds >= agent_seconds,
            "controller {controller_seconds} s < agent {node}'s {agent_seconds} s"
        );
    }
    let nodes = c.list_nodes().unwrap();
    for n in ["a", "b"] {
        assert_eq!(
            nodes[n]["lastChangeRevision"], last["revision"],
            "ListNodes' last change of {n}: {}",
            nodes[n]
        );
    }
}

/// A node whose agent is stopped, and whose last acknowledged rule set sends to the address,
/// is reported NOT_CONNECTED; drain-wait exits 1 at its timeout naming it (not hanging past
/// it), and 3 when no controller answers.
#[test]
fn a_node_whose_agent_is_down_is_reported_not_waited_for_forever() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    client(&lab, "client-a", "a");
    let c = Cluster::start(lab);
    let ready: Vec<(&Pod, Cond)> = web.iter().map(|p| (p, Cond::READY)).collect();
    write_web(&c, &ready, None);
    c.wait_all_seen(
        Host::Pod("client-a"),
        Proto::Tcp,
        vip(VIP),
        &["web-1", "web-2"],
        START,
    );
    c.wait_synced(START);
    c.agent("b").stop().unwrap();
    // The endpoint leaves the slice (the pod is gone); node a acknowledges.
    write_web(&c, &[(&web[1], Cond::READY)], None);
    c.wait_probe(
        "web-1 no longer chosen",
        Host::Pod("client-a"),
        Proto::Tcp,
        vip(VIP),
        CONVERGE,
        |r| r.server() == Some("web-2"),
    );
    let address = web[0].ipv4.to_string();
    let mut last = Value::Null;
    wait_until(START, Duration::from_millis(100), || {
        last = drain_status(&c, &address);
        Ok::<_, String>(drain_states(&last).get("a").map(String::as_str) == Some("DRAIN_DONE"))
    })
    .unwrap_or_else(|e| panic!("node a never done: {e}; last {last}"));
    assert_eq!(
        drain_states(&last),
        BTreeMap::from([
            ("a".into(), "DRAIN_DONE".into()),
            ("b".into(), "DRAIN_NOT_CONNECTED".into())
        ]),
        "{last}"
    );
    assert_eq!(last["done"], Value::Null, "not done: {last}");
    // Node a, done, traces no endpoint at the address, and its traffic never reaches it.
    let rs = all_ok(&c, Host::Pod("client-a"), vip(VIP), 4);
    let flow = (Proto::Tcp, vip(VIP));
    c.assert_trace_drained("a", Host::Pod("client-a"), flow, &rs, web[0].ipv4.into());

    let controller = format!("{CP_V4}:{CONTROLLER_GRPC_PORT}");
    let hook = drain_wait(&c, "a", &controller, &address, "2s");
    let code = exit_code(&hook, START);
    let err = stderr_of(&hook);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("timed out after 2s") && err.contains("b (not connected)"),
        "{err}"
    );
    assert!(!err.contains("a ("), "a is done: {err}");
    // Nobody answers on that port: 3.
    let hook = drain_wait(&c, "a", &format!("{CP_V4}:1"), &address, "1s");
    let code = exit_code(&hook, START);
    let err = stderr_of(&hook);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no controller answered"), "{err}");
}
