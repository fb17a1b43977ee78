//! Shared helpers: start a real skiff-apiserver in-process on 127.0.0.1:0 with a temporary data
//! directory, and talk to it over HTTPS with reqwest, trusting only the CA the server wrote.
#![allow(dead_code)]

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

pub struct TestServer {
    pub server: skiff_apiserver::RunningServer,
    pub client: reqwest::Client,
    pub base: String,
    pub token: String,
    pub ca_pem: String,
    pub data_dir: tempfile::TempDir,
}

pub async fn start() -> TestServer {
    start_with(|_| {}).await
}

pub async fn start_with(tweak: impl FnOnce(&mut skiff_apiserver::ServerConfig)) -> TestServer {
    let data_dir = tempfile::tempdir().expect("temp data dir");
    let mut config = skiff_apiserver::ServerConfig::new(data_dir.path().to_path_buf());
    config.bind = "127.0.0.1:0".parse().expect("loopback address");
    tweak(&mut config);
    let server = skiff_apiserver::start(config).await.expect("server starts");
    let ca = reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).expect("CA pem parses");
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("https client");
    let base = format!("https://127.0.0.1:{}", server.addr.port());
    TestServer {
        token: server.admin_token.clone(),
        ca_pem: server.ca_pem.clone(),
        server,
        client,
        base,
        data_dir,
    }
}

/// A response: HTTP status, headers and the body parsed as JSON (Null when it is not JSON).
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let resp = req.send().await.expect("request is answered");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("response body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send(self.request(Method::DELETE, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Reply {
        self.send(self.request(Method::PUT, path).json(body)).await
    }

    pub async fn patch(&self, path: &str, content_type: &str, body: &str) -> Reply {
        self.send(
            self.request(Method::PATCH, path)
                .header("Content-Type", content_type)
                .body(body.to_string()),
        )
        .await
    }

    /// Creates a namespace and checks that it worked.
    pub async fn namespace(&self, name: &str) {
        let r = self
            .post(
                "/api/v1/namespaces",
                &serde_json::json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":name}}),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "create namespace {name}: {}",
            r.text
        );
    }

    pub async fn configmap(&self, ns: &str, name: &str, data: Value) -> Reply {
        self.post(
            &format!("/api/v1/namespaces/{ns}/configmaps"),
            &serde_json::json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":name},"data":data}),
        )
        .await
    }
}

/// Asserts that a reply is a metav1.Status failure with this code and reason.
pub fn assert_status(r: &Reply, code: u16, reason: &str) {
    assert_eq!(r.status.as_u16(), code, "HTTP status; body: {}", r.text);
    assert_eq!(r.body["kind"], "Status", "{}", r.text);
    assert_eq!(r.body["apiVersion"], "v1", "{}", r.text);
    assert_eq!(r.body["status"], "Failure", "{}", r.text);
    assert_eq!(r.body["code"], code, "{}", r.text);
    assert_eq!(r.body["reason"], reason, "{}", r.text);
}

pub fn rv(obj: &Value) -> i64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("object without a numeric resourceVersion: {obj}"))
}

/// Reads newline-delimited watch events from a streaming response until `n` arrived or the
/// timeout passed.
pub struct WatchReader {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl WatchReader {
    pub async fn open(server: &TestServer, path: &str) -> WatchReader {
        Self::open_with(server, server.request(Method::GET, path)).await
    }

    pub async fn open_with(_server: &TestServer, req: reqwest::RequestBuilder) -> WatchReader {
        let resp = req.send().await.expect("watch is answered");
        assert_eq!(resp.status(), StatusCode::OK, "watch status");
        WatchReader {
            resp,
            buf: Vec::new(),
        }
    }

    /// The next event, or None when the stream ended or nothing came within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return Some(serde_json::from_slice(line).unwrap_or_else(|e| {
                    panic!(
                        "watch line is not JSON ({e}): {}",
                        String::from_utf8_lossy(line)
                    )
                }));
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// Events until one satisfies `pred` (returned with everything before it).
    pub async fn until(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(ev) => {
                    let done = pred(&ev);
                    seen.push(ev);
                    if done {
                        return seen;
                    }
                }
                None => panic!("watch ended or timed out before the expected event; saw {seen:?}"),
            }
        }
    }
}
