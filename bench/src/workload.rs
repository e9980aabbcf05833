//! The synthetic cluster of issue 5: N Services, one TCP port each, 10 endpoints each, the
//! endpoints spread round-robin over the nodes.
//!
//! Addresses: Service `i` has ClusterIP `10.96.0.0 + 1 + i` (inside the service CIDR
//! 10.96.0.0/12); its endpoint `j` is `10.128.0.0 + 1 + 10 i + j` (inside the cluster CIDR
//! 10.128.0.0/9) on port 8080, on node `(10 i + j) mod nodes`. The same workload feeds the
//! agent (as `v1` resources, exactly what the controller would send), the kube-proxy baseline
//! and the controller (as YAML manifests).

use std::net::Ipv4Addr;

use kubenft_proto::v1::{self, resource};

pub const ENDPOINTS_PER_SERVICE: u32 = 10;
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const CLUSTER_CIDR: &str = "10.128.0.0/9";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// One endpoint: address, port, node index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub node: u32,
}

/// One Service (one port).
#[derive(Clone, Debug)]
pub struct Service {
    pub index: u32,
    pub cluster_ip: Ipv4Addr,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn namespace(&self) -> String {
        format!("ns{}", self.index % 100)
    }

    pub fn name(&self) -> String {
        format!("svc{}", self.index)
    }

    /// The resource name the controller gives this Service's port.
    pub fn resource_name(&self) -> String {
        format!("{}/{}/tcp/http/ipv4", self.namespace(), self.name())
    }
}

/// The whole workload.
#[derive(Clone, Debug)]
pub struct Workload {
    pub services: u32,
    pub nodes: u32,
}

impl Workload {
    pub fn new(services: u32, nodes: u32) -> Workload {
        Workload { services, nodes }
    }

    pub fn service(&self, index: u32) -> Service {
        let endpoints = (0..ENDPOINTS_PER_SERVICE)
            .map(|j| {
                let n = index * ENDPOINTS_PER_SERVICE + j;
                Endpoint {
                    ip: offset(Ipv4Addr::new(10, 128, 0, 1), n),
                    port: TARGET_PORT,
                    node: n % self.nodes.max(1),
                }
            })
            .collect();
        Service {
            index,
            cluster_ip: cluster_ip(index),
            endpoints,
        }
    }

    pub fn all(&self) -> impl Iterator<Item = Service> + '_ {
        (0..self.services).map(|i| self.service(i))
    }
}

/// ClusterIP of Service `index`.
pub fn cluster_ip(index: u32) -> Ipv4Addr {
    offset(Ipv4Addr::new(10, 96, 0, 1), index)
}

/// A fresh endpoint address outside the generated ones (for one-endpoint changes).
pub fn moved_ip(n: u32) -> Ipv4Addr {
    offset(Ipv4Addr::new(10, 250, 0, 1), n)
}

fn offset(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n)
}

/// The `ServicePortRules` node `node` receives for a Service, as the controller computes it
/// for a Cluster-policy ClusterIP Service with ready endpoints.
pub fn port_rules(svc: &Service, node: u32) -> v1::ServicePortRules {
    let mut cluster: Vec<v1::Endpoint> = svc
        .endpoints
        .iter()
        .map(|e| v1::Endpoint {
            ip: e.ip.to_string(),
            port: u32::from(e.port),
            local: e.node == node,
            ready: true,
        })
        .collect();
    cluster.sort_by_key(|e| (e.ip.parse::<Ipv4Addr>().ok(), e.port));
    let local: Vec<v1::Endpoint> = cluster.iter().filter(|e| e.local).cloned().collect();
    let mut serving_ips: Vec<String> = cluster.iter().map(|e| e.ip.clone()).collect();
    serving_ips.sort();
    serving_ips.dedup();
    v1::ServicePortRules {
        namespace: svc.namespace(),
        service: svc.name(),
        port_name: "http".into(),
        protocol: v1::Protocol::Tcp as i32,
        family: v1::IpFamily::Ipv4 as i32,
        port: u32::from(SERVICE_PORT),
        cluster_ip: svc.cluster_ip.to_string(),
        local_ready_endpoints: u32::try_from(local.len()).unwrap_or(u32::MAX),
        cluster_endpoints: cluster,
        local_endpoints: local,
        serving_ips,
        ..Default::default()
    }
}

pub fn service_resource(svc: &Service, node: u32) -> v1::Resource {
    v1::Resource::versioned(
        svc.resource_name(),
        resource::Kind::ServicePort(port_rules(svc, node)),
    )
}

/// The node-wide resource: cluster and service CIDRs, the node's NodePort address.
pub fn node_resource(node: u32, node_ip: &str) -> v1::Resource {
    v1::Resource::versioned(
        "node".into(),
        resource::Kind::Node(v1::NodeRules {
            node_name: node_name(node),
            local_pod_cidrs: vec![CLUSTER_CIDR.into()],
            service_cidrs: vec![SERVICE_CIDR.into()],
            node_port_ips: vec![node_ip.into()],
            ..Default::default()
        }),
    )
}

pub fn node_name(node: u32) -> String {
    format!("node-{node}")
}

/// A Change holding every resource of `services`, sorted by name as the controller sends them.
pub fn full_change(
    services: impl Iterator<Item = Service>,
    node: u32,
    node_ip: &str,
) -> v1::Change {
    let mut resources: Vec<v1::Resource> = services.map(|s| service_resource(&s, node)).collect();
    resources.push(node_resource(node, node_ip));
    resources.sort_by(|a, b| a.name.cmp(&b.name));
    v1::Change {
        trigger_times: Vec::new(),
        change_id: 1,
        system_version: system_version(&resources),
        resources,
        removed: Vec::new(),
        continued: false,
    }
}

/// The system version over resources sorted by name.
pub fn system_version(resources: &[v1::Resource]) -> String {
    kubenft_proto::system_version(
        resources
            .iter()
            .map(|r| (r.name.as_str(), r.version.as_str())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_their_ranges() {
        let w = Workload::new(30_000, 100);
        let last = w.service(29_999);
        assert_eq!(last.cluster_ip, Ipv4Addr::new(10, 96, 117, 48));
        assert!(last.endpoints[9].ip < Ipv4Addr::new(10, 255, 255, 255));
        assert_eq!(w.service(0).endpoints[0].node, 0);
        assert_eq!(w.service(0).endpoints[1].node, 1);
    }

    #[test]
    fn the_agent_accepts_the_resources() {
        let w = Workload::new(3, 2);
        let change = full_change(w.all(), 0, "10.200.1.1");
        for r in &change.resources {
            kubenft_nft::rules::validate(r).unwrap();
        }
    }
}
