//! The HTTP side: list and watch for the three collections, as the real API server answers
//! them (JSON lists with `metadata.resourceVersion`; watches as newline-delimited events,
//! `410 Gone` as an `ERROR` event carrying a `Status`; errors as `Status` bodies).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

use crate::store::{Filter, Kind, Selector, Store};

/// Shared between the handle and every request.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    /// Bumped on every change to the store or the faults, to wake open watches.
    pub tick: watch::Sender<u64>,
}

impl Shared {
    pub fn new() -> Self {
        Shared {
            store: Mutex::new(Store::default()),
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

/// Which collection a path names, and the namespace if it is a namespaced path.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    Kind::ALL.into_iter().find_map(|kind| {
        let rest = path.strip_prefix(kind.group_prefix())?;
        if rest == format!("/{}", kind.plural()) {
            return Some((kind, None));
        }
        let rest = rest.strip_prefix("/namespaces/")?;
        let (ns, plural) = rest.split_once('/')?;
        (kind.namespaced() && plural == kind.plural() && !ns.is_empty())
            .then(|| (kind, Some(ns.to_owned())))
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    debug!(%method, %uri, "request");
    let Some((kind, namespace)) = route(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if method != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake serves GET only",
        );
    }
    if let Some(code) = injected_failure(&shared, kind) {
        info!(%uri, code = code.as_u16(), "injected failure");
        return status(code, "InternalError", "injected failure");
    }
    let filter = Filter {
        namespace,
        selector: Selector::parse(query.get("labelSelector").map_or("", String::as_str)),
    };
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        watch_response(shared, kind, filter, &query)
    } else {
        list_response(&shared, kind, &filter, &query)
    }
}

/// Consumes one injected failure, if any applies.
fn injected_failure(shared: &Shared, kind: Kind) -> Option<StatusCode> {
    let mut store = shared.store.lock();
    if let Some(code) = store.faults.fail_kind.get(&kind) {
        return StatusCode::from_u16(*code).ok();
    }
    match store.faults.fail_next {
        Some((n, code)) if n > 0 => {
            store.faults.fail_next = (n > 1).then_some((n - 1, code));
            StatusCode::from_u16(code).ok()
        }
        _ => None,
    }
}

fn list_response(
    shared: &Shared,
    kind: Kind,
    filter: &Filter,
    query: &HashMap<String, String>,
) -> Response {
    let mut store = shared.store.lock();
    *store.lists.entry(kind).or_default() += 1;
    // An exact list at a version whose history is gone is 410, as from the real server.
    let exact = query
        .get("resourceVersionMatch")
        .is_some_and(|m| m == "Exact");
    if let Some(rv) = query
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        && exact
        && rv < store.compacted()
    {
        return status(
            StatusCode::GONE,
            "Expired",
            &format!("too old resource version: {rv}"),
        );
    }
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.name()),
        "metadata": {"resourceVersion": store.resource_version().to_string()},
        "items": store.list(kind, filter),
    });
    drop(store);
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A `Status` object, as the API server returns for errors.
fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        status_object(code.as_u16(), reason, message).to_string(),
    )
        .into_response()
}

/// What one watch request asked for.
struct WatchRequest {
    kind: Kind,
    filter: Filter,
    /// `None`: "any" (`""` or `"0"`): start with the current objects as `ADDED`.
    from: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
}

fn watch_response(
    shared: Arc<Shared>,
    kind: Kind,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Response {
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid resourceVersion {v:?}"),
                );
            }
        },
    };
    let req = WatchRequest {
        kind,
        filter,
        from,
        bookmarks: query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true"),
        timeout: Duration::from_secs(
            query
                .get("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .unwrap_or(1800),
        ),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(run_watch(shared, req, tx));
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response()
}

type Lines = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Streams one watch until it times out, is dropped or expired, or the client goes away.
async fn run_watch(shared: Arc<Shared>, req: WatchRequest, tx: Lines) {
    let mut tick = shared.tick.subscribe();
    let deadline = tokio::time::Instant::now() + req.timeout;
    let (drop_gen, expire_gen, mut cursor, initial) = {
        let store = shared.store.lock();
        let initial = match req.from {
            None => store.list(req.kind, &req.filter),
            Some(_) => Vec::new(),
        };
        (
            store.faults.drop_generation,
            store.faults.expire_generation,
            req.from.unwrap_or(store.resource_version()),
            initial,
        )
    };
    for object in initial {
        if !send(&tx, &json!({"type": "ADDED", "object": object})).await {
            return;
        }
    }
    let mut announced = cursor;
    loop {
        tick.borrow_and_update();
        let step = next_step(
            &shared,
            &req,
            drop_gen,
            expire_gen,
            &mut cursor,
            &mut announced,
        );
        match step {
            Step::Abort => {
                debug!(kind = %req.kind, "dropping watch");
                let _ = tx
                    .send(Err(std::io::Error::other("watch dropped by the fake")))
                    .await;
                return;
            }
            Step::Gone(message) => {
                let event =
                    json!({"type": "ERROR", "object": status_object(410, "Expired", &message)});
                send(&tx, &event).await;
                return;
            }
            Step::Send(lines) => {
                for line in lines {
                    if !send(&tx, &line).await {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            r = tick.changed() => if r.is_err() { return },
            () = tokio::time::sleep_until(deadline) => return,
            () = tx.closed() => return,
        }
    }
}

enum Step {
    Abort,
    Gone(String),
    Send(Vec<Value>),
}

/// What a watch does next, decided under the lock.
fn next_step(
    shared: &Shared,
    req: &WatchRequest,
    drop_gen: u64,
    expire_gen: u64,
    cursor: &mut u64,
    announced: &mut u64,
) -> Step {
    let store = shared.store.lock();
    if store.faults.drop_generation != drop_gen {
        return Step::Abort;
    }
    let gone = || {
        Step::Gone(format!(
            "too old resource version: {cursor} ({})",
            store.compacted()
        ))
    };
    if store.faults.expire_generation != expire_gen {
        return gone();
    }
    if store.faults.stalled {
        return Step::Send(Vec::new());
    }
    let Some(events) = store.events_after(req.kind, &req.filter, *cursor) else {
        return gone();
    };
    let mut lines: Vec<Value> = events
        .into_iter()
        .map(|e| json!({"type": e.kind_of_change, "object": e.object}))
        .collect();
    *cursor = store.resource_version();
    if lines.is_empty() && req.bookmarks && *cursor > *announced {
        lines.push(json!({
            "type": "BOOKMARK",
            "object": {
                "apiVersion": req.kind.api_version(),
                "kind": req.kind.name(),
                "metadata": {"resourceVersion": cursor.to_string()},
            },
        }));
    }
    *announced = *cursor;
    Step::Send(lines)
}

async fn send(tx: &Lines, event: &Value) -> bool {
    let mut line = event.to_string();
    line.push('\n');
    tx.send(Ok(Bytes::from(line))).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/api/v1/services"), Some((Kind::Service, None)));
        assert_eq!(
            route("/api/v1/namespaces/kube-system/services"),
            Some((Kind::Service, Some("kube-system".into())))
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/endpointslices"),
            Some((Kind::EndpointSlice, None))
        );
        assert_eq!(route("/api/v1/nodes"), Some((Kind::Node, None)));
        assert_eq!(route("/api/v1/namespaces/x/nodes"), None);
        assert_eq!(route("/api/v1/pods"), None);
    }
}
