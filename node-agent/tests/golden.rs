//! Golden tests of the full table rendering, each golden text also checked by the real
//! `nft --check` in a throwaway network namespace. `UPDATE_GOLDEN=1` rewrites the files.
//!
//! The representative state uses a CIDR local-traffic detector (ClusterCIDR; NodeCIDR renders
//! the same with the node's CIDRs); the two interface detectors get their own goldens, since
//! they change the four chains that test for local traffic.

mod common;

use std::path::PathBuf;

use kubenft_agent::nft::TableName;
use kubenft_agent::state::AppliedState;
use kubenft_nft::diff;
use kubenft_nft::rules::Family;
use kubenft_proto::v1;

/// Which local-traffic detector the node resource names.
#[derive(Clone, Copy)]
enum Detector {
    Cidrs,
    /// `--detect-local-mode BridgeInterface --pod-bridge-interface cbr0`.
    Bridge,
    /// `--detect-local-mode InterfaceNamePrefix --pod-interface-name-prefix cali`.
    Prefix,
}

fn resources(detector: Detector) -> Vec<v1::Resource> {
    let mut resources = common::representative();
    let (mode, name) = match detector {
        Detector::Cidrs => return resources,
        Detector::Bridge => (v1::DetectLocalMode::BridgeInterface, "cbr0"),
        Detector::Prefix => (v1::DetectLocalMode::InterfaceNamePrefix, "cali"),
    };
    for r in &mut resources {
        if let Some(v1::resource::Kind::Node(n)) = &mut r.kind {
            n.detect_local_mode = mode as i32;
            n.local_interface = name.into();
            n.local_pod_cidrs.clear();
        }
    }
    resources
}

fn representative_state(table: &TableName, detector: Detector) -> AppliedState {
    let change = v1::Change {
        trigger_times: Vec::new(),
        change_id: 1,
        resources: resources(detector),
        ..Default::default()
    };
    let mut state = AppliedState::unknown(0);
    let plan = diff::diff(&state, &change, table).expect("valid resources");
    state.commit(plan, std::time::SystemTime::now());
    state
}

fn golden_path(family: Family, detector: Detector) -> PathBuf {
    let name = match (detector, family) {
        (Detector::Cidrs, Family::V4) => "full-ipv4.nft",
        (Detector::Cidrs, Family::V6) => "full-ipv6.nft",
        (Detector::Bridge, Family::V4) => "bridge-interface-ipv4.nft",
        (Detector::Bridge, Family::V6) => "bridge-interface-ipv6.nft",
        (Detector::Prefix, Family::V4) => "interface-name-prefix-ipv4.nft",
        (Detector::Prefix, Family::V6) => "interface-name-prefix-ipv6.nft",
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn rendered(family: Family, detector: Detector) -> String {
    let table = TableName::default();
    representative_state(&table, detector).table_text(&table, family)
}

fn compare(family: Family, detector: Detector) {
    let text = rendered(family, detector);
    let path = golden_path(family, detector);
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

fn nft_check(family: Family, detector: Detector) {
    if !common::require_root() {
        return;
    }
    let ns = common::Netns::new();
    let path = golden_path(family, detector);
    let (ok, _, stderr) = ns.exec(&["nft", "--check", "-f", path.to_str().unwrap()]);
    assert!(ok, "nft --check {}:\n{stderr}", path.display());
}

#[test]
fn full_table_ipv4_matches_golden() {
    compare(Family::V4, Detector::Cidrs);
}

#[test]
fn full_table_ipv6_matches_golden() {
    compare(Family::V6, Detector::Cidrs);
}

#[test]
fn golden_ipv4_passes_nft_check() {
    nft_check(Family::V4, Detector::Cidrs);
}

#[test]
fn golden_ipv6_passes_nft_check() {
    nft_check(Family::V6, Detector::Cidrs);
}

/// The interface detectors: `iifname "cbr0"` and `iifname "cali*"` in both families, and
/// no element in `local-pod-cidrs`. The interfaces need not exist (nft's `iif` would refuse
/// a name the namespace lacks; `iifname` compares names), which `nft --check` in an empty
/// namespace shows.
#[test]
fn interface_detectors_match_golden_and_pass_nft_check() {
    for detector in [Detector::Bridge, Detector::Prefix] {
        for family in Family::ALL {
            compare(family, detector);
            nft_check(family, detector);
            let text = rendered(family, detector);
            assert!(
                !text.contains("add element ip kubenft local-pod-cidrs")
                    && !text.contains("add element ip6 kubenft local-pod-cidrs"),
                "{text}"
            );
        }
    }
}
