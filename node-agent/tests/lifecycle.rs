//! The agent binary as a process: it keeps running and still shuts down cleanly when its log
//! output goes nowhere (a container runtime that closed the pipe, `| head`), and it runs when
//! its state directory is unusable.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Netns, TempDir, require_root};

const METRICS: &str = "127.0.0.1:10249";

#[test]
fn a_closed_stderr_neither_stops_the_agent_nor_its_shutdown() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    assert!(ns.exec(&["ip", "link", "set", "lo", "up"]).0);
    let state = TempDir::new();
    // `ip netns exec` execs the agent, so the child is the agent itself.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_kubenft-agent")])
        .args([
            "--node-name",
            "n1",
            "--controller",
            "http://127.0.0.1:9",
            "--insecure",
        ])
        .args([
            "--healthz-listen",
            "127.0.0.1:10256",
            "--metrics-listen",
            METRICS,
        ])
        .args(["--state-dir", state.0.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody will ever read the log: every line the agent writes fails with EPIPE. The agent
    // logs each failed attempt to reach its (absent) controller.
    drop(child.stderr.take());

    let url = format!("http://{METRICS}/metrics");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = String::new();
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        let (_, code, _) = ns.exec(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &url]);
        answered = code;
        if answered == "200" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Long enough for several reconnection attempts, each logged.
    std::thread::sleep(Duration::from_secs(2));
    let exited_early = child.try_wait().unwrap();
    let stopped = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = None;
    while Instant::now() < deadline {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }

    assert_eq!(
        exited_early, None,
        "the agent died while logging to a closed pipe"
    );
    assert_eq!(answered, "200", "/metrics never answered");
    assert!(stopped.success());
    let status = status.expect("SIGTERM did not stop the agent within 10 s");
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

/// A state directory that cannot exist (below a regular file): no lock, no state file, but
/// the agent runs and serves as the node's only agent, and says why in its log.
#[test]
fn an_unusable_state_dir_does_not_stop_the_agent() {
    if !require_root() {
        return;
    }
    let ns = Netns::new();
    assert!(ns.exec(&["ip", "link", "set", "lo", "up"]).0);
    let dir = TempDir::new();
    let blocker = dir.0.join("blocker");
    std::fs::write(&blocker, b"").unwrap();
    let log = dir.0.join("agent.log");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_kubenft-agent")])
        .args([
            "--node-name",
            "n1",
            "--controller",
            "http://127.0.0.1:9",
            "--insecure",
        ])
        .args([
            "--healthz-listen",
            "127.0.0.1:10256",
            "--metrics-listen",
            METRICS,
        ])
        .args(["--state-dir", blocker.join("state").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let url = format!("http://{METRICS}/metrics");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = String::new();
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        let (_, code, _) = ns.exec(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &url]);
        answered = code;
        if answered == "200" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, healthz, _) = ns.exec(&["curl", "-s", "http://127.0.0.1:10256/healthz"]);
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(running, "the agent exited:\n{logs}");
    assert_eq!(answered, "200", "/metrics never answered:\n{logs}");
    assert!(healthz.contains(r#""healthy":true"#), "{healthz}");
    assert!(!healthz.contains("standby"), "{healthz}");
    assert!(logs.contains("running without it"), "{logs}");
    assert!(logs.contains("unreadable state file"), "{logs}");
}

/// Plaintext only when asked for: without the TLS files and without `--insecure` the agent
/// exits non-zero at once naming the flags; an https:// URL never falls back to plaintext,
/// and an http:// URL with TLS configured is refused too.
#[test]
fn the_agent_refuses_to_start_without_tls_or_insecure() {
    let tls = [
        "--tls-cert-file",
        "/nonexistent/n.crt",
        "--tls-private-key-file",
        "/nonexistent/n.key",
        "--controller-ca-file",
        "/nonexistent/ca.crt",
    ];
    let with_tls = |extra: &[&'static str]| {
        let mut a = tls.to_vec();
        a.extend_from_slice(extra);
        a
    };
    for (args, wanted) in [
        (vec!["--controller", "https://127.0.0.1:9"], "--insecure"),
        (
            vec!["--controller", "https://127.0.0.1:9", "--insecure"],
            "never falls back",
        ),
        (
            with_tls(&["--controller", "http://127.0.0.1:9"]),
            "must be https://",
        ),
        (
            with_tls(&["--controller", "https://127.0.0.1:9", "--insecure"]),
            "--insecure cannot",
        ),
        // Well-formed, but the files do not exist: named at start.
        (
            with_tls(&["--controller", "https://127.0.0.1:9"]),
            "/nonexistent/n.crt",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kubenft-agent"))
            .args(["--node-name", "n1", "--state-dir", "/nonexistent/state"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started: {err}");
        assert!(err.contains(wanted), "{args:?}: {err}");
    }
}
