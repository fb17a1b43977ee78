//! The controllers on a real `skiff up` cluster (server + 2 agents running real pods), driven by
//! real kubectl 1.32, one cluster for all of it: Deployment rollouts (new image tag, history,
//! undo, restart), scaling 3 -> 10 -> 2, a DaemonSet with one pod per node, a CronJob firing on
//! schedule, a Job (completions 5, parallelism 2, never more than 2 running), an HPA scaling a
//! busy Deployment up from agent-reported PodMetrics (also `kubectl top pods`) and back down
//! once the load stops, and deletes (background, foreground, a Namespace) leaving no pods,
//! ReplicaSets or pod cgroups on the nodes.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use serde_json::Value;

const NS: &str = "ctl";

/// The echo image under a second tag (skiff/echo:2.0): the same OCI archive with its index
/// names rewritten, so a Deployment can roll to a new image.
fn second_tag(image: &Path, dir: &Path) -> PathBuf {
    let work = dir.join("retag");
    std::fs::create_dir_all(&work).expect("retag dir");
    let st = Command::new("tar").arg("xf").arg(image).arg("-C").arg(&work).status().expect("tar x");
    assert!(st.success());
    let index = work.join("index.json");
    let text = std::fs::read_to_string(&index).expect("index.json");
    let text = text.replace("docker.io/skiff/echo:1.0", "docker.io/skiff/echo:2.0").replace("\"org.opencontainers.image.ref.name\":\"1.0\"", "\"org.opencontainers.image.ref.name\":\"2.0\"");
    assert!(text.contains("echo:2.0"), "{text}");
    std::fs::write(&index, text).expect("write index.json");
    let out = dir.join("skiff-echo-2.0.oci.tar");
    let st = Command::new("tar").arg("cf").arg(&out).arg("-C").arg(&work).args(["oci-layout", "index.json", "blobs"]).status().expect("tar c");
    assert!(st.success());
    out
}

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ctl}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: tick, namespace: ctl}
spec:
  schedule: "* * * * *"
  concurrencyPolicy: Forbid
  successfulJobsHistoryLimit: 2
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: tick, image: skiff/echo:1.0, command: ["sh", "-c", "echo tick"]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: busy, namespace: ctl}
spec:
  replicas: 1
  selector: {matchLabels: {app: busy}}
  template:
    metadata: {labels: {app: busy}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: busy
        image: skiff/echo:1.0
        # A busy loop (ash's [ is a builtin: no fork) until /tmp/stop exists.
        command: ["sh", "-c", "while [ ! -f /tmp/stop ]; do :; done; exec sleep 100000"]
        resources: {requests: {cpu: 100m}, limits: {cpu: 200m}}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: busy, namespace: ctl}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: busy}
  minReplicas: 1
  maxReplicas: 3
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: ctl}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{name: agent, image: skiff/echo:1.0, command: ["sleep", "100000"]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: ctl}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  strategy: {rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{name: web, image: skiff/echo:1.0}]
"#;

const JOB: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: batch, namespace: ctl}
spec:
  completions: 5
  parallelism: 2
  template:
    spec:
      restartPolicy: Never
      containers: [{name: work, image: skiff/echo:1.0, command: ["sh", "-c", "sleep 2"]}]
"#;

fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

fn live(k: &Kubectl, selector: &str) -> Vec<Value> {
    items(&k.json(&["get", "pods", "-n", NS, "-l", selector]))
        .into_iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .collect()
}

fn running(k: &Kubectl, selector: &str) -> usize {
    live(k, selector).iter().filter(|p| p["status"]["phase"] == "Running").count()
}

fn replicas(k: &Kubectl, name: &str) -> i64 {
    k.json(&["get", "deployment", name, "-n", NS])["spec"]["replicas"].as_i64().unwrap_or(-1)
}

fn image_of(k: &Kubectl, name: &str) -> String {
    k.json(&["get", "deployment", name, "-n", NS])["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap_or_default().to_string()
}

fn rollout_done(k: &Kubectl, what: &str) {
    let out = k.ok(&["rollout", "status", what, "-n", NS, "--timeout=90s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
}

/// Every pod-level cgroup of these pod uids is gone from the node cgroup trees.
fn cgroups_left(node: &str, uids: &BTreeSet<String>) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for root in ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified"] {
        for uid in uids {
            let p = Path::new(root).join(format!("skiff/{node}/pod{uid}"));
            if p.exists() {
                left.push(p);
            }
        }
    }
    left
}

#[test]
fn controllers_on_real_nodes() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0) || !require("runc", have("runc")) {
        return;
    }
    let started = Instant::now();
    ensure_sibling_binaries();
    let image = echo_image();
    let scratch = tempfile::tempdir().expect("tempdir");
    let image2 = second_tag(&image, scratch.path());
    let image2 = image2.to_string_lossy().to_string();
    let mut cluster = OwnLab::up(
        &image,
        &[
            "--image",
            &image2,
            "--server-arg=--horizontal-pod-autoscaler-sync-period=3s",
            "--server-arg=--horizontal-pod-autoscaler-downscale-stabilization=20s",
        ],
    );
    let k = Kubectl::new(kubectl, &cluster.kubeconfig);
    let out = k.run_with_stdin(&["apply", "-f", "-"], Some(SETUP));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nodes: Vec<String> = cluster.lab().nodes.iter().map(|n| n.name.clone()).collect();

    // DaemonSet: one pod per node.
    let ds_nodes = eventually("a daemon pod Running on each node", Duration::from_secs(60), || {
        let pods = live(&k, "app=agent");
        let on: BTreeSet<String> = pods.iter().filter(|p| p["status"]["phase"] == "Running").filter_map(|p| p["spec"]["nodeName"].as_str().map(String::from)).collect();
        (pods.len() == nodes.len() && on.len() == nodes.len()).then_some(on)
    });
    assert_eq!(ds_nodes, nodes.iter().cloned().collect::<BTreeSet<_>>());
    let ds = k.ok(&["get", "ds", "agent", "-n", NS]);
    let row: Vec<&str> = ds.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(&row[1..6], &["2", "2", "2", "2", "2"], "DESIRED CURRENT READY UP-TO-DATE AVAILABLE:\n{ds}");

    // Deployment: roll to the second tag, history, undo, restart.
    rollout_done(&k, "deployment/web");
    k.ok(&["set", "image", "deployment/web", "web=skiff/echo:2.0", "-n", NS]);
    rollout_done(&k, "deployment/web");
    let pods = live(&k, "app=web");
    assert_eq!(pods.len(), 3);
    assert!(pods.iter().all(|p| p["spec"]["containers"][0]["image"] == "skiff/echo:2.0" && p["status"]["phase"] == "Running"), "all on 2.0");
    let history = k.ok(&["rollout", "history", "deployment/web", "-n", NS]);
    let revisions: Vec<&str> = history.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
    assert_eq!(revisions.len(), 2, "two revisions:\n{history}");
    k.ok(&["rollout", "undo", "deployment/web", "-n", NS]);
    rollout_done(&k, "deployment/web");
    assert_eq!(image_of(&k, "web"), "skiff/echo:1.0", "undo returns to the first image");
    let before: BTreeSet<String> = live(&k, "app=web").iter().filter_map(|p| p["metadata"]["name"].as_str().map(String::from)).collect();
    k.ok(&["rollout", "restart", "deployment/web", "-n", NS]);
    rollout_done(&k, "deployment/web");
    let after: BTreeSet<String> = eventually("restart replaced every pod", Duration::from_secs(30), || {
        let pods = live(&k, "app=web");
        let names: BTreeSet<String> = pods.iter().filter_map(|p| p["metadata"]["name"].as_str().map(String::from)).collect();
        (names.len() == 3 && names.is_disjoint(&before)).then_some(names)
    });
    assert_eq!(after.len(), 3);

    // Scaling 3 -> 10 -> 2.
    for n in [10usize, 2] {
        k.ok(&["scale", "deployment/web", &format!("--replicas={n}"), "-n", NS]);
        eventually(&format!("web at {n} Running pods"), Duration::from_secs(90), || {
            (live(&k, "app=web").len() == n && running(&k, "app=web") == n).then_some(())
        });
        rollout_done(&k, "deployment/web");
    }

    // Job: completions 5, parallelism 2, watched.
    let out = k.run_with_stdin(&["apply", "-f", "-"], Some(JOB));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut most = 0;
    eventually("job batch Complete", Duration::from_secs(90), || {
        let pods = items(&k.json(&["get", "pods", "-n", NS, "-l", "batch.kubernetes.io/job-name=batch"]));
        let active = pods.iter().filter(|p| p["metadata"]["deletionTimestamp"].is_null() && !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))).count();
        most = most.max(active);
        let job = k.json(&["get", "job", "batch", "-n", NS]);
        let complete = job["status"]["conditions"].as_array().is_some_and(|cs| cs.iter().any(|c| c["type"] == "Complete" && c["status"] == "True"));
        (complete && job["status"]["succeeded"] == 5).then_some(())
    });
    assert!(most <= 2, "never more than parallelism=2 active, saw {most}");
    assert!(most >= 1);

    // CronJob: it has fired by now or fires within the minute.
    let job = eventually("a Job from the CronJob completed", Duration::from_secs(75), || {
        let cj = k.json(&["get", "cronjob", "tick", "-n", NS]);
        cj["status"]["lastSuccessfulTime"].as_str()?;
        let jobs = items(&k.json(&["get", "jobs", "-n", NS]));
        jobs.into_iter().find(|j| j["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("tick-")))
    });
    let name = job["metadata"]["name"].as_str().unwrap_or_default();
    let minutes: i64 = name.trim_start_matches("tick-").parse().expect("tick-<minutes>");
    let scheduled = job["metadata"]["annotations"]["batch.kubernetes.io/cronjob-scheduled-timestamp"].as_str().unwrap_or_default().to_string();
    assert!(scheduled.ends_with(":00Z"), "scheduled on a whole minute: {scheduled}");
    assert!(minutes > 28_000_000, "named after its minute: {name}");

    // HPA: the busy loop pushes the Deployment up.
    eventually("HPA scaled busy up", Duration::from_secs(100), || (replicas(&k, "busy") >= 2).then_some(()));
    let top = k.ok(&["top", "pods", "-n", NS, "-l", "app=busy"]);
    assert!(top.contains("CPU(cores)") && top.lines().any(|l| l.starts_with("busy-")), "kubectl top pods:\n{top}");
    let hpa = k.ok(&["get", "hpa", "busy", "-n", NS]);
    assert!(hpa.contains("%/50%"), "{hpa}");
    // The load stops: every busy pod is told to stop; back to 1 after the window.
    let stop_all = |k: &Kubectl| {
        for p in live(k, "app=busy") {
            if let Some(n) = p["metadata"]["name"].as_str() {
                let _ = k.run_with_stdin(&["exec", "-n", NS, n, "--", "touch", "/tmp/stop"], None);
            }
        }
    };
    stop_all(&k);
    eventually("HPA scaled busy back to 1", Duration::from_secs(120), || {
        stop_all(&k);
        (replicas(&k, "busy") == 1).then_some(())
    });

    // Deletes leave nothing: background (kubectl's default), foreground, then the namespace.
    let uids_of = |sel: &str| -> BTreeSet<String> { live(&k, sel).iter().filter_map(|p| p["metadata"]["uid"].as_str().map(String::from)).collect() };
    let web_uids = uids_of("app=web");
    k.ok(&["delete", "deployment", "web", "-n", NS]);
    eventually("web: no pods or ReplicaSets", Duration::from_secs(60), || {
        (items(&k.json(&["get", "pods", "-n", NS, "-l", "app=web"])).is_empty() && items(&k.json(&["get", "rs", "-n", NS, "-l", "app=web"])).is_empty()).then_some(())
    });
    let busy_uids = uids_of("app=busy");
    k.ok(&["delete", "deployment", "busy", "-n", NS, "--cascade=foreground", "--wait=true", "--timeout=60s"]);
    assert!(items(&k.json(&["get", "pods", "-n", NS, "-l", "app=busy"])).is_empty(), "foreground: the pods went before the Deployment");
    assert!(items(&k.json(&["get", "rs", "-n", NS, "-l", "app=busy"])).is_empty());
    let mut all_uids: BTreeSet<String> = items(&k.json(&["get", "pods", "-n", NS])).iter().filter_map(|p| p["metadata"]["uid"].as_str().map(String::from)).collect();
    all_uids.extend(web_uids);
    all_uids.extend(busy_uids);
    k.ok(&["delete", "namespace", NS, "--timeout=90s"]);
    eventually("namespace ctl gone", Duration::from_secs(90), || {
        let out = k.run_with_stdin(&["get", "namespace", NS], None);
        (!out.status.success()).then_some(())
    });
    let pods = items(&k.json(&["get", "pods", "-A"]));
    assert!(pods.iter().all(|p| p["metadata"]["namespace"] != NS), "no pods left in ctl");
    for node in &nodes {
        let left = eventually_some(Duration::from_secs(30), || {
            let left = cgroups_left(node, &all_uids);
            left.is_empty().then_some(()).ok_or(left)
        });
        assert!(left.is_ok(), "pod cgroups left on {node}: {left:?}");
    }
    let text = cluster.down();
    assert!(text.contains("skiff is down"), "{text}");
    eprintln!("controllers_e2e took {:?}", started.elapsed());
}

/// A 2-node `skiff up` on its own lab name and subnet (`skc`, 172.20.78.0/24), so it can run
/// while the other e2e suites use the shared harness's `skt` / 77; taken down on drop.
struct OwnLab {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    downed: bool,
}

impl OwnLab {
    fn up(image: &Path, extra: &[&str]) -> OwnLab {
        let dir = tempfile::Builder::new().prefix("skiff-ctl-test").tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["up", "--nodes", "2", "--name", "skc", "--lab-net", "78", "--restart-backoff", "1", "--data-dir"])
            .arg(dir.path())
            .arg("--image")
            .arg(image)
            .args(extra)
            .output()
            .expect("run skiff up");
        let lab = OwnLab { kubeconfig: dir.path().join("server/admin.kubeconfig"), dir, downed: false };
        assert!(
            out.status.success(),
            "skiff up failed:\n{}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(lab.dir.path().join("server.log")).unwrap_or_default()
        );
        lab
    }

    fn lab(&self) -> Lab {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("lab.json")).expect("lab.json")).expect("lab.json parses")
    }

    fn down(&mut self) -> String {
        self.downed = true;
        let out = Command::new(env!("CARGO_BIN_EXE_skiff")).args(["down", "--data-dir"]).arg(self.dir.path()).output().expect("run skiff down");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "skiff down failed:\n{text}");
        text
    }
}

impl Drop for OwnLab {
    fn drop(&mut self) {
        if !self.downed {
            let _ = Command::new(env!("CARGO_BIN_EXE_skiff")).args(["down", "--data-dir"]).arg(self.dir.path()).output();
        }
    }
}

fn eventually_some<E>(timeout: Duration, mut f: impl FnMut() -> Result<(), E>) -> Result<(), E> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}
