//! RBAC from the outside: the control-plane components' own identities (the kubeconfigs the
//! server writes for the controller-manager and the scheduler) are limited by their default
//! ClusterRoles, and nobody may grant through a Role or a binding more than they hold
//! (Kubernetes' escalation prevention).

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{TestServer, assert_status};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// An HTTPS client presenting `identity` (PEM cert, PEM key) and trusting only the cluster CA.
struct As {
    client: reqwest::Client,
    base: String,
}

impl As {
    fn with_identity(ts: &TestServer, cert: &str, key: &str) -> As {
        let ca = reqwest::Certificate::from_pem(ts.ca_pem.as_bytes()).expect("CA pem");
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(30))
            .identity(reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes()).expect("identity pem"))
            .build()
            .expect("client");
        As { client, base: ts.base.clone() }
    }

    /// The identity of a kubeconfig the server wrote (client-certificate-data, client-key-data).
    fn kubeconfig(ts: &TestServer, file: &str) -> As {
        let text = skiff_apiserver::component_kubeconfig(ts.data_dir.path(), file).expect("kubeconfig written");
        let field = |name: &str| {
            let line = text.lines().find_map(|l| l.trim().strip_prefix(name)).unwrap_or_else(|| panic!("{file} has no {name}"));
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(line.trim()).expect("base64")).expect("PEM text")
        };
        As::with_identity(ts, &field("client-certificate-data:"), &field("client-key-data:"))
    }

    /// A client certificate from the cluster CA for `user` in `groups`.
    fn user(ts: &TestServer, user: &str, groups: &[&str]) -> As {
        let ca_key = std::fs::read_to_string(ts.data_dir.path().join(skiff_apiserver::CA_KEY)).expect("ca.key");
        let (cert, key) = skiff_apiserver::client_cert(&ca_key, user, groups, Duration::from_secs(3600)).expect("client cert");
        As::with_identity(ts, &cert, &key)
    }

    async fn send(&self, method: Method, path: &str, body: Option<(&str, String)>) -> common::Reply {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some((ct, body)) = body {
            req = req.header("Content-Type", ct).body(body);
        }
        let resp = req.send().await.expect("answered");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        common::Reply { status, headers, body: serde_json::from_str(&text).unwrap_or(Value::Null), text }
    }
    async fn get(&self, path: &str) -> common::Reply {
        self.send(Method::GET, path, None).await
    }
    async fn delete(&self, path: &str) -> common::Reply {
        self.send(Method::DELETE, path, None).await
    }
    async fn post(&self, path: &str, body: &Value) -> common::Reply {
        self.send(Method::POST, path, Some(("application/json", body.to_string()))).await
    }
    async fn put(&self, path: &str, body: &Value) -> common::Reply {
        self.send(Method::PUT, path, Some(("application/json", body.to_string()))).await
    }
    async fn merge(&self, path: &str, body: &Value) -> common::Reply {
        self.send(Method::PATCH, path, Some(("application/merge-patch+json", body.to_string()))).await
    }
}

const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1";

fn secret(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"k": "v"}})
}

fn cluster_role_binding(name: &str, role: &str, user: &str) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
           "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
}

/// The scheduler and the controller-manager authenticate as themselves (not as the admin) and
/// RBAC's default roles bound them: the scheduler reads pods and binds them but never touches a
/// Secret; the controller-manager writes workloads but creates no Secret and no binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_identities_are_limited_by_their_roles() {
    let ts = common::start().await;
    assert_eq!(ts.post("/api/v1/namespaces/default/secrets", &secret("s1")).await.status, StatusCode::CREATED);

    let scheduler = As::kubeconfig(&ts, skiff_apiserver::SCHEDULER_KUBECONFIG);
    assert_eq!(scheduler.get("/api/v1/pods").await.status, StatusCode::OK, "the scheduler watches pods");
    assert_eq!(scheduler.get("/api/v1/nodes").await.status, StatusCode::OK, "and nodes");
    let r = scheduler.get("/api/v1/namespaces/default/secrets/s1").await;
    assert_status(&r, 403, "Forbidden");
    assert_eq!(
        r.body["message"],
        "secrets \"s1\" is forbidden: User \"system:kube-scheduler\" cannot get resource \"secrets\" in API group \"\" in the namespace \"default\""
    );
    assert_status(&scheduler.get("/api/v1/secrets").await, 403, "Forbidden");
    assert_status(&scheduler.delete("/api/v1/namespaces/default/secrets/s1").await, 403, "Forbidden");
    assert_status(&scheduler.delete("/api/v1/namespaces/default/pods/p").await, 403, "Forbidden");
    assert_status(&scheduler.post("/apis/apps/v1/namespaces/default/deployments", &json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
                 "spec": {"containers": [{"name": "c", "image": "i"}]}}}})).await, 403, "Forbidden");
    assert_status(&scheduler.post(&format!("{RBAC}/clusterrolebindings"), &cluster_role_binding("sched-admin", "cluster-admin", "system:kube-scheduler")).await, 403, "Forbidden");

    let controllers = As::kubeconfig(&ts, skiff_apiserver::CONTROLLER_MANAGER_KUBECONFIG);
    assert_eq!(controllers.get("/apis/apps/v1/deployments").await.status, StatusCode::OK);
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "made-by-rs"},
                     "spec": {"containers": [{"name": "c", "image": "i"}]}});
    assert_eq!(controllers.post("/api/v1/namespaces/default/pods", &pod).await.status, StatusCode::CREATED, "the ReplicaSet controller makes pods");
    let r = controllers.post("/api/v1/namespaces/default/secrets", &secret("s2")).await;
    assert_status(&r, 403, "Forbidden");
    assert!(r.text.contains("User \\\"system:kube-controller-manager\\\" cannot create resource \\\"secrets\\\""), "{}", r.text);
    let r = controllers.post(&format!("{RBAC}/clusterrolebindings"), &cluster_role_binding("cm-admin", "cluster-admin", "system:kube-controller-manager")).await;
    assert_status(&r, 403, "Forbidden");
    assert_status(&controllers.post("/api/v1/namespaces", &json!({"metadata": {"name": "by-cm"}})).await, 403, "Forbidden");
}

fn role(name: &str, rules: Value) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name}, "rules": rules})
}

fn role_binding(name: &str, kind: &str, role: &str, user: &str) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
           "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]})
}

fn assert_escalation_refused(r: &common::Reply, missing: &str) {
    assert_status(r, 403, "Forbidden");
    let message = r.body["message"].as_str().unwrap_or("");
    assert!(message.contains("is attempting to grant RBAC permissions not currently held"), "{message}");
    assert!(message.contains(missing), "{message} should name {missing}");
}

/// A user allowed to write Roles and RoleBindings may grant only what they hold: a Role with a
/// permission they lack, a change of rules adding one, a binding to a role they do not hold are
/// all 403 with the permissions named; holding them, or being given `escalate` / `bind`, lets
/// the same requests through. Edits that grant nothing (labels) pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_writes_never_grant_more_than_the_writer_holds() {
    let ts = common::start().await;
    ts.namespace("esc").await;
    let rb = "/apis/rbac.authorization.k8s.io/v1/namespaces/esc";
    // alice may manage Roles and RoleBindings in esc and read pods there; nothing else.
    let manager = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "rbac-manager"},
        "rules": [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["create", "get", "update", "patch"]},
                  {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]});
    assert_eq!(ts.post(&format!("{RBAC}/clusterroles"), &manager).await.status, StatusCode::CREATED);
    assert_eq!(ts.post(&format!("{rb}/rolebindings"), &role_binding("alice-manages", "ClusterRole", "rbac-manager", "alice")).await.status, StatusCode::CREATED);
    let alice = As::user(&ts, "alice", &["dev"]);

    let readers = json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]);
    assert_eq!(alice.post(&format!("{rb}/roles"), &role("pod-reader", readers)).await.status, StatusCode::CREATED, "what alice holds she may grant");

    let secrets = json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]);
    let r = alice.post(&format!("{rb}/roles"), &role("secret-reader", secrets.clone())).await;
    assert_escalation_refused(&r, "{APIGroups:[\"\"], Resources:[\"secrets\"], Verbs:[\"get\"]}");
    assert!(r.body["message"].as_str().unwrap_or("").starts_with("roles.rbac.authorization.k8s.io \"secret-reader\" is forbidden: user \"alice\" (groups=[\"dev\" \"system:authenticated\"])"), "{}", r.text);
    assert_eq!(ts.get("/apis/rbac.authorization.k8s.io/v1/namespaces/esc/roles/secret-reader").await.status, StatusCode::NOT_FOUND, "nothing was stored");

    // Widening a role she may update: PUT and merge patch alike; a wildcard needs a held one.
    let mut current = ts.get(&format!("{rb}/roles/pod-reader")).await.body;
    current["rules"] = json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "delete"]}]);
    assert_escalation_refused(&alice.put(&format!("{rb}/roles/pod-reader"), &current).await, "Verbs:[\"delete\"]");
    let wild = json!({"rules": [{"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}]});
    assert_escalation_refused(&alice.merge(&format!("{rb}/roles/pod-reader"), &wild).await, "Resources:[\"*\"]");
    let r = alice.merge(&format!("{rb}/roles/pod-reader"), &json!({"metadata": {"labels": {"team": "a"}}})).await;
    assert_eq!(r.status, StatusCode::OK, "a label grants nothing: {}", r.text);

    // Bindings: to a role she holds, yes; to `edit`, which she does not hold, no.
    assert_eq!(alice.post(&format!("{rb}/rolebindings"), &role_binding("bob-reads", "Role", "pod-reader", "bob")).await.status, StatusCode::CREATED);
    let r = alice.post(&format!("{rb}/rolebindings"), &role_binding("bob-edits", "ClusterRole", "edit", "bob")).await;
    assert_escalation_refused(&r, "Resources:[\"secrets\"]");
    assert!(r.body["message"].as_str().unwrap_or("").starts_with("rolebindings.rbac.authorization.k8s.io \"bob-edits\" is forbidden"), "{}", r.text);
    // Adding a subject to an existing binding of a role she lacks is refused too.
    assert_eq!(ts.post(&format!("{rb}/rolebindings"), &role_binding("carol-edits", "ClusterRole", "edit", "carol")).await.status, StatusCode::CREATED);
    let more = json!({"subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "carol"},
                                   {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]});
    assert_escalation_refused(&alice.merge(&format!("{rb}/rolebindings/carol-edits"), &more).await, "Resources:[\"secrets\"]");

    // `bind` on exactly the edit ClusterRole: the binding goes through without holding edit.
    let binder = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "bind-edit"},
        "rules": [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "resourceNames": ["edit"], "verbs": ["bind"]}]});
    assert_eq!(ts.post(&format!("{RBAC}/clusterroles"), &binder).await.status, StatusCode::CREATED);
    assert_eq!(ts.post(&format!("{rb}/rolebindings"), &role_binding("alice-binds", "ClusterRole", "bind-edit", "alice")).await.status, StatusCode::CREATED);
    let r = alice.post(&format!("{rb}/rolebindings"), &role_binding("bob-edits", "ClusterRole", "edit", "bob")).await;
    assert_eq!(r.status, StatusCode::CREATED, "bind allows it: {}", r.text);
    assert_escalation_refused(&alice.post(&format!("{rb}/rolebindings"), &role_binding("bob-admin", "ClusterRole", "cluster-admin", "bob")).await, "Verbs:[\"*\"]");

    // Holding the permission (alice may now read secrets in esc) makes the first role grantable.
    assert_eq!(ts.post(&format!("{rb}/roles"), &role("alice-secrets", secrets.clone())).await.status, StatusCode::CREATED);
    assert_eq!(ts.post(&format!("{rb}/rolebindings"), &role_binding("alice-secrets", "Role", "alice-secrets", "alice")).await.status, StatusCode::CREATED);
    assert_eq!(alice.post(&format!("{rb}/roles"), &role("secret-reader", secrets)).await.status, StatusCode::CREATED);
    // ... but only in esc: the same Role in another namespace is not hers to grant.
    ts.namespace("other").await;
    let reader = role("pod-reader", json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]));
    assert_status(&alice.post("/apis/rbac.authorization.k8s.io/v1/namespaces/other/roles", &reader).await, 403, "Forbidden");

    // `escalate` on roles: any rules.
    let escalator = role("escalate-roles", json!([{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles"], "verbs": ["escalate"]}]));
    assert_eq!(ts.post(&format!("{rb}/roles"), &escalator).await.status, StatusCode::CREATED);
    assert_eq!(ts.post(&format!("{rb}/rolebindings"), &role_binding("alice-escalates", "Role", "escalate-roles", "alice")).await.status, StatusCode::CREATED);
    let everything = json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]);
    let r = alice.post(&format!("{rb}/roles"), &role("all", everything)).await;
    assert_eq!(r.status, StatusCode::CREATED, "escalate allows it: {}", r.text);
}

/// The controller-manager may patch and update every object (the garbage collector's owner
/// fields), RBAC objects included, but not to grant: adding itself to cluster-admin's binding
/// is refused; a label on it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_garbage_collectors_update_right_grants_nothing() {
    let ts = common::start().await;
    let controllers = As::kubeconfig(&ts, skiff_apiserver::CONTROLLER_MANAGER_KUBECONFIG);
    let path = format!("{RBAC}/clusterrolebindings/cluster-admin");
    let grab = json!({"subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:masters"},
                                   {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:kube-controller-manager"}]});
    assert_escalation_refused(&controllers.merge(&path, &grab).await, "Verbs:[\"*\"]");
    let r = controllers.merge(&path, &json!({"metadata": {"labels": {"seen": "yes"}}})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let widen = json!({"rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]});
    assert_escalation_refused(&controllers.merge(&format!("{RBAC}/clusterroles/system:kube-controller-manager"), &widen).await, "Verbs:[\"*\"]");
    assert_eq!(ts.get(&path).await.body["subjects"].as_array().map(Vec::len), Some(1), "the binding kept its one subject");
}
