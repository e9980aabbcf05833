//! Running transactions: the real `nft` binary, and a fake that records what it was given.

use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::session::{self, Session};
use super::{TableName, Transaction};
use crate::model::Family;

/// How long one nft invocation may take before it is killed.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("nft did not finish within {0:?}")]
    Timeout(Duration),
    /// nft refused; its stderr, verbatim.
    #[error("{stderr}")]
    Refused { stderr: String },
    #[error("unexpected nft output: {0}")]
    Output(String),
}

/// What the agent needs from nftables.
pub trait Nft: Send + Sync + 'static {
    /// Runs one transaction atomically.
    fn apply(&self, tx: &Transaction) -> impl Future<Output = Result<(), NftError>> + Send;

    /// The generation recorded in a table's `generation` set; `None` if the table or set is
    /// absent or empty.
    fn generation(
        &self,
        table: &TableName,
        family: Family,
    ) -> impl Future<Output = Result<Option<u32>, NftError>> + Send;

    /// The kernel's listing of one table (slow on big tables; for inspection only).
    fn list_table(
        &self,
        table: &TableName,
        family: Family,
    ) -> impl Future<Output = Result<String, NftError>> + Send;
}

/// The real `nft` binary, optionally behind a command prefix (e.g. `ip netns exec NS`).
/// Small transactions go through one long-lived `nft -i` ([`session`]), large ones (a full
/// apply) through `nft -f -`.
#[derive(Clone, Debug)]
pub struct NftCli {
    argv: Vec<String>,
    session: SessionSlot,
}

impl Default for NftCli {
    fn default() -> Self {
        NftCli::with_argv(vec!["nft".into()])
    }
}

/// The long-lived `nft -i`, shared by clones.
#[derive(Clone, Default)]
struct SessionSlot(Arc<tokio::sync::Mutex<SessionState>>);

#[derive(Default)]
enum SessionState {
    /// Not started yet (or dropped after a failure).
    #[default]
    Idle,
    Ready(Box<Session>),
    /// `nft -i` does not work here (an nft built without its CLI): `nft -f -` only.
    Unsupported,
}

impl std::fmt::Debug for SessionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSlot")
    }
}

impl NftCli {
    fn with_argv(argv: Vec<String>) -> NftCli {
        NftCli {
            argv,
            session: SessionSlot::default(),
        }
    }

    /// `nft` run inside a network namespace (tests).
    pub fn in_netns(netns: &str) -> NftCli {
        NftCli::with_argv(
            ["ip", "netns", "exec", netns, "nft"]
                .map(String::from)
                .into(),
        )
    }

    /// Runs a small script through the long-lived session; `None` if there is none to use
    /// (then the caller runs `nft -f -`). A session that failed other than by nft refusing
    /// the script is dropped and replaced on the next call.
    async fn run_in_session(&self, script: &str) -> Option<Result<(), NftError>> {
        let mut state = self.session.0.lock().await;
        if let SessionState::Ready(s) = &mut *state
            && (s.worn() || s.exited())
        {
            // Replaced before anything is sent: a session that died while idle (killed, out
            // of memory) costs nothing.
            *state = SessionState::Idle;
        }
        if matches!(*state, SessionState::Idle) {
            *state = match self.start_session().await {
                Ok(s) => SessionState::Ready(Box::new(s)),
                Err(e) => {
                    tracing::warn!(error = %e, "nft -i does not work here; every transaction runs its own nft");
                    SessionState::Unsupported
                }
            };
        }
        let SessionState::Ready(session) = &mut *state else {
            return None;
        };
        let result = session.run(script, NFT_TIMEOUT).await;
        if let Err(e) = &result
            && !matches!(e, NftError::Refused { .. })
        {
            tracing::warn!(error = %e, "nft -i failed; starting another");
            *state = SessionState::Idle;
        }
        Some(result)
    }

    /// A new session, checked with an empty script.
    async fn start_session(&self) -> Result<Session, NftError> {
        let mut session = Session::spawn(&self.argv)?;
        session.run("", NFT_TIMEOUT).await?;
        Ok(session)
    }

    /// Runs an nft script (`nft -f -`), returning nft's stderr verbatim on failure.
    pub async fn run_script(&self, script: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], Some(script)).await.map(drop)
    }

    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
        let spawn_err = |source| NftError::Spawn {
            program: self.argv.join(" "),
            source,
        };
        let mut child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let io = async {
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(text.as_bytes()).await?;
                pipe.shutdown().await?;
            }
            child.wait_with_output().await
        };
        let out = tokio::time::timeout(NFT_TIMEOUT, io)
            .await
            .map_err(|_| NftError::Timeout(NFT_TIMEOUT))?
            .map_err(spawn_err)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if stderr.trim().is_empty() {
                stderr = format!("nft exited with {}", out.status);
            }
            Err(NftError::Refused { stderr })
        }
    }
}

impl Nft for NftCli {
    async fn apply(&self, tx: &Transaction) -> Result<(), NftError> {
        let script = tx.to_string();
        if script.len() <= session::MAX_SCRIPT_BYTES
            && let Some(result) = self.run_in_session(&script).await
        {
            return result;
        }
        self.run_script(&script).await
    }

    async fn generation(&self, table: &TableName, family: Family) -> Result<Option<u32>, NftError> {
        let args = [
            "-j",
            "list",
            "set",
            family.nft(),
            table.as_str(),
            "generation",
        ];
        match self.run(&args, None).await {
            Ok(json) => parse_generation(&json),
            Err(NftError::Refused { stderr }) if stderr.contains("No such file or directory") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn list_table(&self, table: &TableName, family: Family) -> Result<String, NftError> {
        self.run(&["list", "table", family.nft(), table.as_str()], None)
            .await
    }
}

/// Extracts the single element of `nft -j list set … generation`.
fn parse_generation(json: &str) -> Result<Option<u32>, NftError> {
    let doc: serde_json::Value =
        serde_json::from_str(json).map_err(|e| NftError::Output(e.to_string()))?;
    let objects = doc["nftables"]
        .as_array()
        .ok_or_else(|| NftError::Output("no \"nftables\" array".into()))?;
    let Some(set) = objects.iter().find_map(|o| o.get("set")) else {
        return Ok(None);
    };
    let Some(elems) = set.get("elem").and_then(|e| e.as_array()) else {
        return Ok(None);
    };
    match elems.as_slice() {
        [one] => one
            .as_u64()
            .and_then(|g| u32::try_from(g).ok())
            .map(Some)
            .ok_or_else(|| NftError::Output(format!("generation element {one}"))),
        _ => Ok(None),
    }
}

/// A fake nft for unit tests: records every transaction, fails on demand.
#[derive(Clone, Default)]
pub struct FakeNft {
    inner: Arc<Mutex<FakeState>>,
}

#[derive(Default)]
struct FakeState {
    applied: Vec<Transaction>,
    fail_next: Option<String>,
    generation: Option<u32>,
}

impl FakeNft {
    /// Makes the next `apply` fail with this stderr.
    pub fn fail_next(&self, stderr: &str) {
        self.inner.lock().fail_next = Some(stderr.to_owned());
    }

    /// Sets what `generation` reports.
    pub fn set_generation(&self, generation: Option<u32>) {
        self.inner.lock().generation = generation;
    }

    /// Every transaction applied so far (failed ones are not recorded).
    pub fn applied(&self) -> Vec<Transaction> {
        self.inner.lock().applied.clone()
    }
}

impl Nft for FakeNft {
    async fn apply(&self, tx: &Transaction) -> Result<(), NftError> {
        let mut state = self.inner.lock();
        if let Some(stderr) = state.fail_next.take() {
            return Err(NftError::Refused { stderr });
        }
        state.applied.push(tx.clone());
        Ok(())
    }

    async fn generation(&self, _: &TableName, _: Family) -> Result<Option<u32>, NftError> {
        Ok(self.inner.lock().generation)
    }

    async fn list_table(&self, table: &TableName, family: Family) -> Result<String, NftError> {
        Ok(format!("table {} {table} {{\n}}\n", family.nft()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_generation_set() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "ip", "name": "generation", "table": "kubenft", "type": "mark", "handle": 1, "elem": [42]}}]}"#;
        assert_eq!(parse_generation(json).unwrap(), Some(42));
        let empty = r#"{"nftables": [{"set": {"family": "ip", "name": "generation"}}]}"#;
        assert_eq!(parse_generation(empty).unwrap(), None);
        assert!(parse_generation("nope").is_err());
    }
}
