//! The plugins, each named and behaving as its kube-scheduler 1.32 counterpart.

mod inter_pod_affinity;
mod node_affinity;
mod node_name;
mod node_ports;
mod node_resources;
mod node_unschedulable;
mod pod_topology_spread;
mod taint_toleration;

pub use inter_pod_affinity::InterPodAffinity;
pub use node_affinity::{NodeAffinity, node_matches_pod_selectors, node_selector_term_matches};
pub use node_name::NodeName;
pub use node_ports::NodePorts;
pub use node_resources::{NodeResourcesBalancedAllocation, NodeResourcesFit};
pub use node_unschedulable::NodeUnschedulable;
pub use pod_topology_spread::PodTopologySpread;
pub use taint_toleration::{TaintToleration, find_untolerated_taint, tolerates};

use crate::framework::NodeFilter;
use crate::snapshot::NodeInfo;

/// A per-node check from a closure, for filters whose preparation is just capturing the pod.
struct FnFilter<F>(F);

impl<F: Fn(&NodeInfo) -> Result<(), Vec<String>>> NodeFilter for FnFilter<F> {
    fn filter(&self, node: &NodeInfo) -> Result<(), Vec<String>> {
        (self.0)(node)
    }
}

/// kube-scheduler's `DefaultNormalizeScore`: scales so the highest is `MAX_NODE_SCORE`
/// (optionally reversed: the highest raw score gets 0). All-zero scores stay 0 (or all become
/// `MAX_NODE_SCORE` when reversed).
fn default_normalize(scores: &mut [i64], reverse: bool) {
    use crate::framework::MAX_NODE_SCORE;
    let max = scores.iter().copied().max().unwrap_or(0).max(0);
    if max == 0 {
        if reverse {
            scores.iter_mut().for_each(|s| *s = MAX_NODE_SCORE);
        }
        return;
    }
    for s in scores.iter_mut() {
        let scaled = MAX_NODE_SCORE * *s / max;
        *s = if reverse {
            MAX_NODE_SCORE - scaled
        } else {
            scaled
        };
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use k8s_openapi::api::core::v1::{Node, Pod};

    use crate::framework::{FilterPlugin, ScorePlugin};
    use crate::snapshot::{ClusterSnapshot, NodeInfo, PodInfo};

    /// Runs one filter plugin for `pod` against the node named `node`.
    pub fn filter(
        plugin: &dyn FilterPlugin,
        pod: &Pod,
        snapshot: &ClusterSnapshot,
        node: &str,
    ) -> Result<(), Vec<String>> {
        let info = PodInfo::new(pod);
        assert!(
            info.problems.is_empty(),
            "test pod has problems: {:?}",
            info.problems
        );
        let prepared = plugin.prepare(&info, snapshot);
        prepared.filter(snapshot.node(node).expect("node in snapshot"))
    }

    /// Names of the nodes that pass one filter plugin.
    pub fn passing(
        plugin: &dyn FilterPlugin,
        pod: &Pod,
        snapshot: &ClusterSnapshot,
    ) -> Vec<String> {
        let info = PodInfo::new(pod);
        let prepared = plugin.prepare(&info, snapshot);
        snapshot
            .nodes()
            .iter()
            .filter(|n| prepared.filter(n).is_ok())
            .map(|n| n.name.clone())
            .collect()
    }

    /// One score plugin's normalised scores for every node, by node name.
    pub fn scores(
        plugin: &dyn ScorePlugin,
        pod: &Pod,
        snapshot: &ClusterSnapshot,
    ) -> Vec<(String, i64)> {
        let info = PodInfo::new(pod);
        let nodes: Vec<&NodeInfo> = snapshot.nodes().iter().collect();
        let s = plugin.score(&info, snapshot, &nodes);
        nodes.iter().map(|n| n.name.clone()).zip(s).collect()
    }

    pub fn snapshot(nodes: Vec<Node>, pods: Vec<Pod>) -> ClusterSnapshot {
        ClusterSnapshot::new(&nodes, &pods)
    }
}
