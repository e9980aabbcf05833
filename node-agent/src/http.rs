//! The HTTP endpoints: `/healthz` and `/livez` (kube-proxy's semantics and JSON), and
//! `/metrics` and `/proxyMode` on the metrics address.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::{Health, rfc3339};
use crate::metrics::Metrics;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HealthBody {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    /// Per IP family, as kube-proxy (1.33+) reports its per-family proxiers: each family's
    /// table is current as of `lastUpdated`. Both tables change in one nft transaction, so the
    /// two entries always agree; they appear once the first change is committed.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, FamilyHealth>,
    /// Beyond kube-proxy: since when the node has not converged (`/livez` fails once this is
    /// older than `--livez-grace`).
    #[serde(skip_serializing_if = "Option::is_none")]
    not_converged_since: Option<String>,
    /// Beyond kube-proxy: why the state file cannot be written (a restart will reconcile in
    /// full); does not change the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    state_file_error: Option<String>,
    /// Beyond kube-proxy: this agent is a standby while another holds the node (an
    /// overlapping rollout); it answers 200, as the rules in force are the holder's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    standby: bool,
    /// Beyond kube-proxy: whether the kernel holds what was applied. `/healthz` fails while
    /// the agent cannot converge (its repairs keep failing).
    #[serde(skip_serializing_if = "Option::is_none")]
    dataplane: Option<DataplaneBody>,
    /// Beyond kube-proxy: other programs' Service rules on this node (kube-proxy's during a
    /// migration, or a table that DNATs before us). Reported only: the answer stays 200.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    conflicts: Vec<ConflictBody>,
}

#[derive(Serialize)]
struct ConflictBody {
    source: &'static str,
    table: String,
    detail: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DataplaneBody {
    state: &'static str,
    drift_detected: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    repairs: BTreeMap<&'static str, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_converged: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyHealth {
    last_updated: String,
    healthy: bool,
}

#[derive(Clone)]
struct HealthState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// The router of the health address.
pub fn health_router(health: Arc<Health>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|State(s): State<HealthState>| async move {
                let reply = health_reply(&s.health, true);
                s.metrics.healthz(reply.status().as_u16());
                reply
            }),
        )
        .route(
            "/livez",
            get(|State(s): State<HealthState>| async move {
                let reply = health_reply(&s.health, false);
                s.metrics.livez(reply.status().as_u16());
                reply
            }),
        )
        .with_state(HealthState { health, metrics })
}

/// kube-proxy's answer: `/healthz` fails while a change waits too long or while the node is
/// being deleted; `/livez` for the former, and also once the node has not converged for
/// longer than `--livez-grace` (so that the kubelet restarts an agent that cannot recover).
/// A standby (another agent holds the node) has nothing pending and answers 200 on both:
/// with `SO_REUSEPORT` the two share the port and a probe reaches either; failing it would
/// make the node look unhealthy, or the new pod dead, for the whole overlap.
fn health_reply(health: &Health, with_node: bool) -> Response {
    let status = health.status();
    let now = SystemTime::now();
    let family_status = status
        .last_updated
        .map(|t| {
            ["IPv4", "IPv6"]
                .into_iter()
                .map(|f| {
                    (
                        f,
                        FamilyHealth {
                            last_updated: rfc3339(t),
                            healthy: status.healthy,
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let body = HealthBody {
        last_updated: status.last_updated.map(rfc3339).unwrap_or_default(),
        current_time: rfc3339(now),
        node_eligible: with_node.then_some(status.node_eligible),
        healthy: status.healthy,
        status: family_status,
        not_converged_since: status.not_converged_since.map(rfc3339),
        state_file_error: status.persist_error.clone(),
        standby: status.standby,
        dataplane: (!status.dataplane.state.is_empty()).then(|| DataplaneBody {
            state: status.dataplane.state,
            drift_detected: status.dataplane.drift_detected,
            repairs: status.dataplane.repairs.clone(),
            last_converged: status.dataplane.last_converged.map(rfc3339),
            error: status.dataplane.error.clone(),
        }),
        conflicts: status
            .conflicts
            .iter()
            .map(|c| ConflictBody {
                source: c.source,
                table: c.table.clone(),
                detail: c.detail.clone(),
            })
            .collect(),
    };
    let ok = if with_node {
        status.node_eligible
    } else {
        status.live
    };
    let code = if status.healthy && ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        serde_json::to_string(&body).expect("serializable"),
    )
        .into_response()
}

/// The router of the metrics address.
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }),
        )
        .route("/proxyMode", get(|| async { "nftables" }))
        .with_state(metrics)
}

/// The HTTP ports' bounds: probes and scrapes are a handful of connections; a client gets 5 s
/// to send its headers and a connection lives a minute (then it is asked to close after its
/// request). Request bodies are refused.
pub const LIMITS: kubenft_tls::HttpLimits = kubenft_tls::HttpLimits {
    max_connections: 32,
    header_read_timeout: std::time::Duration::from_secs(5),
    connection_lifetime: std::time::Duration::from_secs(60),
};

/// Counts and logs a connection refused on `port` (`grpc`, `healthz`, `metrics`), naming the
/// peer: at debug beyond the connection limit (a flood would otherwise flood the log too).
pub fn refusal(
    metrics: Arc<Metrics>,
    port: &'static str,
) -> impl Fn(kubenft_tls::Refusal) + Send + Sync + 'static {
    move |r| {
        metrics.connection_refused(port, r.reason);
        if r.reason == "connection_limit" {
            tracing::debug!(port, peer = %r.peer, "refused a connection: too many open");
        } else {
            tracing::warn!(port, peer = %r.peer, common_name = ?r.common_name, reason = r.reason, error = %r.error, "refused a connection");
        }
    }
}

/// Serves a router on `port` (`healthz`, `metrics`) until cancelled, under [`LIMITS`];
/// refused connections are counted in `metrics`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    metrics: Arc<Metrics>,
    port: &'static str,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    kubenft_tls::serve_http(listener, router, LIMITS, cancel, refusal(metrics, port)).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A client sending its headers a byte at a time is closed within the header read
    /// timeout; a request with a body is refused.
    #[tokio::test]
    async fn slow_clients_are_closed_and_bodies_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let router = Router::new().route("/healthz", get(|| async { "ok\n" }));
        let server = tokio::spawn(serve(
            listener,
            router,
            Arc::new(Metrics::default()),
            "healthz",
            cancel.clone(),
        ));
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let closed = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if slow.write_all(b"X").await.is_err() {
                break started.elapsed();
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
                Err(_) => {}
                Ok(_) => break started.elapsed(),
            }
            assert!(started.elapsed() < Duration::from_secs(15), "kept open");
        };
        assert!(
            closed < LIMITS.header_read_timeout + Duration::from_secs(3),
            "{closed:?}"
        );
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        cancel.cancel();
        server.await.unwrap().unwrap();
    }

    async fn get_text(router: Router, path: &str) -> (u16, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            router,
            Arc::new(Metrics::default()),
            "healthz",
            cancel.clone(),
        ));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        cancel.cancel();
        server.await.unwrap().unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (code, body)
    }

    #[tokio::test]
    async fn healthz_and_livez() {
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::default());
        health.committed();
        let router = || health_router(health.clone(), metrics.clone());
        let (code, body) = get_text(router(), "/healthz").await;
        assert_eq!(code, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["healthy"], true);
        assert_eq!(json["nodeEligible"], true);
        assert!(json["lastUpdated"].as_str().unwrap().ends_with('Z'));
        for family in ["IPv4", "IPv6"] {
            assert_eq!(json["status"][family]["healthy"], true, "{body}");
            assert_eq!(
                json["status"][family]["lastUpdated"], json["lastUpdated"],
                "{body}"
            );
        }
        let (code, body) = get_text(router(), "/livez").await;
        assert_eq!(code, 200);
        assert!(!body.contains("nodeEligible"));
        // A node being deleted: /healthz fails so load balancers drain it, /livez does not.
        health.set_deleting(true);
        let (code, body) = get_text(router(), "/healthz").await;
        assert_eq!(code, 503);
        assert!(body.contains(r#""nodeEligible":false"#), "{body}");
        assert_eq!(get_text(router(), "/livez").await.0, 200);
        let text = metrics.encode();
        assert!(
            text.contains(r#"kubeproxy_proxy_healthz_total{code="503"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"kubeproxy_proxy_livez_total{code="200"} 2"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn livez_fails_once_not_converged_beyond_the_grace() {
        let health = Arc::new(Health::with_livez_grace(Duration::from_millis(200)));
        let metrics = Arc::new(Metrics::default());
        let router = || health_router(health.clone(), metrics.clone());
        health.committed();
        // A refused change: still live within the grace.
        health.not_converged();
        let (code, body) = get_text(router(), "/livez").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("notConvergedSince"), "{body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (code, body) = get_text(router(), "/livez").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("notConvergedSince"), "{body}");
        // /healthz keeps kube-proxy's rule (nothing waits to be applied here).
        assert_eq!(get_text(router(), "/healthz").await.0, 200);
        health.converged();
        let (code, body) = get_text(router(), "/livez").await;
        assert_eq!(code, 200, "{body}");
        assert!(!body.contains("notConvergedSince"), "{body}");
    }

    #[tokio::test]
    async fn healthz_shows_the_data_plane_and_fails_while_it_cannot_converge() {
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::default());
        let dataplane = crate::drift::Dataplane::new(metrics.clone(), health.clone());
        let router = || health_router(health.clone(), metrics.clone());
        dataplane.drift_seen(1);
        dataplane.repaired([kubenft_nft::repair::RepairKind::Element]);
        let (code, body) = get_text(router(), "/healthz").await;
        assert_eq!(code, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["dataplane"]["state"], "converged", "{body}");
        assert_eq!(json["dataplane"]["driftDetected"], 1, "{body}");
        assert_eq!(json["dataplane"]["repairs"]["element"], 1, "{body}");
        assert!(json["dataplane"]["lastConverged"].is_string(), "{body}");
        // Repairs that keep failing: the node does not enforce its rules.
        dataplane.drift_seen(1);
        dataplane.diverged("Error: Could not process rule: Device or resource busy");
        let (code, body) = get_text(router(), "/healthz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("\"state\":\"diverged\""), "{body}");
        assert!(body.contains("resource busy"), "{body}");
        assert!(body.contains("notConvergedSince"), "{body}");
        dataplane.repaired([kubenft_nft::repair::RepairKind::Full]);
        let (code, body) = get_text(router(), "/healthz").await;
        assert_eq!(code, 200, "{body}");
        assert!(!body.contains("notConvergedSince"), "{body}");
    }

    #[tokio::test]
    async fn a_standby_and_a_persist_error_are_reported_without_failing() {
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::default());
        let router = || health_router(health.clone(), metrics.clone());
        health.set_standby(true);
        health.set_persist_error(Some("/x/applied.pb: read-only".into()));
        for path in ["/healthz", "/livez"] {
            let (code, body) = get_text(router(), path).await;
            assert_eq!(code, 200, "{path}: {body}");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["standby"], true, "{body}");
            assert_eq!(json["stateFileError"], "/x/applied.pb: read-only", "{body}");
        }
        health.set_standby(false);
        health.set_persist_error(None);
        let (_, body) = get_text(router(), "/healthz").await;
        assert!(
            !body.contains("standby") && !body.contains("stateFile"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn conflicts_are_reported_without_failing() {
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::default());
        let router = || health_router(health.clone(), metrics.clone());
        health.committed();
        let (_, body) = get_text(router(), "/healthz").await;
        assert!(!body.contains("conflicts"), "{body}");
        health.set_conflicts(vec![crate::health::Conflict {
            source: "kube-proxy-nftables",
            table: "ip kube-proxy".into(),
            detail: "kube-proxy's nftables table".into(),
        }]);
        for path in ["/healthz", "/livez"] {
            let (code, body) = get_text(router(), path).await;
            assert_eq!(code, 200, "{path}: {body}");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                json["conflicts"][0]["source"], "kube-proxy-nftables",
                "{body}"
            );
            assert_eq!(json["conflicts"][0]["table"], "ip kube-proxy", "{body}");
        }
        health.set_conflicts(Vec::new());
        let (_, body) = get_text(router(), "/healthz").await;
        assert!(!body.contains("conflicts"), "{body}");
    }

    #[tokio::test]
    async fn proxy_mode_and_metrics() {
        let metrics = Arc::new(Metrics::default());
        let (code, body) = get_text(metrics_router(metrics.clone()), "/proxyMode").await;
        assert_eq!((code, body.as_str()), (200, "nftables"));
        let (code, body) = get_text(metrics_router(metrics), "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("kubenft_agent_controller_connected"));
    }
}
