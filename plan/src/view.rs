//! A node's rule set, stored so that thousands of nodes cost little more than one.
//!
//! Most Service ports look the same from every node (no local endpoint there, no topology, no
//! node-specific source ranges), so each rule set is the catalog's shared `base` — one
//! persistent map, cloned in O(1) — overlaid with the few resources that are specific to the
//! node (its own settings, ports with endpoints on it). Its version is the XOR of its
//! resources' version terms, kept up to date per changed resource, and a short log of which
//! names changed at each revision lets a stream task diff only what changed.

use std::sync::Arc;

use imbl::OrdMap;
use kubenft_proto::format_version;
use kubenft_proto::v1::Resource;

/// Resources by name.
pub type Resources = OrdMap<String, Arc<Resource>>;

/// The resources every node shares, with the XOR of their version terms kept up to date, so
/// that a node's rule set is built in time proportional to what it overrides.
#[derive(Clone, Debug, Default)]
pub struct Base {
    resources: Resources,
    combined: u64,
}

impl Base {
    pub fn insert(&mut self, resource: Arc<Resource>) {
        self.combined ^= resource.version_term();
        if let Some(old) = self
            .resources
            .insert(resource.name.clone(), resource.clone())
        {
            self.combined ^= old.version_term();
        }
    }

    pub fn remove(&mut self, name: &str) {
        if let Some(old) = self.resources.remove(name) {
            self.combined ^= old.version_term();
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(name)
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }
}

impl FromIterator<Arc<Resource>> for Base {
    fn from_iter<I: IntoIterator<Item = Arc<Resource>>>(iter: I) -> Self {
        let mut base = Base::default();
        for r in iter {
            base.insert(r);
        }
        base
    }
}

/// How many revisions of change history a rule set keeps; a stream task further behind than
/// that diffs the whole set once.
const LOG_REVISIONS: u64 = 256;

/// Which names changed at one revision.
#[derive(Clone, Debug, PartialEq)]
pub enum Touched {
    /// Everything may have changed (a rebuild).
    All,
    Names(Arc<Vec<String>>),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeRuleSet {
    pub node: String,
    /// Resources every node shares (unless overridden).
    base: Resources,
    /// This node's own resources; they win over `base`.
    overrides: Resources,
    combined: u64,
    pub system_version: String,
    /// Bumped on every change; 0 before the first complete view.
    pub rev: u64,
    log: OrdMap<u64, Touched>,
}

impl NodeRuleSet {
    /// A rule set built from scratch: O(overrides), the base's share of the version being
    /// known already.
    pub fn build(node: String, base: &Base, overrides: Resources, rev: u64) -> Self {
        let combined = overrides.values().fold(base.combined, |acc, r| {
            acc ^ r.version_term() ^ base.get(&r.name).map_or(0, |b| b.version_term())
        });
        let mut set = NodeRuleSet {
            node,
            base: base.resources.clone(),
            overrides,
            combined,
            system_version: format_version(combined),
            rev,
            log: OrdMap::new(),
        };
        set.log.insert(rev, Touched::All);
        set
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.overrides.get(name).or_else(|| self.base.get(name))
    }

    /// This node's own resources (those it does not share with every node), in name order.
    pub fn overrides(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.overrides.values()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Every resource, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Resource>> {
        let mut base = self.base.iter().peekable();
        let mut over = self.overrides.iter().peekable();
        std::iter::from_fn(move || match (base.peek(), over.peek()) {
            (Some((bk, _)), Some((ok, _))) if bk < ok => base.next().map(|(_, r)| r),
            (Some((bk, _)), Some((ok, _))) if bk == ok => {
                base.next();
                over.next().map(|(_, r)| r)
            }
            (Some(_), Some(_)) | (None, Some(_)) => over.next().map(|(_, r)| r),
            (Some(_), None) => base.next().map(|(_, r)| r),
            (None, None) => None,
        })
    }

    pub fn len(&self) -> usize {
        self.base.len()
            + self
                .overrides
                .keys()
                .filter(|k| !self.base.contains_key(*k))
                .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next revision: a new shared base, and for each name in `names` this node's
    /// resource (`Some` to override the base, `None` to follow it). Returns `None` when
    /// nothing this node holds changed.
    pub fn next(
        &self,
        base: &Base,
        names: &[String],
        node_value: impl Fn(&str) -> Option<Arc<Resource>>,
    ) -> Option<NodeRuleSet> {
        let mut next = self.clone();
        next.base = base.resources.clone();
        let mut touched = Vec::new();
        for name in names {
            let before = self.get(name).map(|r| r.version_term());
            match node_value(name) {
                Some(r) => {
                    next.overrides.insert(name.clone(), r);
                }
                None => {
                    next.overrides.remove(name);
                }
            }
            let after = next.get(name).map(|r| r.version_term());
            if before != after {
                next.combined ^= before.unwrap_or(0) ^ after.unwrap_or(0);
                touched.push(name.clone());
            }
        }
        if touched.is_empty() {
            return None;
        }
        next.rev = self.rev + 1;
        next.system_version = format_version(next.combined);
        next.log.insert(next.rev, Touched::Names(Arc::new(touched)));
        while next.log.len() as u64 > LOG_REVISIONS {
            let Some(oldest) = next.log.keys().next().copied() else {
                break;
            };
            next.log.remove(&oldest);
        }
        Some(next)
    }

    /// The names changed after revision `since`, or `None` if the log does not reach back
    /// that far (or a rebuild happened since): then the whole set must be compared.
    pub fn changed_since(&self, since: u64) -> Option<Vec<String>> {
        if since >= self.rev {
            return Some(Vec::new());
        }
        // The log must still hold the revision right after `since`.
        self.log.get(&(since + 1))?;
        let mut names = Vec::new();
        for (_, touched) in self.log.range(since + 1..) {
            match touched {
                Touched::All => return None,
                Touched::Names(n) => names.extend(n.iter().cloned()),
            }
        }
        names.sort();
        names.dedup();
        Some(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubenft_proto::v1::{NodeRules, resource};

    fn res(name: &str, node: &str) -> Arc<Resource> {
        Arc::new(Resource::versioned(
            name.into(),
            resource::Kind::Node(NodeRules {
                node_name: node.into(),
                ..Default::default()
            }),
        ))
    }

    fn map(items: &[(&str, &str)]) -> Resources {
        items
            .iter()
            .map(|(n, v)| (n.to_string(), res(n, v)))
            .collect()
    }

    fn base(items: &[(&str, &str)]) -> Base {
        items.iter().map(|(n, v)| res(n, v)).collect()
    }

    #[test]
    fn overlay_iteration_and_versions() {
        let base = base(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let set = NodeRuleSet::build("n".into(), &base, map(&[("b", "2"), ("d", "1")]), 1);
        let seen: Vec<(String, String)> = set
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        assert_eq!(seen.len(), 4);
        assert_eq!(set.len(), 4);
        assert_eq!(set.get("b").unwrap().version, res("b", "2").version);
        assert_eq!(
            set.system_version,
            kubenft_proto::system_version(seen.iter().map(|(n, v)| (n.as_str(), v.as_str())))
        );

        // The base changes "a"; the node stops overriding "b".
        let mut base2 = base.clone();
        base2.insert(res("a", "9"));
        base2.remove("c");
        base2.insert(res("c", "1"));
        let next = set
            .next(&base2, &["a".into(), "b".into()], |_| None)
            .unwrap();
        assert_eq!(next.rev, 2);
        assert_eq!(next.get("b").unwrap().version, res("b", "1").version);
        let rebuilt = NodeRuleSet::build("n".into(), &base2, map(&[("d", "1")]), 2);
        assert_eq!(next.system_version, rebuilt.system_version);
        assert_eq!(next.changed_since(1), Some(vec!["a".into(), "b".into()]));
        assert_eq!(
            next.changed_since(0),
            None,
            "before the first build: full diff"
        );
        assert_eq!(next.changed_since(2), Some(vec![]));
        // Nothing this node holds changed: no new revision.
        assert!(next.next(&base2, &["c".into()], |_| None).is_none());
    }
}
