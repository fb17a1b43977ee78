//! The ReplicaSet controller (Kubernetes' `pkg/controller/replicaset`): keep `spec.replicas`
//! active pods, adopt matching orphans, release pods that stopped matching, and publish status.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use skiff_api::selector::LabelSelector;

use crate::pod_util::{deletion_order, is_active, is_available, is_ready, seconds_until_available};
use crate::{
    Action, EventRecord, EventType, Kind, Object, Outcome, ReconcileError, SuffixSource,
    controller_of, controller_owner_ref, labels_of, name_of, namespace_of, object_reference,
};

/// Kubernetes' `BurstReplicas`: at most this many creates or deletes per reconcile.
pub const BURST_REPLICAS: usize = 500;

/// Longest prefix Kubernetes' name generator keeps (63 - 5 random characters).
const MAX_GENERATED_PREFIX: usize = 58;

/// Reconciles one ReplicaSet. `pods` are the pods of its namespace (any owner); `names` supplies
/// the random suffixes of new pod names.
pub fn reconcile(
    rs: &ReplicaSet,
    pods: &[Pod],
    names: &mut dyn SuffixSource,
    now: Timestamp,
) -> Result<Outcome, ReconcileError> {
    let now = crate::whole_seconds(now);
    let namespace = namespace_of(&rs.metadata);
    let name = name_of(&rs.metadata);
    let missing = |field: &'static str| ReconcileError::MissingField {
        object: format!("ReplicaSet {namespace}/{name}"),
        field,
    };
    let uid = rs
        .metadata
        .uid
        .clone()
        .ok_or_else(|| missing("metadata.uid"))?;
    let spec = rs.spec.as_ref().ok_or_else(|| missing("spec"))?;
    let template = spec
        .template
        .as_ref()
        .ok_or_else(|| missing("spec.template"))?;
    let selector = LabelSelector::from_label_selector(&spec.selector).map_err(|e| {
        ReconcileError::InvalidSelector {
            object: format!("ReplicaSet {namespace}/{name}"),
            reason: e.to_string(),
        }
    })?;
    if selector.is_empty() {
        return Err(ReconcileError::InvalidSelector {
            object: format!("ReplicaSet {namespace}/{name}"),
            reason: "the selector is empty and would select every pod".into(),
        });
    }
    let replicas = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let deleting = rs.metadata.deletion_timestamp.is_some();
    let involved = object_reference(Kind::ReplicaSet, &rs.metadata);
    let mut outcome = Outcome::default();
    let mut events = Vec::new();

    // Claim: owned active pods that still match, plus adoptable orphans.
    let mut claimed: Vec<Pod> = Vec::new();
    for pod in pods
        .iter()
        .filter(|p| namespace_of(&p.metadata) == namespace && is_active(p))
    {
        let matches = selector.matches(&labels_of(&pod.metadata));
        match controller_of(&pod.metadata) {
            Some(owner) if owner.uid == uid => {
                if matches || deleting {
                    claimed.push(pod.clone());
                } else {
                    // Release: drop our ownerReference, the pod lives on unowned.
                    let mut released = pod.clone();
                    if let Some(refs) = released.metadata.owner_references.as_mut() {
                        refs.retain(|r| r.uid != uid);
                    }
                    outcome
                        .actions
                        .push(Action::Update(Object::Pod(Box::new(released))));
                }
            }
            None if matches && !deleting => {
                let mut adopted = pod.clone();
                adopted
                    .metadata
                    .owner_references
                    .get_or_insert_with(Vec::new)
                    .push(controller_owner_ref(Kind::ReplicaSet, &rs.metadata));
                outcome
                    .actions
                    .push(Action::Update(Object::Pod(Box::new(adopted.clone()))));
                claimed.push(adopted);
            }
            _ => {}
        }
    }

    if !deleting {
        if claimed.len() < replicas {
            let taken: BTreeSet<String> = pods.iter().map(|p| name_of(&p.metadata)).collect();
            let mut prefix = format!("{name}-");
            if prefix.len() > MAX_GENERATED_PREFIX {
                let mut cut = MAX_GENERATED_PREFIX;
                while !prefix.is_char_boundary(cut) {
                    cut -= 1;
                }
                prefix.truncate(cut);
            }
            let mut new_names = BTreeSet::new();
            for _ in 0..(replicas - claimed.len()).min(BURST_REPLICAS) {
                let pod_name = loop {
                    let candidate = format!("{prefix}{}", names.suffix());
                    if !taken.contains(&candidate) && !new_names.contains(&candidate) {
                        break candidate;
                    }
                };
                new_names.insert(pod_name.clone());
                let meta = template.metadata.clone().unwrap_or_default();
                let pod = Pod {
                    metadata: ObjectMeta {
                        name: Some(pod_name.clone()),
                        generate_name: Some(prefix.clone()),
                        namespace: Some(namespace.clone()),
                        labels: meta.labels,
                        annotations: meta.annotations,
                        finalizers: meta.finalizers,
                        owner_references: Some(vec![controller_owner_ref(
                            Kind::ReplicaSet,
                            &rs.metadata,
                        )]),
                        ..Default::default()
                    },
                    spec: template.spec.clone(),
                    status: None,
                };
                outcome
                    .actions
                    .push(Action::Create(Object::Pod(Box::new(pod))));
                events.push(event(
                    &involved,
                    "SuccessfulCreate",
                    format!("Created pod: {pod_name}"),
                ));
            }
        } else if claimed.len() > replicas {
            let diff = (claimed.len() - replicas).min(BURST_REPLICAS);
            for pod in pods_to_delete(&claimed, diff) {
                let pod_name = name_of(&pod.metadata);
                outcome.actions.push(Action::Delete {
                    kind: Kind::Pod,
                    namespace: namespace.clone(),
                    name: pod_name.clone(),
                    uid: pod.metadata.uid.clone(),
                });
                events.push(event(
                    &involved,
                    "SuccessfulDelete",
                    format!("Deleted pod: {pod_name}"),
                ));
            }
        }
    }

    // Status from the observed pods, as Kubernetes' calculateStatus.
    let template_labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let fully_labeled = claimed
        .iter()
        .filter(|p| {
            let labels = labels_of(&p.metadata);
            template_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .count();
    let ready = claimed.iter().filter(|p| is_ready(p)).count();
    let available = claimed
        .iter()
        .filter(|p| is_available(p, min_ready, now))
        .count();
    for pod in &claimed {
        if let Some(wait) = seconds_until_available(pod, min_ready, now) {
            outcome.requeue_at_most(wait);
        }
    }
    let observed = rs.status.clone().unwrap_or_default();
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let status = ReplicaSetStatus {
        replicas: count(claimed.len()),
        fully_labeled_replicas: Some(count(fully_labeled)),
        ready_replicas: Some(count(ready)),
        available_replicas: Some(count(available)),
        observed_generation: rs.metadata.generation,
        conditions: observed.conditions.clone(),
    };
    outcome.actions.extend(events);
    if status != observed {
        let mut updated = rs.clone();
        updated.status = Some(status);
        outcome
            .actions
            .push(Action::UpdateStatus(Object::ReplicaSet(Box::new(updated))));
    }
    Ok(outcome)
}

fn event(
    involved: &k8s_openapi::api::core::v1::ObjectReference,
    reason: &str,
    message: String,
) -> Action {
    Action::Event(EventRecord {
        involved: involved.clone(),
        event_type: EventType::Normal,
        reason: reason.into(),
        message,
    })
}

/// Kubernetes' `getPodsToDelete`: the first `diff` pods in [`deletion_order`]. A pod's rank is
/// how many of these pods share its node. Kubernetes also counts the pods of sibling ReplicaSets
/// (other revisions of the same Deployment); this function sees one ReplicaSet's pods only, which
/// changes the order only between pods that tie on every earlier criterion.
pub fn pods_to_delete(claimed: &[Pod], diff: usize) -> Vec<&Pod> {
    let node_of = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default()
    };
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in claimed {
        *per_node.entry(node_of(p)).or_default() += 1;
    }
    let mut ranked: Vec<(&Pod, usize)> = claimed
        .iter()
        .map(|p| (p, per_node.get(&node_of(p)).copied().unwrap_or(0)))
        .collect();
    if diff < ranked.len() {
        ranked.sort_by(|(a, ra), (b, rb)| deletion_order(a, *ra, b, *rb));
    }
    ranked.into_iter().take(diff).map(|(p, _)| p).collect()
}

#[cfg(test)]
#[path = "replicaset_tests.rs"]
mod tests;
