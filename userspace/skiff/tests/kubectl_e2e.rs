//! Real kubectl 1.32 against a real `skiff server`, as a new user would drive it: fresh HOME, the
//! kubeconfig the server wrote, default validation.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

const APP_V1: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: shop
data:
  greeting: hello
---
apiVersion: v1
kind: Secret
metadata:
  name: web-secret
  namespace: shop
stringData:
  password: s3cret
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels:
    app: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: skiff/echo:1.0
        env:
        - name: A
          value: "1"
        - name: B
          value: "2"
        ports:
        - containerPort: 8080
      - name: sidecar
        image: skiff/sidecar:1.0
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  namespace: shop
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: migrate
        image: skiff/echo:1.0
        command: ["true"]
"#;

/// The same file after a user's edit: new image, env B changed and A removed, C added, another
/// container port, the sidecar removed, a second Service port.
fn app_v2() -> String {
    APP_V1
        .replace("image: skiff/echo:1.0\n        env:", "image: skiff/echo:2.0\n        env:")
        .replace(
            "        - name: A\n          value: \"1\"\n        - name: B\n          value: \"2\"\n",
            "        - name: B\n          value: \"20\"\n        - name: C\n          value: \"3\"\n",
        )
        .replace(
            "        - containerPort: 8080\n      - name: sidecar\n        image: skiff/sidecar:1.0\n",
            "        - containerPort: 8080\n        - containerPort: 9090\n          name: metrics\n",
        )
        .replace(
            "    targetPort: 8080\n",
            "    targetPort: 8080\n  - name: metrics\n    port: 9090\n",
        )
}

fn write_manifest(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write manifest");
    path.to_string_lossy().to_string()
}

#[test]
fn kubectl_drives_the_whole_lifecycle() {
    let Some(bin) = kubectl_path() else {
        require("kubectl 1.32 (/usr/lib/google-cloud-sdk/bin/kubectl.1.32)", false);
        return;
    };
    let server = Server::start(&[]);
    let k = Kubectl::new(bin, &server.kubeconfig());
    let files = tempfile::tempdir().expect("tmp");
    let v1 = write_manifest(files.path(), "app.yaml", APP_V1);

    // apply with default (server-side Strict) validation creates all six objects.
    let out = k.ok(&["apply", "-f", &v1]);
    for line in [
        "namespace/shop created",
        "configmap/web-config created",
        "secret/web-secret created",
        "deployment.apps/web created",
        "service/web created",
        "job.batch/migrate created",
    ] {
        assert!(out.contains(line), "apply output lacks {line:?}:\n{out}");
    }

    // Server-side defaulting and allocation.
    let svc = k.json(&["get", "svc", "web", "-n", "shop"]);
    let cluster_ip = svc["spec"]["clusterIP"].as_str().expect("clusterIP allocated").to_string();
    assert!(cluster_ip.starts_with("10.9") || cluster_ip.starts_with("10.10"), "clusterIP {cluster_ip} outside 10.96.0.0/12");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
    let secret = k.json(&["get", "secret", "web-secret", "-n", "shop"]);
    assert_eq!(secret["data"]["password"], "czNjcmV0", "stringData must become base64 data");
    assert!(secret.get("stringData").is_none());
    let deploy = k.json(&["get", "deploy", "web", "-n", "shop"]);
    assert_eq!(deploy["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(deploy["spec"]["revisionHistoryLimit"], 10);
    assert_eq!(deploy["spec"]["progressDeadlineSeconds"], 600);
    assert_eq!(deploy["metadata"]["generation"], 1);
    assert!(deploy["metadata"]["uid"].as_str().is_some_and(|u| u.len() >= 32));
    assert!(deploy["metadata"]["creationTimestamp"].as_str().is_some());

    // Re-apply after editing: exactly the edited object.
    let v2 = write_manifest(files.path(), "app-v2.yaml", &app_v2());
    let out = k.ok(&["apply", "-f", &v2]);
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    assert!(out.contains("service/web configured"), "{out}");
    assert!(out.contains("configmap/web-config unchanged"), "{out}");
    let deploy = k.json(&["get", "deploy", "web", "-n", "shop"]);
    let containers = deploy["spec"]["template"]["spec"]["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "the sidecar must be gone: {containers:?}");
    assert_eq!(containers[0]["image"], "skiff/echo:2.0");
    let env: Vec<(String, String)> = containers[0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or("").into(), e["value"].as_str().unwrap_or("").into()))
        .collect();
    assert_eq!(env, vec![("B".into(), "20".into()), ("C".into(), "3".into())]);
    let ports: Vec<i64> = containers[0]["ports"].as_array().expect("ports").iter().filter_map(|p| p["containerPort"].as_i64()).collect();
    assert_eq!(ports, vec![8080, 9090]);
    assert_eq!(deploy["metadata"]["generation"], 2, "a spec change bumps generation");
    let svc = k.json(&["get", "svc", "web", "-n", "shop"]);
    assert_eq!(svc["spec"]["ports"].as_array().map(|p| p.len()), Some(2));
    assert_eq!(svc["spec"]["clusterIP"], cluster_ip.as_str(), "re-apply keeps the clusterIP");

    // Tables with the columns kubectl users know.
    let out = k.ok(&["get", "deploy", "-n", "shop"]);
    let header = out.lines().next().unwrap_or("");
    for col in ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"] {
        assert!(header.contains(col), "deployments header lacks {col}: {out}");
    }
    let out = k.ok(&["get", "svc", "-n", "shop", "-o", "wide"]);
    for col in ["TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "SELECTOR"] {
        assert!(out.lines().next().unwrap_or("").contains(col), "services wide header lacks {col}: {out}");
    }
    assert!(out.contains(&cluster_ip) && out.contains("80/TCP,9090/TCP"), "{out}");
    let out = k.ok(&["get", "all", "-n", "shop"]);
    assert!(out.contains("service/web") && out.contains("deployment.apps/web") && out.contains("job.batch/migrate"), "get all: {out}");
    let out = k.ok(&["get", "ns", "-A", "--show-labels"]);
    assert!(out.contains("shop") && out.contains("LABELS"), "{out}");
    let out = k.ok(&["get", "cm", "-A", "--sort-by", ".metadata.name"]);
    assert!(out.contains("web-config"), "{out}");
    let name = k.ok(&["get", "deploy", "web", "-n", "shop", "-o", "jsonpath={.spec.template.spec.containers[0].image}"]);
    assert_eq!(name, "skiff/echo:2.0");
    let yaml = k.ok(&["get", "cm", "web-config", "-n", "shop", "-o", "yaml"]);
    assert!(yaml.contains("greeting: hello"), "{yaml}");

    // get -w streams a later change.
    let mut watch = k
        .command(&["get", "cm", "-n", "shop", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    let stdout = watch.stdout.take().expect("watch stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The initial state first, then the change.
    let first = rx.recv_timeout(Duration::from_secs(20)).expect("watch prints the current state");
    assert!(first.contains("NAME") || first.contains("web-config"), "{first}");
    // (An applied file; `kubectl create configmap`'s protobuf body is tested in the apiserver's
    // tests/kubectl_protobuf.rs.
    // Not `x: y`: YAML 1.1, which kubectl uses, reads a bare y as the boolean true, and a
    // ConfigMap value must be a string, so real Kubernetes refuses that file too.)
    let later = write_manifest(files.path(), "later.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: later\n  namespace: shop\ndata:\n  x: \"z\"\n");
    k.ok(&["apply", "-f", &later]);
    let seen = eventually("the watch to print the new configmap", Duration::from_secs(20), || {
        rx.try_recv().ok().filter(|l| l.contains("later"))
    });
    assert!(seen.contains("ADDED"), "{seen}");
    let _ = watch.kill();
    let _ = watch.wait();

    // describe, scale, label, annotate.
    let out = k.ok(&["describe", "deploy", "web", "-n", "shop"]);
    assert!(out.contains("skiff/echo:2.0") && out.contains("Replicas:"), "{out}");
    k.ok(&["scale", "deploy", "web", "-n", "shop", "--replicas=5"]);
    assert_eq!(k.json(&["get", "deploy", "web", "-n", "shop"])["spec"]["replicas"], 5);
    k.ok(&["label", "deploy", "web", "-n", "shop", "tier=frontend"]);
    k.ok(&["annotate", "deploy", "web", "-n", "shop", "owner=team-a"]);
    let deploy = k.json(&["get", "deploy", "-n", "shop", "-l", "tier=frontend"]);
    assert_eq!(deploy["items"].as_array().map(|i| i.len()), Some(1));
    assert_eq!(deploy["items"][0]["metadata"]["annotations"]["owner"], "team-a");
    let none = k.json(&["get", "deploy", "-n", "shop", "-l", "tier=backend"]);
    assert_eq!(none["items"].as_array().map(|i| i.len()), Some(0));

    // patch, three ways.
    k.ok(&["patch", "deploy", "web", "-n", "shop", "--type", "strategic", "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","env":[{"name":"D","value":"4"}]}]}}}}"#]);
    let env = k.json(&["get", "deploy", "web", "-n", "shop"])["spec"]["template"]["spec"]["containers"][0]["env"].clone();
    let names: Vec<&str> = env.as_array().map(|a| a.iter().filter_map(|e| e["name"].as_str()).collect()).unwrap_or_default();
    // Kubernetes' strategic merge (normalizeElementOrder/mergeSortedSlice) puts the patch's new
    // element before the live-only ones when the patch carries no $setElementOrder: D, B, C.
    assert_eq!(names, vec!["D", "B", "C"], "strategic patch merges env by name");
    k.ok(&["patch", "cm", "web-config", "-n", "shop", "--type", "merge", "-p", r#"{"data":{"greeting":null,"other":"x"}}"#]);
    let cm = k.json(&["get", "cm", "web-config", "-n", "shop"]);
    assert_eq!(cm["data"], serde_json::json!({"other": "x"}));
    k.ok(&["patch", "cm", "web-config", "-n", "shop", "--type", "json", "-p", r#"[{"op":"add","path":"/data/third","value":"3"}]"#]);
    assert_eq!(k.json(&["get", "cm", "web-config", "-n", "shop"])["data"]["third"], "3");
    let err = k.fails(&["patch", "cm", "web-config", "-n", "shop", "--type", "json", "-p", r#"[{"op":"replace","path":"/data/missing","value":"3"}]"#]);
    assert!(!err.is_empty());
    assert_eq!(k.json(&["get", "cm", "web-config", "-n", "shop"])["data"], serde_json::json!({"other": "x", "third": "3"}), "a failed patch changes nothing");

    // diff shows a pending change without making it (dryRun=All on the server).
    let v3 = write_manifest(files.path(), "app-v3.yaml", &app_v2().replace("skiff/echo:2.0", "skiff/echo:3.0"));
    let diff = k.run_with_stdin(&["diff", "-f", &v3], None);
    assert_eq!(diff.status.code(), Some(1), "kubectl diff exits 1 when there are differences: {}", String::from_utf8_lossy(&diff.stderr));
    assert!(String::from_utf8_lossy(&diff.stdout).contains("skiff/echo:3.0"));
    assert_eq!(k.json(&["get", "deploy", "web", "-n", "shop"])["spec"]["template"]["spec"]["containers"][0]["image"], "skiff/echo:2.0", "diff must not change the object");

    // explain reads the real OpenAPI schemas.
    let out = k.ok(&["explain", "deployment.spec.strategy"]);
    assert!(out.contains("rollingUpdate") && out.contains("DeploymentStrategy"), "{out}");

    // Strict validation: an unknown field is refused and nothing is created.
    let bad = write_manifest(files.path(), "bad.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad\n  namespace: shop\ndatta:\n  x: y\n");
    let err = k.fails(&["apply", "-f", &bad]);
    assert!(err.contains("datta"), "the error names the unknown field: {err}");
    k.fails(&["get", "cm", "bad", "-n", "shop"]);

    // delete -f of the whole file, namespace included: the namespace empties and goes.
    k.ok(&["delete", "-f", &v2]);
    eventually("namespace shop to be gone", Duration::from_secs(60), || {
        let out = k.run_with_stdin(&["get", "ns", "shop"], None);
        (!out.status.success()).then_some(())
    });
    let left = k.json(&["get", "cm", "-A", "--field-selector", "metadata.namespace=shop"]);
    assert_eq!(left["items"].as_array().map(|i| i.len()), Some(0), "nothing is left in the namespace: {left}");
}

#[test]
fn without_a_token_the_server_answers_401() {
    let Some(bin) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    let server = Server::start(&[]);
    let text = std::fs::read_to_string(server.kubeconfig()).expect("kubeconfig");
    // kubectl prompts for a username (and fails with "EOF" on a closed stdin) before sending
    // anything when the user entry has no credentials at all, so the server would never be asked:
    // send a token that is not the admin's instead. (Requests with no Authorization header at all
    // are checked over raw HTTPS in skiff-apiserver's tests/api.rs.)
    let stripped: String = text
        .lines()
        .map(|l| if l.trim_start().starts_with("token:") { "    token: not-the-admin-token" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    let tmp = tempfile::tempdir().expect("tmp");
    let anon = tmp.path().join("anon.kubeconfig");
    std::fs::write(&anon, stripped).expect("write");
    let k = Kubectl::new(bin, &anon);
    let err = k.fails(&["get", "ns"]);
    assert!(err.contains("Unauthorized") || err.contains("401") || err.contains("provide credentials"), "{err}");
}

#[test]
fn skiff_kubeconfig_prints_what_the_server_wrote() {
    let server = Server::start(&[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["kubeconfig", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .expect("skiff kubeconfig");
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    let written = std::fs::read_to_string(server.kubeconfig()).expect("kubeconfig");
    assert_eq!(printed.trim(), written.trim());
    let doc: Value = serde_yaml_from(&printed);
    assert!(doc["clusters"][0]["cluster"]["server"].as_str().is_some_and(|s| s.starts_with("https://")));
}

fn serde_yaml_from(text: &str) -> Value {
    // kubeconfig is YAML; kubectl can convert it, but a tiny check needs only the server line.
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    serde_json::json!({"clusters": [{"cluster": {"server": server}}]})
}

/// `skiff server` runs the controllers and the scheduler beside the apiserver: a Deployment gets
/// its ReplicaSet and pods, and with no node to run them the scheduler says so the way
/// kube-scheduler does.
#[test]
fn server_runs_the_controllers_and_the_scheduler() {
    let Some(bin) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    let server = Server::start(&[]);
    let k = Kubectl::new(bin, &server.kubeconfig());
    let files = tempfile::tempdir().expect("tmp");
    let manifest = write_manifest(files.path(), "web.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: default\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: web\n        image: skiff/echo:1.0\n");
    k.ok(&["apply", "-f", &manifest]);
    let pods = eventually("the Deployment's pods to be created", Duration::from_secs(30), || {
        let pods = k.json(&["get", "pods", "-l", "app=web"]);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        (items.len() == 2).then_some(items)
    });
    let rs = k.json(&["get", "rs", "-l", "app=web"]);
    assert_eq!(rs["items"].as_array().map(|i| i.len()), Some(1), "one ReplicaSet: {rs}");
    assert!(pods.iter().all(|p| p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"));
    let message = eventually("the scheduler to mark a pod unschedulable", Duration::from_secs(30), || {
        let pods = k.json(&["get", "pods", "-l", "app=web"]);
        pods["items"].as_array()?.iter().find_map(|p| {
            p["status"]["conditions"].as_array()?.iter().find_map(|c| {
                (c["type"] == "PodScheduled" && c["status"] == "False").then(|| c["message"].as_str().unwrap_or("").to_string())
            })
        })
    });
    // kube-scheduler's words when the cluster has no node at all.
    assert_eq!(message, "no nodes available to schedule pods");
}
