//! Node IPAM: every Node gets a `spec.podCIDR` block (a /24 by default) from the cluster CIDR
//! that no other Node holds, as Kubernetes' `RangeAllocator` does.
//!
//! There is no allocation state of record besides the Nodes: [`plan`] recomputes which blocks
//! are held from every Node's `spec.podCIDR` and `spec.podCIDRs` on each pass, so a restarted
//! (or newly elected) controller-manager continues exactly where the last one stopped. The only
//! memory kept between passes ([`IpamState`]) is what the watch cache cannot show yet: blocks
//! just written to a Node whose update the cache has not delivered (without it, a pass that runs
//! on a stale cache would hand the same block to a second Node), and which problems were
//! already reported (so an Event is posted once, not on every pass).
//!
//! A Node whose podCIDR is unparsable, outside the cluster CIDR or held by an older Node is
//! reported with a Warning Event and left alone (Kubernetes makes podCIDR immutable once set, so
//! the allocator never rewrites one). Running out of blocks is a Warning Event
//! (`CIDRNotAvailable`, Kubernetes' reason) on each Node left without one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, ObjectReference};

use crate::{EventRecord, EventType};

/// Kubernetes refuses node masks more than 16 bits longer than the cluster mask (65,536 blocks);
/// the same bound keeps every pass over the blocks small.
const MAX_BLOCK_BITS: u8 = 16;

/// A bad `--cluster-cidr` / node mask combination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamConfigError {
    #[error(
        "node CIDR mask /{node_prefix} must be at least as long as the cluster CIDR {cluster}'s /{}",
        cluster.prefix_len()
    )]
    NodeMaskShorterThanCluster { cluster: Ipv4Net, node_prefix: u8 },
    #[error(
        "node CIDR mask /{node_prefix} leaves no room for pods; use /30 or shorter (/24 is usual)"
    )]
    NodeMaskTooLong { node_prefix: u8 },
    #[error(
        "node CIDR mask /{node_prefix} is more than {MAX_BLOCK_BITS} bits longer than the cluster CIDR {cluster}; use a larger node block or a smaller cluster CIDR"
    )]
    TooManyBlocks { cluster: Ipv4Net, node_prefix: u8 },
}

/// The cluster CIDR cut into equal node blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterCidr {
    net: Ipv4Net,
    node_prefix: u8,
}

impl ClusterCidr {
    /// `cluster` is normalized to its network address (10.244.3.7/16 means 10.244.0.0/16).
    pub fn new(cluster: Ipv4Net, node_prefix: u8) -> Result<Self, IpamConfigError> {
        let net = cluster.trunc();
        if node_prefix < net.prefix_len() {
            return Err(IpamConfigError::NodeMaskShorterThanCluster {
                cluster: net,
                node_prefix,
            });
        }
        if node_prefix > 30 {
            return Err(IpamConfigError::NodeMaskTooLong { node_prefix });
        }
        if node_prefix - net.prefix_len() > MAX_BLOCK_BITS {
            return Err(IpamConfigError::TooManyBlocks {
                cluster: net,
                node_prefix,
            });
        }
        Ok(ClusterCidr { net, node_prefix })
    }

    pub fn cluster(&self) -> Ipv4Net {
        self.net
    }

    pub fn node_prefix(&self) -> u8 {
        self.node_prefix
    }

    /// How many node blocks the cluster CIDR holds.
    pub fn block_count(&self) -> u32 {
        1u32 << (self.node_prefix - self.net.prefix_len())
    }

    fn block_size(&self) -> u32 {
        1u32 << (32 - self.node_prefix)
    }

    /// The `index`th block (0 = the cluster CIDR's first).
    pub fn block(&self, index: u32) -> Option<Ipv4Net> {
        if index >= self.block_count() {
            return None;
        }
        let base = u32::from(self.net.network()) + index * self.block_size();
        Ipv4Net::new(Ipv4Addr::from(base), self.node_prefix).ok()
    }

    /// The block indexes `cidr` overlaps, or None when it is not inside the cluster CIDR.
    fn blocks_of(&self, cidr: Ipv4Net) -> Option<std::ops::Range<u32>> {
        let cidr = cidr.trunc();
        if !self.net.contains(&cidr) {
            return None;
        }
        let offset = u32::from(cidr.network()) - u32::from(self.net.network());
        let first = offset / self.block_size();
        // A CIDR larger than a block covers several whole blocks; a smaller one sits in one.
        let span = if cidr.prefix_len() < self.node_prefix {
            1u32 << (self.node_prefix - cidr.prefix_len())
        } else {
            1
        };
        Some(first..first + span)
    }
}

/// One write the allocator wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum IpamAction {
    /// Set `spec.podCIDR` and `spec.podCIDRs: [cidr]` on the Node, conditional on
    /// `resource_version` (the Node as the allocator saw it: if it changed, decide again).
    Assign {
        node: String,
        resource_version: Option<String>,
        cidr: Ipv4Net,
    },
    /// An Event on the Node (bad podCIDR, clash, exhaustion).
    Event(EventRecord),
}

/// What the allocator remembers between passes (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct IpamState {
    /// Node name -> (block written, the Node's resourceVersion after the write).
    in_flight: BTreeMap<String, (Ipv4Net, Option<u64>)>,
    /// (node uid or name, message) already posted as an Event.
    reported: BTreeSet<(String, String)>,
}

impl IpamState {
    /// Records a successful Assign: the block counts as held until the cache shows the Node at
    /// `resource_version` or later (or the Node is gone).
    pub fn assigned(&mut self, node: &str, cidr: Ipv4Net, resource_version: Option<&str>) {
        let rv = resource_version.and_then(|v| v.parse().ok());
        self.in_flight.insert(node.to_string(), (cidr, rv));
    }

    /// Blocks written but not yet visible in the cache, by node.
    pub fn in_flight(&self) -> impl Iterator<Item = (&str, Ipv4Net)> {
        self.in_flight.iter().map(|(n, (c, _))| (n.as_str(), *c))
    }

    /// Drops in-flight entries the cache now shows (or that can no longer matter).
    fn settle(&mut self, nodes: &[Node]) {
        let by_name: BTreeMap<&str, &Node> = nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n)))
            .collect();
        self.in_flight.retain(|name, (_, rv)| {
            let Some(node) = by_name.get(name.as_str()) else {
                return false;
            };
            let shows_cidr = node
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidr.as_deref())
                .is_some_and(|c| !c.is_empty());
            let seen_rv: Option<u64> = node
                .metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok());
            let caught_up = matches!((seen_rv, *rv), (Some(seen), Some(want)) if seen >= want);
            !(shows_cidr || caught_up)
        });
    }
}

fn node_reference(node: &Node) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: node.metadata.name.clone(),
        uid: node.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

/// The podCIDRs a Node shows: `spec.podCIDR` and `spec.podCIDRs`, deduplicated, in order.
fn node_cidrs(node: &Node) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let Some(spec) = node.spec.as_ref() else {
        return out;
    };
    for c in spec
        .pod_cidr
        .iter()
        .chain(spec.pod_cidrs.iter().flatten())
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
    {
        if !out.iter().any(|o| o == c) {
            out.push(c.to_string());
        }
    }
    out
}

fn is_ipv6(text: &str) -> bool {
    text.parse::<ipnet::Ipv6Net>().is_ok()
}

/// One pass of the allocator over every Node: which Nodes get which block, and what to report.
/// Nodes holding blocks are taken oldest first (creationTimestamp, then name), so when two
/// Nodes claim the same block the older keeps it and the younger is reported.
pub fn plan(range: &ClusterCidr, nodes: &[Node], state: &mut IpamState) -> Vec<IpamAction> {
    state.settle(nodes);
    let mut actions = Vec::new();
    let mut held: BTreeMap<u32, String> = BTreeMap::new();
    let mut problems: BTreeMap<String, Vec<(EventType, &'static str, String, ObjectReference)>> =
        BTreeMap::new();

    // Blocks written moments ago count as held even though the cache does not show them yet.
    let in_flight_nodes: BTreeSet<String> = state.in_flight.keys().cloned().collect();
    for (name, (cidr, _)) in &state.in_flight {
        if let Some(blocks) = range.blocks_of(*cidr) {
            for b in blocks {
                held.entry(b).or_insert_with(|| name.clone());
            }
        }
    }

    let mut ordered: Vec<&Node> = nodes.iter().filter(|n| n.metadata.name.is_some()).collect();
    ordered.sort_by_key(|n| {
        (
            n.metadata.creation_timestamp.as_ref().map(|t| t.0),
            n.metadata.name.clone(),
        )
    });

    let mut needs_block: Vec<&Node> = Vec::new();
    for node in &ordered {
        let name = node.metadata.name.clone().unwrap_or_default();
        let cidrs = node_cidrs(node);
        if cidrs.is_empty() {
            if !in_flight_nodes.contains(&name) {
                needs_block.push(node);
            }
            continue;
        }
        for text in cidrs {
            let mut report = |reason: &'static str, message: String| {
                problems.entry(name.clone()).or_default().push((
                    EventType::Warning,
                    reason,
                    message,
                    node_reference(node),
                ));
            };
            let cidr = match text.parse::<Ipv4Net>() {
                Ok(c) => c,
                // The allocator is IPv4 only; an IPv6 podCIDR belongs to someone else's range.
                Err(_) if is_ipv6(&text) => continue,
                Err(_) => {
                    report(
                        "InvalidPodCIDR",
                        format!(
                            "Node {name} has podCIDR {text:?}, which is not a CIDR; left as is"
                        ),
                    );
                    continue;
                }
            };
            let Some(blocks) = range.blocks_of(cidr) else {
                report(
                    "InvalidPodCIDR",
                    format!(
                        "Node {name} has podCIDR {cidr}, outside the cluster CIDR {}; left as is (pods there may not be routed)",
                        range.cluster()
                    ),
                );
                continue;
            };
            let clash = blocks
                .clone()
                .find_map(|b| held.get(&b).filter(|holder| **holder != name).cloned());
            if let Some(holder) = clash {
                report(
                    "PodCIDRClash",
                    format!(
                        "Node {name} has podCIDR {cidr}, which Node {holder} already holds; left as is (the two nodes' pods will clash)"
                    ),
                );
                continue;
            }
            for b in blocks {
                held.insert(b, name.clone());
            }
        }
    }

    // The lowest free block first, so allocations are dense and predictable.
    let mut next_free = 0u32;
    for node in needs_block {
        let name = node.metadata.name.clone().unwrap_or_default();
        while next_free < range.block_count() && held.contains_key(&next_free) {
            next_free += 1;
        }
        match range.block(next_free) {
            Some(cidr) => {
                held.insert(next_free, name.clone());
                actions.push(IpamAction::Assign {
                    node: name,
                    resource_version: node.metadata.resource_version.clone(),
                    cidr,
                });
            }
            None => {
                problems.entry(name.clone()).or_default().push((
                    EventType::Warning,
                    "CIDRNotAvailable",
                    format!(
                        "Node {name} got no podCIDR: all {} /{} blocks of the cluster CIDR {} are taken; widen --cluster-cidr or remove Nodes",
                        range.block_count(),
                        range.node_prefix(),
                        range.cluster()
                    ),
                    node_reference(node),
                ));
            }
        }
    }

    // Report each problem once; forget problems that went away so a recurrence is reported.
    let mut current: BTreeSet<(String, String)> = BTreeSet::new();
    for (name, list) in problems {
        for (event_type, reason, message, involved) in list {
            let key = (
                involved.uid.clone().unwrap_or_else(|| name.clone()),
                message.clone(),
            );
            current.insert(key.clone());
            if state.reported.insert(key) {
                actions.push(IpamAction::Event(EventRecord {
                    involved,
                    event_type,
                    reason: reason.to_string(),
                    message,
                }));
            }
        }
    }
    state.reported.retain(|k| current.contains(k));
    actions
}

#[cfg(test)]
#[path = "node_ipam_tests.rs"]
mod tests;
