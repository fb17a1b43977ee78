//! The controller loops: reflector caches in, pure reconciles, Actions applied out.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    Endpoints, Event, EventSource, Node, Pod, ResourceQuota, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy,
};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use skiff_controllers::{
    Action, EventRecord, Kind, Object, Outcome, ReconcileError, SeededSuffixes, cronjob, daemonset,
    deployment, endpointslice, job, quota, replicaset,
};
use tokio::sync::Notify;

use crate::cache::{Grouped, PassTimer, PodsByLabel, until_next_pass};

/// How long a loop waits for its own writes to show up in its cache before acting anyway
/// (Kubernetes waits 5 minutes; a lost watch event should not stall a controller that long).
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Full resync when nothing else wakes a loop.
const RESYNC: Duration = Duration::from_secs(30);
/// Retry delay after a conflict or a failed write.
const RETRY: Duration = Duration::from_secs(1);
/// After a wake, how long a loop waits for the rest of a burst of events (a create and its
/// status write) so they land in one pass.
pub(crate) const SETTLE: Duration = Duration::from_millis(20);

/// Every watch cache the controllers read.
pub(crate) struct Caches {
    pub deployments: Store<Deployment>,
    pub replica_sets: Store<ReplicaSet>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub endpoints: Store<Endpoints>,
    pub nodes: Store<Node>,
    pub jobs: Store<Job>,
    pub daemon_sets: Store<DaemonSet>,
    pub cron_jobs: Store<CronJob>,
    pub quotas: Store<ResourceQuota>,
    pub hpas: Store<HorizontalPodAutoscaler>,
    /// Every served resource, for the garbage collector and quota usage.
    pub dynamic: Arc<crate::gc::DynamicCaches>,
}

/// What the cache shows of one object: (uid, resourceVersion, being deleted).
type Seen = (Option<String>, Option<String>, bool);

fn seen<K: Resource<DynamicType = ()> + Clone + 'static>(
    store: &Store<K>,
    ns: &str,
    name: &str,
) -> Option<Seen> {
    store.get(&ObjectRef::new(name).within(ns)).map(|o| {
        let m = o.meta();
        (
            m.uid.clone(),
            m.resource_version.clone(),
            m.deletion_timestamp.is_some(),
        )
    })
}

impl Caches {
    fn seen(&self, kind: Kind, ns: &str, name: &str) -> Option<Seen> {
        match kind {
            Kind::Pod => seen(&self.pods, ns, name),
            Kind::ReplicaSet => seen(&self.replica_sets, ns, name),
            Kind::Deployment => seen(&self.deployments, ns, name),
            Kind::EndpointSlice => seen(&self.slices, ns, name),
            Kind::Endpoints => seen(&self.endpoints, ns, name),
            Kind::Job => seen(&self.jobs, ns, name),
            Kind::Service => seen(&self.services, ns, name),
            Kind::DaemonSet => seen(&self.daemon_sets, ns, name),
            Kind::CronJob => seen(&self.cron_jobs, ns, name),
            Kind::ResourceQuota => seen(&self.quotas, ns, name),
            Kind::HorizontalPodAutoscaler => seen(&self.hpas, ns, name),
        }
    }
}

/// One of our writes that the cache must show before we reconcile its owner again.
#[derive(Debug, Clone)]
pub(crate) enum Expect {
    /// Written with this resourceVersion (skiff's resourceVersion is the store revision, so
    /// a cache entry at or past it includes the write).
    Written {
        kind: Kind,
        ns: String,
        name: String,
        rv: u64,
    },
    /// Deleted (or marked for deletion) the object with this uid.
    Deleted {
        kind: Kind,
        ns: String,
        name: String,
        uid: Option<String>,
    },
}

impl Expect {
    fn met(&self, caches: &Caches) -> bool {
        match self {
            Expect::Written { kind, ns, name, rv } => caches
                .seen(*kind, ns, name)
                .and_then(|(_, seen_rv, _)| seen_rv)
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|seen_rv| seen_rv >= *rv),
            Expect::Deleted {
                kind,
                ns,
                name,
                uid,
            } => match caches.seen(*kind, ns, name) {
                None => true,
                Some((seen_uid, _, deleting)) => deleting || (uid.is_some() && seen_uid != *uid),
            },
        }
    }
}

/// Kubernetes' controller "expectations": per reconciled object, the writes not yet seen.
#[derive(Default)]
struct Expectations {
    pending: HashMap<String, (Instant, Vec<Expect>)>,
    /// ResourceQuotas whose `status.used` a pass would lower: the quota's resourceVersion then
    /// and since when. Admission charges `used` just before it creates the object, so a count
    /// taken in between (the charge itself wakes the quota loop) is short by that object;
    /// lowering is only done once the quota has stayed unchanged for `QUOTA_LOWER_AFTER`.
    quota_lowering: HashMap<String, (Option<String>, Instant)>,
}

/// How long a quota's charge must stand before a recount may lower it (see `quota_lowering`).
const QUOTA_LOWER_AFTER: Duration = Duration::from_secs(2);

impl Expectations {
    /// Whether `key` may be reconciled now; drops met or expired expectations.
    fn ready(&mut self, key: &str, caches: &Caches) -> bool {
        let Some((since, expects)) = self.pending.get_mut(key) else {
            return true;
        };
        expects.retain(|e| !e.met(caches));
        if expects.is_empty() || since.elapsed() > EXPECTATION_TIMEOUT {
            if !expects.is_empty() {
                tracing::warn!("{key}: own writes not seen after 30 s, reconciling anyway");
            }
            self.pending.remove(key);
            return true;
        }
        false
    }

    fn set(&mut self, key: String, expects: Vec<Expect>) {
        if expects.is_empty() {
            self.pending.remove(&key);
        } else {
            self.pending.insert(key, (Instant::now(), expects));
        }
    }

    /// When the oldest pending expectation expires, so the loop wakes to act anyway.
    fn next_deadline(&self) -> Option<Duration> {
        self.pending
            .values()
            .map(|(since, _)| EXPECTATION_TIMEOUT.saturating_sub(since.elapsed()))
            .min()
    }
}

fn rv_of(meta: &ObjectMeta) -> Option<u64> {
    meta.resource_version.as_deref()?.parse().ok()
}

fn written(kind: Kind, meta: &ObjectMeta) -> Option<Expect> {
    Some(Expect::Written {
        kind,
        ns: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        rv: rv_of(meta)?,
    })
}

/// Applies an Outcome's actions in order. Returns the expectations of the writes that
/// succeeded and whether to retry soon (a conflict or failure: the cache was stale or the
/// apiserver refused; the next reconcile decides again from fresh state).
pub(crate) async fn apply_outcome(
    client: &Client,
    component: &str,
    outcome: &Outcome,
) -> (Vec<Expect>, bool) {
    let mut expects = Vec::new();
    // resourceVersions our own Updates produced, so a following UpdateStatus of the same object
    // does not conflict with the write just made.
    let mut fresh_rv: HashMap<(Kind, String, String), String> = HashMap::new();
    for action in &outcome.actions {
        let result = apply(client, component, action, &mut fresh_rv).await;
        match result {
            Ok(Some(e)) => expects.push(e),
            Ok(None) => {}
            Err(e) => {
                let benign = matches!(&e, kube::Error::Api(s) if s.code == 409 || s.code == 404);
                if benign {
                    tracing::debug!("{component}: {} skipped: {e}", describe(action));
                } else {
                    tracing::warn!("{component}: {} failed: {e}", describe(action));
                }
                // Later actions were decided assuming this one happened: stop and retry.
                return (expects, true);
            }
        }
    }
    (expects, false)
}

fn describe(action: &Action) -> String {
    let obj = |o: &Object| {
        let m = o.metadata();
        format!(
            "{:?} {}/{}",
            o.kind(),
            m.namespace.as_deref().unwrap_or(""),
            m.name.as_deref().unwrap_or("")
        )
    };
    match action {
        Action::Create(o) => format!("create {}", obj(o)),
        Action::Update(o) => format!("update {}", obj(o)),
        Action::UpdateStatus(o) => format!("status update {}", obj(o)),
        Action::Delete {
            kind,
            namespace,
            name,
            ..
        } => format!("delete {kind:?} {namespace}/{name}"),
        Action::Event(e) => format!("event {}", e.reason),
        Action::Scale {
            kind,
            namespace,
            name,
            replicas,
            ..
        } => format!("scale {kind} {namespace}/{name} to {replicas}"),
    }
}

trait Namespaced:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
{
}
impl<K> Namespaced for K where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug
{
}

fn api_for<K: Namespaced>(client: &Client, meta: &ObjectMeta) -> Api<K> {
    Api::namespaced(
        client.clone(),
        meta.namespace.as_deref().unwrap_or("default"),
    )
}

async fn create<K: Namespaced>(client: &Client, obj: &K) -> kube::Result<ObjectMeta> {
    let created = api_for::<K>(client, obj.meta())
        .create(&PostParams::default(), obj)
        .await?;
    Ok(created.meta().clone())
}

async fn update<K: Namespaced>(client: &Client, obj: &K) -> kube::Result<ObjectMeta> {
    let updated = api_for::<K>(client, obj.meta())
        .replace(&obj.name_any(), &PostParams::default(), obj)
        .await?;
    Ok(updated.meta().clone())
}

/// PUT of the status subresource with the whole object (not a merge patch: a status field that
/// went away, like readyReplicas dropping to zero, must be removed, which a merge patch of the
/// serialized status, with its empty fields omitted, would not do).
async fn update_status<K: Namespaced>(
    client: &Client,
    obj: &K,
    rv: Option<String>,
) -> kube::Result<ObjectMeta> {
    let mut obj = obj.clone();
    if let Some(rv) = rv {
        obj.meta_mut().resource_version = Some(rv);
    }
    let updated = api_for::<K>(client, obj.meta())
        .replace_status(&obj.name_any(), &PostParams::default(), &obj)
        .await?;
    Ok(updated.meta().clone())
}

async fn delete<K: Namespaced>(
    client: &Client,
    ns: &str,
    name: &str,
    uid: &Option<String>,
) -> kube::Result<()> {
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: uid.clone(),
            resource_version: None,
        }),
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

macro_rules! each_object {
    ($obj:expr, $o:ident => $body:expr) => {
        match $obj {
            Object::Pod($o) => $body,
            Object::ReplicaSet($o) => $body,
            Object::Deployment($o) => $body,
            Object::EndpointSlice($o) => $body,
            Object::Endpoints($o) => $body,
            Object::Job($o) => $body,
            Object::DaemonSet($o) => $body,
            Object::CronJob($o) => $body,
            Object::HorizontalPodAutoscaler($o) => $body,
            Object::ResourceQuota($o) => $body,
        }
    };
}

async fn apply(
    client: &Client,
    component: &str,
    action: &Action,
    fresh_rv: &mut HashMap<(Kind, String, String), String>,
) -> kube::Result<Option<Expect>> {
    let key = |o: &Object| {
        let m = o.metadata();
        (
            o.kind(),
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    };
    match action {
        Action::Create(obj) => {
            let meta = each_object!(obj, o => create(client, &**o).await)?;
            Ok(written(obj.kind(), &meta))
        }
        Action::Update(obj) => {
            let meta = each_object!(obj, o => update(client, &**o).await)?;
            if let Some(rv) = &meta.resource_version {
                fresh_rv.insert(key(obj), rv.clone());
            }
            Ok(written(obj.kind(), &meta))
        }
        Action::UpdateStatus(obj) => {
            let rv = fresh_rv.get(&key(obj)).cloned();
            let meta = each_object!(obj, o => update_status(client, &**o, rv).await)?;
            if let Some(rv) = &meta.resource_version {
                fresh_rv.insert(key(obj), rv.clone());
            }
            Ok(written(obj.kind(), &meta))
        }
        Action::Delete {
            kind,
            namespace,
            name,
            uid,
        } => {
            match kind {
                Kind::Pod => delete::<Pod>(client, namespace, name, uid).await?,
                Kind::ReplicaSet => delete::<ReplicaSet>(client, namespace, name, uid).await?,
                Kind::Deployment => delete::<Deployment>(client, namespace, name, uid).await?,
                Kind::EndpointSlice => {
                    delete::<EndpointSlice>(client, namespace, name, uid).await?
                }
                Kind::Endpoints => delete::<Endpoints>(client, namespace, name, uid).await?,
                Kind::Job => delete::<Job>(client, namespace, name, uid).await?,
                Kind::Service => delete::<Service>(client, namespace, name, uid).await?,
                Kind::DaemonSet => delete::<DaemonSet>(client, namespace, name, uid).await?,
                Kind::CronJob => delete::<CronJob>(client, namespace, name, uid).await?,
                Kind::ResourceQuota => {
                    delete::<ResourceQuota>(client, namespace, name, uid).await?
                }
                Kind::HorizontalPodAutoscaler => {
                    delete::<HorizontalPodAutoscaler>(client, namespace, name, uid).await?
                }
            }
            Ok(Some(Expect::Deleted {
                kind: *kind,
                ns: namespace.clone(),
                name: name.clone(),
                uid: uid.clone(),
            }))
        }
        Action::Event(record) => {
            post_event(client, component, record).await?;
            Ok(None)
        }
        Action::Scale {
            api_version,
            kind,
            namespace,
            name,
            replicas,
        } => {
            let ar = crate::gc::served(api_version, kind)
                .map(|s| s.resource)
                .ok_or_else(|| {
                    kube::Error::Api(
                        kube::core::Status::failure(
                            &format!(
                                "{kind} in {api_version} is not a resource this cluster serves"
                            ),
                            "NotFound",
                        )
                        .with_code(404)
                        .boxed(),
                    )
                })?;
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
            api.patch_scale(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
            )
            .await?;
            Ok(None)
        }
    }
}

/// Posts a core/v1 Event (what `kubectl describe` and `kubectl get events` show).
pub(crate) async fn post_event(
    client: &Client,
    component: &str,
    record: &EventRecord,
) -> kube::Result<()> {
    let ns = record
        .involved
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let now = Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!(
                "{}.",
                record.involved.name.as_deref().unwrap_or("event")
            )),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        involved_object: record.involved.clone(),
        reason: Some(record.reason.clone()),
        message: Some(record.message.clone()),
        type_: Some(record.event_type.as_str().to_string()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        source: Some(EventSource {
            component: Some(component.to_string()),
            host: None,
        }),
        reporting_component: Some(component.to_string()),
        reporting_instance: Some(component.to_string()),
        action: Some(record.reason.clone()),
        ..Event::default()
    };
    Api::<Event>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &event)
        .await?;
    Ok(())
}

/// Which controller a loop runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Which {
    Deployment,
    ReplicaSet,
    EndpointSlice,
    Endpoints,
    Job,
    DaemonSet,
    CronJob,
    ResourceQuota,
}

impl Which {
    fn component(self) -> &'static str {
        match self {
            Which::Deployment => "deployment-controller",
            Which::ReplicaSet => "replicaset-controller",
            Which::EndpointSlice => "endpointslice-controller",
            Which::Endpoints => "endpoint-controller",
            Which::Job => "job-controller",
            Which::DaemonSet => "daemonset-controller",
            Which::CronJob => "cronjob-controller",
            Which::ResourceQuota => "resourcequota-controller",
        }
    }
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// One controller: wakes on its caches' events, reconciles every object of its kind whose
/// expectations are met, applies the actions, sleeps until woken or the earliest requeue.
pub(crate) async fn control_loop(
    which: Which,
    client: Client,
    caches: Arc<Caches>,
    wake: Arc<Notify>,
) {
    let mut expectations = Expectations::default();
    let mut names = SeededSuffixes::new(seed());
    loop {
        let mut timer = PassTimer::start();
        let next = pass(
            which,
            &client,
            &caches,
            &mut expectations,
            &mut names,
            &mut timer,
        )
        .await;
        let next = next.unwrap_or(RESYNC).min(RESYNC);
        until_next_pass(&wake, next, SETTLE, timer.busy()).await;
    }
}

fn key_of(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// One pass over every object of the controller's kind. Returns when to run again at the latest.
async fn pass(
    which: Which,
    client: &Client,
    caches: &Caches,
    expectations: &mut Expectations,
    names: &mut SeededSuffixes,
    timer: &mut PassTimer,
) -> Option<Duration> {
    let now = Timestamp::now();
    let mut next: Option<Duration> = None;
    let mut sooner = |d: Duration| {
        next = Some(next.map_or(d, |n: Duration| n.min(d)));
    };
    let owners: Vec<ObjectMeta> = match which {
        Which::Deployment => meta_list(&caches.deployments),
        Which::ReplicaSet => meta_list(&caches.replica_sets),
        Which::EndpointSlice | Which::Endpoints => meta_list(&caches.services),
        Which::Job => meta_list(&caches.jobs),
        Which::DaemonSet => meta_list(&caches.daemon_sets),
        Which::CronJob => meta_list(&caches.cron_jobs),
        Which::ResourceQuota => meta_list(&caches.quotas),
    };
    if owners.is_empty() {
        return expectations
            .next_deadline()
            .map(|d| d + Duration::from_millis(10));
    }
    // What this controller's reconciles read, read once for the whole pass (see crate::cache).
    let pods = match which {
        Which::Deployment | Which::ReplicaSet | Which::Job | Which::DaemonSet => {
            Grouped::by_namespace(&caches.pods)
        }
        _ => Grouped::empty(),
    };
    let pods_by_label = match which {
        Which::EndpointSlice | Which::Endpoints => Some(PodsByLabel::of(&caches.pods)),
        _ => None,
    };
    let replica_sets = match which {
        Which::Deployment => Grouped::by_namespace(&caches.replica_sets),
        _ => Grouped::empty(),
    };
    let jobs = match which {
        Which::CronJob => Grouped::by_namespace(&caches.jobs),
        _ => Grouped::empty(),
    };
    // A Service's slices are those labelled with its name (a superset of the ones it manages,
    // which the reconcile picks out).
    let slices = match which {
        Which::EndpointSlice => Grouped::by(&caches.slices, |s| {
            let svc = s
                .metadata
                .labels
                .as_ref()?
                .get(endpointslice::SERVICE_NAME_LABEL)?;
            Some(format!(
                "{}/{svc}",
                s.metadata.namespace.as_deref().unwrap_or("")
            ))
        }),
        _ => Grouped::empty(),
    };
    let nodes: Vec<Node> = match which {
        Which::DaemonSet | Which::EndpointSlice => {
            caches.nodes.state().iter().map(|n| (**n).clone()).collect()
        }
        _ => Vec::new(),
    };
    let selected = |svc: &Service, ns: &str| -> Vec<Pod> {
        let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
        match (&pods_by_label, selector) {
            (Some(index), Some(selector)) => index.candidates(ns, selector),
            _ => Vec::new(),
        }
    };
    let mut usage_by_ns: HashMap<String, quota::Usage> = HashMap::new();
    for meta in owners {
        let key = key_of(&meta);
        if !expectations.ready(&key, caches) {
            continue;
        }
        let ns = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        if let Which::ResourceQuota = which
            && let Some(q) = caches.quotas.get(&ObjectRef::new(&name).within(&ns))
        {
            let cached = usage_by_ns
                .entry(ns.clone())
                .or_insert_with(|| caches.dynamic.namespace_usage(&ns));
            if !quota::lowers_used(&q, cached) {
                expectations.quota_lowering.remove(&key);
            } else {
                let rv = q.metadata.resource_version.clone();
                let since = match expectations.quota_lowering.get(&key) {
                    Some((seen, since)) if *seen == rv => *since,
                    _ => {
                        expectations
                            .quota_lowering
                            .insert(key.clone(), (rv, Instant::now()));
                        Instant::now()
                    }
                };
                let wait = QUOTA_LOWER_AFTER.saturating_sub(since.elapsed());
                if !wait.is_zero() {
                    sooner(wait + Duration::from_millis(10));
                    continue;
                }
                // The caches may still lag behind: recount from the apiserver.
                match timer
                    .write(caches.dynamic.live_namespace_usage(client, &ns))
                    .await
                {
                    Ok(live) => {
                        usage_by_ns.insert(ns.clone(), live);
                    }
                    Err(e) => {
                        tracing::warn!("{}: {key}: recounting usage: {e}", which.component());
                        sooner(RETRY);
                        continue;
                    }
                }
            }
        }
        let decided: Option<Result<Outcome, ReconcileError>> = match which {
            Which::Deployment => caches
                .deployments
                .get(&ObjectRef::new(&name).within(&ns))
                .map(|d| deployment::reconcile(&d, replica_sets.get(&ns), pods.get(&ns), now)),
            Which::ReplicaSet => caches
                .replica_sets
                .get(&ObjectRef::new(&name).within(&ns))
                .map(|rs| replicaset::reconcile(&rs, pods.get(&ns), names, now)),
            Which::EndpointSlice => {
                caches
                    .services
                    .get(&ObjectRef::new(&name).within(&ns))
                    .map(|svc| {
                        endpointslice::reconcile(
                            &svc,
                            &selected(&svc, &ns),
                            &nodes,
                            slices.get(&key),
                            names,
                        )
                    })
            }
            Which::Endpoints => {
                caches
                    .services
                    .get(&ObjectRef::new(&name).within(&ns))
                    .map(|svc| {
                        let existing = caches.endpoints.get(&ObjectRef::new(&name).within(&ns));
                        endpointslice::endpoints(&svc, &selected(&svc, &ns), existing.as_deref())
                    })
            }
            Which::Job => caches
                .jobs
                .get(&ObjectRef::new(&name).within(&ns))
                .map(|j| job::reconcile(&j, pods.get(&ns), names, now)),
            Which::DaemonSet => caches
                .daemon_sets
                .get(&ObjectRef::new(&name).within(&ns))
                .map(|d| daemonset::reconcile(&d, &nodes, pods.get(&ns), names, now)),
            Which::CronJob => caches
                .cron_jobs
                .get(&ObjectRef::new(&name).within(&ns))
                .map(|c| cronjob::reconcile(&c, jobs.get(&ns), now, &time_zone)),
            Which::ResourceQuota => {
                caches
                    .quotas
                    .get(&ObjectRef::new(&name).within(&ns))
                    .map(|q| {
                        let usage = usage_by_ns
                            .entry(ns.clone())
                            .or_insert_with(|| caches.dynamic.namespace_usage(&ns));
                        Ok(quota::reconcile(&q, usage))
                    })
            }
        };
        let outcome = match decided {
            None => continue,
            Some(Ok(outcome)) => outcome,
            Some(Err(e)) => {
                // The object itself is invalid: nothing to do until the user changes it
                // (which wakes this loop).
                tracing::warn!("{}: {key}: {e}", which.component());
                continue;
            }
        };
        if let Some(secs) = outcome.requeue_after {
            sooner(Duration::from_secs(secs.max(1) as u64));
        }
        if outcome.actions.is_empty() {
            continue;
        }
        tracing::debug!(
            "{}: {key}: {} action(s)",
            which.component(),
            outcome.actions.len()
        );
        let (expects, retry) = timer
            .write(apply_outcome(client, which.component(), &outcome))
            .await;
        expectations.set(key, expects);
        if retry {
            sooner(RETRY);
        }
    }
    if let Some(d) = expectations.next_deadline() {
        sooner(d + Duration::from_millis(10));
    }
    next
}

/// CronJob time zones from the system's tz database; no zone named: the local zone (as
/// kube-controller-manager does).
fn time_zone(name: Option<&str>) -> Option<jiff::tz::TimeZone> {
    match name {
        None => Some(jiff::tz::TimeZone::system()),
        Some(n) => jiff::tz::TimeZone::get(n).ok(),
    }
}

fn meta_list<K: Resource<DynamicType = ()> + Clone + 'static>(store: &Store<K>) -> Vec<ObjectMeta> {
    store.state().iter().map(|o| o.meta().clone()).collect()
}
