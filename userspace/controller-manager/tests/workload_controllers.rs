//! DaemonSet, garbage collector, ResourceQuota and HPA loops, and placement of a few hundred pods
//! (affinity, anti-affinity, taints, topology spread asserted pod by pod), against a real
//! in-process skiff-apiserver with simulated Nodes and a kwok-style kubelet.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    PropagationPolicy,
};
use kube::{Api, Client};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

mod common;

use common::{SimNode, sim};

struct Cluster {
    client: Client,
    _api: common::Apiserver,
    _tasks: common::Tasks,
}

/// An apiserver on 127.0.0.1:0 with `nodes`, the controllers (with `options`), the scheduler and
/// the fake kubelet.
async fn cluster(
    nodes: Vec<SimNode<'_>>,
    options: skiff_controller_manager::ControllerOptions,
) -> Cluster {
    let api = common::apiserver().await;
    let client = api.client.clone();
    for n in nodes {
        create_node(&client, &n).await;
    }
    let mut tasks = common::Tasks::default();
    common::start_control_plane(&mut tasks, &api, options);
    tasks.spawn(common::fake_kubelet(client.clone()));
    Cluster {
        client,
        _api: api,
        _tasks: tasks,
    }
}

async fn create_node(client: &Client, n: &SimNode<'_>) {
    common::create_ready_node(client, n).await
}

async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    common::wait_for(what, WAIT, check).await
}

fn deployment(name: &str, replicas: i32, pod_spec_extra: Value) -> Deployment {
    let mut spec = json!({
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "100m", "memory": "32Mi"}}}],
    });
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), pod_spec_extra.as_object()) {
        for (k, v) in extra {
            s.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": spec},
        },
    }))
    .expect("deployment json")
}

async fn pods_of(client: &Client, app: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn node_of(p: &Pod) -> Option<String> {
    p.spec.as_ref()?.node_name.clone()
}

async fn running(client: &Client, app: &str, n: usize) -> Result<Vec<Pod>, String> {
    let pods: Vec<Pod> = pods_of(client, app)
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let bound = pods.iter().filter(|p| node_of(p).is_some()).count();
    if pods.len() == n && bound == n {
        Ok(pods)
    } else {
        Err(format!("{app}: {} pods, {bound} bound", pods.len()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_runs_one_pod_per_eligible_node_and_follows_nodes() {
    let mut tainted = sim("n3");
    tainted.taints = vec![json!({"key": "dedicated", "value": "db", "effect": "NoSchedule"})];
    let c = cluster(vec![sim("n1"), sim("n2"), tainted], Default::default()).await;
    let ds: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {"metadata": {"labels": {"app": "agent"}},
                "spec": {"terminationGracePeriodSeconds": 0, "containers": [{"name": "c", "image": "busybox"}]}},
        },
    }))
    .expect("ds json");
    let api: Api<DaemonSet> = Api::namespaced(c.client.clone(), "default");
    api.create(&PostParams::default(), &ds)
        .await
        .expect("create ds");
    let pods = wait_for("a daemon pod on n1 and n2", || {
        running(&c.client, "agent", 2)
    })
    .await;
    let nodes: BTreeSet<String> = pods.iter().filter_map(node_of).collect();
    assert_eq!(
        nodes,
        BTreeSet::from(["n1".to_string(), "n2".to_string()]),
        "none on the tainted node"
    );
    wait_for("ds status", || async {
        let s = api
            .get("agent")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        if s.desired_number_scheduled == 2
            && s.number_ready == 2
            && s.updated_number_scheduled == Some(2)
        {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    // A new node gets its pod.
    create_node(&c.client, &sim("n4")).await;
    let pods = wait_for("a daemon pod on n4 too", || running(&c.client, "agent", 3)).await;
    assert!(pods.iter().any(|p| node_of(p).as_deref() == Some("n4")));
    // A rolling update replaces every pod.
    api.patch(
        "agent",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}}})),
    )
    .await
    .expect("update ds");
    wait_for("every daemon pod on the new image", || async {
        let pods = running(&c.client, "agent", 3).await?;
        let old = pods
            .iter()
            .filter(|p| {
                p.spec.as_ref().unwrap().containers[0].image.as_deref() != Some("busybox:2")
            })
            .count();
        if old == 0 {
            Ok(())
        } else {
            Err(format!("{old} old pods"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_with_each_propagation_policy() {
    let c = cluster(vec![sim("n1"), sim("n2")], Default::default()).await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let replica_sets: Api<ReplicaSet> = Api::namespaced(c.client.clone(), "default");
    for (name, policy) in [
        ("bg", PropagationPolicy::Background),
        ("fg", PropagationPolicy::Foreground),
        ("orphan", PropagationPolicy::Orphan),
    ] {
        deployments
            .create(&PostParams::default(), &deployment(name, 3, json!({})))
            .await
            .expect("create deployment");
        wait_for(&format!("{name}: 3 pods"), || running(&c.client, name, 3)).await;
        let params = DeleteParams {
            propagation_policy: Some(policy.clone()),
            ..DeleteParams::default()
        };
        deployments
            .delete(name, &params)
            .await
            .expect("delete deployment");
        if matches!(policy, PropagationPolicy::Foreground) {
            // The Deployment waits (finalizer) while its dependents go.
            let d = deployments.get_opt(name).await.expect("get");
            if let Some(d) = d {
                assert!(d.metadata.deletion_timestamp.is_some());
            }
        }
        let selector = format!("app={name}");
        if matches!(policy, PropagationPolicy::Orphan) {
            wait_for(
                "orphan: the Deployment gone, its ReplicaSet and pods released",
                || async {
                    if deployments
                        .get_opt(name)
                        .await
                        .map_err(|e| e.to_string())?
                        .is_some()
                    {
                        return Err("deployment still there".into());
                    }
                    let rs = replica_sets
                        .list(&ListParams::default().labels(&selector))
                        .await
                        .map_err(|e| e.to_string())?;
                    let owned = rs
                        .items
                        .iter()
                        .filter(|r| {
                            r.metadata
                                .owner_references
                                .as_ref()
                                .is_some_and(|o| !o.is_empty())
                        })
                        .count();
                    if rs.items.len() == 1 && owned == 0 {
                        Ok(())
                    } else {
                        Err(format!("{} rs, {owned} owned", rs.items.len()))
                    }
                },
            )
            .await;
            let pods = running(&c.client, name, 3)
                .await
                .expect("orphaned pods keep running");
            assert!(
                pods.iter().all(|p| p
                    .metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|o| o.len() == 1)),
                "pods keep their ReplicaSet"
            );
        } else {
            wait_for(&format!("{name}: nothing left"), || async {
                let rs = replica_sets
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .len();
                let pods = pods_of(&c.client, name).await.len();
                let d = deployments
                    .get_opt(name)
                    .await
                    .map_err(|e| e.to_string())?
                    .is_some();
                if rs == 0 && pods == 0 && !d {
                    Ok(())
                } else {
                    Err(format!("deployment {d}, {rs} rs, {pods} pods"))
                }
            })
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_status_and_admission_limit_a_replicaset() {
    let c = cluster(vec![sim("n1")], Default::default()).await;
    let quotas: Api<ResourceQuota> = Api::namespaced(c.client.clone(), "default");
    let q: ResourceQuota = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "small", "namespace": "default"},
        "spec": {"hard": {"pods": "2", "requests.cpu": "1", "count/deployments.apps": "1"}},
    }))
    .expect("quota json");
    quotas
        .create(&PostParams::default(), &q)
        .await
        .expect("create quota");
    wait_for("quota status", || async {
        let s = quotas
            .get("small")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default();
        let used = s.used.unwrap_or_default();
        if used.get("pods").map(|q| q.0.as_str()) == Some("0") {
            Ok(())
        } else {
            Err(format!("{used:?}"))
        }
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("web", 3, json!({})))
        .await
        .expect("create");
    wait_for("2 of 3 pods admitted", || running(&c.client, "web", 2)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pods_of(&c.client, "web").await.len(),
        2,
        "the third is refused"
    );
    wait_for("used pods=2, cpu=200m, 1 deployment", || async {
        let used = quotas
            .get("small")
            .await
            .map_err(|e| e.to_string())?
            .status
            .unwrap_or_default()
            .used
            .unwrap_or_default();
        let get = |k: &str| used.get(k).map(|q| q.0.clone()).unwrap_or_default();
        if get("pods") == "2"
            && get("requests.cpu") == "200m"
            && get("count/deployments.apps") == "1"
        {
            Ok(())
        } else {
            Err(format!("{used:?}"))
        }
    })
    .await;
    let err = deployments
        .create(&PostParams::default(), &deployment("second", 1, json!({})))
        .await
        .expect_err("over count quota");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403);
            assert!(s.message.contains("exceeded quota: small, requested: count/deployments.apps=1, used: count/deployments.apps=1, limited: count/deployments.apps=1"), "{}", s.message);
        }
        other => panic!("{other}"),
    }
}

fn metrics_api(client: &Client) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "metrics.k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "metrics.k8s.io/v1beta1".into(),
        kind: "PodMetrics".into(),
        plural: "pods".into(),
    };
    Api::namespaced_with(client.clone(), "default", &ar)
}

/// Posts a PodMetrics sample for every pod of `app` (what the agents do).
async fn post_usage(client: &Client, app: &str, cpu: &str) {
    let api = metrics_api(client);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let now = format!("{}Z", &now[..19]);
    for p in pods_of(client, app).await {
        let name = p.metadata.name.clone().unwrap_or_default();
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "metrics.k8s.io/v1beta1", "kind": "PodMetrics",
            "metadata": {"name": name, "namespace": "default"},
            "timestamp": now, "window": "15s",
            "containers": [{"name": "c", "usage": {"cpu": cpu, "memory": "10Mi"}}],
        }))
        .expect("metrics json");
        let _ = api
            .patch(
                &name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&obj),
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpa_scales_up_under_load_and_down_after_the_window() {
    let options = skiff_controller_manager::ControllerOptions {
        hpa_sync_period: Duration::from_secs(1),
        hpa_downscale_stabilization: Duration::from_secs(3),
        ..Default::default()
    };
    let c = cluster(vec![sim("n1"), sim("n2")], options).await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("busy", 1, json!({})))
        .await
        .expect("create");
    wait_for("1 pod", || running(&c.client, "busy", 1)).await;
    let hpas: Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler> =
        Api::namespaced(c.client.clone(), "default");
    let hpa = serde_json::from_value(json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "busy", "namespace": "default"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "busy"},
            "minReplicas": 1, "maxReplicas": 4,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}}]},
    }))
    .expect("hpa json");
    hpas.create(&PostParams::default(), &hpa)
        .await
        .expect("create hpa");
    // 100m requested, 300m used: 300% of a 50% target -> 6, bounded by maxReplicas 4 (and the
    // rate limit allows max(2x, +4)).
    let start = Instant::now();
    wait_for("scaled up to 4", || async {
        post_usage(&c.client, "busy", "300m").await;
        let d = deployments.get("busy").await.map_err(|e| e.to_string())?;
        let r = d.spec.and_then(|s| s.replicas).unwrap_or(0);
        if r == 4 {
            Ok(())
        } else {
            Err(format!("replicas {r}"))
        }
    })
    .await;
    // The controller scales first and writes its status after: on a loaded machine the status
    // can trail the scale.
    wait_for("the HPA status with current metrics", || async {
        let h = hpas.get("busy").await.map_err(|e| e.to_string())?;
        match h.status {
            Some(s) if s.current_metrics.is_some() => Ok(()),
            other => Err(format!("status {other:?}")),
        }
    })
    .await;
    wait_for("4 pods", || running(&c.client, "busy", 4)).await;
    // Load stops: back to 1 only after the 3 s window.
    let idle_since = Instant::now();
    wait_for("scaled down to 1", || async {
        post_usage(&c.client, "busy", "1m").await;
        let d = deployments.get("busy").await.map_err(|e| e.to_string())?;
        let r = d.spec.and_then(|s| s.replicas).unwrap_or(0);
        if r == 1 {
            Ok(())
        } else {
            Err(format!("replicas {r}"))
        }
    })
    .await;
    assert!(
        idle_since.elapsed() >= Duration::from_secs(2),
        "the stabilization window held the scale-down"
    );
    assert!(start.elapsed() < WAIT * 2);
    wait_for("1 pod", || running(&c.client, "busy", 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_hundred_pods_keep_affinity_anti_affinity_taints_and_spread() {
    // 16 nodes in 4 zones; 4 of them tainted for a dedicated workload, 8 with ssd disks.
    let mut nodes = Vec::new();
    for i in 0..16 {
        let mut n = sim(&format!("node-{i:02}"));
        n.labels
            .push(("topology.kubernetes.io/zone", format!("zone-{}", i % 4)));
        if i % 2 == 0 {
            n.labels.push(("disk", "ssd".into()));
        }
        if i >= 12 {
            n.taints = vec![json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"})];
        }
        nodes.push(n);
    }
    let c = cluster(nodes, Default::default()).await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let host_anti = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
    let with_db = json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
    let spread = json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
        "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]});
    let gpu = json!({"nodeSelector": {"disk": "ssd"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]});
    let apps = [
        ("db", 8, host_anti),
        ("cache", 24, with_db),
        ("web", 150, spread),
        ("gpu", 40, gpu),
    ];
    for (name, replicas, extra) in &apps {
        deployments
            .create(
                &PostParams::default(),
                &deployment(name, *replicas, extra.clone()),
            )
            .await
            .expect("create deployment");
        // db first, so cache's affinity has somewhere to go.
        if *name == "db" {
            wait_for("db placed", || running(&c.client, "db", 8)).await;
        }
    }
    let mut placed: BTreeMap<&str, Vec<Pod>> = BTreeMap::new();
    for (name, replicas, _) in &apps {
        placed.insert(
            name,
            wait_for(&format!("{name} placed"), || {
                running(&c.client, name, *replicas as usize)
            })
            .await,
        );
    }
    let total: usize = placed.values().map(Vec::len).sum();
    assert_eq!(total, 222);
    let index = |p: &Pod| -> usize { node_of(p).unwrap()[5..].parse().unwrap() };
    // Anti-affinity: no two db pods share a node.
    let db_nodes: Vec<usize> = placed["db"].iter().map(index).collect();
    let unique: BTreeSet<usize> = db_nodes.iter().copied().collect();
    assert_eq!(
        unique.len(),
        db_nodes.len(),
        "db pods never together: {db_nodes:?}"
    );
    // Affinity: every cache pod sits next to a db pod.
    for p in &placed["cache"] {
        assert!(
            unique.contains(&index(p)),
            "cache pod {:?} on {:?} has no db",
            p.metadata.name,
            node_of(p)
        );
    }
    // Taints: only the tolerating gpu pods run on node-12..15.
    for (name, pods) in &placed {
        for p in pods {
            if index(p) >= 12 {
                assert_eq!(
                    *name,
                    "gpu",
                    "{:?} of {name} on tainted {:?}",
                    p.metadata.name,
                    node_of(p)
                );
            }
        }
    }
    // nodeSelector: every gpu pod on an ssd node.
    for p in &placed["gpu"] {
        assert_eq!(
            index(p) % 2,
            0,
            "gpu pod {:?} on {:?} without ssd",
            p.metadata.name,
            node_of(p)
        );
    }
    // Spread: web pods per zone differ by at most maxSkew 1 (zones 0..3; every zone has untainted nodes).
    let mut per_zone = [0usize; 4];
    for p in &placed["web"] {
        per_zone[index(p) % 4] += 1;
    }
    let (lo, hi) = (
        per_zone.iter().min().unwrap(),
        per_zone.iter().max().unwrap(),
    );
    assert!(hi - lo <= 1, "web spread over zones {per_zone:?}");
}
