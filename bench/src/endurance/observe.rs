//! What suite 9 measures from outside the processes: their memory, descriptors and children
//! (`/proc`), the objects in an agent's nft tables (`nft -j list table`, counted) against
//! those its rule set calls for, and a node's conntrack entries.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::Context;
use kubenft_lab::{Host, Lab};
use kubenft_nft::applied::{AppliedState, StateFile};
use kubenft_nft::render;
use kubenft_nft::rules::Family;
use kubenft_nft::{Chain, SetId, TableName};
use kubenft_proto::v1;

/// One process's figures at one moment.
#[derive(Clone, Debug, Default)]
pub struct ProcSample {
    pub rss: u64,
    pub fds: u64,
    /// Children by command name, and how many of them are zombies.
    pub children: BTreeMap<String, u32>,
    pub zombies: u32,
}

impl ProcSample {
    pub fn child_count(&self) -> u32 {
        self.children.values().sum()
    }

    /// `nft ×2, conntrack ×1`.
    pub fn children_text(&self) -> String {
        if self.children.is_empty() {
            return "none".into();
        }
        self.children
            .iter()
            .map(|(name, n)| format!("{name} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The figures of each pid (`None` for a process that is gone).
pub fn sample(pids: &[u32]) -> Vec<Option<ProcSample>> {
    let children = children_of(pids);
    pids.iter()
        .zip(children)
        .map(|(&pid, (children, zombies))| {
            let (rss, _) = crate::report::process_memory(pid)?;
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
            Some(ProcSample {
                rss,
                fds,
                children,
                zombies,
            })
        })
        .collect()
}

/// Each pid's children by command name, and its zombie children; one pass over `/proc`.
fn children_of(pids: &[u32]) -> Vec<(BTreeMap<String, u32>, u32)> {
    let mut out = vec![(BTreeMap::new(), 0); pids.len()];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((comm, state, ppid)) = parse_stat(&stat) else {
            continue;
        };
        if let Some(i) = pids.iter().position(|&p| p == ppid) {
            *out[i].0.entry(comm.to_owned()).or_default() += 1;
            if state == "Z" {
                out[i].1 += 1;
            }
        }
    }
    out
}

/// `pid (comm) state ppid …`: the command (which may hold spaces and parentheses), the
/// state and the parent.
fn parse_stat(stat: &str) -> Option<(&str, &str, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// Objects of an agent's tables (both families): set and map elements, sets and maps,
/// chains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Objects {
    pub elements: u64,
    pub sets: u64,
    pub chains: u64,
}

impl std::fmt::Display for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} elements, {} sets/maps, {} chains",
            self.elements, self.sets, self.chains
        )
    }
}

/// What the kernel holds in `node`'s tables: every set's and map's elements counted from
/// `nft -j list table <family> kubenft`.
pub fn kernel_objects(lab: &Lab, node: &str) -> anyhow::Result<Objects> {
    let table = TableName::default();
    let mut total = Objects::default();
    for family in Family::ALL {
        let out = lab
            .exec_ok(
                Host::Node(node),
                &["nft", "-j", "list", "table", family.nft(), table.as_str()],
            )
            .with_context(|| format!("listing table {} {table} on {node}", family.nft()))?;
        let o = count_json(&out).with_context(|| format!("nft's JSON on {node}"))?;
        total.elements += o.elements;
        total.sets += o.sets;
        total.chains += o.chains;
    }
    Ok(total)
}

/// Counts the objects of one `nft -j list table` document.
fn count_json(text: &str) -> anyhow::Result<Objects> {
    let doc: serde_json::Value = serde_json::from_str(text)?;
    let items = doc["nftables"].as_array().context("no `nftables` array")?;
    let mut o = Objects::default();
    for item in items {
        let set = item.get("set").or_else(|| item.get("map"));
        if let Some(set) = set {
            o.sets += 1;
            o.elements += set
                .get("elem")
                .and_then(serde_json::Value::as_array)
                .map_or(0, |e| e.len() as u64);
        } else if item.get("chain").is_some() {
            o.chains += 1;
        }
    }
    Ok(o)
}

/// What a node's tables should hold for `resources` (its rule set): the elements the agent's
/// own library renders for them (shared ones once), the node sets' elements and the
/// generation, per family; the declared sets and maps plus the endpoint slots' maps; the
/// constant chains plus the load-balancing and slot chains the elements need.
pub fn desired_objects(resources: Vec<v1::Resource>) -> anyhow::Result<Objects> {
    let table = TableName::default();
    let file = StateFile {
        table: table.to_string(),
        generation: 1,
        resources,
    };
    let state = AppliedState::adopt(file, &table).context("rendering the node's rule set")?;
    let mut o = Objects::default();
    for family in Family::ALL {
        let t = state.table(family);
        let node_elements = render::node_elements(state.node(), family).len();
        let (affinity_chains, sticky) = t.chains.affinity_objects();
        o.elements += (t.elements.len() + node_elements + 1) as u64;
        o.sets += (SetId::ALL.len() + t.chains.slots.len() + sticky.len()) as u64;
        o.chains += (Chain::CONSTANT.len()
            + t.chains.lb_chains.len()
            + t.chains.slots.len()
            + affinity_chains.len()) as u64;
    }
    Ok(o)
}

/// One conntrack entry as `conntrack -L` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub proto: String,
    /// Seconds until the kernel forgets it.
    pub timeout: u64,
    /// TCP's state (`ESTABLISHED`, `TIME_WAIT`, …); empty for UDP.
    pub state: String,
    pub orig_dst: IpAddr,
    pub orig_dport: u16,
    /// Where replies come from: the endpoint a DNATed flow goes to.
    pub reply_src: IpAddr,
}

/// Parses one `conntrack -L` line: `tcp 6 117 TIME_WAIT src=… dst=… sport=… dport=… src=…`.
pub fn parse_flow(line: &str) -> Option<Flow> {
    let mut tokens = line.split_whitespace();
    let proto = tokens.next()?.to_owned();
    let _number = tokens.next()?;
    let timeout = tokens.next()?.parse().ok()?;
    let mut state = String::new();
    let (mut dst, mut dport, mut srcs) = (None, None, Vec::new());
    for t in tokens {
        if let Some(v) = t.strip_prefix("src=") {
            srcs.push(v);
        } else if let Some(v) = t.strip_prefix("dst=") {
            dst.get_or_insert(v);
        } else if let Some(v) = t.strip_prefix("dport=") {
            dport.get_or_insert(v);
        } else if srcs.is_empty() && t.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            state = t.to_owned();
        }
    }
    Some(Flow {
        proto,
        timeout,
        state,
        orig_dst: dst?.parse().ok()?,
        orig_dport: dport?.parse().ok()?,
        reply_src: srcs.get(1)?.parse().ok()?,
    })
}

/// Every conntrack entry of `node`'s namespace for `proto` (`tcp`, `udp`).
pub fn flows(lab: &Lab, node: &str, proto: &str) -> anyhow::Result<Vec<Flow>> {
    let out = lab
        .exec_ok(Host::Node(node), &["conntrack", "-L", "-p", proto])
        .with_context(|| format!("conntrack -L on {node}"))?;
    Ok(out.lines().filter_map(parse_flow).collect())
}

/// How many conntrack entries `node`'s namespace holds.
pub fn flow_count(lab: &Lab, node: &str) -> anyhow::Result<u64> {
    let out = lab
        .exec_ok(Host::Node(node), &["conntrack", "-C"])
        .with_context(|| format!("conntrack -C on {node}"))?;
    out.trim()
        .parse()
        .with_context(|| format!("conntrack -C printed {out:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        assert_eq!(parse_stat("42 (nft) S 7 42 42 0 -1"), Some(("nft", "S", 7)));
        assert_eq!(
            parse_stat("43 (a (b) c) Z 9 1 1"),
            Some(("a (b) c", "Z", 9))
        );
    }

    #[test]
    fn parses_conntrack_lines() {
        let tcp = "tcp      6 117 TIME_WAIT src=10.244.1.11 dst=10.96.0.10 sport=40000 dport=80 src=10.244.2.12 dst=10.244.1.11 sport=8080 dport=40000 [ASSURED] mark=0 use=1";
        let f = parse_flow(tcp).unwrap();
        assert_eq!(f.proto, "tcp");
        assert_eq!(f.timeout, 117);
        assert_eq!(f.state, "TIME_WAIT");
        assert_eq!(f.orig_dst, "10.96.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(f.orig_dport, 80);
        assert_eq!(f.reply_src, "10.244.2.12".parse::<IpAddr>().unwrap());
        let udp = "udp      17 28 src=10.244.1.11 dst=10.96.0.10 sport=40001 dport=53 src=10.244.1.13 dst=10.244.1.11 sport=5353 dport=40001 mark=0 use=1";
        let f = parse_flow(udp).unwrap();
        assert_eq!(f.state, "");
        assert_eq!(f.reply_src, "10.244.1.13".parse::<IpAddr>().unwrap());
        assert_eq!(parse_flow("conntrack v1.4.7: 2 flow entries"), None);
    }

    #[test]
    fn desired_objects_of_a_small_rule_set() {
        // 3 Services × 10 endpoints over 2 nodes, seen from node 0: 5 endpoints each local.
        let w = crate::workload::Workload::new(3, 2);
        let change = crate::workload::full_change(w.all(), 0, "10.200.1.1");
        let o = desired_objects(change.resources).unwrap();
        // Per Service: ClusterIP, service-ips, dispatch, 10 backends; 5 hairpin addresses;
        // the node sets (pod CIDR, Service CIDR, NodePort address); a generation per family.
        assert_eq!(o.elements, 3 * (3 + 10 + 5) + 3 + 2);
        // 16 declared per family, and one map per endpoint slot (10).
        assert_eq!(o.sets, 2 * 16 + 10);
        // 22 constant per family, one load-balancing chain (10 endpoints), a chain per slot.
        assert_eq!(o.chains, 2 * 22 + 1 + 10);
    }

    #[test]
    fn counts_nft_json() {
        let doc = r#"{"nftables":[{"metainfo":{}},{"table":{}},
            {"set":{"name":"cluster-ips","elem":["10.96.0.1","10.96.0.2"]}},
            {"map":{"name":"service-ips","elem":[[1,2]]}},
            {"set":{"name":"hairpin"}},
            {"chain":{"name":"services"}},{"chain":{"name":"nat-output"}},
            {"rule":{"chain":"services"}}]}"#;
        assert_eq!(
            count_json(doc).unwrap(),
            Objects {
                elements: 3,
                sets: 3,
                chains: 2
            }
        );
    }
}
