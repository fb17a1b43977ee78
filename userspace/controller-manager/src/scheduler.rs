//! The scheduler loop: Node and Pod caches in, one pending pod at a time through
//! skiff-scheduler, bindings and PodScheduled=False conditions out.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use serde_json::{Value, json};
use skiff_controllers::{EventRecord, EventType, Kind, object_reference};
use skiff_scheduler::queue::{
    DEFAULT_SCHEDULER_NAME, REASON_UNSCHEDULABLE, needs_scheduling, queue_order,
};
use skiff_scheduler::{ClusterSnapshot, ScheduleError, Scheduler};
use tokio::sync::Notify;

use crate::cache::{PassTimer, until_next_pass};
use crate::controllers::{SETTLE, post_event};

const COMPONENT: &str = "default-scheduler";
/// An unschedulable pod is retried when the cluster changes, and at least this often
/// (kube-scheduler's podMaxInUnschedulablePodsDuration is 5 minutes).
const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(60);
/// How long a binding we made may stay invisible in the cache before we stop assuming it.
const ASSUME_TIMEOUT: Duration = Duration::from_secs(30);

struct Assumed {
    namespace: String,
    name: String,
    node: String,
    since: Instant,
}

#[derive(Default)]
struct State {
    /// Pods we bound that the cache does not show bound yet, by uid.
    assumed: HashMap<String, Assumed>,
    /// Pods that fit nowhere, by uid: the cluster fingerprint and time of the last attempt.
    unschedulable: HashMap<String, (u64, Instant)>,
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        )
    })
}

fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

/// What a scheduling decision depends on: the nodes (any change, including status) and which
/// pods occupy them. An unschedulable pod is retried when this changes.
fn fingerprint(nodes: &[Node], pods: &[Arc<Pod>]) -> u64 {
    let mut h = DefaultHasher::new();
    let mut node_keys: Vec<(&str, &str)> = nodes
        .iter()
        .map(|n| {
            (
                n.metadata.name.as_deref().unwrap_or(""),
                n.metadata.resource_version.as_deref().unwrap_or(""),
            )
        })
        .collect();
    node_keys.sort();
    node_keys.hash(&mut h);
    let mut bound: Vec<String> = pods
        .iter()
        .filter(|p| node_name(p).is_some())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .map(|p| uid(p))
        .collect();
    bound.sort();
    bound.hash(&mut h);
    h.finish()
}

pub(crate) async fn schedule_loop(
    client: Client,
    nodes: Store<Node>,
    pods: Store<Pod>,
    wake: Arc<Notify>,
) {
    let scheduler = Scheduler::default_plugins();
    let mut state = State::default();
    loop {
        let mut timer = PassTimer::start();
        let next = pass(&client, &scheduler, &nodes, &pods, &mut state, &mut timer).await;
        until_next_pass(&wake, next, SETTLE, timer.busy()).await;
    }
}

async fn pass(
    client: &Client,
    scheduler: &Scheduler,
    nodes: &Store<Node>,
    pods: &Store<Pod>,
    state: &mut State,
    timer: &mut PassTimer,
) -> Duration {
    // Shared, not copied: a pass that finds nothing to schedule (most of them, in a busy
    // cluster whose pods come and go) costs one look at each pod.
    let pods: Vec<Arc<Pod>> = pods.state();
    let by_uid: HashMap<String, &Pod> = pods.iter().map(|p| (uid(p), &**p)).collect();
    // Forget assumptions the cache now confirms (or that went stale).
    state.assumed.retain(|id, a| {
        by_uid
            .get(id)
            .is_some_and(|p| node_name(p).is_none() && p.metadata.deletion_timestamp.is_none())
            && a.since.elapsed() < ASSUME_TIMEOUT
    });
    let live: HashSet<&String> = by_uid.keys().collect();
    state.unschedulable.retain(|id, _| live.contains(id));
    let mut pending: Vec<&Pod> = pods
        .iter()
        .map(|p| &**p)
        .filter(|p| needs_scheduling(p, DEFAULT_SCHEDULER_NAME).is_ok())
        .filter(|p| !state.assumed.contains_key(&uid(p)))
        .collect();
    if pending.is_empty() {
        return UNSCHEDULABLE_RETRY;
    }
    pending.sort_by(|a, b| queue_order(a, b));

    let nodes: Vec<Node> = nodes.state().iter().map(|n| (**n).clone()).collect();
    let mut snapshot = ClusterSnapshot::new(&nodes, pods.iter().map(|p| &**p));
    for (id, a) in &state.assumed {
        if let Some(pod) = by_uid.get(id)
            && let Err(e) = snapshot.assume(pod, &a.node)
        {
            tracing::debug!("assumed pod {}/{}: {e}", a.namespace, a.name);
        }
    }
    let print = fingerprint(&nodes, &pods);

    let mut next = UNSCHEDULABLE_RETRY;
    for pod in pending {
        let id = uid(pod);
        if let Some((seen, at)) = state.unschedulable.get(&id)
            && *seen == print
            && at.elapsed() < UNSCHEDULABLE_RETRY
        {
            next = next.min(UNSCHEDULABLE_RETRY.saturating_sub(at.elapsed()));
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        match scheduler.schedule(pod, &snapshot) {
            Ok(result) => match timer.write(bind(client, &ns, &name, &result.node)).await {
                Ok(()) => {
                    tracing::info!("bound {ns}/{name} to {}", result.node);
                    state.unschedulable.remove(&id);
                    if let Err(e) = snapshot.assume(pod, &result.node) {
                        tracing::debug!("assume {ns}/{name}: {e}");
                    }
                    state.assumed.insert(
                        id,
                        Assumed {
                            namespace: ns,
                            name,
                            node: result.node,
                            since: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    // 409: bound by someone else meanwhile; otherwise retry on the next pass.
                    tracing::warn!("binding {ns}/{name} to {} failed: {e}", result.node);
                    next = next.min(Duration::from_secs(1));
                }
            },
            Err(ScheduleError::Unschedulable(u)) => {
                state.unschedulable.insert(id, (print, Instant::now()));
                next = next.min(UNSCHEDULABLE_RETRY);
                if let Err(e) = timer
                    .write(mark_unschedulable(client, pod, &u.message))
                    .await
                {
                    tracing::warn!("recording that {ns}/{name} is unschedulable failed: {e}");
                }
            }
            Err(e @ ScheduleError::InvalidPod { .. }) => {
                state.unschedulable.insert(id, (print, Instant::now()));
                if let Err(err) = timer
                    .write(mark_unschedulable(client, pod, &e.to_string()))
                    .await
                {
                    tracing::warn!("recording that {ns}/{name} is invalid failed: {err}");
                }
            }
        }
    }
    next
}

async fn bind(client: &Client, ns: &str, name: &str, node: &str) -> kube::Result<()> {
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": ns},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    Api::<Pod>::namespaced(client.clone(), ns)
        .create_subresource::<Value, Value>("binding", name, &PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// Sets PodScheduled=False (reason Unschedulable) and posts a FailedScheduling Event, unless
/// the pod already says exactly that (no event storm on every retry).
async fn mark_unschedulable(client: &Client, pod: &Pod, message: &str) -> kube::Result<()> {
    let current = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"));
    let same = current.is_some_and(|c| {
        c.status == "False"
            && c.reason.as_deref() == Some(REASON_UNSCHEDULABLE)
            && c.message.as_deref() == Some(message)
    });
    if same {
        return Ok(());
    }
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let now = k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now);
    // The whole conditions list with PodScheduled replaced, sent as a merge patch (no
    // resourceVersion: this is the scheduler's condition, nobody else writes it).
    let mut conditions: Vec<Value> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .filter(|c| c.type_ != "PodScheduled")
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect()
        })
        .unwrap_or_default();
    conditions.push(json!({
        "type": "PodScheduled",
        "status": "False",
        "reason": REASON_UNSCHEDULABLE,
        "message": message,
        "lastTransitionTime": serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)).unwrap_or(Value::Null),
        "lastProbeTime": Value::Null,
    }));
    let patch = json!({"status": {"conditions": conditions}});
    Api::<Pod>::namespaced(client.clone(), &ns)
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let record = EventRecord {
        involved: object_reference(Kind::Pod, &pod.metadata),
        event_type: EventType::Warning,
        reason: "FailedScheduling".to_string(),
        message: message.to_string(),
    };
    post_event(client, COMPONENT, &record).await
}
