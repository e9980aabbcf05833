//! The resource names both sides rely on, beside the per-Service-port names the controller
//! makes up (`<namespace>/<service>/<protocol>/<port name>/<family>`).

use std::net::IpAddr;

/// A node's own settings (`NodeRules`).
pub const NODE_RESOURCE: &str = "node";

/// How many `node-endpoints/<bucket>` resources a node's endpoint addresses are spread over.
pub const ENDPOINT_BUCKETS: u8 = 16;

/// The bucket of an endpoint address (FNV-1a of its octets): stable across controllers and
/// restarts, so every replica names the same resources.
pub fn endpoint_bucket(ip: &IpAddr) -> u8 {
    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
    let hash = match ip {
        IpAddr::V4(v4) => fnv1a(&v4.octets()),
        IpAddr::V6(v6) => fnv1a(&v6.octets()),
    };
    (hash % u64::from(ENDPOINT_BUCKETS)) as u8
}

/// "node-endpoints/<bucket>".
pub fn node_endpoints_name(bucket: u8) -> String {
    format!("node-endpoints/{bucket}")
}

/// The bucket a `node-endpoints/<bucket>` name stands for (exactly as
/// [`node_endpoints_name`] writes it).
pub fn parse_node_endpoints_name(name: &str) -> Option<u8> {
    let bucket: u8 = name.strip_prefix("node-endpoints/")?.parse().ok()?;
    (bucket < ENDPOINT_BUCKETS && node_endpoints_name(bucket) == name).then_some(bucket)
}

/// The longest Linux interface name (IFNAMSIZ less the terminating NUL).
pub const MAX_INTERFACE_NAME: usize = 15;

/// Why `name` cannot be an interface name (or prefix) for local-traffic detection, if it
/// cannot: 1 to 15 bytes, a Linux interface name (not `.` or `..`), and only ASCII letters,
/// digits, `.`, `_` and `-`. The kernel allows more, but nothing else appears in the names
/// CNIs give (`cali`, `eni`, `cbr0`, `cni0`, `flannel.1`, `kube-bridge`), and this set needs
/// no escaping in nft's quoted strings, where `*` is a wildcard and `"` cannot be escaped.
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "is {} bytes long; interface names have at most {MAX_INTERFACE_NAME}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("is not an interface name".into());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "contains {c:?}: only ASCII letters, digits, '.', '_' and '-' are accepted"
        )),
        None => Ok(()),
    }
}

/// `NAMESPACE/NAME` of a Kubernetes object named on a command line (a ServiceAccount, the
/// controllers' Service, the signer's Secret): two DNS labels.
pub fn parse_namespaced_name(s: &str) -> Result<(String, String), String> {
    let dns_label = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !p.starts_with('-')
            && !p.ends_with('-')
    };
    match s.split_once('/') {
        Some((ns, name)) if dns_label(ns) && dns_label(name) => Ok((ns.into(), name.into())),
        _ => Err(format!(
            "{s:?} is not NAMESPACE/NAME (lower-case DNS labels)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_short_and_plain() {
        for ok in [
            "eni",
            "cali",
            "cbr0",
            "cni0",
            "flannel.1",
            "kube-bridge",
            "v",
            "azv_",
            "a23456789012345",
        ] {
            assert_eq!(check_interface_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a234567890123456",
            "br 0",
            "br/0",
            "eth0:1",
            "cali*",
            "x\"",
            "x\\",
            "a;b",
            "é",
            "br\n0",
        ] {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bucket_names_round_trip_and_nothing_else_parses() {
        for b in 0..ENDPOINT_BUCKETS {
            assert_eq!(parse_node_endpoints_name(&node_endpoints_name(b)), Some(b));
        }
        for bad in [
            "node",
            "node-endpoints/16",
            "node-endpoints/01",
            "node-endpoints/",
            "x/3",
        ] {
            assert_eq!(parse_node_endpoints_name(bad), None, "{bad}");
        }
        let ip: IpAddr = "10.244.1.10".parse().unwrap();
        assert!(endpoint_bucket(&ip) < ENDPOINT_BUCKETS);
        assert_eq!(endpoint_bucket(&ip), endpoint_bucket(&ip));
    }

    /// Known answers: every replica and release must put an endpoint address in the same
    /// bucket (the bucket is part of a resource's name on the stream).
    #[test]
    fn buckets_are_stable_across_releases() {
        for (ip, bucket) in [("10.244.1.5", 1), ("fd00::5", 7), ("0.0.0.0", 5)] {
            assert_eq!(endpoint_bucket(&ip.parse().unwrap()), bucket, "{ip}");
        }
        assert_eq!(node_endpoints_name(7), "node-endpoints/7");
    }
}
