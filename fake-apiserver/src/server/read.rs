//! Reads: get, list and watch, as the real API server answers them (JSON lists with
//! `metadata.resourceVersion`; watches as newline-delimited events, `410 Gone` as an `ERROR`
//! event carrying a `Status`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use super::{Request, Shared, json_response};
use crate::status::{ApiError, status_object};
use crate::store::{FieldSelector, Filter, Kind, Selector};

/// One object.
pub(super) fn get(shared: &Shared, req: &Request) -> Result<Response, ApiError> {
    let key = req.target.key().ok_or_else(ApiError::no_such_resource)?;
    let store = shared.store.lock();
    let object = store
        .get(&key)
        .ok_or_else(|| ApiError::not_found(key.kind, &key.name))?;
    Ok(json_response(StatusCode::OK, object))
}

/// The filter of a list or watch: namespace, `labelSelector`, `fieldSelector`.
fn filter_of(req: &Request) -> Result<Filter, ApiError> {
    let q = |k: &str| req.query.get(k).map_or("", String::as_str);
    Ok(Filter {
        namespace: req.target.namespace.clone(),
        selector: Selector::parse(q("labelSelector")),
        fields: FieldSelector::parse(req.target.kind, q("fieldSelector"))?,
    })
}

/// The collection's current objects and version.
pub(super) fn list(shared: &Shared, req: &Request) -> Result<Response, ApiError> {
    let kind = req.target.kind;
    let filter = filter_of(req)?;
    let mut store = shared.store.lock();
    *store.lists.entry(kind).or_default() += 1;
    // An exact list at a version whose history is gone is 410, as from the real server.
    let exact = req
        .query
        .get("resourceVersionMatch")
        .is_some_and(|m| m == "Exact");
    if let Some(rv) = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        && exact
        && rv < store.compacted()
    {
        return Err(ApiError::expired(&format!(
            "too old resource version: {rv}"
        )));
    }
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.name()),
        "metadata": {"resourceVersion": store.resource_version().to_string()},
        "items": store.list(kind, &filter),
    });
    drop(store);
    Ok(json_response(StatusCode::OK, &body))
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

/// Streams the collection's events from a version (`resourceVersion`, or "any": the current
/// objects as `ADDED` first), as newline-delimited JSON.
pub(super) fn watch(shared: Arc<Shared>, req: &Request) -> Result<Response, ApiError> {
    let query = &req.query;
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
        ),
    };
    let kind = req.target.kind;
    let req = WatchRequest {
        kind,
        filter: filter_of(req)?,
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
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response())
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
        .map(|(change, object)| json!({"type": change, "object": object}))
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
