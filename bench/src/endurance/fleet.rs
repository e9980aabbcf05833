//! The gRPC side of suite 9, inside the lab's control-plane namespace: the simulated agents
//! (real tonic streams with mutual TLS, each its own node certificate, ACKing every Change at
//! once) and the inspection client (ListNodes, GetNodeRules, ListChanges).
//!
//! The controller listens on the lab's fabric, which this process's namespace cannot reach;
//! so one thread moves into the `cp` namespace (setns) and runs a current-thread runtime there:
//! every socket it opens is in `cp`. The bench talks to it through a request channel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use kubenft_proto::v1::{
    self, AgentMessage, Hello, ListChangesRequest, ListNodesRequest, NodeRuleSet, NodeStatus,
    agent_message, controller_inspect_client::ControllerInspectClient, controller_message,
    rule_stream_client::RuleStreamClient,
};
use kubenft_tls::ClientFiles;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// How often the controller's change log is read (it keeps the last 256 changes).
const CHANGES_POLL: Duration = Duration::from_secs(2);
/// A simulated agent whose stream ends reconnects after this pause.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// An inspection call that takes longer fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Changes remembered as already counted (revisions), beyond which the oldest are forgotten.
const SEEN_REVISIONS: usize = 4096;

/// What the fleet measured, shared with the bench.
pub struct Shared {
    /// Simulated agents that have received their first full Change.
    pub synced: AtomicU32,
    /// Streams that ended other than by the bench stopping them (each reconnects).
    pub restarts: AtomicU32,
    pub acks: AtomicU64,
    /// Per ACK of a Change carrying trigger times: ms from the trigger to the ACK (drained by
    /// each checkpoint).
    pub ack_lag: Mutex<Vec<f64>>,
    /// Per input change every affected node acknowledged (ListChanges): ms from its trigger
    /// time to the last node's ACK (drained by each checkpoint).
    pub change_lag: Mutex<Vec<f64>>,
    pub last_error: Mutex<Option<String>>,
    /// Only changes triggered at or after this (Unix ms) are counted: set when the churn
    /// starts, so that the initial sync is no part of the latencies.
    since_ms: AtomicI64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            synced: AtomicU32::new(0),
            restarts: AtomicU32::new(0),
            acks: AtomicU64::new(0),
            ack_lag: Mutex::default(),
            change_lag: Mutex::default(),
            last_error: Mutex::default(),
            since_ms: AtomicI64::new(i64::MAX),
        }
    }
}

impl Shared {
    /// Counts latencies from now on (of changes triggered from now on), dropping any so far.
    pub fn start_counting(&self) {
        self.since_ms.store(unix_ms() as i64, Ordering::Relaxed);
        self.drain();
    }

    fn counts(&self, trigger_ms: i64) -> bool {
        trigger_ms >= self.since_ms.load(Ordering::Relaxed)
    }

    fn error(&self, e: impl std::fmt::Display) {
        *self.last_error.lock().expect("lock") = Some(e.to_string());
    }

    /// Takes the samples gathered since the last call.
    pub fn drain(&self) -> (Vec<f64>, Vec<f64>) {
        let take = |m: &Mutex<Vec<f64>>| std::mem::take(&mut *m.lock().expect("lock"));
        (take(&self.ack_lag), take(&self.change_lag))
    }
}

enum Request {
    Nodes(std::sync::mpsc::Sender<anyhow::Result<Vec<NodeStatus>>>),
    Rules(String, std::sync::mpsc::Sender<anyhow::Result<NodeRuleSet>>),
    Stop,
}

/// The running fleet; stopped (its streams closed) on drop.
pub struct Fleet {
    requests: mpsc::UnboundedSender<Request>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub shared: Arc<Shared>,
}

/// Where and as whom the fleet connects.
pub struct Config {
    /// The namespace's file, `/run/netns/<name>`.
    pub netns: std::path::PathBuf,
    pub controller: SocketAddr,
    /// Each simulated node's name and certificate.
    pub agents: Vec<(String, ClientFiles)>,
    /// The inspection client's certificate.
    pub operator: ClientFiles,
}

impl Fleet {
    pub fn start(config: Config) -> anyhow::Result<Fleet> {
        let shared = Arc::new(Shared::default());
        let (requests, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("endurance-fleet".into())
            .spawn(move || {
                let runtime = enter(&config.netns).and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("building the fleet's runtime")
                });
                match runtime {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(()));
                        rt.block_on(serve(config, s, rx));
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("starting the fleet's thread")?;
        ready_rx
            .recv()
            .context("the fleet's thread ended at start")??;
        Ok(Fleet {
            requests,
            thread: Some(thread),
            shared,
        })
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(std::sync::mpsc::Sender<anyhow::Result<T>>) -> Request,
    ) -> anyhow::Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.requests
            .send(make(tx))
            .map_err(|_| anyhow::anyhow!("the fleet has stopped"))?;
        rx.recv_timeout(CALL_TIMEOUT + Duration::from_secs(5))
            .context("no answer from the fleet")?
    }

    /// Every node the controller knows, with its sync state.
    pub fn nodes(&self) -> anyhow::Result<Vec<NodeStatus>> {
        self.ask(Request::Nodes)
    }

    /// The rule set the controller computed for `node`.
    pub fn rules(&self, node: &str) -> anyhow::Result<NodeRuleSet> {
        self.ask(|tx| Request::Rules(node.to_owned(), tx))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves this thread into the network namespace at `path`.
fn enter(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .with_context(|| format!("entering the network namespace {}", path.display()))
}

async fn serve(config: Config, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Request>) {
    let (stop_tx, stop) = watch::channel(false);
    for (node, files) in config.agents {
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(sim_agent(node, files, config.controller, shared, stop));
    }
    let inspect = match inspect_client(config.controller, &config.operator) {
        Ok(c) => Some(c),
        Err(e) => {
            shared.error(format!("inspection client: {e:#}"));
            None
        }
    };
    if let Some(client) = inspect.clone() {
        tokio::spawn(poll_changes(client, shared.clone(), stop.clone()));
    }
    while let Some(req) = rx.recv().await {
        match req {
            Request::Stop => break,
            Request::Nodes(reply) => {
                let r = match inspect.clone() {
                    Some(mut c) => call(c.list_nodes(ListNodesRequest {}))
                        .await
                        .map(|r| r.nodes),
                    None => Err(anyhow::anyhow!("no inspection client")),
                };
                let _ = reply.send(r);
            }
            Request::Rules(node, reply) => {
                let r = match inspect.clone() {
                    Some(mut c) => call(c.get_node_rules(v1::GetNodeRulesRequest { node })).await,
                    None => Err(anyhow::anyhow!("no inspection client")),
                };
                let _ = reply.send(r);
            }
        }
    }
    let _ = stop_tx.send(true);
    // Let the streams close cleanly (bounded).
    tokio::time::sleep(Duration::from_millis(300)).await;
}

async fn call<T>(
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    let r = tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .context("inspection call timed out")??;
    Ok(r.into_inner())
}

fn endpoint(addr: SocketAddr, files: &ClientFiles) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(files.load()?)?
        .connect_timeout(Duration::from_secs(10)))
}

fn inspect_client(
    addr: SocketAddr,
    files: &ClientFiles,
) -> anyhow::Result<ControllerInspectClient<Channel>> {
    // Lazy: the connection is made by the channel's task, on this (the `cp`) thread.
    let channel = endpoint(addr, files)?.connect_lazy();
    Ok(ControllerInspectClient::new(channel).max_decoding_message_size(256 << 20))
}

/// Counts every input change the controller reports done (once), with its duration.
async fn poll_changes(
    mut client: ControllerInspectClient<Channel>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(CHANGES_POLL) => {}
        }
        let changes = match call(client.list_changes(ListChangesRequest {})).await {
            Ok(r) => r.changes,
            Err(e) => {
                shared.error(format!("ListChanges: {e:#}"));
                continue;
            }
        };
        let mut lag = shared.change_lag.lock().expect("lock");
        for c in changes {
            if c.done && shared.counts(c.trigger_unix_ms) && seen.insert(c.revision) {
                lag.push(c.duration_ms as f64);
            }
        }
        while seen.len() > SEEN_REVISIONS {
            seen.pop_first();
        }
    }
}

/// One simulated node: a stream, reopened whenever it ends, until the bench stops.
async fn sim_agent(
    node: String,
    files: ClientFiles,
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut first = true;
    loop {
        let result = stream(&node, &files, addr, &shared, &mut stop, &mut first).await;
        if *stop.borrow() {
            return;
        }
        shared.restarts.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            shared.error(format!("simulated agent {node}: {e:#}"));
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
        }
    }
}

fn message(m: agent_message::Message) -> AgentMessage {
    AgentMessage { message: Some(m) }
}

/// One stream: Hello with nothing applied, then an ACK for every Change as it arrives.
async fn stream(
    node: &str,
    files: &ClientFiles,
    addr: SocketAddr,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
    first: &mut bool,
) -> anyhow::Result<()> {
    let channel = endpoint(addr, files)?.connect().await?;
    let (tx, rx) = mpsc::channel(4);
    let hello = Hello {
        node_name: node.to_owned(),
        addresses: Vec::new(),
        applied: Vec::new(),
        agent_version: "kubenft-bench".into(),
        system_version: String::new(),
        applied_on_request: false,
        protocol_version: kubenft_proto::release::PROTOCOL_VERSION,
    };
    tx.send(message(agent_message::Message::Hello(hello)))
        .await?;
    let mut inbound = RuleStreamClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    // A stream's first Change is the full sync, whose resources carry their old trigger
    // times: no latency of this run's changes.
    let mut synced = false;
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return Ok(()),
            msg = inbound.message() => msg?,
        };
        let Some(msg) = msg else {
            anyhow::bail!("the controller closed the stream");
        };
        match msg.message {
            Some(controller_message::Message::Change(change)) => {
                if change.continued {
                    continue;
                }
                let ack = v1::Ack {
                    change_id: change.change_id,
                };
                tx.send(message(agent_message::Message::Ack(ack))).await?;
                shared.acks.fetch_add(1, Ordering::Relaxed);
                if std::mem::replace(&mut synced, true) {
                    record_lag(shared, &change.trigger_times);
                }
                if std::mem::take(first) {
                    shared.synced.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(controller_message::Message::InventoryRequest(_)) => {
                // Nothing held: the controller then sends everything.
                let inventory = v1::Inventory::default();
                tx.send(message(agent_message::Message::Inventory(inventory)))
                    .await?;
            }
            _ => {}
        }
    }
}

fn record_lag(shared: &Shared, triggers: &[v1::TriggerTime]) {
    if triggers.is_empty() {
        return;
    }
    let now_ms = unix_ms();
    let mut lag = shared.ack_lag.lock().expect("lock");
    for t in triggers.iter().filter(|t| shared.counts(t.unix_ms)) {
        lag.push((now_ms - t.unix_ms as f64).max(0.0));
    }
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}
