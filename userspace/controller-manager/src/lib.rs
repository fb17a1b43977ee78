//! skiff-controller-manager: the thin kube-rs shell that runs skiff's pure control loops
//! (skiff-controllers, skiff-scheduler) against the apiserver.
//!
//! - [`run_controllers`]: the ReplicaSet, Deployment, EndpointSlice, Endpoints and Job
//!   controllers.
//! - [`run_scheduler`]: the scheduler (binds pending pods of `default-scheduler`).
//!
//! Shape: one kube-rs reflector (watcher + store) per kind, shared by every loop; each watch
//! event wakes the loops that read that kind (a `Notify`, so events coalesce). A woken loop makes
//! one pass over every object of its kind, calls the pure reconcile with the objects of the
//! same namespace from the stores, and applies the returned actions in order: Create = POST,
//! Update = PUT (resourceVersion from the cache, 409 = stale cache, retried), UpdateStatus = PUT
//! of the status subresource (with the resourceVersion of a preceding Update of the same object
//! in the same outcome), Delete with a uid precondition and Background propagation, Event =
//! POST of a core/v1 Event. Like Kubernetes' expectations, an object whose own writes the cache
//! does not show yet (by resourceVersion, skiff's store revision) is skipped until it does (or
//! 30 s pass). Loops also wake at the earliest `requeue_after` and resync every 30 s.
//!
//! - Node controllers (inside [`run_controllers_with`]): node IPAM gives each Node a podCIDR
//!   block of `--cluster-cidr`; node lifecycle watches `kube-node-lease` Leases and Ready
//!   heartbeats, sets silent Nodes' conditions Unknown after `--node-monitor-grace-period`,
//!   taints them not-ready/unreachable, marks their pods not Ready and evicts pods whose
//!   tolerations run out (see skiff-controllers' `node_lifecycle`).
//! - [`run_leader_elected`]: runs any of these only while holding a coordination.k8s.io Lease
//!   (`kube-system/skiff-controller-manager`, `kube-system/skiff-scheduler`), so several
//!   servers can run side by side with one acting.
//!
//! - DaemonSet, CronJob and ResourceQuota (status.used) controllers, loops like the others.
//! - The garbage collector (ownerReferences; background, foreground and orphan propagation;
//!   see `gc.rs`) over dynamic watch caches of every served resource, which also give the quota
//!   controller its object counts.
//! - The HorizontalPodAutoscaler (autoscaling/v2, Resource metrics from the agents' PodMetrics),
//!   every `--horizontal-pod-autoscaler-sync-period`, scaling through the scale subresource.
//!
//! Limits: a pass reconciles every object of its kind (fine for hundreds of objects, a
//! per-key work queue is the next step).

mod cache;
mod controllers;
mod flags;
mod gc;
mod hpa;
mod leader;
mod loadbalancer;
mod nodes;
mod scheduler;

pub use flags::{
    ControllerFlags, LeaderElectionFlags, run_controller_manager, run_scheduler_elected,
};
pub use leader::{LeaderElection, StopSignal, default_identity, run_leader_elected};
pub use loadbalancer::{IpPool, LbAction, LbService, plan as plan_loadbalancer_ips};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, ResourceQuota, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::cache::{reflect, wait_ready};
use crate::controllers::{Caches, Which, control_loop};
use crate::nodes::{NodeCaches, NodeLoopConfig, node_loop};

/// Knobs of the controllers (flags of `skiff controller-manager` and `skiff server`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerOptions {
    /// `--cluster-cidr`: the range Nodes' podCIDRs are cut from.
    pub cluster_cidr: ipnet::Ipv4Net,
    /// `--node-cidr-mask-size`: the prefix length of each Node's podCIDR.
    pub node_cidr_mask_size: u8,
    /// `--node-monitor-grace-period`: heartbeat silence after which a Node is NotReady (Unknown).
    pub node_monitor_grace_period: Duration,
    /// The same for a Node that never posted a Ready condition (Kubernetes: 60 s).
    pub node_startup_grace_period: Duration,
    /// `--node-monitor-period`: how often node health is checked without any change (5 s).
    pub node_monitor_period: Duration,
    /// `--loadbalancer-ip-pool`: where Services of type LoadBalancer get their address (None:
    /// no allocation, as without a cloud provider).
    pub loadbalancer_ip_pool: Option<IpPool>,
    /// `--horizontal-pod-autoscaler-sync-period`: how often every HPA is evaluated.
    pub hpa_sync_period: Duration,
    /// `--horizontal-pod-autoscaler-downscale-stabilization`: the scale-down window.
    pub hpa_downscale_stabilization: Duration,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            cluster_cidr: ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 244, 0, 0), 16)
                .unwrap_or_default(),
            node_cidr_mask_size: 24,
            node_monitor_grace_period: Duration::from_secs(40),
            node_startup_grace_period: Duration::from_secs(60),
            node_monitor_period: Duration::from_secs(5),
            loadbalancer_ip_pool: None,
            hpa_sync_period: Duration::from_secs(15),
            hpa_downscale_stabilization: Duration::from_secs(300),
        }
    }
}

/// Parses a duration flag the way Kubernetes' flags read: `40s`, `500ms`, `2m`, `1h`, `1m30s`
/// (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let bad = || format!("{text:?} is not a duration; write it like 40s, 500ms, 2m or 1m30s");
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Aborts the tasks when dropped, so an error or the end of `shutdown` stops everything.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// [`run_controllers_with`] the default [`ControllerOptions`].
pub async fn run_controllers(
    client: kube::Client,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_controllers_with(client, ControllerOptions::default(), shutdown).await
}

/// Runs the Deployment, ReplicaSet, EndpointSlice, Endpoints, Job and node (IPAM, lifecycle)
/// controllers until `shutdown` completes. Errors if the options are invalid or the watch
/// caches cannot be filled at start.
pub async fn run_controllers_with(
    client: kube::Client,
    options: ControllerOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let range = skiff_controllers::node_ipam::ClusterCidr::new(
        options.cluster_cidr,
        options.node_cidr_mask_size,
    )
    .map_err(|e| anyhow::anyhow!("--cluster-cidr / --node-cidr-mask-size: {e}"))?;
    if options.node_monitor_grace_period.is_zero() || options.node_monitor_period.is_zero() {
        anyhow::bail!("--node-monitor-grace-period and --node-monitor-period must be above zero");
    }
    if options.hpa_sync_period.is_zero() {
        anyhow::bail!("--horizontal-pod-autoscaler-sync-period must be above zero");
    }
    let node_wake = Arc::new(Notify::new());
    let deployment = Arc::new(Notify::new());
    let replica_set = Arc::new(Notify::new());
    let slices = Arc::new(Notify::new());
    let endpoints = Arc::new(Notify::new());
    let job = Arc::new(Notify::new());
    let daemon_set = Arc::new(Notify::new());
    let cron_job = Arc::new(Notify::new());
    let quota = Arc::new(Notify::new());
    let gc_wake = Arc::new(Notify::new());
    let lb_wake = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let caches = Caches {
        deployments: reflect::<Deployment>(&client, vec![deployment.clone()], &mut tasks),
        replica_sets: reflect::<ReplicaSet>(
            &client,
            vec![deployment.clone(), replica_set.clone()],
            &mut tasks,
        ),
        pods: reflect::<Pod>(
            &client,
            vec![
                deployment.clone(),
                replica_set.clone(),
                slices.clone(),
                endpoints.clone(),
                job.clone(),
                node_wake.clone(),
                daemon_set.clone(),
            ],
            &mut tasks,
        ),
        services: reflect::<Service>(
            &client,
            vec![slices.clone(), endpoints.clone(), lb_wake.clone()],
            &mut tasks,
        ),
        slices: reflect::<EndpointSlice>(&client, vec![slices.clone()], &mut tasks),
        endpoints: reflect::<Endpoints>(&client, vec![endpoints.clone()], &mut tasks),
        nodes: reflect::<Node>(
            &client,
            vec![slices.clone(), node_wake.clone(), daemon_set.clone()],
            &mut tasks,
        ),
        jobs: reflect::<Job>(&client, vec![job.clone(), cron_job.clone()], &mut tasks),
        daemon_sets: reflect::<DaemonSet>(&client, vec![daemon_set.clone()], &mut tasks),
        cron_jobs: reflect::<CronJob>(&client, vec![cron_job.clone()], &mut tasks),
        quotas: reflect::<ResourceQuota>(&client, vec![quota.clone()], &mut tasks),
        hpas: reflect::<HorizontalPodAutoscaler>(&client, vec![], &mut tasks),
        dynamic: Arc::new(gc::DynamicCaches::start(
            &client,
            vec![gc_wake.clone(), quota.clone()],
            &mut tasks,
        )),
    };
    let leases = reflect::<Lease>(&client, vec![node_wake.clone()], &mut tasks);
    let mut tasks = Tasks(tasks);
    let ready = async {
        wait_ready(&leases).await?;
        wait_ready(&caches.deployments).await?;
        wait_ready(&caches.replica_sets).await?;
        wait_ready(&caches.pods).await?;
        wait_ready(&caches.services).await?;
        wait_ready(&caches.slices).await?;
        wait_ready(&caches.endpoints).await?;
        wait_ready(&caches.nodes).await?;
        wait_ready(&caches.jobs).await?;
        wait_ready(&caches.daemon_sets).await?;
        wait_ready(&caches.cron_jobs).await?;
        wait_ready(&caches.quotas).await?;
        wait_ready(&caches.hpas).await?;
        caches.dynamic.wait_ready().await?;
        anyhow::Ok(())
    };
    tokio::pin!(shutdown);
    tokio::select! {
        r = ready => r?,
        _ = &mut shutdown => return Ok(()),
    }
    tracing::info!("controller caches filled; controllers running");
    let node_caches = Arc::new(NodeCaches {
        nodes: caches.nodes.clone(),
        leases,
        pods: caches.pods.clone(),
    });
    tasks.0.push(tokio::spawn(node_loop(
        client.clone(),
        node_caches,
        NodeLoopConfig {
            range,
            lifecycle: skiff_controllers::node_lifecycle::LifecycleConfig {
                grace_period: options.node_monitor_grace_period,
                startup_grace_period: options.node_startup_grace_period,
            },
            monitor_period: options.node_monitor_period,
        },
        node_wake,
    )));
    if let Some(pool) = options.loadbalancer_ip_pool {
        tasks.0.push(tokio::spawn(loadbalancer::loadbalancer_loop(
            client.clone(),
            caches.services.clone(),
            pool,
            lb_wake,
        )));
    }
    let caches = Arc::new(caches);
    tasks.0.push(tokio::spawn(gc::gc_loop(
        client.clone(),
        caches.dynamic.clone(),
        gc_wake,
    )));
    tasks.0.push(tokio::spawn(hpa::hpa_loop(
        client.clone(),
        caches.clone(),
        skiff_controllers::hpa::HpaConfig {
            downscale_stabilization: i64::try_from(options.hpa_downscale_stabilization.as_secs())
                .unwrap_or(i64::MAX),
            ..Default::default()
        },
        options.hpa_sync_period,
    )));
    for (which, wake) in [
        (Which::Deployment, deployment),
        (Which::ReplicaSet, replica_set),
        (Which::EndpointSlice, slices),
        (Which::Endpoints, endpoints),
        (Which::Job, job),
        (Which::DaemonSet, daemon_set),
        (Which::CronJob, cron_job),
        (Which::ResourceQuota, quota),
    ] {
        tasks.0.push(tokio::spawn(control_loop(
            which,
            client.clone(),
            caches.clone(),
            wake,
        )));
    }
    shutdown.await;
    drop(tasks);
    Ok(())
}

/// Runs the scheduler until `shutdown` completes: pods with no `spec.nodeName` whose
/// schedulerName is `default-scheduler` are placed one at a time and bound through
/// `pods/{name}/binding`; a pod that fits nowhere gets PodScheduled=False (reason Unschedulable,
/// the scheduler's message) and a FailedScheduling Event, and is retried when Nodes or bound
/// pods change (and every 60 s). Errors only if the watch caches cannot be filled at start.
pub async fn run_scheduler(
    client: kube::Client,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let wake = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let nodes = reflect::<Node>(&client, vec![wake.clone()], &mut tasks);
    let pods = reflect::<Pod>(&client, vec![wake.clone()], &mut tasks);
    let mut tasks = Tasks(tasks);
    let ready = async {
        wait_ready(&nodes).await?;
        wait_ready(&pods).await?;
        anyhow::Ok(())
    };
    tokio::pin!(shutdown);
    tokio::select! {
        r = ready => r?,
        _ = &mut shutdown => return Ok(()),
    }
    tracing::info!("scheduler caches filled; scheduling");
    tasks.0.push(tokio::spawn(scheduler::schedule_loop(
        client, nodes, pods, wake,
    )));
    shutdown.await;
    drop(tasks);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubernetes_flags() {
        assert_eq!(parse_duration("40s"), Ok(Duration::from_secs(40)));
        assert_eq!(parse_duration("40"), Ok(Duration::from_secs(40)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in ["", "s", "10x", "1.5s", "-3s", "3 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} refused");
        }
    }
}
