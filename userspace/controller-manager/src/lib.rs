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
//! Limits (this session): no leader election, so run one controller-manager and one scheduler
//! per cluster; a pass reconciles every object of its kind (fine for hundreds of objects, a
//! per-key work queue is the next step); no garbage collector loop (the apiserver's own
//! background GC deletes dependents).

mod cache;
mod controllers;
mod scheduler;

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::cache::{reflect, wait_ready};
use crate::controllers::{Caches, Which, control_loop};

/// Aborts the tasks when dropped, so an error or the end of `shutdown` stops everything.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Runs the Deployment, ReplicaSet, EndpointSlice, Endpoints and Job controllers until
/// `shutdown` completes. Errors only if the watch caches cannot be filled at start.
pub async fn run_controllers(
    client: kube::Client,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let deployment = Arc::new(Notify::new());
    let replica_set = Arc::new(Notify::new());
    let slices = Arc::new(Notify::new());
    let endpoints = Arc::new(Notify::new());
    let job = Arc::new(Notify::new());
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
            ],
            &mut tasks,
        ),
        services: reflect::<Service>(&client, vec![slices.clone(), endpoints.clone()], &mut tasks),
        slices: reflect::<EndpointSlice>(&client, vec![slices.clone()], &mut tasks),
        endpoints: reflect::<Endpoints>(&client, vec![endpoints.clone()], &mut tasks),
        nodes: reflect::<Node>(&client, vec![slices.clone()], &mut tasks),
        jobs: reflect::<Job>(&client, vec![job.clone()], &mut tasks),
    };
    let mut tasks = Tasks(tasks);
    let ready = async {
        wait_ready(&caches.deployments).await?;
        wait_ready(&caches.replica_sets).await?;
        wait_ready(&caches.pods).await?;
        wait_ready(&caches.services).await?;
        wait_ready(&caches.slices).await?;
        wait_ready(&caches.endpoints).await?;
        wait_ready(&caches.nodes).await?;
        wait_ready(&caches.jobs).await?;
        anyhow::Ok(())
    };
    tokio::pin!(shutdown);
    tokio::select! {
        r = ready => r?,
        _ = &mut shutdown => return Ok(()),
    }
    tracing::info!("controller caches filled; controllers running");
    let caches = Arc::new(caches);
    for (which, wake) in [
        (Which::Deployment, deployment),
        (Which::ReplicaSet, replica_set),
        (Which::EndpointSlice, slices),
        (Which::Endpoints, endpoints),
        (Which::Job, job),
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
