//! Criterion micro-benchmarks of the patch engines on a realistic Deployment:
//! - `strategic/kubectl-apply`: the strategic merge patch `kubectl apply` sends after an edit
//!   (image, env with `$setElementOrder`, a removed sidecar, `$retainKeys` on the strategy);
//! - `merge/scale`: the merge patch `kubectl scale` sends;
//! - `json/rollout-undo`: the JSON patch `kubectl rollout undo` sends;
//! - `baseline/clone`: copying the Deployment, which every engine must do once (the patch runs on
//!   a copy so a failure changes nothing): the ratio engine/baseline is the engines' own cost.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use skiff_api::patch::{json_merge_patch, json_patch, strategic_merge_patch};

fn env(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"name": format!("VAR_{i:02}"), "value": format!("value-{i}")}))
        .collect()
}

fn deployment() -> Value {
    let container = |name: &str, image: &str| {
        json!({
            "name": name,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "env": env(20),
            "ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 9090, "protocol": "TCP", "name": "metrics"}],
            "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
            "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "config", "mountPath": "/etc/app"}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 80}, "periodSeconds": 5},
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File"
        })
    };
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "demo",
            "uid": "0b4c6f5e-1111-4222-8333-944445555666",
            "resourceVersion": "1234",
            "generation": 4,
            "labels": {"app": "web", "tier": "frontend"},
            "annotations": {
                "deployment.kubernetes.io/revision": "4",
                "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(2048)
            }
        },
        "spec": {
            "replicas": 3,
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "template": {
                "metadata": {"labels": {"app": "web", "tier": "frontend"}},
                "spec": {
                    "containers": [
                        container("nginx", "nginx:1.25"),
                        container("app", "example/app:2.1"),
                        container("sidecar", "busybox:1.36")
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}, {"name": "config", "configMap": {"name": "web"}}],
                    "restartPolicy": "Always",
                    "dnsPolicy": "ClusterFirst",
                    "terminationGracePeriodSeconds": 30
                }
            }
        },
        "status": {
            "observedGeneration": 4,
            "replicas": 3,
            "updatedReplicas": 3,
            "readyReplicas": 3,
            "availableReplicas": 3,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
            ]
        }
    })
}

/// What kubectl apply sends after editing the file: new image and env on nginx, a removed
/// sidecar, the strategy switched to Recreate, and a new last-applied annotation.
fn kubectl_apply_patch() -> Value {
    let order: Vec<Value> = (0..20)
        .filter(|i| *i != 3)
        .map(|i| json!({"name": format!("VAR_{i:02}")}))
        .chain(std::iter::once(json!({"name": "NEW"})))
        .collect();
    json!({
        "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "y".repeat(2048)}},
        "spec": {
            "replicas": 4,
            "strategy": {"$retainKeys": ["type"], "rollingUpdate": null, "type": "Recreate"},
            "template": {"spec": {
                "$setElementOrder/containers": [{"name": "nginx"}, {"name": "app"}],
                "containers": [
                    {
                        "$setElementOrder/env": order,
                        "env": [{"name": "VAR_05", "value": "changed"}, {"name": "NEW", "value": "1"}, {"$patch": "delete", "name": "VAR_03"}],
                        "image": "nginx:1.26",
                        "name": "nginx"
                    },
                    {"$patch": "delete", "name": "sidecar"}
                ]
            }}
        }
    })
}

fn rollout_undo_patch(original: &Value) -> Value {
    let mut template = original["spec"]["template"].clone();
    template["spec"]["containers"][0]["image"] = json!("nginx:1.24");
    json!([
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "replace", "path": "/metadata/annotations", "value": {"deployment.kubernetes.io/revision": "5"}}
    ])
}

fn patch_benches(c: &mut Criterion) {
    let original = deployment();
    let smp = kubectl_apply_patch();
    let scale = json!({"spec": {"replicas": 5}});
    let undo = rollout_undo_patch(&original);

    // Check once, outside the timing, that each patch does what it claims.
    let applied = strategic_merge_patch(&original, &smp).expect("kubectl apply patch applies");
    assert_eq!(
        applied["spec"]["template"]["spec"]["containers"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(applied["spec"]["strategy"], json!({"type": "Recreate"}));
    assert_eq!(
        json_merge_patch(&original, &scale).expect("scale")["spec"]["replicas"],
        json!(5)
    );
    assert_eq!(
        json_patch(&original, &undo).expect("undo")["spec"]["template"]["spec"]["containers"][0]["image"],
        json!("nginx:1.24")
    );

    let mut group = c.benchmark_group("patch");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("baseline/clone", |b| {
        b.iter(|| black_box(black_box(&original).clone()))
    });
    group.bench_function("strategic/kubectl-apply", |b| {
        b.iter(|| strategic_merge_patch(black_box(&original), black_box(&smp)))
    });
    group.bench_function("merge/scale", |b| {
        b.iter(|| json_merge_patch(black_box(&original), black_box(&scale)))
    });
    group.bench_function("json/rollout-undo", |b| {
        b.iter(|| json_patch(black_box(&original), black_box(&undo)))
    });
    group.finish();
}

/// Prints each engine's time per patch as a ratio to the clone baseline, all measured in this
/// run, for bench/results/patch.md: 10 rounds of 100 patches per engine, the engines taking
/// turns within each round so that load from other processes hits them alike; the median round
/// counts (1,000 patches per engine in all).
fn ratios(_: &mut Criterion) {
    const ROUNDS: usize = 10;
    const PER_ROUND: u32 = 100;
    let original = deployment();
    let smp = kubectl_apply_patch();
    let scale = json!({"spec": {"replicas": 5}});
    let undo = rollout_undo_patch(&original);
    let engines: [(&str, Box<dyn Fn()>); 4] = [
        (
            "baseline/clone",
            Box::new(|| {
                black_box(black_box(&original).clone());
            }),
        ),
        (
            "strategic/kubectl-apply",
            Box::new(|| {
                let _ = black_box(strategic_merge_patch(black_box(&original), black_box(&smp)));
            }),
        ),
        (
            "merge/scale",
            Box::new(|| {
                let _ = black_box(json_merge_patch(black_box(&original), black_box(&scale)));
            }),
        ),
        (
            "json/rollout-undo",
            Box::new(|| {
                let _ = black_box(json_patch(black_box(&original), black_box(&undo)));
            }),
        ),
    ];
    let mut rounds: Vec<Vec<Duration>> = vec![Vec::with_capacity(ROUNDS); engines.len()];
    for _ in 0..ROUNDS {
        for (i, (_, run)) in engines.iter().enumerate() {
            let started = Instant::now();
            for _ in 0..PER_ROUND {
                run();
            }
            rounds[i].push(started.elapsed() / PER_ROUND);
        }
    }
    let medians: Vec<Duration> = rounds
        .iter_mut()
        .map(|r| {
            r.sort();
            r[ROUNDS / 2]
        })
        .collect();
    let baseline = medians[0].as_secs_f64().max(f64::MIN_POSITIVE);
    println!(
        "\npatch engines, median of {ROUNDS} rounds x {PER_ROUND} patches (Deployment: 3 containers x 20 env vars):"
    );
    for ((name, _), median) in engines.iter().zip(&medians) {
        println!(
            "  {name:<24} {median:>10.1?}  {:.2}x clone",
            median.as_secs_f64() / baseline
        );
    }
}

criterion_group!(benches, patch_benches, ratios);
criterion_main!(benches);
