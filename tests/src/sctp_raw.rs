//! SCTP through raw sockets, for kernels without the SCTP socket layer.
//!
//! Some kernels (this CI's among them) have SCTP connection tracking and NAT in netfilter
//! but no SCTP *sockets*: `socket(…, IPPROTO_SCTP)` fails with `EPROTONOSUPPORT`. The
//! proxy's data path is netfilter only, so it can still be proven with real SCTP packets:
//! the probe sends a genuine INIT chunk from a raw socket, and the server answers it with a
//! genuine INIT-ACK whose State Cookie carries the same greeting the TCP and UDP echo
//! servers send (`NAME CLIENTIP:CLIENTPORT`). Conntrack follows the handshake (INIT then
//! INIT-ACK with the matching verification tag), so the reply is un-NATed exactly as a real
//! association's would be. Without a socket layer the kernel delivers SCTP to raw sockets
//! and sends no ABORT or protocol-unreachable of its own.
//!
//! Where the kernel does have SCTP, the echo tool uses real one-to-one sockets instead (a
//! live SCTP stack would abort these hand-made associations).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::echo::classify;
use crate::probe::{OTHER, ProbeLine, TIMEOUT};

const IPPROTO_SCTP: i32 = 132;
const SOCK_RAW: i32 = 3;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const PARAM_STATE_COOKIE: u16 = 7;
const COMMON_HEADER: usize = 12;

/// Whether this kernel can open SCTP sockets.
pub fn kernel_has_sctp() -> bool {
    Socket::new(
        Domain::IPV4,
        Type::STREAM,
        Some(Protocol::from(IPPROTO_SCTP)),
    )
    .is_ok()
}

/// A raw SCTP socket of `domain`. Wrapped as a `UdpSocket` only for its safe `send_to` /
/// `recv_from` on the same file descriptor (the syscalls are identical for raw sockets).
fn raw_socket(domain: Domain) -> io::Result<UdpSocket> {
    let s = Socket::new(
        domain,
        Type::from(SOCK_RAW),
        Some(Protocol::from(IPPROTO_SCTP)),
    )?;
    Ok(s.into())
}

/// CRC32c (Castagnoli), SCTP's checksum (RFC 9260 appendix A).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// One SCTP packet with a single INIT or INIT-ACK chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Packet {
    src_port: u16,
    dst_port: u16,
    vtag: u32,
    chunk: u8,
    /// The chunk's Initiate Tag.
    init_tag: u32,
    /// The State Cookie parameter (INIT-ACK only).
    cookie: Vec<u8>,
}

impl Packet {
    fn encode(&self) -> Vec<u8> {
        let mut chunk = Vec::with_capacity(32 + self.cookie.len());
        chunk.extend_from_slice(&self.init_tag.to_be_bytes());
        chunk.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
        chunk.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
        chunk.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
        chunk.extend_from_slice(&self.init_tag.to_be_bytes()); // initial TSN
        if self.chunk == CHUNK_INIT_ACK {
            let len = 4 + self.cookie.len();
            chunk.extend_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
            chunk.extend_from_slice(&(len as u16).to_be_bytes());
            chunk.extend_from_slice(&self.cookie);
            chunk.resize(chunk.len().next_multiple_of(4), 0);
        }
        let mut pkt = Vec::with_capacity(COMMON_HEADER + 4 + chunk.len());
        pkt.extend_from_slice(&self.src_port.to_be_bytes());
        pkt.extend_from_slice(&self.dst_port.to_be_bytes());
        pkt.extend_from_slice(&self.vtag.to_be_bytes());
        pkt.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled below
        pkt.push(self.chunk);
        pkt.push(0); // flags
        pkt.extend_from_slice(&((4 + chunk.len()) as u16).to_be_bytes());
        pkt.extend_from_slice(&chunk);
        // The CRC32c is stored little-endian (RFC 9260 appendix A).
        let crc = crc32c(&pkt);
        pkt[8..12].copy_from_slice(&crc.to_le_bytes());
        pkt
    }

    /// Parses an SCTP packet (no IP header) whose first chunk is INIT or INIT-ACK.
    fn decode(b: &[u8]) -> Option<Packet> {
        let be16 = |i: usize| Some(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?));
        let be32 = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let chunk = *b.get(COMMON_HEADER)?;
        if chunk != CHUNK_INIT && chunk != CHUNK_INIT_ACK {
            return None;
        }
        let chunk_len = usize::from(be16(COMMON_HEADER + 2)?);
        let body = COMMON_HEADER + 4;
        let mut cookie = Vec::new();
        let mut at = body + 16;
        while at + 4 <= COMMON_HEADER + chunk_len.min(b.len() - COMMON_HEADER) {
            let (ty, len) = (be16(at)?, usize::from(be16(at + 2)?));
            if len < 4 {
                break;
            }
            if ty == PARAM_STATE_COOKIE {
                cookie = b.get(at + 4..at + len)?.to_vec();
            }
            at += len.next_multiple_of(4);
        }
        Some(Packet {
            src_port: be16(0)?,
            dst_port: be16(2)?,
            vtag: be32(4)?,
            chunk,
            init_tag: be32(body)?,
            cookie,
        })
    }
}

/// Strips the IPv4 header that raw IPv4 sockets deliver (IPv6 raw sockets deliver none).
fn transport_payload(buf: &[u8], from: SocketAddr) -> Option<&[u8]> {
    match from {
        SocketAddr::V4(_) => buf.get(usize::from(buf.first()? & 0x0f) * 4..),
        SocketAddr::V6(_) => Some(buf),
    }
}

/// A nonzero tag that differs between runs and attempts (no RNG dependency needed).
fn fresh_tag() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32).rotate_left(16))
        .unwrap_or(1);
    (nanos ^ std::process::id().rotate_left(8)) | 1
}

/// Answers every INIT to one of `ports` with an INIT-ACK carrying `NAME CLIENT` in its
/// State Cookie, on both families, until the process ends.
pub async fn serve(name: Arc<str>, ports: Vec<u16>) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for domain in [Domain::IPV4, Domain::IPV6] {
        let sock = raw_socket(domain)?;
        sock.set_nonblocking(true)?;
        let sock = tokio::net::UdpSocket::from_std(sock)?;
        tasks.spawn(answer_inits(sock, name.clone(), ports.clone()));
    }
    match tasks.join_next().await {
        Some(Ok(res)) => res,
        Some(Err(e)) => Err(e.into()),
        None => Ok(()),
    }
}

async fn answer_inits(
    sock: tokio::net::UdpSocket,
    name: Arc<str>,
    ports: Vec<u16>,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let Some(init) = transport_payload(&buf[..n], from).and_then(Packet::decode) else {
            continue;
        };
        if init.chunk != CHUNK_INIT || !ports.contains(&init.dst_port) {
            continue;
        }
        let client = SocketAddr::new(from.ip().to_canonical(), init.src_port);
        let ack = Packet {
            src_port: init.dst_port,
            dst_port: init.src_port,
            vtag: init.init_tag,
            chunk: CHUNK_INIT_ACK,
            init_tag: fresh_tag(),
            cookie: format!("{name} {client}\n").into_bytes(),
        };
        if let Err(e) = sock.send_to(&ack.encode(), from).await {
            eprintln!("sctp INIT-ACK to {client}: {e}");
        }
    }
}

/// One handshake attempt: INIT to `target`, then wait for the INIT-ACK that answers it.
/// The raw socket is connected, so ICMP errors (a reject) surface as `ECONNREFUSED` /
/// `EHOSTUNREACH`, and only packets from `target` (the un-NATed reply) are read.
pub fn attempt(target: SocketAddr, source_port: Option<u16>, timeout: Duration) -> ProbeLine {
    let start = Instant::now();
    let sock = match raw_socket(Domain::for_address(target)) {
        Ok(s) => s,
        Err(e) => return classify("sctp raw socket", &e),
    };
    let tag = fresh_tag();
    let src_port = source_port.unwrap_or(32_768 + (tag % 28_000) as u16);
    let init = Packet {
        src_port,
        dst_port: target.port(),
        vtag: 0,
        chunk: CHUNK_INIT,
        init_tag: tag,
        cookie: Vec::new(),
    };
    // Raw sockets take the protocol, not a port, in the address: connect to port 0.
    let peer = SocketAddr::new(target.ip(), 0);
    if let Err(e) = sock
        .connect(peer)
        .and_then(|()| sock.send(&init.encode()).map(drop))
    {
        return classify("sctp send INIT", &e);
    }
    let mut buf = vec![0u8; 65_536];
    let deadline = start + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ProbeLine::failure(TIMEOUT, "sctp: no INIT-ACK");
        }
        if let Err(e) = sock.set_read_timeout(Some(left)) {
            return classify("sctp setsockopt", &e);
        }
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => return classify("sctp await INIT-ACK", &e),
        };
        let Some(ack) = transport_payload(&buf[..n], target).and_then(Packet::decode) else {
            continue;
        };
        let ours = ack.chunk == CHUNK_INIT_ACK
            && ack.vtag == tag
            && ack.src_port == target.port()
            && ack.dst_port == src_port;
        if !ours {
            continue;
        }
        let text = String::from_utf8_lossy(&ack.cookie);
        return match text.trim_end_matches('\n').split_once(' ') {
            Some((server, client)) => ProbeLine::success(server, client, start.elapsed(), None),
            None => ProbeLine::failure(OTHER, format!("sctp: bad cookie {text:?}")),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_rfc_check_value() {
        // RFC 3720 B.4 / the standard CRC-32C check value of "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn init_ack_round_trips_with_its_cookie() {
        let p = Packet {
            src_port: 80,
            dst_port: 40_000,
            vtag: 7,
            chunk: CHUNK_INIT_ACK,
            init_tag: 9,
            cookie: b"web-1 10.244.1.2:40000\n".to_vec(),
        };
        let bytes = p.encode();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(Packet::decode(&bytes), Some(p));
        let init = Packet {
            chunk: CHUNK_INIT,
            cookie: Vec::new(),
            ..Packet::decode(&bytes).unwrap()
        };
        assert_eq!(Packet::decode(&init.encode()), Some(init));
    }

    #[test]
    fn checksum_covers_the_whole_packet() {
        let p = Packet {
            src_port: 1,
            dst_port: 2,
            vtag: 0,
            chunk: CHUNK_INIT,
            init_tag: 3,
            cookie: Vec::new(),
        };
        let mut bytes = p.encode();
        let stored = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        bytes[8..12].fill(0);
        assert_eq!(crc32c(&bytes), stored);
    }
}
