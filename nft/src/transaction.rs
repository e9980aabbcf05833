//! A typed nftables transaction: commands on our table, rendered as nft text.
//!
//! The agent writes nft *text* and pipes it to `nft -f -` (as knftables does): the nftables crate
//! cannot express verdict maps and drops nft's error text (see
//! docs/decisions/0002-nft-text-through-nft-i.md). To keep that text safe, it is only ever
//! produced from the typed objects below: table, set, chain and element names are enums,
//! values are parsed addresses, ports and protocols, and rules are built by [`crate::render`]
//! alone. A [`Transaction`] renders with `Display`; the agent's `nft` module runs it.

use std::fmt;

use crate::objects::{Chain, Element, ElementKey, Rule, SetId};
use crate::rules::Family;

/// The chains and sets of one table, by name (`map`: whether a set is a map), as a listing
/// found them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableObjects {
    pub chains: Vec<String>,
    pub sets: Vec<(String, bool)>,
}

/// The name of the agent's tables (one per family).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableName(String);

/// A table name that nft would not take as a plain identifier.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid table name {0:?}: use 1-64 letters, digits, '_' or '-', starting with a letter")]
pub struct InvalidTableName(String);

impl TableName {
    pub fn new(name: &str) -> Result<TableName, InvalidTableName> {
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if first_ok && rest_ok && name.len() <= 64 {
            Ok(TableName(name.to_owned()))
        } else {
            Err(InvalidTableName(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TableName {
    fn default() -> Self {
        TableName("kubenft".into())
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of a chain or set another program put in our table: kept only if nft can take it
/// back as a plain identifier, so that deleting it never splices arbitrary text into a script.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ForeignName(String);

impl ForeignName {
    pub fn new(name: &str) -> Option<ForeignName> {
        TableName::new(name).ok().map(|t| ForeignName(t.0))
    }
}

impl fmt::Display for ForeignName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Any nftables family (other programs' tables come in all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AnyFamily {
    Ip,
    Ip6,
    Inet,
    Arp,
    Bridge,
    Netdev,
}

impl AnyFamily {
    pub const fn as_str(self) -> &'static str {
        match self {
            AnyFamily::Ip => "ip",
            AnyFamily::Ip6 => "ip6",
            AnyFamily::Inet => "inet",
            AnyFamily::Arp => "arp",
            AnyFamily::Bridge => "bridge",
            AnyFamily::Netdev => "netdev",
        }
    }

    /// nft's spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<AnyFamily> {
        [
            AnyFamily::Ip,
            AnyFamily::Ip6,
            AnyFamily::Inet,
            AnyFamily::Arp,
            AnyFamily::Bridge,
            AnyFamily::Netdev,
        ]
        .into_iter()
        .find(|f| f.as_str() == s)
    }
}

impl From<Family> for AnyFamily {
    fn from(f: Family) -> AnyFamily {
        match f {
            Family::V4 => AnyFamily::Ip,
            Family::V6 => AnyFamily::Ip6,
        }
    }
}

impl fmt::Display for AnyFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A read-only listing of other programs' objects, as nft's JSON (see [`crate::migrate`]).
/// Names are [`ForeignName`]s: nft joins its arguments into one command line, so a name is
/// only ever passed once it is known to be a plain identifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listing {
    /// `nft -j list chains`: every chain of every table, without rules (milliseconds at any
    /// size: nft 1.0.6 fetches no rules and no set elements for it).
    Chains,
    /// `nft -j list chain FAMILY TABLE CHAIN`: one chain's rules, with handles. nft fetches
    /// the elements of every set of that table for it, so it costs what the table holds.
    Chain {
        family: AnyFamily,
        table: ForeignName,
        chain: ForeignName,
    },
}

impl Listing {
    /// nft's arguments.
    pub fn args(&self) -> Vec<&str> {
        match self {
            Listing::Chains => vec!["-j", "list", "chains"],
            Listing::Chain {
                family,
                table,
                chain,
            } => vec![
                "-j",
                "list",
                "chain",
                family.as_str(),
                table.as_str(),
                chain.as_str(),
            ],
        }
    }
}

impl ForeignName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for TableName {
    type Err = InvalidTableName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TableName::new(s)
    }
}

/// One nft command, applied to the agent's table of one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    AddTable,
    /// Only used by `--cleanup` (after an `AddTable`, so it works whether or not it exists).
    DeleteTable,
    AddSet(SetId),
    FlushSet(SetId),
    AddChain(Chain),
    FlushChain(Chain),
    AddRule(Chain, Rule),
    AddElement(Element),
    DeleteElement(ElementKey),
    /// An on-demand chain or set no longer needed (after whatever referenced it is gone).
    DeleteChain(Chain),
    DeleteSet(SetId),
    /// Objects another program added to our table.
    FlushForeignChain(ForeignName),
    DeleteForeignChain(ForeignName),
    DeleteForeignSet {
        name: ForeignName,
        map: bool,
    },
}

/// A command with the family of the table it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub family: Family,
    pub command: Command,
}

/// One atomic nft transaction: the kernel commits all of it or nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    table: TableName,
    ops: Vec<Op>,
}

impl Transaction {
    pub fn new(table: TableName) -> Transaction {
        Transaction {
            table,
            ops: Vec::new(),
        }
    }

    pub fn push(&mut self, family: Family, command: Command) {
        self.ops.push(Op { family, command });
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Drops the declarations (`add table|set|map|chain`) of objects that already exist, and
    /// the deletions of objects that do not, as listed per family. Redeclaring an existing set is a no-op for the kernel, but nft
    /// 1.0.6's `nft monitor` dies of a segmentation fault printing the elements of an
    /// interval-concatenation set (`firewall-allow`) declared in the same batch, and every
    /// agent watches its tables with it.
    pub fn skip_existing(&mut self, existing: &[Option<TableObjects>; 2]) {
        self.ops.retain(|op| {
            let Some(objects) = &existing[op.family as usize] else {
                return true;
            };
            match &op.command {
                Command::AddTable => false,
                Command::AddSet(set) => {
                    let name = set.to_string();
                    !objects.sets.iter().any(|(n, _)| *n == name)
                }
                Command::AddChain(chain) => {
                    let name = chain.to_string();
                    !objects.chains.contains(&name)
                }
                // Deleting what is not there would refuse the whole transaction.
                Command::DeleteChain(chain) => {
                    let name = chain.to_string();
                    objects.chains.contains(&name)
                }
                Command::DeleteSet(set) => {
                    let name = set.to_string();
                    objects.sets.iter().any(|(n, _)| *n == name)
                }
                _ => true,
            }
        });
    }

    /// Element additions and deletions, the measure of a change's size.
    pub fn element_ops(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| {
                matches!(
                    op.command,
                    Command::AddElement(_) | Command::DeleteElement(_)
                )
            })
            .count()
    }

    /// The families whose tables this transaction changes beyond the generation number that
    /// every transaction writes into both: what per-family sync metrics count.
    pub fn changed_families(&self) -> Vec<Family> {
        let bookkeeping = |c: &Command| {
            matches!(
                c,
                Command::FlushSet(SetId::Generation) | Command::AddElement(Element::Generation(_))
            )
        };
        Family::ALL
            .into_iter()
            .filter(|f| {
                self.ops
                    .iter()
                    .any(|op| op.family == *f && !bookkeeping(&op.command))
            })
            .collect()
    }
}

impl fmt::Display for Transaction {
    /// Renders one command a line; runs of element additions (or deletions) to the same set are
    /// merged into one `{ a, b, ... }` command, which nft parses much faster.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        while i < self.ops.len() {
            let run = element_run(&self.ops[i..]);
            if run > 0 {
                self.write_elements(f, &self.ops[i..i + run])?;
                i += run;
            } else {
                self.write_op(f, &self.ops[i])?;
                i += 1;
            }
        }
        Ok(())
    }
}

/// How many leading ops are element commands of the same kind, family and set.
fn element_run(ops: &[Op]) -> usize {
    let key = |op: &Op| match &op.command {
        Command::AddElement(e) => Some((true, op.family, e.set())),
        Command::DeleteElement(k) => Some((false, op.family, k.set())),
        _ => None,
    };
    let Some(first) = ops.first().and_then(key) else {
        return 0;
    };
    ops.iter().take_while(|op| key(op) == Some(first)).count()
}

impl Transaction {
    fn write_elements(&self, f: &mut fmt::Formatter<'_>, ops: &[Op]) -> fmt::Result {
        let family = ops[0].family;
        let (verb, set) = match &ops[0].command {
            Command::AddElement(e) => ("add", e.set()),
            Command::DeleteElement(k) => ("delete", k.set()),
            _ => unreachable!("element_run only groups element commands"),
        };
        write!(
            f,
            "{verb} element {} {} {set} {{ ",
            family.nft(),
            self.table
        )?;
        for (n, op) in ops.iter().enumerate() {
            if n > 0 {
                f.write_str(", ")?;
            }
            match &op.command {
                Command::AddElement(e) => write!(f, "{e}")?,
                Command::DeleteElement(k) => write!(f, "{k}")?,
                _ => unreachable!(),
            }
        }
        f.write_str(" }\n")
    }

    fn write_op(&self, f: &mut fmt::Formatter<'_>, op: &Op) -> fmt::Result {
        let fam = op.family.nft();
        let t = &self.table;
        match &op.command {
            Command::AddTable => writeln!(f, "add table {fam} {t}"),
            Command::DeleteTable => writeln!(f, "delete table {fam} {t}"),
            Command::AddSet(s) => writeln!(
                f,
                "add {} {fam} {t} {s} {{ {} }}",
                if s.is_map() { "map" } else { "set" },
                s.declaration(op.family)
            ),
            Command::FlushSet(s) => writeln!(
                f,
                "flush {} {fam} {t} {s}",
                if s.is_map() { "map" } else { "set" }
            ),
            Command::AddChain(c) => match c.base() {
                Some(base) => writeln!(f, "add chain {fam} {t} {c} {{ {base} }}"),
                None => writeln!(f, "add chain {fam} {t} {c}"),
            },
            Command::FlushChain(c) => writeln!(f, "flush chain {fam} {t} {c}"),
            Command::AddRule(c, r) => writeln!(f, "add rule {fam} {t} {c} {r}"),
            Command::DeleteChain(c) => writeln!(f, "delete chain {fam} {t} {c}"),
            Command::DeleteSet(s) => writeln!(
                f,
                "delete {} {fam} {t} {s}",
                if s.is_map() { "map" } else { "set" }
            ),
            Command::FlushForeignChain(c) => writeln!(f, "flush chain {fam} {t} {c}"),
            Command::DeleteForeignChain(c) => writeln!(f, "delete chain {fam} {t} {c}"),
            Command::DeleteForeignSet { name, map } => writeln!(
                f,
                "delete {} {fam} {t} {name}",
                if *map { "map" } else { "set" }
            ),
            Command::AddElement(e) => {
                writeln!(f, "add element {fam} {t} {} {{ {e} }}", e.set())
            }
            Command::DeleteElement(k) => {
                writeln!(f, "delete element {fam} {t} {} {{ {k} }}", k.set())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{EntryKey, PortKey};
    use crate::rules::Port;

    #[test]
    fn table_names_are_identifiers() {
        assert!(TableName::new("kubenft").is_ok());
        assert!(TableName::new("kna-test_1").is_ok());
        for bad in ["", "1abc", "a b", "a;b", "a\nb", &"x".repeat(65)] {
            assert!(TableName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn merges_runs_of_elements() {
        let mut tx = Transaction::new(TableName::default());
        tx.push(Family::V4, Command::AddTable);
        for ip in ["10.96.0.1", "10.96.0.2"] {
            tx.push(
                Family::V4,
                Command::AddElement(Element::ClusterIp(ip.parse().unwrap())),
            );
        }
        let key = PortKey {
            proto: crate::rules::Protocol::Udp,
            port: Port::new(30053).unwrap(),
        };
        tx.push(
            Family::V4,
            Command::DeleteElement(ElementKey::NoEndpoint(EntryKey::NodePort(key))),
        );
        assert_eq!(
            tx.to_string(),
            "add table ip kubenft\n\
             add element ip kubenft cluster-ips { 10.96.0.1, 10.96.0.2 }\n\
             delete element ip kubenft no-endpoint-nodeports { udp . 30053 }\n"
        );
        assert_eq!(tx.element_ops(), 3);
    }
}
