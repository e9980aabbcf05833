//! The cluster-wide settings from the controller's command line, and the node-wide rules
//! (`NODE_RESOURCE`) they give each node: where NodePorts are served, what is local traffic.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use kubenft_proto::v1::{DetectLocalMode, IpFamily, NodeRules};

use crate::model::{Limits, NodeModel, family_of};
use crate::port::{AgentFacts, family_name};

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

pub(crate) fn node_rules(
    policy: &ClusterPolicy,
    node: Option<&NodeModel>,
    facts: &AgentFacts,
) -> NodeRules {
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

pub(crate) fn sorted_strings<T: ToString>(items: &[T]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(T::to_string).collect();
    v.sort();
    v.dedup();
    v
}
