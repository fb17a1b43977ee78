//! Image garbage collection on the node, as kubelet's image GC, over the runtime's own image
//! store (the runc runtime's; containerd collects its own):
//! - every `interval`: blobs no stored image references, unpacked root filesystems of removed
//!   images no container uses, and stale staging (`ImageStore::gc`), which is always safe;
//! - when the store grows past `high_bytes`: images no container on the node uses and older than
//!   `min_age` are removed, oldest first, until it is below `low_bytes`.
//!
//! Thresholds are bytes of the store itself (not the filesystem's percentage, as kubelet does):
//! the store may share a disk with anything, and its own size is what the agent controls.
//! Environment overrides (for tests and small disks): `SKIFF_IMAGE_GC_INTERVAL_SECS`,
//! `SKIFF_IMAGE_GC_HIGH_BYTES`, `SKIFF_IMAGE_GC_LOW_BYTES`, `SKIFF_IMAGE_GC_MIN_AGE_SECS`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use skiff_runtime::{ImageError, ImageStore};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::runtime::ContainerRuntime;

/// Bound on the files walked to size the unpacked root filesystems.
const MAX_WALK: usize = 2_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageGcPolicy {
    pub interval: Duration,
    pub high_bytes: u64,
    pub low_bytes: u64,
    /// Images younger than this are never removed (a pod may be about to use what was just
    /// pulled for it).
    pub min_age: Duration,
}

impl Default for ImageGcPolicy {
    fn default() -> Self {
        ImageGcPolicy {
            interval: Duration::from_secs(300),
            high_bytes: 10 << 30,
            low_bytes: 8 << 30,
            min_age: Duration::from_secs(120),
        }
    }
}

impl ImageGcPolicy {
    /// The defaults with the environment's overrides (unparsable values are ignored, warned).
    pub fn from_env() -> Self {
        let mut p = ImageGcPolicy::default();
        let read = |name: &str| -> Option<u64> {
            let v = std::env::var(name).ok()?;
            match v.parse() {
                Ok(n) => Some(n),
                Err(_) => {
                    warn!("{name}={v:?} is not a number; ignored");
                    None
                }
            }
        };
        if let Some(s) = read("SKIFF_IMAGE_GC_INTERVAL_SECS") {
            p.interval = Duration::from_secs(s.max(1));
        }
        if let Some(b) = read("SKIFF_IMAGE_GC_HIGH_BYTES") {
            p.high_bytes = b;
            p.low_bytes = p.low_bytes.min(b);
        }
        if let Some(b) = read("SKIFF_IMAGE_GC_LOW_BYTES") {
            p.low_bytes = b.min(p.high_bytes);
        }
        if let Some(s) = read("SKIFF_IMAGE_GC_MIN_AGE_SECS") {
            p.min_age = Duration::from_secs(s);
        }
        p
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageGcReport {
    /// Manifest digests of the images removed for space.
    pub images_removed: Vec<String>,
    pub blobs_removed: usize,
    pub rootfs_removed: usize,
    /// The store's size before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// The store's bytes on disk: blobs plus unpacked root filesystems (walked, bounded).
pub fn store_usage(store: &ImageStore) -> u64 {
    let mut total = 0u64;
    let mut seen = 0usize;
    let mut stack = vec![store.dir().join("blobs"), store.dir().join("rootfs")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            seen += 1;
            if seen > MAX_WALK {
                return total;
            }
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

/// Manifest digests whose `rootfs/<hex>` is a lower layer of a mounted overlay (`mountinfo`'s
/// super options), whoever mounted it.
pub fn mounted_images(store: &ImageStore, mountinfo: &str) -> HashSet<String> {
    let rootfs = store.dir().join("rootfs");
    let mut out = HashSet::new();
    for line in mountinfo.lines() {
        let Some((_, tail)) = line.split_once(" - ") else { continue };
        let mut f = tail.split(' ');
        if f.next() != Some("overlay") {
            continue;
        }
        let opts = f.nth(1).unwrap_or_default();
        for opt in opts.split(',') {
            let Some(dirs) = opt.strip_prefix("lowerdir=") else { continue };
            for d in dirs.split(':') {
                let p = std::path::Path::new(d);
                if p.parent() == Some(rootfs.as_path())
                    && let Some(name) = p.file_name()
                {
                    out.insert(format!("sha256:{}", name.to_string_lossy()));
                }
            }
        }
    }
    out
}

/// How long ago `imported_at` (RFC 3339) was; unreadable or future: zero (so kept).
fn age(imported_at: &str, now: Timestamp) -> Duration {
    imported_at
        .parse::<Timestamp>()
        .ok()
        .and_then(|t| Duration::try_from(now.duration_since(t)).ok())
        .unwrap_or(Duration::ZERO)
}

/// One collection (blocking). `in_use`: the manifest digests of the node's containers.
pub fn collect(store: &ImageStore, in_use: &HashSet<String>, policy: &ImageGcPolicy) -> Result<ImageGcReport, ImageError> {
    let mut report = ImageGcReport { bytes_before: store_usage(store), ..Default::default() };
    let mut usage = report.bytes_before;
    if usage > policy.high_bytes {
        let now = Timestamp::now();
        let mut candidates: Vec<_> = store
            .list()?
            .into_iter()
            .filter(|i| !in_use.contains(&i.manifest_digest) && age(&i.imported_at, now) >= policy.min_age)
            .collect();
        candidates.sort_by(|a, b| a.imported_at.cmp(&b.imported_at));
        for img in candidates {
            if usage <= policy.low_bytes {
                break;
            }
            store.remove(&img.manifest_digest)?;
            let g = store.gc(in_use)?;
            report.blobs_removed += g.blobs_removed;
            report.rootfs_removed += g.rootfs_removed;
            report.images_removed.push(img.manifest_digest);
            usage = store_usage(store);
        }
    }
    let g = store.gc(in_use)?;
    report.blobs_removed += g.blobs_removed;
    report.rootfs_removed += g.rootfs_removed;
    report.bytes_after = store_usage(store);
    Ok(report)
}

/// Collects every `policy.interval` until `shutdown` flips. Returns at once when the runtime
/// has no image store of the agent's (CRI).
pub async fn run(runtime: Arc<dyn ContainerRuntime>, policy: ImageGcPolicy, mut shutdown: watch::Receiver<bool>) {
    let Some(store) = runtime.image_store() else { return };
    let mut tick = tokio::time::interval(policy.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: wait one interval after start
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let rt = runtime.clone();
        let store = store.clone();
        let p = policy.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<ImageGcReport, String> {
            let mut in_use = rt.images_in_use().map_err(|e| e.to_string())?;
            // Agents may share one store (`skiff up`): whatever any of them mounted stays.
            in_use.extend(mounted_images(&store, &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()));
            collect(&store, &in_use, &p).map_err(|e| e.to_string())
        })
        .await;
        match res {
            Ok(Ok(r)) if r.images_removed.is_empty() && r.blobs_removed == 0 && r.rootfs_removed == 0 => {}
            Ok(Ok(r)) => info!(
                images = r.images_removed.len(),
                blobs = r.blobs_removed,
                rootfs = r.rootfs_removed,
                before = r.bytes_before,
                after = r.bytes_after,
                "image gc"
            ),
            Ok(Err(e)) => warn!("image gc: {e}"),
            Err(e) => warn!("image gc task: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The echo image of scripts/build-image.sh, imported into a fresh store (root: unpacking
    /// keeps ownership). Under CI=true a missing requirement fails; elsewhere it skips.
    fn echo_store(tmp: &Path) -> Option<(ImageStore, String)> {
        let archive = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/images/skiff-echo-1.0.oci.tar");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !archive.exists() {
            let why = format!("root and {} (scripts/build-image.sh)", archive.display());
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true and {why} is missing");
            eprintln!("skipping: {why} is missing");
            return None;
        }
        let store = ImageStore::open(tmp.join("images")).expect("open");
        let digest = store.import(&archive).expect("import")[0].manifest_digest.clone();
        store.rootfs(&digest).expect("rootfs");
        Some((store, digest))
    }

    #[test]
    fn overlays_mounted_by_anyone_count_as_in_use() {
        let store = ImageStore::open(tempfile::tempdir().expect("tmp").path().join("s")).expect("open");
        let d = store.dir().display();
        let info = format!(
            "1 2 0:1 / /run/c1/rootfs rw - overlay overlay rw,lowerdir={d}/rootfs/{a},upperdir=/u,workdir=/w\n\
             3 2 0:1 / /run/c2/rootfs rw - overlay overlay rw,lowerdir=/elsewhere/rootfs/{b}:{d}/rootfs/{c},upperdir=/u\n\
             4 2 8:1 / / rw - ext4 /dev/sda1 rw,lowerdir={d}/rootfs/{b}\n",
            a = "a".repeat(64),
            b = "b".repeat(64),
            c = "c".repeat(64)
        );
        let got = mounted_images(&store, &info);
        let want: HashSet<String> = ["a", "c"].iter().map(|x| format!("sha256:{}", x.repeat(64))).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn removes_unused_images_past_the_threshold_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let Some((store, digest)) = echo_store(tmp.path()) else { return };
        let before = store_usage(&store);
        assert!(before > 1_000_000, "the echo image is stored and unpacked ({before} bytes)");
        let tight = ImageGcPolicy { interval: Duration::from_secs(1), high_bytes: 0, low_bytes: 0, min_age: Duration::ZERO };

        // Below the threshold: nothing but the safe sweep.
        let roomy = ImageGcPolicy { high_bytes: u64::MAX, low_bytes: u64::MAX, ..tight.clone() };
        let r = collect(&store, &HashSet::new(), &roomy).expect("gc");
        assert!(r.images_removed.is_empty() && store.contains(&digest).expect("contains"));
        // In use by a container: kept, even past the threshold.
        let r = collect(&store, &HashSet::from([digest.clone()]), &tight).expect("gc");
        assert!(r.images_removed.is_empty() && store.contains(&digest).expect("contains"));
        // Too young: kept.
        let young = ImageGcPolicy { min_age: Duration::from_secs(3600), ..tight.clone() };
        let r = collect(&store, &HashSet::new(), &young).expect("gc");
        assert!(r.images_removed.is_empty() && store.contains(&digest).expect("contains"));
        // Unused, old enough, past the threshold: removed with its blobs and rootfs.
        let r = collect(&store, &HashSet::new(), &tight).expect("gc");
        assert_eq!(r.images_removed, vec![digest.clone()]);
        assert!(!store.contains(&digest).expect("contains"));
        assert!(r.blobs_removed >= 3 && r.rootfs_removed == 1, "{r:?}");
        assert_eq!((r.bytes_before, r.bytes_after), (before, 0));
    }

    #[test]
    fn a_removed_images_rootfs_stays_while_a_container_uses_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let Some((store, digest)) = echo_store(tmp.path()) else { return };
        store.remove(&digest).expect("rm");
        let roomy = ImageGcPolicy::default();
        let r = collect(&store, &HashSet::from([digest.clone()]), &roomy).expect("gc");
        assert_eq!(r.rootfs_removed, 0, "a container's lower layer is kept");
        assert!(store.dir().join("rootfs").join(digest.trim_start_matches("sha256:")).is_dir());
        let r = collect(&store, &HashSet::new(), &roomy).expect("gc");
        assert_eq!(r.rootfs_removed, 1);
        assert_eq!(r.bytes_after, 0, "blobs and rootfs gone");
    }
}
