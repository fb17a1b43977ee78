//! Services on a real `skiff up` cluster (3 nodes, each its own agent, eBPF datapath and pods
//! under runc), driven with real kubectl; one cluster, the checks in sequence:
//!
//! 1. ClusterIP from a pod to backends on every node (tc layer), TCP and UDP.
//! 2. ClusterIP from the node itself: a process of the node (in its network namespace and its
//!    host cgroup, where the agent attached the socket-LB programs) reaches the Service; the same
//!    process outside that cgroup cannot (the node has no route to the service range).
//! 3. NodePort from an external client (a namespace on the lab bridge, no node) through XDP to
//!    every node IP, SNATed to the entry node's address (the backend sees the node, not the
//!    client).
//! 4. A LoadBalancer IP from the pool (`skiff up` passes 172.20.<lab>.200-250 to the server's
//!    allocator) routed via the first node, from the external client.
//! 5. externalTrafficPolicy=Local: the backend sees the client's own address, and only the node
//!    with a local endpoint answers; changing the type releases the LoadBalancer IP.
//! 6. No iptables or nftables rule for any Service, in the root namespace and in every node.
//! 7. An agent killed (SIGKILL) and restarted while a long-lived TCP connection through the
//!    ClusterIP keeps exchanging lines: no line lost, and the new agent's proxy finds the pinned
//!    maps already right (its startup sync applies 0 operations).
//! 8. A rolling update under continuous load through the ClusterIP: every request answered.
//! 9. Scale 3 -> 0 -> 3 under a UDP client that keeps its source port: the new pods answer it
//!    (no stale UDP flow).
//!
//! Traffic goes only to addresses of the lab (pods, services, node IPs, the pool), from
//! namespaces the lab made. The cluster uses its own name, lab network and pod range, so it can
//! run beside the other `skiff up` suites.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{ask, echo_image, ensure_sibling_binaries, geteuid, have, in_netns};
use common::*;

const NAME: &str = "sks";
const LAB: u8 = 78;
const CLUSTER_CIDR: &str = "10.245.0.0/16";
const CLIENT_IP: &str = "172.20.78.100";

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: svc}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: svc}
spec:
  replicas: 3
  selector: {matchLabels: {app: echo}}
  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      terminationGracePeriodSeconds: 10
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: echo}}}
      containers:
      - name: echo
        image: skiff/echo:1.0
        # Keep answering for 2 s after SIGTERM (the agent has no preStop hooks yet): requests the
        # datapath still sends while the EndpointSlice change propagates get answers.
        env: [{name: ECHO_SHUTDOWN_DELAY, value: "2"}]
        ports: [{name: http, containerPort: 8080}, {name: tcp, containerPort: 9000}, {name: udp, containerPort: 9001, protocol: UDP}]
        readinessProbe:
          httpGet: {path: /healthz, port: http}
          periodSeconds: 1
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: svc}
spec:
  replicas: 1
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers:
      - {name: client, image: skiff/echo:1.0}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: solo, namespace: svc}
spec:
  replicas: 1
  selector: {matchLabels: {app: solo}}
  template:
    metadata: {labels: {app: solo}}
    spec:
      containers:
      - name: echo
        image: skiff/echo:1.0
        ports: [{name: http, containerPort: 8080}]
        readinessProbe:
          httpGet: {path: /healthz, port: http}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: svc}
spec:
  type: LoadBalancer
  selector: {app: echo}
  ports:
  - {name: tcp, port: 9000, targetPort: tcp}
  - {name: http, port: 8080, targetPort: http}
---
apiVersion: v1
kind: Service
metadata: {name: echo-udp, namespace: svc}
spec:
  selector: {app: echo}
  ports:
  - {name: udp, port: 9001, targetPort: udp, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: solo, namespace: svc}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: solo}
  ports:
  - {name: http, port: 8080, targetPort: http}
"#;

/// A `skiff up --external-client` cluster of our own, taken down on drop.
struct Lab {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    downed: bool,
}

impl Lab {
    fn up(image: &Path) -> Lab {
        let dir = tempfile::Builder::new().prefix("skiff-services-e2e").tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["up", "--nodes", "3", "--name", NAME, "--lab-net", &LAB.to_string(), "--restart-backoff", "1", "--external-client"])
            .arg(format!("--server-arg=--cluster-cidr={CLUSTER_CIDR}"))
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--image")
            .arg(image)
            .output()
            .expect("run skiff up");
        let lab = Lab { kubeconfig: dir.path().join("server/admin.kubeconfig"), dir, downed: false };
        assert!(
            out.status.success(),
            "skiff up failed:\n{}\n{}\nagent logs:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            lab.agent_logs()
        );
        lab
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("lab.json")).expect("lab.json")).expect("lab.json parses")
    }

    fn agent_log(&self, node: &str) -> String {
        strip_ansi(&std::fs::read_to_string(self.dir.path().join("nodes").join(node).join("agent.log")).unwrap_or_default())
    }

    fn agent_logs(&self) -> String {
        let mut s = String::new();
        for i in 1..=3 {
            let node = format!("{NAME}-node-{i}");
            let log = self.agent_log(&node);
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            s.push_str(&format!("--- {node}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        s
    }

    fn skiff(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_skiff")).args(args).arg("--data-dir").arg(self.dir.path()).output().expect("run skiff");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "skiff {args:?} failed:\n{text}");
        text
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.downed {
            let _ = Command::new(env!("CARGO_BIN_EXE_skiff")).args(["down", "--data-dir"]).arg(self.dir.path()).output();
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Clone, Debug)]
struct PodInfo {
    name: String,
    ip: String,
    uid: String,
    node: String,
}

impl PodInfo {
    fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/skp-{}", self.uid))
    }

    fn identity(&self) -> String {
        format!("{} {}", self.name, self.ip)
    }
}

/// Running, Ready pods of `app` (not terminating).
fn ready_pods(k: &Kubectl, app: &str) -> Vec<PodInfo> {
    let pods = k.json(&["get", "pods", "-n", "svc", "-l", &format!("app={app}")]);
    pods["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| {
            p["metadata"]["deletionTimestamp"].is_null()
                && p["status"]["phase"] == "Running"
                && p["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        })
        .map(|p| PodInfo {
            name: p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            ip: p["status"]["podIP"].as_str().unwrap_or_default().to_string(),
            uid: p["metadata"]["uid"].as_str().unwrap_or_default().to_string(),
            node: p["spec"]["nodeName"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

fn all_pods(k: &Kubectl, app: &str) -> usize {
    k.json(&["get", "pods", "-n", "svc", "-l", &format!("app={app}")])["items"].as_array().map_or(0, |a| a.len())
}

fn wait_ready(k: &Kubectl, app: &str, n: usize, timeout: Duration) -> Vec<PodInfo> {
    eventually(&format!("{n} {app} pods Ready and no others"), timeout, || {
        let ready = ready_pods(k, app);
        (ready.len() == n && all_pods(k, app) == n).then_some(ready)
    })
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 20, LAB, 10 + i as u8)
}

fn node_netns(i: usize) -> PathBuf {
    PathBuf::from(format!("/run/netns/{NAME}-node-{i}"))
}

fn client_netns() -> PathBuf {
    PathBuf::from(format!("/run/netns/{NAME}-client"))
}

/// The cgroup v2 directory whose processes the agent gave socket-level ClusterIP.
fn host_cgroup(node: &str) -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    let root = if unified.join("cgroup.procs").exists() { unified } else { Path::new("/sys/fs/cgroup") };
    root.join("skiff").join(node).join("host")
}

/// An HTTP GET over a fresh connection; the body.
fn http_get(dst: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&dst, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err(std::io::Error::other(format!("bad answer: {out:?}"))),
    }
}

/// An HTTP GET over a fresh connection: (status code, body), whatever the status.
fn http_status(dst: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&dst, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other(format!("no HTTP head: {out:?}")))?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other(format!("no status: {head:?}")))?;
    Ok((code, body.trim().to_string()))
}

/// Starts `f` on a new thread inside the network namespace `netns`.
fn spawn_in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).expect("open netns");
        // SAFETY: a valid netns fd; affects only this thread.
        assert_eq!(unsafe { setns(file.as_raw_fd(), 0x4000_0000) }, 0, "setns {}", netns.display());
        f()
    })
}

unsafe extern "C" {
    fn setns(fd: i32, nstype: i32) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
}

fn pid_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// `curl` as a process of node `i`: in its network namespace, and (when `in_host_cgroup`) in the
/// host cgroup the agent attached the socket-LB programs to.
fn curl_from_node(i: usize, in_host_cgroup: bool, url: &str) -> Result<String, String> {
    let node = format!("{NAME}-node-{i}");
    let join = if in_host_cgroup { format!("echo $$ > {}/cgroup.procs && ", host_cgroup(&node).display()) } else { String::new() };
    let script = format!("{join}exec nsenter --net={} curl -sS -m 3 {url}", node_netns(i).display());
    let out = Command::new("sh").args(["-c", &script]).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// `skiff datapath services` and `backends` of a node, as a person reads them.
fn datapath_dump(node: &str) -> String {
    let mut s = String::new();
    for what in ["services", "backends"] {
        let out = Command::new(env!("CARGO_BIN_EXE_skiff")).args(["datapath", "--pin-dir", &format!("/sys/fs/bpf/skiff/{node}"), what]).output().expect("skiff datapath");
        s.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    s
}

fn phase(start: &Instant, what: &str) {
    eprintln!("[services_e2e {:>5.1}s] {what}", start.elapsed().as_secs_f64());
}

#[test]
fn services_on_a_skiff_up_cluster() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0)
        || !require("runc", have("runc"))
        || !require("iproute2", have("ip"))
        || !require("curl and nsenter", have("curl") && have("nsenter"))
        || !require("iptables-save and nft", have("iptables-save") && have("nft"))
    {
        return;
    }
    let t0 = Instant::now();
    ensure_sibling_binaries();
    let image = echo_image();
    let mut lab = Lab::up(&image);
    phase(&t0, "cluster up");
    let k = Kubectl::new(kubectl, &lab.kubeconfig);
    k.run_with_stdin(&["apply", "-f", "-"], Some(WORKLOADS));
    let echo = wait_ready(&k, "echo", 3, Duration::from_secs(120));
    let client = wait_ready(&k, "client", 1, Duration::from_secs(60)).remove(0);
    let solo = wait_ready(&k, "solo", 1, Duration::from_secs(60)).remove(0);
    phase(&t0, "pods ready");
    let echo_nodes: BTreeSet<&str> = echo.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(echo_nodes.len(), 3, "one echo pod per node (topology spread): {echo:?}");
    let identities: BTreeSet<String> = echo.iter().map(|p| p.identity()).collect();

    let svc = k.json(&["get", "svc", "echo", "-n", "svc"]);
    let cluster_ip: Ipv4Addr = svc["spec"]["clusterIP"].as_str().expect("clusterIP").parse().expect("an IPv4 clusterIP");
    let node_port = |svc: &serde_json::Value, name: &str| -> u16 {
        svc["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).and_then(|p| p["nodePort"].as_u64()).expect("nodePort") as u16
    };
    let (np_tcp, np_http) = (node_port(&svc, "tcp"), node_port(&svc, "http"));
    let udp_ip: Ipv4Addr = k.ok(&["get", "svc", "echo-udp", "-n", "svc", "-o", "jsonpath={.spec.clusterIP}"]).parse().expect("udp clusterIP");
    let vip = SocketAddr::from((cluster_ip, 9000));
    let udp_vip = SocketAddr::from((udp_ip, 9001));

    // 1. ClusterIP from a pod, to backends on every node (TCP), and UDP.
    let seen: BTreeSet<String> = eventually("every echo pod answers the client pod through the ClusterIP", Duration::from_secs(30), || {
        let seen: BTreeSet<String> = in_netns(&client.netns(), || (0..60).filter_map(|_| ask(vip).ok()).collect());
        (seen == identities).then_some(seen)
    });
    let remote = echo.iter().filter(|p| p.node != client.node).count();
    assert_eq!(remote, 2, "two of the answering backends are on other nodes than the client ({}): {seen:?}", client.node);
    let udp_seen: BTreeSet<String> = in_netns(&client.netns(), || {
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            // A socket (a source port, so a flow) per datagram: each flow is balanced anew.
            let sock = UdpSocket::bind("0.0.0.0:0").expect("udp bind");
            sock.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
            sock.send_to(b"who\n", udp_vip).expect("udp send");
            let mut buf = [0u8; 256];
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                assert_eq!(from, udp_vip, "UDP replies come from the ClusterIP");
                seen.insert(String::from_utf8_lossy(&buf[..n]).trim().to_string());
            }
        }
        seen
    });
    assert!(udp_seen.len() >= 2 && udp_seen.is_subset(&identities), "UDP through the ClusterIP reaches the echo pods: {udp_seen:?}");
    phase(&t0, "1. ClusterIP from a pod: ok");

    // 2. ClusterIP from the node itself.
    let url = format!("http://{cluster_ip}:8080/");
    for i in 1..=3 {
        let mut answers = BTreeSet::new();
        for _ in 0..12 {
            let a = curl_from_node(i, true, &url).unwrap_or_else(|e| panic!("node {i} process -> {url}: {e}\n{}", lab.agent_logs()));
            answers.insert(a);
        }
        assert!(answers.is_subset(&identities) && answers.len() >= 2, "node {i} reaches several echo pods through the ClusterIP: {answers:?}");
        let outside = curl_from_node(i, false, &url);
        assert!(outside.is_err(), "outside the host cgroup, node {i} has no route to the ClusterIP (the socket layer is what translates): {outside:?}");
    }
    phase(&t0, "2. ClusterIP from the nodes: ok");

    // 3. NodePort from the external client, through every node; SNAT to the entry node.
    let mut np_seen = BTreeSet::new();
    for i in 1..=3 {
        let front = SocketAddr::from((node_ip(i), np_tcp));
        let answers: Vec<String> = in_netns(&client_netns(), || (0..20).map(|_| ask(front)).collect::<Result<_, _>>())
            .unwrap_or_else(|e| panic!("external client -> {front}: {e}\n{}", lab.agent_logs()));
        assert!(answers.iter().all(|a| identities.contains(a)), "{front}: {answers:?}");
        np_seen.extend(answers);
        let http = SocketAddr::from((node_ip(i), np_http));
        let who = in_netns(&client_netns(), || http_get(http, "/whoami", Duration::from_secs(2))).unwrap_or_else(|e| panic!("{http}/whoami: {e}"));
        assert!(who.starts_with(&format!("{}:", node_ip(i))), "eTP=Cluster: the backend sees the entry node {} (SNAT), not the client: {who}", node_ip(i));
    }
    assert_eq!(np_seen, identities, "NodePort reached every backend (on every node)");
    phase(&t0, "3. NodePort from outside via XDP on every node: ok");

    // 4. The LoadBalancer IP from the pool, from the external client.
    let lb_of = |name: &str| -> Option<(Ipv4Addr, String)> {
        let s = k.json(&["get", "svc", name, "-n", "svc"]);
        let ing = s["status"]["loadBalancer"]["ingress"].as_array()?.first()?.clone();
        Some((ing["ip"].as_str()?.parse().ok()?, ing["ipMode"].as_str().unwrap_or_default().to_string()))
    };
    let (lb_ip, mode) = eventually("echo gets a LoadBalancer IP", Duration::from_secs(20), || lb_of("echo"));
    let (solo_lb, _) = eventually("solo gets a LoadBalancer IP", Duration::from_secs(20), || lb_of("solo"));
    for ip in [lb_ip, solo_lb] {
        assert!((200..=250).contains(&ip.octets()[3]) && ip.octets()[..3] == [172, 20, LAB], "{ip} is from the lab pool");
    }
    assert_ne!(lb_ip, solo_lb, "each Service its own address");
    assert_eq!(mode, "VIP");
    let lb_front = SocketAddr::from((lb_ip, 9000));
    let lb_seen: BTreeSet<String> = in_netns(&client_netns(), || (0..30).map(|_| ask(lb_front)).collect::<Result<_, _>>())
        .unwrap_or_else(|e| panic!("external client -> LoadBalancer {lb_front}: {e}\n{}", lab.agent_logs()));
    assert!(lb_seen.is_subset(&identities) && lb_seen.len() >= 2, "the LoadBalancer IP balances over the echo pods: {lb_seen:?}");
    phase(&t0, "4. LoadBalancer IP from outside: ok");

    // 5. externalTrafficPolicy=Local: the client's address is kept; only solo's node answers.
    let solo_svc = k.json(&["get", "svc", "solo", "-n", "svc"]);
    let solo_np = node_port(&solo_svc, "http");
    let solo_node: usize = solo.node.rsplit('-').next().and_then(|n| n.parse().ok()).expect("node index");
    for i in 1..=3 {
        let front = SocketAddr::from((node_ip(i), solo_np));
        let got = in_netns(&client_netns(), || http_get(front, "/whoami", Duration::from_secs(2)));
        if i == solo_node {
            let who = got.unwrap_or_else(|e| panic!("solo's node {front}: {e}\n{}", lab.agent_logs()));
            assert!(who.starts_with(&format!("{CLIENT_IP}:")), "eTP=Local keeps the client's source address: {who}");
        } else {
            assert!(got.is_err(), "node {i} has no local solo endpoint and must not answer: {got:?}");
        }
    }
    // 5b. The health-check node port (eTP=Local LoadBalancer), asked from the external client on
    // every node, as a cloud load balancer would: 200 where solo has its endpoint, 503 elsewhere.
    let hc_port = solo_svc["spec"]["healthCheckNodePort"].as_u64().unwrap_or_else(|| panic!("solo has a healthCheckNodePort: {solo_svc}")) as u16;
    let used: Vec<u16> = [np_tcp, np_http, solo_np].into();
    assert!((30000..=32767).contains(&hc_port) && !used.contains(&hc_port), "health port {hc_port} from the node-port range, distinct from the node ports {used:?}");
    for i in 1..=3 {
        let front = SocketAddr::from((node_ip(i), hc_port));
        let want = if i == solo_node { 200 } else { 503 };
        let (code, body) = eventually(&format!("node {i} health port answers {want}"), Duration::from_secs(15), || {
            in_netns(&client_netns(), || http_status(front, "/healthz", Duration::from_secs(2))).ok().filter(|(c, _)| *c == want)
        });
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{front} body {body:?}: {e}"));
        assert_eq!(v["service"], serde_json::json!({"namespace": "svc", "name": "solo"}), "{front} ({code}): {body}");
        assert_eq!(v["localEndpoints"], if i == solo_node { 1 } else { 0 }, "{front} ({code}): {body}");
        assert_eq!(v["serviceProxyHealthy"], true, "{front}: {body}");
    }
    phase(&t0, "5b. healthCheckNodePort: 200 on the endpoint's node, 503 on the others: ok");
    // Changing the type away from LoadBalancer releases the address.
    k.ok(&["patch", "svc", "solo", "-n", "svc", "--type", "merge", "-p", r#"{"spec":{"type":"NodePort"}}"#]);
    eventually("solo's LoadBalancer IP released", Duration::from_secs(20), || lb_of("solo").is_none().then_some(()));
    // ... and its health-check node port: gone from the spec, closed on the endpoint's node.
    let after = k.json(&["get", "svc", "solo", "-n", "svc"]);
    assert!(after["spec"]["healthCheckNodePort"].is_null(), "a NodePort Service has no health-check port: {after}");
    let solo_hc = SocketAddr::from((node_ip(solo_node), hc_port));
    eventually("solo's node closes the health-check port", Duration::from_secs(15), || {
        in_netns(&client_netns(), || http_status(solo_hc, "/", Duration::from_secs(1))).is_err().then_some(())
    });
    phase(&t0, "5. externalTrafficPolicy=Local: ok");

    // 6. No firewall rule of ours for any Service, anywhere.
    let mut rules = String::new();
    let mut namespaces = vec![None];
    namespaces.extend((1..=3).map(|i| Some(format!("{NAME}-node-{i}"))));
    for ns in &namespaces {
        for tool in ["iptables-save", "nft list ruleset"] {
            let cmd = match ns {
                None => format!("{tool} 2>/dev/null"),
                Some(n) => format!("ip netns exec {n} {tool} 2>/dev/null"),
            };
            let out = Command::new("sh").args(["-c", &cmd]).output().expect("run firewall dump");
            rules.push_str(&String::from_utf8_lossy(&out.stdout));
        }
    }
    let mut needles: Vec<String> = vec![cluster_ip.to_string(), udp_ip.to_string(), lb_ip.to_string(), solo_lb.to_string(), "KUBE-SVC".into(), "KUBE-NODEPORTS".into()];
    for p in [np_tcp, np_http, solo_np] {
        needles.extend([format!("dpt:{p}"), format!("dport {p}"), format!("--dport {p}")]);
    }
    for n in &needles {
        assert!(!rules.contains(n.as_str()), "a firewall rule mentions {n}:\n{rules}");
    }
    assert!(!rules.to_lowercase().contains("skiff"), "a firewall rule of skiff's:\n{rules}");
    phase(&t0, "6. no iptables/nft rule for Services: ok");

    // 7. The agent of the client's node is killed and restarted under a long-lived connection.
    let victim = client.node.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let lines = Arc::new(AtomicU64::new(0));
    let conn = {
        let (stop, lines) = (stop.clone(), lines.clone());
        spawn_in_netns(&client.netns(), move || -> Result<BTreeSet<String>, String> {
            let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
            let mut w = s.try_clone().map_err(|e| e.to_string())?;
            let mut r = BufReader::new(s);
            let mut who = BTreeSet::new();
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let n = lines.load(Ordering::SeqCst);
                w.write_all(format!("line {n}\n").as_bytes()).map_err(|e| format!("write after {n} lines: {e}"))?;
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) => return Err(format!("closed after {n} lines")),
                    Ok(_) => {}
                    Err(e) => return Err(format!("read after {n} lines: {e}")),
                }
                who.insert(line.trim().to_string());
                lines.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(who)
        })
    };
    eventually("the long-lived connection exchanges lines", Duration::from_secs(10), || (lines.load(Ordering::SeqCst) >= 10).then_some(()));
    let st = lab.state();
    let node_rec = st["nodes"].as_array().unwrap().iter().find(|n| n["name"] == victim.as_str()).expect("victim in lab.json").clone();
    let old_pid = node_rec["agent_pid"].as_u64().expect("agent pid") as u32;
    let syncs_before = lab.agent_log(&victim).matches("service proxy synced the pinned maps").count();
    let maps_before = datapath_dump(&victim);
    // SAFETY: kill(2) on the agent PID skiff up recorded for this lab.
    assert_eq!(unsafe { kill(old_pid as i32, 9) }, 0, "SIGKILL the agent {old_pid}");
    eventually("the killed agent is gone", Duration::from_secs(10), || pid_gone(old_pid).then_some(()));
    let at_kill = lines.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    assert!(lines.load(Ordering::SeqCst) > at_kill + 10, "lines keep flowing while no agent runs");
    lab.skiff(&["up", "--restart-agent", &victim]);
    let new_pid = lab.state()["nodes"].as_array().unwrap().iter().find(|n| n["name"] == victim.as_str()).and_then(|n| n["agent_pid"].as_u64()).expect("new pid");
    assert_ne!(new_pid as u32, old_pid);
    let sync_line = eventually("the restarted agent's proxy synced", Duration::from_secs(60), || {
        let log = lab.agent_log(&victim);
        let syncs: Vec<&str> = log.lines().filter(|l| l.contains("service proxy synced the pinned maps")).collect();
        (syncs.len() > syncs_before).then(|| syncs.last().map(|s| s.to_string()).unwrap_or_default())
    });
    let ops: u64 = sync_line.split_whitespace().find_map(|w| w.strip_prefix("ops=")).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no ops= in {sync_line:?}"));
    let log = lab.agent_log(&victim);
    let since_restart: String = log.lines().skip_while(|l| !l.contains(&format!("pid {new_pid}")) && !l.contains("Node exists")).collect::<Vec<_>>().join("\n");
    assert_eq!(
        ops,
        0,
        "the restarted agent found the pinned maps right and reprogrammed nothing: {sync_line}\nmaps before the kill:\n{maps_before}\nnow:\n{}\nagent log since the restart:\n{since_restart}",
        datapath_dump(&victim)
    );
    let at_restart = lines.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let who = conn.join().expect("connection thread").unwrap_or_else(|e| panic!("the long-lived connection broke: {e}\n{}", lab.agent_logs()));
    let total = lines.load(Ordering::SeqCst);
    assert!(total > at_restart + 10, "lines keep flowing after the restart ({at_restart} -> {total})");
    assert_eq!(who.len(), 1, "one connection, one backend: {who:?}");
    eventually("the restarted node is Ready", Duration::from_secs(30), || {
        let n = k.json(&["get", "node", &victim]);
        n["status"]["conditions"].as_array()?.iter().any(|c| c["type"] == "Ready" && c["status"] == "True").then_some(())
    });
    phase(&t0, &format!("7. agent restart under a live connection: ok ({total} lines, startup sync ops={ops})"));

    // 8. A rolling update under continuous load through the ClusterIP: every request answered.
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let load: Vec<_> = (0..3)
        .map(|_| {
            let (stop, answered, failures) = (stop.clone(), answered.clone(), failures.clone());
            spawn_in_netns(&client.netns(), move || {
                let deadline = Instant::now() + Duration::from_secs(150);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match ask(vip) {
                        Ok(a) => *answered.lock().unwrap().entry(a).or_default() += 1,
                        Err(e) => failures.lock().unwrap().push(format!("{:?}: {e}", t0.elapsed())),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    k.ok(&["set", "env", "deployment/echo", "-n", "svc", "ROLLOUT=2"]);
    let out = k.run_with_stdin(&["rollout", "status", "deployment/echo", "-n", "svc", "--timeout=150s"], None);
    assert!(out.status.success(), "rollout finished: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let rolled = wait_ready(&k, "echo", 3, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().expect("load thread");
    }
    let answered = answered.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();
    let total: u64 = answered.values().sum();
    let new_ids: BTreeSet<String> = rolled.iter().map(|p| p.identity()).collect();
    assert!(new_ids.is_disjoint(&identities), "the rollout replaced every pod");
    eprintln!("rolling update: {total} requests answered, {} failed; by pod: {answered:?}", failures.len());
    assert!(failures.is_empty(), "{} of {} requests failed during the rolling update: {:?}\n{}", failures.len(), total + failures.len() as u64, &failures[..failures.len().min(10)], lab.agent_logs());
    assert!(total >= 100, "enough load to mean something: {total}");
    assert!(new_ids.iter().all(|id| answered.contains_key(id)), "the new pods took over the load: {answered:?}");
    phase(&t0, &format!("8. rolling update under load: ok ({total} requests, 0 failed)"));

    // 9. Scale 3 -> 0 -> 3 under a UDP client that keeps its source port.
    let stop = Arc::new(AtomicBool::new(false));
    let replies: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let udp = {
        let (stop, replies) = (stop.clone(), replies.clone());
        spawn_in_netns(&client.netns(), move || -> Result<u16, String> {
            let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            sock.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
            let port = sock.local_addr().map_err(|e| e.to_string())?.port();
            let deadline = Instant::now() + Duration::from_secs(150);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                // With no backend the send may be refused; the client keeps trying.
                let _ = sock.send_to(b"who\n", udp_vip);
                let mut buf = [0u8; 256];
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if from != udp_vip {
                        return Err(format!("a reply from {from}, not the ClusterIP"));
                    }
                    replies.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).trim().to_string()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(port)
        })
    };
    eventually("the UDP client gets answers", Duration::from_secs(10), || (!replies.lock().unwrap().is_empty()).then_some(()));
    k.ok(&["scale", "deployment/echo", "-n", "svc", "--replicas=0"]);
    eventually("no echo pod left", Duration::from_secs(60), || (all_pods(&k, "echo") == 0).then_some(()));
    std::thread::sleep(Duration::from_secs(1));
    let quiet_from = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let during_zero = replies.lock().unwrap().iter().filter(|(at, _)| *at > quiet_from).count();
    assert_eq!(during_zero, 0, "no answers while there is no backend");
    k.ok(&["scale", "deployment/echo", "-n", "svc", "--replicas=3"]);
    let scaled = wait_ready(&k, "echo", 3, Duration::from_secs(90));
    let ready_at = Instant::now();
    let scaled_ids: BTreeSet<String> = scaled.iter().map(|p| p.identity()).collect();
    let first_new = eventually("the same UDP client is answered by the new pods", Duration::from_secs(15), || {
        replies.lock().unwrap().iter().find(|(at, who)| *at > quiet_from && scaled_ids.contains(who)).map(|(at, _)| *at)
    });
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let port = udp.join().expect("udp thread").unwrap_or_else(|e| panic!("UDP client: {e}"));
    let after: Vec<String> = replies.lock().unwrap().iter().filter(|(at, _)| *at > quiet_from).map(|(_, w)| w.clone()).collect();
    assert!(after.iter().all(|w| scaled_ids.contains(w)), "after 3 -> 0 -> 3 only new pods answer (no stale flow): {after:?}");
    eprintln!(
        "scale 3->0->3: UDP client port {port} answered by a new pod {:?} after they were Ready ({} answers after)",
        first_new.saturating_duration_since(ready_at),
        after.len()
    );
    phase(&t0, "9. scale 3 -> 0 -> 3 with a UDP client: ok");

    let text = lab.skiff(&["down"]);
    lab.downed = true;
    assert!(text.contains("skiff is down"), "{text}");
    assert!(!Path::new(&format!("/sys/class/net/{NAME}-c")).exists(), "the client's veth is gone");
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&netns.stdout).contains(&format!("{NAME}-")), "every namespace of the lab is gone");
    phase(&t0, "down: clean");
}
