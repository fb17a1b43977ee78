//! NodeName: a pod that names its node (`spec.nodeName`) fits only there.

use super::FnFilter;
use crate::framework::{FilterPlugin, NodeFilter};
use crate::snapshot::{ClusterSnapshot, PodInfo};

pub const REASON: &str = "node(s) didn't match the requested node name";

pub struct NodeName;

impl FilterPlugin for NodeName {
    fn name(&self) -> &'static str {
        "NodeName"
    }

    fn prepare<'a>(&'a self, pod: &'a PodInfo, _: &'a ClusterSnapshot) -> Box<dyn NodeFilter + 'a> {
        Box::new(FnFilter(
            move |node: &crate::snapshot::NodeInfo| match &pod.node_name {
                Some(wanted) if *wanted != node.name => Err(vec![REASON.to_string()]),
                _ => Ok(()),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{node, pod};
    use crate::plugins::testing::{passing, snapshot};

    #[test]
    fn only_the_named_node_fits() {
        let s = snapshot(vec![node("a").build(), node("b").build()], vec![]);
        assert_eq!(
            passing(&NodeName, &pod("d", "p").node_name("b").build(), &s),
            vec!["b"]
        );
        assert_eq!(
            passing(&NodeName, &pod("d", "p").build(), &s),
            vec!["a", "b"]
        );
        let none = passing(&NodeName, &pod("d", "p").node_name("zzz").build(), &s);
        assert!(none.is_empty());
    }
}
