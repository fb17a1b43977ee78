//! Node lifecycle, as Kubernetes' node lifecycle controller and NoExecute taint manager do it:
//! Node health from heartbeats, NotReady/unreachable taints, and eviction of pods that do not
//! tolerate them.
//!
//! Heartbeats: a Node is alive while its agent renews the Lease `kube-node-lease/<node>`
//! (`spec.renewTime`) or advances its Ready condition's `lastHeartbeatTime`. Like Kubernetes,
//! the controller does not compare those times with its own clock (agents' clocks drift);
//! it remembers *when it saw them change* ([`LifecycleState`], its "probe timestamp"), and a
//! Node none of whose heartbeats changed for the grace period
//! (`--node-monitor-grace-period`, 40 s by default; the startup grace, 60 s, for a Node that
//! never posted a Ready condition) gets its Ready, MemoryPressure, DiskPressure and PIDPressure
//! conditions set to Unknown (reason `NodeStatusUnknown`, "Kubelet stopped posting node status.").
//!
//! Taints follow the Ready condition: False -> `node.kubernetes.io/not-ready` NoSchedule and
//! NoExecute; Unknown -> `node.kubernetes.io/unreachable` NoSchedule and NoExecute; True -> neither.
//! Other taints are kept as they are.
//!
//! Pods of a Node whose Ready is not True get their own Ready condition set False (so
//! EndpointSlices stop sending them traffic), and pods on a Node with NoExecute taints are
//! deleted when their tolerations run out: at once if some NoExecute taint is not tolerated,
//! else `tolerationSeconds` after the taint was added (the smallest of the tolerations used;
//! never when none of them sets tolerationSeconds). Their owners (ReplicaSets, Jobs) recreate
//! them, and the scheduler keeps them off the tainted Node.
//!
//! Everything here is pure: the caller passes `now` and keeps the [`LifecycleState`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    Node, NodeCondition, ObjectReference, Pod, PodCondition, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::{EventRecord, EventType, Kind, object_reference, whole_seconds};

/// The namespace agents' heartbeat Leases live in (Kubernetes' `kube-node-lease`).
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Taint for a Node whose Ready condition is False.
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// Taint for a Node whose Ready condition is Unknown (no heartbeat within the grace period).
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// What the controller writes on the conditions it sets to Unknown.
pub const REASON_STATUS_UNKNOWN: &str = "NodeStatusUnknown";
pub const MESSAGE_STATUS_UNKNOWN: &str = "Kubelet stopped posting node status.";
pub const REASON_NEVER_UPDATED: &str = "NodeStatusNeverUpdated";
pub const MESSAGE_NEVER_UPDATED: &str = "Kubelet never posted node status.";

/// The conditions Kubernetes sets to Unknown when a Node goes silent.
const SILENT_CONDITIONS: [&str; 4] = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];

/// The controller's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleConfig {
    /// `--node-monitor-grace-period`: silence after which a Node's status is Unknown.
    pub grace_period: Duration,
    /// The same for a Node that never posted a Ready condition.
    pub startup_grace_period: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            grace_period: Duration::from_secs(40),
            startup_grace_period: Duration::from_secs(60),
        }
    }
}

/// One write the lifecycle controller wants done. The shell applies them in order and stops at
/// the first failure (later actions were decided assuming the earlier ones happened).
#[derive(Debug, Clone, PartialEq)]
pub enum NodeAction {
    /// Replace `status.conditions` (the status subresource), conditional on `resource_version`.
    SetConditions {
        node: String,
        resource_version: Option<String>,
        conditions: Vec<NodeCondition>,
    },
    /// Replace `spec.taints`, conditional on `resource_version` (or on the version a
    /// SetConditions of the same Node in the same outcome produced).
    SetTaints {
        node: String,
        resource_version: Option<String>,
        taints: Vec<Taint>,
    },
    /// Write this pod's status (its Ready condition is now False), conditional on its
    /// resourceVersion.
    MarkPodNotReady(Box<Pod>),
    /// Delete the pod (uid precondition); its owner recreates it elsewhere.
    EvictPod {
        namespace: String,
        name: String,
        uid: Option<String>,
    },
    Event(EventRecord),
}

/// What one reconcile of one Node decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeOutcome {
    pub actions: Vec<NodeAction>,
    /// Reconcile this Node again after this long even without a change (the grace period
    /// running out, a toleration expiring).
    pub requeue_after: Option<Duration>,
}

impl NodeOutcome {
    fn requeue_at_most(&mut self, ms: i64) {
        let d = Duration::from_millis(ms.max(1) as u64);
        self.requeue_after = Some(self.requeue_after.map_or(d, |r| r.min(d)));
    }
}

/// What the controller saw of one Node, in its own time (milliseconds of `now`).
#[derive(Debug, Clone)]
struct NodeHealth {
    uid: Option<String>,
    heartbeat: Option<Timestamp>,
    lease_renew: Option<Timestamp>,
    /// When a heartbeat was last seen changing.
    probe_ms: i64,
    /// The Ready status after the last reconcile (for the NodeNotReady event on transition).
    ready: Option<String>,
    /// First sight of NoExecute taints that carry no timeAdded: (key, value) -> ms.
    taint_seen: BTreeMap<(String, String), i64>,
    /// Pods (uid) already marked not ready / evicted, so a stale cache does not repeat events.
    marked: BTreeSet<String>,
    evicted: BTreeSet<String>,
}

/// What the controller remembers between passes; one per controller (leader) lifetime.
#[derive(Debug, Clone, Default)]
pub struct LifecycleState {
    nodes: BTreeMap<String, NodeHealth>,
}

impl LifecycleState {
    /// Milliseconds since the Node's heartbeat was last seen changing, if the Node is known.
    pub fn silent_for(&self, node: &str, now: Timestamp) -> Option<Duration> {
        let h = self.nodes.get(node)?;
        Some(Duration::from_millis(
            (now.as_millisecond() - h.probe_ms).max(0) as u64,
        ))
    }
}

fn node_reference(name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.to_string()),
        uid,
        ..ObjectReference::default()
    }
}

fn node_event(name: &str, uid: Option<String>, reason: &str, message: String) -> NodeAction {
    NodeAction::Event(EventRecord {
        involved: node_reference(name, uid),
        event_type: EventType::Normal,
        reason: reason.to_string(),
        message,
    })
}

fn condition<'a>(conditions: &'a [NodeCondition], type_: &str) -> Option<&'a NodeCondition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Kubernetes' `Toleration.ToleratesTaint`.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if toleration
        .effect
        .as_deref()
        .is_some_and(|e| !e.is_empty() && e != taint.effect)
    {
        return false;
    }
    if toleration
        .key
        .as_deref()
        .is_some_and(|k| !k.is_empty() && k != taint.key)
    {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "" | "Equal" => {
            toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        _ => false,
    }
}

/// When a pod on a Node with these NoExecute taints must be evicted, in ms: `Some(start)` for
/// "now" when a taint is not tolerated, `None` when tolerated forever. `added_ms` gives each
/// taint's time added.
fn eviction_deadline_ms(
    pod: &Pod,
    no_execute: &[Taint],
    added_ms: impl Fn(&Taint) -> i64,
    now_ms: i64,
) -> Option<i64> {
    if no_execute.is_empty() {
        return None;
    }
    let tolerations: &[Toleration] = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[]);
    let mut min_seconds: Option<i64> = None;
    for taint in no_execute {
        // Like Kubernetes, the first toleration that matches a taint is the one used.
        let Some(used) = tolerations.iter().find(|t| tolerates(t, taint)) else {
            return Some(now_ms);
        };
        if let Some(s) = used.toleration_seconds {
            min_seconds = Some(min_seconds.map_or(s, |m| m.min(s)));
        }
    }
    let seconds = min_seconds?;
    // The clock starts when the pod's Node first got a NoExecute taint it still has.
    let start = no_execute.iter().map(&added_ms).min().unwrap_or(now_ms);
    Some(start + seconds.max(0) * 1000)
}

fn pod_ready(pod: &Pod) -> Option<&PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
}

/// Decides for one Node. `lease` is `kube-node-lease/<node>` if it exists; `pods` are the pods
/// bound to this Node (`spec.nodeName`), by reference (the controller-manager passes its
/// cache's shared pods without copying them).
pub fn reconcile<'a>(
    state: &mut LifecycleState,
    config: &LifecycleConfig,
    node: &Node,
    lease: Option<&Lease>,
    pods: impl IntoIterator<Item = &'a Pod, IntoIter: Clone>,
    now: Timestamp,
) -> NodeOutcome {
    let pods = pods.into_iter();
    let mut out = NodeOutcome::default();
    let Some(name) = node.metadata.name.clone() else {
        return out;
    };
    let now_ms = now.as_millisecond();
    let now_time = Time(whole_seconds(now));
    let conditions: Vec<NodeCondition> = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let ready = condition(&conditions, "Ready");
    let heartbeat = ready
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    let lease_renew = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let created_ms = node
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now_ms, |t| t.0.as_millisecond());

    // A new uid under a known name is a new Node: start over.
    if state
        .nodes
        .get(&name)
        .is_some_and(|h| h.uid != node.metadata.uid)
    {
        state.nodes.remove(&name);
    }
    let health = state.nodes.entry(name.clone()).or_insert_with(|| {
        out.actions.push(node_event(
            &name,
            node.metadata.uid.clone(),
            "RegisteredNode",
            format!("Node {name} event: Registered Node {name} in Controller"),
        ));
        NodeHealth {
            uid: node.metadata.uid.clone(),
            heartbeat,
            lease_renew: None,
            // Kubernetes: a Node that never posted Ready is timed from its creation; one seen
            // for the first time with a Ready condition gets a full grace period from now.
            probe_ms: if ready.is_some() { now_ms } else { created_ms },
            ready: ready.map(|c| c.status.clone()),
            taint_seen: BTreeMap::new(),
            marked: BTreeSet::new(),
            evicted: BTreeSet::new(),
        }
    });
    if heartbeat.is_some() && heartbeat != health.heartbeat {
        health.heartbeat = heartbeat;
        health.probe_ms = now_ms;
    }
    if let Some(renew) = lease_renew
        && health.lease_renew.is_none_or(|seen| seen < renew)
    {
        health.lease_renew = Some(renew);
        health.probe_ms = now_ms;
    }

    // Status: Unknown once silent for longer than the grace period.
    let grace_ms = if ready.is_some() {
        config.grace_period.as_millis() as i64
    } else {
        config.startup_grace_period.as_millis() as i64
    };
    let silent_ms = now_ms - health.probe_ms;
    let mut new_conditions = conditions.clone();
    if silent_ms > grace_ms {
        for type_ in SILENT_CONDITIONS {
            match new_conditions.iter_mut().find(|c| c.type_ == type_) {
                Some(c) if c.status != "Unknown" => {
                    c.status = "Unknown".into();
                    c.reason = Some(REASON_STATUS_UNKNOWN.into());
                    c.message = Some(MESSAGE_STATUS_UNKNOWN.into());
                    c.last_transition_time = Some(now_time.clone());
                }
                Some(_) => {}
                None => new_conditions.push(NodeCondition {
                    type_: type_.to_string(),
                    status: "Unknown".into(),
                    reason: Some(REASON_NEVER_UPDATED.into()),
                    message: Some(MESSAGE_NEVER_UPDATED.into()),
                    last_heartbeat_time: node.metadata.creation_timestamp.clone(),
                    last_transition_time: Some(now_time.clone()),
                }),
            }
        }
    } else {
        out.requeue_at_most(grace_ms - silent_ms + 1);
    }
    if new_conditions != conditions {
        out.actions.push(NodeAction::SetConditions {
            node: name.clone(),
            resource_version: node.metadata.resource_version.clone(),
            conditions: new_conditions.clone(),
        });
    }
    let ready_status = condition(&new_conditions, "Ready").map(|c| c.status.clone());
    let went_not_ready =
        health.ready.as_deref() == Some("True") && ready_status.as_deref() != Some("True");
    health.ready = ready_status.clone();

    // Taints follow Ready.
    let wanted: &[(&str, &str)] = match ready_status.as_deref() {
        Some("False") => &[
            (TAINT_NOT_READY, "NoSchedule"),
            (TAINT_NOT_READY, "NoExecute"),
        ],
        Some("Unknown") => &[
            (TAINT_UNREACHABLE, "NoSchedule"),
            (TAINT_UNREACHABLE, "NoExecute"),
        ],
        _ => &[],
    };
    let taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let managed = |t: &Taint| {
        (t.key == TAINT_NOT_READY || t.key == TAINT_UNREACHABLE)
            && (t.effect == "NoSchedule" || t.effect == "NoExecute")
    };
    let mut new_taints: Vec<Taint> = taints
        .iter()
        .filter(|t| !managed(t) || wanted.iter().any(|(k, e)| t.key == *k && t.effect == *e))
        .cloned()
        .collect();
    for (key, effect) in wanted {
        if !new_taints
            .iter()
            .any(|t| t.key == *key && t.effect == *effect)
        {
            new_taints.push(Taint {
                key: key.to_string(),
                effect: effect.to_string(),
                time_added: Some(now_time.clone()),
                value: None,
            });
        }
    }
    if new_taints != taints {
        out.actions.push(NodeAction::SetTaints {
            node: name.clone(),
            resource_version: node.metadata.resource_version.clone(),
            taints: new_taints.clone(),
        });
    }
    if went_not_ready {
        out.actions.push(node_event(
            &name,
            node.metadata.uid.clone(),
            "NodeNotReady",
            format!("Node {name} status is now: NodeNotReady"),
        ));
    }

    // Eviction by NoExecute taints.
    let no_execute: Vec<Taint> = new_taints
        .iter()
        .filter(|t| t.effect == "NoExecute")
        .cloned()
        .collect();
    let taint_key = |t: &Taint| (t.key.clone(), t.value.clone().unwrap_or_default());
    health.taint_seen.retain(|k, _| {
        no_execute
            .iter()
            .any(|t| taint_key(t) == *k && t.time_added.is_none())
    });
    for t in no_execute.iter().filter(|t| t.time_added.is_none()) {
        health.taint_seen.entry(taint_key(t)).or_insert(now_ms);
    }
    let seen = health.taint_seen.clone();
    let added_ms = |t: &Taint| match &t.time_added {
        Some(at) => at.0.as_millisecond(),
        None => seen.get(&taint_key(t)).copied().unwrap_or(now_ms),
    };
    let present: BTreeSet<String> = pods
        .clone()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    health.evicted.retain(|uid| present.contains(uid));
    health.marked.retain(|uid| present.contains(uid));
    let mut evicted_now: BTreeSet<String> = BTreeSet::new();
    let mut pod_actions = Vec::new();
    for pod in pods.clone() {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if health.evicted.contains(&uid) {
            continue;
        }
        let Some(deadline) = eviction_deadline_ms(pod, &no_execute, added_ms, now_ms) else {
            continue;
        };
        if deadline > now_ms {
            out.requeue_at_most(deadline - now_ms);
            continue;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        pod_actions.push(NodeAction::Event(EventRecord {
            involved: object_reference(Kind::Pod, &pod.metadata),
            event_type: EventType::Normal,
            reason: "TaintManagerEviction".into(),
            message: format!("Marking for deletion Pod {ns}/{pod_name}"),
        }));
        pod_actions.push(NodeAction::EvictPod {
            namespace: ns,
            name: pod_name,
            uid: pod.metadata.uid.clone(),
        });
        health.evicted.insert(uid.clone());
        evicted_now.insert(uid);
    }

    // Pods of a not-ready Node stop being Ready (the agent sets them Ready again when it is back).
    if ready_status.as_deref() == Some("True") {
        health.marked.clear();
    } else if ready_status.is_some() {
        for pod in pods {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if evicted_now.contains(&uid) || health.marked.contains(&uid) {
                continue;
            }
            if pod_ready(pod).is_none_or(|c| c.status != "True") {
                continue;
            }
            let mut marked = pod.clone();
            if let Some(c) = marked
                .status
                .as_mut()
                .and_then(|s| s.conditions.as_mut())
                .and_then(|cs| cs.iter_mut().find(|c| c.type_ == "Ready"))
            {
                c.status = "False".into();
                c.last_transition_time = Some(now_time.clone());
            }
            out.actions
                .push(NodeAction::MarkPodNotReady(Box::new(marked)));
            out.actions.push(NodeAction::Event(EventRecord {
                involved: object_reference(Kind::Pod, &pod.metadata),
                event_type: EventType::Warning,
                reason: "NodeNotReady".into(),
                message: "Node is not ready".into(),
            }));
            health.marked.insert(uid);
        }
    }
    out.actions.extend(pod_actions);
    out
}

/// Forgets Nodes that are gone (a `RemovingNode` Event for each), so a later Node of the same
/// name starts fresh.
pub fn forget_gone(state: &mut LifecycleState, nodes: &[Node]) -> Vec<NodeAction> {
    let present: BTreeSet<&str> = nodes
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    let gone: Vec<String> = state
        .nodes
        .keys()
        .filter(|n| !present.contains(n.as_str()))
        .cloned()
        .collect();
    gone.into_iter()
        .filter_map(|name| {
            let health = state.nodes.remove(&name)?;
            Some(node_event(
                &name,
                health.uid,
                "RemovingNode",
                format!("Node {name} event: Removing Node {name} from Controller"),
            ))
        })
        .collect()
}

#[cfg(test)]
#[path = "node_lifecycle_tests.rs"]
mod tests;
