//! The agent's logs/exec endpoint under hostile input, from outside: raw HTTPS requests (no
//! client library normalizes `..` away) to the real endpoint (skiff_agent::server) backed by a
//! real in-process apiserver. Names with `..`, `/`, `%`, upper case or too long, oversized and
//! malformed queries: each a 400/404/414 Status; nothing outside the pod's log directory is read
//! and the runtime never runs a command. A valid request still works (the contrast).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;
use skiff_agent::runtime::{ContainerRequest, ContainerRuntime, ImageInfo, Observed, RuntimeError};

const NODE: &str = "hostile-input-node";
const TOKEN: &str = "hostile-input-agent-token";

/// Counts every call that could change something; runs nothing.
#[derive(Default)]
struct Recording {
    mutating_calls: AtomicUsize,
    containers: Mutex<BTreeMap<String, Observed>>,
}

impl ContainerRuntime for Recording {
    fn version(&self) -> String {
        "recording://0".into()
    }
    fn image(&self, image: &str) -> Result<ImageInfo, RuntimeError> {
        Err(RuntimeError::ImageNotFound(image.into()))
    }
    fn run(&self, _req: &ContainerRequest) -> Result<(), RuntimeError> {
        self.mutating_calls.fetch_add(1, Ordering::SeqCst);
        Err(RuntimeError::Failed("recording runtime".into()))
    }
    fn observe(&self, id: &str) -> Result<Observed, RuntimeError> {
        Ok(self.containers.lock().expect("lock").get(id).cloned().unwrap_or(Observed::Absent))
    }
    fn stop(&self, _id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        self.mutating_calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn remove(&self, _id: &str) -> Result<(), RuntimeError> {
        self.mutating_calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.containers.lock().expect("lock").keys().cloned().collect())
    }
    fn exec(&self, _id: &str, _argv: &[String], _tty: bool) -> Result<std::process::Child, RuntimeError> {
        self.mutating_calls.fetch_add(1, Ordering::SeqCst);
        Err(RuntimeError::Failed("recording runtime runs nothing".into()))
    }
}

struct Reply {
    status: u16,
    body: serde_json::Value,
    text: String,
}

fn short(text: &str) -> &str {
    &text[..text.char_indices().nth(300).map_or(text.len(), |(i, _)| i)]
}

/// One request, byte for byte, over a fresh TLS connection (the endpoint's certificate is
/// self-signed: this test checks input handling, not the server's identity).
async fn raw(port: u16, head: &str) -> Option<Reply> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(&self, _: &rustls::pki_types::CertificateDer<'_>, _: &[rustls::pki_types::CertificateDer<'_>], _: &rustls::pki_types::ServerName<'_>, _: &[u8], _: rustls::pki_types::UnixTime) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(&self, _: &[u8], _: &rustls::pki_types::CertificateDer<'_>, _: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(&self, _: &[u8], _: &rustls::pki_types::CertificateDer<'_>, _: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("tls");
    let request = format!("{head}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n");
    let _ = tls.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut response)).await.expect("answered in time");
    if read.is_err() && response.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("").to_string();
    Some(Reply { status, body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null), text: body })
}

fn write_log(pods_dir: &Path, uid: &str, container: &str, text: &str) -> PathBuf {
    let dir = pods_dir.join(uid).join("logs").join(container);
    std::fs::create_dir_all(&dir).expect("log dir");
    let path = dir.join("0.log");
    std::fs::write(&path, text).expect("write log");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_queries_are_refused_and_nothing_outside_is_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut config = skiff_apiserver::ServerConfig::new(tmp.path().join("apiserver"));
    config.bind = "127.0.0.1:0".parse().expect("loopback");
    let server = skiff_apiserver::start(config).await.expect("apiserver starts");
    let kc = kube::config::Kubeconfig::read_from(tmp.path().join("apiserver").join(skiff_apiserver::KUBECONFIG)).expect("kubeconfig");
    let kcfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.expect("kube config");
    let client = kube::Client::try_from(kcfg).expect("client");

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}]}}))
    .expect("pod");
    let uid = pods.create(&PostParams::default(), &pod).await.expect("create pod").metadata.uid.expect("uid");

    let pods_dir = tmp.path().join("agent").join("pods");
    write_log(&pods_dir, &uid, "c", "2026-01-01T00:00:00.000000000Z stdout F visible-log-line\n");
    // What a traversal would be after: files beside and above the pod's log directory.
    std::fs::write(tmp.path().join("agent").join("0.log"), "2026-01-01T00:00:00.000000000Z stdout F OUTSIDE-SECRET\n").expect("outside");
    std::fs::write(pods_dir.join("0.log"), "2026-01-01T00:00:00.000000000Z stdout F OUTSIDE-SECRET\n").expect("outside");
    let before: Vec<PathBuf> = walk(tmp.path());

    let runtime = Arc::new(Recording::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let scfg = skiff_agent::server::ServerConfig {
        listen: listener.local_addr().expect("addr"),
        token: TOKEN.into(),
        client_ca: None,
        node_name: NODE.into(),
        pods_dir: pods_dir.clone(),
        cert_names: vec!["127.0.0.1".into()],
    };
    tokio::spawn(skiff_agent::server::serve_listener(listener, scfg, client.clone(), runtime.clone(), stop_rx));

    // The contrast: a valid request reads the pod's log.
    let ok = raw(port, "GET /containerLogs/default/web/c HTTP/1.1").await.expect("answered");
    assert_eq!(ok.status, 200, "{}", short(&ok.text));
    assert!(ok.text.contains("visible-log-line"), "{}", short(&ok.text));

    let long_name = "p".repeat(300);
    let bad_paths = [
        "/containerLogs/default/web/..",
        "/containerLogs/default/web/.",
        "/containerLogs/default/../c",
        "/containerLogs/../web/c",
        "/containerLogs/default/web/%2e%2e",
        "/containerLogs/default/web/c%2f..%2f..%2f..",
        "/containerLogs/default/%2e%2e%2f%2e%2e/c",
        "/containerLogs/default/web/C",
        "/containerLogs/default/web/c\\..",
        &format!("/containerLogs/default/{long_name}/c"),
        "/exec/default/web/..?command=ls&stdout=true",
        "/exec/../web/c?command=ls&stdout=true",
        "/exec/default/..%2f..%2fweb/c?command=ls&stdout=true",
    ];
    for path in bad_paths {
        for method in ["GET", "POST"] {
            let Some(r) = raw(port, &format!("{method} {path} HTTP/1.1")).await else {
                panic!("{method} {path}: no answer");
            };
            assert!(matches!(r.status, 400 | 404 | 405), "{method} {path}: {} {}", r.status, short(&r.text));
            assert_eq!(r.body["kind"], "Status", "{method} {path}: {}", short(&r.text));
            assert!(!r.text.contains("OUTSIDE-SECRET"), "{method} {path} read outside: {}", short(&r.text));
        }
    }
    // Names are refused as names, with the reason.
    let r = raw(port, "GET /containerLogs/default/web/.. HTTP/1.1").await.expect("answered");
    assert_eq!(r.status, 400);
    assert!(r.body["message"].as_str().unwrap_or("").contains("not a valid container name"), "{}", short(&r.text));

    // Queries: too long (414 with a Status from the endpoint past 32 KiB; hyper's own bare 414
    // past 64 KiB), and malformed values (400).
    for query in [
        format!("tailLines=1&x={}", "a".repeat(40_000)),
        (0..4_000).map(|i| format!("command=arg{i}&")).collect::<String>() + "stdout=true",
    ] {
        for path in ["/containerLogs/default/web/c", "/exec/default/web/c"] {
            let r = raw(port, &format!("GET {path}?{query} HTTP/1.1")).await.expect("answered");
            assert_eq!(r.status, 414, "{path}: {}", short(&r.text));
            assert_eq!(r.body["reason"], "RequestURITooLong", "{}", short(&r.text));
        }
    }
    let huge: String = (0..20_000).map(|i| format!("&command=arg{i}")).collect();
    let r = raw(port, &format!("GET /exec/default/web/c?stdout=true{huge} HTTP/1.1")).await;
    assert!(r.is_none_or(|r| r.status == 414), "a 240 KB request line is refused");
    for query in [
        "tailLines=abc",
        "tailLines=99999999999999999999999",
        "limitBytes=0",
        "limitBytes=-1",
        "sinceSeconds=0",
        "sinceSeconds=-9223372036854775808",
        "sinceTime=yesterday",
        "sinceTime=2026-13-45T99:00:00Z",
        "sinceSeconds=5&sinceTime=2026-01-01T00:00:00Z",
        "follow=maybe",
        "previous=%ff%fe",
    ] {
        let r = raw(port, &format!("GET /containerLogs/default/web/c?{query} HTTP/1.1")).await.expect("answered");
        assert_eq!(r.status, 400, "{query}: {}", short(&r.text));
        assert_eq!(r.body["kind"], "Status", "{query}: {}", short(&r.text));
    }
    // exec without a command or a stream, and without websocket: 400, nothing run.
    for query in ["stdout=true", "command=ls", "command=ls&stdout=true"] {
        let r = raw(port, &format!("POST /exec/default/web/c?{query} HTTP/1.1")).await.expect("answered");
        assert_eq!(r.status, 400, "{query}: {}", short(&r.text));
    }

    assert_eq!(runtime.mutating_calls.load(Ordering::SeqCst), 0, "the runtime was asked to change something");
    assert_eq!(walk(tmp.path()), before, "no file was made or removed");
    let ok = raw(port, "GET /containerLogs/default/web/c HTTP/1.1").await.expect("answered");
    assert_eq!(ok.status, 200, "the endpoint still serves: {}", short(&ok.text));
    drop(server);
}

/// Every path under `dir` (the apiserver's store files change size, not names).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}
