//! What CRI answers mean, in plain types: container and sandbox states, and the parts of the
//! runtime's verbose `info` JSON that CRI has no field for (a sandbox's netns path, a
//! container's pid, an image's config). containerd puts them under `info["info"]`; a runtime
//! that does not leaves them None.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use super::proto;

/// A container's state as CRI reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CriContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

impl CriContainerState {
    pub fn from_proto(v: i32) -> CriContainerState {
        match proto::ContainerState::try_from(v) {
            Ok(proto::ContainerState::ContainerCreated) => CriContainerState::Created,
            Ok(proto::ContainerState::ContainerRunning) => CriContainerState::Running,
            Ok(proto::ContainerState::ContainerExited) => CriContainerState::Exited,
            _ => CriContainerState::Unknown,
        }
    }
}

/// ContainerStatus, flattened. Times are nanoseconds since the epoch (0 = not yet).
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerSummary {
    pub id: String,
    pub name: String,
    pub attempt: u32,
    pub state: CriContainerState,
    pub exit_code: i32,
    /// `OOMKilled`, `Error`, `Completed`, ... (containerd's words, which are kubelet's).
    pub reason: String,
    pub message: String,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub labels: BTreeMap<String, String>,
    pub log_path: String,
    /// The container's init pid (from the verbose info; None when not running or not given).
    pub pid: Option<u32>,
}

impl ContainerSummary {
    /// The kernel's OOM killer ended it (the memory cgroup's oom_kill, as containerd saw it).
    pub fn oom_killed(&self) -> bool {
        self.reason == "OOMKilled"
    }
}

/// PodSandboxStatus, flattened.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxSummary {
    pub id: String,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub ready: bool,
    pub created_at: i64,
    /// The sandbox's IP (from the CNI result), None until networked.
    pub ip: Option<String>,
    /// The sandbox's network namespace file (`/var/run/netns/cni-...` for containerd).
    pub netns_path: Option<PathBuf>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// An image as the runtime holds it, with the config fields a kubelet needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageSummary {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
}

fn verbose_info(info: &std::collections::HashMap<String, String>) -> Value {
    info.get("info").and_then(|s| serde_json::from_str(s).ok()).unwrap_or(Value::Null)
}

fn sorted(m: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The path of the network namespace in an OCI runtime spec (JSON).
pub fn spec_netns_path(spec: &Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

pub fn container_summary(resp: &proto::ContainerStatusResponse) -> Option<ContainerSummary> {
    let s = resp.status.as_ref()?;
    let info = verbose_info(&resp.info);
    let pid = info["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 0);
    let meta = s.metadata.clone().unwrap_or_default();
    Some(ContainerSummary {
        id: s.id.clone(),
        name: meta.name,
        attempt: meta.attempt,
        state: CriContainerState::from_proto(s.state),
        exit_code: s.exit_code,
        reason: s.reason.clone(),
        message: s.message.clone(),
        created_at: s.created_at,
        started_at: s.started_at,
        finished_at: s.finished_at,
        labels: sorted(&s.labels),
        log_path: s.log_path.clone(),
        pid,
    })
}

pub fn sandbox_summary(resp: &proto::PodSandboxStatusResponse) -> Option<SandboxSummary> {
    let s = resp.status.as_ref()?;
    let info = verbose_info(&resp.info);
    let meta = s.metadata.clone().unwrap_or_default();
    let netns_path = info["netNamespacePath"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| spec_netns_path(&info["runtimeSpec"]))
        .filter(|_| info["netNamespaceClosed"] != Value::Bool(true));
    Some(SandboxSummary {
        id: s.id.clone(),
        name: meta.name,
        uid: meta.uid,
        namespace: meta.namespace,
        attempt: meta.attempt,
        ready: s.state == proto::PodSandboxState::SandboxReady as i32,
        created_at: s.created_at,
        ip: s.network.as_ref().map(|n| n.ip.clone()).filter(|ip| !ip.is_empty()),
        netns_path,
        labels: sorted(&s.labels),
        annotations: sorted(&s.annotations),
    })
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

pub fn image_summary(resp: &proto::ImageStatusResponse) -> Option<ImageSummary> {
    let img = resp.image.as_ref()?;
    if img.id.is_empty() {
        return None;
    }
    let info = verbose_info(&resp.info);
    let cfg = &info["imageSpec"]["config"];
    Some(ImageSummary {
        id: img.id.clone(),
        repo_tags: img.repo_tags.clone(),
        entrypoint: strings(&cfg["Entrypoint"]),
        cmd: strings(&cfg["Cmd"]),
        env: strings(&cfg["Env"]),
        working_dir: cfg["WorkingDir"].as_str().filter(|s| !s.is_empty()).map(String::from),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn info(v: Value) -> HashMap<String, String> {
        [("info".to_string(), v.to_string())].into_iter().collect()
    }

    #[test]
    fn exited_oom_container_maps_with_its_code_reason_and_times() {
        let resp = proto::ContainerStatusResponse {
            status: Some(proto::ContainerStatus {
                id: "abc".into(),
                metadata: Some(proto::ContainerMetadata { name: "hog".into(), attempt: 2 }),
                state: proto::ContainerState::ContainerExited as i32,
                exit_code: 137,
                reason: "OOMKilled".into(),
                started_at: 10,
                finished_at: 20,
                ..Default::default()
            }),
            info: info(serde_json::json!({"pid": 0})),
        };
        let s = container_summary(&resp).expect("summary");
        assert_eq!((s.state, s.exit_code, s.attempt, s.name.as_str()), (CriContainerState::Exited, 137, 2, "hog"));
        assert!(s.oom_killed());
        assert_eq!((s.started_at, s.finished_at, s.pid), (10, 20, None));
        let mut r2 = resp.clone();
        if let Some(st) = r2.status.as_mut() {
            st.reason = "Error".into();
            st.state = proto::ContainerState::ContainerRunning as i32;
        }
        r2.info = info(serde_json::json!({"pid": 4242}));
        let s2 = container_summary(&r2).expect("summary");
        assert!(!s2.oom_killed());
        assert_eq!((s2.state, s2.pid), (CriContainerState::Running, Some(4242)));
        assert_eq!(CriContainerState::from_proto(99), CriContainerState::Unknown);
        assert!(container_summary(&proto::ContainerStatusResponse::default()).is_none());
    }

    #[test]
    fn sandbox_netns_comes_from_the_runtime_spec_unless_closed() {
        let spec = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1234"}]}});
        let mut resp = proto::PodSandboxStatusResponse {
            status: Some(proto::PodSandboxStatus {
                id: "sb".into(),
                metadata: Some(proto::PodSandboxMetadata { name: "p".into(), uid: "u1".into(), namespace: "ns".into(), attempt: 0 }),
                state: proto::PodSandboxState::SandboxReady as i32,
                network: Some(proto::PodSandboxNetworkStatus { ip: "10.244.1.5".into(), additional_ips: vec![] }),
                ..Default::default()
            }),
            info: info(serde_json::json!({"runtimeSpec": spec})),
            ..Default::default()
        };
        let s = sandbox_summary(&resp).expect("summary");
        assert!(s.ready);
        assert_eq!(s.ip.as_deref(), Some("10.244.1.5"));
        assert_eq!(s.netns_path, Some(PathBuf::from("/var/run/netns/cni-1234")));
        assert_eq!((s.uid.as_str(), s.namespace.as_str()), ("u1", "ns"));
        resp.info = info(serde_json::json!({"runtimeSpec": spec, "netNamespaceClosed": true}));
        if let Some(st) = resp.status.as_mut() {
            st.state = proto::PodSandboxState::SandboxNotready as i32;
            st.network = Some(proto::PodSandboxNetworkStatus::default());
        }
        let s = sandbox_summary(&resp).expect("summary");
        assert!(!s.ready && s.ip.is_none() && s.netns_path.is_none());
    }

    #[test]
    fn image_config_comes_from_the_verbose_image_spec() {
        let resp = proto::ImageStatusResponse {
            image: Some(proto::Image { id: "sha256:aa".into(), repo_tags: vec!["docker.io/skiff/echo:1.0".into()], ..Default::default() }),
            info: info(serde_json::json!({"imageSpec": {"config": {"Entrypoint": ["/e"], "Cmd": ["a", "b"], "Env": ["PATH=/bin"], "WorkingDir": "/w"}}})),
        };
        let s = image_summary(&resp).expect("image");
        assert_eq!(s.entrypoint, vec!["/e"]);
        assert_eq!(s.cmd, vec!["a", "b"]);
        assert_eq!(s.env, vec!["PATH=/bin"]);
        assert_eq!(s.working_dir.as_deref(), Some("/w"));
        // containerd answers a missing image with an empty Image, not an error.
        assert!(image_summary(&proto::ImageStatusResponse { image: Some(proto::Image::default()), info: HashMap::new() }).is_none());
        assert!(image_summary(&proto::ImageStatusResponse::default()).is_none());
    }

    #[test]
    fn endpoints_must_be_unix_socket_paths() {
        assert_eq!(super::super::socket_path("unix:///run/c.sock").ok(), Some(PathBuf::from("/run/c.sock")));
        assert_eq!(super::super::socket_path("/run/c.sock").ok(), Some(PathBuf::from("/run/c.sock")));
        assert!(super::super::socket_path("tcp://1.2.3.4:1").is_err());
        assert!(super::super::socket_path("unix://relative").is_err());
        assert!(super::super::socket_path("").is_err());
    }
}
