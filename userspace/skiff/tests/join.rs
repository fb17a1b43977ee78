//! Joining over the network, against an in-process apiserver: `skiff token create|list|delete`
//! (the real binary), bootstrap-token authentication (valid, deleted, expired, malformed, wrong
//! secret, no usage), anonymous discovery (only kube-public/cluster-info), `skiff agent` refusing
//! a wrong CA hash before it changes anything, and a node that joined with a bootstrap token:
//! the token only gets it a client certificate (a CSR the apiserver signs), with which its Node
//! registers (never another's) and keeps working once the token is deleted; its agent endpoint (the real `skiff_agent::server`, with
//! the discovered CA and no token) serving `kubectl logs` through the apiserver, which presents
//! its node-proxy client certificate; the same endpoint refuses the admin token and callers
//! without a certificate.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use skiff_agent::runtime::{ContainerRequest, ContainerRuntime, ImageInfo, Observed, RuntimeError};

/// Containers exist as the test says; exec runs the command on this host.
struct StandIn;

impl ContainerRuntime for StandIn {
    fn version(&self) -> String {
        "stand-in://0".into()
    }
    fn image(&self, image: &str) -> Result<ImageInfo, RuntimeError> {
        Err(RuntimeError::ImageNotFound(image.into()))
    }
    fn run(&self, _req: &ContainerRequest) -> Result<(), RuntimeError> {
        Err(RuntimeError::Failed("the stand-in runs no containers".into()))
    }
    fn observe(&self, _id: &str) -> Result<Observed, RuntimeError> {
        Ok(Observed::Running { pid: 1, started_at: Timestamp::now() })
    }
    fn stop(&self, _id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn remove(&self, _id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
    fn exec(&self, _id: &str, argv: &[String], _tty: bool) -> Result<std::process::Child, RuntimeError> {
        let (cmd, args) = argv.split_first().ok_or_else(|| RuntimeError::Failed("empty command".into()))?;
        Command::new(cmd)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| RuntimeError::Failed(e.to_string()))
    }
}

async fn skiff(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || Command::new(env!("CARGO_BIN_EXE_skiff")).args(&args).output().expect("run skiff"))
        .await
        .expect("join")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A client for `url` trusting `ca_pem`, with `token` or anonymous.
fn client(url: &str, ca_pem: &str, token: Option<&str>) -> kube::Client {
    let mut config = kube::Config::new(url.parse().expect("url"));
    config.root_cert = Some(pem::parse_many(ca_pem).expect("pem").into_iter().map(|p| p.into_contents()).collect());
    config.auth_info.token = token.map(|t| t.to_string().into());
    kube::Client::try_from(config).expect("client")
}

fn code(e: kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API status, got {other}"),
    }
}

/// kubeadm's discovery hash: sha256 of the CA's SubjectPublicKeyInfo.
fn spki_hash(ca_pem: &str) -> String {
    use sha2::Digest as _;
    let der = pem::parse(ca_pem).expect("pem").into_contents();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    format!("sha256:{}", sha2::Sha256::digest(cert.tbs_certificate.subject_pki.raw).iter().map(|b| format!("{b:02x}")).collect::<String>())
}

async fn bootstrap_secret(admin: &kube::Client, id: &str, secret: &str, expiration: Option<&str>, usage: bool) {
    let mut data = json!({"token-id": id, "token-secret": secret});
    if usage {
        data["usage-bootstrap-authentication"] = json!("true");
    }
    if let Some(e) = expiration {
        data["expiration"] = json!(e);
    }
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": format!("bootstrap-token-{id}"), "namespace": "kube-system"},
        "type": "bootstrap.kubernetes.io/token", "stringData": data}))
    .expect("secret");
    Api::<Secret>::namespaced(admin.clone(), "kube-system").create(&PostParams::default(), &s).await.expect("create secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_discovery_and_a_joined_agent_endpoint() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("server");
    let mut config = skiff_apiserver::ServerConfig::new(data.clone());
    config.bind = "127.0.0.1:0".parse().expect("loopback");
    let server = skiff_apiserver::start(config).await.expect("apiserver starts");
    let kubeconfig = data.join(skiff_apiserver::KUBECONFIG).display().to_string();
    let admin = client(&server.url, &server.ca_pem, Some(&server.admin_token));
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // skiff token create / list.
    let out = skiff(s(&["token", "--kubeconfig", &kubeconfig, "create", "--ttl", "1h", "--description", "e2e node"])).await;
    assert!(out.status.success(), "token create: {}", text(&out));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (id, _) = skiff_apiserver::bootstrap_token::parse_token(&token).unwrap_or_else(|| panic!("kubeadm-shaped token: {token:?}"));
    let stored = Api::<Secret>::namespaced(admin.clone(), "kube-system").get(&format!("bootstrap-token-{id}")).await.expect("the token's Secret");
    assert_eq!(stored.type_.as_deref(), Some("bootstrap.kubernetes.io/token"));
    let field = |k: &str| String::from_utf8(stored.data.as_ref().and_then(|d| d.get(k)).expect(k).0.clone()).expect("utf8");
    assert_eq!(field("usage-bootstrap-authentication"), "true");
    let expires = chrono::DateTime::parse_from_rfc3339(&field("expiration")).expect("RFC 3339 expiration");
    let left = expires.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(left > chrono::Duration::minutes(58) && left <= chrono::Duration::hours(1), "ttl 1h, {left} left");
    let out = skiff(s(&["token", "--kubeconfig", &kubeconfig, "list"])).await;
    assert!(out.status.success(), "token list: {}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with(&token)).map(str::to_string).unwrap_or_else(|| panic!("{token} listed: {}", text(&out)));
    assert!(line.contains("authentication") && line.contains("e2e node") && line.contains(" 1h "), "{line}");

    // The join command pins the CA by its public key and names the published server.
    let out = skiff(s(&["token", "--kubeconfig", &kubeconfig, "create", "--print-join-command"])).await;
    assert!(out.status.success(), "token create --print-join-command: {}", text(&out));
    let join = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let words: Vec<&str> = join.split_whitespace().collect();
    assert_eq!(&words[..3], ["skiff", "agent", "--server"], "{join}");
    assert_eq!(words[3], server.url, "{join}");
    assert_eq!((words[4], words[6]), ("--token", "--ca-cert-hash"), "{join}");
    let join_token = words[5].to_string();
    assert_eq!(words[7], spki_hash(&server.ca_pem), "{join}");

    // A bootstrap token authenticates (403, not 401, where RBAC does not let it in).
    let boot_client = client(&server.url, &server.ca_pem, Some(&token));
    Api::<CertificateSigningRequest>::all(boot_client.clone()).list(&ListParams::default()).await.expect("a valid bootstrap token authenticates");
    assert_eq!(code(Api::<Namespace>::all(boot_client).list(&ListParams::default()).await.expect_err("namespaces")), 403);

    // Deleted, expired, malformed, wrong secret, or not for authentication: 401.
    let out = skiff(s(&["token", "--kubeconfig", &kubeconfig, "delete", &token])).await;
    assert!(out.status.success(), "token delete: {}", text(&out));
    let out = skiff(s(&["token", "--kubeconfig", &kubeconfig, "list"])).await;
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&token), "deleted token still listed: {}", text(&out));
    let out = skiff(s(&["token", "--kubeconfig", &kubeconfig, "delete", "NOT-A-TOKEN"])).await;
    assert!(!out.status.success() && text(&out).contains("neither a token id"), "bad id: {}", text(&out));
    bootstrap_secret(&admin, "expird", "0123456789abcdef", Some("2020-01-01T00:00:00Z"), true).await;
    bootstrap_secret(&admin, "nousag", "0123456789abcdef", None, false).await;
    bootstrap_secret(&admin, "forevr", "0123456789abcdef", None, true).await;
    for (bad, why) in [
        (token.as_str(), "deleted"),
        ("expird.0123456789abcdef", "expired"),
        ("nousag.0123456789abcdef", "no usage-bootstrap-authentication"),
        ("forevr.0123456789abcdeX", "wrong secret"),
        ("forevr.0123456789abcde", "malformed (short secret)"),
        ("FOREVR.0123456789abcdef", "malformed (upper case)"),
    ] {
        let e = Api::<Namespace>::all(client(&server.url, &server.ca_pem, Some(bad))).list(&ListParams::default()).await.expect_err(why);
        assert_eq!(code(e), 401, "{why}");
    }
    // A valid bootstrap token authenticates, and may only ask for a node certificate.
    let forever = client(&server.url, &server.ca_pem, Some("forevr.0123456789abcdef"));
    Api::<CertificateSigningRequest>::all(forever.clone())
        .list(&ListParams::default())
        .await
        .expect("a token without expiration authenticates");
    let e = Api::<Namespace>::all(forever.clone()).list(&ListParams::default()).await.expect_err("a bootstrap token lists no namespaces");
    assert_eq!(code(e), 403);
    let e = Api::<Node>::all(forever.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "by-token"}})).expect("node"))
        .await
        .expect_err("a bootstrap token registers no Node");
    assert_eq!(code(e), 403);

    // Anonymous: cluster-info and nothing else.
    let anon = client(&server.url, &server.ca_pem, None);
    let info = Api::<ConfigMap>::namespaced(anon.clone(), "kube-public").get("cluster-info").await.expect("cluster-info is public");
    let kc = kube::config::Kubeconfig::from_yaml(&info.data.expect("data")["kubeconfig"]).expect("cluster-info kubeconfig");
    let cluster = kc.clusters[0].cluster.clone().expect("cluster");
    assert_eq!(cluster.server.as_deref(), Some(server.url.as_str()));
    use base64::Engine as _;
    let published = base64::engine::general_purpose::STANDARD.decode(cluster.certificate_authority_data.expect("CA data")).expect("base64");
    assert_eq!(String::from_utf8(published).expect("pem"), server.ca_pem);
    assert!(kc.auth_infos.is_empty(), "cluster-info carries no credentials");
    assert_eq!(code(Api::<ConfigMap>::namespaced(anon.clone(), "kube-public").list(&ListParams::default()).await.expect_err("list")), 401);
    assert_eq!(code(Api::<ConfigMap>::namespaced(anon.clone(), "kube-system").get("cluster-info").await.expect_err("other ns")), 401);
    assert_eq!(code(Api::<Secret>::namespaced(anon.clone(), "kube-system").list(&ListParams::default()).await.expect_err("secrets")), 401);
    let mut cm = Api::<ConfigMap>::namespaced(admin.clone(), "kube-public").get("cluster-info").await.expect("get");
    cm.metadata.managed_fields = None;
    assert_eq!(code(Api::<ConfigMap>::namespaced(anon.clone(), "kube-public").replace("cluster-info", &PostParams::default(), &cm).await.expect_err("write")), 401);

    // `skiff agent` refuses a wrong CA hash (and a bootstrap token without one) before it
    // writes anything or registers.
    let agent_dir = tmp.path().join("agent");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let agent = |extra: &[&str]| {
        let mut v = s(&["agent", "--server", &server.url, "--token", &join_token, "--node-name", "wrong-ca", "--node-ip", "127.0.0.1", "--no-datapath", "--data-dir"]);
        v.push(agent_dir.display().to_string());
        v.extend(s(extra));
        v
    };
    let out = skiff(agent(&["--ca-cert-hash", &wrong])).await;
    assert!(!out.status.success(), "wrong hash accepted: {}", text(&out));
    assert!(text(&out).contains("refusing to join") && text(&out).contains(&spki_hash(&server.ca_pem)), "{}", text(&out));
    let out = skiff(agent(&[])).await;
    assert!(!out.status.success() && text(&out).contains("needs the server CA's hash"), "{}", text(&out));
    let out = skiff(agent(&["--ca-cert-hash", "sha256:abc"])).await;
    assert!(!out.status.success() && text(&out).contains("64 hex digits"), "{}", text(&out));
    assert!(!agent_dir.join("server-ca.crt").exists(), "nothing written on refusal");
    assert!(Api::<Node>::all(admin.clone()).get_opt("wrong-ca").await.expect("get").is_none(), "no Node registered on refusal");

    // A joined node: discovery as the agent does it (CA from cluster-info over an unverified
    // connection, kept because its hash is the pinned one), then everything with the CA pinned.
    let ca = {
        let mut config = kube::Config::new(server.url.parse().expect("url"));
        config.accept_invalid_certs = true;
        let cm = Api::<ConfigMap>::namespaced(kube::Client::try_from(config).expect("client"), "kube-public").get("cluster-info").await.expect("discovery");
        let kc = kube::config::Kubeconfig::from_yaml(&cm.data.expect("data")["kubeconfig"]).expect("kubeconfig");
        let raw = kc.clusters[0].cluster.clone().expect("cluster").certificate_authority_data.expect("ca");
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(raw).expect("b64")).expect("pem")
    };
    assert_eq!(spki_hash(&ca), words[7]);
    // TLS bootstrap, as the agent does it: the join token gets the node its own certificate.
    let joined = tls_bootstrap(&server.url, &ca, &client(&server.url, &ca, Some(&join_token)), "joined").await;
    let pods_dir = tmp.path().join("joined/pods");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let agent_addr = listener.local_addr().expect("addr");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let scfg = skiff_agent::server::ServerConfig {
        listen: agent_addr,
        token: String::new(),
        client_ca: Some(ca.clone()),
        node_name: "joined".into(),
        pods_dir: pods_dir.clone(),
        cert_names: vec!["127.0.0.1".into()],
    };
    let agent = tokio::spawn(skiff_agent::server::serve_listener(listener, scfg, joined.clone(), Arc::new(StandIn), stop_rx));
    let nodes = Api::<Node>::all(joined.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "joined"}})).expect("node");
    nodes.create(&PostParams::default(), &node).await.expect("the joined node registers with its own certificate");
    let other: Node = serde_json::from_value(json!({"metadata": {"name": "someone-else"}})).expect("node");
    assert_eq!(code(nodes.create(&PostParams::default(), &other).await.expect_err("another node's name")), 403);
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}], "daemonEndpoints": {"kubeletEndpoint": {"Port": agent_addr.port()}}}});
    nodes.patch_status("joined", &PatchParams::default(), &Patch::Merge(status)).await.expect("node status");
    let pods = Api::<Pod>::namespaced(admin.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"nodeName": "joined", "containers": [{"name": "c", "image": "x"}]}})).expect("pod");
    let uid = pods.create(&PostParams::default(), &pod).await.expect("pod").metadata.uid.expect("uid");
    let log_dir = pods_dir.join(&uid).join("logs/c");
    std::fs::create_dir_all(&log_dir).expect("log dir");
    std::fs::write(log_dir.join("0.log"), "2026-01-01T00:00:00.000000000Z stdout F hello from a joined node\n").expect("log");
    let logs = pods.logs("p", &Default::default()).await.expect("logs through the apiserver reach the joined agent");
    assert_eq!(logs, "hello from a joined node\n");

    // The endpoint itself: no certificate and the admin token, or no credential: 401.
    let direct = |auth: Option<String>| {
        let url = format!("https://{agent_addr}/containerLogs/default/p/c");
        async move {
            tokio::task::spawn_blocking(move || {
                let mut cmd = Command::new("curl");
                cmd.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", &url]);
                if let Some(a) = auth {
                    cmd.args(["-H", &a]);
                }
                String::from_utf8_lossy(&cmd.output().expect("curl").stdout).to_string()
            })
            .await
            .expect("join")
        }
    };
    if common::require("curl", Path::new("/usr/bin/curl").exists()) {
        assert_eq!(direct(Some(format!("Authorization: Bearer {}", server.admin_token))).await, "401");
        assert_eq!(direct(Some(format!("Authorization: Bearer {join_token}"))).await, "401");
        assert_eq!(direct(None).await, "401");
    }
    // The join token goes away (deleted, as an expired one would be refused): the node's
    // certificate still works, the token does not.
    let out = skiff(s(&["token", "--kubeconfig", &kubeconfig, "delete", join_token.split('.').next().unwrap_or_default()])).await;
    assert!(out.status.success(), "token delete: {}", text(&out));
    let e = Api::<CertificateSigningRequest>::all(client(&server.url, &ca, Some(&join_token))).list(&ListParams::default()).await.expect_err("deleted token");
    assert_eq!(code(e), 401);
    nodes
        .patch_status("joined", &PatchParams::default(), &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})))
        .await
        .expect("the node writes its status with its certificate after its token is gone");
    let _ = stop.send(true);
    let _ = agent.await;
    server.stop().await;
}

/// Posts a CSR for `system:node:<name>` with the bootstrap client and builds a client from the
/// certificate the apiserver signs (what `skiff agent` does when it joins).
async fn tls_bootstrap(url: &str, ca_pem: &str, boot: &kube::Client, name: &str) -> kube::Client {
    use base64::Engine as _;
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("system:node:{name}"));
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "system:nodes");
    let request = params.serialize_request(&key).expect("csr").pem().expect("pem");
    let csr: CertificateSigningRequest = serde_json::from_value(json!({
        "metadata": {"generateName": "node-csr-"},
        "spec": {"request": base64::engine::general_purpose::STANDARD.encode(request),
                 "signerName": "kubernetes.io/kube-apiserver-client-kubelet", "usages": ["digital signature", "client auth"]}}))
    .expect("csr object");
    let created = Api::<CertificateSigningRequest>::all(boot.clone()).create(&PostParams::default(), &csr).await.expect("the bootstrap token posts a CSR");
    let cert = created.status.and_then(|s| s.certificate).expect("the CSR is signed at once");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\nusers:\n- name: n\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: n}}\ncurrent-context: c\n",
        b64(ca_pem.as_bytes()), b64(&cert.0), b64(key.serialize_pem().as_bytes()));
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
    kube::Client::try_from(config).expect("node client")
}
