//! Per-node planning: pure functions from validated objects to the rule set a node enforces.
//!
//! ```text
//!  Inputs (services, slices, nodes) ──Catalog::build──▶ PortPlan per Service port and family
//!                                                       (node-independent, conflicts resolved)
//!  Catalog + NodeSite ──Catalog::rules_for──▶ NodeRuleSet: "node" + one resource per PortPlan
//! ```
//!
//! The catalog is computed once per input change and shared by every node; a node's view only
//! adds what differs per node (local endpoints, topology, node addresses).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;

use imbl::OrdMap;
use ipnet::IpNet;
use kubenft_proto::v1::{
    DetectLocalMode, Endpoint, IpFamily, NodeRules, Protocol, Resource, ServicePortRules,
    SessionAffinity, resource,
};

use crate::model::{
    EndpointModel, Limits, NodeModel, ObjectName, Rejection, ServiceModel, ServicePortModel,
    SliceModel, TrafficPolicy, family_of,
};
use crate::select::{self, Candidate, NodeSite, TopologyMode};

mod catalog;
mod claims;

pub use catalog::Catalog;
use claims::{Claim, Refusal, Via};

/// Where NodePorts are served (`--node-port-addresses`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// The node's InternalIP of each family (kube-proxy nftables' default).
    #[default]
    Primary,
    /// Every local address in these ranges (as the agent reports them).
    Cidrs(Vec<IpNet>),
    /// Every local address except loopback.
    All,
}

/// How a node recognises traffic from its own pods (`--detect-local-mode`), with kube-proxy's
/// meanings: such traffic is not masqueraded to ClusterIPs, and reaches every endpoint of an
/// externalTrafficPolicy Local Service. Without a detector (no CIDR of a family) nothing is
/// local.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DetectLocal {
    /// Sources in `--cluster-cidr`.
    #[default]
    ClusterCidr,
    /// Sources in the node's own `spec.podCIDRs`.
    NodeCidr,
    /// Packets entering through this interface (`--pod-bridge-interface`).
    BridgeInterface(InterfaceName),
    /// Packets entering through an interface whose name starts with this
    /// (`--pod-interface-name-prefix`).
    InterfaceNamePrefix(InterfaceName),
}

impl DetectLocal {
    /// kube-proxy's name for the mode.
    pub fn mode_name(&self) -> &'static str {
        match self {
            DetectLocal::ClusterCidr => "ClusterCIDR",
            DetectLocal::NodeCidr => "NodeCIDR",
            DetectLocal::BridgeInterface(_) => "BridgeInterface",
            DetectLocal::InterfaceNamePrefix(_) => "InterfaceNamePrefix",
        }
    }

    /// The oldest agent protocol that renders this mode.
    pub fn agent_protocol(&self) -> u32 {
        match self {
            DetectLocal::ClusterCidr | DetectLocal::NodeCidr => 1,
            DetectLocal::BridgeInterface(_) | DetectLocal::InterfaceNamePrefix(_) => {
                kubenft_proto::release::INTERFACE_DETECT_LOCAL_PROTOCOL
            }
        }
    }
}

/// An interface name (or name prefix) that is safe to hand to nft: see
/// [`kubenft_proto::check_interface_name`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceName(String);

impl InterfaceName {
    pub fn new(name: &str) -> Result<Self, String> {
        kubenft_proto::check_interface_name(name)
            .map(|()| InterfaceName(name.to_owned()))
            .map_err(|why| format!("{:?} {why}", crate::model::clip(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Cluster-wide settings given on the controller's command line.
#[derive(Clone, Debug, Default)]
pub struct ClusterPolicy {
    pub cluster_cidrs: Vec<IpNet>,
    pub detect_local: DetectLocal,
    pub service_cidrs: Vec<IpNet>,
    pub masquerade_all: bool,
    pub node_port_addresses: NodePortAddresses,
    pub limits: Limits,
}

/// Everything read from the source, validated. The maps are persistent: a copy is O(1), and
/// two versions that share most of their content are compared in time proportional to what
/// differs.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub services: OrdMap<ObjectName, Arc<ServiceModel>>,
    pub slices: OrdMap<ObjectName, Arc<SliceModel>>,
    pub nodes: OrdMap<String, Arc<NodeModel>>,
    /// Objects (or parts of them) refused while reading.
    pub rejections: Vec<Rejection>,
    /// Services deliberately not proxied, and why.
    pub ignored: OrdMap<ObjectName, String>,
}

/// One endpoint of a Service port, before node-specific selection.
#[derive(Clone, Debug, PartialEq)]
pub struct PortCandidate {
    pub ip: IpAddr,
    pub port: u16,
    pub model: Arc<EndpointModel>,
}

impl Candidate for PortCandidate {
    fn conditions(&self) -> crate::model::Conditions {
        self.model.conditions
    }
    fn node_name(&self) -> Option<&str> {
        self.model.node_name.as_deref()
    }
    fn has_zone_hints(&self) -> bool {
        self.model
            .zone_hints
            .as_ref()
            .is_some_and(|z| !z.is_empty())
    }
    fn hinted_for_zone(&self, zone: &str) -> bool {
        self.model
            .zone_hints
            .as_ref()
            .is_some_and(|z| z.contains(zone))
    }
    fn has_node_hints(&self) -> bool {
        self.model
            .node_hints
            .as_ref()
            .is_some_and(|n| !n.is_empty())
    }
    fn hinted_for_node(&self, node: &str) -> bool {
        self.model
            .node_hints
            .as_ref()
            .is_some_and(|n| n.contains(node))
    }
}

/// One Service port in one IP family, with everything but the node-specific choices made.
#[derive(Clone, Debug, PartialEq)]
pub struct PortPlan {
    pub name: String,
    pub service: Arc<ServiceModel>,
    pub port: ServicePortModel,
    pub family: IpFamily,
    pub cluster_ip: IpAddr,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    /// The Service's healthCheckNodePort, unless another Service holds that node port.
    pub health_check_node_port: Option<NonZeroU16>,
    /// Endpoints sorted by (ip, port), deduplicated.
    pub candidates: Vec<PortCandidate>,
    /// The latest last-change-trigger-time of the port's slices (Unix ms).
    pub trigger_ms: Option<i64>,
}

impl PortPlan {
    /// Whether a node's rules for this port depend on which endpoints run on it: a Local
    /// traffic policy that applies (internal, or external on an externally reachable port).
    fn uses_locality(&self) -> bool {
        self.service.internal_policy == TrafficPolicy::Local
            || (self.service.externally_accessible()
                && self.service.external_policy == TrafficPolicy::Local)
    }
}

/// Which nodes see a Service port differently from the rest.
#[derive(Clone, Debug, PartialEq)]
pub enum Specific {
    /// Only the nodes that host one of its endpoints (local endpoints, hairpin).
    Nodes(BTreeSet<String>),
    /// Every node (topology hints, or source ranges that may cover a node's own address).
    Every,
}

/// A planned port with the resource every non-specific node gets, computed once.
#[derive(Debug)]
pub struct PlannedPort {
    pub plan: PortPlan,
    pub generic: Arc<Resource>,
    pub specific: Specific,
}

impl PlannedPort {
    fn new(plan: PortPlan) -> Self {
        let generic = Arc::new(Resource::versioned(
            plan.name.clone(),
            resource::Kind::ServicePort(port_rules(
                &plan,
                &NodeSite {
                    name: "",
                    zone: None,
                },
                &[],
            )),
        ));
        let hinted = plan
            .candidates
            .iter()
            .any(|c| c.has_zone_hints() || c.has_node_hints());
        let specific = if hinted || !plan.source_ranges.is_empty() {
            Specific::Every
        } else if plan.uses_locality() {
            Specific::Nodes(
                plan.candidates
                    .iter()
                    .filter_map(|c| c.model.node_name.clone())
                    .collect(),
            )
        } else {
            // Cluster-wide policies only: every node enforces the same rules (hairpin traffic
            // is recognised by address, on every node, as kube-proxy does).
            Specific::Nodes(BTreeSet::new())
        };
        PlannedPort {
            plan,
            generic,
            specific,
        }
    }

    fn is_specific_to(&self, node: &str) -> bool {
        match &self.specific {
            Specific::Every => true,
            Specific::Nodes(nodes) => nodes.contains(node),
        }
    }
}

/// What a node's view depends on besides the catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    /// Addresses the node's agent reported (for CIDR nodePortAddresses).
    pub agent_addresses: Vec<IpAddr>,
}

pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
        Protocol::Tcp | Protocol::Unspecified => "tcp",
    }
}

fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::Ipv6 => "ipv6",
        _ => "ipv4",
    }
}

/// "<namespace>/<service>/<protocol>/<port name>/<family>".
pub fn resource_name(svc: &ObjectName, port: &ServicePortModel, family: IpFamily) -> String {
    format!(
        "{}/{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        protocol_name(port.protocol),
        port.name,
        family_name(family)
    )
}

pub use kubenft_proto::{
    ENDPOINT_BUCKETS, NODE_RESOURCE, endpoint_bucket, node_endpoints_name,
    parse_node_endpoints_name,
};

fn node_ips(node: Option<&NodeModel>, facts: &NodeFacts) -> Vec<IpAddr> {
    node.map(|n| n.internal_ips.as_slice())
        .unwrap_or_default()
        .iter()
        .chain(&facts.agent_addresses)
        .copied()
        .collect()
}

/// An endpoint refused because its address is a ClusterIP (with the slice and field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedEndpoint {
    pub ip: IpAddr,
    pub rejection: Rejection,
}

/// Resolves each port of a Service in each of its families, leaving out what it claims but
/// another Service holds (`refused`), and endpoints whose address is a ClusterIP (of any
/// Service: `is_cluster_ip`), which are returned, one per slice endpoint.
fn plan_service(
    service: &Arc<ServiceModel>,
    slices: &[&SliceModel],
    refused: &[Refusal],
    is_cluster_ip: impl Fn(&IpAddr) -> bool,
) -> (Vec<PortPlan>, Vec<RefusedEndpoint>) {
    let svc = &**service;
    let is_refused = |claim: Claim| refused.iter().any(|r| r.claim == claim);
    // One look-up per endpoint; the ports look at the (usually empty) list.
    let mut refused_endpoints = Vec::new();
    for slice in slices {
        for ep in slice.endpoints.iter().filter(|ep| is_cluster_ip(&ep.ip)) {
            refused_endpoints.push(RefusedEndpoint {
                ip: ep.ip,
                rejection: Rejection {
                    kind: "EndpointSlice",
                    namespace: slice.id.namespace.clone(),
                    name: slice.id.name.clone(),
                    field: format!("endpoints[{}].addresses[0]", ep.index),
                    message: format!(
                        "{} is a Service's ClusterIP: not used as an endpoint",
                        ep.ip
                    ),
                },
            });
        }
    }
    let at_cluster_ip = |ip: &IpAddr| refused_endpoints.iter().any(|r| r.ip == *ip);
    let mut plans = Vec::new();
    for cluster_ip in &svc.cluster_ips {
        let family = family_of(cluster_ip);
        for port in &svc.ports {
            let (protocol, number, index) = (port.protocol, port.port.get(), port.index);
            let served = |via: Via, ip: &IpAddr| {
                family_of(ip) == family
                    && !is_refused(Claim::Address {
                        via,
                        ip: *ip,
                        protocol,
                        port: number,
                        index,
                    })
            };
            if !served(Via::ClusterIp, cluster_ip) {
                continue;
            }
            let mut port = port.clone();
            if let Some(np) = port.node_port
                && is_refused(Claim::NodePort {
                    protocol,
                    port: np.get(),
                    index,
                })
            {
                port.node_port = None;
            }
            plans.push(PortPlan {
                name: resource_name(&svc.id, &port, family),
                service: service.clone(),
                family,
                cluster_ip: *cluster_ip,
                external_ips: svc
                    .external_ips
                    .iter()
                    .copied()
                    .filter(|ip| served(Via::External, ip))
                    .collect(),
                load_balancer_ips: svc
                    .load_balancer_ips
                    .iter()
                    .copied()
                    .filter(|ip| served(Via::LoadBalancer, ip))
                    .collect(),
                source_ranges: svc
                    .load_balancer_source_ranges
                    .iter()
                    .copied()
                    .filter(|n| family_of(&n.addr()) == family)
                    .collect(),
                health_check_node_port: svc
                    .health_check_node_port
                    .filter(|hc| !is_refused(Claim::HealthCheck(hc.get()))),
                candidates: candidates(&port, family, slices, &at_cluster_ip),
                trigger_ms: slices
                    .iter()
                    .filter(|s| s.family == family)
                    .filter_map(|s| s.trigger_ms)
                    .max(),
                port,
            });
        }
    }
    (plans, refused_endpoints)
}

/// The endpoints of one port: for each slice of the family, the slice port with the same name
/// and protocol gives the target port (so one Service port may land on different ports).
/// Endpoints at a ClusterIP are left out.
fn candidates(
    port: &ServicePortModel,
    family: IpFamily,
    slices: &[&SliceModel],
    at_cluster_ip: &impl Fn(&IpAddr) -> bool,
) -> Vec<PortCandidate> {
    let mut out: BTreeMap<(IpAddr, u16), PortCandidate> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == family) {
        let Some(sp) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in slice.endpoints.iter().filter(|ep| !at_cluster_ip(&ep.ip)) {
            out.entry((ep.ip, sp.port.get()))
                .or_insert_with(|| PortCandidate {
                    ip: ep.ip,
                    port: sp.port.get(),
                    model: Arc::new(ep.clone()),
                });
        }
    }
    out.into_values().collect()
}

fn node_rules(policy: &ClusterPolicy, node: Option<&NodeModel>, facts: &NodeFacts) -> NodeRules {
    let (node_port_ips, all) = match &policy.node_port_addresses {
        NodePortAddresses::Primary => (
            node.map(|n| n.internal_ips.clone()).unwrap_or_default(),
            false,
        ),
        NodePortAddresses::All => (Vec::new(), true),
        NodePortAddresses::Cidrs(cidrs) => {
            let mut ips: BTreeSet<IpAddr> = facts
                .agent_addresses
                .iter()
                .chain(node.map(|n| n.internal_ips.as_slice()).unwrap_or_default())
                .copied()
                .filter(|ip| !ip.is_loopback() && cidrs.iter().any(|c| c.contains(ip)))
                .collect();
            ips.retain(|ip| !ip.is_unspecified());
            (ips.into_iter().collect(), false)
        }
    };
    let mut node_port_ips: Vec<String> = node_port_ips
        .iter()
        .filter(|ip| !ip.is_loopback())
        .map(IpAddr::to_string)
        .collect();
    node_port_ips.sort();
    node_port_ips.dedup();
    let (mode, local_pod_cidrs, local_interface) = local_detector(policy, node);
    NodeRules {
        node_name: facts.name.clone(),
        local_pod_cidrs,
        service_cidrs: sorted_strings(&policy.service_cidrs),
        node_port_ips,
        node_port_all_addresses: all,
        masquerade_all: policy.masquerade_all,
        deleting: node.is_some_and(|n| n.deleting),
        detect_local_mode: mode as i32,
        local_interface,
    }
}

/// What tells this node's pods' traffic apart: the mode, the local pod CIDRs (CIDR modes) and
/// the interface or prefix (interface modes). A node without `spec.podCIDRs` in NodeCIDR mode
/// has no detector: nothing is local there, as in kube-proxy for a node without them (which
/// waits for them at start, up to 5 minutes, and then fails).
fn local_detector(
    policy: &ClusterPolicy,
    node: Option<&NodeModel>,
) -> (DetectLocalMode, Vec<String>, String) {
    match &policy.detect_local {
        DetectLocal::ClusterCidr => (
            DetectLocalMode::ClusterCidr,
            sorted_strings(&policy.cluster_cidrs),
            String::new(),
        ),
        DetectLocal::NodeCidr => (
            DetectLocalMode::NodeCidr,
            sorted_strings(node.map(|n| n.pod_cidrs.as_slice()).unwrap_or_default()),
            String::new(),
        ),
        DetectLocal::BridgeInterface(name) => (
            DetectLocalMode::BridgeInterface,
            Vec::new(),
            name.to_string(),
        ),
        DetectLocal::InterfaceNamePrefix(prefix) => (
            DetectLocalMode::InterfaceNamePrefix,
            Vec::new(),
            prefix.to_string(),
        ),
    }
}

/// Why a node has no local-traffic detector in some of `families`, if it lacks one (said in
/// inspection and logged): nothing is local there, so ClusterIP traffic from outside the pod
/// network is not masqueraded and externalTrafficPolicy Local has no pod short-circuit.
pub fn missing_detector(
    policy: &ClusterPolicy,
    node: Option<&NodeModel>,
    families: &[IpFamily],
) -> Option<String> {
    let families = |cidrs: &[IpNet]| {
        families
            .iter()
            .copied()
            .filter(|f| !cidrs.iter().any(|c| family_of(&c.addr()) == *f))
            .map(family_name)
            .collect::<Vec<_>>()
    };
    let (missing, source) = match &policy.detect_local {
        DetectLocal::ClusterCidr => (families(&policy.cluster_cidrs), "no --cluster-cidr"),
        DetectLocal::NodeCidr => (
            families(node.map(|n| n.pod_cidrs.as_slice()).unwrap_or_default()),
            "the Node has no spec.podCIDRs",
        ),
        DetectLocal::BridgeInterface(_) | DetectLocal::InterfaceNamePrefix(_) => return None,
    };
    (!missing.is_empty()).then(|| {
        format!(
            "--detect-local-mode {}: {source} of {}: no local-traffic detector there (traffic to ClusterIPs is not masqueraded, externalTrafficPolicy Local sends pods to local endpoints only)",
            policy.detect_local.mode_name(),
            missing.join(" and ")
        )
    })
}

fn sorted_strings<T: ToString>(items: &[T]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(T::to_string).collect();
    v.sort();
    v.dedup();
    v
}

/// `local` is set only where it matters (see [`PortPlan::uses_locality`]): elsewhere the
/// resource is the same on every node.
fn endpoint(c: &PortCandidate, site: &NodeSite<'_>, locality: bool) -> Endpoint {
    Endpoint {
        ip: c.ip.to_string(),
        port: u32::from(c.port),
        local: locality && c.model.node_name.as_deref() == Some(site.name),
        ready: c.model.conditions.ready,
    }
}

/// loadBalancerSourceRanges as this node enforces them: a range that covers one of the node's
/// own addresses also admits the load-balancer IPs as sources (traffic a node sends to an LB
/// IP it hosts, as upstream does).
fn source_ranges(plan: &PortPlan, node_ips: &[IpAddr]) -> Vec<String> {
    let mut ranges = plan.source_ranges.clone();
    if ranges
        .iter()
        .any(|r| node_ips.iter().any(|ip| r.contains(ip)))
    {
        ranges.extend(plan.load_balancer_ips.iter().map(|&ip| IpNet::from(ip)));
    }
    sorted_strings(&ranges)
}

/// One port as one node enforces it.
pub fn port_rules(plan: &PortPlan, site: &NodeSite<'_>, node_ips: &[IpAddr]) -> ServicePortRules {
    let svc = &plan.service;
    let sel = select::categorize(&plan.candidates, site);
    let locality = plan.uses_locality();
    let pick = |idx: &[usize]| {
        idx.iter()
            .map(|&i| endpoint(&plan.candidates[i], site, locality))
            .collect::<Vec<_>>()
    };
    let local_ready = plan
        .candidates
        .iter()
        .filter(|c| c.model.conditions.ready && c.model.node_name.as_deref() == Some(site.name))
        .count();
    // With internalTrafficPolicy Local and no external path, this node only ever uses its
    // own endpoints: everything about endpoints elsewhere is left out (beyond whether there
    // are any), so that their changes reach only the nodes they are on.
    let cluster_unused = svc.internal_policy == TrafficPolicy::Local
        && plan.port.node_port.is_none()
        && plan.external_ips.is_empty()
        && plan.load_balancer_ips.is_empty();
    let mut serving_ips: Vec<String> = plan
        .candidates
        .iter()
        .filter(|c| c.model.conditions.serving)
        .filter(|c| !cluster_unused || c.model.node_name.as_deref() == Some(site.name))
        .map(|c| c.ip.to_string())
        .collect();
    serving_ips.sort();
    serving_ips.dedup();
    let (cluster_endpoints, endpoints_elsewhere) = if cluster_unused {
        (Vec::new(), !sel.cluster.is_empty())
    } else {
        (pick(&sel.cluster), false)
    };
    ServicePortRules {
        namespace: svc.id.namespace.clone(),
        service: svc.id.name.clone(),
        port_name: plan.port.name.clone(),
        protocol: plan.port.protocol as i32,
        family: plan.family as i32,
        port: u32::from(plan.port.port.get()),
        cluster_ip: plan.cluster_ip.to_string(),
        node_port: plan.port.node_port.map_or(0, |p| u32::from(p.get())),
        external_ips: plan.external_ips.iter().map(IpAddr::to_string).collect(),
        load_balancer_ips: plan
            .load_balancer_ips
            .iter()
            .map(IpAddr::to_string)
            .collect(),
        load_balancer_source_ranges: source_ranges(plan, node_ips),
        external_traffic_local: svc.externally_accessible()
            && svc.external_policy == TrafficPolicy::Local,
        internal_traffic_local: svc.internal_policy == TrafficPolicy::Local,
        affinity: svc
            .affinity_timeout
            .map(|t| SessionAffinity { timeout_seconds: t }),
        cluster_endpoints,
        endpoints_elsewhere,
        local_endpoints: if locality {
            pick(&sel.local)
        } else {
            Vec::new()
        },
        health_check_node_port: plan
            .health_check_node_port
            .map_or(0, |p| u32::from(p.get())),
        local_ready_endpoints: if locality {
            u32::try_from(local_ready).unwrap_or(u32::MAX)
        } else {
            0
        },
        serving_ips,
    }
}

fn explain_port(plan: &PortPlan, site: &NodeSite<'_>) -> Vec<String> {
    let svc = &plan.service;
    let sel = select::categorize(&plan.candidates, site);
    let what = format!(
        "port {:?} {}/{} ({})",
        plan.port.name,
        plan.port.port,
        protocol_name(plan.port.protocol),
        family_name(plan.family)
    );
    let mut notes = vec![format!(
        "{what}: {} candidate endpoints, {} for cluster traffic, {} local",
        plan.candidates.len(),
        sel.cluster.len(),
        sel.local.len()
    )];
    if sel.cluster.is_empty() {
        notes.push(format!(
            "{what}: no usable endpoints: connections are rejected"
        ));
    }
    if sel.cluster_terminating {
        notes.push(format!(
            "{what}: no ready endpoints: falling back to serving, terminating ones"
        ));
    }
    if sel.local_terminating {
        notes.push(format!(
            "{what}: no local ready endpoints: Local policies use local terminating ones"
        ));
    }
    match sel.topology {
        Some(TopologyMode::PreferSameZone) => {
            notes.push(format!("{what}: topology hints: same zone only"))
        }
        Some(TopologyMode::PreferSameNode) => {
            notes.push(format!("{what}: topology hints: same node only"))
        }
        _ => {}
    }
    if svc.internal_policy == TrafficPolicy::Local {
        notes.push(format!(
            "{what}: internalTrafficPolicy Local: ClusterIP traffic goes to local endpoints only{}",
            if sel.local.is_empty() {
                " (none here: dropped)"
            } else {
                ""
            }
        ));
    }
    if svc.externally_accessible() && svc.external_policy == TrafficPolicy::Local {
        notes.push(format!(
            "{what}: externalTrafficPolicy Local: external clients reach local endpoints only, source kept{}; pods and the node itself reach all endpoints",
            if sel.local.is_empty() { " (none here: dropped)" } else { "" }
        ));
    }
    notes
}

#[cfg(test)]
mod tests;
