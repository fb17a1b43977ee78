#![allow(clippy::unwrap_used)]

use super::*;
use crate::testkit::template;
use k8s_openapi::api::batch::v1::{CronJobSpec, JobCondition, JobSpec, JobStatus, JobTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// 2023-11-14T22:13:20Z.
const START: i64 = 1_700_000_000;

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

fn zones(name: Option<&str>) -> Option<TimeZone> {
    match name {
        None | Some("UTC") => Some(TimeZone::UTC),
        // A fixed zone stands in for the database in these pure tests.
        Some("Test/Plus2") => Some(TimeZone::fixed(k8s_openapi::jiff::tz::offset(2))),
        Some(_) => None,
    }
}

fn cron_job(schedule: &str) -> CronJob {
    CronJob {
        metadata: ObjectMeta {
            name: Some("tick".into()),
            namespace: Some("default".into()),
            uid: Some("cj-uid".into()),
            creation_timestamp: Some(Time(ts(START))),
            ..Default::default()
        },
        spec: Some(CronJobSpec {
            schedule: schedule.into(),
            job_template: JobTemplateSpec {
                metadata: None,
                spec: Some(JobSpec {
                    template: template("busybox"),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// Applies the outcome like the apiserver would: Jobs get uids and start times; returns the
/// names of the Jobs created and deleted.
fn apply(
    cj: &mut CronJob,
    jobs: &mut Vec<Job>,
    out: &Outcome,
    now: i64,
) -> (Vec<String>, Vec<String>) {
    let (mut created, mut deleted) = (vec![], vec![]);
    for a in &out.actions {
        match a {
            Action::Create(Object::Job(j)) => {
                let mut j = (**j).clone();
                j.metadata.uid = Some(format!("{}-uid", name_of(&j.metadata)));
                j.metadata.creation_timestamp = Some(Time(ts(now)));
                j.status = Some(JobStatus {
                    start_time: Some(Time(ts(now))),
                    ..Default::default()
                });
                created.push(name_of(&j.metadata));
                jobs.push(j);
            }
            Action::Delete {
                kind: Kind::Job,
                name,
                ..
            } => {
                jobs.retain(|j| name_of(&j.metadata) != *name);
                deleted.push(name.clone());
            }
            Action::UpdateStatus(Object::CronJob(c)) => cj.status = c.status.clone(),
            Action::Event(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    (created, deleted)
}

fn finish(job: &mut Job, type_: &str, at: i64) {
    let status = job.status.get_or_insert_with(Default::default);
    status.conditions = Some(vec![JobCondition {
        type_: type_.into(),
        status: "True".into(),
        ..Default::default()
    }]);
    if type_ == COMPLETE {
        status.completion_time = Some(Time(ts(at)));
    }
}

/// The next whole minute after START.
fn minute_after_start() -> i64 {
    (START / 60 + 1) * 60
}

#[test]
fn fires_every_minute_with_names_from_the_scheduled_minute() {
    let mut cj = cron_job("* * * * *");
    let mut jobs = vec![];
    // Before the first minute: nothing, requeue for it.
    let out = reconcile(&cj, &jobs, ts(START), &zones).unwrap();
    assert!(out.actions.iter().all(|a| !matches!(a, Action::Create(_))));
    assert_eq!(out.requeue_after, Some(minute_after_start() - START));
    // At the minute (plus a few seconds): one Job named after the minute.
    let t = minute_after_start() + 3;
    let out = reconcile(&cj, &jobs, ts(t), &zones).unwrap();
    let (created, _) = apply(&mut cj, &mut jobs, &out, t);
    assert_eq!(created, vec![format!("tick-{}", minute_after_start() / 60)]);
    let status = cj.status.clone().unwrap();
    assert_eq!(
        status.last_schedule_time.unwrap().0,
        ts(minute_after_start())
    );
    assert_eq!(status.active.unwrap().len(), 1);
    assert_eq!(
        jobs[0].metadata.annotations.as_ref().unwrap()[SCHEDULED_TIMESTAMP_ANNOTATION],
        ts(minute_after_start()).to_string()
    );
    assert!(crate::is_controlled_by(&jobs[0].metadata, "cj-uid"));
    // Again within the same minute: nothing new (level-triggered, idempotent).
    let out = reconcile(&cj, &jobs, ts(t + 10), &zones).unwrap();
    let (created, _) = apply(&mut cj, &mut jobs, &out, t + 10);
    assert!(created.is_empty());
    // The Job completes: lastSuccessfulTime, active empties.
    finish(&mut jobs[0], COMPLETE, t + 20);
    let out = reconcile(&cj, &jobs, ts(t + 21), &zones).unwrap();
    apply(&mut cj, &mut jobs, &out, t + 21);
    let status = cj.status.clone().unwrap();
    assert_eq!(status.last_successful_time.unwrap().0, ts(t + 20));
    assert!(status.active.is_none());
}

#[test]
fn schedules_are_evaluated_in_the_time_zone() {
    // 00:30 in UTC+2 is 22:30 UTC the day before.
    let mut cj = cron_job("30 0 * * *");
    cj.spec.as_mut().unwrap().time_zone = Some("Test/Plus2".into());
    // START is 22:13:20 UTC: the next run is 22:30 UTC today.
    let out = reconcile(&cj, &[], ts(START), &zones).unwrap();
    assert_eq!(out.requeue_after, Some(16 * 60 + 40));
    cj.spec.as_mut().unwrap().time_zone = Some("Mars/Olympus".into());
    assert!(matches!(
        reconcile(&cj, &[], ts(START), &zones),
        Err(ReconcileError::InvalidValue {
            field: "spec.timeZone",
            ..
        })
    ));
}

#[test]
fn bad_schedules_are_refused() {
    for bad in ["", "* * * *", "61 * * * *", "* * * * * *", "every minute"] {
        let cj = cron_job(bad);
        assert!(
            matches!(
                reconcile(&cj, &[], ts(START), &zones),
                Err(ReconcileError::InvalidValue {
                    field: "spec.schedule",
                    ..
                })
            ),
            "{bad:?} refused"
        );
    }
    assert!(parse_schedule("@hourly").is_ok());
    assert!(parse_schedule("*/5 1-3 * JAN MON-FRI").is_ok());
}

#[test]
fn forbid_waits_and_replace_deletes_the_running_job() {
    let mut cj = cron_job("* * * * *");
    cj.spec.as_mut().unwrap().concurrency_policy = Some("Forbid".into());
    let mut jobs = vec![];
    let t1 = minute_after_start() + 1;
    let out = reconcile(&cj, &jobs, ts(t1), &zones).unwrap();
    apply(&mut cj, &mut jobs, &out, t1);
    assert_eq!(jobs.len(), 1);
    let t2 = t1 + 60;
    let out = reconcile(&cj, &jobs, ts(t2), &zones).unwrap();
    let (created, deleted) = apply(&mut cj, &mut jobs, &out, t2);
    assert!(
        created.is_empty() && deleted.is_empty(),
        "Forbid: the first still runs"
    );

    cj.spec.as_mut().unwrap().concurrency_policy = Some("Replace".into());
    let out = reconcile(&cj, &jobs, ts(t2), &zones).unwrap();
    let (created, deleted) = apply(&mut cj, &mut jobs, &out, t2);
    assert_eq!(deleted, vec![format!("tick-{}", minute_after_start() / 60)]);
    assert_eq!(
        created,
        vec![format!("tick-{}", minute_after_start() / 60 + 1)]
    );

    cj.spec.as_mut().unwrap().concurrency_policy = Some("Allow".into());
    let t3 = t2 + 60;
    let out = reconcile(&cj, &jobs, ts(t3), &zones).unwrap();
    let (created, _) = apply(&mut cj, &mut jobs, &out, t3);
    assert_eq!(created.len(), 1);
    assert_eq!(jobs.len(), 2, "Allow: both run");
    assert_eq!(
        cj.status.as_ref().unwrap().active.as_ref().unwrap().len(),
        2
    );
}

#[test]
fn starting_deadline_skips_a_start_that_is_too_late() {
    let mut cj = cron_job("* * * * *");
    cj.spec.as_mut().unwrap().starting_deadline_seconds = Some(10);
    // 30 s after the scheduled minute: too late.
    let t = minute_after_start() + 30;
    let out = reconcile(&cj, &[], ts(t), &zones).unwrap();
    assert!(out.actions.iter().all(|a| !matches!(a, Action::Create(_))));
    assert_eq!(out.requeue_after, Some(30), "waits for the next minute");
    // 5 s after: on time.
    let t = minute_after_start() + 5;
    let out = reconcile(&cj, &[], ts(t), &zones).unwrap();
    assert!(out.actions.iter().any(|a| matches!(a, Action::Create(_))));
}

#[test]
fn many_missed_times_start_only_the_latest_and_warn() {
    let cj = cron_job("* * * * *");
    // Three hours of missed minutes (the controller was down).
    let t = START + 3 * 3600;
    let out = reconcile(&cj, &[], ts(t), &zones).unwrap();
    let created: Vec<String> = out
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Create(o) => Some(name_of(o.metadata())),
            _ => None,
        })
        .collect();
    assert_eq!(created, vec![format!("tick-{}", t / 60)]);
    assert!(
        out.actions
            .iter()
            .any(|a| matches!(a, Action::Event(e) if e.reason == "TooManyMissedTimes"))
    );
}

#[test]
fn suspend_starts_nothing() {
    let mut cj = cron_job("* * * * *");
    cj.spec.as_mut().unwrap().suspend = Some(true);
    let out = reconcile(&cj, &[], ts(minute_after_start() + 1), &zones).unwrap();
    assert!(out.actions.is_empty());
}

#[test]
fn history_limits_keep_the_newest_finished_jobs() {
    let mut cj = cron_job("* * * * *");
    let spec = cj.spec.as_mut().unwrap();
    spec.successful_jobs_history_limit = Some(2);
    spec.failed_jobs_history_limit = Some(1);
    let mut jobs = vec![];
    let mut t = minute_after_start() + 1;
    for i in 0..6 {
        let out = reconcile(&cj, &jobs, ts(t), &zones).unwrap();
        apply(&mut cj, &mut jobs, &out, t);
        let last = jobs.last_mut().unwrap();
        finish(last, if i % 2 == 0 { COMPLETE } else { FAILED }, t + 5);
        t += 60;
    }
    let out = reconcile(&cj, &jobs, ts(t - 50), &zones).unwrap();
    apply(&mut cj, &mut jobs, &out, t - 50);
    let succeeded: Vec<String> = jobs
        .iter()
        .filter(|j| condition(j, COMPLETE))
        .map(|j| name_of(&j.metadata))
        .collect();
    let failed: Vec<String> = jobs
        .iter()
        .filter(|j| condition(j, FAILED))
        .map(|j| name_of(&j.metadata))
        .collect();
    let base = minute_after_start() / 60;
    assert_eq!(
        succeeded,
        vec![format!("tick-{}", base + 2), format!("tick-{}", base + 4)]
    );
    assert_eq!(failed, vec![format!("tick-{}", base + 5)]);
}
