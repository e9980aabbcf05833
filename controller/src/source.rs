//! Where Services, EndpointSlices and Nodes come from.
//!
//! Every source produces the same thing: the set of Kubernetes objects it currently sees, which
//! [`objects_to_inputs`] validates into the planner's [`Inputs`]. `dir:PATH` reads a directory of
//! YAML manifests and re-reads it whenever a file in it changes; `kube` ([`kube`]) watches the
//! API server.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize as _;
use serde_json::Value;
use tracing::warn;

pub mod dir;
pub mod kube;
mod nesting;
mod store;

pub use dir::run_dir;
pub use store::{Batch, Store};

use kubenft_plan::Inputs;
use kubenft_plan::model::{Limits, Rejection, clip};

/// A manifest file larger than this is refused whole (it cannot be a sane set of objects).
pub const MAX_FILE_BYTES: u64 = 32 * 1024 * 1024;

/// The Kubernetes objects a source currently sees, plus what could not even be parsed.
#[derive(Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub rejections: Vec<Rejection>,
}

/// Validates objects into planner inputs. Invalid objects become rejections; duplicates keep
/// the first one seen.
pub fn objects_to_inputs(objects: Objects, limits: &Limits) -> Inputs {
    let mut store = Store::default();
    store.set((), Batch::validate(&objects, limits));
    store.inputs()
}

/// Parses one manifest file's text (multi-document YAML, `kind: List` accepted). A file that
/// is not valid YAML becomes one file rejection.
pub fn parse_manifest(file: &str, text: &str, objects: &mut Objects) {
    match parse_file(file, text) {
        Ok(parsed) => {
            objects.services.extend(parsed.services);
            objects.slices.extend(parsed.slices);
            objects.nodes.extend(parsed.nodes);
            objects.rejections.extend(parsed.rejections);
        }
        Err(r) => objects.rejections.push(r),
    }
}

/// How deeply flow collections (`[`, `{`) may nest in a manifest. libyaml's scanner costs time
/// proportional to the nesting depth for every token, so 80,000 nested brackets took 23 s.
pub const MAX_NESTING: usize = 64;

/// Parses one manifest file's text; `Err` (a file rejection) if it is not valid YAML as a
/// whole, in which case none of its objects are taken.
pub fn parse_file(file: &str, text: &str) -> Result<Objects, Rejection> {
    let file_error = |message: String| Rejection {
        kind: "File",
        namespace: String::new(),
        name: file.to_owned(),
        field: String::new(),
        message,
    };
    if let Some(line) = nesting::exceeds(text, MAX_NESTING) {
        return Err(file_error(format!(
            "not valid YAML: nested more than {MAX_NESTING} levels deep at line {line}"
        )));
    }
    let docs: Vec<Value> = yaml_serde::Deserializer::from_str(text)
        .map(Value::deserialize)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(format!("not valid YAML: {}", clip_error(&e.to_string()))))?;
    let mut objects = Objects::default();
    for (i, doc) in docs.into_iter().enumerate() {
        add_document(file, i, doc, &mut objects);
    }
    Ok(objects)
}

fn clip_error(s: &str) -> String {
    // YAML errors quote the input; keep them readable.
    let first: String = s.lines().take(6).collect::<Vec<_>>().join(" | ");
    clip(&first)
}

fn add_document(file: &str, index: usize, doc: Value, objects: &mut Objects) {
    if doc.is_null() {
        return;
    }
    let api_version = doc
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    let reject = |kind: &'static str, message: String| Rejection {
        kind,
        namespace: namespace.clone(),
        name: name.clone(),
        field: String::new(),
        message: format!("{} document {index}: {message}", clip(file)),
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = match doc.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => Vec::new(),
            };
            for item in items {
                add_document(file, index, item, objects);
            }
        }
        ("v1", "Service") => match serde_json::from_value::<Service>(doc) {
            Ok(svc) => objects.services.push(svc),
            Err(e) => objects.rejections.push(reject(
                "Service",
                format!("malformed: {}", clip(&e.to_string())),
            )),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_json::from_value::<EndpointSlice>(doc) {
                Ok(s) => objects.slices.push(s),
                Err(e) => objects.rejections.push(reject(
                    "EndpointSlice",
                    format!("malformed: {}", clip(&e.to_string())),
                )),
            }
        }
        ("v1", "Node") => match serde_json::from_value::<Node>(doc) {
            Ok(n) => objects.nodes.push(n),
            Err(e) => objects.rejections.push(reject(
                "Node",
                format!("malformed: {}", clip(&e.to_string())),
            )),
        },
        _ => warn!(
            file = %clip(file),
            document = index,
            api_version = %clip(&api_version),
            kind = %clip(&kind),
            "ignoring object of a kind kubenft does not read"
        ),
    }
}

/// Whether a file name is one the directory source reads.
fn is_manifest_name(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Counts rejections by kind, for metrics.
pub fn rejections_by_kind(rejections: &[Rejection]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for r in rejections {
        *counts.entry(r.kind).or_insert(0) += 1;
    }
    counts
}

/// Manifests for the sources' unit tests.
#[cfg(test)]
pub(crate) mod test_manifest {
    /// A one-port ClusterIP Service in the default namespace.
    pub(crate) fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80}}]\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.10]
  conditions: {ready: true}
  nodeName: a
"#;

    fn inputs(text: &str) -> Inputs {
        let mut objects = Objects::default();
        parse_manifest("test.yaml", text, &mut objects);
        objects_to_inputs(objects, &Limits::default())
    }

    #[test]
    fn reads_multi_document_files_and_lists() {
        let i = inputs(GOOD);
        assert_eq!(i.services.len(), 1);
        assert_eq!(i.slices.len(), 1);
        assert!(i.rejections.is_empty(), "{:?}", i.rejections);
        let list = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"a"},"status":{"addresses":[{"type":"InternalIP","address":"192.168.50.11"}]}}]}"#;
        let i = inputs(list);
        assert_eq!(
            i.nodes["a"].internal_ips,
            vec!["192.168.50.11".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn bad_yaml_is_a_file_error_and_other_kinds_are_ignored() {
        let i = inputs("apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
        assert_eq!(i.rejections.len(), 1);
        assert_eq!(i.rejections[0].kind, "File");
        assert!(
            i.rejections[0].message.contains("not valid YAML"),
            "{}",
            i.rejections[0]
        );
        let i = inputs("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n");
        assert!(i.rejections.is_empty() && i.services.is_empty());
    }

    #[test]
    fn hostile_yaml_is_refused_as_a_file_error() {
        // An alias bomb (9 levels of 9 aliases: ~387 million nodes if expanded) and nesting
        // far past any real manifest.
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let prev = format!("*a{}", level - 1);
            let items = [prev.as_str(); 9].join(", ");
            bomb.push_str(&format!("a{level}: &a{level} [{items}]\n"));
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        for text in [bomb, deep] {
            let i = inputs(&text);
            assert_eq!(i.rejections.len(), 1, "{:?}", i.rejections);
            assert_eq!(i.rejections[0].kind, "File");
            assert!(i.rejections[0].message.contains("not valid YAML"));
        }
    }

    /// Deep nesting of either style is refused in linear time: flow collections by the
    /// pre-scan, block collections (which libyaml scans in linear time) by the deserializer's
    /// recursion limit.
    #[test]
    fn deep_nesting_is_refused_quickly() {
        let n = 40_000;
        let mut mapping = String::new();
        for i in 0..2_000 {
            mapping.push_str(&" ".repeat(i));
            mapping.push_str("a:\n");
        }
        for text in [
            format!("{}x\n", "- ".repeat(n)),
            format!("a: {}", "[{a: ".repeat(n)),
            mapping,
        ] {
            let started = std::time::Instant::now();
            let i = inputs(&text);
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{:?} for {}",
                started.elapsed(),
                &text[..40]
            );
            assert_eq!(i.rejections.len(), 1, "{:?}", i.rejections);
            assert_eq!(i.rejections[0].kind, "File");
        }
    }

    #[test]
    fn a_bad_service_leaves_the_others() {
        let bad = r#"
apiVersion: v1
kind: Service
metadata: {name: bad-np}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, nodePort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: bad-ip}
spec:
  clusterIP: 10.96.0.300
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: bad-port}
spec:
  clusterIP: 10.96.0.12
  ports: [{port: 70000}]
---
apiVersion: v1
kind: Service
metadata: {name: 5}
spec: {clusterIP: "x"}
"#;
        let i = inputs(&format!("{GOOD}\n---\n{bad}"));
        assert_eq!(i.services.len(), 1, "{:?}", i.rejections);
        let fields: Vec<(&str, &str)> = i
            .rejections
            .iter()
            .map(|r| (r.name.as_str(), r.field.as_str()))
            .collect();
        assert!(
            fields.contains(&("bad-np", "spec.ports[0].nodePort")),
            "{fields:?}"
        );
        assert!(fields.contains(&("bad-ip", "spec.clusterIP")), "{fields:?}");
        assert!(
            fields.contains(&("bad-port", "spec.ports[0].port")),
            "{fields:?}"
        );
        let np = i.rejections.iter().find(|r| r.name == "bad-np").unwrap();
        assert!(
            np.to_string()
                .contains("outside the node port range 30000-32767"),
            "{np}"
        );
    }

    #[test]
    fn hostile_names_are_refused_and_clipped() {
        let name = "a".repeat(100_000);
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
        );
        let i = inputs(&text);
        assert!(i.services.is_empty());
        assert_eq!(i.rejections[0].field, "metadata.name");
        assert!(i.rejections[0].to_string().len() < 400);
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: \"x; flush ruleset\"}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        assert_eq!(inputs(text).rejections[0].field, "metadata.name");
    }
}

#[cfg(test)]
mod annotation_tests {
    use super::*;

    #[test]
    fn trigger_times_and_node_deletion_are_read() {
        let text = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: "2026-11-22T04:00:00Z"}
addressType: IPv4
endpoints: []
---
apiVersion: v1
kind: Node
metadata: {name: a}
spec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}
---
apiVersion: v1
kind: Node
metadata: {name: b}
"#;
        let mut objects = Objects::default();
        parse_manifest("t.yaml", text, &mut objects);
        let inputs = objects_to_inputs(objects, &Limits::default());
        let slice = inputs.slices.values().next().unwrap();
        assert_eq!(slice.trigger_ms, Some(1_795_320_000_000));
        assert!(inputs.nodes["a"].deleting);
        assert!(!inputs.nodes["b"].deleting);
    }
}
