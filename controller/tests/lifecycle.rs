//! The controller binary as a process: it keeps serving and still shuts down cleanly when its
//! log output goes nowhere (a container runtime that closed the pipe, `| head`), and its gRPC
//! port can queue a whole fleet's reconnections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The status line of `GET path`, or None if nothing answers.
fn http_status(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines().next().map(str::to_owned)
}

/// The backlog of the socket listening on `port`, as `ss` reports it.
fn listen_backlog(port: u16) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // State Recv-Q Send-Q Local-Address:Port Peer-Address:Port
    text.lines().next()?.split_whitespace().nth(2)?.parse().ok()
}

#[test]
fn the_controller_survives_a_closed_stderr_stops_on_sigterm_and_queues_a_fleet() {
    let dir = std::env::temp_dir().join(format!("kubenft-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    let (http, grpc) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubenft-controller"))
        .arg(format!("--source=dir:{}", dir.display()))
        .args(["--grpc-listen", &grpc.to_string()])
        .args(["--http-listen", &http.to_string()])
        .arg("--insecure")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody will ever read the log: every line the controller writes fails with EPIPE.
    drop(child.stderr.take());

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = None;
    while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        ready = http_status(http, "/readyz");
        if ready.as_deref().is_some_and(|l| l.contains(" 200 ")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let backlog = listen_backlog(grpc.port());
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
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(
        exited_early, None,
        "the controller died while logging to a closed pipe"
    );
    // `ss` shows a listening socket's backlog as its Send-Q. With the standard library's 128,
    // 1,000 agents reconnecting at once overflowed into SYN cookies and retransmissions.
    assert!(
        backlog.is_some_and(|b| b >= 1024),
        "gRPC listen backlog {backlog:?}"
    );
    assert!(
        ready.as_deref().is_some_and(|l| l.contains(" 200 ")),
        "never ready: {ready:?}"
    );
    assert!(stopped.success());
    let status = status.expect("SIGTERM did not stop the controller within 10 s");
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

/// Plaintext only when asked for: without the TLS files and without `--insecure` the binary
/// exits non-zero at once, naming the flags (also under `--check-config`); so does a
/// half-given TLS configuration, and `--insecure` together with TLS files.
#[test]
fn the_controller_refuses_to_start_without_tls_or_insecure() {
    for (args, wanted) in [
        (&[][..], "--insecure"),
        (&["--check-config"][..], "--insecure"),
        (
            &["--tls-cert-file", "/nonexistent.crt"][..],
            "--client-ca-file",
        ),
        (
            &[
                "--insecure",
                "--tls-cert-file",
                "c",
                "--tls-private-key-file",
                "k",
                "--client-ca-file",
                "ca",
            ][..],
            "--insecure cannot",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kubenft-controller"))
            .args([
                "--source",
                "dir:/nonexistent",
                "--grpc-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started: {err}");
        assert!(err.contains(wanted), "{args:?}: {err}");
        for flag in [
            "--tls-cert-file",
            "--tls-private-key-file",
            "--client-ca-file",
        ] {
            assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
        }
    }
}

/// Unreadable TLS files stop the start with the file's name.
#[test]
fn the_controller_refuses_unreadable_tls_files() {
    let out = Command::new(env!("CARGO_BIN_EXE_kubenft-controller"))
        .args([
            "--source",
            "dir:/nonexistent",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--tls-cert-file", "/nonexistent/c.crt"])
        .args(["--tls-private-key-file", "/nonexistent/c.key"])
        .args(["--client-ca-file", "/nonexistent/ca.crt"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("/nonexistent/c.crt"), "{err}");
}
