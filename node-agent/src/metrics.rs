//! Prometheus metrics, named as kube-proxy names them so existing dashboards keep working.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use kubenft_nft::rules::Family;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
enum IpFamily {
    IPv4,
    IPv6,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    ip_family: IpFamily,
}

/// How a change ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ChangeResult {
    ack,
    nack,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: ChangeResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ForeignLabels {
    source: &'static str,
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    port: &'static str,
    reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    drift_detected: Counter,
    repairs: MetricFamily<KindLabels, Counter>,
    repair_duration: Histogram,
    dataplane_state: MetricFamily<StateLabels, Gauge>,
    last_converged: Gauge<f64, AtomicU64>,
    sync_duration: MetricFamily<FamilyLabels, Histogram>,
    sync_failures: Counter,
    last_sync: Gauge<f64, AtomicU64>,
    changes: MetricFamily<ResultLabels, Counter>,
    connected: Gauge,
    conntrack_deleted: Counter,
    network_programming: MetricFamily<FamilyLabels, Histogram>,
    healthz: MetricFamily<CodeLabels, Counter>,
    livez: MetricFamily<CodeLabels, Counter>,
    foreign_service_rules: MetricFamily<ForeignLabels, Gauge>,
    connections_refused: MetricFamily<RefusedLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let sync_duration = MetricFamily::<FamilyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        let metrics = Metrics {
            registry: Registry::default(),
            drift_detected: Counter::default(),
            repairs: MetricFamily::default(),
            repair_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            dataplane_state: MetricFamily::default(),
            last_converged: Gauge::default(),
            sync_duration,
            sync_failures: Counter::default(),
            last_sync: Gauge::default(),
            changes: MetricFamily::default(),
            connected: Gauge::default(),
            conntrack_deleted: Counter::default(),
            // kube-proxy's buckets reach minutes; ours start at a millisecond.
            network_programming: MetricFamily::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 20))
            }),
            healthz: MetricFamily::default(),
            livez: MetricFamily::default(),
            foreign_service_rules: MetricFamily::default(),
            connections_refused: MetricFamily::default(),
        };
        metrics.register()
    }
}

fn ip_family(f: Family) -> IpFamily {
    match f {
        Family::V4 => IpFamily::IPv4,
        Family::V6 => IpFamily::IPv6,
    }
}

impl Metrics {
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time taken to apply one change to nftables",
            self.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures",
            "nft transactions that were refused",
            self.sync_failures.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last committed transaction",
            self.last_sync.clone(),
        );
        r.register(
            "kubenft_agent_changes",
            "Changes received from the controller, by outcome",
            self.changes.clone(),
        );
        r.register(
            "kubenft_agent_controller_connected",
            "1 while a controller stream is open",
            self.connected.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Stale UDP conntrack entries deleted",
            self.conntrack_deleted.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time) to the rules being applied",
            self.network_programming.clone(),
        );
        r.register(
            "kubeproxy_proxy_healthz",
            "/healthz answers by HTTP code",
            self.healthz.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "/livez answers by HTTP code",
            self.livez.clone(),
        );
        r.register(
            "kubenft_agent_drift_detected",
            "Commits by other programs that changed the agent's tables (or notifications lost)",
            self.drift_detected.clone(),
        );
        r.register(
            "kubenft_agent_repairs",
            "Repairs of the agent's tables, by kind (element, set, chain, foreign, full)",
            self.repairs.clone(),
        );
        r.register(
            "kubenft_agent_repair_duration_seconds",
            "Time to repair the agent's tables once drift was seen",
            self.repair_duration.clone(),
        );
        r.register(
            "kubenft_agent_dataplane_state",
            "1 for the data plane's current state (converged, repairing, diverged)",
            self.dataplane_state.clone(),
        );
        r.register(
            "kubenft_agent_dataplane_last_converged_timestamp_seconds",
            "Unix time the kernel was last known to hold exactly the applied state",
            self.last_converged.clone(),
        );
        r.register(
            "kubenft_agent_foreign_service_rules",
            "1 for each table holding another program's Service rules (kube-proxy's, or DNAT before ours), by source",
            self.foreign_service_rules.clone(),
        );
        r.register(
            "kubenft_agent_connections_refused",
            "Connections refused on the agent's ports (grpc, healthz, metrics), by reason: the port had its maximum open (connection_limit), a failed or timed-out TLS handshake, no request within the header timeout, a request that does not parse",
            self.connections_refused.clone(),
        );
        self
    }

    /// Another program's Service rules in `table` appeared (or are gone: the series goes).
    pub fn foreign_service_rules(&self, source: &'static str, table: &str, present: bool) {
        let labels = ForeignLabels {
            source,
            table: table.to_owned(),
        };
        if present {
            self.foreign_service_rules.get_or_create(&labels).set(1);
        } else {
            self.foreign_service_rules.remove(&labels);
        }
    }

    /// A connection refused on `port` (`grpc`, `healthz`, `metrics`) for `reason`.
    pub fn connection_refused(&self, port: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { port, reason })
            .inc();
    }

    pub fn drift_detected(&self, commits: u64) {
        self.drift_detected.inc_by(commits);
    }

    pub fn repaired(
        &self,
        kinds: &std::collections::BTreeSet<kubenft_nft::repair::RepairKind>,
        seconds: f64,
    ) {
        for kind in kinds {
            self.repairs
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .inc();
        }
        self.repair_duration.observe(seconds);
    }

    /// The data plane's state, and when it last converged.
    pub fn dataplane(
        &self,
        state: crate::drift::State,
        converged_at: Option<std::time::SystemTime>,
    ) {
        use crate::drift::State;
        for (s, name) in [
            (State::Converged, "converged"),
            (State::Repairing, "repairing"),
            (State::Diverged, "diverged"),
        ] {
            self.dataplane_state
                .get_or_create(&StateLabels { state: name })
                .set(i64::from(s == state));
        }
        if let Some(t) = converged_at {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            self.last_converged.set(secs);
        }
    }

    /// Time from an EndpointSlice change to its rules being in force.
    pub fn network_programmed(&self, family: Family, seconds: f64) {
        self.network_programming
            .get_or_create(&FamilyLabels {
                ip_family: ip_family(family),
            })
            .observe(seconds);
    }

    pub fn healthz(&self, code: u16) {
        self.healthz.get_or_create(&CodeLabels { code }).inc();
    }

    pub fn livez(&self, code: u16) {
        self.livez.get_or_create(&CodeLabels { code }).inc();
    }

    pub fn conntrack_deleted(&self, entries: u64) {
        self.conntrack_deleted.inc_by(entries);
    }

    /// A committed transaction touching `families`.
    pub fn synced(&self, families: &[Family], seconds: f64) {
        for f in families {
            let ip_family = ip_family(*f);
            self.sync_duration
                .get_or_create(&FamilyLabels { ip_family })
                .observe(seconds);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
    }

    pub fn sync_failed(&self) {
        self.sync_failures.inc();
    }

    pub fn change(&self, result: ChangeResult) {
        self.changes.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_kube_proxy_names() {
        let m = Metrics::default();
        m.synced(&[Family::V4], 0.01);
        m.sync_failed();
        m.change(ChangeResult::ack);
        m.set_connected(true);
        m.foreign_service_rules("kube-proxy-nftables", "ip kube-proxy", true);
        m.foreign_service_rules("foreign-dnat", "ip other", true);
        m.foreign_service_rules("foreign-dnat", "ip other", false);
        let text = m.encode();
        assert!(!text.contains("ip other"), "{text}");
        for needle in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=",
            "ip_family=\"IPv4\"",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds ",
            "kubenft_agent_changes_total{result=\"ack\"} 1",
            "kubenft_agent_controller_connected 1",
            "kubenft_agent_foreign_service_rules{source=\"kube-proxy-nftables\",table=\"ip kube-proxy\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
