//! Fault: `skiff server`'s data directory (SQLite store) on a disk that fills up, seen from kube
//! clients. The data directory is an ext4 filesystem on a loop device this test makes and
//! removes.
//!
//! What kube-apiserver sends when etcd is out of space is a 500 whose message is etcd's
//! ("etcdserver: mvcc: database space exceeded"); skiff sends the same code, with SQLite's reason
//! and what to do. Checked:
//! - with the disk full, a kube-rs create and a kubectl apply fail within a bound (no hang) with a
//!   500 that says the disk is full, and the server process stays up;
//! - reads keep working (kube-rs get and list, kubectl get, a watch from a past resourceVersion);
//! - when space returns, writes work again with no restart;
//! - after a `kill -9` and restart, every acknowledged write is there with its content, nothing
//!   refused is, and SQLite's integrity_check is ok.
//!
//! Needs root (mount), kubectl and the sqlite3 CLI; with CI=true a missing one fails the test.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{geteuid, server_in};
use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};

const OP_TIMEOUT: Duration = Duration::from_secs(20);

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// An ext4 on a loop device (`mount -o loop` makes the device clear itself on unmount), mounted
/// on a directory of our own; unmounted on drop.
struct LoopFs {
    mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn new(size_kib: u64) -> LoopFs {
        let dir = tempfile::Builder::new().prefix("skiff-faults-srvdisk").tempdir().expect("temp dir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image).and_then(|f| f.set_len(size_kib * 1024)).expect("image file");
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image));
        let mountpoint = dir.path().join("data");
        std::fs::create_dir(&mountpoint).expect("mountpoint");
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mountpoint));
        LoopFs { mountpoint, _dir: dir }
    }

    fn fill(&self) -> PathBuf {
        let path = self.mountpoint.join("filler");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("filler");
        let chunk = vec![0x5au8; 4096];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for _ in 0..20 {
            if Command::new("umount").arg(&self.mountpoint).output().is_ok_and(|o| o.status.success()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
    }
}

async fn client_for(server: &Server) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig()).expect("read kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kube config");
    config.read_timeout = Some(OP_TIMEOUT);
    kube::Client::try_from(config).expect("kube client")
}

fn configmap(name: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"faults": "disk"}},
        "data": {"payload": format!("{name}:{}", "d".repeat(4000))}
    }))
    .expect("configmap")
}

fn payload_of(cm: &ConfigMap) -> Option<String> {
    cm.data.as_ref().and_then(|d| d.get("payload")).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_data_disk_gives_500_keeps_reads_and_recovers() {
    if !require("root (to mount a loop device)", geteuid() == 0) {
        return;
    }
    if !require("the sqlite3 CLI (apt-get install sqlite3)", common::cluster::have("sqlite3")) {
        return;
    }
    let Some(kubectl_bin) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    let disk = LoopFs::new(32 * 1024);
    let mut server = server_in(&disk.mountpoint, &[]);
    let client = client_for(&server).await;
    let kubectl = Kubectl::new(kubectl_bin, &server.kubeconfig());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    let mut acked = Vec::new();
    for i in 0..20 {
        let name = format!("before-{i}");
        cms.create(&PostParams::default(), &configmap(&name)).await.expect("create with space left");
        acked.push(name);
    }
    let past_rv = cms.list(&ListParams::default()).await.expect("list").metadata.resource_version.expect("rv");
    let filler = disk.fill();

    // Writes until the first refusal (pages SQLite allocated earlier may still take a few).
    let mut refused = Vec::new();
    let mut status = None;
    let started = Instant::now();
    for i in 0..2000 {
        let name = format!("full-{i}");
        let result = tokio::time::timeout(OP_TIMEOUT, cms.create(&PostParams::default(), &configmap(&name)))
            .await
            .unwrap_or_else(|_| panic!("a create on a full disk hung for {OP_TIMEOUT:?}"));
        match result {
            Ok(_) => acked.push(name),
            Err(kube::Error::Api(s)) => {
                refused.push(name);
                status = Some(s);
                break;
            }
            Err(other) => panic!("a create on a full disk failed with something other than a Status: {other}"),
        }
    }
    let status = status.expect("a create fails once the disk is full");
    let refusal_took = started.elapsed();
    assert_eq!(status.code, 500, "the code kube-apiserver sends when its store is out of space: {status:?}");
    assert!(status.message.contains("disk is full"), "the message says why: {}", status.message);
    assert!(status.message.contains("disk space"), "the message says what to do: {}", status.message);

    // kubectl apply says so too, and changes nothing.
    let manifest = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "by-kubectl", "namespace": "default", "labels": {"faults": "disk"}},
        "data": {"payload": "k".repeat(4000)}
    })
    .to_string();
    let apply_started = Instant::now();
    let out = kubectl.run_with_stdin(&["apply", "-f", "-", "--request-timeout=20s"], Some(&manifest));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "kubectl apply on a full disk fails");
    assert!(stderr.contains("Error from server") && stderr.contains("disk is full"), "kubectl prints the server's reason: {stderr}");
    assert!(apply_started.elapsed() < OP_TIMEOUT, "kubectl got its answer in time");
    refused.push("by-kubectl".to_string());

    // The server is up, and reads work.
    assert!(server.child.as_mut().expect("child").try_wait().expect("try_wait").is_none(), "the server is still running");
    let got = cms.get(&acked[0]).await.expect("get on a full disk");
    assert_eq!(payload_of(&got), payload_of(&configmap(&acked[0])));
    let listed = cms.list(&ListParams::default().labels("faults=disk")).await.expect("list on a full disk");
    assert_eq!(listed.items.len(), acked.len(), "the list holds exactly the acknowledged writes");
    let names = kubectl.ok(&["get", "configmaps", "-l", "faults=disk", "-o", "name"]);
    assert_eq!(names.lines().count(), acked.len(), "kubectl get on a full disk:\n{names}");
    let mut watch = cms.watch(&WatchParams::default().labels("faults=disk").timeout(10), &past_rv).await.expect("watch on a full disk").boxed();
    let mut replayed = 0;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
        if let Ok(WatchEvent::Added(_)) = event {
            replayed += 1;
        }
        if replayed == acked.len() - 20 {
            break;
        }
    }
    assert_eq!(replayed, acked.len() - 20, "the watch from before the fill replays what landed after it");
    drop(watch);

    // Space returns: writes work again, no restart.
    std::fs::remove_file(&filler).expect("remove the filler");
    for i in 0..10 {
        let name = format!("after-{i}");
        tokio::time::timeout(OP_TIMEOUT, cms.create(&PostParams::default(), &configmap(&name)))
            .await
            .expect("in time")
            .expect("writes work once space returns");
        acked.push(name);
    }
    let out = kubectl.run_with_stdin(&["apply", "-f", "-"], Some(&manifest));
    assert!(out.status.success(), "kubectl apply works again: {}", String::from_utf8_lossy(&out.stderr));
    refused.retain(|n| n != "by-kubectl");
    acked.push("by-kubectl".to_string());

    // A crash and restart: nothing acknowledged lost, nothing refused present, the file is sound.
    tokio::task::block_in_place(|| {
        server.kill9();
        let conn = sqlite_integrity_check(&disk.mountpoint.join("store.db"));
        assert_eq!(conn, "ok", "PRAGMA integrity_check after the crash");
        server.spawn();
    });
    let client = client_for(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let listed = cms.list(&ListParams::default().labels("faults=disk")).await.expect("list after restart");
    let present: std::collections::BTreeMap<String, ConfigMap> =
        listed.items.into_iter().map(|c| (c.metadata.name.clone().unwrap_or_default(), c)).collect();
    for name in &acked {
        let cm = present.get(name).unwrap_or_else(|| panic!("acknowledged {name} lost"));
        if name != "by-kubectl" {
            assert_eq!(payload_of(cm), payload_of(&configmap(name)), "{name}: content");
        }
    }
    for name in &refused {
        assert!(!present.contains_key(name), "refused {name} is in the store");
    }
    assert_eq!(present.len(), acked.len());
    eprintln!(
        "FIGURES full_data_disk: {} acknowledged, {} refused with 500 after {:.2} s: {:?}; reads, list, watch and \
         kubectl get worked while full; writes resumed without restart; 0 lost after kill -9; integrity ok",
        acked.len(),
        refused.len(),
        refusal_took.as_secs_f64(),
        status.message
    );
    server.stop();
}

/// SQLite's own consistency check of the store file, by the sqlite3 CLI (Debian's sqlite3).
fn sqlite_integrity_check(db: &std::path::Path) -> String {
    let out = Command::new("sqlite3").arg(db).arg("PRAGMA integrity_check;").output().expect("run sqlite3");
    assert!(out.status.success(), "sqlite3 integrity_check failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
