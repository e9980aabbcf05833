//! The agent's typed view of the resources the controller sends.
//!
//! Everything that reaches nft text passes through here first: every address, CIDR, port and
//! enum from the wire is parsed into a Rust type, so rendering never touches an unparsed string
//! and a malformed resource is refused (NACKed) before any nft command is built.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU16;

use ipnet::IpNet;
use kubenft_proto::v1::{self, resource};

/// The name of the node-wide resource.
pub use kubenft_proto::NODE_RESOURCE;

/// An IP family: one nft table each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The nft family keyword (`ip`, `ip6`), also the payload protocol in rules.
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The nft address data type.
    pub fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }

    /// The loopback range, excluded from "all local addresses" NodePort matching.
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1",
        }
    }

    /// Kubernetes' spelling, used in metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// A layer-4 protocol a Service port may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// A port number, 1 to 65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(NonZeroU16);

impl Port {
    pub fn new(port: u16) -> Option<Port> {
        NonZeroU16::new(port).map(Port)
    }

    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One backend of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: Port,
    /// Runs on this node (its pod IP gets hairpin masquerade).
    pub local: bool,
    /// Ready, not merely serving while terminating (rendering ignores it; Trace reports a
    /// fallback to terminating endpoints).
    pub ready: bool,
}

/// A validated `ServicePortRules`: one Service port in one family as this node enforces it.
///
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub family: Family,
    pub protocol: Protocol,
    pub port: Port,
    pub cluster_ip: Option<IpAddr>,
    pub node_port: Option<Port>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// Sources allowed to reach the load-balancer IPs (empty: all), merged so that no two
    /// overlap (an nft interval set refuses overlaps).
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub external_traffic_local: bool,
    pub internal_traffic_local: bool,
    pub cluster_endpoints: Vec<Endpoint>,
    pub local_endpoints: Vec<Endpoint>,
    /// Usable endpoints exist though `cluster_endpoints` is empty (it is not sent where no
    /// path uses it).
    pub endpoints_elsewhere: bool,
    /// ClientIP session affinity timeout in seconds.
    pub affinity: Option<std::num::NonZeroU32>,
    /// The health-check node port this port asks for (LoadBalancer, externalTrafficPolicy
    /// Local).
    pub health_check: Option<HealthCheck>,
}

/// A health-check node port and what it reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: Port,
    pub namespace: String,
    pub service: String,
    /// Ready endpoints of the Service on this node.
    pub local_ready: u32,
}

impl ServicePort {
    /// Whether the Service has any usable endpoint: if not, its traffic is rejected.
    pub fn has_endpoints(&self) -> bool {
        !self.cluster_endpoints.is_empty() || self.endpoints_elsewhere
    }
}

/// An interface name or name prefix from the controller, checked to be safe in nft's quoted
/// strings (see [`kubenft_proto::check_interface_name`]); only [`NodeRules`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceName(String);

impl InterfaceName {
    pub fn new(text: &str) -> Result<InterfaceName, String> {
        kubenft_proto::check_interface_name(text)
            .map(|()| InterfaceName(text.to_owned()))
            .map_err(|why| format!("{text:?} {why}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How this node recognises traffic from its own pods (kube-proxy's --detect-local-mode).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalDetector {
    /// Sources in [`NodeRules::local_pod_cidrs`] (ClusterCIDR, NodeCIDR); a family without
    /// one has no detector.
    #[default]
    Cidrs,
    /// Packets entering through this interface (BridgeInterface).
    Bridge(InterfaceName),
    /// Packets entering through an interface whose name starts with this
    /// (InterfaceNamePrefix).
    Prefix(InterfaceName),
}

/// A validated `v1::NodeRules`: the node-wide settings behind the constant chains and node sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRules {
    /// Sources that are this node's pods, in the CIDR modes.
    pub local_pod_cidrs: Vec<IpNet>,
    pub local_detector: LocalDetector,
    pub service_cidrs: Vec<IpNet>,
    pub node_port_ips: Vec<IpAddr>,
    pub node_port_all_addresses: bool,
    pub masquerade_all: bool,
    /// The node is being deleted (load balancers should drain it).
    pub deleting: bool,
}

impl NodeRules {
    /// The local pod CIDRs of one family, merged so an interval set accepts them.
    pub fn local_pod_cidrs(&self, family: Family) -> Vec<IpNet> {
        of_family(&self.local_pod_cidrs, family)
    }

    /// The service CIDRs of one family, merged.
    pub fn service_cidrs(&self, family: Family) -> Vec<IpNet> {
        of_family(&self.service_cidrs, family)
    }

    /// The NodePort addresses of one family, sorted and without duplicates.
    pub fn node_port_ips(&self, family: Family) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .node_port_ips
            .iter()
            .copied()
            .filter(|ip| Family::of(*ip) == family)
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

fn of_family(nets: &[IpNet], family: Family) -> Vec<IpNet> {
    let nets: Vec<IpNet> = nets
        .iter()
        .copied()
        .filter(|n| Family::of(n.addr()) == family)
        .collect();
    IpNet::aggregate(&nets)
}

/// What a resource describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    Node(NodeRules),
    ServicePort(ServicePort),
    /// Addresses of endpoints running on this node (one `node-endpoints/<bucket>` resource):
    /// hairpin traffic from them is masqueraded.
    NodeEndpoints(Vec<IpAddr>),
}

/// Why a resource from the controller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resource {resource:?}: {field}: {reason}")]
pub struct InvalidResource {
    pub resource: String,
    pub field: String,
    pub reason: String,
}

/// Parses and checks one resource.
pub fn validate(res: &v1::Resource) -> Result<Spec, InvalidResource> {
    let fail = |field: &str, reason: String| InvalidResource {
        resource: res.name.clone(),
        field: field.to_owned(),
        reason,
    };
    match &res.kind {
        None => Err(fail("kind", "missing".into())),
        Some(resource::Kind::Node(node)) if res.name == NODE_RESOURCE => node_config(node)
            .map(Spec::Node)
            .map_err(|(f, r)| fail(&f, r)),
        Some(resource::Kind::Node(_)) => Err(fail(
            "name",
            format!("node rules must be named {NODE_RESOURCE:?}"),
        )),
        Some(resource::Kind::ServicePort(_)) if res.name == NODE_RESOURCE => Err(fail(
            "name",
            format!("{NODE_RESOURCE:?} is reserved for node rules"),
        )),
        Some(resource::Kind::ServicePort(sp)) => service_port(sp)
            .map(Spec::ServicePort)
            .map_err(|(f, r)| fail(&f, r)),
        Some(resource::Kind::NodeEndpoints(_))
            if kubenft_proto::parse_node_endpoints_name(&res.name).is_none() =>
        {
            Err(fail(
                "name",
                "node endpoints must be named \"node-endpoints/<bucket>\"".into(),
            ))
        }
        Some(resource::Kind::NodeEndpoints(e)) => parse_all(&e.ips, "ips", parse_ip)
            .map(Spec::NodeEndpoints)
            .map_err(|(f, r)| fail(&f, r)),
    }
}

/// A field path and the reason it was refused.
type FieldError = (String, String);

fn node_config(node: &v1::NodeRules) -> Result<NodeRules, FieldError> {
    let local_pod_cidrs = parse_all(&node.local_pod_cidrs, "local_pod_cidrs", parse_cidr)?;
    Ok(NodeRules {
        local_detector: local_detector(node, !local_pod_cidrs.is_empty())?,
        local_pod_cidrs,
        service_cidrs: parse_all(&node.service_cidrs, "service_cidrs", parse_cidr)?,
        node_port_ips: parse_all(&node.node_port_ips, "node_port_ips", parse_ip)?,
        node_port_all_addresses: node.node_port_all_addresses,
        masquerade_all: node.masquerade_all,
        deleting: node.deleting,
    })
}

/// The detector the mode names: the CIDR modes use `local_pod_cidrs` and no interface; the
/// interface modes a valid interface name and no CIDRs.
fn local_detector(node: &v1::NodeRules, has_cidrs: bool) -> Result<LocalDetector, FieldError> {
    use v1::DetectLocalMode as Mode;
    let field = |f: &str, why: String| (f.to_owned(), why);
    let mode = Mode::try_from(node.detect_local_mode).map_err(|_| {
        field(
            "detect_local_mode",
            format!("unknown mode {}", node.detect_local_mode),
        )
    })?;
    let name = &node.local_interface;
    match mode {
        Mode::Unspecified | Mode::ClusterCidr | Mode::NodeCidr if name.is_empty() => {
            Ok(LocalDetector::Cidrs)
        }
        Mode::Unspecified | Mode::ClusterCidr | Mode::NodeCidr => Err(field(
            "local_interface",
            format!("must be empty with {}", mode.as_str_name()),
        )),
        Mode::BridgeInterface | Mode::InterfaceNamePrefix if has_cidrs => Err(field(
            "local_pod_cidrs",
            format!("must be empty with {}", mode.as_str_name()),
        )),
        Mode::BridgeInterface => InterfaceName::new(name)
            .map(LocalDetector::Bridge)
            .map_err(|why| field("local_interface", why)),
        Mode::InterfaceNamePrefix => InterfaceName::new(name)
            .map(LocalDetector::Prefix)
            .map_err(|why| field("local_interface", why)),
    }
}

fn service_port(sp: &v1::ServicePortRules) -> Result<ServicePort, FieldError> {
    let family = match v1::IpFamily::try_from(sp.family) {
        Ok(v1::IpFamily::Ipv4) => Family::V4,
        Ok(v1::IpFamily::Ipv6) => Family::V6,
        _ => return Err(("family".into(), format!("invalid IP family {}", sp.family))),
    };
    let protocol = match v1::Protocol::try_from(sp.protocol) {
        Ok(v1::Protocol::Tcp) => Protocol::Tcp,
        Ok(v1::Protocol::Udp) => Protocol::Udp,
        Ok(v1::Protocol::Sctp) => Protocol::Sctp,
        _ => {
            return Err((
                "protocol".into(),
                format!("invalid protocol {}", sp.protocol),
            ));
        }
    };
    let ip = |field: &str, text: &str| -> Result<IpAddr, FieldError> {
        let addr = parse_ip(text).map_err(|r| (field.to_owned(), r))?;
        if Family::of(addr) != family {
            return Err((
                field.to_owned(),
                format!("{addr} is not of family {family:?}"),
            ));
        }
        Ok(addr)
    };
    let ips = |field: &str, texts: &[String]| -> Result<Vec<IpAddr>, FieldError> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| ip(&format!("{field}[{i}]"), t))
            .collect()
    };
    let endpoints = |field: &str, eps: &[v1::Endpoint]| -> Result<Vec<Endpoint>, FieldError> {
        eps.iter()
            .enumerate()
            .map(|(i, ep)| {
                let field = format!("{field}[{i}]");
                Ok(Endpoint {
                    addr: ip(&format!("{field}.ip"), &ep.ip)?,
                    port: parse_port(ep.port).map_err(|r| (format!("{field}.port"), r))?,
                    local: ep.local,
                    ready: ep.ready,
                })
            })
            .collect()
    };
    Ok(ServicePort {
        family,
        protocol,
        port: parse_port(sp.port).map_err(|r| ("port".to_owned(), r))?,
        cluster_ip: match sp.cluster_ip.as_str() {
            "" => None,
            text => Some(ip("cluster_ip", text)?),
        },
        node_port: match sp.node_port {
            0 => None,
            n => Some(parse_port(n).map_err(|r| ("node_port".to_owned(), r))?),
        },
        external_ips: ips("external_ips", &sp.external_ips)?,
        load_balancer_ips: ips("load_balancer_ips", &sp.load_balancer_ips)?,
        load_balancer_source_ranges: source_ranges(family, &sp.load_balancer_source_ranges)?,
        external_traffic_local: sp.external_traffic_local,
        internal_traffic_local: sp.internal_traffic_local,
        cluster_endpoints: endpoints("cluster_endpoints", &sp.cluster_endpoints)?,
        local_endpoints: endpoints("local_endpoints", &sp.local_endpoints)?,
        endpoints_elsewhere: sp.endpoints_elsewhere,
        affinity: sp
            .affinity
            .as_ref()
            .and_then(|a| std::num::NonZeroU32::new(a.timeout_seconds)),
        health_check: match sp.health_check_node_port {
            0 => None,
            n => Some(HealthCheck {
                port: parse_port(n).map_err(|r| ("health_check_node_port".to_owned(), r))?,
                namespace: sp.namespace.clone(),
                service: sp.service.clone(),
                local_ready: sp.local_ready_endpoints,
            }),
        },
    })
}

fn source_ranges(family: Family, texts: &[String]) -> Result<Vec<IpNet>, FieldError> {
    let nets = parse_all(texts, "load_balancer_source_ranges", parse_cidr)?;
    if let Some(net) = nets.iter().find(|n| Family::of(n.addr()) != family) {
        return Err((
            "load_balancer_source_ranges".into(),
            format!("{net} is not of family {family:?}"),
        ));
    }
    Ok(IpNet::aggregate(&nets))
}

fn parse_all<T>(
    texts: &[String],
    field: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, FieldError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| parse(t).map_err(|r| (format!("{field}[{i}]"), r)))
        .collect()
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IP address"))
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .parse()
        .map_err(|_| format!("{text:?} is not a CIDR"))?;
    Ok(net.trunc())
}

fn parse_port(port: u32) -> Result<Port, String> {
    u16::try_from(port)
        .ok()
        .and_then(Port::new)
        .ok_or_else(|| format!("{port} is not a port (1-65535)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port_resource(sp: v1::ServicePortRules) -> v1::Resource {
        v1::Resource::versioned("ns/svc/tcp/http/v4".into(), resource::Kind::ServicePort(sp))
    }

    fn valid() -> v1::ServicePortRules {
        v1::ServicePortRules {
            protocol: v1::Protocol::Tcp as i32,
            family: v1::IpFamily::Ipv4 as i32,
            port: 80,
            cluster_ip: "10.96.0.10".into(),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_valid_port() {
        let spec = validate(&port_resource(valid())).unwrap();
        let Spec::ServicePort(sp) = spec else {
            panic!()
        };
        assert_eq!(sp.cluster_ip, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(sp.node_port, None);
    }

    #[test]
    fn refuses_bad_values_naming_the_field() {
        let cases: Vec<(v1::ServicePortRules, &str)> = vec![
            (v1::ServicePortRules { port: 0, ..valid() }, "port"),
            (
                v1::ServicePortRules {
                    port: 70000,
                    ..valid()
                },
                "port",
            ),
            (
                v1::ServicePortRules {
                    cluster_ip: "10.0.0.1; flush ruleset".into(),
                    ..valid()
                },
                "cluster_ip",
            ),
            (
                v1::ServicePortRules {
                    cluster_ip: "fd00::1".into(),
                    ..valid()
                },
                "cluster_ip",
            ),
            (
                v1::ServicePortRules {
                    protocol: 0,
                    ..valid()
                },
                "protocol",
            ),
            (
                v1::ServicePortRules {
                    family: 9,
                    ..valid()
                },
                "family",
            ),
            (
                v1::ServicePortRules {
                    cluster_endpoints: vec![v1::Endpoint {
                        ip: "10.1.0.1".into(),
                        port: 0,
                        ..Default::default()
                    }],
                    ..valid()
                },
                "cluster_endpoints[0].port",
            ),
        ];
        for (sp, field) in cases {
            let err = validate(&port_resource(sp)).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn node_rules_must_be_named_node() {
        let kind = resource::Kind::Node(v1::NodeRules::default());
        assert!(validate(&v1::Resource::versioned("x".into(), kind.clone())).is_err());
        assert!(validate(&v1::Resource::versioned(NODE_RESOURCE.into(), kind)).is_ok());
    }

    #[test]
    fn cidrs_are_split_by_family_and_merged() {
        let cfg = NodeRules {
            local_pod_cidrs: ["10.0.0.0/16", "10.0.0.0/8", "fd00::/48"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            cfg.local_pod_cidrs(Family::V4),
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(cfg.local_pod_cidrs(Family::V6).len(), 1);
    }

    fn node_resource(rules: v1::NodeRules) -> v1::Resource {
        v1::Resource::versioned(NODE_RESOURCE.into(), resource::Kind::Node(rules))
    }

    fn detector(rules: v1::NodeRules) -> Result<LocalDetector, InvalidResource> {
        match validate(&node_resource(rules))? {
            Spec::Node(cfg) => Ok(cfg.local_detector),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn detect_local_modes_are_read_with_their_parameter() {
        use v1::DetectLocalMode as Mode;
        let rules = |mode: Mode, cidrs: &[&str], iface: &str| v1::NodeRules {
            detect_local_mode: mode as i32,
            local_pod_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            local_interface: iface.into(),
            ..Default::default()
        };
        // A controller of protocol 1 sends no mode: its CIDRs are the detector.
        assert_eq!(
            detector(rules(Mode::Unspecified, &["10.244.0.0/16"], "")),
            Ok(LocalDetector::Cidrs)
        );
        assert_eq!(
            detector(rules(Mode::NodeCidr, &["10.244.1.0/24"], "")),
            Ok(LocalDetector::Cidrs)
        );
        assert_eq!(
            detector(rules(Mode::BridgeInterface, &[], "cbr0")),
            Ok(LocalDetector::Bridge(InterfaceName("cbr0".into())))
        );
        assert_eq!(
            detector(rules(Mode::InterfaceNamePrefix, &[], "cali")),
            Ok(LocalDetector::Prefix(InterfaceName("cali".into())))
        );
        // Anything that could reach nft unquoted, or does not fit the mode, is refused.
        for (bad, field) in [
            (rules(Mode::BridgeInterface, &[], ""), "local_interface"),
            (
                rules(Mode::BridgeInterface, &[], "br0\" accept"),
                "local_interface",
            ),
            (
                rules(Mode::InterfaceNamePrefix, &[], "cali*"),
                "local_interface",
            ),
            (
                rules(Mode::InterfaceNamePrefix, &[], "0123456789abcdef"),
                "local_interface",
            ),
            (
                rules(Mode::InterfaceNamePrefix, &[], "a;b"),
                "local_interface",
            ),
            (rules(Mode::ClusterCidr, &[], "cbr0"), "local_interface"),
            (
                rules(Mode::BridgeInterface, &["10.0.0.0/8"], "cbr0"),
                "local_pod_cidrs",
            ),
            (
                v1::NodeRules {
                    detect_local_mode: 99,
                    ..Default::default()
                },
                "detect_local_mode",
            ),
        ] {
            let err = detector(bad).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }
}
