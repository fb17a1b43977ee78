//! Crash durability, per backend: a child process (this same test binary, re-executed with
//! `SKIFF_STORE_CRASH_CHILD` set) writes keys from several tasks and prints each key only after
//! its write returned Ok. The test SIGKILLs it mid-stream (for etcd: the etcd server first,
//! then the writer), reopens the store and checks that every acknowledged key is there.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use skiff_store::etcd::EtcdStore;
use skiff_store::etcd_server::{EtcdServer, etcd_for_test};
use skiff_store::sqlite::SqliteStore;
use skiff_store::{Store, StoreError};

const CHILD_ENV: &str = "SKIFF_STORE_CRASH_CHILD";
/// Acknowledgements to wait for before the kill.
const ACKS_BEFORE_KILL: usize = 300;
const WRITER_TASKS: usize = 4;

/// The child's work: write until killed (bounded in count and time, in case nobody kills it).
async fn write_until_killed(store: impl Store) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    let store = std::sync::Arc::new(store);
    for task in 0..WRITER_TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100_000 {
                if Instant::now() > deadline {
                    return;
                }
                let key = format!("/crash/{task}-{i:06}");
                match store.create(&key, key.as_bytes().to_vec()).await {
                    // stdout is line-buffered and locked per println: one whole line per ack.
                    Ok(revision) => println!("ACK {key} {revision}"),
                    Err(e) => {
                        eprintln!("write of {key} failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// Runs the child side when this process is the child; returns false in the parent.
fn run_child_if_asked() -> bool {
    let Ok(target) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        if let Some(path) = target.strip_prefix("sqlite:") {
            write_until_killed(SqliteStore::open(path).await.expect("child: open sqlite")).await;
        } else if let Some(endpoint) = target.strip_prefix("etcd:") {
            let store = EtcdStore::connect(&[endpoint.to_string()], "/crash-test/")
                .await
                .expect("child: connect etcd");
            write_until_killed(store).await;
        } else {
            panic!("unknown {CHILD_ENV} target {target:?}");
        }
    });
    true
}

struct Acks {
    lines: mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
}

fn spawn_child(test: &str, target: &str) -> (Child, Acks) {
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, target)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child writer");
    let stdout = child.stdout.take().expect("child stdout");
    let (sender, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(ack) = line.strip_prefix("ACK ") {
                let _ = sender.send(ack.to_string());
            }
        }
    });
    (child, Acks { lines, reader })
}

impl Acks {
    fn wait_for(&self, count: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        while got.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => got.push(line),
                Err(_) => panic!(
                    "child acknowledged only {} of {count} writes in time",
                    got.len()
                ),
            }
        }
        got
    }

    /// Everything the child printed before it died (the pipe holds what we have not read yet).
    fn rest(self) -> Vec<String> {
        self.reader.join().expect("reader thread");
        self.lines.try_iter().collect()
    }
}

/// Every acknowledged key is in the store, with its value, at or before its acknowledged
/// revision.
async fn assert_all_present(store: &dyn Store, acks: &[String]) {
    assert!(acks.len() >= ACKS_BEFORE_KILL);
    let list = store.list("/crash/").await.expect("list after crash");
    let present: std::collections::HashMap<&str, &skiff_store::KeyValue> =
        list.items.iter().map(|kv| (kv.key.as_str(), kv)).collect();
    let mut missing = Vec::new();
    for ack in acks {
        let (key, revision) = ack.split_once(' ').expect("ACK key revision");
        let revision: i64 = revision.parse().expect("revision");
        match present.get(key) {
            Some(kv) => {
                assert_eq!(kv.value, key.as_bytes(), "value of {key}");
                assert_eq!(kv.mod_revision, revision, "revision of {key}");
            }
            None => missing.push(key.to_string()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost: {missing:?}",
        missing.len()
    );
    // Anything beyond the acknowledged writes may or may not have landed, but whatever did
    // landed whole.
    for kv in &list.items {
        assert_eq!(kv.value, kv.key.as_bytes());
    }
    eprintln!(
        "{} acknowledged, {} present after the crash",
        acks.len(),
        list.items.len()
    );
}

#[test]
fn sqlite_acknowledged_writes_survive_kill_9() {
    if run_child_if_asked() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.db");
    let (mut child, acks) = spawn_child(
        "sqlite_acknowledged_writes_survive_kill_9",
        &format!("sqlite:{}", path.display()),
    );
    let mut acknowledged = acks.wait_for(ACKS_BEFORE_KILL);
    child.kill().expect("kill -9 the writer");
    child.wait().expect("reap the writer");
    acknowledged.extend(acks.rest());

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let store = SqliteStore::open(&path)
            .await
            .expect("reopen after the crash");
        assert_all_present(&store, &acknowledged).await;
        // The store takes writes again, after everything that was there.
        let before = store.current_revision().await.expect("revision");
        assert_eq!(
            store.create("/after-crash", vec![]).await.expect("write"),
            before + 1
        );
    });
}

#[test]
fn etcd_acknowledged_writes_survive_kill_9() {
    if run_child_if_asked() {
        return;
    }
    let Some(binary) = etcd_for_test("etcd_acknowledged_writes_survive_kill_9") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut server = runtime
        .block_on(EtcdServer::start(&binary, &dir.path().join("etcd")))
        .expect("start etcd");
    let endpoint = server.endpoints().remove(0);
    let (mut child, acks) = spawn_child(
        "etcd_acknowledged_writes_survive_kill_9",
        &format!("etcd:{endpoint}"),
    );
    let mut acknowledged = acks.wait_for(ACKS_BEFORE_KILL);
    // The server crashes mid-stream; the writer goes down with it.
    server.kill();
    child.kill().expect("kill -9 the writer");
    child.wait().expect("reap the writer");
    acknowledged.extend(acks.rest());

    runtime.block_on(async {
        server
            .restart()
            .await
            .expect("restart etcd on the same data");
        let store = EtcdStore::connect(&server.endpoints(), "/crash-test/")
            .await
            .expect("connect");
        assert_all_present(&store, &acknowledged).await;
    });
}

#[test]
fn sqlite_full_disk_is_a_clear_error_and_writes_nothing() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store.db");
        let options = skiff_store::sqlite::SqliteOptions {
            max_database_bytes: Some(256 * 1024),
        };
        let store = SqliteStore::open_with_options(&path, options)
            .await
            .expect("open");
        let value = vec![7u8; 16 * 1024];
        let mut written = Vec::new();
        let error = loop {
            assert!(written.len() < 1000, "the size limit never hit");
            let key = format!("/big/{:04}", written.len());
            match store.create(&key, value.clone()).await {
                Ok(revision) => written.push((key, revision)),
                Err(error) => break (key, error),
            }
        };
        let (failed_key, error) = error;
        match &error {
            StoreError::Backend(message) => {
                assert!(
                    message.contains("full"),
                    "message should say the disk is full: {message}"
                );
                assert!(message.contains("nothing was written"), "{message}");
            }
            other => panic!("expected Backend, got {other:?}"),
        }
        // Nothing of the failed write is there; everything before it is.
        assert_eq!(store.get(&failed_key).await.expect("get"), None);
        let revision = store.current_revision().await.expect("revision");
        assert_eq!(revision, written.last().expect("some writes fit").1);
        assert_eq!(
            store.list("/big/").await.expect("list").items.len(),
            written.len()
        );
        // Once there is room again (here: the limit lifted), the same write goes through.
        drop(store);
        let store = SqliteStore::open(Path::new(&path))
            .await
            .expect("reopen without a limit");
        store
            .create(&failed_key, value)
            .await
            .expect("write after lifting the limit");
    });
}
