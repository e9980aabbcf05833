//! The writes certificate issuance makes, through the real `kube` client: an agent requests a
//! certificate with a CertificateSigningRequest under its own token, a signer approves it and
//! writes the certificate through the subresources, and keeps its CA in a Secret and a
//! ConfigMap. What the client sees (objects, status codes, `Status` reasons, watch events) must
//! be what a real API server would give it.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{
    Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kubenft_fake_apiserver::{FakeApiServer, Kind, Resource, UserInfo, Verb};
use serde_json::json;

/// Every wait is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

const SIGNER: &str = "kubenft.io/node-client";
const AGENT: &str = "system:serviceaccount:kube-system:kubenft-agent";
const AGENT_TOKEN: &str = "agent-on-node-a";

/// A real PKCS#10 request (openssl, EC P-256, CN `system:node:a`).
const CSR_PEM: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIHpMIGRAgEAMC8xFTATBgNVBAoMDHN5c3RlbTpub2RlczEWMBQGA1UEAwwNc3lz
dGVtOm5vZGU6YTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABAOeGAzooEjJU7yT
3uBhr9zhhLTlgV5VsskzCKh0Pl3FNWRvn5m87//rtG5bnCzxnCC6ueckSxgYvHzP
mmgEFUCgADAKBggqhkjOPQQDAgNHADBEAiAZpdjuKZ3SHpL/JFbUVfghIAjFVTS1
vtlIYJNcRZn68AIgPBXOLRL70AQz9pF61DuqrhkFywAeKKGk6TPt0uaVBj8=
-----END CERTIFICATE REQUEST-----
";

/// A real certificate (openssl, self-signed, CN `system:node:a`).
const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBhDCCASugAwIBAgIUJQEmpSXhf4CbW8UZHoWYBBViL+0wCgYIKoZIzj0EAwIw
GDEWMBQGA1UEAwwNc3lzdGVtOm5vZGU6YTAeFw0yNjEyMDYwOTM3NTFaFw0zNjEy
MDMwOTM3NTFaMBgxFjAUBgNVBAMMDXN5c3RlbTpub2RlOmEwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAAQDnhgM6KBIyVO8k97gYa/c4YS05YFeVbLJMwiodD5dxTVk
b5+ZvO//67RuW5ws8ZwgurnnJEsYGLx8z5poBBVAo1MwUTAdBgNVHQ4EFgQUHnf7
q8VOwQsEwZS+MyiHTCn8y20wHwYDVR0jBBgwFoAUHnf7q8VOwQsEwZS+MyiHTCn8
y20wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiAUt6ZSziMrwpYZ
+0G3NhaoTO9k750WiNGXOQUEfEPTugIgIMqDdxiPTsoEWr5JR3DZ3lzntgyz8JKy
HehcWqVUDCI=
-----END CERTIFICATE-----
";

async fn start() -> FakeApiServer {
    let api = FakeApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    api.add_user(
        AGENT_TOKEN,
        UserInfo {
            username: AGENT.into(),
            uid: "9f0c3a52-0000-4000-8000-00000000000a".into(),
            groups: vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:kube-system".into(),
            ],
            extra: BTreeMap::from([(
                "authentication.kubernetes.io/node-name".into(),
                vec!["a".into()],
            )]),
        },
    );
    api
}

/// A client configured the way a deployed program is: from the kubeconfig the fake writes.
async fn client_from(kubeconfig: &str) -> kube::Client {
    let kc = Kubeconfig::from_yaml(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// The admin (no credentials), as the signer runs in these tests.
async fn admin(api: &FakeApiServer) -> kube::Client {
    client_from(&api.kubeconfig()).await
}

async fn agent(api: &FakeApiServer) -> kube::Client {
    client_from(&api.kubeconfig_with_token(AGENT_TOKEN)).await
}

fn request(name: Option<&str>, signer: &str) -> CertificateSigningRequest {
    CertificateSigningRequest {
        metadata: ObjectMeta {
            name: name.map(str::to_owned),
            generate_name: name.is_none().then(|| "node-a-".to_owned()),
            ..ObjectMeta::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(CSR_PEM.as_bytes().to_vec()),
            signer_name: signer.into(),
            usages: Some(vec!["client auth".into(), "digital signature".into()]),
            // Forged identity: the server must replace all of it.
            username: Some("system:node:b".into()),
            groups: Some(vec!["system:masters".into()]),
            uid: Some("forged".into()),
            extra: Some(BTreeMap::from([(
                "authentication.kubernetes.io/node-name".into(),
                vec!["b".into()],
            )])),
            ..CertificateSigningRequestSpec::default()
        },
        // Pre-approval is not possible either.
        status: Some(CertificateSigningRequestStatus {
            conditions: Some(vec![condition("Approved")]),
            certificate: Some(ByteString(CERT_PEM.as_bytes().to_vec())),
        }),
    }
}

fn condition(kind: &str) -> CertificateSigningRequestCondition {
    CertificateSigningRequestCondition {
        type_: kind.into(),
        status: "True".into(),
        reason: Some("KubenftSigner".into()),
        message: Some(format!("{kind} by the test")),
        ..CertificateSigningRequestCondition::default()
    }
}

/// The `Status` of a refused call.
fn refusal<T: std::fmt::Debug>(r: kube::Result<T>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn condition_types(csr: &CertificateSigningRequest) -> Vec<String> {
    csr.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .map(|c| c.type_.clone())
        .collect()
}

#[tokio::test]
async fn a_csr_carries_the_identity_of_its_token_not_what_the_client_wrote() {
    let api = start().await;
    let csrs = Api::<CertificateSigningRequest>::all(agent(&api).await);
    let created = csrs
        .create(&PostParams::default(), &request(None, SIGNER))
        .await
        .unwrap();

    let name = created.metadata.name.clone().unwrap();
    assert!(
        name.starts_with("node-a-") && name.len() == "node-a-".len() + 5,
        "{name}"
    );
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    assert!(created.metadata.resource_version.is_some());
    let spec = &created.spec;
    assert_eq!(spec.username.as_deref(), Some(AGENT));
    assert_eq!(
        spec.uid.as_deref(),
        Some("9f0c3a52-0000-4000-8000-00000000000a")
    );
    assert_eq!(
        spec.groups.as_deref().unwrap(),
        [
            "system:serviceaccounts",
            "system:serviceaccounts:kube-system",
            "system:authenticated"
        ]
    );
    assert_eq!(
        spec.extra.as_ref().unwrap()["authentication.kubernetes.io/node-name"],
        ["a"]
    );
    assert!(
        condition_types(&created).is_empty(),
        "pre-approved: {created:?}"
    );
    assert!(created.status.and_then(|s| s.certificate).is_none());
    // What a later reader (the signer) sees is the same.
    let stored = Api::<CertificateSigningRequest>::all(admin(&api).await)
        .get(&name)
        .await
        .unwrap();
    assert_eq!(stored.spec.username.as_deref(), Some(AGENT));
    assert_eq!(
        api.get(Kind::CertificateSigningRequest, "", &name).unwrap()["spec"]["username"],
        AGENT
    );

    // Without credentials, the fake's admin.
    let by_admin = Api::<CertificateSigningRequest>::all(admin(&api).await)
        .create(&PostParams::default(), &request(Some("by-admin"), SIGNER))
        .await
        .unwrap();
    assert_eq!(by_admin.spec.username.as_deref(), Some("kubernetes-admin"));
}

#[tokio::test]
async fn an_unknown_token_is_401_for_every_verb() {
    let api = start().await;
    let stranger = client_from(&api.kubeconfig_with_token("not-a-token")).await;
    let csrs = Api::<CertificateSigningRequest>::all(stranger.clone());
    let s = refusal(
        csrs.create(&PostParams::default(), &request(None, SIGNER))
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (401, "Unauthorized"));
    let s = refusal(csrs.list(&Default::default()).await);
    assert_eq!(s.code, 401);
    let s = refusal(
        Api::<Secret>::namespaced(stranger, "kube-system")
            .get("ca")
            .await,
    );
    assert_eq!(s.code, 401);
    assert!(
        api.list(Kind::CertificateSigningRequest).is_empty(),
        "nothing created"
    );
}

#[tokio::test]
async fn invalid_requests_are_422_naming_the_field() {
    let api = start().await;
    let csrs = Api::<CertificateSigningRequest>::all(agent(&api).await);
    let mut no_usages = request(Some("x"), SIGNER);
    no_usages.spec.usages = None;
    let s = refusal(csrs.create(&PostParams::default(), &no_usages).await);
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        s.message,
        r#"CertificateSigningRequest.certificates.k8s.io "x" is invalid: spec.usages: Required value"#
    );
    let causes = s.details.unwrap().causes;
    assert_eq!(causes[0].field, "spec.usages");

    let mut a_certificate = request(Some("x"), "");
    a_certificate.spec.request = ByteString(CERT_PEM.as_bytes().to_vec());
    let s = refusal(csrs.create(&PostParams::default(), &a_certificate).await);
    assert!(
        s.message.contains("spec.request: Invalid value")
            && s.message
                .contains("PEM block type must be CERTIFICATE REQUEST")
            && s.message.contains("spec.signerName: Required value"),
        "{}",
        s.message
    );
    assert!(api.list(Kind::CertificateSigningRequest).is_empty());
}

#[tokio::test]
async fn secrets_and_configmaps_refuse_duplicates_and_stale_updates() {
    let api = start().await;
    let client = admin(&api).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "kube-system");
    let ca = Secret {
        metadata: ObjectMeta {
            name: Some("kubenft-ca".into()),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([("tls.key".into(), "KEY v1".into())])),
        ..Secret::default()
    };
    let first = secrets.create(&PostParams::default(), &ca).await.unwrap();
    assert_eq!(first.metadata.namespace.as_deref(), Some("kube-system"));
    assert_eq!(first.type_.as_deref(), Some("Opaque"));
    assert_eq!(first.data.as_ref().unwrap()["tls.key"].0, b"KEY v1");
    assert!(first.string_data.is_none(), "stringData is never stored");

    // A second controller replica racing to create the CA loses with AlreadyExists.
    let s = refusal(secrets.create(&PostParams::default(), &ca).await);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(s.message, r#"secrets "kubenft-ca" already exists"#);

    // Replica 1 rotates; replica 2 still holds the first version and must lose with Conflict.
    let mut rotated = first.clone();
    rotated.data = Some(BTreeMap::from([(
        "tls.key".into(),
        ByteString(b"KEY v2".to_vec()),
    )]));
    let second = secrets
        .replace("kubenft-ca", &PostParams::default(), &rotated)
        .await
        .unwrap();
    assert_ne!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    assert_eq!(second.metadata.uid, first.metadata.uid);
    let mut stale = first.clone();
    stale.data = Some(BTreeMap::from([(
        "tls.key".into(),
        ByteString(b"KEY v3".to_vec()),
    )]));
    let s = refusal(
        secrets
            .replace("kubenft-ca", &PostParams::default(), &stale)
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        secrets.get("kubenft-ca").await.unwrap().data.unwrap()["tls.key"].0,
        b"KEY v2",
        "the stale write changed nothing"
    );

    // The CA certificate is published in a ConfigMap: apply creates it, merge patch edits it.
    let maps = Api::<ConfigMap>::namespaced(client, "kube-system");
    let published = maps
        .patch(
            "kubenft-ca",
            &PatchParams::apply("kubenft-controller"),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "kubenft-ca"}, "data": {"ca.crt": CERT_PEM},
            })),
        )
        .await
        .unwrap();
    assert_eq!(published.data.as_ref().unwrap()["ca.crt"], CERT_PEM);
    let patched = maps
        .patch(
            "kubenft-ca",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"next.crt": "x"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap().len(), 2);
    let s = refusal(maps.get("missing").await);
    assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
    assert_eq!(s.message, r#"configmaps "missing" not found"#);
    let s = refusal(
        maps.replace(
            "missing",
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("missing".into()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            },
        )
        .await,
    );
    assert_eq!(s.code, 404, "update does not create");

    let deleted = maps
        .delete("kubenft-ca", &DeleteParams::default())
        .await
        .unwrap();
    assert!(deleted.is_left(), "the deleted object is returned");
    assert!(maps.get_opt("kubenft-ca").await.unwrap().is_none());
}

/// Reads the watch until the CSR `name` has a certificate; returns (type, conditions,
/// has certificate) of every event about it, and the names of every object it saw.
async fn watch_until_signed(
    events: impl futures::Stream<Item = kube::Result<WatchEvent<CertificateSigningRequest>>>,
    name: &str,
) -> (Vec<(&'static str, Vec<String>, bool)>, Vec<String>) {
    let mut seen = Vec::new();
    let mut names = Vec::new();
    let mut events = std::pin::pin!(events);
    let read = async {
        while let Some(event) = events.try_next().await.unwrap() {
            let (kind, csr) = match event {
                WatchEvent::Added(c) => ("ADDED", c),
                WatchEvent::Modified(c) => ("MODIFIED", c),
                WatchEvent::Deleted(c) => ("DELETED", c),
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Error(e) => panic!("watch error: {e:?}"),
            };
            let csr_name = csr.metadata.name.clone().unwrap();
            names.push(csr_name.clone());
            if csr_name != name {
                continue;
            }
            let signed = csr
                .status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .is_some();
            seen.push((kind, condition_types(&csr), signed));
            if signed {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .unwrap_or_else(|_| panic!("no certificate seen; events so far: {seen:?}"));
    (seen, names)
}

#[tokio::test]
async fn approval_and_certificate_go_through_their_subresources_and_are_watched() {
    let api = start().await;
    let signer = Api::<CertificateSigningRequest>::all(admin(&api).await);
    let agent_csrs = Api::<CertificateSigningRequest>::all(agent(&api).await);
    let events = signer
        .watch(
            &WatchParams::default().fields(&format!("spec.signerName={SIGNER}")),
            "0",
        )
        .await
        .unwrap();
    // One request for another signer: the signer's watch must not see it.
    agent_csrs
        .create(
            &PostParams::default(),
            &request(
                Some("for-kubelet"),
                "kubernetes.io/kube-apiserver-client-kubelet",
            ),
        )
        .await
        .unwrap();
    let csr = agent_csrs
        .create(&PostParams::default(), &request(None, SIGNER))
        .await
        .unwrap();
    let name = csr.metadata.name.clone().unwrap();

    // The requester cannot approve or sign through the main resource: silently kept as is.
    let mut sneaky = csr.clone();
    sneaky.status = request(None, SIGNER).status;
    sneaky.spec.signer_name = "other.io/signer".into();
    let kept = agent_csrs
        .replace(&name, &PostParams::default(), &sneaky)
        .await
        .unwrap();
    assert_eq!(kept.spec.signer_name, SIGNER);
    assert!(condition_types(&kept).is_empty());
    assert_eq!(
        kept.metadata.resource_version, csr.metadata.resource_version,
        "no-op"
    );

    // Approval, as a signer does it: PATCH of /approval (kube has no dedicated method).
    let approved = signer
        .patch_subresource(
            "approval",
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [condition("Approved")]}})),
        )
        .await
        .unwrap();
    assert_eq!(condition_types(&approved), ["Approved"]);
    let cond = &approved
        .status
        .as_ref()
        .unwrap()
        .conditions
        .as_ref()
        .unwrap()[0];
    assert!(cond.last_update_time.is_some() && cond.last_transition_time.is_some());
    assert!(approved.status.as_ref().unwrap().certificate.is_none());

    // Approved and Denied are exclusive, and an approval cannot be taken back.
    let mut deny = approved.clone();
    deny.status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()
        .push(condition("Denied"));
    let s = refusal(
        signer
            .replace_subresource("approval", &name, &PostParams::default(), &deny)
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert!(
        s.message
            .contains("Approved and Denied conditions are mutually exclusive"),
        "{}",
        s.message
    );
    let mut withdraw = approved.clone();
    withdraw.status.as_mut().unwrap().conditions = Some(Vec::new());
    let s = refusal(
        signer
            .replace_subresource("approval", &name, &PostParams::default(), &withdraw)
            .await,
    );
    assert!(
        s.message
            .contains(r#"updates may not remove a condition of type "Approved""#),
        "{}",
        s.message
    );

    // The certificate through /status (replace_status), once.
    let mut signed = signer.get_status(&name).await.unwrap();
    signed.status.as_mut().unwrap().certificate = Some(ByteString(CERT_PEM.as_bytes().to_vec()));
    let signed = signer
        .replace_status(&name, &PostParams::default(), &signed)
        .await
        .unwrap();
    assert_eq!(
        signed
            .status
            .as_ref()
            .unwrap()
            .certificate
            .as_ref()
            .unwrap()
            .0,
        CERT_PEM.as_bytes()
    );
    assert_eq!(
        condition_types(&signed),
        ["Approved"],
        "status kept the approval"
    );
    let s = refusal(
        signer
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"certificate": "AAAA"}})),
            )
            .await,
    );
    assert_eq!(s.code, 422);
    assert!(
        s.message
            .contains("updates may not modify existing certificate content"),
        "{}",
        s.message
    );

    let (seen, names) = watch_until_signed(events, &name).await;
    assert_eq!(
        seen,
        [
            ("ADDED", vec![], false),
            ("MODIFIED", vec!["Approved".to_owned()], false),
            ("MODIFIED", vec!["Approved".to_owned()], true),
        ],
        "one event per accepted change, none for refused or no-op writes"
    );
    assert!(!names.contains(&"for-kubelet".to_owned()), "{names:?}");
}

#[tokio::test]
async fn patch_status_and_replace_subresource_serve_a_second_signer_style() {
    let api = start().await;
    let signer = Api::<CertificateSigningRequest>::all(admin(&api).await);
    let csr = Api::<CertificateSigningRequest>::all(agent(&api).await)
        .create(&PostParams::default(), &request(Some("node-a"), SIGNER))
        .await
        .unwrap();
    let mut approve = csr.clone();
    approve.status = Some(CertificateSigningRequestStatus {
        conditions: Some(vec![condition("Approved")]),
        certificate: None,
    });
    let approved = signer
        .replace_subresource("approval", "node-a", &PostParams::default(), &approve)
        .await
        .unwrap();
    assert_eq!(condition_types(&approved), ["Approved"]);
    let signed = signer
        .patch_status(
            "node-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"certificate": k8s_b64(CERT_PEM.as_bytes())}})),
        )
        .await
        .unwrap();
    assert_eq!(
        signed.status.unwrap().certificate.unwrap().0,
        CERT_PEM.as_bytes()
    );
    let waited = api
        .wait_for(Kind::CertificateSigningRequest, "", "node-a", WAIT, |o| {
            o.pointer("/status/certificate").is_some()
        })
        .await;
    assert!(waited.is_some());
}

/// Base64 as the API encodes bytes.
fn k8s_b64(bytes: &[u8]) -> serde_json::Value {
    serde_json::to_value(ByteString(bytes.to_vec())).unwrap()
}

#[tokio::test]
async fn denied_users_get_403_and_others_are_unaffected() {
    let api = start().await;
    api.deny(
        AGENT,
        Verb::Update,
        Resource::sub(Kind::CertificateSigningRequest, "approval"),
    );
    api.deny(AGENT, Verb::Get, Kind::Secret);
    let agent_csrs = Api::<CertificateSigningRequest>::all(agent(&api).await);
    let csr = agent_csrs
        .create(&PostParams::default(), &request(Some("node-a"), SIGNER))
        .await
        .unwrap();
    let mut approve = csr.clone();
    approve.status = Some(CertificateSigningRequestStatus {
        conditions: Some(vec![condition("Approved")]),
        certificate: None,
    });
    let s = refusal(
        agent_csrs
            .replace_subresource("approval", "node-a", &PostParams::default(), &approve)
            .await,
    );
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        s.message,
        format!(
            r#"certificatesigningrequests.certificates.k8s.io "node-a" is forbidden: User "{AGENT}" cannot update resource "certificatesigningrequests/approval" in API group "certificates.k8s.io" at the cluster scope"#
        )
    );
    let s = refusal(
        Api::<Secret>::namespaced(agent(&api).await, "kube-system")
            .get("kubenft-ca")
            .await,
    );
    assert_eq!(s.code, 403);
    assert!(condition_types(&agent_csrs.get("node-a").await.unwrap()).is_empty());
    // The admin is not denied.
    let approved = Api::<CertificateSigningRequest>::all(admin(&api).await)
        .replace_subresource("approval", "node-a", &PostParams::default(), &approve)
        .await
        .unwrap();
    assert_eq!(condition_types(&approved), ["Approved"]);
}
