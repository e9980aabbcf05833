//! End to end through the real controller and agents: UDP conntrack entries as a client that
//! keeps one source port sees them — moved off a replaced endpoint, refused rather than
//! blackholed, never stuck on an entry that bypassed the proxy, and never disturbed by changes
//! to other Services or an agent restart.
//! Behaviour numbers refer to docs/behaviours.md §5 (29 itself is
//! `stale_udp_conntrack_entries_are_cleaned` in e2e_lb.rs).
//!
//! The clients here are real looping processes (a bounded bash loop of `kubenft-echo probe`
//! from a fixed source port, one datagram every 200 ms, each result stamped with the wall
//! clock), so datagrams keep arriving while rules change, as they do from a real DNS or
//! statsd client.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use kubenft_lab::{
    Cond, Host, Lab, Pod, ProbeResult, Process, Proto, Service, Slice, TrafficPolicy, wait_until,
};

/// Rounds of a looping client: at 200 ms + probe time each, minutes — longer than any test
/// here, and the lab stops the loop on drop anyway.
const ROUNDS: u32 = 1500;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// A looping UDP client.
struct UdpLoop {
    what: String,
    process: Process,
}

impl UdpLoop {
    /// Starts `name` in `from`: one datagram to `target` every 200 ms from `source_port`.
    fn start(lab: &Lab, name: &str, from: Host<'_>, target: SocketAddr, source_port: u16) -> Self {
        let echo = lab.binary("kubenft-echo").unwrap();
        let script = format!(
            "for i in $(seq 1 {ROUNDS}); do printf '%s ' \"$EPOCHREALTIME\"; \
             {} probe --udp {target} --count 1 --timeout-ms 300 --source-port {source_port} || echo; \
             sleep 0.2; done",
            echo.display()
        );
        let process = lab
            .spawn(name, from, &["bash", "-c", &script])
            .unwrap_or_else(|e| panic!("starting loop {name}: {e}"));
        UdpLoop {
            what: format!("{name} ({from:?} -> {target} from port {source_port})"),
            process,
        }
    }

    /// Every result so far with the wall-clock time its attempt started.
    fn results(&self) -> Vec<(f64, ProbeResult)> {
        let out = self.process.current_stdout();
        // Only complete lines: the last one may be an attempt still in progress.
        let complete = out.rfind('\n').map_or("", |i| &out[..i]);
        complete
            .lines()
            .filter_map(|l| {
                let (t, rest) = l.split_once(' ')?;
                let r = ProbeResult::parse_line(rest)
                    .unwrap_or_else(|_| ProbeResult::Other(format!("harness: {l:?}")));
                Some((t.parse().ok()?, r))
            })
            .collect()
    }

    /// Results of attempts started at or after `t`.
    fn since(&self, t: f64) -> Vec<ProbeResult> {
        self.results()
            .into_iter()
            .filter(|(at, _)| *at >= t)
            .map(|(_, r)| r)
            .collect()
    }

    /// Waits (≤ `cap`) until the latest attempt started after `t` satisfies `pred`; returns
    /// that attempt's delay after `t`. Panics with the results since `t` otherwise.
    fn wait_since(
        &self,
        what: &str,
        t: f64,
        cap: Duration,
        pred: impl Fn(&ProbeResult) -> bool,
    ) -> f64 {
        let mut hit = None;
        let waited = wait_until(cap, POLL, || {
            hit = self
                .results()
                .into_iter()
                .rev()
                .find(|(at, _)| *at >= t)
                .filter(|(_, r)| pred(r))
                .map(|(at, _)| at - t);
            Ok::<_, String>(hit.is_some())
        });
        match (waited, hit) {
            (Ok(_), Some(after)) => {
                eprintln!("{}: {what} after {after:.2} s", self.what);
                after
            }
            _ => panic!(
                "{}: {what} not seen within {cap:?}; results since: {:?}",
                self.what,
                self.since(t).iter().map(|r| r.label()).collect::<Vec<_>>()
            ),
        }
    }

    fn label(&self) -> &str {
        &self.what
    }
}

/// `conntrack -L <args>` in `node`'s namespace (entries on stdout).
fn conntrack(c: &Cluster, node: &str, args: &[&str]) -> String {
    let mut argv = vec!["conntrack", "-L"];
    argv.extend_from_slice(args);
    let out = c.lab.exec(Host::Node(node), &argv).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// UDP entries on `node` for a Service `entry` (`--orig-dst IP` or `--orig-port-dst PORT`...)
/// whose reply comes from `ip`.
fn udp_entries_replying_from(c: &Cluster, node: &str, entry: &[&str], ip: IpAddr) -> String {
    let family = if ip.is_ipv6() { "ipv6" } else { "ipv4" };
    let ip = ip.to_string();
    let mut args = vec!["-f", family, "-p", "udp", "--reply-src", &ip];
    args.extend_from_slice(entry);
    conntrack(c, node, &args)
}

fn udp_slice(service: &str, pods: &[&Pod], cond: Cond) -> Slice {
    Slice::for_service(service)
        .port_proto("dns", UDP, Proto::Udp)
        .endpoints(pods.iter().copied(), cond)
}

fn is_server(name: &'static str) -> impl Fn(&ProbeResult) -> bool {
    move |r| r.server() == Some(name)
}

/// §5.30: §5.29 via a NodePort from ext — on a node without the endpoint and on the endpoint's
/// node — and from a host-network client on the ClusterIP. Each client keeps its source port;
/// when its endpoint is replaced (the old pod keeps running, so only the cleanup can move it)
/// it reaches the new one within 2 s, stays there, and no entry replies from the old pod.
#[test]
fn stale_udp_entries_are_cleaned_for_nodeport_and_host_network_clients() {
    let lab = Cluster::lab(&["a", "b"]);
    let p = pods(&lab, &[("udp-1", "b"), ("udp-2", "b")]);
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("dns", "10.96.0.130")
        .port("dns", 53, UDP, Proto::Udp)
        .node_port(30130);
    c.write(
        "dns.yaml",
        &[&svc, &udp_slice("dns", &[&p[0]], Cond::READY)],
    );
    let (na, nb) = (c.lab.node("a").ipv4, c.lab.node("b").ipv4);
    let clients = [
        ("ext-to-a", Host::External, sock(na, 30130), 12345),
        ("ext-to-b", Host::External, sock(nb, 30130), 12346),
        ("host-a", Host::Node("a"), vip("10.96.0.130:53"), 12347),
    ];
    for (_, from, target, _) in clients {
        c.wait_answers(from, Proto::Udp, target, START);
    }
    let loops: Vec<UdpLoop> = clients
        .iter()
        .map(|(name, from, target, port)| UdpLoop::start(&c.lab, name, *from, *target, *port))
        .collect();
    let t0 = now();
    for l in &loops {
        l.wait_since("udp-1 answers", t0, START, is_server("udp-1"));
    }

    // Replace the endpoint; udp-1 keeps running.
    let t = now();
    c.write(
        "dns.yaml",
        &[&svc, &udp_slice("dns", &[&p[1]], Cond::READY)],
    );
    for l in &loops {
        l.wait_since("moved to udp-2", t, CONVERGE, is_server("udp-2"));
    }
    // And stays there: a few more rounds all answered by udp-2.
    let settled = now();
    std::thread::sleep(Duration::from_millis(1200));
    for (l, (_, from, target, _)) in loops.iter().zip(clients) {
        let rs = l.since(settled);
        assert!(
            rs.len() >= 3 && rs.iter().all(|r| r.server() == Some("udp-2")),
            "{}: not settled on udp-2: {rs:?}",
            l.label()
        );
        let node = if target.ip() == IpAddr::from(nb) {
            "b"
        } else {
            "a"
        };
        c.assert_trace_agrees(node, from, (Proto::Udp, target), &rs);
    }
    // (Node b also holds plain forwarding entries of node a's masqueraded flows to udp-1;
    // they belong to no Service entry and simply expire.)
    for (node, entry) in [
        ("a", &["--orig-dst", "10.96.0.130"][..]),
        ("a", &["--orig-port-dst", "30130"]),
        ("b", &["--orig-port-dst", "30130"]),
    ] {
        let stale = udp_entries_replying_from(&c, node, entry, p[0].ipv4.into());
        assert!(
            stale.trim().is_empty(),
            "node {node} keeps {entry:?} entries replying from the removed udp-1:\n{stale}"
        );
    }
}

/// §5.31 (kubernetes #126934): internalTrafficPolicy Local, the client and udp-1 on node a,
/// udp-2 on node b. The client only ever reaches udp-1; udp-1 is deleted, and for 3 s the
/// client (still sending) is dropped — never sent to the remote udp-2; then udp-3 starts on
/// node a and answers within 2 s.
#[test]
fn udp_itp_local_client_reaches_a_new_local_endpoint_after_a_gap() {
    let lab = Cluster::lab(&["a", "b"]);
    let p = pods(&lab, &[("udp-1", "a"), ("udp-2", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("dns", "10.96.0.131")
        .port("dns", 53, UDP, Proto::Udp)
        .internal_traffic_policy(TrafficPolicy::Local);
    c.write(
        "dns.yaml",
        &[&svc, &udp_slice("dns", &[&p[0], &p[1]], Cond::READY)],
    );
    let target = vip("10.96.0.131:53");
    c.wait_answers(Host::Pod("client"), Proto::Udp, target, START);
    let l = UdpLoop::start(&c.lab, "loop", Host::Pod("client"), target, 12345);
    let t0 = now();
    l.wait_since("udp-1 answers", t0, START, is_server("udp-1"));
    std::thread::sleep(Duration::from_millis(600));
    let rs = l.since(t0);
    assert!(
        rs.iter().all(|r| r.server() == Some("udp-1")),
        "internalTrafficPolicy Local: only the local udp-1 may answer: {rs:?}"
    );

    // udp-1 goes away: no local endpoint left, the client's datagrams are dropped.
    let gone = now();
    c.lab.remove_pod("udp-1").unwrap();
    c.write(
        "dns.yaml",
        &[&svc, &udp_slice("dns", &[&p[1]], Cond::READY)],
    );
    let dropped = l.wait_since("dropped without a local endpoint", gone, CONVERGE, |r| {
        *r == ProbeResult::Timeout
    });
    std::thread::sleep(Duration::from_secs(3));
    let gap = l.since(gone);
    assert!(
        gap.iter().all(|r| r.server() != Some("udp-2")),
        "the remote udp-2 answered a Local-policy client: {gap:?}"
    );
    let from = Host::Pod("client");
    c.assert_trace_agrees("a", from, (Proto::Udp, target), &l.since(gone + dropped));

    // A new local endpoint: reached within 2 s, though the client never stopped sending.
    let p3 = pods(&c.lab, &[("udp-3", "a")]).remove(0);
    let t = now();
    c.write(
        "dns.yaml",
        &[&svc, &udp_slice("dns", &[&p[1], &p3], Cond::READY)],
    );
    let after = l.wait_since("udp-3 answers", t, CONVERGE, is_server("udp-3"));
    c.assert_trace_agrees("a", from, (Proto::Udp, target), &l.since(t + after));
}

/// §5.32 (kubernetes #139628, #141371): looping clients on the ClusterIP (a pod) and the
/// NodePort (ext) while the Service scales to zero: within 2 s they are refused (ICMP), never
/// answered by the still-running pod through a stale DNAT and never left hanging on it. Back to
/// one endpoint, then the Service is deleted: nothing answers any more and no entry on either
/// node replies from the pod.
#[test]
fn udp_scale_to_zero_refuses_and_service_deletion_leaves_no_stale_entries() {
    let lab = Cluster::lab(&["a", "b"]);
    let p = pods(&lab, &[("udp-1", "b")]).remove(0);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("dns", "10.96.0.132")
        .port("dns", 53, UDP, Proto::Udp)
        .node_port(30132);
    let one = udp_slice("dns", &[&p], Cond::READY);
    let none = udp_slice("dns", &[], Cond::READY);
    c.write("dns.yaml", &[&svc, &one]);
    let na = c.lab.node("a").ipv4;
    let service_entries = [
        &["--orig-dst", "10.96.0.132"][..],
        &["--orig-port-dst", "30132"],
    ];
    let clients = [
        (
            "pod-to-clusterip",
            Host::Pod("client"),
            vip("10.96.0.132:53"),
        ),
        ("ext-to-nodeport", Host::External, sock(na, 30132)),
    ];
    for (_, from, target) in clients {
        c.wait_answers(from, Proto::Udp, target, START);
    }
    let loops: Vec<UdpLoop> = clients
        .iter()
        .map(|(name, from, target)| UdpLoop::start(&c.lab, name, *from, *target, 12345))
        .collect();
    let t0 = now();
    for l in &loops {
        l.wait_since("udp-1 answers", t0, START, is_server("udp-1"));
    }

    // Scale to zero: refused. (The kernel rate-limits the ICMP errors to one client — a small
    // burst, then 1/s — so some attempts in between time out; none may be answered.)
    let t = now();
    c.write("dns.yaml", &[&svc, &none]);
    let mut refused_after = 0f64;
    for l in &loops {
        refused_after =
            refused_after.max(l.wait_since("refused", t, CONVERGE, |r| *r == ProbeResult::Refused));
    }
    std::thread::sleep(Duration::from_millis(1500));
    for l in &loops {
        let after: Vec<ProbeResult> = l
            .results()
            .into_iter()
            .filter(|(at, _)| *at >= t + refused_after)
            .map(|(_, r)| r)
            .collect();
        assert!(
            after
                .iter()
                .all(|r| matches!(r, ProbeResult::Refused | ProbeResult::Timeout)),
            "{}: answered although scaled to zero: {after:?}",
            l.label()
        );
        assert!(
            after.contains(&ProbeResult::Refused),
            "{}: a silent blackhole, never refused: {after:?}",
            l.label()
        );
    }
    for (_, from, target) in clients {
        c.assert_trace_agrees("a", from, (Proto::Udp, target), &[ProbeResult::Refused]);
    }
    for entry in service_entries {
        let stale = udp_entries_replying_from(&c, "a", entry, p.ipv4.into());
        assert!(
            stale.trim().is_empty(),
            "scaled to zero, node a keeps {entry:?} DNAT entries to udp-1:\n{stale}"
        );
    }

    // One endpoint again, then delete the Service while the clients keep sending.
    let t = now();
    c.write("dns.yaml", &[&svc, &one]);
    for l in &loops {
        l.wait_since("udp-1 answers again", t, CONVERGE, is_server("udp-1"));
    }
    let t = now();
    c.lab.remove_manifest("dns.yaml").unwrap();
    for l in &loops {
        l.wait_since("no longer answered", t, CONVERGE, |r| !r.is_ok());
    }
    let settled = now();
    std::thread::sleep(Duration::from_millis(1500));
    for l in &loops {
        let rs = l.since(settled);
        assert!(
            rs.iter().all(|r| !r.is_ok()),
            "{}: the deleted Service still answers: {rs:?}",
            l.label()
        );
    }
    // The ClusterIP is no Service's any more: dropped, as Trace says.
    let (_, from, cip) = clients[0];
    c.assert_trace_agrees("a", from, (Proto::Udp, cip), &loops[0].since(settled));
    for entry in service_entries {
        let stale = udp_entries_replying_from(&c, "a", entry, p.ipv4.into());
        assert!(
            stale.trim().is_empty(),
            "the Service is gone but node a keeps {entry:?} entries to udp-1:\n{stale}"
        );
    }
}

/// §5.33 (kubernetes #105657): clients that were already sending before the agents ever ran
/// (so their entries bypassed the proxy) keep sending while the only endpoint is listed
/// `ready=false` — they are refused — and reach it within 2 s of it becoming ready: neither
/// the not-ready phase nor the entries from before the proxy leave a permanent blackhole.
#[test]
fn udp_clients_reach_an_endpoint_within_2s_of_it_becoming_ready() {
    let lab = Cluster::lab(&["a", "b"]);
    let p = pods(&lab, &[("udp-1", "b")]).remove(0);
    client(&lab, "client", "a");
    let na = lab.node("a").ipv4;
    let clients = [
        (
            "pod-to-clusterip",
            Host::Pod("client"),
            vip("10.96.0.133:53"),
        ),
        ("ext-to-nodeport", Host::External, sock(na, 30133)),
    ];
    // Node a has a host firewall (as real nodes do), so conntrack tracks its traffic. The
    // clients start before any proxy rule exists: their first datagrams are routed (or
    // refused by node a itself) without DNAT, and conntrack remembers them that way.
    for rule in [
        "add table inet hostfw",
        "add chain inet hostfw forward { type filter hook forward priority 0; policy accept; }",
        "add chain inet hostfw input { type filter hook input priority 0; policy accept; }",
        "add rule inet hostfw forward ct state established,related accept",
        "add rule inet hostfw input ct state established,related accept",
    ] {
        lab.exec_ok(Host::Node("a"), &["nft", rule]).unwrap();
    }
    let loops: Vec<UdpLoop> = clients
        .iter()
        .map(|(name, from, target)| UdpLoop::start(&lab, name, *from, *target, 12345))
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let before = loops.iter().map(|l| l.results().len()).sum::<usize>();
    assert!(before >= 2, "the clients did not start sending");

    let c = Cluster::start(lab);
    let ct = conntrack(
        &c,
        "a",
        &[
            "-p",
            "udp",
            "--orig-dst",
            "10.96.0.133",
            "--reply-src",
            "10.96.0.133",
        ],
    );
    assert!(
        ct.contains("dport=53"),
        "expected an entry that bypassed the proxy (reply from the Service IP itself): {ct:?}"
    );
    eprintln!("entries that bypassed the proxy:\n{ct}");
    let svc = Service::cluster_ip("dns", "10.96.0.133")
        .port("dns", 53, UDP, Proto::Udp)
        .node_port(30133);
    let t = now();
    c.write(
        "dns.yaml",
        &[&svc, &udp_slice("dns", &[&p], Cond::NOT_READY)],
    );
    for l in &loops {
        l.wait_since("refused while not ready", t, START, |r| {
            *r == ProbeResult::Refused
        });
    }
    std::thread::sleep(Duration::from_millis(1000));
    for (l, (_, from, target)) in loops.iter().zip(clients) {
        let rs = l.since(t);
        assert!(
            rs.iter().all(|r| !r.is_ok()),
            "{}: a not-ready endpoint answered: {rs:?}",
            l.label()
        );
        c.assert_trace_agrees("a", from, (Proto::Udp, target), &[ProbeResult::Refused]);
    }

    let t = now();
    c.write("dns.yaml", &[&svc, &udp_slice("dns", &[&p], Cond::READY)]);
    for (l, (_, from, target)) in loops.iter().zip(clients) {
        let after = l.wait_since("udp-1 answers once ready", t, CONVERGE, is_server("udp-1"));
        c.assert_trace_agrees("a", from, (Proto::Udp, target), &l.since(t + after));
    }
}

/// The conntrack ids on `node` of the entries `conntrack -L <filter>` lists that satisfy
/// `pick` (given the entry's line).
fn ids_of(c: &Cluster, node: &str, filter: &[&str], pick: impl Fn(&str) -> bool) -> Vec<String> {
    let mut args = filter.to_vec();
    args.extend(["-o", "id"]);
    conntrack(c, node, &args)
        .lines()
        .filter(|l| pick(l))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("id="))
                .map(str::to_string)
        })
        .collect()
}

/// Whether an entry's original direction has source port `port` (the first `sport=`).
fn from_port(line: &str, port: u16) -> bool {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("sport="))
        .is_some_and(|s| s == port.to_string())
}

/// §5.34 (kubernetes #122740): a UDP flow (one source port) and a long-lived TCP connection
/// to Service `alpha`, while Service `beta` — the same two pods — loses and regains each pod,
/// goes to zero and is deleted, and node a's agent is killed (-9) and restarted. The UDP flow
/// is answered throughout by the same pod, the TCP connection never misses an echo, and their
/// conntrack entries on node a keep their ids (none was deleted and re-created).
#[test]
fn other_services_churn_and_agent_restart_leave_established_flows_and_their_conntrack_entries_alone()
 {
    let lab = Cluster::lab(&["a", "b"]);
    let p = pods(&lab, &[("web-1", "b"), ("web-2", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = |name: &str, ip: &str| {
        Service::cluster_ip(name, ip)
            .port("dns", 53, UDP, Proto::Udp)
            .port("http", 80, TCP, Proto::Tcp)
    };
    let slice = |name: &str, pods: &[&Pod]| {
        Slice::for_service(name)
            .port_proto("dns", UDP, Proto::Udp)
            .port("http", TCP)
            .endpoints(pods.iter().copied(), Cond::READY)
    };
    let both = [&p[0], &p[1]];
    let (alpha, beta) = (svc("alpha", "10.96.0.134"), svc("beta", "10.96.0.135"));
    c.write("alpha.yaml", &[&alpha, &slice("alpha", &both)]);
    c.write("beta.yaml", &[&beta, &slice("beta", &both)]);
    let (udp_target, tcp_target) = (vip("10.96.0.134:53"), vip("10.96.0.134:80"));
    c.wait_answers(Host::Pod("client"), Proto::Udp, udp_target, START);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, tcp_target, CONVERGE);
    c.wait_answers(
        Host::Pod("client"),
        Proto::Udp,
        vip("10.96.0.135:53"),
        CONVERGE,
    );

    let udp = UdpLoop::start(&c.lab, "udp-flow", Host::Pod("client"), udp_target, 12345);
    let tcp = HeldTcp::start(&c, "tcp-flow", Host::Pod("client"), tcp_target);
    let t0 = now();
    udp.wait_since("answered", t0, START, ProbeResult::is_ok);
    tcp.wait_more(2, "the TCP flow's start");
    let udp_server = udp.since(t0).last().unwrap().server().unwrap().to_string();
    let tcp_server = tcp.server().unwrap();
    eprintln!("UDP flow to {udp_server}, TCP flow to {tcp_server}");
    let udp_filter = [
        "-p",
        "udp",
        "--orig-dst",
        "10.96.0.134",
        "--orig-port-dst",
        "53",
    ];
    let tcp_filter = [
        "-p",
        "tcp",
        "--orig-dst",
        "10.96.0.134",
        "--orig-port-dst",
        "80",
    ];
    let ids = || {
        (
            ids_of(&c, "a", &udp_filter, |l| from_port(l, 12345)),
            ids_of(&c, "a", &tcp_filter, |l| l.contains("ESTABLISHED")),
        )
    };
    let before = ids();
    assert_eq!(before.0.len(), 1, "one UDP entry for the flow: {before:?}");
    assert_eq!(before.1.len(), 1, "one TCP entry for the flow: {before:?}");

    // Churn on beta: each pod removed and restored, zero endpoints, then the Service deleted.
    // (The controller polls its manifest directory every 100 ms: give it time to notice each
    // change before waiting for the nodes to acknowledge it.)
    let settle = || {
        std::thread::sleep(Duration::from_millis(300));
        c.wait_synced(START);
    };
    for pods in [&[&p[1]][..], &both, &[&p[0]], &[], &both] {
        c.write("beta.yaml", &[&beta, &slice("beta", pods)]);
        settle();
    }
    c.lab.remove_manifest("beta.yaml").unwrap();
    settle();
    // Node a's agent crashes and comes back.
    let agent = c.agent("a");
    agent.kill().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    agent.start().unwrap();
    c.wait_synced(START);
    tcp.wait_more(3, "after the churn and the agent's restart");
    std::thread::sleep(Duration::from_millis(600));

    let rs = udp.since(t0);
    assert!(rs.len() >= 10, "too few UDP rounds: {rs:?}");
    assert!(
        rs.iter().all(|r| r.server() == Some(udp_server.as_str())),
        "the UDP flow was interrupted or moved: {:?}",
        rs.iter().map(|r| r.label()).collect::<Vec<_>>()
    );
    assert_eq!(
        ids(),
        before,
        "the flows' conntrack entries were deleted and re-created"
    );
    // New flows to alpha go where the restarted agent's Trace says (both pods).
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Udp, udp_target), &rs);
    let exchanges = tcp.exchanges();
    tcp.stop();
    eprintln!(
        "UDP rounds {}, TCP exchanges {exchanges}, all answered",
        rs.len()
    );
}
