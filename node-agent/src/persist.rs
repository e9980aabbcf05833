//! The state file's writer: after the ACK, one write at a time, always of the latest state.
//!
//! Writing `applied.pb` costs what the table holds (every resource's encoding, a checksum
//! over all of it, an fsync and a rename: 4.5 MiB at 10,000 Services), so it is kept off the
//! path from a change to its ACK. A commit asks for a write ([`StateWriter::request`]) and
//! returns; one task writes a snapshot of the state as it is when the write starts, and
//! writes again if more commits came meanwhile. Changes arriving faster than the disk takes
//! them cost one write, not one each.
//!
//! Lagging behind is safe: every transaction stores its generation in the table, and a
//! restarted agent adopts the file only if its generation is the tables' (see
//! [`crate::applier::recover`]). A file the agent died before writing is one generation (or a
//! few) behind the kernel, so it is refused and the agent reconciles in full, as after any
//! crash between a commit and its write.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::applier::SharedState;
use crate::health::Health;
use crate::nft::TableName;
use crate::state;

/// Writes the applied state to its file, in the background.
pub struct StateWriter {
    dir: PathBuf,
    table: TableName,
    state: SharedState,
    health: Arc<Health>,
    queue: Mutex<Queue>,
    /// The last request a finished write (or failed attempt) covered.
    done: watch::Sender<u64>,
}

#[derive(Default)]
struct Queue {
    /// Requests so far (each after a commit).
    requested: u64,
    /// A task is writing (and will look at `requested` again before it stops).
    writing: bool,
}

impl StateWriter {
    pub fn new(dir: PathBuf, table: TableName, state: SharedState, health: Arc<Health>) -> Self {
        StateWriter {
            dir,
            table,
            state,
            health,
            queue: Mutex::new(Queue::default()),
            done: watch::channel(0).0,
        }
    }

    /// Asks for the state as committed now to be written; returns at once. Needs a tokio
    /// runtime.
    pub fn request(self: &Arc<Self>) {
        let mut queue = self.queue.lock();
        queue.requested += 1;
        if queue.writing {
            return;
        }
        queue.writing = true;
        let writer = self.clone();
        tokio::spawn(async move { writer.write_until_current().await });
    }

    /// Waits until every write requested so far has been attempted (for tests, and at
    /// shutdown before the node is handed over).
    pub async fn flush(&self) {
        let target = self.queue.lock().requested;
        let mut done = self.done.subscribe();
        // The sender lives as long as `self`: `wait_for` cannot fail here.
        let _ = done.wait_for(|d| *d >= target).await;
    }

    /// Writes until no request is newer than the last write.
    async fn write_until_current(self: Arc<Self>) {
        loop {
            let target = {
                let mut queue = self.queue.lock();
                if *self.done.borrow() >= queue.requested {
                    queue.writing = false;
                    return;
                }
                queue.requested
            };
            // Taken after every commit up to `target`: it holds them all (or newer ones).
            let snapshot = self.state.read().file_snapshot(&self.table);
            let dir = self.dir.clone();
            let saved =
                tokio::task::spawn_blocking(move || state::save(&dir, &snapshot.encode())).await;
            let error = match saved {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("writing the state file panicked: {e}")),
            };
            self.report(error);
            self.done.send_replace(target);
        }
    }

    /// A failure only costs a full reconcile after a restart (the file's generation will not
    /// match the tables'), so it is not fatal: it is logged when writing starts failing and
    /// when it works again (not at every write), and shown by `/healthz` while it lasts.
    fn report(&self, error: Option<String>) {
        if self.health.set_persist_error(error.clone()) {
            match error {
                Some(error) => tracing::warn!(
                    %error,
                    "cannot persist the applied state: a restart will reconcile in full (logged again once it works)"
                ),
                None => tracing::info!("the applied state is persisted again"),
            }
        }
    }
}
