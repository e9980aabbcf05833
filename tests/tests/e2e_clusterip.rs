//! End to end through the real controller and agents: ClusterIP Services as a pod sees them.
//! Behaviour numbers refer to docs/behaviours.md §5.

mod common;

use std::fs;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use kubenft_lab::manifest::ToJson;
use kubenft_lab::{Cond, EchoPorts, Host, ProbeOpts, ProbeResult, Proto, Service, Slice};

/// §5.1: 3 pods on 2 nodes, 60 new TCP connections from a pod on node a: every one answered,
/// all three pods seen.
#[test]
fn clusterip_tcp_spreads_over_all_endpoints() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b"), ("web-3", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.10").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&backends, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let target = vip("10.96.0.10:80");
    c.wait_answers(Host::Pod("client"), Proto::Tcp, target, START);
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(60),
    );
    let t = assert_all_ok(&rs, "60 TCP requests to the ClusterIP");
    eprintln!("spread: {t:?}");
    for p in ["web-1", "web-2", "web-3"] {
        assert!(t.contains_key(p), "{p} never answered: {t:?}");
    }
}

/// §5.2: the same with UDP 53 → 5353; every pod answers the datagram.
#[test]
fn clusterip_udp_spreads_over_all_endpoints() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("dns-1", "a"), ("dns-2", "b"), ("dns-3", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("dns", "10.96.0.53").port("dns", 53, UDP, Proto::Udp);
    let slice = Slice::for_service("dns")
        .port_proto("dns", UDP, Proto::Udp)
        .endpoints(&backends, Cond::READY);
    c.write("dns.yaml", &[&svc, &slice]);
    let target = vip("10.96.0.53:53");
    c.wait_answers(Host::Pod("client"), Proto::Udp, target, START);
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Udp,
        target,
        &ProbeOpts::count(45),
    );
    let t = assert_all_ok(&rs, "45 UDP datagrams to the ClusterIP");
    eprintln!("spread: {t:?}");
    for p in ["dns-1", "dns-2", "dns-3"] {
        assert!(t.contains_key(p), "{p} never answered: {t:?}");
    }
}

/// §5.3: ports 80→`http` and 81→`alt`; pod1 has `http`=100 (and listens only there), pod2
/// has `alt`=101 (only there). :80 reaches only pod1:100 and :81 only pod2:101 — a wrong pod
/// or a wrong port would show as a refusal.
#[test]
fn multiport_named_ports_reach_the_right_pod_and_port() {
    let lab = Cluster::lab(&["a", "b"]);
    let pod1 = lab.add_pod("pod1", "a", &EchoPorts::tcp(&[100])).unwrap();
    let pod2 = lab.add_pod("pod2", "b", &EchoPorts::tcp(&[101])).unwrap();
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("multi", "10.96.0.30")
        .port("http", 80, "http", Proto::Tcp)
        .port("alt", 81, "alt", Proto::Tcp);
    let s1 = Slice::for_service("multi")
        .named("multi-1")
        .port("http", 100)
        .endpoint(&pod1, Cond::READY);
    let s2 = Slice::for_service("multi")
        .named("multi-2")
        .port("alt", 101)
        .endpoint(&pod2, Cond::READY);
    c.write("multi.yaml", &[&svc, &s1, &s2]);
    let (p80, p81) = (vip("10.96.0.30:80"), vip("10.96.0.30:81"));
    c.wait_answers(Host::Pod("client"), Proto::Tcp, p80, START);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, p81, CONVERGE);
    for (target, only) in [(p80, "pod1"), (p81, "pod2")] {
        let rs = c.probe(
            Host::Pod("client"),
            Proto::Tcp,
            target,
            &ProbeOpts::count(12),
        );
        let t = assert_all_ok(&rs, &format!("{target}"));
        assert_eq!(t.keys().collect::<Vec<_>>(), vec![only], "{target}: {t:?}");
    }
}

/// §5.4: Service port `web` 80 → targetPort `http`, which is 8080 on pod-a and 9090 on pod-b
/// (each listens only on its own). The slices carry the resolved numbers under the Service
/// port's name, as the EndpointSlice controller writes them; svc:80 reaches both, without
/// errors.
#[test]
fn named_target_port_resolves_per_endpoint() {
    let lab = Cluster::lab(&["a", "b"]);
    let pa = lab.add_pod("pod-a", "a", &EchoPorts::tcp(&[8080])).unwrap();
    let pb = lab.add_pod("pod-b", "b", &EchoPorts::tcp(&[9090])).unwrap();
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("named", "10.96.0.40").port("web", 80, "http", Proto::Tcp);
    let s1 = Slice::for_service("named")
        .named("named-a")
        .port("web", 8080)
        .endpoint(&pa, Cond::READY);
    let s2 = Slice::for_service("named")
        .named("named-b")
        .port("web", 9090)
        .endpoint(&pb, Cond::READY);
    c.write("named.yaml", &[&svc, &s1, &s2]);
    let target = vip("10.96.0.40:80");
    c.wait_answers(Host::Pod("client"), Proto::Tcp, target, START);
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(24),
    );
    let t = assert_all_ok(&rs, "svc:80 with per-endpoint target ports");
    assert!(
        t.contains_key("pod-a") && t.contains_key("pod-b"),
        "both endpoints must be reached: {t:?}"
    );
}

/// §5.10: pod → ClusterIP is not SNATed: the backend sees the client pod's own address,
/// from a pod on the same node as a backend and from one on the other node (both backends
/// reached from each, so both the local and the remote path are covered).
#[test]
fn pod_to_clusterip_keeps_the_pod_source_address() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    let ca = client(&lab, "client-a", "a");
    let cb = client(&lab, "client-b", "b");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.10").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&backends, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let target = vip("10.96.0.10:80");
    c.wait_answers(Host::Pod("client-a"), Proto::Tcp, target, START);
    c.wait_answers(Host::Pod("client-b"), Proto::Tcp, target, CONVERGE);
    for (name, pod) in [("client-a", &ca), ("client-b", &cb)] {
        let rs = c.probe(Host::Pod(name), Proto::Tcp, target, &ProbeOpts::count(16));
        let t = assert_all_from(&rs, pod.ipv4.into(), name);
        assert_eq!(t.len(), 2, "{name} should reach both backends: {t:?}");
    }
}

/// §5.11: hairpin. The only endpoint reaches its own ClusterIP 10/10, and what it sees as
/// the source is not its own address (masqueraded) but an address of its node.
#[test]
fn hairpin_to_own_clusterip_is_masqueraded_to_the_node() {
    let lab = Cluster::lab(&["a", "b"]);
    let solo = pods(&lab, &[("solo", "a")]).remove(0);
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("solo", "10.96.0.11").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("solo")
        .port("http", TCP)
        .endpoint(&solo, Cond::READY);
    c.write("solo.yaml", &[&svc, &slice]);
    let target = vip("10.96.0.11:80");
    c.wait_answers(Host::Pod("solo"), Proto::Tcp, target, START);
    let rs = c.probe(Host::Pod("solo"), Proto::Tcp, target, &ProbeOpts::count(10));
    let t = assert_all_ok(&rs, "hairpin 10/10");
    assert_eq!(t.get("solo"), Some(&10), "{t:?}");
    let node_addrs = c.ipv4_addresses(Host::Node("a"));
    for r in &rs {
        let src = r.client().unwrap().ip();
        assert_ne!(
            src,
            IpAddr::from(solo.ipv4),
            "hairpin traffic must be masqueraded: {r}"
        );
        assert!(
            node_addrs.contains(&src),
            "hairpin source {src} is not an address of node a {node_addrs:?}"
        );
    }
    eprintln!("hairpin source seen: {}", rs[0].client().unwrap().ip());
}

/// §5.17: a Service without endpoints is refused, fast (not a timeout), for TCP and UDP, on
/// its ClusterIP from a pod and on its NodePorts from ext. A squatter listens on node a's
/// NodePorts so that only the proxy's reject (not a closed port) can produce the refusal.
#[test]
fn no_endpoints_is_refused_fast_on_clusterip_and_nodeport() {
    let lab = Cluster::lab(&["a", "b"]);
    client(&lab, "client", "a");
    let echo = lab.binary("kubenft-echo").unwrap();
    let squatter = lab
        .spawn(
            "squatter-a",
            Host::Node("a"),
            &[
                echo.to_str().unwrap(),
                "serve",
                "--name",
                "squatter",
                "--tcp",
                "30017",
                "--udp",
                "30053",
            ],
        )
        .unwrap();
    squatter
        .wait_for_stdout("READY", Duration::from_secs(5))
        .unwrap();
    let (na, nb) = (c_ip(&lab, "a"), c_ip(&lab, "b"));
    // Without any proxy rule the squatter answers: the check below can fail.
    let before = lab
        .probe_once(Host::External, Proto::Tcp, sock(na, 30017))
        .unwrap();
    assert_eq!(before.server(), Some("squatter"), "{before}");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("empty", "10.96.0.17")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30017)
        .port("dns", 53, UDP, Proto::Udp)
        .node_port(30053);
    let slice = Slice::for_service("empty")
        .port("http", TCP)
        .port_proto("dns", UDP, Proto::Udp);
    c.write("empty.yaml", &[&svc, &slice]);
    c.wait_synced(START);
    c.wait_probe(
        "ClusterIP refused",
        Host::Pod("client"),
        Proto::Tcp,
        vip("10.96.0.17:80"),
        START,
        |r| *r == ProbeResult::Refused,
    );
    // TCP to the ClusterIP was just refused within the wait's 300 ms attempt timeout; each
    // case below is probed once, because the kernel rate-limits the ICMP errors a reject
    // sends to one client (a small burst, then 1/s).
    let cases = [
        (Host::Pod("client"), Proto::Udp, vip("10.96.0.17:53")),
        (Host::External, Proto::Tcp, sock(na, 30017)),
        (Host::External, Proto::Udp, sock(na, 30053)),
        (Host::External, Proto::Tcp, sock(nb, 30017)),
        (Host::External, Proto::Udp, sock(nb, 30053)),
    ];
    for (from, proto, target) in cases {
        let start = Instant::now();
        let r = c.probe1(from, proto, target, Duration::from_secs(2));
        let took = start.elapsed();
        assert_eq!(
            r,
            ProbeResult::Refused,
            "{proto} {target} from {from:?} must be refused"
        );
        assert!(
            took < Duration::from_secs(1),
            "{proto} {target}: refusal took {took:?}"
        );
    }
}

fn c_ip(lab: &kubenft_lab::Lab, node: &str) -> IpAddr {
    lab.node(node).ipv4.into()
}

/// §5.18: 0 → 1 → 0 endpoints: refused, then served within 2 s of the slice appearing,
/// then refused again within 2 s of it emptying.
#[test]
fn zero_to_one_to_zero_endpoints() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "b")]).remove(0);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.18").port("http", 80, TCP, Proto::Tcp);
    let empty = Slice::for_service("web").port("http", TCP);
    c.write("web.yaml", &[&svc, &empty]);
    let target = vip("10.96.0.18:80");
    c.wait_probe(
        "empty Service refused",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        START,
        |r| *r == ProbeResult::Refused,
    );
    let full = Slice::for_service("web")
        .port("http", TCP)
        .endpoint(&web, Cond::READY);
    c.write("web.yaml", &[&svc, &full]);
    c.wait_probe(
        "0→1: served",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        CONVERGE,
        |r| r.server() == Some("web-1"),
    );
    c.write("web.yaml", &[&svc, &empty]);
    c.wait_probe(
        "1→0: refused",
        Host::Pod("client"),
        Proto::Tcp,
        target,
        CONVERGE,
        |r| *r == ProbeResult::Refused,
    );
    // And it stays that way: no flapping back to the endpoint. (Refused or timed out: the
    // kernel rate-limits the ICMP errors a reject sends to one client — a small burst, then
    // 1/s — so after the refusals above a further one may show as a timeout.)
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(2).timeout(Duration::from_millis(500)),
    );
    assert!(
        rs.iter()
            .all(|r| matches!(r, ProbeResult::Refused | ProbeResult::Timeout)),
        "the emptied Service answered again: {rs:?}"
    );
}

/// §5.19: removing one of three endpoints drains it — within 2 s no new connection reaches
/// it — while a TCP connection already established to it keeps working (it exchanges data
/// after the change).
#[test]
fn endpoint_removal_drains_new_connections_and_keeps_established_ones() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b"), ("web-3", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.19").port("http", 80, TCP, Proto::Tcp);
    let slice = |pods: &[&kubenft_lab::Pod]| {
        Slice::for_service("web")
            .port("http", TCP)
            .endpoints(pods.iter().copied(), Cond::READY)
    };
    let all: Vec<&kubenft_lab::Pod> = backends.iter().collect();
    c.write("web.yaml", &[&svc, &slice(&all)]);
    let target = vip("10.96.0.19:80");
    c.wait_all_seen(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &["web-1", "web-2", "web-3"],
        START,
    );

    // A long-lived connection through the ClusterIP: socat connects, the script reads the
    // greeting (which pod), waits for the go file, sends a line and records the echo.
    let dir = c.lab.dir().to_path_buf();
    let (greet, go, result) = (
        dir.join("held.greet"),
        dir.join("held.go"),
        dir.join("held.result"),
    );
    let script = dir.join("held.sh");
    fs::write(
        &script,
        format!(
            "IFS= read -r g || {{ echo no-greeting > {r}.tmp; mv {r}.tmp {r}; exit 1; }}\n\
             echo \"$g\" > {g}.tmp && mv {g}.tmp {g}\n\
             i=0\n\
             while [ ! -e {go} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n\
             echo held-ping\n\
             if IFS= read -r r; then echo \"echo:$r\" > {r}.tmp; else echo eof > {r}.tmp; fi\n\
             mv {r}.tmp {r}\n",
            g = greet.display(),
            go = go.display(),
            r = result.display(),
        ),
    )
    .unwrap();
    let exec = format!("EXEC:sh {}", script.display());
    c.lab
        .spawn(
            "held-conn",
            Host::Pod("client"),
            &[
                "socat",
                "-T",
                "20",
                "TCP:10.96.0.19:80,connect-timeout=2",
                &exec,
            ],
        )
        .unwrap();
    let mut greeting = String::new();
    kubenft_lab::wait_until(Duration::from_secs(5), POLL, || {
        greeting = fs::read_to_string(&greet).unwrap_or_default();
        Ok::<_, String>(!greeting.is_empty())
    })
    .unwrap_or_else(|e| panic!("held connection never got a greeting: {e}"));
    let held_pod = greeting.split_whitespace().next().unwrap().to_string();
    eprintln!("held connection is to {held_pod} ({})", greeting.trim());

    // Remove exactly that endpoint (the pod keeps running).
    let keep: Vec<&kubenft_lab::Pod> = backends.iter().filter(|p| p.name != held_pod).collect();
    c.write("web.yaml", &[&svc, &slice(&keep)]);
    let removed_at = Instant::now();
    let mut clean_batches = 0;
    kubenft_lab::wait_until(CONVERGE, POLL, || {
        let rs = c.lab.probe(
            Host::Pod("client"),
            Proto::Tcp,
            target,
            &ProbeOpts::count(6).timeout(Duration::from_millis(300)),
        )?;
        clean_batches = if rs
            .iter()
            .all(|r| r.is_ok() && r.server() != Some(&held_pod))
        {
            clean_batches + 1
        } else {
            0
        };
        Ok::<_, kubenft_lab::LabError>(clean_batches >= 2)
    })
    .unwrap_or_else(|e| panic!("{held_pod} still gets new connections 2 s after removal: {e}"));
    eprintln!("drained after {:?}", removed_at.elapsed());
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(24),
    );
    let t = assert_all_ok(&rs, "after removal");
    assert!(
        !t.contains_key(&held_pod),
        "{held_pod} got new traffic: {t:?}"
    );
    assert_eq!(t.len(), 2, "the two remaining endpoints serve: {t:?}");

    // The established connection still carries data.
    fs::write(&go, "").unwrap();
    let mut outcome = String::new();
    kubenft_lab::wait_until(Duration::from_secs(5), POLL, || {
        outcome = fs::read_to_string(&result).unwrap_or_default();
        Ok::<_, String>(!outcome.is_empty())
    })
    .unwrap_or_else(|e| panic!("the held connection never completed its exchange: {e}"));
    assert_eq!(
        outcome.trim(),
        "echo:held-ping",
        "the established connection to {held_pod} was broken by the endpoint removal"
    );
}

/// Dual-stack smoke: one Service with an IPv4 and an IPv6 ClusterIP; both answer from both
/// backends, with the client's own address of the matching family.
#[test]
fn dual_stack_clusterip_smoke() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    let cl = client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ips("web", &["10.96.0.42", "fd00:96::42"]).port(
        "http",
        80,
        TCP,
        Proto::Tcp,
    );
    let v4 = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&backends, Cond::READY);
    let v6 = v4.clone().named("web-v6").ipv6();
    c.write("web.yaml", &[&svc as &dyn ToJson, &v4, &v6]);
    for (target, src) in [
        (vip("10.96.0.42:80"), IpAddr::from(cl.ipv4)),
        (vip("[fd00:96::42]:80"), IpAddr::from(cl.ipv6)),
    ] {
        c.wait_answers(Host::Pod("client"), Proto::Tcp, target, START);
        let rs = c.probe(
            Host::Pod("client"),
            Proto::Tcp,
            target,
            &ProbeOpts::count(16),
        );
        let t = assert_all_from(&rs, src, &target.to_string());
        assert_eq!(t.len(), 2, "{target}: {t:?}");
    }
}
