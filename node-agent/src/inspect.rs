//! The agent's own inspection gRPC server (`kubenft.v1.AgentInspect`), with `grpc.health.v1`
//! and server reflection (v1 and v1alpha, so grpcurl 1.8 works).

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use kubenft_proto::v1::{
    self,
    agent_inspect_server::{AgentInspect, AgentInspectServer},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::applier::{Applier, SharedState};
use crate::metrics::Metrics;
use crate::nft::{Nft, TableName};
use kubenft_nft::rules::Family;
use kubenft_nft::trace::{Flow, NodeView, trace};

pub struct Inspect<N> {
    pub node: String,
    pub table: TableName,
    pub state: SharedState,
    pub nft: Arc<N>,
    /// For the drift check, which lists the kernel as the drift loop does.
    pub applier: Arc<Applier<N>>,
}

/// Times the drift check starts again when a change commits during its listing.
const DRIFT_ATTEMPTS: usize = 3;

#[tonic::async_trait]
impl<N: Nft> AgentInspect for Inspect<N> {
    async fn get_applied(
        &self,
        _: Request<v1::GetAppliedRequest>,
    ) -> Result<Response<v1::AppliedState>, Status> {
        let state = self.state.read();
        Ok(Response::new(v1::AppliedState {
            node: self.node.clone(),
            system_version: state.system_version(),
            resources: state.resources().collect(),
            last_error: state.last_error.clone(),
            last_applied_unix_ms: state
                .last_applied
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            agent_version: kubenft_proto::release::VERSION.to_owned(),
            protocol_version: kubenft_proto::release::PROTOCOL_VERSION,
        }))
    }

    async fn get_nft_text(
        &self,
        request: Request<v1::GetNftTextRequest>,
    ) -> Result<Response<v1::NftText>, Status> {
        let text = if request.into_inner().live {
            let mut text = String::new();
            for f in Family::ALL {
                let table = self
                    .nft
                    .list_table(&self.table, f)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                text.push_str(&table);
            }
            text
        } else {
            let state = self.state.read();
            Family::ALL
                .map(|f| state.table_text(&self.table, f))
                .concat()
        };
        Ok(Response::new(v1::NftText { text }))
    }

    async fn get_drift(
        &self,
        _: Request<v1::GetDriftRequest>,
    ) -> Result<Response<v1::Drift>, Status> {
        let unavailable = |e: crate::nft::NftError| Status::unavailable(e.to_string());
        for _ in 0..DRIFT_ATTEMPTS {
            let mut damage = self.applier.check_structure().await.map_err(unavailable)?;
            if !damage.full {
                match self.applier.verify_content().await.map_err(unavailable)? {
                    Some(content) => damage.merge(content),
                    None => continue,
                }
            }
            let state = self.state.read();
            let mut lines = kubenft_nft::repair::diff_lines(&state, &damage, &self.table);
            if !state.is_synced() {
                lines.push("# nothing applied yet: what the kernel holds is not known".into());
            }
            let dataplane = self.applier.dataplane().subscribe().borrow().state;
            return Ok(Response::new(v1::Drift {
                in_sync: lines.is_empty(),
                lines,
                dataplane,
            }));
        }
        Err(Status::unavailable(
            "changes kept committing during the check: ask again",
        ))
    }

    /// From what this node has applied, and its addresses as the kernel holds them now.
    async fn trace(
        &self,
        request: Request<v1::TraceRequest>,
    ) -> Result<Response<v1::TraceResponse>, Status> {
        let req = request.into_inner();
        if !req.node.is_empty() && req.node != self.node {
            return Err(Status::invalid_argument(format!(
                "node: this agent is node {:?}, not {:?} (ask the controller about other nodes)",
                self.node, req.node
            )));
        }
        let flow = Flow::from_request(&req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let addresses = crate::addrs::node_ips()
            .await
            .map_err(|e| Status::unavailable(format!("reading the node's addresses: {e}")))?;
        let state = self.state.read();
        let view = NodeView {
            resources: state
                .applied()
                .map(|a| (a.name.as_str(), &a.spec))
                .collect(),
            addresses: &addresses,
        };
        let answer = trace(&view, &flow).to_response(&self.node, &state.system_version());
        Ok(Response::new(answer))
    }
}

/// The inspection port's bounds: it serves an operator's grpcurl and a monitoring probe or
/// two, so a few dozen connections (each with a 10 s handshake, or in plaintext first bytes,
/// timeout), a few calls at once, and requests of a node or table name.
const LIMITS: kubenft_tls::Limits = kubenft_tls::Limits {
    max_connections: 32,
    handshake_timeout: kubenft_tls::HANDSHAKE_TIMEOUT,
};
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);
const MAX_CONCURRENT_STREAMS: u32 = 8;
const CALLS_PER_CONNECTION: usize = 4;
/// Inspection calls answered at once over every connection, until their answers are sent
/// (more are refused with RESOURCE_EXHAUSTED, see `kubenft_tls::CallLimit`): rendering the
/// table text runs `nft list`, and an answer a client does not read stays in memory.
pub const CALLS: usize = 8;
const REQUEST_BYTES: usize = 64 * 1024;

/// Serves inspection, health and reflection until cancelled; refused connections are counted
/// in `metrics` (port `grpc`).
///
/// With TLS, every client needs a certificate signed by the inspection port's client CA
/// (`--client-ca-file`, else `--controller-ca-file`); files are re-read when they change.
pub async fn serve<N: Nft>(
    listener: TcpListener,
    tls: Option<Arc<kubenft_tls::ServerTls>>,
    inspect: Inspect<N>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<AgentInspectServer<Inspect<N>>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kubenft_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // The descriptor set also holds the controller's services: advertise only ours.
            .with_service_name("kubenft.v1.AgentInspect")
            .with_service_name("grpc.health.v1.Health")
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .concurrency_limit_per_connection(CALLS_PER_CONNECTION)
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(kubenft_tls::CallLimit::new(
            AgentInspectServer::new(inspect).max_decoding_message_size(REQUEST_BYTES),
            CALLS,
        ));
    let refused = crate::http::refusal(metrics, "grpc");
    match tls {
        Some(tls) => {
            tls.watch(cancel.clone());
            let incoming = kubenft_tls::incoming_with(listener, tls, LIMITS, refused);
            router
                .serve_with_incoming_shutdown(incoming, cancel.cancelled())
                .await?
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    kubenft_tls::plaintext(listener, LIMITS, refused),
                    cancel.cancelled(),
                )
                .await?
        }
    }
    Ok(())
}

/// Why the inspection server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}
