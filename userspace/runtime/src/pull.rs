//! Pulling images from OCI distribution registries into the [`ImageStore`].
//!
//! The HTTP side (the `/v2/` API, `WWW-Authenticate` challenges, Basic auth or a Bearer token from
//! the challenge's realm) is the `oci-client` crate's. What is ours: choosing the linux/amd64
//! manifest of an index, checking every digest and size ourselves as the bytes arrive (a registry
//! is outside input), and handing the verified blobs to the same store path an archive import
//! uses (`ImageStore::store_pending`), so a pulled image and an imported one are stored alike and
//! a failed pull stores nothing.
//!
//! Plain HTTP is used only for registries named insecure, as containerd's `insecure` hosts and
//! docker's `insecure-registries`: in [`PullOptions::insecure_registries`] or in the store's
//! `registries.json` (`{"insecure": ["127.0.0.1:5000"]}`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::Client;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
    OciDescriptor,
};
use oci_client::secrets::RegistryAuth;
use oci_spec::image::{ImageIndex, ImageManifest};
use serde::Deserialize;

use crate::ImageError;
use crate::digest::{self, HashingWriter};
use crate::images::{self, ImageStore, PendingBlob, PendingImage, StagingDir, io_err};
use crate::reference::{DEFAULT_DOMAIN, Reference};

/// The store's registry settings file, beside `images.json`.
pub const REGISTRIES_FILE: &str = "registries.json";

const MANIFEST_MEDIA_TYPES: &[&str] =
    &[OCI_IMAGE_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE];
const MAX_INDEX_DEPTH: usize = 4;
const MAX_LAYERS: usize = 512;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum RegistryCredentials {
    /// Sent as HTTP Basic to the registry, or to the token realm its challenge names.
    Basic { username: String, password: String },
    /// A registry token used as is (`Authorization: Bearer`).
    Bearer(String),
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryCredentials::Basic { username, .. } => write!(f, "Basic({username:?}, <redacted>)"),
            RegistryCredentials::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PullOptions {
    /// None: anonymous.
    pub auth: Option<RegistryCredentials>,
    /// `host[:port]` of registries spoken to over plain HTTP (added to the store's
    /// `registries.json`).
    pub insecure_registries: Vec<String>,
    /// The whole pull (manifest, config, every layer) must finish within this.
    pub timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions { auth: None, insecure_registries: Vec::new(), timeout: Duration::from_secs(600) }
    }
}

/// What `pull` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PulledImage {
    pub manifest_digest: String,
    pub config_digest: String,
    /// The normalized reference now pointing at the image.
    pub reference: String,
    /// False when the manifest was already stored (only the tag was updated, no blob fetched).
    pub fetched: bool,
}

/// The store's `registries.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistriesConfig {
    /// `host[:port]` of registries spoken to over plain HTTP.
    #[serde(default)]
    pub insecure: Vec<String>,
}

impl ImageStore {
    /// The store's registry settings (`<dir>/registries.json`; absent = none).
    pub fn registries_config(&self) -> Result<RegistriesConfig, ImageError> {
        let p = self.dir().join(REGISTRIES_FILE);
        if !p.exists() {
            return Ok(RegistriesConfig::default());
        }
        images::read_json(&p, &p.display().to_string())
    }

    /// Pulls `reference` (`127.0.0.1:5000/skiff/echo:1.0`, `repo@sha256:..`) from its registry:
    /// manifest (OCI or Docker v2 schema 2; an index or manifest list picks linux/amd64), config
    /// and layers, every digest and size checked, then stored as an import is and tagged. An
    /// image whose manifest is already stored is only tagged. On any error nothing is stored.
    /// Blocking (runs its own runtime on its own thread: callable from any thread).
    pub fn pull(&self, reference: &str, opts: &PullOptions) -> Result<PulledImage, ImageError> {
        let reference = Reference::parse(reference)?;
        let mut insecure = self.registries_config()?.insecure;
        insecure.extend(opts.insecure_registries.iter().cloned());
        let store = self.clone();
        let opts = opts.clone();
        let r = reference.clone();
        let worker = std::thread::Builder::new()
            .name("image-pull".into())
            .spawn(move || -> Result<PulledImage, ImageError> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(io_err("starting the pull's runtime"))?;
                rt.block_on(async {
                    match tokio::time::timeout(opts.timeout, pull_async(&store, &r, &opts, insecure)).await {
                        Ok(res) => res,
                        Err(_) => Err(ImageError::Registry(format!(
                            "pulling {r}: not done after {}s",
                            opts.timeout.as_secs()
                        ))),
                    }
                })
            })
            .map_err(io_err("starting the pull thread"))?;
        let pulled = worker.join().map_err(|_| ImageError::Registry(format!("pulling {reference}: the pull thread panicked")))??;
        tracing::info!(reference = %pulled.reference, digest = %pulled.manifest_digest, fetched = pulled.fetched, "pulled image");
        Ok(pulled)
    }
}

/// `docker.io` names the registry `registry-1.docker.io` serves; oci-client maps it itself.
fn registry_of(r: &Reference) -> &str {
    &r.domain
}

fn client_for(insecure: &[String]) -> Result<Client, ImageError> {
    // reqwest is built without a bundled provider: the workspace's rustls uses ring. Installing
    // fails only when one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ClientConfig {
        protocol: if insecure.is_empty() { ClientProtocol::Https } else { ClientProtocol::HttpsExcept(insecure.to_vec()) },
        // We choose among an index's manifests ourselves (pick_platform).
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    Ok(Client::new(config))
}

fn oci_ref(r: &Reference, digest: Option<&str>) -> oci_client::Reference {
    match (digest.or(r.digest.as_deref()), &r.tag) {
        (Some(d), _) => oci_client::Reference::with_digest(r.domain.clone(), r.path.clone(), d.to_string()),
        (None, Some(t)) => oci_client::Reference::with_tag(r.domain.clone(), r.path.clone(), t.clone()),
        (None, None) => oci_client::Reference::with_tag(r.domain.clone(), r.path.clone(), "latest".into()),
    }
}

/// A registry's error, in words a user can act on.
fn registry_error(what: &str, r: &Reference, e: OciDistributionError) -> ImageError {
    match e {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            ImageError::Unauthorized(format!("{what} of {r} from {}: {e}", registry_of(r)))
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope.errors.iter().map(|x| format!("{:?}: {}", x.code, x.message)).collect();
            let not_found = envelope.errors.iter().any(|x| {
                matches!(x.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::BlobUnknown)
            });
            let denied = envelope.errors.iter().any(|x| matches!(x.code, OciErrorCode::Unauthorized | OciErrorCode::Denied));
            let msg = format!("{what} of {r}: {}", codes.join("; "));
            if denied {
                ImageError::Unauthorized(msg)
            } else if not_found {
                ImageError::Registry(format!("{msg} (not found in the registry)"))
            } else {
                ImageError::Registry(msg)
            }
        }
        OciDistributionError::DigestError(d) => ImageError::Registry(format!("{what} of {r}: {d}")),
        OciDistributionError::RequestError(ref re) => {
            // reqwest's Display hides the cause (connection refused, TLS, ...): print the chain.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(re);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            // A TLS handshake answered by plain HTTP: the usual loopback registry mistake.
            let hint = if msg.contains("InvalidContentType") {
                " (the registry seems to speak plain HTTP: name it insecure, e.g. --insecure-registry, or in registries.json)"
            } else {
                ""
            };
            ImageError::Registry(format!("{what} of {r} from {}: {msg}{hint}", registry_of(r)))
        }
        other => ImageError::Registry(format!("{what} of {r}: {other}")),
    }
}

fn to_auth(c: &Option<RegistryCredentials>) -> RegistryAuth {
    match c {
        None => RegistryAuth::Anonymous,
        Some(RegistryCredentials::Basic { username, password }) => RegistryAuth::Basic(username.clone(), password.clone()),
        Some(RegistryCredentials::Bearer(t)) => RegistryAuth::Bearer(t.clone()),
    }
}

/// The fields that tell an index from a manifest, whatever mediaType says (it is optional).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Versioned {
    schema_version: Option<i64>,
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
}

async fn pull_async(
    store: &ImageStore,
    r: &Reference,
    opts: &PullOptions,
    insecure: Vec<String>,
) -> Result<PulledImage, ImageError> {
    let client = client_for(&insecure)?;
    let auth = to_auth(&opts.auth);
    let top = oci_ref(r, None);
    // The /v2/ challenge first: a failed token request is an error here, where later requests
    // would only see a 401.
    client.auth(&top, &auth, oci_client::RegistryOperation::Pull).await.map_err(|e| registry_error("authenticating for a pull", r, e))?;

    let staging = StagingDir::new(&store.dir().join("tmp"), "pull")?;
    let mut digest_wanted: Option<String> = r.digest.clone();
    let mut depth = 0;
    let (manifest_digest, manifest_bytes) = loop {
        let at = oci_ref(r, digest_wanted.as_deref());
        let (bytes, _) = client
            .pull_manifest_raw(&at, &auth, MANIFEST_MEDIA_TYPES)
            .await
            .map_err(|e| registry_error("fetching the manifest", r, e))?;
        if bytes.len() as u64 > images::MAX_JSON {
            return Err(ImageError::Malformed(format!("the manifest of {r} is larger than {} bytes", images::MAX_JSON)));
        }
        let actual = digest::of_bytes(&bytes);
        if let Some(want) = &digest_wanted
            && &actual != want
        {
            return Err(ImageError::DigestMismatch { what: format!("manifest of {r}"), expected: want.clone(), actual });
        }
        let v: Versioned =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::Malformed(format!("the manifest of {r}: {e}")))?;
        if v.schema_version != Some(2) {
            return Err(ImageError::Unsupported(format!("manifest of {r}: schemaVersion {:?} (only 2)", v.schema_version)));
        }
        if let Some(mt) = &v.media_type
            && !MANIFEST_MEDIA_TYPES.contains(&mt.as_str())
        {
            return Err(ImageError::Unsupported(format!("manifest of {r}: media type {mt}")));
        }
        if v.manifests.is_none() {
            break (actual, bytes);
        }
        depth += 1;
        if depth > MAX_INDEX_DEPTH {
            return Err(ImageError::Malformed(format!("{r}: image indexes nested too deep")));
        }
        let index: ImageIndex =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::Malformed(format!("the image index of {r}: {e}")))?;
        digest_wanted = Some(pick_platform(&index, r)?);
    };

    // Already stored (e.g. `Always` on an unchanged tag): only the tag moves.
    if let Some(config_digest) = store.tag_if_stored(&manifest_digest, r)? {
        return Ok(PulledImage { manifest_digest, config_digest, reference: r.to_string(), fetched: false });
    }

    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| ImageError::Malformed(format!("manifest {manifest_digest} of {r}: {e}")))?;
    if manifest.layers().len() > MAX_LAYERS {
        return Err(ImageError::Malformed(format!("manifest {manifest_digest} has more than {MAX_LAYERS} layers")));
    }
    let manifest_file = staging.path.join("manifest");
    fs::write(&manifest_file, &manifest_bytes).map_err(io_err("writing staging"))?;

    let at = oci_ref(r, Some(&manifest_digest));
    let config_desc = manifest.config();
    let config = fetch_blob(&client, &at, r, "config", config_desc.digest().as_ref(), config_desc.size(), &staging.path).await?;
    let (parsed_config, diff_ids) = images::parse_config(&config.file, &format!("config {}", config.digest))?;
    let mut layers = Vec::new();
    for (i, l) in manifest.layers().iter().enumerate() {
        layers.push(fetch_blob(&client, &at, r, &format!("layer {i}"), l.digest().as_ref(), l.size(), &staging.path).await?);
    }
    if diff_ids.len() != layers.len() {
        return Err(ImageError::Malformed(format!(
            "manifest {manifest_digest} has {} layers but its config lists {} diff_ids",
            layers.len(),
            diff_ids.len()
        )));
    }
    let pending = PendingImage {
        manifest_digest: manifest_digest.clone(),
        manifest_file,
        config: PendingBlob { digest: config.digest.clone(), file: config.file },
        layers,
        diff_ids,
        parsed_config,
        references: vec![r.clone()],
    };
    store.store_pending(std::slice::from_ref(&pending), &staging)?;
    Ok(PulledImage { manifest_digest, config_digest: config.digest, reference: r.to_string(), fetched: true })
}

/// The linux/amd64 entry of an index (any variant), or its only entry.
fn pick_platform(index: &ImageIndex, r: &Reference) -> Result<String, ImageError> {
    let manifests = index.manifests();
    let chosen = manifests
        .iter()
        .find(|m| {
            m.platform()
                .as_ref()
                .is_some_and(|p| p.os().to_string() == "linux" && p.architecture().to_string() == "amd64")
        })
        .or(if manifests.len() == 1 { manifests.first() } else { None })
        .ok_or_else(|| ImageError::Unsupported(format!("{r}: the image index has no linux/amd64 manifest")))?;
    let d = chosen.digest().to_string();
    digest::validate(&d)?;
    Ok(d)
}

/// Downloads one blob into `dir`, hashing and counting as it is written: more bytes than the
/// descriptor's size, or another digest, is an error (and the partial file goes with staging).
async fn fetch_blob(
    client: &Client,
    at: &oci_client::Reference,
    r: &Reference,
    what: &str,
    expected: &str,
    size: u64,
    dir: &Path,
) -> Result<PendingBlob, ImageError> {
    let hex = digest::validate(expected)?;
    let file = dir.join(format!("blob-{hex}"));
    let out = File::create(&file).map_err(io_err("writing staging"))?;
    let mut w = BoundedWriter { inner: HashingWriter::new(out), left: size };
    let desc = OciDescriptor { digest: expected.to_string(), size: size.min(i64::MAX as u64) as i64, ..Default::default() };
    if let Err(e) = client.pull_blob(at, &desc, &mut w).await {
        if let OciDistributionError::DigestError(_) = e {
            // Ours below says the same with the digest we computed; the library's check ran first.
            let (actual, _, _) = w.inner.finish();
            return Err(ImageError::DigestMismatch { what: format!("{what} of {r}"), expected: expected.to_string(), actual });
        }
        if let OciDistributionError::IoError(ioe) = &e
            && ioe.kind() == io::ErrorKind::FileTooLarge
        {
            return Err(ImageError::Malformed(format!("{what} {expected} of {r}: the registry sent more than its {size} bytes")));
        }
        return Err(registry_error(&format!("fetching {what} ({expected})"), r, e));
    }
    let (actual, n, f) = w.inner.finish();
    f.sync_all().map_err(io_err("writing staging"))?;
    if actual != expected {
        return Err(ImageError::DigestMismatch { what: format!("{what} of {r}"), expected: expected.to_string(), actual });
    }
    if n != size {
        return Err(ImageError::Malformed(format!("{what} {expected} of {r} has {n} bytes, its descriptor says {size}")));
    }
    Ok(PendingBlob { digest: actual, file })
}

/// A synchronous writer as a tokio AsyncWrite (the pull's runtime is its own thread, so a file
/// write blocking it blocks nothing else), refusing bytes past the descriptor's size.
struct BoundedWriter {
    inner: HashingWriter<File>,
    left: u64,
}

impl tokio::io::AsyncWrite for BoundedWriter {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::FileTooLarge, "more bytes than the descriptor's size")));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Poll::Ready(Ok(n))
    }
    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.flush())
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.flush())
    }
}

/// A `kubernetes.io/dockerconfigjson` Secret's `.dockerconfigjson` (or a `~/.docker/config.json`):
/// the credentials for `reference`'s registry, matched as kubelet does: by host (docker.io's
/// aliases included), and when the key has a path, by repository prefix; the longest key wins.
pub fn credentials_from_docker_config(json: &[u8], reference: &str) -> Result<Option<RegistryCredentials>, ImageError> {
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        username: Option<String>,
        password: Option<String>,
        auth: Option<String>,
        registrytoken: Option<String>,
    }
    let r = Reference::parse(reference)?;
    let cfg: DockerConfig =
        serde_json::from_slice(json).map_err(|e| ImageError::Malformed(format!("docker config json: {e}")))?;
    let canon_host = |h: &str| -> String {
        match h {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DEFAULT_DOMAIN.into(),
            _ => h.to_string(),
        }
    };
    let mut best: Option<(usize, &Entry)> = None;
    for (key, entry) in &cfg.auths {
        let k = key.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
        let (host, path) = k.split_once('/').unwrap_or((k, ""));
        // docker's own key for Docker Hub is https://index.docker.io/v1/: a version, not a path.
        let path = if path == "v1" || path == "v2" { "" } else { path };
        if canon_host(host) != r.domain {
            continue;
        }
        if !(path.is_empty() || r.path == path || r.path.starts_with(&format!("{path}/"))) {
            continue;
        }
        if best.is_none_or(|(len, _)| k.len() > len) {
            best = Some((k.len(), entry));
        }
    }
    let Some((_, e)) = best else { return Ok(None) };
    if let Some(t) = e.registrytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(RegistryCredentials::Bearer(t.clone())));
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password)
        && !u.is_empty()
    {
        return Ok(Some(RegistryCredentials::Basic { username: u.clone(), password: p.clone() }));
    }
    if let Some(a) = &e.auth {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|e| ImageError::Malformed(format!("docker config json: auth is not base64: {e}")))?;
        let s = String::from_utf8(raw).map_err(|_| ImageError::Malformed("docker config json: auth is not UTF-8".into()))?;
        let (u, p) = s
            .split_once(':')
            .ok_or_else(|| ImageError::Malformed("docker config json: auth is not base64(user:password)".into()))?;
        return Ok(Some(RegistryCredentials::Basic { username: u.to_string(), password: p.to_string() }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials_match_host_and_path() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},
            "127.0.0.1:5000":{"username":"u","password":"p"},
            "127.0.0.1:5000/team":{"username":"team","password":"tp"},
            "reg.example":{"registrytoken":"tok"}}}"#;
        let basic = |u: &str, p: &str| Some(RegistryCredentials::Basic { username: u.into(), password: p.into() });
        assert_eq!(credentials_from_docker_config(json, "busybox").expect("hub"), basic("hub", "secret"));
        assert_eq!(credentials_from_docker_config(json, "127.0.0.1:5000/skiff/echo:1.0").expect("host"), basic("u", "p"));
        assert_eq!(credentials_from_docker_config(json, "127.0.0.1:5000/team/app:1").expect("path"), basic("team", "tp"));
        assert_eq!(credentials_from_docker_config(json, "127.0.0.1:5000/teamx/app:1").expect("not a prefix"), basic("u", "p"));
        assert_eq!(
            credentials_from_docker_config(json, "reg.example/a:1").expect("token"),
            Some(RegistryCredentials::Bearer("tok".into()))
        );
        assert_eq!(credentials_from_docker_config(json, "other.example/a:1").expect("none"), None);
        assert!(credentials_from_docker_config(b"{", "busybox").is_err());
        assert!(credentials_from_docker_config(br#"{"auths":{"docker.io":{"auth":"%%%"}}}"#, "busybox").is_err());
    }

    #[test]
    fn credentials_debug_hides_secrets() {
        let c = RegistryCredentials::Basic { username: "u".into(), password: "hunter2".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", RegistryCredentials::Bearer("tok".into())).contains("tok"));
    }
}
