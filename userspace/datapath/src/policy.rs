//! NetworkPolicy verdicts: which peers an isolated local pod may exchange new flows with.
//!
//! The agent compiles NetworkPolicy objects (podSelector, namespaceSelector, ipBlock, ports) into
//! per-pod, per-direction lists of [`PolicyAllow`] (selectors resolved to pod IPs as /32 peers);
//! this module turns them into POLICY trie entries (pure, unit-tested) and writes them.

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::maps::lpm_trie::Key;
use skiff_ebpf_common::{
    EP_F_EGRESS_ISOLATED, EP_F_INGRESS_ISOLATED, POLICY_ALLOW, POLICY_DENY, POLICY_EGRESS,
    POLICY_FIXED_BITS, POLICY_INGRESS, PolicyKey, ip4_to_raw, port_to_raw,
};

use crate::{Datapath, DatapathError, Proto, addr_of, map_err, map_names};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyDirection {
    Ingress,
    Egress,
}

impl PolicyDirection {
    fn byte(self) -> u8 {
        match self {
            PolicyDirection::Ingress => POLICY_INGRESS,
            PolicyDirection::Egress => POLICY_EGRESS,
        }
    }
    fn flag(self) -> u32 {
        match self {
            PolicyDirection::Ingress => EP_F_INGRESS_ISOLATED,
            PolicyDirection::Egress => EP_F_EGRESS_ISOLATED,
        }
    }
}

/// One allowed (peer block, port) pair. `proto: None` with `port: None` allows every protocol
/// and port (a rule without `ports`); a port without a protocol means TCP, as in Kubernetes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyAllow {
    pub peer: Ipv4Addr,
    pub prefix_len: u8,
    /// ipBlock.except: blocks inside `peer/prefix_len` that are not allowed by this entry.
    pub except: Vec<(Ipv4Addr, u8)>,
    pub proto: Option<Proto>,
    pub port: Option<u16>,
}

fn mask(ip: Ipv4Addr, len: u8) -> u32 {
    let bits = u32::from(ip);
    if len == 0 {
        0
    } else {
        bits & (u32::MAX << (32 - len as u32))
    }
}

/// POLICY entries (trie key -> verdict) for one pod and direction.
pub fn policy_entries(
    pod: Ipv4Addr,
    direction: PolicyDirection,
    allows: &[PolicyAllow],
) -> Result<BTreeMap<(u32, PolicyKey), u8>, DatapathError> {
    let bad = |m: String| DatapathError::InvalidService(format!("network policy for {pod}: {m}"));
    let mut out = BTreeMap::new();
    for a in allows {
        if a.prefix_len > 32 {
            return Err(bad(format!(
                "{}/{} is not a valid IPv4 block",
                a.peer, a.prefix_len
            )));
        }
        let (proto, port) = match (a.proto, a.port) {
            (None, None) => (0u8, 0u16),
            (p, Some(0)) => return Err(bad(format!("port 0 for {:?} is not a port", p))),
            (p, port) => (
                p.unwrap_or(Proto::Tcp).number(),
                port.map(port_to_raw).unwrap_or(0),
            ),
        };
        let key_for = |net: Ipv4Addr, len: u8| {
            (
                POLICY_FIXED_BITS + len as u32,
                PolicyKey {
                    direction: direction.byte(),
                    proto,
                    port,
                    endpoint: ip4_to_raw(pod.octets()),
                    peer: ip4_to_raw(Ipv4Addr::from(mask(net, len)).octets()),
                },
            )
        };
        let allow_key = key_for(a.peer, a.prefix_len);
        // An allow wins over a deny for the same block (another rule allowing it: rules OR).
        out.insert(allow_key, POLICY_ALLOW);
        for &(ex, ex_len) in &a.except {
            if ex_len > 32
                || ex_len <= a.prefix_len
                || mask(ex, a.prefix_len) != mask(a.peer, a.prefix_len)
            {
                return Err(bad(format!(
                    "except {ex}/{ex_len} is not inside {}/{}",
                    a.peer, a.prefix_len
                )));
            }
            out.entry(key_for(ex, ex_len)).or_insert(POLICY_DENY);
        }
    }
    Ok(out)
}

impl Datapath {
    /// Sets a local pod's NetworkPolicy for one direction: `isolated` = some policy selects the
    /// pod for that direction (then only `allows` get new flows); not isolated = everything is
    /// allowed and `allows` must be empty. Replaces what was there. The pod must be registered
    /// with `upsert_endpoint` first.
    pub fn set_policy(
        &mut self,
        pod: Ipv4Addr,
        direction: PolicyDirection,
        isolated: bool,
        allows: &[PolicyAllow],
    ) -> Result<(), DatapathError> {
        if !isolated && !allows.is_empty() {
            return Err(DatapathError::InvalidService(format!(
                "network policy for {pod}: allow rules given for a direction that is not isolated"
            )));
        }
        let entries = policy_entries(pod, direction, allows)?;
        let mut ep = self.endpoints.get(&addr_of(pod), 0).map_err(|_| {
            DatapathError::InvalidService(format!(
                "network policy for {pod}: not a pod on this node (upsert_endpoint first)"
            ))
        })?;
        let mut stale = Vec::new();
        for k in self.policy.keys() {
            let k = k.map_err(map_err(map_names::POLICY))?;
            let data = k.data();
            if data.direction == direction.byte()
                && data.endpoint == ip4_to_raw(pod.octets())
                && !entries.contains_key(&(k.prefix_len(), data))
            {
                stale.push(k);
            }
        }
        for ((len, data), verdict) in &entries {
            self.policy
                .insert(&Key::new(*len, *data), verdict, 0)
                .map_err(map_err(map_names::POLICY))?;
        }
        if isolated {
            ep.flags |= direction.flag();
        } else {
            ep.flags &= !direction.flag();
        }
        self.endpoints
            .insert(addr_of(pod), ep, 0)
            .map_err(map_err(map_names::ENDPOINTS))?;
        for k in stale {
            let _ = self.policy.remove(&k);
        }
        Ok(())
    }
}

/// One POLICY entry as `skiff datapath policy` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    pub endpoint: Ipv4Addr,
    pub direction: PolicyDirection,
    pub peer: Ipv4Addr,
    pub prefix_len: u8,
    /// 0: any protocol.
    pub proto: u8,
    /// 0: any port.
    pub port: u16,
    pub allow: bool,
}

impl Datapath {
    /// Every POLICY entry, and the local pods with their (ingress, egress) isolation flags.
    pub fn dump_policy(
        &self,
    ) -> Result<(Vec<PolicyEntry>, BTreeMap<Ipv4Addr, (bool, bool)>), DatapathError> {
        let mut entries = Vec::new();
        for k in self.policy.keys() {
            let k = k.map_err(map_err(map_names::POLICY))?;
            let data = k.data();
            let verdict = self.policy.get(&k, 0).unwrap_or(POLICY_DENY);
            let direction = if data.direction == POLICY_EGRESS {
                PolicyDirection::Egress
            } else {
                PolicyDirection::Ingress
            };
            entries.push(PolicyEntry {
                endpoint: Ipv4Addr::from(skiff_ebpf_common::raw_to_ip4(data.endpoint)),
                direction,
                peer: Ipv4Addr::from(skiff_ebpf_common::raw_to_ip4(data.peer)),
                prefix_len: k.prefix_len().saturating_sub(POLICY_FIXED_BITS) as u8,
                proto: data.proto,
                port: skiff_ebpf_common::raw_to_port(data.port),
                allow: verdict == POLICY_ALLOW,
            });
        }
        entries.sort_by_key(|e| {
            (e.endpoint, e.direction == PolicyDirection::Egress, e.proto, e.port, e.peer, e.prefix_len)
        });
        let mut isolation = BTreeMap::new();
        for item in self.endpoints.iter() {
            let (addr, ep) = item.map_err(map_err(map_names::ENDPOINTS))?;
            if addr.is_v4() {
                isolation.insert(
                    Ipv4Addr::from(skiff_ebpf_common::raw_to_ip4(addr.v4_word())),
                    (ep.flags & EP_F_INGRESS_ISOLATED != 0, ep.flags & EP_F_EGRESS_ISOLATED != 0),
                );
            }
        }
        Ok((entries, isolation))
    }

    /// Removes every POLICY entry of `pod` (both directions), whether or not the pod is still
    /// registered: for pods that are gone from this node.
    pub fn clear_policy(&mut self, pod: Ipv4Addr) -> Result<usize, DatapathError> {
        let raw = ip4_to_raw(pod.octets());
        let mut stale = Vec::new();
        for k in self.policy.keys() {
            let k = k.map_err(map_err(map_names::POLICY))?;
            if k.data().endpoint == raw {
                stale.push(k);
            }
        }
        for k in &stale {
            let _ = self.policy.remove(k);
        }
        Ok(stale.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(peer: [u8; 4], len: u8) -> PolicyAllow {
        PolicyAllow {
            peer: Ipv4Addr::from(peer),
            prefix_len: len,
            except: vec![],
            proto: None,
            port: None,
        }
    }

    #[test]
    fn any_port_rule_uses_wildcards_and_masks_the_peer() {
        let e = policy_entries(
            Ipv4Addr::new(10, 244, 1, 11),
            PolicyDirection::Ingress,
            &[allow([10, 244, 1, 77], 24)],
        )
        .expect("valid");
        let ((len, key), v) = e.iter().next().expect("one entry");
        assert_eq!(*len, POLICY_FIXED_BITS + 24);
        assert_eq!((key.proto, key.port), (0, 0));
        assert_eq!(key.peer, ip4_to_raw([10, 244, 1, 0]));
        assert_eq!(*v, POLICY_ALLOW);
    }

    #[test]
    fn port_without_protocol_means_tcp_and_except_is_a_longer_deny() {
        let mut a = allow([10, 0, 0, 0], 8);
        a.port = Some(53);
        a.except = vec![(Ipv4Addr::new(10, 1, 0, 0), 16)];
        let e = policy_entries(Ipv4Addr::new(10, 244, 1, 11), PolicyDirection::Egress, &[a])
            .expect("valid");
        assert_eq!(e.len(), 2);
        for (_, k) in e.keys() {
            assert_eq!(
                (k.proto, k.port, k.direction),
                (6, port_to_raw(53), POLICY_EGRESS)
            );
        }
        assert_eq!(
            e.iter()
                .filter(|(_, v)| **v == POLICY_DENY)
                .map(|((l, _), _)| *l)
                .collect::<Vec<_>>(),
            vec![POLICY_FIXED_BITS + 16]
        );
    }

    #[test]
    fn an_allow_beats_another_rules_except_for_the_same_block() {
        let mut a = allow([10, 0, 0, 0], 8);
        a.except = vec![(Ipv4Addr::new(10, 1, 0, 0), 16)];
        let b = allow([10, 1, 0, 0], 16);
        let e = policy_entries(
            Ipv4Addr::new(10, 244, 1, 11),
            PolicyDirection::Ingress,
            &[a, b],
        )
        .expect("valid");
        assert!(e.values().all(|v| *v == POLICY_ALLOW));
    }

    #[test]
    fn bad_blocks_are_rejected() {
        let pod = Ipv4Addr::new(10, 244, 1, 11);
        assert!(
            policy_entries(pod, PolicyDirection::Ingress, &[allow([10, 0, 0, 0], 33)]).is_err()
        );
        let mut outside = allow([10, 0, 0, 0], 8);
        outside.except = vec![(Ipv4Addr::new(192, 168, 0, 0), 16)];
        assert!(policy_entries(pod, PolicyDirection::Ingress, &[outside]).is_err());
        let mut zero = allow([10, 0, 0, 0], 8);
        zero.port = Some(0);
        assert!(policy_entries(pod, PolicyDirection::Ingress, &[zero]).is_err());
    }
}
