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
//! a slow agent gets one merged change, never a backlog.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use kubenft_proto::v1::{DataplaneState, DataplaneStatus, IpFamily, SyncState};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cores;
use crate::model::Rejection;
use crate::plan::{Catalog, ClusterPolicy, DetectLocal, Inputs, NodeFacts, missing_detector};
use crate::view::NodeRuleSet;

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

struct NodeEntry {
    facts: NodeFacts,
    desired: watch::Sender<Arc<NodeRuleSet>>,
    status: NodeStatus,
}

struct State {
    catalog: Arc<Catalog>,
    nodes: BTreeMap<String, NodeEntry>,
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

/// Shared by the source task, every agent stream and the inspection service.
pub struct Hub {
    policy: Arc<ClusterPolicy>,
    state: Mutex<State>,
}

impl Hub {
    pub fn new(policy: ClusterPolicy) -> Self {
        let policy = Arc::new(policy);
        Hub {
            state: Mutex::new(State {
                catalog: Arc::new(Catalog::empty(policy.clone())),
                nodes: BTreeMap::new(),
                synced: false,
                streams_opened: 0,
            }),
            policy,
        }
    }

    /// The cluster-wide settings this hub plans with.
    pub fn policy(&self) -> &ClusterPolicy {
        &self.policy
    }

    /// Replans every node from new inputs: only the ports that changed are recomputed, and
    /// only for the nodes that see them differently from the shared base.
    pub fn set_inputs(&self, inputs: &Inputs) {
        let previous = self.state.lock().catalog.clone();
        let catalog = Arc::new(Catalog::build(self.policy.clone(), inputs, Some(&previous)));
        if self.policy.detect_local == DetectLocal::NodeCidr {
            warn_without_pod_cidrs(&self.policy, &previous, &catalog);
        }
        let mut state = self.state.lock();
        state.synced = true;
        state.catalog = catalog.clone();
        // Nodes known from Node objects, plus nodes with a connected agent.
        for name in catalog.nodes().keys() {
            state
                .nodes
                .entry(name.clone())
                .or_insert_with(|| NodeEntry::new(name));
        }
        state
            .nodes
            .retain(|name, e| e.status.streams > 0 || catalog.nodes().contains_key(name));
        // After a restart every connected agent's rule set is built here, on every core.
        let mut entries: Vec<(&String, &mut NodeEntry)> = state.nodes.iter_mut().collect();
        cores::for_each_mut(&mut entries, |(name, entry)| {
            let node_changed = previous.nodes().get(*name) != catalog.nodes().get(*name);
            entry.replan(&catalog, node_changed);
        });
    }

    /// Whether the source has delivered a complete view (before that, nothing is served: a cold
    /// cache must never push an empty rule set).
    pub fn synced(&self) -> bool {
        self.state.lock().synced
    }

    /// An agent stream for `node` opened. Returns the node's desired rule set channel and the
    /// stream's number (for what it reports, and `detach`).
    pub fn attach(
        &self,
        node: &str,
        addresses: Vec<IpAddr>,
        agent: AgentBuild,
    ) -> (watch::Receiver<Arc<NodeRuleSet>>, u64) {
        let mut state = self.state.lock();
        state.streams_opened += 1;
        let stream = state.streams_opened;
        let catalog = state.catalog.clone();
        let synced = state.synced;
        let entry = state
            .nodes
            .entry(node.to_owned())
            .or_insert_with(|| NodeEntry::new(node));
        entry.status.streams += 1;
        entry.status.agent_version = agent.version;
        entry.status.agent_protocol = agent.protocol;
        entry.status.refused = None;
        entry.status.agent_addresses = addresses.clone();
        let facts_changed = entry.facts.agent_addresses != addresses;
        entry.facts.agent_addresses = addresses;
        // Before the first complete view the catalog is empty: planning from it would hand the
        // agent a rule set without any Service (a cold cache must never push that).
        if synced {
            entry.replan(&catalog, facts_changed);
        }
        (entry.desired.subscribe(), stream)
    }

    /// An agent of `node` was refused (`reason`) before its stream opened. Kept on nodes the
    /// hub knows (from Node objects or an agent), so that a peer naming made-up nodes cannot
    /// grow it. Whether the reason is new for the node (an unknown node's always is).
    pub fn refused(&self, node: &str, reason: &str) -> bool {
        let mut state = self.state.lock();
        let Some(entry) = state.nodes.get_mut(node) else {
            return true;
        };
        if entry.status.refused.as_deref() == Some(reason) {
            return false;
        }
        entry.status.refused = Some(reason.to_owned());
        true
    }

    /// Stream `stream` of `node` closed: what it reported goes with it.
    pub fn detach(&self, node: &str, stream: u64) {
        let mut state = self.state.lock();
        let known = state.catalog.nodes().contains_key(node);
        if let Some(entry) = state.nodes.get_mut(node) {
            entry.status.streams = entry.status.streams.saturating_sub(1);
            if entry.status.dataplane_stream == stream {
                entry.status.dataplane = None;
            }
            if entry.status.retry_stream == stream {
                entry.status.nack_retries = 0;
                entry.status.next_retry = None;
            }
            if entry.status.streams == 0 && !known {
                state.nodes.remove(node);
            }
        }
    }

    /// A change was sent (something differs from what the agent has).
    pub fn sent(&self, node: &str) {
        if let Some(e) = self.state.lock().nodes.get_mut(node) {
            e.status.pending_since.get_or_insert_with(Instant::now);
        }
    }

    /// The agent holds `version`.
    pub fn acked(&self, node: &str, version: &str) {
        if let Some(e) = self.state.lock().nodes.get_mut(node) {
            e.status.acked_version = version.to_owned();
            e.status.nacked = false;
            e.status.nack_retries = 0;
            e.status.next_retry = None;
            if e.desired.borrow().system_version == version {
                e.status.pending_since = None;
            }
        }
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
        if let Some(e) = self.state.lock().nodes.get_mut(node) {
            e.status.last_nack_version = version.to_owned();
            e.status.last_nack_error = error;
            e.status.nacked = true;
            e.status.next_retry = next_retry;
            e.status.retry_stream = stream;
        }
    }

    /// Stream `stream` sends the refused change again (its `retries`-th retry), or a new one
    /// (`retries` 0: the desired rule set changed, and the backoff starts over).
    pub fn retrying(&self, node: &str, stream: u64, retries: u32) {
        if let Some(e) = self.state.lock().nodes.get_mut(node) {
            e.status.nack_retries = retries;
            e.status.next_retry = None;
            e.status.retry_stream = stream;
        }
    }

    /// Stream `stream`'s agent reported on its data plane.
    pub fn dataplane(&self, node: &str, stream: u64, status: DataplaneStatus) {
        if let Some(e) = self.state.lock().nodes.get_mut(node) {
            e.status.dataplane = Some(status);
            e.status.dataplane_stream = stream;
        }
    }

    /// Every node with its desired version and status.
    pub fn statuses(&self) -> Vec<(String, Arc<NodeRuleSet>, NodeStatus)> {
        let state = self.state.lock();
        state
            .nodes
            .iter()
            .map(|(name, e)| (name.clone(), e.desired.borrow().clone(), e.status.clone()))
            .collect()
    }

    /// The desired rule set of a node: from its entry, or computed on the spot for a node the
    /// controller has not seen (so operators can ask "what would node X get").
    pub fn rules_for(&self, node: &str) -> Arc<NodeRuleSet> {
        let state = self.state.lock();
        match state.nodes.get(node) {
            Some(e) => e.desired.borrow().clone(),
            None => Arc::new(state.catalog.rules_for(
                &NodeFacts {
                    name: node.to_owned(),
                    ..Default::default()
                },
                1,
            )),
        }
    }

    /// The facts the hub holds for a node (for explanations).
    pub fn facts(&self, node: &str) -> NodeFacts {
        let state = self.state.lock();
        state
            .nodes
            .get(node)
            .map(|e| e.facts.clone())
            .unwrap_or_else(|| NodeFacts {
                name: node.to_owned(),
                ..Default::default()
            })
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.state.lock().catalog.clone()
    }

    pub fn rejections(&self) -> Vec<Rejection> {
        self.state.lock().catalog.rejections()
    }
}

impl NodeEntry {
    fn new(name: &str) -> Self {
        let (desired, _) = watch::channel(Arc::new(NodeRuleSet::default()));
        NodeEntry {
            facts: NodeFacts {
                name: name.to_owned(),
                ..Default::default()
            },
            desired,
            status: NodeStatus::default(),
        }
    }

    /// Brings this node's rule set up to `catalog`: incrementally, or rebuilt when the node
    /// itself changed (or has no rule set yet). Subscribers are woken only if its content
    /// changed.
    fn replan(&mut self, catalog: &Catalog, rebuild: bool) {
        let current = self.desired.borrow().clone();
        let next = if rebuild || current.rev == 0 {
            Some(catalog.rules_for(&self.facts, current.rev + 1))
        } else {
            catalog.update(&current, &self.facts)
        };
        if let Some(next) = next {
            let changed = next.system_version != current.system_version;
            self.desired.send_if_modified(|slot| {
                *slot = Arc::new(next);
                changed
            });
        }
        let desired = self.desired.borrow().system_version.clone();
        if desired != self.status.acked_version && self.status.streams > 0 {
            self.status.pending_since.get_or_insert_with(Instant::now);
        } else if desired == self.status.acked_version {
            self.status.pending_since = None;
        }
    }
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
