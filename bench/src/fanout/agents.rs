//! Simulated agents: real tonic streams, one HTTP/2 connection each, that ACK every Change at
//! once and record what they received; and a watchdog on the controller's memory.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kubenft_proto::v1::{
    self, AgentMessage, Hello, ResourceVersion, agent_message, controller_message,
    rule_stream_client::RuleStreamClient,
};
use prost::Message;
use std::sync::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use super::pki::BenchPki;
use crate::workload::node_name;

/// Agents connected (and synchronised) per step before the controller's memory is checked.
const BATCH: u32 = 25;
/// The initial synchronisation of all agents may take this long.
const SYNC_BUDGET: Duration = Duration::from_secs(600);

/// How the simulated agents reach the controller.
#[derive(Clone)]
pub enum Transport {
    /// `http://`, against a controller started with `--insecure`.
    Plain,
    /// `https://` with agent `id`'s client certificate (CN `system:node:node-<id>`), the
    /// controller's certificate checked against the CA and the URL's host, 127.0.0.1.
    Tls(Arc<BenchPki>),
}

impl Transport {
    pub fn label(&self) -> &'static str {
        match self {
            Transport::Plain => "plaintext",
            Transport::Tls(_) => "TLS",
        }
    }

    /// Agent `id`'s endpoint, ready to connect: the TLS settings are read from its files and
    /// built into a connector here, as the real agent does before each connection.
    pub fn endpoint(&self, addr: SocketAddr, id: u32) -> anyhow::Result<Endpoint> {
        let endpoint = match self {
            Transport::Plain => Endpoint::from_shared(format!("http://{addr}"))?,
            Transport::Tls(pki) => Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(pki.client(id).load()?)?,
        };
        Ok(endpoint.connect_timeout(Duration::from_secs(30)))
    }
}

/// What one change looked like from the agents.
#[derive(Debug, Clone)]
pub struct Probe {
    /// From the manifest write to the last ACK of an agent whose Change named the Service.
    pub last_ack: Duration,
    /// Agents that received a non-empty Change while the probe was armed.
    pub receivers: usize,
    /// Encoded size of each Change received.
    pub bytes: Vec<usize>,
    pub timed_out: bool,
}

struct Record {
    agent: u32,
    at: Instant,
    bytes: usize,
    has_target: bool,
}

#[derive(Default)]
struct Armed {
    target: String,
    records: Vec<Record>,
}

/// Totals of everything received (suite 4).
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub changes: u64,
    pub resources: u64,
    pub bytes: u64,
    pub inventories: u64,
}

/// The simulated agents' shared record.
pub struct Fleet {
    synced: AtomicU32,
    open: AtomicU32,
    changes: AtomicU64,
    resources: AtomicU64,
    bytes: AtomicU64,
    /// InventoryRequests received (an agent not judged current by its version).
    inventories: AtomicU64,
    armed: Mutex<Option<Armed>>,
    /// What each agent held when its stream closed (suite 4).
    held: Mutex<Vec<(u32, Held)>>,
    /// When the last agent's connection (TCP, and TLS if any) came up.
    last_connected: Mutex<Option<Instant>>,
    stop: watch::Sender<bool>,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            synced: AtomicU32::new(0),
            open: AtomicU32::new(0),
            changes: AtomicU64::new(0),
            resources: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            inventories: AtomicU64::new(0),
            armed: Mutex::new(None),
            held: Mutex::new(Vec::new()),
            last_connected: Mutex::new(None),
            stop: watch::channel(false).0,
        }
    }
}

impl Fleet {
    /// Agents that have received their first Change.
    pub fn synced(&self) -> u32 {
        self.synced.load(Ordering::Relaxed)
    }

    /// When the last agent's connection came up (TCP, and its TLS handshake if any).
    pub fn last_connected(&self) -> Option<Instant> {
        *self.last_connected.lock().expect("lock")
    }

    fn connected_now(&self) {
        let now = Instant::now();
        let mut last = self.last_connected.lock().expect("lock");
        *last = Some(last.map_or(now, |l| l.max(now)));
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub fn totals(&self) -> Totals {
        Totals {
            changes: self.changes.load(Ordering::Relaxed),
            resources: self.resources.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            inventories: self.inventories.load(Ordering::Relaxed),
        }
    }

    /// Starts recording Changes for a change to `target`.
    pub fn arm(&self, target: &str) {
        *self.armed.lock().expect("lock") = Some(Armed {
            target: target.to_owned(),
            records: Vec::new(),
        });
    }

    fn received(&self, agent: u32, change: &v1::Change, bytes: usize) {
        self.changes.fetch_add(1, Ordering::Relaxed);
        let n = change.resources.len() + change.removed.len();
        self.resources.fetch_add(n as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if n == 0 {
            return;
        }
        if let Some(armed) = self.armed.lock().expect("lock").as_mut() {
            let has_target = change.resources.iter().any(|r| r.name == armed.target);
            armed.records.push(Record {
                agent,
                at: Instant::now(),
                bytes,
                has_target,
            });
        }
    }

    /// Waits until `expected` agents have ACKed a Change naming the target and nothing more
    /// arrived for 500 ms (so extra receivers are counted too), or `timeout`.
    pub async fn settle(&self, t0: Instant, expected: usize, timeout: Duration) -> Probe {
        let quiet = Duration::from_millis(500);
        let mut timed_out = true;
        while t0.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let guard = self.armed.lock().expect("lock");
            let Some(armed) = guard.as_ref() else { break };
            let hits = armed.records.iter().filter(|r| r.has_target).count();
            let last = armed.records.iter().map(|r| r.at).max();
            if hits >= expected && last.is_some_and(|l| l.elapsed() >= quiet) {
                timed_out = false;
                break;
            }
        }
        let armed = self.armed.lock().expect("lock").take().unwrap_or_default();
        let last_ack = armed
            .records
            .iter()
            .filter(|r| r.has_target)
            .map(|r| r.at.duration_since(t0))
            .max()
            .unwrap_or(timeout);
        let receivers: BTreeSet<u32> = armed.records.iter().map(|r| r.agent).collect();
        Probe {
            last_ack,
            receivers: receivers.len(),
            bytes: armed.records.iter().map(|r| r.bytes).collect(),
            timed_out,
        }
    }

    /// Waits for every stream to close; returns what each agent held.
    pub async fn wait_closed(&self, wait: Duration) -> Vec<(u32, Held)> {
        let started = Instant::now();
        while self.open.load(Ordering::Relaxed) > 0 && started.elapsed() < wait {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::mem::take(&mut *self.held.lock().expect("lock"))
    }
}

/// Watches a process's RSS every 100 ms; records the peak and trips above a limit.
pub struct Watchdog {
    peak: Arc<AtomicU64>,
    tripped: Arc<AtomicBool>,
    limit: u64,
}

impl Watchdog {
    pub fn start(pid: u32, limit: u64) -> Watchdog {
        let peak = Arc::new(AtomicU64::new(0));
        let tripped = Arc::new(AtomicBool::new(false));
        let (p, t) = (peak.clone(), tripped.clone());
        tokio::spawn(async move {
            // Bounded: ends when the process is gone.
            while let Some((rss, _)) = crate::report::process_memory(pid) {
                p.fetch_max(rss, Ordering::Relaxed);
                if rss > limit && !t.swap(true, Ordering::Relaxed) {
                    // Stop it before it takes the machine down.
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Watchdog {
            peak,
            tripped,
            limit,
        }
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Whether the controller's RSS is past 70% of the limit (or it was killed): headroom
    /// for a change, which may hold old and new rule sets at once.
    fn near_limit(&self) -> bool {
        self.tripped.load(Ordering::Relaxed) || self.peak() > self.limit / 10 * 7
    }

    pub fn tripped(&self) -> Option<String> {
        self.tripped.load(Ordering::Relaxed).then(|| {
            format!(
                "controller killed: RSS passed {}",
                crate::report::mib(self.limit)
            )
        })
    }
}

/// Connects `k` agents in batches, each batch fully synchronised before the next; stops early
/// (Ok, with fewer agents) when the controller's memory nears the watchdog's limit.
pub async fn connect_all(
    fleet: &Arc<Fleet>,
    transport: &Transport,
    addr: SocketAddr,
    k: u32,
    keep: bool,
    watchdog: &Watchdog,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut next = 0;
    while next < k {
        if watchdog.near_limit() {
            anyhow::bail!(
                "controller RSS {} after {} agents (per agent ≈ {}); not connecting more",
                crate::report::mib(watchdog.peak()),
                fleet.synced(),
                crate::report::mib(watchdog.peak() / u64::from(fleet.synced().max(1)))
            );
        }
        if started.elapsed() > SYNC_BUDGET {
            anyhow::bail!("initial sync budget ({} s) used", SYNC_BUDGET.as_secs());
        }
        let end = (next + BATCH).min(k);
        let mut firsts = Vec::new();
        for id in next..end {
            let endpoint = transport.endpoint(addr, id)?;
            firsts.push(spawn_agent(
                fleet.clone(),
                endpoint,
                id,
                Held::default(),
                keep,
            ));
        }
        await_firsts(firsts, SYNC_BUDGET).await?;
        next = end;
    }
    Ok(())
}

/// Reconnects every agent at once with what it held, on endpoints prepared beforehand; Ok
/// once all are confirmed.
pub async fn reconnect_all(
    fleet: &Arc<Fleet>,
    held: Vec<(u32, Held, Endpoint)>,
    watchdog: &Watchdog,
) -> anyhow::Result<()> {
    let firsts: Vec<_> = held
        .into_iter()
        .map(|(id, held, endpoint)| spawn_agent(fleet.clone(), endpoint, id, held, false))
        .collect();
    let result = await_firsts(firsts, Duration::from_secs(120)).await;
    if let Some(why) = watchdog.tripped() {
        anyhow::bail!(why);
    }
    result
}

async fn await_firsts(
    firsts: Vec<oneshot::Receiver<Result<(), String>>>,
    wait: Duration,
) -> anyhow::Result<()> {
    let all = futures::future::join_all(firsts);
    let results = tokio::time::timeout(wait, all)
        .await
        .map_err(|_| anyhow::anyhow!("agents not synchronised within {wait:?}"))?;
    for r in results {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("agent: {e}"),
            Err(_) => anyhow::bail!("agent task ended before its first change"),
        }
    }
    Ok(())
}

/// Starts one agent; the receiver fires at its first Change (or its failure).
fn spawn_agent(
    fleet: Arc<Fleet>,
    endpoint: Endpoint,
    id: u32,
    held: Held,
    keep: bool,
) -> oneshot::Receiver<Result<(), String>> {
    let (first_tx, first_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut first = Some(first_tx);
        if let Err(e) = agent(&fleet, endpoint, id, held, keep, &mut first).await
            && let Some(f) = first.take()
        {
            let _ = f.send(Err(e.to_string()));
        }
    });
    first_rx
}

async fn agent(
    fleet: &Fleet,
    endpoint: Endpoint,
    id: u32,
    held: Held,
    keep: bool,
    first: &mut Option<oneshot::Sender<Result<(), String>>>,
) -> anyhow::Result<()> {
    let channel = endpoint.connect().await?;
    fleet.connected_now();
    let (tx, rx) = mpsc::channel(4);
    let Held {
        applied,
        mut system_version,
    } = held;
    // Only an agent that keeps its state tracks it: building a map of 10k names per agent
    // would have 1,000 simulated agents compete with the controller for the same cores.
    let mut known: BTreeMap<String, String> = if keep {
        applied
            .iter()
            .map(|rv| (rv.name.clone(), rv.version.clone()))
            .collect()
    } else {
        BTreeMap::new()
    };
    // As the real agent does: the version only, the list if the controller asks for it.
    let hello = Hello {
        node_name: node_name(id),
        addresses: Vec::new(),
        applied: Vec::new(),
        agent_version: "kubenft-bench".into(),
        system_version: system_version.clone(),
        applied_on_request: !system_version.is_empty(),
        protocol_version: kubenft_proto::release::PROTOCOL_VERSION,
    };
    tx.send(message(agent_message::Message::Hello(hello)))
        .await?;
    let mut inbound = RuleStreamClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    fleet.open.fetch_add(1, Ordering::Relaxed);
    let mut stop = fleet.stop.subscribe();
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => break,
            msg = inbound.message() => msg,
        };
        let change = match msg {
            Ok(Some(v1::ControllerMessage {
                message: Some(controller_message::Message::Change(change)),
            })) => change,
            Ok(Some(v1::ControllerMessage {
                message: Some(controller_message::Message::InventoryRequest(_)),
            })) => {
                fleet.inventories.fetch_add(1, Ordering::Relaxed);
                let inventory = v1::Inventory {
                    applied: applied.clone(),
                    system_version: system_version.clone(),
                };
                if tx
                    .send(message(agent_message::Message::Inventory(inventory)))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            _ => break,
        };
        // A change sent in parts is answered once, after its last part.
        if !change.continued {
            let ack = v1::Ack {
                change_id: change.change_id,
            };
            if tx
                .send(message(agent_message::Message::Ack(ack)))
                .await
                .is_err()
            {
                break;
            }
        }
        fleet.received(id, &change, change.encoded_len());
        if keep {
            for r in &change.resources {
                known.insert(r.name.clone(), r.version.clone());
            }
            for name in &change.removed {
                known.remove(name);
            }
            system_version.clone_from(&change.system_version);
        }
        if change.continued {
            continue;
        }
        if let Some(f) = first.take() {
            fleet.synced.fetch_add(1, Ordering::Relaxed);
            let _ = f.send(Ok(()));
        }
    }
    if keep {
        let held = Held {
            applied: known
                .into_iter()
                .map(|(name, version)| ResourceVersion { name, version })
                .collect(),
            system_version,
        };
        fleet.held.lock().expect("lock").push((id, held));
    }
    // Only now: `wait_closed` counts on every closed agent's state being recorded.
    fleet.open.fetch_sub(1, Ordering::Relaxed);
    Ok(())
}

/// What a simulated agent holds: as its Hello states it.
#[derive(Debug, Default)]
pub struct Held {
    pub applied: Vec<ResourceVersion>,
    pub system_version: String,
}

fn message(m: agent_message::Message) -> AgentMessage {
    AgentMessage { message: Some(m) }
}
