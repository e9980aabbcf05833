//! Suite 5: network programming latency in the lab — from an EndpointSlice change to the new
//! pod answering traffic, through the real controller and agents.
//!
//! ```text
//!  cp      kubenft-controller --source dir:<manifests>
//!            │ gRPC
//!  node a  kubenft-agent → nft ── client pod: the probe ──▶ ClusterIP 10.96.0.10:80
//!  node b  kubenft-agent → nft                                  └─▶ web-<i> (on b, a, b, …)
//! ```
//!
//! A `kubenft-lab` lab (network namespaces, the real binaries) with two nodes. Each change adds a
//! fresh pod, rewrites the Service's EndpointSlice file so the new pod is its only endpoint, and
//! times from the write until the client pod's probe is first answered by the new pod; the
//! previous pod is removed afterwards, outside the clock.
//!
//! The probe is one long-running `kubenft-echo probe` per change, started (and seen answered
//! by the previous pod) before the write, opening a new TCP connection to the ClusterIP every
//! `interval` until the new pod answers. So neither process start-up nor a coarse probe cadence
//! is in the figure; what remains of the probe — up to one attempt plus one pause — is measured
//! on its own against the already-programmed pod and reported as the probe floor.
//!
//! The lab looks its binaries up by name in one directory: the bench makes a temporary one of
//! symlinks to the given controller and agent, and to this binary as `kubenft-echo` (which
//! `main` then runs as the lab's echo server and prober, see [`invoked_as_echo`]), so nothing
//! but the controller and the agent needs building besides the bench.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use kubenft_lab::manifest::list;
use kubenft_lab::{
    Cond, EchoPorts, Host, Lab, LabConfig, Pod, ProbeOpts, ProbeResult, Process, Proto, Service,
    Slice, wait_until,
};

use crate::report::{Table, ms, percentile};

/// The name under which this binary acts as the lab's echo server and prober.
pub(crate) const ECHO_NAME: &str = "kubenft-echo";
const NODES: [&str; 2] = ["a", "b"];
pub(crate) const CLIENT: &str = "client";
const SERVICE: &str = "web";
const CLUSTER_IP: &str = "10.96.0.10";
const SERVICE_PORT: u16 = 80;
pub(crate) const TARGET_PORT: u16 = 8080;
const SERVICE_FILE: &str = "web-service.yaml";
const SLICE_FILE: &str = "web-slice.yaml";
/// A change whose new pod has not answered by then fails the suite.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the previous pod may take to answer the freshly started probe.
const STEADY_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-phase (connect, greeting) timeout of one probe attempt: a lost SYN costs this, not the
/// kernel's 1 s retransmission.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(200);
/// Upper bound on one probe process's attempts (it is stopped by time long before).
pub(crate) const MAX_ATTEMPTS: u32 = 100_000;
/// Attempts of the streaming probe, and one-shot probe processes, timed for the floor.
const FLOOR_ATTEMPTS: u32 = 300;
const FLOOR_PROCESSES: usize = 30;
/// Pod addresses per node run out after 243 pods (the lab's `.11`–`.254`); the changes
/// alternate between the two nodes.
const MAX_CHANGES: usize = 480;
const TARGET_P50: Duration = Duration::from_millis(100);
const TARGET_P99: Duration = Duration::from_millis(300);

#[derive(Clone, Debug)]
pub struct Options {
    /// EndpointSlice changes timed.
    pub changes: usize,
    /// Pause between probe attempts.
    pub interval: Duration,
}

/// Whether this process was started as `kubenft-echo` (through suite 5's symlink).
pub fn invoked_as_echo() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|a| Path::new(&a).file_name() == Some(ECHO_NAME.as_ref()))
}

/// Deletes this process's lab — its namespaces and every process in them — and the binary
/// directory, when the bench exits on a signal (the lab's own clean-up runs on drop, which
/// `exit` skips).
pub fn cleanup_on_exit() {
    kubenft_lab::netns::delete_own_labs();
    let _ = std::fs::remove_dir_all(bin_dir_path());
}

/// Runs suite 5 (blocking: the lab drives processes synchronously).
pub fn run(opts: &Options, controller: &Path, agent: &Path) -> anyhow::Result<Vec<Table>> {
    if opts.changes == 0 || opts.changes > MAX_CHANGES {
        bail!(
            "--programming-changes must be 1-{MAX_CHANGES} (the lab's pod addresses), got {}",
            opts.changes
        );
    }
    let bins = BinDir::create(controller, agent)?;
    let lab = Lab::new(LabConfig {
        nodes: NODES.iter().map(|n| (*n).into()).collect(),
        bin_dir: Some(bins.0.clone()),
    })
    .context("building the lab (needs root)")?;
    let echo = lab.binary(ECHO_NAME)?;
    lab.add_pod(CLIENT, "a", &EchoPorts::tcp(&[9]))?;
    let client_ns = lab.ns(Host::Pod(CLIENT))?;
    // Every probe connection goes from one address to one address and port: let TIME_WAIT
    // ports be reused after a second rather than run out of them in long runs.
    kubenft_lab::netns::sysctl(&client_ns, &["net.ipv4.tcp_tw_reuse=1"])?;
    let first = lab.add_pod("web-0", "b", &EchoPorts::tcp(&[TARGET_PORT]))?;
    let service = Service::cluster_ip(SERVICE, CLUSTER_IP).port(
        "http",
        SERVICE_PORT,
        TARGET_PORT,
        Proto::Tcp,
    );
    lab.write_manifest(SERVICE_FILE, &list(&[&service]))?;
    lab.write_manifest(SLICE_FILE, &slice(&first))?;
    let controller = lab.spawn_controller(&[])?;
    let agent_a = lab.spawn_agent("a", &[])?;
    for n in &NODES[1..] {
        lab.spawn_agent(n, &[])?;
    }
    let vip = SocketAddr::new(CLUSTER_IP.parse()?, SERVICE_PORT);
    let logs = |e: anyhow::Error| anyhow!("{e:#}\n{}", log_tails(&[&controller, &agent_a]));
    wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        lab.probe_once(Host::Pod(CLIENT), Proto::Tcp, vip)
            .map(|r| r.is_ok())
    })
    .context("the ClusterIP never answered")
    .map_err(logs)?;

    let probe = |count: u32, until: Option<&str>| {
        StreamProbe::start(&echo, &client_ns, vip, count, opts.interval, until)
    };
    let floor = measure_floor(&lab, vip, &probe).map_err(logs)?;

    let mut samples = Vec::with_capacity(opts.changes);
    let mut failed_attempts = 0;
    let mut previous = first.name.clone();
    for i in 1..=opts.changes {
        let node = NODES[i % 2];
        let pod = lab.add_pod(&format!("web-{i}"), node, &EchoPorts::tcp(&[TARGET_PORT]))?;
        let write = |pod: &Pod| Ok(lab.write_manifest(SLICE_FILE, &slice(pod))?);
        let change = measure_change(&probe, &previous, &pod, &write)
            .with_context(|| format!("change {i} (to {} on node {node})", pod.name))
            .map_err(logs)?;
        samples.push(change.took);
        failed_attempts += change.failed_attempts;
        lab.remove_pod(&previous)?;
        previous = pod.name;
    }
    Ok(vec![table(opts, &samples, &floor, failed_attempts)])
}

/// The Service's only EndpointSlice, with `pod` its only (ready) endpoint.
fn slice(pod: &Pod) -> String {
    list(&[&Slice::for_service(SERVICE)
        .port("http", TARGET_PORT)
        .endpoint(pod, Cond::READY)])
}

fn bin_dir_path() -> PathBuf {
    std::env::temp_dir().join(format!("kubenft-bench-{}-bin", std::process::id()))
}

/// A directory holding the lab's binaries (symlinks) by the names it looks for; removed on
/// drop (suites 8 and 9 use it too).
pub(crate) struct BinDir(pub(crate) PathBuf);

impl BinDir {
    pub(crate) fn create(controller: &Path, agent: &Path) -> anyhow::Result<BinDir> {
        let path = bin_dir_path();
        // A leftover of an earlier process with this pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let dir = BinDir(path);
        let exe = std::env::current_exe().context("locating this binary")?;
        for (name, target) in [
            ("kubenft-controller", controller),
            ("kubenft-agent", agent),
            (ECHO_NAME, exe.as_path()),
        ] {
            let target = std::fs::canonicalize(target)
                .with_context(|| format!("{name}: {}", target.display()))?;
            std::os::unix::fs::symlink(&target, dir.0.join(name))
                .with_context(|| format!("linking {name}"))?;
        }
        Ok(dir)
    }
}

impl Drop for BinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn log_tails(processes: &[&Process]) -> String {
    processes.iter().map(|p| p.log_tail(20)).collect()
}

/// One timed change.
pub(crate) struct Change {
    pub(crate) took: Duration,
    /// Probe attempts that failed (refused, timed out, …) between the write and the answer.
    pub(crate) failed_attempts: usize,
}

pub(crate) fn measure_change(
    probe: &dyn Fn(u32, Option<&str>) -> anyhow::Result<StreamProbe>,
    previous: &str,
    pod: &Pod,
    write: &dyn Fn(&Pod) -> anyhow::Result<()>,
) -> anyhow::Result<Change> {
    let probe = probe(MAX_ATTEMPTS, Some(&pod.name))?;
    let deadline = Instant::now() + STEADY_TIMEOUT;
    loop {
        match probe.next(deadline)? {
            Some((_, r)) if r.server() == Some(previous) => break,
            Some(_) => {}
            None => bail!("the probe was not answered by {previous} within {STEADY_TIMEOUT:?}"),
        }
    }
    let started = Instant::now();
    write(pod)?;
    let deadline = started + CHANGE_TIMEOUT;
    let mut failed_attempts = 0;
    loop {
        match probe.next(deadline)? {
            Some((at, r)) if r.server() == Some(pod.name.as_str()) => {
                return Ok(Change {
                    took: at.saturating_duration_since(started),
                    failed_attempts,
                });
            }
            Some((_, r)) => failed_attempts += usize::from(!r.is_ok()),
            None => bail!(
                "{} did not answer within {CHANGE_TIMEOUT:?} of the EndpointSlice write",
                pod.name
            ),
        }
    }
}

/// What the probe itself costs, against the already-programmed first pod.
pub(crate) struct Floor {
    /// One attempt, connect → greeting, as the probe times it (ms, sorted).
    pub(crate) attempt: Vec<f64>,
    /// Between consecutive results as the bench receives them: attempt + pause + delivery.
    pub(crate) gap: Vec<f64>,
    /// One attempt as its own process (`ip netns exec` + `kubenft-echo probe`), start to exit.
    pub(crate) process: Vec<f64>,
}

pub(crate) fn measure_floor(
    lab: &Lab,
    vip: SocketAddr,
    probe: &dyn Fn(u32, Option<&str>) -> anyhow::Result<StreamProbe>,
) -> anyhow::Result<Floor> {
    let stream = probe(FLOOR_ATTEMPTS, None)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut attempt, mut gap) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..FLOOR_ATTEMPTS {
        let Some((at, r)) = stream.next(deadline)? else {
            bail!("the floor probe did not finish within 30 s");
        };
        let ProbeResult::Ok { ms, .. } = r else {
            bail!("a probe of the programmed pod failed: {r}");
        };
        attempt.push(ms);
        if let Some(prev) = last {
            gap.push(millis(at - prev));
        }
        last = Some(at);
    }
    let mut process = Vec::new();
    for _ in 0..FLOOR_PROCESSES {
        let t = Instant::now();
        let r = lab.probe(Host::Pod(CLIENT), Proto::Tcp, vip, &ProbeOpts::count(1))?;
        process.push(millis(t.elapsed()));
        if !r[0].is_ok() {
            bail!("a one-shot probe of the programmed pod failed: {}", r[0]);
        }
    }
    for v in [&mut attempt, &mut gap, &mut process] {
        v.sort_by(f64::total_cmp);
    }
    Ok(Floor {
        attempt,
        gap,
        process,
    })
}

/// A `kubenft-echo probe` running in a namespace; its result lines are read as they come,
/// each stamped with the time the bench received it.
pub(crate) struct StreamProbe {
    child: Child,
    lines: Receiver<(Instant, String)>,
}

impl StreamProbe {
    pub(crate) fn start(
        echo: &Path,
        ns: &str,
        target: SocketAddr,
        count: u32,
        interval: Duration,
        until: Option<&str>,
    ) -> anyhow::Result<StreamProbe> {
        let mut argv: Vec<String> = vec![
            echo.display().to_string(),
            "probe".into(),
            Proto::Tcp.flag().into(),
            target.to_string(),
        ];
        argv.extend(ProbeOpts::count(count).timeout(ATTEMPT_TIMEOUT).to_args());
        argv.extend(["--interval-ms".into(), interval.as_millis().to_string()]);
        if let Some(name) = until {
            argv.extend(["--until-server".into(), name.to_owned()]);
        }
        let mut child = kubenft_lab::netns::exec_cmd(ns, &argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the probe")?;
        let stdout = child.stdout.take().context("the probe's stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(StreamProbe { child, lines })
    }

    /// The next result, or `None` if there is none by `deadline`.
    fn next(&self, deadline: Instant) -> anyhow::Result<Option<(Instant, ProbeResult)>> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok((at, line)) => Ok(Some((at, ProbeResult::parse_line(&line)?))),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => bail!("the probe process ended early"),
        }
    }
}

impl Drop for StreamProbe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn ms_cell(v: f64) -> String {
    ms(Duration::from_secs_f64(v / 1e3))
}

fn table(opts: &Options, samples: &[Duration], floor: &Floor, failed_attempts: usize) -> Table {
    let mut sorted: Vec<f64> = samples.iter().map(|d| millis(*d)).collect();
    sorted.sort_by(f64::total_cmp);
    let p = |q: f64| percentile(&sorted, q);
    let verdict = |value: f64, target: Duration| {
        if value <= millis(target) {
            "met"
        } else {
            "missed"
        }
    };
    let mut t = Table::new(
        "Suite 5 — network programming latency in the lab: EndpointSlice change → the new pod answers",
        &[
            "changes measured",
            "p50",
            "p90",
            "p99",
            "max",
            "target p50 ≤ 100 ms",
            "target p99 ≤ 300 ms",
        ],
    );
    t.row(vec![
        sorted.len().to_string(),
        ms_cell(p(50.0)),
        ms_cell(p(90.0)),
        ms_cell(p(99.0)),
        ms_cell(p(100.0)),
        verdict(p(50.0), TARGET_P50).into(),
        verdict(p(99.0), TARGET_P99).into(),
    ]);
    t.note(format!(
        "Lab of network namespaces with 2 nodes: the real controller (`--source dir:`) and both real agents applying nft in their node namespaces; a client pod on node a probes a ClusterIP Service whose EndpointSlice has one endpoint. Each of the {} changes adds a fresh pod (alternately on node b and node a), rewrites the EndpointSlice file so the new pod is the only endpoint, and removes the previous pod after the measurement.",
        opts.changes
    ));
    t.note(format!(
        "Clock: from the EndpointSlice file's write (rename into the controller's directory) to the bench receiving the first probe result answered by the new pod. It includes the controller noticing the file (its `dir:` source), re-reading it, planning, the gRPC push, the agent's nft transaction, and the probe's detection lag. The probe is one long-running `kubenft-echo probe` in the client pod, started and answered by the previous pod before the write (process start-up is outside the clock), opening a new TCP connection to the ClusterIP every {} ms until the new pod answers (at most {} s).",
        opts.interval.as_millis(),
        CHANGE_TIMEOUT.as_secs()
    ));
    t.note(format!(
        "Probe floor, against the already-programmed pod (node b, cross-node): one probe attempt (connect → greeting) takes {} p50 / {} p99, and results reach the bench every {} p50 / {} p99 (attempt + pause + delivery) — so a figure above includes up to about one such interval of probing; subtract it for the programming time alone. For comparison, one probe as its own process (`ip netns exec` + `kubenft-echo probe`, start to exit) costs {} p50 / {} p99: the cadence a probe per process would have.",
        ms_cell(percentile(&floor.attempt, 50.0)),
        ms_cell(percentile(&floor.attempt, 99.0)),
        ms_cell(percentile(&floor.gap, 50.0)),
        ms_cell(percentile(&floor.gap, 99.0)),
        ms_cell(percentile(&floor.process, 50.0)),
        ms_cell(percentile(&floor.process, 99.0)),
    ));
    if failed_attempts > 0 {
        t.note(format!(
            "{failed_attempts} probe attempts failed (refused or timed out) while changes were in flight."
        ));
    }
    t
}
