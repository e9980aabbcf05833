//! One Service port in one IP family: the draft every node shares ([`PortDraft`], planned
//! once per input change by the catalog) and the rules one node finishes from it
//! ([`port_rules`]: local endpoints, topology, the node's own addresses).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;

use ipnet::IpNet;
use kubenft_proto::v1::{
    Endpoint, IpFamily, Protocol, Resource, ServicePortRules, SessionAffinity, resource,
};

use crate::claims::{Claim, Refusal, Via};
use crate::model::{
    EndpointModel, NodeModel, ObjectName, Rejection, ServiceModel, ServicePortModel, SliceModel,
    TrafficPolicy, family_of,
};
use crate::policy::sorted_strings;
use crate::select::{self, Candidate, Site, TopologyMode};

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
pub struct PortDraft {
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

impl PortDraft {
    /// Whether a node's rules for this port depend on which endpoints run on it: a Local
    /// traffic policy that applies (internal, or external on an externally reachable port).
    pub(crate) fn uses_locality(&self) -> bool {
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
    pub plan: PortDraft,
    pub generic: Arc<Resource>,
    pub specific: Specific,
}

impl PlannedPort {
    pub(crate) fn new(plan: PortDraft) -> Self {
        let generic = Arc::new(Resource::versioned(
            plan.name.clone(),
            resource::Kind::ServicePort(port_rules(
                &plan,
                &Site {
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

    pub(crate) fn is_specific_to(&self, node: &str) -> bool {
        match &self.specific {
            Specific::Every => true,
            Specific::Nodes(nodes) => nodes.contains(node),
        }
    }
}

/// What a node's view depends on besides the catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentFacts {
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

pub(crate) fn family_name(f: IpFamily) -> &'static str {
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

pub(crate) fn node_ips(node: Option<&NodeModel>, facts: &AgentFacts) -> Vec<IpAddr> {
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
pub(crate) fn plan_service(
    service: &Arc<ServiceModel>,
    slices: &[&SliceModel],
    refused: &[Refusal],
    is_cluster_ip: impl Fn(&IpAddr) -> bool,
) -> (Vec<PortDraft>, Vec<RefusedEndpoint>) {
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
            plans.push(PortDraft {
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

/// `local` is set only where it matters (see [`PortDraft::uses_locality`]): elsewhere the
/// resource is the same on every node.
fn endpoint(c: &PortCandidate, site: &Site<'_>, locality: bool) -> Endpoint {
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
fn source_ranges(plan: &PortDraft, node_ips: &[IpAddr]) -> Vec<String> {
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
pub fn port_rules(plan: &PortDraft, site: &Site<'_>, node_ips: &[IpAddr]) -> ServicePortRules {
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

pub(crate) fn explain_port(plan: &PortDraft, site: &Site<'_>) -> Vec<String> {
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
