//! Controller metrics (Prometheus text on `/metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    pub agents_connected: Gauge,
    pub changes_sent: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub source_updates: Counter,
    pub rejected_objects: Gauge,
    /// Seconds from sending a change to its acknowledgement.
    pub push_duration: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kubenft_controller");
        let agents_connected = Gauge::default();
        let changes_sent = Counter::default();
        let acks = Counter::default();
        let nacks = Counter::default();
        let source_updates = Counter::default();
        let rejected_objects = Gauge::default();
        let push_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
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
        Metrics {
            registry,
            agents_connected,
            changes_sent,
            acks,
            nacks,
            source_updates,
            rejected_objects,
            push_duration,
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
