//! Watching the kernel's nftables notifications through `nft monitor`.
//!
//! nft prints every change with the process that committed it:
//!
//! ```text
//! delete element ip kubenft service-ips { 10.96.0.10 . tcp . 80 : goto svc-cluster }
//! # new generation 3 by process 13305 (nft)
//! ```
//!
//! Lines about our tables are collected until their generation line; a generation committed by
//! one of our own nft processes is dropped, any other becomes a [`Notice::Changed`] with what
//! it touched. The kernel drops notifications when the monitor's socket overflows (a full
//! apply of tens of thousands of elements does it, silently): a gap in the generation numbers
//! that our own commits do not explain, or the monitor itself ending, is a [`Notice::Lost`],
//! after which the caller must verify everything.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use kubenft_nft::event::{Event, Object, Verb};

use super::TableName;
use super::exec::OwnProcesses;
use kubenft_nft::rules::Family;

/// Lines kept for one generation before only "too much changed" is remembered.
const MAX_PENDING_LINES: usize = 10_000;
/// Wait before starting a monitor again after it ended.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// What the monitor tells its owner.
#[derive(Debug)]
pub enum Notice {
    /// Another program committed these changes to our tables. `overflow_sets`: sets whose
    /// element changes were too many to keep one by one (a map flushed at 30,000 Services);
    /// `overflow`: other changes were too many, so the events are not the whole story.
    Changed {
        events: Vec<Event>,
        overflow_sets: Vec<(Family, String)>,
        overflow: bool,
    },
    /// Notifications were lost (or the monitor restarted): anything may have changed.
    Lost,
}

/// One monitor line, classified.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Ours(Event),
    Generation { number: u64, pid: Option<u32> },
    Other,
}

fn family(token: &str) -> Option<Family> {
    match token {
        "ip" => Some(Family::V4),
        "ip6" => Some(Family::V6),
        _ => None,
    }
}

/// `# new generation 3 by process 13305 (nft)`
fn generation(line: &str) -> Option<(u64, Option<u32>)> {
    let rest = line.strip_prefix("# new generation ")?;
    let mut words = rest.split_whitespace();
    let number = words.next()?.parse().ok()?;
    let pid = match (words.next(), words.next()) {
        (Some("by"), Some("process")) => words.next().and_then(|p| p.parse().ok()),
        _ => None,
    };
    Some((number, pid))
}

/// The text between the first `{` and the last `}`.
fn braced(rest: &str) -> Option<&str> {
    let open = rest.find('{')?;
    let close = rest.rfind('}')?;
    (open < close).then(|| rest[open + 1..close].trim())
}

fn classify(line: &str, table: &TableName) -> Vec<Line> {
    if let Some((number, pid)) = generation(line) {
        return vec![Line::Generation { number, pid }];
    }
    let mut words = line.splitn(5, ' ');
    let (Some(verb), Some(kind), Some(fam), Some(name)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return vec![Line::Other];
    };
    let verb = match verb {
        "add" | "insert" | "replace" => Verb::Add,
        "delete" => Verb::Delete,
        _ => return vec![Line::Other],
    };
    let Some(family) = family(fam) else {
        return vec![Line::Other];
    };
    let rest = words.next().unwrap_or("");
    // `delete table ip kubenft` has no object name after the table.
    let (table_name, object_name) = match kind {
        "table" => (name, ""),
        _ => (name, rest.split(' ').next().unwrap_or("")),
    };
    if table_name != table.as_str() {
        return vec![Line::Other];
    }
    let event = |object| {
        Line::Ours(Event {
            family,
            verb,
            object,
        })
    };
    match kind {
        "table" => vec![event(Object::Table)],
        "chain" => vec![event(Object::Chain(object_name.to_owned()))],
        "set" | "map" => vec![event(Object::Set {
            name: object_name.to_owned(),
            map: kind == "map",
        })],
        "rule" => vec![event(Object::Rule {
            chain: object_name.to_owned(),
        })],
        "element" => match braced(rest) {
            Some(inner) => inner
                .split(", ")
                .map(|text| {
                    event(Object::Element {
                        set: object_name.to_owned(),
                        text: text.trim().to_owned(),
                    })
                })
                .collect(),
            None => vec![event(Object::Set {
                name: object_name.to_owned(),
                map: false,
            })],
        },
        _ => vec![event(Object::Other)],
    }
}

/// Follows notifications for one generation at a time.
struct Batcher {
    table: TableName,
    own: OwnProcesses,
    pending: Vec<Event>,
    overflow_sets: std::collections::BTreeSet<(Family, String)>,
    overflow: bool,
    last_generation: Option<u64>,
    /// Our commits whose generation line was seen, or that explained a gap.
    own_accounted: u64,
}

impl Batcher {
    fn new(table: TableName, own: OwnProcesses) -> Batcher {
        let own_accounted = own.commits();
        Batcher {
            table,
            own,
            pending: Vec::new(),
            overflow_sets: std::collections::BTreeSet::new(),
            overflow: false,
            last_generation: None,
            own_accounted,
        }
    }

    /// Takes one line; returns what to tell the owner, if anything.
    fn line(&mut self, line: &str) -> Vec<Notice> {
        let mut out = Vec::new();
        for classified in classify(line, &self.table) {
            match classified {
                Line::Ours(event) if self.pending.len() < MAX_PENDING_LINES => {
                    self.pending.push(event)
                }
                // Past the limit an element is remembered by its set only.
                Line::Ours(Event {
                    family,
                    object: Object::Element { set, .. },
                    ..
                }) => {
                    self.overflow_sets.insert((family, set));
                }
                Line::Ours(_) => self.overflow = true,
                Line::Generation { number, pid } => out.extend(self.generation(number, pid)),
                Line::Other => {}
            }
        }
        out
    }

    fn generation(&mut self, number: u64, pid: Option<u32>) -> Vec<Notice> {
        let mut out = Vec::new();
        let own = pid.is_some_and(|p| self.own.contains(p));
        if own {
            self.own_accounted += 1;
        }
        if let Some(last) = self.last_generation {
            let missed = number.saturating_sub(last).saturating_sub(1);
            // Our own commits whose lines were dropped explain a gap; anything more was
            // another program's.
            let unexplained_own = self.own.commits().saturating_sub(self.own_accounted);
            if missed > unexplained_own {
                tracing::debug!(
                    generation = number,
                    last,
                    missed,
                    unexplained_own,
                    "notifications were lost"
                );
                out.push(Notice::Lost);
            }
            self.own_accounted += missed.min(unexplained_own);
        }
        self.last_generation = Some(number);
        let events = std::mem::take(&mut self.pending);
        let overflow_sets: Vec<(Family, String)> = std::mem::take(&mut self.overflow_sets)
            .into_iter()
            .collect();
        let overflow = std::mem::take(&mut self.overflow);
        if !own && (!events.is_empty() || !overflow_sets.is_empty() || overflow) {
            out.push(Notice::Changed {
                events,
                overflow_sets,
                overflow,
            });
        }
        out
    }
}

/// Runs `nft monitor` until cancelled, restarting it when it ends (each start is a
/// [`Notice::Lost`]: what happened meanwhile is unknown).
pub async fn run(
    argv: Vec<String>,
    table: TableName,
    own: OwnProcesses,
    notices: mpsc::UnboundedSender<Notice>,
    cancel: CancellationToken,
) {
    let mut first = true;
    loop {
        let ended = tokio::select! {
            _ = cancel.cancelled() => return,
            ended = watch_once(&argv, &table, &own, &notices, first) => ended,
        };
        first = false;
        tracing::warn!(error = %ended, "nft monitor ended; starting it again");
        if notices.send(Notice::Lost).is_err() {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(RESTART_DELAY) => {}
        }
    }
}

/// Has the kernel kill `nft monitor` when the agent dies, however it dies. `kill_on_drop`
/// covers a clean exit only, and unlike `nft -i` (whose stdin closes) the monitor reads
/// nothing from the agent: after a SIGKILL or the OOM killer it would live on, holding a
/// netlink socket and its copy of the ruleset (about 200 MB at 30,000 Services), one more
/// after every crash. The signal is tied to the thread that spawns the child; the monitor is
/// spawned from async code, on a runtime worker, which lives as long as the agent.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    let agent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only calls `prctl` and
    // `getppid`, both async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent died between the fork and the prctl: the signal was never armed.
            if u32::try_from(libc::getppid()).ok() != Some(agent) {
                return Err(std::io::Error::other("the agent is gone"));
            }
            Ok(())
        });
    }
}

/// One `nft monitor` process, until it ends. Returns why it ended.
async fn watch_once(
    argv: &[String],
    table: &TableName,
    own: &OwnProcesses,
    notices: &mpsc::UnboundedSender<Notice>,
    first: bool,
) -> String {
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    die_with_parent(&mut command);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return format!("cannot run {}: {e}", argv.join(" ")),
    };
    let Some(stdout) = child.stdout.take() else {
        return "no stdout".into();
    };
    if first {
        tracing::info!("watching the tables with nft monitor");
    } else {
        // What happened while no monitor ran is unknown.
        let _ = notices.send(Notice::Lost);
    }
    let mut batcher = Batcher::new(table.clone(), own.clone());
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                for notice in batcher.line(&line) {
                    if notices.send(notice).is_err() {
                        return "owner gone".into();
                    }
                }
            }
            Ok(None) => return format!("exited ({:?})", child.try_wait()),
            Err(e) => return format!("read: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> TableName {
        TableName::default()
    }

    #[test]
    fn classifies_what_nft_monitor_prints() {
        let ours = |line: &str| match classify(line, &t()).pop() {
            Some(Line::Ours(e)) => e,
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!(
            ours(
                "delete element ip kubenft service-ips { 10.96.0.10 . tcp . 80 : goto svc-cluster }"
            )
            .object,
            Object::Element {
                set: "service-ips".into(),
                text: "10.96.0.10 . tcp . 80 : goto svc-cluster".into()
            }
        );
        let e = ours("insert rule ip6 kubenft services counter packets 0 bytes 0 accept");
        assert_eq!(e.family, Family::V6);
        assert_eq!(e.verb, Verb::Add);
        assert_eq!(
            e.object,
            Object::Rule {
                chain: "services".into()
            }
        );
        assert_eq!(ours("delete table ip kubenft").object, Object::Table);
        assert_eq!(
            ours("delete chain ip kubenft filter-input").object,
            Object::Chain("filter-input".into())
        );
        assert_eq!(
            ours("add map ip kubenft evil { type ipv4_addr : verdict; }").object,
            Object::Set {
                name: "evil".into(),
                map: true
            }
        );
        for other in [
            "delete table ip other",
            "add element inet kubenft x { 1 }",
            "add rule ip kubenft-sync-3 c drop",
            "",
            "garbage",
        ] {
            assert!(
                classify(other, &t()).iter().all(|l| *l == Line::Other),
                "{other}"
            );
        }
        assert_eq!(
            classify("# new generation 3 by process 13305 (nft)", &t()),
            vec![Line::Generation {
                number: 3,
                pid: Some(13305)
            }]
        );
    }

    #[test]
    fn own_commits_are_dropped_and_others_reported() {
        let own = OwnProcesses::default();
        own.started(Some(100));
        let mut b = Batcher::new(t(), own.clone());
        own.committed();
        assert!(
            b.line("delete element ip kubenft cluster-ips { 10.96.0.1 }")
                .is_empty()
        );
        assert!(b.line("# new generation 5 by process 100 (nft)").is_empty());
        b.line("delete element ip kubenft cluster-ips { 10.96.0.1 }");
        let notices = b.line("# new generation 6 by process 200 (nft)");
        assert!(
            matches!(&notices[..], [Notice::Changed { events, overflow: false, .. }] if events.len() == 1)
        );
        // Another table's change is nobody's business.
        b.line("delete element ip other s { 1.1.1.1 }");
        assert!(b.line("# new generation 7 by process 200 (nft)").is_empty());
    }

    #[test]
    fn a_flood_of_elements_is_remembered_by_set() {
        let mut b = Batcher::new(t(), OwnProcesses::default());
        for i in 0..MAX_PENDING_LINES + 5 {
            let line = format!(
                "delete element ip kubenft ip-c-0-eps {{ 10.96.{}.{} . tcp . 80 : 10.1.0.1 . 80 }}",
                i / 250,
                i % 250
            );
            b.line(&line);
        }
        let notices = b.line("# new generation 9 by process 300 (nft)");
        let [
            Notice::Changed {
                events,
                overflow_sets,
                overflow,
            },
        ] = &notices[..]
        else {
            panic!("{notices:?}")
        };
        assert_eq!(events.len(), MAX_PENDING_LINES);
        assert_eq!(overflow_sets, &[(Family::V4, "ip-c-0-eps".to_owned())]);
        assert!(!overflow);
    }

    #[test]
    fn a_gap_our_commits_do_not_explain_is_lost() {
        let own = OwnProcesses::default();
        own.started(Some(100));
        let mut b = Batcher::new(t(), own.clone());
        own.committed();
        b.line("# new generation 1 by process 100 (nft)");
        // Two of our commits whose lines were dropped (a big apply overflowed the socket),
        // then one seen.
        for _ in 0..3 {
            own.committed();
        }
        assert!(b.line("# new generation 4 by process 100 (nft)").is_empty());
        // A gap of one with no commit of ours to explain it.
        let notices = b.line("# new generation 6 by process 300 (nft)");
        assert!(matches!(notices[..], [Notice::Lost]), "{notices:?}");
    }
}
