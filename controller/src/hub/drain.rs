//! The drain gate: which nodes may still send new connections to an endpoint address.
//!
//! A node "has" an address when the rule set its agent last acknowledged lists it as an
//! endpoint a new connection may be DNATed to (a cluster or local endpoint of a Service port:
//! ready, or serving-terminating used as fallback). Answering that by scanning every resource
//! of every node would cost nodes × resources per question; instead every published resource
//! that has endpoints is indexed by address once (shared resources once for all nodes), and a
//! node is checked by looking up the few resources that ever listed the address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Weak};

use kubenft_plan::view::NodeRuleSet;
use kubenft_proto::v1::{DrainState, Resource, ServicePortRules, resource};

use super::Hub;

/// Every resource published to some node that lists an address as a DNAT endpoint, by
/// address. Held weakly: a resource no rule set holds any more (neither desired nor
/// acknowledged) cannot be what an agent enforces, and is pruned.
#[derive(Debug, Default)]
pub struct EndpointIndex {
    by_ip: HashMap<IpAddr, Vec<Weak<Resource>>>,
    /// The resources indexed, by address of their allocation (which our `Weak` keeps from
    /// being reused), so that a resource shared by every node is indexed once.
    seen: HashMap<usize, Weak<Resource>>,
    /// `seen`'s size at which dead entries are pruned (twice the live ones after a prune).
    prune_at: usize,
}

/// The endpoint addresses a Service port DNATs new connections to.
fn dnat_ips(sp: &ServicePortRules) -> impl Iterator<Item = IpAddr> + '_ {
    sp.cluster_endpoints
        .iter()
        .chain(&sp.local_endpoints)
        .filter_map(|e| e.ip.parse().ok())
}

impl EndpointIndex {
    /// Indexes `resource` (a no-op for one already indexed or without endpoints).
    pub fn add(&mut self, resource: &Arc<Resource>) {
        let Some(resource::Kind::ServicePort(sp)) = &resource.kind else {
            return;
        };
        if sp.cluster_endpoints.is_empty() && sp.local_endpoints.is_empty() {
            return;
        }
        let key = Arc::as_ptr(resource) as usize;
        if self.seen.contains_key(&key) {
            return;
        }
        let weak = Arc::downgrade(resource);
        let mut ips: Vec<IpAddr> = dnat_ips(sp).collect();
        ips.sort_unstable();
        ips.dedup();
        for ip in ips {
            self.by_ip.entry(ip).or_default().push(weak.clone());
        }
        self.seen.insert(key, weak);
        if self.seen.len() > self.prune_at {
            self.prune();
        }
    }

    /// Forgets resources nobody holds any more.
    fn prune(&mut self) {
        self.seen.retain(|_, w| w.strong_count() > 0);
        self.by_ip.retain(|_, v| {
            v.retain(|w| w.strong_count() > 0);
            !v.is_empty()
        });
        self.prune_at = self.seen.len() * 2 + 1024;
    }

    /// Every live resource that lists `ip` as a DNAT endpoint.
    pub fn listing(&self, ip: IpAddr) -> Vec<Arc<Resource>> {
        let mut found: Vec<Arc<Resource>> = self
            .by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(Weak::upgrade)
            .collect();
        found.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        found.dedup_by(|a, b| a.name == b.name && a.version == b.version);
        found
    }

    /// Resources indexed (live or not yet pruned).
    #[cfg(test)]
    fn indexed(&self) -> usize {
        self.seen.len()
    }
}

/// Whether `set` holds one of `listing` (resources that list the address), by content
/// version: O(listing) lookups, whatever the rule set's size.
fn sends_to(set: &NodeRuleSet, listing: &[Arc<Resource>]) -> bool {
    listing.iter().any(|l| {
        set.get(&l.name)
            .is_some_and(|held| held.version == l.version)
    })
}

/// One node's part of a drain: whether it may still send new connections to the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeDrain {
    pub node: String,
    pub state: DrainState,
    pub connected: bool,
    pub acked_version: String,
    /// For a pending node: the desired version that no longer has the address (empty while
    /// the desired rule set still has it).
    pub needed_version: String,
    pub reason: String,
}

impl Hub {
    /// Every node the hub knows, with whether it may still send new connections to `ip`
    /// (sorted by node name).
    pub fn drain_status(&self, ip: IpAddr) -> Vec<NodeDrain> {
        let listing = self.endpoints.lock().listing(ip);
        let entries: Vec<(String, Arc<super::NodeEntry>)> = {
            let directory = self.directory.lock();
            directory
                .nodes
                .iter()
                .map(|(n, e)| (n.clone(), e.clone()))
                .collect()
        };
        entries
            .into_iter()
            .map(|(node, entry)| {
                let (connected, acked) = {
                    let status = entry.status.lock();
                    (status.streams > 0, status.acked.clone())
                };
                let desired = entry.desired.borrow().clone();
                judge(node, connected, acked.as_deref(), &desired, &listing)
            })
            .collect()
    }
}

/// One node's drain state from what its agent acknowledged and what it should hold.
fn judge(
    node: String,
    connected: bool,
    acked: Option<&NodeRuleSet>,
    desired: &NodeRuleSet,
    listing: &[Arc<Resource>],
) -> NodeDrain {
    let acked_version = acked.map(|a| a.system_version.clone()).unwrap_or_default();
    let still_desired = sends_to(desired, listing);
    let needed_version = if still_desired {
        String::new()
    } else {
        desired.system_version.clone()
    };
    let (state, reason) = match acked {
        Some(a) if !sends_to(a, listing) => (DrainState::DrainDone, String::new()),
        Some(_) if !connected => (
            DrainState::DrainNotConnected,
            "not connected; the rule set it last acknowledged still sends to the address".into(),
        ),
        None if !connected => (
            DrainState::DrainNotConnected,
            "not connected; never acknowledged a rule set to this controller".into(),
        ),
        _ if still_desired => (
            DrainState::DrainPending,
            "the address is still an endpoint of its desired rule set".into(),
        ),
        Some(_) => (
            DrainState::DrainPending,
            "its agent has not acknowledged the version without the address yet".into(),
        ),
        None => (
            DrainState::DrainPending,
            "its agent has acknowledged nothing on its stream yet".into(),
        ),
    };
    NodeDrain {
        node,
        state,
        connected,
        acked_version,
        needed_version: if state == DrainState::DrainDone {
            String::new()
        } else {
            needed_version
        },
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubenft_plan::view::Base;
    use kubenft_proto::v1::Endpoint;

    fn port(name: &str, cluster: &[&str], local: &[&str]) -> Arc<Resource> {
        let eps = |ips: &[&str]| {
            ips.iter()
                .map(|ip| Endpoint {
                    ip: (*ip).into(),
                    port: 8080,
                    ..Default::default()
                })
                .collect()
        };
        Arc::new(Resource::versioned(
            name.into(),
            resource::Kind::ServicePort(ServicePortRules {
                cluster_endpoints: eps(cluster),
                local_endpoints: eps(local),
                serving_ips: cluster.iter().map(|s| (*s).to_string()).collect(),
                ..Default::default()
            }),
        ))
    }

    fn set(resources: &[&Arc<Resource>]) -> NodeRuleSet {
        let base: Base = resources.iter().map(|r| Arc::clone(r)).collect();
        NodeRuleSet::build("n".into(), &base, Default::default(), 1)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_index_finds_cluster_and_local_endpoints_once_and_forgets_dropped_ones() {
        let mut index = EndpointIndex::default();
        let web = port("web", &["10.244.1.5", "10.244.2.6"], &[]);
        let local = port("local", &[], &["10.244.1.5"]);
        let empty = port("empty", &[], &[]);
        for r in [&web, &web, &local, &empty] {
            index.add(r);
        }
        assert_eq!(index.indexed(), 2, "shared resources are indexed once");
        let names = |v: Vec<Arc<Resource>>| v.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(index.listing(ip("10.244.1.5"))), ["local", "web"]);
        assert_eq!(names(index.listing(ip("10.244.2.6"))), ["web"]);
        assert!(index.listing(ip("10.244.9.9")).is_empty());
        drop(web);
        assert_eq!(names(index.listing(ip("10.244.2.6"))), Vec::<String>::new());
        index.prune();
        assert_eq!(index.indexed(), 1);
        assert!(!index.by_ip.contains_key(&ip("10.244.2.6")));
    }

    #[test]
    fn serving_ips_and_hairpin_addresses_are_not_endpoints() {
        let mut index = EndpointIndex::default();
        // Serving but not selected (another node's local endpoint): conntrack only.
        let mut r = Resource::clone(&port("p", &[], &[]));
        if let Some(resource::Kind::ServicePort(sp)) = &mut r.kind {
            sp.serving_ips = vec!["10.244.1.5".into()];
        }
        index.add(&Arc::new(r));
        assert!(index.listing(ip("10.244.1.5")).is_empty());
    }

    #[test]
    fn nodes_are_judged_by_what_they_acknowledged() {
        let with = port("web", &["10.244.1.5", "10.244.2.6"], &[]);
        let without = port("web", &["10.244.2.6"], &[]);
        let other = port("other", &["10.244.3.7"], &[]);
        let mut index = EndpointIndex::default();
        for r in [&with, &without, &other] {
            index.add(r);
        }
        let listing = index.listing(ip("10.244.1.5"));
        let (old, new) = (set(&[&with, &other]), set(&[&without, &other]));
        let j = |connected, acked: Option<&NodeRuleSet>, desired| {
            judge("n".into(), connected, acked, desired, &listing)
        };
        // Acknowledged the version without it: done, connected or not.
        for connected in [true, false] {
            let d = j(connected, Some(&new), &new);
            assert_eq!(d.state, DrainState::DrainDone, "{d:?}");
            assert_eq!(d.acked_version, new.system_version);
        }
        // Sent, not acknowledged yet: pending, needing the new version.
        let d = j(true, Some(&old), &new);
        assert_eq!(d.state, DrainState::DrainPending);
        assert_eq!(
            (d.acked_version.as_str(), d.needed_version.as_str()),
            (old.system_version.as_str(), new.system_version.as_str())
        );
        // Not even planned yet (the endpoint is still in the EndpointSlice): pending, no
        // version to name.
        let d = j(true, Some(&old), &old);
        assert_eq!(d.state, DrainState::DrainPending);
        assert_eq!(d.needed_version, "");
        // Disconnected with the address in what it enforces, or never heard from.
        assert_eq!(
            j(false, Some(&old), &new).state,
            DrainState::DrainNotConnected
        );
        assert_eq!(j(false, None, &new).state, DrainState::DrainNotConnected);
        assert_eq!(j(true, None, &new).state, DrainState::DrainPending);
        // A node that never had it is done at once.
        let elsewhere = set(&[&other]);
        assert_eq!(
            j(true, Some(&elsewhere), &elsewhere).state,
            DrainState::DrainDone
        );
    }
}
