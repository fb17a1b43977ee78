//! Pulling from a real registry: Debian's docker-registry (the distribution registry v2) on
//! loopback, started here with a config of ours (storage in a temp dir, a free port, optionally
//! htpasswd auth), the echo image pushed into it by skopeo. Under CI=true a missing
//! docker-registry, skopeo or root fails the tests; elsewhere they are skipped with the reason.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use skiff_runtime::{ImageError, ImageStore, PullOptions, RegistryCredentials};

const REGISTRY: &str = "/usr/bin/docker-registry";

fn requirements() -> bool {
    require("root (unpacking keeps file ownership)", is_root())
        && require("docker-registry (apt-get install docker-registry)", Path::new(REGISTRY).exists())
        && require("skopeo", have("skopeo"))
        && require("busybox-static (/bin/busybox)", Path::new("/bin/busybox").exists())
}

/// A registry on 127.0.0.1:<free port>, stopped (by its PID, through Child) on drop.
struct Registry {
    child: Child,
    host: String,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("tmp");
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).expect("storage");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let host = format!("127.0.0.1:{port}");
        let auth_yaml = match auth {
            Some((user, password)) => {
                // The registry reads bcrypt only; $2y$ is htpasswd's own prefix.
                let hash = bcrypt::hash_with_result(password, 4).expect("bcrypt").format_for_version(bcrypt::Version::TwoY);
                let file = dir.path().join("htpasswd");
                fs::write(&file, format!("{user}:{hash}\n")).expect("htpasswd");
                format!("auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n", file.display())
            }
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{auth_yaml}",
                storage.display()
            ),
        )
        .expect("config");
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let reg = Registry { child, host, storage, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(&reg.host).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen on {} within 15s", reg.host);
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    /// skopeo copy of an OCI archive into `<host>/<repo>`; `format` v2s2 converts to Docker's
    /// schema 2 media types.
    fn push(&self, archive: &Path, repo: &str, creds: Option<(&str, &str)>, format: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some((u, p)) = creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        if let Some(f) = format {
            cmd.arg(format!("--format={f}"));
        }
        let out = cmd
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{}/{repo}", self.host))
            .output()
            .expect("skopeo");
        assert!(out.status.success(), "skopeo copy to {repo}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn blob_data(&self, digest: &str) -> PathBuf {
        let h = hex(digest);
        self.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{h}/data", &h[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn insecure(reg: &Registry) -> PullOptions {
    PullOptions { insecure_registries: vec![reg.host.clone()], timeout: Duration::from_secs(120), ..Default::default() }
}

fn assert_store_empty(store: &ImageStore) {
    assert!(store.list().expect("list").is_empty(), "no image recorded");
    assert!(dir_entries(&store.dir().join("blobs/sha256")).is_empty(), "no blob stored");
    assert!(dir_entries(&store.dir().join("rootfs")).is_empty(), "no rootfs stored");
    assert!(dir_entries(&store.dir().join("tmp")).is_empty(), "staging cleaned up");
}

/// Every path under `root` with its type, mode, owner and content (or link target).
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).expect("read_dir").flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("inside").display().to_string();
            let m = fs::symlink_metadata(&p).expect("meta");
            let what = if m.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&p).expect("link").display())
            } else if m.is_dir() {
                walk(root, &p, out);
                "dir".to_string()
            } else {
                let mut bytes = Vec::new();
                fs::File::open(&p).expect("open").read_to_end(&mut bytes).expect("read");
                format!("file {}", sha(&bytes))
            };
            out.insert(rel, format!("{what} mode {:o} uid {} gid {}", m.mode(), m.uid(), m.gid()));
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn pull_equals_import_and_reuses_stored_images() {
    if !requirements() {
        return;
    }
    let archive = echo_image();
    let reg = Registry::start(None);
    reg.push(&archive, "skiff/echo:1.0", None, None);

    let tmp = tempfile::tempdir().expect("tmp");
    let imported_store = ImageStore::open(tmp.path().join("imported")).expect("open");
    let imported = imported_store.import(&archive).expect("import");
    let pulled_store = ImageStore::open(tmp.path().join("pulled")).expect("open");
    let reference = format!("{}/skiff/echo:1.0", reg.host);

    // Without the registry named insecure, the client speaks HTTPS to a plain HTTP server.
    let err = pulled_store.pull(&reference, &PullOptions::default()).expect_err("https to a plain registry");
    assert!(matches!(err, ImageError::Registry(_)), "{err}");
    assert_store_empty(&pulled_store);

    let pulled = pulled_store.pull(&reference, &insecure(&reg)).expect("pull");
    assert!(pulled.fetched);
    assert_eq!(pulled.reference, reference);
    assert_eq!(pulled.manifest_digest, imported[0].manifest_digest, "skopeo pushed the manifest as is");
    assert_eq!(pulled_store.resolve_digest(&reference).expect("tagged"), pulled.manifest_digest);
    let cfg = pulled_store.config(&reference).expect("config");
    assert_eq!(cfg, imported_store.config("skiff/echo:1.0").expect("config"));
    assert_eq!(cfg.entrypoint, vec!["/usr/local/bin/skiff-echo"]);
    let a = tree(&pulled_store.rootfs(&reference).expect("rootfs"));
    let b = tree(&imported_store.rootfs("skiff/echo:1.0").expect("rootfs"));
    assert!(a.contains_key("usr/local/bin/skiff-echo"), "the echo binary is in the pulled rootfs");
    assert_eq!(a, b, "pulled and imported root filesystems are the same");
    let (pl, il) = (pulled_store.list().expect("list"), imported_store.list().expect("list"));
    assert_eq!((pl[0].size, &pl[0].config_digest), (il[0].size, &il[0].config_digest));
    assert_eq!(dir_entries(&pulled_store.dir().join("blobs/sha256")), dir_entries(&imported_store.dir().join("blobs/sha256")));

    // Again: the manifest is stored, nothing is fetched; another tag on it is only a tag.
    reg.push(&archive, "skiff/echo:again", None, None);
    let again = pulled_store.pull(&format!("{}/skiff/echo:again", reg.host), &insecure(&reg)).expect("pull again");
    assert!(!again.fetched, "the same manifest is not fetched twice");
    assert_eq!(again.manifest_digest, pulled.manifest_digest);
    // By digest, and through registries.json instead of the option.
    fs::write(pulled_store.dir().join("registries.json"), format!("{{\"insecure\": [\"{}\"]}}", reg.host)).expect("registries.json");
    let by_digest = format!("{}/skiff/echo@{}", reg.host, pulled.manifest_digest);
    let fresh = ImageStore::open(tmp.path().join("fresh")).expect("open");
    fs::copy(pulled_store.dir().join("registries.json"), fresh.dir().join("registries.json")).expect("copy");
    let d = fresh.pull(&by_digest, &PullOptions::default()).expect("pull by digest with registries.json");
    assert!(d.fetched);
    assert_eq!(d.manifest_digest, pulled.manifest_digest);
    assert_eq!(fresh.resolve_digest(&by_digest).expect("resolves"), pulled.manifest_digest);
    fs::write(fresh.dir().join("registries.json"), "{\"insecure\": 5}").expect("bad registries.json");
    let err = fresh.pull(&by_digest, &PullOptions::default()).expect_err("bad registries.json");
    assert!(err.to_string().contains("registries.json"), "{err}");
}

#[test]
fn docker_schema2_and_index_pick_linux_amd64() {
    if !requirements() {
        return;
    }
    let archive = echo_image();
    let reg = Registry::start(None);
    let tmp = tempfile::tempdir().expect("tmp");
    let imported_store = ImageStore::open(tmp.path().join("imported")).expect("open");
    let imported = imported_store.import(&archive).expect("import");
    let echo_root = tree(&imported_store.rootfs("skiff/echo:1.0").expect("rootfs"));

    // Docker v2 schema 2 (skopeo converts the media types, so the manifest digest differs; the
    // config and layers are the same bytes).
    reg.push(&archive, "skiff/echo:v2s2", None, Some("v2s2"));
    let store = ImageStore::open(tmp.path().join("v2s2")).expect("open");
    let r = format!("{}/skiff/echo:v2s2", reg.host);
    let pulled = store.pull(&r, &insecure(&reg)).expect("pull v2s2");
    let manifest = fs::read_to_string(store.dir().join("blobs/sha256").join(hex(&pulled.manifest_digest))).expect("manifest");
    assert!(manifest.contains("application/vnd.docker.distribution.manifest.v2+json"), "{manifest}");
    assert_eq!(pulled.config_digest, imported_store.list().expect("list")[0].config_digest);
    assert_eq!(tree(&store.rootfs(&r).expect("rootfs")), echo_root);

    // An OCI index: an arm64 image first, the echo image as linux/amd64 second.
    let other_archive = tmp.path().join("other.oci.tar");
    let layers = vec![Layer::new().dir("etc").file("etc/arch", "arm64").finish()];
    let other = write_oci(
        &other_archive,
        &Oci { name: None, config: config_json(&["/x"], &[], &[], &layers), layers, gzip_layers: true, tamper_layer: false },
    );
    reg.push(&other_archive, "skiff/echo:arm64", None, None);
    reg.push(&archive, "skiff/echo:1.0", None, None);
    let size = |d: &str| fs::metadata(reg.blob_data(d)).expect("manifest blob in the registry").len();
    let echo_digest = &imported[0].manifest_digest;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other.manifest_digest,
             "size": size(&other.manifest_digest), "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": echo_digest,
             "size": size(echo_digest), "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    });
    push_manifest(&reg, "skiff/echo", "multi", serde_json::to_vec(&index).expect("json"), "application/vnd.oci.image.index.v1+json");
    let store = ImageStore::open(tmp.path().join("index")).expect("open");
    let r = format!("{}/skiff/echo:multi", reg.host);
    let pulled = store.pull(&r, &insecure(&reg)).expect("pull index");
    assert_eq!(&pulled.manifest_digest, echo_digest, "the linux/amd64 manifest was chosen");
    assert_eq!(store.resolve_digest(&r).expect("tag"), *echo_digest);
    assert_eq!(tree(&store.rootfs(&r).expect("rootfs")), echo_root);

    // An index without linux/amd64: a clear error, nothing stored.
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other.manifest_digest,
             "size": size(&other.manifest_digest), "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other.manifest_digest,
             "size": size(&other.manifest_digest), "platform": {"os": "linux", "architecture": "s390x"}}]
    });
    push_manifest(&reg, "skiff/echo", "noamd64", serde_json::to_vec(&index).expect("json"), "application/vnd.oci.image.index.v1+json");
    let store = ImageStore::open(tmp.path().join("noamd64")).expect("open");
    let err = store.pull(&format!("{}/skiff/echo:noamd64", reg.host), &insecure(&reg)).expect_err("no amd64");
    assert!(matches!(err, ImageError::Unsupported(_)) && err.to_string().contains("linux/amd64"), "{err}");
    assert_store_empty(&store);
}

/// PUT a manifest (the registry API, through oci-client as a plain HTTP client).
fn push_manifest(reg: &Registry, repo: &str, tag: &str, body: Vec<u8>, media_type: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let r = oci_client::Reference::with_tag(reg.host.clone(), repo.into(), tag.into());
    rt.block_on(async {
        client.store_auth_if_needed(&reg.host, &oci_client::secrets::RegistryAuth::Anonymous).await;
        client.push_manifest_raw(&r, body, media_type.parse().expect("header")).await
    })
    .expect("push manifest");
}

#[test]
fn missing_tag_and_corrupt_blob_store_nothing() {
    if !requirements() {
        return;
    }
    let archive = echo_image();
    let reg = Registry::start(None);
    reg.push(&archive, "skiff/echo:1.0", None, None);
    let tmp = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(tmp.path().join("store")).expect("open");

    let err = store.pull(&format!("{}/skiff/echo:nope", reg.host), &insecure(&reg)).expect_err("missing tag");
    assert!(matches!(err, ImageError::Registry(_)) && err.to_string().contains("not found"), "{err}");
    let err = store.pull(&format!("{}/skiff/nothing:1.0", reg.host), &insecure(&reg)).expect_err("missing repo");
    assert!(err.to_string().contains("not found"), "{err}");
    assert_store_empty(&store);

    // Flip a byte of the largest layer in the registry's storage (size unchanged).
    let imported = ImageStore::open(tmp.path().join("imported")).expect("open");
    let digest = imported.import(&archive).expect("import")[0].manifest_digest.clone();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(imported.dir().join("blobs/sha256").join(hex(&digest))).expect("manifest")).expect("json");
    let layer = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .max_by_key(|l| l["size"].as_u64())
        .and_then(|l| l["digest"].as_str())
        .expect("a layer")
        .to_string();
    let data = reg.blob_data(&layer);
    let mut bytes = fs::read(&data).expect("layer in the registry");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&data, &bytes).expect("corrupt");
    let err = store.pull(&format!("{}/skiff/echo:1.0", reg.host), &insecure(&reg)).expect_err("corrupt layer");
    match &err {
        ImageError::DigestMismatch { expected, actual, .. } => {
            assert_eq!(expected, &layer);
            assert_eq!(actual, &sha(&bytes), "the digest of what the registry sent");
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert_store_empty(&store);
}

#[test]
fn htpasswd_registry_needs_the_right_credentials() {
    if !requirements() {
        return;
    }
    let archive = echo_image();
    let reg = Registry::start(Some(("skiff", "s3cret")));
    reg.push(&archive, "skiff/echo:1.0", Some(("skiff", "s3cret")), None);
    let tmp = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(tmp.path().join("store")).expect("open");
    let r = format!("{}/skiff/echo:1.0", reg.host);

    let err = store.pull(&r, &insecure(&reg)).expect_err("anonymous");
    assert!(matches!(err, ImageError::Unauthorized(_)), "{err}");
    let wrong = PullOptions {
        auth: Some(RegistryCredentials::Basic { username: "skiff".into(), password: "wrong".into() }),
        ..insecure(&reg)
    };
    let err = store.pull(&r, &wrong).expect_err("wrong password");
    assert!(matches!(err, ImageError::Unauthorized(_)), "{err}");
    assert!(!err.to_string().contains("wrong"), "the password is not in the error: {err}");
    assert_store_empty(&store);

    let right = PullOptions {
        auth: Some(RegistryCredentials::Basic { username: "skiff".into(), password: "s3cret".into() }),
        ..insecure(&reg)
    };
    let pulled = store.pull(&r, &right).expect("pull with credentials");
    assert!(pulled.fetched);
    assert!(store.rootfs(&r).expect("rootfs").join("usr/local/bin/skiff-echo").is_file());

    // The same credentials from a dockerconfigjson Secret's payload.
    let json = format!(r#"{{"auths":{{"{}":{{"auth":"c2tpZmY6czNjcmV0"}}}}}}"#, reg.host);
    let creds = skiff_runtime::pull::credentials_from_docker_config(json.as_bytes(), &r).expect("parse");
    let store2 = ImageStore::open(tmp.path().join("store2")).expect("open");
    store2.pull(&r, &PullOptions { auth: creds, ..insecure(&reg) }).expect("pull with dockerconfigjson credentials");
}
