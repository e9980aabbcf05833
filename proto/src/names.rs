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

#[cfg(test)]
mod tests {
    use super::*;

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
}
