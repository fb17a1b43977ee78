//! The API under load (issue 8, "Load"): a real `skiff server` (apiserver + controller-manager +
//! scheduler, SQLite or etcd) on loopback, N simulated nodes, M pods bound to them, S Services
//! with selectors, and the latencies of what clients do to it.
//!
//! A simulated node is what a real agent does to the API, without containers: it registers its
//! Node and renews its Lease with the agent's own code (`skiff_agent::node`), authenticates with
//! its own client certificate (`system:node:<name>` in `system:nodes`, signed by the cluster CA,
//! so the node authorizer applies as it does to a real agent), watches its pods
//! (`fieldSelector=spec.nodeName=<node>`, as the agent and kubelets do) and all Services (as the
//! agent's proxy and DNS, and kubelets, do), and posts its pods' status (podIP, Running, Ready)
//! as a merge patch of `pods/status`, as the agent's pod workers do. Pods are bound directly
//! (`spec.nodeName` set at create), so the scheduler has nothing to do; the controller-manager
//! runs (it is part of `skiff server`) and its EndpointSlice controller makes the slices of the
//! Services from the pods' ready addresses, which is load the apiserver carries in a real cluster.
//!
//! Watch latency is measured on one clock: the writer notes when each write was acknowledged
//! (with the resourceVersion the server returned) and every watcher notes when the event with
//! that resourceVersion arrived; the difference is the delivery latency (an event may arrive
//! before the writer has read its response: that counts as 0 and is counted apart). The same
//! records prove that nothing was lost or duplicated: every node watcher must see exactly its
//! pods' writes, every Service watcher every Service write.
//!
//! The agent's memory with many Services is measured in a separate process (`loadbench
//! agent-memory`, this binary again): the agent's real service proxy (`skiff_proxy::run`) over a
//! real eBPF datapath (loaded with its maps pinned in a directory of our own, attached to
//! nothing) plus the agent's DNS server (`skiff_dns::serve`, on a loopback port), both watching
//! every Service and EndpointSlice. Its VmRSS/VmHWM are read from /proc once it has programmed
//! every Service. The rest of an agent (pod workers, runtime) is not in it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube::core::{Request, WatchEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::svc::run::{Machine, machine};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Etcd,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// The `skiff` binary whose `skiff server` is measured.
    pub skiff: PathBuf,
    /// This binary (its hidden `agent-memory` subcommand is the agent-memory process).
    pub agent_exe: PathBuf,
    pub store: StoreKind,
    pub nodes: usize,
    pub pods: usize,
    pub services: usize,
    /// Services in the cluster when the agent's memory is measured (the extra ones are created
    /// after the apiserver's figures); 0: no agent-memory phase.
    pub agent_services: usize,
    pub namespaces: usize,
    /// Requests in flight at once in the write phases.
    pub writers: usize,
    /// Cluster-wide pod watchers and Service watchers (as a controller-manager, a scheduler or a
    /// monitoring client hold), besides the nodes' own.
    pub cluster_watchers: usize,
    /// Samples of each read (list, get).
    pub samples: usize,
    /// Pods patched (metadata) and Services replaced (PUT).
    pub updates: usize,
    /// Pods deleted.
    pub deletes: usize,
    /// Page size of the paged cluster-wide list.
    pub page_limit: usize,
    /// How often each node renews its Lease and posts its Node status (the agent's default 10 s).
    pub heartbeat: Duration,
    /// Upper bound for each phase (a phase that takes longer fails the run).
    pub phase_timeout: Duration,
    pub command: String,
    pub notes: Vec<String>,
    /// Where the record is written (`<out_dir>/<stem>.json` and `.md`), after every phase too.
    pub out_dir: PathBuf,
    pub stem: String,
}

/// p50/p99/max of one operation's latencies, in milliseconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpStat {
    pub op: String,
    pub n: usize,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Operations per second over the phase (write phases with many requests in flight).
    pub per_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WatchStat {
    pub what: String,
    /// Watchers that receive each event.
    pub watchers: usize,
    /// Deliveries measured (events x watchers).
    pub deliveries: usize,
    /// Deliveries that arrived before the writer had read the write's response (counted as 0).
    pub before_ack: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The same from the moment the write's request was sent (its own latency included).
    pub from_send_p50_ms: f64,
    pub from_send_p99_ms: f64,
    pub from_send_max_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Checks {
    pub pods_expected: usize,
    pub pods_listed: usize,
    pub pods_listed_paged: usize,
    pub services_expected: usize,
    pub services_listed: usize,
    pub services_with_ready_slice: usize,
    pub node_watch_expected: usize,
    pub node_watch_lost: usize,
    pub node_watch_duplicated: usize,
    /// Events a node watcher got for a pod not on its node (the field selector leaked).
    pub node_watch_foreign: usize,
    pub cluster_watch_expected: usize,
    pub cluster_watch_lost: usize,
    pub cluster_watch_duplicated: usize,
    pub service_watch_expected: usize,
    pub service_watch_lost: usize,
    pub service_watch_duplicated: usize,
    /// 410 Gone / error events and stream failures seen by all watchers (each re-watches).
    pub watch_errors: u64,
    pub watch_restarts: u64,
    pub lease_renew_errors: u64,
    pub ok: bool,
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Memory {
    pub process: String,
    pub when: String,
    pub rss_mib: f64,
    pub hwm_mib: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentMemory {
    pub services_in_cluster: usize,
    pub endpoint_slices_in_cluster: usize,
    pub services_programmed: u64,
    pub frontends_programmed: u64,
    /// Seconds from the process's start until every Service was programmed.
    pub programmed_after_s: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub what: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scale {
    pub nodes: usize,
    pub pods: usize,
    pub services: usize,
    pub agent_services: usize,
    pub namespaces: usize,
    pub writers: usize,
    pub cluster_watchers: usize,
    pub samples: usize,
    pub updates: usize,
    pub deletes: usize,
    pub page_limit: usize,
    pub heartbeat_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub command: String,
    pub date: String,
    pub machine: Machine,
    pub load_after: String,
    pub skiff_binary: String,
    pub store: StoreKind,
    pub scale: Scale,
    pub ops: Vec<OpStat>,
    pub watch: Vec<WatchStat>,
    pub memory: Vec<Memory>,
    pub agent: Option<AgentMemory>,
    pub checks: Checks,
    pub phases: Vec<Phase>,
    pub notes: Vec<String>,
    pub elapsed_s: f64,
    /// Set while the run has not finished: why (the phase that failed and its error, or the
    /// last phase completed). `phases` holds the phases completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Statistics.

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn op_stat(op: &str, mut ms: Vec<f64>, errors: u64, wall: Option<Duration>) -> OpStat {
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    OpStat {
        op: op.to_string(),
        n,
        errors,
        p50_ms: percentile(&ms, 50.0),
        p99_ms: percentile(&ms, 99.0),
        max_ms: ms.last().copied().unwrap_or(0.0),
        mean_ms: if n == 0 { 0.0 } else { ms.iter().sum::<f64>() / n as f64 },
        per_s: wall.filter(|w| !w.is_zero()).map(|w| n as f64 / w.as_secs_f64()),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// The server process.

/// A `skiff server` (and its etcd) we started; stopped by PID on drop.
struct ServerProc {
    child: Option<Child>,
    data_dir: PathBuf,
    log: PathBuf,
    etcd: Option<skiff_store::etcd_server::EtcdServer>,
}

impl ServerProc {
    async fn start(opts: &Options, dir: &Path) -> anyhow::Result<ServerProc> {
        let data_dir = dir.join("server");
        let log = dir.join("server.log");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut args: Vec<String> = vec![
            "server".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--bind".into(),
            format!("127.0.0.1:{port}"),
        ];
        let etcd = match opts.store {
            StoreKind::Sqlite => None,
            StoreKind::Etcd => {
                let bin = skiff_store::etcd_server::etcd_binary()
                    .context("--store etcd: no etcd binary (apt-get install -y etcd-server, or set SKIFF_ETCD_BIN)")?;
                let etcd = skiff_store::etcd_server::EtcdServer::start(&bin, &dir.join("etcd")).await.context("starting etcd")?;
                args.extend(["--store".into(), "etcd".into(), "--etcd-endpoints".into(), etcd.endpoints().join(",")]);
                Some(etcd)
            }
        };
        let log_file = std::fs::File::create(&log).context("server log")?;
        let child = Command::new(&opts.skiff)
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} server", opts.skiff.display()))?;
        let mut server = ServerProc { child: Some(child), data_dir, log, etcd };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Ok(Some(status))) = server.child.as_mut().map(|c| c.try_wait()) {
                bail!("skiff server exited with {status}: {}", server.log_tail());
            }
            if server.kubeconfig().exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("skiff server not ready in 60 s: {}", server.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join(skiff_apiserver::KUBECONFIG)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
        if let Some(mut etcd) = self.etcd.take() {
            etcd.kill();
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM to the PID we started, SIGKILL after 10 s.
fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// VmRSS and VmHWM of a process, in MiB.
pub fn proc_memory(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Clients.

async fn client_from_kubeconfig(kubeconfig: kube::config::Kubeconfig) -> anyhow::Result<kube::Client> {
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .context("loading the kubeconfig")?;
    // Lists of 10,000 pods under load can take seconds; a watch is held up to 290 s.
    config.read_timeout = Some(Duration::from_secs(300));
    kube::Client::try_from(config).context("building the API client")
}

/// The admin kubeconfig with the admin token replaced by a client certificate for `user` in
/// `groups`, signed by the cluster CA (what a node's TLS bootstrap ends with).
fn identity_kubeconfig(admin: &Path, ca_key: &Path, user: &str, groups: &[&str]) -> anyhow::Result<kube::config::Kubeconfig> {
    let text = std::fs::read_to_string(admin).with_context(|| format!("reading {}", admin.display()))?;
    let mut kc = kube::config::Kubeconfig::from_yaml(&text).context("parsing the admin kubeconfig")?;
    let ca_key_pem = std::fs::read_to_string(ca_key).with_context(|| format!("reading {}", ca_key.display()))?;
    let (cert, key) = skiff_apiserver::client_cert(&ca_key_pem, user, groups, Duration::from_secs(24 * 3600))?;
    let b64 = data_encoding::BASE64;
    for named in &mut kc.auth_infos {
        if let Some(auth) = named.auth_info.as_mut() {
            auth.token = None;
            auth.client_certificate_data = Some(b64.encode(cert.as_bytes()));
            auth.client_key_data = Some(b64.encode(key.as_bytes()).into());
        }
    }
    Ok(kc)
}

/// Only what the benchmark reads of an object: watch events and write responses are parsed
/// into this (serde skips the rest), so the client's own CPU stays small beside the server's.
#[derive(Clone, Debug, Deserialize)]
struct Thin {
    metadata: ThinMeta,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ThinMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
}

impl Thin {
    fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace.as_deref().unwrap_or(""), self.metadata.name.as_deref().unwrap_or(""))
    }
    fn rv(&self) -> u64 {
        self.metadata.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// A request through kube's client, timed until its whole body has arrived; the body is parsed
/// as [`Thin`] when asked.
async fn timed(client: &kube::Client, req: http::Request<Vec<u8>>) -> (Duration, Result<String, kube::Error>) {
    let t = Instant::now();
    let r = client.request_text(req).await;
    (t.elapsed(), r)
}

fn merge_patch_request(path: &str, name: &str, body: &Value, status: bool) -> anyhow::Result<http::Request<Vec<u8>>> {
    let r = Request::new(path);
    let patch = Patch::Merge(body);
    Ok(if status { r.patch_subresource("status", name, &PatchParams::default(), &patch)? } else { r.patch(name, &PatchParams::default(), &patch)? })
}

// ---------------------------------------------------------------------------------------------
// Watches.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Ev {
    Added,
    Modified,
    Deleted,
}

/// One event as a watcher got it.
struct Arrival {
    ev: Ev,
    key: String,
    rv: u64,
    at: Instant,
}

/// One acknowledged write.
#[derive(Clone)]
struct WriteAck {
    ev: Ev,
    key: String,
    rv: u64,
    /// When the request was sent and when its response had been read.
    sent: Instant,
    at: Instant,
    /// The node of the pod written (None: not a pod).
    node: Option<usize>,
}

#[derive(Default)]
struct WatchCounters {
    errors: AtomicU64,
    restarts: AtomicU64,
}

type Sink = Arc<Mutex<Vec<Arrival>>>;

/// Holds a watch of `path` (a collection URL) with an optional field selector until `stop`,
/// noting every event: lists first for the resourceVersion, then watches from it and re-watches
/// from the last one seen when the server ends the stream (its timeout); a 410 relists.
async fn watch_loop(
    client: kube::Client,
    path: String,
    fields: Option<String>,
    sink: Sink,
    counters: Arc<WatchCounters>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rv: Option<String> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let start_rv = match rv.clone() {
            Some(v) => v,
            None => {
                let mut lp = ListParams::default().limit(1);
                if let Some(f) = &fields {
                    lp = lp.fields(f);
                }
                let listed = match Request::new(&path).list(&lp) {
                    Ok(req) => client.request_text(req).await.ok(),
                    Err(_) => None,
                };
                match listed.and_then(|t| serde_json::from_str::<Value>(&t).ok()) {
                    Some(v) => v.pointer("/metadata/resourceVersion").and_then(Value::as_str).unwrap_or("0").to_string(),
                    None => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
        };
        let mut wp = WatchParams::default().timeout(290);
        if let Some(f) = &fields {
            wp = wp.fields(f);
        }
        let req = match Request::new(&path).watch(&wp, &start_rv) {
            Ok(r) => r,
            Err(_) => return,
        };
        let stream = match client.request_events::<Thin>(req).await {
            Ok(s) => s,
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        futures::pin_mut!(stream);
        let mut last = start_rv;
        let mut expired = false;
        loop {
            let next = tokio::select! {
                n = stream.try_next() => n,
                _ = stop.changed() => return,
            };
            let event = match next {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            let at = Instant::now();
            let (ev, obj) = match event {
                WatchEvent::Added(o) => (Ev::Added, o),
                WatchEvent::Modified(o) => (Ev::Modified, o),
                WatchEvent::Deleted(o) => (Ev::Deleted, o),
                WatchEvent::Bookmark(b) => {
                    last = b.metadata.resource_version;
                    continue;
                }
                WatchEvent::Error(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    expired = e.code == 410;
                    break;
                }
            };
            last = obj.metadata.resource_version.clone().unwrap_or(last);
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(Arrival { ev, key: obj.key(), rv: obj.rv(), at });
        }
        rv = if expired { None } else { Some(last) };
        counters.restarts.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// The objects.

fn node_name(i: usize) -> String {
    format!("load-node-{i:03}")
}

fn namespace(i: usize) -> String {
    format!("load-{i}")
}

/// Pod `j`'s Service (primary), namespace and node.
struct Layout {
    nodes: usize,
    pods: usize,
    services: usize,
    namespaces: usize,
}

impl Layout {
    fn pods_per_service(&self) -> usize {
        (self.pods / self.services.max(1)).max(1)
    }
    fn service_of(&self, pod: usize) -> usize {
        (pod / self.pods_per_service()).min(self.services.saturating_sub(1))
    }
    fn ns_of_service(&self, svc: usize) -> String {
        namespace(svc % self.namespaces)
    }
    fn ns_of_pod(&self, pod: usize) -> String {
        self.ns_of_service(self.service_of(pod))
    }
    fn node_of(&self, pod: usize) -> usize {
        pod % self.nodes
    }
    fn pod_name(pod: usize) -> String {
        format!("pod-{pod:05}")
    }
}

fn pod_object(l: &Layout, j: usize) -> Value {
    let svc = l.service_of(j);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": Layout::pod_name(j), "namespace": l.ns_of_pod(j),
                     "labels": {"app": format!("s{svc}"), "alt": format!("s{svc}")}},
        "spec": {"nodeName": node_name(l.node_of(j)),
                 "containers": [{"name": "echo", "image": "skiff/echo:1.0",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]}
    })
}

/// A Service selecting the pods of primary Service `k` (by `app`, or by `alt` for the extra
/// Services of the agent phase, which reuse the same pods).
fn service_object(name: &str, ns: &str, label: &str, k: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {label: format!("s{k}")},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}
    })
}

/// What a pod worker posts once the pod runs and is ready (shape of the agent's pod status).
fn running_status(uid: &str, pod_ip: &str, host_ip: &str) -> Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
    json!({
        "metadata": {"uid": uid},
        "status": {
            "phase": "Running", "hostIP": host_ip, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "startTime": now,
            "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
            "containerStatuses": [{"name": "echo", "image": "skiff/echo:1.0", "imageID": "", "ready": true,
                                   "started": true, "restartCount": 0, "containerID": format!("runc://{uid}"),
                                   "state": {"running": {"startedAt": now}}}]
        }
    })
}

fn pod_ip(l: &Layout, j: usize) -> String {
    let node = l.node_of(j);
    let nth = j / l.nodes;
    format!("10.{}.{}.{}", 128 + node / 256, node % 256, 2 + nth % 250)
}

fn node_ip(i: usize) -> String {
    format!("172.31.{}.{}", i / 250, 1 + i % 250)
}

// ---------------------------------------------------------------------------------------------
// The run.

struct SimNode {
    name: String,
    client: kube::Client,
    pods: Sink,
    services: Sink,
}

/// Runs `f` over `items` with at most `concurrency` in flight; returns the latencies in ms, the
/// number of errors (the first few kept as messages) and the wall time.
async fn drive<T, F, Fut>(items: Vec<T>, concurrency: usize, timeout: Duration, f: F) -> anyhow::Result<(Vec<f64>, u64, Vec<String>, Duration)>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = (Duration, anyhow::Result<()>)>,
{
    let t = Instant::now();
    let results: Vec<(Duration, anyhow::Result<()>)> =
        tokio::time::timeout(timeout, futures::stream::iter(items).map(f).buffer_unordered(concurrency.max(1)).collect())
            .await
            .with_context(|| format!("phase timed out ({timeout:?})"))?;
    let wall = t.elapsed();
    let mut lat = Vec::with_capacity(results.len());
    let mut errors = 0;
    let mut messages = Vec::new();
    for (d, r) in results {
        match r {
            Ok(()) => lat.push(ms(d)),
            Err(e) => {
                errors += 1;
                if messages.len() < 5 {
                    messages.push(format!("{e:#}"));
                }
            }
        }
    }
    Ok((lat, errors, messages, wall))
}

/// Records acknowledged writes from many tasks.
#[derive(Clone, Default)]
struct Acks(Arc<Mutex<Vec<WriteAck>>>);

impl Acks {
    fn push(&self, w: WriteAck) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(w);
    }
    fn all(&self) -> Vec<WriteAck> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn parse_thin(text: &str) -> anyhow::Result<Thin> {
    serde_json::from_str(text).context("response is not an object")
}

/// Runs the benchmark and writes its record to `opts.out_dir`: after every phase (marked
/// incomplete, with the phases so far), when a phase fails or the run is stopped by SIGINT or
/// SIGTERM (the failure in it), and at the end (complete). The server, the agent-memory process
/// and the simulated nodes' tasks are stopped on every path out.
pub async fn run(opts: &Options) -> anyhow::Result<Record> {
    if opts.nodes == 0 || opts.pods == 0 || opts.services == 0 || opts.namespaces == 0 {
        bail!("--nodes, --pods, --services and --namespaces must be positive");
    }
    let mut p = Progress::new(opts);
    let result = tokio::select! {
        r = measure(opts, &mut p) => r,
        s = stop_signal() => Err(anyhow::anyhow!("stopped by {s}")),
    };
    p.rec.elapsed_s = p.started.elapsed().as_secs_f64();
    p.rec.load_after = loadavg();
    match result {
        Ok(()) => {
            write_results(&p.rec, &opts.out_dir, &opts.stem)?;
            Ok(p.rec)
        }
        Err(e) => {
            if let Err(w) = p.checkpoint(Some(&e)) {
                eprintln!("[loadbench] writing the partial record: {w:#}");
            }
            Err(e)
        }
    }
}

/// The first SIGINT or SIGTERM, by name.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        // No handler: the default action (the process ends; the last checkpoint stays).
        _ => std::future::pending().await,
    }
}

/// The record as far as the run got.
struct Progress<'a> {
    opts: &'a Options,
    rec: Record,
    started: Instant,
    phase_t: Instant,
}

impl<'a> Progress<'a> {
    fn new(opts: &'a Options) -> Progress<'a> {
        let rec = Record {
            command: opts.command.clone(),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            machine: machine(),
            load_after: String::new(),
            skiff_binary: binary_description(&opts.skiff),
            store: opts.store,
            scale: Scale {
                nodes: opts.nodes,
                pods: opts.pods,
                services: opts.services,
                agent_services: opts.agent_services,
                namespaces: opts.namespaces,
                writers: opts.writers,
                cluster_watchers: opts.cluster_watchers,
                samples: opts.samples.max(1),
                updates: opts.updates.min(opts.pods),
                deletes: opts.deletes.min(opts.pods),
                page_limit: opts.page_limit,
                heartbeat_s: opts.heartbeat.as_secs_f64(),
            },
            ops: Vec::new(),
            watch: Vec::new(),
            memory: Vec::new(),
            agent: None,
            checks: Checks::default(),
            phases: Vec::new(),
            notes: opts.notes.clone(),
            elapsed_s: 0.0,
            incomplete: None,
        };
        Progress { opts, rec, started: Instant::now(), phase_t: Instant::now() }
    }

    /// Notes that phase `name` completed and writes the record so far.
    fn phase(&mut self, name: &str) -> anyhow::Result<()> {
        let seconds = self.phase_t.elapsed().as_secs_f64();
        eprintln!("[loadbench] {name}: {seconds:.1} s");
        self.rec.phases.push(Phase { name: name.to_string(), seconds });
        self.phase_t = Instant::now();
        self.checkpoint(None)
    }

    /// Writes the record so far, marked incomplete: the phase that failed and its error
    /// (`failure`), or the last phase completed.
    fn checkpoint(&self, failure: Option<&anyhow::Error>) -> anyhow::Result<()> {
        let mut rec = self.rec.clone();
        let last = rec.phases.last().map_or("none".to_string(), |ph| format!("\"{}\"", ph.name));
        let why = match failure {
            Some(e) => format!("the phase after {last} did not finish ({:.1} s): {e:#}", self.phase_t.elapsed().as_secs_f64()),
            None => format!("stopped after phase {last} (or still running)"),
        };
        rec.checks.ok = false;
        rec.checks.problems.push(format!("incomplete: {why}"));
        rec.incomplete = Some(why);
        rec.elapsed_s = self.started.elapsed().as_secs_f64();
        rec.load_after = loadavg();
        write_results(&rec, &self.opts.out_dir, &self.opts.stem).context("writing the record")
    }
}

/// Tasks aborted when dropped (a run that fails midway leaves none behind).
#[derive(Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The phases, each adding to `p.rec` and checkpointing it.
async fn measure(opts: &Options, p: &mut Progress<'_>) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("loadbench").tempdir().context("temp dir")?;
    let timeout = opts.phase_timeout;
    let layout = Layout { nodes: opts.nodes, pods: opts.pods, services: opts.services, namespaces: opts.namespaces };

    let mut server = ServerProc::start(opts, tmp.path()).await?;
    let server_pid = server.pid().context("server pid")?;
    eprintln!("[loadbench] skiff server pid {server_pid}, data dir {}", server.data_dir.display());
    let kubeconfig_text = std::fs::read_to_string(server.kubeconfig())?;
    let admin = client_from_kubeconfig(kube::config::Kubeconfig::from_yaml(&kubeconfig_text)?).await?;
    let ca_key = server.data_dir.join(skiff_apiserver::CA_KEY);
    // The controller-manager's node and namespace loops start with the server: give it a moment
    // so the idle figure is the idle server.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let note_memory = |process: &str, pid: u32, when: &str, memory: &mut Vec<Memory>| {
        if let Some((rss, hwm)) = proc_memory(pid) {
            memory.push(Memory { process: process.into(), when: when.into(), rss_mib: rss, hwm_mib: hwm });
        }
    };
    note_memory("skiff server", server_pid, "idle, after start", &mut p.rec.memory);
    p.phase("server start")?;

    // Namespaces.
    for n in 0..opts.namespaces {
        let body = serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace(n)}}))?;
        admin.request_text(Request::new("/api/v1/namespaces").create(&PostParams::default(), body)?).await.context("creating a namespace")?;
    }

    // Nodes: identity, Node, Lease, watches, heartbeats.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let counters = Arc::new(WatchCounters::default());
    let lease_lat: Arc<Mutex<Vec<f64>>> = Arc::default();
    let lease_errors = Arc::new(AtomicU64::new(0));
    let machine_info = skiff_agent::node::Machine::probe(110);
    let mut nodes = Vec::new();
    let mut tasks = Tasks::default();
    let mut register_lat = Vec::new();
    for i in 0..opts.nodes {
        let name = node_name(i);
        let kc = identity_kubeconfig(&server.kubeconfig(), &ca_key, &format!("system:node:{name}"), &["system:nodes"])?;
        let client = client_from_kubeconfig(kc).await?;
        let id = skiff_agent::node::NodeIdentity {
            name: name.clone(),
            ip: node_ip(i).parse()?,
            agent_port: 10250,
            runtime_version: "runc://loadbench".into(),
            labels: BTreeMap::new(),
        };
        let t = Instant::now();
        let node = skiff_agent::node::register(&client, &skiff_agent::node::node_object(&id, &machine_info, k8s_openapi::jiff::Timestamp::now()))
            .await
            .with_context(|| format!("registering {name}"))?;
        register_lat.push(ms(t.elapsed()));
        let pods: Sink = Arc::default();
        let services: Sink = Arc::default();
        tasks.0.push(tokio::spawn(watch_loop(
            client.clone(),
            "/api/v1/pods".into(),
            Some(format!("spec.nodeName={name}")),
            pods.clone(),
            counters.clone(),
            stop_rx.clone(),
        )));
        tasks.0.push(tokio::spawn(watch_loop(client.clone(), "/api/v1/services".into(), None, services.clone(), counters.clone(), stop_rx.clone())));
        // The agent's heartbeat (node::heartbeat_loop's two calls), timed.
        let (c, lat, errs, mut stop, every) = (client.clone(), lease_lat.clone(), lease_errors.clone(), stop_rx.clone(), opts.heartbeat);
        tasks.0.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            // Spread the nodes over the interval, as independently started agents are.
            tokio::time::sleep(every.mul_f64((i as f64 * 0.618) % 1.0)).await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let t = Instant::now();
                match skiff_agent::node::renew_lease(&c, &node, k8s_openapi::jiff::Timestamp::now()).await {
                    Ok(()) => lat.lock().unwrap_or_else(|e| e.into_inner()).push(ms(t.elapsed())),
                    Err(_) => {
                        errs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let name = node.metadata.name.clone().unwrap_or_default();
                let status = k8s_openapi::api::core::v1::NodeStatus {
                    conditions: Some(skiff_agent::node::ready_conditions(k8s_openapi::jiff::Timestamp::now(), true, "")),
                    ..Default::default()
                };
                if skiff_agent::node::post_status(&c, &name, status).await.is_err() {
                    errs.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        nodes.push(SimNode { name, client, pods, services });
    }
    p.rec.ops.push(op_stat("register Node (agent's node::register: create + status patch + get)", register_lat, 0, None));
    let cluster_pods: Vec<Sink> = (0..opts.cluster_watchers).map(|_| Sink::default()).collect();
    let cluster_services: Vec<Sink> = (0..opts.cluster_watchers).map(|_| Sink::default()).collect();
    for s in &cluster_pods {
        tasks.0.push(tokio::spawn(watch_loop(admin.clone(), "/api/v1/pods".into(), None, s.clone(), counters.clone(), stop_rx.clone())));
    }
    for s in &cluster_services {
        tasks.0.push(tokio::spawn(watch_loop(admin.clone(), "/api/v1/services".into(), None, s.clone(), counters.clone(), stop_rx.clone())));
    }
    // Let every watch be established before the first write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.phase("nodes registered, watches open")?;

    // Pods.
    let pod_acks = Acks::default();
    let uids: Arc<Mutex<HashMap<usize, String>>> = Arc::default();
    let (lat, errors, msgs, wall) = drive((0..opts.pods).collect(), opts.writers, timeout, |j| {
        let (admin, acks, uids) = (admin.clone(), pod_acks.clone(), uids.clone());
        let ns = layout.ns_of_pod(j);
        let node = layout.node_of(j);
        let body = serde_json::to_vec(&pod_object(&layout, j)).unwrap_or_default();
        async move {
            let req = match Request::new(format!("/api/v1/namespaces/{ns}/pods")).create(&PostParams::default(), body) {
                Ok(r) => r,
                Err(e) => return (Duration::ZERO, Err(e.into())),
            };
            let (d, r) = timed(&admin, req).await;
            let at = Instant::now();
            let r = r.map_err(anyhow::Error::from).and_then(|t| parse_thin(&t)).map(|o| {
                uids.lock().unwrap_or_else(|e| e.into_inner()).insert(j, o.metadata.uid.clone().unwrap_or_default());
                acks.push(WriteAck { ev: Ev::Added, key: o.key(), rv: o.rv(), sent: at - d, at, node: Some(node) });
            });
            (d, r)
        }
    })
    .await?;
    p.rec.checks.problems.extend(msgs.into_iter().map(|m| format!("create pod: {m}")));
    p.rec.ops.push(op_stat(&format!("create pod ({} in flight)", opts.writers), lat, errors, Some(wall)));
    note_memory("skiff server", server_pid, "after the pods were created", &mut p.rec.memory);
    p.phase("pods created")?;

    // Each node posts its pods' status, as its pod workers do (node identity, pods/status).
    let uids_now = uids.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let sem = Arc::new(tokio::sync::Semaphore::new(opts.writers.max(1)));
    let status_items: Vec<usize> = (0..opts.pods).filter(|j| uids_now.contains_key(j)).collect();
    let node_clients: Vec<kube::Client> = nodes.iter().map(|n| n.client.clone()).collect();
    let (lat, errors, msgs, wall) = drive(status_items, opts.writers, timeout, |j| {
        let client = node_clients[layout.node_of(j)].clone();
        let (acks, sem) = (pod_acks.clone(), sem.clone());
        let ns = layout.ns_of_pod(j);
        let node = layout.node_of(j);
        let body = running_status(&uids_now[&j], &pod_ip(&layout, j), &node_ip(node));
        async move {
            let _permit = sem.acquire().await;
            let req = match merge_patch_request(&format!("/api/v1/namespaces/{ns}/pods"), &Layout::pod_name(j), &body, true) {
                Ok(r) => r,
                Err(e) => return (Duration::ZERO, Err(e)),
            };
            let (d, r) = timed(&client, req).await;
            let at = Instant::now();
            let r = r.map_err(anyhow::Error::from).and_then(|t| parse_thin(&t)).map(|o| {
                acks.push(WriteAck { ev: Ev::Modified, key: o.key(), rv: o.rv(), sent: at - d, at, node: Some(node) });
            });
            (d, r)
        }
    })
    .await?;
    p.rec.checks.problems.extend(msgs.into_iter().map(|m| format!("pod status: {m}")));
    p.rec.ops.push(op_stat(&format!("patch pods/status as the pod's node (node identity, {} in flight)", opts.writers), lat, errors, Some(wall)));
    p.phase("pod status posted")?;

    // Services.
    let svc_acks = Acks::default();
    let create_services = |items: Vec<(String, String, &'static str, usize)>| {
        let (admin, acks) = (admin.clone(), svc_acks.clone());
        drive(items, opts.writers, timeout, move |(name, ns, label, k)| {
            let (admin, acks) = (admin.clone(), acks.clone());
            let body = serde_json::to_vec(&service_object(&name, &ns, label, k)).unwrap_or_default();
            async move {
                let req = match Request::new(format!("/api/v1/namespaces/{ns}/services")).create(&PostParams::default(), body) {
                    Ok(r) => r,
                    Err(e) => return (Duration::ZERO, Err(e.into())),
                };
                let (d, r) = timed(&admin, req).await;
                let at = Instant::now();
                let r = r.map_err(anyhow::Error::from).and_then(|t| parse_thin(&t)).map(|o| {
                    acks.push(WriteAck { ev: Ev::Added, key: o.key(), rv: o.rv(), sent: at - d, at, node: None });
                });
                (d, r)
            }
        })
    };
    let items: Vec<_> = (0..opts.services).map(|k| (format!("s-{k}"), layout.ns_of_service(k), "app", k)).collect();
    let (lat, errors, msgs, wall) = create_services(items).await?;
    p.rec.checks.problems.extend(msgs.into_iter().map(|m| format!("create service: {m}")));
    p.rec.ops.push(op_stat(&format!("create Service ({} in flight)", opts.writers), lat, errors, Some(wall)));
    p.phase("services created")?;

    // The EndpointSlice controller's work: every Service gets a slice with its ready pods.
    let t = Instant::now();
    let ready_slices = wait_for_slices(&admin, opts.services, timeout).await;
    let slices_s = t.elapsed().as_secs_f64();
    let services_with_ready_slice = ready_slices.unwrap_or_else(|e| {
        p.rec.checks.problems.push(format!("EndpointSlices: {e:#}"));
        0
    });
    p.rec.notes.push(format!(
        "EndpointSlices: {services_with_ready_slice} of {} Services had a slice with ready endpoints {slices_s:.1} s after the last Service was created (the controller-manager's EndpointSlice controller, running in skiff server)",
        opts.services
    ));
    note_memory("skiff server", server_pid, &format!("{} pods, {} Services, their EndpointSlices", opts.pods, opts.services), &mut p.rec.memory);
    p.phase("endpoint slices ready")?;

    // Reads, one at a time (the latency of one request on the loaded server).
    let samples = p.rec.scale.samples;
    let read = |label: String, reqs: Vec<http::Request<Vec<u8>>>| {
        let admin = admin.clone();
        async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            for req in reqs {
                let (d, r) = timed(&admin, req).await;
                match r {
                    Ok(_) => lat.push(ms(d)),
                    Err(_) => errors += 1,
                }
            }
            op_stat(&label, lat, errors, None)
        }
    };
    let per_ns = opts.pods.div_ceil(opts.namespaces);
    let list_ns: Vec<_> = (0..samples).map(|i| Request::new(format!("/api/v1/namespaces/{}/pods", namespace(i % opts.namespaces))).list(&ListParams::default())).collect::<Result<_, _>>()?;
    p.rec.ops.push(read(format!("list pods in a namespace (~{per_ns} pods)"), list_ns).await);
    let list_all: Vec<_> = (0..samples).map(|_| Request::new("/api/v1/pods").list(&ListParams::default())).collect::<Result<_, _>>()?;
    p.rec.ops.push(read(format!("list all pods ({} pods, one response)", opts.pods), list_all).await);
    // Paged: the whole list in pages of page_limit (limit/continue), timed per page and whole.
    let mut page_lat = Vec::new();
    let mut whole_lat = Vec::new();
    let mut paged_errors = 0;
    let mut pods_listed_paged = 0;
    for _ in 0..samples.min(10) {
        let t = Instant::now();
        let mut cont: Option<String> = None;
        let mut count = 0;
        loop {
            let mut lp = ListParams::default().limit(opts.page_limit as u32);
            if let Some(c) = &cont {
                lp = lp.continue_token(c);
            }
            let (d, r) = timed(&admin, Request::new("/api/v1/pods").list(&lp)?).await;
            let v: Value = match r.ok().and_then(|t| serde_json::from_str(&t).ok()) {
                Some(v) => v,
                None => {
                    paged_errors += 1;
                    break;
                }
            };
            page_lat.push(ms(d));
            count += v["items"].as_array().map_or(0, Vec::len);
            cont = v.pointer("/metadata/continue").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
            if cont.is_none() {
                break;
            }
        }
        whole_lat.push(ms(t.elapsed()));
        pods_listed_paged = count;
    }
    p.rec.ops.push(op_stat(&format!("list all pods, one page (limit={})", opts.page_limit), page_lat, paged_errors, None));
    p.rec.ops.push(op_stat(&format!("list all pods paged, all pages (limit={})", opts.page_limit), whole_lat, 0, None));
    let list_svc: Vec<_> = (0..samples).map(|_| Request::new("/api/v1/services").list(&ListParams::default())).collect::<Result<_, _>>()?;
    p.rec.ops.push(read(format!("list all Services ({})", opts.services + 1), list_svc).await);
    let list_slices: Vec<_> = (0..samples.min(10)).map(|_| Request::new("/apis/discovery.k8s.io/v1/endpointslices").list(&ListParams::default())).collect::<Result<_, _>>()?;
    p.rec.ops.push(read("list all EndpointSlices".into(), list_slices).await);
    let sel: Vec<_> = (0..samples).map(|i| Request::new(format!("/api/v1/namespaces/{}/pods", layout.ns_of_service(i % opts.services))).list(&ListParams::default().labels(&format!("app=s{}", i % opts.services)))).collect::<Result<_, _>>()?;
    p.rec.ops.push(read("list pods in a namespace by label selector (a Service's pods)".into(), sel).await);
    let gets: Vec<_> = (0..samples * 5).map(|i| {
        let j = (i * 7919) % opts.pods;
        Request::new(format!("/api/v1/namespaces/{}/pods", layout.ns_of_pod(j))).get(&Layout::pod_name(j), &Default::default())
    }).collect::<Result<_, _>>()?;
    p.rec.ops.push(read("get pod".into(), gets).await);
    let svc_gets: Vec<_> = (0..samples * 5).map(|i| {
        let k = (i * 7919) % opts.services;
        Request::new(format!("/api/v1/namespaces/{}/services", layout.ns_of_service(k))).get(&format!("s-{k}"), &Default::default())
    }).collect::<Result<_, _>>()?;
    p.rec.ops.push(read("get Service".into(), svc_gets).await);
    // A node reading its own pods (node identity: the node authorizer's path).
    let node_lists: Vec<_> = (0..samples).map(|_| Request::new("/api/v1/pods").list(&ListParams::default().fields(&format!("spec.nodeName={}", nodes[0].name)))).collect::<Result<_, _>>()?;
    {
        let c = nodes[0].client.clone();
        let mut lat = Vec::new();
        let mut errors = 0;
        for req in node_lists {
            let (d, r) = timed(&c, req).await;
            match r {
                Ok(_) => lat.push(ms(d)),
                Err(_) => errors += 1,
            }
        }
        p.rec.ops.push(op_stat(&format!("list own pods as a node (fieldSelector spec.nodeName, ~{} pods)", opts.pods / opts.nodes), lat, errors, None));
    }
    p.phase("reads")?;

    // Updates: pod metadata merge patches (admin, as a controller labels pods) and Service
    // replaces (GET + PUT with the resourceVersion, as kubectl replace / controllers do).
    let updates = p.rec.scale.updates;
    let (lat, errors, msgs, wall) = drive((0..updates).map(|i| (i * 7919) % opts.pods).collect(), opts.writers, timeout, |j| {
        let (admin, acks) = (admin.clone(), pod_acks.clone());
        let ns = layout.ns_of_pod(j);
        let node = layout.node_of(j);
        async move {
            let body = json!({"metadata": {"annotations": {"loadbench/touched": chrono::Utc::now().to_rfc3339()}}});
            let req = match merge_patch_request(&format!("/api/v1/namespaces/{ns}/pods"), &Layout::pod_name(j), &body, false) {
                Ok(r) => r,
                Err(e) => return (Duration::ZERO, Err(e)),
            };
            let (d, r) = timed(&admin, req).await;
            let at = Instant::now();
            let r = r.map_err(anyhow::Error::from).and_then(|t| parse_thin(&t)).map(|o| {
                acks.push(WriteAck { ev: Ev::Modified, key: o.key(), rv: o.rv(), sent: at - d, at, node: Some(node) });
            });
            (d, r)
        }
    })
    .await?;
    p.rec.checks.problems.extend(msgs.into_iter().map(|m| format!("patch pod: {m}")));
    p.rec.ops.push(op_stat(&format!("patch pod metadata (merge patch, {} in flight)", opts.writers), lat, errors, Some(wall)));
    let svc_updates = updates.min(opts.services);
    let (lat, errors, msgs, wall) = drive((0..svc_updates).map(|i| (i * 7919) % opts.services).collect(), opts.writers, timeout, |k| {
        let (admin, acks) = (admin.clone(), svc_acks.clone());
        let ns = layout.ns_of_service(k);
        async move {
            let path = format!("/api/v1/namespaces/{ns}/services");
            let name = format!("s-{k}");
            let t = Instant::now();
            let r: anyhow::Result<()> = async {
                let mut svc: Value = serde_json::from_str(&admin.request_text(Request::new(&path).get(&name, &Default::default())?).await?)?;
                svc["metadata"]["annotations"] = json!({"loadbench/replaced": "yes"});
                let req = Request::new(&path).replace(&name, &PostParams::default(), serde_json::to_vec(&svc)?)?;
                let sent = Instant::now();
                let text = admin.request_text(req).await?;
                let o = parse_thin(&text)?;
                acks.push(WriteAck { ev: Ev::Modified, key: o.key(), rv: o.rv(), sent, at: Instant::now(), node: None });
                Ok(())
            }
            .await;
            (t.elapsed(), r)
        }
    })
    .await?;
    p.rec.checks.problems.extend(msgs.into_iter().map(|m| format!("replace service: {m}")));
    p.rec.ops.push(op_stat(&format!("get + replace (PUT) Service ({} in flight)", opts.writers), lat, errors, Some(wall)));
    p.phase("updates")?;

    // Deletes.
    let deletes = p.rec.scale.deletes;
    let deleted: HashSet<usize> = (0..deletes).map(|i| (i * 104729 + 13) % opts.pods).collect();
    let (lat, errors, msgs, wall) = drive(deleted.iter().copied().collect(), opts.writers, timeout, |j| {
        let (admin, acks) = (admin.clone(), pod_acks.clone());
        let ns = layout.ns_of_pod(j);
        let node = layout.node_of(j);
        async move {
            let dp = DeleteParams::default().grace_period(0);
            let req = match Request::new(format!("/api/v1/namespaces/{ns}/pods")).delete(&Layout::pod_name(j), &dp) {
                Ok(r) => r,
                Err(e) => return (Duration::ZERO, Err(e.into())),
            };
            let (d, r) = timed(&admin, req).await;
            let at = Instant::now();
            let r = r.map_err(anyhow::Error::from).and_then(|t| parse_thin(&t)).map(|o| {
                acks.push(WriteAck { ev: Ev::Deleted, key: o.key(), rv: o.rv(), sent: at - d, at, node: Some(node) });
            });
            (d, r)
        }
    })
    .await?;
    p.rec.checks.problems.extend(msgs.into_iter().map(|m| format!("delete pod: {m}")));
    p.rec.ops.push(op_stat(&format!("delete pod (gracePeriodSeconds=0, {} in flight)", opts.writers), lat, errors, Some(wall)));
    p.phase("deletes")?;

    // Nothing lost: list everything back.
    let pods_listed = count_items(&admin, "/api/v1/pods").await.unwrap_or(0);
    let services_listed = count_items(&admin, "/api/v1/services").await.unwrap_or(0);
    let pods_expected = opts.pods - deleted.len();

    // The agent's memory with agent_services Services.
    if opts.agent_services > 0 {
        let extra = opts.agent_services.saturating_sub(opts.services);
        if extra > 0 {
            let items: Vec<_> = (0..extra).map(|k| {
                let primary = k % opts.services;
                (format!("x-{k}"), layout.ns_of_service(primary), "alt", primary)
            }).collect();
            let (lat, errors, msgs, wall) = create_services(items).await?;
            p.rec.checks.problems.extend(msgs.into_iter().map(|m| format!("create service (agent phase): {m}")));
            p.rec.ops.push(op_stat(&format!("create Service, {} -> {} Services (agent phase, {} in flight)", opts.services, opts.agent_services, opts.writers), lat, errors, Some(wall)));
            if let Err(e) = wait_for_slices(&admin, opts.agent_services, timeout).await {
                p.rec.checks.problems.push(format!("EndpointSlices (agent phase): {e:#}"));
            }
        }
        p.phase("agent phase: services created")?;
        match agent_memory(opts, tmp.path(), &server.kubeconfig(), &ca_key, &admin).await {
            Ok(a) => p.rec.agent = Some(a),
            Err(e) => p.rec.checks.problems.push(format!("agent memory: {e:#}")),
        }
        note_memory("skiff server", server_pid, &format!("end: {} Services, agent watching", opts.agent_services.max(opts.services)), &mut p.rec.memory);
        p.phase("agent memory")?;
    }
    if let Some(pid) = server.etcd.as_ref().and_then(|e| e.pid()) {
        note_memory("etcd", pid, "end", &mut p.rec.memory);
    }
    let leases = std::mem::take(&mut *lease_lat.lock().unwrap_or_else(|e| e.into_inner()));
    p.rec.ops.push(op_stat(&format!("renew Lease (agent's node::renew_lease, every {:?} per node, whole run)", opts.heartbeat), leases, lease_errors.load(Ordering::Relaxed), None));

    // Let the last events arrive, then stop the watches and check them.
    let pod_writes = pod_acks.all();
    let svc_writes = svc_acks.all();
    let quiet_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: usize = nodes.iter().map(|n| n.pods.lock().map(|v| v.len()).unwrap_or(0)).sum();
        let svc_got: usize = nodes.iter().map(|n| n.services.lock().map(|v| v.len()).unwrap_or(0)).sum();
        if (got >= pod_writes.len() && svc_got >= svc_writes.len() * nodes.len()) || Instant::now() > quiet_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    for t in std::mem::take(&mut tasks.0) {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    p.phase("watches drained")?;

    let mut problems = std::mem::take(&mut p.rec.checks.problems);
    let mut checks = Checks {
        pods_expected,
        pods_listed,
        pods_listed_paged,
        services_expected: svc_writes.iter().filter(|w| w.ev == Ev::Added).count() + 1,
        services_listed,
        services_with_ready_slice,
        watch_errors: counters.errors.load(Ordering::Relaxed),
        watch_restarts: counters.restarts.load(Ordering::Relaxed),
        lease_renew_errors: lease_errors.load(Ordering::Relaxed),
        ..Default::default()
    };
    let mut watch = Vec::new();
    // Node pod watchers: each sees exactly the writes to its own pods.
    let mut node_lat = Vec::new();
    let mut node_send = Vec::new();
    let mut node_before = 0;
    for (i, n) in nodes.iter().enumerate() {
        let mine: Vec<&WriteAck> = pod_writes.iter().filter(|w| w.node == Some(i)).collect();
        let arrivals = n.pods.lock().unwrap_or_else(|e| e.into_inner());
        let mut foreign = 0;
        let r = match_events(&mine, &arrivals, |a| {
            let j: Option<usize> = a.key.rsplit('/').next().and_then(|s| s.strip_prefix("pod-")).and_then(|s| s.parse().ok());
            if j.map(|j| layout.node_of(j)) != Some(i) {
                foreign += 1;
            }
        });
        checks.node_watch_expected += mine.len();
        checks.node_watch_lost += r.lost;
        checks.node_watch_duplicated += r.duplicated;
        checks.node_watch_foreign += foreign;
        node_before += r.before_ack;
        node_lat.extend(r.latencies);
        node_send.extend(r.from_send);
    }
    watch.push(watch_stat(&format!("pod write -> its node's watcher (fieldSelector spec.nodeName; {} node watchers open)", nodes.len()), 1, node_lat, node_send, node_before));
    let all_pod_writes: Vec<&WriteAck> = pod_writes.iter().collect();
    let mut cl_lat = Vec::new();
    let mut cl_send = Vec::new();
    let mut cl_before = 0;
    for s in &cluster_pods {
        let arrivals = s.lock().unwrap_or_else(|e| e.into_inner());
        let r = match_events(&all_pod_writes, &arrivals, |_| {});
        checks.cluster_watch_expected += all_pod_writes.len();
        checks.cluster_watch_lost += r.lost;
        checks.cluster_watch_duplicated += r.duplicated;
        cl_before += r.before_ack;
        cl_lat.extend(r.latencies);
        cl_send.extend(r.from_send);
    }
    watch.push(watch_stat("pod write -> each cluster-wide pod watcher", cluster_pods.len(), cl_lat, cl_send, cl_before));
    // Service watchers: every node's and the cluster-wide ones see every Service write.
    let all_svc_writes: Vec<&WriteAck> = svc_writes.iter().collect();
    let mut svc_lat = Vec::new();
    let mut svc_send = Vec::new();
    let mut svc_before = 0;
    let mut slowest: HashMap<(String, Ev), (f64, f64)> = HashMap::new();
    for s in nodes.iter().map(|n| &n.services).chain(cluster_services.iter()) {
        let arrivals = s.lock().unwrap_or_else(|e| e.into_inner());
        let r = match_events(&all_svc_writes, &arrivals, |_| {});
        checks.service_watch_expected += all_svc_writes.len();
        checks.service_watch_lost += r.lost;
        checks.service_watch_duplicated += r.duplicated;
        svc_before += r.before_ack;
        for (k, (l, from_send)) in r.per_write {
            let e = slowest.entry(k).or_insert((0.0, 0.0));
            *e = (e.0.max(l), e.1.max(from_send));
        }
        svc_lat.extend(r.latencies);
        svc_send.extend(r.from_send);
    }
    let fan = nodes.len() + cluster_services.len();
    watch.push(watch_stat(&format!("Service write -> each Service watcher (fan-out to {} nodes + {} cluster-wide)", nodes.len(), cluster_services.len()), fan, svc_lat, svc_send, svc_before));
    let (slow_ack, slow_send): (Vec<f64>, Vec<f64>) = slowest.into_values().unzip();
    watch.push(watch_stat(&format!("Service write -> the last of its {fan} watchers (per write)"), fan, slow_ack, slow_send, 0));

    if pods_listed != pods_expected {
        problems.push(format!("listed {pods_listed} pods, expected {pods_expected}"));
    }
    // The paged lists ran before the deletes.
    if pods_listed_paged != opts.pods {
        problems.push(format!("the paged list returned {pods_listed_paged} pods, expected {}", opts.pods));
    }
    let services_before_agent = opts.services + 1;
    if services_listed != services_before_agent {
        problems.push(format!("listed {services_listed} Services, expected {services_before_agent} (with `kubernetes`)"));
    }
    if services_with_ready_slice < opts.services {
        problems.push(format!("{services_with_ready_slice} of {} Services got ready EndpointSlices", opts.services));
    }
    for (what, lost, dup) in [
        ("node pod watchers", checks.node_watch_lost, checks.node_watch_duplicated),
        ("cluster-wide pod watchers", checks.cluster_watch_lost, checks.cluster_watch_duplicated),
        ("Service watchers", checks.service_watch_lost, checks.service_watch_duplicated),
    ] {
        if lost > 0 || dup > 0 {
            problems.push(format!("{what}: {lost} events lost, {dup} duplicated"));
        }
    }
    if checks.node_watch_foreign > 0 {
        problems.push(format!("node watchers got {} events of other nodes' pods", checks.node_watch_foreign));
    }
    for o in &p.rec.ops {
        if o.errors > 0 {
            problems.push(format!("{}: {} errors", o.op, o.errors));
        }
    }
    if let Some(a) = &p.rec.agent
        && (a.services_programmed as usize) < a.services_in_cluster
    {
        problems.push(format!("the agent programmed {} of {} Services", a.services_programmed, a.services_in_cluster));
    }
    problems.dedup();
    checks.ok = problems.is_empty();
    checks.problems = problems;
    p.rec.checks = checks;
    p.rec.watch = watch;
    server.stop();
    Ok(())
}

fn binary_description(p: &Path) -> String {
    let modified = std::fs::metadata(p)
        .and_then(|m| m.modified())
        .map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    format!("{} (modified {modified})", p.display())
}

fn watch_stat(what: &str, watchers: usize, mut lat: Vec<f64>, mut from_send: Vec<f64>, before_ack: usize) -> WatchStat {
    lat.sort_by(f64::total_cmp);
    from_send.sort_by(f64::total_cmp);
    WatchStat {
        what: what.to_string(),
        watchers,
        deliveries: lat.len(),
        before_ack,
        p50_ms: percentile(&lat, 50.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(0.0),
        from_send_p50_ms: percentile(&from_send, 50.0),
        from_send_p99_ms: percentile(&from_send, 99.0),
        from_send_max_ms: from_send.last().copied().unwrap_or(0.0),
    }
}

struct Matched {
    lost: usize,
    duplicated: usize,
    before_ack: usize,
    latencies: Vec<f64>,
    /// From the write's request being sent (an upper bound: the write's own latency included).
    from_send: Vec<f64>,
    per_write: Vec<((String, Ev), (f64, f64))>,
}

/// Matches one watcher's arrivals to the writes it should have seen: ADDED and DELETED by key
/// (one each per object), MODIFIED by key and resourceVersion. Arrivals matching no write (other
/// writers' events, e.g. the controller-manager's) are passed to `other`.
fn match_events(writes: &[&WriteAck], arrivals: &[Arrival], mut other: impl FnMut(&Arrival)) -> Matched {
    let id = |ev: Ev, key: &str, rv: u64| -> (Ev, String, u64) { (ev, key.to_string(), if ev == Ev::Modified { rv } else { 0 }) };
    let mut seen: HashMap<(Ev, String, u64), (usize, Instant)> = HashMap::new();
    for a in arrivals {
        let e = seen.entry(id(a.ev, &a.key, a.rv)).or_insert((0, a.at));
        e.0 += 1;
    }
    let wanted: HashSet<(Ev, String, u64)> = writes.iter().map(|w| id(w.ev, &w.key, w.rv)).collect();
    for a in arrivals {
        if !wanted.contains(&id(a.ev, &a.key, a.rv)) {
            other(a);
        }
    }
    let mut m = Matched { lost: 0, duplicated: 0, before_ack: 0, latencies: Vec::new(), from_send: Vec::new(), per_write: Vec::new() };
    for w in writes {
        match seen.get(&id(w.ev, &w.key, w.rv)) {
            None => m.lost += 1,
            Some((count, at)) => {
                m.duplicated += count - 1;
                let l = match at.checked_duration_since(w.at) {
                    Some(d) => ms(d),
                    None => {
                        m.before_ack += 1;
                        0.0
                    }
                };
                let from_send = at.checked_duration_since(w.sent).map_or(0.0, ms);
                m.latencies.push(l);
                m.from_send.push(from_send);
                m.per_write.push(((w.key.clone(), w.ev), (l, from_send)));
            }
        }
    }
    m
}

async fn count_items(client: &kube::Client, path: &str) -> anyhow::Result<usize> {
    let text = client.request_text(Request::new(path).list(&ListParams::default())?).await?;
    let v: Value = serde_json::from_str(&text)?;
    Ok(v["items"].as_array().map_or(0, Vec::len))
}

/// Waits until at least `want` Services have an EndpointSlice with a ready endpoint; returns how
/// many do at the end (an error when `timeout` passed first).
async fn wait_for_slices(client: &kube::Client, want: usize, timeout: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = client.request_text(Request::new("/apis/discovery.k8s.io/v1/endpointslices").list(&ListParams::default())?).await?;
        let v: Value = serde_json::from_str(&text)?;
        let ready: HashSet<String> = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| {
                s["endpoints"].as_array().is_some_and(|eps| eps.iter().any(|e| e.pointer("/conditions/ready").and_then(Value::as_bool) == Some(true)))
            })
            .filter_map(|s| {
                let ns = s.pointer("/metadata/namespace")?.as_str()?;
                let svc = s.pointer("/metadata/labels/kubernetes.io~1service-name")?.as_str()?;
                ns.starts_with("load-").then(|| format!("{ns}/{svc}"))
            })
            .collect();
        if ready.len() >= want {
            return Ok(ready.len());
        }
        if Instant::now() > deadline {
            bail!("{} of {want} Services have ready EndpointSlices after {timeout:?}", ready.len());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The agent-memory process.

/// The parent side: starts `loadbench agent-memory` as a node identity, waits until it has
/// programmed every Service, reads its memory, stops it by PID and removes its pins.
async fn agent_memory(opts: &Options, dir: &Path, admin_kc: &Path, ca_key: &Path, admin: &kube::Client) -> anyhow::Result<AgentMemory> {
    let services_in_cluster = count_items(admin, "/api/v1/services").await?;
    let slices = count_items(admin, "/apis/discovery.k8s.io/v1/endpointslices").await?;
    let node = "load-agent";
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/skiff-test/loadbench-{}", std::process::id()));
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let t = Instant::now();
    let child = Command::new(&opts.agent_exe)
        .args(["agent-memory", "--admin-kubeconfig"])
        .arg(admin_kc)
        .arg("--ca-key")
        .arg(ca_key)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["--node-name", node])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting loadbench agent-memory")?;
    let mut agent = AgentProc { child, pin_dir };
    let pid = agent.child.id();
    let stdout = agent.child.stdout.take().context("agent stdout")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    let result: anyhow::Result<AgentMemory> = async {
        let deadline = Instant::now() + opts.phase_timeout;
        let mut programmed_at = None;
        let mut last = json!({});
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let v = match tokio::time::timeout(remaining, rx.recv()).await {
                Ok(Some(v)) => v,
                Ok(None) => bail!("the agent-memory process ended: see {}", dir.join("agent.log").display()),
                Err(_) => bail!("the agent programmed {} of {services_in_cluster} Services in {:?}", last["services_programmed"], opts.phase_timeout),
            };
            if let Some(e) = v.get("error") {
                bail!("agent-memory: {e}");
            }
            let programmed = v["services_programmed"].as_u64().unwrap_or(0) as usize;
            last = v;
            if programmed >= services_in_cluster && programmed_at.is_none() {
                programmed_at = Some(t.elapsed());
            }
            // A few more reports after the last Service: the DNS zone and the caches settle.
            if let Some(at) = programmed_at
                && t.elapsed() > at + Duration::from_secs(3)
            {
                let (rss, hwm) = proc_memory(pid).context("reading the agent's /proc status")?;
                return Ok(AgentMemory {
                    services_in_cluster,
                    endpoint_slices_in_cluster: slices,
                    services_programmed: last["services_programmed"].as_u64().unwrap_or(0),
                    frontends_programmed: last["frontends_programmed"].as_u64().unwrap_or(0),
                    programmed_after_s: at.as_secs_f64(),
                    rss_mib: rss,
                    hwm_mib: hwm,
                    what: "skiff-proxy (skiff_proxy::run over a real eBPF datapath, maps pinned, nothing attached) + skiff-dns (skiff_dns::serve on a loopback port), one process, node identity; no pod workers".into(),
                });
            }
        }
    }
    .await;
    drop(agent);
    result
}

/// The agent-memory process we started: on drop (every path out of [`agent_memory`], a
/// cancelled run too) its stdin is closed, it is stopped by PID and its pins are removed.
struct AgentProc {
    child: Child,
    pin_dir: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        stop_child(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(parent) = self.pin_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// The child side (`loadbench agent-memory`): the agent's proxy and DNS as `node`, reporting the proxy's
/// statistics as a JSON line every 500 ms until stdin closes.
pub async fn agent_memory_child(admin_kubeconfig: &Path, ca_key: &Path, pin_dir: &Path, node: &str) -> anyhow::Result<()> {
    let report = |v: Value| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    };
    // The node's own identity, as the agent has after its TLS bootstrap.
    let kc = identity_kubeconfig(admin_kubeconfig, ca_key, &format!("system:node:{node}"), &["system:nodes"])?;
    let client = client_from_kubeconfig(kc).await?;
    let datapath = match skiff_datapath::Datapath::load(pin_dir) {
        Ok(d) => Arc::new(Mutex::new(d)),
        Err(e) => {
            report(json!({"error": format!("loading the datapath: {e}")}));
            bail!("loading the datapath: {e}");
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        // stdin closing (the parent gone or done) stops us.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let config = skiff_proxy::ProxyConfig::new(node, Vec::new());
    let stats = config.stats.clone();
    let proxy = tokio::spawn(skiff_proxy::run(client.clone(), datapath, config, stopped(stop_rx.clone())));
    let dns = tokio::spawn(skiff_dns::serve(client, vec!["127.0.0.1:0".parse()?], skiff_dns::DEFAULT_DOMAIN.into(), stopped(stop_rx.clone())));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut stop = stop_rx;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        if proxy.is_finished() || dns.is_finished() {
            report(json!({"error": "the proxy or the DNS server stopped"}));
            break;
        }
        let s = stats.snapshot();
        report(json!({"services_programmed": s.services_programmed, "frontends_programmed": s.frontends_programmed, "synced": s.synced}));
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), proxy).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), dns).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reports.

pub fn write_results(rec: &Record, out_dir: &Path, stem: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join(format!("{stem}.json")), serde_json::to_string_pretty(rec)? + "\n")?;
    std::fs::write(out_dir.join(format!("{stem}.md")), markdown(rec))?;
    Ok(())
}

fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

pub fn markdown(rec: &Record) -> String {
    let s = &rec.scale;
    let m = &rec.machine;
    let mut out = String::new();
    out.push_str("# The API under load: nodes, pods, Services, watches\n\n");
    if let Some(why) = &rec.incomplete {
        let done: Vec<String> = rec.phases.iter().map(|ph| format!("{} ({:.1} s)", ph.name, ph.seconds)).collect();
        out.push_str(&format!(
            "**Incomplete run: {why}.** Phases completed: {}. Only what those phases measured is below; the end-of-run checks were not made.\n\n",
            if done.is_empty() { "none".to_string() } else { done.join(", ") }
        ));
    }
    out.push_str(&format!("Command: `{}`\n\n", rec.command));
    out.push_str(&format!(
        "Machine: nproc {}, {}, {} MB, kernel {}; measured {} (load average before: {}; after: {}); run took {:.0} s. Server: `{}`, store {:?}.\n\n",
        m.nproc, m.cpu, m.memory_mb, m.kernel, rec.date, m.load_before, rec.load_after, rec.elapsed_s, rec.skiff_binary, rec.store
    ));
    out.push_str(&format!(
        "Setup: one real `skiff server` (apiserver, controller-manager and scheduler in one process) on loopback with a fresh data dir; {} simulated nodes, {} pods bound to them directly (`spec.nodeName` set at create: the scheduler has nothing to do), {} Services selecting {} pods each, in {} namespaces. \
Each simulated node authenticates with its own client certificate (`system:node:<name>`, signed by the cluster CA: the node authorizer applies, as to a real agent), registers its Node and renews its Lease every {} s with the agent's own code (`skiff_agent::node`), holds a watch on its pods (`fieldSelector=spec.nodeName=<node>`) and one on all Services, and posts its pods' status (podIP, Running, Ready) as a merge patch of `pods/status`. \
{} cluster-wide pod watchers and {} cluster-wide Service watchers (admin) stand for the controllers and other clients. Writes go {} at a time from the benchmark's own client (admin token, except the nodes' status patches). \
The controller-manager's EndpointSlice controller makes the Services' slices from the pods' ready addresses during the run. The benchmark's client runs on the same 2 cores as the server, so every figure includes some client time; the latencies are absolute, on a shared machine whose load average is given above.\n\n",
        s.nodes, s.pods, s.services, s.pods / s.services.max(1), s.namespaces, s.heartbeat_s, s.cluster_watchers, s.cluster_watchers, s.writers
    ));
    out.push_str("## Requests\n\nLatency from sending the request until the whole response body arrived (ms). Reads run one at a time on the loaded server (leases renewing, watches open); write phases keep the given number of requests in flight.\n\n");
    out.push_str("| operation | n | errors | p50 ms | p99 ms | max ms | per s |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for o in &rec.ops {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            o.op,
            o.n,
            o.errors,
            num(o.p50_ms),
            num(o.p99_ms),
            num(o.max_ms),
            o.per_s.map(|r| format!("{r:.0}")).unwrap_or_else(|| "-".into())
        ));
    }
    out.push_str("\n## Watch delivery\n\nFrom the write's acknowledgement (the writer has read the response) to the event's arrival at a watcher, on one clock; an event that arrived before the writer read its response counts as 0 (column \"before ack\"; the server sends the event and the response at about the same moment, so these are common at low load). The last column measures from the moment the write was sent instead: an upper bound that includes the write's own latency.\n\n");
    out.push_str("| delivery | watchers per event | deliveries | before ack | p50 ms | p99 ms | max ms | from send: p50 / p99 / max ms |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for w in &rec.watch {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} / {} |\n",
            w.what,
            w.watchers,
            w.deliveries,
            w.before_ack,
            num(w.p50_ms),
            num(w.p99_ms),
            num(w.max_ms),
            num(w.from_send_p50_ms),
            num(w.from_send_p99_ms),
            num(w.from_send_max_ms)
        ));
    }
    out.push_str("\n## Memory\n\nVmRSS / VmHWM (peak) from /proc/<pid>/status.\n\n| process | when | RSS MiB | peak MiB |\n|---|---|---:|---:|\n");
    for mm in &rec.memory {
        out.push_str(&format!("| {} | {} | {:.0} | {:.0} |\n", mm.process, mm.when, mm.rss_mib, mm.hwm_mib));
    }
    if let Some(a) = &rec.agent {
        out.push_str(&format!(
            "| agent: {} | {} Services ({} programmed, {} frontends), {} EndpointSlices; every Service programmed {:.1} s after start | {:.0} | {:.0} |\n",
            a.what, a.services_in_cluster, a.services_programmed, a.frontends_programmed, a.endpoint_slices_in_cluster, a.programmed_after_s, a.rss_mib, a.hwm_mib
        ));
    }
    let c = &rec.checks;
    out.push_str("\n## Checks\n\n");
    // The end-of-run checks (an incomplete record has only its problems).
    if rec.incomplete.is_none() {
        out.push_str(&format!(
            "- Listed back: {} of {} pods (after the deletes), {} pods through the paged list (before them), {} of {} Services (with `kubernetes`, before the agent phase), {} Services with a ready EndpointSlice.\n",
            c.pods_listed, c.pods_expected, c.pods_listed_paged, c.services_listed, s.services + 1, c.services_with_ready_slice
        ));
        out.push_str(&format!(
            "- Node pod watchers: {} expected events, {} lost, {} duplicated, {} of other nodes' pods. Cluster-wide pod watchers: {} expected, {} lost, {} duplicated. Service watchers: {} expected, {} lost, {} duplicated.\n",
            c.node_watch_expected, c.node_watch_lost, c.node_watch_duplicated, c.node_watch_foreign, c.cluster_watch_expected, c.cluster_watch_lost, c.cluster_watch_duplicated, c.service_watch_expected, c.service_watch_lost, c.service_watch_duplicated
        ));
        out.push_str(&format!(
            "- Watch errors (410 / stream failures, each followed by a re-watch): {}; watch streams ended by the server's timeout and resumed from the last resourceVersion: {}; Lease/Node status heartbeat errors: {}.\n",
            c.watch_errors, c.watch_restarts, c.lease_renew_errors
        ));
    }
    if c.ok {
        out.push_str("- Result: every check passed.\n");
    } else {
        out.push_str("- Result: **problems**:\n");
        for p in &c.problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    out.push_str("\n## Phases\n\n| phase | seconds |\n|---|---:|\n");
    for p in &rec.phases {
        out.push_str(&format!("| {} | {:.1} |\n", p.name, p.seconds));
    }
    if !rec.notes.is_empty() {
        out.push_str("\n## Notes\n\n");
        for n in &rec.notes {
            out.push_str(&format!("- {n}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn layout_puts_each_services_pods_in_its_namespace() {
        let l = Layout { nodes: 5, pods: 200, services: 50, namespaces: 3 };
        for j in 0..200 {
            let k = l.service_of(j);
            assert!(k < 50);
            assert_eq!(l.ns_of_pod(j), l.ns_of_service(k));
            assert!(l.node_of(j) < 5);
        }
        assert_eq!(l.service_of(199), 49);
    }

    #[test]
    fn events_are_matched_lost_and_duplicated() {
        let t0 = Instant::now();
        let w = |ev, key: &str, rv| WriteAck { ev, key: key.into(), rv, sent: t0, at: t0, node: Some(0) };
        let a = |ev, key: &str, rv, ms: u64| Arrival { ev, key: key.into(), rv, at: t0 + Duration::from_millis(ms) };
        let writes = [w(Ev::Added, "n/a", 1), w(Ev::Modified, "n/a", 2), w(Ev::Modified, "n/a", 3), w(Ev::Deleted, "n/a", 4)];
        let refs: Vec<&WriteAck> = writes.iter().collect();
        let arrivals = [a(Ev::Added, "n/a", 1, 5), a(Ev::Modified, "n/a", 2, 7), a(Ev::Modified, "n/a", 2, 9), a(Ev::Deleted, "n/a", 5, 1), a(Ev::Modified, "n/b", 9, 1)];
        let mut others = 0;
        let m = match_events(&refs, &arrivals, |_| others += 1);
        assert_eq!(m.lost, 1, "rv 3 never arrived");
        assert_eq!(m.duplicated, 1, "rv 2 arrived twice");
        assert_eq!(others, 1, "n/b is no write of ours");
        assert_eq!(m.latencies.len(), 3);
        assert_eq!(m.latencies[0], 5.0);
    }
}
