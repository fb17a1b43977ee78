//! Outside input never crashes the server: a bounded, seeded stream of mangled requests (odd
//! paths, methods, media types, truncated and bit-flipped bodies, hostile query strings) gets
//! answers that are either successes or well-formed metav1.Status failures with the HTTP code,
//! and the server keeps serving afterwards.

mod common;

use common::*;
use reqwest::{Method, StatusCode};

/// xorshift64*: a deterministic generator, so a failure names its seed and replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize].clone()
    }
}

const PATHS: &[&str] = &[
    "/api/v1/namespaces/default/configmaps",
    "/api/v1/namespaces/default/configmaps/g",
    "/api/v1/namespaces/default/pods/g/status",
    "/api/v1/namespaces/default/pods/g/binding",
    "/api/v1/namespaces/default/pods/g/log",
    "/apis/apps/v1/namespaces/default/deployments/g/scale",
    "/api/v1/namespaces/default/services",
    "/api/v1/namespaces/g",
    "/api/v1/namespaces/g/finalize",
    "/api/v1/nodes/g",
    "/api/v1/pods",
    "/api/v1/namespaces/%2e%2e/configmaps",
    "/api/v1/namespaces/default/configmaps/a/b/c/d",
    "/apis/apps",
    "/apis/apps/v9/deployments",
    "/openapi/v3/apis/none/v1",
    "//api///v1//",
    "/api/v1/namespaces/default/configmaps/%ff%fe",
];

const QUERIES: &[&str] = &[
    "",
    "?watch=true&timeoutSeconds=1",
    "?watch=true&resourceVersion=abc&timeoutSeconds=1",
    "?watch=true&resourceVersion=-5&timeoutSeconds=1",
    "?watch=true&resourceVersion=99999999999&timeoutSeconds=1",
    "?limit=-1",
    "?limit=abc&continue=%%%",
    "?continue=bm90IGEgdG9rZW4=",
    "?labelSelector=a%20in%20(",
    "?fieldSelector=%3D%3D",
    "?dryRun=Some",
    "?fieldValidation=Loud",
    "?timeoutSeconds=-1&watch=1",
    "?includeObject=Everything",
    "?gracePeriodSeconds=-3",
];

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/yaml",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
    "application/vnd.kubernetes.protobuf",
    "text/plain",
    "",
];

const BODIES: &[&str] = &[
    r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"g","labels":{"a":"b"}},"data":{"k":"v"}}"#,
    r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"g"},"spec":{"containers":[{"name":"c","image":"i","ports":[{"containerPort":80}]}]}}"#,
    r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"g"},"spec":{"type":"NodePort","clusterIP":"10.96.0.9","ports":[{"port":80,"nodePort":30001}]}}"#,
    r#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"g"},"target":{"kind":"Node","name":"n"}}"#,
    r#"[{"op":"replace","path":"/spec/replicas","value":"x"},{"op":"move","from":"/a","path":"/a/b"}]"#,
    r#"{"spec":{"containers":[{"$patch":"delete"},{"name":null}],"$setElementOrder/containers":[1,2]}}"#,
    r#"{"metadata":{"name":"g","resourceVersion":"abc","finalizers":[1,{"x":2}]},"spec":{"replicas":-1}}"#,
    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: g\ndata: &a [*a]\n",
    r#"{"kind":"DeleteOptions","propagationPolicy":"Sideways","gracePeriodSeconds":"soon"}"#,
    "",
];

fn mangle(rng: &mut Rng, body: &str) -> Vec<u8> {
    let mut bytes = body.as_bytes().to_vec();
    match rng.next() % 4 {
        0 => {}
        1 if !bytes.is_empty() => {
            let cut = (rng.next() % bytes.len() as u64) as usize;
            bytes.truncate(cut);
        }
        2 if !bytes.is_empty() => {
            for _ in 0..3 {
                let at = (rng.next() % bytes.len() as u64) as usize;
                bytes[at] ^= 1 << (rng.next() % 8);
            }
        }
        _ => {
            // Deep nesting: parsers must not overflow their stack.
            bytes = format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes();
        }
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangled_requests_get_status_answers_and_the_server_survives() {
    let s = start().await;
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    for seed in 1..=4u64 {
        let mut rng = Rng(0x9E3779B97F4A7C15 ^ seed);
        for i in 0..100 {
            let method = rng.pick(&methods);
            let (p, q) = (rng.pick(PATHS), rng.pick(QUERIES));
            let path = format!("{p}{q}");
            let ct = rng.pick(CONTENT_TYPES);
            let template = rng.pick(BODIES);
            let body = mangle(&mut rng, template);
            let mut req = s.request(method.clone(), &path).body(body);
            if !ct.is_empty() {
                req = req.header("Content-Type", ct);
            }
            let what = format!("seed {seed} request {i}: {method} {path} ({ct})");
            let resp = tokio::time::timeout(std::time::Duration::from_secs(20), req.send())
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer in 20 s"))
                .unwrap_or_else(|e| panic!("{what}: the connection failed: {e}"));
            let status = resp.status();
            let text = tokio::time::timeout(std::time::Duration::from_secs(20), resp.text())
                .await
                .unwrap_or_else(|_| panic!("{what}: body did not end in 20 s"))
                .unwrap_or_default();
            if status.is_success() {
                continue;
            }
            assert!(
                status.as_u16() < 500 || status.as_u16() == 503,
                "{what}: server error {status}: {text}"
            );
            if status == StatusCode::NOT_FOUND && text.is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{what}: failure body is not JSON ({e}): {text}"));
            assert_eq!(v["kind"], "Status", "{what}: {text}");
            assert_eq!(v["code"], status.as_u16(), "{what}: {text}");
        }
    }
    let r = s.send(s.client.get(s.url("/healthz"))).await;
    assert_eq!(r.status, StatusCode::OK, "the server still serves");
    let r = s.get("/api/v1/namespaces/default").await;
    assert_eq!(r.status, StatusCode::OK);
}
