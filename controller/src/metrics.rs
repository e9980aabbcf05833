//! Controller metrics (Prometheus text on `/metrics`).
//!
//! Counters are updated where things happen; per-node lag and the number of nodes in each
//! state are computed from the hub at scrape time (a stored gauge would be stale for a node
//! whose agent stopped answering).

use std::sync::atomic::AtomicU64;

use kubenft_proto::v1::SyncState;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceEventLabels {
    /// `Service`, `EndpointSlice` or `Node`.
    pub kind: &'static str,
    /// The watcher event: `init`, `init_apply`, `init_done`, `apply`, `delete`, `error`.
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// A `SyncState` as `ListNodes` shows it, in lower case: `synced`, `repairing`, …
    pub state: String,
}

/// The states a node can be in (every one is listed by `kubenft_controller_nodes`).
const SYNC_STATES: [SyncState; 6] = [
    SyncState::NotConnected,
    SyncState::Synced,
    SyncState::Pending,
    SyncState::Nacked,
    SyncState::Repairing,
    SyncState::Diverged,
];

pub struct Metrics {
    registry: Registry,
    /// Watcher events by kind and event type (`--source kube`).
    pub source_events: Family<SourceEventLabels, Counter>,
    /// Watcher errors by kind (each is retried with backoff or answered by a relist).
    pub source_errors: Family<KindLabels, Counter>,
    /// Seconds each node's acknowledged rule set has been behind the desired one.
    pub node_lag: Family<NodeLabels, Gauge<f64, AtomicU64>>,
    /// Nodes in each sync state (every state listed, 0 included).
    pub nodes: Family<StateLabels, Gauge>,
    pub agents_connected: Gauge,
    pub changes_sent: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    /// Refused changes sent again after their backoff.
    pub nack_retries: Counter,
    /// Streams closed because a change was neither acknowledged nor refused within its
    /// deadline (the agent reconnects and resumes; a slot for large changes is released).
    pub ack_timeouts: Counter,
    /// HTTP connections refused or closed by the port's bounds, by reason
    /// (`connection_limit`, `header_timeout`, `headers_too_large`, `bad_request`).
    pub http_refused: Family<ReasonLabels, Counter>,
    pub source_updates: Counter,
    pub rejected_objects: Gauge,
    /// Seconds from sending a change to its acknowledgement.
    pub push_duration: Histogram,
    /// Per node: the encoded size of each change with a payload sent to its agent.
    pub node_push_bytes: Family<NodeLabels, Histogram>,
    /// Per node: changes its agent refused.
    pub node_nacks: Family<NodeLabels, Counter>,
    /// Per node: seconds from a rule set version being ready (published, as this stream saw
    /// it) to the agent acknowledging it.
    pub node_ack_lag: Family<NodeLabels, Histogram>,
    /// Seconds from an input change's EndpointSlice trigger time to the last acknowledgement
    /// by a node whose rule set it changed (kube-proxy's buckets); the hub observes it.
    pub network_programming: Histogram,
    /// The nodes that have per-node series: those gone from the hub lose them at the next
    /// scrape.
    labelled_nodes: parking_lot::Mutex<std::collections::BTreeSet<String>>,
    /// Whether the source can currently be read (`/readyz` says why not).
    pub source_health: SourceHealth,
    /// Connections and streams refused before any rule was sent, by reason (a failed TLS
    /// handshake: `no_certificate`, `unknown_ca`, `expired`, `not_tls`, ...; a certificate
    /// naming another node: `wrong_node`; `connection_limit`: closed at once, the port had its
    /// maximum of connections open; `handshake_timeout`: nothing or no handshake in time;
    /// `invalid_argument`: a message with a field out of bounds; `protocol_version`: an agent
    /// whose rule-stream protocol this controller does not speak).
    pub stream_refused: Family<ReasonLabels, Counter>,
    /// Agents' certificate signing requests the signer decided, by `result` (`issued`,
    /// `denied`, `failed`: an API error; retried at the next watch event).
    pub certificate_requests: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Whether the source is currently failing (a directory or file that cannot be read, an API
/// server that keeps answering errors), and why. The source keeps its last good view
/// meanwhile; this only makes the failure visible: a log line when the state changes, the
/// `source_healthy` and `source_failures` gauges, and `/readyz`.
pub struct SourceHealth {
    healthy: Gauge,
    failures: Gauge,
    problem: parking_lot::Mutex<Option<String>>,
}

impl SourceHealth {
    /// Reports the source's current failures (none: healthy). Logs only when the state
    /// changes, so a source that retries every few seconds does not log every time.
    pub fn report(&self, failures: &[String]) {
        let problem = match failures {
            [] => None,
            [one] => Some(one.clone()),
            [first, ..] => Some(format!(
                "{first} (and {} more failures)",
                failures.len() - 1
            )),
        }
        .map(|p| kubenft_plan::model::one_line(&p).into_owned());
        self.healthy.set(i64::from(problem.is_none()));
        self.failures
            .set(i64::try_from(failures.len()).unwrap_or(i64::MAX));
        let mut current = self.problem.lock();
        if *current == problem {
            return;
        }
        match &problem {
            Some(p) => tracing::warn!(
                problem = %p,
                failures = failures.len(),
                "source failing; keeping the last good view"
            ),
            None => tracing::info!("source healthy again"),
        }
        *current = problem;
    }

    /// Why the source is failing, if it is.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().clone()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("kubenft_controller");
        let agents_connected = Gauge::default();
        let changes_sent = Counter::default();
        let acks = Counter::default();
        let nacks = Counter::default();
        let nack_retries = Counter::default();
        let ack_timeouts = Counter::default();
        let http_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "ack_timeouts",
            "Agent streams closed because a change was neither acknowledged nor refused within its deadline",
            ack_timeouts.clone(),
        );
        registry.register(
            "http_connections_refused",
            "HTTP connections refused or closed by the port's bounds, by reason: the port had its maximum open (connection_limit), no request within the header timeout, headers too large, a request that does not parse",
            http_refused.clone(),
        );
        let source_updates = Counter::default();
        let rejected_objects = Gauge::default();
        let push_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let source_health = SourceHealth {
            healthy: Gauge::default(),
            failures: Gauge::default(),
            problem: parking_lot::Mutex::new(None),
        };
        source_health.healthy.set(1);
        registry.register(
            "source_healthy",
            "1 when the source (directory or API server) can be read; 0 while it fails and the last good view is kept",
            source_health.healthy.clone(),
        );
        registry.register(
            "source_failures",
            "Current source failures (the directory, each file that cannot be read, each kind whose watch keeps failing)",
            source_health.failures.clone(),
        );
        registry.register(
            "agents_connected",
            "Open agent streams",
            agents_connected.clone(),
        );
        registry.register(
            "changes_sent",
            "Changes with a payload sent to agents",
            changes_sent.clone(),
        );
        registry.register("acks", "Changes acknowledged by agents", acks.clone());
        registry.register("nacks", "Changes refused by agents", nacks.clone());
        registry.register(
            "nack_retries",
            "Refused changes sent again after a backoff",
            nack_retries.clone(),
        );
        registry.register(
            "source_updates",
            "Views of the cluster read from the source",
            source_updates.clone(),
        );
        registry.register(
            "rejected_objects",
            "Objects or fields currently refused",
            rejected_objects.clone(),
        );
        registry.register(
            "push_duration_seconds",
            "Time from sending a change to an agent to its acknowledgement",
            push_duration.clone(),
        );
        let source_events = Family::<SourceEventLabels, Counter>::default();
        let source_errors = Family::<KindLabels, Counter>::default();
        let node_lag = Family::<NodeLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "source_events",
            "Kubernetes watcher events by kind and event",
            source_events.clone(),
        );
        registry.register(
            "source_errors",
            "Kubernetes watcher errors by kind (retried with backoff, or relisted on 410 Gone)",
            source_errors.clone(),
        );
        let stream_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "stream_refused",
            "Connections refused at accept (connection limit) or during the handshake, and streams refused because the client certificate names another node, a message is out of bounds or the agent's protocol is not spoken here, by reason; nothing is sent to them",
            stream_refused.clone(),
        );
        let certificate_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "certificate_requests",
            "Agents' certificate signing requests decided by the signer (--signer-ca-secret), by result: issued, denied (the reason is in the request's Denied condition), failed (an API error, retried)",
            certificate_requests.clone(),
        );
        let node_push_bytes = Family::<NodeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(256.0, 4.0, 10))
        });
        registry.register(
            "node_push_bytes",
            "Encoded size of each change with a payload sent to a node's agent, by node",
            node_push_bytes.clone(),
        );
        let node_nacks = Family::<NodeLabels, Counter>::default();
        registry.register(
            "node_nacks",
            "Changes refused by a node's agent, by node",
            node_nacks.clone(),
        );
        let node_ack_lag = Family::<NodeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 20))
        });
        registry.register(
            "node_ack_lag_seconds",
            "Seconds from a node's rule set version being ready to its agent acknowledging it, by node",
            node_ack_lag.clone(),
        );
        let nodes = Family::<StateLabels, Gauge>::default();
        registry.register(
            "nodes",
            "Nodes by sync state, as ListNodes shows them (repairing, diverged: the agent reports its data plane is not as applied)",
            nodes.clone(),
        );
        registry.register(
            "node_lag_seconds",
            "Seconds since a node's desired rule set first differed from what its agent acknowledged (0 when in sync)",
            node_lag.clone(),
        );
        let network_programming = Histogram::new(kubenft_metrics::buckets::network_programming());
        registry.register(
            "network_programming_duration_seconds",
            "Cluster-wide network programming latency: seconds from an input change's EndpointSlice trigger time (endpoints.kubernetes.io/last-change-trigger-time) to the acknowledgement of the last node whose rule set it changed (ListChanges lists each change)",
            network_programming.clone(),
        );
        kubenft_metrics::register_standard(&mut root);
        Metrics {
            registry: root,
            node_push_bytes,
            node_nacks,
            node_ack_lag,
            network_programming,
            labelled_nodes: parking_lot::Mutex::new(std::collections::BTreeSet::new()),
            source_events,
            source_errors,
            node_lag,
            nodes,
            agents_connected,
            changes_sent,
            acks,
            nacks,
            nack_retries,
            ack_timeouts,
            http_refused,
            source_updates,
            rejected_objects,
            push_duration,
            source_health,
            stream_refused,
            certificate_requests,
        }
    }

    pub fn certificate_request(&self, result: &'static str) {
        self.certificate_requests
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.stream_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn source_event(&self, kind: &'static str, event: &'static str) {
        self.source_events
            .get_or_create(&SourceEventLabels { kind, event })
            .inc();
    }

    pub fn source_error(&self, kind: &'static str) {
        self.source_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Replaces the per-node lag gauges (called at scrape time with every node the hub
    /// knows, so removed nodes disappear, from the per-node histograms too).
    pub fn set_node_lags(&self, lags: impl IntoIterator<Item = (String, f64)>) {
        self.node_lag.clear();
        let mut known = std::collections::BTreeSet::new();
        for (node, seconds) in lags {
            known.insert(node.clone());
            self.node_lag
                .get_or_create(&NodeLabels { node })
                .set(seconds);
        }
        let mut labelled = self.labelled_nodes.lock();
        for node in labelled.difference(&known) {
            let labels = NodeLabels { node: node.clone() };
            self.node_push_bytes.remove(&labels);
            self.node_nacks.remove(&labels);
            self.node_ack_lag.remove(&labels);
        }
        labelled.retain(|n| known.contains(n));
    }

    /// Notes that `node` has per-node series (removed when the hub no longer knows it).
    fn labelled(&self, node: &str) -> NodeLabels {
        let mut labelled = self.labelled_nodes.lock();
        if !labelled.contains(node) {
            labelled.insert(node.to_owned());
        }
        NodeLabels {
            node: node.to_owned(),
        }
    }

    /// `node`'s agent connected: its NACK counter exists from then on, at 0 (alerts take its
    /// `increase()`).
    pub fn node_connected(&self, node: &str) {
        self.node_nacks
            .get_or_create(&self.labelled(node))
            .inc_by(0);
    }

    /// A change of `bytes` (encoded) with a payload was sent to `node`'s agent.
    pub fn pushed(&self, node: &str, bytes: usize) {
        self.node_push_bytes
            .get_or_create(&self.labelled(node))
            .observe(bytes as f64);
    }

    /// `node`'s agent refused a change.
    pub fn node_nacked(&self, node: &str) {
        self.nacks.inc();
        self.node_nacks.get_or_create(&self.labelled(node)).inc();
    }

    /// `node`'s agent acknowledged a version `seconds` after it was ready.
    pub fn node_acked(&self, node: &str, seconds: f64) {
        self.node_ack_lag
            .get_or_create(&self.labelled(node))
            .observe(seconds);
    }

    /// Replaces the per-state node counts (called at scrape time); every state is listed.
    pub fn set_node_states(&self, states: impl IntoIterator<Item = SyncState>) {
        let mut counts = [0i64; SYNC_STATES.len()];
        for state in states {
            if let Some(i) = SYNC_STATES.iter().position(|s| *s == state) {
                counts[i] += 1;
            }
        }
        for (state, count) in SYNC_STATES.iter().zip(counts) {
            self.nodes
                .get_or_create(&StateLabels {
                    state: state.as_str_name().to_ascii_lowercase(),
                })
                .set(count);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
