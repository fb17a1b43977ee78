//! The node controllers' loop: node IPAM and node lifecycle (skiff-controllers' pure
//! `node_ipam` and `node_lifecycle`) over the Node, Lease and Pod caches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use serde_json::json;
use skiff_controllers::EventType;
use skiff_controllers::node_ipam::{self, ClusterCidr, IpamAction, IpamState};
use skiff_controllers::node_lifecycle::{
    self, LifecycleConfig, LifecycleState, NODE_LEASE_NAMESPACE, NodeAction,
};
use tokio::sync::Notify;

use crate::cache::{PassTimer, until_next_pass};
use crate::controllers::{SETTLE, post_event};

const IPAM_COMPONENT: &str = "node-ipam-controller";
const LIFECYCLE_COMPONENT: &str = "node-controller";
/// Retry delay after a conflict or a failed write.
const RETRY: Duration = Duration::from_secs(1);

pub(crate) struct NodeCaches {
    pub nodes: Store<Node>,
    pub leases: Store<Lease>,
    pub pods: Store<Pod>,
}

pub(crate) struct NodeLoopConfig {
    pub range: ClusterCidr,
    pub lifecycle: LifecycleConfig,
    /// How often node health is checked even when nothing changes (Kubernetes'
    /// `--node-monitor-period`, 5 s).
    pub monitor_period: Duration,
}

/// Wakes on Node, Lease and Pod changes and at least every monitor period.
pub(crate) async fn node_loop(
    client: Client,
    caches: Arc<NodeCaches>,
    config: NodeLoopConfig,
    wake: Arc<Notify>,
) {
    let mut ipam = IpamState::default();
    let mut lifecycle = LifecycleState::default();
    loop {
        let mut timer = PassTimer::start();
        let next = pass(
            &client,
            &caches,
            &config,
            &mut ipam,
            &mut lifecycle,
            &mut timer,
        )
        .await;
        let next = next
            .unwrap_or(config.monitor_period)
            .min(config.monitor_period);
        until_next_pass(&wake, next, SETTLE, timer.busy()).await;
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 404)
}

async fn pass(
    client: &Client,
    caches: &NodeCaches,
    config: &NodeLoopConfig,
    ipam: &mut IpamState,
    lifecycle: &mut LifecycleState,
    timer: &mut PassTimer,
) -> Option<Duration> {
    let mut next: Option<Duration> = None;
    let mut sooner = |d: Duration| next = Some(next.map_or(d, |n: Duration| n.min(d)));
    let nodes: Vec<Node> = caches.nodes.state().iter().map(|n| (**n).clone()).collect();
    let node_api: Api<Node> = Api::all(client.clone());

    for action in node_ipam::plan(&config.range, &nodes, ipam) {
        match action {
            IpamAction::Assign {
                node,
                resource_version,
                cidr,
            } => {
                let patch = json!({
                    "metadata": {"resourceVersion": resource_version},
                    "spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]},
                });
                match timer
                    .write(node_api.patch(&node, &PatchParams::default(), &Patch::Merge(&patch)))
                    .await
                {
                    Ok(written) => {
                        tracing::info!("{IPAM_COMPONENT}: node {node}: podCIDR {cidr}");
                        ipam.assigned(&node, cidr, written.metadata.resource_version.as_deref());
                    }
                    Err(e) => {
                        if is_conflict(&e) {
                            tracing::debug!(
                                "{IPAM_COMPONENT}: node {node} changed; deciding again: {e}"
                            );
                        } else {
                            tracing::warn!(
                                "{IPAM_COMPONENT}: setting podCIDR {cidr} on node {node} failed: {e}"
                            );
                        }
                        sooner(RETRY);
                    }
                }
            }
            IpamAction::Event(record) => {
                tracing::warn!("{IPAM_COMPONENT}: {}", record.message);
                if let Err(e) = timer
                    .write(post_event(client, IPAM_COMPONENT, &record))
                    .await
                {
                    tracing::warn!(
                        "{IPAM_COMPONENT}: posting event {} failed: {e}",
                        record.reason
                    );
                }
            }
        }
    }

    // Shared, not copied: every Lease renewal wakes this loop, and copying 10,000 pods for
    // each pass was most of its cost.
    let mut by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
    for pod in caches.pods.state() {
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            by_node.entry(node).or_default().push(pod);
        }
    }
    let now = Timestamp::now();
    for node in &nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        let lease = caches
            .leases
            .get(&ObjectRef::new(name).within(NODE_LEASE_NAMESPACE));
        let pods = by_node.get(name).map(Vec::as_slice).unwrap_or(&[]);
        let pods = pods.iter().map(|p| &**p);
        let outcome = node_lifecycle::reconcile(
            lifecycle,
            &config.lifecycle,
            node,
            lease.as_deref(),
            pods,
            now,
        );
        if let Some(d) = outcome.requeue_after {
            sooner(d);
        }
        if !timer.write(apply(client, &outcome.actions)).await {
            sooner(RETRY);
        }
    }
    let removed = node_lifecycle::forget_gone(lifecycle, &nodes);
    timer.write(apply(client, &removed)).await;
    next
}

/// Applies one Node's actions in order; false (retry soon) at the first that fails.
async fn apply(client: &Client, actions: &[NodeAction]) -> bool {
    let nodes: Api<Node> = Api::all(client.clone());
    // A SetTaints after a SetConditions of the same Node must name the version just written.
    let mut fresh_rv: HashMap<String, Option<String>> = HashMap::new();
    for action in actions {
        let result: kube::Result<()> = async {
            match action {
                NodeAction::SetConditions {
                    node,
                    resource_version,
                    conditions,
                } => {
                    let rv = fresh_rv
                        .get(node)
                        .cloned()
                        .unwrap_or(resource_version.clone());
                    let patch = json!({
                        "metadata": {"resourceVersion": rv},
                        "status": {"conditions": conditions},
                    });
                    let written = nodes
                        .patch_status(node, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                    let ready = conditions.iter().find(|c| c.type_ == "Ready");
                    tracing::info!(
                        "{LIFECYCLE_COMPONENT}: node {node}: Ready={} ({})",
                        ready.map_or("?", |c| c.status.as_str()),
                        ready.and_then(|c| c.reason.as_deref()).unwrap_or("")
                    );
                    fresh_rv.insert(node.clone(), written.metadata.resource_version);
                }
                NodeAction::SetTaints {
                    node,
                    resource_version,
                    taints,
                } => {
                    let rv = fresh_rv
                        .get(node)
                        .cloned()
                        .unwrap_or(resource_version.clone());
                    let taints = if taints.is_empty() {
                        serde_json::Value::Null
                    } else {
                        serde_json::to_value(taints).unwrap_or(serde_json::Value::Null)
                    };
                    let patch = json!({
                        "metadata": {"resourceVersion": rv},
                        "spec": {"taints": taints},
                    });
                    let written = nodes
                        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                    tracing::info!("{LIFECYCLE_COMPONENT}: node {node}: taints now {taints}");
                    fresh_rv.insert(node.clone(), written.metadata.resource_version);
                }
                NodeAction::MarkPodNotReady(pod) => {
                    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
                    let name = pod.metadata.name.as_deref().unwrap_or_default();
                    Api::<Pod>::namespaced(client.clone(), ns)
                        .replace_status(name, &PostParams::default(), &**pod)
                        .await?;
                }
                NodeAction::EvictPod {
                    namespace,
                    name,
                    uid,
                } => {
                    let params = DeleteParams {
                        preconditions: Some(Preconditions {
                            uid: uid.clone(),
                            resource_version: None,
                        }),
                        ..DeleteParams::default()
                    };
                    match Api::<Pod>::namespaced(client.clone(), namespace)
                        .delete(name, &params)
                        .await
                    {
                        Ok(_) => {
                            tracing::info!("{LIFECYCLE_COMPONENT}: evicted pod {namespace}/{name}")
                        }
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
                NodeAction::Event(record) => {
                    if record.event_type == EventType::Warning {
                        tracing::debug!(
                            "{LIFECYCLE_COMPONENT}: {}: {}",
                            record.reason,
                            record.message
                        );
                    }
                    post_event(client, LIFECYCLE_COMPONENT, record).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            if is_conflict(&e) {
                tracing::debug!("{LIFECYCLE_COMPONENT}: {e}; deciding again");
            } else {
                tracing::warn!("{LIFECYCLE_COMPONENT}: {e}");
            }
            return false;
        }
    }
    true
}
