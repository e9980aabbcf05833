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
/// `[family][0: internal, 1: external]`. O(table): for a starting state; a change moves it
/// by [`no_local_change`].
pub fn no_local_endpoints(state: &AppliedState) -> [[u64; 2]; 2] {
    let mut counts = [[0; 2]; 2];
    for (family, share) in state.applied().filter_map(|a| no_local_share(&a.spec)) {
        counts[family][0] += share[0].unsigned_abs();
        counts[family][1] += share[1].unsigned_abs();
    }
    counts
}

/// How a change moves [`no_local_endpoints`]: what its resources count after it, less what
/// they counted before. O(change), so the count costs nothing per change at any table size.
pub fn no_local_change<'a>(
    before: impl IntoIterator<Item = &'a Spec>,
    after: impl IntoIterator<Item = &'a Spec>,
) -> [[i64; 2]; 2] {
    let mut delta = [[0; 2]; 2];
    let shares =
        |specs: &mut dyn Iterator<Item = &'a Spec>, sign: i64, delta: &mut [[i64; 2]; 2]| {
            for (family, share) in specs.filter_map(no_local_share) {
                delta[family][0] += sign * share[0];
                delta[family][1] += sign * share[1];
            }
        };
    shares(&mut before.into_iter(), -1, &mut delta);
    shares(&mut after.into_iter(), 1, &mut delta);
    delta
}

/// One resource's share of [`no_local_endpoints`]: its family, and 1 or 0 per policy.
fn no_local_share(spec: &Spec) -> Option<(usize, [i64; 2])> {
    let Spec::ServicePort(sp) = spec else {
        return None;
    };
    if !sp.local_endpoints.is_empty() || !sp.has_endpoints() {
        return None;
    }
    Some((
        sp.family as usize,
        [
            i64::from(sp.internal_traffic_local),
            i64::from(sp.external_traffic_local),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use kubenft_nft::TableName;
    use kubenft_proto::v1::{self, resource};

    use super::*;

    /// An IPv4 port with externalTrafficPolicy Local and one endpoint, on this node or not.
    fn port(name: &str, ip: &str, local: bool) -> v1::Resource {
        let ep = v1::Endpoint {
            ip: "10.1.0.2".into(),
            port: 8080,
            local,
            ready: true,
        };
        v1::Resource::versioned(
            name.into(),
            resource::Kind::ServicePort(v1::ServicePortRules {
                namespace: "ns".into(),
                service: name.into(),
                port_name: "http".into(),
                protocol: v1::Protocol::Tcp as i32,
                family: v1::IpFamily::Ipv4 as i32,
                port: 80,
                cluster_ip: ip.into(),
                node_port: 30080,
                external_traffic_local: true,
                local_endpoints: if local { vec![ep.clone()] } else { vec![] },
                local_ready_endpoints: u32::from(local),
                serving_ips: vec![ep.ip.clone()],
                cluster_endpoints: vec![ep],
                health_check_node_port: 32000,
                ..Default::default()
            }),
        )
    }

    fn apply(state: &mut AppliedState, change: &v1::Change) -> [[i64; 2]; 2] {
        let touched: Vec<&str> = change
            .resources
            .iter()
            .map(|r| r.name.as_str())
            .chain(change.removed.iter().map(String::as_str))
            .collect();
        let before: Vec<Spec> = touched
            .iter()
            .filter_map(|n| state.spec(n).cloned())
            .collect();
        let diff = kubenft_nft::diff::diff(state, change, &TableName::default()).unwrap();
        state.commit(diff, SystemTime::UNIX_EPOCH);
        no_local_change(&before, touched.iter().filter_map(|n| state.spec(n)))
    }

    #[test]
    fn changes_move_the_no_local_count_as_a_recount_would() {
        let mut state = AppliedState::unknown(0);
        let mut count = [[0i64; 2]; 2];
        let changes = [
            v1::Change {
                resources: vec![port("a", "10.96.0.1", false), port("b", "10.96.0.2", true)],
                ..Default::default()
            },
            // b's endpoint leaves this node, a's comes to it.
            v1::Change {
                resources: vec![port("a", "10.96.0.1", true), port("b", "10.96.0.2", false)],
                ..Default::default()
            },
            v1::Change {
                resources: vec![port("c", "10.96.0.3", false)],
                removed: vec!["b".into()],
                ..Default::default()
            },
        ];
        for (i, change) in changes.iter().enumerate() {
            let delta = apply(&mut state, change);
            for f in 0..2 {
                for p in 0..2 {
                    count[f][p] += delta[f][p];
                }
            }
            let recount = no_local_endpoints(&state).map(|f| f.map(|n| n as i64));
            assert_eq!(count, recount, "after change {i}");
        }
        assert_eq!(count[0], [0, 1], "c alone has no local endpoint");
    }
}
