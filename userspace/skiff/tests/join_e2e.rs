//! A node that joins over the network with a bootstrap token, on a real `skiff up` cluster: node
//! 2's agent is stopped, its Node deleted, and the real `skiff agent` started again in the node's
//! namespace with the join command (`--server --token --ca-cert-hash`) instead of the admin
//! kubeconfig. It must discover and pin the CA, register its Node, run a pod (runc), and serve
//! `kubectl logs` and `kubectl exec` through the apiserver (client certificate, no admin token on
//! the node). A wrong CA hash is refused by the same binary in the same namespace. Node 1 keeps
//! its admin kubeconfig, and logs/exec work there too (its endpoint trusts the kubeconfig's CA).
//!
//! Node credentials (TLS bootstrap): every `skiff up` agent starts from a bootstrap kubeconfig
//! and ends up with its own client certificate (`system:node:<name>`); the rejoined node gets
//! a new one through a CSR with the join token, keeps working after that token is deleted and
//! the agent restarted, and its pod gets a service-account token bound to it (with the CA and
//! namespace) that RBAC allows nothing, while a pod with automountServiceAccountToken: false
//! gets none.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;
use serde_json::Value;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: joined-pod, namespace: default}
spec:
  nodeName: NODE
  containers:
  - name: c
    image: skiff/echo:1.0
    command: ["sh", "-c", "echo hello-from-a-joined-node; exec sleep 100000"]
"#;

fn skiff(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_skiff")).args(args).output().expect("run skiff")
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
}

#[test]
fn an_agent_joins_with_a_bootstrap_token_and_serves_logs_and_exec() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0) || !require("runc", have("runc")) || !require("curl", have("curl")) {
        return;
    }
    ensure_sibling_binaries();
    let image = echo_image();
    let mut cluster = Cluster::up(2, &image);
    let k = Kubectl::new(kubectl, &cluster.kubeconfig);
    let admin_kubeconfig = cluster.kubeconfig.display().to_string();
    let lab_path = cluster.dir.path().join("lab.json");
    let mut lab: Value = serde_json::from_slice(&std::fs::read(&lab_path).expect("lab.json")).expect("lab.json parses");
    let node = lab["nodes"][1].clone();
    let (name, netns, ip) = (node["name"].as_str().expect("name").to_string(), node["netns"].as_str().expect("netns").to_string(), node["ip"].as_str().expect("ip").to_string());
    let args: Vec<String> = serde_json::from_value(node["agent_args"].clone()).expect("recorded agent args");
    let kc_at = args.iter().position(|a| a == "--kubeconfig").expect("the agent was started with --kubeconfig");
    let agent_kubeconfig = kube::config::Kubeconfig::read_from(&args[kc_at + 1]).expect("the agent's kubeconfig");
    let server = agent_kubeconfig.clusters[0].cluster.as_ref().and_then(|c| c.server.clone()).expect("server URL");

    // The join command, as an operator gets it.
    let out = skiff(&["token", "--kubeconfig", &admin_kubeconfig, "create", "--ttl", "30m", "--print-join-command", "--server", &server]);
    assert!(out.status.success(), "token create: {}", text(&out));
    let join = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let words: Vec<&str> = join.split_whitespace().collect();
    assert_eq!((words.len(), words[2], words[4], words[6]), (8, "--server", "--token", "--ca-cert-hash"), "{join}");
    let (token, hash) = (words[5].to_string(), words[7].to_string());

    // A wrong pin is refused by the real binary from the node's namespace.
    let scratch = cluster.dir.path().join("wrong-pin");
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = skiff(&["agent", "--netns", &netns, "--server", &server, "--token", &token, "--ca-cert-hash", &wrong, "--node-name", "wrong-pin", "--node-ip", &ip, "--no-datapath", "--data-dir", &scratch.display().to_string()]);
    assert!(!out.status.success() && text(&out).contains("refusing to join") && text(&out).contains(&hash), "wrong pin: {}", text(&out));
    assert!(!scratch.join("server-ca.crt").exists());

    // Node 2 leaves (agent stopped by its PID, Node deleted) and comes back by joining.
    let old_pid = node["agent_pid"].as_u64().expect("agent pid") as u32;
    // SAFETY: kill(2) on the PID skiff up started and recorded for this cluster.
    assert_eq!(unsafe { libc::kill(old_pid as i32, libc::SIGTERM) }, 0, "stopping the old agent");
    eventually("the old agent to exit", Duration::from_secs(20), || (!alive(old_pid)).then_some(()));
    k.ok(&["delete", "node", &name, "--wait=true"]);
    // skiff up's agent already got node 2 a certificate (from the bootstrap kubeconfig): remove
    // it so this join really goes through a CSR with the join token.
    let data_dir = args[args.iter().position(|a| a == "--data-dir").expect("--data-dir") + 1].clone();
    let cert_file = std::path::Path::new(&data_dir).join("pki/node-client.crt");
    assert_eq!(node_cert_cn(&cert_file), format!("system:node:{name}"), "skiff up's agent has its node identity");
    std::fs::remove_dir_all(std::path::Path::new(&data_dir).join("pki")).expect("remove the node's pki");
    let mut joined_args = args.clone();
    joined_args.splice(kc_at..kc_at + 2, ["--server".to_string(), server.clone(), "--token".to_string(), token.clone(), "--ca-cert-hash".to_string(), hash.clone()]);
    lab["nodes"][1]["agent_args"] = serde_json::json!(joined_args);
    let tmp = lab_path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&lab).expect("json")).expect("write lab.json");
    std::fs::rename(&tmp, &lab_path).expect("replace lab.json");
    let out = skiff(&["up", "--data-dir", &cluster.dir.path().display().to_string(), "--restart-agent", &name]);
    assert!(out.status.success(), "restarting node 2's agent with the join command: {}", text(&out));
    let lab: Value = serde_json::from_slice(&std::fs::read(&lab_path).expect("lab.json")).expect("lab.json");
    let new_pid = lab["nodes"][1]["agent_pid"].as_u64().expect("new pid") as u32;
    let cmdline = std::fs::read(format!("/proc/{new_pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains(&format!("--token {token}")) && !cmdline.contains("--kubeconfig"), "joined with the token only: {cmdline}");

    eventually("the joined node Ready", Duration::from_secs(120), || {
        // NotFound until the joined agent registered it.
        let out = k.command(&["get", "node", &name, "-o", "json"]).output().ok()?;
        let n: Value = serde_json::from_slice(&out.stdout).ok()?;
        let ready = n["status"]["conditions"].as_array()?.iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
        ready.then_some(())
    });
    assert_eq!(node_cert_cn(&cert_file), format!("system:node:{name}"), "the joined agent got its certificate through a CSR");
    let pinned = std::fs::read_to_string(std::path::Path::new(&data_dir).join("server-ca.crt")).expect("the discovered CA is saved");
    let admin = kube::config::Kubeconfig::read_from(&cluster.kubeconfig).expect("admin kubeconfig");
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.decode(admin.clusters[0].cluster.as_ref().and_then(|c| c.certificate_authority_data.clone()).expect("CA")).expect("b64");
    assert_eq!(pinned.as_bytes(), ca.as_slice(), "the pinned CA is the cluster's");

    // A pod on the joined node: logs and exec through the apiserver.
    k.run_with_stdin(&["apply", "-f", "-"], Some(&POD.replace("NODE", &name)));
    eventually("joined-pod Running", Duration::from_secs(120), || {
        (k.json(&["get", "pod", "joined-pod", "-o", "json"])["status"]["phase"] == "Running").then_some(())
    });
    let logs = eventually("joined-pod's log", Duration::from_secs(30), || {
        let out = k.command(&["logs", "joined-pod"]).output().ok()?;
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        s.contains("hello-from-a-joined-node").then_some(s)
    });
    assert_eq!(logs.trim(), "hello-from-a-joined-node");
    let out = k.run_with_stdin(&["exec", "joined-pod", "--", "sh", "-c", "echo exec-on-$(hostname); exit 3"], None);
    assert_eq!(out.status.code(), Some(3), "exec's exit code: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "exec-on-joined-pod");

    // Node 1 still runs with the admin kubeconfig: its endpoint knows the apiserver by the CA in
    // that kubeconfig (the apiserver sends no token to any agent now).
    let node1 = lab["nodes"][0]["name"].as_str().expect("node 1").to_string();
    let kc_pod = POD.replace("joined-pod", "kc-pod").replace("NODE", &node1).replace("hello-from-a-joined-node", "hello-from-a-kubeconfig-node");
    k.run_with_stdin(&["apply", "-f", "-"], Some(&kc_pod));
    eventually("kc-pod's log", Duration::from_secs(120), || {
        let out = k.command(&["logs", "kc-pod"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).contains("hello-from-a-kubeconfig-node").then_some(())
    });
    let out = k.run_with_stdin(&["exec", "kc-pod", "--", "sh", "-c", "exit 4"], None);
    assert_eq!(out.status.code(), Some(4), "exec on the kubeconfig node: {}", text(&out));

    // The joined node's endpoint takes no bearer token (it was given none): only the apiserver's
    // certificate.
    let admin_token = std::fs::read_to_string(cluster.dir.path().join("server").join("admin.token")).expect("admin token");
    let url = format!("https://{ip}:10250/containerLogs/default/joined-pod/c");
    for auth in [format!("Authorization: Bearer {}", admin_token.trim()), format!("Authorization: Bearer {token}"), String::new()] {
        let mut curl = Command::new("curl");
        curl.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", &url]);
        if !auth.is_empty() {
            curl.args(["-H", &auth]);
        }
        let code = String::from_utf8_lossy(&curl.output().expect("curl").stdout).to_string();
        assert_eq!(code, "401", "the joined agent endpoint with {:?}", auth.split(' ').take(2).collect::<Vec<_>>());
    }

    // The pod's service-account token, as the agent projected it.
    let sa_file = |f: &str| {
        let out = k.run_with_stdin(&["exec", "joined-pod", "--", "cat", &format!("/var/run/secrets/kubernetes.io/serviceaccount/{f}")], None);
        assert!(out.status.success(), "cat {f}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(sa_file("namespace"), "default");
    assert_eq!(sa_file("ca.crt").as_bytes(), ca.as_slice(), "the cluster CA");
    let pod_token = sa_file("token");
    let api = |token: &str, path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--cacert", &cluster.dir.path().join("server/ca.crt").display().to_string(),
                   "-H", &format!("Authorization: Bearer {token}"), &format!("{server}{path}")])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(api(&pod_token, "/api"), "200", "the pod's token authenticates");
    assert_eq!(api(&pod_token, "/api/v1/namespaces/default/pods"), "403", "and is allowed nothing RBAC does not grant");
    let mut tampered = pod_token.clone().into_bytes();
    let at = tampered.len() - 3;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    assert_eq!(api(&String::from_utf8(tampered).expect("ascii"), "/api"), "401", "a tampered token");
    k.run_with_stdin(&["apply", "-f", "-"], Some(&NO_TOKEN_POD.replace("NODE", &name)));
    eventually("no-token-pod Running", Duration::from_secs(120), || {
        (k.json(&["get", "pod", "no-token-pod", "-o", "json"])["status"]["phase"] == "Running").then_some(())
    });
    let out = k.run_with_stdin(&["exec", "no-token-pod", "--", "ls", "/var/run/secrets/kubernetes.io/serviceaccount"], None);
    assert!(!out.status.success(), "automountServiceAccountToken: false mounts nothing: {}", text(&out));
    k.ok(&["delete", "pod", "joined-pod", "--grace-period=1", "--wait=true"]);
    eventually("the deleted pod's token refused", Duration::from_secs(30), || (api(&pod_token, "/api") == "401").then_some(()));

    // The join token goes; the node does not: restarted, it uses its certificate.
    let out = skiff(&["token", "--kubeconfig", &admin_kubeconfig, "delete", token.split('.').next().expect("token id")]);
    assert!(out.status.success(), "token delete: {}", text(&out));
    assert_eq!(api(&token, "/apis/certificates.k8s.io/v1/certificatesigningrequests"), "401", "the join token is dead");
    let out = skiff(&["up", "--data-dir", &cluster.dir.path().display().to_string(), "--restart-agent", &name]);
    assert!(out.status.success(), "restarting node 2's agent after its token was deleted: {}", text(&out));
    let restarted = std::time::SystemTime::now();
    eventually("the node's Lease renewed after the restart", Duration::from_secs(60), || {
        let lease = k.json(&["get", "lease", "-n", "kube-node-lease", &name, "-o", "json"]);
        let renew = lease["spec"]["renewTime"].as_str()?;
        let t = chrono::DateTime::parse_from_rfc3339(renew).ok()?;
        (std::time::SystemTime::from(t) > restarted).then_some(())
    });
    k.ok(&["delete", "pod", "kc-pod", "no-token-pod", "--wait=false"]);
    cluster.down();
}

const NO_TOKEN_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: no-token-pod, namespace: default}
spec:
  nodeName: NODE
  automountServiceAccountToken: false
  containers:
  - name: c
    image: skiff/echo:1.0
    command: ["sh", "-c", "exec sleep 100000"]
"#;

/// The CommonName of a PEM certificate file.
fn node_cert_cn(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes()).expect("PEM");
    let cert = pem.parse_x509().expect("x509");
    cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).expect("CN").to_string()
}
