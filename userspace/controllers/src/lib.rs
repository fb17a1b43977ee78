//! Pure reconcile logic of skiff's controller manager.
//!
//! Every controller is a function from *observed* state (the objects a watch cache holds) to a
//! list of [`Action`]s that would move the cluster towards the desired state. Nothing here does
//! I/O, reads a clock or draws random numbers: the caller passes `now` and a [`SuffixSource`].
//! The kube-rs shell around these functions (watch -> queue -> reconcile) applies the actions
//! against the apiserver, in the order given.
//!
//! The controllers (all take `now` in whole seconds or finer; fractions are dropped):
//! - [`deployment::reconcile`]`(deployment, replica_sets, pods, now)`
//! - [`replicaset::reconcile`]`(replica_set, pods, names, now)`
//! - [`endpointslice::reconcile`]`(service, pods, nodes, existing_slices, names)` and
//!   [`endpointslice::endpoints`]`(service, pods, existing_endpoints)`
//! - [`job::reconcile`]`(job, pods, names, now)` (includes ttlSecondsAfterFinished)
//! - [`gc::collect`]`(objects)` -> [`gc::GcAction`]s
//! - [`daemonset::reconcile`]`(daemon_set, nodes, pods, names, now)` (one pod per eligible node,
//!   eligibility judged by skiff-scheduler's NodeAffinity and TaintToleration filters)
//! - [`cronjob::reconcile`]`(cron_job, jobs, now, time_zones)`
//! - [`hpa::reconcile`]`(hpa, target, pods, metrics, history, config, now)` -> [`hpa::HpaOutcome`]
//! - [`quota::status`]`(quota, usage)` and [`quota::check`]`(quotas, requested)` (admission)
//! - [`node_ipam::plan`]`(cluster_cidr, nodes, state)` -> [`node_ipam::IpamAction`]s (podCIDRs)
//! - [`node_lifecycle::reconcile`]`(state, config, node, lease, pods, now)` ->
//!   [`node_lifecycle::NodeOutcome`] (heartbeats, NotReady, taints, NoExecute eviction)
//!
//! Each returns `Result<`[`Outcome`]`, `[`ReconcileError`]`>` (gc: a plain list); an error means
//! the object itself is invalid and nothing was decided.
//!
//! Contract with the shell:
//! - [`Action::Create`] objects carry a full name (no `generateName`); on `AlreadyExists` the
//!   shell just requeues (the next reconcile sees the object).
//! - [`Action::Update`] carries the observed object with its `resourceVersion`, changed; a 409
//!   Conflict means the cache was stale: requeue.
//! - [`Action::UpdateStatus`] carries the object whose `.status` is the new status; the shell
//!   writes it to the `/status` subresource (a merge patch of `{"status": ...}` is fine because
//!   the status was computed from the whole observed state).
//! - [`Action::Delete`] carries the uid to send as a precondition so a recreated namesake is
//!   never deleted by mistake.
//! - Like Kubernetes' "expectations", the shell must not reconcile an object again before its own
//!   previous writes are visible in its cache, or it may create pods twice.
//! - [`Outcome::requeue_after`] asks for a reconcile after that many seconds even without a watch
//!   event (minReadySeconds elapsing, progress deadlines, Job back-off and TTL).
//! - Triggers, as kube-rs `Controller::owns`/`watches` express them: a Deployment reconciles on
//!   changes to itself, its ReplicaSets and (for Recreate) their pods; a ReplicaSet or Job on
//!   itself and its pods; a Service's EndpointSlices/Endpoints on the Service, its slices, and
//!   every pod [`endpointslice::selects`] (plus Nodes, for zones).
//! - Deletes are Background propagation unless [`gc::GcAction::Delete`] says otherwise.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Endpoints, ObjectReference, Pod, ResourceQuota};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod endpointslice;
pub mod gc;
pub mod hash;
pub mod hpa;
pub mod job;
pub mod node_ipam;
pub mod node_lifecycle;
pub mod pod_util;
pub mod quota;
pub mod replicaset;
#[cfg(test)]
mod testkit;

/// An object a controller writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Pod(Box<Pod>),
    ReplicaSet(Box<ReplicaSet>),
    Deployment(Box<Deployment>),
    EndpointSlice(Box<EndpointSlice>),
    Endpoints(Box<Endpoints>),
    Job(Box<Job>),
    DaemonSet(Box<DaemonSet>),
    CronJob(Box<CronJob>),
    HorizontalPodAutoscaler(Box<HorizontalPodAutoscaler>),
    ResourceQuota(Box<ResourceQuota>),
}

impl Object {
    /// The object's kind as the API spells it.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Pod(_) => Kind::Pod,
            Object::ReplicaSet(_) => Kind::ReplicaSet,
            Object::Deployment(_) => Kind::Deployment,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Endpoints(_) => Kind::Endpoints,
            Object::Job(_) => Kind::Job,
            Object::DaemonSet(_) => Kind::DaemonSet,
            Object::CronJob(_) => Kind::CronJob,
            Object::HorizontalPodAutoscaler(_) => Kind::HorizontalPodAutoscaler,
            Object::ResourceQuota(_) => Kind::ResourceQuota,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Pod(o) => &o.metadata,
            Object::ReplicaSet(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Endpoints(o) => &o.metadata,
            Object::Job(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
            Object::CronJob(o) => &o.metadata,
            Object::HorizontalPodAutoscaler(o) => &o.metadata,
            Object::ResourceQuota(o) => &o.metadata,
        }
    }

    /// The object as JSON, with `apiVersion` and `kind` set (for a dynamic client).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        match self {
            Object::Pod(o) => serde_json::to_value(o),
            Object::ReplicaSet(o) => serde_json::to_value(o),
            Object::Deployment(o) => serde_json::to_value(o),
            Object::EndpointSlice(o) => serde_json::to_value(o),
            Object::Endpoints(o) => serde_json::to_value(o),
            Object::Job(o) => serde_json::to_value(o),
            Object::DaemonSet(o) => serde_json::to_value(o),
            Object::CronJob(o) => serde_json::to_value(o),
            Object::HorizontalPodAutoscaler(o) => serde_json::to_value(o),
            Object::ResourceQuota(o) => serde_json::to_value(o),
        }
    }
}

/// Kinds a controller may delete or refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    ReplicaSet,
    Deployment,
    EndpointSlice,
    Endpoints,
    Job,
    Service,
    DaemonSet,
    CronJob,
    HorizontalPodAutoscaler,
    ResourceQuota,
}

impl Kind {
    /// `(apiVersion, kind)` as written in objects.
    pub fn api_version_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Pod => ("v1", "Pod"),
            Kind::ReplicaSet => ("apps/v1", "ReplicaSet"),
            Kind::Deployment => ("apps/v1", "Deployment"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSlice"),
            Kind::Endpoints => ("v1", "Endpoints"),
            Kind::Job => ("batch/v1", "Job"),
            Kind::Service => ("v1", "Service"),
            Kind::DaemonSet => ("apps/v1", "DaemonSet"),
            Kind::CronJob => ("batch/v1", "CronJob"),
            Kind::HorizontalPodAutoscaler => ("autoscaling/v2", "HorizontalPodAutoscaler"),
            Kind::ResourceQuota => ("v1", "ResourceQuota"),
        }
    }
}

/// `type` of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An Event to record against an object (what `kubectl describe` shows).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub involved: ObjectReference,
    pub event_type: EventType,
    pub reason: String,
    pub message: String,
}

/// One write a controller wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Create(Object),
    Update(Object),
    UpdateStatus(Object),
    Delete {
        kind: Kind,
        namespace: String,
        name: String,
        /// Precondition: delete only the object with this uid.
        uid: Option<String>,
    },
    Event(EventRecord),
    /// Set the replicas of a scalable object through its `scale` subresource (the HPA).
    Scale {
        api_version: String,
        kind: String,
        namespace: String,
        name: String,
        replicas: i32,
    },
}

/// What a reconcile decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// Writes, in the order to apply them.
    pub actions: Vec<Action>,
    /// Reconcile again after this many seconds even if nothing changes.
    pub requeue_after: Option<i64>,
}

impl Outcome {
    fn requeue_at_most(&mut self, seconds: i64) {
        let seconds = seconds.max(1);
        self.requeue_after = Some(match self.requeue_after {
            Some(existing) => existing.min(seconds),
            None => seconds,
        });
    }
}

/// Why an object cannot be reconciled. The object itself is wrong; the shell should record it
/// (an Event) and wait for the user to fix the object.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ReconcileError {
    /// `object` reads like "Deployment default/web".
    #[error("{object} has no {field}; set it (the apiserver normally defaults it)")]
    MissingField { object: String, field: &'static str },
    #[error("{object} has an invalid selector: {reason}; fix its selector")]
    InvalidSelector { object: String, reason: String },
    #[error("{object}: invalid {field} {value:?}: {reason}")]
    InvalidValue {
        object: String,
        field: &'static str,
        value: String,
        reason: String,
    },
}

/// Source of the random-looking suffixes Kubernetes appends to generated names (`web-7d4b9-x2x8k`).
/// Passed in so reconciles are deterministic under test.
pub trait SuffixSource {
    /// A fresh 5-character suffix from Kubernetes' "safe" alphabet.
    fn suffix(&mut self) -> String;
}

/// A deterministic [`SuffixSource`]: splitmix64 from a seed. The shell seeds it from real
/// randomness (or the clock); tests seed it with a constant. Hand-written (eight lines) instead of
/// pulling a RNG crate because the reconcile core must not depend on ambient randomness.
#[derive(Debug, Clone)]
pub struct SeededSuffixes {
    state: u64,
}

impl SeededSuffixes {
    pub fn new(seed: u64) -> Self {
        SeededSuffixes { state: seed }
    }

    /// The next raw 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl SuffixSource for SeededSuffixes {
    fn suffix(&mut self) -> String {
        let alphabet = hash::SAFE_ALPHABET.as_bytes();
        let mut bits = self.next_u64();
        (0..5)
            .map(|_| {
                let c = alphabet[(bits % alphabet.len() as u64) as usize] as char;
                bits /= alphabet.len() as u64;
                c
            })
            .collect()
    }
}

/// The ownerReference a controller puts on what it creates (controller=true,
/// blockOwnerDeletion=true, as Kubernetes' controllers do so foreground deletion waits for them).
pub fn controller_owner_ref(kind: Kind, owner: &ObjectMeta) -> OwnerReference {
    let (api_version, kind) = kind.api_version_kind();
    OwnerReference {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        name: owner.name.clone().unwrap_or_default(),
        uid: owner.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The ownerReference with `controller: true`, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

/// Whether `meta` is controlled by the object with this uid.
pub fn is_controlled_by(meta: &ObjectMeta, owner_uid: &str) -> bool {
    controller_of(meta).is_some_and(|r| r.uid == owner_uid)
}

/// An ObjectReference to an object (for Events and targetRefs).
pub fn object_reference(kind: Kind, meta: &ObjectMeta) -> ObjectReference {
    let (api_version, kind) = kind.api_version_kind();
    ObjectReference {
        api_version: Some(api_version.to_string()),
        kind: Some(kind.to_string()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    }
}

fn name_of(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

fn namespace_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_default()
}

fn labels_of(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

fn time(ts: Timestamp) -> Time {
    Time(ts)
}

/// `now` without its fraction: the API stores times in whole seconds, so a status computed with
/// sub-second times would never compare equal to its stored self and be rewritten forever.
fn whole_seconds(now: Timestamp) -> Timestamp {
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

/// Creation time in seconds; objects without one sort as the newest (Kubernetes sorts empty
/// creation timestamps first when ranking for deletion and treats them as "now").
fn created_second(meta: &ObjectMeta) -> Option<i64> {
    meta.creation_timestamp.as_ref().map(|t| t.0.as_second())
}
