//! ResourceQuota admission (403 with Kubernetes' message, charging status.used so back-to-back
//! creates cannot overshoot) and delete propagation policies (Foreground/Orphan leave the object
//! with its finalizer and a deletionTimestamp for the garbage collector; Background removes it).

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn pod(name: &str, cpu: &str) -> Value {
    json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":name},
        "spec":{"containers":[{"name":"c","image":"i","resources":{"requests":{"cpu":cpu}}}]}})
}

#[tokio::test]
async fn quota_refuses_what_would_exceed_it_and_charges_what_fits() {
    let s = start().await;
    s.namespace("team").await;
    let r = s
        .post(
            "/api/v1/namespaces/team/resourcequotas",
            &json!({"apiVersion":"v1","kind":"ResourceQuota","metadata":{"name":"compute"},
                "spec":{"hard":{"pods":"2","requests.cpu":"1"}}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // No status yet (the controller has not run): Kubernetes refuses too.
    let r = s.post("/api/v1/namespaces/team/pods", &pod("early", "100m")).await;
    assert_status(&r, 403, "Forbidden");
    assert!(r.body["message"].as_str().unwrap().contains("status unknown for quota: compute"), "{}", r.text);
    // As the controller would: used = 0.
    let mut q = s.get("/api/v1/namespaces/team/resourcequotas/compute").await.body;
    q["status"] = json!({"hard":{"pods":"2","requests.cpu":"1"},"used":{"pods":"0","requests.cpu":"0"}});
    let r = s.put("/api/v1/namespaces/team/resourcequotas/compute/status", &q).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let r = s.post("/api/v1/namespaces/team/pods", &pod("a", "600m")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let used = s.get("/api/v1/namespaces/team/resourcequotas/compute").await.body["status"]["used"].clone();
    assert_eq!(used, json!({"pods":"1","requests.cpu":"600m"}), "charged at admission");
    let r = s.post("/api/v1/namespaces/team/pods", &pod("b", "500m")).await;
    assert_status(&r, 403, "Forbidden");
    assert_eq!(
        r.body["message"],
        "pods \"b\" is forbidden: exceeded quota: compute, requested: requests.cpu=500m, used: requests.cpu=600m, limited: requests.cpu=1"
    );
    assert_eq!(s.get("/api/v1/namespaces/team/pods/b").await.status, StatusCode::NOT_FOUND);
    // A dry run is checked but not charged.
    let r = s
        .send(s.request(Method::POST, "/api/v1/namespaces/team/pods?dryRun=All").json(&pod("c", "400m")))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let used = s.get("/api/v1/namespaces/team/resourcequotas/compute").await.body["status"]["used"].clone();
    assert_eq!(used["requests.cpu"], "600m");
    // Other namespaces are not limited.
    let r = s.post("/api/v1/namespaces/default/pods", &pod("big", "64")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // Objects the quota does not track are unaffected.
    assert_eq!(s.configmap("team", "cm", json!({"k":"v"})).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn foreground_and_orphan_deletes_wait_with_their_finalizer() {
    let s = start().await;
    for (name, policy, finalizer) in [("fg", "Foreground", Some("foregroundDeletion")), ("or", "Orphan", Some("orphan")), ("bg", "Background", None)] {
        assert_eq!(s.configmap("default", name, json!({})).await.status, StatusCode::CREATED);
        let r = s
            .send(
                s.request(Method::DELETE, &format!("/api/v1/namespaces/default/configmaps/{name}"))
                    .json(&json!({"kind":"DeleteOptions","apiVersion":"v1","propagationPolicy":policy})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let after = s.get(&format!("/api/v1/namespaces/default/configmaps/{name}")).await;
        match finalizer {
            Some(f) => {
                assert_eq!(after.status, StatusCode::OK, "{policy}: kept for the collector");
                assert_eq!(after.body["metadata"]["finalizers"], json!([f]));
                assert!(after.body["metadata"]["deletionTimestamp"].is_string());
                // The collector removing the finalizer lets it go.
                let r = s
                    .patch(
                        &format!("/api/v1/namespaces/default/configmaps/{name}"),
                        "application/merge-patch+json",
                        r#"{"metadata":{"finalizers":null}}"#,
                    )
                    .await;
                assert!(r.status.is_success(), "{}", r.text);
                let mut gone = false;
                for _ in 0..50 {
                    if s.get(&format!("/api/v1/namespaces/default/configmaps/{name}")).await.status == StatusCode::NOT_FOUND {
                        gone = true;
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                assert!(gone, "{policy}: removed once the finalizer is gone");
            }
            None => assert_eq!(after.status, StatusCode::NOT_FOUND),
        }
    }
    // A policy that does not exist is a 400 and deletes nothing.
    assert_eq!(s.configmap("default", "keep", json!({})).await.status, StatusCode::CREATED);
    let r = s
        .send(s.request(Method::DELETE, "/api/v1/namespaces/default/configmaps/keep?propagationPolicy=Sideways"))
        .await;
    assert_status(&r, 400, "BadRequest");
    assert_eq!(s.get("/api/v1/namespaces/default/configmaps/keep").await.status, StatusCode::OK);
}
