//! Running transactions: the real `nft` binary, and a fake that records what it was given.

use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::session::{self, Session};
use super::{SetId, TableName, TableObjects, Transaction};
use kubenft_nft::rules::Family;

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

    /// The names of the chains and sets (maps included) of one table, cheaply: no rules, no
    /// elements (a few milliseconds whatever the table holds). `None` if the table is absent.
    fn list_objects(
        &self,
        table: &TableName,
        family: Family,
    ) -> impl Future<Output = Result<Option<TableObjects>, NftError>> + Send;

    /// The elements of one of our sets or maps, each in nft's text syntax (`key : value`
    /// for maps). Costs what the set holds (about 1 s for 30,000 elements here).
    fn list_elements(
        &self,
        table: &TableName,
        family: Family,
        set: SetId,
    ) -> impl Future<Output = Result<Vec<Option<String>>, NftError>> + Send;

    /// A read-only listing of other programs' objects (nft's JSON, verbatim). Runners
    /// without a kernel (fakes) list nothing.
    fn list_json(
        &self,
        listing: &super::Listing,
    ) -> impl Future<Output = Result<String, NftError>> + Send {
        let _ = listing;
        async { Err(NftError::Output("this runner lists no other tables".into())) }
    }

    /// The processes this runner started, so that `nft monitor` can tell our commits from
    /// other programs'.
    fn own_processes(&self) -> OwnProcesses;

    /// How to run `nft monitor` in the same place as the transactions; `None` if there is no
    /// kernel to watch (the fake).
    fn monitor_argv(&self) -> Option<Vec<String>>;
}

/// Reads `nft -j list chains FAMILY` and `nft -j -t list sets|maps FAMILY` output.
fn parse_table_objects(
    table: &TableName,
    chains: &str,
    sets: &[String],
) -> Result<Option<TableObjects>, NftError> {
    let mut out = TableObjects::default();
    let listings = std::iter::once((chains, &["chain"][..]))
        .chain(sets.iter().map(|s| (s.as_str(), &["set", "map"][..])));
    for (json, kinds) in listings {
        let doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| NftError::Output(e.to_string()))?;
        let objects = doc["nftables"]
            .as_array()
            .ok_or_else(|| NftError::Output("no \"nftables\" array".into()))?;
        for object in objects {
            for kind in kinds {
                let Some(o) = object.get(*kind) else { continue };
                if o["table"].as_str() != Some(table.as_str()) {
                    continue;
                }
                let name = o["name"].as_str().unwrap_or_default().to_owned();
                match *kind {
                    "chain" => out.chains.push(name),
                    kind => out.sets.push((name, kind == "map")),
                }
            }
        }
    }
    Ok((!out.chains.is_empty() || !out.sets.is_empty()).then_some(out))
}

/// The nft processes one runner started (the most recent ones: a PID is recycled only after
/// thousands of other processes), and how many of its transactions committed.
#[derive(Clone, Default, Debug)]
pub struct OwnProcesses(Arc<Mutex<OwnInner>>);

#[derive(Default, Debug)]
struct OwnInner {
    recent: std::collections::VecDeque<u32>,
    /// The long-lived `nft -i`: ours however many processes started since.
    session: Option<u32>,
    commits: u64,
}

/// PIDs remembered: more than one transaction's notifications can be in flight at once.
const OWN_PIDS_KEPT: usize = 64;

impl OwnProcesses {
    pub fn started(&self, pid: Option<u32>) {
        let Some(pid) = pid else { return };
        let mut inner = self.0.lock();
        if inner.recent.len() == OWN_PIDS_KEPT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(pid);
    }

    /// A long-lived process (`nft -i`) that commits long after later ones started.
    pub fn started_session(&self, pid: Option<u32>) {
        self.started(pid);
        self.0.lock().session = pid;
    }

    pub fn contains(&self, pid: u32) -> bool {
        let inner = self.0.lock();
        inner.session == Some(pid) || inner.recent.contains(&pid)
    }

    pub fn committed(&self) {
        self.0.lock().commits += 1;
    }

    /// Transactions of ours that committed (each one kernel generation).
    pub fn commits(&self) -> u64 {
        self.0.lock().commits
    }
}

/// The real `nft` binary, optionally behind a command prefix (e.g. `ip netns exec NS`).
/// Small transactions go through one long-lived `nft -i` ([`session`]), large ones (a full
/// apply) through `nft -f -`.
#[derive(Clone, Debug)]
pub struct NftCli {
    argv: Vec<String>,
    session: SessionSlot,
    own: OwnProcesses,
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
            own: OwnProcesses::default(),
        }
    }

    /// The nft binary named by `KUBENFT_NFT` (a path), else `nft` from `PATH`. Tests use it to
    /// put a refusing wrapper in front of the real binary.
    pub fn from_env() -> NftCli {
        match std::env::var("KUBENFT_NFT") {
            Ok(path) if !path.is_empty() => NftCli::with_argv(vec![path]),
            _ => NftCli::default(),
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
        self.own.started_session(session.pid());
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
        // Only a process given a script can commit: listings would only push the PIDs of
        // processes that do out of the list.
        if stdin.is_some() {
            self.own.started(child.id());
        }
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
        let result = match script.len() <= session::MAX_SCRIPT_BYTES {
            true => match self.run_in_session(&script).await {
                Some(result) => result,
                None => self.run_script(&script).await,
            },
            false => self.run_script(&script).await,
        };
        if result.is_ok() {
            self.own.committed();
        }
        result
    }

    async fn list_objects(
        &self,
        table: &TableName,
        family: Family,
    ) -> Result<Option<TableObjects>, NftError> {
        let chains = self
            .run(&["-j", "list", "chains", family.nft()], None)
            .await?;
        let sets = self
            .run(&["-j", "-t", "list", "sets", family.nft()], None)
            .await?;
        let maps = self
            .run(&["-j", "-t", "list", "maps", family.nft()], None)
            .await?;
        parse_table_objects(table, &chains, &[sets, maps])
    }

    async fn list_elements(
        &self,
        table: &TableName,
        family: Family,
        set: SetId,
    ) -> Result<Vec<Option<String>>, NftError> {
        let kind = if set.is_map() { "map" } else { "set" };
        let name = set.to_string();
        let args = ["-j", "list", kind, family.nft(), table.as_str(), &name];
        let json = self.run(&args, None).await?;
        let doc: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| NftError::Output(e.to_string()))?;
        let elements = doc["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|o| o.get(kind))
            .and_then(|s| s.get("elem"))
            .and_then(serde_json::Value::as_array);
        Ok(elements
            .into_iter()
            .flatten()
            .map(super::parse::json_element_text)
            .collect())
    }

    async fn list_json(&self, listing: &super::Listing) -> Result<String, NftError> {
        self.run(&listing.args(), None).await
    }

    fn own_processes(&self) -> OwnProcesses {
        self.own.clone()
    }

    fn monitor_argv(&self) -> Option<Vec<String>> {
        let mut argv = self.argv.clone();
        argv.push("monitor".into());
        Some(argv)
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
    /// The stderr of refusals to come, and how many.
    fail: Option<(String, u32)>,
    /// Refuse every transaction whose text contains this.
    poison: Option<String>,
    generation: Option<u32>,
    objects: Option<TableObjects>,
}

impl FakeNft {
    /// Makes the next `apply` fail with this stderr.
    pub fn fail_next(&self, stderr: &str) {
        self.fail_times(stderr, 1);
    }

    /// Makes the next `times` applies fail with this stderr (`u32::MAX`: every one).
    pub fn fail_times(&self, stderr: &str, times: u32) {
        self.inner.lock().fail = Some((stderr.to_owned(), times));
    }

    /// Refuses every transaction whose text contains `text` (as nft refuses one element).
    pub fn refuse_containing(&self, text: &str) {
        self.inner.lock().poison = Some(text.to_owned());
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
        if let Some((stderr, times)) = state.fail.take().filter(|(_, times)| *times > 0) {
            if times > 1 {
                state.fail = Some((stderr.clone(), times - 1));
            }
            return Err(NftError::Refused { stderr });
        }
        if let Some(poison) = &state.poison
            && tx.to_string().contains(poison.as_str())
        {
            return Err(NftError::Refused {
                stderr: format!("Error: Could not process rule: Invalid argument\n{poison}\n"),
            });
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

    async fn list_objects(
        &self,
        _: &TableName,
        _: Family,
    ) -> Result<Option<TableObjects>, NftError> {
        Ok(self.inner.lock().objects.clone())
    }

    async fn list_elements(
        &self,
        _: &TableName,
        _: Family,
        _: SetId,
    ) -> Result<Vec<Option<String>>, NftError> {
        Err(NftError::Output("the fake holds no elements".into()))
    }

    fn own_processes(&self) -> OwnProcesses {
        OwnProcesses::default()
    }

    fn monitor_argv(&self) -> Option<Vec<String>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_stays_ours_however_many_processes_follow() {
        let own = OwnProcesses::default();
        own.started_session(Some(7));
        for pid in 100..100 + OWN_PIDS_KEPT as u32 * 2 {
            own.started(Some(pid));
        }
        assert!(own.contains(7));
        assert!(!own.contains(100));
    }

    #[test]
    fn parses_the_generation_set() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "ip", "name": "generation", "table": "kubenft", "type": "mark", "handle": 1, "elem": [42]}}]}"#;
        assert_eq!(parse_generation(json).unwrap(), Some(42));
        let empty = r#"{"nftables": [{"set": {"family": "ip", "name": "generation"}}]}"#;
        assert_eq!(parse_generation(empty).unwrap(), None);
        assert!(parse_generation("nope").is_err());
    }
}
