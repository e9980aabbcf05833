//! The HTTP side, as the real API server answers: paths (`/api/v1/...`, `/apis/GROUP/v1/...`,
//! namespaced or not, objects and their subresources), verbs, status codes, `Status` bodies for
//! errors. Each request is authenticated (`auth`), authorized, checked against the injected
//! faults, then served by `read` (get, list, watch) or `write` (create, update, patch, delete).

mod read;
mod write;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::auth::{Access, Resource, Scope, UserInfo, Verb};
use crate::status::ApiError;
use crate::store::{Key, Kind, Store};
use crate::strategy::Part;

/// Shared between the handle and every request.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub access: RwLock<Access>,
    /// Bumped on every change to the store or the faults, to wake open watches.
    pub tick: watch::Sender<u64>,
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            store: Mutex::new(Store::default()),
            access: RwLock::new(Access::default()),
            tick: watch::channel(0).0,
        }
    }

    /// Runs `f` on the store, then wakes the watches.
    pub fn change<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let out = f(&mut self.store.lock());
        self.tick.send_modify(|t| *t += 1);
        out
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

/// What a path names.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Target {
    pub kind: Kind,
    /// `None`: a cluster-scoped kind, or a namespaced kind across all namespaces.
    pub namespace: Option<String>,
    /// `None`: the collection.
    pub name: Option<String>,
    pub part: Part,
}

impl Target {
    /// The key of a named target.
    fn key(&self) -> Option<Key> {
        let name = self.name.as_deref()?;
        Some(Key::new(
            self.kind,
            self.namespace.as_deref().unwrap_or(""),
            name,
        ))
    }

    fn resource(&self) -> Resource {
        match self.part.subresource() {
            Some(sub) => Resource::sub(self.kind, sub),
            None => self.kind.into(),
        }
    }
}

/// The target of a path, if the fake serves it.
fn route(path: &str) -> Option<Target> {
    Kind::ALL.into_iter().find_map(|kind| {
        let rest = path.strip_prefix(kind.group_prefix())?.strip_prefix('/')?;
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return None;
        }
        let (namespace, tail) = match segments.as_slice() {
            ["namespaces", ns, tail @ ..] if kind.namespaced() && !tail.is_empty() => {
                (Some((*ns).to_owned()), tail)
            }
            tail => (None, tail),
        };
        let (plural, name, sub) = match tail {
            [plural] => (*plural, None, None),
            [plural, name] => (*plural, Some(*name), None),
            [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
            _ => return None,
        };
        // A namespaced kind's objects are only reachable inside their namespace.
        if plural != kind.plural() || (kind.namespaced() && namespace.is_none() && name.is_some()) {
            return None;
        }
        Some(Target {
            kind,
            namespace,
            name: name.map(str::to_owned),
            part: Part::of(kind, sub)?,
        })
    })
}

/// The verb a request means for its target.
fn verb_of(
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<Verb, ApiError> {
    let named = target.name.is_some();
    let creatable = !target.kind.namespaced() || target.namespace.is_some();
    let verb = match (method.as_str(), named) {
        ("GET", true) => Verb::Get,
        ("GET", false) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            Verb::Watch
        }
        ("GET", false) => Verb::List,
        ("POST", false) if creatable && target.part == Part::Main => Verb::Create,
        ("PUT", true) => Verb::Update,
        ("PATCH", true) => Verb::Patch,
        ("DELETE", true) if target.part == Part::Main => Verb::Delete,
        _ => return Err(ApiError::method_not_allowed(method.as_str())),
    };
    Ok(verb)
}

/// One request, as the handlers see it.
pub(crate) struct Request {
    pub target: Target,
    pub user: UserInfo,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    debug!(%method, %uri, "request");
    serve(&shared, &method, &uri, headers, query, body).unwrap_or_else(|e| {
        debug!(%method, %uri, code = e.code, reason = e.reason, message = %e.message, "refused");
        error_response(&e)
    })
}

fn serve(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: HeaderMap,
    query: HashMap<String, String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let target = route(uri.path()).ok_or_else(ApiError::no_such_resource)?;
    let verb = verb_of(method, &target, &query)?;
    let user = {
        let access = shared.access.read();
        let user = access.authenticate(
            headers
                .get(header::AUTHORIZATION)
                .map(axum::http::HeaderValue::as_bytes),
        )?;
        let scope = Scope {
            name: target.name.as_deref(),
            namespace: target.namespace.as_deref(),
        };
        access.authorize(&user, verb, &target.resource(), scope)?;
        user
    };
    if let Some(code) = injected_failure(shared, target.kind) {
        info!(%uri, code, "injected failure");
        return Err(ApiError::injected(code));
    }
    let req = Request {
        target,
        user,
        query,
        headers,
        body,
    };
    match verb {
        Verb::Get => read::get(shared, &req),
        Verb::List => read::list(shared, &req),
        Verb::Watch => read::watch(shared.clone(), &req),
        Verb::Create => write::create(shared, &req),
        Verb::Update => write::update(shared, &req),
        Verb::Patch => write::patch(shared, &req),
        Verb::Delete => write::delete(shared, &req),
    }
}

/// Consumes one injected failure, if any applies.
fn injected_failure(shared: &Shared, kind: Kind) -> Option<u16> {
    let mut store = shared.store.lock();
    if let Some(code) = store.faults.fail_kind.get(&kind) {
        return Some(*code);
    }
    match store.faults.fail_next {
        Some((n, code)) if n > 0 => {
            store.faults.fail_next = (n > 1).then_some((n - 1, code));
            Some(code)
        }
        _ => None,
    }
}

pub(crate) fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.to_status())
}

/// The current time as the API server writes timestamps (RFC 3339, seconds, UTC).
pub(crate) fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(kind: Kind, ns: Option<&str>, name: Option<&str>, part: Part) -> Option<Target> {
        Some(Target {
            kind,
            namespace: ns.map(str::to_owned),
            name: name.map(str::to_owned),
            part,
        })
    }

    #[test]
    fn routes() {
        use Kind::*;
        use Part::*;
        assert_eq!(route("/api/v1/services"), t(Service, None, None, Main));
        assert_eq!(
            route("/api/v1/namespaces/kube-system/services"),
            t(Service, Some("kube-system"), None, Main)
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/endpointslices"),
            t(EndpointSlice, None, None, Main)
        );
        assert_eq!(route("/api/v1/nodes"), t(Node, None, None, Main));
        assert_eq!(
            route("/api/v1/nodes/a/status"),
            t(Node, None, Some("a"), Status)
        );
        assert_eq!(route("/api/v1/namespaces/x/nodes"), None);
        assert_eq!(route("/api/v1/pods"), None);
        assert_eq!(
            route("/api/v1/namespaces/kube-system/secrets/ca"),
            t(Secret, Some("kube-system"), Some("ca"), Main)
        );
        assert_eq!(
            route("/api/v1/secrets/ca"),
            None,
            "a namespaced object needs its namespace"
        );
        assert_eq!(route("/api/v1/namespaces/x/secrets/ca/status"), None);
        assert_eq!(
            route("/api/v1/namespaces/x/configmaps"),
            t(ConfigMap, Some("x"), None, Main)
        );
        let csrs = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
        assert_eq!(route(csrs), t(CertificateSigningRequest, None, None, Main));
        assert_eq!(
            route(&format!("{csrs}/n/approval")),
            t(CertificateSigningRequest, None, Some("n"), Approval)
        );
        assert_eq!(
            route(&format!("{csrs}/n/status")),
            t(CertificateSigningRequest, None, Some("n"), Status)
        );
        assert_eq!(route(&format!("{csrs}/n/scale")), None);
        assert_eq!(route(&format!("{csrs}//approval")), None);
    }

    #[test]
    fn verbs() {
        let q = HashMap::new();
        let coll = route("/api/v1/namespaces/x/secrets").unwrap();
        let all = route("/api/v1/secrets").unwrap();
        let obj = route("/api/v1/namespaces/x/secrets/s").unwrap();
        assert_eq!(verb_of(&Method::POST, &coll, &q), Ok(Verb::Create));
        assert_eq!(verb_of(&Method::POST, &all, &q).unwrap_err().code, 405);
        assert_eq!(verb_of(&Method::PUT, &coll, &q).unwrap_err().code, 405);
        assert_eq!(verb_of(&Method::DELETE, &obj, &q), Ok(Verb::Delete));
        let watch = HashMap::from([("watch".to_owned(), "true".to_owned())]);
        assert_eq!(verb_of(&Method::GET, &all, &watch), Ok(Verb::Watch));
    }
}
