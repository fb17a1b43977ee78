//! The HorizontalPodAutoscaler loop: every `--horizontal-pod-autoscaler-sync-period`, each HPA's
//! target scale is read through its `scale` subresource, its pods and their
//! `metrics.k8s.io/v1beta1` PodMetrics (posted by the node agents) come from the watch caches,
//! and the pure `skiff_controllers::hpa::reconcile` decides; a rescale is a merge patch of the
//! target's scale. The recommendations the stabilization windows need live here, in memory,
//! per HPA (as in kube-controller-manager: a restarted or new leader starts with none).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::DynamicObject;
use kube::{Api, Client};
use skiff_controllers::hpa::{self, HpaConfig, PodMetrics, Recommendation, ScaleTarget};

use crate::cache::in_namespace;
use crate::controllers::{Caches, apply_outcome};
use crate::gc::served;

const COMPONENT: &str = "horizontal-pod-autoscaler";

async fn read_scale(
    client: &Client,
    ns: &str,
    api_version: &str,
    kind: &str,
    name: &str,
) -> Result<ScaleTarget, String> {
    let s = served(api_version, kind)
        .ok_or_else(|| format!("{kind} in {api_version} is not served"))?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &s.resource);
    let scale = api.get_scale(name).await.map_err(|e| match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    })?;
    Ok(ScaleTarget {
        replicas: scale.spec.and_then(|s| s.replicas).unwrap_or(0),
        selector: scale.status.and_then(|s| s.selector),
    })
}

/// Runs until aborted.
pub(crate) async fn hpa_loop(
    client: Client,
    caches: Arc<Caches>,
    config: HpaConfig,
    sync_period: Duration,
) {
    let mut history: HashMap<String, Vec<Recommendation>> = HashMap::new();
    // Recommendations older than every window are useless.
    let keep_for = config.downscale_stabilization.max(3600);
    loop {
        let now = Timestamp::now();
        for h in caches.hpas.state() {
            let ns = h.metadata.namespace.clone().unwrap_or_default();
            let name = h.metadata.name.clone().unwrap_or_default();
            let key = format!("{ns}/{name}");
            let Some(spec) = h.spec.as_ref() else {
                continue;
            };
            let target_ref = &spec.scale_target_ref;
            let api_version = target_ref.api_version.clone().unwrap_or_default();
            let target = read_scale(
                &client,
                &ns,
                &api_version,
                &target_ref.kind,
                &target_ref.name,
            )
            .await;
            let metrics: BTreeMap<String, PodMetrics> = caches
                .dynamic
                .objects("metrics.k8s.io/v1beta1", "PodMetrics", &ns)
                .into_iter()
                .filter_map(|v| serde_json::from_value::<PodMetrics>(v).ok())
                .filter_map(|m| Some((m.metadata.name.clone()?, m)))
                .collect();
            let past = history.entry(key.clone()).or_default();
            past.retain(|r| r.at > now.as_second() - keep_for);
            let decided = hpa::reconcile(
                &h,
                target,
                &in_namespace(&caches.pods, &ns),
                &metrics,
                past,
                &config,
                now,
            );
            match decided {
                Ok(result) => {
                    if let Some(r) = result.recommendation {
                        past.push(r);
                    }
                    if !result.outcome.actions.is_empty() {
                        let _ = apply_outcome(&client, COMPONENT, &result.outcome).await;
                    }
                }
                Err(e) => tracing::warn!("{COMPONENT}: {key}: {e}"),
            }
        }
        history.retain(|k, _| {
            let (ns, name) = k.split_once('/').unwrap_or(("", ""));
            caches
                .hpas
                .get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))
                .is_some()
        });
        // Not woken by HPA changes: its own status writes would make it run far more often
        // than the period the scale-up rate limit assumes.
        tokio::time::sleep(sync_period).await;
    }
}
