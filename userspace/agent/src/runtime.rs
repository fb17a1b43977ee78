//! What the agent needs from a container runtime, in the agent's own terms. `skiff-runtime`'s
//! runc (and later CRI) runtimes implement it (see `runc_adapter`); the pod logic is tested
//! against the pure state machine in `pods::plan` without any of them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

/// A container as the agent asks for it: all Kubernetes semantics (command/args vs entrypoint,
/// env resolution, volume paths) are resolved by the agent before it gets here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerRequest {
    /// `<pod uid>_<container name>_<attempt>`: unique, and parsed back by `ContainerKey`.
    pub id: String,
    pub image: String,
    /// Kubernetes `command` (replaces the image entrypoint when set).
    pub command: Vec<String>,
    /// Kubernetes `args` (replace the image cmd when set).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub hostname: String,
    /// `/run/netns/<name>` of the pod sandbox.
    pub netns_path: PathBuf,
    pub mounts: Vec<Mount>,
    pub memory_limit_bytes: Option<u64>,
    /// CPU limit in millicores.
    pub cpu_limit_millis: Option<u64>,
    /// CPU request in millicores (cpu.shares).
    pub cpu_request_millis: Option<u64>,
    /// The cgroup the container's cgroup goes under (per pod).
    pub cgroup_parent: String,
    /// Where stdout/stderr go, in CRI log format.
    pub log_path: PathBuf,
    pub labels: BTreeMap<String, String>,
    pub tty: bool,
    pub stdin: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// What the runtime knows of a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Created but not started.
    Created,
    Running { pid: u32, started_at: Timestamp },
    Exited { exit_code: i32, oom_killed: bool, started_at: Option<Timestamp>, finished_at: Timestamp },
    /// The runtime has no such container.
    Absent,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("image {0} is not in the node's image store (import it with `skiff image import`)")]
    ImageNotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// The image data the agent needs to resolve Kubernetes' command/args semantics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageInfo {
    pub id: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
}

/// What a runtime that owns pod sandboxes (CRI) needs to make one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SandboxRequest {
    pub pod_uid: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub hostname: String,
    /// `<pod dir>/logs`: containers' logs go to `<container>/<attempt>.log` below it.
    pub log_directory: PathBuf,
    /// The pod-level cgroup (`/skiff/<node>/pod<uid>`); the agent removes it after the pod.
    pub cgroup_parent: String,
    pub labels: BTreeMap<String, String>,
}

/// A ready sandbox: its network namespace (a name under /run/netns) and the address CNI gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxInfo {
    pub netns: String,
    pub pod_ip: String,
}

/// Pod sandboxes made by the runtime itself (CRI's RunPodSandbox: it creates the netns and runs
/// CNI), instead of the agent's own netns + CNI ADD.
pub trait SandboxRuntime: Send + Sync {
    /// The pod's ready sandbox, made if needed (idempotent: an existing ready one is returned).
    fn run_sandbox(&self, req: &SandboxRequest) -> Result<SandboxInfo, RuntimeError>;
    /// Stops and removes every sandbox of the pod (its network goes). No error when none.
    fn remove_sandbox(&self, pod_uid: &str) -> Result<(), RuntimeError>;
    /// The uids of the pods the runtime holds sandboxes for (orphan sweep after a restart).
    fn sandbox_pod_uids(&self) -> Result<Vec<String>, RuntimeError>;
    /// The CNI version the runtime's CNI library reads results of (the conflist says it).
    fn cni_version(&self) -> &'static str;
}

/// Blocking calls: the agent runs them on the blocking pool.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// `runc://1.1.5`-style version for Node.status.nodeInfo.
    fn version(&self) -> String;
    fn image(&self, image: &str) -> Result<ImageInfo, RuntimeError>;
    /// Pulls `image` from its registry into the node's store and returns it as `image` would.
    /// `docker_configs`: the pod's imagePullSecrets (docker config json), tried in order.
    /// Default: this runtime cannot pull.
    fn pull(&self, image: &str, docker_configs: &[Vec<u8>]) -> Result<ImageInfo, RuntimeError> {
        let _ = docker_configs;
        Err(RuntimeError::Failed(format!("pulling {image}: this runtime does not pull images")))
    }
    /// The node-local image store this runtime runs containers from, for the agent's image GC.
    /// None (the default): the runtime collects its own images (containerd).
    fn image_store(&self) -> Option<skiff_runtime::ImageStore> {
        None
    }
    /// Manifest digests of the images the runtime's containers (running or not) use.
    fn images_in_use(&self) -> Result<std::collections::HashSet<String>, RuntimeError> {
        Ok(Default::default())
    }
    /// Creates and starts the container.
    fn run(&self, req: &ContainerRequest) -> Result<(), RuntimeError>;
    fn observe(&self, id: &str) -> Result<Observed, RuntimeError>;
    /// SIGTERM, `grace`, then SIGKILL. No error when it is not running.
    fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
    /// Deletes the container and its state (after it stopped). No error when absent.
    fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// Every container id the runtime holds (adoption after an agent restart).
    fn list(&self) -> Result<Vec<String>, RuntimeError>;
    /// Starts `argv` inside a running container.
    fn exec(&self, id: &str, argv: &[String], tty: bool) -> Result<std::process::Child, RuntimeError>;
    /// Runs `argv` to completion (exec probes): its exit code, or an error when it could not
    /// run or outlived `timeout` (then it is killed). Default: `exec` and wait.
    fn exec_sync(&self, id: &str, argv: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        let mut child = self.exec(id, argv, false)?;
        drop(child.stdin.take());
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status.code().unwrap_or(-1)),
                Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(RuntimeError::Failed(format!("{argv:?} timed out after {timeout:?}")));
                }
                Err(e) => return Err(RuntimeError::Failed(format!("waiting for {argv:?}: {e}"))),
            }
        }
    }
    /// Some when the runtime makes pod sandboxes itself (CRI); None: the agent makes them
    /// (a netns + CNI ADD, `sandbox.rs`).
    fn sandbox(&self) -> Option<&dyn SandboxRuntime> {
        None
    }
}

/// The parts of a container id the agent chose.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerKey {
    pub pod_uid: String,
    pub container: String,
    pub attempt: u32,
}

impl ContainerKey {
    pub fn id(&self) -> String {
        format!("{}_{}_{}", self.pod_uid, self.container, self.attempt)
    }

    /// Parses an id this agent made; None for anything else (left alone).
    pub fn parse(id: &str) -> Option<ContainerKey> {
        let mut parts = id.splitn(3, '_');
        let pod_uid = parts.next()?.to_string();
        let container = parts.next()?.to_string();
        let attempt = parts.next()?.parse().ok()?;
        if pod_uid.is_empty() || container.is_empty() {
            return None;
        }
        Some(ContainerKey { pod_uid, container, attempt })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_round_trip_and_reject_foreign_ones() {
        let k = ContainerKey { pod_uid: "0b5c-11".into(), container: "web".into(), attempt: 3 };
        assert_eq!(ContainerKey::parse(&k.id()), Some(k));
        assert_eq!(ContainerKey::parse("something-else"), None);
        assert_eq!(ContainerKey::parse("a_b_c"), None);
        assert_eq!(ContainerKey::parse("_b_1"), None);
    }
}
