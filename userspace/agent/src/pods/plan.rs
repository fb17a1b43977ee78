//! The pure heart of the pod worker: from a pod's spec and what the runtime and the probes
//! observed, what to do next (start, kill, remove) and the status to report. No I/O, no clock:
//! `now` comes in as an argument, so every rule here is unit-tested.
//!
//! Rules (kubelet's): init containers run one at a time, in order, each to success before the
//! next; app containers start once all init containers succeeded; an exited container restarts
//! per `restartPolicy` (Always; OnFailure = non-zero exit; Never) after a back-off that doubles
//! from `backoff_base` up to five minutes; a container whose liveness probe failed is killed (the
//! next pass restarts it, counting a restart); readiness decides `ready` and the pod's Ready
//! condition. Restart counts are attempt numbers (the first run is attempt 0).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodIP, PodStatus, HostIP,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::runtime::{ContainerKey, Observed};

/// One run of a container that the runtime still holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub attempt: u32,
    pub observed: Observed,
}

/// Everything the planner reads.
#[derive(Clone, Debug, Default)]
pub struct PodView {
    pub pod: Pod,
    pub host_ip: String,
    /// Set once the sandbox (netns + CNI) exists.
    pub pod_ip: Option<String>,
    /// By container name: the attempts the runtime holds, oldest first.
    pub attempts: BTreeMap<String, Vec<Attempt>>,
    /// Containers whose readiness probe currently succeeds.
    pub ready: BTreeSet<String>,
    /// Containers whose startup probe has succeeded (or that have none).
    pub started: BTreeSet<String>,
    /// Containers whose liveness (or startup) probe failed past its threshold.
    pub unhealthy: BTreeSet<String>,
    /// Image problems by container name (ErrImagePull message).
    pub image_errors: BTreeMap<String, String>,
    /// The waiting reason of an image problem when not ErrImagePull (ImagePullBackOff, ...).
    pub image_error_reasons: BTreeMap<String, String>,
    /// The image id each container runs (for containerStatuses.imageID).
    pub image_ids: BTreeMap<String, String>,
    pub sandbox_error: Option<String>,
    pub backoff_base: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start attempt `attempt` of container `name` (an init container when `init`).
    Start { name: String, attempt: u32, init: bool },
    /// Stop a running container (liveness failure), with the pod's grace period.
    Kill { id: String, reason: &'static str },
    /// Delete an old attempt the runtime no longer needs (keeps the previous one for logs).
    Remove { id: String },
}

/// The longest back-off between restarts (kubelet's).
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long after attempt `attempt` ended the next may start.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()).unwrap_or("Always")
}

fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

/// What happens to one container in this pass.
enum Next {
    /// Nothing to start; the container's state as reported.
    Report,
    Start(u32),
    /// Waiting for the back-off to end.
    BackOff,
}

fn next_for(latest: Option<&Attempt>, policy: &str, unhealthy: bool, view: &PodView, now: Timestamp) -> Next {
    match latest {
        None => Next::Start(0),
        Some(a) => match &a.observed {
            Observed::Running { .. } | Observed::Created => {
                let _ = unhealthy;
                Next::Report
            }
            Observed::Absent => Next::Start(a.attempt + 1),
            Observed::Exited { exit_code, finished_at, .. } => {
                if !should_restart(policy, *exit_code) {
                    return Next::Report;
                }
                let wait = backoff(view.backoff_base, a.attempt);
                let due = finished_at
                    .checked_add(k8s_openapi::jiff::SignedDuration::try_from(wait).unwrap_or_default())
                    .unwrap_or(*finished_at);
                if now >= due { Next::Start(a.attempt + 1) } else { Next::BackOff }
            }
        },
    }
}

fn key_id(pod_uid: &str, name: &str, attempt: u32) -> String {
    ContainerKey { pod_uid: pod_uid.to_string(), container: name.to_string(), attempt }.id()
}

/// Decides the next actions and the status to report.
pub fn plan(view: &PodView, now: Timestamp) -> (Vec<Action>, PodStatus) {
    let pod = &view.pod;
    let spec = pod.spec.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let policy = restart_policy(pod).to_string();
    let mut actions = Vec::new();
    let latest = |name: &str| view.attempts.get(name).and_then(|v| v.last());
    let previous = |name: &str| {
        view.attempts.get(name).and_then(|v| if v.len() >= 2 { v.get(v.len() - 2) } else { None })
    };

    // Old attempts: keep the latest two (the current one and the one `logs --previous` reads).
    for (name, list) in &view.attempts {
        if list.len() > 2 {
            for a in &list[..list.len() - 2] {
                actions.push(Action::Remove { id: key_id(&uid, name, a.attempt) });
            }
        }
    }

    let sandbox_ready = view.pod_ip.is_some();
    let mut init_failed = false;
    let mut initialized = true;
    let mut waiting: BTreeMap<String, (String, String)> = BTreeMap::new();
    if sandbox_ready {
        for c in spec.init_containers.iter().flatten() {
            if let Some(msg) = view.image_errors.get(&c.name) {
                let reason = view.image_error_reasons.get(&c.name).cloned().unwrap_or_else(|| "ErrImagePull".into());
                waiting.insert(c.name.clone(), (reason, msg.clone()));
                initialized = false;
                break;
            }
            let l = latest(&c.name);
            let done = matches!(l, Some(Attempt { observed: Observed::Exited { exit_code: 0, .. }, .. }));
            if done {
                continue;
            }
            initialized = false;
            // An init container restarts on failure unless the pod's policy is Never.
            let init_policy = if policy == "Never" { "Never" } else { "OnFailure" };
            match next_for(l, init_policy, false, view, now) {
                Next::Start(attempt) => actions.push(Action::Start { name: c.name.clone(), attempt, init: true }),
                Next::BackOff => {
                    waiting.insert(c.name.clone(), ("CrashLoopBackOff".into(), back_off_message(c, &uid)));
                }
                Next::Report => {
                    if matches!(l, Some(Attempt { observed: Observed::Exited { .. }, .. })) {
                        init_failed = true;
                    }
                }
            }
            break;
        }
    } else {
        initialized = spec.init_containers.as_ref().is_none_or(|v| v.is_empty());
    }

    if sandbox_ready && initialized {
        for c in &spec.containers {
            if let Some(msg) = view.image_errors.get(&c.name) {
                let reason = view.image_error_reasons.get(&c.name).cloned().unwrap_or_else(|| "ErrImagePull".into());
                waiting.insert(c.name.clone(), (reason, msg.clone()));
                continue;
            }
            let l = latest(&c.name);
            let unhealthy = view.unhealthy.contains(&c.name);
            if unhealthy && matches!(l, Some(Attempt { observed: Observed::Running { .. }, .. })) {
                if let Some(a) = l {
                    actions.push(Action::Kill { id: key_id(&uid, &c.name, a.attempt), reason: "liveness probe failed" });
                }
                continue;
            }
            match next_for(l, &policy, unhealthy, view, now) {
                Next::Start(attempt) => actions.push(Action::Start { name: c.name.clone(), attempt, init: false }),
                Next::BackOff => {
                    waiting.insert(c.name.clone(), ("CrashLoopBackOff".into(), back_off_message(c, &uid)));
                }
                Next::Report => {}
            }
        }
    }

    // Status.
    let status_of = |c: &Container, is_init: bool| -> ContainerStatus {
        let l = latest(&c.name);
        let restart_count = l.map(|a| a.attempt as i32).unwrap_or(0);
        let id = l.map(|a| format!("runc://{}", key_id(&uid, &c.name, a.attempt)));
        let (state, running) = match (l.map(|a| &a.observed), waiting.get(&c.name)) {
            (_, Some((reason, message))) => (waiting_state(reason, message), false),
            (Some(Observed::Running { started_at, .. }), _) => (
                ContainerState { running: Some(ContainerStateRunning { started_at: Some(Time(*started_at)) }), ..Default::default() },
                true,
            ),
            (Some(o @ Observed::Exited { .. }), _) => (terminated_state(o, id.clone()), false),
            _ => {
                let reason = if !sandbox_ready || (!is_init && !initialized) {
                    if is_init || !initialized && spec.init_containers.as_ref().is_some_and(|v| !v.is_empty()) {
                        "PodInitializing"
                    } else {
                        "ContainerCreating"
                    }
                } else {
                    "ContainerCreating"
                };
                (waiting_state(reason, ""), false)
            }
        };
        let has_readiness = c.readiness_probe.is_some();
        let started = running && (c.startup_probe.is_none() || view.started.contains(&c.name));
        let ready = if is_init {
            false
        } else {
            started && (!has_readiness || view.ready.contains(&c.name))
        };
        let last_state = previous(&c.name)
            .filter(|p| matches!(p.observed, Observed::Exited { .. }))
            .map(|p| terminated_state(&p.observed, Some(format!("runc://{}", key_id(&uid, &c.name, p.attempt)))));
        ContainerStatus {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            image_id: view.image_ids.get(&c.name).cloned().unwrap_or_default(),
            container_id: id,
            ready,
            started: Some(started),
            restart_count,
            state: Some(state),
            last_state: Some(last_state.unwrap_or_default()),
            ..Default::default()
        }
    };
    let init_statuses: Vec<ContainerStatus> =
        spec.init_containers.iter().flatten().map(|c| status_of(c, true)).collect();
    let statuses: Vec<ContainerStatus> = spec.containers.iter().map(|c| status_of(c, false)).collect();

    let exited: Vec<i32> = spec
        .containers
        .iter()
        .filter_map(|c| match latest(&c.name).map(|a| &a.observed) {
            Some(Observed::Exited { exit_code, .. }) => Some(*exit_code),
            _ => None,
        })
        .collect();
    let all_exited = !spec.containers.is_empty() && exited.len() == spec.containers.len();
    let any_running = statuses.iter().any(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()));
    let phase = if init_failed {
        "Failed"
    } else if !initialized || !sandbox_ready {
        "Pending"
    } else if all_exited && !actions.iter().any(|a| matches!(a, Action::Start { .. })) && !waiting.values().any(|(r, _)| r == "CrashLoopBackOff") {
        if exited.iter().all(|c| *c == 0) { "Succeeded" } else { "Failed" }
    } else if any_running || exited.len() + waiting.values().filter(|(r, _)| r == "CrashLoopBackOff").count() > 0 {
        "Running"
    } else {
        "Pending"
    };
    let containers_ready = !statuses.is_empty() && statuses.iter().all(|s| s.ready);
    let old_conditions = pod.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    let cond = |type_: &str, ok: bool, reason: Option<&str>| {
        let status = if ok { "True" } else { "False" };
        let transition = old_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        PodCondition {
            type_: type_.into(),
            status: status.into(),
            reason: if ok { None } else { reason.map(String::from) },
            last_transition_time: Some(transition),
            ..Default::default()
        }
    };
    let conditions = vec![
        cond("PodReadyToStartContainers", sandbox_ready, None),
        cond("Initialized", initialized && sandbox_ready || initialized && spec.init_containers.as_ref().is_none_or(|v| v.is_empty()), Some("ContainersNotInitialized")),
        cond("Ready", containers_ready && phase == "Running", Some(if phase == "Running" || phase == "Pending" { "ContainersNotReady" } else { "PodCompleted" })),
        cond("ContainersReady", containers_ready && phase == "Running", Some(if phase == "Running" || phase == "Pending" { "ContainersNotReady" } else { "PodCompleted" })),
        cond("PodScheduled", true, None),
    ];
    let start_time = pod.status.as_ref().and_then(|s| s.start_time.clone()).or(Some(Time(now)));
    let status = PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(view.host_ip.clone()),
        host_ips: Some(vec![HostIP { ip: view.host_ip.clone() }]),
        pod_ip: view.pod_ip.clone(),
        pod_ips: view.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        start_time,
        container_statuses: Some(statuses),
        init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
        qos_class: Some(qos_class(pod).into()),
        message: view.sandbox_error.clone(),
        reason: view.sandbox_error.as_ref().map(|_| "SandboxError".to_string()),
        ..Default::default()
    };
    (actions, status)
}

fn back_off_message(c: &Container, uid: &str) -> String {
    format!("back-off restarting failed container {} in pod {uid}", c.name)
}

fn waiting_state(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message: (!message.is_empty()).then(|| message.to_string()),
        }),
        ..Default::default()
    }
}

fn terminated_state(o: &Observed, container_id: Option<String>) -> ContainerState {
    let Observed::Exited { exit_code, oom_killed, started_at, finished_at } = o else {
        return ContainerState::default();
    };
    let reason = if *oom_killed {
        "OOMKilled"
    } else if *exit_code == 0 {
        "Completed"
    } else {
        "Error"
    };
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: *exit_code,
            reason: Some(reason.into()),
            started_at: started_at.map(Time),
            finished_at: Some(Time(*finished_at)),
            container_id,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Guaranteed when every container has equal cpu and memory requests and limits, BestEffort
/// when none has any, Burstable otherwise (kubelet's rule).
pub fn qos_class(pod: &Pod) -> &'static str {
    let Some(spec) = pod.spec.as_ref() else { return "BestEffort" };
    let mut any = false;
    let mut guaranteed = true;
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        let r = c.resources.clone().unwrap_or_default();
        let req = r.requests.unwrap_or_default();
        let lim = r.limits.unwrap_or_default();
        if !req.is_empty() || !lim.is_empty() {
            any = true;
        }
        for res in ["cpu", "memory"] {
            match (req.get(res).or(lim.get(res)), lim.get(res)) {
                (Some(a), Some(b)) if a == b => {}
                _ => guaranteed = false,
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn web(policy: &str) -> Pod {
        pod(json!({"metadata": {"name": "w", "namespace": "d", "uid": "u1"},
                   "spec": {"restartPolicy": policy, "containers": [{"name": "web", "image": "skiff/echo:1.0"}]}}))
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_000_000 + s).unwrap()
    }

    fn view(p: Pod) -> PodView {
        PodView { pod: p, host_ip: "172.20.0.11".into(), pod_ip: Some("10.244.1.5".into()), backoff_base: Duration::from_secs(10), ..Default::default() }
    }

    fn exited(attempt: u32, code: i32, at: i64) -> Attempt {
        Attempt { attempt, observed: Observed::Exited { exit_code: code, oom_killed: false, started_at: Some(t(at - 1)), finished_at: t(at) } }
    }

    fn running(attempt: u32) -> Attempt {
        Attempt { attempt, observed: Observed::Running { pid: 7, started_at: t(0) } }
    }

    fn cstatus(s: &PodStatus, name: &str) -> ContainerStatus {
        s.container_statuses.clone().unwrap().into_iter().find(|c| c.name == name).unwrap()
    }

    fn condition(s: &PodStatus, type_: &str) -> String {
        s.conditions.clone().unwrap().into_iter().find(|c| c.type_ == type_).unwrap().status
    }

    #[test]
    fn no_sandbox_means_pending_and_nothing_started() {
        let mut v = view(web("Always"));
        v.pod_ip = None;
        let (actions, st) = plan(&v, t(0));
        assert!(actions.is_empty());
        assert_eq!(st.phase.as_deref(), Some("Pending"));
        assert_eq!(cstatus(&st, "web").state.unwrap().waiting.unwrap().reason.as_deref(), Some("ContainerCreating"));
        assert_eq!(condition(&st, "PodReadyToStartContainers"), "False");
    }

    #[test]
    fn first_pass_starts_attempt_zero() {
        let (actions, st) = plan(&view(web("Always")), t(0));
        assert_eq!(actions, vec![Action::Start { name: "web".into(), attempt: 0, init: false }]);
        assert_eq!(st.phase.as_deref(), Some("Pending"));
    }

    #[test]
    fn running_container_is_ready_and_pod_running() {
        let mut v = view(web("Always"));
        v.attempts.insert("web".into(), vec![running(0)]);
        let (actions, st) = plan(&v, t(5));
        assert!(actions.is_empty());
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert!(cstatus(&st, "web").ready);
        assert_eq!(condition(&st, "Ready"), "True");
        assert_eq!(st.pod_ip.as_deref(), Some("10.244.1.5"));
        assert_eq!(cstatus(&st, "web").container_id.as_deref(), Some("runc://u1_web_0"));
    }

    #[test]
    fn readiness_probe_gates_ready() {
        let mut p = web("Always");
        p.spec.as_mut().unwrap().containers[0].readiness_probe = Some(Default::default());
        let mut v = view(p);
        v.attempts.insert("web".into(), vec![running(0)]);
        let (_, st) = plan(&v, t(5));
        assert!(!cstatus(&st, "web").ready);
        assert_eq!(condition(&st, "Ready"), "False");
        v.ready.insert("web".into());
        let (_, st) = plan(&v, t(5));
        assert!(cstatus(&st, "web").ready);
        assert_eq!(condition(&st, "Ready"), "True");
    }

    #[test]
    fn crashed_container_restarts_after_backoff_doubling() {
        let mut v = view(web("Always"));
        v.attempts.insert("web".into(), vec![exited(0, 1, 100)]);
        let (actions, st) = plan(&v, t(105));
        assert!(actions.is_empty(), "10 s back-off after the first exit");
        assert_eq!(cstatus(&st, "web").state.unwrap().waiting.unwrap().reason.as_deref(), Some("CrashLoopBackOff"));
        assert_eq!(st.phase.as_deref(), Some("Running"));
        let (actions, _) = plan(&v, t(110));
        assert_eq!(actions, vec![Action::Start { name: "web".into(), attempt: 1, init: false }]);
        // second exit: 20 s
        v.attempts.insert("web".into(), vec![exited(0, 1, 100), exited(1, 1, 200)]);
        assert!(plan(&v, t(215)).0.is_empty());
        assert_eq!(plan(&v, t(220)).0, vec![Action::Start { name: "web".into(), attempt: 2, init: false }]);
        let (_, st) = plan(&v, t(215));
        let cs = cstatus(&st, "web");
        assert_eq!(cs.restart_count, 1);
        assert_eq!(cs.last_state.unwrap().terminated.unwrap().exit_code, 1);
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(Duration::from_secs(10), 0), Duration::from_secs(10));
        assert_eq!(backoff(Duration::from_secs(10), 3), Duration::from_secs(80));
        assert_eq!(backoff(Duration::from_secs(10), 30), MAX_BACKOFF);
    }

    #[test]
    fn restart_policies() {
        for (policy, code, restarts, phase) in [
            ("Never", 0, false, "Succeeded"),
            ("Never", 2, false, "Failed"),
            ("OnFailure", 0, false, "Succeeded"),
            ("OnFailure", 2, true, "Running"),
            ("Always", 0, true, "Running"),
        ] {
            let mut v = view(web(policy));
            v.attempts.insert("web".into(), vec![exited(0, code, 100)]);
            let (actions, st) = plan(&v, t(1000));
            assert_eq!(!actions.is_empty(), restarts, "{policy} exit {code}");
            assert_eq!(st.phase.as_deref(), Some(phase), "{policy} exit {code}");
        }
    }

    #[test]
    fn oom_kill_is_reported() {
        let mut v = view(web("Always"));
        v.attempts.insert("web".into(), vec![Attempt {
            attempt: 0,
            observed: Observed::Exited { exit_code: 137, oom_killed: true, started_at: None, finished_at: t(0) },
        }, running(1)]);
        let (_, st) = plan(&v, t(50));
        let cs = cstatus(&st, "web");
        assert_eq!(cs.restart_count, 1);
        assert_eq!(cs.last_state.unwrap().terminated.unwrap().reason.as_deref(), Some("OOMKilled"));
    }

    #[test]
    fn liveness_failure_kills_running_container() {
        let mut v = view(web("Always"));
        v.attempts.insert("web".into(), vec![running(0)]);
        v.unhealthy.insert("web".into());
        let (actions, _) = plan(&v, t(5));
        assert_eq!(actions, vec![Action::Kill { id: "u1_web_0".into(), reason: "liveness probe failed" }]);
    }

    #[test]
    fn init_containers_run_in_order_before_app_containers() {
        let p = pod(json!({"metadata": {"name": "w", "namespace": "d", "uid": "u1"},
            "spec": {"initContainers": [{"name": "a", "image": "i"}, {"name": "b", "image": "i"}],
                     "containers": [{"name": "web", "image": "i"}]}}));
        let mut v = view(p);
        assert_eq!(plan(&v, t(0)).0, vec![Action::Start { name: "a".into(), attempt: 0, init: true }]);
        v.attempts.insert("a".into(), vec![running(0)]);
        let (actions, st) = plan(&v, t(1));
        assert!(actions.is_empty());
        assert_eq!(st.phase.as_deref(), Some("Pending"));
        assert_eq!(condition(&st, "Initialized"), "False");
        v.attempts.insert("a".into(), vec![exited(0, 0, 2)]);
        assert_eq!(plan(&v, t(3)).0, vec![Action::Start { name: "b".into(), attempt: 0, init: true }]);
        v.attempts.insert("b".into(), vec![exited(0, 0, 4)]);
        let (actions, st) = plan(&v, t(5));
        assert_eq!(actions, vec![Action::Start { name: "web".into(), attempt: 0, init: false }]);
        assert_eq!(condition(&st, "Initialized"), "True");
    }

    #[test]
    fn failed_init_with_never_fails_the_pod() {
        let p = pod(json!({"metadata": {"name": "w", "namespace": "d", "uid": "u1"},
            "spec": {"restartPolicy": "Never", "initContainers": [{"name": "a", "image": "i"}],
                     "containers": [{"name": "web", "image": "i"}]}}));
        let mut v = view(p);
        v.attempts.insert("a".into(), vec![exited(0, 1, 2)]);
        let (actions, st) = plan(&v, t(100));
        assert!(actions.is_empty());
        assert_eq!(st.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn image_error_waits_with_reason() {
        let mut v = view(web("Always"));
        v.image_errors.insert("web".into(), "image skiff/nope:1 is not in the node's image store".into());
        let (actions, st) = plan(&v, t(0));
        assert!(actions.is_empty());
        let w = cstatus(&st, "web").state.unwrap().waiting.unwrap();
        assert_eq!(w.reason.as_deref(), Some("ErrImagePull"));
        assert_eq!(st.phase.as_deref(), Some("Pending"));
    }

    #[test]
    fn old_attempts_are_removed_keeping_two() {
        let mut v = view(web("Always"));
        v.attempts.insert("web".into(), vec![exited(0, 1, 1), exited(1, 1, 2), running(2)]);
        let (actions, _) = plan(&v, t(5));
        assert_eq!(actions, vec![Action::Remove { id: "u1_web_0".into() }]);
    }

    #[test]
    fn qos_classes() {
        let mut p = web("Always");
        assert_eq!(qos_class(&p), "BestEffort");
        p.spec.as_mut().unwrap().containers[0].resources = Some(serde_json::from_value(json!({"limits": {"cpu": "1", "memory": "64Mi"}})).unwrap());
        assert_eq!(qos_class(&p), "Guaranteed");
        p.spec.as_mut().unwrap().containers[0].resources = Some(serde_json::from_value(json!({"requests": {"cpu": "1"}})).unwrap());
        assert_eq!(qos_class(&p), "Burstable");
    }
}
