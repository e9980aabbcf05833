//! End to end: what an operator sees through the real `grpcurl`, and what hostile or broken
//! manifests do (nothing, except being reported) to a running cluster.

mod common;

use std::net::SocketAddr;

use common::*;
use kubenft_lab::manifest::ToJson;
use kubenft_lab::topology::{AGENT_GRPC_PORT, CONTROLLER_GRPC_PORT, CP_V4};
use kubenft_lab::{Cond, Host, ProbeOpts, ProbeResult, Proto, Service, Slice};
use serde_json::Value;

/// The real grpcurl against both servers in the lab: the controller (reflection, health,
/// ListNodes with both nodes SYNCED, GetService explaining a Service) and an agent
/// (reflection lists AgentInspect, GetApplied has the resources, GetNftText has the table).
#[test]
fn grpcurl_inspects_the_controller_and_an_agent() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.90").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&backends, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, vip("10.96.0.90:80"), START);
    let acked = c.wait_synced(START);

    // Controller: reflection and health.
    let caddr = format!("{CP_V4}:{CONTROLLER_GRPC_PORT}");
    let (ok, out, err) = c.grpcurl(Host::ControlPlane, &[&caddr, "list"]);
    assert!(ok, "grpcurl list (controller): {err}");
    for s in ["kubenft.v1.ControllerInspect", "grpc.health.v1.Health"] {
        assert!(out.lines().any(|l| l == s), "{s} not listed: {out}");
    }
    let (ok, out, err) = c.grpcurl(Host::ControlPlane, &[&caddr, "grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("SERVING"), "health: {out} {err}");

    // ListNodes: both nodes connected and SYNCED.
    let nodes = c.list_nodes().unwrap();
    for n in ["a", "b"] {
        let s = &nodes[n];
        assert_eq!(s["state"], "SYNCED", "{s}");
        assert_eq!(s["connected"], true, "{s}");
        assert!(
            s["ackedVersion"].as_str().is_some_and(|v| !v.is_empty()),
            "{s}"
        );
    }

    // GetService explains the Service as node a sees it.
    let view = c
        .controller_call(
            "GetService",
            Some(r#"{"node":"a","namespace":"default","name":"web"}"#),
        )
        .unwrap();
    let res = view["resources"].as_array().cloned().unwrap_or_default();
    let sp = res
        .iter()
        .map(|r| &r["servicePort"])
        .find(|sp| sp["clusterIp"] == "10.96.0.90")
        .unwrap_or_else(|| panic!("GetService has no port for 10.96.0.90: {view}"));
    let eps: Vec<&str> = sp["clusterEndpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["ip"].as_str()).collect())
        .unwrap_or_default();
    for p in &backends {
        assert!(
            eps.contains(&p.ipv4.to_string().as_str()),
            "GetService misses endpoint {}: {view}",
            p.ipv4
        );
    }
    assert!(
        view["notes"].as_array().is_some_and(|n| !n.is_empty()),
        "GetService should explain itself in notes: {view}"
    );

    // The agent, reached from cp as an operator would.
    let aaddr = format!("{}:{AGENT_GRPC_PORT}", c.lab.node("a").ipv4);
    let (ok, out, err) = c.grpcurl(Host::ControlPlane, &[&aaddr, "list"]);
    assert!(ok, "grpcurl list (agent): {err}");
    assert!(
        out.lines().any(|l| l == "kubenft.v1.AgentInspect"),
        "AgentInspect not listed: {out}"
    );
    let call = |m: &str| -> Value {
        let method = format!("kubenft.v1.AgentInspect/{m}");
        let (ok, out, err) = c.grpcurl(Host::ControlPlane, &[&aaddr, &method]);
        assert!(ok, "{m}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{m}: {e}: {out}"))
    };
    let applied = call("GetApplied");
    assert_eq!(applied["node"], "a", "{applied}");
    let names: Vec<&str> = applied["resources"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        names.contains(&"default/web/tcp/http/ipv4"),
        "GetApplied misses the Service port: {names:?}"
    );
    assert_eq!(
        applied["systemVersion"].as_str(),
        Some(acked["a"].as_str()),
        "the agent's applied version differs from what the controller shows acked"
    );
    let text = call("GetNftText");
    let text = text["text"].as_str().unwrap_or_default();
    assert!(text.contains("table ip kubenft"), "GetNftText: {text}");
    assert!(
        text.contains("10.96.0.90"),
        "GetNftText lacks the ClusterIP: {text}"
    );
    // GetDrift: the kernel holds what was applied (grpcurl omits false and empty fields).
    let drift = call("GetDrift");
    assert_eq!(drift["inSync"], true, "GetDrift: {drift}");
    assert_eq!(
        drift["dataplane"], "DATAPLANE_CONVERGED",
        "GetDrift: {drift}"
    );
    assert!(drift["lines"].is_null(), "GetDrift: {drift}");
}

/// The real grpcurl calls both Trace RPCs with the documented request: the agent's answer
/// (verdict, endpoints, masquerade) is what real connections from the traced source see, the
/// controller's for that node is the same, and a bad field is INVALID_ARGUMENT naming it.
#[test]
fn grpcurl_traces_a_flow_on_the_agent_and_on_the_controller() {
    let lab = Cluster::lab(&["a", "b"]);
    let backends = pods(&lab, &[("web-1", "a"), ("web-2", "b")]);
    let client = client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let svc = Service::cluster_ip("web", "10.96.0.91").port("http", 80, TCP, Proto::Tcp);
    let slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoints(&backends, Cond::READY);
    c.write("web.yaml", &[&svc, &slice]);
    let target = vip("10.96.0.91:80");
    c.wait_answers(Host::Pod("client"), Proto::Tcp, target, START);
    c.wait_synced(START);

    let request = format!(
        r#"{{"source": "{}", "destination": "10.96.0.91", "port": 80, "protocol": "TCP"}}"#,
        client.ipv4
    );
    let aaddr = format!("{}:{AGENT_GRPC_PORT}", c.lab.node("a").ipv4);
    let (ok, out, err) = c.grpcurl(
        Host::ControlPlane,
        &["-d", &request, &aaddr, "kubenft.v1.AgentInspect/Trace"],
    );
    assert!(ok, "AgentInspect/Trace: {err}");
    let agent: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("AgentInspect/Trace {request}:\n{out}");
    assert_eq!(agent["verdict"], "DNAT", "{agent}");
    let want: Vec<String> = backends
        .iter()
        .map(|p| p.sock_v4(TCP).to_string())
        .collect();
    assert_eq!(agent["endpoints"], serde_json::json!(want), "{agent}");
    assert_eq!(agent["servicePort"], "default/web/tcp/http/ipv4", "{agent}");
    assert!(
        agent["masquerade"].is_null(),
        "a pod's own address is kept: {agent}"
    );
    // What real connections from that pod see.
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        target,
        &ProbeOpts::count(12),
    );
    c.assert_traces_agree("a", Host::Pod("client"), (Proto::Tcp, target), &rs);

    let caddr = format!("{CP_V4}:{CONTROLLER_GRPC_PORT}");
    let with_node = request.replacen('{', r#"{"node": "a", "#, 1);
    let (ok, out, err) = c.grpcurl(
        Host::ControlPlane,
        &[
            "-d",
            &with_node,
            &caddr,
            "kubenft.v1.ControllerInspect/Trace",
        ],
    );
    assert!(ok, "ControllerInspect/Trace: {err}");
    let controller: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("ControllerInspect/Trace {with_node}:\n{out}");
    for field in [
        "verdict",
        "endpoints",
        "masquerade",
        "servicePort",
        "systemVersion",
    ] {
        assert_eq!(
            controller[field], agent[field],
            "{field}: {controller} vs {agent}"
        );
    }

    // Bad fields: refused, naming the field.
    let bad = |addr: &str, method: &str, data: &str, field: &str| {
        let (ok, out, err) = c.grpcurl(Host::ControlPlane, &["-d", data, addr, method]);
        assert!(!ok, "{method} {data} must fail: {out}");
        assert!(
            err.contains("InvalidArgument") && err.contains(&format!("{field}:")),
            "{method} {data}: want InvalidArgument naming {field}: {err}"
        );
    };
    let agent_method = "kubenft.v1.AgentInspect/Trace";
    let controller_method = "kubenft.v1.ControllerInspect/Trace";
    let cases = [
        (
            r#"{"source": "10.0.0", "destination": "10.96.0.91", "port": 80, "protocol": "TCP"}"#,
            "source",
        ),
        (
            r#"{"source": "10.0.0.2", "destination": "x", "port": 80, "protocol": "TCP"}"#,
            "destination",
        ),
        (
            r#"{"source": "10.0.0.2", "destination": "10.96.0.91", "port": 0, "protocol": "TCP"}"#,
            "port",
        ),
        (
            r#"{"source": "10.0.0.2", "destination": "10.96.0.91", "port": 70000, "protocol": "TCP"}"#,
            "port",
        ),
        (
            r#"{"source": "10.0.0.2", "destination": "10.96.0.91", "port": 80}"#,
            "protocol",
        ),
    ];
    for (data, field) in cases {
        bad(&aaddr, agent_method, data, field);
        let with_node = data.replacen('{', r#"{"node": "a", "#, 1);
        bad(&caddr, controller_method, &with_node, field);
    }
    let unknown = request.replacen('{', r#"{"node": "nope", "#, 1);
    bad(&caddr, controller_method, &unknown, "node");
    bad(&caddr, controller_method, &request, "node");
}

fn rejected(c: &Cluster) -> Vec<Value> {
    c.controller_call("ListRejected", None).unwrap()["errors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Broken and hostile manifests are refused one by one with the field that is wrong, and
/// nothing else suffers: a bad YAML file, a clusterIP `10.96.0.300`, a nodePort 80, a
/// 100 KB name, names carrying nft/shell quoting attempts. A good Service in the same
/// directory, and one in the same file as a bad one, serve real traffic; no agent NACKs.
#[test]
fn hostile_manifests_are_rejected_and_good_services_keep_working() {
    let lab = Cluster::lab(&["a", "b"]);
    let web = pods(&lab, &[("web-1", "a")]).remove(0);
    client(&lab, "client", "a");
    let slice_for = |svc: &str| {
        Slice::for_service(svc)
            .named(&format!("s{}", svc.len().min(50)))
            .port("http", TCP)
            .endpoint(&web, Cond::READY)
    };
    let good = |name: &str, ip: &str| {
        (
            Service::cluster_ip(name, ip).port("http", 80, TCP, Proto::Tcp),
            Slice::for_service(name)
                .port("http", TCP)
                .endpoint(&web, Cond::READY),
        )
    };

    lab.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n  spec: [ports:\n\t- x\n",
    )
    .unwrap();
    // A bad Service and a good one in the same file.
    let bad_ip = Service::cluster_ip("bad-ip", "10.96.0.300").port("http", 80, TCP, Proto::Tcp);
    let (good_a, good_a_slice) = good("good-a", "10.96.0.71");
    let lab_write = |file: &str, objs: &[&dyn ToJson]| {
        lab.write_manifest(file, &kubenft_lab::manifest::list(objs))
            .unwrap()
    };
    lab_write("mixed.yaml", &[&bad_ip, &good_a, &good_a_slice]);
    let np80 = Service::cluster_ip("np-low", "10.96.0.72")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(80);
    lab_write("np80.yaml", &[&np80, &slice_for("np-low")]);
    let long_name = "a".repeat(100 * 1024);
    let long = Service::cluster_ip(&long_name, "10.96.0.73").port("http", 80, TCP, Proto::Tcp);
    lab_write("long.yaml", &[&long, &slice_for(&long_name)]);
    let evil_names = [
        "x;}",
        "web } ; flush ruleset",
        "evil\n}\nadd table ip pwn",
        "q\"uote's",
    ];
    let evil: Vec<Service> = evil_names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            Service::cluster_ip(n, &format!("10.96.0.{}", 80 + i)).port("http", 80, TCP, Proto::Tcp)
        })
        .collect();
    let evil_refs: Vec<&dyn ToJson> = evil.iter().map(|s| s as &dyn ToJson).collect();
    lab_write("quote.yaml", &evil_refs);
    let (good_b, good_b_slice) = good("good-b", "10.96.0.76");
    lab_write("good-b.yaml", &[&good_b, &good_b_slice]);

    let c = Cluster::start(lab);
    for target in ["10.96.0.71:80", "10.96.0.76:80"] {
        c.wait_answers(Host::Pod("client"), Proto::Tcp, vip(target), START);
        let rs = c.probe(
            Host::Pod("client"),
            Proto::Tcp,
            vip(target),
            &ProbeOpts::count(5),
        );
        let t = assert_all_ok(&rs, target);
        assert_eq!(t.get("web-1"), Some(&5), "{target}: {t:?}");
    }
    c.wait_synced(START);

    let errors = rejected(&c);
    let find = |pred: &dyn Fn(&Value) -> bool, what: &str| -> Value {
        errors.iter().find(|e| pred(e)).cloned().unwrap_or_else(|| {
            let short: Vec<String> = errors
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    if let Some(n) = e["name"].as_str() {
                        e["name"] = n.chars().take(40).collect::<String>().into();
                    }
                    e.to_string()
                })
                .collect();
            panic!("ListRejected has no entry for {what}: {short:#?}")
        })
    };
    let field = |e: &Value| e["field"].as_str().unwrap_or_default().to_string();
    let e = find(&|e| e["name"] == "broken.yaml", "the bad YAML file");
    assert!(
        e["message"].as_str().unwrap_or_default().contains("YAML"),
        "{e}"
    );
    let e = find(&|e| e["name"] == "bad-ip", "clusterIP 10.96.0.300");
    assert!(field(&e).starts_with("spec.clusterIP"), "{e}");
    let e = find(&|e| e["name"] == "np-low", "nodePort 80");
    assert_eq!(field(&e), "spec.ports[0].nodePort", "{e}");
    let e = find(
        &|e| {
            e["kind"] == "Service"
                && e["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("aaaaaaaa"))
        },
        "the 100 KB name",
    );
    assert_eq!(field(&e), "metadata.name", "100 KB name: {}", e["field"]);
    for n in evil_names {
        let e = find(&|e| e["name"] == n, &format!("name {n:?}"));
        assert_eq!(field(&e), "metadata.name", "{e}");
    }

    // None of the refused Services is served: their ClusterIPs fall in the Service CIDR
    // without being allocated (dropped), and nodePort 80 was never opened on the nodes.
    for ip in ["10.96.0.72", "10.96.0.73", "10.96.0.80", "10.96.0.81"] {
        let r = c.probe1(
            Host::Pod("client"),
            Proto::Tcp,
            vip(&format!("{ip}:80")),
            DROP_WAIT,
        );
        assert!(!r.is_ok(), "refused Service {ip} answers: {r}");
    }
    let np: SocketAddr = sock(c.lab.node("a").ipv4, 80);
    let r = c.probe1(Host::External, Proto::Tcp, np, DROP_WAIT);
    assert_eq!(
        r,
        ProbeResult::Refused,
        "nodePort 80 must not be opened: {r}"
    );
    // Nothing hostile reached nft: no node NACKed, and the foreign table was not created.
    for (n, s) in c.list_nodes().unwrap() {
        assert_eq!(s["state"], "SYNCED", "node {n}: {s}");
    }
    let tables = c.nft("a", &["list", "tables"]);
    assert!(!tables.contains("pwn"), "{tables}");
}

/// Found by hostile testing: a newcomer claiming a served ClusterIP:port and NodePort (`dir:`
/// manifests carry no creationTimestamp, and its name sorts first) took both, and the Service
/// serving them was refused as a whole. The Service serving keeps them; the newcomer loses
/// those two claims only (its port 81 on the same address is served), and ListRejected names
/// the fields.
#[test]
fn a_newcomer_cannot_take_what_another_service_serves() {
    let lab = Cluster::lab(&["a"]);
    let backends = pods(&lab, &[("web-1", "a"), ("evil-1", "a")]);
    client(&lab, "client", "a");
    let c = Cluster::start(lab);
    let web = Service::cluster_ip("web", "10.96.0.92")
        .port("http", 80, TCP, Proto::Tcp)
        .node_port(30092);
    let web_slice = Slice::for_service("web")
        .port("http", TCP)
        .endpoint(&backends[0], Cond::READY);
    c.write("web.yaml", &[&web, &web_slice]);
    c.wait_answers(Host::Pod("client"), Proto::Tcp, vip("10.96.0.92:80"), START);

    let evil = Service::cluster_ip("aaa-evil", "10.96.0.92")
        .port("http", 80, TCP, Proto::Tcp)
        .port("other", 81, TCP, Proto::Tcp)
        .node_port(30092);
    let evil_slice = Slice::for_service("aaa-evil")
        .port("http", TCP)
        .port("other", TCP)
        .endpoint(&backends[1], Cond::READY);
    c.write("aaa-evil.yaml", &[&evil, &evil_slice]);
    // The newcomer's free claim is served...
    c.wait_answers(
        Host::Pod("client"),
        Proto::Tcp,
        vip("10.96.0.92:81"),
        CONVERGE,
    );
    let rs = c.probe(
        Host::Pod("client"),
        Proto::Tcp,
        vip("10.96.0.92:81"),
        &ProbeOpts::count(3),
    );
    assert_eq!(assert_all_ok(&rs, "port 81").get("evil-1"), Some(&3));
    c.wait_synced(CONVERGE);
    // ...and what the first Service serves stays its own.
    let node_port = sock(c.lab.node("a").ipv4, 30092);
    for (from, target) in [
        (Host::Pod("client"), vip("10.96.0.92:80")),
        (Host::External, node_port),
    ] {
        let rs = c.probe(from, Proto::Tcp, target, &ProbeOpts::count(5));
        let t = assert_all_ok(&rs, &target.to_string());
        assert_eq!(t.get("web-1"), Some(&5), "{target}: {t:?}");
    }
    let errors = rejected(&c);
    let fields: Vec<(String, String)> = errors
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["field"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            ("aaa-evil".to_owned(), "spec.ports[0].port".to_owned()),
            ("aaa-evil".to_owned(), "spec.ports[1].nodePort".to_owned()),
        ],
        "{errors:#?}"
    );
}
