//! The controller side of `kubenft.v1.RuleStream`: one task per agent stream.
//!
//! The task remembers what the agent holds (from its Hello, then from each Ack), and whenever
//! nothing is in flight and the node's desired rule set differs from it, sends one Change with
//! the difference. Changes that happen while one is in flight are merged into the next one,
//! because the next diff is always taken against the latest desired state.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kubenft_proto::v1::{
    AgentMessage, Change, ControllerMessage, Hello, Resource, agent_message, controller_message,
    rule_stream_server::RuleStream,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::model::{clip, is_dns_subdomain};
use crate::plan::NodeRuleSet;

/// How long an agent has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct RuleStreamService {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl RuleStreamService {
    pub fn new(hub: Arc<Hub>, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        RuleStreamService {
            hub,
            metrics,
            shutdown,
        }
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
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                message: Some(agent_message::Message::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be Hello")),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello received")),
        };
        if !is_dns_subdomain(&hello.node_name) {
            return Err(Status::invalid_argument(format!(
                "node name {:?} is not a DNS-1123 subdomain",
                clip(&hello.node_name)
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let session = Session::open(self.hub.clone(), self.metrics.clone(), &hello);
        let span = info_span!("agent", node = %hello.node_name);
        tokio::spawn(
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
    target: BTreeMap<String, String>,
    system_version: String,
    sent_at: tokio::time::Instant,
}

/// One agent stream.
struct Session {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    node: String,
    desired: watch::Receiver<Arc<NodeRuleSet>>,
    /// Resource name → version the agent holds.
    known: BTreeMap<String, String>,
    in_flight: Option<InFlight>,
    /// System version of the last refused change: not sent again until something changes.
    refused: Option<String>,
    next_id: u64,
    confirmed: bool,
}

impl Session {
    fn open(hub: Arc<Hub>, metrics: Arc<Metrics>, hello: &Hello) -> Self {
        let addresses = hello
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let desired = hub.attach(&hello.node_name, addresses, hello.agent_version.clone());
        metrics.agents_connected.inc();
        let known = hello
            .applied
            .iter()
            .map(|rv| (rv.name.clone(), rv.version.clone()))
            .collect();
        info!(node = %hello.node_name, applied = hello.applied.len(), "agent connected");
        Session {
            hub,
            metrics,
            node: hello.node_name.clone(),
            desired,
            known,
            in_flight: None,
            refused: None,
            next_id: 1,
            confirmed: false,
        }
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
            self.serve(&mut inbound, &tx, &shutdown).await;
        }
        self.hub.detach(&self.node);
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
            if self.in_flight.is_none()
                && let Some(change) = self.next_change()
                && tx.send(Ok(change)).await.is_err()
            {
                return;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => self.on_message(m),
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
                    self.refused = None;
                }
            }
        }
    }

    /// The difference between what the agent holds and what it should hold, if any (and the
    /// one empty confirmation a current agent gets on connect).
    fn next_change(&mut self) -> Option<ControllerMessage> {
        let desired = self.desired.borrow_and_update().clone();
        if self.refused.as_deref() == Some(desired.system_version.as_str()) {
            return None;
        }
        let resources: Vec<Resource> = desired
            .resources
            .iter()
            .filter(|(name, r)| self.known.get(*name) != Some(&r.version))
            .map(|(_, r)| Resource::clone(r))
            .collect();
        let removed: Vec<String> = self
            .known
            .keys()
            .filter(|name| !desired.resources.contains_key(*name))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() && self.confirmed {
            self.hub.acked(&self.node, &desired.system_version);
            return None;
        }
        self.confirmed = true;
        let change_id = self.next_id;
        self.next_id += 1;
        let target = desired
            .resources
            .iter()
            .map(|(n, r)| (n.clone(), r.version.clone()))
            .collect();
        let payload = !resources.is_empty() || !removed.is_empty();
        if payload {
            self.hub.sent(&self.node);
            self.metrics.changes_sent.inc();
        }
        debug!(change_id, resources = resources.len(), removed = removed.len(), version = %desired.system_version, "sending change");
        self.in_flight = Some(InFlight {
            change_id,
            target,
            system_version: desired.system_version.clone(),
            sent_at: tokio::time::Instant::now(),
        });
        Some(ControllerMessage {
            message: Some(controller_message::Message::Change(Change {
                change_id,
                system_version: desired.system_version.clone(),
                resources,
                removed,
            })),
        })
    }

    fn on_message(&mut self, msg: AgentMessage) {
        match msg.message {
            Some(agent_message::Message::Ack(ack)) => {
                let Some(f) = self.in_flight.take_if(|f| f.change_id == ack.change_id) else {
                    warn!(change_id = ack.change_id, "ack for a change not in flight");
                    return;
                };
                self.known = f.target;
                self.metrics.acks.inc();
                self.metrics
                    .push_duration
                    .observe(f.sent_at.elapsed().as_secs_f64());
                self.hub.acked(&self.node, &f.system_version);
            }
            Some(agent_message::Message::Nack(nack)) => {
                let Some(f) = self.in_flight.take_if(|f| f.change_id == nack.change_id) else {
                    warn!(
                        change_id = nack.change_id,
                        "nack for a change not in flight"
                    );
                    return;
                };
                warn!(version = %f.system_version, error = %clip(&nack.error), "agent refused a change");
                self.metrics.nacks.inc();
                self.hub.nacked(&self.node, &f.system_version, &nack.error);
                self.refused = Some(f.system_version);
            }
            Some(agent_message::Message::Hello(_)) | None => {
                warn!("unexpected message on an open stream")
            }
        }
    }
}
