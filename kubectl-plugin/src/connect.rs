//! Reaching the controllers: one gRPC channel per `--controller` address, with the operator's
//! client certificate (mutual TLS), or in plaintext only when `--insecure` says so.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kubenft_proto::v1::controller_inspect_client::ControllerInspectClient;
use tonic::transport::{Channel, Endpoint};

/// How long one call may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// A controller's gRPC address (HOST:PORT); repeat it for every replica: `status` merges
    /// what they say, other commands ask the first that answers.
    #[arg(
        long = "controller",
        value_name = "HOST:PORT",
        env = "KUBENFT_CONTROLLERS",
        value_delimiter = ',',
        global = true
    )]
    pub controllers: Vec<String>,
    /// The CA that signed the controllers' serving certificates.
    #[arg(long, value_name = "FILE", global = true)]
    pub cacert: Option<PathBuf>,
    /// Your client certificate (signed by the CA the controllers trust for clients).
    #[arg(long, value_name = "FILE", global = true)]
    pub cert: Option<PathBuf>,
    /// The key of `--cert`.
    #[arg(long, value_name = "FILE", global = true)]
    pub key: Option<PathBuf>,
    /// Plaintext: only for a controller started with `--insecure`.
    #[arg(long, global = true, conflicts_with_all = ["cacert", "cert", "key"])]
    pub insecure: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no --controller given (or KUBENFT_CONTROLLERS)")]
    NoController,
    #[error("--cacert, --cert and --key are all needed for TLS (or --insecure for plaintext)")]
    MissingTls,
    #[error("--controller {addr:?}: {why}")]
    Address { addr: String, why: String },
    #[error("TLS: {0}")]
    Tls(#[from] kubenft_tls::Error),
    #[error("cannot connect to controller {addr}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

pub type Inspect = ControllerInspectClient<Channel>;

impl ConnectArgs {
    fn tls(&self) -> Result<Option<kubenft_tls::ClientFiles>, ConnectError> {
        if self.insecure {
            return Ok(None);
        }
        match (&self.cacert, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(kubenft_tls::ClientFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })),
            _ => Err(ConnectError::MissingTls),
        }
    }

    /// The controllers to ask, at least one.
    pub fn controllers(&self) -> Result<&[String], ConnectError> {
        if self.controllers.is_empty() {
            return Err(ConnectError::NoController);
        }
        Ok(&self.controllers)
    }

    /// A client of the controller at `addr`.
    pub async fn connect(&self, addr: &str) -> Result<Inspect, ConnectError> {
        let tls = self.tls()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let bad = |why: String| ConnectError::Address {
            addr: addr.to_owned(),
            why,
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        if let Some(files) = tls {
            endpoint = endpoint
                .tls_config(files.load()?)
                .map_err(|e| bad(e.to_string()))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ConnectError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        Ok(ControllerInspectClient::new(channel))
    }
}
