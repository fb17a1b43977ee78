//! NodeUnschedulable: cordoned nodes (`spec.unschedulable`) take no pods, unless the pod
//! tolerates the `node.kubernetes.io/unschedulable:NoSchedule` taint.

use k8s_openapi::api::core::v1::Taint;

use super::{FnFilter, tolerates};
use crate::framework::{FilterPlugin, NodeFilter};
use crate::snapshot::{ClusterSnapshot, NodeInfo, PodInfo};

pub const REASON: &str = "node(s) were unschedulable";

pub struct NodeUnschedulable;

impl FilterPlugin for NodeUnschedulable {
    fn name(&self) -> &'static str {
        "NodeUnschedulable"
    }

    fn prepare<'a>(&'a self, pod: &'a PodInfo, _: &'a ClusterSnapshot) -> Box<dyn NodeFilter + 'a> {
        let taint = Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let tolerated = pod.tolerations.iter().any(|t| tolerates(t, &taint));
        Box::new(FnFilter(move |node: &NodeInfo| {
            if node.unschedulable && !tolerated {
                Err(vec![REASON.to_string()])
            } else {
                Ok(())
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{node, pod};
    use crate::plugins::testing::{filter, snapshot};

    #[test]
    fn cordoned_nodes_refuse_pods_that_do_not_tolerate_it() {
        let s = snapshot(
            vec![node("a").unschedulable().build(), node("b").build()],
            vec![],
        );
        let plain = pod("d", "p").build();
        assert_eq!(
            filter(&NodeUnschedulable, &plain, &s, "a"),
            Err(vec![REASON.to_string()])
        );
        assert_eq!(filter(&NodeUnschedulable, &plain, &s, "b"), Ok(()));
        let tolerant = pod("d", "p")
            .toleration(
                "node.kubernetes.io/unschedulable",
                "Exists",
                "",
                "NoSchedule",
            )
            .build();
        assert_eq!(filter(&NodeUnschedulable, &tolerant, &s, "a"), Ok(()));
        // A toleration for another effect does not count.
        let wrong_effect = pod("d", "p")
            .toleration(
                "node.kubernetes.io/unschedulable",
                "Exists",
                "",
                "NoExecute",
            )
            .build();
        assert!(filter(&NodeUnschedulable, &wrong_effect, &s, "a").is_err());
    }
}
