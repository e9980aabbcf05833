//! `--cleanup-kube-proxy`: removes kube-proxy's rules as `kube-proxy --cleanup` does, and
//! nothing else.
//!
//! - nftables mode: `delete table ip kube-proxy` and `delete table ip6 kube-proxy` (a table
//!   that is not there is not an error), upstream `pkg/proxy/nftables` `CleanupLeftovers`.
//! - iptables mode through iptables-nft (upstream `pkg/proxy/iptables` `CleanupLeftovers`):
//!   per family, first the rules of the `nat` and `filter` tables' base chains that jump to
//!   kube-proxy's chains (one transaction per table, so that its rules stop being used), then
//!   those chains are flushed and deleted (one more transaction per table): `KUBE-SERVICES`,
//!   `KUBE-NODEPORTS`, `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`, `KUBE-PROXY-CANARY` and every
//!   `KUBE-SVC-`, `KUBE-SVL-`, `KUBE-SEP-`, `KUBE-FW-`, `KUBE-EXT-` chain of `nat`;
//!   `KUBE-SERVICES`, `KUBE-EXTERNAL-SERVICES`, `KUBE-FORWARD`, `KUBE-NODEPORTS`,
//!   `KUBE-PROXY-FIREWALL`, `KUBE-PROXY-CANARY` of `filter`; `KUBE-PROXY-CANARY` of `mangle`.
//!   Kubelet's chains stay. As upstream, a chain another program still jumps to cannot be
//!   deleted: that table's second step fails and says so, and the jumps from the base chains
//!   are gone all the same.
//! - iptables-legacy rules are invisible to nft: when `iptables-legacy-save` is installed
//!   and shows kube-proxy's chains, the command fails and says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{
    ChainInfo, IPTABLES_TABLES, KUBE_PROXY_TABLE, RuleInfo, is_kube_proxy_iptables_chain,
    parse_chains, parse_rules,
};
use crate::nft::{AnyFamily, ForeignName, Listing, Nft, NftCli, NftError};

/// One transaction of the cleanup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// kube-proxy's nftables table of one family.
    DeleteTable(AnyFamily),
    /// The rules of an iptables table's base chains that jump to kube-proxy's chains.
    Unlink {
        family: AnyFamily,
        table: &'static str,
        /// (base chain, rule handle, the chain it jumps to).
        rules: Vec<(ForeignName, u64, String)>,
    },
    /// kube-proxy's chains of an iptables table: all flushed, then all deleted.
    DeleteChains {
        family: AnyFamily,
        table: &'static str,
        chains: Vec<ForeignName>,
    },
}

impl Step {
    /// The nft script: only validated names and numbers reach it.
    pub fn script(&self) -> String {
        let mut s = String::new();
        match self {
            Step::DeleteTable(family) => {
                let _ = writeln!(s, "delete table {family} {KUBE_PROXY_TABLE}");
            }
            Step::Unlink {
                family,
                table,
                rules,
            } => {
                for (chain, handle, _) in rules {
                    let _ = writeln!(s, "delete rule {family} {table} {chain} handle {handle}");
                }
            }
            Step::DeleteChains {
                family,
                table,
                chains,
            } => {
                for chain in chains {
                    let _ = writeln!(s, "flush chain {family} {table} {chain}");
                }
                for chain in chains {
                    let _ = writeln!(s, "delete chain {family} {table} {chain}");
                }
            }
        }
        s
    }

    /// What it removes, for the log.
    pub fn describe(&self) -> String {
        match self {
            Step::DeleteTable(family) => format!("table {family} {KUBE_PROXY_TABLE}"),
            Step::Unlink {
                family,
                table,
                rules,
            } => {
                let jumps: Vec<String> = rules
                    .iter()
                    .map(|(chain, handle, target)| format!("{chain} -> {target} (handle {handle})"))
                    .collect();
                format!("jumps in {family} {table}: {}", jumps.join(", "))
            }
            Step::DeleteChains {
                family,
                table,
                chains,
            } => format!("{} kube-proxy chains of {family} {table}", chains.len()),
        }
    }
}

/// The iptables tables (family, name) that hold kube-proxy's chains, with those chains; a
/// chain whose name nft could not take back as an identifier is left alone (and logged).
pub fn kube_proxy_chains(
    chains: &[ChainInfo],
) -> BTreeMap<(AnyFamily, &'static str), Vec<ForeignName>> {
    let mut out: BTreeMap<(AnyFamily, &'static str), Vec<ForeignName>> = BTreeMap::new();
    for c in chains {
        if !matches!(c.family, AnyFamily::Ip | AnyFamily::Ip6) {
            continue;
        }
        let Some(table) = IPTABLES_TABLES.iter().find(|t| **t == c.table) else {
            continue;
        };
        if c.hook.is_some() || !is_kube_proxy_iptables_chain(table, &c.name) {
            continue;
        }
        match ForeignName::new(&c.name) {
            Some(name) => out.entry((c.family, table)).or_default().push(name),
            None => {
                tracing::warn!(family = %c.family, table, chain = %c.name, "a kube-proxy chain with a name nft cannot take back; left alone")
            }
        }
    }
    out
}

/// The base chains of an iptables table (where kube-proxy's jumps are).
pub fn base_chains<'a>(
    chains: &'a [ChainInfo],
    family: AnyFamily,
    table: &str,
) -> Vec<&'a ChainInfo> {
    chains
        .iter()
        .filter(|c| c.family == family && c.table == table && c.hook.is_some())
        .collect()
}

/// The steps for one iptables table, given its kube-proxy chains and the rules of its base
/// chains: the rules that jump to one of those chains, then the chains.
pub fn plan_table(
    family: AnyFamily,
    table: &'static str,
    doomed: &[ForeignName],
    base_rules: &[RuleInfo],
) -> Vec<Step> {
    let is_doomed = |t: &str| doomed.iter().any(|d| d.as_str() == t);
    let rules: Vec<(ForeignName, u64, String)> = base_rules
        .iter()
        .filter_map(|r| {
            let target = r.effects.targets.iter().find(|t| is_doomed(t))?;
            Some((ForeignName::new(&r.chain)?, r.handle, target.clone()))
        })
        .collect();
    let mut steps = Vec::new();
    if !rules.is_empty() {
        steps.push(Step::Unlink {
            family,
            table,
            rules,
        });
    }
    if !doomed.is_empty() {
        steps.push(Step::DeleteChains {
            family,
            table,
            chains: doomed.to_vec(),
        });
    }
    steps
}

/// What failed, by step; the other steps were still run.
#[derive(Debug, thiserror::Error)]
#[error("kube-proxy's rules were not all removed:\n{}", .0.join("\n"))]
pub struct CleanupError(pub Vec<String>);

fn absent(e: &NftError) -> bool {
    matches!(e, NftError::Refused { stderr } if stderr.contains("No such file or directory"))
}

/// Removes kube-proxy's rules; `Ok` with what was removed.
pub async fn run(nft: &NftCli) -> Result<Vec<String>, CleanupError> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for family in [AnyFamily::Ip, AnyFamily::Ip6] {
        let step = Step::DeleteTable(family);
        match nft.run_script(&step.script()).await {
            Ok(()) => done.push(step.describe()),
            Err(e) if absent(&e) => {}
            Err(e) => failed.push(format!("{}: {}", step.describe(), first_line(&e))),
        }
    }
    match iptables_steps(nft).await {
        Ok(steps) => {
            for step in steps {
                match nft.run_script(&step.script()).await {
                    Ok(()) => done.push(step.describe()),
                    Err(e) => failed.push(format!("{}: {}", step.describe(), first_line(&e))),
                }
            }
        }
        Err(e) => failed.push(format!("listing the iptables-nft tables: {e}")),
    }
    failed.extend(legacy_leftovers().await);
    for what in &done {
        tracing::info!(removed = %what, "kube-proxy's rules");
    }
    if failed.is_empty() {
        Ok(done)
    } else {
        Err(CleanupError(failed))
    }
}

/// The iptables-nft steps, from what the kernel holds now.
async fn iptables_steps(nft: &NftCli) -> Result<Vec<Step>, NftError> {
    let chains = parse_chains(&nft.list_json(&Listing::Chains).await?)
        .map_err(|e| NftError::Output(e.to_string()))?;
    let mut steps = Vec::new();
    for ((family, table), doomed) in kube_proxy_chains(&chains) {
        let mut rules = Vec::new();
        for base in base_chains(&chains, family, table) {
            let Some(chain) = ForeignName::new(&base.name) else {
                continue;
            };
            let listing = Listing::Chain {
                family,
                table: ForeignName::new(table).expect("iptables table names are identifiers"),
                chain,
            };
            rules.extend(
                parse_rules(&nft.list_json(&listing).await?)
                    .map_err(|e| NftError::Output(e.to_string()))?,
            );
        }
        steps.extend(plan_table(family, table, &doomed, &rules));
    }
    Ok(steps)
}

/// kube-proxy's iptables-legacy chains, which this command cannot remove.
async fn legacy_leftovers() -> Vec<String> {
    let mut out = Vec::new();
    for (family, tool) in [
        (AnyFamily::Ip, "iptables-legacy-save"),
        (AnyFamily::Ip6, "ip6tables-legacy-save"),
    ] {
        let Some(path) = super::detect::on_path(tool) else {
            continue;
        };
        let Ok(o) = tokio::process::Command::new(&path)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
        else {
            continue;
        };
        for f in super::detect::legacy_findings(&String::from_utf8_lossy(&o.stdout), family) {
            out.push(format!(
                "{} ({}): {}; remove them with kube-proxy's own `kube-proxy --cleanup` run with iptables-legacy",
                f.table, f.source, f.detail
            ));
        }
    }
    out
}

fn first_line(e: &NftError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::{Effects, Hook};

    fn chain(family: AnyFamily, table: &str, name: &str, base: bool) -> ChainInfo {
        ChainInfo {
            family,
            table: table.into(),
            name: name.into(),
            handle: 1,
            hook: base.then(|| Hook {
                kind: "nat".into(),
                hook: "prerouting".into(),
                priority: -100,
            }),
        }
    }

    fn names(n: &[&str]) -> Vec<ForeignName> {
        n.iter().map(|s| ForeignName::new(s).unwrap()).collect()
    }

    #[test]
    fn picks_kube_proxys_chains_and_only_those() {
        use AnyFamily::*;
        let chains = [
            chain(Ip, "nat", "PREROUTING", true),
            chain(Ip, "nat", "KUBE-SERVICES", false),
            chain(Ip, "nat", "KUBE-SVC-ERIFXISQEP7F7OF4", false),
            chain(Ip, "nat", "KUBE-MARK-DROP", false),
            chain(Ip, "nat", "DOCKER", false),
            chain(Ip, "filter", "KUBE-FIREWALL", false),
            chain(Ip, "filter", "KUBE-PROXY-FIREWALL", false),
            chain(Ip6, "mangle", "KUBE-PROXY-CANARY", false),
            chain(Ip6, "mangle", "KUBE-KUBELET-CANARY", false),
            // Same names elsewhere: not iptables tables.
            chain(Inet, "nat", "KUBE-SERVICES", false),
            chain(Ip, "kube-proxy", "KUBE-SERVICES", false),
            chain(Ip, "other", "KUBE-SERVICES", false),
        ];
        let got = kube_proxy_chains(&chains);
        assert_eq!(
            got,
            BTreeMap::from([
                (
                    (Ip, "nat"),
                    names(&["KUBE-SERVICES", "KUBE-SVC-ERIFXISQEP7F7OF4"])
                ),
                ((Ip, "filter"), names(&["KUBE-PROXY-FIREWALL"])),
                ((Ip6, "mangle"), names(&["KUBE-PROXY-CANARY"])),
            ])
        );
        let bases: Vec<&str> = base_chains(&chains, Ip, "nat")
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(bases, ["PREROUTING"]);
    }

    fn rule(chain: &str, handle: u64, targets: &[&str]) -> RuleInfo {
        RuleInfo {
            chain: chain.into(),
            handle,
            effects: Effects {
                dnat: false,
                targets: targets.iter().map(|s| s.to_string()).collect(),
                verdict_maps: vec![],
            },
        }
    }

    #[test]
    fn unlinks_only_the_jumps_into_kube_proxys_chains_then_deletes_them() {
        let doomed = names(&["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-SVC-X"]);
        let base_rules = [
            rule("PREROUTING", 4, &["KUBE-SERVICES"]),
            rule("PREROUTING", 5, &["DOCKER"]),
            rule("OUTPUT", 7, &["KUBE-SERVICES"]),
            rule("POSTROUTING", 9, &["KUBE-POSTROUTING"]),
            rule("POSTROUTING", 10, &[]),
        ];
        let steps = plan_table(AnyFamily::Ip, "nat", &doomed, &base_rules);
        let scripts: Vec<String> = steps.iter().map(Step::script).collect();
        assert_eq!(
            scripts,
            [
                "delete rule ip nat PREROUTING handle 4\n\
                 delete rule ip nat OUTPUT handle 7\n\
                 delete rule ip nat POSTROUTING handle 9\n",
                "flush chain ip nat KUBE-SERVICES\n\
                 flush chain ip nat KUBE-POSTROUTING\n\
                 flush chain ip nat KUBE-SVC-X\n\
                 delete chain ip nat KUBE-SERVICES\n\
                 delete chain ip nat KUBE-POSTROUTING\n\
                 delete chain ip nat KUBE-SVC-X\n",
            ]
        );
        assert!(
            steps[0]
                .describe()
                .contains("PREROUTING -> KUBE-SERVICES (handle 4)")
        );
        // Nothing of kube-proxy's: nothing to do.
        assert!(plan_table(AnyFamily::Ip, "nat", &[], &base_rules[1..2]).is_empty());
        // The canary alone: no jumps to remove.
        let canary = names(&["KUBE-PROXY-CANARY"]);
        let steps = plan_table(AnyFamily::Ip6, "mangle", &canary, &[]);
        assert_eq!(
            steps.iter().map(Step::script).collect::<Vec<_>>(),
            [
                "flush chain ip6 mangle KUBE-PROXY-CANARY\ndelete chain ip6 mangle KUBE-PROXY-CANARY\n"
            ]
        );
        assert_eq!(
            Step::DeleteTable(AnyFamily::Ip6).script(),
            "delete table ip6 kube-proxy\n"
        );
    }
}
