//! SQLite against etcd, measured in one run on one machine: writes/s (sequential and with 8
//! concurrent writers) and watch-event latency (write acknowledged -> event delivered) with 100
//! concurrent watchers. Prints a markdown table with SQLite/etcd ratios and writes it, with the
//! command line and a machine description, to bench/results/store.md.
//!
//! Usage: cargo run --release -p skiff-bench --bin store_bench [-- --out FILE] [--data-dir DIR]
//!
//! Bounded: every phase stops at a count or a time limit, whichever comes first (under 60 s in
//! all). etcd is Debian's /usr/bin/etcd, started on loopback in a temp dir and killed by PID at
//! the end; both stores keep their data on the same filesystem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use skiff_store::etcd::EtcdStore;
use skiff_store::etcd_server::{EtcdServer, etcd_binary};
use skiff_store::sqlite::SqliteStore;
use skiff_store::{Revision, Store};

const SEQUENTIAL_LIMIT: (usize, Duration) = (3000, Duration::from_secs(4));
const CONCURRENT_WRITERS: usize = 8;
const CONCURRENT_LIMIT: (usize, Duration) = (8000, Duration::from_secs(4));
const WATCHERS: usize = 100;
const WATCHED_WRITES: usize = 300;
const WATCH_TIME_LIMIT: Duration = Duration::from_secs(8);
const VALUE_BYTES: usize = 512;

#[derive(Debug, Clone, Copy)]
struct Figures {
    sequential_writes_per_s: f64,
    concurrent_writes_per_s: f64,
    /// Write call started -> event delivered.
    watch_p50_ms: f64,
    watch_p99_ms: f64,
    /// Write acknowledged -> event delivered (negative: delivered before the writer saw its ack).
    after_ack_p50_ms: f64,
    after_ack_p99_ms: f64,
    watch_events: usize,
}

struct Latencies {
    from_call: (f64, f64),
    from_ack: (f64, f64),
    samples: usize,
}

fn p50_p99(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let percentile = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    (percentile(0.50), percentile(0.99))
}

/// Writes one after another until the count or the time runs out; writes/s.
async fn sequential_writes(store: &dyn Store) -> Result<f64> {
    let value = vec![b'x'; VALUE_BYTES];
    let started = Instant::now();
    let mut done = 0usize;
    while done < SEQUENTIAL_LIMIT.0 && started.elapsed() < SEQUENTIAL_LIMIT.1 {
        store
            .create(&format!("/bench/seq/{done:06}"), value.clone())
            .await?;
        done += 1;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// 8 writers at once, each creating its own keys; writes/s over all of them.
async fn concurrent_writes(store: Arc<dyn Store>) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..CONCURRENT_WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let value = vec![b'x'; VALUE_BYTES];
            let mut done = 0usize;
            while done < CONCURRENT_LIMIT.0 / CONCURRENT_WRITERS
                && started.elapsed() < CONCURRENT_LIMIT.1
            {
                store
                    .create(&format!("/bench/conc/{writer}/{done:06}"), value.clone())
                    .await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// 100 watchers on one prefix; one writer writes sequentially and notes when each write call
/// started and when it was acknowledged; each watcher notes when each event arrived.
async fn watch_latency(store: Arc<dyn Store>) -> Result<Latencies> {
    let start = store.current_revision().await?;
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut stream = store.watch("/bench/watch/", start).await?;
        watchers.push(tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + WATCH_TIME_LIMIT + Duration::from_secs(2);
            let mut arrivals = Vec::with_capacity(WATCHED_WRITES);
            while arrivals.len() < WATCHED_WRITES {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(Ok(event))) => arrivals.push((event.revision(), Instant::now())),
                    Ok(Some(Err(e))) => return Err(anyhow::anyhow!("watch failed: {e}")),
                    Ok(None) | Err(_) => break,
                }
            }
            Ok(arrivals)
        }));
    }
    let acks: Arc<Mutex<HashMap<Revision, (Instant, Instant)>>> = Arc::default();
    let value = vec![b'x'; VALUE_BYTES];
    let started = Instant::now();
    let mut written = 0;
    while written < WATCHED_WRITES && started.elapsed() < WATCH_TIME_LIMIT {
        let called = Instant::now();
        let revision = store
            .create(&format!("/bench/watch/{written:06}"), value.clone())
            .await?;
        let acked = Instant::now();
        acks.lock()
            .map_err(|_| anyhow::anyhow!("ack map poisoned"))?
            .insert(revision, (called, acked));
        written += 1;
    }
    let acks = acks
        .lock()
        .map_err(|_| anyhow::anyhow!("ack map poisoned"))?
        .clone();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut latencies = Vec::with_capacity(WATCHERS * written);
    let mut after_ack = Vec::with_capacity(WATCHERS * written);
    for watcher in watchers {
        for (revision, arrived) in watcher.await?? {
            if let Some((called, acked)) = acks.get(&revision) {
                latencies.push(ms(arrived.saturating_duration_since(*called)));
                after_ack.push(if arrived >= *acked {
                    ms(arrived - *acked)
                } else {
                    -ms(*acked - arrived)
                });
            }
        }
    }
    if latencies.len() < WATCHERS * written {
        bail!(
            "watchers saw {} of {} events in time; the store is too slow for this benchmark",
            latencies.len(),
            WATCHERS * written
        );
    }
    let samples = latencies.len();
    Ok(Latencies {
        from_call: p50_p99(latencies),
        from_ack: p50_p99(after_ack),
        samples,
    })
}

async fn measure(store: Arc<dyn Store>) -> Result<Figures> {
    let sequential_writes_per_s = sequential_writes(store.as_ref()).await?;
    let concurrent_writes_per_s = concurrent_writes(store.clone()).await?;
    let latencies = watch_latency(store).await?;
    Ok(Figures {
        sequential_writes_per_s,
        concurrent_writes_per_s,
        watch_p50_ms: latencies.from_call.0,
        watch_p99_ms: latencies.from_call.1,
        after_ack_p50_ms: latencies.from_ack.0,
        after_ack_p99_ms: latencies.from_ack.1,
        watch_events: latencies.samples,
    })
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn report(
    command: &str,
    data_dir: &Path,
    sqlite: &Figures,
    etcd: &Figures,
    etcd_version: &str,
    load_before: &str,
) -> String {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "n/a".into()
        }
    };
    let filesystem = command_output("df", &["--output=fstype", &data_dir.display().to_string()])
        .lines()
        .last()
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let mut out = String::new();
    out.push_str("# Store: embedded SQLite against etcd\n\n");
    out.push_str(&format!("Command: `{command}`\n\n"));
    out.push_str(&format!(
        "Machine: nproc {}, {}, kernel {}, data on {filesystem} ({}), {}; measured {} \
         (load average before the run: {}).\n\n",
        command_output("nproc", &[]),
        cpu_model(),
        command_output("uname", &["-r"]),
        data_dir.display(),
        etcd_version,
        command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        load_before,
    ));
    out.push_str("| metric | SQLite | etcd | SQLite/etcd |\n|---|---:|---:|---:|\n");
    out.push_str(&format!(
        "| sequential writes/s (1 writer) | {:.0} | {:.0} | {} |\n",
        sqlite.sequential_writes_per_s,
        etcd.sequential_writes_per_s,
        ratio(sqlite.sequential_writes_per_s, etcd.sequential_writes_per_s)
    ));
    out.push_str(&format!(
        "| concurrent writes/s ({CONCURRENT_WRITERS} writers) | {:.0} | {:.0} | {} |\n",
        sqlite.concurrent_writes_per_s,
        etcd.concurrent_writes_per_s,
        ratio(sqlite.concurrent_writes_per_s, etcd.concurrent_writes_per_s)
    ));
    for (label, a, b) in [
        ("p50", sqlite.watch_p50_ms, etcd.watch_p50_ms),
        ("p99", sqlite.watch_p99_ms, etcd.watch_p99_ms),
    ] {
        out.push_str(&format!(
            "| watch latency {label}, ms, write call -> event ({WATCHERS} watchers) | {a:.3} | \
             {b:.3} | {} |\n",
            ratio(a, b)
        ));
    }
    for (label, a, b) in [
        ("p50", sqlite.after_ack_p50_ms, etcd.after_ack_p50_ms),
        ("p99", sqlite.after_ack_p99_ms, etcd.after_ack_p99_ms),
    ] {
        out.push_str(&format!(
            "| watch latency {label}, ms, write ack -> event ({WATCHERS} watchers) | {a:.3} | \
             {b:.3} | - |\n"
        ));
    }
    out.push_str(&format!(
        "\nNotes: every write is a create of a {VALUE_BYTES}-byte value, acknowledged only once \
         durable (SQLite: WAL + synchronous=FULL, group commit; etcd: single member, default \
         fsync). Writes/s: sequential up to {} writes or {} s; concurrent up to {} writes or {} \
         s. Watch latency: one sequential writer, {WATCHED_WRITES} writes, every event to \
         {WATCHERS} watchers ({} and {} latency samples), measured in-process through the `Store` \
         trait, from the write call (and, signed, from the writer seeing its acknowledgement) \
         to a watcher receiving the event. \"ack -> event\" is negative when the event reaches \
         the watchers before the acknowledgement reaches the writer (etcd sends both at once; \
         SQLite publishes before it answers), so it gets no ratio. For throughput a ratio \
         above 1 favours SQLite; for latency a ratio below 1 does.\n",
        SEQUENTIAL_LIMIT.0,
        SEQUENTIAL_LIMIT.1.as_secs(),
        CONCURRENT_LIMIT.0,
        CONCURRENT_LIMIT.1.as_secs(),
        sqlite.watch_events,
        etcd.watch_events,
    ));
    out
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut out = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results/store.md"));
    let mut data_parent = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().context("--out needs a file")?.into(),
            "--data-dir" => {
                data_parent = args.next().context("--data-dir needs a directory")?.into()
            }
            other => bail!(
                "unknown argument {other:?}; usage: store_bench [--out FILE] [--data-dir DIR]"
            ),
        }
    }
    let command = format!(
        "cargo run --release -p skiff-bench --bin store_bench{}",
        std::env::args()
            .skip(1)
            .map(|a| format!(" {a}"))
            .collect::<String>()
    );
    let etcd = etcd_binary().context(
        "etcd is not installed (apt-get install -y etcd-server, or set SKIFF_ETCD_BIN); this \
         benchmark compares SQLite against it",
    )?;
    let etcd_version = command_output(&etcd.display().to_string(), &["--version"])
        .lines()
        .next()
        .unwrap_or("etcd version unknown")
        .to_string();
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .map(|load| {
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into());
    let overall = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("skiff-store-bench-")
        .tempdir_in(&data_parent)
        .with_context(|| format!("creating a temp dir under {}", data_parent.display()))?;

    eprintln!("measuring SQLite ...");
    let sqlite_store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("store.db"))
            .await
            .context("opening sqlite")?,
    );
    let sqlite = measure(sqlite_store.clone())
        .await
        .context("measuring sqlite")?;
    drop(sqlite_store);

    eprintln!("measuring etcd ...");
    let mut server = EtcdServer::start(&etcd, &dir.path().join("etcd"))
        .await
        .context("starting etcd")?;
    let etcd_store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(&server.endpoints(), "/skiff-bench/")
            .await
            .context("connecting to etcd")?,
    );
    let etcd_figures = measure(etcd_store).await.context("measuring etcd");
    server.kill();
    let etcd_figures = etcd_figures?;

    let text = report(
        &command,
        dir.path(),
        &sqlite,
        &etcd_figures,
        &etcd_version,
        &load_before,
    );
    print!("{text}");
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "wrote {} in {:.1} s",
        out.display(),
        overall.elapsed().as_secs_f64()
    );
    Ok(())
}
