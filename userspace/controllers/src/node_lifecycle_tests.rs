#![allow(clippy::unwrap_used)]

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

use super::*;
use crate::testkit::ts;

const GRACE: u64 = 40;

fn config() -> LifecycleConfig {
    LifecycleConfig {
        grace_period: Duration::from_secs(GRACE),
        startup_grace_period: Duration::from_secs(60),
    }
}

fn ready_condition(status: &str, heartbeat: i64) -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: status.into(),
        reason: Some("KubeletReady".into()),
        message: Some("agent is posting ready status".into()),
        last_heartbeat_time: Some(Time(ts(heartbeat))),
        last_transition_time: Some(Time(ts(0))),
    }
}

fn node_with(conditions: Vec<NodeCondition>, taints: Vec<Taint>) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            uid: Some("node-uid".into()),
            resource_version: Some("5".into()),
            creation_timestamp: Some(Time(ts(0))),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: if taints.is_empty() {
                None
            } else {
                Some(taints)
            },
            ..Default::default()
        }),
        status: Some(NodeStatus {
            conditions: if conditions.is_empty() {
                None
            } else {
                Some(conditions)
            },
            ..Default::default()
        }),
    }
}

fn ready_node(heartbeat: i64) -> Node {
    node_with(vec![ready_condition("True", heartbeat)], vec![])
}

fn lease(renew: i64) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            namespace: Some(NODE_LEASE_NAMESPACE.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("n1".into()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(ts(renew))),
            ..Default::default()
        }),
    }
}

fn toleration(key: &str, seconds: Option<i64>) -> Toleration {
    Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some("NoExecute".into()),
        toleration_seconds: seconds,
        value: None,
    }
}

fn pod(name: &str, tolerations: Vec<Toleration>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("7".into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some("n1".into()),
            tolerations: Some(tolerations),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// Pods with the apiserver's default tolerations (300 s).
fn default_pod(name: &str) -> Pod {
    pod(
        name,
        vec![
            toleration(TAINT_NOT_READY, Some(300)),
            toleration(TAINT_UNREACHABLE, Some(300)),
        ],
    )
}

/// Applies the node writes as the apiserver would.
fn apply(node: &mut Node, actions: &[NodeAction]) {
    for a in actions {
        match a {
            NodeAction::SetConditions { conditions, .. } => {
                node.status.get_or_insert_with(Default::default).conditions =
                    Some(conditions.clone());
            }
            NodeAction::SetTaints { taints, .. } => {
                node.spec.get_or_insert_with(Default::default).taints =
                    (!taints.is_empty()).then(|| taints.clone());
            }
            _ => {}
        }
    }
}

fn reasons(actions: &[NodeAction]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            NodeAction::Event(e) => Some(e.reason.clone()),
            _ => None,
        })
        .collect()
}

fn evicted(actions: &[NodeAction]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            NodeAction::EvictPod { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

fn taints_of(actions: &[NodeAction]) -> Option<Vec<(String, String)>> {
    actions.iter().find_map(|a| match a {
        NodeAction::SetTaints { taints, .. } => Some(
            taints
                .iter()
                .map(|t| (t.key.clone(), t.effect.clone()))
                .collect(),
        ),
        _ => None,
    })
}

fn ready_of(actions: &[NodeAction]) -> Option<NodeCondition> {
    actions.iter().find_map(|a| match a {
        NodeAction::SetConditions { conditions, .. } => {
            conditions.iter().find(|c| c.type_ == "Ready").cloned()
        }
        _ => None,
    })
}

#[test]
fn a_heartbeating_node_stays_ready_and_is_registered_once() {
    let mut state = LifecycleState::default();
    let out = reconcile(&mut state, &config(), &ready_node(100), None, &[], ts(100));
    assert_eq!(reasons(&out.actions), vec!["RegisteredNode"]);
    let NodeAction::Event(e) = &out.actions[0] else {
        panic!()
    };
    assert_eq!(e.message, "Node n1 event: Registered Node n1 in Controller");
    assert_eq!(e.involved.kind.as_deref(), Some("Node"));
    assert_eq!(e.involved.uid.as_deref(), Some("node-uid"));
    assert_eq!(out.actions.len(), 1);
    // Wakes up when the grace period would end.
    assert_eq!(
        out.requeue_after,
        Some(Duration::from_millis(GRACE * 1000 + 1))
    );
    // The heartbeat advances every 10 s: nothing to do, ever.
    for t in (110..400).step_by(10) {
        let out = reconcile(&mut state, &config(), &ready_node(t), None, &[], ts(t));
        assert!(out.actions.is_empty(), "at {t}: {:?}", out.actions);
    }
}

#[test]
fn silence_past_grace_marks_unknown_taints_and_marks_pods_not_ready() {
    let mut state = LifecycleState::default();
    let pods = vec![default_pod("tolerant"), pod("intolerant", vec![])];
    let node = ready_node(100);
    let _ = reconcile(&mut state, &config(), &node, None, &pods, ts(100));
    // Exactly at the grace period's end: still fine.
    let out = reconcile(
        &mut state,
        &config(),
        &node,
        None,
        &pods,
        ts(100 + GRACE as i64),
    );
    assert!(out.actions.is_empty(), "{:?}", out.actions);
    let now = 101 + GRACE as i64;
    let out = reconcile(&mut state, &config(), &node, None, &pods, ts(now));
    let ready = ready_of(&out.actions).expect("conditions written");
    assert_eq!(ready.status, "Unknown");
    assert_eq!(ready.reason.as_deref(), Some("NodeStatusUnknown"));
    assert_eq!(
        ready.message.as_deref(),
        Some("Kubelet stopped posting node status.")
    );
    assert_eq!(ready.last_transition_time, Some(Time(ts(now))));
    // The heartbeat time is what the agent last posted, not ours.
    assert_eq!(ready.last_heartbeat_time, Some(Time(ts(100))));
    // The write is conditional on the node as seen.
    assert!(
        matches!(&out.actions[0], NodeAction::SetConditions { resource_version: Some(rv), conditions, .. }
        if rv == "5" && conditions.iter().filter(|c| c.status == "Unknown").count() == 4
            && conditions.iter().filter(|c| c.reason.as_deref() == Some("NodeStatusNeverUpdated")).count() == 3)
    );
    assert_eq!(
        taints_of(&out.actions),
        Some(vec![
            (TAINT_UNREACHABLE.into(), "NoSchedule".into()),
            (TAINT_UNREACHABLE.into(), "NoExecute".into()),
        ])
    );
    let set_taints = out.actions.iter().find_map(|a| match a {
        NodeAction::SetTaints { taints, .. } => Some(taints.clone()),
        _ => None,
    });
    assert!(
        set_taints
            .unwrap()
            .iter()
            .all(|t| t.time_added == Some(Time(ts(now))))
    );
    // The pod with no toleration goes now; the tolerant one is marked not ready and waits.
    assert_eq!(evicted(&out.actions), vec!["intolerant"]);
    let marked: Vec<&Pod> = out
        .actions
        .iter()
        .filter_map(|a| match a {
            NodeAction::MarkPodNotReady(p) => Some(&**p),
            _ => None,
        })
        .collect();
    assert_eq!(marked.len(), 1);
    assert_eq!(marked[0].metadata.name.as_deref(), Some("tolerant"));
    assert_eq!(
        pod_ready(marked[0]).map(|c| c.status.as_str()),
        Some("False")
    );
    let r = reasons(&out.actions);
    assert!(r.contains(&"NodeNotReady".to_string()), "{r:?}");
    assert!(r.contains(&"TaintManagerEviction".to_string()), "{r:?}");
    assert_eq!(out.requeue_after, Some(Duration::from_secs(300)));
    // Order: status, then taints, then pods.
    assert!(matches!(out.actions[0], NodeAction::SetConditions { .. }));
    assert!(matches!(out.actions[1], NodeAction::SetTaints { .. }));
}

#[test]
fn toleration_seconds_run_from_the_taint_and_then_evict_once() {
    let mut state = LifecycleState::default();
    let mut node = ready_node(100);
    let pods = vec![
        pod("short", vec![toleration(TAINT_UNREACHABLE, Some(5))]),
        default_pod("long"),
    ];
    let _ = reconcile(&mut state, &config(), &node, None, &pods, ts(100));
    let tainted_at = 141;
    let out = reconcile(&mut state, &config(), &node, None, &pods, ts(tainted_at));
    apply(&mut node, &out.actions);
    assert!(evicted(&out.actions).is_empty());
    assert_eq!(out.requeue_after, Some(Duration::from_secs(5)));
    let out = reconcile(
        &mut state,
        &config(),
        &node,
        None,
        &pods,
        ts(tainted_at + 4),
    );
    assert!(evicted(&out.actions).is_empty(), "{:?}", out.actions);
    // Marked once only, even though the (stale) pods still read Ready.
    assert!(
        !out.actions
            .iter()
            .any(|a| matches!(a, NodeAction::MarkPodNotReady(_)))
    );
    let out = reconcile(
        &mut state,
        &config(),
        &node,
        None,
        &pods,
        ts(tainted_at + 5),
    );
    assert_eq!(evicted(&out.actions), vec!["short"]);
    // A stale cache still listing the evicted pod does not evict it twice.
    let out = reconcile(
        &mut state,
        &config(),
        &node,
        None,
        &pods,
        ts(tainted_at + 6),
    );
    assert!(evicted(&out.actions).is_empty());
    let out = reconcile(
        &mut state,
        &config(),
        &node,
        None,
        &pods[1..],
        ts(tainted_at + 300),
    );
    assert_eq!(evicted(&out.actions), vec!["long"]);
}

#[test]
fn lease_renewals_alone_keep_the_node_ready() {
    let mut state = LifecycleState::default();
    // The agent posted status once at 100 and since then only renews its Lease.
    let node = ready_node(100);
    for t in (100..300).step_by(10) {
        let out = reconcile(&mut state, &config(), &node, Some(&lease(t)), &[], ts(t));
        assert!(
            out.actions
                .iter()
                .all(|a| matches!(a, NodeAction::Event(_))),
            "at {t}: {:?}",
            out.actions
        );
    }
    // Lease stops at 290: Unknown after 290 + grace.
    let out = reconcile(
        &mut state,
        &config(),
        &node,
        Some(&lease(290)),
        &[],
        ts(290 + GRACE as i64),
    );
    assert!(ready_of(&out.actions).is_none());
    let out = reconcile(
        &mut state,
        &config(),
        &node,
        Some(&lease(290)),
        &[],
        ts(291 + GRACE as i64),
    );
    assert_eq!(
        ready_of(&out.actions).map(|c| c.status),
        Some("Unknown".into())
    );
}

#[test]
fn agent_clock_skew_does_not_matter_only_changes_do() {
    // The agent's clock is a day behind: its heartbeats still count because they change.
    let mut state = LifecycleState::default();
    for (i, t) in (100_000..100_200).step_by(10).enumerate() {
        let node = ready_node(i as i64 * 10);
        let out = reconcile(&mut state, &config(), &node, None, &[], ts(t));
        assert!(ready_of(&out.actions).is_none(), "at {t}");
    }
}

#[test]
fn node_back_gets_taints_removed_and_keeps_others() {
    let mut state = LifecycleState::default();
    let user_taint = Taint {
        key: "dedicated".into(),
        value: Some("gpu".into()),
        effect: "NoSchedule".into(),
        time_added: None,
    };
    let mut node = node_with(vec![ready_condition("True", 100)], vec![user_taint.clone()]);
    let _ = reconcile(&mut state, &config(), &node, None, &[], ts(100));
    let out = reconcile(&mut state, &config(), &node, None, &[], ts(150));
    apply(&mut node, &out.actions);
    assert_eq!(
        taints_of(&out.actions).unwrap(),
        vec![
            ("dedicated".into(), "NoSchedule".into()),
            (TAINT_UNREACHABLE.into(), "NoSchedule".into()),
            (TAINT_UNREACHABLE.into(), "NoExecute".into()),
        ]
    );
    // Nothing more while it stays silent.
    let out = reconcile(&mut state, &config(), &node, None, &[], ts(160));
    assert!(out.actions.is_empty(), "{:?}", out.actions);
    // The agent posts Ready=True with a new heartbeat: unreachable taints go, the user's stays.
    let mut back = node.clone();
    let conds = back.status.as_mut().unwrap().conditions.as_mut().unwrap();
    *conds.iter_mut().find(|c| c.type_ == "Ready").unwrap() = ready_condition("True", 170);
    let out = reconcile(&mut state, &config(), &back, None, &[], ts(170));
    assert_eq!(
        taints_of(&out.actions),
        Some(vec![("dedicated".into(), "NoSchedule".into())])
    );
    assert!(
        ready_of(&out.actions).is_none(),
        "the agent's status is left alone"
    );
}

#[test]
fn ready_false_gets_not_ready_taints_and_swaps_to_unreachable() {
    let mut state = LifecycleState::default();
    let mut node = node_with(vec![ready_condition("False", 100)], vec![]);
    let out = reconcile(
        &mut state,
        &config(),
        &node,
        None,
        &[default_pod("p")],
        ts(100),
    );
    apply(&mut node, &out.actions);
    assert_eq!(
        taints_of(&out.actions),
        Some(vec![
            (TAINT_NOT_READY.into(), "NoSchedule".into()),
            (TAINT_NOT_READY.into(), "NoExecute".into()),
        ])
    );
    assert!(
        out.actions
            .iter()
            .any(|a| matches!(a, NodeAction::MarkPodNotReady(_)))
    );
    // It was never True under this controller: no NodeNotReady transition event.
    assert_eq!(
        reasons(&out.actions),
        vec!["RegisteredNode", "NodeNotReady"]
    );
    assert!(
        out.actions
            .iter()
            .filter_map(|a| match a {
                NodeAction::Event(e) if e.reason == "NodeNotReady" => Some(e.involved.kind.clone()),
                _ => None,
            })
            .all(|k| k.as_deref() == Some("Pod"))
    );
    // Then it goes silent: the not-ready taints become unreachable ones.
    let out = reconcile(&mut state, &config(), &node, None, &[], ts(141));
    assert_eq!(
        taints_of(&out.actions),
        Some(vec![
            (TAINT_UNREACHABLE.into(), "NoSchedule".into()),
            (TAINT_UNREACHABLE.into(), "NoExecute".into()),
        ])
    );
}

#[test]
fn a_node_that_never_posted_status_gets_the_startup_grace_from_creation() {
    let mut state = LifecycleState::default();
    let node = node_with(vec![], vec![]);
    let out = reconcile(&mut state, &config(), &node, None, &[], ts(30));
    assert!(ready_of(&out.actions).is_none());
    assert_eq!(out.requeue_after, Some(Duration::from_millis(30_001)));
    let out = reconcile(&mut state, &config(), &node, None, &[], ts(61));
    let ready = ready_of(&out.actions).unwrap();
    assert_eq!(ready.status, "Unknown");
    assert_eq!(ready.reason.as_deref(), Some("NodeStatusNeverUpdated"));
    assert_eq!(
        ready.message.as_deref(),
        Some("Kubelet never posted node status.")
    );
}

#[test]
fn toleration_matching_follows_kubernetes() {
    let taint = Taint {
        key: TAINT_UNREACHABLE.into(),
        value: None,
        effect: "NoExecute".into(),
        time_added: None,
    };
    let t = |key: Option<&str>, op: Option<&str>, value: Option<&str>, effect: Option<&str>| {
        Toleration {
            key: key.map(Into::into),
            operator: op.map(Into::into),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            toleration_seconds: None,
        }
    };
    assert!(tolerates(
        &t(
            Some(TAINT_UNREACHABLE),
            Some("Exists"),
            None,
            Some("NoExecute")
        ),
        &taint
    ));
    assert!(
        tolerates(&t(None, Some("Exists"), None, None), &taint),
        "tolerate everything"
    );
    assert!(
        tolerates(&t(Some(TAINT_UNREACHABLE), None, None, None), &taint),
        "Equal with empty value"
    );
    assert!(!tolerates(
        &t(Some(TAINT_UNREACHABLE), Some("Equal"), Some("x"), None),
        &taint
    ));
    assert!(!tolerates(
        &t(Some(TAINT_NOT_READY), Some("Exists"), None, None),
        &taint
    ));
    assert!(!tolerates(
        &t(
            Some(TAINT_UNREACHABLE),
            Some("Exists"),
            None,
            Some("NoSchedule")
        ),
        &taint
    ));
}

#[test]
fn toleration_without_seconds_tolerates_forever() {
    let mut state = LifecycleState::default();
    let mut node = ready_node(100);
    let forever = pod("forever", vec![toleration(TAINT_UNREACHABLE, None)]);
    let _ = reconcile(&mut state, &config(), &node, None, &[], ts(100));
    let out = reconcile(
        &mut state,
        &config(),
        &node,
        None,
        std::slice::from_ref(&forever),
        ts(141),
    );
    apply(&mut node, &out.actions);
    assert!(evicted(&out.actions).is_empty());
    let out = reconcile(&mut state, &config(), &node, None, &[forever], ts(100_000));
    assert!(evicted(&out.actions).is_empty());
    assert_eq!(out.requeue_after, None);
}

#[test]
fn removed_nodes_are_forgotten_with_an_event() {
    let mut state = LifecycleState::default();
    let _ = reconcile(&mut state, &config(), &ready_node(1), None, &[], ts(1));
    assert!(forget_gone(&mut state, &[ready_node(1)]).is_empty());
    let gone = forget_gone(&mut state, &[]);
    assert_eq!(reasons(&gone), vec!["RemovingNode"]);
    assert!(state.silent_for("n1", ts(2)).is_none());
    // Seen again, it is registered again.
    let out = reconcile(&mut state, &config(), &ready_node(1), None, &[], ts(3));
    assert_eq!(reasons(&out.actions), vec!["RegisteredNode"]);
}
