//! Where the controllers are: a fixed list of URLs (`--controller`), or the ready endpoints of
//! the controllers' Service (`--controller-service NAMESPACE/NAME`), watched as EndpointSlices
//! through the API server at its real address.
//!
//! Discovery never goes through a Service rule kubenft programs: the agent dials the pods'
//! addresses and checks the controllers' certificate against the Service's DNS name (without
//! resolving it). A list that becomes empty (every controller restarting or not ready) or an
//! API server that cannot be reached keeps the last addresses known, and the last list is
//! kept in the state directory, so an agent restarted while the API server is away still
//! finds its controllers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// One controller to dial: its URL, and the name its certificate must carry when that is
/// not the URL's host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub url: String,
    pub server_name: Option<String>,
}

/// The current controllers, updated as they move.
#[derive(Clone, Debug)]
pub struct Controllers(watch::Receiver<Arc<Vec<Target>>>);

impl Controllers {
    /// A list that never changes (`--controller`).
    pub fn fixed(urls: Vec<String>) -> Controllers {
        let targets = urls
            .into_iter()
            .map(|url| Target {
                url,
                server_name: None,
            })
            .collect();
        // The sender may go: a receiver keeps the last value.
        Controllers(watch::channel(Arc::new(targets)).1)
    }

    /// The controllers now.
    pub fn current(&self) -> Arc<Vec<Target>> {
        self.0.borrow().clone()
    }

    /// Waits until the list changes; `false` if it never will again.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

/// The controllers' Service (`--controller-service`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The Service port's name whose endpoints' port the gRPC server listens on.
    pub port_name: String,
    /// The name the controllers' certificate must carry (TLS); `None`: plaintext.
    pub server_name: Option<String>,
}

/// The file in the state directory that keeps the last list.
const CACHE_FILE: &str = "controllers.json";
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Starts watching the Service's EndpointSlices; the task runs until cancelled.
pub fn watch_service(
    service: ServiceRef,
    client: Client,
    state_dir: &Path,
    cancel: CancellationToken,
) -> (Controllers, tokio::task::JoinHandle<()>) {
    let cache = state_dir.join(CACHE_FILE);
    let cached = read_cache(&cache);
    if !cached.is_empty() {
        info!(controllers = ?cached, "controllers from the last run, until the API server answers");
    }
    let (tx, rx) = watch::channel(Arc::new(cached));
    let task = tokio::spawn(follow(service, client, cache, tx, cancel));
    (Controllers(rx), task)
}

async fn follow(
    service: ServiceRef,
    client: Client,
    cache: PathBuf,
    tx: watch::Sender<Arc<Vec<Target>>>,
    cancel: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &service.namespace);
    let selector = format!("{SERVICE_NAME_LABEL}={}", service.name);
    let config = watcher::Config::default().labels(&selector);
    let (reader, writer) = kube::runtime::reflector::store();
    let mut events = std::pin::pin!(
        kube::runtime::reflector(writer, watcher(api, config))
            .default_backoff()
            .touched_objects()
    );
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                warn!(error = %e, service = %format!("{}/{}", service.namespace, service.name), "watching the controllers' EndpointSlices: keeping the last list");
                continue;
            }
            None => return,
        }
        let slices: Vec<Arc<EndpointSlice>> = reader.state();
        let targets = targets(slices.iter().map(Arc::as_ref), &service);
        if targets.is_empty() {
            // Every controller restarting or unready: the last ones known are the best guess.
            continue;
        }
        if **tx.borrow() != targets {
            info!(controllers = ?targets.iter().map(|t| &t.url).collect::<Vec<_>>(), "controllers changed");
            write_cache(&cache, &targets);
            tx.send_replace(Arc::new(targets));
        }
    }
}

/// The ready endpoints of the slices, on the named port, sorted.
pub fn targets<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    service: &ServiceRef,
) -> Vec<Target> {
    let scheme = if service.server_name.is_some() {
        "https"
    } else {
        "http"
    };
    let mut out = BTreeSet::new();
    for slice in slices {
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(service.port_name.as_str()))
            .and_then(|p| p.port);
        let Some(port) = port.filter(|p| (1..=65535).contains(p)) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<std::net::IpAddr>() else {
                    continue;
                };
                let host = match ip {
                    std::net::IpAddr::V4(v4) => v4.to_string(),
                    std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                };
                out.insert(Target {
                    url: format!("{scheme}://{host}:{port}"),
                    server_name: service.server_name.clone(),
                });
            }
        }
    }
    out.into_iter().collect()
}

fn read_cache(path: &Path) -> Vec<Target> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_cache(path: &Path, targets: &[Target]) {
    let Ok(text) = serde_json::to_string(targets) else {
        return;
    };
    if let Err(e) = kubenft_tls::pki::write_atomically(path, &text) {
        warn!(error = %e, file = %path.display(), "cannot keep the controllers' list");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(port: (&str, i32), endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"},
            "addressType": "IPv4",
            "ports": [{"name": port.0, "port": port.1}],
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn service(tls: bool) -> ServiceRef {
        ServiceRef {
            namespace: "kubenft-system".into(),
            name: "kubenft-controller".into(),
            port_name: "grpc".into(),
            server_name: tls.then(|| "kubenft-controller.kubenft-system.svc".into()),
        }
    }

    #[test]
    fn only_ready_endpoints_on_the_named_port() {
        let s = slice(
            ("grpc", 9650),
            serde_json::json!([
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.5"]},
                {"addresses": ["10.244.3.5"], "conditions": {"ready": false}},
                {"addresses": ["10.244.4.5"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["fd00::5"], "conditions": {"ready": true}},
                {"addresses": ["not-an-ip"]},
            ]),
        );
        let t = targets([&s], &service(true));
        let urls: Vec<&str> = t.iter().map(|t| t.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "https://10.244.1.5:9650",
                "https://10.244.2.5:9650",
                "https://[fd00::5]:9650"
            ]
        );
        assert!(
            t.iter()
                .all(|t| t.server_name.as_deref() == Some("kubenft-controller.kubenft-system.svc"))
        );
        assert_eq!(
            targets([&s], &service(false))[0].url,
            "http://10.244.1.5:9650"
        );
        let other_port = slice(
            ("http", 9651),
            serde_json::json!([{"addresses": ["10.0.0.1"]}]),
        );
        assert!(targets([&other_port], &service(true)).is_empty());
    }

    #[test]
    fn the_last_list_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CACHE_FILE);
        assert!(read_cache(&path).is_empty());
        let list = vec![Target {
            url: "https://10.0.0.1:9650".into(),
            server_name: Some("x".into()),
        }];
        write_cache(&path, &list);
        assert_eq!(read_cache(&path), list);
        std::fs::write(&path, "garbage").unwrap();
        assert!(read_cache(&path).is_empty());
    }
}
