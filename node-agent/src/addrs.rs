//! The node's own addresses, reported in Hello so the controller can resolve
//! nodePortAddresses given as CIDRs.
//!
//! Read from the kernel over an rtnetlink socket (an `RTM_GETLINK` and an `RTM_GETADDR` dump),
//! so the agent needs no `ip` binary; the socket lives in the agent's network namespace. The
//! selection is what `ip -j addr` gave before: every address (`IFA_LOCAL`, else
//! `IFA_ADDRESS`, as `ip` prints it) of every interface without the `IFF_LOOPBACK` flag,
//! minus loopback addresses (127.0.0.0/8, ::1) wherever they are configured. Link-local,
//! tentative, deprecated and secondary addresses, and those of interfaces that are down, are
//! kept, as before. IPv4 and IPv6; other families are ignored.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

// Kernel ABI (include/uapi/linux/netlink.h, rtnetlink.h, if_addr.h, if.h, socket.h).
const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
/// `struct ifinfomsg` and `struct ifaddrmsg`.
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const RTA_HDRLEN: usize = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFF_LOOPBACK: u32 = 0x8;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A dump the kernel marks as interrupted (the table changed meanwhile) is taken again, at
/// most this many times in all.
const DUMP_ATTEMPTS: usize = 3;
/// A reply never takes this long; the bound only keeps a broken kernel from hanging Hello.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger than any datagram the kernel sends in a dump (it fills about a page per read).
const RECV_BUFFER: usize = 64 * 1024;
/// Datagrams one dump may take (a page each: far more than any node's addresses).
const MAX_DATAGRAMS: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum AddrsError {
    #[error("rtnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("rtnetlink {dump} dump: the kernel answered error {errno}")]
    Kernel { dump: &'static str, errno: i32 },
    #[error("rtnetlink {dump} dump: {what}")]
    Malformed { dump: &'static str, what: String },
    #[error("rtnetlink {dump} dump interrupted {DUMP_ATTEMPTS} times (interfaces changing)")]
    Interrupted { dump: &'static str },
    #[error("the address lister stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Every address of the node's interfaces as selected above, sorted, without duplicates.
/// An error is never an empty list: the caller must not report "no addresses" for it.
pub async fn node_addresses() -> Result<Vec<String>, AddrsError> {
    Ok(node_ips().await?.iter().map(ToString::to_string).collect())
}

/// [`node_addresses`] as addresses.
pub async fn node_ips() -> Result<Vec<IpAddr>, AddrsError> {
    tokio::task::spawn_blocking(read_addresses).await?
}

fn read_addresses() -> Result<Vec<IpAddr>, AddrsError> {
    let socket = open()?;
    let links = dump(&socket, RTM_GETLINK, 1, parse_links)?;
    let addrs = dump(&socket, RTM_GETADDR, 2, parse_addrs)?;
    Ok(select(&links, &addrs))
}

/// A netlink message of a dump: its type and payload.
type Message<'a> = (u16, &'a [u8]);
/// Reads one message of a dump into what the dump gathers; `Err` says what is malformed.
type Parser<T> = fn(Message<'_>, &mut T) -> Result<(), String>;

/// An interface's index and flags (`RTM_NEWLINK`).
type Links = BTreeMap<u32, u32>;

/// One address (`RTM_NEWADDR`): its interface's index and the address `ip` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Addr {
    index: u32,
    ip: IpAddr,
}

/// The addresses kept: none of a loopback interface (an address whose interface appeared
/// after the link dump is kept), none that is a loopback address.
fn select(links: &Links, addrs: &[Addr]) -> Vec<IpAddr> {
    let mut kept: Vec<IpAddr> = addrs
        .iter()
        .filter(|a| links.get(&a.index).is_none_or(|f| f & IFF_LOOPBACK == 0))
        .map(|a| a.ip)
        .filter(|ip| !ip.is_loopback())
        .collect();
    kept.sort();
    kept.dedup();
    kept
}

fn open() -> Result<OwnedFd, AddrsError> {
    let socket = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        None, // NETLINK_ROUTE is protocol 0
    )
    .map_err(|e| AddrsError::Socket(e.into()))?;
    rustix::net::bind(&socket, &SocketAddrNetlink::new(0, 0))
        .map_err(|e| AddrsError::Socket(e.into()))?;
    rustix::net::sockopt::set_socket_timeout(
        &socket,
        rustix::net::sockopt::Timeout::Recv,
        Some(RECV_TIMEOUT),
    )
    .map_err(|e| AddrsError::Socket(e.into()))?;
    Ok(socket)
}

fn dump_name(kind: u16) -> &'static str {
    if kind == RTM_GETLINK {
        "link"
    } else {
        "address"
    }
}

/// A dump request for all families: the header and a zeroed `ifinfomsg` or `ifaddrmsg`.
fn request(kind: u16, seq: u32) -> Vec<u8> {
    let body = if kind == RTM_GETLINK {
        IFINFOMSG_LEN
    } else {
        IFADDRMSG_LEN
    };
    let len = NLMSG_HDRLEN + body;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.resize(len, 0);
    msg
}

/// Runs one dump to its end, feeding each reply datagram to `parse`; taken again if the
/// kernel says it was interrupted.
fn dump<T: Default>(
    socket: &OwnedFd,
    kind: u16,
    seq: u32,
    parse: Parser<T>,
) -> Result<T, AddrsError> {
    let name = dump_name(kind);
    let malformed = |what: String| AddrsError::Malformed { dump: name, what };
    let mut buf = vec![0u8; RECV_BUFFER];
    for _ in 0..DUMP_ATTEMPTS {
        let kernel = SocketAddrNetlink::new(0, 0);
        rustix::net::sendto(socket, &request(kind, seq), SendFlags::empty(), &kernel)
            .map_err(|e| AddrsError::Socket(e.into()))?;
        let mut out = T::default();
        let mut interrupted = false;
        let mut datagrams = 0;
        loop {
            datagrams += 1;
            if datagrams > MAX_DATAGRAMS {
                return Err(malformed(format!("no end after {MAX_DATAGRAMS} replies")));
            }
            let (_, len) = rustix::net::recv(socket, &mut buf[..], RecvFlags::TRUNC)
                .map_err(|e| AddrsError::Socket(e.into()))?;
            if len > buf.len() {
                return Err(malformed(format!("a {len}-byte reply was truncated")));
            }
            match read_datagram(&buf[..len], seq, &mut |payload| parse(payload, &mut out)).map_err(
                |e| match e {
                    DatagramError::Kernel(errno) => AddrsError::Kernel { dump: name, errno },
                    DatagramError::Malformed(what) => malformed(what),
                },
            )? {
                Datagram::More { interrupted: i } => interrupted |= i,
                Datagram::Done { interrupted: i } => {
                    interrupted |= i;
                    break;
                }
            }
        }
        if !interrupted {
            return Ok(out);
        }
        tracing::debug!(dump = name, "rtnetlink dump interrupted; taking it again");
    }
    Err(AddrsError::Interrupted { dump: name })
}

enum Datagram {
    More { interrupted: bool },
    Done { interrupted: bool },
}

#[derive(Debug, PartialEq)]
enum DatagramError {
    Kernel(i32),
    Malformed(String),
}

/// Walks the netlink messages of one reply datagram, handing each data message of this dump
/// (`seq`) to `on_message` as (type, payload).
fn read_datagram(
    mut data: &[u8],
    seq: u32,
    on_message: &mut dyn FnMut(Message<'_>) -> Result<(), String>,
) -> Result<Datagram, DatagramError> {
    let mut interrupted = false;
    while !data.is_empty() {
        if data.len() < NLMSG_HDRLEN {
            return Err(DatagramError::Malformed(format!(
                "{} trailing bytes, shorter than a message header",
                data.len()
            )));
        }
        let len = u32_at(data, 0) as usize;
        let kind = u16_at(data, 4);
        let flags = u16_at(data, 6);
        let msg_seq = u32_at(data, 8);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(DatagramError::Malformed(format!(
                "a message claims {len} bytes, {} left",
                data.len()
            )));
        }
        let payload = &data[NLMSG_HDRLEN..len];
        data = &data[align(len).min(data.len())..];
        if msg_seq != seq {
            // Not an answer to this request (a stale reply): not ours to read.
            continue;
        }
        interrupted |= flags & NLM_F_DUMP_INTR != 0;
        match kind {
            NLMSG_NOOP => {}
            NLMSG_ERROR | NLMSG_DONE => {
                // Both carry an errno (negative) first; 0 in an error message is an ack, and a
                // DONE without it is the old, short form.
                let errno = if payload.len() >= 4 {
                    i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"))
                } else {
                    0
                };
                if errno != 0 {
                    return Err(DatagramError::Kernel(-errno));
                }
                if kind == NLMSG_DONE {
                    return Ok(Datagram::Done { interrupted });
                }
            }
            _ => on_message((kind, payload)).map_err(DatagramError::Malformed)?,
        }
    }
    Ok(Datagram::More { interrupted })
}

/// `RTM_NEWLINK` messages: interface index → flags.
fn parse_links((kind, payload): Message<'_>, links: &mut Links) -> Result<(), String> {
    if kind != RTM_NEWLINK {
        return Ok(());
    }
    if payload.len() < IFINFOMSG_LEN {
        return Err(format!("a link message of {} bytes", payload.len()));
    }
    // struct ifinfomsg { u8 family; u8 pad; u16 type; i32 index; u32 flags; u32 change; }
    links.insert(u32_at(payload, 4), u32_at(payload, 8));
    Ok(())
}

/// `RTM_NEWADDR` messages of IPv4 and IPv6: the interface and `IFA_LOCAL`, else `IFA_ADDRESS`
/// (for a point-to-point address `IFA_ADDRESS` is the peer's; IPv6 sends only it).
fn parse_addrs((kind, payload): Message<'_>, addrs: &mut Vec<Addr>) -> Result<(), String> {
    if kind != RTM_NEWADDR {
        return Ok(());
    }
    if payload.len() < IFADDRMSG_LEN {
        return Err(format!("an address message of {} bytes", payload.len()));
    }
    // struct ifaddrmsg { u8 family; u8 prefixlen; u8 flags; u8 scope; u32 index; }
    let family = payload[0];
    let index = u32_at(payload, 4);
    let (mut local, mut address) = (None, None);
    for (attr, value) in attributes(&payload[IFADDRMSG_LEN..])? {
        match attr {
            IFA_LOCAL => local = Some(value),
            IFA_ADDRESS => address = Some(value),
            _ => {}
        }
    }
    let Some(raw) = local.or(address) else {
        return Ok(());
    };
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(raw).map_err(|_| bad_address(family, raw))?,
        )),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(raw).map_err(|_| bad_address(family, raw))?,
        )),
        _ => return Ok(()),
    };
    addrs.push(Addr { index, ip });
    Ok(())
}

fn bad_address(family: u8, raw: &[u8]) -> String {
    format!("an address of family {family} with {} bytes", raw.len())
}

/// The (type, value) attributes (`struct rtattr`) in `data`.
fn attributes(mut data: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    while data.len() >= RTA_HDRLEN {
        let len = usize::from(u16_at(data, 0));
        if len < RTA_HDRLEN || len > data.len() {
            return Err(format!(
                "an attribute claims {len} bytes, {} left",
                data.len()
            ));
        }
        // The top bits of the type are flags (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
        out.push((u16_at(data, 2) & 0x3fff, &data[RTA_HDRLEN..len]));
        data = &data[align(len).min(data.len())..];
    }
    Ok(out)
}

/// Netlink messages and attributes start on 4-byte boundaries.
fn align(len: usize) -> usize {
    (len + 3) & !3
}

fn u16_at(data: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(data[at..at + 2].try_into().expect("2 bytes"))
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message as the kernel writes it: header, body, then each attribute padded.
    fn message(kind: u16, flags: u16, seq: u32, body: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut payload = body.to_vec();
        for (t, v) in attrs {
            let len = RTA_HDRLEN + v.len();
            payload.extend_from_slice(&(len as u16).to_ne_bytes());
            payload.extend_from_slice(&t.to_ne_bytes());
            payload.extend_from_slice(v);
            payload.resize(align(payload.len()), 0);
        }
        let len = NLMSG_HDRLEN + payload.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&payload);
        m.resize(align(m.len()), 0);
        m
    }

    fn link(seq: u32, index: u32, flags: u32, name: &str) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        body[8..12].copy_from_slice(&flags.to_ne_bytes());
        // IFLA_IFNAME (3): an attribute the parser must step over.
        message(RTM_NEWLINK, 2, seq, &body, &[(3, name.as_bytes())])
    }

    fn addr(seq: u32, family: u8, index: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![0u8; IFADDRMSG_LEN];
        body[0] = family;
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        message(RTM_NEWADDR, 2, seq, &body, attrs)
    }

    fn done(seq: u32, errno: i32) -> Vec<u8> {
        message(NLMSG_DONE, 2, seq, &errno.to_ne_bytes(), &[])
    }

    fn read<T: Default>(
        datagram: &[u8],
        seq: u32,
        parse: Parser<T>,
    ) -> Result<(T, bool), DatagramError> {
        let mut out = T::default();
        let finished = match read_datagram(datagram, seq, &mut |m| parse(m, &mut out))? {
            Datagram::Done { .. } => true,
            Datagram::More { .. } => false,
        };
        Ok((out, finished))
    }

    /// The interfaces of `ip -j addr`'s old unit test, as rtnetlink sends them: lo
    /// (loopback), eth0 with an IPv4 and a global and a link-local IPv6 address, dummy0 with a
    /// stray 127.0.0.2, a point-to-point address (local and peer) and nothing else.
    #[test]
    fn keeps_what_ip_addr_showed_except_loopback() {
        let mut links = link(1, 1, IFF_LOOPBACK | 1, "lo");
        links.extend(link(1, 2, 0x1003, "eth0"));
        links.extend(link(1, 3, 0x82, "dummy0"));
        links.extend(done(1, 0));
        let (links, finished) = read(&links, 1, parse_links).unwrap();
        assert!(finished);
        assert_eq!(links.len(), 3);

        let v4 = |a: [u8; 4]| a.to_vec();
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap().octets().to_vec();
        let mut dgram = Vec::new();
        dgram.extend(addr(
            2,
            AF_INET,
            1,
            &[
                (IFA_ADDRESS, &v4([127, 0, 0, 1])),
                (IFA_LOCAL, &v4([127, 0, 0, 1])),
            ],
        ));
        dgram.extend(addr(2, AF_INET6, 1, &[(IFA_ADDRESS, &v6("::1"))]));
        dgram.extend(addr(
            2,
            AF_INET,
            2,
            &[
                (IFA_ADDRESS, &v4([192, 168, 50, 3])),
                (IFA_LOCAL, &v4([192, 168, 50, 3])),
            ],
        ));
        dgram.extend(addr(2, AF_INET6, 2, &[(IFA_ADDRESS, &v6("fd00::3"))]));
        dgram.extend(addr(2, AF_INET6, 2, &[(IFA_ADDRESS, &v6("fe80::1"))]));
        dgram.extend(addr(2, AF_INET, 3, &[(IFA_LOCAL, &v4([127, 0, 0, 2]))]));
        // Point to point: IFA_LOCAL is ours, IFA_ADDRESS the peer's.
        dgram.extend(addr(
            2,
            AF_INET,
            3,
            &[
                (IFA_ADDRESS, &v4([10, 9, 0, 2])),
                (IFA_LOCAL, &v4([10, 9, 0, 1])),
            ],
        ));
        // An address of an interface that appeared after the link dump.
        dgram.extend(addr(2, AF_INET, 9, &[(IFA_LOCAL, &v4([10, 8, 0, 1]))]));
        // Another family (AF_PACKET), and an address without any address attribute.
        dgram.extend(addr(2, 17, 2, &[(IFA_ADDRESS, &[1, 2, 3, 4, 5, 6])]));
        dgram.extend(addr(2, AF_INET, 2, &[]));
        let (addrs, finished) = read(&dgram, 2, parse_addrs).unwrap();
        assert!(!finished, "no DONE in this datagram");
        let (_, finished) = read(&done(2, 0), 2, parse_addrs).unwrap();
        assert!(finished);

        let kept: Vec<String> = select(&links, &addrs)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            kept,
            ["10.8.0.1", "10.9.0.1", "192.168.50.3", "fd00::3", "fe80::1"]
        );
    }

    #[test]
    fn duplicates_are_reported_once_sorted() {
        let links = Links::from([(2, 0)]);
        let a = |ip: &str| Addr {
            index: 2,
            ip: ip.parse().unwrap(),
        };
        let kept = select(&links, &[a("fd00::3"), a("10.0.0.1"), a("10.0.0.1")]);
        assert_eq!(
            kept,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::3".parse().unwrap()
            ]
        );
    }

    #[test]
    fn kernel_errors_and_broken_replies_are_errors_not_empty_lists() {
        // An error message with an errno, and a DONE carrying the dump's error.
        let err = message(NLMSG_ERROR, 0, 2, &(-1i32).to_ne_bytes(), &[]);
        assert_eq!(
            read(&err, 2, parse_addrs).err(),
            Some(DatagramError::Kernel(1))
        );
        assert_eq!(
            read(&done(2, -105), 2, parse_addrs).err(),
            Some(DatagramError::Kernel(105))
        );
        // A header claiming more bytes than the datagram holds.
        let mut short = addr(2, AF_INET, 2, &[(IFA_LOCAL, &[10, 0, 0, 1])]);
        short.truncate(short.len() - 4);
        assert!(matches!(
            read(&short, 2, parse_addrs),
            Err(DatagramError::Malformed(_))
        ));
        // An IPv4 address of 3 bytes.
        let odd = addr(2, AF_INET, 2, &[(IFA_LOCAL, &[10, 0, 0])]);
        assert!(matches!(
            read(&odd, 2, parse_addrs),
            Err(DatagramError::Malformed(_))
        ));
        // An attribute longer than its message.
        let mut body = vec![0u8; IFADDRMSG_LEN];
        body[0] = AF_INET;
        body.extend_from_slice(&40u16.to_ne_bytes());
        body.extend_from_slice(&IFA_LOCAL.to_ne_bytes());
        body.extend_from_slice(&[10, 0, 0, 1]);
        let long = message(RTM_NEWADDR, 2, 2, &body, &[]);
        assert!(matches!(
            read(&long, 2, parse_addrs),
            Err(DatagramError::Malformed(_))
        ));
    }

    #[test]
    fn interrupted_dumps_are_flagged_and_other_sequences_skipped() {
        let mut dgram = message(
            RTM_NEWADDR,
            2 | NLM_F_DUMP_INTR,
            2,
            &{
                let mut b = vec![0u8; IFADDRMSG_LEN];
                b[0] = AF_INET;
                b
            },
            &[(IFA_LOCAL, &[10, 0, 0, 1])],
        );
        // A stale reply to another request: neither read nor ending this dump.
        dgram.extend(done(1, -1));
        dgram.extend(done(2, 0));
        let mut out = Vec::new();
        let r = read_datagram(&dgram, 2, &mut |m| parse_addrs(m, &mut out)).unwrap();
        assert!(matches!(r, Datagram::Done { interrupted: true }));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn requests_are_dumps_of_every_family() {
        let r = request(RTM_GETADDR, 7);
        assert_eq!(r.len(), NLMSG_HDRLEN + IFADDRMSG_LEN);
        assert_eq!(u32_at(&r, 0) as usize, r.len());
        assert_eq!(u16_at(&r, 4), RTM_GETADDR);
        assert_eq!(u16_at(&r, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(u32_at(&r, 8), 7);
        assert!(
            r[NLMSG_HDRLEN..].iter().all(|b| *b == 0),
            "family AF_UNSPEC"
        );
        assert_eq!(request(RTM_GETLINK, 1).len(), NLMSG_HDRLEN + IFINFOMSG_LEN);
    }
}
