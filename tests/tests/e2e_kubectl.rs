//! End to end: the `kubectl kubenft` plugin, run by the real `kubectl` (which finds it on
//! PATH) from the lab's control plane, with the operator's client certificate.

mod common;

use std::path::PathBuf;

use common::*;
use kubenft_lab::topology::{CONTROLLER_GRPC_PORT, CP_V4};
use kubenft_lab::{Host, Proto};

/// `kubectl kubenft ARGS` in the control plane, with the lab's TLS flags; (exit ok, stdout,
/// stderr).
fn kubectl_kubenft(c: &Cluster, controllers: &[&str], args: &[&str]) -> (bool, String, String) {
    let plugin = kubenft_lab::process::find_binary("kubectl-kubenft")
        .expect("cargo build --bins builds kubectl-kubenft");
    let dir = plugin.parent().map(PathBuf::from).unwrap_or_default();
    let path = format!(
        "PATH={}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let tls = c.lab.tls();
    let (ca, cert, key) = (
        tls.pki.ca().display().to_string(),
        tls.operator.cert.display().to_string(),
        tls.operator.key.display().to_string(),
    );
    let mut argv = vec!["env", path.as_str(), "kubectl", "kubenft"];
    argv.extend_from_slice(args);
    for addr in controllers {
        argv.extend(["--controller", addr]);
    }
    argv.extend(["--cacert", &ca, "--cert", &cert, "--key", &key]);
    let out = c
        .lab
        .exec(Host::ControlPlane, &argv)
        .unwrap_or_else(|e| panic!("running kubectl kubenft {args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The columns of `status`'s line for `node`.
fn status_line(table: &str, node: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.first().is_some_and(|n| n == node))
        .unwrap_or_else(|| panic!("no line for node {node} in:\n{table}"))
}

#[test]
fn kubectl_kubenft_answers_status_why_trace_drain_and_rejections_in_the_lab() {
    let c = Cluster::start(two_node_web("10.96.0.95"));
    c.wait_answers(Host::Pod("client"), Proto::Tcp, vip("10.96.0.95:80"), START);
    let acked = c.wait_synced(START);
    let controller = format!("{CP_V4}:{CONTROLLER_GRPC_PORT}");

    // status: both nodes SYNCED at the version the controller reports, from this controller.
    let (ok, out, err) = kubectl_kubenft(&c, &[&controller], &["status"]);
    assert!(ok, "kubectl kubenft status failed: {err}\n{out}");
    for node in ["a", "b"] {
        let cols = status_line(&out, node);
        assert_eq!(cols[1], "SYNCED", "node {node}: {out}");
        assert!(
            acked[node].starts_with(&cols[3]),
            "node {node}: acked column {} is not a prefix of {}\n{out}",
            cols[3],
            acked[node]
        );
        assert!(out.contains(&controller), "{out}");
    }

    // A second replica that does not answer: the first one's view is still printed, the
    // unreachable one is named, and the exit status says not everything answered.
    let (ok, out, err) = kubectl_kubenft(&c, &[&controller, "127.0.0.1:1"], &["status"]);
    assert!(!ok, "an unreachable replica must fail the command: {out}");
    assert_eq!(status_line(&out, "a")[1], "SYNCED", "{out}");
    assert!(
        err.contains("127.0.0.1:1"),
        "the unreachable replica is named: {err}"
    );

    // why: the Service's port on node a, with both endpoints.
    let (ok, out, err) =
        kubectl_kubenft(&c, &[&controller], &["why", "default/web", "--node", "a"]);
    assert!(ok, "kubectl kubenft why failed: {err}");
    assert!(out.contains("clusterIP 10.96.0.95:80"), "{out}");
    let pods = ["web-1", "web-2"].map(|p| c.lab.pod(p).ipv4.to_string());
    for ip in &pods {
        assert!(
            out.contains(ip.as_str()),
            "why misses endpoint {ip}:\n{out}"
        );
    }

    // trace: the client pod's connection to the ClusterIP, as real traffic sees it (both
    // pods answered above): DNAT to both endpoints, the client's source kept.
    let client_ip = c.lab.pod("client").ipv4.to_string();
    let trace_to = |port: &str| {
        let args = [
            "trace",
            "--node",
            "a",
            "--source",
            &client_ip,
            "--destination",
            "10.96.0.95",
            "--port",
            port,
        ];
        kubectl_kubenft(&c, &[&controller], &args)
    };
    let (ok, out, err) = trace_to("80");
    assert!(ok, "kubectl kubenft trace failed: {err}");
    let verdict = out.lines().next().unwrap_or_default();
    assert!(verdict.starts_with("DNAT to "), "{out}");
    for ip in &pods {
        assert!(
            verdict.contains(&format!("{ip}:")),
            "trace misses {ip}:\n{out}"
        );
    }
    assert!(
        !verdict.contains("masqueraded"),
        "a pod's source is kept: {out}"
    );
    let (ok, out, _) = trace_to("81");
    assert!(
        ok && out.starts_with("REJECT"),
        "a port the ClusterIP lacks is refused: {out}"
    );

    // drain-status: web-1 still receives new connections from both nodes; the client's
    // address never did. Once web-1 leaves the slice, the gate opens.
    let web1 = pods[0].as_str();
    let (ok, out, _) = kubectl_kubenft(&c, &[&controller], &["drain-status", web1]);
    assert!(!ok, "web-1 is still an endpoint: {out}");
    assert!(out.starts_with(&format!("{web1}: not drained")), "{out}");
    assert_eq!(status_line(&out, "a")[1], "PENDING", "{out}");
    let (ok, out, err) = kubectl_kubenft(&c, &[&controller], &["drain-status", &client_ip]);
    assert!(ok, "no node sends to the client pod: {out} {err}");
    let web2 = c.lab.pod("web-2");
    write_web_service(&c, "web", "10.96.0.95", [&web2]);
    let (ok, out, err) =
        kubectl_kubenft(&c, &[&controller], &["drain-status", web1, "--wait", "10"]);
    assert!(ok, "web-1 left the slice: the gate must open: {out} {err}");
    for node in ["a", "b"] {
        assert_eq!(status_line(&out, node)[1], "DONE", "{out}");
    }

    // rejected: a Service with a NodePort out of range is named with its field.
    c.lab.write_manifest(
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.96\n  ports: [{name: http, port: 80, nodePort: 80}]\n",
    )
    .unwrap();
    let mut last = String::new();
    let found = (0..50).any(|_| {
        let (ok, out, _) = kubectl_kubenft(&c, &[&controller], &["rejected"]);
        last = out;
        let hit = ok && last.contains("default/bad spec.ports[0].nodePort");
        if !hit {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        hit
    });
    assert!(
        found,
        "rejected does not name default/bad's nodePort:\n{last}"
    );

    // Without TLS flags and without --insecure, the plugin refuses to run.
    let plugin = kubenft_lab::process::find_binary("kubectl-kubenft").unwrap();
    let out = std::process::Command::new(plugin)
        .args(["status", "--controller", &controller])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--insecure"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
