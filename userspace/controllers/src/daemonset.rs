//! The DaemonSet controller (Kubernetes' `pkg/controller/daemon`): one pod per eligible node.
//!
//! A node is eligible when the pod the DaemonSet would put there passes skiff-scheduler's
//! NodeAffinity filter (nodeSelector and required node affinity) and tolerates the node's
//! NoSchedule/NoExecute taints (`nodeShouldRunDaemonPod`); a pod already running stays while it
//! tolerates the NoExecute ones. Pods are created with a required node affinity on the node's
//! `metadata.name` (as Kubernetes does since 1.12) and the default scheduler binds them, plus the
//! tolerations Kubernetes adds to daemon pods (not-ready, unreachable, pressure, unschedulable).
//!
//! Updates: `RollingUpdate` (maxUnavailable, maxSurge) or `OnDelete`. A pod is "updated" when its
//! `controller-revision-hash` label is the hash of the current template. Differences from
//! Kubernetes: no ControllerRevision objects (skiff does not serve them: no `rollout history`
//! for DaemonSets; the hash is the template's own, as a Deployment's pod-template-hash), and a
//! failed daemon pod is replaced at the next pass without the back-off Kubernetes applies.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity as CoreNodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, Pod, PodTemplateSpec, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use skiff_api::selector::LabelSelector;
use skiff_scheduler::plugins::{find_untolerated_taint, node_matches_pod_selectors};
use skiff_scheduler::{NodeInfo, PodInfo};

use crate::deployment::scaled_value;
use crate::hash::pod_template_hash;
use crate::pod_util::{is_available, is_ready, phase, seconds_until_available};
use crate::replicaset::BURST_REPLICAS;
use crate::{
    Action, EventRecord, EventType, Kind, Object, Outcome, ReconcileError, SuffixSource,
    controller_owner_ref, is_controlled_by, labels_of, name_of, namespace_of, object_reference,
};

/// The label Kubernetes puts on daemon pods (there: the ControllerRevision's hash).
pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";

/// The tolerations Kubernetes adds to every daemon pod (`util.AddOrUpdateDaemonPodTolerations`).
fn default_tolerations(host_network: bool) -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.to_string()),
        operator: Some("Exists".into()),
        effect: Some(effect.to_string()),
        ..Default::default()
    };
    let mut out = vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if host_network {
        out.push(t("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    out
}

/// The template with the daemon tolerations merged in (a toleration equal to one already there
/// is not added twice).
fn with_daemon_tolerations(template: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = template.clone();
    if let Some(spec) = t.spec.as_mut() {
        let host_network = spec.host_network == Some(true);
        let list = spec.tolerations.get_or_insert_with(Vec::new);
        for tol in default_tolerations(host_network) {
            if !list
                .iter()
                .any(|x| x.key == tol.key && x.effect == tol.effect && x.operator == tol.operator)
            {
                list.push(tol);
            }
        }
    }
    t
}

/// The template pinned to `node`: its required node affinity becomes a single term matching the
/// node's name (`ReplaceDaemonSetPodNodeNameNodeAffinity`; eligibility was checked before).
fn pinned_to(template: &PodTemplateSpec, node: &str) -> PodTemplateSpec {
    let mut t = template.clone();
    if let Some(spec) = t.spec.as_mut() {
        let affinity = spec.affinity.get_or_insert_with(Affinity::default);
        let node_affinity = affinity
            .node_affinity
            .get_or_insert_with(CoreNodeAffinity::default);
        node_affinity.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: None,
                match_fields: Some(vec![NodeSelectorRequirement {
                    key: "metadata.name".into(),
                    operator: "In".into(),
                    values: Some(vec![node.to_string()]),
                }]),
            }],
        });
    }
    t
}

/// The node a daemon pod is for: where it is bound, else the node its affinity pins it to.
pub fn target_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(n.clone());
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|r| r.key == "metadata.name" && r.operator == "In")
        .and_then(|r| r.values.as_ref()?.first().cloned())
}

/// Whether the DaemonSet should have a pod on `node`: `(should_run, should_continue_running)`
/// as Kubernetes' `NodeShouldRunDaemonPod` answers.
pub fn node_should_run(template: &PodTemplateSpec, node: &Node) -> (bool, bool) {
    let name = node.metadata.name.clone().unwrap_or_default();
    let probe = Pod {
        metadata: template.metadata.clone().unwrap_or_default(),
        spec: template.spec.clone(),
        status: None,
    };
    let pod = PodInfo::new(&probe);
    let info = NodeInfo::new(node);
    // A template naming another node never runs here.
    if let Some(n) = template.spec.as_ref().and_then(|s| s.node_name.as_ref())
        && !n.is_empty()
        && *n != name
    {
        return (false, false);
    }
    if !node_matches_pod_selectors(&pod, &info) {
        return (false, false);
    }
    let schedule_blocked =
        find_untolerated_taint(&info.taints, &pod.tolerations, &["NoSchedule", "NoExecute"])
            .is_some();
    let execute_blocked =
        find_untolerated_taint(&info.taints, &pod.tolerations, &["NoExecute"]).is_some();
    (!schedule_blocked, !execute_blocked)
}

/// `(maxSurge, maxUnavailable)` in pods for `desired` scheduled nodes, and whether the strategy
/// is OnDelete.
fn strategy(
    ds: &DaemonSet,
    desired: i32,
    object: &str,
) -> Result<(i32, i32, bool), ReconcileError> {
    let spec = ds.spec.as_ref();
    let strategy = spec.and_then(|s| s.update_strategy.as_ref());
    if strategy.and_then(|s| s.type_.as_deref()) == Some("OnDelete") {
        return Ok((0, 0, true));
    }
    let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
    let invalid =
        |field: &'static str, value: &IntOrString, reason: String| ReconcileError::InvalidValue {
            object: object.to_string(),
            field,
            value: format!("{value:?}"),
            reason,
        };
    let surge_value = rolling
        .and_then(|r| r.max_surge.clone())
        .unwrap_or(IntOrString::Int(0));
    let unavailable_value = rolling
        .and_then(|r| r.max_unavailable.clone())
        .unwrap_or(IntOrString::Int(1));
    let surge = scaled_value(&surge_value, desired, true).map_err(|e| {
        invalid(
            "spec.updateStrategy.rollingUpdate.maxSurge",
            &surge_value,
            e,
        )
    })?;
    let mut unavailable = scaled_value(&unavailable_value, desired, true).map_err(|e| {
        invalid(
            "spec.updateStrategy.rollingUpdate.maxUnavailable",
            &unavailable_value,
            e,
        )
    })?;
    // Kubernetes: both zero would stall the rollout; maxUnavailable becomes 1.
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    Ok((surge.max(0), unavailable.max(0), false))
}

fn is_failed(pod: &Pod) -> bool {
    phase(pod) == "Failed"
}

fn is_updated(pod: &Pod, hash: &str) -> bool {
    labels_of(&pod.metadata)
        .get(REVISION_HASH_LABEL)
        .map(String::as_str)
        == Some(hash)
}

fn event(
    involved: &k8s_openapi::api::core::v1::ObjectReference,
    t: EventType,
    reason: &str,
    message: String,
) -> Action {
    Action::Event(EventRecord {
        involved: involved.clone(),
        event_type: t,
        reason: reason.into(),
        message,
    })
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Reconciles one DaemonSet against every Node and the pods of its namespace.
pub fn reconcile(
    ds: &DaemonSet,
    nodes: &[Node],
    pods: &[Pod],
    names: &mut dyn SuffixSource,
    now: Timestamp,
) -> Result<Outcome, ReconcileError> {
    let now = crate::whole_seconds(now);
    let namespace = namespace_of(&ds.metadata);
    let name = name_of(&ds.metadata);
    let object = format!("DaemonSet {namespace}/{name}");
    let missing = |field: &'static str| ReconcileError::MissingField {
        object: object.clone(),
        field,
    };
    let uid = ds
        .metadata
        .uid
        .clone()
        .ok_or_else(|| missing("metadata.uid"))?;
    let spec = ds.spec.as_ref().ok_or_else(|| missing("spec"))?;
    let selector = LabelSelector::from_label_selector(&spec.selector).map_err(|e| {
        ReconcileError::InvalidSelector {
            object: object.clone(),
            reason: e.to_string(),
        }
    })?;
    if selector.is_empty() {
        return Err(ReconcileError::InvalidSelector {
            object: object.clone(),
            reason: "the selector is empty and would select every pod".into(),
        });
    }
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let template = with_daemon_tolerations(&spec.template);
    let hash = pod_template_hash(&spec.template, None);
    let involved = object_reference(Kind::DaemonSet, &ds.metadata);
    let deleting = ds.metadata.deletion_timestamp.is_some();
    let mut outcome = Outcome::default();
    let mut events = Vec::new();

    // Our pods by the node they are for (pods for no node at all are deleted).
    let mut by_node: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    let mut delete: Vec<&Pod> = Vec::new();
    for pod in pods.iter().filter(|p| {
        namespace_of(&p.metadata) == namespace
            && is_controlled_by(&p.metadata, &uid)
            && p.metadata.deletion_timestamp.is_none()
    }) {
        match target_node(pod) {
            Some(node) => by_node.entry(node).or_default().push(pod),
            None => delete.push(pod),
        }
    }

    let mut desired = 0usize;
    let mut current = 0usize;
    let mut misscheduled = 0usize;
    let mut ready = 0usize;
    let mut available = 0usize;
    let mut updated = 0usize;
    // Nodes wanting a new pod, and nodes whose single old pod may be replaced.
    let mut create_on: Vec<String> = Vec::new();
    let mut old_on: Vec<(String, &Pod)> = Vec::new();
    let mut unavailable_nodes = 0usize;
    let mut node_names: BTreeSet<String> = BTreeSet::new();
    for node in nodes {
        let node_name = name_of(&node.metadata);
        node_names.insert(node_name.clone());
        let (should_run, should_continue) = node_should_run(&template, node);
        let mut here: Vec<&Pod> = by_node.remove(&node_name).unwrap_or_default();
        if !should_run && (!should_continue || here.is_empty()) {
            if !here.is_empty() {
                misscheduled += 1;
                delete.extend(here);
            }
            continue;
        }
        desired += 1;
        // Failed pods are replaced.
        let (failed, live): (Vec<&Pod>, Vec<&Pod>) = here.drain(..).partition(|p| is_failed(p));
        for pod in &failed {
            events.push(event(
                &involved,
                EventType::Warning,
                "FailedDaemonPod",
                format!(
                    "Found failed daemon pod {}/{} on node {node_name}, will try to kill it",
                    namespace,
                    name_of(&pod.metadata)
                ),
            ));
        }
        delete.extend(failed);
        let mut live = live;
        if live.is_empty() {
            if !deleting {
                create_on.push(node_name.clone());
            }
            unavailable_nodes += 1;
            continue;
        }
        current += 1;
        // Rank: updated and available first, then updated, then available, then the oldest.
        live.sort_by_key(|p| {
            (
                !(is_updated(p, &hash) && is_available(p, min_ready, now)),
                !is_updated(p, &hash),
                !is_available(p, min_ready, now),
                crate::created_second(&p.metadata).unwrap_or(i64::MAX),
                name_of(&p.metadata),
            )
        });
        let first = live[0];
        let surging = !is_available(first, min_ready, now)
            && is_updated(first, &hash)
            && live
                .iter()
                .skip(1)
                .any(|p| !is_updated(p, &hash) && is_available(p, min_ready, now));
        let keep = if surging {
            // A surge in progress: the new pod starts while the old one still serves; the old
            // one counts until the new one is available.
            let old = live
                .iter()
                .copied()
                .find(|p| !is_updated(p, &hash) && is_available(p, min_ready, now))
                .unwrap_or(first);
            delete.extend(
                live.iter()
                    .copied()
                    .filter(|p| !std::ptr::eq(*p, first) && !std::ptr::eq(*p, old)),
            );
            updated += 1;
            old
        } else {
            delete.extend(live.iter().skip(1).copied());
            first
        };
        if is_ready(keep) {
            ready += 1;
        }
        let keep_available = is_available(keep, min_ready, now);
        if keep_available {
            available += 1;
        } else {
            unavailable_nodes += 1;
        }
        if let Some(wait) = seconds_until_available(keep, min_ready, now) {
            outcome.requeue_at_most(wait);
        }
        if is_updated(keep, &hash) {
            updated += 1;
        } else if !surging {
            old_on.push((node_name.clone(), keep));
        }
    }
    // Pods for nodes that no longer exist.
    for (_, rest) in by_node {
        delete.extend(rest);
    }

    // Rolling update: replace old pods within the unavailability (or surge) budget.
    let (max_surge, max_unavailable, on_delete) = strategy(ds, count(desired), &object)?;
    if !on_delete && !deleting {
        let mut budget = usize::try_from(max_unavailable)
            .unwrap_or(0)
            .saturating_sub(unavailable_nodes);
        let mut surge_budget = usize::try_from(max_surge).unwrap_or(0);
        // Unavailable old pods go first: replacing them costs no availability.
        old_on.sort_by_key(|(_, p)| is_available(p, min_ready, now));
        for (node_name, pod) in old_on {
            if !is_available(pod, min_ready, now) {
                delete.push(pod);
            } else if surge_budget > 0 {
                // maxSurge: start the new pod next to the old one.
                surge_budget -= 1;
                create_on.push(node_name);
            } else if budget > 0 {
                budget -= 1;
                delete.push(pod);
            }
        }
    }

    let taken: BTreeSet<String> = pods.iter().map(|p| name_of(&p.metadata)).collect();
    let mut new_names = BTreeSet::new();
    for node_name in create_on.into_iter().take(BURST_REPLICAS) {
        if !node_names.contains(&node_name) {
            continue;
        }
        let pod_name = loop {
            let candidate = format!("{name}-{}", names.suffix());
            if !taken.contains(&candidate) && !new_names.contains(&candidate) {
                break candidate;
            }
        };
        new_names.insert(pod_name.clone());
        let pinned = pinned_to(&template, &node_name);
        let meta = pinned.metadata.clone().unwrap_or_default();
        let mut labels = meta.labels.unwrap_or_default();
        labels.insert(REVISION_HASH_LABEL.into(), hash.clone());
        if let Some(generation) = ds.metadata.generation {
            labels.insert("pod-template-generation".into(), generation.to_string());
        }
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(pod_name.clone()),
                generate_name: Some(format!("{name}-")),
                namespace: Some(namespace.clone()),
                labels: Some(labels),
                annotations: meta.annotations,
                finalizers: meta.finalizers,
                owner_references: Some(vec![controller_owner_ref(Kind::DaemonSet, &ds.metadata)]),
                ..Default::default()
            },
            spec: pinned.spec.clone(),
            status: None,
        };
        outcome
            .actions
            .push(Action::Create(Object::Pod(Box::new(pod))));
        events.push(event(
            &involved,
            EventType::Normal,
            "SuccessfulCreate",
            format!("Created pod: {pod_name}"),
        ));
    }
    let mut gone = BTreeSet::new();
    for pod in delete {
        let pod_name = name_of(&pod.metadata);
        if !gone.insert(pod_name.clone()) {
            continue;
        }
        outcome.actions.push(Action::Delete {
            kind: Kind::Pod,
            namespace: namespace.clone(),
            name: pod_name.clone(),
            uid: pod.metadata.uid.clone(),
        });
        events.push(event(
            &involved,
            EventType::Normal,
            "SuccessfulDelete",
            format!("Deleted pod: {pod_name}"),
        ));
    }

    let observed = ds.status.clone().unwrap_or_default();
    let status = DaemonSetStatus {
        current_number_scheduled: count(current),
        desired_number_scheduled: count(desired),
        number_misscheduled: count(misscheduled),
        number_ready: count(ready),
        number_available: Some(count(available)).filter(|n| *n != 0),
        number_unavailable: Some(count(desired.saturating_sub(available))).filter(|n| *n != 0),
        updated_number_scheduled: Some(count(updated)).filter(|n| *n != 0),
        observed_generation: ds.metadata.generation,
        collision_count: observed.collision_count,
        conditions: observed.conditions.clone(),
    };
    outcome.actions.extend(events);
    if status != observed {
        let mut next = ds.clone();
        next.status = Some(status);
        outcome
            .actions
            .push(Action::UpdateStatus(Object::DaemonSet(Box::new(next))));
    }
    Ok(outcome)
}

#[cfg(test)]
#[path = "daemonset_tests.rs"]
mod tests;
