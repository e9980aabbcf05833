//! Putting back what another program changed in our tables.
//!
//! [`Damage`] collects what `nft monitor` (or a verification) saw other programs do to our
//! tables; [`transaction`] turns it into one transaction that restores the applied state, touching
//! only what was damaged: an element deleted is added back, an element added is deleted, a
//! chain whose rules changed is rewritten, a foreign chain or set in our table is removed.
//! Only what cannot be repaired piecemeal (the table or one of our sets gone, a regular chain
//! deleted, notifications lost) costs a full reconcile, and that too is one transaction that
//! never deletes the table.
//!
//! Repairs never change the applied state: the mirror is the truth the kernel is brought back
//! to.

use std::collections::{BTreeMap, BTreeSet};

use crate::applied::AppliedState;
use crate::event::{Event, Object, Verb};
use crate::parse::element_key;
use crate::render::{self, FamilyContent};
use crate::rules::Family;
use crate::{Chain, Command, Element, ElementKey, ForeignName, SetId, TableName, Transaction};

/// The kinds of repair, for metrics and the controller's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RepairKind {
    Element,
    Set,
    Chain,
    Foreign,
    Stale,
    Full,
}

impl RepairKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairKind::Element => "element",
            RepairKind::Set => "set",
            RepairKind::Chain => "chain",
            RepairKind::Foreign => "foreign",
            RepairKind::Stale => "stale",
            RepairKind::Full => "full",
        }
    }
}

/// Whether the kernel holds an element key after the changes seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    Present,
    Absent,
}

/// What other programs did to our tables, reduced to what must be repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Damage {
    /// Repair everything (the table or one of our sets is gone, or we cannot tell).
    pub full: bool,
    pub chains: BTreeSet<(Family, Chain)>,
    /// Sets whose elements changed in ways we cannot read: rewritten whole.
    pub sets: BTreeSet<(Family, SetId)>,
    pub elements: BTreeMap<(Family, ElementKey), Presence>,
    pub foreign_chains: BTreeSet<(Family, ForeignName)>,
    /// Foreign sets, with whether each is a map.
    pub foreign_sets: BTreeMap<(Family, ForeignName), bool>,
    /// Objects named as ours that the applied state does not need (left by an earlier run).
    pub stale_chains: BTreeSet<(Family, Chain)>,
    pub stale_sets: BTreeSet<(Family, SetId)>,
    /// Another program created an object under one of our names: whether the applied state
    /// has it takes a look at the state (the structure check), not just the event.
    pub recheck: bool,
}

impl Damage {
    pub fn full() -> Damage {
        Damage {
            full: true,
            ..Damage::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Damage::default()
    }

    /// Merges another batch of damage seen later.
    pub fn merge(&mut self, other: Damage) {
        self.full |= other.full;
        self.chains.extend(other.chains);
        self.sets.extend(other.sets);
        self.elements.extend(other.elements);
        self.foreign_chains.extend(other.foreign_chains);
        self.foreign_sets.extend(other.foreign_sets);
        self.stale_chains.extend(other.stale_chains);
        self.stale_sets.extend(other.stale_sets);
        self.recheck |= other.recheck;
    }

    /// Records one change another program made.
    pub fn note(&mut self, event: &Event) {
        let f = event.family;
        match (&event.object, event.verb) {
            (Object::Table, Verb::Delete) => self.full = true,
            (Object::Table, Verb::Add) | (Object::Other, _) => {}
            (Object::Chain(name), verb) => match (Chain::parse(name), verb) {
                // A base chain holds nothing but its rules; a regular one can only be deleted
                // once nothing jumps to it, so whatever did that is repaired whole.
                (Some(chain), Verb::Delete) if chain.base().is_some() => {
                    self.chains.insert((f, chain));
                }
                (Some(_), Verb::Delete) => self.full = true,
                (Some(_), Verb::Add) => {}
                (None, Verb::Add) => self.foreign_chain(f, name),
                (None, Verb::Delete) => {}
            },
            (Object::Set { name, map }, verb) => match (SetId::parse(name), verb) {
                (Some(_), Verb::Add) => self.recheck = true,
                (Some(SetId::Sticky(_)), _) => {}
                (Some(_), Verb::Delete) => self.full = true,
                // nft's anonymous sets belong to the rules that declared them.
                (None, _) if name.starts_with("__") => {}
                (None, Verb::Add) => self.foreign_set(f, name, *map),
                (None, Verb::Delete) => {}
            },
            (Object::Rule { chain }, _) => match Chain::parse(chain) {
                Some(chain) => {
                    self.chains.insert((f, chain));
                }
                None => self.foreign_chain(f, chain),
            },
            (Object::Element { set, text }, verb) => match SetId::parse(set) {
                Some(SetId::Sticky(_)) => {}
                Some(id) => match element_key(id, text) {
                    Some(key) => {
                        let presence = match verb {
                            Verb::Add => Presence::Present,
                            Verb::Delete => Presence::Absent,
                        };
                        self.elements.insert((f, key), presence);
                    }
                    None => {
                        self.sets.insert((f, id));
                    }
                },
                None if set.starts_with("__") => {}
                None => self.foreign_set(f, set, false),
            },
        }
    }

    /// Too many element changes in one set to keep one by one: rewrite the set whole.
    pub fn note_set_flood(&mut self, f: Family, name: &str) {
        match SetId::parse(name) {
            Some(SetId::Sticky(_)) => {}
            Some(set) => {
                self.sets.insert((f, set));
            }
            None if name.starts_with("__") => {}
            None => self.foreign_set(f, name, false),
        }
    }

    fn foreign_chain(&mut self, f: Family, name: &str) {
        match ForeignName::new(name) {
            Some(n) => {
                self.foreign_chains.insert((f, n));
            }
            None => {
                tracing::warn!(family = f.nft(), chain = ?name, "a chain in our table has a name nft cannot take back; leaving it")
            }
        }
    }

    fn foreign_set(&mut self, f: Family, name: &str, map: bool) {
        match ForeignName::new(name) {
            Some(n) => {
                self.foreign_sets.entry((f, n)).or_insert(map);
            }
            None => {
                tracing::warn!(family = f.nft(), set = ?name, "a set in our table has a name nft cannot take back; leaving it")
            }
        }
    }

    /// The kinds of repair this damage needs.
    pub fn kinds(&self) -> BTreeSet<RepairKind> {
        let mut out = BTreeSet::new();
        if self.full {
            out.insert(RepairKind::Full);
            return out;
        }
        if !self.elements.is_empty() {
            out.insert(RepairKind::Element);
        }
        if !self.sets.is_empty() {
            out.insert(RepairKind::Set);
        }
        if !self.chains.is_empty() {
            out.insert(RepairKind::Chain);
        }
        if !self.foreign_chains.is_empty() || !self.foreign_sets.is_empty() {
            out.insert(RepairKind::Foreign);
        }
        if !self.stale_chains.is_empty() || !self.stale_sets.is_empty() {
            out.insert(RepairKind::Stale);
        }
        out
    }
}

/// The element of ours under this key, if the applied state has one.
fn expected(state: &AppliedState, f: Family, key: &ElementKey) -> Option<Element> {
    if let ElementKey::Generation(g) = key {
        return (*g == state.generation()).then_some(Element::Generation(*g));
    }
    if let Some(entry) = state.table(f).elements.get(key) {
        return Some(entry.element);
    }
    SetId::NODE_SETS
        .contains(&key.set())
        .then(|| {
            render::node_elements(state.node(), f)
                .into_iter()
                .find(|e| e.key() == *key)
        })
        .flatten()
}

/// Every element of ours in one set.
fn expected_in(state: &AppliedState, f: Family, set: SetId) -> Vec<Element> {
    let mut out: Vec<Element> = state
        .table(f)
        .elements
        .values()
        .map(|e| e.element)
        .filter(|e| e.set() == set)
        .collect();
    out.extend(
        render::node_elements(state.node(), f)
            .into_iter()
            .filter(|e| e.set() == set),
    );
    if set == SetId::Generation {
        out.push(Element::Generation(state.generation()));
    }
    out
}

/// Compares one set as the kernel lists it (each element in nft's syntax, `None` for one we
/// could not read) with what the applied state puts there.
pub fn compare_set(
    state: &AppliedState,
    f: Family,
    set: SetId,
    kernel: &[Option<String>],
) -> Damage {
    let mut damage = Damage::default();
    let ours: BTreeMap<ElementKey, Element> = expected_in(state, f, set)
        .into_iter()
        .map(|e| (e.key(), e))
        .collect();
    let mut seen = BTreeSet::new();
    for text in kernel {
        let Some(key) = text.as_deref().and_then(|t| element_key(set, t)) else {
            damage.sets.insert((f, set));
            return damage;
        };
        seen.insert(key);
        let value = |t: &str| t.split_once(" : ").map(|(_, v)| v.trim().to_owned());
        match (ours.get(&key), text) {
            (Some(e), Some(t)) if value(&e.to_string()) == value(t) => {}
            _ => {
                damage.elements.insert((f, key), Presence::Present);
            }
        }
    }
    for key in ours.keys().filter(|k| !seen.contains(*k)) {
        damage.elements.insert((f, *key), Presence::Absent);
    }
    damage
}

/// Every chain the applied state has in one family.
pub fn expected_chains(state: &AppliedState, f: Family) -> Vec<Chain> {
    let created = &state.table(f).chains;
    let mut out: Vec<Chain> = Chain::CONSTANT.to_vec();
    out.extend(created.slots.iter().map(|s| Chain::Endpoint(*s)));
    for lb in &created.lb_chains {
        out.push(Chain::Lb(*lb));
        if let Some(t) = lb.affinity {
            out.extend((0..lb.size.get()).map(|index| {
                Chain::AffinityEndpoint(
                    crate::Slot {
                        kind: lb.kind,
                        scope: lb.scope,
                        index,
                    },
                    t,
                )
            }));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Every set and map the applied state has in one family.
pub fn expected_sets(state: &AppliedState, f: Family) -> impl Iterator<Item = SetId> + '_ {
    let created = &state.table(f).chains;
    let sticky = created
        .lb_chains
        .iter()
        .filter(|lb| lb.affinity.is_some())
        .flat_map(|lb| {
            (0..lb.size.get()).map(move |index| {
                SetId::Sticky(crate::Slot {
                    kind: lb.kind,
                    scope: lb.scope,
                    index,
                })
            })
        });
    SetId::ALL
        .into_iter()
        .chain(created.slots.iter().map(|s| SetId::Endpoints(*s)))
        .chain(sticky)
}

/// Whether the applied state has this chain (constant, or created on demand).
pub fn has_chain(state: &AppliedState, f: Family, chain: Chain) -> bool {
    let created = &state.table(f).chains;
    match chain {
        Chain::Lb(lb) => created.lb_chains.contains(&lb),
        Chain::Endpoint(slot) => created.slots.contains(&slot),
        Chain::AffinityEndpoint(slot, t) => created.lb_chains.iter().any(|lb| {
            lb.affinity == Some(t)
                && lb.kind == slot.kind
                && lb.scope == slot.scope
                && slot.index < lb.size.get()
        }),
        _ => true,
    }
}

/// The one transaction that repairs `damage`; empty if there is nothing of ours to repair.
pub fn transaction(state: &AppliedState, damage: &Damage, table: &TableName) -> Transaction {
    let mut tx = Transaction::new(table.clone());
    if damage.full {
        for f in Family::ALL {
            let mut elements = state.table(f).elements.values().map(|e| &e.element);
            render::full_reconcile(
                &mut tx,
                FamilyContent {
                    family: f,
                    node: state.node(),
                    elements: &mut elements,
                    generation: state.generation(),
                },
            );
        }
        return tx;
    }
    // Foreign rules may jump to foreign chains: empty every foreign chain, rewrite ours, and
    // only then delete the foreign ones.
    for (f, name) in &damage.foreign_chains {
        tx.push(*f, Command::FlushForeignChain(name.clone()));
    }
    for &(f, chain) in &damage.chains {
        if !has_chain(state, f, chain) {
            continue;
        }
        tx.push(f, Command::AddChain(chain));
        tx.push(f, Command::FlushChain(chain));
        for rule in render::rules_of(chain, state.node(), f) {
            tx.push(f, Command::AddRule(chain, rule));
        }
    }
    for (f, name) in &damage.foreign_chains {
        tx.push(*f, Command::DeleteForeignChain(name.clone()));
    }
    // Stale objects of ours: each after whatever refers to it (load-balancing chains, then
    // affinity chains, then slot chains; then sets).
    let rank = |c: &Chain| match c {
        Chain::Lb(_) => 0,
        Chain::AffinityEndpoint(..) => 1,
        _ => 2,
    };
    let mut stale: Vec<&(Family, Chain)> = damage.stale_chains.iter().collect();
    stale.sort_by_key(|(_, c)| rank(c));
    for &&(f, chain) in &stale {
        tx.push(f, Command::DeleteChain(chain));
    }
    for &(f, set) in &damage.stale_sets {
        tx.push(f, Command::DeleteSet(set));
    }
    for ((f, name), map) in &damage.foreign_sets {
        tx.push(
            *f,
            Command::DeleteForeignSet {
                name: name.clone(),
                map: *map,
            },
        );
    }
    for &(f, set) in &damage.sets {
        tx.push(f, Command::FlushSet(set));
        for element in expected_in(state, f, set) {
            tx.push(f, Command::AddElement(element));
        }
    }
    let mut adds = Vec::new();
    for (&(f, key), presence) in &damage.elements {
        if damage.sets.contains(&(f, key.set())) {
            continue;
        }
        let ours = expected(state, f, &key);
        match (presence, ours) {
            // What is there may not be what we wrote: replace it.
            (Presence::Present, Some(element)) => {
                tx.push(f, Command::DeleteElement(key));
                adds.push((f, element));
            }
            (Presence::Present, None) => tx.push(f, Command::DeleteElement(key)),
            (Presence::Absent, Some(element)) => adds.push((f, element)),
            (Presence::Absent, None) => {}
        }
    }
    for (f, element) in adds {
        tx.push(f, Command::AddElement(element));
    }
    tx
}

/// Damage as a diff of our tables in nft's own syntax, kernel against applied state: `-` is
/// what the agent applied and the kernel lacks (or holds otherwise), `+` is what the kernel
/// holds and the agent did not apply; `#` comments say what cannot be listed line by line.
/// Sorted as the damage is (by family, then object), so two calls on the same damage agree.
pub fn diff_lines(state: &AppliedState, damage: &Damage, table: &TableName) -> Vec<String> {
    let mut out = Vec::new();
    if damage.full {
        out.push(format!(
            "# the table {table} or one of its sets is missing or unreadable: everything is reapplied"
        ));
        return out;
    }
    for (f, chain) in &damage.chains {
        out.push(format!(
            "- chain {} {table} {chain} # missing, or its rules changed",
            f.nft()
        ));
    }
    for (f, set) in &damage.sets {
        out.push(format!(
            "# set {} {table} {set}: holds elements that cannot be read back",
            f.nft()
        ));
    }
    for ((f, key), presence) in &damage.elements {
        let ours = expected(state, *f, key);
        let (fam, set) = (f.nft(), key.set());
        match (presence, ours) {
            (Presence::Absent, Some(e)) => {
                out.push(format!("- element {fam} {table} {set} {{ {e} }}"))
            }
            (Presence::Absent, None) => {}
            (Presence::Present, Some(e)) => {
                out.push(format!("- element {fam} {table} {set} {{ {e} }}"));
                out.push(format!(
                    "+ element {fam} {table} {set} {{ {key} }} # another value"
                ));
            }
            (Presence::Present, None) => {
                out.push(format!("+ element {fam} {table} {set} {{ {key} }}"))
            }
        }
    }
    for (f, name) in &damage.foreign_chains {
        out.push(format!(
            "+ chain {} {table} {name} # another program's",
            f.nft()
        ));
    }
    for ((f, name), map) in &damage.foreign_sets {
        let kind = if *map { "map" } else { "set" };
        out.push(format!(
            "+ {kind} {} {table} {name} # another program's",
            f.nft()
        ));
    }
    for (f, chain) in &damage.stale_chains {
        out.push(format!(
            "+ chain {} {table} {chain} # ours, no longer needed",
            f.nft()
        ));
    }
    for (f, set) in &damage.stale_sets {
        out.push(format!(
            "+ set {} {table} {set} # ours, no longer needed",
            f.nft()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn event(verb: Verb, object: Object) -> Event {
        Event {
            family: Family::V4,
            verb,
            object,
        }
    }

    fn element(verb: Verb, set: &str, text: &str) -> Event {
        event(
            verb,
            Object::Element {
                set: set.into(),
                text: text.into(),
            },
        )
    }

    #[test]
    fn events_reduce_to_damage() {
        let mut d = Damage::default();
        d.note(&element(
            Verb::Delete,
            "service-ips",
            "10.96.0.10 . tcp . 80 : goto svc-cluster",
        ));
        d.note(&element(
            Verb::Add,
            "service-ips",
            "10.1.1.1 . udp . 99 : drop",
        ));
        d.note(&element(Verb::Add, "service-ips", "not an element of ours"));
        d.note(&element(
            Verb::Add,
            "sticky-ip-c-0",
            "10.0.0.1 . 10.0.0.2 . tcp . 80",
        ));
        d.note(&event(
            Verb::Add,
            Object::Rule {
                chain: "services".into(),
            },
        ));
        d.note(&event(Verb::Add, Object::Chain("evil".into())));
        d.note(&event(
            Verb::Add,
            Object::Set {
                name: "__set0".into(),
                map: false,
            },
        ));
        assert!(!d.full);
        assert_eq!(d.elements.len(), 2);
        assert_eq!(d.sets.len(), 1);
        assert_eq!(d.chains.len(), 1);
        assert_eq!(d.foreign_chains.len(), 1);
        assert!(d.foreign_sets.is_empty());
        assert_eq!(
            d.kinds().into_iter().collect::<Vec<_>>(),
            [
                RepairKind::Element,
                RepairKind::Set,
                RepairKind::Chain,
                RepairKind::Foreign
            ]
        );
        d.note(&event(Verb::Delete, Object::Table));
        assert!(d.full);
    }

    #[test]
    fn deleting_a_regular_chain_or_a_set_of_ours_is_a_full_repair() {
        for object in [
            Object::Chain("svc-cluster".into()),
            Object::Set {
                name: "service-ips".into(),
                map: true,
            },
        ] {
            let mut d = Damage::default();
            d.note(&event(Verb::Delete, object));
            assert!(d.full);
        }
        let mut d = Damage::default();
        d.note(&event(Verb::Delete, Object::Chain("nat-prerouting".into())));
        assert!(!d.full);
        assert_eq!(d.chains.len(), 1);
    }

    /// A state holding one ClusterIP port, 10.96.0.10:80/TCP → 10.1.0.2:8080.
    fn one_port() -> AppliedState {
        use kubenft_proto::v1::{self, resource};
        let port = v1::Resource::versioned(
            "ns/web/tcp/http/ipv4".into(),
            resource::Kind::ServicePort(v1::ServicePortRules {
                namespace: "ns".into(),
                service: "web".into(),
                port_name: "http".into(),
                protocol: v1::Protocol::Tcp as i32,
                family: v1::IpFamily::Ipv4 as i32,
                port: 80,
                cluster_ip: "10.96.0.10".into(),
                cluster_endpoints: vec![v1::Endpoint {
                    ip: "10.1.0.2".into(),
                    port: 8080,
                    local: false,
                    ready: true,
                }],
                serving_ips: vec!["10.1.0.2".into()],
                ..Default::default()
            }),
        );
        let change = v1::Change {
            resources: vec![port],
            ..Default::default()
        };
        let mut state = AppliedState::unknown(0);
        let diff = crate::diff::diff(&state, &change, &TableName::default()).unwrap();
        state.commit(diff, std::time::SystemTime::UNIX_EPOCH);
        state
    }

    #[test]
    fn drift_is_listed_as_an_nft_diff_kernel_against_applied() {
        let state = one_port();
        let key_of = |set: &str, text: &str| {
            let set = SetId::parse(set).unwrap();
            (set, crate::parse::element_key(set, text).unwrap())
        };
        let (_, ours) = key_of("service-ips", "10.96.0.10 . tcp . 80");
        let (_, foreign) = key_of("service-ips", "10.96.0.99 . udp . 53");
        let mut damage = Damage::default();
        damage.elements.insert((Family::V4, ours), Presence::Absent);
        damage
            .elements
            .insert((Family::V4, foreign), Presence::Present);
        damage
            .foreign_chains
            .insert((Family::V4, ForeignName::new("evil").unwrap()));
        let lines = diff_lines(&state, &damage, &TableName::default());
        assert_eq!(
            lines,
            [
                "- element ip kubenft service-ips { 10.96.0.10 . tcp . 80 : goto svc-cluster }",
                "+ element ip kubenft service-ips { 10.96.0.99 . udp . 53 }",
                "+ chain ip kubenft evil # another program's",
            ]
        );
        // A key the kernel holds with another value shows both sides.
        let mut changed = Damage::default();
        changed
            .elements
            .insert((Family::V4, ours), Presence::Present);
        assert_eq!(
            diff_lines(&state, &changed, &TableName::default()),
            [
                "- element ip kubenft service-ips { 10.96.0.10 . tcp . 80 : goto svc-cluster }",
                "+ element ip kubenft service-ips { 10.96.0.10 . tcp . 80 } # another value",
            ]
        );
        assert!(diff_lines(&state, &Damage::default(), &TableName::default()).is_empty());
        assert_eq!(
            diff_lines(&state, &Damage::full(), &TableName::default()).len(),
            1
        );
    }
}
