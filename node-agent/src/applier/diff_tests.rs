//! The element diff (`kubenft_nft::diff`) as the applier runs it, against a fake nft:
//! which commands reach nft, what is committed, what a refusal leaves behind.

use std::sync::Arc;

use kubenft_proto::v1::{self, resource};

use crate::applier::{self, Applier, RETRIES};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::nft::{Command, FakeNft, Nft, TableName, Transaction};
use crate::state::{AppliedState, testdir::TestDir};

pub(crate) fn ep(ip: &str, port: u32, local: bool) -> v1::Endpoint {
    v1::Endpoint {
        ip: ip.into(),
        port,
        local,
        ready: true,
    }
}

pub(crate) fn port_rules(cluster_ip: &str, eps: Vec<v1::Endpoint>) -> v1::ServicePortRules {
    let local = eps.iter().filter(|e| e.local).cloned().collect();
    v1::ServicePortRules {
        namespace: "ns".into(),
        service: "svc".into(),
        port_name: "http".into(),
        protocol: v1::Protocol::Tcp as i32,
        family: v1::IpFamily::Ipv4 as i32,
        port: 80,
        cluster_ip: cluster_ip.into(),
        cluster_endpoints: eps,
        local_endpoints: local,
        ..Default::default()
    }
}

pub(crate) fn svc(name: &str, sp: v1::ServicePortRules) -> v1::Resource {
    v1::Resource::versioned(name.into(), resource::Kind::ServicePort(sp))
}

pub(crate) fn node(rules: v1::NodeRules) -> v1::Resource {
    v1::Resource::versioned("node".into(), resource::Kind::Node(rules))
}

fn change(id: u64, resources: Vec<v1::Resource>, removed: &[&str]) -> v1::Change {
    v1::Change {
        trigger_times: Vec::new(),
        change_id: id,
        system_version: String::new(),
        resources,
        removed: removed.iter().map(|s| s.to_string()).collect(),
        continued: false,
    }
}

struct Fixture {
    nft: FakeNft,
    applier: Applier<FakeNft>,
    _dir: TestDir,
}

impl Fixture {
    /// An applier whose kernel state is known (as after adoption).
    fn synced() -> Fixture {
        let f = Fixture::unknown();
        f.applier.state().write().assume_synced();
        f
    }

    fn unknown() -> Fixture {
        let dir = TestDir::new();
        let nft = FakeNft::default();
        let applier = Applier::new(
            Arc::new(nft.clone()),
            TableName::default(),
            dir.0.clone(),
            AppliedState::unknown(0),
            Arc::new(Metrics::default()),
            Arc::new(Health::default()),
        );
        Fixture {
            nft,
            applier,
            _dir: dir,
        }
    }

    async fn apply(&self, c: v1::Change) -> Result<(), String> {
        self.applier.handle(&c).await
    }

    /// The text of the last transaction run, without the generation bump.
    fn last(&self) -> Vec<String> {
        let tx = self
            .nft
            .applied()
            .last()
            .cloned()
            .expect("a transaction ran");
        lines(&tx)
            .into_iter()
            .filter(|l| !l.contains(" generation"))
            .collect()
    }
}

/// One line per command (element runs split), for readable assertions.
fn lines(tx: &Transaction) -> Vec<String> {
    tx.ops()
        .iter()
        .map(|op| {
            let mut one = Transaction::new(TableName::default());
            one.push(op.family, op.command.clone());
            one.to_string().trim_end().replace(" ip kubenft ", " ")
        })
        .collect()
}

#[tokio::test]
async fn add_service_then_change_one_endpoint() {
    let f = Fixture::synced();
    let eps = vec![ep("10.1.0.1", 8080, false), ep("10.1.1.1", 8080, false)];
    f.apply(change(
        1,
        vec![svc("ns/svc/tcp/http/v4", port_rules("10.96.0.10", eps))],
        &[],
    ))
    .await
    .unwrap();
    assert_eq!(
        f.last(),
        [
            "add map ip-c-0-eps { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }",
            "flush map ip-c-0-eps",
            "add chain ep-ip-c-0",
            "flush chain ep-ip-c-0",
            "add rule ep-ip-c-0 meta l4proto { tcp, udp, sctp } dnat ip to ip daddr . meta l4proto . th dport map @ip-c-0-eps",
            "add map ip-c-1-eps { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }",
            "flush map ip-c-1-eps",
            "add chain ep-ip-c-1",
            "flush chain ep-ip-c-1",
            "add rule ep-ip-c-1 meta l4proto { tcp, udp, sctp } dnat ip to ip daddr . meta l4proto . th dport map @ip-c-1-eps",
            "add chain lb-ip-c-2",
            "flush chain lb-ip-c-2",
            "add rule lb-ip-c-2 numgen random mod 2 vmap { 0 : goto ep-ip-c-0, 1 : goto ep-ip-c-1 }",
            "add element cluster-ips { 10.96.0.10 }",
            "add element service-ips { 10.96.0.10 . tcp . 80 : goto svc-cluster }",
            "add element ip-c-dispatch { 10.96.0.10 . tcp . 80 : goto lb-ip-c-2 }",
            "add element ip-c-0-eps { 10.96.0.10 . tcp . 80 : 10.1.0.1 . 8080 }",
            "add element ip-c-1-eps { 10.96.0.10 . tcp . 80 : 10.1.1.1 . 8080 }",
        ]
    );
    let eps = vec![ep("10.1.0.1", 8080, false), ep("10.1.2.2", 8080, false)];
    f.apply(change(
        2,
        vec![svc("ns/svc/tcp/http/v4", port_rules("10.96.0.10", eps))],
        &[],
    ))
    .await
    .unwrap();
    assert_eq!(
        f.last(),
        [
            "delete element ip-c-1-eps { 10.96.0.10 . tcp . 80 }",
            "add element ip-c-1-eps { 10.96.0.10 . tcp . 80 : 10.1.2.2 . 8080 }",
        ]
    );
    // The generation is bumped in both tables, in the same transaction.
    let tx = f.nft.applied().last().unwrap().to_string();
    assert!(
        tx.contains("flush set ip kubenft generation\nadd element ip kubenft generation { 2 }")
    );
    assert!(tx.contains("add element ip6 kubenft generation { 2 }"));
}

#[tokio::test]
async fn remove_deletes_every_element() {
    let f = Fixture::synced();
    let mut sp = port_rules("10.96.0.10", vec![ep("10.1.0.1", 8080, true)]);
    sp.node_port = 30080;
    f.apply(change(1, vec![svc("a", sp)], &[])).await.unwrap();
    let added = f.last().len();
    f.apply(change(2, vec![], &["a"])).await.unwrap();
    let last = f.last();
    let (elements, objects): (Vec<&String>, Vec<&String>) =
        last.iter().partition(|l| l.starts_with("delete element"));
    // Every element added is deleted, and with the last element that needed them the two
    // load-balancing chains and the two slots (a chain and a map each), after the elements.
    let created = 3 * 2 + 5 * 2;
    assert_eq!(elements.len(), added - created);
    assert_eq!(
        objects,
        [
            "delete chain lb-ip-c-1",
            "delete chain lb-np-c-1",
            "delete chain ep-ip-c-0",
            "delete map ip-c-0-eps",
            "delete chain ep-np-c-0",
            "delete map np-c-0-eps",
        ]
    );
    assert!(last.iter().rposition(|l| l.starts_with("delete element")) < Some(elements.len()));
    assert!(
        f.applier
            .state()
            .read()
            .table(kubenft_nft::rules::Family::V4)
            .elements
            .is_empty()
    );
}

#[tokio::test]
async fn unchanged_resources_only_bump_the_generation() {
    let f = Fixture::synced();
    let r = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.0.1", 8080, false)]),
    );
    f.apply(change(1, vec![r.clone()], &[])).await.unwrap();
    f.apply(change(2, vec![r], &[])).await.unwrap();
    assert!(f.last().is_empty());
    assert_eq!(f.nft.applied().len(), 2);
}

#[tokio::test]
async fn empty_change_runs_nothing() {
    let f = Fixture::synced();
    f.apply(change(1, vec![], &[])).await.unwrap();
    assert!(f.nft.applied().is_empty());
}

#[tokio::test]
async fn internal_traffic_local_without_local_endpoints_drops() {
    let f = Fixture::synced();
    let mut sp = port_rules("10.96.0.10", vec![ep("10.1.1.1", 8080, false)]);
    sp.internal_traffic_local = true;
    f.apply(change(1, vec![svc("a", sp)], &[])).await.unwrap();
    assert_eq!(
        f.last(),
        [
            "add element cluster-ips { 10.96.0.10 }",
            "add element service-ips { 10.96.0.10 . tcp . 80 : goto svc-local }",
            "add element no-endpoint-services { 10.96.0.10 . tcp . 80 : drop }",
        ]
    );
}

#[tokio::test]
async fn external_traffic_local_node_port() {
    let f = Fixture::synced();
    let mut sp = port_rules(
        "",
        vec![ep("10.1.0.1", 8080, true), ep("10.1.1.1", 8080, false)],
    );
    sp.node_port = 30080;
    sp.external_traffic_local = true;
    sp.external_ips = vec!["192.0.2.7".into()];
    f.apply(change(1, vec![svc("a", sp)], &[])).await.unwrap();
    let last = f.last();
    for want in [
        "add element hairpin { 10.1.0.1 . 10.1.0.1 }",
        "add element service-ips { 192.0.2.7 . tcp . 80 : goto ext-local }",
        "add element service-nodeports { tcp . 30080 : goto np-local }",
        "add element ip-c-dispatch { 192.0.2.7 . tcp . 80 : goto lb-ip-c-2 }",
        "add element ip-l-dispatch { 192.0.2.7 . tcp . 80 : goto lb-ip-l-1 }",
        "add element np-c-dispatch { tcp . 30080 : goto lb-np-c-2 }",
        "add element np-l-dispatch { tcp . 30080 : goto lb-np-l-1 }",
        "add element np-l-0-eps { tcp . 30080 : 10.1.0.1 . 8080 }",
        "add chain lb-np-l-1",
        "add chain ep-np-l-0",
    ] {
        assert!(
            last.contains(&want.to_string()),
            "{want} missing in {last:#?}"
        );
    }
}

#[tokio::test]
async fn no_endpoints_rejects() {
    let f = Fixture::synced();
    let mut sp = port_rules("10.96.0.10", vec![]);
    sp.node_port = 30080;
    f.apply(change(1, vec![svc("a", sp)], &[])).await.unwrap();
    assert_eq!(
        f.last(),
        [
            "add element cluster-ips { 10.96.0.10 }",
            "add element no-endpoint-services { 10.96.0.10 . tcp . 80 : goto reject-chain }",
            "add element no-endpoint-nodeports { tcp . 30080 : goto reject-chain }",
        ]
    );
}

#[tokio::test]
async fn hairpin_and_cluster_ips_are_refcounted() {
    let f = Fixture::synced();
    let local = || vec![ep("10.1.0.1", 8080, true)];
    let mut https = port_rules("10.96.0.10", local());
    https.port = 443;
    f.apply(change(
        1,
        vec![
            svc("http", port_rules("10.96.0.10", local())),
            svc("https", https),
        ],
        &[],
    ))
    .await
    .unwrap();
    let first = f.last();
    assert_eq!(first.iter().filter(|l| l.contains("hairpin")).count(), 1);
    assert_eq!(
        first.iter().filter(|l| l.contains("cluster-ips")).count(),
        1
    );
    // Removing one user keeps the shared elements.
    f.apply(change(2, vec![], &["http"])).await.unwrap();
    assert!(
        !f.last()
            .iter()
            .any(|l| l.contains("hairpin") || l.contains("cluster-ips"))
    );
    // Removing the last one deletes them.
    f.apply(change(3, vec![], &["https"])).await.unwrap();
    let last = f.last();
    assert!(last.contains(&"delete element hairpin { 10.1.0.1 . 10.1.0.1 }".to_string()));
    assert!(last.contains(&"delete element cluster-ips { 10.96.0.10 }".to_string()));
}

#[tokio::test]
async fn invalid_change_is_nacked_without_nft() {
    let f = Fixture::synced();
    let bad = svc("a", port_rules("10.96.0.300", vec![]));
    let err = f.apply(change(1, vec![bad], &[])).await.unwrap_err();
    assert!(err.contains("cluster_ip"), "{err}");
    assert!(f.nft.applied().is_empty());
    assert_eq!(f.applier.state().read().last_error, err);
}

#[tokio::test]
async fn conflicting_keys_are_refused() {
    let f = Fixture::synced();
    let a = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.0.1", 8080, false)]),
    );
    let b = svc(
        "b",
        port_rules("10.96.0.10", vec![ep("10.1.0.2", 8080, false)]),
    );
    let err = f.apply(change(1, vec![a, b], &[])).await.unwrap_err();
    assert!(err.contains("another resource"), "{err}");
}

#[tokio::test]
async fn nft_failure_keeps_the_previous_state() {
    let f = Fixture::synced();
    let r1 = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.0.1", 8080, false)]),
    );
    f.apply(change(1, vec![r1], &[])).await.unwrap();
    let before = f
        .applier
        .state()
        .read()
        .table(kubenft_nft::rules::Family::V4)
        .elements
        .clone();
    // Refused every time: retried, tried as a full reconcile, then NACKed with the first
    // lines of nft's error only.
    let script_echo =
        "delete element ip kubenft ip-c-0-eps { 10.96.0.10 . tcp . 80 }\n".repeat(200);
    f.nft.fail_times(
        &format!("Error: Could not process rule: No such file or directory\n{script_echo}"),
        u32::MAX,
    );
    let r2 = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.9.9", 8080, false)]),
    );
    let err = f.apply(change(2, vec![r2.clone()], &[])).await.unwrap_err();
    assert_eq!(
        err,
        "Error: Could not process rule: No such file or directory\n\
         delete element ip kubenft ip-c-0-eps { 10.96.0.10 . tcp . 80 }\n\
         delete element ip kubenft ip-c-0-eps { 10.96.0.10 . tcp . 80 }"
    );
    f.nft.fail_times("", 0);
    let state = f.applier.state().read().clone();
    assert_eq!(state.table(kubenft_nft::rules::Family::V4).elements, before);
    assert_eq!(state.generation(), 1);
    // A retry diffs against the old state again.
    f.apply(change(3, vec![r2], &[])).await.unwrap();
    assert_eq!(f.last().len(), 2);
}

#[tokio::test]
async fn a_refusal_is_retried_then_applied_as_a_full_reconcile() {
    let f = Fixture::synced();
    let r1 = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.0.1", 8080, false)]),
    );
    f.apply(change(1, vec![r1], &[])).await.unwrap();
    // Refused once (a transient failure): the same transaction again commits it.
    f.nft
        .fail_next("Error: Could not process rule: Device or resource busy\n");
    let r2 = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.9.9", 8080, false)]),
    );
    f.apply(change(2, vec![r2], &[])).await.unwrap();
    let retried = f.last().join("\n");
    assert!(!retried.contains("flush map"), "{retried}");
    // Refused as often as it is retried (the kernel no longer holds what the diff assumes):
    // the change is applied as one full reconcile, without deleting the table.
    f.nft.fail_times(
        "Error: Could not process rule: No such file or directory\n",
        1 + RETRIES.len() as u32,
    );
    let r3 = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.7.7", 8080, false)]),
    );
    f.apply(change(3, vec![r3], &[])).await.unwrap();
    let full = f.last().join("\n");
    assert!(full.contains("flush map ip-c-0-eps"), "{full}");
    assert!(full.contains("10.1.7.7"), "{full}");
    assert!(!full.contains("delete table"), "{full}");
    assert_eq!(f.applier.state().read().generation(), 3);
}

#[tokio::test]
async fn a_resource_nft_refuses_does_not_hold_back_the_others() {
    let f = Fixture::synced();
    let ok = |name: &str, ip: &str| svc(name, port_rules(ip, vec![ep("10.1.0.1", 8080, false)]));
    f.apply(change(1, vec![ok("a", "10.96.0.1")], &[]))
        .await
        .unwrap();
    // One resource in a change of four is refused whatever is tried (nft would time out on
    // it, or refuses one of its elements); the others, a removal among them, are applied.
    f.nft.refuse_containing("10.66.6.6");
    let bad = svc(
        "bad",
        port_rules("10.96.0.9", vec![ep("10.66.6.6", 8080, false)]),
    );
    let err = f
        .apply(change(
            2,
            vec![ok("b", "10.96.0.2"), bad, ok("c", "10.96.0.3")],
            &["a"],
        ))
        .await
        .unwrap_err();
    assert!(
        err.starts_with("resource \"bad\" refused (3 other resources applied)"),
        "{err}"
    );
    assert!(err.lines().count() <= 3, "{err}");
    let state = f.applier.state().read().clone();
    let names: Vec<String> = state.applied().map(|a| a.name.clone()).collect();
    assert_eq!(names, ["b", "c"]);
    // The next change without it applies as one transaction.
    f.nft.refuse_containing("never in a script");
    f.apply(change(3, vec![ok("d", "10.96.0.4")], &[]))
        .await
        .unwrap();
}

#[tokio::test]
async fn unknown_state_applies_a_full_reconcile_without_deleting_the_table() {
    let f = Fixture::unknown();
    assert!(f.applier.state().read().hello_applied().is_empty());
    let r = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.0.1", 8080, false)]),
    );
    f.apply(change(1, vec![node(v1::NodeRules::default()), r], &[]))
        .await
        .unwrap();
    let tx = f.nft.applied().pop().unwrap();
    let cmds: Vec<&Command> = tx.ops().iter().map(|o| &o.command).collect();
    assert!(!cmds.contains(&&Command::DeleteTable));
    assert!(cmds.contains(&&Command::AddTable));
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::FlushSet(crate::nft::SetId::ServiceIps)))
    );
    // Now known: the next change is incremental and Hello reports what is applied.
    assert_eq!(f.applier.state().read().hello_applied().len(), 2);
    f.apply(change(2, vec![], &["a"])).await.unwrap();
    assert!(
        !f.nft
            .applied()
            .pop()
            .unwrap()
            .ops()
            .iter()
            .any(|o| o.command == Command::AddTable)
    );
}

#[tokio::test]
async fn node_rules_change_rewrites_only_dependent_chains() {
    let f = Fixture::synced();
    let rules = v1::NodeRules {
        local_pod_cidrs: vec!["10.1.0.0/16".into()],
        node_port_ips: vec!["192.168.50.3".into()],
        ..Default::default()
    };
    f.apply(change(1, vec![node(rules)], &[])).await.unwrap();
    let last = f.last();
    let flushed: Vec<&String> = last
        .iter()
        .filter(|l| l.starts_with("flush chain"))
        .collect();
    assert_eq!(
        flushed,
        [
            "flush chain svc-cluster",
            "flush chain svc-local",
            "flush chain ext-local",
            "flush chain np-local"
        ]
    );
    assert!(last.contains(&"add element local-pod-cidrs { 10.1.0.0/16 }".to_string()));
    assert!(last.contains(&"add element nodeport-ips { 192.168.50.3 }".to_string()));
    assert!(!last.iter().any(|l| l.contains("ip6")));
}

/// Switching --detect-local-mode is one transaction like any other: it rewrites the four
/// chains that test for local traffic (both families, since an interface match applies to
/// both), empties the CIDR set, and touches no Service element and no table.
#[tokio::test]
async fn a_detect_local_mode_change_rewrites_only_the_detecting_chains() {
    let f = Fixture::synced();
    let r = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.0.1", 8080, false)]),
    );
    let cidr = v1::NodeRules {
        local_pod_cidrs: vec!["10.1.0.0/16".into()],
        detect_local_mode: v1::DetectLocalMode::ClusterCidr as i32,
        ..Default::default()
    };
    f.apply(change(1, vec![node(cidr), r], &[])).await.unwrap();
    let prefix = v1::NodeRules {
        detect_local_mode: v1::DetectLocalMode::InterfaceNamePrefix as i32,
        local_interface: "cali".into(),
        ..Default::default()
    };
    f.apply(change(2, vec![node(prefix)], &[])).await.unwrap();
    let last = f.last();
    let flushed: Vec<&String> = last
        .iter()
        .filter(|l| l.starts_with("flush chain"))
        .collect();
    assert_eq!(
        flushed,
        [
            "flush chain svc-cluster",
            "flush chain svc-local",
            "flush chain ext-local",
            "flush chain np-local",
            "flush chain ip6 kubenft svc-cluster",
            "flush chain ip6 kubenft svc-local",
            "flush chain ip6 kubenft ext-local",
            "flush chain ip6 kubenft np-local"
        ],
        "{last:#?}"
    );
    for rule in [
        r#"add rule svc-cluster iifname != "cali*" jump mark-for-masquerade"#,
        r#"add rule ext-local iifname "cali*" ip daddr . meta l4proto . th dport vmap @ip-c-dispatch"#,
        r#"add rule ip6 kubenft np-local iifname "cali*" meta l4proto . th dport vmap @np-c-dispatch"#,
    ] {
        assert!(last.contains(&rule.to_string()), "{rule} not in {last:#?}");
    }
    assert!(
        last.contains(&"flush set local-pod-cidrs".to_string()),
        "{last:#?}"
    );
    assert!(
        !last
            .iter()
            .any(|l| l.contains("service-ips") || l.contains("table")),
        "{last:#?}"
    );
}

#[tokio::test]
async fn restart_adopts_a_matching_state_file() {
    let f = Fixture::synced();
    let r = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.0.1", 8080, false)]),
    );
    f.apply(change(1, vec![r], &[])).await.unwrap();
    // Written after the ACK.
    f.applier.flush_state_file().await;
    let table = TableName::default();
    let dir = &f._dir.0;

    let nft = FakeNft::default();
    nft.set_generation(Some(1));
    let adopted = applier::recover(&nft, &table, dir).await;
    assert!(adopted.is_synced());
    assert_eq!(adopted.hello_applied().len(), 1);
    assert_eq!(
        adopted.table(kubenft_nft::rules::Family::V4).elements,
        f.applier
            .state()
            .read()
            .table(kubenft_nft::rules::Family::V4)
            .elements
    );

    nft.set_generation(Some(7));
    let unknown = applier::recover(&nft, &table, dir).await;
    assert!(!unknown.is_synced());
    assert!(unknown.hello_applied().is_empty());
    nft.set_generation(None);
    assert!(!applier::recover(&nft, &table, dir).await.is_synced());
    assert!(
        nft.applied().is_empty(),
        "recovery never runs a transaction"
    );
    // The fake is also an Nft: a generation read needs no table listing.
    assert_eq!(
        nft.generation(&table, kubenft_nft::rules::Family::V4)
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn scaling_up_creates_only_the_new_slot_and_chain_and_drops_the_old_chain() {
    let f = Fixture::synced();
    let two = vec![ep("10.1.0.1", 8080, false), ep("10.1.0.2", 8080, false)];
    f.apply(change(
        1,
        vec![svc("a", port_rules("10.96.0.10", two.clone()))],
        &[],
    ))
    .await
    .unwrap();
    let mut three = two;
    three.push(ep("10.1.0.3", 8080, false));
    f.apply(change(
        2,
        vec![svc("a", port_rules("10.96.0.10", three))],
        &[],
    ))
    .await
    .unwrap();
    assert_eq!(
        f.last(),
        [
            "delete element ip-c-dispatch { 10.96.0.10 . tcp . 80 }",
            "add map ip-c-2-eps { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }",
            "flush map ip-c-2-eps",
            "add chain ep-ip-c-2",
            "flush chain ep-ip-c-2",
            "add rule ep-ip-c-2 meta l4proto { tcp, udp, sctp } dnat ip to ip daddr . meta l4proto . th dport map @ip-c-2-eps",
            "add chain lb-ip-c-3",
            "flush chain lb-ip-c-3",
            "add rule lb-ip-c-3 numgen random mod 3 vmap { 0 : goto ep-ip-c-0, 1 : goto ep-ip-c-1, 2 : goto ep-ip-c-2 }",
            "add element ip-c-dispatch { 10.96.0.10 . tcp . 80 : goto lb-ip-c-3 }",
            "add element ip-c-2-eps { 10.96.0.10 . tcp . 80 : 10.1.0.3 . 8080 }",
            // The chain for two endpoints served only this Service.
            "delete chain lb-ip-c-2",
        ]
    );
}

/// `node-endpoints` resources list the endpoints running on this node: each is a hairpin
/// element, shared with a port that marks the same endpoint local, and added or removed
/// element by element as the lists change.
#[tokio::test]
async fn node_endpoints_own_hairpin_elements() {
    let f = Fixture::synced();
    let bucket = |name: &str, ips: &[&str]| {
        v1::Resource::versioned(
            name.into(),
            v1::resource::Kind::NodeEndpoints(v1::NodeEndpoints {
                ips: ips.iter().map(|s| s.to_string()).collect(),
            }),
        )
    };
    let hairpin = |f: &Fixture| -> Vec<String> {
        f.last()
            .into_iter()
            .filter(|l| l.contains("hairpin"))
            .collect()
    };
    f.apply(change(
        1,
        vec![
            bucket("node-endpoints/1", &["10.1.0.1"]),
            bucket("node-endpoints/2", &["10.1.0.2"]),
        ],
        &[],
    ))
    .await
    .unwrap();
    assert_eq!(
        hairpin(&f),
        [
            "add element hairpin { 10.1.0.1 . 10.1.0.1 }",
            "add element hairpin { 10.1.0.2 . 10.1.0.2 }"
        ]
    );
    // A port marking 10.1.0.2 local shares the element: nothing to add.
    let port = svc(
        "a",
        port_rules("10.96.0.10", vec![ep("10.1.0.2", 8080, true)]),
    );
    f.apply(change(2, vec![port], &[])).await.unwrap();
    assert!(hairpin(&f).is_empty(), "{:?}", f.last());
    // Both buckets go: only 10.1.0.1 is deleted (the port still holds 10.1.0.2).
    f.apply(change(3, vec![], &["node-endpoints/1", "node-endpoints/2"]))
        .await
        .unwrap();
    assert_eq!(
        hairpin(&f),
        ["delete element hairpin { 10.1.0.1 . 10.1.0.1 }"]
    );
    // A misnamed one is refused.
    let err = f
        .apply(change(4, vec![bucket("node", &["10.1.0.3"])], &[]))
        .await
        .unwrap_err();
    assert!(err.contains("node-endpoints/<bucket>"), "{err}");
}
