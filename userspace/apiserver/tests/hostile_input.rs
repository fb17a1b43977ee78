//! Hostile input from outside, over real HTTPS to a real server: oversized bodies (declared and
//! chunked), malformed and deeply nested JSON/YAML, names and namespaces with `..`, `/`, percent
//! escapes, huge headers and query strings. Each gets a clear error (a metav1.Status where the
//! request reached the API) and leaves the store exactly as it was; the server keeps answering.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;

/// Every key in the store with its revisions, and the store's revision: equal snapshots mean
/// nothing was written.
async fn snapshot(s: &TestServer) -> (Vec<(String, i64)>, i64) {
    let store = s.server.store();
    let listed = store.list("/").await.expect("list the whole store");
    (
        listed
            .items
            .into_iter()
            .map(|kv| (kv.key, kv.mod_revision))
            .collect(),
        listed.revision,
    )
}

async fn still_serves(s: &TestServer) {
    let r = s.get("/api/v1/namespaces/default").await;
    assert_eq!(r.status.as_u16(), 200, "the server still answers: {}", r.text);
}

/// What a raw request got back: the status code and the body (JSON when it is).
struct RawReply {
    status: u16,
    body: serde_json::Value,
    text: String,
}

/// Sends `head` (request line and headers, without the blank line) and then `body` over a fresh
/// TLS connection, byte for byte: no client library normalizes the path (`..` stays `..`) or
/// refuses a size. Write errors after the server answered early (413 before the body) are fine.
async fn raw(s: &TestServer, head: &str, body: &[u8]) -> Option<RawReply> {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(s.ca_pem.as_bytes()) {
        roots.add(cert.expect("CA pem")).expect("CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(s.server.addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("tls");
    let request = format!(
        "{head}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        s.token
    );
    let _ = tls.write_all(request.as_bytes()).await;
    for chunk in body.chunks(64 * 1024) {
        if tls.write_all(chunk).await.is_err() {
            break;
        }
    }
    let _ = tls.flush().await;
    let mut response = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tls.read_to_end(&mut response),
    )
    .await
    .expect("the server answers or closes in time");
    if read.is_err() && response.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body_text = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("").to_string();
    Some(RawReply {
        status,
        body: serde_json::from_str(&body_text).unwrap_or(serde_json::Value::Null),
        text: body_text,
    })
}

/// The first 300 characters, for messages.
fn short(text: &str) -> &str {
    &text[..text.char_indices().nth(300).map_or(text.len(), |(i, _)| i)]
}

fn assert_raw_status(r: &RawReply, code: u16, reason: &str) {
    assert_eq!(r.status, code, "{}", short(&r.text));
    assert_eq!(r.body["kind"], "Status", "{}", short(&r.text));
    assert_eq!(r.body["reason"], reason, "{}", short(&r.text));
}

fn configmap(name: &str, filler: usize) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
           "data": {"big": "x".repeat(filler)}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_and_write_nothing() {
    let s = start().await;
    let before = snapshot(&s).await;
    let limit = 3 * 1024 * 1024;

    // Declared length over the limit: refused before the body is read.
    let path = "/api/v1/namespaces/default/configmaps";
    let r = raw(
        &s,
        &format!("POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}", limit + 10),
        b"",
    )
    .await
    .expect("answered");
    assert_raw_status(&r, 413, "RequestEntityTooLarge");
    assert!(r.body["message"].as_str().unwrap_or("").contains("3145728"), "{}", short(&r.text));

    // No length declared (chunked): the limit holds while reading.
    let text = serde_json::to_vec(&configmap("big-chunked", limit + 10)).expect("json");
    let mut chunked = Vec::new();
    for chunk in text.chunks(64 * 1024) {
        chunked.extend(format!("{:x}\r\n", chunk.len()).into_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = raw(
        &s,
        &format!("POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"),
        &chunked,
    )
    .await
    .expect("answered");
    assert_raw_status(&r, 413, "RequestEntityTooLarge");
    // A declared length that lies (more body than declared is the next request; less never
    // ends): a huge declared length with a small body is refused at once all the same.
    let r = raw(
        &s,
        &format!("POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 99999999999999"),
        b"{}",
    )
    .await
    .expect("answered");
    assert_raw_status(&r, 413, "RequestEntityTooLarge");

    // The same as a patch and an update.
    let created = s.configmap("default", "target", json!({"a": "1"})).await;
    assert_eq!(created.status.as_u16(), 201, "{}", created.text);
    let after_create = snapshot(&s).await;
    let big_patch = json!({"data": {"big": "y".repeat(limit + 1)}}).to_string();
    let r = raw(
        &s,
        &format!(
            "PATCH {path}/target HTTP/1.1\r\nContent-Type: application/merge-patch+json\r\nContent-Length: {}",
            big_patch.len()
        ),
        big_patch.as_bytes(),
    )
    .await
    .expect("answered");
    assert_raw_status(&r, 413, "RequestEntityTooLarge");
    let big_put = serde_json::to_vec(&configmap("target", limit + 1)).expect("json");
    let r = raw(
        &s,
        &format!(
            "PUT {path}/target HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
            big_put.len()
        ),
        &big_put,
    )
    .await
    .expect("answered");
    assert_raw_status(&r, 413, "RequestEntityTooLarge");

    // Just under the limit is still taken (the limit is not off by a lot).
    // Just under the limit is read and judged on its content (a ConfigMap's own 1 MiB limit:
    // 422), not refused for its size: the limit is not set lower than it says.
    let fits = s
        .post(
            "/api/v1/namespaces/default/configmaps",
            &configmap("fits", limit - 4096),
        )
        .await;
    assert_eq!(fits.status.as_u16(), 422, "{}", short(&fits.text));
    assert!(fits.text.contains("1048576"), "{}", short(&fits.text));

    let after = snapshot(&s).await;
    let new_keys: Vec<&String> = after
        .0
        .iter()
        .map(|(k, _)| k)
        .filter(|k| !before.0.iter().any(|(b, _)| b == *k))
        .collect();
    assert_eq!(
        new_keys,
        ["/registry/core/configmaps/default/target"],
        "only the one accepted create wrote"
    );
    let target = |snap: &(Vec<(String, i64)>, i64)| {
        snap.0
            .iter()
            .find(|(k, _)| k.ends_with("/default/target"))
            .map(|(_, rev)| *rev)
    };
    assert_eq!(target(&after), target(&after_create), "the refused patch and put wrote nothing");
    still_serves(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_deeply_nested_bodies_get_400_and_write_nothing() {
    let s = start().await;
    let before = snapshot(&s).await;
    let path = "/api/v1/namespaces/default/configmaps";
    let nested_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let nested_yaml = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("application/json", b"{\"apiVersion\": \"v1\", \"kind\": ".to_vec(), "not valid JSON"),
        ("application/json", b"\xff\xfe\x00garbage".to_vec(), "not valid JSON"),
        ("application/json", b"".to_vec(), "not valid JSON"),
        ("application/json", nested_json.into_bytes(), "not valid JSON"),
        ("application/yaml", b"kind: [unclosed\n  - : :".to_vec(), "not valid YAML"),
        ("application/yaml", nested_yaml.into_bytes(), "not valid YAML"),
        // Valid syntax, wrong shape.
        ("application/json", b"[1, 2, 3]".to_vec(), ""),
        ("application/json", b"\"just a string\"".to_vec(), ""),
        ("application/json", b"{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":\"oops\"}".to_vec(), ""),
    ];
    for (content_type, body, message) in cases {
        let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
        let r = s
            .send(
                s.request(Method::POST, path)
                    .header("Content-Type", content_type)
                    .body(body),
            )
            .await;
        assert!(
            r.status.as_u16() == 400 || r.status.as_u16() == 422,
            "{content_type} {shown:?}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.body["kind"], "Status", "{shown:?}: {}", r.text);
        assert!(
            r.body["message"].as_str().unwrap_or("").contains(message),
            "{shown:?}: {}",
            r.text
        );
    }
    // A media type the server does not take: 415, not a guess.
    let r = s
        .send(
            s.request(Method::POST, path)
                .header("Content-Type", "application/cbor")
                .body(vec![0xa1, 0x61, 0x61, 0x01]),
        )
        .await;
    assert_status(&r, 415, "UnsupportedMediaType");
    // Protobuf (decoded for the kinds kubectl sends in it) that is cut short: 400.
    let r = s
        .send(
            s.request(Method::POST, path)
                .header("Content-Type", "application/vnd.kubernetes.protobuf")
                .body(vec![0x6b, 0x38, 0x73, 0x00, 0x01]),
        )
        .await;
    assert_status(&r, 400, "BadRequest");
    // Malformed patches of an existing object.
    let created = s.configmap("default", "patched", json!({"a": "1"})).await;
    assert_eq!(created.status.as_u16(), 201);
    let mid = snapshot(&s).await;
    for (ct, body) in [
        ("application/json-patch+json", "[{\"op\": \"explode\"}]"),
        ("application/json-patch+json", "{\"not\": \"a list\"}"),
        ("application/merge-patch+json", "{\"data\": "),
        ("application/strategic-merge-patch+json", "[[[["),
        ("application/json-patch+json", "[{\"op\":\"add\",\"path\":\"/data/../../metadata/name\",\"value\":\"x\"}]"),
    ] {
        let r = s.patch("/api/v1/namespaces/default/configmaps/patched", ct, body).await;
        assert!(
            (400..500).contains(&r.status.as_u16()),
            "{ct} {body}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.body["kind"], "Status", "{}", r.text);
    }
    assert_eq!(snapshot(&s).await, mid, "refused patches wrote nothing");
    let after = snapshot(&s).await;
    assert_eq!(after.0.len(), before.0.len() + 1, "only the one valid create wrote");
    still_serves(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversing_names_and_namespaces_never_reach_another_key() {
    let s = start().await;
    // Something a traversal would want to reach.
    let secret = s
        .post(
            "/api/v1/namespaces/kube-system/secrets",
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "target"},
                    "stringData": {"k": "v"}}),
        )
        .await;
    assert_eq!(secret.status.as_u16(), 201, "{}", secret.text);
    let before = snapshot(&s).await;

    let names = [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E",
        "..%2f..%2fsecrets",
        "..%2F..%2Fkube-system%2Fsecrets%2Ftarget",
        "a%2Fb",
        "a%00b",
        "%252e%252e",
        "..%5c..%5c",
        "a\\b",
    ];
    let cm = "/api/v1/namespaces/default/configmaps";
    let json_head = |method: &str, path: &str, len: usize| {
        format!("{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len}")
    };
    for name in names {
        let path = format!("{cm}/{name}");
        for method in ["GET", "DELETE"] {
            let r = raw(&s, &format!("{method} {path} HTTP/1.1"), b"").await.expect("answered");
            assert!(
                matches!(r.status, 400 | 404),
                "{method} {path}: {} {}",
                r.status,
                short(&r.text)
            );
            assert_eq!(r.body["kind"], "Status", "{method} {path}: {}", short(&r.text));
        }
        // An update, a patch and a create that name it (in the body as sent, and decoded).
        for body_name in [name.to_string(), percent_decode(name)] {
            let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": body_name}, "data": {"a": "b"}})
            .to_string();
            let r = raw(&s, &json_head("PUT", &path, body.len()), body.as_bytes()).await.expect("answered");
            assert!(matches!(r.status, 400 | 404 | 422), "PUT {path} ({body_name:?}): {} {}", r.status, short(&r.text));
            let r = raw(&s, &json_head("POST", cm, body.len()), body.as_bytes()).await.expect("answered");
            assert!(matches!(r.status, 400 | 422), "POST name {body_name:?}: {} {}", r.status, short(&r.text));
        }
        let patch = r#"{"data":{"a":"c"}}"#;
        let r = raw(
            &s,
            &format!("PATCH {path} HTTP/1.1\r\nContent-Type: application/merge-patch+json\r\nContent-Length: {}", patch.len()),
            patch.as_bytes(),
        )
        .await
        .expect("answered");
        assert!(matches!(r.status, 400 | 404 | 422), "PATCH {path}: {} {}", r.status, short(&r.text));
    }
    // Namespaces that try to climb out of their prefix, and dot segments in the resource part.
    let mut paths: Vec<String> = Vec::new();
    for ns in ["..", ".", "%2e%2e", "..%2fkube-system", "kube-system%2fsecrets"] {
        paths.push(format!("/api/v1/namespaces/{ns}/secrets"));
        paths.push(format!("/api/v1/namespaces/{ns}/secrets/target"));
    }
    paths.extend(
        [
            "/api/v1/namespaces/default/../kube-system/secrets/target",
            "/api/v1/namespaces/default/configmaps/../../kube-system/secrets/target",
            "/api/v1/namespaces/default/configmaps/../../kube-system/secrets",
            "/api/v1/namespaces/kube-system/secrets/target/..",
            "/api/v1/namespaces/default/secrets/../../kube-system/secrets/target",
            "/api/v1/../v1/namespaces/kube-system/secrets/target",
        ]
        .map(String::from),
    );
    for path in &paths {
        let r = raw(&s, &format!("GET {path} HTTP/1.1"), b"").await.expect("answered");
        // What a traversal is after: the Secret in kube-system. A path that names it with a dot
        // segment must not get it.
        assert!(
            !r.text.contains("\"target\"") && !r.text.contains("\"k\":"),
            "GET {path} reached the secret: {} {}",
            r.status,
            short(&r.text)
        );
        if r.status == 200 {
            assert_eq!(r.body["items"].as_array().map(Vec::len), Some(0), "GET {path}: {}", short(&r.text));
        } else {
            assert!(matches!(r.status, 400 | 404), "GET {path}: {} {}", r.status, short(&r.text));
        }
        let body = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}}).to_string();
        let r = raw(&s, &json_head("POST", path, body.len()), body.as_bytes()).await.expect("answered");
        assert!(matches!(r.status, 400 | 404 | 405 | 422), "POST {path}: {} {}", r.status, short(&r.text));
        let r = raw(&s, &format!("DELETE {path} HTTP/1.1"), b"").await.expect("answered");
        assert!(matches!(r.status, 400 | 404 | 405), "DELETE {path}: {} {}", r.status, short(&r.text));
    }

    let after = snapshot(&s).await;
    assert_eq!(after, before, "nothing was written");
    assert!(after.0.iter().all(|(k, _)| !k.contains("..") && !k.contains('%')));
    still_serves(&s).await;
}

fn percent_decode(s: &str) -> String {
    // For the test's own ASCII inputs only: the bytes each %XX names, lossy as UTF-8.
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers_and_query_strings_are_refused_and_the_server_lives() {
    let s = start().await;
    let before = snapshot(&s).await;
    let cm = "/api/v1/namespaces/default/configmaps";
    // A 1 MiB header, a 1 MiB request line, 1,000 headers: hyper refuses each (431/414/400) or
    // closes the connection; none is served and the server lives.
    let big = "a".repeat(1024 * 1024);
    let many: String = (0..1000).map(|i| format!("\r\nx-h{i}: v")).collect();
    for head in [
        format!("GET {cm} HTTP/1.1\r\nX-Big: {big}"),
        format!("GET {cm}?labelSelector={big} HTTP/1.1"),
        format!("GET {cm} HTTP/1.1{many}"),
    ] {
        if let Some(r) = raw(&s, &head, b"").await {
            assert!(r.status >= 400 || r.status == 0, "served: {} {}", r.status, short(&r.text));
        }
    }
    // Malformed and oversized selectors that do reach the API: a 400 Status each.
    for selector in ["a%20in%20(", "!!", "a%3Db,,", "a%20notin%20b", &"x".repeat(60_000)] {
        let r = raw(&s, &format!("GET {cm}?labelSelector={selector} HTTP/1.1"), b"").await.expect("answered");
        assert_eq!(r.status, 400, "selector {:?}: {}", short(selector), short(&r.text));
        assert_raw_status(&r, 400, "BadRequest");
    }
    // A long selector that is valid (20,000 values, 40 KB) is simply served.
    let long = format!("a%20in%20({})", vec!["v"; 20_000].join(","));
    let r = raw(&s, &format!("GET {cm}?labelSelector={long} HTTP/1.1"), b"").await.expect("answered");
    assert_eq!(r.status, 200, "{}", short(&r.text));
    // A request line that is not HTTP at all.
    if let Some(r) = raw(&s, "\x00\x01\x02 / HTTP/9.9", b"").await {
        assert!(r.status >= 400 || r.status == 0, "served: {}", short(&r.text));
    }
    assert_eq!(snapshot(&s).await, before);
    still_serves(&s).await;
}
