//! etcd-only behaviour: key prefixes isolate stores sharing one etcd, and an empty prefix means
//! the whole keyspace.

use std::time::Duration;

use futures::StreamExt;
use skiff_store::Store;
use skiff_store::etcd::EtcdStore;
use skiff_store::etcd_server::{EtcdServer, etcd_for_test};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_isolate_stores_and_an_empty_prefix_sees_everything() {
    let Some(binary) = etcd_for_test("prefixes_isolate_stores_and_an_empty_prefix_sees_everything")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let server = EtcdServer::start(&binary, &dir.path().join("etcd"))
        .await
        .expect("start etcd");
    let one = EtcdStore::connect(&server.endpoints(), "/one/")
        .await
        .expect("connect");
    let two = EtcdStore::connect(&server.endpoints(), "/two/")
        .await
        .expect("connect");
    let all = EtcdStore::connect(&server.endpoints(), "")
        .await
        .expect("connect");

    let mut watch_all = all.watch("", 0).await.expect("watch everything");
    one.create("k", b"1".to_vec()).await.expect("create");
    two.create("k", b"2".to_vec()).await.expect("create");

    assert_eq!(
        one.get("k").await.expect("get").expect("present").value,
        b"1"
    );
    assert_eq!(
        two.get("k").await.expect("get").expect("present").value,
        b"2"
    );
    let keys: Vec<String> = one
        .list("")
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["k"]);
    let keys: Vec<String> = all
        .list("")
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["/one/k", "/two/k"]);

    let mut seen = Vec::new();
    for _ in 0..2 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch_all.next())
            .await
            .expect("event in time")
            .expect("stream open")
            .expect("event");
        seen.push(event.key().to_string());
    }
    assert_eq!(seen, ["/one/k", "/two/k"]);
    // Revisions are etcd's, shared by every prefix.
    assert_eq!(
        one.current_revision().await.expect("revision"),
        two.current_revision().await.expect("revision")
    );
}

#[tokio::test]
async fn connecting_to_nothing_is_a_clear_error() {
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let endpoints = vec![format!("http://127.0.0.1:{port}")];
    match EtcdStore::connect(&endpoints, "/skiff/").await {
        Err(skiff_store::StoreError::Backend(message)) => {
            assert!(
                message.contains("etcd") && message.contains(&port.to_string()),
                "{message}"
            );
        }
        Err(other) => panic!("expected Backend, got {other}"),
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(EtcdStore::connect(&[], "/skiff/").await.is_err());
}
