//! Cluster-wide network programming latency: for each input change, which nodes' rule sets it
//! altered and when each agent acknowledged a version including it.
//!
//! A replan publishes, for every node whose rule set it changed, a new revision of that node's
//! rule set; an acknowledged rule set of that revision or later includes the change. So the
//! record of a change is the set of (node, revision) it produced, emptied as acknowledgements
//! arrive: exact, not sampled. Durations count from the change's EndpointSlice trigger time
//! (`endpoints.kubernetes.io/last-change-trigger-time`), as kube-proxy's
//! `network_programming_duration_seconds` does, else from when the controller planned it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Changes kept (the oldest are forgotten first, done or not).
pub const KEPT: usize = 256;
/// Pending nodes named per change in a listing.
const NAMED_PENDING: usize = 16;

/// Now, in Unix milliseconds.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One input change as `ListChanges` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeView {
    pub revision: u64,
    pub trigger_unix_ms: Option<i64>,
    pub planned_unix_ms: i64,
    pub nodes: u32,
    pub acked: u32,
    pub slowest: Option<(String, u64)>,
    /// Nodes still to acknowledge it (at most [`NAMED_PENDING`]).
    pub pending: Vec<String>,
    /// Planned for every node, and acknowledged by every node it altered.
    pub done: bool,
}

#[derive(Debug)]
struct Record {
    view: ChangeView,
    /// Each node still to acknowledge it, with the first revision of its rule set that
    /// includes it.
    waiting: BTreeMap<String, u64>,
    /// Its replan is still planning nodes: not done even if every node so far acknowledged.
    open: bool,
}

impl Record {
    fn start_ms(&self) -> i64 {
        self.view
            .trigger_unix_ms
            .unwrap_or(self.view.planned_unix_ms)
    }

    fn completed(&self) -> Completed {
        Completed {
            revision: self.view.revision,
            since_trigger: self
                .view
                .trigger_unix_ms
                .map(|_| Duration::from_millis(self.view.slowest.as_ref().map_or(0, |s| s.1))),
        }
    }
}

/// A change every affected node acknowledged.
#[derive(Clone, Debug, PartialEq)]
pub struct Completed {
    pub revision: u64,
    /// From its trigger time to the last acknowledgement; `None` for a change without one
    /// (kube-proxy observes only those).
    pub since_trigger: Option<Duration>,
}

/// The recent changes, oldest first.
#[derive(Debug, Default)]
pub struct ChangeLog {
    records: VecDeque<Record>,
    last_revision: u64,
}

/// What an acknowledgement settled.
#[derive(Debug, Default, PartialEq)]
pub struct Settled {
    /// Changes it completed.
    pub completed: Vec<Completed>,
    /// The newest change it settled for the node, and the node's duration for it (ms).
    pub latest: Option<(u64, u64)>,
}

impl ChangeLog {
    /// A replan planned at `planned_unix_ms` starts; `trigger_unix_ms` is its EndpointSlice
    /// trigger time, if any. Returns its revision, to [`ChangeLog::add`] each node to before
    /// publishing the node's new rule set (so that no acknowledgement can come first), and to
    /// [`ChangeLog::close`] once every node is planned.
    pub fn open(&mut self, trigger_unix_ms: Option<i64>, planned_unix_ms: i64) -> u64 {
        self.last_revision += 1;
        if self.records.len() == KEPT {
            self.records.pop_front();
        }
        self.records.push_back(Record {
            view: ChangeView {
                revision: self.last_revision,
                trigger_unix_ms,
                planned_unix_ms,
                ..Default::default()
            },
            waiting: BTreeMap::new(),
            open: true,
        });
        self.last_revision
    }

    /// The change `revision` altered `node`'s rule set: revision `rev` of it includes it.
    pub fn add(&mut self, revision: u64, node: &str, rev: u64) {
        if let Some(record) = self
            .records
            .back_mut()
            .filter(|r| r.view.revision == revision)
            && record.waiting.insert(node.to_owned(), rev).is_none()
        {
            record.view.nodes += 1;
        }
    }

    /// Every node of change `revision` is planned: forgotten if it altered none (its
    /// revision is given to the next), done if every node it altered acknowledged it
    /// meanwhile.
    pub fn close(&mut self, revision: u64) -> Option<Completed> {
        let record = self
            .records
            .back_mut()
            .filter(|r| r.view.revision == revision)?;
        record.open = false;
        if record.view.nodes == 0 {
            self.records.pop_back();
            self.last_revision -= 1;
            return None;
        }
        record.waiting.is_empty().then(|| record.completed())
    }

    /// A change and its nodes in one call (tests).
    #[cfg(test)]
    fn record(
        &mut self,
        trigger_unix_ms: Option<i64>,
        planned_unix_ms: i64,
        affected: impl IntoIterator<Item = (String, u64)>,
    ) -> Option<u64> {
        let revision = self.open(trigger_unix_ms, planned_unix_ms);
        for (node, rev) in affected {
            self.add(revision, &node, rev);
        }
        self.close(revision);
        self.records
            .back()
            .filter(|r| r.view.revision == revision)
            .map(|_| revision)
    }

    /// `node`'s agent acknowledged revision `rev` of its rule set at `now_unix_ms`: every
    /// change it waited for up to that revision is settled for it.
    pub fn acked(&mut self, node: &str, rev: u64, now_unix_ms: i64) -> Settled {
        let mut settled = Settled::default();
        for record in &mut self.records {
            if record.waiting.get(node).is_none_or(|&needed| needed > rev) {
                continue;
            }
            record.waiting.remove(node);
            let ms = u64::try_from(now_unix_ms.saturating_sub(record.start_ms())).unwrap_or(0);
            let view = &mut record.view;
            view.acked += 1;
            if view
                .slowest
                .as_ref()
                .is_none_or(|(_, slowest)| ms >= *slowest)
            {
                view.slowest = Some((node.to_owned(), ms));
            }
            settled.latest = Some((view.revision, ms));
            if record.waiting.is_empty() && !record.open {
                settled.completed.push(record.completed());
            }
        }
        settled
    }

    /// The recent changes, newest first.
    pub fn list(&self) -> Vec<ChangeView> {
        self.records
            .iter()
            .rev()
            .map(|r| ChangeView {
                pending: r.waiting.keys().take(NAMED_PENDING).cloned().collect(),
                done: !r.open && r.waiting.is_empty(),
                ..r.view.clone()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affected(nodes: &[(&str, u64)]) -> Vec<(String, u64)> {
        nodes.iter().map(|(n, r)| (n.to_string(), *r)).collect()
    }

    #[test]
    fn a_change_is_done_when_the_last_affected_node_acknowledges_it() {
        let mut log = ChangeLog::default();
        assert_eq!(log.record(Some(1_000), 1_200, []), None, "no node changed");
        let rev = log
            .record(Some(1_000), 1_200, affected(&[("a", 5), ("b", 7)]))
            .unwrap();
        assert_eq!(rev, 1);
        // b acknowledges an older revision: not yet.
        assert_eq!(log.acked("b", 6, 1_300), Settled::default());
        let s = log.acked("a", 5, 1_400);
        assert_eq!((s.completed.len(), s.latest), (0, Some((1, 400))));
        let view = &log.list()[0];
        assert_eq!((view.acked, view.nodes, view.done), (1, 2, false));
        assert_eq!(view.pending, ["b"]);
        // A later revision includes it.
        let s = log.acked("b", 9, 1_750);
        assert_eq!(
            s.completed,
            [Completed {
                revision: 1,
                since_trigger: Some(Duration::from_millis(750))
            }]
        );
        let view = &log.list()[0];
        assert!(view.done && view.pending.is_empty());
        assert_eq!(view.slowest, Some(("b".into(), 750)));
        // Acknowledged again: nothing more to settle.
        assert_eq!(log.acked("b", 9, 2_000), Settled::default());
    }

    #[test]
    fn one_acknowledgement_settles_every_change_it_includes_and_without_a_trigger_time_no_observation()
     {
        let mut log = ChangeLog::default();
        log.record(None, 100, affected(&[("a", 1)]));
        log.record(Some(150), 200, affected(&[("a", 2)]));
        log.record(Some(300), 300, affected(&[("a", 3)]));
        let s = log.acked("a", 2, 400);
        assert_eq!(
            s.completed,
            [
                Completed {
                    revision: 1,
                    since_trigger: None
                },
                Completed {
                    revision: 2,
                    since_trigger: Some(Duration::from_millis(250))
                }
            ]
        );
        assert_eq!(s.latest, Some((2, 250)));
        let list = log.list();
        assert_eq!(
            list.iter()
                .map(|c| (c.revision, c.done))
                .collect::<Vec<_>>(),
            [(3, false), (2, true), (1, true)],
            "newest first"
        );
    }

    #[test]
    fn a_change_still_planning_is_not_done_before_it_closes() {
        let mut log = ChangeLog::default();
        assert_eq!(log.open(Some(0), 0), 1);
        log.add(1, "a", 3);
        // a acknowledges before b is even planned.
        assert!(log.acked("a", 3, 10).completed.is_empty());
        log.add(1, "b", 4);
        assert_eq!(log.close(1), None, "b has not acknowledged");
        assert_eq!(log.acked("b", 4, 20).completed.len(), 1);
        // Every node acknowledged before the replan ended: done when it closes.
        let r = log.open(None, 30);
        log.add(r, "a", 5);
        assert!(log.acked("a", 5, 40).completed.is_empty());
        assert_eq!(
            log.close(r),
            Some(Completed {
                revision: 2,
                since_trigger: None
            })
        );
        // A replan that altered no node leaves no record and no gap.
        let r = log.open(None, 50);
        assert_eq!(log.close(r), None);
        assert_eq!(log.open(None, 60), 3);
    }

    #[test]
    fn the_log_is_bounded_and_clock_skew_is_never_negative() {
        let mut log = ChangeLog::default();
        for i in 0..(KEPT as u64 + 10) {
            log.record(Some(10_000), 0, affected(&[("a", i + 1)]));
        }
        let list = log.list();
        assert_eq!(list.len(), KEPT);
        assert_eq!(list[0].revision, KEPT as u64 + 10);
        // A trigger time ahead of our clock: 0, not a huge number.
        let s = log.acked("a", u64::MAX, 5_000);
        assert_eq!(s.latest.map(|l| l.1), Some(0));
        assert_eq!(s.completed.len(), KEPT);
    }
}
