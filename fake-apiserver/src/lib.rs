//! A fake Kubernetes API server for tests and the lab.
//!
//! No real API server can run on the test machines, and a mocked client would not prove that
//! the real `kube` client copes with what a real server does. So this speaks the real HTTP
//! protocol over plain HTTP, for Services, EndpointSlices and Nodes (what kubenft watches) and
//! CertificateSigningRequests, Secrets and ConfigMaps (what its certificate issuance writes):
//!
//! - get, list and watch (resource versions, bookmarks, `410 Gone`, label selectors, the field
//!   selectors the real server supports);
//! - create (`generateName`, `409 AlreadyExists`), update (`409 Conflict` on a stale
//!   `resourceVersion`), patch (merge, JSON, strategic and apply patches, the last two
//!   approximated by a merge patch) and delete, each a watch event;
//! - the `status` subresource, and for CSRs `approval`, with the API server's rules: a CSR's
//!   requester identity is written by the server from the request's bearer token, its spec is
//!   fixed, approval conditions change only through `approval` and cannot be removed, the
//!   certificate is set only through `status` and never changed;
//! - bearer-token authentication (`401` for an unknown token) and a deny list for `403`.
//!   Requests without credentials are the admin `kubernetes-admin` (a simplification, so tests
//!   that do not care about identity need no token).
//!
//! A test can also break it on purpose: drop or stall watches, forget history, fail requests.
//!
//! ```text
//!  test ──apply/delete/faults──▶ Store (objects, history, rv) ──tick──▶ open watches
//!  kube client ──GET list──▶ items + metadata.resourceVersion
//!              ──GET ?watch=true&resourceVersion=N──▶ {"type":..,"object":..}\n ...
//!              ──POST/PUT/PATCH/DELETE──▶ auth ─▶ strategy (per-kind rules) ─▶ Store
//! ```
#![forbid(unsafe_code)]

pub mod auth;
mod csr;
mod names;
mod patch;
mod server;
pub mod status;
pub mod store;
mod strategy;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize as _, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use auth::{Resource, UserInfo, Verb};
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
    /// The objects the last [`FakeApiServer::sync_to`] held (a later sync deletes only those).
    synced: parking_lot::Mutex<BTreeSet<Key>>,
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
            synced: parking_lot::Mutex::new(BTreeSet::new()),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (anything serializing to an object of a [`Kind`] with
    /// `apiVersion` and `kind`), as stored in etcd: no API rules apply. Returns its new resource
    /// version, `None` if unchanged.
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

    /// One object as stored (`namespace` is ignored for cluster-scoped kinds).
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .store
            .lock()
            .get(&Key::new(kind, namespace, name))
            .cloned()
    }

    /// Every object of a kind, in every namespace, sorted by namespace and name.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .list(kind, &store::Filter::default())
    }

    /// Waits until the object exists and `ready` holds for it, at most `limit`; returns it, or
    /// `None` if that did not happen in time. Wakes on every change, no polling.
    pub async fn wait_for(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        limit: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let mut tick = self.shared.tick.subscribe();
        let wait = async {
            loop {
                tick.borrow_and_update();
                if let Some(o) = self.get(kind, namespace, name).filter(|o| ready(o)) {
                    return Some(o);
                }
                tick.changed().await.ok()?;
            }
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }

    /// Requests with `Authorization: Bearer TOKEN` are `user` (in `system:authenticated`).
    pub fn add_user(&self, token: &str, user: UserInfo) {
        self.shared.access.write().add_user(token, user);
    }

    /// From now on `username` may not `verb` the resource (a kind, or a subresource such as
    /// `Resource::sub(Kind::CertificateSigningRequest, "approval")`): `403 Forbidden`.
    pub fn deny(&self, username: &str, verb: Verb, resource: impl Into<Resource>) {
        self.shared
            .access
            .write()
            .deny(username, verb, resource.into());
    }

    /// Lifts every [`Self::deny`].
    pub fn allow_all(&self) {
        self.shared.access.write().allow_all();
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

    /// The kubeconfig a client uses to reach this server (no credentials: the admin user).
    pub fn kubeconfig(&self) -> String {
        kubeconfig_for(&self.url(), None)
    }

    /// Writes [`Self::kubeconfig`] to `path` (atomically: readers never see half a file).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        write_atomically(path, &self.kubeconfig())
    }

    /// A kubeconfig whose user authenticates with the bearer `token` (see [`Self::add_user`]).
    pub fn kubeconfig_with_token(&self, token: &str) -> String {
        kubeconfig_for(&self.url(), Some(token))
    }

    /// Writes [`Self::kubeconfig_with_token`] to `path`, atomically.
    pub fn write_kubeconfig_for(&self, path: &Path, token: &str) -> Result<()> {
        write_atomically(path, &self.kubeconfig_with_token(token))
    }

    /// Makes the store hold exactly `objects` among those the previous sync held (applying
    /// changes, deleting what is gone), as a re-read manifest directory would. Objects created
    /// through the API or [`Self::apply`] are left alone. Returns how many changes that made.
    pub fn sync_to(&self, objects: Vec<Value>) -> Result<usize> {
        let mut wanted = BTreeSet::new();
        let mut changes = 0;
        for object in objects {
            wanted.insert(store::key_of(&object)?);
            if self.shared.change(|s| s.apply(object))?.is_some() {
                changes += 1;
            }
        }
        let mut synced = self.synced.lock();
        for key in synced.difference(&wanted) {
            if self.delete(key.kind, &key.namespace, &key.name) {
                changes += 1;
            }
        }
        *synced = wanted;
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

/// A kubeconfig for `server`, with a bearer `token` or without credentials.
pub fn kubeconfig_for(server: &str, token: Option<&str>) -> String {
    // A JSON string is a YAML double-quoted scalar: any token stays one scalar.
    let user = match token {
        Some(t) => format!("\n    token: {}", Value::String(t.to_owned())),
        None => " {}".to_owned(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\nusers:\n- name: fake\n  user:{user}\npreferences: {{}}\n"
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

/// Reads the objects of the kinds the fake serves from every `*.yaml`, `*.yml` and `*.json` file in
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
