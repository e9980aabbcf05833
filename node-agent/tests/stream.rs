//! The controller client against an in-process fake controller: Hello, Ack/Nack, reconnect
//! (cycling past a dead controller) with a fresh Hello reporting what is applied; the backoff
//! against controllers that fail every attempt, and the one log line per outage.

mod common;

use std::sync::Arc;
use std::time::Duration;

use kubenft_agent::applier::Applier;
use kubenft_agent::discovery::Controllers;
use kubenft_agent::health::Health;
use kubenft_agent::metrics::Metrics;
use kubenft_agent::nft::{FakeNft, TableName};
use kubenft_agent::state::AppliedState;
use kubenft_agent::stream::{self, StreamConfig};
use kubenft_proto::v1::{
    self, AgentMessage, ControllerMessage, agent_message, controller_message,
    rule_stream_server::{RuleStream, RuleStreamServer},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

type Outbound = mpsc::Sender<Result<ControllerMessage, Status>>;

/// Forwards everything agents send, and hands the test one sender per opened stream.
struct FakeController {
    inbound: mpsc::UnboundedSender<AgentMessage>,
    streams: mpsc::UnboundedSender<Outbound>,
}

#[tonic::async_trait]
impl RuleStream for FakeController {
    type StreamStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let forward = self.inbound.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let _ = forward.send(m);
            }
        });
        let (tx, rx) = mpsc::channel(8);
        let _ = self.streams.send(tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("timed out")
        .expect("channel open")
}

/// The next message other than a data plane status (sent on connect and on every change of
/// the data plane's state, independently of changes and their answers).
async fn next_reply(rx: &mut mpsc::UnboundedReceiver<AgentMessage>) -> AgentMessage {
    loop {
        let msg = next(rx).await;
        if !matches!(msg.message, Some(agent_message::Message::Status(_))) {
            return msg;
        }
    }
}

fn change(id: u64, resources: Vec<v1::Resource>) -> Result<ControllerMessage, Status> {
    Ok(ControllerMessage {
        message: Some(controller_message::Message::Change(v1::Change {
            trigger_times: Vec::new(),
            change_id: id,
            resources,
            ..Default::default()
        })),
    })
}

#[tokio::test]
async fn hello_ack_nack_and_reconnect() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (in_tx, mut inbound) = mpsc::unbounded_channel();
    let (s_tx, mut streams) = mpsc::unbounded_channel();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuleStreamServer::new(FakeController {
                inbound: in_tx,
                streams: s_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let dir = common::TempDir::new();
    let nft = FakeNft::default();
    let applier = applier(&dir, &nft);
    let cancel = CancellationToken::new();
    // The first controller refuses connections: the client moves on to the next.
    let client = run_client(
        vec!["http://127.0.0.1:1".into(), format!("http://{addr}")],
        applier.clone(),
        &cancel,
    );

    // First stream: Hello with nothing applied (unknown kernel state).
    let first = streams.recv().await.unwrap();
    let Some(agent_message::Message::Hello(hello)) = next_reply(&mut inbound).await.message else {
        panic!("expected Hello")
    };
    assert_eq!(hello.node_name, "node-a");
    // Right after the Hello, the agent says whether its tables hold what it applied.
    let Some(agent_message::Message::Status(status)) = next(&mut inbound).await.message else {
        panic!("expected the data plane status")
    };
    assert_eq!(status.state(), v1::DataplaneState::DataplaneConverged);
    assert!(hello.applied.is_empty() && !hello.applied_on_request);
    assert!(hello.system_version.is_empty());
    // It names this build and its protocol, and the node's addresses as the kernel lists them
    // (this test's network namespace has some besides loopback, which is never listed).
    assert_eq!(hello.agent_version, kubenft_proto::release::VERSION);
    assert_eq!(
        hello.protocol_version,
        kubenft_proto::release::PROTOCOL_VERSION
    );
    assert!(!hello.addresses.is_empty(), "{hello:?}");
    for a in &hello.addresses {
        let ip: std::net::IpAddr = a.parse().expect("an IP address");
        assert!(!ip.is_loopback(), "{a}");
    }

    use v1::{IpFamily::Ipv4, Protocol::Tcp};
    let svc = common::resource(
        "default/web/TCP/http/IPv4",
        common::port(
            Ipv4,
            Tcp,
            80,
            "10.96.0.10",
            vec![common::ep("10.244.1.5", 8080, true)],
        ),
    );
    first.send(change(1, vec![svc.clone()])).await.unwrap();
    let msg = next_reply(&mut inbound).await.message;
    assert_eq!(
        msg,
        Some(agent_message::Message::Ack(v1::Ack { change_id: 1 }))
    );

    // A change refused every time (also as a full reconcile) is NACKed with nft's text.
    nft.fail_times("Error: boom\n", u32::MAX);
    let mut changed = svc.clone();
    changed.version = "other".into();
    first.send(change(2, vec![changed])).await.unwrap();
    let msg = next_reply(&mut inbound).await.message;
    assert_eq!(
        msg,
        Some(agent_message::Message::Nack(v1::Nack {
            change_id: 2,
            error: "Error: boom".into(),
        }))
    );
    nft.fail_times("", 0);

    // The controller goes away: the agent reconnects and states the version of what it has
    // applied, and lists it when asked.
    drop(first);
    let second = streams.recv().await.unwrap();
    let Some(agent_message::Message::Hello(hello)) = next_reply(&mut inbound).await.message else {
        panic!("expected Hello")
    };
    let held = vec![svc.name_version()];
    let version =
        kubenft_proto::system_version(held.iter().map(|r| (r.name.as_str(), r.version.as_str())));
    assert!(hello.applied.is_empty() && hello.applied_on_request);
    assert_eq!(hello.system_version, version);
    second
        .send(Ok(ControllerMessage {
            message: Some(controller_message::Message::InventoryRequest(
                v1::InventoryRequest {},
            )),
        }))
        .await
        .unwrap();
    let Some(agent_message::Message::Inventory(inventory)) = next_reply(&mut inbound).await.message
    else {
        panic!("expected Inventory")
    };
    assert_eq!(inventory.applied, held);
    assert_eq!(inventory.system_version, version);

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("client stops on cancel")
        .unwrap();
    server.abort();
}

fn gaps(attempts: &[std::time::Instant]) -> Vec<Duration> {
    attempts.windows(2).map(|w| w[1] - w[0]).collect()
}

/// An applier over a fake nft, its state in `dir`, knowing nothing applied.
fn applier(dir: &common::TempDir, nft: &FakeNft) -> Arc<Applier<FakeNft>> {
    Arc::new(Applier::new(
        Arc::new(nft.clone()),
        TableName::default(),
        dir.0.clone(),
        AppliedState::unknown(0),
        Arc::new(Metrics::default()),
        Arc::new(Health::default()),
    ))
}

/// The agent's stream client for node-a against `urls`, in plaintext.
fn run_client(
    urls: Vec<String>,
    applier: Arc<Applier<FakeNft>>,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let cfg = StreamConfig {
        controllers: Controllers::fixed(urls),
        node_name: "node-a".into(),
        tls: None,
    };
    tokio::spawn(stream::run(
        cfg,
        applier,
        Arc::new(Metrics::default()),
        cancel.clone(),
    ))
}

fn client(
    url: String,
    dir: &common::TempDir,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    run_client(vec![url], applier(dir, &FakeNft::default()), cancel)
}

/// A controller address that accepts every connection and closes it at once: each attempt
/// fails. The attempts space out (the backoff grows to seconds, where it used to stop at
/// 1 s), and the outage is logged once, not at every attempt.
#[tokio::test]
async fn an_unreachable_controller_is_retried_with_growing_backoff_and_logged_once() {
    let captured = common::Captured::default();
    let _log = captured.install();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut arrivals) = mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let _ = tx.send(std::time::Instant::now());
            drop(conn);
        }
    });
    let cancel = CancellationToken::new();
    let dir = common::TempDir::new();
    let run = client(format!("http://{addr}"), &dir, &cancel);

    // Doubling from 100 ms, the seventh attempt comes 3-6.3 s after the first, and the gap
    // before it is at least 1.6 s (the backoff's jitter takes off at most half). A client may
    // open more than one connection per attempt: those come together.
    let first = tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
        .await
        .expect("no attempt in 10 s")
        .unwrap();
    let mut seen = vec![first];
    let window = tokio::time::Instant::from_std(first) + Duration::from_secs(8);
    while let Ok(Some(t)) = tokio::time::timeout_at(window, arrivals.recv()).await {
        seen.push(t);
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("client stops on cancel")
        .unwrap();
    server.abort();

    let gaps = gaps(&seen);
    eprintln!("{} connections in 8 s, gaps {gaps:?}", seen.len());
    let longest = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        longest >= Duration::from_millis(1500),
        "the backoff did not grow past a second: {gaps:?}"
    );
    let logs = captured.text();
    assert_eq!(
        logs.matches("cannot reach a controller").count(),
        1,
        "{logs}"
    );
    assert_eq!(logs.matches("WARN").count(), 1, "{logs}");
    assert!(!logs.contains("connected to controller"), "{logs}");
}

/// A controller that opens each stream and ends it at once: such a short stream does not
/// reset the backoff (it used to, which made a tight reconnection loop).
#[tokio::test]
async fn a_stream_that_ends_at_once_does_not_reset_the_backoff() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (in_tx, _inbound) = mpsc::unbounded_channel();
    let (s_tx, mut streams) = mpsc::unbounded_channel();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuleStreamServer::new(FakeController {
                inbound: in_tx,
                streams: s_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let cancel = CancellationToken::new();
    let dir = common::TempDir::new();
    let run = client(format!("http://{addr}"), &dir, &cancel);
    let mut opened = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while opened.len() < 7 {
        match tokio::time::timeout_at(deadline, streams.recv()).await {
            // Dropping the sender ends the stream.
            Ok(Some(sender)) => {
                opened.push(std::time::Instant::now());
                drop(sender);
            }
            _ => panic!("only {} streams in 20 s", opened.len()),
        }
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("client stops on cancel")
        .unwrap();
    server.abort();
    let gaps = gaps(&opened);
    let longest = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        longest >= Duration::from_millis(1500),
        "streams that end at once are reopened without backing off: {gaps:?}"
    );
}

/// Refuses every stream as a controller refuses an agent whose protocol it does not speak.
struct SkewedController {
    hellos: mpsc::UnboundedSender<v1::Hello>,
}

#[tonic::async_trait]
impl RuleStream for SkewedController {
    type StreamStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        if let Ok(Some(AgentMessage {
            message: Some(agent_message::Message::Hello(hello)),
        })) = inbound.message().await
        {
            let _ = self.hellos.send(hello);
        }
        Err(Status::failed_precondition(
            "agent speaks rule-stream protocol 1, older than this controller accepts (2 to 3): upgrade the agent",
        ))
    }
}

/// A controller that refuses this agent's protocol: the agent applies nothing, logs the
/// refusal once as an error naming it, and keeps trying with backoff (another replica, or the
/// same one once upgraded, may speak it).
#[tokio::test]
async fn a_protocol_refusal_is_logged_once_and_retried_without_applying_anything() {
    let captured = common::Captured::default();
    let _log = captured.install();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (h_tx, mut hellos) = mpsc::unbounded_channel();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RuleStreamServer::new(SkewedController { hellos: h_tx }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let dir = common::TempDir::new();
    let nft = FakeNft::default();
    let applier = applier(&dir, &nft);
    let cancel = CancellationToken::new();
    let run = run_client(vec![format!("http://{addr}")], applier, &cancel);
    for _ in 0..3 {
        let hello = next(&mut hellos).await;
        assert_eq!(
            hello.protocol_version,
            kubenft_proto::release::PROTOCOL_VERSION
        );
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("client stops on cancel")
        .unwrap();
    server.abort();
    assert!(nft.applied().is_empty(), "applied {:?}", nft.applied());
    let logs = captured.text();
    assert_eq!(logs.matches("ERROR").count(), 1, "{logs}");
    assert!(
        logs.contains("version skew") && logs.contains("(2 to 3): upgrade the agent"),
        "{logs}"
    );
    assert!(!logs.contains("connected to controller"), "{logs}");
}
