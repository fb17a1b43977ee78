//! What the controller-manager's integration tests share: a real in-process skiff-apiserver on
//! loopback with a kube-rs client, simulated Ready Nodes, a kwok-style kubelet, and polling.
#![allow(dead_code)] // each test binary uses a different part

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

/// A running apiserver on 127.0.0.1:0 over a temporary data directory, an admin client (the
/// test's own requests and the fake kubelets) and the controller-manager's and scheduler's
/// clients with the identities `skiff server` gives them (their certificates, limited by RBAC's
/// default ClusterRoles: these tests prove those roles grant what the loops need).
pub struct Apiserver {
    pub client: Client,
    pub controller_manager: Client,
    pub scheduler: Client,
    _server: skiff_apiserver::RunningServer,
    _data: tempfile::TempDir,
}

async fn client_of(data: &std::path::Path, file: &str) -> Client {
    let text = skiff_apiserver::component_kubeconfig(data, file).expect("kubeconfig written");
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kube config");
    Client::try_from(config).expect("kube client")
}

pub async fn apiserver() -> Apiserver {
    let data = tempfile::tempdir().expect("temp data dir");
    let mut config = skiff_apiserver::ServerConfig::new(data.path().to_path_buf());
    config.bind = "127.0.0.1:0".parse().expect("loopback address");
    let server = skiff_apiserver::start(config)
        .await
        .expect("apiserver starts");
    Apiserver {
        client: client_of(data.path(), skiff_apiserver::KUBECONFIG).await,
        controller_manager: client_of(data.path(), skiff_apiserver::CONTROLLER_MANAGER_KUBECONFIG).await,
        scheduler: client_of(data.path(), skiff_apiserver::SCHEDULER_KUBECONFIG).await,
        _server: server,
        _data: data,
    }
}

/// Background tasks of a test, aborted when the test's cluster is dropped.
#[derive(Default)]
pub struct Tasks(pub Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    pub fn spawn(&mut self, f: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(f));
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The controllers (with `options`) and the scheduler, until the test ends.
pub fn start_control_plane(
    tasks: &mut Tasks,
    api: &Apiserver,
    options: skiff_controller_manager::ControllerOptions,
) {
    let c = api.controller_manager.clone();
    tasks.spawn(async move {
        skiff_controller_manager::run_controllers_with(c, options, std::future::pending::<()>())
            .await
            .expect("controllers run");
    });
    start_scheduler(tasks, api);
}

pub fn start_scheduler(tasks: &mut Tasks, api: &Apiserver) {
    let c = api.scheduler.clone();
    tasks.spawn(async move {
        skiff_controller_manager::run_scheduler(c, std::future::pending::<()>())
            .await
            .expect("scheduler runs");
    });
}

/// Polls `check` every 200 ms until it returns Ok or `limit` passes (then panics with `what` and
/// the last observation).
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match check().await {
            Ok(v) => return v,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}; last seen: {last}");
}

/// A simulated Node: its name, extra labels (it always gets kubernetes.io/hostname), taints and
/// capacity.
pub struct SimNode<'a> {
    pub name: String,
    pub labels: Vec<(&'a str, String)>,
    pub taints: Vec<Value>,
    pub cpu: &'a str,
    pub memory: &'a str,
}

/// A plain node with 8 CPUs and 16 GiB.
pub fn sim(name: &str) -> SimNode<'static> {
    SimNode {
        name: name.to_string(),
        labels: vec![],
        taints: vec![],
        cpu: "8",
        memory: "16Gi",
    }
}

/// Creates the Node and posts a Ready status with its capacity (no heartbeats follow).
pub async fn create_ready_node(client: &Client, n: &SimNode<'_>) {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = json!({
        "capacity": {"cpu": n.cpu, "memory": n.memory, "pods": "110"},
        "allocatable": {"cpu": n.cpu, "memory": n.memory, "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated node"}],
    });
    let mut labels: std::collections::BTreeMap<String, String> = n
        .labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    labels.insert("kubernetes.io/hostname".into(), n.name.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": n.name, "labels": labels},
        "spec": {"taints": n.taints},
        "status": status,
    }))
    .expect("node json");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    nodes
        .patch_status(
            &n.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .expect("node status");
}

/// "Now" as the RFC 3339 seconds the API stores.
pub fn now_seconds() -> String {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    format!("{}Z", &now[..19])
}

/// The kwok-style kubelet for every node: a bound, live pod not yet Running becomes Running and
/// Ready with a pod IP of its own (a Job's pod Succeeded at once: it "runs to completion");
/// a pod being deleted is removed at once, as an agent does once its containers stopped.
pub async fn fake_kubelet(client: Client) {
    let pods: Api<Pod> = Api::all(client.clone());
    let mut next_ip = 2u32;
    loop {
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for pod in list.items {
                let ns = pod.metadata.namespace.clone().unwrap_or_default();
                let name = pod.metadata.name.clone().unwrap_or_default();
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                if pod.metadata.deletion_timestamp.is_some() {
                    let _ = api
                        .delete(&name, &DeleteParams::default().grace_period(0))
                        .await;
                    continue;
                }
                let bound = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .is_some();
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                if !bound || matches!(phase, Some("Running" | "Succeeded")) {
                    continue;
                }
                let of_job = pod
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|r| r.kind == "Job");
                let ip = format!("10.244.{}.{}", next_ip / 250, next_ip % 250 + 2);
                next_ip += 1;
                let now = now_seconds();
                let cond =
                    |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
                let patch = json!({"status": {
                    "phase": if of_job { "Succeeded" } else { "Running" },
                    "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.0.1", "startTime": now,
                    "conditions": [cond("PodScheduled"), cond("Initialized"),
                                   cond("ContainersReady"), cond("Ready")],
                }});
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
