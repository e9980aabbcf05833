//! The objects of the agent's tables: sets and maps, chains, elements and rules.
//!
//! The table layout is fixed (services and endpoints are elements, never chains), so every set
//! and chain is an enum variant; an element's variant determines the map it lives in, so an
//! element cannot be put in the wrong map or carry the wrong kind of value.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;

use ipnet::IpNet;

use crate::rules::{Family, Port, Protocol};

/// Room for this many remembered clients per slot of affinity Services.
pub const STICKY_SIZE: u32 = 1 << 20;

/// Which endpoints a lookup uses: all of them, or this node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    Cluster,
    Local,
}

impl Scope {
    fn letter(self) -> &'static str {
        match self {
            Scope::Cluster => "c",
            Scope::Local => "l",
        }
    }
}

/// How traffic enters a service: by destination address, or by NodePort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKind {
    Ip,
    NodePort,
}

impl EntryKind {
    fn prefix(self) -> &'static str {
        match self {
            EntryKind::Ip => "ip",
            EntryKind::NodePort => "np",
        }
    }
}

/// Every set and map of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetId {
    /// Sources that are this node's pods (the CIDR modes of local-traffic detection).
    LocalPodCidrs,
    ServiceCidrs,
    NodePortIps,
    ClusterIps,
    Hairpin,
    Generation,
    ServiceIps,
    ServiceNodePorts,
    Dispatch(EntryKind, Scope),
    /// One endpoint slot's map, created when first needed.
    Endpoints(Slot),
    /// Clients that chose one endpoint slot of an affinity Service recently (dynamic, with
    /// timeouts; never flushed, so affinity survives changes and restarts).
    Sticky(Slot),
    NoEndpointServices,
    NoEndpointNodePorts,
    /// Load-balancer entry points with source ranges.
    FirewallIps,
    /// `entry . allowed source range` for those entry points.
    FirewallAllow,
}

impl SetId {
    /// Every set and map declared with the table (endpoint slot maps come on demand).
    pub const ALL: [SetId; 16] = [
        SetId::LocalPodCidrs,
        SetId::ServiceCidrs,
        SetId::NodePortIps,
        SetId::ClusterIps,
        SetId::Hairpin,
        SetId::Generation,
        SetId::ServiceIps,
        SetId::ServiceNodePorts,
        SetId::Dispatch(EntryKind::Ip, Scope::Cluster),
        SetId::Dispatch(EntryKind::Ip, Scope::Local),
        SetId::Dispatch(EntryKind::NodePort, Scope::Cluster),
        SetId::Dispatch(EntryKind::NodePort, Scope::Local),
        SetId::NoEndpointServices,
        SetId::NoEndpointNodePorts,
        SetId::FirewallIps,
        SetId::FirewallAllow,
    ];

    /// Sets and maps whose content is derived from NodeRules (flushed and refilled when it
    /// changes).
    pub const NODE_SETS: [SetId; 3] = [
        SetId::LocalPodCidrs,
        SetId::ServiceCidrs,
        SetId::NodePortIps,
    ];

    pub fn is_map(self) -> bool {
        !matches!(
            self,
            SetId::LocalPodCidrs
                | SetId::ServiceCidrs
                | SetId::NodePortIps
                | SetId::ClusterIps
                | SetId::Hairpin
                | SetId::Generation
                | SetId::FirewallIps
                | SetId::FirewallAllow
                | SetId::Sticky(_)
        )
    }

    /// The body of the declaration, between braces.
    pub fn declaration(self, family: Family) -> String {
        let a = family.addr_type();
        match self {
            SetId::LocalPodCidrs | SetId::ServiceCidrs => format!("type {a}; flags interval;"),
            SetId::NodePortIps | SetId::ClusterIps => format!("type {a};"),
            SetId::Hairpin => format!("type {a} . {a};"),
            SetId::Generation => "typeof meta mark;".into(),
            SetId::FirewallIps => format!("type {a} . inet_proto . inet_service;"),
            SetId::FirewallAllow => {
                format!("type {a} . inet_proto . inet_service . {a}; flags interval;")
            }
            SetId::ServiceIps | SetId::Dispatch(EntryKind::Ip, _) | SetId::NoEndpointServices => {
                format!("type {a} . inet_proto . inet_service : verdict;")
            }
            SetId::ServiceNodePorts
            | SetId::Dispatch(EntryKind::NodePort, _)
            | SetId::NoEndpointNodePorts => "type inet_proto . inet_service : verdict;".into(),
            // `type`, not `typeof`: nft 1.0.6 cannot add a rule that uses a map whose data was
            // declared `typeof … th dport` once that map comes from the kernel ("conflicting
            // protocols specified: tcp vs. th").
            SetId::Sticky(slot) => match slot.kind {
                EntryKind::Ip => format!(
                    "type {a} . {a} . inet_proto . inet_service; flags dynamic,timeout; size {STICKY_SIZE};"
                ),
                EntryKind::NodePort => format!(
                    "type {a} . inet_proto . inet_service; flags dynamic,timeout; size {STICKY_SIZE};"
                ),
            },
            SetId::Endpoints(slot) => match slot.kind {
                EntryKind::Ip => {
                    format!("type {a} . inet_proto . inet_service : {a} . inet_service;")
                }
                EntryKind::NodePort => {
                    format!("type inet_proto . inet_service : {a} . inet_service;")
                }
            },
        }
    }
}

impl fmt::Display for SetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetId::LocalPodCidrs => f.write_str("local-pod-cidrs"),
            SetId::ServiceCidrs => f.write_str("service-cidrs"),
            SetId::NodePortIps => f.write_str("nodeport-ips"),
            SetId::ClusterIps => f.write_str("cluster-ips"),
            SetId::Hairpin => f.write_str("hairpin"),
            SetId::Generation => f.write_str("generation"),
            SetId::ServiceIps => f.write_str("service-ips"),
            SetId::ServiceNodePorts => f.write_str("service-nodeports"),
            SetId::Dispatch(k, s) => write!(f, "{}-{}-dispatch", k.prefix(), s.letter()),
            SetId::Endpoints(slot) => write!(f, "{slot}-eps"),
            SetId::Sticky(slot) => write!(f, "sticky-{slot}"),
            SetId::NoEndpointServices => f.write_str("no-endpoint-services"),
            SetId::NoEndpointNodePorts => f.write_str("no-endpoint-nodeports"),
            SetId::FirewallIps => f.write_str("firewall-ips"),
            SetId::FirewallAllow => f.write_str("firewall-allow"),
        }
    }
}

/// A load-balancing chain: DNAT to one of `size` endpoints of the keyed map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbChain {
    pub kind: EntryKind,
    pub scope: Scope,
    pub size: NonZeroU32,
    /// ClientIP session affinity with this timeout (seconds): a client that chose a slot
    /// recently is sent to it again.
    pub affinity: Option<NonZeroU32>,
}

/// One endpoint position of the load-balancing scheme: the `index`-th endpoint of every
/// service (of one entry kind and scope) lives in this slot's map, and its chain DNATs to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub kind: EntryKind,
    pub scope: Scope,
    pub index: u32,
}

impl fmt::Display for Slot {
    /// The common part of the slot's map and chain names, e.g. `ip-c-3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}",
            self.kind.prefix(),
            self.scope.letter(),
            self.index
        )
    }
}

/// Every chain of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Chain {
    MarkForMasquerade,
    Masquerading,
    Services,
    SvcCluster,
    SvcLocal,
    ExtCluster,
    ExtLocal,
    NpCluster,
    NpLocal,
    ServiceEndpointsCheck,
    NodePortEndpointsCheck,
    ClusterIpsCheck,
    RejectChain,
    FirewallCheck,
    NatPrerouting,
    NatOutput,
    NatPostrouting,
    FilterInput,
    FilterForward,
    FilterOutput,
    FilterPreroutingPreDnat,
    FilterOutputPreDnat,
    Lb(LbChain),
    /// DNAT to the endpoint in one slot.
    Endpoint(Slot),
    /// Remember the client's choice of a slot for this many seconds, then DNAT.
    AffinityEndpoint(Slot, NonZeroU32),
}

impl Chain {
    /// The constant chains, regular chains first: a base chain is added after the chains it
    /// jumps to.
    pub const CONSTANT: [Chain; 22] = [
        Chain::MarkForMasquerade,
        Chain::Masquerading,
        Chain::Services,
        Chain::SvcCluster,
        Chain::SvcLocal,
        Chain::ExtCluster,
        Chain::ExtLocal,
        Chain::NpCluster,
        Chain::NpLocal,
        Chain::ServiceEndpointsCheck,
        Chain::NodePortEndpointsCheck,
        Chain::ClusterIpsCheck,
        Chain::RejectChain,
        Chain::FirewallCheck,
        Chain::NatPrerouting,
        Chain::NatOutput,
        Chain::NatPostrouting,
        Chain::FilterInput,
        Chain::FilterForward,
        Chain::FilterOutput,
        Chain::FilterPreroutingPreDnat,
        Chain::FilterOutputPreDnat,
    ];

    /// The hook specification of a base chain.
    pub fn base(self) -> Option<&'static str> {
        Some(match self {
            Chain::NatPrerouting => "type nat hook prerouting priority dstnat; policy accept;",
            Chain::NatOutput => "type nat hook output priority -100; policy accept;",
            Chain::NatPostrouting => "type nat hook postrouting priority srcnat; policy accept;",
            Chain::FilterInput => "type filter hook input priority 0; policy accept;",
            Chain::FilterForward => "type filter hook forward priority 0; policy accept;",
            Chain::FilterOutput => "type filter hook output priority 0; policy accept;",
            // Source ranges are checked before DNAT rewrites the destination.
            Chain::FilterPreroutingPreDnat => {
                "type filter hook prerouting priority -110; policy accept;"
            }
            Chain::FilterOutputPreDnat => "type filter hook output priority -110; policy accept;",
            _ => return None,
        })
    }
}

/// Where a base chain hooks in, as numbers (what other tables' chains are compared with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseHook {
    /// `nat` or `filter`.
    pub kind: &'static str,
    /// `prerouting`, `input`, `forward`, `output` or `postrouting`.
    pub hook: &'static str,
    /// Lower runs first (`dstnat` is -100, `srcnat` 100).
    pub priority: i32,
}

impl Chain {
    /// The base chains' hooks, priorities as numbers: the same as [`Chain::base`] says.
    pub fn hook(self) -> Option<BaseHook> {
        let (kind, hook, priority) = match self {
            Chain::NatPrerouting => ("nat", "prerouting", -100),
            Chain::NatOutput => ("nat", "output", -100),
            Chain::NatPostrouting => ("nat", "postrouting", 100),
            Chain::FilterInput => ("filter", "input", 0),
            Chain::FilterForward => ("filter", "forward", 0),
            Chain::FilterOutput => ("filter", "output", 0),
            Chain::FilterPreroutingPreDnat => ("filter", "prerouting", -110),
            Chain::FilterOutputPreDnat => ("filter", "output", -110),
            _ => return None,
        };
        Some(BaseHook {
            kind,
            hook,
            priority,
        })
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Chain::MarkForMasquerade => "mark-for-masquerade",
            Chain::Masquerading => "masquerading",
            Chain::Services => "services",
            Chain::SvcCluster => "svc-cluster",
            Chain::SvcLocal => "svc-local",
            Chain::ExtCluster => "ext-cluster",
            Chain::ExtLocal => "ext-local",
            Chain::NpCluster => "np-cluster",
            Chain::NpLocal => "np-local",
            Chain::ServiceEndpointsCheck => "service-endpoints-check",
            Chain::NodePortEndpointsCheck => "nodeport-endpoints-check",
            Chain::ClusterIpsCheck => "cluster-ips-check",
            Chain::RejectChain => "reject-chain",
            Chain::FirewallCheck => "firewall-check",
            Chain::NatPrerouting => "nat-prerouting",
            Chain::NatOutput => "nat-output",
            Chain::NatPostrouting => "nat-postrouting",
            Chain::FilterInput => "filter-input",
            Chain::FilterForward => "filter-forward",
            Chain::FilterOutput => "filter-output",
            Chain::FilterPreroutingPreDnat => "filter-prerouting-pre-dnat",
            Chain::FilterOutputPreDnat => "filter-output-pre-dnat",
            Chain::Lb(lb) => {
                write!(
                    f,
                    "lb-{}-{}-{}",
                    lb.kind.prefix(),
                    lb.scope.letter(),
                    lb.size
                )?;
                if let Some(t) = lb.affinity {
                    write!(f, "-a{t}")?;
                }
                return Ok(());
            }
            Chain::Endpoint(slot) => return write!(f, "ep-{slot}"),
            Chain::AffinityEndpoint(slot, t) => return write!(f, "ep-{slot}-a{t}"),
        };
        f.write_str(name)
    }
}

/// One rule's text. Only [`crate::render`] builds rules, from typed node settings; nothing from
/// the wire is ever spliced into one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule(String);

impl Rule {
    pub(crate) fn new(text: impl Into<String>) -> Rule {
        Rule(text.into())
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A service entry point by address: `addr . proto . port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrKey {
    pub addr: IpAddr,
    pub proto: Protocol,
    pub port: Port,
}

/// A NodePort entry point: `proto . port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub proto: Protocol,
    pub port: Port,
}

/// The key a service is found by, which decides between the `ip-*` and `np-*` maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKey {
    Addr(AddrKey),
    NodePort(PortKey),
}

impl EntryKey {
    pub fn kind(self) -> EntryKind {
        match self {
            EntryKey::Addr(_) => EntryKind::Ip,
            EntryKey::NodePort(_) => EntryKind::NodePort,
        }
    }
}

/// Where `service-ips` sends a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryChain {
    /// ClusterIP, internalTrafficPolicy Cluster.
    SvcCluster,
    /// ClusterIP, internalTrafficPolicy Local.
    SvcLocal,
    /// External or load-balancer IP, externalTrafficPolicy Cluster.
    ExtCluster,
    /// External or load-balancer IP, externalTrafficPolicy Local.
    ExtLocal,
}

impl EntryChain {
    fn chain(self) -> Chain {
        match self {
            EntryChain::SvcCluster => Chain::SvcCluster,
            EntryChain::SvcLocal => Chain::SvcLocal,
            EntryChain::ExtCluster => Chain::ExtCluster,
            EntryChain::ExtLocal => Chain::ExtLocal,
        }
    }
}

/// The verdict for a service without usable endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NoEndpoint {
    /// No endpoints anywhere.
    Reject,
    /// A Local policy with endpoints only on other nodes.
    Drop,
}

/// One element of one set or map. The variant decides the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    LocalPodCidr(IpNet),
    ServiceCidr(IpNet),
    NodePortIp(IpAddr),
    Generation(u32),
    ClusterIp(IpAddr),
    /// `e . e` for an endpoint `e`: traffic from a pod to itself through a service.
    Hairpin(IpAddr),
    ServiceIp(AddrKey, EntryChain),
    /// `proto . port : goto np-cluster|np-local`.
    ServiceNodePort(PortKey, Scope),
    /// `key : goto lb-…-N[-aT]`: N endpoints, and the affinity timeout if any.
    Dispatch(Scope, EntryKey, NonZeroU32, Option<NonZeroU32>),
    /// `key : addr . port` in the slot's map.
    Backend {
        scope: Scope,
        key: EntryKey,
        slot: u32,
        addr: IpAddr,
        port: Port,
    },
    NoEndpoint(EntryKey, NoEndpoint),
    /// A load-balancer entry point whose sources are restricted.
    FirewallIp(AddrKey),
    /// A source range allowed for such an entry point.
    FirewallAllow(AddrKey, IpNet),
}

/// The identity of an element: its set and key, without the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElementKey {
    LocalPodCidr(IpNet),
    ServiceCidr(IpNet),
    NodePortIp(IpAddr),
    Generation(u32),
    ClusterIp(IpAddr),
    Hairpin(IpAddr),
    ServiceIp(AddrKey),
    ServiceNodePort(PortKey),
    Dispatch(Scope, EntryKey),
    /// Ordered by slot before key, so one slot map's elements are adjacent.
    Backend {
        scope: Scope,
        slot: u32,
        key: EntryKey,
    },
    NoEndpoint(EntryKey),
    FirewallIp(AddrKey),
    FirewallAllow(AddrKey, IpNet),
}

impl Element {
    pub fn key(&self) -> ElementKey {
        match *self {
            Element::LocalPodCidr(n) => ElementKey::LocalPodCidr(n),
            Element::ServiceCidr(n) => ElementKey::ServiceCidr(n),
            Element::NodePortIp(a) => ElementKey::NodePortIp(a),
            Element::Generation(g) => ElementKey::Generation(g),
            Element::ClusterIp(a) => ElementKey::ClusterIp(a),
            Element::Hairpin(a) => ElementKey::Hairpin(a),
            Element::ServiceIp(k, _) => ElementKey::ServiceIp(k),
            Element::ServiceNodePort(k, _) => ElementKey::ServiceNodePort(k),
            Element::Dispatch(s, k, ..) => ElementKey::Dispatch(s, k),
            Element::Backend {
                scope, key, slot, ..
            } => ElementKey::Backend { scope, slot, key },
            Element::NoEndpoint(k, _) => ElementKey::NoEndpoint(k),
            Element::FirewallIp(k) => ElementKey::FirewallIp(k),
            Element::FirewallAllow(k, n) => ElementKey::FirewallAllow(k, n),
        }
    }

    pub fn set(&self) -> SetId {
        self.key().set()
    }

    /// The endpoint slot this element lives in, if any.
    pub fn slot(&self) -> Option<Slot> {
        match self.set() {
            SetId::Endpoints(slot) => Some(slot),
            _ => None,
        }
    }

    /// The load-balancing chain this element jumps to, if any.
    pub fn lb_chain(&self) -> Option<LbChain> {
        match *self {
            Element::Dispatch(scope, key, size, affinity) => Some(LbChain {
                kind: key.kind(),
                scope,
                size,
                affinity,
            }),
            _ => None,
        }
    }
}

impl ElementKey {
    pub fn set(&self) -> SetId {
        match self {
            ElementKey::LocalPodCidr(_) => SetId::LocalPodCidrs,
            ElementKey::ServiceCidr(_) => SetId::ServiceCidrs,
            ElementKey::NodePortIp(_) => SetId::NodePortIps,
            ElementKey::Generation(_) => SetId::Generation,
            ElementKey::ClusterIp(_) => SetId::ClusterIps,
            ElementKey::Hairpin(_) => SetId::Hairpin,
            ElementKey::ServiceIp(_) => SetId::ServiceIps,
            ElementKey::ServiceNodePort(_) => SetId::ServiceNodePorts,
            ElementKey::Dispatch(s, k) => SetId::Dispatch(k.kind(), *s),
            ElementKey::Backend { scope, slot, key } => SetId::Endpoints(Slot {
                kind: key.kind(),
                scope: *scope,
                index: *slot,
            }),
            ElementKey::NoEndpoint(EntryKey::Addr(_)) => SetId::NoEndpointServices,
            ElementKey::NoEndpoint(EntryKey::NodePort(_)) => SetId::NoEndpointNodePorts,
            ElementKey::FirewallIp(_) => SetId::FirewallIps,
            ElementKey::FirewallAllow(..) => SetId::FirewallAllow,
        }
    }
}

impl fmt::Display for AddrKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {} . {}", self.addr, self.proto, self.port)
    }
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} . {}", self.proto, self.port)
    }
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryKey::Addr(k) => k.fmt(f),
            EntryKey::NodePort(k) => k.fmt(f),
        }
    }
}

impl fmt::Display for ElementKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElementKey::LocalPodCidr(n) | ElementKey::ServiceCidr(n) => n.fmt(f),
            ElementKey::NodePortIp(a) | ElementKey::ClusterIp(a) => a.fmt(f),
            ElementKey::Generation(g) => g.fmt(f),
            ElementKey::Hairpin(a) => write!(f, "{a} . {a}"),
            ElementKey::ServiceIp(k) | ElementKey::FirewallIp(k) => k.fmt(f),
            ElementKey::FirewallAllow(k, n) => write!(f, "{k} . {n}"),
            ElementKey::ServiceNodePort(k) => k.fmt(f),
            ElementKey::Dispatch(_, key)
            | ElementKey::NoEndpoint(key)
            | ElementKey::Backend { key, .. } => key.fmt(f),
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.key().fmt(f)?;
        match *self {
            Element::ServiceIp(_, chain) => write!(f, " : goto {}", chain.chain()),
            Element::ServiceNodePort(_, Scope::Cluster) => {
                write!(f, " : goto {}", Chain::NpCluster)
            }
            Element::ServiceNodePort(_, Scope::Local) => write!(f, " : goto {}", Chain::NpLocal),
            Element::Dispatch(..) => {
                let lb = self.lb_chain().expect("a dispatch element has an lb chain");
                write!(f, " : goto {}", Chain::Lb(lb))
            }
            Element::Backend { addr, port, .. } => write!(f, " : {addr} . {port}"),
            Element::NoEndpoint(_, NoEndpoint::Reject) => {
                write!(f, " : goto {}", Chain::RejectChain)
            }
            Element::NoEndpoint(_, NoEndpoint::Drop) => f.write_str(" : drop"),
            Element::LocalPodCidr(_)
            | Element::ServiceCidr(_)
            | Element::NodePortIp(_)
            | Element::Generation(_)
            | Element::ClusterIp(_)
            | Element::Hairpin(_)
            | Element::FirewallIp(_)
            | Element::FirewallAllow(..) => Ok(()),
        }
    }
}
