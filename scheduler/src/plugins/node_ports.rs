//! NodePorts: two pods cannot take the same host port (protocol, port, overlapping address).

use super::FnFilter;
use crate::framework::{FilterPlugin, NodeFilter};
use crate::snapshot::{ClusterSnapshot, NodeInfo, PodInfo};

pub const REASON: &str = "node(s) didn't have free ports for the requested pod ports";

pub struct NodePorts;

impl FilterPlugin for NodePorts {
    fn name(&self) -> &'static str {
        "NodePorts"
    }

    fn prepare<'a>(&'a self, pod: &'a PodInfo, _: &'a ClusterSnapshot) -> Box<dyn NodeFilter + 'a> {
        Box::new(FnFilter(move |node: &NodeInfo| {
            if pod.host_ports.is_empty() {
                return Ok(());
            }
            let conflict = node
                .used_ports()
                .any(|used| pod.host_ports.iter().any(|want| want.conflicts(used)));
            if conflict {
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
    use crate::plugins::testing::{passing, snapshot};

    #[test]
    fn a_taken_host_port_excludes_the_node() {
        let s = snapshot(
            vec![node("a").build(), node("b").build()],
            vec![pod("d", "web").host_port(8080).node_name("a").build()],
        );
        assert_eq!(
            passing(&NodePorts, &pod("d", "p").host_port(8080).build(), &s),
            vec!["b"]
        );
        assert_eq!(
            passing(&NodePorts, &pod("d", "p").host_port(8081).build(), &s),
            vec!["a", "b"]
        );
        assert_eq!(
            passing(&NodePorts, &pod("d", "p").build(), &s),
            vec!["a", "b"]
        );
    }
}
