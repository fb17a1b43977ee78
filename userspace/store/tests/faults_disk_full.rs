//! Fault: the SQLite store's filesystem fills up. The store lives on a small filesystem this test
//! mounts (and unmounts): a tmpfs, and an ext4 on a loop device (what a real disk is).
//!
//! Checked:
//! - once the disk is full, writes fail with a clear `Backend` error naming the full disk, within
//!   a time bound (no hang, no panic), and a failed write changes nothing;
//! - reads (get, list, a watch from the start) keep working while the disk is full;
//! - the store reopens ("restart") while the disk is still full and still reads;
//! - when space returns, writes work again without a restart;
//! - after a final reopen, `PRAGMA integrity_check` says ok and every acknowledged write is there
//!   with its value.
//!
//! Needs root (mount). With CI=true a missing prerequisite fails the test instead of skipping.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use skiff_store::sqlite::SqliteStore;
use skiff_store::{Store, StoreError};

/// One write, or one read, may take this long before the test calls it a hang.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn is_root() -> bool {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: no preconditions.
    unsafe { geteuid() == 0 }
}

/// false (and why, on stderr) when the test should skip; panics in CI.
fn require(test: &str, what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    assert!(!in_ci(), "{test}: CI=true and {what} is missing: this test must run in CI");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {what} is missing");
    false
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A small filesystem mounted on a directory this test made; unmounted (and with it, for ext4,
/// the loop device, which `mount -o loop` sets to clear itself) on drop.
struct SmallFs {
    mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn tmpfs(size_kib: u64) -> SmallFs {
        let dir = tempfile::Builder::new().prefix("skiff-faults-tmpfs").tempdir().expect("temp dir");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mountpoint");
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size_kib}k,mode=0700"), "tmpfs"]).arg(&mountpoint));
        SmallFs { mountpoint, _dir: dir }
    }

    fn ext4_loop(size_kib: u64) -> SmallFs {
        let dir = tempfile::Builder::new().prefix("skiff-faults-ext4").tempdir().expect("temp dir");
        let image = dir.path().join("disk.img");
        let file = std::fs::File::create(&image).expect("image file");
        file.set_len(size_kib * 1024).expect("size the image");
        drop(file);
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image));
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).expect("mountpoint");
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mountpoint));
        SmallFs { mountpoint, _dir: dir }
    }

    /// Fills the filesystem with one file until the kernel says ENOSPC; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.mountpoint.join("filler");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("filler");
        let chunk = vec![0xa5u8; 4096];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // What the page cache holds must reach the disk to count (ext4 delays allocation).
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // A reader connection may close a moment after the store's last handle is dropped
        // (its blocking task ends on its own): retry briefly before detaching.
        let mut unmounted = false;
        for _ in 0..20 {
            let out = Command::new("umount").arg(&self.mountpoint).output();
            if out.is_ok_and(|o| o.status.success()) {
                unmounted = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !unmounted {
            // Busy (a process still holds a file): detach lazily so nothing stays mounted.
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&*path.to_string_lossy())))
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(OP_TIMEOUT, f).await.unwrap_or_else(|_| panic!("{what} hung for more than {OP_TIMEOUT:?}"))
}

fn value_for(key: &str) -> Vec<u8> {
    // 2 KiB values: a full disk is reached in a few hundred writes.
    let mut v = key.as_bytes().to_vec();
    v.resize(2048, b'.');
    v
}

async fn disk_full_gives_a_clear_error_and_recovers(fs: SmallFs) {
    let db = fs.mountpoint.join("store.db");
    let store = SqliteStore::open(&db).await.expect("open on the small filesystem");
    let mut acked: Vec<(String, i64)> = Vec::new();
    for i in 0..50 {
        let key = format!("/disk/before-{i:04}");
        let rev = timed("write", store.create(&key, value_for(&key))).await.expect("write with space left");
        acked.push((key, rev));
    }

    let filler = fs.fill();

    // Writes until the first failure: the WAL may still have room it allocated earlier.
    let mut first_error = None;
    let mut refused_keys = Vec::new();
    let started = Instant::now();
    for i in 0..5000 {
        let key = format!("/disk/full-{i:05}");
        match timed("write on a full disk", store.create(&key, value_for(&key))).await {
            Ok(rev) => acked.push((key, rev)),
            Err(e) => {
                refused_keys.push(key);
                first_error = Some(e);
                break;
            }
        }
    }
    let error = first_error.expect("a write fails once the disk is full");
    let writes_after_fill = acked.len() - 50;
    match &error {
        StoreError::Backend(message) => assert!(
            message.contains("full") && message.contains("disk space"),
            "the error says the disk is full and what to do: {message}"
        ),
        other => panic!("a full disk is a Backend error, got {other:?}"),
    }
    // More writes keep failing the same clear way while the disk stays full.
    for i in 0..5 {
        let key = format!("/disk/still-full-{i}");
        match timed("write on a full disk", store.create(&key, value_for(&key))).await {
            Err(StoreError::Backend(m)) => {
                assert!(m.contains("full"), "{m}");
                refused_keys.push(key);
            }
            Ok(rev) => acked.push((key, rev)),
            Err(other) => panic!("unexpected error on a full disk: {other:?}"),
        }
    }

    // Reads keep working.
    let (key0, rev0) = &acked[0];
    let kv = timed("get on a full disk", store.get(key0)).await.expect("get").expect("present");
    assert_eq!((kv.value, kv.mod_revision), (value_for(key0), *rev0));
    let list = timed("list on a full disk", store.list("/disk/")).await.expect("list on a full disk");
    assert_eq!(list.items.len(), acked.len(), "the list holds exactly the acknowledged writes");
    let mut watch = timed("watch on a full disk", store.watch("/disk/", 0)).await.expect("watch");
    for (key, rev) in &acked {
        let event = timed("watch event", watch.next()).await.expect("event").expect("event ok");
        assert_eq!((event.key(), event.revision()), (key.as_str(), *rev), "watch replays the history");
    }
    drop(watch);

    // A restart while the disk is still full: it opens and reads.
    drop(store);
    let store = timed("reopen on a full disk", SqliteStore::open(&db)).await.expect("reopen while the disk is full");
    let list = timed("list after reopen", store.list("/disk/")).await.expect("list after reopening full");
    assert_eq!(list.items.len(), acked.len());

    // Space returns: writes work again, with no restart.
    std::fs::remove_file(&filler).expect("remove the filler");
    for i in 0..20 {
        let key = format!("/disk/after-{i:04}");
        let rev = timed("write after space returned", store.create(&key, value_for(&key))).await.expect("writes work again");
        acked.push((key, rev));
    }
    let recovered_after = started.elapsed();
    drop(store);

    // No corruption: SQLite's own check, and every acknowledged write with its value.
    let conn = rusqlite::Connection::open(&db).expect("open for integrity_check");
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check");
    assert_eq!(check, "ok", "PRAGMA integrity_check");
    drop(conn);
    let store = SqliteStore::open(&db).await.expect("final reopen");
    let list = store.list("/disk/").await.expect("final list");
    let present: std::collections::BTreeMap<&str, &skiff_store::KeyValue> = list.items.iter().map(|kv| (kv.key.as_str(), kv)).collect();
    for (key, rev) in &acked {
        let kv = present.get(key.as_str()).unwrap_or_else(|| panic!("acknowledged {key} lost"));
        assert_eq!((&kv.value, kv.mod_revision), (&value_for(key), *rev), "{key}");
    }
    for key in &refused_keys {
        assert!(!present.contains_key(key.as_str()), "{key} was refused but is in the store");
    }
    assert_eq!(list.items.len(), acked.len(), "nothing but the acknowledged writes");
    eprintln!(
        "FIGURES disk_full ({}): {} acknowledged writes, {writes_after_fill} fit in after the fill, {} refused \
         with: {error}; reads and reopen worked while full; recovered in {:.2} s; 0 lost; integrity ok",
        fs.mountpoint.display(),
        acked.len(),
        refused_keys.len(),
        recovered_after.as_secs_f64()
    );
    drop(store);
    let mountpoint = fs.mountpoint.clone();
    drop(fs);
    assert!(!is_mounted(&mountpoint), "{} is unmounted", mountpoint.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_tmpfs_gives_a_clear_error_and_recovers() {
    let test = "disk_full_on_tmpfs_gives_a_clear_error_and_recovers";
    if !require(test, "root (to mount a tmpfs)", is_root()) {
        return;
    }
    disk_full_gives_a_clear_error_and_recovers(SmallFs::tmpfs(2048)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_ext4_loop_gives_a_clear_error_and_recovers() {
    let test = "disk_full_on_ext4_loop_gives_a_clear_error_and_recovers";
    if !require(test, "root (to mount a loop device)", is_root()) {
        return;
    }
    let mkfs = Command::new("mkfs.ext4").arg("-V").output().is_ok_and(|o| o.status.success());
    if !require(test, "mkfs.ext4 (e2fsprogs)", mkfs) {
        return;
    }
    disk_full_gives_a_clear_error_and_recovers(SmallFs::ext4_loop(8192)).await;
}
