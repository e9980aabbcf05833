//! `kubenft-echo`: the lab's backend server and client probe.
//!
//! Why a bespoke tool rather than socat/nc: lab assertions need, per attempt, *which* backend
//! answered, *which source address* it saw, and *how* a failure looked (refused vs timeout vs
//! unreachable), as machine-readable output — the agnhost `netexec` idea, reduced to what
//! the proxy tests need. Both sides stay deliberately dumb so a failure is always the
//! proxy's, never the tool's.
//!
//! - `serve`: TCP greets with `NAME CLIENTIP:CLIENTPORT\n` then echoes until EOF; UDP answers
//!   each datagram with the same line followed by the payload. Listeners bind `::`
//!   dual-stack (falling back to `0.0.0.0`). A wildcard UDP socket answers from the routing
//!   source address, so a multi-homed host-network server should be given `--bind`.
//! - `probe`: sequential attempts, one JSON line each (see [`crate::probe::ProbeLine`]),
//!   optionally paced (`--interval-ms`) and stopped by the first answer of a given server
//!   (`--until-server`), so a long-running probe can watch a change take effect.
//!   Blocking std sockets: one attempt at a time needs no runtime, and every blocking call
//!   has a timeout.
//!
//! SCTP uses one-to-one (`SOCK_STREAM`, `IPPROTO_SCTP`) sockets created with socket2 and then
//! driven through the TCP types (accept/read/write/getpeername are the same syscalls), so it
//! needs no unsafe code. Where the kernel has no SCTP sockets (this CI's), both sides fall
//! back to a real INIT / INIT-ACK exchange over raw sockets instead (see [`crate::sctp_raw`]).

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{ArgGroup, Args, Parser, Subcommand};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::Proto;
use crate::probe::{OTHER, ProbeLine, REFUSED, TIMEOUT, UNREACHABLE};
use crate::sctp_raw;

/// Marker printed on stdout once every listener is bound.
pub const READY: &str = "READY";

/// Default UDP payload when `--payload-bytes` is not given.
const DEFAULT_UDP_PAYLOAD: &[u8] = b"ping";

/// Largest UDP datagram we can receive.
const MAX_DATAGRAM: usize = 65_536;

#[derive(Debug, Parser)]
#[command(
    name = "kubenft-echo",
    about = "kubenft lab echo server and probe client"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Serve TCP/UDP(/SCTP) echo on the given ports until SIGTERM.
    Serve(ServeArgs),
    /// Make sequential attempts against ADDR:PORT and print one JSON line per attempt.
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Name reported in every greeting (the pod name).
    #[arg(long)]
    pub name: String,
    #[arg(long = "tcp", value_name = "PORT")]
    pub tcp: Vec<u16>,
    #[arg(long = "udp", value_name = "PORT")]
    pub udp: Vec<u16>,
    #[arg(long = "sctp", value_name = "PORT")]
    pub sctp: Vec<u16>,
    /// Address to bind; `::` is dual-stack and falls back to `0.0.0.0` without IPv6.
    #[arg(long, default_value = "::")]
    pub bind: IpAddr,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["tcp", "udp", "sctp"])))]
pub struct ProbeArgs {
    #[arg(long, value_name = "ADDR:PORT")]
    pub tcp: Option<SocketAddr>,
    #[arg(long, value_name = "ADDR:PORT")]
    pub udp: Option<SocketAddr>,
    #[arg(long, value_name = "ADDR:PORT")]
    pub sctp: Option<SocketAddr>,
    /// Number of sequential attempts (each a new connection/socket).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub count: u32,
    /// Per-phase timeout (connect, greeting, echo) in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,
    /// Bind this local port (SO_REUSEADDR), e.g. to reuse a UDP 5-tuple.
    #[arg(long)]
    pub source_port: Option<u16>,
    /// Send this many bytes and check they come back intact (`echo_ok`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=64 * 1024 * 1024))]
    pub payload_bytes: Option<u64>,
    /// Pause between attempts, in milliseconds (0: back to back).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub interval_ms: u64,
    /// Stop after the first attempt answered by the server of this name (still at most
    /// `--count` attempts).
    #[arg(long, value_name = "NAME")]
    pub until_server: Option<String>,
}

/// Entry point of the `kubenft-echo` binary.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("building the tokio runtime")
            .and_then(|rt| rt.block_on(serve(args))),
        Cmd::Probe(args) => probe(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubenft-echo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// serve

/// Runs the echo server until SIGTERM/SIGINT.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    if args.tcp.is_empty() && args.udp.is_empty() && args.sctp.is_empty() {
        anyhow::bail!("nothing to serve: give at least one --tcp, --udp or --sctp port");
    }
    let name: Arc<str> = Arc::from(args.name.as_str());
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut tasks = JoinSet::new();
    // Without kernel SCTP sockets, SCTP is answered through raw sockets (see sctp_raw).
    let raw_sctp = !args.sctp.is_empty() && !sctp_raw::kernel_has_sctp();
    if raw_sctp {
        tasks.spawn(sctp_raw::serve(name.clone(), args.sctp.clone()));
    }
    let sctp: &[u16] = if raw_sctp { &[] } else { &args.sctp };
    for (proto, ports) in [(Proto::Tcp, &args.tcp[..]), (Proto::Sctp, sctp)] {
        for &port in ports {
            let std_listener = stream_listener(args.bind, port, proto)
                .with_context(|| format!("listening on {proto} port {port}"))?;
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            tasks.spawn(accept_loop(listener, name.clone()));
        }
    }
    for &port in &args.udp {
        let sock =
            udp_socket(args.bind, port).with_context(|| format!("binding UDP port {port}"))?;
        tasks.spawn(udp_loop(
            tokio::net::UdpSocket::from_std(sock)?,
            name.clone(),
        ));
    }
    println!("{READY} {name}");
    io::stdout().flush()?;
    tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        Some(res) = tasks.join_next() => match res {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => anyhow::bail!("a listener stopped unexpectedly"),
            Err(e) => Err(e.into()),
        },
    }
}

/// The peer as the server saw it; IPv4-mapped IPv6 is shown as plain IPv4.
fn peer_string(addr: SocketAddr) -> String {
    SocketAddr::new(addr.ip().to_canonical(), addr.port()).to_string()
}

/// Creates a socket for `bind:port`, dual-stack when binding `::`, falling back to
/// `0.0.0.0` when the host has no IPv6.
fn bound_socket(bind: IpAddr, port: u16, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let attempt = |ip: IpAddr| -> io::Result<Socket> {
        let s = Socket::new(
            Domain::for_address(SocketAddr::new(ip, port)),
            ty,
            Some(proto),
        )?;
        if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            s.set_only_v6(false)?;
        }
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(SocketAddr::new(ip, port)))?;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    match attempt(bind) {
        Err(e) if bind == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && e.kind() != ErrorKind::AddrInUse => {
            attempt(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        }
        other => other,
    }
}

fn stream_listener(bind: IpAddr, port: u16, proto: Proto) -> io::Result<std::net::TcpListener> {
    let s = bound_socket(bind, port, Type::STREAM, stream_protocol(proto))?;
    s.listen(1024)?;
    Ok(s.into())
}

fn udp_socket(bind: IpAddr, port: u16) -> io::Result<UdpSocket> {
    Ok(bound_socket(bind, port, Type::DGRAM, Protocol::UDP)?.into())
}

fn stream_protocol(proto: Proto) -> Protocol {
    match proto {
        // IPPROTO_SCTP; socket2 has no named constant for it.
        Proto::Sctp => Protocol::from(132),
        _ => Protocol::TCP,
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, name: Arc<str>) -> anyhow::Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let name = name.clone();
                tokio::spawn(async move {
                    if let Err(e) = echo_stream(stream, peer, &name).await {
                        eprintln!("connection from {peer}: {e}");
                    }
                });
            }
            // Transient (EMFILE, ECONNABORTED, ...): keep serving.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn echo_stream(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    name: &str,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    stream
        .write_all(format!("{name} {}\n", peer_string(peer)).as_bytes())
        .await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).await?;
    }
    stream.shutdown().await
}

async fn udp_loop(sock: tokio::net::UdpSocket, name: Arc<str>) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("udp recv: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut reply = format!("{name} {}\n", peer_string(peer)).into_bytes();
        reply.extend_from_slice(&buf[..n]);
        if let Err(e) = sock.send_to(&reply, peer).await {
            eprintln!("udp reply to {peer}: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// probe

/// Runs the probe attempts, printing one JSON line each. Fails only on usage errors; every
/// network outcome is a line.
pub fn probe(args: &ProbeArgs) -> anyhow::Result<()> {
    let (proto, target) = match (args.tcp, args.udp, args.sctp) {
        (Some(t), None, None) => (Proto::Tcp, t),
        (None, Some(t), None) => (Proto::Udp, t),
        (None, None, Some(t)) => (Proto::Sctp, t),
        _ => anyhow::bail!("give exactly one of --tcp, --udp, --sctp"),
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let payload = match args.payload_bytes {
        Some(n) => pattern(usize::try_from(n)?),
        None if proto == Proto::Udp => DEFAULT_UDP_PAYLOAD.to_vec(),
        None => Vec::new(),
    };
    let check_echo = args.payload_bytes.is_some();
    let kernel_sctp = proto != Proto::Sctp || sctp_raw::kernel_has_sctp();
    let stdout = io::stdout();
    let interval = Duration::from_millis(args.interval_ms);
    for attempt in 0..args.count {
        if attempt > 0 && !interval.is_zero() {
            std::thread::sleep(interval);
        }
        let line = match proto {
            Proto::Udp => udp_attempt(target, args.source_port, timeout, &payload, check_echo),
            Proto::Sctp if !kernel_sctp => sctp_raw::attempt(target, args.source_port, timeout),
            _ => stream_attempt(
                proto,
                target,
                args.source_port,
                timeout,
                &payload,
                check_echo,
            ),
        };
        let mut out = stdout.lock();
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
        out.flush()?;
        if args.until_server.is_some() && line.server == args.until_server {
            break;
        }
    }
    Ok(())
}

/// A recognisable, non-constant payload (so a truncation or reordering shows).
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A failed attempt's line: refused, timeout or unreachable as the error says.
pub(crate) fn classify(phase: &str, e: &io::Error) -> ProbeLine {
    let class = match e.kind() {
        ErrorKind::ConnectionRefused => REFUSED,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => TIMEOUT,
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => UNREACHABLE,
        _ => OTHER,
    };
    ProbeLine::failure(class, format!("{phase}: {e}"))
}

fn client_socket(
    target: SocketAddr,
    ty: Type,
    proto: Protocol,
    source_port: Option<u16>,
) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(target), ty, Some(proto))?;
    if let Some(port) = source_port {
        let any: IpAddr = match target {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(SocketAddr::new(any, port)))?;
    }
    Ok(s)
}

/// Splits a greeting `NAME CLIENT` into its parts.
fn parse_greeting(line: &[u8]) -> Option<(String, String)> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\n');
    let (name, client) = s.split_once(' ')?;
    Some((name.to_string(), client.to_string()))
}

fn stream_attempt(
    proto: Proto,
    target: SocketAddr,
    source_port: Option<u16>,
    timeout: Duration,
    payload: &[u8],
    check_echo: bool,
) -> ProbeLine {
    let start = Instant::now();
    let sock = match client_socket(target, Type::STREAM, stream_protocol(proto), source_port) {
        Ok(s) => s,
        Err(e) => return classify("socket", &e),
    };
    if let Err(e) = sock.connect_timeout(&SockAddr::from(target), timeout) {
        return classify("connect", &e);
    }
    let stream: TcpStream = sock.into();
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
    {
        return classify("setsockopt", &e);
    }
    let mut reader = BufReader::new(&stream);
    let mut greeting = Vec::new();
    match read_line_by(&mut reader, &mut greeting, start + timeout * 2) {
        Ok(true) => {}
        Ok(false) => return ProbeLine::failure(OTHER, "connection closed before the greeting"),
        Err(e) => return classify("greeting", &e),
    }
    let elapsed = start.elapsed();
    let Some((server, client)) = parse_greeting(&greeting) else {
        return ProbeLine::failure(
            OTHER,
            format!("bad greeting {:?}", String::from_utf8_lossy(&greeting)),
        );
    };
    let echo_ok = if check_echo {
        match echo_roundtrip(&stream, &mut reader, payload, timeout) {
            Ok(ok) => Some(ok),
            Err(e) => return classify("echo", &e),
        }
    } else {
        None
    };
    ProbeLine::success(&server, &client, elapsed, echo_ok)
}

/// Reads one `\n`-terminated line; `Ok(false)` on EOF before a newline. Bounded by the
/// socket read timeout per read and by `deadline` overall.
fn read_line_by(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<bool> {
    while Instant::now() < deadline {
        let before = line.len();
        let n = reader.read_until(b'\n', line)?;
        if line.last() == Some(&b'\n') {
            return Ok(true);
        }
        if n == 0 || line.len() == before {
            return Ok(false);
        }
    }
    Err(io::Error::new(
        ErrorKind::TimedOut,
        "greeting deadline passed",
    ))
}

/// Sends `payload` from a helper thread (so a large payload cannot deadlock against the
/// echo filling our receive buffer), half-closes, and reads until EOF.
fn echo_roundtrip(
    stream: &TcpStream,
    reader: &mut impl Read,
    payload: &[u8],
    timeout: Duration,
) -> io::Result<bool> {
    let mut writer = stream.try_clone()?;
    let to_send = payload.to_vec();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        writer.write_all(&to_send)?;
        writer.shutdown(Shutdown::Write)
    });
    let deadline = Instant::now() + timeout;
    let mut got = Vec::with_capacity(payload.len());
    let mut buf = vec![0u8; 64 * 1024];
    let read_result = loop {
        if Instant::now() >= deadline {
            break Err(io::Error::new(ErrorKind::TimedOut, "echo deadline passed"));
        }
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    if read_result.is_err() {
        // Unblock the sender (its writes are also bounded by the write timeout).
        let _ = stream.shutdown(Shutdown::Both);
    }
    let send_result = sender
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("sender thread panicked")));
    read_result?;
    send_result?;
    Ok(got == payload)
}

fn udp_attempt(
    target: SocketAddr,
    source_port: Option<u16>,
    timeout: Duration,
    payload: &[u8],
    check_echo: bool,
) -> ProbeLine {
    let start = Instant::now();
    let result = (|| -> io::Result<Vec<u8>> {
        let sock: UdpSocket =
            client_socket(target, Type::DGRAM, Protocol::UDP, source_port)?.into();
        // Connected, so an ICMP port unreachable surfaces as ECONNREFUSED on recv.
        sock.connect(target)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send(payload)?;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = sock.recv(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    })();
    let elapsed = start.elapsed();
    let reply = match result {
        Ok(r) => r,
        Err(e) => return classify("udp", &e),
    };
    let (line, rest) = match reply.iter().position(|&b| b == b'\n') {
        Some(i) => reply.split_at(i + 1),
        None => (&reply[..], &[][..]),
    };
    let Some((server, client)) = parse_greeting(line) else {
        return ProbeLine::failure(
            OTHER,
            format!("bad reply {:?}", String::from_utf8_lossy(&reply)),
        );
    };
    ProbeLine::success(
        &server,
        &client,
        elapsed,
        check_echo.then(|| rest == payload),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_and_peer() {
        assert_eq!(
            parse_greeting(b"web-1 10.0.0.1:5\n"),
            Some(("web-1".into(), "10.0.0.1:5".into()))
        );
        assert_eq!(parse_greeting(b"garbage"), None);
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(peer_string(mapped), "10.1.2.3:80");
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(peer_string(v6), "[fd00::1]:80");
    }

    #[test]
    fn cli_parses() {
        Cli::try_parse_from(["kubenft-echo", "probe", "--udp", "[::1]:53", "--count", "3"])
            .unwrap();
        let Cmd::Probe(p) = Cli::try_parse_from([
            "kubenft-echo",
            "probe",
            "--tcp",
            "10.0.0.1:80",
            "--interval-ms",
            "1",
            "--until-server",
            "web-2",
        ])
        .unwrap()
        .cmd
        else {
            panic!("not a probe");
        };
        assert_eq!(
            (p.interval_ms, p.until_server.as_deref()),
            (1, Some("web-2"))
        );
        assert!(Cli::try_parse_from(["kubenft-echo", "probe", "--count", "3"]).is_err());
        assert!(
            Cli::try_parse_from([
                "kubenft-echo",
                "probe",
                "--tcp",
                "1.2.3.4:1",
                "--udp",
                "1.2.3.4:1"
            ])
            .is_err()
        );
        Cli::try_parse_from([
            "kubenft-echo",
            "serve",
            "--name",
            "x",
            "--tcp",
            "1",
            "--tcp",
            "2",
        ])
        .unwrap();
    }
}
