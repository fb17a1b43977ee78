//! The pod manager: one worker task per pod bound to this node, each a level-triggered loop
//! (every second and on every change of its pod): make the sandbox, run what `plan` says,
//! probe, and post the status; on deletion stop everything with the grace period, release the
//! network, and confirm the deletion (DELETE with grace 0, as kubelet does).
//!
//! Restart-safe: containers are found again through the runtime (`list`, ids carry the pod
//! uid), sandboxes through `<data-dir>/pods/<uid>/sandbox.json`; nothing running is recreated.
//! What belongs to no pod bound here any more (an orphan) is torn down after the first list.

pub mod plan;
pub mod probes;
pub mod sa_token;
pub mod spec;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::runtime::{ContainerKey, ContainerRequest, ContainerRuntime, Observed};
use crate::sandbox::{self, Attachment, CniNetwork};
use plan::{Action, Attempt, PodView};

/// What the pod workers share.
pub struct PodContext {
    pub client: kube::Client,
    pub runtime: Arc<dyn ContainerRuntime>,
    pub cni: CniNetwork,
    pub node_name: String,
    pub node_ip: String,
    /// `<data-dir>/pods`.
    pub pods_dir: PathBuf,
    /// The resolv.conf nameserver for ClusterFirst pods (the node-local DNS address).
    pub dns_server: Option<std::net::IpAddr>,
    pub cluster_domain: String,
    pub backoff_base: Duration,
    /// How often a worker re-checks its pod without a change.
    pub resync: Duration,
    /// The cluster CA (PEM), projected into pods with their service-account token.
    pub cluster_ca: Option<String>,
}

/// What the agent remembers of a sandbox (so a restart finds it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SandboxRecord {
    pub netns: String,
    pub pod_ip: String,
    pub namespace: String,
    pub name: String,
}

fn pod_uid(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

/// Runs the pod manager until `shutdown` flips. Workers are left running containers: stopping
/// the agent never stops pods.
pub async fn run(ctx: Arc<PodContext>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node_name));
    let (store, writer) = reflector::store::<Pod>();
    let changed = Arc::new(tokio::sync::Notify::new());
    // The reflector stream runs on its own task so the store fills whatever this loop awaits.
    let feeder = {
        let changed = changed.clone();
        tokio::spawn(async move {
            let stream = reflector(writer, watcher(pods, cfg)).default_backoff().touched_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    warn!("pod watch: {e}");
                }
                changed.notify_one();
            }
        })
    };
    let _feeder = AbortOnDrop(feeder);
    tokio::select! {
        r = store.wait_until_ready() => r?,
        _ = shutdown.changed() => return Ok(()),
    }
    let mut workers: HashMap<String, (watch::Sender<Option<Pod>>, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut swept = false;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let current: BTreeMap<String, Pod> = store.state().iter().map(|p| (pod_uid(p), (**p).clone())).collect();
        for (uid, pod) in &current {
            match workers.get(uid) {
                Some((tx, _)) => {
                    tx.send_if_modified(|old| {
                        let changed = old.as_ref().map(|o| &o.metadata.resource_version) != Some(&pod.metadata.resource_version);
                        if changed {
                            *old = Some(pod.clone());
                        }
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(Some(pod.clone()));
                    let handle = tokio::spawn(worker(ctx.clone(), uid.clone(), rx));
                    workers.insert(uid.clone(), (tx, handle));
                }
            }
        }
        for (uid, (tx, _)) in workers.iter() {
            if !current.contains_key(uid) {
                let _ = tx.send(None);
            }
        }
        workers.retain(|_, (_, h)| !h.is_finished());
        if !swept {
            swept = true;
            let known: BTreeSet<String> = current.keys().cloned().collect();
            let ctx2 = ctx.clone();
            tokio::spawn(async move {
                if let Err(e) = sweep_orphans(&ctx2, &known).await {
                    warn!("removing orphaned pods failed: {e:#}");
                }
            });
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = changed.notified() => {}
            _ = tick.tick() => {}
        }
    }
    Ok(())
}

/// Aborts a task when dropped (the watch feeder ends with the loop that reads its store).
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tears down sandboxes and containers of pods this node no longer runs (after an agent restart
/// missed their deletion).
async fn sweep_orphans(ctx: &Arc<PodContext>, known: &BTreeSet<String>) -> anyhow::Result<()> {
    let mut uids: BTreeSet<String> = BTreeSet::new();
    let rt = ctx.runtime.clone();
    let ids = tokio::task::spawn_blocking(move || rt.list()).await??;
    for id in ids {
        if let Some(k) = ContainerKey::parse(&id) {
            uids.insert(k.pod_uid);
        }
    }
    let rt = ctx.runtime.clone();
    uids.extend(tokio::task::spawn_blocking(move || rt.sandbox().map_or(Ok(vec![]), |s| s.sandbox_pod_uids())).await??);
    if let Ok(rd) = std::fs::read_dir(&ctx.pods_dir) {
        for e in rd.flatten() {
            uids.insert(e.file_name().to_string_lossy().into_owned());
        }
    }
    for uid in uids.difference(known) {
        info!(pod_uid = %uid, "tearing down an orphaned pod");
        teardown(ctx, uid, Duration::from_secs(2)).await;
    }
    Ok(())
}

/// Per-worker memory that does not belong in the API: probe trackers and the last status posted.
#[derive(Default)]
struct WorkerState {
    probes: BTreeMap<(String, u32, probes::Kind), probes::ProbeTracker>,
    last_status: Option<serde_json::Value>,
    sandbox_failures: u32,
    next_sandbox_try: Option<Instant>,
}

async fn worker(ctx: Arc<PodContext>, uid: String, mut rx: watch::Receiver<Option<Pod>>) {
    let mut st = WorkerState::default();
    loop {
        let pod = rx.borrow_and_update().clone();
        let Some(pod) = pod else {
            // Gone from the API (deleted with grace 0 elsewhere, or rebound): stop now.
            teardown(&ctx, &uid, Duration::from_secs(2)).await;
            return;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as u64;
            teardown(&ctx, &uid, Duration::from_secs(grace)).await;
            confirm_deletion(&ctx, &pod).await;
            return;
        }
        let terminal = matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        if !terminal {
            match sync_pod(&ctx, &pod, &mut st).await {
                Ok(status) => post_status(&ctx, &pod, status, &mut st).await,
                Err(e) => warn!(pod = %pod_name(&pod), "syncing the pod failed: {e:#}"),
            }
        } else {
            // A finished pod keeps its status; its network goes (the IP returns to the pool).
            release_network(&ctx, &uid).await;
        }
        tokio::select! {
            r = rx.changed() => { if r.is_err() { return; } }
            _ = tokio::time::sleep(ctx.resync) => {}
        }
    }
}

fn pod_name(p: &Pod) -> String {
    format!("{}/{}", p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default())
}

fn pod_dir(ctx: &PodContext, uid: &str) -> PathBuf {
    ctx.pods_dir.join(uid)
}

fn read_sandbox(dir: &Path) -> Option<SandboxRecord> {
    serde_json::from_slice(&std::fs::read(dir.join("sandbox.json")).ok()?).ok()
}

/// The network namespaces of the pods this node runs (for the proxy's stale-UDP-socket sweep).
pub fn pod_netns_paths(pods_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(pods_dir) else { return vec![] };
    rd.flatten()
        .filter_map(|e| read_sandbox(&e.path()))
        .map(|r| sandbox::netns_path(&r.netns))
        .filter(|p| p.exists())
        .collect()
}

fn netns_name(uid: &str) -> String {
    format!("skp-{uid}")
}

fn attachment(uid: &str, rec_ns: &str, rec_name: &str, netns: &Path) -> Attachment {
    Attachment {
        container_id: uid.to_string(),
        netns: netns.to_path_buf(),
        ifname: "eth0".into(),
        pod_namespace: rec_ns.to_string(),
        pod_name: rec_name.to_string(),
        pod_uid: uid.to_string(),
    }
}

/// The sandbox of a pod: its netns, networked by CNI. Made once; found again after a restart.
async fn ensure_sandbox(ctx: &Arc<PodContext>, pod: &Pod, dir: &Path) -> anyhow::Result<SandboxRecord> {
    if let Some(rec) = read_sandbox(dir)
        && sandbox::netns_path(&rec.netns).exists()
    {
        return Ok(rec);
    }
    let uid = pod_uid(pod);
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    if ctx.runtime.sandbox().is_some() {
        return runtime_sandbox(ctx, pod, dir).await;
    }
    let netns = netns_name(&uid);
    let cni = ctx.cni.clone();
    let dir2 = dir.to_path_buf();
    let rec = tokio::task::spawn_blocking(move || -> anyhow::Result<SandboxRecord> {
        std::fs::create_dir_all(&dir2)?;
        let path = sandbox::create_netns(&netns)?;
        let a = attachment(&uid, &ns, &name, &path);
        let result = match cni.add(&a) {
            Ok(r) => r,
            Err(e) => {
                let _ = cni.del(&a);
                let _ = sandbox::delete_netns(&netns);
                return Err(e.into());
            }
        };
        let ip = sandbox::result_ipv4(&result)?;
        let rec = SandboxRecord { netns, pod_ip: ip.to_string(), namespace: ns, name };
        std::fs::write(dir2.join("sandbox.json"), serde_json::to_vec(&rec)?)?;
        Ok(rec)
    })
    .await??;
    info!(pod = %pod_name(pod), ip = %rec.pod_ip, "sandbox ready");
    Ok(rec)
}

/// The sandbox made by the runtime (CRI: RunPodSandbox makes the netns and calls CNI).
async fn runtime_sandbox(ctx: &Arc<PodContext>, pod: &Pod, dir: &Path) -> anyhow::Result<SandboxRecord> {
    let uid = pod_uid(pod);
    let req = crate::runtime::SandboxRequest {
        pod_uid: uid.clone(),
        pod_name: pod.metadata.name.clone().unwrap_or_default(),
        pod_namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        hostname: pod.spec.as_ref().and_then(|s| s.hostname.clone()).unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default()),
        log_directory: dir.join("logs"),
        cgroup_parent: format!("/skiff/{}/pod{}", ctx.node_name, uid),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    };
    let (rt, dir2) = (ctx.runtime.clone(), dir.to_path_buf());
    let rec = tokio::task::spawn_blocking(move || -> anyhow::Result<SandboxRecord> {
        std::fs::create_dir_all(dir2.join("logs"))?;
        let sb = rt.sandbox().ok_or_else(|| anyhow::anyhow!("the runtime makes no sandboxes"))?.run_sandbox(&req)?;
        let rec = SandboxRecord { netns: sb.netns, pod_ip: sb.pod_ip, namespace: req.pod_namespace, name: req.pod_name };
        std::fs::write(dir2.join("sandbox.json"), serde_json::to_vec(&rec)?)?;
        Ok(rec)
    })
    .await??;
    info!(pod = %pod_name(pod), ip = %rec.pod_ip, netns = %rec.netns, "sandbox ready (made by the runtime)");
    Ok(rec)
}

/// /etc/hosts, /etc/hostname and /etc/resolv.conf of the pod (written each sync: cheap, and a
/// DNS change reaches new containers).
fn write_pod_files(ctx: &PodContext, pod: &Pod, dir: &Path, ip: &str) -> std::io::Result<()> {
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    std::fs::write(dir.join("hostname"), format!("{hostname}\n"))?;
    std::fs::write(dir.join("hosts"), spec::hosts_file(&hostname, ip))?;
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let policy = pod.spec.as_ref().and_then(|s| s.dns_policy.clone()).unwrap_or_else(|| "ClusterFirst".into());
    let resolv = match (policy.as_str(), ctx.dns_server) {
        ("ClusterFirst" | "ClusterFirstWithHostNet", Some(server)) => {
            let d = &ctx.cluster_domain;
            format!("search {ns}.svc.{d} svc.{d} {d}\nnameserver {server}\noptions ndots:5\n")
        }
        _ => String::new(),
    };
    std::fs::write(dir.join("resolv.conf"), resolv)
}

async fn fetch_sources(ctx: &PodContext, pod: &Pod) -> spec::Sources {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let (cms, secrets) = spec::referenced_sources(pod);
    let mut out = spec::Sources::default();
    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    for n in cms {
        if let Ok(Some(cm)) = cm_api.get_opt(&n).await {
            out.config_maps.insert(n, cm);
        }
    }
    let s_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    for n in secrets {
        if let Ok(Some(s)) = s_api.get_opt(&n).await {
            out.secrets.insert(n, s);
        }
    }
    out
}

/// One pass over one pod; returns the status to post.
async fn sync_pod(ctx: &Arc<PodContext>, pod: &Pod, st: &mut WorkerState) -> anyhow::Result<k8s_openapi::api::core::v1::PodStatus> {
    let uid = pod_uid(pod);
    let dir = pod_dir(ctx, &uid);
    let spec_ = pod.spec.clone().unwrap_or_default();
    let mut view = PodView { pod: pod.clone(), host_ip: ctx.node_ip.clone(), backoff_base: ctx.backoff_base, ..Default::default() };

    // Sandbox, with a back-off on failures (a CNI error repeats until the cause is fixed).
    let now_i = Instant::now();
    if st.next_sandbox_try.is_none_or(|t| now_i >= t) {
        match ensure_sandbox(ctx, pod, &dir).await {
            Ok(rec) => {
                view.pod_ip = Some(rec.pod_ip.clone());
                st.sandbox_failures = 0;
                st.next_sandbox_try = None;
            }
            Err(e) => {
                st.sandbox_failures += 1;
                let wait = plan::backoff(Duration::from_secs(1), st.sandbox_failures.min(6));
                st.next_sandbox_try = Some(now_i + wait);
                warn!(pod = %pod_name(pod), "creating the pod sandbox failed: {e:#}");
                view.sandbox_error = Some(format!("failed to create the pod sandbox: {e:#}"));
            }
        }
    }
    let Some(pod_ip) = view.pod_ip.clone() else {
        return Ok(plan::plan(&view, Timestamp::now()).1);
    };
    write_pod_files(ctx, pod, &dir, &pod_ip)?;

    // Images.
    let mut images = BTreeMap::new();
    for c in spec_.containers.iter().chain(spec_.init_containers.iter().flatten()) {
        // imagePullPolicy, pulls with imagePullSecrets, back-off: crate::image_pull.
        let (res, events) = crate::image_pull::ensure_image(&ctx.client, &ctx.runtime, pod, c, ctx.backoff_base).await;
        for (type_, reason, message) in events {
            event(ctx, pod, type_, reason, &message).await;
        }
        match res {
            Ok(info) => {
                view.image_ids.insert(c.name.clone(), info.id.clone());
                images.insert(c.name.clone(), info);
            }
            Err(wait) => {
                view.image_errors.insert(c.name.clone(), wait.message);
                view.image_error_reasons.insert(c.name.clone(), wait.reason);
            }
        }
    }

    // What runs.
    let rt = ctx.runtime.clone();
    let uid2 = uid.clone();
    view.attempts = tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, Vec<Attempt>>, crate::runtime::RuntimeError> {
        let mut out: BTreeMap<String, Vec<Attempt>> = BTreeMap::new();
        for id in rt.list()? {
            let Some(k) = ContainerKey::parse(&id) else { continue };
            if k.pod_uid != uid2 {
                continue;
            }
            let observed = rt.observe(&id)?;
            out.entry(k.container).or_default().push(Attempt { attempt: k.attempt, observed });
        }
        for v in out.values_mut() {
            v.sort_by_key(|a| a.attempt);
        }
        Ok(out)
    })
    .await??;

    // Probes, for running containers.
    let now = Instant::now();
    for c in &spec_.containers {
        let Some(latest) = view.attempts.get(&c.name).and_then(|v| v.last()) else { continue };
        let running = matches!(latest.observed, Observed::Running { .. });
        let id = ContainerKey { pod_uid: uid.clone(), container: c.name.clone(), attempt: latest.attempt }.id();
        if !running {
            continue;
        }
        let startup_done = match &c.startup_probe {
            None => true,
            Some(p) => {
                let tr = st.probes.entry((c.name.clone(), latest.attempt, probes::Kind::Startup)).or_insert_with(|| probes::ProbeTracker::new(now));
                if tr.due(p, now) {
                    let ok = probes::check(p, c, &pod_ip, ctx.runtime.clone(), &id).await;
                    tr.record(p, ok, Instant::now());
                    if ok {
                        tr.done = true;
                    }
                }
                if tr.failed(p) {
                    view.unhealthy.insert(c.name.clone());
                }
                tr.done
            }
        };
        if startup_done {
            view.started.insert(c.name.clone());
        } else {
            continue;
        }
        if let Some(p) = &c.liveness_probe {
            let tr = st.probes.entry((c.name.clone(), latest.attempt, probes::Kind::Liveness)).or_insert_with(|| probes::ProbeTracker::new(now));
            if tr.due(p, now) {
                let ok = probes::check(p, c, &pod_ip, ctx.runtime.clone(), &id).await;
                tr.record(p, ok, Instant::now());
            }
            if tr.failed(p) {
                view.unhealthy.insert(c.name.clone());
            }
        }
        if let Some(p) = &c.readiness_probe {
            let tr = st.probes.entry((c.name.clone(), latest.attempt, probes::Kind::Readiness)).or_insert_with(|| probes::ProbeTracker::new(now));
            if tr.due(p, now) {
                let ok = probes::check(p, c, &pod_ip, ctx.runtime.clone(), &id).await;
                tr.record(p, ok, Instant::now());
            }
            if tr.passing {
                view.ready.insert(c.name.clone());
            }
        }
    }
    // Forget trackers of attempts that are no longer the latest.
    let latest_attempts: BTreeSet<(String, u32)> = view.attempts.iter().filter_map(|(n, v)| v.last().map(|a| (n.clone(), a.attempt))).collect();
    st.probes.retain(|(n, a, _), _| latest_attempts.contains(&(n.clone(), *a)));

    let (actions, status) = plan::plan(&view, Timestamp::now());
    // The service-account token is refreshed on every pass (a file age check when fresh); a
    // container does not start without it.
    let token_dir = match sa_token::ensure(&ctx.client, ctx.cluster_ca.as_deref(), pod, &dir).await {
        Ok(d) => Ok(d),
        Err(e) => {
            warn!(pod = %pod_name(pod), "no service-account token: {e:#}");
            Err(e)
        }
    };
    if actions.is_empty() {
        return Ok(status);
    }
    let sources = fetch_sources(ctx, pod).await;
    let grace = Duration::from_secs(spec_.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
    for action in actions {
        match action {
            Action::Start { name, attempt, init } => {
                let list = if init { spec_.init_containers.clone().unwrap_or_default() } else { spec_.containers.clone() };
                let Some(c) = list.into_iter().find(|c| c.name == name) else { continue };
                let Some(image) = images.get(&name).cloned() else { continue };
                let token_dir = match &token_dir {
                    Ok(d) => d.clone(),
                    Err(e) => {
                        event(ctx, pod, "Warning", "FailedMount", &format!("service-account token: {e:#}")).await;
                        continue;
                    }
                };
                let req = match build_request(ctx, pod, &c, &image, &sources, &dir, &pod_ip, attempt, token_dir.as_deref()) {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(pod = %pod_name(pod), container = %name, "cannot start: {e}");
                        event(ctx, pod, "Warning", "Failed", &format!("Error: {e}")).await;
                        continue;
                    }
                };
                let rt = ctx.runtime.clone();
                match tokio::task::spawn_blocking(move || rt.run(&req)).await? {
                    Ok(()) => {
                        debug!(pod = %pod_name(pod), container = %name, attempt, "started");
                        event(ctx, pod, "Normal", "Started", &format!("Started container {name}")).await;
                    }
                    Err(e) => {
                        warn!(pod = %pod_name(pod), container = %name, "starting failed: {e}");
                        event(ctx, pod, "Warning", "Failed", &format!("Error: {e}")).await;
                    }
                }
            }
            Action::Kill { id, reason } => {
                info!(pod = %pod_name(pod), container = %id, reason, "killing container");
                event(ctx, pod, "Normal", "Killing", &format!("Container {id} failed its liveness probe, will be restarted")).await;
                let rt = ctx.runtime.clone();
                tokio::task::spawn_blocking(move || rt.stop(&id, grace)).await??;
            }
            Action::Remove { id } => {
                let rt = ctx.runtime.clone();
                tokio::task::spawn_blocking(move || rt.remove(&id)).await??;
            }
        }
    }
    Ok(status)
}

#[allow(clippy::too_many_arguments)]
fn build_request(
    ctx: &PodContext,
    pod: &Pod,
    c: &k8s_openapi::api::core::v1::Container,
    image: &crate::runtime::ImageInfo,
    sources: &spec::Sources,
    dir: &Path,
    pod_ip: &str,
    attempt: u32,
    token_dir: Option<&Path>,
) -> Result<ContainerRequest, spec::SpecError> {
    let uid = pod_uid(pod);
    let env = spec::resolve_env(pod, c, image, sources, pod_ip, &ctx.node_ip)?;
    let (command, args) = spec::argv(c, image, &env);
    let volumes = spec::materialize_volumes(pod, dir, sources, pod_ip, &ctx.node_ip)?;
    let mut mounts = spec::mounts(c, &volumes, dir)?;
    if let Some(token_dir) = token_dir {
        mounts.push(crate::runtime::Mount { host_path: token_dir.to_path_buf(), container_path: sa_token::MOUNT_PATH.into(), read_only: true });
    }
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    let log_dir = dir.join("logs").join(&c.name);
    let _ = std::fs::create_dir_all(&log_dir);
    let mut req = ContainerRequest {
        id: ContainerKey { pod_uid: uid.clone(), container: c.name.clone(), attempt }.id(),
        image: c.image.clone().unwrap_or_default(),
        command,
        args,
        env,
        working_dir: c.working_dir.clone().or(image.working_dir.clone()),
        hostname,
        netns_path: sandbox::netns_path(&netns_name(&uid)),
        mounts,
        cgroup_parent: format!("/skiff/{}/pod{}", ctx.node_name, uid),
        log_path: log_dir.join(format!("{attempt}.log")),
        tty: c.tty.unwrap_or(false),
        stdin: c.stdin.unwrap_or(false),
        labels: [
            ("io.kubernetes.pod.name", pod.metadata.name.clone().unwrap_or_default()),
            ("io.kubernetes.pod.namespace", pod.metadata.namespace.clone().unwrap_or_default()),
            ("io.kubernetes.pod.uid", uid.clone()),
            ("io.kubernetes.container.name", c.name.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        ..Default::default()
    };
    spec::apply_resources(&mut req, c)?;
    Ok(req)
}

/// Posts the status when it differs from the last one posted (merge patch of pods/status).
async fn post_status(ctx: &PodContext, pod: &Pod, status: k8s_openapi::api::core::v1::PodStatus, st: &mut WorkerState) {
    let value = match serde_json::to_value(&status) {
        Ok(v) => v,
        Err(_) => return,
    };
    if st.last_status.as_ref() == Some(&value) && pod.status.as_ref().and_then(|s| s.phase.clone()) == status.phase {
        return;
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.metadata.namespace.clone().unwrap_or_default());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let patch = json!({"metadata": {"uid": pod.metadata.uid}, "status": value});
    match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => st.last_status = Some(value),
        Err(e) => warn!(pod = %pod_name(pod), "posting pod status failed: {e}"),
    }
}

/// Stops and removes every container of the pod (SIGTERM, `grace`, SIGKILL), then its network,
/// its namespace, its cgroup and its directory.
async fn teardown(ctx: &Arc<PodContext>, uid: &str, grace: Duration) {
    let rt = ctx.runtime.clone();
    let uid2 = uid.to_string();
    let stopped = tokio::task::spawn_blocking(move || -> Result<(), crate::runtime::RuntimeError> {
        let ids: Vec<String> = rt.list()?.into_iter().filter(|id| ContainerKey::parse(id).is_some_and(|k| k.pod_uid == uid2)).collect();
        // Stop them side by side: the grace period is per pod, not per container.
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let rt = rt.clone();
                let id = id.clone();
                std::thread::spawn(move || rt.stop(&id, grace))
            })
            .collect();
        for h in handles {
            let _ = h.join();
        }
        for id in &ids {
            rt.remove(id)?;
        }
        Ok(())
    })
    .await;
    if let Ok(Err(e)) | Err(e) = stopped.map_err(|e| crate::runtime::RuntimeError::Failed(e.to_string())) {
        warn!(pod_uid = %uid, "stopping containers failed: {e}");
    }
    release_network(ctx, uid).await;
    remove_pod_cgroups(&ctx.node_name, uid);
    let _ = std::fs::remove_dir_all(pod_dir(ctx, uid));
    info!(pod_uid = %uid, "pod torn down");
}

/// CNI DEL and the netns go; the record stays until the directory goes (a DEL is idempotent).
async fn release_network(ctx: &Arc<PodContext>, uid: &str) {
    let dir = pod_dir(ctx, uid);
    if ctx.runtime.sandbox().is_some() {
        let (rt, uid) = (ctx.runtime.clone(), uid.to_string());
        let res = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            rt.sandbox().map_or(Ok(()), |s| s.remove_sandbox(&uid))?;
            match std::fs::remove_file(dir.join("sandbox.json")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        })
        .await;
        if let Ok(Err(e)) = res {
            warn!("removing a pod sandbox failed: {e:#}");
        }
        return;
    }
    let Some(rec) = read_sandbox(&dir) else { return };
    let cni = ctx.cni.clone();
    let uid = uid.to_string();
    let res = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let path = sandbox::netns_path(&rec.netns);
        let a = attachment(&uid, &rec.namespace, &rec.name, &path);
        cni.del(&a)?;
        sandbox::delete_netns(&rec.netns)?;
        std::fs::remove_file(dir.join("sandbox.json"))?;
        Ok(())
    })
    .await;
    if let Ok(Err(e)) = res {
        warn!("releasing a pod network failed: {e:#}");
    }
}

/// The pod-level cgroup directories stay after the runtime deletes its containers (runc removes
/// only its own): remove them, as kubelet does, in every hierarchy.
fn remove_pod_cgroups(node: &str, uid: &str) {
    let rel = format!("skiff/{node}/pod{uid}");
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else { return };
    let mut roots: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    roots.push(PathBuf::from("/sys/fs/cgroup"));
    for root in roots {
        let dir = root.join(&rel);
        if dir.is_dir() {
            // Children first (a leftover container cgroup), then the pod's own.
            if let Ok(children) = std::fs::read_dir(&dir) {
                for c in children.flatten() {
                    if c.path().is_dir() {
                        let _ = std::fs::remove_dir(c.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// The final delete of a pod whose containers are gone (kubelet's "grace period 0" delete,
/// with the uid as precondition so a new pod of the same name is never touched).
async fn confirm_deletion(ctx: &PodContext, pod: &Pod) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.metadata.namespace.clone().unwrap_or_default());
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: pod.metadata.uid.clone(), resource_version: None }),
        ..Default::default()
    };
    match api.delete(&pod.metadata.name.clone().unwrap_or_default(), &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => warn!(pod = %pod_name(pod), "confirming the deletion failed: {e}"),
    }
}

/// Posts a core/v1 Event about the pod (best effort: an event is never worth failing for).
async fn event(ctx: &PodContext, pod: &Pod, type_: &str, reason: &str, message: &str) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Timestamp::now();
    let ev = json!({
        "metadata": {"generateName": format!("{}.", pod.metadata.name.clone().unwrap_or_default()), "namespace": ns},
        "involvedObject": {"kind": "Pod", "apiVersion": "v1", "namespace": ns, "name": pod.metadata.name, "uid": pod.metadata.uid},
        "reason": reason, "message": message, "type": type_,
        "source": {"component": "kubelet", "host": ctx.node_name},
        "reportingComponent": "kubelet", "reportingInstance": ctx.node_name,
        "firstTimestamp": now.to_string(), "lastTimestamp": now.to_string(), "count": 1,
    });
    let Ok(ev) = serde_json::from_value(ev) else { return };
    let _ = api.create(&Default::default(), &ev).await;
}
