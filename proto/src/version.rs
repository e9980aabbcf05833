//! Content versions.
//!
//! A resource's version is a hash of the deterministic protobuf encoding of its content, so it
//! depends on nothing but the content: a reconnecting agent and a restarted or different
//! controller replica agree on it without sharing any state.
//!
//! A rule set's version combines its resources' (name, version) pairs with XOR, so it does
//! not depend on order and can be kept up to date in O(1) per changed resource: the
//! controller maintains thousands of per-node versions without rehashing whole rule sets.

use sha2::{Digest, Sha256};

use crate::v1::{Resource, ResourceVersion, resource};

/// Hex digits kept from the SHA-256: 64 bits is ample to tell versions of one resource apart.
const VERSION_LEN: usize = 16;

/// The content version of a resource's payload.
pub fn resource_version(kind: &resource::Kind) -> String {
    let mut bytes = Vec::new();
    kind.encode(&mut bytes);
    hex::encode(Sha256::digest(&bytes))[..VERSION_LEN].to_owned()
}

/// One resource's contribution to a rule set version.
pub fn version_term(name: &str, version: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([0]);
    hasher.update(version.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The text form of a combined version.
pub fn format_version(combined: u64) -> String {
    format!("{combined:016x}")
}

/// The version of a whole rule set, from its resources' names and versions (in any order).
pub fn system_version<'a>(resources: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    format_version(
        resources
            .into_iter()
            .fold(0, |acc, (name, version)| acc ^ version_term(name, version)),
    )
}

impl Resource {
    /// Builds a resource with its content version filled in.
    pub fn versioned(name: String, kind: resource::Kind) -> Self {
        let version = resource_version(&kind);
        Resource {
            name,
            version,
            kind: Some(kind),
        }
    }

    pub fn name_version(&self) -> ResourceVersion {
        ResourceVersion {
            name: self.name.clone(),
            version: self.version.clone(),
        }
    }

    /// This resource's contribution to a rule set version.
    pub fn version_term(&self) -> u64 {
        version_term(&self.name, &self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{NodeRules, ServicePortRules};

    #[test]
    fn version_follows_content_only() {
        let a = resource::Kind::Node(NodeRules {
            node_name: "a".into(),
            ..Default::default()
        });
        let b = resource::Kind::Node(NodeRules {
            node_name: "b".into(),
            ..Default::default()
        });
        assert_eq!(resource_version(&a), resource_version(&a.clone()));
        assert_ne!(resource_version(&a), resource_version(&b));
        let port = resource::Kind::ServicePort(ServicePortRules::default());
        assert_ne!(resource_version(&a), resource_version(&port));
    }

    #[test]
    fn system_version_depends_on_every_pair_not_on_order() {
        let one = system_version([("a", "1"), ("b", "2")]);
        assert_eq!(one, system_version([("b", "2"), ("a", "1")]));
        assert_ne!(one, system_version([("a", "1"), ("b", "3")]));
        assert_ne!(one, system_version([("a", "1")]));
        // Separators keep ("ab","") and ("a","b") apart.
        assert_ne!(system_version([("ab", "")]), system_version([("a", "b")]));
        // Incremental upkeep gives the same value as recomputing.
        let updated = u64::from_str_radix(&one, 16).unwrap()
            ^ version_term("b", "2")
            ^ version_term("b", "3");
        assert_eq!(
            format_version(updated),
            system_version([("a", "1"), ("b", "3")])
        );
    }

    /// Known answers: a resource's version, a version term and a system version must be the
    /// same in every replica and every release that speaks this protocol (an agent adopting
    /// its state after an upgrade compares them). A change here is a protocol change.
    #[test]
    fn versions_are_stable_across_releases() {
        let node = resource::Kind::Node(NodeRules {
            node_name: "a".into(),
            ..Default::default()
        });
        assert_eq!(resource_version(&node), "10c22081c8253357");
        assert_eq!(
            version_term("default/web/TCP/http/4", "0123456789abcdef"),
            10_849_791_958_191_755_980
        );
        assert_eq!(
            system_version([("node", "1"), ("default/web/TCP/http/4", "2")]),
            "5d83d6259008685d"
        );
        assert_eq!(system_version([]), "0000000000000000");
    }
}
