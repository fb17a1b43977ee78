//! Node faults on a real `skiff up` cluster (three nodes, real agents, runc pods, eBPF datapath).
//!
//! The cluster runs with a short node grace (`--node-monitor-grace-period=8s`, checked every
//! second, agents heartbeating every second) and a Deployment of six echo pods whose tolerations
//! of the not-ready/unreachable NoExecute taints last 20 s (instead of the default 300 s), so a
//! lost node's pods are evicted within a test's patience. A `kubectl get nodes --watch` runs from
//! the start, so every Ready transition of every node is counted, not sampled.
//!
//! 1. Agent `kill -9` (node 1): the agent is SIGKILLed and restarted. Its pods keep running (same
//!    pod UIDs, same container processes, restart counts unchanged) and the restarted agent adopts
//!    its pinned maps without reprogramming (startup sync ops=0).
//! 2. Partition (node 2): every frame to and from its bridge port is dropped (an nftables bridge
//!    table matching the port, removed afterwards, checked gone; the cut itself is checked): NotReady after the grace,
//!    its endpoints withdrawn, the other nodes stay Ready; healed before the tolerations run out,
//!    it is Ready again with the same pods. Ready transitions are counted: exactly True -> Unknown
//!    -> True for it and none for the others (no flapping), through a quiet 15 s after the heal.
//! 3. Node lost (node 3): its agent SIGKILLed and its link down (the bridge port): NotReady, its
//!    endpoints withdrawn, its pods evicted and rescheduled on the other nodes, all within the
//!    grace plus the tolerations (bounds asserted, times printed). Then it comes back (link up,
//!    agent restarted): Ready, exactly six pods in the API and exactly six echo containers running
//!    on the machine for this cluster (the old ones on node 3 were stopped, none twice).
//!
//! About 100 s here (most of it the grace, the tolerations and quiet stretches), so it is in the
//! default suite: `cargo test -p skiff --test faults_nodes_e2e -- --nocapture` as root prints the
//! measured times.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

const GRACE: Duration = Duration::from_secs(8);
const TOLERATION_SECONDS: u64 = 20;
const REPLICAS: usize = 6;
const NS: &str = "faults";

fn workload() -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: fecho, namespace: {NS}}}
spec:
  replicas: {REPLICAS}
  selector: {{matchLabels: {{app: fecho}}}}
  template:
    metadata: {{labels: {{app: fecho}}}}
    spec:
      tolerations:
      - {{key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: {TOLERATION_SECONDS}}}
      - {{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: {TOLERATION_SECONDS}}}
      containers:
      - name: echo
        image: skiff/echo:1.0
        ports: [{{name: http, containerPort: 8080}}, {{name: tcp, containerPort: 9000}}]
        readinessProbe:
          httpGet: {{path: /healthz, port: http}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: fecho, namespace: {NS}}}
spec:
  selector: {{app: fecho}}
  ports:
  - {{name: tcp, port: 9000, targetPort: tcp}}
"#
    )
}

#[derive(Debug, Clone)]
struct PodInfo {
    name: String,
    uid: String,
    node: String,
    ready: bool,
    terminating: bool,
    restarts: i64,
}

fn pods(k: &Kubectl) -> Vec<PodInfo> {
    let v = k.json(&["-n", NS, "get", "pods", "-l", "app=fecho"]);
    v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|p| PodInfo {
                    name: p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                    uid: p["metadata"]["uid"].as_str().unwrap_or_default().to_string(),
                    node: p["spec"]["nodeName"].as_str().unwrap_or_default().to_string(),
                    ready: p["status"]["conditions"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")),
                    terminating: !p["metadata"]["deletionTimestamp"].is_null(),
                    restarts: p["status"]["containerStatuses"][0]["restartCount"].as_i64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn ready_pods(k: &Kubectl) -> Vec<PodInfo> {
    pods(k).into_iter().filter(|p| p.ready && !p.terminating).collect()
}

/// Ready endpoints of the Service, by node.
fn ready_endpoint_nodes(k: &Kubectl) -> BTreeMap<String, usize> {
    let v = k.json(&["-n", NS, "get", "endpointslices", "-l", "kubernetes.io/service-name=fecho"]);
    let mut by_node = BTreeMap::new();
    for slice in v["items"].as_array().into_iter().flatten() {
        for e in slice["endpoints"].as_array().into_iter().flatten() {
            if e["conditions"]["ready"] == true {
                *by_node.entry(e["nodeName"].as_str().unwrap_or_default().to_string()).or_insert(0) += 1;
            }
        }
    }
    by_node
}

fn node_ready(k: &Kubectl, node: &str) -> String {
    let n = k.json(&["get", "node", node]);
    n["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("none")
        .to_string()
}

/// Per node, each Ready status it entered and when the watch saw it.
type ReadyHistory = Arc<Mutex<BTreeMap<String, Vec<(Instant, String)>>>>;

/// Every Ready status each node went through, from a live `kubectl get nodes --watch`.
struct ReadyWatch {
    child: Child,
    history: ReadyHistory,
}

impl ReadyWatch {
    fn start(k: &Kubectl) -> ReadyWatch {
        let mut child = k
            .command(&["get", "nodes", "--watch", "--output-watch-events", "-o", "json", "--request-timeout=0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl get nodes --watch");
        let stdout = child.stdout.take().expect("stdout");
        let history: ReadyHistory = Arc::default();
        let h = history.clone();
        std::thread::spawn(move || {
            let stream = serde_json::Deserializer::from_reader(BufReader::new(stdout)).into_iter::<serde_json::Value>();
            for event in stream {
                let Ok(event) = event else { break };
                let node = &event["object"];
                let name = node["metadata"]["name"].as_str().unwrap_or_default().to_string();
                let status = node["status"]["conditions"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                    .and_then(|c| c["status"].as_str())
                    .unwrap_or("none")
                    .to_string();
                let mut h = h.lock().expect("history");
                let seq = h.entry(name).or_default();
                if seq.last().map(|(_, s)| s != &status).unwrap_or(true) {
                    seq.push((Instant::now(), status));
                }
            }
        });
        ReadyWatch { child, history }
    }

    /// The distinct Ready statuses `node` went through since `since` (plus the one it had then).
    fn statuses_since(&self, node: &str, since: Instant) -> Vec<String> {
        let h = self.history.lock().expect("history");
        let seq = h.get(node).cloned().unwrap_or_default();
        let before = seq.iter().rev().find(|(t, _)| *t < since).map(|(_, s)| s.clone());
        before.into_iter().chain(seq.iter().filter(|(t, _)| *t >= since).map(|(_, s)| s.clone())).collect()
    }

    fn all(&self) -> BTreeMap<String, Vec<String>> {
        self.history.lock().expect("history").iter().map(|(n, seq)| (n.clone(), seq.iter().map(|(_, s)| s.clone()).collect())).collect()
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every frame to and from one bridge port dropped, by an nftables table of the bridge family
/// (this kernel has no tc drop action: no cls_matchall, no act_gact), deleted on drop by its
/// name. Frames entering the bridge from the port are dropped at prerouting, frames leaving
/// through it (forwarded or from the host) at postrouting.
struct Partition {
    table: String,
    port: String,
}

fn nft(args: &[&str]) -> std::process::Output {
    Command::new("nft").args(args).output().expect("run nft")
}

impl Partition {
    fn cut(port: &str) -> Partition {
        let table = format!("faults_partition_{}", std::process::id());
        let partition = Partition { table: table.clone(), port: port.to_string() };
        let script = format!(
            "table bridge {table} {{\n\
               chain from_port {{ type filter hook prerouting priority -300; iifname \"{port}\" drop; }}\n\
               chain to_port {{ type filter hook postrouting priority 300; oifname \"{port}\" drop; }}\n\
             }}\n"
        );
        let mut child = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("nft -f -");
        {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write the nft script");
        }
        let out = child.wait_with_output().expect("nft");
        assert!(out.status.success(), "nft -f (partition of {port}): {}\n{script}", String::from_utf8_lossy(&out.stderr));
        partition
    }

    fn heal(&mut self) {
        let out = nft(&["delete", "table", "bridge", &self.table]);
        assert!(out.status.success(), "nft delete table (partition of {}): {}", self.port, String::from_utf8_lossy(&out.stderr));
        let tables = String::from_utf8_lossy(&nft(&["list", "tables"]).stdout).to_string();
        assert!(!tables.contains(&self.table), "the partition's table is gone: {tables}");
        self.table.clear();
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if !self.table.is_empty() {
            let _ = nft(&["delete", "table", "bridge", &self.table]);
        }
    }
}

/// Whether a TCP connection from inside `netns` to `dst` is set up within a second.
fn connects_from(netns: &std::path::Path, dst: std::net::SocketAddr) -> bool {
    in_netns(netns, || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(1)).is_ok())
}

/// A bridge port set down, set up again on drop.
struct PortDown(String);

impl PortDown {
    fn new(port: &str) -> PortDown {
        let out = Command::new("ip").args(["link", "set", port, "down"]).output().expect("ip link");
        assert!(out.status.success(), "ip link set {port} down: {}", String::from_utf8_lossy(&out.stderr));
        PortDown(port.to_string())
    }
    fn up(&mut self) {
        let out = Command::new("ip").args(["link", "set", &self.0, "up"]).output().expect("ip link");
        assert!(out.status.success(), "ip link set {} up: {}", self.0, String::from_utf8_lossy(&out.stderr));
        self.0.clear();
    }
}

impl Drop for PortDown {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = Command::new("ip").args(["link", "set", &self.0, "up"]).output();
        }
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn setns(fd: i32, nstype: i32) -> i32;
    fn gethostname(name: *mut u8, len: usize) -> i32;
}

fn pid_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The hostname (a pod's name: pod containers share its UTS namespace) of process `pid`.
fn hostname_of(pid: u32) -> Option<String> {
    let uts = std::fs::File::open(format!("/proc/{pid}/ns/uts")).ok()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a valid UTS namespace fd, for this short-lived thread only.
            if unsafe { setns(uts.as_raw_fd(), 0x0400_0000) } != 0 {
                return None;
            }
            let mut buf = [0u8; 256];
            // SAFETY: buf is writable for its length.
            if unsafe { gethostname(buf.as_mut_ptr(), buf.len()) } != 0 {
                return None;
            }
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            Some(String::from_utf8_lossy(&buf[..end]).to_string())
        })
        .join()
        .ok()
        .flatten()
    })
}

/// Every running skiff-echo process of this Deployment on the machine: pod name -> PIDs.
fn echo_processes() -> BTreeMap<String, Vec<u32>> {
    let mut by_pod: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "skiff-echo" || pid_gone(pid) {
            continue;
        }
        if let Some(host) = hostname_of(pid)
            && host.starts_with("fecho-")
        {
            by_pod.entry(host).or_default().push(pid);
        }
    }
    by_pod
}

fn lab_json(c: &Cluster) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(c.dir.path().join("lab.json")).expect("lab.json")).expect("lab.json parses")
}

fn agent_pid(c: &Cluster, node: &str) -> u32 {
    lab_json(c)["nodes"].as_array().expect("nodes").iter().find(|n| n["name"] == node).and_then(|n| n["agent_pid"].as_u64()).expect("agent pid") as u32
}

fn bridge_port(c: &Cluster, node: &str) -> String {
    lab_json(c)["nodes"].as_array().expect("nodes").iter().find(|n| n["name"] == node).and_then(|n| n["veth"].as_str()).expect("veth").to_string()
}

fn kill_agent(c: &Cluster, node: &str) -> u32 {
    let pid = agent_pid(c, node);
    // SAFETY: kill(2) on the agent PID skiff up recorded for this cluster.
    assert_eq!(unsafe { kill(pid as i32, 9) }, 0, "SIGKILL the agent {pid} of {node}");
    eventually("the killed agent is gone", Duration::from_secs(10), || pid_gone(pid).then_some(()));
    pid
}

fn restart_agent(c: &Cluster, node: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff")).args(["up", "--restart-agent", node, "--data-dir"]).arg(c.dir.path()).output().expect("skiff up --restart-agent");
    assert!(out.status.success(), "skiff up --restart-agent {node}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The agent's log without its colour codes.
fn agent_log(c: &Cluster, node: &str) -> String {
    let raw = std::fs::read_to_string(c.dir.path().join("nodes").join(node).join("agent.log")).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for next in chars.by_ref() {
                if ('@'..='~').contains(&next) && next != '[' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// How many times a node's Ready status left True in `seq`.
fn departures_from_ready(seq: &[String]) -> usize {
    seq.windows(2).filter(|w| w[0] == "True" && w[1] != "True").count()
}

fn phase(t0: &Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
}

#[test]
fn node_faults_on_a_skiff_up_cluster() {
    let root = require("root (skiff up makes namespaces and loads eBPF)", geteuid() == 0);
    let tools = require("runc, nft and kubectl", have("runc") && have("nft") && kubectl_path().is_some());
    if !root || !tools {
        return;
    }
    ensure_sibling_binaries();
    let image = echo_image();
    let t0 = Instant::now();
    let cluster = Cluster::up_with(
        3,
        &image,
        &[
            &format!("--server-arg=--node-monitor-grace-period={}s", GRACE.as_secs()),
            "--server-arg=--node-monitor-period=1s",
            "--agent-arg=--heartbeat-interval=1s",
        ],
    );
    let k = Kubectl::new(kubectl_path().expect("kubectl"), &cluster.kubeconfig);
    phase(&t0, "cluster up");
    let nodes: Vec<String> = cluster.lab().nodes.iter().map(|n| n.name.clone()).collect();
    assert_eq!(nodes.len(), 3);
    let watch = ReadyWatch::start(&k);
    k.run_with_stdin(&["apply", "-f", "-"], Some(&workload()));
    let initial = eventually("six echo pods Ready on all three nodes", Duration::from_secs(180), || {
        let ready = ready_pods(&k);
        let on: BTreeSet<&str> = ready.iter().map(|p| p.node.as_str()).collect();
        (ready.len() == REPLICAS && on.len() == 3).then_some(ready.clone())
    });
    eventually("every node Ready in the watch", Duration::from_secs(20), || {
        watch.all().values().filter(|s| s.last().map(String::as_str) == Some("True")).count().eq(&3).then_some(())
    });
    phase(&t0, &format!("{REPLICAS} pods Ready: {:?}", initial.iter().map(|p| (&p.name, &p.node)).collect::<Vec<_>>()));

    // 1. Agent kill -9: pods keep running, maps adopted. First let the datapath settle: every
    // endpoint published and a moment for the agents to program them.
    eventually("six ready endpoints", Duration::from_secs(60), || (ready_endpoint_nodes(&k).values().sum::<usize>() == REPLICAS).then_some(()));
    std::thread::sleep(Duration::from_secs(5));
    let a = nodes[0].clone();
    let on_a: Vec<PodInfo> = initial.iter().filter(|p| p.node == a).cloned().collect();
    assert!(!on_a.is_empty(), "node {a} runs pods");
    let procs_before = echo_processes();
    for p in &on_a {
        assert!(procs_before.get(&p.name).is_some_and(|v| v.len() == 1), "one echo process for {}: {procs_before:?}", p.name);
    }
    let syncs_before = agent_log(&cluster, &a).matches("service proxy synced the pinned maps").count();
    let old_pid = kill_agent(&cluster, &a);
    std::thread::sleep(Duration::from_secs(2));
    let during: BTreeMap<String, Vec<u32>> = echo_processes();
    restart_agent(&cluster, &a);
    assert_ne!(agent_pid(&cluster, &a), old_pid);
    let sync_line = eventually("the restarted agent's proxy synced", Duration::from_secs(60), || {
        let log = agent_log(&cluster, &a);
        let syncs: Vec<&str> = log.lines().filter(|l| l.contains("service proxy synced the pinned maps")).collect();
        (syncs.len() > syncs_before).then(|| syncs.last().map(|s| s.to_string()).unwrap_or_default())
    });
    let ops: u64 = sync_line.split_whitespace().find_map(|w| w.strip_prefix("ops=")).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no ops= in {sync_line:?}"));
    assert_eq!(ops, 0, "the restarted agent adopted its pinned maps: {sync_line}");
    eventually(&format!("{a} Ready after its agent restart"), Duration::from_secs(30), || (node_ready(&k, &a) == "True").then_some(()));
    // Give the new agent time to do anything wrong (restart or replace what it adopted).
    std::thread::sleep(Duration::from_secs(5));
    let procs_after = echo_processes();
    let now = pods(&k);
    for p in &on_a {
        assert_eq!(during.get(&p.name), procs_before.get(&p.name), "{}: its container ran on while no agent ran", p.name);
        assert_eq!(procs_after.get(&p.name), procs_before.get(&p.name), "{}: the same container process after the restart", p.name);
        let q = now.iter().find(|q| q.name == p.name).unwrap_or_else(|| panic!("{} still in the API", p.name));
        assert_eq!((&q.uid, q.restarts, q.ready), (&p.uid, p.restarts, true), "{}: same pod, no restart, Ready", p.name);
    }
    phase(&t0, &format!("1. agent kill -9 on {a}: {} pods kept running (same PIDs), startup sync ops={ops}", on_a.len()));

    // 2. Partition of node b on the bridge.
    let b = nodes[1].clone();
    let on_b: Vec<PodInfo> = ready_pods(&k).into_iter().filter(|p| p.node == b).collect();
    assert!(!on_b.is_empty(), "node {b} runs pods");
    eventually("endpoints on every node", Duration::from_secs(30), || (ready_endpoint_nodes(&k).len() == 3).then_some(()));
    let partition_start = Instant::now();
    let mut partition = Partition::cut(&bridge_port(&cluster, &b));
    let server_addr: std::net::SocketAddr = "172.20.77.1:6443".parse().expect("server address");
    let b_netns = std::path::PathBuf::from(format!("/run/netns/{}", cluster.lab().nodes[1].netns));
    let a_netns = std::path::PathBuf::from(format!("/run/netns/{}", cluster.lab().nodes[0].netns));
    assert!(!connects_from(&b_netns, server_addr), "{b} cannot reach the server through the partition");
    assert!(connects_from(&a_netns, server_addr), "{a} still can");
    let not_ready_after = eventually(&format!("{b} NotReady after the partition"), GRACE + Duration::from_secs(20), || {
        (node_ready(&k, &b) != "True").then(|| partition_start.elapsed())
    });
    // The grace runs from the last heartbeat the controller saw, up to one heartbeat interval
    // (1 s) before the cut.
    assert!(not_ready_after + Duration::from_secs(1) >= GRACE, "{b} went NotReady after the grace, not before ({not_ready_after:?})");
    let withdrawn_after = eventually(&format!("{b}'s endpoints withdrawn"), Duration::from_secs(20), || {
        (!ready_endpoint_nodes(&k).contains_key(&b)).then(|| partition_start.elapsed())
    });
    for other in [&a, &nodes[2]] {
        assert_eq!(node_ready(&k, other), "True", "{other} stays Ready while {b} is cut off");
    }
    std::thread::sleep(Duration::from_secs(3));
    partition.heal();
    assert!(connects_from(&b_netns, server_addr), "{b} reaches the server again once healed");
    let healed_at = Instant::now();
    let ready_again_after = eventually(&format!("{b} Ready after healing"), Duration::from_secs(60), || {
        (node_ready(&k, &b) == "True").then(|| healed_at.elapsed())
    });
    eventually(&format!("{b}'s pods Ready and its endpoints back"), Duration::from_secs(60), || {
        let back: BTreeSet<String> = ready_pods(&k).into_iter().filter(|p| p.node == b).map(|p| p.uid).collect();
        let want: BTreeSet<String> = on_b.iter().map(|p| p.uid.clone()).collect();
        (back == want && ready_endpoint_nodes(&k).get(&b) == Some(&on_b.len())).then_some(())
    });
    // A quiet stretch: a flapping node would change again here.
    std::thread::sleep(Duration::from_secs(15));
    let b_seq = watch.statuses_since(&b, partition_start);
    assert_eq!(b_seq, ["True", "Unknown", "True"], "{b}: one transition out and one back, no flapping");
    for other in [&a, &nodes[2]] {
        assert_eq!(watch.statuses_since(other, partition_start), ["True"], "{other}: no transition during the partition");
    }
    phase(
        &t0,
        &format!(
            "2. partition of {b}: NotReady after {:.1} s, endpoints withdrawn after {:.1} s, Ready {:.1} s after healing, transitions {b_seq:?}",
            not_ready_after.as_secs_f64(),
            withdrawn_after.as_secs_f64(),
            ready_again_after.as_secs_f64()
        ),
    );

    // 3. Node c lost: agent killed, link down.
    let c = nodes[2].clone();
    let on_c: Vec<PodInfo> = ready_pods(&k).into_iter().filter(|p| p.node == c).collect();
    assert!(!on_c.is_empty(), "node {c} runs pods");
    let lost_at = Instant::now();
    kill_agent(&cluster, &c);
    let mut port = PortDown::new(&bridge_port(&cluster, &c));
    let lost_not_ready = eventually(&format!("{c} NotReady"), GRACE + Duration::from_secs(20), || (node_ready(&k, &c) != "True").then(|| lost_at.elapsed()));
    let lost_withdrawn = eventually(&format!("{c}'s endpoints withdrawn"), Duration::from_secs(20), || {
        (!ready_endpoint_nodes(&k).contains_key(&c)).then(|| lost_at.elapsed())
    });
    let eviction_bound = GRACE + Duration::from_secs(TOLERATION_SECONDS) + Duration::from_secs(40);
    let rescheduled = eventually("six Ready pods on the remaining nodes", eviction_bound, || {
        let ready = ready_pods(&k);
        (ready.len() == REPLICAS && ready.iter().all(|p| p.node != c)).then(|| lost_at.elapsed())
    });
    let evicted: Vec<PodInfo> = pods(&k).into_iter().filter(|p| p.node == c).collect();
    assert!(evicted.iter().all(|p| p.terminating), "{c}'s pods are being deleted: {evicted:?}");
    assert!(
        rescheduled >= Duration::from_secs(TOLERATION_SECONDS),
        "pods were not evicted before their tolerations ran out ({rescheduled:?})"
    );
    phase(
        &t0,
        &format!(
            "3. {c} lost: NotReady after {:.1} s, endpoints withdrawn after {:.1} s, {} pods rescheduled and Ready after {:.1} s",
            lost_not_ready.as_secs_f64(),
            lost_withdrawn.as_secs_f64(),
            on_c.len(),
            rescheduled.as_secs_f64()
        ),
    );

    // ... and comes back.
    port.up();
    restart_agent(&cluster, &c);
    let back_at = Instant::now();
    let c_ready = eventually(&format!("{c} Ready again"), Duration::from_secs(60), || (node_ready(&k, &c) == "True").then(|| back_at.elapsed()));
    let settled = eventually("exactly six pods, none terminating, six echo containers", Duration::from_secs(90), || {
        let all = pods(&k);
        let procs = echo_processes();
        let api_names: BTreeSet<&str> = all.iter().map(|p| p.name.as_str()).collect();
        let proc_names: BTreeSet<&str> = procs.keys().map(String::as_str).collect();
        (all.len() == REPLICAS && all.iter().all(|p| p.ready && !p.terminating) && procs.values().all(|v| v.len() == 1) && api_names == proc_names)
            .then(|| back_at.elapsed())
    });
    let names: BTreeSet<String> = pods(&k).into_iter().map(|p| p.name).collect();
    assert_eq!(names.len(), REPLICAS, "no duplicate pods");
    let c_seq = watch.statuses_since(&c, lost_at);
    assert_eq!(c_seq.first().map(String::as_str), Some("True"), "{c}: {c_seq:?}");
    assert_eq!(c_seq.last().map(String::as_str), Some("True"), "{c}: {c_seq:?}");
    // Like a kubelet, a restarted agent may post Ready=False before True (Unknown -> False ->
    // True); what must not happen is a second drop once it was back.
    assert_eq!(departures_from_ready(&c_seq), 1, "{c}: one excursion from Ready and one return: {c_seq:?}");
    std::thread::sleep(Duration::from_secs(10));
    let quiet = watch.statuses_since(&c, back_at + c_ready);
    assert_eq!(quiet, ["True"], "{c} stays Ready once back (no flapping)");
    phase(
        &t0,
        &format!(
            "3. {c} back: Ready after {:.1} s, settled (6 pods, 6 containers, none twice) after {:.1} s, transitions {c_seq:?}",
            c_ready.as_secs_f64(),
            settled.as_secs_f64()
        ),
    );
    eprintln!("FIGURES node_faults: Ready histories {:?}; total {:.0} s", watch.all(), t0.elapsed().as_secs_f64());
    drop(watch);
    let mut cluster = cluster;
    cluster.down();
}
