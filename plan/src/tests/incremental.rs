//! Property: however the inputs change, batch after batch, the rule set the hub keeps for each
//! node by incremental updates (`Catalog::build` from the previous catalog, then
//! `Catalog::update` of each node's current rule set, or `rules_for` when the node itself
//! changed) holds the same resources, by name and content version, as one planned from
//! scratch from the same inputs.
//!
//! Known gap, by design: when two Services claim the same address and port or NodePort, the
//! one already serving keeps it, so the winner depends on history and a rebuild may pick the
//! other. The generator therefore gives every Service its own addresses and NodePorts.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;

use kubenft_proto::v1::{IpFamily, Protocol};
use proptest::prelude::*;

use crate::Catalog;
use crate::model::*;
use crate::model::{Conditions, ServiceType, SlicePort};
use crate::policy::*;
use crate::port::*;
use crate::view::NodeRuleSet;

const SERVICES: usize = 3;
const SLICES: usize = 4;
const NODES: [&str; 3] = ["n0", "n1", "n2"];
const ZONES: [&str; 2] = ["z0", "z1"];

fn id(name: String) -> ObjectName {
    ObjectName {
        namespace: "default".into(),
        name,
    }
}

fn nz(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero port")
}

/// One change to the inputs.
#[derive(Clone, Debug)]
enum Change {
    Service(usize, Option<ServiceModel>),
    Slice(usize, Option<SliceModel>),
    Node(usize, Option<NodeModel>),
}

fn family_strategy() -> impl Strategy<Value = IpFamily> {
    prop_oneof![Just(IpFamily::Ipv4), Just(IpFamily::Ipv6)]
}

fn v4_or_v6(family: IpFamily, v4: String, v6: String) -> IpAddr {
    let s = if family == IpFamily::Ipv4 { v4 } else { v6 };
    s.parse().expect("test address")
}

/// Service `i`: its own ClusterIPs, NodePorts and external IP (see the module's note);
/// families, ports, policies, affinity and type vary.
fn service_strategy(i: usize) -> impl Strategy<Value = ServiceModel> {
    (
        prop_oneof![
            Just(vec![IpFamily::Ipv4]),
            Just(vec![IpFamily::Ipv6]),
            Just(vec![IpFamily::Ipv4, IpFamily::Ipv6]),
            Just(vec![IpFamily::Ipv6, IpFamily::Ipv4]),
        ],
        (any::<bool>(), any::<bool>()).prop_filter("at least one port", |(a, b)| *a || *b),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(prop_oneof![Just(60u32), Just(10800)]),
    )
        .prop_map(
            move |(families, (http, dns), node_port, external_ip, ext_local, int_local, aff)| {
                let families: Vec<IpFamily> = families;
                let cluster_ips = families
                    .iter()
                    .map(|f| {
                        v4_or_v6(
                            *f,
                            format!("10.96.0.{}", 10 + i),
                            format!("fd00:96::{}", 10 + i),
                        )
                    })
                    .collect();
                let mut ports = Vec::new();
                if http {
                    ports.push(("http", Protocol::Tcp, 80));
                }
                if dns {
                    ports.push(("dns", Protocol::Udp, 53));
                }
                let ports = ports
                    .into_iter()
                    .enumerate()
                    .map(|(index, (name, protocol, port))| ServicePortModel {
                        name: name.into(),
                        protocol,
                        port: nz(port),
                        node_port: node_port.then(|| nz(30000 + 10 * i as u16 + index as u16)),
                        index,
                    })
                    .collect();
                let external_policy = if ext_local {
                    TrafficPolicy::Local
                } else {
                    TrafficPolicy::Cluster
                };
                ServiceModel {
                    id: id(format!("s{i}")),
                    service_type: if node_port {
                        ServiceType::NodePort
                    } else {
                        ServiceType::ClusterIp
                    },
                    cluster_ips,
                    ports,
                    external_ips: if external_ip {
                        vec![v4_or_v6(
                            families[0],
                            format!("203.0.113.{}", 10 + i),
                            format!("2001:db8::{}", 10 + i),
                        )]
                    } else {
                        vec![]
                    },
                    load_balancer_ips: vec![],
                    load_balancer_source_ranges: vec![],
                    external_policy,
                    internal_policy: if int_local {
                        TrafficPolicy::Local
                    } else {
                        TrafficPolicy::Cluster
                    },
                    affinity_timeout: aff,
                    health_check_node_port: (node_port && ext_local).then(|| nz(32000 + i as u16)),
                    created: Some(
                        format!("2026-01-01T00:00:0{i}Z")
                            .parse()
                            .expect("test timestamp"),
                    ),
                }
            },
        )
}

fn hints_strategy(
    names: &'static [&'static str],
) -> impl Strategy<Value = Option<BTreeSet<String>>> {
    prop::option::of(prop::sample::subsequence(names, 0..=names.len()))
        .prop_map(|h| h.map(|h| h.into_iter().map(String::from).collect()))
}

/// An endpoint of the given family. Its address is from a small pool shared by every slice
/// (the same pod listed twice, or moving between nodes); one address of the pool is Service
/// s2's ClusterIP, which is refused as an endpoint while s2 has it.
fn endpoint_strategy(family: IpFamily) -> impl Strategy<Value = EndpointModel> {
    (
        0u8..4,
        prop::option::of(prop::sample::select(&NODES[..])),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        prop::option::of(prop::sample::select(&ZONES[..])),
        hints_strategy(&ZONES),
        hints_strategy(&NODES),
    )
        .prop_map(
            move |(n, node, (ready, serving, terminating), zone, zone_hints, node_hints)| {
                let ip = if n == 3 {
                    v4_or_v6(family, "10.96.0.12".into(), "fd00:96::12".into())
                } else {
                    v4_or_v6(
                        family,
                        format!("10.244.0.{}", n + 1),
                        format!("fd00:244::{}", n + 1),
                    )
                };
                EndpointModel {
                    index: 0,
                    ip,
                    conditions: Conditions {
                        ready,
                        serving,
                        terminating,
                    },
                    node_name: node.map(String::from),
                    zone: zone.map(String::from),
                    zone_hints,
                    node_hints,
                }
            },
        )
}

/// Slice `i`: of any Service (so an update can move it to another), either family.
fn slice_strategy(i: usize) -> impl Strategy<Value = SliceModel> {
    (
        0..SERVICES,
        family_strategy(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(move |(service, family, http, dns, alt_port)| {
            prop::collection::vec(endpoint_strategy(family), 0..4).prop_map(move |endpoints| {
                let target = if alt_port { 9090 } else { 8080 };
                let mut ports = Vec::new();
                if http {
                    ports.push(SlicePort {
                        name: "http".into(),
                        protocol: Protocol::Tcp,
                        port: nz(target),
                    });
                }
                if dns {
                    ports.push(SlicePort {
                        name: "dns".into(),
                        protocol: Protocol::Udp,
                        port: nz(5353),
                    });
                }
                SliceModel {
                    id: id(format!("sl{i}")),
                    service: format!("s{service}"),
                    family,
                    ports,
                    endpoints: endpoints
                        .into_iter()
                        .enumerate()
                        .map(|(index, e)| EndpointModel { index, ..e })
                        .collect(),
                    trigger_ms: None,
                }
            })
        })
}

/// Node `i`: its addresses, zone, pod CIDRs and whether it is being deleted vary.
fn node_strategy(i: usize) -> impl Strategy<Value = NodeModel> {
    (
        prop::sample::subsequence(&[IpFamily::Ipv4, IpFamily::Ipv6][..], 0..=2),
        prop::option::of(prop::sample::select(&ZONES[..])),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(families, zone, deleting, pod_cidrs)| NodeModel {
            name: NODES[i].into(),
            internal_ips: families
                .iter()
                .map(|f| {
                    v4_or_v6(
                        *f,
                        format!("192.168.50.{}", 10 + i),
                        format!("fd00:50::{}", 10 + i),
                    )
                })
                .collect(),
            zone: zone.map(String::from),
            deleting,
            pod_cidrs: if pod_cidrs {
                vec![
                    format!("10.244.{i}.0/24").parse().expect("test CIDR"),
                    format!("fd00:244:{i}::/64").parse().expect("test CIDR"),
                ]
            } else {
                vec![]
            },
        })
}

fn change_strategy() -> impl Strategy<Value = Change> {
    prop_oneof![
        1 => (0..SERVICES).prop_flat_map(|i| prop::option::weighted(0.8, service_strategy(i))
            .prop_map(move |s| Change::Service(i, s))),
        2 => (0..SLICES).prop_flat_map(|i| prop::option::weighted(0.8, slice_strategy(i))
            .prop_map(move |s| Change::Slice(i, s))),
        1 => (0..NODES.len()).prop_flat_map(|i| prop::option::weighted(0.8, node_strategy(i))
            .prop_map(move |n| Change::Node(i, n))),
    ]
}

fn policy_strategy() -> impl Strategy<Value = ClusterPolicy> {
    prop_oneof![
        Just(ClusterPolicy::default()),
        Just(ClusterPolicy {
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().expect("test CIDR"),
                "fd00:244::/48".parse().expect("test CIDR"),
            ],
            ..Default::default()
        }),
        Just(ClusterPolicy {
            detect_local: DetectLocal::NodeCidr,
            masquerade_all: true,
            ..Default::default()
        }),
    ]
}

fn apply(inputs: &mut Inputs, change: Change) {
    match change {
        Change::Service(i, s) => {
            let key = id(format!("s{i}"));
            match s {
                Some(s) => inputs.services.insert(key, Arc::new(s)),
                None => inputs.services.remove(&key),
            };
        }
        Change::Slice(i, s) => {
            let key = id(format!("sl{i}"));
            match s {
                Some(s) => inputs.slices.insert(key, Arc::new(s)),
                None => inputs.slices.remove(&key),
            };
        }
        Change::Node(i, n) => {
            let key = NODES[i].to_owned();
            match n {
                Some(n) => inputs.nodes.insert(key, Arc::new(n)),
                None => inputs.nodes.remove(&key),
            };
        }
    }
}

/// What an agent is sent: each resource by name and content version, and the whole set's
/// version.
fn content(rules: &NodeRuleSet) -> (String, Vec<(String, String)>) {
    let mut resources: Vec<(String, String)> = rules
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    resources.sort();
    (rules.system_version.clone(), resources)
}

fn facts(name: &str) -> AgentFacts {
    AgentFacts {
        name: name.into(),
        agent_addresses: vec![],
    }
}

/// The hub's path (`Hub::set_inputs` and its node entries' `replan`), for every node with an
/// agent (whether or not its Node object exists), checked after every batch.
fn check(policy: ClusterPolicy, batches: Vec<Vec<Change>>) -> Result<(), TestCaseError> {
    let policy = Arc::new(policy);
    let mut inputs = Inputs::default();
    let mut catalog = Catalog::empty(policy.clone());
    let mut current: Vec<Option<NodeRuleSet>> = vec![None; NODES.len()];
    for (step, batch) in batches.into_iter().enumerate() {
        for change in batch {
            apply(&mut inputs, change);
        }
        let next = Catalog::build(policy.clone(), &inputs, Some(&catalog));
        let scratch = Catalog::build(policy.clone(), &inputs, None);
        for (slot, name) in current.iter_mut().zip(NODES) {
            let facts = facts(name);
            let rebuild = catalog.nodes().get(name) != next.nodes().get(name);
            let updated = match slot.take() {
                Some(rules) if !rebuild => next.update(&rules, &facts).unwrap_or(rules),
                previous => next.rules_for(&facts, previous.map_or(1, |r| r.rev + 1)),
            };
            let expected = scratch.rules_for(&facts, 1);
            prop_assert_eq!(
                content(&updated),
                content(&expected),
                "node {} after batch {}",
                name,
                step
            );
            *slot = Some(updated);
        }
        catalog = next;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_updates_give_the_rule_sets_of_a_rebuild(
        policy in policy_strategy(),
        batches in prop::collection::vec(prop::collection::vec(change_strategy(), 1..5), 1..12),
    ) {
        check(policy, batches)?;
    }
}
