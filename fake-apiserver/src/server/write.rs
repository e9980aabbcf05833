//! Writes: create (POST), update (PUT), patch (PATCH) and delete (DELETE), of objects and of
//! their `status` and `approval` subresources, with the API server's checks in its order:
//! decoding (400), existence (404/409), preconditions (409), then the kind's rules (422). Each
//! change is one store transaction and one watch event.

use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::{Request, Shared, json_response, now};
use crate::patch::{self, PatchKind};
use crate::status::ApiError;
use crate::store::{Key, Preconditions, Store, remove_field, set_meta};
use crate::strategy::{self, Part};

/// POST to a collection.
pub(super) fn create(shared: &Shared, req: &Request) -> Result<Response, ApiError> {
    refuse_dry_run(req)?;
    let object = decode_object(req, &req.body)?;
    let created = shared.change(|store| create_in(store, req, object))?;
    Ok(json_response(StatusCode::CREATED, &created))
}

/// PUT of an object or a subresource.
pub(super) fn update(shared: &Shared, req: &Request) -> Result<Response, ApiError> {
    refuse_dry_run(req)?;
    let object = decode_object(req, &req.body)?;
    let key = req.target.key().ok_or_else(ApiError::no_such_resource)?;
    check_name(&key, &object)?;
    let updated = shared.change(|store| update_in(store, req, &key, object))?;
    Ok(json_response(StatusCode::OK, &updated))
}

/// PATCH of an object or a subresource. An apply patch of a missing object creates it.
pub(super) fn patch(shared: &Shared, req: &Request) -> Result<Response, ApiError> {
    refuse_dry_run(req)?;
    let content_type = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let kind = PatchKind::from_content_type(content_type)?;
    if kind == PatchKind::Apply && req.query.get("fieldManager").is_none_or(String::is_empty) {
        return Err(ApiError::invalid_options(
            "fieldManager: Required value: is required for apply patch",
        ));
    }
    let body = patch::parse_body(kind, &req.body)?;
    let key = req.target.key().ok_or_else(ApiError::no_such_resource)?;
    shared.change(|store| {
        let Some(stored) = store.get(&key).cloned() else {
            if kind == PatchKind::Apply && req.target.part == Part::Main {
                let object = with_type_and_namespace(req, body)?;
                check_name(&key, &object)?;
                let created = create_in(store, req, object)?;
                return Ok(json_response(StatusCode::CREATED, &created));
            }
            return Err(ApiError::not_found(key.kind, &key.name));
        };
        let object = patch::apply(kind, &stored, body)?;
        check_name(&key, &object)?;
        let updated = update_in(store, req, &key, object)?;
        Ok(json_response(StatusCode::OK, &updated))
    })
}

/// DELETE of an object; a body may carry `DeleteOptions` with `preconditions`.
pub(super) fn delete(shared: &Shared, req: &Request) -> Result<Response, ApiError> {
    refuse_dry_run(req)?;
    let key = req.target.key().ok_or_else(ApiError::no_such_resource)?;
    let wanted = delete_preconditions(&req.body)?;
    let deleted = shared.change(|store| store.remove(&key, &wanted))?;
    Ok(json_response(StatusCode::OK, &deleted))
}

fn create_in(store: &mut Store, req: &Request, mut object: Value) -> Result<Value, ApiError> {
    let kind = req.target.kind;
    let has_name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let prefix = object
        .pointer("/metadata/generateName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if !has_name && !prefix.is_empty() {
        let ns = req.target.namespace.as_deref().unwrap_or("");
        let name = store.generate_name(kind, ns, &prefix);
        set_meta(&mut object, "name", json!(name));
    }
    // What only the server sets.
    for f in ["uid", "resourceVersion", "creationTimestamp"] {
        remove_field(&mut object, f);
    }
    strategy::prepare_create(kind, &mut object, &req.user)?;
    store.create(object, &now())
}

fn update_in(
    store: &mut Store,
    req: &Request,
    key: &Key,
    object: Value,
) -> Result<Value, ApiError> {
    store.check_preconditions(key, &Preconditions::of_object(&object))?;
    let stored = store
        .get(key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(key.kind, &key.name))?;
    let prepared = strategy::prepare_update(key.kind, req.target.part, &stored, object, &now())?;
    store.replace(key, prepared)
}

/// The body as an object of the target's kind: `apiVersion` and `kind` default to the path's
/// and must match it; the namespace defaults to the path's and must match it.
fn decode_object(req: &Request, body: &[u8]) -> Result<Value, ApiError> {
    let object: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the body of the request could not be decoded: {e}"))
    })?;
    with_type_and_namespace(req, object)
}

fn with_type_and_namespace(req: &Request, mut object: Value) -> Result<Value, ApiError> {
    let kind = req.target.kind;
    if !object.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request is not an object",
        ));
    }
    for (field, want) in [("apiVersion", kind.api_version()), ("kind", kind.name())] {
        match object.get(field).and_then(Value::as_str) {
            None | Some("") => object[field] = json!(want),
            Some(got) if got == want => {}
            Some(got) => {
                return Err(ApiError::bad_request(format!(
                    "the {field} of the provided object ({got}) does not match the request's ({want})"
                )));
            }
        }
    }
    if !kind.namespaced() {
        remove_field(&mut object, "namespace");
        return Ok(object);
    }
    let url_ns = req.target.namespace.as_deref().unwrap_or("");
    match object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
    {
        None | Some("") => set_meta(&mut object, "namespace", json!(url_ns)),
        Some(ns) if ns == url_ns => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    Ok(object)
}

/// The body's name must be the path's.
fn check_name(key: &Key, object: &Value) -> Result<(), ApiError> {
    match object.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) if name == key.name => Ok(()),
        None | Some("") => Err(ApiError::bad_request(
            "name is required in the body of the request",
        )),
        Some(name) => Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            key.name
        ))),
    }
}

fn delete_preconditions(body: &[u8]) -> Result<Preconditions, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Preconditions::default());
    }
    let options: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the DeleteOptions could not be decoded: {e}"))
    })?;
    let s = |p: &str| {
        options
            .pointer(p)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Ok(Preconditions {
        uid: s("/preconditions/uid"),
        resource_version: s("/preconditions/resourceVersion"),
    })
}

/// The fake stores every write: a dry run is refused rather than silently carried out.
fn refuse_dry_run(req: &Request) -> Result<(), ApiError> {
    match req.query.get("dryRun") {
        Some(_) => Err(ApiError::bad_request(
            "the fake API server does not support dryRun",
        )),
        None => Ok(()),
    }
}
