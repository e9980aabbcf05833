//! The `kubenft-fake-apiserver` binary as the lab runs it: `--users` names the tokens' users,
//! `--token-kubeconfig` writes a kubeconfig per token, and a client configured from it is that
//! user (its CSRs say so); a file with a user without a name is refused at start.

use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(10);

const CSR_PEM: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIHpMIGRAgEAMC8xFTATBgNVBAoMDHN5c3RlbTpub2RlczEWMBQGA1UEAwwNc3lz
dGVtOm5vZGU6YTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABAOeGAzooEjJU7yT
3uBhr9zhhLTlgV5VsskzCKh0Pl3FNWRvn5m87//rtG5bnCzxnCC6ueckSxgYvHzP
mmgEFUCgADAKBggqhkjOPQQDAgNHADBEAiAZpdjuKZ3SHpL/JFbUVfghIAjFVTS1
vtlIYJNcRZn68AIgPBXOLRL70AQz9pF61DuqrhkFywAeKKGk6TPt0uaVBj8=
-----END CERTIFICATE REQUEST-----
";

fn binary() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kubenft-fake-apiserver"));
    c.kill_on_drop(true)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

#[tokio::test]
async fn users_file_tokens_and_their_kubeconfigs() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.json");
    std::fs::write(
        &users,
        r#"{"token-b": {"username": "system:serviceaccount:kube-system:kubenft-agent",
                        "uid": "u-b", "groups": ["system:serviceaccounts"],
                        "extra": {"authentication.kubernetes.io/node-name": ["b"]}}}"#,
    )
    .unwrap();
    let kubeconfig = dir.path().join("agent-b.kubeconfig");
    let mut child = binary()
        .arg("--users")
        .arg(&users)
        .arg("--token-kubeconfig")
        .arg(format!("token-b={}", kubeconfig.display()))
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .expect("the URL is printed")
        .unwrap()
        .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let kc = Kubeconfig::from_yaml(&std::fs::read_to_string(&kubeconfig).unwrap()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string().trim_end_matches('/'), url);
    let csrs = Api::<CertificateSigningRequest>::all(kube::Client::try_from(config).unwrap());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some("node-b".into()),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(CSR_PEM.as_bytes().to_vec()),
            signer_name: "kubenft.io/node-client".into(),
            usages: Some(vec!["client auth".into()]),
            ..CertificateSigningRequestSpec::default()
        },
        status: None,
    };
    let created = csrs.create(&PostParams::default(), &csr).await.unwrap();
    assert_eq!(
        created.spec.username.as_deref(),
        Some("system:serviceaccount:kube-system:kubenft-agent")
    );
    assert_eq!(
        created.spec.extra.unwrap()["authentication.kubernetes.io/node-name"],
        ["b"]
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_user_without_a_name_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.json");
    std::fs::write(&users, r#"{"t": {"username": ""}}"#).unwrap();
    let out = tokio::time::timeout(
        WAIT,
        binary()
            .arg("--users")
            .arg(&users)
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("exits")
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("users.json") && err.contains("has no username"),
        "{err}"
    );
}
