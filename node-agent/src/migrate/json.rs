//! Reading nft's JSON listings of other programs' chains and rules: only what the migration
//! needs (names, hooks, handles, and what a rule can do to a new connection).

use serde_json::Value;

use crate::nft::AnyFamily;

/// nft printed something that is not its JSON listing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected nft JSON: {0}")]
pub struct ParseError(String);

/// A chain as `nft -j list chains` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainInfo {
    pub family: AnyFamily,
    pub table: String,
    pub name: String,
    pub handle: u64,
    /// Set for base chains.
    pub hook: Option<Hook>,
}

/// A base chain's type, hook and priority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// `nat`, `filter` or `route`.
    pub kind: String,
    pub hook: String,
    pub priority: i64,
}

/// One rule of a `nft -j list chain` listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub chain: String,
    pub handle: u64,
    pub effects: Effects,
}

/// What a rule can do to a new connection's destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// A `dnat` or `redirect` statement (or iptables-nft's `DNAT`/`REDIRECT` target).
    pub dnat: bool,
    /// Chains it jumps or goes to (directly or through an anonymous verdict map).
    pub targets: Vec<String>,
    /// Named verdict maps it looks up (their elements may send anywhere in the table).
    pub verdict_maps: Vec<String>,
}

fn objects(json: &str) -> Result<Vec<Value>, ParseError> {
    let mut doc: Value = serde_json::from_str(json).map_err(|e| ParseError(e.to_string()))?;
    match doc.get_mut("nftables").map(Value::take) {
        Some(Value::Array(objects)) => Ok(objects),
        _ => Err(ParseError("no \"nftables\" array".into())),
    }
}

/// Every chain of a `nft -j list chains` listing. Chains of families nft may add later, or
/// with a priority that is not a number, are left out (and logged).
pub fn parse_chains(json: &str) -> Result<Vec<ChainInfo>, ParseError> {
    let mut out = Vec::new();
    for object in objects(json)? {
        let Some(c) = object.get("chain") else {
            continue;
        };
        let str_of = |key: &str| c.get(key).and_then(Value::as_str);
        let (Some(family), Some(table), Some(name), Some(handle)) = (
            str_of("family").and_then(AnyFamily::parse),
            str_of("table"),
            str_of("name"),
            c.get("handle").and_then(Value::as_u64),
        ) else {
            tracing::debug!(chain = %c, "a chain nft lists that is not understood; ignored");
            continue;
        };
        let hook = match (str_of("type"), str_of("hook"), c.get("prio")) {
            (Some(kind), Some(hook), Some(prio)) => match prio.as_i64() {
                Some(priority) => Some(Hook {
                    kind: kind.to_owned(),
                    hook: hook.to_owned(),
                    priority,
                }),
                None => {
                    tracing::debug!(chain = %c, "a base chain's priority is not a number; ignored");
                    continue;
                }
            },
            _ => None,
        };
        out.push(ChainInfo {
            family,
            table: table.to_owned(),
            name: name.to_owned(),
            handle,
            hook,
        });
    }
    Ok(out)
}

/// The rules of a `nft -j list chain` listing, in order.
pub fn parse_rules(json: &str) -> Result<Vec<RuleInfo>, ParseError> {
    let mut out = Vec::new();
    for object in objects(json)? {
        let Some(r) = object.get("rule") else {
            continue;
        };
        let (Some(chain), Some(handle)) = (
            r.get("chain").and_then(Value::as_str),
            r.get("handle").and_then(Value::as_u64),
        ) else {
            return Err(ParseError(format!("a rule without chain or handle: {r}")));
        };
        let mut effects = Effects::default();
        if let Some(expr) = r.get("expr") {
            collect(expr, &mut effects);
        }
        out.push(RuleInfo {
            chain: chain.to_owned(),
            handle,
            effects,
        });
    }
    Ok(out)
}

/// Walks a rule's expressions: statements and verdicts can sit at any depth (an anonymous
/// verdict map holds `goto` verdicts inside its elements).
fn collect(v: &Value, effects: &mut Effects) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect(i, effects)),
        Value::Object(map) => {
            for (key, value) in map {
                match key.as_str() {
                    "dnat" | "redirect" => effects.dnat = true,
                    "xt" => {
                        let target = value.get("type").and_then(Value::as_str) == Some("target");
                        let name = value.get("name").and_then(Value::as_str);
                        if target && matches!(name, Some("DNAT" | "REDIRECT")) {
                            effects.dnat = true;
                        }
                    }
                    "jump" | "goto" => {
                        if let Some(t) = value.get("target").and_then(Value::as_str) {
                            effects.targets.push(t.to_owned());
                        }
                    }
                    "vmap" => {
                        if let Some(name) = value
                            .get("data")
                            .and_then(Value::as_str)
                            .and_then(|d| d.strip_prefix('@'))
                        {
                            effects.verdict_maps.push(name.to_owned());
                        }
                    }
                    _ => {}
                }
                collect(value, effects);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chains_with_and_without_hooks() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "ip", "table": "kube-proxy", "name": "nat-prerouting", "handle": 5, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
            {"chain": {"family": "ip6", "table": "nat", "name": "KUBE-SERVICES", "handle": 9}},
            {"chain": {"family": "future", "table": "t", "name": "c", "handle": 1}}]}"#;
        let chains = parse_chains(json).unwrap();
        assert_eq!(
            chains,
            [
                ChainInfo {
                    family: AnyFamily::Ip,
                    table: "kube-proxy".into(),
                    name: "nat-prerouting".into(),
                    handle: 5,
                    hook: Some(Hook {
                        kind: "nat".into(),
                        hook: "prerouting".into(),
                        priority: -100
                    }),
                },
                ChainInfo {
                    family: AnyFamily::Ip6,
                    table: "nat".into(),
                    name: "KUBE-SERVICES".into(),
                    handle: 9,
                    hook: None,
                },
            ]
        );
        assert!(parse_chains("not json").is_err());
        assert!(parse_chains(r#"{"other": []}"#).is_err());
    }

    #[test]
    fn reads_what_rules_can_do() {
        // nft 1.0.6's JSON for: `ip daddr 10.96.0.1 tcp dport 80 dnat to 10.244.1.11:8080`,
        // `jump KUBE-SERVICES` (with an iptables comment), an anonymous vmap of gotos, a
        // named vmap, iptables-nft's untranslated DNAT target, and a plain counter.
        let json = r#"{"nftables": [
          {"chain": {"family": "ip", "table": "t", "name": "pre", "handle": 1}},
          {"rule": {"family": "ip", "table": "t", "chain": "pre", "handle": 2, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.96.0.1"}},
            {"dnat": {"addr": "10.244.1.11", "port": 8080}}]}},
          {"rule": {"family": "ip", "table": "t", "chain": "pre", "handle": 3, "comment": "kubernetes service portals",
            "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"jump": {"target": "KUBE-SERVICES"}}]}},
          {"rule": {"family": "ip", "table": "t", "chain": "pre", "handle": 4, "expr": [
            {"vmap": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}},
             "data": {"set": [[0, {"goto": {"target": "ep-a"}}], [1, {"goto": {"target": "ep-b"}}]]}}}]}},
          {"rule": {"family": "ip", "table": "t", "chain": "pre", "handle": 5, "expr": [
            {"vmap": {"key": {"concat": [{"payload": {"protocol": "ip", "field": "daddr"}}]}, "data": "@service-ips"}}]}},
          {"rule": {"family": "ip", "table": "t", "chain": "pre", "handle": 6, "expr": [
            {"xt": {"type": "target", "name": "DNAT"}}]}},
          {"rule": {"family": "ip", "table": "t", "chain": "pre", "handle": 7, "expr": [
            {"counter": {"packets": 1, "bytes": 60}}]}}]}"#;
        let rules = parse_rules(json).unwrap();
        let effects: Vec<(u64, &Effects)> = rules.iter().map(|r| (r.handle, &r.effects)).collect();
        let e = |dnat: bool, targets: &[&str], maps: &[&str]| Effects {
            dnat,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            verdict_maps: maps.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            effects,
            [
                (2, &e(true, &[], &[])),
                (3, &e(false, &["KUBE-SERVICES"], &[])),
                (4, &e(false, &["ep-a", "ep-b"], &[])),
                (5, &e(false, &[], &["service-ips"])),
                (6, &e(true, &[], &[])),
                (7, &e(false, &[], &[])),
            ]
        );
        assert!(rules.iter().all(|r| r.chain == "pre"));
    }
}
