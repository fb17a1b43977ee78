//! NodeAffinity: `spec.nodeSelector` and required node affinity filter nodes; preferred node
//! affinity scores them (sum of the weights of the matching terms, normalised to 0-100).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm};

use super::{FnFilter, default_normalize};
use crate::framework::{FilterPlugin, NodeFilter, ScorePlugin};
use crate::snapshot::{ClusterSnapshot, NodeInfo, PodInfo};

pub const REASON: &str = "node(s) didn't match Pod's node affinity/selector";

pub struct NodeAffinity;

/// Evaluates one requirement against node labels; `None` when the requirement is malformed
/// (wrong number of values, unknown operator, non-integer Gt/Lt value): Kubernetes then drops
/// the whole term, so it matches nothing.
fn label_requirement_matches(
    req: &NodeSelectorRequirement,
    labels: &BTreeMap<String, String>,
) -> Option<bool> {
    let values = req.values.as_deref().unwrap_or(&[]);
    let value = labels.get(&req.key);
    match req.operator.as_str() {
        "In" if !values.is_empty() => Some(value.is_some_and(|v| values.contains(v))),
        "NotIn" if !values.is_empty() => Some(value.is_none_or(|v| !values.contains(v))),
        "Exists" if values.is_empty() => Some(value.is_some()),
        "DoesNotExist" if values.is_empty() => Some(value.is_none()),
        op @ ("Gt" | "Lt") if values.len() == 1 => {
            let want: i64 = values[0].parse().ok()?;
            // A node whose label is missing or not an integer does not match.
            let Some(have) = value.and_then(|v| v.parse::<i64>().ok()) else {
                return Some(false);
            };
            Some(if op == "Gt" { have > want } else { have < want })
        }
        _ => None,
    }
}

/// matchFields supports only `metadata.name` with In/NotIn and exactly one value.
fn field_requirement_matches(req: &NodeSelectorRequirement, node_name: &str) -> Option<bool> {
    let values = req.values.as_deref().unwrap_or(&[]);
    if req.key != "metadata.name" || values.len() != 1 {
        return None;
    }
    match req.operator.as_str() {
        "In" => Some(values[0] == node_name),
        "NotIn" => Some(values[0] != node_name),
        _ => None,
    }
}

/// Whether a node selector term matches: all its expressions and fields hold. A term with
/// neither matches nothing; a malformed term matches nothing.
pub fn node_selector_term_matches(term: &NodeSelectorTerm, node: &NodeInfo) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or(&[]);
    let fields = term.match_fields.as_deref().unwrap_or(&[]);
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    expressions
        .iter()
        .all(|r| label_requirement_matches(r, &node.labels) == Some(true))
        && fields
            .iter()
            .all(|r| field_requirement_matches(r, &node.name) == Some(true))
}

/// Whether `node` satisfies the pod's `nodeSelector` and its required node affinity (any term).
pub fn node_matches_pod_selectors(pod: &PodInfo, node: &NodeInfo) -> bool {
    let selector_ok = pod
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    selector_ok
        && pod.required_node_affinity.as_ref().is_none_or(|required| {
            required
                .node_selector_terms
                .iter()
                .any(|term| node_selector_term_matches(term, node))
        })
}

impl FilterPlugin for NodeAffinity {
    fn name(&self) -> &'static str {
        "NodeAffinity"
    }

    fn prepare<'a>(&'a self, pod: &'a PodInfo, _: &'a ClusterSnapshot) -> Box<dyn NodeFilter + 'a> {
        Box::new(FnFilter(move |node: &NodeInfo| {
            if node_matches_pod_selectors(pod, node) {
                Ok(())
            } else {
                Err(vec![REASON.to_string()])
            }
        }))
    }
}

impl ScorePlugin for NodeAffinity {
    fn name(&self) -> &'static str {
        "NodeAffinity"
    }

    fn score(&self, pod: &PodInfo, _: &ClusterSnapshot, nodes: &[&NodeInfo]) -> Vec<i64> {
        let mut scores: Vec<i64> = nodes
            .iter()
            .map(|node| {
                pod.preferred_node_affinity
                    .iter()
                    .filter(|t| t.weight != 0 && node_selector_term_matches(&t.preference, node))
                    .map(|t| i64::from(t.weight))
                    .sum()
            })
            .collect();
        default_normalize(&mut scores, false);
        scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{node, pod, requirement as req};
    use crate::plugins::testing::{filter, passing, scores, snapshot};

    fn nodes() -> ClusterSnapshot {
        snapshot(
            vec![
                node("a")
                    .zone("z1")
                    .label("disk", "ssd")
                    .label("cores", "8")
                    .build(),
                node("b")
                    .zone("z2")
                    .label("disk", "hdd")
                    .label("cores", "32")
                    .build(),
                node("c").zone("z3").build(),
            ],
            vec![],
        )
    }

    #[test]
    fn node_selector_needs_every_label() {
        let s = nodes();
        let p = pod("d", "p").node_selector("disk", "ssd").build();
        assert_eq!(passing(&NodeAffinity, &p, &s), vec!["a"]);
        assert_eq!(
            filter(&NodeAffinity, &p, &s, "b"),
            Err(vec![REASON.to_string()])
        );
        let both = pod("d", "p")
            .node_selector("disk", "ssd")
            .node_selector("topology.kubernetes.io/zone", "z2")
            .build();
        assert!(passing(&NodeAffinity, &both, &s).is_empty());
    }

    #[test]
    fn every_operator() {
        let s = nodes();
        let only = |r| {
            passing(
                &NodeAffinity,
                &pod("d", "p").required_node_term(vec![r], vec![]).build(),
                &s,
            )
        };
        assert_eq!(only(req("disk", "In", &["ssd", "nvme"])), vec!["a"]);
        assert_eq!(
            only(req("disk", "NotIn", &["ssd"])),
            vec!["b", "c"],
            "NotIn matches a missing label"
        );
        assert_eq!(only(req("disk", "Exists", &[])), vec!["a", "b"]);
        assert_eq!(only(req("disk", "DoesNotExist", &[])), vec!["c"]);
        assert_eq!(only(req("cores", "Gt", &["8"])), vec!["b"]);
        assert_eq!(only(req("cores", "Lt", &["32"])), vec!["a"]);
        assert!(
            only(req("cores", "Gt", &["eight"])).is_empty(),
            "malformed Gt matches nothing"
        );
        assert!(
            only(req("disk", "In", &[])).is_empty(),
            "In without values matches nothing"
        );
        assert!(only(req("disk", "Exists", &["x"])).is_empty());
        assert!(only(req("disk", "Like", &["ssd"])).is_empty());
    }

    #[test]
    fn terms_are_ored_and_requirements_anded() {
        let s = nodes();
        let p = pod("d", "p")
            .required_node_term(
                vec![req("disk", "Exists", &[]), req("cores", "Gt", &["16"])],
                vec![],
            )
            .required_node_term(
                vec![req("topology.kubernetes.io/zone", "In", &["z3"])],
                vec![],
            )
            .build();
        assert_eq!(passing(&NodeAffinity, &p, &s), vec!["b", "c"]);
        // An empty term matches nothing (it does not match everything).
        let empty = pod("d", "p").required_node_term(vec![], vec![]).build();
        assert!(passing(&NodeAffinity, &empty, &s).is_empty());
    }

    #[test]
    fn match_fields_on_metadata_name() {
        let s = nodes();
        let p = pod("d", "p")
            .required_node_term(vec![], vec![req("metadata.name", "In", &["c"])])
            .build();
        assert_eq!(passing(&NodeAffinity, &p, &s), vec!["c"]);
        let not = pod("d", "p")
            .required_node_term(vec![], vec![req("metadata.name", "NotIn", &["c"])])
            .build();
        assert_eq!(passing(&NodeAffinity, &not, &s), vec!["a", "b"]);
        let other_field = pod("d", "p")
            .required_node_term(vec![], vec![req("metadata.uid", "In", &["c"])])
            .build();
        assert!(passing(&NodeAffinity, &other_field, &s).is_empty());
    }

    #[test]
    fn preferred_terms_sum_weights_and_normalise() {
        let s = nodes();
        let p = pod("d", "p")
            .preferred_node_term(20, vec![req("disk", "Exists", &[])])
            .preferred_node_term(60, vec![req("cores", "Gt", &["16"])])
            .build();
        // a: 20, b: 80 (max), c: 0 -> 25, 100, 0.
        assert_eq!(
            scores(&NodeAffinity, &p, &s),
            vec![("a".into(), 25), ("b".into(), 100), ("c".into(), 0)]
        );
        let none = pod("d", "p").build();
        assert!(
            scores(&NodeAffinity, &none, &s)
                .iter()
                .all(|(_, v)| *v == 0)
        );
    }
}
