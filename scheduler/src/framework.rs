//! The filter/score framework: plugins, the scheduling cycle, and its results.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Pod;

use crate::plugins;
use crate::snapshot::{ClusterSnapshot, NodeInfo, PodInfo};

/// The highest score a score plugin gives a node (kube-scheduler's `MaxNodeScore`).
pub const MAX_NODE_SCORE: i64 = 100;

/// A filter plugin: decides, node by node, whether the pod may run there.
pub trait FilterPlugin: Send + Sync {
    /// The plugin's name as kube-scheduler calls it (`NodeResourcesFit`, ...).
    fn name(&self) -> &'static str;

    /// Does the per-pod work once (kube-scheduler's PreFilter: e.g. counting matching pods per
    /// topology domain) and returns the per-node check.
    fn prepare<'a>(
        &'a self,
        pod: &'a PodInfo,
        snapshot: &'a ClusterSnapshot,
    ) -> Box<dyn NodeFilter + 'a>;
}

/// The per-node check a [`FilterPlugin`] prepared for one pod.
pub trait NodeFilter {
    /// `Err(reasons)` when the pod may not run on `node`; each reason is a phrase of
    /// kube-scheduler's (e.g. `Insufficient cpu`), counted in [`Unschedulable::reasons`].
    fn filter(&self, node: &NodeInfo) -> Result<(), Vec<String>>;
}

/// A score plugin: ranks the nodes that passed every filter.
pub trait ScorePlugin: Send + Sync {
    fn name(&self) -> &'static str;

    /// One score per node of `nodes`, in order, already normalised to `0..=MAX_NODE_SCORE` the
    /// way the kube-scheduler plugin of the same name normalises it.
    fn score(&self, pod: &PodInfo, snapshot: &ClusterSnapshot, nodes: &[&NodeInfo]) -> Vec<i64>;
}

/// One node's scores: the weighted total and each plugin's normalised score (before weighting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeScore {
    pub node: String,
    pub total: i64,
    pub plugins: Vec<(&'static str, i64)>,
}

/// Where the pod should go, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleResult {
    pub node: String,
    /// Every node that passed the filters, in snapshot order.
    pub scores: Vec<NodeScore>,
}

/// The pod fits on no node. `message` is kube-scheduler's FitError text (without the
/// "preemption: ..." part), which `kubectl describe pod` shows in the FailedScheduling event and
/// the PodScheduled=False condition:
/// `0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint {k: v}.`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    pub message: String,
    /// Each reason with the number of nodes that gave it (a node can give several, e.g.
    /// `Insufficient cpu` and `Insufficient memory`; only the first failing plugin's count).
    pub reasons: BTreeMap<String, usize>,
    /// Nodes in the snapshot.
    pub nodes: usize,
}

impl Unschedulable {
    /// Formats as kube-scheduler's `FitError.Error()`: `"<count> <reason>"` strings sorted as
    /// strings, joined with ", ".
    pub fn new(nodes: usize, reasons: BTreeMap<String, usize>) -> Unschedulable {
        let message = if nodes == 0 {
            // kube-scheduler's ErrNoNodesAvailable.
            "no nodes available to schedule pods".to_string()
        } else {
            let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
            parts.sort();
            format!("0/{nodes} nodes are available: {}.", parts.join(", "))
        };
        Unschedulable {
            message,
            reasons,
            nodes,
        }
    }
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Unschedulable {}

/// Why a pod was not given a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// No node passes the filters; retry when the cluster changes.
    #[error("{0}")]
    Unschedulable(Unschedulable),
    /// The pod's spec has a bad quantity or selector (the apiserver should have refused it);
    /// retrying will not help until the pod is fixed.
    #[error("cannot schedule pod {pod}: {problems}; fix the pod spec")]
    InvalidPod { pod: String, problems: String },
}

/// A score plugin with its weight.
pub struct WeightedScorePlugin {
    pub plugin: Box<dyn ScorePlugin>,
    pub weight: i64,
}

/// The scheduler: filters in order (a node fails at the first filter that rejects it), then
/// weighted scores summed, then the highest total wins.
///
/// Ties are broken by the smallest FNV-1a hash of (pod uid, or namespace/name without a uid;
/// node name): deterministic for one pod (the same inputs give the same node, so tests and
/// retries are reproducible), but different pods order the tied nodes differently, so many
/// identical pods spread over equally good nodes instead of piling on the first one, as
/// kube-scheduler's random choice among ties does.
#[derive(Default)]
pub struct Scheduler {
    filters: Vec<Box<dyn FilterPlugin>>,
    scores: Vec<WeightedScorePlugin>,
}

impl Scheduler {
    /// A scheduler with no plugins (every node fits, all score 0).
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    /// kube-scheduler 1.32's default profile, for the plugins skiff implements, in its order and
    /// with its weights: filters NodeUnschedulable, NodeName, TaintToleration, NodeAffinity,
    /// NodePorts, NodeResourcesFit, PodTopologySpread, InterPodAffinity; scores TaintToleration
    /// (3), NodeAffinity (2), NodeResourcesFit LeastAllocated (1), PodTopologySpread (2),
    /// InterPodAffinity (2), NodeResourcesBalancedAllocation (1).
    pub fn default_plugins() -> Scheduler {
        Scheduler::new()
            .with_filter(Box::new(plugins::NodeUnschedulable))
            .with_filter(Box::new(plugins::NodeName))
            .with_filter(Box::new(plugins::TaintToleration))
            .with_filter(Box::new(plugins::NodeAffinity))
            .with_filter(Box::new(plugins::NodePorts))
            .with_filter(Box::new(plugins::NodeResourcesFit))
            .with_filter(Box::new(plugins::PodTopologySpread))
            .with_filter(Box::new(plugins::InterPodAffinity))
            .with_score(Box::new(plugins::TaintToleration), 3)
            .with_score(Box::new(plugins::NodeAffinity), 2)
            .with_score(Box::new(plugins::NodeResourcesFit), 1)
            .with_score(Box::new(plugins::PodTopologySpread), 2)
            .with_score(Box::new(plugins::InterPodAffinity), 2)
            .with_score(Box::new(plugins::NodeResourcesBalancedAllocation), 1)
    }

    pub fn with_filter(mut self, plugin: Box<dyn FilterPlugin>) -> Scheduler {
        self.filters.push(plugin);
        self
    }

    pub fn with_score(mut self, plugin: Box<dyn ScorePlugin>, weight: i64) -> Scheduler {
        self.scores.push(WeightedScorePlugin { plugin, weight });
        self
    }

    /// Picks a node for `pod` in `snapshot`. Pure: the snapshot is not changed; call
    /// [`ClusterSnapshot::assume`] once the binding is made.
    pub fn schedule(
        &self,
        pod: &Pod,
        snapshot: &ClusterSnapshot,
    ) -> Result<ScheduleResult, ScheduleError> {
        self.schedule_info(&PodInfo::new(pod), snapshot)
    }

    /// [`Scheduler::schedule`] for a pod already parsed, so that a controller parses each pod
    /// once and hands the same [`PodInfo`] to [`ClusterSnapshot::assume_info`].
    pub fn schedule_info(
        &self,
        pod: &PodInfo,
        snapshot: &ClusterSnapshot,
    ) -> Result<ScheduleResult, ScheduleError> {
        if !pod.problems.is_empty() {
            return Err(ScheduleError::InvalidPod {
                pod: pod.key(),
                problems: pod.problems.join("; "),
            });
        }
        let nodes = snapshot.nodes();
        if nodes.is_empty() {
            return Err(ScheduleError::Unschedulable(Unschedulable::new(
                0,
                BTreeMap::new(),
            )));
        }
        let prepared: Vec<Box<dyn NodeFilter + '_>> = self
            .filters
            .iter()
            .map(|f| f.prepare(pod, snapshot))
            .collect();
        let mut feasible: Vec<&NodeInfo> = Vec::with_capacity(nodes.len());
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        'nodes: for node in nodes {
            for filter in &prepared {
                if let Err(why) = filter.filter(node) {
                    for reason in why {
                        *reasons.entry(reason).or_insert(0) += 1;
                    }
                    continue 'nodes;
                }
            }
            feasible.push(node);
        }
        if feasible.is_empty() {
            return Err(ScheduleError::Unschedulable(Unschedulable::new(
                nodes.len(),
                reasons,
            )));
        }

        let mut scores: Vec<NodeScore> = feasible
            .iter()
            .map(|n| NodeScore {
                node: n.name.clone(),
                total: 0,
                plugins: Vec::with_capacity(self.scores.len()),
            })
            .collect();
        for WeightedScorePlugin { plugin, weight } in &self.scores {
            let plugin_scores = plugin.score(pod, snapshot, &feasible);
            for (score, s) in scores.iter_mut().zip(plugin_scores) {
                score.total += s * weight;
                score.plugins.push((plugin.name(), s));
            }
        }
        let identity = if pod.uid.is_empty() {
            pod.key()
        } else {
            pod.uid.clone()
        };
        let best = scores
            .iter()
            .max_by(|a, b| {
                a.total
                    .cmp(&b.total)
                    // Reversed: the smaller hash wins the tie.
                    .then_with(|| tie_hash(&identity, &b.node).cmp(&tie_hash(&identity, &a.node)))
            })
            .map(|s| s.node.clone())
            .unwrap_or_default();
        Ok(ScheduleResult { node: best, scores })
    }
}

/// FNV-1a (64 bit) of the pod identity, a separator, and the node name. Hand-written because
/// std's hashers are not guaranteed stable across Rust releases and this must be reproducible.
fn tie_hash(pod: &str, node: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in pod.bytes().chain([0u8]).chain(node.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{node, pod};

    #[test]
    fn message_sorts_count_reason_strings_like_kube_scheduler() {
        let mut reasons = BTreeMap::new();
        reasons.insert(
            "node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }".to_string(),
            2,
        );
        reasons.insert("Insufficient cpu".to_string(), 1);
        reasons.insert("Insufficient memory".to_string(), 12);
        let u = Unschedulable::new(15, reasons);
        assert_eq!(
            u.message,
            "0/15 nodes are available: 1 Insufficient cpu, 12 Insufficient memory, \
             2 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }."
        );
    }

    #[test]
    fn no_nodes_is_kube_schedulers_no_nodes_error() {
        let err = Scheduler::default_plugins()
            .schedule(&pod("default", "p").build(), &ClusterSnapshot::default())
            .expect_err("no nodes");
        assert_eq!(err.to_string(), "no nodes available to schedule pods");
    }

    #[test]
    fn invalid_pod_is_refused_with_what_to_fix() {
        let snapshot =
            ClusterSnapshot::new(&[node("n1").allocatable("4", "8Gi", 110).build()], &[]);
        let err = Scheduler::default_plugins()
            .schedule(&pod("default", "p").request("1x", "1Gi").build(), &snapshot)
            .expect_err("bad quantity");
        let ScheduleError::InvalidPod { problems, .. } = &err else {
            panic!("wrong error {err:?}");
        };
        assert!(problems.contains("\"1x\""), "{problems}");
        assert!(err.to_string().contains("fix the pod spec"));
    }

    #[test]
    fn ties_are_broken_by_hash_so_identical_pods_spread() {
        let nodes: Vec<_> = (0..10)
            .map(|i| {
                node(&format!("n{i}"))
                    .allocatable("100", "1000Gi", 1000)
                    .build()
            })
            .collect();
        let snapshot = ClusterSnapshot::new(&nodes, &[]);
        // No plugins: every node scores 0, so only the tie-break decides.
        let scheduler = Scheduler::new();
        let mut chosen = std::collections::BTreeSet::new();
        for i in 0..50 {
            let p = pod("default", &format!("p{i}"))
                .uid(&format!("uid-{i}"))
                .build();
            let first = scheduler.schedule(&p, &snapshot).expect("fits").node;
            let again = scheduler.schedule(&p, &snapshot).expect("fits").node;
            assert_eq!(first, again, "the same pod must get the same node");
            chosen.insert(first);
        }
        assert!(
            chosen.len() >= 8,
            "50 pods over 10 tied nodes used only {chosen:?}"
        );
    }

    #[test]
    fn weights_multiply_plugin_scores() {
        let snapshot = ClusterSnapshot::new(
            &[
                node("small").allocatable("2", "4Gi", 110).build(),
                node("big").allocatable("8", "16Gi", 110).build(),
            ],
            &[],
        );
        let scheduler = Scheduler::new().with_score(Box::new(plugins::NodeResourcesFit), 5);
        let result = scheduler
            .schedule(&pod("default", "p").request("1", "1Gi").build(), &snapshot)
            .expect("fits");
        assert_eq!(result.node, "big");
        let big = result
            .scores
            .iter()
            .find(|s| s.node == "big")
            .expect("scored");
        // LeastAllocated: cpu (8-1)/8 -> 87, memory (16-1)/16 -> 93; mean 90; weight 5.
        assert_eq!(big.plugins, vec![("NodeResourcesFit", 90)]);
        assert_eq!(big.total, 450);
    }
}
