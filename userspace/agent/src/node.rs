//! The agent's Node: what it registers (capacity, allocatable, addresses, node info, conditions)
//! and how it keeps it fresh (status heartbeats and the node Lease that the lifecycle controller
//! reads).
//!
//! The object building is pure (`node_object`, `ready_conditions`); `register`, `heartbeat_loop`
//! are the thin I/O around it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::{debug, info, warn};

/// The namespace node Leases live in (as kubelet's).
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How long a Lease is valid for without renewal (kubelet's default).
pub const LEASE_DURATION_SECONDS: i32 = 40;

/// What the machine offers, read once at start.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub max_pods: u32,
    pub kernel_version: String,
    pub os_image: String,
    pub machine_id: String,
    pub boot_id: String,
}

impl Machine {
    /// Reads cores, memory and identifiers from /proc and /etc (falls back to safe defaults
    /// with a warning when a file is unreadable).
    pub fn probe(max_pods: u32) -> Machine {
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| parse_meminfo_total(&s))
            .unwrap_or_else(|| {
                warn!("cannot read MemTotal from /proc/meminfo; reporting 1Gi");
                1 << 30
            });
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
        let os_image = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
            })
            .unwrap_or_else(|| "Linux".into());
        Machine {
            cpus,
            memory_bytes,
            max_pods,
            kernel_version: read("/proc/sys/kernel/osrelease"),
            os_image,
            machine_id: read("/etc/machine-id"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
        }
    }
}

/// `MemTotal:  24567890 kB` -> bytes.
pub fn parse_meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The identity and endpoints of this agent.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub name: String,
    pub ip: IpAddr,
    /// The port the agent serves logs and exec on (Node.status.daemonEndpoints.kubeletEndpoint).
    pub agent_port: u16,
    pub runtime_version: String,
    pub labels: BTreeMap<String, String>,
}

/// Memory the agent keeps back from allocatable for the system (kubelet's eviction threshold
/// default is 100Mi).
const RESERVED_MEMORY: u64 = 100 << 20;

/// The Node this agent registers: capacity, allocatable, addresses, info and Ready conditions.
pub fn node_object(id: &NodeIdentity, m: &Machine, now: Timestamp) -> Node {
    let mut labels = id.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), id.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"));
    labels.insert("beta.kubernetes.io/os".into(), "linux".into());
    let capacity = resources(m.cpus, m.memory_bytes, m.max_pods);
    let allocatable = resources(m.cpus, m.memory_bytes.saturating_sub(RESERVED_MEMORY), m.max_pods);
    Node {
        metadata: ObjectMeta { name: Some(id.name.clone()), labels: Some(labels), ..Default::default() },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            capacity: Some(capacity),
            allocatable: Some(allocatable),
            addresses: Some(vec![
                NodeAddress { type_: "InternalIP".into(), address: id.ip.to_string() },
                NodeAddress { type_: "Hostname".into(), address: id.name.clone() },
            ]),
            conditions: Some(ready_conditions(now, true, "")),
            daemon_endpoints: Some(k8s_openapi::api::core::v1::NodeDaemonEndpoints {
                kubelet_endpoint: Some(k8s_openapi::api::core::v1::DaemonEndpoint { port: id.agent_port as i32 }),
            }),
            node_info: Some(NodeSystemInfo {
                architecture: std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                boot_id: m.boot_id.clone(),
                container_runtime_version: id.runtime_version.clone(),
                kernel_version: m.kernel_version.clone(),
                kube_proxy_version: "".into(),
                kubelet_version: format!("v1.32.0-skiff-{}", env!("CARGO_PKG_VERSION")),
                machine_id: m.machine_id.clone(),
                operating_system: "linux".into(),
                os_image: m.os_image.clone(),
                system_uuid: m.machine_id.clone(),
            }),
            ..Default::default()
        }),
    }
}

fn resources(cpus: u32, memory: u64, pods: u32) -> BTreeMap<String, Quantity> {
    BTreeMap::from([
        ("cpu".to_string(), Quantity(cpus.to_string())),
        ("memory".to_string(), Quantity(format!("{}Ki", memory / 1024))),
        ("pods".to_string(), Quantity(pods.to_string())),
        ("ephemeral-storage".to_string(), Quantity("10Gi".into())),
    ])
}

/// The conditions kubelet posts. `ready` false carries `why` as its message.
pub fn ready_conditions(now: Timestamp, ready: bool, why: &str) -> Vec<NodeCondition> {
    let cond = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    };
    vec![
        cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        if ready {
            cond("Ready", "True", "KubeletReady", "skiff agent is posting ready status")
        } else {
            cond("Ready", "False", "KubeletNotReady", why)
        },
    ]
}

/// Keeps each condition's lastTransitionTime when its status did not change (so `kubectl
/// describe node` shows when a condition really changed).
pub fn carry_transitions(new: &mut [NodeCondition], old: &[NodeCondition]) {
    for c in new.iter_mut() {
        if let Some(o) = old.iter().find(|o| o.type_ == c.type_)
            && o.status == c.status
            && o.last_transition_time.is_some()
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
}

/// Creates the Node, or (when it exists: an agent restart, or a node coming back) updates its
/// labels and status. Returns the Node as stored.
pub async fn register(client: &kube::Client, node: &Node) -> anyhow::Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let name = node.metadata.name.clone().unwrap_or_default();
    match nodes.create(&PostParams::default(), node).await {
        Ok(_) => info!(node = %name, "registered Node"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let patch = json!({"metadata": {"labels": node.metadata.labels}});
            nodes.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            info!(node = %name, "Node exists; updating it");
        }
        Err(e) => return Err(e.into()),
    }
    post_status(client, &name, node.status.clone().unwrap_or_default()).await?;
    Ok(nodes.get(&name).await?)
}

/// Writes the Node's status (merge patch of the status subresource), carrying transition times.
pub async fn post_status(client: &kube::Client, name: &str, mut status: NodeStatus) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if let (Some(new), Ok(old)) = (status.conditions.as_mut(), nodes.get_status(name).await) {
        let old = old.status.and_then(|s| s.conditions).unwrap_or_default();
        carry_transitions(new, &old);
    }
    let patch = json!({"status": status});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Renews (or creates) the node Lease `kube-node-lease/<node>`.
pub async fn renew_lease(client: &kube::Client, node: &Node, now: Timestamp) -> anyhow::Result<()> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let spec = LeaseSpec {
        holder_identity: Some(name.clone()),
        lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
        renew_time: Some(MicroTime(now)),
        ..Default::default()
    };
    let patch = json!({"spec": spec});
    match leases.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: name.clone(),
                uid: node.metadata.uid.clone().unwrap_or_default(),
                ..Default::default()
            };
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    owner_references: node.metadata.uid.is_some().then(|| vec![owner]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec { acquire_time: Some(MicroTime(now)), ..spec }),
            };
            ensure_namespace(client, LEASE_NAMESPACE).await?;
            leases.create(&PostParams::default(), &lease).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates a namespace if it is missing (the node-lease namespace on a fresh cluster).
pub async fn ensure_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    // Read first: a node may read namespaces but not create them (the node authorizer), and the
    // apiserver makes kube-node-lease itself; creating is for servers that do not.
    if nss.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let ns = k8s_openapi::api::core::v1::Namespace {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        ..Default::default()
    };
    match nss.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Renews the Lease every `lease_every` and posts the Node's conditions every `status_every`
/// until `shutdown`. Failures are logged and retried on the next tick: a heartbeat that cannot
/// reach the server is exactly what the lifecycle controller is there to notice.
pub async fn heartbeat_loop(
    client: kube::Client,
    node: Node,
    lease_every: Duration,
    status_every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut lease_tick = tokio::time::interval(lease_every);
    let mut status_tick = tokio::time::interval(status_every);
    loop {
        tokio::select! {
            _ = lease_tick.tick() => {
                if let Err(e) = renew_lease(&client, &node, Timestamp::now()).await {
                    warn!(node = %name, "renewing the node lease failed: {e:#}");
                } else {
                    debug!(node = %name, "lease renewed");
                }
            }
            _ = status_tick.tick() => {
                let status = NodeStatus { conditions: Some(ready_conditions(Timestamp::now(), true, "")), ..Default::default() };
                if let Err(e) = post_status(&client, &name, status).await {
                    warn!(node = %name, "posting node status failed: {e:#}");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            cpus: 2,
            memory_bytes: 4 << 30,
            max_pods: 110,
            kernel_version: "6.18.0".into(),
            os_image: "Debian GNU/Linux 12 (bookworm)".into(),
            machine_id: "abc".into(),
            boot_id: "def".into(),
        }
    }

    #[test]
    fn meminfo_total_in_bytes() {
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\nMemTotal:  2048 kB\n"), Some(2 * 1024 * 1024));
        assert_eq!(parse_meminfo_total("MemTotal: lots\n"), None);
        assert_eq!(parse_meminfo_total(""), None);
    }

    #[test]
    fn node_carries_capacity_allocatable_addresses_and_ready() {
        let id = NodeIdentity {
            name: "node-1".into(),
            ip: "172.20.0.11".parse().unwrap(),
            agent_port: 10250,
            runtime_version: "runc://1.1.5".into(),
            labels: BTreeMap::new(),
        };
        let n = node_object(&id, &machine(), Timestamp::UNIX_EPOCH);
        let st = n.status.unwrap();
        assert_eq!(st.capacity.as_ref().unwrap()["memory"].0, format!("{}Ki", 4 << 20));
        assert_eq!(st.allocatable.as_ref().unwrap()["memory"].0, format!("{}Ki", (4u64 << 20) - (100 << 10)));
        assert_eq!(st.capacity.as_ref().unwrap()["pods"].0, "110");
        let addrs = st.addresses.unwrap();
        assert_eq!(addrs[0].type_, "InternalIP");
        assert_eq!(addrs[0].address, "172.20.0.11");
        let ready = st.conditions.unwrap().into_iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(n.metadata.labels.unwrap()["kubernetes.io/hostname"], "node-1");
        assert_eq!(st.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port, 10250);
    }

    #[test]
    fn transition_time_kept_when_status_unchanged() {
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = Timestamp::from_second(100).unwrap();
        let old = ready_conditions(t0, true, "");
        let mut same = ready_conditions(t1, true, "");
        carry_transitions(&mut same, &old);
        let r = same.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(r.last_transition_time, Some(Time(t0)));
        assert_eq!(r.last_heartbeat_time, Some(Time(t1)));
        let mut changed = ready_conditions(t1, false, "network not ready");
        carry_transitions(&mut changed, &old);
        let r = changed.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(r.last_transition_time, Some(Time(t1)));
    }
}
