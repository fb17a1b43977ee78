//! The node's local image store.
//!
//! Layout under the store's directory (default `/var/lib/skiff/images`):
//! - `blobs/sha256/<hex>`: content-addressed blobs (manifests, configs, layers as imported);
//! - `rootfs/<manifest hex>/`: the image's layers unpacked in order (read-only by convention: the
//!   runtime uses it as an overlay lowerdir);
//! - `images.json`: image records (manifest digest -> config and layers) and tags (normalized
//!   reference -> manifest digest), rewritten atomically;
//! - `lock`: an advisory lock (flock) so an agent and `skiff image` never write at once;
//! - `tmp/`: staging; an import or unpack works there and only renames into place once every digest
//!   checked out and every layer unpacked, so a failed import leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{ImageIndex, ImageManifest, MediaType};
use serde::{Deserialize, Serialize};

use crate::ImageError;
use crate::digest::{self, HashingWriter};
use crate::reference::Reference;

pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/skiff/images";

/// Bounds on what an archive may make the store do.
const MAX_ARCHIVE_ENTRIES: usize = 100_000;
const MAX_LAYER_ENTRIES: usize = 1_000_000;
pub(crate) const MAX_JSON: u64 = 4 * 1024 * 1024;
const MAX_LINK_HOPS: usize = 16;

const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What the image's config says about how to run it (the OCI/docker `config` object).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` entries in image order.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `8080/tcp`, `9001/udp`, ...
    pub exposed_ports: Vec<String>,
    pub stop_signal: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub manifest_digest: String,
    pub config_digest: String,
    /// Normalized references (`docker.io/skiff/echo:1.0`) pointing at this image; may be empty.
    pub references: Vec<String>,
    /// Sum of the stored blobs' sizes (manifest, config, layers as stored).
    pub size: u64,
    /// Whether `rootfs/<hex>` is unpacked.
    pub unpacked: bool,
    /// When it was imported or pulled (RFC 3339).
    pub imported_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedImage {
    pub manifest_digest: String,
    pub references: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub rootfs_removed: usize,
}

/// An image ready to run: its unpacked root filesystem and its config.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    pub manifest_digest: String,
    pub rootfs: PathBuf,
    pub config: ImageConfig,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Records {
    images: BTreeMap<String, StoredImage>,
    tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredImage {
    config: String,
    layers: Vec<String>,
    size: u64,
    imported_at: String,
    parsed_config: ImageConfig,
}

/// The store. Cheap to clone; every call takes the on-disk lock itself, so several
/// `ImageStore`s (in several processes) over one directory are safe.
#[derive(Clone, Debug)]
pub struct ImageStore {
    dir: PathBuf,
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

impl ImageStore {
    /// Opens (creating if needed) a store at `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = dir.into();
        for sub in ["blobs/sha256", "rootfs", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
        }
        Ok(ImageStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<File, ImageError> {
        let p = self.dir.join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(format!("opening {}", p.display())))?;
        f.lock().map_err(io_err(format!("locking {}", p.display())))?;
        Ok(f)
    }

    fn blob_path(&self, d: &str) -> Result<PathBuf, ImageError> {
        Ok(self.dir.join("blobs/sha256").join(digest::validate(d)?))
    }

    fn rootfs_path(&self, manifest_digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.dir.join("rootfs").join(digest::validate(manifest_digest)?))
    }

    fn load(&self) -> Result<Records, ImageError> {
        let p = self.dir.join("images.json");
        match fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ImageError::Malformed(format!("{} is corrupt: {e}", p.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Records::default()),
            Err(e) => Err(io_err(format!("reading {}", p.display()))(e)),
        }
    }

    fn save(&self, records: &Records) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(records)
            .map_err(|e| ImageError::Malformed(format!("serializing image records: {e}")))?;
        write_atomic(&self.dir.join("images.json"), &bytes)
    }

    /// Imports every image of an OCI image layout archive or a `docker save` archive (plain or
    /// gzipped tar). All digests are verified and every image unpacked before anything is stored.
    pub fn import(&self, archive: &Path) -> Result<Vec<ImportedImage>, ImageError> {
        let staging = StagingDir::new(&self.dir.join("tmp"), "import")?;
        let contents = read_archive(archive, &staging.path)?;
        let pending = if contents.has("index.json") && contents.has("oci-layout") {
            parse_oci_layout(&contents)?
        } else if contents.has("manifest.json") {
            parse_docker_archive(&contents, &staging.path)?
        } else {
            return Err(ImageError::Malformed(format!(
                "{}: neither an OCI image layout (oci-layout, index.json) nor a docker archive (manifest.json)",
                archive.display()
            )));
        };
        if pending.is_empty() {
            return Err(ImageError::Malformed(format!("{}: the archive holds no image", archive.display())));
        }
        let imported = self.store_pending(&pending, &staging)?;
        tracing::info!(archive = %archive.display(), images = imported.len(), "imported images");
        Ok(imported)
    }

    /// The one path by which images enter the store (archive import and registry pull): unpacks
    /// each image's layers in `staging` (checking diff_ids and paths), then, under the lock,
    /// moves blobs and root filesystems into place and records the images and their tags. Every
    /// digest must have been checked by the caller; nothing is stored if unpacking fails.
    pub(crate) fn store_pending(&self, pending: &[PendingImage], staging: &StagingDir) -> Result<Vec<ImportedImage>, ImageError> {
        // Unpack (and so verify the layers' diff_ids and paths) in staging first.
        let mut unpacked: HashMap<String, PathBuf> = HashMap::new();
        for img in pending {
            if unpacked.contains_key(&img.manifest_digest) || self.rootfs_path(&img.manifest_digest)?.exists() {
                continue;
            }
            let root = staging.path.join(format!("rootfs-{}", unpacked.len()));
            let layers: Vec<(String, PathBuf)> =
                img.layers.iter().map(|l| (l.digest.clone(), l.file.clone())).collect();
            unpack_layers(&root, &layers, Some(&img.diff_ids))?;
            unpacked.insert(img.manifest_digest.clone(), root);
        }

        let _lock = self.lock()?;
        let mut records = self.load()?;
        let mut imported = Vec::new();
        for img in pending {
            let mut blobs: Vec<(&str, &Path)> = vec![(&img.manifest_digest, &img.manifest_file), (&img.config.digest, &img.config.file)];
            blobs.extend(img.layers.iter().map(|l| (l.digest.as_str(), l.file.as_path())));
            let mut size = 0;
            for (d, file) in blobs {
                let dest = self.blob_path(d)?;
                if !dest.exists() {
                    // Same filesystem (tmp/ is inside the store): a rename, atomic.
                    if fs::rename(file, &dest).is_err() {
                        fs::copy(file, &dest).map_err(io_err(format!("storing blob {d}")))?;
                    }
                }
                size += fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
            }
            if let Some(root) = unpacked.remove(&img.manifest_digest) {
                let dest = self.rootfs_path(&img.manifest_digest)?;
                if !dest.exists() {
                    fs::rename(&root, &dest).map_err(io_err(format!("storing {}", dest.display())))?;
                }
            }
            records.images.insert(
                img.manifest_digest.clone(),
                StoredImage {
                    config: img.config.digest.clone(),
                    layers: img.layers.iter().map(|l| l.digest.clone()).collect(),
                    size,
                    imported_at: chrono::Utc::now().to_rfc3339(),
                    parsed_config: img.parsed_config.clone(),
                },
            );
            let refs: Vec<String> = img.references.iter().map(|r| r.to_string()).collect();
            for r in &refs {
                records.tags.insert(r.clone(), img.manifest_digest.clone());
            }
            imported.push(ImportedImage { manifest_digest: img.manifest_digest.clone(), references: refs });
        }
        self.save(&records)?;
        Ok(imported)
    }

    /// When `manifest_digest` is stored already: points `reference` at it and returns its config
    /// digest (a pull that finds nothing new). None: not stored.
    pub(crate) fn tag_if_stored(&self, manifest_digest: &str, reference: &Reference) -> Result<Option<String>, ImageError> {
        let _lock = self.lock()?;
        let mut records = self.load()?;
        let Some(config) = records.images.get(manifest_digest).map(|i| i.config.clone()) else { return Ok(None) };
        records.tags.insert(reference.to_string(), manifest_digest.to_string());
        self.save(&records)?;
        Ok(Some(config))
    }

    /// Every stored image, by manifest digest.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let records = self.load()?;
        let mut out = Vec::new();
        for (manifest, img) in &records.images {
            let references = records.tags.iter().filter(|(_, m)| *m == manifest).map(|(r, _)| r.clone()).collect();
            out.push(ImageInfo {
                manifest_digest: manifest.clone(),
                config_digest: img.config.clone(),
                references,
                size: img.size,
                unpacked: self.rootfs_path(manifest)?.is_dir(),
                imported_at: img.imported_at.clone(),
            });
        }
        Ok(out)
    }

    /// The manifest digest `reference` names: a tag (normalized), `name@sha256:..`, or a bare
    /// `sha256:...` manifest digest.
    pub fn resolve_digest(&self, reference: &str) -> Result<String, ImageError> {
        let records = self.load()?;
        find(&records, reference)
    }

    /// Whether `reference` names a stored image.
    pub fn contains(&self, reference: &str) -> Result<bool, ImageError> {
        match self.resolve_digest(reference) {
            Ok(_) => Ok(true),
            Err(ImageError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn config(&self, reference: &str) -> Result<ImageConfig, ImageError> {
        let records = self.load()?;
        let m = find(&records, reference)?;
        Ok(records.images[&m].parsed_config.clone())
    }

    /// The image's unpacked root filesystem (unpacking it again if gc removed it). Callers must not
    /// write into it: the runtime mounts it as an overlay's read-only lower layer.
    pub fn rootfs(&self, reference: &str) -> Result<PathBuf, ImageError> {
        let records = self.load()?;
        let m = find(&records, reference)?;
        let dest = self.rootfs_path(&m)?;
        if dest.is_dir() {
            return Ok(dest);
        }
        let _lock = self.lock()?;
        if dest.is_dir() {
            return Ok(dest);
        }
        let img = &records.images[&m];
        let mut layers = Vec::new();
        for l in &img.layers {
            layers.push((l.clone(), self.blob_path(l)?));
        }
        let staging = StagingDir::new(&self.dir.join("tmp"), "unpack")?;
        let root = staging.path.join("rootfs");
        unpack_layers(&root, &layers, None)?;
        fs::rename(&root, &dest).map_err(io_err(format!("storing {}", dest.display())))?;
        Ok(dest)
    }

    /// rootfs + config in one call, what the runtime needs to create a container.
    pub fn resolve(&self, reference: &str) -> Result<ResolvedImage, ImageError> {
        let manifest_digest = self.resolve_digest(reference)?;
        let rootfs = self.rootfs(&manifest_digest)?;
        let config = self.config(&manifest_digest)?;
        Ok(ResolvedImage { manifest_digest, rootfs, config })
    }

    /// Removes a tag; by digest (`sha256:..` or `name@sha256:..`) removes the image and every tag
    /// on it. An image whose last tag goes is removed too. Blobs and the unpacked rootfs stay until
    /// `gc`. Returns the manifest digests of the images removed.
    pub fn remove(&self, reference: &str) -> Result<Vec<String>, ImageError> {
        let _lock = self.lock()?;
        let mut records = self.load()?;
        let m = find(&records, reference)?;
        let by_digest = reference.starts_with("sha256:") || reference.contains('@');
        if by_digest {
            records.tags.retain(|_, v| *v != m);
        } else {
            let r = Reference::parse(reference)?.to_string();
            records.tags.remove(&r);
        }
        let mut removed = Vec::new();
        if !records.tags.values().any(|v| *v == m) {
            records.images.remove(&m);
            removed.push(m);
        }
        self.save(&records)?;
        Ok(removed)
    }

    /// Deletes blobs no image references, unpacked root filesystems of images no longer stored
    /// (except manifests in `in_use`, e.g. those of existing containers), and stale staging.
    pub fn gc(&self, in_use: &HashSet<String>) -> Result<GcReport, ImageError> {
        let _lock = self.lock()?;
        let records = self.load()?;
        let mut live: HashSet<String> = HashSet::new();
        for (m, img) in &records.images {
            live.insert(m.clone());
            live.insert(img.config.clone());
            live.extend(img.layers.iter().cloned());
        }
        let mut report = GcReport::default();
        let blobs = self.dir.join("blobs/sha256");
        for e in fs::read_dir(&blobs).map_err(io_err(format!("reading {}", blobs.display())))? {
            let Ok(e) = e else { continue };
            let name = format!("sha256:{}", e.file_name().to_string_lossy());
            if !live.contains(&name) {
                report.bytes_freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).map_err(io_err(format!("removing blob {name}")))?;
                report.blobs_removed += 1;
            }
        }
        let rootfs = self.dir.join("rootfs");
        for e in fs::read_dir(&rootfs).map_err(io_err(format!("reading {}", rootfs.display())))? {
            let Ok(e) = e else { continue };
            let name = format!("sha256:{}", e.file_name().to_string_lossy());
            if !records.images.contains_key(&name) && !in_use.contains(&name) {
                fs::remove_dir_all(e.path()).map_err(io_err(format!("removing rootfs {name}")))?;
                report.rootfs_removed += 1;
            }
        }
        // Staging dirs are named <kind>-<pid>-<n>; those of dead processes are leftovers.
        let tmp = self.dir.join("tmp");
        if let Ok(entries) = fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                if pid.is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(report)
    }
}

fn find(records: &Records, reference: &str) -> Result<String, ImageError> {
    let not_found = || ImageError::NotFound(reference.to_string());
    if reference.starts_with("sha256:") {
        digest::validate(reference)?;
        return records.images.contains_key(reference).then(|| reference.to_string()).ok_or_else(not_found);
    }
    let r = Reference::parse(reference)?;
    if let Some(d) = &r.digest {
        return records.images.contains_key(d).then(|| d.clone()).ok_or_else(not_found);
    }
    records.tags.get(&r.to_string()).cloned().ok_or_else(not_found)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(format!("writing {}", path.display()))(e)
    })
}

/// A directory under the store's tmp/ removed on drop (so every error path cleans up).
pub(crate) struct StagingDir {
    pub(crate) path: PathBuf,
}

impl StagingDir {
    pub(crate) fn new(tmp: &Path, kind: &str) -> Result<Self, ImageError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let path = tmp.join(format!("{kind}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        fs::create_dir_all(&path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(StagingDir { path })
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Reading archives.

struct StagedFile {
    file: PathBuf,
    digest: String,
    size: u64,
}

enum ArchiveEntry {
    File(StagedFile),
    /// A symlink or hard link to another entry, as an archive-root-relative name.
    Link(String),
}

/// The outer archive's regular files, each copied into staging while hashed.
struct ArchiveContents {
    entries: HashMap<String, ArchiveEntry>,
}

impl ArchiveContents {
    fn has(&self, name: &str) -> bool {
        self.get(name).is_ok()
    }

    fn get(&self, name: &str) -> Result<&StagedFile, ImageError> {
        let mut name = name.to_string();
        for _ in 0..MAX_LINK_HOPS {
            match self.entries.get(&name) {
                Some(ArchiveEntry::File(f)) => return Ok(f),
                Some(ArchiveEntry::Link(to)) => name = to.clone(),
                None => return Err(ImageError::Malformed(format!("the archive has no file {name:?}"))),
            }
        }
        Err(ImageError::Malformed(format!("too many links resolving {name:?} in the archive")))
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T, ImageError> {
        let f = self.get(name)?;
        read_json(&f.file, name)
    }

    /// The blob `d` of an OCI layout, checked against the descriptor's digest and size.
    fn blob(&self, d: &str, size: Option<u64>) -> Result<&StagedFile, ImageError> {
        let hex = digest::validate(d)?;
        let f = self
            .get(&format!("blobs/sha256/{hex}"))
            .map_err(|_| ImageError::Malformed(format!("the archive lacks blob {d}")))?;
        if f.digest != d {
            return Err(ImageError::DigestMismatch { what: format!("blob {d}"), expected: d.to_string(), actual: f.digest.clone() });
        }
        if let Some(size) = size
            && size != f.size
        {
            return Err(ImageError::Malformed(format!("blob {d} has {} bytes, its descriptor says {size}", f.size)));
        }
        Ok(f)
    }
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(file: &Path, name: &str) -> Result<T, ImageError> {
    let f = File::open(file).map_err(io_err(format!("reading {name}")))?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON + 1).read_to_end(&mut bytes).map_err(io_err(format!("reading {name}")))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(ImageError::Malformed(format!("{name} is larger than {MAX_JSON} bytes")));
    }
    serde_json::from_slice(&bytes).map_err(|e| ImageError::Malformed(format!("{name}: {e}")))
}

/// An archive-relative path with `./` and leading `/` removed; `..` is refused.
fn clean_archive_path(p: &Path) -> Result<String, ImageError> {
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ImageError::UnsafePath(format!("archive entry {:?} leaves the archive", p.display().to_string())));
            }
        }
    }
    Ok(parts.join("/"))
}

fn open_maybe_gzip(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let mut f = BufReader::new(File::open(path).map_err(io_err(format!("opening {}", path.display())))?);
    let magic = io::BufRead::fill_buf(&mut f).map_err(io_err(format!("reading {}", path.display())))?;
    if magic.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::GzDecoder::new(f)))
    } else {
        Ok(Box::new(f))
    }
}

fn read_archive(path: &Path, staging: &Path) -> Result<ArchiveContents, ImageError> {
    let bad = |e: io::Error| ImageError::Malformed(format!("{}: not a readable tar archive: {e}", path.display()));
    let mut ar = tar::Archive::new(open_maybe_gzip(path)?);
    let mut entries = HashMap::new();
    let files = staging.join("files");
    fs::create_dir_all(&files).map_err(io_err("creating staging"))?;
    for (i, entry) in ar.entries().map_err(bad)?.enumerate() {
        if i >= MAX_ARCHIVE_ENTRIES {
            return Err(ImageError::Malformed(format!("{}: more than {MAX_ARCHIVE_ENTRIES} entries", path.display())));
        }
        let mut entry = entry.map_err(bad)?;
        let name = clean_archive_path(&entry.path().map_err(bad)?)?;
        let kind = entry.header().entry_type();
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let dest = files.join(i.to_string());
            let mut w = HashingWriter::new(File::create(&dest).map_err(io_err("writing staging"))?);
            io::copy(&mut entry, &mut w).map_err(bad)?;
            let (digest, size, file) = w.finish();
            file.sync_all().map_err(io_err("writing staging"))?;
            entries.insert(name, ArchiveEntry::File(StagedFile { file: dest, digest, size }));
        } else if kind.is_symlink() || kind.is_hard_link() {
            let target = entry.link_name().map_err(bad)?.unwrap_or_default().into_owned();
            // A symlink is relative to its own directory, a hard link to the archive root.
            let joined = if kind.is_symlink() && !target.is_absolute() {
                Path::new(&name).parent().unwrap_or(Path::new("")).join(&target)
            } else {
                target
            };
            let normalized = normalize_lexically(&joined).ok_or_else(|| {
                ImageError::UnsafePath(format!("archive link {name:?} points outside the archive"))
            })?;
            entries.insert(name, ArchiveEntry::Link(normalized));
        }
    }
    Ok(ArchiveContents { entries })
}

/// Resolves `.` and `..` without touching the filesystem; `None` if it climbs above the root.
fn normalize_lexically(p: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => {}
        }
    }
    Some(parts.join("/"))
}

/// An image found in an archive, its blobs still in staging.
pub(crate) struct PendingImage {
    pub(crate) manifest_digest: String,
    pub(crate) manifest_file: PathBuf,
    pub(crate) config: PendingBlob,
    pub(crate) layers: Vec<PendingBlob>,
    pub(crate) diff_ids: Vec<String>,
    pub(crate) parsed_config: ImageConfig,
    pub(crate) references: Vec<Reference>,
}

pub(crate) struct PendingBlob {
    pub(crate) digest: String,
    pub(crate) file: PathBuf,
}

impl From<&StagedFile> for PendingBlob {
    fn from(f: &StagedFile) -> Self {
        PendingBlob { digest: f.digest.clone(), file: f.file.clone() }
    }
}

/// The image config file (OCI and docker alike). Parsed with our own tolerant struct rather than
/// oci-spec's ImageConfiguration: docker's configs carry fields and value shapes (null Cmd,
/// unknown architectures) that a strict model rejects, and the runtime needs only these.
#[derive(Deserialize, Default)]
struct RawConfigFile {
    #[serde(default)]
    config: Option<RawConfig>,
    #[serde(default)]
    rootfs: Option<RawRootFs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    user: Option<String>,
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    stop_signal: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawRootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

pub(crate) fn parse_config(file: &Path, what: &str) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let raw: RawConfigFile = read_json(file, what)?;
    let c = raw.config.unwrap_or_default();
    let config = ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|w| !w.is_empty()),
        user: c.user.filter(|u| !u.is_empty()),
        exposed_ports: c.exposed_ports.map(|m| m.into_keys().collect()).unwrap_or_default(),
        stop_signal: c.stop_signal.filter(|s| !s.is_empty()),
    };
    let diff_ids = raw.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    for d in &diff_ids {
        digest::validate(d)?;
    }
    Ok((config, diff_ids))
}

fn parse_oci_layout(contents: &ArchiveContents) -> Result<Vec<PendingImage>, ImageError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Layout {
        image_layout_version: String,
    }
    let layout: Layout = contents.json("oci-layout")?;
    if !layout.image_layout_version.starts_with("1.") {
        return Err(ImageError::Unsupported(format!("OCI layout version {}", layout.image_layout_version)));
    }
    let index: ImageIndex = contents.json("index.json")?;
    let mut out = Vec::new();
    for desc in index.manifests() {
        let annotations = desc.annotations().clone().unwrap_or_default();
        let mut references = Vec::new();
        if let Some(name) = annotations.get(ANNOTATION_IMAGE_NAME) {
            references.push(Reference::parse(name)?);
        } else if let Some(name) = annotations.get(ANNOTATION_REF_NAME) {
            // A bare tag ("1.0") names no repository; a full reference ("busybox:1.36") does.
            if name.contains([':', '/']) {
                references.push(Reference::parse(name)?);
            }
        }
        let d = desc.digest().to_string();
        let manifest_file = contents.blob(&d, Some(desc.size()))?;
        let (manifest_digest, manifest_file) = match desc.media_type() {
            MediaType::ImageIndex => pick_platform_manifest(contents, manifest_file, 0)?,
            _ => (d.clone(), manifest_file),
        };
        out.push(pending_from_manifest(contents, &manifest_digest, manifest_file, references)?);
    }
    Ok(out)
}

/// From a (nested) image index, the linux/amd64 manifest (or the only one).
fn pick_platform_manifest<'a>(
    contents: &'a ArchiveContents,
    index_file: &StagedFile,
    depth: usize,
) -> Result<(String, &'a StagedFile), ImageError> {
    if depth > 4 {
        return Err(ImageError::Malformed("image indexes nested too deep".into()));
    }
    let index: ImageIndex = read_json(&index_file.file, &index_file.digest)?;
    let manifests = index.manifests();
    let chosen = manifests
        .iter()
        .find(|m| {
            m.platform().as_ref().is_some_and(|p| {
                p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
            })
        })
        .or(if manifests.len() == 1 { manifests.first() } else { None })
        .ok_or_else(|| ImageError::Unsupported("the image index has no linux/amd64 manifest".into()))?;
    let d = chosen.digest().to_string();
    let f = contents.blob(&d, Some(chosen.size()))?;
    match chosen.media_type() {
        MediaType::ImageIndex => pick_platform_manifest(contents, f, depth + 1),
        _ => Ok((d, f)),
    }
}

fn pending_from_manifest(
    contents: &ArchiveContents,
    manifest_digest: &str,
    manifest_file: &StagedFile,
    references: Vec<Reference>,
) -> Result<PendingImage, ImageError> {
    let manifest: ImageManifest = read_json(&manifest_file.file, &format!("manifest {manifest_digest}"))?;
    let cd = manifest.config().digest().to_string();
    let config = contents.blob(&cd, Some(manifest.config().size()))?;
    let (parsed_config, diff_ids) = parse_config(&config.file, &format!("config {cd}"))?;
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let ld = l.digest().to_string();
        layers.push(PendingBlob::from(contents.blob(&ld, Some(l.size()))?));
    }
    if diff_ids.len() != layers.len() {
        return Err(ImageError::Malformed(format!(
            "manifest {manifest_digest} has {} layers but its config lists {} diff_ids",
            layers.len(),
            diff_ids.len()
        )));
    }
    Ok(PendingImage {
        manifest_digest: manifest_digest.to_string(),
        manifest_file: manifest_file.file.clone(),
        config: PendingBlob::from(config),
        layers,
        diff_ids,
        parsed_config,
        references,
    })
}

fn parse_docker_archive(contents: &ArchiveContents, staging: &Path) -> Result<Vec<PendingImage>, ImageError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let entries: Vec<Entry> = contents.json("manifest.json")?;
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let config = contents.get(&clean_archive_path(Path::new(&e.config))?)?;
        // Old-style archives name the config <hex>.json; new ones blobs/sha256/<hex>.
        let stem = Path::new(&e.config).file_name().map(|n| n.to_string_lossy().trim_end_matches(".json").to_string());
        if let Some(hex) = stem
            && hex.len() == 64
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
            && config.digest != format!("sha256:{hex}")
        {
            return Err(ImageError::DigestMismatch {
                what: format!("config {}", e.config),
                expected: format!("sha256:{hex}"),
                actual: config.digest.clone(),
            });
        }
        let (parsed_config, diff_ids) = parse_config(&config.file, &e.config)?;
        if diff_ids.len() != e.layers.len() {
            return Err(ImageError::Malformed(format!(
                "{} lists {} layers but its config {} diff_ids",
                e.config,
                e.layers.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        let mut layer_descs = Vec::new();
        for name in &e.layers {
            let f = contents.get(&clean_archive_path(Path::new(name))?)?;
            let gz = {
                let mut magic = [0u8; 2];
                File::open(&f.file).and_then(|mut h| h.read_exact(&mut magic)).is_ok() && magic == [0x1f, 0x8b]
            };
            let media = if gz { "application/vnd.oci.image.layer.v1.tar+gzip" } else { "application/vnd.oci.image.layer.v1.tar" };
            layer_descs.push(serde_json::json!({"mediaType": media, "digest": f.digest, "size": f.size}));
            layers.push(PendingBlob::from(f));
        }
        // Docker archives have no manifest blob: write the OCI manifest a registry would serve, so
        // the image is stored (and named by digest) the same way as an OCI one.
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.size},
            "layers": layer_descs,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| ImageError::Malformed(e.to_string()))?;
        let manifest_digest = digest::of_bytes(&bytes);
        let manifest_file = staging.join(format!("docker-manifest-{i}"));
        fs::write(&manifest_file, &bytes).map_err(io_err("writing staging"))?;
        let mut references = Vec::new();
        for t in e.repo_tags.iter().flatten() {
            references.push(Reference::parse(t)?);
        }
        out.push(PendingImage {
            manifest_digest,
            manifest_file,
            config: PendingBlob::from(config),
            layers,
            diff_ids,
            parsed_config,
            references,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Unpacking layers.

/// A reader that hashes what it yields (to check a layer's diff_id while unpacking it).
struct HashingReader<R> {
    inner: R,
    hasher: HashingWriter<io::Sink>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Unpacks `layers` (digest, blob file) in order into a new directory `root`. With `diff_ids`,
/// each layer's uncompressed digest must match. On error `root` may be partly written: callers
/// unpack inside a staging dir.
fn unpack_layers(root: &Path, layers: &[(String, PathBuf)], diff_ids: Option<&[String]>) -> Result<(), ImageError> {
    fs::create_dir_all(root).map_err(io_err(format!("creating {}", root.display())))?;
    // The image's own root directory mode, as container runtimes use.
    let _ = fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    for (i, (d, file)) in layers.iter().enumerate() {
        let reader = open_maybe_compressed(file, d)?;
        let mut hashing = HashingReader { inner: reader, hasher: HashingWriter::new(io::sink()) };
        unpack_layer(root, &mut hashing, d)?;
        // Whatever follows the tar's end marker is part of the layer's bytes too.
        io::copy(&mut hashing, &mut io::sink()).map_err(|e| ImageError::Layer { layer: d.clone(), message: e.to_string() })?;
        if let Some(expected) = diff_ids.and_then(|ids| ids.get(i)) {
            let (actual, _, _) = hashing.hasher.finish();
            if &actual != expected {
                return Err(ImageError::DigestMismatch {
                    what: format!("uncompressed layer {d} (diff_id)"),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
    }
    Ok(())
}

fn open_maybe_compressed(file: &Path, d: &str) -> Result<Box<dyn Read>, ImageError> {
    let mut f = BufReader::new(File::open(file).map_err(io_err(format!("opening layer {d}")))?);
    let magic = io::BufRead::fill_buf(&mut f).map_err(io_err(format!("reading layer {d}")))?;
    if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(ImageError::Unsupported(format!("layer {d} is zstd-compressed")));
    }
    if magic.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::GzDecoder::new(f)))
    } else {
        Ok(Box::new(f))
    }
}

/// A layer-relative path; `..` anywhere is refused (tar would silently skip it; we fail the
/// image, as a layer that tries it is hostile or broken).
fn clean_layer_path(p: &Path, layer: &str) -> Result<PathBuf, ImageError> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ImageError::UnsafePath(format!("layer {layer}: entry {:?} climbs out with '..'", p.display().to_string())));
            }
        }
    }
    Ok(out)
}

/// Checks that `rel`'s parent directory, resolved on disk (symlinks followed), is inside `root`.
fn check_parent_inside(canon_root: &Path, root: &Path, rel: &Path, layer: &str) -> Result<(), ImageError> {
    let Some(parent) = root.join(rel).parent().map(Path::to_path_buf) else { return Ok(()) };
    match parent.canonicalize() {
        Ok(p) if p.starts_with(canon_root) => Ok(()),
        Ok(p) => Err(ImageError::UnsafePath(format!(
            "layer {layer}: entry {:?} resolves through a symlink to {} outside the root filesystem",
            rel.display().to_string(),
            p.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // The parent does not exist yet; its nearest existing ancestor decides.
            match rel.parent() {
                Some(up) if !up.as_os_str().is_empty() => check_parent_inside(canon_root, root, up, layer),
                _ => Ok(()),
            }
        }
        Err(e) => Err(io_err(format!("resolving {}", parent.display()))(e)),
    }
}

/// Removes what `rel` names inside the root without following a final symlink.
fn remove_in_root(canon_root: &Path, root: &Path, rel: &Path, layer: &str) -> Result<(), ImageError> {
    check_parent_inside(canon_root, root, rel, layer)?;
    let full = root.join(rel);
    match fs::symlink_metadata(&full) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&full),
        Ok(_) => fs::remove_file(&full),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(io_err(format!("removing {}", full.display())))
}

fn unpack_layer(root: &Path, reader: &mut impl Read, layer: &str) -> Result<(), ImageError> {
    let bad = |e: io::Error| ImageError::Layer { layer: layer.to_string(), message: e.to_string() };
    let canon_root = root.canonicalize().map_err(io_err(format!("resolving {}", root.display())))?;
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(true);
    ar.set_overwrite(true);
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut opaque: Vec<PathBuf> = Vec::new();
    for (i, entry) in ar.entries().map_err(bad)?.enumerate() {
        if i >= MAX_LAYER_ENTRIES {
            return Err(ImageError::Layer { layer: layer.to_string(), message: format!("more than {MAX_LAYER_ENTRIES} entries") });
        }
        let mut entry = entry.map_err(bad)?;
        let rel = clean_layer_path(&entry.path().map_err(bad)?, layer)?;
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else { continue };
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == ".wh..wh..opq" {
            opaque.push(parent);
            continue;
        }
        if name.starts_with(".wh..wh.") {
            continue; // aufs metadata (hard-link dirs); meaningless here
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            remove_in_root(&canon_root, root, &parent.join(hidden), layer)?;
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_block_special() || kind.is_character_special() || kind.is_fifo() {
            // Device nodes come from the runtime's /dev, never from images.
            tracing::debug!(layer, path = %rel.display(), "skipping device node in layer");
            continue;
        }
        if kind.is_hard_link()
            && let Some(target) = entry.link_name().map_err(bad)?
        {
            let target = clean_layer_path(&target, layer)?;
            check_parent_inside(&canon_root, root, &target.join("x"), layer)?;
        }
        check_parent_inside(&canon_root, root, &rel, layer)?;
        // What a lower layer left at this path is replaced, unless both are directories (which
        // merge).
        if let Ok(m) = fs::symlink_metadata(root.join(&rel))
            && !(m.is_dir() && kind.is_dir())
        {
            remove_in_root(&canon_root, root, &rel, layer)?;
        }
        if !entry.unpack_in(root).map_err(bad)? {
            return Err(ImageError::UnsafePath(format!("layer {layer}: entry {:?} was refused", rel.display().to_string())));
        }
        created.insert(rel);
    }
    for dir in opaque {
        check_parent_inside(&canon_root, root, &dir.join("x"), layer)?;
        remove_lower_children(root, &dir, &created)?;
    }
    Ok(())
}

/// Removes everything under `dir` that this layer did not create (an opaque directory hides the
/// lower layers' contents).
fn remove_lower_children(root: &Path, dir: &Path, created: &HashSet<PathBuf>) -> Result<(), ImageError> {
    let full = root.join(dir);
    let Ok(entries) = fs::read_dir(&full) else { return Ok(()) };
    let mut keep_dirs = BTreeSet::new();
    for e in entries.flatten() {
        let rel = dir.join(e.file_name());
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if created.contains(&rel) {
            if is_dir {
                keep_dirs.insert(rel);
            }
        } else if is_dir {
            fs::remove_dir_all(e.path()).map_err(io_err(format!("removing {}", e.path().display())))?;
        } else {
            fs::remove_file(e.path()).map_err(io_err(format!("removing {}", e.path().display())))?;
        }
    }
    for d in keep_dirs {
        remove_lower_children(root, &d, created)?;
    }
    Ok(())
}
