//! NodeResourcesFit (filter: requests against allocatable minus what bound pods request; score:
//! LeastAllocated) and NodeResourcesBalancedAllocation (score: cpu and memory used evenly).

use super::FnFilter;
use crate::framework::{FilterPlugin, MAX_NODE_SCORE, NodeFilter, ScorePlugin};
use crate::snapshot::{ClusterSnapshot, NodeInfo, PodInfo};

pub struct NodeResourcesFit;

/// kube-scheduler's `fitsRequest`: first the pod count, then (if the pod requests anything) each
/// requested resource; every shortfall is a reason.
fn fits(pod: &PodInfo, node: &NodeInfo) -> Result<(), Vec<String>> {
    let mut reasons = Vec::new();
    if node.pods.len() as i64 + 1 > node.allowed_pods {
        reasons.push("Too many pods".to_string());
    }
    let want = &pod.requests.requests;
    if want.is_zero() {
        return if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        };
    }
    let (alloc, used) = (&node.allocatable, &node.requested);
    if want.milli_cpu > 0 && want.milli_cpu > alloc.milli_cpu.saturating_sub(used.milli_cpu) {
        reasons.push("Insufficient cpu".to_string());
    }
    if want.memory > 0 && want.memory > alloc.memory.saturating_sub(used.memory) {
        reasons.push("Insufficient memory".to_string());
    }
    if want.ephemeral_storage > 0
        && want.ephemeral_storage
            > alloc
                .ephemeral_storage
                .saturating_sub(used.ephemeral_storage)
    {
        reasons.push("Insufficient ephemeral-storage".to_string());
    }
    for (name, amount) in &want.scalar {
        if *amount == 0 {
            continue;
        }
        let have = alloc.scalar.get(name).copied().unwrap_or(0);
        let taken = used.scalar.get(name).copied().unwrap_or(0);
        if *amount > have.saturating_sub(taken) {
            reasons.push(format!("Insufficient {name}"));
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons)
    }
}

impl FilterPlugin for NodeResourcesFit {
    fn name(&self) -> &'static str {
        "NodeResourcesFit"
    }

    fn prepare<'a>(&'a self, pod: &'a PodInfo, _: &'a ClusterSnapshot) -> Box<dyn NodeFilter + 'a> {
        Box::new(FnFilter(move |node: &NodeInfo| fits(pod, node)))
    }
}

/// `leastRequestedScore`: the free share after placing the pod, 0-100.
fn least_requested(requested: i64, capacity: i64) -> i64 {
    if capacity <= 0 || requested > capacity {
        return 0;
    }
    (capacity - requested) * MAX_NODE_SCORE / capacity
}

impl ScorePlugin for NodeResourcesFit {
    fn name(&self) -> &'static str {
        "NodeResourcesFit"
    }

    /// LeastAllocated over cpu and memory (weight 1 each), with the "non-zero" requests (100m
    /// cpu / 200Mi memory for containers that request none); resources a node has none of are
    /// left out of the mean. Not normalised further, as in kube-scheduler.
    fn score(&self, pod: &PodInfo, _: &ClusterSnapshot, nodes: &[&NodeInfo]) -> Vec<i64> {
        nodes
            .iter()
            .map(|node| {
                let pairs = [
                    (
                        node.non_zero_milli_cpu
                            .saturating_add(pod.requests.non_zero_milli_cpu),
                        node.allocatable.milli_cpu,
                    ),
                    (
                        node.non_zero_memory
                            .saturating_add(pod.requests.non_zero_memory),
                        node.allocatable.memory,
                    ),
                ];
                let (mut sum, mut weights) = (0, 0);
                for (requested, allocatable) in pairs {
                    if allocatable == 0 {
                        continue;
                    }
                    sum += least_requested(requested, allocatable);
                    weights += 1;
                }
                if weights == 0 { 0 } else { sum / weights }
            })
            .collect()
    }
}

pub struct NodeResourcesBalancedAllocation;

impl ScorePlugin for NodeResourcesBalancedAllocation {
    fn name(&self) -> &'static str {
        "NodeResourcesBalancedAllocation"
    }

    /// `(1 - |cpu fraction - memory fraction| / 2) * 100` with the real requests (fractions
    /// capped at 1). Skipped (all 0) for a pod that requests neither, as kube-scheduler releases
    /// after the fix for kubernetes/kubernetes#129138 do, so that best-effort pods do not all
    /// pile on one node (a deliberate step past 1.32, which may still score them).
    fn score(&self, pod: &PodInfo, _: &ClusterSnapshot, nodes: &[&NodeInfo]) -> Vec<i64> {
        let want = &pod.requests.requests;
        if want.milli_cpu == 0 && want.memory == 0 {
            return vec![0; nodes.len()];
        }
        nodes
            .iter()
            .map(|node| {
                let pairs = [
                    (
                        node.requested.milli_cpu.saturating_add(want.milli_cpu),
                        node.allocatable.milli_cpu,
                    ),
                    (
                        node.requested.memory.saturating_add(want.memory),
                        node.allocatable.memory,
                    ),
                ];
                let fractions: Vec<f64> = pairs
                    .iter()
                    .filter(|(_, alloc)| *alloc != 0)
                    .map(|(req, alloc)| (*req as f64 / *alloc as f64).min(1.0))
                    .collect();
                let std = if fractions.len() == 2 {
                    ((fractions[0] - fractions[1]) / 2.0).abs()
                } else {
                    0.0
                };
                ((1.0 - std) * MAX_NODE_SCORE as f64) as i64
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{node, pod};
    use crate::plugins::testing::{filter, passing, scores, snapshot};

    #[test]
    fn requests_must_fit_in_what_is_left() {
        let s = snapshot(
            vec![node("n").allocatable("2", "4Gi", 110).build()],
            vec![
                pod("d", "used")
                    .request("1500m", "1Gi")
                    .node_name("n")
                    .build(),
            ],
        );
        assert_eq!(
            filter(
                &NodeResourcesFit,
                &pod("d", "p").request("500m", "3Gi").build(),
                &s,
                "n"
            ),
            Ok(())
        );
        assert_eq!(
            filter(
                &NodeResourcesFit,
                &pod("d", "p").request("501m", "3Gi").build(),
                &s,
                "n"
            ),
            Err(vec!["Insufficient cpu".to_string()])
        );
        assert_eq!(
            filter(
                &NodeResourcesFit,
                &pod("d", "p").request("1", "3073Mi").build(),
                &s,
                "n"
            ),
            Err(vec![
                "Insufficient cpu".to_string(),
                "Insufficient memory".to_string()
            ])
        );
    }

    #[test]
    fn pod_count_limit_applies_even_to_pods_without_requests() {
        let s = snapshot(
            vec![
                node("full").allocatable("8", "8Gi", 2).build(),
                node("free").allocatable("8", "8Gi", 3).build(),
            ],
            vec![
                pod("d", "a").node_name("full").build(),
                pod("d", "b").node_name("full").build(),
                pod("d", "c").node_name("free").build(),
                pod("d", "done")
                    .node_name("full")
                    .phase("Succeeded")
                    .build(),
            ],
        );
        assert_eq!(
            filter(&NodeResourcesFit, &pod("d", "p").build(), &s, "full"),
            Err(vec!["Too many pods".to_string()])
        );
        assert_eq!(
            passing(&NodeResourcesFit, &pod("d", "p").build(), &s),
            vec!["free"]
        );
    }

    #[test]
    fn init_containers_overhead_and_extended_resources_count() {
        let s = snapshot(
            vec![
                node("n")
                    .allocatable("1", "1Gi", 110)
                    .allocatable_resource("example.com/gpu", "1")
                    .build(),
            ],
            vec![],
        );
        let gpus = pod("d", "p").requests(&[("example.com/gpu", "2")]).build();
        assert_eq!(
            filter(&NodeResourcesFit, &gpus, &s, "n"),
            Err(vec!["Insufficient example.com/gpu".to_string()])
        );
        let unknown = pod("d", "p").requests(&[("example.com/fpga", "1")]).build();
        assert_eq!(
            filter(&NodeResourcesFit, &unknown, &s, "n"),
            Err(vec!["Insufficient example.com/fpga".to_string()])
        );
        let mut big_init = pod("d", "p").request("100m", "").build();
        if let Some(spec) = big_init.spec.as_mut() {
            let mut init = spec.containers[0].clone();
            init.name = "init".into();
            init.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
                requests: Some(
                    [(
                        "cpu".to_string(),
                        k8s_openapi::apimachinery::pkg::api::resource::Quantity("1100m".into()),
                    )]
                    .into(),
                ),
                ..Default::default()
            });
            spec.init_containers = Some(vec![init]);
        }
        assert_eq!(
            filter(&NodeResourcesFit, &big_init, &s, "n"),
            Err(vec!["Insufficient cpu".to_string()])
        );
    }

    #[test]
    fn ephemeral_storage_is_checked() {
        let s = snapshot(
            vec![
                node("n")
                    .allocatable("1", "1Gi", 110)
                    .allocatable_resource("ephemeral-storage", "10Gi")
                    .build(),
            ],
            vec![],
        );
        let p = pod("d", "p")
            .requests(&[("ephemeral-storage", "11Gi")])
            .build();
        assert_eq!(
            filter(&NodeResourcesFit, &p, &s, "n"),
            Err(vec!["Insufficient ephemeral-storage".to_string()])
        );
    }

    #[test]
    fn least_allocated_prefers_emptier_nodes_and_counts_default_requests() {
        let s = snapshot(
            vec![
                node("busy").allocatable("4", "8Gi", 110).build(),
                node("idle").allocatable("4", "8Gi", 110).build(),
            ],
            vec![
                pod("d", "used")
                    .request("2", "4Gi")
                    .node_name("busy")
                    .build(),
            ],
        );
        let p = pod("d", "p").request("1", "2Gi").build();
        // busy: cpu (4000-3000)*100/4000 = 25, memory 25 -> 25; idle: 75.
        assert_eq!(
            scores(&NodeResourcesFit, &p, &s),
            vec![("busy".into(), 25), ("idle".into(), 75)]
        );
        // No requests: 100m / 200Mi are assumed, so the score is not 100.
        let best_effort = pod("d", "p").build();
        let idle = scores(&NodeResourcesFit, &best_effort, &s)[1].1;
        // cpu (4000-100)*100/4000 = 97, memory (8192-200)*100/8192 = 97.
        assert_eq!(idle, 97);
    }

    #[test]
    fn balanced_allocation_prefers_even_use() {
        let s = snapshot(
            vec![
                node("cpu-heavy").allocatable("4", "4Gi", 110).build(),
                node("even").allocatable("4", "4Gi", 110).build(),
            ],
            vec![
                pod("d", "used")
                    .request("2", "0")
                    .node_name("cpu-heavy")
                    .build(),
            ],
        );
        let p = pod("d", "p").request("1", "1Gi").build();
        // cpu-heavy: 3/4 vs 1/4 -> 1 - 0.25 = 75; even: 1/4 vs 1/4 -> 100.
        assert_eq!(
            scores(&NodeResourcesBalancedAllocation, &p, &s),
            vec![("cpu-heavy".into(), 75), ("even".into(), 100)]
        );
        let best_effort = pod("d", "p").build();
        assert!(
            scores(&NodeResourcesBalancedAllocation, &best_effort, &s)
                .iter()
                .all(|(_, v)| *v == 0)
        );
    }
}
