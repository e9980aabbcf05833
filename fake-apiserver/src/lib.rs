//! A fake Kubernetes API server for tests and the lab.
//!
//! No real API server can run on the test machines, and a mocked client would not prove that
//! the real `kube` watcher copes with what a real server does. So this speaks the real HTTP
//! list/watch protocol for Services, EndpointSlices and Nodes (resource versions, bookmarks,
//! `410 Gone`, label selectors) over plain HTTP, and lets a test break it on purpose: drop or
//! stall watches, forget history, fail requests.
//!
//! ```text
//!  test ──apply/delete/faults──▶ Store (objects, history, rv) ──tick──▶ open watches
//!  kube client ──GET list──▶ items + metadata.resourceVersion
//!              ──GET ?watch=true&resourceVersion=N──▶ {"type":..,"object":..}\n ...
//! ```
#![forbid(unsafe_code)]

mod server;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize as _, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use store::{Key, Kind};

use server::Shared;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the fake API server does not serve {0:?}")]
    UnsupportedKind(String),
    #[error("a {0} without metadata.name")]
    MissingName(Kind),
    #[error("object does not serialize to JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A running fake API server. Stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl FakeApiServer {
    /// Serves on `addr` (`127.0.0.1:0` for a random port).
    pub async fn start(addr: SocketAddr) -> Result<FakeApiServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Listen { addr, source })?;
        let shared = Arc::new(Shared::new());
        let shutdown = CancellationToken::new();
        let router = server::router(shared.clone());
        let token = shutdown.clone();
        tokio::spawn(async move {
            let serve =
                axum::serve(listener, router).with_graceful_shutdown(token.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "fake API server failed");
            }
        });
        // Open watches end when their tick sender goes; make sure they see the shutdown.
        let (s, token) = (shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            token.cancelled().await;
            s.change(|st| st.faults.drop_generation += 1);
        });
        info!(%addr, "fake API server listening");
        Ok(FakeApiServer {
            addr,
            shared,
            shutdown,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (anything serializing to a Service, EndpointSlice or Node
    /// with `apiVersion` and `kind`). Returns its new resource version, `None` if unchanged.
    pub fn apply(&self, object: impl Serialize) -> Result<Option<u64>> {
        let value = serde_json::to_value(object)?;
        self.shared.change(|s| s.apply(value))
    }

    /// Deletes an object; `false` if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.shared.change(|s| s.delete(kind, namespace, name))
    }

    /// The keys of every object held.
    pub fn keys(&self) -> Vec<Key> {
        self.shared.store.lock().keys()
    }

    /// Forgets all history (as etcd compaction does): open watches receive an `ERROR` event
    /// with a `410 Gone` Status and end; watches resuming from an earlier version get the same.
    pub fn expire_history(&self) {
        self.shared.change(store::Store::expire_history);
    }

    /// Aborts every open watch connection mid-stream.
    pub fn drop_watches(&self) {
        self.shared.change(|s| s.faults.drop_generation += 1);
    }

    /// While stalled, open and new watches deliver nothing (the connection stays open).
    pub fn stall_watches(&self, stalled: bool) {
        self.shared.change(|s| s.faults.stalled = stalled);
    }

    /// The next `n` requests (lists or watches, any collection) fail with HTTP `status`.
    pub fn fail_next(&self, n: u32, status: u16) {
        self.shared
            .change(|s| s.faults.fail_next = (n > 0).then_some((n, status)));
    }

    /// Every request for `kind` fails with HTTP `status` until called with `None`.
    pub fn fail_kind(&self, kind: Kind, status: Option<u16>) {
        self.shared.change(|s| match status {
            Some(code) => s.faults.fail_kind.insert(kind, code),
            None => s.faults.fail_kind.remove(&kind),
        });
    }

    /// How many list requests `kind` has served (a relist shows up here).
    pub fn list_count(&self, kind: Kind) -> u32 {
        self.shared
            .store
            .lock()
            .lists
            .get(&kind)
            .copied()
            .unwrap_or(0)
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().resource_version()
    }

    /// The kubeconfig a client uses to reach this server.
    pub fn kubeconfig(&self) -> String {
        kubeconfig_text(&self.url())
    }

    /// Writes [`Self::kubeconfig`] to `path` (atomically: readers never see half a file).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        write_atomically(path, &self.kubeconfig())
    }

    /// Makes the store hold exactly `objects` (applying changes and deleting the rest), as a
    /// re-read manifest directory would. Returns how many changes that made.
    pub fn sync_to(&self, objects: Vec<Value>) -> Result<usize> {
        let mut wanted = std::collections::BTreeSet::new();
        let mut changes = 0;
        for object in objects {
            wanted.insert(store::key_of(&object)?);
            if self.shared.change(|s| s.apply(object))?.is_some() {
                changes += 1;
            }
        }
        for key in self.keys() {
            if !wanted.contains(&key) && self.delete(key.kind, &key.namespace, &key.name) {
                changes += 1;
            }
        }
        Ok(changes)
    }

    /// Stops serving (also done on drop).
    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn kubeconfig_text(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\nusers:\n- name: fake\n  user: {{}}\npreferences: {{}}\n"
    )
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads the Services, EndpointSlices and Nodes of every `*.yaml`, `*.yml` and `*.json` file in
/// `dir` (multi-document files and `kind: List` accepted; other kinds skipped).
pub fn read_manifests(dir: &Path) -> Result<Vec<Value>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::Manifest {
            path: dir.to_owned(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for path in files {
        let manifest_err = |message: String| Error::Manifest {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| manifest_err(e.to_string()))?;
        let docs: Vec<Value> = yaml_serde::Deserializer::from_str(&text)
            .map(Value::deserialize)
            .collect::<Result<_, _>>()
            .map_err(|e| manifest_err(e.to_string()))?;
        for doc in docs {
            flatten(doc, &mut objects);
        }
    }
    Ok(objects)
}

fn flatten(doc: Value, out: &mut Vec<Value>) {
    let s = |p: &str| {
        doc.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    match (s("/apiVersion").as_str(), s("/kind").as_str()) {
        ("v1", "List") => {
            if let Some(Value::Array(items)) = doc.get("items") {
                for item in items.clone() {
                    flatten(item, out);
                }
            }
        }
        (api, kind) if Kind::of(api, kind).is_some() => out.push(doc),
        (api, kind) if !doc.is_null() => {
            tracing::warn!(
                api_version = api,
                kind,
                "skipping a kind the fake does not serve"
            );
        }
        _ => {}
    }
}
