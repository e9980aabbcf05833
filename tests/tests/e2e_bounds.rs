//! Bounded resources (issue #12) against the real binaries with TLS: 2,000 idle connections,
//! garbage, 100 MB messages and slowloris clients against each of the agent's ports and the
//! controller's gRPC port; inspection calls whose answers are never read; a client that goes
//! silent. Each asserts the process's descriptors (`/proc/PID/fd`) and resident memory
//! (`/proc/PID/status`) stay under the bounds below and come back down, the refusals are
//! counted, and the real agent keeps its stream and applies its next change.
//!
//! The hostile clients are `kubenft-flood` processes inside the lab's namespaces.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kubenft_lab::flood::{CallReport, ConnReport, HeldReport, IdleReport, reports, wait_report};
use kubenft_lab::topology::{
    AGENT_GRPC_PORT, CONTROLLER_GRPC_PORT, CONTROLLER_HTTP_PORT, CP_V4, EXT_V4,
};
use kubenft_lab::{Host, Process, Proto, Service, wait_until};

/// The agent's ports in the lab: (metric label, address inside node a's namespace).
const AGENT_PORTS: [(&str, &str); 3] = [
    ("grpc", "127.0.0.1:9652"),
    ("healthz", "127.0.0.1:10256"),
    ("metrics", "127.0.0.1:10249"),
];
/// Connections each agent port holds at once (`node-agent/src/inspect.rs`, `http.rs`).
const AGENT_PORT_CONNECTIONS: usize = 32;
/// Connections the controller's HTTP port holds at once (`controller/src/http.rs`).
const CONTROLLER_HTTP_CONNECTIONS: usize = 64;
/// The gRPC handshake timeout and the HTTP header read timeout, as built.
const HANDSHAKE: Duration = Duration::from_secs(10);
const HEADERS: Duration = Duration::from_secs(5);
/// How late past its timeout a connection may be seen closed (the flood polls every 50 ms; a
/// loaded machine is slower).
const SLACK: Duration = Duration::from_secs(3);
/// The resident memory bounds (debug builds; about 26 MiB for the agent and 29 MiB for the
/// controller before a flood here): a 100 MB message read into memory would pass the peaks.
const AGENT_PEAK_KB: u64 = 48 * 1024;
const CONTROLLER_PEAK_KB: u64 = 64 * 1024;
/// How much resident memory a flood may leave behind (freed memory stays with the allocator
/// for reuse). A silent TLS connection costs the controller about 5 KB while it is open; the
/// 19 KB rustls session cache each handshake used to allocate up front would pass 16 MiB.
const AGENT_GROWTH_KB: u64 = 8 * 1024;
const CONTROLLER_GROWTH_KB: u64 = 16 * 1024;
/// Descriptors a process may hold beyond what it held before a flood once the flood is over
/// (a log file reopened, a connection to the controller re-established, an nft call).
const FD_SLACK: usize = 8;

/// What `/proc` says of a process.
#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    rss_kb: u64,
    peak_kb: u64,
}

fn usage(p: &Process) -> Usage {
    let pid = p.pid().expect("process running");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("{}: {e}", p.name()))
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    };
    Usage {
        fds,
        rss_kb: kb("VmRSS:"),
        peak_kb: kb("VmHWM:"),
    }
}

/// The most descriptors and memory seen in `samples` looks `every` apart.
fn busiest(p: &Process, samples: usize, every: Duration) -> Usage {
    let mut max = usage(p);
    for _ in 1..samples {
        std::thread::sleep(every);
        let u = usage(p);
        max.fds = max.fds.max(u.fds);
        max.rss_kb = max.rss_kb.max(u.rss_kb);
        max.peak_kb = max.peak_kb.max(u.peak_kb);
    }
    max
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn agent_metrics(c: &Cluster) -> String {
    let (code, text) = c.http_get(Host::Node("a"), "http://127.0.0.1:10249/metrics");
    assert_eq!(code, 200, "{text}");
    text
}

fn agent_refused(text: &str, port: &str, reason: &str) -> u64 {
    metric(
        text,
        &format!("kubenft_agent_connections_refused_total{{port=\"{port}\",reason=\"{reason}\"}}"),
    )
}

fn controller_refused(c: &Cluster, reason: &str) -> u64 {
    let (_, text) = c.http_get(Host::ControlPlane, &format!("http://{CP_V4}:9651/metrics"));
    metric(
        &text,
        &format!("kubenft_controller_stream_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// A one-node cluster with a web Service reached from a client pod.
fn cluster() -> (Cluster, Vec<kubenft_lab::Pod>) {
    cluster_with(&[])
}

fn cluster_with(controller_env: &[(&str, &str)]) -> (Cluster, Vec<kubenft_lab::Pod>) {
    let lab = Cluster::lab(&["a"]);
    let backends = pods(&lab, &[("web-1", "a")]);
    client(&lab, "client", "a");
    let c = Cluster::start_with_controller_env(lab, controller_env);
    write_web_service(&c, "web", "10.96.0.80", &backends);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, vip("10.96.0.80:80"), START);
    c.wait_synced(START);
    (c, backends)
}

/// The real agent's next change applies: a new Service written to the controller's
/// manifests answers from the client pod.
fn next_change_applies(c: &Cluster, name: &str, vip_addr: &str, backends: &[kubenft_lab::Pod]) {
    write_web_service(c, name, vip_addr, backends);
    c.wait_answers(
        Host::Pod("client"),
        Proto::Tcp,
        vip(&format!("{vip_addr}:80")),
        START,
    );
}

/// What a flood may leave a process with: a peak of resident memory, and how much more
/// resident memory than before it may keep.
#[derive(Debug, Clone, Copy)]
struct Bound {
    who: &'static str,
    peak_kb: u64,
    growth_kb: u64,
}

const AGENT: Bound = Bound {
    who: "agent",
    peak_kb: AGENT_PEAK_KB,
    growth_kb: AGENT_GROWTH_KB,
};
const CONTROLLER: Bound = Bound {
    who: "controller",
    peak_kb: CONTROLLER_PEAK_KB,
    growth_kb: CONTROLLER_GROWTH_KB,
};

/// During a flood `p` held at most `extra` descriptors more than `before` (and
/// [`FD_SLACK`]).
#[track_caller]
fn assert_fds_during(bound: Bound, before: Usage, during: Usage, extra: usize) {
    assert!(
        during.fds <= before.fds + extra + FD_SLACK,
        "{}: descriptors during: {during:?} (before: {before:?})",
        bound.who
    );
}

/// Once a flood is over (and half a second more), `p`'s descriptors and resident memory are
/// back near `before` and its peak stayed under `bound`; returns its usage then.
#[track_caller]
fn assert_back_down(p: &Process, bound: Bound, before: Usage, during: Usage) -> Usage {
    std::thread::sleep(Duration::from_millis(500));
    let after = usage(p);
    let who = bound.who;
    eprintln!("{who} before {before:?}, during {during:?}, after {after:?}");
    assert!(
        after.fds <= before.fds + FD_SLACK,
        "{who}: descriptors after: {after:?} (before: {before:?})"
    );
    assert!(after.peak_kb <= bound.peak_kb, "{who}: {after:?}");
    assert!(
        after.rss_kb <= before.rss_kb + bound.growth_kb,
        "{who}: {after:?} (before {before:?})"
    );
    after
}

/// Starts `kubenft-flood idle` named `name` in `host`: 2,000 connections to `to`, held at
/// most `cap_ms`; waits until all are open.
fn idle_flood(c: &Cluster, name: &str, host: Host<'_>, to: &str, cap_ms: &str) -> Process {
    let args = ["idle", "--to", to, "--count", "2000", "--cap-ms", cap_ms];
    let p = c
        .lab
        .spawn_flood(name, host, &args)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let open: IdleReport = wait_report(&p, START * 2, |r: &IdleReport| r.phase == "open")
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!((open.opened, open.failed), (2000, 0), "{name}: {open:?}");
    p
}

/// Waits (≤ `cap`) until an [`idle_flood`] is done: none of its connections is still open,
/// and none was held past `timeout` (and [`SLACK`]).
fn idle_done(what: &str, p: &Process, cap: Duration, timeout: Duration) -> IdleReport {
    let done: IdleReport = wait_report(p, cap, |r: &IdleReport| r.phase == "done")
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: {done:?}");
    assert_eq!(done.still_open, 0, "{what}: {done:?}");
    assert!(
        Duration::from_millis(done.longest_ms) <= timeout + SLACK,
        "{what}: held past its {timeout:?} timeout: {done:?}"
    );
    done
}

/// The hostile HTTP clients against `to` from `host`, all at once: garbage, a slowloris
/// client, a 100 MB body and a 100 MB header; each named `<port> <what>`.
fn http_hostile(c: &Cluster, host: Host<'_>, port: &str, to: &str) -> Vec<(String, Process)> {
    let spawn = |name: String, args: &[&str]| {
        let p = c
            .lab
            .spawn_flood(&name, host, args)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        (name, p)
    };
    let mut runs = vec![
        spawn(format!("garbage-{port}"), &["garbage", "--to", to]),
        spawn(
            format!("slow-{port}"),
            &["slowloris", "--to", to, "--kind", "http"],
        ),
    ];
    for what in ["body", "headers"] {
        let args = [
            "http-big",
            "--to",
            to,
            "--what",
            what,
            "--bytes",
            "104857600",
        ];
        runs.push(spawn(format!("big-{what}-{port}"), &args));
    }
    let labels = ["garbage", "slowloris", "100 MB body", "100 MB headers"];
    runs.into_iter()
        .zip(labels)
        .map(|((_, p), what)| (format!("{port} {what}"), p))
        .collect()
}

/// What an HTTP port does with one of [`http_hostile`]'s clients (named by `what`): garbage
/// is answered 400, the slowloris client closed at the header timeout, the big body 413 and
/// the big header 431 long before all of it is sent.
#[track_caller]
fn assert_http_refused(what: &str, r: &ConnReport) {
    assert!(r.closed, "{what}: not closed: {r:?}");
    if what.ends_with("garbage") {
        assert!(r.answer.starts_with("HTTP/1.1 400"), "{what}: {r:?}");
    } else if what.ends_with("slowloris") {
        assert!(
            Duration::from_millis(r.closed_after_ms) <= HEADERS + SLACK,
            "{what}: {r:?}"
        );
    } else {
        let status = if what.ends_with("body") { "413" } else { "431" };
        assert!(r.answer.contains(status), "{what}: {r:?}");
        assert!(r.sent < 100 << 20, "{what}: all 100 MB taken: {r:?}");
    }
}

/// The agent's stream to the controller was never re-opened.
fn agent_stream_undisturbed(c: &Cluster) {
    assert_eq!(
        stderr_of(&c.controller).matches("agent connected").count(),
        1,
        "the agent's stream was re-opened\n{}",
        c.controller.log_tail(30)
    );
}

/// 2,000 idle connections to each of the agent's three ports at once: each port holds at
/// most its 32 (the rest are closed at once), closes those at its handshake or header
/// timeout, counts them all, and the agent's descriptors and memory stay bounded and come
/// back down; meanwhile and afterwards the agent applies its next change.
#[test]
fn idle_connections_to_the_agents_ports_are_bounded() {
    let (c, backends) = cluster();
    let agent = c.agent("a");
    let before = usage(agent);
    let floods: Vec<(&str, Process)> = AGENT_PORTS
        .iter()
        .map(|(port, addr)| {
            let name = format!("idle-{port}");
            (*port, idle_flood(&c, &name, Host::Node("a"), addr, "25000"))
        })
        .collect();
    let during = busiest(agent, 5, Duration::from_millis(200));
    // A change while the ports are full.
    next_change_applies(&c, "web2", "10.96.0.81", &backends);
    for (port, p) in &floods {
        let timeout = if *port == "grpc" { HANDSHAKE } else { HEADERS };
        idle_done(port, p, HANDSHAKE + SLACK * 3, timeout);
    }
    assert_fds_during(AGENT, before, during, 3 * AGENT_PORT_CONNECTIONS);
    assert_back_down(agent, AGENT, before, during);

    let m = agent_metrics(&c);
    for (port, _) in AGENT_PORTS {
        let limit = agent_refused(&m, port, "connection_limit");
        assert!(limit >= 1900, "{port}: connection_limit {limit}\n{m}");
        let timed_out = if port == "grpc" {
            "handshake_timeout"
        } else {
            "header_timeout"
        };
        let n = agent_refused(&m, port, timed_out);
        assert!(n >= 1, "{port}: {timed_out} {n}\n{m}");
    }
    let log = stderr_of(agent);
    assert!(
        log.lines().any(|l| l.contains("refused a connection")
            && l.contains("127.0.0.1:")
            && l.contains("handshake_timeout")),
        "no log line naming the peer\n{}",
        agent.log_tail(20)
    );
    agent_stream_undisturbed(&c);
    next_change_applies(&c, "web3", "10.96.0.82", &backends);
}

/// Garbage, a 100 MB message and a slowloris client against each of the agent's ports, all
/// at once: garbage is refused at once (TLS: not TLS; HTTP: 400), the 100 MB gRPC message
/// from its length prefix (OUT_OF_RANGE), the 100 MB HTTP body (413) and header (431) long
/// before they are all sent, the slowloris clients at the handshake or header timeout; the
/// agent's memory never approaches 100 MB and it applies its next change.
#[test]
fn garbage_big_messages_and_slow_clients_on_the_agents_ports_are_refused() {
    let (c, backends) = cluster();
    let agent = c.agent("a");
    let before = usage(agent);
    let tls = c.lab.tls().flood_args();
    let url = format!("https://127.0.0.1:{AGENT_GRPC_PORT}");
    let spawn = |name: &str, args: &[&str]| c.lab.spawn_flood(name, Host::Node("a"), args).unwrap();
    let mut big = vec![
        "grpc-big",
        "--url",
        &url,
        "--method",
        "/kubenft.v1.AgentInspect/GetApplied",
        "--bytes",
        "104857600",
    ];
    big.extend(tls.iter().map(String::as_str));
    let mut runs: Vec<(String, Process)> = vec![
        (
            "grpc garbage".into(),
            spawn("garbage-grpc", &["garbage", "--to", AGENT_PORTS[0].1]),
        ),
        (
            "grpc slowloris".into(),
            spawn(
                "slow-grpc",
                &["slowloris", "--to", AGENT_PORTS[0].1, "--kind", "tls"],
            ),
        ),
        ("grpc 100 MB".into(), spawn("big-grpc", &big)),
    ];
    for (port, addr) in &AGENT_PORTS[1..] {
        runs.extend(http_hostile(&c, Host::Node("a"), port, addr));
    }
    let during = busiest(agent, 10, Duration::from_millis(300));
    let cap = HANDSHAKE + SLACK * 3;
    for (what, p) in &runs {
        wait_until(cap, POLL, || Ok::<_, String>(!p.is_running()))
            .unwrap_or_else(|e| panic!("{what}: still running: {e}"));
        assert!(
            p.exit_status().is_some_and(|s| s.success()),
            "{what}: {}",
            p.log_tail(10)
        );
        if what.ends_with("100 MB") {
            let r: Vec<CallReport> = reports(p);
            eprintln!("{what}: {r:?}");
            assert_eq!(r.len(), 1, "{what}: {r:?}");
            assert_eq!(r[0].code, "OutOfRange", "{what}: {r:?}");
            continue;
        }
        let r: Vec<ConnReport> = reports(p);
        eprintln!("{what}: {r:?}");
        let r = &r[0];
        assert!(r.closed, "{what}: not closed: {r:?}");
        let closed = Duration::from_millis(r.closed_after_ms);
        if what.ends_with("garbage") {
            assert!(closed < SLACK, "{what}: {r:?}");
        }
        if !what.starts_with("grpc") {
            assert_http_refused(what, r);
        } else if what.ends_with("slowloris") {
            assert!(closed <= HANDSHAKE + SLACK, "{what}: {r:?}");
        }
    }
    assert_back_down(agent, AGENT, before, during);

    let m = agent_metrics(&c);
    for (port, reason) in [
        ("grpc", "not_tls"),
        ("grpc", "handshake_timeout"),
        ("healthz", "bad_request"),
        ("healthz", "header_timeout"),
        ("healthz", "headers_too_large"),
        ("metrics", "bad_request"),
        ("metrics", "header_timeout"),
        ("metrics", "headers_too_large"),
    ] {
        assert!(agent_refused(&m, port, reason) >= 1, "{port} {reason}\n{m}");
    }
    agent_stream_undisturbed(&c);
    next_change_applies(&c, "web2", "10.96.0.81", &backends);
}

/// 2,000 connections to the controller's TLS port that never start a handshake, with
/// garbage, a slowloris client and a 100 MB inspection request beside them: all are held
/// (its cap is 8,192) and closed at the handshake timeout or at once, each is counted, its
/// descriptors come back down, and the real agent keeps its stream and applies its next
/// change meanwhile and afterwards.
#[test]
fn the_controller_closes_idle_tls_connections_and_its_agent_is_undisturbed() {
    let (c, backends) = cluster();
    let before = usage(&c.controller);
    let timeouts_before = controller_refused(&c, "handshake_timeout");
    let to = format!("{CP_V4}:{CONTROLLER_GRPC_PORT}");
    let idle = idle_flood(&c, "idle-controller", Host::External, &to, "25000");
    let opened = Instant::now();
    let url = format!("https://{to}");
    let tls = c.lab.tls().flood_args();
    let mut big = vec![
        "grpc-big",
        "--url",
        &url,
        "--method",
        "/kubenft.v1.ControllerInspect/ListNodes",
        "--bytes",
        "104857600",
    ];
    big.extend(tls.iter().map(String::as_str));
    let big = c
        .lab
        .spawn_flood("big-controller", Host::External, &big)
        .unwrap();
    let garbage = c
        .lab
        .spawn_flood(
            "garbage-controller",
            Host::External,
            &["garbage", "--to", &to],
        )
        .unwrap();
    let slow = c
        .lab
        .spawn_flood(
            "slow-controller",
            Host::External,
            &["slowloris", "--to", &to, "--kind", "tls"],
        )
        .unwrap();
    let during = busiest(&c.controller, 5, Duration::from_millis(200));
    // Held, not refused: each costs a descriptor and a handshake task.
    assert!(
        during.fds >= before.fds + 1900,
        "the idle connections were not held: {during:?} (before {before:?})"
    );
    assert_fds_during(CONTROLLER, before, during, 2000 + 3);
    next_change_applies(&c, "web2", "10.96.0.81", &backends);

    let done = idle_done("idle", &idle, HANDSHAKE + SLACK * 2, HANDSHAKE);
    eprintln!("idle done {:?} after they opened", opened.elapsed());
    assert_eq!(
        done.closed_at_once, 0,
        "refused below the connection cap: {done:?}"
    );
    for (what, p) in [("garbage", &garbage), ("slowloris", &slow)] {
        let r: ConnReport = wait_report(p, HANDSHAKE + SLACK, |_: &ConnReport| true).unwrap();
        eprintln!("{what}: {r:?}");
        assert!(r.closed, "{what}: {r:?}");
        let cap = if what == "garbage" {
            SLACK
        } else {
            HANDSHAKE + SLACK
        };
        assert!(
            Duration::from_millis(r.closed_after_ms) <= cap,
            "{what}: {r:?}"
        );
    }
    let r: CallReport = wait_report(&big, START * 2, |_: &CallReport| true).unwrap();
    eprintln!("100 MB: {r:?}");
    assert_eq!(r.code, "OutOfRange", "{r:?}");
    assert_back_down(&c.controller, CONTROLLER, before, during);
    assert!(
        controller_refused(&c, "handshake_timeout") >= timeouts_before + 2001,
        "handshake timeouts not counted"
    );
    assert!(controller_refused(&c, "not_tls") >= 1);
    agent_stream_undisturbed(&c);
    next_change_applies(&c, "web3", "10.96.0.82", &backends);
}

/// Inspection answers are held until sent: calls whose answers are never read hold every
/// slot (16 on the controller, 8 on the agent), so grpcurl is refused with
/// RESOURCE_EXHAUSTED rather than queued; the real agent's stream and changes go on
/// meanwhile; once those clients leave, grpcurl is answered again. 200 Services make the
/// answers (GetNodeRules, GetApplied) several of the 4 KiB pieces answers are sent in.
#[test]
fn inspection_calls_beyond_the_limit_are_refused_and_agents_are_served() {
    let (c, backends) = cluster();
    let many: Vec<Service> = (0..200)
        .map(|i| {
            Service::cluster_ip(&format!("s{i}"), &format!("10.96.1.{}", i + 1)).port(
                "http",
                80,
                TCP,
                Proto::Tcp,
            )
        })
        .collect();
    let refs: Vec<&dyn kubenft_lab::manifest::ToJson> = many
        .iter()
        .map(|s| s as &dyn kubenft_lab::manifest::ToJson)
        .collect();
    c.write("many.yaml", &refs);
    wait_until(START, POLL, || {
        let applied = c.agent_call("a", "GetApplied")?;
        Ok::<_, String>(
            applied["resources"]
                .as_array()
                .is_some_and(|r| r.len() > 200),
        )
    })
    .unwrap_or_else(|e| panic!("the 200 Services never applied: {e}"));
    c.wait_synced(START);
    let tls = c.lab.tls().flood_args();
    let slow = |name: &str,
                host: Host<'_>,
                url: &str,
                method: &str,
                request: &str,
                shape: (&str, &str)| {
        let mut args = vec![
            "slow-calls",
            "--url",
            url,
            "--method",
            method,
            "--request-hex",
            request,
            "--connections",
            shape.0,
            "--calls",
            shape.1,
            "--hold-ms",
            "60000",
        ];
        args.extend(tls.iter().map(String::as_str));
        let p = c.lab.spawn_flood(name, host, &args).unwrap();
        let held: HeldReport = wait_report(&p, START, |_: &HeldReport| true).unwrap();
        (p, held)
    };

    // The controller: 4 connections of 4 GetNodeRules calls (node "a").
    let url = format!("https://{CP_V4}:{CONTROLLER_GRPC_PORT}");
    let (controller_slow, held) = slow(
        "slow-controller",
        Host::External,
        &url,
        "/kubenft.v1.ControllerInspect/GetNodeRules",
        "0a0161",
        ("4", "4"),
    );
    assert_eq!((held.held, held.refused), (16, 0), "{held:?}");
    let refused = c.controller_call("ListNodes", None).unwrap_err();
    assert!(refused.contains("ResourceExhausted"), "{refused}");
    next_change_applies(&c, "web2", "10.96.0.81", &backends);
    controller_slow.stop().unwrap();
    let mut answered = Err(String::new());
    wait_until(CONVERGE, POLL, || {
        answered = c.controller_call("ListNodes", None);
        Ok::<_, String>(answered.is_ok())
    })
    .unwrap_or_else(|e| panic!("ListNodes after the slow clients left: {e}: {answered:?}"));

    // The agent: 2 connections of 4 GetApplied calls.
    let url = format!("https://127.0.0.1:{AGENT_GRPC_PORT}");
    let (agent_slow, held) = slow(
        "slow-agent",
        Host::Node("a"),
        &url,
        "/kubenft.v1.AgentInspect/GetApplied",
        "",
        ("2", "4"),
    );
    assert_eq!((held.held, held.refused), (8, 0), "{held:?}");
    let refused = c.agent_call("a", "GetApplied").unwrap_err();
    assert!(refused.contains("ResourceExhausted"), "{refused}");
    next_change_applies(&c, "web3", "10.96.0.82", &backends);
    agent_slow.stop().unwrap();
    wait_until(CONVERGE, POLL, || {
        Ok::<_, String>(c.agent_call("a", "GetApplied").is_ok())
    })
    .unwrap_or_else(|e| panic!("GetApplied after the slow clients left: {e}"));
    agent_stream_undisturbed(&c);
    c.wait_synced(CONVERGE);
}

/// HTTP/2 keepalive (interval and timeout shortened to 2 s each here with
/// `KUBENFT_HTTP2_KEEPALIVE_MS`; 10 s each as built): a client whose packets are dropped from some moment on (a node that
/// died) is closed by the controller within interval + timeout, and its descriptor
/// released; a client that answers the pings keeps its connection, and the real agent its
/// stream. Without keepalive the controller, which sends nothing on an idle connection,
/// would hold the dead one forever.
#[test]
fn keepalive_closes_a_connection_whose_peer_went_silent() {
    let keepalive = Duration::from_secs(2);
    let ms = keepalive.as_millis().to_string();
    let (c, _) = cluster_with(&[("KUBENFT_HTTP2_KEEPALIVE_MS", &ms)]);
    let tls = c.lab.tls().flood_args();
    let url = format!("https://{CP_V4}:{CONTROLLER_GRPC_PORT}");
    let hold = |name: &str, host: Host<'_>| {
        let mut args = vec![
            "hold",
            "--url",
            &url,
            "--method",
            "/kubenft.v1.ControllerInspect/ListNodes",
            "--hold-ms",
            "60000",
        ];
        args.extend(tls.iter().map(String::as_str));
        let p = c.lab.spawn_flood(name, host, &args).unwrap();
        wait_report(&p, START, |v: &serde_json::Value| v["connected"] == true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        p
    };
    let _dying = hold("dying", Host::External);
    let _alive = hold("alive", Host::ControlPlane);
    // Established connections the controller holds, by peer address.
    let established = |peer: std::net::Ipv4Addr| {
        let out = c
            .lab
            .exec_ok(
                Host::ControlPlane,
                &["ss", "-Htn", "state", "established", "sport", "=", ":9650"],
            )
            .unwrap();
        // Recv-Q, Send-Q, local address:port, peer address:port.
        out.lines()
            .filter_map(|l| l.split_whitespace().nth(3)?.rsplit_once(':'))
            .filter(|(addr, _)| *addr == peer.to_string())
            .count()
    };
    // Idle for a few keepalive periods: answered pings keep both.
    std::thread::sleep(keepalive * 3);
    assert_eq!(established(EXT_V4), 1);
    assert_eq!(established(CP_V4), 1);
    let before = usage(&c.controller);
    // From now on nothing passes between `ext` and the controller's port, either way.
    for rule in [
        "add table inet bounds-test",
        "add chain inet bounds-test in { type filter hook input priority 0; }",
        "add chain inet bounds-test out { type filter hook output priority 0; }",
        &format!(
            "add rule inet bounds-test in ip saddr {CP_V4} tcp sport {CONTROLLER_GRPC_PORT} drop"
        ),
        &format!(
            "add rule inet bounds-test out ip daddr {CP_V4} tcp dport {CONTROLLER_GRPC_PORT} drop"
        ),
    ] {
        c.lab.exec_ok(Host::External, &["nft", rule]).unwrap();
    }
    let cut = Instant::now();
    wait_until(keepalive * 2 + SLACK, POLL, || {
        Ok::<_, String>(established(EXT_V4) == 0)
    })
    .unwrap_or_else(|e| panic!("the silent client's connection is still open: {e}"));
    eprintln!("closed {:?} after its packets were dropped", cut.elapsed());
    std::thread::sleep(Duration::from_millis(300));
    let after = usage(&c.controller);
    assert!(
        after.fds < before.fds,
        "descriptor not released: {after:?} (before {before:?})"
    );
    assert_eq!(established(CP_V4), 1, "the live client lost its connection");
    assert_eq!(
        established(c.lab.node("a").ipv4),
        1,
        "the agent lost its stream"
    );
    agent_stream_undisturbed(&c);
}

/// The controller's HTTP port (`/healthz`, `/livez`, `/readyz`, `/metrics`): 2,000 idle
/// connections from outside: the port holds at most its 64 (the rest are refused at once)
/// and closes them at the header timeout. Then garbage, a 100 MB body, a 100 MB header and a
/// slowloris client at once: garbage is answered 400, the big body 413 and the big header
/// 431 long before they are all sent, the slowloris client is closed at the header timeout; every refusal is counted by reason; the controller's
/// descriptors and memory come back down, and the real agents keep their streams and apply
/// their next change.
#[test]
fn the_controllers_http_port_is_bounded() {
    let (c, backends) = cluster();
    let before = usage(&c.controller);
    let to = format!("{CP_V4}:{CONTROLLER_HTTP_PORT}");
    let idle = idle_flood(&c, "idle-http", Host::External, &to, "20000");
    let during = busiest(&c.controller, 5, Duration::from_millis(200));
    next_change_applies(&c, "web2", "10.96.0.81", &backends);
    idle_done("idle", &idle, HEADERS + SLACK * 3, HEADERS);
    // The port is free again: the other hostile clients, all at once.
    for (what, p) in http_hostile(&c, Host::External, "http", &to) {
        wait_until(HEADERS + SLACK * 3, POLL, || {
            Ok::<_, String>(!p.is_running())
        })
        .unwrap_or_else(|e| panic!("{what}: still running: {e}"));
        let r: Vec<ConnReport> = reports(&p);
        eprintln!("{what}: {r:?}");
        assert_http_refused(&what, &r[0]);
    }
    assert_fds_during(CONTROLLER, before, during, CONTROLLER_HTTP_CONNECTIONS);
    assert_back_down(&c.controller, CONTROLLER, before, during);
    let (_, m) = c.http_get(Host::ControlPlane, &format!("http://{to}/metrics"));
    for reason in [
        "connection_limit",
        "header_timeout",
        "headers_too_large",
        "bad_request",
    ] {
        let series =
            format!("kubenft_controller_http_connections_refused_total{{reason=\"{reason}\"}}");
        assert!(metric(&m, &series) >= 1, "{series}\n{m}");
    }
    // Every idle connection was refused at once or held to the header timeout, counted by
    // reason either way. How many were which depends on how fast the flood opened them
    // (slots free up at the header timeout), so only the sum is fixed.
    let refused = |reason: &str| {
        metric(
            &m,
            &format!("kubenft_controller_http_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    let (limit, timeout) = (refused("connection_limit"), refused("header_timeout"));
    eprintln!("http port: {limit} refused at the limit, {timeout} timed out");
    assert!(
        limit + timeout >= 2000,
        "2,000 idle connections, {limit} refused at the limit + {timeout} timed out\n{m}"
    );
    agent_stream_undisturbed(&c);
    next_change_applies(&c, "web3", "10.96.0.82", &backends);
}
