//! Bounded resources on the controller's ports, against the real binary on loopback: idle
//! connections are closed after the handshake timeout and the descriptors they held come
//! back; out-of-bounds and oversized messages are refused; a slowloris client on the HTTP port
//! is closed; streams that hold the slots for large changes without acknowledging lose them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kubenft_proto::v1::{
    Ack, AgentMessage, Change, ControllerMessage, Hello, Inventory, ListNodesRequest,
    ResourceVersion, SyncState, agent_message, controller_inspect_client::ControllerInspectClient,
    controller_message, rule_stream_client::RuleStreamClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

/// The controller's handshake timeout (plaintext: first bytes), as built.
const HANDSHAKE_TIMEOUT: Duration = kubenft_controller::GRPC_HANDSHAKE_TIMEOUT;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn service(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec:\n  clusterIP: 10.96.{}.{}\n  ports: [{{name: http, port: 80}}]\n---\n",
        i / 250,
        i % 250 + 1
    )
}

/// The controller binary with `services` Services, in plaintext, killed on drop.
struct Controller {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    dir: PathBuf,
}

impl Controller {
    fn start(name: &str, services: usize, env: &[(&str, &str)]) -> Controller {
        let dir =
            std::env::temp_dir().join(format!("kubenft-bounds-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("svc.yaml"),
            (0..services).map(service).collect::<String>(),
        )
        .unwrap();
        let (http, grpc) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubenft-controller"));
        cmd.arg(format!("--source=dir:{}", dir.display()))
            .args(["--grpc-listen", &grpc.to_string()])
            .args(["--http-listen", &http.to_string()])
            .arg("--insecure")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let c = Controller {
            child,
            grpc,
            http,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.get("/readyz").is_some_and(|t| t.contains(" 200 ")) {
            assert!(Instant::now() < deadline, "controller never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    /// The response to `GET path`, if any.
    fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.http, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    }

    /// A counter's value on `/metrics` (0 when absent), by its name without the prefix.
    fn counter(&self, name: &str) -> u64 {
        let text = self.get("/metrics").unwrap_or_default();
        let line_start = format!("kubenft_controller_{name}");
        text.lines()
            .find(|l| l.starts_with(&line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// The process's peak resident memory, in kB.
    fn peak_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    async fn open(&self, hello: Hello) -> Result<Agent, tonic::Status> {
        let mut client = RuleStreamClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
            .max_encoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(8);
        tx.send(AgentMessage {
            message: Some(agent_message::Message::Hello(hello)),
        })
        .await
        .unwrap();
        let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        // A refused Hello may also come as the stream's status.
        let first = tokio::time::timeout(Duration::from_millis(300), inbound.message()).await;
        let first = match first {
            Ok(Err(status)) => return Err(status),
            Ok(Ok(m)) => m,
            Err(_) => None,
        };
        Ok(Agent { tx, inbound, first })
    }

    async fn node_state(&self, node: &str) -> Option<SyncState> {
        let mut client = ControllerInspectClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap();
        let nodes = client
            .list_nodes(ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        let n = nodes.into_iter().find(|n| n.name == node)?;
        SyncState::try_from(n.state).ok()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn hello(node: &str) -> Hello {
    Hello {
        node_name: node.into(),
        addresses: vec!["10.0.0.1".into()],
        applied: vec![],
        agent_version: "test".into(),
        system_version: String::new(),
        applied_on_request: false,
        protocol_version: kubenft_proto::release::PROTOCOL_VERSION,
    }
}

struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    inbound: Streaming<ControllerMessage>,
    first: Option<ControllerMessage>,
}

impl Agent {
    /// The next whole change (its parts joined), within `wait`.
    async fn change(&mut self, wait: Duration) -> Change {
        let deadline = tokio::time::Instant::now() + wait;
        let mut whole: Option<Change> = None;
        loop {
            let msg = match self.first.take() {
                Some(m) => m,
                None => tokio::time::timeout_at(deadline, self.inbound.message())
                    .await
                    .expect("no change in time")
                    .expect("stream failed")
                    .expect("stream ended"),
            };
            let Some(controller_message::Message::Change(part)) = msg.message else {
                continue;
            };
            let continued = part.continued;
            match &mut whole {
                None => whole = Some(part),
                Some(w) => w.resources.extend(part.resources),
            }
            if !continued {
                return whole.unwrap();
            }
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
}

/// 2,000 connections that never send a byte are closed within the handshake timeout, the
/// controller's descriptors stay within what they need and come back down, and an agent is
/// served as before. Without the first-bytes timeout the connections stay open forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_their_descriptors_come_back() {
    let mut c = Controller::start("idle", 1, &[]);
    let baseline = c.fds();
    let idle: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect(c.grpc).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = c.fds();
    // Each accepted connection is one descriptor, nothing more.
    assert!(
        during <= baseline + 2000 + 50,
        "{during} descriptors with 2,000 idle connections (baseline {baseline})"
    );
    tokio::time::sleep(HANDSHAKE_TIMEOUT + Duration::from_secs(3)).await;
    let after = c.fds();
    let open = idle
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            matches!((&**s).read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    assert_eq!(
        open, 0,
        "idle connections still open after the handshake timeout"
    );
    assert!(
        after <= baseline + 20,
        "{after} descriptors after the idle connections were closed (baseline {baseline})"
    );
    assert!(c.counter("stream_refused_total{reason=\"handshake_timeout\"}") >= 2000);
    drop(idle);
    // An agent is served: its first change and the next one.
    let mut agent = c.open(hello("a")).await.unwrap();
    let first = agent.change(Duration::from_secs(5)).await;
    agent.ack(&first).await;
    std::fs::write(c.dir.join("more.yaml"), service(7)).unwrap();
    let next = agent.change(Duration::from_secs(10)).await;
    assert!(
        next.resources.iter().any(|r| r.name.contains("s7")),
        "{next:?}"
    );
    agent.ack(&next).await;
    assert!(c.alive());
}

/// A Hello or Inventory beyond its bounds closes the stream with INVALID_ARGUMENT naming the
/// field; a
/// 100 MB message is refused from its length alone (the controller never holds it); garbage
/// bytes are refused; and the controller serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_out_of_bounds_messages_are_refused() {
    let mut c = Controller::start("hello", 1, &[]);
    let cases: Vec<(Hello, &str)> = vec![
        (
            Hello {
                addresses: (0..300_000)
                    .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
                    .collect(),
                ..hello("a")
            },
            "Hello.addresses",
        ),
        (
            Hello {
                addresses: vec!["not-an-ip".into()],
                ..hello("a")
            },
            "Hello.addresses",
        ),
        (
            Hello {
                node_name: "n".repeat(3_900_000),
                ..hello("a")
            },
            "Hello.node_name",
        ),
        (
            Hello {
                agent_version: "v".repeat(1000),
                ..hello("a")
            },
            "Hello.agent_version",
        ),
    ];
    for (h, field) in cases {
        let status = c.open(h).await.err().expect("accepted");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    assert_eq!(c.node_state("a").await, None, "something was stored");

    let status = c
        .open(Hello {
            node_name: "n".repeat(100 << 20),
            ..hello("a")
        })
        .await
        .err()
        .expect("a 100 MB Hello was accepted");
    assert_ne!(status.code(), Code::Ok);
    let peak = c.peak_kb();
    assert!(
        peak < 100 * 1024,
        "peak resident memory {peak} kB: the message was read"
    );

    let mut garbage = TcpStream::connect(c.grpc).unwrap();
    garbage
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = garbage.write_all(&[0x17u8; 4096]);
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match garbage.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "garbage kept open"
    );

    // An Inventory beyond its bounds (asked of an agent that lists what it holds on
    // request) closes the stream too.
    let mut agent = c
        .open(Hello {
            system_version: "stale".into(),
            applied_on_request: true,
            ..hello("a")
        })
        .await
        .unwrap();
    let asked = match agent.first.take() {
        Some(m) => m,
        None => agent.inbound.message().await.unwrap().unwrap(),
    };
    assert!(
        matches!(
            asked.message,
            Some(controller_message::Message::InventoryRequest(_))
        ),
        "{asked:?}"
    );
    agent
        .tx
        .send(AgentMessage {
            message: Some(agent_message::Message::Inventory(Inventory {
                applied: vec![ResourceVersion {
                    name: "x".repeat(10_000),
                    version: "1".into(),
                }],
                system_version: "stale".into(),
            })),
        })
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), agent.inbound.message())
        .await
        .unwrap()
        .expect_err("an out-of-bounds Inventory was taken");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("Inventory.applied.name"),
        "{status:?}"
    );

    let mut agent = c.open(hello("a")).await.unwrap();
    let change = agent.change(Duration::from_secs(5)).await;
    agent.ack(&change).await;
    assert!(c.alive());
}

/// A client that sends its request's headers a byte at a time is closed within the header
/// read timeout (5 s), and a request with a body is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_on_the_http_port_is_closed() {
    let c = Controller::start("slow", 1, &[]);
    let mut slow = TcpStream::connect(c.http).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let closed = loop {
        std::thread::sleep(Duration::from_millis(500));
        if slow.write_all(b"X").is_err() {
            break started.elapsed();
        }
        // A closed connection shows as EOF or an error on read.
        slow.set_nonblocking(true).unwrap();
        let r = slow.read(&mut [0u8; 256]);
        slow.set_nonblocking(false).unwrap();
        match r {
            Ok(_) => break started.elapsed(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break started.elapsed(),
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "slowloris kept open"
        );
    };
    assert!(closed < Duration::from_secs(9), "closed after {closed:?}");

    let mut s = TcpStream::connect(c.http).unwrap();
    s.write_all(
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(c.get("/healthz").is_some_and(|t| t.contains(" 200 ")));
}

/// Seventeen streams that say Hello, are sent a large change (the first sync of 600
/// resources) and never acknowledge it hold the sixteen slots for large changes only until
/// the change's deadline (3 s here, from `KUBENFT_ACK_DEADLINE_MS`, plus 1 ms a resource):
/// meanwhile their nodes are PENDING, then their streams are closed, and an agent connecting
/// behind them gets its rules. Without the deadline it would wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_lose_their_slots_for_large_changes() {
    let c = Controller::start(
        "slots",
        600,
        &[(kubenft_controller::stream::ACK_DEADLINE_ENV, "3000")],
    );
    let mut idle = Vec::new();
    for i in 0..17 {
        idle.push(c.open(hello(&format!("idle-{i}"))).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.node_state("idle-0").await, Some(SyncState::Pending));
    let started = Instant::now();
    let mut agent = c.open(hello("a")).await.unwrap();
    let change = agent.change(Duration::from_secs(15)).await;
    assert!(
        change.resources.len() >= 600,
        "{} resources",
        change.resources.len()
    );
    agent.ack(&change).await;
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(10), "rules after {waited:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.node_state("a").await != Some(SyncState::Synced) {
        assert!(Instant::now() < deadline, "a never SYNCED");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(c.node_state("idle-0").await, Some(SyncState::Synced));
    assert!(c.counter("ack_timeouts_total") >= 1);
    // Every idle stream loses its slot in turn (the seventeenth got one only when the first
    // lost theirs).
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.counter("ack_timeouts_total") < 17 {
        assert!(Instant::now() < deadline, "idle streams kept their slots");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(idle);
}
