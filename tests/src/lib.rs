//! kubenft-lab: a Kubernetes-shaped cluster of network namespaces on one machine.
//!
//! Why this exists: the only convincing proof that a kube-proxy replacement works is real
//! packets through real nftables rules in real node network stacks, judged the way a user
//! judges them (which pod answered, which source address it saw, refused versus timed out).
//! This crate builds that world from `ip netns` namespaces — a fabric bridge, a control-plane
//! host, nodes with routed pods, an external client — and runs the real `kubenft-controller`,
//! `kubenft-agent` and the `kubenft-echo` test server in it (docs/contract.md §6,
//! docs/behaviours.md §4.3).
//!
//! Design rules that shape the API:
//! - Everything is bounded: every command runs with a timeout ([`netns::run`]), every wait is
//!   a capped poll ([`wait_until`]).
//! - A [`Lab`] owns every namespace and process it creates and removes them on `Drop`, also
//!   when a test panics; [`sweep_stale`] removes what a SIGKILLed test process left behind.
//! - Labs are isolated by a per-instance namespace prefix, so tests run in parallel; addresses
//!   repeat across labs because every lab has its own namespaces.
//! - Traffic only ever goes to addresses inside the lab's own namespaces.
//!
//! Modules: [`netns`] (commands, namespaces, sweeping), [`topology`] (the [`Lab`]),
//! [`process`] (managed child processes), [`manifest`] (Kubernetes objects for the
//! controller's `--source dir:`), [`probe`] (typed probe results), [`echo`] (the
//! `kubenft-echo` server and probe client), [`burst`] (the `kubenft-burst` many-flow counter),
//! [`pki`] (the lab's certificates: every lab runs the controller and agents with mutual TLS),
//! [`flood`] (the `kubenft-flood` hostile clients of the bounded-resources tests).
#![forbid(unsafe_code)]

pub mod burst;
pub mod echo;
pub mod flood;
pub mod manifest;
pub mod netns;
pub mod pki;
pub mod probe;
pub mod process;
pub mod sctp_raw;
pub mod topology;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use manifest::{
    Cond, IpFamily, Node as NodeManifest, Service, ServiceType, Slice, TrafficPolicy,
};
pub use netns::sweep_stale;
pub use probe::{ProbeOpts, ProbeResult};
pub use process::Process;
pub use topology::{EchoPorts, Host, Lab, LabConfig, Node, NodeConfig, Pod};

/// Transport protocol of a probe, an echo listener or a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// The Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn k8s_name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }

    /// The `kubenft-echo` flag (`--tcp`, `--udp`, `--sctp`).
    pub fn flag(self) -> &'static str {
        match self {
            Proto::Tcp => "--tcp",
            Proto::Udp => "--udp",
            Proto::Sctp => "--sctp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.k8s_name())
    }
}

/// Everything that can go wrong while building or driving a lab. Command failures carry the
/// command line and its stderr, because that is what one needs to debug a failed setup.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (network namespaces, veths, nft); run the tests as root")]
    NotRoot,
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` did not finish within {timeout:?} and was killed")]
    CommandTimeout { cmd: String, timeout: Duration },
    #[error("could not start `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "binary `{name}` not found (looked in {searched:?}); run `cargo build --bins` first or set KUBENFT_BIN_DIR"
    )]
    MissingBinary {
        name: String,
        searched: Vec<PathBuf>,
    },
    #[error("unknown {kind} `{name}`")]
    Unknown { kind: &'static str, name: String },
    #[error("invalid lab request: {0}")]
    Invalid(String),
    #[error("process `{name}` is not ready: {reason}\n{logs}")]
    NotReady {
        name: String,
        reason: String,
        logs: String,
    },
    #[error("bad probe output line {line:?}: {reason}")]
    BadProbeOutput { line: String, reason: String },
    #[error("condition not met within {timeout:?}{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    WaitTimeout {
        timeout: Duration,
        last_error: Option<String>,
    },
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias for the lab.
pub type Result<T, E = LabError> = std::result::Result<T, E>;

/// Polls `cond` every `interval` until it returns `Ok(true)` or `timeout` has passed, and
/// returns how long it took (tests report convergence times; they never assert on them).
///
/// An `Err` from `cond` is not fatal — state is often briefly unreadable while things
/// converge — but the last one is reported if the deadline passes. The number of polls is
/// bounded by `timeout / interval + 1`.
pub fn wait_until<E, F>(timeout: Duration, interval: Duration, mut cond: F) -> Result<Duration>
where
    E: fmt::Display,
    F: FnMut() -> std::result::Result<bool, E>,
{
    let start = Instant::now();
    let interval = interval.max(Duration::from_millis(1));
    let max_polls = (timeout.as_millis() / interval.as_millis()).saturating_add(1);
    let mut last_error = None;
    for _ in 0..=max_polls {
        match cond() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last_error = Some(e.to_string()),
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            break;
        }
        std::thread::sleep(interval.min(timeout - elapsed));
    }
    Err(LabError::WaitTimeout {
        timeout,
        last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_bounds() {
        let mut n = 0;
        let took = wait_until(Duration::from_secs(1), Duration::from_millis(1), || {
            n += 1;
            Ok::<_, LabError>(n == 3)
        })
        .unwrap();
        assert!(took < Duration::from_secs(1));
        let err = wait_until(Duration::from_millis(30), Duration::from_millis(10), || {
            Err::<bool, _>("still broken")
        })
        .unwrap_err();
        assert!(err.to_string().contains("still broken"), "{err}");
    }
}
