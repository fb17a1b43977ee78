//! The CronJob controller (Kubernetes' `cronjob_controllerv2`): creates a Job for each scheduled
//! time of a 5-field cron schedule evaluated in the CronJob's time zone, with
//! concurrencyPolicy Allow/Forbid/Replace, startingDeadlineSeconds, suspend, the successful and
//! failed Jobs history limits, and status.active / lastScheduleTime / lastSuccessfulTime.
//!
//! Jobs are named `<cronjob>-<scheduled time in minutes since the epoch>`, so a restarted
//! controller never starts a scheduled time twice (the name already exists).
//!
//! Schedules are parsed by the `croner` crate (5 fields, Vixie-cron day-of-month OR day-of-week,
//! `@hourly`-style nicknames) over jiff zoned times, so DST gaps and folds follow the zone's rules.
//! Time zones come from the caller (`zones`), because reading the tz database is I/O: `None`
//! asks for the default zone (Kubernetes: the controller-manager's local zone).
//! An unparseable schedule or an unknown zone is a [`ReconcileError`] (nothing is done).

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use k8s_openapi::api::batch::v1::{CronJob, CronJobStatus, Job};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::tz::TimeZone;

use crate::job::{COMPLETE, FAILED};
use crate::{
    Action, EventRecord, EventType, Kind, Object, Outcome, ReconcileError, controller_owner_ref,
    is_controlled_by, name_of, namespace_of, object_reference, time,
};

pub const SCHEDULED_TIMESTAMP_ANNOTATION: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// Kubernetes stops counting missed start times here and warns.
pub const MAX_MISSED: usize = 100;

/// Parses a 5-field cron schedule.
pub fn parse_schedule(schedule: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .build()
        .parse(schedule.trim())
        .map_err(|e| e.to_string())
}

fn condition(job: &Job, type_: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

fn finished(job: &Job) -> bool {
    condition(job, COMPLETE) || condition(job, FAILED)
}

fn job_ref(job: &Job) -> ObjectReference {
    ObjectReference {
        resource_version: None,
        ..object_reference(Kind::Job, &job.metadata)
    }
}

fn event(involved: &ObjectReference, t: EventType, reason: &str, message: String) -> Action {
    Action::Event(EventRecord {
        involved: involved.clone(),
        event_type: t,
        reason: reason.into(),
        message,
    })
}

/// The scheduled times in `(after, now]`: the most recent one and how many there were (counting
/// stops past [`MAX_MISSED`]).
fn most_recent(
    cron: &Cron,
    tz: &TimeZone,
    after: Timestamp,
    now: Timestamp,
) -> (Option<Timestamp>, usize) {
    let mut cursor = after.to_zoned(tz.clone());
    let mut latest = None;
    let mut missed = 0;
    while missed <= MAX_MISSED {
        let Ok(next) = cron.find_next_occurrence(&cursor, false) else {
            break;
        };
        if next.timestamp() > now {
            break;
        }
        missed += 1;
        latest = Some(next.timestamp());
        cursor = next;
    }
    if missed > MAX_MISSED {
        // Too many to walk: the latest is the last match at or before now.
        latest = cron
            .find_previous_occurrence(&now.to_zoned(tz.clone()), true)
            .ok()
            .map(|z| z.timestamp());
    }
    (latest, missed)
}

/// Reconciles one CronJob. `jobs` are the Jobs of its namespace (only those it controls count).
pub fn reconcile(
    cron_job: &CronJob,
    jobs: &[Job],
    now: Timestamp,
    zones: &dyn Fn(Option<&str>) -> Option<TimeZone>,
) -> Result<Outcome, ReconcileError> {
    let now = crate::whole_seconds(now);
    let namespace = namespace_of(&cron_job.metadata);
    let name = name_of(&cron_job.metadata);
    let object = format!("CronJob {namespace}/{name}");
    let missing = |field: &'static str| ReconcileError::MissingField {
        object: object.clone(),
        field,
    };
    let uid = cron_job
        .metadata
        .uid
        .clone()
        .ok_or_else(|| missing("metadata.uid"))?;
    let spec = cron_job.spec.as_ref().ok_or_else(|| missing("spec"))?;
    let involved = object_reference(Kind::CronJob, &cron_job.metadata);
    let mut outcome = Outcome::default();
    let mut events = Vec::new();
    let observed = cron_job.status.clone().unwrap_or_default();
    let mut status = observed.clone();

    // Reconcile status.active with the Jobs that exist.
    let owned: Vec<&Job> = jobs
        .iter()
        .filter(|j| namespace_of(&j.metadata) == namespace && is_controlled_by(&j.metadata, &uid))
        .collect();
    let mut active: Vec<ObjectReference> = Vec::new();
    // Rebuilt from the Jobs listed each time: a Job that is gone simply drops out.
    for job in &owned {
        let was_active = observed
            .active
            .iter()
            .flatten()
            .any(|r| r.uid == job.metadata.uid);
        if finished(job) {
            if was_active {
                events.push(event(
                    &involved,
                    EventType::Normal,
                    "SawCompletedJob",
                    format!(
                        "Saw completed job: {}, condition: {}",
                        name_of(&job.metadata),
                        if condition(job, COMPLETE) {
                            COMPLETE
                        } else {
                            FAILED
                        }
                    ),
                ));
            }
        } else if job.metadata.deletion_timestamp.is_none() {
            active.push(job_ref(job));
        }
        if condition(job, COMPLETE)
            && let Some(done) = job.status.as_ref().and_then(|s| s.completion_time.clone())
            && status
                .last_successful_time
                .as_ref()
                .is_none_or(|t| t.0 < done.0)
        {
            status.last_successful_time = Some(done);
        }
    }
    active.sort_by(|a, b| a.name.cmp(&b.name));
    status.active = (!active.is_empty()).then_some(active.clone());

    // History limits.
    let mut cleanup = |type_: &str, limit: i32| {
        let mut done: Vec<&&Job> = owned
            .iter()
            .filter(|j| condition(j, type_) && j.metadata.deletion_timestamp.is_none())
            .collect();
        done.sort_by_key(|j| {
            (
                j.status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .map(|t| t.0.as_second())
                    .or_else(|| crate::created_second(&j.metadata)),
                name_of(&j.metadata),
            )
        });
        let extra = done
            .len()
            .saturating_sub(usize::try_from(limit.max(0)).unwrap_or(0));
        for job in done.into_iter().take(extra) {
            let job_name = name_of(&job.metadata);
            outcome.actions.push(Action::Delete {
                kind: Kind::Job,
                namespace: namespace.clone(),
                name: job_name.clone(),
                uid: job.metadata.uid.clone(),
            });
            events.push(event(
                &involved,
                EventType::Normal,
                "SuccessfulDelete",
                format!("Deleted job {job_name}"),
            ));
        }
    };
    cleanup(COMPLETE, spec.successful_jobs_history_limit.unwrap_or(3));
    cleanup(FAILED, spec.failed_jobs_history_limit.unwrap_or(1));

    let finish = |mut outcome: Outcome, events: Vec<Action>, status: CronJobStatus| {
        outcome.actions.extend(events);
        if status != observed {
            let mut next = cron_job.clone();
            next.status = Some(status);
            outcome
                .actions
                .push(Action::UpdateStatus(Object::CronJob(Box::new(next))));
        }
        outcome
    };

    if cron_job.metadata.deletion_timestamp.is_some() || spec.suspend == Some(true) {
        return Ok(finish(outcome, events, status));
    }

    let cron = parse_schedule(&spec.schedule).map_err(|reason| ReconcileError::InvalidValue {
        object: object.clone(),
        field: "spec.schedule",
        value: spec.schedule.clone(),
        reason,
    })?;
    let tz = zones(spec.time_zone.as_deref()).ok_or_else(|| ReconcileError::InvalidValue {
        object: object.clone(),
        field: "spec.timeZone",
        value: spec.time_zone.clone().unwrap_or_default(),
        reason: "unknown time zone".into(),
    })?;

    // When to look again: the next scheduled time.
    if let Ok(next) = cron.find_next_occurrence(&now.to_zoned(tz.clone()), false) {
        outcome.requeue_at_most(next.timestamp().as_second() - now.as_second());
    }

    let created = cron_job
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(now);
    let mut earliest = status
        .last_schedule_time
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(created);
    if let Some(deadline) = spec.starting_deadline_seconds
        && let Ok(limit) = Timestamp::from_second(now.as_second() - deadline)
        && limit > earliest
    {
        earliest = limit;
    }
    let (scheduled, missed) = most_recent(&cron, &tz, earliest, now);
    if missed > MAX_MISSED {
        events.push(event(
            &involved,
            EventType::Warning,
            "TooManyMissedTimes",
            "too many missed start times. Set or decrease .spec.startingDeadlineSeconds or check clock skew".into(),
        ));
    }
    let Some(scheduled) = scheduled else {
        return Ok(finish(outcome, events, status));
    };
    if let Some(deadline) = spec.starting_deadline_seconds
        && scheduled.as_second() + deadline < now.as_second()
    {
        events.push(event(
            &involved,
            EventType::Warning,
            "MissSchedule",
            format!("Missed scheduled time to start a job: {scheduled}"),
        ));
        return Ok(finish(outcome, events, status));
    }
    let job_name = format!("{name}-{}", scheduled.as_second().div_euclid(60));
    if jobs
        .iter()
        .any(|j| namespace_of(&j.metadata) == namespace && name_of(&j.metadata) == job_name)
    {
        // Already started (perhaps by an earlier incarnation of this controller).
        if status
            .last_schedule_time
            .as_ref()
            .is_none_or(|t| t.0 < scheduled)
        {
            status.last_schedule_time = Some(time(scheduled));
        }
        return Ok(finish(outcome, events, status));
    }
    match spec.concurrency_policy.as_deref().unwrap_or("Allow") {
        "Forbid" if !active.is_empty() => {
            // Kubernetes waits for the running Job; the time counts as missed once the next
            // one comes (or startingDeadlineSeconds passes).
            return Ok(finish(outcome, events, status));
        }
        "Replace" => {
            for r in &active {
                let old = r.name.clone().unwrap_or_default();
                outcome.actions.push(Action::Delete {
                    kind: Kind::Job,
                    namespace: namespace.clone(),
                    name: old.clone(),
                    uid: r.uid.clone(),
                });
                events.push(event(
                    &involved,
                    EventType::Normal,
                    "SuccessfulDelete",
                    format!("Deleted job {old}"),
                ));
            }
            active.clear();
        }
        "Allow" | "Forbid" => {}
        other => {
            return Err(ReconcileError::InvalidValue {
                object,
                field: "spec.concurrencyPolicy",
                value: other.to_string(),
                reason: "must be Allow, Forbid or Replace".into(),
            });
        }
    }
    let template = &spec.job_template;
    let meta = template.metadata.clone().unwrap_or_default();
    let mut annotations = meta.annotations.unwrap_or_default();
    annotations.insert(SCHEDULED_TIMESTAMP_ANNOTATION.into(), scheduled.to_string());
    let job = Job {
        metadata: ObjectMeta {
            name: Some(job_name.clone()),
            namespace: Some(namespace.clone()),
            labels: meta.labels,
            annotations: Some(annotations),
            owner_references: Some(vec![controller_owner_ref(
                Kind::CronJob,
                &cron_job.metadata,
            )]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    };
    active.push(ObjectReference {
        name: Some(job_name.clone()),
        namespace: Some(namespace.clone()),
        ..job_ref(&job)
    });
    outcome
        .actions
        .push(Action::Create(Object::Job(Box::new(job))));
    events.push(event(
        &involved,
        EventType::Normal,
        "SuccessfulCreate",
        format!("Created job {job_name}"),
    ));
    status.active = Some(active);
    status.last_schedule_time = Some(time(scheduled));
    Ok(finish(outcome, events, status))
}

#[cfg(test)]
#[path = "cronjob_tests.rs"]
mod tests;
