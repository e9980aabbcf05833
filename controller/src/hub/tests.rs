//! The hub publishes: agents and inspection are served while a replan is in progress, and
//! shutdown waits for every agent session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kubenft_proto::release::PROTOCOL_VERSION;
use kubenft_proto::v1::controller_inspect_client::ControllerInspectClient;
use kubenft_proto::v1::controller_inspect_server::ControllerInspectServer;
use kubenft_proto::v1::rule_stream_client::RuleStreamClient;
use kubenft_proto::v1::rule_stream_server::RuleStreamServer;
use kubenft_proto::v1::{
    AgentMessage, Change, ControllerMessage, Hello, ListNodesRequest, agent_message,
    controller_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Streaming;

use super::*;
use crate::inspect::InspectService;
use crate::metrics::Metrics;
use crate::stream::RuleStreamService;

/// Bound on every wait: far beyond what an answer takes, far below the held replan's release.
const WAIT: Duration = Duration::from_secs(10);
/// How long a held replan waits for the test to release it before going on by itself.
const HOLD: Duration = Duration::from_secs(60);

/// Inputs with nodes `a` and `b` and one ClusterIP Service per name.
fn inputs(services: &[(&str, &str)]) -> Inputs {
    let mut text = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: b}\n",
    );
    for (name, ip) in services {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80}}]\n"
        ));
    }
    let objects = crate::source::parse_file("test.yaml", &text).expect("valid manifest");
    assert!(objects.rejections.is_empty(), "{:?}", objects.rejections);
    crate::source::objects_to_inputs(objects, &kubenft_plan::model::Limits::default())
}

/// Serves the rule stream and inspection of `hub` on a loopback port until `shutdown`.
async fn serve(hub: Arc<Hub>, sessions: TaskTracker, shutdown: &CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = RuleStreamService::new(hub.clone(), Arc::new(Metrics::new()), shutdown.clone())
        .track_sessions(sessions);
    let server = tonic::transport::Server::builder()
        .add_service(RuleStreamServer::new(streams))
        .add_service(ControllerInspectServer::new(InspectService::new(hub)))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        );
    tokio::spawn(server);
    addr
}

/// Opens node a's stream, stating it holds nothing.
async fn connect(addr: SocketAddr) -> (mpsc::Sender<AgentMessage>, Streaming<ControllerMessage>) {
    let mut client = RuleStreamClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(AgentMessage {
        message: Some(agent_message::Message::Hello(Hello {
            node_name: "a".into(),
            agent_version: "test".into(),
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}

async fn next_change(inbound: &mut Streaming<ControllerMessage>) -> Change {
    let message = tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("no change within the bound")
        .unwrap()
        .expect("stream ended");
    match message.message {
        Some(controller_message::Message::Change(c)) => c,
        other => panic!("expected a change, got {other:?}"),
    }
}

fn names(c: &Change) -> Vec<&str> {
    c.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_inspection_are_served_while_a_replan_is_in_progress() {
    let hub = Arc::new(Hub::new(ClusterPolicy::default()));
    hub.set_inputs(&inputs(&[("web", "10.96.0.10")]));
    let shutdown = CancellationToken::new();
    let addr = serve(hub.clone(), TaskTracker::new(), &shutdown).await;

    // The next replan stops before its first node until released.
    let (entered_tx, mut entered) = mpsc::unbounded_channel::<String>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = parking_lot::Mutex::new(Some(released));
    hub.set_plan_hook(Arc::new(move |node: &str| {
        if let Some(released) = released.lock().take() {
            let _ = entered_tx.send(node.to_owned());
            let _ = released.recv_timeout(HOLD);
        }
    }));
    let replanned = Arc::new(AtomicBool::new(false));
    let replan = {
        let (hub, replanned) = (hub.clone(), replanned.clone());
        tokio::task::spawn_blocking(move || {
            hub.set_inputs(&inputs(&[("web", "10.96.0.10"), ("api", "10.96.0.11")]));
            replanned.store(true, Ordering::SeqCst);
        })
    };
    tokio::time::timeout(WAIT, entered.recv())
        .await
        .expect("the replan never started planning nodes")
        .unwrap();

    // While it is held: inspection answers, and an agent connects and gets its rule set.
    let mut inspect = ControllerInspectClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let listed = tokio::time::timeout(WAIT, inspect.list_nodes(ListNodesRequest {}))
        .await
        .expect("ListNodes waited for the replan")
        .unwrap()
        .into_inner();
    let mut nodes: Vec<&str> = listed.nodes.iter().map(|n| n.name.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["a", "b"]);
    let (tx, mut inbound) = tokio::time::timeout(WAIT, connect(addr))
        .await
        .expect("the agent's stream waited for the replan");
    let first = next_change(&mut inbound).await;
    assert!(
        names(&first).iter().any(|n| n.contains("web")),
        "{:?}",
        names(&first)
    );
    assert!(
        !replanned.load(Ordering::SeqCst),
        "the answers must arrive while the replan is still held"
    );

    // Node b is planned after the held node: until then it shows its old rule set.
    let has_api = |hub: &Hub| hub.rules_for("b").iter().any(|r| r.name.contains("api"));
    assert!(!has_api(&hub));
    drop(tx);

    // Released, the replan publishes node b's new rule set.
    release.send(()).unwrap();
    tokio::time::timeout(WAIT, replan).await.unwrap().unwrap();
    assert!(replanned.load(Ordering::SeqCst));
    assert!(has_api(&hub));
    shutdown.cancel();
}

#[tokio::test]
async fn shutdown_waits_for_agent_sessions() {
    let hub = Arc::new(Hub::new(ClusterPolicy::default()));
    hub.set_inputs(&inputs(&[("web", "10.96.0.10")]));
    let shutdown = CancellationToken::new();
    let sessions = TaskTracker::new();
    let addr = serve(hub.clone(), sessions.clone(), &shutdown).await;
    let (_tx, mut inbound) = connect(addr).await;
    next_change(&mut inbound).await;
    assert_eq!(sessions.len(), 1, "the agent's session is tracked");
    let connected = |hub: &Hub| {
        hub.statuses()
            .into_iter()
            .find(|(name, ..)| name == "a")
            .map(|(_, _, status)| status.streams)
    };
    assert_eq!(connected(&hub), Some(1));

    shutdown.cancel();
    sessions.close();
    tokio::time::timeout(WAIT, sessions.wait())
        .await
        .expect("sessions never finished");
    // Waited for means finished: the session has let the hub know its stream closed.
    assert_eq!(connected(&hub), Some(0));
    assert!(sessions.is_empty());
}
