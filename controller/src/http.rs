//! `/healthz`, `/livez`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
}

pub fn router(hub: Arc<Hub>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { hub, metrics })
}

/// Ready once the source has delivered its first complete view (for `--source kube`: every
/// initial list is complete), and while it can be read: a source that fails keeps its last
/// good view, and `/readyz` says why it is not ready. Until the first view agents get nothing.
async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    match (s.hub.synced(), s.metrics.source_health.problem()) {
        (false, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "caches not synced\n".into(),
        ),
        (false, Some(problem)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("caches not synced: {problem}\n"),
        ),
        (true, None) => (StatusCode::OK, "ok\n".into()),
        (true, Some(problem)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("source failing (serving the last good view): {problem}\n"),
        ),
    }
}

async fn metrics_text(State(s): State<AppState>) -> ([(&'static str, &'static str); 1], String) {
    let statuses = s.hub.statuses();
    s.metrics.set_node_states(
        statuses
            .iter()
            .map(|(_, desired, status)| status.state(&desired.system_version)),
    );
    s.metrics
        .set_node_lags(statuses.into_iter().map(|(node, _, status)| {
            let lag = status
                .pending_since
                .map_or(0.0, |t| t.elapsed().as_secs_f64());
            (node, lag)
        }));
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// The HTTP port's bounds: probes and scrapes are a handful of connections; a client gets
/// 5 s to send its headers and a connection lives a minute (then it is asked to close after
/// its request). Request bodies are refused.
pub const LIMITS: kubenft_tls::HttpLimits = kubenft_tls::HttpLimits {
    max_connections: 64,
    header_read_timeout: std::time::Duration::from_secs(5),
    connection_lifetime: std::time::Duration::from_secs(60),
};

pub async fn serve(
    addr: SocketAddr,
    router: Router,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    kubenft_tls::serve_http(listener, router, LIMITS, shutdown, move |r| {
        metrics
            .http_refused
            .get_or_create(&crate::metrics::ReasonLabels { reason: r.reason })
            .inc();
        // At debug: a flood would otherwise flood the log too.
        tracing::debug!(peer = %r.peer, reason = r.reason, error = %r.error, "HTTP: refused or closed a connection");
    })
    .await
}
