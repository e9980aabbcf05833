//! Validated, Kubernetes-independent views of Services, EndpointSlices and Nodes.
//!
//! Everything the planner reads comes through here: each Kubernetes object is checked once and
//! turned into a small typed value in which addresses are `IpAddr`, ports are non-zero `u16`
//! and policies are enums. An object that cannot be proxied correctly is refused as a whole with
//! a [`Rejection`] naming the object and the field, so no user-controlled string ever reaches
//! the agents unparsed. A bad part of an otherwise usable object (one ClusterIP outside
//! `--service-cidr`, one external IP, a healthCheckNodePort, one endpoint) is refused alone:
//! the rest of the object keeps working.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU16;
use std::ops::RangeInclusive;
use std::sync::Arc;

use imbl::OrdMap;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, NodeSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kubenft_proto::v1::{IpFamily, Protocol};

/// The label that hands a Service to another proxy (kube-proxy ignores such Services).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label that marks a Service as headless for proxies.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The node label carrying its zone, for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// When the change behind an EndpointSlice's current endpoints happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Why an object (or one of its fields) was refused.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejection {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub message: String,
}

impl Rejection {
    fn new(
        kind: &'static str,
        meta: &ObjectName,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Rejection {
            kind,
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}",
            self.kind,
            clip(&self.namespace),
            clip(&self.name)
        )?;
        if !self.field.is_empty() {
            write!(f, " field {}", one_line(&self.field))?;
        }
        write!(f, ": {}", one_line(&self.message))
    }
}

/// Shortens a user-controlled string for messages: a 100 KB name must not make a 100 KB log
/// line, and a name with a newline must not split one (control characters are escaped).
pub fn clip(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return one_line(s).into_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", one_line(&s[..end]), s.len())
}

/// `s` with control characters escaped (`\n`, `\u{1b}`), so it stays on one line.
pub fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Namespace and name as given (possibly invalid: only for messages until validated).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a Service is exposed beyond its ClusterIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortModel {
    /// Port name; matched against EndpointSlice port names (targetPort is never read).
    pub name: String,
    pub protocol: Protocol,
    pub port: NonZeroU16,
    pub node_port: Option<NonZeroU16>,
    /// Index in `spec.ports`, for messages.
    pub index: usize,
}

/// Which endpoints a traffic policy may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// A Service kubenft proxies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceModel {
    pub id: ObjectName,
    pub service_type: ServiceType,
    /// ClusterIPs, at most one per family, primary family first.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortModel>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` whose ipMode is VIP or unset.
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    /// ClientIP session affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub health_check_node_port: Option<NonZeroU16>,
    /// `metadata.creationTimestamp`: which of two Services claiming the same address or
    /// NodePort gets it when neither already holds it (the older; one without a timestamp
    /// comes after every one with).
    pub created: Option<Timestamp>,
}

impl ServiceModel {
    /// Whether externalTrafficPolicy applies (NodePort, LoadBalancer, externalIPs).
    pub fn externally_accessible(&self) -> bool {
        self.service_type != ServiceType::ClusterIp
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// What became of a Service object.
#[derive(Debug)]
pub enum ServiceOutcome {
    /// Proxied, with the parts of it refused (each named by its field).
    Proxied(ServiceModel, Vec<Rejection>),
    /// Not for us (headless, ExternalName, another proxy's); says why.
    Ignored(String),
    Rejected(Rejection),
}

/// Endpoint conditions as EndpointSlices define them (nil ready/serving mean true).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointModel {
    /// Index in the slice's `endpoints`, for messages.
    pub index: usize,
    pub ip: IpAddr,
    pub conditions: Conditions,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// Topology hints (None: no hints of that kind).
    pub zone_hints: Option<BTreeSet<String>>,
    pub node_hints: Option<BTreeSet<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: NonZeroU16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceModel {
    pub id: ObjectName,
    /// The Service this slice belongs to (same namespace).
    pub service: String,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointModel>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, Unix ms.
    pub trigger_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeModel {
    pub name: String,
    /// InternalIP addresses, at most one per family, in the order given.
    pub internal_ips: Vec<IpAddr>,
    pub zone: Option<String>,
    /// Being deleted: load balancers should drain it.
    pub deleting: bool,
    /// `spec.podCIDRs` (else `spec.podCIDR`): at most one per family, in the order given.
    /// Empty if the node has none, or if they are invalid (refused as the API server would).
    pub pod_cidrs: Vec<IpNet>,
}

/// The cluster-wide limits that validation enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    pub node_port_range: RangeInclusive<u16>,
    /// `--service-cidr`: a ClusterIP must lie in one of those of its family (no check for a
    /// family none of them is of).
    pub service_cidrs: Vec<IpNet>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            node_port_range: 30000..=32767,
            service_cidrs: Vec::new(),
        }
    }
}

/// Why an address can be neither a Service's nor an endpoint's, if it cannot: what upstream's
/// `ValidateNonSpecialIP` refuses (unspecified, loopback, link-local unicast and multicast),
/// and what is never one host's address (any multicast, the IPv4 broadcast address, an
/// IPv4-mapped IPv6 address, which the API server does not take as IPv6 either).
pub fn special_address(ip: &IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() {
                Some("unspecified")
            } else if v4.is_loopback() {
                Some("in the loopback range 127.0.0.0/8")
            } else if v4.is_link_local() {
                Some("in the link-local range 169.254.0.0/16")
            } else if v4.is_broadcast() {
                Some("the broadcast address")
            } else if v4.is_multicast() {
                Some("multicast (224.0.0.0/4)")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.to_ipv4_mapped().is_some() {
                Some("an IPv4-mapped IPv6 address")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("the loopback address ::1")
            } else if v6.is_unicast_link_local() {
                Some("in the link-local range fe80::/10")
            } else if v6.is_multicast() {
                Some("multicast (ff00::/8)")
            } else {
                None
            }
        }
    }
}

/// The family of an address.
pub fn family_of(ip: &IpAddr) -> IpFamily {
    match ip {
        IpAddr::V4(_) => IpFamily::Ipv4,
        IpAddr::V6(_) => IpFamily::Ipv6,
    }
}

/// Parses an IP literal. Legacy IPv4 literals with leading zeros ("010.000.001.002") are read as
/// decimal, as upstream does for objects created before validation tightened.
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    parse_legacy_ipv4(s).map(IpAddr::V4)
}

fn parse_legacy_ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// Parses a CIDR, accepting legacy leading zeros in IPv4 and trimming whitespace; the result is
/// normalised to its network address.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    let (addr, len) = s.split_once('/')?;
    let ip = parse_ip(addr)?;
    let len: u8 = len
        .trim_start_matches('0')
        .parse()
        .or_else(|_| {
            if len.bytes().all(|b| b == b'0') && !len.is_empty() {
                Ok(0)
            } else {
                Err(())
            }
        })
        .ok()?;
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

/// DNS-1123 label: what namespaces, Service names and port names must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// DNS-1123 subdomain: what EndpointSlice and Node names must be.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn parse_protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn port_number(value: i32) -> Option<NonZeroU16> {
    u16::try_from(value).ok().and_then(NonZeroU16::new)
}

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectName {
    ObjectName {
        namespace: meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

fn check_name(kind: &'static str, id: &ObjectName, subdomain: bool) -> Result<(), Rejection> {
    if !is_dns_label(&id.namespace) {
        return Err(Rejection::new(
            kind,
            id,
            "metadata.namespace",
            "must be a DNS-1123 label (lowercase alphanumerics and '-', at most 63 characters)",
        ));
    }
    let ok = if subdomain {
        is_dns_subdomain(&id.name)
    } else {
        is_dns_label(&id.name)
    };
    if !ok {
        let rule = if subdomain {
            "a DNS-1123 subdomain (at most 253 characters)"
        } else {
            "a DNS-1123 label (lowercase alphanumerics and '-', at most 63 characters)"
        };
        return Err(Rejection::new(
            kind,
            id,
            "metadata.name",
            format!("must be {rule}"),
        ));
    }
    Ok(())
}

/// Checks a Service and turns it into what the planner needs.
pub fn service(svc: &Service, limits: &Limits) -> ServiceOutcome {
    let id = object_name(&svc.metadata);
    let reject = |field: String, message: String| {
        ServiceOutcome::Rejected(Rejection::new("Service", &id, field, message))
    };
    if let Err(r) = check_name("Service", &id, false) {
        return ServiceOutcome::Rejected(r);
    }
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL)) {
        return ServiceOutcome::Ignored(format!(
            "labelled {SERVICE_PROXY_NAME_LABEL}: served by another proxy"
        ));
    }
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return ServiceOutcome::Ignored(format!("labelled {HEADLESS_LABEL}"));
    }
    let Some(spec) = svc.spec.as_ref() else {
        return reject("spec".into(), "missing".into());
    };
    let service_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIp,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => {
            return ServiceOutcome::Ignored("type ExternalName has no proxy rules".into());
        }
        other => {
            return reject(
                "spec.type".into(),
                format!("unknown type {:?}", clip(other)),
            );
        }
    };

    // ClusterIPs: `clusterIPs` wins when present; `clusterIP` is its first element.
    let raw_ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => Vec::new(),
    };
    if raw_ips.first().is_some_and(|ip| ip == "None") {
        return ServiceOutcome::Ignored("headless (clusterIP None)".into());
    }
    if raw_ips.is_empty() || raw_ips[0].is_empty() {
        return reject(
            "spec.clusterIP".into(),
            "missing: a proxied Service needs a ClusterIP".into(),
        );
    }
    // Parts refused alone: the rest of the Service is proxied.
    let mut problems = Vec::new();
    let problem = |field: String, message: String| Rejection::new("Service", &id, field, message);
    let mut cluster_ips = Vec::new();
    let mut families = Vec::new();
    for (i, raw) in raw_ips.iter().enumerate() {
        let field = if spec.cluster_ips.as_ref().is_some_and(|v| !v.is_empty()) {
            format!("spec.clusterIPs[{i}]")
        } else {
            "spec.clusterIP".to_owned()
        };
        let Some(ip) = parse_ip(raw) else {
            return reject(field, format!("{:?} is not a valid IP address", clip(raw)));
        };
        if families.contains(&family_of(&ip)) {
            return reject(field, "two ClusterIPs of the same family".into());
        }
        families.push(family_of(&ip));
        // An address that is not a Service's must never become one: the other ClusterIP (if
        // any) is still served.
        if let Some(why) = special_address(&ip) {
            problems.push(problem(
                field,
                format!("{ip} cannot be a ClusterIP: it is {why}"),
            ));
            continue;
        }
        let mut ranges = limits
            .service_cidrs
            .iter()
            .filter(|n| family_of(&n.addr()) == family_of(&ip))
            .peekable();
        if ranges.peek().is_some() && !ranges.any(|n| n.contains(&ip)) {
            problems.push(problem(
                field,
                format!("{ip} is outside every --service-cidr of its family"),
            ));
            continue;
        }
        cluster_ips.push(ip);
    }
    if cluster_ips.is_empty() {
        return ServiceOutcome::Rejected(problems.swap_remove(0));
    }

    let mut ports = Vec::new();
    let wants_node_ports = service_type != ServiceType::ClusterIp;
    for (index, p) in spec.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("spec.ports[{index}].{f}");
        let name = p.name.clone().unwrap_or_default();
        if !name.is_empty() && !is_dns_label(&name) {
            return reject(field("name"), "must be a DNS-1123 label".into());
        }
        let Some(protocol) = parse_protocol(p.protocol.as_deref()) else {
            return reject(
                field("protocol"),
                format!(
                    "{:?} is not TCP, UDP or SCTP",
                    clip(p.protocol.as_deref().unwrap_or(""))
                ),
            );
        };
        let Some(port) = port_number(p.port) else {
            return reject(field("port"), format!("{} is outside 1-65535", p.port));
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(np) if !wants_node_ports => {
                // The API server clears nodePorts of ClusterIP Services; a manifest may still carry one.
                let _ = np;
                None
            }
            Some(np) => match u16::try_from(np)
                .ok()
                .filter(|n| limits.node_port_range.contains(n))
            {
                Some(n) => NonZeroU16::new(n),
                None => {
                    return reject(
                        field("nodePort"),
                        format!(
                            "{np} is outside the node port range {}-{}",
                            limits.node_port_range.start(),
                            limits.node_port_range.end()
                        ),
                    );
                }
            },
        };
        if ports
            .iter()
            .any(|q: &ServicePortModel| q.name == name && q.protocol == protocol)
        {
            return reject(
                field("name"),
                format!("duplicate port name {name:?} for the same protocol"),
            );
        }
        // As the API server: two ports of one Service cannot serve the same port or nodePort
        // of a protocol (they would be the same rules).
        if let Some(q) = ports
            .iter()
            .find(|q: &&ServicePortModel| q.port == port && q.protocol == protocol)
        {
            return reject(
                field("port"),
                format!(
                    "port {port} is also spec.ports[{}] for the same protocol",
                    q.index
                ),
            );
        }
        if let Some(q) = ports.iter().find(|q: &&ServicePortModel| {
            node_port.is_some() && q.node_port == node_port && q.protocol == protocol
        }) {
            return reject(
                field("nodePort"),
                format!(
                    "nodePort {} is also spec.ports[{}] for the same protocol",
                    node_port.map_or(0, NonZeroU16::get),
                    q.index
                ),
            );
        }
        ports.push(ServicePortModel {
            name,
            protocol,
            port,
            node_port,
            index,
        });
    }
    if ports.is_empty() {
        return reject(
            "spec.ports".into(),
            "a proxied Service needs at least one port".into(),
        );
    }

    // One unusable external or load-balancer IP is refused alone.
    let usable = |raw: &str, field: String, problems: &mut Vec<Rejection>| match parse_ip(raw) {
        Some(ip) => match special_address(&ip) {
            None => Some(ip),
            Some(why) => {
                problems.push(problem(field, format!("{ip} is {why}: not served")));
                None
            }
        },
        None => {
            problems.push(problem(
                field,
                format!("{:?} is not an IP address", clip(raw)),
            ));
            None
        }
    };
    let mut external_ips = Vec::new();
    for (i, raw) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.extend(usable(raw, format!("spec.externalIPs[{i}]"), &mut problems));
    }
    let mut load_balancer_ips = Vec::new();
    if service_type == ServiceType::LoadBalancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(raw) = ing.ip.as_deref() else {
                continue;
            };
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            load_balancer_ips.extend(usable(
                raw,
                format!("status.loadBalancer.ingress[{i}].ip"),
                &mut problems,
            ));
        }
    }
    let mut load_balancer_source_ranges = Vec::new();
    for (i, raw) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match parse_cidr(raw) {
            Some(net) => load_balancer_source_ranges.push(net),
            None => {
                return reject(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{:?} is not a CIDR", clip(raw)),
                );
            }
        }
    }
    external_ips.sort();
    external_ips.dedup();
    load_balancer_ips.sort();
    load_balancer_ips.dedup();
    load_balancer_source_ranges.sort();
    load_balancer_source_ranges.dedup();

    let policy = |field: &str, value: Option<&str>| match value {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(Rejection::new(
            "Service",
            &id,
            field,
            format!("{:?} is not Cluster or Local", clip(other)),
        )),
    };
    let external_policy = match policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    ) {
        Ok(p) => p,
        Err(r) => return ServiceOutcome::Rejected(r),
    };
    let internal_policy = match policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    ) {
        Ok(p) => p,
        Err(r) => return ServiceOutcome::Rejected(r),
    };
    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10800);
            match u32::try_from(t).ok().filter(|t| (1..=86400).contains(t)) {
                Some(t) => Some(t),
                None => {
                    return reject(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!("{t} is outside 1-86400"),
                    );
                }
            }
        }
        Some(other) => {
            return reject(
                "spec.sessionAffinity".into(),
                format!("{:?} is not None or ClientIP", clip(other)),
            );
        }
    };
    // The API server allocates healthCheckNodePorts from the NodePort range, never one of the
    // Service's own nodePorts (whatever their protocol: the allocator is one bitmap); a bad
    // one is refused alone (the load balancer sees no health check, the Service still works).
    let health_check_node_port = match spec.health_check_node_port {
        Some(p)
            if service_type == ServiceType::LoadBalancer
                && external_policy == TrafficPolicy::Local =>
        {
            let field = "spec.healthCheckNodePort".to_owned();
            match u16::try_from(p)
                .ok()
                .filter(|n| limits.node_port_range.contains(n))
                .and_then(NonZeroU16::new)
            {
                Some(hc) => match ports.iter().find(|q| q.node_port == Some(hc)) {
                    Some(q) => {
                        problems.push(problem(
                            field,
                            format!("{hc} is also the nodePort of spec.ports[{}]", q.index),
                        ));
                        None
                    }
                    None => Some(hc),
                },
                None => {
                    problems.push(problem(
                        field,
                        format!(
                            "{p} is outside the node port range {}-{}",
                            limits.node_port_range.start(),
                            limits.node_port_range.end()
                        ),
                    ));
                    None
                }
            }
        }
        _ => None,
    };
    let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);

    ServiceOutcome::Proxied(
        ServiceModel {
            id,
            service_type,
            cluster_ips,
            ports,
            external_ips,
            load_balancer_ips,
            load_balancer_source_ranges,
            external_policy,
            internal_policy,
            affinity_timeout,
            health_check_node_port,
            created,
        },
        problems,
    )
}

/// Checks an EndpointSlice. Individual endpoints with unusable addresses are dropped with a
/// rejection each; the rest of the slice stays in use.
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<(SliceModel, Vec<Rejection>), Rejection> {
    let id = object_name(&slice.metadata);
    let reject =
        |field: &str, message: String| Rejection::new("EndpointSlice", &id, field, message);
    check_name("EndpointSlice", &id, true)?;
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| {
            reject(
                "metadata.labels",
                format!("missing label {SERVICE_NAME_LABEL}"),
            )
        })?;
    if !is_dns_label(&service) {
        return Err(reject(
            &format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
            "must be a Service name (DNS-1123 label)".into(),
        ));
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::Ipv4,
        "IPv6" => IpFamily::Ipv6,
        "FQDN" => return Err(reject("addressType", "FQDN slices are not proxied".into())),
        other => {
            return Err(reject(
                "addressType",
                format!("{:?} is not IPv4 or IPv6", clip(other)),
            ));
        }
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let name = p.name.clone().unwrap_or_default();
        let protocol = parse_protocol(p.protocol.as_deref()).ok_or_else(|| {
            reject(
                &format!("ports[{i}].protocol"),
                "not TCP, UDP or SCTP".into(),
            )
        })?;
        let Some(raw) = p.port else {
            // A nil port means "all ports" and is only valid for headless use.
            continue;
        };
        let port = port_number(raw).ok_or_else(|| {
            reject(
                &format!("ports[{i}].port"),
                format!("{raw} is outside 1-65535"),
            )
        })?;
        ports.push(SlicePort {
            name,
            protocol,
            port,
        });
    }
    let mut problems = Vec::new();
    let mut endpoints = Vec::new();
    'endpoints: for (i, ep) in slice.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() {
            problems.push(reject(&format!("endpoints[{i}].addresses"), "empty".into()));
            continue;
        }
        // Every address must be valid, as the API server checks (only the first is used):
        // one that is not refuses this endpoint, and the rest of the slice stays in use.
        for (j, raw) in ep.addresses.iter().enumerate() {
            let why = match parse_ip(raw) {
                Some(ip) if family_of(&ip) != family => {
                    format!("{ip} is not an {} address", family.as_str_name())
                }
                Some(ip) => match special_address(&ip) {
                    Some(why) => format!("{ip} cannot be an endpoint: it is {why}"),
                    None => continue,
                },
                None => format!("{:?} is not an IP address", clip(raw)),
            };
            problems.push(reject(&format!("endpoints[{i}].addresses[{j}]"), why));
            continue 'endpoints;
        }
        let Some(ip) = ep.addresses.first().and_then(|raw| parse_ip(raw)) else {
            continue;
        };
        let cond = ep.conditions.as_ref();
        let conditions = Conditions {
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
        };
        let hints = ep.hints.as_ref();
        endpoints.push(EndpointModel {
            index: i,
            ip,
            conditions,
            node_name: ep.node_name.clone(),
            zone: ep.zone.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect()),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect()),
        });
    }
    let trigger_ms = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.as_millisecond());
    Ok((
        SliceModel {
            id,
            service,
            family,
            ports,
            endpoints,
            trigger_ms,
        },
        problems,
    ))
}

/// Checks a Node.
/// A Node: refused as a whole for an invalid name or InternalIP; invalid pod CIDRs are
/// refused alone (the node is kept without them).
pub fn node(node: &Node) -> Result<(NodeModel, Vec<Rejection>), Rejection> {
    let id = ObjectName {
        namespace: String::new(),
        name: node.metadata.name.clone().unwrap_or_default(),
    };
    if !is_dns_subdomain(&id.name) {
        return Err(Rejection::new(
            "Node",
            &id,
            "metadata.name",
            "must be a DNS-1123 subdomain",
        ));
    }
    let mut internal_ips: Vec<IpAddr> = Vec::new();
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in addresses.into_iter().flatten().enumerate() {
        if a.type_ != "InternalIP" {
            continue;
        }
        match parse_ip(&a.address) {
            Some(ip) if !internal_ips.iter().any(|x| family_of(x) == family_of(&ip)) => {
                internal_ips.push(ip)
            }
            Some(_) => {}
            None => {
                return Err(Rejection::new(
                    "Node",
                    &id,
                    format!("status.addresses[{i}].address"),
                    format!("{:?} is not an IP address", clip(&a.address)),
                ));
            }
        }
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    let (pod_cidrs, problems) = match pod_cidrs(node.spec.as_ref()) {
        Ok(cidrs) => (cidrs, Vec::new()),
        Err((field, message)) => (
            Vec::new(),
            vec![Rejection::new("Node", &id, field, message)],
        ),
    };
    let model = NodeModel {
        name: id.name,
        internal_ips,
        zone: node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned(),
        deleting: tainted || node.metadata.deletion_timestamp.is_some(),
        pod_cidrs,
    };
    Ok((model, problems))
}

/// A node's pod CIDRs, by the API server's rules (`validateNodeSpec`): each a CIDR, at most
/// one per family, `podCIDR` (the legacy field) equal to the first of `podCIDRs` when both
/// are set. Only `podCIDR`: that one.
fn pod_cidrs(spec: Option<&NodeSpec>) -> Result<Vec<IpNet>, (String, String)> {
    let Some(spec) = spec else {
        return Ok(Vec::new());
    };
    let list = spec.pod_cidrs.as_deref().unwrap_or_default();
    let legacy = spec.pod_cidr.as_deref().filter(|s| !s.is_empty());
    let mut cidrs: Vec<IpNet> = Vec::new();
    for (i, raw) in list.iter().enumerate() {
        let field = format!("spec.podCIDRs[{i}]");
        let net = parse_cidr(raw)
            .ok_or_else(|| (field.clone(), format!("{:?} is not a CIDR", clip(raw))))?;
        if cidrs
            .iter()
            .any(|c| family_of(&c.addr()) == family_of(&net.addr()))
        {
            return Err((
                "spec.podCIDRs".into(),
                "may specify no more than one CIDR for each IP family".into(),
            ));
        }
        cidrs.push(net);
    }
    match (legacy, cidrs.first()) {
        (Some(raw), first) => {
            let net = parse_cidr(raw).ok_or_else(|| {
                (
                    "spec.podCIDR".to_owned(),
                    format!("{:?} is not a CIDR", clip(raw)),
                )
            })?;
            match first {
                None => Ok(vec![net]),
                Some(first) if *first == net => Ok(cidrs),
                Some(first) => Err((
                    "spec.podCIDR".into(),
                    format!("{net} is not the first of spec.podCIDRs ({first})"),
                )),
            }
        }
        (None, _) => Ok(cidrs),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_ipv4_is_decimal() {
        assert_eq!(
            parse_ip("172.30.0.041"),
            Some("172.30.0.41".parse().unwrap())
        );
        assert_eq!(
            parse_ip("010.000.001.002"),
            Some("10.0.1.2".parse().unwrap())
        );
        assert_eq!(parse_ip("1.2.3"), None);
        assert_eq!(parse_ip("1.2.3.256"), None);
        assert_eq!(
            parse_cidr(" 203.0.113.000/025 "),
            Some("203.0.113.0/25".parse().unwrap())
        );
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
    }

    fn service_from(spec: serde_json::Value, status: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    fn proxied(outcome: ServiceOutcome) -> (ServiceModel, Vec<(String, String)>) {
        match outcome {
            ServiceOutcome::Proxied(m, problems) => (
                m,
                problems.into_iter().map(|r| (r.field, r.message)).collect(),
            ),
            other => panic!("not proxied: {other:?}"),
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// Found by hostile testing: `169.254.169.254:80` and a node address's port 22 became
    /// DNATed Service addresses. With `--service-cidr`, a ClusterIP outside every range of
    /// its family is refused (the Service's other family still served); link-local and
    /// other special addresses are refused even without it.
    #[test]
    fn cluster_ips_outside_the_service_cidrs_are_refused() {
        let limits = Limits {
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            ..Limits::default()
        };
        let ports = serde_json::json!([{"name": "http", "port": 80}]);
        for (ip, why) in [
            ("169.254.169.254", "link-local"),
            ("192.168.50.11", "--service-cidr"),
        ] {
            let svc = service_from(
                serde_json::json!({"clusterIP": ip, "ports": ports}),
                serde_json::json!({}),
            );
            match service(&svc, &limits) {
                ServiceOutcome::Rejected(r) => {
                    assert_eq!(r.field, "spec.clusterIP");
                    assert!(r.message.contains(why), "{r}");
                }
                other => panic!("{ip}: {other:?}"),
            }
        }
        // No CIDR given: only special addresses are refused.
        let svc = service_from(
            serde_json::json!({"clusterIP": "169.254.169.254", "ports": ports}),
            serde_json::json!({}),
        );
        assert!(matches!(
            service(&svc, &Limits::default()),
            ServiceOutcome::Rejected(r) if r.message.contains("link-local")
        ));
        // Dual stack: the IPv4 ClusterIP outside the range is refused, the IPv6 one (no IPv6
        // range given, so not checked) is served.
        let svc = service_from(
            serde_json::json!({
                "clusterIPs": ["10.200.0.1", "fd00:96::1"],
                "ipFamilyPolicy": "RequireDualStack",
                "ports": ports,
            }),
            serde_json::json!({}),
        );
        let (m, problems) = proxied(service(&svc, &limits));
        assert_eq!(m.cluster_ips, ips(&["fd00:96::1"]));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "spec.clusterIPs[0]");
        // Inside the range: served, nothing refused.
        let svc = service_from(
            serde_json::json!({"clusterIP": "10.96.0.10", "ports": ports}),
            serde_json::json!({}),
        );
        let (m, problems) = proxied(service(&svc, &limits));
        assert_eq!(m.cluster_ips, ips(&["10.96.0.10"]));
        assert!(problems.is_empty());
    }

    /// External and load-balancer IPs that cannot be one host's address are refused one by
    /// one; the Service keeps the others.
    #[test]
    fn special_external_and_load_balancer_ips_are_refused_alone() {
        let svc = service_from(
            serde_json::json!({
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
                "externalIPs": ["203.0.113.1", "127.0.0.1", "169.254.169.254", "224.0.0.1",
                                "0.0.0.0", "255.255.255.255", "fe80::1", "nonsense"],
            }),
            serde_json::json!({"loadBalancer": {"ingress": [
                {"ip": "198.51.100.7"}, {"ip": "ff02::1"}, {"ip": "::1"}
            ]}}),
        );
        let (m, problems) = proxied(service(&svc, &Limits::default()));
        assert_eq!(m.external_ips, ips(&["203.0.113.1"]));
        assert_eq!(m.load_balancer_ips, ips(&["198.51.100.7"]));
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.externalIPs[1]",
                "spec.externalIPs[2]",
                "spec.externalIPs[3]",
                "spec.externalIPs[4]",
                "spec.externalIPs[5]",
                "spec.externalIPs[6]",
                "spec.externalIPs[7]",
                "status.loadBalancer.ingress[1].ip",
                "status.loadBalancer.ingress[2].ip",
            ]
        );
    }

    /// A healthCheckNodePort outside the NodePort range, or equal to one of the Service's
    /// own nodePorts, is refused alone.
    #[test]
    fn bad_health_check_node_ports_are_refused_alone() {
        for (hc, why) in [
            (80, "outside the node port range"),
            (30080, "also the nodePort"),
        ] {
            let svc = service_from(
                serde_json::json!({
                    "type": "LoadBalancer",
                    "externalTrafficPolicy": "Local",
                    "healthCheckNodePort": hc,
                    "clusterIP": "10.96.0.10",
                    "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30080}],
                }),
                serde_json::json!({}),
            );
            let (m, problems) = proxied(service(&svc, &Limits::default()));
            assert_eq!(m.health_check_node_port, None);
            assert_eq!(m.ports[0].node_port, NonZeroU16::new(30080));
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].0, "spec.healthCheckNodePort");
            assert!(problems[0].1.contains(why), "{problems:?}");
        }
    }

    /// Every special kind of endpoint address is refused, each endpoint alone (with the field
    /// naming it); the rest of the slice is used.
    #[test]
    fn special_endpoint_addresses_are_refused_one_by_one() {
        let slice = |family: &str, addresses: &[&[&str]]| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-1", "namespace": "default",
                             "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": family,
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": addresses
                    .iter()
                    .map(|a| serde_json::json!({"addresses": a}))
                    .collect::<Vec<_>>(),
            }))
            .unwrap()
        };
        let v4 = slice(
            "IPv4",
            &[
                &["127.0.0.1"],
                &["10.244.1.10"],
                &["169.254.169.254"],
                &["255.255.255.255"],
                &["224.0.0.1"],
                &["239.1.2.3"],
                &["0.0.0.0"],
                &["10.244.1.11", "127.0.0.2"],
                &["fd00::1"],
                &["10.244.1.12"],
            ],
        );
        let (m, problems) = endpoint_slice(&v4).unwrap();
        let kept: Vec<(usize, IpAddr)> = m.endpoints.iter().map(|e| (e.index, e.ip)).collect();
        assert_eq!(
            kept,
            [
                (1, "10.244.1.10".parse().unwrap()),
                (9, "10.244.1.12".parse().unwrap())
            ]
        );
        let fields: Vec<&str> = problems.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "endpoints[0].addresses[0]",
                "endpoints[2].addresses[0]",
                "endpoints[3].addresses[0]",
                "endpoints[4].addresses[0]",
                "endpoints[5].addresses[0]",
                "endpoints[6].addresses[0]",
                "endpoints[7].addresses[1]",
                "endpoints[8].addresses[0]",
            ]
        );
        assert!(
            problems
                .iter()
                .all(|r| r.kind == "EndpointSlice" && r.name == "web-1")
        );

        let v6 = slice(
            "IPv6",
            &[
                &["::1"],
                &["fe80::1"],
                &["ff02::1"],
                &["::"],
                &["::ffff:10.244.1.10"],
                &["fd00:244::10"],
            ],
        );
        let (m, problems) = endpoint_slice(&v6).unwrap();
        assert_eq!(m.endpoints.len(), 1);
        assert_eq!(m.endpoints[0].index, 5);
        assert_eq!(problems.len(), 5, "{problems:?}");
    }

    fn node_from(spec: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": spec,
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.11"}]},
        }))
        .unwrap()
    }

    /// spec.podCIDRs as the API server validates them; a bad value is refused alone, the
    /// node kept (its addresses still serve NodePorts) without pod CIDRs.
    #[test]
    fn node_pod_cidrs_are_validated_and_refused_alone() {
        let cidrs = |spec: serde_json::Value| {
            let (m, problems) = node(&node_from(spec)).unwrap();
            assert_eq!(m.internal_ips, ["192.168.50.11".parse::<IpAddr>().unwrap()]);
            let fields: Vec<String> = problems.iter().map(|p| p.field.clone()).collect();
            let cidrs: Vec<String> = m.pod_cidrs.iter().map(ToString::to_string).collect();
            (cidrs, fields)
        };
        let ok = |c: &[&str]| (c.iter().map(|s| s.to_string()).collect::<Vec<_>>(), vec![]);
        assert_eq!(cidrs(serde_json::json!({})), ok(&[]));
        assert_eq!(
            cidrs(serde_json::json!({"podCIDR": "10.244.1.0/24",
                "podCIDRs": ["10.244.1.0/24", "fd00:244:1::/64"]})),
            ok(&["10.244.1.0/24", "fd00:244:1::/64"])
        );
        // IPv6 first (an IPv6-primary cluster), and the legacy field alone.
        assert_eq!(
            cidrs(serde_json::json!({"podCIDRs": ["fd00:244:1::/64", "10.244.1.0/24"]})),
            ok(&["fd00:244:1::/64", "10.244.1.0/24"])
        );
        assert_eq!(
            cidrs(serde_json::json!({"podCIDR": "10.244.001.0/24"})),
            ok(&["10.244.1.0/24"])
        );
        let refused = |field: &str| (Vec::<String>::new(), vec![field.to_string()]);
        assert_eq!(
            cidrs(serde_json::json!({"podCIDRs": ["10.244.1.0/24", "10.244.1.0/33"]})),
            refused("spec.podCIDRs[1]")
        );
        assert_eq!(
            cidrs(serde_json::json!({"podCIDRs": ["10.244.1.0/24", "10.244.2.0/24"]})),
            refused("spec.podCIDRs")
        );
        assert_eq!(
            cidrs(serde_json::json!({"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.1.0/24"]})),
            refused("spec.podCIDR")
        );
        assert_eq!(
            cidrs(serde_json::json!({"podCIDR": "not-a-cidr"})),
            refused("spec.podCIDR")
        );
    }

    #[test]
    fn names() {
        assert!(is_dns_label("web-1"));
        assert!(!is_dns_label("Web"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("web-abc.x"));
        assert!(!is_dns_subdomain(&"a".repeat(100_000)));
        let long = "x".repeat(100_000);
        assert!(clip(&long).len() < 120);
        assert_eq!(clip("a\nb\x1b"), "a\\nb\\u{1b}");
        let r = Rejection {
            kind: "File",
            namespace: String::new(),
            name: "x\ny.yaml".into(),
            field: String::new(),
            message: "bad\r\nline".into(),
        };
        assert!(!r.to_string().contains(['\n', '\r']), "{r}");
    }
}
