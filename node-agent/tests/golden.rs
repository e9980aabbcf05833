//! Golden tests of the full table rendering, each golden text also checked by the real
//! `nft --check` in a throwaway network namespace. `UPDATE_GOLDEN=1` rewrites the files.

mod common;

use std::path::PathBuf;

use kubenft_agent::apply;
use kubenft_agent::model::Family;
use kubenft_agent::nft::TableName;
use kubenft_agent::state::AppliedState;
use kubenft_proto::v1;

fn representative_state(table: &TableName) -> AppliedState {
    let change = v1::Change {
        trigger_times: Vec::new(),
        change_id: 1,
        resources: common::representative(),
        ..Default::default()
    };
    let mut state = AppliedState::unknown(0);
    let plan = apply::plan(&state, &change, table).expect("valid resources");
    state.commit(plan);
    state
}

fn golden_path(family: Family) -> PathBuf {
    let name = match family {
        Family::V4 => "full-ipv4.nft",
        Family::V6 => "full-ipv6.nft",
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn rendered(family: Family) -> String {
    let table = TableName::default();
    representative_state(&table).table_text(&table, family)
}

fn compare(family: Family) {
    let text = rendered(family);
    let path = golden_path(family);
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let golden = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(
        text,
        golden,
        "{} differs (UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

fn nft_check(family: Family) {
    if !common::require_root() {
        return;
    }
    let ns = common::Netns::new();
    let path = golden_path(family);
    let (ok, _, stderr) = ns.exec(&["nft", "--check", "-f", path.to_str().unwrap()]);
    assert!(ok, "nft --check {}:\n{stderr}", path.display());
}

#[test]
fn full_table_ipv4_matches_golden() {
    compare(Family::V4);
}

#[test]
fn full_table_ipv6_matches_golden() {
    compare(Family::V6);
}

#[test]
fn golden_ipv4_passes_nft_check() {
    nft_check(Family::V4);
}

#[test]
fn golden_ipv6_passes_nft_check() {
    nft_check(Family::V6);
}
