//! Kubernetes semantics clients rely on: graceful deletion of bound pods, delete options,
//! preconditions in patches, field validation on every write verb, Secret defaulting, kind-specific
//! field selectors, the scale subresource written with PUT.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn a_bound_pod_is_marked_then_reaped_after_its_grace_period() {
    let s = start().await;
    let r = s
        .post(
            "/api/v1/namespaces/default/pods",
            &json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"bound"},
                "spec":{"nodeName":"n1","terminationGracePeriodSeconds":2,"containers":[{"name":"c","image":"i"}]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // A watch on just this pod, as `kubectl delete --wait` opens one.
    let rv0 = rv(&r.body);
    let mut w = WatchReader::open(
        &s,
        &format!("/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv0}&fieldSelector=metadata.name%3Dbound"),
    )
    .await;
    let r = s
        .send(
            s.request(Method::DELETE, "/api/v1/namespaces/default/pods/bound")
                .json(&json!({"kind":"DeleteOptions","apiVersion":"v1","propagationPolicy":"Background"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.body["metadata"]["deletionTimestamp"].as_str().is_some(),
        "a bound pod is marked first: {}",
        r.text
    );
    assert_eq!(r.body["metadata"]["deletionGracePeriodSeconds"], 2);
    let still = s.get("/api/v1/namespaces/default/pods/bound").await;
    assert_eq!(
        still.status,
        StatusCode::OK,
        "not gone before its grace period"
    );
    let events = w
        .until(Duration::from_secs(20), |e| e["type"] == "DELETED")
        .await;
    assert_eq!(
        events.first().map(|e| e["type"].clone()),
        Some(json!("MODIFIED")),
        "{events:?}"
    );
    assert_status(
        &s.get("/api/v1/namespaces/default/pods/bound").await,
        404,
        "NotFound",
    );
}

#[tokio::test]
async fn grace_period_zero_deletes_a_bound_pod_at_once() {
    let s = start().await;
    s.post(
        "/api/v1/namespaces/default/pods",
        &json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"now"},"spec":{"nodeName":"n1","containers":[{"name":"c","image":"i"}]}}),
    )
    .await;
    let r = s
        .delete("/api/v1/namespaces/default/pods/now?gracePeriodSeconds=0")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // The reaper may need one tick; it must not wait for the default 30 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.get("/api/v1/namespaces/default/pods/now").await.status != StatusCode::NOT_FOUND {
        assert!(
            std::time::Instant::now() < deadline,
            "pod with gracePeriodSeconds=0 still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_patch_carrying_a_stale_resource_version_is_a_conflict() {
    let s = start().await;
    let r = s.configmap("default", "pre", json!({"a": "1"})).await;
    let old_rv = rv(&r.body);
    s.patch(
        "/api/v1/namespaces/default/configmaps/pre",
        "application/merge-patch+json",
        r#"{"data":{"a":"2"}}"#,
    )
    .await;
    let r = s
        .patch(
            "/api/v1/namespaces/default/configmaps/pre",
            "application/merge-patch+json",
            &format!(r#"{{"metadata":{{"resourceVersion":"{old_rv}"}},"data":{{"a":"3"}}}}"#),
        )
        .await;
    assert_status(&r, 409, "Conflict");
    assert_eq!(
        s.get("/api/v1/namespaces/default/configmaps/pre")
            .await
            .body["data"]["a"],
        "2"
    );
}

#[tokio::test]
async fn field_validation_applies_to_updates_and_patches_too() {
    let s = start().await;
    s.configmap("default", "fv", json!({"a": "1"})).await;
    let path = "/api/v1/namespaces/default/configmaps/fv";
    let r = s
        .send(
            s.request(Method::PATCH, &format!("{path}?fieldValidation=Strict"))
                .header("Content-Type", "application/merge-patch+json")
                .body(r#"{"bogus":1}"#),
        )
        .await;
    assert_status(&r, 400, "BadRequest");
    assert!(r.text.contains("bogus"), "{}", r.text);
    let r = s
        .send(
            s.request(Method::PATCH, &format!("{path}?fieldValidation=Warn"))
                .header("Content-Type", "application/merge-patch+json")
                .body(r#"{"bogus":1,"data":{"a":"2"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        r.headers
            .get("warning")
            .and_then(|w| w.to_str().ok())
            .is_some_and(|w| w.contains("bogus"))
    );
    let r = s
        .send(
            s.request(Method::PATCH, &format!("{path}?fieldValidation=Ignore"))
                .header("Content-Type", "application/merge-patch+json")
                .body(r#"{"bogus":1,"data":{"a":"3"}}"#),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.headers.get("warning").is_none(), "Ignore does not warn");
    let mut obj = s.get(path).await.body;
    assert_eq!(obj["data"]["a"], "3");
    assert!(obj.get("bogus").is_none());
    obj["bogus"] = json!(true);
    let r = s
        .send(
            s.request(Method::PUT, &format!("{path}?fieldValidation=Strict"))
                .json(&obj),
        )
        .await;
    assert_status(&r, 400, "BadRequest");
}

#[tokio::test]
async fn secrets_turn_string_data_into_data_and_select_by_type() {
    let s = start().await;
    let r = s
        .post(
            "/api/v1/namespaces/default/secrets",
            &json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"s1"},"stringData":{"password":"s3cret"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["data"]["password"], "czNjcmV0");
    assert!(r.body.get("stringData").is_none());
    assert_eq!(r.body["type"], "Opaque");
    s.post(
        "/api/v1/namespaces/default/secrets",
        &json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"s2"},"type":"kubernetes.io/tls",
            "data":{"tls.crt":"eA==","tls.key":"eA=="}}),
    )
    .await;
    let r = s
        .get("/api/v1/namespaces/default/secrets?fieldSelector=type%3Dkubernetes.io%2Ftls")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let names: Vec<&str> = r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, vec!["s2"]);
}

#[tokio::test]
async fn events_select_by_involved_object() {
    let s = start().await;
    for (name, obj) in [("e1", "web"), ("e2", "db")] {
        let r = s
            .post(
                "/api/v1/namespaces/default/events",
                &json!({"apiVersion":"v1","kind":"Event","metadata":{"name":name},
                    "involvedObject":{"kind":"Pod","name":obj,"namespace":"default"},"reason":"Test","message":"m","type":"Normal"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let r = s
        .get("/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dweb,involvedObject.kind%3DPod")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let names: Vec<&str> = r.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, vec!["e1"]);
}

#[tokio::test]
async fn scale_put_takes_a_scale_object_and_checks_its_resource_version() {
    let s = start().await;
    let r = s
        .post(
            "/apis/apps/v1/namespaces/default/replicasets",
            &json!({"apiVersion":"apps/v1","kind":"ReplicaSet","metadata":{"name":"rs"},
                "spec":{"replicas":1,"selector":{"matchLabels":{"app":"rs","tier":"x"}},"template":{"metadata":{"labels":{"app":"rs","tier":"x"}},"spec":{"containers":[{"name":"c","image":"i"}]}}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let path = "/apis/apps/v1/namespaces/default/replicasets/rs/scale";
    let mut scale = s.get(path).await.body;
    assert_eq!(scale["status"]["selector"], "app=rs,tier=x");
    scale["spec"]["replicas"] = json!(3);
    let r = s.put(path, &scale).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["spec"]["replicas"], 3);
    // The same (now stale) Scale again: 409.
    scale["spec"]["replicas"] = json!(7);
    assert_status(&s.put(path, &scale).await, 409, "Conflict");
    let rs = s
        .get("/apis/apps/v1/namespaces/default/replicasets/rs")
        .await
        .body;
    assert_eq!(rs["spec"]["replicas"], 3);
}

#[tokio::test]
async fn generate_name_makes_unique_names() {
    let s = start().await;
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let r = s
            .post(
                "/api/v1/namespaces/default/configmaps",
                &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"generateName":"gen-"}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let name = r.body["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        assert!(name.starts_with("gen-") && name.len() > 4, "{name}");
        names.insert(name);
    }
    assert_eq!(names.len(), 3);
}

#[tokio::test]
async fn immutable_fields_refuse_changes_and_keep_the_object() {
    let s = start().await;
    let r = s
        .post(
            "/apis/apps/v1/namespaces/default/deployments",
            &json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"imm"},
                "spec":{"selector":{"matchLabels":{"app":"imm"}},"template":{"metadata":{"labels":{"app":"imm","v":"1"}},"spec":{"containers":[{"name":"c","image":"i"}]}}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = s
        .patch(
            "/apis/apps/v1/namespaces/default/deployments/imm",
            "application/merge-patch+json",
            r#"{"spec":{"selector":{"matchLabels":{"app":"imm","v":"1"}}}}"#,
        )
        .await;
    assert_status(&r, 422, "Invalid");
    let d = s
        .get("/apis/apps/v1/namespaces/default/deployments/imm")
        .await
        .body;
    assert_eq!(d["spec"]["selector"]["matchLabels"], json!({"app":"imm"}));

    let r = s
        .post(
            "/api/v1/namespaces/default/configmaps",
            &json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"frozen"},"immutable":true,"data":{"a":"1"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = s
        .patch(
            "/api/v1/namespaces/default/configmaps/frozen",
            "application/merge-patch+json",
            r#"{"data":{"a":"2"}}"#,
        )
        .await;
    assert_status(&r, 422, "Invalid");
    assert_eq!(
        s.get("/api/v1/namespaces/default/configmaps/frozen")
            .await
            .body["data"]["a"],
        "1"
    );
    // Labels of an immutable ConfigMap may still change.
    let r = s
        .patch(
            "/api/v1/namespaces/default/configmaps/frozen",
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"x":"y"}}}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

/// Patches without a resourceVersion are not preconditions: when they race each other (or a
/// controller writing status), the server re-reads and re-applies them, as Kubernetes does, and
/// every one lands. (A 409 here once broke the Python client while a controller was running.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_without_resource_version_all_land() {
    let s = std::sync::Arc::new(start().await);
    s.configmap("default", "busy", json!({})).await;
    let mut tasks = Vec::new();
    for w in 0..6 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            for n in 0..10 {
                let r = s
                    .patch(
                        "/api/v1/namespaces/default/configmaps/busy",
                        "application/merge-patch+json",
                        &format!(r#"{{"data":{{"w{w}-{n}":"x"}}}}"#),
                    )
                    .await;
                codes.push(r.status);
            }
            codes
        }));
    }
    for t in tasks {
        for code in t.await.expect("patch task") {
            assert_eq!(
                code,
                StatusCode::OK,
                "a patch without resourceVersion must not conflict"
            );
        }
    }
    let data = s
        .get("/api/v1/namespaces/default/configmaps/busy")
        .await
        .body["data"]
        .clone();
    assert_eq!(
        data.as_object().map(|m| m.len()),
        Some(60),
        "every patch landed: {data}"
    );
}
