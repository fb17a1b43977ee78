//! The Job controller (Kubernetes' `pkg/controller/job`, NonIndexed completion mode) and the
//! TTL-after-finished controller: run pods until `completions` succeed with at most
//! `parallelism` active, fail after `backoffLimit` failures (exponential back-off between
//! retries) or `activeDeadlineSeconds`, and delete the finished Job after
//! `ttlSecondsAfterFinished`.
//!
//! Differences from Kubernetes, deliberately: succeeded/failed are counted from the Job's pods
//! that exist (never going below the recorded counts) instead of through a tracking finalizer;
//! a failing Job gets `Failed` at once (Kubernetes 1.31+ first sets `FailureTarget` and waits for
//! pods to terminate); `Indexed` completion mode, podFailurePolicy and successPolicy are refused
//! with an error rather than half-implemented.

use std::collections::BTreeSet;

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;

use crate::pod_util::{deletion_order, is_active, is_ready, phase};
use crate::replicaset::BURST_REPLICAS;
use crate::{
    Action, EventRecord, EventType, Kind, Object, Outcome, ReconcileError, SuffixSource,
    controller_owner_ref, is_controlled_by, name_of, namespace_of, object_reference, time,
};

pub const COMPLETE: &str = "Complete";
pub const FAILED: &str = "Failed";
pub const SUSPENDED: &str = "Suspended";
pub const BACKOFF_LIMIT_EXCEEDED: &str = "BackoffLimitExceeded";
pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
pub const COMPLETIONS_REACHED: &str = "CompletionsReached";
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
pub const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
/// Kubernetes' `DefaultJobPodFailureBackOff` and `MaxJobPodFailureBackOff`.
pub const BACKOFF_BASE_SECONDS: i64 = 10;
pub const BACKOFF_MAX_SECONDS: i64 = 360;

fn condition_true(status: &JobStatus, type_: &str) -> Option<JobCondition> {
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == type_ && c.status == "True")
        .cloned()
}

/// Whether the Job has finished (Complete or Failed).
pub fn is_finished(job: &Job) -> bool {
    job.status.as_ref().is_some_and(|s| {
        condition_true(s, COMPLETE).is_some() || condition_true(s, FAILED).is_some()
    })
}

fn set_condition(
    status: &mut JobStatus,
    type_: &str,
    state: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status == state && c.reason.as_deref() == Some(reason) {
            return;
        }
        if c.status != state {
            c.last_transition_time = Some(time(now));
        }
        c.status = state.to_string();
        c.reason = Some(reason.to_string());
        c.message = Some(message.to_string());
        c.last_probe_time = Some(time(now));
        return;
    }
    conditions.push(JobCondition {
        type_: type_.to_string(),
        status: state.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_probe_time: Some(time(now)),
        last_transition_time: Some(time(now)),
    });
}

/// When a pod finished: its latest container termination, else its last condition change,
/// else its creation.
fn finished_at(pod: &Pod) -> Option<i64> {
    let status = pod.status.as_ref();
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0.as_second())
        .max();
    terminated
        .or_else(|| {
            status
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0.as_second()))
                .max()
        })
        .or_else(|| {
            pod.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
        })
}

fn restarts(pod: &Pod) -> i32 {
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .chain(
            status
                .and_then(|s| s.init_container_statuses.as_ref())
                .into_iter()
                .flatten(),
        )
        .map(|c| c.restart_count)
        .sum()
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// `Some(n)` unless zero, as the API omits zero counts.
fn nonzero(n: i32) -> Option<i32> {
    (n != 0).then_some(n)
}

/// Reconciles one Job. `pods` are the pods of its namespace (only those it controls count);
/// `names` supplies pod-name suffixes.
pub fn reconcile(
    job: &Job,
    pods: &[Pod],
    names: &mut dyn SuffixSource,
    now: Timestamp,
) -> Result<Outcome, ReconcileError> {
    let now = crate::whole_seconds(now);
    let namespace = namespace_of(&job.metadata);
    let name = name_of(&job.metadata);
    let object = format!("Job {namespace}/{name}");
    let uid = job
        .metadata
        .uid
        .clone()
        .ok_or_else(|| ReconcileError::MissingField {
            object: object.clone(),
            field: "metadata.uid",
        })?;
    let spec = job
        .spec
        .as_ref()
        .ok_or_else(|| ReconcileError::MissingField {
            object: object.clone(),
            field: "spec",
        })?;
    let unsupported = |field: &'static str, value: String| ReconcileError::InvalidValue {
        object: object.clone(),
        field,
        value,
        reason: "not supported by skiff yet; use NonIndexed jobs without this field".into(),
    };
    if let Some(mode) = spec
        .completion_mode
        .as_deref()
        .filter(|m| *m != "NonIndexed")
    {
        return Err(unsupported("spec.completionMode", mode.to_string()));
    }
    if spec.pod_failure_policy.is_some() {
        return Err(unsupported("spec.podFailurePolicy", "set".into()));
    }
    if spec.success_policy.is_some() {
        return Err(unsupported("spec.successPolicy", "set".into()));
    }
    let parallelism = spec.parallelism.unwrap_or(1).max(0);
    let completions = spec.completions;
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let restart_policy = spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Never");

    let involved = object_reference(Kind::Job, &job.metadata);
    let mut outcome = Outcome::default();
    let mut events = Vec::new();
    let observed = job.status.clone().unwrap_or_default();
    let mut status = observed.clone();

    let owned: Vec<&Pod> = pods
        .iter()
        .filter(|p| namespace_of(&p.metadata) == namespace && is_controlled_by(&p.metadata, &uid))
        .collect();
    let active: Vec<&Pod> = owned.iter().copied().filter(|p| is_active(p)).collect();
    let delete_pods = |victims: &[&Pod], outcome: &mut Outcome, events: &mut Vec<Action>| {
        for pod in victims {
            let pod_name = name_of(&pod.metadata);
            outcome.actions.push(Action::Delete {
                kind: Kind::Pod,
                namespace: namespace.clone(),
                name: pod_name.clone(),
                uid: pod.metadata.uid.clone(),
            });
            events.push(event(
                &involved,
                EventType::Normal,
                "SuccessfulDelete",
                format!("Deleted pod: {pod_name}"),
            ));
        }
    };

    if is_finished(job) {
        // Leftover pods of a finished Job go (a failed Job's may still run).
        delete_pods(&active, &mut outcome, &mut events);
        if let Some(ttl) = spec.ttl_seconds_after_finished {
            let finished = status
                .completion_time
                .as_ref()
                .map(|t| t.0.as_second())
                .or_else(|| {
                    condition_true(&status, FAILED)
                        .or_else(|| condition_true(&status, COMPLETE))
                        .and_then(|c| c.last_transition_time.map(|t| t.0.as_second()))
                })
                .unwrap_or(now.as_second());
            let expires = finished + i64::from(ttl);
            if expires <= now.as_second() {
                outcome.actions.push(Action::Delete {
                    kind: Kind::Job,
                    namespace: namespace.clone(),
                    name: name.clone(),
                    uid: Some(uid.clone()),
                });
            } else {
                outcome.requeue_at_most(expires - now.as_second());
            }
        }
        outcome.actions.extend(events);
        return Ok(outcome);
    }

    let succeeded_pods = owned.iter().filter(|p| phase(p) == "Succeeded").count();
    let failed_pods = owned.iter().filter(|p| phase(p) == "Failed").count();
    let succeeded = count(succeeded_pods).max(observed.succeeded.unwrap_or(0));
    let failed = count(failed_pods).max(observed.failed.unwrap_or(0));
    let terminating = owned
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_some() && !matches!(phase(p), "Succeeded" | "Failed")
        })
        .count();
    let mut remaining_active: Vec<&Pod> = active.clone();

    if spec.suspend == Some(true) {
        delete_pods(&active, &mut outcome, &mut events);
        remaining_active.clear();
        set_condition(
            &mut status,
            SUSPENDED,
            "True",
            "JobSuspended",
            "Job suspended",
            now,
        );
        status.start_time = None;
    } else {
        if condition_true(&status, SUSPENDED).is_some() {
            set_condition(
                &mut status,
                SUSPENDED,
                "False",
                "JobResumed",
                "Job resumed",
                now,
            );
        }
        if status.start_time.is_none() {
            status.start_time = Some(time(now));
        }
        let start = status
            .start_time
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(now.as_second());

        let backoff_exceeded = if restart_policy == "OnFailure" {
            let restarts: i32 = active.iter().map(|p| restarts(p)).sum();
            // Kubernetes' pastBackoffLimitOnFailure: container restarts count as failures.
            failed > backoff_limit
                || if backoff_limit == 0 {
                    restarts > 0
                } else {
                    restarts >= backoff_limit
                }
        } else {
            failed > backoff_limit
        };
        let deadline = spec.active_deadline_seconds.map(|s| start + s);
        let deadline_passed = deadline.is_some_and(|d| d <= now.as_second());
        let complete = match completions {
            Some(c) => succeeded >= c,
            None => succeeded >= 1 && active.is_empty(),
        };

        if complete {
            delete_pods(&active, &mut outcome, &mut events);
            remaining_active.clear();
            set_condition(
                &mut status,
                COMPLETE,
                "True",
                COMPLETIONS_REACHED,
                "Reached expected number of succeeded pods",
                now,
            );
            status.completion_time = Some(time(now));
            events.push(event(
                &involved,
                EventType::Normal,
                "Completed",
                "Job completed".into(),
            ));
            if let Some(ttl) = spec.ttl_seconds_after_finished {
                outcome.requeue_at_most(i64::from(ttl).max(1));
            }
        } else if backoff_exceeded || deadline_passed {
            let (reason, message) = if backoff_exceeded {
                (
                    BACKOFF_LIMIT_EXCEEDED,
                    "Job has reached the specified backoff limit",
                )
            } else {
                (
                    DEADLINE_EXCEEDED,
                    "Job was active longer than specified deadline",
                )
            };
            delete_pods(&active, &mut outcome, &mut events);
            remaining_active.clear();
            set_condition(&mut status, FAILED, "True", reason, message, now);
            events.push(event(&involved, EventType::Warning, reason, message.into()));
            if let Some(ttl) = spec.ttl_seconds_after_finished {
                outcome.requeue_at_most(i64::from(ttl).max(1));
            }
        } else {
            if let Some(d) = deadline {
                outcome.requeue_at_most(d - now.as_second());
            }
            let active_n = count(active.len());
            let want = match completions {
                Some(c) => parallelism.min((c - succeeded).max(0)),
                // Work-queue Jobs: once one pod succeeded, start no more.
                None if succeeded > 0 => active_n,
                None => parallelism,
            };
            if active_n > want {
                let mut ranked = active.clone();
                ranked.sort_by(|a, b| deletion_order(a, 0, b, 0));
                let victims: Vec<&Pod> = ranked
                    .into_iter()
                    .take((active_n - want) as usize)
                    .collect();
                delete_pods(&victims, &mut outcome, &mut events);
                let gone: BTreeSet<String> = victims.iter().map(|p| name_of(&p.metadata)).collect();
                remaining_active.retain(|p| !gone.contains(&name_of(&p.metadata)));
            } else if active_n < want {
                // Exponential back-off after failures: 10s, 20s, 40s ... at most 6 minutes.
                let last_failure = owned
                    .iter()
                    .filter(|p| phase(p) == "Failed")
                    .filter_map(|p| finished_at(p))
                    .max();
                let delay = if failed > 0 {
                    let exponent = u32::try_from(failed - 1).unwrap_or(u32::MAX).min(16);
                    (BACKOFF_BASE_SECONDS << exponent).min(BACKOFF_MAX_SECONDS)
                } else {
                    0
                };
                let ready_at = last_failure.map(|t| t + delay).unwrap_or(now.as_second());
                if ready_at > now.as_second() {
                    outcome.requeue_at_most(ready_at - now.as_second());
                } else {
                    let taken: BTreeSet<String> =
                        pods.iter().map(|p| name_of(&p.metadata)).collect();
                    let mut new_names = BTreeSet::new();
                    let to_create = usize::try_from(want - active_n)
                        .unwrap_or(0)
                        .min(BURST_REPLICAS);
                    for _ in 0..to_create {
                        let pod_name = loop {
                            let candidate = format!("{name}-{}", names.suffix());
                            if !taken.contains(&candidate) && new_names.insert(candidate.clone()) {
                                break candidate;
                            }
                        };
                        outcome
                            .actions
                            .push(Action::Create(Object::Pod(Box::new(job_pod(
                                job, &uid, &pod_name,
                            )))));
                        events.push(event(
                            &involved,
                            EventType::Normal,
                            "SuccessfulCreate",
                            format!("Created pod: {pod_name}"),
                        ));
                    }
                }
            }
        }
    }

    status.active = nonzero(count(remaining_active.len()));
    status.ready = Some(count(
        remaining_active.iter().filter(|p| is_ready(p)).count(),
    ));
    status.succeeded = nonzero(succeeded);
    status.failed = nonzero(failed);
    status.terminating = Some(count(terminating));
    outcome.actions.extend(events);
    if status != observed {
        let mut updated = job.clone();
        updated.status = Some(status);
        outcome
            .actions
            .push(Action::UpdateStatus(Object::Job(Box::new(updated))));
    }
    Ok(outcome)
}

fn job_pod(job: &Job, uid: &str, pod_name: &str) -> Pod {
    let name = name_of(&job.metadata);
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    // The apiserver normally adds these to the template; make sure the pods carry them.
    for (k, v) in [
        (CONTROLLER_UID_LABEL, uid),
        (JOB_NAME_LABEL, name.as_str()),
        ("controller-uid", uid),
        ("job-name", name.as_str()),
    ] {
        labels.entry(k.to_string()).or_insert_with(|| v.to_string());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name.to_string()),
            generate_name: Some(format!("{name}-")),
            namespace: job.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: meta.annotations,
            finalizers: meta.finalizers,
            owner_references: Some(vec![controller_owner_ref(Kind::Job, &job.metadata)]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    }
}

fn event(
    involved: &k8s_openapi::api::core::v1::ObjectReference,
    event_type: EventType,
    reason: &str,
    message: String,
) -> Action {
    Action::Event(EventRecord {
        involved: involved.clone(),
        event_type,
        reason: reason.to_string(),
        message,
    })
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
