//! The hub: the one owner of every node's desired rule set and sync status.
//!
//! ```text
//!  source ──Inputs──▶ Hub::set_inputs ──Catalog──▶ per node: watch::Sender<Arc<NodeRuleSet>>
//!                                                        │
//!  agent stream ──attach(node, addresses)──▶ watch::Receiver ──▶ stream task diffs & sends
//!  stream task ──acked / nacked / retrying / dataplane / detached──▶ NodeStatus (inspection, metrics)
//! ```
//!
//! Desired state is level-triggered: a stream task only ever looks at the latest rule set, so
//! a slow agent gets one merged change, never a backlog. It is computed without the hub's lock
//! and published whole, so nobody waits for a replan to read it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use kubenft_proto::v1::{DataplaneState, DataplaneStatus, IpFamily, SyncState};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cores;
use changes::{ChangeLog, ChangeView};
use drain::EndpointIndex;
use kubenft_plan::model::Rejection;
use kubenft_plan::policy::missing_detector;
use kubenft_plan::view::NodeRuleSet;
use kubenft_plan::{AgentFacts, Catalog, ClusterPolicy, DetectLocal, Inputs};
use prometheus_client::metrics::histogram::Histogram;

/// Sync status of one node, as inspection shows it.
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    pub streams: u32,
    pub agent_version: String,
    /// The rule-stream protocol of the agent last connected.
    pub agent_protocol: u32,
    /// Why the node's agent was last refused (version skew), until one of its streams opens.
    pub refused: Option<String>,
    pub agent_addresses: Vec<IpAddr>,
    pub acked_version: String,
    /// The rule set the agent last acknowledged (kept when its stream closes: the agent keeps
    /// enforcing it), for the drain gate. `None` until one is acknowledged to this controller.
    pub acked: Option<Arc<NodeRuleSet>>,
    /// The latest input change (its revision) this node acknowledged, and its duration (ms).
    pub last_change: Option<(u64, u64)>,
    pub last_nack_version: String,
    pub last_nack_error: String,
    /// The last change sent was refused and nothing newer was acknowledged since.
    pub nacked: bool,
    /// Since when the desired rule set differs from what the agent acknowledged.
    pub pending_since: Option<Instant>,
    /// The agent's last report on its data plane (bounded), while the stream that sent it is
    /// open.
    pub dataplane: Option<DataplaneStatus>,
    /// Times the refused change has been sent again since the agent last acknowledged one or
    /// the desired rule set changed.
    pub nack_retries: u32,
    /// When the refused change is sent again (none while a change is in flight).
    pub next_retry: Option<Instant>,
    /// The streams that set `dataplane` and the retry fields: only their closing clears them,
    /// not that of an older stream of the same node still being torn down.
    dataplane_stream: u64,
    retry_stream: u64,
}

impl NodeStatus {
    /// The node's state as inspection and metrics show it. A data plane being repaired or that
    /// cannot converge is shown as such whatever the agent acknowledged: such a node does not
    /// (fully) enforce its rule set, so it is never SYNCED.
    pub fn state(&self, desired_version: &str) -> SyncState {
        if self.streams == 0 {
            return SyncState::NotConnected;
        }
        match self.dataplane.as_ref().map(|d| d.state()) {
            Some(DataplaneState::DataplaneDiverged) => return SyncState::Diverged,
            Some(DataplaneState::DataplaneRepairing) => return SyncState::Repairing,
            _ => {}
        }
        if self.nacked {
            SyncState::Nacked
        } else if self.acked_version == desired_version {
            SyncState::Synced
        } else {
            SyncState::Pending
        }
    }
}

/// One node: its published desired rule set, the facts it is planned from, and its status,
/// each behind its own lock so that none waits for another.
struct NodeEntry {
    /// The latest desired rule set, published whole: readers never wait for a plan.
    desired: watch::Sender<Arc<NodeRuleSet>>,
    /// Held while this node alone is planned, so that its plans are published in the order
    /// they were made (never an older catalog's over a newer one).
    facts: Mutex<AgentFacts>,
    /// Held only to read or write a field or two.
    status: Mutex<NodeStatus>,
}

/// Which nodes exist and the catalog they are planned from: held only to look up or swap.
struct Directory {
    catalog: Arc<Catalog>,
    nodes: BTreeMap<String, Arc<NodeEntry>>,
    /// The source has delivered its first complete view.
    synced: bool,
    /// Agent streams opened so far (numbers them).
    streams_opened: u64,
}

/// What a connecting agent says it is.
#[derive(Clone, Debug, Default)]
pub struct AgentBuild {
    /// Its release and commit.
    pub version: String,
    /// The rule-stream protocol it speaks (accepted by the version-skew rule).
    pub protocol: u32,
}

/// Called before each node is planned by a replan (tests hold a replan in progress with it).
#[cfg(test)]
type PlanHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Shared by the source task, every agent stream and the inspection service.
///
/// Planning happens without the hub's lock: a new catalog is built aside, swapped in, and each
/// node's rule set is then planned under that node's own lock and published on its watch
/// channel. Stream tasks and inspection only ever take short locks.
pub struct Hub {
    policy: Arc<ClusterPolicy>,
    directory: Mutex<Directory>,
    /// One replan at a time: each builds on the catalog before it.
    replanning: Mutex<()>,
    /// Every published resource with endpoints, by endpoint address (the drain gate).
    endpoints: Mutex<EndpointIndex>,
    /// The recent input changes and which nodes acknowledged them.
    changes: Mutex<ChangeLog>,
    /// Where a completed change's latency is observed (the controller's metric).
    programming: std::sync::OnceLock<Histogram>,
    /// Bumped whenever an agent acknowledges, connects or disconnects, and after a replan:
    /// what a waiting drain gate wakes on.
    progress: watch::Sender<u64>,
    #[cfg(test)]
    plan_hook: Mutex<Option<PlanHook>>,
}

impl Hub {
    pub fn new(policy: ClusterPolicy) -> Self {
        let policy = Arc::new(policy);
        Hub {
            directory: Mutex::new(Directory {
                catalog: Arc::new(Catalog::empty(policy.clone())),
                nodes: BTreeMap::new(),
                synced: false,
                streams_opened: 0,
            }),
            replanning: Mutex::new(()),
            endpoints: Mutex::new(EndpointIndex::default()),
            changes: Mutex::new(ChangeLog::default()),
            programming: std::sync::OnceLock::new(),
            progress: watch::channel(0).0,
            #[cfg(test)]
            plan_hook: Mutex::new(None),
            policy,
        }
    }

    /// The cluster-wide settings this hub plans with.
    pub fn policy(&self) -> &ClusterPolicy {
        &self.policy
    }

    /// Replans every node from new inputs: only the ports that changed are recomputed, and
    /// only for the nodes that see them differently from the shared base. Readers see each
    /// node's old rule set until its new one is published.
    pub fn set_inputs(&self, inputs: &Inputs) {
        let _replanning = self.replanning.lock();
        let previous = self.directory.lock().catalog.clone();
        let catalog = Arc::new(Catalog::build(self.policy.clone(), inputs, Some(&previous)));
        if self.policy.detect_local == DetectLocal::NodeCidr {
            warn_without_pod_cidrs(&self.policy, &previous, &catalog);
        }
        self.index_ports(&catalog);
        let revision = self
            .changes
            .lock()
            .open(new_trigger(&previous, &catalog), changes::now_unix_ms());
        let mut entries = self.publish_catalog(&catalog);
        // After a restart every connected agent's rule set is built here, on every core.
        cores::for_each_mut(&mut entries, |(name, entry)| {
            #[cfg(test)]
            if let Some(hook) = self.plan_hook.lock().clone() {
                hook(name);
            }
            let node_changed = previous.nodes().get(name) != catalog.nodes().get(name);
            entry.replan(self, &catalog, node_changed, Some((name, revision)));
        });
        let completed = self.changes.lock().close(revision);
        if let Some(completed) = completed {
            self.observe(&completed);
        }
        self.bump();
    }

    /// Indexes the shared resources of the ports `catalog` changed by endpoint address.
    fn index_ports(&self, catalog: &Catalog) {
        let mut index = self.endpoints.lock();
        for name in &catalog.changed {
            if let Some(port) = catalog.ports.get(name) {
                index.add(&port.generic);
            }
        }
    }

    /// Observes a completed change's latency, when it has a trigger time.
    fn observe(&self, completed: &changes::Completed) {
        if let (Some(since), Some(histogram)) = (completed.since_trigger, self.programming.get()) {
            histogram.observe(since.as_secs_f64());
        }
    }

    /// Wakes waiting drain gates.
    fn bump(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Observe each completed change with a trigger time into `histogram` from now on.
    pub fn observe_programming(&self, histogram: Histogram) {
        let _ = self.programming.set(histogram);
    }

    /// Changes whenever something a drain gate depends on may have.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// The recent input changes, newest first.
    pub fn changes(&self) -> Vec<ChangeView> {
        self.changes.lock().list()
    }

    /// Swaps `catalog` in and brings the node list up to it: nodes known from Node objects,
    /// plus nodes with a connected agent. Returns every node, to be planned.
    fn publish_catalog(&self, catalog: &Arc<Catalog>) -> Vec<(String, Arc<NodeEntry>)> {
        let mut directory = self.directory.lock();
        directory.synced = true;
        directory.catalog = catalog.clone();
        for name in catalog.nodes().keys() {
            directory
                .nodes
                .entry(name.clone())
                .or_insert_with(|| Arc::new(NodeEntry::new(name)));
        }
        directory
            .nodes
            .retain(|name, e| e.status.lock().streams > 0 || catalog.nodes().contains_key(name));
        directory
            .nodes
            .iter()
            .map(|(name, e)| (name.clone(), e.clone()))
            .collect()
    }

    /// Whether the source has delivered a complete view (before that, nothing is served: a cold
    /// cache must never push an empty rule set).
    pub fn synced(&self) -> bool {
        self.directory.lock().synced
    }

    /// The node's entry, if the hub knows it.
    fn entry(&self, node: &str) -> Option<Arc<NodeEntry>> {
        self.directory.lock().nodes.get(node).cloned()
    }

    /// An agent stream for `node` opened. Returns the node's desired rule set channel and the
    /// stream's number (for what it reports, and `detach`). Plans only this node, and only
    /// when its addresses changed or it has no rule set yet.
    pub fn attach(
        &self,
        node: &str,
        addresses: Vec<IpAddr>,
        agent: AgentBuild,
    ) -> (watch::Receiver<Arc<NodeRuleSet>>, u64) {
        let (entry, stream) = {
            let mut directory = self.directory.lock();
            directory.streams_opened += 1;
            let stream = directory.streams_opened;
            let entry = directory
                .nodes
                .entry(node.to_owned())
                .or_insert_with(|| Arc::new(NodeEntry::new(node)))
                .clone();
            // Counted before the lock is let go, so that a replan keeps the entry.
            let mut status = entry.status.lock();
            status.streams += 1;
            status.agent_version = agent.version;
            status.agent_protocol = agent.protocol;
            status.refused = None;
            status.agent_addresses = addresses.clone();
            drop(status);
            (entry, stream)
        };
        let receiver = entry.desired.subscribe();
        let mut facts = entry.facts.lock();
        let facts_changed = facts.agent_addresses != addresses;
        facts.agent_addresses = addresses;
        // Read under the node's lock: a replan that swapped a newer catalog in plans this
        // node after us, so the last rule set published is the newest catalog's.
        let (catalog, synced) = {
            let directory = self.directory.lock();
            (directory.catalog.clone(), directory.synced)
        };
        // Before the first complete view the catalog is empty: planning from it would hand the
        // agent a rule set without any Service (a cold cache must never push that).
        if synced {
            entry.plan(self, &mut facts, &catalog, facts_changed, None);
        }
        drop(facts);
        self.bump();
        (receiver, stream)
    }

    /// An agent of `node` was refused (`reason`) before its stream opened. Kept on nodes the
    /// hub knows (from Node objects or an agent), so that a peer naming made-up nodes cannot
    /// grow it. Whether the reason is new for the node (an unknown node's always is).
    pub fn refused(&self, node: &str, reason: &str) -> bool {
        let Some(entry) = self.entry(node) else {
            return true;
        };
        let mut status = entry.status.lock();
        if status.refused.as_deref() == Some(reason) {
            return false;
        }
        status.refused = Some(reason.to_owned());
        true
    }

    /// Stream `stream` of `node` closed: what it reported goes with it.
    pub fn detach(&self, node: &str, stream: u64) {
        let mut directory = self.directory.lock();
        let known = directory.catalog.nodes().contains_key(node);
        let Some(entry) = directory.nodes.get(node).cloned() else {
            return;
        };
        let mut status = entry.status.lock();
        status.streams = status.streams.saturating_sub(1);
        if status.dataplane_stream == stream {
            status.dataplane = None;
        }
        if status.retry_stream == stream {
            status.nack_retries = 0;
            status.next_retry = None;
        }
        if status.streams == 0 && !known {
            directory.nodes.remove(node);
        }
        drop(status);
        drop(directory);
        self.bump();
    }

    /// Runs `f` on the status of `node`, if the hub knows it.
    fn with_status(&self, node: &str, f: impl FnOnce(&mut NodeStatus, &NodeEntry)) {
        if let Some(entry) = self.entry(node) {
            f(&mut entry.status.lock(), &entry);
        }
    }

    /// A change was sent (something differs from what the agent has).
    pub fn sent(&self, node: &str) {
        self.with_status(node, |s, _| {
            s.pending_since.get_or_insert_with(Instant::now);
        });
    }

    /// The agent holds `set` (acknowledged it, or is current with it): the changes it
    /// includes are settled for the node.
    pub fn acked(&self, node: &str, set: &Arc<NodeRuleSet>) {
        let settled = self
            .changes
            .lock()
            .acked(node, set.rev, changes::now_unix_ms());
        for completed in &settled.completed {
            self.observe(completed);
        }
        let version = set.system_version.as_str();
        self.with_status(node, |s, e| {
            if settled.latest.is_some() {
                s.last_change = settled.latest;
            }
            s.acked = Some(set.clone());
            s.acked_version = version.to_owned();
            s.nacked = false;
            s.nack_retries = 0;
            s.next_retry = None;
            if e.desired.borrow().system_version == version {
                s.pending_since = None;
            }
        });
        self.bump();
    }

    /// The agent refused `version` (`error` already shortened); stream `stream` sends it again
    /// at `next_retry` unless something changes first.
    pub fn nacked(
        &self,
        node: &str,
        stream: u64,
        version: &str,
        error: String,
        next_retry: Option<Instant>,
    ) {
        self.with_status(node, |s, _| {
            s.last_nack_version = version.to_owned();
            s.last_nack_error = error;
            s.nacked = true;
            s.next_retry = next_retry;
            s.retry_stream = stream;
        });
    }

    /// Stream `stream` sends the refused change again (its `retries`-th retry), or a new one
    /// (`retries` 0: the desired rule set changed, and the backoff starts over).
    pub fn retrying(&self, node: &str, stream: u64, retries: u32) {
        self.with_status(node, |s, _| {
            s.nack_retries = retries;
            s.next_retry = None;
            s.retry_stream = stream;
        });
    }

    /// Stream `stream`'s agent reported on its data plane.
    pub fn dataplane(&self, node: &str, stream: u64, status: DataplaneStatus) {
        self.with_status(node, |s, _| {
            s.dataplane = Some(status);
            s.dataplane_stream = stream;
        });
    }

    /// Every node with its desired version and status (each node's as last published).
    pub fn statuses(&self) -> Vec<(String, Arc<NodeRuleSet>, NodeStatus)> {
        let entries: Vec<(String, Arc<NodeEntry>)> = {
            let directory = self.directory.lock();
            directory
                .nodes
                .iter()
                .map(|(name, e)| (name.clone(), e.clone()))
                .collect()
        };
        entries
            .into_iter()
            .map(|(name, e)| {
                let desired = e.desired.borrow().clone();
                let status = e.status.lock().clone();
                (name, desired, status)
            })
            .collect()
    }

    /// The desired rule set of a node: from its entry, or computed on the spot for a node the
    /// controller has not seen (so operators can ask "what would node X get").
    pub fn rules_for(&self, node: &str) -> Arc<NodeRuleSet> {
        let (entry, catalog) = {
            let directory = self.directory.lock();
            (
                directory.nodes.get(node).cloned(),
                directory.catalog.clone(),
            )
        };
        match entry {
            Some(e) => e.desired.borrow().clone(),
            None => Arc::new(catalog.rules_for(
                &AgentFacts {
                    name: node.to_owned(),
                    ..Default::default()
                },
                1,
            )),
        }
    }

    /// Whether the controller knows `node`: a Node object, or an agent that connected.
    pub fn knows(&self, node: &str) -> bool {
        let directory = self.directory.lock();
        directory.nodes.contains_key(node) || directory.catalog.nodes().contains_key(node)
    }

    /// The facts the hub holds for a node (for explanations).
    pub fn facts(&self, node: &str) -> AgentFacts {
        match self.entry(node) {
            Some(e) => e.facts.lock().clone(),
            None => AgentFacts {
                name: node.to_owned(),
                ..Default::default()
            },
        }
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.directory.lock().catalog.clone()
    }

    pub fn rejections(&self) -> Vec<Rejection> {
        self.catalog().rejections()
    }

    /// Calls `hook` with each node's name before a replan plans it.
    #[cfg(test)]
    fn set_plan_hook(&self, hook: PlanHook) {
        *self.plan_hook.lock() = Some(hook);
    }
}

impl NodeEntry {
    fn new(name: &str) -> Self {
        let (desired, _) = watch::channel(Arc::new(NodeRuleSet::default()));
        NodeEntry {
            desired,
            facts: Mutex::new(AgentFacts {
                name: name.to_owned(),
                ..Default::default()
            }),
            status: Mutex::new(NodeStatus::default()),
        }
    }

    /// Brings this node's rule set up to `catalog`, under the node's lock.
    fn replan(&self, hub: &Hub, catalog: &Catalog, rebuild: bool, change: Option<(&str, u64)>) {
        let mut facts = self.facts.lock();
        self.plan(hub, &mut facts, catalog, rebuild, change);
    }

    /// Plans the node from `facts` (its lock held): incrementally, or rebuilt when the node
    /// itself changed (or has no rule set yet). Subscribers are woken only if its content
    /// changed. A changed rule set's resources are indexed by endpoint address, and added
    /// to input change `change` (node name, revision), before it is published.
    fn plan(
        &self,
        hub: &Hub,
        facts: &mut AgentFacts,
        catalog: &Catalog,
        rebuild: bool,
        change: Option<(&str, u64)>,
    ) {
        let current = self.desired.borrow().clone();
        let next = if rebuild || current.rev == 0 {
            Some(catalog.rules_for(facts, current.rev + 1))
        } else {
            catalog.update(&current, facts)
        };
        if let Some(next) = next {
            let changed = next.system_version != current.system_version;
            if changed {
                index_node(&hub.endpoints, &current, &next);
                if let Some((node, revision)) = change {
                    hub.changes.lock().add(revision, node, next.rev);
                }
            }
            self.desired.send_if_modified(|slot| {
                *slot = Arc::new(next);
                changed
            });
        }
        let desired = self.desired.borrow().system_version.clone();
        let mut status = self.status.lock();
        if desired != status.acked_version && status.streams > 0 {
            status.pending_since.get_or_insert_with(Instant::now);
        } else if desired == status.acked_version {
            status.pending_since = None;
        }
    }
}

/// Indexes what `next` has that `current` had not: the changed names, or (rebuilt) the
/// node's own resources (the shared ones are the catalog's, indexed already).
fn index_node(endpoints: &Mutex<EndpointIndex>, current: &NodeRuleSet, next: &NodeRuleSet) {
    let mut index = endpoints.lock();
    match next.changed_since(current.rev) {
        Some(names) => {
            for r in names.iter().filter_map(|n| next.get(n)) {
                index.add(r);
            }
        }
        None => next.overrides().for_each(|r| index.add(r)),
    }
}

/// The EndpointSlice trigger time of a change: the oldest trigger time among the ports it
/// changed that is new (a port planned again for another reason keeps its slices' old one),
/// so the latency reported is that of the change's oldest endpoint update.
fn new_trigger(previous: &Catalog, catalog: &Catalog) -> Option<i64> {
    catalog
        .changed
        .iter()
        .filter_map(|name| {
            let now = catalog.ports.get(name)?.plan.trigger_ms?;
            let before = previous.ports.get(name).and_then(|p| p.plan.trigger_ms);
            (before != Some(now)).then_some(now)
        })
        .min()
}

/// In NodeCIDR mode, warns about each node that appeared or changed without pod CIDRs:
/// nothing is local there until it has them.
fn warn_without_pod_cidrs(policy: &ClusterPolicy, previous: &Catalog, catalog: &Catalog) {
    for (name, node) in catalog.nodes() {
        if previous.nodes().get(name) == Some(node) {
            continue;
        }
        // No podCIDR at all: a node of a single-stack cluster has one family only.
        if node.pod_cidrs.is_empty()
            && let Some(why) =
                missing_detector(policy, Some(node), &[IpFamily::Ipv4, IpFamily::Ipv6])
        {
            tracing::warn!(node = %name, "{why}");
        }
    }
}

pub mod changes;
pub mod drain;

#[cfg(test)]
mod tests;
