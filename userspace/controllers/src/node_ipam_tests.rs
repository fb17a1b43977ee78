#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::*;
use crate::testkit::ts;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn range() -> ClusterCidr {
    ClusterCidr::new(net("10.244.0.0/16"), 24).unwrap()
}

fn node(name: &str, created: i64, cidrs: &[&str]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("10".into()),
            creation_timestamp: Some(Time(ts(created))),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: cidrs.first().map(|c| c.to_string()),
            pod_cidrs: if cidrs.is_empty() {
                None
            } else {
                Some(cidrs.iter().map(|c| c.to_string()).collect())
            },
            ..Default::default()
        }),
        status: None,
    }
}

fn assigns(actions: &[IpamAction]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            IpamAction::Assign { node, cidr, .. } => Some((node.clone(), cidr.to_string())),
            IpamAction::Event(_) => None,
        })
        .collect()
}

fn events(actions: &[IpamAction]) -> Vec<(String, String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            IpamAction::Event(e) => Some((
                e.involved.name.clone().unwrap_or_default(),
                e.reason.clone(),
                e.message.clone(),
            )),
            IpamAction::Assign { .. } => None,
        })
        .collect()
}

/// Applies Assigns to the node list as the apiserver would (rv bumped).
fn apply(nodes: &mut [Node], actions: &[IpamAction], state: &mut IpamState) {
    for a in actions {
        if let IpamAction::Assign { node, cidr, .. } = a {
            let n = nodes
                .iter_mut()
                .find(|n| n.metadata.name.as_deref() == Some(node))
                .unwrap();
            let spec = n.spec.get_or_insert_with(Default::default);
            spec.pod_cidr = Some(cidr.to_string());
            spec.pod_cidrs = Some(vec![cidr.to_string()]);
            n.metadata.resource_version = Some("11".into());
            state.assigned(node, *cidr, Some("11"));
        }
    }
}

#[test]
fn config_is_validated() {
    assert!(ClusterCidr::new(net("10.244.0.0/16"), 24).is_ok());
    assert_eq!(
        ClusterCidr::new(net("10.244.0.0/16"), 12),
        Err(IpamConfigError::NodeMaskShorterThanCluster {
            cluster: net("10.244.0.0/16"),
            node_prefix: 12
        })
    );
    assert!(matches!(
        ClusterCidr::new(net("10.244.0.0/16"), 31),
        Err(IpamConfigError::NodeMaskTooLong { .. })
    ));
    assert!(matches!(
        ClusterCidr::new(net("10.0.0.0/8"), 26),
        Err(IpamConfigError::TooManyBlocks { .. })
    ));
    // A host address in the flag is normalized to its network.
    let r = ClusterCidr::new(net("10.244.7.9/16"), 24).unwrap();
    assert_eq!(r.cluster(), net("10.244.0.0/16"));
    assert_eq!(r.block_count(), 256);
    assert_eq!(r.block(0), Some(net("10.244.0.0/24")));
    assert_eq!(r.block(255), Some(net("10.244.255.0/24")));
    assert_eq!(r.block(256), None);
}

#[test]
fn nodes_get_distinct_blocks_lowest_first() {
    let mut nodes = vec![node("b", 2, &[]), node("a", 1, &[]), node("c", 3, &[])];
    let mut state = IpamState::default();
    let actions = plan(&range(), &nodes, &mut state);
    assert_eq!(
        assigns(&actions),
        vec![
            ("a".into(), "10.244.0.0/24".into()),
            ("b".into(), "10.244.1.0/24".into()),
            ("c".into(), "10.244.2.0/24".into()),
        ]
    );
    assert!(events(&actions).is_empty());
    // The Assign is conditional on the Node as seen.
    assert!(
        matches!(&actions[0], IpamAction::Assign { resource_version: Some(rv), .. } if rv == "10")
    );
    apply(&mut nodes, &actions, &mut state);
    assert!(
        plan(&range(), &nodes, &mut state).is_empty(),
        "stable once assigned"
    );
}

#[test]
fn restart_recomputes_from_nodes_and_fills_gaps() {
    // A fresh state (a restarted controller) sees blocks 0 and 2 held; the new node gets 1.
    let nodes = vec![
        node("a", 1, &["10.244.0.0/24"]),
        node("c", 3, &["10.244.2.0/24"]),
        node("new", 4, &[]),
    ];
    let actions = plan(&range(), &nodes, &mut IpamState::default());
    assert_eq!(
        assigns(&actions),
        vec![("new".into(), "10.244.1.0/24".into())]
    );
}

#[test]
fn podcidrs_list_counts_as_held() {
    let mut a = node("a", 1, &[]);
    a.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.0.0/24".into(), "fd00::/64".into()]);
    let nodes = vec![a, node("b", 2, &[])];
    let actions = plan(&range(), &nodes, &mut IpamState::default());
    assert_eq!(
        assigns(&actions),
        vec![("b".into(), "10.244.1.0/24".into())]
    );
    assert!(
        events(&actions).is_empty(),
        "IPv6 entries are not ours: {actions:?}"
    );
}

#[test]
fn in_flight_block_is_not_given_twice_on_a_stale_cache() {
    let nodes = vec![node("a", 1, &[]), node("b", 2, &[])];
    let mut state = IpamState::default();
    let first = plan(&range(), &nodes[..1], &mut state);
    assert_eq!(assigns(&first), vec![("a".into(), "10.244.0.0/24".into())]);
    state.assigned("a", net("10.244.0.0/24"), Some("11"));
    // The cache still shows a without a podCIDR (rv 10): a is skipped and b gets block 1.
    let second = plan(&range(), &nodes, &mut state);
    assert_eq!(assigns(&second), vec![("b".into(), "10.244.1.0/24".into())]);
    assert_eq!(state.in_flight().count(), 1);
    // Once the cache shows a's write, the in-flight entry goes.
    let mut caught_up = nodes.clone();
    caught_up[0].spec.as_mut().unwrap().pod_cidr = Some("10.244.0.0/24".into());
    caught_up[0].metadata.resource_version = Some("11".into());
    let _ = plan(&range(), &caught_up, &mut state);
    assert_eq!(state.in_flight().count(), 0);
}

#[test]
fn out_of_range_and_garbage_are_reported_once_and_left_alone() {
    let nodes = vec![
        node("outside", 1, &["192.168.5.0/24"]),
        node("garbage", 2, &["not-a-cidr"]),
        node("fresh", 3, &[]),
    ];
    let mut state = IpamState::default();
    let actions = plan(&range(), &nodes, &mut state);
    // Nothing rewrites the bad nodes; the fresh one still gets the first block.
    assert_eq!(
        assigns(&actions),
        vec![("fresh".into(), "10.244.0.0/24".into())]
    );
    let ev = events(&actions);
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(ev.iter().any(|(n, r, m)| n == "outside"
        && r == "InvalidPodCIDR"
        && m.contains("192.168.5.0/24")
        && m.contains("outside the cluster CIDR 10.244.0.0/16")));
    assert!(
        ev.iter()
            .any(|(n, r, _)| n == "garbage" && r == "InvalidPodCIDR")
    );
    // Every event names the Node (kind, uid) so `kubectl describe node` finds it.
    for a in &actions {
        if let IpamAction::Event(e) = a {
            assert_eq!(e.involved.kind.as_deref(), Some("Node"));
            assert!(e.involved.uid.is_some());
            assert!(e.involved.namespace.is_none());
            assert_eq!(e.event_type, EventType::Warning);
        }
    }
    // The next pass reports nothing new.
    let again = plan(&range(), &nodes[..2], &mut state);
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn clash_keeps_the_older_holder_and_reports_the_younger() {
    let nodes = vec![
        node("young", 5, &["10.244.3.0/24"]),
        node("old", 1, &["10.244.3.0/24"]),
        node("fresh", 6, &[]),
    ];
    let actions = plan(&range(), &nodes, &mut IpamState::default());
    let ev = events(&actions);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].0, "young");
    assert_eq!(ev[0].1, "PodCIDRClash");
    assert!(ev[0].2.contains("Node old already holds"), "{}", ev[0].2);
    // The contested block is not handed out again.
    assert_eq!(
        assigns(&actions),
        vec![("fresh".into(), "10.244.0.0/24".into())]
    );
}

#[test]
fn a_wider_podcidr_holds_every_block_it_covers() {
    let nodes = vec![node("wide", 1, &["10.244.0.0/23"]), node("fresh", 2, &[])];
    let actions = plan(&range(), &nodes, &mut IpamState::default());
    assert_eq!(
        assigns(&actions),
        vec![("fresh".into(), "10.244.2.0/24".into())]
    );
}

#[test]
fn exhaustion_is_reported_and_then_resolved() {
    // A /23 cut into /24s: two blocks for three nodes.
    let small = ClusterCidr::new(net("10.9.0.0/23"), 24).unwrap();
    let mut nodes = vec![node("a", 1, &[]), node("b", 2, &[]), node("c", 3, &[])];
    let mut state = IpamState::default();
    let actions = plan(&small, &nodes, &mut state);
    assert_eq!(assigns(&actions).len(), 2);
    let ev = events(&actions);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0, "c");
    assert_eq!(ev[0].1, "CIDRNotAvailable");
    assert!(ev[0].2.contains("all 2 /24 blocks"), "{}", ev[0].2);
    apply(&mut nodes, &actions, &mut state);
    assert!(plan(&small, &nodes, &mut state).is_empty(), "reported once");
    // Node a goes away: c gets its block.
    nodes.remove(0);
    let actions = plan(&small, &nodes, &mut state);
    assert_eq!(assigns(&actions), vec![("c".into(), "10.9.0.0/24".into())]);
}
