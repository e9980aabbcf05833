//! The fake API server's state: objects, a totally ordered event history with resource
//! versions, and the fault switches tests flip.
//!
//! Pure and synchronous so the HTTP layer stays thin: every request takes the lock, reads or
//! mutates this, and releases it before any I/O.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde_json::{Value, json};

use crate::Error;

/// The collections the fake serves (what kubenft watches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// The kind of an object from its `apiVersion` and `kind`.
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    /// The path prefix of the API group (`/api/v1`, `/apis/discovery.k8s.io/v1`).
    pub fn group_prefix(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "/api/v1",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
        }
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
}

/// Which objects a list or watch asks for.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub selector: Selector,
}

impl Filter {
    pub fn matches(&self, object: &Value) -> bool {
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        self.namespace.as_deref().is_none_or(|n| n == ns) && self.selector.matches(object)
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
        }
    }
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Creates or replaces an object. Returns the new resource version, or `None` if the object
    /// is unchanged (as the API server, a no-op update creates no event).
    pub fn apply(&mut self, mut object: Value) -> Result<Option<u64>, Error> {
        let key = key_of(&object)?;
        if !key.kind.namespaced() {
            remove_field(&mut object, "namespace");
        } else if object.pointer("/metadata/namespace").is_none() {
            set_meta(&mut object, "namespace", json!(key.namespace));
        }
        let previous = self.objects.get(&key);
        if let Some(prev) = previous {
            if same_content(prev, &object) {
                return Ok(None);
            }
            for field in ["uid", "creationTimestamp"] {
                if let Some(v) = prev.pointer(&format!("/metadata/{field}")) {
                    set_meta(&mut object, field, v.clone());
                }
            }
        } else {
            if object.pointer("/metadata/uid").is_none() {
                let uid = format!("00000000-0000-4000-8000-{:012}", self.next_uid);
                self.next_uid += 1;
                set_meta(&mut object, "uid", json!(uid));
            }
            if object.pointer("/metadata/creationTimestamp").is_none() {
                set_meta(
                    &mut object,
                    "creationTimestamp",
                    json!("2025-01-01T00:00:00Z"),
                );
            }
        }
        let change = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.rv += 1;
        set_meta(&mut object, "resourceVersion", json!(self.rv.to_string()));
        self.history.push(Event {
            rv: self.rv,
            kind: key.kind,
            kind_of_change: change,
            object: object.clone(),
        });
        self.objects.insert(key, object);
        Ok(Some(self.rv))
    }

    /// Deletes an object; `false` if there was none.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> bool {
        let key = Key {
            kind,
            namespace: if kind.namespaced() {
                namespace.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        };
        let Some(mut object) = self.objects.remove(&key) else {
            return false;
        };
        self.rv += 1;
        set_meta(&mut object, "resourceVersion", json!(self.rv.to_string()));
        self.history.push(Event {
            rv: self.rv,
            kind,
            kind_of_change: "DELETED",
            object,
        });
        true
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
            .filter(|(k, o)| k.kind == kind && filter.matches(o))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Every key currently held.
    pub fn keys(&self) -> Vec<Key> {
        self.objects.keys().cloned().collect()
    }

    /// Events of a collection after `after`, or `None` if that part of history is gone.
    pub fn events_after(&self, kind: Kind, filter: &Filter, after: u64) -> Option<Vec<Event>> {
        if after < self.compacted {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|e| e.rv > after && e.kind == kind && filter.matches(&e.object))
                .cloned()
                .collect(),
        )
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
    let namespace = if kind.namespaced() {
        match s("/metadata/namespace") {
            "" => "default",
            ns => ns,
        }
    } else {
        ""
    };
    Ok(Key {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

fn set_meta(object: &mut Value, field: &str, value: Value) {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"][field] = value;
}

fn remove_field(object: &mut Value, field: &str) {
    if let Some(Value::Object(m)) = object.get_mut("metadata") {
        m.remove(field);
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
            .map(|e| e.kind_of_change)
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
}
