//! Property tests: random clusters and random pods, scheduled one by one with assume(); after
//! every decision the rules must hold on the whole snapshot, and every refusal must be true.

use k8s_openapi::api::core::v1::{Node, Pod};
use proptest::prelude::*;
use skiff_scheduler::fixtures::{HOSTNAME, labels, node, pod, term};
use skiff_scheduler::{ClusterSnapshot, ScheduleError, Scheduler};

#[derive(Debug, Clone)]
struct NodeShape {
    cpu_millis: u32,
    memory_mib: u32,
    max_pods: u8,
    tainted: bool,
    cordoned: bool,
    ssd: bool,
}

#[derive(Debug, Clone)]
struct PodShape {
    cpu_millis: u32,
    memory_mib: u32,
    /// Hostname anti-affinity within group `Some(g)`.
    anti_group: Option<u8>,
    tolerates: bool,
    wants_ssd: bool,
}

fn node_shape() -> impl Strategy<Value = NodeShape> {
    (
        500u32..4000,
        256u32..4096,
        1u8..8,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        any::<bool>(),
    )
        .prop_map(
            |(cpu_millis, memory_mib, max_pods, tainted, cordoned, ssd)| NodeShape {
                cpu_millis,
                memory_mib,
                max_pods,
                tainted,
                cordoned,
                ssd,
            },
        )
}

fn pod_shape() -> impl Strategy<Value = PodShape> {
    (
        prop_oneof![Just(0u32), 50u32..1500],
        prop_oneof![Just(0u32), 64u32..2048],
        prop::option::weighted(0.3, 0u8..3),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(cpu_millis, memory_mib, anti_group, tolerates, wants_ssd)| PodShape {
                cpu_millis,
                memory_mib,
                anti_group,
                tolerates,
                wants_ssd,
            },
        )
}

fn build_node(i: usize, s: &NodeShape) -> Node {
    let mut b = node(&format!("n{i}")).allocatable(
        &format!("{}m", s.cpu_millis),
        &format!("{}Mi", s.memory_mib),
        i64::from(s.max_pods),
    );
    if s.tainted {
        b = b.taint(
            "dedicated",
            "x",
            if i.is_multiple_of(2) {
                "NoSchedule"
            } else {
                "NoExecute"
            },
        );
    }
    if s.cordoned {
        b = b.unschedulable();
    }
    if s.ssd {
        b = b.label("disk", "ssd");
    }
    b.build()
}

fn build_pod(i: usize, s: &PodShape) -> Pod {
    let cpu = if s.cpu_millis > 0 {
        format!("{}m", s.cpu_millis)
    } else {
        String::new()
    };
    let memory = if s.memory_mib > 0 {
        format!("{}Mi", s.memory_mib)
    } else {
        String::new()
    };
    let mut b = pod("p", &format!("pod-{i}"))
        .uid(&format!("uid-{i}"))
        .request(&cpu, &memory);
    if let Some(g) = s.anti_group {
        let group = format!("g{g}");
        b = b
            .label("group", &group)
            .pod_anti_affinity(term(labels(&[("group", &group)]), HOSTNAME));
    }
    if s.tolerates {
        b = b.toleration("dedicated", "Exists", "", "");
    }
    if s.wants_ssd {
        b = b.node_selector("disk", "ssd");
    }
    b.build()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn decisions_keep_the_rules_and_refusals_are_true(
        nodes in prop::collection::vec(node_shape(), 1..12),
        pods in prop::collection::vec(pod_shape(), 1..60),
    ) {
        let node_objs: Vec<Node> = nodes.iter().enumerate().map(|(i, s)| build_node(i, s)).collect();
        let mut snapshot = ClusterSnapshot::new(&node_objs, &[]);
        let scheduler = Scheduler::default_plugins();
        for (i, shape) in pods.iter().enumerate() {
            let p = build_pod(i, shape);
            match scheduler.schedule(&p, &snapshot) {
                Ok(result) => {
                    snapshot.assume(&p, &result.node).expect("known node");
                    let idx: usize = result.node[1..].parse().expect("node index");
                    let n = &nodes[idx];
                    prop_assert!(!n.cordoned, "pod-{} on cordoned {}", i, result.node);
                    prop_assert!(!n.tainted || shape.tolerates, "pod-{} on tainted {}", i, result.node);
                    prop_assert!(!shape.wants_ssd || n.ssd, "pod-{} wants ssd, got {}", i, result.node);
                    for info in snapshot.nodes() {
                        prop_assert!(info.requested.milli_cpu <= info.allocatable.milli_cpu);
                        prop_assert!(info.requested.memory <= info.allocatable.memory);
                        prop_assert!(info.pods.len() as i64 <= info.allowed_pods);
                        for g in ["g0", "g1", "g2"] {
                            let same = info.pods.iter().filter(|q| q.labels.get("group").map(String::as_str) == Some(g)).count();
                            prop_assert!(same <= 1, "two {} pods on {}", g, info.name);
                        }
                    }
                }
                Err(ScheduleError::Unschedulable(u)) => {
                    prop_assert_eq!(u.nodes, nodes.len());
                    prop_assert!(u.reasons.values().sum::<usize>() >= nodes.len());
                    // A refusal is true: every node really breaks some rule for this pod.
                    for (idx, n) in nodes.iter().enumerate() {
                        let info = snapshot.node(&format!("n{idx}")).expect("node");
                        let free_cpu = info.allocatable.milli_cpu - info.requested.milli_cpu;
                        let free_memory = info.allocatable.memory - info.requested.memory;
                        let fits = (shape.cpu_millis == 0 || i64::from(shape.cpu_millis) <= free_cpu)
                            && (shape.memory_mib == 0 || i64::from(shape.memory_mib) * 1024 * 1024 <= free_memory)
                            && (info.pods.len() as i64) < info.allowed_pods;
                        let group_clash = shape.anti_group.is_some_and(|g| {
                            let group = format!("g{g}");
                            info.pods.iter().any(|q| q.labels.get("group") == Some(&group))
                        });
                        let allowed = !n.cordoned && (!n.tainted || shape.tolerates) && (!shape.wants_ssd || n.ssd);
                        prop_assert!(!(fits && allowed && !group_clash), "pod-{} refused but n{} could take it: {}", i, idx, u.message);
                    }
                }
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
        }
    }
}
