//! Self-healing against real nft: another program changes the agent's tables in a network
//! namespace, and the monitor and drift loop put back exactly what was applied, without
//! touching anyone else's table.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kubenft_agent::applier::{self, Applier};
use kubenft_agent::drift;
use kubenft_agent::health::Health;
use kubenft_agent::metrics::Metrics;
use kubenft_agent::nft::{NftCli, TableName, monitor};
use kubenft_nft::repair::RepairKind;
use kubenft_proto::v1;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const TABLE: &str = "kubenft";
/// Someone else's table, which no repair may touch.
const OTHER: &str = "table ip other {
  set blocked { type ipv4_addr; elements = { 192.0.2.1 } }
  chain input { type filter hook input priority 10; policy accept; ip saddr @blocked drop; }
}";

/// A table's listing with its blocks (one set, map or chain each) sorted.
fn by_name(listing: &str) -> String {
    let mut blocks: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in listing.lines() {
        current.push_str(line);
        current.push('\n');
        if line == "\t}" || line == "}" || line.starts_with("table ") {
            blocks.push(std::mem::take(&mut current));
        }
    }
    blocks.push(current);
    blocks.sort();
    blocks.concat()
}

struct Fixture {
    ns: common::Netns,
    _dir: common::TempDir,
    applier: Arc<Applier<NftCli>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Fixture {
    /// An agent's applier with the representative rule set applied, watched by the monitor
    /// and repaired by the drift loop (unless `heal` is false).
    async fn start(heal: bool) -> Fixture {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let ns = common::Netns::new();
        let dir = common::TempDir::new();
        let (ok, _, err) = ns.exec(&["nft", OTHER]);
        assert!(ok, "{err}");
        let table = TableName::new(TABLE).unwrap();
        let nft = Arc::new(NftCli::in_netns(&ns.0));
        let recovered = applier::recover(nft.as_ref(), &table, &dir.0).await;
        let metrics = Arc::new(Metrics::default());
        let applier = Arc::new(Applier::new(
            nft,
            table.clone(),
            dir.0.clone(),
            recovered,
            metrics.clone(),
            Arc::new(Health::default()),
        ));
        applier
            .handle(&v1::Change {
                change_id: 1,
                resources: common::representative(),
                ..Default::default()
            })
            .await
            .unwrap();
        // Tests restart from its state file, written after the ACK.
        applier.flush_state_file().await;
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if heal {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let argv = applier.monitor_argv().unwrap();
            tasks.spawn(monitor::run(
                argv,
                table,
                applier.own_processes(),
                tx,
                cancel.clone(),
            ));
            tasks.spawn(drift::run(applier.clone(), rx, cancel.clone()));
            // The monitor must be listening before anything happens.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Fixture {
            ns,
            _dir: dir,
            applier,
            metrics,
            cancel,
            tasks,
        }
    }

    /// Both of our tables and the foreign one, as nft lists them, each table's sets and
    /// chains in name order (a recreated chain lists last).
    fn listing(&self) -> String {
        let mut out = String::new();
        for (family, table) in [("ip", TABLE), ("ip6", TABLE), ("ip", "other")] {
            let (_, text, _) = self.ns.exec(&["nft", "list", "table", family, table]);
            out.push_str(&by_name(&text));
        }
        out
    }

    fn nft(&self, command: &str) {
        let (ok, _, err) = self.ns.exec(&["nft", command]);
        assert!(ok, "nft {command}: {err}");
    }

    /// Waits (bounded) until the tables list as `want`; returns how long it took.
    async fn healed(&self, want: &str) -> Option<Duration> {
        let started = Instant::now();
        for _ in 0..50 {
            if self.listing() == want {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Repairs of `kind` counted so far, waiting (bounded) for at least one: the repair is
    /// counted just after nft returns, the test may see the tables first.
    async fn repairs(&self, kind: RepairKind) -> u64 {
        let count = || {
            self.applier
                .dataplane()
                .snapshot()
                .repairs
                .get(&kind)
                .copied()
                .unwrap_or(0)
        };
        for _ in 0..20 {
            if count() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        count()
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Injects `fault` and expects the tables back as they were, by a repair of `kind`.
async fn heals(fault: &[&str], kind: RepairKind) {
    if !common::require_root() {
        return;
    }
    let fx = Fixture::start(true).await;
    let before = fx.listing();
    assert!(before.contains("table ip other"), "{before}");
    for command in fault {
        fx.nft(command);
    }
    assert_ne!(fx.listing(), before, "the fault changed nothing: {fault:?}");
    let took = fx.healed(&before).await;
    assert!(
        took.is_some(),
        "not repaired within 5 s after {fault:?}:\n{}",
        fx.listing()
    );
    assert!(
        fx.repairs(kind).await >= 1,
        "{:?}",
        fx.applier.dataplane().snapshot()
    );
    // Converged again (recreating the table also restarts nft monitor, which dies printing
    // a set declared in the same batch: one more full reconcile follows).
    let mut snapshot = fx.applier.dataplane().snapshot();
    for _ in 0..40 {
        if snapshot.state == drift::State::Converged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        snapshot = fx.applier.dataplane().snapshot();
    }
    assert!(snapshot.drift >= 1);
    assert_eq!(snapshot.state, drift::State::Converged, "{snapshot:?}");
    let metrics = fx.metrics.encode();
    assert!(
        metrics.contains(&format!(
            "kubenft_agent_repairs_total{{kind=\"{}\"}}",
            kind.as_str()
        )),
        "{metrics}"
    );
    fx.stop().await;
}

#[tokio::test]
async fn a_deleted_element_is_added_back() {
    heals(
        &["delete element ip kubenft service-ips { 10.96.0.10 . tcp . 80 }"],
        RepairKind::Element,
    )
    .await;
}

#[tokio::test]
async fn a_foreign_element_is_removed() {
    heals(
        &["add element ip6 kubenft service-ips { fd00:10:96::99 . tcp . 80 : drop }"],
        RepairKind::Element,
    )
    .await;
}

#[tokio::test]
async fn a_flushed_map_is_refilled() {
    heals(&["flush map ip kubenft ip-c-1-eps"], RepairKind::Element).await;
}

#[tokio::test]
async fn a_rule_inserted_into_our_chain_is_removed() {
    heals(
        &["insert rule ip kubenft services counter drop"],
        RepairKind::Chain,
    )
    .await;
}

#[tokio::test]
async fn a_flushed_chain_is_rewritten() {
    heals(&["flush chain ip6 kubenft svc-cluster"], RepairKind::Chain).await;
}

#[tokio::test]
async fn a_deleted_base_chain_is_recreated() {
    heals(
        &["delete chain ip kubenft nat-prerouting"],
        RepairKind::Chain,
    )
    .await;
}

#[tokio::test]
async fn a_foreign_chain_in_our_table_is_removed() {
    heals(
        &["add chain ip kubenft evil { type filter hook prerouting priority -300; policy drop; }"],
        RepairKind::Foreign,
    )
    .await;
}

#[tokio::test]
async fn an_object_squatting_one_of_our_names_is_removed_at_once() {
    // Named like a slot the applied state does not use: left alone, it would refuse the
    // change that first needs that slot (a map of another type).
    heals(
        &["add map ip kubenft ip-c-9-eps { type ipv4_addr : ipv4_addr; }"],
        RepairKind::Stale,
    )
    .await;
}

#[tokio::test]
async fn a_deleted_table_is_rebuilt() {
    heals(&["delete table ip kubenft"], RepairKind::Full).await;
}

#[tokio::test]
async fn a_flushed_ruleset_is_rebuilt_and_only_ours() {
    if !common::require_root() {
        return;
    }
    let fx = Fixture::start(true).await;
    let ours = |fx: &Fixture| {
        let (_, v4, _) = fx.ns.exec(&["nft", "list", "table", "ip", TABLE]);
        let (_, v6, _) = fx.ns.exec(&["nft", "list", "table", "ip6", TABLE]);
        v4 + &v6
    };
    let before = ours(&fx);
    fx.nft("flush ruleset");
    let mut back = false;
    for _ in 0..50 {
        if ours(&fx) == before {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "not rebuilt:\n{}", ours(&fx));
    // The foreign table was flushed away with everything else; it is not ours to restore.
    let (exists, _, _) = fx.ns.exec(&["nft", "list", "table", "ip", "other"]);
    assert!(!exists);
    assert!(fx.repairs(RepairKind::Full).await >= 1);
    fx.stop().await;
}

#[tokio::test]
async fn a_restarted_agent_verifies_what_it_adopts() {
    if !common::require_root() {
        return;
    }
    // An agent applied its rules and stopped; while no agent ran, another program deleted an
    // element and added one.
    let fx = Fixture::start(false).await;
    let before = fx.listing();
    fx.nft("delete element ip kubenft service-ips { 10.96.0.10 . tcp . 80 }");
    fx.nft("add element ip6 kubenft cluster-ips { fd00:10:96::77 }");
    let table = TableName::new(TABLE).unwrap();
    let nft = Arc::new(NftCli::in_netns(&fx.ns.0));
    // The restarted agent finds its state file and generation: it adopts them ...
    let adopted = applier::recover(nft.as_ref(), &table, &fx._dir.0).await;
    assert!(adopted.is_synced());
    let restarted = Arc::new(Applier::new(
        nft,
        table.clone(),
        fx._dir.0.clone(),
        adopted,
        Arc::new(Metrics::default()),
        Arc::new(Health::default()),
    ));
    // ... and its first verification finds what the kernel lost and gained meanwhile.
    let found = restarted.verify_content().await.unwrap().unwrap();
    assert_eq!(found.elements.len(), 2, "{found:?}");
    let cancel = CancellationToken::new();
    let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let healing = tokio::spawn(drift::run(restarted.clone(), rx, cancel.clone()));
    assert!(fx.healed(&before).await.is_some(), "{}", fx.listing());
    let repaired = || {
        let repairs = restarted.dataplane().snapshot().repairs;
        repairs.get(&RepairKind::Element).copied().unwrap_or(0)
    };
    for _ in 0..20 {
        if repaired() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(repaired() >= 1, "{:?}", restarted.dataplane().snapshot());
    // Once repaired, a verification finds nothing.
    let clean = restarted.verify_content().await.unwrap().unwrap();
    assert!(clean.is_empty(), "{clean:?}");
    cancel.cancel();
    healing.await.unwrap();
    fx.stop().await;
}

/// The chains of our ip table, by name.
fn chains(ns: &common::Netns) -> Vec<String> {
    let (ok, out, err) = ns.exec(&["nft", "-j", "list", "chains", "ip"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("chain"))
        .filter(|c| c["table"] == TABLE)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn on_demand_objects_go_with_the_last_element_that_needs_them() {
    if !common::require_root() {
        return;
    }
    let fx = Fixture::start(false).await;
    use v1::{IpFamily::Ipv4, Protocol::Tcp};
    let big = |n: u8, affinity: bool| {
        let eps = (1..=n)
            .map(|i| common::ep(&format!("10.244.9.{i}"), 80, false))
            .collect();
        let mut port = common::port(Ipv4, Tcp, 80, "10.96.0.99", eps);
        if affinity {
            port.affinity = Some(v1::SessionAffinity {
                timeout_seconds: 60,
            });
        }
        common::resource("default/big/TCP/http/IPv4", port)
    };
    let apply = |id: u64, resources: Vec<v1::Resource>, removed: Vec<String>| {
        let applier = fx.applier.clone();
        async move {
            applier
                .handle(&v1::Change {
                    change_id: id,
                    resources,
                    removed,
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };
    let before = chains(&fx.ns);
    // 40 endpoints with affinity, then 2 without, then the Service is gone.
    apply(2, vec![big(40, true)], vec![]).await;
    let grown = chains(&fx.ns);
    assert!(grown.contains(&"ep-ip-c-39".to_owned()), "{grown:?}");
    assert!(grown.contains(&"lb-ip-c-40-a60".to_owned()), "{grown:?}");
    apply(3, vec![big(2, false)], vec![]).await;
    let shrunk = chains(&fx.ns);
    assert!(
        !shrunk
            .iter()
            .any(|c| c == "ep-ip-c-39" || c.contains("-a60")),
        "{shrunk:?}"
    );
    assert!(shrunk.contains(&"lb-ip-c-2".to_owned()), "{shrunk:?}");
    apply(4, vec![], vec!["default/big/TCP/http/IPv4".into()]).await;
    // Exactly what the rest of the rule set needs, as before the Service came.
    let mut after = chains(&fx.ns);
    let mut want = before.clone();
    after.sort();
    want.sort();
    assert_eq!(after, want);
    let (_, maps, _) = fx.ns.exec(&["nft", "list", "maps", "ip"]);
    assert!(!maps.contains("ip-c-39-eps"), "{maps}");
    let (_, sets, _) = fx.ns.exec(&["nft", "list", "sets", "ip"]);
    assert!(!sets.contains("sticky-ip-c-39"), "{sets}");
    // The structure check agrees: nothing missing, nothing stale.
    let check = fx.applier.check_structure().await.unwrap();
    assert!(check.is_empty(), "{check:?}");
    fx.stop().await;
}

#[tokio::test]
async fn objects_left_by_an_earlier_run_are_removed() {
    if !common::require_root() {
        return;
    }
    let fx = Fixture::start(false).await;
    // A slot and a load-balancing chain the applied state does not need (an earlier run with
    // a lost state file left them).
    fx.nft("add map ip kubenft ip-c-77-eps { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }");
    fx.nft("add chain ip kubenft ep-ip-c-77");
    fx.nft("add chain ip kubenft lb-ip-c-78");
    fx.nft("add rule ip kubenft lb-ip-c-78 goto ep-ip-c-77");
    let found = fx.applier.check_structure().await.unwrap();
    assert_eq!(found.stale_chains.len(), 2, "{found:?}");
    assert_eq!(found.stale_sets.len(), 1, "{found:?}");
    fx.applier.repair(&found).await.unwrap();
    let left = chains(&fx.ns);
    assert!(
        !left.iter().any(|c| c.contains("77") || c.contains("78")),
        "{left:?}"
    );
    assert!(fx.applier.check_structure().await.unwrap().is_empty());
    fx.stop().await;
}

#[tokio::test]
async fn without_the_drift_loop_nothing_heals() {
    if !common::require_root() {
        return;
    }
    // The control: the same fault, no monitor and no drift loop.
    let fx = Fixture::start(false).await;
    let clean = fx.applier.check_structure().await.unwrap();
    assert!(clean.is_empty(), "{clean:?}");
    let before = fx.listing();
    fx.nft("delete element ip kubenft service-ips { 10.96.0.10 . tcp . 80 }");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(fx.listing(), before);
    // The periodic structure check is the backstop when no notification came: it finds a
    // deleted base chain, not a deleted element.
    fx.nft("delete chain ip kubenft filter-forward");
    let found = fx.applier.check_structure().await.unwrap();
    assert_eq!(found.chains.len(), 1, "{found:?}");
    assert!(!found.full);
    fx.applier.repair(&found).await.unwrap();
    let (ok, _, _) = fx
        .ns
        .exec(&["nft", "list", "chain", "ip", TABLE, "filter-forward"]);
    assert!(ok);
    fx.stop().await;
}

/// An agent upgraded in place over tables written before the local-traffic set was renamed
/// (`cluster-cidrs`, now `local-pod-cidrs`): it adopts its state, its structure check finds
/// the set missing and rewrites the tables in place (no table delete), and the next check
/// deletes the old set, which nothing refers to any more. The tables end as a fresh agent
/// writes them.
#[tokio::test]
async fn tables_from_before_the_set_rename_are_brought_up_to_date() {
    if !common::require_root() {
        return;
    }
    let fx = Fixture::start(false).await;
    let before = fx.listing();
    // The old layout: the same CIDRs in `cluster-cidrs`, the four chains testing it.
    for (f, addr, cidr) in [
        ("ip", "ipv4_addr", "10.244.0.0/16"),
        ("ip6", "ipv6_addr", "fd00:10:244::/56"),
    ] {
        let vmap = |map: &str| format!("{f} daddr . meta l4proto . th dport vmap @{map}");
        let port_vmap = |map: &str| format!("meta l4proto . th dport vmap @{map}");
        let local = |vmap: String| {
            [
                format!("{f} saddr @cluster-cidrs {vmap}"),
                "fib saddr type local jump mark-for-masquerade".to_string(),
                format!("fib saddr type local {vmap}"),
            ]
        };
        let mut script = vec![
            format!("add set {f} kubenft cluster-cidrs {{ type {addr}; flags interval; }}"),
            format!("add element {f} kubenft cluster-cidrs {{ {cidr} }}"),
        ];
        for (chain, dispatch) in [
            ("svc-cluster", "ip-c-dispatch"),
            ("svc-local", "ip-l-dispatch"),
        ] {
            script.push(format!("flush chain {f} kubenft {chain}"));
            script.push(format!(
                "add rule {f} kubenft {chain} {f} saddr != @cluster-cidrs jump mark-for-masquerade"
            ));
            script.push(format!("add rule {f} kubenft {chain} {}", vmap(dispatch)));
        }
        for (chain, rules, last) in [
            (
                "ext-local",
                local(vmap("ip-c-dispatch")),
                vmap("ip-l-dispatch"),
            ),
            (
                "np-local",
                local(port_vmap("np-c-dispatch")),
                port_vmap("np-l-dispatch"),
            ),
        ] {
            script.push(format!("flush chain {f} kubenft {chain}"));
            for rule in rules.iter().chain([&last]) {
                script.push(format!("add rule {f} kubenft {chain} {rule}"));
            }
        }
        script.push(format!("delete set {f} kubenft local-pod-cidrs"));
        fx.nft(&script.join("; "));
    }
    let old = fx.listing();
    assert!(
        old.contains("@cluster-cidrs") && !old.contains("local-pod-cidrs"),
        "{old}"
    );
    let (_, handle_before, _) = fx.ns.exec(&["nft", "-a", "list", "tables"]);

    let table = TableName::new(TABLE).unwrap();
    let nft = Arc::new(NftCli::in_netns(&fx.ns.0));
    let adopted = applier::recover(nft.as_ref(), &table, &fx._dir.0).await;
    assert!(adopted.is_synced());
    let upgraded = Applier::new(
        nft,
        table,
        fx._dir.0.clone(),
        adopted,
        Arc::new(Metrics::default()),
        Arc::new(Health::default()),
    );
    for _ in 0..3 {
        let damage = upgraded.check_structure().await.unwrap();
        if damage.is_empty() {
            break;
        }
        upgraded.repair(&damage).await.unwrap();
    }
    assert!(upgraded.check_structure().await.unwrap().is_empty());
    // In any order: the recreated set lists after the others.
    let blocks = |listing: &str| {
        let mut out: Vec<String> = Vec::new();
        for line in listing
            .lines()
            .filter(|l| !l.trim().is_empty() && *l != "}")
        {
            let starts = ["table ", "\tset ", "\tmap ", "\tchain "];
            if starts.iter().any(|p| line.starts_with(p)) || out.is_empty() {
                out.push(String::new());
            }
            let block = out.last_mut().expect("pushed");
            block.push_str(line.trim());
            block.push('\n');
        }
        out.sort();
        out
    };
    let (now, fresh) = (blocks(&fx.listing()), blocks(&before));
    let differ: Vec<&String> = now
        .iter()
        .filter(|b| !fresh.contains(b))
        .chain(fresh.iter().filter(|b| !now.contains(b)))
        .collect();
    assert!(
        differ.is_empty(),
        "not as a fresh agent writes them: {differ:#?}"
    );
    let (_, handle_after, _) = fx.ns.exec(&["nft", "-a", "list", "tables"]);
    assert_eq!(handle_after, handle_before, "a table was recreated");
    fx.stop().await;
}

/// GetDrift, as grpcurl calls it, with no repair running: what other programs did is listed
/// as one diff in nft syntax, kernel against applied; after the repair it is in sync again.
#[tokio::test]
async fn get_drift_lists_what_the_kernel_holds_against_what_was_applied() {
    use kubenft_agent::inspect::Inspect;
    use kubenft_proto::v1::agent_inspect_server::AgentInspect;
    if !common::require_root() {
        return;
    }
    let fx = Fixture::start(false).await;
    let inspect = Inspect {
        node: "a".into(),
        table: TableName::new(TABLE).unwrap(),
        state: fx.applier.state().clone(),
        nft: Arc::new(NftCli::in_netns(&fx.ns.0)),
        applier: fx.applier.clone(),
    };
    let drift = || async {
        inspect
            .get_drift(tonic::Request::new(v1::GetDriftRequest {}))
            .await
            .expect("GetDrift answers")
            .into_inner()
    };
    let clean = drift().await;
    assert!(clean.in_sync && clean.lines.is_empty(), "{clean:?}");

    fx.nft("delete element ip kubenft service-ips { 10.96.0.10 . tcp . 80 }");
    fx.nft("add element ip6 kubenft service-ips { fd00:10:96::99 . tcp . 80 : drop }");
    fx.nft("add chain ip kubenft evil");
    let dirty = drift().await;
    assert!(!dirty.in_sync, "{dirty:?}");
    let has = |prefix: &str| dirty.lines.iter().any(|l| l.starts_with(prefix));
    assert!(
        has("- element ip kubenft service-ips { 10.96.0.10 . tcp . 80 : "),
        "the deleted element is listed as applied and missing: {:#?}",
        dirty.lines
    );
    assert!(
        has("+ element ip6 kubenft service-ips { fd00:10:96::99 . tcp . 80 }"),
        "the foreign element is listed as held and not applied: {:#?}",
        dirty.lines
    );
    assert!(
        dirty
            .lines
            .contains(&"+ chain ip kubenft evil # another program's".to_owned()),
        "{:#?}",
        dirty.lines
    );
    assert_eq!(
        dirty.lines.len(),
        3,
        "only what changed: {:#?}",
        dirty.lines
    );

    // Repaired, the diff is empty again.
    let mut damage = fx.applier.check_structure().await.unwrap();
    damage.merge(fx.applier.verify_content().await.unwrap().unwrap());
    fx.applier.repair(&damage).await.unwrap();
    let repaired = drift().await;
    assert!(
        repaired.in_sync && repaired.lines.is_empty(),
        "{repaired:?}"
    );
    fx.stop().await;
}
