//! End to end for issue 12 item 4: certificates in a cluster. The agents hold no certificate
//! at start; each asks the Kubernetes CertificateSigningRequest API (the real `kube` client
//! against the real `kubenft-fake-apiserver`, which fills in who asked from the bearer
//! token, as the API server does from a pod-bound ServiceAccount token), the controller's
//! signer approves and signs it, and the agents then hold mutual-TLS streams and serve
//! traffic. The controller serves with a certificate it issued itself.
//!
//! The signer's CA is brought by the operator here (a Secret made from the lab's CA before
//! the controller starts), so the lab's operator certificate works for grpcurl; the
//! controller's integration tests cover the CA it creates when there is none.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kubenft_lab::topology::{AGENT_GRPC_PORT, CONTROLLER_GRPC_PORT, CONTROLLER_HTTP_PORT, CP_V4};
use kubenft_lab::{Host, Lab, ProbeOpts, Process, Proto, wait_until};
use serde_json::{Value, json};

const API_PORT: u16 = 6443;
const AGENT_USER: &str = "system:serviceaccount:kubenft-system:kubenft-agent";
const NODE_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Short enough that agents and the controller renew during the test.
const LIFETIME_S: u64 = 30;

fn api_url() -> String {
    format!("http://{CP_V4}:{API_PORT}")
}

/// The fake API server's token table: each agent's token is bound to its node; `web-a` is
/// another ServiceAccount's token from a pod on node a.
fn write_users(lab: &Lab) -> PathBuf {
    let user = |name: &str, node: &str| {
        json!({
            "username": name,
            "uid": format!("uid-{node}"),
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "extra": { NODE_EXTRA: [node] },
        })
    };
    let users = json!({
        "token-a": user(AGENT_USER, "a"),
        "token-b": user(AGENT_USER, "b"),
        "token-b-as-a": user(AGENT_USER, "b"),
        "token-web-a": user("system:serviceaccount:default:web", "a"),
    });
    let path = lab.dir().join("users.json");
    std::fs::write(&path, users.to_string()).unwrap();
    path
}

/// A kubeconfig for the fake API server with `token` (none: the admin).
fn write_kubeconfig(lab: &Lab, name: &str, token: Option<&str>) -> PathBuf {
    let path = lab.dir().join(format!("{name}.kubeconfig"));
    std::fs::write(
        &path,
        kubenft_fake_apiserver::kubeconfig_for(&api_url(), token),
    )
    .unwrap();
    path
}

fn base64(path: &Path) -> String {
    let out = std::process::Command::new("base64")
        .args(["-w0"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The operator's CA Secret: the lab's CA certificate and key.
fn write_ca_secret(lab: &Lab) {
    let pki = &lab.tls().pki;
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": "kubenft-ca", "namespace": "kubenft-system" },
        "type": "Opaque",
        "data": {
            "ca.crt": base64(&pki.ca()),
            "ca.key": base64(&pki.dir().join("ca.key")),
        },
    });
    lab.write_manifest("ca-secret.json", &secret.to_string())
        .unwrap();
}

fn start_apiserver(lab: &Lab, users: &Path) -> Process {
    let bin = lab.binary("kubenft-fake-apiserver").unwrap();
    let listen = format!("{CP_V4}:{API_PORT}");
    let api = lab
        .spawn(
            "apiserver",
            Host::ControlPlane,
            &[
                bin.to_str().unwrap(),
                "--listen",
                &listen,
                "--manifests",
                lab.manifest_dir().to_str().unwrap(),
                "--watch",
                "--users",
                users.to_str().unwrap(),
            ],
        )
        .unwrap();
    api.wait_for_stdout(&api_url(), START)
        .unwrap_or_else(|e| panic!("fake API server: {e}"));
    api
}

fn start_controller(lab: &Lab) -> Process {
    let mut args = lab.controller_args_without_tls();
    let i = args.iter().position(|a| a == "--source").unwrap();
    args[i + 1] = "kube".into();
    let serving = lab.dir().join("controller-tls");
    let lifetime = format!("{LIFETIME_S}s");
    args.extend(
        [
            "--kubeconfig",
            write_kubeconfig(lab, "admin", None).to_str().unwrap(),
            "--signer-ca-secret",
            "kubenft-system/kubenft-ca",
            "--serving-cert-dir",
            serving.to_str().unwrap(),
            "--serving-cert-san",
            &CP_V4.to_string(),
            "--signer-cert-duration",
            &lifetime,
        ]
        .map(String::from),
    );
    let bin = lab
        .binary("kubenft-controller")
        .unwrap()
        .display()
        .to_string();
    let mut argv = vec![bin.as_str()];
    argv.extend(args.iter().map(String::as_str));
    lab.spawn("controller", Host::ControlPlane, &argv).unwrap()
}

/// The CA certificate the signer published, fetched as the kubelet would mount it.
fn fetch_published_ca(lab: &Lab) -> PathBuf {
    let url = format!(
        "{}/api/v1/namespaces/kubenft-system/configmaps/kubenft-ca",
        api_url()
    );
    let mut published = String::new();
    wait_until(START, POLL, || {
        let out = lab
            .exec(Host::ControlPlane, &["curl", "-s", "--max-time", "2", &url])
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        published = v["data"]["ca.crt"].as_str().unwrap_or_default().to_owned();
        Ok::<_, String>(!published.is_empty())
    })
    .unwrap_or_else(|e| panic!("the signer did not publish its CA in ConfigMap kubenft-ca: {e}"));
    let path = lab.dir().join("published-ca.crt");
    std::fs::write(&path, &published).unwrap();
    path
}

fn cert_dir(lab: &Lab, name: &str) -> PathBuf {
    lab.dir().join(format!("certs-{name}"))
}

/// An agent of `node` with no certificate: `--cert-dir` and the token `token`.
fn spawn_issued_agent(lab: &Lab, node: &str, token: &str, ca: &Path) -> Process {
    let kubeconfig = write_kubeconfig(lab, &format!("agent-{node}"), Some(token));
    let dir = cert_dir(lab, node);
    let url = format!("https://{CP_V4}:{CONTROLLER_GRPC_PORT}");
    let extra = [
        "--controller",
        &url,
        "--controller-ca-file",
        ca.to_str().unwrap(),
        "--cert-dir",
        dir.to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    let bin = lab.binary("kubenft-agent").unwrap().display().to_string();
    let mut argv = vec![bin];
    argv.extend(lab.agent_args_without_tls(node).unwrap());
    argv.extend(extra.iter().map(|s| s.to_string()));
    std::fs::create_dir_all(lab.dir().join(format!("state-{node}"))).unwrap();
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.spawn(&format!("agent-{node}"), Host::Node(node), &argv)
        .unwrap()
}

/// `openssl x509 -noout -subject -serial -ext subjectAltName` of an issued certificate.
fn describe(path: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-serial",
            "-ext",
            "subjectAltName",
            "-in",
        ])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn serial(path: &Path) -> String {
    describe(path)
        .lines()
        .find_map(|l| l.strip_prefix("serial="))
        .unwrap_or_default()
        .to_owned()
}

fn metric(c: &Cluster, series: &str) -> u64 {
    let (_, text) = c.http_get(
        Host::ControlPlane,
        &format!("http://{CP_V4}:{CONTROLLER_HTTP_PORT}/metrics"),
    );
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Agents without certificates get them from the signer (each for its own node, with its
/// node's addresses), connect over mutual TLS and serve a ClusterIP from both nodes. An agent
/// whose token is bound to another node, and a token of another ServiceAccount, are denied
/// with the reason and never get a certificate; the real agents are undisturbed. Then the
/// agents' and the controller's certificates are renewed under continuous traffic: zero
/// failed requests, the streams are not dropped, nothing is re-applied.
#[test]
fn agents_obtain_and_renew_their_certificates_through_the_signer() {
    let lab = two_node_web("10.96.0.80");
    write_ca_secret(&lab);
    let users = write_users(&lab);
    let api = start_apiserver(&lab, &users);
    let controller = start_controller(&lab);
    let ca = fetch_published_ca(&lab);
    assert_eq!(
        std::fs::read_to_string(&ca).unwrap(),
        std::fs::read_to_string(lab.tls().pki.ca()).unwrap(),
        "the published CA is the operator's"
    );
    let agents = ["a", "b"]
        .map(|n| {
            (
                n.to_string(),
                spawn_issued_agent(&lab, n, &format!("token-{n}"), &ca),
            )
        })
        .into_iter()
        .collect();
    let c = Cluster {
        lab,
        controller,
        agents,
    };
    let target = vip("10.96.0.80:80");
    wait_web_spread(&c, target, Duration::from_secs(20));
    c.wait_synced(START);
    assert!(
        metric(
            &c,
            "kubenft_controller_certificate_requests_total{result=\"issued\"}"
        ) >= 2
    );
    for n in ["a", "b"] {
        let text = describe(&cert_dir(&c.lab, n).join("kubenft-agent.pem"));
        let node = c.lab.node(n);
        assert!(
            text.contains(&format!("CN = system:node:{n}"))
                && text.contains(&node.ipv4.to_string()),
            "agent {n}'s certificate: {text}"
        );
    }
    // The issued certificate serves the agent's inspection at the node's address.
    let node_a = format!("{}:{AGENT_GRPC_PORT}", c.lab.node("a").ipv4);
    let (ok, out, err) = c.grpcurl(
        Host::Node("a"),
        &[&node_a, "kubenft.v1.AgentInspect/GetApplied"],
    );
    assert!(
        ok && out.contains("resources"),
        "agent inspection over TLS: {err}"
    );

    // An agent on node b claiming to be node a, and another ServiceAccount's token: denied.
    let impostor = spawn_extra_agent(&c, "impostor", "b", "a", "token-b-as-a", &ca);
    let stranger = spawn_extra_agent(&c, "stranger", "a", "a", "token-web-a", &ca);
    wait_until(START, POLL, || {
        Ok::<_, String>(
            stderr_of(&impostor).contains("denied") && stderr_of(&stranger).contains("denied"),
        )
    })
    .unwrap_or_else(|e| {
        panic!(
            "expected both to be denied: {e}\n{}\n{}",
            stderr_of(&impostor),
            stderr_of(&stranger)
        )
    });
    let why = stderr_of(&impostor);
    assert!(why.contains("system:node:a"), "impostor: {why}");
    assert!(
        stderr_of(&stranger).contains("spec.username"),
        "stranger: {}",
        stderr_of(&stranger)
    );
    assert!(
        !cert_dir(&c.lab, "impostor")
            .join("kubenft-agent.pem")
            .exists()
    );
    assert!(
        !cert_dir(&c.lab, "stranger")
            .join("kubenft-agent.pem")
            .exists()
    );
    assert!(
        metric(
            &c,
            "kubenft_controller_certificate_requests_total{result=\"denied\"}"
        ) >= 2
    );
    let nodes = c.wait_synced(START);
    assert_eq!(nodes.len(), 2, "{nodes:?}");

    // Renewal under traffic: every certificate is replaced, nothing fails, nothing reconnects.
    let files: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| cert_dir(&c.lab, n).join("kubenft-agent.pem"))
        .chain([c.lab.dir().join("controller-tls/serving.pem")])
        .collect();
    let before: Vec<String> = files.iter().map(|f| serial(f)).collect();
    let generations: Vec<String> = ["a", "b"].iter().map(|n| c.generation(n)).collect();
    let connects = |c: &Cluster| {
        ["a", "b"]
            .iter()
            .map(|n| {
                stderr_of(&c.agents[*n])
                    .matches("connected to controller")
                    .count()
            })
            .collect::<Vec<_>>()
    };
    let connects_before = connects(&c);
    let to = (Host::Pod("client"), Proto::Tcp, target);
    let every = (600, Duration::from_millis(50));
    let (results, ()) = with_traffic(&c, to, &ProbeOpts::count(5), every, || {
        let renewed = wait_until(
            Duration::from_secs(LIFETIME_S + 15),
            Duration::from_millis(500),
            || Ok::<_, String>(files.iter().zip(&before).all(|(f, b)| serial(f) != *b)),
        );
        // Some traffic after the last renewal too.
        std::thread::sleep(Duration::from_secs(1));
        renewed.unwrap_or_else(|e| panic!("not every certificate was renewed: {e}"));
    });
    assert_no_failed_request(&results, "during renewal");
    // The agent's issued certificate names the node's address only: Trace is asked there.
    // Its answer, and the controller's (over its renewed serving certificate), agree with
    // the connections made during the renewal.
    let from = Host::Pod("client");
    let t = c.assert_trace_agrees_at("a", &node_a, from, (Proto::Tcp, target), &results);
    let src = c.source_of(from, target);
    let interface = c.interface_into("a", from);
    let controller = c
        .controller_trace("a", src, target, Proto::Tcp, interface.as_deref())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        controller.decision(),
        t.decision(),
        "ControllerInspect/Trace and AgentInspect/Trace disagree: {:#?} vs {:#?}",
        controller.raw,
        t.raw
    );
    assert_eq!(
        connects(&c),
        connects_before,
        "a stream was dropped by a renewal"
    );
    let after: Vec<String> = ["a", "b"].iter().map(|n| c.generation(n)).collect();
    assert_eq!(after, generations, "a renewal re-applied rules");
    // New connections use the renewed certificates: a grpcurl call sees the new serving one.
    let (ok, _, err) = c.grpcurl(
        Host::ControlPlane,
        &[
            &format!("{CP_V4}:{CONTROLLER_GRPC_PORT}"),
            "kubenft.v1.ControllerInspect/ListNodes",
        ],
    );
    assert!(ok, "{err}");
    drop(api);
}

/// Another agent process in `host`'s namespace claiming `--node-name node`, with its own
/// table, ports and state so it can never touch the real agent's.
fn spawn_extra_agent(
    c: &Cluster,
    name: &str,
    host: &str,
    node: &str,
    token: &str,
    ca: &Path,
) -> Process {
    let kubeconfig = write_kubeconfig(&c.lab, name, Some(token));
    let state = c.lab.dir().join(format!("state-{name}"));
    std::fs::create_dir_all(&state).unwrap();
    let url = format!("https://{CP_V4}:{CONTROLLER_GRPC_PORT}");
    let bin = c.lab.binary("kubenft-agent").unwrap().display().to_string();
    let dir = cert_dir(&c.lab, name);
    let argv = [
        bin.as_str(),
        "--node-name",
        node,
        "--state-dir",
        state.to_str().unwrap(),
        "--table-name",
        name,
        "--healthz-listen",
        "127.0.0.1:20256",
        "--metrics-listen",
        "127.0.0.1:20249",
        "--grpc-listen",
        "127.0.0.1:20652",
        "--controller",
        &url,
        "--controller-ca-file",
        ca.to_str().unwrap(),
        "--cert-dir",
        dir.to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    c.lab.spawn(name, Host::Node(host), &argv).unwrap()
}
