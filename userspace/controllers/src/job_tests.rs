#![allow(clippy::unwrap_used)]

use super::*;
use crate::SeededSuffixes;
use crate::testkit::{template, ts};
use k8s_openapi::api::batch::v1::JobSpec;
use k8s_openapi::api::core::v1::PodStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

const START: i64 = 1_700_000_000;

fn job(completions: Option<i32>, parallelism: i32) -> Job {
    let mut t = template("busybox");
    t.spec.as_mut().unwrap().restart_policy = Some("Never".into());
    Job {
        metadata: ObjectMeta {
            name: Some("batch".into()),
            namespace: Some("default".into()),
            uid: Some("job-uid".into()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            completions,
            parallelism: Some(parallelism),
            backoff_limit: Some(6),
            template: t,
            ..Default::default()
        }),
        status: None,
    }
}

/// A toy cluster for one Job: pods run for `run_steps` steps, then end with `outcome`.
struct Sim {
    now: i64,
    job: Job,
    pods: Vec<Pod>,
    age: Vec<u32>,
    names: SeededSuffixes,
    max_active: usize,
    deleted_job: bool,
}

impl Sim {
    fn new(job: Job) -> Self {
        Sim {
            now: START,
            job,
            pods: vec![],
            age: vec![],
            names: SeededSuffixes::new(3),
            max_active: 0,
            deleted_job: false,
        }
    }

    fn reconcile(&mut self) -> Outcome {
        let out = reconcile(&self.job, &self.pods, &mut self.names, ts(self.now)).unwrap();
        for a in &out.actions {
            match a {
                Action::Create(Object::Pod(p)) => {
                    let mut p = (**p).clone();
                    p.metadata.uid = Some(format!("{}-uid", name_of(&p.metadata)));
                    p.metadata.creation_timestamp = Some(Time(ts(self.now)));
                    p.status = Some(PodStatus {
                        phase: Some("Pending".into()),
                        ..Default::default()
                    });
                    self.pods.push(p);
                    self.age.push(0);
                }
                Action::Delete {
                    kind: Kind::Pod,
                    name,
                    ..
                } => {
                    let i = self
                        .pods
                        .iter()
                        .position(|p| name_of(&p.metadata) == *name)
                        .unwrap();
                    self.pods.remove(i);
                    self.age.remove(i);
                }
                Action::Delete {
                    kind: Kind::Job, ..
                } => self.deleted_job = true,
                Action::UpdateStatus(Object::Job(j)) => self.job.status = j.status.clone(),
                Action::Event(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let running = self.pods.iter().filter(|p| is_active(p)).count();
        self.max_active = self.max_active.max(running);
        out
    }

    /// Pods age one step; those older than `run_steps` finish with `end_phase`.
    fn kubelet(&mut self, run_steps: u32, end_phase: &str) {
        for (p, age) in self.pods.iter_mut().zip(self.age.iter_mut()) {
            *age += 1;
            let status = p.status.as_mut().unwrap();
            if status.phase.as_deref() == Some("Pending") {
                status.phase = Some("Running".into());
            } else if status.phase.as_deref() == Some("Running") && *age > run_steps {
                status.phase = Some(end_phase.into());
            }
        }
    }

    fn condition(&self, type_: &str) -> Option<JobCondition> {
        condition_true(self.job.status.as_ref()?, type_)
    }
}

#[test]
fn completions_5_parallelism_2_never_runs_more_than_2_and_completes() {
    let mut sim = Sim::new(job(Some(5), 2));
    for _ in 0..40 {
        sim.now += 1;
        sim.reconcile();
        if sim.condition(COMPLETE).is_some() {
            break;
        }
        sim.kubelet(2, "Succeeded");
    }
    assert!(
        sim.condition(COMPLETE).is_some(),
        "status {:?}",
        sim.job.status
    );
    assert_eq!(sim.max_active, 2);
    let status = sim.job.status.clone().unwrap();
    assert_eq!(status.succeeded, Some(5));
    assert_eq!(status.active, None);
    assert_eq!(sim.pods.len(), 5, "exactly five pods were ever needed");
    assert!(status.completion_time.is_some() && status.start_time.is_some());
    assert_eq!(
        sim.condition(COMPLETE).unwrap().reason.as_deref(),
        Some(COMPLETIONS_REACHED)
    );
    for p in &sim.pods {
        let labels = p.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels.get(JOB_NAME_LABEL).map(String::as_str),
            Some("batch")
        );
        assert_eq!(
            labels.get(CONTROLLER_UID_LABEL).map(String::as_str),
            Some("job-uid")
        );
        assert!(name_of(&p.metadata).starts_with("batch-"));
    }
}

#[test]
fn backoff_limit_fails_the_job_with_growing_delays() {
    let mut j = job(Some(1), 1);
    j.spec.as_mut().unwrap().backoff_limit = Some(2);
    let mut sim = Sim::new(j);
    let mut creations = vec![];
    for _ in 0..200 {
        sim.now += 1;
        let out = sim.reconcile();
        if out.actions.iter().any(|a| matches!(a, Action::Create(_))) {
            creations.push(sim.now);
        }
        if sim.condition(FAILED).is_some() {
            break;
        }
        sim.kubelet(1, "Failed");
    }
    let failed = sim.condition(FAILED).expect("job failed");
    assert_eq!(failed.reason.as_deref(), Some(BACKOFF_LIMIT_EXCEEDED));
    assert_eq!(
        sim.job.status.as_ref().unwrap().failed,
        Some(3),
        "backoffLimit 2 = three tries"
    );
    assert_eq!(creations.len(), 3);
    let gaps: Vec<i64> = creations.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= 10 && gaps[1] >= 20 && gaps[1] > gaps[0],
        "back-off grows: {gaps:?}"
    );
    // A failed Job does nothing more.
    sim.now += 1000;
    let out = sim.reconcile();
    assert!(out.actions.is_empty(), "{:?}", out.actions);
}

#[test]
fn active_deadline_fails_the_job_and_deletes_its_pods() {
    let mut j = job(Some(3), 3);
    j.spec.as_mut().unwrap().active_deadline_seconds = Some(30);
    let mut sim = Sim::new(j);
    sim.now += 1;
    let out = sim.reconcile();
    assert_eq!(out.requeue_after, Some(30), "requeued for the deadline");
    sim.kubelet(1000, "Succeeded");
    sim.now += 29;
    sim.reconcile();
    assert!(sim.condition(FAILED).is_none());
    assert_eq!(sim.pods.len(), 3);
    sim.now += 1;
    sim.reconcile();
    assert_eq!(
        sim.condition(FAILED).unwrap().reason.as_deref(),
        Some(DEADLINE_EXCEEDED)
    );
    assert!(sim.pods.is_empty(), "running pods deleted");
}

#[test]
fn ttl_after_finished_deletes_the_job_when_it_expires() {
    let mut j = job(Some(1), 1);
    j.spec.as_mut().unwrap().ttl_seconds_after_finished = Some(100);
    let mut sim = Sim::new(j);
    for _ in 0..5 {
        sim.now += 1;
        sim.reconcile();
        sim.kubelet(1, "Succeeded");
    }
    sim.now += 1;
    sim.reconcile();
    let done_at = sim
        .job
        .status
        .as_ref()
        .unwrap()
        .completion_time
        .clone()
        .unwrap()
        .0
        .as_second();
    sim.now = done_at + 50;
    let out = sim.reconcile();
    assert!(!sim.deleted_job);
    assert_eq!(out.requeue_after, Some(50));
    sim.now = done_at + 100;
    sim.reconcile();
    assert!(sim.deleted_job);
}

#[test]
fn work_queue_job_without_completions_stops_starting_pods_after_a_success() {
    let mut sim = Sim::new(job(None, 3));
    sim.now += 1;
    sim.reconcile();
    assert_eq!(sim.pods.len(), 3);
    // One pod finishes; the others keep running; nothing new starts.
    sim.kubelet(0, "Running");
    sim.pods[0].status.as_mut().unwrap().phase = Some("Succeeded".into());
    sim.now += 1;
    sim.reconcile();
    assert_eq!(sim.pods.len(), 3);
    assert!(sim.condition(COMPLETE).is_none(), "others still active");
    for p in &mut sim.pods {
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
    }
    sim.now += 1;
    sim.reconcile();
    assert!(sim.condition(COMPLETE).is_some());
}

#[test]
fn suspend_deletes_active_pods_and_resume_restarts() {
    let mut sim = Sim::new(job(Some(2), 2));
    sim.now += 1;
    sim.reconcile();
    assert_eq!(sim.pods.len(), 2);
    sim.job.spec.as_mut().unwrap().suspend = Some(true);
    sim.reconcile();
    assert!(sim.pods.is_empty());
    assert!(sim.condition(SUSPENDED).is_some());
    sim.job.spec.as_mut().unwrap().suspend = Some(false);
    sim.reconcile();
    assert_eq!(sim.pods.len(), 2);
    assert!(sim.condition(SUSPENDED).is_none());
}

#[test]
fn indexed_jobs_are_refused_with_a_clear_error() {
    let mut j = job(Some(2), 2);
    j.spec.as_mut().unwrap().completion_mode = Some("Indexed".into());
    let err = reconcile(&j, &[], &mut SeededSuffixes::new(0), ts(START)).unwrap_err();
    assert!(err.to_string().contains("completionMode"), "{err}");
}

/// Random jobs whose pods succeed or fail at random: never more than `parallelism` active, and
/// every run ends Complete (enough successes) or Failed with more failures than backoffLimit.
#[test]
fn random_jobs_respect_parallelism_and_finish() {
    for seed in 0..200u64 {
        let mut rng = SeededSuffixes::new(seed);
        let mut pick = |n: u64| rng.next_u64() % n;
        let completions = if pick(4) == 0 {
            None
        } else {
            Some(1 + pick(6) as i32)
        };
        let parallelism = 1 + pick(4) as i32;
        let mut j = job(completions, parallelism);
        j.spec.as_mut().unwrap().backoff_limit = Some(pick(5) as i32);
        let mut sim = Sim::new(j);
        for _ in 0..2000 {
            sim.now += 1 + pick(20) as i64;
            sim.reconcile();
            assert!(
                sim.max_active <= parallelism as usize,
                "seed {seed}: {} active",
                sim.max_active
            );
            if is_finished(&sim.job) {
                break;
            }
            for p in sim.pods.iter_mut() {
                let status = p.status.as_mut().unwrap();
                match (status.phase.as_deref(), pick(3)) {
                    (Some("Pending"), _) => status.phase = Some("Running".into()),
                    (Some("Running"), 0) => status.phase = Some("Succeeded".into()),
                    (Some("Running"), 1) if pick(3) == 0 => status.phase = Some("Failed".into()),
                    _ => {}
                }
            }
        }
        let status = sim.job.status.clone().unwrap();
        let context = format!("seed {seed}: completions {completions:?} parallelism {parallelism}");
        if sim.condition(COMPLETE).is_some() {
            assert!(
                status.succeeded.unwrap_or(0) >= completions.unwrap_or(1),
                "{context}"
            );
        } else {
            assert!(sim.condition(FAILED).is_some(), "{context}: finished");
            let limit = sim.job.spec.as_ref().unwrap().backoff_limit.unwrap();
            assert!(status.failed.unwrap_or(0) > limit, "{context}");
        }
        assert_eq!(status.active, None, "{context}: nothing left running");
        assert!(sim.pods.iter().all(|p| !is_active(p)), "{context}");
    }
}
