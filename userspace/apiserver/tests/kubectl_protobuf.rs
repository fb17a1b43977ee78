//! The requests real kubectl 1.32 sends in Kubernetes' protobuf encoding: `kubectl auth can-i`
//! (a SelfSubjectAccessReview) and `kubectl create configmap|secret`. Before the server decoded
//! protobuf these were 415 and kubectl failed.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use common::TestServer;
use serde_json::json;

fn have_kubectl() -> bool {
    if Command::new("kubectl").args(["version", "--client"]).output().is_ok() {
        return true;
    }
    assert!(std::env::var("CI").is_err(), "kubectl is missing (CI=true: this must not skip)");
    eprintln!("skipping: kubectl is not installed");
    false
}

/// kubectl with `kubeconfig`, bounded in time.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    let child = Command::new("timeout")
        .arg("60")
        .arg("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    child.wait_with_output().expect("kubectl ends")
}

fn text(o: &Output) -> String {
    format!("exit {:?}\nstdout: {}\nstderr: {}", o.status.code(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A kubeconfig for `user` with a client certificate from the cluster CA.
fn user_kubeconfig(ts: &TestServer, user: &str) -> std::path::PathBuf {
    let ca_key = std::fs::read_to_string(ts.data_dir.path().join(skiff_apiserver::CA_KEY)).expect("ca.key");
    let (cert, key) = skiff_apiserver::client_cert(&ca_key, user, &[], Duration::from_secs(3600)).expect("client cert");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let path = ts.data_dir.path().join(format!("{user}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            ts.base, b64(&ts.ca_pem), b64(&cert), b64(&key)
        ),
    )
    .expect("write kubeconfig");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_can_i() {
    if !have_kubectl() {
        return;
    }
    let ts = common::start().await;
    ts.namespace("team").await;
    let admin = ts.data_dir.path().join(skiff_apiserver::KUBECONFIG);
    let bob = user_kubeconfig(&ts, "bob");
    tokio::task::block_in_place(|| {
        let o = kubectl(&admin, &["auth", "can-i", "create", "pods"]);
        assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(0), "yes"), "{}", text(&o));
        let o = kubectl(&bob, &["auth", "can-i", "create", "pods"]);
        assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(1), "no"), "{}", text(&o));
        let o = kubectl(&bob, &["auth", "can-i", "get", "/healthz"]);
        assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(0), "yes"), "a non-resource URL: {}", text(&o));
    });
    // bob may list pods in team only.
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "bob-views"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}]});
    assert_eq!(ts.post("/apis/rbac.authorization.k8s.io/v1/namespaces/team/rolebindings", &binding).await.status.as_u16(), 201);
    tokio::task::block_in_place(|| {
        let o = kubectl(&bob, &["auth", "can-i", "list", "pods", "-n", "team"]);
        assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(0), "yes"), "{}", text(&o));
        let o = kubectl(&bob, &["auth", "can-i", "delete", "pods", "-n", "team"]);
        assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(1), "no"), "{}", text(&o));
        let o = kubectl(&bob, &["auth", "can-i", "list", "pods", "-n", "default"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        // Impersonation: the admin asks as bob (and as bob in system:masters); bob may not
        // impersonate anyone.
        let o = kubectl(&admin, &["auth", "can-i", "list", "pods", "-n", "team", "--as", "bob"]);
        assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(0), "yes"), "{}", text(&o));
        let o = kubectl(&admin, &["auth", "can-i", "create", "pods", "-n", "team", "--as", "bob"]);
        assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(1), "no"), "{}", text(&o));
        let o = kubectl(&admin, &["auth", "can-i", "create", "pods", "--as", "bob", "--as-group", "system:masters"]);
        assert_eq!((o.status.code(), String::from_utf8_lossy(&o.stdout).trim()), (Some(0), "yes"), "{}", text(&o));
        let o = kubectl(&admin, &["get", "configmaps", "-n", "default", "--as", "bob"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stderr).contains("User \"bob\" cannot list resource \"configmaps\""), "{}", text(&o));
        let o = kubectl(&bob, &["get", "pods", "-n", "team", "--as", "system:admin"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("users \"system:admin\" is forbidden: User \"bob\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope"),
            "{}", text(&o)
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_configmap_and_secret() {
    if !have_kubectl() {
        return;
    }
    let ts = common::start().await;
    let admin = ts.data_dir.path().join(skiff_apiserver::KUBECONFIG);
    tokio::task::block_in_place(|| {
        let o = kubectl(&admin, &["create", "configmap", "settings", "--from-literal=mode=fast", "--from-literal=level=3"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let o = kubectl(&admin, &["create", "secret", "generic", "creds", "--from-literal=password=s3cr\u{e9}t", "--type=Opaque"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let o = kubectl(&admin, &["create", "secret", "docker-registry", "pull", "--docker-server=r.example", "--docker-username=u", "--docker-password=p"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        // The dry run goes through the same decoder and stores nothing.
        let o = kubectl(&admin, &["create", "configmap", "dry", "--from-literal=a=b", "--dry-run=server"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    });
    let cm = ts.get("/api/v1/namespaces/default/configmaps/settings").await;
    assert_eq!(cm.body["data"], json!({"mode": "fast", "level": "3"}), "{}", cm.text);
    let s = ts.get("/api/v1/namespaces/default/secrets/creds").await;
    assert_eq!(s.body["type"], "Opaque", "{}", s.text);
    assert_eq!(s.body["data"]["password"], base64::engine::general_purpose::STANDARD.encode("s3cr\u{e9}t"), "{}", s.text);
    let p = ts.get("/api/v1/namespaces/default/secrets/pull").await;
    assert_eq!(p.body["type"], "kubernetes.io/dockerconfigjson", "{}", p.text);
    assert!(p.body["data"][".dockerconfigjson"].is_string(), "{}", p.text);
    assert_eq!(ts.get("/api/v1/namespaces/default/configmaps/dry").await.status.as_u16(), 404);
    // A kind skiff does not decode from protobuf: kubectl reports the 415 and its message.
    let o = tokio::task::block_in_place(|| kubectl(&admin, &["create", "deployment", "web", "--image=busybox"]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("decodes application/vnd.kubernetes.protobuf only for"), "{}", text(&o));
}
