//! The controllers and the scheduler against a real in-process skiff-apiserver, with Nodes and
//! pod status simulated by a fixture (the kwok way) until real agents exist.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

mod common;

struct Cluster {
    client: Client,
    _api: common::Apiserver,
    _tasks: common::Tasks,
}

/// An apiserver on 127.0.0.1:0, the controllers, the scheduler, two fake Nodes (4 CPUs, 8 GiB)
/// and the fake kubelet that marks bound pods Running and Ready.
async fn cluster() -> Cluster {
    let api = common::apiserver().await;
    let client = api.client.clone();
    for name in ["node-a", "node-b"] {
        let node = common::SimNode {
            cpu: "4",
            memory: "8Gi",
            ..common::sim(name)
        };
        common::create_ready_node(&client, &node).await;
    }
    let mut tasks = common::Tasks::default();
    common::start_control_plane(&mut tasks, &api, Default::default());
    tasks.spawn(common::fake_kubelet(client.clone()));
    Cluster {
        client,
        _api: api,
        _tasks: tasks,
    }
}

async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    common::wait_for(what, WAIT, check).await
}

fn deployment(name: &str, replicas: i32, image: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    // Without a node agent nothing confirms a bound pod stopped: no grace.
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "web", "image": image,
                                    "ports": [{"containerPort": 8080}],
                                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}],
                },
            },
        },
    }))
    .expect("deployment json")
}

fn count(v: Option<i32>) -> i32 {
    v.unwrap_or(0)
}

/// Pods of the app that are not being deleted.
async fn live_pods(client: &Client, app: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

async fn wait_deployment_ready(client: &Client, name: &str, replicas: i32) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    wait_for(
        &format!("deployment {name} with {replicas} ready"),
        || async {
            let d = deployments.get(name).await.map_err(|e| e.to_string())?;
            let s = d.status.clone().unwrap_or_default();
            let generation = d.metadata.generation.unwrap_or(0);
            let pods = live_pods(client, name).await.len() as i32;
            if s.observed_generation == Some(generation)
                && count(s.ready_replicas) == replicas
                && count(s.available_replicas) == replicas
                && count(s.updated_replicas) == replicas
                && count(s.replicas) == replicas
                && pods == replicas
            {
                Ok(())
            } else {
                Err(format!("status {s:?}, {pods} live pods"))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_gets_scheduled_ready_pods_and_endpoints() {
    let c = cluster().await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("web", 3, "nginx:1"))
        .await
        .expect("create deployment");
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .expect("service json");
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");

    wait_deployment_ready(&c.client, "web", 3).await;

    // One ReplicaSet, owned by the Deployment, with 3 pods bound to the two nodes.
    let rss: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    let owned: Vec<ReplicaSet> = rss
        .list(&ListParams::default())
        .await
        .expect("list replicasets")
        .items;
    assert_eq!(owned.len(), 1, "one ReplicaSet: {owned:?}");
    assert_eq!(owned[0].spec.as_ref().and_then(|s| s.replicas), Some(3));
    let pods = live_pods(&c.client, "web").await;
    assert_eq!(pods.len(), 3);
    for p in &pods {
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        assert!(
            matches!(node.as_deref(), Some("node-a" | "node-b")),
            "pod bound to a simulated node: {node:?}"
        );
    }

    // The EndpointSlice lists the 3 ready pods.
    let slices: Api<EndpointSlice> = Api::namespaced(c.client.clone(), "default");
    let pod_ips: std::collections::BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()))
        .collect();
    wait_for("an EndpointSlice with 3 ready endpoints", || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await
            .map_err(|e| e.to_string())?;
        let ready: std::collections::BTreeSet<String> = list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        if ready == pod_ips && ready.len() == 3 {
            Ok(())
        } else {
            Err(format!("ready addresses {ready:?}, pod IPs {pod_ips:?}"))
        }
    })
    .await;

    // And the v1 Endpoints object lists the same addresses as ready.
    let endpoints: Api<k8s_openapi::api::core::v1::Endpoints> =
        Api::namespaced(c.client.clone(), "default");
    wait_for("Endpoints web with 3 ready addresses", || async {
        let ep = endpoints.get("web").await.map_err(|e| e.to_string())?;
        let ready: std::collections::BTreeSet<String> = ep
            .subsets
            .iter()
            .flatten()
            .flat_map(|s| s.addresses.iter().flatten())
            .map(|a| a.ip.clone())
            .collect();
        if ready == pod_ips {
            Ok(())
        } else {
            Err(format!("{ready:?} vs {pod_ips:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_change_rolls_to_a_new_replicaset() {
    let c = cluster().await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("roll", 3, "nginx:1"))
        .await
        .expect("create deployment");
    wait_deployment_ready(&c.client, "roll", 3).await;
    let patch = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "web", "image": "nginx:2"}]}}}});
    deployments
        .patch("roll", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .expect("change image");
    wait_deployment_ready(&c.client, "roll", 3).await;
    let rss: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    wait_for("old ReplicaSet at 0, new at 3", || async {
        let list = rss
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let image = |rs: &ReplicaSet| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .and_then(|t| t.spec.as_ref())
                .and_then(|s| s.containers.first())
                .and_then(|c| c.image.clone())
                .unwrap_or_default()
        };
        let summary: Vec<(String, Option<i32>)> = list
            .items
            .iter()
            .map(|rs| (image(rs), rs.spec.as_ref().and_then(|s| s.replicas)))
            .collect();
        let mut sorted = summary.clone();
        sorted.sort();
        if sorted
            == vec![
                ("nginx:1".to_string(), Some(0)),
                ("nginx:2".to_string(), Some(3)),
            ]
        {
            Ok(())
        } else {
            Err(format!("{summary:?}"))
        }
    })
    .await;
    for p in live_pods(&c.client, "roll").await {
        let image = p
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone());
        assert_eq!(image.as_deref(), Some("nginx:2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_three_five_one_converges() {
    let c = cluster().await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("scale", 3, "nginx:1"))
        .await
        .expect("create deployment");
    wait_deployment_ready(&c.client, "scale", 3).await;
    for replicas in [5, 1] {
        deployments
            .patch(
                "scale",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .expect("scale");
        wait_deployment_ready(&c.client, "scale", replicas).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_that_fits_nowhere_is_marked_unschedulable() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let huge: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "huge", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox",
                 "resources": {"requests": {"cpu": "100"}}}]},
    }))
    .expect("pod json");
    pods.create(&PostParams::default(), &huge)
        .await
        .expect("create pod");
    let expected = "0/2 nodes are available: 2 Insufficient cpu.";
    wait_for("PodScheduled=False on the huge pod", || async {
        let p = pods.get("huge").await.map_err(|e| e.to_string())?;
        let cond = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled").cloned());
        match cond {
            Some(c)
                if c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
                    && c.message.as_deref() == Some(expected) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    wait_for("a FailedScheduling event", || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let found = list.items.iter().any(|e| {
            e.reason.as_deref() == Some("FailedScheduling")
                && e.involved_object.name.as_deref() == Some("huge")
                && e.message.as_deref() == Some(expected)
        });
        if found {
            Ok(())
        } else {
            Err(format!("{} events", list.items.len()))
        }
    })
    .await;
    let p = pods.get("huge").await.expect("get pod");
    assert!(p.spec.and_then(|s| s.node_name).is_none(), "never bound");

    // A node big enough appears: the pod is retried and bound to it.
    let nodes: Api<Node> = Api::all(c.client.clone());
    let status = json!({
        "capacity": {"cpu": "128", "memory": "64Gi", "pods": "110"},
        "allocatable": {"cpu": "128", "memory": "64Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True"}],
    });
    let big: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "big"}, "status": status,
    }))
    .expect("node json");
    nodes
        .create(&PostParams::default(), &big)
        .await
        .expect("create big node");
    nodes
        .patch_status(
            "big",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .expect("big node status");
    wait_for("the huge pod bound to the big node", || async {
        let p = pods.get("huge").await.map_err(|e| e.to_string())?;
        let node = p.spec.and_then(|s| s.node_name);
        if node.as_deref() == Some("big") {
            Ok(())
        } else {
            Err(format!("{node:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_completes_five_with_at_most_two_active() {
    let c = cluster().await;
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(c.client.clone(), "default");
    let job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "batch", "namespace": "default"},
        "spec": {
            "completions": 5, "parallelism": 2,
            "template": {"spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "c", "image": "busybox"}]}},
        },
    }))
    .expect("job json");
    jobs.create(&PostParams::default(), &job)
        .await
        .expect("create job");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let most_active = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    wait_for("job batch Complete with 5 succeeded", || {
        let jobs = jobs.clone();
        let pods = pods.clone();
        let most_active = most_active.clone();
        async move {
            let list = pods
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let active = list
                .items
                .iter()
                .filter(|p| {
                    !matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded" | "Failed")
                    ) && p.metadata.deletion_timestamp.is_none()
                })
                .count();
            most_active.fetch_max(active, std::sync::atomic::Ordering::SeqCst);
            let j = jobs.get("batch").await.map_err(|e| e.to_string())?;
            let s = j.status.unwrap_or_default();
            let complete = s
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Complete" && c.status == "True");
            if complete && s.succeeded == Some(5) {
                Ok(())
            } else {
                Err(format!(
                    "succeeded {:?}, conditions {:?}",
                    s.succeeded, s.conditions
                ))
            }
        }
    })
    .await;
    let most_active = most_active.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        most_active <= 2,
        "at most parallelism=2 pods active, saw {most_active}"
    );
    let all = pods
        .list(&ListParams::default())
        .await
        .expect("list pods")
        .items;
    assert_eq!(all.len(), 5, "exactly completions=5 pods were created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_functions_return_when_shutdown_completes() {
    let c = cluster().await;
    for scheduler in [false, true] {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let client = if scheduler { c._api.scheduler.clone() } else { c._api.controller_manager.clone() };
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(async move {
            if scheduler {
                skiff_controller_manager::run_scheduler(client, shutdown).await
            } else {
                skiff_controller_manager::run_controllers(client, shutdown).await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "runs until shutdown");
        let _ = stop.send(());
        let result = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("returns within 5 s of shutdown")
            .expect("task did not panic");
        assert!(result.is_ok(), "{result:?}");
    }
}
