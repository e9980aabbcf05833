//! The validated view a source maintains incrementally.
//!
//! A source hands over its objects in batches (a manifest file, or one API object), each
//! validated once when it arrives. The store keeps the planner's [`Inputs`] as persistent maps
//! and touches only the names a batch defines, so replacing one batch among 100,000 costs
//! that batch, and the planner can find what changed without comparing everything.
//!
//! The same name may be defined by several batches (two manifest files): the definition that
//! comes first (by batch key, then position) is used, the others are refused as duplicates.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use imbl::OrdMap;

use super::Objects;
use kubenft_plan::Inputs;
use kubenft_plan::model::{
    self, Limits, NodeModel, ObjectName, Rejection, ServiceModel, ServiceOutcome, SliceModel, clip,
};

/// What became of a Service that was not refused.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ServiceEntry {
    Proxied(Arc<ServiceModel>),
    /// Deliberately not proxied, and why.
    Ignored(String),
}

/// One batch of objects, validated.
#[derive(Debug, Default)]
pub struct Batch {
    services: Vec<(ObjectName, ServiceEntry)>,
    slices: Vec<Arc<SliceModel>>,
    nodes: Vec<Arc<NodeModel>>,
    rejections: Vec<Rejection>,
}

impl Batch {
    /// Validates objects; what is invalid becomes a rejection naming the object and field.
    pub fn validate(objects: &Objects, limits: &Limits) -> Batch {
        let mut batch = Batch {
            rejections: objects.rejections.clone(),
            ..Default::default()
        };
        for svc in &objects.services {
            match model::service(svc, limits) {
                ServiceOutcome::Proxied(m, problems) => {
                    batch.rejections.extend(problems);
                    batch
                        .services
                        .push((m.id.clone(), ServiceEntry::Proxied(Arc::new(m))));
                }
                ServiceOutcome::Ignored(why) => {
                    let id = ObjectName {
                        namespace: svc
                            .metadata
                            .namespace
                            .clone()
                            .unwrap_or_else(|| "default".into()),
                        name: svc.metadata.name.clone().unwrap_or_default(),
                    };
                    tracing::debug!(service = %clip(&id.to_string()), %why, "service not proxied");
                    batch.services.push((id, ServiceEntry::Ignored(why)));
                }
                ServiceOutcome::Rejected(r) => batch.rejections.push(r),
            }
        }
        for slice in &objects.slices {
            match model::endpoint_slice(slice) {
                Ok((m, problems)) => {
                    batch.rejections.extend(problems);
                    batch.slices.push(Arc::new(m));
                }
                Err(r) => batch.rejections.push(r),
            }
        }
        for node in &objects.nodes {
            match model::node(node) {
                Ok((m, problems)) => {
                    batch.rejections.extend(problems);
                    batch.nodes.push(Arc::new(m));
                }
                Err(r) => batch.rejections.push(r),
            }
        }
        batch
    }
}

/// Every definition of the names of one kind, by origin; the first origin's is visible.
struct Definitions<N, O, V> {
    by_name: BTreeMap<N, BTreeMap<O, V>>,
    /// Names defined more than once.
    duplicated: BTreeSet<N>,
}

impl<N: Ord + Clone, O: Ord, V> Default for Definitions<N, O, V> {
    fn default() -> Self {
        Definitions {
            by_name: BTreeMap::new(),
            duplicated: BTreeSet::new(),
        }
    }
}

impl<N: Ord + Clone, O: Ord, V> Definitions<N, O, V> {
    fn insert(&mut self, name: N, origin: O, value: V) {
        let defs = self.by_name.entry(name.clone()).or_default();
        defs.insert(origin, value);
        if defs.len() > 1 {
            self.duplicated.insert(name);
        }
    }

    fn remove(&mut self, name: &N, origin: &O) {
        if let Some(defs) = self.by_name.get_mut(name) {
            defs.remove(origin);
            if defs.len() < 2 {
                self.duplicated.remove(name);
            }
            if defs.is_empty() {
                self.by_name.remove(name);
            }
        }
    }

    /// Replaces the definitions one batch (`key`, by position) made: `old` names what it
    /// defined, `new` what it defines now. Returns every name either one touches.
    fn exchange<'a, K: Ord + Clone>(
        &mut self,
        key: &K,
        old: impl Iterator<Item = &'a N>,
        new: impl Iterator<Item = (&'a N, &'a V)>,
    ) -> BTreeSet<N>
    where
        N: 'a,
        V: Clone + 'a,
        O: From<(K, usize)>,
    {
        let mut touched = BTreeSet::new();
        for (i, name) in old.enumerate() {
            self.remove(name, &O::from((key.clone(), i)));
            touched.insert(name.clone());
        }
        for (i, (name, value)) in new.enumerate() {
            self.insert(name.clone(), O::from((key.clone(), i)), value.clone());
            touched.insert(name.clone());
        }
        touched
    }

    /// The definition in use.
    fn first(&self, name: &N) -> Option<&V> {
        self.by_name.get(name)?.values().next()
    }

    /// Each name with how many of its definitions are not used.
    fn unused(&self) -> impl Iterator<Item = (&N, usize)> {
        self.duplicated.iter().map(|n| {
            (
                n,
                self.by_name.get(n).map_or(0, |d| d.len().saturating_sub(1)),
            )
        })
    }
}

/// Sets `map[name]` to `value` (or removes it), keeping the present value when it is equal:
/// an unchanged object must not look changed to the planner's diff.
fn publish<K: Ord + Clone, V: Clone + PartialEq>(
    map: &mut OrdMap<K, V>,
    name: &K,
    value: Option<V>,
) {
    match value {
        Some(v) if map.get(name) != Some(&v) => {
            map.insert(name.clone(), v);
        }
        Some(_) => {}
        None => {
            map.remove(name);
        }
    }
}

/// A source's validated objects, by batch key `K` (a file path, an API object's identity).
pub struct Store<K> {
    batches: BTreeMap<K, Batch>,
    services: Definitions<ObjectName, (K, usize), ServiceEntry>,
    slices: Definitions<ObjectName, (K, usize), Arc<SliceModel>>,
    nodes: Definitions<String, (K, usize), Arc<NodeModel>>,
    /// The batches with rejections (so gathering them does not visit every batch).
    rejected: BTreeSet<K>,
    /// The visible view (rejections are gathered on [`Store::inputs`]).
    view: Inputs,
}

impl<K: Ord + Clone> Default for Store<K> {
    fn default() -> Self {
        Store {
            batches: BTreeMap::new(),
            services: Definitions::default(),
            slices: Definitions::default(),
            nodes: Definitions::default(),
            rejected: BTreeSet::new(),
            view: Inputs::default(),
        }
    }
}

impl<K: Ord + Clone> Store<K> {
    /// Replaces the batch under `key` (validated by the caller).
    pub fn set(&mut self, key: K, batch: Batch) {
        let old = self.batches.remove(&key);
        self.exchange(&key, old.as_ref(), Some(&batch));
        if batch.rejections.is_empty() {
            self.rejected.remove(&key);
        } else {
            self.rejected.insert(key.clone());
        }
        self.batches.insert(key, batch);
    }

    pub fn remove(&mut self, key: &K) {
        if let Some(old) = self.batches.remove(key) {
            self.exchange(key, Some(&old), None);
            self.rejected.remove(key);
        }
    }

    pub fn contains(&self, key: &K) -> bool {
        self.batches.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.batches.keys()
    }

    /// Retracts `old`'s definitions and enters `new`'s, then republishes every name either
    /// one defines.
    fn exchange(&mut self, key: &K, old: Option<&Batch>, new: Option<&Batch>) {
        let services = self.services.exchange(
            key,
            old.into_iter()
                .flat_map(|b| b.services.iter().map(|(id, _)| id)),
            new.into_iter()
                .flat_map(|b| b.services.iter().map(|(id, e)| (id, e))),
        );
        let slices = self.slices.exchange(
            key,
            old.into_iter().flat_map(|b| b.slices.iter().map(|s| &s.id)),
            new.into_iter()
                .flat_map(|b| b.slices.iter().map(|s| (&s.id, s))),
        );
        let nodes = self.nodes.exchange(
            key,
            old.into_iter()
                .flat_map(|b| b.nodes.iter().map(|n| &n.name)),
            new.into_iter()
                .flat_map(|b| b.nodes.iter().map(|n| (&n.name, n))),
        );
        for id in &services {
            let entry = self.services.first(id);
            let proxied = match entry {
                Some(ServiceEntry::Proxied(m)) => Some(m.clone()),
                _ => None,
            };
            let ignored = match entry {
                Some(ServiceEntry::Ignored(why)) => Some(why.clone()),
                _ => None,
            };
            publish(&mut self.view.services, id, proxied);
            publish(&mut self.view.ignored, id, ignored);
        }
        for id in &slices {
            publish(&mut self.view.slices, id, self.slices.first(id).cloned());
        }
        for name in &nodes {
            publish(&mut self.view.nodes, name, self.nodes.first(name).cloned());
        }
    }

    /// The current view: O(1) for the objects, plus every rejection (those of the batches,
    /// and one per unused duplicate definition).
    pub fn inputs(&self) -> Inputs {
        let mut rejections: Vec<Rejection> = self
            .rejected
            .iter()
            .filter_map(|k| self.batches.get(k))
            .flat_map(|b| b.rejections.iter().cloned())
            .collect();
        for (id, n) in self.services.unused() {
            rejections.extend(std::iter::repeat_n(duplicate("Service", id), n));
        }
        for (id, n) in self.slices.unused() {
            rejections.extend(std::iter::repeat_n(duplicate("EndpointSlice", id), n));
        }
        for (name, n) in self.nodes.unused() {
            let id = ObjectName {
                namespace: String::new(),
                name: name.clone(),
            };
            rejections.extend(std::iter::repeat_n(duplicate("Node", &id), n));
        }
        rejections.sort();
        Inputs {
            rejections,
            ..self.view.clone()
        }
    }
}

fn duplicate(kind: &'static str, id: &ObjectName) -> Rejection {
    Rejection {
        kind,
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        field: "metadata.name".into(),
        message: "defined more than once; the first definition is used".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::parse_manifest;
    use crate::source::test_manifest::service as svc;

    fn batch(text: &str) -> Batch {
        let mut objects = Objects::default();
        parse_manifest("t.yaml", text, &mut objects);
        Batch::validate(&objects, &Limits::default())
    }

    #[test]
    fn the_first_definition_wins_and_the_others_are_refused() {
        let mut store = Store::<&str>::default();
        store.set("b.yaml", batch(&svc("web", "10.96.0.2")));
        store.set("a.yaml", batch(&svc("web", "10.96.0.1")));
        let i = store.inputs();
        assert_eq!(i.services.len(), 1);
        let web = i.services.values().next().unwrap();
        assert_eq!(
            web.cluster_ips[0].to_string(),
            "10.96.0.1",
            "a.yaml comes first"
        );
        assert_eq!(i.rejections.len(), 1);
        assert_eq!(i.rejections[0].field, "metadata.name");

        store.remove(&"a.yaml");
        let i = store.inputs();
        assert_eq!(
            i.services.values().next().unwrap().cluster_ips[0].to_string(),
            "10.96.0.2"
        );
        assert!(i.rejections.is_empty(), "{:?}", i.rejections);
    }

    #[test]
    fn an_unchanged_object_keeps_its_identity() {
        let mut store = Store::<&str>::default();
        store.set("a.yaml", batch(&svc("a", "10.96.0.1")));
        store.set("b.yaml", batch(&svc("b", "10.96.0.2")));
        let before = store.inputs();
        // Rewritten with the same content: nothing changes for the planner.
        store.set("a.yaml", batch(&svc("a", "10.96.0.1")));
        store.set("b.yaml", batch(&svc("b", "10.96.0.3")));
        let after = store.inputs();
        let changed: Vec<String> = before
            .services
            .diff(&after.services)
            .map(|d| match d {
                imbl::ordmap::DiffItem::Update { new, .. } => new.0.name.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(changed, ["b"]);
    }

    #[test]
    fn ignored_services_and_rejections_follow_their_batch() {
        let mut store = Store::<&str>::default();
        let headless = "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}\n";
        store.set("a.yaml", batch(headless));
        store.set("b.yaml", batch("apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n"));
        let i = store.inputs();
        assert_eq!(i.ignored.len(), 1);
        assert_eq!(i.rejections.len(), 1);
        store.remove(&"b.yaml");
        store.set("a.yaml", batch(&svc("h", "10.96.0.9")));
        let i = store.inputs();
        assert!(i.ignored.is_empty() && i.rejections.is_empty());
        assert_eq!(i.services.len(), 1);
    }
}
