//! Known answers for every branch of the walk.

use super::*;
use crate::rules::{Endpoint, InterfaceName};

const NAME: &str = "default/web/tcp/http/v4";
const NODE_IP: &str = "192.168.50.11";
const POD_HERE: &str = "10.244.1.11";
const POD_ELSEWHERE: &str = "10.244.2.11";
const CLIENT_POD: &str = "10.244.1.20";
const EXTERNAL: &str = "192.168.50.100";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ep(addr: &str, local: bool) -> Endpoint {
    Endpoint {
        addr: ip(addr),
        port: Port::new(8080).unwrap(),
        local,
        ready: true,
    }
}

/// ClusterIP 10.96.0.10:80 with one endpoint here and one elsewhere.
fn web() -> ServicePort {
    ServicePort {
        family: Family::V4,
        protocol: Protocol::Tcp,
        port: Port::new(80).unwrap(),
        cluster_ip: Some(ip("10.96.0.10")),
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        external_traffic_local: false,
        internal_traffic_local: false,
        cluster_endpoints: vec![ep(POD_HERE, true), ep(POD_ELSEWHERE, false)],
        local_endpoints: vec![ep(POD_HERE, true)],
        endpoints_elsewhere: false,
        affinity: None,
        health_check: None,
    }
}

/// The lab's node: ClusterCIDR detection, NodePorts on its fabric address.
fn node() -> NodeRules {
    NodeRules {
        local_pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        node_port_ips: vec![ip(NODE_IP)],
        ..NodeRules::default()
    }
}

struct Case {
    node: NodeRules,
    ports: Vec<ServicePort>,
    /// Endpoints on this node (the node-endpoints resources).
    here: Vec<IpAddr>,
}

impl Case {
    fn new(port: ServicePort) -> Case {
        Case {
            node: node(),
            ports: vec![port],
            here: vec![ip(POD_HERE)],
        }
    }

    fn trace(&self, src: &str, dst: &str, port: u16) -> Trace {
        self.trace_on(src, dst, port, Protocol::Tcp, None)
    }

    fn trace_on(
        &self,
        src: &str,
        dst: &str,
        port: u16,
        protocol: Protocol,
        interface: Option<&str>,
    ) -> Trace {
        let specs: Vec<(String, Spec)> =
            std::iter::once(("node".into(), Spec::Node(self.node.clone())))
                .chain([(
                    "node-endpoints/0".into(),
                    Spec::NodeEndpoints(self.here.clone()),
                )])
                .chain(self.ports.iter().enumerate().map(|(i, sp)| {
                    let name = if i == 0 {
                        NAME.into()
                    } else {
                        format!("other/{i}")
                    };
                    (name, Spec::ServicePort(sp.clone()))
                }))
                .collect();
        let addresses = [ip(NODE_IP), ip("169.254.1.1"), ip("fd00:50::11")];
        let view = NodeView {
            resources: specs.iter().map(|(n, s)| (n.as_str(), s)).collect(),
            addresses: &addresses,
        };
        let flow = Flow {
            source: ip(src),
            destination: ip(dst),
            protocol,
            port: Port::new(port).unwrap(),
            interface: interface.map(str::to_owned),
        };
        let t = trace(&view, &flow);
        eprintln!("{src} -> {dst}:{port}: {t:#?}");
        t
    }
}

fn eps(t: &Trace) -> Vec<String> {
    t.endpoints.iter().map(ToString::to_string).collect()
}

fn says(t: &Trace, words: &str) -> bool {
    t.steps.iter().any(|s| s.contains(words))
}

const BOTH: [&str; 2] = ["10.244.1.11:8080", "10.244.2.11:8080"];
const HERE: [&str; 1] = ["10.244.1.11:8080"];

#[test]
fn cluster_ip_masquerades_only_what_is_not_from_this_nodes_pods() {
    let c = Case::new(web());
    let from_pod = c.trace(CLIENT_POD, "10.96.0.10", 80);
    assert_eq!(from_pod.verdict, Verdict::Dnat);
    assert_eq!(eps(&from_pod), BOTH);
    assert!(!from_pod.masquerade);
    assert_eq!(from_pod.service_port.as_deref(), Some(NAME));
    assert!(says(&from_pod, "10.96.0.10 port 80/TCP is the ClusterIP"));
    assert!(says(&from_pod, "internalTrafficPolicy Cluster"));
    // A pod of another node, an external client and the node itself are masqueraded.
    for src in ["10.244.2.30", EXTERNAL, NODE_IP] {
        let t = c.trace(src, "10.96.0.10", 80);
        assert_eq!(
            (t.verdict, eps(&t), t.masquerade),
            (Verdict::Dnat, BOTH.map(String::from).to_vec(), true),
            "{src}"
        );
    }
    assert!(says(
        &c.trace(NODE_IP, "10.96.0.10", 80),
        "the node's own traffic"
    ));
}

#[test]
fn masquerade_all_and_a_missing_detector() {
    let mut c = Case::new(web());
    c.node.masquerade_all = true;
    let t = c.trace(CLIENT_POD, "10.96.0.10", 80);
    assert!(t.masquerade && says(&t, "--masquerade-all"));
    // No pod CIDR of the family: no detector, nothing masqueraded (as kube-proxy).
    c.node.masquerade_all = false;
    c.node.local_pod_cidrs.clear();
    let t = c.trace(EXTERNAL, "10.96.0.10", 80);
    assert_eq!(t.verdict, Verdict::Dnat);
    assert!(!t.masquerade && says(&t, "no local-traffic detector"));
}

#[test]
fn what_is_not_a_service_port() {
    let c = Case::new(web());
    // A ClusterIP on a port the Service does not have: rejected.
    let t = c.trace(CLIENT_POD, "10.96.0.10", 81);
    assert_eq!(t.verdict, Verdict::Reject);
    assert!(says(&t, "ClusterIP without a Service port 81/TCP"));
    let t = c.trace_on(CLIENT_POD, "10.96.0.10", 80, Protocol::Udp, None);
    assert_eq!(t.verdict, Verdict::Reject);
    // An unallocated service address: dropped.
    let t = c.trace(CLIENT_POD, "10.96.7.7", 80);
    assert_eq!(t.verdict, Verdict::Drop);
    assert!(says(&t, "service CIDR 10.96.0.0/16"));
    // Anything else is not ours.
    for (src, dst) in [
        (CLIENT_POD, "10.244.2.11"),
        (EXTERNAL, NODE_IP),
        (NODE_IP, "8.8.8.8"),
    ] {
        let t = c.trace(src, dst, 80);
        assert_eq!(t.verdict, Verdict::NotService, "{src} -> {dst}");
        assert!(t.endpoints.is_empty() && !t.masquerade);
    }
}

#[test]
fn no_endpoints_reject_on_every_entry_point() {
    let mut sp = web();
    sp.cluster_endpoints.clear();
    sp.local_endpoints.clear();
    sp.node_port = Port::new(30080);
    sp.external_ips = vec![ip("192.0.2.1")];
    sp.load_balancer_ips = vec![ip("192.0.2.2")];
    let c = Case::new(sp);
    for (src, dst, port) in [
        (CLIENT_POD, "10.96.0.10", 80),
        (EXTERNAL, "192.0.2.1", 80),
        (EXTERNAL, "192.0.2.2", 80),
        (EXTERNAL, NODE_IP, 30080),
        (NODE_IP, NODE_IP, 30080),
        (NODE_IP, "10.96.0.10", 80),
    ] {
        let t = c.trace(src, dst, port);
        assert_eq!(t.verdict, Verdict::Reject, "{src} -> {dst}:{port}");
        assert!(says(&t, "has no usable endpoint"), "{t:?}");
        assert_eq!(t.service_port.as_deref(), Some(NAME));
    }
}

#[test]
fn internal_traffic_policy_local() {
    let mut sp = web();
    sp.internal_traffic_local = true;
    let c = Case::new(sp.clone());
    let t = c.trace(CLIENT_POD, "10.96.0.10", 80);
    assert_eq!(
        (t.verdict, eps(&t)),
        (Verdict::Dnat, HERE.map(String::from).to_vec())
    );
    assert!(says(&t, "internalTrafficPolicy Local"));
    // Endpoints only elsewhere: dropped, not rejected (in both forms the controller sends).
    sp.local_endpoints.clear();
    let t = Case::new(sp.clone()).trace(CLIENT_POD, "10.96.0.10", 80);
    assert_eq!(t.verdict, Verdict::Drop);
    assert!(says(&t, "none on this node"));
    sp.cluster_endpoints.clear();
    sp.endpoints_elsewhere = true;
    let t = Case::new(sp).trace(NODE_IP, "10.96.0.10", 80);
    assert_eq!(t.verdict, Verdict::Drop);
}

#[test]
fn node_ports_and_the_addresses_they_are_served_on() {
    let mut sp = web();
    sp.node_port = Port::new(30080);
    let mut c = Case::new(sp);
    let t = c.trace(EXTERNAL, NODE_IP, 30080);
    assert_eq!(
        (t.verdict, eps(&t), t.masquerade),
        (Verdict::Dnat, BOTH.map(String::from).to_vec(), true)
    );
    assert!(says(&t, "NodePort 30080/TCP") && says(&t, "externalTrafficPolicy Cluster"));
    // Not a NodePort address (primary only): not ours; nor is loopback with "all".
    let t = c.trace(EXTERNAL, "169.254.1.1", 30080);
    assert_eq!(t.verdict, Verdict::NotService);
    assert!(says(&t, "not an address NodePorts are served on"));
    c.node.node_port_all_addresses = true;
    c.node.node_port_ips.clear();
    assert_eq!(
        c.trace(EXTERNAL, "169.254.1.1", 30080).verdict,
        Verdict::Dnat
    );
    assert_eq!(
        c.trace(NODE_IP, "127.0.0.1", 30080).verdict,
        Verdict::NotService
    );
    // Another node's address is that node's business.
    assert_eq!(
        c.trace(EXTERNAL, "192.168.50.12", 30080).verdict,
        Verdict::NotService
    );
}

#[test]
fn external_traffic_policy_local() {
    let mut sp = web();
    sp.node_port = Port::new(30080);
    sp.load_balancer_ips = vec![ip("192.0.2.2")];
    sp.external_traffic_local = true;
    let c = Case::new(sp.clone());
    for (dst, port) in [(NODE_IP, 30080), ("192.0.2.2", 80)] {
        // External clients: this node's endpoints only, source kept.
        let t = c.trace(EXTERNAL, dst, port);
        assert_eq!(
            (t.verdict, eps(&t), t.masquerade),
            (Verdict::Dnat, HERE.map(String::from).to_vec(), false),
            "{dst}"
        );
        assert!(says(&t, "only endpoints on this node"));
        // This node's pods: every endpoint, source kept.
        let t = c.trace(CLIENT_POD, dst, port);
        assert_eq!(
            (eps(&t), t.masquerade),
            (BOTH.map(String::from).to_vec(), false),
            "{dst}"
        );
        // The node itself: every endpoint, masqueraded.
        let t = c.trace(NODE_IP, dst, port);
        assert_eq!(
            (eps(&t), t.masquerade),
            (BOTH.map(String::from).to_vec(), true),
            "{dst}"
        );
    }
    // No endpoint here: external clients are dropped, pods still served.
    sp.local_endpoints.clear();
    let c = Case::new(sp);
    let t = c.trace(EXTERNAL, NODE_IP, 30080);
    assert_eq!(t.verdict, Verdict::Drop);
    assert_eq!(c.trace(EXTERNAL, "192.0.2.2", 80).verdict, Verdict::Drop);
    assert_eq!(c.trace(CLIENT_POD, NODE_IP, 30080).verdict, Verdict::Dnat);
}

#[test]
fn load_balancer_source_ranges_drop_before_anything_else() {
    let mut sp = web();
    sp.load_balancer_ips = vec![ip("192.0.2.2")];
    sp.external_ips = vec![ip("192.0.2.1")];
    sp.load_balancer_source_ranges = vec!["192.168.50.96/28".parse().unwrap()];
    let c = Case::new(sp);
    let t = c.trace(EXTERNAL, "192.0.2.2", 80);
    assert_eq!(t.verdict, Verdict::Dnat);
    assert!(says(&t, "source in 192.168.50.96/28, allowed"));
    for src in [CLIENT_POD, NODE_IP, "192.168.50.200"] {
        let t = c.trace(src, "192.0.2.2", 80);
        assert_eq!(t.verdict, Verdict::Drop, "{src}");
        assert!(says(&t, "is in none of them"));
    }
    // They guard load-balancer IPs only.
    assert_eq!(c.trace(CLIENT_POD, "192.0.2.1", 80).verdict, Verdict::Dnat);
}

#[test]
fn hairpin_masquerades_a_pod_reaching_itself() {
    let c = Case::new(web());
    let t = c.trace(POD_HERE, "10.96.0.10", 80);
    assert_eq!(eps(&t), BOTH);
    assert!(!t.masquerade);
    assert_eq!(
        t.hairpin
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        HERE
    );
    assert!(says(&t, "hairpin"));
    // Its only endpoint is itself: every connection is masqueraded.
    let mut sp = web();
    sp.cluster_endpoints = vec![ep(POD_HERE, true)];
    let t = Case::new(sp).trace(POD_HERE, "10.96.0.10", 80);
    assert!(t.masquerade && t.hairpin.is_empty());
}

#[test]
fn affinity_and_terminating_fallback_are_explained() {
    let mut sp = web();
    sp.affinity = NonZeroU32::new(30);
    let t = Case::new(sp.clone()).trace(CLIENT_POD, "10.96.0.10", 80);
    assert_eq!(eps(&t), BOTH);
    assert!(says(&t, "affinity") && says(&t, "30 s"));
    for e in &mut sp.cluster_endpoints {
        e.ready = false;
    }
    let t = Case::new(sp).trace(CLIENT_POD, "10.96.0.10", 80);
    assert_eq!(eps(&t), BOTH);
    assert!(says(&t, "terminating"));
}

#[test]
fn interface_modes_look_at_the_interface() {
    let mut c = Case::new(web());
    c.node.local_pod_cidrs.clear();
    c.node.local_detector = LocalDetector::Bridge(InterfaceName::new("cbr0").unwrap());
    let masq = |c: &Case, src: &str, iface: Option<&str>| {
        c.trace_on(src, "10.96.0.10", 80, Protocol::Tcp, iface)
            .masquerade
    };
    assert!(!masq(&c, CLIENT_POD, Some("cbr0")));
    assert!(masq(&c, CLIENT_POD, Some("eth0")));
    // Without an interface: an endpoint on this node is taken for a pod; anything else not.
    assert!(!masq(&c, POD_HERE, None));
    let t = c.trace_on(POD_ELSEWHERE, "10.96.0.10", 80, Protocol::Tcp, None);
    assert!(t.masquerade && says(&t, "no interface given"));
    // The node's own traffic enters through no interface.
    assert!(masq(&c, NODE_IP, Some("cbr0")));
    c.node.local_detector = LocalDetector::Prefix(InterfaceName::new("veth").unwrap());
    assert!(!masq(&c, CLIENT_POD, Some("veth12")));
    assert!(masq(&c, CLIENT_POD, Some("eth0")));
}

#[test]
fn ipv6_and_sctp() {
    let mut sp = web();
    sp.family = Family::V6;
    sp.protocol = Protocol::Sctp;
    sp.cluster_ip = Some(ip("fd00:96::10"));
    sp.cluster_endpoints = vec![Endpoint {
        addr: ip("fd00:244:2::11"),
        ..ep(POD_HERE, false)
    }];
    sp.local_endpoints.clear();
    let mut c = Case::new(web());
    c.ports.push(sp);
    c.node
        .local_pod_cidrs
        .push("fd00:244:1::/64".parse().unwrap());
    let t = c.trace_on("fd00:244:1::20", "fd00:96::10", 80, Protocol::Sctp, None);
    assert_eq!(eps(&t), ["[fd00:244:2::11]:8080"]);
    assert!(!t.masquerade);
    assert_eq!(t.service_port.as_deref(), Some("other/1"));
    // The v4 Service port is not reached by v6 traffic, nor the SCTP port by TCP.
    let t = c.trace_on("fd00:244:1::20", "fd00:96::10", 80, Protocol::Tcp, None);
    assert_eq!(t.verdict, Verdict::Reject);
}

#[test]
fn requests_are_checked_field_by_field() {
    let good = v1::TraceRequest {
        source: "10.0.0.2".into(),
        destination: "172.30.0.41".into(),
        port: 80,
        protocol: v1::Protocol::Tcp as i32,
        ..Default::default()
    };
    let flow = Flow::from_request(&good).unwrap();
    assert_eq!((flow.port.get(), flow.protocol), (80, Protocol::Tcp));
    let field = |req: v1::TraceRequest| Flow::from_request(&req).unwrap_err().field;
    assert_eq!(
        field(v1::TraceRequest {
            source: "10.0.0".into(),
            ..good.clone()
        }),
        "source"
    );
    assert_eq!(
        field(v1::TraceRequest {
            source: "fd00::1".into(),
            ..good.clone()
        }),
        "source"
    );
    assert_eq!(
        field(v1::TraceRequest {
            destination: "".into(),
            ..good.clone()
        }),
        "destination"
    );
    assert_eq!(
        field(v1::TraceRequest {
            port: 0,
            ..good.clone()
        }),
        "port"
    );
    assert_eq!(
        field(v1::TraceRequest {
            port: 65536,
            ..good.clone()
        }),
        "port"
    );
    assert_eq!(
        field(v1::TraceRequest {
            protocol: 0,
            ..good.clone()
        }),
        "protocol"
    );
    assert_eq!(
        field(v1::TraceRequest {
            protocol: 9,
            ..good.clone()
        }),
        "protocol"
    );
    assert_eq!(
        field(v1::TraceRequest {
            interface: "a\" b".into(),
            ..good.clone()
        }),
        "interface"
    );
}

#[test]
fn responses_spell_verdicts_and_endpoints_as_the_api_says() {
    let mut sp = web();
    sp.cluster_endpoints.push(ep("10.244.1.2", true));
    let t = Case::new(sp).trace(CLIENT_POD, "10.96.0.10", 80);
    let r = t.to_response("a", "v1");
    assert_eq!(r.verdict, v1::TraceVerdict::Dnat as i32);
    // Sorted as addresses, not as text.
    assert_eq!(
        r.endpoints,
        ["10.244.1.2:8080", "10.244.1.11:8080", "10.244.2.11:8080"]
    );
    assert_eq!((r.node.as_str(), r.service_port.as_str()), ("a", NAME));
}
