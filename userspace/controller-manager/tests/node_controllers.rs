//! Node IPAM, node lifecycle and leader election against a real in-process skiff-apiserver,
//! with simulated node agents (the kwok way): each renews its Lease `kube-node-lease/<node>`,
//! posts a Ready condition with a fresh lastHeartbeatTime, and marks the pods bound to it
//! Running and Ready, until the test silences it.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use skiff_controller_manager::{ControllerOptions, LeaderElection, run_leader_elected};

const WAIT: Duration = Duration::from_secs(30);
const GRACE: Duration = Duration::from_secs(3);
const TOLERATION_SECONDS: u64 = 2;
/// Leader lease duration in the election tests: long enough that "released" (next retry, 200 ms)
/// and "expired" (4 s) cannot be confused on a loaded machine.
const LEASE: Duration = Duration::from_secs(4);

mod common;

struct Cluster {
    client: Client,
    _api: common::Apiserver,
    tasks: common::Tasks,
    /// Per simulated node: whether its agent heartbeats.
    alive: BTreeMap<String, Arc<AtomicBool>>,
}

fn options() -> ControllerOptions {
    ControllerOptions {
        node_monitor_grace_period: GRACE,
        node_monitor_period: Duration::from_millis(500),
        ..ControllerOptions::default()
    }
}

/// An apiserver on 127.0.0.1:0 and `nodes` simulated nodes with their agents (no controllers).
async fn cluster(nodes: &[&str]) -> Cluster {
    let api = common::apiserver().await;
    let mut c = Cluster {
        client: api.client.clone(),
        _api: api,
        tasks: common::Tasks::default(),
        alive: BTreeMap::new(),
    };
    for name in nodes {
        add_node(&mut c, name, None).await;
    }
    c
}

async fn add_node(c: &mut Cluster, name: &str, pod_cidr: Option<&str>) {
    let nodes: Api<Node> = Api::all(c.client.clone());
    let mut spec = json!({});
    if let Some(cidr) = pod_cidr {
        spec = json!({"podCIDR": cidr, "podCIDRs": [cidr]});
    }
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": spec,
    }))
    .expect("node json");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    let alive = Arc::new(AtomicBool::new(true));
    c.alive.insert(name.to_string(), alive.clone());
    c.tasks
        .spawn(sim_agent(c.client.clone(), name.to_string(), alive));
}

use common::now_seconds;

/// One simulated node agent: Lease renewals every 300 ms, node status every second, pods
/// bound here made Running and Ready. Does nothing while `alive` is false.
async fn sim_agent(client: Client, name: String, alive: Arc<AtomicBool>) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let mut tick = 0u64;
    let mut next_ip = 2u32;
    let subnet = name.bytes().fold(0u32, |a, b| a.wrapping_add(b as u32)) % 200;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tick += 1;
        if !alive.load(Ordering::SeqCst) {
            continue;
        }
        let renew = serde_json::to_value(MicroTime(Timestamp::now())).expect("time");
        let spec = json!({"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": renew});
        if leases
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": spec})),
            )
            .await
            .is_err()
        {
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": spec,
            }))
            .expect("lease json");
            let _ = leases.create(&PostParams::default(), &lease).await;
        }
        if tick % 3 == 1 {
            let status = json!({"status": {
                "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "kubelet is posting ready status",
                                "lastHeartbeatTime": now_seconds(),
                                "lastTransitionTime": now_seconds()}],
            }});
            let _ = nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await;
        }
        let Ok(list) = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
            .await
        else {
            continue;
        };
        for pod in list.items {
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if running || pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let ip = format!("10.244.{subnet}.{next_ip}");
            next_ip += 1;
            let now = now_seconds();
            let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
            let patch = json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "hostIP": "192.168.0.1", "startTime": now,
                "conditions": [cond("PodScheduled"), cond("Initialized"),
                               cond("ContainersReady"), cond("Ready")],
            }});
            let _ = Api::<Pod>::namespaced(client.clone(), &ns)
                .patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(patch))
                .await;
        }
    }
}

/// Starts the controllers (and optionally the scheduler) with `options()` until the returned
/// sender is dropped or sent to.
fn start_controllers(
    c: &mut Cluster,
    scheduler: bool,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let client = c._api.controller_manager.clone();
    let task = tokio::spawn(async move {
        skiff_controller_manager::run_controllers_with(client, options(), async move {
            let _ = stopped.await;
        })
        .await
        .expect("controllers run");
    });
    if scheduler {
        common::start_scheduler(&mut c.tasks, &c._api);
    }
    (stop, task)
}

async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    common::wait_for(what, WAIT, check).await
}

async fn pod_cidrs(client: &Client) -> BTreeMap<String, Option<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                n.spec.and_then(|s| s.pod_cidr),
            )
        })
        .collect()
}

async fn all_assigned(client: &Client, n: usize) -> BTreeMap<String, String> {
    wait_for(&format!("{n} nodes with a podCIDR"), || async {
        let cidrs = pod_cidrs(client).await;
        let assigned: BTreeMap<String, String> = cidrs
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
            .collect();
        if assigned.len() == n {
            Ok(assigned)
        } else {
            Err(format!("{cidrs:?}"))
        }
    })
    .await
}

async fn events(client: &Client) -> Vec<Event> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_distinct_pod_cidrs_that_survive_a_restart() {
    let mut c = cluster(&["node-a", "node-b", "node-c"]).await;
    // A node that brings its own podCIDR outside the cluster CIDR is reported and left alone.
    add_node(&mut c, "odd", Some("192.168.77.0/24")).await;
    let (stop, task) = start_controllers(&mut c, false);
    let first = all_assigned(&c.client, 4).await;
    let range: ipnet::Ipv4Net = "10.244.0.0/16".parse().expect("cidr");
    let mut seen = BTreeSet::new();
    for (node, cidr) in &first {
        if node == "odd" {
            assert_eq!(cidr, "192.168.77.0/24", "left alone");
            continue;
        }
        let net: ipnet::Ipv4Net = cidr.parse().expect("a CIDR");
        assert_eq!(net.prefix_len(), 24, "{node}: {cidr}");
        assert!(range.contains(&net), "{node}: {cidr} inside 10.244.0.0/16");
        assert!(seen.insert(net), "{node}: {cidr} is not given twice");
    }
    // podCIDRs mirrors podCIDR.
    let b = Api::<Node>::all(c.client.clone())
        .get("node-b")
        .await
        .expect("node-b");
    let spec = b.spec.expect("spec");
    assert_eq!(
        spec.pod_cidrs,
        Some(vec![spec.pod_cidr.clone().expect("cidr")])
    );
    wait_for("an InvalidPodCIDR event on node odd", || async {
        let found = events(&c.client).await.into_iter().any(|e| {
            e.reason.as_deref() == Some("InvalidPodCIDR")
                && e.involved_object.name.as_deref() == Some("odd")
                && e.involved_object.kind.as_deref() == Some("Node")
                && e.type_.as_deref() == Some("Warning")
        });
        if found {
            Ok(())
        } else {
            Err("none yet".into())
        }
    })
    .await;

    // Restart: the controllers keep no state but the Nodes; a new node gets a fresh block and
    // nobody's block changes.
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("controllers stop")
        .expect("no panic");
    add_node(&mut c, "node-d", None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pod_cidrs(&c.client).await.get("node-d"),
        Some(&None),
        "nothing assigns while the controllers are down"
    );
    let (_stop, _task) = start_controllers(&mut c, false);
    let second = all_assigned(&c.client, 5).await;
    for (node, cidr) in &first {
        assert_eq!(second.get(node), Some(cidr), "{node} kept its podCIDR");
    }
    let d: ipnet::Ipv4Net = second["node-d"].parse().expect("cidr");
    assert!(!seen.contains(&d), "node-d got a block nobody holds: {d}");
    // The lowest free block: blocks 0..3 went to a, b, c.
    assert_eq!(d.to_string(), "10.244.3.0/24");
}

fn deployment(
    name: &str,
    replicas: i32,
    toleration_seconds: u64,
    node: Option<&str>,
) -> Deployment {
    let mut spec = json!({
        "terminationGracePeriodSeconds": 0,
        "tolerations": [
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": toleration_seconds},
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": toleration_seconds},
        ],
        "containers": [{"name": "web", "image": "nginx:1",
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}],
    });
    if let Some(node) = node {
        spec["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }))
    .expect("deployment json")
}

async fn live_pods(client: &Client, app: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Live, ready pods of `app` by node.
async fn ready_by_node(client: &Client, app: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for p in live_pods(client, app).await {
        if is_ready(&p) {
            *out.entry(node_of(&p)).or_insert(0) += 1;
        }
    }
    out
}

fn ready_condition(n: &Node) -> Option<(String, Option<String>, Option<String>)> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn taints(n: &Node) -> BTreeSet<(String, String)> {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key, t.effect))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_goes_not_ready_and_its_pods_come_back_elsewhere() {
    let mut c = cluster(&["node-a", "node-b", "node-c"]).await;
    let (_stop, _task) = start_controllers(&mut c, true);
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    deployments
        .create(
            &PostParams::default(),
            &deployment("web", 4, TOLERATION_SECONDS, None),
        )
        .await
        .expect("create deployment");
    let placed = wait_for("4 ready web pods", || async {
        let by_node = ready_by_node(&c.client, "web").await;
        if by_node.values().sum::<usize>() == 4 {
            Ok(by_node)
        } else {
            Err(format!("{by_node:?}"))
        }
    })
    .await;
    // The node with the most web pods dies; a pod pinned to it tolerates that for an hour.
    let (dead, on_dead) = placed
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, v)| (k.clone(), *v))
        .expect("some node");
    assert!(on_dead >= 1);
    deployments
        .create(
            &PostParams::default(),
            &deployment("sticky", 1, 3600, Some(&dead)),
        )
        .await
        .expect("create sticky deployment");
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "sticky", "namespace": "default"},
        "spec": {"selector": {"app": "sticky"}, "ports": [{"port": 80}]},
    }))
    .expect("service json");
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let sticky = wait_for("the sticky pod ready on the doomed node", || async {
        let pods = live_pods(&c.client, "sticky").await;
        match pods.as_slice() {
            [p] if is_ready(p) && node_of(p) == dead => Ok(p.clone()),
            other => Err(format!("{} pods", other.len())),
        }
    })
    .await;
    let sticky_ip = sticky
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod ip");
    let slices: Api<EndpointSlice> = Api::namespaced(c.client.clone(), "default");
    let sticky_endpoint_ready = || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=sticky"))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<Option<bool>, String>(
            list.items
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .find(|e| e.addresses.contains(&sticky_ip))
                .map(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true)),
        )
    };
    wait_for("the sticky endpoint ready", || async {
        match sticky_endpoint_ready().await? {
            Some(true) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Silence the node.
    c.alive[&dead].store(false, Ordering::SeqCst);
    let silenced = Instant::now();
    let nodes: Api<Node> = Api::all(c.client.clone());
    wait_for(
        &format!("{dead} Ready=Unknown and tainted unreachable"),
        || async {
            let n = nodes.get(&dead).await.map_err(|e| e.to_string())?;
            let ready = ready_condition(&n);
            let t = taints(&n);
            let unknown = ready
                == Some((
                    "Unknown".into(),
                    Some("NodeStatusUnknown".into()),
                    Some("Kubelet stopped posting node status.".into()),
                ));
            if unknown
                && t.contains(&("node.kubernetes.io/unreachable".into(), "NoExecute".into()))
                && t.contains(&("node.kubernetes.io/unreachable".into(), "NoSchedule".into()))
            {
                Ok(())
            } else {
                Err(format!("{ready:?} {t:?}"))
            }
        },
    )
    .await;
    let not_ready_after = silenced.elapsed();
    eprintln!("{dead} NotReady {not_ready_after:?} after its last heartbeat");
    assert!(
        not_ready_after >= GRACE - Duration::from_millis(400),
        "not before the grace period: {not_ready_after:?}"
    );
    assert!(
        not_ready_after <= GRACE + Duration::from_secs(3),
        "within the grace period (+ monitor period and slack): {not_ready_after:?}"
    );

    // Its web pods come back on the other nodes within grace + toleration (+ slack).
    wait_for("4 ready web pods, none on the dead node", || async {
        let by_node = ready_by_node(&c.client, "web").await;
        let pods = live_pods(&c.client, "web").await;
        if by_node.values().sum::<usize>() == 4
            && pods.len() == 4
            && pods.iter().all(|p| node_of(p) != dead)
        {
            Ok(())
        } else {
            Err(format!("{by_node:?}"))
        }
    })
    .await;
    let moved_after = silenced.elapsed();
    eprintln!("{on_dead} pod(s) of {dead} recreated elsewhere after {moved_after:?}");
    let bound = GRACE + Duration::from_secs(TOLERATION_SECONDS) + Duration::from_secs(6);
    assert!(
        moved_after <= bound,
        "pods recreated within grace + toleration (+ slack {bound:?}): {moved_after:?}"
    );
    assert!(
        moved_after
            >= GRACE + Duration::from_secs(TOLERATION_SECONDS) - Duration::from_millis(1500),
        "not evicted before their toleration ran out: {moved_after:?}"
    );

    // The pinned pod tolerates for an hour: still there, the same pod, but not Ready, so its
    // endpoint no longer serves.
    let pods = live_pods(&c.client, "sticky").await;
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].metadata.uid, sticky.metadata.uid, "not evicted");
    assert!(!is_ready(&pods[0]), "marked not ready");
    wait_for("the sticky endpoint not ready", || async {
        match sticky_endpoint_ready().await? {
            Some(false) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // What `kubectl describe` shows.
    let evs = events(&c.client).await;
    let has = |reason: &str, kind: &str, name: Option<&str>| {
        evs.iter().any(|e| {
            e.reason.as_deref() == Some(reason)
                && e.involved_object.kind.as_deref() == Some(kind)
                && name.is_none_or(|n| e.involved_object.name.as_deref() == Some(n))
        })
    };
    assert!(has("RegisteredNode", "Node", Some(&dead)));
    assert!(has("NodeNotReady", "Node", Some(&dead)));
    assert!(has("TaintManagerEviction", "Pod", None));
    assert!(has("NodeNotReady", "Pod", sticky.metadata.name.as_deref()));
    let node_event = evs
        .iter()
        .find(|e| {
            e.reason.as_deref() == Some("NodeNotReady")
                && e.involved_object.kind.as_deref() == Some("Node")
        })
        .expect("node event");
    assert_eq!(
        node_event.message.as_deref(),
        Some(format!("Node {dead} status is now: NodeNotReady").as_str())
    );

    // The node comes back: Ready again and its taints go.
    c.alive[&dead].store(true, Ordering::SeqCst);
    wait_for(&format!("{dead} Ready and untainted"), || async {
        let n = nodes.get(&dead).await.map_err(|e| e.to_string())?;
        let ready = ready_condition(&n);
        let t = taints(&n);
        if ready.as_ref().map(|r| r.0.as_str()) == Some("True") && t.is_empty() {
            Ok(())
        } else {
            Err(format!("{ready:?} {t:?}"))
        }
    })
    .await;
    // And it stays so (the controller does not flap it).
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    let n = nodes.get(&dead).await.expect("node");
    assert_eq!(ready_condition(&n).map(|r| r.0), Some("True".into()));
    assert!(taints(&n).is_empty());
}

/// Counts how many instances' work runs at once.
#[derive(Default)]
struct Acting {
    now: AtomicUsize,
    most: AtomicUsize,
}

struct ActingGuard(Arc<Acting>, Arc<AtomicBool>);

impl ActingGuard {
    fn enter(acting: &Arc<Acting>, mine: &Arc<AtomicBool>) -> Self {
        let n = acting.now.fetch_add(1, Ordering::SeqCst) + 1;
        acting.most.fetch_max(n, Ordering::SeqCst);
        mine.store(true, Ordering::SeqCst);
        ActingGuard(acting.clone(), mine.clone())
    }
}

impl Drop for ActingGuard {
    fn drop(&mut self) {
        self.1.store(false, Ordering::SeqCst);
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One leader-elected controller-manager; returns (leading flag, stop sender, task).
fn elected(
    c: &Cluster,
    identity: &str,
    acting: &Arc<Acting>,
) -> (
    Arc<AtomicBool>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let election = LeaderElection {
        identity: identity.to_string(),
        lease_duration: LEASE,
        renew_deadline: Duration::from_secs(3),
        retry_period: Duration::from_millis(200),
        ..LeaderElection::controller_manager()
    };
    let leading = Arc::new(AtomicBool::new(false));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let client = c._api.controller_manager.clone();
    let (acting, mine) = (acting.clone(), leading.clone());
    let task = tokio::spawn(run_leader_elected(
        client.clone(),
        election,
        async move {
            let _ = stopped.await;
        },
        move |stop| {
            let (client, acting, mine) = (client.clone(), acting.clone(), mine.clone());
            async move {
                let _guard = ActingGuard::enter(&acting, &mine);
                skiff_controller_manager::run_controllers_with(client, options(), stop).await
            }
        },
    ));
    (leading, stop, task)
}

async fn holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), "kube-system")
        .get_opt("skiff-controller-manager")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_acts_and_a_standby_takes_over() {
    let mut c = cluster(&["node-a"]).await;
    let acting = Arc::new(Acting::default());
    let (first_leading, first_stop, first_task) = elected(&c, "cm-1", &acting);
    wait_for("cm-1 leading", || async {
        if first_leading.load(Ordering::SeqCst)
            && holder(&c.client).await.as_deref() == Some("cm-1")
        {
            Ok(())
        } else {
            Err(format!("holder {:?}", holder(&c.client).await))
        }
    })
    .await;
    all_assigned(&c.client, 1).await;
    let (second_leading, second_stop, second_task) = elected(&c, "cm-2", &acting);
    // Several lease durations: the standby never acts, the leader keeps the Lease.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert!(
            !second_leading.load(Ordering::SeqCst),
            "the standby does not act"
        );
        assert!(
            first_leading.load(Ordering::SeqCst),
            "the leader keeps leading"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(holder(&c.client).await.as_deref(), Some("cm-1"));

    // A graceful stop releases the Lease: the standby takes over at its next try, well before
    // the lease duration would have run out.
    let _ = first_stop.send(());
    let stopped_at = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), first_task)
        .await
        .expect("cm-1 returns")
        .expect("no panic")
        .expect("cm-1 ends cleanly");
    assert!(
        !first_leading.load(Ordering::SeqCst),
        "cm-1's controllers stopped"
    );
    wait_for("cm-2 leading", || async {
        if second_leading.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(format!("holder {:?}", holder(&c.client).await))
        }
    })
    .await;
    assert!(
        stopped_at.elapsed() < LEASE - Duration::from_secs(1),
        "released, not expired: {:?}",
        stopped_at.elapsed()
    );
    assert_eq!(holder(&c.client).await.as_deref(), Some("cm-2"));
    // The new leader acts: a new node gets its podCIDR.
    add_node(&mut c, "node-b", None).await;
    all_assigned(&c.client, 2).await;

    // A crash (no release): a new standby takes over once the Lease goes unrenewed for its
    // duration, and the crashed instance's controllers are gone with it.
    let (third_leading, _third_stop, _third_task) = elected(&c, "cm-3", &acting);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third_leading.load(Ordering::SeqCst));
    second_task.abort();
    let crashed_at = Instant::now();
    drop(second_stop);
    wait_for("cm-3 leading", || async {
        if third_leading.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(format!("holder {:?}", holder(&c.client).await))
        }
    })
    .await;
    let took = crashed_at.elapsed();
    eprintln!("takeover after a crash: {took:?}");
    assert!(
        !second_leading.load(Ordering::SeqCst),
        "cm-2's work died with it"
    );
    assert!(
        took >= LEASE - Duration::from_millis(500),
        "waited for the lease to expire: {took:?}"
    );
    assert!(
        took < LEASE + Duration::from_secs(4),
        "took over soon after: {took:?}"
    );
    assert_eq!(holder(&c.client).await.as_deref(), Some("cm-3"));
    add_node(&mut c, "node-c", None).await;
    all_assigned(&c.client, 3).await;
    let lease = Api::<Lease>::namespaced(c.client.clone(), "kube-system")
        .get("skiff-controller-manager")
        .await
        .expect("lease");
    assert_eq!(
        lease.spec.and_then(|s| s.lease_transitions),
        Some(2),
        "cm-1 -> cm-2 -> cm-3"
    );
    assert_eq!(
        acting.most.load(Ordering::SeqCst),
        1,
        "never two acting at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_elected_scheduler_holds_its_lease_and_binds() {
    let c = cluster(&["node-a"]).await;
    let flags = skiff_controller_manager::LeaderElectionFlags {
        leader_elect: true,
        leader_elect_lease_duration: LEASE,
        leader_elect_renew_deadline: Duration::from_secs(3),
        leader_elect_retry_period: Duration::from_millis(200),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let client = c._api.scheduler.clone();
    let task = tokio::spawn(async move {
        skiff_controller_manager::run_scheduler_elected(client, &flags, async move {
            let _ = stopped.await;
        })
        .await
    });
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }))
    .expect("pod json");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    wait_for("the pod bound by the elected scheduler", || async {
        let p = pods.get("p").await.map_err(|e| e.to_string())?;
        match p.spec.and_then(|s| s.node_name) {
            Some(n) if n == "node-a" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(c.client.clone(), "kube-system");
    let lease = leases
        .get("skiff-scheduler")
        .await
        .expect("scheduler lease");
    let holder = lease.spec.and_then(|s| s.holder_identity).expect("held");
    assert!(!holder.is_empty());
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("returns on shutdown")
        .expect("no panic")
        .expect("clean");
    let released = leases.get("skiff-scheduler").await.expect("lease");
    assert_eq!(
        released.spec.and_then(|s| s.holder_identity),
        None,
        "released on shutdown"
    );
}
