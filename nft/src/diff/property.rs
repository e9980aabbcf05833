//! Property: for any applied state A and desired state B, the element diff planned from A to
//! B, run against a table holding exactly A's elements, leaves exactly B's; and the applied
//! state it commits (elements with their reference counts, on-demand chains and slots,
//! resources) equals one built from scratch for B. Pure: the transaction is interpreted here,
//! nft is never run.

use std::collections::BTreeMap;

use kubenft_proto::v1::{self, resource};
use proptest::prelude::*;

use std::time::SystemTime;

use crate::applied::{AppliedState, Created};
use crate::diff::{diff, full};
use crate::render;
use crate::rules::Family;
use crate::{Chain, Command, Element, ElementKey, SetId, TableName, Transaction};

/// The Service ports a state may hold. Each name always has the same address, protocol and
/// port (two resources wanting different values under one key is refused, not diffed); the
/// first two share a ClusterIP, so some elements are wanted by two resources.
const PORTS: [(&str, v1::IpFamily, v1::Protocol, &str, u32); 4] = [
    (
        "ns/a/tcp/http/v4",
        v1::IpFamily::Ipv4,
        v1::Protocol::Tcp,
        "10.96.0.10",
        80,
    ),
    (
        "ns/a/tcp/https/v4",
        v1::IpFamily::Ipv4,
        v1::Protocol::Tcp,
        "10.96.0.10",
        443,
    ),
    (
        "ns/b/udp/dns/v4",
        v1::IpFamily::Ipv4,
        v1::Protocol::Udp,
        "10.96.0.11",
        53,
    ),
    (
        "ns/c/tcp/http/v6",
        v1::IpFamily::Ipv6,
        v1::Protocol::Tcp,
        "fd00:96::10",
        80,
    ),
];

fn pod_ip(family: v1::IpFamily, n: u8) -> String {
    match family {
        v1::IpFamily::Ipv6 => format!("fd00:244::{n}"),
        _ => format!("10.244.0.{n}"),
    }
}

/// Endpoints from a pool of four pods (each at most once), on two target ports.
fn endpoints_strategy(family: v1::IpFamily) -> impl Strategy<Value = Vec<v1::Endpoint>> {
    prop::collection::btree_map(1u8..5, (any::<bool>(), any::<bool>(), any::<bool>()), 0..4)
        .prop_map(move |pods| {
            pods.into_iter()
                .map(|(n, (local, ready, alt))| v1::Endpoint {
                    ip: pod_ip(family, n),
                    port: if alt { 9090 } else { 8080 },
                    local,
                    ready,
                })
                .collect()
        })
}

fn service_port_strategy(i: usize) -> impl Strategy<Value = v1::Resource> {
    let (name, family, protocol, cluster_ip, port) = PORTS[i];
    (
        endpoints_strategy(family),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        prop::option::of(prop_oneof![Just(60u32), Just(10800)]),
    )
        .prop_map(
            move |(
                endpoints,
                (node_port, external_ip, lb),
                (ext_local, int_local, elsewhere),
                aff,
            )| {
                let local: Vec<v1::Endpoint> =
                    endpoints.iter().filter(|e| e.local).cloned().collect();
                let extra = |v4: &str, v6: &str| match family {
                    v1::IpFamily::Ipv6 => v6.to_owned(),
                    _ => v4.to_owned(),
                };
                let node_port = if node_port { 30000 + i as u32 } else { 0 };
                v1::Resource::versioned(
                    name.into(),
                    resource::Kind::ServicePort(v1::ServicePortRules {
                        namespace: "ns".into(),
                        service: name.split('/').nth(1).unwrap_or("s").into(),
                        port_name: name.split('/').nth(3).unwrap_or("p").into(),
                        protocol: protocol as i32,
                        family: family as i32,
                        port,
                        cluster_ip: cluster_ip.into(),
                        node_port,
                        external_ips: if external_ip {
                            vec![extra("203.0.113.1", "2001:db8::1")]
                        } else {
                            vec![]
                        },
                        load_balancer_ips: if lb {
                            vec![extra("198.51.100.1", "2001:db8:1::1")]
                        } else {
                            vec![]
                        },
                        load_balancer_source_ranges: vec![],
                        external_traffic_local: ext_local,
                        internal_traffic_local: int_local,
                        affinity: aff
                            .map(|timeout_seconds| v1::SessionAffinity { timeout_seconds }),
                        local_ready_endpoints: local.iter().filter(|e| e.ready).count() as u32,
                        local_endpoints: local,
                        serving_ips: endpoints
                            .iter()
                            .filter(|e| e.ready)
                            .map(|e| e.ip.clone())
                            .collect(),
                        cluster_endpoints: endpoints,
                        health_check_node_port: if ext_local && node_port != 0 {
                            32000 + i as u32
                        } else {
                            0
                        },
                        endpoints_elsewhere: elsewhere,
                    }),
                )
            },
        )
}

fn node_strategy() -> impl Strategy<Value = v1::Resource> {
    (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(cidrs, node_ports, masquerade_all, deleting)| {
            v1::Resource::versioned(
                "node".into(),
                resource::Kind::Node(v1::NodeRules {
                    node_name: "n0".into(),
                    local_pod_cidrs: if cidrs {
                        vec!["10.244.0.0/24".into(), "fd00:244::/64".into()]
                    } else {
                        vec![]
                    },
                    service_cidrs: vec!["10.96.0.0/16".into()],
                    node_port_ips: if node_ports {
                        vec!["192.168.50.10".into()]
                    } else {
                        vec![]
                    },
                    node_port_all_addresses: !node_ports,
                    masquerade_all,
                    deleting,
                    detect_local_mode: v1::DetectLocalMode::ClusterCidr as i32,
                    local_interface: String::new(),
                }),
            )
        },
    )
}

fn node_endpoints_strategy(bucket: u8) -> impl Strategy<Value = v1::Resource> {
    prop::collection::btree_set(1u8..5, 1..4).prop_map(move |pods| {
        v1::Resource::versioned(
            kubenft_proto::node_endpoints_name(bucket),
            resource::Kind::NodeEndpoints(v1::NodeEndpoints {
                ips: pods
                    .into_iter()
                    .flat_map(|n| [pod_ip(v1::IpFamily::Ipv4, n), pod_ip(v1::IpFamily::Ipv6, n)])
                    .collect(),
            }),
        )
    })
}

/// A desired state: any subset of the resources above, each with random content.
fn state_strategy() -> impl Strategy<Value = Vec<v1::Resource>> {
    let ports: Vec<_> = (0..PORTS.len())
        .map(|i| prop::option::of(service_port_strategy(i)))
        .collect();
    (
        ports,
        prop::option::of(node_strategy()),
        prop::option::of(node_endpoints_strategy(0)),
        prop::option::of(node_endpoints_strategy(1)),
    )
        .prop_map(|(ports, node, e0, e1)| {
            ports.into_iter().chain([node, e0, e1]).flatten().collect()
        })
}

/// The change from `a` to `b`, as the controller sends it: what is new or of another
/// version, and the names that are gone.
fn change(a: &[v1::Resource], b: &[v1::Resource]) -> v1::Change {
    let old: BTreeMap<&str, &str> = a
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect();
    v1::Change {
        resources: b
            .iter()
            .filter(|r| old.get(r.name.as_str()) != Some(&r.version.as_str()))
            .cloned()
            .collect(),
        removed: a
            .iter()
            .filter(|r| !b.iter().any(|n| n.name == r.name))
            .map(|r| r.name.clone())
            .collect(),
        ..Default::default()
    }
}

/// The state after applying `resources` to a kernel of unknown content (a full reconcile).
fn from_scratch(resources: &[v1::Resource]) -> Result<AppliedState, TestCaseError> {
    let mut state = AppliedState::unknown(0);
    let change = change(&[], resources);
    let planned = full(&state, &change, &TableName::default())
        .map_err(|e| TestCaseError::fail(format!("valid state refused: {e}")))?;
    state.commit(planned, SystemTime::UNIX_EPOCH);
    Ok(state)
}

/// One family's table as this test models it: its elements, and the on-demand
/// load-balancing chains and endpoint slots that exist.
#[derive(Debug, Default, PartialEq)]
struct Table {
    elements: BTreeMap<ElementKey, Element>,
    objects: Created,
}

type Kernel = [Table; 2];

/// What a table holds when it holds exactly `state`: its elements, the node sets' and the
/// generation, and its on-demand objects.
fn kernel_of(state: &AppliedState) -> Kernel {
    Family::ALL.map(|f| Table {
        elements: state
            .table(f)
            .elements
            .values()
            .map(|e| e.element)
            .chain(render::node_elements(state.node(), f))
            .chain([Element::Generation(state.generation())])
            .map(|e| (e.key(), e))
            .collect(),
        objects: state.table(f).chains.clone(),
    })
}

/// Runs a transaction on `kernel` as nft would: deleting an absent element or object, adding
/// an element over another value or one whose chain or slot does not exist fails the case.
fn run(kernel: &mut Kernel, tx: &Transaction) -> Result<(), TestCaseError> {
    for op in tx.ops() {
        let table = &mut kernel[op.family as usize];
        match &op.command {
            Command::AddElement(e) => {
                let needs = Created::needed_by([e]);
                prop_assert!(
                    needs.minus(&table.objects).is_empty(),
                    "{:?} added before what it refers to",
                    e
                );
                if let Some(old) = table.elements.insert(e.key(), *e) {
                    prop_assert_eq!(old, *e, "add over another value");
                }
            }
            Command::DeleteElement(key) => {
                let gone = table.elements.remove(key);
                prop_assert!(gone.is_some(), "delete of absent {:?}", key);
            }
            Command::FlushSet(set) | Command::DeleteSet(set) => {
                let set: SetId = *set;
                table.elements.retain(|k, _| k.set() != set);
            }
            Command::AddChain(Chain::Lb(lb)) => {
                table.objects.lb_chains.insert(*lb);
            }
            Command::AddChain(Chain::Endpoint(slot)) => {
                table.objects.slots.insert(*slot);
            }
            Command::DeleteChain(Chain::Lb(lb)) => {
                prop_assert!(
                    table.objects.lb_chains.remove(lb),
                    "delete of absent {:?}",
                    lb
                );
                let refer = table.elements.values().any(|e| e.lb_chain() == Some(*lb));
                prop_assert!(!refer, "{:?} deleted while an element jumps to it", lb);
            }
            Command::DeleteChain(Chain::Endpoint(slot)) => {
                prop_assert!(
                    table.objects.slots.remove(slot),
                    "delete of absent {:?}",
                    slot
                );
            }
            _ => {}
        }
    }
    Ok(())
}

/// The state's content that must not depend on its history.
fn summary(state: &AppliedState) -> impl PartialEq + std::fmt::Debug {
    let tables: Vec<_> = Family::ALL
        .map(|f| {
            let t = state.table(f);
            (t.elements.clone(), t.chains.clone(), t.lb_refs.clone())
        })
        .into();
    let resources: Vec<(String, String)> = state
        .applied()
        .map(|a| (a.name.clone(), a.version.clone()))
        .collect();
    (tables, resources, state.node().clone())
}

/// From A (built from scratch) through each next state in turn, incrementally.
fn check(states: Vec<Vec<v1::Resource>>) -> Result<(), TestCaseError> {
    let mut state = from_scratch(&states[0])?;
    for pair in states.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let mut kernel = kernel_of(&state);
        let planned = diff(&state, &change(a, b), &TableName::default())
            .map_err(|e| TestCaseError::fail(format!("valid change refused: {e}")))?;
        prop_assert!(!planned.full);
        run(&mut kernel, &planned.tx)?;
        state.commit(planned, SystemTime::UNIX_EPOCH);
        let expected = from_scratch(b)?;
        prop_assert_eq!(summary(&state), summary(&expected));
        let mut expected_kernel = kernel_of(&expected);
        for table in &mut expected_kernel {
            // The generation counts transactions: the only history the table keeps.
            let elements = &mut table.elements;
            elements.retain(|k, _| k.set() != SetId::Generation);
            elements.extend([Element::Generation(state.generation())].map(|e| (e.key(), e)));
        }
        prop_assert_eq!(&kernel[0], &expected_kernel[0]);
        prop_assert_eq!(&kernel[1], &expected_kernel[1]);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn element_diff_from_a_applied_to_a_gives_b(
        states in prop::collection::vec(state_strategy(), 2..5),
    ) {
        check(states)?;
    }
}
