//! The agent's memory at 10,000 Services: the real `kubenft-agent` binary in a namespace,
//! against a tiny fake controller (this binary's hidden `fake-controller` subcommand, in the
//! same namespace) that sends the whole rule set and reports the ACK.
//!
//! The fake controller sends the rule set as one Change, as the real controller does. If the
//! agent cannot take it (it reconnects instead of answering), the run is repeated with the
//! rule set split into Changes of `CHUNK` resources, and the table says so.

use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use kubenft_proto::v1::{
    self, AgentMessage, ControllerMessage, agent_message, controller_message,
    rule_stream_server::{RuleStream, RuleStreamServer},
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::agent_apply::{NODE_IP, NODES};
use crate::netns::Netns;
use crate::report::{Table, mib, secs};
use crate::workload::{self, Workload};

const CHUNK: usize = 2_000;
const CONTROLLER: &str = "127.0.0.1:9650";

/// The fake controller: every stream gets the rule set, in Changes of at most `chunk` resources,
/// each sent after the previous one's ACK. Prints `hello`, `acked <ms>`, `nacked <error>`.
struct OneShot {
    changes: Arc<Vec<v1::Change>>,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl RuleStream for OneShot {
    type StreamStream = Outbound;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Outbound>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(feed(self.changes.clone(), inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn feed(
    changes: Arc<Vec<v1::Change>>,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<ControllerMessage, Status>>,
) {
    if !matches!(inbound.message().await, Ok(Some(_))) {
        return;
    }
    println!("hello");
    let started = Instant::now();
    for change in changes.iter() {
        let msg = ControllerMessage {
            message: Some(controller_message::Message::Change(change.clone())),
        };
        if tx.send(Ok(msg)).await.is_err() {
            return;
        }
        // The agent also reports its data plane's state (DataplaneStatus) whenever it
        // changes: only an Ack or a Nack answers the change.
        loop {
            match inbound.message().await {
                Ok(Some(AgentMessage {
                    message: Some(agent_message::Message::Ack(_)),
                })) => break,
                Ok(Some(AgentMessage {
                    message: Some(agent_message::Message::Nack(n)),
                })) => {
                    println!("nacked {}", n.error.replace('\n', " "));
                    return;
                }
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    }
    println!("acked {}", started.elapsed().as_millis());
    // Keep the stream open until the agent goes away.
    while let Ok(Some(_)) = inbound.message().await {}
}

/// The rule set for `services` Services, split into Changes of at most `chunk` resources.
fn changes(services: u32, chunk: usize) -> Vec<v1::Change> {
    let full = workload::full_change(Workload::new(services, NODES).all(), 0, NODE_IP);
    let chunk = if chunk == 0 {
        full.resources.len()
    } else {
        chunk
    };
    full.resources
        .chunks(chunk.max(1))
        .zip(1u64..)
        .map(|(part, id)| v1::Change {
            trigger_times: Vec::new(),
            change_id: id,
            system_version: String::new(),
            resources: part.to_vec(),
            removed: Vec::new(),
            continued: false,
        })
        .collect()
}

/// Serves the fake controller until killed (the `fake-controller` subcommand).
pub async fn serve(
    listen: std::net::SocketAddr,
    services: u32,
    chunk: usize,
) -> anyhow::Result<()> {
    let changes = Arc::new(changes(services, chunk));
    let bytes: usize = changes.iter().map(prost::Message::encoded_len).sum();
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening {bytes}");
    tonic::transport::Server::builder()
        .add_service(RuleStreamServer::new(OneShot { changes }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}

/// What one run observed.
struct RssRun {
    acked: Option<Duration>,
    failure: Option<String>,
    rss: Option<(u64, u64)>,
    bytes: u64,
}

/// Runs the agent against the fake controller once.
async fn run_once(
    agent_bin: &Path,
    services: u32,
    chunk: usize,
    malloc_arenas: Option<&str>,
) -> anyhow::Result<RssRun> {
    let ns = Netns::create("r")?;
    let state_dir = std::env::temp_dir().join(format!("{}state", crate::netns::prefix()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let self_bin = std::env::current_exe()?;
    let mut fake = ns
        .tokio_command(&self_bin.to_string_lossy())
        .args(["fake-controller", "--listen", CONTROLLER])
        .args([
            "--services",
            &services.to_string(),
            "--chunk",
            &chunk.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(fake.stdout.take().expect("piped")).lines();
    let first = next_line(&mut lines, Duration::from_secs(60)).await?;
    let bytes = first
        .strip_prefix("listening ")
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    let log_path =
        std::env::temp_dir().join(format!("{}agent-{chunk}.log", crate::netns::prefix()));
    let log = std::fs::File::create(&log_path)?;
    let mut agent = ns
        .tokio_command(&agent_bin.to_string_lossy())
        .args([
            "--node-name",
            "node-0",
            "--controller",
            &format!("http://{CONTROLLER}"),
            // The fake controller speaks plaintext; TLS costs are not what this measures.
            "--insecure",
        ])
        .args([
            "--healthz-listen",
            "127.0.0.1:10256",
            "--metrics-listen",
            "127.0.0.1:10249",
        ])
        .args(["--grpc-listen", "127.0.0.1:9652", "--state-dir"])
        .arg(&state_dir)
        .env("RUST_LOG", "warn")
        .envs(malloc_arenas.map(|n| ("MALLOC_ARENA_MAX", n)))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = agent.id().unwrap_or(0);
    let result = watch_agent(&mut lines).await;
    let mut run = RssRun {
        acked: None,
        failure: None,
        rss: None,
        bytes,
    };
    match result {
        Ok(elapsed) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            run.acked = Some(elapsed);
            run.rss = crate::report::process_memory(pid);
        }
        Err(e) => run.failure = Some(format!("{e}; agent log: {}", last_warning(&log_path))),
    }
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    let _ = fake.start_kill();
    let _ = fake.wait().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    let _ = std::fs::remove_file(&log_path);
    Ok(run)
}

/// The agent's last warning or error, without the timestamp.
fn last_warning(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("WARN") || l.contains("ERROR"))
        .unwrap_or("(nothing)");
    let line = line
        .split_once("WARN")
        .or_else(|| line.split_once("ERROR"))
        .map_or(line, |(_, rest)| rest);
    line.trim().chars().take(240).collect()
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

async fn next_line(lines: &mut Lines, wait: Duration) -> anyhow::Result<String> {
    match tokio::time::timeout(wait, lines.next_line()).await {
        Ok(Ok(Some(line))) => Ok(line),
        Ok(Ok(None)) => anyhow::bail!("fake controller exited"),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => anyhow::bail!("nothing from the fake controller within {wait:?}"),
    }
}

/// Waits for the ACK of the whole rule set; a second Hello means the agent dropped the stream.
async fn watch_agent(lines: &mut Lines) -> anyhow::Result<Duration> {
    let mut hellos = 0;
    for _ in 0..10 {
        let line = next_line(lines, Duration::from_secs(300)).await?;
        if line == "hello" {
            hellos += 1;
            if hellos > 1 {
                anyhow::bail!("the agent reconnected instead of answering the change");
            }
        } else if let Some(ms) = line.strip_prefix("acked ") {
            return Ok(Duration::from_millis(ms.parse().unwrap_or(0)));
        } else if let Some(err) = line.strip_prefix("nacked ") {
            anyhow::bail!("the agent refused the change: {err}");
        }
    }
    anyhow::bail!("no ACK")
}

/// Measures the agent's RSS at `services` Services and returns the table.
pub async fn run(agent_bin: &Path, services: u32) -> anyhow::Result<Table> {
    let mut table = Table::new(
        "Suite 1 — agent memory (real kubenft-agent, fake controller, real nft)",
        &[
            "Services",
            "rule set sent as",
            "encoded size",
            "Hello → ACK",
            "agent VmRSS after ACK",
            "agent VmHWM (peak)",
            "target",
        ],
    );
    let one = run_once(agent_bin, services, 0, None).await?;
    let chunk = if one.failure.is_some() { CHUNK } else { 0 };
    let mut runs = vec![("1 Change".to_owned(), one)];
    let how = |extra: &str| {
        if chunk == 0 {
            format!("1 Change{extra}")
        } else {
            format!("Changes of {CHUNK} resources{extra}")
        }
    };
    if chunk != 0 {
        runs.push((how(""), run_once(agent_bin, services, chunk, None).await?));
    }
    // Diagnostic: how much of the RSS is glibc keeping freed memory in per-thread arenas.
    runs.push((
        how(", MALLOC_ARENA_MAX=1 (diagnostic)"),
        run_once(agent_bin, services, chunk, Some("1")).await?,
    ));
    for (how, r) in runs {
        let (rss, hwm) = r
            .rss
            .map_or(("—".into(), "—".into()), |(a, b)| (mib(a), mib(b)));
        let target = match r.rss {
            Some((rss, _)) if rss <= 64 << 20 => "≤ 64 MiB: met".to_owned(),
            Some(_) => "≤ 64 MiB: missed".to_owned(),
            None => "not measured".to_owned(),
        };
        table.row(vec![
            services.to_string(),
            how,
            mib(r.bytes),
            r.acked.map_or_else(
                || format!("failed: {}", r.failure.unwrap_or_default()),
                secs,
            ),
            rss,
            hwm,
            target,
        ]);
    }
    table.note("VmRSS/VmHWM are the agent process's own (from /proc/<pid>/status, read 2 s after the ACK); the nft child process's memory is separate (see the peak RSS of nft in the details table).");
    Ok(table)
}
