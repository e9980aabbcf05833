//! `kubenft-flood`: hostile and careless clients of one server port, run inside a lab
//! namespace, each reporting what the server did to it as one JSON line.
//!
//! Why: the bounded-resources tests (issue #12) need thousands of idle connections, garbage,
//! 100 MB messages, slowloris clients and calls whose answers are never read against the
//! agent's and the controller's ports. Those ports are only reachable from inside the lab's
//! namespaces (the agent's metrics port from inside its node alone), so the clients run as a
//! process there, started by [`Lab::flood`] or [`Lab::spawn_flood`].
//!
//! Subcommands (every one bounded by `--cap-ms` or `--hold-ms`):
//! - `idle`: `--count` connections that never send a byte; prints an [`IdleReport`] once
//!   they are open (`phase: "open"`), and another once the server has closed every one or the
//!   cap passed (`phase: "done"`).
//! - `garbage`, `slowloris` (`--kind http`: a request's headers a byte at a time; `--kind
//!   tls`: a TLS record a byte at a time) and `http-big` (`--what body|headers`: `--bytes` of
//!   request body or of one header): a [`ConnReport`] of what was sent, answered, and when the
//!   server closed the connection.
//! - `grpc-big`: one gRPC call whose request message is `--bytes` long; a [`CallReport`].
//! - `slow-calls`: `--connections` × `--calls` calls whose answers are never read (a stream
//!   window of `--window` bytes that is never replenished), held for `--hold-ms`; a
//!   [`HeldReport`] once every call has its answer's headers or its refusal, then
//!   `{"released":true}` when they are dropped.
//! - `hold`: one connection with one call answered, then kept open and silent for
//!   `--hold-ms` (`{"connected":true}` once the call was answered).
//!
//! gRPC subcommands speak TLS when given `--ca`, `--cert` and `--key` (the URL's host is
//! verified against the server's certificate), else plaintext.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::{Host, Lab, LabError, Process, Result, netns};

/// Upper bound on `idle --count`.
pub const MAX_IDLE: u32 = 10_000;
/// Upper bound on `--bytes`.
pub const MAX_BYTES: u64 = 256 << 20;
/// Upper bound on `--cap-ms` and `--hold-ms`.
pub const MAX_MS: u64 = 120_000;

/// Idle connections: how many opened, and how the server closed them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleReport {
    /// `open` once every connection was attempted, `done` at the end.
    pub phase: String,
    pub opened: u32,
    pub failed: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Closed by the server within a second of being opened (refused at once).
    pub closed_at_once: u32,
    /// Closed by the server (at once or later).
    pub closed: u32,
    /// Still open at the end (the cap passed first).
    pub still_open: u32,
    /// The longest a connection stayed open before the server closed it.
    pub longest_ms: u64,
}

/// One connection's fate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnReport {
    /// Bytes written before the server closed the connection, or the cap passed.
    pub sent: u64,
    /// The first line of what the server answered (lossy), if anything.
    pub answer: String,
    /// Whether the server closed the connection (EOF or reset) before the cap.
    pub closed: bool,
    /// When the server closed it, from the first byte sent.
    pub closed_after_ms: u64,
}

/// A gRPC call's outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallReport {
    /// tonic's name of the status code (`Ok`, `OutOfRange`, `ResourceExhausted`, …).
    pub code: String,
    pub message: String,
}

/// Calls whose answers are never read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldReport {
    /// Calls whose answer's headers arrived (the server holds the rest of the answer).
    pub held: u32,
    /// Calls refused, and the first refusal's status.
    pub refused: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<CallReport>,
}

#[derive(Debug, Parser)]
#[command(
    name = "kubenft-flood",
    about = "Hostile clients of one server port (idle connections, garbage, big messages, slowloris, unread answers), each reported as JSON"
)]
pub struct FloodArgs {
    #[command(subcommand)]
    pub command: FloodCommand,
}

#[derive(Debug, Subcommand)]
pub enum FloodCommand {
    /// Connections that never send a byte.
    Idle {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_IDLE)))]
        count: u32,
        #[arg(long, default_value_t = 20_000, value_parser = ms)]
        cap_ms: u64,
    },
    /// Bytes that are no protocol at all.
    Garbage {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 4096, value_parser = bytes)]
        bytes: u64,
        #[arg(long, default_value_t = 20_000, value_parser = ms)]
        cap_ms: u64,
    },
    /// A request's headers (or a TLS record) a byte at a time.
    Slowloris {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_enum)]
        kind: SlowKind,
        #[arg(long, default_value_t = 200, value_parser = ms)]
        every_ms: u64,
        #[arg(long, default_value_t = 20_000, value_parser = ms)]
        cap_ms: u64,
    },
    /// An HTTP request with a huge body or a huge header.
    HttpBig {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_enum)]
        what: BigPart,
        #[arg(long, value_parser = bytes)]
        bytes: u64,
        #[arg(long, default_value_t = 20_000, value_parser = ms)]
        cap_ms: u64,
    },
    /// One gRPC call with a huge request message.
    GrpcBig {
        #[command(flatten)]
        grpc: GrpcTarget,
        #[arg(long, value_parser = bytes)]
        bytes: u64,
    },
    /// Calls whose answers are never read.
    SlowCalls {
        #[command(flatten)]
        grpc: GrpcTarget,
        /// The request message, hex-encoded (empty: an empty message).
        #[arg(long, default_value = "")]
        request_hex: String,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        connections: u32,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        calls: u32,
        /// The stream window the client grants (never replenished).
        #[arg(long, default_value_t = 16)]
        window: u32,
        #[arg(long, value_parser = ms)]
        hold_ms: u64,
    },
    /// One connection, one call answered, then silence.
    Hold {
        #[command(flatten)]
        grpc: GrpcTarget,
        #[arg(long, default_value = "")]
        request_hex: String,
        #[arg(long, value_parser = ms)]
        hold_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlowKind {
    Http,
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BigPart {
    Body,
    Headers,
}

/// A gRPC method and how to reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct GrpcTarget {
    /// `https://ADDR:PORT` (with `--ca`, `--cert`, `--key`) or `http://ADDR:PORT`.
    #[arg(long)]
    pub url: String,
    /// The method's path, e.g. `/kubenft.v1.AgentInspect/GetApplied`.
    #[arg(long)]
    pub method: String,
    #[arg(long, requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    #[arg(long, requires = "ca")]
    pub cert: Option<PathBuf>,
    #[arg(long, requires = "ca")]
    pub key: Option<PathBuf>,
}

fn ms(s: &str) -> std::result::Result<u64, String> {
    let v: u64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if v == 0 || v > MAX_MS {
        return Err(format!("{v}: expected 1..={MAX_MS} milliseconds"));
    }
    Ok(v)
}

fn bytes(s: &str) -> std::result::Result<u64, String> {
    let v: u64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if v == 0 || v > MAX_BYTES {
        return Err(format!("{v}: expected 1..={MAX_BYTES} bytes"));
    }
    Ok(v)
}

/// Entry point of the `kubenft-flood` binary.
pub fn main() -> std::process::ExitCode {
    let args = FloodArgs::parse();
    match run(args.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubenft-flood: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints one report as a JSON line (flushed: the test reads it while this process runs).
fn report(value: &impl Serialize) -> std::result::Result<(), String> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, value).map_err(|e| e.to_string())?;
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())
}

fn run(command: FloodCommand) -> std::result::Result<(), String> {
    match command {
        FloodCommand::Idle { to, count, cap_ms } => idle(to, count, Duration::from_millis(cap_ms)),
        FloodCommand::Garbage { to, bytes, cap_ms } => {
            let garbage: Vec<u8> = (0..bytes).map(|i| (i * 151 % 251) as u8).collect();
            let r = send_and_watch(to, &garbage, None, Duration::from_millis(cap_ms))?;
            report(&r)
        }
        FloodCommand::Slowloris {
            to,
            kind,
            every_ms,
            cap_ms,
        } => {
            let data = slow_data(kind);
            let every = Duration::from_millis(every_ms);
            let r = send_and_watch(to, &data, Some(every), Duration::from_millis(cap_ms))?;
            report(&r)
        }
        FloodCommand::HttpBig {
            to,
            what,
            bytes,
            cap_ms,
        } => report(&http_big(to, what, bytes, Duration::from_millis(cap_ms))?),
        FloodCommand::GrpcBig { grpc, bytes } => runtime()?.block_on(grpc_big(&grpc, bytes)),
        FloodCommand::SlowCalls {
            grpc,
            request_hex,
            connections,
            calls,
            window,
            hold_ms,
        } => {
            let request = hex(&request_hex)?;
            runtime()?.block_on(slow_calls(
                &grpc,
                request,
                (connections, calls, window),
                Duration::from_millis(hold_ms),
            ))
        }
        FloodCommand::Hold {
            grpc,
            request_hex,
            hold_ms,
        } => {
            let request = hex(&request_hex)?;
            runtime()?.block_on(hold(&grpc, request, Duration::from_millis(hold_ms)))
        }
    }
}

fn runtime() -> std::result::Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn hex(s: &str) -> std::result::Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("--request-hex {s:?}: odd length"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("--request-hex: {e}")))
        .collect()
}

/// What the server did to a connection, as far as a non-blocking read can tell.
enum Seen {
    Open,
    Data(usize),
    Closed,
}

fn look(s: &mut TcpStream, buf: &mut [u8]) -> Seen {
    match s.read(buf) {
        Ok(0) => Seen::Closed,
        Ok(n) => Seen::Data(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Seen::Open,
        Err(e) if e.kind() == ErrorKind::Interrupted => Seen::Open,
        Err(_) => Seen::Closed,
    }
}

/// Drops from `open` the connections the server has closed, counting them in `r`.
fn sweep(open: &mut Vec<(TcpStream, Instant)>, r: &mut IdleReport) {
    let mut buf = [0u8; 4096];
    open.retain_mut(|(s, at)| {
        if !matches!(look(s, &mut buf), Seen::Closed) {
            return true;
        }
        let lived = at.elapsed();
        r.closed += 1;
        if lived < Duration::from_secs(1) {
            r.closed_at_once += 1;
        }
        r.longest_ms = r.longest_ms.max(lived.as_millis() as u64);
        false
    });
}

fn idle(to: SocketAddr, count: u32, cap: Duration) -> std::result::Result<(), String> {
    let started = Instant::now();
    let mut r = IdleReport {
        phase: "open".into(),
        ..Default::default()
    };
    let mut open: Vec<(TcpStream, Instant)> = Vec::new();
    for i in 0..count {
        if started.elapsed() >= cap {
            break;
        }
        // 5 s: a SYN the full accept queue dropped is sent again after 1 s and 3 s.
        match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Ok(s) => {
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                open.push((s, Instant::now()));
                r.opened += 1;
            }
            Err(e) => {
                r.failed += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        // Look while opening too, so a connection closed at once is seen as such.
        if i % 50 == 49 {
            sweep(&mut open, &mut r);
        }
    }
    report(&r)?;
    loop {
        sweep(&mut open, &mut r);
        if open.is_empty() || started.elapsed() >= cap {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    r.phase = "done".into();
    r.still_open = open.len() as u32;
    report(&r)
}

/// The bytes of a slowloris client: a request's headers that never end, or a TLS record
/// (a ClientHello's header announcing 512 bytes) that never completes.
fn slow_data(kind: SlowKind) -> Vec<u8> {
    let mut data = match kind {
        SlowKind::Http => b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec(),
        SlowKind::Tls => vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ],
    };
    while data.len() < 4096 {
        match kind {
            SlowKind::Http => data.extend_from_slice(b"X-Slow: yes\r\n"),
            SlowKind::Tls => data.push(0),
        }
    }
    data
}

/// Sends `data` (all at once, or a byte every `every`) and watches until the server closes
/// the connection or `cap` passes.
fn send_and_watch(
    to: SocketAddr,
    data: &[u8],
    every: Option<Duration>,
    cap: Duration,
) -> std::result::Result<ConnReport, String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .map_err(|e| format!("connecting to {to}: {e}"))?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut r = ConnReport::default();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut pos = 0;
    while started.elapsed() < cap {
        let chunk = match every {
            Some(_) => 1,
            None => data.len() - pos,
        };
        if pos < data.len() {
            match s.write(&data[pos..(pos + chunk).min(data.len())]) {
                Ok(n) => pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    r.closed = true;
                    break;
                }
            }
        }
        match look(&mut s, &mut buf) {
            Seen::Open => {}
            Seen::Data(n) => {
                if answer.len() < 256 {
                    answer.extend_from_slice(&buf[..n]);
                }
            }
            Seen::Closed => {
                r.closed = true;
                break;
            }
        }
        std::thread::sleep(every.unwrap_or(Duration::from_millis(20)));
    }
    r.sent = pos as u64;
    r.closed_after_ms = started.elapsed().as_millis() as u64;
    r.answer = first_line(&answer);
    Ok(r)
}

fn first_line(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(120)
        .collect()
}

/// A request with `bytes` of body or of one header, written by one thread while another
/// reads the answer (the server may answer and close before the request is all sent).
fn http_big(
    to: SocketAddr,
    what: BigPart,
    bytes: u64,
    cap: Duration,
) -> std::result::Result<ConnReport, String> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .map_err(|e| format!("connecting to {to}: {e}"))?;
    let head = match what {
        BigPart::Body => {
            format!("POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {bytes}\r\n\r\n")
        }
        BigPart::Headers => "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_string(),
    };
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    writer
        .set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let send = std::thread::spawn(move || {
        let mut sent = 0u64;
        if writer.write_all(head.as_bytes()).is_err() {
            return sent;
        }
        let chunk = vec![b'a'; 64 * 1024];
        while sent < bytes && started.elapsed() < cap {
            let n = (bytes - sent).min(chunk.len() as u64) as usize;
            match writer.write(&chunk[..n]) {
                Ok(n) => sent += n as u64,
                Err(_) => break,
            }
        }
        sent
    });
    let mut reader = s;
    reader
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let mut r = ConnReport::default();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < cap {
        match reader.read(&mut buf) {
            Ok(0) => {
                r.closed = true;
                break;
            }
            Ok(n) => {
                if answer.len() < 256 {
                    answer.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                r.closed = true;
                break;
            }
        }
    }
    r.closed_after_ms = started.elapsed().as_millis() as u64;
    let _ = reader.shutdown(std::net::Shutdown::Both);
    r.sent = send.join().unwrap_or(0);
    r.answer = first_line(&answer);
    Ok(r)
}

/// Raw gRPC messages: the request's bytes as given, the answer's bytes as received.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> std::result::Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> std::result::Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

impl GrpcTarget {
    /// A new connection (its own channel) with a stream window of `window` bytes if given.
    async fn connect(
        &self,
        window: Option<u32>,
    ) -> std::result::Result<tonic::transport::Channel, String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| format!("--url {}: {e}", self.url))?
            .connect_timeout(Duration::from_secs(3))
            .initial_stream_window_size(window);
        if let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.cert, &self.key) {
            let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca)?))
                .identity(Identity::from_pem(read(cert)?, read(key)?));
            endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| format!("connecting to {}: {e:?}", self.url))
    }

    fn path(&self) -> std::result::Result<tonic::codegen::http::uri::PathAndQuery, String> {
        self.method
            .parse()
            .map_err(|e| format!("--method {}: {e}", self.method))
    }
}

fn call_report(status: &tonic::Status) -> CallReport {
    CallReport {
        code: format!("{:?}", status.code()),
        message: status.message().chars().take(200).collect(),
    }
}

async fn grpc_big(target: &GrpcTarget, bytes: u64) -> std::result::Result<(), String> {
    let channel = target.connect(None).await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let message = vec![0x0a_u8; bytes as usize];
    let r = match grpc
        .unary(tonic::Request::new(message), target.path()?, Raw)
        .await
    {
        Ok(_) => CallReport {
            code: "Ok".into(),
            message: String::new(),
        },
        Err(status) => call_report(&status),
    };
    report(&r)
}

async fn slow_calls(
    target: &GrpcTarget,
    request: Vec<u8>,
    (connections, calls, window): (u32, u32, u32),
    hold_for: Duration,
) -> std::result::Result<(), String> {
    let mut r = HeldReport::default();
    // What keeps each answer unread: the call's response, never polled for its body.
    let mut held = Vec::new();
    for _ in 0..connections {
        let channel = target.connect(Some(window)).await?;
        for _ in 0..calls {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.map_err(|e| e.to_string())?;
            let call =
                grpc.server_streaming(tonic::Request::new(request.clone()), target.path()?, Raw);
            match tokio::time::timeout(Duration::from_secs(5), call).await {
                Ok(Ok(response)) => {
                    r.held += 1;
                    held.push(response);
                }
                Ok(Err(status)) => {
                    r.refused += 1;
                    r.refusal.get_or_insert_with(|| call_report(&status));
                }
                Err(_) => return Err("no answer's headers within 5 s".into()),
            }
        }
    }
    report(&r)?;
    tokio::time::sleep(hold_for).await;
    drop(held);
    report(&serde_json::json!({"released": true}))
}

async fn hold(
    target: &GrpcTarget,
    request: Vec<u8>,
    hold_for: Duration,
) -> std::result::Result<(), String> {
    let channel = target.connect(None).await?;
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| e.to_string())?;
    grpc.unary(tonic::Request::new(request), target.path()?, Raw)
        .await
        .map_err(|s| format!("the call failed: {s:?}"))?;
    report(&serde_json::json!({"connected": true}))?;
    tokio::time::sleep(hold_for).await;
    drop(channel);
    report(&serde_json::json!({"released": true}))
}

impl crate::topology::LabTls {
    /// `kubenft-flood`'s TLS flags, as the lab's operator.
    pub fn flood_args(&self) -> Vec<String> {
        vec![
            "--ca".into(),
            self.pki.ca().display().to_string(),
            "--cert".into(),
            self.operator.cert.display().to_string(),
            "--key".into(),
            self.operator.key.display().to_string(),
        ]
    }
}

impl Lab {
    fn flood_argv(&self, args: &[&str]) -> Result<Vec<String>> {
        let bin = self.binary("kubenft-flood")?;
        Ok(std::iter::once(bin.display().to_string())
            .chain(args.iter().map(|s| s.to_string()))
            .collect())
    }

    /// Runs `kubenft-flood` with `args` in `from` to its end (killed after `cap`) and
    /// returns its last report.
    pub fn flood<T: serde::de::DeserializeOwned>(
        &self,
        from: Host<'_>,
        args: &[&str],
        cap: Duration,
    ) -> Result<T> {
        let argv = self.flood_argv(args)?;
        let out = netns::run_ok(&mut netns::exec_cmd(&self.ns(from)?, &argv), cap)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).map_err(|e| LabError::BadProbeOutput {
            line: stdout.to_string(),
            reason: e.to_string(),
        })
    }

    /// Starts `kubenft-flood` with `args` in `from` in the background (its reports are read
    /// with [`reports`]); the lab stops it on drop.
    pub fn spawn_flood(&self, name: &str, from: Host<'_>, args: &[&str]) -> Result<Process> {
        let argv = self.flood_argv(args)?;
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.spawn(name, from, &argv)
    }
}

/// The reports a background `kubenft-flood` printed so far that parse as `T`.
pub fn reports<T: serde::de::DeserializeOwned>(p: &Process) -> Vec<T> {
    p.current_stdout()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (≤ `cap`) for a background `kubenft-flood`'s report for which `pred` holds.
pub fn wait_report<T: serde::de::DeserializeOwned>(
    p: &Process,
    cap: Duration,
    pred: impl Fn(&T) -> bool,
) -> Result<T> {
    let mut found = None;
    crate::wait_until(cap, Duration::from_millis(50), || {
        found = reports::<T>(p).into_iter().find(|r| pred(r));
        if found.is_none() && !p.is_running() {
            return Err(format!("kubenft-flood exited: {}", p.log_tail(10)));
        }
        Ok::<_, String>(found.is_some())
    })?;
    found.ok_or_else(|| LabError::Invalid("no report".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli() {
        let a = FloodArgs::try_parse_from([
            "kubenft-flood",
            "idle",
            "--to",
            "127.0.0.1:1",
            "--count",
            "2000",
        ])
        .unwrap();
        assert!(matches!(
            a.command,
            FloodCommand::Idle {
                count: 2000,
                cap_ms: 20_000,
                ..
            }
        ));
        for bad in [
            &[
                "kubenft-flood",
                "idle",
                "--to",
                "127.0.0.1:1",
                "--count",
                "0",
            ][..],
            &[
                "kubenft-flood",
                "idle",
                "--to",
                "127.0.0.1:1",
                "--count",
                "10001",
            ],
            &["kubenft-flood", "garbage", "--to", "x", "--bytes", "1"],
            &[
                "kubenft-flood",
                "http-big",
                "--to",
                "127.0.0.1:1",
                "--what",
                "body",
                "--bytes",
                "999999999999",
            ],
            &[
                "kubenft-flood",
                "grpc-big",
                "--url",
                "https://x:1",
                "--method",
                "/a/b",
                "--ca",
                "ca.pem",
                "--bytes",
                "1",
            ],
            &[
                "kubenft-flood",
                "hold",
                "--url",
                "http://x:1",
                "--method",
                "/a/b",
                "--hold-ms",
                "0",
            ],
        ] {
            assert!(FloodArgs::try_parse_from(bad).is_err(), "{bad:?}");
        }
        assert_eq!(hex("0a0161").unwrap(), vec![0x0a, 0x01, 0x61]);
        assert!(hex("0a0").is_err());
    }

    /// Against a local listener that closes whatever it accepts: every idle connection is
    /// seen closed at once; garbage is seen closed.
    #[test]
    fn sees_the_server_close() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        // Reads something, answers, closes its side, and lets go a little later (at once,
        // the unread rest of a request would reset the connection and lose the answer).
        let server = std::thread::spawn(move || {
            for _ in 0..4 {
                let (mut s, _) = listener.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let _ = s.read(&mut [0u8; 64]);
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                let _ = s.shutdown(std::net::Shutdown::Write);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let r = send_and_watch(to, b"garbage", None, Duration::from_secs(5)).unwrap();
        assert!(r.closed, "{r:?}");
        assert_eq!(r.answer, "HTTP/1.1 400 Bad Request");
        let r = http_big(to, BigPart::Body, 1 << 20, Duration::from_secs(5)).unwrap();
        assert!(r.closed && r.answer.contains("400"), "{r:?}");
        let r = send_and_watch(
            to,
            &slow_data(SlowKind::Http),
            Some(Duration::from_millis(10)),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(r.closed && r.sent < 4096, "{r:?}");
        let r = send_and_watch(to, &slow_data(SlowKind::Tls), None, Duration::from_secs(5));
        assert!(r.unwrap().closed);
        server.join().unwrap();
    }
}
