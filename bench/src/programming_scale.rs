//! Suite 8: network programming latency against the cluster's size — suite 5's measurement
//! (an EndpointSlice change → the new pod answers a ClusterIP) with N other Services in the
//! cluster, through both of the controller's sources.
//!
//! ```text
//!  cp      fake API server (bench subcommand) ─watch─▶ kubenft-controller --source kube
//!          manifest directory ─────────inotify──────▶ kubenft-controller --source dir:
//!            │ gRPC (one controller at a time)
//!  node a  kubenft-agent → nft ── client pod: the probe ──▶ ClusterIP 10.96.200.10:80
//!  node b  kubenft-agent → nft                                  └─▶ web-<i> (on b, a, b, …)
//! ```
//!
//! For each size a fresh two-node lab gets N background Services (10 endpoints each, suite 3's
//! workload: one EndpointSlice file per Service) written to its manifest directory before
//! anything starts, so both agents hold N + 1 Services when the clock first runs. Then, with
//! the same agents:
//!
//! - **dir**: the controller reads the directory; each change renames the web Service's
//!   EndpointSlice file into place.
//! - **API server**: the directory is loaded into a fake API server (crate
//!   `kubenft-fake-apiserver`, served by this binary in `cp`, see [`serve_api`]) and a
//!   controller with `--source kube` watches it; each change is one write of the
//!   EndpointSlice to the server's store, which the controller sees as a watch event. The
//!   clock starts when the bench hands the object over (a line on the server's stdin).
//!
//! The probe, the clock and the probe floor are suite 5's ([`crate::programming`]).

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use kubenft_lab::manifest::{ToJson, list};
use kubenft_lab::topology::CP_V4;
use kubenft_lab::{
    Cond, EchoPorts, Host, Lab, LabConfig, Pod, Process, Proto, Service, Slice, wait_until,
};

use crate::fanout::manifests;
use crate::programming::{
    BinDir, CLIENT, ECHO_NAME, Floor, StreamProbe, TARGET_PORT, log_tails, measure_change,
    measure_floor, millis, ms_cell,
};
use crate::report::{Table, percentile};
use crate::workload::Workload;

const NODES: [&str; 2] = ["a", "b"];
const SERVICE: &str = "web";
/// Outside the background Services' ClusterIPs (10.96.0.1 + i).
const CLUSTER_IP: &str = "10.96.200.10";
const SERVICE_PORT: u16 = 80;
const SERVICE_FILE: &str = "web-service.yaml";
const SLICE_FILE: &str = "web-slice.yaml";
const API_PORT: u16 = 6443;
/// The first sync of the largest size (10,000 Services × 10 endpoints to two agents, on a
/// busy 2-core machine) takes seconds; this bounds it.
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);
/// Pod addresses per node run out after 243 pods; both sources' changes use them.
const MAX_CHANGES: usize = 200;
/// Target: p50 at the largest size ≤ this factor × p50 at the smallest, and ≤ [`TARGET_P50`].
const TARGET_RATIO: f64 = 1.5;
const TARGET_P50: Duration = Duration::from_millis(5);

#[derive(Clone, Debug)]
pub struct Options {
    /// Background Service counts (each a fresh lab).
    pub sizes: Vec<u32>,
    /// EndpointSlice changes timed per size and source.
    pub changes: usize,
    /// Pause between probe attempts.
    pub interval: Duration,
    /// Where the controllers' and agents' logs of each cell are copied (for attribution).
    pub logs: PathBuf,
}

/// How the controller learns of the change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Dir,
    Api,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Dir => "dir: (inotify)",
            Source::Api => "kube (fake API server watch)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Source::Dir => "dir",
            Source::Api => "kube",
        }
    }
}

/// One size × source.
struct Cell {
    services: u32,
    source: Source,
    samples: Vec<f64>,
    failed_attempts: usize,
    /// From starting the controller until the ClusterIP answered (first sync).
    first_sync: Duration,
}

/// Runs suite 8 (blocking: the lab drives processes synchronously).
pub fn run(opts: &Options, controller: &Path, agent: &Path) -> anyhow::Result<Vec<Table>> {
    if opts.changes == 0 || opts.changes > MAX_CHANGES / 2 {
        bail!(
            "--scale-changes must be 1-{} (the lab's pod addresses), got {}",
            MAX_CHANGES / 2,
            opts.changes
        );
    }
    if opts.sizes.is_empty() {
        bail!("--scale-sizes: give at least one Service count");
    }
    let bins = BinDir::create(controller, agent)?;
    let mut cells = Vec::new();
    let mut floors = Vec::new();
    for &services in &opts.sizes {
        let (floor, mut measured) = run_size(opts, &bins, services)
            .with_context(|| format!("{services} background Services"))?;
        floors.push((services, floor));
        cells.append(&mut measured);
    }
    Ok(vec![table(opts, &cells, &floors)])
}

/// One lab with `services` background Services: both sources, one after the other.
fn run_size(opts: &Options, bins: &BinDir, services: u32) -> anyhow::Result<(Floor, Vec<Cell>)> {
    let lab = Lab::new(LabConfig {
        nodes: NODES.iter().map(|n| (*n).into()).collect(),
        bin_dir: Some(bins.0.clone()),
    })
    .context("building the lab (needs root)")?;
    let echo = lab.binary(ECHO_NAME)?;
    lab.add_pod(CLIENT, "a", &EchoPorts::tcp(&[9]))?;
    let client_ns = lab.ns(Host::Pod(CLIENT))?;
    kubenft_lab::netns::sysctl(&client_ns, &["net.ipv4.tcp_tw_reuse=1"])?;
    manifests::write_all(lab.manifest_dir(), &Workload::new(services, 2))
        .context("writing the background Services")?;
    let first = lab.add_pod("web-0", "b", &EchoPorts::tcp(&[TARGET_PORT]))?;
    let service = Service::cluster_ip(SERVICE, CLUSTER_IP).port(
        "http",
        SERVICE_PORT,
        TARGET_PORT,
        Proto::Tcp,
    );
    lab.write_manifest(SERVICE_FILE, &list(&[&service]))?;
    lab.write_manifest(SLICE_FILE, &list(&[&slice(&first)]))?;
    let agents: Vec<Process> = NODES
        .iter()
        .map(|n| lab.spawn_agent(n, &[]))
        .collect::<Result<_, _>>()?;
    let vip = SocketAddr::new(CLUSTER_IP.parse()?, SERVICE_PORT);
    let probe = |count: u32, until: Option<&str>| {
        StreamProbe::start(&echo, &client_ns, vip, count, opts.interval, until)
    };

    let mut cells = Vec::new();
    let mut floor = None;
    let mut previous = first.name.clone();
    let mut next_pod = 1;
    for source in [Source::Dir, Source::Api] {
        let started = Instant::now();
        let (controller, api) = start_controller(&lab, source)?;
        let logs = |e: anyhow::Error| {
            anyhow!(
                "{e:#}\n{}",
                log_tails(&[&controller, &agents[0], &agents[1]])
            )
        };
        wait_until(SYNC_TIMEOUT, Duration::from_millis(100), || {
            lab.probe_once(Host::Pod(CLIENT), Proto::Tcp, vip)
                .map(|r| r.is_ok())
        })
        .context("the ClusterIP never answered")
        .map_err(logs)?;
        let first_sync = started.elapsed();
        // The first sync's aftermath (state files, freed memory handed back) is not what a
        // change costs.
        std::thread::sleep(Duration::from_secs(2));
        if floor.is_none() {
            floor = Some(measure_floor(&lab, vip, &probe).map_err(logs)?);
        }
        let write = |pod: &Pod| -> anyhow::Result<()> {
            match &api {
                None => Ok(lab.write_manifest(SLICE_FILE, &list(&[&slice(pod)]))?),
                Some(api) => api.apply(&slice(pod).to_json()),
            }
        };
        let mut cell = Cell {
            services,
            source,
            samples: Vec::with_capacity(opts.changes),
            failed_attempts: 0,
            first_sync,
        };
        for _ in 0..opts.changes {
            let node = NODES[next_pod % 2];
            let pod = lab.add_pod(
                &format!("web-{next_pod}"),
                node,
                &EchoPorts::tcp(&[TARGET_PORT]),
            )?;
            next_pod += 1;
            let change = measure_change(&probe, &previous, &pod, &write)
                .with_context(|| format!("{}: change to {} on node {node}", source.tag(), pod.name))
                .map_err(logs)?;
            cell.samples.push(millis(change.took));
            cell.failed_attempts += change.failed_attempts;
            lab.remove_pod(&previous)?;
            previous = pod.name;
        }
        cells.push(cell);
        controller.stop()?;
        if let Some(api) = api {
            api.stop();
            // The next controller (if any) reads the directory: it holds the current slice.
            lab.write_manifest(SLICE_FILE, &list(&[&slice(&lab.pod(&previous))]))?;
        }
        keep_logs(opts, services, source, &controller, &agents);
    }
    let floor = floor.context("no cell measured")?;
    Ok((floor, cells))
}

/// The web Service's only EndpointSlice, with `pod` its only (ready) endpoint.
fn slice(pod: &Pod) -> Slice {
    Slice::for_service(SERVICE)
        .port("http", TARGET_PORT)
        .endpoint(pod, Cond::READY)
}

/// The controller reading `source` (and the fake API server it watches).
fn start_controller(lab: &Lab, source: Source) -> anyhow::Result<(Process, Option<ApiServer>)> {
    match source {
        Source::Dir => Ok((lab.spawn_controller(&[])?, None)),
        Source::Api => {
            let kubeconfig = lab.dir().join("kubeconfig");
            let api = ApiServer::start(lab, &kubeconfig)?;
            let mut argv = vec![lab.binary("kubenft-controller")?.display().to_string()];
            let mut args = lab.controller_default_args();
            let i = args
                .iter()
                .position(|a| a == "--source")
                .context("the lab's controller arguments have no --source")?;
            args[i + 1] = "kube".into();
            argv.extend(args);
            argv.extend(["--kubeconfig".into(), kubeconfig.display().to_string()]);
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let controller = lab.spawn("controller-kube", Host::ControlPlane, &argv)?;
            Ok((controller, Some(api)))
        }
    }
}

/// Copies a cell's logs out of the lab directory (deleted with the lab).
fn keep_logs(
    opts: &Options,
    services: u32,
    source: Source,
    controller: &Process,
    agents: &[Process],
) {
    if std::fs::create_dir_all(&opts.logs).is_err() {
        return;
    }
    for p in std::iter::once(controller).chain(agents) {
        for (what, path) in [("stdout", p.stdout_path()), ("stderr", p.stderr_path())] {
            let to = opts
                .logs
                .join(format!("{services}-{}-{}.{what}", source.tag(), p.name()));
            let _ = std::fs::copy(path, to);
        }
    }
}

/// The fake API server, run by this binary in `cp` ([`serve_api`]): objects are written to
/// it as JSON lines on its stdin, each stored (and so sent to every watch) as it is read.
struct ApiServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ApiServer {
    fn start(lab: &Lab, kubeconfig: &Path) -> anyhow::Result<ApiServer> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let argv = [
            exe.display().to_string(),
            "fake-apiserver".into(),
            "--listen".into(),
            format!("{CP_V4}:{API_PORT}"),
            "--manifests".into(),
            lab.manifest_dir().display().to_string(),
            "--kubeconfig-out".into(),
            kubeconfig.display().to_string(),
        ];
        let mut child = kubenft_lab::netns::exec_cmd(&lab.ns(Host::ControlPlane)?, &argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the fake API server")?;
        let stdin = child.stdin.take().context("the API server's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the API server's stdout")?);
        let mut api = ApiServer {
            child,
            stdin,
            stdout,
        };
        let ready = api.line()?;
        if ready != "ready" {
            bail!("the fake API server said {ready:?} instead of ready");
        }
        Ok(api)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the fake API server exited");
        }
        Ok(line.trim_end().to_owned())
    }

    /// Hands `object` to the server, which stores it at once.
    fn apply(&self, object: &serde_json::Value) -> anyhow::Result<()> {
        let mut stdin = &self.stdin;
        writeln!(stdin, "{object}")?;
        stdin.flush()?;
        Ok(())
    }

    fn stop(self) {
        drop(self);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `fake-apiserver` subcommand: serves `manifests` on `listen`, writes a kubeconfig,
/// prints `ready`, then stores each JSON object read from stdin (one per line) until stdin
/// closes.
pub async fn serve_api(
    listen: SocketAddr,
    manifests: PathBuf,
    kubeconfig_out: PathBuf,
) -> anyhow::Result<()> {
    let server = Arc::new(kubenft_fake_apiserver::FakeApiServer::start(listen).await?);
    server.sync_to(kubenft_fake_apiserver::read_manifests(&manifests)?)?;
    server.write_kubeconfig(&kubeconfig_out)?;
    println!("ready");
    let writer = server.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for line in std::io::stdin().lines() {
            let object: serde_json::Value =
                serde_json::from_str(&line?).context("an object line on stdin")?;
            writer.apply(object)?;
        }
        Ok(())
    })
    .await
    .context("reading stdin")??;
    server.stop();
    Ok(())
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 50.0)
}

fn table(opts: &Options, cells: &[Cell], floors: &[(u32, Floor)]) -> Table {
    let smallest = opts.sizes.iter().copied().min().unwrap_or(0);
    let largest = opts.sizes.iter().copied().max().unwrap_or(0);
    let mut t = Table::new(
        "Suite 8 — network programming latency against the cluster's size: EndpointSlice change → the new pod answers",
        &[
            "background Services",
            "source",
            "changes",
            "p50",
            "p90",
            "p99",
            "max",
            "p50 ÷ p50 at the smallest size",
            "target ≤ 1.5× and ≤ 5 ms",
            "first sync",
        ],
    );
    for c in cells {
        let mut sorted = c.samples.clone();
        sorted.sort_by(f64::total_cmp);
        let p = |q: f64| ms_cell(percentile(&sorted, q));
        let p50 = median(&c.samples);
        let ratio = cells
            .iter()
            .find(|b| b.source == c.source && b.services == smallest)
            .map(|b| median(&b.samples))
            .filter(|b| *b > 0.0)
            .map(|b| p50 / b);
        let verdict = match ratio {
            _ if c.services != largest || largest == smallest => "—",
            Some(r) if r <= TARGET_RATIO && p50 <= millis(TARGET_P50) => "met",
            Some(_) => "missed",
            None => "—",
        };
        t.row(vec![
            c.services.to_string(),
            c.source.label().into(),
            c.samples.len().to_string(),
            p(50.0),
            p(90.0),
            p(99.0),
            p(100.0),
            ratio.map_or("—".into(), |r| format!("{r:.2}×")),
            verdict.into(),
            format!("{:.1} s", c.first_sync.as_secs_f64()),
        ]);
    }
    t.note(format!(
        "Suite 5's lab and clock (two nodes, the real controller and both real agents, a client pod probing a ClusterIP whose EndpointSlice has one endpoint, each change a fresh pod), with N other Services in the cluster: suite 3's workload (10 endpoints each, one EndpointSlice file per Service) in the manifest directory before anything starts. Each size is a fresh lab; its agents stay up while the controller is replaced: first `--source dir:` (each change renames the web EndpointSlice file into place), then `--source kube` against a fake API server (crate `kubenft-fake-apiserver`, loaded from the same directory) whose store takes each change as one write, seen by the controller as a watch event. {} changes per size and source, a probe attempt every {} ms.",
        opts.changes,
        opts.interval.as_millis()
    ));
    t.note(
        "Clock: from the write (the rename into the directory; the object handed to the API server's process) to the bench receiving the first probe result answered by the new pod. \"First sync\": from starting the controller until the ClusterIP answered (the API server's list included).".to_owned(),
    );
    for (services, floor) in floors {
        t.note(format!(
            "Probe floor at {services} Services (against the programmed pod): one attempt {} p50, results every {} p50 / {} p99 — a figure above includes up to about one such interval.",
            ms_cell(percentile(&floor.attempt, 50.0)),
            ms_cell(percentile(&floor.gap, 50.0)),
            ms_cell(percentile(&floor.gap, 99.0)),
        ));
    }
    let failed: usize = cells.iter().map(|c| c.failed_attempts).sum();
    if failed > 0 {
        t.note(format!(
            "{failed} probe attempts failed (refused or timed out) while changes were in flight."
        ));
    }
    t
}
