//! Kubernetes objects for the controller's `--source dir:` input.
//!
//! Why: lab tests describe cluster state the way a cluster would — v1 `Node`, v1 `Service`,
//! discovery.k8s.io/v1 `EndpointSlice` — so the controller under test parses exactly what it
//! parses in production. The builders cover the fields proxying depends on; anything else
//! can be set with a JSON merge patch (`merge(json!({...}))`). Output is JSON, which is valid YAML.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use crate::Proto;
use crate::topology::Pod;

/// Anything that renders to one Kubernetes object.
pub trait ToJson {
    fn to_json(&self) -> Value;

    /// The object as a manifest file's contents (pretty JSON, valid YAML).
    fn to_yaml(&self) -> String {
        pretty(&self.to_json())
    }
}

impl ToJson for Value {
    fn to_json(&self) -> Value {
        self.clone()
    }
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values always serialize");
    s.push('\n');
    s
}

/// A `kind: List` of objects, for one file holding several.
pub fn list(items: &[&dyn ToJson]) -> String {
    pretty(&json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items.iter().map(|i| i.to_json()).collect::<Vec<_>>(),
    }))
}

/// RFC 7386 JSON merge patch: objects merge recursively, `null` deletes, anything else
/// replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let obj = target.as_object_mut().expect("just made an object");
    for (k, v) in patch {
        if v.is_null() {
            obj.remove(k);
        } else {
            merge_patch(obj.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// IP family of a Service or an EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    /// `IPv4` / `IPv6`, the spelling of both `ipFamilies` and `addressType`.
    pub fn k8s_name(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Node

/// A v1 Node: name, InternalIP addresses, labels (zone) and taints.
#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    addresses: Vec<IpAddr>,
    pod_cidrs: Vec<IpNet>,
    labels: Map<String, Value>,
    taints: Vec<Value>,
    patches: Vec<Value>,
}

impl Node {
    pub fn new(name: &str) -> Self {
        let mut labels = Map::new();
        labels.insert("kubernetes.io/hostname".into(), name.into());
        Node {
            name: name.to_string(),
            addresses: Vec::new(),
            pod_cidrs: Vec::new(),
            labels,
            taints: Vec::new(),
            patches: Vec::new(),
        }
    }

    /// Adds an InternalIP address.
    pub fn address(mut self, ip: impl Into<IpAddr>) -> Self {
        self.addresses.push(ip.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets `spec.podCIDRs` (and `spec.podCIDR`, its first, as the API server does); none:
    /// neither field.
    pub fn pod_cidrs(mut self, cidrs: &[IpNet]) -> Self {
        self.pod_cidrs = cidrs.to_vec();
        self
    }

    /// Sets `topology.kubernetes.io/zone`.
    pub fn zone(self, zone: &str) -> Self {
        self.label("topology.kubernetes.io/zone", zone)
    }

    /// Adds a taint, e.g. `("ToBeDeletedByClusterAutoscaler", "NoSchedule")`.
    pub fn taint(mut self, key: &str, effect: &str) -> Self {
        self.taints.push(json!({"key": key, "effect": effect}));
        self
    }

    /// Applies a JSON merge patch (RFC 7386) to the rendered object, for fields the builder
    /// does not cover, e.g. `json!({"spec": {"publishNotReadyAddresses": true}})`.
    pub fn merge(mut self, patch: Value) -> Self {
        self.patches.push(patch);
        self
    }
}

impl ToJson for Node {
    fn to_json(&self) -> Value {
        let addresses: Vec<Value> = self
            .addresses
            .iter()
            .map(|a| json!({"type": "InternalIP", "address": a.to_string()}))
            .chain(std::iter::once(
                json!({"type": "Hostname", "address": self.name}),
            ))
            .collect();
        let mut v = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels},
            "spec": {},
            "status": {"addresses": addresses},
        });
        if !self.taints.is_empty() {
            v["spec"]["taints"] = Value::Array(self.taints.clone());
        }
        if let Some(first) = self.pod_cidrs.first() {
            v["spec"]["podCIDR"] = first.to_string().into();
            v["spec"]["podCIDRs"] = self.pod_cidrs.iter().map(|c| c.to_string()).collect();
        }
        for p in &self.patches {
            merge_patch(&mut v, p);
        }
        v
    }
}

// ---------------------------------------------------------------------------------------
// Service

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl ServiceType {
    pub fn k8s_name(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn k8s_name(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// A Service port's `targetPort`: a number or a named container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(p: u16) -> Self {
        TargetPort::Number(p)
    }
}

impl From<&str> for TargetPort {
    fn from(p: &str) -> Self {
        TargetPort::Name(p.to_string())
    }
}

#[derive(Debug, Clone)]
struct ServicePort {
    name: String,
    protocol: Proto,
    port: u16,
    target: TargetPort,
    node_port: Option<u16>,
}

/// A v1 Service. Start with [`Service::cluster_ip`] (or [`Service::headless`],
/// [`Service::external_name`]) and add ports and policies.
///
/// ```
/// use kubenft_lab::{Proto, Service, TrafficPolicy};
/// let svc = Service::cluster_ip("web", "10.96.0.10")
///     .port("http", 80, 8080, Proto::Tcp)
///     .node_port(30080)
///     .external_traffic_policy(TrafficPolicy::Local);
/// ```
#[derive(Debug, Clone)]
pub struct Service {
    name: String,
    namespace: String,
    ty: ServiceType,
    cluster_ips: Vec<String>,
    families: Vec<IpFamily>,
    ports: Vec<ServicePort>,
    labels: Map<String, Value>,
    etp: Option<TrafficPolicy>,
    itp: Option<TrafficPolicy>,
    affinity_timeout: Option<Option<u32>>,
    external_ips: Vec<IpAddr>,
    lb_ingress: Vec<Value>,
    lb_source_ranges: Vec<String>,
    health_check_node_port: Option<u16>,
    external_name: Option<String>,
    patches: Vec<Value>,
}

impl Service {
    /// A ClusterIP Service with one IP (its family is derived from the address).
    pub fn cluster_ip(name: &str, ip: &str) -> Self {
        Self::cluster_ips(name, &[ip])
    }

    /// A ClusterIP Service with one IP per family; `ipFamilies` follows the order given and
    /// `ipFamilyPolicy` is `RequireDualStack` when there are two.
    pub fn cluster_ips(name: &str, ips: &[&str]) -> Self {
        let families = ips
            .iter()
            .filter_map(|ip| ip.parse::<IpAddr>().ok().map(IpFamily::of))
            .collect();
        Service {
            name: name.to_string(),
            namespace: "default".into(),
            ty: ServiceType::ClusterIp,
            cluster_ips: ips.iter().map(|s| s.to_string()).collect(),
            families,
            ports: Vec::new(),
            labels: Map::new(),
            etp: None,
            itp: None,
            affinity_timeout: None,
            external_ips: Vec::new(),
            lb_ingress: Vec::new(),
            lb_source_ranges: Vec::new(),
            health_check_node_port: None,
            external_name: None,
            patches: Vec::new(),
        }
    }

    /// A headless Service (`clusterIP: None`).
    pub fn headless(name: &str) -> Self {
        Self::cluster_ips(name, &["None"])
    }

    /// An ExternalName Service.
    pub fn external_name(name: &str, target: &str) -> Self {
        let mut s = Self::cluster_ips(name, &[]);
        s.ty = ServiceType::ExternalName;
        s.external_name = Some(target.to_string());
        s
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.to_string();
        self
    }

    /// The Service's name (also the EndpointSlice `kubernetes.io/service-name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Overrides `ipFamilies` (e.g. to state `[IPv6, IPv4]` order explicitly).
    pub fn ip_families(mut self, families: &[IpFamily]) -> Self {
        self.families = families.to_vec();
        self
    }

    /// Sets `spec.type`.
    pub fn service_type(mut self, ty: ServiceType) -> Self {
        self.ty = ty;
        self
    }

    /// Adds a port. `target` is a number or a named port (`"http"`).
    pub fn port(
        mut self,
        name: &str,
        port: u16,
        target: impl Into<TargetPort>,
        protocol: Proto,
    ) -> Self {
        self.ports.push(ServicePort {
            name: name.to_string(),
            protocol,
            port,
            target: target.into(),
            node_port: None,
        });
        self
    }

    /// Sets the nodePort of the most recently added port, and makes a ClusterIP Service a
    /// NodePort one.
    pub fn node_port(mut self, node_port: u16) -> Self {
        if let Some(p) = self.ports.last_mut() {
            p.node_port = Some(node_port);
        }
        if self.ty == ServiceType::ClusterIp {
            self.ty = ServiceType::NodePort;
        }
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn external_traffic_policy(mut self, p: TrafficPolicy) -> Self {
        self.etp = Some(p);
        self
    }

    pub fn internal_traffic_policy(mut self, p: TrafficPolicy) -> Self {
        self.itp = Some(p);
        self
    }

    /// `sessionAffinity: ClientIP`, with `timeoutSeconds` if given.
    pub fn session_affinity_client_ip(mut self, timeout_seconds: Option<u32>) -> Self {
        self.affinity_timeout = Some(timeout_seconds);
        self
    }

    pub fn external_ip(mut self, ip: impl Into<IpAddr>) -> Self {
        self.external_ips.push(ip.into());
        self
    }

    /// Adds a `status.loadBalancer.ingress` IP (and makes the Service a LoadBalancer).
    pub fn lb_ingress(mut self, ip: impl Into<IpAddr>) -> Self {
        self.lb_ingress.push(json!({"ip": ip.into().to_string()}));
        self.ty = ServiceType::LoadBalancer;
        self
    }

    /// Adds an ingress IP with `ipMode` (`VIP` or `Proxy`).
    pub fn lb_ingress_mode(mut self, ip: impl Into<IpAddr>, ip_mode: &str) -> Self {
        self.lb_ingress
            .push(json!({"ip": ip.into().to_string(), "ipMode": ip_mode}));
        self.ty = ServiceType::LoadBalancer;
        self
    }

    pub fn lb_source_range(mut self, cidr: &str) -> Self {
        self.lb_source_ranges.push(cidr.to_string());
        self
    }

    pub fn health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    /// Applies a JSON merge patch (RFC 7386) to the rendered object, for fields the builder
    /// does not cover, e.g. `json!({"spec": {"publishNotReadyAddresses": true}})`.
    pub fn merge(mut self, patch: Value) -> Self {
        self.patches.push(patch);
        self
    }
}

impl ToJson for Service {
    fn to_json(&self) -> Value {
        let mut spec = Map::new();
        spec.insert("type".into(), self.ty.k8s_name().into());
        if let Some(target) = &self.external_name {
            spec.insert("externalName".into(), target.as_str().into());
        } else {
            if let Some(first) = self.cluster_ips.first() {
                spec.insert("clusterIP".into(), first.as_str().into());
                spec.insert("clusterIPs".into(), json!(self.cluster_ips));
            }
            if !self.families.is_empty() {
                let names: Vec<&str> = self.families.iter().map(|f| f.k8s_name()).collect();
                spec.insert("ipFamilies".into(), json!(names));
                let policy = if names.len() > 1 {
                    "RequireDualStack"
                } else {
                    "SingleStack"
                };
                spec.insert("ipFamilyPolicy".into(), policy.into());
            }
        }
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut v = json!({
                    "name": p.name,
                    "protocol": p.protocol.k8s_name(),
                    "port": p.port,
                    "targetPort": match &p.target {
                        TargetPort::Number(n) => json!(n),
                        TargetPort::Name(n) => json!(n),
                    },
                });
                if let Some(np) = p.node_port {
                    v["nodePort"] = json!(np);
                }
                v
            })
            .collect();
        if !ports.is_empty() {
            spec.insert("ports".into(), Value::Array(ports));
        }
        if let Some(p) = self.etp {
            spec.insert("externalTrafficPolicy".into(), p.k8s_name().into());
        }
        if let Some(p) = self.itp {
            spec.insert("internalTrafficPolicy".into(), p.k8s_name().into());
        }
        match self.affinity_timeout {
            None => {
                spec.insert("sessionAffinity".into(), "None".into());
            }
            Some(timeout) => {
                spec.insert("sessionAffinity".into(), "ClientIP".into());
                if let Some(t) = timeout {
                    spec.insert(
                        "sessionAffinityConfig".into(),
                        json!({"clientIP": {"timeoutSeconds": t}}),
                    );
                }
            }
        }
        if !self.external_ips.is_empty() {
            let ips: Vec<String> = self.external_ips.iter().map(|i| i.to_string()).collect();
            spec.insert("externalIPs".into(), json!(ips));
        }
        if !self.lb_source_ranges.is_empty() {
            spec.insert(
                "loadBalancerSourceRanges".into(),
                json!(self.lb_source_ranges),
            );
        }
        if let Some(p) = self.health_check_node_port {
            spec.insert("healthCheckNodePort".into(), json!(p));
        }
        let mut v = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": spec,
            "status": {"loadBalancer": {}},
        });
        if !self.lb_ingress.is_empty() {
            v["status"]["loadBalancer"]["ingress"] = Value::Array(self.lb_ingress.clone());
        }
        for p in &self.patches {
            merge_patch(&mut v, p);
        }
        v
    }
}

// ---------------------------------------------------------------------------------------
// EndpointSlice

/// An endpoint's `conditions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Cond {
    /// A normal, ready endpoint.
    pub const READY: Cond = Cond {
        ready: true,
        serving: true,
        terminating: false,
    };
    /// Not ready and not serving (e.g. failing readiness probe on start).
    pub const NOT_READY: Cond = Cond {
        ready: false,
        serving: false,
        terminating: false,
    };
    /// Not ready but serving (only the terminating fallback may use it; scenario 20).
    pub const SERVING_NOT_READY: Cond = Cond {
        ready: false,
        serving: true,
        terminating: false,
    };
    /// Terminating but still serving (graceful shutdown).
    pub const TERMINATING_SERVING: Cond = Cond {
        ready: false,
        serving: true,
        terminating: true,
    };
    /// Terminating and no longer serving.
    pub const TERMINATING: Cond = Cond {
        ready: false,
        serving: false,
        terminating: true,
    };
}

#[derive(Debug, Clone)]
struct Endpoint {
    v4: Option<IpAddr>,
    v6: Option<IpAddr>,
    node: Option<String>,
    zone: Option<String>,
    cond: Cond,
    /// `hints` (forZones / forNodes), if any.
    hints: Option<Value>,
}

/// A discovery.k8s.io/v1 EndpointSlice for one Service and one address family.
///
/// ```no_run
/// # fn f(pod: &kubenft_lab::Pod) {
/// use kubenft_lab::{Cond, Slice};
/// let slice = Slice::for_service("web").port("http", 8080).endpoint(pod, Cond::READY);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Slice {
    name: String,
    namespace: String,
    service: String,
    family: IpFamily,
    ports: Vec<Value>,
    endpoints: Vec<Endpoint>,
    patches: Vec<Value>,
}

impl Slice {
    /// An IPv4 slice named `<service>-lab` (use [`Slice::named`] for more than one slice).
    pub fn for_service(service: &str) -> Self {
        Slice {
            name: format!("{service}-lab"),
            namespace: "default".into(),
            service: service.to_string(),
            family: IpFamily::V4,
            ports: Vec::new(),
            endpoints: Vec::new(),
            patches: Vec::new(),
        }
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.to_string();
        self
    }

    /// Switches the slice to `addressType: IPv6` (pod endpoints then use their IPv6 address).
    pub fn ipv6(mut self) -> Self {
        self.family = IpFamily::V6;
        self
    }

    /// Adds a TCP port.
    pub fn port(self, name: &str, port: u16) -> Self {
        self.port_proto(name, port, Proto::Tcp)
    }

    pub fn port_proto(mut self, name: &str, port: u16, protocol: Proto) -> Self {
        self.ports
            .push(json!({"name": name, "port": port, "protocol": protocol.k8s_name()}));
        self
    }

    /// Adds a lab pod as an endpoint (address of the slice's family, its node and zone).
    pub fn endpoint(mut self, pod: &Pod, cond: Cond) -> Self {
        self.endpoints.push(Endpoint {
            v4: Some(pod.ipv4.into()),
            v6: Some(pod.ipv6.into()),
            node: Some(pod.node.clone()),
            zone: Some(pod.zone.clone()),
            cond,
            hints: None,
        });
        self
    }

    /// Adds several lab pods with the same conditions.
    pub fn endpoints<'a>(self, pods: impl IntoIterator<Item = &'a Pod>, cond: Cond) -> Self {
        pods.into_iter().fold(self, |s, p| s.endpoint(p, cond))
    }

    /// Adds an arbitrary address (e.g. a host-network endpoint: a node IP).
    pub fn endpoint_addr(
        mut self,
        addr: IpAddr,
        node: Option<&str>,
        zone: Option<&str>,
        cond: Cond,
    ) -> Self {
        let (v4, v6) = match addr {
            IpAddr::V4(_) => (Some(addr), None),
            IpAddr::V6(_) => (None, Some(addr)),
        };
        self.endpoints.push(Endpoint {
            v4,
            v6,
            node: node.map(str::to_string),
            zone: zone.map(str::to_string),
            cond,
            hints: None,
        });
        self
    }

    /// Sets topology hints `forZones` on the most recently added endpoint (as the
    /// EndpointSlice controller writes them for `trafficDistribution`).
    pub fn zone_hints(self, zones: &[&str]) -> Self {
        self.hint("forZones", zones)
    }

    /// Sets topology hints `forNodes` on the most recently added endpoint.
    pub fn node_hints(self, nodes: &[&str]) -> Self {
        self.hint("forNodes", nodes)
    }

    fn hint(mut self, key: &str, names: &[&str]) -> Self {
        if let Some(e) = self.endpoints.last_mut() {
            let list: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
            let hints = e.hints.get_or_insert_with(|| json!({}));
            hints[key] = Value::Array(list);
        }
        self
    }

    /// Applies a JSON merge patch (RFC 7386) to the rendered object, for fields the builder
    /// does not cover, e.g. `json!({"spec": {"publishNotReadyAddresses": true}})`.
    pub fn merge(mut self, patch: Value) -> Self {
        self.patches.push(patch);
        self
    }
}

impl ToJson for Slice {
    fn to_json(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .filter_map(|e| {
                let addr = match self.family {
                    IpFamily::V4 => e.v4,
                    IpFamily::V6 => e.v6,
                }?;
                let mut v = json!({
                    "addresses": [addr.to_string()],
                    "conditions": {
                        "ready": e.cond.ready,
                        "serving": e.cond.serving,
                        "terminating": e.cond.terminating,
                    },
                });
                if let Some(n) = &e.node {
                    v["nodeName"] = json!(n);
                }
                if let Some(z) = &e.zone {
                    v["zone"] = json!(z);
                }
                if let Some(h) = &e.hints {
                    v["hints"] = h.clone();
                }
                Some(v)
            })
            .collect();
        let mut v = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"kubernetes.io/service-name": self.service},
            },
            "addressType": self.family.k8s_name(),
            "ports": self.ports,
            "endpoints": endpoints,
        });
        for p in &self.patches {
            merge_patch(&mut v, p);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_json() {
        let v = Service::cluster_ips("web", &["10.96.0.10", "fd00:96::10"])
            .port("http", 80, "http", Proto::Tcp)
            .node_port(30080)
            .external_traffic_policy(TrafficPolicy::Local)
            .session_affinity_client_ip(Some(5))
            .lb_ingress("203.0.113.10".parse::<IpAddr>().unwrap())
            .to_json();
        assert_eq!(v["spec"]["type"], "LoadBalancer");
        assert_eq!(v["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(v["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(v["spec"]["ports"][0]["nodePort"], 30080);
        assert_eq!(v["spec"]["ports"][0]["targetPort"], "http");
        assert_eq!(
            v["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            5
        );
        assert_eq!(
            v["status"]["loadBalancer"]["ingress"][0]["ip"],
            "203.0.113.10"
        );
        let h = Service::headless("h")
            .merge(json!({"spec": {"publishNotReadyAddresses": true, "sessionAffinity": null}}))
            .to_json();
        assert_eq!(h["spec"]["publishNotReadyAddresses"], true);
        assert!(h["spec"].get("sessionAffinity").is_none());
        assert_eq!(h["spec"]["clusterIP"], "None");
        assert!(h["spec"].get("ipFamilies").is_none());
    }

    #[test]
    fn slice_json() {
        let v = Slice::for_service("web")
            .ipv6()
            .port("http", 8080)
            .endpoint_addr(
                "fd00::1".parse().unwrap(),
                Some("a"),
                None,
                Cond::TERMINATING_SERVING,
            )
            .endpoint_addr("10.0.0.1".parse().unwrap(), None, None, Cond::READY)
            .to_json();
        assert_eq!(v["addressType"], "IPv6");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        let eps = v["endpoints"].as_array().unwrap();
        assert_eq!(
            eps.len(),
            1,
            "the IPv4-only endpoint is not in an IPv6 slice"
        );
        assert_eq!(eps[0]["conditions"]["terminating"], true);
        assert_eq!(eps[0]["nodeName"], "a");
    }

    #[test]
    fn slice_hints() {
        let v = Slice::for_service("web")
            .endpoint_addr("10.0.0.1".parse().unwrap(), Some("a"), None, Cond::READY)
            .zone_hints(&["z1"])
            .node_hints(&["a"])
            .endpoint_addr("10.0.0.2".parse().unwrap(), Some("b"), None, Cond::READY)
            .to_json();
        assert_eq!(
            v["endpoints"][0]["hints"],
            json!({"forZones": [{"name": "z1"}], "forNodes": [{"name": "a"}]})
        );
        assert!(v["endpoints"][1].get("hints").is_none());
    }

    #[test]
    fn node_and_list() {
        let n = Node::new("a")
            .address("192.168.50.11".parse::<IpAddr>().unwrap())
            .zone("z1")
            .taint("ToBeDeletedByClusterAutoscaler", "NoSchedule");
        let s = list(&[&n]);
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["kind"], "List");
        assert_eq!(
            v["items"][0]["metadata"]["labels"]["topology.kubernetes.io/zone"],
            "z1"
        );
        assert_eq!(
            v["items"][0]["status"]["addresses"][0]["type"],
            "InternalIP"
        );
    }
}
