//! Suite 6: self-healing. The agent library's applier, `nft monitor` and drift loop against
//! real nft in a fresh namespace, at suite 1's workload: what the periodic checks cost, what
//! the agent burns while idle with them on, and how long each kind of fault takes to be
//! repaired once another program injects it.
//!
//! The agent is built as the agent builds it (`Applier` over `NftCli` with a fresh
//! `AppliedState`, the full rule set applied by `Applier::handle`), and the monitor and drift
//! loop are spawned as in `node-agent/tests/drift.rs`. Faults are injected by a separate
//! `nft` process in the namespace (another program, to the monitor).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kubenft_agent::applier::Applier;
use kubenft_agent::drift::{self, State};
use kubenft_agent::health::Health;
use kubenft_agent::metrics::Metrics;
use kubenft_agent::nft::{NftCli, TableName, monitor};
use kubenft_agent::state::AppliedState;
use kubenft_nft::repair::RepairKind;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent_apply::{NODE_IP, NODES};
use crate::netns::{self, Netns};
use crate::report::{Table, median, ms, secs};
use crate::workload::{self, Workload};

/// USER_HZ: the unit of the CPU times in `/proc/<pid>/stat` (100 on every Linux ABI).
const TICK: Duration = Duration::from_millis(10);
/// Structure checks timed per size (the median is reported).
const STRUCTURE_RUNS: usize = 5;
/// Element verifications timed per size.
const VERIFY_RUNS: usize = 3;
/// How long nothing may happen after a repair before the next fault is injected.
const QUIET: Duration = Duration::from_millis(500);
/// After a full repair: `nft monitor` may die on the recreated table and restart after 1 s,
/// which is one more (full) repair.
const QUIET_FULL: Duration = Duration::from_millis(2500);
/// Longest wait for one repair.
const REPAIR_CAP: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Options {
    pub sizes: Vec<u32>,
    /// Injections per fault kind and size.
    pub injections: usize,
    /// The idle window over which CPU is measured.
    pub idle: Duration,
    /// Injections of one kind stop (fewer than `injections`) once they took this long.
    pub kind_cap: Duration,
}

/// One kind of fault another program injects.
struct Fault {
    name: &'static str,
    /// The nft command for injection `i` of `n` Services.
    inject: fn(i: u32, n: u32) -> String,
    /// nft arguments whose output is the same before the fault and once it is repaired.
    probe: fn(i: u32, n: u32) -> Vec<String>,
    full: bool,
}

/// The Service injection `i` touches: spread over the table.
fn spread(i: u32, n: u32) -> u32 {
    (i.wrapping_mul(7919) + n / 2) % n.max(1)
}

fn service_key(i: u32, n: u32) -> String {
    format!(
        "{} . tcp . {}",
        workload::cluster_ip(spread(i, n)),
        workload::SERVICE_PORT
    )
}

fn foreign_key(i: u32) -> String {
    format!("10.255.{}.{} . udp . 9", i / 250, i % 250 + 1)
}

fn args(text: &str) -> Vec<String> {
    text.split(' ').map(str::to_owned).collect()
}

const FAULTS: [Fault; 6] = [
    Fault {
        name: "element deleted (one `service-ips` element)",
        inject: |i, n| {
            format!(
                "delete element ip kubenft service-ips {{ {} }}",
                service_key(i, n)
            )
        },
        probe: |i, n| {
            let mut a = args("get element ip kubenft service-ips");
            a.push(format!("{{ {} }}", service_key(i, n)));
            a
        },
        full: false,
    },
    Fault {
        name: "foreign element added to `service-ips`",
        inject: |i, _| {
            format!(
                "add element ip kubenft service-ips {{ {} : drop }}",
                foreign_key(i)
            )
        },
        probe: |i, _| {
            let mut a = args("get element ip kubenft service-ips");
            a.push(format!("{{ {} }}", foreign_key(i)));
            a
        },
        full: false,
    },
    Fault {
        name: "slot map `ip-c-0-eps` flushed (one element per Service)",
        inject: |_, _| "flush map ip kubenft ip-c-0-eps".into(),
        probe: |_, _| args("list map ip kubenft ip-c-0-eps"),
        full: false,
    },
    Fault {
        name: "rule inserted into chain `services`",
        inject: |_, _| "insert rule ip kubenft services counter drop".into(),
        probe: |_, _| args("list chain ip kubenft services"),
        full: false,
    },
    Fault {
        name: "base chain `nat-prerouting` deleted",
        inject: |_, _| "delete chain ip kubenft nat-prerouting".into(),
        probe: |_, _| args("list chain ip kubenft nat-prerouting"),
        full: false,
    },
    Fault {
        name: "table `ip kubenft` deleted",
        inject: |_, _| "delete table ip kubenft".into(),
        probe: |_, _| args("list chain ip kubenft services"),
        full: true,
    },
];

/// CPU time in ticks: this process (all threads), its reaped children, its live children.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    own: u64,
    reaped: u64,
    live: u64,
}

impl Cpu {
    fn now() -> Cpu {
        let me = std::process::id();
        let (own, reaped) = stat(&format!("/proc/{me}/stat"))
            .map(|f| (f.utime + f.stime, f.cutime + f.cstime))
            .unwrap_or_default();
        let mut live = 0;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if !name.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                if let Some(f) = stat(&format!("/proc/{name}/stat"))
                    && f.ppid == me
                {
                    live += f.utime + f.stime + f.cutime + f.cstime;
                }
            }
        }
        Cpu { own, reaped, live }
    }

    /// (this process, its children) since `earlier`.
    fn since(self, earlier: Cpu) -> (Duration, Duration) {
        let own = self.own.saturating_sub(earlier.own);
        let children = (self.reaped + self.live).saturating_sub(earlier.reaped + earlier.live);
        (TICK * own as u32, TICK * children as u32)
    }
}

struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

/// Fields 4 and 14-17 of `/proc/<pid>/stat` (after the command name in parentheses).
fn stat(path: &str) -> Option<Stat> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: u32::try_from(num(1)?).ok()?,
        utime: num(11)?,
        stime: num(12)?,
        cutime: num(13)?,
        cstime: num(14)?,
    })
}

fn pct(cpu: Duration, wall: Duration) -> String {
    if wall.is_zero() {
        return "—".into();
    }
    format!("{:.2} %", 100.0 * cpu.as_secs_f64() / wall.as_secs_f64())
}

/// The sum and count of the repair-duration histogram, from the agent's metrics text.
fn repair_histogram(metrics: &Metrics) -> (f64, u64) {
    let text = metrics.encode();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("kubenft_agent_repair_duration_seconds_sum"),
        value("kubenft_agent_repair_duration_seconds_count") as u64,
    )
}

/// The agent library at one size, with its monitor and drift loop once started.
struct Agent {
    ns: Netns,
    dir: PathBuf,
    applier: Arc<Applier<NftCli>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Agent {
    /// A fresh namespace and applier with the whole workload applied (the agent's first
    /// apply, a full reconcile). Returns the apply's wall time too.
    async fn start(n: u32) -> anyhow::Result<(Agent, Duration)> {
        let ns = Netns::create("h")?;
        let dir = std::env::temp_dir().join(format!("{}heal{n}", netns::prefix()));
        std::fs::create_dir_all(&dir)?;
        let metrics = Arc::new(Metrics::default());
        let applier = Arc::new(Applier::new(
            Arc::new(NftCli::in_netns(ns.name())),
            TableName::default(),
            dir.clone(),
            AppliedState::unknown(0),
            metrics.clone(),
            Arc::new(Health::default()),
        ));
        let change = workload::full_change(Workload::new(n, NODES).all(), 0, NODE_IP);
        let started = Instant::now();
        applier
            .handle(&change)
            .await
            .map_err(|e| anyhow::anyhow!("first apply: {e}"))?;
        let took = started.elapsed();
        Ok((
            Agent {
                ns,
                dir,
                applier,
                metrics,
                cancel: CancellationToken::new(),
                tasks: JoinSet::new(),
            },
            took,
        ))
    }

    /// Starts `nft monitor` and the drift loop, as the agent does.
    fn heal(&mut self) -> anyhow::Result<()> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let argv = self
            .applier
            .monitor_argv()
            .context("no nft monitor for NftCli")?;
        self.tasks.spawn(monitor::run(
            argv,
            self.applier.table().clone(),
            self.applier.own_processes(),
            tx,
            self.cancel.clone(),
        ));
        self.tasks
            .spawn(drift::run(self.applier.clone(), rx, self.cancel.clone()));
        Ok(())
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// `nft args...` in the namespace: success and stdout.
    async fn nft(&self, args: &[String]) -> anyhow::Result<(bool, String)> {
        let out = self
            .ns
            .tokio_command("nft")
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .context("nft")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// What a probe lists, order-insensitive (a refilled set may list in another order).
    async fn probe(&self, args: &[String]) -> anyhow::Result<(bool, Vec<String>)> {
        let (ok, text) = self.nft(args).await?;
        let mut items: Vec<String> = text
            .split([',', '\n'])
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        items.sort();
        Ok((ok, items))
    }

    fn repairs(&self) -> BTreeMap<RepairKind, u64> {
        self.applier.dataplane().snapshot().repairs
    }

    /// Waits until no repair has happened for `quiet` and the data plane is converged.
    /// Returns how many repairs happened meanwhile.
    async fn settle(&self, quiet: Duration) -> anyhow::Result<u64> {
        let total = |m: &BTreeMap<RepairKind, u64>| m.values().sum::<u64>();
        let first = total(&self.repairs());
        let mut last = first;
        let mut since = Instant::now();
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let snap = self.applier.dataplane().snapshot();
            let now = total(&snap.repairs);
            if now != last {
                last = now;
                since = Instant::now();
            }
            if snap.state == State::Converged && since.elapsed() >= quiet {
                return Ok(last - first);
            }
            if started.elapsed() > REPAIR_CAP {
                bail!("the data plane did not settle: {snap:?}");
            }
        }
    }
}

/// What the periodic checks cost at one size.
struct Checks {
    structure: Duration,
    verify: Duration,
    /// Mean CPU of one verification: agent library (JSON, comparison), nft processes.
    verify_cpu: (Duration, Duration),
    elements: usize,
}

async fn checks(agent: &Agent) -> anyhow::Result<Checks> {
    let mut runs = Vec::new();
    for _ in 0..STRUCTURE_RUNS {
        let started = Instant::now();
        let damage = agent.applier.check_structure().await?;
        runs.push(started.elapsed());
        if !damage.is_empty() {
            bail!("structure check found damage after the first apply: {damage:?}");
        }
    }
    let structure = median(runs);
    let mut runs = Vec::new();
    let cpu0 = Cpu::now();
    for _ in 0..VERIFY_RUNS {
        let started = Instant::now();
        let damage = agent.applier.verify_content().await?;
        runs.push(started.elapsed());
        match damage {
            Some(d) if d.is_empty() => {}
            other => bail!("element verification after the first apply: {other:?}"),
        }
    }
    let (own, children) = Cpu::now().since(cpu0);
    let state = agent.applier.state().read();
    let elements = kubenft_nft::rules::Family::ALL
        .into_iter()
        .map(|f| state.table(f).elements.len())
        .sum();
    Ok(Checks {
        structure,
        verify: median(runs),
        verify_cpu: (own / VERIFY_RUNS as u32, children / VERIFY_RUNS as u32),
        elements,
    })
}

/// CPU while idle, monitor and drift loop running, after the first verification.
struct Idle {
    /// From starting the loops to the first element verification's end.
    first_verification: Duration,
    window: Duration,
    own: Duration,
    children: Duration,
    /// An element verification ended inside the window.
    verified_in_window: bool,
    drift_in_window: u64,
}

async fn idle(agent: &mut Agent, window: Duration) -> anyhow::Result<Idle> {
    let started = Instant::now();
    agent.heal()?;
    // The first verification ends with the data plane marked converged (the first apply
    // through `handle` does not set that time).
    loop {
        if agent.applier.dataplane().snapshot().converged_at.is_some() {
            break;
        }
        if started.elapsed() > REPAIR_CAP {
            bail!("no element verification within {REPAIR_CAP:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_verification = started.elapsed();
    let before = agent.applier.dataplane().snapshot();
    let cpu0 = Cpu::now();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let (own, children) = Cpu::now().since(cpu0);
    let wall = t0.elapsed();
    let after = agent.applier.dataplane().snapshot();
    Ok(Idle {
        first_verification,
        window: wall,
        own,
        children,
        verified_in_window: after.converged_at != before.converged_at,
        drift_in_window: after.drift - before.drift,
    })
}

/// One fault kind's injections at one size.
struct Repairs {
    done: usize,
    stopped_early: bool,
    /// Injection start → the repair counted (the transaction committed).
    until_repaired: Vec<Duration>,
    /// The repair transaction alone (the agent's histogram).
    transaction: Vec<Duration>,
    /// The injecting nft process's own wall time.
    injection: Vec<Duration>,
    kinds: BTreeMap<RepairKind, u64>,
    extra: u64,
    /// Injections whose probe did not list as before within 10 s of the repair.
    not_back: usize,
}

async fn inject(agent: &Agent, fault: &Fault, n: u32, opts: &Options) -> anyhow::Result<Repairs> {
    let mut out = Repairs {
        done: 0,
        stopped_early: false,
        until_repaired: Vec::new(),
        transaction: Vec::new(),
        injection: Vec::new(),
        kinds: BTreeMap::new(),
        extra: 0,
        not_back: 0,
    };
    let quiet = if fault.full { QUIET_FULL } else { QUIET };
    let kind_started = Instant::now();
    for i in 0..opts.injections as u32 {
        if i > 0 && kind_started.elapsed() > opts.kind_cap {
            out.stopped_early = true;
            break;
        }
        let probe = (fault.probe)(i, n);
        let before = agent.probe(&probe).await?;
        let mut status = agent.applier.dataplane().subscribe();
        status.borrow_and_update();
        let repairs0 = agent.repairs();
        let total0: u64 = repairs0.values().sum();
        let (sum0, count0) = repair_histogram(&agent.metrics);
        let command = (fault.inject)(i, n);
        let mut injector = agent.ns.tokio_command("nft");
        injector.arg(&command).kill_on_drop(true);
        let started = Instant::now();
        let injecting = tokio::spawn(async move {
            let out = injector.output().await;
            (out, started.elapsed())
        });
        let repaired = loop {
            let left = REPAIR_CAP.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("the drift loop is gone"),
                Err(_) => bail!("{command}: not repaired within {REPAIR_CAP:?}"),
            }
            let now = agent.repairs();
            if now.values().sum::<u64>() > total0 {
                let took = started.elapsed();
                for (kind, count) in &now {
                    let new = count - repairs0.get(kind).copied().unwrap_or(0);
                    if new > 0 {
                        *out.kinds.entry(*kind).or_default() += new;
                    }
                }
                break took;
            }
        };
        let (sum1, count1) = repair_histogram(&agent.metrics);
        let (result, injection) = injecting.await.context("injector")?;
        let result = result.context("nft")?;
        if !result.status.success() {
            bail!(
                "{command}: {}",
                String::from_utf8_lossy(&result.stderr).trim()
            );
        }
        out.until_repaired.push(repaired);
        out.injection.push(injection);
        if count1 > count0 {
            out.transaction.push(Duration::from_secs_f64(
                (sum1 - sum0) / (count1 - count0) as f64,
            ));
        }
        // The fault is gone: the probe lists what it did before.
        let mut back = false;
        for _ in 0..200 {
            if agent.probe(&probe).await? == before {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !back {
            // Reported, not fatal: the figures of every other fault still count.
            eprintln!(
                "suite 6: {command}: repaired, but `nft {}` differs",
                probe.join(" ")
            );
            out.not_back += 1;
        }
        out.extra += agent.settle(quiet).await?;
        if fault.full {
            // A rebuilt table is checked whole, as the agent checks it.
            let structure = agent.applier.check_structure().await?;
            let elements = agent.applier.verify_content().await?;
            if !structure.is_empty() || !elements.as_ref().is_some_and(|d| d.is_empty()) {
                bail!("{command}: rebuilt tables differ: {structure:?} {elements:?}");
            }
        }
        out.done += 1;
    }
    Ok(out)
}

fn in_window(idle: &Idle) -> String {
    let mut out = String::from(match idle.verified_in_window {
        true => "yes (included)",
        false => "no (excluded)",
    });
    if idle.drift_in_window > 0 {
        out.push_str(&format!("; drift seen {}×", idle.drift_in_window));
    }
    out
}

fn max(v: &[Duration]) -> Duration {
    v.iter().copied().max().unwrap_or_default()
}

/// Runs suite 6 and returns its tables.
pub async fn run(opts: &Options) -> anyhow::Result<Vec<Table>> {
    let mut cost = Table::new(
        "Suite 6 — self-healing: what the periodic checks cost (agent library, real nft)",
        &[
            "Services",
            "elements applied",
            "first apply",
            "structure check (median of 5)",
            "element verification (median of 3)",
            "verification CPU: nft / agent",
            "verification period `content_interval`",
            "verification share of one core",
        ],
    );
    let mut idle_table = Table::new(
        "Suite 6 — self-healing: agent CPU while idle, monitor and drift loop on",
        &[
            "Services",
            "first element verification done after",
            "idle window",
            "CPU: agent library / nft processes",
            "idle CPU (% of one core)",
            "element verification in window",
            "idle + verification share",
        ],
    );
    let mut repair_table = Table::new(
        "Suite 6 — self-healing: repair per fault, injection → repaired (monitor and drift loop on)",
        &[
            "Services",
            "fault (injected by another nft process)",
            "injections",
            "repairs counted (kind × count)",
            "until repair committed p50",
            "max",
            "repair transaction p50",
            "max",
            "injecting nft p50",
            "extra repairs after",
        ],
    );
    for &n in &opts.sizes {
        let (mut agent, first_apply) = Agent::start(n).await?;
        eprintln!("suite 6: {n}: first apply {}", secs(first_apply));
        let c = checks(&agent).await?;
        let period = drift::content_interval(c.verify);
        let verify_cpu = c.verify_cpu.0 + c.verify_cpu.1;
        eprintln!(
            "suite 6: {n}: structure {}, verification {}",
            ms(c.structure),
            ms(c.verify)
        );
        cost.row(vec![
            n.to_string(),
            c.elements.to_string(),
            secs(first_apply),
            ms(c.structure),
            ms(c.verify),
            format!("{} / {}", ms(c.verify_cpu.1), ms(c.verify_cpu.0)),
            format!("{:.0} s", period.as_secs_f64()),
            format!(
                "{} (CPU), {} (wall)",
                pct(verify_cpu, period),
                pct(c.verify, period)
            ),
        ]);
        let idle = idle(&mut agent, opts.idle).await?;
        eprintln!(
            "suite 6: {n}: idle {} over {}",
            pct(idle.own + idle.children, idle.window),
            secs(idle.window)
        );
        let share = verify_cpu.as_secs_f64() / period.as_secs_f64();
        let idle_share = (idle.own + idle.children).as_secs_f64() / idle.window.as_secs_f64();
        idle_table.row(vec![
            n.to_string(),
            secs(idle.first_verification),
            format!("{:.0} s", idle.window.as_secs_f64()),
            format!("{} / {}", ms(idle.own), ms(idle.children)),
            pct(idle.own + idle.children, idle.window),
            in_window(&idle),
            format!("{:.2} %", 100.0 * (idle_share + share)),
        ]);
        for fault in &FAULTS {
            let r = inject(&agent, fault, n, opts)
                .await
                .with_context(|| format!("{n} Services: {}", fault.name))?;
            eprintln!(
                "suite 6: {n}: {}: {} injections, p50 {}",
                fault.name,
                r.done,
                ms(median(r.until_repaired.clone()))
            );
            let kinds = r
                .kinds
                .iter()
                .map(|(k, c)| format!("{} × {c}", k.as_str()))
                .collect::<Vec<_>>()
                .join(", ");
            repair_table.row(vec![
                n.to_string(),
                fault.name.into(),
                if r.stopped_early {
                    format!(
                        "{} of {} (stopped after {:.0} s)",
                        r.done,
                        opts.injections,
                        opts.kind_cap.as_secs_f64()
                    )
                } else {
                    r.done.to_string()
                } + &match r.not_back {
                    0 => String::new(),
                    k => format!("; {k} not listed back within 10 s of the repair"),
                },
                kinds,
                ms(median(r.until_repaired.clone())),
                ms(max(&r.until_repaired)),
                ms(median(r.transaction.clone())),
                ms(max(&r.transaction)),
                ms(median(r.injection.clone())),
                r.extra.to_string(),
            ]);
        }
        agent.stop().await;
    }
    cost.note(format!(
        "The agent library as the agent runs it: `Applier` over `NftCli::in_netns` in a fresh network namespace, suite 1's workload (N Services × 10 endpoints over {NODES} nodes) applied by `Applier::handle` (the first apply, a full reconcile). Structure check: `Applier::check_structure` (chains, sets and maps listed by name, both families). Element verification: `Applier::verify_content` (every element of every set of ours listed with `nft -j` and compared with the applied state). Both timed before the monitor and the drift loop start."
    ));
    cost.note(
        "Verification CPU: the mean over the runs of the nft processes' user+sys (reaped children, `/proc/self/stat` cutime+cstime) and the agent library's own (utime+stime of the bench process, which runs nothing else meanwhile), in 10 ms ticks. The period is `drift::content_interval(wall time)` (100 × the cost, 60 s to 30 min); the share is the verification's CPU (and wall time) over that period.",
    );
    idle_table.note(format!(
        "After the checks above, `nft::monitor::run` and `drift::run` are spawned as the agent spawns them; the drift loop verifies every element at once, and the window starts when that first verification has ended (the data plane's converged time is set), so the window contains the periodic structure checks (every {} s) and the idle monitor but not that verification; the next one is due one verification period after the first (≥ 60 s), after the window ends unless the column says otherwise. CPU is the bench process's own user+sys (every thread: the agent library's tasks; the bench itself only sleeps) plus its children's (reaped ones from cutime+cstime, live ones — `nft monitor`, the agent's `nft -i` — from their own `/proc/<pid>/stat`), in 10 ms ticks.",
        drift::VERIFY_INTERVAL.as_secs()
    ));
    idle_table.note("Idle + verification share: the idle figure plus the element verification's CPU / its period (from the first table): the agent's steady cost with drift detection on.");
    repair_table.note(
        "Each fault is one `nft <command>` run in the agent's namespace by the bench (not one of the agent's nft processes, so the monitor reports it as another program's). Until repair committed: from spawning that nft to the drift loop counting the repair (`Dataplane` status, watched, not polled: counted just after the repair's nft returns); it includes the injecting nft itself (its wall time, p50, is in its own column; a deleting nft waits for an RCU grace period when it exits, so the repair may commit before the injecting nft has returned), the monitor's notice, the drift loop's 20 ms settle for the rest of a burst, planning, and the repair transaction. Repair transaction: the agent's `kubenft_agent_repair_duration_seconds` (sum/count delta per repair: the repair's nft transaction; for a full repair not the listing that precedes it)."
    );
    repair_table.note(format!(
        "Up to {} injections per fault and size, each on a different Service where the fault names one; before the next, the bench lists the object back with nft (it must list as before the fault; rebuilt tables are also checked whole with `check_structure` and `verify_content`) and waits until no repair has happened for {} ms ({} ms after a full one) with the data plane converged. Extra repairs after: repairs counted after the first one, summed over the injections (a recreated table kills `nft monitor`, whose restart is a notice that notifications were lost: one more full repair). A kind stops early once its injections took {:.0} s; the column says so.",
        opts.injections,
        QUIET.as_millis(),
        QUIET_FULL.as_millis(),
        opts.kind_cap.as_secs_f64()
    ));
    for t in [&mut cost, &mut idle_table, &mut repair_table] {
        t.note("Command: `bash scripts/bench.sh --suite 6`.");
    }
    Ok(vec![cost, idle_table, repair_table])
}
