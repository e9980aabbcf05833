//! kubenft-controller: watches Services, EndpointSlices and Nodes, computes for every node the
//! rule set it must enforce, and streams it to that node's agent.
//!
//! ```text
//!  source (dir: / kube) ─▶ model (validate) ─▶ plan::Catalog ─▶ hub (per-node desired state)
//!                                                                 │
//!                          stream (one task per agent) ◀──────────┘──▶ inspect (grpcurl)
//! ```
#![forbid(unsafe_code)]

pub mod cli;
mod cores;
pub mod drain_wait;
pub mod events;
pub mod http;
pub mod hub;
pub mod inspect;
pub mod metrics;

pub mod signer;
pub mod skew;
pub mod source;
pub mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kubenft_proto::v1::IpFamily;
use kubenft_proto::v1::controller_inspect_server::ControllerInspectServer;
use kubenft_proto::v1::rule_stream_server::RuleStreamServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::hub::Hub;
use crate::metrics::Metrics;
use kubenft_plan::{ClusterPolicy, Inputs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--source kube: {0}")]
    Kube(#[from] source::kube::Error),
    #[error("cannot serve gRPC on {addr}: {source}")]
    Grpc {
        addr: SocketAddr,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] kubenft_tls::Error),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("signer: {0}")]
    Signer(#[from] signer::SignerError),
}

/// Everything `run` needs.
pub struct Config {
    pub source: cli::SourceArg,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub policy: ClusterPolicy,
    /// For `--source kube`: an explicit kubeconfig (else `KUBECONFIG`, `~/.kube/config`, or
    /// the in-cluster environment). Explicit so tests need not touch the process environment.
    pub kubeconfig: Option<PathBuf>,
    /// The gRPC port's certificate, key and client CA (`None`: plaintext, `--insecure`).
    pub tls: Option<kubenft_tls::ServerFiles>,
    /// The agents' certificate signer (`--signer-ca-secret`).
    pub signer: Option<signer::SignerConfig>,
}

impl From<&cli::Args> for Config {
    fn from(a: &cli::Args) -> Self {
        Config {
            source: a.source.clone(),
            grpc_listen: a.grpc_listen,
            http_listen: a.http_listen,
            kubeconfig: a.kubeconfig.clone(),
            tls: a.tls().ok().flatten(),
            signer: a.signer(),
            policy: ClusterPolicy {
                cluster_cidrs: a.cluster_cidrs.clone(),
                detect_local: a.detect_local().unwrap_or_default(),
                service_cidrs: a.service_cidrs.clone(),
                masquerade_all: a.masquerade_all,
                node_port_addresses: a.node_port_addresses.clone(),
                limits: kubenft_plan::model::Limits {
                    node_port_range: a.node_port_range.clone(),
                    service_cidrs: a.service_cidrs.clone(),
                },
            },
        }
    }
}

/// Runs the controller until `shutdown` is cancelled, then drains agent streams.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let client = match (&config.source, &config.signer) {
        (cli::SourceArg::Dir(_), None) => None,
        _ => Some(source::kube::client(config.kubeconfig.as_deref()).await?),
    };
    // The signer's CA comes first: the serving certificate it issues is the gRPC port's.
    let signer = match (&config.signer, &client) {
        (Some(cfg), Some(client)) => {
            let Some(started) = start_signer(cfg, client, &shutdown).await? else {
                return Ok(()); // shut down while waiting for the API server
            };
            Some(started)
        }
        _ => None,
    };
    // Unreadable TLS files stop the start, before anything else is started.
    let tls = config
        .tls
        .clone()
        .map(kubenft_tls::ServerTls::load)
        .transpose()?;
    let limits = config.policy.limits.clone();
    log_detect_local(&config.policy);
    let hub = Arc::new(Hub::new(config.policy));
    let metrics = Arc::new(Metrics::new());
    hub.observe_programming(metrics.network_programming.clone());
    let (inputs_tx, inputs_rx) = watch::channel::<Option<Arc<Inputs>>>(None);

    let from_api_server = matches!(config.source, cli::SourceArg::Kube);
    let source_task = match config.source {
        cli::SourceArg::Dir(dir) => tokio::spawn(source::run_dir(
            dir,
            limits,
            inputs_tx,
            metrics.clone(),
            shutdown.clone(),
        )),
        cli::SourceArg::Kube => {
            let client = client.clone().expect("made above for --source kube");
            tokio::spawn(source::kube::run_kube(
                client,
                limits,
                inputs_tx,
                metrics.clone(),
                shutdown.clone(),
            ))
        }
    };
    let planner_task = tokio::spawn(plan_on_change(
        inputs_rx,
        hub.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let mut api_tasks = tokio::task::JoinSet::new();
    // Refused objects become Events on them, when they come from the API server.
    if let (true, Some(client)) = (from_api_server, client.clone()) {
        api_tasks.spawn(events::run(client, hub.clone(), shutdown.clone()));
    }
    if let (Some(started), Some(client)) = (signer, client) {
        let lifetime = started.config.policy.max_duration;
        if let Some((serving, due)) = started.config.serving.zip(started.serving_due) {
            api_tasks.spawn(serving.renew(started.ca.clone(), lifetime, due, shutdown.clone()));
        }
        api_tasks.spawn(signer::run(
            client,
            started.ca,
            started.config.policy,
            metrics.clone(),
            shutdown.clone(),
        ));
    }

    let http = http::serve(
        config.http_listen,
        http::router(hub.clone(), metrics.clone()),
        metrics.clone(),
        shutdown.clone(),
    );
    let tls_enabled = tls.is_some();
    let sessions = TaskTracker::new();
    let grpc = serve_grpc(
        config.grpc_listen,
        tls,
        hub,
        metrics,
        sessions.clone(),
        shutdown.clone(),
    );
    info!(grpc = %config.grpc_listen, http = %config.http_listen, tls = tls_enabled, "controller started");
    let result = tokio::select! {
        r = grpc => r,
        r = http => r.map_err(|source| Error::Http { addr: config.http_listen, source }),
    };
    shutdown.cancel();
    let _ = tokio::join!(
        source_task,
        planner_task,
        api_tasks.join_all(),
        drain(sessions)
    );
    result
}

/// How long shutdown waits for agent sessions to finish (each ends at once on shutdown; only
/// one stuck sending to a dead peer could take longer).
const SESSION_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits (at most [`SESSION_DRAIN`]) for every agent session to finish.
async fn drain(sessions: TaskTracker) {
    sessions.close();
    if tokio::time::timeout(SESSION_DRAIN, sessions.wait())
        .await
        .is_err()
    {
        warn!(
            sessions = sessions.len(),
            "agent sessions still running at shutdown"
        );
    }
}

/// A signer whose CA is loaded and whose serving certificate (if any) is written.
struct StartedSigner {
    config: signer::SignerConfig,
    ca: Arc<kubenft_tls::pki::Authority>,
    /// When the serving certificate is due for renewal.
    serving_due: Option<std::time::SystemTime>,
}

/// Says at start how local traffic is recognised, and what is not used or missing for it.
fn log_detect_local(policy: &ClusterPolicy) {
    let mode = policy.detect_local.mode_name();
    match &policy.detect_local {
        kubenft_plan::policy::DetectLocal::ClusterCidr if policy.cluster_cidrs.is_empty() => {
            let both = [IpFamily::Ipv4, IpFamily::Ipv6];
            if let Some(why) = kubenft_plan::policy::missing_detector(policy, None, &both) {
                warn!("{why}");
            }
        }
        kubenft_plan::policy::DetectLocal::ClusterCidr => {
            info!(mode, cluster_cidrs = ?policy.cluster_cidrs, "local-traffic detection")
        }
        _ if !policy.cluster_cidrs.is_empty() => {
            warn!(
                mode,
                "--cluster-cidr is not used with --detect-local-mode {mode}"
            )
        }
        detector => info!(mode, detector = ?detector, "local-traffic detection"),
    }
}

/// Reads (or creates) the signer's CA, retrying while the API server cannot be reached, and
/// issues the serving certificate if the controller serves with one of its own. `None` if
/// shut down meanwhile.
async fn start_signer(
    cfg: &signer::SignerConfig,
    client: &kube::Client,
    shutdown: &CancellationToken,
) -> Result<Option<StartedSigner>, Error> {
    let mut backoff = std::time::Duration::from_millis(500);
    let ca = loop {
        match signer::authority::load_or_create(client, &cfg.ca).await {
            Ok(ca) => break Arc::new(ca),
            Err(e) => {
                warn!(error = %e, secret = %cfg.ca, retry_in_ms = backoff.as_millis() as u64, "cannot read the signer's CA");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(None),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
            }
        }
    };
    let due = match &cfg.serving {
        Some(serving) => {
            std::fs::create_dir_all(&serving.dir).map_err(|source| signer::SignerError::Write {
                path: serving.dir.clone(),
                source,
            })?;
            Some(serving.issue(&ca, cfg.policy.max_duration)?)
        }
        None => None,
    };
    Ok(Some(StartedSigner {
        config: cfg.clone(),
        ca,
        serving_due: due,
    }))
}

/// Feeds each new view of the cluster to the hub.
async fn plan_on_change(
    mut rx: watch::Receiver<Option<Arc<Inputs>>>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let inputs = rx.borrow_and_update().clone();
        if let Some(inputs) = inputs {
            let started = std::time::Instant::now();
            // Planning 10k Services for 1,000 nodes takes a good fraction of a second: on a
            // blocking thread, and without holding the hub's lock (each node's new rule set
            // is published when ready), so agents and inspection are served meanwhile.
            let (planner, planned) = (hub.clone(), inputs.clone());
            if cores::off_runtime(move || planner.set_inputs(&planned))
                .await
                .is_none()
            {
                return;
            }
            metrics.source_updates.inc();
            metrics
                .rejected_objects
                .set(i64::try_from(inputs.rejections.len()).unwrap_or(i64::MAX));
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "planned every node"
            );
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Every agent reconnects at once when a controller restarts. With the standard library's
/// backlog of 128, the accept queue overflows into SYN cookies and SYN retransmissions (a
/// second each) and, now and then, a reset connection. The kernel caps it at somaxconn.
const GRPC_BACKLOG: u32 = 8192;

/// Connections the gRPC port holds at once: every agent keeps one, the reconnect storm
/// benchmark has 1,000 and a large cluster a few thousand; with room for inspection clients.
/// Beyond it a new connection is closed at once. Each costs a descriptor and some buffers:
/// 8,192 stays well under the usual descriptor limit (1,048,576 in a container; the systemd
/// default of 524,288), so the source's reads never find the limit reached.
pub const GRPC_MAX_CONNECTIONS: usize = 8192;
/// A client has this long to complete its TLS handshake (plaintext: to send its first bytes).
pub const GRPC_HANDSHAKE_TIMEOUT: std::time::Duration = kubenft_tls::HANDSHAKE_TIMEOUT;
/// HTTP/2 pings: a connection whose peer does not answer within the timeout is closed (a
/// half-open connection after a node died). [`KEEPALIVE_ENV`], read at start, replaces both
/// (for tests).
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub const KEEPALIVE_ENV: &str = "KUBENFT_HTTP2_KEEPALIVE_MS";

/// The keepalive interval and timeout: [`KEEPALIVE_ENV`] if set, else the defaults.
fn keepalive() -> (std::time::Duration, std::time::Duration) {
    std::env::var(KEEPALIVE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
        .map_or((KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT), |d| (d, d))
}
/// Streams per connection: an agent opens one; grpcurl one per call.
const MAX_CONCURRENT_STREAMS: u32 = 16;
/// The largest message an agent sends is its Inventory (a name and version per resource it
/// holds): 64 MiB is several times that of the largest rule set benchmarked (30,000
/// Services). Hello, Ack, Nack and DataplaneStatus are small.
pub const AGENT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Inspection requests are a node and a Service name.
const INSPECT_MESSAGE_BYTES: usize = 64 * 1024;

fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As the standard library does: a restarted controller binds over TIME_WAIT connections.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Counts and logs a refused connection (at debug beyond the connection limit: a flood
/// would otherwise flood the log too).
fn refusal(
    metrics: Arc<Metrics>,
    tls: bool,
) -> impl Fn(kubenft_tls::Refusal) + Send + Sync + 'static {
    move |r| {
        metrics.refused(r.reason);
        if r.reason == "connection_limit" {
            tracing::debug!(peer = %r.peer, "refused a connection: too many open");
        } else if tls {
            warn!(peer = %r.peer, common_name = ?r.common_name, reason = r.reason, error = %r.error, "refused a connection: TLS handshake failed");
        } else {
            warn!(peer = %r.peer, reason = r.reason, error = %r.error, "refused a connection: nothing received in time");
        }
    }
}

async fn serve_grpc(
    addr: SocketAddr,
    tls: Option<Arc<kubenft_tls::ServerTls>>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    sessions: TaskTracker,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RuleStreamServer<stream::RuleStreamService>>()
        .await;
    health_reporter
        .set_serving::<ControllerInspectServer<inspect::InspectService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kubenft_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kubenft_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let streams = RuleStreamServer::new(
        stream::RuleStreamService::new(hub.clone(), metrics.clone(), shutdown.clone())
            .require_node_identity(tls.is_some())
            .track_sessions(sessions),
    );
    let listener = listen(addr, GRPC_BACKLOG).map_err(|source| Error::Listen { addr, source })?;
    let limits = kubenft_tls::Limits {
        max_connections: GRPC_MAX_CONNECTIONS,
        handshake_timeout: GRPC_HANDSHAKE_TIMEOUT,
    };
    let (keepalive_interval, keepalive_timeout) = keepalive();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(keepalive_interval))
        .http2_keepalive_timeout(Some(keepalive_timeout))
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        // tower's ConcurrencyLimit per connection: calls being answered at once (a stream
        // counts until its response starts, after its Hello).
        .concurrency_limit_per_connection(8)
        .add_service(streams.max_decoding_message_size(AGENT_MESSAGE_BYTES))
        .add_service(kubenft_tls::CallLimit::new(
            ControllerInspectServer::new(inspect::InspectService::new(hub))
                .max_decoding_message_size(INSPECT_MESSAGE_BYTES),
            inspect::CONCURRENT_CALLS,
        ))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let result = match tls {
        Some(tls) => {
            tls.watch(shutdown.clone());
            let incoming =
                kubenft_tls::incoming_with(listener, tls, limits, refusal(metrics, true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
        }
        None => {
            let incoming = kubenft_tls::plaintext(listener, limits, refusal(metrics, false));
            router
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await
        }
    };
    result.map_err(|source| {
        error!(%addr, error = %source, "gRPC server failed");
        Error::Grpc { addr, source }
    })
}
