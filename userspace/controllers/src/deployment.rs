//! The Deployment controller, following Kubernetes' `pkg/controller/deployment` step for step
//! (`syncDeployment`, `rolloutRolling`, `rolloutRecreate`, `sync`/`scale`, `cleanupDeployment`,
//! `syncRolloutStatus`), so that `kubectl rollout status|history|undo|restart|pause|resume` read
//! and drive it exactly as they do a Kubernetes cluster.
//!
//! One reconcile produces every write of one Kubernetes sync at once: the ReplicaSet create and
//! scale updates, the Deployment's revision annotation, Events, and a single status write.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentSpec, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector as MetaSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use skiff_api::selector::LabelSelector;

use crate::hash::{POD_TEMPLATE_HASH_LABEL, pod_template_hash, templates_equal};
use crate::{
    Action, EventRecord, EventType, Kind, Object, Outcome, ReconcileError, controller_of,
    controller_owner_ref, created_second, labels_of, name_of, namespace_of, object_reference, time,
};

pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
pub const REVISION_HISTORY_ANNOTATION: &str = "deployment.kubernetes.io/revision-history";
pub const DESIRED_REPLICAS_ANNOTATION: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS_ANNOTATION: &str = "deployment.kubernetes.io/max-replicas";
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";
const DEPRECATED_ROLLBACK_TO: &str = "deprecated.deployment.rollback.to";

// Condition types and reasons, exactly as `kubectl rollout status` and `describe` read them.
pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const MIN_REPLICAS_AVAILABLE: &str = "MinimumReplicasAvailable";
pub const MIN_REPLICAS_UNAVAILABLE: &str = "MinimumReplicasUnavailable";
pub const NEW_RS_CREATED: &str = "NewReplicaSetCreated";
pub const FOUND_NEW_RS: &str = "FoundNewReplicaSet";
pub const RS_UPDATED: &str = "ReplicaSetUpdated";
pub const NEW_RS_AVAILABLE: &str = "NewReplicaSetAvailable";
pub const TIMED_OUT: &str = "ProgressDeadlineExceeded";
pub const PAUSED: &str = "DeploymentPaused";
pub const RESUMED: &str = "DeploymentResumed";

/// The rollout strategy after defaults (maxSurge/maxUnavailable 25% each).
#[derive(Debug, Clone, PartialEq)]
enum Strategy {
    Recreate,
    RollingUpdate {
        max_surge: IntOrString,
        max_unavailable: IntOrString,
    },
}

/// Kubernetes' `GetScaledValueFromIntOrPercent`: percentages of `total`, rounded up (surge) or
/// down (unavailable).
pub fn scaled_value(value: &IntOrString, total: i32, round_up: bool) -> Result<i32, String> {
    match value {
        IntOrString::Int(i) => Ok(*i),
        IntOrString::String(s) => {
            let percent = s
                .strip_suffix('%')
                .and_then(|p| p.parse::<i64>().ok())
                .ok_or_else(|| {
                    format!("{s:?} is neither an integer nor a percentage like \"25%\"")
                })?;
            let product = percent * i64::from(total);
            let scaled = if round_up {
                (product + 99).div_euclid(100)
            } else {
                product.div_euclid(100)
            };
            i32::try_from(scaled).map_err(|_| format!("{s:?} of {total} is out of range"))
        }
    }
}

/// Kubernetes' `ResolveFenceposts`: `(maxSurge, maxUnavailable)` in pods for `desired` replicas.
/// If rounding makes both zero, maxUnavailable becomes 1 so the rollout can move.
pub fn resolve_fenceposts(
    max_surge: &IntOrString,
    max_unavailable: &IntOrString,
    desired: i32,
) -> Result<(i32, i32), String> {
    let surge = scaled_value(max_surge, desired, true)?;
    let mut unavailable = scaled_value(max_unavailable, desired, false)?;
    if surge < 0 || unavailable < 0 {
        return Err("maxSurge and maxUnavailable must not be negative".into());
    }
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    Ok((surge, unavailable))
}

fn is_zero(v: &IntOrString) -> bool {
    match v {
        IntOrString::Int(i) => *i == 0,
        IntOrString::String(s) => s == "0%" || s == "0",
    }
}

fn rs_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

fn rs_status_replicas(rs: &ReplicaSet) -> i32 {
    rs.status.as_ref().map(|s| s.replicas).unwrap_or(0)
}

fn rs_available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

fn rs_ready(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The revision of a ReplicaSet (0 when absent or unparsable, as Kubernetes' `Revision`).
pub fn revision(rs: &ReplicaSet) -> i64 {
    annotation(&rs.metadata, REVISION_ANNOTATION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn set_annotation(meta: &mut ObjectMeta, key: &str, value: String) -> bool {
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    if annotations.get(key) == Some(&value) {
        return false;
    }
    annotations.insert(key.to_string(), value);
    true
}

/// Kubernetes' `ReplicaSetsByCreationTimestamp` key: oldest first, then by name. An RS without a
/// creation time (just created by this reconcile) is the newest.
fn creation_key(rs: &ReplicaSet) -> (i64, String) {
    (
        created_second(&rs.metadata).unwrap_or(i64::MAX),
        name_of(&rs.metadata),
    )
}

fn new_condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    now: Timestamp,
) -> DeploymentCondition {
    DeploymentCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message),
        last_update_time: Some(time(now)),
        last_transition_time: Some(time(now)),
    }
}

fn get_condition<'a>(status: &'a DeploymentStatus, type_: &str) -> Option<&'a DeploymentCondition> {
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == type_)
}

fn remove_condition(status: &mut DeploymentStatus, type_: &str) {
    if let Some(conditions) = status.conditions.as_mut() {
        conditions.retain(|c| c.type_ != type_);
    }
}

/// Kubernetes' `SetDeploymentCondition`: no-op when status and reason are unchanged; keeps the
/// transition time when only the reason changes.
fn set_condition(status: &mut DeploymentStatus, mut condition: DeploymentCondition) {
    if let Some(current) = get_condition(status, &condition.type_) {
        if current.status == condition.status && current.reason == condition.reason {
            return;
        }
        if current.status == condition.status {
            condition.last_transition_time = current.last_transition_time.clone();
        }
    }
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    conditions.retain(|c| c.type_ != condition.type_);
    conditions.push(condition);
}

struct Sync<'a> {
    d: &'a Deployment,
    spec: &'a DeploymentSpec,
    namespace: String,
    name: String,
    replicas: i32,
    strategy: Strategy,
    now: Timestamp,
    /// Owned ReplicaSets, working copies (spec and annotations changed in place).
    rss: Vec<ReplicaSet>,
    /// Indices of `rss` to write back with Update, in first-change order.
    dirty: Vec<usize>,
    /// Index of the ReplicaSet this reconcile creates.
    created: Option<usize>,
    /// Index of the new ReplicaSet (template equal to the Deployment's).
    new_rs: Option<usize>,
    /// Working copy of the Deployment's status: observed counts, conditions as changed so far.
    status: DeploymentStatus,
    deployment_annotations: Option<BTreeMap<String, String>>,
    other_actions: Vec<Action>,
    events: Vec<Action>,
    /// Skip every other write and only publish the status (hash collision found).
    status_only: bool,
}

/// Reconciles one Deployment.
///
/// `replica_sets` and `pods` are those of the Deployment's namespace (any owner): ReplicaSets
/// controlled by the Deployment are managed, orphans matching its selector are adopted, and pods
/// are only consulted by Recreate (no new pod may start while an old one still runs).
pub fn reconcile(
    d: &Deployment,
    replica_sets: &[ReplicaSet],
    pods: &[Pod],
    now: Timestamp,
) -> Result<Outcome, ReconcileError> {
    let now = crate::whole_seconds(now);
    let namespace = namespace_of(&d.metadata);
    let name = name_of(&d.metadata);
    let missing = |field: &'static str| ReconcileError::MissingField {
        object: format!("Deployment {namespace}/{name}"),
        field,
    };
    let uid = d
        .metadata
        .uid
        .clone()
        .ok_or_else(|| missing("metadata.uid"))?;
    let spec = d.spec.as_ref().ok_or_else(|| missing("spec"))?;
    let replicas = spec.replicas.unwrap_or(1);
    let selector = LabelSelector::from_label_selector(&spec.selector).map_err(|e| {
        ReconcileError::InvalidSelector {
            object: format!("Deployment {namespace}/{name}"),
            reason: e.to_string(),
        }
    })?;
    let strategy = parse_strategy(d, &namespace, &name, replicas)?;
    // Kubernetes refuses to act on an empty selector (it would select every pod).
    if selector.is_empty() {
        return Ok(Outcome {
            actions: vec![Action::Event(EventRecord {
                involved: object_reference(Kind::Deployment, &d.metadata),
                event_type: EventType::Warning,
                reason: "SelectingAll".into(),
                message: "This deployment is selecting all pods. A non-empty selector is required."
                    .into(),
            })],
            requeue_after: None,
        });
    }

    let mut released_actions = Vec::new();
    let mut rss = Vec::new();
    let mut adopted_indices = Vec::new();
    for rs in replica_sets {
        if namespace_of(&rs.metadata) != namespace {
            continue;
        }
        let matches = selector.matches(&labels_of(&rs.metadata));
        match controller_of(&rs.metadata) {
            Some(owner) if owner.uid == uid => {
                if matches || d.metadata.deletion_timestamp.is_some() {
                    rss.push(rs.clone());
                } else {
                    // Relabelled out of the selector: release it, as ControllerRefManager does.
                    let mut released = rs.clone();
                    if let Some(refs) = released.metadata.owner_references.as_mut() {
                        refs.retain(|r| r.uid != uid);
                    }
                    released_actions.push(Action::Update(Object::ReplicaSet(Box::new(released))));
                }
            }
            Some(_) => {}
            None if matches
                && rs.metadata.deletion_timestamp.is_none()
                && d.metadata.deletion_timestamp.is_none() =>
            {
                // Adopt the orphan, as Kubernetes' ControllerRefManager does.
                let mut adopted = rs.clone();
                adopted
                    .metadata
                    .owner_references
                    .get_or_insert_with(Vec::new)
                    .push(controller_owner_ref(Kind::Deployment, &d.metadata));
                adopted_indices.push(rss.len());
                rss.push(adopted);
            }
            None => {}
        }
    }

    let mut sync = Sync {
        d,
        spec,
        namespace,
        name,
        replicas,
        strategy,
        now,
        rss,
        // Adopted ReplicaSets are written back once, with whatever else changes on them.
        dirty: adopted_indices,
        created: None,
        new_rs: None,
        status: d.status.clone().unwrap_or_default(),
        deployment_annotations: None,
        other_actions: released_actions,
        events: Vec::new(),
        status_only: false,
    };
    let mut outcome = Outcome::default();

    if d.metadata.deletion_timestamp.is_some() {
        sync.sync_revision(false, replica_sets);
        sync.sync_status();
        return Ok(sync.finish(outcome));
    }

    sync.check_paused_conditions();
    let paused = spec.paused == Some(true);
    if paused {
        sync.sync_revision(false, replica_sets);
        sync.scale();
        sync.cleanup();
        sync.sync_status();
        return Ok(sync.finish(outcome));
    }

    sync.sync_revision(false, replica_sets);
    if sync.is_scaling_event() {
        sync.scale();
        sync.sync_status();
        return Ok(sync.finish(outcome));
    }

    match sync.strategy.clone() {
        Strategy::Recreate => sync.rollout_recreate(replica_sets, pods),
        Strategy::RollingUpdate { .. } => sync.rollout_rolling(replica_sets),
    }
    if !sync.status_only {
        sync.sync_rollout_status(&mut outcome);
    }
    Ok(sync.finish(outcome))
}

fn parse_strategy(
    d: &Deployment,
    namespace: &str,
    name: &str,
    replicas: i32,
) -> Result<Strategy, ReconcileError> {
    let strategy = d.spec.as_ref().and_then(|s| s.strategy.as_ref());
    let type_ = strategy
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate");
    let invalid =
        |field: &'static str, value: String, reason: String| ReconcileError::InvalidValue {
            object: format!("Deployment {namespace}/{name}"),
            field,
            value,
            reason,
        };
    match type_ {
        "Recreate" => Ok(Strategy::Recreate),
        "RollingUpdate" => {
            let ru = strategy.and_then(|s| s.rolling_update.as_ref());
            let quarter = IntOrString::String("25%".into());
            let max_surge = ru
                .and_then(|r| r.max_surge.clone())
                .unwrap_or_else(|| quarter.clone());
            let max_unavailable = ru
                .and_then(|r| r.max_unavailable.clone())
                .unwrap_or(quarter);
            if is_zero(&max_surge) && is_zero(&max_unavailable) {
                return Err(invalid(
                    "spec.strategy.rollingUpdate",
                    "maxSurge=0, maxUnavailable=0".into(),
                    "maxSurge and maxUnavailable may not both be 0; allow at least one".into(),
                ));
            }
            resolve_fenceposts(&max_surge, &max_unavailable, replicas).map_err(|reason| {
                invalid(
                    "spec.strategy.rollingUpdate",
                    format!("{max_surge:?}/{max_unavailable:?}"),
                    reason,
                )
            })?;
            Ok(Strategy::RollingUpdate {
                max_surge,
                max_unavailable,
            })
        }
        other => Err(invalid(
            "spec.strategy.type",
            other.to_string(),
            "must be RollingUpdate or Recreate".into(),
        )),
    }
}

impl<'a> Sync<'a> {
    fn spec(&self) -> &'a DeploymentSpec {
        self.spec
    }

    fn fenceposts(&self) -> (i32, i32) {
        match &self.strategy {
            Strategy::Recreate => (0, 0),
            Strategy::RollingUpdate {
                max_surge,
                max_unavailable,
            } => resolve_fenceposts(max_surge, max_unavailable, self.replicas).unwrap_or((0, 1)),
        }
    }

    /// Kubernetes' `MaxSurge`.
    fn max_surge(&self) -> i32 {
        self.fenceposts().0
    }

    /// Kubernetes' `MaxUnavailable` (never more than the replicas).
    fn max_unavailable(&self) -> i32 {
        if self.replicas == 0 {
            return 0;
        }
        self.fenceposts().1.min(self.replicas)
    }

    fn min_ready_seconds(&self) -> i32 {
        self.spec().min_ready_seconds.unwrap_or(0)
    }

    fn progress_deadline(&self) -> Option<i32> {
        self.spec()
            .progress_deadline_seconds
            .filter(|s| *s != i32::MAX)
    }

    fn old_indices(&self) -> Vec<usize> {
        (0..self.rss.len())
            .filter(|i| Some(*i) != self.new_rs)
            .collect()
    }

    fn active(&self, indices: &[usize]) -> Vec<usize> {
        indices
            .iter()
            .copied()
            .filter(|i| rs_replicas(&self.rss[*i]) > 0)
            .collect()
    }

    fn spec_sum(&self, indices: &[usize]) -> i32 {
        indices.iter().map(|i| rs_replicas(&self.rss[*i])).sum()
    }

    fn mark_dirty(&mut self, idx: usize) {
        if Some(idx) != self.created && !self.dirty.contains(&idx) {
            self.dirty.push(idx);
        }
    }

    fn event(&mut self, event_type: EventType, reason: &str, message: String) {
        self.events.push(Action::Event(EventRecord {
            involved: object_reference(Kind::Deployment, &self.d.metadata),
            event_type,
            reason: reason.to_string(),
            message,
        }));
    }

    fn set_deployment_revision(&mut self, revision: String) {
        let mut annotations = self
            .deployment_annotations
            .clone()
            .or_else(|| self.d.metadata.annotations.clone())
            .unwrap_or_default();
        if annotations.get(REVISION_ANNOTATION) != Some(&revision) {
            annotations.insert(REVISION_ANNOTATION.to_string(), revision);
            self.deployment_annotations = Some(annotations);
        }
    }

    /// Kubernetes' `copyDeploymentAnnotationsToReplicaSet`.
    fn copy_annotations(&self, rs: &mut ReplicaSet) -> bool {
        let mut changed = false;
        for (k, v) in self.d.metadata.annotations.iter().flatten() {
            let skip = [
                LAST_APPLIED_ANNOTATION,
                REVISION_ANNOTATION,
                REVISION_HISTORY_ANNOTATION,
                DESIRED_REPLICAS_ANNOTATION,
                MAX_REPLICAS_ANNOTATION,
                DEPRECATED_ROLLBACK_TO,
            ];
            if skip.contains(&k.as_str()) {
                continue;
            }
            changed |= set_annotation(&mut rs.metadata, k, v.clone());
        }
        changed
    }

    fn set_replicas_annotations(&self, rs: &mut ReplicaSet) -> bool {
        let desired = set_annotation(
            &mut rs.metadata,
            DESIRED_REPLICAS_ANNOTATION,
            self.replicas.to_string(),
        );
        let max = set_annotation(
            &mut rs.metadata,
            MAX_REPLICAS_ANNOTATION,
            (self.replicas + self.max_surge()).to_string(),
        );
        desired || max
    }

    /// Kubernetes' `getAllReplicaSetsAndSyncRevision`: finds the new ReplicaSet (oldest with an
    /// equal template), moves its revision to max(old)+1 (this is how `rollout undo` reuses an
    /// old ReplicaSet), and creates it when asked and missing.
    fn sync_revision(&mut self, create: bool, all_in_namespace: &[ReplicaSet]) {
        let template = self.spec().template.clone();
        if self.new_rs.is_none() {
            let mut candidates: Vec<usize> = (0..self.rss.len())
                .filter(|i| {
                    self.rss[*i]
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.as_ref())
                        .is_some_and(|t| templates_equal(t, &template))
                })
                .collect();
            candidates.sort_by_key(|i| creation_key(&self.rss[*i]));
            self.new_rs = candidates.first().copied();
        }
        let max_old = self
            .old_indices()
            .iter()
            .map(|i| revision(&self.rss[*i]))
            .max()
            .unwrap_or(0);
        let new_revision = max_old + 1;

        if let Some(idx) = self.new_rs {
            if Some(idx) == self.created {
                return;
            }
            let mut rs = self.rss[idx].clone();
            let mut changed = self.copy_annotations(&mut rs);
            let old_revision = revision(&rs);
            if old_revision < new_revision {
                let had = annotation(&rs.metadata, REVISION_ANNOTATION).is_some();
                set_annotation(
                    &mut rs.metadata,
                    REVISION_ANNOTATION,
                    new_revision.to_string(),
                );
                if had {
                    // A rollback: remember the revisions this ReplicaSet had before.
                    let history = match annotation(&rs.metadata, REVISION_HISTORY_ANNOTATION) {
                        Some(h) if !h.is_empty() => format!("{h},{old_revision}"),
                        _ => old_revision.to_string(),
                    };
                    set_annotation(&mut rs.metadata, REVISION_HISTORY_ANNOTATION, history);
                }
                changed = true;
            }
            let min_ready = self.min_ready_seconds();
            if let Some(spec) = rs.spec.as_mut()
                && spec.min_ready_seconds.unwrap_or(0) != min_ready
            {
                spec.min_ready_seconds = Some(min_ready);
                changed = true;
            }
            if changed {
                self.rss[idx] = rs;
                self.mark_dirty(idx);
            }
            let rev = revision(&self.rss[idx]).to_string();
            self.set_deployment_revision(rev);
            if self.progress_deadline().is_some()
                && get_condition(&self.status, PROGRESSING).is_none()
            {
                let msg = format!(
                    "Found new replica set {:?}",
                    name_of(&self.rss[idx].metadata)
                );
                set_condition(
                    &mut self.status,
                    new_condition(PROGRESSING, "True", FOUND_NEW_RS, msg, self.now),
                );
            }
            return;
        }
        if !create {
            return;
        }

        let collision_count = self.status.collision_count;
        let hash = pod_template_hash(&template, collision_count);
        let rs_name = format!("{}-{}", self.name, hash);
        // The name is taken by a ReplicaSet that is not our new one (one of ours with an equal
        // template would have been found above, so this one has another template, another
        // owner, or is being released): a hash collision. Bump collisionCount so the next
        // reconcile hashes differently, as Kubernetes does after its create fails.
        if all_in_namespace.iter().any(|rs| {
            namespace_of(&rs.metadata) == self.namespace && name_of(&rs.metadata) == rs_name
        }) {
            self.status.collision_count = Some(collision_count.unwrap_or(0) + 1);
            self.status_only = true;
            return;
        }

        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(POD_TEMPLATE_HASH_LABEL.to_string(), hash.clone());
        let mut rs_template = template.clone();
        rs_template
            .metadata
            .get_or_insert_with(Default::default)
            .labels = Some(labels.clone());
        let mut selector: MetaSelector = self.spec().selector.clone();
        selector
            .match_labels
            .get_or_insert_with(BTreeMap::new)
            .insert(POD_TEMPLATE_HASH_LABEL.to_string(), hash);
        let mut rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(rs_name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                owner_references: Some(vec![controller_owner_ref(
                    Kind::Deployment,
                    &self.d.metadata,
                )]),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: Some(self.min_ready_seconds()),
                selector,
                template: Some(rs_template),
            }),
            status: None,
        };
        self.rss.push(rs.clone());
        let idx = self.rss.len() - 1;
        self.new_rs = Some(idx);
        self.created = Some(idx);
        let count = self.new_rs_new_replicas(idx);
        if let Some(spec) = rs.spec.as_mut() {
            spec.replicas = Some(count);
        }
        self.copy_annotations(&mut rs);
        set_annotation(
            &mut rs.metadata,
            REVISION_ANNOTATION,
            new_revision.to_string(),
        );
        self.set_replicas_annotations(&mut rs);
        self.rss[idx] = rs;
        if count > 0 {
            self.event(
                EventType::Normal,
                "ScalingReplicaSet",
                format!("Scaled up replica set {rs_name} from 0 to {count}"),
            );
        }
        self.set_deployment_revision(new_revision.to_string());
        set_condition(
            &mut self.status,
            new_condition(
                PROGRESSING,
                "True",
                NEW_RS_CREATED,
                format!("Created new replica set {rs_name:?}"),
                self.now,
            ),
        );
    }

    /// Kubernetes' `NewRSNewReplicas`.
    fn new_rs_new_replicas(&self, new_idx: usize) -> i32 {
        let new_replicas = rs_replicas(&self.rss[new_idx]);
        match self.strategy {
            Strategy::Recreate => self.replicas,
            Strategy::RollingUpdate { .. } => {
                let all: Vec<usize> = (0..self.rss.len()).collect();
                let current = self.spec_sum(&all);
                let max_total = self.replicas + self.max_surge();
                if current >= max_total {
                    return new_replicas;
                }
                let up = (max_total - current).min(self.replicas - new_replicas);
                new_replicas + up
            }
        }
    }

    /// Kubernetes' `scaleReplicaSet`: sets the size and the desired/max annotations.
    fn scale_rs(&mut self, idx: usize, new_scale: i32, operation: &str) -> bool {
        let mut rs = self.rss[idx].clone();
        let old_scale = rs_replicas(&rs);
        let size_changed = old_scale != new_scale;
        let annotations_changed = self.set_replicas_annotations(&mut rs);
        if !(size_changed || annotations_changed) {
            return false;
        }
        rs.spec.get_or_insert_with(Default::default).replicas = Some(new_scale);
        let rs_name = name_of(&rs.metadata);
        self.rss[idx] = rs;
        self.mark_dirty(idx);
        if size_changed {
            self.event(
                EventType::Normal,
                "ScalingReplicaSet",
                format!("Scaled {operation} replica set {rs_name} from {old_scale} to {new_scale}"),
            );
        }
        size_changed
    }

    fn scale_to(&mut self, idx: usize, new_scale: i32) -> bool {
        let operation = if new_scale < rs_replicas(&self.rss[idx]) {
            "down"
        } else {
            "up"
        };
        self.scale_rs(idx, new_scale, operation)
    }

    /// Kubernetes' `isScalingEvent`: some active ReplicaSet was sized for other replicas.
    fn is_scaling_event(&self) -> bool {
        let all: Vec<usize> = (0..self.rss.len()).collect();
        self.active(&all).iter().any(|i| {
            annotation(&self.rss[*i].metadata, DESIRED_REPLICAS_ANNOTATION)
                .and_then(|v| v.parse::<i32>().ok())
                .is_some_and(|desired| desired != self.replicas)
        })
    }

    /// Kubernetes' `IsSaturated`.
    fn is_saturated(&self, idx: usize) -> bool {
        let rs = &self.rss[idx];
        let desired = annotation(&rs.metadata, DESIRED_REPLICAS_ANNOTATION)
            .and_then(|v| v.parse::<i32>().ok());
        rs_replicas(rs) == self.replicas
            && desired == Some(self.replicas)
            && rs_available(rs) == self.replicas
    }

    /// Kubernetes' `scale`: proportional scaling of every active ReplicaSet when the
    /// Deployment's replicas change (possibly mid-rollout).
    fn scale(&mut self) {
        let old = self.old_indices();
        // FindActiveOrLatest.
        let mut all_active = self.active(&old);
        if let Some(n) = self.new_rs
            && rs_replicas(&self.rss[n]) > 0
        {
            all_active.push(n);
        }
        let active_or_latest = match all_active.len() {
            0 => self.new_rs.or_else(|| {
                old.iter()
                    .copied()
                    .max_by_key(|i| creation_key(&self.rss[*i]))
            }),
            1 => Some(all_active[0]),
            _ => None,
        };
        if self.rss.is_empty() {
            return;
        }
        if let Some(idx) = active_or_latest {
            // Kubernetes returns here without touching the ReplicaSet when its size is already
            // right; if its desired-replicas annotation is stale, that makes every later sync
            // a "scaling event" again and the rollout never resumes (found by
            // random_edits_scaling_and_pauses_converge). Refreshing the annotations fixes it.
            self.scale_to(idx, self.replicas);
            return;
        }
        if let Some(n) = self.new_rs
            && self.is_saturated(n)
        {
            for i in self.active(&old) {
                self.scale_rs(i, 0, "down");
            }
            return;
        }
        if !matches!(self.strategy, Strategy::RollingUpdate { .. }) {
            return;
        }
        let mut all = all_active;
        let all_replicas = self.spec_sum(&all);
        let allowed = if self.replicas > 0 {
            self.replicas + self.max_surge()
        } else {
            0
        };
        let to_add = allowed - all_replicas;
        let operation = match to_add.cmp(&0) {
            std::cmp::Ordering::Greater => {
                // ReplicaSetsBySizeNewer: larger first, then newer first.
                all.sort_by(|a, b| {
                    let (ra, rb) = (&self.rss[*a], &self.rss[*b]);
                    rs_replicas(rb)
                        .cmp(&rs_replicas(ra))
                        .then_with(|| creation_key(rb).cmp(&creation_key(ra)))
                });
                "up"
            }
            std::cmp::Ordering::Less => {
                // ReplicaSetsBySizeOlder: larger first, then older first.
                all.sort_by(|a, b| {
                    let (ra, rb) = (&self.rss[*a], &self.rss[*b]);
                    rs_replicas(rb)
                        .cmp(&rs_replicas(ra))
                        .then_with(|| creation_key(ra).cmp(&creation_key(rb)))
                });
                "down"
            }
            std::cmp::Ordering::Equal => "",
        };
        let mut added = 0;
        let mut sizes = Vec::with_capacity(all.len());
        for &i in &all {
            let current = rs_replicas(&self.rss[i]);
            if to_add != 0 {
                let proportion = self.proportion(i, to_add, added);
                sizes.push(current + proportion);
                added += proportion;
            } else {
                sizes.push(current);
            }
        }
        for (pos, &i) in all.iter().enumerate() {
            let mut size = sizes[pos];
            if pos == 0 && to_add != 0 {
                // Leftovers go to the largest ReplicaSet.
                size = (size + to_add - added).max(0);
            }
            self.scale_rs(i, size, operation);
        }
    }

    /// Kubernetes' `GetProportion` / `getReplicaSetFraction`.
    fn proportion(&self, idx: usize, to_add: i32, added: i32) -> i32 {
        let rs = &self.rss[idx];
        let current = rs_replicas(rs);
        if current == 0 || to_add == 0 || to_add == added {
            return 0;
        }
        let fraction = if self.replicas == 0 {
            -current
        } else {
            let deployment_replicas = self.replicas + self.max_surge();
            let annotated = annotation(&rs.metadata, MAX_REPLICAS_ANNOTATION)
                .and_then(|v| v.parse::<i32>().ok())
                .unwrap_or(self.status.replicas.unwrap_or(0));
            if annotated <= 0 {
                0
            } else {
                let size =
                    f64::from(current) * f64::from(deployment_replicas) / f64::from(annotated);
                // Go's math.Round rounds half away from zero, as f64::round does.
                size.round() as i32 - current
            }
        };
        let allowed = to_add - added;
        if to_add > 0 {
            fraction.min(allowed)
        } else {
            fraction.max(allowed)
        }
    }

    /// Kubernetes' `rolloutRolling`.
    fn rollout_rolling(&mut self, all_in_namespace: &[ReplicaSet]) {
        self.sync_revision(true, all_in_namespace);
        let Some(new_idx) = self.new_rs else {
            return;
        };
        if self.status_only {
            return;
        }
        if self.reconcile_new_rs(new_idx) {
            return;
        }
        if self.reconcile_old_rss(new_idx) {
            return;
        }
        if self.complete(&self.d.status.clone().unwrap_or_default()) {
            self.cleanup();
        }
    }

    fn reconcile_new_rs(&mut self, new_idx: usize) -> bool {
        let current = rs_replicas(&self.rss[new_idx]);
        if Some(new_idx) == self.created || current == self.replicas {
            return false;
        }
        if current > self.replicas {
            return self.scale_rs(new_idx, self.replicas, "down");
        }
        let count = self.new_rs_new_replicas(new_idx);
        self.scale_rs(new_idx, count, "up")
    }

    /// Kubernetes' `reconcileOldReplicaSets`: scale old ReplicaSets down as far as
    /// maxUnavailable allows, unhealthy replicas first.
    fn reconcile_old_rss(&mut self, new_idx: usize) -> bool {
        let old = self.active(&self.old_indices());
        if self.spec_sum(&old) == 0 {
            return false;
        }
        let all: Vec<usize> = (0..self.rss.len()).collect();
        let all_pods = self.spec_sum(&all);
        let min_available = self.replicas - self.max_unavailable();
        let new_rs = &self.rss[new_idx];
        let new_unavailable = rs_replicas(new_rs) - rs_available(new_rs);
        let max_scaled_down = all_pods - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return false;
        }
        let mut old_sorted = old;
        old_sorted.sort_by_key(|i| creation_key(&self.rss[*i]));

        // cleanupUnhealthyReplicas.
        let mut cleaned = 0;
        for &i in &old_sorted {
            if cleaned >= max_scaled_down {
                break;
            }
            let (replicas, available) = (rs_replicas(&self.rss[i]), rs_available(&self.rss[i]));
            // A stale status can report more available pods than the new size; Kubernetes
            // refuses that case with an error ("invalid request to scale down"), skipping it is
            // the same outcome without the error.
            if replicas == 0 || available >= replicas {
                continue;
            }
            let down = (max_scaled_down - cleaned).min(replicas - available);
            self.scale_rs(i, replicas - down, "down");
            cleaned += down;
        }

        // scaleDownOldReplicaSetsForRollingUpdate. Deliberately safer than Kubernetes: a
        // ReplicaSet counts at most its spec.replicas as available. Right after a scale-down its
        // status still reports the pods it is about to delete, and Kubernetes would count them,
        // scaling other ReplicaSets below minAvailable (found by
        // random_rollouts_keep_bounds_and_converge).
        let available: i32 = (0..self.rss.len())
            .map(|i| rs_available(&self.rss[i]).min(rs_replicas(&self.rss[i])))
            .sum();
        let mut scaled = 0;
        if available > min_available {
            let total = available - min_available;
            for &i in &old_sorted {
                if scaled >= total {
                    break;
                }
                let replicas = rs_replicas(&self.rss[i]);
                if replicas == 0 {
                    continue;
                }
                let down = replicas.min(total - scaled);
                self.scale_rs(i, replicas - down, "down");
                scaled += down;
            }
        }
        cleaned + scaled > 0
    }

    /// Kubernetes' `rolloutRecreate`: all old pods gone before any new one is created.
    fn rollout_recreate(&mut self, all_in_namespace: &[ReplicaSet], pods: &[Pod]) {
        let old = self.active(&self.old_indices());
        let mut scaled_down = false;
        for i in old {
            if rs_replicas(&self.rss[i]) != 0 {
                scaled_down |= self.scale_rs(i, 0, "down");
            }
        }
        if scaled_down || self.old_pods_running(pods) {
            return;
        }
        if self.new_rs.is_none() {
            self.sync_revision(true, all_in_namespace);
            if self.status_only {
                return;
            }
        }
        if let Some(n) = self.new_rs
            && Some(n) != self.created
            && rs_replicas(&self.rss[n]) != self.replicas
        {
            self.scale_to(n, self.replicas);
        }
        if self.complete(&self.d.status.clone().unwrap_or_default()) {
            self.cleanup();
        }
    }

    /// Kubernetes' `oldPodsRunning`.
    fn old_pods_running(&self, pods: &[Pod]) -> bool {
        let old = self.old_indices();
        if old
            .iter()
            .map(|i| rs_status_replicas(&self.rss[*i]))
            .sum::<i32>()
            > 0
        {
            return true;
        }
        let old_uids: BTreeSet<&str> = old
            .iter()
            .filter_map(|i| self.rss[*i].metadata.uid.as_deref())
            .collect();
        pods.iter().any(|p| {
            controller_of(&p.metadata).is_some_and(|o| old_uids.contains(o.uid.as_str()))
                && !matches!(crate::pod_util::phase(p), "Succeeded" | "Failed")
        })
    }

    /// Kubernetes' `cleanupDeployment`: delete the oldest zero-sized ReplicaSets beyond
    /// revisionHistoryLimit.
    fn cleanup(&mut self) {
        let Some(limit) = self.spec().revision_history_limit else {
            return;
        };
        let mut cleanable: Vec<usize> = self
            .old_indices()
            .into_iter()
            .filter(|i| self.rss[*i].metadata.deletion_timestamp.is_none())
            .collect();
        let diff = cleanable.len() as i64 - i64::from(limit);
        if diff <= 0 {
            return;
        }
        cleanable.sort_by_key(|i| (revision(&self.rss[*i]), creation_key(&self.rss[*i])));
        for &i in cleanable.iter().take(diff as usize) {
            let rs = &self.rss[i];
            let observed = rs
                .status
                .as_ref()
                .and_then(|s| s.observed_generation)
                .unwrap_or(0);
            if rs_status_replicas(rs) != 0
                || rs_replicas(rs) != 0
                || rs.metadata.generation.unwrap_or(0) > observed
            {
                continue;
            }
            self.other_actions.push(Action::Delete {
                kind: Kind::ReplicaSet,
                namespace: self.namespace.clone(),
                name: name_of(&rs.metadata),
                uid: rs.metadata.uid.clone(),
            });
        }
    }

    /// Kubernetes' `checkPausedConditions`.
    fn check_paused_conditions(&mut self) {
        if self.progress_deadline().is_none() {
            return;
        }
        let current = get_condition(&self.status, PROGRESSING);
        if current.is_some_and(|c| c.reason.as_deref() == Some(TIMED_OUT)) {
            return;
        }
        let paused_cond = current.is_some_and(|c| c.reason.as_deref() == Some(PAUSED));
        let paused = self.spec().paused == Some(true);
        if paused && !paused_cond {
            set_condition(
                &mut self.status,
                new_condition(
                    PROGRESSING,
                    "Unknown",
                    PAUSED,
                    "Deployment is paused".into(),
                    self.now,
                ),
            );
        } else if !paused && paused_cond {
            set_condition(
                &mut self.status,
                new_condition(
                    PROGRESSING,
                    "Unknown",
                    RESUMED,
                    "Deployment is resumed".into(),
                    self.now,
                ),
            );
        }
    }

    /// Kubernetes' `calculateStatus`.
    fn calculate_status(&self) -> DeploymentStatus {
        let all: Vec<&ReplicaSet> = self.rss.iter().collect();
        let available: i32 = all.iter().map(|rs| rs_available(rs)).sum();
        let total_spec: i32 = all.iter().map(|rs| rs_replicas(rs)).sum();
        let mut status = DeploymentStatus {
            observed_generation: self.d.metadata.generation,
            replicas: Some(all.iter().map(|rs| rs_status_replicas(rs)).sum()),
            updated_replicas: Some(
                self.new_rs
                    .map(|i| rs_status_replicas(&self.rss[i]))
                    .unwrap_or(0),
            ),
            ready_replicas: Some(all.iter().map(|rs| rs_ready(rs)).sum()),
            available_replicas: Some(available),
            unavailable_replicas: Some((total_spec - available).max(0)),
            collision_count: self.status.collision_count,
            conditions: self.status.conditions.clone(),
        };
        let condition = if available >= self.replicas - self.max_unavailable() {
            new_condition(
                AVAILABLE,
                "True",
                MIN_REPLICAS_AVAILABLE,
                "Deployment has minimum availability.".into(),
                self.now,
            )
        } else {
            new_condition(
                AVAILABLE,
                "False",
                MIN_REPLICAS_UNAVAILABLE,
                "Deployment does not have minimum availability.".into(),
                self.now,
            )
        };
        set_condition(&mut status, condition);
        status
    }

    /// Kubernetes' `DeploymentComplete`.
    fn complete(&self, status: &DeploymentStatus) -> bool {
        status.updated_replicas.unwrap_or(0) == self.replicas
            && status.replicas.unwrap_or(0) == self.replicas
            && status.available_replicas.unwrap_or(0) == self.replicas
            && status.observed_generation.unwrap_or(0) >= self.d.metadata.generation.unwrap_or(0)
    }

    /// `syncDeploymentStatus`: counts and Available only (scaling, paused).
    fn sync_status(&mut self) {
        self.status = self.calculate_status();
    }

    /// Kubernetes' `syncRolloutStatus`: counts plus the Progressing condition.
    fn sync_rollout_status(&mut self, outcome: &mut Outcome) {
        let old_status = self.d.status.clone().unwrap_or_default();
        let mut status = self.calculate_status();
        let Some(deadline) = self.progress_deadline() else {
            remove_condition(&mut status, PROGRESSING);
            self.status = status;
            return;
        };
        let current = get_condition(&status, PROGRESSING).cloned();
        let new_rs_name = self
            .new_rs
            .map(|i| name_of(&self.rss[i].metadata))
            .unwrap_or_default();
        let is_complete = status.replicas == status.updated_replicas
            && current
                .as_ref()
                .is_some_and(|c| c.reason.as_deref() == Some(NEW_RS_AVAILABLE));
        if !is_complete {
            let old_old =
                old_status.replicas.unwrap_or(0) - old_status.updated_replicas.unwrap_or(0);
            let new_old = status.replicas.unwrap_or(0) - status.updated_replicas.unwrap_or(0);
            let progressing = status.updated_replicas.unwrap_or(0)
                > old_status.updated_replicas.unwrap_or(0)
                || new_old < old_old
                || status.ready_replicas.unwrap_or(0) > old_status.ready_replicas.unwrap_or(0)
                || status.available_replicas.unwrap_or(0)
                    > old_status.available_replicas.unwrap_or(0);
            if self.complete(&status) {
                set_condition(
                    &mut status,
                    new_condition(
                        PROGRESSING,
                        "True",
                        NEW_RS_AVAILABLE,
                        format!("ReplicaSet {new_rs_name:?} has successfully progressed."),
                        self.now,
                    ),
                );
            } else if progressing {
                let mut condition = new_condition(
                    PROGRESSING,
                    "True",
                    RS_UPDATED,
                    format!("ReplicaSet {new_rs_name:?} is progressing."),
                    self.now,
                );
                if let Some(c) = &current {
                    if c.status == "True" {
                        condition.last_transition_time = c.last_transition_time.clone();
                    }
                    remove_condition(&mut status, PROGRESSING);
                }
                set_condition(&mut status, condition);
            } else if let Some(c) = &current {
                // DeploymentTimedOut.
                let timed_out = match c.reason.as_deref() {
                    Some(NEW_RS_AVAILABLE) => false,
                    Some(TIMED_OUT) => true,
                    _ => c.last_update_time.as_ref().is_some_and(|t| {
                        t.0.as_second() + i64::from(deadline) < self.now.as_second()
                    }),
                };
                if timed_out {
                    set_condition(
                        &mut status,
                        new_condition(
                            PROGRESSING,
                            "False",
                            TIMED_OUT,
                            format!("ReplicaSet {new_rs_name:?} has timed out progressing."),
                            self.now,
                        ),
                    );
                }
            }
            // Come back when the deadline would pass, unless it already has.
            if let Some(c) = get_condition(&status, PROGRESSING)
                && c.status == "True"
                && c.reason.as_deref() != Some(NEW_RS_AVAILABLE)
                && let Some(t) = &c.last_update_time
            {
                outcome.requeue_at_most(
                    t.0.as_second() + i64::from(deadline) - self.now.as_second() + 1,
                );
            }
        }
        self.status = status;
    }

    fn finish(mut self, mut outcome: Outcome) -> Outcome {
        let mut actions = std::mem::take(&mut self.other_actions);
        if !self.status_only {
            if let Some(idx) = self.created {
                actions.insert(
                    0,
                    Action::Create(Object::ReplicaSet(Box::new(self.rss[idx].clone()))),
                );
            }
            for &idx in &self.dirty {
                actions.push(Action::Update(Object::ReplicaSet(Box::new(
                    self.rss[idx].clone(),
                ))));
            }
            if let Some(annotations) = &self.deployment_annotations {
                let mut d = self.d.clone();
                d.metadata.annotations = Some(annotations.clone());
                actions.push(Action::Update(Object::Deployment(Box::new(d))));
            }
            actions.append(&mut self.events);
        }
        let observed = self.d.status.clone().unwrap_or_default();
        if self.status != observed {
            let mut d = self.d.clone();
            d.status = Some(self.status.clone());
            // Kubernetes writes the revision annotation through the status update; carrying it
            // here too keeps a whole-object PUT to /status from reverting it.
            if let Some(annotations) = &self.deployment_annotations
                && !self.status_only
            {
                d.metadata.annotations = Some(annotations.clone());
            }
            actions.push(Action::UpdateStatus(Object::Deployment(Box::new(d))));
        }
        outcome.actions = actions;
        outcome
    }
}

#[cfg(test)]
#[path = "deployment_tests.rs"]
mod tests;
