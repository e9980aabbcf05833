//! The rule stream's semantics against the real controller over a real socket, with a scripted
//! agent: deltas only, ACK/NACK, retries of refused changes with backoff, one change in flight
//! with coalescing, a reconnecting current agent receiving nothing but a confirmation, and the
//! agent's data plane reports in the node's state.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kubenft_controller::{Config, cli::SourceArg};
use kubenft_plan::{ClusterPolicy, DetectLocal, InterfaceName};
use kubenft_proto::release::{OLDEST_AGENT_PROTOCOL, PROTOCOL_VERSION, VERSION};
use kubenft_proto::v1::{
    Ack, AgentMessage, Change, ControllerMessage, DataplaneState, DataplaneStatus, DetectLocalMode,
    Hello, Inventory, ListNodesRequest, ListNodesResponse, Nack, NodeStatus, RepairCount,
    ResourceVersion, SyncState, agent_message, controller_inspect_client::ControllerInspectClient,
    controller_message, rule_stream_client::RuleStreamClient,
};
use kubenft_proto::{endpoint_bucket, node_endpoints_name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(5);

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80}}]\n"
    )
}

fn slice(service: &str, ip: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [{ip}]\n  nodeName: a\n"
    )
}

/// Writes a manifest atomically (the controller must never see half a file).
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

struct Controller {
    grpc: SocketAddr,
    http: SocketAddr,
    dir: tempdir::Dir,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("kubenft-stream-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Controller {
    async fn start() -> Self {
        Self::start_with(ClusterPolicy::default()).await
    }

    async fn start_with(policy: ClusterPolicy) -> Self {
        let dir = tempdir::Dir::new();
        write(
            &dir.0,
            "a.yaml",
            &format!(
                "{}---\n{}",
                service("web", "10.96.0.10"),
                slice("web", "10.244.1.10")
            ),
        );
        let grpc = free_port();
        let http = free_port();
        let config = Config {
            source: SourceArg::Dir(dir.0.clone()),
            grpc_listen: grpc,
            http_listen: http,
            policy,
            kubeconfig: None,
            tls: None,
            signer: None,
        };
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            kubenft_controller::run(config, token).await.unwrap();
        });
        Controller {
            grpc,
            http,
            dir,
            shutdown,
            task,
        }
    }

    async fn connect(&self, applied: Vec<ResourceVersion>) -> Agent {
        // An honest agent states the version of what it lists (none when it lists nothing).
        let system_version = if applied.is_empty() {
            String::new()
        } else {
            version_of(&applied)
        };
        self.connect_claiming(applied, system_version).await
    }

    async fn connect_claiming(
        &self,
        applied: Vec<ResourceVersion>,
        system_version: String,
    ) -> Agent {
        self.open(Hello {
            node_name: "a".into(),
            addresses: vec![],
            applied,
            agent_version: "test".into(),
            system_version,
            applied_on_request: false,
            protocol_version: PROTOCOL_VERSION,
        })
        .await
    }

    /// An agent stating its version only (the list on request).
    async fn connect_on_request(&self, system_version: String) -> Agent {
        self.open(Hello {
            node_name: "a".into(),
            addresses: vec![],
            applied: vec![],
            agent_version: "test".into(),
            system_version,
            applied_on_request: true,
            protocol_version: PROTOCOL_VERSION,
        })
        .await
    }

    async fn open(&self, hello: Hello) -> Agent {
        self.try_open(hello).await.expect("stream refused")
    }

    /// Opens a stream with `hello`: the stream, or the status it was refused with.
    async fn try_open(&self, hello: Hello) -> Result<Agent, tonic::Status> {
        let url = format!("http://{}", self.grpc);
        let mut client = None;
        for _ in 0..100 {
            match RuleStreamClient::connect(url.clone()).await {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let mut client = client.expect("controller never listened");
        let (tx, rx) = mpsc::channel(8);
        tx.send(AgentMessage {
            message: Some(agent_message::Message::Hello(hello)),
        })
        .await
        .unwrap();
        let inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Agent { tx, inbound })
    }

    async fn node_state(&self) -> (SyncState, String) {
        let a = self.node().await.expect("node a listed");
        (SyncState::try_from(a.state).unwrap(), a.last_nack_error)
    }

    /// Node a as ListNodes shows it, if listed.
    async fn node(&self) -> Option<NodeStatus> {
        self.list().await.nodes.into_iter().find(|n| n.name == "a")
    }

    /// ListNodes.
    async fn list(&self) -> ListNodesResponse {
        let url = format!("http://{}", self.grpc);
        let mut client = None;
        for _ in 0..100 {
            match ControllerInspectClient::connect(url.clone()).await {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        client
            .expect("controller never listened")
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Node a once it is in `state` (messages on the stream are handled asynchronously).
    async fn node_in(&self, state: SyncState) -> NodeStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let node = self.node().await;
            if let Some(n) = &node
                && n.state == state as i32
            {
                return node.unwrap();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node a never {state:?}: {node:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The metrics page.
    async fn metrics(&self) -> String {
        let mut conn = tokio::net::TcpStream::connect(self.http).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).await.unwrap();
        text
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    inbound: Streaming<ControllerMessage>,
}

impl Agent {
    async fn message(&mut self) -> controller_message::Message {
        let msg = tokio::time::timeout(WAIT, self.inbound.message())
            .await
            .expect("no message within 5 s")
            .unwrap()
            .expect("stream ended");
        msg.message.expect("empty message")
    }

    async fn next(&mut self) -> Change {
        match self.message().await {
            controller_message::Message::Change(c) => c,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    async fn send_inventory(&self, applied: Vec<ResourceVersion>) {
        let system_version = version_of(&applied);
        self.tx
            .send(AgentMessage {
                message: Some(agent_message::Message::Inventory(Inventory {
                    applied,
                    system_version,
                })),
            })
            .await
            .unwrap();
    }

    async fn nothing_for(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.inbound.message()).await {
            panic!("expected silence, got {m:?}");
        }
    }

    async fn ack(&self, c: &Change) {
        self.tx
            .send(AgentMessage {
                message: Some(agent_message::Message::Ack(Ack {
                    change_id: c.change_id,
                })),
            })
            .await
            .unwrap();
    }

    async fn status(&self, status: DataplaneStatus) {
        self.tx
            .send(AgentMessage {
                message: Some(agent_message::Message::Status(status)),
            })
            .await
            .unwrap();
    }

    async fn nack(&self, c: &Change, error: &str) {
        self.tx
            .send(AgentMessage {
                message: Some(agent_message::Message::Nack(Nack {
                    change_id: c.change_id,
                    error: error.into(),
                })),
            })
            .await
            .unwrap();
    }
}

fn names(c: &Change) -> Vec<&str> {
    c.resources.iter().map(|r| r.name.as_str()).collect()
}

/// The system version of what an agent lists (as an honest agent states it).
fn version_of(applied: &[ResourceVersion]) -> String {
    kubenft_proto::system_version(
        applied
            .iter()
            .map(|r| (r.name.as_str(), r.version.as_str())),
    )
}

/// The `node-endpoints` resource an endpoint address of node a is listed in.
fn bucket_of(ip: &str) -> String {
    node_endpoints_name(endpoint_bucket(&ip.parse().unwrap()))
}

/// A new agent gets everything, then only what changes; changes made while one is in flight are
/// merged into a single next change.
#[tokio::test]
async fn deltas_with_one_change_in_flight() {
    let ctl = Controller::start().await;
    let mut agent = ctl.connect(vec![]).await;
    let full = agent.next().await;
    assert_eq!(
        names(&full),
        [
            "default/web/tcp/http/ipv4",
            "node",
            &bucket_of("10.244.1.10")
        ]
    );
    agent.ack(&full).await;

    // Two edits while nothing is acked: the first goes out, the second waits and is merged.
    write(&ctl.dir.0, "b.yaml", &service("api", "10.96.0.20"));
    let first = agent.next().await;
    assert_eq!(names(&first), ["default/api/tcp/http/ipv4"]);
    write(
        &ctl.dir.0,
        "a.yaml",
        &format!(
            "{}---\n{}",
            service("web", "10.96.0.10"),
            slice("web", "10.244.1.11")
        ),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::remove_file(ctl.dir.0.join("b.yaml")).unwrap();
    agent.nothing_for(Duration::from_millis(600)).await;
    agent.ack(&first).await;
    let merged = agent.next().await;
    // The endpoint that moved is on this agent's node: the bucket of its endpoints'
    // addresses (for hairpin) that gained the new address is sent, the one left empty removed.
    let (old, new) = (bucket_of("10.244.1.10"), bucket_of("10.244.1.11"));
    assert_eq!(names(&merged), ["default/web/tcp/http/ipv4", new.as_str()]);
    let mut removed = vec!["default/api/tcp/http/ipv4".to_owned()];
    if old != new {
        removed.push(old);
    }
    assert_eq!(merged.removed, removed);
    agent.ack(&merged).await;
    agent.nothing_for(Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ctl.node_state().await.0, SyncState::Synced);
    ctl.stop().await;
}

/// An agent that reconnects holding the current state receives an empty confirmation only.
#[tokio::test]
async fn a_current_agent_gets_only_a_confirmation() {
    let ctl = Controller::start().await;
    let mut agent = ctl.connect(vec![]).await;
    let full = agent.next().await;
    agent.ack(&full).await;
    let applied: Vec<ResourceVersion> = full.resources.iter().map(|r| r.name_version()).collect();
    drop(agent);

    let mut again = ctl.connect(applied.clone()).await;
    let confirmation = again.next().await;
    assert!(confirmation.resources.is_empty() && confirmation.removed.is_empty());
    assert_eq!(confirmation.system_version, full.system_version);
    again.ack(&confirmation).await;
    again.nothing_for(Duration::from_millis(500)).await;
    drop(again);

    // The stated system version alone confirms an agent (no name-by-name comparison: the
    // list is not even looked at) ...
    let mut by_version = ctl
        .connect_claiming(Vec::new(), full.system_version.clone())
        .await;
    let confirmation = by_version.next().await;
    assert!(confirmation.resources.is_empty() && confirmation.removed.is_empty());
    drop(by_version);
    // ... and without one (an older agent), the names are compared.
    let mut by_names = ctl.connect_claiming(applied.clone(), String::new()).await;
    let confirmation = by_names.next().await;
    assert!(confirmation.resources.is_empty() && confirmation.removed.is_empty());
    drop(by_names);

    // An agent holding something stale gets just the difference.
    let mut stale = ctl
        .connect(vec![ResourceVersion {
            name: "default/gone/tcp/http/ipv4".into(),
            version: "0".into(),
        }])
        .await;
    let diff = stale.next().await;
    assert_eq!(
        names(&diff),
        [
            "default/web/tcp/http/ipv4",
            "node",
            &bucket_of("10.244.1.10")
        ]
    );
    assert_eq!(diff.removed, ["default/gone/tcp/http/ipv4"]);
    ctl.stop().await;
}

/// A Hello may state the version alone: a current agent is confirmed without listing anything,
/// a stale one is asked for its inventory and then gets just the difference.
#[tokio::test]
async fn an_agent_lists_what_it_holds_only_when_asked() {
    let ctl = Controller::start().await;
    let mut agent = ctl.connect(vec![]).await;
    let full = agent.next().await;
    agent.ack(&full).await;
    drop(agent);

    let mut current = ctl.connect_on_request(full.system_version.clone()).await;
    let confirmation = current.next().await;
    assert!(confirmation.resources.is_empty() && confirmation.removed.is_empty());
    assert_eq!(confirmation.system_version, full.system_version);
    drop(current);

    let web = full
        .resources
        .iter()
        .find(|r| r.name == "default/web/tcp/http/ipv4")
        .unwrap()
        .name_version();
    let held = vec![
        ResourceVersion {
            name: "default/gone/tcp/http/ipv4".into(),
            version: "0".into(),
        },
        web,
    ];
    let mut stale = ctl.connect_on_request(version_of(&held)).await;
    match stale.message().await {
        controller_message::Message::InventoryRequest(_) => {}
        other => panic!("expected an inventory request, got {other:?}"),
    }
    stale.send_inventory(held).await;
    let diff = stale.next().await;
    assert_eq!(
        names(&diff),
        ["node", &bucket_of("10.244.1.10")],
        "web is current: not resent"
    );
    assert_eq!(diff.removed, ["default/gone/tcp/http/ipv4"]);
    ctl.stop().await;
}

/// A refused change is reported and, with nothing changed, sent again after a backoff (as a
/// fresh change) that doubles with each refusal; an Ack settles the node and resets the count.
#[tokio::test]
async fn a_refused_change_is_retried_with_backoff() {
    let ctl = Controller::start().await;
    let mut agent = ctl.connect(vec![]).await;
    let full = agent.next().await;
    agent
        .nack(
            &full,
            "nft: Error: Could not process rule\nline 2\nline 3\nline 4",
        )
        .await;
    let node = ctl.node_in(SyncState::Nacked).await;
    assert!(node.last_nack_error.contains("Could not process rule"));
    assert!(
        !node.last_nack_error.contains("line 4"),
        "kept short: {:?}",
        node.last_nack_error
    );
    assert_eq!(node.nack_retries, 0);
    assert!(
        (1..=1000).contains(&node.next_retry_ms),
        "{}",
        node.next_retry_ms
    );
    // Not before the backoff (at least 0.8 s) ...
    agent.nothing_for(Duration::from_millis(600)).await;
    // ... then the same difference again, as a new change.
    let retry = agent.next().await;
    assert!(retry.change_id > full.change_id);
    assert_eq!(retry.system_version, full.system_version);
    assert_eq!(names(&retry), names(&full));
    let node = ctl.node().await.unwrap();
    assert_eq!(
        (node.state, node.nack_retries, node.next_retry_ms),
        (SyncState::Nacked as i32, 1, 0),
        "in flight"
    );

    // Refused again: the next wait is twice as long (1.6 s to 2 s).
    agent.nack(&retry, "nft: still busy").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let node = ctl.node().await.unwrap();
    assert_eq!(node.nack_retries, 1);
    assert!(
        (1000..=2000).contains(&node.next_retry_ms),
        "{}",
        node.next_retry_ms
    );
    assert_eq!(node.last_nack_error, "nft: still busy");
    let second = agent.next().await;
    assert_eq!(names(&second), names(&full));
    agent.ack(&second).await;
    let node = ctl.node_in(SyncState::Synced).await;
    assert_eq!((node.nack_retries, node.next_retry_ms), (0, 0));
    assert_eq!(node.acked_version, full.system_version);
    agent.nothing_for(Duration::from_millis(300)).await;
    let metrics = ctl.metrics().await;
    assert!(
        metrics.contains("kubenft_controller_nack_retries_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kubenft_controller_nodes{state=\"synced\"} 1\n"),
        "{metrics}"
    );
    ctl.stop().await;
}

/// A change of the desired rule set is sent at once, whatever the backoff of a refused change,
/// as one merged change; it starts the backoff over.
#[tokio::test]
async fn an_edit_is_sent_at_once_after_a_nack() {
    let ctl = Controller::start().await;
    let mut agent = ctl.connect(vec![]).await;
    let full = agent.next().await;
    agent
        .nack(&full, "nft: Error: Could not process rule")
        .await;
    let retry = agent.next().await;
    agent
        .nack(&retry, "nft: Error: Could not process rule")
        .await;
    // The next retry is 1.6 s to 2 s away: the edit goes out well before.
    write(&ctl.dir.0, "b.yaml", &service("api", "10.96.0.20"));
    let edit = agent.next().await;
    assert_eq!(
        names(&edit),
        [
            "default/api/tcp/http/ipv4",
            "default/web/tcp/http/ipv4",
            "node",
            &bucket_of("10.244.1.10")
        ]
    );
    let node = ctl.node().await.unwrap();
    assert_eq!((node.nack_retries, node.next_retry_ms), (0, 0));
    agent
        .nack(&edit, "nft: Error: Could not process rule")
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let node = ctl.node().await.unwrap();
    assert!(
        (1..=1000).contains(&node.next_retry_ms),
        "backoff started over: {}",
        node.next_retry_ms
    );
    let again = agent.next().await;
    assert_eq!(names(&again), names(&edit));
    agent.ack(&again).await;
    let node = ctl.node_in(SyncState::Synced).await;
    assert_eq!(node.nack_retries, 0);
    ctl.stop().await;
}

/// A node whose agent reports its data plane under repair, or unable to converge, is shown so
/// (never SYNCED) though it acknowledged its rule set; a CONVERGED report makes it SYNCED again.
/// What the agent sent is shown bounded, and goes when its stream closes.
#[tokio::test]
async fn the_data_plane_report_decides_health() {
    let ctl = Controller::start().await;
    // A Node object keeps node a listed once its agent is gone.
    write(
        &ctl.dir.0,
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n",
    );
    ctl.node_in(SyncState::NotConnected).await;
    let mut agent = ctl.connect(vec![]).await;
    let full = agent.next().await;
    agent.ack(&full).await;
    let node = ctl.node_in(SyncState::Synced).await;
    assert_eq!(node.dataplane, None);

    let repairing = DataplaneStatus {
        state: DataplaneState::DataplaneRepairing as i32,
        drift_detected: 3,
        repairs: vec![RepairCount {
            kind: "element".into(),
            count: 2,
        }],
        converged_unix_ms: 1_700_000_000_000,
        error: String::new(),
    };
    agent.status(repairing.clone()).await;
    let node = ctl.node_in(SyncState::Repairing).await;
    assert_eq!(
        node.acked_version, node.desired_version,
        "acked, yet not SYNCED"
    );
    assert_eq!(node.dataplane.as_ref(), Some(&repairing));
    let metrics = ctl.metrics().await;
    assert!(
        metrics.contains("kubenft_controller_nodes{state=\"repairing\"} 1\n")
            && metrics.contains("kubenft_controller_nodes{state=\"synced\"} 0\n"),
        "{metrics}"
    );

    agent
        .status(DataplaneStatus {
            state: DataplaneState::DataplaneDiverged as i32,
            repairs: (0..40)
                .map(|i| RepairCount {
                    kind: format!("kind-{i:0>60}"),
                    count: 1,
                })
                .collect(),
            error: format!("nft: Error: busy\n{}", "x".repeat(5000)),
            ..repairing.clone()
        })
        .await;
    let node = ctl.node_in(SyncState::Diverged).await;
    let dataplane = node.dataplane.unwrap();
    assert_eq!(dataplane.repairs.len(), 16);
    assert!(dataplane.repairs.iter().all(|r| r.kind.len() <= 32));
    assert!(dataplane.error.starts_with("nft: Error: busy\n") && dataplane.error.len() < 600);

    agent
        .status(DataplaneStatus {
            state: DataplaneState::DataplaneConverged as i32,
            ..repairing.clone()
        })
        .await;
    let node = ctl.node_in(SyncState::Synced).await;
    assert_eq!(
        node.dataplane.map(|d| d.state),
        Some(DataplaneState::DataplaneConverged as i32)
    );

    // The report goes with the stream that sent it, not with an older one of the same node
    // closing after a newer one reported.
    agent.status(repairing.clone()).await;
    ctl.node_in(SyncState::Repairing).await;
    let applied: Vec<ResourceVersion> = full.resources.iter().map(|r| r.name_version()).collect();
    let mut newer = ctl.connect(applied).await;
    let confirmation = newer.next().await;
    newer.ack(&confirmation).await;
    newer
        .status(DataplaneStatus {
            state: DataplaneState::DataplaneDiverged as i32,
            ..repairing
        })
        .await;
    ctl.node_in(SyncState::Diverged).await;
    drop(agent);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ctl
        .metrics()
        .await
        .contains("kubenft_controller_agents_connected 1\n")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old stream never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let node = ctl.node_in(SyncState::Diverged).await;
    assert!(node.connected && node.dataplane.is_some());
    drop(newer);
    let node = ctl.node_in(SyncState::NotConnected).await;
    assert_eq!(node.dataplane, None);
    ctl.stop().await;
}

/// A first sync larger than one part arrives as several messages of one change: every part
/// but the last is marked `continued`, together they hold every resource once, and the one
/// Ack after the last part settles the node.
#[tokio::test]
async fn a_large_change_arrives_in_parts_answered_once() {
    let ctl = Controller::start().await;
    let many: String = (0..600)
        .map(|i| {
            service(
                &format!("s{i:03}"),
                &format!("10.96.{}.{}", 1 + i / 200, i % 200 + 1),
            )
        })
        .collect::<Vec<_>>()
        .join("---\n");
    write(&ctl.dir.0, "many.yaml", &many);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut agent = ctl.connect(vec![]).await;
    let mut parts = vec![agent.next().await];
    while parts.last().unwrap().continued {
        parts.push(agent.next().await);
    }
    assert!(parts.len() >= 3, "{} parts", parts.len());
    assert!(parts.iter().all(|p| p.change_id == parts[0].change_id));
    let names: Vec<&str> = parts.iter().flat_map(names).collect();
    assert_eq!(
        names.len(),
        603,
        "600 Services, web, the node and its endpoints' bucket"
    );
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, names, "in name order, each once");
    agent.ack(parts.last().unwrap()).await;
    agent.nothing_for(Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ctl.node_state().await.0, SyncState::Synced);
    ctl.stop().await;
}

/// The version-skew rule over a real stream. An agent of another release but the same
/// protocol is served and shown as skewed; an agent speaking a protocol this controller does
/// not is refused with FAILED_PRECONDITION naming both versions, sent nothing, counted, and
/// shown on its node until one of its streams opens.
#[tokio::test]
async fn an_agent_of_a_protocol_not_spoken_here_is_refused_and_shown() {
    let ctl = Controller::start().await;
    write(
        &ctl.dir.0,
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n",
    );
    let newer = Hello {
        node_name: "a".into(),
        agent_version: "9.0.0 (git 0123456789ab)".into(),
        protocol_version: PROTOCOL_VERSION + 1,
        ..Default::default()
    };
    // Until the controller has read its directory it serves nothing; then node a is known.
    let deadline = tokio::time::Instant::now() + WAIT;
    while ctl.node().await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node a never listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = ctl.try_open(newer.clone()).await.err().expect("accepted");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let text = refused.message();
    for part in [
        format!("protocol {}", PROTOCOL_VERSION + 1),
        format!("({OLDEST_AGENT_PROTOCOL} to {PROTOCOL_VERSION})"),
        "9.0.0 (git 0123456789ab)".to_owned(),
        VERSION.to_owned(),
        "upgrade the controllers first".to_owned(),
    ] {
        assert!(text.contains(&part), "{part:?} not in {text:?}");
    }
    let node = ctl.node().await.expect("node a listed");
    assert_eq!(node.state, SyncState::NotConnected as i32, "{node:?}");
    assert_eq!(node.refused, text, "{node:?}");
    assert!(
        ctl.metrics()
            .await
            .contains("kubenft_controller_stream_refused_total{reason=\"protocol_version\"} 1"),
        "refusal not counted"
    );

    // The same release line with the protocol spoken here: served (a first sync), shown as
    // skewed against this controller's release, and the refusal is gone.
    let mut older = ctl
        .open(Hello {
            agent_version: "0.0.9 (git 0123456789ab)".into(),
            protocol_version: PROTOCOL_VERSION,
            ..newer.clone()
        })
        .await;
    let full = older.next().await;
    assert!(!full.resources.is_empty());
    older.ack(&full).await;
    let node = ctl.node_in(SyncState::Synced).await;
    assert_eq!(node.agent_version, "0.0.9 (git 0123456789ab)");
    assert_eq!(node.agent_protocol_version, PROTOCOL_VERSION);
    assert!(node.version_skew, "{node:?}");
    assert!(node.refused.is_empty(), "{node:?}");
    let list = ctl.list().await;
    assert_eq!(list.controller_version, VERSION);
    assert_eq!(list.protocol_version, PROTOCOL_VERSION);
    assert_eq!(list.oldest_agent_protocol_version, OLDEST_AGENT_PROTOCOL);
    drop(older);

    // An agent of this very build is not skewed.
    let mut same = ctl
        .open(Hello {
            agent_version: VERSION.into(),
            protocol_version: PROTOCOL_VERSION,
            ..newer
        })
        .await;
    let full = same.next().await;
    same.ack(&full).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let node = ctl.node().await.expect("node a listed");
        if node.connected && node.agent_version == VERSION {
            assert!(!node.version_skew, "{node:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{node:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctl.stop().await;
}

/// An interface local-traffic detector needs agents of protocol 2: an agent of protocol 1
/// would ignore the mode and render "nothing is local", so it is refused (naming the mode and
/// the protocol it needs) and sent nothing; an agent of this build is served the mode with its
/// interface in its node settings.
#[tokio::test]
async fn an_interface_detector_refuses_agents_that_would_ignore_it() {
    let ctl = Controller::start_with(ClusterPolicy {
        detect_local: DetectLocal::BridgeInterface(InterfaceName::new("cbr0").unwrap()),
        ..Default::default()
    })
    .await;
    write(
        &ctl.dir.0,
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n",
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while ctl.node().await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node a never listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old = Hello {
        node_name: "a".into(),
        agent_version: "0.0.9 (git 0123456789ab)".into(),
        protocol_version: 1,
        ..Default::default()
    };
    let refused = ctl.try_open(old.clone()).await.err().expect("accepted");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    for part in [
        "--detect-local-mode BridgeInterface",
        "protocol 1",
        "needs protocol 2",
        "upgrade the agent",
    ] {
        assert!(
            refused.message().contains(part),
            "{part:?} not in {refused:?}"
        );
    }
    assert_eq!(ctl.node().await.unwrap().refused, refused.message());

    let mut current = ctl
        .open(Hello {
            protocol_version: PROTOCOL_VERSION,
            ..old
        })
        .await;
    let full = current.next().await;
    let node = full
        .resources
        .iter()
        .find_map(|r| match &r.kind {
            Some(kubenft_proto::v1::resource::Kind::Node(n)) => Some(n.clone()),
            _ => None,
        })
        .expect("node settings sent");
    assert_eq!(
        node.detect_local_mode,
        DetectLocalMode::BridgeInterface as i32
    );
    assert_eq!(node.local_interface, "cbr0");
    assert!(node.local_pod_cidrs.is_empty(), "{node:?}");
    current.ack(&full).await;
    ctl.node_in(SyncState::Synced).await;
}
