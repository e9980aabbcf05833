//! Probe results: the JSON line `kubenft-echo probe` prints per attempt, and its typed form.
//!
//! Why: lab assertions are about what a client sees — which backend answered, which source
//! address the backend saw, and whether a failure was a refusal (RST / ICMP unreachable:
//! "no endpoints") or a silent drop (timeout: "not for you"). The probe runs inside a
//! namespace as a separate process, so results cross a process boundary as JSON lines; this
//! module owns both ends of that format.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{LabError, Result};

/// One attempt's line as printed by `kubenft-echo probe`:
/// `{"ok":true,"server":"NAME","client":"IP:PORT","ms":1.23}` or
/// `{"ok":false,"error":"refused"|"timeout"|"unreachable"|"other","detail":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeLine {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_ok: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Failure classes, in the wire spelling.
pub const REFUSED: &str = "refused";
pub const TIMEOUT: &str = "timeout";
pub const UNREACHABLE: &str = "unreachable";
pub const OTHER: &str = "other";

impl ProbeLine {
    /// A successful attempt: the greeting's server name and the client address it reported.
    pub fn success(server: &str, client: &str, elapsed: Duration, echo_ok: Option<bool>) -> Self {
        ProbeLine {
            ok: true,
            server: Some(server.to_string()),
            client: Some(client.to_string()),
            ms: Some((elapsed.as_secs_f64() * 100_000.0).round() / 100.0),
            echo_ok,
            error: None,
            detail: None,
        }
    }

    /// A failed attempt of class `error` (one of [`REFUSED`], [`TIMEOUT`], [`UNREACHABLE`],
    /// [`OTHER`]).
    pub fn failure(error: &str, detail: impl Into<String>) -> Self {
        ProbeLine {
            ok: false,
            server: None,
            client: None,
            ms: None,
            echo_ok: None,
            error: Some(error.to_string()),
            detail: Some(detail.into()),
        }
    }
}

/// What one probe attempt saw.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeResult {
    /// A server answered. `client` is the source address *the server saw* (SNAT shows here).
    /// `echo_ok` is set when a payload was sent: whether it came back intact.
    Ok {
        server: String,
        client: SocketAddr,
        ms: f64,
        echo_ok: Option<bool>,
    },
    /// ECONNREFUSED: a TCP RST or an ICMP port unreachable.
    Refused,
    /// No answer within the timeout (dropped somewhere).
    Timeout,
    /// ICMP host/network unreachable (EHOSTUNREACH, ENETUNREACH); detail attached.
    Unreachable(String),
    /// Anything else (reset mid-stream, malformed greeting, ...); detail attached.
    Other(String),
}

impl ProbeResult {
    /// Parses one JSON line of `kubenft-echo probe` output.
    pub fn parse_line(line: &str) -> Result<Self> {
        let bad = |reason: String| LabError::BadProbeOutput {
            line: line.to_string(),
            reason,
        };
        let l: ProbeLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if l.ok {
            let server = l.server.ok_or_else(|| bad("missing server".into()))?;
            let client = l
                .client
                .ok_or_else(|| bad("missing client".into()))?
                .parse()
                .map_err(|e| bad(format!("client: {e}")))?;
            return Ok(ProbeResult::Ok {
                server,
                client,
                ms: l.ms.unwrap_or_default(),
                echo_ok: l.echo_ok,
            });
        }
        let detail = l.detail.unwrap_or_default();
        Ok(match l.error.as_deref() {
            Some(REFUSED) => ProbeResult::Refused,
            Some(TIMEOUT) => ProbeResult::Timeout,
            Some(UNREACHABLE) => ProbeResult::Unreachable(detail),
            Some(OTHER) => ProbeResult::Other(detail),
            other => return Err(bad(format!("unknown error class {other:?}"))),
        })
    }

    /// Whether a server answered.
    pub fn is_ok(&self) -> bool {
        matches!(self, ProbeResult::Ok { .. })
    }

    /// The answering server's name.
    pub fn server(&self) -> Option<&str> {
        match self {
            ProbeResult::Ok { server, .. } => Some(server),
            _ => None,
        }
    }

    /// The client address as the server saw it.
    pub fn client(&self) -> Option<SocketAddr> {
        match self {
            ProbeResult::Ok { client, .. } => Some(*client),
            _ => None,
        }
    }

    /// A short label: the server name for successes, else the failure class. Handy for
    /// tallies and assertion messages.
    pub fn label(&self) -> String {
        match self {
            ProbeResult::Ok { server, .. } => server.clone(),
            ProbeResult::Refused => REFUSED.into(),
            ProbeResult::Timeout => TIMEOUT.into(),
            ProbeResult::Unreachable(_) => UNREACHABLE.into(),
            ProbeResult::Other(_) => OTHER.into(),
        }
    }
}

impl fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeResult::Ok {
                server,
                client,
                ms,
                echo_ok,
            } => {
                write!(f, "ok from {server} (saw {client}, {ms} ms")?;
                if let Some(e) = echo_ok {
                    write!(f, ", echo_ok={e}")?;
                }
                f.write_str(")")
            }
            ProbeResult::Unreachable(d) => write!(f, "unreachable ({d})"),
            ProbeResult::Other(d) => write!(f, "other ({d})"),
            other => f.write_str(&other.label()),
        }
    }
}

/// Counts results by [`ProbeResult::label`], e.g. `{"web-1": 20, "web-2": 19, "timeout": 1}`.
pub fn tally(results: &[ProbeResult]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        *m.entry(r.label()).or_insert(0) += 1;
    }
    m
}

/// Options of one probe run (N sequential attempts, each a new connection / socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOpts {
    pub count: u32,
    /// Per-attempt (per-phase for TCP: connect, greeting, echo) timeout.
    pub timeout: Duration,
    /// Fixed local port (SO_REUSEADDR), to reuse a UDP 5-tuple across attempts.
    pub source_port: Option<u16>,
    /// Send this many bytes and check they are echoed back intact.
    pub payload_bytes: Option<usize>,
}

impl Default for ProbeOpts {
    fn default() -> Self {
        ProbeOpts {
            count: 1,
            timeout: Duration::from_secs(1),
            source_port: None,
            payload_bytes: None,
        }
    }
}

impl ProbeOpts {
    /// `count` attempts with the default 1 s timeout.
    pub fn count(count: u32) -> Self {
        ProbeOpts {
            count,
            ..Default::default()
        }
    }

    /// Builder: per-attempt timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Builder: fixed source port.
    pub fn source_port(mut self, p: u16) -> Self {
        self.source_port = Some(p);
        self
    }

    /// Builder: payload size.
    pub fn payload(mut self, bytes: usize) -> Self {
        self.payload_bytes = Some(bytes);
        self
    }

    /// The `kubenft-echo probe` arguments after the target.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = attempt_args(self.count, self.timeout);
        if let Some(p) = self.source_port {
            a.extend(["--source-port".to_string(), p.to_string()]);
        }
        if let Some(b) = self.payload_bytes {
            a.extend(["--payload-bytes".to_string(), b.to_string()]);
        }
        a
    }

    /// An upper bound on how long the whole probe process may take: every attempt may hit
    /// every phase's timeout, plus process start-up slack.
    pub fn deadline(&self) -> Duration {
        self.timeout * 3 * self.count.max(1) + Duration::from_secs(5)
    }
}

/// `--count N --timeout-ms T`: how many attempts and how long each may take, as both the
/// probe and `kubenft-burst` read them.
pub(crate) fn attempt_args(count: impl ToString, timeout: std::time::Duration) -> Vec<String> {
    vec![
        "--count".to_string(),
        count.to_string(),
        "--timeout-ms".to_string(),
        timeout.as_millis().to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let l = ProbeLine::success(
            "web-1",
            "10.244.1.11:40000",
            Duration::from_micros(1234),
            Some(true),
        );
        let s = serde_json::to_string(&l).unwrap();
        assert_eq!(
            s,
            r#"{"ok":true,"server":"web-1","client":"10.244.1.11:40000","ms":1.23,"echo_ok":true}"#
        );
        let r = ProbeResult::parse_line(&s).unwrap();
        assert_eq!(r.server(), Some("web-1"));
        assert_eq!(r.client(), Some("10.244.1.11:40000".parse().unwrap()));
        let v6 = ProbeLine::success("x", "[fd00::1]:5", Duration::ZERO, None);
        let r = ProbeResult::parse_line(&serde_json::to_string(&v6).unwrap()).unwrap();
        assert_eq!(r.client(), Some("[fd00::1]:5".parse().unwrap()));
        for (class, want) in [
            (REFUSED, ProbeResult::Refused),
            (TIMEOUT, ProbeResult::Timeout),
        ] {
            let s = serde_json::to_string(&ProbeLine::failure(class, "d")).unwrap();
            assert_eq!(ProbeResult::parse_line(&s).unwrap(), want);
        }
        assert!(ProbeResult::parse_line("nonsense").is_err());
        assert!(ProbeResult::parse_line(r#"{"ok":false,"error":"weird"}"#).is_err());
    }
}
