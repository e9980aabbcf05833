//! Self-healing: what the kernel holds converges back to what the agent applied.
//!
//! [`run`] owns the loop. It takes notices from [`crate::nft::monitor`] (another program
//! changed our tables, or notifications were lost), waits a moment for the rest of a burst,
//! and has the [`Applier`] repair exactly the damage in one transaction. Independently a
//! verifier checks the tables' structure (do our chains and sets exist, is anything foreign
//! in our table) every [`VERIFY_INTERVAL`] — a listing of chains and set declarations costs a
//! few milliseconds whatever the number of Services — and every element of our sets when
//! the agent starts (an adopted state is verified against the kernel) and then at an
//! interval proportional to what that costs ([`content_interval`]). Together they catch
//! what a monitor that was not running could not see. A repair that fails is retried with
//! backoff; the node is reported DIVERGED while it keeps failing.
//!
//! [`Dataplane`] is the state everyone else reads: `/healthz`, metrics, and the controller
//! (through the stream, as `DataplaneStatus`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kubenft_proto::v1;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::applier::Applier;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::nft::Nft;
use crate::nft::monitor::Notice;
use kubenft_nft::repair::{Damage, RepairKind};

/// How long a burst of foreign changes may go on before the repair starts.
const SETTLE: Duration = Duration::from_millis(20);
/// How often the structure of the tables is checked when nothing else happens.
pub const VERIFY_INTERVAL: Duration = Duration::from_secs(10);
const MIN_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(10);
const MIN_CONTENT_INTERVAL: Duration = Duration::from_secs(60);
const MAX_CONTENT_INTERVAL: Duration = Duration::from_secs(1800);
/// Nothing pending: only notices and the periodic check wake the loop.
const IDLE: Duration = Duration::from_secs(3600);

/// The data plane's state as the agent knows it.
pub struct Dataplane {
    inner: Mutex<Inner>,
    status: watch::Sender<v1::DataplaneStatus>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

#[derive(Default)]
struct Inner {
    state: State,
    drift: u64,
    repairs: BTreeMap<RepairKind, u64>,
    converged_at: Option<SystemTime>,
    /// Since when the kernel has not held the applied state (repairing or diverged).
    unconverged_since: Option<Instant>,
    error: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    Converged,
    Repairing,
    Diverged,
}

/// A snapshot for health and metrics.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub state: State,
    pub drift: u64,
    pub repairs: BTreeMap<RepairKind, u64>,
    pub converged_at: Option<SystemTime>,
    pub unconverged_since: Option<Instant>,
    pub error: String,
}

impl Dataplane {
    pub fn new(metrics: Arc<Metrics>, health: Arc<Health>) -> Dataplane {
        let inner = Inner::default();
        let (status, _) = watch::channel(to_proto(&inner));
        metrics.dataplane(inner.state, inner.converged_at);
        health.set_dataplane(to_health(&inner));
        Dataplane {
            inner: Mutex::new(inner),
            status,
            metrics,
            health,
        }
    }

    /// Follows the status the controller is told.
    pub fn subscribe(&self) -> watch::Receiver<v1::DataplaneStatus> {
        self.status.subscribe()
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock();
        Snapshot {
            state: inner.state,
            drift: inner.drift,
            repairs: inner.repairs.clone(),
            converged_at: inner.converged_at,
            unconverged_since: inner.unconverged_since,
            error: inner.error.clone(),
        }
    }

    /// The kernel was seen to hold exactly the applied state (a commit, a repair, a check).
    pub fn converged(&self) {
        self.update(|inner| {
            inner.state = State::Converged;
            inner.converged_at = Some(SystemTime::now());
            inner.unconverged_since = None;
            inner.error.clear();
        });
    }

    /// A verification found the kernel holding exactly the applied state.
    pub fn verified(&self) {
        let converged = self.inner.lock().state == State::Converged;
        if converged {
            self.converged();
        }
    }

    /// Another program changed our tables (`count` commits of it).
    pub fn drift_seen(&self, count: u64) {
        self.metrics.drift_detected(count);
        self.update(|inner| {
            inner.drift += count;
            if inner.state == State::Converged {
                inner.state = State::Repairing;
            }
            inner.unconverged_since.get_or_insert_with(Instant::now);
        });
    }

    pub fn repaired(&self, kinds: impl IntoIterator<Item = RepairKind>) {
        self.update(|inner| {
            for kind in kinds {
                *inner.repairs.entry(kind).or_default() += 1;
            }
        });
        self.converged();
    }

    /// A repair failed: the kernel does not hold the applied state.
    pub fn diverged(&self, error: &str) {
        self.update(|inner| {
            inner.state = State::Diverged;
            inner.unconverged_since.get_or_insert_with(Instant::now);
            inner.error = error.to_owned();
        });
    }

    fn update(&self, f: impl FnOnce(&mut Inner)) {
        let status = {
            let mut inner = self.inner.lock();
            let before = inner.state;
            f(&mut inner);
            self.metrics.dataplane(inner.state, inner.converged_at);
            self.health.set_dataplane(to_health(&inner));
            // `/livez` fails once the node has not converged for longer than its grace.
            match (before, inner.state) {
                (_, State::Diverged) => self.health.not_converged(),
                (State::Diverged, State::Converged) => self.health.converged(),
                _ => {}
            }
            to_proto(&inner)
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

fn to_health(inner: &Inner) -> crate::health::Dataplane {
    crate::health::Dataplane {
        state: match inner.state {
            State::Converged => "converged",
            State::Repairing => "repairing",
            State::Diverged => "diverged",
        },
        drift_detected: inner.drift,
        repairs: inner
            .repairs
            .iter()
            .map(|(kind, n)| (kind.as_str(), *n))
            .collect(),
        last_converged: inner.converged_at,
        error: inner.error.clone(),
        diverged: inner.state == State::Diverged,
    }
}

fn to_proto(inner: &Inner) -> v1::DataplaneStatus {
    let state = match inner.state {
        State::Converged => v1::DataplaneState::DataplaneConverged,
        State::Repairing => v1::DataplaneState::DataplaneRepairing,
        State::Diverged => v1::DataplaneState::DataplaneDiverged,
    };
    v1::DataplaneStatus {
        state: state as i32,
        drift_detected: inner.drift,
        repairs: inner
            .repairs
            .iter()
            .map(|(kind, count)| v1::RepairCount {
                kind: kind.as_str().to_owned(),
                count: *count,
            })
            .collect(),
        converged_unix_ms: inner.converged_at.map_or(0, |t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        }),
        error: inner.error.clone(),
    }
}

/// Turns one notice into damage; returns how many foreign commits it stands for.
fn absorb(notice: Notice, damage: &mut Damage) -> u64 {
    match notice {
        Notice::Changed {
            events,
            overflow_sets,
            overflow,
        } => {
            for event in &events {
                damage.note(event);
            }
            // Too many element changes to keep: the set is rewritten whole (what a flush of
            // 30,000 elements costs to repair), not the table.
            for (family, set) in overflow_sets {
                damage.note_set_flood(family, &set);
            }
            damage.full |= overflow;
            1
        }
        Notice::Lost => {
            damage.full = true;
            1
        }
    }
}

/// What the verifier found.
struct Found {
    damage: Damage,
    what: &'static str,
}

/// Runs until cancelled: repairs what the monitor reports and what the verifier finds.
pub async fn run<N: Nft>(
    applier: Arc<Applier<N>>,
    notices: mpsc::UnboundedReceiver<Notice>,
    cancel: CancellationToken,
) {
    let (found_tx, found_rx) = mpsc::unbounded_channel();
    tokio::join!(
        repair_loop(&applier, notices, found_rx, &cancel),
        verify_loop(&applier, found_tx, &cancel),
    );
}

async fn repair_loop<N: Nft>(
    applier: &Applier<N>,
    mut notices: mpsc::UnboundedReceiver<Notice>,
    mut found: mpsc::UnboundedReceiver<Found>,
    cancel: &CancellationToken,
) {
    let dataplane = applier.dataplane().clone();
    let mut pending = Damage::default();
    let mut retry = MIN_RETRY;
    loop {
        let wait = if pending.is_empty() { IDLE } else { retry };
        tokio::select! {
            () = cancel.cancelled() => return,
            notice = notices.recv() => {
                let Some(notice) = notice else { return };
                let mut seen = absorb(notice, &mut pending);
                // The rest of a burst (a script of several commands is several commits).
                tokio::time::sleep(SETTLE).await;
                while let Ok(more) = notices.try_recv() {
                    seen += absorb(more, &mut pending);
                }
                dataplane.drift_seen(seen);
                tracing::warn!(commits = seen, kinds = ?pending.kinds(), "another program changed our tables; repairing");
            }
            Some(f) = found.recv() => {
                dataplane.drift_seen(1);
                tracing::warn!(check = f.what, kinds = ?f.damage.kinds(), "the tables differ from what was applied; repairing");
                pending.merge(f.damage);
            }
            () = tokio::time::sleep(wait) => {}
        }
        if std::mem::take(&mut pending.recheck) {
            match applier.check_structure().await {
                Ok(found) => pending.merge(found),
                Err(e) => tracing::debug!(error = %e, "cannot check the tables' structure"),
            }
        }
        if pending.is_empty() {
            // Another program's commit that damaged nothing of ours: the kernel still holds
            // the applied state (without this the node stayed REPAIRING until the next repair).
            dataplane.converged();
            continue;
        }
        match applier.repair(&pending).await {
            Ok(kinds) => {
                if !kinds.is_empty() {
                    tracing::info!(kinds = ?kinds, "repaired the tables");
                }
                dataplane.repaired(kinds);
                pending = Damage::default();
                retry = MIN_RETRY;
            }
            Err(error) => {
                tracing::error!(%error, retry_in = ?retry, "cannot repair the tables");
                dataplane.diverged(&error);
                // Whatever else happened meanwhile, the next attempt rewrites everything.
                pending = Damage::full();
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// The backstop for what no notification told: the tables' structure every
/// [`VERIFY_INTERVAL`] (a few milliseconds), and every element at start (an adopted state
/// is checked against the kernel) and then at an interval proportional to what that costs.
async fn verify_loop<N: Nft>(
    applier: &Applier<N>,
    found: mpsc::UnboundedSender<Found>,
    cancel: &CancellationToken,
) {
    let mut structure = tokio::time::interval(VERIFY_INTERVAL);
    structure.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut content_due = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = structure.tick() => {
                match applier.check_structure().await {
                    Ok(damage) if damage.is_empty() => {}
                    Ok(damage) => {
                        let _ = found.send(Found { damage, what: "structure" });
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot check the tables' structure"),
                }
            }
            () = tokio::time::sleep_until(content_due) => {
                let started = tokio::time::Instant::now();
                let result = applier.verify_content().await;
                let took = started.elapsed();
                content_due = tokio::time::Instant::now() + content_interval(took);
                match result {
                    Ok(Some(damage)) if damage.is_empty() => {
                        tracing::debug!(took_ms = took.as_millis(), "verified every element");
                        applier.dataplane().verified();
                    }
                    Ok(Some(damage)) => {
                        let _ = found.send(Found { damage, what: "elements" });
                    }
                    // A change committed meanwhile: look again soon.
                    Ok(None) => content_due = tokio::time::Instant::now() + VERIFY_INTERVAL,
                    Err(e) => tracing::debug!(error = %e, "cannot verify the elements"),
                }
            }
        }
    }
}

/// The time between two full element verifications: 100 times what one costs (1% of a core
/// at most), at least a minute and at most half an hour.
pub fn content_interval(cost: Duration) -> Duration {
    (cost * 100).clamp(MIN_CONTENT_INTERVAL, MAX_CONTENT_INTERVAL)
}
