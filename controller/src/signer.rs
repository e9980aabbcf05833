//! The agent-certificate signer (`--signer-ca-secret`): issues each node's agent its client
//! certificate (Subject CN `system:node:<node>`) through the Kubernetes
//! CertificateSigningRequest API, and the controller its own serving certificate, from one CA
//! kept in a Secret.
//!
//! ```text
//!  agent ──create CSR (signer kubenft.io/agent)──▶ API server ──watch──▶ signer (every replica)
//!    ▲        (its pod-bound token: the API server          review ─▶ approve ─▶ sign
//!    └──────── fills spec.username / spec.extra) ◀── status.certificate ─┘
//! ```
//!
//! Every replica runs the signer; writes carry the resourceVersion they read, so when two
//! replicas race one write wins and the other sees the result at its next watch event.

pub mod authority;
pub mod review;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use kubenft_tls::pki::Authority;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
pub use authority::{CaRef, Serving};
use review::{Csr, Decision, Issuance, Policy};

/// The `spec.signerName` of agents' requests.
pub const SIGNER_NAME: &str = "kubenft.io/agent";
/// Requests handled at once (each is a Node read and two writes).
const CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the CA in Secret {secret}: {why}")]
    CaSecret { secret: String, why: String },
    #[error(transparent)]
    Pki(#[from] kubenft_tls::pki::PkiError),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The signer's settings, from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerConfig {
    pub ca: CaRef,
    pub policy: Policy,
    /// The controller's own serving certificate (`--serving-cert-dir`), if it issues one.
    pub serving: Option<Serving>,
}

/// Runs the signer until cancelled: every pending request for [`SIGNER_NAME`] is reviewed,
/// then approved and signed, or denied with the reason.
pub async fn run(
    client: Client,
    ca: Arc<Authority>,
    policy: Policy,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    let events = watcher(csrs.clone(), config)
        .default_backoff()
        .applied_objects();
    let handled = events.for_each_concurrent(CONCURRENCY, |event| {
        let (csrs, nodes, ca, policy, metrics) = (&csrs, &nodes, &ca, &policy, &metrics);
        async move {
            match event {
                Ok(csr) => {
                    if let Some(result) = handle(csrs, nodes, ca, policy, &csr).await {
                        metrics.certificate_request(result);
                    }
                }
                Err(e) => warn!(error = %e, "watching certificate signing requests"),
            }
        }
    });
    info!(signer = SIGNER_NAME, "signing agents' certificates");
    tokio::select! {
        () = cancel.cancelled() => {}
        () = handled => {}
    }
}

/// Decides one request if it is still undecided; the metric result, if it was.
async fn handle(
    csrs: &Api<CertificateSigningRequest>,
    nodes: &Api<Node>,
    ca: &Authority,
    policy: &Policy,
    csr: &CertificateSigningRequest,
) -> Option<&'static str> {
    if csr.spec.signer_name != SIGNER_NAME || decided(csr) {
        return None;
    }
    let name = csr.name_any();
    let pem = String::from_utf8_lossy(&csr.spec.request.0).into_owned();
    let view = Csr {
        username: csr.spec.username.as_deref().unwrap_or(""),
        extra: csr.spec.extra.clone().unwrap_or_default(),
        usages: csr.spec.usages.clone().unwrap_or_default(),
        request_pem: &pem,
        expiration_seconds: csr.spec.expiration_seconds,
    };
    let addresses = match review::claimed_node(&view) {
        Some(node) => match nodes.get_opt(node).await {
            Ok(found) => found.map(|n| node_addresses(&n)),
            Err(e) => {
                warn!(csr = %name, node, error = %e, "cannot read the Node of a certificate request; retried at its next event");
                return Some("failed");
            }
        },
        None => None,
    };
    let outcome = match review::review(&view, policy, addresses.as_deref()) {
        Decision::Deny(why) => {
            warn!(csr = %name, username = view.username, reason = %why, "denied an agent certificate request");
            condition(csrs, csr, "Denied", "KubenftSignerDenied", &why)
                .await
                .map(|_| "denied")
        }
        Decision::Issue(issuance) => issue(csrs, ca, csr, &issuance).await.map(|()| {
            info!(csr = %name, node = %issuance.node, valid_for_s = issuance.validity.as_secs(), "issued an agent certificate");
            "issued"
        }),
    };
    Some(outcome.unwrap_or_else(|e| {
        match &e {
            // Another replica wrote first; its result arrives as the next event.
            SignerError::Kube(kube::Error::Api(s)) if s.code == 409 => {
                debug!(csr = %name, "certificate request changed meanwhile");
            }
            _ => warn!(csr = %name, error = %e, "cannot complete a certificate request"),
        }
        "failed"
    }))
}

/// Whether a request has its certificate, or was denied or failed.
fn decided(csr: &CertificateSigningRequest) -> bool {
    let Some(status) = &csr.status else {
        return false;
    };
    status.certificate.as_ref().is_some_and(|c| !c.0.is_empty())
        || has_condition(csr, "Denied")
        || has_condition(csr, "Failed")
}

fn has_condition(csr: &CertificateSigningRequest, type_: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// Approves (unless approved already), then writes the certificate.
async fn issue(
    csrs: &Api<CertificateSigningRequest>,
    ca: &Authority,
    csr: &CertificateSigningRequest,
    issuance: &Issuance,
) -> Result<(), SignerError> {
    let mut current = if has_condition(csr, "Approved") {
        csr.clone()
    } else {
        let why = format!("the requester's pod runs on node {:?}", issuance.node);
        condition(csrs, csr, "Approved", "KubenftSignerApproved", &why).await?
    };
    let cert = ca.issue(&issuance.request, &issuance.leaf, issuance.validity)?;
    current.status.get_or_insert_default().certificate = Some(ByteString(cert.into_bytes()));
    csrs.replace_status(&current.name_any(), &PostParams::default(), &current)
        .await?;
    Ok(())
}

/// Adds an Approved or Denied condition through the approval subresource.
async fn condition(
    csrs: &Api<CertificateSigningRequest>,
    csr: &CertificateSigningRequest,
    type_: &str,
    reason: &str,
    message: &str,
) -> Result<CertificateSigningRequest, SignerError> {
    let mut updated = csr.clone();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    updated
        .status
        .get_or_insert_default()
        .conditions
        .get_or_insert_default()
        .push(CertificateSigningRequestCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_update_time: Some(now.clone()),
            last_transition_time: Some(now),
        });
    Ok(csrs
        .replace_subresource(
            "approval",
            &csr.name_any(),
            &PostParams::default(),
            &updated,
        )
        .await?)
}

/// A Node's IP addresses (any type whose value is an IP address).
fn node_addresses(node: &Node) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| a.address.parse().ok())
        .collect()
}
