//! Test helpers: build layers, OCI layout archives and docker-save archives in memory, and check
//! what a test needs from the machine (root, runc) with the CI rule: under CI=true a missing
//! requirement fails the test; elsewhere the test is skipped with the reason printed.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

pub fn sha(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::from("sha256:");
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn hex(d: &str) -> &str {
    d.strip_prefix("sha256:").expect("sha256 digest")
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

/// A layer tar built entry by entry. Paths are written raw, so tests can build hostile entries.
#[derive(Default)]
pub struct Layer {
    b: Vec<u8>,
}

impl Layer {
    pub fn new() -> Self {
        Layer::default()
    }
    fn entry(&mut self, path: &str, kind: tar::EntryType, mode: u32, link: Option<&str>, data: &[u8]) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            name[..path.len()].copy_from_slice(path.as_bytes());
        }
        if let Some(l) = link {
            let ln = &mut h.as_old_mut().linkname;
            ln.fill(0);
            ln[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(data.len() as u64);
        h.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&h, data).expect("append");
        let mut bytes = builder.into_inner().expect("tar");
        bytes.truncate(bytes.len() - 1024); // drop the end-of-archive blocks until finish()
        self.b.extend_from_slice(&bytes);
        self
    }
    pub fn file(&mut self, path: &str, data: &str) -> &mut Self {
        self.entry(path, tar::EntryType::Regular, 0o644, None, data.as_bytes())
    }
    pub fn exec(&mut self, path: &str, data: &str) -> &mut Self {
        self.entry(path, tar::EntryType::Regular, 0o755, None, data.as_bytes())
    }
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, tar::EntryType::Directory, 0o755, None, b"")
    }
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, tar::EntryType::Symlink, 0o777, Some(target), b"")
    }
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, tar::EntryType::Link, 0o644, Some(target), b"")
    }
    pub fn finish(&self) -> Vec<u8> {
        let mut b = self.b.clone();
        b.extend_from_slice(&[0u8; 1024]);
        b
    }
}

pub fn config_json(entrypoint: &[&str], cmd: &[&str], env: &[&str], layers: &[Vec<u8>]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": env, "WorkingDir": "/srv",
                   "User": "0:0", "ExposedPorts": {"8080/tcp": {}}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("json")
}

/// An OCI image layout: blobs by digest, index.json naming the image. `tamper` may change a blob's
/// bytes after its digest was computed (a corrupted archive).
pub struct Oci {
    pub name: Option<String>,
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub gzip_layers: bool,
    pub tamper_layer: bool,
}

pub struct Built {
    pub manifest_digest: String,
}

fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data).expect("append");
}

pub fn write_oci(out: &Path, o: &Oci) -> Built {
    let mut b = tar::Builder::new(Vec::new());
    append(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    let mut layer_descs = Vec::new();
    for l in &o.layers {
        let blob = if o.gzip_layers { gzip(l) } else { l.clone() };
        let d = sha(&blob);
        let media = if o.gzip_layers { "application/vnd.oci.image.layer.v1.tar+gzip" } else { "application/vnd.oci.image.layer.v1.tar" };
        layer_descs.push(json!({"mediaType": media, "digest": d, "size": blob.len()}));
        let mut stored = blob.clone();
        if o.tamper_layer {
            let last = stored.len() - 1;
            stored[last] ^= 0xff;
        }
        append(&mut b, &format!("blobs/sha256/{}", hex(&d)), &stored);
    }
    let cd = sha(&o.config);
    append(&mut b, &format!("blobs/sha256/{}", hex(&cd)), &o.config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": o.config.len()},
        "layers": layer_descs,
    }))
    .expect("json");
    let md = sha(&manifest);
    append(&mut b, &format!("blobs/sha256/{}", hex(&md)), &manifest);
    let mut desc = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len()});
    if let Some(n) = &o.name {
        desc["annotations"] = json!({"io.containerd.image.name": n, "org.opencontainers.image.ref.name": "x"});
    }
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [desc]})).expect("json");
    append(&mut b, "index.json", &index);
    std::fs::write(out, b.into_inner().expect("tar")).expect("write archive");
    Built { manifest_digest: md }
}

/// A `docker save` archive (the classic layout: <id>/layer.tar, <config hex>.json, manifest.json).
pub fn write_docker(out: &Path, repo_tags: &[&str], config: &[u8], layers: &[Vec<u8>]) {
    let mut b = tar::Builder::new(Vec::new());
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("{:064x}/layer.tar", i + 1);
        append(&mut b, &name, l);
        names.push(name);
    }
    let config_name = format!("{}.json", hex(&sha(config)));
    append(&mut b, &config_name, config);
    let manifest = serde_json::to_vec(&json!([{"Config": config_name, "RepoTags": repo_tags, "Layers": names}])).expect("json");
    append(&mut b, "manifest.json", &manifest);
    std::fs::write(out, b.into_inner().expect("tar")).expect("write archive");
}

/// A fixture requirement: Ok(()) when met; Err(reason) otherwise. Under CI=true a missing one
/// panics (the test fails); elsewhere the caller skips.
pub fn require(what: &str, met: bool) -> bool {
    if met {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {what} is missing");
    }
    eprintln!("skipping: {what} is missing");
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn have(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root")
}

/// Builds skiff's echo image with scripts/build-image.sh (seconds when nothing changed).
pub fn echo_image() -> PathBuf {
    let out = repo_root().join("target/images/skiff-echo-1.0.oci.tar");
    let status = std::process::Command::new("bash")
        .arg(repo_root().join("scripts/build-image.sh"))
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running scripts/build-image.sh");
    assert!(status.success(), "scripts/build-image.sh failed");
    out
}

pub fn dir_entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}
