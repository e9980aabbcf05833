//! `deploy/` is checked here so that a manifest cannot silently drift from the schemas or the
//! binaries: every document must deserialize into its k8s-openapi type without losing a field
//! (a misspelled field is dropped by serde, so the round trip catches it), kustomization.yaml
//! must list every manifest, and every container's command line (with `$(VAR)` references
//! substituted) must be accepted by the binary it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
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

fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for file in manifest_files() {
        let text = std::fs::read_to_string(deploy_dir().join(&file)).unwrap();
        let values: Vec<Value> = yaml_serde::Deserializer::from_str(&text)
            .map(Value::deserialize)
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{file}: not valid YAML: {e}"));
        docs.extend(
            values
                .into_iter()
                .filter(|v| !v.is_null())
                .map(|v| (file.clone(), v)),
        );
    }
    docs
}

/// Paths present in `original` but missing or different in `round_trip`.
fn lost(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

/// Deserializes into `T` and checks that nothing was dropped on the way.
fn typed<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file} {name}: does not match the schema: {e}"));
    let mut missing = Vec::new();
    lost(doc, &serde_json::to_value(&t).unwrap(), "", &mut missing);
    assert!(
        missing.is_empty(),
        "{file} {name}: unknown or misspelled fields: {missing:?}"
    );
    t
}

/// Every document, checked against its kind's schema; returns the kinds seen.
fn check_schemas() -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for (file, doc) in documents() {
        let api = doc["apiVersion"].as_str().unwrap_or("").to_owned();
        let kind = doc["kind"].as_str().unwrap_or("").to_owned();
        match (api.as_str(), kind.as_str()) {
            ("v1", "Namespace") => drop(typed::<Namespace>(&file, &doc)),
            ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(&file, &doc)),
            ("v1", "ConfigMap") => drop(typed::<ConfigMap>(&file, &doc)),
            ("v1", "Service") => drop(typed::<Service>(&file, &doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                drop(typed::<ClusterRole>(&file, &doc))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                drop(typed::<ClusterRoleBinding>(&file, &doc))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => drop(typed::<Role>(&file, &doc)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                drop(typed::<RoleBinding>(&file, &doc))
            }
            ("apps/v1", "Deployment") => drop(typed::<Deployment>(&file, &doc)),
            ("policy/v1", "PodDisruptionBudget") => drop(typed::<PodDisruptionBudget>(&file, &doc)),
            ("apps/v1", "DaemonSet") => drop(typed::<DaemonSet>(&file, &doc)),
            _ => panic!("{file}: unexpected {api} {kind}"),
        }
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

#[test]
fn every_document_matches_its_schema() {
    let kinds = check_schemas();
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

/// Every permission a role grants, as `group/resource[/name]:verb`.
fn grants(kind: &str, name: &str) -> BTreeSet<String> {
    let (file, doc) = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"));
    let rules = match kind {
        "ClusterRole" => typed::<ClusterRole>(&file, &doc).rules,
        "Role" => typed::<Role>(&file, &doc).rules,
        other => panic!("{other}"),
    };
    let mut granted = BTreeSet::new();
    for rule in rules.unwrap_or_default() {
        let names = rule.resource_names.clone().unwrap_or_default();
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    if names.is_empty() {
                        granted.insert(format!("{group}/{resource}:{verb}"));
                    }
                    for n in &names {
                        granted.insert(format!("{group}/{resource}/{n}:{verb}"));
                    }
                }
            }
        }
    }
    granted
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

/// Plausible values for what the downward API and ConfigMaps would provide.
fn env_values(
    container: &Container,
    config_maps: &BTreeMap<String, BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container.env.clone().unwrap_or_default() {
        let value = if let Some(v) = var.value {
            v
        } else {
            let from = var.value_from.expect("value or valueFrom");
            if let Some(f) = from.field_ref {
                match f.field_path.as_str() {
                    "spec.nodeName" => "node-a".into(),
                    "status.hostIP" | "status.podIP" => "192.168.50.2".into(),
                    other => panic!("unexpected fieldRef {other}"),
                }
            } else if let Some(c) = from.config_map_key_ref {
                config_maps
                    .get(&c.name)
                    .and_then(|m| m.get(&c.key))
                    .unwrap_or_else(|| panic!("ConfigMap {}/{} not in deploy/", c.name, c.key))
                    .clone()
            } else {
                panic!("unsupported valueFrom for {}", var.name)
            }
        };
        env.insert(var.name, value);
    }
    env
}

/// `$(VAR)` → its value, as the kubelet expands container args.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    assert!(!out.contains("$("), "unresolved reference in {arg:?}");
    out
}

/// Each workload's single container with its args expanded.
fn workloads() -> Vec<(String, Container, Vec<String>)> {
    let docs = documents();
    let mut config_maps = BTreeMap::new();
    for (_, d) in docs.iter().filter(|(_, d)| d["kind"] == "ConfigMap") {
        let cm: ConfigMap = serde_json::from_value(d.clone()).unwrap();
        config_maps.insert(
            cm.metadata.name.unwrap(),
            cm.data.unwrap_or_default().into_iter().collect(),
        );
    }
    let mut out = Vec::new();
    for (file, d) in &docs {
        let spec = match d["kind"].as_str() {
            Some("Deployment") => typed::<Deployment>(file, d).spec.unwrap().template.spec,
            Some("DaemonSet") => typed::<DaemonSet>(file, d).spec.unwrap().template.spec,
            _ => continue,
        };
        let containers = spec.unwrap().containers;
        assert_eq!(containers.len(), 1, "{file}");
        let c = containers.into_iter().next().unwrap();
        let env = env_values(&c, &config_maps);
        let args = c
            .args
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|a| expand(a, &env))
            .collect();
        out.push((file.clone(), c, args));
    }
    out
}

fn binary(c: &Container) -> String {
    let command = c.command.clone().expect("an explicit command");
    assert_eq!(command.len(), 1);
    Path::new(&command[0])
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn every_command_line_is_accepted_by_its_binary() {
    let workloads = workloads();
    assert_eq!(workloads.len(), 2);
    for (file, c, args) in workloads {
        // Secure by default: no manifest runs plaintext.
        assert!(
            !args.iter().any(|a| a == "--insecure"),
            "{file}: --insecure in {args:?}"
        );
        match binary(&c).as_str() {
            "kubenft-controller" => {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubenft-controller"))
                    .args(&args)
                    .arg("--check-config")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "OK",
                    "{file}: {args:?} refused: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            "kubenft-agent" => {
                use clap::Parser;
                let parsed = kubenft_agent::cli::Args::try_parse_from(
                    std::iter::once("kubenft-agent".to_owned()).chain(args.iter().cloned()),
                )
                .unwrap_or_else(|e| panic!("{file}: {args:?} refused: {e}"));
                let service = parsed
                    .controller_service()
                    .unwrap_or_else(|| panic!("{file}: no --controller-service"));
                assert_eq!(
                    service.server_name.as_deref(),
                    Some("kubenft-controller.kubenft-system.svc"),
                    "{file}: the name the controllers' certificate carries"
                );
                let tls = parsed
                    .tls()
                    .unwrap_or_else(|e| panic!("{file}: {args:?} refused: {e}"));
                assert!(tls.is_some(), "{file}: the agent runs without TLS");
                assert!(parsed.cert_dir().is_some(), "{file}: no --cert-dir");
            }
            other => panic!("{file}: unknown binary {other}"),
        }
    }
}

#[test]
fn probes_point_at_the_ports_the_binaries_serve() {
    for (file, c, args) in workloads() {
        for probe in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
        {
            let get = probe.http_get.as_ref().expect("HTTP probes");
            let port = match &get.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
                other => panic!("{file}: named probe port {other:?}"),
            };
            let served = args
                .iter()
                .any(|a| a.ends_with(&format!("-listen=0.0.0.0:{port}")));
            assert!(served, "{file}: probe on {port} but args {args:?}");
        }
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
    let (file, doc) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Deployment")
        .unwrap();
    let deployment: Deployment = typed(file, doc);
    let pod = deployment.spec.unwrap().template;
    let spec = pod.spec.unwrap();
    assert_ne!(spec.host_network, Some(true), "{file}: host network");
    assert_eq!(
        spec.node_selector.unwrap_or_default(),
        BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]),
        "{file}: pinned to some nodes"
    );
    assert!(
        spec.containers[0]
            .ports
            .iter()
            .flatten()
            .all(|p| p.host_port.is_none()),
        "{file}: hostPort"
    );
    let labels = pod.metadata.unwrap().labels.unwrap_or_default();
    assert!(docs.iter().any(|(_, d)| d["kind"] == "PodDisruptionBudget"));

    let workloads = workloads();
    let (_, _, agent_args) = workloads
        .iter()
        .find(|(_, c, _)| binary(c) == "kubenft-agent")
        .unwrap();
    let (_, _, controller_args) = workloads
        .iter()
        .find(|(_, c, _)| binary(c) == "kubenft-controller")
        .unwrap();
    use clap::Parser;
    let agent = kubenft_agent::cli::Args::try_parse_from(
        std::iter::once("kubenft-agent".to_owned()).chain(agent_args.iter().cloned()),
    )
    .unwrap();
    let wanted = agent.controller_service().unwrap();
    let (sfile, sdoc) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Service" && d["metadata"]["name"] == wanted.name.as_str())
        .unwrap_or_else(|| panic!("no Service {} in deploy/", wanted.name));
    let service: Service = typed(sfile, sdoc);
    let sspec = service.spec.unwrap();
    assert_eq!(
        sspec.cluster_ip.as_deref(),
        Some("None"),
        "{sfile}: headless"
    );
    assert!(
        sspec
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some(wanted.port_name.as_str())),
        "{sfile}: no port {}",
        wanted.port_name
    );
    for (k, v) in sspec.selector.unwrap_or_default() {
        assert_eq!(labels.get(&k), Some(&v), "{sfile}: selector {k}={v}");
    }
    let controller = kubenft_controller::cli::Args::try_parse_from(
        std::iter::once("kubenft-controller".to_owned()).chain(controller_args.iter().cloned()),
    )
    .unwrap();
    let serving = controller.signer().unwrap().serving.unwrap();
    assert!(
        serving
            .dns_names
            .contains(wanted.server_name.as_ref().unwrap()),
        "the serving certificate's names {:?} lack {:?}",
        serving.dns_names,
        wanted.server_name
    );
}
