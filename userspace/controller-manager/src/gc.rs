//! The garbage collector loop and the dynamic watch caches it shares with the quota controller.
//!
//! One reflector of `DynamicObject`s per resource skiff serves (from skiff-api's registry, minus
//! Events). A pass feeds every object's ownerReferences, finalizers and deletion state to the
//! pure `skiff_controllers::gc::collect` and applies its decisions:
//! - Delete (background dependents of an owner that is gone, dependents of an owner deleted in
//!   the foreground): only after a live GET confirms that no owner it references still exists
//!   un-deleted with the same uid (a watch cache may not show a brand-new owner yet, as
//!   Kubernetes' `attemptToDeleteItem` guards against), with the uid as precondition and the
//!   propagation `collect` chose.
//! - Remove ownerReferences (orphan propagation, or dangling references next to live ones) and
//!   remove the `foregroundDeletion`/`orphan` finalizer once the dependents are handled: merge
//!   patches carrying the cached resourceVersion, so a stale cache gets a 409 and a retry.
//!
//! The apiserver adds those finalizers when a delete asks for Foreground or Orphan propagation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use skiff_controllers::gc::{self, GcAction, GcObject, Propagation};
use skiff_controllers::quota;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::cache::{PassTimer, until_next_pass};

/// At most this many writes per pass (the next pass continues).
const MAX_ACTIONS_PER_PASS: usize = 500;
const RESYNC: Duration = Duration::from_secs(30);

/// A served resource: its kube-rs description and scope.
#[derive(Clone)]
pub(crate) struct Served {
    pub resource: ApiResource,
    pub namespaced: bool,
}

/// Looks a kind up in skiff's registry.
pub(crate) fn served(api_version: &str, kind: &str) -> Option<Served> {
    let info = skiff_api::registry::find_kind(api_version, kind)?;
    Some(Served {
        resource: ApiResource {
            group: info.group.to_string(),
            version: info.version.to_string(),
            api_version: info.api_version(),
            kind: info.kind.to_string(),
            plural: info.plural.to_string(),
        },
        namespaced: info.namespaced,
    })
}

/// Adds what one object of kind `s` uses to `usage` (quota accounting works on JSON).
fn add_object_usage(usage: &mut quota::Usage, s: &Served, obj: &DynamicObject) {
    if let Ok(v) = serde_json::to_value(obj) {
        quota::add(
            usage,
            &quota::object_usage(&s.resource.group, &s.resource.plural, &v),
        );
    }
}

/// Watch caches of every served resource.
pub(crate) struct DynamicCaches {
    pub kinds: Vec<(Served, Store<DynamicObject>)>,
}

impl DynamicCaches {
    /// Starts the reflectors. Changes wake `wake`, except for Leases and resource metrics,
    /// which change every few seconds and never start a collection by themselves.
    pub fn start(
        client: &Client,
        wake: Vec<Arc<Notify>>,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> DynamicCaches {
        let mut kinds = Vec::new();
        for info in skiff_api::registry::all() {
            if info.group.is_empty() && info.kind == "Event" {
                continue;
            }
            // Kinds that cannot be watched (SelfSubjectAccessReview: create only) own nothing.
            if !info.verbs.contains(&"watch") {
                continue;
            }
            let Some(s) = served(&info.api_version(), info.kind) else {
                continue;
            };
            let quiet = info.kind == "Lease" || info.group == "metrics.k8s.io";
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &s.resource);
            let writer = reflector::store::Writer::new(s.resource.clone());
            let reader = writer.as_reader();
            let wake = if quiet { Vec::new() } else { wake.clone() };
            let kind = info.kind;
            tasks.push(tokio::spawn(async move {
                let stream = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .reflect(writer);
                futures::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(_) => wake.iter().for_each(|n| n.notify_one()),
                        Err(e) => tracing::warn!("watching {kind} failed (retrying): {e}"),
                    }
                }
            }));
            kinds.push((s, reader));
        }
        DynamicCaches { kinds }
    }

    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        for (s, store) in &self.kinds {
            store.wait_until_ready().await.map_err(|e| {
                anyhow::anyhow!("watch cache for {} never filled: {e}", s.resource.kind)
            })?;
        }
        Ok(())
    }

    /// What the objects of namespace `ns` use, from a fresh list of every kind (the apiserver,
    /// not the caches): for the quota controller before it lowers `status.used`.
    pub async fn live_namespace_usage(&self, client: &Client, ns: &str) -> kube::Result<quota::Usage> {
        let mut usage = quota::Usage::new();
        for (s, _) in self.kinds.iter().filter(|(s, _)| s.namespaced) {
            let api = api_for(client, s, Some(ns));
            for obj in api.list(&kube::api::ListParams::default()).await?.items {
                add_object_usage(&mut usage, s, &obj);
            }
        }
        Ok(usage)
    }

    /// What the objects of namespace `ns` use, for ResourceQuota status.
    pub fn namespace_usage(&self, ns: &str) -> quota::Usage {
        let mut usage = quota::Usage::new();
        for (s, store) in self.kinds.iter().filter(|(s, _)| s.namespaced) {
            for obj in store.state() {
                if obj.metadata.namespace.as_deref() != Some(ns) {
                    continue;
                }
                add_object_usage(&mut usage, s, &obj);
            }
        }
        usage
    }

    /// The objects of one kind in namespace `ns`, as JSON.
    pub fn objects(&self, api_version: &str, kind: &str, ns: &str) -> Vec<Value> {
        self.kinds
            .iter()
            .filter(|(s, _)| s.resource.api_version == api_version && s.resource.kind == kind)
            .flat_map(|(_, store)| store.state())
            .filter(|o| o.metadata.namespace.as_deref() == Some(ns))
            .filter_map(|o| serde_json::to_value(&*o).ok())
            .collect()
    }
}

struct Known<'a> {
    served: &'a Served,
    object: Arc<DynamicObject>,
}

fn api_for(client: &Client, s: &Served, ns: Option<&str>) -> Api<DynamicObject> {
    match (s.namespaced, ns) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &s.resource),
        _ => Api::all_with(client.clone(), &s.resource),
    }
}

/// Whether some owner `object` references still exists, un-deleted, with the same uid (then a
/// Delete decided from the cache is premature).
async fn has_live_owner(client: &Client, object: &DynamicObject) -> bool {
    for r in object.owner_references() {
        let Some(s) = served(&r.api_version, &r.kind) else {
            continue; // a kind nobody serves cannot exist
        };
        let api = api_for(client, &s, object.metadata.namespace.as_deref());
        match api.get_opt(&r.name).await {
            Ok(Some(owner)) => {
                if owner.metadata.uid.as_deref() == Some(r.uid.as_str())
                    && owner.metadata.deletion_timestamp.is_none()
                {
                    return true;
                }
            }
            Ok(None) => {}
            // Unsure: act as if it were there (the next pass asks again).
            Err(_) => return true,
        }
    }
    false
}

/// One pass of the collector. Returns how many writes it made.
pub(crate) async fn collect_once(
    client: &Client,
    caches: &DynamicCaches,
    timer: &mut PassTimer,
) -> usize {
    let mut known: HashMap<String, Known> = HashMap::new();
    let mut objects: Vec<GcObject> = Vec::new();
    for (s, store) in &caches.kinds {
        for obj in store.state() {
            let Some(g) =
                GcObject::from_meta(&s.resource.api_version, &s.resource.kind, &obj.metadata)
            else {
                continue;
            };
            known.insert(
                g.reference.uid.clone(),
                Known {
                    served: s,
                    object: obj.clone(),
                },
            );
            objects.push(g);
        }
    }
    let actions = gc::collect(&objects);
    let mut writes = 0;
    // Owners some of whose dependents still reference them because dropping the reference
    // failed (a 409 from a stale cache): their orphan finalizer must stay, or the next pass
    // would find those dependents' owner gone and delete them.
    let mut still_referenced: std::collections::HashSet<String> = Default::default();
    for action in actions.into_iter().take(MAX_ACTIONS_PER_PASS) {
        let uid = match &action {
            GcAction::Delete { target, .. }
            | GcAction::RemoveOwnerReferences { target, .. }
            | GcAction::RemoveFinalizer { target, .. } => target.uid.clone(),
        };
        let Some(k) = known.get(&uid) else { continue };
        if matches!(action, GcAction::RemoveFinalizer { .. }) && still_referenced.contains(&uid) {
            continue;
        }
        let ns = k.object.metadata.namespace.as_deref();
        let name = k.object.name_any();
        let api = api_for(client, k.served, ns);
        let rv = k.object.metadata.resource_version.clone();
        let result = match &action {
            GcAction::Delete { propagation, .. } => {
                if timer.write(has_live_owner(client, &k.object)).await {
                    continue;
                }
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    propagation_policy: Some(match propagation {
                        Propagation::Background => kube::api::PropagationPolicy::Background,
                        Propagation::Foreground => kube::api::PropagationPolicy::Foreground,
                        Propagation::Orphan => kube::api::PropagationPolicy::Orphan,
                    }),
                    ..DeleteParams::default()
                };
                tracing::info!(
                    "garbage collector: deleting {} {}/{name} ({propagation:?})",
                    k.served.resource.kind,
                    ns.unwrap_or("")
                );
                timer.write(api.delete(&name, &params)).await.map(|_| ())
            }
            GcAction::RemoveOwnerReferences { owner_uids, .. } => {
                let kept: Vec<_> = k
                    .object
                    .owner_references()
                    .iter()
                    .filter(|r| !owner_uids.contains(&r.uid))
                    .cloned()
                    .collect();
                let refs = if kept.is_empty() {
                    Value::Null
                } else {
                    json!(kept)
                };
                let patch = json!({"metadata": {"ownerReferences": refs, "resourceVersion": rv}});
                timer
                    .write(api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)))
                    .await
                    .map(|_| ())
            }
            GcAction::RemoveFinalizer { finalizer, .. } => {
                let kept: Vec<&String> = k
                    .object
                    .finalizers()
                    .iter()
                    .filter(|f| *f != finalizer)
                    .collect();
                let list = if kept.is_empty() {
                    Value::Null
                } else {
                    json!(kept)
                };
                let patch = json!({"metadata": {"finalizers": list, "resourceVersion": rv}});
                timer
                    .write(api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)))
                    .await
                    .map(|_| ())
            }
        };
        if let (GcAction::RemoveOwnerReferences { owner_uids, .. }, Err(e)) = (&action, &result)
            && !matches!(e, kube::Error::Api(s) if s.code == 404)
        {
            still_referenced.extend(owner_uids.iter().cloned());
        }
        match result {
            Ok(()) => writes += 1,
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!("garbage collector: {action:?} failed: {e}"),
        }
    }
    writes
}

/// Runs the collector: a pass on every change (debounced) and every 30 s.
pub(crate) async fn gc_loop(client: Client, caches: Arc<DynamicCaches>, wake: Arc<Notify>) {
    loop {
        let mut timer = PassTimer::start();
        let writes = collect_once(&client, &caches, &mut timer).await;
        // Something was written: look again soon (its effects may need another step).
        let next = if writes > 0 {
            Duration::from_millis(500)
        } else {
            RESYNC
        };
        until_next_pass(&wake, next, Duration::from_millis(100), timer.busy()).await;
    }
}
