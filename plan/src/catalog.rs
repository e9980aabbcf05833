//! The catalog: every Service port planned once for all nodes, kept up to date incrementally.
//!
//! Inputs arrive as persistent maps, so the difference between two views is found by skipping
//! the subtrees they share: a change to one EndpointSlice among 100,000 replans one Service,
//! not all of them. Every big field here is persistent too, so the next catalog starts as an
//! O(1) copy of the previous one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use imbl::{OrdMap, OrdSet, ordmap::DiffItem};
use kubenft_proto::v1::{IpFamily, NodeEndpoints, Resource, resource};

use kubenft_proto::{
    NODE_RESOURCE, endpoint_bucket, node_endpoints_name, parse_node_endpoints_name,
};

use crate::claims::Claims;
use crate::cores;
use crate::model::{Inputs, NodeModel, ObjectName, Rejection, ServiceModel, SliceModel};
use crate::policy::{ClusterPolicy, missing_detector, node_rules};
use crate::port::{
    AgentFacts, PlannedPort, RefusedEndpoint, Specific, explain_port, node_ips, plan_service,
    port_rules,
};
use crate::select::Site;
use crate::view::{Base, NodeRuleSet, Resources};

/// One Service planned again, before the catalog indexes it.
struct Replanned {
    id: ObjectName,
    /// Its ports' names now (empty if it is gone or refused).
    names: Vec<String>,
    /// The ports whose plan changed.
    changed: Vec<Arc<PlannedPort>>,
    /// Endpoints of its slices refused because their address is a ClusterIP.
    refused_endpoints: Vec<RefusedEndpoint>,
}

/// The node-independent part of planning.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub policy: Arc<ClusterPolicy>,
    /// The inputs this catalog reflects (the next build diffs against them).
    inputs: Inputs,
    /// By resource name.
    pub ports: OrdMap<String, Arc<PlannedPort>>,
    /// Every port's generic resource: the part of every node's rule set they share.
    pub base: Base,
    /// The port names of each planned Service.
    by_service: OrdMap<ObjectName, Arc<[String]>>,
    /// The EndpointSlices of each Service (by the slice's service label).
    slices_by_service: OrdMap<ObjectName, OrdSet<ObjectName>>,
    /// Who holds each address and port and each NodePort, and the claims refused.
    claims: Claims,
    /// Every ClusterIP, with how many Services have it (an endpoint there is refused).
    cluster_ips: OrdMap<IpAddr, u32>,
    /// The addresses of planned endpoints without a node, with how many ports list each
    /// (those with a node are in `local_ips`).
    unplaced_ips: OrdMap<IpAddr, u32>,
    /// Per Service, the endpoints of its slices refused for being at a ClusterIP.
    refused_endpoints: OrdMap<ObjectName, Arc<[RefusedEndpoint]>>,
    /// The same by address: the Services to plan again when the address stops being a
    /// ClusterIP.
    refused_endpoint_ips: OrdMap<IpAddr, OrdSet<ObjectName>>,
    /// For each node, the ports it sees differently.
    specific_by_node: OrdMap<String, OrdSet<String>>,
    /// Ports every node sees differently.
    specific_everywhere: OrdSet<String>,
    /// For each node, the addresses of the endpoints on it by `node-endpoints` bucket (with
    /// how many ports use each).
    local_ips: OrdMap<String, OrdMap<(u8, IpAddr), u32>>,
    /// For each node, the `node-endpoints` buckets whose addresses differ from the previous
    /// catalog's.
    locals_changed: BTreeMap<String, BTreeSet<u8>>,
    /// Port names whose plan differs from the previous catalog's (all of them for the first).
    pub changed: Vec<String>,
}

impl Catalog {
    /// The catalog before the first complete view.
    pub fn empty(policy: Arc<ClusterPolicy>) -> Catalog {
        Catalog {
            policy,
            ..Default::default()
        }
    }

    /// The inputs this catalog reflects.
    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    pub fn nodes(&self) -> &OrdMap<String, Arc<NodeModel>> {
        &self.inputs.nodes
    }

    /// Objects (or parts) refused while reading, claims refused because another Service
    /// holds them, and endpoints refused for being at a ClusterIP; sorted.
    pub fn rejections(&self) -> Vec<Rejection> {
        let mut all: Vec<Rejection> = self
            .inputs
            .rejections
            .iter()
            .cloned()
            .chain(self.claims.rejections())
            .chain(
                self.refused_endpoints
                    .values()
                    .flat_map(|r| r.iter().map(|r| r.rejection.clone())),
            )
            .collect();
        all.sort();
        all
    }

    /// Resolves every Service port against its EndpointSlices, per family. What two Services
    /// claim alike (an address and port, a NodePort): the one already serving it keeps it,
    /// else the older (see `claims`); the other loses that claim only. Only the Services
    /// whose object, slices or claims changed since `previous` are planned again; the other
    /// ports keep their computed resources.
    pub fn build(
        policy: Arc<ClusterPolicy>,
        inputs: &Inputs,
        previous: Option<&Catalog>,
    ) -> Catalog {
        let mut next = match previous {
            Some(p) if Arc::ptr_eq(&p.policy, &policy) => Catalog {
                changed: Vec::new(),
                locals_changed: BTreeMap::new(),
                ..p.clone()
            },
            _ => Catalog::empty(policy),
        };
        let before = std::mem::replace(&mut next.inputs, inputs.clone());

        let mut affected = BTreeSet::new();
        let mut changed_services = BTreeSet::new();
        // ClusterIPs that appear or go: endpoints there are refused, or usable again.
        let mut appeared = BTreeSet::new();
        let mut gone = BTreeSet::new();
        for item in before.services.diff(&inputs.services) {
            let (old, new) = match &item {
                DiffItem::Add(_, s) => (None, Some(*s)),
                DiffItem::Remove(_, s) => (Some(*s), None),
                DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
            };
            next.count_cluster_ips(old, new, &mut appeared, &mut gone);
            changed_services.insert(diff_key(&item).clone());
        }
        affected.extend(changed_services.iter().cloned());
        for item in before.slices.diff(&inputs.slices) {
            match item {
                DiffItem::Add(_, s) => affected.insert(next.index_slice(s, true)),
                DiffItem::Remove(_, s) => affected.insert(next.index_slice(s, false)),
                DiffItem::Update { old, new } => {
                    affected.insert(next.index_slice(old.1, false));
                    affected.insert(next.index_slice(new.1, true))
                }
            };
        }
        if !changed_services.is_empty() {
            affected.extend(next.claims.update(
                &changed_services,
                &before.services,
                &inputs.services,
            ));
        }
        // An address becoming a ClusterIP: the ports listing it as an endpoint are planned
        // again without it (a scan, but only when a ClusterIP equals a planned endpoint,
        // which a sane cluster never has); one ceasing to be: the Services that refused it.
        let listed: Vec<IpAddr> = appeared
            .into_iter()
            .filter(|ip| next.is_planned_endpoint(ip))
            .collect();
        if !listed.is_empty() {
            affected.extend(
                next.ports
                    .values()
                    .filter(|p| p.plan.candidates.iter().any(|c| listed.contains(&c.ip)))
                    .map(|p| p.plan.service.id.clone()),
            );
        }
        for ip in gone {
            if let Some(ids) = next.refused_endpoint_ips.get(&ip) {
                affected.extend(ids.iter().cloned());
            }
        }
        // Planning is the costly part and reads only the catalog: on every core when a first
        // read or a relist affects thousands of Services. Indexing the results is sequential.
        let affected: Vec<ObjectName> = affected.into_iter().collect();
        for replanned in cores::map(&affected, |id| next.plan_again(id)) {
            next.apply(replanned);
        }
        next.changed.sort();
        next.changed.dedup();
        next
    }

    /// Adds (or removes) a slice in the per-Service index; returns its Service.
    fn index_slice(&mut self, slice: &SliceModel, add: bool) -> ObjectName {
        let svc = ObjectName {
            namespace: slice.id.namespace.clone(),
            name: slice.service.clone(),
        };
        let set = self.slices_by_service.entry(svc.clone()).or_default();
        if add {
            set.insert(slice.id.clone());
        } else {
            set.remove(&slice.id);
            if set.is_empty() {
                self.slices_by_service.remove(&svc);
            }
        }
        svc
    }

    /// Counts a planned port's endpoints in or out of their nodes' local addresses (only
    /// proxied Services' endpoints: an ignored Service leaves no trace on any node).
    fn count_locals(&mut self, port: &PlannedPort, add: bool) {
        for c in &port.plan.candidates {
            match &c.model.node_name {
                Some(node) => self.count_local(node, c.ip, add),
                None => {
                    let count = self.unplaced_ips.get(&c.ip).copied().unwrap_or(0);
                    if add {
                        self.unplaced_ips.insert(c.ip, count + 1);
                    } else if count > 1 {
                        self.unplaced_ips.insert(c.ip, count - 1);
                    } else {
                        self.unplaced_ips.remove(&c.ip);
                    }
                }
            }
        }
    }

    /// Whether a planned port lists `ip` as an endpoint. Costs a look-up per node: it is
    /// asked only of an address that has just become a ClusterIP, and an index of every
    /// endpoint address would cost a third of a first plan's time.
    fn is_planned_endpoint(&self, ip: &IpAddr) -> bool {
        let key = (endpoint_bucket(ip), *ip);
        self.unplaced_ips.contains_key(ip)
            || self.local_ips.values().any(|ips| ips.contains_key(&key))
    }

    /// Counts one listing of `ip` on `node` in or out; notes the node when the address
    /// appears or goes.
    fn count_local(&mut self, node: &str, ip: IpAddr, add: bool) {
        let key = (endpoint_bucket(&ip), ip);
        let ips = self.local_ips.entry(node.to_owned()).or_default();
        let count = ips.get(&key).copied().unwrap_or(0);
        let next = if add {
            count + 1
        } else {
            count.saturating_sub(1)
        };
        if next == 0 {
            ips.remove(&key);
            if ips.is_empty() {
                self.local_ips.remove(node);
            }
        } else {
            ips.insert(key, next);
        }
        if (count == 0) != (next == 0) {
            self.locals_changed
                .entry(node.to_owned())
                .or_default()
                .insert(key.0);
        }
    }

    /// Counts a Service's ClusterIPs out (`old`) and in (`new`); notes the addresses that
    /// became ClusterIPs and those that stopped being.
    fn count_cluster_ips(
        &mut self,
        old: Option<&Arc<ServiceModel>>,
        new: Option<&Arc<ServiceModel>>,
        appeared: &mut BTreeSet<IpAddr>,
        gone: &mut BTreeSet<IpAddr>,
    ) {
        let ips =
            |s: Option<&Arc<ServiceModel>>| s.map(|s| s.cluster_ips.clone()).unwrap_or_default();
        let (old, new) = (ips(old), ips(new));
        for ip in old.iter().filter(|ip| !new.contains(ip)) {
            let count = self.cluster_ips.get(ip).copied().unwrap_or(0);
            if count <= 1 {
                self.cluster_ips.remove(ip);
                appeared.remove(ip);
                gone.insert(*ip);
            } else {
                self.cluster_ips.insert(*ip, count - 1);
            }
        }
        for ip in new.iter().filter(|ip| !old.contains(ip)) {
            let count = self.cluster_ips.get(ip).copied().unwrap_or(0);
            if count == 0 {
                gone.remove(ip);
                appeared.insert(*ip);
            }
            self.cluster_ips.insert(*ip, count + 1);
        }
    }

    /// Plans one Service's ports again (none if it is gone); only the ports whose plan came
    /// out different are built.
    fn plan_again(&self, id: &ObjectName) -> Replanned {
        let (plans, refused_endpoints) = match self.inputs.services.get(id) {
            Some(svc) => {
                let slices: Vec<&SliceModel> = self
                    .slices_by_service
                    .get(id)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| self.inputs.slices.get(s).map(|s| &**s))
                    .collect();
                plan_service(svc, &slices, self.claims.refused(id), |ip| {
                    self.cluster_ips.contains_key(ip)
                })
            }
            None => (Vec::new(), Vec::new()),
        };
        let names: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
        let changed = plans
            .into_iter()
            .filter(|plan| {
                self.ports
                    .get(&plan.name)
                    .is_none_or(|old| old.plan != *plan)
            })
            .map(|plan| Arc::new(PlannedPort::new(plan)))
            .collect();
        Replanned {
            id: id.clone(),
            names,
            changed,
            refused_endpoints,
        }
    }

    /// Indexes a Service planned again: its changed ports replace the old, its ports that
    /// are gone are removed.
    fn apply(&mut self, replanned: Replanned) {
        let Replanned {
            id,
            names,
            changed,
            refused_endpoints,
        } = replanned;
        self.index_refused_endpoints(&id, refused_endpoints);
        let old_names = self.by_service.remove(&id).unwrap_or_else(|| Arc::new([]));
        for port in changed {
            self.set_port(port.plan.name.clone(), Some(port));
        }
        for gone in old_names.iter().filter(|n| !names.contains(n)) {
            self.set_port(gone.clone(), None);
        }
        if !names.is_empty() {
            self.by_service.insert(id, names.into());
        }
    }

    /// Replaces a Service's refused endpoints, in both indexes.
    fn index_refused_endpoints(&mut self, id: &ObjectName, refused: Vec<RefusedEndpoint>) {
        let old = if refused.is_empty() {
            self.refused_endpoints.remove(id)
        } else {
            self.refused_endpoints.insert(id.clone(), refused.into())
        };
        for r in old.iter().flat_map(|r| r.iter()) {
            if let Some(ids) = self.refused_endpoint_ips.get_mut(&r.ip) {
                ids.remove(id);
                if ids.is_empty() {
                    self.refused_endpoint_ips.remove(&r.ip);
                }
            }
        }
        for r in self
            .refused_endpoints
            .get(id)
            .into_iter()
            .flat_map(|r| r.iter())
        {
            self.refused_endpoint_ips
                .entry(r.ip)
                .or_default()
                .insert(id.clone());
        }
    }

    /// Replaces (or removes) one port everywhere it is indexed, and records the change.
    fn set_port(&mut self, name: String, port: Option<Arc<PlannedPort>>) {
        if let Some(old) = self.ports.remove(&name) {
            self.base.remove(&name);
            self.index_specific(&name, &old.specific, false);
            self.count_locals(&old, false);
        }
        if let Some(port) = port {
            self.index_specific(&name, &port.specific, true);
            self.count_locals(&port, true);
            self.base.insert(port.generic.clone());
            self.ports.insert(name.clone(), port);
        }
        self.changed.push(name);
    }

    fn index_specific(&mut self, name: &str, specific: &Specific, add: bool) {
        match specific {
            Specific::Every if add => {
                self.specific_everywhere.insert(name.to_owned());
            }
            Specific::Every => {
                self.specific_everywhere.remove(name);
            }
            Specific::Nodes(nodes) => {
                for node in nodes {
                    let set = self.specific_by_node.entry(node.clone()).or_default();
                    if add {
                        set.insert(name.to_owned());
                    } else {
                        set.remove(name);
                        if set.is_empty() {
                            self.specific_by_node.remove(node);
                        }
                    }
                }
            }
        }
    }

    /// What `node` holds for `name` beyond the shared base: its own settings, a port it sees
    /// differently, or `None` (it follows the base, or the name is gone).
    pub fn node_value(&self, facts: &AgentFacts, name: &str) -> Option<Arc<Resource>> {
        let node = self.nodes().get(&facts.name).map(|n| &**n);
        if name == NODE_RESOURCE {
            return Some(Arc::new(Resource::versioned(
                NODE_RESOURCE.to_owned(),
                resource::Kind::Node(node_rules(&self.policy, node, facts)),
            )));
        }
        if let Some(bucket) = parse_node_endpoints_name(name) {
            let ips: Vec<String> = self
                .local_ips
                .get(&facts.name)
                .into_iter()
                .flat_map(|ips| ips.keys())
                .skip_while(|(b, _)| *b < bucket)
                .take_while(|(b, _)| *b == bucket)
                .map(|(_, ip)| ip.to_string())
                .collect();
            return (!ips.is_empty()).then(|| {
                Arc::new(Resource::versioned(
                    name.to_owned(),
                    resource::Kind::NodeEndpoints(NodeEndpoints { ips }),
                ))
            });
        }
        let port = self
            .ports
            .get(name)
            .filter(|p| p.is_specific_to(&facts.name))?;
        let site = Site {
            name: &facts.name,
            zone: node.and_then(|n| n.zone.as_deref()),
        };
        let node_ips = node_ips(node, facts);
        Some(Arc::new(Resource::versioned(
            name.to_owned(),
            resource::Kind::ServicePort(port_rules(&port.plan, &site, &node_ips)),
        )))
    }

    /// The names a node overrides: its settings, the buckets of its endpoints' addresses,
    /// and the ports specific to it.
    fn override_names(&self, node: &str) -> Vec<String> {
        let buckets: BTreeSet<u8> = self
            .local_ips
            .get(node)
            .into_iter()
            .flat_map(|ips| ips.keys().map(|(b, _)| *b))
            .collect();
        std::iter::once(NODE_RESOURCE.to_owned())
            .chain(buckets.into_iter().map(node_endpoints_name))
            .chain(
                self.specific_by_node
                    .get(node)
                    .into_iter()
                    .flatten()
                    .cloned(),
            )
            .chain(self.specific_everywhere.iter().cloned())
            .collect()
    }

    /// The full rule set of one node, at revision `rev`.
    pub fn rules_for(&self, facts: &AgentFacts, rev: u64) -> NodeRuleSet {
        let overrides: Resources = self
            .override_names(&facts.name)
            .into_iter()
            .filter_map(|name| self.node_value(facts, &name).map(|r| (name, r)))
            .collect();
        NodeRuleSet::build(facts.name.clone(), &self.base, overrides, rev)
    }

    /// The next revision of a node's rule set after this catalog replaced the one it was
    /// planned from, touching only the changed ports; `None` if nothing it holds changed. The
    /// node's own settings depend only on the node and the policy (when those change the
    /// caller rebuilds instead); the buckets of its endpoints' addresses that changed are
    /// included here.
    pub fn update(&self, current: &NodeRuleSet, facts: &AgentFacts) -> Option<NodeRuleSet> {
        let value = |name: &str| self.node_value(facts, name);
        match self.locals_changed.get(&facts.name) {
            Some(buckets) => {
                let mut names = self.changed.clone();
                names.extend(buckets.iter().map(|&b| node_endpoints_name(b)));
                current.next(&self.base, &names, value)
            }
            None => current.next(&self.base, &self.changed, value),
        }
    }

    /// Human-readable reasons for how one node programs one Service.
    pub fn explain(&self, facts: &AgentFacts, svc: &ObjectName) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(why) = self.inputs.ignored.get(svc) {
            notes.push(format!("not proxied: {why}"));
        }
        for r in self.claims.refused(svc) {
            notes.push(format!("refused: {}", r.rejection(svc)));
        }
        for r in self
            .refused_endpoints
            .get(svc)
            .into_iter()
            .flat_map(|r| r.iter())
        {
            notes.push(format!("refused: {}", r.rejection));
        }
        let site = Site {
            name: &facts.name,
            zone: self
                .nodes()
                .get(&facts.name)
                .and_then(|n| n.zone.as_deref()),
        };
        let names = self
            .by_service
            .get(svc)
            .cloned()
            .unwrap_or_else(|| Arc::new([]));
        for port in names.iter().filter_map(|n| self.ports.get(n)) {
            notes.extend(explain_port(&port.plan, &site));
        }
        // Only the families the Service uses: a single-stack cluster has no detector of the
        // other family, and needs none.
        let families: BTreeSet<IpFamily> = names
            .iter()
            .filter_map(|n| self.ports.get(n))
            .map(|p| p.plan.family)
            .collect();
        let families: Vec<IpFamily> = families.into_iter().collect();
        let node = self.nodes().get(&facts.name).map(|n| &**n);
        notes.extend(missing_detector(&self.policy, node, &families));
        notes
    }
}

fn diff_key<'a, K, V>(item: &DiffItem<'a, 'a, K, V>) -> &'a K {
    match item {
        DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k,
        DiffItem::Update { new, .. } => new.0,
    }
}
