//! `skiff rotate-encryption-key` as a user runs it: a Secret written through a real server, the
//! real binary run against the server's data directory (while the server runs: the store is in
//! use, it only adds the key; stopped: it rewrites every Secret at once), and the server
//! restarted on the same data reads the Secret back. The SQLite files are read byte for byte to
//! see which key each value is under.

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};

const BIN: &str = env!("CARGO_BIN_EXE_skiff");

fn store_bytes(data_dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(data_dir).expect("data dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("store.db") && !name.ends_with(".lock") {
            all.extend(std::fs::read(entry.path()).expect("read"));
        }
    }
    all
}

fn count(haystack: &[u8], needle: &str) -> usize {
    haystack.windows(needle.len()).filter(|w| *w == needle.as_bytes()).count()
}

async fn start(data_dir: &Path) -> (skiff_apiserver::RunningServer, kube::Client) {
    let mut config = skiff_apiserver::ServerConfig::new(data_dir.to_path_buf());
    config.bind = "127.0.0.1:0".parse().expect("loopback");
    let server = skiff_apiserver::start(config).await.expect("server starts");
    let kc = kube::config::Kubeconfig::read_from(data_dir.join(skiff_apiserver::KUBECONFIG)).expect("kubeconfig");
    let kcfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.expect("config");
    (server, kube::Client::try_from(kcfg).expect("client"))
}

fn rotate(data_dir: &Path) -> String {
    let out = Command::new(BIN)
        .args(["rotate-encryption-key", "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("skiff runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    text
}

async fn password(client: &kube::Client, name: &str) -> Vec<u8> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let secret = secrets.get(name).await.expect("secret reads back");
    secret.data.expect("data")["password"].0.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_rewrites_every_secret_and_the_server_reads_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data_dir = tmp.path();
    let (server, client) = start(data_dir).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    for name in ["one", "two"] {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "stringData": {"password": format!("pw-{name}-rot-91c")}
        }))
        .expect("secret");
        secrets.create(&PostParams::default(), &secret).await.expect("create");
    }
    // Secrets the server made itself count too: every Secret in every namespace is rewritten.
    let stored = Api::<Secret>::all(client.clone()).list(&Default::default()).await.expect("list").items.len();
    assert!(stored >= 2);

    // While the server runs: a new key, and the advice to restart.
    let text = rotate(data_dir);
    assert!(text.contains("new write key \"key2\""), "{text}");
    assert!(text.contains("in use"), "{text}");
    server.stop().await;
    drop(client);

    // Stopped: key3, and every Secret rewritten with it now.
    let text = rotate(data_dir);
    assert!(text.contains("new write key \"key3\""), "{text}");
    assert!(text.contains(&format!("rewrote {stored} Secrets with \"key3\"")), "{text}");
    let disk = store_bytes(data_dir);
    assert!(count(&disk, "k8s:enc:aesgcm:v1:key3:") >= 2, "the rewritten values are on disk");
    assert_eq!(count(&disk, "pw-one-rot-91c") + count(&disk, "pw-two-rot-91c"), 0);

    // Restarted: reads back; the key file keeps all three keys, key3 first.
    let (server, client) = start(data_dir).await;
    assert_eq!(password(&client, "one").await, b"pw-one-rot-91c");
    assert_eq!(password(&client, "two").await, b"pw-two-rot-91c");
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data_dir.join("encryption-keys.json")).expect("key file")).expect("json");
    let names: Vec<&str> = keys["keys"].as_array().expect("keys").iter().filter_map(|k| k["name"].as_str()).collect();
    assert_eq!(names, ["key3", "key2", "key1"]);
    server.stop().await;

    // No key file yet: a clear error, nothing made.
    let empty = tempfile::tempdir().expect("tmp");
    let out = Command::new(BIN).args(["rotate-encryption-key", "--data-dir"]).arg(empty.path()).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("start the server once"));
    assert_eq!(std::fs::read_dir(empty.path()).expect("dir").count(), 0);
}
