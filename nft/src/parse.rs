//! Reading what the kernel reports back in nft's own syntax: object names and element keys.
//!
//! The inverse of the `Display` impls in [`super::objects`]. Used on `nft monitor` lines, so
//! the input is whatever another program put in our tables: anything that does not parse into
//! our typed objects is `None`, and the caller repairs the whole object instead.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;

use ipnet::IpNet;

use crate::objects::{
    AddrKey, Chain, ElementKey, EntryKey, EntryKind, LbChain, PortKey, Scope, SetId, Slot,
};
use crate::rules::{Port, Protocol};

fn kind(prefix: &str) -> Option<EntryKind> {
    match prefix {
        "ip" => Some(EntryKind::Ip),
        "np" => Some(EntryKind::NodePort),
        _ => None,
    }
}

fn scope(letter: &str) -> Option<Scope> {
    match letter {
        "c" => Some(Scope::Cluster),
        "l" => Some(Scope::Local),
        _ => None,
    }
}

/// A decimal number without sign or leading zeros (as our names print them).
fn number<T: FromStr>(s: &str) -> Option<T> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

/// `ip-c-3`: the common part of a slot's names.
fn slot(s: &str) -> Option<Slot> {
    let mut parts = s.splitn(3, '-');
    Some(Slot {
        kind: kind(parts.next()?)?,
        scope: scope(parts.next()?)?,
        index: number(parts.next()?)?,
    })
}

/// `ip-c-3` or `ip-c-3-a10800`.
fn slot_with_affinity(s: &str) -> Option<(Slot, Option<NonZeroU32>)> {
    match s.rsplit_once("-a") {
        Some((base, t)) => Some((slot(base)?, Some(number(t)?))),
        None => Some((slot(s)?, None)),
    }
}

impl SetId {
    /// The set or map with this name, if it is one of ours.
    pub fn parse(name: &str) -> Option<SetId> {
        if let Some(set) = SetId::ALL.into_iter().find(|s| s.to_string() == name) {
            return Some(set);
        }
        if let Some(rest) = name.strip_prefix("sticky-") {
            return slot(rest).map(SetId::Sticky);
        }
        name.strip_suffix("-eps")
            .and_then(slot)
            .map(SetId::Endpoints)
    }
}

impl Chain {
    /// The chain with this name, if it is one of ours.
    pub fn parse(name: &str) -> Option<Chain> {
        if let Some(chain) = Chain::CONSTANT.into_iter().find(|c| c.to_string() == name) {
            return Some(chain);
        }
        if let Some(rest) = name.strip_prefix("ep-") {
            let (slot, affinity) = slot_with_affinity(rest)?;
            return Some(match affinity {
                Some(t) => Chain::AffinityEndpoint(slot, t),
                None => Chain::Endpoint(slot),
            });
        }
        let rest = name.strip_prefix("lb-")?;
        let (slot, affinity) = slot_with_affinity(rest)?;
        Some(Chain::Lb(LbChain {
            kind: slot.kind,
            scope: slot.scope,
            size: NonZeroU32::new(slot.index)?,
            affinity,
        }))
    }
}

/// Splits `a . b . c` into its fields.
fn fields(s: &str) -> Vec<&str> {
    s.split(" . ").map(str::trim).collect()
}

fn protocol(s: &str) -> Option<Protocol> {
    match s {
        "tcp" | "6" => Some(Protocol::Tcp),
        "udp" | "17" => Some(Protocol::Udp),
        "sctp" | "132" => Some(Protocol::Sctp),
        _ => None,
    }
}

fn port(s: &str) -> Option<Port> {
    Port::new(number(s)?)
}

fn addr(s: &str) -> Option<IpAddr> {
    s.parse().ok()
}

/// A prefix as nft prints it: `10.0.0.0/8`, or a bare address for a full-length prefix.
fn net(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        return s.parse().ok();
    }
    addr(s).map(IpNet::from)
}

fn addr_key(f: &[&str]) -> Option<AddrKey> {
    match f {
        [a, p, n] => Some(AddrKey {
            addr: addr(a)?,
            proto: protocol(p)?,
            port: port(n)?,
        }),
        _ => None,
    }
}

fn port_key(f: &[&str]) -> Option<PortKey> {
    match f {
        [p, n] => Some(PortKey {
            proto: protocol(p)?,
            port: port(n)?,
        }),
        _ => None,
    }
}

fn entry_key(kind: EntryKind, f: &[&str]) -> Option<EntryKey> {
    match kind {
        EntryKind::Ip => addr_key(f).map(EntryKey::Addr),
        EntryKind::NodePort => port_key(f).map(EntryKey::NodePort),
    }
}

/// `0x0000002a` or `42`.
fn mark(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => number(s),
    }
}

/// The key of one element of `set` as `nft monitor` prints it (the part before ` : ` in a
/// map), or `None` if it is not a key we could have written. Dynamic sets have no keys of
/// ours.
pub fn element_key(set: SetId, text: &str) -> Option<ElementKey> {
    let key = text.split_once(" : ").map_or(text, |(k, _)| k).trim();
    let f = fields(key);
    Some(match set {
        SetId::LocalPodCidrs => ElementKey::LocalPodCidr(net(key)?),
        SetId::ServiceCidrs => ElementKey::ServiceCidr(net(key)?),
        SetId::NodePortIps => ElementKey::NodePortIp(addr(key)?),
        SetId::ClusterIps => ElementKey::ClusterIp(addr(key)?),
        SetId::Generation => ElementKey::Generation(mark(key)?),
        SetId::Hairpin => match f.as_slice() {
            [a, b] if a == b => ElementKey::Hairpin(addr(a)?),
            _ => return None,
        },
        SetId::ServiceIps => ElementKey::ServiceIp(addr_key(&f)?),
        SetId::ServiceNodePorts => ElementKey::ServiceNodePort(port_key(&f)?),
        SetId::Dispatch(kind, scope) => ElementKey::Dispatch(scope, entry_key(kind, &f)?),
        SetId::Endpoints(slot) => ElementKey::Backend {
            scope: slot.scope,
            slot: slot.index,
            key: entry_key(slot.kind, &f)?,
        },
        SetId::NoEndpointServices => ElementKey::NoEndpoint(EntryKey::Addr(addr_key(&f)?)),
        SetId::NoEndpointNodePorts => ElementKey::NoEndpoint(EntryKey::NodePort(port_key(&f)?)),
        SetId::FirewallIps => ElementKey::FirewallIp(addr_key(&f)?),
        SetId::FirewallAllow => match f.as_slice() {
            [a, p, n, range] => ElementKey::FirewallAllow(addr_key(&[a, p, n])?, net(range)?),
            _ => return None,
        },
        SetId::Sticky(_) => return None,
    })
}

/// One element of `nft -j list set|map` in nft's text syntax (`key` or `key : value`), as
/// `nft monitor` would print it; `None` for a shape we never write.
pub fn json_element_text(elem: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    fn expr(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Object(o) => {
                if let Some(parts) = o.get("concat").and_then(Value::as_array) {
                    let parts: Option<Vec<String>> = parts.iter().map(expr).collect();
                    return Some(parts?.join(" . "));
                }
                if let Some(p) = o.get("prefix") {
                    return Some(format!("{}/{}", p.get("addr")?.as_str()?, p.get("len")?));
                }
                if let Some(e) = o.get("elem") {
                    return expr(e.get("val")?);
                }
                for verdict in ["goto", "jump"] {
                    if let Some(t) = o.get(verdict) {
                        return Some(format!("{verdict} {}", t.get("target")?.as_str()?));
                    }
                }
                ["drop", "accept", "return", "continue"]
                    .into_iter()
                    .find(|v| o.contains_key(*v))
                    .map(str::to_owned)
            }
            _ => None,
        }
    }
    match elem {
        Value::Array(pair) => match pair.as_slice() {
            [key, value] => Some(format!("{} : {}", expr(key)?, expr(value)?)),
            _ => None,
        },
        other => expr(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Element;

    fn slots() -> Vec<Slot> {
        let mut out = Vec::new();
        for kind in [EntryKind::Ip, EntryKind::NodePort] {
            for scope in [Scope::Cluster, Scope::Local] {
                for index in [0, 7, 130] {
                    out.push(Slot { kind, scope, index });
                }
            }
        }
        out
    }

    #[test]
    fn every_name_we_write_reads_back() {
        let t = NonZeroU32::new(10800).unwrap();
        let mut sets: Vec<SetId> = SetId::ALL.to_vec();
        let mut chains: Vec<Chain> = Chain::CONSTANT.to_vec();
        for s in slots() {
            sets.extend([SetId::Endpoints(s), SetId::Sticky(s)]);
            chains.extend([Chain::Endpoint(s), Chain::AffinityEndpoint(s, t)]);
            if let Some(size) = NonZeroU32::new(s.index) {
                for affinity in [None, Some(t)] {
                    chains.push(Chain::Lb(LbChain {
                        kind: s.kind,
                        scope: s.scope,
                        size,
                        affinity,
                    }));
                }
            }
        }
        for set in sets {
            assert_eq!(SetId::parse(&set.to_string()), Some(set), "{set}");
        }
        for chain in chains {
            assert_eq!(Chain::parse(&chain.to_string()), Some(chain), "{chain}");
        }
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "",
            "evil",
            "lb-ip-c-0",
            "lb-ip-c-03",
            "ep-ip-x-1",
            "ep-ip-c-1-a",
            "ip-c--eps",
            "sticky-",
            "__set0",
            "services2",
            "lb-ip-c-2-a0x",
        ] {
            assert_eq!(SetId::parse(name), None, "{name}");
            assert_eq!(Chain::parse(name), None, "{name}");
        }
    }

    #[test]
    fn element_keys_read_back_from_their_text() {
        let a4: IpAddr = "10.96.0.10".parse().unwrap();
        let a6: IpAddr = "fd00::a".parse().unwrap();
        let key = AddrKey {
            addr: a4,
            proto: Protocol::Udp,
            port: Port::new(53).unwrap(),
        };
        let key6 = AddrKey { addr: a6, ..key };
        let pk = PortKey {
            proto: Protocol::Sctp,
            port: Port::new(30053).unwrap(),
        };
        let elements = [
            Element::LocalPodCidr("10.244.0.0/16".parse().unwrap()),
            Element::ServiceCidr("fd00:96::/112".parse().unwrap()),
            Element::NodePortIp(a4),
            Element::Generation(42),
            Element::ClusterIp(a6),
            Element::Hairpin(a4),
            Element::ServiceIp(key6, crate::EntryChain::ExtLocal),
            Element::ServiceNodePort(pk, Scope::Local),
            Element::Dispatch(Scope::Cluster, EntryKey::Addr(key), NonZeroU32::MIN, None),
            Element::Backend {
                scope: Scope::Local,
                key: EntryKey::NodePort(pk),
                slot: 4,
                addr: a6,
                port: Port::new(8080).unwrap(),
            },
            Element::NoEndpoint(EntryKey::Addr(key6), crate::NoEndpoint::Drop),
            Element::FirewallIp(key),
            Element::FirewallAllow(key, "192.168.0.0/24".parse().unwrap()),
        ];
        for e in elements {
            let text = e.to_string();
            assert_eq!(element_key(e.set(), &text), Some(e.key()), "{text}");
        }
        // How nft prints what we wrote differently.
        assert_eq!(
            element_key(SetId::Generation, "0x0000002a"),
            Some(ElementKey::Generation(42))
        );
        assert_eq!(
            element_key(SetId::LocalPodCidrs, "10.0.0.1"),
            Some(ElementKey::LocalPodCidr("10.0.0.1/32".parse().unwrap()))
        );
        assert_eq!(
            element_key(SetId::ServiceNodePorts, "6 . 30080 : goto np-cluster"),
            Some(ElementKey::ServiceNodePort(PortKey {
                proto: Protocol::Tcp,
                port: Port::new(30080).unwrap()
            }))
        );
    }

    #[test]
    fn json_elements_read_as_nft_prints_them() {
        let elems: serde_json::Value = serde_json::from_str(
            r#"[[{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "svc-cluster"}}],
                [{"concat": ["tcp", 30443]}, {"concat": ["fd00::6", 8443]}],
                {"prefix": {"addr": "10.244.0.0", "len": 16}},
                {"concat": ["203.0.113.7", "tcp", 8443, {"prefix": {"addr": "192.168.50.0", "len": 24}}]},
                [{"concat": ["10.96.0.30", "udp", 53]}, {"drop": null}],
                42,
                {"elem": {"val": "10.0.0.1", "timeout": 10}},
                {"range": ["10.0.0.1", "10.0.0.9"]}]"#,
        )
        .unwrap();
        let texts: Vec<Option<String>> = elems
            .as_array()
            .unwrap()
            .iter()
            .map(json_element_text)
            .collect();
        assert_eq!(
            texts,
            [
                Some("10.96.0.10 . tcp . 80 : goto svc-cluster".to_owned()),
                Some("tcp . 30443 : fd00::6 . 8443".to_owned()),
                Some("10.244.0.0/16".to_owned()),
                Some("203.0.113.7 . tcp . 8443 . 192.168.50.0/24".to_owned()),
                Some("10.96.0.30 . udp . 53 : drop".to_owned()),
                Some("42".to_owned()),
                Some("10.0.0.1".to_owned()),
                None,
            ]
        );
    }

    #[test]
    fn foreign_elements_are_not_keys() {
        for (set, text) in [
            (SetId::ServiceIps, "10.96.0.10 . icmp . 80 : drop"),
            (SetId::ServiceIps, "10.96.0.10 . tcp . 0"),
            (SetId::ServiceIps, "10.96.0.10 . tcp"),
            (SetId::Hairpin, "10.0.0.1 . 10.0.0.2"),
            (SetId::LocalPodCidrs, "10.0.0.1-10.0.0.9"),
            (SetId::Sticky(slots()[0]), "10.0.0.1 . tcp . 80"),
            (SetId::ClusterIps, "x\n; flush ruleset"),
        ] {
            assert_eq!(element_key(set, text), None, "{text}");
        }
    }
}
