//! Fault: `skiff server` on a three-member etcd cluster (Debian's etcd-server on loopback, the
//! server given all three endpoints) under kube-rs write load; the etcd leader is SIGKILLed and
//! restarted.
//!
//! Checked: the server keeps serving (writes are acknowledged while the old leader is down, the
//! longest stretch with none is measured and bounded, reads answer), no acknowledged write is
//! lost (every acknowledged ConfigMap is there with its content after the member is back) and
//! none duplicated (one object per name, the uid of its acknowledged create).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use skiff_store::etcd_server::{EtcdCluster, etcd_for_test};

const WRITERS: usize = 4;
const MAX_WRITE_GAP: Duration = Duration::from_secs(15);

async fn client_for(server: &Server) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig()).expect("read kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kube config");
    config.read_timeout = Some(Duration::from_secs(20));
    kube::Client::try_from(config).expect("kube client")
}

fn configmap(name: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"faults": "etcd"}},
        "data": {"payload": format!("{name}-payload")}
    }))
    .expect("configmap")
}

#[derive(Default)]
struct Acks {
    /// name -> uid of the acknowledged create.
    created: BTreeMap<String, String>,
    times: Vec<Instant>,
    failed: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_on_three_member_etcd_keeps_serving_through_a_leader_kill() {
    let Some(binary) = etcd_for_test("server_on_three_member_etcd_keeps_serving_through_a_leader_kill") else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = EtcdCluster::start(&binary, dir.path(), 3).await.expect("three-member etcd");
    let endpoints = etcd.endpoints().join(",");
    let server = Server::start(&["--store", "etcd", "--etcd-endpoints", &endpoints]);
    let client = client_for(&server).await;

    let acks = Arc::new(Mutex::new(Acks::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
            let (acks, stop) = (acks.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("e{w}-{n}");
                    n += 1;
                    match cms.create(&PostParams::default(), &configmap(&name)).await {
                        Ok(cm) => {
                            let mut a = acks.lock().expect("acks");
                            a.created.insert(name, cm.metadata.uid.unwrap_or_default());
                            a.times.push(Instant::now());
                        }
                        Err(_) => {
                            acks.lock().expect("acks").failed += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = etcd.leader(Duration::from_secs(20)).await.expect("a leader");
    let killed_at = Instant::now();
    etcd.kill(leader);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let acked_while_down = acks.lock().expect("acks").times.iter().filter(|t| **t > killed_at).count();
    // Reads answer too while the member is down.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.list(&ListParams::default().labels("faults=etcd").limit(5)).await.expect("a list while a member is down");
    etcd.spawn(leader).expect("restart the old leader");
    etcd.wait_healthy(Duration::from_secs(30)).await.expect("the cluster is whole again");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let acks = Arc::try_unwrap(acks).ok().expect("writers done").into_inner().expect("acks");
    assert!(acked_while_down > 0, "the server acknowledged writes while the etcd leader was down");

    let listed = cms.list(&ListParams::default().labels("faults=etcd")).await.expect("list after the fault");
    let mut present: BTreeMap<String, ConfigMap> = BTreeMap::new();
    for cm in listed.items {
        let name = cm.metadata.name.clone().expect("name");
        assert!(present.insert(name.clone(), cm).is_none(), "{name} listed twice");
    }
    let mut lost = Vec::new();
    for (name, uid) in &acks.created {
        match present.get(name) {
            Some(cm) => {
                assert_eq!(cm.metadata.uid.as_ref(), Some(uid), "{name}: the uid of its acknowledged create");
                assert_eq!(cm.data.as_ref().and_then(|d| d.get("payload")), Some(&format!("{name}-payload")), "{name}: content");
            }
            None => lost.push(name.clone()),
        }
    }
    assert!(lost.is_empty(), "{} acknowledged writes lost: {lost:?}", lost.len());
    let max_gap = acks.times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    assert!(max_gap < MAX_WRITE_GAP, "the server went {max_gap:?} without acknowledging a write");
    eprintln!(
        "FIGURES server_on_three_member_etcd: {} acknowledged creates ({acked_while_down} while the leader m{leader} \
         was down), {} failed attempts, {} present (unacknowledged ones that landed: {}), 0 lost, 0 duplicated; \
         longest stretch without an ack {:.2} s; total {:.1} s",
        acks.created.len(),
        acks.failed,
        present.len(),
        present.len() - acks.created.len(),
        max_gap.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(server);
}
