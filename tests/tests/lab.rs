//! Real-namespace tests of the lab itself: topology, echo server and probe, cleanup.
//!
//! These need root and fail (not skip) without it: a lab that silently does not run proves
//! nothing. The last tests start the real controller and agents (`cargo build --bins` first;
//! `scripts/test.sh` does it).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use kubenft_lab::probe::tally;
use kubenft_lab::topology::{EXT_V4, EXT_V6};
use kubenft_lab::{
    EchoPorts, Host, Lab, LabConfig, ProbeOpts, ProbeResult, Proto, netns, wait_until,
};

const TCP: u16 = 8080;
const UDP: u16 = 5353;

fn lab(nodes: &[&str]) -> Lab {
    Lab::new(LabConfig {
        nodes: nodes.iter().map(|n| (*n).into()).collect(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("building the lab: {e}"))
}

fn ports() -> EchoPorts {
    EchoPorts::tcp_udp(&[TCP], &[UDP])
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[track_caller]
fn assert_ok_from(r: &ProbeResult, server: &str, client_ip: impl Into<IpAddr>) {
    let client_ip = client_ip.into();
    match r {
        ProbeResult::Ok {
            server: s, client, ..
        } => {
            assert_eq!(s, server, "answered by the wrong server: {r}");
            assert_eq!(client.ip(), client_ip, "server saw the wrong client: {r}");
        }
        other => panic!("expected an answer from {server}, got {other}"),
    }
}

fn netns_names() -> BTreeSet<String> {
    netns::list().unwrap().into_iter().collect()
}

#[test]
fn smoke_pod_to_pod_across_nodes() {
    let lab = lab(&["a", "b"]);
    let web1 = lab.add_pod("web-1", "a", &ports()).unwrap();
    let web2 = lab.add_pod("web-2", "b", &ports()).unwrap();
    let client = lab.add_pod("client", "a", &EchoPorts::tcp(&[TCP])).unwrap();
    assert_eq!(web1.ipv4.to_string(), "10.244.1.11");
    assert_eq!(client.ipv4.to_string(), "10.244.1.12");
    assert_eq!(web2.ipv6.to_string(), "fd00:244:2::11");
    let from = Host::Pod("client");

    // TCP and UDP, IPv4 and IPv6, pod on node a -> pod on node b: no NAT anywhere.
    for (target, client_ip) in [
        (web2.sock_v4(TCP), IpAddr::from(client.ipv4)),
        (web2.sock_v6(TCP), IpAddr::from(client.ipv6)),
    ] {
        let r = lab.probe_once(from, Proto::Tcp, target).unwrap();
        assert_ok_from(&r, "web-2", client_ip);
        let r = lab
            .probe_once(from, Proto::Udp, sock(target.ip(), UDP))
            .unwrap();
        assert_ok_from(&r, "web-2", client_ip);
    }

    // Several sequential connections; payloads echoed intact (TCP 1 MB, UDP 2000 bytes,
    // which is fragmented on the 1500-byte veths).
    for (proto, target, count, payload) in [
        (Proto::Tcp, web2.sock_v4(TCP), 20, 1 << 20),
        (Proto::Udp, web2.sock_v6(UDP), 5, 2000),
    ] {
        let opts = ProbeOpts::count(count).payload(payload);
        let rs = lab.probe(from, proto, target, &opts).unwrap();
        assert!(
            rs.iter().all(|r| matches!(
                r,
                ProbeResult::Ok {
                    echo_ok: Some(true),
                    ..
                }
            )),
            "{proto} {target}, {count} × {payload} bytes: {rs:?}"
        );
    }

    // A fixed source port is kept (what UDP conntrack tests rely on).
    let rs = lab
        .probe(
            from,
            Proto::Udp,
            web2.sock_v4(UDP),
            &ProbeOpts::count(3).source_port(12345),
        )
        .unwrap();
    for r in &rs {
        assert_eq!(r.client(), Some(sock(client.ipv4, 12345)), "{r}");
    }

    // Host network of node b -> pod on node a: the node's own fabric IP is the source.
    let r = lab
        .probe_once(Host::Node("b"), Proto::Tcp, web1.sock_v4(TCP))
        .unwrap();
    assert_ok_from(&r, "web-1", lab.node("b").ipv4);
    // Node a -> its own pod: the node IP too (not the 169.254.1.1 gateway address).
    let r = lab
        .probe_once(Host::Node("a"), Proto::Udp, web1.sock_v4(UDP))
        .unwrap();
    assert_ok_from(&r, "web-1", lab.node("a").ipv4);

    // ext routes via node a: reaches pods on both nodes, source preserved.
    let r = lab
        .probe_once(Host::External, Proto::Tcp, web1.sock_v4(TCP))
        .unwrap();
    assert_ok_from(&r, "web-1", EXT_V4);
    let r = lab
        .probe_once(Host::External, Proto::Tcp, web2.sock_v6(TCP))
        .unwrap();
    assert_ok_from(&r, "web-2", EXT_V6);

    // Closed ports are refused (TCP RST, ICMP port unreachable for UDP).
    assert_eq!(
        lab.probe_once(from, Proto::Tcp, web2.sock_v4(9999))
            .unwrap(),
        ProbeResult::Refused
    );
    assert_eq!(
        lab.probe_once(from, Proto::Udp, web2.sock_v4(9999))
            .unwrap(),
        ProbeResult::Refused
    );
    assert_eq!(
        lab.probe_once(from, Proto::Tcp, web2.sock_v6(9999))
            .unwrap(),
        ProbeResult::Refused
    );

    // A silent drop is a timeout, not a refusal.
    lab.exec_ok(
        Host::Pod("web-2"),
        &[
            "nft",
            &format!(
                "add table inet lab; add chain inet lab in {{ type filter hook input priority 0; }}; \
                 add rule inet lab in tcp dport {TCP} drop; add rule inet lab in udp dport {UDP} drop"
            ),
        ],
    )
    .unwrap();
    let quick = ProbeOpts::count(2).timeout(Duration::from_millis(300));
    for proto_port in [(Proto::Tcp, TCP), (Proto::Udp, UDP)] {
        let rs = lab
            .probe(from, proto_port.0, web2.sock_v4(proto_port.1), &quick)
            .unwrap();
        assert_eq!(rs, vec![ProbeResult::Timeout; 2], "{proto_port:?}");
    }
    // web-1 is unaffected.
    let rs = lab
        .probe(from, Proto::Tcp, web1.sock_v4(TCP), &ProbeOpts::count(3))
        .unwrap();
    assert_eq!(tally(&rs).get("web-1"), Some(&3), "{rs:?}");

    // Removing a pod removes its namespace and route; the address stops answering.
    lab.remove_pod("web-2").unwrap();
    assert!(!netns_names().contains(&web2.ns));
    assert!(!web2.process.is_running());
    let r = lab
        .probe(
            from,
            Proto::Tcp,
            web2.sock_v4(TCP),
            &ProbeOpts::default().timeout(Duration::from_millis(300)),
        )
        .unwrap();
    assert!(!r[0].is_ok(), "{}", r[0]);
    // The name can be reused; the pod gets fresh addresses.
    let again = lab.add_pod("web-2", "b", &ports()).unwrap();
    assert_eq!(again.ipv4.to_string(), "10.244.2.12");
    assert_ok_from(
        &lab.probe_once(from, Proto::Tcp, again.sock_v4(TCP))
            .unwrap(),
        "web-2",
        client.ipv4,
    );
}

#[test]
fn echo_server_handles_concurrent_connections_and_sigterm() {
    let lab = lab(&["a"]);
    let srv = lab.add_pod("srv", "a", &ports()).unwrap();
    lab.add_pod("cli", "a", &EchoPorts::tcp(&[1])).unwrap();
    // Several probe processes at once, each with several connections.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    lab.probe(
                        Host::Pod("cli"),
                        Proto::Tcp,
                        srv.sock_v4(TCP),
                        &ProbeOpts::count(25).payload(4096),
                    )
                    .unwrap()
                })
            })
            .collect();
        for h in handles {
            let rs = h.join().unwrap();
            assert!(
                rs.iter().all(|r| matches!(
                    r,
                    ProbeResult::Ok {
                        echo_ok: Some(true),
                        ..
                    }
                )),
                "{rs:?}"
            );
        }
    });
    // SIGTERM makes the server exit cleanly (well within the grace period).
    let status = srv.process.stop().unwrap().expect("was running");
    assert!(status.success(), "{status:?}\n{}", srv.process.logs());
}

#[test]
fn managed_processes_kill_stop_restart() {
    let lab = lab(&["a"]);
    let p = lab
        .spawn("sleeper", Host::Node("a"), &["sleep", "60"])
        .unwrap();
    assert!(p.is_running());
    let first = p.pid().unwrap();
    p.kill().unwrap();
    assert!(!p.is_running());
    p.restart().unwrap();
    assert!(p.is_running());
    assert_ne!(p.pid(), Some(first));
    let status = p.stop().unwrap().unwrap();
    assert!(!status.success(), "sleep dies of SIGTERM: {status:?}");
    p.start().unwrap();
    assert!(p.is_running());
    // Left running on purpose: the lab's Drop must stop it.
}

#[test]
fn drop_removes_namespaces_and_processes() {
    let lab = lab(&["a", "b"]);
    let pod = lab.add_pod("web", "b", &ports()).unwrap();
    let sleeper = lab
        .spawn("sleeper", Host::ControlPlane, &["sleep", "60"])
        .unwrap();
    let prefix = lab.prefix().to_string();
    let ours: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // fab, cp, node-a, node-b, ext, p-web
    assert_eq!(ours.len(), 6, "{ours:?}");
    assert!(lab.dir().exists());
    let dir = lab.dir().to_path_buf();
    // A live lab survives a concurrent sweep.
    kubenft_lab::sweep_stale().unwrap();
    assert_eq!(
        netns_names()
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .count(),
        6
    );

    drop(lab);
    let left: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!pod.process.is_running());
    assert!(!sleeper.is_running());
    assert!(!dir.exists(), "lab directory left behind");
}

#[test]
fn sweep_removes_abandoned_namespaces_and_their_processes() {
    // The shape an abandoned lab has: a prefixed namespace without a live owner lock, with a
    // process still running inside (as after a SIGKILLed test).
    // The owner lock is held during setup so concurrent tests' sweeps leave it alone, then
    // released: the owner "dies".
    let prefix = format!("kn0x{}-", std::process::id());
    let name = format!("{prefix}stale");
    let owner = netns::OwnerLock::acquire(&prefix).unwrap();
    netns::add(&name).unwrap();
    let mut orphan = netns::exec_cmd(&name, &["sleep", "60"]).spawn().unwrap();
    wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        netns::run_ok(
            Command::new("ip").args(["netns", "pids", &name]),
            netns::CMD_TIMEOUT,
        )
        .map(|o| !o.stdout.is_empty())
    })
    .unwrap();
    assert!(
        kubenft_lab::sweep_stale()
            .unwrap()
            .iter()
            .all(|n| n != &name),
        "owner still alive"
    );
    assert!(netns_names().contains(&name));
    drop(owner);
    let removed = kubenft_lab::sweep_stale().unwrap();
    // A concurrently running test's sweep may have beaten us to it.
    assert!(
        removed.contains(&name) || !netns_names().contains(&name),
        "{removed:?}"
    );
    assert!(!netns_names().contains(&name));
    let start = Instant::now();
    wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        orphan.try_wait().map(|s| s.is_some())
    })
    .unwrap_or_else(|e| {
        let _ = orphan.kill();
        panic!("orphan not killed: {e}");
    });
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn manifests_are_written_atomically_and_nodes_listed() {
    let lab = lab(&["a", "b", "c"]);
    let nodes = std::fs::read_to_string(lab.manifest_dir().join("nodes.yaml")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[2]["metadata"]["name"], "c");
    assert_eq!(
        items[2]["status"]["addresses"][0]["address"],
        "192.168.50.13"
    );
    assert_eq!(items[2]["status"]["addresses"][1]["address"], "fd00:50::13");
    assert_eq!(
        items[2]["metadata"]["labels"]["topology.kubernetes.io/zone"],
        "zone-c"
    );
    lab.write_manifest("x.yaml", "{}\n").unwrap();
    assert!(lab.manifest_dir().join("x.yaml").exists());
    lab.remove_manifest("x.yaml").unwrap();
    lab.remove_manifest("x.yaml").unwrap();
    assert!(lab.write_manifest("../escape.yaml", "{}").is_err());
    // Only the manifests are in the directory (no temp files).
    let files: Vec<_> = std::fs::read_dir(lab.manifest_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, vec!["nodes.yaml"]);
    // Node c routes to a's pod CIDR via a.
    let routes = lab.exec_ok(Host::Node("c"), &["ip", "route"]).unwrap();
    assert!(
        routes.contains("10.244.1.0/24 via 192.168.50.11"),
        "{routes}"
    );
}

/// Spawns the real controller and agents. Needs their binaries (`cargo build --bins`).
#[test]
fn controller_and_agents_start() {
    let lab = lab(&["a", "b"]);
    let controller = lab.spawn_controller(&[]).unwrap();
    let agents: Vec<_> = ["a", "b"]
        .iter()
        .map(|n| lab.spawn_agent(n, &[]).unwrap())
        .collect();
    wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        lab.exec_ok(Host::ControlPlane, &["ss", "-Hltn", "sport", "=", ":9650"])
            .map(|out| !out.trim().is_empty())
    })
    .unwrap_or_else(|e| panic!("controller not listening: {e}\n{}", controller.logs()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(controller.is_running(), "{}", controller.logs());
    for a in &agents {
        assert!(a.is_running(), "{}", a.logs());
    }
    agents[0].restart().unwrap();
    assert!(agents[0].is_running());
}

/// End to end through the real controller and agents: a ClusterIP Service (v4 and v6) over
/// three pods on two nodes, then a closed Service port. Needs their binaries.
#[test]
fn cluster_ip_end_to_end() {
    use kubenft_lab::manifest::{ToJson, list};
    use kubenft_lab::{Cond, Service, Slice};

    let lab = lab(&["a", "b"]);
    let pods: Vec<_> = [("web-1", "a"), ("web-2", "b"), ("web-3", "b")]
        .iter()
        .map(|(n, node)| lab.add_pod(n, node, &ports()).unwrap())
        .collect();
    lab.add_pod("client", "a", &EchoPorts::tcp(&[1])).unwrap();
    let svc = Service::cluster_ips("web", &["10.96.0.10", "fd00:96::10"])
        .port("http", 80, TCP, Proto::Tcp)
        .port("dns", 53, UDP, Proto::Udp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .port_proto("dns", UDP, Proto::Udp)
        .endpoints(&pods, Cond::READY);
    let (v4, v6) = (slice.clone(), slice.named("web-v6").ipv6());
    lab.write_manifest("web.yaml", &list(&[&svc as &dyn ToJson, &v4, &v6]))
        .unwrap();
    let controller = lab.spawn_controller(&[]).unwrap();
    for n in ["a", "b"] {
        lab.spawn_agent(n, &[]).unwrap();
    }
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let took = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        lab.probe_once(Host::Pod("client"), Proto::Tcp, vip)
            .map(|r| r.is_ok())
    })
    .unwrap_or_else(|e| panic!("ClusterIP never answered: {e}\n{}", controller.logs()));
    eprintln!("ClusterIP answered after {took:?}");
    let client = lab.pod("client");
    for (proto, target, client_ip) in [
        (Proto::Tcp, vip, IpAddr::from(client.ipv4)),
        (
            Proto::Udp,
            "10.96.0.10:53".parse().unwrap(),
            client.ipv4.into(),
        ),
        (
            Proto::Tcp,
            "[fd00:96::10]:80".parse().unwrap(),
            client.ipv6.into(),
        ),
    ] {
        let rs = lab
            .probe(Host::Pod("client"), proto, target, &ProbeOpts::count(30))
            .unwrap();
        let t = tally(&rs);
        eprintln!("{proto} {target}: {t:?}");
        assert!(
            rs.iter()
                .all(|r| r.client().map(|c| c.ip()) == Some(client_ip)),
            "{rs:?}"
        );
        assert!(t.len() >= 2, "expected spreading over several pods: {t:?}");
    }
}

#[test]
fn missing_binaries_are_reported_clearly() {
    // A bin dir holding only the echo server: the lab builds, the controller is missing.
    let bins = std::env::temp_dir().join(format!("kubenft-lab-bins-{}", std::process::id()));
    std::fs::create_dir_all(&bins).unwrap();
    let echo = kubenft_lab::process::find_binary("kubenft-echo").unwrap();
    let link = bins.join("kubenft-echo");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(echo, &link).unwrap();
    let lab = Lab::new(LabConfig {
        nodes: vec!["a".into()],
        bin_dir: Some(bins.clone()),
    })
    .unwrap();
    let err = lab.spawn_controller(&[]).unwrap_err();
    assert!(err.to_string().contains("cargo build --bins"), "{err}");
    assert!(
        matches!(
            lab.spawn_agent("a", &[]),
            Err(kubenft_lab::LabError::MissingBinary { .. })
        ),
        "agent binary should be reported missing"
    );
    drop(lab);
    std::fs::remove_dir_all(&bins).unwrap();
}
