//! Shared by the root tests: throwaway network namespaces, temp dirs and a representative rule
//! set.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kubenft_proto::v1::{self, resource};
use tracing_subscriber::fmt::MakeWriter;

/// Fails (does not skip) when not root, unless `KUBENFT_SKIP_ROOT=1`. Returns false to skip.
pub fn require_root() -> bool {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default();
    if uid == "0" {
        return true;
    }
    if std::env::var("KUBENFT_SKIP_ROOT").as_deref() == Ok("1") {
        eprintln!("not root: skipped (KUBENFT_SKIP_ROOT=1)");
        return false;
    }
    panic!("this test needs root (network namespaces, nft); set KUBENFT_SKIP_ROOT=1 to skip");
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new() -> Netns {
        let name = unique("kna");
        run("ip", &["netns", "add", &name]);
        Netns(name)
    }

    /// Runs a command inside the namespace; returns (success, stdout, stderr).
    pub fn exec(&self, argv: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(argv)
            .output()
            .expect("ip netns exec");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().expect(program);
    assert!(status.success(), "{program} {args:?} failed");
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique("kna-test"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn ep(ip: &str, port: u32, local: bool) -> v1::Endpoint {
    v1::Endpoint {
        ip: ip.into(),
        port,
        local,
        ready: true,
    }
}

pub fn port(
    family: v1::IpFamily,
    protocol: v1::Protocol,
    port: u32,
    cluster_ip: &str,
    cluster_endpoints: Vec<v1::Endpoint>,
) -> v1::ServicePortRules {
    let local_endpoints = cluster_endpoints
        .iter()
        .filter(|e| e.local)
        .cloned()
        .collect();
    v1::ServicePortRules {
        namespace: "default".into(),
        protocol: protocol as i32,
        family: family as i32,
        port,
        cluster_ip: cluster_ip.into(),
        cluster_endpoints,
        local_endpoints,
        ..Default::default()
    }
}

pub fn resource(name: &str, sp: v1::ServicePortRules) -> v1::Resource {
    v1::Resource::versioned(name.into(), resource::Kind::ServicePort(sp))
}

pub fn node_rules() -> v1::Resource {
    v1::Resource::versioned(
        "node".into(),
        resource::Kind::Node(v1::NodeRules {
            node_name: "node-a".into(),
            local_pod_cidrs: vec!["10.244.0.0/16".into(), "fd00:10:244::/56".into()],
            service_cidrs: vec!["10.96.0.0/16".into(), "fd00:10:96::/112".into()],
            node_port_ips: vec!["192.168.50.3".into(), "fd00:50::3".into()],
            node_port_all_addresses: false,
            masquerade_all: false,
            deleting: false,
            detect_local_mode: v1::DetectLocalMode::ClusterCidr as i32,
            local_interface: String::new(),
        }),
    )
}

/// Endpoints on this node, as the controller sends them (one bucket here). One of them backs
/// no port of the set: its hairpin element comes from this resource alone.
pub fn node_endpoints() -> v1::Resource {
    v1::Resource::versioned(
        "node-endpoints/3".into(),
        resource::Kind::NodeEndpoints(v1::NodeEndpoints {
            ips: vec![
                "10.244.1.5".into(),
                "10.244.1.9".into(),
                "fd00:10:244:1::5".into(),
                "fd00:10:244:1::9".into(),
            ],
        }),
    )
}

/// Per family: a ClusterIP service, a load-balancer externalTrafficPolicy=Local service with a
/// local endpoint and source ranges, and a service without endpoints.
pub fn representative() -> Vec<v1::Resource> {
    use v1::{IpFamily::*, Protocol::*};
    let mut out = vec![node_rules(), node_endpoints()];
    for (fam, suffix, c, pod) in [
        (Ipv4, "IPv4", "10.96.0.", "10.244."),
        (Ipv6, "IPv6", "fd00:10:96::", "fd00:10:244:"),
    ] {
        let pod = |node: u8, n: u8| match fam {
            Ipv4 => format!("{pod}{node}.{n}"),
            _ => format!("{pod}{node}::{n}"),
        };
        let mut web = port(
            fam,
            Tcp,
            80,
            &format!("{c}10"),
            vec![ep(&pod(1, 5), 8080, true), ep(&pod(2, 5), 8080, false)],
        );
        web.affinity = Some(v1::SessionAffinity {
            timeout_seconds: 10800,
        });
        out.push(resource(&format!("default/web/TCP/http/{suffix}"), web));
        let mut np = port(
            fam,
            Tcp,
            8443,
            &format!("{c}20"),
            vec![
                ep(&pod(1, 6), 8443, true),
                ep(&pod(2, 6), 8443, false),
                ep(&pod(3, 6), 8443, false),
            ],
        );
        np.node_port = 30443;
        np.external_traffic_local = true;
        let (lb, ranges) = match fam {
            Ipv4 => (
                "203.0.113.7",
                vec!["198.51.100.0/24".to_owned(), "192.168.50.0/24".to_owned()],
            ),
            _ => ("2001:db8::7", vec!["2001:db8:1::/48".to_owned()]),
        };
        np.load_balancer_ips = vec![lb.to_owned()];
        np.load_balancer_source_ranges = ranges;
        out.push(resource(
            &format!("default/np-local/TCP/https/{suffix}"),
            np,
        ));
        let mut dns = port(fam, Udp, 53, &format!("{c}30"), vec![]);
        dns.node_port = 30053;
        out.push(resource(&format!("default/empty/UDP/dns/{suffix}"), dns));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Log lines written while it is the thread's default subscriber.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
