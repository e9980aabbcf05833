//! The drain gate (`DrainStatus`) and the cluster-wide programming latency (`ListChanges`,
//! `kubenft_controller_network_programming_duration_seconds`) against the real controller
//! over a real socket, with scripted agents that acknowledge when the test says so.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kubenft_controller::drain_wait::{DRAINED, DrainWaitArgs, NO_ANSWER, NOT_DRAINED, run};
use kubenft_controller::{Config, cli::SourceArg};
use kubenft_plan::ClusterPolicy;
use kubenft_proto::release::PROTOCOL_VERSION;
use kubenft_proto::v1::{
    Ack, AgentMessage, Change, ControllerMessage, DrainState, DrainStatusRequest,
    DrainStatusResponse, Hello, ListChangesRequest, ListNodesRequest, NodeDrain, agent_message,
    controller_inspect_client::ControllerInspectClient, controller_message,
    rule_stream_client::RuleStreamClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(5);
/// The trigger time written on the EndpointSlice (2026-11-22T04:00:00Z: in the past).
const TRIGGER: &str = "2026-11-22T04:00:00Z";
const TRIGGER_MS: i64 = 1_795_320_000_000;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Service `web` at 10.96.0.10 with endpoints `(ip, node)`, its slice triggered at `trigger`.
fn web(endpoints: &[(&str, &str)], trigger: Option<&str>) -> String {
    let annotations = trigger.map_or(String::new(), |t| {
        format!("  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{t}\"}}\n")
    });
    let mut text = String::new();
    for node in ["a", "b"] {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n---\n"
        ));
    }
    text.push_str(&format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n{annotations}addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    ));
    for (ip, node) in endpoints {
        text.push_str(&format!("- addresses: [{ip}]\n  nodeName: {node}\n"));
    }
    text
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

struct Controller {
    grpc: SocketAddr,
    http: SocketAddr,
    dir: std::path::PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Controller {
    async fn start(manifest: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kubenft-drain-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, "web.yaml", manifest);
        let (grpc, http) = (free_port(), free_port());
        let config = Config {
            source: SourceArg::Dir(dir.clone()),
            grpc_listen: grpc,
            http_listen: http,
            policy: ClusterPolicy::default(),
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

    async fn channel(&self) -> Channel {
        let url = format!("http://{}", self.grpc);
        for _ in 0..100 {
            if let Ok(c) = Channel::from_shared(url.clone()).unwrap().connect().await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("controller never listened");
    }

    async fn inspect(&self) -> ControllerInspectClient<Channel> {
        ControllerInspectClient::new(self.channel().await)
    }

    async fn agent(&self, node: &str) -> Agent {
        let mut client = RuleStreamClient::new(self.channel().await);
        let (tx, rx) = mpsc::channel(8);
        tx.send(AgentMessage {
            message: Some(agent_message::Message::Hello(Hello {
                node_name: node.into(),
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
        Agent { tx, inbound }
    }

    async fn drain(&self, address: &str, wait_seconds: u32) -> DrainStatusResponse {
        self.inspect()
            .await
            .drain_status(DrainStatusRequest {
                address: address.into(),
                wait_seconds,
            })
            .await
            .unwrap()
            .into_inner()
    }

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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    inbound: Streaming<ControllerMessage>,
}

impl Agent {
    async fn next(&mut self) -> Change {
        let msg = tokio::time::timeout(WAIT, self.inbound.message())
            .await
            .expect("no change within 5 s")
            .unwrap()
            .expect("stream ended");
        match msg.message {
            Some(controller_message::Message::Change(c)) => c,
            other => panic!("expected a change, got {other:?}"),
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

    /// Receives the next change and acknowledges it.
    async fn apply(&mut self) -> Change {
        let c = self.next().await;
        self.ack(&c).await;
        c
    }
}

fn states(r: &DrainStatusResponse) -> Vec<(String, DrainState)> {
    r.nodes
        .iter()
        .map(|n| (n.node.clone(), n.state()))
        .collect()
}

fn node<'a>(r: &'a DrainStatusResponse, name: &str) -> &'a NodeDrain {
    r.nodes
        .iter()
        .find(|n| n.node == name)
        .unwrap_or_else(|| panic!("{name} not in {r:?}"))
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The histogram's `_count`.
fn programming_count(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("kubenft_controller_network_programming_duration_seconds_count ")
        })
        .unwrap_or_else(|| panic!("no programming histogram in {metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits until ListNodes shows `node` SYNCED with what it acknowledged (the stream's messages
/// are handled asynchronously).
async fn synced(ctl: &Controller, name: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = ctl
            .inspect()
            .await
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner();
        if list
            .nodes
            .iter()
            .any(|n| n.name == name && n.acked_version == n.desired_version)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never synced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pod goes away: the gate waits until the last node that sent to it acknowledged the
/// version without it (a waiting call answers then, not before), names the version each node
/// needs meanwhile, and the change is recorded with both nodes, its trigger time and one
/// histogram observation. A node whose agent is gone is reported, not waited for past the
/// call's wait; an address no node ever had is done at once.
#[tokio::test]
async fn the_gate_opens_when_the_last_node_acknowledges_and_the_change_is_recorded() {
    let ctl = Controller::start(&web(&[("10.244.1.5", "a"), ("10.244.2.6", "b")], None)).await;
    let (mut a, mut b) = (ctl.agent("a").await, ctl.agent("b").await);
    a.apply().await;
    b.apply().await;
    synced(&ctl, "a").await;
    synced(&ctl, "b").await;

    // Both nodes send to 10.244.1.5; the address is still an endpoint: nothing to name yet.
    let r = ctl.drain("10.244.1.5", 0).await;
    assert!(!r.done, "{r:?}");
    assert_eq!(
        states(&r),
        [
            ("a".into(), DrainState::DrainPending),
            ("b".into(), DrainState::DrainPending)
        ]
    );
    assert!(node(&r, "a").needed_version.is_empty(), "{r:?}");
    assert!(!node(&r, "a").acked_version.is_empty(), "{r:?}");
    // An address no rule set ever had: done at once, every node listed as such.
    let r = ctl.drain("10.244.9.9", 30).await;
    assert!(r.done, "{r:?}");
    assert!(r.nodes.iter().all(|n| n.state() == DrainState::DrainDone));
    let before = programming_count(&ctl.metrics().await);

    // The pod is deleted: its endpoint leaves the slice (which carries a trigger time).
    write(
        &ctl.dir,
        "web.yaml",
        &web(&[("10.244.2.6", "b")], Some(TRIGGER)),
    );
    let change_a = a.next().await;
    let change_b = b.next().await;
    let waiting = {
        let ctl_grpc = ctl.inspect().await;
        tokio::spawn(async move {
            let mut client = ctl_grpc;
            client
                .drain_status(DrainStatusRequest {
                    address: "10.244.1.5".into(),
                    wait_seconds: 30,
                })
                .await
                .unwrap()
                .into_inner()
        })
    };
    a.ack(&change_a).await;
    synced(&ctl, "a").await;
    // a is done, b still holds a version with the address: pending, naming the one it needs.
    let r = ctl.drain("10.244.1.5", 0).await;
    assert_eq!(node(&r, "a").state(), DrainState::DrainDone, "{r:?}");
    let pending = node(&r, "b");
    assert_eq!(pending.state(), DrainState::DrainPending, "{r:?}");
    assert_eq!(pending.needed_version, change_b.system_version, "{r:?}");
    assert_ne!(pending.acked_version, pending.needed_version);
    assert!(
        !waiting.is_finished(),
        "the gate opened before b acknowledged"
    );
    let acked_from = unix_ms();
    b.ack(&change_b).await;
    let r = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the waiting gate never opened")
        .unwrap();
    assert!(r.done, "{r:?}");
    assert_eq!(
        states(&r),
        [
            ("a".into(), DrainState::DrainDone),
            ("b".into(), DrainState::DrainDone)
        ]
    );
    assert_eq!(node(&r, "b").acked_version, change_b.system_version);

    // The change: both nodes, both acknowledged, from the slice's trigger time; one more
    // observation in the histogram, and the node's own figure in ListNodes.
    let changes = ctl
        .inspect()
        .await
        .list_changes(ListChangesRequest {})
        .await
        .unwrap()
        .into_inner()
        .changes;
    let last = &changes[0];
    assert_eq!(last.trigger_unix_ms, TRIGGER_MS, "{last:?}");
    assert_eq!(
        (last.nodes, last.acked, last.done),
        (2, 2, true),
        "{last:?}"
    );
    assert!(last.pending_nodes.is_empty());
    assert!(["a", "b"].contains(&last.slowest_node.as_str()), "{last:?}");
    // From the trigger time to b's acknowledgement, which came between these two instants.
    let (lo, hi) = (
        u64::try_from(acked_from - TRIGGER_MS).unwrap(),
        u64::try_from(unix_ms() - TRIGGER_MS).unwrap(),
    );
    assert!(
        (lo..=hi).contains(&last.duration_ms),
        "{} not in {lo}..={hi}",
        last.duration_ms
    );
    assert!(last.planned_unix_ms > TRIGGER_MS, "{last:?}");
    // The first view planned the nodes' first rule sets, without a trigger time.
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(changes[1].trigger_unix_ms, 0, "{changes:?}");
    assert!(changes[1].done && changes[1].nodes == 2, "{changes:?}");
    assert_eq!(programming_count(&ctl.metrics().await), before + 1);
    let list = ctl
        .inspect()
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    for n in &list.nodes {
        assert_eq!(n.last_change_revision, last.revision, "{n:?}");
    }

    // b's agent goes away holding 10.244.2.6; a gets a version without it and acknowledges.
    drop(b);
    write(
        &ctl.dir,
        "web.yaml",
        &web(&[("10.244.3.7", "c")], Some(TRIGGER)),
    );
    a.apply().await;
    let r = ctl.drain("10.244.2.6", 1).await;
    assert!(!r.done, "{r:?}");
    assert_eq!(node(&r, "a").state(), DrainState::DrainDone, "{r:?}");
    let gone = node(&r, "b");
    assert_eq!(gone.state(), DrainState::DrainNotConnected, "{r:?}");
    assert!(!gone.connected);
    assert!(r.waited_ms >= 900, "answered before its wait ended: {r:?}");
    // The change is pending on b, which is named.
    let changes = ctl
        .inspect()
        .await
        .list_changes(ListChangesRequest {})
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert_eq!(
        (changes[0].done, changes[0].pending_nodes.clone()),
        (false, vec!["b".to_string()])
    );
    ctl.stop().await;
}

/// The wait ends before the caller's deadline, with an answer (not DEADLINE_EXCEEDED); a bad
/// address is refused naming the field.
#[tokio::test]
async fn the_wait_is_bounded_by_the_callers_deadline_and_bad_addresses_are_refused() {
    let ctl = Controller::start(&web(&[("10.244.1.5", "a")], None)).await;
    let mut a = ctl.agent("a").await;
    a.apply().await;
    synced(&ctl, "a").await;
    let mut request = tonic::Request::new(DrainStatusRequest {
        address: "10.244.1.5".into(),
        wait_seconds: 600,
    });
    request.set_timeout(Duration::from_millis(1500));
    let r = ctl
        .inspect()
        .await
        .drain_status(request)
        .await
        .expect("an answer before the deadline")
        .into_inner();
    assert!(!r.done && r.waited_ms < 1500, "{r:?}");
    assert_eq!(node(&r, "a").state(), DrainState::DrainPending);
    for bad in ["", "10.244.1", "pod-a"] {
        let e = ctl
            .inspect()
            .await
            .drain_status(DrainStatusRequest {
                address: bad.into(),
                wait_seconds: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
        assert!(e.message().contains("address"), "{bad:?}: {e}");
    }
    // IPv6 written any way is the same address.
    let r = ctl.drain("fd00:0::1", 0).await;
    assert_eq!(r.address, "fd00::1");
    ctl.stop().await;
}

fn drain_wait(controllers: &[String], address: &str, timeout: &str) -> DrainWaitArgs {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: DrainWaitArgs,
    }
    let mut argv = vec!["drain-wait".to_string()];
    for c in controllers {
        argv.extend(["--controller".into(), c.clone()]);
    }
    argv.extend(["--address", address, "--timeout", timeout, "--insecure"].map(String::from));
    <Cli as clap::Parser>::try_parse_from(argv).unwrap().args
}

/// The preStop helper: 0 once drained (waiting for the acknowledgement that drains it), 1
/// naming the node still pending at the timeout, 3 when no controller answers.
#[tokio::test]
async fn drain_wait_exits_by_what_the_gate_says() {
    let ctl = Controller::start(&web(&[("10.244.1.5", "a"), ("10.244.2.6", "a")], None)).await;
    let (mut a, mut b) = (ctl.agent("a").await, ctl.agent("b").await);
    a.apply().await;
    b.apply().await;
    synced(&ctl, "a").await;
    synced(&ctl, "b").await;
    let url = vec![format!("http://{}", ctl.grpc)];
    let (code, line) = run(drain_wait(&url, "10.244.1.5", "1s")).await;
    assert_eq!(code, NOT_DRAINED, "{line}");
    assert!(
        line.contains("a (pending: still an endpoint), b (pending: still an endpoint)"),
        "{line}"
    );

    write(&ctl.dir, "web.yaml", &web(&[("10.244.2.6", "a")], None));
    let change = a.next().await;
    b.apply().await;
    let waiting = tokio::spawn(run(drain_wait(&url, "10.244.1.5", "20s")));
    let r = ctl.drain("10.244.1.5", 0).await;
    assert_eq!(node(&r, "a").state(), DrainState::DrainPending, "{r:?}");
    a.ack(&change).await;
    let (code, line) = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert_eq!(code, DRAINED, "{line}");

    let nobody = vec![format!("http://{}", free_port())];
    let (code, line) = run(drain_wait(&nobody, "10.244.1.5", "1s")).await;
    assert_eq!(code, NO_ANSWER, "{line}");
    assert!(line.contains("no controller answered"), "{line}");
    ctl.stop().await;
}
