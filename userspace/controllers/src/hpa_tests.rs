#![allow(clippy::unwrap_used)]

use super::*;
use crate::testkit::{labels, template};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscalerBehavior,
    HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{PodCondition, PodStatus, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

const NOW: i64 = 1_700_000_000;

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

fn hpa(min: i32, max: i32, target: i32) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            generation: Some(1),
            ..Default::default()
        },
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: "web".into(),
            },
            min_replicas: Some(min),
            max_replicas: max,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(target),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            behavior: None,
        }),
        status: None,
    }
}

/// A running pod that has been ready for 10 minutes, requesting 100m cpu.
fn pod(name: &str) -> Pod {
    let mut t = template("busy");
    let spec = t.spec.as_mut().unwrap();
    spec.containers[0].resources = Some(ResourceRequirements {
        requests: Some([("cpu".to_string(), Quantity("100m".into()))].into()),
        ..Default::default()
    });
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(labels(&[("app", "web")])),
            ..Default::default()
        },
        spec: t.spec,
        status: Some(PodStatus {
            phase: Some("Running".into()),
            start_time: Some(Time(ts(NOW - 600))),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                last_transition_time: Some(Time(ts(NOW - 590))),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn sample(pod: &str, cpu: &str) -> (String, PodMetrics) {
    (
        pod.to_string(),
        PodMetrics {
            metadata: ObjectMeta {
                name: Some(pod.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            timestamp: Some(ts(NOW - 5).to_string()),
            window: Some("15s".into()),
            containers: vec![ContainerMetrics {
                name: "web".into(),
                usage: [("cpu".to_string(), Quantity(cpu.into()))].into(),
            }],
        },
    )
}

fn target(replicas: i32) -> Result<ScaleTarget, String> {
    Ok(ScaleTarget {
        replicas,
        selector: Some("app=web".into()),
    })
}

fn scaled_to(out: &HpaOutcome) -> Option<i32> {
    out.outcome.actions.iter().find_map(|a| match a {
        Action::Scale {
            replicas,
            kind,
            name,
            ..
        } => {
            assert_eq!((kind.as_str(), name.as_str()), ("Deployment", "web"));
            Some(*replicas)
        }
        _ => None,
    })
}

fn status_of(out: &HpaOutcome) -> HorizontalPodAutoscalerStatus {
    out.outcome
        .actions
        .iter()
        .find_map(|a| match a {
            Action::UpdateStatus(Object::HorizontalPodAutoscaler(h)) => h.status.clone(),
            _ => None,
        })
        .unwrap()
}

fn run(
    h: &HorizontalPodAutoscaler,
    current: i32,
    pods: &[Pod],
    metrics: &[(String, PodMetrics)],
    history: &[Recommendation],
) -> HpaOutcome {
    let metrics: BTreeMap<String, PodMetrics> = metrics.iter().cloned().collect();
    reconcile(
        h,
        target(current),
        pods,
        &metrics,
        history,
        &HpaConfig::default(),
        ts(NOW),
    )
    .unwrap()
}

#[test]
fn scales_up_by_the_usage_ratio() {
    // 2 pods at 100% of request with a 50% target: 4 pods.
    let pods = [pod("a"), pod("b")];
    let out = run(
        &hpa(1, 10, 50),
        2,
        &pods,
        &[sample("a", "100m"), sample("b", "100000000n")],
        &[],
    );
    assert_eq!(scaled_to(&out), Some(4));
    let status = status_of(&out);
    assert_eq!(status.desired_replicas, 4);
    assert_eq!(status.current_replicas, Some(2));
    let current = &status.current_metrics.unwrap()[0];
    assert_eq!(
        current
            .resource
            .as_ref()
            .unwrap()
            .current
            .average_utilization,
        Some(100)
    );
    assert!(out.outcome.actions.iter().any(|a| matches!(a, Action::Event(e) if e.reason == "SuccessfulRescale" && e.message.starts_with("New size: 4; reason: cpu resource utilization"))));
    assert_eq!(out.recommendation.unwrap().replicas, 4);
}

#[test]
fn within_tolerance_nothing_changes() {
    let pods = [pod("a"), pod("b")];
    // 54% against 50%: ratio 1.08, inside 0.1.
    let out = run(
        &hpa(1, 10, 50),
        2,
        &pods,
        &[sample("a", "54m"), sample("b", "54m")],
        &[],
    );
    assert_eq!(scaled_to(&out), None);
    assert_eq!(status_of(&out).desired_replicas, 2);
}

#[test]
fn max_and_min_replicas_bound_the_result() {
    let pods: Vec<Pod> = (0..4).map(|i| pod(&format!("p{i}"))).collect();
    let metrics: Vec<_> = (0..4).map(|i| sample(&format!("p{i}"), "500m")).collect();
    let out = run(&hpa(1, 6, 50), 4, &pods, &metrics, &[]);
    assert_eq!(scaled_to(&out), Some(6));
    let status = status_of(&out);
    let limited = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "ScalingLimited")
        .unwrap();
    assert_eq!(
        (limited.status.as_str(), limited.reason.as_deref()),
        ("True", Some("TooManyReplicas"))
    );

    let idle: Vec<_> = (0..4).map(|i| sample(&format!("p{i}"), "0")).collect();
    let out = run(&hpa(2, 6, 50), 4, &pods, &idle, &[]);
    assert_eq!(scaled_to(&out), Some(2), "min 2");
}

#[test]
fn scale_down_waits_for_the_stabilization_window() {
    let pods: Vec<Pod> = (0..4).map(|i| pod(&format!("p{i}"))).collect();
    let idle: Vec<_> = (0..4).map(|i| sample(&format!("p{i}"), "1m")).collect();
    // A recommendation of 4 two minutes ago is inside the default 300 s window.
    let history = [Recommendation {
        at: NOW - 120,
        replicas: 4,
    }];
    let out = run(&hpa(1, 10, 50), 4, &pods, &idle, &history);
    assert_eq!(scaled_to(&out), None, "held by the window");
    assert_eq!(
        out.recommendation.unwrap().replicas,
        1,
        "the raw recommendation is kept"
    );
    // Once it is older than the window, the scale-down goes through.
    let history = [Recommendation {
        at: NOW - 400,
        replicas: 4,
    }];
    let out = run(&hpa(1, 10, 50), 4, &pods, &idle, &history);
    assert_eq!(scaled_to(&out), Some(1));
    // behavior.scaleDown.stabilizationWindowSeconds overrides the flag.
    let mut h = hpa(1, 10, 50);
    h.spec.as_mut().unwrap().behavior = Some(HorizontalPodAutoscalerBehavior {
        scale_down: Some(HPAScalingRules {
            stabilization_window_seconds: Some(60),
            ..Default::default()
        }),
        scale_up: None,
    });
    let history = [Recommendation {
        at: NOW - 120,
        replicas: 4,
    }];
    let out = run(&h, 4, &pods, &idle, &history);
    assert_eq!(scaled_to(&out), Some(1));
}

#[test]
fn missing_and_unready_pods_are_counted_conservatively() {
    // Scale-up: a pod without metrics counts as 0%: 2 at 100% + 1 missing = 200/300 = 0.67 of
    // 100% target? Use a 50% target: ready ratio 2.0, with the missing one 1.33 -> ceil(4) = 4.
    let pods = [pod("a"), pod("b"), pod("c")];
    let out = run(
        &hpa(1, 10, 50),
        3,
        &pods,
        &[sample("a", "100m"), sample("b", "100m")],
        &[],
    );
    assert_eq!(scaled_to(&out), Some(4));
    // Scale-down: a missing pod counts as 100%: 2 at 10% + 1 missing at 100% of a 50% target
    // -> 40%/50% = 0.8 -> ceil(2.4) = 3: no change.
    let out = run(
        &hpa(1, 10, 50),
        3,
        &pods,
        &[sample("a", "10m"), sample("b", "10m")],
        &[],
    );
    assert_eq!(scaled_to(&out), None);
    // An unready (Pending) pod counts as 0% on the way up.
    let mut pending = pod("c");
    pending.status.as_mut().unwrap().phase = Some("Pending".into());
    let pods = [pod("a"), pending];
    let out = run(&hpa(1, 10, 50), 2, &pods, &[sample("a", "60m")], &[]);
    // ready ratio 1.2 -> with c at 0: 60/200 = 30% -> 0.6: direction flips, no change.
    assert_eq!(scaled_to(&out), None);
}

#[test]
fn a_pod_starting_up_is_not_trusted_for_cpu() {
    // Ready 5 s ago, started 20 s ago: its sample (taken 5 s ago over 15 s) covers start-up.
    let mut fresh = pod("b");
    let status = fresh.status.as_mut().unwrap();
    status.start_time = Some(Time(ts(NOW - 20)));
    status.conditions.as_mut().unwrap()[0].last_transition_time = Some(Time(ts(NOW - 5)));
    let pods = [pod("a"), fresh];
    let out = run(
        &hpa(1, 10, 50),
        2,
        &pods,
        &[sample("a", "50m"), sample("b", "1000m")],
        &[],
    );
    assert_eq!(scaled_to(&out), None, "b's start-up burst is ignored");
}

#[test]
fn failures_show_in_conditions_and_change_nothing() {
    // No requests: FailedGetResourceMetric.
    let mut p = pod("a");
    p.spec.as_mut().unwrap().containers[0].resources = None;
    let out = run(&hpa(1, 10, 50), 1, &[p], &[sample("a", "100m")], &[]);
    assert_eq!(scaled_to(&out), None);
    let c = status_of(&out)
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "ScalingActive")
        .unwrap();
    assert_eq!(c.reason.as_deref(), Some("FailedGetResourceMetric"));
    assert!(c.message.unwrap().contains("missing request for cpu"));
    // The scale cannot be read.
    let metrics = BTreeMap::new();
    let out = reconcile(
        &hpa(1, 10, 50),
        Err("deployments.apps \"web\" not found".into()),
        &[],
        &metrics,
        &[],
        &HpaConfig::default(),
        ts(NOW),
    )
    .unwrap();
    let c = status_of(&out)
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "AbleToScale")
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_deref()),
        ("False", Some("FailedGetScale"))
    );
    // A target scaled to zero disables autoscaling.
    let out = run(&hpa(1, 10, 50), 0, &[], &[], &[]);
    let c = status_of(&out)
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "ScalingActive")
        .unwrap();
    assert_eq!(c.reason.as_deref(), Some("ScalingDisabled"));
}

#[test]
fn scale_up_rate_is_limited_per_sync() {
    let pods = [pod("a")];
    // 1000% of a 10% target would want 100 replicas: the default rate allows max(2x, +4) = 5.
    let out = run(&hpa(1, 200, 10), 1, &pods, &[sample("a", "1000m")], &[]);
    assert_eq!(scaled_to(&out), Some(5));
}
