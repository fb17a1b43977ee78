//! SQLite-only behaviour the shared suite cannot express: a lagging watcher whose history is
//! compacted away gets an error (never a silent gap), automatic compaction, the single-owner
//! lock.

use std::time::Duration;

use futures::StreamExt;
use skiff_store::sqlite::SqliteStore;
use skiff_store::{CompactionPolicy, Store, StoreError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_whose_history_is_compacted_gets_an_error_not_a_gap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("store.db"))
        .await
        .expect("open");
    let mut watch = store.watch("/lag/", 0).await.expect("watch");
    // Overflow the broadcast buffer (4096) while the watcher reads nothing...
    let mut tasks = Vec::new();
    for task in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in (task..5000).step_by(8) {
                store
                    .create(&format!("/lag/{i:05}"), vec![])
                    .await
                    .expect("create");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    // ...and compact the history it would need to catch up.
    let current = store.current_revision().await.expect("revision");
    store.compact(current).await.expect("compact");

    let mut delivered = Vec::new();
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(event))) => delivered.push(event.revision()),
            Ok(Some(Err(error))) => break error,
            Ok(None) => panic!(
                "stream ended without an error after {} events",
                delivered.len()
            ),
            Err(_) => panic!("stream stalled after {} events", delivered.len()),
        }
    };
    assert!(
        matches!(outcome, StoreError::Compacted { oldest, .. } if oldest == current),
        "got {outcome:?}"
    );
    // Whatever came before the error is a gap-free run from the start.
    for (i, revision) in delivered.iter().enumerate() {
        assert_eq!(*revision, i as i64 + 1);
    }
    assert!(delivered.len() < 5000);
    // And the stream is over.
    assert!(watch.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_compaction_keeps_the_newest_revisions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("store.db"))
        .await
        .expect("open");
    let mut revision = store
        .create("/auto/x", b"0".to_vec())
        .await
        .expect("create");
    for i in 0..50 {
        revision = store
            .update("/auto/x", vec![i], revision)
            .await
            .expect("update");
    }
    let policy = CompactionPolicy {
        interval: Duration::from_millis(50),
        min_retained_revisions: 10,
    };
    let compactor = store.start_compaction(policy);
    // The first tick only samples; the second may compact up to that sample, bounded by the
    // retained minimum: 51 - 10 = 41.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.compacted_revision().await.expect("compacted") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "automatic compaction never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.compacted_revision().await.expect("compacted"),
        revision - 10
    );
    assert!(matches!(
        store.watch("", 5).await,
        Err(StoreError::Compacted { .. })
    ));
    let mut recent = store
        .watch("", revision - 10)
        .await
        .expect("recent history is kept");
    let first = tokio::time::timeout(Duration::from_secs(5), recent.next())
        .await
        .expect("event")
        .expect("item")
        .expect("ok");
    assert_eq!(first.revision(), revision - 9);
    assert_eq!(
        store
            .get("/auto/x")
            .await
            .expect("get")
            .expect("present")
            .mod_revision,
        revision
    );
    // Dropping the store ends the compactor.
    drop(recent);
    drop(store);
    tokio::time::timeout(Duration::from_secs(5), compactor)
        .await
        .expect("compactor stops with the store")
        .expect("compactor task");
}

#[tokio::test]
async fn a_second_owner_of_the_same_file_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.db");
    let _first = SqliteStore::open(&path).await.expect("open");
    match SqliteStore::open(&path).await {
        Err(StoreError::Backend(message)) => assert!(message.contains("in use"), "{message}"),
        Err(other) => panic!("expected Backend, got {other}"),
        Ok(_) => panic!("two owners of one database file"),
    }
}
