//! From a Change to one nft transaction, by element-level diff against the applied state.
//!
//! Diffing is pure and reads the applied state without changing it: the element changes are
//! collected in an overlay, and only once nft has committed the transaction is the overlay
//! written into the state ([`AppliedState::commit`]). A refused transaction therefore leaves
//! the in-memory state exactly as it left the kernel: untouched. The work is proportional to
//! the resources in the change, never to the table.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use kubenft_proto::v1;

use crate::applied::{Applied, AppliedState, Created, Entry, FamilyTable, StateFile};
use crate::render::{self, FamilyContent};
use crate::rules::{self, Family, InvalidResource, NODE_RESOURCE, NodeRules, Spec};
use crate::{Chain, Command, Element, ElementKey, SetId, TableName, Transaction};

/// Why a change cannot be applied (before nft is even run).
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Invalid(#[from] InvalidResource),
    #[error("resource {0:?} appears more than once in the change")]
    Duplicate(String),
    #[error(
        "resource {owner:?} wants element {wanted:?} in {set}, which another resource holds as {held:?}"
    )]
    Conflict {
        owner: String,
        set: SetId,
        wanted: String,
        held: String,
    },
}

/// A diffed change: the transaction to run, and what to record once it has committed.
#[derive(Debug)]
pub struct Diff {
    pub tx: Transaction,
    /// The transaction rewrites the whole table (the kernel state was unknown).
    pub full: bool,
    commit: Commit,
}

#[derive(Debug)]
struct Commit {
    upserts: Vec<Applied>,
    removed: Vec<String>,
    node: Option<NodeRules>,
    elements: [BTreeMap<ElementKey, Option<Entry>>; 2],
    created: [Created; 2],
    /// On-demand objects no element needs any more (deleted by the transaction).
    dropped: [Created; 2],
    /// The full reconcile replaced the set of on-demand objects.
    replace_objects: bool,
    generation: u32,
}

/// Diffs a change against the applied state: element by element, or as a full reconcile if
/// the kernel's state is unknown.
pub fn diff(
    state: &AppliedState,
    change: &v1::Change,
    table: &TableName,
) -> Result<Diff, DiffError> {
    diff_with(state, change, table, !state.synced)
}

/// Diffs a change as a full reconcile of our tables to the state after it, whatever the
/// kernel holds now (the fallback when an element-level transaction keeps being refused).
pub fn full(
    state: &AppliedState,
    change: &v1::Change,
    table: &TableName,
) -> Result<Diff, DiffError> {
    diff_with(state, change, table, true)
}

fn diff_with(
    state: &AppliedState,
    change: &v1::Change,
    table: &TableName,
    full: bool,
) -> Result<Diff, DiffError> {
    let upserts = validate(change)?;
    let node = node_change(&upserts, &change.removed);
    let mut overlays = Family::ALL.map(|f| Overlay::new(state.table(f)));
    // Release everything the old versions held before taking what the new ones want, so an
    // element moving between resources in one change is not a conflict.
    let touched = upserts.iter().map(|a| &a.name).chain(&change.removed);
    for name in touched {
        if let Some(old) = state.resources.get(name) {
            for (f, element) in render::owned_elements(&old.spec) {
                overlays[f as usize].release(&element);
            }
        }
    }
    for applied in &upserts {
        for (f, element) in render::owned_elements(&applied.spec) {
            overlays[f as usize].retain(element, &applied.name)?;
        }
    }
    let generation = state.generation.wrapping_add(1);
    let mut tx = Transaction::new(table.clone());
    let (created, dropped) = if full {
        full_transaction(&mut tx, state, node.as_ref(), &overlays, generation)
    } else {
        incremental_transaction(&mut tx, state, node.as_ref(), &overlays, generation)
    };
    Ok(Diff {
        tx,
        full,
        commit: Commit {
            upserts,
            removed: change.removed.clone(),
            node,
            elements: overlays.map(|o| o.changes),
            created,
            dropped,
            replace_objects: full,
            generation,
        },
    })
}

fn validate(change: &v1::Change) -> Result<Vec<Applied>, DiffError> {
    let mut names = BTreeSet::new();
    let mut out = Vec::with_capacity(change.resources.len());
    for res in &change.resources {
        if !names.insert(res.name.as_str()) {
            return Err(DiffError::Duplicate(res.name.clone()));
        }
        let spec = rules::validate(res)?;
        out.push(Applied::new(res, spec));
    }
    if let Some(both) = change.removed.iter().find(|n| names.contains(n.as_str())) {
        return Err(DiffError::Duplicate(both.clone()));
    }
    Ok(out)
}

/// The new node settings, if the change touches them (removal means defaults).
fn node_change(upserts: &[Applied], removed: &[String]) -> Option<NodeRules> {
    let updated = upserts.iter().find_map(|a| match &a.spec {
        Spec::Node(cfg) => Some(cfg.clone()),
        Spec::ServicePort(_) | Spec::NodeEndpoints(_) => None,
    });
    updated.or_else(|| {
        removed
            .iter()
            .any(|n| n == NODE_RESOURCE)
            .then(NodeRules::default)
    })
}

/// The commands for an applied state whose kernel counterpart is known: element diffs, node
/// settings if changed, new on-demand objects, those no longer needed, the generation.
/// Returns the new objects and the deleted ones.
fn incremental_transaction(
    tx: &mut Transaction,
    state: &AppliedState,
    node: Option<&NodeRules>,
    overlays: &[Overlay<'_>; 2],
    generation: u32,
) -> ([Created; 2], [Created; 2]) {
    let diffs = overlays.each_ref().map(Overlay::diff);
    for (f, (deletes, _)) in Family::ALL.into_iter().zip(&diffs) {
        for key in deletes {
            tx.push(f, Command::DeleteElement(*key));
        }
    }
    if let Some(new) = node {
        for f in Family::ALL {
            node_commands(tx, f, &state.node, new);
        }
    }
    let created = Family::ALL.map(|f| {
        let (_, adds) = &diffs[f as usize];
        let new = Created::needed_by(adds).minus(&state.table(f).chains);
        create_commands(tx, f, &new);
        new
    });
    for (f, (_, adds)) in Family::ALL.into_iter().zip(diffs) {
        for element in adds {
            tx.push(f, Command::AddElement(element));
        }
    }
    let dropped = Family::ALL.map(|f| {
        let kept = overlays[f as usize].objects_after(&created[f as usize]);
        let dropped = unneeded(&state.table(f).chains, &kept);
        delete_commands(tx, f, &state.table(f).chains, &kept);
        dropped
    });
    for f in Family::ALL {
        tx.push(f, Command::FlushSet(SetId::Generation));
        tx.push(f, Command::AddElement(Element::Generation(generation)));
    }
    (created, dropped)
}

/// What of `had` is not in `kept`.
fn unneeded(had: &Created, kept: &Created) -> Created {
    had.clone().minus(kept)
}

/// Deletes the on-demand objects of `had` that `kept` does not have, each after whatever
/// refers to it: load-balancing chains, then the affinity chains and sticky sets only they
/// used, then endpoint slot chains and their maps.
fn delete_commands(tx: &mut Transaction, f: Family, had: &Created, kept: &Created) {
    let gone = unneeded(had, kept);
    if gone.is_empty() {
        return;
    }
    for lb in &gone.lb_chains {
        tx.push(f, Command::DeleteChain(Chain::Lb(*lb)));
    }
    let (had_affinity, had_sticky) = had.affinity_objects();
    let (kept_affinity, kept_sticky) = kept.affinity_objects();
    for (slot, t) in had_affinity.difference(&kept_affinity) {
        tx.push(f, Command::DeleteChain(Chain::AffinityEndpoint(*slot, *t)));
    }
    for slot in had_sticky.difference(&kept_sticky) {
        tx.push(f, Command::DeleteSet(SetId::Sticky(*slot)));
    }
    for slot in &gone.slots {
        tx.push(f, Command::DeleteChain(Chain::Endpoint(*slot)));
        tx.push(f, Command::DeleteSet(SetId::Endpoints(*slot)));
    }
}

/// Creates endpoint slots, then the load-balancing chains that jump to them.
fn create_commands(tx: &mut Transaction, f: Family, new: &Created) {
    for slot in &new.slots {
        for command in render::slot_commands(*slot, f) {
            tx.push(f, command);
        }
    }
    for lb in &new.lb_chains {
        for command in render::lb_chain_commands(*lb, f) {
            tx.push(f, command);
        }
    }
}

/// Rewrites the node sets and the constant chains whose rules depend on changed settings.
fn node_commands(tx: &mut Transaction, f: Family, old: &NodeRules, new: &NodeRules) {
    if render::node_elements(old, f) != render::node_elements(new, f) {
        for set in SetId::NODE_SETS {
            // Declared again (a no-op if it exists): a table written by an agent that named
            // the set otherwise (`cluster-cidrs`) gets it before the chains refer to it.
            tx.push(f, Command::AddSet(set));
            tx.push(f, Command::FlushSet(set));
        }
        for element in render::node_elements(new, f) {
            tx.push(f, Command::AddElement(element));
        }
    }
    for chain in Chain::CONSTANT {
        let rules = render::chain_rules(chain, new, f);
        if render::chain_rules(chain, old, f) != rules {
            tx.push(f, Command::FlushChain(chain));
            for rule in rules {
                tx.push(f, Command::AddRule(chain, rule));
            }
        }
    }
}

/// A full reconcile of both tables to the state after the change. Returns every on-demand
/// object it (re)creates, and those known to exist that it deletes.
fn full_transaction(
    tx: &mut Transaction,
    state: &AppliedState,
    node: Option<&NodeRules>,
    overlays: &[Overlay<'_>; 2],
    generation: u32,
) -> ([Created; 2], [Created; 2]) {
    let node = node.unwrap_or(&state.node);
    let mut created = [Created::default(), Created::default()];
    let mut dropped = [Created::default(), Created::default()];
    for f in Family::ALL {
        let merged = overlays[f as usize].merged();
        let needed = Created::needed_by(merged.values().map(|e| &e.element));
        let mut elements = merged.values().map(|e| &e.element);
        render::full_reconcile(
            tx,
            FamilyContent {
                family: f,
                node,
                elements: &mut elements,
                generation,
            },
        );
        let had = &state.table(f).chains;
        delete_commands(tx, f, had, &needed);
        dropped[f as usize] = unneeded(had, &needed);
        created[f as usize] = needed;
    }
    (created, dropped)
}

/// Element changes over one family's mirror, not yet committed.
struct Overlay<'a> {
    base: &'a FamilyTable,
    changes: BTreeMap<ElementKey, Option<Entry>>,
}

impl<'a> Overlay<'a> {
    fn new(base: &'a FamilyTable) -> Self {
        Overlay {
            base,
            changes: BTreeMap::new(),
        }
    }

    fn current(&self, key: &ElementKey) -> Option<&Entry> {
        match self.changes.get(key) {
            Some(change) => change.as_ref(),
            None => self.base.elements.get(key),
        }
    }

    /// One resource stops wanting an element.
    fn release(&mut self, element: &Element) {
        let key = element.key();
        let next = match self.current(&key) {
            Some(entry) if entry.refs > 1 => Some(Entry {
                element: entry.element,
                refs: entry.refs - 1,
            }),
            Some(_) => None,
            None => return,
        };
        self.changes.insert(key, next);
    }

    /// One resource wants an element; a different value under the same key is a conflict.
    fn retain(&mut self, element: Element, owner: &str) -> Result<(), DiffError> {
        let key = element.key();
        let next = match self.current(&key) {
            Some(entry) if entry.element == element => Entry {
                element,
                refs: entry.refs + 1,
            },
            Some(entry) => {
                return Err(DiffError::Conflict {
                    owner: owner.to_owned(),
                    set: key.set(),
                    wanted: element.to_string(),
                    held: entry.element.to_string(),
                });
            }
            None => Entry { element, refs: 1 },
        };
        self.changes.insert(key, Some(next));
        Ok(())
    }

    /// Keys to delete (gone, or value changed) and elements to add (new, or value changed).
    fn diff(&self) -> (Vec<ElementKey>, Vec<Element>) {
        let mut deletes = Vec::new();
        let mut adds = Vec::new();
        for (key, new) in &self.changes {
            let old = self.base.elements.get(key).map(|e| e.element);
            let new = new.as_ref().map(|e| e.element);
            if old == new {
                continue;
            }
            if old.is_some() {
                deletes.push(*key);
            }
            if let Some(element) = new {
                adds.push(element);
            }
        }
        (deletes, adds)
    }

    /// The load-balancing chains and slots the elements need after the change, from the
    /// reference counts: proportional to the change, not the table. Slots follow the
    /// largest load-balancing chain of each kind and scope.
    fn objects_after(&self, created: &Created) -> Created {
        let mut refs = self.base.lb_refs.clone();
        for (key, change) in &self.changes {
            let old = self
                .base
                .elements
                .get(key)
                .and_then(|e| e.element.lb_chain());
            let new = change.as_ref().and_then(|e| e.element.lb_chain());
            if old == new {
                continue;
            }
            if let Some(lb) = old {
                let n = refs.entry(lb).or_default();
                *n = n.saturating_sub(1);
            }
            if let Some(lb) = new {
                *refs.entry(lb).or_default() += 1;
            }
        }
        let mut kept = Created {
            lb_chains: refs
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(lb, _)| lb)
                .collect(),
            ..Created::default()
        };
        let all_slots = self.base.chains.slots.iter().chain(&created.slots);
        kept.slots = all_slots
            .filter(|slot| {
                kept.lb_chains.iter().any(|lb| {
                    lb.kind == slot.kind && lb.scope == slot.scope && slot.index < lb.size.get()
                })
            })
            .copied()
            .collect();
        kept
    }

    /// The whole table after the change (a full reconcile is O(table) anyway).
    fn merged(&self) -> BTreeMap<ElementKey, Entry> {
        let mut all = self.base.elements.clone();
        for (key, change) in &self.changes {
            match change {
                Some(entry) => all.insert(*key, entry.clone()),
                None => all.remove(key),
            };
        }
        all
    }
}

impl AppliedState {
    /// Records a diff whose transaction has committed.
    pub fn commit(&mut self, diff: Diff, at: SystemTime) {
        let mut c = diff.commit;
        for f in Family::ALL {
            let table = &mut self.tables[f as usize];
            for (key, change) in &c.elements[f as usize] {
                let old = match change {
                    Some(entry) => table.elements.insert(*key, entry.clone()),
                    None => table.elements.remove(key),
                };
                let old = old.and_then(|e| e.element.lb_chain());
                let new = change.as_ref().and_then(|e| e.element.lb_chain());
                if old == new {
                    continue;
                }
                if let Some(lb) = old
                    && let Some(n) = table.lb_refs.get_mut(&lb)
                {
                    *n -= 1;
                    if *n == 0 {
                        table.lb_refs.remove(&lb);
                    }
                }
                if let Some(lb) = new {
                    *table.lb_refs.entry(lb).or_default() += 1;
                }
            }
            if c.replace_objects {
                table.chains = std::mem::take(&mut c.created[f as usize]);
            } else {
                table
                    .chains
                    .extend(std::mem::take(&mut c.created[f as usize]));
                let dropped = std::mem::take(&mut c.dropped[f as usize]);
                table
                    .chains
                    .lb_chains
                    .retain(|lb| !dropped.lb_chains.contains(lb));
                table.chains.slots.retain(|s| !dropped.slots.contains(s));
            }
        }
        for name in &c.removed {
            self.resources.remove(name);
        }
        for applied in c.upserts {
            self.resources.insert(applied.name.clone(), applied);
        }
        if let Some(node) = c.node {
            self.node = node;
        }
        self.generation = c.generation;
        self.synced = true;
        self.last_error.clear();
        self.last_applied = Some(at);
    }

    /// Rebuilds the state a state file describes, for a kernel whose tables hold its
    /// generation.
    pub fn adopt(file: StateFile, table: &TableName) -> Result<AppliedState, DiffError> {
        let change = v1::Change {
            resources: file.resources,
            ..Default::default()
        };
        let mut state = AppliedState::unknown(file.generation.wrapping_sub(1));
        let diff = diff(&state, &change, table)?;
        state.commit(diff, SystemTime::UNIX_EPOCH);
        // Adopted, not applied by this agent: no time to report.
        state.last_applied = None;
        Ok(state)
    }
}

#[cfg(test)]
mod property;
