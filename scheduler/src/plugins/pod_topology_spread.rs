//! PodTopologySpread: `DoNotSchedule` constraints filter (a domain may hold at most `maxSkew`
//! more matching pods than the emptiest domain), `ScheduleAnyway` constraints score (fewer
//! matching pods in the node's domain score higher).
//!
//! Not done: kube-scheduler's system default constraints (spreading by the pod's Services and
//! ReplicaSets when the pod has none): that needs those objects in the snapshot.

use std::collections::HashMap;

use super::{find_untolerated_taint, node_matches_pod_selectors};
use crate::framework::{FilterPlugin, MAX_NODE_SCORE, NodeFilter, ScorePlugin};
use crate::snapshot::{ClusterSnapshot, NodeInfo, PodInfo, SpreadConstraint};

pub const REASON: &str = "node(s) didn't match pod topology spread constraints";
pub const REASON_MISSING_LABEL: &str =
    "node(s) didn't match pod topology spread constraints (missing required label)";

const HOSTNAME: &str = "kubernetes.io/hostname";

pub struct PodTopologySpread;

/// Whether the node carries every constraint's topology key.
fn has_all_keys(node: &NodeInfo, constraints: &[&SpreadConstraint]) -> bool {
    constraints
        .iter()
        .all(|c| node.labels.contains_key(&c.topology_key))
}

/// `MatchNodeInclusionPolicies`: whether the node's pods count for this constraint.
fn node_included(c: &SpreadConstraint, pod: &PodInfo, node: &NodeInfo) -> bool {
    if c.honor_node_affinity && !node_matches_pod_selectors(pod, node) {
        return false;
    }
    if c.honor_node_taints
        && find_untolerated_taint(&node.taints, &pod.tolerations, &["NoSchedule", "NoExecute"])
            .is_some()
    {
        return false;
    }
    true
}

fn count_matching(c: &SpreadConstraint, node: &NodeInfo, namespace: &str) -> i64 {
    node.pods.iter().filter(|p| c.counts(p, namespace)).count() as i64
}

struct HardConstraint<'a> {
    constraint: &'a SpreadConstraint,
    /// Matching pods per topology value, for every domain of an eligible node (0 included).
    counts: HashMap<&'a str, i64>,
    /// The global minimum the skew is measured from.
    min: i64,
    self_match: i64,
}

struct SpreadFilter<'a> {
    constraints: Vec<HardConstraint<'a>>,
}

impl NodeFilter for SpreadFilter<'_> {
    fn filter(&self, node: &NodeInfo) -> Result<(), Vec<String>> {
        for hc in &self.constraints {
            let Some(value) = node.labels.get(&hc.constraint.topology_key) else {
                return Err(vec![REASON_MISSING_LABEL.to_string()]);
            };
            let matching = hc.counts.get(value.as_str()).copied().unwrap_or(0);
            let skew = matching + hc.self_match - hc.min;
            if skew > hc.constraint.max_skew {
                return Err(vec![REASON.to_string()]);
            }
        }
        Ok(())
    }
}

impl FilterPlugin for PodTopologySpread {
    fn name(&self) -> &'static str {
        "PodTopologySpread"
    }

    fn prepare<'a>(
        &'a self,
        pod: &'a PodInfo,
        snapshot: &'a ClusterSnapshot,
    ) -> Box<dyn NodeFilter + 'a> {
        let hard: Vec<&SpreadConstraint> =
            pod.spread_constraints.iter().filter(|c| c.hard).collect();
        let mut constraints: Vec<HardConstraint<'a>> = hard
            .iter()
            .map(|c| HardConstraint {
                constraint: c,
                counts: HashMap::new(),
                min: 0,
                self_match: i64::from(c.selects(&pod.labels)),
            })
            .collect();
        if constraints.is_empty() {
            return Box::new(SpreadFilter { constraints });
        }
        for node in snapshot.nodes() {
            if !has_all_keys(node, &hard) {
                continue;
            }
            for hc in &mut constraints {
                if !node_included(hc.constraint, pod, node) {
                    continue;
                }
                let Some(value) = node.labels.get(&hc.constraint.topology_key) else {
                    continue;
                };
                *hc.counts.entry(value.as_str()).or_insert(0) +=
                    count_matching(hc.constraint, node, &pod.namespace);
            }
        }
        for hc in &mut constraints {
            // No eligible domain at all: kube-scheduler's critical path starts at MaxInt32, so
            // nothing is rejected for skew.
            hc.min = hc
                .counts
                .values()
                .copied()
                .min()
                .unwrap_or(i64::from(i32::MAX));
            if let Some(min_domains) = hc.constraint.min_domains
                && (hc.counts.len() as i64) < min_domains
            {
                // Fewer domains than asked for: the empty domains that do not exist yet count,
                // so the minimum is 0.
                hc.min = 0;
            }
        }
        Box::new(SpreadFilter { constraints })
    }
}

impl ScorePlugin for PodTopologySpread {
    fn name(&self) -> &'static str {
        "PodTopologySpread"
    }

    /// For each ScheduleAnyway constraint: matching pods in the node's domain times
    /// `ln(number of domains + 2)`, plus `maxSkew - 1`; summed and rounded; then reversed and
    /// scaled as kube-scheduler's NormalizeScore does (`100 * (max + min - s) / max`). Nodes
    /// missing a topology key score 0.
    fn score(&self, pod: &PodInfo, snapshot: &ClusterSnapshot, nodes: &[&NodeInfo]) -> Vec<i64> {
        let soft: Vec<&SpreadConstraint> =
            pod.spread_constraints.iter().filter(|c| !c.hard).collect();
        if soft.is_empty() {
            return vec![0; nodes.len()];
        }
        let ignored: Vec<bool> = nodes.iter().map(|n| !has_all_keys(n, &soft)).collect();
        // Domains among the feasible nodes, per constraint (hostname counts per node).
        let mut counts: Vec<HashMap<&str, i64>> = vec![HashMap::new(); soft.len()];
        for (node, _) in nodes.iter().zip(&ignored).filter(|(_, ignored)| !**ignored) {
            for (i, c) in soft.iter().enumerate() {
                if c.topology_key != HOSTNAME
                    && let Some(value) = node.labels.get(&c.topology_key)
                {
                    counts[i].entry(value.as_str()).or_insert(0);
                }
            }
        }
        let considered = ignored.iter().filter(|i| !**i).count();
        let weights: Vec<f64> = soft
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let size = if c.topology_key == HOSTNAME {
                    considered
                } else {
                    counts[i].len()
                };
                ((size + 2) as f64).ln()
            })
            .collect();
        // Count matching pods over all nodes of the cluster, in domains that feasible nodes have.
        for node in snapshot.nodes() {
            if !has_all_keys(node, &soft) {
                continue;
            }
            for (i, c) in soft.iter().enumerate() {
                if c.topology_key == HOSTNAME || !node_included(c, pod, node) {
                    continue;
                }
                let Some(value) = node.labels.get(&c.topology_key) else {
                    continue;
                };
                if let Some(count) = counts[i].get_mut(value.as_str()) {
                    *count += count_matching(c, node, &pod.namespace);
                }
            }
        }
        let raw: Vec<Option<i64>> = nodes
            .iter()
            .zip(&ignored)
            .map(|(node, ignored)| {
                if *ignored {
                    return None;
                }
                let mut score = 0.0;
                for (i, c) in soft.iter().enumerate() {
                    let Some(value) = node.labels.get(&c.topology_key) else {
                        continue;
                    };
                    let count = if c.topology_key == HOSTNAME {
                        count_matching(c, node, &pod.namespace)
                    } else {
                        counts[i].get(value.as_str()).copied().unwrap_or(0)
                    };
                    score += count as f64 * weights[i] + (c.max_skew - 1) as f64;
                }
                Some(score.round() as i64)
            })
            .collect();
        let max = raw.iter().flatten().copied().max().unwrap_or(0).max(0);
        let min = raw.iter().flatten().copied().min().unwrap_or(0);
        raw.iter()
            .map(|s| match s {
                None => 0,
                Some(_) if max == 0 => MAX_NODE_SCORE,
                Some(s) => MAX_NODE_SCORE * (max + min - s) / max,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{ZONE, labels, node, pod, requirement};
    use crate::plugins::testing::{filter, passing, scores, snapshot};
    use k8s_openapi::api::core::v1::TopologySpreadConstraint;

    fn zones(pods_per_zone: &[(&str, usize)]) -> ClusterSnapshot {
        let nodes = vec![
            node("a1").zone("a").build(),
            node("b1").zone("b").build(),
            node("c1").zone("c").build(),
        ];
        let mut pods = Vec::new();
        for (n, count) in pods_per_zone {
            for i in 0..*count {
                pods.push(
                    pod("d", &format!("{n}-{i}"))
                        .label("app", "web")
                        .node_name(n)
                        .build(),
                );
            }
        }
        snapshot(nodes, pods)
    }

    fn web(hard: bool) -> crate::fixtures::PodBuilder {
        pod("d", "new")
            .label("app", "web")
            .spread(1, ZONE, labels(&[("app", "web")]), hard)
    }

    #[test]
    fn max_skew_is_measured_from_the_emptiest_domain() {
        let s = zones(&[("a1", 2), ("b1", 1), ("c1", 1)]);
        // a: 2+1-1 = 2 > 1; b, c: 1+1-1 = 1.
        assert_eq!(
            passing(&PodTopologySpread, &web(true).build(), &s),
            vec!["b1", "c1"]
        );
        assert_eq!(
            filter(&PodTopologySpread, &web(true).build(), &s, "a1"),
            Err(vec![REASON.to_string()])
        );
        // maxSkew 2 allows a.
        let loose = pod("d", "new")
            .label("app", "web")
            .spread(2, ZONE, labels(&[("app", "web")]), true)
            .build();
        assert_eq!(passing(&PodTopologySpread, &loose, &s).len(), 3);
    }

    #[test]
    fn a_pod_that_does_not_match_its_own_selector_adds_nothing() {
        let s = zones(&[("a1", 1), ("b1", 0), ("c1", 0)]);
        let other = pod("d", "new")
            .label("app", "db")
            .spread(1, ZONE, labels(&[("app", "web")]), true)
            .build();
        // a: 1 + 0 - 0 = 1 <= 1.
        assert_eq!(passing(&PodTopologySpread, &other, &s).len(), 3);
    }

    #[test]
    fn nodes_without_the_key_are_refused_with_their_own_reason() {
        let s = snapshot(
            vec![node("a1").zone("a").build(), node("bare").build()],
            vec![],
        );
        assert_eq!(
            filter(&PodTopologySpread, &web(true).build(), &s, "bare"),
            Err(vec![REASON_MISSING_LABEL.to_string()])
        );
    }

    #[test]
    fn other_namespaces_and_terminating_pods_do_not_count() {
        let s = snapshot(
            vec![node("a1").zone("a").build(), node("b1").zone("b").build()],
            vec![
                pod("other", "x")
                    .label("app", "web")
                    .node_name("a1")
                    .build(),
                pod("d", "y")
                    .label("app", "web")
                    .node_name("a1")
                    .terminating()
                    .build(),
            ],
        );
        assert_eq!(passing(&PodTopologySpread, &web(true).build(), &s).len(), 2);
    }

    #[test]
    fn min_domains_makes_the_minimum_zero_while_domains_are_missing() {
        let s = zones(&[("a1", 1), ("b1", 1), ("c1", 1)]);
        let mut c = TopologySpreadConstraint {
            max_skew: 1,
            topology_key: ZONE.into(),
            label_selector: Some(labels(&[("app", "web")])),
            when_unsatisfiable: "DoNotSchedule".into(),
            min_domains: Some(3),
            ..Default::default()
        };
        let p = pod("d", "new")
            .label("app", "web")
            .spread_constraint(c.clone())
            .build();
        assert_eq!(
            passing(&PodTopologySpread, &p, &s).len(),
            3,
            "3 domains exist: min is 1"
        );
        c.min_domains = Some(4);
        let p = pod("d", "new")
            .label("app", "web")
            .spread_constraint(c)
            .build();
        assert!(
            passing(&PodTopologySpread, &p, &s).is_empty(),
            "4 domains wanted: min is 0, skew 2"
        );
    }

    #[test]
    fn node_affinity_policy_honor_ignores_excluded_nodes_and_ignore_counts_them() {
        // Zone c is empty but the pod's nodeSelector excludes it: with Honor (the default) it is
        // not a domain, so the minimum is 1 and zone b (1 pod) is fine.
        let nodes = vec![
            node("a1").zone("a").label("pool", "x").build(),
            node("b1").zone("b").label("pool", "x").build(),
            node("c1").zone("c").build(),
        ];
        let pods = vec![
            pod("d", "p1").label("app", "web").node_name("a1").build(),
            pod("d", "p2").label("app", "web").node_name("a1").build(),
            pod("d", "p3").label("app", "web").node_name("b1").build(),
        ];
        let s = snapshot(nodes, pods);
        let honor = web(true).node_selector("pool", "x").build();
        assert_eq!(passing(&PodTopologySpread, &honor, &s), vec!["b1", "c1"]);
        let c = TopologySpreadConstraint {
            max_skew: 1,
            topology_key: ZONE.into(),
            label_selector: Some(labels(&[("app", "web")])),
            when_unsatisfiable: "DoNotSchedule".into(),
            node_affinity_policy: Some("Ignore".into()),
            ..Default::default()
        };
        let ignore = pod("d", "new")
            .label("app", "web")
            .node_selector("pool", "x")
            .spread_constraint(c)
            .build();
        // Min is 0 (zone c): b would be 1+1-0 = 2 > 1.
        assert_eq!(passing(&PodTopologySpread, &ignore, &s), vec!["c1"]);
        let _ = requirement; // (node affinity requirements behave the same way as nodeSelector)
    }

    #[test]
    fn node_taints_policy_honor_drops_untolerated_nodes() {
        let nodes = vec![
            node("a1").zone("a").build(),
            node("b1")
                .zone("b")
                .taint("dedicated", "x", "NoSchedule")
                .build(),
        ];
        let pods = vec![pod("d", "p1").label("app", "web").node_name("a1").build()];
        let s = snapshot(nodes, pods);
        // Ignore (default): zone b counts with 0, so a is at 1+1-0 = 2.
        assert_eq!(
            passing(&PodTopologySpread, &web(true).build(), &s),
            vec!["b1"]
        );
        let c = TopologySpreadConstraint {
            max_skew: 1,
            topology_key: ZONE.into(),
            label_selector: Some(labels(&[("app", "web")])),
            when_unsatisfiable: "DoNotSchedule".into(),
            node_taints_policy: Some("Honor".into()),
            ..Default::default()
        };
        let honor = pod("d", "new")
            .label("app", "web")
            .spread_constraint(c)
            .build();
        assert_eq!(passing(&PodTopologySpread, &honor, &s), vec!["a1", "b1"]);
    }

    #[test]
    fn match_label_keys_narrow_the_selector_to_the_pods_revision() {
        let s = snapshot(
            vec![node("a1").zone("a").build(), node("b1").zone("b").build()],
            vec![
                pod("d", "old1")
                    .label("app", "web")
                    .label("rev", "1")
                    .node_name("a1")
                    .build(),
                pod("d", "old2")
                    .label("app", "web")
                    .label("rev", "1")
                    .node_name("a1")
                    .build(),
            ],
        );
        let c = TopologySpreadConstraint {
            max_skew: 1,
            topology_key: ZONE.into(),
            label_selector: Some(labels(&[("app", "web")])),
            when_unsatisfiable: "DoNotSchedule".into(),
            match_label_keys: Some(vec!["rev".into()]),
            ..Default::default()
        };
        let rev2 = pod("d", "new")
            .label("app", "web")
            .label("rev", "2")
            .spread_constraint(c.clone())
            .build();
        assert_eq!(
            passing(&PodTopologySpread, &rev2, &s).len(),
            2,
            "rev 1 pods do not count"
        );
        let rev1 = pod("d", "new")
            .label("app", "web")
            .label("rev", "1")
            .spread_constraint(c)
            .build();
        assert_eq!(passing(&PodTopologySpread, &rev1, &s), vec!["b1"]);
    }

    #[test]
    fn schedule_anyway_scores_emptier_domains_higher() {
        let s = zones(&[("a1", 3), ("b1", 1), ("c1", 0)]);
        let p = web(false).build();
        assert_eq!(
            passing(&PodTopologySpread, &p, &s).len(),
            3,
            "soft constraints never filter"
        );
        let sc = scores(&PodTopologySpread, &p, &s);
        // weight ln(3+2) = 1.609: raw a = round(4.83) = 5, b = 2, c = 0; max 5, min 0:
        // 100*(5-5)/5 = 0, 100*(5-2)/5 = 60, 100.
        assert_eq!(
            sc,
            vec![("a1".into(), 0), ("b1".into(), 60), ("c1".into(), 100)]
        );
    }

    #[test]
    fn schedule_anyway_gives_nodes_without_the_key_zero() {
        let s = snapshot(
            vec![node("a1").zone("a").build(), node("bare").build()],
            vec![],
        );
        let sc = scores(&PodTopologySpread, &web(false).build(), &s);
        assert_eq!(sc, vec![("a1".into(), 100), ("bare".into(), 0)]);
    }

    #[test]
    fn schedule_anyway_by_hostname_counts_each_node() {
        let s = zones(&[("a1", 2), ("b1", 0), ("c1", 1)]);
        let p = pod("d", "new")
            .label("app", "web")
            .spread(1, HOSTNAME, labels(&[("app", "web")]), false)
            .build();
        // 3 nodes: weight ln(5); raw a1 = round(3.2) = 3, b1 = 0, c1 = round(1.6) = 2.
        assert_eq!(
            scores(&PodTopologySpread, &p, &s),
            vec![("a1".into(), 0), ("b1".into(), 100), ("c1".into(), 33)]
        );
    }
}
