//! Encryption at rest for values under a key prefix (Secrets), as Kubernetes'
//! `EncryptionConfiguration` `aesgcm` provider does it.
//!
//! [`EncryptedStore`] wraps any [`Store`]: a value written under its prefix is stored as
//! `k8s:enc:aesgcm:v1:<keyname>:` + 12-byte nonce + AES-256-GCM ciphertext (tag included), with
//! the storage key as additional authenticated data, so a ciphertext copied to another key does
//! not decrypt. Reads, lists and watches hand back the plaintext. Values stored before encryption
//! was turned on (plaintext) are still read as they are.
//!
//! Keys live in a [`KeySet`] file in the server's data directory ([`KEY_FILE`], mode 0600, made on
//! first start). The first key writes; every key in the file decrypts. Rotation:
//! [`KeySet::rotate_file`] puts a new key first and keeps the old ones, and
//! [`EncryptedStore::rewrite_stale`] (run by [`encrypt_secrets`] at every start) rewrites each
//! value that is plaintext or under an older key with the write key. After that the old keys may
//! be removed from the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt as _;

use crate::{KeyValue, ListResult, Result, Revision, Store, StoreError, WatchEvent, WatchStream};

/// The key file's name in the data directory.
pub const KEY_FILE: &str = "encryption-keys.json";

/// Where the apiserver keeps Secrets (`/registry/<group|core>/<plural>/`).
pub const SECRETS_PREFIX: &str = "/registry/core/secrets/";

/// What every encrypted value starts with (Kubernetes' aesgcm provider, version 1).
pub const ENVELOPE_PREFIX: &[u8] = b"k8s:enc:aesgcm:v1:";

/// Any Kubernetes-style envelope; one of another provider is refused, not taken for plaintext.
const ANY_ENVELOPE_PREFIX: &[u8] = b"k8s:enc:";

const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("encryption key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encryption key file {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl From<KeyFileError> for StoreError {
    fn from(error: KeyFileError) -> StoreError {
        StoreError::Backend(error.to_string())
    }
}

/// The file's contents: `{"keys": [{"name": "key1", "secret": "<base64 of 32 bytes>"}, ...]}`,
/// the write key first.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFileDoc {
    keys: Vec<KeyFileEntry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFileEntry {
    name: String,
    secret: String,
}

struct NamedKey {
    name: String,
    cipher: Aes256Gcm,
}

/// The keys values are encrypted with: the first writes, all of them decrypt.
pub struct KeySet {
    keys: Vec<NamedKey>,
}

impl std::fmt::Debug for KeySet {
    // Names only: the key material never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("keys", &self.key_names())
            .finish()
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> KeyFileError {
    KeyFileError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn new_secret() -> String {
    BASE64.encode(Aes256Gcm::generate_key(OsRng))
}

/// Writes `doc` to `path` atomically (a 0600 temporary file renamed over it), so a crash leaves
/// either the old file or the new one, never half a key.
fn write_doc(path: &Path, doc: &KeyFileDoc) -> Result<(), KeyFileError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let text = serde_json::to_vec_pretty(doc).map_err(|e| invalid(path, e.to_string()))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn read_doc(path: &Path) -> Result<KeyFileDoc, KeyFileError> {
    let text = std::fs::read(path).map_err(io_error(path))?;
    serde_json::from_slice(&text).map_err(|e| invalid(path, format!("not the expected JSON: {e}")))
}

impl KeySet {
    /// Loads the key file at `path`, making it with one fresh key (mode 0600) when it is absent.
    pub fn load_or_create(path: &Path) -> Result<KeySet, KeyFileError> {
        if !path.exists() {
            let doc = KeyFileDoc {
                keys: vec![KeyFileEntry {
                    name: "key1".into(),
                    secret: new_secret(),
                }],
            };
            write_doc(path, &doc)?;
            tracing::info!(path = %path.display(), "made a new encryption key for Secrets");
        }
        Self::load(path)
    }

    /// Loads the key file at `path`.
    pub fn load(path: &Path) -> Result<KeySet, KeyFileError> {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)
            .map_err(io_error(path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the encryption key file is readable by others than its owner; chmod 600 it");
        }
        Self::from_doc(path, read_doc(path)?)
    }

    fn from_doc(path: &Path, doc: KeyFileDoc) -> Result<KeySet, KeyFileError> {
        if doc.keys.is_empty() {
            return Err(invalid(path, "it holds no key"));
        }
        let mut keys: Vec<NamedKey> = Vec::with_capacity(doc.keys.len());
        for entry in doc.keys {
            // The name ends at the first ':' of the envelope, so it may not hold one.
            if entry.name.is_empty()
                || entry.name.len() > 64
                || !entry
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                return Err(invalid(
                    path,
                    format!(
                        "key name {:?} must be 1-64 of [A-Za-z0-9._-]",
                        entry.name
                    ),
                ));
            }
            if keys.iter().any(|k| k.name == entry.name) {
                return Err(invalid(path, format!("key name {:?} appears twice", entry.name)));
            }
            let bytes = BASE64.decode(entry.secret.trim()).map_err(|e| {
                invalid(path, format!("key {:?} is not base64: {e}", entry.name))
            })?;
            if bytes.len() != KEY_LEN {
                return Err(invalid(
                    path,
                    format!(
                        "key {:?} is {} bytes; AES-256-GCM needs {KEY_LEN}",
                        entry.name,
                        bytes.len()
                    ),
                ));
            }
            keys.push(NamedKey {
                name: entry.name,
                cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)),
            });
        }
        Ok(KeySet { keys })
    }

    /// Puts a new key first in the file at `path` (it becomes the write key; the others still
    /// decrypt) and returns its name. Servers pick it up when they start.
    pub fn rotate_file(path: &Path) -> Result<String, KeyFileError> {
        let mut doc = read_doc(path)?;
        // Validate what is there before adding to it.
        let current = Self::from_doc(path, read_doc(path)?)?;
        let next = current
            .keys
            .iter()
            .filter_map(|k| k.name.strip_prefix("key")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let name = format!("key{next}");
        doc.keys.insert(
            0,
            KeyFileEntry {
                name: name.clone(),
                secret: new_secret(),
            },
        );
        write_doc(path, &doc)?;
        Ok(name)
    }

    /// The name of the key new values are encrypted with.
    pub fn write_key_name(&self) -> &str {
        &self.keys[0].name
    }

    pub fn key_names(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.name.as_str()).collect()
    }

    /// `plaintext` encrypted with the write key, bound to `storage_key`.
    pub fn encrypt(&self, storage_key: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
        let key = &self.keys[0];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: storage_key.as_bytes(),
                },
            )
            .map_err(|_| StoreError::Backend(format!("encrypting {storage_key} failed")))?;
        let mut out =
            Vec::with_capacity(ENVELOPE_PREFIX.len() + key.name.len() + 1 + NONCE_LEN + sealed.len());
        out.extend_from_slice(ENVELOPE_PREFIX);
        out.extend_from_slice(key.name.as_bytes());
        out.push(b':');
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plaintext of a stored value: decrypted when it is in an envelope, as it is otherwise
    /// (written before encryption was on). A value no key here decrypts is an error naming the
    /// key and the reason, never garbage.
    pub fn decrypt(&self, storage_key: &str, stored: &[u8]) -> Result<Vec<u8>> {
        let Some(rest) = stored.strip_prefix(ENVELOPE_PREFIX) else {
            if stored.starts_with(ANY_ENVELOPE_PREFIX) {
                let provider: String = String::from_utf8_lossy(&stored[..stored.len().min(40)])
                    .chars()
                    .take_while(|c| !c.is_control())
                    .collect();
                return Err(StoreError::Backend(format!(
                    "{storage_key} is encrypted by a provider skiff does not have ({provider}...)"
                )));
            }
            return Ok(stored.to_vec());
        };
        let corrupt = |why: &str| {
            StoreError::Backend(format!(
                "{storage_key}: the encrypted value is corrupt ({why})"
            ))
        };
        let colon = rest
            .iter()
            .take(65)
            .position(|&b| b == b':')
            .ok_or_else(|| corrupt("no key name"))?;
        let name = std::str::from_utf8(&rest[..colon]).map_err(|_| corrupt("key name"))?;
        let body = &rest[colon + 1..];
        if body.len() < NONCE_LEN + 16 {
            return Err(corrupt("shorter than a nonce and a tag"));
        }
        let key = self.keys.iter().find(|k| k.name == name).ok_or_else(|| {
            StoreError::Backend(format!(
                "{storage_key} is encrypted with key {name:?}, which is not in the key file \
                 (it has {:?}); put that key back to read it",
                self.key_names()
            ))
        })?;
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        key.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: storage_key.as_bytes(),
                },
            )
            .map_err(|_| {
                StoreError::Backend(format!(
                    "{storage_key}: decrypting with key {name:?} failed: the key file's key of \
                     that name is not the one it was written with, or the value was tampered with"
                ))
            })
    }

    /// Whether `stored` is already encrypted with the write key.
    pub fn is_current(&self, stored: &[u8]) -> bool {
        stored
            .strip_prefix(ENVELOPE_PREFIX)
            .and_then(|rest| rest.strip_prefix(self.keys[0].name.as_bytes()))
            .is_some_and(|rest| rest.first() == Some(&b':'))
    }
}

/// A [`Store`] that encrypts the values of keys under `prefix` (see the module docs); everything
/// else passes through unchanged.
pub struct EncryptedStore<S: Store + ?Sized> {
    inner: Arc<S>,
    prefix: String,
    keys: Arc<KeySet>,
}

impl<S: Store + ?Sized> EncryptedStore<S> {
    pub fn new(inner: Arc<S>, prefix: impl Into<String>, keys: KeySet) -> Self {
        EncryptedStore {
            inner,
            prefix: prefix.into(),
            keys: Arc::new(keys),
        }
    }

    /// The wrapped store (its values are what is on disk).
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    fn covers(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
    }

    fn seal(&self, key: &str, value: Vec<u8>) -> Result<Vec<u8>> {
        if self.covers(key) {
            self.keys.encrypt(key, &value)
        } else {
            Ok(value)
        }
    }

    fn open_kv(keys: &KeySet, prefix: &str, mut kv: KeyValue) -> Result<KeyValue> {
        if kv.key.starts_with(prefix) {
            kv.value = keys.decrypt(&kv.key, &kv.value)?;
        }
        Ok(kv)
    }

    /// Rewrites every value under the prefix that is plaintext or encrypted with an older key,
    /// with the write key (compare-and-swap on its revision, so a concurrent write wins), and
    /// checks that the others decrypt. A value no key decrypts is left as it is and reported, as
    /// Kubernetes does: reading it fails, the rest of the store works.
    pub async fn rewrite_stale(&self) -> Result<Rewrite> {
        let listed = self.inner.list(&self.prefix).await?;
        let mut report = Rewrite::default();
        for item in listed.items {
            let mut current = item;
            // A few rounds: a writer that races us has written with the write key anyway.
            for _ in 0..5 {
                let plaintext = match self.keys.decrypt(&current.key, &current.value) {
                    Ok(plaintext) => plaintext,
                    Err(error) => {
                        report.unreadable.push(error.to_string());
                        break;
                    }
                };
                if self.keys.is_current(&current.value) {
                    break;
                }
                let sealed = self.keys.encrypt(&current.key, &plaintext)?;
                match self
                    .inner
                    .update(&current.key, sealed, current.mod_revision)
                    .await
                {
                    Ok(_) => {
                        report.rewritten += 1;
                        break;
                    }
                    Err(StoreError::NotFound(_)) => break,
                    Err(StoreError::Conflict { .. }) => match self.inner.get(&current.key).await? {
                        Some(kv) => current = kv,
                        None => break,
                    },
                    Err(other) => return Err(other),
                }
            }
        }
        Ok(report)
    }
}

/// What [`EncryptedStore::rewrite_stale`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// Values rewritten with the write key.
    pub rewritten: usize,
    /// Why each value that no key decrypts could not be read.
    pub unreadable: Vec<String>,
}

#[async_trait::async_trait]
impl<S: Store + ?Sized> Store for EncryptedStore<S> {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        match self.inner.get(key).await? {
            Some(kv) => Ok(Some(Self::open_kv(&self.keys, &self.prefix, kv)?)),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str) -> Result<ListResult> {
        let listed = self.inner.list(prefix).await?;
        let items = listed
            .items
            .into_iter()
            .map(|kv| Self::open_kv(&self.keys, &self.prefix, kv))
            .collect::<Result<Vec<_>>>()?;
        Ok(ListResult {
            items,
            revision: listed.revision,
        })
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let value = self.seal(key, value)?;
        self.inner.create(key, value).await
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision> {
        let value = self.seal(key, value)?;
        self.inner.update(key, value, expected).await
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let (revision, prev) = self.inner.delete(key, expected).await?;
        let prev = Self::open_kv(&self.keys, &self.prefix, prev).map_err(|error| {
            StoreError::Backend(format!("{key} was deleted, but its last value: {error}"))
        })?;
        Ok((revision, prev))
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.inner.current_revision().await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let stream = self.inner.watch(prefix, after).await?;
        let keys = self.keys.clone();
        let covered = self.prefix.clone();
        let open = move |event: WatchEvent| -> Result<WatchEvent> {
            Ok(match event {
                WatchEvent::Put { kv, prev } => WatchEvent::Put {
                    kv: Self::open_kv(&keys, &covered, kv)?,
                    prev: prev.map(|p| Self::open_kv(&keys, &covered, p)).transpose()?,
                },
                WatchEvent::Delete { revision, prev } => WatchEvent::Delete {
                    revision,
                    prev: Self::open_kv(&keys, &covered, prev)?,
                },
            })
        };
        // The stream contract: an error item is the last one.
        Ok(Box::pin(stream.scan(false, move |failed, item| {
            let next = if *failed {
                None
            } else {
                let item = item.and_then(&open);
                *failed = item.is_err();
                Some(item)
            };
            futures::future::ready(next)
        })))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.inner.compact(revision).await
    }
}

/// What the apiserver wraps its store in: Secrets encrypted with the keys in
/// `data_dir/`[`KEY_FILE`] (made on first start), and every Secret not yet under the write key
/// rewritten now (plaintext ones from before, and those under older keys after a rotation).
pub async fn encrypt_secrets(
    inner: Arc<dyn Store>,
    data_dir: &Path,
) -> Result<Arc<dyn Store>> {
    let path = data_dir.join(KEY_FILE);
    let keys = KeySet::load_or_create(&path)?;
    let store = EncryptedStore::new(inner, SECRETS_PREFIX, keys);
    let report = store.rewrite_stale().await?;
    if report.rewritten > 0 {
        tracing::info!(
            rewritten = report.rewritten,
            key = store.keys().write_key_name(),
            "rewrote Secrets with the current encryption key"
        );
    }
    for reason in &report.unreadable {
        tracing::error!(
            key_file = %path.display(),
            "a Secret cannot be decrypted and reads of it fail: {reason}"
        );
    }
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(dir: &Path) -> KeySet {
        KeySet::load_or_create(&dir.join(KEY_FILE)).expect("key file")
    }

    #[test]
    fn envelope_round_trips_and_is_bound_to_its_key() {
        let dir = tempfile::tempdir().expect("dir");
        let keys = keys(dir.path());
        let sealed = keys.encrypt("/registry/core/secrets/a/b", b"hunter2").expect("seal");
        assert!(sealed.starts_with(b"k8s:enc:aesgcm:v1:key1:"));
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            keys.decrypt("/registry/core/secrets/a/b", &sealed).expect("open"),
            b"hunter2"
        );
        // Moved to another key: refused.
        let error = keys
            .decrypt("/registry/core/secrets/a/c", &sealed)
            .expect_err("another key's ciphertext");
        assert!(error.to_string().contains("tampered"), "{error}");
        // Plaintext passes.
        assert_eq!(keys.decrypt("/x", b"{}").expect("plain"), b"{}");
    }

    #[test]
    fn corrupt_envelopes_are_errors_not_panics() {
        let dir = tempfile::tempdir().expect("dir");
        let keys = keys(dir.path());
        for bad in [
            &b"k8s:enc:aesgcm:v1:"[..],
            b"k8s:enc:aesgcm:v1:key1:",
            b"k8s:enc:aesgcm:v1:key1:short",
            b"k8s:enc:aesgcm:v1:nokeyname",
            b"k8s:enc:aescbc:v1:key1:0123456789abcdef0123456789abcdef",
            b"k8s:enc:aesgcm:v1:other:0123456789abcdef0123456789abcdef",
            b"k8s:enc:aesgcm:v1:\xff\xfe:0123456789abcdef0123456789abcdef",
        ] {
            assert!(keys.decrypt("/k", bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn key_file_is_private_and_rotation_keeps_old_keys() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(KEY_FILE);
        let first = KeySet::load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let old = first.encrypt("/k", b"v").expect("seal");
        assert_eq!(KeySet::rotate_file(&path).expect("rotate"), "key2");
        let rotated = KeySet::load(&path).expect("load");
        assert_eq!(rotated.key_names(), ["key2", "key1"]);
        assert!(!rotated.is_current(&old));
        assert_eq!(rotated.decrypt("/k", &old).expect("old key decrypts"), b"v");
        assert!(rotated.is_current(&rotated.encrypt("/k", b"v").expect("seal")));
        // Loading again does not make a new key.
        assert_eq!(KeySet::load_or_create(&path).expect("load").key_names(), ["key2", "key1"]);
    }

    #[test]
    fn bad_key_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(KEY_FILE);
        for (text, reason) in [
            ("not json", "JSON"),
            (r#"{"keys":[]}"#, "no key"),
            (r#"{"keys":[{"name":"a:b","secret":"AAAA"}]}"#, "name"),
            (r#"{"keys":[{"name":"k","secret":"AAAA"}]}"#, "bytes"),
            (r#"{"keys":[{"name":"k","secret":"!!"}]}"#, "base64"),
        ] {
            std::fs::write(&path, text).expect("write");
            let error = KeySet::load(&path).expect_err(text);
            assert!(error.to_string().contains(reason), "{text}: {error}");
        }
    }
}
