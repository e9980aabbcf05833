//! The agent's own certificate (`--cert-dir`): requested through the Kubernetes
//! CertificateSigningRequest API from the controllers' signer (`kubenft.io/agent`), kept in
//! one file with its key, and renewed before it expires.
//!
//! The request is authenticated by the agent pod's ServiceAccount token, which the API server
//! binds to the pod and its node: the signer issues `system:node:<node>` only to the agent
//! running on that node. The certificate and key share one file, replaced by a rename, so
//! the TLS code (which re-reads it every few seconds) never sees a key from one certificate
//! and the certificate of another. Established streams keep their connection; the next
//! connection uses the new certificate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use kubenft_tls::pki::{self, Leaf, Validity};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The signer the controllers run.
pub const SIGNER_NAME: &str = "kubenft.io/agent";
/// The certificate and its key, in `--cert-dir`.
pub const CERT_FILE: &str = "kubenft-agent.pem";
/// How long one request may wait for its certificate before a new one is made.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Polling a pending request: starts at the first, doubles up to the second.
const POLL: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(5));
/// Retrying after a failure (API server unreachable, request denied).
const RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Api(#[from] crate::apiserver::ApiError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("certificate request {name} was denied: {why}")]
    Denied { name: String, why: String },
    #[error("certificate request {name} got no certificate within {REQUEST_TIMEOUT:?}")]
    TimedOut { name: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the agent keeps its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertDir {
    pub dir: PathBuf,
}

impl CertDir {
    pub fn file(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }
}

/// Obtains and renews the certificate of `node`.
pub struct Certs {
    dir: CertDir,
    node: String,
    csrs: Api<CertificateSigningRequest>,
    nodes: Api<Node>,
}

impl Certs {
    pub fn new(dir: CertDir, node: String, client: Client) -> Certs {
        Certs {
            dir,
            node,
            csrs: Api::all(client.clone()),
            nodes: Api::all(client),
        }
    }

    /// Makes sure a valid certificate of this node is in place, requesting one (and
    /// retrying until it is issued) if not; returns when to renew it. `None` if cancelled.
    pub async fn ensure(&self, cancel: &CancellationToken) -> Option<SystemTime> {
        if let Some(validity) = usable(&self.dir.file(), &self.node) {
            info!(file = %self.dir.file().display(), "using the certificate in --cert-dir");
            return Some(renewal_time(&validity));
        }
        self.obtain(cancel).await
    }

    /// Renews the certificate at `due`, and each new one at its own renewal time.
    pub async fn renew(self, mut due: SystemTime, cancel: CancellationToken) {
        while pki::sleep_until(due, &cancel).await {
            match self.obtain(&cancel).await {
                Some(next) => due = next,
                None => return,
            }
        }
    }

    /// Requests certificates until one is issued and written.
    async fn obtain(&self, cancel: &CancellationToken) -> Option<SystemTime> {
        let mut delay = RETRY.0;
        loop {
            let attempt = tokio::select! {
                () = cancel.cancelled() => return None,
                r = self.request() => r,
            };
            match attempt {
                Ok(validity) => return Some(renewal_time(&validity)),
                Err(e) => {
                    warn!(error = %e, retry_in_s = delay.as_secs(), "cannot obtain the agent's certificate")
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RETRY.1);
        }
    }

    /// One request: create it, wait for its certificate, write it with its key.
    async fn request(&self) -> Result<Validity, CertError> {
        let ips = self.node_ips().await?;
        let (request_pem, key_pem) = pki::request(&Leaf {
            common_name: kubenft_tls::node_identity(&self.node),
            organizations: vec!["system:nodes".into()],
            ips,
            server: true,
            client: true,
            ..Leaf::default()
        })?;
        let created = self
            .csrs
            .create(&PostParams::default(), &csr(&self.node, request_pem))
            .await?;
        let name = created.metadata.name.clone().unwrap_or_default();
        info!(csr = %name, signer = SIGNER_NAME, "requested the agent's certificate");
        let cert = self.wait_for(&name).await?;
        let validity = Validity::of_pem(&cert)?;
        let path = self.dir.file();
        std::fs::create_dir_all(&self.dir.dir)
            .and_then(|()| pki::write_atomically(&path, &format!("{cert}{key_pem}")))
            .map_err(|source| CertError::Write {
                path: path.clone(),
                source,
            })?;
        info!(csr = %name, file = %path.display(), "wrote the agent's new certificate");
        Ok(validity)
    }

    /// The node's addresses as its Node object lists them: the names the certificate may
    /// carry (the signer checks them against the same object).
    async fn node_ips(&self) -> Result<Vec<IpAddr>, CertError> {
        let node = self.nodes.get(&self.node).await?;
        let mut ips: Vec<IpAddr> = node
            .status
            .and_then(|s| s.addresses)
            .into_iter()
            .flatten()
            .filter_map(|a| a.address.parse().ok())
            .collect();
        ips.sort();
        ips.dedup();
        Ok(ips)
    }

    async fn wait_for(&self, name: &str) -> Result<String, CertError> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut poll = POLL.0;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(POLL.1);
            let csr = self.csrs.get(name).await?;
            let status = csr.status.unwrap_or_default();
            if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
                return Ok(String::from_utf8_lossy(&cert.0).into_owned());
            }
            if let Some(c) = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
            {
                return Err(CertError::Denied {
                    name: name.to_owned(),
                    why: c.message.unwrap_or(c.type_),
                });
            }
        }
        Err(CertError::TimedOut {
            name: name.to_owned(),
        })
    }
}

fn csr(node: &str, request_pem: String) -> CertificateSigningRequest {
    // Names are at most 253 characters; the API server appends 5 to a generateName.
    let prefix: String = format!("kubenft-agent-{node}-").chars().take(200).collect();
    CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(prefix),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request_pem.into_bytes()),
            signer_name: SIGNER_NAME.into(),
            usages: Some(vec![
                "digital signature".into(),
                "client auth".into(),
                "server auth".into(),
            ]),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    }
}

/// The certificate in `path`, if it names `node`, holds a key and is still valid.
fn usable(path: &Path, node: &str) -> Option<Validity> {
    let pem = std::fs::read_to_string(path).ok()?;
    let validity = Validity::of_pem(&pem).ok()?;
    let der = pki::pem_block(&pem, "CERTIFICATE")?;
    let names_node = kubenft_tls::common_name(&der) == Some(kubenft_tls::node_identity(node));
    let has_key = pem.contains("PRIVATE KEY-----");
    (names_node && has_key && SystemTime::now() < validity.not_after).then_some(validity)
}

/// Somewhere between 70 and 90% of the lifetime, so that the nodes of a cluster whose
/// certificates were issued together do not all ask again at once.
fn renewal_time(validity: &Validity) -> SystemTime {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    validity.at_fraction(0.7 + 0.2 * f64::from(nanos % 1000) / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_valid_certificate_of_this_node_with_its_key_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CERT_FILE);
        assert!(usable(&path, "a").is_none(), "no file");
        let ca = pki::Authority::generate("ca", Duration::from_secs(3600)).unwrap();
        let leaf = |node: &str| Leaf {
            common_name: kubenft_tls::node_identity(node),
            client: true,
            ..Leaf::default()
        };
        let (cert, key) = ca
            .issue_with_key(&leaf("a"), Duration::from_secs(600))
            .unwrap();
        std::fs::write(&path, &cert).unwrap();
        assert!(usable(&path, "a").is_none(), "no key");
        std::fs::write(&path, format!("{cert}{key}")).unwrap();
        let v = usable(&path, "a").expect("a's certificate");
        assert!(usable(&path, "b").is_none(), "another node's");
        let due = renewal_time(&v);
        assert!(due >= v.at_fraction(0.7) && due <= v.at_fraction(0.9));
    }

    #[test]
    fn a_request_asks_the_kubenft_signer_for_client_and_server_use() {
        let c = csr(&"n".repeat(300), "PEM".into());
        assert_eq!(c.spec.signer_name, SIGNER_NAME);
        assert!(c.metadata.generate_name.unwrap().len() <= 200);
        let usages = c.spec.usages.unwrap();
        assert!(usages.contains(&"client auth".to_owned()));
        assert!(usages.contains(&"server auth".to_owned()));
    }
}
