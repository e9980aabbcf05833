//! Suites 3 and 4: the real `kubenft-controller` binary (`--source dir:`, on loopback) and K
//! simulated agents in this process, each a real tonic stream on its own HTTP/2 connection,
//! that ACK every Change at once without applying it.
//!
//! ```text
//!  manifests dir ──(100 ms poll)──▶ kubenft-controller ══ K gRPC streams ══▶ simulated agents
//!        ▲ one slice file rewritten per change                              record + ACK
//!        └──────────────── bench: clock from the write to the last affected agent's ACK
//! ```
//!
//! Every 10th Service has `internalTrafficPolicy: Local`; one change in ten moves an endpoint of
//! such a Service, whose view should change only on the endpoint's node. The controller's
//! memory is watched all along; it is killed (and the run reported as stopped) before it can
//! take the machine down.

mod agents;
pub(crate) mod manifests;
mod pki;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::report::{Table, mib, ms, percentile, secs};
use crate::workload::Workload;
use agents::{Fleet, Probe, Transport, Watchdog};
use pki::BenchPki;

#[derive(Clone, Debug)]
pub struct Options {
    pub services: u32,
    pub agents: Vec<u32>,
    pub changes: usize,
    pub storm_agents: u32,
    pub tls: TlsMode,
}

/// Which transports suites 3 and 4 measure: both (plaintext first, then TLS, in the same run),
/// TLS only or plaintext only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    Both,
    On,
    Off,
}

/// The transports to measure, with the certificates for `agents` agents when TLS is one of
/// them (made before anything is timed).
async fn transports(mode: TlsMode, agents: u32) -> anyhow::Result<Vec<Transport>> {
    let mut out = Vec::new();
    if mode != TlsMode::On {
        out.push(Transport::Plain);
    }
    if mode != TlsMode::Off {
        let pki = tokio::task::spawn_blocking(move || BenchPki::generate(agents)).await??;
        eprintln!(
            "suites 3/4: CA, controller certificate and {agents} agent certificates made in {}",
            secs(pki.generated)
        );
        out.push(Transport::Tls(Arc::new(pki)));
    }
    Ok(out)
}

/// A note on how the TLS rows were set up, if there are any.
fn tls_note(transports: &[Transport]) -> Option<String> {
    transports.iter().find_map(|t| match t {
        Transport::Plain => None,
        Transport::Tls(pki) => Some(format!(
            "TLS rows: the controller serves with `--tls-cert-file/--tls-private-key-file/--client-ca-file` (mutual TLS, rustls + ring, TLS 1.3, ECDSA P-256 certificates) and each simulated agent dials `https://127.0.0.1:PORT` with its own client certificate (CN `system:node:<node>`, which the controller checks against the Hello's node name), loaded as the real agent loads it (`kubenft_tls::ClientFiles`). No session resumption: each agent builds its TLS settings afresh, as the real agent does per connection. The simulated agents run on the same cores as the controller, so their half of every handshake is in the figures too. The CA and {} certificates were made with the openssl CLI (one `req -x509 -CA` process per agent) in {}, before anything was timed. Plaintext rows: `--insecure` and `http://`.",
            pki.agents() + 1,
            secs(pki.generated)
        )),
    })
}

/// Time allowed for one agent count's changes (fewer than asked are reported if it runs out).
const CHANGES_BUDGET: Duration = Duration::from_secs(300);
/// How long one change may take to reach every affected agent.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// The controller process, killed on drop.
struct Controller {
    child: tokio::process::Child,
    grpc: std::net::SocketAddr,
}

impl Controller {
    async fn start(
        bin: &Path,
        dir: &Path,
        grpc: std::net::SocketAddr,
        transport: &Transport,
    ) -> anyhow::Result<Controller> {
        let http = free_port()?;
        // KUBENFT_BENCH_CONTROLLER_LOG=FILE keeps the controller's log (diagnostics), at
        // KUBENFT_BENCH_CONTROLLER_LOG_LEVEL (a RUST_LOG filter; default info).
        let (log_level, stderr) = match std::env::var_os("KUBENFT_BENCH_CONTROLLER_LOG") {
            Some(path) => (
                std::env::var("KUBENFT_BENCH_CONTROLLER_LOG_LEVEL").unwrap_or("info".into()),
                Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)?,
                ),
            ),
            None => ("warn".into(), Stdio::null()),
        };
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg(format!("--source=dir:{}", dir.display()))
            .args(["--grpc-listen", &grpc.to_string()]);
        match transport {
            Transport::Plain => {
                cmd.arg("--insecure");
            }
            Transport::Tls(pki) => {
                let files = pki.server();
                cmd.arg("--tls-cert-file")
                    .arg(&files.cert)
                    .arg("--tls-private-key-file")
                    .arg(&files.key)
                    .arg("--client-ca-file")
                    .arg(&files.client_ca);
            }
        }
        let child = cmd
            .args(["--http-listen", &http.to_string()])
            .args(["--cluster-cidr", crate::workload::CLUSTER_CIDR])
            .args(["--service-cidr", crate::workload::SERVICE_CIDR])
            .env("RUST_LOG", &log_level)
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()?;
        let controller = Controller { child, grpc };
        controller.wait_listening().await?;
        Ok(controller)
    }

    async fn wait_listening(&self) -> anyhow::Result<()> {
        for _ in 0..1200 {
            if tokio::net::TcpStream::connect(self.grpc).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("the controller never listened on {}", self.grpc)
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    fn rss(&self) -> Option<u64> {
        crate::report::process_memory(self.pid()).map(|(rss, _)| rss)
    }

    async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The most the controller may use before the bench kills it: a third of the machine's
/// memory, at most 8 GiB (the machine is shared).
fn memory_limit() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(8 << 20);
    (total_kib * 1024 / 3).min(8 << 30)
}

/// A temporary manifests directory, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn manifests_dir(w: &Workload, tag: &str) -> anyhow::Result<Dir> {
    let dir = Dir(std::env::temp_dir().join(format!("{}{tag}", crate::netns::prefix())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0)?;
    manifests::write_all(&dir.0, w)?;
    Ok(dir)
}

/// Figures of one agent count over one transport.
struct FanoutResult {
    transport: &'static str,
    agents: u32,
    connected: u32,
    initial_sync: Duration,
    rss_synced: Option<u64>,
    rss_peak: u64,
    cluster: Vec<Probe>,
    local: Vec<Probe>,
    stopped: Option<String>,
}

impl FanoutResult {
    fn skipped(transport: &'static str, agents: u32) -> FanoutResult {
        FanoutResult {
            transport,
            agents,
            connected: 0,
            initial_sync: Duration::ZERO,
            rss_synced: None,
            rss_peak: 0,
            cluster: Vec::new(),
            local: Vec::new(),
            stopped: None,
        }
    }
}

/// Runs suite 3.
/// Runs suite 3: for each agent count, plaintext then TLS (as `opts.tls` asks).
pub async fn run_fanout(opts: &Options, bin: &Path) -> anyhow::Result<Vec<Table>> {
    let max = opts.agents.iter().copied().max().unwrap_or(0);
    let transports = transports(opts.tls, max).await?;
    let mut results: Vec<FanoutResult> = Vec::new();
    for &k in &opts.agents {
        for transport in &transports {
            let label = transport.label();
            let previous = results.iter().rev().find(|r| r.transport == label);
            if let Some(prev) = previous.filter(|r| r.connected < r.agents) {
                let mut skipped = FanoutResult::skipped(label, k);
                skipped.stopped = Some(format!(
                    "not run: only {} of {} agents could be served at the previous count",
                    prev.connected, prev.agents
                ));
                results.push(skipped);
                continue;
            }
            let r = fanout_one(opts, bin, k, transport).await?;
            eprintln!(
                "suite 3: {k} agents, {label}: {} connected, {} cluster + {} local changes {}",
                r.connected,
                r.cluster.len(),
                r.local.len(),
                r.stopped.as_deref().unwrap_or("")
            );
            results.push(r);
        }
    }
    Ok(vec![fanout_table(opts, &results, &transports)])
}

async fn fanout_one(
    opts: &Options,
    bin: &Path,
    k: u32,
    transport: &Transport,
) -> anyhow::Result<FanoutResult> {
    let w = Workload::new(opts.services, k);
    let dir = manifests_dir(&w, "manifests")?;
    let controller = Controller::start(bin, &dir.0, free_port()?, transport).await?;
    let fleet = Arc::new(Fleet::default());
    let watchdog = Watchdog::start(controller.pid(), memory_limit());
    let started = Instant::now();
    let connected =
        agents::connect_all(&fleet, transport, controller.grpc, k, false, &watchdog).await;
    let mut result = FanoutResult {
        transport: transport.label(),
        agents: k,
        connected: fleet.synced(),
        initial_sync: started.elapsed(),
        rss_synced: controller.rss(),
        rss_peak: 0,
        cluster: Vec::new(),
        local: Vec::new(),
        stopped: connected.err().map(|e| e.to_string()),
    };
    // With fewer agents than asked (memory), the changes still run with those connected.
    if watchdog.tripped().is_none() && result.connected > 0 {
        run_changes(opts, &w, &dir.0, &fleet, &watchdog, &mut result).await;
    }
    result.rss_peak = watchdog.peak();
    fleet.stop();
    controller.kill().await;
    Ok(result)
}

/// The changes: one slice file rewritten at a time, each followed to its last affected ACK.
async fn run_changes(
    opts: &Options,
    w: &Workload,
    dir: &Path,
    fleet: &Arc<Fleet>,
    watchdog: &Watchdog,
    result: &mut FanoutResult,
) {
    let started = Instant::now();
    for c in 0..opts.changes {
        if started.elapsed() > CHANGES_BUDGET {
            let before = result
                .stopped
                .take()
                .map(|s| format!("{s}; "))
                .unwrap_or_default();
            result.stopped = Some(format!(
                "{before}time budget ({} s) used after {c} changes",
                CHANGES_BUDGET.as_secs()
            ));
            return;
        }
        if let Some(why) = watchdog.tripped() {
            result.stopped = Some(why);
            return;
        }
        let local = c % 10 == 9;
        let svc = manifests::changed_service(w, c as u32, local);
        fleet.arm(&svc.resource_name());
        let t0 = Instant::now();
        if let Err(e) = manifests::write_slice(dir, &svc) {
            result.stopped = Some(format!("writing a slice: {e}"));
            return;
        }
        let expected = if local { 1 } else { fleet.synced() as usize };
        let probe = fleet.settle(t0, expected, CHANGE_TIMEOUT).await;
        if local {
            result.local.push(probe);
        } else {
            result.cluster.push(probe);
        }
    }
}

fn latency_cell(lat: &[f64], p: f64) -> String {
    if lat.is_empty() {
        "—".into()
    } else {
        ms(Duration::from_secs_f64(percentile(lat, p)))
    }
}

fn average_receivers(ps: &[Probe]) -> String {
    if ps.is_empty() {
        return "—".to_owned();
    }
    let sum: usize = ps.iter().map(|p| p.receivers).sum();
    format!("{:.0}", sum as f64 / ps.len() as f64)
}

fn fanout_row(r: &FanoutResult) -> Vec<String> {
    let probes = || r.cluster.iter().chain(&r.local);
    let mut lat: Vec<f64> = probes().map(|p| p.last_ack.as_secs_f64()).collect();
    lat.sort_by(f64::total_cmp);
    let mut bytes: Vec<f64> = probes()
        .flat_map(|p| p.bytes.iter().map(|b| *b as f64))
        .collect();
    bytes.sort_by(f64::total_cmp);
    let target = if r.agents <= 1000 { 0.25 } else { 1.0 };
    let verdict = if lat.is_empty() {
        "not measured".to_owned()
    } else if percentile(&lat, 99.0) <= target {
        format!("≤ {:.0} ms: met", target * 1e3)
    } else {
        format!("≤ {:.0} ms: missed", target * 1e3)
    };
    let timeouts = probes().filter(|p| p.timed_out).count();
    vec![
        r.agents.to_string(),
        r.transport.to_owned(),
        format!("{} / {}", r.connected, secs(r.initial_sync)),
        format!(
            "{} + {} ({timeouts} timed out)",
            r.cluster.len(),
            r.local.len()
        ),
        latency_cell(&lat, 50.0),
        latency_cell(&lat, 99.0),
        latency_cell(&lat, 100.0),
        verdict,
        format!(
            "{} / {}",
            average_receivers(&r.cluster),
            average_receivers(&r.local)
        ),
        match bytes.last() {
            Some(max) => format!("{:.0} B / {max:.0} B", percentile(&bytes, 50.0)),
            None => "—".into(),
        },
        format!(
            "{} / {}",
            r.rss_synced.map_or("—".into(), mib),
            mib(r.rss_peak)
        ),
    ]
}

fn fanout_table(opts: &Options, results: &[FanoutResult], transports: &[Transport]) -> Table {
    let mut t = Table::new(
        "Suite 3 — control-plane fan-out (real controller binary, simulated agents over real gRPC)",
        &[
            "agents",
            "transport",
            "synced agents / initial sync",
            "changes measured (Cluster + Local policy)",
            "change → all affected ACKed p50",
            "p99",
            "max",
            "target p99",
            "agents receiving a change (Cluster / Local policy), mean",
            "payload per change per agent (p50 / max)",
            "controller RSS after initial sync / peak",
        ],
    );
    for r in results {
        t.row(fanout_row(r));
        if let Some(why) = &r.stopped {
            t.note(format!(
                "{} agents, {}: stopped early: {why}",
                r.agents, r.transport
            ));
        }
    }
    t.note(format!(
        "{} Services × 10 endpoints ({} endpoints), endpoints spread over the agents' nodes; every 10th Service has internalTrafficPolicy Local. A change rewrites one EndpointSlice file (one endpoint moves to a new address); the clock runs from the write to the last ACK of an agent whose Change carries that Service (the controller follows its directory with inotify and reads only the file that changed). Up to {} changes, at most {} s per agent count; a change not seen by every expected agent within {} s counts as timed out.",
        opts.services,
        u64::from(opts.services) * 10,
        opts.changes,
        CHANGES_BUDGET.as_secs(),
        CHANGE_TIMEOUT.as_secs(),
    ));
    t.note("Targets: payload ≤ 1 KiB per change per affected agent; a Local-policy change should reach only the endpoint's node (expected 1 in the Local column); controller RSS ≤ 1 GiB at 5,000 agents. The controller is killed if its RSS passes min(a third of the machine, 8 GiB); no more agents are connected once it passes 70% of that, and the changes then run with the agents connected so far.");
    if let Some(note) = tls_note(transports) {
        t.note(format!(
            "{note} Each transport has its own controller process and fleet, one after the other."
        ));
    }
    t
}

/// Runs suite 4: current agents reconnect at once after a controller restart; plaintext then
/// TLS (as `opts.tls` asks), one row each.
pub async fn run_storm(opts: &Options, bin: &Path) -> anyhow::Result<Vec<Table>> {
    let transports = transports(opts.tls, opts.storm_agents).await?;
    let mut t = Table::new(
        "Suite 4 — reconnect storm after a controller restart",
        &[
            "transport",
            "agents",
            "controller restart → listening",
            "all reconnect at once → all connections up",
            "all reconnect at once → all confirmed",
            "target ≤ 2 s",
            "restart → all confirmed",
            "confirmations",
            "inventories asked",
            "resources resent",
            "bytes received",
        ],
    );
    for transport in &transports {
        let row = storm_one(opts, bin, transport).await?;
        eprintln!("suite 4, {}: {}", transport.label(), row.cells[4]);
        t.row(row.cells);
        if let Some(note) = row.note {
            t.note(format!("{}: {note}", transport.label()));
        }
    }
    t.note(format!(
        "{} Services × 10 endpoints. The agents first synchronise (the full rule set each), then the controller is killed and started again on the same port with the same manifests; once it listens, all agents reconnect at the same moment, each with a Hello stating the system version it holds (as the real agent does; it would list its resources only if asked). The controller answers a stream once it has read and planned everything, so the time includes its start-up. Target: zero payload (one empty confirmation each), all confirmed within 2 s. Bytes are the encoded Changes received (a confirmation carries only its id and system version). \"Connections up\": the last agent's `connect()` returned (TCP, TLS handshake as the client sees it, HTTP/2); its Hello and the confirmation follow.",
        opts.services
    ));
    if let Some(note) = tls_note(&transports) {
        t.note(format!("{note} Each transport has its own controller processes and fleet, one after the other; the agents' endpoints (TLS settings included) are built before the controller restarts, so the clock holds only connecting."));
    }
    Ok(vec![t])
}

struct StormRow {
    cells: Vec<String>,
    note: Option<String>,
}

async fn storm_one(opts: &Options, bin: &Path, transport: &Transport) -> anyhow::Result<StormRow> {
    let k = opts.storm_agents;
    let w = Workload::new(opts.services, k);
    let dir = manifests_dir(&w, "storm")?;
    let grpc = free_port()?;
    let controller = Controller::start(bin, &dir.0, grpc, transport).await?;
    let fleet = Arc::new(Fleet::default());
    let watchdog = Watchdog::start(controller.pid(), memory_limit());
    let connected = agents::connect_all(&fleet, transport, grpc, k, true, &watchdog).await;
    let synced_before = fleet.synced();
    if watchdog.tripped().is_some() || synced_before == 0 {
        anyhow::bail!("no agent could be synchronised: {connected:?}");
    }
    controller.kill().await;
    let held = fleet.wait_closed(Duration::from_secs(30)).await;
    let reconnecting = held.len();
    let held = held
        .into_iter()
        .map(|(id, held)| Ok((id, held, transport.endpoint(grpc, id)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let restarted = Instant::now();
    let controller = Controller::start(bin, &dir.0, grpc, transport).await?;
    let listening = restarted.elapsed();
    let storm = Arc::new(Fleet::default());
    let watchdog = Watchdog::start(controller.pid(), memory_limit());
    let t0 = Instant::now();
    let outcome = agents::reconnect_all(&storm, held, &watchdog).await;
    let synced = t0.elapsed();
    let total = restarted.elapsed();
    let up = storm.last_connected().map(|at| at.duration_since(t0));
    let totals = storm.totals();
    storm.stop();
    controller.kill().await;
    let met = outcome.is_ok()
        && reconnecting == synced_before as usize
        && synced <= Duration::from_secs(2)
        && totals.resources == 0;
    let cells = vec![
        transport.label().to_owned(),
        format!("{synced_before} of {k}, {reconnecting} reconnect"),
        ms(listening),
        up.map_or("—".into(), ms),
        match &outcome {
            Ok(()) => ms(synced),
            Err(e) => format!("failed after {}: {e}", ms(synced)),
        },
        if met { "met" } else { "missed" }.into(),
        ms(total),
        totals.changes.to_string(),
        totals.inventories.to_string(),
        totals.resources.to_string(),
        format!("{} B", totals.bytes),
    ];
    Ok(StormRow {
        cells,
        note: connected
            .err()
            .map(|e| format!("fewer agents than asked: {e}.")),
    })
}
