//! The agents' certificate signer end to end in one process: two controller replicas (the
//! real library) and the agent's certificate client (`kubenft_agent::certs`) with the real
//! `kube` client against the fake API server, which fills in each request's requester from
//! its bearer token as the API server does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use kubenft_agent::certs::{CertDir, Certs};
use kubenft_controller::signer::review::{NODE_NAME_EXTRA, Policy};
use kubenft_controller::signer::{CaRef, SIGNER_NAME, Serving, SignerConfig};
use kubenft_controller::{Config, cli::SourceArg};
use kubenft_fake_apiserver::{FakeApiServer, Kind, UserInfo};
use kubenft_plan::ClusterPolicy;
use kubenft_tls::pki::{Leaf, Validity};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);
const AGENT_USER: &str = "system:serviceaccount:kubenft-system:kubenft-agent";

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn user(name: &str, node: Option<&str>) -> UserInfo {
    UserInfo {
        username: name.into(),
        uid: format!("uid-{name}"),
        groups: vec!["system:serviceaccounts".into()],
        extra: node
            .map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_owned(), vec![n.to_owned()])]))
            .unwrap_or_default(),
    }
}

async fn fake() -> FakeApiServer {
    let f = FakeApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    f.apply(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "a"},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"},
                                 {"type": "Hostname", "address": "a"}]},
    }))
    .unwrap();
    f.add_user("token-a", user(AGENT_USER, Some("a")));
    f.add_user(
        "token-web",
        user("system:serviceaccount:default:web", Some("a")),
    );
    f
}

/// A controller replica with the signer on, serving with a certificate it issued into `dir`.
fn replica(kubeconfig: &Path, dir: &Path) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let serving = Serving {
        dir: dir.to_owned(),
        dns_names: vec!["kubenft-controller.kubenft-system.svc".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
    };
    let config = Config {
        source: SourceArg::Kube,
        grpc_listen: free_port(),
        http_listen: free_port(),
        policy: ClusterPolicy::default(),
        kubeconfig: Some(kubeconfig.to_owned()),
        tls: Some(serving.files()),
        signer: Some(SignerConfig {
            ca: CaRef {
                namespace: "kubenft-system".into(),
                name: "kubenft-ca".into(),
            },
            policy: Policy {
                agent_user: AGENT_USER.into(),
                max_duration: Duration::from_secs(3600),
            },
            serving: Some(serving),
        }),
    };
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        kubenft_controller::run(config, token).await.unwrap();
    });
    (shutdown, task)
}

async fn wait_file(path: &Path) -> String {
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never appeared", path.display());
}

fn openssl_verify(ca: &Path, cert: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(ca)
        .arg(cert)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn data(o: &Value, key: &str) -> String {
    o["data"][key].as_str().unwrap_or_default().to_owned()
}

fn kubeconfig_for(f: &FakeApiServer, dir: &Path, token: &str) -> PathBuf {
    let path = dir.join(format!("{token}.kubeconfig"));
    f.write_kubeconfig_for(&path, token).unwrap();
    path
}

async fn client_from(kubeconfig: &Path) -> Client {
    let file = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Two replicas start at once with no CA: exactly one CA is created, both use it (their
/// serving certificates verify against the published one), and it is published in the
/// ConfigMap. The agent's client, with its node-bound token, then gets a certificate for its
/// node with the Node's IP address, which verifies against the same CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_ca_and_an_agent_gets_its_nodes_certificate() {
    let f = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.kubeconfig");
    f.write_kubeconfig(&admin).unwrap();
    let (d1, d2) = (dir.path().join("r1"), dir.path().join("r2"));
    let (s1, t1) = replica(&admin, &d1);
    let (s2, t2) = replica(&admin, &d2);
    let serving = [
        wait_file(&d1.join("serving.pem")).await,
        wait_file(&d2.join("serving.pem")).await,
    ];
    assert!(serving.iter().all(|s| s.contains("PRIVATE KEY")));
    let secret = f
        .get(Kind::Secret, "kubenft-system", "kubenft-ca")
        .expect("the CA Secret");
    let published = f
        .wait_for(
            Kind::ConfigMap,
            "kubenft-system",
            "kubenft-ca",
            WAIT,
            |_| true,
        )
        .await
        .expect("the CA ConfigMap");
    let ca_pem = data(&published, "ca.crt");
    assert!(ca_pem.contains("BEGIN CERTIFICATE"), "{published}");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    assert_eq!(
        f.list(Kind::Secret).len(),
        1,
        "one CA for both replicas: {secret}"
    );
    for d in [&d1, &d2] {
        let verdict = openssl_verify(&ca_file, &d.join("serving.pem"));
        assert!(verdict.contains(": OK"), "{}: {verdict}", d.display());
    }

    let kubeconfig = kubeconfig_for(&f, dir.path(), "token-a");
    let certs = Certs::new(
        CertDir {
            dir: dir.path().join("agent-a"),
        },
        "a".into(),
        client_from(&kubeconfig).await,
    );
    let cancel = CancellationToken::new();
    let renew_at = tokio::time::timeout(WAIT, certs.ensure(&cancel))
        .await
        .expect("a certificate within 10 s")
        .unwrap();
    let file = dir.path().join("agent-a/kubenft-agent.pem");
    let pem = std::fs::read_to_string(&file).unwrap();
    let v = Validity::of_pem(&pem).unwrap();
    assert!(renew_at >= v.at_fraction(0.7) && renew_at <= v.at_fraction(0.9));
    let der = kubenft_tls::pki::pem_block(&pem, "CERTIFICATE").unwrap();
    assert_eq!(
        kubenft_tls::common_name(&der).as_deref(),
        Some("system:node:a")
    );
    let verdict = openssl_verify(&ca_file, &file);
    assert!(verdict.contains(": OK"), "{verdict}");
    let text = std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-ext",
            "subjectAltName,extendedKeyUsage",
            "-in",
        ])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("IP Address:10.0.0.1") && text.contains("TLS Web Client Authentication"),
        "{text}"
    );
    let csrs = f.list(Kind::CertificateSigningRequest);
    assert_eq!(csrs.len(), 1);
    assert_eq!(
        csrs[0]["spec"]["username"], AGENT_USER,
        "set by the API server"
    );
    let conditions = csrs[0]["status"]["conditions"].to_string();
    assert!(conditions.contains("Approved"), "{conditions}");

    for (s, t) in [(s1, t1), (s2, t2)] {
        s.cancel();
        t.await.unwrap();
    }
}

fn request(cn: &str) -> CertificateSigningRequest {
    let (pem, _) = kubenft_tls::pki::request(&Leaf {
        common_name: cn.into(),
        client: true,
        ..Leaf::default()
    })
    .unwrap();
    CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("test-".into()),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: SIGNER_NAME.into(),
            usages: Some(vec!["client auth".into()]),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    }
}

/// Requests the signer must refuse are denied with the field at fault and get no
/// certificate: another node's name, another ServiceAccount's token. A request for another
/// signer is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_another_node_or_from_another_account_are_denied() {
    let f = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.kubeconfig");
    f.write_kubeconfig(&admin).unwrap();
    let (shutdown, task) = replica(&admin, &dir.path().join("r1"));
    wait_file(&dir.path().join("r1/serving.pem")).await;

    let mut other = request("system:node:a");
    other.spec.signer_name = "example.com/other".into();
    let as_admin: Api<CertificateSigningRequest> = Api::all(client_from(&admin).await);
    let other = as_admin
        .create(&PostParams::default(), &other)
        .await
        .unwrap();

    let cases = [
        ("token-a", "system:node:b", "CN"),
        ("token-web", "system:node:a", "spec.username"),
    ];
    for (token, cn, why) in cases {
        let client: Api<CertificateSigningRequest> =
            Api::all(client_from(&kubeconfig_for(&f, dir.path(), token)).await);
        let created = client
            .create(&PostParams::default(), &request(cn))
            .await
            .unwrap();
        let name = created.metadata.name.unwrap();
        let denied = f
            .wait_for(Kind::CertificateSigningRequest, "", &name, WAIT, |o| {
                o["status"]["conditions"].to_string().contains("Denied")
            })
            .await
            .unwrap_or_else(|| panic!("{token} asking for {cn} was not denied"));
        let message = denied["status"]["conditions"][0]["message"].to_string();
        assert!(message.contains(why), "{token}/{cn}: {message}");
        assert!(denied["status"]["certificate"].is_null(), "{denied}");
    }
    let untouched = f
        .get(
            Kind::CertificateSigningRequest,
            "",
            other.metadata.name.as_deref().unwrap(),
        )
        .unwrap();
    assert!(untouched["status"]["conditions"].is_null(), "{untouched}");
    shutdown.cancel();
    task.await.unwrap();
}
