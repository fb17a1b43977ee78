//! Secrets at rest on both backends: what reaches the disk (SQLite's files, etcd's own key read
//! back with etcd's client and its data directory) holds no plaintext of a Secret, reads return
//! it, plaintext from before still reads and is migrated, rotation rewrites with the new key
//! while old keys decrypt, and a wrong key is a clear error. The etcd half runs a real etcd.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use skiff_store::encryption::{self, ENVELOPE_PREFIX, KEY_FILE, KeySet, SECRETS_PREFIX};
use skiff_store::etcd::EtcdStore;
use skiff_store::etcd_server::{EtcdServer, etcd_for_test};
use skiff_store::sqlite::SqliteStore;
use skiff_store::{Store, WatchEvent};

/// One backend: the raw store (no encryption), where its bytes live, and how to read a key's
/// bytes exactly as the backend holds them.
#[async_trait::async_trait]
trait Backend: Sized + Send + Sync {
    async fn new(test: &str) -> Option<Self>;
    /// The unencrypted store.
    fn raw(&self) -> Arc<dyn Store>;
    /// The server's data directory (where the key file goes).
    fn data_dir(&self) -> &Path;
    /// Every file the backend writes its data into.
    fn storage_dir(&self) -> PathBuf;
    /// The value of `key` as the backend stores it, read around skiff's store code.
    async fn raw_value(&self, key: &str) -> Option<Vec<u8>>;
}

struct Sqlite {
    dir: tempfile::TempDir,
    store: SqliteStore,
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    async fn new(_test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("store.db"))
            .await
            .expect("open sqlite");
        Some(Sqlite { dir, store })
    }
    fn raw(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }
    fn data_dir(&self) -> &Path {
        self.dir.path()
    }
    fn storage_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
    async fn raw_value(&self, key: &str) -> Option<Vec<u8>> {
        // The newest row of the key in SQLite's revision log, through a second, read-only
        // connection.
        let path = self.dir.path().join("store.db");
        let key = key.as_bytes().to_vec();
        tokio::task::spawn_blocking(move || {
            let db = rusqlite::Connection::open_with_flags(
                &path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("open db read-only");
            db.query_row(
                "SELECT value FROM log WHERE name = ?1 ORDER BY id DESC LIMIT 1",
                [&key],
                |row| row.get::<_, Vec<u8>>(0),
            )
            .ok()
        })
        .await
        .expect("raw read")
    }
}

struct Etcd {
    dir: tempfile::TempDir,
    server: EtcdServer,
    prefix: String,
    store: Arc<EtcdStore>,
}

#[async_trait::async_trait]
impl Backend for Etcd {
    async fn new(test: &str) -> Option<Self> {
        let binary = etcd_for_test(test)?;
        let dir = tempfile::tempdir().expect("temp dir");
        let server = EtcdServer::start(&binary, &dir.path().join("etcd"))
            .await
            .expect("start etcd");
        let prefix = format!("/skiff-enc-test/{test}/");
        let store = EtcdStore::connect(&server.endpoints(), &prefix)
            .await
            .expect("connect");
        Some(Etcd {
            dir,
            server,
            prefix,
            store: Arc::new(store),
        })
    }
    fn raw(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
    fn data_dir(&self) -> &Path {
        self.dir.path()
    }
    fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("etcd")
    }
    async fn raw_value(&self, key: &str) -> Option<Vec<u8>> {
        let mut client = etcd_client::Client::connect(self.server.endpoints(), None)
            .await
            .expect("etcd client");
        let response = client
            .get(format!("{}{}", self.prefix, key), None)
            .await
            .expect("etcd get");
        response.kvs().first().map(|kv| kv.value().to_vec())
    }
}

macro_rules! both_backends {
    ($($property:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    let test = concat!("sqlite_", stringify!($property));
                    let Some(backend) = <super::Sqlite as super::Backend>::new(test).await else { return };
                    super::$property(&backend).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    let test = concat!("etcd_", stringify!($property));
                    let Some(backend) = <super::Etcd as super::Backend>::new(test).await else { return };
                    super::$property(&backend).await;
                }
            )*
        }
    };
}

both_backends!(
    secrets_are_ciphertext_at_rest_and_plaintext_on_read,
    plaintext_from_before_is_read_and_migrated,
    rotation_rewrites_with_the_new_key_and_old_keys_still_decrypt,
    a_wrong_or_missing_key_is_a_clear_error,
    a_ciphertext_moved_to_another_key_does_not_decrypt,
);

fn secret_key(name: &str) -> String {
    format!("{SECRETS_PREFIX}default/{name}")
}

fn secret_json(name: &str, marker: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "stringData": {"password": marker},
    }))
    .expect("json")
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Every byte of every file under `dir` (databases, WALs, snapshots).
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.extend_from_slice(&bytes);
            }
        }
    }
    out
}

async fn encrypted<B: Backend>(backend: &B) -> Arc<dyn Store> {
    encryption::encrypt_secrets(backend.raw(), backend.data_dir())
        .await
        .expect("encrypted store")
}

async fn secrets_are_ciphertext_at_rest_and_plaintext_on_read<B: Backend>(backend: &B) {
    let store = encrypted(backend).await;
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(backend.data_dir().join(KEY_FILE))
            .expect("key file made on first start")
            .permissions()
            .mode()
    };
    assert_eq!(mode & 0o777, 0o600, "key file mode {mode:o}");

    let watch_from = store.current_revision().await.expect("revision");
    let mut watch = store.watch("/registry/", watch_from).await.expect("watch");
    let key = secret_key("db");
    let first = "first-password-7c1e9a";
    let second = "second-password-5d2b8f";
    let visible = "configmap-value-3a9f0e";
    store.create(&key, secret_json("db", first)).await.expect("create");
    let rev = store.get(&key).await.expect("get").expect("present").mod_revision;
    store.update(&key, secret_json("db", second), rev).await.expect("update");
    let cm_key = "/registry/core/configmaps/default/cfg";
    store
        .create(cm_key, format!("{{\"data\":{{\"v\":\"{visible}\"}}}}").into_bytes())
        .await
        .expect("configmap");

    // Reads, lists and watches see plaintext.
    let got = store.get(&key).await.expect("get").expect("present");
    assert_eq!(got.value, secret_json("db", second));
    let listed = store.list(SECRETS_PREFIX).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].value, secret_json("db", second));
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("watch event in time")
            .expect("stream open")
            .expect("event");
        seen.push(event);
    }
    match &seen[1] {
        WatchEvent::Put { kv, prev: Some(prev) } => {
            assert_eq!(kv.value, secret_json("db", second));
            // etcd hands the previous value back too; it is decrypted as well.
            assert_eq!(prev.value, secret_json("db", first));
        }
        other => panic!("expected the update with its prev, got {other:?}"),
    }

    // At rest: the backend's own copy is an envelope with the write key...
    let raw = backend.raw_value(&key).await.expect("raw value of the secret");
    assert!(raw.starts_with(b"k8s:enc:aesgcm:v1:key1:"), "{:?}", String::from_utf8_lossy(&raw[..raw.len().min(40)]));
    assert!(!contains(&raw, second));
    // ...and the files on disk hold neither password, while a ConfigMap's value is there to see
    // (so the scan reads the data, it does not just miss it).
    let disk = all_bytes(&backend.storage_dir());
    assert!(contains(&disk, visible), "the scan finds unencrypted data");
    assert!(!contains(&disk, first), "first password on disk");
    assert!(!contains(&disk, second), "second password on disk");

    // Delete hands back the plaintext.
    let (_, prev) = store.delete(&key, None).await.expect("delete");
    assert_eq!(prev.value, secret_json("db", second));
}

async fn plaintext_from_before_is_read_and_migrated<B: Backend>(backend: &B) {
    let raw = backend.raw();
    let key = secret_key("old");
    let old = "plaintext-before-encryption-41d7";
    raw.create(&key, secret_json("old", old)).await.expect("plaintext write");

    // A store that only reads (no rewrite yet) returns it as it is.
    let keys = KeySet::load_or_create(&backend.data_dir().join(KEY_FILE)).expect("keys");
    let reader = encryption::EncryptedStore::new(raw.clone(), SECRETS_PREFIX, keys);
    assert_eq!(
        reader.get(&key).await.expect("get").expect("present").value,
        secret_json("old", old)
    );
    // Starting the server's store rewrites it encrypted, same plaintext on read.
    let store = encrypted(backend).await;
    assert_eq!(
        store.get(&key).await.expect("get").expect("present").value,
        secret_json("old", old)
    );
    let at_rest = backend.raw_value(&key).await.expect("raw");
    assert!(at_rest.starts_with(ENVELOPE_PREFIX), "migrated");
    assert!(!contains(&at_rest, old));
    // A second start has nothing left to rewrite: the revision does not move.
    let before = raw.current_revision().await.expect("revision");
    let _again = encrypted(backend).await;
    assert_eq!(raw.current_revision().await.expect("revision"), before);
}

async fn rotation_rewrites_with_the_new_key_and_old_keys_still_decrypt<B: Backend>(backend: &B) {
    let path = backend.data_dir().join(KEY_FILE);
    let store = encrypted(backend).await;
    let names: Vec<String> = (0..5).map(|i| format!("rot{i}")).collect();
    for name in &names {
        store
            .create(&secret_key(name), secret_json(name, &format!("pw-{name}-88e1")))
            .await
            .expect("create");
    }
    drop(store);
    assert_eq!(KeySet::rotate_file(&path).expect("rotate"), "key2");

    // Before the rewrite the new key set reads key1's values (old keys decrypt).
    let keys = KeySet::load(&path).expect("keys");
    assert_eq!(keys.write_key_name(), "key2");
    let reader = encryption::EncryptedStore::new(backend.raw(), SECRETS_PREFIX, keys);
    for name in &names {
        let raw = backend.raw_value(&secret_key(name)).await.expect("raw");
        assert!(raw.starts_with(b"k8s:enc:aesgcm:v1:key1:"));
        assert_eq!(
            reader.get(&secret_key(name)).await.expect("get").expect("present").value,
            secret_json(name, &format!("pw-{name}-88e1"))
        );
    }
    let report = reader.rewrite_stale().await.expect("rewrite");
    assert_eq!((report.rewritten, report.unreadable.len()), (names.len(), 0));
    for name in &names {
        let raw = backend.raw_value(&secret_key(name)).await.expect("raw");
        assert!(raw.starts_with(b"k8s:enc:aesgcm:v1:key2:"), "{name} rewritten with key2");
    }

    // key1 can now go: only key2 in the file, everything still reads.
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    let only_new = serde_json::json!({"keys": [doc["keys"][0].clone()]});
    std::fs::write(&path, serde_json::to_vec(&only_new).expect("json")).expect("write");
    let store = encrypted(backend).await;
    let listed = store.list(SECRETS_PREFIX).await.expect("list with key2 only");
    assert_eq!(listed.items.len(), names.len());
    for (item, name) in listed.items.iter().zip(&names) {
        assert_eq!(item.value, secret_json(name, &format!("pw-{name}-88e1")));
    }
}

async fn a_wrong_or_missing_key_is_a_clear_error<B: Backend>(backend: &B) {
    let path = backend.data_dir().join(KEY_FILE);
    let store = encrypted(backend).await;
    let key = secret_key("guarded");
    store.create(&key, secret_json("guarded", "pw-wrong-key-19")).await.expect("create");
    drop(store);

    // Another key under the same name: the tag does not verify.
    let other_dir = tempfile::tempdir().expect("dir");
    KeySet::load_or_create(&other_dir.path().join(KEY_FILE)).expect("other key");
    std::fs::copy(other_dir.path().join(KEY_FILE), &path).expect("swap key file");
    let keys = KeySet::load(&path).expect("keys");
    let wrong = encryption::EncryptedStore::new(backend.raw(), SECRETS_PREFIX, keys);
    let error = wrong.get(&key).await.expect_err("wrong key");
    let text = error.to_string();
    assert!(text.contains("decrypting with key \"key1\" failed"), "{text}");
    assert!(text.contains(&key), "{text}");
    assert!(wrong.list(SECRETS_PREFIX).await.is_err());
    // Starting still works (as Kubernetes' does: the rest of the store is fine), reports the
    // value it cannot read, and rewrites nothing.
    let before = backend.raw().current_revision().await.expect("revision");
    let report = wrong.rewrite_stale().await.expect("rewrite pass");
    assert_eq!(report.rewritten, 0);
    assert_eq!(report.unreadable.len(), 1, "{report:?}");
    assert!(report.unreadable[0].contains(&key), "{report:?}");
    let started = encryption::encrypt_secrets(backend.raw(), backend.data_dir())
        .await
        .expect("start with a wrong key");
    assert!(started.get(&key).await.is_err());
    assert_eq!(backend.raw().current_revision().await.expect("revision"), before);

    // A key file without that key's name: the error names the missing key.
    let swapped: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    let doc = serde_json::json!({"keys": [{"name": "other", "secret": swapped["keys"][0]["secret"]}]});
    std::fs::write(&path, serde_json::to_vec(&doc).expect("json")).expect("write");
    let keys = KeySet::load(&path).expect("keys");
    let missing = encryption::EncryptedStore::new(backend.raw(), SECRETS_PREFIX, keys);
    let text = missing.get(&key).await.expect_err("missing key").to_string();
    assert!(text.contains("\"key1\", which is not in the key file"), "{text}");
    // Nothing was changed by the failed reads: the stored bytes still open with the right key.
    assert!(backend.raw_value(&key).await.expect("raw").starts_with(b"k8s:enc:aesgcm:v1:key1:"));
}

async fn a_ciphertext_moved_to_another_key_does_not_decrypt<B: Backend>(backend: &B) {
    let store = encrypted(backend).await;
    let (a, b) = (secret_key("a"), secret_key("b"));
    store.create(&a, secret_json("a", "pw-a-6f")).await.expect("create a");
    // An attacker with write access to the store copies a's ciphertext to b.
    let ciphertext = backend.raw_value(&a).await.expect("raw a");
    backend.raw().create(&b, ciphertext).await.expect("raw copy");
    let text = store.get(&b).await.expect_err("moved ciphertext").to_string();
    assert!(text.contains("tampered"), "{text}");
    assert_eq!(
        store.get(&a).await.expect("a").expect("present").value,
        secret_json("a", "pw-a-6f")
    );
}
