//! The agent's [`ContainerRuntime`] over skiff-runtime's runc runtime and image store.
//!
//! The agent names containers `<pod uid>_<container>_<attempt>`; runc's ids are its own. The
//! mapping is rebuilt from `Runc::list` (whose records carry pod uid, name and attempt), so
//! it survives agent restarts without state of its own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use skiff_runtime::images::ImageStore;
use skiff_runtime::runc::{BindMount, ContainerConfig, ContainerState, PodRuntime, Resources, Runc, RuncOptions};

use crate::runtime::{ContainerKey, ContainerRequest, ContainerRuntime, ImageInfo, Observed, RuntimeError};

#[derive(Clone)]
pub struct RuncRuntime {
    runc: Arc<Runc>,
    images: ImageStore,
    /// agent id -> runc id, refreshed from `list` on a miss.
    ids: Arc<Mutex<HashMap<String, String>>>,
    version: String,
}

fn fail(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Failed(e.to_string())
}

fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse().ok()
}

impl RuncRuntime {
    /// Opens (creating if needed) the runtime state under `state_dir` and the image store at
    /// `image_dir`.
    pub fn open(state_dir: &Path, image_dir: &Path) -> Result<RuncRuntime, RuntimeError> {
        std::fs::create_dir_all(state_dir).map_err(fail)?;
        let images = ImageStore::open(image_dir).map_err(fail)?;
        let runc = Runc::new(RuncOptions::new(state_dir), images.clone()).map_err(fail)?;
        let version = std::process::Command::new("runc")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().and_then(|l| l.split_whitespace().nth(2)).map(|v| format!("runc://{v}")))
            .unwrap_or_else(|| "runc://unknown".into());
        Ok(RuncRuntime { runc: Arc::new(runc), images, ids: Default::default(), version })
    }

    fn refresh(&self) -> Result<HashMap<String, String>, RuntimeError> {
        let mut map = HashMap::new();
        for info in self.runc.list().map_err(fail)? {
            let key = ContainerKey { pod_uid: info.config.pod_uid.clone(), container: info.config.name.clone(), attempt: info.config.attempt };
            map.insert(key.id(), info.id.clone());
        }
        if let Ok(mut ids) = self.ids.lock() {
            *ids = map.clone();
        }
        Ok(map)
    }

    fn runc_id(&self, id: &str) -> Result<Option<String>, RuntimeError> {
        if let Some(r) = self.ids.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(Some(r));
        }
        Ok(self.refresh()?.get(id).cloned())
    }
}

impl ContainerRuntime for RuncRuntime {
    fn version(&self) -> String {
        self.version.clone()
    }

    fn image(&self, image: &str) -> Result<ImageInfo, RuntimeError> {
        let digest = self.images.resolve_digest(image).map_err(|_| RuntimeError::ImageNotFound(image.to_string()))?;
        let cfg = self.images.config(&digest).map_err(fail)?;
        Ok(ImageInfo {
            id: digest,
            entrypoint: cfg.entrypoint,
            cmd: cfg.cmd,
            env: cfg.env.iter().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect(),
            working_dir: cfg.working_dir,
        })
    }

    fn pull(&self, image: &str, docker_configs: &[Vec<u8>]) -> Result<ImageInfo, RuntimeError> {
        // Kubelet's order: every matching credential in turn, anonymous when none matches.
        let mut auths = Vec::new();
        for cfg in docker_configs {
            match skiff_runtime::pull::credentials_from_docker_config(cfg, image) {
                Ok(Some(c)) => auths.push(Some(c)),
                Ok(None) => {}
                Err(e) => tracing::warn!(image, "skipping an imagePullSecret: {e}"),
            }
        }
        if auths.is_empty() {
            auths.push(None);
        }
        let mut last = None;
        for auth in auths {
            match self.images.pull(image, &skiff_runtime::PullOptions { auth, ..Default::default() }) {
                Ok(_) => return self.image(image),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map(fail).unwrap_or_else(|| RuntimeError::Failed(format!("pulling {image}: no attempt made"))))
    }

    fn image_store(&self) -> Option<ImageStore> {
        Some(self.images.clone())
    }

    fn images_in_use(&self) -> Result<std::collections::HashSet<String>, RuntimeError> {
        self.runc.images_in_use().map_err(fail)
    }

    fn run(&self, req: &ContainerRequest) -> Result<(), RuntimeError> {
        let key = ContainerKey::parse(&req.id).ok_or_else(|| RuntimeError::Failed(format!("container id {:?} is not the agent's", req.id)))?;
        let period = 100_000u64;
        let cfg = ContainerConfig {
            pod_uid: key.pod_uid.clone(),
            pod_name: req.labels.get("io.kubernetes.pod.name").cloned().unwrap_or_default(),
            pod_namespace: req.labels.get("io.kubernetes.pod.namespace").cloned().unwrap_or_default(),
            name: key.container.clone(),
            attempt: key.attempt,
            image: req.image.clone(),
            command: req.command.clone(),
            args: req.args.clone(),
            env: req.env.clone(),
            working_dir: req.working_dir.clone(),
            netns: Some(req.netns_path.clone()),
            hostname: req.hostname.clone(),
            mounts: req
                .mounts
                .iter()
                .map(|m| BindMount { host_path: m.host_path.clone(), container_path: m.container_path.clone().into(), read_only: m.read_only })
                .collect(),
            resources: Resources {
                memory_limit_bytes: req.memory_limit_bytes.map(|b| b.min(i64::MAX as u64) as i64),
                // cpu.shares as kubelet computes them: 1024 per core of request, at least 2.
                cpu_shares: req.cpu_request_millis.map(|m| (m * 1024 / 1000).max(2)),
                cpu_quota: req.cpu_limit_millis.map(|m| (m * period / 1000).max(1000) as i64),
                cpu_period: req.cpu_limit_millis.map(|_| period),
                pids_limit: None,
            },
            log_path: req.log_path.clone(),
            cgroup_parent: req.cgroup_parent.clone(),
            labels: req.labels.clone(),
            ..Default::default()
        };
        let runc_id = self.runc.create_container(&cfg).map_err(fail)?;
        if let Ok(mut ids) = self.ids.lock() {
            ids.insert(req.id.clone(), runc_id.clone());
        }
        if let Err(e) = self.runc.start(&runc_id) {
            // Keep the failed container: its state says Exited/Unknown and the planner restarts.
            return Err(fail(e));
        }
        Ok(())
    }

    fn observe(&self, id: &str) -> Result<Observed, RuntimeError> {
        let Some(rid) = self.runc_id(id)? else { return Ok(Observed::Absent) };
        Ok(match self.runc.state(&rid).map_err(fail)? {
            ContainerState::Created => Observed::Created,
            ContainerState::Running { pid, started_at } => Observed::Running {
                pid: pid.max(0) as u32,
                started_at: started_at.as_deref().and_then(parse_time).unwrap_or_else(Timestamp::now),
            },
            ContainerState::Exited { exit_code, oom_killed, started_at, finished_at, .. } => Observed::Exited {
                exit_code,
                oom_killed,
                started_at: started_at.as_deref().and_then(parse_time),
                finished_at: parse_time(&finished_at).unwrap_or_else(Timestamp::now),
            },
            // runc lost it (a reboot, a deleted state dir): the planner starts a new attempt.
            ContainerState::Unknown => Observed::Exited { exit_code: 255, oom_killed: false, started_at: None, finished_at: Timestamp::now() },
        })
    }

    fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        match self.runc_id(id)? {
            Some(rid) => self.runc.stop(&rid, grace).map_err(fail),
            None => Ok(()),
        }
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(rid) = self.runc_id(id)? {
            self.runc.remove(&rid).map_err(fail)?;
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
        let rid = self.runc_id(id)?.ok_or_else(|| RuntimeError::Failed(format!("container {id} not found")))?;
        let p = self.runc.exec(&rid, argv, tty).map_err(fail)?;
        let mut child = p.child;
        // With a tty the process's stdio is the terminal: hand its master side out as the
        // child's stdin and stdout (the contract the agent's exec endpoint relies on).
        if let Some(pty) = p.pty {
            let fd = std::os::fd::OwnedFd::from(pty);
            let out = fd.try_clone().map_err(fail)?;
            child.stdout = Some(std::process::ChildStdout::from(out));
            child.stdin = Some(std::process::ChildStdin::from(fd));
            child.stderr = None;
        }
        Ok(child)
    }
}
