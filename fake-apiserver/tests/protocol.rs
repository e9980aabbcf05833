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
