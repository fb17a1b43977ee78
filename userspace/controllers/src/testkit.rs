//! An in-memory cluster for the controller tests: a toy apiserver that applies [`Action`]s the
//! way the real one would (uids, creation times, generation bumps on spec changes, status only
//! through UpdateStatus, graceful pod deletion), a toy kubelet that schedules pods and makes them
//! ready one step after it first sees them, and a toy garbage collector.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, ReplicaSet, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus, PodTemplateSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::{Action, EventRecord, Kind, Object, SeededSuffixes, controller_of, name_of};

pub fn ts(second: i64) -> Timestamp {
    Timestamp::from_second(second).unwrap()
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn template(image: &str) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(&[("app", "web")])),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "web".into(),
                image: Some(image.into()),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
    }
}

/// A Deployment as the apiserver would store it after defaulting.
pub fn deployment(
    replicas: i32,
    image: &str,
    surge: IntOrString,
    unavailable: IntOrString,
) -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels(&[("app", "web")])),
                match_expressions: None,
            },
            template: template(image),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(surge),
                    max_unavailable: Some(unavailable),
                }),
            }),
            revision_history_limit: Some(10),
            progress_deadline_seconds: Some(600),
            min_ready_seconds: None,
            paused: None,
        }),
        status: None,
    }
}

pub struct Cluster {
    pub now: i64,
    next_uid: u64,
    next_rv: u64,
    pub deployments: Vec<Deployment>,
    pub replica_sets: Vec<ReplicaSet>,
    pub pods: Vec<Pod>,
    pub events: Vec<EventRecord>,
    pub names: SeededSuffixes,
    /// Pods the kubelet has seen once (they turn ready the next time).
    seen: Vec<String>,
    /// When false the kubelet never makes pods ready (a broken image).
    pub pods_become_ready: bool,
    /// When set, a started pod turns ready only with probability 1/2 per kubelet pass (random
    /// start-up times), drawn from this generator.
    pub flaky_readiness: Option<SeededSuffixes>,
}

impl Cluster {
    pub fn new() -> Self {
        Cluster {
            now: 1_700_000_000,
            next_uid: 1,
            next_rv: 1,
            deployments: Vec::new(),
            replica_sets: Vec::new(),
            pods: Vec::new(),
            events: Vec::new(),
            names: SeededSuffixes::new(42),
            seen: Vec::new(),
            pods_become_ready: true,
            flaky_readiness: None,
        }
    }

    fn stamp(&mut self, meta: &mut ObjectMeta) {
        meta.uid = Some(format!("uid-{}", self.next_uid));
        self.next_uid += 1;
        meta.creation_timestamp = Some(Time(ts(self.now)));
        meta.generation = Some(1);
        self.bump_rv(meta);
    }

    fn bump_rv(&mut self, meta: &mut ObjectMeta) {
        meta.resource_version = Some(self.next_rv.to_string());
        self.next_rv += 1;
    }

    pub fn add_deployment(&mut self, mut d: Deployment) {
        self.stamp(&mut d.metadata);
        self.deployments.push(d);
    }

    /// A user edit of the Deployment (`kubectl apply`, `set image`, `rollout undo`...).
    pub fn edit_deployment(&mut self, f: impl FnOnce(&mut Deployment)) {
        let mut d = self.deployments[0].clone();
        let before = d.spec.clone();
        f(&mut d);
        if d.spec != before {
            d.metadata.generation = Some(d.metadata.generation.unwrap_or(0) + 1);
        }
        self.bump_rv(&mut d.metadata);
        self.deployments[0] = d;
    }

    pub fn deployment(&self) -> &Deployment {
        &self.deployments[0]
    }

    pub fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Create(object) => self.create(object),
                Action::Update(object) => self.update(object, false),
                Action::UpdateStatus(object) => self.update(object, true),
                Action::Delete {
                    kind, name, uid, ..
                } => self.delete(kind, &name, uid.as_deref()),
                Action::Scale { .. } => panic!("the deployment testkit does not scale"),
                Action::Event(e) => {
                    // "Scaled up|down replica set X from A to B" must go the way it says.
                    let words: Vec<&str> = e.message.split(' ').collect();
                    if let ["Scaled", direction, "replica", "set", _, "from", a, "to", b] =
                        words[..]
                    {
                        let (a, b): (i32, i32) = (a.parse().unwrap(), b.parse().unwrap());
                        assert!(
                            (direction == "up" && a < b) || (direction == "down" && a > b),
                            "inconsistent scaling: {}",
                            e.message
                        );
                    }
                    self.events.push(e)
                }
            }
        }
    }

    fn create(&mut self, object: Object) {
        let name = name_of(object.metadata());
        match object {
            Object::Pod(mut p) => {
                assert!(
                    !self.pods.iter().any(|x| name_of(&x.metadata) == name),
                    "pod {name} already exists"
                );
                self.stamp(&mut p.metadata);
                self.pods.push(*p);
            }
            Object::ReplicaSet(mut rs) => {
                assert!(
                    !self
                        .replica_sets
                        .iter()
                        .any(|x| name_of(&x.metadata) == name),
                    "replicaset {name} already exists"
                );
                self.stamp(&mut rs.metadata);
                self.replica_sets.push(*rs);
            }
            other => panic!("unexpected create {other:?}"),
        }
    }

    fn update(&mut self, object: Object, status: bool) {
        let name = name_of(object.metadata());
        let next_rv = self.next_rv;
        self.next_rv += 1;
        match object {
            Object::Pod(p) => {
                let stored = self
                    .pods
                    .iter_mut()
                    .find(|x| name_of(&x.metadata) == name)
                    .expect("pod to update exists");
                assert_eq!(
                    stored.metadata.resource_version, p.metadata.resource_version,
                    "stale pod update"
                );
                let keep_status = stored.status.clone();
                *stored = *p;
                if !status {
                    stored.status = keep_status;
                }
                stored.metadata.resource_version = Some(next_rv.to_string());
            }
            Object::ReplicaSet(rs) => {
                let stored = self
                    .replica_sets
                    .iter_mut()
                    .find(|x| name_of(&x.metadata) == name)
                    .expect("replicaset to update exists");
                if status {
                    stored.status = rs.status;
                } else {
                    assert_eq!(
                        stored.metadata.resource_version, rs.metadata.resource_version,
                        "stale rs update"
                    );
                    if stored.spec != rs.spec {
                        stored.metadata.generation =
                            Some(stored.metadata.generation.unwrap_or(0) + 1);
                    }
                    let generation = stored.metadata.generation;
                    stored.metadata = rs.metadata;
                    stored.metadata.generation = generation;
                    stored.spec = rs.spec;
                }
                stored.metadata.resource_version = Some(next_rv.to_string());
            }
            Object::Deployment(d) => {
                let stored = self
                    .deployments
                    .iter_mut()
                    .find(|x| name_of(&x.metadata) == name)
                    .expect("deployment to update exists");
                if status {
                    stored.status = d.status;
                } else {
                    assert_eq!(
                        stored.spec, d.spec,
                        "the controller must not change a deployment's spec"
                    );
                    stored.metadata.annotations = d.metadata.annotations;
                }
                stored.metadata.resource_version = Some(next_rv.to_string());
            }
            other => panic!("unexpected update {other:?}"),
        }
    }

    fn delete(&mut self, kind: Kind, name: &str, uid: Option<&str>) {
        match kind {
            Kind::Pod => {
                let now = self.now;
                let pod = self
                    .pods
                    .iter_mut()
                    .find(|p| name_of(&p.metadata) == name)
                    .expect("pod to delete exists");
                assert_eq!(pod.metadata.uid.as_deref(), uid, "uid precondition");
                // Graceful deletion: the pod stays, terminating, until the kubelet removes it.
                pod.metadata.deletion_timestamp.get_or_insert(Time(ts(now)));
            }
            Kind::ReplicaSet => {
                let rs = self
                    .replica_sets
                    .iter()
                    .find(|rs| name_of(&rs.metadata) == name)
                    .expect("replicaset to delete exists");
                let spec = rs.spec.as_ref().and_then(|s| s.replicas);
                let observed = rs.status.as_ref().map(|s| s.replicas).unwrap_or(0);
                assert_eq!(
                    (spec, observed),
                    (Some(0), 0),
                    "deleted replicaset {name} is empty"
                );
                let before = self.replica_sets.len();
                self.replica_sets.retain(|rs| {
                    !(name_of(&rs.metadata) == name && rs.metadata.uid.as_deref() == uid)
                });
                assert_eq!(
                    before,
                    self.replica_sets.len() + 1,
                    "replicaset {name} deleted"
                );
                self.garbage_collect();
            }
            other => panic!("unexpected delete of {other:?}"),
        }
    }

    /// Background deletion of pods whose controlling ReplicaSet is gone.
    fn garbage_collect(&mut self) {
        let live: Vec<String> = self
            .replica_sets
            .iter()
            .filter_map(|rs| rs.metadata.uid.clone())
            .collect();
        let now = self.now;
        for pod in &mut self.pods {
            if let Some(owner) = controller_of(&pod.metadata)
                && !live.contains(&owner.uid)
            {
                pod.metadata.deletion_timestamp.get_or_insert(Time(ts(now)));
            }
        }
    }

    /// One kubelet pass: terminating pods go away; new pods are scheduled and start; pods seen
    /// before become ready.
    pub fn kubelet(&mut self) {
        self.pods
            .retain(|p| p.metadata.deletion_timestamp.is_none());
        let now = self.now;
        for (i, pod) in self.pods.iter_mut().enumerate() {
            let name = name_of(&pod.metadata);
            let spec = pod.spec.get_or_insert_with(Default::default);
            if spec.node_name.is_none() {
                spec.node_name = Some(if i % 2 == 0 { "node-a" } else { "node-b" }.into());
            }
            if self.seen.contains(&name) {
                let lucky = match self.flaky_readiness.as_mut() {
                    Some(rng) => rng.next_u64() % 2 == 0,
                    None => true,
                };
                if self.pods_become_ready && lucky && !crate::pod_util::is_ready(pod) {
                    let status = pod.status.get_or_insert_with(Default::default);
                    status.conditions = Some(vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        last_transition_time: Some(Time(ts(now))),
                        ..Default::default()
                    }]);
                }
            } else {
                self.seen.push(name);
                pod.status = Some(PodStatus {
                    phase: Some("Running".into()),
                    pod_ip: Some(format!("10.244.0.{}", 10 + i)),
                    conditions: Some(vec![PodCondition {
                        type_: "Ready".into(),
                        status: "False".into(),
                        last_transition_time: Some(Time(ts(now))),
                        ..Default::default()
                    }]),
                    ..Default::default()
                });
            }
        }
    }

    pub fn reconcile_deployments(&mut self) {
        for i in 0..self.deployments.len() {
            let d = self.deployments[i].clone();
            let outcome =
                crate::deployment::reconcile(&d, &self.replica_sets, &self.pods, ts(self.now))
                    .unwrap();
            if std::env::var_os("SKIFF_TRACE").is_some() {
                let spec = d.spec.as_ref();
                eprintln!(
                    "-- deployment pass at {} replicas {:?} paused {:?} image {:?}",
                    self.now,
                    spec.and_then(|s| s.replicas),
                    spec.and_then(|s| s.paused),
                    spec.and_then(|s| s.template.spec.as_ref())
                        .map(|s| s.containers[0].image.clone())
                );
                for rs in &self.replica_sets {
                    let st = rs.status.clone().unwrap_or_default();
                    eprintln!(
                        "   rs {} rev {} desired {:?} spec {:?} status replicas {} avail {:?}",
                        name_of(&rs.metadata),
                        crate::deployment::revision(rs),
                        rs.metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(crate::deployment::DESIRED_REPLICAS_ANNOTATION)),
                        rs.spec.as_ref().and_then(|s| s.replicas),
                        st.replicas,
                        st.available_replicas
                    );
                }
                for a in &outcome.actions {
                    if let Action::Event(e) = a {
                        eprintln!("   {}", e.message);
                    }
                }
            }
            self.apply(outcome.actions);
        }
    }

    pub fn reconcile_replica_sets(&mut self) {
        for i in 0..self.replica_sets.len() {
            let Some(rs) = self.replica_sets.get(i).cloned() else {
                break;
            };
            let mut names = self.names.clone();
            let outcome =
                crate::replicaset::reconcile(&rs, &self.pods, &mut names, ts(self.now)).unwrap();
            self.names = names;
            self.apply(outcome.actions);
        }
    }

    /// One round of every control loop, one second later.
    pub fn step(&mut self) {
        self.now += 1;
        self.reconcile_deployments();
        self.reconcile_replica_sets();
        self.kubelet();
        self.reconcile_replica_sets();
        self.reconcile_deployments();
    }

    pub fn owned_pods(&self, rs: &ReplicaSet) -> Vec<&Pod> {
        let uid = rs.metadata.uid.clone().unwrap_or_default();
        self.pods
            .iter()
            .filter(|p| controller_of(&p.metadata).is_some_and(|o| o.uid == uid))
            .collect()
    }

    pub fn rs_by_revision(&self, revision: i64) -> Option<&ReplicaSet> {
        self.replica_sets
            .iter()
            .find(|rs| crate::deployment::revision(rs) == revision)
    }
}

/// `kubectl rollout status`'s "successfully rolled out" test (kubectl-wire.md section 11), or
/// an error when the progress deadline was exceeded.
pub fn rollout_done(d: &Deployment) -> Result<bool, String> {
    let status = d.status.clone().unwrap_or_default();
    let spec_replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if d.metadata.generation.unwrap_or(0) > status.observed_generation.unwrap_or(0) {
        return Ok(false);
    }
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing")
        && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    {
        return Err(format!(
            "deployment {:?} exceeded its progress deadline",
            d.metadata.name
        ));
    }
    let updated = status.updated_replicas.unwrap_or(0);
    Ok(updated >= spec_replicas
        && status.replicas.unwrap_or(0) <= updated
        && status.available_replicas.unwrap_or(0) >= updated)
}
