//! The signer's CA: kept in a Secret (made by the first controller that finds none), its
//! certificate published in a ConfigMap of the same name for agents and operators, and the
//! controller's own serving certificate issued from it into files the gRPC port reads.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use kubenft_tls::pki::{Authority, Leaf, Validity};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::SignerError;

/// The CA's lifetime. Rotating the CA is a manual step (see the deploy README).
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The CA certificate's key in the Secret and the ConfigMap.
pub const CA_CERT_KEY: &str = "ca.crt";
const CA_KEY_KEY: &str = "ca.key";
/// The serving certificate and key, in one file so that a renewal replaces both at once.
pub const SERVING_PEM: &str = "serving.pem";

/// Where the CA lives: `namespace/name` of the Secret (and of the ConfigMap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for CaRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Reads the CA from its Secret, creating the Secret with a new CA if there is none (the
/// first of several replicas to create it wins; the others read it), then makes sure the
/// ConfigMap publishes its certificate.
pub async fn load_or_create(client: &Client, at: &CaRef) -> Result<Authority, SignerError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &at.namespace);
    let authority = match secrets.get_opt(&at.name).await? {
        Some(secret) => from_secret(&secret, at)?,
        None => {
            let fresh = Authority::generate("kubenft-ca", CA_VALIDITY)?;
            match secrets
                .create(&PostParams::default(), &ca_secret(&fresh, at))
                .await
            {
                Ok(_) => {
                    info!(secret = %at, "created the signer's CA");
                    fresh
                }
                // Another replica was first: use its CA.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    from_secret(&secrets.get(&at.name).await?, at)?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    publish(client, at, authority.cert_pem()).await?;
    Ok(authority)
}

fn ca_secret(ca: &Authority, at: &CaRef) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(at.name.clone()),
            namespace: Some(at.namespace.clone()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (CA_CERT_KEY.into(), ByteString(ca.cert_pem().into())),
            (CA_KEY_KEY.into(), ByteString(ca.key_pem().into())),
        ])),
        ..Secret::default()
    }
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/part-of".to_owned(), "kubenft".to_owned())])
}

fn from_secret(secret: &Secret, at: &CaRef) -> Result<Authority, SignerError> {
    let field = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or_else(|| SignerError::CaSecret {
                secret: at.to_string(),
                why: format!("no data.{key}"),
            })
    };
    Authority::from_pem(&field(CA_CERT_KEY)?, &field(CA_KEY_KEY)?).map_err(|e| {
        SignerError::CaSecret {
            secret: at.to_string(),
            why: e.to_string(),
        }
    })
}

/// Creates or updates the ConfigMap that carries the CA certificate.
async fn publish(client: &Client, at: &CaRef, cert_pem: &str) -> Result<(), SignerError> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &at.namespace);
    let data = BTreeMap::from([(CA_CERT_KEY.to_owned(), cert_pem.to_owned())]);
    match maps.get_opt(&at.name).await? {
        Some(existing) if existing.data.as_ref() == Some(&data) => Ok(()),
        Some(mut existing) => {
            existing.data = Some(data);
            maps.replace(&at.name, &PostParams::default(), &existing)
                .await?;
            info!(configmap = %at, "updated the published CA certificate");
            Ok(())
        }
        None => {
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(at.name.clone()),
                    namespace: Some(at.namespace.clone()),
                    labels: Some(labels()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            match maps.create(&PostParams::default(), &map).await {
                Ok(_) => info!(configmap = %at, "published the CA certificate"),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }
    }
}

/// The controller's own serving certificate: the names it is reached by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Serving {
    pub dir: PathBuf,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl Serving {
    /// The gRPC port's files: the serving certificate and key (one file) and the client CA.
    pub fn files(&self) -> kubenft_tls::ServerFiles {
        kubenft_tls::ServerFiles {
            cert: self.dir.join(SERVING_PEM),
            key: self.dir.join(SERVING_PEM),
            client_ca: self.dir.join(CA_CERT_KEY),
        }
    }

    /// Issues a serving certificate and writes it with the CA certificate; returns when it
    /// should be renewed (two thirds into its life).
    pub fn issue(&self, ca: &Authority, validity: Duration) -> Result<SystemTime, SignerError> {
        let leaf = Leaf {
            common_name: "kubenft-controller".into(),
            dns_names: self.dns_names.clone(),
            ips: self.ips.clone(),
            server: true,
            ..Leaf::default()
        };
        let (cert, key) = ca.issue_with_key(&leaf, validity)?;
        write_atomically(&self.dir.join(CA_CERT_KEY), ca.cert_pem())?;
        write_atomically(&self.dir.join(SERVING_PEM), &format!("{cert}{key}"))?;
        Ok(Validity::of_pem(&cert)?.at_fraction(2.0 / 3.0))
    }

    /// Renews the serving certificate when due, until cancelled.
    pub async fn renew(
        self,
        ca: std::sync::Arc<Authority>,
        validity: Duration,
        mut due: SystemTime,
        cancel: CancellationToken,
    ) {
        while kubenft_tls::pki::sleep_until(due, &cancel).await {
            due = match self.issue(&ca, validity) {
                Ok(next) => {
                    info!(dir = %self.dir.display(), "renewed the serving certificate");
                    next
                }
                Err(e) => {
                    warn!(error = %e, "cannot renew the serving certificate; retrying in 10 s");
                    SystemTime::now() + Duration::from_secs(10)
                }
            };
        }
    }
}

fn write_atomically(path: &Path, content: &str) -> Result<(), SignerError> {
    kubenft_tls::pki::write_atomically(path, content).map_err(|source| SignerError::Write {
        path: path.to_owned(),
        source,
    })
}
