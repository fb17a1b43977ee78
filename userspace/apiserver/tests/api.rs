//! The apiserver over real HTTPS, started in-process: security, discovery, CRUD, patches,
//! validation, selectors, tables, errors.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn requests_without_a_valid_token_get_401_but_health_does_not() {
    let s = start().await;
    let r = s.send(s.client.get(s.url("/api/v1/namespaces"))).await;
    assert_status(&r, 401, "Unauthorized");
    let r = s
        .send(
            s.client
                .get(s.url("/api/v1/namespaces"))
                .bearer_auth("not-the-token"),
        )
        .await;
    assert_status(&r, 401, "Unauthorized");
    for path in ["/healthz", "/livez", "/readyz"] {
        let r = s.send(s.client.get(s.url(path))).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
    }
    // With the token, the same list works.
    let r = s.get("/api/v1/namespaces").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn the_data_dir_holds_a_kubeconfig_with_the_real_port_and_a_private_token() {
    let s = start().await;
    let text = skiff_apiserver::kubeconfig(s.data_dir.path()).expect("kubeconfig");
    let on_disk =
        std::fs::read_to_string(s.data_dir.path().join("admin.kubeconfig")).expect("file");
    assert_eq!(text, on_disk);
    assert!(
        text.contains(&format!("https://127.0.0.1:{}", s.server.addr.port())),
        "{text}"
    );
    assert!(
        text.contains(&s.token),
        "the kubeconfig carries the admin token"
    );
    assert_eq!(s.token.len(), 64, "32 random bytes in hex");
    // No other user of the machine may read the token.
    use std::os::unix::fs::PermissionsExt;
    let mut private = 0;
    for entry in std::fs::read_dir(s.data_dir.path()).expect("data dir") {
        let entry = entry.expect("entry");
        let content = std::fs::read(entry.path()).unwrap_or_default();
        if String::from_utf8_lossy(&content).contains(&s.token) {
            let mode = entry.metadata().expect("meta").permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{:?} holds the token with mode {mode:o}",
                entry.path()
            );
            private += 1;
        }
    }
    assert!(private >= 1);
}

#[tokio::test]
async fn version_and_both_discovery_forms() {
    let s = start().await;
    let r = s.get("/version").await;
    assert_eq!(r.body["major"], "1");
    assert_eq!(r.body["minor"], "32");
    assert!(
        r.body["gitVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("v1.32"))
    );

    // Aggregated v2, with exactly the content type kubectl checks.
    let accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
    let r = s
        .send(s.request(Method::GET, "/apis").header("Accept", accept))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers["content-type"],
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    );
    assert_eq!(r.body["kind"], "APIGroupDiscoveryList");
    let groups: Vec<&str> = r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|g| g["metadata"]["name"].as_str())
        .collect();
    assert!(
        groups.contains(&"apps") && groups.contains(&"batch"),
        "{groups:?}"
    );
    let r = s
        .send(s.request(Method::GET, "/api").header("Accept", accept))
        .await;
    assert_eq!(r.body["kind"], "APIGroupDiscoveryList");
    assert!(r.text.contains("\"pods\""));

    // Only v2beta1 asked (kubectl 1.29).
    let r = s
        .send(s.request(Method::GET, "/api").header(
            "Accept",
            "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json",
        ))
        .await;
    assert_eq!(
        r.headers["content-type"],
        "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
    );

    // Legacy.
    let r = s.get("/api").await;
    assert_eq!(r.body["kind"], "APIVersions");
    assert_eq!(r.body["versions"], json!(["v1"]));
    let r = s.get("/apis").await;
    assert_eq!(r.body["kind"], "APIGroupList");
    let r = s.get("/apis/apps/v1").await;
    assert_eq!(r.body["kind"], "APIResourceList");
    let deploy = r.body["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|x| x["name"] == "deployments")
        .cloned()
        .expect("deployments listed");
    assert!(
        deploy["shortNames"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("deploy")))
    );
    let r = s.get("/api/v1").await;
    assert!(
        r.body["resources"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == "pods/status"))
    );

    // OpenAPI v3 root lists group versions; each is served; v2 is not.
    let r = s.get("/openapi/v3").await;
    let url = r.body["paths"]["apis/apps/v1"]["serverRelativeURL"]
        .as_str()
        .expect("apps/v1 openapi url")
        .to_string();
    let r = s.get(&url).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text.contains("io.k8s.api.apps.v1.Deployment"));
    let r = s.get("/openapi/v2").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn first_start_creates_the_system_namespaces_and_the_kubernetes_service() {
    let s = start().await;
    let r = s.get("/api/v1/namespaces").await;
    let names: Vec<&str> = r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|n| n["metadata"]["name"].as_str())
        .collect();
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(names.contains(&ns), "{ns} missing from {names:?}");
    }
    let r = s
        .get("/api/v1/namespaces/default/services/kubernetes")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["spec"]["clusterIP"], "10.96.0.1");
}

#[tokio::test]
async fn crud_round_trip_with_resource_versions_and_conflicts() {
    let s = start().await;
    s.namespace("crud").await;
    let r = s.configmap("crud", "a", json!({"k": "v"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["kind"], "ConfigMap");
    assert!(
        r.body["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() >= 32)
    );
    let first_rv = rv(&r.body);

    // Create again: 409 AlreadyExists.
    let r = s.configmap("crud", "a", json!({})).await;
    assert_status(&r, 409, "AlreadyExists");

    // Get; missing is 404 with Kubernetes' message.
    let r = s.get("/api/v1/namespaces/crud/configmaps/a").await;
    assert_eq!(r.body["data"]["k"], "v");
    assert_eq!(rv(&r.body), first_rv);
    let r = s.get("/api/v1/namespaces/crud/configmaps/nope").await;
    assert_status(&r, 404, "NotFound");
    assert_eq!(r.body["message"], "configmaps \"nope\" not found");

    // PUT with the current resourceVersion succeeds, with a stale one gets 409 Conflict.
    let mut obj = r_body(&s, "/api/v1/namespaces/crud/configmaps/a").await;
    obj["data"]["k"] = json!("v2");
    let r = s.put("/api/v1/namespaces/crud/configmaps/a", &obj).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(rv(&r.body) > first_rv);
    obj["data"]["k"] = json!("stale");
    let r = s.put("/api/v1/namespaces/crud/configmaps/a", &obj).await;
    assert_status(&r, 409, "Conflict");
    // Without a resourceVersion the update is unconditional.
    obj["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("resourceVersion");
    obj["data"]["k"] = json!("v3");
    let r = s.put("/api/v1/namespaces/crud/configmaps/a", &obj).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r_body(&s, "/api/v1/namespaces/crud/configmaps/a").await["data"]["k"],
        "v3"
    );

    // Lists: namespaced and all namespaces, with the list kind and a resourceVersion.
    s.configmap("default", "b", json!({})).await;
    let r = s.get("/api/v1/namespaces/crud/configmaps").await;
    assert_eq!(r.body["kind"], "ConfigMapList");
    assert_eq!(r.body["apiVersion"], "v1");
    assert!(r.body["metadata"]["resourceVersion"].as_str().is_some());
    assert_eq!(r.body["items"].as_array().map(|i| i.len()), Some(1));
    let r = s.get("/api/v1/configmaps").await;
    let names: Vec<&str> = r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert!(names.contains(&"a") && names.contains(&"b"), "{names:?}");

    // Delete, then it is gone.
    let r = s.delete("/api/v1/namespaces/crud/configmaps/a").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = s.get("/api/v1/namespaces/crud/configmaps/a").await;
    assert_status(&r, 404, "NotFound");
    let r = s.delete("/api/v1/namespaces/crud/configmaps/a").await;
    assert_status(&r, 404, "NotFound");
}

async fn r_body(s: &TestServer, path: &str) -> Value {
    let r = s.get(path).await;
    assert_eq!(r.status, StatusCode::OK, "GET {path}: {}", r.text);
    r.body
}

#[tokio::test]
async fn creating_in_a_missing_namespace_is_404_and_kind_is_inferred_without_content_type() {
    let s = start().await;
    let r = s.configmap("ghost", "a", json!({})).await;
    assert_status(&r, 404, "NotFound");
    assert_eq!(r.body["message"], "namespaces \"ghost\" not found");
    // The Python client posts without Content-Type, apiVersion or kind.
    let r = s
        .send(
            s.request(Method::POST, "/api/v1/namespaces/default/configmaps")
                .body(r#"{"metadata":{"name":"bare"},"data":{"x":"y"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["kind"], "ConfigMap");
    assert_eq!(r.body["apiVersion"], "v1");
}

#[tokio::test]
async fn yaml_bodies_are_accepted() {
    let s = start().await;
    let r = s
        .send(
            s.request(Method::POST, "/apis/apps/v1/namespaces/default/deployments")
                .header("Content-Type", "application/yaml")
                .body("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: y\nspec:\n  selector:\n    matchLabels: {app: y}\n  template:\n    metadata:\n      labels: {app: y}\n    spec:\n      containers:\n      - name: c\n        image: i\n"),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(r.body["spec"]["revisionHistoryLimit"], 10);
    assert_eq!(r.body["metadata"]["generation"], 1);
}

#[tokio::test]
async fn concurrent_cas_writers_get_409_and_lose_no_update() {
    let s = std::sync::Arc::new(start().await);
    let r = s.configmap("default", "counter", json!({"n": "0"})).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut conflicts) = (0u32, 0u32);
            while ok < 5 {
                let mut cm = s
                    .get("/api/v1/namespaces/default/configmaps/counter")
                    .await
                    .body;
                let n: u64 = cm["data"]["n"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .expect("n");
                cm["data"]["n"] = json!((n + 1).to_string());
                let r = s
                    .put("/api/v1/namespaces/default/configmaps/counter", &cm)
                    .await;
                match r.status.as_u16() {
                    200 => ok += 1,
                    409 => {
                        assert_status(&r, 409, "Conflict");
                        conflicts += 1
                    }
                    other => panic!("unexpected {other}: {}", r.text),
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.expect("writer");
    }
    let cm = s
        .get("/api/v1/namespaces/default/configmaps/counter")
        .await
        .body;
    assert_eq!(
        cm["data"]["n"], "40",
        "every acknowledged increment is there"
    );
    assert!(
        conflicts > 0,
        "8 writers racing on one object must see some 409s"
    );
}

#[tokio::test]
async fn every_patch_type_applies_and_a_failing_patch_changes_nothing() {
    let s = start().await;
    let r = s
        .post(
            "/apis/apps/v1/namespaces/default/deployments",
            &json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web","labels":{"app":"web"}},
                "spec":{"replicas":1,"selector":{"matchLabels":{"app":"web"}},"template":{"metadata":{"labels":{"app":"web"}},
                "spec":{"containers":[{"name":"web","image":"a:1","env":[{"name":"A","value":"1"},{"name":"B","value":"2"}]},{"name":"side","image":"s:1"}]}}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let path = "/apis/apps/v1/namespaces/default/deployments/web";

    // Strategic: merge containers by name, delete one env entry, drop the sidecar.
    let r = s
        .patch(path, "application/strategic-merge-patch+json",
            r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"a:2","env":[{"$patch":"delete","name":"A"},{"name":"C","value":"3"}]},{"$patch":"delete","name":"side"}]}}}}"#)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let c = &r.body["spec"]["template"]["spec"]["containers"];
    assert_eq!(c.as_array().map(|a| a.len()), Some(1));
    assert_eq!(c[0]["image"], "a:2");
    // (Kubernetes' SMP puts patch elements first when no $setElementOrder is given.)
    let mut env: Vec<&str> = c[0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    env.sort();
    assert_eq!(env, vec!["B", "C"], "A deleted, B kept, C added");
    assert_eq!(r.body["metadata"]["generation"], 2);

    // Merge.
    let r = s
        .patch(
            path,
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"tier":"fe","app":null}}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["metadata"]["labels"], json!({"tier":"fe"}));
    assert_eq!(
        r.body["metadata"]["generation"], 2,
        "metadata changes do not bump generation"
    );

    // JSON patch.
    let r = s
        .patch(
            path,
            "application/json-patch+json",
            r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["spec"]["replicas"], 4);
    let before = s.get(path).await.body;

    // A JSON patch that does not apply: 422, nothing changes.
    let r = s
        .patch(
            path,
            "application/json-patch+json",
            r#"[{"op":"replace","path":"/spec/nothere/x","value":1}]"#,
        )
        .await;
    assert_eq!(r.status.as_u16(), 422, "{}", r.text);
    assert_eq!(r.body["kind"], "Status");
    // Malformed patch JSON: 400.
    let r = s
        .patch(path, "application/merge-patch+json", "{not json")
        .await;
    assert_status(&r, 400, "BadRequest");
    // Unsupported patch media type: 415.
    let r = s
        .patch(path, "application/vnd.kubernetes.protobuf", "x")
        .await;
    assert_status(&r, 415, "UnsupportedMediaType");
    assert_eq!(
        s.get(path).await.body,
        before,
        "failed patches changed nothing"
    );

    // Patch of a missing object: 404.
    let r = s
        .patch(
            "/apis/apps/v1/namespaces/default/deployments/none",
            "application/merge-patch+json",
            "{}",
        )
        .await;
    assert_status(&r, 404, "NotFound");

    // Server-side apply creates, then merges.
    let r = s
        .send(
            s.request(
                Method::PATCH,
                "/api/v1/namespaces/default/configmaps/ssa?fieldManager=test",
            )
            .header("Content-Type", "application/apply-patch+yaml")
            .body("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  a: \"1\"\n"),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let r = s
        .send(
            s.request(
                Method::PATCH,
                "/api/v1/namespaces/default/configmaps/ssa?fieldManager=test",
            )
            .header("Content-Type", "application/apply-patch+yaml")
            .body("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\ndata:\n  b: \"2\"\n"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["data"]["b"], "2");
}

#[tokio::test]
async fn dry_run_persists_nothing() {
    let s = start().await;
    let r = s
        .send(
            s.request(Method::POST, "/api/v1/namespaces/default/configmaps?dryRun=All")
                .json(&json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"dry"},"data":{"a":"1"}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["data"]["a"], "1");
    assert_status(
        &s.get("/api/v1/namespaces/default/configmaps/dry").await,
        404,
        "NotFound",
    );

    s.configmap("default", "wet", json!({"a": "1"})).await;
    let before = s
        .get("/api/v1/namespaces/default/configmaps/wet")
        .await
        .body;
    let r = s
        .send(
            s.request(
                Method::PATCH,
                "/api/v1/namespaces/default/configmaps/wet?dryRun=All",
            )
            .header("Content-Type", "application/merge-patch+json")
            .body(r#"{"data":{"a":"2"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["data"]["a"], "2",
        "the dry-run answer shows the change"
    );
    let r = s
        .send(s.request(
            Method::DELETE,
            "/api/v1/namespaces/default/configmaps/wet?dryRun=All",
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        s.get("/api/v1/namespaces/default/configmaps/wet")
            .await
            .body,
        before
    );
}

#[tokio::test]
async fn field_validation_strict_refuses_unknown_fields_and_warn_warns() {
    let s = start().await;
    let body =
        json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"v"},"datta":{"x":"y"}});
    let r = s
        .send(
            s.request(
                Method::POST,
                "/api/v1/namespaces/default/configmaps?fieldValidation=Strict",
            )
            .json(&body),
        )
        .await;
    assert_status(&r, 400, "BadRequest");
    assert!(r.text.contains("datta"), "{}", r.text);
    assert_status(
        &s.get("/api/v1/namespaces/default/configmaps/v").await,
        404,
        "NotFound",
    );

    let r = s
        .send(
            s.request(
                Method::POST,
                "/api/v1/namespaces/default/configmaps?fieldValidation=Warn",
            )
            .json(&body),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let warning = r
        .headers
        .get("warning")
        .and_then(|w| w.to_str().ok())
        .unwrap_or("");
    assert!(
        warning.starts_with("299 - \"") && warning.contains("datta"),
        "warning header: {warning:?}"
    );
    assert!(r.body.get("datta").is_none(), "unknown fields are dropped");
}

#[tokio::test]
async fn malformed_bodies_get_400_and_change_nothing() {
    let s = start().await;
    let before = s.get("/api/v1/namespaces/default/configmaps").await.body["items"].clone();
    for (ct, body) in [
        ("application/json", "{\"metadata\": "),
        ("application/json", "[1,2,3]"),
        ("application/yaml", "metadata: [unclosed"),
        (
            "application/json",
            "{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{\"name\":\"Bad_Name\"}}",
        ),
    ] {
        let r = s
            .send(
                s.request(Method::POST, "/api/v1/namespaces/default/configmaps")
                    .header("Content-Type", ct)
                    .body(body),
            )
            .await;
        assert!(
            matches!(r.status.as_u16(), 400 | 422),
            "{body}: {} {}",
            r.status,
            r.text
        );
        assert_eq!(r.body["kind"], "Status", "{}", r.text);
    }
    let r = s
        .send(
            s.request(Method::POST, "/api/v1/namespaces/default/configmaps")
                .header("Content-Type", "application/vnd.kubernetes.protobuf")
                .body("k8s\0junk"),
        )
        .await;
    // Protobuf is decoded (for the kinds kubectl sends it for): junk after the magic is a 400.
    assert_status(&r, 400, "BadRequest");
    let after = s.get("/api/v1/namespaces/default/configmaps").await.body["items"].clone();
    assert_eq!(before, after);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let s = start().await;
    let big = "x".repeat(4 * 1024 * 1024);
    let r = s
        .post(
            "/api/v1/namespaces/default/configmaps",
            &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"big"},"data":{"x":big}}),
        )
        .await;
    assert_status(&r, 413, "RequestEntityTooLarge");
    assert_status(
        &s.get("/api/v1/namespaces/default/configmaps/big").await,
        404,
        "NotFound",
    );
}

#[tokio::test]
async fn unknown_resources_are_404_and_wrong_methods_405() {
    let s = start().await;
    let r = s.get("/api/v1/namespaces/default/widgets").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["kind"], "Status");
    let r = s.get("/apis/nope.example.com/v1/things").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = s
        .send(s.request(Method::PUT, "/api/v1/namespaces/default/configmaps"))
        .await;
    assert_status(&r, 405, "MethodNotAllowed");
}

#[tokio::test]
async fn label_and_field_selectors_really_filter() {
    let s = start().await;
    for (name, labels) in [
        ("a", json!({"app":"web","tier":"fe"})),
        ("b", json!({"app":"web"})),
        ("c", json!({"app":"db"})),
    ] {
        let r = s
            .post(
                "/api/v1/namespaces/default/configmaps",
                &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":name,"labels":labels}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let names = |r: &Reply| -> Vec<String> {
        r.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    let base = "/api/v1/namespaces/default/configmaps";
    assert_eq!(
        names(&s.get(&format!("{base}?labelSelector=app%3Dweb")).await),
        vec!["a", "b"]
    );
    assert_eq!(
        names(&s.get(&format!("{base}?labelSelector=app%3Dweb,tier")).await),
        vec!["a"]
    );
    assert_eq!(
        names(
            &s.get(&format!("{base}?labelSelector=app%20in%20(db)"))
                .await
        ),
        vec!["c"]
    );
    assert_eq!(
        names(&s.get(&format!("{base}?labelSelector=!tier")).await),
        vec!["b", "c"]
    );
    assert_eq!(
        names(
            &s.get(&format!(
                "{base}?&labelSelector=&fieldSelector=metadata.name%3Db"
            ))
            .await
        ),
        vec!["b"]
    );
    assert_eq!(
        names(
            &s.get(&format!("{base}?fieldSelector=metadata.name!%3Db"))
                .await
        ),
        vec!["a", "c"]
    );
    let r = s
        .get(&format!("{base}?fieldSelector=spec.nodeName%3Dx"))
        .await;
    assert_status(&r, 400, "BadRequest");
    assert!(
        r.text.contains("field label not supported: spec.nodeName"),
        "{}",
        r.text
    );
    let r = s.get(&format!("{base}?labelSelector=%3D%3D%3D")).await;
    assert_status(&r, 400, "BadRequest");

    // Pods: spec.nodeName and status.phase.
    for (name, node) in [("p1", "n1"), ("p2", "n2")] {
        let r = s
            .post(
                "/api/v1/namespaces/default/pods",
                &json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":name},"spec":{"nodeName":node,"containers":[{"name":"c","image":"i"}]}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    assert_eq!(
        names(&s.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dn2").await),
        vec!["p2"]
    );
    assert_eq!(
        names(
            &s.get("/api/v1/pods?fieldSelector=status.phase!%3DSucceeded,spec.nodeName%3Dn1")
                .await
        ),
        vec!["p1"]
    );
}

#[tokio::test]
async fn lists_paginate_with_limit_and_continue() {
    let s = start().await;
    for i in 0..7 {
        s.configmap("default", &format!("cm-{i}"), json!({})).await;
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/namespaces/default/configmaps?limit=3".to_string();
    for _ in 0..10 {
        let r = s.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let items = r.body["items"].as_array().expect("items");
        assert!(items.len() <= 3);
        seen.extend(
            items
                .iter()
                .filter_map(|i| i["metadata"]["name"].as_str().map(String::from)),
        );
        match r.body["metadata"]["continue"].as_str() {
            Some(c) if !c.is_empty() => {
                path = format!(
                    "/api/v1/namespaces/default/configmaps?limit=3&continue={}",
                    urlencode(c)
                )
            }
            _ => break,
        }
    }
    let expected: Vec<String> = (0..7).map(|i| format!("cm-{i}")).collect();
    let cms: Vec<String> = seen.into_iter().filter(|n| n.starts_with("cm-")).collect();
    assert_eq!(cms, expected);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn pods_come_back_as_tables_when_asked() {
    let s = start().await;
    let r = s
        .post(
            "/api/v1/namespaces/default/pods",
            &json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"tp"},"spec":{"containers":[{"name":"c","image":"i"}]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
    let r = s
        .send(
            s.request(Method::GET, "/api/v1/namespaces/default/pods?limit=500")
                .header("Accept", accept),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["kind"], "Table");
    assert_eq!(r.body["apiVersion"], "meta.k8s.io/v1");
    let cols: Vec<&str> = r.body["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for c in ["Name", "Ready", "Status", "Restarts", "Age"] {
        assert!(cols.contains(&c), "{cols:?}");
    }
    let rows = r.body["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["cells"][0], "tp");
    assert_eq!(rows[0]["object"]["kind"], "PartialObjectMetadata");
    let r = s
        .send(
            s.request(
                Method::GET,
                "/api/v1/namespaces/default/pods/tp?includeObject=Object",
            )
            .header("Accept", accept),
        )
        .await;
    assert_eq!(r.body["rows"][0]["object"]["kind"], "Pod");
    // Protobuf asked: JSON answered.
    let r = s
        .send(
            s.request(Method::GET, "/api/v1/namespaces/default/pods/tp")
                .header(
                    "Accept",
                    "application/vnd.kubernetes.protobuf,application/json",
                ),
        )
        .await;
    assert_eq!(r.body["kind"], "Pod");
}

#[tokio::test]
async fn finalizers_make_deletion_wait() {
    let s = start().await;
    let r = s
        .post(
            "/api/v1/namespaces/default/configmaps",
            &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"fin","finalizers":["example.com/hold"]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = s.delete("/api/v1/namespaces/default/configmaps/fin").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.body["metadata"]["deletionTimestamp"].as_str().is_some(),
        "{}",
        r.text
    );
    let mut obj = s
        .get("/api/v1/namespaces/default/configmaps/fin")
        .await
        .body;
    assert!(obj["metadata"]["deletionTimestamp"].as_str().is_some());
    obj["metadata"]["finalizers"] = json!([]);
    let r = s
        .put("/api/v1/namespaces/default/configmaps/fin", &obj)
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    assert_status(
        &s.get("/api/v1/namespaces/default/configmaps/fin").await,
        404,
        "NotFound",
    );
}

#[tokio::test]
async fn namespace_deletion_empties_it_then_removes_it() {
    let s = start().await;
    s.namespace("doomed").await;
    for i in 0..3 {
        assert_eq!(
            s.configmap("doomed", &format!("c{i}"), json!({}))
                .await
                .status,
            StatusCode::CREATED
        );
    }
    // One object holds a finalizer, so the namespace must stay Terminating until it is released.
    let r = s
        .post(
            "/api/v1/namespaces/doomed/configmaps",
            &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"held","finalizers":["example.com/hold"]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = s.delete("/api/v1/namespaces/doomed").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let ns = s.get("/api/v1/namespaces/doomed").await;
    assert_eq!(ns.status, StatusCode::OK, "{}", ns.text);
    assert_eq!(ns.body["status"]["phase"], "Terminating");
    assert!(ns.body["metadata"]["deletionTimestamp"].as_str().is_some());
    let r = s.configmap("doomed", "late", json!({})).await;
    assert_status(&r, 403, "Forbidden");
    assert!(
        r.text.contains(
            "unable to create new content in namespace doomed because it is being terminated"
        ),
        "{}",
        r.text
    );
    // The unheld objects go; the held one waits with a deletionTimestamp.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let items = s.get("/api/v1/namespaces/doomed/configmaps").await.body["items"].clone();
        let names: Vec<&str> = items
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str())
            .collect();
        if names == ["held"] {
            assert!(
                items[0]["metadata"]["deletionTimestamp"].as_str().is_some(),
                "{items}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "namespace not emptied: {names:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        s.get("/api/v1/namespaces/doomed").await.status,
        StatusCode::OK,
        "still held"
    );
    // Release the finalizer: the object, then the namespace, go.
    let r = s
        .patch(
            "/api/v1/namespaces/doomed/configmaps/held",
            "application/merge-patch+json",
            r#"{"metadata":{"finalizers":null}}"#,
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = s.get("/api/v1/namespaces/doomed").await;
        if r.status == StatusCode::NOT_FOUND {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "namespace still there: {}",
            r.text
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let r = s.get("/api/v1/namespaces/doomed/configmaps").await;
    assert_eq!(
        r.body["items"].as_array().map(|i| i.len()),
        Some(0),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn deletecollection_by_label() {
    let s = start().await;
    for (name, app) in [("x1", "x"), ("x2", "x"), ("y1", "y")] {
        s.post(
            "/api/v1/namespaces/default/configmaps",
            &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":name,"labels":{"app":app}}}),
        )
        .await;
    }
    let r = s
        .delete("/api/v1/namespaces/default/configmaps?labelSelector=app%3Dx")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let left: Vec<String> = s.get("/api/v1/namespaces/default/configmaps").await.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
        .filter(|n| n.starts_with('x') || n.starts_with('y'))
        .collect();
    assert_eq!(left, vec!["y1"]);
}

#[tokio::test]
async fn status_scale_and_binding_subresources() {
    let s = start().await;
    let r = s
        .post(
            "/apis/apps/v1/namespaces/default/deployments",
            &json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"sc"},
                "spec":{"replicas":2,"selector":{"matchLabels":{"app":"sc"}},"template":{"metadata":{"labels":{"app":"sc"}},"spec":{"containers":[{"name":"c","image":"i"}]}}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let scale = s
        .get("/apis/apps/v1/namespaces/default/deployments/sc/scale")
        .await;
    assert_eq!(scale.body["kind"], "Scale");
    assert_eq!(scale.body["apiVersion"], "autoscaling/v1");
    assert_eq!(scale.body["spec"]["replicas"], 2);
    assert_eq!(scale.body["status"]["selector"], "app=sc");
    let r = s
        .patch(
            "/apis/apps/v1/namespaces/default/deployments/sc/scale",
            "application/merge-patch+json",
            r#"{"spec":{"replicas":5}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["spec"]["replicas"], 5);
    assert_eq!(
        s.get("/apis/apps/v1/namespaces/default/deployments/sc")
            .await
            .body["spec"]["replicas"],
        5
    );

    // Status: a status write changes status only; a main write leaves status alone.
    let r = s
        .patch(
            "/apis/apps/v1/namespaces/default/deployments/sc/status",
            "application/merge-patch+json",
            r#"{"status":{"replicas":5,"readyReplicas":3},"spec":{"replicas":9}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let d = s
        .get("/apis/apps/v1/namespaces/default/deployments/sc")
        .await
        .body;
    assert_eq!(d["status"]["readyReplicas"], 3);
    assert_eq!(
        d["spec"]["replicas"], 5,
        "the status subresource does not change spec"
    );

    // Binding.
    let r = s
        .post("/api/v1/namespaces/default/pods",
            &json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"b"},"spec":{"containers":[{"name":"c","image":"i"}]}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let binding = json!({"apiVersion":"v1","kind":"Binding","metadata":{"name":"b"},"target":{"apiVersion":"v1","kind":"Node","name":"node-1"}});
    let r = s
        .post("/api/v1/namespaces/default/pods/b/binding", &binding)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(
        s.get("/api/v1/namespaces/default/pods/b").await.body["spec"]["nodeName"],
        "node-1"
    );
    let r = s
        .post("/api/v1/namespaces/default/pods/b/binding", &binding)
        .await;
    assert_status(&r, 409, "Conflict");

    // Logs go to the node's agent: with no such Node registered, the node is not found.
    let r = s.get("/api/v1/namespaces/default/pods/b/log").await;
    assert_status(&r, 404, "NotFound");
    assert!(r.text.contains("node-1"), "{}", r.text);
    let r = s.get("/api/v1/namespaces/default/pods/b/log?container=nope").await;
    assert_status(&r, 400, "BadRequest");
    assert!(r.text.contains("container nope is not valid for pod b"), "{}", r.text);
    let r = s.get("/api/v1/namespaces/default/pods/none/log").await;
    assert_status(&r, 404, "NotFound");
}

#[tokio::test]
async fn pods_without_a_node_go_at_once() {
    let s = start().await;
    let r = s
        .post("/api/v1/namespaces/default/pods",
            &json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"u"},"spec":{"containers":[{"name":"c","image":"i"}]}}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = s.delete("/api/v1/namespaces/default/pods/u").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_status(
        &s.get("/api/v1/namespaces/default/pods/u").await,
        404,
        "NotFound",
    );
}

#[tokio::test]
async fn bodies_that_contradict_the_url_are_refused() {
    let s = start().await;
    s.namespace("other").await;
    // Namespace in the body differs from the path.
    let r = s
        .post(
            "/api/v1/namespaces/default/configmaps",
            &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x","namespace":"other"}}),
        )
        .await;
    assert_status(&r, 400, "BadRequest");
    // Kind of another resource.
    let r = s
        .post(
            "/api/v1/namespaces/default/configmaps",
            &json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"x"}}),
        )
        .await;
    assert_status(&r, 400, "BadRequest");
    // PUT whose body names another object.
    s.configmap("default", "x1", json!({})).await;
    let r = s
        .put(
            "/api/v1/namespaces/default/configmaps/x1",
            &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x2"}}),
        )
        .await;
    assert_status(&r, 400, "BadRequest");
    // PUT of something that does not exist.
    let r = s
        .put(
            "/api/v1/namespaces/default/configmaps/ghost",
            &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ghost"}}),
        )
        .await;
    assert_status(&r, 404, "NotFound");
    for name in ["x", "x2", "ghost"] {
        for ns in ["default", "other"] {
            assert_status(
                &s.get(&format!("/api/v1/namespaces/{ns}/configmaps/{name}"))
                    .await,
                404,
                "NotFound",
            );
        }
    }
}

#[tokio::test]
async fn limit_counts_only_selected_items_and_pages_survive_deletions() {
    let s = start().await;
    for i in 0..6 {
        let app = if i % 2 == 0 { "even" } else { "odd" };
        s.post(
            "/api/v1/namespaces/default/configmaps",
            &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":format!("p{i}"),"labels":{"app":app}}}),
        )
        .await;
    }
    let r = s
        .get("/api/v1/namespaces/default/configmaps?labelSelector=app%3Deven&limit=2")
        .await;
    let names = |r: &Reply| -> Vec<String> {
        r.body["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(names(&r), vec!["p0", "p2"]);
    let token = r.body["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    // An object of the first page goes away between pages: the next page is still right.
    s.delete("/api/v1/namespaces/default/configmaps/p0").await;
    let r = s
        .get(&format!(
            "/api/v1/namespaces/default/configmaps?labelSelector=app%3Deven&limit=2&continue={}",
            urlencode(&token)
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(names(&r), vec!["p4"]);
    assert!(
        r.body["metadata"]["continue"]
            .as_str()
            .is_none_or(str::is_empty),
        "last page: {}",
        r.text
    );
    // A token that was never issued is a 400, not a crash or an empty list.
    let r = s
        .get("/api/v1/namespaces/default/configmaps?limit=2&continue=garbage!!")
        .await;
    assert!(matches!(r.status.as_u16(), 400 | 410), "{}", r.text);
    assert_eq!(r.body["kind"], "Status");
}

/// Column names (upper-cased, as kubectl prints them) and whether each shows only with -o wide.
async fn table_columns(s: &TestServer, path: &str) -> (Vec<(String, bool)>, Value) {
    let accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    let r = s
        .send(s.request(Method::GET, path).header("Accept", accept))
        .await;
    assert_eq!(r.body["kind"], "Table", "{path}: {}", r.text);
    let cols = r.body["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_uppercase(),
                c["priority"].as_i64().unwrap_or(0) > 0,
            )
        })
        .collect();
    (cols, r.body["rows"].clone())
}

#[tokio::test]
async fn tables_have_the_columns_kubectl_users_know() {
    let s = start().await;
    s.post(
        "/apis/apps/v1/namespaces/default/deployments",
        &json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"},
            "spec":{"replicas":3,"selector":{"matchLabels":{"app":"d"}},"template":{"metadata":{"labels":{"app":"d"}},"spec":{"containers":[{"name":"c","image":"img:1"}]}}}}),
    )
    .await;
    s.post(
        "/api/v1/namespaces/default/services",
        &json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"svc"},
            "spec":{"selector":{"app":"d"},"ports":[{"name":"http","port":80},{"name":"dns","port":53,"protocol":"UDP"}]}}),
    )
    .await;
    s.post(
        "/api/v1/namespaces/default/pods",
        &json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"pw"},
            "spec":{"nodeName":"node-a","containers":[{"name":"c","image":"i"},{"name":"d","image":"i"}]},
            "status":{"phase":"Running","podIP":"10.244.0.5"}}),
    )
    .await;

    let has = |cols: &[(String, bool)], name: &str, wide: bool| {
        cols.iter().any(|(n, w)| n == name && *w == wide)
    };
    let (cols, rows) = table_columns(&s, "/apis/apps/v1/namespaces/default/deployments").await;
    for c in ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"] {
        assert!(has(&cols, c, false), "deployments lack {c}: {cols:?}");
    }
    for c in ["CONTAINERS", "IMAGES", "SELECTOR"] {
        assert!(
            has(&cols, c, true),
            "deployments -o wide lacks {c}: {cols:?}"
        );
    }
    assert_eq!(rows[0]["cells"][1], "0/3", "{rows}");

    let (cols, rows) = table_columns(&s, "/api/v1/namespaces/default/services/svc").await;
    for c in [
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
    ] {
        assert!(has(&cols, c, false), "services lack {c}: {cols:?}");
    }
    assert!(has(&cols, "SELECTOR", true), "{cols:?}");
    let cells: Vec<String> = rows[0]["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| {
            c.as_str()
                .map(String::from)
                .unwrap_or_else(|| c.to_string())
        })
        .collect();
    assert!(cells.contains(&"80/TCP,53/UDP".to_string()), "{cells:?}");
    assert!(cells.contains(&"ClusterIP".to_string()), "{cells:?}");

    let (cols, _) = table_columns(&s, "/api/v1/namespaces/default/pods").await;
    for c in ["NAME", "READY", "STATUS", "RESTARTS", "AGE"] {
        assert!(has(&cols, c, false), "pods lack {c}: {cols:?}");
    }
    for c in ["IP", "NODE"] {
        assert!(has(&cols, c, true), "pods -o wide lacks {c}: {cols:?}");
    }
}
