//! Checks of rendered Kubernetes objects, shared by the tests of the kustomize base
//! (`manifests.rs`) and of the Helm chart (`chart.rs`): every object must deserialize into its
//! k8s-openapi type without losing a field (a misspelled field is dropped by serde, so the
//! round trip catches it), and every container's command line (with `$(VAR)` references
//! substituted) must be accepted by the binary it runs, name only files its volumes provide,
//! and serve the ports its probes use.

// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount, Volume,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;

/// One object and where it came from (a file name, or the command that rendered it).
pub type Doc = (String, Value);

/// The documents of a multi-document YAML text, empty ones left out.
pub fn parse_yaml(source: &str, text: &str) -> Vec<Doc> {
    let values: Vec<Value> = yaml_serde::Deserializer::from_str(text)
        .map(Value::deserialize)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{source}: not valid YAML: {e}"));
    values
        .into_iter()
        .filter(|v| !v.is_null())
        .map(|v| (source.to_owned(), v))
        .collect()
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
pub fn typed<T: DeserializeOwned + Serialize>(source: &str, doc: &Value) -> T {
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{source} {name}: does not match the schema: {e}"));
    let mut missing = Vec::new();
    lost(doc, &serde_json::to_value(&t).unwrap(), "", &mut missing);
    assert!(
        missing.is_empty(),
        "{source} {name}: unknown or misspelled fields: {missing:?}"
    );
    t
}

/// Checks one object against its kind's schema; returns the kind.
pub fn check_schema(source: &str, doc: &Value) -> String {
    let api = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    match (api, kind) {
        ("v1", "Namespace") => drop(typed::<Namespace>(source, doc)),
        ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(source, doc)),
        ("v1", "ConfigMap") => drop(typed::<ConfigMap>(source, doc)),
        ("v1", "Service") => drop(typed::<Service>(source, doc)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(typed::<ClusterRole>(source, doc)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            drop(typed::<ClusterRoleBinding>(source, doc))
        }
        ("rbac.authorization.k8s.io/v1", "Role") => drop(typed::<Role>(source, doc)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(typed::<RoleBinding>(source, doc)),
        ("apps/v1", "Deployment") => drop(typed::<Deployment>(source, doc)),
        ("policy/v1", "PodDisruptionBudget") => drop(typed::<PodDisruptionBudget>(source, doc)),
        ("apps/v1", "DaemonSet") => drop(typed::<DaemonSet>(source, doc)),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => check_service_monitor(source, doc),
        _ => panic!("{source}: unexpected {api} {kind}"),
    }
    kind.to_owned()
}

/// Every object checked against its kind's schema; the kinds seen, counted.
pub fn check_schemas(docs: &[Doc]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for (source, doc) in docs {
        *kinds.entry(check_schema(source, doc)).or_insert(0) += 1;
    }
    kinds
}

/// The Prometheus Operator's ServiceMonitor has no k8s-openapi type: its shape is checked
/// by hand, field names included, for the subset kubenft renders.
fn check_service_monitor(source: &str, doc: &Value) {
    let keys = |v: &Value, at: &str| -> BTreeSet<String> {
        v.as_object()
            .unwrap_or_else(|| panic!("{source}: ServiceMonitor {at} is not an object"))
            .keys()
            .cloned()
            .collect()
    };
    let only = |v: &Value, at: &str, allowed: &[&str]| {
        let unknown: Vec<_> = keys(v, at)
            .into_iter()
            .filter(|k| !allowed.contains(&k.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{source}: ServiceMonitor {at}: unknown fields {unknown:?}"
        );
    };
    only(doc, "", &["apiVersion", "kind", "metadata", "spec"]);
    only(
        &doc["metadata"],
        "metadata",
        &["name", "namespace", "labels"],
    );
    assert!(doc["metadata"]["name"].is_string() && doc["metadata"]["namespace"].is_string());
    let spec = &doc["spec"];
    only(
        spec,
        "spec",
        &["selector", "namespaceSelector", "endpoints", "jobLabel"],
    );
    only(&spec["selector"], "spec.selector", &["matchLabels"]);
    only(
        &spec["namespaceSelector"],
        "spec.namespaceSelector",
        &["matchNames"],
    );
    let endpoints = spec["endpoints"]
        .as_array()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| panic!("{source}: ServiceMonitor without endpoints"));
    for e in endpoints {
        only(
            e,
            "spec.endpoints[]",
            &["port", "path", "scheme", "interval", "scrapeTimeout"],
        );
        assert!(
            e["port"].is_string(),
            "{source}: an endpoint names its port"
        );
    }
}

/// One container of a Deployment or DaemonSet, its pod, and its args with `$(VAR)` expanded.
pub struct Workload {
    pub source: String,
    pub pod: PodSpec,
    pub container: Container,
    pub args: Vec<String>,
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
                    .unwrap_or_else(|| panic!("ConfigMap {}/{} is not rendered", c.name, c.key))
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
pub fn workloads(docs: &[Doc]) -> Vec<Workload> {
    let mut config_maps = BTreeMap::new();
    for (_, d) in docs.iter().filter(|(_, d)| d["kind"] == "ConfigMap") {
        let cm: ConfigMap = serde_json::from_value(d.clone()).unwrap();
        config_maps.insert(
            cm.metadata.name.unwrap(),
            cm.data.unwrap_or_default().into_iter().collect(),
        );
    }
    let mut out = Vec::new();
    for (source, d) in docs {
        let spec = match d["kind"].as_str() {
            Some("Deployment") => typed::<Deployment>(source, d).spec.unwrap().template.spec,
            Some("DaemonSet") => typed::<DaemonSet>(source, d).spec.unwrap().template.spec,
            _ => continue,
        };
        let pod = spec.unwrap();
        assert_eq!(pod.containers.len(), 1, "{source}");
        let container = pod.containers[0].clone();
        let env = env_values(&container, &config_maps);
        let args = container
            .args
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|a| expand(a, &env))
            .collect();
        out.push(Workload {
            source: source.clone(),
            pod,
            container,
            args,
        });
    }
    out
}

/// The file name of the container's one command.
pub fn binary(c: &Container) -> String {
    let command = c.command.clone().expect("an explicit command");
    assert_eq!(command.len(), 1);
    Path::new(&command[0])
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// A command line the real binary accepted, parsed for further checks.
pub enum Accepted {
    Controller(Box<kubenft_controller::cli::Args>),
    Agent(Box<kubenft_agent::cli::Args>),
}

/// Runs `kubenft-controller ARGS --check-config`, or parses the agent's args with its own
/// parser and TLS rules; either must accept them, and with TLS (never `--insecure`).
pub fn accepted(w: &Workload) -> Accepted {
    use clap::Parser;
    let Workload { source, args, .. } = w;
    assert!(
        !args.iter().any(|a| a == "--insecure"),
        "{source}: --insecure in {args:?}"
    );
    match binary(&w.container).as_str() {
        "kubenft-controller" => {
            let out = std::process::Command::new(
                kubenft_lab::process::find_binary("kubenft-controller")
                    .expect("cargo build --bins first"),
            )
            .args(args)
            .arg("--check-config")
            .output()
            .unwrap();
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "OK",
                "{source}: {args:?} refused: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let parsed = kubenft_controller::cli::Args::try_parse_from(
                std::iter::once("kubenft-controller".to_owned()).chain(args.iter().cloned()),
            )
            .unwrap();
            assert!(
                matches!(parsed.tls(), Ok(Some(_))),
                "{source}: the controller serves without TLS"
            );
            Accepted::Controller(Box::new(parsed))
        }
        "kubenft-agent" => {
            let parsed = kubenft_agent::cli::Args::try_parse_from(
                std::iter::once("kubenft-agent".to_owned()).chain(args.iter().cloned()),
            )
            .unwrap_or_else(|e| panic!("{source}: {args:?} refused: {e}"));
            let tls = parsed
                .tls()
                .unwrap_or_else(|e| panic!("{source}: {args:?} refused: {e}"));
            assert!(tls.is_some(), "{source}: the agent runs without TLS");
            Accepted::Agent(Box::new(parsed))
        }
        other => panic!("{source}: unknown binary {other}"),
    }
}

/// The workload running `name`.
pub fn workload<'a>(workloads: &'a [Workload], name: &str) -> &'a Workload {
    workloads
        .iter()
        .find(|w| binary(&w.container) == name)
        .unwrap_or_else(|| panic!("no workload runs {name}"))
}

/// The value of `--flag=VALUE` (the manifests always use that form), if given.
pub fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    let mut values = args.iter().filter_map(|a| a.strip_prefix(&prefix));
    assert!(
        !args.iter().any(|a| a == name),
        "{name} without =VALUE in {args:?}"
    );
    values.next()
}

pub fn check_probes(w: &Workload) {
    let c = &w.container;
    for probe in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
        .into_iter()
        .flatten()
    {
        let get = probe.http_get.as_ref().expect("HTTP probes");
        let port = match &get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
            other => panic!("{}: named probe port {other:?}", w.source),
        };
        let served = w
            .args
            .iter()
            .any(|a| a.ends_with(&format!("-listen=0.0.0.0:{port}")));
        assert!(
            served,
            "{}: probe on {port} but args {:?}",
            w.source, w.args
        );
    }
}

/// Flags that name a file the binary reads.
const FILE_FLAGS: &[&str] = &[
    "--tls-cert-file",
    "--tls-private-key-file",
    "--client-ca-file",
    "--controller-ca-file",
];
/// Flags that name a directory the binary writes.
const DIR_FLAGS: &[&str] = &["--state-dir", "--cert-dir", "--serving-cert-dir"];

/// Where a path in the container comes from: the volume mounted at or above it, and the
/// path below the mount.
fn mounted<'a>(w: &'a Workload, path: &str) -> (&'a Volume, String, bool) {
    let mounts = w.container.volume_mounts.clone().unwrap_or_default();
    let mount = mounts
        .iter()
        .filter(|m| path == m.mount_path || path.starts_with(&format!("{}/", m.mount_path)))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| {
            panic!(
                "{}: {path} is on no volume (the root filesystem is read-only)",
                w.source
            )
        });
    let volume = w
        .pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{}: no volume {}", w.source, mount.name));
    let below = path[mount.mount_path.len()..]
        .trim_start_matches('/')
        .to_owned();
    (volume, below, mount.read_only == Some(true))
}

/// What provides a file in the container, e.g. `secret x key tls.crt`, `configMap x key
/// ca.crt` or `hostPath /etc/x/tls.crt`; panics if no volume provides it.
pub fn file_source(w: &Workload, path: &str) -> String {
    let (volume, below, _) = mounted(w, path);
    let key = |items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>| match items {
        None => below.clone(),
        Some(items) => items
            .iter()
            .find(|i| i.path == below)
            .unwrap_or_else(|| panic!("{}: volume {} lacks {below}", w.source, volume.name))
            .key
            .clone(),
    };
    if let Some(s) = &volume.secret {
        format!(
            "secret {} key {}",
            s.secret_name.clone().unwrap_or_default(),
            key(&s.items)
        )
    } else if let Some(c) = &volume.config_map {
        format!("configMap {} key {}", c.name, key(&c.items))
    } else if let Some(h) = &volume.host_path {
        format!("hostPath {}/{below}", h.path.trim_end_matches('/'))
    } else if volume.empty_dir.is_some() {
        format!("emptyDir {}", volume.name)
    } else {
        panic!("{}: unexpected volume {}", w.source, volume.name)
    }
}

/// Every file a flag names is provided by a volume, and every directory the binary writes is
/// a writable one.
pub fn check_paths(w: &Workload) {
    for name in FILE_FLAGS {
        if let Some(path) = flag(&w.args, name) {
            file_source(w, path);
        }
    }
    for name in DIR_FLAGS {
        if let Some(path) = flag(&w.args, name) {
            let (volume, _, read_only) = mounted(w, path);
            let writable = volume.host_path.is_some() || volume.empty_dir.is_some();
            assert!(
                writable && !read_only,
                "{}: {name}={path} is not on a writable volume",
                w.source
            );
        }
    }
}

/// The controllers run as an ordinary Deployment (no host network, no pinned nodes), and
/// what the agents look for exists: the Service they name, headless, with the port they
/// dial, selecting the controllers' pods; with the controllers' signer, the name they check
/// is in the controllers' serving certificate.
pub fn check_agents_find_the_controllers(docs: &[Doc]) {
    let workloads = workloads(docs);
    let controller = workload(&workloads, "kubenft-controller");
    let spec = &controller.pod;
    assert_ne!(
        spec.host_network,
        Some(true),
        "{}: host network",
        controller.source
    );
    assert_eq!(
        spec.node_selector.clone().unwrap_or_default(),
        BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]),
        "{}: pinned to some nodes",
        controller.source
    );
    assert!(
        controller
            .container
            .ports
            .iter()
            .flatten()
            .all(|p| p.host_port.is_none()),
        "{}: hostPort",
        controller.source
    );
    let (_, deployment) = docs
        .iter()
        .find(|(_, d)| d["kind"] == "Deployment")
        .unwrap();
    let labels: BTreeMap<String, String> =
        serde_json::from_value(deployment["spec"]["template"]["metadata"]["labels"].clone())
            .unwrap();

    let Accepted::Agent(agent) = accepted(workload(&workloads, "kubenft-agent")) else {
        unreachable!()
    };
    let wanted = agent.controller_service().expect("--controller-service");
    let (ssource, sdoc) = docs
        .iter()
        .find(|(_, d)| {
            d["kind"] == "Service"
                && d["metadata"]["name"] == wanted.name.as_str()
                && d["metadata"]["namespace"] == wanted.namespace.as_str()
        })
        .unwrap_or_else(|| panic!("no Service {}/{} rendered", wanted.namespace, wanted.name));
    let service: Service = typed(ssource, sdoc);
    let sspec = service.spec.unwrap();
    assert_eq!(
        sspec.cluster_ip.as_deref(),
        Some("None"),
        "{ssource}: headless"
    );
    assert!(
        sspec
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some(wanted.port_name.as_str())),
        "{ssource}: no port {}",
        wanted.port_name
    );
    for (k, v) in sspec.selector.unwrap_or_default() {
        assert_eq!(labels.get(&k), Some(&v), "{ssource}: selector {k}={v}");
    }
    let Accepted::Controller(controller) = accepted(controller) else {
        unreachable!()
    };
    if let Some(signer) = controller.signer() {
        let serving = signer.serving.expect("--serving-cert-dir with the signer");
        assert!(
            serving
                .dns_names
                .contains(wanted.server_name.as_ref().unwrap()),
            "the serving certificate's names {:?} lack {:?}",
            serving.dns_names,
            wanted.server_name
        );
    }
}

/// Every permission a role grants, as `group/resource[/name]:verb`.
pub fn grants(docs: &[Doc], kind: &str, name: &str) -> BTreeSet<String> {
    let (source, doc) = docs
        .iter()
        .find(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"));
    let rules = match kind {
        "ClusterRole" => typed::<ClusterRole>(source, doc).rules,
        "Role" => typed::<Role>(source, doc).rules,
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

/// Whether an object of this kind and name (and namespace, if given) is rendered.
fn rendered(docs: &[Doc], kind: &str, namespace: Option<&str>, name: &str) -> bool {
    docs.iter().any(|(_, d)| {
        d["kind"] == kind
            && d["metadata"]["name"] == name
            && namespace.is_none_or(|ns| d["metadata"]["namespace"] == ns)
    })
}

/// Every binding's role and ServiceAccounts, and every workload's ServiceAccount, are
/// rendered too.
pub fn check_references(docs: &[Doc]) {
    for (source, d) in docs {
        let kind = d["kind"].as_str().unwrap_or("");
        let namespace = d["metadata"]["namespace"].as_str();
        if kind == "RoleBinding" || kind == "ClusterRoleBinding" {
            let role_kind = d["roleRef"]["kind"].as_str().unwrap();
            let role_namespace = if role_kind == "Role" { namespace } else { None };
            let role = d["roleRef"]["name"].as_str().unwrap();
            assert!(
                rendered(docs, role_kind, role_namespace, role),
                "{source}: {kind} {} binds {role_kind} {role}, which is not rendered",
                d["metadata"]["name"]
            );
            for s in d["subjects"].as_array().into_iter().flatten() {
                assert_eq!(s["kind"], "ServiceAccount", "{source}");
                let (ns, name) = (s["namespace"].as_str(), s["name"].as_str().unwrap());
                assert!(
                    rendered(docs, "ServiceAccount", ns, name),
                    "{source}: ServiceAccount {ns:?}/{name} is not rendered"
                );
            }
        }
        if kind == "Deployment" || kind == "DaemonSet" {
            let sa = d["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .unwrap();
            assert!(
                rendered(docs, "ServiceAccount", namespace, sa),
                "{source}: ServiceAccount {sa} is not rendered"
            );
        }
    }
}

/// Everything above, for one rendered set of objects: schemas, references, both command
/// lines accepted by their binaries, files on volumes, probes on served ports, the agents'
/// way to the controllers.
pub fn check_all(docs: &[Doc]) {
    check_schemas(docs);
    check_references(docs);
    let workloads = workloads(docs);
    assert_eq!(
        workloads.len(),
        2,
        "a controller Deployment and an agent DaemonSet"
    );
    for w in &workloads {
        accepted(w);
        check_paths(w);
        check_probes(w);
    }
    check_agents_find_the_controllers(docs);
}
