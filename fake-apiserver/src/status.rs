//! Errors as the API server reports them: an HTTP code and a `Status` body whose `reason`,
//! `message` and `details` match what the real server sends, so clients branch on them exactly
//! as they would in a cluster.

use std::fmt;

use serde_json::{Value, json};

use crate::store::Kind;

/// One refused request, rendered as a `Status` object.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` of the Status (`name`, `group`, `kind`, `causes`), if any.
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, kind: Kind, name: &str) -> ApiError {
        self.details = Some(json!({"name": name, "group": kind.group(), "kind": kind.plural()}));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    /// `User "u" cannot VERB resource "R" in API group "G" (in the namespace "ns" | at the
    /// cluster scope)`, as RBAC words it.
    pub fn forbidden(
        kind: Kind,
        name: Option<&str>,
        namespace: Option<&str>,
        user: &str,
        verb: &str,
        resource: &str,
    ) -> ApiError {
        let subject = match name {
            Some(n) => format!("{} {n:?}", kind.qualified_resource()),
            None => kind.qualified_resource(),
        };
        let scope = match namespace {
            Some(ns) => format!("in the namespace {ns:?}"),
            None => "at the cluster scope".to_owned(),
        };
        ApiError::new(
            403,
            "Forbidden",
            format!(
                "{subject} is forbidden: User {user:?} cannot {verb} resource {resource:?} in API group {:?} {scope}",
                kind.group()
            ),
        )
        .with_details(kind, name.unwrap_or(""))
    }

    pub fn not_found(kind: Kind, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", kind.qualified_resource()),
        )
        .with_details(kind, name)
    }

    /// A path the server does not serve (no such collection or subresource).
    pub fn no_such_resource() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn method_not_allowed(method: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn already_exists(kind: Kind, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", kind.qualified_resource()),
        )
        .with_details(kind, name)
    }

    /// An optimistic-concurrency failure (a stale `resourceVersion` or `uid`).
    pub fn conflict(kind: Kind, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: {why}",
                kind.qualified_resource()
            ),
        )
        .with_details(kind, name)
    }

    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type:?}) - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/apply-patch+yaml, application/strategic-merge-patch+json"
            ),
        )
    }

    /// `422 Invalid` with one cause per field error.
    pub fn invalid(kind: Kind, name: &str, errors: &[FieldError]) -> ApiError {
        let list = match errors {
            [one] => one.to_string(),
            many => format!(
                "[{}]",
                many.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": e.kind.reason(), "message": e.body(), "field": e.field}))
            .collect();
        ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("{} {name:?} is invalid: {list}", kind.qualified_kind()),
            details: Some(json!({
                "name": name, "group": kind.group(), "kind": kind.name(), "causes": causes,
            })),
        }
    }

    /// `422` for request options the server refuses (an apply patch without a field manager).
    pub fn invalid_options(detail: &str) -> ApiError {
        ApiError::new(
            422,
            "Invalid",
            format!("PatchOptions.meta.k8s.io \"\" is invalid: {detail}"),
        )
    }

    /// `410 Gone`: the version asked for is older than the history kept.
    pub fn expired(message: &str) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    /// A request that decoded but could not be carried out (a failing JSON patch).
    pub fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "UnprocessableEntity", message)
    }

    /// A failure a test injected, with the code it asked for.
    pub fn injected(code: u16) -> ApiError {
        ApiError::new(code, "InternalError", "injected failure")
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = status_object(self.code, self.reason, &self.message);
        if let Some(d) = &self.details {
            status["details"] = d.clone();
        }
        status
    }
}

/// A `Status` object, as the API server returns for errors.
pub fn status_object(code: u16, reason: &str, message: &str) -> Value {
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

/// One field's validation failure, worded as the API server's `field.Error`.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    /// The field's path (`spec.usages[0]`).
    pub field: String,
    pub kind: FieldErrorKind,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FieldErrorKind {
    Required,
    Forbidden,
    /// The offending value, already quoted as the server prints it.
    Invalid(String),
    NotSupported(String),
    Duplicate(String),
}

impl FieldErrorKind {
    fn reason(&self) -> &'static str {
        match self {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
            FieldErrorKind::Invalid(_) => "FieldValueInvalid",
            FieldErrorKind::NotSupported(_) => "FieldValueNotSupported",
            FieldErrorKind::Duplicate(_) => "FieldValueDuplicate",
        }
    }
}

impl FieldError {
    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Required,
            detail: detail.into(),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Forbidden,
            detail: detail.into(),
        }
    }

    pub fn invalid(field: impl Into<String>, value: &str, detail: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Invalid(format!("{value:?}")),
            detail: detail.into(),
        }
    }

    /// As [`Self::invalid`], for a number (printed bare, as the server prints it).
    pub fn invalid_int(
        field: impl Into<String>,
        value: i64,
        detail: impl Into<String>,
    ) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Invalid(value.to_string()),
            detail: detail.into(),
        }
    }

    pub fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> FieldError {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::NotSupported(format!("{value:?}")),
            detail: format!("supported values: {}", list.join(", ")),
        }
    }

    pub fn duplicate(field: impl Into<String>, value: &str) -> FieldError {
        FieldError {
            field: field.into(),
            kind: FieldErrorKind::Duplicate(format!("{value:?}")),
            detail: String::new(),
        }
    }

    /// What follows the field name (`Required value`, `Invalid value: "x": why`).
    fn body(&self) -> String {
        let head = match &self.kind {
            FieldErrorKind::Required => "Required value".to_owned(),
            FieldErrorKind::Forbidden => "Forbidden".to_owned(),
            FieldErrorKind::Invalid(v) => format!("Invalid value: {v}"),
            FieldErrorKind::NotSupported(v) => format!("Unsupported value: {v}"),
            FieldErrorKind::Duplicate(v) => format!("Duplicate value: {v}"),
        };
        if self.detail.is_empty() {
            head
        } else {
            format!("{head}: {}", self.detail)
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_worded_as_the_api_server_words_them() {
        assert_eq!(
            ApiError::not_found(Kind::CertificateSigningRequest, "x").message,
            r#"certificatesigningrequests.certificates.k8s.io "x" not found"#
        );
        assert_eq!(
            ApiError::already_exists(Kind::Secret, "ca").message,
            r#"secrets "ca" already exists"#
        );
        let e = ApiError::invalid(
            Kind::CertificateSigningRequest,
            "n",
            &[
                FieldError::required("spec.usages", ""),
                FieldError::invalid("spec.signerName", "x", "must be a fully qualified domain"),
            ],
        );
        assert_eq!(
            e.message,
            r#"CertificateSigningRequest.certificates.k8s.io "n" is invalid: [spec.usages: Required value, spec.signerName: Invalid value: "x": must be a fully qualified domain]"#
        );
        assert_eq!(
            e.to_status()["details"]["causes"][0]["field"],
            "spec.usages"
        );
        assert_eq!(
            ApiError::forbidden(
                Kind::Secret,
                Some("ca"),
                Some("kube-system"),
                "u",
                "get",
                "secrets"
            )
            .message,
            r#"secrets "ca" is forbidden: User "u" cannot get resource "secrets" in API group "" in the namespace "kube-system""#
        );
    }
}
