//! Content versions.
//!
//! A resource's version is a hash of the deterministic protobuf encoding of its content, so it
//! depends on nothing but the content: a reconnecting agent and a restarted or different
//! controller replica agree on it without sharing any state.

use sha2::{Digest, Sha256};

use crate::v1::{Resource, ResourceVersion, resource};

/// Hex digits kept from the SHA-256: 64 bits is ample to tell versions of one resource apart.
const VERSION_LEN: usize = 16;

/// The content version of a resource's payload.
pub fn resource_version(kind: &resource::Kind) -> String {
    let mut bytes = Vec::new();
    kind.encode(&mut bytes);
    digest(&bytes)
}

/// The version of a whole rule set: a hash over its resources' names and versions, in name order.
/// The iterator must yield names in sorted order.
pub fn system_version<'a>(resources: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut hasher = Sha256::new();
    for (name, version) in resources {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(version.as_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())[..VERSION_LEN].to_owned()
}

fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))[..VERSION_LEN].to_owned()
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
    fn system_version_depends_on_every_pair() {
        let one = system_version([("a", "1"), ("b", "2")]);
        assert_eq!(one, system_version([("a", "1"), ("b", "2")]));
        assert_ne!(one, system_version([("a", "1"), ("b", "3")]));
        assert_ne!(one, system_version([("a", "1")]));
        // Separators keep ("ab","") and ("a","b") apart.
        assert_ne!(system_version([("ab", "")]), system_version([("a", "b")]));
    }
}
