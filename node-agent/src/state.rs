//! The applied state's copy on disk, `applied.pb` (the state itself is
//! [`kubenft_nft::applied`]).
//!
//! The file is a fixed header followed by the [`StateFile`] protobuf: the header's magic,
//! format version, payload length and SHA-256 let [`load`] refuse a truncated, corrupt or
//! foreign file, which would otherwise decode (a protobuf cut at a resource boundary is a
//! valid, smaller protobuf) and be adopted as if whole.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

pub use kubenft_nft::applied::*;

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
/// [`AppliedState::file_snapshot`] stays a copy of pointers under the state's lock.
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
    use kubenft_proto::v1;

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
