//! `skiff up --nodes 2 --runtime cri`: every node runs its own containerd (Debian's 1.6) in its
//! namespace, the agents drive it over CRI, and containerd calls skiff-cni itself, as on a
//! Kubernetes node. Then real kubectl: the Deployment of tests/cluster.rs becomes Running and
//! Ready; pods reach each other by IP across nodes and through the ClusterIP; `kubectl exec`
//! returns output and exit codes; an exec readiness probe (CRI ExecSync) gates Ready; a pod over
//! its memory limit is OOMKilled; a fresh CRI adapter finds every container again by labels, and a
//! really restarted agent adopts them all (nothing recreated); `skiff down` leaves no containerd,
//! mount, netns or cgroup.
//!
//! Traffic goes only to pod and service addresses of the lab, from inside its namespaces.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;


const EXTRA_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: gated, namespace: e2e}
spec:
  containers:
  - name: main
    image: skiff/echo:1.0
    command: [sh, -c, "echo started; exec sleep 100000"]
    readinessProbe:
      exec: {command: [cat, /tmp/ready]}
      periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {name: hog, namespace: e2e}
spec:
  restartPolicy: Never
  containers:
  - name: hog
    image: skiff/echo:1.0
    command: [sh, -c, "x=a; while true; do x=$x$x; done"]
    resources:
      limits: {memory: 32Mi}
"#;

fn pause_image() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("target/images/skiff-pause-1.0.oci.tar");
    let status = Command::new("bash").arg(root.join("scripts/build-pause-image.sh")).arg(&out).status().expect("run build-pause-image.sh");
    assert!(status.success(), "scripts/build-pause-image.sh failed");
    out
}

/// `/run/netns/<name>` of a pod, from the sandbox record its node's agent keeps.
fn pod_netns(lab: &serde_json::Value, node: &str, uid: &str) -> PathBuf {
    let n = lab["nodes"].as_array().into_iter().flatten().find(|n| n["name"] == node).expect("the pod's node in lab.json");
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(n["data_dir"].as_str().unwrap_or_default()).join("pods").join(uid).join("sandbox.json")).expect("sandbox.json"),
    )
    .expect("sandbox.json parses");
    let name = rec["netns"].as_str().expect("netns name");
    assert!(name.starts_with("cni-"), "containerd made the pod's netns (not the agent): {name}");
    Path::new("/run/netns").join(name)
}

fn cgroup_dirs_named(prefix: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    for root in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        for e in std::fs::read_dir(root.path().join("skiff")).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                out.push(e.path());
            }
        }
    }
    out
}

/// Stops node `i`'s agent (SIGTERM, by its recorded PID) and starts it again with the command
/// line it had (read from /proc), recording the new PID in lab.json so `skiff down` stops it.
fn restart_agent(lab_json: &Path, i: usize) {
    use std::os::unix::process::CommandExt;
    let mut lab: serde_json::Value = serde_json::from_slice(&std::fs::read(lab_json).expect("lab.json")).expect("parses");
    let pid = lab["nodes"][i]["agent_pid"].as_u64().expect("agent pid") as i32;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the agent's command line");
    let argv: Vec<String> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    assert!(argv.iter().any(|a| a == "agent") && argv.iter().any(|a| a == "cri"), "a CRI agent: {argv:?}");
    // SAFETY: signalling the agent `skiff up` started (its PID from lab.json, checked above).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    eventually("the agent stopped", Duration::from_secs(20), || (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()));
    let log_path = Path::new(lab["nodes"][i]["data_dir"].as_str().unwrap_or_default()).join("agent.log");
    let log = std::fs::OpenOptions::new().append(true).open(&log_path).expect("agent.log");
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(std::process::Stdio::null()).stdout(log.try_clone().expect("dup")).stderr(log);
    // SAFETY: setsid is async-signal-safe (the agent outlives this test's process group).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start the agent again");
    lab["nodes"][i]["agent_pid"] = serde_json::json!(child.id());
    // It is this test's child: reap it when `skiff down` stops it, or it stays a zombie (alive).
    std::thread::spawn(move || child.wait());
    std::fs::write(lab_json, serde_json::to_vec_pretty(&lab).expect("json")).expect("write lab.json");
}

#[test]
fn two_node_cluster_on_containerd_runs_the_deployment() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0)
        || !require("runc", have("runc"))
        || !require("iproute2", have("ip"))
        || !require("containerd and ctr (apt-get install containerd)", have("containerd") && have("ctr") && have("containerd-shim-runc-v2"))
        || !require("/usr/lib/cni/loopback (apt-get install containernetworking-plugins)", Path::new("/usr/lib/cni/loopback").is_file())
    {
        return;
    }
    ensure_sibling_binaries();
    let image = echo_image();
    let pause = pause_image();
    let pause_arg = pause.display().to_string();
    let mut cluster = Cluster::up_with(2, &image, &["--runtime", "cri", "--image", &pause_arg]);
    let k = Kubectl::new(kubectl, &cluster.kubeconfig);
    let lab: serde_json::Value = serde_json::from_slice(&std::fs::read(cluster.dir.path().join("lab.json")).expect("lab.json")).expect("lab.json parses");
    let containerd_pids: Vec<u32> = lab["nodes"].as_array().into_iter().flatten().filter_map(|n| n["containerd_pid"].as_u64()).map(|p| p as u32).collect();
    assert_eq!(containerd_pids.len(), 2, "one containerd per node: {lab}");

    let nodes = k.json(&["get", "nodes"]);
    let items = nodes["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2);
    for n in &items {
        let v = n["status"]["nodeInfo"]["containerRuntimeVersion"].as_str().unwrap_or_default();
        assert!(v.starts_with("containerd://"), "the node reports its CRI runtime: {v:?}");
    }

    k.run_with_stdin(&["apply", "-f", "-"], Some(&echo_workload(4)));
    let pods = eventually("4 pods Running and Ready on containerd", Duration::from_secs(180), || {
        let pods = k.json(&["get", "pods", "-n", "e2e", "-l", "app=echo"]);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        let ready = items
            .iter()
            .filter(|p| {
                p["status"]["phase"] == "Running"
                    && p["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
            })
            .count();
        (items.len() == 4 && ready == 4).then_some(items)
    });
    let mut targets = Vec::new();
    let mut per_node = BTreeSet::new();
    for p in &pods {
        let node = p["spec"]["nodeName"].as_str().expect("nodeName").to_string();
        per_node.insert(node.clone());
        let ip = p["status"]["podIP"].as_str().expect("podIP").to_string();
        let uid = p["metadata"]["uid"].as_str().expect("uid").to_string();
        let cid = p["status"]["containerStatuses"][0]["containerID"].as_str().unwrap_or_default().to_string();
        let netns = pod_netns(&lab, &node, &uid);
        targets.push((p["metadata"]["name"].as_str().expect("name").to_string(), ip, netns, node, cid));
    }
    assert_eq!(per_node.len(), 2, "the pods spread over both nodes: {per_node:?}");

    // Pod to pod by IP, across nodes, each answering with its own name.
    for (from, _, netns, _, _) in &targets {
        for (to, ip, _, _, _) in &targets {
            let dst: SocketAddr = format!("{ip}:9000").parse().expect("addr");
            let answer = in_netns(netns, || ask(dst)).unwrap_or_else(|e| panic!("{from} -> {to} ({ip}): {e}\n{}", cluster.agent_logs()));
            assert!(answer.starts_with(to.as_str()) && answer.ends_with(ip.as_str()), "{from} -> {to}: {answer:?}");
        }
    }
    // The ClusterIP, through the eBPF datapath, reaches every backend.
    let cluster_ip = k.ok(&["get", "svc", "echo", "-n", "e2e", "-o", "jsonpath={.spec.clusterIP}"]);
    let vip: SocketAddr = format!("{cluster_ip}:9000").parse().expect("vip");
    let client = targets[0].2.clone();
    let seen: BTreeSet<String> = eventually("every backend answers through the ClusterIP", Duration::from_secs(30), || {
        let seen: BTreeSet<String> = in_netns(&client, || (0..40).filter_map(|_| ask(vip).ok()).collect());
        (seen.len() == 4).then_some(seen)
    });
    for (name, ip, _, _, _) in &targets {
        assert!(seen.contains(&format!("{name} {ip}")), "{name} answered through {vip}: {seen:?}");
    }

    // kubectl exec: output and the exit code.
    let out = k.run_with_stdin(&["exec", "-n", "e2e", &targets[0].0, "--", "sh", "-c", "echo from-$(hostname); exit 3"], None);
    assert_eq!(out.status.code(), Some(3), "exec's exit code: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("from-{}", targets[0].0));

    // An exec readiness probe (ExecSync) gates Ready; OOMKilled comes from CRI's status.
    k.run_with_stdin(&["apply", "-f", "-"], Some(EXTRA_PODS));
    eventually("gated Running", Duration::from_secs(60), || {
        let p = k.json(&["get", "pod", "gated", "-n", "e2e"]);
        (p["status"]["phase"] == "Running").then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let p = k.json(&["get", "pod", "gated", "-n", "e2e"]);
    assert_eq!(p["status"]["containerStatuses"][0]["ready"], false, "not ready while its exec probe fails: {}", p["status"]);
    k.ok(&["exec", "-n", "e2e", "gated", "--", "touch", "/tmp/ready"]);
    eventually("gated Ready once the probe passes", Duration::from_secs(30), || {
        let p = k.json(&["get", "pod", "gated", "-n", "e2e"]);
        (p["status"]["containerStatuses"][0]["ready"] == true).then_some(())
    });
    let term = eventually("hog OOMKilled", Duration::from_secs(90), || {
        let p = k.json(&["get", "pod", "hog", "-n", "e2e"]);
        let t = p["status"]["containerStatuses"][0]["state"]["terminated"].clone();
        t.is_object().then_some(t)
    });
    assert_eq!(term["reason"], "OOMKilled", "{term}");
    assert_eq!(term["exitCode"], 137, "{term}");

    // kubectl logs reads what containerd wrote at the agent's log path.
    let logs = k.ok(&["logs", "-n", "e2e", "gated"]);
    assert!(logs.contains("started"), "kubectl logs of a CRI container: {logs:?}");

    // Adoption: a fresh adapter (an agent after a restart) finds every container by its labels.
    {
        use skiff_agent::ContainerRuntime;
        for n in lab["nodes"].as_array().into_iter().flatten() {
            let sock = Path::new(n["data_dir"].as_str().unwrap_or_default()).join("containerd/containerd.sock");
            let rt = skiff_agent::cri_adapter::CriAdapter::connect(&format!("unix://{}", sock.display())).expect("connect to the node's containerd");
            let ids = rt.list().expect("list");
            for (name, _, _, node, _) in targets.iter().filter(|t| n["name"] == t.3.as_str()) {
                let p = k.json(&["get", "pod", name, "-n", "e2e"]);
                let uid = p["metadata"]["uid"].as_str().unwrap_or_default();
                let id = ids.iter().find(|i| i.starts_with(&format!("{uid}_echo_"))).unwrap_or_else(|| panic!("{name}'s container on {node} found again: {ids:?}"));
                assert!(matches!(rt.observe(id), Ok(skiff_agent::runtime::Observed::Running { .. })), "{id} is running");
            }
        }
    }

    // A real agent restart: node 1's agent stops (pods keep running), a new one starts with the
    // same arguments and adopts the sandboxes and containers through ListPodSandbox and
    // ListContainers: nothing is recreated, the pods stay Ready.
    let node1 = lab["nodes"][0].clone();
    let sock = Path::new(node1["data_dir"].as_str().unwrap_or_default()).join("containerd/containerd.sock");
    let cri = skiff_runtime::cri::CriRuntime::connect(&format!("unix://{}", sock.display())).expect("CRI client");
    let objects = |cri: &skiff_runtime::cri::CriRuntime| -> (BTreeSet<String>, BTreeSet<String>) {
        let none = Default::default();
        let sbs = cri.list_pod_sandboxes(&none).expect("ListPodSandbox").into_iter().map(|s| s.id).collect();
        let cs = cri.list_containers(&none).expect("ListContainers").into_iter().map(|c| c.id).collect();
        (sbs, cs)
    };
    let before = objects(&cri);
    assert!(!before.0.is_empty() && !before.1.is_empty(), "node 1 runs pods: {before:?}");
    restart_agent(&cluster.dir.path().join("lab.json"), 0);
    eventually("node 1's pods Ready under the restarted agent", Duration::from_secs(60), || {
        let pods = k.json(&["get", "pods", "-n", "e2e", "-l", "app=echo", "--field-selector", &format!("spec.nodeName={}", node1["name"].as_str().unwrap_or_default())]);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        (!items.is_empty() && items.iter().all(|p| p["status"]["containerStatuses"][0]["ready"] == true)).then_some(())
    });
    // Give the new agent several sync rounds to (wrongly) replace anything.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(objects(&cri), before, "the restarted agent adopted every sandbox and container, recreating none");
    let pods = k.json(&["get", "pods", "-n", "e2e", "-l", "app=echo"]);
    for p in pods["items"].as_array().into_iter().flatten() {
        assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0, "no restart: {}", p["metadata"]["name"]);
    }
    drop(cri);

    let pod_netns: Vec<PathBuf> = targets.iter().map(|t| t.2.clone()).collect();
    let dir = cluster.dir.path().to_path_buf();
    let text = cluster.down();
    assert!(text.contains("skiff is down"), "{text}");
    for pid in &containerd_pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "containerd {pid} stopped");
    }
    let ps = Command::new("ps").args(["-eo", "args"]).output().expect("ps");
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(!ps.lines().any(|l| l.contains(&dir.display().to_string())), "no process of the lab left:\n{ps}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(!mounts.contains(&dir.display().to_string()), "no mount under the lab folder left");
    for ns in &pod_netns {
        assert!(!ns.exists(), "pod netns {} removed", ns.display());
        assert!(!mounts.contains(&ns.display().to_string()), "pod netns {} unmounted", ns.display());
    }
    let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip");
    assert!(!String::from_utf8_lossy(&netns.stdout).contains("skt-node"), "node namespaces removed");
    assert!(cgroup_dirs_named("skt-node").is_empty(), "node cgroups removed: {:?}", cgroup_dirs_named("skt-node"));
}
