//! Trace: what the rendered rules do with one new connection.
//!
//! The answer is computed from the same elements [`crate::render`] writes into the table,
//! walked in the order the hooks and chains take them:
//!
//! 1. filter at priority -110 (prerouting, output): `firewall-check`, loadBalancerSourceRanges;
//! 2. nat (prerouting dstnat, output -100): `services` finds the entry point (service-ips
//!    first, then NodePorts on the NodePort addresses); its chain marks for masquerade and
//!    picks a dispatch map (the traffic policies and the local-traffic detector);
//! 3. without DNAT, filter (input / forward / output): the no-endpoint maps, then the
//!    ClusterIP and service-CIDR checks;
//! 4. nat postrouting: masquerade what was marked, and hairpin connections.
//!
//! The data are the very elements rendering writes (from [`service_elements`]); the walk
//! mirrors [`crate::render::chain_rules`] rule by rule, so a change to one needs the other
//! (the lab checks the two agree with real connections in every scenario it builds).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;

use ipnet::IpNet;
use kubenft_proto::v1;

use crate::render::{self, service_elements};
use crate::rules::{Family, LocalDetector, NodeRules, Port, Protocol, ServicePort, Spec};
use crate::{AddrKey, Element, EntryChain, EntryKey, NoEndpoint, PortKey, Scope};

/// One new connection, as an operator asks about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: Protocol,
    pub port: Port,
    /// The interface the packet enters through (interface local-traffic modes only).
    pub interface: Option<String>,
}

/// A request field that cannot be traced, named as the request spells it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FlowError {
    pub field: &'static str,
    pub reason: String,
}

impl Flow {
    /// Reads and checks a request's flow fields (`node` is the caller's business).
    pub fn from_request(req: &v1::TraceRequest) -> Result<Flow, FlowError> {
        let fail = |field: &'static str, reason: String| FlowError { field, reason };
        let addr = |field: &'static str, text: &str| {
            text.parse::<IpAddr>()
                .map_err(|_| fail(field, format!("{text:?} is not an IP address")))
        };
        let source = addr("source", &req.source)?;
        let destination = addr("destination", &req.destination)?;
        if Family::of(source) != Family::of(destination) {
            return Err(fail(
                "source",
                format!("{source} is not of the family of destination {destination}"),
            ));
        }
        let port = u16::try_from(req.port)
            .ok()
            .and_then(Port::new)
            .ok_or_else(|| fail("port", format!("{} is not a port (1-65535)", req.port)))?;
        let protocol = match v1::Protocol::try_from(req.protocol) {
            Ok(v1::Protocol::Tcp) => Protocol::Tcp,
            Ok(v1::Protocol::Udp) => Protocol::Udp,
            Ok(v1::Protocol::Sctp) => Protocol::Sctp,
            _ => {
                return Err(fail(
                    "protocol",
                    format!("{} is not TCP, UDP or SCTP", req.protocol),
                ));
            }
        };
        let interface = match req.interface.as_str() {
            "" => None,
            name => {
                kubenft_proto::check_interface_name(name)
                    .map_err(|why| fail("interface", format!("{name:?} {why}")))?;
                Some(name.to_owned())
            }
        };
        Ok(Flow {
            source,
            destination,
            protocol,
            port,
            interface,
        })
    }

    fn family(&self) -> Family {
        Family::of(self.destination)
    }
}

/// What the rules do with the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Dnat,
    Reject,
    Drop,
    NotService,
}

/// The answer: the verdict, where DNAT may send the connection, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub verdict: Verdict,
    /// Every endpoint a new connection may reach, sorted (DNAT only).
    pub endpoints: Vec<SocketAddr>,
    /// The source is rewritten on every connection (DNAT only).
    pub masquerade: bool,
    /// Endpoints that are the source itself, when not every connection is masqueraded: a
    /// connection reaching one is masqueraded (hairpin).
    pub hairpin: Vec<SocketAddr>,
    pub steps: Vec<String>,
    /// The resource whose entry point matched.
    pub service_port: Option<String>,
}

impl Trace {
    pub fn to_response(&self, node: &str, system_version: &str) -> v1::TraceResponse {
        let verdict = match self.verdict {
            Verdict::Dnat => v1::TraceVerdict::Dnat,
            Verdict::Reject => v1::TraceVerdict::Reject,
            Verdict::Drop => v1::TraceVerdict::Drop,
            Verdict::NotService => v1::TraceVerdict::NotService,
        };
        let texts = |v: &[SocketAddr]| v.iter().map(ToString::to_string).collect();
        v1::TraceResponse {
            node: node.to_owned(),
            verdict: verdict as i32,
            endpoints: texts(&self.endpoints),
            masquerade: self.masquerade,
            hairpin_endpoints: texts(&self.hairpin),
            steps: self.steps.clone(),
            service_port: self.service_port.clone().unwrap_or_default(),
            system_version: system_version.to_owned(),
        }
    }
}

/// What a node enforces: its validated resources by name, and the node's own addresses
/// (what `fib … type local` matches, loopback aside).
pub struct NodeView<'a> {
    pub resources: Vec<(&'a str, &'a Spec)>,
    pub addresses: &'a [IpAddr],
}

/// Traces `flow` through the rules of `view`.
pub fn trace(view: &NodeView<'_>, flow: &Flow) -> Trace {
    let tables = Tables::build(view, flow.family());
    Tracer {
        t: &tables,
        flow,
        addresses: view.addresses,
        steps: Vec::new(),
    }
    .run()
}

/// One family's maps and sets, as the table holds them, each element with the resource that
/// put it there.
#[derive(Default)]
struct Tables<'a> {
    node: NodeRules,
    ports: BTreeMap<&'a str, &'a ServicePort>,
    service_ips: BTreeMap<AddrKey, (EntryChain, &'a str)>,
    node_ports: BTreeMap<PortKey, (Scope, &'a str)>,
    dispatch: BTreeMap<(Scope, EntryKey), Option<NonZeroU32>>,
    backends: BTreeMap<(Scope, EntryKey), BTreeSet<SocketAddr>>,
    no_endpoint: BTreeMap<EntryKey, (NoEndpoint, &'a str)>,
    firewall: BTreeMap<AddrKey, Vec<IpNet>>,
    cluster_ips: BTreeSet<IpAddr>,
    hairpin: BTreeSet<IpAddr>,
}

impl<'a> Tables<'a> {
    fn build(view: &NodeView<'a>, family: Family) -> Tables<'a> {
        let mut t = Tables::default();
        for &(name, spec) in &view.resources {
            match spec {
                Spec::Node(node) => t.node = node.clone(),
                Spec::NodeEndpoints(ips) => t
                    .hairpin
                    .extend(ips.iter().copied().filter(|ip| Family::of(*ip) == family)),
                Spec::ServicePort(sp) if sp.family == family => {
                    t.ports.insert(name, sp);
                    for e in service_elements(sp) {
                        t.add(name, e);
                    }
                }
                Spec::ServicePort(_) => {}
            }
        }
        t
    }

    fn add(&mut self, owner: &'a str, e: Element) {
        match e {
            Element::ClusterIp(ip) => {
                self.cluster_ips.insert(ip);
            }
            Element::Hairpin(ip) => {
                self.hairpin.insert(ip);
            }
            Element::ServiceIp(k, chain) => {
                self.service_ips.insert(k, (chain, owner));
            }
            Element::ServiceNodePort(k, scope) => {
                self.node_ports.insert(k, (scope, owner));
            }
            Element::Dispatch(scope, key, _, affinity) => {
                self.dispatch.insert((scope, key), affinity);
            }
            Element::Backend {
                scope,
                key,
                addr,
                port,
                ..
            } => {
                self.backends
                    .entry((scope, key))
                    .or_default()
                    .insert(SocketAddr::new(addr, port.get()));
            }
            Element::NoEndpoint(k, what) => {
                self.no_endpoint.insert(k, (what, owner));
            }
            Element::FirewallIp(k) => {
                self.firewall.entry(k).or_default();
            }
            Element::FirewallAllow(k, net) => self.firewall.entry(k).or_default().push(net),
            Element::LocalPodCidr(_)
            | Element::ServiceCidr(_)
            | Element::NodePortIp(_)
            | Element::Generation(_) => {}
        }
    }
}

/// Where the `services` chain sent the packet.
#[derive(Clone, Copy)]
enum Entry {
    /// A service-ips element: ClusterIP, external or load-balancer IP.
    Ip(EntryChain),
    /// A service-nodeports element, with its externalTrafficPolicy.
    NodePort(Scope),
}

struct Tracer<'t, 'a> {
    t: &'t Tables<'a>,
    flow: &'t Flow,
    addresses: &'t [IpAddr],
    steps: Vec<String>,
}

impl<'a> Tracer<'_, 'a> {
    fn step(&mut self, text: String) {
        self.steps.push(text);
    }

    fn done(&mut self, verdict: Verdict, service_port: Option<&str>) -> Trace {
        Trace {
            verdict,
            endpoints: Vec::new(),
            masquerade: false,
            hairpin: Vec::new(),
            steps: std::mem::take(&mut self.steps),
            service_port: service_port.map(str::to_owned),
        }
    }

    fn run(mut self) -> Trace {
        let f = self.flow;
        let host = self.is_host(f.source);
        if host {
            self.step(format!(
                "source {} is an address of this node: the node's own traffic (output hooks)",
                f.source
            ));
        } else {
            self.step(format!(
                "source {} is not an address of this node: traffic arriving on an interface (prerouting)",
                f.source
            ));
        }
        let key = AddrKey {
            addr: f.destination,
            proto: f.protocol,
            port: f.port,
        };
        if let Some(trace) = self.source_ranges(key) {
            return trace;
        }
        let Some((entry_key, entry, owner)) = self.entry_point(key) else {
            return self.not_dnated(key, host, None);
        };
        let local = self.is_local(host);
        let mut mark = false;
        let chosen = match entry {
            Entry::Ip(EntryChain::SvcCluster) | Entry::Ip(EntryChain::SvcLocal) => {
                mark = self.cluster_ip_masquerade(local);
                let scope = if matches!(entry, Entry::Ip(EntryChain::SvcLocal)) {
                    self.step("internalTrafficPolicy Local: only endpoints on this node".into());
                    Scope::Local
                } else {
                    self.step("internalTrafficPolicy Cluster: every endpoint".into());
                    Scope::Cluster
                };
                self.dispatch(scope, entry_key)
            }
            Entry::Ip(EntryChain::ExtCluster) | Entry::NodePort(Scope::Cluster) => {
                mark = true;
                self.step(
                    "externalTrafficPolicy Cluster: every endpoint; source masqueraded".into(),
                );
                self.dispatch(Scope::Cluster, entry_key)
            }
            Entry::Ip(EntryChain::ExtLocal) | Entry::NodePort(Scope::Local) => {
                self.external_local(entry_key, local, host, &mut mark)
            }
        };
        match chosen {
            Some(scope) => self.dnat(scope, entry_key, owner, mark),
            None => self.not_dnated(key, host, Some(owner)),
        }
    }

    /// The node's own traffic: a source the node holds (`fib saddr type local`).
    fn is_host(&self, addr: IpAddr) -> bool {
        addr.is_loopback() || self.addresses.contains(&addr)
    }

    /// loadBalancerSourceRanges, checked before DNAT for every source.
    fn source_ranges(&mut self, key: AddrKey) -> Option<Trace> {
        let allowed = self.t.firewall.get(&key)?;
        let owner = self.t.service_ips.get(&key).map(|(_, o)| *o).or_else(|| {
            self.t
                .no_endpoint
                .get(&EntryKey::Addr(key))
                .map(|(_, o)| *o)
        });
        let ranges = list(allowed);
        let src = self.flow.source;
        match allowed.iter().find(|net| net.contains(&src)) {
            Some(net) => {
                self.step(format!(
                    "load-balancer IP with loadBalancerSourceRanges [{ranges}]: source in {net}, allowed"
                ));
                None
            }
            None => {
                self.step(format!(
                    "load-balancer IP with loadBalancerSourceRanges [{ranges}]: source {src} is in none of them: dropped"
                ));
                Some(self.done(Verdict::Drop, owner))
            }
        }
    }

    /// The `services` chain: a service-ips element, else a NodePort on a NodePort address.
    fn entry_point(&mut self, key: AddrKey) -> Option<(EntryKey, Entry, &'a str)> {
        let f = self.flow;
        if let Some(&(chain, owner)) = self.t.service_ips.get(&key) {
            let what = self.address_kind(owner, f.destination);
            self.step(format!(
                "{} port {}/{} is the {what} of Service port {owner}",
                f.destination,
                f.port,
                upper(f.protocol)
            ));
            return Some((EntryKey::Addr(key), Entry::Ip(chain), owner));
        }
        let pk = PortKey {
            proto: f.protocol,
            port: f.port,
        };
        let &(scope, owner) = self.t.node_ports.get(&pk)?;
        if !self.node_port_address(f.destination) {
            if !self.is_host(f.destination) {
                return None;
            }
            self.step(format!(
                "{}/{} is the NodePort of Service port {owner}, but {} is not an address NodePorts are served on ({})",
                f.port,
                upper(f.protocol),
                f.destination,
                self.node_port_addresses()
            ));
            return None;
        }
        self.step(format!(
            "NodePort {}/{} of Service port {owner}, on {} ({})",
            f.port,
            upper(f.protocol),
            f.destination,
            self.node_port_addresses()
        ));
        Some((EntryKey::NodePort(pk), Entry::NodePort(scope), owner))
    }

    /// Which of a Service port's addresses `addr` is.
    fn address_kind(&self, owner: &str, addr: IpAddr) -> &'static str {
        match self.t.ports.get(owner) {
            Some(sp) if sp.cluster_ip == Some(addr) => "ClusterIP",
            Some(sp) if sp.external_ips.contains(&addr) => "external IP",
            Some(sp) if sp.load_balancer_ips.contains(&addr) => "load-balancer IP",
            _ => "address",
        }
    }

    /// The `services` chain's NodePort match: `fib daddr type local` minus loopback, or the
    /// node-port-ips set.
    fn node_port_address(&self, addr: IpAddr) -> bool {
        if self.t.node.node_port_all_addresses {
            !addr.is_loopback() && self.addresses.contains(&addr)
        } else {
            self.t.node.node_port_ips(Family::of(addr)).contains(&addr)
        }
    }

    fn node_port_addresses(&self) -> String {
        if self.t.node.node_port_all_addresses {
            return "NodePorts on every address of the node but loopback".into();
        }
        let ips = self.t.node.node_port_ips(self.flow.family());
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        format!("NodePort addresses [{}]", ips.join(", "))
    }

    /// Whether the local-traffic detector calls the source one of this node's pods.
    fn is_local(&mut self, host: bool) -> bool {
        let f = self.flow;
        let family = f.family();
        match self.t.node.local_detector.clone() {
            LocalDetector::Cidrs => {
                let cidrs = self.t.node.local_pod_cidrs(family);
                if cidrs.is_empty() {
                    self.step(format!(
                        "no local-traffic detector for {} (no pod CIDR of this family): no source counts as this node's pods",
                        family.label()
                    ));
                    return false;
                }
                let local = cidrs.iter().any(|n| n.contains(&f.source));
                let (is, from) = if local {
                    ("is", "from this node's pods")
                } else {
                    ("is not", "not from this node's pods")
                };
                self.step(format!(
                    "source {is} in the local pod CIDRs [{}]: {from}",
                    list(&cidrs)
                ));
                local
            }
            LocalDetector::Bridge(name) => {
                self.entering(host, name.as_str(), |i| i == name.as_str())
            }
            LocalDetector::Prefix(prefix) => {
                let p = format!("{}*", prefix.as_str());
                self.entering(host, &p, |i| i.starts_with(prefix.as_str()))
            }
        }
    }

    /// The interface modes: the node's own traffic enters through no interface; a packet from
    /// elsewhere through `interface` if given, else a pod's if the source is an endpoint here.
    fn entering(&mut self, host: bool, pattern: &str, matches: impl Fn(&str) -> bool) -> bool {
        let f = self.flow;
        if host {
            self.step(format!(
                "the node's own traffic enters through no interface: not pod traffic (detector iifname {pattern})"
            ));
            return false;
        }
        if let Some(i) = &f.interface {
            let local = matches(i);
            let is = if local { "is" } else { "is not" };
            self.step(format!(
                "entering through {i}: {is} this node's pod traffic (detector iifname {pattern})"
            ));
            return local;
        }
        let local = self.t.hairpin.contains(&f.source);
        if local {
            self.step(format!(
                "no interface given: assumed to enter through a pod interface ({pattern}), as the source is an endpoint on this node"
            ));
        } else {
            self.step(format!(
                "no interface given: assumed not to enter through a pod interface ({pattern}), as the source is no endpoint on this node"
            ));
        }
        local
    }

    /// `svc-cluster` / `svc-local`: whether ClusterIP traffic is marked for masquerade.
    fn cluster_ip_masquerade(&mut self, local: bool) -> bool {
        let family = self.flow.family();
        if self.t.node.masquerade_all {
            self.step("--masquerade-all: source masqueraded".into());
            true
        } else if render::local_traffic(&self.t.node, family).is_none() {
            self.step("no local-traffic detector: source kept".into());
            false
        } else if local {
            self.step("from this node's pods: source kept".into());
            false
        } else {
            self.step("not from this node's pods: source masqueraded".into());
            true
        }
    }

    /// `ext-local` / `np-local`: pods and the node itself reach every endpoint (the node's
    /// own traffic masqueraded); other clients only this node's endpoints, source kept.
    fn external_local(
        &mut self,
        key: EntryKey,
        local: bool,
        host: bool,
        mark: &mut bool,
    ) -> Option<Scope> {
        if local && self.t.dispatch.contains_key(&(Scope::Cluster, key)) {
            self.step(
                "externalTrafficPolicy Local, but from this node's pods: every endpoint, source kept"
                    .into(),
            );
            return Some(Scope::Cluster);
        }
        if host {
            *mark = true;
            if self.t.dispatch.contains_key(&(Scope::Cluster, key)) {
                self.step(
                    "externalTrafficPolicy Local, but the node's own traffic: every endpoint, source masqueraded"
                        .into(),
                );
                return Some(Scope::Cluster);
            }
        }
        self.step("externalTrafficPolicy Local: only endpoints on this node, source kept".into());
        self.dispatch(Scope::Local, key)
    }

    /// A dispatch element for `scope`, if the map holds one.
    fn dispatch(&mut self, scope: Scope, key: EntryKey) -> Option<Scope> {
        if self.t.dispatch.contains_key(&(scope, key)) {
            return Some(scope);
        }
        let which = match scope {
            Scope::Cluster => "no endpoint",
            Scope::Local => "no endpoint on this node",
        };
        self.step(format!("{which}: not redirected"));
        None
    }

    /// DNAT to the dispatch map's endpoints, and whether the source is rewritten.
    fn dnat(mut self, scope: Scope, key: EntryKey, owner: &str, mark: bool) -> Trace {
        let endpoints: Vec<SocketAddr> = self
            .t
            .backends
            .get(&(scope, key))
            .map(|b| b.iter().copied().collect())
            .unwrap_or_default();
        if let Some(sp) = self.t.ports.get(owner) {
            let eps = match scope {
                Scope::Cluster => &sp.cluster_endpoints,
                Scope::Local => &sp.local_endpoints,
            };
            if !eps.is_empty() && eps.iter().all(|e| !e.ready) {
                self.step(
                    "no ready endpoint: falling back to serving endpoints that are terminating"
                        .into(),
                );
            }
        }
        self.step(format!(
            "DNAT to one of {} endpoint{}, chosen at random per new connection",
            endpoints.len(),
            if endpoints.len() == 1 { "" } else { "s" }
        ));
        if let Some(Some(timeout)) = self.t.dispatch.get(&(scope, key)) {
            self.step(format!(
                "ClientIP session affinity: a client that connected within {timeout} s returns to the same endpoint"
            ));
        }
        let src = self.flow.source;
        let hairpin: Vec<SocketAddr> = if mark || !self.t.hairpin.contains(&src) {
            Vec::new()
        } else {
            endpoints
                .iter()
                .copied()
                .filter(|e| e.ip() == src)
                .collect()
        };
        let masquerade = mark || (!hairpin.is_empty() && hairpin.len() == endpoints.len());
        if !hairpin.is_empty() {
            self.step(format!(
                "hairpin: a connection from {src} back to itself is masqueraded"
            ));
        }
        let mut trace = self.done(Verdict::Dnat, Some(owner));
        trace.endpoints = endpoints;
        trace.masquerade = masquerade;
        trace.hairpin = if masquerade { Vec::new() } else { hairpin };
        trace
    }

    /// No DNAT: the filter hooks the packet passes next decide. The node's own traffic passes
    /// output (and input when it is for the node itself); other traffic input if it is for
    /// the node, else forward.
    fn not_dnated(mut self, key: AddrKey, host: bool, owner: Option<&'a str>) -> Trace {
        let dst = self.flow.destination;
        let for_node = self.is_host(dst);
        let mut checks = Vec::new();
        if host || !for_node {
            checks.extend([Check::NoEndpointServices, Check::ClusterIps]);
        }
        if for_node {
            checks.extend([Check::NoEndpointNodePorts, Check::NoEndpointServices]);
        }
        for check in checks {
            if let Some(verdict) = self.check(check, key) {
                let owner = owner.or_else(|| self.no_endpoint_owner(check, key));
                return self.done(verdict, owner);
            }
        }
        self.step("no rule of kubenft applies: passed unchanged".into());
        self.done(Verdict::NotService, owner)
    }

    fn no_endpoint_owner(&self, check: Check, key: AddrKey) -> Option<&'a str> {
        let k = match check {
            Check::NoEndpointServices => EntryKey::Addr(key),
            Check::NoEndpointNodePorts => EntryKey::NodePort(PortKey {
                proto: key.proto,
                port: key.port,
            }),
            Check::ClusterIps => return None,
        };
        self.t.no_endpoint.get(&k).map(|(_, o)| *o)
    }

    fn check(&mut self, check: Check, key: AddrKey) -> Option<Verdict> {
        let dst = key.addr;
        match check {
            Check::NoEndpointServices => self.no_endpoint(EntryKey::Addr(key)),
            Check::NoEndpointNodePorts if self.node_port_address(dst) => {
                self.no_endpoint(EntryKey::NodePort(PortKey {
                    proto: key.proto,
                    port: key.port,
                }))
            }
            Check::NoEndpointNodePorts => None,
            Check::ClusterIps if self.t.cluster_ips.contains(&dst) => {
                self.step(format!(
                    "{dst} is a ClusterIP without a Service port {}/{}: rejected",
                    key.port,
                    upper(key.proto)
                ));
                Some(Verdict::Reject)
            }
            Check::ClusterIps => {
                let cidrs = self.t.node.service_cidrs(Family::of(dst));
                let net = cidrs.iter().find(|n| n.contains(&dst))?;
                self.step(format!(
                    "{dst} is in the service CIDR {net} but no Service holds it: dropped"
                ));
                Some(Verdict::Drop)
            }
        }
    }

    fn no_endpoint(&mut self, key: EntryKey) -> Option<Verdict> {
        let &(what, owner) = self.t.no_endpoint.get(&key)?;
        Some(match what {
            NoEndpoint::Reject => {
                self.step(format!(
                    "Service port {owner} has no usable endpoint: rejected"
                ));
                Verdict::Reject
            }
            NoEndpoint::Drop => {
                self.step(format!(
                    "Service port {owner} has endpoints, none on this node as its Local policy needs: dropped"
                ));
                Verdict::Drop
            }
        })
    }
}

/// The filter hooks' checks of traffic that was not redirected.
#[derive(Clone, Copy)]
enum Check {
    /// `service-endpoints-check`: the no-endpoint-services map.
    NoEndpointServices,
    /// `nodeport-endpoints-check`: the no-endpoint-nodeports map on NodePort addresses.
    NoEndpointNodePorts,
    /// `cluster-ips-check`: a ClusterIP without that port, an unallocated service address.
    ClusterIps,
}

fn upper(p: Protocol) -> String {
    p.to_string().to_uppercase()
}

/// Nets as `a, b`.
fn list(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
