//! The applied state: what the kernel holds, kept in memory, and its copy on disk.
//!
//! The agent never lists its tables to learn what they hold (too slow at scale); it mirrors
//! them here, element by element with reference counts, and diffs against this mirror. After
//! every committed transaction the applied resources are written to `applied.pb` with the
//! generation that the same transaction stored in the table, so a restarted agent can tell
//! whether the file still describes the kernel and adopt it without touching nft.
//!
//! The file is a fixed header followed by the [`StateFile`] protobuf: the header's magic,
//! format version, payload length and SHA-256 let [`load`] refuse a truncated, corrupt or
//! foreign file, which would otherwise decode (a protobuf cut at a resource boundary is a
//! valid, smaller protobuf) and be adopted as if whole.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kubenft_proto::v1;
use prost::Message;

use crate::model::{Family, NodeConfig, Spec};
use crate::nft::{Element, ElementKey, LbChain, Slot, TableName};
use crate::render::{self, FamilyContent};
use std::num::NonZeroU32;

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
/// it), and encoded it takes a fraction of the memory of its decoded form.
#[derive(Clone, Debug)]
pub struct Applied {
    pub name: String,
    pub version: String,
    encoded: Box<[u8]>,
    pub spec: Spec,
}

impl Applied {
    pub fn new(resource: &v1::Resource, spec: Spec) -> Applied {
        Applied {
            name: resource.name.clone(),
            version: resource.version.clone(),
            encoded: resource.encode_to_vec().into_boxed_slice(),
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
    pub(crate) node: NodeConfig,
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

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn node(&self) -> &NodeConfig {
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

    /// The on-disk form of this state.
    /// Encoded as [`StateFile`] straight from the kept encodings (no resource is decoded or
    /// copied field by field).
    pub fn to_file(&self, table: &TableName) -> EncodedStateFile {
        use prost::encoding::{WireType, encode_key, encode_varint, string, uint32};
        let size: usize = self.applied().map(|a| a.encoded.len() + 8).sum();
        let mut bytes = Vec::with_capacity(size + 64);
        string::encode(1, &table.to_string(), &mut bytes);
        uint32::encode(2, &self.generation, &mut bytes);
        for a in self.applied() {
            encode_key(3, WireType::LengthDelimited, &mut bytes);
            encode_varint(a.encoded.len() as u64, &mut bytes);
            bytes.extend_from_slice(&a.encoded);
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

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a state file: {source}")]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
    #[error("{path}: refused: {reason}")]
    Refused { path: PathBuf, reason: String },
}

const FILE_NAME: &str = "applied.pb";

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// The start of every state file (never the start of a protobuf we write: 0x4b would be
/// field 9, which `StateFile` does not have).
const MAGIC: &[u8; 8] = b"KNFTSTAT";
/// The header's layout and the payload's meaning; a file of another version is refused.
const FORMAT_VERSION: u32 = 1;
/// magic, format version (u32 LE), payload length (u64 LE), SHA-256 of the payload.
const HEADER_LEN: usize = 8 + 4 + 8 + 32;

fn header(payload: &[u8]) -> [u8; HEADER_LEN] {
    use sha2::Digest;
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[20..].copy_from_slice(&sha2::Sha256::digest(payload));
    h
}

/// The payload of a state file's bytes, once its header vouches for it.
fn verified(bytes: &[u8]) -> Result<&[u8], String> {
    use sha2::Digest;
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        if bytes.len() >= 8 && &bytes[..8] == MAGIC {
            return Err(format!("truncated header ({} bytes)", bytes.len()));
        }
        return Err(
            "not a kubenft state file (no header: foreign, or written by an older agent)".into(),
        );
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this agent reads version {FORMAT_VERSION}"
        ));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(format!(
            "truncated or extended: {} payload bytes, the header says {len}",
            payload.len()
        ));
    }
    if sha2::Sha256::digest(payload).as_slice() != &bytes[20..HEADER_LEN] {
        return Err("checksum mismatch (corrupt)".into());
    }
    Ok(payload)
}

/// Reads the state file; `None` if there is none. A file whose header does not vouch for its
/// content is an error, never a smaller state.
pub fn load(dir: &Path) -> Result<Option<StateFile>, StateFileError> {
    let path = state_path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateFileError::Io { path, source }),
    };
    let payload = match verified(&bytes) {
        Ok(p) => p,
        Err(reason) => return Err(StateFileError::Refused { path, reason }),
    };
    StateFile::decode(payload)
        .map(Some)
        .map_err(|source| StateFileError::Decode { path, source })
}

/// Writes the state file atomically: a reader sees the old file or the new one, never a part.
/// The header (and its checksum) is made here, on the caller's blocking thread, so that
/// [`AppliedState::to_file`] stays a concatenation under the state's lock.
pub fn save(dir: &Path, file: &EncodedStateFile) -> Result<(), StateFileError> {
    let path = state_path(dir);
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StateFileError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    out.write_all(&header(&file.bytes)).map_err(io(&tmp))?;
    out.write_all(&file.bytes).map_err(io(&tmp))?;
    out.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Removes the state file if there is one.
pub fn remove(dir: &Path) -> Result<(), StateFileError> {
    let path = state_path(dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StateFileError::Io { path, source: e })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod testdir {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TestDir(pub PathBuf);

    impl TestDir {
        pub fn new() -> TestDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("kna-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TestDir(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_round_trips() {
        let dir = testdir::TestDir::new();
        assert!(load(&dir.0).unwrap().is_none());
        let file = StateFile {
            table: "kubenft".into(),
            generation: 7,
            resources: vec![v1::Resource::versioned(
                "node".into(),
                v1::resource::Kind::Node(v1::NodeRules::default()),
            )],
        };
        let encoded = EncodedStateFile {
            generation: file.generation,
            bytes: file.encode_to_vec(),
        };
        save(&dir.0, &encoded).unwrap();
        assert_eq!(load(&dir.0).unwrap(), Some(file));
        remove(&dir.0).unwrap();
        remove(&dir.0).unwrap();
        assert!(load(&dir.0).unwrap().is_none());
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = testdir::TestDir::new();
        std::fs::write(state_path(&dir.0), b"\xff\xff\xff").unwrap();
        assert!(load(&dir.0).is_err());
    }

    fn two_resources() -> StateFile {
        StateFile {
            table: "kubenft".into(),
            generation: 9,
            resources: vec![
                v1::Resource::versioned(
                    "node".into(),
                    v1::resource::Kind::Node(v1::NodeRules::default()),
                ),
                v1::Resource::versioned(
                    "node-endpoints/1".into(),
                    v1::resource::Kind::NodeEndpoints(v1::NodeEndpoints {
                        ips: vec!["10.244.1.5".into()],
                    }),
                ),
            ],
        }
    }

    /// Saves `file` and returns the bytes on disk.
    fn saved(dir: &Path, file: &StateFile) -> Vec<u8> {
        let encoded = EncodedStateFile {
            generation: file.generation,
            bytes: file.encode_to_vec(),
        };
        save(dir, &encoded).unwrap();
        std::fs::read(state_path(dir)).unwrap()
    }

    fn refused(dir: &Path, bytes: &[u8]) -> String {
        std::fs::write(state_path(dir), bytes).unwrap();
        match load(dir) {
            Err(e @ StateFileError::Refused { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_file_cut_at_a_resource_boundary_is_refused() {
        let dir = testdir::TestDir::new();
        let file = two_resources();
        let bytes = saved(&dir.0, &file);
        // The last resource's field (key, length, message): without it the payload is a valid
        // protobuf of one resource.
        let last = file.resources[1].encoded_len();
        let cut = bytes.len() - last - 2;
        let shorter = StateFile::decode(&bytes[HEADER_LEN..cut]).unwrap();
        assert_eq!(shorter.resources.len(), 1, "the cut is at a boundary");
        let why = refused(&dir.0, &bytes[..cut]);
        assert!(why.contains("truncated"), "{why}");
        assert!(why.contains("applied.pb"), "{why}");
    }

    #[test]
    fn a_flipped_byte_is_refused() {
        let dir = testdir::TestDir::new();
        let mut bytes = saved(&dir.0, &two_resources());
        // Inside the table name: the payload still decodes, to another table's state.
        let at = bytes
            .windows(7)
            .position(|w| w == b"kubenft")
            .expect("table name")
            + 6;
        bytes[at] ^= 0x01;
        assert!(StateFile::decode(&bytes[HEADER_LEN..]).is_ok());
        let why = refused(&dir.0, &bytes);
        assert!(why.contains("checksum"), "{why}");
    }

    #[test]
    fn empty_foreign_and_future_files_are_refused() {
        let dir = testdir::TestDir::new();
        // An empty protobuf is a valid, empty StateFile.
        assert!(refused(&dir.0, b"").contains("empty"));
        // The format before the header: a bare StateFile.
        let bare = two_resources().encode_to_vec();
        assert!(refused(&dir.0, &bare).contains("not a kubenft state file"));
        let mut future = saved(&dir.0, &two_resources());
        future[8] = 2;
        assert!(refused(&dir.0, &future).contains("format version 2"));
        assert!(refused(&dir.0, &future[..12]).contains("truncated header"));
    }

    #[test]
    fn a_directory_in_place_of_the_file_is_an_error_not_a_panic() {
        let dir = testdir::TestDir::new();
        std::fs::create_dir(state_path(&dir.0)).unwrap();
        std::fs::write(state_path(&dir.0).join("x"), b"x").unwrap();
        assert!(matches!(load(&dir.0), Err(StateFileError::Io { .. })));
        let encoded = EncodedStateFile {
            generation: 1,
            bytes: two_resources().encode_to_vec(),
        };
        assert!(save(&dir.0, &encoded).is_err());
    }

    #[test]
    fn an_unwritable_state_dir_is_an_error_not_a_panic() {
        let dir = testdir::TestDir::new();
        let file = dir.0.join("regular");
        std::fs::write(&file, b"").unwrap();
        let under = file.join("state");
        let encoded = EncodedStateFile {
            generation: 1,
            bytes: two_resources().encode_to_vec(),
        };
        let err = save(&under, &encoded).unwrap_err();
        assert!(err.to_string().contains("regular"), "{err}");
        assert!(matches!(load(&under), Err(StateFileError::Io { .. })));
    }
}
