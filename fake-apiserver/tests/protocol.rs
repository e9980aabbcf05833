//! The fake speaks the API server's list/watch protocol: checked on the wire (raw HTTP, so the
//! exact lines are visible) and with the real `kube` client.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams};
use kubenft_fake_apiserver::{FakeApiServer, Kind};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

fn service(ns: &str, name: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"ports": [{"port": 80}]}})
}

async fn start() -> FakeApiServer {
    FakeApiServer::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// Sends a GET and returns the connection, positioned at the response.
async fn get(api: &FakeApiServer, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(api.addr()).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

/// Reads until `want` appears (or the connection ends); returns everything read.
async fn read_until(s: &mut TcpStream, want: &str) -> String {
    read_for(s, want, WAIT).await
}

/// As [`read_until`], giving up after `limit`.
async fn read_for(s: &mut TcpStream, want: &str, limit: Duration) -> String {
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !text.contains(want) {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
    text
}

#[tokio::test]
async fn the_kube_client_lists_with_namespaces_folded() {
    let api = start().await;
    api.apply(service("default", "a")).unwrap();
    api.apply(service("other", "b")).unwrap();
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let all = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(all.items.len(), 2);
    assert_eq!(
        all.metadata.resource_version,
        Some(api.resource_version().to_string())
    );
    let other = Api::<Service>::namespaced(client, "other")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(other.items.len(), 1);
    assert_eq!(other.items[0].metadata.name.as_deref(), Some("b"));
}

#[tokio::test]
async fn watch_streams_events_after_a_version_and_bookmarks() {
    let api = start().await;
    let rv = api.apply(service("default", "a")).unwrap().unwrap();
    let mut w = get(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"),
    )
    .await;
    api.apply(service("default", "b")).unwrap();
    let text = read_until(&mut w, r#""name":"b""#).await;
    assert!(text.contains(r#""type":"ADDED""#), "{text}");
    assert!(
        !text.contains(r#""name":"a""#),
        "events before {rv} replayed: {text}"
    );
    // A change elsewhere moves this watch's version on with a bookmark.
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}))
        .unwrap();
    let text = read_until(&mut w, "BOOKMARK").await;
    assert!(
        text.contains(&format!(
            r#""resourceVersion":"{}""#,
            api.resource_version()
        )),
        "{text}"
    );
    assert!(api.delete(Kind::Service, "default", "b"));
    assert!(read_until(&mut w, "DELETED").await.contains("DELETED"));
}

#[tokio::test]
async fn expired_history_is_410_gone_in_the_stream() {
    let api = start().await;
    let rv = api.apply(service("default", "a")).unwrap().unwrap();
    let mut open = get(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    )
    .await;
    read_until(&mut open, "\r\n\r\n").await;
    api.apply(service("default", "b")).unwrap();
    api.expire_history();
    let text = read_until(&mut open, r#""code":410"#).await;
    assert!(
        text.contains(r#""type":"ERROR""#) && text.contains("Expired"),
        "{text}"
    );
    // Resuming from before the expiry: the same answer.
    let mut late = get(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    )
    .await;
    let text = read_until(&mut late, r#""code":410"#).await;
    assert!(
        text.contains("HTTP/1.0 200") || text.contains("HTTP/1.1 200"),
        "{text}"
    );
    assert!(text.contains(r#""code":410"#), "{text}");
}

#[tokio::test]
async fn faults_fail_drop_and_stall() {
    let api = start().await;
    api.fail_next(2, 500);
    for _ in 0..2 {
        let text = read_until(&mut get(&api, "/api/v1/nodes").await, "\"code\"").await;
        assert!(text.contains(" 500 "), "{text}");
    }
    let text = read_until(&mut get(&api, "/api/v1/nodes").await, "NodeList").await;
    assert!(text.contains(" 200 "), "{text}");

    let rv = api.resource_version();
    let mut w = get(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    )
    .await;
    api.stall_watches(true);
    api.apply(service("default", "a")).unwrap();
    let text = read_for(&mut w, r#""name":"a""#, Duration::from_millis(300)).await;
    assert!(
        !text.contains(r#""name":"a""#),
        "stalled watch delivered: {text}"
    );
    api.stall_watches(false);
    assert!(
        read_until(&mut w, r#""name":"a""#)
            .await
            .contains(r#""name":"a""#)
    );
    api.drop_watches();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, w.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "dropped watch still open");
}

/// Sends one request with a body and returns the whole response (the server closes HTTP/1.0).
async fn send(api: &FakeApiServer, head: &str, body: &str) -> String {
    let mut s = TcpStream::connect(api.addr()).await.unwrap();
    let request = format!(
        "{head}\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut text = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut text))
        .await
        .expect("response within the wait")
        .unwrap();
    String::from_utf8_lossy(&text).into_owned()
}

#[tokio::test]
async fn writes_answer_with_the_api_servers_status_codes() {
    let api = start().await;
    let maps = "/api/v1/namespaces/kube-system/configmaps";
    let cm = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ca"},"data":{"a":"1"}}"#;
    let created = send(&api, &format!("POST {maps} HTTP/1.0"), cm).await;
    assert!(
        created.starts_with("HTTP/1.0 201") || created.starts_with("HTTP/1.1 201"),
        "{created}"
    );
    assert!(
        created.contains(r#""namespace":"kube-system""#),
        "{created}"
    );
    let again = send(&api, &format!("POST {maps} HTTP/1.0"), cm).await;
    assert!(
        again.contains(" 409 ") && again.contains(r#""reason":"AlreadyExists""#),
        "{again}"
    );

    let stale =
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ca","resourceVersion":"1"}}"#;
    let put = send(&api, &format!("PUT {maps}/ca HTTP/1.0"), stale).await;
    assert!(
        put.contains(" 409 ") && put.contains(r#""reason":"Conflict""#),
        "{put}"
    );
    let wrong_name = send(
        &api,
        &format!("PUT {maps}/other HTTP/1.0"),
        r#"{"metadata":{"name":"ca"}}"#,
    )
    .await;
    assert!(
        wrong_name.contains(" 400 ") && wrong_name.contains("does not match the name on the URL"),
        "{wrong_name}"
    );

    let patch = send(
        &api,
        &format!("PATCH {maps}/ca HTTP/1.0\r\nContent-Type: application/json"),
        "{}",
    )
    .await;
    assert!(patch.contains(" 415 "), "{patch}");
    let token = send(
        &api,
        &format!("GET {maps}/ca HTTP/1.0\r\nAuthorization: Bearer nobody"),
        "",
    )
    .await;
    assert!(
        token.contains(" 401 ") && token.contains(r#""reason":"Unauthorized""#),
        "{token}"
    );
    let not_served = send(&api, "POST /api/v1/configmaps HTTP/1.0", cm).await;
    assert!(not_served.contains(" 405 "), "{not_served}");

    let deleted = send(&api, &format!("DELETE {maps}/ca HTTP/1.0"), "").await;
    assert!(
        deleted.contains(" 200 ") && deleted.contains(r#""name":"ca""#),
        "{deleted}"
    );
    let gone = send(&api, &format!("GET {maps}/ca HTTP/1.0"), "").await;
    assert!(
        gone.contains(" 404 ") && gone.contains(r#""message":"configmaps \"ca\" not found""#),
        "{gone}"
    );
}

#[tokio::test]
async fn field_selectors_filter_lists_and_refuse_unknown_fields() {
    let api = start().await;
    for (name, signer) in [("a", "kubenft.io/node-client"), ("b", "example.com/other")] {
        api.apply(json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name}, "spec": {"signerName": signer},
        }))
        .unwrap();
    }
    let csrs = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
    let mine = read_until(
        &mut get(
            &api,
            &format!("{csrs}?fieldSelector=spec.signerName%3Dkubenft.io%2Fnode-client"),
        )
        .await,
        "CertificateSigningRequestList",
    )
    .await;
    assert!(
        mine.contains(r#""name":"a""#) && !mine.contains(r#""name":"b""#),
        "{mine}"
    );
    let by_name = read_until(
        &mut get(&api, &format!("{csrs}?fieldSelector=metadata.name%3Db")).await,
        "CertificateSigningRequestList",
    )
    .await;
    assert!(
        by_name.contains(r#""name":"b""#) && !by_name.contains(r#""name":"a""#),
        "{by_name}"
    );
    let unknown = read_until(
        &mut get(&api, &format!("{csrs}?fieldSelector=spec.username%3Dx")).await,
        "\"code\"",
    )
    .await;
    assert!(
        unknown.contains(" 400 ") && unknown.contains("field label not supported: spec.username"),
        "{unknown}"
    );
}

#[tokio::test]
async fn a_manifest_resync_deletes_only_what_left_the_manifests() {
    let api = start().await;
    api.sync_to(vec![service("default", "a"), service("default", "b")])
        .unwrap();
    api.apply(service("default", "applied")).unwrap();
    let cm = r#"{"metadata":{"name":"written"},"data":{"a":"1"}}"#;
    let created = send(
        &api,
        "POST /api/v1/namespaces/default/configmaps HTTP/1.0",
        cm,
    )
    .await;
    assert!(created.contains(" 201 "), "{created}");

    assert_eq!(api.sync_to(vec![service("default", "a")]).unwrap(), 1);
    let names: Vec<String> = api.keys().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["a", "applied", "written"], "b left the manifests");
}
