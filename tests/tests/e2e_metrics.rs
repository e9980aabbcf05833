//! End to end through the real controller and agent: both `/metrics` serve every metric of
//! `deploy/monitoring/metrics.txt` (kube-proxy's names, types and label names, Kubernetes'
//! `kubernetes_build_info`, the `process_*` metrics, and what the shipped dashboard and alerts
//! use), and one dual-stack change is counted as kube-proxy counts it: one sync (one nft
//! transaction), one network programming observation per family (not one per Service port),
//! one endpoint change, and on the controller one push, one ACK lag observation.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use kubenft_lab::topology::{CONTROLLER_HTTP_PORT, CP_V4};
use kubenft_lab::{Cond, Host, Pod, Proto, Service, Slice, wait_until};
use kubenft_metrics::exposition::{self, Exposition, parse_list};
use serde_json::json;

/// GET `url` from `host`, parsed as the text exposition.
fn scrape(c: &Cluster, host: Host<'_>, url: &str) -> Exposition {
    let text = c
        .lab
        .exec_ok(host, &["curl", "-s", "-m", "2", url])
        .unwrap_or_else(|e| panic!("curl {url}: {e}"));
    exposition::parse(&text).unwrap_or_else(|e| panic!("{url}: {e}\n{text}"))
}

fn agent_metrics(c: &Cluster) -> Exposition {
    scrape(c, Host::Node("a"), "http://127.0.0.1:10249/metrics")
}

fn controller_metrics(c: &Cluster) -> Exposition {
    scrape(
        c,
        Host::ControlPlane,
        &format!("http://{CP_V4}:{CONTROLLER_HTTP_PORT}/metrics"),
    )
}

/// The sum of `series` samples with `labels` (0 when absent).
fn value(e: &Exposition, family: &str, series: &str, labels: &[(&str, &str)]) -> f64 {
    e.get(family).map_or(0.0, |f| f.sum(series, labels))
}

fn count(e: &Exposition, histogram: &str, labels: &[(&str, &str)]) -> f64 {
    value(e, histogram, &format!("{histogram}_count"), labels)
}

#[test]
fn both_metrics_endpoints_serve_the_listed_metrics_and_one_dual_stack_change_is_one_sync() {
    let lab = Cluster::lab(&["a"]);
    let web = pods(&lab, &[("web-1", "a"), ("web-2", "a")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    // Two ports (TCP and UDP) in both families: four resources, one Service.
    let svc = Service::cluster_ips("dual", &["10.96.0.71", "fd00:96::71"])
        .port("http", 80, TCP, Proto::Tcp)
        .port("dns", 53, UDP, Proto::Udp);
    let slices = |pods: &[&Pod]| {
        let trigger = json!({"metadata": {"annotations": {
            "endpoints.kubernetes.io/last-change-trigger-time": c.rfc3339_now()
        }}});
        let v4 = Slice::for_service("dual")
            .port("http", TCP)
            .port_proto("dns", UDP, Proto::Udp)
            .endpoints(pods.iter().copied(), Cond::READY)
            .merge(trigger);
        let v6 = v4.clone().named("dual-v6").ipv6();
        (v4, v6)
    };
    let (v4, v6) = slices(&[&web[0]]);
    c.write("dual.yaml", &[&svc, &v4, &v6]);
    for target in ["10.96.0.71:80", "[fd00:96::71]:80"] {
        c.wait_answers(Host::Pod("client"), Proto::Tcp, vip(target), START);
    }
    c.wait_synced(START);
    // Probes make kube-proxy's healthz and livez counters.
    for path in ["/healthz", "/livez"] {
        let (code, text) = c.http_get(Host::Node("a"), &format!("http://127.0.0.1:10256{path}"));
        assert_eq!(code, 200, "{path}: {text}");
    }

    // The UDP port's conntrack entries are reconciled after the ACK, off its path, for each
    // family: counted once the first sync's are done.
    let reconciles = |e: &Exposition| {
        ["IPv4", "IPv6"].map(|f| {
            count(
                e,
                "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                &[("ip_family", f)],
            )
        })
    };
    wait_until(START, Duration::from_millis(100), || {
        Ok::<_, String>(reconciles(&agent_metrics(&c)) == [1.0, 1.0])
    })
    .unwrap_or_else(|e| panic!("the first sync's conntrack reconciles: {e}"));
    let (agent, controller) = (agent_metrics(&c), controller_metrics(&c));

    // One change, both families: web-2 joins both slices (one file, one view, one change).
    let before = (agent, controller);
    let (v4, v6) = slices(&[&web[0], &web[1]]);
    c.write("dual.yaml", &[&svc, &v4, &v6]);
    for target in ["10.96.0.71:80", "[fd00:96::71]:80"] {
        c.wait_all_seen(
            Host::Pod("client"),
            Proto::Tcp,
            vip(target),
            &["web-1", "web-2"],
            CONVERGE,
        );
    }
    c.wait_synced(START);
    // The conntrack reconcile runs after the ACK, off its path: wait for both families'.
    let mut agent_after = agent_metrics(&c);
    wait_until(START, Duration::from_millis(100), || {
        agent_after = agent_metrics(&c);
        let (was, is) = (reconciles(&before.0), reconciles(&agent_after));
        Ok::<_, String>(is[0] > was[0] && is[1] > was[1])
    })
    .unwrap_or_else(|e| panic!("no conntrack reconcile of both families: {e}"));
    let after = (agent_after, controller_metrics(&c));

    // Every listed metric, with its type and label names, on the component that serves it
    // (after a first, full sync and a partial one).
    let list_path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring/metrics.txt");
    let list = parse_list(&std::fs::read_to_string(&list_path).unwrap()).unwrap();
    let (agent, controller) = (&after.0, &after.1);
    let mut wrong = Vec::new();
    for expected in &list {
        for (component, served) in [("agent", agent), ("controller", controller)] {
            if expected.served_by(component)
                && let Err(e) = served.check(expected)
            {
                wrong.push(format!("{component}: {e}"));
            }
        }
    }
    assert!(wrong.is_empty(), "not as listed:\n{}", wrong.join("\n"));
    assert!(
        list.iter().filter(|e| e.origin == "kube-proxy").count() >= 16,
        "the kube-proxy metrics are listed"
    );
    let build = &agent.get("kubernetes_build_info").unwrap().samples[0];
    assert_eq!(build.labels["git_version"], "v0.1.0");
    assert!(agent.get("process_resident_memory_bytes").unwrap().samples[0].value > 1e6);

    let delta = |f: &dyn Fn(&Exposition) -> f64, agent: bool| {
        if agent {
            f(&after.0) - f(&before.0)
        } else {
            f(&after.1) - f(&before.1)
        }
    };
    let changes = delta(
        &|e| {
            value(
                e,
                "kubenft_controller_changes_sent_total",
                "kubenft_controller_changes_sent_total",
                &[],
            )
        },
        false,
    );
    assert_eq!(changes, 1.0, "the controller sent one change");
    let both = |name: &'static str| {
        move |e: &Exposition| {
            count(e, name, &[("ip_family", "IPv4")]) + count(e, name, &[("ip_family", "IPv6")])
        }
    };
    let per_family = |name: &'static str, family: &'static str| {
        move |e: &Exposition| count(e, name, &[("ip_family", family)])
    };
    // One transaction: one sync observation, partial, whichever families it changed.
    assert_eq!(
        delta(&both("kubeproxy_sync_proxy_rules_duration_seconds"), true),
        1.0
    );
    assert_eq!(
        delta(
            &both("kubeproxy_sync_partial_proxy_rules_duration_seconds"),
            true
        ),
        1.0
    );
    assert_eq!(
        delta(
            &both("kubeproxy_sync_full_proxy_rules_duration_seconds"),
            true
        ),
        0.0
    );
    // One trigger time per family, shared by the Service's two ports: one observation each.
    for family in ["IPv4", "IPv6"] {
        let programmed = delta(
            &per_family("kubeproxy_network_programming_duration_seconds", family),
            true,
        );
        assert_eq!(
            programmed, 1.0,
            "network programming observations for {family}"
        );
        // The UDP port changed: each family's conntrack table was reconciled once.
        let reconciled = delta(
            &per_family(
                "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                family,
            ),
            true,
        );
        assert_eq!(reconciled, 1.0, "conntrack reconciles for {family}");
    }
    let counter = |name: &'static str| move |e: &Exposition| value(e, name, name, &[]);
    assert_eq!(
        delta(
            &counter("kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            true
        ),
        1.0
    );
    assert_eq!(
        delta(
            &counter("kubeproxy_sync_proxy_rules_service_changes_total"),
            true
        ),
        0.0
    );
    assert_eq!(
        value(
            &after.0,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            &[]
        ),
        0.0
    );
    // The controller: one push of this node, one ACK lag observation.
    let node = [("node", "a")];
    for histogram in [
        "kubenft_controller_node_push_bytes",
        "kubenft_controller_node_ack_lag_seconds",
    ] {
        assert_eq!(
            delta(&|e| count(e, histogram, &node), false),
            1.0,
            "{histogram}"
        );
    }
    assert_eq!(
        value(
            &after.1,
            "kubenft_controller_node_nacks_total",
            "kubenft_controller_node_nacks_total",
            &node
        ),
        0.0
    );
}
