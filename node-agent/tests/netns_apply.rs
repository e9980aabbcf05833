//! The applier against the real nft in a throwaway network namespace: full apply, incremental
//! change, a change nft refuses (the previous elements stay), restart adoption, and the
//! binary's `--cleanup`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kubenft_agent::applier::{self, Applier};
use kubenft_agent::health::Health;
use kubenft_agent::metrics::Metrics;
use kubenft_agent::nft::{
    Nft, NftCli, NftError, OwnProcesses, SetId, TableName, TableObjects, Transaction,
};
use kubenft_agent::state::AppliedState;
use kubenft_nft::rules::Family;
use kubenft_proto::v1;

const TABLE: &str = "kna-test";

/// The real nft, which can be told to append a statement nft refuses (test-only hook).
struct PoisonableNft {
    nft: NftCli,
    poison: AtomicBool,
}

impl Nft for PoisonableNft {
    async fn apply(&self, tx: &Transaction) -> Result<(), NftError> {
        let mut script = tx.to_string();
        if self.poison.load(Ordering::SeqCst) {
            script.push_str(&format!("add rule ip {TABLE} services bogus-statement\n"));
        }
        self.nft.run_script(&script).await
    }

    async fn generation(&self, table: &TableName, family: Family) -> Result<Option<u32>, NftError> {
        self.nft.generation(table, family).await
    }

    async fn list_table(&self, table: &TableName, family: Family) -> Result<String, NftError> {
        self.nft.list_table(table, family).await
    }

    async fn list_objects(
        &self,
        table: &TableName,
        family: Family,
    ) -> Result<Option<TableObjects>, NftError> {
        self.nft.list_objects(table, family).await
    }

    async fn list_elements(
        &self,
        table: &TableName,
        family: Family,
        set: SetId,
    ) -> Result<Vec<Option<String>>, NftError> {
        self.nft.list_elements(table, family, set).await
    }

    fn own_processes(&self) -> OwnProcesses {
        self.nft.own_processes()
    }

    fn monitor_argv(&self) -> Option<Vec<String>> {
        self.nft.monitor_argv()
    }
}

fn change(id: u64, resources: Vec<v1::Resource>, removed: &[&str]) -> v1::Change {
    v1::Change {
        trigger_times: Vec::new(),
        change_id: id,
        resources,
        removed: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The elements of one map, as nft lists them (JSON).
fn map_elements(ns: &common::Netns, family: &str, map: &str) -> String {
    let (ok, out, err) = ns.exec(&["nft", "-j", "list", "map", family, TABLE, map]);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let map = json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("map"))
        .unwrap();
    map["elem"].to_string()
}

#[tokio::test]
async fn applies_full_then_incremental_and_survives_a_refused_change() {
    if !common::require_root() {
        return;
    }
    let ns = common::Netns::new();
    let dir = common::TempDir::new();
    let table = TableName::new(TABLE).unwrap();
    let nft = Arc::new(PoisonableNft {
        nft: NftCli::in_netns(&ns.0),
        poison: AtomicBool::new(false),
    });
    let recovered = applier::recover(nft.as_ref(), &table, &dir.0).await;
    assert!(!recovered.is_synced());
    let applier = Applier::new(
        nft.clone(),
        table.clone(),
        dir.0.clone(),
        recovered,
        Arc::new(Metrics::default()),
        Arc::new(Health::default()),
    );

    // 1. Full apply (kernel state unknown: one full-reconcile transaction).
    applier
        .handle(&change(1, common::representative(), &[]))
        .await
        .unwrap();
    let eps = map_elements(&ns, "ip", "ip-c-1-eps");
    assert!(eps.contains("10.244.2.5"), "{eps}");
    assert!(map_elements(&ns, "ip6", "ip-c-1-eps").contains("fd00:10:244:2::5"));

    // 2. Incremental: one endpoint of the web service changes.
    use v1::{IpFamily::Ipv4, Protocol::Tcp};
    let web_eps = |eps: Vec<v1::Endpoint>| {
        common::resource(
            "default/web/TCP/http/IPv4",
            common::port(Ipv4, Tcp, 80, "10.96.0.10", eps),
        )
    };
    let web = |remote: &str| {
        web_eps(vec![
            common::ep("10.244.1.5", 8080, true),
            common::ep(remote, 8080, false),
        ])
    };
    applier
        .handle(&change(2, vec![web("10.244.2.99")], &[]))
        .await
        .unwrap();
    let after_incremental = map_elements(&ns, "ip", "ip-c-1-eps");
    assert!(
        after_incremental.contains("10.244.2.99"),
        "{after_incremental}"
    );
    assert!(
        !after_incremental.contains("\"10.244.2.5\""),
        "{after_incremental}"
    );

    // 3. nft refuses: the error is nft's, and the kernel and memory keep the previous state.
    nft.poison.store(true, Ordering::SeqCst);
    let err = applier
        .handle(&change(3, vec![web("10.244.2.100")], &[]))
        .await
        .unwrap_err();
    assert!(err.contains("Error"), "{err}");
    assert!(err.contains("bogus-statement"), "{err}");
    assert_eq!(map_elements(&ns, "ip", "ip-c-1-eps"), after_incremental);
    assert_eq!(applier.state().read().last_error, err);
    nft.poison.store(false, Ordering::SeqCst);

    // A retry of the same change then applies incrementally.
    applier
        .handle(&change(4, vec![web("10.244.2.100")], &[]))
        .await
        .unwrap();
    assert!(map_elements(&ns, "ip", "ip-c-1-eps").contains("10.244.2.100"));

    // Scaling to 4 endpoints creates a new slot and load-balancing chain in a later
    // transaction (what nft 1.0.6 refuses with `typeof … th dport` maps).
    let four = (1..=4)
        .map(|n| common::ep(&format!("10.244.{n}.7"), 8080, false))
        .collect();
    applier
        .handle(&change(5, vec![web_eps(four)], &[]))
        .await
        .unwrap();
    assert!(map_elements(&ns, "ip", "ip-c-3-eps").contains("10.244.4.7"));
    let (ok, out, err) = ns.exec(&["nft", "list", "chain", "ip", TABLE, "lb-ip-c-4"]);
    assert!(ok && out.contains("numgen random mod 4"), "{out}{err}");

    // 4. Restart: the state file (written after the ACK) matches the tables' generation, so
    // it is adopted.
    applier.flush_state_file().await;
    let generation = applier.state().read().generation();
    assert_eq!(
        nft.generation(&table, Family::V4).await.unwrap(),
        Some(generation)
    );
    let adopted: AppliedState = applier::recover(nft.as_ref(), &table, &dir.0).await;
    assert!(adopted.is_synced());
    assert_eq!(
        adopted.system_version(),
        applier.state().read().system_version()
    );
    // A full reconcile over the existing tables (a restart with an unknown state) is
    // accepted, and leaves the elements as they were.
    let before = map_elements(&ns, "ip", "ip-c-3-eps");
    for f in Family::ALL {
        nft.nft
            .run_script(&adopted.table_text(&table, f))
            .await
            .unwrap();
    }
    assert_eq!(map_elements(&ns, "ip", "ip-c-3-eps"), before);

    // 5. The binary's --cleanup removes both tables and the state file; again is quiet.
    let bin = env!("CARGO_BIN_EXE_kubenft-agent");
    let dir_arg = dir.0.to_str().unwrap();
    for _ in 0..2 {
        let (ok, _, err) = ns.exec(&[
            bin,
            "--cleanup",
            "--table-name",
            TABLE,
            "--state-dir",
            dir_arg,
        ]);
        assert!(ok, "{err}");
    }
    let (ok, out, _) = ns.exec(&["nft", "list", "tables"]);
    assert!(ok);
    assert!(!out.contains(TABLE), "{out}");
    assert!(!dir.0.join("applied.pb").exists());
}

/// A named pipe in place of the state file's temporary: writing the state file blocks in
/// `open` until someone reads, as on a disk that hangs. Dropped: read once (which lets the
/// blocked writer go on) and removed, so later writes make a regular file again.
struct HangingFile(std::path::PathBuf);

impl HangingFile {
    fn new(path: std::path::PathBuf) -> HangingFile {
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "mkfifo {}", path.display());
        HangingFile(path)
    }
}

impl Drop for HangingFile {
    fn drop(&mut self) {
        // Opening a FIFO read-write never blocks on Linux, and counts as its reader.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A state disk that hangs holds back no change, and a restart never takes a state file
/// that lags behind the kernel for what the kernel holds. Changes are applied and ACKed while
/// the state file cannot be written; an agent restarted then finds the file a generation
/// behind its tables' and starts from "unknown" (a full reconcile) instead of adopting it;
/// once the disk works again the file catches up with the latest change and is adopted.
#[tokio::test]
async fn a_hanging_state_disk_holds_back_no_change_and_a_stale_file_is_never_adopted() {
    if !common::require_root() {
        return;
    }
    let ns = common::Netns::new();
    let dir = common::TempDir::new();
    let table = TableName::new(TABLE).unwrap();
    let nft = Arc::new(NftCli::in_netns(&ns.0));
    let applier = Applier::new(
        nft.clone(),
        table.clone(),
        dir.0.clone(),
        AppliedState::unknown(0),
        Arc::new(Metrics::default()),
        Arc::new(Health::default()),
    );
    applier
        .handle(&change(1, common::representative(), &[]))
        .await
        .unwrap();
    applier.flush_state_file().await;
    let written = applier.state().read().generation();
    use v1::{IpFamily::Ipv4, Protocol::Tcp};
    let web = |remote: &str| {
        let eps = vec![
            common::ep("10.244.1.5", 8080, true),
            common::ep(remote, 8080, false),
        ];
        common::resource(
            "default/web/TCP/http/IPv4",
            common::port(Ipv4, Tcp, 80, "10.96.0.10", eps),
        )
    };
    let listing = || {
        let (ok, out, err) = ns.exec(&["nft", "list", "table", "ip", TABLE]);
        assert!(ok, "{err}");
        out
    };

    // The disk hangs: the next write of the state file blocks.
    let hanging = HangingFile::new(dir.0.join("applied.pb.tmp"));
    for (id, remote) in [(2, "10.244.2.99"), (3, "10.244.2.100")] {
        let handled = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            applier.handle(&change(id, vec![web(remote)], &[])),
        )
        .await;
        handled
            .expect("the change waited for the state file")
            .unwrap();
        assert!(listing().contains(remote), "{remote} not applied");
    }
    let kernel = applier.state().read().generation();
    assert_eq!(
        nft.generation(&table, Family::V4).await.unwrap(),
        Some(kernel)
    );

    // The agent dies now and starts again: its file still describes an older generation.
    let on_disk = kubenft_agent::state::load(&dir.0).unwrap().unwrap();
    assert_eq!(on_disk.generation, written);
    assert_ne!(written, kernel);
    let restarted = applier::recover(nft.as_ref(), &table, &dir.0).await;
    assert!(
        !restarted.is_synced(),
        "a state file behind the kernel was adopted"
    );
    assert!(restarted.hello_applied().is_empty());
    assert!(restarted.generation() >= kernel, "generations go back");

    // The disk works again: the file catches up with the latest change and is adopted.
    drop(hanging);
    applier
        .handle(&change(4, vec![web("10.244.2.101")], &[]))
        .await
        .unwrap();
    applier.flush_state_file().await;
    let adopted = applier::recover(nft.as_ref(), &table, &dir.0).await;
    assert!(adopted.is_synced());
    assert_eq!(
        adopted.system_version(),
        applier.state().read().system_version()
    );
    assert!(listing().contains("10.244.2.101"));
}
