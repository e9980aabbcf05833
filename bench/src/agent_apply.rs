//! Suite 1: the agent's apply path against real nft in a fresh namespace, and the same
//! workload in kube-proxy's shape.
//!
//! kubenft's transactions come from the agent library exactly as the agent builds them:
//! `v1::Change` → `diff::diff` against an `AppliedState` → `Transaction` text → `nft -f -` →
//! `AppliedState::commit`. The first change is a full reconcile (the agent's first apply).

use std::time::{Duration, Instant};

use kubenft_agent::nft::{Nft, NftCli, TableName};
use kubenft_agent::state::AppliedState;
use kubenft_nft::diff;
use kubenft_proto::v1;

use crate::kubeproxy;
use crate::netns::Netns;
use crate::nftrun::{self, Outcome};
use crate::report::{Table, mib, ms, secs};
use crate::workload::{self, Service, Workload};

/// Nodes the endpoints are spread over (the agent is node 0).
pub const NODES: u32 = 100;
/// The node address the agent reports (its NodePort address).
pub const NODE_IP: &str = "10.200.1.1";

#[derive(Clone, Debug)]
pub struct Options {
    pub sizes: Vec<u32>,
    /// One-endpoint changes per size (the median is reported).
    pub changes: usize,
    /// Cap on one baseline full load.
    pub baseline_cap: Duration,
    /// Baseline full loads are skipped above this many Services.
    pub baseline_max: u32,
}

/// Timings of one agent apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyTimes {
    /// `diff::diff` plus rendering the transaction text.
    pub plan: Duration,
    /// The `nft -f -` process, wall clock.
    pub nft: Duration,
    /// Plan, nft and commit: what the agent spends before it ACKs.
    pub total: Duration,
    pub text_bytes: usize,
    pub element_ops: usize,
    pub nft_max_rss: Option<u64>,
}

/// Plans `change` against `state`, runs it in `ns`, commits it. Full applies may take long, so
/// the cap is the caller's.
pub async fn apply_change(
    ns: &Netns,
    state: &mut AppliedState,
    change: &v1::Change,
    cap: Duration,
    measure_rss: bool,
) -> anyhow::Result<ApplyTimes> {
    let started = Instant::now();
    let plan = diff::diff(state, change, &TableName::default())?;
    let text = plan.tx.to_string();
    let planned = started.elapsed();
    let (nft, nft_max_rss) = match nftrun::run(ns, &text, cap, measure_rss).await? {
        Outcome::Done { wall, max_rss } => (wall, max_rss),
        Outcome::TimedOut(cap) => anyhow::bail!("nft did not finish within {cap:?}"),
    };
    let element_ops = plan.tx.element_ops();
    state.commit(plan, std::time::SystemTime::now());
    Ok(ApplyTimes {
        plan: planned,
        nft,
        total: started.elapsed(),
        text_bytes: text.len(),
        element_ops,
        nft_max_rss,
    })
}

/// Plans `change` against `state`, applies it with the agent's own nft runner (small
/// transactions through its long-lived `nft -i`), commits it.
pub async fn apply_change_as_agent(
    nft: &NftCli,
    state: &mut AppliedState,
    change: &v1::Change,
) -> anyhow::Result<ApplyTimes> {
    let started = Instant::now();
    let plan = diff::diff(state, change, &TableName::default())?;
    let text_bytes = plan.tx.to_string().len();
    let planned = started.elapsed();
    nft.apply(&plan.tx).await?;
    let nft_time = started.elapsed() - planned;
    let element_ops = plan.tx.element_ops();
    state.commit(plan, std::time::SystemTime::now());
    Ok(ApplyTimes {
        plan: planned,
        nft: nft_time,
        total: started.elapsed(),
        text_bytes,
        element_ops,
        nft_max_rss: None,
    })
}

/// A Change replacing Service `svc`'s resource.
pub fn single_change(svc: &Service, change_id: u64) -> v1::Change {
    v1::Change {
        trigger_times: Vec::new(),
        change_id,
        system_version: String::new(),
        resources: vec![workload::service_resource(svc, 0)],
        removed: Vec::new(),
        continued: false,
    }
}

/// `svc` with one endpoint moved to a fresh address.
pub fn move_one_endpoint(svc: &Service, n: u32) -> Service {
    let mut new = svc.clone();
    let slot = (n as usize) % new.endpoints.len();
    new.endpoints[slot].ip = workload::moved_ip(n);
    new
}

/// The Services the one-endpoint changes touch: spread over the table.
fn changed_indices(services: u32, changes: usize) -> Vec<u32> {
    let step = (services / changes.max(1) as u32).max(1);
    (0..changes as u32)
        .map(|k| (k * step + step / 2) % services.max(1))
        .collect()
}

/// Figures of one size for one shape.
#[derive(Debug, Default)]
struct SizeResult {
    full: Option<ApplyTimes>,
    full_note: Option<String>,
    change: Option<ApplyTimes>,
    change_note: Option<String>,
}

/// kubenft at one size: full apply, then median one-endpoint change.
async fn kubenft_size(n: u32, changes: usize) -> anyhow::Result<SizeResult> {
    let w = Workload::new(n, NODES);
    let ns = Netns::create("a")?;
    let mut state = AppliedState::unknown(0);
    let change = workload::full_change(w.all(), 0, NODE_IP);
    let full = apply_change(&ns, &mut state, &change, Duration::from_secs(900), true).await?;
    eprintln!("suite 1: kubenft {n}: full apply {}", secs(full.total));
    // Changes go through the agent's runner, as in the agent; the first one (which starts
    // its long-lived nft) is not timed.
    let runner = NftCli::in_netns(ns.name());
    let warm_up = move_one_endpoint(&w.service(0), changes as u32 + 1);
    apply_change_as_agent(&runner, &mut state, &single_change(&warm_up, 1)).await?;
    let mut runs = Vec::new();
    for (k, idx) in changed_indices(n, changes).into_iter().enumerate() {
        let new = move_one_endpoint(&w.service(idx), k as u32);
        let c = single_change(&new, k as u64 + 2);
        runs.push(apply_change_as_agent(&runner, &mut state, &c).await?);
    }
    Ok(SizeResult {
        full: Some(full),
        change: median_times(runs),
        ..Default::default()
    })
}

fn median_times(mut runs: Vec<ApplyTimes>) -> Option<ApplyTimes> {
    runs.sort_by_key(|t| t.total);
    runs.get(runs.len() / 2).copied()
}

/// The kube-proxy shape at one size (full load capped; changes only after a full load).
async fn baseline_size(n: u32, opts: &Options) -> anyhow::Result<SizeResult> {
    if n > opts.baseline_max {
        return Ok(SizeResult {
            full_note: Some("not run: > 30 min expected (superlinear)".into()),
            change_note: Some("not run (needs the full load)".into()),
            ..Default::default()
        });
    }
    let w = Workload::new(n, NODES);
    let ns = Netns::create("k")?;
    let started = Instant::now();
    let text = kubeproxy::full(w.all());
    let render = started.elapsed();
    let outcome = nftrun::run(&ns, &text, opts.baseline_cap, true).await?;
    let Outcome::Done { wall, max_rss } = outcome else {
        return Ok(SizeResult {
            full_note: Some(format!("> {} (capped, killed)", secs(opts.baseline_cap))),
            change_note: Some("not run (full load did not finish)".into()),
            ..Default::default()
        });
    };
    eprintln!("suite 1: baseline {n}: full load {}", secs(wall));
    let full = ApplyTimes {
        plan: render,
        nft: wall,
        total: wall,
        text_bytes: text.len(),
        nft_max_rss: max_rss,
        ..Default::default()
    };
    let mut runs = Vec::new();
    for (k, idx) in changed_indices(n, opts.changes).into_iter().enumerate() {
        let old = w.service(idx);
        let new = move_one_endpoint(&old, k as u32);
        let script = kubeproxy::one_endpoint_change(&old, &new);
        let wall = nftrun::run_ok(&ns, &script, Duration::from_secs(120)).await?;
        runs.push(ApplyTimes {
            nft: wall,
            total: wall,
            text_bytes: script.len(),
            ..Default::default()
        });
        nftrun::run_ok(
            &ns,
            &kubeproxy::delete_stale(&old, &new),
            Duration::from_secs(120),
        )
        .await?;
    }
    Ok(SizeResult {
        full: Some(full),
        change: median_times(runs),
        ..Default::default()
    })
}

/// The floor of any nft call: spawning nft in the namespace with an empty script.
async fn spawn_floor() -> anyhow::Result<Duration> {
    let ns = Netns::create("f")?;
    let mut runs = Vec::new();
    for _ in 0..5 {
        runs.push(nftrun::run_ok(&ns, "", Duration::from_secs(10)).await?);
    }
    Ok(crate::report::median(runs))
}

fn cell(
    t: Option<&ApplyTimes>,
    note: Option<&String>,
    f: impl Fn(&ApplyTimes) -> String,
) -> String {
    match (t, note) {
        (Some(t), _) => f(t),
        (None, Some(n)) => n.clone(),
        (None, None) => "—".into(),
    }
}

fn ratio(ours: Option<&ApplyTimes>, theirs: Option<&ApplyTimes>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if a.total > Duration::ZERO => {
            format!("{:.0}×", b.total.as_secs_f64() / a.total.as_secs_f64())
        }
        _ => "—".into(),
    }
}

/// Runs suite 1 and returns its tables.
pub async fn run(opts: &Options, agent_bin: &std::path::Path) -> anyhow::Result<Vec<Table>> {
    let floor = spawn_floor().await?;
    let mut summary = Table::new(
        "Suite 1 — agent apply: kubenft vs kube-proxy nftables shape (same nft, same run)",
        &[
            "Services",
            "kubenft full apply",
            "baseline full load",
            "full: baseline / kubenft",
            "kubenft 1-endpoint change (median)",
            "baseline 1-endpoint change (median)",
            "change: baseline / kubenft",
        ],
    );
    let mut detail = Table::new(
        "Suite 1 — details",
        &[
            "Services",
            "shape",
            "full: plan+render",
            "full: nft",
            "full: text",
            "full: nft peak RSS",
            "change: plan+render",
            "change: nft",
            "change: element ops",
            "change: text",
        ],
    );
    for &n in &opts.sizes {
        let ours = kubenft_size(n, opts.changes).await?;
        let theirs = baseline_size(n, opts).await?;
        summary.row(vec![
            n.to_string(),
            cell(ours.full.as_ref(), None, |t| secs(t.total)),
            cell(theirs.full.as_ref(), theirs.full_note.as_ref(), |t| {
                secs(t.total)
            }),
            ratio(ours.full.as_ref(), theirs.full.as_ref()),
            cell(ours.change.as_ref(), None, |t| ms(t.total)),
            cell(theirs.change.as_ref(), theirs.change_note.as_ref(), |t| {
                ms(t.total)
            }),
            ratio(ours.change.as_ref(), theirs.change.as_ref()),
        ]);
        for (shape, r) in [("kubenft", &ours), ("kube-proxy", &theirs)] {
            detail.row(detail_row(n, shape, r));
        }
    }
    summary.note(format!(
        "Each full load, and each baseline change, is one `nft -f -` process in a fresh network namespace (kube-proxy runs one per sync). kubenft's changes go through the agent's own nft runner, as the agent applies them: one long-lived `nft -i`, one batch per change (a separate nft process that deletes anything waits 8-16 ms for an RCU grace period when it exits, on this kernel). kubenft times include the agent's planning and commit. Floor of one nft process here (spawn + empty script): {}.",
        ms(floor)
    ));
    summary.note(format!(
        "Workload: N Services × 10 endpoints, one TCP port, endpoints spread over {NODES} nodes (the agent is node 0: 1% of endpoints are local, which adds hairpin elements). Baseline: kube-proxy's chains per service and per endpoint, `service-ips` vmap, masquerade jumps, no affinity sets; its one-endpoint change is kube-proxy's partial sync (new endpoint chain, service chain flushed and rewritten, old endpoint chain flushed; the stale chain's deletion in a second transaction is not timed)."
    ));
    summary.note(format!(
        "Changes are the median of {} one-endpoint changes, each on a different Service spread over the table.",
        opts.changes
    ));
    let mut tables = vec![summary, detail];
    tables.push(crate::agent_rss::run(agent_bin, 10_000).await?);
    Ok(tables)
}

fn detail_row(n: u32, shape: &str, r: &SizeResult) -> Vec<String> {
    let f = r.full.as_ref();
    let c = r.change.as_ref();
    let opt = |t: Option<&ApplyTimes>, g: &dyn Fn(&ApplyTimes) -> String| t.map_or("—".into(), g);
    vec![
        n.to_string(),
        shape.into(),
        opt(f, &|t| ms(t.plan)),
        opt(f, &|t| secs(t.nft)),
        opt(f, &|t| mib(t.text_bytes as u64)),
        opt(f, &|t| t.nft_max_rss.map_or("—".into(), mib)),
        opt(c, &|t| ms(t.plan)),
        opt(c, &|t| ms(t.nft)),
        opt(c, &|t| {
            if t.element_ops > 0 {
                t.element_ops.to_string()
            } else {
                "—".into()
            }
        }),
        opt(c, &|t| format!("{} B", t.text_bytes)),
    ]
}
