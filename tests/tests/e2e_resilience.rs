//! End to end through the real controller and agents: what users see while the agent
//! crashes, while the controller is away, when the kernel refuses a transaction (once, or
//! every time), and when its state file is corrupted.
//! Behaviour numbers refer to docs/behaviours.md §5.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kubenft_lab::probe::tally;
use kubenft_lab::{Host, Pod, ProbeOpts, ProbeResult, Proto, wait_until};

/// Two nodes serving [`two_node_web`] to the client pod, SYNCED, and what the agent on
/// node a shows of it.
struct Serving {
    c: Cluster,
    target: SocketAddr,
    /// The controller's acked version per node.
    acked: BTreeMap<String, String>,
    /// The kernel handle of node a's table.
    handle: u64,
    /// Node a's applied version (GetApplied's `systemVersion`).
    version: String,
}

fn serving_web(vip_ip: &str) -> Serving {
    let c = Cluster::start(two_node_web(vip_ip));
    let target = vip(&format!("{vip_ip}:80"));
    c.wait_answers(Host::Pod("client"), Proto::Tcp, target, START);
    let acked = c.wait_synced(START);
    let handle = c.table_handle("a");
    let applied = c.agent_call("a", "GetApplied").unwrap();
    let version = applied["systemVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        !version.is_empty(),
        "GetApplied has no systemVersion: {applied}"
    );
    Serving {
        c,
        target,
        acked,
        handle,
        version,
    }
}

/// Node a's agent is SIGKILLed and started again while the client pod opens new connections
/// to the Service (at most 300 batches of 10, each attempt ≤ 1 s); `while_down` runs between
/// the kill and the start. Waits until the restarted agent reports `s.version` again and
/// every node is SYNCED; returns the connections' results and the acked versions then.
fn restart_agent_a_under_traffic(
    s: &Serving,
    while_down: impl FnOnce(),
) -> (Vec<ProbeResult>, BTreeMap<String, String>) {
    let (c, version) = (&s.c, &s.version);
    let agent = c.agent("a").clone();
    let to = (Host::Pod("client"), Proto::Tcp, s.target);
    let every = (300, Duration::ZERO);
    with_traffic(c, to, &ProbeOpts::count(10), every, || {
        std::thread::sleep(Duration::from_millis(300));
        agent.kill().unwrap();
        eprintln!("agent a killed");
        while_down();
        agent.start().unwrap();
        // Back: its inspection answers with the same applied version.
        let mut last = String::new();
        wait_until(START, Duration::from_millis(100), || {
            let v = c.agent_call("a", "GetApplied")?;
            last = v["systemVersion"].as_str().unwrap_or_default().to_string();
            Ok::<_, String>(last == *version)
        })
        .unwrap_or_else(|e| {
            panic!("restarted agent reports version {last:?}, not {version:?}: {e}")
        });
        let after = c.wait_synced(START);
        std::thread::sleep(Duration::from_millis(300));
        after
    })
}

/// §5.45: continuous new TCP connections to a ClusterIP from a pod on node a while node a's
/// agent is SIGKILLed and restarted: zero failures. The restarted agent adopts what is in
/// the kernel: the table is the same object (same handle), no transaction ran (same
/// generation), and it reports the same applied version, which the controller shows as
/// SYNCED with the same acked version.
#[test]
fn agent_sigkill_and_restart_under_traffic_is_seamless() {
    let s = serving_web("10.96.0.45");
    let c = &s.c;
    let gen_before = c.generation("a");
    let (results, after) = restart_agent_a_under_traffic(&s, || {
        std::thread::sleep(Duration::from_millis(700));
    });
    assert_eq!(
        after, s.acked,
        "the controller's acked versions changed across the restart"
    );
    let t = tally(&results);
    eprintln!("{} connections during kill+restart: {t:?}", results.len());
    assert_all_ok(
        &results,
        "new connections during the agent's kill and restart",
    );
    assert!(
        results.len() >= 50,
        "too little traffic to prove anything: {t:?}"
    );
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, s.target), &results);
    assert_eq!(
        c.table_handle("a"),
        s.handle,
        "the agent recreated its table on restart"
    );
    assert_eq!(
        c.generation("a"),
        gen_before,
        "the restarted agent ran a transaction although the kernel already had its state"
    );
}

/// Nodes a and b, and web-1 on node a behind ClusterIP Service `name` at `vip_ip`:80,
/// answering the pod `client` on node a; every node SYNCED. Returns the cluster and web-1.
fn one_pod_service(client_pod: &str, name: &str, vip_ip: &str) -> (Cluster, Pod) {
    let lab = Cluster::lab(&["a", "b"]);
    let web1 = pods(&lab, &[("web-1", "a")]).remove(0);
    client(&lab, client_pod, "a");
    let c = Cluster::start(lab);
    write_web_service(&c, name, vip_ip, [&web1]);
    let target = vip(&format!("{vip_ip}:80"));
    c.wait_answers(Host::Pod(client_pod), Proto::Tcp, target, START);
    c.wait_synced(START);
    (c, web1)
}

/// §5.46: the controller is stopped for 20 s. Traffic keeps flowing the whole time (with the
/// last rules: a change made meanwhile is not applied yet), and the change made while it was
/// down — a new endpoint and a new Service — serves within 2 s of the agent's reconnection.
/// After an outage this long the agent retries every 2.5-5 s (its backoff's cap), so the
/// reconnection itself may come up to 5 s after the controller's return.
#[test]
fn controller_outage_keeps_traffic_and_applies_changes_on_return() {
    let (c, web1) = one_pod_service("client", "web", "10.96.0.46");
    let (old, new) = (vip("10.96.0.46:80"), vip("10.96.0.47:80"));

    c.controller.stop().unwrap();
    let down_at = Instant::now();
    eprintln!("controller stopped");
    let outage = Duration::from_secs(
        std::env::var("KUBENFT_E2E_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    // Probe rounds at 0, 4, 8, ... s; the change is made after the second round.
    let mut rounds = 0u32;
    while rounds < 8 && down_at.elapsed() + Duration::from_secs(4) < outage {
        let at = down_at.elapsed();
        eprintln!("outage round {rounds} at {at:?}");
        let rs = c.probe(Host::Pod("client"), Proto::Tcp, old, &ProbeOpts::count(4));
        let t = assert_all_ok(&rs, &format!("during the outage at {at:?}"));
        // The agent keeps the last rules it had: the new endpoint is not used yet, and its
        // Trace says so (the controller, which would know better, is away).
        assert_eq!(t.keys().collect::<Vec<_>>(), vec!["web-1"], "{t:?}");
        if rounds == 2 {
            c.assert_trace_agrees("a", Host::Pod("client"), (Proto::Tcp, old), &rs);
        }
        let out = c
            .lab
            .exec_ok(
                Host::Node("a"),
                &[
                    "curl",
                    "-s",
                    "-m",
                    "2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:10256/livez",
                ],
            )
            .unwrap();
        assert_eq!(out, "200", "agent /livez during the outage at {at:?}");
        if rounds == 1 {
            let web2 = pods(&c.lab, &[("web-2", "b")]).remove(0);
            write_web_service(&c, "web", "10.96.0.46", [&web1, &web2]);
            write_web_service(&c, "late", "10.96.0.47", [&web2]);
        }
        rounds += 1;
        let next = Duration::from_secs(4) * rounds;
        std::thread::sleep(next.saturating_sub(down_at.elapsed()));
    }
    assert!(
        rounds >= 2,
        "the outage loop did not get to make its change"
    );
    std::thread::sleep(outage.saturating_sub(down_at.elapsed()));
    let agent = c.agent("a").clone();
    let connected = || agent.logs().matches("connected to controller").count();
    let connections_before = connected();
    c.controller.start().unwrap();
    let back_at = Instant::now();
    eprintln!("controller restarted after {:?}", down_at.elapsed());
    let reconnected = wait_until(START, POLL, || {
        Ok::<_, String>(connected() > connections_before)
    })
    .unwrap_or_else(|e| panic!("agent a did not reconnect: {e}\n{}", agent.log_tail(20)));
    eprintln!("agent a reconnected {reconnected:?} after the controller's return");
    let took = c.wait_probe(
        "new Service after the agent's reconnection",
        Host::Pod("client"),
        Proto::Tcp,
        new,
        START,
        |r| r.server() == Some("web-2"),
    );
    c.wait_all_seen(
        Host::Pod("client"),
        Proto::Tcp,
        old,
        &["web-1", "web-2"],
        CONVERGE,
    );
    let rs = c.probe(Host::Pod("client"), Proto::Tcp, old, &ProbeOpts::count(8));
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, old), &rs);
    let total = back_at.elapsed();
    eprintln!(
        "changes served {took:?} after the reconnection / all {total:?} after the controller's return"
    );
    assert!(
        took <= CONVERGE,
        "the change made during the outage was applied {took:?} after the agent reconnected (want ≤ {CONVERGE:?})"
    );
}

/// A change the kernel refuses once: an element planted by hand in the agent's dispatch map
/// would make the agent's `add element` for that key fail ("File exists"). The agent no
/// longer gives up on the first refusal: it retries, then applies the change as a full
/// reconcile, and meanwhile its monitor may already have removed the planted element (it is
/// another program's change to our table). Either way the change is applied after all: node
/// a serves the new Service, the controller shows it SYNCED with no NACK and no retry, the
/// planted `drop` is gone, and the Service that worked keeps working.
#[test]
fn kernel_refusal_once_is_retried_and_the_change_applied() {
    let (c, web) = one_pod_service("client-a", "old", "10.96.0.60");
    let (old_vip, new_vip) = (vip("10.96.0.60:80"), vip("10.96.0.61:80"));

    c.nft(
        "a",
        &[
            "add",
            "element",
            "ip",
            "kubenft",
            "ip-c-dispatch",
            "{ 10.96.0.61 . tcp . 80 : drop }",
        ],
    );
    write_web_service(&c, "new", "10.96.0.61", [&web]);

    c.wait_probe(
        "node a serves the new Service",
        Host::Pod("client-a"),
        Proto::Tcp,
        new_vip,
        START,
        |r| r.server() == Some("web-1"),
    );
    c.wait_synced(START);
    let a = c.list_nodes().unwrap().remove("a").unwrap();
    eprintln!("node a: {a}");
    assert_eq!(a["state"], "SYNCED", "{a}");
    assert_eq!(
        a["lastNackError"].as_str().unwrap_or_default(),
        "",
        "a NACK stayed: {a}"
    );
    assert_eq!(a["nackRetries"].as_u64().unwrap_or(0), 0, "{a}");
    let rs = c.probe(
        Host::Pod("client-a"),
        Proto::Tcp,
        new_vip,
        &ProbeOpts::count(4),
    );
    c.assert_traces_agree("a", Host::Pod("client-a"), (Proto::Tcp, new_vip), &rs);
    let dispatch = c.nft("a", &["list", "map", "ip", "kubenft", "ip-c-dispatch"]);
    assert!(
        !dispatch.contains("10.96.0.61 . tcp . 80 : drop"),
        "the planted element is still there:\n{dispatch}"
    );
    let rs = c.probe(
        Host::Pod("client-a"),
        Proto::Tcp,
        old_vip,
        &ProbeOpts::count(6),
    );
    assert_all_ok(&rs, "old Service on node a");
    let applied = c.agent_call("a", "GetApplied").unwrap();
    assert_eq!(
        applied["lastError"].as_str().unwrap_or_default(),
        "",
        "the agent reports an error although the change was applied: {applied}"
    );
}

/// An `nft` for node a's agent (`KUBENFT_NFT`) that refuses, while the file `flag` exists,
/// every transaction whose script contains `marker`, as the kernel would ("Operation not
/// permitted", then the offending line); everything else is the real nft. It refuses `-i`,
/// so that every transaction comes through `nft -f -`, where it can read the whole script.
/// The real nft is `exec`ed: it keeps the PID the agent spawned, by which the agent's
/// `nft monitor` tells its own commits from other programs'.
fn refusing_nft(dir: &Path, flag: &Path, marker: &str) -> PathBuf {
    let path = dir.join("nft-refusing");
    let script = format!(
        r#"#!/bin/sh
for arg in "$@"; do
    [ "$arg" = -i ] && exit 1
done
if [ $# -eq 2 ] && [ "$1" = -f ] && [ "$2" = - ]; then
    tmp=$(mktemp "{dir}/nft-script.XXXXXX") || exit 1
    cat >"$tmp"
    if [ -e "{flag}" ] && grep -q -F -e "{marker}" "$tmp"; then
        echo "Error: Could not process rule: Operation not permitted" >&2
        grep -m 1 -F -e "{marker}" "$tmp" >&2
        rm -f "$tmp"
        exit 1
    fi
    exec <"$tmp"
    rm -f "$tmp"
    exec nft -f -
fi
exec nft "$@"
"#,
        dir = dir.display(),
        flag = flag.display(),
    );
    std::fs::write(&path, script).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    path
}

/// A change the kernel refuses every time: node a's agent runs its nft through a wrapper
/// ([`refusing_nft`]) that, while a flag file exists, refuses every transaction naming the new
/// Service's ClusterIP — the change itself, its retries and the full reconcile alike. The
/// controller shows node a NACKED with a short error (≤ 3 lines) that names the refusal, and
/// keeps sending the change again (`nackRetries` grows); node a keeps its last good state,
/// which serves the old Service throughout; node b serves the new one. Once the flag is
/// removed, the next retry applies the change.
///
/// (Another program squatting the name of the map our change needs no longer makes a
/// persistent refusal: the agent's structure check deletes such stale objects.)
#[test]
fn persistent_kernel_refusal_is_nacked_retried_and_the_last_good_state_keeps_serving() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    client(&lab, "client-a", "a");
    client(&lab, "client-b", "b");
    let flag = lab.dir().join("refuse");
    let nft = refusing_nft(lab.dir(), &flag, "10.96.0.63");
    let nft = nft.display().to_string();
    let c = Cluster::start_with_agent_env(lab, &[("a", &[("KUBENFT_NFT", nft.as_str())])]);
    write_web_service(&c, "old", "10.96.0.62", [&web[0]]);
    let (old_vip, new_vip) = (vip("10.96.0.62:80"), vip("10.96.0.63:80"));
    c.wait_answers(Host::Pod("client-a"), Proto::Tcp, old_vip, START);
    c.wait_synced(START);

    std::fs::write(&flag, "").unwrap_or_else(|e| panic!("creating {}: {e}", flag.display()));
    write_web_service(&c, "new", "10.96.0.63", &web);

    let to = (Host::Pod("client-a"), Proto::Tcp, old_vip);
    let every = (200, Duration::from_millis(50));
    let (results, last) = with_traffic(&c, to, &ProbeOpts::count(4), every, || {
        let mut last = Default::default();
        wait_until(START, Duration::from_millis(100), || {
            last = c.list_nodes()?;
            Ok::<_, String>(last.get("a").is_some_and(|a| {
                a["state"] == "NACKED" && a["nackRetries"].as_u64().unwrap_or(0) >= 2
            }))
        })
        .unwrap_or_else(|e| {
            panic!("node a not NACKED with ≥ 2 retries: {e}; last ListNodes: {last:#?}")
        });
        last
    });
    let a = &last["a"];
    eprintln!("node a: {a}");
    let err = a["lastNackError"].as_str().unwrap_or_default();
    assert!(
        !err.is_empty() && err.lines().count() <= 3,
        "the NACK's error should be nft's first lines (≤ 3): {err:?}"
    );
    assert!(
        err.contains("Operation not permitted") && err.contains("10.96.0.63"),
        "the NACK's error should name the refusal and the refused line: {err:?}"
    );
    let t = tally(&results);
    eprintln!(
        "{} connections to the old Service while NACKED: {t:?}",
        results.len()
    );
    assert_all_ok(
        &results,
        "old Service on node a while its change is refused",
    );
    assert!(results.len() >= 20, "too little traffic: {t:?}");
    // Node b took the change; on node a none of it is in force.
    c.wait_answers(Host::Pod("client-b"), Proto::Tcp, new_vip, START);
    let b = c.list_nodes().unwrap().remove("b").unwrap();
    assert_eq!(b["state"], "SYNCED", "{b}");
    let r = c.probe1(Host::Pod("client-a"), Proto::Tcp, new_vip, DROP_WAIT);
    assert!(
        !r.is_ok(),
        "part of the refused change is in force on node a: {r}"
    );
    // Node a's Trace is its applied (last good) state: the old Service as traffic saw it,
    // and the new one as not yet there.
    let from = Host::Pod("client-a");
    c.assert_trace_agrees("a", from, (Proto::Tcp, old_vip), &results);
    c.assert_trace_agrees("a", from, (Proto::Tcp, new_vip), &[r]);
    let applied = c.agent_call("a", "GetApplied").unwrap();
    assert!(
        applied["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("Operation not permitted")),
        "the agent should report its last error: {applied}"
    );

    // The refusal ends: the controller's next retry is applied.
    std::fs::remove_file(&flag).unwrap_or_else(|e| panic!("removing {}: {e}", flag.display()));
    c.wait_answers(
        Host::Pod("client-a"),
        Proto::Tcp,
        new_vip,
        Duration::from_secs(20),
    );
    c.wait_synced(START);
    let a = c.list_nodes().unwrap().remove("a").unwrap();
    assert_eq!(a["state"], "SYNCED", "{a}");
    let rs = c.probe(
        Host::Pod("client-a"),
        Proto::Tcp,
        old_vip,
        &ProbeOpts::count(6),
    );
    assert_all_ok(&rs, "old Service on node a after the change");
}

/// A corrupted state file: node a's agent is killed, its state file truncated to half, and
/// the agent started again, while new TCP connections to a ClusterIP keep going from a pod
/// on node a. The agent cannot adopt the file, so it reports nothing applied and reconciles
/// its tables in place: no connection fails, the table is the same object (same handle),
/// and the controller shows the node SYNCED again.
#[test]
fn a_corrupted_state_file_costs_a_reconcile_not_traffic() {
    let s = serving_web("10.96.0.48");
    let c = &s.c;
    let args = c.lab.agent_default_args("a").unwrap();
    let dir = &args[args.iter().position(|a| a == "--state-dir").unwrap() + 1];
    let file = std::path::Path::new(dir).join("applied.pb");
    let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(bytes.len() > 16, "state file too small: {bytes:?}");

    // Cut in half, and what is left ends in bytes no protobuf decoder takes.
    let mut corrupted = bytes[..bytes.len() / 2].to_vec();
    corrupted.extend([0xff; 8]);

    // Reconciled: the restarted agent reports the version it had (it started from nothing:
    // the controller sent it everything again).
    let (results, _) = restart_agent_a_under_traffic(&s, || {
        std::fs::write(&file, &corrupted).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    });
    let t = tally(&results);
    eprintln!(
        "{} connections around the restart with a corrupted state file: {t:?}",
        results.len()
    );
    assert_all_ok(&results, "new connections around the restart");
    assert!(results.len() >= 50, "too little traffic: {t:?}");
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, s.target), &results);
    let agent = c.agent("a");
    let logs = agent.logs();
    assert!(
        [
            "unreadable state file",
            "cannot adopt the state file",
            "state file does not match"
        ]
        .iter()
        .any(|m| logs.contains(m)),
        "the agent did not say it could not use its state file:\n{}",
        agent.log_tail(20)
    );
    assert_eq!(
        c.table_handle("a"),
        s.handle,
        "the agent recreated its table instead of reconciling it"
    );
    // Reconciled: the state file is whole again.
    let after = std::fs::read(&file).unwrap();
    assert_ne!(after, corrupted, "the state file was not rewritten");
    c.wait_answers(Host::Pod("client"), Proto::Tcp, s.target, CONVERGE);
}

/// The manifest directory renamed away for longer than the controller's rescan period while
/// TCP traffic flows: the controller keeps its last good view (an empty one would make every
/// agent delete every Service), every Service keeps answering, and `/readyz` says why the
/// controller is not ready. Put back, the directory is read again and a new change is served.
#[test]
fn manifest_directory_renamed_away_keeps_every_service() {
    use kubenft_lab::topology::{CONTROLLER_HTTP_PORT, CP_V4};
    let lab = Cluster::lab(&["a", "b"]);
    let web1 = pods(&lab, &[("web-1", "a")]).remove(0);
    let web2 = pods(&lab, &[("web-2", "b")]).remove(0);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    write_web_service(&c, "web", "10.96.0.48", [&web1]);
    write_web_service(&c, "db", "10.96.0.49", [&web2]);
    let targets = [
        (vip("10.96.0.48:80"), "web-1"),
        (vip("10.96.0.49:80"), "web-2"),
    ];
    for (target, _) in targets {
        c.wait_answers(Host::Pod("client"), Proto::Tcp, target, START);
    }
    c.wait_synced(START);
    let readyz = || {
        c.http_get(
            Host::ControlPlane,
            &format!("http://{CP_V4}:{CONTROLLER_HTTP_PORT}/readyz"),
        )
    };
    assert_eq!(readyz().0, 200, "{}", readyz().1);

    let dir = c.lab.manifest_dir().to_owned();
    let away = dir.with_file_name("manifests-away");
    std::fs::rename(&dir, &away).unwrap();
    let gone_at = Instant::now();
    eprintln!("manifest directory renamed away");
    // Two rescan periods (5 s each) and then some.
    let mut rounds = 0;
    while gone_at.elapsed() < Duration::from_secs(12) {
        let at = gone_at.elapsed();
        for (target, pod) in targets {
            let rs = c.probe(
                Host::Pod("client"),
                Proto::Tcp,
                target,
                &ProbeOpts::count(4),
            );
            let t = assert_all_ok(&rs, &format!("{target} with the directory away at {at:?}"));
            assert_eq!(t.keys().collect::<Vec<_>>(), vec![pod], "{t:?}");
            if rounds == 0 {
                c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &rs);
            }
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(rounds >= 4, "only {rounds} probe rounds");
    let (code, text) = readyz();
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("cannot read the directory"), "{text}");

    std::fs::rename(&away, &dir).unwrap();
    let back_at = Instant::now();
    write_web_service(&c, "late", "10.96.0.50", [&web2]);
    let took = c.wait_probe(
        "a Service added after the directory's return",
        Host::Pod("client"),
        Proto::Tcp,
        vip("10.96.0.50:80"),
        START,
        |r| r.server() == Some("web-2"),
    );
    eprintln!("change served {took:?} after the directory's return");
    wait_until(START, POLL, || Ok::<_, String>(readyz().0 == 200))
        .unwrap_or_else(|e| panic!("/readyz not 200 again: {e}: {}", readyz().1));
    for (target, pod) in targets {
        let rs = c.probe(
            Host::Pod("client"),
            Proto::Tcp,
            target,
            &ProbeOpts::count(4),
        );
        let t = assert_all_ok(&rs, &format!("{target} after the return"));
        assert_eq!(t.keys().collect::<Vec<_>>(), vec![pod], "{t:?}");
    }
    eprintln!("all served {:?} after the return", back_at.elapsed());
}

/// The `nft monitor` processes running in `ns`.
fn nft_monitors(ns: &str) -> Vec<u32> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"nft\0monitor"))
        })
        .collect()
}

/// An agent killed alone, as the OOM killer kills it (not its process group), leaves no
/// `nft monitor` behind: the kernel ends the monitor with its agent, so crashes do not pile
/// up monitors each holding a copy of the ruleset.
#[test]
fn a_killed_agent_leaves_no_nft_monitor_behind() {
    let c = Cluster::start(two_node_web("10.96.0.66"));
    c.wait_synced(START);
    let ns = c.lab.ns(Host::Node("a")).unwrap();
    wait_until(START, Duration::from_millis(100), || {
        Ok::<_, String>(nft_monitors(&ns).len() == 1)
    })
    .unwrap_or_else(|e| panic!("agent a runs no nft monitor: {e}"));
    let agent = c.agent("a");
    let pid = agent.pid().expect("agent a running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .is_ok_and(|s| s.success());
    assert!(killed, "kill -KILL {pid}");
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok::<_, String>(nft_monitors(&ns).is_empty())
    });
    let left = nft_monitors(&ns);
    // Reaped either way, so a failure leaves nothing running.
    agent.kill().unwrap();
    for p in &left {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status();
    }
    assert!(
        gone.is_ok(),
        "nft monitor outlived its agent: pids {left:?}"
    );
}
