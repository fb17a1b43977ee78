//! One conformance suite, run against both backends: every property below is a generic async
//! fn over a `Harness`, and `conformance!` instantiates each of them once per backend. The etcd
//! half starts a real etcd (one per test, on loopback, in a temp dir) and kills it afterwards.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use skiff_store::etcd::EtcdStore;
use skiff_store::etcd_server::{EtcdServer, etcd_for_test};
use skiff_store::sqlite::SqliteStore;
use skiff_store::{KeyValue, Revision, Store, StoreError, WatchEvent, WatchStream};

/// A backend under test: a store, and a way to close and reopen it on the same data.
#[async_trait::async_trait]
trait Harness: Sized + Send {
    /// `None` when the backend is unavailable and the test may skip.
    async fn new(test: &str) -> Option<Self>;
    fn store(&self) -> Arc<dyn Store>;
    /// Closes the store and opens it again on the same data.
    async fn reopen(&mut self);
}

struct Sqlite {
    dir: tempfile::TempDir,
    store: Option<SqliteStore>,
}

#[async_trait::async_trait]
impl Harness for Sqlite {
    async fn new(_test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("store.db"))
            .await
            .expect("open sqlite");
        Some(Sqlite {
            dir,
            store: Some(store),
        })
    }
    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone().expect("store is open"))
    }
    async fn reopen(&mut self) {
        // The caller dropped its handles; dropping the last one closes the database.
        drop(self.store.take());
        self.store = Some(
            SqliteStore::open(self.dir.path().join("store.db"))
                .await
                .expect("reopen sqlite"),
        );
    }
}

struct Etcd {
    _dir: tempfile::TempDir,
    server: EtcdServer,
    prefix: String,
    store: Arc<EtcdStore>,
}

#[async_trait::async_trait]
impl Harness for Etcd {
    async fn new(test: &str) -> Option<Self> {
        let binary = etcd_for_test(test)?;
        let dir = tempfile::tempdir().expect("temp dir");
        let server = EtcdServer::start(&binary, &dir.path().join("etcd"))
            .await
            .expect("start etcd");
        let prefix = format!("/skiff-test/{test}/");
        let store = EtcdStore::connect(&server.endpoints(), &prefix)
            .await
            .expect("connect");
        Some(Etcd {
            _dir: dir,
            server,
            prefix,
            store: Arc::new(store),
        })
    }
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
    async fn reopen(&mut self) {
        // A new client; the server keeps running (its own crash is tests/crash.rs's business).
        self.store = Arc::new(
            EtcdStore::connect(&self.server.endpoints(), &self.prefix)
                .await
                .expect("reconnect"),
        );
    }
}

macro_rules! conformance {
    ($backend:ident, $harness:ty, [$($property:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    let test = concat!(stringify!($backend), "_", stringify!($property));
                    let Some(mut harness) = <$harness as super::Harness>::new(test).await else {
                        return;
                    };
                    super::$property(&mut harness).await;
                }
            )*
        }
    };
}

macro_rules! both_backends {
    ($($property:ident),* $(,)?) => {
        conformance!(sqlite, super::Sqlite, [$($property),*]);
        conformance!(etcd, super::Etcd, [$($property),*]);
    };
}

both_backends!(
    create_get_update_delete,
    revisions_are_global_and_monotonic,
    list_is_consistent_at_one_revision,
    list_pages_through_many_keys,
    watch_from_a_past_revision_replays_exactly_the_later_events,
    watch_sees_live_events,
    watch_filters_by_prefix,
    watch_from_a_compacted_revision_fails,
    concurrent_cas_writers_lose_no_update,
    values_survive_reopening,
    slow_watcher_misses_nothing,
);

// ---------------------------------------------------------------------------------------------
// Helpers.

const WAIT: Duration = Duration::from_secs(10);

async fn next_events(stream: &mut WatchStream, count: usize) -> Vec<WatchEvent> {
    let mut events = Vec::with_capacity(count);
    while events.len() < count {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(event))) => events.push(event),
            Ok(Some(Err(e))) => panic!("watch failed after {} events: {e}", events.len()),
            Ok(None) => panic!("watch ended after {} of {count} events", events.len()),
            Err(_) => panic!(
                "watch delivered {} of {count} events within {WAIT:?}",
                events.len()
            ),
        }
    }
    events
}

async fn assert_quiet(stream: &mut WatchStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        panic!("expected no more watch events, got {item:?}");
    }
}

fn put_summary(event: &WatchEvent) -> (String, Revision, Option<Vec<u8>>, Option<Vec<u8>>) {
    match event {
        WatchEvent::Put { kv, prev } => (
            kv.key.clone(),
            kv.mod_revision,
            Some(kv.value.clone()),
            prev.as_ref().map(|p| p.value.clone()),
        ),
        WatchEvent::Delete { revision, prev } => {
            (prev.key.clone(), *revision, None, Some(prev.value.clone()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The properties.

async fn create_get_update_delete<H: Harness>(harness: &mut H) {
    let store = harness.store();
    let created = store
        .create("/a/one", b"v1".to_vec())
        .await
        .expect("create");
    assert_eq!(
        store.get("/a/one").await.expect("get"),
        Some(KeyValue {
            key: "/a/one".into(),
            value: b"v1".to_vec(),
            create_revision: created,
            mod_revision: created
        })
    );
    assert!(matches!(
        store.create("/a/one", b"again".to_vec()).await,
        Err(StoreError::AlreadyExists(key)) if key == "/a/one"
    ));
    assert_eq!(store.get("/a/missing").await.expect("get missing"), None);

    let updated = store
        .update("/a/one", b"v2".to_vec(), created)
        .await
        .expect("update");
    assert!(updated > created);
    let now = store.get("/a/one").await.expect("get").expect("present");
    assert_eq!(
        (now.value.as_slice(), now.create_revision, now.mod_revision),
        (&b"v2"[..], created, updated)
    );

    match store.update("/a/one", b"stale".to_vec(), created).await {
        Err(StoreError::Conflict {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(
                (key.as_str(), expected, actual),
                ("/a/one", created, updated)
            );
        }
        other => panic!("stale update: expected Conflict, got {other:?}"),
    }
    assert!(matches!(
        store.update("/a/missing", b"x".to_vec(), 0).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.update("/a/missing", b"x".to_vec(), updated).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.delete("/a/one", Some(created)).await,
        Err(StoreError::Conflict { actual, .. }) if actual == updated
    ));
    // Refused writes change nothing.
    assert_eq!(
        store
            .get("/a/one")
            .await
            .expect("get")
            .expect("present")
            .value,
        b"v2"
    );

    let (deleted_at, last) = store.delete("/a/one", Some(updated)).await.expect("delete");
    assert!(deleted_at > updated);
    assert_eq!(
        (
            last.value.as_slice(),
            last.mod_revision,
            last.create_revision
        ),
        (&b"v2"[..], updated, created)
    );
    assert_eq!(store.get("/a/one").await.expect("get"), None);
    assert!(matches!(
        store.delete("/a/one", None).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.update("/a/one", b"x".to_vec(), deleted_at).await,
        Err(StoreError::NotFound(_))
    ));

    // A deleted key can be created again, as a new object.
    let recreated = store
        .create("/a/one", b"v3".to_vec())
        .await
        .expect("re-create");
    let again = store.get("/a/one").await.expect("get").expect("present");
    assert_eq!(
        (again.create_revision, again.mod_revision),
        (recreated, recreated)
    );
    // Unconditional delete.
    let (_, last) = store
        .delete("/a/one", None)
        .await
        .expect("delete without revision");
    assert_eq!(last.value, b"v3");
}

async fn revisions_are_global_and_monotonic<H: Harness>(harness: &mut H) {
    let store = harness.store();
    let start = store.current_revision().await.expect("revision");
    let mut revisions = Vec::new();
    for i in 0..10 {
        // Different keys share one revision counter.
        revisions.push(
            store
                .create(&format!("/r/{i}"), vec![i])
                .await
                .expect("create"),
        );
    }
    let updated = store
        .update("/r/3", b"x".to_vec(), revisions[3])
        .await
        .expect("update");
    revisions.push(updated);
    revisions.push(store.delete("/r/4", None).await.expect("delete").0);
    assert!(revisions[0] > start);
    for pair in revisions.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "each write takes the next revision: {revisions:?}"
        );
    }
    let last = *revisions.last().expect("revisions");
    assert_eq!(store.current_revision().await.expect("revision"), last);
    // Refused writes do not take a revision.
    assert!(store.create("/r/0", vec![]).await.is_err());
    assert!(store.update("/r/1", vec![], 1).await.is_err());
    assert_eq!(store.current_revision().await.expect("revision"), last);
}

async fn list_is_consistent_at_one_revision<H: Harness>(harness: &mut H) {
    let store = harness.store();
    for key in ["/l/c", "/l/a", "/l/b", "/l/d", "/lx/outside", "/other"] {
        store
            .create(key, key.as_bytes().to_vec())
            .await
            .expect("create");
    }
    let d = store.get("/l/d").await.expect("get").expect("present");
    store
        .delete("/l/d", Some(d.mod_revision))
        .await
        .expect("delete");
    let list = store.list("/l/").await.expect("list");
    let keys: Vec<&str> = list.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["/l/a", "/l/b", "/l/c"],
        "prefix, key order, no deleted keys"
    );
    assert_eq!(
        list.revision,
        store.current_revision().await.expect("revision")
    );
    for kv in &list.items {
        assert_eq!(kv.value, kv.key.as_bytes());
        assert!(kv.mod_revision <= list.revision);
    }
    let empty = store.list("/nothing-here/").await.expect("empty list");
    assert!(empty.items.is_empty());
    assert_eq!(empty.revision, list.revision);

    // While writers run, every list must show exactly the keys written at or before its
    // revision.
    let writer_store = store.clone();
    let writer = tokio::spawn(async move {
        for i in 0..60 {
            writer_store
                .create(&format!("/c/{i:03}"), vec![])
                .await
                .expect("create");
        }
    });
    for _ in 0..20 {
        let list = store.list("/c/").await.expect("list");
        let newest = list
            .items
            .iter()
            .map(|kv| kv.mod_revision)
            .max()
            .unwrap_or(0);
        assert!(newest <= list.revision);
        // Keys are created in order, so a consistent snapshot holds a gap-free prefix of them.
        for (i, kv) in list.items.iter().enumerate() {
            assert_eq!(kv.key, format!("/c/{i:03}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.expect("writer");
    assert_eq!(store.list("/c/").await.expect("list").items.len(), 60);
}

async fn list_pages_through_many_keys<H: Harness>(harness: &mut H) {
    let store = harness.store();
    // More keys than one etcd page (500), written by several tasks at once.
    let mut tasks = Vec::new();
    for task in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in (task..1100).step_by(8) {
                store
                    .create(&format!("/many/{i:05}"), vec![1; 16])
                    .await
                    .expect("create");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    let list = store.list("/many/").await.expect("list");
    assert_eq!(list.items.len(), 1100);
    for (i, kv) in list.items.iter().enumerate() {
        assert_eq!(kv.key, format!("/many/{i:05}"));
    }
    assert_eq!(
        list.revision,
        store.current_revision().await.expect("revision")
    );
}

async fn watch_from_a_past_revision_replays_exactly_the_later_events<H: Harness>(harness: &mut H) {
    let store = harness.store();
    let a = store.create("/w/a", b"a1".to_vec()).await.expect("create");
    let since = store.create("/w/b", b"b1".to_vec()).await.expect("create");
    let a2 = store
        .update("/w/a", b"a2".to_vec(), a)
        .await
        .expect("update");
    store
        .create("/elsewhere", b"x".to_vec())
        .await
        .expect("create");
    let (deleted, _) = store.delete("/w/b", None).await.expect("delete");
    let c = store.create("/w/c", b"c1".to_vec()).await.expect("create");

    let mut watch = store.watch("/w/", since).await.expect("watch");
    let events = next_events(&mut watch, 3).await;
    let summary: Vec<_> = events.iter().map(put_summary).collect();
    assert_eq!(
        summary,
        vec![
            (
                "/w/a".to_string(),
                a2,
                Some(b"a2".to_vec()),
                Some(b"a1".to_vec())
            ),
            ("/w/b".to_string(), deleted, None, Some(b"b1".to_vec())),
            ("/w/c".to_string(), c, Some(b"c1".to_vec()), None),
        ]
    );
    match &events[0] {
        WatchEvent::Put {
            kv,
            prev: Some(prev),
        } => {
            assert_eq!(
                (kv.create_revision, prev.mod_revision, prev.create_revision),
                (a, a, a)
            );
        }
        other => panic!("expected the update of /w/a, got {other:?}"),
    }
    assert_quiet(&mut watch).await;
    // Then it goes on with live events, with no duplicate of the replayed ones.
    let d = store.create("/w/d", b"d1".to_vec()).await.expect("create");
    let live = next_events(&mut watch, 1).await;
    assert_eq!(live[0].revision(), d);
    assert_quiet(&mut watch).await;

    // From 0: the whole history under the prefix.
    let mut all = store.watch("/w/", 0).await.expect("watch from 0");
    let history = next_events(&mut all, 6).await;
    let revisions: Vec<Revision> = history.iter().map(WatchEvent::revision).collect();
    assert_eq!(revisions, vec![a, since, a2, deleted, c, d]);
    assert_quiet(&mut all).await;
}

async fn watch_sees_live_events<H: Harness>(harness: &mut H) {
    let store = harness.store();
    let now = store.current_revision().await.expect("revision");
    let mut watch = store.watch("/live/", now).await.expect("watch");
    let created = store
        .create("/live/x", b"1".to_vec())
        .await
        .expect("create");
    let updated = store
        .update("/live/x", b"2".to_vec(), created)
        .await
        .expect("update");
    let (deleted, _) = store
        .delete("/live/x", Some(updated))
        .await
        .expect("delete");
    let events = next_events(&mut watch, 3).await;
    assert!(
        matches!(&events[0], WatchEvent::Put { kv, prev: None } if kv.mod_revision == created && kv.value == b"1")
    );
    assert!(
        matches!(&events[1], WatchEvent::Put { kv, prev: Some(prev) }
        if kv.mod_revision == updated && kv.value == b"2" && prev.value == b"1" && prev.mod_revision == created)
    );
    assert!(matches!(&events[2], WatchEvent::Delete { revision, prev }
        if *revision == deleted && prev.value == b"2" && prev.mod_revision == updated));
    assert_quiet(&mut watch).await;
}

async fn watch_filters_by_prefix<H: Harness>(harness: &mut H) {
    let store = harness.store();
    let now = store.current_revision().await.expect("revision");
    let mut pods = store.watch("/p/", now).await.expect("watch");
    let mut everything = store.watch("", now).await.expect("watch all");
    let mut expected_pods = Vec::new();
    let mut expected_all = Vec::new();
    for key in ["/p/1", "/p2/1", "/q/1", "/p/2", "/p", "/p/3"] {
        let revision = store.create(key, vec![]).await.expect("create");
        expected_all.push((key.to_string(), revision));
        if key.starts_with("/p/") {
            expected_pods.push((key.to_string(), revision));
        }
    }
    let got: Vec<_> = next_events(&mut pods, 3)
        .await
        .iter()
        .map(|e| (e.key().to_string(), e.revision()))
        .collect();
    assert_eq!(got, expected_pods);
    assert_quiet(&mut pods).await;
    let got: Vec<_> = next_events(&mut everything, 6)
        .await
        .iter()
        .map(|e| (e.key().to_string(), e.revision()))
        .collect();
    assert_eq!(got, expected_all);
}

/// A watch's outcome when it must fail with `Compacted`: at call time, or as the first item.
async fn expect_compacted(store: &Arc<dyn Store>, after: Revision) {
    match store.watch("/k/", after).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, after);
            assert!(oldest > after, "oldest {oldest} must be newer than {after}");
        }
        Err(other) => panic!("watch after {after}: expected Compacted, got {other}"),
        Ok(mut stream) => match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Err(StoreError::Compacted { requested, .. }))) => assert_eq!(requested, after),
            other => panic!("watch after {after}: expected Compacted, got {other:?}"),
        },
    }
}

async fn watch_from_a_compacted_revision_fails<H: Harness>(harness: &mut H) {
    let store = harness.store();
    let kept = store
        .create("/k/kept", b"old".to_vec())
        .await
        .expect("create");
    let mut revision = store.create("/k/x", b"0".to_vec()).await.expect("create");
    for i in 1..10u8 {
        revision = store
            .update("/k/x", vec![i], revision)
            .await
            .expect("update");
    }
    let gone = store.create("/k/gone", vec![]).await.expect("create");
    store.delete("/k/gone", None).await.expect("delete");
    let compact_at = store
        .update("/k/x", b"at".to_vec(), revision)
        .await
        .expect("update");
    let after_compact = store
        .update("/k/x", b"after".to_vec(), compact_at)
        .await
        .expect("update");
    store.compact(compact_at).await.expect("compact");
    // Compacting again, or lower, does nothing.
    store.compact(compact_at).await.expect("compact again");
    store.compact(kept).await.expect("compact lower");
    assert!(matches!(
        store.compact(after_compact + 100).await,
        Err(StoreError::Backend(_))
    ));

    expect_compacted(&store, kept).await;
    expect_compacted(&store, gone).await;
    expect_compacted(&store, compact_at - 2).await;
    // From the compaction revision on, history is complete.
    let mut watch = store
        .watch("/k/", compact_at)
        .await
        .expect("watch from the compact revision");
    let events = next_events(&mut watch, 1).await;
    assert_eq!(
        put_summary(&events[0]),
        (
            "/k/x".into(),
            after_compact,
            Some(b"after".to_vec()),
            Some(b"at".to_vec())
        )
    );
    assert_quiet(&mut watch).await;
    // Current values stay, whatever their age.
    let old = store
        .get("/k/kept")
        .await
        .expect("get")
        .expect("kept survives compaction");
    assert_eq!(
        (old.value.as_slice(), old.mod_revision),
        (&b"old"[..], kept)
    );
    assert_eq!(store.get("/k/gone").await.expect("get"), None);
    let list = store.list("/k/").await.expect("list");
    assert_eq!(
        list.items
            .iter()
            .map(|kv| kv.key.as_str())
            .collect::<Vec<_>>(),
        ["/k/kept", "/k/x"]
    );
}

async fn concurrent_cas_writers_lose_no_update<H: Harness>(harness: &mut H) {
    let store = harness.store();
    store
        .create("/counter", b"0".to_vec())
        .await
        .expect("create");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let mut conflicts = 0u32;
            for _ in 0..50 {
                // Bounded retry loop: read, increment, compare-and-swap.
                for attempt in 0.. {
                    assert!(attempt < 10_000, "cas retry loop did not converge");
                    let current = store.get("/counter").await.expect("get").expect("counter");
                    let value: u64 = std::str::from_utf8(&current.value)
                        .expect("utf-8")
                        .parse()
                        .expect("number");
                    match store
                        .update(
                            "/counter",
                            (value + 1).to_string().into_bytes(),
                            current.mod_revision,
                        )
                        .await
                    {
                        Ok(revision) => {
                            won.push((current.mod_revision, revision));
                            break;
                        }
                        Err(StoreError::Conflict {
                            expected, actual, ..
                        }) => {
                            assert_eq!(expected, current.mod_revision);
                            assert!(actual > expected);
                            conflicts += 1;
                        }
                        Err(other) => panic!("update failed: {other}"),
                    }
                }
            }
            (won, conflicts)
        }));
    }
    let mut wins = Vec::new();
    for task in tasks {
        let (won, _conflicts) = task.await.expect("writer task");
        wins.extend(won);
    }
    let counter = store.get("/counter").await.expect("get").expect("counter");
    assert_eq!(counter.value, b"400");
    // Exactly one writer won each base revision.
    wins.sort();
    assert_eq!(wins.len(), 400);
    for pair in wins.windows(2) {
        assert_ne!(
            pair[0].0, pair[1].0,
            "two writers won from base revision {}",
            pair[0].0
        );
        assert_eq!(pair[1].0, pair[0].1, "each win builds on the previous one");
    }
}

async fn values_survive_reopening<H: Harness>(harness: &mut H) {
    let (revision, before) = {
        let store = harness.store();
        for i in 0..20 {
            store
                .create(&format!("/keep/{i:02}"), format!("value {i}").into_bytes())
                .await
                .expect("create");
        }
        let first = store.get("/keep/00").await.expect("get").expect("present");
        store
            .update("/keep/00", b"changed".to_vec(), first.mod_revision)
            .await
            .expect("update");
        store.delete("/keep/01", None).await.expect("delete");
        (
            store.current_revision().await.expect("revision"),
            store.list("/keep/").await.expect("list"),
        )
    };
    harness.reopen().await;
    let store = harness.store();
    assert_eq!(store.current_revision().await.expect("revision"), revision);
    let after = store.list("/keep/").await.expect("list");
    assert_eq!(after, before);
    assert_eq!(after.items.len(), 19);
    assert_eq!(after.items[0].value, b"changed");
    // The revision counter goes on from where it was.
    assert_eq!(
        store.create("/keep/new", vec![]).await.expect("create"),
        revision + 1
    );
    // And history is still there to watch.
    let mut watch = store.watch("/keep/", revision - 2).await.expect("watch");
    let events = next_events(&mut watch, 3).await;
    assert!(matches!(&events[1], WatchEvent::Delete { prev, .. } if prev.key == "/keep/01"));
}

async fn slow_watcher_misses_nothing<H: Harness>(harness: &mut H) {
    let store = harness.store();
    let start = store.current_revision().await.expect("revision");
    let mut watch = store.watch("/slow/", start).await.expect("watch");
    // More events than the SQLite broadcast buffer holds (4096), while nobody reads the stream.
    let count = 5000usize;
    let mut tasks = Vec::new();
    for task in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in (task..count).step_by(16) {
                store
                    .create(&format!("/slow/{i:05}"), vec![])
                    .await
                    .expect("create");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    let events = next_events(&mut watch, count).await;
    let mut previous = start;
    for event in &events {
        assert!(
            event.revision() > previous,
            "events out of order or duplicated"
        );
        previous = event.revision();
    }
    let mut keys: Vec<&str> = events.iter().map(WatchEvent::key).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), count, "every write arrives exactly once");
    assert_quiet(&mut watch).await;
}
