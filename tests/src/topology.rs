//! The lab itself: a fabric, a control-plane host, nodes, routed pods and an external client,
//! each a network namespace, plus the processes running in them.
//!
//! Why this shape (docs/behaviours.md §4.3):
//! - Every node is its own namespace, so it has its own nftables ruleset and conntrack table
//!   and node-local semantics (ETP/ITP=Local, stale UDP conntrack) are real.
//! - Pods are routed point-to-point (a /32 and /128 route per veth, the `ptp`/Calico shape),
//!   not bridged: with br_netfilter loaded on this host, bridged hairpin traffic is
//!   misrouted (docs/behaviours.md §4.2, gotcha 1), and a routed pod network keeps the proxy the only variable. A node
//!   built with [`NodeConfig::pod_bridge`] puts its pods behind a bridge instead, [`POD_BRIDGE`]
//!   with `hairpin on` on every port (kubelet's hairpin-veth), as bridge CNIs do: for
//!   `--detect-local-mode BridgeInterface`.
//! - Nodes share one L2 underlay (`br0` in the `fab` namespace); pod CIDRs are routed via
//!   the owning node's fabric address, like a flat cloud VPC.
//! - `ext` sends everything via node a, so external, LB and externalIP traffic enters the
//!   cluster through a node, as it would from a router.
//!
//! Addresses (node i = 1, 2, ...; pod k = 1, 2, ... per node):
//! `cp` 192.168.50.2 / fd00:50::2, node 192.168.50.1<i> / fd00:50::1<i>,
//! `ext` 192.168.50.100 / fd00:50::100, pods 10.244.<i>.<k+10> / fd00:244:<i>::<k+10>.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::manifest::{self, ToJson};
use crate::netns::{self, CMD_TIMEOUT, OwnerLock};
use crate::pki::{CertFiles, Pki, Usage};
use crate::probe::{ProbeOpts, ProbeResult};
use crate::process::{self, Process};
use crate::{LabError, Proto, Result};

/// The control-plane host's fabric addresses; the controller listens here.
pub const CP_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
pub const CP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 2);
/// The external client's fabric addresses.
pub const EXT_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
pub const EXT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 0x100);
/// Controller gRPC and HTTP ports (on [`CP_V4`]); the agent's own gRPC port.
pub const CONTROLLER_GRPC_PORT: u16 = 9650;
pub const CONTROLLER_HTTP_PORT: u16 = 9651;
pub const AGENT_GRPC_PORT: u16 = 9652;
/// Cluster (pod) and Service CIDRs handed to the controller by [`Lab::spawn_controller`].
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR_V6: &str = "fd00:244::/32";
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/16";
pub const SERVICE_CIDR_V6: &str = "fd00:96::/112";
/// The pods' gateway: every node-side pod veth carries these.
pub const POD_GW_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const POD_GW_V6: &str = "fe80::1";
/// Name of the file holding the lab's Node objects in the manifest directory.
pub const NODES_MANIFEST: &str = "nodes.yaml";
/// The bridge pods sit behind on a node built with [`NodeConfig::pod_bridge`].
pub const POD_BRIDGE: &str = "cbr0";

const MAX_NODES: usize = 9;
const ECHO_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// One node of a [`LabConfig`]. Converts from a name; the zone defaults to `zone-<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub zone: Option<String>,
    /// Pods attach to the bridge [`POD_BRIDGE`] rather than to routed veths.
    pub pod_bridge: bool,
}

impl NodeConfig {
    pub fn new(name: &str) -> Self {
        NodeConfig {
            name: name.to_string(),
            zone: None,
            pod_bridge: false,
        }
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.to_string());
        self
    }

    /// Puts the node's pods behind the bridge [`POD_BRIDGE`] (the bridge carries the pods'
    /// gateway addresses; each pod's veth is a bridge port with `hairpin on`), as bridge CNIs
    /// (kubenet's cbr0, the `bridge` plugin's cni0) do.
    pub fn pod_bridge(mut self) -> Self {
        self.pod_bridge = true;
        self
    }
}

impl From<&str> for NodeConfig {
    fn from(name: &str) -> Self {
        NodeConfig::new(name)
    }
}

impl From<String> for NodeConfig {
    fn from(name: String) -> Self {
        NodeConfig::new(&name)
    }
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct LabConfig {
    /// Nodes, in index order (the first is node 1). At least one, at most 9.
    pub nodes: Vec<NodeConfig>,
    /// Where to find the binaries; default `$KUBENFT_BIN_DIR`, else next to the test binary.
    pub bin_dir: Option<PathBuf>,
}

/// A node of a running lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The Kubernetes node name (`a`, `b`, ...).
    pub name: String,
    /// 1-based index; it appears in every address of the node.
    pub index: u8,
    pub zone: String,
    /// Full namespace name.
    pub ns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub pod_cidr_v4: Ipv4Net,
    pub pod_cidr_v6: Ipv6Net,
    /// The bridge its pods sit behind ([`POD_BRIDGE`]), if it was built with one.
    pub pod_bridge: Option<String>,
}

/// Listening ports of a pod's echo server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EchoPorts {
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    pub sctp: Vec<u16>,
}

impl EchoPorts {
    pub fn tcp(ports: &[u16]) -> Self {
        EchoPorts {
            tcp: ports.to_vec(),
            ..Default::default()
        }
    }

    pub fn tcp_udp(tcp: &[u16], udp: &[u16]) -> Self {
        EchoPorts {
            tcp: tcp.to_vec(),
            udp: udp.to_vec(),
            ..Default::default()
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (proto, ports) in [
            (Proto::Tcp, &self.tcp),
            (Proto::Udp, &self.udp),
            (Proto::Sctp, &self.sctp),
        ] {
            for p in ports {
                a.push(proto.flag().to_string());
                a.push(p.to_string());
            }
        }
        a
    }
}

/// A pod of a running lab: its own namespace behind a routed veth on its node, running
/// `kubenft-echo serve --name <name>`.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// The node's Kubernetes name.
    pub node: String,
    pub zone: String,
    /// Full namespace name.
    pub ns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The node-side veth (`v<k>`; a port of the node's pod bridge, if it has one).
    pub host_veth: String,
    pub ports: EchoPorts,
    /// The echo server.
    pub process: Process,
}

impl Pod {
    /// The pod's address of the same family as `like` (handy in dual-stack loops).
    pub fn ip_like(&self, like: IpAddr) -> IpAddr {
        if like.is_ipv6() {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }

    /// `ipv4:port`.
    pub fn sock_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv4.into(), port)
    }

    /// `[ipv6]:port`.
    pub fn sock_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv6.into(), port)
    }
}

/// Where a command or probe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    /// A pod, by name.
    Pod(&'a str),
    /// A node's host network, by node name.
    Node(&'a str),
    /// The external client `ext`.
    External,
    /// The control-plane host `cp`.
    ControlPlane,
    /// The fabric namespace holding `br0` (for packet captures).
    Fabric,
}

#[derive(Debug, Default)]
struct State {
    /// Every namespace created, in creation order (deleted in reverse).
    namespaces: Vec<String>,
    pods: BTreeMap<String, Pod>,
    /// Every process started, pods' echo servers included.
    processes: Vec<Process>,
    /// Next pod index per node; never reused, so a re-added pod gets fresh addresses.
    next_pod: HashMap<String, u16>,
}

/// The lab's certificates, made when the lab is built: the controller and agents run with
/// mutual TLS by default.
#[derive(Debug)]
pub struct LabTls {
    /// The CA that signs every certificate below (the controller's `--client-ca-file` and
    /// the agents' `--controller-ca-file`).
    pub pki: Pki,
    /// The controller's serving certificate: SANs the `cp` addresses and `kubenft-controller`.
    pub controller: CertFiles,
    /// Each node's certificate (CN `system:node:<name>`; SANs 127.0.0.1, ::1 and the node's
    /// addresses), by node name.
    pub nodes: BTreeMap<String, CertFiles>,
    /// An operator's client certificate (CN `kubenft:operator`), for grpcurl.
    pub operator: CertFiles,
}

impl LabTls {
    fn new(dir: &Path, nodes: &[Node]) -> Result<LabTls> {
        let pki = Pki::new(dir, "kubenft-lab-ca")?;
        let controller = pki.issue(
            "controller",
            "kubenft-controller",
            &[
                format!("IP:{CP_V4}"),
                format!("IP:{CP_V6}"),
                "DNS:kubenft-controller".into(),
                "DNS:kubenft-controller.kubenft-system.svc".into(),
            ],
            Usage::Server,
            30,
        )?;
        let nodes = nodes
            .iter()
            .map(|n| {
                let files = pki.issue_node(
                    &format!("node-{}", n.name),
                    &n.name,
                    &[n.ipv4.to_string(), n.ipv6.to_string()],
                )?;
                Ok((n.name.clone(), files))
            })
            .collect::<Result<_>>()?;
        let operator = pki.issue("operator", "kubenft:operator", &[], Usage::Client, 30)?;
        Ok(LabTls {
            pki,
            controller,
            nodes,
            operator,
        })
    }

    /// The controller's TLS flags.
    pub fn controller_args(&self) -> Vec<String> {
        vec![
            "--tls-cert-file".into(),
            self.controller.cert.display().to_string(),
            "--tls-private-key-file".into(),
            self.controller.key.display().to_string(),
            "--client-ca-file".into(),
            self.pki.ca().display().to_string(),
        ]
    }

    /// An agent's TLS flags with `files` as its certificate.
    pub fn agent_args(&self, files: &CertFiles) -> Vec<String> {
        vec![
            "--tls-cert-file".into(),
            files.cert.display().to_string(),
            "--tls-private-key-file".into(),
            files.key.display().to_string(),
            "--controller-ca-file".into(),
            self.pki.ca().display().to_string(),
        ]
    }

    /// grpcurl's TLS flags, as the operator.
    pub fn grpcurl_args(&self) -> Vec<String> {
        vec![
            "-cacert".into(),
            self.pki.ca().display().to_string(),
            "-cert".into(),
            self.operator.cert.display().to_string(),
            "-key".into(),
            self.operator.key.display().to_string(),
        ]
    }
}

/// A running lab. Dropping it stops every process and deletes every namespace it created.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    manifests: PathBuf,
    echo_bin: PathBuf,
    bin_dir: Option<PathBuf>,
    nodes: Vec<Node>,
    /// The lab's CA and certificates (see [`Lab::tls`]).
    tls: LabTls,
    state: Mutex<State>,
    // Dropped after `Drop::drop` has cleaned up, so sweepers leave us alone until then.
    _lock: OwnerLock,
}

fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Lab {
    /// Builds the lab: sweeps stale labs, then creates `fab`, `cp`, the nodes and `ext`, and
    /// writes `nodes.yaml`. On error, whatever was created is removed again.
    pub fn new(config: LabConfig) -> Result<Lab> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        if config.nodes.is_empty() || config.nodes.len() > MAX_NODES {
            return Err(LabError::Invalid(format!(
                "a lab needs 1..={MAX_NODES} nodes, got {}",
                config.nodes.len()
            )));
        }
        for (i, n) in config.nodes.iter().enumerate() {
            if !valid_name(&n.name) || config.nodes[..i].iter().any(|m| m.name == n.name) {
                return Err(LabError::Invalid(format!(
                    "node name {:?} must be unique, lowercase alphanumeric or '-'",
                    n.name
                )));
            }
        }
        netns::sweep_stale()?;
        let echo_bin = find_binary(config.bin_dir.as_deref(), "kubenft-echo")?;
        let prefix = netns::new_prefix();
        let lock = OwnerLock::acquire(&prefix)?;
        let dir = netns::lab_dir(&prefix);
        let manifests = dir.join("manifests");
        fs::create_dir_all(&manifests)
            .map_err(|e| LabError::io(format!("creating {}", manifests.display()), e))?;
        let nodes = config
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let i = (i + 1) as u8;
                Node {
                    name: n.name.clone(),
                    index: i,
                    zone: n.zone.clone().unwrap_or_else(|| format!("zone-{}", n.name)),
                    ns: format!("{prefix}node-{}", n.name),
                    ipv4: Ipv4Addr::new(192, 168, 50, 10 + i),
                    ipv6: parse_v6(&format!("fd00:50::1{i}")),
                    pod_cidr_v4: Ipv4Net::new(Ipv4Addr::new(10, 244, i, 0), 24).expect("valid /24"),
                    pod_cidr_v6: Ipv6Net::new(parse_v6(&format!("fd00:244:{i}::")), 64)
                        .expect("valid /64"),
                    pod_bridge: n.pod_bridge.then(|| POD_BRIDGE.to_string()),
                }
            })
            .collect::<Vec<Node>>();
        let tls = LabTls::new(&dir.join("pki"), &nodes)?;
        let lab = Lab {
            prefix,
            dir,
            manifests,
            echo_bin,
            bin_dir: config.bin_dir,
            nodes,
            tls,
            state: Mutex::new(State::default()),
            _lock: lock,
        };
        lab.build()?;
        Ok(lab)
    }

    fn build(&self) -> Result<()> {
        let fab = self.ns_name("fab");
        self.add_ns(&fab)?;
        netns::sysctl(
            &fab,
            &[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0",
            ],
        )?;
        netns::ip(
            Some(&fab),
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        netns::ip(Some(&fab), &["link", "set", "br0", "up"])?;

        let cp = self.ns_name("cp");
        self.add_host(&cp, "cp", CP_V4, CP_V6, &[])?;
        for node in &self.nodes {
            self.add_host(
                &node.ns,
                &format!("node-{}", node.name),
                node.ipv4,
                node.ipv6,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            )?;
        }
        for node in self.nodes.iter().filter(|n| n.pod_bridge.is_some()) {
            self.add_pod_bridge(node)?;
        }
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                let (c4, c6) = (other.pod_cidr_v4.to_string(), other.pod_cidr_v6.to_string());
                let (g4, g6) = (other.ipv4.to_string(), other.ipv6.to_string());
                netns::ip(Some(&node.ns), &["route", "add", &c4, "via", &g4])?;
                netns::ip(Some(&node.ns), &["-6", "route", "add", &c6, "via", &g6])?;
            }
        }
        let ext = self.ns_name("ext");
        self.add_host(&ext, "ext", EXT_V4, EXT_V6, &[])?;
        let gw = &self.nodes[0];
        netns::ip(
            Some(&ext),
            &["route", "add", "default", "via", &gw.ipv4.to_string()],
        )?;
        netns::ip(
            Some(&ext),
            &["-6", "route", "add", "default", "via", &gw.ipv6.to_string()],
        )?;
        self.write_manifest(NODES_MANIFEST, &self.nodes_manifest())
    }

    /// The node's pod bridge: a fixed MAC (a bridge otherwise takes its lowest port's, and
    /// pods' neighbour entries for their gateway would go stale as pods come), the pods'
    /// gateway addresses, and no ICMP redirects (pods talk to each other through the node).
    fn add_pod_bridge(&self, node: &Node) -> Result<()> {
        let mac = format!("0a:58:0a:f4:{:02x}:01", node.index);
        netns::ip(
            Some(&node.ns),
            &[
                "link",
                "add",
                POD_BRIDGE,
                "address",
                &mac,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        netns::sysctl(
            &node.ns,
            &[
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0",
            ],
        )?;
        self.routed_veth(node, POD_BRIDGE)
    }

    fn ns_name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records, then creates, a namespace with DAD off (addresses usable at once).
    fn add_ns(&self, ns: &str) -> Result<()> {
        self.state().namespaces.push(ns.to_string());
        netns::add(ns)?;
        netns::sysctl(
            ns,
            &[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )
    }

    /// A host on the fabric: namespace, sysctls, `eth0` whose peer `port` is on `br0`.
    fn add_host(
        &self,
        ns: &str,
        port: &str,
        v4: Ipv4Addr,
        v6: Ipv6Addr,
        sysctls: &[&str],
    ) -> Result<()> {
        self.add_ns(ns)?;
        if !sysctls.is_empty() {
            netns::sysctl(ns, sysctls)?;
        }
        let fab = self.ns_name("fab");
        let (v4, v6) = (format!("{v4}/24"), format!("{v6}/64"));
        netns::ip(
            None,
            &[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns",
                &fab,
            ],
        )?;
        netns::ip(Some(&fab), &["link", "set", port, "master", "br0", "up"])?;
        netns::ip(Some(ns), &["addr", "add", &v4, "dev", "eth0"])?;
        netns::ip(Some(ns), &["addr", "add", &v6, "dev", "eth0", "nodad"])?;
        netns::ip(Some(ns), &["link", "set", "eth0", "up"])
    }

    // -----------------------------------------------------------------------------------
    // accessors

    /// The per-lab namespace prefix (`kn<pid>x<n>-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab directory (logs, agent state, manifests). Kept after a failed test.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The controller's `--source dir:` directory.
    pub fn manifest_dir(&self) -> &Path {
        &self.manifests
    }

    /// The lab's certificates.
    pub fn tls(&self) -> &LabTls {
        &self.tls
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node named `name`. Panics if there is none (a test bug).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name:?} in this lab"))
    }

    fn try_node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::Unknown {
                kind: "node",
                name: name.to_string(),
            })
    }

    /// The pod named `name`. Panics if there is none (a test bug).
    pub fn pod(&self, name: &str) -> Pod {
        self.state()
            .pods
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("no pod {name:?} in this lab"))
    }

    /// All current pods.
    pub fn pods(&self) -> Vec<Pod> {
        self.state().pods.values().cloned().collect()
    }

    /// The full namespace name of `host`.
    pub fn ns(&self, host: Host<'_>) -> Result<String> {
        Ok(match host {
            Host::Pod(name) => self
                .state()
                .pods
                .get(name)
                .map(|p| p.ns.clone())
                .ok_or_else(|| LabError::Unknown {
                    kind: "pod",
                    name: name.to_string(),
                })?,
            Host::Node(name) => self.try_node(name)?.ns.clone(),
            Host::External => self.ns_name("ext"),
            Host::ControlPlane => self.ns_name("cp"),
            Host::Fabric => self.ns_name("fab"),
        })
    }

    // -----------------------------------------------------------------------------------
    // pods

    /// Creates pod `name` on node `node`: a namespace, a routed veth pair and an echo
    /// server listening on `ports` (returns once it is listening).
    pub fn add_pod(&self, name: &str, node: &str, ports: &EchoPorts) -> Result<Pod> {
        if !valid_name(name) {
            return Err(LabError::Invalid(format!(
                "pod name {name:?}: lowercase alphanumeric or '-', at most 40 characters"
            )));
        }
        let node = self.try_node(node)?.clone();
        let k = {
            let mut st = self.state();
            if st.pods.contains_key(name) {
                return Err(LabError::Invalid(format!("pod {name:?} already exists")));
            }
            let next = st.next_pod.entry(node.name.clone()).or_insert(1);
            let k = *next;
            *next += 1;
            k
        };
        if k + 10 > 254 {
            return Err(LabError::Invalid(format!(
                "node {} has no pod addresses left",
                node.name
            )));
        }
        let i = node.index;
        let host_octet = (k + 10) as u8;
        let ipv4 = Ipv4Addr::new(10, 244, i, host_octet);
        let ipv6 = parse_v6(&format!("fd00:244:{i}::{}", k + 10));
        let ns = self.ns_name(&format!("p-{name}"));
        let veth = format!("v{k}");
        self.add_ns(&ns)?;

        let (a4, a6) = (format!("{ipv4}/32"), format!("{ipv6}/128"));
        let (gw4, src4) = (POD_GW_V4.to_string(), node.ipv4.to_string());
        netns::ip(
            None,
            &[
                "link", "add", &veth, "netns", &node.ns, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ],
        )?;
        // Pod side: its addresses, a gateway that is reachable only "onlink".
        netns::ip(Some(&ns), &["addr", "add", &a4, "dev", "eth0"])?;
        netns::ip(Some(&ns), &["addr", "add", &a6, "dev", "eth0", "nodad"])?;
        netns::ip(Some(&ns), &["link", "set", "eth0", "up"])?;
        netns::ip(
            Some(&ns),
            &[
                "route", "add", "default", "via", &gw4, "dev", "eth0", "onlink",
            ],
        )?;
        netns::ip(
            Some(&ns),
            &[
                "-6", "route", "add", "default", "via", POD_GW_V6, "dev", "eth0",
            ],
        )?;
        // Node side: the gateway addresses (on the veth, or on the bridge it joins) and a host
        // route to the pod. `src` makes node-originated traffic to the pod use the node IP,
        // not 169.254.1.1.
        let dev = match &node.pod_bridge {
            Some(bridge) => {
                self.bridge_port(&node, &ns, &veth, bridge)?;
                bridge.clone()
            }
            None => {
                self.routed_veth(&node, &veth)?;
                veth.clone()
            }
        };
        netns::ip(
            Some(&node.ns),
            &["route", "add", &a4, "dev", &dev, "src", &src4],
        )?;
        netns::ip(Some(&node.ns), &["-6", "route", "add", &a6, "dev", &dev])?;

        let mut argv = vec![
            self.echo_bin.display().to_string(),
            "serve".into(),
            "--name".into(),
            name.into(),
        ];
        argv.extend(ports.args());
        let process = self.spawn_in(&format!("pod-{name}"), &ns, argv)?;
        process.wait_for_stdout(crate::echo::READY, ECHO_READY_TIMEOUT)?;
        let pod = Pod {
            name: name.to_string(),
            node: node.name.clone(),
            zone: node.zone.clone(),
            ns,
            ipv4,
            ipv6,
            host_veth: veth,
            ports: ports.clone(),
            process,
        };
        self.state().pods.insert(name.to_string(), pod.clone());
        Ok(pod)
    }

    /// A routed pod veth (or the pods' bridge): the pods' gateway addresses on it, up.
    fn routed_veth(&self, node: &Node, veth: &str) -> Result<()> {
        netns::ip(
            Some(&node.ns),
            &["addr", "add", &format!("{POD_GW_V4}/32"), "dev", veth],
        )?;
        netns::ip(
            Some(&node.ns),
            &[
                "addr",
                "add",
                &format!("{POD_GW_V6}/64"),
                "dev",
                veth,
                "nodad",
            ],
        )?;
        netns::ip(Some(&node.ns), &["link", "set", veth, "up"])
    }

    /// A pod veth as a port of `bridge` with hairpin on; the pod ignores ICMP redirects (it
    /// reaches everything through its gateway, as on a routed veth).
    fn bridge_port(&self, node: &Node, pod_ns: &str, veth: &str, bridge: &str) -> Result<()> {
        netns::sysctl(
            pod_ns,
            &[
                "net.ipv4.conf.all.accept_redirects=0",
                "net.ipv6.conf.all.accept_redirects=0",
            ],
        )?;
        netns::ip(
            Some(&node.ns),
            &["link", "set", veth, "master", bridge, "up"],
        )?;
        let out = netns::run_ok(
            &mut netns::exec_cmd(
                &node.ns,
                &["bridge", "link", "set", "dev", veth, "hairpin", "on"],
            ),
            CMD_TIMEOUT,
        );
        out.map(|_| ())
    }

    /// Stops the pod's echo server (SIGTERM) and deletes its namespace (and so its veth and
    /// the node's route to it).
    pub fn remove_pod(&self, name: &str) -> Result<()> {
        let pod = {
            let mut st = self.state();
            let pod = st.pods.remove(name).ok_or_else(|| LabError::Unknown {
                kind: "pod",
                name: name.to_string(),
            })?;
            st.processes.retain(|p| p.name() != pod.process.name());
            st.namespaces.retain(|n| *n != pod.ns);
            pod
        };
        pod.process.stop()?;
        netns::delete(&pod.ns)
    }

    // -----------------------------------------------------------------------------------
    // traffic and commands

    /// Runs `kubenft-echo probe` in `from` against `target` and returns one result per
    /// attempt.
    pub fn probe(
        &self,
        from: Host<'_>,
        proto: Proto,
        target: SocketAddr,
        opts: &ProbeOpts,
    ) -> Result<Vec<ProbeResult>> {
        let ns = self.ns(from)?;
        let mut argv = vec![
            self.echo_bin.display().to_string(),
            "probe".into(),
            proto.flag().into(),
            target.to_string(),
        ];
        argv.extend(opts.to_args());
        let out = netns::run_ok(&mut netns::exec_cmd(&ns, &argv), opts.deadline())?;
        let results = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(ProbeResult::parse_line)
            .collect::<Result<Vec<_>>>()?;
        if results.len() != opts.count as usize {
            return Err(LabError::BadProbeOutput {
                line: String::from_utf8_lossy(&out.stdout).into_owned(),
                reason: format!("expected {} results, got {}", opts.count, results.len()),
            });
        }
        Ok(results)
    }

    /// One attempt with default options (1 s timeout).
    pub fn probe_once(
        &self,
        from: Host<'_>,
        proto: Proto,
        target: SocketAddr,
    ) -> Result<ProbeResult> {
        let mut r = self.probe(from, proto, target, &ProbeOpts::default())?;
        Ok(r.remove(0))
    }

    /// Runs `argv` in `host`'s namespace with a 10 s cap; any exit status is returned.
    pub fn exec(&self, host: Host<'_>, argv: &[&str]) -> Result<Output> {
        self.exec_timeout(host, argv, CMD_TIMEOUT)
    }

    /// [`Self::exec`] with an explicit cap.
    pub fn exec_timeout(&self, host: Host<'_>, argv: &[&str], timeout: Duration) -> Result<Output> {
        netns::run(&mut netns::exec_cmd(&self.ns(host)?, argv), timeout)
    }

    /// Runs `argv` in `host`, requires success and returns stdout.
    pub fn exec_ok(&self, host: Host<'_>, argv: &[&str]) -> Result<String> {
        let out = netns::run_ok(&mut netns::exec_cmd(&self.ns(host)?, argv), CMD_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    // -----------------------------------------------------------------------------------
    // processes

    fn spawn_in(&self, name: &str, ns: &str, argv: Vec<String>) -> Result<Process> {
        self.spawn_in_with_env(name, ns, argv, Vec::new())
    }

    fn spawn_in_with_env(
        &self,
        name: &str,
        ns: &str,
        argv: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Result<Process> {
        let p = Process::spawn_with_env(name, ns, argv, env, &self.dir)?;
        self.state().processes.push(p.clone());
        Ok(p)
    }

    /// Starts an arbitrary long-running command in `host`; the lab stops it on drop.
    /// `name` names the log files (`<dir>/<name>.stdout|.stderr`).
    pub fn spawn(&self, name: &str, host: Host<'_>, argv: &[&str]) -> Result<Process> {
        let ns = self.ns(host)?;
        self.spawn_in(name, &ns, argv.iter().map(|s| s.to_string()).collect())
    }

    /// Path of a workspace binary (see [`process::find_binary`]).
    pub fn binary(&self, name: &str) -> Result<PathBuf> {
        find_binary(self.bin_dir.as_deref(), name)
    }

    /// The controller's default arguments: the manifest directory as its source, listeners
    /// on the `cp` fabric address, the lab's cluster and Service CIDRs, and TLS with the
    /// lab's certificates.
    pub fn controller_default_args(&self) -> Vec<String> {
        let mut args = self.controller_args_without_tls();
        args.extend(self.tls.controller_args());
        args
    }

    /// [`Self::controller_default_args`] without the TLS flags.
    pub fn controller_args_without_tls(&self) -> Vec<String> {
        vec![
            "--source".into(),
            format!("dir:{}", self.manifests.display()),
            "--grpc-listen".into(),
            format!("{CP_V4}:{CONTROLLER_GRPC_PORT}"),
            "--http-listen".into(),
            format!("{CP_V4}:{CONTROLLER_HTTP_PORT}"),
            "--cluster-cidr".into(),
            CLUSTER_CIDR_V4.into(),
            "--cluster-cidr".into(),
            CLUSTER_CIDR_V6.into(),
            "--service-cidr".into(),
            SERVICE_CIDR_V4.into(),
            "--service-cidr".into(),
            SERVICE_CIDR_V6.into(),
        ]
    }

    /// Starts `kubenft-controller` in `cp` with [`Self::controller_default_args`] followed
    /// by `extra`.
    pub fn spawn_controller(&self, extra: &[&str]) -> Result<Process> {
        self.spawn_controller_with_env(extra, &[])
    }

    /// [`Self::spawn_controller`] with environment variables `env` set for the controller
    /// (e.g. `KUBENFT_ACK_DEADLINE_MS`).
    pub fn spawn_controller_with_env(
        &self,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Process> {
        let mut argv = vec![self.binary("kubenft-controller")?.display().to_string()];
        argv.extend(self.controller_default_args());
        argv.extend(extra.iter().map(|s| s.to_string()));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn_in_with_env("controller", &self.ns_name("cp"), argv, env)
    }

    /// The agent's default arguments for `node`: TLS with the node's certificate, the
    /// controller at `https://CP:9650`.
    pub fn agent_default_args(&self, node: &str) -> Result<Vec<String>> {
        let mut args = self.agent_args_without_tls(node)?;
        args.push("--controller".into());
        args.push(format!("https://{CP_V4}:{CONTROLLER_GRPC_PORT}"));
        args.extend(self.tls.agent_args(&self.tls.nodes[node]));
        Ok(args)
    }

    /// [`Self::agent_default_args`] without the controller URL and the TLS flags.
    pub fn agent_args_without_tls(&self, node: &str) -> Result<Vec<String>> {
        let node = self.try_node(node)?;
        Ok(vec![
            "--node-name".into(),
            node.name.clone(),
            "--state-dir".into(),
            self.dir
                .join(format!("state-{}", node.name))
                .display()
                .to_string(),
            "--grpc-listen".into(),
            format!("0.0.0.0:{AGENT_GRPC_PORT}"),
        ])
    }

    /// Starts `kubenft-agent` in `node`'s namespace with [`Self::agent_default_args`]
    /// followed by `extra`. Its state directory is created first.
    pub fn spawn_agent(&self, node: &str, extra: &[&str]) -> Result<Process> {
        self.spawn_agent_with_env(node, extra, &[])
    }

    /// [`Self::spawn_agent`] with environment variables `env` set for the agent (e.g.
    /// `KUBENFT_NFT`, the nft binary it runs).
    pub fn spawn_agent_with_env(
        &self,
        node: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Process> {
        let bin = self.binary("kubenft-agent")?;
        let args = self.agent_default_args(node)?;
        let state = self.dir.join(format!("state-{node}"));
        fs::create_dir_all(&state)
            .map_err(|e| LabError::io(format!("creating {}", state.display()), e))?;
        let mut argv = vec![bin.display().to_string()];
        argv.extend(args);
        argv.extend(extra.iter().map(|s| s.to_string()));
        let ns = self.try_node(node)?.ns.clone();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn_in_with_env(&format!("agent-{node}"), &ns, argv, env)
    }

    // -----------------------------------------------------------------------------------
    // manifests

    /// The Node object for lab node `name` (InternalIPs, hostname and zone labels, and its
    /// pod ranges as `spec.podCIDRs`); modify and write it back to change nodes.yaml.
    pub fn node_manifest(&self, name: &str) -> manifest::Node {
        let n = self.node(name);
        manifest::Node::new(&n.name)
            .address(n.ipv4)
            .address(n.ipv6)
            .zone(&n.zone)
            .pod_cidrs(&[n.pod_cidr_v4.into(), n.pod_cidr_v6.into()])
    }

    /// All lab nodes as a `kind: List` (what [`NODES_MANIFEST`] holds initially).
    pub fn nodes_manifest(&self) -> String {
        let nodes: Vec<manifest::Node> = self
            .nodes
            .iter()
            .map(|n| self.node_manifest(&n.name))
            .collect();
        let refs: Vec<&dyn ToJson> = nodes.iter().map(|n| n as &dyn ToJson).collect();
        manifest::list(&refs)
    }

    /// Atomically writes (creates or replaces) `file` in the manifest directory: the content
    /// is written outside the directory and renamed in, so the controller never reads a
    /// half-written file.
    pub fn write_manifest(&self, file: &str, contents: &str) -> Result<()> {
        let target = self.manifest_path(file)?;
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, contents)
            .map_err(|e| LabError::io(format!("writing {}", tmp.display()), e))?;
        fs::rename(&tmp, &target)
            .map_err(|e| LabError::io(format!("renaming to {}", target.display()), e))
    }

    /// Removes `file` from the manifest directory (no error if it is absent).
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        let target = self.manifest_path(file)?;
        match fs::remove_file(&target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(LabError::io(format!("removing {}", target.display()), e))
            }
            _ => Ok(()),
        }
    }

    fn manifest_path(&self, file: &str) -> Result<PathBuf> {
        if file.is_empty() || file.contains('/') || file.starts_with('.') {
            return Err(LabError::Invalid(format!("manifest file name {file:?}")));
        }
        Ok(self.manifests.join(file))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let st = std::mem::take(self.state.get_mut().unwrap_or_else(|e| e.into_inner()));
        if panicking {
            eprintln!(
                "kubenft-lab {}: test failed; lab directory {}",
                self.prefix,
                self.dir.display()
            );
            for p in &st.processes {
                eprintln!("{}", p.log_tail(30));
            }
        }
        // Stop everything in parallel: SIGTERM, then SIGKILL after the grace period.
        std::thread::scope(|s| {
            for p in &st.processes {
                s.spawn(move || {
                    if let Err(e) = p.stop() {
                        eprintln!("kubenft-lab: stopping {}: {e}", p.name());
                    }
                });
            }
        });
        for ns in st.namespaces.iter().rev() {
            if let Err(e) = netns::delete(ns) {
                eprintln!("kubenft-lab: deleting namespace {ns}: {e}");
            }
        }
        if !panicking && std::env::var_os("KUBENFT_LAB_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn find_binary(dir: Option<&Path>, name: &str) -> Result<PathBuf> {
    match dir {
        Some(d) => {
            let p = d.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(LabError::MissingBinary {
                    name: name.to_string(),
                    searched: vec![d.to_path_buf()],
                })
            }
        }
        None => process::find_binary(name),
    }
}

fn parse_v6(s: &str) -> Ipv6Addr {
    s.parse()
        .unwrap_or_else(|e| panic!("lab address {s:?} is not IPv6: {e}"))
}
