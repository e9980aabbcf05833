//! `deploy/` is checked here so that a manifest cannot silently drift from the schemas or the
//! binaries: every document must deserialize into its k8s-openapi type without losing a field
//! (a misspelled field is dropped by serde, so the round trip catches it), kustomization.yaml
//! must list every manifest, and every container's command line (with `$(VAR)` references
//! substituted) must be accepted by the binary it runs. `chart.rs` checks what `kubectl
//! kustomize` and the Helm chart render the same way (`kube_objects`).

mod kube_objects;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use kube_objects::{Accepted, Doc, accepted, check_paths, check_probes, typed, workloads};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every `*.yaml` in deploy/ except kustomization.yaml, by file name.
fn manifest_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| (f.ends_with(".yaml") || f.ends_with(".yml")) && f != "kustomization.yaml")
        .collect();
    files.sort();
    files
}

fn documents() -> Vec<Doc> {
    manifest_files()
        .into_iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(deploy_dir().join(&file)).unwrap();
            kube_objects::parse_yaml(&file, &text)
        })
        .collect()
}

#[test]
fn every_document_matches_its_schema() {
    let kinds = kube_objects::check_schemas(&documents());
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "DaemonSet",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains_key(kind), "no {kind} in deploy/: {kinds:?}");
    }
}

#[test]
fn the_round_trip_catches_a_misspelled_field() {
    let doc: Value = yaml_serde::from_str(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {clusterIp: None}\n",
    )
    .unwrap();
    let result = std::panic::catch_unwind(|| typed::<Service>("test", &doc));
    assert!(result.is_err());
}

#[test]
fn kustomization_lists_every_manifest() {
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let k: Value = yaml_serde::from_str(&text).unwrap();
    assert_eq!(k["namespace"], "kubenft-system");
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = manifest_files().into_iter().collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources vs deploy/*.yaml"
    );
}

fn grants(kind: &str, name: &str) -> BTreeSet<String> {
    kube_objects::grants(&documents(), kind, name)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_role_grants_only_what_its_component_uses() {
    assert_eq!(
        grants("ClusterRole", "kubenft-controller"),
        set(&[
            "/nodes:get",
            "/nodes:list",
            "/nodes:watch",
            "/services:get",
            "/services:list",
            "/services:watch",
            "discovery.k8s.io/endpointslices:get",
            "discovery.k8s.io/endpointslices:list",
            "discovery.k8s.io/endpointslices:watch",
            "events.k8s.io/events:create",
        ])
    );
    // Approve and sign for kubenft's signer name only.
    assert_eq!(
        grants("ClusterRole", "kubenft-signer"),
        set(&[
            "certificates.k8s.io/certificatesigningrequests:get",
            "certificates.k8s.io/certificatesigningrequests:list",
            "certificates.k8s.io/certificatesigningrequests:watch",
            "certificates.k8s.io/certificatesigningrequests/approval:update",
            "certificates.k8s.io/certificatesigningrequests/status:update",
            "certificates.k8s.io/signers/kubenft.io/agent:approve",
            "certificates.k8s.io/signers/kubenft.io/agent:sign",
        ])
    );
    assert_eq!(
        grants("Role", "kubenft-controller-ca"),
        set(&[
            "/configmaps:create",
            "/configmaps/kubenft-ca:get",
            "/configmaps/kubenft-ca:update",
            "/secrets:create",
            "/secrets/kubenft-ca:get",
        ])
    );
    assert_eq!(
        grants("Role", "kubenft-agent"),
        set(&[
            "discovery.k8s.io/endpointslices:list",
            "discovery.k8s.io/endpointslices:watch",
        ])
    );
    assert_eq!(
        grants("ClusterRole", "kubenft-agent"),
        set(&[
            "/nodes:get",
            "certificates.k8s.io/certificatesigningrequests:create",
            "certificates.k8s.io/certificatesigningrequests:get",
        ])
    );
}

#[test]
fn every_command_line_is_accepted_by_its_binary() {
    let workloads = workloads(&documents());
    assert_eq!(workloads.len(), 2);
    for w in &workloads {
        match accepted(w) {
            Accepted::Controller(_) => {}
            Accepted::Agent(agent) => {
                let file = &w.source;
                let service = agent
                    .controller_service()
                    .unwrap_or_else(|| panic!("{file}: no --controller-service"));
                assert_eq!(
                    service.server_name.as_deref(),
                    Some("kubenft-controller.kubenft-system.svc"),
                    "{file}: the name the controllers' certificate carries"
                );
                assert!(agent.cert_dir().is_some(), "{file}: no --cert-dir");
            }
        }
    }
}

#[test]
fn every_file_a_flag_names_is_on_a_volume() {
    for w in workloads(&documents()) {
        check_paths(&w);
    }
}

#[test]
fn probes_point_at_the_ports_the_binaries_serve() {
    for w in workloads(&documents()) {
        check_probes(&w);
    }
}

#[test]
fn the_dockerfile_ships_both_binaries_and_the_tools() {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    for want in [
        "FROM rust:1.95",
        "FROM debian:12-slim",
        "nftables",
        "conntrack",
        "/usr/local/bin/kubenft-controller",
        "/usr/local/bin/kubenft-agent",
    ] {
        assert!(text.contains(want), "Dockerfile lacks {want}");
    }
}

/// The controllers run as an ordinary Deployment (no host network, no pinned nodes, a
/// PodDisruptionBudget), and what the agents look for exists: the Service they name, with the
/// port they dial, selecting the controllers' pods, and the name they check is in the
/// controllers' serving certificate.
#[test]
fn agents_find_the_controllers_an_ordinary_deployment_through_their_service() {
    let docs = documents();
    assert!(docs.iter().any(|(_, d)| d["kind"] == "PodDisruptionBudget"));
    kube_objects::check_agents_find_the_controllers(&docs);
}
