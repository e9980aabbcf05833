//! The baseline: the ruleset kube-proxy's nftables mode generates for the same workload
//! (docs/semantics.md §2), rendered as nft text.
//!
//! Per Service port a `service-<hash>-ns/svc/tcp/http` chain (masquerade for off-cluster
//! sources, then `numgen random mod 10 vmap { … }`), per endpoint an `endpoint-<hash>-…__ip/port`
//! chain (hairpin masquerade, `dnat`), the `service-ips` vmap and the `cluster-ips` set. The
//! workload has no session affinity, so no affinity sets (the 214 s figure in
//! docs/decisions/0001-services-as-set-elements.md included 10% affinity Services). A
//! one-endpoint change is what kube-proxy's partial sync sends (docs/semantics.md §4): new
//! endpoint chain, service chain flushed and rewritten, the old endpoint chain flushed
//! (kube-proxy deletes it ≥ 1 s later in a second transaction, not timed here).

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::workload::{CLUSTER_CIDR, Endpoint, SERVICE_CIDR, SERVICE_PORT, Service};

const T: &str = "ip kube-proxy";

/// kube-proxy's chain-name hash: the first 8 characters of base32(sha256(name)).
fn hash8(name: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(name.as_bytes());
    // 8 base32 characters = 40 bits = the first 5 bytes.
    let bits = digest[..5]
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    (0..8)
        .map(|i| ALPHABET[((bits >> (35 - 5 * i)) & 31) as usize] as char)
        .collect()
}

fn port_name(svc: &Service) -> String {
    format!("{}/{}/tcp/http", svc.namespace(), svc.name())
}

fn service_chain(svc: &Service) -> String {
    let name = port_name(svc);
    format!("service-{}-{name}", hash8(&name))
}

fn endpoint_chain(svc: &Service, ep: &Endpoint) -> String {
    let name = format!("{}__{}/{}", port_name(svc), ep.ip, ep.port);
    format!("endpoint-{}-{name}", hash8(&name))
}

/// The fixed part: table, sets and maps, helper chains, then base chains (after the chains
/// they jump to, or nft reports ENOENT).
fn header(out: &mut String) {
    let lines = [
        format!("add table {T} {{ comment \"rules for kube-proxy\" ; }}"),
        format!("add set {T} cluster-ips {{ type ipv4_addr ; }}"),
        format!("add set {T} nodeport-ips {{ type ipv4_addr ; }}"),
        format!(
            "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}"
        ),
        format!("add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; }}"),
        format!(
            "add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}"
        ),
        format!(
            "add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; }}"
        ),
        format!(
            "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}"
        ),
        format!("add chain {T} mark-for-masquerade"),
        format!("add rule {T} mark-for-masquerade mark set mark or 0x4000"),
        format!("add chain {T} masquerading"),
        format!("add rule {T} masquerading mark and 0x4000 == 0 return"),
        format!("add rule {T} masquerading mark set mark xor 0x4000"),
        format!("add rule {T} masquerading masquerade fully-random"),
        format!("add chain {T} reject-chain"),
        format!("add rule {T} reject-chain reject"),
        format!("add chain {T} services"),
        format!("add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"),
        format!(
            "add rule {T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
        ),
        format!("add chain {T} firewall-check"),
        format!(
            "add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
        ),
        format!("add chain {T} service-endpoints-check"),
        format!(
            "add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
        ),
        format!("add chain {T} nodeport-endpoints-check"),
        format!(
            "add rule {T} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
        ),
        format!("add chain {T} cluster-ips-check"),
        format!("add rule {T} cluster-ips-check ip daddr @cluster-ips reject"),
        format!("add rule {T} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop"),
    ];
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
}

fn base_chains(out: &mut String) {
    let base = [
        (
            "filter-prerouting-pre-dnat",
            "filter",
            "prerouting",
            "-110",
            "firewall-check",
        ),
        (
            "filter-output-pre-dnat",
            "filter",
            "output",
            "-110",
            "firewall-check",
        ),
        (
            "filter-input",
            "filter",
            "input",
            "0",
            "nodeport-endpoints-check",
        ),
        (
            "filter-forward",
            "filter",
            "forward",
            "0",
            "service-endpoints-check",
        ),
        (
            "filter-output",
            "filter",
            "output",
            "0",
            "service-endpoints-check",
        ),
        ("nat-prerouting", "nat", "prerouting", "-100", "services"),
        ("nat-output", "nat", "output", "-100", "services"),
        (
            "nat-postrouting",
            "nat",
            "postrouting",
            "100",
            "masquerading",
        ),
    ];
    for (name, kind, hook, prio, target) in base {
        let _ = writeln!(
            out,
            "add chain {T} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
        );
        let guard = if kind == "filter" {
            "ct state new "
        } else {
            ""
        };
        let _ = writeln!(out, "add rule {T} {name} {guard}jump {target}");
    }
    let _ = writeln!(
        out,
        "add rule {T} filter-input ct state new jump service-endpoints-check"
    );
    for name in ["filter-forward", "filter-output"] {
        let _ = writeln!(
            out,
            "add rule {T} {name} ct state new jump cluster-ips-check"
        );
    }
}

/// One endpoint chain with its rules.
fn endpoint(out: &mut String, svc: &Service, ep: &Endpoint) {
    let chain = endpoint_chain(svc, ep);
    let _ = writeln!(out, "add chain {T} {chain}");
    let _ = writeln!(
        out,
        "add rule {T} {chain} ip saddr {} jump mark-for-masquerade",
        ep.ip
    );
    let _ = writeln!(
        out,
        "add rule {T} {chain} meta l4proto tcp dnat to {}:{}",
        ep.ip, ep.port
    );
}

/// The service chain's rules (the chain must exist).
fn service_rules(out: &mut String, svc: &Service) {
    let chain = service_chain(svc);
    let _ = writeln!(
        out,
        "add rule {T} {chain} ip daddr {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        svc.cluster_ip
    );
    let targets: Vec<String> = svc
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", endpoint_chain(svc, ep)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {T} {chain} numgen random mod {} vmap {{ {} }}",
        svc.endpoints.len(),
        targets.join(" , ")
    );
}

/// Everything one Service contributes: endpoint chains, service chain, map elements.
fn service(out: &mut String, svc: &Service) {
    for ep in &svc.endpoints {
        endpoint(out, svc, ep);
    }
    let _ = writeln!(out, "add chain {T} {}", service_chain(svc));
    service_rules(out, svc);
    let _ = writeln!(out, "add element {T} cluster-ips {{ {} }}", svc.cluster_ip);
    let _ = writeln!(
        out,
        "add element {T} service-ips {{ {} . tcp . {SERVICE_PORT} : goto {} }}",
        svc.cluster_ip,
        service_chain(svc)
    );
}

/// The full ruleset as one transaction.
pub fn full(services: impl Iterator<Item = Service>) -> String {
    let mut out = String::new();
    header(&mut out);
    for svc in services {
        service(&mut out, &svc);
    }
    base_chains(&mut out);
    out
}

/// kube-proxy's partial sync for one endpoint of `old` replaced (giving `new`).
pub fn one_endpoint_change(old: &Service, new: &Service) -> String {
    let mut out = String::new();
    for ep in new.endpoints.iter().filter(|e| !old.endpoints.contains(e)) {
        endpoint(&mut out, new, ep);
    }
    let _ = writeln!(out, "flush chain {T} {}", service_chain(new));
    service_rules(&mut out, new);
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(out, "flush chain {T} {}", endpoint_chain(old, ep));
    }
    out
}

/// The delayed deletion of the endpoint chains `old` no longer uses (not timed).
pub fn delete_stale(old: &Service, new: &Service) -> String {
    let mut out = String::new();
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(out, "delete chain {T} {}", endpoint_chain(old, ep));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_base32_of_sha256() {
        // base32(sha256("")) starts with "4OYMIQUY".
        assert_eq!(hash8(""), "4OYMIQUY");
        assert_eq!(hash8("ns1/svc1/tcp/p80").len(), 8);
    }
}
