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
struct NoLocalLabels {
    ip_family: IpFamily,
    traffic_policy: &'static str,
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
    sync_full_duration: MetricFamily<FamilyLabels, Histogram>,
    sync_partial_duration: MetricFamily<FamilyLabels, Histogram>,
    sync_failures: MetricFamily<FamilyLabels, Counter>,
    last_sync: MetricFamily<FamilyLabels, Gauge<f64, AtomicU64>>,
    last_queued: MetricFamily<FamilyLabels, Gauge<f64, AtomicU64>>,
    endpoint_changes_pending: Gauge,
    endpoint_changes: Counter,
    service_changes_pending: Gauge,
    service_changes: Counter,
    no_local_endpoints: MetricFamily<NoLocalLabels, Gauge>,
    changes: MetricFamily<ResultLabels, Counter>,
    connected: Gauge,
    conntrack_duration: MetricFamily<FamilyLabels, Histogram>,
    conntrack_deleted: MetricFamily<FamilyLabels, Counter>,
    network_programming: MetricFamily<FamilyLabels, Histogram>,
    healthz: MetricFamily<CodeLabels, Counter>,
    livez: MetricFamily<CodeLabels, Counter>,
    foreign_service_rules: MetricFamily<ForeignLabels, Gauge>,
    connections_refused: MetricFamily<RefusedLabels, Counter>,
}

/// A family of histograms with kube-proxy's sync buckets.
fn sync_histograms() -> MetricFamily<FamilyLabels, Histogram> {
    MetricFamily::new_with_constructor(|| Histogram::new(kubenft_metrics::buckets::sync()))
}

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Metrics {
            registry: Registry::default(),
            drift_detected: Counter::default(),
            repairs: MetricFamily::default(),
            repair_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            dataplane_state: MetricFamily::default(),
            last_converged: Gauge::default(),
            sync_duration: sync_histograms(),
            sync_full_duration: sync_histograms(),
            sync_partial_duration: sync_histograms(),
            sync_failures: MetricFamily::default(),
            last_sync: MetricFamily::default(),
            last_queued: MetricFamily::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            no_local_endpoints: MetricFamily::default(),
            changes: MetricFamily::default(),
            connected: Gauge::default(),
            conntrack_duration: sync_histograms(),
            conntrack_deleted: MetricFamily::default(),
            network_programming: MetricFamily::new_with_constructor(|| {
                Histogram::new(kubenft_metrics::buckets::network_programming())
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

/// The family a transaction's metrics are labelled with: the one it changed, IPv4 when it
/// changed both or neither.
pub fn transaction_family(changed: &[Family]) -> Family {
    match changed {
        [only] => *only,
        _ => Family::V4,
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The repair kinds, listed at 0 from the start.
const REPAIR_KINDS: [kubenft_nft::repair::RepairKind; 6] = {
    use kubenft_nft::repair::RepairKind::*;
    [Element, Set, Chain, Foreign, Stale, Full]
};

/// Service and endpoint changes in one change from the controller, counted as kube-proxy
/// counts them: per Service whose spec changed (added and removed ones included), and per
/// Service whose endpoints changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub services: u64,
    pub endpoints: u64,
}

impl Metrics {
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        // kube-proxy's names, help texts, labels and buckets (pkg/proxy/metrics).
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            self.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            self.sync_full_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            self.sync_partial_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_nftables_sync_failures",
            "Cumulative proxy nftables sync failures",
            self.sync_failures.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            self.last_sync.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            self.last_queued.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            self.endpoint_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            self.service_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            self.service_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            self.no_local_endpoints.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            self.conntrack_duration.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            self.conntrack_deleted.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            self.network_programming.clone(),
        );
        r.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            self.healthz.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            self.livez.clone(),
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
        kubenft_metrics::register_standard(r);
        // Series that alerts take `increase()` of exist from the start, at 0.
        for f in Family::ALL {
            let labels = FamilyLabels {
                ip_family: ip_family(f),
            };
            self.sync_failures.get_or_create(&labels).inc_by(0);
            self.conntrack_deleted.get_or_create(&labels).inc_by(0);
        }
        self.no_local_endpoints(&[[0; 2]; 2]);
        for kind in REPAIR_KINDS {
            self.repairs
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .inc_by(0);
        }
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

    /// One conntrack reconcile of `family`: how long it took and how many flows it deleted.
    pub fn conntrack_reconciled(&self, family: Family, seconds: f64, deleted: u64) {
        let labels = FamilyLabels {
            ip_family: ip_family(family),
        };
        self.conntrack_duration
            .get_or_create(&labels)
            .observe(seconds);
        self.conntrack_deleted
            .get_or_create(&labels)
            .inc_by(deleted);
    }

    /// One committed transaction, full (a reconcile of the whole tables) or partial: one
    /// observation, whatever it touched. kube-proxy runs a proxier per family, each with its
    /// own transactions; one kubenft transaction covers both tables, so it is one sync,
    /// labelled with the family it changed, IPv4 when it changed both (or neither). Both
    /// families' rules are in force after it: both last-sync timestamps are set.
    pub fn synced(&self, changed: &[Family], full: bool, seconds: f64) {
        let labels = FamilyLabels {
            ip_family: ip_family(transaction_family(changed)),
        };
        self.sync_duration.get_or_create(&labels).observe(seconds);
        let by_kind = if full {
            &self.sync_full_duration
        } else {
            &self.sync_partial_duration
        };
        by_kind.get_or_create(&labels).observe(seconds);
        self.in_sync();
    }

    /// The rules are current (a commit, or the controller confirming that nothing differs).
    pub fn in_sync(&self) {
        let now = unix_now();
        for f in Family::ALL {
            self.last_sync
                .get_or_create(&FamilyLabels {
                    ip_family: ip_family(f),
                })
                .set(now);
        }
    }

    /// A change arrived from the controller: a sync is queued (for both tables: one
    /// transaction covers both).
    pub fn queued(&self) {
        let now = unix_now();
        for f in Family::ALL {
            self.last_queued
                .get_or_create(&FamilyLabels {
                    ip_family: ip_family(f),
                })
                .set(now);
        }
    }

    /// The Service and endpoint changes of the change being applied.
    pub fn changes_pending(&self, counts: ChangeCounts) {
        self.service_changes_pending
            .set(saturating_i64(counts.services));
        self.endpoint_changes_pending
            .set(saturating_i64(counts.endpoints));
    }

    /// The change being applied is committed: its changes are no longer pending.
    pub fn changes_applied(&self, counts: ChangeCounts) {
        self.service_changes.inc_by(counts.services);
        self.endpoint_changes.inc_by(counts.endpoints);
        self.changes_pending(ChangeCounts::default());
    }

    /// Service ports with a Local policy, endpoints elsewhere and none on this node:
    /// `counts[family][policy]`, policy 0 internal, 1 external.
    pub fn no_local_endpoints(&self, counts: &[[u64; 2]; 2]) {
        for f in Family::ALL {
            for (policy, name) in [(0, "internal"), (1, "external")] {
                self.no_local_endpoints
                    .get_or_create(&NoLocalLabels {
                        ip_family: ip_family(f),
                        traffic_policy: name,
                    })
                    .set(saturating_i64(counts[f as usize][policy]));
            }
        }
    }

    /// Moves `kubeproxy_sync_proxy_rules_no_local_endpoints_total` by what a change did.
    pub fn no_local_endpoints_moved(&self, delta: &[[i64; 2]; 2]) {
        for f in Family::ALL {
            for (policy, name) in [(0, "internal"), (1, "external")] {
                self.no_local_endpoints
                    .get_or_create(&NoLocalLabels {
                        ip_family: ip_family(f),
                        traffic_policy: name,
                    })
                    .inc_by(delta[f as usize][policy]);
            }
        }
    }

    /// A transaction nft refused.
    pub fn sync_failed(&self, family: Family) {
        self.sync_failures
            .get_or_create(&FamilyLabels {
                ip_family: ip_family(family),
            })
            .inc();
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

    fn scrape(m: &Metrics) -> kubenft_metrics::exposition::Exposition {
        kubenft_metrics::exposition::parse(&m.encode()).unwrap()
    }

    #[test]
    fn exposes_kube_proxy_names() {
        let m = Metrics::default();
        m.synced(&[Family::V4], false, 0.01);
        m.sync_failed(Family::V6);
        m.change(ChangeResult::ack);
        m.set_connected(true);
        m.foreign_service_rules("kube-proxy-nftables", "ip kube-proxy", true);
        m.foreign_service_rules("foreign-dnat", "ip other", true);
        m.foreign_service_rules("foreign-dnat", "ip other", false);
        let text = m.encode();
        assert!(!text.contains("ip other"), "{text}");
        for needle in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.016\",ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"} 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"} ",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 0",
            "kubenft_agent_changes_total{result=\"ack\"} 1",
            "kubenft_agent_controller_connected 1",
            "kubenft_agent_foreign_service_rules{source=\"kube-proxy-nftables\",table=\"ip kube-proxy\"} 1",
            "kubernetes_build_info{major=\"0\",minor=\"1\",git_version=\"v0.1.0\",",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        // A partial sync only: no full one observed.
        let e = scrape(&m);
        assert!(
            e.get("kubeproxy_sync_full_proxy_rules_duration_seconds")
                .is_none_or(|f| f.samples.is_empty())
        );
    }

    /// One transaction is one observation, whichever families it changed.
    #[test]
    fn a_dual_stack_transaction_is_one_sync() {
        let m = Metrics::default();
        m.synced(&[Family::V4, Family::V6], true, 0.2);
        m.synced(&[Family::V6], false, 0.002);
        let e = scrape(&m);
        let count = |name: &str, family: &str| {
            e.get(name)
                .unwrap()
                .sum(&format!("{name}_count"), &[("ip_family", family)])
        };
        let all = "kubeproxy_sync_proxy_rules_duration_seconds";
        let full = "kubeproxy_sync_full_proxy_rules_duration_seconds";
        let partial = "kubeproxy_sync_partial_proxy_rules_duration_seconds";
        assert_eq!((count(all, "IPv4"), count(all, "IPv6")), (1.0, 1.0));
        assert_eq!((count(full, "IPv4"), count(full, "IPv6")), (1.0, 0.0));
        assert_eq!((count(partial, "IPv4"), count(partial, "IPv6")), (0.0, 1.0));
    }
}
