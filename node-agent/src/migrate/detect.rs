//! Finding other programs' Service rules: kube-proxy's (nftables, iptables-nft and, when
//! `iptables-legacy-save` is installed, iptables-legacy) and any other table that DNATs new
//! connections at our nat hooks at our priority or before it.
//!
//! [`run`] checks at start and then every [`MIN_INTERVAL`] (more if a check costs more: a
//! hundred times its cost, at most [`MAX_INTERVAL`]). A finding is logged once when it
//! appears and once when it goes, is a `kubenft_agent_foreign_service_rules` gauge while it
//! lasts, and an entry of `/healthz`'s `conflicts` (which does not fail it: a migration in
//! progress is not a failure).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{
    ChainInfo, IPTABLES_TABLES, KUBE_PROXY_TABLE, RuleInfo, parse_chains, parse_rules,
    proves_kube_proxy_iptables,
};
use crate::health::{Conflict, Health};
use crate::metrics::Metrics;
use crate::nft::{AnyFamily, Chain, ForeignName, Listing, Nft, NftError, TableName};

/// The shortest time between two checks (one `nft -j list chains`: milliseconds).
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);
/// The longest (a check that costs more is spread out to 1% of a core).
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// How often a foreign chain's rules are read again (they cost what its table's sets hold).
const RULES_INTERVAL: Duration = Duration::from_secs(60);
/// How many chains one DNAT search lists at most, from a base chain through its jumps.
const WALK_LIMIT: usize = 16;
/// How long `iptables-legacy-save` may run.
const LEGACY_TIMEOUT: Duration = Duration::from_secs(10);

/// Whose rules these are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// `table ip|ip6 kube-proxy`.
    KubeProxyNftables,
    /// kube-proxy's chains in iptables-nft's `nat`, `filter` or `mangle` table.
    KubeProxyIptables,
    /// kube-proxy's chains in iptables-legacy (invisible to nft).
    KubeProxyIptablesLegacy,
    /// Another table whose nat chain DNATs at our hook at our priority or before it.
    ForeignDnat,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::KubeProxyNftables => "kube-proxy-nftables",
            Source::KubeProxyIptables => "kube-proxy-iptables",
            Source::KubeProxyIptablesLegacy => "kube-proxy-iptables-legacy",
            Source::ForeignDnat => "foreign-dnat",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One table holding Service rules that are not ours.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub source: Source,
    /// `FAMILY NAME`, e.g. `ip kube-proxy`.
    pub table: String,
    /// What was seen, for an operator.
    pub detail: String,
}

impl Finding {
    fn key(&self) -> (Source, String) {
        (self.source, self.table.clone())
    }
}

/// Our nat hooks' priorities (from the renderer's base chains).
#[derive(Clone, Debug)]
pub struct Ours {
    pub table: TableName,
    pub prerouting: i64,
    pub output: i64,
}

impl Ours {
    pub fn new(table: TableName) -> Ours {
        let prio = |c: Chain| c.hook().map_or(-100, |h| i64::from(h.priority));
        Ours {
            table,
            prerouting: prio(Chain::NatPrerouting),
            output: prio(Chain::NatOutput),
        }
    }

    fn owns(&self, c: &ChainInfo) -> bool {
        matches!(c.family, AnyFamily::Ip | AnyFamily::Ip6) && c.table == self.table.as_str()
    }

    /// Our priority at `hook`, if we DNAT there.
    fn priority_at(&self, hook: &str) -> Option<i64> {
        match hook {
            "prerouting" => Some(self.prerouting),
            "output" => Some(self.output),
            _ => None,
        }
    }
}

fn is_kube_proxy_nft(c: &ChainInfo) -> bool {
    matches!(c.family, AnyFamily::Ip | AnyFamily::Ip6) && c.table == KUBE_PROXY_TABLE
}

fn is_iptables_table(family: AnyFamily, table: &str) -> bool {
    matches!(family, AnyFamily::Ip | AnyFamily::Ip6) && IPTABLES_TABLES.contains(&table)
}

/// A few names, then how many more.
fn some_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    let shown = names.iter().take(4).copied().collect::<Vec<_>>().join(", ");
    match names.len() {
        n if n > 4 => format!("{shown} and {} more", n - 4),
        _ => shown,
    }
}

/// kube-proxy's own tables and chains among every chain nft lists.
pub fn kube_proxy_findings(chains: &[ChainInfo], ours: &Ours) -> Vec<Finding> {
    let mut tables: BTreeMap<(Source, String), Vec<&ChainInfo>> = BTreeMap::new();
    for c in chains {
        let source = if is_kube_proxy_nft(c) {
            Source::KubeProxyNftables
        } else if is_iptables_table(c.family, &c.table)
            && proves_kube_proxy_iptables(&c.table, &c.name)
        {
            Source::KubeProxyIptables
        } else {
            continue;
        };
        tables
            .entry((source, format!("{} {}", c.family, c.table)))
            .or_default()
            .push(c);
    }
    tables
        .into_iter()
        .map(|((source, table), chains)| {
            let detail = match source {
                Source::KubeProxyNftables => {
                    let nat: Vec<String> = chains
                        .iter()
                        .filter_map(|c| c.hook.as_ref().map(|h| (c, h)))
                        .filter(|(_, h)| h.kind == "nat" && ours.priority_at(&h.hook).is_some())
                        .map(|(c, h)| format!("{} at {} priority {}", c.name, h.hook, h.priority))
                        .collect();
                    format!(
                        "kube-proxy's nftables table, {} chains; its nat chains: {} (ours: priority {}; at equal priority the chain registered last sees new connections first)",
                        chains.len(),
                        nat.join(", "),
                        ours.prerouting
                    )
                }
                _ => format!(
                    "kube-proxy's iptables chains (through iptables-nft): {}",
                    some_names(chains.iter().map(|c| c.name.as_str()))
                ),
            };
            Finding {
                source,
                table,
                detail,
            }
        })
        .collect()
}

/// Other tables' nat base chains at prerouting or output whose priority is ours or lower:
/// they see new connections first (at equal priority, the one registered last does).
pub fn dnat_candidates<'a>(chains: &'a [ChainInfo], ours: &Ours) -> Vec<&'a ChainInfo> {
    chains
        .iter()
        .filter(|c| matches!(c.family, AnyFamily::Ip | AnyFamily::Ip6 | AnyFamily::Inet))
        .filter(|c| !ours.owns(c) && !is_kube_proxy_nft(c))
        .filter(|c| {
            c.hook.as_ref().is_some_and(|h| {
                h.kind == "nat" && ours.priority_at(&h.hook).is_some_and(|p| h.priority <= p)
            })
        })
        .collect()
}

/// A search for DNAT from one base chain through the chains it jumps to, one listing at a
/// time (at most [`WALK_LIMIT`]). Jumps into kube-proxy's iptables chains are not followed:
/// those are reported as kube-proxy's.
#[derive(Debug)]
pub struct Walk {
    family: AnyFamily,
    table: String,
    queue: VecDeque<String>,
    seen: BTreeSet<String>,
    listed: usize,
}

impl Walk {
    pub fn new(start: &ChainInfo) -> Walk {
        Walk {
            family: start.family,
            table: start.table.clone(),
            queue: VecDeque::from([start.name.clone()]),
            seen: BTreeSet::from([start.name.clone()]),
            listed: 0,
        }
    }

    /// The next chain to list, or `None` when the search is over.
    pub fn next_chain(&mut self) -> Option<String> {
        if self.listed == WALK_LIMIT {
            return None;
        }
        let next = self.queue.pop_front()?;
        self.listed += 1;
        Some(next)
    }

    /// Looks at the rules of a chain listed; `Some(why)` if they can DNAT.
    pub fn visit(&mut self, chain: &str, rules: &[RuleInfo]) -> Option<String> {
        for rule in rules {
            let e = &rule.effects;
            if e.dnat {
                return Some(format!("chain {chain} DNATs (rule handle {})", rule.handle));
            }
            if let Some(map) = e.verdict_maps.first() {
                return Some(format!(
                    "chain {chain} dispatches through verdict map @{map} (rule handle {}), which may DNAT",
                    rule.handle
                ));
            }
            for target in &e.targets {
                let kube_proxy = is_iptables_table(self.family, &self.table)
                    && super::is_kube_proxy_iptables_chain(&self.table, target);
                if !kube_proxy && self.seen.insert(target.clone()) {
                    self.queue.push_back(target.clone());
                }
            }
        }
        None
    }
}

/// kube-proxy's chains in an `iptables-legacy-save` (or `ip6tables-legacy-save`) listing.
pub fn legacy_findings(save: &str, family: AnyFamily) -> Vec<Finding> {
    let mut table = "";
    let mut found: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if proves_kube_proxy_iptables(table, chain) {
                found.entry(table).or_default().push(chain);
            }
        }
    }
    found
        .into_iter()
        .map(|(table, chains)| Finding {
            source: Source::KubeProxyIptablesLegacy,
            table: format!("{family} {table}"),
            detail: format!(
                "kube-proxy's iptables-legacy chains (invisible to nft, not removed by --cleanup-kube-proxy): {}",
                some_names(chains)
            ),
        })
        .collect()
}

/// What one candidate's search found, and when.
struct Searched {
    dnat: Option<String>,
    at: Instant,
    cost: Duration,
}

/// The detection's memory: rule searches (their listings cost what a foreign table's sets
/// hold, so they are repeated only every [`RULES_INTERVAL`] or a hundred times their cost).
pub struct Detector {
    ours: Ours,
    searched: HashMap<(AnyFamily, String, String, u64), Searched>,
    legacy: Option<Legacy>,
}

struct Legacy {
    tools: Vec<(AnyFamily, PathBuf)>,
    due: Instant,
    last: Vec<Finding>,
}

impl Detector {
    pub fn new(table: TableName) -> Detector {
        let tools: Vec<(AnyFamily, PathBuf)> = [
            (AnyFamily::Ip, "iptables-legacy-save"),
            (AnyFamily::Ip6, "ip6tables-legacy-save"),
        ]
        .into_iter()
        .filter_map(|(f, name)| on_path(name).map(|p| (f, p)))
        .collect();
        Detector {
            ours: Ours::new(table),
            searched: HashMap::new(),
            legacy: (!tools.is_empty()).then(|| Legacy {
                tools,
                due: Instant::now(),
                last: Vec::new(),
            }),
        }
    }

    /// Everything that conflicts now, sorted.
    pub async fn check<N: Nft>(&mut self, nft: &N) -> Result<Vec<Finding>, NftError> {
        let chains = parse_chains(&nft.list_json(&Listing::Chains).await?)
            .map_err(|e| NftError::Output(e.to_string()))?;
        let mut findings = kube_proxy_findings(&chains, &self.ours);
        let candidates = dnat_candidates(&chains, &self.ours);
        let keys: BTreeSet<_> = candidates.iter().map(|c| key(c)).collect();
        self.searched.retain(|k, _| keys.contains(k));
        for c in candidates {
            if let Some(detail) = self.search(nft, c).await {
                let h = c.hook.as_ref().expect("candidates are base chains");
                findings.push(Finding {
                    source: Source::ForeignDnat,
                    table: format!("{} {}", c.family, c.table),
                    detail: format!(
                        "base chain {} (type nat hook {} priority {}, ours {}) sees new connections before us: {detail}",
                        c.name,
                        h.hook,
                        h.priority,
                        self.ours.priority_at(&h.hook).unwrap_or_default()
                    ),
                });
            }
        }
        if let Some(legacy) = &mut self.legacy {
            if Instant::now() >= legacy.due {
                let started = Instant::now();
                legacy.last = legacy_check(&legacy.tools).await;
                legacy.due = Instant::now() + interval(started.elapsed()).max(MAX_INTERVAL);
            }
            findings.extend(legacy.last.iter().cloned());
        }
        findings.sort();
        // One entry per table and source (a table with two DNATing base chains is one).
        findings.dedup_by(|a, b| a.key() == b.key());
        Ok(findings)
    }

    /// Whether a candidate can DNAT, from memory if it was searched recently.
    async fn search<N: Nft>(&mut self, nft: &N, c: &ChainInfo) -> Option<String> {
        let k = key(c);
        if let Some(s) = self.searched.get(&k)
            && s.at.elapsed() < RULES_INTERVAL.max(s.cost * 100)
        {
            return s.dnat.clone();
        }
        let started = Instant::now();
        let dnat = match walk(nft, c).await {
            Ok(dnat) => dnat,
            Err(e) => {
                tracing::debug!(table = %c.table, chain = %c.name, error = %e, "cannot read a foreign nat chain");
                // Unknown: keep what was known.
                return self.searched.get(&k).and_then(|s| s.dnat.clone());
            }
        };
        self.searched.insert(
            k,
            Searched {
                dnat: dnat.clone(),
                at: Instant::now(),
                cost: started.elapsed(),
            },
        );
        dnat
    }
}

fn key(c: &ChainInfo) -> (AnyFamily, String, String, u64) {
    (c.family, c.table.clone(), c.name.clone(), c.handle)
}

/// Searches one candidate's chains for DNAT. A chain whose name nft could not take back as
/// an identifier is not listed: it counts as able to DNAT.
async fn walk<N: Nft>(nft: &N, start: &ChainInfo) -> Result<Option<String>, NftError> {
    let Some(table) = ForeignName::new(&start.table) else {
        return Ok(Some(format!(
            "table name {:?} cannot be listed",
            start.table
        )));
    };
    let mut walk = Walk::new(start);
    while let Some(chain) = walk.next_chain() {
        let Some(name) = ForeignName::new(&chain) else {
            return Ok(Some(format!("chain {chain:?} cannot be listed")));
        };
        let listing = Listing::Chain {
            family: start.family,
            table: table.clone(),
            chain: name,
        };
        let rules = parse_rules(&nft.list_json(&listing).await?)
            .map_err(|e| NftError::Output(e.to_string()))?;
        if let Some(why) = walk.visit(&chain, &rules) {
            return Ok(Some(why));
        }
    }
    Ok(None)
}

/// kube-proxy's iptables-legacy chains, from each `*-legacy-save` found on PATH.
async fn legacy_check(tools: &[(AnyFamily, PathBuf)]) -> Vec<Finding> {
    let mut out = Vec::new();
    for (family, tool) in tools {
        let run = tokio::process::Command::new(tool)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(LEGACY_TIMEOUT, run).await {
            Ok(Ok(o)) if o.status.success() => {
                out.extend(legacy_findings(
                    &String::from_utf8_lossy(&o.stdout),
                    *family,
                ));
            }
            Ok(Ok(o)) => {
                tracing::debug!(tool = %tool.display(), status = %o.status, "iptables-legacy-save failed")
            }
            Ok(Err(e)) => {
                tracing::debug!(tool = %tool.display(), error = %e, "cannot run iptables-legacy-save")
            }
            Err(_) => tracing::debug!(tool = %tool.display(), "iptables-legacy-save timed out"),
        }
    }
    out
}

/// An executable named `name` in a directory of `$PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The time to the next check after one that cost `cost`.
pub fn interval(cost: Duration) -> Duration {
    (cost * 100).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// What changed between two checks: findings that appeared, and those gone.
pub fn changes<'a>(
    before: &'a [Finding],
    now: &'a [Finding],
) -> (Vec<&'a Finding>, Vec<&'a Finding>) {
    let keys = |fs: &[Finding]| fs.iter().map(Finding::key).collect::<BTreeSet<_>>();
    let (was, is) = (keys(before), keys(now));
    (
        now.iter().filter(|f| !was.contains(&f.key())).collect(),
        before.iter().filter(|f| !is.contains(&f.key())).collect(),
    )
}

/// Checks until cancelled, and reports: a warning when a finding appears, a line when it
/// goes, the gauge, and `/healthz`'s `conflicts`.
pub async fn run<N: Nft>(
    nft: Arc<N>,
    table: TableName,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut detector = Detector::new(table);
    if detector.legacy.is_none() {
        tracing::debug!(
            "iptables-legacy-save is not on PATH: kube-proxy's iptables-legacy rules are not looked for"
        );
    }
    let mut known: Vec<Finding> = Vec::new();
    loop {
        let started = Instant::now();
        match detector.check(nft.as_ref()).await {
            Ok(found) => {
                report(&known, &found, &health, &metrics);
                known = found;
            }
            Err(e) => tracing::debug!(error = %e, "cannot look for other programs' Service rules"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval(started.elapsed())) => {}
        }
    }
}

fn report(before: &[Finding], now: &[Finding], health: &Health, metrics: &Metrics) {
    let (appeared, gone) = changes(before, now);
    for f in appeared {
        tracing::warn!(
            source = %f.source,
            table = %f.table,
            detail = %f.detail,
            "another program's Service rules are on this node (see the migration from kube-proxy in deploy/README.md)"
        );
        metrics.foreign_service_rules(f.source.as_str(), &f.table, true);
    }
    for f in gone {
        tracing::info!(source = %f.source, table = %f.table, "another program's Service rules are gone");
        metrics.foreign_service_rules(f.source.as_str(), &f.table, false);
    }
    health.set_conflicts(
        now.iter()
            .map(|f| Conflict {
                source: f.source.as_str(),
                table: f.table.clone(),
                detail: f.detail.clone(),
            })
            .collect(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::{Effects, Hook};

    fn chain(
        family: AnyFamily,
        table: &str,
        name: &str,
        hook: Option<(&str, &str, i64)>,
    ) -> ChainInfo {
        ChainInfo {
            family,
            table: table.into(),
            name: name.into(),
            handle: 1,
            hook: hook.map(|(kind, hook, priority)| Hook {
                kind: kind.into(),
                hook: hook.into(),
                priority,
            }),
        }
    }

    fn ours() -> Ours {
        Ours::new(TableName::default())
    }

    /// A node in the middle of a migration: kube-proxy's nftables tables, its iptables-nft
    /// chains beside kubelet's and Docker's, ours, and tables at other hooks and priorities.
    fn node() -> Vec<ChainInfo> {
        use AnyFamily::*;
        vec![
            chain(
                Ip,
                "kubenft",
                "nat-prerouting",
                Some(("nat", "prerouting", -100)),
            ),
            chain(Ip6, "kubenft", "nat-output", Some(("nat", "output", -100))),
            chain(Ip, "kube-proxy", "services", None),
            chain(
                Ip,
                "kube-proxy",
                "nat-prerouting",
                Some(("nat", "prerouting", -100)),
            ),
            chain(
                Ip,
                "kube-proxy",
                "nat-output",
                Some(("nat", "output", -100)),
            ),
            chain(
                Ip,
                "kube-proxy",
                "filter-input",
                Some(("filter", "input", 0)),
            ),
            chain(Ip6, "kube-proxy", "services", None),
            chain(Ip, "nat", "PREROUTING", Some(("nat", "prerouting", -100))),
            chain(Ip, "nat", "POSTROUTING", Some(("nat", "postrouting", 100))),
            chain(Ip, "nat", "KUBE-SERVICES", None),
            chain(Ip, "nat", "KUBE-MARK-MASQ", None),
            chain(Ip, "nat", "KUBE-SVC-AAAA", None),
            chain(Ip, "nat", "DOCKER", None),
            chain(Ip, "filter", "INPUT", Some(("filter", "input", 0))),
            chain(Ip, "filter", "KUBE-FIREWALL", None),
            // Only kubelet's (and an old kubelet's masquerade chains): not kube-proxy.
            chain(Ip6, "nat", "KUBE-MARK-MASQ", None),
            chain(Ip6, "nat", "KUBE-POSTROUTING", None),
            chain(Ip6, "filter", "KUBE-FIREWALL", None),
            // Foreign nat chains: before us, at our priority, after us, at postrouting.
            chain(Inet, "early", "pre", Some(("nat", "prerouting", -150))),
            chain(Ip6, "same", "out", Some(("nat", "output", -100))),
            chain(Ip, "late", "pre", Some(("nat", "prerouting", -90))),
            chain(Ip, "snat", "post", Some(("nat", "postrouting", -200))),
            chain(Ip, "filt", "pre", Some(("filter", "prerouting", -300))),
            // Our name in another family is not ours.
            chain(Inet, "kubenft", "pre", Some(("nat", "prerouting", -100))),
        ]
    }

    #[test]
    fn finds_kube_proxy_in_both_modes_and_nothing_of_kubelet() {
        let found = kube_proxy_findings(&node(), &ours());
        let keys: Vec<(Source, &str)> =
            found.iter().map(|f| (f.source, f.table.as_str())).collect();
        assert_eq!(
            keys,
            [
                (Source::KubeProxyNftables, "ip kube-proxy"),
                (Source::KubeProxyNftables, "ip6 kube-proxy"),
                (Source::KubeProxyIptables, "ip nat"),
            ]
        );
        assert!(
            found[0]
                .detail
                .contains("nat-prerouting at prerouting priority -100"),
            "{}",
            found[0].detail
        );
        assert!(
            found[0]
                .detail
                .contains("nat-output at output priority -100"),
            "{}",
            found[0].detail
        );
        assert!(
            !found[0].detail.contains("filter-input"),
            "{}",
            found[0].detail
        );
        assert!(
            found[2].detail.contains("KUBE-SERVICES, KUBE-SVC-AAAA"),
            "{}",
            found[2].detail
        );
        assert!(!found[2].detail.contains("DOCKER"), "{}", found[2].detail);
        assert!(
            !found[2].detail.contains("KUBE-MARK-MASQ"),
            "{}",
            found[2].detail
        );
    }

    #[test]
    fn candidates_are_other_nat_chains_at_or_before_our_priority() {
        let chains = node();
        let got: Vec<(String, &str)> = dnat_candidates(&chains, &ours())
            .into_iter()
            .map(|c| (format!("{} {}", c.family, c.table), c.name.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("ip nat".to_string(), "PREROUTING"),
                ("inet early".to_string(), "pre"),
                ("ip6 same".to_string(), "out"),
                ("inet kubenft".to_string(), "pre"),
            ]
        );
    }

    fn rule(handle: u64, dnat: bool, targets: &[&str], maps: &[&str]) -> RuleInfo {
        RuleInfo {
            chain: String::new(),
            handle,
            effects: Effects {
                dnat,
                targets: targets.iter().map(|s| s.to_string()).collect(),
                verdict_maps: maps.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    /// Drives a walk over a table given as chain name → rules.
    fn walk_over(
        start: &ChainInfo,
        table: &BTreeMap<&str, Vec<RuleInfo>>,
    ) -> (Option<String>, Vec<String>) {
        let mut w = Walk::new(start);
        let mut listed = Vec::new();
        while let Some(c) = w.next_chain() {
            listed.push(c.clone());
            let rules = table.get(c.as_str()).cloned().unwrap_or_default();
            if let Some(why) = w.visit(&c, &rules) {
                return (Some(why), listed);
            }
        }
        (None, listed)
    }

    #[test]
    fn walks_jumps_to_find_dnat_and_leaves_kube_proxy_to_its_own_report() {
        let pre = chain(
            AnyFamily::Ip,
            "nat",
            "PREROUTING",
            Some(("nat", "prerouting", -100)),
        );
        // iptables-nft with kube-proxy and Docker: DOCKER's rule DNATs.
        let table = BTreeMap::from([
            (
                "PREROUTING",
                vec![
                    rule(1, false, &["KUBE-SERVICES"], &[]),
                    rule(2, false, &["DOCKER"], &[]),
                ],
            ),
            (
                "KUBE-SERVICES",
                vec![rule(3, false, &["KUBE-SVC-AAAA"], &[])],
            ),
            (
                "DOCKER",
                vec![rule(4, false, &[], &[]), rule(5, true, &[], &[])],
            ),
        ]);
        let (why, listed) = walk_over(&pre, &table);
        assert_eq!(listed, ["PREROUTING", "DOCKER"]);
        assert_eq!(why.as_deref(), Some("chain DOCKER DNATs (rule handle 5)"));
        // kube-proxy's jump alone is not a foreign DNAT.
        let only_kube =
            BTreeMap::from([("PREROUTING", vec![rule(1, false, &["KUBE-SERVICES"], &[])])]);
        assert_eq!(
            walk_over(&pre, &only_kube),
            (None, vec!["PREROUTING".into()])
        );
        // In another table, a chain called KUBE-SERVICES is just a chain; a named verdict
        // map counts as DNAT; loops end.
        let other = chain(
            AnyFamily::Inet,
            "cni",
            "pre",
            Some(("nat", "prerouting", -100)),
        );
        let loops = BTreeMap::from([
            ("pre", vec![rule(1, false, &["KUBE-SERVICES", "pre"], &[])]),
            ("KUBE-SERVICES", vec![rule(2, false, &["pre"], &["svc"])]),
        ]);
        let (why, _) = walk_over(&other, &loops);
        assert!(why.unwrap().contains("verdict map @svc"));
        let cycle = BTreeMap::from([
            ("pre", vec![rule(1, false, &["a"], &[])]),
            ("a", vec![rule(2, false, &["pre"], &[])]),
        ]);
        assert_eq!(walk_over(&other, &cycle).0, None);
    }

    #[test]
    fn a_walk_lists_at_most_its_limit() {
        let start = chain(AnyFamily::Ip, "t", "c0", Some(("nat", "prerouting", -100)));
        let names: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
        let table: BTreeMap<&str, Vec<RuleInfo>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let next = format!("c{}", i + 1);
                (n.as_str(), vec![rule(1, i == 39, &[next.as_str()], &[])])
            })
            .collect();
        let (why, listed) = walk_over(&start, &table);
        assert_eq!((why, listed.len()), (None, WALK_LIMIT));
    }

    #[test]
    fn reads_iptables_legacy_save() {
        let save = "# Generated by iptables-save v1.8.9\n*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n\
                    *nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n\
                    -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n\
                    *filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\nCOMMIT\n";
        let found = legacy_findings(save, AnyFamily::Ip);
        let keys: Vec<(&str, &str)> = found
            .iter()
            .map(|f| (f.source.as_str(), f.table.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("kube-proxy-iptables-legacy", "ip mangle"),
                ("kube-proxy-iptables-legacy", "ip nat")
            ]
        );
        assert!(
            found[1].detail.ends_with("KUBE-SERVICES, KUBE-SVC-X"),
            "{}",
            found[1].detail
        );
        assert!(
            legacy_findings("*filter\n:KUBE-FIREWALL - [0:0]\nCOMMIT\n", AnyFamily::Ip6).is_empty()
        );
    }

    #[test]
    fn reports_appearances_and_departures_once() {
        let f = |s: Source, t: &str, d: &str| Finding {
            source: s,
            table: t.into(),
            detail: d.into(),
        };
        let a = f(Source::KubeProxyNftables, "ip kube-proxy", "x");
        let b = f(Source::ForeignDnat, "ip other", "y");
        let b2 = f(Source::ForeignDnat, "ip other", "changed detail");
        let before = [a.clone(), b];
        let (appeared, gone) = changes(&before, std::slice::from_ref(&b2));
        assert!(appeared.is_empty());
        assert_eq!(gone, [&a]);
        let (appeared, gone) = changes(&[], &before);
        assert_eq!((appeared.len(), gone.len()), (2, 0));
    }

    #[test]
    fn checks_are_spread_out_by_their_cost() {
        assert_eq!(interval(Duration::from_millis(4)), MIN_INTERVAL);
        assert_eq!(
            interval(Duration::from_millis(200)),
            Duration::from_secs(20)
        );
        assert_eq!(interval(Duration::from_secs(3)), MAX_INTERVAL);
    }
}
