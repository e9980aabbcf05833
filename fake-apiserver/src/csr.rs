//! CertificateSigningRequests as the API server keeps them: the requester's identity written by
//! the server, status cleared on create, spec fixed after it, approval conditions only through
//! `/approval`, the certificate only through `/status` and never changed once set, and the
//! validation of `certificates.k8s.io/v1` (request, usages, signer name, conditions).
//!
//! As on the real server, setting the certificate does not require the `Approved` condition:
//! only signing a request that was approved is the signer's duty, and a test should assert it.
//! One difference: the request's PEM block and DER framing are checked, its signature is not
//! (the signer must check it anyway).

use base64::prelude::{BASE64_STANDARD, Engine as _};
use serde_json::{Value, json};

use crate::auth::UserInfo;
use crate::names;
use crate::status::{ApiError, FieldError};
use crate::strategy::Part;

pub const APPROVED: &str = "Approved";
pub const DENIED: &str = "Denied";
pub const FAILED: &str = "Failed";

const VALID_USAGES: [&str; 23] = [
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];

const LEGACY_SIGNER: &str = "kubernetes.io/legacy-unknown";

/// What a write may do, and what an earlier stored object excuses (the server tolerates
/// problems already persisted).
#[derive(Clone, Copy, Debug, Default)]
struct Options {
    allow_setting_approval: bool,
    allow_setting_certificate: bool,
    allow_both_approved_and_denied: bool,
    allow_legacy_signer: bool,
    allow_duplicate_condition_types: bool,
    allow_empty_condition_type: bool,
    allow_arbitrary_certificate: bool,
    allow_unknown_usages: bool,
    allow_duplicate_usages: bool,
}

impl Options {
    fn new(new: &Value, old: Option<&Value>) -> Options {
        let Some(old) = old else {
            return Options::default();
        };
        let types: Vec<&str> = conditions(old).iter().map(cond_type).collect();
        let usages = str_list(old, "/spec/usages");
        let old_cert = certificate_bytes(old);
        Options {
            allow_setting_approval: false,
            allow_setting_certificate: false,
            allow_both_approved_and_denied: types.contains(&APPROVED) && types.contains(&DENIED),
            allow_legacy_signer: str_at(old, "/spec/signerName") == LEGACY_SIGNER,
            allow_duplicate_condition_types: has_duplicates(&types),
            allow_empty_condition_type: types.contains(&""),
            allow_arbitrary_certificate: certificate_bytes(new) == old_cert
                || !certificate_problems(&old_cert).is_empty(),
            allow_unknown_usages: usages.iter().any(|u| !VALID_USAGES.contains(u)),
            allow_duplicate_usages: has_duplicates(&usages),
        }
    }
}

/// What the server does to a CSR before storing a create: the requester's identity replaces
/// whatever the client sent, and the status starts empty (no pre-approved requests).
pub fn prepare_create(csr: &mut Value, user: &UserInfo) {
    if !csr.get("spec").is_some_and(Value::is_object) {
        csr["spec"] = json!({});
    }
    let spec = csr["spec"].as_object_mut().expect("spec is an object");
    for f in ["username", "uid", "groups", "extra"] {
        spec.remove(f);
    }
    spec.insert("username".into(), json!(user.username));
    if !user.uid.is_empty() {
        spec.insert("uid".into(), json!(user.uid));
    }
    if !user.groups.is_empty() {
        spec.insert("groups".into(), json!(user.groups));
    }
    if !user.extra.is_empty() {
        spec.insert("extra".into(), json!(user.extra));
    }
    csr["status"] = json!({});
}

/// The object an update of `part` stores: spec never changes; the main resource keeps the
/// status; `/status` keeps the approval conditions; `/approval` takes only the conditions.
pub fn prepare_update(part: Part, old: &Value, mut new: Value, now: &str) -> Value {
    new["spec"] = old.get("spec").cloned().unwrap_or(json!({}));
    match part {
        Part::Main => new["status"] = old.get("status").cloned().unwrap_or(json!({})),
        Part::Status => {
            ensure_status(&mut new);
            preserve_instances(&mut new, old, APPROVED);
            preserve_instances(&mut new, old, DENIED);
            populate_timestamps(&mut new, old, now);
        }
        Part::Approval => {
            ensure_status(&mut new);
            populate_timestamps(&mut new, old, now);
            let conditions = new["status"].get("conditions").cloned();
            new["status"] = old.get("status").cloned().unwrap_or(json!({}));
            match conditions {
                Some(c) => new["status"]["conditions"] = c,
                None => {
                    if let Some(s) = new["status"].as_object_mut() {
                        s.remove("conditions");
                    }
                }
            }
        }
    }
    new
}

/// Validation of a create.
pub fn validate_create(csr: &Value) -> Vec<FieldError> {
    validate(csr, Options::new(csr, None))
}

/// Validation of an update of `part`.
pub fn validate_update(part: Part, new: &Value, old: &Value) -> Vec<FieldError> {
    let mut opts = Options::new(new, Some(old));
    opts.allow_setting_approval = part == Part::Approval;
    opts.allow_setting_certificate = part == Part::Status;
    let mut errs = validate(new, opts);
    for t in [APPROVED, DENIED, FAILED] {
        if find(new, t).len() < find(old, t).len() {
            errs.push(FieldError::forbidden(
                "status.conditions",
                format!("updates may not remove a condition of type {t:?}"),
            ));
        }
    }
    if !opts.allow_setting_approval {
        for t in [APPROVED, DENIED] {
            let (before, after) = (find(old, t), find(new, t));
            if after.len() > before.len() {
                errs.push(FieldError::forbidden(
                    "status.conditions",
                    format!("updates may not add a condition of type {t:?}"),
                ));
            } else if after.len() == before.len() && after != before {
                errs.push(FieldError::forbidden(
                    "status.conditions",
                    format!("updates may not modify a condition of type {t:?}"),
                ));
            }
        }
    }
    let (old_cert, new_cert) = (certificate_bytes(old), certificate_bytes(new));
    if new_cert != old_cert {
        if !opts.allow_setting_certificate {
            errs.push(FieldError::forbidden(
                "status.certificate",
                "updates may not set certificate content",
            ));
        } else if !old_cert.is_empty() {
            errs.push(FieldError::forbidden(
                "status.certificate",
                "updates may not modify existing certificate content",
            ));
        }
    }
    errs
}

/// The base64 fields a CSR carries must decode (the server's JSON decoding refuses them
/// otherwise, before any validation).
pub fn check_encoding(csr: &Value) -> Result<(), ApiError> {
    for (field, pointer) in [
        ("spec.request", "/spec/request"),
        ("status.certificate", "/status/certificate"),
    ] {
        match csr.pointer(pointer) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if BASE64_STANDARD.decode(s).is_ok() => {}
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "{field}: illegal base64 data (expected a base64 string)"
                )));
            }
        }
    }
    Ok(())
}

fn validate(csr: &Value, opts: Options) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Err(why) = check_request(&bytes_at(csr, "/spec/request")) {
        errs.push(FieldError::invalid("spec.request", "<request data>", why));
    }
    validate_usages(csr, opts, &mut errs);
    let signer = str_at(csr, "/spec/signerName");
    if signer == LEGACY_SIGNER && !opts.allow_legacy_signer {
        errs.push(FieldError::invalid(
            "spec.signerName",
            signer,
            "the legacy signerName is not allowed via this API version",
        ));
    } else {
        errs.extend(signer_name_problems(signer));
    }
    if let Some(secs) = csr
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        && secs < 600
    {
        errs.push(FieldError::invalid_int(
            "spec.expirationSeconds",
            secs,
            "may not specify a duration less than 600 seconds (10 minutes)",
        ));
    }
    validate_conditions(csr, opts, &mut errs);
    if !opts.allow_arbitrary_certificate {
        for why in certificate_problems(&certificate_bytes(csr)) {
            errs.push(FieldError::invalid(
                "status.certificate",
                "<certificate data>",
                why,
            ));
        }
    }
    errs
}

fn validate_usages(csr: &Value, opts: Options, errs: &mut Vec<FieldError>) {
    let usages = str_list(csr, "/spec/usages");
    if usages.is_empty() {
        errs.push(FieldError::required("spec.usages", ""));
    }
    let mut seen = Vec::new();
    for (i, u) in usages.iter().enumerate() {
        if !opts.allow_unknown_usages && !VALID_USAGES.contains(u) {
            let mut supported = VALID_USAGES.to_vec();
            supported.sort_unstable();
            errs.push(FieldError::not_supported(
                format!("spec.usages[{i}]"),
                u,
                &supported,
            ));
        }
        if !opts.allow_duplicate_usages && seen.contains(u) {
            errs.push(FieldError::duplicate(format!("spec.usages[{i}]"), u));
        }
        seen.push(u);
    }
}

fn validate_conditions(csr: &Value, opts: Options, errs: &mut Vec<FieldError>) {
    let (mut approved, mut denied) = (false, false);
    let mut seen = Vec::new();
    for (i, c) in conditions(csr).iter().enumerate() {
        let field = |f: &str| format!("status.conditions[{i}].{f}");
        let t = cond_type(c);
        if t.is_empty() && !opts.allow_empty_condition_type {
            errs.push(FieldError::required(field("type"), ""));
        }
        let status = c.get("status").and_then(Value::as_str).unwrap_or("");
        let allowed: &[&str] = if [APPROVED, DENIED, FAILED].contains(&t) {
            &["True"]
        } else {
            &["False", "True", "Unknown"]
        };
        if status.is_empty() {
            errs.push(FieldError::required(field("status"), ""));
        } else if !allowed.contains(&status) {
            errs.push(FieldError::not_supported(field("status"), status, allowed));
        }
        if !opts.allow_both_approved_and_denied {
            approved |= t == APPROVED;
            denied |= t == DENIED;
            if (t == APPROVED || t == DENIED) && approved && denied {
                errs.push(FieldError::invalid(
                    field("type"),
                    t,
                    "Approved and Denied conditions are mutually exclusive",
                ));
            }
        }
        if !opts.allow_duplicate_condition_types && seen.contains(&t) {
            errs.push(FieldError::duplicate(field("type"), t));
        }
        seen.push(t);
    }
}

/// The signer name rules: `<domain with a dot>/<path>`, each part made of DNS names.
fn signer_name_problems(signer: &str) -> Vec<FieldError> {
    const FIELD: &str = "spec.signerName";
    if signer.is_empty() {
        return vec![FieldError::required(FIELD, "")];
    }
    let Some((domain, path)) = signer.split_once('/').filter(|(_, p)| !p.contains('/')) else {
        return vec![FieldError::invalid(
            FIELD,
            signer,
            "must be a fully qualified domain and path of the form 'example.com/signer-name'",
        )];
    };
    let mut errs = Vec::new();
    if domain.len() > names::SUBDOMAIN_MAX {
        errs.push(FieldError::invalid(
            FIELD,
            domain,
            format!("must be no more than {} characters", names::SUBDOMAIN_MAX),
        ));
    }
    if let Some((label, problems)) = domain
        .split('.')
        .map(|l| (l, names::dns1123_label(l)))
        .find(|(_, p)| !p.is_empty())
    {
        for p in problems {
            errs.push(FieldError::invalid(
                FIELD,
                domain,
                format!("validating label {label:?}: {p}"),
            ));
        }
    }
    if !domain.contains('.') {
        errs.push(FieldError::invalid(
            FIELD,
            domain,
            "should be a domain with at least two segments separated by dots",
        ));
    }
    if let Some((label, problems)) = path
        .split('.')
        .map(|l| (l, names::dns1123_subdomain(l)))
        .find(|(_, p)| !p.is_empty())
    {
        for p in problems {
            errs.push(FieldError::invalid(
                FIELD,
                path,
                format!("validating label {label:?}: {p}"),
            ));
        }
    }
    errs
}

/// `spec.request` must hold a PEM `CERTIFICATE REQUEST` block with a DER structure in it.
fn check_request(pem: &[u8]) -> Result<(), String> {
    const WRONG: &str = "PEM block type must be CERTIFICATE REQUEST";
    let block = pem_blocks(pem).into_iter().next().ok_or(WRONG)?;
    if block.label != "CERTIFICATE REQUEST" {
        return Err(WRONG.to_owned());
    }
    match block.der {
        Some(der) if der_sequences(&der) == Some(1) => Ok(()),
        _ => Err("asn1: structure error: not a DER-encoded certificate request".to_owned()),
    }
}

/// What is wrong with a `status.certificate` (empty is fine): only `CERTIFICATE` blocks
/// without headers, each holding certificates, at least one.
fn certificate_problems(pem: &[u8]) -> Vec<String> {
    if pem.is_empty() {
        return Vec::new();
    }
    let blocks = pem_blocks(pem);
    if blocks.is_empty() {
        return vec!["must contain at least one CERTIFICATE PEM block".to_owned()];
    }
    for b in blocks {
        if b.label != "CERTIFICATE" {
            return vec![format!(
                "only CERTIFICATE PEM blocks are allowed, found {:?}",
                b.label
            )];
        }
        if b.headers {
            return vec!["no PEM block headers are permitted".to_owned()];
        }
        if b.der
            .as_deref()
            .and_then(der_sequences)
            .is_none_or(|n| n == 0)
        {
            return vec!["x509: malformed certificate".to_owned()];
        }
    }
    Vec::new()
}

struct PemBlock {
    label: String,
    headers: bool,
    /// The decoded body, `None` if it is not base64.
    der: Option<Vec<u8>>,
}

/// The PEM blocks of `data`, in order (text outside blocks is ignored, as Go's `pem.Decode`).
fn pem_blocks(data: &[u8]) -> Vec<PemBlock> {
    let text = String::from_utf8_lossy(data);
    let mut rest: &str = &text;
    let mut blocks = Vec::new();
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + "-----BEGIN ".len()..];
        let Some((label, body)) = after.split_once("-----") else {
            break;
        };
        let end = format!("-----END {label}-----");
        let Some(stop) = body.find(&end) else {
            break;
        };
        let inner = &body[..stop];
        let headers = inner.lines().any(|l| l.contains(':'));
        let b64: String = inner
            .lines()
            .filter(|l| !l.contains(':'))
            .flat_map(|l| l.chars())
            .filter(|c| !c.is_whitespace())
            .collect();
        blocks.push(PemBlock {
            label: label.to_owned(),
            headers,
            der: BASE64_STANDARD.decode(b64).ok(),
        });
        rest = &body[stop + end.len()..];
    }
    blocks
}

/// How many whole DER SEQUENCEs `der` is made of (`None` if it is not exactly that).
fn der_sequences(mut der: &[u8]) -> Option<usize> {
    let mut n = 0;
    while !der.is_empty() {
        if der[0] != 0x30 || der.len() < 2 {
            return None;
        }
        let (len, header) = match der[1] {
            l if l < 0x80 => (usize::from(l), 2),
            l => {
                let k = usize::from(l & 0x7f);
                if k == 0 || k > 4 || der.len() < 2 + k {
                    return None;
                }
                let len = der[2..2 + k]
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
                (len, 2 + k)
            }
        };
        der = der.get(header + len..)?;
        n += 1;
    }
    Some(n)
}

fn ensure_status(csr: &mut Value) {
    if !csr.get("status").is_some_and(Value::is_object) {
        csr["status"] = json!({});
    }
}

/// Keeps the stored instances of condition type `t` where the update has as many of them.
fn preserve_instances(new: &mut Value, old: &Value, t: &str) {
    let before = find(old, t);
    let positions: Vec<usize> = conditions(new)
        .iter()
        .enumerate()
        .filter(|(_, c)| cond_type(c) == t)
        .map(|(i, _)| i)
        .collect();
    if before.len() != positions.len() {
        return;
    }
    if let Some(list) = new
        .pointer_mut("/status/conditions")
        .and_then(Value::as_array_mut)
    {
        for (i, c) in positions.into_iter().zip(before) {
            list[i] = c;
        }
    }
}

/// Sets `lastUpdateTime` where missing, and `lastTransitionTime` where missing: the stored
/// one of the same type and status, else now.
fn populate_timestamps(new: &mut Value, old: &Value, now: &str) {
    let old_conditions = conditions(old);
    let Some(list) = new
        .pointer_mut("/status/conditions")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for c in list.iter_mut().filter(|c| c.is_object()) {
        let missing =
            |c: &Value, f: &str| c.get(f).and_then(Value::as_str).is_none_or(str::is_empty);
        if missing(c, "lastUpdateTime") {
            c["lastUpdateTime"] = json!(now);
        }
        if missing(c, "lastTransitionTime") {
            let same = old_conditions.iter().find(|o| {
                cond_type(o) == cond_type(c)
                    && o.get("status") == c.get("status")
                    && !missing(o, "lastTransitionTime")
            });
            c["lastTransitionTime"] = match same {
                Some(o) => o["lastTransitionTime"].clone(),
                None => json!(now),
            };
        }
    }
}

fn conditions(csr: &Value) -> &[Value] {
    csr.pointer("/status/conditions")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn find(csr: &Value, t: &str) -> Vec<Value> {
    conditions(csr)
        .iter()
        .filter(|c| cond_type(c) == t)
        .cloned()
        .collect()
}

fn cond_type(c: &Value) -> &str {
    c.get("type").and_then(Value::as_str).unwrap_or("")
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn str_list<'a>(v: &'a Value, pointer: &str) -> Vec<&'a str> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// A base64 field's bytes (empty if absent or not base64: [`check_encoding`] refused those).
fn bytes_at(v: &Value, pointer: &str) -> Vec<u8> {
    BASE64_STANDARD
        .decode(str_at(v, pointer))
        .unwrap_or_default()
}

fn certificate_bytes(csr: &Value) -> Vec<u8> {
    bytes_at(csr, "/status/certificate")
}

fn has_duplicates(items: &[&str]) -> bool {
    items
        .iter()
        .enumerate()
        .any(|(i, a)| items[..i].contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PEM block with `label` around a minimal DER SEQUENCE.
    pub(crate) fn pem(label: &str) -> String {
        let der = BASE64_STANDARD.encode([0x30, 0x03, 0x02, 0x01, 0x00]);
        format!("-----BEGIN {label}-----\n{der}\n-----END {label}-----\n")
    }

    fn b64(s: &str) -> String {
        BASE64_STANDARD.encode(s)
    }

    fn csr() -> Value {
        json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": "node-a"},
            "spec": {"request": b64(&pem("CERTIFICATE REQUEST")),
                     "signerName": "kubenft.io/node-client", "usages": ["client auth"],
                     "username": "forged", "groups": ["system:masters"]},
            "status": {"conditions": [{"type": "Approved", "status": "True"}]},
        })
    }

    fn fields(errs: &[FieldError]) -> Vec<String> {
        errs.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn create_takes_the_identity_from_the_requester_and_clears_status() {
        let mut c = csr();
        let user = UserInfo {
            username: "system:serviceaccount:kube-system:agent".into(),
            uid: "u1".into(),
            groups: vec!["system:authenticated".into()],
            extra: [(
                "authentication.kubernetes.io/node-name".into(),
                vec!["a".into()],
            )]
            .into(),
        };
        prepare_create(&mut c, &user);
        assert_eq!(
            c["spec"]["username"],
            "system:serviceaccount:kube-system:agent"
        );
        assert_eq!(c["spec"]["uid"], "u1");
        assert_eq!(c["spec"]["groups"], json!(["system:authenticated"]));
        assert_eq!(
            c["spec"]["extra"]["authentication.kubernetes.io/node-name"],
            json!(["a"])
        );
        assert_eq!(c["status"], json!({}));
        assert!(validate_create(&c).is_empty(), "{:?}", validate_create(&c));
    }

    #[test]
    fn create_validation_names_each_field() {
        let mut c = csr();
        prepare_create(&mut c, &UserInfo::new("u"));
        c["spec"]["request"] = json!(b64(&pem("CERTIFICATE")));
        c["spec"]["usages"] = json!([]);
        c["spec"]["signerName"] = json!("nodomain");
        c["spec"]["expirationSeconds"] = json!(60);
        assert_eq!(
            fields(&validate_create(&c)),
            [
                r#"spec.request: Invalid value: "<request data>": PEM block type must be CERTIFICATE REQUEST"#,
                "spec.usages: Required value",
                r#"spec.signerName: Invalid value: "nodomain": must be a fully qualified domain and path of the form 'example.com/signer-name'"#,
                r#"spec.expirationSeconds: Invalid value: 60: may not specify a duration less than 600 seconds (10 minutes)"#,
            ]
        );
        c["spec"]["signerName"] = json!("");
        c["spec"]["usages"] = json!(["client auth", "flying", "client auth"]);
        c["spec"]["request"] = json!(b64(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        ));
        let errs = fields(&validate_create(&c));
        assert!(
            errs[0].starts_with("spec.request: Invalid value"),
            "{errs:?}"
        );
        assert!(errs[1].starts_with(r#"spec.usages[1]: Unsupported value: "flying""#));
        assert_eq!(errs[2], r#"spec.usages[2]: Duplicate value: "client auth""#);
        assert_eq!(errs[3], "spec.signerName: Required value");
        assert!(signer_name_problems("kubenft.io/node-client").is_empty());
        assert!(!signer_name_problems("Kubenft.io/x").is_empty());
        assert!(!signer_name_problems("kubenft.io/a/b").is_empty());
    }

    fn stored() -> Value {
        let mut c = csr();
        prepare_create(&mut c, &UserInfo::new("requester"));
        c
    }

    fn approve(c: &Value, t: &str) -> Value {
        let mut n = c.clone();
        let mut list = conditions(c).to_vec();
        list.push(json!({"type": t, "status": "True", "reason": "R"}));
        n["status"]["conditions"] = json!(list);
        n
    }

    fn update(part: Part, old: &Value, new: Value) -> Result<Value, Vec<String>> {
        let n = prepare_update(part, old, new, "2026-01-01T00:00:00Z");
        match validate_update(part, &n, old) {
            errs if errs.is_empty() => Ok(n),
            errs => Err(fields(&errs)),
        }
    }

    #[test]
    fn approval_takes_only_conditions_and_they_stay() {
        let old = stored();
        let mut body = approve(&old, APPROVED);
        body["spec"]["usages"] = json!(["server auth"]);
        body["status"]["certificate"] = json!(b64(&pem("CERTIFICATE")));
        let approved = update(Part::Approval, &old, body).unwrap();
        assert_eq!(approved["spec"], old["spec"], "spec is fixed");
        assert!(
            approved["status"].get("certificate").is_none(),
            "not via /approval"
        );
        let cond = &approved["status"]["conditions"][0];
        assert_eq!(cond["lastUpdateTime"], "2026-01-01T00:00:00Z");
        assert_eq!(cond["lastTransitionTime"], "2026-01-01T00:00:00Z");

        let both = update(Part::Approval, &approved, approve(&approved, DENIED)).unwrap_err();
        assert_eq!(
            both,
            [
                r#"status.conditions[1].type: Invalid value: "Denied": Approved and Denied conditions are mutually exclusive"#
            ]
        );
        let mut removed = approved.clone();
        removed["status"]["conditions"] = json!([]);
        assert_eq!(
            update(Part::Approval, &approved, removed).unwrap_err(),
            [
                r#"status.conditions: Forbidden: updates may not remove a condition of type "Approved""#
            ]
        );
        let mut not_true = approve(&old, APPROVED);
        not_true["status"]["conditions"][0]["status"] = json!("False");
        assert_eq!(
            update(Part::Approval, &old, not_true).unwrap_err(),
            [
                r#"status.conditions[0].status: Unsupported value: "False": supported values: "True""#
            ]
        );
    }

    #[test]
    fn status_sets_the_certificate_once_and_cannot_approve() {
        let approved = update(Part::Approval, &stored(), approve(&stored(), APPROVED)).unwrap();
        // /status cannot add an approval, nor change the one there (it is kept as stored).
        let mut denied = approve(&approved, DENIED);
        denied["status"]["conditions"][0]["reason"] = json!("Edited");
        let errs = update(Part::Status, &approved, denied).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.contains(r#"updates may not add a condition of type "Denied""#)),
            "{errs:?}"
        );
        let mut edited = approved.clone();
        edited["status"]["conditions"][0]["reason"] = json!("Edited");
        let kept = update(Part::Status, &approved, edited).unwrap();
        assert_eq!(kept["status"]["conditions"][0]["reason"], "R");

        let mut signed = approved.clone();
        signed["status"]["certificate"] = json!(b64(&pem("CERTIFICATE")));
        let signed = update(Part::Status, &approved, signed).unwrap();
        let mut again = signed.clone();
        again["status"]["certificate"] = json!(b64(&(pem("CERTIFICATE") + &pem("CERTIFICATE"))));
        assert_eq!(
            update(Part::Status, &signed, again).unwrap_err(),
            ["status.certificate: Forbidden: updates may not modify existing certificate content"]
        );
        let mut not_cert = approved.clone();
        not_cert["status"]["certificate"] = json!(b64(&pem("PRIVATE KEY")));
        assert_eq!(
            update(Part::Status, &approved, not_cert).unwrap_err(),
            [
                r#"status.certificate: Invalid value: "<certificate data>": only CERTIFICATE PEM blocks are allowed, found "PRIVATE KEY""#
            ]
        );
        // The main resource sets neither.
        let mut main = approved.clone();
        main["status"]["certificate"] = json!(b64(&pem("CERTIFICATE")));
        main["spec"]["signerName"] = json!("other.io/x");
        main["metadata"]["labels"] = json!({"a": "b"});
        let after = update(Part::Main, &approved, main).unwrap();
        assert_eq!(
            (&after["spec"], &after["status"]),
            (&approved["spec"], &approved["status"])
        );
        assert_eq!(after["metadata"]["labels"]["a"], "b");
    }

    #[test]
    fn der_framing() {
        assert_eq!(der_sequences(&[0x30, 0x00, 0x30, 0x01, 0x05]), Some(2));
        assert_eq!(der_sequences(&[0x30, 0x81, 0x01, 0x00]), Some(1));
        assert_eq!(der_sequences(&[0x30, 0x05, 0x00]), None);
        assert_eq!(der_sequences(&[0x04, 0x00]), None);
    }
}
