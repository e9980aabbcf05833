//! What kube-proxy's change counters and its no-local-endpoints gauge count, taken from the
//! changes the controller sends and the applied state.
//!
//! kube-proxy counts watch events: one Service change per Service object updated, one
//! endpoint change per EndpointSlice. The agent sees resources (one per Service port and
//! family) instead, so it counts Services: those whose ports changed other than in their
//! endpoints (added and removed ones included), and those whose endpoints changed.

use std::collections::BTreeSet;

use kubenft_proto::v1::{self, resource};

use crate::metrics::ChangeCounts;
use crate::state::AppliedState;
use kubenft_nft::rules::Spec;

/// A Service port's rules split in two: without its endpoints, and its endpoints alone.
fn split(sp: &v1::ServicePortRules) -> (v1::ServicePortRules, v1::ServicePortRules) {
    let mut spec = sp.clone();
    let endpoints = v1::ServicePortRules {
        cluster_endpoints: std::mem::take(&mut spec.cluster_endpoints),
        local_endpoints: std::mem::take(&mut spec.local_endpoints),
        local_ready_endpoints: std::mem::take(&mut spec.local_ready_endpoints),
        serving_ips: std::mem::take(&mut spec.serving_ips),
        endpoints_elsewhere: std::mem::take(&mut spec.endpoints_elsewhere),
        ..Default::default()
    };
    (spec, endpoints)
}

fn service_port(r: &v1::Resource) -> Option<&v1::ServicePortRules> {
    match &r.kind {
        Some(resource::Kind::ServicePort(sp)) => Some(sp),
        _ => None,
    }
}

/// The Service and endpoint changes `change` makes to `state`.
pub fn count(state: &AppliedState, change: &v1::Change) -> ChangeCounts {
    let mut services: BTreeSet<(String, String)> = BTreeSet::new();
    let mut endpoints: BTreeSet<(String, String)> = BTreeSet::new();
    for new in &change.resources {
        let Some(sp) = service_port(new) else {
            continue;
        };
        let key = (sp.namespace.clone(), sp.service.clone());
        let old = state.resource(&new.name);
        let (new_spec, new_eps) = split(sp);
        match old.as_ref().and_then(service_port).map(split) {
            Some((old_spec, old_eps)) => {
                if old_spec != new_spec {
                    services.insert(key.clone());
                }
                if old_eps != new_eps {
                    endpoints.insert(key);
                }
            }
            None => {
                services.insert(key.clone());
                if new_eps != v1::ServicePortRules::default() {
                    endpoints.insert(key);
                }
            }
        }
    }
    for name in &change.removed {
        if let Some(old) = state.resource(name)
            && let Some(sp) = service_port(&old)
        {
            services.insert((sp.namespace.clone(), sp.service.clone()));
        }
    }
    ChangeCounts {
        services: services.len() as u64,
        endpoints: endpoints.len() as u64,
    }
}

/// kube-proxy's `sync_proxy_rules_no_local_endpoints_total`: Service ports with a Local
/// traffic policy whose Service has endpoints, none of them on this node;
/// `[family][0: internal, 1: external]`.
pub fn no_local_endpoints(state: &AppliedState) -> [[u64; 2]; 2] {
    let mut counts = [[0; 2]; 2];
    for applied in state.applied() {
        let Spec::ServicePort(sp) = &applied.spec else {
            continue;
        };
        if !sp.local_endpoints.is_empty() || !sp.has_endpoints() {
            continue;
        }
        let family = &mut counts[sp.family as usize];
        family[0] += u64::from(sp.internal_traffic_local);
        family[1] += u64::from(sp.external_traffic_local);
    }
    counts
}
