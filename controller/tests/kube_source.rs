//! `--source kube` end to end: the real controller library with the real `kube` client against
//! the fake API server (real HTTP list/watch), observed the way operators and agents see it:
//! the inspection API, `/readyz`, `/metrics` and an agent stream.

use std::net::SocketAddr;
use std::time::Duration;

use kubenft_controller::{Config, cli::SourceArg};
use kubenft_fake_apiserver::{FakeApiServer, Kind};
use kubenft_plan::ClusterPolicy;
use kubenft_proto::v1::{
    AgentMessage, ControllerMessage, GetNodeRulesRequest, Hello, ListNodesRequest, agent_message,
    controller_inspect_client::ControllerInspectClient, rule_stream_client::RuleStreamClient,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Every wait is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn service(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    })
}

fn slice(service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": "a"}],
    })
}

fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    })
}

/// A fake API server holding one Service with one endpoint, and node `a`.
async fn fake() -> FakeApiServer {
    let f = FakeApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    f.apply(service("web", "10.96.0.10")).unwrap();
    f.apply(slice("web", "10.244.1.10")).unwrap();
    f.apply(node("a", "192.168.50.11")).unwrap();
    f
}

struct Controller {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Controller {
    async fn start(api: &FakeApiServer) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let (grpc, http) = (free_port(), free_port());
        let config = Config {
            source: SourceArg::Kube,
            grpc_listen: grpc,
            http_listen: http,
            policy: ClusterPolicy::default(),
            kubeconfig: Some(kubeconfig),
            tls: None,
            signer: None,
        };
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            kubenft_controller::run(config, token).await.unwrap();
        });
        let c = Controller {
            grpc,
            http,
            shutdown,
            task,
            _dir: dir,
        };
        c.wait_for("the HTTP server to listen", || async {
            c.http_get("/livez").await.is_some()
        })
        .await;
        c
    }

    /// Status code and body of a GET on the controller's HTTP port.
    async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(self.http).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Some((code, body))
    }

    async fn readyz(&self) -> u16 {
        self.http_get("/readyz").await.expect("http server").0
    }

    async fn metrics(&self) -> String {
        self.http_get("/metrics").await.expect("http server").1
    }

    async fn inspect(&self) -> ControllerInspectClient<tonic::transport::Channel> {
        ControllerInspectClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("controller gRPC")
    }

    /// Resource names and their debug text for node `a`.
    async fn rules(&self) -> String {
        let rules = self
            .inspect()
            .await
            .get_node_rules(GetNodeRulesRequest { node: "a".into() })
            .await
            .unwrap()
            .into_inner();
        format!("{:?}", rules.resources)
    }

    /// Polls `check` until it holds, for at most `WAIT`.
    async fn wait_for<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until node `a`'s rules satisfy `check`.
    async fn wait_rules(&self, what: &str, check: impl Fn(&str) -> bool) {
        self.wait_for(what, || async { check(&self.rules().await) })
            .await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("controller stopped")
            .unwrap();
    }
}

const WEB: &str = "default/web/";
const DB: &str = "default/db/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_added_updated_and_deleted_reach_the_inspection() {
    let api = fake().await;
    let c = Controller::start(&api).await;
    c.wait_rules("web", |r| r.contains(WEB) && r.contains("10.244.1.10"))
        .await;
    assert_eq!(c.readyz().await, 200);
    let nodes = c
        .inspect()
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert!(nodes.iter().any(|n| n.name == "a"), "{nodes:?}");

    api.apply(slice("web", "10.244.1.11")).unwrap();
    c.wait_rules("the updated endpoint", |r| {
        r.contains("10.244.1.11") && !r.contains("10.244.1.10")
    })
    .await;
    api.apply(service("db", "10.96.0.20")).unwrap();
    api.apply(slice("db", "10.244.2.20")).unwrap();
    c.wait_rules("db added", |r| r.contains(DB) && r.contains("10.244.2.20"))
        .await;
    assert!(api.delete(Kind::Service, "default", "web"));
    c.wait_rules("web deleted", |r| !r.contains(WEB) && r.contains(DB))
        .await;

    let m = c.metrics().await;
    for want in [
        r#"kubenft_controller_source_events_total{kind="Service",event="delete"} 1"#,
        r#"kubenft_controller_source_events_total{kind="EndpointSlice",event="init_done"}"#,
        r#"kubenft_controller_node_lag_seconds{node="a"} 0"#,
    ] {
        assert!(m.contains(want), "{want} not in\n{m}");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_served_until_every_list_is_complete() {
    let api = fake().await;
    api.fail_kind(Kind::EndpointSlice, Some(500));
    let c = Controller::start(&api).await;
    let (_hello, mut agent) = connect_agent(c.grpc).await;
    // Services and Nodes list fine; without EndpointSlices the view is incomplete.
    c.wait_for("Services and Nodes listed", || async {
        api.list_count(Kind::Service) > 0 && api.list_count(Kind::Node) > 0
    })
    .await;
    assert_eq!(c.readyz().await, 503);
    let early = tokio::time::timeout(Duration::from_millis(1500), agent.message()).await;
    assert!(early.is_err(), "agent got something before sync: {early:?}");
    assert_eq!(c.readyz().await, 503);
    let m = c.metrics().await;
    assert!(
        m.contains(r#"kubenft_controller_source_errors_total{kind="EndpointSlice"}"#),
        "{m}"
    );
    // The failure is reported, not only counted.
    assert!(m.contains("kubenft_controller_source_healthy 0"), "{m}");
    let (_, why) = c.http_get("/readyz").await.unwrap();
    assert!(why.contains("EndpointSlice watch failing"), "{why}");

    api.fail_kind(Kind::EndpointSlice, None);
    let first = tokio::time::timeout(WAIT, agent.message())
        .await
        .expect("a change once synced")
        .unwrap()
        .expect("stream open");
    assert!(format!("{first:?}").contains("10.244.1.10"), "{first:?}");
    assert_eq!(c.readyz().await, 200);
    assert!(
        c.metrics()
            .await
            .contains("kubenft_controller_source_healthy 1")
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_after_a_dropped_watch_still_arrive() {
    let api = fake().await;
    let c = Controller::start(&api).await;
    c.wait_rules("web", |r| r.contains(WEB)).await;
    api.drop_watches();
    api.apply(service("db", "10.96.0.20")).unwrap();
    api.apply(slice("db", "10.244.2.20")).unwrap();
    c.wait_rules("db after the drop", |r| r.contains("10.244.2.20"))
        .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_relists_and_sees_what_happened_in_the_gap() {
    let api = fake().await;
    let c = Controller::start(&api).await;
    c.wait_rules("web", |r| r.contains(WEB)).await;
    let lists = api.list_count(Kind::Service);
    // The controller misses these events entirely...
    api.stall_watches(true);
    assert!(api.delete(Kind::Service, "default", "web"));
    api.apply(service("db", "10.96.0.20")).unwrap();
    api.apply(slice("db", "10.244.2.20")).unwrap();
    // ...and the history that held them is gone: only a relist can recover.
    api.expire_history();
    api.stall_watches(false);
    c.wait_rules("the state after the gap", |r| {
        !r.contains(WEB) && r.contains("10.244.2.20")
    })
    .await;
    assert!(api.list_count(Kind::Service) > lists, "no relist");
    let m = c.metrics().await;
    assert!(
        m.contains(r#"kubenft_controller_source_errors_total{kind="Service"}"#),
        "{m}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_server_errors_are_recovered() {
    let api = fake().await;
    // The first requests (initial lists) fail.
    api.fail_next(2, 500);
    let c = Controller::start(&api).await;
    c.wait_rules("web despite failed lists", |r| r.contains(WEB))
        .await;
    // Watches restart and fail too.
    api.fail_next(2, 500);
    api.drop_watches();
    api.apply(service("db", "10.96.0.20")).unwrap();
    api.apply(slice("db", "10.244.2.20")).unwrap();
    c.wait_rules("db despite failed watches", |r| r.contains("10.244.2.20"))
        .await;
    // 429 is retried by the kube client itself.
    api.fail_next(1, 429);
    api.drop_watches();
    assert!(api.delete(Kind::Service, "default", "db"));
    c.wait_rules("db deleted despite a 429", |r| !r.contains(DB))
        .await;
    // A watch that failed is reported until it delivers again or falls silent (a few seconds).
    c.wait_for("ready again", || async { c.readyz().await == 200 })
        .await;
    c.stop().await;
}

/// An agent stream for node `a` that says hello and then only listens (the stream stays open
/// while the returned sender lives).
async fn connect_agent(
    grpc: SocketAddr,
) -> (
    mpsc::Sender<AgentMessage>,
    tonic::Streaming<ControllerMessage>,
) {
    let mut client = RuleStreamClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(AgentMessage {
        message: Some(agent_message::Message::Hello(Hello {
            node_name: "a".into(),
            addresses: vec![],
            applied: vec![],
            agent_version: "test".into(),
            system_version: String::new(),
            applied_on_request: false,
            protocol_version: kubenft_proto::release::PROTOCOL_VERSION,
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

/// A refused Service becomes one Warning Event on it (what `kubectl describe` shows), and
/// is not said again on every round while the refusal lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_object_gets_one_warning_event() {
    let api = fake().await;
    let mut bad = service("bad", "10.96.0.11");
    bad["spec"]["type"] = json!("NodePort");
    bad["spec"]["ports"][0]["nodePort"] = json!(80);
    api.apply(bad).unwrap();
    let c = Controller::start(&api).await;
    let about_bad =
        |e: &Value| e["regarding"]["name"] == "bad" && e["regarding"]["kind"] == "Service";
    c.wait_for("an Event on default/bad", || async {
        api.list(Kind::Event).iter().any(about_bad)
    })
    .await;
    let events: Vec<Value> = api
        .list(Kind::Event)
        .into_iter()
        .filter(about_bad)
        .collect();
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e["metadata"]["namespace"], "default", "{e}");
    assert_eq!(e["type"], "Warning", "{e}");
    assert_eq!(e["reason"], "Rejected", "{e}");
    assert_eq!(e["reportingController"], "kubenft.io/controller", "{e}");
    let note = e["note"].as_str().unwrap_or_default();
    assert!(note.starts_with("spec.ports[0].nodePort: "), "{e}");
    // Two more rounds: still one Event, and the good Service got none.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let all = api.list(Kind::Event);
    assert_eq!(all.iter().filter(|e| about_bad(e)).count(), 1, "{all:#?}");
    assert!(
        all.iter().all(|e| e["regarding"]["name"] != "web"),
        "{all:#?}"
    );
    c.stop().await;
}
