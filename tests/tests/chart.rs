//! The two install paths, as their real tools render them: `kubectl kustomize deploy/` and
//! `helm template` of `deploy/helm/kubenft` with several values sets. Every rendered object is
//! checked against the Kubernetes schemas and every command line against the binaries
//! (`kube_objects`), and the chart with only the API server's address given must render the
//! kustomize base's objects. `kubectl` and `helm` are installed by `scripts/setup.sh`; a
//! missing one fails these tests.

mod kube_objects;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use kube_objects::{
    Accepted, Doc, accepted, check_all, check_schemas, file_source, flag, workload, workloads,
};
use serde_json::Value;

/// The release namespace, the one deploy/ uses.
const NAMESPACE: &str = "kubenft-system";
/// The chart's one required value, set to the base's placeholder address.
const API_SERVER: (&str, &str) = ("apiServer.host", "192.168.50.2");

/// Labels only Helm's rendering carries (the chart's version, the tool, the release): the
/// only thing ignored when the chart is compared with the kustomize base.
const HELM_LABELS: [&str; 4] = [
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs one of the tools `scripts/setup.sh` installs, in the repository.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (scripts/setup.sh installs it; CI needs it)")
        })
}

fn kustomize() -> Vec<Doc> {
    let out = run("kubectl", &["kustomize", "deploy/"]);
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    kube_objects::parse_yaml(
        "kubectl kustomize deploy/",
        &String::from_utf8_lossy(&out.stdout),
    )
}

/// `helm template` of the chart in NAMESPACE with these `--set` values: the objects, or
/// what helm said.
fn helm_template(values: &[(&str, &str)]) -> Result<Vec<Doc>, String> {
    let sets: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut args = vec![
        "template",
        "kubenft",
        "deploy/helm/kubenft",
        "--namespace",
        NAMESPACE,
    ];
    for set in &sets {
        args.extend(["--set", set]);
    }
    let out = run("helm", &args);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let source = format!("helm template --set {}", sets.join(","));
    Ok(kube_objects::parse_yaml(
        &source,
        &String::from_utf8_lossy(&out.stdout),
    ))
}

fn render(values: &[(&str, &str)]) -> Vec<Doc> {
    helm_template(values).unwrap_or_else(|e| panic!("helm template {values:?}: {e}"))
}

/// The chart with the API server's address and these values.
fn render_with(values: &[(&'static str, &'static str)]) -> Vec<Doc> {
    let mut all = vec![API_SERVER];
    all.extend_from_slice(values);
    render(&all)
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn without_helm_labels(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Object(labels) if k == "labels" => Value::Object(
                            labels
                                .iter()
                                .filter(|(l, _)| !HELM_LABELS.contains(&l.as_str()))
                                .map(|(l, v)| (l.clone(), v.clone()))
                                .collect(),
                        ),
                        other => without_helm_labels(other),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_helm_labels).collect()),
        other => other.clone(),
    }
}

/// Each object by kind, namespace and name, Helm's labels removed.
fn by_identity(docs: &[Doc]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (source, d) in docs {
        let id = format!(
            "{} {}/{}",
            d["kind"].as_str().unwrap(),
            d["metadata"]["namespace"].as_str().unwrap_or(""),
            d["metadata"]["name"].as_str().unwrap()
        );
        let previous = out.insert(id.clone(), without_helm_labels(d));
        assert!(previous.is_none(), "{source}: {id} twice");
    }
    out
}

/// Paths at which two JSON values differ.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                differences(
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    &format!("{path}.{k}"),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                differences(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (x, y) if x == y => {}
        (x, y) => out.push(format!("{path}: {x} vs {y}")),
    }
}

fn assert_same_objects(base: &BTreeMap<String, Value>, chart: &BTreeMap<String, Value>) {
    let ids = |m: &BTreeMap<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(ids(base), ids(chart), "objects: kustomize base vs chart");
    for (id, object) in base {
        let mut diff = Vec::new();
        differences(object, &chart[id], "", &mut diff);
        assert!(diff.is_empty(), "{id}: kustomize base vs chart: {diff:#?}");
    }
}

#[test]
fn the_kustomize_base_renders_objects_the_schemas_and_binaries_accept() {
    let docs = kustomize();
    let kinds = check_schemas(&docs);
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "DaemonSet",
        "Service",
        "ConfigMap",
    ] {
        assert!(kinds.contains_key(kind), "no {kind} rendered: {kinds:?}");
    }
    check_all(&docs);
}

/// With only the API server's address (and the namespace deploy/ uses), the chart renders
/// the kustomize base's objects, field for field, but for Helm's own labels (HELM_LABELS)
/// and the Namespace: Helm creates the release's namespace itself (`--create-namespace`) and
/// will not adopt a Namespace the chart renders, so the chart renders it only with
/// `namespace.create=true` (for `helm template | kubectl apply`), and then the same one.
#[test]
fn the_default_chart_renders_the_kustomize_base() {
    let base = by_identity(&kustomize());
    let namespace_id = format!("Namespace /{NAMESPACE}");
    assert!(base.contains_key(&namespace_id));

    let chart = render(&[API_SERVER]);
    for (source, d) in &chart {
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm",
            "{source}: {} without Helm's labels",
            d["metadata"]["name"]
        );
    }
    let mut base_without_namespace = base.clone();
    base_without_namespace.remove(&namespace_id);
    assert_same_objects(&base_without_namespace, &by_identity(&chart));

    let with_namespace = render_with(&[("namespace.create", "true")]);
    assert_same_objects(&base, &by_identity(&with_namespace));
}

#[test]
fn the_default_chart_passes_helm_lint_and_every_check() {
    let set = format!("{}={}", API_SERVER.0, API_SERVER.1);
    let out = run(
        "helm",
        &["lint", "--strict", "deploy/helm/kubenft", "--set", &set],
    );
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = render(&[API_SERVER]);
    check_all(&docs);
    let workloads = workloads(&docs);
    let agent = workload(&workloads, "kubenft-agent");
    assert_eq!(
        file_source(agent, flag(&agent.args, "--controller-ca-file").unwrap()),
        "configMap kubenft-ca key ca.crt",
        "the signer publishes its CA in this ConfigMap"
    );
    let controller = workload(&workloads, "kubenft-controller");
    assert_eq!(
        flag(&controller.args, "--signer-ca-secret"),
        Some("kubenft-system/kubenft-ca")
    );
    assert_eq!(detect_local_args(&controller.args), Vec::<String>::new());
}

/// The controller's detect-local flags, in order.
fn detect_local_args(args: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| {
            [
                "--detect-local-mode",
                "--pod-bridge-interface",
                "--pod-interface-name-prefix",
            ]
            .iter()
            .any(|f| a.starts_with(&format!("{f}=")))
        })
        .cloned()
        .collect()
}

/// `--set` values, as NAME=VALUE pairs.
type Values = &'static [(&'static str, &'static str)];

/// Each detect-local mode but the default, with the values it needs, and the controller
/// flags it must render.
const DETECT_LOCAL: [(Values, &[&str]); 3] = [
    (
        &[
            ("detectLocal.mode", "InterfaceNamePrefix"),
            ("detectLocal.interfaceNamePrefix", "eni"),
        ],
        &[
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=eni",
        ],
    ),
    (
        &[
            ("detectLocal.mode", "BridgeInterface"),
            ("detectLocal.bridgeInterface", "cni0"),
        ],
        &[
            "--detect-local-mode=BridgeInterface",
            "--pod-bridge-interface=cni0",
        ],
    ),
    (
        &[("detectLocal.mode", "NodeCIDR")],
        &["--detect-local-mode=NodeCIDR"],
    ),
];

#[test]
fn detect_local_modes_render_their_controller_flags() {
    for (values, flags) in DETECT_LOCAL {
        let docs = render_with(values);
        check_schemas(&docs);
        kube_objects::check_references(&docs);
        let workloads = workloads(&docs);
        assert_eq!(
            detect_local_args(&workload(&workloads, "kubenft-controller").args),
            flags,
            "{values:?}"
        );
        // Nothing else changes: the agent's command line is the default one.
        let default = kube_objects::workloads(&render(&[API_SERVER]));
        assert_eq!(
            workload(&workloads, "kubenft-agent").args,
            workload(&default, "kubenft-agent").args
        );
        accepted(workload(&workloads, "kubenft-agent"));
    }
}

/// Every detect-local values set renders flags the real controller accepts.
#[test]
fn detect_local_modes_are_accepted_by_the_controller() {
    for (values, _) in DETECT_LOCAL {
        check_all(&render_with(values));
    }
}

#[test]
fn bring_your_own_certificates() {
    let docs = render_with(&[("tls.mode", "files")]);
    check_all(&docs);
    let workloads = workloads(&docs);
    let controller = workload(&workloads, "kubenft-controller");
    let source = |w, name| file_source(w, flag(&w.args, name).unwrap());
    assert_eq!(
        source(controller, "--tls-cert-file"),
        "secret kubenft-controller-tls key tls.crt"
    );
    assert_eq!(
        source(controller, "--tls-private-key-file"),
        "secret kubenft-controller-tls key tls.key"
    );
    assert_eq!(
        source(controller, "--client-ca-file"),
        "secret kubenft-controller-tls key ca.crt"
    );
    let agent = workload(&workloads, "kubenft-agent");
    // Each node's own certificate (CN system:node:<node>), so from the node, not a Secret
    // every node would share.
    assert_eq!(
        source(agent, "--tls-cert-file"),
        "hostPath /etc/kubenft/pki/tls.crt"
    );
    assert_eq!(
        source(agent, "--tls-private-key-file"),
        "hostPath /etc/kubenft/pki/tls.key"
    );
    assert_eq!(
        source(agent, "--controller-ca-file"),
        "secret kubenft-controller-ca key ca.crt"
    );
    let Accepted::Controller(c) = accepted(controller) else {
        unreachable!()
    };
    assert!(c.signer().is_none(), "no signer with your own certificates");
    let Accepted::Agent(a) = accepted(agent) else {
        unreachable!()
    };
    assert!(a.cert_dir().is_none());
    // Nothing is issued, so the signer's permissions are not granted.
    for (kind, name) in [
        ("ClusterRole", "kubenft-signer"),
        ("ClusterRoleBinding", "kubenft-signer"),
        ("Role", "kubenft-controller-ca"),
        ("RoleBinding", "kubenft-controller-ca"),
        ("ClusterRole", "kubenft-agent"),
        ("ClusterRoleBinding", "kubenft-agent"),
    ] {
        assert!(find(&docs, kind, name).is_none(), "{kind} {name} rendered");
    }
    assert_eq!(
        kube_objects::grants(&docs, "Role", "kubenft-agent").len(),
        2,
        "the agents still find the controllers through EndpointSlices"
    );

    let named = render_with(&[
        ("tls.mode", "files"),
        ("tls.files.controllerSecret", "my-serving"),
        ("tls.files.controllerCASecret", "my-ca"),
        ("tls.files.agentHostPath", "/opt/pki"),
    ]);
    check_all(&named);
    let workloads = kube_objects::workloads(&named);
    let controller = workload(&workloads, "kubenft-controller");
    let agent = workload(&workloads, "kubenft-agent");
    assert_eq!(
        source(controller, "--tls-cert-file"),
        "secret my-serving key tls.crt"
    );
    assert_eq!(
        source(agent, "--tls-cert-file"),
        "hostPath /opt/pki/tls.crt"
    );
    assert_eq!(
        source(agent, "--controller-ca-file"),
        "secret my-ca key ca.crt"
    );
}

#[test]
fn a_service_monitor_scrapes_the_controllers_metrics_port() {
    assert!(
        find(
            &render(&[API_SERVER]),
            "ServiceMonitor",
            "kubenft-controller"
        )
        .is_none(),
        "off by default"
    );
    let docs = render_with(&[
        ("serviceMonitor.enabled", "true"),
        ("serviceMonitor.interval", "30s"),
        ("serviceMonitor.labels.release", "prometheus"),
    ]);
    check_all(&docs);
    let monitor = find(&docs, "ServiceMonitor", "kubenft-controller").expect("rendered");
    assert_eq!(monitor["metadata"]["namespace"], NAMESPACE);
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let spec = &monitor["spec"];
    assert_eq!(
        spec["namespaceSelector"]["matchNames"],
        serde_json::json!([NAMESPACE])
    );

    // It selects the controllers' Service, and only that one.
    let selected: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == "Service")
        .filter(|d| {
            spec["selector"]["matchLabels"]
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| d["metadata"]["labels"][k] == *v)
        })
        .collect();
    assert_eq!(selected.len(), 1);
    let service = selected[0];
    assert_eq!(service["metadata"]["name"], "kubenft-controller");

    // Its endpoint's port is the Service's port whose target is the container port the
    // controller serves /metrics on (--http-listen).
    let endpoints = spec["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    let endpoint = &endpoints[0];
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "30s");
    let port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .expect("the Service has the monitor's port");
    let workloads = workloads(&docs);
    let controller = workload(&workloads, "kubenft-controller");
    let target = controller
        .container
        .ports
        .iter()
        .flatten()
        .find(|p| Some(port["targetPort"].as_str().unwrap()) == p.name.as_deref())
        .expect("the Service's target port is a container port");
    assert_eq!(
        flag(&controller.args, "--http-listen"),
        Some(format!("0.0.0.0:{}", target.container_port).as_str())
    );
    // The agents' metrics are on the node's loopback only (so values.yaml says they are not
    // scraped by it).
    assert_eq!(
        flag(
            &workload(&workloads, "kubenft-agent").args,
            "--metrics-listen"
        ),
        Some("127.0.0.1:10249")
    );
}

#[test]
fn controller_replicas_and_their_disruption_budget() {
    let docs = render_with(&[("controller.replicas", "3")]);
    check_all(&docs);
    let deployment = find(&docs, "Deployment", "kubenft-controller").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pdb = find(&docs, "PodDisruptionBudget", "kubenft-controller").expect("a PDB");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"], deployment["spec"]["selector"],
        "the PDB covers the controllers"
    );

    // One replica: a budget of one would block every drain, so none is rendered.
    let single = render_with(&[("controller.replicas", "1")]);
    check_all(&single);
    assert_eq!(
        find(&single, "Deployment", "kubenft-controller").unwrap()["spec"]["replicas"],
        1
    );
    assert!(find(&single, "PodDisruptionBudget", "kubenft-controller").is_none());
}

#[test]
fn image_and_resources_come_from_values() {
    let docs = render_with(&[
        ("image.repository", "registry.example/kubenft"),
        ("image.tag", "0.2.0"),
        ("controller.resources.limits.memory", "1Gi"),
        ("agent.resources.requests.cpu", "20m"),
    ]);
    check_all(&docs);
    let workloads = workloads(&docs);
    for w in &workloads {
        assert_eq!(
            w.container.image.as_deref(),
            Some("registry.example/kubenft:0.2.0")
        );
    }
    let limits =
        |name| serde_json::to_value(&workload(&workloads, name).container.resources).unwrap();
    assert_eq!(limits("kubenft-controller")["limits"]["memory"], "1Gi");
    assert_eq!(limits("kubenft-controller")["requests"]["cpu"], "100m");
    assert_eq!(limits("kubenft-agent")["requests"]["cpu"], "20m");
}

/// Wrong or missing values are refused at render time with a message naming the value.
#[test]
fn the_chart_refuses_bad_values() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "apiServer.host is required"),
        (&[API_SERVER, ("apiserver.port", "443")], "apiserver"),
        (&[API_SERVER, ("apiServer.port", "70000")], "apiServer.port"),
        (
            &[API_SERVER, ("detectLocal.mode", "LocalCIDR")],
            "detectLocal.mode",
        ),
        (
            &[API_SERVER, ("detectLocal.mode", "InterfaceNamePrefix")],
            "detectLocal.interfaceNamePrefix is required",
        ),
        (
            &[API_SERVER, ("detectLocal.mode", "BridgeInterface")],
            "detectLocal.bridgeInterface is required",
        ),
        (
            &[API_SERVER, ("detectLocal.interfaceNamePrefix", "eni")],
            "detectLocal.interfaceNamePrefix is used with detectLocal.mode=InterfaceNamePrefix only",
        ),
        (&[API_SERVER, ("tls.mode", "insecure")], "tls.mode"),
        (
            &[API_SERVER, ("controller.replicas", "0")],
            "controller.replicas",
        ),
        (&[API_SERVER, ("podCIDRs[0]", "10.244.0.0")], "podCIDRs"),
    ];
    for (values, message) in cases {
        let err = helm_template(values).err().unwrap_or_else(|| {
            panic!("helm template {values:?} rendered; expected a refusal naming {message:?}")
        });
        assert!(err.contains(message), "{values:?}: {err}");
    }
}

/// The chart's appVersion (its default image tag) and the kustomize base's image tag are the
/// crates' version.
#[test]
fn the_chart_base_and_crates_share_one_version() {
    let version = env!("CARGO_PKG_VERSION");
    let chart: Value = yaml_serde::from_str(
        &std::fs::read_to_string(repo().join("deploy/helm/kubenft/Chart.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(chart["appVersion"], version);
    let image = format!("kubenft:{version}");
    for docs in [kustomize(), render(&[API_SERVER])] {
        for w in workloads(&docs) {
            assert_eq!(
                w.container.image.as_deref(),
                Some(image.as_str()),
                "{}",
                w.source
            );
        }
    }
}
