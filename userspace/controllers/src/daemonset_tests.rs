#![allow(clippy::unwrap_used)]

use super::*;
use crate::SeededSuffixes;
use crate::testkit::{labels, template, ts};
use k8s_openapi::api::apps::v1::{DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet};
use k8s_openapi::api::core::v1::{PodCondition, PodStatus, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector as MetaSelector, Time};
use skiff_scheduler::fixtures::node;

const START: i64 = 1_700_000_000;

fn daemon_set(strategy: Option<DaemonSetUpdateStrategy>) -> DaemonSet {
    DaemonSet {
        metadata: ObjectMeta {
            name: Some("agent".into()),
            namespace: Some("default".into()),
            uid: Some("ds-uid".into()),
            generation: Some(1),
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: MetaSelector {
                match_labels: Some(labels(&[("app", "web")])),
                match_expressions: None,
            },
            template: template("agent:1"),
            update_strategy: strategy,
            ..Default::default()
        }),
        status: None,
    }
}

fn rolling(max_unavailable: i32) -> Option<DaemonSetUpdateStrategy> {
    Some(DaemonSetUpdateStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDaemonSet {
            max_unavailable: Some(IntOrString::Int(max_unavailable)),
            max_surge: None,
        }),
    })
}

/// A toy cluster: the scheduler binds a pending pod to its pinned node and the kubelet makes it
/// ready one pass later; deletions are immediate.
struct Sim {
    now: i64,
    ds: DaemonSet,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    names: SeededSuffixes,
    next_uid: u32,
    /// Most nodes without an available pod seen after any pass (once all existed).
    worst_unavailable: usize,
}

impl Sim {
    fn new(ds: DaemonSet, nodes: Vec<Node>) -> Sim {
        Sim {
            now: START,
            ds,
            nodes,
            pods: vec![],
            names: SeededSuffixes::new(9),
            next_uid: 0,
            worst_unavailable: 0,
        }
    }

    fn step(&mut self) -> Outcome {
        let out = reconcile(
            &self.ds,
            &self.nodes,
            &self.pods,
            &mut self.names,
            ts(self.now),
        )
        .unwrap();
        for a in &out.actions {
            match a {
                Action::Create(Object::Pod(p)) => {
                    let mut p = (**p).clone();
                    self.next_uid += 1;
                    p.metadata.uid = Some(format!("pod-{}", self.next_uid));
                    p.metadata.creation_timestamp = Some(Time(ts(self.now)));
                    p.status = Some(PodStatus {
                        phase: Some("Pending".into()),
                        ..Default::default()
                    });
                    self.pods.push(p);
                }
                Action::Delete {
                    kind: Kind::Pod,
                    name,
                    ..
                } => {
                    self.pods.retain(|p| name_of(&p.metadata) != *name);
                }
                Action::UpdateStatus(Object::DaemonSet(d)) => self.ds.status = d.status.clone(),
                Action::Event(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        // Kubelet: bound pods turn ready; the scheduler binds pending ones.
        for p in &mut self.pods {
            let pinned = target_node(p);
            let spec = p.spec.as_mut().unwrap();
            if spec.node_name.is_some() {
                let status = p.status.as_mut().unwrap();
                status.phase = Some("Running".into());
                status.conditions = Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: Some(Time(ts(self.now))),
                    ..Default::default()
                }]);
            } else {
                spec.node_name = pinned;
            }
        }
        self.now += 1;
        out
    }

    fn pods_on(&self, node: &str) -> Vec<&Pod> {
        self.pods
            .iter()
            .filter(|p| target_node(p).as_deref() == Some(node))
            .collect()
    }

    fn settle(&mut self, eligible: &[&str]) {
        for _ in 0..50 {
            let out = self.step();
            let unavailable = eligible
                .iter()
                .filter(|n| !self.pods_on(n).iter().any(|p| is_ready(p)))
                .count();
            if self.now > START + 3 {
                self.worst_unavailable = self.worst_unavailable.max(unavailable);
            }
            if out.actions.is_empty() {
                return;
            }
        }
        panic!("did not settle: {:?}", self.pods);
    }
}

fn three_nodes() -> Vec<Node> {
    vec![
        node("n1").label("disk", "ssd").build(),
        node("n2").label("disk", "ssd").build(),
        node("n3").label("disk", "ssd").build(),
    ]
}

#[test]
fn one_pod_per_node_pinned_by_affinity_with_daemon_tolerations() {
    let mut sim = Sim::new(daemon_set(None), three_nodes());
    sim.settle(&["n1", "n2", "n3"]);
    for n in ["n1", "n2", "n3"] {
        let here = sim.pods_on(n);
        assert_eq!(here.len(), 1, "one pod on {n}");
        let spec = here[0].spec.as_ref().unwrap();
        let tolerations = spec.tolerations.as_ref().unwrap();
        assert!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("node.kubernetes.io/unreachable"))
        );
        assert!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("node.kubernetes.io/unschedulable"))
        );
        assert!(
            here[0]
                .metadata
                .labels
                .as_ref()
                .unwrap()
                .contains_key(REVISION_HASH_LABEL)
        );
    }
    let status = sim.ds.status.clone().unwrap();
    assert_eq!(status.desired_number_scheduled, 3);
    assert_eq!(status.current_number_scheduled, 3);
    assert_eq!(status.number_ready, 3);
    assert_eq!(status.number_available, Some(3));
    assert_eq!(status.updated_number_scheduled, Some(3));
    assert_eq!(status.number_misscheduled, 0);
    assert_eq!(status.observed_generation, Some(1));
}

#[test]
fn node_selector_and_taints_decide_eligibility_as_the_scheduler_does() {
    let mut ds = daemon_set(None);
    ds.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .node_selector = Some(labels(&[("disk", "ssd")]));
    let nodes = vec![
        node("ssd").label("disk", "ssd").build(),
        node("hdd").label("disk", "hdd").build(),
        node("tainted")
            .label("disk", "ssd")
            .taint("dedicated", "db", "NoSchedule")
            .build(),
        // Unschedulable nodes still run daemons (the unschedulable toleration).
        node("cordoned")
            .label("disk", "ssd")
            .unschedulable()
            .build(),
    ];
    let mut sim = Sim::new(ds, nodes);
    sim.settle(&["ssd", "cordoned"]);
    assert_eq!(sim.pods_on("ssd").len(), 1);
    assert_eq!(sim.pods_on("cordoned").len(), 1);
    assert!(sim.pods_on("hdd").is_empty());
    assert!(sim.pods_on("tainted").is_empty());
    assert_eq!(sim.ds.status.as_ref().unwrap().desired_number_scheduled, 2);

    // A NoSchedule taint added later leaves the running pod alone; NoExecute evicts it.
    sim.nodes[0].spec.as_mut().unwrap().taints = Some(vec![Taint {
        key: "maintenance".into(),
        value: None,
        effect: "NoSchedule".into(),
        time_added: None,
    }]);
    sim.settle(&["ssd", "cordoned"]);
    assert_eq!(sim.pods_on("ssd").len(), 1, "NoSchedule does not evict");
    sim.nodes[0].spec.as_mut().unwrap().taints = Some(vec![Taint {
        key: "maintenance".into(),
        value: None,
        effect: "NoExecute".into(),
        time_added: None,
    }]);
    sim.settle(&["cordoned"]);
    assert!(sim.pods_on("ssd").is_empty(), "NoExecute evicts");

    // A node that goes away takes its pod with it; a new node gets one.
    sim.nodes.retain(|n| name_of(&n.metadata) != "cordoned");
    sim.nodes.push(node("fresh").label("disk", "ssd").build());
    sim.settle(&["fresh"]);
    assert!(sim.pods_on("cordoned").is_empty());
    assert_eq!(sim.pods_on("fresh").len(), 1);
}

#[test]
fn rolling_update_respects_max_unavailable() {
    let nodes: Vec<Node> = (1..=6).map(|i| node(&format!("n{i}")).build()).collect();
    let all: Vec<String> = (1..=6).map(|i| format!("n{i}")).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut sim = Sim::new(daemon_set(rolling(2)), nodes);
    sim.settle(&all);
    sim.worst_unavailable = 0;
    let old_hash = pod_template_hash(&sim.ds.spec.as_ref().unwrap().template, None);
    let spec = sim.ds.spec.as_mut().unwrap();
    spec.template.spec.as_mut().unwrap().containers[0].image = Some("agent:2".into());
    sim.ds.metadata.generation = Some(2);
    let new_hash = pod_template_hash(&sim.ds.spec.as_ref().unwrap().template, None);
    assert_ne!(old_hash, new_hash);
    let mut max_down = 0;
    for _ in 0..40 {
        let out = sim.step();
        let down = all
            .iter()
            .filter(|n| !sim.pods_on(n).iter().any(|p| is_ready(p)))
            .count();
        max_down = max_down.max(down);
        if out.actions.is_empty() {
            break;
        }
    }
    assert!(
        max_down <= 2,
        "at most 2 nodes without a ready pod, saw {max_down}"
    );
    assert!(max_down >= 1, "the update did replace pods");
    for n in &all {
        let here = sim.pods_on(n);
        assert_eq!(here.len(), 1);
        assert!(is_updated(here[0], &new_hash), "{n} runs the new template");
    }
    let status = sim.ds.status.clone().unwrap();
    assert_eq!(status.updated_number_scheduled, Some(6));
    assert_eq!(status.observed_generation, Some(2));
}

#[test]
fn on_delete_replaces_only_pods_the_user_deletes() {
    let strategy = Some(DaemonSetUpdateStrategy {
        type_: Some("OnDelete".into()),
        rolling_update: None,
    });
    let mut sim = Sim::new(daemon_set(strategy), three_nodes());
    sim.settle(&["n1", "n2", "n3"]);
    sim.ds
        .spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .image = Some("agent:2".into());
    let new_hash = pod_template_hash(&sim.ds.spec.as_ref().unwrap().template, None);
    sim.settle(&["n1", "n2", "n3"]);
    assert!(
        sim.pods.iter().all(|p| !is_updated(p, &new_hash)),
        "nothing replaced"
    );
    sim.pods.retain(|p| target_node(p).as_deref() != Some("n2"));
    sim.settle(&["n1", "n2", "n3"]);
    assert!(is_updated(sim.pods_on("n2")[0], &new_hash));
    assert!(!is_updated(sim.pods_on("n1")[0], &new_hash));
    assert_eq!(
        sim.ds.status.as_ref().unwrap().updated_number_scheduled,
        Some(1)
    );
}

#[test]
fn duplicates_and_failed_pods_are_cleaned_up() {
    let mut sim = Sim::new(daemon_set(None), three_nodes());
    sim.settle(&["n1", "n2", "n3"]);
    let mut dup = sim.pods_on("n1")[0].clone();
    dup.metadata.name = Some("agent-dup".into());
    dup.metadata.uid = Some("dup-uid".into());
    dup.metadata.creation_timestamp = Some(Time(ts(sim.now + 100)));
    sim.pods.push(dup);
    let victim = name_of(&sim.pods_on("n3")[0].metadata);
    for p in sim
        .pods
        .iter_mut()
        .filter(|p| name_of(&p.metadata) == victim)
    {
        p.status.as_mut().unwrap().phase = Some("Failed".into());
    }
    let out = sim.step();
    let deleted: Vec<String> = out
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Delete { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert!(
        deleted.contains(&"agent-dup".to_string()),
        "newer duplicate goes: {deleted:?}"
    );
    assert!(deleted.contains(&victim), "failed pod goes");
    sim.settle(&["n1", "n2", "n3"]);
    for n in ["n1", "n2", "n3"] {
        assert_eq!(sim.pods_on(n).len(), 1);
    }
    assert!(sim.pods.iter().all(|p| name_of(&p.metadata) != victim));
}

#[test]
fn bad_max_unavailable_is_an_error_and_changes_nothing() {
    let mut ds = daemon_set(None);
    ds.spec.as_mut().unwrap().update_strategy = Some(DaemonSetUpdateStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDaemonSet {
            max_unavailable: Some(IntOrString::String("lots".into())),
            max_surge: None,
        }),
    });
    let err = reconcile(
        &ds,
        &three_nodes(),
        &[],
        &mut SeededSuffixes::new(1),
        ts(START),
    );
    assert!(
        matches!(err, Err(ReconcileError::InvalidValue { .. })),
        "{err:?}"
    );
}
