//! The controller side of `kubenft.v1.RuleStream`: one task per agent stream.
//!
//! The task remembers what the agent holds (from its Hello, then from each Ack), and whenever
//! nothing is in flight and the node's desired rule set differs from it, sends one Change with
//! the difference. Changes that happen while one is in flight are merged into the next one,
//! because the next diff is always taken against the latest desired state.
//!
//! A refused change is sent again, as a fresh change with the difference from what the agent
//! holds, after an exponential backoff (1 s, 2 s, 4 s … 60 s, less up to a fifth as jitter):
//! the agent may have failed for a passing reason (nft busy, a kernel module loading). A change
//! of the desired rule set is sent at once and starts the backoff over, and so does an Ack.
//!
//! The agent's reports on its data plane (DataplaneStatus) are kept in the hub, bounded, until
//! the stream closes: a node whose data plane is being repaired or cannot converge is never
//! shown SYNCED.

use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kubenft_proto::v1::{
    AgentMessage, Change, ControllerMessage, DataplaneState, DataplaneStatus, Hello,
    InventoryRequest, RepairCount, Resource, ResourceVersion, TriggerTime, agent_message,
    controller_message, rule_stream_server::RuleStream,
};
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hub::{AgentBuild, Hub};
use crate::metrics::Metrics;
use crate::skew;
use kubenft_plan::model::{clip, is_dns_subdomain};
use kubenft_plan::view::NodeRuleSet;

/// How long an agent has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A change with more resources than this is large (a first sync): only a few are encoded and
/// in flight at once, so a thousand agents connecting together do not hold a thousand copies
/// of the whole rule set in memory.
const LARGE_CHANGE: usize = 512;
const LARGE_CHANGES_IN_FLIGHT: usize = 16;
/// The encoded size a part of a change stays under (unless one resource alone is larger): tonic
/// keeps each stream's encode buffer at the size of the largest message it sent, so with
/// thousands of streams this is what every agent's connection keeps allocated.
const PART_BYTES: usize = 16 * 1024;
/// The first retry of a refused change, doubled for each retry after it up to the maximum.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// What is kept of text an agent sends (a NACK's or data plane's error): the peer is not
/// authenticated yet, and the text is shown by inspection and logs.
const ERROR_LINES: usize = 3;
const ERROR_CHARS: usize = 512;
/// How long an agent has to acknowledge or refuse a change (its parts sent included), plus
/// [`ACK_DEADLINE_PER_RESOURCE`] for each resource in it: past it the stream is closed (the
/// agent reconnects and resumes), so a stream that holds one of the slots for large changes
/// without acting loses it. An honest agent applies 30,000 Services in about 4 s: 60 s plus
/// 1 ms a resource leaves it more than twenty times that. `KUBENFT_ACK_DEADLINE_MS`, read
/// once at start, replaces the 60 s (for tests).
const ACK_DEADLINE: Duration = Duration::from_secs(60);
const ACK_DEADLINE_PER_RESOURCE: Duration = Duration::from_millis(1);
pub const ACK_DEADLINE_ENV: &str = "KUBENFT_ACK_DEADLINE_MS";
/// Bounds on what an agent says of itself (its Hello) and of what it holds (Hello, Inventory):
/// a message beyond them closes the stream with INVALID_ARGUMENT naming the field, and nothing
/// of it is kept.
const MAX_ADDRESSES: usize = 64;
const MAX_AGENT_VERSION: usize = 64;
/// Resources an agent may say it holds: a hundred times the largest rule set benchmarked.
const MAX_APPLIED: usize = 1_000_000;
/// A resource name (kind, namespace, name, port name and protocol) and a version.
const MAX_RESOURCE_NAME: usize = 512;
const MAX_VERSION: usize = 128;

/// Why `applied` (of `message`) is out of bounds, if it is.
fn check_applied(
    message: &str,
    system_version: &str,
    applied: &[ResourceVersion],
) -> Result<(), Status> {
    let bad = |field: &str, what: String| {
        Err(Status::invalid_argument(format!(
            "{message}.{field}: {what}"
        )))
    };
    if system_version.len() > MAX_VERSION {
        return bad(
            "system_version",
            format!("{} bytes, at most {MAX_VERSION}", system_version.len()),
        );
    }
    if applied.len() > MAX_APPLIED {
        return bad(
            "applied",
            format!("{} entries, at most {MAX_APPLIED}", applied.len()),
        );
    }
    for rv in applied {
        if rv.name.len() > MAX_RESOURCE_NAME {
            return bad(
                "applied.name",
                format!(
                    "{} bytes ({:?}), at most {MAX_RESOURCE_NAME}",
                    rv.name.len(),
                    clip(&rv.name)
                ),
            );
        }
        if rv.version.len() > MAX_VERSION {
            return bad(
                "applied.version",
                format!("{} bytes, at most {MAX_VERSION}", rv.version.len()),
            );
        }
    }
    Ok(())
}

/// Why a Hello is out of bounds, if it is.
fn check_hello(hello: &Hello) -> Result<(), Status> {
    if !is_dns_subdomain(&hello.node_name) {
        return Err(Status::invalid_argument(format!(
            "Hello.node_name: {:?} ({} bytes) is not a DNS-1123 subdomain of at most 253 characters",
            clip(&hello.node_name),
            hello.node_name.len()
        )));
    }
    if hello.addresses.len() > MAX_ADDRESSES {
        return Err(Status::invalid_argument(format!(
            "Hello.addresses: {} entries, at most {MAX_ADDRESSES}",
            hello.addresses.len()
        )));
    }
    if let Some(bad) = hello
        .addresses
        .iter()
        .find(|a| a.parse::<std::net::IpAddr>().is_err())
    {
        return Err(Status::invalid_argument(format!(
            "Hello.addresses: {:?} is not an IP address",
            clip(bad)
        )));
    }
    if hello.agent_version.len() > MAX_AGENT_VERSION {
        return Err(Status::invalid_argument(format!(
            "Hello.agent_version: {} bytes, at most {MAX_AGENT_VERSION}",
            hello.agent_version.len()
        )));
    }
    check_applied("Hello", &hello.system_version, &hello.applied)
}

/// Desired versions a stream remembers the time of while none is acknowledged (an agent that
/// never answers does not grow it).
const READY_VERSIONS: usize = 64;

/// What is kept of a data plane report's repair counts.
const REPAIR_KINDS: usize = 16;
const REPAIR_KIND_CHARS: usize = 32;

/// How long to wait before the `retries`-th retry plus one: `RETRY_FIRST` doubled `retries`
/// times, at most `RETRY_MAX`, less up to a fifth at random so that agents refused together
/// (a bad rule set sent to every node) are not all retried in the same instant.
fn retry_delay(retries: u32) -> Duration {
    let full = RETRY_FIRST
        .saturating_mul(1 << retries.min(6))
        .min(RETRY_MAX);
    // A fresh random number without a dependency: each RandomState has new SipHash keys.
    let fifths = RandomState::new().hash_one(retries) % 1000;
    full - full / 5 * u32::try_from(fifths).unwrap_or(0) / 1000
}

/// Waits until `due`, or forever.
async fn until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// An agent's error text as kept: its first lines, at most `ERROR_CHARS` characters, marked
/// when cut.
fn short_error(text: &str) -> String {
    let mut lines = text.lines();
    let mut kept: String = lines
        .by_ref()
        .take(ERROR_LINES)
        .collect::<Vec<_>>()
        .join("\n");
    let mut cut = lines.next().is_some();
    if let Some((at, _)) = kept.char_indices().nth(ERROR_CHARS) {
        kept.truncate(at);
        cut = true;
    }
    if cut {
        kept.push_str(" …");
    }
    kept
}

/// A data plane report bounded to what is worth keeping (the agent is not authenticated yet):
/// at most `REPAIR_KINDS` kinds of at most `REPAIR_KIND_CHARS`, a short error, a known state.
fn bounded(mut status: DataplaneStatus) -> DataplaneStatus {
    status.repairs.truncate(REPAIR_KINDS);
    for RepairCount { kind, .. } in &mut status.repairs {
        if let Some((at, _)) = kind.char_indices().nth(REPAIR_KIND_CHARS) {
            kind.truncate(at);
        }
    }
    status.error = short_error(&status.error);
    if DataplaneState::try_from(status.state).is_err() {
        status.state = DataplaneState::Unspecified as i32;
    }
    status
}

pub struct RuleStreamService {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    large_changes: Arc<Semaphore>,
    ack_deadline: Duration,
    /// Whether a stream needs a client certificate naming its node (TLS is on).
    node_identity: bool,
    /// Every agent session task, so that shutdown can wait for them to finish.
    sessions: TaskTracker,
}

impl RuleStreamService {
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        RuleStreamService {
            hub,
            metrics,
            shutdown,
            large_changes: Arc::new(Semaphore::new(LARGE_CHANGES_IN_FLIGHT)),
            ack_deadline: std::env::var(ACK_DEADLINE_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(ACK_DEADLINE, Duration::from_millis),
            node_identity: false,
            sessions: TaskTracker::new(),
        }
    }

    /// Spawns agent sessions on `sessions`, which the caller closes and waits for at shutdown.
    pub fn track_sessions(mut self, sessions: TaskTracker) -> Self {
        self.sessions = sessions;
        self
    }

    /// Opens node N's stream only for a client certificate with Subject CN
    /// `system:node:N` (the TLS handshake has verified it against the client CA).
    pub fn require_node_identity(mut self, required: bool) -> Self {
        self.node_identity = required;
        self
    }
}

type ChangeStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl RuleStream for RuleStreamService {
    type StreamStream = ChangeStream;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<ChangeStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let common_name = kubenft_tls::peer_common_name(&request);
        let serial = kubenft_tls::peer_serial(&request);
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                message: Some(agent_message::Message::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be Hello")),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello received")),
        };
        if let Err(status) = check_hello(&hello) {
            self.metrics.refused("invalid_argument");
            warn!(%peer, common_name = ?common_name, error = %status.message(), "refused a stream: Hello out of bounds");
            return Err(status);
        }
        // Before the hub hears of it: an impostor never disturbs the node's real agent.
        if self.node_identity
            && common_name.as_deref() != Some(kubenft_tls::node_identity(&hello.node_name).as_str())
        {
            self.metrics.refused("wrong_node");
            warn!(
                %peer,
                common_name = ?common_name,
                node = %hello.node_name,
                reason = "wrong_node",
                "refused a stream: the client certificate does not name this node"
            );
            return Err(Status::permission_denied(format!(
                "the client certificate {:?} does not name node {:?} (expected CN {:?})",
                common_name
                    .as_deref()
                    .map(clip)
                    .unwrap_or_else(|| "(none)".into()),
                clip(&hello.node_name),
                kubenft_tls::node_identity(&hello.node_name)
            )));
        }
        if self.node_identity {
            info!(%peer, common_name = ?common_name, serial = ?serial, node = %hello.node_name, "stream authenticated");
        }
        // The version-skew rule: an agent whose protocol is not spoken here is sent nothing.
        let detect_local = &self.hub.policy().detect_local;
        let feature = (
            format!("--detect-local-mode {}", detect_local.mode_name()),
            detect_local.agent_protocol(),
        );
        let protocol = match skew::check_feature(
            &hello.agent_version,
            hello.protocol_version,
            (&feature.0, feature.1),
        ) {
            Ok(protocol) => protocol,
            Err(skew) => {
                self.metrics.refused("protocol_version");
                let reason = skew.to_string();
                if self.hub.refused(&hello.node_name, &reason) {
                    warn!(%peer, node = %hello.node_name, error = %reason, "refused a stream: the agent's protocol is not spoken here");
                } else {
                    debug!(%peer, node = %hello.node_name, error = %reason, "refused a stream again: the agent's protocol is not spoken here");
                }
                return Err(skew.status());
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let span = info_span!("agent", node = %hello.node_name);
        let session = Session::open(
            self.hub.clone(),
            self.metrics.clone(),
            self.large_changes.clone(),
            self.ack_deadline,
            hello,
            protocol,
        );
        self.sessions.spawn(
            session
                .run(inbound, tx, self.shutdown.clone())
                .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A change sent and not yet answered.
struct InFlight {
    change_id: u64,
    /// What the agent holds once it is applied.
    target: Arc<NodeRuleSet>,
    sent_at: tokio::time::Instant,
    /// When the stream is closed if the change is neither acknowledged nor refused.
    deadline: tokio::time::Instant,
    /// An empty change (confirming a current agent): sent again if refused.
    confirmation: bool,
    /// Held while a large change is in flight.
    _permit: Option<OwnedSemaphorePermit>,
}

/// What the agent holds.
enum Known {
    /// Its Hello stated only the system version (the list comes on request); `asked` once
    /// an InventoryRequest is out, and nothing is sent until the Inventory arrives.
    Unlisted { system_version: String, asked: bool },
    /// As its Hello or Inventory listed it: versions sorted by name, and the system version
    /// it claims.
    Hello {
        applied: Vec<ResourceVersion>,
        system_version: String,
    },
    /// A rule set it acknowledged (shares its storage with the hub's).
    Acked(Arc<NodeRuleSet>),
}

impl Known {
    fn from_hello(applied: Vec<ResourceVersion>, system_version: String) -> Known {
        let mut applied = applied;
        if !applied.is_sorted_by(|a, b| a.name < b.name) {
            applied.sort_by(|a, b| a.name.cmp(&b.name));
            applied.dedup_by(|a, b| a.name == b.name);
        }
        Known::Hello {
            applied,
            system_version,
        }
    }

    fn from(hello: &mut Hello) -> Known {
        let system_version = std::mem::take(&mut hello.system_version);
        if hello.applied_on_request && !system_version.is_empty() {
            Known::Unlisted {
                system_version,
                asked: false,
            }
        } else {
            Known::from_hello(std::mem::take(&mut hello.applied), system_version)
        }
    }

    /// Whether the agent's list is needed to know what it lacks, and not yet asked for.
    fn needs_inventory(&self, desired: &NodeRuleSet) -> bool {
        matches!(self, Known::Unlisted { asked: false, .. }) && !self.holds(desired)
    }

    /// Whether an InventoryRequest is unanswered.
    fn awaits_inventory(&self) -> bool {
        matches!(self, Known::Unlisted { asked: true, .. })
    }

    fn version(&self, name: &str) -> Option<&str> {
        match self {
            // Never diffed (the inventory is asked for first); as if it held nothing.
            Known::Unlisted { .. } => None,
            Known::Hello { applied, .. } => applied
                .binary_search_by(|rv| rv.name.as_str().cmp(name))
                .ok()
                .map(|i| applied[i].version.as_str()),
            Known::Acked(set) => set.get(name).map(|r| r.version.as_str()),
        }
    }

    /// Whether the agent holds exactly `desired`, judged by system versions alone: this is
    /// what lets a thousand current agents reconnect without a thousand full comparisons.
    fn holds(&self, desired: &NodeRuleSet) -> bool {
        let held = match self {
            Known::Unlisted { system_version, .. } | Known::Hello { system_version, .. } => {
                system_version
            }
            Known::Acked(set) => &set.system_version,
        };
        !held.is_empty() && *held == desired.system_version
    }

    /// The names whose version may differ from `desired`'s: since the acknowledged revision
    /// when the rule set's log reaches back that far, otherwise every name on either side.
    fn candidates(&self, desired: &NodeRuleSet) -> Vec<String> {
        if let Known::Acked(set) = self
            && let Some(names) = desired.changed_since(set.rev)
        {
            return names;
        }
        let mut names: Vec<String> = desired.iter().map(|r| r.name.clone()).collect();
        match self {
            Known::Unlisted { .. } => {}
            Known::Hello { applied, .. } => names.extend(applied.iter().map(|r| r.name.clone())),
            Known::Acked(set) => names.extend(set.iter().map(|r| r.name.clone())),
        }
        names.sort();
        names.dedup();
        names
    }
}

/// What the agent lacks: resources to send (shared, not yet copied) and names to remove.
#[derive(Default)]
struct Diff {
    resources: Vec<Arc<Resource>>,
    removed: Vec<String>,
}

impl Diff {
    fn between(known: &Known, desired: &NodeRuleSet) -> Diff {
        let mut diff = Diff::default();
        if known.holds(desired) {
            return diff;
        }
        for name in known.candidates(desired) {
            let held = known.version(&name);
            match desired.get(&name) {
                Some(r) if held != Some(r.version.as_str()) => diff.resources.push(r.clone()),
                Some(_) => {}
                None if held.is_some() => diff.removed.push(name),
                None => {}
            }
        }
        diff
    }

    fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }

    /// A first sync, in practice: worth waiting for a slot before it is copied and encoded.
    fn is_large(&self) -> bool {
        self.resources.len() > LARGE_CHANGE
    }
}

/// The last change refused, sent again at `due` unless the desired rule set changes first.
struct Refused {
    system_version: String,
    due: tokio::time::Instant,
}

/// One agent stream.
struct Session {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    large_changes: Arc<Semaphore>,
    ack_deadline: Duration,
    node: String,
    /// This stream's number in the hub.
    stream: u64,
    desired: watch::Receiver<Arc<NodeRuleSet>>,
    known: Known,
    in_flight: Option<InFlight>,
    /// The last refused change, while nothing newer has been sent.
    refused: Option<Refused>,
    /// Retries of refused changes since the last Ack or change of the desired rule set.
    retries: u32,
    next_id: u64,
    confirmed: bool,
    /// When this stream first saw each desired version not yet acknowledged (oldest first,
    /// bounded): an Ack's lag is measured from it.
    ready: std::collections::VecDeque<(String, tokio::time::Instant)>,
}

impl Session {
    fn open(
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        large_changes: Arc<Semaphore>,
        ack_deadline: Duration,
        mut hello: Hello,
        protocol: u32,
    ) -> Self {
        let addresses = hello
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let agent = AgentBuild {
            version: hello.agent_version.clone(),
            protocol,
        };
        let (desired, stream) = hub.attach(&hello.node_name, addresses, agent);
        metrics.agents_connected.inc();
        metrics.node_connected(&hello.node_name);
        info!(
            node = %hello.node_name,
            applied = hello.applied.len(),
            on_request = hello.applied_on_request,
            agent_version = %hello.agent_version,
            protocol,
            release_skew = skew::release_differs(&hello.agent_version),
            "agent connected"
        );
        let known = Known::from(&mut hello);
        Session {
            hub,
            metrics,
            large_changes,
            ack_deadline,
            node: hello.node_name,
            stream,
            desired,
            known,
            in_flight: None,
            refused: None,
            retries: 0,
            next_id: 1,
            confirmed: false,
            ready: std::collections::VecDeque::new(),
        }
    }

    /// Notes when the current desired version was first seen ready.
    fn note_ready(&mut self) {
        let version = self.desired.borrow().system_version.clone();
        if self.ready.back().is_some_and(|(v, _)| *v == version) {
            return;
        }
        if self.ready.len() == READY_VERSIONS {
            self.ready.pop_front();
        }
        self.ready.push_back((version, tokio::time::Instant::now()));
    }

    /// The agent acknowledged `version`: its lag is observed, and versions seen before it
    /// are forgotten.
    fn acked_ready(&mut self, version: &str) {
        let Some(i) = self.ready.iter().position(|(v, _)| v == version) else {
            return;
        };
        let seen = self.ready[i].1;
        self.ready.drain(..=i);
        self.metrics
            .node_acked(&self.node, seen.elapsed().as_secs_f64());
    }

    async fn run(
        mut self,
        mut inbound: Streaming<AgentMessage>,
        tx: mpsc::Sender<Result<ControllerMessage, Status>>,
        shutdown: CancellationToken,
    ) {
        // A cold cache must never push an empty rule set: wait for the first complete view.
        let ready = tokio::select! {
            biased;
            () = shutdown.cancelled() => false,
            r = self.desired.wait_for(|d| !d.system_version.is_empty()) => r.is_ok(),
        };
        if ready {
            self.note_ready();
            self.serve(&mut inbound, &tx, &shutdown).await;
        }
        self.hub.detach(&self.node, self.stream);
        self.metrics.agents_connected.dec();
        info!("agent stream closed");
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<AgentMessage>,
        tx: &mpsc::Sender<Result<ControllerMessage, Status>>,
        shutdown: &CancellationToken,
    ) {
        loop {
            if self.known.awaits_inventory() {
                // Wait for the inventory.
            } else if self.known.needs_inventory(&self.desired.borrow()) {
                debug!("asking for the agent's inventory");
                if let Known::Unlisted { asked, .. } = &mut self.known {
                    *asked = true;
                }
                let ask = ControllerMessage {
                    message: Some(controller_message::Message::InventoryRequest(
                        InventoryRequest {},
                    )),
                };
                if tx.send(Ok(ask)).await.is_err() {
                    return;
                }
            } else if self.in_flight.is_none()
                && let Some((desired, diff)) = self.pending()
            {
                // The slot is taken before the resources are copied and encoded, so agents
                // waiting for one hold only shared pointers.
                let permit = if diff.is_large() {
                    tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return,
                        p = self.large_changes.clone().acquire_owned() => p.ok(),
                    }
                } else {
                    None
                };
                // Each part is copied only when the channel has room for it, so a stream
                // holds a few parts of a large change at a time, not the whole of it. An agent
                // that does not read has until the change's deadline.
                let outgoing = self.start(desired, diff, permit);
                let deadline = self.in_flight.as_ref().map(|f| f.deadline);
                let payload = !outgoing.resources.is_empty() || !outgoing.removed.is_empty();
                let (change_id, resources, removed) = (
                    outgoing.change_id,
                    outgoing.resources.len(),
                    outgoing.removed.len(),
                );
                let version = outgoing.system_version.clone();
                let (mut bytes, mut parts) = (0, 0);
                for part in outgoing.parts(PART_BYTES) {
                    bytes += part.encoded_len();
                    parts += 1;
                    let message = ControllerMessage {
                        message: Some(controller_message::Message::Change(part)),
                    };
                    match tokio::time::timeout_at(
                        deadline.expect("in flight"),
                        tx.send(Ok(message)),
                    )
                    .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => return self.expire(tx),
                    }
                }
                if payload {
                    self.metrics.pushed(&self.node, bytes);
                    // One line per push, with the node on the line itself (not only in the
                    // span), so a log search by node finds it in either format.
                    info!(node = %self.node, change_id, resources, removed, parts, bytes, %version, "pushed a change");
                }
            }
            // A refused change waits for its retry only while nothing is in flight.
            let retry = self
                .refused
                .as_ref()
                .filter(|_| self.in_flight.is_none())
                .map(|r| r.due);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => if let Err(status) = self.on_message(m) {
                        self.metrics.refused("invalid_argument");
                        warn!(error = %status.message(), "closing the stream: message out of bounds");
                        let _ = tx.try_send(Err(status));
                        return;
                    },
                    Ok(None) => return,
                    Err(e) => {
                        debug!(error = %e, "agent stream error");
                        return;
                    }
                },
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.note_ready();
                }
                () = until(retry) => {}
                () = until(self.in_flight.as_ref().map(|f| f.deadline)) => return self.expire(tx),
            }
        }
    }

    /// Closes the stream of a change neither acknowledged nor refused by its deadline: the
    /// slot for large changes it holds is released and the agent reconnects and resumes.
    fn expire(&mut self, tx: &mpsc::Sender<Result<ControllerMessage, Status>>) {
        let Some(f) = self.in_flight.take() else {
            return;
        };
        self.metrics.ack_timeouts.inc();
        let waited = f.deadline - f.sent_at;
        warn!(
            change_id = f.change_id,
            version = %f.target.system_version,
            waited_ms = waited.as_millis() as u64,
            large = f._permit.is_some(),
            "closing the stream: change neither acknowledged nor refused in time"
        );
        let _ = tx.try_send(Err(Status::deadline_exceeded(format!(
            "change {} neither acknowledged nor refused within {waited:?}",
            f.change_id
        ))));
    }

    /// When the changes behind these resources happened, where known.
    fn trigger_times(&self, resources: &[Arc<Resource>]) -> Vec<TriggerTime> {
        let catalog = self.hub.catalog();
        resources
            .iter()
            .filter_map(|r| {
                let unix_ms = catalog.ports.get(&r.name)?.plan.trigger_ms?;
                Some(TriggerTime {
                    resource: r.name.clone(),
                    unix_ms,
                })
            })
            .collect()
    }

    /// The difference between what the agent holds and what it should hold, if something
    /// must be sent: a difference, or the one empty confirmation a current agent gets on
    /// connect. A current agent is otherwise just recorded as current.
    ///
    /// A refused change is not taken again before its retry is due, unless the desired rule
    /// set changed since (then the backoff starts over).
    fn pending(&mut self) -> Option<(Arc<NodeRuleSet>, Diff)> {
        let desired = self.desired.borrow_and_update().clone();
        if let Some(refused) = &self.refused {
            if refused.system_version == desired.system_version {
                if tokio::time::Instant::now() < refused.due {
                    return None;
                }
                self.retries += 1;
                self.metrics.nack_retries.inc();
                info!(retry = self.retries, version = %desired.system_version, "sending a refused change again");
            } else {
                self.retries = 0;
            }
            self.refused = None;
            self.hub.retrying(&self.node, self.stream, self.retries);
        }
        let diff = Diff::between(&self.known, &desired);
        if diff.is_empty() && self.confirmed {
            self.hub.acked(&self.node, &desired);
            self.known = Known::Acked(desired);
            return None;
        }
        Some((desired, diff))
    }

    /// Puts `diff` in flight as the next Change.
    fn start(
        &mut self,
        desired: Arc<NodeRuleSet>,
        diff: Diff,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Outgoing {
        self.confirmed = true;
        let change_id = self.next_id;
        self.next_id += 1;
        if !diff.is_empty() {
            self.hub.sent(&self.node);
            self.metrics.changes_sent.inc();
        }
        let confirmation = diff.is_empty();
        let now = tokio::time::Instant::now();
        let deadline = now
            + self.ack_deadline
            + ACK_DEADLINE_PER_RESOURCE
                .saturating_mul(u32::try_from(diff.resources.len()).unwrap_or(u32::MAX));
        debug!(change_id, resources = diff.resources.len(), removed = diff.removed.len(), version = %desired.system_version, "sending change");
        let outgoing = Outgoing {
            change_id,
            system_version: desired.system_version.clone(),
            trigger_times: self.trigger_times(&diff.resources),
            resources: diff.resources,
            removed: diff.removed,
        };
        self.in_flight = Some(InFlight {
            change_id,
            target: desired,
            sent_at: now,
            deadline,
            confirmation,
            _permit: permit,
        });
        outgoing
    }

    /// Takes in one message from the agent; one out of bounds is refused, nothing of it kept.
    fn on_message(&mut self, msg: AgentMessage) -> Result<(), Status> {
        match msg.message {
            Some(agent_message::Message::Status(status)) => {
                let status = bounded(status);
                info!(
                    state = status.state().as_str_name(),
                    drift = status.drift_detected,
                    error = ?status.error,
                    "data plane status"
                );
                self.hub.dataplane(&self.node, self.stream, status);
            }
            Some(agent_message::Message::Inventory(inv)) => {
                check_applied("Inventory", &inv.system_version, &inv.applied)?;
                debug!(applied = inv.applied.len(), "inventory received");
                self.known = Known::from_hello(inv.applied, inv.system_version);
            }
            Some(agent_message::Message::Ack(ack)) => {
                let Some(f) = self.in_flight.take_if(|f| f.change_id == ack.change_id) else {
                    warn!(change_id = ack.change_id, "ack for a change not in flight");
                    return Ok(());
                };
                self.metrics.acks.inc();
                self.metrics
                    .push_duration
                    .observe(f.sent_at.elapsed().as_secs_f64());
                self.hub.acked(&self.node, &f.target);
                self.acked_ready(&f.target.system_version);
                self.known = Known::Acked(f.target);
                self.retries = 0;
            }
            Some(agent_message::Message::Nack(nack)) => {
                let Some(f) = self.in_flight.take_if(|f| f.change_id == nack.change_id) else {
                    warn!(
                        change_id = nack.change_id,
                        "nack for a change not in flight"
                    );
                    return Ok(());
                };
                let system_version = f.target.system_version.clone();
                let error = short_error(&nack.error);
                let delay = retry_delay(self.retries);
                // Debug formatting: the agent's text cannot start a log line of its own.
                warn!(node = %self.node, version = %system_version, ?error, retries = self.retries, retry_in_ms = delay.as_millis() as u64, "agent refused a change");
                self.metrics.node_nacked(&self.node);
                let due = tokio::time::Instant::now() + delay;
                self.hub
                    .nacked(&self.node, self.stream, &system_version, error, Some(due));
                if f.confirmation {
                    // Not recorded as confirmed when its retry comes: sent again.
                    self.confirmed = false;
                }
                self.refused = Some(Refused {
                    system_version,
                    due,
                });
            }
            Some(agent_message::Message::Hello(_)) | None => {
                warn!("unexpected message on an open stream")
            }
        }
        Ok(())
    }
}

/// A change on its way out: shared resources, copied part by part as they are sent.
struct Outgoing {
    change_id: u64,
    system_version: String,
    trigger_times: Vec<TriggerTime>,
    resources: Vec<Arc<Resource>>,
    removed: Vec<String>,
}

impl Outgoing {
    /// The change in parts of at most `max_bytes` of resources each (one part when it fits; a
    /// resource larger than that alone in its part), each marked `continued` but the last,
    /// which carries the removals and trigger times.
    fn parts(self, max_bytes: usize) -> impl Iterator<Item = Change> {
        let Outgoing {
            change_id,
            system_version,
            mut trigger_times,
            resources,
            mut removed,
        } = self;
        let mut rest = resources.into_iter().peekable();
        let mut done = false;
        std::iter::from_fn(move || {
            if done {
                return None;
            }
            let mut part = Vec::new();
            let mut bytes = 0;
            while let Some(next) = rest.peek() {
                let size = next.encoded_len();
                if !part.is_empty() && bytes + size > max_bytes {
                    break;
                }
                bytes += size;
                part.push(Resource::clone(next));
                rest.next();
            }
            let last = rest.peek().is_none();
            done = last;
            Some(Change {
                change_id,
                system_version: system_version.clone(),
                resources: part,
                removed: if last {
                    std::mem::take(&mut removed)
                } else {
                    Vec::new()
                },
                trigger_times: if last {
                    std::mem::take(&mut trigger_times)
                } else {
                    Vec::new()
                },
                continued: !last,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_a_minute() {
        for (retries, full) in [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (7, 60), (40, 60)] {
            let full = Duration::from_secs(full);
            let delays: Vec<Duration> = (0..50).map(|_| retry_delay(retries)).collect();
            assert!(
                delays.iter().all(|d| *d <= full && *d >= full * 4 / 5),
                "{retries}: {delays:?}"
            );
            assert!(delays.iter().any(|d| *d != delays[0]), "no jitter");
        }
    }

    #[test]
    fn agent_text_is_kept_short_and_bounded() {
        assert_eq!(short_error("nft: Error"), "nft: Error");
        assert_eq!(short_error("a\nb\nc"), "a\nb\nc");
        assert_eq!(short_error("a\nb\nc\nd\ne"), "a\nb\nc …");
        let long = "é".repeat(2000);
        assert_eq!(short_error(&long).chars().count(), ERROR_CHARS + 2);
        let status = bounded(DataplaneStatus {
            state: 42,
            repairs: (0..100)
                .map(|i| RepairCount {
                    kind: format!("{i:-<100}"),
                    count: i,
                })
                .collect(),
            error: "x\n".repeat(10_000),
            ..Default::default()
        });
        assert_eq!(status.state(), DataplaneState::Unspecified);
        assert_eq!(status.repairs.len(), REPAIR_KINDS);
        assert!(
            status
                .repairs
                .iter()
                .all(|r| r.kind.chars().count() == REPAIR_KIND_CHARS)
        );
        assert_eq!(status.error, "x\nx\nx …");
    }

    #[test]
    fn large_changes_are_split_into_parts() {
        let resources: Vec<Arc<Resource>> = (0..600)
            .map(|i| {
                Arc::new(Resource {
                    name: format!("r{i:03}"),
                    version: "0123456789".into(),
                    ..Default::default()
                })
            })
            .collect();
        let each = resources[0].encoded_len();
        let outgoing = |n: usize| Outgoing {
            change_id: 7,
            system_version: "v".into(),
            trigger_times: Vec::new(),
            resources: resources[..n].to_vec(),
            removed: vec!["gone".into()],
        };
        let parts: Vec<Change> = outgoing(600).parts(256 * each).collect();
        assert_eq!(
            parts.iter().map(|p| p.resources.len()).collect::<Vec<_>>(),
            [256, 256, 88]
        );
        assert_eq!(
            parts.iter().map(|p| p.continued).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(
            parts
                .iter()
                .all(|p| p.change_id == 7 && p.system_version == "v")
        );
        assert!(parts[0].removed.is_empty());
        assert_eq!(parts[2].removed, ["gone"]);
        let joined: Vec<Resource> = parts.into_iter().flat_map(|p| p.resources).collect();
        let expected: Vec<Resource> = resources.iter().map(|r| Resource::clone(r)).collect();
        assert_eq!(joined, expected);
        // Small changes go out whole, an empty one (a confirmation) as one part, and a
        // resource larger than a part alone in its own.
        let small: Vec<Change> = outgoing(10).parts(256 * each).collect();
        assert_eq!(small.len(), 1);
        assert!(!small[0].continued && small[0].removed == ["gone"]);
        assert_eq!(outgoing(0).parts(256 * each).count(), 1);
        assert_eq!(outgoing(3).parts(1).count(), 3);
    }
}
