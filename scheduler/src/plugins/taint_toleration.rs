//! TaintToleration: a node's NoSchedule and NoExecute taints keep out pods that do not tolerate
//! them (filter); PreferNoSchedule taints only lower the node's score.

use k8s_openapi::api::core::v1::{Taint, Toleration};

use super::{FnFilter, default_normalize};
use crate::framework::{FilterPlugin, NodeFilter, ScorePlugin};
use crate::snapshot::{ClusterSnapshot, NodeInfo, PodInfo};

pub struct TaintToleration;

/// Whether a toleration tolerates a taint (`Toleration.ToleratesTaint`): same effect unless the
/// toleration names none, same key unless it names none, and `Exists` or an equal value
/// (`Equal` is the default operator).
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or("");
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or("");
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("") {
        "" | "Equal" => {
            toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        "Exists" => true,
        _ => false,
    }
}

/// The first taint (in the node's order) with an effect in `effects` that no toleration
/// tolerates (`FindMatchingUntoleratedTaint`).
pub fn find_untolerated_taint<'a>(
    taints: &'a [Taint],
    tolerations: &[Toleration],
    effects: &[&str],
) -> Option<&'a Taint> {
    taints
        .iter()
        .filter(|t| effects.contains(&t.effect.as_str()))
        .find(|taint| !tolerations.iter().any(|t| tolerates(t, taint)))
}

impl FilterPlugin for TaintToleration {
    fn name(&self) -> &'static str {
        "TaintToleration"
    }

    fn prepare<'a>(&'a self, pod: &'a PodInfo, _: &'a ClusterSnapshot) -> Box<dyn NodeFilter + 'a> {
        Box::new(FnFilter(
            move |node: &NodeInfo| match find_untolerated_taint(
                &node.taints,
                &pod.tolerations,
                &["NoSchedule", "NoExecute"],
            ) {
                Some(taint) => Err(vec![format!(
                    "node(s) had untolerated taint {{{}: {}}}",
                    taint.key,
                    taint.value.as_deref().unwrap_or("")
                )]),
                None => Ok(()),
            },
        ))
    }
}

impl ScorePlugin for TaintToleration {
    fn name(&self) -> &'static str {
        "TaintToleration"
    }

    /// Counts the PreferNoSchedule taints the pod does not tolerate (only tolerations with no
    /// effect or PreferNoSchedule count), then reverse-normalises: fewest taints score 100.
    fn score(&self, pod: &PodInfo, _: &ClusterSnapshot, nodes: &[&NodeInfo]) -> Vec<i64> {
        let tolerations: Vec<Toleration> = pod
            .tolerations
            .iter()
            .filter(|t| {
                matches!(
                    t.effect.as_deref(),
                    None | Some("") | Some("PreferNoSchedule")
                )
            })
            .cloned()
            .collect();
        let mut scores: Vec<i64> = nodes
            .iter()
            .map(|node| {
                node.taints
                    .iter()
                    .filter(|taint| taint.effect == "PreferNoSchedule")
                    .filter(|taint| !tolerations.iter().any(|t| tolerates(t, taint)))
                    .count() as i64
            })
            .collect();
        default_normalize(&mut scores, true);
        scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{node, pod};
    use crate::plugins::testing::{filter, passing, scores, snapshot};

    #[test]
    fn no_schedule_and_no_execute_taints_filter_with_the_first_untolerated_named() {
        let s = snapshot(
            vec![
                node("cp")
                    .taint("node-role.kubernetes.io/control-plane", "", "NoSchedule")
                    .build(),
                node("gpu").taint("gpu", "true", "NoExecute").build(),
                node("soft")
                    .taint("spot", "yes", "PreferNoSchedule")
                    .build(),
                node("plain").build(),
            ],
            vec![],
        );
        let plain = pod("d", "p").build();
        assert_eq!(passing(&TaintToleration, &plain, &s), vec!["soft", "plain"]);
        assert_eq!(
            filter(&TaintToleration, &plain, &s, "cp"),
            Err(vec![
                "node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }"
                    .to_string()
            ])
        );
        assert_eq!(
            filter(&TaintToleration, &plain, &s, "gpu"),
            Err(vec![
                "node(s) had untolerated taint {gpu: true}".to_string()
            ])
        );
    }

    #[test]
    fn toleration_matching_rules() {
        let taint = |k: &str, v: &str, e: &str| Taint {
            key: k.into(),
            value: Some(v.into()).filter(|v: &String| !v.is_empty()),
            effect: e.into(),
            time_added: None,
        };
        let tol = |k: &str, op: &str, v: &str, e: &str| Toleration {
            key: Some(k.into()).filter(|s: &String| !s.is_empty()),
            operator: Some(op.into()).filter(|s: &String| !s.is_empty()),
            value: Some(v.into()).filter(|s: &String| !s.is_empty()),
            effect: Some(e.into()).filter(|s: &String| !s.is_empty()),
            toleration_seconds: None,
        };
        let gpu = taint("gpu", "true", "NoSchedule");
        assert!(tolerates(&tol("gpu", "Equal", "true", "NoSchedule"), &gpu));
        assert!(
            tolerates(&tol("gpu", "", "true", ""), &gpu),
            "Equal is the default, any effect"
        );
        assert!(!tolerates(
            &tol("gpu", "Equal", "false", "NoSchedule"),
            &gpu
        ));
        assert!(tolerates(&tol("gpu", "Exists", "", "NoSchedule"), &gpu));
        assert!(!tolerates(&tol("gpu", "Exists", "", "NoExecute"), &gpu));
        assert!(
            tolerates(&tol("", "Exists", "", ""), &gpu),
            "empty key + Exists tolerates all"
        );
        assert!(!tolerates(&tol("other", "Exists", "", ""), &gpu));
        assert!(!tolerates(&tol("gpu", "Bogus", "true", ""), &gpu));
        // A valueless taint is tolerated by Equal with an empty value.
        assert!(tolerates(
            &tol("k", "Equal", "", ""),
            &taint("k", "", "NoSchedule")
        ));
    }

    #[test]
    fn tolerated_taints_let_the_pod_in() {
        let s = snapshot(
            vec![
                node("gpu")
                    .taint("gpu", "true", "NoExecute")
                    .taint("b", "", "NoSchedule")
                    .build(),
            ],
            vec![],
        );
        let one = pod("d", "p")
            .toleration("gpu", "Equal", "true", "NoExecute")
            .build();
        assert_eq!(
            filter(&TaintToleration, &one, &s, "gpu"),
            Err(vec!["node(s) had untolerated taint {b: }".to_string()])
        );
        let both = pod("d", "p")
            .toleration("gpu", "Equal", "true", "NoExecute")
            .toleration("b", "Exists", "", "")
            .build();
        assert_eq!(filter(&TaintToleration, &both, &s, "gpu"), Ok(()));
    }

    #[test]
    fn prefer_no_schedule_only_lowers_the_score() {
        let s = snapshot(
            vec![
                node("two")
                    .taint("a", "", "PreferNoSchedule")
                    .taint("b", "", "PreferNoSchedule")
                    .build(),
                node("one")
                    .taint("a", "", "PreferNoSchedule")
                    .taint("hard", "", "NoSchedule")
                    .build(),
                node("none").build(),
            ],
            vec![],
        );
        let plain = pod("d", "p").build();
        assert_eq!(
            scores(&TaintToleration, &plain, &s),
            vec![("two".into(), 0), ("one".into(), 50), ("none".into(), 100)]
        );
        // Tolerating "a" (effect PreferNoSchedule) leaves only b; a NoSchedule toleration does not count.
        let tolerant = pod("d", "p")
            .toleration("a", "Exists", "", "PreferNoSchedule")
            .toleration("b", "Exists", "", "NoSchedule")
            .build();
        assert_eq!(
            scores(&TaintToleration, &tolerant, &s),
            vec![("two".into(), 0), ("one".into(), 100), ("none".into(), 100)]
        );
    }
}
