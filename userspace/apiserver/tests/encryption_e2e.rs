//! Secrets at rest through the real server: a Secret applied with the real kubectl reads back
//! with its data, and the SQLite files in the server's data directory hold neither its value nor
//! that value's base64; a ConfigMap's value is there to see, so the scan reads real data.
//! (A JSON manifest is applied; `kubectl create secret`'s protobuf body is tested in
//! tests/kubectl_protobuf.rs.)

mod common;

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use common::*;

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn store_bytes(data_dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(data_dir).expect("data dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("store.db") {
            all.extend(std::fs::read(&path).expect("read store file"));
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applied_secret_reads_back_and_is_encrypted_in_sqlite() {
    let kubectl = Path::new("/usr/bin/kubectl");
    if !kubectl.exists() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and /usr/bin/kubectl is missing");
        }
        eprintln!("skipping: /usr/bin/kubectl is missing");
        return;
    }
    let s = start().await;
    let kubeconfig = s.data_dir.path().join("admin.kubeconfig");
    let home = tempfile::tempdir().expect("home");
    let run = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write as _;
        let mut child = Command::new(kubectl)
            .env_clear()
            .env("HOME", home.path())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write manifest");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("kubectl ends");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let password = "at-rest-password-e2e-4b7c91";
    let visible = "plain-configmap-value-e2e-77d0";
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "db-creds", "namespace": "default"},
        "stringData": {"password": password},
    });
    let configmap = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "plain", "namespace": "default"},
        "data": {"value": visible},
    });
    for manifest in [secret, configmap] {
        let (ok, out, err) = run(&["apply", "-f", "-"], Some(&manifest.to_string()));
        assert!(ok, "kubectl apply: {out}\n{err}");
    }

    let (ok, out, err) = run(
        &["get", "secret", "db-creds", "-o", "jsonpath={.data.password}"],
        None,
    );
    assert!(ok, "kubectl get: {out}\n{err}");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(out.trim())
        .expect("base64 data");
    assert_eq!(decoded, password.as_bytes(), "the Secret reads back");

    let disk = store_bytes(s.data_dir.path());
    let encoded = base64::engine::general_purpose::STANDARD.encode(password);
    assert!(contains(&disk, visible), "the ConfigMap's value is in the SQLite files");
    assert!(!contains(&disk, password), "the password is in the SQLite files");
    assert!(!contains(&disk, &encoded), "the password's base64 is in the SQLite files");
    assert!(
        contains(&disk, "k8s:enc:aesgcm:v1:key1:"),
        "an aesgcm envelope is in the SQLite files"
    );
    let key_file = s.data_dir.path().join("encryption-keys.json");
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(&key_file).expect("key file").permissions().mode()
    };
    assert_eq!(mode & 0o777, 0o600);
}
