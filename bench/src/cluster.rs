//! End-to-end timings on a running `skiff up` cluster (issue 6): how long from `kubectl scale`
//! (3 -> 4) until the new endpoint answers through the ClusterIP, and from `kubectl apply` of a
//! 100-replica Deployment until every one of its endpoints answers through the Service.
//!
//! Each trial watches the API (kube-rs watchers on the pods and the Service's EndpointSlices) while
//! client threads inside a client pod's network namespace open a new TCP connection to the
//! ClusterIP every few milliseconds and note which pod answered (skiff-echo answers
//! `<hostname> <pod-ip>`, the hostname being the pod's name). So one trial yields, on one clock:
//!
//! - `pods_ready`: the API says the new pods are Ready (the kubelet-side baseline),
//! - `endpoints_ready`: their EndpointSlice endpoints are ready (the control plane's share),
//! - `answering`: they answered through the Service (the datapath's share on top),
//!
//! and the lag between the last two is what the agent's proxy and the eBPF maps add. Absolute
//! times drift on a shared machine; the lags and ratios within one trial are the result.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::watcher;
use serde::{Deserialize, Serialize};

use crate::svc::run::{Machine, machine};

/// The namespace every object of the benchmark lives in (deleted at the end on a cluster the
/// benchmark did not bring up itself).
pub const NAMESPACE: &str = "svcbench";
/// The e2e tests' lock: `skiff up` labs on one machine share the root namespace's blackhole and
/// pod routes, so they take turns (userspace/skiff/tests/common/cluster.rs takes the same lock).
pub const E2E_LOCK: &str = "/run/lock/skiff-e2e-cluster.lock";
/// Our own lab name, network and pod range, distinct from every e2e test's.
pub const LAB_NAME: &str = "skbench";
pub const LAB_NET: u8 = 79;
pub const CLUSTER_CIDR: &str = "10.246.0.0/16";

#[derive(Clone, Debug)]
pub struct Options {
    /// The `skiff` binary (skiff-cni and skiff-shim are taken from beside it by `skiff up`).
    pub skiff: PathBuf,
    pub kubectl: PathBuf,
    /// The skiff-echo image archive (scripts/build-image.sh).
    pub image: PathBuf,
    /// The data dir of a running `skiff up` cluster to use instead of bringing one up.
    pub existing: Option<PathBuf>,
    pub nodes: u32,
    pub scale_trials: usize,
    /// Replicas before the scale-up (one more after it).
    pub scale_from: u32,
    pub apply_trials: usize,
    pub apply_replicas: u32,
    /// Upper bound for any one trial (and any wait between trials).
    pub trial_timeout: Duration,
    pub poll_threads: usize,
    /// Pause between two requests of one client thread.
    pub poll_interval: Duration,
    pub command: String,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trial {
    /// Seconds from just before kubectl started until: it returned,
    pub kubectl_returned_s: f64,
    /// the API showed the target number of new pods Ready,
    pub pods_ready_s: Option<f64>,
    /// their EndpointSlice endpoints ready,
    pub endpoints_ready_s: Option<f64>,
    /// and every one of them had answered through the ClusterIP.
    pub answering_s: Option<f64>,
    /// Requests the client threads sent through the ClusterIP during the trial (answered, and
    /// refused or timed out: before the Service has a ready endpoint nothing answers).
    pub answered: u64,
    pub unanswered: u64,
    pub error: Option<String>,
}

impl Trial {
    /// What the agent and its maps add: answering through the Service minus ready in the slice.
    pub fn datapath_lag_s(&self) -> Option<f64> {
        Some(self.answering_s? - self.endpoints_ready_s?)
    }
    /// The sampling error of `answering_s`: with `need` endpoints picked at random per connection
    /// and the answers coming at the trial's rate, an endpoint's first answer comes on average
    /// this long after it could have.
    pub fn sampling_delay_s(&self, need: u32) -> Option<f64> {
        let answering = self.answering_s?;
        (self.answered > 0 && answering > 0.0).then(|| f64::from(need) / (self.answered as f64 / answering))
    }
    /// Answering through the Service against Ready in the API, as a ratio (1.0: no cost).
    pub fn answering_over_ready(&self) -> Option<f64> {
        let ready = self.pods_ready_s?;
        let answering = self.answering_s?;
        (ready > 0.0).then(|| answering / ready)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stat {
    pub metric: String,
    pub n: usize,
    pub median: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scenario {
    /// `scale` or `apply`.
    pub name: String,
    pub description: String,
    pub replicas_before: u32,
    pub replicas_after: u32,
    pub trials: Vec<Trial>,
    pub stats: Vec<Stat>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub command: String,
    pub date: String,
    pub machine: Machine,
    /// The skiff binary measured (its path says debug or release) and its modification time.
    pub skiff_binary: String,
    pub cluster: String,
    /// Seconds `skiff up` took (None: a running cluster was used).
    pub up_s: Option<f64>,
    pub poll: String,
    pub scenarios: Vec<Scenario>,
    pub notes: Vec<String>,
    pub elapsed_s: f64,
}

/// The lock file held while our cluster exists (released when the process ends).
struct Turn(#[allow(dead_code)] std::fs::File);

fn take_turn() -> anyhow::Result<Turn> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(E2E_LOCK)
        .with_context(|| format!("opening {E2E_LOCK}"))?;
    eprintln!("[cluster] waiting for {E2E_LOCK} (other engineers' e2e clusters take turns)");
    // SAFETY: flock on a file descriptor we own; it blocks until the other holder is done.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("flock {E2E_LOCK}: {}", std::io::Error::last_os_error());
    }
    Ok(Turn(f))
}

/// A cluster we brought up with `skiff up` (taken down on drop), or one we were given.
struct Cluster {
    skiff: PathBuf,
    data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    _turn: Option<Turn>,
    ours: bool,
}

impl Cluster {
    fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join("server/admin.kubeconfig")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.ours {
            eprintln!("[cluster] skiff down");
            match Command::new(&self.skiff).args(["down", "--data-dir"]).arg(&self.data_dir).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "[cluster] skiff down failed: {}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("[cluster] skiff down: {e}"),
            }
        }
    }
}

fn bring_up(opts: &Options) -> anyhow::Result<(Cluster, f64)> {
    let turn = take_turn()?;
    let tmp = tempfile::Builder::new().prefix("svcbench-cluster").tempdir().context("temp dir")?;
    let data_dir = tmp.path().to_path_buf();
    let cluster = Cluster { skiff: opts.skiff.clone(), data_dir, _tmp: Some(tmp), _turn: Some(turn), ours: true };
    eprintln!("[cluster] skiff up --nodes {} ({})", opts.nodes, opts.skiff.display());
    let t = Instant::now();
    let out = Command::new(&opts.skiff)
        .args(["up", "--nodes", &opts.nodes.to_string(), "--name", LAB_NAME, "--lab-net", &LAB_NET.to_string()])
        .args(["--restart-backoff", "1"])
        .arg(format!("--server-arg=--cluster-cidr={CLUSTER_CIDR}"))
        .arg("--data-dir")
        .arg(&cluster.data_dir)
        .arg("--image")
        .arg(&opts.image)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} up", opts.skiff.display()))?;
    if !out.status.success() {
        bail!(
            "skiff up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((cluster, t.elapsed().as_secs_f64()))
}

fn kubectl(opts: &Options, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(&opts.kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", opts.kubectl.display()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).context("writing to kubectl")?;
    }
    let out = child.wait_with_output().context("waiting for kubectl")?;
    if !out.status.success() {
        bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Deployment of skiff-echo pods labelled app=`app` (TCP :9000 identity, HTTP readiness).
fn deployment(app: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {app}, namespace: {NAMESPACE}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {app}}}}}
  template:
    metadata: {{labels: {{app: {app}}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: echo
        image: skiff/echo:1.0
        ports: [{{name: http, containerPort: 8080}}, {{name: tcp, containerPort: 9000}}]
        readinessProbe:
          httpGet: {{path: /healthz, port: http}}
          periodSeconds: 1
"#
    )
}

fn service(app: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {app}, namespace: {NAMESPACE}}}
spec:
  selector: {{app: {app}}}
  ports:
  - {{name: tcp, port: 9000, targetPort: tcp}}
"#
    )
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Running")
                && s.conditions.as_ref().is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
}

/// The pods named in a slice's ready endpoints.
fn ready_endpoint_pods(s: &EndpointSlice) -> BTreeSet<String> {
    s.endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .filter_map(|e| e.target_ref.as_ref().and_then(|r| r.name.clone()))
        .collect()
}

/// When (first) the API showed `need` new pods Ready and `need` new ready endpoints.
#[derive(Default)]
struct ApiProgress {
    pods_ready: Option<Instant>,
    endpoints_ready: Option<Instant>,
}

/// Watches pods app=`app` and the Service `app`'s EndpointSlices until both reach `need` names
/// outside `old` (or the task is aborted). `synced` fires once both watches have listed.
async fn watch_api(
    client: kube::Client,
    app: String,
    old: BTreeSet<String>,
    need: usize,
    progress: Arc<Mutex<ApiProgress>>,
    synced: tokio::sync::oneshot::Sender<()>,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
    let mut pod_events = watcher(pods, watcher::Config::default().labels(&format!("app={app}"))).boxed();
    let mut slice_events =
        watcher(slices, watcher::Config::default().labels(&format!("kubernetes.io/service-name={app}"))).boxed();
    let mut ready: BTreeMap<String, bool> = BTreeMap::new();
    let mut slice_pods: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut pods_listed, mut slices_listed) = (false, false);
    let mut synced = Some(synced);
    loop {
        tokio::select! {
            Some(ev) = pod_events.next() => match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                    if let Some(name) = p.metadata.name.clone() { ready.insert(name, pod_ready(&p)); }
                }
                Ok(watcher::Event::Delete(p)) => { if let Some(n) = &p.metadata.name { ready.remove(n); } }
                Ok(watcher::Event::Init) => ready.clear(),
                Ok(watcher::Event::InitDone) => pods_listed = true,
                Err(e) => tracing::debug!("pod watch: {e}"),
            },
            Some(ev) = slice_events.next() => match ev {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                    if let Some(name) = s.metadata.name.clone() { slice_pods.insert(name, ready_endpoint_pods(&s)); }
                }
                Ok(watcher::Event::Delete(s)) => { if let Some(n) = &s.metadata.name { slice_pods.remove(n); } }
                Ok(watcher::Event::Init) => slice_pods.clear(),
                Ok(watcher::Event::InitDone) => slices_listed = true,
                Err(e) => tracing::debug!("endpointslice watch: {e}"),
            },
            else => return,
        }
        let now = Instant::now();
        if pods_listed && slices_listed {
            if let Some(tx) = synced.take() {
                let _ = tx.send(());
            }
        }
        let new_ready = ready.iter().filter(|(n, r)| **r && !old.contains(*n)).count();
        let new_endpoints = slice_pods.values().flatten().filter(|n| !old.contains(*n)).collect::<BTreeSet<_>>().len();
        let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
        if p.pods_ready.is_none() && new_ready >= need {
            p.pods_ready = Some(now);
        }
        if p.endpoints_ready.is_none() && new_endpoints >= need {
            p.endpoints_ready = Some(now);
        }
        if p.pods_ready.is_some() && p.endpoints_ready.is_some() {
            return;
        }
    }
}

/// One request through the Service: which pod answered.
fn ask(vip: SocketAddr) -> std::io::Result<String> {
    // Short: while the Service has no ready endpoint a SYN gets no answer, and the time spent
    // waiting here is time the endpoint's first answer could be missed.
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_millis(100))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    line.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| std::io::Error::other("empty answer"))
}

/// Client threads in the network namespace `netns`, asking `vip` until `need` pods outside
/// `old` have answered (then `answering` is set) or `stop` is raised.
struct Poller {
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    answering: Arc<Mutex<Option<Instant>>>,
    answered: Arc<AtomicU64>,
    unanswered: Arc<AtomicU64>,
}

impl Poller {
    fn start(netns: &Path, vip: SocketAddr, old: BTreeSet<String>, need: usize, threads: usize, pause: Duration) -> anyhow::Result<Poller> {
        let stop = Arc::new(AtomicBool::new(false));
        let answering = Arc::new(Mutex::new(None));
        let answered = Arc::new(AtomicU64::new(0));
        let unanswered = Arc::new(AtomicU64::new(0));
        let seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let old = Arc::new(old);
        let mut handles = Vec::new();
        for _ in 0..threads.max(1) {
            let ns = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
            let (stop, answering, answered, unanswered, seen, old) =
                (stop.clone(), answering.clone(), answered.clone(), unanswered.clone(), seen.clone(), old.clone());
            handles.push(std::thread::spawn(move || {
                // SAFETY: a valid netns fd; CLONE_NEWNET moves only this thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    tracing::error!("setns: {}", std::io::Error::last_os_error());
                    stop.store(true, Ordering::SeqCst);
                    return;
                }
                while !stop.load(Ordering::SeqCst) {
                    match ask(vip) {
                        Ok(who) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            let now = Instant::now();
                            let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                            if !old.contains(&who) && s.insert(who) && s.len() >= need {
                                answering.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(now);
                                stop.store(true, Ordering::SeqCst);
                            }
                        }
                        Err(_) => {
                            unanswered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(pause);
                }
            }));
        }
        Ok(Poller { threads: handles, stop, answering, answered, unanswered })
    }

    fn done(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn finish(self) -> (Option<Instant>, u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let at = *self.answering.lock().unwrap_or_else(|e| e.into_inner());
        (at, self.answered.load(Ordering::Relaxed), self.unanswered.load(Ordering::Relaxed))
    }
}

struct Bench<'a> {
    opts: &'a Options,
    kubeconfig: PathBuf,
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    client_netns: PathBuf,
}

impl Bench<'_> {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        kubectl(self.opts, &self.kubeconfig, args, stdin)
    }

    /// Waits (bounded) until `f` holds, checking every 200 ms.
    fn wait_for(&self, what: &str, mut f: impl FnMut(&Self) -> anyhow::Result<bool>) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.opts.trial_timeout;
        loop {
            if f(self)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out after {:?} waiting for {what}", self.opts.trial_timeout);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pods(&self, app: &str) -> anyhow::Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let lp = kube::api::ListParams::default().labels(&format!("app={app}"));
        Ok(self.rt.block_on(api.list(&lp)).context("listing pods")?.items)
    }

    /// The names of app's Ready pods, once exactly `n` pods exist and all are Ready.
    fn settled(&self, app: &str, n: usize) -> anyhow::Result<Option<BTreeSet<String>>> {
        let pods = self.pods(app)?;
        let ready: BTreeSet<String> = pods.iter().filter(|p| pod_ready(p)).filter_map(|p| p.metadata.name.clone()).collect();
        Ok((pods.len() == n && ready.len() == n).then_some(ready))
    }

    fn cluster_ip(&self, app: &str) -> anyhow::Result<SocketAddr> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), NAMESPACE);
        let svc = self.rt.block_on(api.get(app)).with_context(|| format!("getting Service {app}"))?;
        let ip: Ipv4Addr = svc
            .spec
            .and_then(|s| s.cluster_ip)
            .context("the Service has no clusterIP")?
            .parse()
            .context("parsing the clusterIP")?;
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, 9000)))
    }

    /// One trial: start the API watch and the client threads, run kubectl, wait (bounded) until
    /// `need` pods outside `old` answer through `vip`.
    fn trial(&self, app: &str, vip: SocketAddr, old: BTreeSet<String>, need: usize, kubectl_args: &[&str], stdin: Option<&str>) -> Trial {
        let progress = Arc::new(Mutex::new(ApiProgress::default()));
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let watch = self.rt.spawn(watch_api(self.client.clone(), app.to_string(), old.clone(), need, progress.clone(), synced_tx));
        let synced = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), synced_rx).await });
        let mut trial = Trial {
            kubectl_returned_s: 0.0,
            pods_ready_s: None,
            endpoints_ready_s: None,
            answering_s: None,
            answered: 0,
            unanswered: 0,
            error: None,
        };
        if !matches!(synced, Ok(Ok(()))) {
            watch.abort();
            trial.error = Some("the API watches did not list within 30 s".into());
            return trial;
        }
        let poller = match Poller::start(&self.client_netns, vip, old, need, self.opts.poll_threads, self.opts.poll_interval) {
            Ok(p) => p,
            Err(e) => {
                watch.abort();
                trial.error = Some(format!("{e:#}"));
                return trial;
            }
        };
        let t0 = Instant::now();
        let kubectl = self.kubectl(kubectl_args, stdin);
        trial.kubectl_returned_s = t0.elapsed().as_secs_f64();
        if let Err(e) = kubectl {
            trial.error = Some(format!("{e:#}"));
        }
        let deadline = t0 + self.opts.trial_timeout;
        while trial.error.is_none() && Instant::now() < deadline {
            let api_done = watch.is_finished();
            if poller.done() && api_done {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        watch.abort();
        let (answering, answered, unanswered) = poller.finish();
        let p = progress.lock().unwrap_or_else(|e| e.into_inner());
        let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(t0).as_secs_f64());
        trial.pods_ready_s = since(p.pods_ready);
        trial.endpoints_ready_s = since(p.endpoints_ready);
        trial.answering_s = since(answering);
        trial.answered = answered;
        trial.unanswered = unanswered;
        if trial.error.is_none() && (trial.answering_s.is_none() || trial.pods_ready_s.is_none() || trial.endpoints_ready_s.is_none()) {
            trial.error = Some(format!(
                "not complete within {:?} (pods ready: {:?}, endpoints ready: {:?}, answering: {:?})",
                self.opts.trial_timeout, trial.pods_ready_s, trial.endpoints_ready_s, trial.answering_s
            ));
        }
        trial
    }

    /// `kubectl scale` from `scale_from` to one more, and back, `scale_trials` times.
    fn scale(&self) -> anyhow::Result<Scenario> {
        let app = "scale";
        let from = self.opts.scale_from;
        self.kubectl(&["apply", "-f", "-"], Some(&format!("{}---\n{}", deployment(app, from), service(app))))?;
        let vip = self.cluster_ip(app)?;
        let mut trials = Vec::new();
        for i in 0..self.opts.scale_trials {
            let mut old = BTreeSet::new();
            self.wait_for(&format!("{from} {app} pods Ready"), |b| {
                Ok(match b.settled(app, from as usize)? {
                    Some(names) => {
                        old = names;
                        true
                    }
                    None => false,
                })
            })?;
            // The old endpoints all answer before the clock starts (none of them counts).
            let warm = Poller::start(&self.client_netns, vip, BTreeSet::new(), old.len(), 1, Duration::from_millis(2))?;
            let t = Instant::now();
            while !warm.done() && t.elapsed() < self.opts.trial_timeout {
                std::thread::sleep(Duration::from_millis(20));
            }
            if warm.finish().0.is_none() {
                bail!("the {from} old endpoints did not all answer through {vip}");
            }
            let to = (from + 1).to_string();
            let trial = self.trial(app, vip, old, 1, &["scale", "-n", NAMESPACE, &format!("deployment/{app}"), &format!("--replicas={to}")], None);
            eprintln!("[cluster] scale trial {}: {trial:?}", i + 1);
            trials.push(trial);
            self.kubectl(&["scale", "-n", NAMESPACE, &format!("deployment/{app}"), &format!("--replicas={from}")], None)?;
        }
        self.wait_for(&format!("{from} {app} pods"), |b| Ok(b.settled(app, from as usize)?.is_some()))?;
        self.kubectl(&["delete", "-n", NAMESPACE, "deployment", app, "--wait=false"], None)?;
        self.kubectl(&["delete", "-n", NAMESPACE, "service", app], None)?;
        Ok(Scenario {
            name: "scale".into(),
            description: format!(
                "`kubectl scale deployment --replicas={}` of a Deployment at {from} behind a ClusterIP Service, until the new pod answers through the Service",
                from + 1
            ),
            replicas_before: from,
            replicas_after: from + 1,
            stats: stats(&trials),
            trials,
        })
    }

    /// The Service first (empty), then `kubectl apply` of an `apply_replicas` Deployment behind it.
    fn apply(&self) -> anyhow::Result<Scenario> {
        let n = self.opts.apply_replicas;
        let mut trials = Vec::new();
        for i in 0..self.opts.apply_trials {
            let app = format!("wide{i}");
            self.kubectl(&["apply", "-f", "-"], Some(&service(&app)))?;
            let vip = self.cluster_ip(&app)?;
            let manifest = deployment(&app, n);
            let trial = self.trial(&app, vip, BTreeSet::new(), n as usize, &["apply", "-f", "-"], Some(&manifest));
            eprintln!("[cluster] apply trial {}: {trial:?}", i + 1);
            trials.push(trial);
            self.kubectl(&["delete", "-n", NAMESPACE, "deployment", &app, "--wait=false"], None)?;
            self.kubectl(&["delete", "-n", NAMESPACE, "service", &app], None)?;
            // The next trial starts on an idle cluster: every pod of this one gone.
            self.wait_for(&format!("{app}'s pods gone"), |b| Ok(b.pods(&app)?.is_empty()))?;
        }
        Ok(Scenario {
            name: "apply".into(),
            description: format!(
                "`kubectl apply` of a {n}-replica Deployment behind an existing (empty) ClusterIP Service, until all {n} pods have answered through the Service"
            ),
            replicas_before: 0,
            replicas_after: n,
            stats: stats(&trials),
            trials,
        })
    }
}

/// Median and p90 (nearest rank) of each timing over the trials that completed.
pub fn stats(trials: &[Trial]) -> Vec<Stat> {
    let metrics: [(&str, fn(&Trial) -> Option<f64>); 6] = [
        ("kubectl returned (s)", |t| Some(t.kubectl_returned_s)),
        ("pods Ready in the API (s)", |t| t.pods_ready_s),
        ("EndpointSlice ready (s)", |t| t.endpoints_ready_s),
        ("answering through the Service (s)", |t| t.answering_s),
        ("datapath lag: answering - EndpointSlice ready (s)", Trial::datapath_lag_s),
        ("answering / pods Ready (ratio)", Trial::answering_over_ready),
    ];
    metrics
        .iter()
        .filter_map(|(name, f)| {
            let mut v: Vec<f64> = trials.iter().filter(|t| t.error.is_none()).filter_map(f).collect();
            if v.is_empty() {
                return None;
            }
            v.sort_by(f64::total_cmp);
            Some(Stat {
                metric: name.to_string(),
                n: v.len(),
                median: percentile(&v, 0.5),
                p90: percentile(&v, 0.9),
                min: v[0],
                max: v[v.len() - 1],
            })
        })
        .collect()
}

/// Nearest-rank percentile of sorted, non-empty `v`.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn describe_binary(p: &Path) -> String {
    let mtime = std::fs::metadata(p)
        .and_then(|m| m.modified())
        .map(|t| chrono::DateTime::<chrono::Utc>::from(t).format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| "?".into());
    let profile = if p.components().any(|c| c.as_os_str() == "release") {
        "release build"
    } else if p.components().any(|c| c.as_os_str() == "debug") {
        "debug build"
    } else {
        "build profile unknown"
    };
    format!("{} ({profile}, built {mtime})", p.display())
}

pub fn run(opts: &Options) -> anyhow::Result<Record> {
    let started = Instant::now();
    let date = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let machine = machine();
    let (cluster, up_s) = match &opts.existing {
        Some(dir) => (
            Cluster { skiff: opts.skiff.clone(), data_dir: dir.clone(), _tmp: None, _turn: None, ours: false },
            None,
        ),
        None => {
            let (c, s) = bring_up(opts)?;
            (c, Some(s))
        }
    };
    let kubeconfig = cluster.kubeconfig();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("tokio runtime")?;
    let text = std::fs::read_to_string(&kubeconfig).with_context(|| format!("reading {}", kubeconfig.display()))?;
    // kube's rustls needs a process-wide provider when more than one could be linked in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = rt.block_on(async {
        let kc = kube::config::Kubeconfig::from_yaml(&text).context("parsing the kubeconfig")?;
        let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .context("loading the kubeconfig")?;
        kube::Client::try_from(config).context("building the API client")
    })?;
    let mut bench = Bench { opts, kubeconfig, rt, client, client_netns: PathBuf::new() };

    // The client pod the requests come from (a pod like any other: tc layer on its veth).
    bench.kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n---\n{}",
            deployment("client", 1).replace("        readinessProbe:\n          httpGet: {path: /healthz, port: http}\n          periodSeconds: 1\n", "")
        )),
    )?;
    let mut uid = String::new();
    bench.wait_for("the client pod Running", |b| {
        let pods = b.pods("client")?;
        if let [p] = pods.as_slice()
            && pod_ready(p)
            && let Some(u) = &p.metadata.uid
        {
            uid = u.clone();
            return Ok(true);
        }
        Ok(false)
    })?;
    bench.client_netns = PathBuf::from(format!("/run/netns/skp-{uid}"));
    if !bench.client_netns.exists() {
        bail!("the client pod's network namespace {} is missing", bench.client_netns.display());
    }

    let mut scenarios = Vec::new();
    if opts.scale_trials > 0 {
        scenarios.push(bench.scale()?);
    }
    if opts.apply_trials > 0 {
        scenarios.push(bench.apply()?);
    }
    if !cluster.ours {
        let _ = bench.kubectl(&["delete", "namespace", NAMESPACE, "--wait=false"], None);
    }
    let record = Record {
        command: opts.command.clone(),
        date,
        machine,
        skiff_binary: describe_binary(&opts.skiff),
        cluster: match &opts.existing {
            Some(d) => format!("a running cluster ({})", d.display()),
            None => format!(
                "`skiff up --nodes {} --name {LAB_NAME} --lab-net {LAB_NET}` (runc, native routing), brought up by this run",
                opts.nodes
            ),
        },
        up_s,
        poll: format!(
            "{} client threads in a client pod's network namespace, each a new TCP connection to the ClusterIP every ~{} ms (plus its round trip; 100 ms connect timeout); their packets take skiff's tc layer on the pod's veth, as any pod's do (the agent attaches the socket layer to the node's host cgroup only); an endpoint counts as answering at its first answer",
            opts.poll_threads,
            opts.poll_interval.as_millis()
        ),
        scenarios,
        notes: opts.notes.clone(),
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    drop(bench);
    drop(cluster);
    Ok(record)
}

pub fn markdown(r: &Record) -> String {
    let mut s = String::new();
    s.push_str("# End to end on a `skiff up` cluster: kubectl to endpoints answering through the Service\n\n");
    s.push_str(&format!("Command: `{}`\n\n", r.command));
    let m = &r.machine;
    s.push_str(&format!(
        "Machine: nproc {}, {}, {} MB, kernel {}; measured {} (load average before: {}); run took {:.0} s. The machine was shared with other engineers' builds and tests: absolute times drift, compare the columns of one trial.\n\n",
        m.nproc, m.cpu, m.memory_mb, m.kernel, r.date, m.load_before, r.elapsed_s
    ));
    s.push_str(&format!("skiff binary: {}.\n\nCluster: {}", r.skiff_binary, r.cluster));
    if let Some(up) = r.up_s {
        s.push_str(&format!(" (`skiff up` took {up:.1} s)"));
    }
    s.push_str(&format!(".\n\nClient: {}.\n\n", r.poll));
    s.push_str("Each trial, on one clock from just before kubectl starts: when kubectl returned; when the API showed the new pods Ready (kube-rs watch: the baseline the datapath cannot beat, skiff programs only ready endpoints); when their EndpointSlice endpoints were ready; when they had answered through the ClusterIP. The datapath lag is the last minus the one before: the agent's watch, plan and map writes, plus the client's sampling delay (in the trials table: the endpoints that had to answer divided by the answers per second, the mean wait for a given endpoint to be picked once it could be).\n\n");
    for sc in &r.scenarios {
        s.push_str(&format!("## {}: {} -> {} replicas\n\n{}.\n\n", sc.name, sc.replicas_before, sc.replicas_after, sc.description));
        s.push_str("| metric | trials | median | p90 | min | max |\n|---|---:|---:|---:|---:|---:|\n");
        for st in &sc.stats {
            let f = |v: f64| if st.metric.contains("ratio") { format!("{v:.2}x") } else { format!("{v:.3}") };
            s.push_str(&format!("| {} | {} | {} | {} | {} | {} |\n", st.metric, st.n, f(st.median), f(st.p90), f(st.min), f(st.max)));
        }
        s.push_str("\nTrials (seconds):\n\n| # | kubectl returned | pods Ready | EndpointSlice ready | answering | datapath lag | requests answered / not | sampling delay | error |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        let o = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        for (i, t) in sc.trials.iter().enumerate() {
            s.push_str(&format!(
                "| {} | {:.3} | {} | {} | {} | {} | {} / {} | {} | {} |\n",
                i + 1,
                t.kubectl_returned_s,
                o(t.pods_ready_s),
                o(t.endpoints_ready_s),
                o(t.answering_s),
                o(t.datapath_lag_s()),
                t.answered,
                t.unanswered,
                o(t.sampling_delay_s(sc.replicas_after - sc.replicas_before)),
                t.error.as_deref().unwrap_or("")
            ));
        }
        s.push('\n');
    }
    if !r.notes.is_empty() {
        s.push_str("## Notes\n\n");
        for n in &r.notes {
            s.push_str(&format!("- {n}\n"));
        }
    }
    s
}

/// Writes `<stem>.json` and `<stem>.md` into `dir`.
pub fn write_all(r: &Record, dir: &Path, stem: &str) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join(format!("{stem}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(r)?).with_context(|| format!("writing {}", json.display()))?;
    let md = dir.join(format!("{stem}.md"));
    std::fs::write(&md, markdown(r)).with_context(|| format!("writing {}", md.display()))?;
    Ok(vec![json, md])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(ready: f64, slice: f64, answer: f64) -> Trial {
        Trial {
            kubectl_returned_s: 0.1,
            pods_ready_s: Some(ready),
            endpoints_ready_s: Some(slice),
            answering_s: Some(answer),
            answered: 10,
            unanswered: 0,
            error: None,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 5.0);
        assert_eq!(percentile(&v, 0.9), 9.0);
        assert_eq!(percentile(&[3.0], 0.9), 3.0);
    }

    #[test]
    fn stats_skip_failed_trials_and_compute_the_lag() {
        let mut failed = trial(1.0, 1.0, 100.0);
        failed.error = Some("timed out".into());
        let s = stats(&[trial(2.0, 2.5, 3.0), trial(4.0, 4.1, 4.2), failed]);
        let lag = s.iter().find(|s| s.metric.starts_with("datapath lag")).expect("lag");
        assert_eq!(lag.n, 2);
        assert!((lag.max - 0.5).abs() < 1e-9 && (lag.min - 0.1).abs() < 1e-9);
        let ratio = s.iter().find(|s| s.metric.contains("ratio")).expect("ratio");
        assert!((ratio.min - 1.05).abs() < 1e-9, "{ratio:?}");
    }
}
