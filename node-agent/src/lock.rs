//! One writer per node: the agent holding an exclusive `flock` on `<state-dir>/agent.lock`.
//!
//! Two agents run on one node during a DaemonSet rollout with `maxSurge`, or a restart that
//! overlaps the old process. Both writing the tables made every change of the older one fail
//! (its mirror no longer matched the kernel). The second to start is a *standby*: it answers
//! `/healthz` and `/livez` (the listeners share their ports through `SO_REUSEPORT`) but
//! neither connects to a controller nor runs nft, and tries the lock every [`POLL`]. The
//! kernel releases the lock when its holder exits, however it exits (SIGKILL included); the
//! standby then recovers the state file (adopting the tables when their generation matches,
//! without a transaction) and carries on.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};
use tokio_util::sync::CancellationToken;

use crate::health::Health;

pub const LOCK_FILE: &str = "agent.lock";
/// How often a standby tries the lock (a takeover waits at most this long after the holder
/// exits).
pub const POLL: Duration = Duration::from_millis(200);

/// The node's lock, held until dropped (or until the process ends).
#[derive(Debug)]
pub struct NodeLock {
    _file: File,
}

/// How [`acquire`] ended.
#[derive(Debug)]
pub enum Acquired {
    /// This agent holds the node.
    Held(NodeLock),
    /// The lock file cannot be opened or locked (an unwritable state directory, a file
    /// system without locks): the agent runs without it, as before there was one.
    Unavailable,
    /// Shut down while waiting.
    Cancelled,
}

pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join(LOCK_FILE)
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Takes the lock if it is free: `Ok(false)` while another open file holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What the holder wrote into the lock file (its pid), for the standby's log line.
fn holder(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Waits until this agent holds the node's lock, as a standby (reported by `health`) while
/// another agent holds it; logs once when it starts waiting and once when it takes over.
pub async fn acquire(state_dir: &Path, health: &Health, cancel: &CancellationToken) -> Acquired {
    let path = lock_path(state_dir);
    let file = match open(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open the node lock: running without it (another agent on this node would write the same tables)");
            return Acquired::Unavailable;
        }
    };
    let mut waiting_since = None;
    loop {
        match try_lock(&file) {
            Ok(true) => break,
            Ok(false) => {
                if waiting_since.is_none() {
                    waiting_since = Some(Instant::now());
                    health.set_standby(true);
                    tracing::info!(path = %path.display(), holder = %holder(&path), "another agent holds this node: standby (no controller, no nft) until it exits");
                }
            }
            Err(e) => {
                health.set_standby(false);
                tracing::warn!(path = %path.display(), error = %e, "cannot lock the node: running without the lock (another agent on this node would write the same tables)");
                return Acquired::Unavailable;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Acquired::Cancelled,
            () = tokio::time::sleep(POLL) => {}
        }
    }
    health.set_standby(false);
    if let Some(since) = waiting_since {
        tracing::info!(
            waited_ms = since.elapsed().as_millis() as u64,
            "took over the node: the agent that held it is gone"
        );
    }
    // Only for the next standby's log line; the lock is what counts.
    let _ = file
        .set_len(0)
        .and_then(|()| (&file).write_all(format!("pid {}\n", std::process::id()).as_bytes()));
    Acquired::Held(NodeLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testdir::TestDir;

    #[tokio::test]
    async fn a_second_holder_waits_until_the_first_is_dropped() {
        let dir = TestDir::new();
        let cancel = CancellationToken::new();
        let first_health = Health::default();
        let Acquired::Held(first) = acquire(&dir.0, &first_health, &cancel).await else {
            panic!("a free lock is taken")
        };
        assert!(!first_health.status().standby);
        assert!(holder(&lock_path(&dir.0)).contains(&std::process::id().to_string()));

        let health = std::sync::Arc::new(Health::default());
        let (h, c, d) = (health.clone(), cancel.clone(), dir.0.clone());
        let second = tokio::spawn(async move { acquire(&d, &h, &c).await });
        tokio::time::sleep(POLL * 3).await;
        assert!(!second.is_finished(), "both hold the node");
        assert!(health.status().standby);
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("took over")
            .unwrap();
        assert!(matches!(got, Acquired::Held(_)));
        assert!(!health.status().standby);

        // A standby that is shut down stops waiting.
        let waiting = tokio::spawn({
            let (c, d) = (cancel.clone(), dir.0.clone());
            async move { acquire(&d, &Health::default(), &c).await }
        });
        tokio::time::sleep(POLL).await;
        cancel.cancel();
        let got = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(got, Acquired::Cancelled));
    }

    #[tokio::test]
    async fn an_unusable_state_dir_runs_without_the_lock() {
        let dir = TestDir::new();
        let file = dir.0.join("regular");
        std::fs::write(&file, b"").unwrap();
        let got = acquire(
            &file.join("state"),
            &Health::default(),
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(got, Acquired::Unavailable));
    }
}
