//! Which pods the scheduler should place, and in what order (kube-scheduler's PreEnqueue
//! SchedulingGates check and PrioritySort queue order), for the controller loop that feeds
//! [`crate::Scheduler::schedule`].

use std::cmp::Ordering;

use k8s_openapi::api::core::v1::Pod;

/// The scheduler name pods get when they name none.
pub const DEFAULT_SCHEDULER_NAME: &str = "default-scheduler";

/// The `reason` of the PodScheduled=False condition for a pod that fits nowhere (what
/// `kubectl describe pod` and `kubectl get pods` show); its message is
/// [`crate::Unschedulable::message`].
pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";

/// The `reason` of the PodScheduled=False condition for a pod held back by scheduling gates.
pub const REASON_SCHEDULING_GATED: &str = "SchedulingGated";

/// Why a pod is not (yet) the scheduler's to place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// `spec.nodeName` is set: it is bound already.
    Bound,
    /// Another scheduler (`spec.schedulerName`) owns it.
    OtherScheduler,
    /// `metadata.deletionTimestamp` is set.
    Terminating,
    /// Succeeded or Failed.
    Finished,
    /// `spec.schedulingGates` is not empty: wait until they are removed.
    Gated,
}

/// `Ok(())` when `scheduler_name` should place this pod now.
pub fn needs_scheduling(pod: &Pod, scheduler_name: &str) -> Result<(), Skip> {
    let spec = pod.spec.as_ref();
    if spec
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty())
    {
        return Err(Skip::Bound);
    }
    let name = spec
        .and_then(|s| s.scheduler_name.as_deref())
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_SCHEDULER_NAME);
    if name != scheduler_name {
        return Err(Skip::OtherScheduler);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(Skip::Terminating);
    }
    if matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Err(Skip::Finished);
    }
    if spec
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| !g.is_empty())
    {
        return Err(Skip::Gated);
    }
    Ok(())
}

/// PrioritySort: higher `spec.priority` first, then the older pod (creationTimestamp), then by
/// namespace/name so the order is total and stable.
pub fn queue_order(a: &Pod, b: &Pod) -> Ordering {
    let priority = |p: &Pod| p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
    let created = |p: &Pod| p.metadata.creation_timestamp.clone().map(|t| t.0);
    let key = |p: &Pod| (p.metadata.namespace.clone(), p.metadata.name.clone());
    priority(b)
        .cmp(&priority(a))
        .then_with(|| created(a).cmp(&created(b)))
        .then_with(|| key(a).cmp(&key(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::pod;
    use k8s_openapi::api::core::v1::PodSchedulingGate;

    #[test]
    fn only_unbound_live_ungated_pods_of_this_scheduler() {
        let me = DEFAULT_SCHEDULER_NAME;
        assert_eq!(needs_scheduling(&pod("d", "p").build(), me), Ok(()));
        assert_eq!(
            needs_scheduling(&pod("d", "p").node_name("n").build(), me),
            Err(Skip::Bound)
        );
        assert_eq!(
            needs_scheduling(&pod("d", "p").terminating().build(), me),
            Err(Skip::Terminating)
        );
        assert_eq!(
            needs_scheduling(&pod("d", "p").phase("Failed").build(), me),
            Err(Skip::Finished)
        );
        assert_eq!(
            needs_scheduling(&pod("d", "p").build(), "other"),
            Err(Skip::OtherScheduler)
        );
        let mut gated = pod("d", "p").build();
        if let Some(spec) = gated.spec.as_mut() {
            spec.scheduling_gates = Some(vec![PodSchedulingGate {
                name: "wait".into(),
            }]);
        }
        assert_eq!(needs_scheduling(&gated, me), Err(Skip::Gated));
        let mut mine = pod("d", "p").build();
        if let Some(spec) = mine.spec.as_mut() {
            spec.scheduler_name = Some("other".into());
        }
        assert_eq!(needs_scheduling(&mine, "other"), Ok(()));
    }

    #[test]
    fn higher_priority_first_then_name() {
        let mut high = pod("d", "z").build();
        if let Some(spec) = high.spec.as_mut() {
            spec.priority = Some(1000);
        }
        let mut pods = [pod("d", "b").build(), high, pod("d", "a").build()];
        pods.sort_by(queue_order);
        let names: Vec<_> = pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        assert_eq!(names, vec!["z", "a", "b"]);
    }
}
