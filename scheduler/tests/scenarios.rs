//! Scenario tests: hundreds of pods scheduled one by one into a 20-node snapshot, each bound with
//! `assume()` before the next, with the rules asserted pod by pod against the snapshot's state.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Pod};
use skiff_scheduler::fixtures::{HOSTNAME, ZONE, labels, node, pod, term};
use skiff_scheduler::quantity::ParsedQuantity;
use skiff_scheduler::{ClusterSnapshot, NodeInfo, ScheduleError, Scheduler};

const ZONES: [&str; 4] = ["z0", "z1", "z2", "z3"];

/// 20 nodes, 5 per zone, 8 cpu / 16Gi / 110 pods each. n03 and n08 are GPU nodes tainted
/// `dedicated=gpu:NoSchedule`; n17 is cordoned.
fn cluster() -> Vec<Node> {
    (0..20)
        .map(|i| {
            let name = format!("n{i:02}");
            let mut b = node(&name).zone(ZONES[i % 4]).allocatable("8", "16Gi", 110);
            if i == 3 || i == 8 {
                b = b
                    .taint("dedicated", "gpu", "NoSchedule")
                    .label("gpu", "true");
            }
            if i == 17 {
                b = b.unschedulable();
            }
            b.build()
        })
        .collect()
}

/// A small deterministic generator (no external randomness: a failure reproduces exactly).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn tolerates_gpu(p: &Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.tolerations.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key.as_deref() == Some("dedicated")))
}

fn label(p: &Pod, key: &str) -> Option<String> {
    p.metadata.labels.as_ref().and_then(|l| l.get(key).cloned())
}

fn requested_cpu(p: &Pod) -> i64 {
    p.spec
        .as_ref()
        .and_then(|s| s.containers[0].resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("cpu"))
        .map(|q| {
            ParsedQuantity::parse(&q.0)
                .expect("test quantity")
                .milli_value()
        })
        .unwrap_or(0)
}

fn pods_with<'a>(
    node: &'a NodeInfo,
    key: &'a str,
    value: &'a str,
) -> impl Iterator<Item = &'a skiff_scheduler::PodInfo> {
    node.pods
        .iter()
        .filter(move |p| p.labels.get(key).map(String::as_str) == Some(value))
}

/// Checks every rule for the pod just placed (and the invariants of the whole snapshot).
fn check_placement(snapshot: &ClusterSnapshot, p: &Pod, node_name: &str) {
    let who = p.metadata.name.clone().unwrap_or_default();
    let node = snapshot.node(node_name).expect("placed on a known node");
    assert!(!node.unschedulable, "{who} placed on cordoned {node_name}");
    if node.taints.iter().any(|t| t.effect == "NoSchedule") {
        assert!(
            tolerates_gpu(p),
            "{who} placed on tainted {node_name} without tolerating it"
        );
    }
    if label(p, "gpu-job").is_some() {
        assert_eq!(
            node.labels.get("gpu").map(String::as_str),
            Some("true"),
            "{who} must run on a gpu node"
        );
    }
    // Resources: never over-committed, on any node.
    for n in snapshot.nodes() {
        assert!(
            n.requested.milli_cpu <= n.allocatable.milli_cpu,
            "cpu over-committed on {}",
            n.name
        );
        assert!(
            n.requested.memory <= n.allocatable.memory,
            "memory over-committed on {}",
            n.name
        );
        assert!(
            n.pods.len() as i64 <= n.allowed_pods,
            "too many pods on {}",
            n.name
        );
    }
    match label(p, "app").as_deref() {
        // Anti-affinity: never two solo pods on one node.
        Some("solo") => {
            for n in snapshot.nodes() {
                assert!(
                    pods_with(n, "app", "solo").count() <= 1,
                    "two solo pods on {} after {who}",
                    n.name
                );
            }
        }
        // Affinity: web-i runs on the node of cache-i.
        Some("web") => {
            let pair = label(p, "pair").expect("web pods carry pair");
            assert!(
                node.pods
                    .iter()
                    .any(|q| q.labels.get("app").map(String::as_str) == Some("cache")
                        && q.labels.get("pair") == Some(&pair)),
                "{who} is not on the node of its cache (pair {pair})"
            );
        }
        // Anti-affinity among caches, per node.
        Some("cache") => {
            for n in snapshot.nodes() {
                assert!(
                    pods_with(n, "app", "cache").count() <= 1,
                    "two caches on {}",
                    n.name
                );
            }
        }
        // Spread: counts per zone differ by at most maxSkew (1).
        Some("spread") => {
            let mut per_zone: BTreeMap<&str, usize> = ZONES.iter().map(|z| (*z, 0)).collect();
            for n in snapshot.nodes() {
                let zone = n.labels.get(ZONE).map(String::as_str).unwrap_or("");
                *per_zone.entry(zone).or_insert(0) += pods_with(n, "app", "spread").count();
            }
            let max = per_zone.values().max().copied().unwrap_or(0);
            let min = per_zone.values().min().copied().unwrap_or(0);
            assert!(max - min <= 1, "zones skewed after {who}: {per_zone:?}");
        }
        _ => {}
    }
}

/// When a pod is refused, the refusal must be true: no schedulable node has room for it.
fn check_refusal(snapshot: &ClusterSnapshot, p: &Pod, err: &ScheduleError) {
    let ScheduleError::Unschedulable(u) = err else {
        panic!("unexpected error {err}");
    };
    assert!(
        u.message.starts_with("0/20 nodes are available: "),
        "{}",
        u.message
    );
    assert!(u.message.ends_with('.'));
    assert!(
        u.reasons.values().sum::<usize>() >= 20,
        "every node gives a reason: {u:?}"
    );
    if label(p, "app").as_deref() == Some("burst") {
        let cpu = requested_cpu(p);
        for n in snapshot.nodes() {
            let usable = !n.unschedulable && n.taints.is_empty();
            assert!(
                !usable || n.allocatable.milli_cpu - n.requested.milli_cpu < cpu,
                "{} refused but {} has {}m free for {cpu}m: {}",
                p.metadata.name.as_deref().unwrap_or(""),
                n.name,
                n.allocatable.milli_cpu - n.requested.milli_cpu,
                u.message
            );
        }
    }
}

fn workload() -> Vec<Pod> {
    let mut pods = Vec::new();
    // Caches first (each avoids other caches per node), then web-i with affinity to cache-i.
    for i in 0..10 {
        pods.push(
            pod("shop", &format!("cache-{i}"))
                .uid(&format!("uid-cache-{i}"))
                .label("app", "cache")
                .label("pair", &i.to_string())
                .request("250m", "256Mi")
                .pod_anti_affinity(term(labels(&[("app", "cache")]), HOSTNAME))
                .build(),
        );
    }
    // Web pods right after the caches, so their caches' nodes still have room; later pods are
    // shuffled.
    for i in 0..10 {
        pods.push(
            pod("shop", &format!("web-{i}"))
                .uid(&format!("uid-web-{i}"))
                .label("app", "web")
                .label("pair", &i.to_string())
                .request("200m", "128Mi")
                .pod_affinity(term(
                    labels(&[("app", "cache"), ("pair", &i.to_string())]),
                    HOSTNAME,
                ))
                .build(),
        );
    }
    let mut mixed = Vec::new();
    for i in 0..20 {
        mixed.push(
            pod("shop", &format!("solo-{i}"))
                .uid(&format!("uid-solo-{i}"))
                .label("app", "solo")
                .request("100m", "64Mi")
                .pod_anti_affinity(term(labels(&[("app", "solo")]), HOSTNAME))
                .build(),
        );
    }
    for i in 0..120 {
        mixed.push(
            pod("shop", &format!("spread-{i}"))
                .uid(&format!("uid-spread-{i}"))
                .label("app", "spread")
                .request("100m", "100Mi")
                .spread(1, ZONE, labels(&[("app", "spread")]), true)
                .build(),
        );
    }
    for i in 0..20 {
        mixed.push(
            pod("ml", &format!("gpu-{i}"))
                .uid(&format!("uid-gpu-{i}"))
                .label("gpu-job", "yes")
                .request("500m", "1Gi")
                .toleration("dedicated", "Equal", "gpu", "NoSchedule")
                .node_selector("gpu", "true")
                .build(),
        );
    }
    let mut rng = Lcg(42);
    for i in 0..230 {
        let cpu = ["300m", "500m", "750m", "1", "1500m"][rng.next(5) as usize];
        mixed.push(
            pod("batch", &format!("burst-{i}"))
                .uid(&format!("uid-burst-{i}"))
                .label("app", "burst")
                .request(cpu, "512Mi")
                .build(),
        );
    }
    // A deterministic shuffle of everything after the caches.
    for i in (1..mixed.len()).rev() {
        let j = rng.next(i as u64 + 1) as usize;
        mixed.swap(i, j);
    }
    pods.extend(mixed);
    pods
}

#[test]
fn four_hundred_pods_one_by_one_keep_every_rule() {
    let nodes = cluster();
    let mut snapshot = ClusterSnapshot::new(&nodes, &[]);
    let scheduler = Scheduler::default_plugins();
    let pods = workload();
    assert_eq!(pods.len(), 410);
    let mut placed: BTreeMap<String, String> = BTreeMap::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for p in &pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        match scheduler.schedule(p, &snapshot) {
            Ok(result) => {
                snapshot
                    .assume(p, &result.node)
                    .expect("assume on a known node");
                check_placement(&snapshot, p, &result.node);
                placed.insert(name, result.node);
            }
            Err(err) => {
                check_refusal(&snapshot, p, &err);
                *refused
                    .entry(
                        label(p, "app")
                            .or_else(|| label(p, "gpu-job"))
                            .unwrap_or_default(),
                    )
                    .or_insert(0) += 1;
            }
        }
    }
    // Pairs: every web pod found its cache; every cache was placed (10 caches, 17 usable nodes).
    for i in 0..10 {
        assert_eq!(
            placed.get(&format!("web-{i}")),
            placed.get(&format!("cache-{i}")),
            "pair {i}"
        );
        assert!(placed.contains_key(&format!("cache-{i}")));
    }
    // 17 schedulable untainted nodes, so exactly 17 solo pods fit (cpu is spread thin enough).
    let solos = placed.keys().filter(|k| k.starts_with("solo-")).count();
    assert_eq!(solos, 17, "refused: {refused:?}");
    // GPU jobs all went to the two gpu nodes.
    let gpu_nodes: BTreeSet<&String> = placed
        .iter()
        .filter(|(k, _)| k.starts_with("gpu-"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        gpu_nodes,
        BTreeSet::from([&"n03".to_string(), &"n08".to_string()])
    );
    // The cluster ends full: some burst pods were refused for cpu, and that was checked above.
    assert!(
        refused.get("burst").copied().unwrap_or(0) > 0,
        "expected cpu pressure: {refused:?}"
    );
    assert_eq!(snapshot.pod_count(), placed.len());
}

#[test]
fn hostname_spread_and_anti_affinity_over_two_hundred_identical_pods() {
    let nodes: Vec<Node> = (0..20)
        .map(|i| {
            node(&format!("n{i:02}"))
                .zone(ZONES[i % 4])
                .allocatable("64", "256Gi", 110)
                .build()
        })
        .collect();
    let mut snapshot = ClusterSnapshot::new(&nodes, &[]);
    let scheduler = Scheduler::default_plugins();
    for i in 0..200 {
        let p = pod("d", &format!("s-{i}"))
            .uid(&format!("u-{i}"))
            .label("app", "s")
            .spread(1, HOSTNAME, labels(&[("app", "s")]), true)
            .build();
        let node = scheduler.schedule(&p, &snapshot).expect("fits").node;
        snapshot.assume(&p, &node).expect("known node");
        let counts: Vec<usize> = snapshot
            .nodes()
            .iter()
            .map(|n| pods_with(n, "app", "s").count())
            .collect();
        let (max, min) = (
            counts.iter().max().copied().unwrap_or(0),
            counts.iter().min().copied().unwrap_or(0),
        );
        assert!(max - min <= 1, "after s-{i}: {counts:?}");
    }
    // 20 pods with anti-affinity fill the 20 nodes one each; the 21st fits nowhere.
    for i in 0..21 {
        let p = pod("d", &format!("a-{i}"))
            .label("app", "a")
            .pod_anti_affinity(term(labels(&[("app", "a")]), HOSTNAME))
            .build();
        match scheduler.schedule(&p, &snapshot) {
            Ok(r) => {
                assert!(i < 20, "a-{i} should not fit");
                snapshot.assume(&p, &r.node).expect("known node");
                assert_eq!(
                    pods_with(snapshot.node(&r.node).expect("node"), "app", "a").count(),
                    1
                );
            }
            Err(e) => {
                assert_eq!(i, 20, "a-{i} should fit: {e}");
                assert_eq!(
                    e.to_string(),
                    "0/20 nodes are available: 20 node(s) didn't match pod anti-affinity rules."
                );
            }
        }
    }
}

#[test]
fn preferred_spread_and_least_allocated_spread_plain_pods() {
    // With no constraints at all, LeastAllocated and the tie-break spread identical pods evenly
    // (requests large enough that one pod moves a node's integer score: 1 cpu of 16 is 6 points).
    let nodes: Vec<Node> = (0..20)
        .map(|i| {
            node(&format!("n{i:02}"))
                .allocatable("16", "32Gi", 110)
                .build()
        })
        .collect();
    let mut snapshot = ClusterSnapshot::new(&nodes, &[]);
    let scheduler = Scheduler::default_plugins();
    for i in 0..200 {
        let p = pod("d", &format!("p-{i}"))
            .uid(&format!("u-{i}"))
            .request("1", "1Gi")
            .build();
        let node = scheduler.schedule(&p, &snapshot).expect("fits").node;
        snapshot.assume(&p, &node).expect("known node");
    }
    let counts: Vec<usize> = snapshot.nodes().iter().map(|n| n.pods.len()).collect();
    let (max, min) = (
        counts.iter().max().copied().unwrap_or(0),
        counts.iter().min().copied().unwrap_or(0),
    );
    assert!(max - min <= 1, "{counts:?}");
}

#[test]
fn unschedulable_message_matches_kube_scheduler() {
    let nodes = vec![
        node("worker").allocatable("1", "2Gi", 110).build(),
        node("cp-1")
            .allocatable("8", "16Gi", 110)
            .taint("node-role.kubernetes.io/control-plane", "", "NoSchedule")
            .build(),
        node("cp-2")
            .allocatable("8", "16Gi", 110)
            .taint("node-role.kubernetes.io/control-plane", "", "NoSchedule")
            .build(),
    ];
    let snapshot = ClusterSnapshot::new(&nodes, &[]);
    let p = pod("default", "big").request("2", "1Gi").build();
    let err = Scheduler::default_plugins()
        .schedule(&p, &snapshot)
        .expect_err("fits nowhere");
    assert_eq!(
        err.to_string(),
        "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }."
    );
    let ScheduleError::Unschedulable(u) = err else {
        panic!("wrong error")
    };
    assert_eq!(u.reasons.get("Insufficient cpu"), Some(&1));
    // Both cpu and memory short on one node: both reasons count for it.
    let p = pod("default", "bigger").request("2", "4Gi").build();
    let err = Scheduler::default_plugins()
        .schedule(&p, &snapshot)
        .expect_err("fits nowhere");
    assert_eq!(
        err.to_string(),
        "0/3 nodes are available: 1 Insufficient cpu, 1 Insufficient memory, 2 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }."
    );
}

#[test]
fn remove_pod_frees_its_resources_and_its_anti_affinity() {
    let nodes = vec![node("only").allocatable("1", "1Gi", 110).build()];
    let mut snapshot = ClusterSnapshot::new(&nodes, &[]);
    let scheduler = Scheduler::default_plugins();
    let first = pod("d", "first")
        .label("app", "x")
        .request("800m", "")
        .pod_anti_affinity(term(labels(&[("app", "x")]), HOSTNAME))
        .build();
    snapshot.assume(&first, "only").expect("known node");
    let second = pod("d", "second")
        .label("app", "x")
        .request("200m", "")
        .build();
    let err = scheduler
        .schedule(&second, &snapshot)
        .expect_err("existing anti-affinity");
    assert_eq!(
        err.to_string(),
        "0/1 nodes are available: 1 node(s) didn't satisfy existing pods anti-affinity rules."
    );
    assert_eq!(snapshot.remove_pod("d", "first"), Some("only".to_string()));
    assert_eq!(
        snapshot.node("only").map(|n| n.requested.milli_cpu),
        Some(0)
    );
    assert_eq!(
        scheduler
            .schedule(&second, &snapshot)
            .expect("fits now")
            .node,
        "only"
    );
    assert!(snapshot.assume(&second, "nowhere").is_err());
}
