//! Resources to nftables objects: the elements a Service port contributes, and the constant
//! chains and node sets that NodeRules decides.
//!
//! Pure functions: the same input always gives the same output, which is what makes
//! element-level diffs (in [`crate::diff`]) and golden tests possible.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::num::NonZeroU32;

use crate::rules::{Endpoint, Family, LocalDetector, NodeRules, ServicePort, Spec};
use crate::{
    AddrKey, Chain, Command, Element, EntryChain, EntryKey, EntryKind, LbChain, NoEndpoint,
    PortKey, Rule, Scope, SetId, Slot, TableName, Transaction,
};

/// The elements one Service port contributes to its family's table, without duplicates.
pub fn service_elements(sp: &ServicePort) -> BTreeSet<Element> {
    let mut out = BTreeSet::new();
    if let Some(ip) = sp.cluster_ip {
        out.insert(Element::ClusterIp(ip));
        cluster_ip_elements(sp, ip, &mut out);
    }
    for &ip in sp.external_ips.iter().chain(&sp.load_balancer_ips) {
        let key = EntryKey::Addr(addr_key(sp, ip));
        external_elements(sp, key, &mut out);
    }
    // loadBalancerSourceRanges guard the load-balancer IPs only (not NodePorts, not
    // externalIPs), for every source, pods included.
    if !sp.load_balancer_source_ranges.is_empty() {
        for &ip in &sp.load_balancer_ips {
            let key = addr_key(sp, ip);
            out.insert(Element::FirewallIp(key));
            for &net in &sp.load_balancer_source_ranges {
                out.insert(Element::FirewallAllow(key, net));
            }
        }
    }
    if let Some(port) = sp.node_port {
        let key = EntryKey::NodePort(PortKey {
            proto: sp.protocol,
            port,
        });
        external_elements(sp, key, &mut out);
    }
    // Hairpin addresses come from the node's `node-endpoints` resources (every endpoint on
    // this node); a port marking an endpoint local adds it too (shared, counted per owner).
    for ep in sp.cluster_endpoints.iter().chain(&sp.local_endpoints) {
        if ep.local {
            out.insert(Element::Hairpin(ep.addr));
        }
    }
    out
}

fn addr_key(sp: &ServicePort, addr: IpAddr) -> AddrKey {
    AddrKey {
        addr,
        proto: sp.protocol,
        port: sp.port,
    }
}

fn cluster_ip_elements(sp: &ServicePort, ip: IpAddr, out: &mut BTreeSet<Element>) {
    let key = addr_key(sp, ip);
    let entry = EntryKey::Addr(key);
    if !sp.has_endpoints() {
        out.insert(Element::NoEndpoint(entry, NoEndpoint::Reject));
    } else if sp.internal_traffic_local {
        out.insert(Element::ServiceIp(key, EntryChain::SvcLocal));
        balance(sp, Scope::Local, entry, &sp.local_endpoints, out);
    } else {
        out.insert(Element::ServiceIp(key, EntryChain::SvcCluster));
        balance(sp, Scope::Cluster, entry, &sp.cluster_endpoints, out);
    }
}

/// External IPs, load-balancer IPs and NodePorts: externalTrafficPolicy applies.
fn external_elements(sp: &ServicePort, key: EntryKey, out: &mut BTreeSet<Element>) {
    if !sp.has_endpoints() {
        out.insert(Element::NoEndpoint(key, NoEndpoint::Reject));
        return;
    }
    let scope = if sp.external_traffic_local {
        Scope::Local
    } else {
        Scope::Cluster
    };
    out.insert(match key {
        EntryKey::Addr(k) => Element::ServiceIp(
            k,
            match scope {
                Scope::Cluster => EntryChain::ExtCluster,
                Scope::Local => EntryChain::ExtLocal,
            },
        ),
        EntryKey::NodePort(k) => Element::ServiceNodePort(k, scope),
    });
    // Both Local and Cluster send pods and the host to every endpoint.
    balance(sp, Scope::Cluster, key, &sp.cluster_endpoints, out);
    if sp.external_traffic_local {
        balance(sp, Scope::Local, key, &sp.local_endpoints, out);
    }
}

/// A dispatch element and one backend element per endpoint; with no endpoints in this scope,
/// the no-endpoint `drop` (a Local policy whose endpoints are all elsewhere).
fn balance(
    sp: &ServicePort,
    scope: Scope,
    key: EntryKey,
    endpoints: &[Endpoint],
    out: &mut BTreeSet<Element>,
) {
    let Some(size) = u32::try_from(endpoints.len())
        .ok()
        .and_then(NonZeroU32::new)
    else {
        out.insert(Element::NoEndpoint(key, NoEndpoint::Drop));
        return;
    };
    out.insert(Element::Dispatch(scope, key, size, sp.affinity));
    for (slot, ep) in (0u32..).zip(endpoints) {
        out.insert(Element::Backend {
            scope,
            key,
            slot,
            addr: ep.addr,
            port: ep.port,
        });
    }
}

/// The elements one resource owns, with the family of the table each goes in: a Service
/// port's, or a `node-endpoints` resource's hairpin pairs. Node settings own none (their sets
/// are rewritten whole).
pub fn owned_elements(spec: &Spec) -> Vec<(Family, Element)> {
    match spec {
        Spec::ServicePort(sp) => service_elements(sp)
            .into_iter()
            .map(|e| (sp.family, e))
            .collect(),
        Spec::NodeEndpoints(ips) => ips
            .iter()
            .map(|&ip| (Family::of(ip), Element::Hairpin(ip)))
            .collect(),
        Spec::Node(_) => Vec::new(),
    }
}

/// The node sets' elements for one family.
pub fn node_elements(cfg: &NodeRules, family: Family) -> Vec<Element> {
    let local = cfg
        .local_pod_cidrs(family)
        .into_iter()
        .map(Element::LocalPodCidr);
    let service = cfg
        .service_cidrs(family)
        .into_iter()
        .map(Element::ServiceCidr);
    let nodeport = cfg
        .node_port_ips(family)
        .into_iter()
        .map(Element::NodePortIp);
    local.chain(service).chain(nodeport).collect()
}

/// The matches for "from one of this node's pods" and its negation, as kube-proxy's local
/// traffic detector writes them (`iifname`, not `iif`, which needs the interface to exist);
/// `None` where there is no detector (a CIDR mode without a CIDR of this family): then
/// nothing is local.
pub fn local_traffic(cfg: &NodeRules, family: Family) -> Option<(String, String)> {
    let iifname = |pattern: String| {
        Some((
            format!("iifname {pattern}"),
            format!("iifname != {pattern}"),
        ))
    };
    match &cfg.local_detector {
        LocalDetector::Cidrs if cfg.local_pod_cidrs(family).is_empty() => None,
        LocalDetector::Cidrs => {
            let (p, set) = (family.nft(), SetId::LocalPodCidrs);
            Some((format!("{p} saddr @{set}"), format!("{p} saddr != @{set}")))
        }
        LocalDetector::Bridge(name) => iifname(nft_string(name.as_str(), false)),
        LocalDetector::Prefix(prefix) => iifname(nft_string(prefix.as_str(), true)),
    }
}

/// `text` as an nft quoted string; with `prefix`, a trailing `*` makes it a prefix match.
/// Interface names hold no character nft treats specially (`InterfaceName`); should one ever
/// hold a `\` or a `*`, it is escaped to match literally, and a `"` (which nft cannot escape
/// inside quotes) is never written.
fn nft_string(text: &str, prefix: bool) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    out.push('"');
    for c in text.chars().filter(|&c| c != '"') {
        if matches!(c, '\\' | '*') {
            out.push('\\');
        }
        out.push(c);
    }
    if prefix {
        out.push('*');
    }
    out.push('"');
    out
}

/// The rules of one constant chain.
pub fn chain_rules(chain: Chain, cfg: &NodeRules, family: Family) -> Vec<Rule> {
    let p = family.nft();
    let addr_vmap = |map: SetId| format!("{p} daddr . meta l4proto . th dport vmap @{map}");
    let port_vmap = |map: SetId| format!("meta l4proto . th dport vmap @{map}");
    let local = local_traffic(cfg, family);
    let ip_c = SetId::Dispatch(EntryKind::Ip, Scope::Cluster);
    let ip_l = SetId::Dispatch(EntryKind::Ip, Scope::Local);
    let np_c = SetId::Dispatch(EntryKind::NodePort, Scope::Cluster);
    let np_l = SetId::Dispatch(EntryKind::NodePort, Scope::Local);
    let nodeport_match = if cfg.node_port_all_addresses {
        format!("fib daddr type local {p} daddr != {}", family.loopback())
    } else {
        format!("{p} daddr @{}", SetId::NodePortIps)
    };
    let masq = Chain::MarkForMasquerade;
    // ClusterIP traffic from anything but the node's pods is masqueraded (all of it with
    // masquerade-all; none of it without a detector, as kube-proxy).
    let cluster_ip_masq = if cfg.masquerade_all {
        Some(format!("jump {masq}"))
    } else {
        local
            .as_ref()
            .map(|(_, not_local)| format!("{not_local} jump {masq}"))
    };
    // externalTrafficPolicy Local: pods and the host reach every endpoint, the rest local ones.
    let ext_local = |vmap: &dyn Fn(SetId) -> String, c: SetId, l: SetId| {
        let mut rules = Vec::new();
        if let Some((is_local, _)) = &local {
            rules.push(format!("{is_local} {}", vmap(c)));
        }
        rules.push(format!("fib saddr type local jump {masq}"));
        rules.push(format!("fib saddr type local {}", vmap(c)));
        rules.push(vmap(l));
        rules
    };
    let rules: Vec<String> = match chain {
        Chain::MarkForMasquerade => vec!["meta mark set meta mark or 0x4000".into()],
        Chain::Masquerading => vec![
            "meta mark & 0x4000 == 0 return".into(),
            "meta mark set meta mark xor 0x4000".into(),
            "masquerade fully-random".into(),
        ],
        Chain::Services => vec![
            addr_vmap(SetId::ServiceIps),
            format!("{nodeport_match} {}", port_vmap(SetId::ServiceNodePorts)),
        ],
        Chain::SvcCluster => cluster_ip_masq
            .into_iter()
            .chain([addr_vmap(ip_c)])
            .collect(),
        Chain::SvcLocal => cluster_ip_masq
            .into_iter()
            .chain([addr_vmap(ip_l)])
            .collect(),
        Chain::ExtCluster => vec![format!("jump {masq}"), addr_vmap(ip_c)],
        Chain::ExtLocal => ext_local(&addr_vmap, ip_c, ip_l),
        Chain::NpCluster => vec![format!("jump {masq}"), port_vmap(np_c)],
        Chain::NpLocal => ext_local(&port_vmap, np_c, np_l),
        Chain::ServiceEndpointsCheck => vec![addr_vmap(SetId::NoEndpointServices)],
        Chain::NodePortEndpointsCheck => {
            vec![format!(
                "{nodeport_match} {}",
                port_vmap(SetId::NoEndpointNodePorts)
            )]
        }
        Chain::ClusterIpsCheck => vec![
            format!("{p} daddr @{} reject", SetId::ClusterIps),
            format!("{p} daddr @{} drop", SetId::ServiceCidrs),
        ],
        // TCP gets a reset rather than an ICMP error: both read as "connection refused", but
        // an ICMP error that arrives while connect() still holds the socket — as it does when
        // the client is on this node and the whole exchange runs in its syscall — is dropped
        // by the kernel (TcpExtLockDroppedIcmps), so the client only learns on its first SYN
        // retransmission, a second later (always, over IPv6). A reset is queued instead.
        Chain::RejectChain => vec![
            "meta l4proto tcp reject with tcp reset".into(),
            "reject".into(),
        ],
        Chain::FirewallCheck => vec![format!(
            "{p} daddr . meta l4proto . th dport @{} {p} daddr . meta l4proto . th dport . {p} saddr != @{} drop",
            SetId::FirewallIps,
            SetId::FirewallAllow
        )],
        Chain::FilterPreroutingPreDnat | Chain::FilterOutputPreDnat => {
            vec![format!("ct state new jump {}", Chain::FirewallCheck)]
        }
        Chain::NatPrerouting | Chain::NatOutput => vec![format!("jump {}", Chain::Services)],
        Chain::NatPostrouting => vec![
            format!("jump {}", Chain::Masquerading),
            format!(
                "ct status dnat {p} saddr . {p} daddr @{} masquerade fully-random",
                SetId::Hairpin
            ),
        ],
        Chain::FilterInput => vec![
            format!("ct state new jump {}", Chain::NodePortEndpointsCheck),
            format!("ct state new jump {}", Chain::ServiceEndpointsCheck),
        ],
        Chain::FilterForward | Chain::FilterOutput => vec![
            format!("ct state new jump {}", Chain::ServiceEndpointsCheck),
            format!("ct state new jump {}", Chain::ClusterIpsCheck),
        ],
        Chain::Lb(lb) => lb_rules(lb, family),
        Chain::Endpoint(slot) => vec![endpoint_rule(slot, family)],
        Chain::AffinityEndpoint(slot, timeout) => vec![
            format!(
                "update @{} {{ {} timeout {timeout}s }}",
                SetId::Sticky(slot),
                sticky_key(slot.kind, family)
            ),
            format!("goto {}", Chain::Endpoint(slot)),
        ],
    };
    rules.into_iter().map(Rule::new).collect()
}

/// What identifies a client of one service entry for affinity: its address and the entry.
fn sticky_key(kind: EntryKind, family: Family) -> String {
    let p = family.nft();
    match kind {
        EntryKind::Ip => format!("{p} saddr . {p} daddr . meta l4proto . th dport"),
        EntryKind::NodePort => format!("{p} saddr . meta l4proto . th dport"),
    }
}

fn slots(lb: LbChain) -> impl Iterator<Item = Slot> {
    (0..lb.size.get()).map(move |index| Slot {
        kind: lb.kind,
        scope: lb.scope,
        index,
    })
}

/// Picks one of `size` endpoint slots at random; with affinity, first the slot this client
/// chose within the timeout, if it still exists (a slot beyond the current size is forgotten).
fn lb_rules(lb: LbChain, family: Family) -> Vec<String> {
    let n = lb.size.get();
    let target = |slot: Slot| match lb.affinity {
        Some(t) => Chain::AffinityEndpoint(slot, t),
        None => Chain::Endpoint(slot),
    };
    let mut rules: Vec<String> = Vec::new();
    if lb.affinity.is_some() {
        let key = sticky_key(lb.kind, family);
        rules.extend(
            slots(lb).map(|slot| format!("{key} @{} goto {}", SetId::Sticky(slot), target(slot))),
        );
    }
    let targets: Vec<String> = slots(lb)
        .map(|slot| format!("{} : goto {}", slot.index, target(slot)))
        .collect();
    rules.push(format!(
        "numgen random mod {n} vmap {{ {} }}",
        targets.join(", ")
    ));
    rules
}

/// DNAT to the endpoint the slot's map holds for the packet's service.
fn endpoint_rule(slot: Slot, family: Family) -> String {
    let p = family.nft();
    let key = match slot.kind {
        EntryKind::Ip => format!("{p} daddr . meta l4proto . th dport"),
        EntryKind::NodePort => "meta l4proto . th dport".into(),
    };
    format!(
        "meta l4proto {{ tcp, udp, sctp }} dnat {p} to {key} map @{}",
        SetId::Endpoints(slot)
    )
}

/// The rules any chain of ours holds (constant or on demand), for repairing it alone.
pub fn rules_of(chain: Chain, cfg: &NodeRules, family: Family) -> Vec<Rule> {
    match chain {
        Chain::Lb(lb) => lb_rules(lb, family).into_iter().map(Rule::new).collect(),
        Chain::Endpoint(slot) => vec![Rule::new(endpoint_rule(slot, family))],
        Chain::AffinityEndpoint(..) => chain_rules(chain, &NodeRules::default(), family),
        _ => chain_rules(chain, cfg, family),
    }
}

/// Commands that (re)create a load-balancing chain: idempotent, even if a chain of that name
/// survived from before a restart. An affinity chain also gets its slots' sticky sets (added,
/// never flushed) and remembering chains.
pub fn lb_chain_commands(lb: LbChain, family: Family) -> Vec<Command> {
    let mut commands = Vec::new();
    if let Some(timeout) = lb.affinity {
        for slot in slots(lb) {
            let chain = Chain::AffinityEndpoint(slot, timeout);
            commands.push(Command::AddSet(SetId::Sticky(slot)));
            commands.push(Command::AddChain(chain));
            commands.push(Command::FlushChain(chain));
            commands.extend(
                chain_rules(chain, &NodeRules::default(), family)
                    .into_iter()
                    .map(|r| Command::AddRule(chain, r)),
            );
        }
    }
    let chain = Chain::Lb(lb);
    commands.push(Command::AddChain(chain));
    commands.push(Command::FlushChain(chain));
    commands.extend(
        lb_rules(lb, family)
            .into_iter()
            .map(|r| Command::AddRule(chain, Rule::new(r))),
    );
    commands
}

/// Commands that (re)create an endpoint slot: its map (emptied: a map the agent does not know
/// may hold stale elements from before a restart) and its DNAT chain.
pub fn slot_commands(slot: Slot, family: Family) -> [Command; 5] {
    let (set, chain) = (SetId::Endpoints(slot), Chain::Endpoint(slot));
    [
        Command::AddSet(set),
        Command::FlushSet(set),
        Command::AddChain(chain),
        Command::FlushChain(chain),
        Command::AddRule(chain, Rule::new(endpoint_rule(slot, family))),
    ]
}

/// What a full table holds for one family.
pub struct FamilyContent<'a> {
    pub family: Family,
    pub node: &'a NodeRules,
    /// Every service element, sorted (so elements of one map are adjacent).
    pub elements: &'a mut dyn Iterator<Item = &'a Element>,
    pub generation: u32,
}

/// Appends the commands that bring a table to exactly `content`, whatever it held before,
/// without deleting it: declarations are idempotent, then everything non-dynamic is flushed and
/// refilled. Load-balancing chains and endpoint slots left over from before stay, unreferenced
/// (a slot's map is emptied when it is used again).
pub fn full_reconcile(tx: &mut Transaction, content: FamilyContent<'_>) {
    let f = content.family;
    tx.push(f, Command::AddTable);
    for set in SetId::ALL {
        tx.push(f, Command::AddSet(set));
    }
    for chain in Chain::CONSTANT {
        tx.push(f, Command::AddChain(chain));
    }
    for set in SetId::ALL {
        tx.push(f, Command::FlushSet(set));
    }
    for chain in Chain::CONSTANT {
        tx.push(f, Command::FlushChain(chain));
        for rule in chain_rules(chain, content.node, f) {
            tx.push(f, Command::AddRule(chain, rule));
        }
    }
    for element in node_elements(content.node, f) {
        tx.push(f, Command::AddElement(element));
    }
    let elements: Vec<&Element> = content.elements.collect();
    let slots: BTreeSet<Slot> = elements.iter().filter_map(|e| e.slot()).collect();
    for slot in slots {
        for command in slot_commands(slot, f) {
            tx.push(f, command);
        }
    }
    let lb_chains: BTreeSet<LbChain> = elements.iter().filter_map(|e| e.lb_chain()).collect();
    for lb in lb_chains {
        for command in lb_chain_commands(lb, f) {
            tx.push(f, command);
        }
    }
    for element in elements {
        tx.push(f, Command::AddElement(*element));
    }
    tx.push(
        f,
        Command::AddElement(Element::Generation(content.generation)),
    );
}

/// A whole table as one transaction text with only the given content (for inspection).
pub fn table_text(table: &TableName, content: FamilyContent<'_>) -> String {
    let mut tx = Transaction::new(table.clone());
    full_reconcile(&mut tx, content);
    tx.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Port, Protocol};

    fn ep(ip: &str, local: bool) -> Endpoint {
        Endpoint {
            addr: ip.parse().unwrap(),
            port: Port::new(8080).unwrap(),
            local,
            ready: true,
        }
    }

    fn svc() -> ServicePort {
        ServicePort {
            family: Family::V4,
            protocol: Protocol::Tcp,
            port: Port::new(80).unwrap(),
            cluster_ip: Some("10.96.0.10".parse().unwrap()),
            node_port: None,
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            external_traffic_local: false,
            internal_traffic_local: false,
            cluster_endpoints: vec![ep("10.1.0.1", true), ep("10.1.1.1", false)],
            local_endpoints: vec![ep("10.1.0.1", true)],
            endpoints_elsewhere: false,
            affinity: None,
            health_check: None,
        }
    }

    fn texts(elems: &BTreeSet<Element>) -> Vec<String> {
        elems.iter().map(|e| format!("{} {e}", e.set())).collect()
    }

    #[test]
    fn cluster_ip_service() {
        assert_eq!(
            texts(&service_elements(&svc())),
            [
                "cluster-ips 10.96.0.10",
                "hairpin 10.1.0.1 . 10.1.0.1",
                "service-ips 10.96.0.10 . tcp . 80 : goto svc-cluster",
                "ip-c-dispatch 10.96.0.10 . tcp . 80 : goto lb-ip-c-2",
                "ip-c-0-eps 10.96.0.10 . tcp . 80 : 10.1.0.1 . 8080",
                "ip-c-1-eps 10.96.0.10 . tcp . 80 : 10.1.1.1 . 8080",
            ]
        );
    }

    #[test]
    fn internal_traffic_local() {
        let mut s = svc();
        s.internal_traffic_local = true;
        let t = texts(&service_elements(&s));
        assert!(t.contains(&"service-ips 10.96.0.10 . tcp . 80 : goto svc-local".into()));
        assert!(t.contains(&"ip-l-dispatch 10.96.0.10 . tcp . 80 : goto lb-ip-l-1".into()));
        assert!(t.contains(&"ip-l-0-eps 10.96.0.10 . tcp . 80 : 10.1.0.1 . 8080".into()));
        s.local_endpoints.clear();
        let t = texts(&service_elements(&s));
        assert!(t.contains(&"no-endpoint-services 10.96.0.10 . tcp . 80 : drop".into()));
        // The entry point stays (per spec); the filter hook drops what NAT did not redirect.
        assert!(t.contains(&"service-ips 10.96.0.10 . tcp . 80 : goto svc-local".into()));
        // The compact form (no path uses the cluster-wide endpoints, so they are not sent):
        // endpoints elsewhere still mean a drop, and none anywhere a reject.
        s.cluster_endpoints.clear();
        s.endpoints_elsewhere = true;
        let t = texts(&service_elements(&s));
        assert!(t.contains(&"no-endpoint-services 10.96.0.10 . tcp . 80 : drop".into()));
        s.endpoints_elsewhere = false;
        let t = texts(&service_elements(&s));
        assert!(
            t.contains(&"no-endpoint-services 10.96.0.10 . tcp . 80 : goto reject-chain".into())
        );
    }

    #[test]
    fn external_traffic_local_node_port() {
        let mut s = svc();
        s.cluster_ip = None;
        s.node_port = Port::new(30080);
        s.external_traffic_local = true;
        assert_eq!(
            texts(&service_elements(&s)),
            [
                "hairpin 10.1.0.1 . 10.1.0.1",
                "service-nodeports tcp . 30080 : goto np-local",
                "np-c-dispatch tcp . 30080 : goto lb-np-c-2",
                "np-l-dispatch tcp . 30080 : goto lb-np-l-1",
                "np-c-0-eps tcp . 30080 : 10.1.0.1 . 8080",
                "np-c-1-eps tcp . 30080 : 10.1.1.1 . 8080",
                "np-l-0-eps tcp . 30080 : 10.1.0.1 . 8080",
            ]
        );
        s.local_endpoints.clear();
        let t = texts(&service_elements(&s));
        assert!(t.contains(&"no-endpoint-nodeports tcp . 30080 : drop".into()));
        assert!(t.contains(&"service-nodeports tcp . 30080 : goto np-local".into()));
    }

    #[test]
    fn no_endpoints_rejects_everywhere() {
        let mut s = svc();
        s.cluster_endpoints.clear();
        s.local_endpoints.clear();
        s.node_port = Port::new(30080);
        s.external_ips = vec!["192.0.2.1".parse().unwrap()];
        s.load_balancer_ips = vec!["192.0.2.2".parse().unwrap()];
        assert_eq!(
            texts(&service_elements(&s)),
            [
                "cluster-ips 10.96.0.10",
                "no-endpoint-services 10.96.0.10 . tcp . 80 : goto reject-chain",
                "no-endpoint-services 192.0.2.1 . tcp . 80 : goto reject-chain",
                "no-endpoint-services 192.0.2.2 . tcp . 80 : goto reject-chain",
                "no-endpoint-nodeports tcp . 30080 : goto reject-chain",
            ]
        );
    }

    #[test]
    fn affinity_remembers_the_slot_per_client_and_entry() {
        let mut s = svc();
        s.affinity = std::num::NonZeroU32::new(30);
        let t = texts(&service_elements(&s));
        assert!(
            t.contains(&"ip-c-dispatch 10.96.0.10 . tcp . 80 : goto lb-ip-c-2-a30".into()),
            "{t:?}"
        );
        let lb = service_elements(&s)
            .iter()
            .find_map(Element::lb_chain)
            .unwrap();
        let mut tx = Transaction::new(TableName::new("kubenft").unwrap());
        for c in lb_chain_commands(lb, Family::V4) {
            tx.push(Family::V4, c);
        }
        let text = tx.to_string();
        assert!(text.contains("add set ip kubenft sticky-ip-c-1"), "{text}");
        assert!(
            !text.contains("flush set sticky"),
            "affinity state must never be flushed: {text}"
        );
        assert!(
            text.contains(
                "ip saddr . ip daddr . meta l4proto . th dport @sticky-ip-c-0 goto ep-ip-c-0-a30"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "numgen random mod 2 vmap { 0 : goto ep-ip-c-0-a30, 1 : goto ep-ip-c-1-a30 }"
            ),
            "{text}"
        );
        assert!(text.contains("update @sticky-ip-c-1 { ip saddr . ip daddr . meta l4proto . th dport timeout 30s }"), "{text}");
    }

    #[test]
    fn masquerade_rule_follows_node_settings() {
        let mut cfg = NodeRules::default();
        let r = |cfg: &NodeRules| -> Vec<String> {
            chain_rules(Chain::SvcCluster, cfg, Family::V4)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(r(&cfg).len(), 1);
        cfg.local_pod_cidrs = vec!["10.1.0.0/16".parse().unwrap()];
        assert_eq!(
            r(&cfg)[0],
            "ip saddr != @local-pod-cidrs jump mark-for-masquerade"
        );
        cfg.masquerade_all = true;
        assert_eq!(r(&cfg)[0], "jump mark-for-masquerade");
        // The v6 family has no cluster CIDR: no detector there.
        cfg.masquerade_all = false;
        assert_eq!(chain_rules(Chain::SvcCluster, &cfg, Family::V6).len(), 1);
    }

    fn rules_of_chain(chain: Chain, cfg: &NodeRules, family: Family) -> Vec<String> {
        chain_rules(chain, cfg, family)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn with_detector(detector: LocalDetector) -> NodeRules {
        NodeRules {
            local_detector: detector,
            ..NodeRules::default()
        }
    }

    /// Each detector gives kube-proxy's match in the two places it is used: ClusterIP
    /// masquerade for what is not local, and the externalTrafficPolicy Local short-circuit
    /// for what is. Interface matches apply to both families; CIDRs to their own.
    #[test]
    fn each_detector_matches_where_kube_proxy_does() {
        let name = |s: &str| crate::rules::InterfaceName::new(s).unwrap();
        let cases = [
            (
                NodeRules {
                    local_pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
                    ..NodeRules::default()
                },
                Family::V4,
                "ip saddr != @local-pod-cidrs",
                "ip saddr @local-pod-cidrs",
            ),
            (
                NodeRules {
                    local_pod_cidrs: vec!["fd00:244:1::/64".parse().unwrap()],
                    ..NodeRules::default()
                },
                Family::V6,
                "ip6 saddr != @local-pod-cidrs",
                "ip6 saddr @local-pod-cidrs",
            ),
            (
                with_detector(LocalDetector::Bridge(name("cbr0"))),
                Family::V4,
                r#"iifname != "cbr0""#,
                r#"iifname "cbr0""#,
            ),
            (
                with_detector(LocalDetector::Bridge(name("cni0"))),
                Family::V6,
                r#"iifname != "cni0""#,
                r#"iifname "cni0""#,
            ),
            (
                with_detector(LocalDetector::Prefix(name("eni"))),
                Family::V4,
                r#"iifname != "eni*""#,
                r#"iifname "eni*""#,
            ),
            (
                with_detector(LocalDetector::Prefix(name("cali"))),
                Family::V6,
                r#"iifname != "cali*""#,
                r#"iifname "cali*""#,
            ),
        ];
        for (cfg, f, not_local, local) in cases {
            let p = f.nft();
            let masq = format!("{not_local} jump mark-for-masquerade");
            for chain in [Chain::SvcCluster, Chain::SvcLocal] {
                assert_eq!(rules_of_chain(chain, &cfg, f)[0], masq, "{chain} {f:?}");
            }
            assert_eq!(
                rules_of_chain(Chain::ExtLocal, &cfg, f)[0],
                format!("{local} {p} daddr . meta l4proto . th dport vmap @ip-c-dispatch")
            );
            assert_eq!(
                rules_of_chain(Chain::NpLocal, &cfg, f)[0],
                format!("{local} meta l4proto . th dport vmap @np-c-dispatch")
            );
            // The host's own traffic is short-circuited (and masqueraded) whatever the mode.
            assert_eq!(
                rules_of_chain(Chain::NpLocal, &cfg, f)[1..3],
                [
                    "fib saddr type local jump mark-for-masquerade",
                    "fib saddr type local meta l4proto . th dport vmap @np-c-dispatch"
                ]
            );
            // External traffic policy Cluster and masquerade-all do not look at the detector.
            assert_eq!(
                rules_of_chain(Chain::ExtCluster, &cfg, f)[0],
                "jump mark-for-masquerade"
            );
            let all = NodeRules {
                masquerade_all: true,
                ..cfg.clone()
            };
            assert_eq!(
                rules_of_chain(Chain::SvcCluster, &all, f)[0],
                "jump mark-for-masquerade"
            );
            // The CIDR set holds CIDRs only in the CIDR modes.
            let cidrs = node_elements(&cfg, f)
                .into_iter()
                .filter(|e| e.set() == SetId::LocalPodCidrs)
                .count();
            let cidr_mode = cfg.local_detector == LocalDetector::Cidrs;
            assert_eq!(
                cidrs,
                usize::from(cidr_mode),
                "{f:?} {:?}",
                cfg.local_detector
            );
        }
        // No detector: no ClusterIP masquerade rule, no pod short-circuit.
        let none = NodeRules::default();
        for f in Family::ALL {
            assert_eq!(rules_of_chain(Chain::SvcCluster, &none, f).len(), 1);
            assert_eq!(rules_of_chain(Chain::NpLocal, &none, f).len(), 3);
        }
    }

    #[test]
    fn nft_strings_never_carry_a_quote_or_an_unescaped_wildcard() {
        assert_eq!(nft_string("cali", true), r#""cali*""#);
        assert_eq!(nft_string("cbr0", false), r#""cbr0""#);
        assert_eq!(nft_string("a*b", false), r#""a\*b""#);
        assert_eq!(
            nft_string(r#"x"; flush ruleset"#, true),
            r#""x; flush ruleset*""#
        );
        assert_eq!(nft_string(r"a\", false), r#""a\\""#);
    }
}
