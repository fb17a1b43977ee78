//! NodePort frontends on the node uplink (the `nodeport` XDP program) and their Maglev tables.
//!
//! A NodePort frontend is a service keyed by the node's address and the node port: the same
//! SERVICES / BACKEND_SLOTS / BACKENDS entries as a ClusterIP (so pods reaching node_ip:node_port
//! are balanced by the socket and tc layers too), plus a Maglev table in MAGLEV that the XDP
//! program uses for traffic arriving on the uplink. [`LbMode`] says whether that traffic reaches
//! a backend on another node SNATed (default) or by direct server return.

use std::net::IpAddr;

use skiff_ebpf_common::{MAGLEV_M, MaglevTable, NODE_F_LB_DSR, NodeConfig, raw_to_ip4, raw_to_port};

use crate::{Datapath, DatapathError, MapOp, ServiceSpec, map_err, map_names};

/// FNV-1a 64. Hand-written on purpose: the Maglev table must come out identical on every node
/// and across releases (so a flow keeps its backend whichever node receives it), which rules
/// out std's hasher (unspecified algorithm) and needs no crate for ten lines.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Builds a Maglev lookup table of `m` slots (m prime) over `backends` (id, stable name):
/// each backend walks its own permutation of the slots (offset + j * skip) and they take turns
/// claiming the next free slot, so each gets ~m/n slots and removing one backend moves only
/// the slots it held (plus a few). Empty input gives an all-zero table (0 = no backend).
pub fn maglev_table(backends: &[(u32, String)], m: usize) -> Vec<u32> {
    let mut table = vec![0u32; m];
    if backends.is_empty() || m < 2 {
        return table;
    }
    // Sort by name so the result does not depend on the order the caller lists backends in.
    let mut sorted: Vec<&(u32, String)> = backends.iter().collect();
    sorted.sort_by(|a, b| a.1.cmp(&b.1));
    let perms: Vec<(usize, usize)> = sorted
        .iter()
        .map(|(_, name)| {
            let offset = (fnv1a(0, name.as_bytes()) % m as u64) as usize;
            let skip = (fnv1a(0x5bd1_e995, name.as_bytes()) % (m as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; sorted.len()];
    let mut filled = 0;
    let mut taken = vec![false; m];
    'outer: loop {
        for (i, (id, _)) in sorted.iter().enumerate() {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while taken[c] {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            taken[c] = true;
            table[c] = *id;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'outer;
            }
        }
    }
    table
}

/// How NodePort / LoadBalancer / externalIPs traffic reaches a backend on another node
/// (the agent's `--lb-mode`, as Cilium's `--bpf-lb-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbMode {
    /// Source-NATed to the entry node's address: the backend sees the node, and its replies
    /// come back through the entry node, which reverses the NAT.
    #[default]
    Snat,
    /// Direct server return: the packet keeps the client's address and carries the service
    /// address in an IPv4 option; the backend's node answers the client itself, from the
    /// service address (see `push_dsr_option` / `accept_dsr` in ebpf/programs). A backend on
    /// the entry node also sees the client's address (no SNAT in this mode).
    Dsr,
}

impl LbMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LbMode::Snat => "snat",
            LbMode::Dsr => "dsr",
        }
    }
}

impl std::fmt::Display for LbMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LbMode {
    type Err = String;
    fn from_str(s: &str) -> Result<LbMode, String> {
        match s {
            "snat" => Ok(LbMode::Snat),
            "dsr" => Ok(LbMode::Dsr),
            other => Err(format!("unknown load-balancing mode {other:?} (snat or dsr)")),
        }
    }
}

impl Datapath {
    /// Sets how NodePort traffic reaches backends on other nodes (NODE_CONFIG flags). Takes
    /// effect for new flows; established ones keep the path their conntrack entry chose.
    pub fn set_lb_mode(&mut self, mode: LbMode) -> Result<(), DatapathError> {
        let mut cfg = self
            .node_config
            .get(&0, 0)
            .map_err(map_err(map_names::NODE_CONFIG))?;
        match mode {
            LbMode::Snat => cfg.flags &= !NODE_F_LB_DSR,
            LbMode::Dsr => cfg.flags |= NODE_F_LB_DSR,
        }
        self.node_config
            .set(0, cfg, 0)
            .map_err(map_err(map_names::NODE_CONFIG))
    }

    /// The mode the programs use now (read from the pinned NODE_CONFIG).
    pub fn lb_mode(&self) -> Result<LbMode, DatapathError> {
        let cfg = self
            .node_config
            .get(&0, 0)
            .map_err(map_err(map_names::NODE_CONFIG))?;
        Ok(if cfg.flags & NODE_F_LB_DSR != 0 {
            LbMode::Dsr
        } else {
            LbMode::Snat
        })
    }

    /// Sets the address NodePort traffic is SNATed to (see NodeConfig); enables NodePort.
    pub fn set_nodeport_snat(&mut self, addr: std::net::Ipv4Addr) -> Result<(), DatapathError> {
        let mut cfg = self
            .node_config
            .get(&0, 0)
            .map_err(map_err(map_names::NODE_CONFIG))?;
        cfg.nodeport_snat = crate::addr_of(addr);
        self.node_config
            .set(0, cfg, 0)
            .map_err(map_err(map_names::NODE_CONFIG))
    }

    /// Upserts a NodePort frontend: `spec.vip` is the node's address, `spec.port` the node port.
    /// Writes the service like `upsert_service` and then its Maglev table.
    pub fn upsert_nodeport(&mut self, spec: &ServiceSpec) -> Result<Vec<MapOp>, DatapathError> {
        let ops = self.upsert_service(spec)?;
        let key = crate::plan::service_key(spec)?;
        let state = &self.state;
        let Some(svc) = state.services.get(&key).copied() else {
            return Err(DatapathError::InvalidService(
                "service vanished while writing its maglev table".into(),
            ));
        };
        let active: Vec<(u32, String)> = (0..svc.backend_count)
            .filter_map(|slot| {
                let id = *state.slots.get(&skiff_ebpf_common::BackendSlotKey {
                    service_id: svc.service_id,
                    slot,
                })?;
                let b = state.backends.get(&id)?;
                let ip = IpAddr::from(raw_to_ip4(b.addr.v4_word()));
                Some((id, format!("{ip}:{}", raw_to_port(b.port))))
            })
            .collect();
        let ids = maglev_table(&active, MAGLEV_M);
        let mut table = MaglevTable {
            ids: [0; MAGLEV_M],
            _pad: 0,
        };
        table.ids.copy_from_slice(&ids);
        // An unchanged table is not written again: a restarted agent re-upserting its NodePorts
        // then applies nothing beyond the diff (the read is one 4 KB lookup).
        let unchanged = self
            .maglev
            .get(&svc.service_id, 0)
            .is_ok_and(|old| old.ids[..] == table.ids[..]);
        if !unchanged {
            self.maglev
                .insert(svc.service_id, table, 0)
                .map_err(map_err(map_names::MAGLEV))?;
        }
        Ok(ops)
    }

    /// Removes a NodePort frontend and its Maglev table.
    pub fn delete_nodeport(&mut self, spec: &ServiceSpec) -> Result<(), DatapathError> {
        let key = crate::plan::service_key(spec)?;
        if let Some(v) = self.state.services.get(&key).copied() {
            let _ = self.maglev.remove(&v.service_id);
        }
        self.delete_service(spec.vip, spec.port, spec.proto)?;
        Ok(())
    }

    /// NODE_CONFIG as it is now.
    pub fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        self.node_config
            .get(&0, 0)
            .map_err(map_err(map_names::NODE_CONFIG))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lb_mode_parses_what_the_flag_takes() {
        assert_eq!("snat".parse::<LbMode>(), Ok(LbMode::Snat));
        assert_eq!("dsr".parse::<LbMode>(), Ok(LbMode::Dsr));
        assert!("DSR-tunl".parse::<LbMode>().is_err());
        assert_eq!(LbMode::default(), LbMode::Snat);
        assert_eq!(LbMode::Dsr.to_string(), "dsr");
    }

    fn names(n: u32) -> Vec<(u32, String)> {
        (1..=n).map(|i| (i, format!("10.244.1.{i}:8080"))).collect()
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let t = maglev_table(&names(5), MAGLEV_M);
        assert!(t.iter().all(|&id| (1..=5).contains(&id)));
        for id in 1..=5 {
            let share = t.iter().filter(|&&x| x == id).count();
            // m/n = 204.2; Maglev's turn-taking keeps shares within a slot or two.
            assert!(
                (200..=209).contains(&share),
                "backend {id} has {share} slots"
            );
        }
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let mut rev = names(4);
        rev.reverse();
        assert_eq!(
            maglev_table(&names(4), MAGLEV_M),
            maglev_table(&rev, MAGLEV_M)
        );
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        let before = maglev_table(&names(5), MAGLEV_M);
        let after = maglev_table(&names(4), MAGLEV_M); // backend 5 removed
        let moved_others = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 5 && b != a)
            .count();
        // Slots of the surviving backends that changed owner: Maglev keeps this small.
        assert!(
            moved_others < MAGLEV_M / 10,
            "{moved_others} of {MAGLEV_M} slots of surviving backends moved"
        );
        assert!(after.iter().all(|&id| id != 5));
    }

    #[test]
    fn empty_backends_give_an_empty_table() {
        assert!(maglev_table(&[], MAGLEV_M).iter().all(|&x| x == 0));
    }
}
