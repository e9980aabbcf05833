//! The state file and convergence through the applier (fake nft): a truncated, corrupt, empty
//! or misplaced state file is refused and the agent starts with a full reconcile; an
//! unwritable state directory never stops changes from being applied and is logged once per
//! change of state; a refused change starts the `/livez` grace.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kubenft_agent::applier::{self, Applier};
use kubenft_agent::health::Health;
use kubenft_agent::metrics::Metrics;
use kubenft_agent::nft::{FakeNft, TableName};
use kubenft_agent::state::{AppliedState, state_path};
use kubenft_proto::v1;

fn applier(
    nft: &FakeNft,
    dir: &Path,
    state: AppliedState,
    health: Arc<Health>,
) -> Applier<FakeNft> {
    Applier::new(
        Arc::new(nft.clone()),
        TableName::default(),
        dir.to_owned(),
        state,
        Arc::new(Metrics::default()),
        health,
    )
}

/// A Service port whose endpoints are `10.244.1.<n>`.
fn web(endpoints: &[u8]) -> v1::Resource {
    use v1::{IpFamily::Ipv4, Protocol::Tcp};
    let eps = endpoints
        .iter()
        .map(|n| common::ep(&format!("10.244.1.{n}"), 8080, true))
        .collect();
    common::resource(
        "default/web/TCP/http/IPv4",
        common::port(Ipv4, Tcp, 80, "10.96.0.10", eps),
    )
}

fn change(id: u64, resources: Vec<v1::Resource>) -> v1::Change {
    v1::Change {
        change_id: id,
        resources,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_damaged_state_file_is_refused_and_the_agent_reconciles_in_full() {
    let dir = common::TempDir::new();
    let nft = FakeNft::default();
    let first = applier(
        &nft,
        &dir.0,
        AppliedState::unknown(0),
        Arc::new(Health::default()),
    );
    let resources = vec![common::node_rules(), common::node_endpoints(), web(&[5, 6])];
    first.handle(&change(1, resources.clone())).await.unwrap();
    // Written after the ACK.
    first.flush_state_file().await;
    let generation = first.state().read().generation();
    nft.set_generation(Some(generation));
    let good = std::fs::read(state_path(&dir.0)).unwrap();
    let table = TableName::default();

    // The intact file is adopted.
    let adopted = applier::recover(&nft, &table, &dir.0).await;
    assert!(adopted.is_synced());
    assert_eq!(adopted.len(), 3);

    // The last resource (the largest name sorts last) is the file's tail: cut it off at its
    // boundary, and the rest still decodes as a smaller state.
    let last = resources.iter().map(|r| r.name.as_str()).max().unwrap();
    let tail = good
        .windows(last.len())
        .rposition(|w| w == last.as_bytes())
        .unwrap();
    // Back up over the field's key and length (and the name's own key and length).
    let cut = (0..tail)
        .rev()
        .find(|&i| good[i] == 0x1a)
        .expect("the resource field's key");
    // A flipped byte inside a version string: still a valid protobuf.
    let version = &resources[0].version;
    let at = good
        .windows(version.len())
        .position(|w| w == version.as_bytes())
        .unwrap();
    let mut flipped = good.clone();
    flipped[at] = if flipped[at] == b'0' { b'1' } else { b'0' };

    let captured = common::Captured::default();
    let _log = captured.install();
    for (what, bytes) in [
        ("truncated", &good[..cut]),
        ("flipped", &flipped[..]),
        ("empty", &[][..]),
    ] {
        std::fs::write(state_path(&dir.0), bytes).unwrap();
        let state = applier::recover(&nft, &table, &dir.0).await;
        assert!(!state.is_synced(), "{what}: adopted");
        assert!(state.is_empty(), "{what}");
        // The first change after it is a full reconcile, which flushes our own maps and
        // refills them in one transaction; the table is never deleted.
        let again = applier(&nft, &dir.0, state, Arc::new(Health::default()));
        again.handle(&change(2, resources.clone())).await.unwrap();
        // Its state file is written before the next damaged one.
        again.flush_state_file().await;
        let tx = nft.applied().pop().unwrap().to_string();
        assert!(tx.contains("flush "), "{what}: not a full reconcile:\n{tx}");
        assert!(!tx.contains("delete table"), "{what}:\n{tx}");
        nft.set_generation(Some(again.state().read().generation()));
    }
    let logs = captured.text();
    assert_eq!(
        logs.matches("unreadable state file").count(),
        3,
        "one clear line per refused file:\n{logs}"
    );
    for reason in ["truncated", "checksum mismatch", "empty file"] {
        assert!(logs.contains(reason), "{reason} not logged:\n{logs}");
    }

    // A directory where the file should be: reported, reconciled, never a panic.
    std::fs::remove_file(state_path(&dir.0)).unwrap();
    std::fs::create_dir(state_path(&dir.0)).unwrap();
    let state = applier::recover(&nft, &table, &dir.0).await;
    assert!(!state.is_synced());
}

#[tokio::test]
async fn an_unwritable_state_dir_is_logged_once_and_changes_still_apply() {
    let dir = common::TempDir::new();
    // A state directory below a regular file: it can never be created.
    let blocker = dir.0.join("blocker");
    std::fs::write(&blocker, b"").unwrap();
    let state_dir = blocker.join("state");
    let nft = FakeNft::default();
    let health = Arc::new(Health::default());
    let applier = applier(&nft, &state_dir, AppliedState::unknown(0), health.clone());
    let captured = common::Captured::default();
    let _log = captured.install();

    applier
        .handle(&change(1, vec![common::node_rules(), web(&[5])]))
        .await
        .unwrap();
    applier
        .handle(&change(2, vec![web(&[5, 6])]))
        .await
        .unwrap();
    applier.handle(&change(3, vec![web(&[6])])).await.unwrap();
    // Written after the ACKs: all three are applied whatever the disk does.
    applier.flush_state_file().await;
    assert_eq!(nft.applied().len(), 3);
    let error = health.status().persist_error.expect("reported by health");
    assert!(error.contains("blocker"), "{error}");
    let logs = captured.text();
    assert_eq!(
        logs.matches("cannot persist the applied state").count(),
        1,
        "{logs}"
    );

    // Writable again: logged once more, and the report is gone.
    std::fs::remove_file(&blocker).unwrap();
    applier.handle(&change(4, vec![web(&[7])])).await.unwrap();
    applier.handle(&change(5, vec![web(&[8])])).await.unwrap();
    applier.flush_state_file().await;
    assert!(health.status().persist_error.is_none());
    assert!(state_path(&state_dir).exists());
    let logs = captured.text();
    assert_eq!(logs.matches("persisted again").count(), 1, "{logs}");
    assert_eq!(
        logs.matches("cannot persist the applied state").count(),
        1,
        "{logs}"
    );
}

#[tokio::test]
async fn a_refused_change_fails_livez_after_the_grace_until_a_commit() {
    let dir = common::TempDir::new();
    let nft = FakeNft::default();
    let health = Arc::new(Health::with_livez_grace(Duration::from_millis(200)));
    let applier = applier(&nft, &dir.0, AppliedState::unknown(0), health.clone());
    applier
        .handle(&change(1, vec![common::node_rules(), web(&[5])]))
        .await
        .unwrap();
    assert!(health.status().live);

    // Refused every time, as a full reconcile too.
    nft.fail_times("Error: boom\n", u32::MAX);
    applier
        .handle(&change(2, vec![web(&[5, 6])]))
        .await
        .unwrap_err();
    nft.fail_times("", 0);
    assert!(health.status().live, "failed before the grace");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = health.status();
    assert!(!status.live, "{status:?}");
    assert!(status.not_converged_since.is_some());

    applier
        .handle(&change(3, vec![web(&[5, 6])]))
        .await
        .unwrap();
    let status = health.status();
    assert!(
        status.live && status.not_converged_since.is_none(),
        "{status:?}"
    );
}
