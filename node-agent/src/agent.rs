//! Wiring: serves `/healthz` and `/livez`, waits to hold the node (see [`crate::lock`]),
//! recovers the applied state, then runs the controller client and the other servers as tasks
//! under one cancellation token until shutdown. Also `--cleanup`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::applier::{self, Applier};
use crate::drift;
use crate::hcport::HealthCheckPorts;
use crate::health::Health;
use crate::http;
use crate::inspect::{self, Inspect};
use crate::lock::{self, Acquired};
use crate::metrics::Metrics;
use crate::migrate;
use crate::nft::monitor;
use crate::nft::{Command, Nft, NftError, TableName, Transaction};
use crate::state::{self, StateFileError};
use crate::stream::{self, StreamConfig};
use kubenft_nft::rules::Family;

/// What the agent runs with (resolved from the command line).
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub controllers: Vec<String>,
    pub healthz_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    pub state_dir: PathBuf,
    pub table: TableName,
    /// `--livez-grace`.
    pub livez_grace: std::time::Duration,
    /// TLS towards the controllers and on the inspection port (`None`: `--insecure`).
    pub tls: Option<crate::cli::AgentTls>,
    /// `--cert-dir`: the certificate in `tls` is obtained and renewed through the API server.
    pub cert_dir: Option<crate::certs::CertDir>,
    /// `--controller-service`: the controllers are found through the API server instead of
    /// `controllers`.
    pub controller_service: Option<crate::discovery::ServiceRef>,
    /// `--kubeconfig` (else `KUBECONFIG`, else in-cluster), with either of the above.
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] inspect::ServeError),
    #[error("task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("nft: {0}")]
    Nft(#[from] NftError),
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error("TLS: {0}")]
    Tls(#[from] kubenft_tls::Error),
    #[error("--cert-dir: {0}")]
    Certs(#[from] crate::certs::CertError),
    #[error("API server: {0}")]
    Api(#[from] crate::apiserver::ApiError),
}

/// Binds with `SO_REUSEPORT`, so that a second agent on the node (a standby, see
/// [`crate::lock`]) can listen on the same ports; the kernel shares them only between
/// sockets of the same user, and spreads connections over them.
async fn listen(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    bind_reuseport(addr).map_err(|source| AgentError::Listen { what, addr, source })
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves `router` on `addr` once it is free: kube-proxy holds the health and metrics
/// ports until it leaves the node (see [`migrate::ports`]), and meanwhile the agent already
/// programs the node's rules.
async fn serve_when_free(
    what: &'static str,
    addr: SocketAddr,
    router: axum::Router,
    (metrics, port): (Arc<Metrics>, &'static str),
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    let bound = migrate::ports::bind_when_free(what, addr, || bind_reuseport(addr), &cancel)
        .await
        .map_err(|source| AgentError::Listen { what, addr, source })?;
    match bound {
        Some(listener) => http::serve(listener, router, metrics, port, cancel)
            .await
            .map_err(AgentError::Http),
        None => Ok(()),
    }
}

/// Runs the agent until `cancel` fires (or a server fails). The tables are left in place.
pub async fn run<N: Nft>(cfg: Config, nft: N, cancel: CancellationToken) -> Result<(), AgentError> {
    // Unreadable TLS files stop the start; later, changed files are re-read. An issued
    // certificate (--cert-dir) is checked once it is there, below.
    if cfg.cert_dir.is_none() {
        load_tls(&cfg)?;
    }
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::with_livez_grace(cfg.livez_grace));
    let mut tasks: JoinSet<Result<(), AgentError>> = JoinSet::new();
    let (c, m, h) = (cancel.clone(), metrics.clone(), health.clone());
    let router = http::health_router(h, m.clone());
    tasks.spawn(serve_when_free(
        "--healthz-listen",
        cfg.healthz_listen,
        router,
        (m, "healthz"),
        c,
    ));
    // A standby serves only the probes until it holds the node: metrics and inspection are
    // the holder's, and it neither connects to a controller nor touches nft.
    let _lock = match lock::acquire(&cfg.state_dir, &health, &cancel).await {
        Acquired::Held(lock) => Some(lock),
        Acquired::Unavailable => None,
        Acquired::Cancelled => return finish(tasks, &cancel).await,
    };
    let grpc = match listen("--grpc-listen", cfg.grpc_listen).await {
        Ok(g) => g,
        Err(e) => return abort(tasks, &cancel, e).await,
    };
    // The API server, for the certificate and the controllers' addresses, if used.
    let client = if cfg.controller_service.is_some() || cfg.cert_dir.is_some() {
        match crate::apiserver::client(cfg.kubeconfig.as_deref()).await {
            Ok(c) => Some(c),
            Err(e) => return abort(tasks, &cancel, e.into()).await,
        }
    } else {
        None
    };
    let controllers = match (&cfg.controller_service, &client) {
        (Some(service), Some(client)) => {
            let (controllers, task) = crate::discovery::watch_service(
                service.clone(),
                client.clone(),
                &cfg.state_dir,
                cancel.clone(),
            );
            tasks.spawn(async move { Ok(task.await?) });
            controllers
        }
        _ => crate::discovery::Controllers::fixed(cfg.controllers.clone()),
    };
    let nft = Arc::new(nft);
    let recovered = applier::recover(nft.as_ref(), &cfg.table, &cfg.state_dir).await;
    let hc_ports = Arc::new(HealthCheckPorts::new(health.clone(), cancel.clone()));
    let applier = Arc::new(
        Applier::new(
            nft.clone(),
            cfg.table.clone(),
            cfg.state_dir.clone(),
            recovered,
            metrics.clone(),
            health.clone(),
        )
        .with_health_check_ports(hc_ports),
    );
    let inspect = Inspect {
        node: cfg.node_name.clone(),
        table: cfg.table.clone(),
        state: applier.state().clone(),
        nft: nft.clone(),
        applier: applier.clone(),
    };
    tracing::info!(node = %cfg.node_name, table = %cfg.table, controllers = ?cfg.controllers, "agent starting");

    tasks.spawn(serve_when_free(
        "--metrics-listen",
        cfg.metrics_listen,
        http::metrics_router(metrics.clone()),
        (metrics.clone(), "metrics"),
        cancel.clone(),
    ));
    // Self-healing: the monitor reports other programs' changes, the drift loop repairs them.
    // Both run before the certificate is in place: the data plane does not wait for it.
    let (notices_tx, notices_rx) = tokio::sync::mpsc::unbounded_channel();
    if let Some(argv) = applier.monitor_argv() {
        let (table, own, c) = (cfg.table.clone(), applier.own_processes(), cancel.clone());
        tasks.spawn(async move {
            monitor::run(argv, table, own, notices_tx, c).await;
            Ok(())
        });
    }
    let (a, c) = (applier.clone(), cancel.clone());
    tasks.spawn(async move {
        drift::run(a, notices_rx, c).await;
        Ok(())
    });
    // Other programs' Service rules (kube-proxy's during a migration): reported, not touched.
    let (n, t, h, m, c) = (
        nft.clone(),
        cfg.table.clone(),
        health.clone(),
        metrics.clone(),
        cancel.clone(),
    );
    tasks.spawn(async move {
        migrate::detect::run(n, t, h, m, c).await;
        Ok(())
    });
    if let (Some(dir), Some(client)) = (&cfg.cert_dir, &client) {
        match certificate(dir, &cfg.node_name, client.clone(), &cancel).await {
            Ok(Some(renewal)) => {
                tasks.spawn(async move {
                    renewal.await;
                    Ok(())
                });
            }
            Ok(None) => return finish(tasks, &cancel).await,
            Err(e) => return abort(tasks, &cancel, e).await,
        }
    }
    let inspect_tls = match load_tls(&cfg) {
        Ok(t) => t,
        Err(e) => return abort(tasks, &cancel, e).await,
    };
    let (c, m) = (cancel.clone(), metrics.clone());
    tasks.spawn(async move { Ok(inspect::serve(grpc, inspect_tls, inspect, m, c).await?) });
    let stream_cfg = StreamConfig {
        controllers,
        node_name: cfg.node_name.clone(),
        tls: cfg.tls.as_ref().map(|t| t.client.clone()),
    };
    let (a, c) = (applier.clone(), cancel.clone());
    tasks.spawn(async move {
        stream::run(stream_cfg, a, metrics, c).await;
        Ok(())
    });
    // The lock is released after every task has stopped (`_lock` outlives `finish`) and the
    // last commit's state file is written, so that the next agent on the node adopts it.
    let result = finish(tasks, &cancel).await;
    flush_state_file(&applier).await;
    result
}

/// How long shutdown waits for the state file to catch up with the last commit.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for the state file, boundedly: a state disk that hangs must not hold the node (the
/// next agent then reconciles in full, as after a crash).
async fn flush_state_file<N: Nft>(applier: &Applier<N>) {
    if tokio::time::timeout(FLUSH_TIMEOUT, applier.flush_state_file())
        .await
        .is_err()
    {
        tracing::warn!(
            "the state file does not hold the last change yet: the next start reconciles in full"
        );
    }
}

/// Loads the TLS files (the inspection port's, and the client's to check them): an error
/// names the file.
fn load_tls(cfg: &Config) -> Result<Option<Arc<kubenft_tls::ServerTls>>, AgentError> {
    let Some(t) = &cfg.tls else {
        return Ok(None);
    };
    let inspect = kubenft_tls::ServerTls::load(t.inspect.clone())?;
    t.client.load()?;
    Ok(Some(inspect))
}

/// Makes sure the agent has its issued certificate, waiting for the signer if need be; the
/// task that renews it. `None` if cancelled meanwhile.
async fn certificate(
    dir: &crate::certs::CertDir,
    node: &str,
    client: kube::Client,
    cancel: &CancellationToken,
) -> Result<Option<impl std::future::Future<Output = ()> + use<>>, AgentError> {
    let certs = crate::certs::Certs::new(dir.clone(), node.to_owned(), client);
    let Some(due) = certs.ensure(cancel).await else {
        return Ok(None);
    };
    Ok(Some(certs.renew(due, cancel.clone())))
}

/// A start-up step failed: stops every task started so far, then returns `error`.
async fn abort(
    tasks: JoinSet<Result<(), AgentError>>,
    cancel: &CancellationToken,
    error: AgentError,
) -> Result<(), AgentError> {
    cancel.cancel();
    finish(tasks, cancel).await?;
    Err(error)
}

/// Waits for every task; the first to end stops the others. The first error is returned.
async fn finish(
    mut tasks: JoinSet<Result<(), AgentError>>,
    cancel: &CancellationToken,
) -> Result<(), AgentError> {
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined.map_err(AgentError::from).and_then(|r| r) {
            tracing::error!(error = %e, "stopping");
            if result.is_ok() {
                result = Err(e);
            }
        }
        // Every task runs until shutdown: one ending means everything stops.
        cancel.cancel();
    }
    tracing::info!("agent stopped; rules left in place");
    result
}

/// Deletes the agent's tables (if present) and its state file.
pub async fn cleanup<N: Nft>(
    nft: &N,
    table: &TableName,
    state_dir: &std::path::Path,
) -> Result<(), AgentError> {
    let mut tx = Transaction::new(table.clone());
    for f in Family::ALL {
        // `add` first makes `delete` succeed whether or not the table exists (nft 1.0.6 has
        // no `destroy`).
        tx.push(f, Command::AddTable);
        tx.push(f, Command::DeleteTable);
    }
    nft.apply(&tx).await?;
    state::remove(state_dir)?;
    Ok(())
}
