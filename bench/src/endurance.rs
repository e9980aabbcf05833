//! Suite 9: endurance — endpoint churn for a long time (30 minutes by default) against the
//! real controller, two real agents applying nft and simulated agents, asserting that nothing
//! leaks: memory, nft objects, conntrack entries, descriptors, child processes.
//!
//! ```text
//!  cp      kubenft-controller --source dir:<manifests>   ◀── churn: one EndpointSlice file
//!            │ gRPC, mutual TLS                               rewritten 20 times a second
//!            ├── node a  kubenft-agent → nft   client pod ── TCP + UDP probes ──▶ traffic
//!            ├── node b  kubenft-agent → nft                    Services (pool pods on a, b)
//!            └── 48 simulated agents (this process, a thread in `cp`): ACK every Change
//! ```
//!
//! Every ~tenth of the run a checkpoint pauses the churn, waits until the controller's rule
//! set for node a equals the workload's truth and every node has acknowledged its rule set,
//! then counts the objects in both real agents' tables against what their rule sets call for,
//! and the conntrack entries of node a (where the client pod's flows are DNATed); then the
//! churn resumes. The processes' memory, descriptors and children are sampled every 5 s.

mod fleet;
mod observe;
mod traffic;
mod world;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kubenft_lab::manifest::{ToJson, list};
use kubenft_lab::topology::{CONTROLLER_GRPC_PORT, CP_V4};
use kubenft_lab::{EchoPorts, Host, Lab, LabConfig, NodeManifest, Process, Proto};
use kubenft_proto::v1::{self, resource};

use crate::programming::BinDir;
use crate::report::{Table, mib, percentile};
use fleet::Fleet;
use observe::{Objects, ProcSample};
use traffic::Probe;
use world::World;

const LAB_NODES: [&str; 2] = ["a", "b"];
const CLIENT: &str = "client";
const TRAFFIC_SERVICES: usize = 3;
const POOL_PER_NODE: usize = 3;
/// How often memory, descriptors and children are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Checkpoints after the one at the start (the time series' rows).
const ROWS: u32 = 10;
/// The initial sync of every node may take this long.
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// A checkpoint waits this long for the controller and every node to catch up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a kernel count may take to equal the desired one once the node has ACKed.
const KERNEL_SETTLE: Duration = Duration::from_secs(3);
const RSS_GROWTH_LIMIT: f64 = 0.10;

#[derive(Clone, Debug)]
pub struct Options {
    pub duration: Duration,
    /// EndpointSlice changes per second.
    pub rate: f64,
    pub services: u32,
    /// Nodes in all: the two lab nodes and simulated ones.
    pub nodes: u32,
    /// Pause between a probe's attempts.
    pub probe_interval: Duration,
}

impl Options {
    fn check(&self) -> anyhow::Result<()> {
        if self.duration < Duration::from_secs(30) {
            bail!(
                "--endurance-secs must be at least 30, got {}",
                self.duration.as_secs()
            );
        }
        if !(self.rate > 0.0 && self.rate <= 500.0) {
            bail!("--endurance-rate must be in (0, 500], got {}", self.rate);
        }
        // Bulk ClusterIPs are 10.96.16.0 + i, inside the lab's 10.96.0.0/16.
        if !(TRAFFIC_SERVICES as u32 + 1..=40_000).contains(&self.services) {
            bail!(
                "--endurance-services must be {}-40000, got {}",
                TRAFFIC_SERVICES + 1,
                self.services
            );
        }
        if !(2..=5_000).contains(&self.nodes) {
            bail!(
                "--endurance-nodes must be 2-5000 (2 lab nodes + simulated), got {}",
                self.nodes
            );
        }
        if self.probe_interval < Duration::from_millis(10) {
            bail!("--endurance-probe-interval-ms must be at least 10");
        }
        Ok(())
    }

    fn secs(&self) -> f64 {
        self.duration.as_secs_f64()
    }
}

/// The processes watched: the controller, agent a, agent b.
const WATCHED: [&str; 3] = ["controller", "agent a", "agent b"];

/// One periodic sample.
struct Sample {
    at: Duration,
    procs: Vec<Option<ProcSample>>,
}

/// One checkpoint: a row of the time series.
struct Row {
    at: Duration,
    changes: u64,
    procs: Vec<Option<ProcSample>>,
    /// Per lab node: what the kernel holds, what the rule set calls for.
    objects: Vec<(Option<Objects>, Option<Objects>)>,
    flows: Option<u64>,
    stale_udp: Option<usize>,
    ack_lag: Vec<f64>,
    change_lag: Vec<f64>,
    settle: Duration,
    problems: Vec<String>,
}

/// Everything the run shares between its threads.
struct Run<'a> {
    lab: &'a Lab,
    opts: &'a Options,
    world: Arc<Mutex<World>>,
    fleet: &'a Fleet,
    pids: Vec<u32>,
    nodes_total: usize,
}

/// Runs suite 9 (blocking: the lab drives processes synchronously).
pub fn run(opts: &Options, controller: &Path, agent: &Path) -> anyhow::Result<Vec<Table>> {
    opts.check()?;
    let bins = BinDir::create(controller, agent)?;
    let lab = Lab::new(LabConfig {
        nodes: LAB_NODES.iter().map(|n| (*n).into()).collect(),
        bin_dir: Some(bins.0.clone()),
    })
    .context("building the lab (needs root)")?;
    let sims: Vec<String> = (3..=opts.nodes).map(|i| format!("n{i}")).collect();
    write_sim_nodes(&lab, &sims)?;
    lab.add_pod(CLIENT, "a", &EchoPorts::tcp(&[9]))?;
    let mut pool = Vec::new();
    for node in LAB_NODES {
        for i in 0..POOL_PER_NODE {
            pool.push(lab.add_pod(
                &format!("e-{node}-{i}"),
                node,
                &EchoPorts::tcp_udp(&[world::POD_TCP_PORT], &[world::POD_UDP_PORT]),
            )?);
        }
    }
    let nodes: Vec<String> = LAB_NODES
        .iter()
        .map(|n| (*n).to_owned())
        .chain(sims.iter().cloned())
        .collect();
    let world = World::new(opts.services as usize, TRAFFIC_SERVICES, nodes, pool);
    for w in world.initial_files() {
        lab.write_manifest(&w.file, &w.text)?;
    }
    let certs_started = Instant::now();
    let agents = sim_certs(&lab, &sims)?;
    eprintln!(
        "suite 9: {} simulated node certificates in {:.1} s",
        sims.len(),
        certs_started.elapsed().as_secs_f64()
    );
    // Quiet logs: 30 minutes of churn at info would fill the disk with per-change lines.
    let controller = lab.spawn_controller_with_env(&[], &[("RUST_LOG", "warn")])?;
    let mut procs = vec![controller];
    for n in LAB_NODES {
        procs.push(lab.spawn_agent_with_env(n, &[], &[("RUST_LOG", "warn")])?);
    }
    let fleet = Fleet::start(fleet::Config {
        netns: Path::new("/run/netns").join(lab.ns(Host::ControlPlane)?),
        controller: SocketAddr::new(CP_V4.into(), CONTROLLER_GRPC_PORT),
        agents,
        operator: kubenft_tls::ClientFiles {
            cert: lab.tls().operator.cert.clone(),
            key: lab.tls().operator.key.clone(),
            ca: lab.tls().pki.ca(),
        },
    })?;
    let pids: Vec<u32> = procs.iter().map(|p| p.pid().unwrap_or(0)).collect();
    let run = Run {
        lab: &lab,
        opts,
        world: Arc::new(Mutex::new(world)),
        fleet: &fleet,
        pids,
        nodes_total: opts.nodes as usize,
    };
    let logs = |e: anyhow::Error| anyhow::anyhow!("{e:#}\n{}", log_tails(&procs));
    let sync_started = Instant::now();
    run.wait_synced(SYNC_TIMEOUT).map_err(logs)?;
    let initial_sync = sync_started.elapsed();
    eprintln!(
        "suite 9: {} nodes synchronised in {:.1} s",
        opts.nodes,
        initial_sync.as_secs_f64()
    );
    let probes = run.start_probes()?;
    run.wait_answered(&probes).map_err(logs)?;
    // What the initial sync left: its latencies, and the simulated agents' retries while the
    // controller was still starting, are no part of the churn's figures.
    let restarts_at_sync = fleet.shared.restarts.load(Ordering::Relaxed);
    fleet.shared.last_error.lock().expect("lock").take();
    fleet.shared.start_counting();
    let outcome = run.churn_and_watch(&procs);
    let end = run.end_flows();
    let bulk_endpoints = run.world.lock().expect("lock").bulk_endpoints();
    let tallies = probe_tallies(&probes);
    drop(probes);
    let restarts = fleet.shared.restarts.load(Ordering::Relaxed) - restarts_at_sync;
    let fleet_error = fleet.shared.last_error.lock().expect("lock").clone();
    drop(fleet);
    let facts = Facts {
        opts,
        sims: sims.len(),
        initial_sync,
        bulk_endpoints,
        restarts,
        fleet_error,
        tallies,
        end,
    };
    Ok(vec![
        series_table(&facts, &outcome),
        verdict_table(&facts, &outcome),
    ])
}

fn log_tails(procs: &[Process]) -> String {
    procs.iter().map(|p| p.log_tail(20)).collect()
}

/// Node objects for the simulated nodes (the lab writes its own nodes' file).
fn write_sim_nodes(lab: &Lab, sims: &[String]) -> anyhow::Result<()> {
    let base = u32::from(std::net::Ipv4Addr::new(172, 16, 0, 0));
    let nodes: Vec<NodeManifest> = sims
        .iter()
        .enumerate()
        .map(|(i, name)| {
            NodeManifest::new(name).address(std::net::Ipv4Addr::from(base + 1 + i as u32))
        })
        .collect();
    if nodes.is_empty() {
        return Ok(());
    }
    let refs: Vec<&dyn ToJson> = nodes.iter().map(|n| n as &dyn ToJson).collect();
    lab.write_manifest("sim-nodes.yaml", &list(&refs))?;
    Ok(())
}

/// A certificate per simulated node (CN `system:node:<name>`), signed by the lab's CA.
fn sim_certs(
    lab: &Lab,
    sims: &[String],
) -> anyhow::Result<Vec<(String, kubenft_tls::ClientFiles)>> {
    sims.iter()
        .map(|name| {
            let files = lab
                .tls()
                .pki
                .issue_node(&format!("sim-{name}"), name, &[])?;
            Ok((
                name.clone(),
                kubenft_tls::ClientFiles {
                    cert: files.cert,
                    key: files.key,
                    ca: lab.tls().pki.ca(),
                },
            ))
        })
        .collect()
}

/// What the run left behind, for the tables.
struct Facts<'a> {
    opts: &'a Options,
    sims: usize,
    initial_sync: Duration,
    bulk_endpoints: usize,
    restarts: u32,
    fleet_error: Option<String>,
    tallies: Vec<(String, u64, u64, u64)>,
    end: anyhow::Result<EndFlows>,
}

/// The series and how the churn went.
struct Outcome {
    samples: Vec<Sample>,
    rows: Vec<Row>,
    churn: ChurnStats,
    stopped: Option<String>,
}

#[derive(Default)]
struct ChurnStats {
    written: AtomicU64,
    /// Changes that fell more than a second behind schedule (the schedule then restarts).
    late: AtomicU64,
    error: Mutex<Option<String>>,
    running: Mutex<Duration>,
}

impl Run<'_> {
    /// Whether node a's rule set equals the truth and every node acknowledged its own.
    fn settled(&self, expected: &[Expected]) -> anyhow::Result<Option<String>> {
        let rules = self.fleet.rules(LAB_NODES[0])?;
        let wrong = mismatches(expected, &rules);
        if wrong > 0 {
            return Ok(Some(format!(
                "{wrong} Service ports of node a's rule set differ from the workload"
            )));
        }
        let nodes = self.fleet.nodes()?;
        let synced = nodes
            .iter()
            .filter(|n| {
                n.state == v1::SyncState::Synced as i32 && n.desired_version == n.acked_version
            })
            .count();
        if synced < self.nodes_total {
            return Ok(Some(format!(
                "{synced} of {} nodes synced",
                self.nodes_total
            )));
        }
        Ok(None)
    }

    fn wait_settled(&self, timeout: Duration) -> anyhow::Result<()> {
        let expected = expected_of(&self.world.lock().expect("lock"));
        let started = Instant::now();
        loop {
            let why = match self.settled(&expected) {
                Ok(None) => return Ok(()),
                Ok(Some(why)) => why,
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() > timeout {
                bail!("not settled within {timeout:?}: {why}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_synced(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_settled(timeout)
            .context("the initial sync did not complete")
    }

    fn start_probes(&self) -> anyhow::Result<Vec<Probe>> {
        let echo = self.lab.binary(crate::programming::ECHO_NAME)?;
        let ns = self.lab.ns(Host::Pod(CLIENT))?;
        // Every TCP probe connects from one address to one address and port.
        kubenft_lab::netns::sysctl(&ns, &["net.ipv4.tcp_tw_reuse=1"])?;
        let vips: Vec<_> = {
            let w = self.world.lock().expect("lock");
            w.traffic.iter().map(|t| t.vip()).collect()
        };
        let mut probes = Vec::new();
        for (k, vip) in vips.into_iter().enumerate() {
            for (proto, port) in [
                (Proto::Tcp, world::TRAFFIC_TCP_PORT),
                (Proto::Udp, world::TRAFFIC_UDP_PORT),
            ] {
                probes.push(Probe::start(
                    &echo,
                    &ns,
                    k,
                    proto,
                    SocketAddr::new(vip.into(), port),
                    self.opts.probe_interval,
                    self.world.clone(),
                )?);
            }
        }
        Ok(probes)
    }

    /// Waits until every probe has been answered once (the traffic Services work).
    fn wait_answered(&self, probes: &[Probe]) -> anyhow::Result<()> {
        let started = Instant::now();
        while probes
            .iter()
            .any(|p| p.tally.answered.load(Ordering::Relaxed) == 0)
        {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("a traffic Service never answered its probe");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The churn in one thread; samples and checkpoints in this one.
    fn churn_and_watch(&self, procs: &[Process]) -> Outcome {
        let stop = AtomicBool::new(false);
        let stats = ChurnStats::default();
        let mut samples = Vec::new();
        let mut rows = vec![self.checkpoint(Duration::ZERO, 0)];
        let mut stopped = None;
        std::thread::scope(|s| {
            s.spawn(|| self.churn(&stop, &stats));
            let started = Instant::now();
            let row_at = |i: u32| self.opts.duration.mul_f64(f64::from(i) / f64::from(ROWS));
            let mut next_sample = Duration::ZERO;
            let mut next_row = 1;
            while next_row <= ROWS {
                let now = started.elapsed();
                if now >= row_at(next_row) {
                    if next_row == ROWS {
                        // The last checkpoint ends the churn: nothing resumes after it.
                        stop.store(true, Ordering::Relaxed);
                    }
                    rows.push(self.checkpoint(now, next_row));
                    next_row += 1;
                    continue;
                }
                if now >= next_sample {
                    samples.push(Sample {
                        at: now,
                        procs: observe::sample(&self.pids),
                    });
                    next_sample += SAMPLE_EVERY;
                }
                if let Some(dead) = procs.iter().find(|p| !p.is_running()) {
                    stopped = Some(format!(
                        "{} exited at {:.0} s",
                        dead.name(),
                        now.as_secs_f64()
                    ));
                    break;
                }
                if let Some(e) = stats.error.lock().expect("lock").clone() {
                    stopped = Some(format!("churn stopped: {e}"));
                    break;
                }
                let wake = next_sample.min(row_at(next_row));
                std::thread::sleep(wake.saturating_sub(started.elapsed()).min(SAMPLE_EVERY));
            }
            stop.store(true, Ordering::Relaxed);
        });
        Outcome {
            samples,
            rows,
            churn: stats,
            stopped,
        }
    }

    /// Writes changes at the configured rate until `stop`, none while a checkpoint holds the
    /// pause; a schedule fallen a second behind restarts from now rather than bursting.
    fn churn(&self, stop: &AtomicBool, stats: &ChurnStats) {
        let period = Duration::from_secs_f64(1.0 / self.opts.rate);
        // Bounded whatever happens to the clock: the planned count and a margin.
        let cap = (self.opts.rate * (self.opts.secs() + 60.0)) as u64;
        let started = Instant::now();
        let mut next = Instant::now();
        let mut paused_for = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) && stats.written.load(Ordering::Relaxed) < cap {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
                continue;
            }
            let mut w = self.world.lock().expect("lock");
            if w.paused {
                drop(w);
                std::thread::sleep(Duration::from_millis(5));
                paused_for += Duration::from_millis(5);
                next = Instant::now();
                continue;
            }
            let write = w.change();
            if let Err(e) = self.lab.write_manifest(&write.file, &write.text) {
                *stats.error.lock().expect("lock") = Some(format!("writing {}: {e}", write.file));
                return;
            }
            drop(w);
            stats.written.fetch_add(1, Ordering::Relaxed);
            next += period;
            if Instant::now() > next + Duration::from_secs(1) {
                stats.late.fetch_add(1, Ordering::Relaxed);
                next = Instant::now();
            }
        }
        *stats.running.lock().expect("lock") = started.elapsed().saturating_sub(paused_for);
    }

    /// Pauses the churn, waits for everything to settle, counts; resumes unless it is the last.
    fn checkpoint(&self, at: Duration, index: u32) -> Row {
        let started = Instant::now();
        self.world.lock().expect("lock").paused = true;
        let changes = self.world.lock().expect("lock").changes;
        let mut problems = Vec::new();
        if let Err(e) = self.wait_settled(SETTLE_TIMEOUT) {
            problems.push(format!("{e:#}"));
        }
        let expected = expected_of(&self.world.lock().expect("lock"));
        let objects = LAB_NODES
            .iter()
            .map(|n| self.objects(n, &expected, &mut problems))
            .collect();
        let flows = observe::flow_count(self.lab, LAB_NODES[0])
            .map_err(|e| problems.push(format!("{e:#}")))
            .ok();
        let stale_udp = self
            .stale_udp()
            .map_err(|e| problems.push(format!("{e:#}")))
            .ok();
        let procs = observe::sample(&self.pids);
        let (ack_lag, change_lag) = self.fleet.shared.drain();
        let settle = started.elapsed();
        if index < ROWS {
            self.world.lock().expect("lock").paused = false;
        }
        eprintln!(
            "suite 9: checkpoint {index} at {:.0} s: {changes} changes, settled in {:.1} s{}",
            at.as_secs_f64(),
            settle.as_secs_f64(),
            if problems.is_empty() {
                String::new()
            } else {
                format!("; {}", problems.join("; "))
            }
        );
        Row {
            at,
            changes,
            procs,
            objects,
            flows,
            stale_udp,
            ack_lag,
            change_lag,
            settle,
            problems,
        }
    }

    /// The kernel's objects on `node` and those its rule set calls for; the kernel is listed
    /// again (for up to [`KERNEL_SETTLE`]) while they differ.
    fn objects(
        &self,
        node: &str,
        expected: &[Expected],
        problems: &mut Vec<String>,
    ) -> (Option<Objects>, Option<Objects>) {
        let desired = self.fleet.rules(node).and_then(|r| {
            // The rule set is the workload's (node a's was checked to settle; b's here).
            let wrong = mismatches(expected, &r);
            if wrong > 0 {
                problems.push(format!(
                    "{wrong} Service ports of node {node}'s rule set differ from the workload"
                ));
            }
            observe::desired_objects(r.resources)
        });
        let desired = match desired {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("desired objects of {node}: {e:#}"));
                return (observe::kernel_objects(self.lab, node).ok(), None);
            }
        };
        let started = Instant::now();
        loop {
            match observe::kernel_objects(self.lab, node) {
                Ok(k) if k == desired || started.elapsed() > KERNEL_SETTLE => {
                    return (Some(k), Some(desired));
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => {
                    problems.push(format!("{e:#}"));
                    return (None, Some(desired));
                }
            }
        }
    }

    /// UDP entries of node a to a traffic Service whose endpoint no longer serves it.
    fn stale_udp(&self) -> anyhow::Result<usize> {
        let flows = observe::flows(self.lab, LAB_NODES[0], "udp")?;
        let w = self.world.lock().expect("lock");
        Ok(flows
            .iter()
            .filter(|f| matches!(to_former(&w, f, world::TRAFFIC_UDP_PORT), Some(true)))
            .count())
    }

    /// Node a's entries to the traffic Services once the churn has ended.
    fn end_flows(&self) -> anyhow::Result<EndFlows> {
        let w = self.world.lock().expect("lock");
        let mut end = EndFlows::default();
        for f in observe::flows(self.lab, LAB_NODES[0], "udp")? {
            match to_former(&w, &f, world::TRAFFIC_UDP_PORT) {
                Some(true) => end.udp_former += 1,
                Some(false) => end.udp_current += 1,
                None => {}
            }
        }
        for f in observe::flows(self.lab, LAB_NODES[0], "tcp")? {
            match to_former(&w, &f, world::TRAFFIC_TCP_PORT) {
                Some(true) => {
                    *end.tcp_former.entry(f.state.clone()).or_default() += 1;
                    end.tcp_former_max_timeout = end.tcp_former_max_timeout.max(f.timeout);
                }
                Some(false) => end.tcp_current += 1,
                None => {}
            }
        }
        Ok(end)
    }
}

/// For an entry to a traffic Service's address and `port`: whether its endpoint (where
/// replies come from) no longer serves that Service. `None` for other entries.
fn to_former(w: &World, f: &observe::Flow, port: u16) -> Option<bool> {
    if f.orig_dport != port {
        return None;
    }
    let k = w
        .traffic
        .iter()
        .position(|t| IpAddr::from(t.vip()) == f.orig_dst)?;
    let IpAddr::V4(reply) = f.reply_src else {
        return Some(true);
    };
    Some(!w.traffic_endpoint_ips(k).contains(&reply))
}

/// Node a's conntrack entries to the traffic Services at the end.
#[derive(Default)]
struct EndFlows {
    udp_current: usize,
    udp_former: usize,
    tcp_current: usize,
    /// Entries to former endpoints by TCP state.
    tcp_former: std::collections::BTreeMap<String, usize>,
    tcp_former_max_timeout: u64,
}

/// TCP states in which the kernel ends an entry on its own within two minutes.
const CLOSING: [&str; 5] = ["TIME_WAIT", "CLOSE", "FIN_WAIT", "LAST_ACK", "CLOSE_WAIT"];

type Expected = ((String, String, String), BTreeSet<String>);

fn expected_of(w: &World) -> Vec<Expected> {
    w.expected_ports()
}

/// How many Service ports of `rules` differ from the truth (missing, extra, or with other
/// endpoint addresses).
fn mismatches(expected: &[Expected], rules: &v1::NodeRuleSet) -> usize {
    let mut got = std::collections::BTreeMap::new();
    for r in &rules.resources {
        if let Some(resource::Kind::ServicePort(sp)) = &r.kind {
            let ips: BTreeSet<String> = sp.cluster_endpoints.iter().map(|e| e.ip.clone()).collect();
            got.insert(
                (
                    sp.namespace.clone(),
                    sp.service.clone(),
                    sp.port_name.clone(),
                ),
                ips,
            );
        }
    }
    let wrong = expected
        .iter()
        .filter(|(key, ips)| got.get(key) != Some(ips))
        .count();
    wrong + got.len().saturating_sub(expected.len())
}

fn probe_tallies(probes: &[Probe]) -> Vec<(String, u64, u64, u64)> {
    probes
        .iter()
        .map(|p| {
            let t = &p.tally;
            (
                format!("t{} {}", p.service, p.proto.k8s_name()),
                t.answered.load(Ordering::Relaxed),
                t.failed.load(Ordering::Relaxed),
                t.stale.load(Ordering::Relaxed),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// tables

fn lag_cell(values: &[f64]) -> String {
    if values.is_empty() {
        return "—".into();
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    format!(
        "{:.1} / {:.1} ms ({})",
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        v.len()
    )
}

fn proc_cell(procs: &[Option<ProcSample>], f: impl Fn(&ProcSample) -> String) -> String {
    procs
        .iter()
        .map(|p| p.as_ref().map_or("gone".into(), &f))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn objects_cell(o: &(Option<Objects>, Option<Objects>)) -> String {
    match o {
        (Some(k), Some(d)) if k == d => format!("{} = {}", k.elements, d.elements),
        (Some(k), Some(d)) => format!(
            "**{} ≠ {}** (sets {}/{}, chains {}/{})",
            k.elements, d.elements, k.sets, d.sets, k.chains, d.chains
        ),
        (k, d) => format!(
            "{} / {}",
            k.map_or("?".into(), |k| k.elements.to_string()),
            d.map_or("?".into(), |d| d.elements.to_string())
        ),
    }
}

fn series_table(facts: &Facts<'_>, out: &Outcome) -> Table {
    let mut t = Table::new(
        "Suite 9 — endurance: endpoint churn over time (real controller, 2 real agents applying nft, simulated agents)",
        &[
            "elapsed",
            "changes written",
            "controller RSS",
            "agent RSS a / b",
            "fds controller / a / b",
            "agent children a / b",
            "nft elements a: kernel = desired",
            "nft elements b: kernel = desired",
            "conntrack node a: entries / stale UDP",
            "sim ACK lag p50 / p99 (n)",
            "change → all nodes ACKed p50 / p99 (n)",
            "checkpoint settled in",
        ],
    );
    for r in &out.rows {
        t.row(vec![
            format!("{:.0} s", r.at.as_secs_f64()),
            r.changes.to_string(),
            r.procs[0].as_ref().map_or("gone".into(), |p| mib(p.rss)),
            proc_cell(&r.procs[1..], |p| mib(p.rss)),
            proc_cell(&r.procs, |p| p.fds.to_string()),
            proc_cell(&r.procs[1..], |p| p.child_count().to_string()),
            objects_cell(&r.objects[0]),
            objects_cell(&r.objects[1]),
            format!(
                "{} / {}",
                r.flows.map_or("?".into(), |n| n.to_string()),
                r.stale_udp.map_or("?".into(), |n| n.to_string())
            ),
            lag_cell(&r.ack_lag),
            lag_cell(&r.change_lag),
            format!("{:.1} s", r.settle.as_secs_f64()),
        ]);
    }
    let o = facts.opts;
    let written = out.churn.written.load(Ordering::Relaxed);
    let running = *out.churn.running.lock().expect("lock");
    let paused: f64 = out.rows.iter().map(|r| r.settle.as_secs_f64()).sum();
    t.note(format!(
        "Lab of network namespaces: the real controller (`--source dir:`, mutual TLS) in `cp`; real agents on nodes a and b applying nft in their namespaces; {} simulated agents (real gRPC streams with mutual TLS, each its own node certificate, ACKing every Change at once) — {} nodes in all. {} Services: {} with one TCP port and 8-12 endpoints at fake addresses spread over all nodes (initially 10 each, {} endpoints at the end), and {TRAFFIC_SERVICES} traffic Services (a TCP and a UDP port) whose 2 endpoints are taken from a pool of {} real pods on nodes a and b. Initial sync of every node: {:.1} s.",
        facts.sims,
        o.nodes,
        o.services,
        o.services as usize - TRAFFIC_SERVICES,
        facts.bulk_endpoints,
        POOL_PER_NODE * LAB_NODES.len(),
        facts.initial_sync.as_secs_f64()
    ));
    t.note(format!(
        "Churn: {:.0} EndpointSlice changes/s asked, {written} written in {:.0} s of churn ({:.1}/s achieved{}; the checkpoints paused it {paused:.0} s in all). Each rewrites one Service's slice file (atomic rename): a bulk Service's endpoint replaced by a fresh address, or one added or removed; every {}th change swaps one endpoint of a traffic Service (in turn) for another pool pod. Each slice carries its write time as `endpoints.kubernetes.io/last-change-trigger-time`.",
        o.rate,
        running.as_secs_f64(),
        written as f64 / running.as_secs_f64().max(1e-9),
        match out.churn.late.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!("; the schedule fell over a second behind {n} times"),
        },
        world::TRAFFIC_EVERY
    ));
    t.note(format!(
        "Each row is a checkpoint (at the start, then every {:.0} s): the churn pauses until the controller's rule set for node a equals the workload (every Service port's endpoint addresses) and every node has acknowledged its current rule set; then both real agents' tables are counted — the elements of every set and map of `table ip kubenft` and `table ip6 kubenft` (`nft -j list table`) — against the elements the rule set the controller serves that node calls for, rendered by the agent's own library (`kubenft_nft`: each Service port's elements, shared ones once, the node sets and the generation); `≠` marks a difference still there {} s after the node's ACK. The churn then resumes (the pause is the last column). RSS, descriptors and child processes (`/proc`) as sampled at the checkpoint.",
        o.secs() / f64::from(ROWS),
        KERNEL_SETTLE.as_secs()
    ));
    t.note("Conntrack entries on node a are mostly the TCP probes' closed connections in TIME_WAIT (kept 120 s): they level off at the probes' connection rate × 120 s, two minutes into the run.");
    t.note("ACK lag, per window since the previous row: *sim* — from a change's trigger time to a simulated agent's ACK of the Change carrying it (every ACK of every simulated agent, from the Change's trigger times); *all nodes* — the controller's own record of each input change (`ListChanges`, polled every 2 s): from the trigger time to the ACK of the last node whose rule set it changed, the two real agents' nft transactions included.");
    if let Some(why) = &out.stopped {
        t.note(format!("**The run stopped early: {why}.**"));
    }
    for r in &out.rows {
        if !r.problems.is_empty() {
            t.note(format!(
                "Checkpoint at {:.0} s: {}",
                r.at.as_secs_f64(),
                r.problems.join("; ")
            ));
        }
    }
    t
}

/// The samples of `proc` (index into [`WATCHED`]) in `[from, to]` seconds.
fn window<'a>(
    samples: &'a [Sample],
    proc: usize,
    from: f64,
    to: f64,
) -> impl Iterator<Item = &'a ProcSample> + 'a {
    samples
        .iter()
        .filter(move |s| (from..=to).contains(&s.at.as_secs_f64()))
        .filter_map(move |s| s.procs[proc].as_ref())
}

/// The smallest and the largest of the values, if any. A leak raises the floor; work in
/// progress at a sample (a listing's pipe, a `conntrack` child) only the peak.
fn floor_and_peak(values: impl Iterator<Item = u64>) -> Option<(u64, u64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / f64::from(n))
}

fn met(ok: bool) -> String {
    if ok { "met" } else { "**missed**" }.into()
}

fn verdict_table(facts: &Facts<'_>, out: &Outcome) -> Table {
    let secs = facts.opts.secs();
    // Minutes 2-7 and the last 5 of a 30-minute run; the same shares of a shorter one.
    let base = (secs / 15.0, secs * 7.0 / 30.0);
    let last = (secs - secs / 6.0, secs);
    let mut t = Table::new(
        "Suite 9 — endurance: verdicts",
        &["assertion", "figure", "verdict"],
    );
    for (i, name) in WATCHED.iter().enumerate() {
        let b = mean(window(&out.samples, i, base.0, base.1).map(|p| p.rss as f64));
        let l = mean(window(&out.samples, i, last.0, last.1).map(|p| p.rss as f64));
        let (figure, ok) = match (b, l) {
            (Some(b), Some(l)) => {
                let growth = l / b - 1.0;
                (
                    format!(
                        "mean {} ({:.0}-{:.0} s) → {} ({:.0}-{:.0} s): {:+.1}%",
                        mib(b as u64),
                        base.0,
                        base.1,
                        mib(l as u64),
                        last.0,
                        last.1,
                        growth * 100.0
                    ),
                    growth <= RSS_GROWTH_LIMIT,
                )
            }
            _ => ("not enough samples".into(), false),
        };
        t.row(vec![
            format!("{name} RSS flat (growth ≤ 10%)"),
            figure,
            met(ok),
        ]);
    }
    verdict_objects(&mut t, out);
    verdict_conntrack(&mut t, facts, out);
    verdict_counts(&mut t, out, base, last, "descriptors do not grow", |p| {
        p.fds
    });
    verdict_children(&mut t, out, base, last);
    let answered: u64 = facts.tallies.iter().map(|x| x.1).sum();
    let failed: u64 = facts.tallies.iter().map(|x| x.2).sum();
    t.row(vec![
        "traffic through the churning Services (information)".into(),
        format!(
            "{answered} probe attempts answered, {failed} failed ({})",
            facts
                .tallies
                .iter()
                .map(|(n, a, f, _)| format!("{n}: {a}/{f}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "—".into(),
    ]);
    t.note(format!(
        "RSS: the mean of the samples (every {} s) in the baseline window against the mean in the final window — minutes 2-7 and the last 5 minutes of a 30-minute run, the same shares (1/15-7/30, last 1/6) of a shorter one; time counts from the end of the initial sync. Descriptors and children: the floor (smallest count) of the final window against that of the baseline window — what stays open or alive raises the floor, while work in progress at a sample (an element listing's `nft` and its pipes, a `conntrack` call, a health check) shows only in the peak, given beside it.",
        SAMPLE_EVERY.as_secs()
    ));
    t.note(format!(
        "Conntrack (node a, where the client pod's flows are DNATed): UDP probes send every datagram from one fixed source port per Service (one entry, refreshed every {} ms for the whole run), the flow a stale entry would pin to a former endpoint; the agent deletes UDP entries whose endpoint stopped serving the Service after each change. TCP entries are left to the kernel, as kube-proxy leaves them: each probe connection is closed at once, so an entry to a former endpoint must be in a closing state (TIME_WAIT etc., at most 120 s left) — one still ESTABLISHED would be a leak. A probe answer from a pod that was not an endpoint of the Service at any moment in the {} s before is counted stale.",
        facts.opts.probe_interval.as_millis(),
        traffic::GRACE.as_secs()
    ));
    if facts.restarts > 0 || facts.fleet_error.is_some() {
        t.note(format!(
            "Simulated agents: {} stream restarts after the initial sync; last error: {}.",
            facts.restarts,
            facts.fleet_error.as_deref().unwrap_or("none")
        ));
    }
    t
}

fn verdict_objects(t: &mut Table, out: &Outcome) {
    let Some(last) = out.rows.last() else {
        return;
    };
    let mut figure = Vec::new();
    let mut ok = true;
    for (node, o) in LAB_NODES.iter().zip(&last.objects) {
        match o {
            (Some(k), Some(d)) => {
                ok &= k == d;
                if k == d {
                    figure.push(format!("{node}: kernel {k} = desired"));
                } else {
                    figure.push(format!("{node}: kernel {k} ≠ desired {d}"));
                }
            }
            _ => {
                ok = false;
                figure.push(format!("{node}: not counted"));
            }
        }
    }
    let equal = out
        .rows
        .iter()
        .filter(|r| r.objects.iter().all(|(k, d)| k.is_some() && k == d))
        .count();
    figure.push(format!(
        "equal at {equal} of {} checkpoints",
        out.rows.len()
    ));
    t.row(vec![
        "no leaked nft objects (kernel = desired at the end)".into(),
        figure.join("; "),
        met(ok),
    ]);
}

fn verdict_conntrack(t: &mut Table, facts: &Facts<'_>, out: &Outcome) {
    let stale_answers: u64 = facts.tallies.iter().map(|x| x.3).sum();
    let udp_answers: u64 = facts
        .tallies
        .iter()
        .filter(|x| x.0.ends_with("UDP"))
        .map(|x| x.1)
        .sum();
    let stale_rows = out.rows.iter().filter(|r| r.stale_udp != Some(0)).count();
    let (udp, tcp) = match &facts.end {
        Ok(end) => {
            let udp_ok = end.udp_former == 0 && stale_rows == 0 && stale_answers == 0;
            let open: usize = end
                .tcp_former
                .iter()
                .filter(|(state, _)| !CLOSING.contains(&state.as_str()))
                .map(|(_, n)| n)
                .sum();
            let states = if end.tcp_former.is_empty() {
                "none".to_owned()
            } else {
                end.tcp_former
                    .iter()
                    .map(|(s, n)| format!("{n} {s}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            (
                (
                    format!(
                        "at the end {} UDP entries to former endpoints ({} to current ones); stale at {stale_rows} of {} checkpoints; {stale_answers} of {udp_answers} UDP answers from a former endpoint",
                        end.udp_former,
                        end.udp_current,
                        out.rows.len()
                    ),
                    udp_ok,
                ),
                (
                    format!(
                        "at the end {} TCP entries to current endpoints; to former endpoints: {states} (longest left {} s); {open} not closing",
                        end.tcp_current, end.tcp_former_max_timeout
                    ),
                    open == 0 && end.tcp_former_max_timeout <= 120,
                ),
            )
        }
        Err(e) => (
            (format!("not listed: {e:#}"), false),
            (format!("not listed: {e:#}"), false),
        ),
    };
    t.row(vec![
        "no stale UDP conntrack entries (the agent deletes them)".into(),
        udp.0,
        met(udp.1),
    ]);
    t.row(vec![
        "TCP conntrack entries to former endpoints only closing (the kernel expires them)".into(),
        tcp.0,
        met(tcp.1),
    ]);
}

fn verdict_counts(
    t: &mut Table,
    out: &Outcome,
    base: (f64, f64),
    last: (f64, f64),
    what: &str,
    count: impl Fn(&ProcSample) -> u64,
) {
    let mut figure = Vec::new();
    let mut ok = true;
    for (i, name) in WATCHED.iter().enumerate() {
        let first = out
            .samples
            .first()
            .and_then(|s| s.procs[i].as_ref())
            .map(&count);
        let end = out
            .rows
            .last()
            .and_then(|r| r.procs[i].as_ref())
            .map(&count);
        let b = floor_and_peak(window(&out.samples, i, base.0, base.1).map(&count));
        let l = floor_and_peak(window(&out.samples, i, last.0, last.1).map(&count));
        ok &= matches!((b, l), (Some(b), Some(l)) if l.0 <= b.0);
        let show = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
        figure.push(format!(
            "{name} {} → {} (floor {} → {}, peak {} → {})",
            show(first),
            show(end),
            show(b.map(|b| b.0)),
            show(l.map(|l| l.0)),
            show(b.map(|b| b.1)),
            show(l.map(|l| l.1)),
        ));
    }
    t.row(vec![what.into(), figure.join("; "), met(ok)]);
}

fn verdict_children(t: &mut Table, out: &Outcome, base: (f64, f64), last: (f64, f64)) {
    let mut figure = Vec::new();
    let mut ok = true;
    for (i, name) in WATCHED.iter().enumerate().skip(1) {
        let count = |p: &ProcSample| u64::from(p.child_count());
        let b = floor_and_peak(window(&out.samples, i, base.0, base.1).map(count));
        let l = floor_and_peak(window(&out.samples, i, last.0, last.1).map(count));
        let end = out.rows.last().and_then(|r| r.procs[i].clone());
        let zombies = end.as_ref().map_or(0, |p| p.zombies);
        ok &= matches!((b, l), (Some(b), Some(l)) if l.0 <= b.0) && zombies == 0;
        let show = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
        figure.push(format!(
            "{name}: at the end {} ({zombies} zombies); floor {} → {}, peak {} → {}",
            end.as_ref()
                .map_or("gone".into(), ProcSample::children_text),
            show(b.map(|b| b.0)),
            show(l.map(|l| l.0)),
            show(b.map(|b| b.1)),
            show(l.map(|l| l.1)),
        ));
    }
    t.row(vec![
        "agent child processes (nft) do not leak".into(),
        figure.join("; "),
        met(ok),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_and_peak_of_counts() {
        assert_eq!(floor_and_peak([21, 24, 21, 22].into_iter()), Some((21, 24)));
        assert_eq!(floor_and_peak(std::iter::empty()), None);
    }

    #[test]
    fn mismatches_count_wrong_missing_and_extra_ports() {
        let port = |svc: &str, ips: &[&str]| v1::Resource {
            name: format!("ns/{svc}/tcp/http/ipv4"),
            version: "1".into(),
            kind: Some(resource::Kind::ServicePort(v1::ServicePortRules {
                namespace: "ns".into(),
                service: svc.into(),
                port_name: "http".into(),
                cluster_endpoints: ips
                    .iter()
                    .map(|ip| v1::Endpoint {
                        ip: (*ip).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })),
        };
        let expected: Vec<Expected> = ["a", "b"]
            .iter()
            .map(|s| {
                let key = ("ns".to_owned(), (*s).to_owned(), "http".to_owned());
                (key, BTreeSet::from(["10.0.0.1".to_owned()]))
            })
            .collect();
        let rules = |resources| v1::NodeRuleSet {
            resources,
            ..Default::default()
        };
        let same = rules(vec![port("a", &["10.0.0.1"]), port("b", &["10.0.0.1"])]);
        assert_eq!(mismatches(&expected, &same), 0);
        let moved = rules(vec![port("a", &["10.0.0.2"]), port("b", &["10.0.0.1"])]);
        assert_eq!(mismatches(&expected, &moved), 1);
        let missing = rules(vec![port("a", &["10.0.0.1"])]);
        assert_eq!(mismatches(&expected, &missing), 1);
        let extra = rules(vec![
            port("a", &["10.0.0.1"]),
            port("b", &["10.0.0.1"]),
            port("c", &["10.0.0.1"]),
        ]);
        assert_eq!(mismatches(&expected, &extra), 1);
    }
}
