//! The agent's [`ContainerRuntime`] over CRI (containerd), as kubelet drives one: the runtime
//! owns the pod sandbox (RunPodSandbox makes the netns and calls skiff-cni itself), containers
//! are created in it, and everything is found again by labels after an agent restart
//! (ListPodSandbox / ListContainers), so the adapter keeps no state of its own on disk.
//!
//! Ids: the agent's `<pod uid>_<container>_<attempt>` is the label `skiff.io/agent-id` of the
//! CRI container; sandboxes carry `io.kubernetes.pod.uid`. Both carry `skiff.io/managed-by`, so
//! anything else in the runtime is left alone.
//!
//! Exec: probes use CRI's ExecSync. `kubectl exec` needs a live process with stdin and a tty;
//! CRI's streaming Exec would hand back a URL to containerd's stream server (SPDY/websocket),
//! so instead the exec runs as `ctr tasks exec` (containerd's own client, same container, same
//! socket), which gives the agent a real child process with pipes or a pty and the exit code.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use skiff_runtime::cri::status::CriContainerState;
use skiff_runtime::cri::{CriRuntime, proto};

use crate::runtime::{ContainerKey, ContainerRequest, ContainerRuntime, ImageInfo, Observed, RuntimeError, SandboxInfo, SandboxRequest, SandboxRuntime};

const MANAGED_BY: &str = "skiff.io/managed-by";
const MANAGED_BY_VALUE: &str = "skiff-agent";
const AGENT_ID: &str = "skiff.io/agent-id";
const POD_UID: &str = "io.kubernetes.pod.uid";
const POD_NAME: &str = "io.kubernetes.pod.name";
const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// What CreateContainer needs of the sandbox's config after an agent restart (CRI's status
/// does not return the config): kept as sandbox annotations.
const ANN_LOG_DIR: &str = "skiff.io/log-directory";
const ANN_CGROUP_PARENT: &str = "skiff.io/cgroup-parent";
const ANN_HOSTNAME: &str = "skiff.io/hostname";

fn fail(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Failed(e.to_string())
}

fn managed() -> BTreeMap<String, String> {
    [(MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string())].into_iter().collect()
}

fn timestamp(nanos: i64) -> Option<Timestamp> {
    (nanos > 0).then(|| Timestamp::from_nanosecond(i128::from(nanos)).ok()).flatten()
}

#[derive(Clone)]
struct Sandbox {
    id: String,
    config: proto::PodSandboxConfig,
}

/// containerd (or any CRI v1 runtime) as the agent's runtime.
#[derive(Clone)]
pub struct CriAdapter {
    cri: Arc<CriRuntime>,
    socket: PathBuf,
    version: String,
    /// agent id -> CRI container id (refreshed from ListContainers on a miss).
    ids: Arc<Mutex<HashMap<String, String>>>,
    /// pod uid -> its ready sandbox.
    sandboxes: Arc<Mutex<HashMap<String, Sandbox>>>,
    exec_seq: Arc<AtomicU64>,
}

/// The sandbox config for a pod (the same inputs give the same config).
pub fn sandbox_config(req: &SandboxRequest, attempt: u32) -> proto::PodSandboxConfig {
    let mut labels: HashMap<String, String> = req.labels.clone().into_iter().collect();
    labels.extend(managed());
    labels.insert(POD_UID.into(), req.pod_uid.clone());
    labels.insert(POD_NAME.into(), req.pod_name.clone());
    labels.insert(POD_NAMESPACE.into(), req.pod_namespace.clone());
    let annotations = [
        (ANN_LOG_DIR, req.log_directory.display().to_string()),
        (ANN_CGROUP_PARENT, req.cgroup_parent.clone()),
        (ANN_HOSTNAME, req.hostname.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    proto::PodSandboxConfig {
        metadata: Some(proto::PodSandboxMetadata {
            name: req.pod_name.clone(),
            uid: req.pod_uid.clone(),
            namespace: req.pod_namespace.clone(),
            attempt,
        }),
        hostname: req.hostname.clone(),
        log_directory: req.log_directory.display().to_string(),
        labels,
        annotations,
        linux: Some(proto::LinuxPodSandboxConfig {
            cgroup_parent: req.cgroup_parent.clone(),
            security_context: Some(proto::LinuxSandboxSecurityContext {
                namespace_options: Some(proto::NamespaceOption {
                    network: proto::NamespaceMode::Pod as i32,
                    pid: proto::NamespaceMode::Container as i32,
                    ipc: proto::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The container's log path relative to the sandbox's log directory (CRI joins the two); the
/// agent's layout `<pod dir>/logs/<container>/<attempt>.log` makes it `<container>/<attempt>.log`.
pub fn relative_log_path(log_path: &Path, log_directory: &Path, key: &ContainerKey) -> String {
    match log_path.strip_prefix(log_directory) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
        _ => format!("{}/{}.log", key.container, key.attempt),
    }
}

/// The CRI container config for an agent request.
pub fn container_config(req: &ContainerRequest, key: &ContainerKey, log_directory: &Path) -> proto::ContainerConfig {
    let mut labels: HashMap<String, String> = req.labels.clone().into_iter().collect();
    labels.extend(managed());
    labels.insert(AGENT_ID.into(), req.id.clone());
    let period = 100_000i64;
    let resources = proto::LinuxContainerResources {
        memory_limit_in_bytes: req.memory_limit_bytes.map(|b| b.min(i64::MAX as u64) as i64).unwrap_or(0),
        // cpu.shares as kubelet computes them: 1024 per core of request, at least 2.
        cpu_shares: req.cpu_request_millis.map(|m| (m * 1024 / 1000).max(2) as i64).unwrap_or(0),
        cpu_quota: req.cpu_limit_millis.map(|m| (m as i64 * period / 1000).max(1000)).unwrap_or(0),
        cpu_period: req.cpu_limit_millis.map(|_| period).unwrap_or(0),
        ..Default::default()
    };
    proto::ContainerConfig {
        metadata: Some(proto::ContainerMetadata { name: key.container.clone(), attempt: key.attempt }),
        image: Some(proto::ImageSpec { image: req.image.clone(), ..Default::default() }),
        command: req.command.clone(),
        args: req.args.clone(),
        working_dir: req.working_dir.clone().unwrap_or_default(),
        envs: req.env.iter().map(|(k, v)| proto::KeyValue { key: k.clone(), value: v.clone().into_bytes() }).collect(),
        mounts: req
            .mounts
            .iter()
            .map(|m| proto::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.display().to_string(),
                readonly: m.read_only,
                ..Default::default()
            })
            .collect(),
        labels,
        log_path: relative_log_path(&req.log_path, log_directory, key),
        stdin: req.stdin,
        tty: req.tty,
        linux: Some(proto::LinuxContainerConfig { resources: Some(resources), ..Default::default() }),
        ..Default::default()
    }
}

/// The agent's view of a CRI container status.
pub fn observed(s: &skiff_runtime::cri::ContainerSummary) -> Observed {
    match s.state {
        CriContainerState::Created => Observed::Created,
        CriContainerState::Running => Observed::Running { pid: s.pid.unwrap_or(0), started_at: timestamp(s.started_at).unwrap_or_else(Timestamp::now) },
        CriContainerState::Exited => Observed::Exited {
            exit_code: s.exit_code,
            oom_killed: s.oom_killed(),
            started_at: timestamp(s.started_at),
            finished_at: timestamp(s.finished_at).unwrap_or_else(Timestamp::now),
        },
        // The runtime lost track of it: the planner starts a new attempt.
        CriContainerState::Unknown => Observed::Exited { exit_code: 255, oom_killed: false, started_at: timestamp(s.started_at), finished_at: Timestamp::now() },
    }
}

impl CriAdapter {
    /// Connects to the CRI endpoint (`unix:///path`).
    pub fn connect(endpoint: &str) -> Result<CriAdapter, RuntimeError> {
        let cri = CriRuntime::connect(endpoint).map_err(fail)?;
        let version = cri.version_string();
        Ok(CriAdapter {
            socket: cri.socket().to_path_buf(),
            cri: Arc::new(cri),
            version,
            ids: Default::default(),
            sandboxes: Default::default(),
            exec_seq: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The CRI client underneath (tests, `skiff down`).
    pub fn client(&self) -> &CriRuntime {
        &self.cri
    }

    fn refresh(&self) -> Result<HashMap<String, String>, RuntimeError> {
        let map: HashMap<String, String> = self
            .cri
            .list_containers(&managed())
            .map_err(fail)?
            .into_iter()
            .filter_map(|c| c.labels.get(AGENT_ID).map(|a| (a.clone(), c.id.clone())))
            .collect();
        if let Ok(mut ids) = self.ids.lock() {
            *ids = map.clone();
        }
        Ok(map)
    }

    fn cri_id(&self, id: &str) -> Result<Option<String>, RuntimeError> {
        if let Some(c) = self.ids.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(Some(c));
        }
        Ok(self.refresh()?.get(id).cloned())
    }

    fn pod_sandboxes(&self, uid: &str) -> Result<Vec<proto::PodSandbox>, RuntimeError> {
        let mut labels = managed();
        labels.insert(POD_UID.into(), uid.into());
        self.cri.list_pod_sandboxes(&labels).map_err(fail)
    }

    /// The pod's ready sandbox (from the cache, else found by its labels after a restart).
    fn ready_sandbox(&self, uid: &str) -> Result<Option<Sandbox>, RuntimeError> {
        if let Some(s) = self.sandboxes.lock().ok().and_then(|m| m.get(uid).cloned()) {
            return Ok(Some(s));
        }
        for sb in self.pod_sandboxes(uid)? {
            if sb.state != proto::PodSandboxState::SandboxReady as i32 {
                continue;
            }
            let ann = |k: &str| sb.annotations.get(k).cloned().unwrap_or_default();
            let meta = sb.metadata.clone().unwrap_or_default();
            let req = SandboxRequest {
                pod_uid: meta.uid.clone(),
                pod_name: meta.name.clone(),
                pod_namespace: meta.namespace.clone(),
                hostname: ann(ANN_HOSTNAME),
                log_directory: PathBuf::from(ann(ANN_LOG_DIR)),
                cgroup_parent: ann(ANN_CGROUP_PARENT),
                labels: sb.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            };
            let s = Sandbox { id: sb.id.clone(), config: sandbox_config(&req, meta.attempt) };
            if let Ok(mut m) = self.sandboxes.lock() {
                m.insert(uid.to_string(), s.clone());
            }
            return Ok(Some(s));
        }
        Ok(None)
    }

    fn info_of(&self, id: &str) -> Result<Option<SandboxInfo>, RuntimeError> {
        let Some(st) = self.cri.pod_sandbox_status(id).map_err(fail)? else { return Ok(None) };
        let (Some(ip), Some(netns)) = (st.ip.clone(), st.netns_path.clone()) else { return Ok(None) };
        if !st.ready {
            return Ok(None);
        }
        // The agent names sandboxes' netns by their file under /run/netns (containerd makes
        // them at /var/run/netns/cni-<uuid>, the same folder on Debian).
        let in_run_netns = netns.parent().is_some_and(|p| p == Path::new("/run/netns") || p == Path::new("/var/run/netns"));
        let name = netns.file_name().map(|n| n.to_string_lossy().into_owned()).filter(|_| in_run_netns);
        let name = name.ok_or_else(|| RuntimeError::Failed(format!("the sandbox's netns {} is not under /run/netns", netns.display())))?;
        Ok(Some(SandboxInfo { netns: name, pod_ip: ip }))
    }
}

impl SandboxRuntime for CriAdapter {
    fn run_sandbox(&self, req: &SandboxRequest) -> Result<SandboxInfo, RuntimeError> {
        let mut next_attempt = 0;
        for sb in self.pod_sandboxes(&req.pod_uid)? {
            let attempt = sb.metadata.as_ref().map(|m| m.attempt).unwrap_or(0);
            next_attempt = next_attempt.max(attempt + 1);
            if sb.state == proto::PodSandboxState::SandboxReady as i32
                && let Some(info) = self.info_of(&sb.id)?
            {
                if let Ok(mut m) = self.sandboxes.lock() {
                    m.insert(req.pod_uid.clone(), Sandbox { id: sb.id.clone(), config: sandbox_config(req, attempt) });
                }
                return Ok(info);
            }
            // A dead sandbox (its pause container exited, a reboot): replaced, as kubelet does.
            let _ = self.cri.stop_pod_sandbox(&sb.id);
            let _ = self.cri.remove_pod_sandbox(&sb.id);
        }
        let config = sandbox_config(req, next_attempt);
        let id = self.cri.run_pod_sandbox(config.clone()).map_err(fail)?;
        match self.info_of(&id) {
            Ok(Some(info)) => {
                if let Ok(mut m) = self.sandboxes.lock() {
                    m.insert(req.pod_uid.clone(), Sandbox { id, config });
                }
                Ok(info)
            }
            other => {
                let _ = self.cri.stop_pod_sandbox(&id);
                let _ = self.cri.remove_pod_sandbox(&id);
                Err(other.err().unwrap_or_else(|| RuntimeError::Failed(format!("sandbox {id} has no IP or netns after RunPodSandbox"))))
            }
        }
    }

    fn remove_sandbox(&self, pod_uid: &str) -> Result<(), RuntimeError> {
        if let Ok(mut m) = self.sandboxes.lock() {
            m.remove(pod_uid);
        }
        let mut first_err = None;
        for sb in self.pod_sandboxes(pod_uid)? {
            // Stop (CNI DEL, containers killed) then remove, as kubelet does.
            if let Err(e) = self.cri.stop_pod_sandbox(&sb.id).and_then(|()| self.cri.remove_pod_sandbox(&sb.id)) {
                first_err.get_or_insert(fail(e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn sandbox_pod_uids(&self) -> Result<Vec<String>, RuntimeError> {
        let mut uids: Vec<String> = self.cri.list_pod_sandboxes(&managed()).map_err(fail)?.into_iter().filter_map(|s| s.labels.get(POD_UID).cloned()).collect();
        uids.sort();
        uids.dedup();
        Ok(uids)
    }

    fn cni_version(&self) -> &'static str {
        // containerd 1.6 links libcni 1.1, which reads results up to CNI 1.0.0.
        "1.0.0"
    }
}

impl ContainerRuntime for CriAdapter {
    fn version(&self) -> String {
        self.version.clone()
    }

    fn image(&self, image: &str) -> Result<ImageInfo, RuntimeError> {
        let img = self.cri.image_status(image).map_err(fail)?.ok_or_else(|| RuntimeError::ImageNotFound(image.to_string()))?;
        Ok(ImageInfo {
            id: img.id,
            entrypoint: img.entrypoint,
            cmd: img.cmd,
            env: img.env.iter().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect(),
            working_dir: img.working_dir,
        })
    }

    /// CRI PullImage with the first imagePullSecret that has credentials for the image's
    /// registry (matched as kubelet does), else anonymously; the runtime's own registry config
    /// (mirrors, CAs) applies.
    fn pull(&self, image: &str, docker_configs: &[Vec<u8>]) -> Result<ImageInfo, RuntimeError> {
        let auth = docker_configs
            .iter()
            .find_map(|cfg| skiff_runtime::pull::credentials_from_docker_config(cfg, image).ok().flatten())
            .map(auth_config);
        self.cri.pull_image(image, auth).map_err(|e| RuntimeError::Failed(format!("pulling {image}: {e}")))?;
        self.image(image)
    }

    fn run(&self, req: &ContainerRequest) -> Result<(), RuntimeError> {
        let key = ContainerKey::parse(&req.id).ok_or_else(|| RuntimeError::Failed(format!("container id {:?} is not the agent's", req.id)))?;
        let sb = self
            .ready_sandbox(&key.pod_uid)?
            .ok_or_else(|| RuntimeError::Failed(format!("pod {} has no ready sandbox", key.pod_uid)))?;
        let config = container_config(req, &key, Path::new(&sb.config.log_directory));
        let id = self.cri.create_container(&sb.id, config, sb.config.clone()).map_err(fail)?;
        if let Ok(mut ids) = self.ids.lock() {
            ids.insert(req.id.clone(), id.clone());
        }
        // A failed start keeps the container: its status says why, and the planner restarts.
        self.cri.start_container(&id).map_err(fail)
    }

    fn observe(&self, id: &str) -> Result<Observed, RuntimeError> {
        let Some(cid) = self.cri_id(id)? else { return Ok(Observed::Absent) };
        Ok(match self.cri.container_status(&cid).map_err(fail)? {
            Some(s) => observed(&s),
            None => {
                if let Ok(mut ids) = self.ids.lock() {
                    ids.remove(id);
                }
                Observed::Absent
            }
        })
    }

    fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        match self.cri_id(id)? {
            Some(cid) => self.cri.stop_container(&cid, grace).map_err(fail),
            None => Ok(()),
        }
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(cid) = self.cri_id(id)? {
            self.cri.remove_container(&cid).map_err(fail)?;
        }
        if let Ok(mut ids) = self.ids.lock() {
            ids.remove(id);
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.refresh()?.into_keys().collect())
    }

    fn exec(&self, id: &str, argv: &[String], tty: bool) -> Result<std::process::Child, RuntimeError> {
        let cid = self.cri_id(id)?.ok_or_else(|| RuntimeError::Failed(format!("container {id} not found")))?;
        if argv.is_empty() {
            return Err(RuntimeError::Failed("exec needs a command".into()));
        }
        let exec_id = format!("skiff-exec-{}-{}", std::process::id(), self.exec_seq.fetch_add(1, Ordering::Relaxed));
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).args(["-n", "k8s.io", "tasks", "exec", "--exec-id", &exec_id]);
        if tty {
            cmd.arg("--tty");
        }
        // ctr stops parsing its flags at the container id.
        cmd.arg(&cid).args(argv);
        let spawn_err = |e: std::io::Error| RuntimeError::Failed(format!("running ctr tasks exec (apt-get install containerd): {e}"));
        if !tty {
            return cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(spawn_err);
        }
        // ctr --tty wants its own stdin to be a terminal (it proxies it to the container's pty
        // and follows its size): give it the slave of a pty we own, as its controlling tty. The
        // contract of ContainerRuntime::exec: the Child's stdin and stdout are the pty master.
        let (master, slave) = open_pty().map_err(spawn_err)?;
        cmd.stdin(Stdio::from(slave.try_clone().map_err(spawn_err)?))
            .stdout(Stdio::from(slave.try_clone().map_err(spawn_err)?))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the pty slave here.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        // Our copies of the slave go with `cmd`, so the master reads EOF (EIO) when ctr ends.
        drop(cmd);
        child.stdin = Some(std::process::ChildStdin::from(master.try_clone().map_err(spawn_err)?));
        child.stdout = Some(std::process::ChildStdout::from(master));
        Ok(child)
    }

    fn exec_sync(&self, id: &str, argv: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        let cid = self.cri_id(id)?.ok_or_else(|| RuntimeError::Failed(format!("container {id} not found")))?;
        Ok(self.cri.exec_sync(&cid, argv, timeout).map_err(fail)?.exit_code)
    }

    fn sandbox(&self) -> Option<&dyn SandboxRuntime> {
        Some(self)
    }
}

/// Registry credentials as CRI's AuthConfig.
pub fn auth_config(c: skiff_runtime::RegistryCredentials) -> proto::AuthConfig {
    match c {
        skiff_runtime::RegistryCredentials::Basic { username, password } => proto::AuthConfig { username, password, ..Default::default() },
        skiff_runtime::RegistryCredentials::Bearer(token) => proto::AuthConfig { registry_token: token, ..Default::default() },
    }
}

fn open_pty() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty with valid out pointers and no name, termios or size.
    if unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just opened here and belong to nobody else.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: fcntl on an fd we own; the child must not inherit the master.
    unsafe { libc::fcntl(m.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((m, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ContainerRequest {
        ContainerRequest {
            id: "u1_web_2".into(),
            image: "skiff/echo:1.0".into(),
            command: vec!["/bin/sh".into()],
            args: vec!["-c".into(), "true".into()],
            env: vec![("A".into(), "1".into())],
            log_path: "/var/lib/a/pods/u1/logs/web/2.log".into(),
            memory_limit_bytes: Some(64 << 20),
            cpu_limit_millis: Some(500),
            cpu_request_millis: Some(250),
            labels: [("io.kubernetes.pod.uid".to_string(), "u1".to_string())].into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn container_config_keeps_the_agent_layout_and_id() {
        let r = req();
        let key = ContainerKey::parse(&r.id).expect("key");
        let c = container_config(&r, &key, Path::new("/var/lib/a/pods/u1/logs"));
        assert_eq!(c.log_path, "web/2.log");
        assert_eq!(c.metadata, Some(proto::ContainerMetadata { name: "web".into(), attempt: 2 }));
        assert_eq!(c.labels.get(AGENT_ID).map(String::as_str), Some("u1_web_2"));
        assert_eq!(c.labels.get(MANAGED_BY).map(String::as_str), Some(MANAGED_BY_VALUE));
        let res = c.linux.and_then(|l| l.resources).expect("resources");
        assert_eq!((res.memory_limit_in_bytes, res.cpu_quota, res.cpu_period, res.cpu_shares), (64 << 20, 50_000, 100_000, 256));
        assert_eq!(c.envs[0].key, "A");
        // A log path outside the sandbox's folder still lands in the agent's layout.
        assert_eq!(relative_log_path(Path::new("/elsewhere/x.log"), Path::new("/var/lib/a/pods/u1/logs"), &key), "web/2.log");
    }

    #[test]
    fn sandbox_config_is_found_again_by_labels_and_annotations() {
        let r = SandboxRequest {
            pod_uid: "u1".into(),
            pod_name: "p".into(),
            pod_namespace: "ns".into(),
            hostname: "h".into(),
            log_directory: "/d/logs".into(),
            cgroup_parent: "/skiff/n1/podu1".into(),
            labels: [("app".to_string(), "echo".to_string())].into_iter().collect(),
        };
        let c = sandbox_config(&r, 1);
        assert_eq!(c.labels.get(POD_UID).map(String::as_str), Some("u1"));
        assert_eq!(c.labels.get("app").map(String::as_str), Some("echo"));
        assert_eq!(c.annotations.get(ANN_CGROUP_PARENT).map(String::as_str), Some("/skiff/n1/podu1"));
        assert_eq!(c.linux.as_ref().map(|l| l.cgroup_parent.as_str()), Some("/skiff/n1/podu1"));
        assert_eq!(c.metadata.as_ref().map(|m| m.attempt), Some(1));
        assert_eq!(c.log_directory, "/d/logs");
    }

    #[test]
    fn pull_secrets_become_cri_auth() {
        let cfg = br#"{"auths":{"registry.example:5000":{"username":"u","password":"p"}}}"#;
        let c = skiff_runtime::pull::credentials_from_docker_config(cfg, "registry.example:5000/app:1").expect("parses").expect("matches");
        let a = auth_config(c);
        assert_eq!((a.username.as_str(), a.password.as_str(), a.registry_token.as_str()), ("u", "p", ""));
        let t = auth_config(skiff_runtime::RegistryCredentials::Bearer("tok".into()));
        assert_eq!((t.username.as_str(), t.registry_token.as_str()), ("", "tok"));
    }

    #[test]
    fn states_map_with_oom_and_exit_codes() {
        let mut s = skiff_runtime::cri::ContainerSummary {
            id: "c".into(),
            name: "web".into(),
            attempt: 0,
            state: CriContainerState::Exited,
            exit_code: 137,
            reason: "OOMKilled".into(),
            message: String::new(),
            created_at: 1,
            started_at: 1_700_000_000_000_000_000,
            finished_at: 1_700_000_001_000_000_000,
            labels: Default::default(),
            log_path: String::new(),
            pid: None,
        };
        match observed(&s) {
            Observed::Exited { exit_code, oom_killed, started_at, finished_at } => {
                assert_eq!((exit_code, oom_killed), (137, true));
                assert_eq!(started_at.map(|t| t.as_second()), Some(1_700_000_000));
                assert_eq!(finished_at.as_second(), 1_700_000_001);
            }
            o => panic!("{o:?}"),
        }
        s.reason = "Error".into();
        s.exit_code = 3;
        assert!(matches!(observed(&s), Observed::Exited { exit_code: 3, oom_killed: false, .. }));
        s.state = CriContainerState::Running;
        s.pid = Some(77);
        assert!(matches!(observed(&s), Observed::Running { pid: 77, .. }));
        s.state = CriContainerState::Created;
        assert_eq!(observed(&s), Observed::Created);
    }
}
