//! Pods on a `skiff up` cluster behave as kubelet's do, seen through real kubectl: a container
//! over its memory limit is OOMKilled and restarted (RESTARTS counts it); a failing liveness
//! probe restarts its container; readiness gates the pod's endpoints; a pod resolves a Service
//! by name through cluster DNS and reaches it; a node whose agent and namespace are gone goes
//! NotReady and its pods come back on the other nodes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: pods}
---
apiVersion: v1
kind: Pod
metadata: {name: oom, namespace: pods}
spec:
  containers:
  - name: hog
    image: skiff/echo:1.0
    command: ["sh", "-c", "echo start; head -c 300m /dev/zero | tail"]
    resources: {limits: {memory: 32Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: unhealthy, namespace: pods}
spec:
  containers:
  - name: web
    image: skiff/echo:1.0
    ports: [{name: http, containerPort: 8080}]
    livenessProbe:
      httpGet: {path: /no-such-page, port: http}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {name: gated, namespace: pods, labels: {app: gated}}
spec:
  containers:
  - name: web
    image: skiff/echo:1.0
    command: ["sh", "-c", "(sleep 8; touch /tmp/ready) & exec /usr/local/bin/skiff-echo"]
    readinessProbe:
      exec: {command: ["test", "-f", "/tmp/ready"]}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: gated, namespace: pods}
spec:
  selector: {app: gated}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

const DNS_CLIENT: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: dns-client, namespace: pods}
spec:
  restartPolicy: Never
  containers:
  - name: client
    image: skiff/echo:1.0
    # busybox-static's wget cannot resolve names (static glibc has no NSS) and crashes with -T:
    # resolve with nslookup (the search path: the short name), then fetch by the address.
    command: ["sh", "-c", "nslookup gated.pods.svc.cluster.local && ip=$(nslookup gated | awk '/^Address: /{print $2}' | tail -1) && echo resolved $ip && wget -q -O- http://$ip/ | grep gated"]
"#;

const SPREAD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: spread, namespace: pods}
spec:
  replicas: 3
  selector: {matchLabels: {app: spread}}
  template:
    metadata: {labels: {app: spread}}
    spec:
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      - {key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      # Preferred, not required: once a node is lost, two replicas must fit on one node.
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            podAffinityTerm: {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: spread}}}
      containers:
      - {name: echo, image: skiff/echo:1.0}
"#;

fn pod(k: &Kubectl, name: &str) -> serde_json::Value {
    k.json(&["get", "pod", name, "-n", "pods", "-o", "json"])
}

fn container_status(p: &serde_json::Value) -> serde_json::Value {
    p["status"]["containerStatuses"][0].clone()
}

#[test]
fn pods_restart_probe_resolve_and_move_off_a_lost_node() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0) || !require("runc", have("runc")) {
        return;
    }
    ensure_sibling_binaries();
    let image = echo_image();
    let mut cluster = Cluster::up_with(3, &image, &["--server-arg=--node-monitor-grace-period=6s", "--server-arg=--node-monitor-period=1s", "--agent-arg=--heartbeat-interval=1s"]);
    let k = Kubectl::new(kubectl, &cluster.kubeconfig);
    k.run_with_stdin(&["apply", "-f", "-"], Some(PODS));

    // Readiness gates the endpoints: not ready (and not an endpoint that gets traffic) first...
    eventually("gated Running but not Ready", Duration::from_secs(60), || {
        let p = pod(&k, "gated");
        (p["status"]["phase"] == "Running" && container_status(&p)["ready"] == false).then_some(())
    });
    let slice_ready = |k: &Kubectl| -> Option<bool> {
        let slices = k.json(&["get", "endpointslices", "-n", "pods", "-l", "kubernetes.io/service-name=gated", "-o", "json"]);
        slices["items"].as_array()?.iter().flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default()).map(|e| e["conditions"]["ready"] == true).next()
    };
    assert_ne!(slice_ready(&k), Some(true), "a not-ready pod is not a ready endpoint");
    // ...then Ready once its probe passes, and a ready endpoint.
    eventually("gated Ready and a ready endpoint", Duration::from_secs(30), || {
        let p = pod(&k, "gated");
        (container_status(&p)["ready"] == true && slice_ready(&k) == Some(true)).then_some(())
    });

    // OOM: killed at its limit, reported as OOMKilled, restarted and counted.
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let oom = eventually_or("oom restarted after an OOM kill", Duration::from_secs(90), || {
        let cs = container_status(&pod(&k, "oom"));
        *last.borrow_mut() = cs.clone();
        (cs["restartCount"].as_i64().unwrap_or(0) >= 1 && cs["lastState"]["terminated"]["reason"] == "OOMKilled").then_some(cs)
    }, || format!("last status: {}\n{}", last.borrow(), cluster.agent_logs()));
    assert_eq!(oom["lastState"]["terminated"]["exitCode"], 137, "{oom}");
    let table = k.ok(&["get", "pod", "oom", "-n", "pods"]);
    assert!(table.lines().nth(1).is_some_and(|l| l.split_whitespace().nth(3).is_some_and(|r| r != "0")), "RESTARTS counts the OOM kill:\n{table}");

    // Liveness: a failing probe restarts the container.
    eventually("unhealthy restarted by its liveness probe", Duration::from_secs(60), || {
        (container_status(&pod(&k, "unhealthy"))["restartCount"].as_i64().unwrap_or(0) >= 1).then_some(())
    });
    let events = k.ok(&["get", "events", "-n", "pods", "--field-selector", "involvedObject.name=unhealthy"]);
    assert!(events.contains("Killing"), "a Killing event for the liveness restart:\n{events}");

    // Cluster DNS: a pod resolves the Service by name and reaches it.
    k.run_with_stdin(&["apply", "-f", "-"], Some(DNS_CLIENT));
    let phase = eventually("dns-client finished", Duration::from_secs(60), || {
        let p = pod(&k, "dns-client");
        let phase = p["status"]["phase"].as_str().unwrap_or_default().to_string();
        (phase == "Succeeded" || phase == "Failed").then_some(phase)
    });
    assert_eq!(phase, "Succeeded", "nslookup + wget of gated.pods.svc.cluster.local from a pod\n{}", cluster.agent_logs());

    // A lost node: its agent killed and its namespace deleted. It goes NotReady and its pods
    // are recreated on the other two.
    k.run_with_stdin(&["apply", "-f", "-"], Some(SPREAD));
    let spread_nodes = |k: &Kubectl| -> Vec<(String, String, String)> {
        let pods = k.json(&["get", "pods", "-n", "pods", "-l", "app=spread", "-o", "json"]);
        pods["items"].as_array().cloned().unwrap_or_default().iter().filter(|p| p["metadata"]["deletionTimestamp"].is_null()).map(|p| {
            (p["metadata"]["name"].as_str().unwrap_or_default().to_string(), p["spec"]["nodeName"].as_str().unwrap_or_default().to_string(), p["status"]["phase"].as_str().unwrap_or_default().to_string())
        }).collect()
    };
    eventually("spread: one pod Running on each node", Duration::from_secs(60), || {
        let p = spread_nodes(&k);
        let nodes: std::collections::BTreeSet<_> = p.iter().map(|x| x.1.clone()).collect();
        (p.len() == 3 && nodes.len() == 3 && p.iter().all(|x| x.2 == "Running")).then_some(())
    });
    let lab = cluster.lab();
    let victim = lab.nodes[2].clone();
    let pid = victim.agent_pid.expect("agent pid");
    // SAFETY: the PID skiff up started for this node's agent.
    unsafe { libc_kill(pid as i32, 9) };
    let _ = Command::new("ip").args(["netns", "del", &victim.netns]).status();
    eventually("the lost node NotReady", Duration::from_secs(30), || {
        let n = k.json(&["get", "node", &victim.name, "-o", "json"]);
        n["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready").filter(|c| c["status"] != "True").map(|_| ())
    });
    let moved = eventually("3 spread pods Running on the 2 remaining nodes", Duration::from_secs(60), || {
        let p = spread_nodes(&k);
        (p.len() == 3 && p.iter().all(|x| x.1 != victim.name && x.2 == "Running")).then_some(p)
    });
    assert!(moved.iter().all(|x| x.1 != victim.name), "{moved:?}");

    let text = cluster.down();
    assert!(text.contains("skiff is down"), "{text}");
    assert!(!Path::new(&victim.pin_dir).exists(), "the lost node's pins are removed too");
}

/// `eventually`, with more to say when it times out.
fn eventually_or<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>, why: impl FnOnce() -> String) -> T {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {}s waiting for {what}: {}", timeout.as_secs(), why())
}

fn libc_kill(pid: i32, sig: i32) -> i32 {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: plain syscall.
    unsafe { kill(pid, sig) }
}
