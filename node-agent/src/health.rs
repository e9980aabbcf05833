//! Health as kube-proxy reports it: unhealthy when a change has waited too long to be applied.

use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

/// How long a received change may wait without committing before `/healthz` fails.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

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
}

/// A health snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub healthy: bool,
    pub last_updated: Option<SystemTime>,
    /// Load balancers may send traffic to this node (it is not being deleted).
    pub node_eligible: bool,
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

    pub fn status(&self) -> Status {
        self.status_at(Instant::now())
    }

    fn status_at(&self, now: Instant) -> Status {
        let inner = self.inner.lock();
        let stuck = inner
            .pending_since
            .is_some_and(|since| now.duration_since(since) > HEALTH_TIMEOUT);
        Status {
            healthy: !stuck,
            last_updated: inner.last_updated,
            node_eligible: !inner.deleting,
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
}
