//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), and the two Kubernetes
//! kinds the fake approximates with a merge patch: strategic merge patch (lists are replaced
//! whole instead of merged by key) and server-side apply (no field ownership, so fields an
//! applier stops sending are kept, and no conflicts between managers).

use serde::Deserialize as _;
use serde_json::Value;

use crate::status::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    StrategicMerge,
    Json,
    Apply,
}

impl PatchKind {
    /// The kind a `Content-Type` names (`415` for anything else).
    pub fn from_content_type(content_type: &str) -> Result<PatchKind, ApiError> {
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/merge-patch+json" => Ok(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchKind::StrategicMerge),
            "application/json-patch+json" => Ok(PatchKind::Json),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Ok(PatchKind::Apply),
            _ => Err(ApiError::unsupported_media_type(content_type)),
        }
    }
}

/// Parses a patch body (JSON, or YAML for apply patches).
pub fn parse_body(kind: PatchKind, body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(e) if kind != PatchKind::Apply => Err(ApiError::bad_request(format!(
            "the body of the request could not be decoded: {e}"
        ))),
        Err(_) => {
            let text = std::str::from_utf8(body)
                .map_err(|e| ApiError::bad_request(format!("apply patch is not UTF-8: {e}")))?;
            Value::deserialize(yaml_serde::Deserializer::from_str(text))
                .map_err(|e| ApiError::bad_request(format!("apply patch is not YAML: {e}")))
        }
    }
}

/// `target` with `patch` (already parsed) applied.
pub fn apply(kind: PatchKind, target: &Value, patch: Value) -> Result<Value, ApiError> {
    let mut doc = target.clone();
    match kind {
        PatchKind::Merge | PatchKind::StrategicMerge | PatchKind::Apply => {
            merge(&mut doc, patch);
        }
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch).map_err(|e| {
                ApiError::bad_request(format!("the JSON patch could not be decoded: {e}"))
            })?;
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::unprocessable(format!("the JSON patch could not be applied: {e}"))
            })?;
        }
    }
    Ok(doc)
}

/// RFC 7386: objects merge key by key, `null` deletes, anything else replaces.
fn merge(target: &mut Value, patch: Value) {
    let Value::Object(patch) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let map = target.as_object_mut().expect("made an object above");
    for (k, v) in patch {
        if v.is_null() {
            map.remove(&k);
        } else {
            merge(map.entry(k).or_insert(Value::Null), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let target = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        let patch = json!({"a": "z", "c": {"f": null}, "l": [3]});
        assert_eq!(
            apply(PatchKind::Merge, &target, patch).unwrap(),
            json!({"a": "z", "c": {"d": "e"}, "l": [3]})
        );
    }

    #[test]
    fn json_patch_and_content_types() {
        let target = json!({"status": {"conditions": []}});
        let ops = json!([{"op": "add", "path": "/status/conditions/-",
                          "value": {"type": "Approved", "status": "True"}}]);
        let out = apply(PatchKind::Json, &target, ops).unwrap();
        assert_eq!(out["status"]["conditions"][0]["type"], "Approved");
        let failing = json!([{"op": "test", "path": "/status/conditions", "value": [1]}]);
        assert_eq!(
            apply(PatchKind::Json, &target, failing).unwrap_err().code,
            422
        );
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchKind::Merge
        );
        assert_eq!(
            PatchKind::from_content_type("application/json")
                .unwrap_err()
                .code,
            415
        );
        let yaml = parse_body(PatchKind::Apply, b"data:\n  a: b\n").unwrap();
        assert_eq!(yaml, json!({"data": {"a": "b"}}));
    }
}
