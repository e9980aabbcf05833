use std::collections::BTreeSet;
use std::net::IpAddr;
use std::num::NonZeroU16;

use kubenft_proto::v1::{DetectLocalMode, IpFamily, Protocol, resource};

use std::sync::Arc;

use kubenft_proto::v1::{Endpoint, NodeRules, ServicePortRules};
use kubenft_proto::{NODE_RESOURCE, endpoint_bucket, node_endpoints_name};

use crate::Catalog;
use crate::model::*;
use crate::model::{Conditions, ServiceType, SlicePort};
use crate::policy::*;
use crate::port::*;
use crate::view::NodeRuleSet;

mod incremental;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn port(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap()
}

fn svc(
    name: &str,
    cluster_ips: &[&str],
    ports: &[(&str, Protocol, u16, Option<u16>)],
) -> ServiceModel {
    ServiceModel {
        id: ObjectName {
            namespace: "default".into(),
            name: name.into(),
        },
        service_type: if ports.iter().any(|p| p.3.is_some()) {
            ServiceType::NodePort
        } else {
            ServiceType::ClusterIp
        },
        cluster_ips: cluster_ips.iter().map(|s| ip(s)).collect(),
        ports: ports
            .iter()
            .enumerate()
            .map(|(index, (n, p, num, np))| ServicePortModel {
                name: (*n).into(),
                protocol: *p,
                port: port(*num),
                node_port: np.map(port),
                index,
            })
            .collect(),
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        affinity_timeout: None,
        health_check_node_port: None,
        created: Some(
            format!("2026-01-01T00:00:0{}Z", name.len() % 10)
                .parse()
                .unwrap(),
        ),
    }
}

const READY: Conditions = Conditions {
    ready: true,
    serving: true,
    terminating: false,
};

fn ep(addr: &str, node: &str, cond: Conditions) -> EndpointModel {
    EndpointModel {
        index: 0,
        ip: ip(addr),
        conditions: cond,
        node_name: Some(node.into()),
        zone: None,
        zone_hints: None,
        node_hints: None,
    }
}

fn slice(
    name: &str,
    service: &str,
    ports: &[(&str, Protocol, u16)],
    endpoints: Vec<EndpointModel>,
) -> SliceModel {
    let family = family_of(&endpoints[0].ip);
    SliceModel {
        id: ObjectName {
            namespace: "default".into(),
            name: name.into(),
        },
        service: service.into(),
        family,
        ports: ports
            .iter()
            .map(|(n, p, num)| SlicePort {
                name: (*n).into(),
                protocol: *p,
                port: port(*num),
            })
            .collect(),
        endpoints: endpoints
            .into_iter()
            .enumerate()
            .map(|(index, e)| EndpointModel { index, ..e })
            .collect(),
        trigger_ms: None,
    }
}

fn node(name: &str, ips: &[&str]) -> NodeModel {
    NodeModel {
        name: name.into(),
        internal_ips: ips.iter().map(|s| ip(s)).collect(),
        zone: None,
        deleting: false,
        pod_cidrs: Vec::new(),
    }
}

fn inputs(services: Vec<ServiceModel>, slices: Vec<SliceModel>) -> Inputs {
    Inputs {
        services: services
            .into_iter()
            .map(|s| (s.id.clone(), Arc::new(s)))
            .collect(),
        slices: slices
            .into_iter()
            .map(|s| (s.id.clone(), Arc::new(s)))
            .collect(),
        nodes: [
            node("a", &["192.168.50.11", "fd00:50::11"]),
            node("b", &["192.168.50.12"]),
        ]
        .into_iter()
        .map(|n| (n.name.clone(), Arc::new(n)))
        .collect(),
        ..Default::default()
    }
}

fn facts(name: &str) -> AgentFacts {
    AgentFacts {
        name: name.into(),
        agent_addresses: vec![],
    }
}

fn catalog(policy: ClusterPolicy, inputs: &Inputs) -> Catalog {
    Catalog::build(Arc::new(policy), inputs, None)
}

fn rules(c: &Catalog, f: &AgentFacts) -> NodeRuleSet {
    c.rules_for(f, 1)
}

fn port_of<'a>(rules: &'a NodeRuleSet, name: &str) -> &'a ServicePortRules {
    match rules.get(name).and_then(|r| r.kind.as_ref()) {
        Some(resource::Kind::ServicePort(p)) => p,
        other => panic!(
            "no port {name}: {other:?} in {:?}",
            rules.iter().map(|r| r.name.clone()).collect::<Vec<_>>()
        ),
    }
}

fn node_of(rules: &NodeRuleSet) -> &NodeRules {
    match rules.get(NODE_RESOURCE).and_then(|r| r.kind.as_ref()) {
        Some(resource::Kind::Node(n)) => n,
        other => panic!("no node resource: {other:?}"),
    }
}

fn endpoints(eps: &[Endpoint]) -> Vec<String> {
    eps.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()
}

#[test]
fn named_target_ports_resolve_per_endpoint_and_per_port() {
    let web = svc(
        "web",
        &["10.96.0.10"],
        &[
            ("http", Protocol::Tcp, 80, None),
            ("dns", Protocol::Udp, 53, None),
        ],
    );
    let s1 = slice(
        "web-1",
        "web",
        &[("http", Protocol::Tcp, 8080), ("dns", Protocol::Udp, 5353)],
        vec![ep("10.244.1.10", "a", READY)],
    );
    let s2 = slice(
        "web-2",
        "web",
        &[("http", Protocol::Tcp, 9090)],
        vec![ep("10.244.2.10", "b", READY)],
    );
    let c = catalog(ClusterPolicy::default(), &inputs(vec![web], vec![s1, s2]));
    let rules = rules(&c, &facts("a"));
    let http = port_of(&rules, "default/web/tcp/http/ipv4");
    assert_eq!(
        endpoints(&http.cluster_endpoints),
        ["10.244.1.10:8080", "10.244.2.10:9090"]
    );
    // Cluster policies: the port is the same on every node (no local marks).
    assert!(http.local_endpoints.is_empty());
    assert!(http.cluster_endpoints.iter().all(|e| !e.local));
    let dns = port_of(&rules, "default/web/udp/dns/ipv4");
    assert_eq!(endpoints(&dns.cluster_endpoints), ["10.244.1.10:5353"]);
    assert_eq!(dns.protocol, Protocol::Udp as i32);
    assert_eq!(dns.cluster_ip, "10.96.0.10");
}

#[test]
fn node_ports_use_primary_addresses_by_default() {
    let np = svc(
        "np",
        &["10.96.0.11"],
        &[("http", Protocol::Tcp, 80, Some(30080))],
    );
    let c = catalog(ClusterPolicy::default(), &inputs(vec![np], vec![]));
    let a = rules(&c, &facts("a"));
    assert_eq!(node_of(&a).node_port_ips, ["192.168.50.11", "fd00:50::11"]);
    assert_eq!(port_of(&a, "default/np/tcp/http/ipv4").node_port, 30080);
    // Unknown node: no NodePort addresses at all (never loopback).
    let x = rules(&c, &facts("x"));
    assert!(node_of(&x).node_port_ips.is_empty());
}

#[test]
fn node_port_cidrs_select_reported_addresses() {
    let policy = ClusterPolicy {
        node_port_addresses: NodePortAddresses::Cidrs(vec![
            "192.168.60.0/24".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ]),
        ..Default::default()
    };
    let c = catalog(policy, &inputs(vec![], vec![]));
    let rules = rules(
        &c,
        &AgentFacts {
            name: "a".into(),
            agent_addresses: vec![ip("192.168.60.5"), ip("127.0.0.1"), ip("192.168.50.11")],
        },
    );
    assert_eq!(node_of(&rules).node_port_ips, ["192.168.60.5"]);
}

#[test]
fn local_policies_get_this_nodes_endpoints() {
    let mut web = svc(
        "web",
        &["10.96.0.10"],
        &[("http", Protocol::Tcp, 80, Some(30081))],
    );
    web.external_policy = TrafficPolicy::Local;
    let s = slice(
        "web-1",
        "web",
        &[("http", Protocol::Tcp, 8080)],
        vec![ep("10.244.1.10", "a", READY), ep("10.244.2.10", "b", READY)],
    );
    let c = catalog(ClusterPolicy::default(), &inputs(vec![web], vec![s]));
    let a = rules(&c, &facts("a"));
    let b = rules(&c, &facts("b"));
    let pa = port_of(&a, "default/web/tcp/http/ipv4");
    let pb = port_of(&b, "default/web/tcp/http/ipv4");
    assert!(pa.external_traffic_local && !pa.internal_traffic_local);
    assert_eq!(endpoints(&pa.local_endpoints), ["10.244.1.10:8080"]);
    assert_eq!(endpoints(&pb.local_endpoints), ["10.244.2.10:8080"]);
    assert_eq!(pa.cluster_endpoints.len(), 2);
    assert_ne!(a.system_version, b.system_version);
}

#[test]
fn dual_stack_services_get_one_resource_per_family() {
    let web = svc(
        "web",
        &["10.96.0.10", "fd00:96::10"],
        &[("http", Protocol::Tcp, 80, None)],
    );
    let v4 = slice(
        "web-v4",
        "web",
        &[("http", Protocol::Tcp, 8080)],
        vec![ep("10.244.1.10", "a", READY)],
    );
    let v6 = slice(
        "web-v6",
        "web",
        &[("http", Protocol::Tcp, 8080)],
        vec![ep("fd00:244:1::10", "a", READY)],
    );
    let c = catalog(ClusterPolicy::default(), &inputs(vec![web], vec![v4, v6]));
    let a = rules(&c, &facts("a"));
    let p6 = port_of(&a, "default/web/tcp/http/ipv6");
    assert_eq!(p6.family, IpFamily::Ipv6 as i32);
    assert_eq!(endpoints(&p6.cluster_endpoints), ["fd00:244:1::10:8080"]);
    assert_eq!(
        endpoints(&port_of(&a, "default/web/tcp/http/ipv4").cluster_endpoints),
        ["10.244.1.10:8080"]
    );
}

#[test]
fn the_newer_of_two_services_claiming_a_node_port_loses_only_the_node_port() {
    let old = svc(
        "aa",
        &["10.96.0.1"],
        &[("http", Protocol::Tcp, 80, Some(30080))],
    );
    let new = svc(
        "bbb",
        &["10.96.0.2"],
        &[("http", Protocol::Tcp, 80, Some(30080))],
    );
    // Same port number but UDP does not conflict.
    let udp = svc(
        "cccc",
        &["10.96.0.3"],
        &[("dns", Protocol::Udp, 53, Some(30080))],
    );
    let c = catalog(
        ClusterPolicy::default(),
        &inputs(vec![old, new, udp], vec![]),
    );
    assert!(c.ports.contains_key("default/aa/tcp/http/ipv4"));
    // The port still serves its ClusterIP, without the NodePort.
    assert_eq!(
        c.ports["default/bbb/tcp/http/ipv4"].plan.port.node_port,
        None
    );
    assert!(c.ports.contains_key("default/cccc/udp/dns/ipv4"));
    let rejections = c.rejections();
    let r = &rejections[0];
    assert_eq!(
        (r.name.as_str(), r.field.as_str()),
        ("bbb", "spec.ports[0].nodePort")
    );
    assert!(
        r.message.contains("already used by Service default/aa"),
        "{}",
        r.message
    );

    // The older one goes away: the refused one is planned in the next (incremental) build,
    // and the untouched one keeps its computed port.
    let udp_port = c.ports["default/cccc/udp/dns/ipv4"].clone();
    let mut next = inputs(vec![], vec![]);
    next.services = c_inputs_without(&c, "aa");
    let c2 = Catalog::build(c.policy.clone(), &next, Some(&c));
    assert!(!c2.ports.contains_key("default/aa/tcp/http/ipv4"));
    assert_eq!(
        c2.ports["default/bbb/tcp/http/ipv4"].plan.port.node_port,
        Some(port(30080))
    );
    assert!(Arc::ptr_eq(
        &udp_port,
        &c2.ports["default/cccc/udp/dns/ipv4"]
    ));
    assert_eq!(
        c2.changed,
        ["default/aa/tcp/http/ipv4", "default/bbb/tcp/http/ipv4"]
    );
    assert!(c2.rejections().is_empty(), "{:?}", c2.rejections());
}

/// The services of the inputs `c` was built from, less one.
fn c_inputs_without(c: &Catalog, name: &str) -> imbl::OrdMap<ObjectName, Arc<ServiceModel>> {
    c.inputs()
        .services
        .iter()
        .filter(|(id, _)| id.name != name)
        .map(|(id, s)| (id.clone(), s.clone()))
        .collect()
}

#[test]
fn versions_change_only_with_content() {
    let web = svc("web", &["10.96.0.10"], &[("http", Protocol::Tcp, 80, None)]);
    let other = svc(
        "other",
        &["10.96.0.20"],
        &[("http", Protocol::Tcp, 80, None)],
    );
    let s = |ip_: &str| {
        slice(
            "web-1",
            "web",
            &[("http", Protocol::Tcp, 8080)],
            vec![ep(ip_, "a", READY)],
        )
    };
    let c1 = catalog(
        ClusterPolicy::default(),
        &inputs(vec![web.clone(), other.clone()], vec![s("10.244.1.10")]),
    );
    let c2 = catalog(
        ClusterPolicy::default(),
        &inputs(vec![web, other], vec![s("10.244.1.11")]),
    );
    let (r1, r2) = (rules(&c1, &facts("b")), rules(&c2, &facts("b")));
    assert_eq!(
        r1.get("default/other/tcp/http/ipv4").unwrap().version,
        r2.get("default/other/tcp/http/ipv4").unwrap().version
    );
    assert_eq!(
        r1.get(NODE_RESOURCE).unwrap().version,
        r2.get(NODE_RESOURCE).unwrap().version
    );
    assert_ne!(
        r1.get("default/web/tcp/http/ipv4").unwrap().version,
        r2.get("default/web/tcp/http/ipv4").unwrap().version
    );
    assert_eq!(rules(&c1, &facts("b")), r1, "planning is deterministic");
}

#[test]
fn explanations_say_why() {
    let mut web = svc("web", &["10.96.0.10"], &[("http", Protocol::Tcp, 80, None)]);
    web.internal_policy = TrafficPolicy::Local;
    let s = slice(
        "web-1",
        "web",
        &[("http", Protocol::Tcp, 8080)],
        vec![ep("10.244.2.10", "b", READY)],
    );
    let c = catalog(
        ClusterPolicy::default(),
        &inputs(vec![web.clone()], vec![s]),
    );
    let notes = c.explain(&facts("a"), &web.id).join("\n");
    assert!(
        notes.contains("internalTrafficPolicy Local") && notes.contains("none here: dropped"),
        "{notes}"
    );
}

#[test]
fn a_source_range_covering_the_node_admits_the_lb_ips() {
    let mut lb = svc(
        "lb",
        &["10.96.0.10"],
        &[("http", Protocol::Tcp, 80, Some(30080))],
    );
    lb.service_type = ServiceType::LoadBalancer;
    lb.load_balancer_ips = vec![ip("203.0.113.7")];
    lb.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    let c = catalog(ClusterPolicy::default(), &inputs(vec![lb.clone()], vec![]));
    let ranges = |c: &Catalog| {
        port_of(&rules(c, &facts("a")), "default/lb/tcp/http/ipv4")
            .load_balancer_source_ranges
            .clone()
    };
    assert_eq!(ranges(&c), ["198.51.100.0/24"]);
    // Node a's InternalIP 192.168.50.11 is inside this range: the LB IP becomes an allowed source.
    lb.load_balancer_source_ranges
        .push("192.168.50.0/24".parse().unwrap());
    let c = catalog(ClusterPolicy::default(), &inputs(vec![lb], vec![]));
    assert_eq!(
        ranges(&c),
        ["192.168.50.0/24", "198.51.100.0/24", "203.0.113.7/32"]
    );
}

#[test]
fn nodes_share_the_generic_view_and_updates_touch_only_what_changed() {
    let web = svc("web", &["10.96.0.10"], &[("http", Protocol::Tcp, 80, None)]);
    let other = svc(
        "other",
        &["10.96.0.20"],
        &[("http", Protocol::Tcp, 80, None)],
    );
    let s = |ip_: &str| {
        slice(
            "web-1",
            "web",
            &[("http", Protocol::Tcp, 8080)],
            vec![ep(ip_, "a", READY)],
        )
    };
    let policy = Arc::new(ClusterPolicy::default());
    let i1 = inputs(vec![web.clone(), other.clone()], vec![s("10.244.1.10")]);
    let c1 = Catalog::build(policy.clone(), &i1, None);
    // Node b hosts no endpoint: it gets the very same resource object as every other such node.
    let (b, x) = (rules(&c1, &facts("b")), rules(&c1, &facts("x")));
    assert!(Arc::ptr_eq(
        b.get("default/web/tcp/http/ipv4").unwrap(),
        x.get("default/web/tcp/http/ipv4").unwrap()
    ));
    // Node a hosts it, but with cluster-wide policies that changes nothing: the same object.
    let a = rules(&c1, &facts("a"));
    assert!(Arc::ptr_eq(
        a.get("default/web/tcp/http/ipv4").unwrap(),
        b.get("default/web/tcp/http/ipv4").unwrap()
    ));

    // One endpoint moves: only that port changed, and each node's update equals a rebuild.
    let c2 = Catalog::build(
        policy,
        &inputs(vec![web, other], vec![s("10.244.1.11")]),
        Some(&c1),
    );
    assert_eq!(c2.changed, ["default/web/tcp/http/ipv4"]);
    assert!(Arc::ptr_eq(
        &c1.ports["default/other/tcp/http/ipv4"],
        &c2.ports["default/other/tcp/http/ipv4"]
    ));
    for node in ["a", "b", "x"] {
        let before = rules(&c1, &facts(node));
        let after = c2
            .update(&before, &facts(node))
            .expect("the web port changed for every node");
        assert_eq!(
            after.system_version,
            rules(&c2, &facts(node)).system_version,
            "node {node}"
        );
        // Node a hosts the endpoint that moved: the buckets of its endpoints' addresses (for
        // hairpin) that lost the old address and gained the new one changed too, and only
        // those.
        let (old_ip, new_ip) = (ip("10.244.1.10"), ip("10.244.1.11"));
        let mut expected = vec!["default/web/tcp/http/ipv4".to_owned()];
        if node == "a" {
            let buckets: BTreeSet<u8> = [endpoint_bucket(&old_ip), endpoint_bucket(&new_ip)].into();
            expected.extend(buckets.into_iter().map(node_endpoints_name));
            expected.sort();
        }
        assert_eq!(
            after.changed_since(before.rev),
            Some(expected),
            "node {node}"
        );
    }
    let bucket_of = |node: &str, ip: IpAddr| {
        let rules = rules(&c2, &facts(node));
        match rules
            .get(&node_endpoints_name(endpoint_bucket(&ip)))
            .and_then(|r| r.kind.clone())
        {
            Some(resource::Kind::NodeEndpoints(e)) => e.ips,
            _ => Vec::new(),
        }
    };
    assert_eq!(bucket_of("a", ip("10.244.1.11")), ["10.244.1.11"]);
    assert!(bucket_of("b", ip("10.244.1.11")).is_empty());
}

/// internalTrafficPolicy Local without external paths: a node never uses endpoints elsewhere,
/// so an endpoint moving from node a to node c changes the rule sets of a and c only; b and
/// every other node keep the very same version (and so receive nothing). Without endpoints
/// anywhere, every node's view changes (drop becomes reject).
#[test]
fn local_only_ports_change_only_on_the_nodes_whose_endpoints_moved() {
    let mut web = svc("web", &["10.96.0.10"], &[("http", Protocol::Tcp, 80, None)]);
    web.internal_policy = TrafficPolicy::Local;
    let s = |eps: Vec<EndpointModel>| {
        inputs(
            vec![web.clone()],
            if eps.is_empty() {
                vec![]
            } else {
                vec![slice("web-1", "web", &[("http", Protocol::Tcp, 8080)], eps)]
            },
        )
    };
    let policy = Arc::new(ClusterPolicy::default());
    let c1 = Catalog::build(
        policy.clone(),
        &s(vec![
            ep("10.244.1.10", "a", READY),
            ep("10.244.4.10", "d", READY),
        ]),
        None,
    );
    let c2 = Catalog::build(
        policy.clone(),
        &s(vec![
            ep("10.244.3.10", "c", READY),
            ep("10.244.4.10", "d", READY),
        ]),
        Some(&c1),
    );
    let name = "default/web/tcp/http/ipv4";
    for (node, changes) in [
        ("a", true),
        ("b", false),
        ("c", true),
        ("d", false),
        ("x", false),
    ] {
        let before = rules(&c1, &facts(node));
        let after = c2.update(&before, &facts(node));
        assert_eq!(after.is_some(), changes, "node {node}");
        let after = after.unwrap_or(before);
        assert_eq!(
            after.system_version,
            rules(&c2, &facts(node)).system_version
        );
        let p = port_of(&after, name);
        assert!(p.cluster_endpoints.is_empty(), "node {node}: {p:?}");
        assert!(p.endpoints_elsewhere, "node {node}");
        let local: Vec<String> = endpoints(&p.local_endpoints);
        assert_eq!(
            !local.is_empty(),
            matches!(node, "c" | "d"),
            "node {node}: {local:?}"
        );
    }
    // No endpoints anywhere: b's view changes too (its traffic is now rejected, not dropped).
    let c3 = Catalog::build(policy, &s(vec![]), Some(&c2));
    let b = rules(&c2, &facts("b"));
    let b3 = c3.update(&b, &facts("b")).expect("b's view changed");
    assert!(!port_of(&b3, name).endpoints_elsewhere);
}

#[test]
fn a_first_plan_of_thousands_of_services_equals_one_built_step_by_step() {
    // 1,200 Services is above the threshold where planning is spread over the cores; adding
    // them 100 at a time stays below it. Both must give every node the same rule set.
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..1200u32 {
        let name = format!("svc-{i}");
        let mut s = svc(
            &name,
            &[&format!("10.96.{}.{}", i / 250, i % 250 + 1)],
            &[("http", Protocol::Tcp, 80, None)],
        );
        if i % 10 == 5 {
            s.internal_policy = TrafficPolicy::Local;
        }
        services.push(s);
        let nodes = ["a", "b"];
        slices.push(slice(
            &format!("{name}-1"),
            &name,
            &[("http", Protocol::Tcp, 8080)],
            (0..3)
                .map(|e| {
                    let k = i * 3 + e;
                    ep(
                        &format!("10.244.{}.{}", k / 250, k % 250 + 1),
                        nodes[(k % 2) as usize],
                        READY,
                    )
                })
                .collect(),
        ));
    }
    let policy = Arc::new(ClusterPolicy::default());
    let at_once = Catalog::build(
        policy.clone(),
        &inputs(services.clone(), slices.clone()),
        None,
    );
    let mut stepwise: Option<Catalog> = None;
    for n in (100..=1200).step_by(100) {
        let part = inputs(services[..n].to_vec(), slices[..n].to_vec());
        stepwise = Some(Catalog::build(policy.clone(), &part, stepwise.as_ref()));
    }
    let stepwise = stepwise.unwrap();
    for node in ["a", "b", "x"] {
        let (once, steps) = (
            rules(&at_once, &facts(node)),
            rules(&stepwise, &facts(node)),
        );
        // Every port, the node's settings, and (on a and b) all 16 buckets of local addresses.
        let buckets = if node == "x" { 0 } else { 16 };
        assert_eq!(once.len(), 1200 + 1 + buckets, "node {node}");
        assert_eq!(once.system_version, steps.system_version, "node {node}");
        assert!(
            once.iter()
                .map(|r| &r.name)
                .eq(steps.iter().map(|r| &r.name))
        );
    }
}

fn at(t: &str) -> Option<k8s_openapi::jiff::Timestamp> {
    Some(t.parse().unwrap())
}

fn rejection_fields(c: &Catalog) -> Vec<(String, String, String)> {
    c.rejections()
        .into_iter()
        .map(|r| (r.kind.to_owned(), r.name, r.field))
        .collect()
}

/// Found by hostile testing: a Service without a creationTimestamp (or one from 1970) claiming
/// a served ClusterIP:port and a served NodePort took both, and the Service serving them was
/// refused as a whole. The claim already served stays where it is; the newcomer loses only
/// the claims it cannot have, and its other ports keep working.
#[test]
fn a_newcomer_without_timestamp_loses_only_the_claims_already_served() {
    let old = svc(
        "web",
        &["10.96.0.1"],
        &[
            ("http", Protocol::Tcp, 80, Some(30080)),
            ("admin", Protocol::Tcp, 81, None),
        ],
    );
    let web_slice = slice(
        "web-1",
        "web",
        &[
            ("http", Protocol::Tcp, 8080),
            ("admin", Protocol::Tcp, 8081),
        ],
        vec![ep("10.244.1.10", "a", READY)],
    );
    let policy = Arc::new(ClusterPolicy::default());
    let c1 = Catalog::build(
        policy.clone(),
        &inputs(vec![old.clone()], vec![web_slice.clone()]),
        None,
    );
    let web_http = c1.ports["default/web/tcp/http/ipv4"].clone();

    // The newcomer: the same ClusterIP with port 80 (taken), port 9090 with NodePort 30080
    // (the NodePort is taken, the address is free) and port 9091 (free).
    let mut hostile = svc(
        "hostile",
        &["10.96.0.1"],
        &[
            ("steal", Protocol::Tcp, 80, None),
            ("np", Protocol::Tcp, 9090, Some(30080)),
            ("fine", Protocol::Tcp, 9091, None),
        ],
    );
    for created in [None, at("1970-01-01T00:00:00Z")] {
        hostile.created = created;
        let next = inputs(vec![old.clone(), hostile.clone()], vec![web_slice.clone()]);
        let c2 = Catalog::build(policy.clone(), &next, Some(&c1));
        // The incumbent is untouched: the very same planned port, still with its NodePort.
        assert!(Arc::ptr_eq(
            &web_http,
            &c2.ports["default/web/tcp/http/ipv4"]
        ));
        assert!(c2.ports.contains_key("default/web/tcp/admin/ipv4"));
        let a = rules(&c2, &facts("a"));
        assert_eq!(port_of(&a, "default/web/tcp/http/ipv4").node_port, 30080);
        // The newcomer: the taken address is not served, the taken NodePort neither; the
        // rest is.
        assert!(!c2.ports.contains_key("default/hostile/tcp/steal/ipv4"));
        assert_eq!(port_of(&a, "default/hostile/tcp/np/ipv4").node_port, 0);
        assert_eq!(port_of(&a, "default/hostile/tcp/np/ipv4").port, 9090);
        assert!(c2.ports.contains_key("default/hostile/tcp/fine/ipv4"));
        let rejections = c2.rejections();
        let fields: Vec<_> = rejections
            .iter()
            .map(|r| (r.name.as_str(), r.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("hostile", "spec.ports[0].port"),
                ("hostile", "spec.ports[1].nodePort")
            ],
            "{created:?}"
        );
        assert!(
            rejections
                .iter()
                .all(|r| r.message.contains("Service default/web")),
            "{rejections:?}"
        );
        // Only the newcomer's ports changed.
        assert!(
            c2.changed.iter().all(|n| n.starts_with("default/hostile/")),
            "{:?}",
            c2.changed
        );
    }

    // A fresh build of the same inputs (a controller restart): the timestamp-less newcomer
    // sorts after the Service with a timestamp, so the same Service wins.
    hostile.created = None;
    let fresh = catalog(
        ClusterPolicy::default(),
        &inputs(vec![hostile.clone(), old.clone()], vec![web_slice]),
    );
    assert!(fresh.ports.contains_key("default/web/tcp/http/ipv4"));
    assert!(!fresh.ports.contains_key("default/hostile/tcp/steal/ipv4"));
    assert_eq!(
        fresh.ports["default/hostile/tcp/np/ipv4"]
            .plan
            .port
            .node_port,
        None
    );
}

/// Without an incumbent (a first build, a controller restart), who gets a contested claim
/// depends on the inputs alone: the older creationTimestamp, one without a timestamp after
/// any with one, then namespace/name. Two replicas, or one restarted, agree.
#[test]
fn contested_claims_on_a_fresh_build_depend_on_the_inputs_alone() {
    let contender = |name: &str, created| {
        let mut s = svc(name, &["10.96.0.7"], &[("http", Protocol::Tcp, 80, None)]);
        s.created = created;
        s
    };
    let t1 = at("2026-01-01T00:00:00Z");
    let t2 = at("2026-01-02T00:00:00Z");
    for (a, b, winner) in [
        (contender("zz", t1), contender("aa", t2), "zz"),
        (contender("zz", t1), contender("aa", t1), "aa"),
        (contender("zz", None), contender("aa", None), "aa"),
        (contender("zz", t2), contender("aa", None), "zz"),
    ] {
        let loser = if winner == "zz" { "aa" } else { "zz" };
        let name = |n: &str| format!("default/{n}/tcp/http/ipv4");
        let mut outcomes = Vec::new();
        for services in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
            // Fresh, and incrementally from a catalog that has neither (both arrive in one
            // change), in either order.
            let fresh = catalog(ClusterPolicy::default(), &inputs(services.clone(), vec![]));
            let empty = catalog(ClusterPolicy::default(), &inputs(vec![], vec![]));
            let stepped = Catalog::build(
                empty.policy.clone(),
                &inputs(services, vec![]),
                Some(&empty),
            );
            for c in [fresh, stepped] {
                assert!(c.ports.contains_key(&name(winner)), "{winner}");
                assert!(!c.ports.contains_key(&name(loser)), "{winner}");
                outcomes.push((
                    rules(&c, &facts("a")).system_version.clone(),
                    rejection_fields(&c),
                ));
            }
        }
        assert!(outcomes.windows(2).all(|w| w[0] == w[1]), "{outcomes:?}");
    }
}

/// A claim refused waits: when the Service holding it lets it go, the next in rank gets it.
/// An incumbent keeps its claim even against an older newcomer.
#[test]
fn a_released_claim_goes_to_the_waiting_service_and_incumbents_keep_theirs() {
    let mut young = svc(
        "young",
        &["10.96.0.8"],
        &[("http", Protocol::Tcp, 80, None)],
    );
    young.external_ips = vec![ip("203.0.113.9")];
    young.created = at("2026-03-01T00:00:00Z");
    let mut old = svc("old", &["10.96.0.9"], &[("http", Protocol::Tcp, 80, None)]);
    old.external_ips = vec![ip("203.0.113.9")];
    old.created = at("2020-01-01T00:00:00Z");
    let policy = Arc::new(ClusterPolicy::default());
    let c1 = Catalog::build(policy.clone(), &inputs(vec![young.clone()], vec![]), None);
    // The older Service arrives later: the external IP stays with the younger, which serves
    // it; the older serves its ClusterIP without it.
    let c2 = Catalog::build(
        policy.clone(),
        &inputs(vec![young.clone(), old.clone()], vec![]),
        Some(&c1),
    );
    let ext = |c: &Catalog, n: &str| c.ports[n].plan.external_ips.clone();
    assert_eq!(ext(&c2, "default/young/tcp/http/ipv4"), [ip("203.0.113.9")]);
    assert!(ext(&c2, "default/old/tcp/http/ipv4").is_empty());
    assert_eq!(
        rejection_fields(&c2),
        [(
            "Service".to_owned(),
            "old".to_owned(),
            "spec.ports[0].port".to_owned()
        )]
    );
    // The younger drops the external IP: the older gets it in the same build.
    young.external_ips.clear();
    let c3 = Catalog::build(policy, &inputs(vec![young, old], vec![]), Some(&c2));
    assert_eq!(ext(&c3, "default/old/tcp/http/ipv4"), [ip("203.0.113.9")]);
    assert!(c3.rejections().is_empty(), "{:?}", c3.rejections());
    assert_eq!(
        c3.changed,
        ["default/old/tcp/http/ipv4", "default/young/tcp/http/ipv4"]
    );
}

/// A healthCheckNodePort is a node port like the others: taken by another Service's
/// healthCheckNodePort or by a nodePort (of any protocol), it is refused alone.
#[test]
fn a_health_check_node_port_already_taken_is_refused_alone() {
    let lb = |name: &str, ip_: &str, np: u16, hc: u16, created: &str| {
        let mut s = svc(name, &[ip_], &[("http", Protocol::Tcp, 80, Some(np))]);
        s.service_type = ServiceType::LoadBalancer;
        s.external_policy = TrafficPolicy::Local;
        s.health_check_node_port = Some(port(hc));
        s.created = at(created);
        s
    };
    let first = lb("first", "10.96.0.21", 30001, 30500, "2026-01-01T00:00:00Z");
    // Its healthCheckNodePort is first's.
    let second = lb("second", "10.96.0.22", 30002, 30500, "2026-01-02T00:00:00Z");
    // Its healthCheckNodePort is first's nodePort.
    let third = lb("third", "10.96.0.23", 30003, 30001, "2026-01-03T00:00:00Z");
    // A UDP nodePort on first's healthCheckNodePort.
    let udp = svc(
        "udp",
        &["10.96.0.24"],
        &[("dns", Protocol::Udp, 53, Some(30500))],
    );
    let c = catalog(
        ClusterPolicy::default(),
        &inputs(vec![first, second, third, udp], vec![]),
    );
    let a = rules(&c, &facts("a"));
    let hc = |n: &str| port_of(&a, &format!("default/{n}/tcp/http/ipv4")).health_check_node_port;
    assert_eq!((hc("first"), hc("second"), hc("third")), (30500, 0, 0));
    // Everything else of them is served.
    for (n, np) in [("first", 30001), ("second", 30002), ("third", 30003)] {
        assert_eq!(
            port_of(&a, &format!("default/{n}/tcp/http/ipv4")).node_port,
            np
        );
    }
    assert_eq!(port_of(&a, "default/udp/udp/dns/ipv4").node_port, 0);
    let fields: Vec<_> = rejection_fields(&c)
        .into_iter()
        .map(|(_, n, f)| (n, f))
        .collect();
    assert_eq!(
        fields,
        [
            ("second".to_owned(), "spec.healthCheckNodePort".to_owned()),
            ("third".to_owned(), "spec.healthCheckNodePort".to_owned()),
            ("udp".to_owned(), "spec.ports[0].nodePort".to_owned()),
        ]
    );
}

/// An endpoint whose address is a ClusterIP (of any Service) is refused, the rest of its
/// slice kept; it becomes usable when no Service has that ClusterIP any more, and is refused
/// when one gets it later (whether the endpoint names a node or not).
#[test]
fn an_endpoint_at_a_cluster_ip_is_refused_and_the_rest_of_the_slice_kept() {
    let web = svc("web", &["10.96.0.10"], &[("http", Protocol::Tcp, 80, None)]);
    let other = svc(
        "other",
        &["10.96.0.20"],
        &[("http", Protocol::Tcp, 80, None)],
    );
    let s = slice(
        "web-1",
        "web",
        &[("http", Protocol::Tcp, 8080)],
        vec![
            ep("10.244.1.10", "a", READY),
            ep("10.96.0.20", "a", READY),
            ep("10.96.0.10", "b", READY),
            EndpointModel {
                node_name: None,
                ..ep("10.96.0.30", "b", READY)
            },
            ep("10.96.0.40", "a", READY),
        ],
    );
    let policy = Arc::new(ClusterPolicy::default());
    let c1 = Catalog::build(
        policy.clone(),
        &inputs(vec![web.clone(), other.clone()], vec![s.clone()]),
        None,
    );
    let cluster = |c: &Catalog| {
        endpoints(&port_of(&rules(c, &facts("x")), "default/web/tcp/http/ipv4").cluster_endpoints)
    };
    assert_eq!(
        cluster(&c1),
        ["10.96.0.30:8080", "10.96.0.40:8080", "10.244.1.10:8080"]
    );
    assert_eq!(
        rejection_fields(&c1),
        [
            (
                "EndpointSlice".to_owned(),
                "web-1".to_owned(),
                "endpoints[1].addresses[0]".to_owned()
            ),
            (
                "EndpointSlice".to_owned(),
                "web-1".to_owned(),
                "endpoints[2].addresses[0]".to_owned()
            ),
        ]
    );
    // The refused address is not one of node a's endpoint addresses either.
    let a = rules(&c1, &facts("a"));
    let bucket = node_endpoints_name(endpoint_bucket(&ip("10.96.0.20")));
    assert!(
        !format!("{:?}", a.get(&bucket)).contains("10.96.0.20"),
        "{:?}",
        a.get(&bucket)
    );

    // "other" goes and two more Services get 10.96.0.30 and 10.96.0.40: 10.96.0.20 is
    // usable again, the other two are refused; incrementally as on a fresh build.
    let third = svc(
        "third",
        &["10.96.0.30"],
        &[("http", Protocol::Tcp, 80, None)],
    );
    let fourth = svc(
        "fourth",
        &["10.96.0.40"],
        &[("http", Protocol::Tcp, 80, None)],
    );
    let next = inputs(vec![web, third, fourth], vec![s]);
    let c2 = Catalog::build(policy.clone(), &next, Some(&c1));
    assert_eq!(cluster(&c2), ["10.96.0.20:8080", "10.244.1.10:8080"]);
    let fresh = Catalog::build(policy, &next, None);
    assert_eq!(cluster(&fresh), cluster(&c2));
    assert_eq!(rejection_fields(&fresh), rejection_fields(&c2));
    assert_eq!(
        rules(&fresh, &facts("a")).system_version,
        rules(&c2, &facts("a")).system_version
    );
    assert_eq!(
        c2.rejections()
            .iter()
            .map(|r| r.field.as_str())
            .collect::<Vec<_>>(),
        [
            "endpoints[2].addresses[0]",
            "endpoints[3].addresses[0]",
            "endpoints[4].addresses[0]"
        ]
    );
}

fn with_pod_cidrs(mut inputs: Inputs, name: &str, cidrs: &[&str]) -> Inputs {
    let mut n = (*inputs.nodes[name]).clone();
    n.pod_cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
    inputs.nodes.insert(name.into(), Arc::new(n));
    inputs
}

fn detector(rules: &NodeRuleSet) -> (DetectLocalMode, Vec<String>, String) {
    let n = node_of(rules);
    (
        DetectLocalMode::try_from(n.detect_local_mode).unwrap(),
        n.local_pod_cidrs.clone(),
        n.local_interface.clone(),
    )
}

/// Each --detect-local-mode reaches every node's settings with its parameter: the cluster
/// CIDRs everywhere, each node its own podCIDRs (none: no detector, said in inspection), or
/// the interface name or prefix everywhere.
#[test]
fn the_local_traffic_detector_is_planned_per_mode() {
    let web = svc("web", &["10.96.0.10"], &[("http", Protocol::Tcp, 80, None)]);
    let inputs = inputs(vec![web.clone()], vec![]);
    let inputs = with_pod_cidrs(inputs, "a", &["10.244.1.0/24", "fd00:244:1::/64"]);
    let cluster = ClusterPolicy {
        cluster_cidrs: vec![
            "fd00:244::/32".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        ],
        ..Default::default()
    };
    let c = catalog(cluster.clone(), &inputs);
    for node in ["a", "b"] {
        assert_eq!(
            detector(&rules(&c, &facts(node))),
            (
                DetectLocalMode::ClusterCidr,
                vec!["10.244.0.0/16".into(), "fd00:244::/32".into()],
                String::new()
            )
        );
        assert!(
            c.explain(&facts(node), &web.id)
                .iter()
                .all(|n| !n.contains("detector"))
        );
    }

    // A single-stack cluster's --cluster-cidr covers the families its Services use.
    let v4_only = ClusterPolicy {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    let c = catalog(v4_only, &inputs);
    assert!(
        c.explain(&facts("a"), &web.id)
            .iter()
            .all(|n| !n.contains("detector"))
    );
    let c = catalog(ClusterPolicy::default(), &inputs);
    let notes = c.explain(&facts("a"), &web.id).join("\n");
    assert!(
        notes.contains("ClusterCIDR: no --cluster-cidr of ipv4"),
        "{notes}"
    );

    let node_cidr = ClusterPolicy {
        detect_local: DetectLocal::NodeCidr,
        ..cluster.clone()
    };
    let c = catalog(node_cidr.clone(), &inputs);
    assert_eq!(
        detector(&rules(&c, &facts("a"))),
        (
            DetectLocalMode::NodeCidr,
            vec!["10.244.1.0/24".into(), "fd00:244:1::/64".into()],
            String::new()
        )
    );
    // Node b has no podCIDRs: nothing is local there (kube-proxy's detector for no CIDR).
    assert_eq!(
        detector(&rules(&c, &facts("b"))),
        (DetectLocalMode::NodeCidr, vec![], String::new())
    );
    let notes = c.explain(&facts("b"), &web.id).join("\n");
    assert!(
        notes.contains("NodeCIDR") && notes.ends_with("no spec.podCIDRs of ipv4: no local-traffic detector there (traffic to ClusterIPs is not masqueraded, externalTrafficPolicy Local sends pods to local endpoints only)"),
        "{notes}"
    );
    assert!(
        c.explain(&facts("a"), &web.id)
            .iter()
            .all(|n| !n.contains("podCIDRs"))
    );

    for (policy, mode, name) in [
        (
            DetectLocal::BridgeInterface(InterfaceName::new("cbr0").unwrap()),
            DetectLocalMode::BridgeInterface,
            "cbr0",
        ),
        (
            DetectLocal::InterfaceNamePrefix(InterfaceName::new("eni").unwrap()),
            DetectLocalMode::InterfaceNamePrefix,
            "eni",
        ),
    ] {
        let c = catalog(
            ClusterPolicy {
                detect_local: policy,
                ..cluster.clone()
            },
            &inputs,
        );
        for node in ["a", "b", "unknown"] {
            assert_eq!(
                detector(&rules(&c, &facts(node))),
                (mode, vec![], name.to_string())
            );
        }
    }
}

/// In NodeCIDR mode a node's pod CIDRs are part of its own settings: when they change (or
/// arrive), that node's `node` resource changes and no other node's rule set does.
#[test]
fn pod_cidrs_changing_change_only_that_nodes_settings() {
    let web = svc("web", &["10.96.0.10"], &[("http", Protocol::Tcp, 80, None)]);
    let before = with_pod_cidrs(inputs(vec![web], vec![]), "a", &["10.244.1.0/24"]);
    let policy = Arc::new(ClusterPolicy {
        detect_local: DetectLocal::NodeCidr,
        ..Default::default()
    });
    let old = Catalog::build(policy.clone(), &before, None);
    let after = with_pod_cidrs(before.clone(), "b", &["10.244.2.0/24"]);
    let new = Catalog::build(policy, &after, Some(&old));
    let (a0, a1) = (rules(&old, &facts("a")), rules(&new, &facts("a")));
    let (b0, b1) = (rules(&old, &facts("b")), rules(&new, &facts("b")));
    assert_eq!(a0.system_version, a1.system_version);
    assert_ne!(b0.system_version, b1.system_version);
    assert_eq!(node_of(&b1).local_pod_cidrs, ["10.244.2.0/24"]);
    let changed: Vec<String> = b1
        .iter()
        .filter(|r| b0.get(&r.name).map(|o| &o.version) != Some(&r.version))
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(changed, [NODE_RESOURCE]);
}
