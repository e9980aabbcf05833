//! Per-kind rules for writes, as the API server's registry strategies apply them: what a create
//! fills in or clears, what an update of the object or of a subresource may change, and the
//! validation that refuses the rest with `422 Invalid`.
//!
//! The fake validates names for every kind, CertificateSigningRequests fully (`csr`), Secrets
//! and ConfigMaps for their keys, encodings and `immutable`; Service, EndpointSlice and Node
//! bodies are stored as sent.

use base64::prelude::{BASE64_STANDARD, Engine as _};
use serde_json::{Map, Value, json};

use crate::auth::UserInfo;
use crate::csr;
use crate::names;
use crate::status::{ApiError, FieldError};
use crate::store::Kind;

/// Which part of an object an update addresses: the object itself or a subresource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
    Approval,
}

impl Part {
    /// The part a subresource path names, if `kind` has it.
    pub fn of(kind: Kind, subresource: Option<&str>) -> Option<Part> {
        match subresource {
            None => Some(Part::Main),
            Some("status") if kind.has_status() => Some(Part::Status),
            Some("approval") if kind == Kind::CertificateSigningRequest => Some(Part::Approval),
            _ => None,
        }
    }

    pub fn subresource(self) -> Option<&'static str> {
        match self {
            Part::Main => None,
            Part::Status => Some("status"),
            Part::Approval => Some("approval"),
        }
    }
}

/// Prepares and validates an object being created by `user` (its name already chosen).
pub fn prepare_create(kind: Kind, object: &mut Value, user: &UserInfo) -> Result<(), ApiError> {
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let mut errs = name_problems(kind, &name);
    match kind {
        Kind::CertificateSigningRequest => {
            csr::check_encoding(object)?;
            csr::prepare_create(object, user);
            errs.extend(csr::validate_create(object));
        }
        Kind::Secret => {
            prepare_secret(object)?;
            errs.extend(config_key_problems(object));
        }
        Kind::ConfigMap => errs.extend(config_key_problems(object)),
        Kind::Service | Kind::EndpointSlice | Kind::Node | Kind::Event => {}
    }
    refuse(kind, &name, errs)
}

/// The object to store for an update of `part` of `old` with `new`, validated.
pub fn prepare_update(
    kind: Kind,
    part: Part,
    old: &Value,
    mut new: Value,
    now: &str,
) -> Result<Value, ApiError> {
    let name = old
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if kind == Kind::CertificateSigningRequest {
        csr::check_encoding(&new)?;
        let new = csr::prepare_update(part, old, new, now);
        refuse(kind, &name, csr::validate_update(part, &new, old))?;
        return Ok(new);
    }
    match part {
        // The main resource ignores the status of kinds that have a status subresource.
        Part::Main if kind.has_status() => copy_field(old, &mut new, "status"),
        Part::Main => {}
        // A status update changes nothing but the status.
        Part::Status | Part::Approval => copy_field(old, &mut new, "spec"),
    }
    let mut errs = Vec::new();
    match kind {
        Kind::Secret => {
            prepare_secret(&mut new)?;
            errs.extend(config_key_problems(&new));
            errs.extend(immutability_problems(old, &new, &["data", "type"]));
        }
        Kind::ConfigMap => {
            errs.extend(config_key_problems(&new));
            errs.extend(immutability_problems(old, &new, &["data", "binaryData"]));
        }
        _ => {}
    }
    refuse(kind, &name, errs)?;
    Ok(new)
}

fn refuse(kind: Kind, name: &str, errs: Vec<FieldError>) -> Result<(), ApiError> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(kind, name, &errs))
    }
}

fn copy_field(from: &Value, to: &mut Value, field: &str) {
    let Some(to) = to.as_object_mut() else {
        return;
    };
    match from.get(field) {
        Some(v) => {
            to.insert(field.to_owned(), v.clone());
        }
        None => {
            to.remove(field);
        }
    }
}

/// The name rules of each kind (CSR names are free-form, as upstream).
fn name_problems(kind: Kind, name: &str) -> Vec<FieldError> {
    if name.is_empty() {
        return vec![FieldError::required(
            "metadata.name",
            "name or generateName is required",
        )];
    }
    let problems = match kind {
        Kind::CertificateSigningRequest => Vec::new(),
        Kind::Service => names::dns1035_label(name),
        _ => names::dns1123_subdomain(name),
    };
    problems
        .into_iter()
        .map(|p| FieldError::invalid("metadata.name", name, p))
        .collect()
}

/// `stringData` is written into `data` (and never stored); `type` defaults to `Opaque`;
/// `data` values must be base64.
fn prepare_secret(secret: &mut Value) -> Result<(), ApiError> {
    let Some(obj) = secret.as_object_mut() else {
        return Err(ApiError::bad_request("a Secret must be a JSON object"));
    };
    let mut data = match obj.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ApiError::bad_request("data: expected an object")),
    };
    for (k, v) in &data {
        if v.as_str()
            .is_none_or(|s| BASE64_STANDARD.decode(s).is_err())
        {
            return Err(ApiError::bad_request(format!(
                "data[{k}]: illegal base64 data (expected a base64 string)"
            )));
        }
    }
    match obj.remove("stringData") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Value::String(s) = v else {
                    return Err(ApiError::bad_request(format!(
                        "stringData[{k}]: expected a string"
                    )));
                };
                data.insert(k, json!(BASE64_STANDARD.encode(s)));
            }
        }
        Some(_) => return Err(ApiError::bad_request("stringData: expected an object")),
    }
    if !data.is_empty() {
        obj.insert("data".into(), Value::Object(data));
    }
    if obj
        .get("type")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        obj.insert("type".into(), json!("Opaque"));
    }
    Ok(())
}

/// Keys of `data` and `binaryData` must be config keys.
fn config_key_problems(object: &Value) -> Vec<FieldError> {
    const MSG: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or \
        '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is \
        '[-._a-zA-Z0-9]+')";
    let mut errs = Vec::new();
    for field in ["data", "binaryData"] {
        let Some(map) = object.get(field).and_then(Value::as_object) else {
            continue;
        };
        for key in map.keys() {
            let ok = !key.is_empty()
                && key != "."
                && key != ".."
                && key.len() <= names::SUBDOMAIN_MAX
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
            if !ok {
                errs.push(FieldError::invalid(field, key, MSG));
            }
        }
    }
    errs
}

/// An object marked `immutable: true` keeps its contents and the mark; a Secret's `type` never
/// changes.
fn immutability_problems(old: &Value, new: &Value, contents: &[&str]) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(t) = contents
        .contains(&"type")
        .then(|| old.get("type"))
        .flatten()
        && new.get("type") != Some(t)
    {
        let value = new.get("type").and_then(Value::as_str).unwrap_or("");
        errs.push(FieldError::invalid("type", value, "field is immutable"));
    }
    if old.get("immutable") != Some(&Value::Bool(true)) {
        return errs;
    }
    const WHY: &str = "field is immutable when `immutable` is set";
    if new.get("immutable") != Some(&Value::Bool(true)) {
        errs.push(FieldError::forbidden("immutable", WHY));
    }
    for field in contents.iter().filter(|f| **f != "type") {
        if old.get(*field) != new.get(*field) {
            errs.push(FieldError::forbidden(*field, WHY));
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(extra: Value) -> Value {
        let mut s = json!({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": "kubenft-ca", "namespace": "kube-system"}});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    }

    #[test]
    fn secrets_fold_string_data_and_default_their_type() {
        let mut s = secret(json!({"data": {"a": "eA=="}, "stringData": {"b": "y"}}));
        prepare_create(Kind::Secret, &mut s, &UserInfo::admin()).unwrap();
        assert_eq!(s["data"], json!({"a": "eA==", "b": "eQ=="}));
        assert!(s.get("stringData").is_none());
        assert_eq!(s["type"], "Opaque");

        let mut bad = secret(json!({"data": {"a": "not base64!"}}));
        let e = prepare_create(Kind::Secret, &mut bad, &UserInfo::admin()).unwrap_err();
        assert_eq!(e.code, 400);
        let mut bad_key = secret(json!({"data": {"a/b": "eA=="}}));
        let e = prepare_create(Kind::Secret, &mut bad_key, &UserInfo::admin()).unwrap_err();
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        assert!(
            e.message.contains(r#"data: Invalid value: "a/b""#),
            "{}",
            e.message
        );
    }

    #[test]
    fn names_follow_each_kinds_rule() {
        let mut s = secret(json!({}));
        s["metadata"]["name"] = json!("Not_Valid");
        let e = prepare_create(Kind::Secret, &mut s, &UserInfo::admin()).unwrap_err();
        assert!(
            e.message
                .starts_with(r#"Secret "Not_Valid" is invalid: metadata.name: Invalid value: "Not_Valid": a lowercase RFC 1123 subdomain"#),
            "{}",
            e.message
        );
    }

    #[test]
    fn updates_respect_immutable_and_status_parts() {
        let mut old = secret(json!({"data": {"a": "eA=="}, "immutable": true, "type": "Opaque"}));
        prepare_secret(&mut old).unwrap();
        let mut new = old.clone();
        new["data"]["a"] = json!("eQ==");
        new["type"] = json!("kubernetes.io/tls");
        let e = prepare_update(Kind::Secret, Part::Main, &old, new, "now").unwrap_err();
        assert!(
            e.message
                .contains("data: Forbidden: field is immutable when `immutable` is set")
        );
        assert!(
            e.message
                .contains(r#"type: Invalid value: "kubernetes.io/tls": field is immutable"#)
        );

        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a"},
                          "spec": {"podCIDR": "10.0.0.0/24"}, "status": {"addresses": []}});
        let mut body = node.clone();
        body["spec"]["podCIDR"] = json!("10.9.0.0/24");
        body["status"]["addresses"] = json!([{"type": "InternalIP", "address": "10.1.0.1"}]);
        let main = prepare_update(Kind::Node, Part::Main, &node, body.clone(), "now").unwrap();
        assert_eq!(
            (&main["spec"]["podCIDR"], &main["status"]),
            (&json!("10.9.0.0/24"), &node["status"])
        );
        let status = prepare_update(Kind::Node, Part::Status, &node, body, "now").unwrap();
        assert_eq!(status["spec"], node["spec"]);
        assert_eq!(status["status"]["addresses"][0]["address"], "10.1.0.1");
        assert_eq!(Part::of(Kind::Secret, Some("status")), None);
        assert_eq!(Part::of(Kind::Node, Some("approval")), None);
    }
}
