//! The agent's Kubernetes API client, for what it asks the API server directly: its
//! certificate (`--cert-dir`) and where the controllers are (`--controller-service`).
//! Everything else comes from the controllers.

use std::path::Path;

use kube::Client;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("kubeconfig {path}: {why}")]
    Kubeconfig { path: String, why: String },
    #[error("no Kubernetes configuration (neither KUBECONFIG nor in-cluster): {0}")]
    Infer(String),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `--kubeconfig`, else `KUBECONFIG`, else the in-cluster environment (whose
/// `KUBERNETES_SERVICE_HOST`/`PORT` the DaemonSet sets to the API server's real address).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ApiError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |e: kube::config::KubeconfigError| ApiError::Kubeconfig {
                path: path.display().to_string(),
                why: e.to_string(),
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ApiError::Infer(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}
