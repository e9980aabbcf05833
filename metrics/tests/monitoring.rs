//! The shipped dashboard and alerts use only metrics the binaries serve: every metric name in
//! their PromQL is in `deploy/monitoring/metrics.txt` (which `tests/tests/e2e_metrics.rs`
//! checks against the real `/metrics`), and every label they group or match by is one of
//! those metrics' labels (or a target label Prometheus adds).

use std::collections::BTreeSet;
use std::path::PathBuf;

use kubenft_metrics::exposition::{Expected, parse_list};

fn monitoring(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/monitoring")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn listed() -> Vec<Expected> {
    parse_list(&monitoring("metrics.txt")).unwrap()
}

const METRIC_PREFIXES: [&str; 4] = ["kubeproxy_", "kubenft_", "process_", "kubernetes_"];
/// Labels Prometheus adds to every series of a target, and the histogram's.
const TARGET_LABELS: [&str; 3] = ["instance", "job", "le"];

/// The identifiers of a PromQL expression outside string literals, with the character that
/// follows each (skipping spaces).
fn identifiers(expr: &str) -> Vec<(String, Option<char>)> {
    let mut out = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let next = chars[i..].iter().copied().find(|c| !c.is_whitespace());
            out.push((chars[start..i].iter().collect(), next));
        } else if c.is_ascii_digit() {
            // A number or a duration (`5m`): not an identifier.
            while i < chars.len() && chars[i].is_ascii_alphanumeric() {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The label names an expression matches on (`name=`, `name=~`, `name!=`) or groups by
/// (`by (a, b)`, `without (a)`).
fn label_names(expr: &str) -> BTreeSet<String> {
    let ids = identifiers(expr);
    let mut out = BTreeSet::new();
    for (id, next) in &ids {
        if matches!(next, Some('=') | Some('!')) {
            out.insert(id.clone());
        }
    }
    let mut grouping = false;
    for (id, next) in &ids {
        if id == "by" || id == "without" {
            grouping = true;
            continue;
        }
        if grouping {
            out.insert(id.clone());
            if *next != Some(',') {
                grouping = false;
            }
        }
    }
    out
}

/// Checks an expression: returns the listed metrics it uses (at least one), or what is wrong.
fn check(expr: &str, list: &[Expected]) -> Result<Vec<String>, String> {
    let mut used: Vec<&Expected> = Vec::new();
    for (id, _) in identifiers(expr) {
        if !METRIC_PREFIXES.iter().any(|p| id.starts_with(p)) {
            continue;
        }
        let e = list
            .iter()
            .find(|e| e.series_names().contains(&id))
            .ok_or_else(|| format!("{id} is not in deploy/monitoring/metrics.txt: {expr}"))?;
        used.push(e);
    }
    if used.is_empty() {
        return Err(format!("no kubenft metric used: {expr}"));
    }
    let known: BTreeSet<&str> = used
        .iter()
        .flat_map(|e| e.labels.iter().map(String::as_str))
        .chain(TARGET_LABELS)
        .collect();
    for label in label_names(expr) {
        if !known.contains(label.as_str()) {
            return Err(format!("label {label:?} is not one of {known:?}: {expr}"));
        }
    }
    Ok(used.iter().map(|e| e.name.clone()).collect())
}

#[test]
fn the_checker_finds_unknown_metrics_and_labels() {
    let list = listed();
    assert_eq!(
        check(
            r#"sum by (le, ip_family) (rate(kubeproxy_sync_proxy_rules_duration_seconds_bucket{instance=~"a"}[5m]))"#,
            &list
        ),
        Ok(vec![
            "kubeproxy_sync_proxy_rules_duration_seconds".to_owned()
        ])
    );
    assert!(
        check(
            "rate(kubeproxy_sync_proxy_rules_latency_microseconds_bucket[5m])",
            &list
        )
        .unwrap_err()
        .contains("not in")
    );
    assert!(
        check(
            "sum by (node) (kubeproxy_sync_proxy_rules_endpoint_changes_total)",
            &list
        )
        .unwrap_err()
        .contains("\"node\"")
    );
    assert!(
        check(r#"kubenft_agent_dataplane_state{phase="x"}"#, &list)
            .unwrap_err()
            .contains("\"phase\"")
    );
    assert!(
        check("time()", &list)
            .unwrap_err()
            .contains("no kubenft metric")
    );
}

#[test]
fn every_alert_uses_listed_metrics_and_labels() {
    let list = listed();
    let rules: yaml_serde::Value =
        yaml_serde::from_str(&monitoring("prometheus-rules.yaml")).unwrap();
    assert_eq!(rules["kind"].as_str(), Some("PrometheusRule"));
    let mut alerts = BTreeSet::new();
    for group in rules["spec"]["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("expr");
            check(expr, &list).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                rule["labels"]["severity"].as_str().is_some(),
                "{name}: no severity"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: no summary"
            );
            alerts.insert(name.to_owned());
        }
    }
    for wanted in [
        "KubenftSyncFailures",
        "KubenftNetworkProgrammingLatencyHigh",
        "KubenftAgentNotAcknowledging",
        "KubenftAgentNacks",
        "KubenftDriftRepairs",
    ] {
        assert!(alerts.contains(wanted), "{wanted} missing: {alerts:?}");
    }
}

/// Every `expr` and variable query under `value`.
fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_parses_and_uses_listed_metrics_and_labels() {
    let list = listed();
    let dashboard: serde_json::Value =
        serde_json::from_str(&monitoring("grafana-dashboard.json")).unwrap();
    assert_eq!(dashboard["uid"], "kubenft");
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    let mut used = BTreeSet::new();
    for q in &all {
        // `label_values(metric, label)`: the label must be the metric's.
        let q = match q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            Some(args) => {
                let (metric, label) = args.split_once(',').expect("label_values(metric, label)");
                format!("sum by ({}) ({metric})", label.trim())
            }
            None => q.clone(),
        };
        used.extend(check(&q, &list).unwrap_or_else(|e| panic!("{e}")));
    }
    // The kube-proxy histograms operators look at first are all on it.
    for wanted in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubenft_controller_node_ack_lag_seconds",
        "kubenft_controller_node_push_bytes",
        "kubenft_controller_node_nacks_total",
    ] {
        assert!(used.contains(wanted), "{wanted} not on the dashboard");
    }
}
