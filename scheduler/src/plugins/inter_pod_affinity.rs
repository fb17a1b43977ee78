//! InterPodAffinity: required pod affinity ("X and Y in the same topology domain") and
//! anti-affinity ("never together"), including existing pods' anti-affinity against the incoming
//! pod (symmetric); preferred terms of both sides score.

use std::collections::HashMap;

use crate::framework::{FilterPlugin, MAX_NODE_SCORE, NodeFilter, ScorePlugin};
use crate::snapshot::{AffinityTerm, ClusterSnapshot, NodeInfo, PodInfo, WeightedAffinityTerm};

pub const REASON_AFFINITY: &str = "node(s) didn't match pod affinity rules";
pub const REASON_ANTI_AFFINITY: &str = "node(s) didn't match pod anti-affinity rules";
pub const REASON_EXISTING_ANTI_AFFINITY: &str =
    "node(s) didn't satisfy existing pods anti-affinity rules";

/// kube-scheduler's `hardPodAffinityWeight` default: an existing pod's *required* affinity to the
/// incoming pod also pulls it (weakly) when scoring.
const HARD_POD_AFFINITY_WEIGHT: i64 = 1;

pub struct InterPodAffinity;

/// Counts per (topology key, topology value).
type TopologyCounts<'a> = HashMap<(&'a str, &'a str), i64>;

fn bump<'a>(counts: &mut TopologyCounts<'a>, node: &'a NodeInfo, key: &'a str, by: i64) {
    if let Some(value) = node.labels.get(key) {
        *counts.entry((key, value.as_str())).or_insert(0) += by;
    }
}

struct AffinityFilter<'a> {
    pod: &'a PodInfo,
    /// Domains holding pods that match all of the incoming pod's affinity terms.
    affinity: TopologyCounts<'a>,
    /// Domains holding pods that match one of the incoming pod's anti-affinity terms.
    anti_affinity: TopologyCounts<'a>,
    /// Domains whose existing pods' anti-affinity terms select the incoming pod.
    existing_anti_affinity: TopologyCounts<'a>,
    /// The incoming pod matches all its own affinity terms (it may start a group).
    matches_own_affinity: bool,
}

impl NodeFilter for AffinityFilter<'_> {
    fn filter(&self, node: &NodeInfo) -> Result<(), Vec<String>> {
        let count = |counts: &TopologyCounts<'_>, key: &str, value: &str| {
            counts.get(&(key, value)).copied().unwrap_or(0)
        };
        // satisfyPodAffinity: every term's key on the node, and a matching pod in each domain,
        // unless no pod anywhere matches yet and the pod matches its own terms.
        let mut pods_exist = true;
        for term in &self.pod.required_affinity {
            let Some(value) = node.labels.get(&term.topology_key) else {
                return Err(vec![REASON_AFFINITY.to_string()]);
            };
            if count(&self.affinity, &term.topology_key, value) <= 0 {
                pods_exist = false;
            }
        }
        let may_start_group = self.affinity.is_empty() && self.matches_own_affinity;
        if !(pods_exist || may_start_group) {
            return Err(vec![REASON_AFFINITY.to_string()]);
        }
        for term in &self.pod.required_anti_affinity {
            if let Some(value) = node.labels.get(&term.topology_key)
                && count(&self.anti_affinity, &term.topology_key, value) > 0
            {
                return Err(vec![REASON_ANTI_AFFINITY.to_string()]);
            }
        }
        if !self.existing_anti_affinity.is_empty() {
            for (key, value) in &node.labels {
                if count(&self.existing_anti_affinity, key, value) > 0 {
                    return Err(vec![REASON_EXISTING_ANTI_AFFINITY.to_string()]);
                }
            }
        }
        Ok(())
    }
}

impl FilterPlugin for InterPodAffinity {
    fn name(&self) -> &'static str {
        "InterPodAffinity"
    }

    fn prepare<'a>(
        &'a self,
        pod: &'a PodInfo,
        snapshot: &'a ClusterSnapshot,
    ) -> Box<dyn NodeFilter + 'a> {
        let mut state = AffinityFilter {
            pod,
            affinity: HashMap::new(),
            anti_affinity: HashMap::new(),
            existing_anti_affinity: HashMap::new(),
            matches_own_affinity: pod
                .required_affinity
                .iter()
                .all(|t| t.matches(pod, snapshot)),
        };
        let own_terms = !pod.required_affinity.is_empty() || !pod.required_anti_affinity.is_empty();
        if !own_terms && !snapshot.any_pod_has_affinity() {
            return Box::new(state);
        }
        for node in snapshot.nodes() {
            for &i in &node.pods_with_required_anti_affinity {
                for term in &node.pods[i].required_anti_affinity {
                    if term.matches(pod, snapshot) {
                        bump(
                            &mut state.existing_anti_affinity,
                            node,
                            &term.topology_key,
                            1,
                        );
                    }
                }
            }
            if !own_terms {
                continue;
            }
            for existing in &node.pods {
                if !pod.required_affinity.is_empty()
                    && pod
                        .required_affinity
                        .iter()
                        .all(|t| t.matches(existing, snapshot))
                {
                    for term in &pod.required_affinity {
                        bump(&mut state.affinity, node, &term.topology_key, 1);
                    }
                }
                for term in &pod.required_anti_affinity {
                    if term.matches(existing, snapshot) {
                        bump(&mut state.anti_affinity, node, &term.topology_key, 1);
                    }
                }
            }
        }
        Box::new(state)
    }
}

fn add_terms<'a>(
    scores: &mut TopologyCounts<'a>,
    terms: &'a [WeightedAffinityTerm],
    target: &PodInfo,
    node: &'a NodeInfo,
    sign: i64,
    snapshot: &ClusterSnapshot,
) {
    for WeightedAffinityTerm { term, weight } in terms {
        if term.matches(target, snapshot) {
            bump(scores, node, &term.topology_key, weight * sign);
        }
    }
}

fn add_required<'a>(
    scores: &mut TopologyCounts<'a>,
    terms: &'a [AffinityTerm],
    target: &PodInfo,
    node: &'a NodeInfo,
    snapshot: &ClusterSnapshot,
) {
    for term in terms {
        if term.matches(target, snapshot) {
            bump(scores, node, &term.topology_key, HARD_POD_AFFINITY_WEIGHT);
        }
    }
}

impl ScorePlugin for InterPodAffinity {
    fn name(&self) -> &'static str {
        "InterPodAffinity"
    }

    /// Sums, per topology domain, the weights of the incoming pod's preferred terms that existing
    /// pods match (anti-affinity subtracts), and of existing pods' preferred terms (and, with
    /// weight 1, required affinity terms) that the incoming pod matches; a node scores the sum
    /// over its domains, then min-max normalised to 0-100.
    fn score(&self, pod: &PodInfo, snapshot: &ClusterSnapshot, nodes: &[&NodeInfo]) -> Vec<i64> {
        let own_preferences =
            !pod.preferred_affinity.is_empty() || !pod.preferred_anti_affinity.is_empty();
        if !own_preferences && !snapshot.any_pod_has_affinity() {
            return vec![0; nodes.len()];
        }
        let mut topology: TopologyCounts<'_> = HashMap::new();
        for node in snapshot.nodes() {
            if node.labels.is_empty() {
                continue;
            }
            let mut process = |existing: &PodInfo| {
                add_terms(
                    &mut topology,
                    &pod.preferred_affinity,
                    existing,
                    node,
                    1,
                    snapshot,
                );
                add_terms(
                    &mut topology,
                    &pod.preferred_anti_affinity,
                    existing,
                    node,
                    -1,
                    snapshot,
                );
            };
            if own_preferences {
                node.pods.iter().for_each(&mut process);
            }
            for &i in &node.pods_with_affinity {
                let existing = &node.pods[i];
                add_required(
                    &mut topology,
                    &existing.required_affinity,
                    pod,
                    node,
                    snapshot,
                );
                add_terms(
                    &mut topology,
                    &existing.preferred_affinity,
                    pod,
                    node,
                    1,
                    snapshot,
                );
                add_terms(
                    &mut topology,
                    &existing.preferred_anti_affinity,
                    pod,
                    node,
                    -1,
                    snapshot,
                );
            }
        }
        if topology.is_empty() {
            return vec![0; nodes.len()];
        }
        let raw: Vec<i64> = nodes
            .iter()
            .map(|node| {
                node.labels
                    .iter()
                    .map(|(k, v)| {
                        topology
                            .get(&(k.as_str(), v.as_str()))
                            .copied()
                            .unwrap_or(0)
                    })
                    .sum()
            })
            .collect();
        let max = raw.iter().copied().max().unwrap_or(0);
        let min = raw.iter().copied().min().unwrap_or(0);
        let spread = max - min;
        raw.iter()
            .map(|s| {
                if spread > 0 {
                    (MAX_NODE_SCORE as f64 * ((s - min) as f64 / spread as f64)) as i64
                } else {
                    0
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{HOSTNAME, ZONE, labels, node, pod, term};
    use crate::plugins::testing::{filter, passing, scores, snapshot};
    use k8s_openapi::api::core::v1::{Namespace, PodAffinityTerm};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

    fn cluster(pods: Vec<k8s_openapi::api::core::v1::Pod>) -> ClusterSnapshot {
        snapshot(
            vec![
                node("a1").zone("a").build(),
                node("a2").zone("a").build(),
                node("b1").zone("b").build(),
                node("nozone").build(),
            ],
            pods,
        )
    }

    #[test]
    fn anti_affinity_keeps_matching_pods_apart_per_topology_key() {
        let s = cluster(vec![
            pod("d", "web-0")
                .label("app", "web")
                .node_name("a1")
                .build(),
        ]);
        let by_host = pod("d", "web-1")
            .label("app", "web")
            .pod_anti_affinity(term(labels(&[("app", "web")]), HOSTNAME))
            .build();
        assert_eq!(
            passing(&InterPodAffinity, &by_host, &s),
            vec!["a2", "b1", "nozone"]
        );
        assert_eq!(
            filter(&InterPodAffinity, &by_host, &s, "a1"),
            Err(vec![REASON_ANTI_AFFINITY.to_string()])
        );
        let by_zone = pod("d", "web-1")
            .label("app", "web")
            .pod_anti_affinity(term(labels(&[("app", "web")]), ZONE))
            .build();
        // A node without the key is not in any zone, so it does not conflict.
        assert_eq!(
            passing(&InterPodAffinity, &by_zone, &s),
            vec!["b1", "nozone"]
        );
    }

    #[test]
    fn existing_pods_anti_affinity_is_symmetric() {
        let loner = pod("d", "loner")
            .label("app", "loner")
            .pod_anti_affinity(term(labels(&[("app", "web")]), ZONE))
            .node_name("a1")
            .build();
        let s = cluster(vec![loner]);
        // A plain web pod has no terms of its own but may not join zone a.
        let plain = pod("d", "web").label("app", "web").build();
        assert_eq!(passing(&InterPodAffinity, &plain, &s), vec!["b1", "nozone"]);
        assert_eq!(
            filter(&InterPodAffinity, &plain, &s, "a2"),
            Err(vec![REASON_EXISTING_ANTI_AFFINITY.to_string()])
        );
        // A pod in another namespace is not selected by the loner's term (its own namespace).
        let elsewhere = pod("other", "web").label("app", "web").build();
        assert_eq!(passing(&InterPodAffinity, &elsewhere, &s).len(), 4);
    }

    #[test]
    fn affinity_needs_a_matching_pod_in_the_same_domain() {
        let s = cluster(vec![
            pod("d", "cache")
                .label("app", "cache")
                .node_name("a1")
                .build(),
        ]);
        let by_host = pod("d", "web")
            .label("app", "web")
            .pod_affinity(term(labels(&[("app", "cache")]), HOSTNAME))
            .build();
        assert_eq!(passing(&InterPodAffinity, &by_host, &s), vec!["a1"]);
        assert_eq!(
            filter(&InterPodAffinity, &by_host, &s, "b1"),
            Err(vec![REASON_AFFINITY.to_string()])
        );
        let by_zone = pod("d", "web")
            .label("app", "web")
            .pod_affinity(term(labels(&[("app", "cache")]), ZONE))
            .build();
        assert_eq!(passing(&InterPodAffinity, &by_zone, &s), vec!["a1", "a2"]);
    }

    #[test]
    fn the_first_pod_of_a_self_affine_group_may_go_anywhere_with_the_key() {
        let s = cluster(vec![]);
        let first = pod("d", "web-0")
            .label("app", "web")
            .pod_affinity(term(labels(&[("app", "web")]), ZONE))
            .build();
        assert_eq!(
            passing(&InterPodAffinity, &first, &s),
            vec!["a1", "a2", "b1"]
        );
        // But not when the pod does not match its own term: it waits for a matching pod.
        let waits = pod("d", "web-0")
            .label("app", "web")
            .pod_affinity(term(labels(&[("app", "db")]), ZONE))
            .build();
        assert!(passing(&InterPodAffinity, &waits, &s).is_empty());
    }

    #[test]
    fn affinity_needs_one_pod_matching_all_terms() {
        // cache matches the first term only, db the second only: no pod matches both.
        let s = cluster(vec![
            pod("d", "cache")
                .label("app", "cache")
                .node_name("a1")
                .build(),
            pod("d", "db").label("tier", "db").node_name("a1").build(),
        ]);
        let p = pod("d", "web")
            .pod_affinity(term(labels(&[("app", "cache")]), HOSTNAME))
            .pod_affinity(term(labels(&[("tier", "db")]), HOSTNAME))
            .build();
        assert!(passing(&InterPodAffinity, &p, &s).is_empty());
    }

    #[test]
    fn namespaces_explicit_and_by_selector() {
        let s = cluster(vec![
            pod("cache-ns", "cache")
                .label("app", "cache")
                .node_name("b1")
                .build(),
        ])
        .with_namespaces(&[Namespace {
            metadata: ObjectMeta {
                name: Some("cache-ns".into()),
                labels: Some([("team".to_string(), "infra".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }]);
        let own_ns = pod("d", "web")
            .pod_affinity(term(labels(&[("app", "cache")]), HOSTNAME))
            .build();
        assert!(
            passing(&InterPodAffinity, &own_ns, &s).is_empty(),
            "default is the pod's own namespace"
        );
        let mut named = term(labels(&[("app", "cache")]), HOSTNAME);
        named.namespaces = Some(vec!["cache-ns".into()]);
        assert_eq!(
            passing(
                &InterPodAffinity,
                &pod("d", "web").pod_affinity(named).build(),
                &s
            ),
            vec!["b1"]
        );
        let by_selector = PodAffinityTerm {
            namespace_selector: Some(labels(&[("team", "infra")])),
            ..term(labels(&[("app", "cache")]), HOSTNAME)
        };
        assert_eq!(
            passing(
                &InterPodAffinity,
                &pod("d", "web").pod_affinity(by_selector).build(),
                &s
            ),
            vec!["b1"]
        );
        let all = PodAffinityTerm {
            namespace_selector: Some(LabelSelector::default()),
            ..term(labels(&[("app", "cache")]), HOSTNAME)
        };
        assert_eq!(
            passing(
                &InterPodAffinity,
                &pod("d", "web").pod_affinity(all).build(),
                &s
            ),
            vec!["b1"]
        );
        let wrong = PodAffinityTerm {
            namespace_selector: Some(labels(&[("team", "web")])),
            ..term(labels(&[("app", "cache")]), HOSTNAME)
        };
        assert!(
            passing(
                &InterPodAffinity,
                &pod("d", "web").pod_affinity(wrong).build(),
                &s
            )
            .is_empty()
        );
    }

    #[test]
    fn a_term_without_label_selector_selects_nothing() {
        let s = cluster(vec![
            pod("d", "x").label("app", "x").node_name("a1").build(),
        ]);
        let nil = PodAffinityTerm {
            topology_key: HOSTNAME.into(),
            ..Default::default()
        };
        let p = pod("d", "p").pod_anti_affinity(nil).build();
        assert_eq!(passing(&InterPodAffinity, &p, &s).len(), 4);
    }

    #[test]
    fn preferred_terms_of_both_sides_score() {
        let s = cluster(vec![
            pod("d", "cache")
                .label("app", "cache")
                .node_name("a1")
                .build(),
            pod("d", "noisy")
                .label("app", "noisy")
                .node_name("b1")
                .build(),
        ]);
        let p = pod("d", "web")
            .label("app", "web")
            .preferred_pod_affinity(10, term(labels(&[("app", "cache")]), ZONE))
            .preferred_pod_anti_affinity(5, term(labels(&[("app", "noisy")]), ZONE))
            .build();
        // a: +10, b: -5, nozone: 0 -> min -5, max 10: a 100, a2 100, b 0, nozone 33.
        assert_eq!(
            scores(&InterPodAffinity, &p, &s),
            vec![
                ("a1".into(), 100),
                ("a2".into(), 100),
                ("b1".into(), 0),
                ("nozone".into(), 33)
            ]
        );
        // The other side: an existing pod that prefers web pods near it pulls them.
        let s = cluster(vec![
            pod("d", "friend")
                .preferred_pod_affinity(50, term(labels(&[("app", "web")]), HOSTNAME))
                .node_name("b1")
                .build(),
        ]);
        let plain = pod("d", "web").label("app", "web").build();
        let sc = scores(&InterPodAffinity, &plain, &s);
        assert_eq!(sc[2], ("b1".into(), 100));
        assert!(sc.iter().filter(|(n, _)| n != "b1").all(|(_, v)| *v == 0));
    }

    #[test]
    fn existing_pods_required_affinity_pulls_with_weight_one() {
        let s = cluster(vec![
            pod("d", "friend")
                .pod_affinity(term(labels(&[("app", "web")]), HOSTNAME))
                .node_name("b1")
                .build(),
        ]);
        let web = pod("d", "web").label("app", "web").build();
        assert_eq!(
            scores(&InterPodAffinity, &web, &s),
            vec![
                ("a1".into(), 0),
                ("a2".into(), 0),
                ("b1".into(), 100),
                ("nozone".into(), 0)
            ]
        );
        // A pod the term does not select gets no pull.
        let db = pod("d", "db").label("app", "db").build();
        assert!(
            scores(&InterPodAffinity, &db, &s)
                .iter()
                .all(|(_, v)| *v == 0)
        );
    }
}
