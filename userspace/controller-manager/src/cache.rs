//! Watch caches (kube-rs reflectors) that wake the loops interested in a kind, the per-pass
//! views the loops read them through, and the pacing between passes.
//!
//! Every loop is a whole-cluster pass (simple to reason about: level-triggered, no work queue).
//! Two rules keep that affordable at 10,000 pods and 5,000 Services: a pass reads each cache
//! once, grouped the way its reconciles look things up (`ByNamespace`, `PodsByLabel`), never
//! once per owner; and a loop woken by events waits at least `PACE` times its last pass before
//! the next, so a busy cluster gets fewer, larger passes instead of one core spent re-reading
//! the caches (see `until_next_pass`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::Resource;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Starts a reflector over every object of `K` (all namespaces) and returns its store. Every
/// watch event wakes each of `wake` (a stored permit, so a busy loop runs once more later).
pub(crate) fn reflect<K>(
    client: &kube::Client,
    wake: Vec<Arc<Notify>>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let (reader, writer) = reflector::store::<K>();
    let kind = K::kind(&()).to_string();
    tasks.push(tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => wake.iter().for_each(|n| n.notify_one()),
                // The watcher retries with back-off; the store keeps its last state meanwhile.
                Err(e) => tracing::warn!("watching {kind} failed (retrying): {e}"),
            }
        }
    }));
    reader
}

/// Waits until every store has had its initial list, so no loop decides from a partial view.
pub(crate) async fn wait_ready<K>(store: &Store<K>) -> anyhow::Result<()>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .wait_until_ready()
        .await
        .map_err(|e| anyhow::anyhow!("watch cache for {} never filled: {e}", K::kind(&())))
}

/// Objects of `store` in namespace `ns`, cloned.
pub(crate) fn in_namespace<K>(store: &Store<K>, ns: &str) -> Vec<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state()
        .into_iter()
        .filter(|o| o.meta().namespace.as_deref() == Some(ns))
        .map(|o| (*o).clone())
        .collect()
}

/// One store's objects grouped by a key (their namespace, or the Service they belong to),
/// cloned once for the pass: a pass reconciles many owners in a namespace, and cloning the
/// namespace's objects for each owner made a pass cost owners x objects (5,000 Services x
/// 1,000 pods each pass).
pub(crate) struct Grouped<K> {
    groups: HashMap<String, Vec<K>>,
}

impl<K> Grouped<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// Objects for which `key` gives a group; the others are left out.
    pub(crate) fn by(store: &Store<K>, key: impl Fn(&K) -> Option<String>) -> Grouped<K> {
        let mut groups: HashMap<String, Vec<K>> = HashMap::new();
        for o in store.state() {
            if let Some(k) = key(&o) {
                groups.entry(k).or_default().push((*o).clone());
            }
        }
        Grouped { groups }
    }

    /// For a controller that does not read this kind.
    pub(crate) fn empty() -> Grouped<K> {
        Grouped {
            groups: HashMap::new(),
        }
    }

    pub(crate) fn by_namespace(store: &Store<K>) -> Grouped<K> {
        Grouped::by(store, |o| {
            Some(o.meta().namespace.clone().unwrap_or_default())
        })
    }

    pub(crate) fn get(&self, key: &str) -> &[K] {
        self.groups.get(key).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Pods indexed by (namespace, label key, label value), for controllers that look pods up by a
/// Service's selector: a Service's candidates are the pods carrying one of its selector's
/// pairs, a superset of what the selector matches (the reconcile still applies the whole
/// selector), found without reading the namespace's other pods.
pub(crate) struct PodsByLabel {
    index: HashMap<(String, String, String), Vec<Arc<Pod>>>,
}

impl PodsByLabel {
    pub(crate) fn of(store: &Store<Pod>) -> PodsByLabel {
        let mut index: HashMap<(String, String, String), Vec<Arc<Pod>>> = HashMap::new();
        for pod in store.state() {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            for (k, v) in pod.metadata.labels.iter().flatten() {
                index
                    .entry((ns.clone(), k.clone(), v.clone()))
                    .or_default()
                    .push(pod.clone());
            }
        }
        PodsByLabel { index }
    }

    /// Clones of the pods in `ns` that carry `selector`'s first pair (the smallest set would
    /// take a lookup per pair; one is enough to avoid scanning the namespace). An empty
    /// selector selects nothing here: the controllers treat it as "no selector".
    pub(crate) fn candidates(&self, ns: &str, selector: &BTreeMap<String, String>) -> Vec<Pod> {
        let Some((k, v)) = selector.iter().next() else {
            return Vec::new();
        };
        self.index
            .get(&(ns.to_string(), k.clone(), v.clone()))
            .map(|pods| pods.iter().map(|p| (**p).clone()).collect())
            .unwrap_or_default()
    }
}

/// How many times its last pass's busy time a loop woken by events stays idle before the next
/// pass: at 3 a loop spends at most a quarter of a core on passes however fast events come,
/// and a change still lands within four pass-times.
const PACE: u32 = 3;

/// Measures a pass's busy time: reading caches and deciding, not waiting on its own writes (a
/// pass that writes a lot is slow on the network, not on the core, and must not be slowed
/// down for it).
pub(crate) struct PassTimer {
    started: Instant,
    writing: Duration,
}

impl PassTimer {
    pub(crate) fn start() -> PassTimer {
        PassTimer {
            started: Instant::now(),
            writing: Duration::ZERO,
        }
    }

    /// Awaits one of the pass's writes, its time not counted as busy.
    pub(crate) async fn write<T>(&mut self, write: impl Future<Output = T>) -> T {
        let at = Instant::now();
        let out = write.await;
        self.writing += at.elapsed();
        out
    }

    pub(crate) fn busy(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.writing)
    }
}

/// Waits for the next pass of a loop whose last pass was busy for `busy`: until `wake` is
/// notified (a watch event) or `timer` runs out, then, after a wake, `settle` more (a create
/// and its status write land in one pass); in either case at least `PACE` x `busy` since the
/// last pass ended.
pub(crate) async fn until_next_pass(
    wake: &Notify,
    timer: Duration,
    settle: Duration,
    busy: Duration,
) {
    // tokio's clock (the same as std's, except that tests can pause it).
    let idle_since = tokio::time::Instant::now();
    let woken = tokio::select! {
        _ = wake.notified() => true,
        _ = tokio::time::sleep(timer) => false,
    };
    let settle = if woken { settle } else { Duration::ZERO };
    let least = settle.max(busy * PACE);
    tokio::time::sleep(least.saturating_sub(idle_since.elapsed())).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    fn store(pods: Vec<Pod>) -> Store<Pod> {
        let (reader, mut writer) = reflector::store::<Pod>();
        for p in pods {
            writer.apply_watcher_event(&Event::Apply(p));
        }
        reader
    }

    fn names(pods: &[Pod]) -> Vec<String> {
        let mut n: Vec<String> = pods
            .iter()
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn candidates_are_the_pods_of_the_namespace_with_the_first_pair() {
        let s = store(vec![
            pod("a", "web-1", &[("app", "web"), ("tier", "front")]),
            pod("a", "web-2", &[("app", "web")]),
            pod("a", "db-1", &[("app", "db")]),
            pod("b", "web-3", &[("app", "web")]),
        ]);
        let index = PodsByLabel::of(&s);
        let sel = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            names(&index.candidates("a", &sel(&[("app", "web")]))),
            ["web-1", "web-2"]
        );
        // A superset: the reconcile applies the second pair itself.
        assert_eq!(
            names(&index.candidates("a", &sel(&[("app", "web"), ("tier", "front")]))),
            ["web-1", "web-2"]
        );
        assert_eq!(
            names(&index.candidates("b", &sel(&[("app", "web")]))),
            ["web-3"]
        );
        assert!(index.candidates("a", &sel(&[("app", "cache")])).is_empty());
        assert!(index.candidates("a", &BTreeMap::new()).is_empty());
    }

    #[test]
    fn grouped_by_namespace_and_by_key() {
        let s = store(vec![
            pod("a", "p1", &[("svc", "x")]),
            pod("a", "p2", &[]),
            pod("b", "p3", &[("svc", "x")]),
        ]);
        let by_ns = Grouped::by_namespace(&s);
        assert_eq!(names(by_ns.get("a")), ["p1", "p2"]);
        assert_eq!(names(by_ns.get("b")), ["p3"]);
        assert!(by_ns.get("c").is_empty());
        let by_svc = Grouped::by(&s, |p| p.metadata.labels.as_ref()?.get("svc").cloned());
        assert_eq!(names(by_svc.get("x")), ["p1", "p3"]);
        assert!(Grouped::<Pod>::empty().get("a").is_empty());
    }

    /// How long `until_next_pass` waits (on the paused clock), woken or not.
    async fn waited(woken: bool, timer_ms: u64, busy_ms: u64) -> Duration {
        let wake = Notify::new();
        if woken {
            wake.notify_one();
        }
        let t = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        until_next_pass(&wake, ms(timer_ms), ms(20), ms(busy_ms)).await;
        t.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_woken_loop_waits_pace_times_its_busy_time() {
        let ms = Duration::from_millis;
        assert_eq!(waited(true, 30_000, 100).await, ms(300));
        // A cheap pass: the settle time only.
        assert_eq!(waited(true, 30_000, 1).await, ms(20));
        // Not woken: the timer, or PACE x busy if that is longer.
        assert_eq!(waited(false, 500, 1).await, ms(500));
        assert_eq!(waited(false, 500, 1_000).await, ms(3_000));
    }
}
