//! Criterion micro-benchmarks of the store: create, compare-and-swap update, and a list of
//! 1,000 keys, on SQLite and (when etcd is installed) on a real etcd started for the run.
//! Every write is durable before it returns, so these measure fsync-bound paths.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use skiff_store::Store;
use skiff_store::etcd::EtcdStore;
use skiff_store::etcd_server::{EtcdServer, etcd_binary};
use skiff_store::sqlite::SqliteStore;

fn bench_backend(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    store: Arc<dyn Store>,
) {
    let mut group = c.benchmark_group(format!("store/{name}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let next_key = AtomicU64::new(0);
    group.bench_function("create", |b| {
        b.to_async(runtime).iter(|| {
            let key = format!("/create/{:08}", next_key.fetch_add(1, Ordering::Relaxed));
            let store = store.clone();
            async move { store.create(&key, vec![b'x'; 512]).await.expect("create") }
        })
    });

    let revision = AtomicI64::new(
        runtime
            .block_on(store.create("/update/key", vec![b'x'; 512]))
            .expect("create"),
    );
    group.bench_function("update", |b| {
        b.to_async(runtime).iter(|| {
            let store = store.clone();
            let expected = revision.load(Ordering::Relaxed);
            let revision = &revision;
            async move {
                let new = store
                    .update("/update/key", vec![b'y'; 512], expected)
                    .await
                    .expect("update");
                revision.store(new, Ordering::Relaxed);
            }
        })
    });

    runtime.block_on(async {
        let mut tasks = Vec::new();
        for writer in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in (writer..1000).step_by(8) {
                    store
                        .create(&format!("/list/{i:05}"), vec![b'x'; 512])
                        .await
                        .expect("create");
                }
            }));
        }
        for task in tasks {
            task.await.expect("writer");
        }
    });
    group.bench_function("list_1000", |b| {
        b.to_async(runtime).iter(|| {
            let store = store.clone();
            async move {
                let list = store.list("/list/").await.expect("list");
                assert_eq!(list.items.len(), 1000);
            }
        })
    });
    group.finish();
}

fn store_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite: Arc<dyn Store> = Arc::new(
        runtime
            .block_on(SqliteStore::open(dir.path().join("store.db")))
            .expect("open sqlite"),
    );
    bench_backend(c, &runtime, "sqlite", sqlite);

    let Some(binary) = etcd_binary() else {
        eprintln!(
            "etcd is not installed (apt-get install -y etcd-server): skipping the etcd benchmarks"
        );
        return;
    };
    let server = runtime
        .block_on(EtcdServer::start(&binary, &dir.path().join("etcd")))
        .expect("start etcd");
    let etcd: Arc<dyn Store> = Arc::new(
        runtime
            .block_on(EtcdStore::connect(&server.endpoints(), "/skiff-bench/"))
            .expect("connect etcd"),
    );
    bench_backend(c, &runtime, "etcd", etcd);
    drop(server);
}

criterion_group!(benches, store_benches);
criterion_main!(benches);
