//! Authentication and authorization from the outside: a real apiserver on loopback, real HTTPS
//! (reqwest with client certificates), tokens and certificates made the way clients make them.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{TestServer, assert_status};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// An HTTPS client that trusts the cluster CA and presents `identity` (PEM cert + key), if any.
fn client(ts: &TestServer, identity: Option<(&str, &str)>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(ts.ca_pem.as_bytes()).expect("CA pem");
    let mut b = reqwest::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(30));
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes()).expect("identity pem"));
    }
    b.build().expect("client")
}

/// A client certificate from the cluster CA (the key the server keeps in its data dir).
fn issue(ts: &TestServer, user: &str, groups: &[&str]) -> (String, String) {
    let ca_key = std::fs::read_to_string(ts.data_dir.path().join(skiff_apiserver::CA_KEY)).expect("ca.key");
    skiff_apiserver::client_cert(&ca_key, user, groups, Duration::from_secs(3600)).expect("client cert")
}

struct As {
    client: reqwest::Client,
    base: String,
    bearer: Option<String>,
}

impl As {
    fn cert(ts: &TestServer, user: &str, groups: &[&str]) -> As {
        let (c, k) = issue(ts, user, groups);
        As { client: client(ts, Some((&c, &k))), base: ts.base.clone(), bearer: None }
    }
    fn token(ts: &TestServer, token: &str) -> As {
        As { client: client(ts, None), base: ts.base.clone(), bearer: Some(token.to_string()) }
    }
    fn anonymous(ts: &TestServer) -> As {
        As { client: client(ts, None), base: ts.base.clone(), bearer: None }
    }
    async fn send(&self, method: Method, path: &str, body: Option<(&str, String)>) -> common::Reply {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.bearer {
            req = req.bearer_auth(t);
        }
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
    async fn post(&self, path: &str, body: &Value) -> common::Reply {
        self.send(Method::POST, path, Some(("application/json", body.to_string()))).await
    }
    async fn merge(&self, path: &str, body: &Value) -> common::Reply {
        self.send(Method::PATCH, path, Some(("application/merge-patch+json", body.to_string()))).await
    }
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

fn lease(name: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}, "spec": {"holderIdentity": name}})
}

fn pod(name: &str, node: &str, secret: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox",
                    "envFrom": [{"secretRef": {"name": secret}}]}]}})
}

fn secret(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"k": "v"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_valid_credentials_are_401() {
    let ts = common::start().await;
    let anon = As::anonymous(&ts);
    assert_status(&anon.get("/api/v1/namespaces").await, 401, "Unauthorized");
    assert_status(&anon.post("/api/v1/namespaces", &json!({"metadata": {"name": "x"}})).await, 401, "Unauthorized");
    // The public paths stay public.
    assert_eq!(anon.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(anon.get("/version").await.status, StatusCode::OK);
    assert_eq!(anon.get("/api/v1/namespaces/kube-public/configmaps/cluster-info").await.status, StatusCode::OK);

    // A tampered admin token, a made-up bootstrap token, a JWT-shaped string, an empty bearer.
    let mut tampered = ts.token.clone().into_bytes();
    tampered[0] = if tampered[0] == b'a' { b'b' } else { b'a' };
    for bad in [String::from_utf8(tampered).unwrap(), "abcdef.0123456789abcdef".into(), "eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into(), String::new()] {
        let r = As::token(&ts, &bad).get("/api/v1/namespaces").await;
        assert_status(&r, 401, "Unauthorized");
    }

    // A bootstrap token that expired a minute ago.
    let past = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let r = ts.post("/api/v1/namespaces/kube-system/secrets", &json!({
        "apiVersion": "v1", "kind": "Secret", "type": "bootstrap.kubernetes.io/token",
        "metadata": {"name": "bootstrap-token-exp123"},
        "stringData": {"token-id": "exp123", "token-secret": "0123456789abcdef", "expiration": past,
                       "usage-bootstrap-authentication": "true"}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_status(&As::token(&ts, "exp123.0123456789abcdef").get("/apis/certificates.k8s.io/v1/certificatesigningrequests").await, 401, "Unauthorized");

    // A client certificate from another CA does not even get through the handshake.
    let other_ca = rcgen::KeyPair::generate().unwrap();
    let (c, k) = skiff_apiserver::client_cert(&other_ca.serialize_pem(), "system:admin", &["system:masters"], Duration::from_secs(600)).unwrap();
    let r = client(&ts, Some((&c, &k))).get(format!("{}/api/v1/namespaces", ts.base)).send().await;
    assert!(r.is_err(), "a certificate from a foreign CA must be refused: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_writes_only_its_own_node_lease_and_pods() {
    let ts = common::start().await;
    let n1 = As::cert(&ts, "system:node:n1", &["system:nodes"]);
    let n2 = As::cert(&ts, "system:node:n2", &["system:nodes"]);

    // Nodes.
    assert_eq!(n1.post("/api/v1/nodes", &node("n1")).await.status, StatusCode::CREATED);
    assert_eq!(n2.post("/api/v1/nodes", &node("n2")).await.status, StatusCode::CREATED);
    let r = n1.post("/api/v1/nodes", &node("n3")).await;
    assert_status(&r, 403, "Forbidden");
    assert!(r.body["message"].as_str().unwrap().contains("User \"system:node:n1\" cannot create resource \"nodes\""), "{}", r.text);
    let r = n1.merge("/api/v1/nodes/n2", &json!({"metadata": {"labels": {"x": "y"}}})).await;
    assert_status(&r, 403, "Forbidden");
    assert_eq!(r.body["details"]["name"], "n2", "{}", r.text);
    assert_eq!(r.body["details"]["kind"], "nodes", "{}", r.text);
    assert_status(&n1.merge("/api/v1/nodes/n2/status", &json!({"status": {"phase": "x"}})).await, 403, "Forbidden");
    assert_eq!(n1.merge("/api/v1/nodes/n1/status", &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})).await.status, StatusCode::OK);
    assert_eq!(n1.get("/api/v1/nodes/n2").await.status, StatusCode::OK, "nodes read other nodes");
    assert_status(&n1.send(Method::DELETE, "/api/v1/nodes/n2", None).await, 403, "Forbidden");

    // Leases.
    assert_eq!(n1.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", &lease("n1")).await.status, StatusCode::CREATED);
    assert_eq!(n2.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", &lease("n2")).await.status, StatusCode::CREATED);
    assert_status(&n1.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", &lease("n3")).await, 403, "Forbidden");
    assert_status(&n1.merge("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n2", &json!({"spec": {"holderIdentity": "n1"}})).await, 403, "Forbidden");
    assert_eq!(n1.merge("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1", &json!({"spec": {"leaseDurationSeconds": 40}})).await.status, StatusCode::OK);
    assert_status(&n1.post("/apis/coordination.k8s.io/v1/namespaces/default/leases", &lease("n1")).await, 403, "Forbidden");

    // Pods: status of its own pods only; the secrets its pods use, no others.
    for (p, n, s) in [("p1", "n1", "s1"), ("p2", "n2", "s2")] {
        assert_eq!(ts.post("/api/v1/namespaces/default/secrets", &secret(s)).await.status, StatusCode::CREATED);
        assert_eq!(ts.post("/api/v1/namespaces/default/pods", &pod(p, n, s)).await.status, StatusCode::CREATED);
    }
    let status = json!({"status": {"phase": "Running"}});
    assert_eq!(n1.merge("/api/v1/namespaces/default/pods/p1/status", &status).await.status, StatusCode::OK);
    let r = n1.merge("/api/v1/namespaces/default/pods/p2/status", &status).await;
    assert_status(&r, 403, "Forbidden");
    assert!(r.body["message"].as_str().unwrap().contains("cannot patch resource \"pods/status\" in API group \"\" in the namespace \"default\""), "{}", r.text);
    assert_status(&n1.merge("/api/v1/namespaces/default/pods/p1", &json!({"metadata": {"labels": {"a": "b"}}})).await, 403, "Forbidden");
    assert_status(&n1.post("/api/v1/namespaces/default/pods", &pod("p3", "n1", "s1")).await, 403, "Forbidden");
    assert_eq!(n1.get("/api/v1/namespaces/default/secrets/s1").await.status, StatusCode::OK);
    assert_status(&n1.get("/api/v1/namespaces/default/secrets/s2").await, 403, "Forbidden");
    assert_status(&n1.get("/api/v1/namespaces/default/secrets").await, 403, "Forbidden");
    assert_eq!(n1.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dn1").await.status, StatusCode::OK);

    // Events: yes. RBAC objects: no.
    let ev = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e1"}, "involvedObject": {"kind": "Pod", "name": "p1", "namespace": "default"}, "reason": "Started"});
    assert_eq!(n1.post("/api/v1/namespaces/default/events", &ev).await.status, StatusCode::CREATED);
    assert_status(&n1.get("/apis/rbac.authorization.k8s.io/v1/clusterroles").await, 403, "Forbidden");

    // A certificate naming system:node:n1 without the group is no node.
    let fake = As::cert(&ts, "system:node:n1", &[]);
    assert_status(&fake.merge("/api/v1/nodes/n1/status", &json!({"status": {}})).await, 403, "Forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_and_revokes() {
    let ts = common::start().await;
    ts.namespace("team-a").await;
    ts.namespace("team-b").await;
    let alice = As::cert(&ts, "alice", &["dev"]);
    let r = alice.get("/api/v1/namespaces/team-a/pods").await;
    assert_status(&r, 403, "Forbidden");
    assert_eq!(r.body["message"], "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"team-a\"");
    // Discovery is everyone's.
    assert_eq!(alice.get("/api").await.status, StatusCode::OK);
    assert_eq!(alice.get("/apis/apps/v1").await.status, StatusCode::OK);

    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pod-reader"},
                      "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
                                {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["allowed"], "verbs": ["get"]}]});
    assert_eq!(ts.post("/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/roles", &role).await.status, StatusCode::CREATED);
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "alice-reads"},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]});
    assert_eq!(ts.post("/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings", &binding).await.status, StatusCode::CREATED);
    assert_eq!(alice.get("/api/v1/namespaces/team-a/pods").await.status, StatusCode::OK);
    assert_status(&alice.get("/api/v1/namespaces/team-b/pods").await, 403, "Forbidden");
    assert_status(&alice.get("/api/v1/pods").await, 403, "Forbidden");
    assert_status(&alice.send(Method::DELETE, "/api/v1/namespaces/team-a/pods", None).await, 403, "Forbidden");
    assert_status(&alice.get("/api/v1/namespaces/team-a/pods/p/status").await, 403, "Forbidden");
    ts.configmap("team-a", "allowed", json!({})).await;
    ts.configmap("team-a", "other", json!({})).await;
    assert_eq!(alice.get("/api/v1/namespaces/team-a/configmaps/allowed").await.status, StatusCode::OK);
    assert_status(&alice.get("/api/v1/namespaces/team-a/configmaps/other").await, 403, "Forbidden");

    // kubectl auth can-i's request.
    let ssar = |verb: &str, ns: &str| json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": verb, "resource": "pods", "namespace": ns}}});
    let r = alice.post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", &ssar("list", "team-a")).await;
    assert_eq!((r.status, r.body["status"]["allowed"].clone()), (StatusCode::CREATED, json!(true)), "{}", r.text);
    let r = alice.post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", &ssar("delete", "team-a")).await;
    assert_eq!(r.body["status"]["allowed"], json!(false), "{}", r.text);

    // A group binding to a ClusterRole, everywhere.
    let crb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "dev-view"},
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                     "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "dev"}]});
    assert_eq!(ts.post("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", &crb).await.status, StatusCode::CREATED);
    assert_eq!(alice.get("/api/v1/namespaces/team-b/pods").await.status, StatusCode::OK);
    assert_eq!(alice.get("/apis/apps/v1/deployments").await.status, StatusCode::OK);
    assert_status(&alice.get("/api/v1/namespaces/team-b/secrets").await, 403, "Forbidden");

    // Revoked: at once.
    assert_eq!(ts.delete("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/dev-view").await.status, StatusCode::OK);
    assert_status(&alice.get("/api/v1/namespaces/team-b/pods").await, 403, "Forbidden");
    assert_eq!(ts.delete("/apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings/alice-reads").await.status, StatusCode::OK);
    assert_status(&alice.get("/api/v1/namespaces/team-a/pods").await, 403, "Forbidden");
}

/// kubectl as a user with a client-certificate kubeconfig: refused with Kubernetes' message,
/// allowed once the admin (kubectl too) binds a role, refused again once it is deleted.
/// (`kubectl auth can-i`, whose review is protobuf, is tested in `kubectl_protobuf.rs`; the
/// SelfSubjectAccessReview is tested over JSON in `rbac_grants_and_revokes`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_sees_rbac() {
    if std::process::Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        assert!(std::env::var("CI").is_err(), "kubectl is missing (CI=true: this must not skip)");
        eprintln!("skipping: kubectl is not installed");
        return;
    }
    let ts = common::start().await;
    ts.namespace("kc").await;
    let (cert, key) = issue(&ts, "bob", &[]);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: bob\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: bob}}\ncurrent-context: c\n",
        ts.base, b64(&ts.ca_pem), b64(&cert), b64(&key));
    ts.configmap("kc", "cm1", json!({})).await;
    let bob = ts.data_dir.path().join("bob.kubeconfig");
    std::fs::write(&bob, kubeconfig).unwrap();
    let admin = ts.data_dir.path().join(skiff_apiserver::KUBECONFIG);
    let kubectl = |config: &std::path::Path, args: &[&str], stdin: Option<&str>| {
        use std::io::Write as _;
        let mut child = std::process::Command::new("kubectl")
            .arg("--kubeconfig").arg(config).args(args)
            .stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped())
            .spawn().expect("kubectl runs");
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("kubectl ends");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, _, err) = tokio::task::block_in_place(|| kubectl(&bob, &["get", "configmaps", "-n", "kc"], None));
    assert_eq!(code, Some(1));
    assert!(err.contains("configmaps is forbidden: User \"bob\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"kc\""), "{err}");
    let binding = "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: bob-edit, namespace: kc}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}\nsubjects:\n- {apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}\n";
    let (code, _, err) = tokio::task::block_in_place(|| kubectl(&admin, &["apply", "-f", "-"], Some(binding)));
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = tokio::task::block_in_place(|| kubectl(&bob, &["get", "configmaps", "-n", "kc", "-o", "name"], None));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("configmap/cm1"), "{out}");
    let (code, _, err) = tokio::task::block_in_place(|| kubectl(&bob, &["get", "configmaps", "-n", "default"], None));
    assert_eq!(code, Some(1), "another namespace stays closed");
    assert!(err.contains("forbidden"), "{err}");
    let (code, _, err) = tokio::task::block_in_place(|| kubectl(&admin, &["delete", "rolebinding", "bob-edit", "-n", "kc"], None));
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = tokio::task::block_in_place(|| kubectl(&bob, &["get", "configmaps", "-n", "kc"], None));
    assert_eq!(code, Some(1), "revoked");
    assert!(err.contains("forbidden"), "{err}");
}

/// kubeadm's TLS bootstrap: a bootstrap token may only ask for a node client certificate; the
/// certificate it gets back is the node's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_token_gets_a_node_certificate_and_nothing_else() {
    let ts = common::start().await;
    let r = ts.post("/api/v1/namespaces/kube-system/secrets", &json!({
        "apiVersion": "v1", "kind": "Secret", "type": "bootstrap.kubernetes.io/token",
        "metadata": {"name": "bootstrap-token-boot12"},
        "stringData": {"token-id": "boot12", "token-secret": "0123456789abcdef", "usage-bootstrap-authentication": "true"}})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let boot = As::token(&ts, "boot12.0123456789abcdef");
    assert_status(&boot.get("/api/v1/pods").await, 403, "Forbidden");
    assert_status(&boot.post("/api/v1/nodes", &node("n9")).await, 403, "Forbidden");
    assert_status(&boot.get("/api/v1/namespaces/kube-system/secrets").await, 403, "Forbidden");

    let csr = |cn: &str, o: &str, key: &rcgen::KeyPair| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, cn);
        dn.push(rcgen::DnType::OrganizationName, o);
        params.distinguished_name = dn;
        let pem = params.serialize_request(key).unwrap().pem().unwrap();
        json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest", "metadata": {"generateName": "node-csr-"},
               "spec": {"request": base64::engine::general_purpose::STANDARD.encode(pem),
                        "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
                        "usages": ["digital signature", "client auth"],
                        "username": "system:admin", "groups": ["system:masters"]}})
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let r = boot.post("/apis/certificates.k8s.io/v1/certificatesigningrequests", &csr("system:node:n9", "system:nodes", &key)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["spec"]["username"], "system:bootstrap:boot12", "the requester is the server's word, not the client's");
    assert_eq!(r.body["status"]["conditions"][0]["type"], "Approved", "{}", r.text);
    let cert = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(r.body["status"]["certificate"].as_str().expect("a certificate")).unwrap()).unwrap();
    let name = r.body["metadata"]["name"].as_str().unwrap().to_string();
    let r = boot.get(&format!("/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let n9 = As { client: client(&ts, Some((&cert, &key.serialize_pem()))), base: ts.base.clone(), bearer: None };
    assert_eq!(n9.post("/api/v1/nodes", &node("n9")).await.status, StatusCode::CREATED);
    assert_status(&n9.post("/api/v1/nodes", &node("n10")).await, 403, "Forbidden");

    // Asking for more than a node's certificate: stored, never signed.
    let key2 = rcgen::KeyPair::generate().unwrap();
    for (cn, o) in [("system:admin", "system:masters"), ("system:node:n10", "system:masters")] {
        let r = boot.post("/apis/certificates.k8s.io/v1/certificatesigningrequests", &csr(cn, o, &key2)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert!(r.body["status"]["certificate"].is_null(), "{cn}/{o} must not be signed: {}", r.text);
    }
    // The node renews its own, and cannot get another node's.
    let r = n9.post("/apis/certificates.k8s.io/v1/certificatesigningrequests", &csr("system:node:n9", "system:nodes", &key2)).await;
    assert!(r.body["status"]["certificate"].is_string(), "{}", r.text);
    let r = n9.post("/apis/certificates.k8s.io/v1/certificatesigningrequests", &csr("system:node:n10", "system:nodes", &key2)).await;
    assert!(r.body["status"]["certificate"].is_null(), "{}", r.text);
    // A request whose signature does not match its key is a 400.
    let mut bad = csr("system:node:n9", "system:nodes", &key2);
    let pem = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(bad["spec"]["request"].as_str().unwrap()).unwrap()).unwrap();
    // Flip a byte of the signature (the end of the DER): it still parses, it no longer verifies.
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = base64::engine::general_purpose::STANDARD.decode(body).unwrap();
    let at = der.len() - 8;
    der[at] ^= 0x55;
    let broken = format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", base64::engine::general_purpose::STANDARD.encode(&der));
    bad["spec"]["request"] = json!(base64::engine::general_purpose::STANDARD.encode(broken));
    assert_status(&boot.post("/apis/certificates.k8s.io/v1/certificatesigningrequests", &bad).await, 400, "BadRequest");
}

/// Service-account tokens: made by TokenRequest, bound to a pod, allowed only what RBAC grants
/// the ServiceAccount, refused when tampered with or when the pod is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_bound_and_authorized_by_rbac() {
    let ts = common::start().await;
    ts.namespace("apps").await;
    let r = ts.get("/api/v1/namespaces/apps/serviceaccounts/default").await;
    assert_eq!(r.status, StatusCode::OK, "every namespace has its default ServiceAccount: {}", r.text);
    let pod = |name: &str, node: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}});
    let p1 = ts.post("/api/v1/namespaces/apps/pods", &pod("p1", "n1")).await;
    assert_eq!(p1.status, StatusCode::CREATED, "{}", p1.text);
    assert_eq!(ts.post("/api/v1/namespaces/apps/pods", &pod("p2", "n2")).await.status, StatusCode::CREATED);
    let request = |pod: &str, uid: &str| json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3607, "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}}});

    // A node asks for the tokens of its own pods only (as kubelet does).
    let n1 = As::cert(&ts, "system:node:n1", &["system:nodes"]);
    let uid1 = p1.body["metadata"]["uid"].as_str().unwrap().to_string();
    let r = n1.post("/api/v1/namespaces/apps/serviceaccounts/default/token", &request("p1", &uid1)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["kind"], "TokenRequest");
    let token = r.body["status"]["token"].as_str().expect("a token").to_string();
    assert_status(&n1.post("/api/v1/namespaces/apps/serviceaccounts/default/token", &request("p2", "")).await, 403, "Forbidden");
    assert_status(&ts.post("/api/v1/namespaces/apps/serviceaccounts/default/token", &request("p1", "not-the-uid")).await, 409, "Conflict");
    assert_status(&ts.post("/api/v1/namespaces/apps/serviceaccounts/nobody/token", &request("p1", "")).await, 404, "NotFound");

    // The pod's token: authenticated, allowed nothing until RBAC says so.
    let sa = As::token(&ts, &token);
    let r = sa.get("/api/v1/namespaces/apps/pods").await;
    assert_status(&r, 403, "Forbidden");
    assert!(r.body["message"].as_str().unwrap().contains("User \"system:serviceaccount:apps:default\" cannot list resource \"pods\""), "{}", r.text);
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "sa-view"},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                         "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "apps"}]});
    assert_eq!(ts.post("/apis/rbac.authorization.k8s.io/v1/namespaces/apps/rolebindings", &binding).await.status, StatusCode::CREATED);
    assert_eq!(sa.get("/api/v1/namespaces/apps/pods").await.status, StatusCode::OK);
    assert_status(&sa.get("/api/v1/namespaces/default/pods").await, 403, "Forbidden");
    assert_status(&sa.get("/api/v1/namespaces/apps/secrets").await, 403, "Forbidden");
    assert_status(&sa.send(Method::DELETE, "/api/v1/namespaces/apps/pods/p2", None).await, 403, "Forbidden");

    // Tampered: a changed claim (the signature no longer matches), a changed signature, no signature.
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "p1", "the token names its pod: {claims}");
    claims["sub"] = json!("system:serviceaccount:kube-system:default");
    claims["kubernetes.io"]["namespace"] = json!("kube-system");
    let forged = format!("{}.{}.{}", parts[0], b64.encode(claims.to_string()), parts[2]);
    let mut sig = b64.decode(parts[2]).unwrap();
    sig[5] ^= 1;
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], b64.encode(sig));
    let none_alg = format!("{}.{}.", b64.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    for bad in [forged, bad_sig, none_alg] {
        assert_status(&As::token(&ts, &bad).get("/api/v1/namespaces/apps/pods").await, 401, "Unauthorized");
    }

    // The pod goes: its token with it.
    assert_eq!(ts.send(ts.request(Method::DELETE, "/api/v1/namespaces/apps/pods/p1?gracePeriodSeconds=0")).await.status, StatusCode::OK);
    let gone = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if sa.get("/api/v1/namespaces/apps/pods").await.status == StatusCode::UNAUTHORIZED {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the token of a deleted pod is refused");
}
