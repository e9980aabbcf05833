//! A long-lived `nft -i` for small transactions.
//!
//! When an nft process that deleted anything (a set element, or the `generation` set's
//! flush, which every transaction does) closes its netlink socket, the kernel makes it wait
//! until the deleted objects are freed, an RCU grace period: 8-16 ms here, on every change,
//! whatever the table's size. One nft process kept for the agent's life never closes its
//! socket, so a one-endpoint change costs what the kernel's commit costs.
//!
//! Each transaction is written as one line (commands separated by `;`, which nft runs as one
//! batch: all or nothing), followed by a marker command that always fails with a known
//! echo, `list table ip kubenft-sync-<n>`. Everything nft writes to stderr before the
//! marker's error belongs to the transaction: nothing means committed.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, Command};

use super::exec::NftError;

/// Scripts longer than this go through `nft -f -` (a full apply: nothing to gain, and one
/// line of megabytes is not what an interactive reader is for).
pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;
/// The session is replaced after this many bytes (nft's line editor keeps a history).
const RECYCLE_AFTER_BYTES: usize = 64 * 1024 * 1024;

/// What nft prints for the marker, before its echo of the command.
const MARKER_ERROR: &str = "Error: No such file or directory";

pub struct Session {
    child: Child,
    stdin: ChildStdin,
    stderr: BufReader<ChildStderr>,
    seq: u64,
    written: usize,
}

impl Session {
    /// Starts `argv… -i`.
    pub fn spawn(argv: &[String]) -> Result<Session, NftError> {
        let spawn_err = |source| NftError::Spawn {
            program: format!("{} -i", argv.join(" ")),
            source,
        };
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let (Some(stdin), Some(stderr)) = (child.stdin.take(), child.stderr.take()) else {
            return Err(spawn_err(std::io::Error::other("no pipes")));
        };
        Ok(Session {
            child,
            stdin,
            stderr: BufReader::new(stderr),
            seq: 0,
            written: 0,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the nft process has ended.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Whether the session has served enough to be replaced.
    pub fn worn(&self) -> bool {
        self.written > RECYCLE_AFTER_BYTES
    }

    /// Runs one script as one batch. An `Err` other than `Refused` leaves the session in an
    /// unknown state: the caller drops it.
    pub async fn run(&mut self, script: &str, timeout: Duration) -> Result<(), NftError> {
        self.seq += 1;
        let marker = format!("list table ip kubenft-sync-{}", self.seq);
        let mut input = one_line(script);
        input.push('\n');
        input.push_str(&marker);
        input.push('\n');
        self.written += input.len();
        let io = async {
            self.stdin.write_all(input.as_bytes()).await?;
            self.stdin.flush().await?;
            let mut said = Vec::new();
            loop {
                let mut line = String::new();
                if self.stderr.read_line(&mut line).await? == 0 {
                    // Its stderr closed: the process is exiting; its status says why (a
                    // signal, an exit code), so wait a moment for it.
                    let status =
                        tokio::time::timeout(Duration::from_millis(200), self.child.wait()).await;
                    let status = match status {
                        Ok(Ok(status)) => status.to_string(),
                        _ => "status unknown".to_owned(),
                    };
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("nft -i exited ({status})"),
                    ));
                }
                if line.trim_end() == marker {
                    // The marker's caret line follows; its error line came just before.
                    let mut carets = String::new();
                    self.stderr.read_line(&mut carets).await?;
                    if said.last().map(|l: &String| l.trim_end()) == Some(MARKER_ERROR) {
                        said.pop();
                    }
                    return Ok(said.concat());
                }
                said.push(line);
            }
        };
        let stderr = tokio::time::timeout(timeout, io)
            .await
            .map_err(|_| NftError::Timeout(timeout))?
            .map_err(|e| NftError::Output(format!("nft -i: {e}")))?;
        if stderr.trim().is_empty() {
            Ok(())
        } else {
            Err(NftError::Refused { stderr })
        }
    }
}

/// The script as one line: one command per line, joined with `;` (the commands never span
/// lines, and quoted strings in them cannot hold a newline).
fn one_line(script: &str) -> String {
    let mut out = String::with_capacity(script.len() + 16);
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_become_one_line() {
        assert_eq!(
            one_line("add table ip t\n\nadd set ip t s { type ipv4_addr; }\n"),
            "add table ip t; add set ip t s { type ipv4_addr; }"
        );
    }
}
