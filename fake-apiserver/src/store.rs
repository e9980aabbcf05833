//! The fake API server's state: objects, a totally ordered event history with resource
//! versions, and the fault switches tests flip.
//!
//! Pure and synchronous so the HTTP layer stays thin: every request takes the lock, reads or
//! mutates this, and releases it before any I/O.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde_json::{Value, json};

use crate::Error;
use crate::status::ApiError;

/// The collections the fake serves: what kubenft watches, and what its certificate issuance
/// writes (CertificateSigningRequests, the CA's Secret and ConfigMap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Secret,
    ConfigMap,
    CertificateSigningRequest,
    /// `events.k8s.io/v1` Events (the controller reports refused objects with them).
    Event,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Secret,
        Kind::ConfigMap,
        Kind::CertificateSigningRequest,
        Kind::Event,
    ];

    pub fn api_version(self) -> &'static str {
        match self.group() {
            "" => "v1",
            "discovery.k8s.io" => "discovery.k8s.io/v1",
            "events.k8s.io" => "events.k8s.io/v1",
            _ => "certificates.k8s.io/v1",
        }
    }

    /// The API group (`""` for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node | Kind::Secret | Kind::ConfigMap => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::CertificateSigningRequest => "certificates.k8s.io",
            Kind::Event => "events.k8s.io",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Secret => "Secret",
            Kind::ConfigMap => "ConfigMap",
            Kind::CertificateSigningRequest => "CertificateSigningRequest",
            Kind::Event => "Event",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Secret => "secrets",
            Kind::ConfigMap => "configmaps",
            Kind::CertificateSigningRequest => "certificatesigningrequests",
            Kind::Event => "events",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::CertificateSigningRequest)
    }

    /// Whether the kind has a `status` subresource (whose status the main resource ignores).
    pub fn has_status(self) -> bool {
        matches!(
            self,
            Kind::Service | Kind::Node | Kind::CertificateSigningRequest
        )
    }

    /// The kind of an object from its `apiVersion` and `kind`.
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// The path prefix of the API group (`/api/v1`, `/apis/discovery.k8s.io/v1`).
    pub fn group_prefix(self) -> &'static str {
        match self.group() {
            "" => "/api/v1",
            "discovery.k8s.io" => "/apis/discovery.k8s.io/v1",
            "events.k8s.io" => "/apis/events.k8s.io/v1",
            _ => "/apis/certificates.k8s.io/v1",
        }
    }

    /// The resource as the API server names it in messages (`secrets`,
    /// `certificatesigningrequests.certificates.k8s.io`).
    pub fn qualified_resource(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    /// The kind as the API server names it in validation messages (`Secret`,
    /// `CertificateSigningRequest.certificates.k8s.io`).
    pub fn qualified_kind(self) -> String {
        match self.group() {
            "" => self.name().to_owned(),
            group => format!("{}.{group}", self.name()),
        }
    }

    /// The value of a field a `fieldSelector` may name, `None` if the real API server does not
    /// support selecting on that field for this kind.
    pub fn field<'a>(self, object: &'a Value, label: &str) -> Option<&'a str> {
        let s = |p: &str| object.pointer(p).and_then(Value::as_str).unwrap_or("");
        match (self, label) {
            (_, "metadata.name") => Some(s("/metadata/name")),
            (k, "metadata.namespace") if k.namespaced() => Some(s("/metadata/namespace")),
            (Kind::CertificateSigningRequest, "spec.signerName") => Some(s("/spec/signerName")),
            (Kind::Secret, "type") => Some(s("/type")),
            _ => None,
        }
    }

    /// Whether [`Self::field`] knows `label` for this kind.
    pub fn supports_field(self, label: &str) -> bool {
        self.field(&Value::Null, label).is_some()
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an object lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

/// One entry of the history, as a watch streams it.
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: Kind,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind_of_change: &'static str,
    pub object: Value,
    /// The object before a `MODIFIED` change: a filtered watch sees an object that starts or
    /// stops matching as `ADDED` or `DELETED`, as from the real API server.
    pub previous: Option<Value>,
}

impl Event {
    /// The event as a watch with `filter` sees it, if it sees it at all.
    pub fn seen_through(&self, filter: &Filter) -> Option<(&'static str, Value)> {
        let now = filter.matches(self.kind, &self.object);
        let before = self
            .previous
            .as_ref()
            .is_some_and(|p| filter.matches(self.kind, p));
        match (self.kind_of_change, before, now) {
            ("MODIFIED", true, false) => {
                // The last state that matched, at the version of the change.
                let mut gone = self.previous.clone()?;
                set_meta(&mut gone, "resourceVersion", json!(self.rv.to_string()));
                Some(("DELETED", gone))
            }
            ("MODIFIED", false, true) => Some(("ADDED", self.object.clone())),
            (change, _, true) => Some((change, self.object.clone())),
            _ => None,
        }
    }
}

/// Which objects a list or watch asks for.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub selector: Selector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, kind: Kind, object: &Value) -> bool {
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        self.namespace.as_deref().is_none_or(|n| n == ns)
            && self.selector.matches(object)
            && self.fields.matches(kind, object)
    }
}

/// An equality-based label selector (`a`, `!a`, `a=b`, `a==b`, `a!=b`, comma-separated).
#[derive(Clone, Debug, Default)]
pub struct Selector(Vec<Requirement>);

#[derive(Clone, Debug)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
}

impl Selector {
    pub fn parse(s: &str) -> Selector {
        let reqs = s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                if let Some((k, v)) = t.split_once("!=") {
                    Requirement::NotEquals(k.trim().into(), v.trim().into())
                } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                    Requirement::Equals(k.trim().into(), v.trim().into())
                } else if let Some(k) = t.strip_prefix('!') {
                    Requirement::NotExists(k.trim().into())
                } else {
                    Requirement::Exists(t.into())
                }
            })
            .collect();
        Selector(reqs)
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
        })
    }
}

/// A field selector (`metadata.name=x`, `spec.signerName==y`, `type!=z`, comma-separated), on
/// the fields the real API server lets each kind be selected by.
#[derive(Clone, Debug, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses a selector for `kind`; an unsupported field is refused with the server's words.
    pub fn parse(kind: Kind, s: &str) -> Result<FieldSelector, ApiError> {
        let mut terms = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((k, v)) = t.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: {s:?}; can't understand {t:?}"
                )));
            };
            let field = field.trim();
            if !kind.supports_field(field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn matches(&self, kind: Kind, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(field, equal, value)| (kind.field(object, field) == Some(value)) == *equal)
    }
}

/// Fault switches, consumed by the HTTP layer.
#[derive(Debug, Default)]
pub struct Faults {
    /// The next `n` requests fail with this status.
    pub fail_next: Option<(u32, u16)>,
    /// Every request for these collections fails with this status until cleared.
    pub fail_kind: HashMap<Kind, u16>,
    /// Watches deliver nothing while set (events are kept and delivered later).
    pub stalled: bool,
    /// Incremented by `drop_watches`: open watches whose generation is older abort.
    pub drop_generation: u64,
    /// Incremented by `expire_history`: open watches older than it get `410 Gone` and end.
    pub expire_generation: u64,
}

/// Objects, history and faults.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    /// Watches starting before this resource version get `410 Gone`.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Event>,
    pub faults: Faults,
    /// How many list requests each collection has served (tests use it to see relists).
    pub lists: HashMap<Kind, u32>,
    next_uid: u64,
    /// Feeds the suffixes of `generateName`.
    next_suffix: u64,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            // Far from zero so "0" (any version) is never confused with a real one.
            rv: 1000,
            compacted: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            faults: Faults::default(),
            lists: HashMap::new(),
            next_uid: 1,
            next_suffix: 0,
        }
    }
}

/// The creation time of objects given to [`Store::apply`] without one.
pub const FIXED_CREATION_TIME: &str = "2025-01-01T00:00:00Z";

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Creates or replaces an object as a test sees fit (no API rules apply: this is the
    /// fake's back door, as writing to etcd would be). Returns the new resource version, or
    /// `None` if the object is unchanged (as the API server, a no-op update creates no event).
    pub fn apply(&mut self, mut object: Value) -> Result<Option<u64>, Error> {
        let key = key_of(&object)?;
        if !key.kind.namespaced() {
            remove_field(&mut object, "namespace");
        } else if object.pointer("/metadata/namespace").is_none() {
            set_meta(&mut object, "namespace", json!(key.namespace));
        }
        if let Some(prev) = self.objects.get(&key) {
            if same_content(prev, &object) {
                return Ok(None);
            }
            keep_identity(prev, &mut object);
            return Ok(Some(self.store_modified(key, object)));
        }
        if object.pointer("/metadata/creationTimestamp").is_none() {
            set_meta(&mut object, "creationTimestamp", json!(FIXED_CREATION_TIME));
        }
        Ok(Some(self.store_added(key, object)))
    }

    /// Deletes an object; `false` if there was none.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.remove(&Key::new(kind, namespace, name), &Preconditions::default())
            .is_ok()
    }

    /// One object.
    pub fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    /// A name for `generateName: prefix` that no object of the kind has in the namespace,
    /// made as the API server makes it (five characters from its alphabet).
    pub fn generate_name(&mut self, kind: Kind, namespace: &str, prefix: &str) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        loop {
            self.next_suffix += 1;
            // A fixed odd multiplier scatters consecutive counters over the suffix space.
            let mut n = self.next_suffix.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
            let suffix: String = (0..5)
                .map(|_| {
                    let c = ALPHABET[(n % ALPHABET.len() as u64) as usize];
                    n /= ALPHABET.len() as u64;
                    c as char
                })
                .collect();
            let name = format!("{prefix}{suffix}");
            if !self.objects.contains_key(&Key::new(kind, namespace, &name)) {
                return name;
            }
        }
    }

    /// Creates an object as a POST does: `409 AlreadyExists` if the name is taken; sets `uid`,
    /// `creationTimestamp` (`now`) and `resourceVersion`. Returns the stored object.
    pub fn create(&mut self, mut object: Value, now: &str) -> Result<Value, ApiError> {
        let key = key_of(&object).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(key.kind, &key.name));
        }
        set_meta(&mut object, "creationTimestamp", json!(now));
        remove_field(&mut object, "uid");
        self.store_added(key.clone(), object);
        Ok(self.objects[&key].clone())
    }

    /// Checks an update's optimistic-concurrency preconditions against the stored object:
    /// a `resourceVersion` or `uid` that is set must be the stored one (`409 Conflict`).
    pub fn check_preconditions(&self, key: &Key, wanted: &Preconditions) -> Result<(), ApiError> {
        let stored = self
            .objects
            .get(key)
            .ok_or_else(|| ApiError::not_found(key.kind, &key.name))?;
        let meta = |f: &str| {
            stored
                .pointer(&format!("/metadata/{f}"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        if let Some(uid) = wanted.uid.as_deref().filter(|u| !u.is_empty())
            && uid != meta("uid")
        {
            let why = format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta("uid")
            );
            return Err(ApiError::conflict(key.kind, &key.name, &why));
        }
        if let Some(rv) = wanted.resource_version.as_deref().filter(|v| !v.is_empty())
            && rv != meta("resourceVersion")
        {
            return Err(ApiError::conflict(
                key.kind,
                &key.name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        Ok(())
    }

    /// Replaces a stored object with `object` (already checked and prepared): keeps its `uid`
    /// and `creationTimestamp`; an update that changes nothing returns the stored object and
    /// makes no event, as from the real API server.
    pub fn replace(&mut self, key: &Key, mut object: Value) -> Result<Value, ApiError> {
        let stored = self
            .objects
            .get(key)
            .ok_or_else(|| ApiError::not_found(key.kind, &key.name))?;
        keep_identity(stored, &mut object);
        if same_content(stored, &object) {
            return Ok(stored.clone());
        }
        self.store_modified(key.clone(), object);
        Ok(self.objects[key].clone())
    }

    /// Deletes an object if `wanted` holds; returns it as it was deleted.
    pub fn remove(&mut self, key: &Key, wanted: &Preconditions) -> Result<Value, ApiError> {
        self.check_preconditions(key, wanted)?;
        let mut object = self
            .objects
            .remove(key)
            .ok_or_else(|| ApiError::not_found(key.kind, &key.name))?;
        self.rv += 1;
        set_meta(&mut object, "resourceVersion", json!(self.rv.to_string()));
        self.history.push(Event {
            rv: self.rv,
            kind: key.kind,
            kind_of_change: "DELETED",
            object: object.clone(),
            previous: None,
        });
        Ok(object)
    }

    fn store_added(&mut self, key: Key, mut object: Value) -> u64 {
        if object.pointer("/metadata/uid").is_none() {
            let uid = format!("00000000-0000-4000-8000-{:012}", self.next_uid);
            self.next_uid += 1;
            set_meta(&mut object, "uid", json!(uid));
        }
        self.store(key, object, "ADDED", None)
    }

    fn store_modified(&mut self, key: Key, object: Value) -> u64 {
        let previous = self.objects.get(&key).cloned();
        self.store(key, object, "MODIFIED", previous)
    }

    fn store(
        &mut self,
        key: Key,
        mut object: Value,
        change: &'static str,
        previous: Option<Value>,
    ) -> u64 {
        self.rv += 1;
        set_meta(&mut object, "resourceVersion", json!(self.rv.to_string()));
        self.history.push(Event {
            rv: self.rv,
            kind: key.kind,
            kind_of_change: change,
            object: object.clone(),
            previous,
        });
        self.objects.insert(key, object);
        self.rv
    }

    /// Forgets all history: watches from any earlier resource version get `410 Gone`.
    pub fn expire_history(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
        self.faults.expire_generation += 1;
    }

    /// The current objects of a collection, sorted by namespace and name.
    pub fn list(&self, kind: Kind, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, o)| k.kind == kind && filter.matches(kind, o))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Every key currently held.
    pub fn keys(&self) -> Vec<Key> {
        self.objects.keys().cloned().collect()
    }

    /// The watch events of a collection after `after` as `filter` sees them (type and
    /// object), or `None` if that part of history is gone.
    pub fn events_after(
        &self,
        kind: Kind,
        filter: &Filter,
        after: u64,
    ) -> Option<Vec<(&'static str, Value)>> {
        if after < self.compacted {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|e| e.rv > after && e.kind == kind)
                .filter_map(|e| e.seen_through(filter))
                .collect(),
        )
    }
}

/// What a write requires of the stored object (`metadata.resourceVersion` and `metadata.uid`
/// of an update's body, or a DELETE's `preconditions`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

impl Preconditions {
    /// The preconditions an update's body carries in its metadata.
    pub fn of_object(object: &Value) -> Preconditions {
        let meta = |f: &str| {
            object
                .pointer(&format!("/metadata/{f}"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Preconditions {
            uid: meta("uid"),
            resource_version: meta("resourceVersion"),
        }
    }
}

impl Key {
    /// The key of `name`; the namespace is dropped for cluster-scoped kinds.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Key {
        Key {
            kind,
            namespace: if kind.namespaced() {
                namespace.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        }
    }
}

/// The key of an object, from `apiVersion`, `kind` and `metadata`.
pub fn key_of(object: &Value) -> Result<Key, Error> {
    let s = |p: &str| object.pointer(p).and_then(Value::as_str).unwrap_or("");
    let kind = Kind::of(s("/apiVersion"), s("/kind"))
        .ok_or_else(|| Error::UnsupportedKind(format!("{} {}", s("/apiVersion"), s("/kind"))))?;
    let name = s("/metadata/name");
    if name.is_empty() {
        return Err(Error::MissingName(kind));
    }
    let namespace = match s("/metadata/namespace") {
        "" => "default",
        ns => ns,
    };
    Ok(Key::new(kind, namespace, name))
}

pub(crate) fn set_meta(object: &mut Value, field: &str, value: Value) {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"][field] = value;
}

pub(crate) fn remove_field(object: &mut Value, field: &str) {
    if let Some(Value::Object(m)) = object.get_mut("metadata") {
        m.remove(field);
    }
}

/// Copies what the server alone maintains from the stored object.
fn keep_identity(stored: &Value, object: &mut Value) {
    for field in ["uid", "creationTimestamp"] {
        if let Some(v) = stored.pointer(&format!("/metadata/{field}")) {
            set_meta(object, field, v.clone());
        }
    }
}

/// Equal apart from what the server itself maintains.
fn same_content(stored: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        for f in ["resourceVersion", "uid", "creationTimestamp"] {
            remove_field(&mut v, f);
        }
        v
    };
    strip(stored) == strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, port: u16) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
               "spec": {"ports": [{"port": port}]}})
    }

    #[test]
    fn versions_history_and_expiry() {
        let mut s = Store::default();
        let rv1 = s.apply(svc("a", 80)).unwrap().unwrap();
        assert_eq!(s.apply(svc("a", 80)).unwrap(), None, "no-op update");
        let rv2 = s.apply(svc("a", 81)).unwrap().unwrap();
        assert!(rv2 > rv1);
        assert!(s.delete(Kind::Service, "default", "a"));
        let all = Filter::default();
        let changes: Vec<_> = s
            .events_after(Kind::Service, &all, rv1 - 1)
            .unwrap()
            .iter()
            .map(|(change, _)| *change)
            .collect();
        assert_eq!(changes, ["ADDED", "MODIFIED", "DELETED"]);
        s.expire_history();
        assert!(s.events_after(Kind::Service, &all, rv2).is_none());
        assert!(
            s.events_after(Kind::Service, &all, s.resource_version())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn selectors() {
        let o = json!({"metadata": {"labels": {"kubernetes.io/service-name": "web"}}});
        for (sel, want) in [
            ("kubernetes.io/service-name", true),
            ("!kubernetes.io/service-name", false),
            ("kubernetes.io/service-name=web", true),
            ("kubernetes.io/service-name==db", false),
            ("kubernetes.io/service-name!=db,", true),
            ("", true),
        ] {
            assert_eq!(Selector::parse(sel).matches(&o), want, "{sel}");
        }
    }

    fn secret(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": name, "namespace": "ns", "labels": labels}, "type": "Opaque"})
    }

    fn meta<'a>(o: &'a Value, f: &str) -> &'a str {
        o.pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
            .unwrap()
    }

    #[test]
    fn create_sets_identity_and_refuses_a_taken_name() {
        let mut s = Store::default();
        let created = s
            .create(secret("ca", json!({})), "2026-05-01T10:00:00Z")
            .unwrap();
        assert_eq!(meta(&created, "creationTimestamp"), "2026-05-01T10:00:00Z");
        assert_eq!(
            meta(&created, "resourceVersion"),
            s.resource_version().to_string()
        );
        assert!(!meta(&created, "uid").is_empty());
        let e = s.create(secret("ca", json!({})), "now").unwrap_err();
        assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
        assert_eq!(e.message, r#"secrets "ca" already exists"#);
        // Another namespace is another name.
        let mut other = secret("ca", json!({}));
        other["metadata"]["namespace"] = json!("other");
        assert!(s.create(other, "now").is_ok());
    }

    #[test]
    fn generated_names_are_unique_and_look_like_the_servers() {
        let mut s = Store::default();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let name = s.generate_name(Kind::CertificateSigningRequest, "", "node-a-");
            let suffix = name.strip_prefix("node-a-").unwrap();
            assert_eq!(suffix.len(), 5);
            assert!(
                suffix
                    .chars()
                    .all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c))
            );
            let mut csr = json!({"apiVersion": "certificates.k8s.io/v1",
                                 "kind": "CertificateSigningRequest", "metadata": {"name": name}});
            csr["spec"] = json!({});
            s.create(csr, "now").unwrap();
            assert!(seen.insert(name));
        }
    }

    #[test]
    fn stale_versions_and_uids_conflict_and_no_op_updates_make_no_event() {
        let mut s = Store::default();
        let created = s.create(secret("ca", json!({})), "now").unwrap();
        let key = Key::new(Kind::Secret, "ns", "ca");
        let rv = meta(&created, "resourceVersion").to_owned();
        let ok = Preconditions {
            uid: None,
            resource_version: Some(rv.clone()),
        };
        assert!(s.check_preconditions(&key, &ok).is_ok());
        let same = s.replace(&key, created.clone()).unwrap();
        assert_eq!(
            meta(&same, "resourceVersion"),
            rv,
            "no-op update keeps the version"
        );
        let mut changed = created.clone();
        changed["data"] = json!({"a": "eA=="});
        let updated = s.replace(&key, changed).unwrap();
        assert_ne!(meta(&updated, "resourceVersion"), rv);
        assert_eq!(meta(&updated, "uid"), meta(&created, "uid"));

        let e = s.check_preconditions(&key, &ok).unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        assert!(e.message.starts_with(
            r#"Operation cannot be fulfilled on secrets "ca": the object has been modified"#
        ));
        let wrong_uid = Preconditions {
            uid: Some("x".into()),
            resource_version: None,
        };
        assert_eq!(s.remove(&key, &wrong_uid).unwrap_err().code, 409);
        let missing = Key::new(Kind::Secret, "ns", "nope");
        assert_eq!(
            s.check_preconditions(&missing, &Preconditions::default())
                .unwrap_err()
                .code,
            404
        );
        let gone = s.remove(&key, &Preconditions::default()).unwrap();
        assert_eq!(
            meta(&gone, "resourceVersion"),
            s.resource_version().to_string()
        );
        let changes: Vec<_> = s
            .events_after(Kind::Secret, &Filter::default(), 0)
            .unwrap()
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        assert_eq!(changes, ["ADDED", "MODIFIED", "DELETED"]);
    }

    #[test]
    fn filtered_watches_see_objects_enter_and_leave() {
        let mut s = Store::default();
        let start = s.resource_version();
        s.apply(secret("a", json!({"role": "ca"}))).unwrap();
        s.apply(secret("a", json!({"role": "other"}))).unwrap();
        s.apply(secret("a", json!({"role": "ca"}))).unwrap();
        let filter = Filter {
            selector: Selector::parse("role=ca"),
            ..Filter::default()
        };
        let seen: Vec<_> = s
            .events_after(Kind::Secret, &filter, start)
            .unwrap()
            .into_iter()
            .map(|(c, o)| {
                (
                    c,
                    o["metadata"]["labels"]["role"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("ADDED", "ca".into()),
                ("DELETED", "ca".into()),
                ("ADDED", "ca".into())
            ],
            "leaving the selector is a DELETED of the last matching state"
        );
    }

    #[test]
    fn field_selectors() {
        let csr = json!({"metadata": {"name": "n"}, "spec": {"signerName": "kubenft.io/node"}});
        let k = Kind::CertificateSigningRequest;
        for (sel, want) in [
            ("spec.signerName=kubenft.io/node", true),
            ("spec.signerName==kubenft.io/node,metadata.name=n", true),
            ("spec.signerName!=kubenft.io/node", false),
            ("metadata.name=m", false),
            ("", true),
        ] {
            assert_eq!(
                FieldSelector::parse(k, sel).unwrap().matches(k, &csr),
                want,
                "{sel}"
            );
        }
        let e = FieldSelector::parse(k, "spec.username=x").unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (400, "field label not supported: spec.username")
        );
        assert!(
            FieldSelector::parse(k, "metadata.namespace=x").is_err(),
            "cluster-scoped"
        );
        assert!(FieldSelector::parse(Kind::Secret, "type=Opaque").is_ok());
    }
}
