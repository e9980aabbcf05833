//! The controller client: one long-lived `RuleStream/Stream` at a time, reconnected with
//! bounded exponential backoff across the configured controllers.
//!
//! Losing the controller never touches the data path: the tables stay as last applied, and a
//! fresh Hello on reconnect tells the controller what that is (its version; the list of names
//! and versions only if the controller asks). An outage is logged when it starts and when it
//! ends, not at every attempt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kubenft_proto::release;
use kubenft_proto::v1::{
    self, AgentMessage, agent_message, controller_message, rule_stream_client::RuleStreamClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::addrs;
use crate::applier::Applier;
use crate::discovery::{Controllers, Target};
use crate::metrics::Metrics;
use crate::nft::Nft;

pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Doubling from [`MIN_BACKOFF`], an agent is back within about a second of a brief outage;
/// capped at a few seconds so that a fleet whose controllers are all down does not hammer
/// them (the jitter spreads its reconnections).
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A stream that stayed up this long resets the backoff; one that ends sooner (a controller
/// that accepts and then fails at once) keeps it growing.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// The largest Change an agent accepts (a full rule set of tens of thousands of Services).
pub const MAX_CHANGE_BYTES: usize = 1 << 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Resources in a change after which the freed memory is handed back (see [`crate::memory`]).
const LARGE_CHANGE: usize = 512;

pub struct StreamConfig {
    /// Tried in turn; a discovered list is read afresh before each attempt.
    pub controllers: Controllers,
    pub node_name: String,
    /// The agent's client certificate and the controllers' CA, read afresh for each
    /// connection (so rotated files are used from the next one on). `None`: plaintext.
    pub tls: Option<kubenft_tls::ClientFiles>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the stream's sender is gone")]
    Closed,
    #[error("TLS: {0}")]
    Tls(#[from] kubenft_tls::Error),
    /// Never sent as an empty list: the controller would take the node's CIDR NodePort
    /// addresses away.
    #[error("cannot list the node's addresses for Hello: {0}")]
    Addresses(#[from] addrs::AddrsError),
}

/// Since when no controller stream is open, for the one line logged when it ends.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    /// Failed attempts since then.
    attempts: u32,
}

impl Outage {
    /// A stream is open: logs the end of the outage, if there was one.
    fn connected(&mut self, url: &str) {
        match self.since.take() {
            Some(since) => tracing::info!(
                controller = %url,
                failed_attempts = self.attempts,
                after_ms = since.elapsed().as_millis() as u64,
                "connected to controller"
            ),
            None => tracing::info!(controller = %url, "connected to controller"),
        }
        self.attempts = 0;
    }

    /// An attempt (or an open stream) ended: logs the start of an outage, and nothing for
    /// the attempts that follow. A controller that refuses this agent's protocol (version
    /// skew) is logged as an error: it will not change by retrying alone.
    fn failed(&mut self, url: &str, error: &str, was_up: Option<Duration>, skew: bool) {
        if skew && self.since.is_none() {
            tracing::error!(controller = %url, %error, "the controller refuses this agent's rule-stream protocol (version skew): nothing applied, rules kept as they are; retrying with backoff (logged again once connected)");
            self.since = Some(Instant::now());
            self.attempts = 1;
        } else if let Some(up) = was_up {
            tracing::warn!(controller = %url, %error, up_ms = up.as_millis() as u64, "lost the controller stream: rules kept as they are; reconnecting (logged again once connected)");
            self.since = Some(Instant::now());
        } else if self.since.is_none() {
            tracing::warn!(controller = %url, %error, "cannot reach a controller: rules kept as they are; retrying with backoff (logged again once connected)");
            self.since = Some(Instant::now());
            self.attempts = 1;
        } else {
            self.attempts += 1;
            tracing::debug!(controller = %url, %error, attempts = self.attempts, "controller still unreachable");
        }
    }
}

/// Runs until cancelled.
pub async fn run<N: Nft>(
    cfg: StreamConfig,
    applier: Arc<Applier<N>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    let mut outage = Outage::default();
    let mut controllers = cfg.controllers.clone();
    let mut turn = 0usize;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let Some(target) = next_target(&mut controllers, &mut turn, &cancel).await else {
            break;
        };
        let url = target.url.as_str();
        let mut up_since = None;
        let result = session(
            &target,
            &cfg,
            &applier,
            &metrics,
            &cancel,
            &mut up_since,
            &mut outage,
        )
        .await;
        metrics.set_connected(false);
        let skew = matches!(&result, Err(SessionError::Status(s)) if s.code() == tonic::Code::FailedPrecondition);
        let error = match result {
            Ok(()) if cancel.is_cancelled() => break,
            Ok(()) => "the controller closed the stream".to_owned(),
            Err(e) => chain(&e),
        };
        let was_up = up_since.map(|t: Instant| t.elapsed());
        outage.failed(url, &error, was_up, skew);
        if was_up.is_some_and(|up| up >= STABLE_AFTER) {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(jittered(backoff)) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    tracing::debug!("controller client stopped");
}

/// The controller to try next (in turn through the current list); waits while none is
/// known. `None` once cancelled.
async fn next_target(
    controllers: &mut Controllers,
    turn: &mut usize,
    cancel: &CancellationToken,
) -> Option<Target> {
    let mut logged = false;
    loop {
        let list = controllers.current();
        if !list.is_empty() {
            let target = list[*turn % list.len()].clone();
            *turn = turn.wrapping_add(1);
            return Some(target);
        }
        if !logged {
            tracing::warn!(
                "no controller known yet: rules kept as they are; waiting for the controllers' endpoints"
            );
            logged = true;
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            changed = controllers.changed() => if !changed {
                cancel.cancelled().await;
                return None;
            },
        }
    }
}

/// An error with its causes (tonic's transport error says only "transport error"; the cause
/// says which: refused, a TLS handshake failure, a certificate the controller rejected...).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let line = s.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = s.source();
    }
    text
}

/// Between half and all of `backoff`.
fn jittered(backoff: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    backoff.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
}

async fn session<N: Nft>(
    target: &Target,
    cfg: &StreamConfig,
    applier: &Applier<N>,
    metrics: &Metrics,
    cancel: &CancellationToken,
    up_since: &mut Option<Instant>,
    outage: &mut Outage,
) -> Result<(), SessionError> {
    let url = target.url.as_str();
    // Before connecting: a node whose addresses cannot be read does not connect at all (its
    // rules stay as they are) rather than say it has none.
    let hello = hello(cfg, applier).await?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?;
    if let Some(files) = &cfg.tls {
        // The controller's certificate is checked against the URL's host, or the Service's
        // name for a discovered address.
        let mut tls = files.load()?;
        if let Some(name) = &target.server_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(message(agent_message::Message::Hello(hello)))
        .await
        .map_err(|_| SessionError::Closed)?;
    let mut inbound = RuleStreamClient::new(channel)
        .max_decoding_message_size(MAX_CHANGE_BYTES)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    *up_since = Some(Instant::now());
    metrics.set_connected(true);
    outage.connected(url);
    let mut dataplane = applier.dataplane().subscribe();
    let status = dataplane.borrow_and_update().clone();
    tx.send(message(agent_message::Message::Status(status)))
        .await
        .map_err(|_| SessionError::Closed)?;
    let mut parts = Parts::default();
    loop {
        let next = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            next = inbound.message() => next?,
            Ok(()) = dataplane.changed() => {
                let status = dataplane.borrow_and_update().clone();
                tx.send(message(agent_message::Message::Status(status)))
                    .await
                    .map_err(|_| SessionError::Closed)?;
                continue;
            }
        };
        let Some(v1::ControllerMessage { message: Some(msg) }) = next else {
            if next.is_none() {
                return Ok(());
            }
            continue;
        };
        let part = match msg {
            controller_message::Message::Change(part) => part,
            controller_message::Message::InventoryRequest(_) => {
                tx.send(message(agent_message::Message::Inventory(inventory(
                    applier,
                ))))
                .await
                .map_err(|_| SessionError::Closed)?;
                continue;
            }
        };
        let Some(change) = parts.add(part) else {
            continue;
        };
        let reply = match applier.handle(&change).await {
            Ok(()) => agent_message::Message::Ack(v1::Ack {
                change_id: change.change_id,
            }),
            Err(error) => agent_message::Message::Nack(v1::Nack {
                change_id: change.change_id,
                error,
            }),
        };
        tx.send(message(reply))
            .await
            .map_err(|_| SessionError::Closed)?;
        // A large change (a first sync) peaks far above what the agent keeps: once it is
        // applied and gone, the freed pages go back to the system.
        if change.resources.len() > LARGE_CHANGE {
            drop(change);
            crate::memory::release_freed();
        }
    }
}

/// Reassembles a change sent in parts (see `Change.continued`).
#[derive(Default)]
struct Parts {
    pending: Option<v1::Change>,
}

impl Parts {
    /// The whole change once its last part has arrived. A part of a different change than
    /// the one pending replaces it (the controller never interleaves changes; this only
    /// guards against a confused peer).
    fn add(&mut self, part: v1::Change) -> Option<v1::Change> {
        let whole = match self.pending.take() {
            Some(mut acc) if acc.change_id == part.change_id => {
                acc.resources.extend(part.resources);
                acc.removed.extend(part.removed);
                acc.trigger_times.extend(part.trigger_times);
                acc.system_version = part.system_version;
                acc.continued = part.continued;
                acc
            }
            _ => part,
        };
        if whole.continued {
            self.pending = Some(whole);
            None
        } else {
            Some(whole)
        }
    }
}

fn message(m: agent_message::Message) -> AgentMessage {
    AgentMessage { message: Some(m) }
}

/// The Hello states the system version only: a controller that agrees the agent is current
/// needs nothing more, and one that does not asks for the [`inventory`]. It names the
/// agent's release and protocol, which the controller checks against its version-skew rule.
async fn hello<N: Nft>(
    cfg: &StreamConfig,
    applier: &Applier<N>,
) -> Result<v1::Hello, SessionError> {
    let addresses = addrs::node_addresses().await?;
    let system_version = applier.state().read().hello_version();
    Ok(v1::Hello {
        node_name: cfg.node_name.clone(),
        addresses,
        applied: Vec::new(),
        agent_version: release::VERSION.to_owned(),
        applied_on_request: !system_version.is_empty(),
        system_version,
        protocol_version: release::PROTOCOL_VERSION,
    })
}

/// What the agent has applied (an empty version when it holds nothing).
fn inventory<N: Nft>(applier: &Applier<N>) -> v1::Inventory {
    let state = applier.state().read();
    v1::Inventory {
        applied: state.hello_applied(),
        system_version: state.hello_version(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(id: u64, names: &[&str], continued: bool) -> v1::Change {
        v1::Change {
            change_id: id,
            system_version: format!("v{id}"),
            resources: names
                .iter()
                .map(|n| v1::Resource {
                    name: (*n).into(),
                    ..Default::default()
                })
                .collect(),
            continued,
            ..Default::default()
        }
    }

    #[test]
    fn parts_are_applied_as_one_change_after_the_last() {
        let mut parts = Parts::default();
        assert!(parts.add(part(1, &["a", "b"], true)).is_none());
        assert!(parts.add(part(1, &["c"], true)).is_none());
        let whole = parts.add(part(1, &["d"], false)).expect("last part");
        let names: Vec<&str> = whole.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert!(!whole.continued);
        // A single-part change passes straight through; a stray part of another change
        // does not leak into it.
        assert!(parts.add(part(2, &["x"], true)).is_none());
        let next = parts.add(part(3, &["y"], false)).expect("complete");
        assert_eq!(next.change_id, 3);
        assert_eq!(next.resources.len(), 1);
    }
}
