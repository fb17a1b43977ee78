//! kube-rs (what skiff's own components use) against the server, and the crash test: `kill -9` of
//! the server in the middle of a stream of writes loses no acknowledged write, on both stores.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};

async fn client_for(server: &Server) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig()).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kube config");
    kube::Client::try_from(config).expect("kube client")
}

fn configmap(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "data": {"value": value}
    }))
    .expect("configmap")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_creates_lists_patches_and_watches() {
    let server = Server::start(&[]);
    let client = client_for(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &configmap("kube-rs", "1")).await.expect("create");
    let list = cms.list(&ListParams::default()).await.expect("list");
    assert!(list.items.iter().any(|c| c.metadata.name.as_deref() == Some("kube-rs")));
    let rv = list.metadata.resource_version.clone().expect("list resourceVersion");

    let patched = cms
        .patch("kube-rs", &PatchParams::default(), &Patch::Merge(serde_json::json!({"data": {"value": "2"}})))
        .await
        .expect("merge patch");
    assert_eq!(patched.data.as_ref().and_then(|d| d.get("value")).map(String::as_str), Some("2"));

    let mut stream = cms.watch(&WatchParams::default().timeout(20), &rv).await.expect("watch").boxed();
    cms.create(&PostParams::default(), &configmap("kube-rs-2", "x")).await.expect("create 2");
    let mut seen = BTreeSet::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("watch event in time") {
        match event.expect("watch event") {
            WatchEvent::Added(cm) | WatchEvent::Modified(cm) => {
                seen.insert(cm.metadata.name.unwrap_or_default());
            }
            _ => {}
        }
        if seen.contains("kube-rs-2") {
            break;
        }
    }
    assert!(seen.contains("kube-rs"), "the patch after rv {rv} is delivered: {seen:?}");
    assert!(seen.contains("kube-rs-2"), "{seen:?}");

    // The runtime's watcher (list + watch with bookmarks) sees the objects too.
    let objects = kube::runtime::watcher(cms.clone(), kube::runtime::watcher::Config::default())
        .default_backoff();
    let mut objects = Box::pin(objects);
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = objects.next().await {
            if let Ok(kube::runtime::watcher::Event::InitDone) = ev {
                return true;
            }
        }
        false
    })
    .await
    .expect("watcher init in time");
    assert!(found);
}

/// Writers create ConfigMaps as fast as they can; each name is recorded only after the server
/// acknowledged it. The server is killed with SIGKILL mid-stream, restarted on the same data, and
/// every acknowledged name must be there.
async fn no_acknowledged_write_is_lost(extra_args: &[&str]) {
    let mut server = Server::start(extra_args);
    let client = client_for(&server).await;
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..5000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let name = format!("w{w}-{n}");
                match cms.create(&PostParams::default(), &configmap(&name, "v")).await {
                    Ok(_) => acked.lock().expect("lock").push(name),
                    Err(_) => break, // the server is gone
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked: Vec<String> = acked.lock().expect("lock").clone();
    assert!(acked.len() > 20, "the writers made progress before the kill ({} acknowledged)", acked.len());

    server.spawn();
    let client = client_for(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let present: BTreeSet<String> = cms
        .list(&ListParams::default())
        .await
        .expect("list after restart")
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|n| !present.contains(*n)).collect();
    assert!(lost.is_empty(), "{} acknowledged writes lost after kill -9: {:?}", lost.len(), &lost[..lost.len().min(10)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write_on_sqlite() {
    no_acknowledged_write_is_lost(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write_on_etcd() {
    let Some(binary) = skiff_store::etcd_server::etcd_for_test("kill_9_loses_no_acknowledged_write_on_etcd") else {
        return;
    };
    let dir = tempfile::tempdir().expect("etcd dir");
    let etcd = skiff_store::etcd_server::EtcdServer::start(&binary, dir.path()).await.expect("start etcd");
    let endpoints = etcd.endpoints().join(",");
    no_acknowledged_write_is_lost(&["--store", "etcd", "--etcd-endpoints", &endpoints]).await;
}
