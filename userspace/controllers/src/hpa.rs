//! The HorizontalPodAutoscaler controller (autoscaling/v2, Kubernetes' `pkg/controller/podautoscaler`)
//! for Resource metrics (cpu, memory) with Utilization targets, from `metrics.k8s.io/v1beta1`
//! PodMetrics that the node agents post.
//!
//! The replica count is computed as Kubernetes' `ReplicaCalculator.GetResourceReplicas`: pods
//! being deleted or Failed are ignored; Pending pods and (cpu only) pods not yet ready or whose
//! first sample may include their start-up are "unready"; pods without a sample are "missing".
//! If the ratio of usage to target is within the tolerance (0.1) nothing changes; when pods are
//! missing or unready the ratio is recomputed assuming the conservative value (missing pods use
//! 100% of their request on a scale-down and 0% on a scale-up; unready pods 0% on a scale-up) and
//! the change is dropped if that flips its direction. Several metrics: the largest proposal wins.
//!
//! Then `normalizeDesiredReplicasWithBehaviors`: the stabilization windows (scale-down: the
//! highest recommendation of the window, `--horizontal-pod-autoscaler-downscale-stabilization`
//! unless `behavior.scaleDown.stabilizationWindowSeconds`; scale-up: the lowest, default 0 s)
//! over the recommendations the caller keeps ([`HpaOutcome::recommendation`]), the default
//! scale-up rate (at most max(2x, +4) per sync) and minReplicas/maxReplicas.
//! Not supported (refused in the ScalingActive condition): Pods, Object, External and
//! ContainerResource metrics, AverageValue targets, and custom behavior policies (their
//! stabilization windows are honoured, their rate limits are not).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::autoscaling::v2::{
    HorizontalPodAutoscaler, HorizontalPodAutoscalerCondition, HorizontalPodAutoscalerStatus,
    MetricStatus, MetricValueStatus, ResourceMetricStatus,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use skiff_api::selector::LabelSelector;
use skiff_scheduler::quantity::ParsedQuantity;

use crate::pod_util::{is_ready, phase};
use crate::{
    Action, EventRecord, EventType, Kind, Object, Outcome, ReconcileError, labels_of, name_of,
    namespace_of, object_reference, time,
};

/// `metrics.k8s.io/v1beta1` PodMetrics, as metrics-server serves it and skiff's agents store it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMetrics {
    #[serde(default)]
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    /// When the sample was taken (RFC 3339).
    pub timestamp: Option<String>,
    /// The sample's window, a Go duration (`15s`).
    pub window: Option<String>,
    #[serde(default)]
    pub containers: Vec<ContainerMetrics>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerMetrics {
    pub name: String,
    /// `cpu` (cores, e.g. `12345n`) and `memory` (bytes, e.g. `1024Ki`).
    #[serde(default)]
    pub usage: BTreeMap<String, Quantity>,
}

/// One pod's sample, summed over its containers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodSample {
    /// cpu in millicores or memory in bytes.
    pub value: i64,
    /// Sample time and window, seconds.
    pub timestamp: i64,
    pub window: i64,
}

impl PodMetrics {
    /// The pod's total usage of `resource` (millicores for cpu, bytes otherwise), None when a
    /// container has no such sample or a quantity does not parse.
    pub fn sample(&self, resource: &str) -> Option<PodSample> {
        let mut total = 0i64;
        if self.containers.is_empty() {
            return None;
        }
        for c in &self.containers {
            let q = ParsedQuantity::parse(&c.usage.get(resource)?.0).ok()?;
            total = total.saturating_add(if resource == "cpu" {
                q.milli_value()
            } else {
                q.value()
            });
        }
        let timestamp = self
            .timestamp
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(|t| t.as_second())?;
        let window = self
            .window
            .as_deref()
            .and_then(|w| w.strip_suffix('s'))
            .and_then(|w| w.parse::<f64>().ok())
            .map(|w| w as i64)
            .unwrap_or(0);
        Some(PodSample {
            value: total,
            timestamp,
            window,
        })
    }
}

/// What the scale subresource of the target says.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleTarget {
    /// `spec.replicas` of the Scale.
    pub replicas: i32,
    /// `status.selector`: the label selector of the target's pods, as a string.
    pub selector: Option<String>,
}

/// A recommendation kept for the stabilization windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommendation {
    pub at: i64,
    pub replicas: i32,
}

/// Knobs, named after kube-controller-manager's flags.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaConfig {
    /// `--horizontal-pod-autoscaler-tolerance`.
    pub tolerance: f64,
    /// `--horizontal-pod-autoscaler-downscale-stabilization`, seconds.
    pub downscale_stabilization: i64,
    /// `--horizontal-pod-autoscaler-cpu-initialization-period`, seconds.
    pub cpu_initialization_period: i64,
    /// `--horizontal-pod-autoscaler-initial-readiness-delay`, seconds.
    pub initial_readiness_delay: i64,
}

impl Default for HpaConfig {
    fn default() -> Self {
        HpaConfig {
            tolerance: 0.1,
            downscale_stabilization: 300,
            cpu_initialization_period: 300,
            initial_readiness_delay: 30,
        }
    }
}

/// A reconcile's actions plus the recommendation to remember (None when none was computed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HpaOutcome {
    pub outcome: Outcome,
    pub recommendation: Option<Recommendation>,
}

/// One metric's proposal.
struct Proposal {
    replicas: i32,
    utilization: i32,
    average_value: i64,
    resource: String,
}

fn pod_request(pod: &Pod, resource: &str) -> Result<i64, String> {
    let mut total = 0i64;
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let q = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get(resource))
            .ok_or_else(|| {
                format!(
                    "missing request for {resource} in container {} of Pod {}",
                    c.name,
                    name_of(&pod.metadata)
                )
            })?;
        let q = ParsedQuantity::parse(&q.0).map_err(|e| e.to_string())?;
        total = total.saturating_add(if resource == "cpu" {
            q.milli_value()
        } else {
            q.value()
        });
    }
    Ok(total)
}

fn ready_since(pod: &Pod) -> Option<i64> {
    pod.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")?
        .last_transition_time
        .as_ref()
        .map(|t| t.0.as_second())
}

fn start_time(pod: &Pod) -> Option<i64> {
    pod.status
        .as_ref()?
        .start_time
        .as_ref()
        .map(|t| t.0.as_second())
}

/// Kubernetes' `GetResourceReplicas` for one Resource metric with a Utilization target.
#[allow(clippy::too_many_arguments)]
fn resource_replicas(
    current: i32,
    target_utilization: i32,
    resource: &str,
    pods: &[&Pod],
    metrics: &BTreeMap<String, PodSample>,
    config: &HpaConfig,
    now: i64,
) -> Result<Proposal, String> {
    if pods.is_empty() {
        return Err("no pods returned by selector while calculating replica count".into());
    }
    let mut ready: BTreeMap<String, i64> = BTreeMap::new();
    let mut unready: BTreeSet<String> = BTreeSet::new();
    let mut missing: BTreeSet<String> = BTreeSet::new();
    let mut requests: BTreeMap<String, i64> = BTreeMap::new();
    for pod in pods {
        let pod_name = name_of(&pod.metadata);
        if pod.metadata.deletion_timestamp.is_some() || phase(pod) == "Failed" {
            continue;
        }
        requests.insert(pod_name.clone(), pod_request(pod, resource)?);
        if phase(pod) == "Pending" {
            unready.insert(pod_name);
            continue;
        }
        let Some(sample) = metrics.get(&pod_name) else {
            missing.insert(pod_name);
            continue;
        };
        if resource == "cpu" {
            // Kubernetes' groupPods: a pod starting up is unready if it is not ready, or if its
            // sample may cover the time before it became ready.
            let started = start_time(pod).unwrap_or(now);
            let is_unready = if started + config.cpu_initialization_period > now {
                !is_ready(pod)
                    || ready_since(pod).is_none_or(|since| sample.timestamp < since + sample.window)
            } else {
                !is_ready(pod)
                    && ready_since(pod)
                        .is_none_or(|since| started + config.initial_readiness_delay > since)
            };
            if is_unready {
                unready.insert(pod_name);
                continue;
            }
        }
        ready.insert(pod_name, sample.value);
    }
    let ratio_of = |samples: &BTreeMap<String, i64>| -> Result<(f64, i32, i64), String> {
        let mut usage = 0i64;
        let mut requested = 0i64;
        for (pod, value) in samples {
            if let Some(r) = requests.get(pod) {
                usage = usage.saturating_add(*value);
                requested = requested.saturating_add(*r);
            }
        }
        if requested == 0 {
            return Err(format!(
                "no metrics returned matched known pods (or their {resource} requests are zero)"
            ));
        }
        let utilization = i32::try_from(usage.saturating_mul(100) / requested).unwrap_or(i32::MAX);
        let average = usage / i64::try_from(samples.len().max(1)).unwrap_or(1);
        Ok((
            f64::from(utilization) / f64::from(target_utilization),
            utilization,
            average,
        ))
    };
    if ready.is_empty() && missing.is_empty() {
        return Err(
            "did not receive metrics for targeted pods (pods might be unready)".to_string(),
        );
    }
    if ready.is_empty() {
        return Err("did not receive metrics for any ready pods".to_string());
    }
    let (ratio, utilization, average_value) = ratio_of(&ready)?;
    let ready_count = ready.len();
    let proposal = |replicas: i32| Proposal {
        replicas,
        utilization,
        average_value,
        resource: resource.to_string(),
    };
    let scale_up_with_unready = !unready.is_empty() && ratio > 1.0;
    if !scale_up_with_unready && missing.is_empty() {
        if (1.0 - ratio).abs() <= config.tolerance {
            return Ok(proposal(current));
        }
        return Ok(proposal((ratio * ready_count as f64).ceil() as i32));
    }
    let mut filled = ready.clone();
    for pod in &missing {
        if ratio < 1.0 {
            filled.insert(pod.clone(), requests.get(pod).copied().unwrap_or(0));
        } else if ratio > 1.0 {
            filled.insert(pod.clone(), 0);
        }
    }
    if scale_up_with_unready {
        for pod in &unready {
            filled.insert(pod.clone(), 0);
        }
    }
    let (new_ratio, _, _) = ratio_of(&filled)?;
    if (1.0 - new_ratio).abs() <= config.tolerance
        || (ratio < 1.0 && new_ratio > 1.0)
        || (ratio > 1.0 && new_ratio < 1.0)
    {
        return Ok(proposal(current));
    }
    let replicas = (new_ratio * filled.len() as f64).ceil() as i32;
    if (new_ratio < 1.0 && replicas > current) || (new_ratio > 1.0 && replicas < current) {
        return Ok(proposal(current));
    }
    Ok(proposal(replicas))
}

fn set_condition(
    conditions: &mut Vec<HorizontalPodAutoscalerCondition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.last_transition_time = Some(time(now));
        }
        c.status = status.into();
        c.reason = Some(reason.into());
        c.message = Some(message.into());
        return;
    }
    conditions.push(HorizontalPodAutoscalerCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_transition_time: Some(time(now)),
    });
}

/// Reconciles one HPA. `target` is what the scale subresource returned (Err: why it could not
/// be read); `pods` are the pods of the HPA's namespace; `metrics` the PodMetrics there, by pod
/// name; `history` the recommendations kept since the last calls (the caller drops entries
/// older than the longest window).
#[allow(clippy::too_many_arguments)]
pub fn reconcile(
    hpa: &HorizontalPodAutoscaler,
    target: Result<ScaleTarget, String>,
    pods: &[Pod],
    metrics: &BTreeMap<String, PodMetrics>,
    history: &[Recommendation],
    config: &HpaConfig,
    now: Timestamp,
) -> Result<HpaOutcome, ReconcileError> {
    let now = crate::whole_seconds(now);
    let namespace = namespace_of(&hpa.metadata);
    let name = name_of(&hpa.metadata);
    let object = format!("HorizontalPodAutoscaler {namespace}/{name}");
    let spec = hpa
        .spec
        .as_ref()
        .ok_or_else(|| ReconcileError::MissingField {
            object: object.clone(),
            field: "spec",
        })?;
    let involved = object_reference(Kind::HorizontalPodAutoscaler, &hpa.metadata);
    let observed = hpa.status.clone().unwrap_or_default();
    let mut status = HorizontalPodAutoscalerStatus {
        observed_generation: hpa.metadata.generation,
        ..observed.clone()
    };
    let mut conditions = observed.conditions.clone().unwrap_or_default();
    let mut result = HpaOutcome::default();
    let mut events = Vec::new();
    let min = spec.min_replicas.unwrap_or(1).max(1);
    let max = spec.max_replicas.max(min);
    let target_ref = &spec.scale_target_ref;

    let finish = |mut result: HpaOutcome,
                  events: Vec<Action>,
                  mut status: HorizontalPodAutoscalerStatus,
                  conditions: Vec<HorizontalPodAutoscalerCondition>| {
        status.conditions = (!conditions.is_empty()).then_some(conditions);
        result.outcome.actions.extend(events);
        if status != observed {
            let mut next = hpa.clone();
            next.status = Some(status);
            result
                .outcome
                .actions
                .push(Action::UpdateStatus(Object::HorizontalPodAutoscaler(
                    Box::new(next),
                )));
        }
        result
    };

    let target = match target {
        Ok(t) => t,
        Err(why) => {
            let message =
                format!("the HPA controller was unable to get the target's current scale: {why}");
            set_condition(
                &mut conditions,
                "AbleToScale",
                "False",
                "FailedGetScale",
                &message,
                now,
            );
            events.push(Action::Event(EventRecord {
                involved: involved.clone(),
                event_type: EventType::Warning,
                reason: "FailedGetScale".into(),
                message,
            }));
            return Ok(finish(result, events, status, conditions));
        }
    };
    let current = target.replicas;
    status.current_replicas = Some(current);
    set_condition(
        &mut conditions,
        "AbleToScale",
        "True",
        "SucceededGetScale",
        "the HPA controller was able to get the target's current scale",
        now,
    );
    if current == 0 && min != 0 {
        status.desired_replicas = 0;
        status.current_metrics = None;
        set_condition(
            &mut conditions,
            "ScalingActive",
            "False",
            "ScalingDisabled",
            "scaling is disabled since the replica count of the target is zero",
            now,
        );
        return Ok(finish(result, events, status, conditions));
    }

    let selector = target
        .selector
        .as_deref()
        .ok_or_else(|| "the target's scale has no selector".to_string())
        .and_then(|s| LabelSelector::parse(s).map_err(|e| e.to_string()));
    let mut proposals: Vec<Proposal> = Vec::new();
    let mut failure: Option<String> = None;
    match selector {
        Err(e) => {
            failure = Some(format!(
                "couldn't convert selector into a corresponding internal selector object: {e}"
            ))
        }
        Ok(selector) => {
            let selected: Vec<&Pod> = pods
                .iter()
                .filter(|p| {
                    namespace_of(&p.metadata) == namespace
                        && selector.matches(&labels_of(&p.metadata))
                })
                .collect();
            let default_metric;
            let metric_specs = match spec.metrics.as_deref() {
                Some(m) if !m.is_empty() => m,
                _ => {
                    // The autoscaling/v2 default: 80% cpu.
                    default_metric = vec![k8s_openapi::api::autoscaling::v2::MetricSpec {
                        type_: "Resource".into(),
                        resource: Some(k8s_openapi::api::autoscaling::v2::ResourceMetricSource {
                            name: "cpu".into(),
                            target: k8s_openapi::api::autoscaling::v2::MetricTarget {
                                type_: "Utilization".into(),
                                average_utilization: Some(80),
                                ..Default::default()
                            },
                        }),
                        ..Default::default()
                    }];
                    &default_metric[..]
                }
            };
            for m in metric_specs {
                let outcome = match (m.type_.as_str(), m.resource.as_ref()) {
                    ("Resource", Some(r)) if r.target.type_ == "Utilization" => {
                        match r.target.average_utilization {
                            Some(u) if u > 0 => {
                                let samples: BTreeMap<String, PodSample> = metrics
                                    .iter()
                                    .filter_map(|(pod, m)| Some((pod.clone(), m.sample(&r.name)?)))
                                    .collect();
                                resource_replicas(
                                    current,
                                    u,
                                    &r.name,
                                    &selected,
                                    &samples,
                                    config,
                                    now.as_second(),
                                )
                            }
                            _ => Err("target averageUtilization must be above zero".into()),
                        }
                    }
                    (t, _) => Err(format!(
                        "metric type {t} (target {:?}) is not supported by skiff; use Resource metrics with Utilization targets",
                        m.resource.as_ref().map(|r| r.target.type_.clone())
                    )),
                };
                match outcome {
                    Ok(p) => proposals.push(p),
                    Err(e) => failure = Some(e),
                }
            }
        }
    }
    if proposals.is_empty() {
        let message = failure.unwrap_or_else(|| "no metrics".into());
        set_condition(
            &mut conditions,
            "ScalingActive",
            "False",
            "FailedGetResourceMetric",
            &message,
            now,
        );
        events.push(Action::Event(EventRecord {
            involved: involved.clone(),
            event_type: EventType::Warning,
            reason: "FailedGetResourceMetric".into(),
            message,
        }));
        status.desired_replicas = current;
        return Ok(finish(result, events, status, conditions));
    }
    let best = proposals
        .iter()
        .max_by_key(|p| p.replicas)
        .map(|p| (p.replicas, p.resource.clone()))
        .unwrap_or((current, "cpu".into()));
    status.current_metrics = Some(
        proposals
            .iter()
            .map(|p| MetricStatus {
                type_: "Resource".into(),
                resource: Some(ResourceMetricStatus {
                    name: p.resource.clone(),
                    current: MetricValueStatus {
                        average_utilization: Some(p.utilization),
                        average_value: Some(Quantity(if p.resource == "cpu" {
                            format!("{}m", p.average_value)
                        } else {
                            p.average_value.to_string()
                        })),
                        value: None,
                    },
                }),
                ..Default::default()
            })
            .collect(),
    );
    set_condition(
        &mut conditions,
        "ScalingActive",
        "True",
        "ValidMetricFound",
        &format!(
            "the HPA was able to successfully calculate a replica count from {} resource utilization (percentage of request)",
            best.1
        ),
        now,
    );
    let proposed = best.0;
    result.recommendation = Some(Recommendation {
        at: now.as_second(),
        replicas: proposed,
    });

    // Stabilization (normalizeDesiredReplicasWithBehaviors).
    let behavior = spec.behavior.as_ref();
    let down_window = behavior
        .and_then(|b| b.scale_down.as_ref())
        .and_then(|r| r.stabilization_window_seconds)
        .map(i64::from)
        .unwrap_or(config.downscale_stabilization);
    let up_window = behavior
        .and_then(|b| b.scale_up.as_ref())
        .and_then(|r| r.stabilization_window_seconds)
        .map(i64::from)
        .unwrap_or(0);
    let mut up = proposed;
    let mut down = proposed;
    for r in history {
        if r.at > now.as_second() - up_window {
            up = up.min(r.replicas);
        }
        if r.at > now.as_second() - down_window {
            down = down.max(r.replicas);
        }
    }
    let mut desired = current;
    if desired < up {
        desired = up;
    }
    if desired > down {
        desired = down;
    }
    // Default rate limit of a scale-up: 100% or 4 pods per period, whichever is more.
    let up_limit = current.saturating_mul(2).max(current.saturating_add(4));
    let (limited, reason, message) = if desired > max {
        (
            max,
            "TooManyReplicas",
            "the desired replica count is more than the maximum replica count",
        )
    } else if desired < min {
        (
            min,
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count",
        )
    } else if desired > up_limit {
        (
            up_limit,
            "ScaleUpLimit",
            "the desired replica count is increasing faster than the maximum scale rate",
        )
    } else {
        (
            desired,
            "DesiredWithinRange",
            "the desired count is within the acceptable range",
        )
    };
    let desired = limited.min(max).max(min);
    set_condition(
        &mut conditions,
        "ScalingLimited",
        if reason == "DesiredWithinRange" {
            "False"
        } else {
            "True"
        },
        reason,
        message,
        now,
    );
    status.desired_replicas = desired;
    if desired != current {
        let why = if desired > current {
            format!(
                "{} resource utilization (percentage of request) above target",
                best.1
            )
        } else {
            "All metrics below target".to_string()
        };
        result.outcome.actions.push(Action::Scale {
            api_version: target_ref.api_version.clone().unwrap_or_default(),
            kind: target_ref.kind.clone(),
            namespace: namespace.clone(),
            name: target_ref.name.clone(),
            replicas: desired,
        });
        events.push(Action::Event(EventRecord {
            involved: involved.clone(),
            event_type: EventType::Normal,
            reason: "SuccessfulRescale".into(),
            message: format!("New size: {desired}; reason: {why}"),
        }));
        status.last_scale_time = Some(time(now));
        set_condition(
            &mut conditions,
            "AbleToScale",
            "True",
            "SucceededRescale",
            &format!("the HPA controller was able to update the target scale to {desired}"),
            now,
        );
    } else {
        set_condition(
            &mut conditions,
            "AbleToScale",
            "True",
            "ReadyForNewScale",
            "recommended size matches current size",
            now,
        );
    }
    Ok(finish(result, events, status, conditions))
}

#[cfg(test)]
#[path = "hpa_tests.rs"]
mod tests;
