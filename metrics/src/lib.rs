//! What the controller's and the agent's `/metrics` share, so that dashboards and alerts made
//! for Kubernetes components work on both: `kubernetes_build_info` and the standard
//! `process_*` metrics (as client_golang's process collector names them), kube-proxy's
//! histogram buckets, and a reader of the text exposition that the tests check both
//! endpoints with.

pub mod buckets;
pub mod build_info;
pub mod exposition;
pub mod process;

use prometheus_client::registry::Registry;

/// Registers `kubernetes_build_info` and the `process_*` metrics, unprefixed, in `registry`
/// (which must be a root registry: a prefix would rename them).
pub fn register_standard(registry: &mut Registry) {
    build_info::register(registry);
    registry.register_collector(Box::new(process::ProcessCollector));
}
