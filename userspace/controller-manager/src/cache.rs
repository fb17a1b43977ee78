//! Watch caches (kube-rs reflectors) that wake the loops interested in a kind.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
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
