//! Stale UDP conntrack entries.
//!
//! UDP has no connection end: a client that keeps sending from one source port refreshes the
//! same conntrack entry forever, so after its endpoint goes away its datagrams keep following
//! the old DNAT into a blackhole. After each applied change, for every UDP Service port the
//! change touched, the agent lists the kernel's entries for the port's addresses and deletes
//! those whose reply comes from an address that no longer serves it — scaled to zero and
//! deleted Services included (kubernetes #139628, #141371). Entries of untouched Services are
//! never looked at, so restarts and unrelated changes leave healthy flows alone (#122740).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use kubenft_proto::v1::{self, resource};
use tokio::process::Command;

use kubenft_nft::rules::Family;

/// One destination whose UDP entries are checked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A ClusterIP, external IP or load-balancer IP with the Service port.
    Address(IpAddr, u16),
    /// A NodePort (any local destination address).
    NodePort(u16),
}

/// What to clean after one change: each target with the addresses still serving it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    pub targets: Vec<(Target, BTreeSet<IpAddr>)>,
}

impl Cleanup {
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

fn udp_port(res: &v1::Resource) -> Option<&v1::ServicePortRules> {
    match &res.kind {
        Some(resource::Kind::ServicePort(sp)) if sp.protocol == v1::Protocol::Udp as i32 => {
            Some(sp)
        }
        _ => None,
    }
}

fn targets(sp: &v1::ServicePortRules) -> Vec<Target> {
    let port = u16::try_from(sp.port).unwrap_or(0);
    let mut out: Vec<Target> = std::iter::once(&sp.cluster_ip)
        .chain(&sp.external_ips)
        .chain(&sp.load_balancer_ips)
        .filter_map(|ip| ip.parse().ok())
        .map(|ip| Target::Address(ip, port))
        .collect();
    if let Some(np) = u16::try_from(sp.node_port).ok().filter(|p| *p != 0) {
        out.push(Target::NodePort(np));
    }
    out
}

/// The cleanup a change calls for: every UDP port that changed or went away, checked against
/// the addresses that serve it now (none for a removed one). Targets the new version still
/// has keep its serving addresses; targets only the old version had keep none.
pub fn cleanup_for<'a>(
    old: impl IntoIterator<Item = &'a v1::Resource>,
    new: impl IntoIterator<Item = &'a v1::Resource>,
) -> Cleanup {
    let mut serving: std::collections::BTreeMap<Target, BTreeSet<IpAddr>> = Default::default();
    for sp in old.into_iter().filter_map(udp_port) {
        for t in targets(sp) {
            serving.entry(t).or_default();
        }
    }
    for sp in new.into_iter().filter_map(udp_port) {
        let ips: BTreeSet<IpAddr> = sp
            .serving_ips
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        for t in targets(sp) {
            serving.entry(t).or_default().extend(ips.iter().copied());
        }
    }
    Cleanup {
        targets: serving.into_iter().collect(),
    }
}

/// One UDP entry as `conntrack -L` prints it.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    orig_dst: IpAddr,
    orig_dport: u16,
    reply_src: IpAddr,
}

/// Parses `conntrack -L` lines: the first `src=`/`dst=`/`dport=` are the original direction,
/// the second `src=` the reply's source.
fn parse_line(line: &str) -> Option<Entry> {
    let mut dst = None;
    let mut dport = None;
    let mut srcs = Vec::new();
    for field in line.split_whitespace() {
        if let Some(v) = field.strip_prefix("src=") {
            srcs.push(v);
        } else if let Some(v) = field.strip_prefix("dst=") {
            dst.get_or_insert(v);
        } else if let Some(v) = field.strip_prefix("dport=") {
            dport.get_or_insert(v);
        }
    }
    Some(Entry {
        orig_dst: dst?.parse().ok()?,
        orig_dport: dport?.parse().ok()?,
        reply_src: srcs.get(1)?.parse().ok()?,
    })
}

/// Whether an entry of a checked target is stale: its reply does not come from an address
/// serving the target.
///
/// That includes entries that were never DNATed (the reply is expected from the destination
/// itself), as kube-proxy has it: packets that slipped past the proxy — sent before the agent
/// first programmed the Service, or while its rules were missing — keep such an entry alive
/// as long as the client keeps sending, a permanent blackhole no rule change can reach
/// (kubernetes #105657, #126934).
fn is_stale(serving: &BTreeSet<IpAddr>, e: &Entry) -> bool {
    !serving.contains(&e.reply_src)
}

const TIMEOUT: Duration = Duration::from_secs(10);

async fn conntrack(args: &[String]) -> std::io::Result<(bool, String)> {
    let run = Command::new("conntrack")
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(TIMEOUT, run)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "conntrack timed out"))??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn family_flag(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// Lists the entries of one target in `family` (`ipv4`, `ipv6`) and deletes the stale ones.
/// Returns how many were deleted.
async fn clean_target(
    target: &Target,
    family: &str,
    serving: &BTreeSet<IpAddr>,
) -> std::io::Result<u64> {
    let mut deleted = 0;
    let mut list: Vec<String> = ["-L", "-f", family, "-p", "udp"].map(String::from).to_vec();
    match target {
        Target::Address(ip, port) => {
            list.extend([
                "--orig-dst".into(),
                ip.to_string(),
                "--orig-port-dst".into(),
                port.to_string(),
            ]);
        }
        Target::NodePort(port) => list.extend(["--orig-port-dst".into(), port.to_string()]),
    }
    let (_, out) = conntrack(&list).await?;
    let stale: BTreeSet<(IpAddr, u16, IpAddr)> = out
        .lines()
        .filter_map(parse_line)
        .filter(|e| is_stale(serving, e))
        .map(|e| (e.orig_dst, e.orig_dport, e.reply_src))
        .collect();
    for (dst, dport, reply_src) in stale {
        let args: Vec<String> = [
            "-D",
            "-f",
            family,
            "-p",
            "udp",
            "--orig-dst",
            &dst.to_string(),
            "--orig-port-dst",
            &dport.to_string(),
            "--reply-src",
            &reply_src.to_string(),
        ]
        .map(String::from)
        .to_vec();
        if conntrack(&args).await?.0 {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Whether `target` has entries in `family`'s conntrack table (a NodePort has them in both).
fn in_family(target: &Target, family: Family) -> bool {
    match target {
        Target::Address(ip, _) => Family::of(*ip) == family,
        Target::NodePort(_) => true,
    }
}

/// One family's reconcile: how long it took and how many stale entries it deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconciled {
    pub family: Family,
    pub duration: Duration,
    pub deleted: u64,
}

/// Runs a cleanup, one family after the other (as kube-proxy reconciles each family's table);
/// failures are logged (a missing `conntrack` binary included), never fatal. Returns each
/// family that had targets.
pub async fn run(cleanup: Cleanup) -> Vec<Reconciled> {
    let mut out = Vec::new();
    for family in Family::ALL {
        let targets: Vec<_> = cleanup
            .targets
            .iter()
            .filter(|(t, _)| in_family(t, family))
            .collect();
        if targets.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        let mut deleted = 0;
        for (target, serving) in targets {
            match clean_target(target, family_flag(family), serving).await {
                Ok(n) => deleted += n,
                Err(e) => {
                    tracing::warn!(?target, error = %e, "UDP conntrack cleanup failed");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(
                deleted,
                family = family.nft(),
                "deleted stale UDP conntrack entries"
            );
        }
        out.push(Reconciled {
            family,
            duration: started.elapsed(),
            deleted,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(
        name: &str,
        proto: v1::Protocol,
        cluster_ip: &str,
        node_port: u32,
        serving: &[&str],
    ) -> v1::Resource {
        v1::Resource {
            name: name.into(),
            version: "1".into(),
            kind: Some(resource::Kind::ServicePort(v1::ServicePortRules {
                protocol: proto as i32,
                port: 53,
                cluster_ip: cluster_ip.into(),
                node_port,
                serving_ips: serving.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn parses_conntrack_lines() {
        let line = "udp      17 29 src=10.244.1.12 dst=10.96.0.10 sport=12345 dport=53 src=10.244.2.11 dst=10.244.1.12 sport=5353 dport=12345 mark=0 use=1";
        assert_eq!(
            parse_line(line),
            Some(Entry {
                orig_dst: "10.96.0.10".parse().unwrap(),
                orig_dport: 53,
                reply_src: "10.244.2.11".parse().unwrap(),
            })
        );
        assert_eq!(
            parse_line("conntrack v1.4.7 (conntrack-tools): 1 flow entries have been shown."),
            None
        );
    }

    #[test]
    fn entries_not_dnated_to_a_serving_address_are_stale() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let entry = |dst: &str, reply: &str| Entry {
            orig_dst: ip(dst),
            orig_dport: 53,
            reply_src: ip(reply),
        };
        let serving = BTreeSet::from([ip("10.1.0.2")]);
        assert!(!is_stale(&serving, &entry("10.96.0.10", "10.1.0.2")));
        assert!(is_stale(&serving, &entry("10.96.0.10", "10.1.0.1")));
        // Never DNATed: the reply would come from the Service address itself.
        assert!(is_stale(&serving, &entry("10.96.0.10", "10.96.0.10")));
        assert!(is_stale(&BTreeSet::new(), &entry("10.96.0.10", "10.1.0.2")));
    }

    #[test]
    fn plans_changed_scaled_to_zero_and_removed_udp_ports() {
        use v1::Protocol::{Tcp, Udp};
        let old = [
            res("dns", Udp, "10.96.0.10", 30053, &["10.1.0.1", "10.1.0.2"]),
            res("gone", Udp, "10.96.0.20", 0, &["10.1.0.3"]),
            res("web", Tcp, "10.96.0.30", 0, &["10.1.0.4"]),
        ];
        let new = [res("dns", Udp, "10.96.0.10", 30053, &["10.1.0.2"])];
        let cleanup = cleanup_for(&old, &new);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            cleanup.targets,
            vec![
                (
                    Target::Address(ip("10.96.0.10"), 53),
                    BTreeSet::from([ip("10.1.0.2")])
                ),
                (Target::Address(ip("10.96.0.20"), 53), BTreeSet::new()),
                (Target::NodePort(30053), BTreeSet::from([ip("10.1.0.2")])),
            ]
        );
        // A TCP-only change cleans nothing.
        assert!(super::cleanup_for(&old[2..], &[]).is_empty());
    }
}
