//! Mutual TLS and node identity (docs/contract.md §3), with real certificates, the real binaries,
//! grpcurl and `openssl s_client`: impostors and clients without a valid certificate are
//! refused before anything is sent, and never disturb the real agent of the node; rotated
//! certificates are used by new handshakes without dropping a stream or re-applying rules.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use kubenft_lab::pki::{self, CertFiles, Pki, Usage};
use kubenft_lab::topology::{AGENT_GRPC_PORT, CONTROLLER_GRPC_PORT, CONTROLLER_HTTP_PORT, CP_V4};
use kubenft_lab::{Host, ProbeOpts, Process, Proto, wait_until};

fn controller_addr() -> String {
    format!("{CP_V4}:{CONTROLLER_GRPC_PORT}")
}

/// The controller's `/metrics`.
fn controller_metrics(c: &Cluster) -> String {
    c.http_get(
        Host::ControlPlane,
        &format!("http://{CP_V4}:{CONTROLLER_HTTP_PORT}/metrics"),
    )
    .1
}

/// `kubenft_controller_stream_refused_total{reason="…"}` (0 when absent).
fn refused(c: &Cluster, reason: &str) -> u64 {
    metric(
        &controller_metrics(c),
        &format!("kubenft_controller_stream_refused_total{{reason=\"{reason}\"}}"),
    )
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// An extra agent process in `host`'s namespace that must never touch the real agent's
/// state, ports or tables: its own state directory, ports and table name.
fn extra_agent(c: &Cluster, name: &str, host_node: &str, args: &[String]) -> Process {
    let bin = c.lab.binary("kubenft-agent").unwrap().display().to_string();
    let state = c.lab.dir().join(format!("state-{name}"));
    std::fs::create_dir_all(&state).unwrap();
    let mut argv = vec![
        bin,
        "--state-dir".into(),
        state.display().to_string(),
        "--table-name".into(),
        "impostor".into(),
        "--healthz-listen".into(),
        "127.0.0.1:20256".into(),
        "--metrics-listen".into(),
        "127.0.0.1:20249".into(),
        "--grpc-listen".into(),
        "127.0.0.1:20652".into(),
    ];
    argv.extend(args.iter().cloned());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    c.lab.spawn(name, Host::Node(host_node), &argv).unwrap()
}

/// Waits until `p`'s stderr has a line containing every one of `words`; returns the line.
fn wait_log_line(p: &Process, words: &[&str], cap: Duration) -> String {
    let mut found = String::new();
    wait_until(cap, POLL, || {
        found = stderr_of(p)
            .lines()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .unwrap_or_default()
            .to_string();
        Ok::<_, String>(!found.is_empty())
    })
    .unwrap_or_else(|e| {
        panic!(
            "no log line with {words:?} in {}: {e}\n{}",
            p.name(),
            p.log_tail(30)
        )
    });
    found
}

/// The fields of a node's ListNodes entry that an impostor must not disturb.
fn status_of(c: &Cluster, node: &str) -> (bool, String, String, String) {
    let nodes = c.list_nodes().unwrap();
    let s = &nodes[node];
    (
        s["connected"].as_bool().unwrap_or(false),
        s["state"].to_string(),
        s["ackedVersion"].to_string(),
        s["agentAddresses"].to_string(),
    )
}

/// A cluster of `nodes` with pods `web` (name, node) behind Service web at 10.96.0.70:80,
/// answering a client pod on `client_node`, every node SYNCED.
fn serving(nodes: &[&str], web: &[(&str, &str)], client_node: &str) -> Cluster {
    let lab = Cluster::lab(nodes);
    let backends = pods(&lab, web);
    client(&lab, "client", client_node);
    let c = Cluster::start(lab);
    write_web_service(&c, "web", "10.96.0.70", &backends);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, vip("10.96.0.70:80"), START);
    c.wait_synced(START);
    c
}

/// An extra agent's arguments: `--node-name node --controller url`.
fn extra_args(node: &str, url: String) -> Vec<String> {
    vec![
        "--node-name".to_string(),
        node.into(),
        "--controller".into(),
        url,
    ]
}

/// `kubenft_agent_controller_connected` of the [`extra_agent`] in node a (its metrics port),
/// and the whole metrics text.
fn extra_agent_connected(c: &Cluster) -> (u64, String) {
    let metrics = c
        .lab
        .exec_ok(
            Host::Node("a"),
            &["curl", "-s", "http://127.0.0.1:20249/metrics"],
        )
        .unwrap();
    (
        metric(&metrics, "kubenft_agent_controller_connected"),
        metrics,
    )
}

#[test]
fn node_a_certificate_cannot_open_node_b_stream_and_b_is_undisturbed() {
    let c = serving(&["a", "b"], &[("web-1", "a"), ("web-2", "b")], "b");
    let b_before = status_of(&c, "b");
    let a_before = status_of(&c, "a");
    assert!(b_before.0 && a_before.0, "{b_before:?} {a_before:?}");

    // By hand: node a's certificate, a Hello for node b. Refused, and not one message sent.
    let tls = c.lab.tls();
    let node_a = &tls.nodes["a"];
    let (ca, cert, key) = (
        tls.pki.ca().display().to_string(),
        node_a.cert.display().to_string(),
        node_a.key.display().to_string(),
    );
    let addr = controller_addr();
    let (ok, out, err) = c.grpcurl_raw(
        Host::Node("a"),
        &[
            "-cacert",
            &ca,
            "-cert",
            &cert,
            "-key",
            &key,
            "-d",
            r#"{"hello":{"nodeName":"b"}}"#,
            &addr,
            "kubenft.v1.RuleStream/Stream",
        ],
    );
    assert!(!ok, "the stream was opened: {out}");
    assert!(
        out.trim().is_empty(),
        "something was sent to the impostor: {out}"
    );
    assert!(err.contains("PermissionDenied"), "{err}");

    // The real agent binary as an impostor: node a's files, `--node-name b`.
    let mut args = extra_args("b", format!("https://{addr}"));
    args.extend(tls.agent_args(node_a));
    let impostor = extra_agent(&c, "impostor", "a", &args);
    let line = wait_log_line(
        &c.controller,
        &[
            "does not name this node",
            "system:node:a",
            "node=b",
            "192.168.50.11",
        ],
        START,
    );
    eprintln!("controller: {line}");
    // It keeps trying, and is refused each time, while b keeps its stream.
    wait_until(START, POLL, || {
        Ok::<_, String>(
            stderr_of(&c.controller)
                .matches("does not name this node")
                .count()
                >= 3,
        )
    })
    .unwrap();
    assert!(refused(&c, "wrong_node") >= 3, "{}", controller_metrics(&c));
    let line = wait_log_line(
        &impostor,
        &["cannot reach a controller", "does not name node"],
        START,
    );
    eprintln!("impostor: {line}");
    let (connected, metrics) = extra_agent_connected(&c);
    assert_eq!(connected, 0, "{metrics}");
    let tables = c.nft("a", &["list", "tables"]);
    assert!(
        !tables.contains("impostor"),
        "the impostor applied something: {tables}"
    );
    assert_eq!(
        status_of(&c, "b"),
        b_before,
        "node b's real agent was disturbed"
    );
    assert_eq!(status_of(&c, "a"), a_before);
    assert!(
        !stderr_of(c.agent("b")).contains("lost the controller stream"),
        "{}",
        c.agent("b").log_tail(20)
    );
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        vip("10.96.0.70:80"),
        &ProbeOpts::count(6),
    );
    assert_all_ok(&rs, "traffic during the impostor's attempts");
    let flow = (Proto::Tcp, vip("10.96.0.70:80"));
    c.assert_traces_agree("b", Host::Pod("client"), flow, &rs);
    impostor.stop().unwrap();
}

#[test]
fn connections_without_a_valid_certificate_are_refused_with_the_reason() {
    let c = serving(&["a"], &[("web-1", "a")], "a");
    let a_before = status_of(&c, "a");

    let tls = c.lab.tls();
    let other = Pki::new(&c.lab.dir().join("other-ca"), "other-ca").unwrap();
    let foreign = other.issue_node("node-a", "a", &[]).unwrap();
    let expired = tls
        .pki
        .issue("expired-a", "system:node:a", &[], Usage::Both, -1)
        .unwrap();
    let ca = tls.pki.ca().display().to_string();
    let addr = controller_addr();
    let with_cert = |f: &CertFiles| {
        vec![
            "-cacert".to_string(),
            ca.clone(),
            "-cert".into(),
            f.cert.display().to_string(),
            "-key".into(),
            f.key.display().to_string(),
        ]
    };
    let cases: Vec<(&str, Vec<String>, Option<&str>)> = vec![
        ("no_certificate", vec!["-cacert".into(), ca.clone()], None),
        ("unknown_ca", with_cert(&foreign), Some("system:node:a")),
        ("expired", with_cert(&expired), Some("system:node:a")),
        ("not_tls", vec!["-plaintext".into()], None),
    ];
    for (reason, mut args, cn) in cases {
        let before = refused(&c, reason);
        args.extend([
            addr.clone(),
            "kubenft.v1.ControllerInspect/ListNodes".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out, err) = c.grpcurl_raw(Host::ControlPlane, &args);
        assert!(!ok, "{reason}: answered: {out}");
        assert!(out.trim().is_empty(), "{reason}: {out}");
        eprintln!("{reason}: grpcurl says {}", err.trim());
        let mut words = vec!["TLS handshake failed", reason, "peer=192.168.50.2:"];
        if let Some(cn) = cn {
            words.push(cn);
        }
        let line = wait_log_line(&c.controller, &words, CONVERGE);
        eprintln!("{reason}: controller says {line}");
        wait_until(CONVERGE, POLL, || {
            Ok::<_, String>(refused(&c, reason) > before)
        })
        .unwrap_or_else(|e| panic!("{reason} not counted: {e}\n{}", controller_metrics(&c)));
    }

    // The real agent binary with a certificate from another CA: it never connects, says why,
    // and node a's real agent keeps its stream.
    let mut args = extra_args("a", format!("https://{addr}"));
    args.extend(tls.agent_args(&foreign));
    let foreign_agent = extra_agent(&c, "foreign", "a", &args);
    let line = wait_log_line(&foreign_agent, &["cannot reach a controller"], START);
    eprintln!("foreign agent: {line}");
    wait_log_line(
        &c.controller,
        &["unknown_ca", "system:node:a", "192.168.50.11"],
        START,
    );
    foreign_agent.stop().unwrap();
    assert_eq!(
        status_of(&c, "a"),
        a_before,
        "node a's real agent was disturbed"
    );
    assert_eq!(
        stderr_of(&c.controller).matches("agent connected").count(),
        1,
        "{}",
        c.controller.log_tail(30)
    );
}

#[test]
fn plaintext_and_tls_never_mix() {
    let lab = Cluster::lab(&["a"]);
    let c = Cluster::start(lab);
    c.wait_synced(START);
    let addr = controller_addr();

    // http:// (with --insecure) to the TLS controller: refused as not TLS, never connected.
    let mut args = extra_args("a", format!("http://{addr}"));
    args.push("--insecure".into());
    let plain = extra_agent(&c, "plain", "a", &args);
    let line = wait_log_line(&plain, &["cannot reach a controller"], START);
    eprintln!("http:// agent: {line}");
    wait_log_line(&c.controller, &["not_tls", "192.168.50.11"], START);
    plain.stop().unwrap();

    // https:// to a plaintext controller: the handshake fails, the agent says so and never
    // connects (it does not fall back to plaintext).
    let bin = c
        .lab
        .binary("kubenft-controller")
        .unwrap()
        .display()
        .to_string();
    let mut argv = vec![bin];
    argv.extend(c.lab.controller_args_without_tls());
    for a in argv.iter_mut() {
        *a = a
            .replace(&format!(":{CONTROLLER_GRPC_PORT}"), ":9660")
            .replace(&format!(":{CONTROLLER_HTTP_PORT}"), ":9661");
    }
    argv.push("--insecure".into());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let insecure = c
        .lab
        .spawn("insecure-controller", Host::ControlPlane, &argv)
        .unwrap();
    let insecure_addr = format!("{CP_V4}:9660");
    wait_until(START, POLL, || {
        Ok::<_, String>(
            c.grpcurl_raw(Host::ControlPlane, &["-plaintext", &insecure_addr, "list"])
                .0,
        )
    })
    .unwrap_or_else(|e| panic!("the plaintext controller does not serve: {e}"));
    let mut args = extra_args("a", format!("https://{CP_V4}:9660"));
    args.extend(c.lab.tls().agent_args(&c.lab.tls().nodes["a"]));
    let tls_agent = extra_agent(&c, "tls-to-plain", "a", &args);
    let line = wait_log_line(&tls_agent, &["cannot reach a controller"], START);
    eprintln!("https:// agent: {line}");
    assert!(
        line.to_lowercase().contains("tls")
            || line.contains("InvalidContentType")
            || line.contains("corrupt"),
        "the agent should say the TLS handshake failed: {line}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !stderr_of(&insecure).contains("agent connected"),
        "{}",
        insecure.log_tail(20)
    );
    let (connected, metrics) = extra_agent_connected(&c);
    assert_eq!(connected, 0, "{metrics}");
    tls_agent.stop().unwrap();
    insecure.stop().unwrap();
}

/// The SHA-256 fingerprint of the certificate a TLS server at `addr` presents now, seen from
/// `host` with `openssl s_client` (with the operator's client certificate).
fn served_fingerprint(c: &Cluster, host: Host<'_>, addr: &str) -> String {
    let tls = c.lab.tls();
    let script = format!(
        "openssl s_client -connect {addr} -CAfile {} -cert {} -key {} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256",
        tls.pki.ca().display(),
        tls.operator.cert.display(),
        tls.operator.key.display()
    );
    c.lab
        .exec_ok(host, &["sh", "-c", &script])
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn fingerprint(f: &CertFiles) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&f.cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn serial(f: &CertFiles) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&f.cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_string()
}

#[test]
fn rotated_certificates_are_used_by_new_handshakes_without_dropping_or_reapplying() {
    let c = serving(&["a"], &[("web-1", "a")], "a");
    let tls = c.lab.tls();
    let applied_before = c.agent_call("a", "GetApplied").unwrap();
    let agent_metrics = || {
        c.lab
            .exec_ok(
                Host::Node("a"),
                &["curl", "-s", "http://127.0.0.1:10249/metrics"],
            )
            .unwrap()
    };
    let generation = || c.nft("a", &["list", "set", "ip", "kubenft", "generation"]);
    let generation_before = generation();
    let changes_before = metric(
        &agent_metrics(),
        "kubenft_agent_changes_total{result=\"ack\"}",
    );
    let controller_addr = controller_addr();
    let agent_addr = format!("127.0.0.1:{AGENT_GRPC_PORT}");
    let old_controller = fingerprint(&tls.controller);
    let old_agent = fingerprint(&tls.nodes["a"]);
    assert_eq!(
        served_fingerprint(&c, Host::ControlPlane, &controller_addr),
        old_controller
    );
    assert_eq!(
        served_fingerprint(&c, Host::Node("a"), &agent_addr),
        old_agent
    );

    // Continuous traffic meanwhile: Service connections, and new gRPC connections (a
    // handshake each) to the controller and to the agent.
    let stop = AtomicBool::new(false);
    let (failures, calls) = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let mut failed = Vec::new();
            let mut calls = 0;
            // Bounded in rounds and time even if the rotation never ends the loop.
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed)
                && calls < 2_000
                && std::time::Instant::now() < deadline
            {
                let rs = c.probe(
                    Host::Pod("client"),
                    Proto::Tcp,
                    vip("10.96.0.70:80"),
                    &ProbeOpts::count(4).timeout(Duration::from_secs(1)),
                );
                failed.extend(rs.iter().filter(|r| !r.is_ok()).map(|r| r.to_string()));
                if let Err(e) = c.list_nodes() {
                    failed.push(e);
                }
                if let Err(e) = c.agent_call("a", "GetApplied") {
                    failed.push(e);
                }
                calls += 1;
            }
            (failed, calls)
        });

        // The controller's serving certificate.
        let new = tls
            .pki
            .issue(
                "controller-2",
                "kubenft-controller",
                &[format!("IP:{CP_V4}"), "DNS:kubenft-controller".into()],
                Usage::Server,
                30,
            )
            .unwrap();
        pki::install(&new, &tls.controller).unwrap();
        let want = fingerprint(&new);
        assert_ne!(want, old_controller);
        wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
            Ok::<_, String>(served_fingerprint(&c, Host::ControlPlane, &controller_addr) == want)
        })
        .unwrap_or_else(|e| {
            panic!(
                "the controller still serves the old certificate: {e}\n{}",
                c.controller.log_tail(20)
            )
        });
        wait_log_line(&c.controller, &["TLS files changed"], CONVERGE);

        // The agent's certificate: its inspection port serves it at once, and the controller
        // stream stays as it is (the next connection will use it).
        let new_agent = tls.pki.issue_node("node-a-2", "a", &[]).unwrap();
        pki::install(&new_agent, &tls.nodes["a"]).unwrap();
        let want = fingerprint(&new_agent);
        wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
            Ok::<_, String>(served_fingerprint(&c, Host::Node("a"), &agent_addr) == want)
        })
        .unwrap_or_else(|e| {
            panic!(
                "the agent still serves the old certificate: {e}\n{}",
                c.agent("a").log_tail(20)
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        traffic.join().unwrap()
    });
    assert!(calls >= 3, "too little traffic: {calls} rounds");
    assert!(
        failures.is_empty(),
        "failures during rotation: {failures:?}"
    );
    // Nothing dropped, nothing re-applied.
    let log = stderr_of(&c.controller);
    assert_eq!(
        log.matches("agent connected").count(),
        1,
        "{}",
        c.controller.log_tail(30)
    );
    assert!(
        !log.contains("agent stream closed"),
        "{}",
        c.controller.log_tail(30)
    );
    assert!(!stderr_of(c.agent("a")).contains("lost the controller stream"));
    let applied_after = c.agent_call("a", "GetApplied").unwrap();
    assert_eq!(
        applied_after["systemVersion"],
        applied_before["systemVersion"]
    );
    assert_eq!(
        applied_after["lastAppliedUnixMs"],
        applied_before["lastAppliedUnixMs"]
    );
    assert_eq!(
        metric(
            &agent_metrics(),
            "kubenft_agent_changes_total{result=\"ack\"}"
        ),
        changes_before
    );
    assert_eq!(generation(), generation_before, "rules were re-applied");

    // The agent's next connection presents the new certificate (and still re-applies
    // nothing): its stream is cut from outside, it reconnects.
    let new_serial = serial(&tls.nodes["a"]);
    let killed = c.lab.exec(
        Host::Node("a"),
        &[
            "ss",
            "-K",
            "dst",
            &CP_V4.to_string(),
            "dport",
            "=",
            &CONTROLLER_GRPC_PORT.to_string(),
        ],
    );
    assert!(killed.is_ok_and(|o| o.status.success()), "ss -K");
    let line = wait_log_line(&c.controller, &["stream authenticated", &new_serial], START);
    eprintln!("after reconnecting: {line}");
    c.wait_synced(START);
    // Reconnecting is confirmed by an empty change; nothing is applied again.
    assert_eq!(generation(), generation_before, "rules were re-applied");
    // Both Trace RPCs answer over the rotated certificates, as traffic goes.
    let flow = (Proto::Tcp, vip("10.96.0.70:80"));
    let rs = all_ok(&c, Host::Pod("client"), flow.1, 4);
    c.assert_traces_agree("a", Host::Pod("client"), flow, &rs);
}
