//! The server on a data directory it already initialised (credentials and objects are reused),
//! and the same API on a real etcd instead of SQLite.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_restart_reuses_credentials_and_keeps_objects() {
    let dir = tempfile::tempdir().expect("data dir");
    let config = || {
        let mut c = skiff_apiserver::ServerConfig::new(dir.path().to_path_buf());
        c.bind = "127.0.0.1:0".parse().expect("addr");
        c
    };
    let first = skiff_apiserver::start(config()).await.expect("first start");
    let (ca, token) = (first.ca_pem.clone(), first.admin_token.clone());
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("ca"))
        .tls_built_in_root_certs(false)
        .build()
        .expect("client");
    let url = |port: u16, path: &str| format!("https://127.0.0.1:{port}{path}");
    let r = client
        .post(url(first.addr.port(), "/api/v1/namespaces/default/configmaps"))
        .bearer_auth(&token)
        .json(&json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"kept"},"data":{"a":"1"}}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), StatusCode::CREATED);
    first.stop().await;

    let second = skiff_apiserver::start(config())
        .await
        .expect("second start");
    assert_eq!(second.ca_pem, ca, "the CA is reused");
    assert_eq!(second.admin_token, token, "the admin token is reused");
    // The same client (trusting the first CA) talks to the restarted server.
    let r = client
        .get(url(
            second.addr.port(),
            "/api/v1/namespaces/default/configmaps/kept",
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["data"]["a"], "1");
    // Bootstrap is idempotent: still exactly one kubernetes Service, and the kubeconfig names
    // the new port.
    let r = client
        .get(url(
            second.addr.port(),
            "/api/v1/namespaces/default/services",
        ))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list");
    let body: serde_json::Value = r.json().await.expect("json");
    let kubernetes = body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|s| s["metadata"]["name"] == "kubernetes")
        .count();
    assert_eq!(kubernetes, 1);
    let kc = skiff_apiserver::kubeconfig(dir.path()).expect("kubeconfig");
    assert!(
        kc.contains(&format!("https://127.0.0.1:{}", second.addr.port())),
        "{kc}"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_works_the_same_on_etcd() {
    let Some(binary) = skiff_store::etcd_server::etcd_for_test("the_api_works_the_same_on_etcd")
    else {
        return;
    };
    let etcd_dir = tempfile::tempdir().expect("etcd dir");
    let etcd = skiff_store::etcd_server::EtcdServer::start(&binary, etcd_dir.path())
        .await
        .expect("start etcd");
    let endpoints = etcd.endpoints();
    let s = start_with(move |c| c.store = skiff_apiserver::StoreConfig::Etcd { endpoints }).await;

    // Bootstrap, CRUD and CAS.
    assert_eq!(
        s.get("/api/v1/namespaces/kube-system").await.status,
        StatusCode::OK
    );
    let r = s.configmap("default", "e", json!({"a": "1"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let created_rv = rv(&r.body);
    let mut obj = r.body.clone();
    obj["data"]["a"] = json!("2");
    assert_eq!(
        s.put("/api/v1/namespaces/default/configmaps/e", &obj)
            .await
            .status,
        StatusCode::OK
    );
    assert_status(
        &s.put("/api/v1/namespaces/default/configmaps/e", &obj).await,
        409,
        "Conflict",
    );

    // Watch from the creation revision sees the update.
    let mut w = WatchReader::open(
        &s,
        &format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={created_rv}"),
    )
    .await;
    let ev = w.next(Duration::from_secs(15)).await.expect("event");
    assert_eq!(ev["type"], "MODIFIED");
    assert_eq!(ev["object"]["data"]["a"], "2");

    // After compaction, an old revision is 410 Expired.
    s.configmap("default", "f", json!({})).await;
    let current = rv(&s.get("/api/v1/namespaces/default/configmaps/f").await.body);
    s.server.store().compact(current).await.expect("compact");
    let mut w = WatchReader::open(
        &s,
        &format!(
            "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={}",
            created_rv - 1
        ),
    )
    .await;
    let ev = w.next(Duration::from_secs(15)).await.expect("error event");
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    drop(s);
    drop(etcd);
}
