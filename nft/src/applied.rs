//! The applied state: what the kernel holds, mirrored in memory, and its encoded form.
//!
//! The agent never lists its tables to learn what they hold (too slow at scale); it mirrors
//! them here, element by element with reference counts, and diffs against this mirror. After
//! committed transactions the agent writes [`AppliedState::file_snapshot`] to disk with the
//! generation that the last transaction stored in the table, so a restarted agent can tell
//! whether the file still describes the kernel and adopt it without touching nft.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::SystemTime;

use kubenft_proto::v1;
use prost::Message;

use crate::objects::{Element, ElementKey, LbChain, Slot};
use crate::render::{self, FamilyContent};
use crate::rules::{Family, NodeRules, Spec};
use crate::transaction::TableName;

/// An element in the kernel and how many resources want it (a ClusterIP or a hairpin address
/// is shared by several Service ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub element: Element,
    pub refs: u32,
}

/// The mirror of one family's table.
#[derive(Clone, Debug, Default)]
pub struct FamilyTable {
    pub elements: BTreeMap<ElementKey, Entry>,
    /// Load-balancing chains and endpoint slots in the kernel: exactly those the elements
    /// need (created with the first element that needs them, deleted with the last).
    pub chains: Created,
    /// How many dispatch elements jump to each load-balancing chain.
    pub lb_refs: BTreeMap<LbChain, u32>,
}

/// On-demand objects: load-balancing chains and endpoint slots (map + chain).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Created {
    pub lb_chains: BTreeSet<LbChain>,
    pub slots: BTreeSet<Slot>,
}

impl Created {
    /// The on-demand objects some elements need.
    pub fn needed_by<'a>(elements: impl IntoIterator<Item = &'a Element>) -> Created {
        let mut out = Created::default();
        for e in elements {
            out.lb_chains.extend(e.lb_chain());
            out.slots.extend(e.slot());
        }
        out
    }

    /// What `self` has that `known` does not.
    pub fn minus(mut self, known: &Created) -> Created {
        self.lb_chains.retain(|c| !known.lb_chains.contains(c));
        self.slots.retain(|s| !known.slots.contains(s));
        self
    }

    pub fn extend(&mut self, other: Created) {
        self.lb_chains.extend(other.lb_chains);
        self.slots.extend(other.slots);
    }

    pub fn is_empty(&self) -> bool {
        self.lb_chains.is_empty() && self.slots.is_empty()
    }

    /// The affinity chains (`ep-…-S-aT`) and sticky sets these load-balancing chains use.
    pub fn affinity_objects(&self) -> (BTreeSet<(Slot, NonZeroU32)>, BTreeSet<Slot>) {
        let mut chains = BTreeSet::new();
        let mut sticky = BTreeSet::new();
        for lb in &self.lb_chains {
            let Some(t) = lb.affinity else { continue };
            for index in 0..lb.size.get() {
                let slot = Slot {
                    kind: lb.kind,
                    scope: lb.scope,
                    index,
                };
                chains.insert((slot, t));
                sticky.insert(slot);
            }
        }
        (chains, sticky)
    }
}

/// A resource as received and as understood. The received form is kept protobuf-encoded:
/// it is read only for inspection, conntrack cleanup and the state file (which is made of
/// it), and encoded it takes a fraction of the memory of its decoded form. The encoding is
/// shared, so that a snapshot for the state file copies pointers, not bytes.
#[derive(Clone, Debug)]
pub struct Applied {
    pub name: String,
    pub version: String,
    encoded: Arc<[u8]>,
    pub spec: Spec,
}

impl Applied {
    pub fn new(resource: &v1::Resource, spec: Spec) -> Applied {
        Applied {
            name: resource.name.clone(),
            version: resource.version.clone(),
            encoded: resource.encode_to_vec().into(),
            spec,
        }
    }

    /// The resource as received.
    pub fn resource(&self) -> v1::Resource {
        // These bytes were encoded from a decoded message by this process: decoding them
        // cannot fail (the default is unreachable, not a fallback).
        v1::Resource::decode(&*self.encoded).unwrap_or_default()
    }
}

/// Everything the agent has applied.
#[derive(Clone, Debug, Default)]
pub struct AppliedState {
    pub(crate) resources: BTreeMap<String, Applied>,
    pub(crate) node: NodeRules,
    pub(crate) tables: [FamilyTable; 2],
    pub(crate) generation: u32,
    /// The kernel is known to hold exactly this state. Until then the agent reports nothing
    /// applied and the next change is a full reconcile.
    pub(crate) synced: bool,
    /// The last refused change's error (empty once a change commits).
    pub last_error: String,
    pub last_applied: Option<SystemTime>,
}

impl AppliedState {
    /// A state that knows nothing about the kernel; `generation` continues a previous count.
    pub fn unknown(generation: u32) -> AppliedState {
        AppliedState {
            generation,
            ..Default::default()
        }
    }

    pub fn table(&self, family: Family) -> &FamilyTable {
        &self.tables[family as usize]
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Declares that the kernel holds exactly this state (as after an adoption), so the next
    /// change is diffed element by element. For tests that start from a known kernel.
    pub fn assume_synced(&mut self) {
        self.synced = true;
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn node(&self) -> &NodeRules {
        &self.node
    }

    /// Applied resources in name order.
    pub fn applied(&self) -> impl Iterator<Item = &Applied> {
        self.resources.values()
    }

    /// Applied resources, decoded, in name order.
    pub fn resources(&self) -> impl Iterator<Item = v1::Resource> + '_ {
        self.applied().map(Applied::resource)
    }

    /// One applied resource's validated rules.
    pub fn spec(&self, name: &str) -> Option<&Spec> {
        self.resources.get(name).map(|a| &a.spec)
    }

    /// One applied resource, decoded.
    pub fn resource(&self, name: &str) -> Option<v1::Resource> {
        self.resources.get(name).map(Applied::resource)
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// What the Hello reports: nothing while the kernel state is unknown.
    pub fn hello_applied(&self) -> Vec<v1::ResourceVersion> {
        if !self.synced {
            return Vec::new();
        }
        self.applied()
            .map(|a| v1::ResourceVersion {
                name: a.name.clone(),
                version: a.version.clone(),
            })
            .collect()
    }

    /// The system version the Hello states: empty while the kernel state is unknown or
    /// nothing is applied (then the agent has nothing worth confirming).
    pub fn hello_version(&self) -> String {
        if !self.synced || self.is_empty() {
            return String::new();
        }
        self.system_version()
    }

    pub fn system_version(&self) -> String {
        kubenft_proto::system_version(
            self.applied()
                .map(|a| (a.name.as_str(), a.version.as_str())),
        )
    }

    /// The full text of one family's table, as a full reconcile would write it.
    pub fn table_text(&self, table: &TableName, family: Family) -> String {
        let mut elements = self.table(family).elements.values().map(|e| &e.element);
        render::table_text(
            table,
            FamilyContent {
                family,
                node: &self.node,
                elements: &mut elements,
                generation: self.generation,
            },
        )
    }

    /// What the on-disk form of this state is made of: the kept encodings, shared (a pointer
    /// each), so that it is cheap to take under the state's lock and encoded after.
    pub fn file_snapshot(&self, table: &TableName) -> FileSnapshot {
        FileSnapshot {
            table: table.to_string(),
            generation: self.generation,
            resources: self.applied().map(|a| a.encoded.clone()).collect(),
        }
    }
}

/// The state's content for its file, taken by [`AppliedState::file_snapshot`].
#[derive(Debug)]
pub struct FileSnapshot {
    table: String,
    generation: u32,
    resources: Vec<Arc<[u8]>>,
}

impl FileSnapshot {
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Encoded as [`StateFile`] straight from the kept encodings (no resource is decoded or
    /// copied field by field).
    pub fn encode(&self) -> EncodedStateFile {
        use prost::encoding::{WireType, encode_key, encode_varint, string, uint32};
        let size: usize = self.resources.iter().map(|r| r.len() + 8).sum();
        let mut bytes = Vec::with_capacity(size + 64);
        string::encode(1, &self.table, &mut bytes);
        uint32::encode(2, &self.generation, &mut bytes);
        for r in &self.resources {
            encode_key(3, WireType::LengthDelimited, &mut bytes);
            encode_varint(r.len() as u64, &mut bytes);
            bytes.extend_from_slice(r);
        }
        EncodedStateFile {
            generation: self.generation,
            bytes,
        }
    }
}

/// A [`StateFile`], encoded.
#[derive(Debug)]
pub struct EncodedStateFile {
    pub generation: u32,
    pub bytes: Vec<u8>,
}

/// The payload of `applied.pb` (after the header that [`save`] writes and [`load`] checks).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StateFile {
    #[prost(string, tag = "1")]
    pub table: String,
    #[prost(uint32, tag = "2")]
    pub generation: u32,
    #[prost(message, repeated, tag = "3")]
    pub resources: Vec<v1::Resource>,
}
