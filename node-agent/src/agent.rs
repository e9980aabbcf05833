//! Wiring: recovers the applied state, then runs the controller client and the three servers
//! as tasks under one cancellation token until shutdown. Also `--cleanup`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::applier::{self, Applier};
use crate::hcport::HealthCheckPorts;
use crate::health::Health;
use crate::http;
use crate::inspect::{self, Inspect};
use crate::metrics::Metrics;
use crate::model::Family;
use crate::nft::{Command, Nft, NftError, TableName, Transaction};
use crate::state::{self, StateFileError};
use crate::stream::{self, StreamConfig};

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
}

async fn listen(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Listen { what, addr, source })
}

/// Runs the agent until `cancel` fires (or a server fails). The tables are left in place.
pub async fn run<N: Nft>(cfg: Config, nft: N, cancel: CancellationToken) -> Result<(), AgentError> {
    let healthz = listen("--healthz-listen", cfg.healthz_listen).await?;
    let metrics_l = listen("--metrics-listen", cfg.metrics_listen).await?;
    let grpc = listen("--grpc-listen", cfg.grpc_listen).await?;
    let nft = Arc::new(nft);
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::with_livez_grace(cfg.livez_grace));
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
        nft,
    };
    tracing::info!(node = %cfg.node_name, table = %cfg.table, controllers = ?cfg.controllers, "agent starting");

    let mut tasks: JoinSet<Result<(), AgentError>> = JoinSet::new();
    let (c, m) = (cancel.clone(), metrics.clone());
    tasks.spawn(async move {
        http::serve(healthz, http::health_router(health, m), c)
            .await
            .map_err(AgentError::Http)
    });
    let (c, m) = (cancel.clone(), metrics.clone());
    tasks.spawn(async move {
        http::serve(metrics_l, http::metrics_router(m), c)
            .await
            .map_err(AgentError::Http)
    });
    let c = cancel.clone();
    tasks.spawn(async move { Ok(inspect::serve(grpc, inspect, c).await?) });
    let stream_cfg = StreamConfig {
        controllers: cfg.controllers.clone(),
        node_name: cfg.node_name.clone(),
    };
    let c = cancel.clone();
    tasks.spawn(async move {
        stream::run(stream_cfg, applier, metrics, c).await;
        Ok(())
    });

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
