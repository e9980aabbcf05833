//! Health as kube-proxy reports it: unhealthy when a change has waited too long to be applied.
//! Beyond kube-proxy: not live once the node has not converged for longer than the `/livez`
//! grace (a refused change, or repairs that keep failing), so that the kubelet restarts it.

use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

/// How long a received change may wait without committing before `/healthz` fails.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the node may stay not converged before `/livez` fails (`--livez-grace`).
pub const LIVEZ_GRACE: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Health {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet committed arrived.
    pending_since: Option<Instant>,
    /// The node is being deleted (from the controller's NodeRules).
    deleting: bool,
    /// Since when the kernel has not held what the agent should enforce (None: converged).
    not_converged_since: Option<Instant>,
    /// `--livez-grace` (None: [`LIVEZ_GRACE`]).
    livez_grace: Option<Duration>,
    /// Why the state file could not be written (None: it was, or nothing was written yet).
    persist_error: Option<String>,
    /// Another agent holds the node (see [`crate::lock`]); this one only answers probes.
    standby: bool,
    /// Whether the kernel holds what was applied (see [`crate::drift`]).
    dataplane: Dataplane,
    /// Other programs' Service rules on this node (see [`crate::migrate::detect`]).
    conflicts: Vec<Conflict>,
}

/// Another program's Service rules on this node: reported, never a failure (a migration from
/// kube-proxy in progress has them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// `kube-proxy-nftables`, `kube-proxy-iptables`, `kube-proxy-iptables-legacy` or
    /// `foreign-dnat`.
    pub source: &'static str,
    /// `FAMILY NAME`.
    pub table: String,
    pub detail: String,
}

/// The data plane as `/healthz` shows it: drift seen, repairs made, when the kernel last
/// matched, and a node that cannot converge (which fails `/healthz`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataplane {
    pub state: &'static str,
    pub drift_detected: u64,
    pub repairs: std::collections::BTreeMap<&'static str, u64>,
    pub last_converged: Option<SystemTime>,
    pub error: String,
    pub diverged: bool,
}

/// A health snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub healthy: bool,
    pub last_updated: Option<SystemTime>,
    /// Load balancers may send traffic to this node (it is not being deleted).
    pub node_eligible: bool,
    /// Not failed by the convergence grace (`/livez` also needs `healthy`).
    pub live: bool,
    /// Since when the node has not converged, if it has not.
    pub not_converged_since: Option<SystemTime>,
    /// The last failure to write the state file, while it lasts.
    pub persist_error: Option<String>,
    /// This agent waits for another to release the node.
    pub standby: bool,
    pub dataplane: Dataplane,
    pub conflicts: Vec<Conflict>,
}

impl Health {
    /// A change arrived; it is pending until committed.
    pub fn received(&self) {
        self.inner
            .lock()
            .pending_since
            .get_or_insert_with(Instant::now);
    }

    /// The agent's state now matches the last change received.
    pub fn committed(&self) {
        let mut inner = self.inner.lock();
        inner.pending_since = None;
        inner.last_updated = Some(SystemTime::now());
    }

    /// Whether the node is being deleted, as the applied NodeRules say.
    pub fn set_deleting(&self, deleting: bool) {
        self.inner.lock().deleting = deleting;
    }

    /// A health whose `/livez` fails after `grace` without converging.
    pub fn with_livez_grace(grace: Duration) -> Health {
        let health = Health::default();
        health.inner.lock().livez_grace = Some(grace);
        health
    }

    /// The kernel does not hold what the agent should enforce (a change was refused, a repair
    /// failed): the grace of `/livez` runs from the first such moment until [`Self::converged`].
    pub fn not_converged(&self) {
        self.inner
            .lock()
            .not_converged_since
            .get_or_insert_with(Instant::now);
    }

    /// The kernel holds what the agent should enforce (a change committed, a repair worked).
    pub fn converged(&self) {
        self.inner.lock().not_converged_since = None;
    }

    /// Records the outcome of writing the state file; true when it went from working to
    /// failing or back (the caller logs only then).
    pub fn set_persist_error(&self, error: Option<String>) -> bool {
        let mut inner = self.inner.lock();
        let changed = inner.persist_error.is_some() != error.is_some();
        inner.persist_error = error;
        changed
    }

    /// Whether this agent is a standby (another holds the node's lock).
    pub fn set_standby(&self, standby: bool) {
        self.inner.lock().standby = standby;
    }

    /// What the drift loop knows of the kernel.
    pub fn set_dataplane(&self, dataplane: Dataplane) {
        self.inner.lock().dataplane = dataplane;
    }

    /// Other programs' Service rules found on this node (all of them, each time).
    pub fn set_conflicts(&self, conflicts: Vec<Conflict>) {
        self.inner.lock().conflicts = conflicts;
    }

    pub fn status(&self) -> Status {
        self.status_at(Instant::now())
    }

    fn status_at(&self, now: Instant) -> Status {
        let inner = self.inner.lock();
        let stuck = inner
            .pending_since
            .is_some_and(|since| now.duration_since(since) > HEALTH_TIMEOUT);
        let grace = inner.livez_grace.unwrap_or(LIVEZ_GRACE);
        let live = inner
            .not_converged_since
            .is_none_or(|since| now.saturating_duration_since(since) <= grace);
        Status {
            healthy: !stuck && !inner.dataplane.diverged,
            last_updated: inner.last_updated,
            node_eligible: !inner.deleting,
            live,
            not_converged_since: inner.not_converged_since.map(|since| {
                let ago = Instant::now().saturating_duration_since(since);
                SystemTime::now()
                    .checked_sub(ago)
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            }),
            persist_error: inner.persist_error.clone(),
            standby: inner.standby,
            dataplane: inner.dataplane.clone(),
            conflicts: inner.conflicts.clone(),
        }
    }
}

/// RFC 3339 in UTC with nanoseconds, as Go's `time.Time` marshals to JSON.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
    }

    #[test]
    fn unhealthy_only_when_a_change_waits_too_long() {
        let h = Health::default();
        assert!(h.status().healthy);
        h.received();
        let later = Instant::now() + HEALTH_TIMEOUT + Duration::from_secs(1);
        assert!(!h.status_at(later).healthy);
        h.committed();
        assert!(h.status_at(later).healthy);
        assert!(h.status().last_updated.is_some());
    }

    #[test]
    fn not_live_only_when_not_converged_beyond_the_grace() {
        let h = Health::with_livez_grace(Duration::from_secs(30));
        let much_later = Instant::now() + Duration::from_secs(3600);
        assert!(h.status_at(much_later).live);
        h.not_converged();
        assert!(h.status().live);
        assert!(h.status().not_converged_since.is_some());
        assert!(!h.status_at(Instant::now() + Duration::from_secs(31)).live);
        // Still failing later: the grace runs from the first failure.
        h.not_converged();
        assert!(!h.status_at(Instant::now() + Duration::from_secs(31)).live);
        h.converged();
        assert!(h.status_at(much_later).live);
        assert!(h.status().not_converged_since.is_none());
        // The default grace is minutes.
        let d = Health::default();
        d.not_converged();
        assert!(d.status_at(Instant::now() + Duration::from_secs(60)).live);
        assert!(
            !d.status_at(Instant::now() + LIVEZ_GRACE + Duration::from_secs(1))
                .live
        );
    }

    #[test]
    fn persist_errors_report_changes_only() {
        let h = Health::default();
        assert!(!h.set_persist_error(None));
        assert!(h.set_persist_error(Some("a".into())));
        assert!(!h.set_persist_error(Some("b".into())));
        assert_eq!(h.status().persist_error.as_deref(), Some("b"));
        assert!(h.set_persist_error(None));
        assert!(h.status().persist_error.is_none());
    }
}
