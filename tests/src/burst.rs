//! `kubenft-burst`: many new connections from one process, counted by the server that
//! answered each.
//!
//! Why: statistical checks of the load spread (issue #5) need tens of thousands of new flows.
//! `kubenft-echo probe` prints one JSON line per attempt, which suits dozens of attempts and
//! per-attempt assertions; this tool makes up to [`MAX_COUNT`] sequential attempts against one
//! `kubenft-echo serve` target and prints a single JSON summary ([`BurstReport`]).
//!
//! Every attempt is a new flow, so the proxy balances it anew:
//! - TCP: a new connection, the greeting (`NAME CLIENT\n`) read, then closed by the client.
//!   The closing side keeps each connection in TIME_WAIT for 60 s, so more connections to one
//!   target than the namespace has ephemeral ports (28,232 by default) fail with
//!   `EADDRNOTAVAIL`; set `net.ipv4.tcp_max_tw_buckets=0` in the client's namespace first
//!   (closed connections then leave no TIME_WAIT socket and their ports are free at once). A
//!   port reused this way does not reuse the old flow's endpoint: a SYN on a closed conntrack
//!   entry makes conntrack drop that entry and track (and NAT) the new connection afresh.
//! - UDP: one datagram from a new socket, answered with the greeting. A UDP 5-tuple that
//!   repeats while its conntrack entry lives (30 s) reuses the earlier flow's endpoint instead
//!   of being balanced anew, and the kernel picks ephemeral UDP ports at random, so
//!   `--source-ports LOW-HIGH` binds attempt `i` to port `LOW + i`: no 5-tuple repeats.
//!
//! Bounded: at most [`MAX_COUNT`] attempts, each phase of one attempt bounded by the timeout,
//! the run stopped after `--max-failures` failures or at `--deadline-ms`, whichever first.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Parser};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::probe::{OTHER, REFUSED, TIMEOUT, UNREACHABLE, attempt_args};
use crate::{Host, Lab, LabError, Proto, Result, netns};

/// Upper bound on `--count`.
pub const MAX_COUNT: u32 = 200_000;

/// What one run saw, printed as one JSON line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurstReport {
    /// Attempts made (fewer than asked if the run stopped early).
    pub attempts: u32,
    /// Answers, by the server name of the greeting.
    pub servers: BTreeMap<String, u64>,
    /// Failures, by class (`refused`, `timeout`, `unreachable`, `other`).
    pub failures: BTreeMap<String, u64>,
    /// The first failure's detail, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    /// Why the run stopped before `--count` attempts, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    pub elapsed_ms: u64,
}

impl BurstReport {
    /// Number of attempts a server answered.
    pub fn answered(&self) -> u64 {
        self.servers.values().sum()
    }

    /// Number of failed attempts.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "kubenft-burst",
    about = "Sequential new TCP connections or UDP flows to one kubenft-echo target, counted by answering server",
    group(ArgGroup::new("target").required(true).args(["tcp", "udp"]))
)]
pub struct BurstArgs {
    #[arg(long, value_name = "ADDR:PORT")]
    pub tcp: Option<SocketAddr>,
    #[arg(long, value_name = "ADDR:PORT")]
    pub udp: Option<SocketAddr>,
    /// Number of sequential attempts, each a new flow.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_COUNT)))]
    pub count: u32,
    /// Per-phase timeout (connect, greeting; UDP: the reply) in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub timeout_ms: u64,
    /// Bind attempt `i` to local port `LOW + i` (the range must hold `--count` ports).
    #[arg(long, value_name = "LOW-HIGH", value_parser = parse_port_range)]
    pub source_ports: Option<RangeInclusive<u16>>,
    /// Stop after this many failed attempts.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_failures: u32,
    /// Stop once this many milliseconds have passed.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub deadline_ms: u64,
}

fn parse_port_range(s: &str) -> std::result::Result<RangeInclusive<u16>, String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected LOW-HIGH"))?;
    let lo: u16 = lo.parse().map_err(|e| format!("{lo:?}: {e}"))?;
    let hi: u16 = hi.parse().map_err(|e| format!("{hi:?}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: need 1 <= LOW <= HIGH"));
    }
    Ok(lo..=hi)
}

/// Entry point of the `kubenft-burst` binary.
pub fn main() -> std::process::ExitCode {
    let args = BurstArgs::parse();
    match run_burst(&args) {
        Ok(report) => {
            let mut out = io::stdout().lock();
            let printed = serde_json::to_writer(&mut out, &report)
                .map_err(io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush());
            match printed {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kubenft-burst: writing the report: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("kubenft-burst: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Makes the attempts and tallies them. Fails only on usage errors; every network outcome is
/// counted.
pub fn run_burst(args: &BurstArgs) -> std::result::Result<BurstReport, String> {
    let (proto, target) = match (args.tcp, args.udp) {
        (Some(t), None) => (Proto::Tcp, t),
        (None, Some(t)) => (Proto::Udp, t),
        _ => return Err("give exactly one of --tcp, --udp".into()),
    };
    if let Some(r) = &args.source_ports {
        let ports = u32::from(*r.end()) - u32::from(*r.start()) + 1;
        if ports < args.count {
            return Err(format!(
                "--source-ports {}-{} holds {ports} ports, fewer than --count {}",
                r.start(),
                r.end(),
                args.count
            ));
        }
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let start = Instant::now();
    let deadline = start + Duration::from_millis(args.deadline_ms);
    let mut report = BurstReport::default();
    let mut failed = 0u32;
    for i in 0..args.count {
        if Instant::now() >= deadline {
            report.stopped = Some(format!("deadline of {} ms passed", args.deadline_ms));
            break;
        }
        // Within the range: checked above that it holds `count` ports.
        let port = args
            .source_ports
            .as_ref()
            .and_then(|r| u16::try_from(u32::from(*r.start()) + i).ok());
        let outcome = match proto {
            Proto::Udp => udp_attempt(target, port, timeout),
            _ => tcp_attempt(target, port, timeout),
        };
        report.attempts += 1;
        match outcome {
            Ok(server) => *report.servers.entry(server).or_insert(0) += 1,
            Err((class, detail)) => {
                *report.failures.entry(class.to_string()).or_insert(0) += 1;
                report
                    .first_failure
                    .get_or_insert_with(|| format!("attempt {i}: {class}: {detail}"));
                failed += 1;
                if failed >= args.max_failures {
                    report.stopped = Some(format!("{failed} failures"));
                    break;
                }
            }
        }
    }
    report.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

type Attempt = std::result::Result<String, (&'static str, String)>;

fn classify(phase: &str, e: &io::Error) -> (&'static str, String) {
    let class = match e.kind() {
        ErrorKind::ConnectionRefused => REFUSED,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => TIMEOUT,
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => UNREACHABLE,
        _ => OTHER,
    };
    (class, format!("{phase}: {e}"))
}

fn socket(target: SocketAddr, ty: Type, proto: Protocol, port: Option<u16>) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(target), ty, Some(proto))?;
    if let Some(port) = port {
        let any: IpAddr = match target {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        s.bind(&SockAddr::from(SocketAddr::new(any, port)))?;
    }
    Ok(s)
}

/// The server name of a greeting `NAME CLIENT\n`.
fn server_of(greeting: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(greeting).ok()?;
    let (name, _client) = s.trim_end_matches('\n').split_once(' ')?;
    (!name.is_empty()).then(|| name.to_string())
}

fn bad_greeting(greeting: &[u8]) -> (&'static str, String) {
    (
        OTHER,
        format!("bad greeting {:?}", String::from_utf8_lossy(greeting)),
    )
}

fn tcp_attempt(target: SocketAddr, port: Option<u16>, timeout: Duration) -> Attempt {
    let sock =
        socket(target, Type::STREAM, Protocol::TCP, port).map_err(|e| classify("socket", &e))?;
    sock.connect_timeout(&SockAddr::from(target), timeout)
        .map_err(|e| classify("connect", &e))?;
    let stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| classify("setsockopt", &e))?;
    // The greeting is one short line: at most 256 bytes are read, each read bounded by the
    // timeout.
    let mut greeting = Vec::new();
    BufReader::new((&stream).take(256))
        .read_until(b'\n', &mut greeting)
        .map_err(|e| classify("greeting", &e))?;
    // Dropping the stream closes the connection (FIN).
    server_of(&greeting).ok_or_else(|| bad_greeting(&greeting))
}

fn udp_attempt(target: SocketAddr, port: Option<u16>, timeout: Duration) -> Attempt {
    let sock: UdpSocket = socket(target, Type::DGRAM, Protocol::UDP, port)
        .map_err(|e| classify("socket", &e))?
        .into();
    // Connected, so an ICMP port unreachable surfaces as ECONNREFUSED on recv.
    sock.connect(target).map_err(|e| classify("connect", &e))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| classify("setsockopt", &e))?;
    sock.send(b"ping").map_err(|e| classify("send", &e))?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).map_err(|e| classify("recv", &e))?;
    let line = buf[..n]
        .split_inclusive(|&b| b == b'\n')
        .next()
        .unwrap_or(&[]);
    server_of(line).ok_or_else(|| bad_greeting(&buf[..n]))
}

/// Options of one [`Lab::burst`] run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BurstOpts {
    pub count: u32,
    /// Per-phase timeout of one attempt.
    pub timeout: Duration,
    /// Bind attempt `i` to port `start + i` (see the module docs: needed for UDP).
    pub source_ports: Option<RangeInclusive<u16>>,
    pub max_failures: u32,
    /// When the tool stops making attempts.
    pub deadline: Duration,
}

impl BurstOpts {
    /// `count` attempts, 1 s per phase, at most 10 failures, at most 45 s.
    pub fn count(count: u32) -> Self {
        BurstOpts {
            count,
            timeout: Duration::from_secs(1),
            source_ports: None,
            max_failures: 10,
            deadline: Duration::from_secs(45),
        }
    }

    /// Builder: one source port per attempt, from `ports`.
    pub fn source_ports(mut self, ports: RangeInclusive<u16>) -> Self {
        self.source_ports = Some(ports);
        self
    }

    /// Builder: when the tool stops making attempts.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// The `kubenft-burst` arguments after the target.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = attempt_args(self.count, self.timeout);
        a.extend([
            "--max-failures".to_string(),
            self.max_failures.to_string(),
            "--deadline-ms".to_string(),
            self.deadline.as_millis().to_string(),
        ]);
        if let Some(r) = &self.source_ports {
            a.extend([
                "--source-ports".to_string(),
                format!("{}-{}", r.start(), r.end()),
            ]);
        }
        a
    }
}

impl Lab {
    /// Runs `kubenft-burst` in `from` against `target` and returns its report (an error only
    /// if the tool could not run or report; failed attempts are counted in the report). The
    /// process is killed if it outlives its own deadline by the last attempt's timeouts plus
    /// 5 s.
    pub fn burst(
        &self,
        from: Host<'_>,
        proto: Proto,
        target: SocketAddr,
        opts: &BurstOpts,
    ) -> Result<BurstReport> {
        let bin = self.binary("kubenft-burst")?;
        let mut argv = vec![
            bin.display().to_string(),
            proto.flag().into(),
            target.to_string(),
        ];
        argv.extend(opts.to_args());
        let cap = opts.deadline + opts.timeout * 2 + Duration::from_secs(5);
        let out = netns::run_ok(&mut netns::exec_cmd(&self.ns(from)?, &argv), cap)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).map_err(|e| LabError::BadProbeOutput {
            line: stdout.into_owned(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_and_args() {
        let opts = BurstOpts::count(300).source_ports(20000..=20299);
        let mut argv = vec![
            "kubenft-burst".to_string(),
            "--udp".into(),
            "10.0.0.1:53".into(),
        ];
        argv.extend(opts.to_args());
        let args = BurstArgs::try_parse_from(&argv).unwrap();
        assert_eq!(args.count, 300);
        assert_eq!(args.source_ports, Some(20000..=20299));
        assert_eq!((args.max_failures, args.deadline_ms), (10, 45_000));
        // Too few ports for the count.
        let few = BurstArgs::try_parse_from([
            "kubenft-burst",
            "--udp",
            "10.0.0.1:53",
            "--count",
            "301",
            "--source-ports",
            "20000-20299",
        ])
        .unwrap();
        assert!(run_burst(&few).unwrap_err().contains("fewer than --count"));
        for bad in [
            &["kubenft-burst", "--count", "3"][..],
            &["kubenft-burst", "--tcp", "1.2.3.4:1", "--count", "0"],
            &["kubenft-burst", "--tcp", "1.2.3.4:1", "--count", "200001"],
            &[
                "kubenft-burst",
                "--tcp",
                "1.2.3.4:1",
                "--udp",
                "1.2.3.4:1",
                "--count",
                "1",
            ],
            &[
                "kubenft-burst",
                "--tcp",
                "1.2.3.4:1",
                "--count",
                "1",
                "--source-ports",
                "9-8",
            ],
        ] {
            assert!(BurstArgs::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn greetings() {
        assert_eq!(server_of(b"web-1 10.0.0.1:5\n").as_deref(), Some("web-1"));
        assert_eq!(server_of(b"garbage"), None);
        assert_eq!(server_of(b" 10.0.0.1:5\n"), None);
    }

    #[test]
    fn report_round_trip() {
        let r = BurstReport {
            attempts: 3,
            servers: [("a".to_string(), 2)].into(),
            failures: [(TIMEOUT.to_string(), 1)].into(),
            first_failure: Some("attempt 2: timeout: recv".into()),
            stopped: None,
            elapsed_ms: 7,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<BurstReport>(&s).unwrap(), r);
        assert_eq!((r.answered(), r.failed()), (2, 1));
    }
}
