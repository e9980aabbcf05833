//! Migration from kube-proxy: seeing other programs' Service rules, and removing kube-proxy's.
//!
//! While kube-proxy and kubenft both program a node, both DNAT new connections at the nat
//! hooks. The kernel runs nat base chains in priority order (lower first) and, at equal
//! priority, the chain registered last first; the first chain that DNATs a new connection
//! decides it, later chains are not asked, and established connections follow their conntrack
//! entry whatever the rules say. kube-proxy's nat chains and ours both sit at `dstnat` (-100),
//! so an agent that creates its table after kube-proxy's wins for new connections, and a
//! kube-proxy that restarts (it re-creates its base chains) wins again. Either way traffic
//! works while both are fed the same cluster; once kube-proxy stops, its rules are right
//! only as long as nothing changes, so they are removed at once ([`cleanup`]).
//!
//! - [`detect`] looks, at start and then every few seconds, for kube-proxy's nftables table,
//!   its iptables-nft chains, its iptables-legacy chains (when `iptables-legacy-save` is
//!   installed) and any other table with a nat base chain at prerouting or output, at our
//!   priority or before it, that DNATs: each is a warning (once), a gauge and an entry of
//!   `/healthz`'s `conflicts`.
//! - [`cleanup`] is `--cleanup-kube-proxy`: what `kube-proxy --cleanup` removes (its nftables
//!   tables; its iptables chains and the jumps to them), nothing else.
//!
//! Everything is read with `nft -j list chains` (milliseconds whatever the tables hold; `list
//! tables`, `list table` and `list chain` fetch every element of the sets involved, which
//! takes seconds at 100,000 elements) and, for the few chains that need it, `list chain`.

pub mod cleanup;
pub mod detect;
mod json;
pub mod ports;

pub use json::{ChainInfo, Effects, Hook, ParseError, RuleInfo, parse_chains, parse_rules};

/// kube-proxy's nftables-mode table (one per family, `ip` and `ip6`).
pub const KUBE_PROXY_TABLE: &str = "kube-proxy";

/// The iptables tables kube-proxy writes (through iptables-nft they are nft tables of these
/// names in families `ip` and `ip6`).
pub const IPTABLES_TABLES: [&str; 3] = ["nat", "filter", "mangle"];

/// Chains `kube-proxy --cleanup` deletes from each iptables table, by name (upstream
/// `pkg/proxy/iptables`, `CleanupLeftovers`).
fn kube_proxy_fixed_chains(table: &str) -> &'static [&'static str] {
    match table {
        "nat" => &[
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-PROXY-CANARY",
        ],
        "filter" => &[
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
            "KUBE-PROXY-CANARY",
        ],
        "mangle" => &["KUBE-PROXY-CANARY"],
        _ => &[],
    }
}

/// Per-Service and per-endpoint chains of the nat table (upstream `isServiceChainName`).
const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
];

/// Whether `kube-proxy --cleanup` deletes `chain` of iptables table `table`. Kubelet's chains
/// (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, `KUBE-MARK-DROP`, `KUBE-IPTABLES-HINT`) are not
/// kube-proxy's and are never touched.
pub fn is_kube_proxy_iptables_chain(table: &str, chain: &str) -> bool {
    kube_proxy_fixed_chains(table).contains(&chain)
        || (table == "nat" && SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p)))
}

/// Whether `chain` proves kube-proxy ran in iptables mode: one of its chains other than
/// `KUBE-POSTROUTING` and `KUBE-MARK-MASQ`, which kubelets before 1.24 also created.
pub fn proves_kube_proxy_iptables(table: &str, chain: &str) -> bool {
    is_kube_proxy_iptables_chain(table, chain)
        && !matches!(chain, "KUBE-POSTROUTING" | "KUBE-MARK-MASQ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::Chain;

    #[test]
    fn kube_proxy_chains_and_not_kubelets() {
        for (table, chain) in [
            ("nat", "KUBE-SERVICES"),
            ("nat", "KUBE-SVC-ERIFXISQEP7F7OF4"),
            ("nat", "KUBE-SEP-ZXMNUKOKXUTL2MK2"),
            ("nat", "KUBE-EXT-ABC"),
            ("nat", "KUBE-MARK-MASQ"),
            ("filter", "KUBE-PROXY-FIREWALL"),
            ("filter", "KUBE-EXTERNAL-SERVICES"),
            ("mangle", "KUBE-PROXY-CANARY"),
        ] {
            assert!(
                is_kube_proxy_iptables_chain(table, chain),
                "{table} {chain}"
            );
        }
        for (table, chain) in [
            ("filter", "KUBE-FIREWALL"),
            ("nat", "KUBE-MARK-DROP"),
            ("nat", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-IPTABLES-HINT"),
            ("filter", "KUBE-SVC-ERIFXISQEP7F7OF4"),
            ("nat", "DOCKER"),
            ("kubenft", "KUBE-SERVICES"),
        ] {
            assert!(
                !is_kube_proxy_iptables_chain(table, chain),
                "{table} {chain}"
            );
        }
        assert!(!proves_kube_proxy_iptables("nat", "KUBE-MARK-MASQ"));
        assert!(!proves_kube_proxy_iptables("nat", "KUBE-POSTROUTING"));
        assert!(proves_kube_proxy_iptables("nat", "KUBE-SERVICES"));
    }

    /// The numbers the detection compares with are the priorities the renderer declares.
    #[test]
    fn hooks_match_the_rendered_base_chains() {
        for chain in Chain::CONSTANT {
            let (Some(text), Some(hook)) = (chain.base(), chain.hook()) else {
                assert_eq!(chain.base().is_some(), chain.hook().is_some(), "{chain}");
                continue;
            };
            let prio = text
                .split("priority ")
                .nth(1)
                .and_then(|p| p.split(';').next())
                .unwrap();
            let number = match prio {
                "dstnat" => -100,
                "srcnat" => 100,
                n => n.parse().unwrap(),
            };
            assert_eq!(hook.priority, number, "{chain}");
            assert!(
                text.starts_with(&format!("type {} hook {} ", hook.kind, hook.hook)),
                "{chain}"
            );
        }
    }
}
