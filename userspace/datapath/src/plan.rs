//! The service diff: desired services vs what the maps hold -> the list of map operations that
//! turns one into the other. Pure (no kernel, no clock), so it is unit-tested here and the
//! `Datapath` only executes what it returns.
//!
//! Operation order is part of the contract, so that a packet or connect() racing with an update
//! never finds a dangling reference: backends are written before the slots that name them, slots
//! before the service count that exposes them; the count shrinks before the slots beyond it are
//! deleted, and backends are deleted last (then their UDP conntrack entries are purged).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use skiff_ebpf_common::{
    Addr, BACKEND_ACTIVE, BACKEND_TERMINATING, Backend, BackendSlotKey, PROTO_TCP, PROTO_UDP,
    SCOPE_INTERNAL, SVC_F_AFFINITY, SVC_F_ETP_LOCAL, ServiceKey, ServiceValue, ip4_to_raw,
    port_to_raw,
};

use crate::DatapathError;

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// One endpoint of a service, as an EndpointSlice gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub ip: IpAddr,
    pub port: u16,
    /// conditions.ready
    pub ready: bool,
    /// conditions.terminating
    pub terminating: bool,
}

/// One service frontend (VIP, port, protocol) and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub backends: Vec<BackendSpec>,
    /// sessionAffinity: ClientIP with this timeout in seconds; None = no affinity.
    pub affinity_timeout: Option<u32>,
    /// externalTrafficPolicy=Local on a NodePort frontend: the client's source address is kept
    /// (no SNAT). The caller lists only this node's endpoints, as Kubernetes requires.
    pub external_traffic_local: bool,
}

/// What the SERVICES, BACKEND_SLOTS and BACKENDS maps hold (read from the kernel, or built by
/// applying operations). Change it only through [`MapState::apply`] or build it with
/// [`MapState::from_maps`]: both keep the per-service indexes that make planning one service
/// cost O(its backends + log N) instead of a scan of every map (10,000 services matter).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<BackendSlotKey, u32>,
    pub backends: BTreeMap<u32, Backend>,
    /// service id -> its backend ids (index over `backends`).
    service_backends: BTreeMap<u32, BTreeSet<u32>>,
    /// service ids in use (index over `services`).
    service_ids: BTreeSet<u32>,
}

/// One map operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutBackend {
        id: u32,
        backend: Backend,
    },
    PutSlot {
        key: BackendSlotKey,
        backend_id: u32,
    },
    PutService {
        key: ServiceKey,
        value: ServiceValue,
    },
    DeleteSlot {
        key: BackendSlotKey,
    },
    DeleteService {
        key: ServiceKey,
    },
    DeleteBackend {
        id: u32,
    },
    /// Delete the UDP conntrack and affinity entries that point at a removed backend, so a
    /// UDP client (DNS!) is not black-holed towards a backend that is gone.
    PurgeConntrack {
        backend_id: u32,
    },
}

impl MapState {
    /// Builds a state from map contents (as read from the kernel), with its indexes.
    pub fn from_maps(
        services: BTreeMap<ServiceKey, ServiceValue>,
        slots: BTreeMap<BackendSlotKey, u32>,
        backends: BTreeMap<u32, Backend>,
    ) -> MapState {
        let mut st = MapState {
            services,
            slots,
            backends,
            ..MapState::default()
        };
        for (id, b) in &st.backends {
            st.service_backends
                .entry(b.service_id)
                .or_default()
                .insert(*id);
        }
        st.service_ids = st.services.values().map(|v| v.service_id).collect();
        st
    }

    /// The backend ids of one service.
    pub fn backends_of(&self, service_id: u32) -> impl Iterator<Item = (u32, &Backend)> {
        self.service_backends
            .get(&service_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.backends.get(id).map(|b| (*id, b)))
    }

    /// The slot keys of one service, in slot order.
    pub fn slots_of(&self, service_id: u32) -> impl Iterator<Item = (&BackendSlotKey, &u32)> {
        self.slots.range(
            BackendSlotKey {
                service_id,
                slot: 0,
            }..=BackendSlotKey {
                service_id,
                slot: u32::MAX,
            },
        )
    }

    /// Applies one operation (what the kernel maps do, minus conntrack).
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::PutBackend { id, backend } => {
                if let Some(old) = self.backends.insert(*id, *backend) {
                    self.unindex_backend(*id, old.service_id);
                }
                self.service_backends
                    .entry(backend.service_id)
                    .or_default()
                    .insert(*id);
            }
            MapOp::PutSlot { key, backend_id } => {
                self.slots.insert(*key, *backend_id);
            }
            MapOp::PutService { key, value } => {
                if let Some(old) = self.services.insert(*key, *value) {
                    self.service_ids.remove(&old.service_id);
                }
                self.service_ids.insert(value.service_id);
            }
            MapOp::DeleteSlot { key } => {
                self.slots.remove(key);
            }
            MapOp::DeleteService { key } => {
                if let Some(old) = self.services.remove(key) {
                    self.service_ids.remove(&old.service_id);
                }
            }
            MapOp::DeleteBackend { id } => {
                if let Some(old) = self.backends.remove(id) {
                    self.unindex_backend(*id, old.service_id);
                }
            }
            MapOp::PurgeConntrack { .. } => {}
        }
    }

    /// Applies a run of operations, as [`MapState::apply`] one by one would. A long run of puts
    /// into a map that is small next to it (a first sync: 100,000 backends into an empty map)
    /// is merged in bulk (BTreeMap::append builds the tree from sorted input in linear time)
    /// rather than inserted key by key.
    pub fn apply_all(&mut self, ops: &[MapOp]) {
        const BULK_MIN: usize = 1024;
        let all = |pred: fn(&MapOp) -> bool| ops.iter().all(pred);
        if ops.len() >= BULK_MIN
            && ops.len() >= self.backends.len()
            && all(|o| matches!(o, MapOp::PutBackend { .. }))
        {
            let mut new: BTreeMap<u32, Backend> = ops
                .iter()
                .filter_map(|o| match o {
                    MapOp::PutBackend { id, backend } => Some((*id, *backend)),
                    _ => None,
                })
                .collect();
            let replaced: Vec<(u32, u32)> = new
                .keys()
                .filter_map(|id| self.backends.get(id).map(|old| (*id, old.service_id)))
                .collect();
            for (id, service_id) in replaced {
                self.unindex_backend(id, service_id);
            }
            // Plans write a service's backends together: index them a service at a time.
            for group in ops.chunk_by(|a, b| match (a, b) {
                (MapOp::PutBackend { backend: x, .. }, MapOp::PutBackend { backend: y, .. }) => {
                    x.service_id == y.service_id
                }
                _ => false,
            }) {
                let ids = group.iter().filter_map(|o| match o {
                    MapOp::PutBackend { id, .. } => Some(*id),
                    _ => None,
                });
                if let Some(MapOp::PutBackend { backend, .. }) = group.first() {
                    let set = self.service_backends.entry(backend.service_id).or_default();
                    if set.is_empty() {
                        *set = ids.collect();
                    } else {
                        set.extend(ids);
                    }
                }
            }
            self.backends.append(&mut new);
        } else if ops.len() >= BULK_MIN
            && ops.len() >= self.slots.len()
            && all(|o| matches!(o, MapOp::PutSlot { .. }))
        {
            let mut new: BTreeMap<BackendSlotKey, u32> = ops
                .iter()
                .filter_map(|o| match o {
                    MapOp::PutSlot { key, backend_id } => Some((*key, *backend_id)),
                    _ => None,
                })
                .collect();
            self.slots.append(&mut new);
        } else if ops.len() >= BULK_MIN
            && ops.len() >= self.services.len()
            && all(|o| matches!(o, MapOp::PutService { .. }))
        {
            let mut new: BTreeMap<ServiceKey, ServiceValue> = ops
                .iter()
                .filter_map(|o| match o {
                    MapOp::PutService { key, value } => Some((*key, *value)),
                    _ => None,
                })
                .collect();
            let replaced: Vec<u32> = new
                .keys()
                .filter_map(|k| self.services.get(k).map(|v| v.service_id))
                .collect();
            for id in replaced {
                self.service_ids.remove(&id);
            }
            let mut ids: BTreeSet<u32> = new.values().map(|v| v.service_id).collect();
            self.service_ids.append(&mut ids);
            self.services.append(&mut new);
        } else {
            for op in ops {
                self.apply(op);
            }
        }
    }

    fn unindex_backend(&mut self, id: u32, service_id: u32) {
        if let Some(set) = self.service_backends.get_mut(&service_id) {
            set.remove(&id);
            if set.is_empty() {
                self.service_backends.remove(&service_id);
            }
        }
    }
}

fn v4(ip: IpAddr, what: &str) -> Result<Addr, DatapathError> {
    match ip {
        IpAddr::V4(v) => Ok(Addr::v4_raw(ip4_to_raw(v.octets()))),
        IpAddr::V6(_) => Err(DatapathError::InvalidService(format!(
            "{what} {ip} is IPv6, which the datapath does not program yet: use an IPv4 address"
        ))),
    }
}

/// The SERVICES key of a spec.
pub fn service_key(spec: &ServiceSpec) -> Result<ServiceKey, DatapathError> {
    Ok(ServiceKey {
        addr: v4(spec.vip, "service address")?,
        port: port_to_raw(spec.port),
        proto: spec.proto.number(),
        scope: SCOPE_INTERNAL,
    })
}

/// Hands out ids of one kind (service or backend) for one plan: one above the highest in the
/// state or handed out before (O(1)), or, once the top of the u32 range is reached, the lowest
/// gap. An id this plan deletes stays in the state it plans against, so it is never handed out
/// again by the same plan: that is what lets [`plan_sync`] group its operations by kind (a put
/// and a delete of one key in one plan would otherwise depend on their order).
#[derive(Clone, Debug)]
struct IdRange {
    /// The highest id in the state.
    state_max: u32,
    /// The highest id handed out by counting up (>= state_max; 0: none yet).
    highest: u32,
    /// Ids handed out by the gap search.
    gaps: BTreeSet<u32>,
}

impl IdRange {
    fn new(state_max: Option<u32>) -> IdRange {
        let m = state_max.unwrap_or(0);
        IdRange {
            state_max: m,
            highest: m,
            gaps: BTreeSet::new(),
        }
    }

    fn next(&mut self, in_state: impl Fn(u32) -> bool) -> Result<u32, DatapathError> {
        if self.highest < u32::MAX {
            self.highest += 1;
            return Ok(self.highest);
        }
        // Everything above state_max is handed out: look for a gap below it.
        let id = (1..=self.state_max)
            .find(|id| !in_state(*id) && !self.gaps.contains(id))
            .ok_or_else(|| DatapathError::InvalidService("no free id left in the maps".into()))?;
        self.gaps.insert(id);
        Ok(id)
    }
}

/// The ids one plan hands out.
#[derive(Clone, Debug)]
struct IdAlloc {
    services: IdRange,
    backends: IdRange,
}

impl IdAlloc {
    fn new(state: &MapState) -> IdAlloc {
        IdAlloc {
            services: IdRange::new(state.service_ids.last().copied()),
            backends: IdRange::new(state.backends.keys().next_back().copied()),
        }
    }
}

/// Operations that make the maps hold `spec` (creating the service or updating it in place).
pub fn plan_upsert(spec: &ServiceSpec, state: &MapState) -> Result<Vec<MapOp>, DatapathError> {
    let mut ops = Vec::new();
    plan_upsert_into(spec, state, &mut IdAlloc::new(state), &mut ops)?;
    Ok(ops)
}

/// [`plan_upsert`] appending to `ops`, with ids from `ids`. On an error nothing is appended.
fn plan_upsert_into(
    spec: &ServiceSpec,
    state: &MapState,
    ids: &mut IdAlloc,
    out: &mut Vec<MapOp>,
) -> Result<(), DatapathError> {
    let key = service_key(spec)?;
    if spec.port == 0 {
        return Err(DatapathError::InvalidService(format!(
            "service {}: port 0 is not a valid port",
            spec.vip
        )));
    }
    if spec.affinity_timeout == Some(0) {
        return Err(DatapathError::InvalidService(format!(
            "service {}:{}: affinity timeout must be at least 1 second",
            spec.vip, spec.port
        )));
    }
    // Validate every backend before planning anything: bad input changes nothing. A sorted
    // vector rather than a map: a service has a handful of backends, planned 10,000 times.
    let mut desired: Vec<((Addr, u16), u8)> = Vec::with_capacity(spec.backends.len());
    for b in &spec.backends {
        let addr = v4(b.ip, "backend address")?;
        if b.port == 0 {
            return Err(DatapathError::InvalidService(format!(
                "service {}:{}: backend {} has port 0",
                spec.vip, spec.port, b.ip
            )));
        }
        // Only Ready endpoints get new flows. A terminating (or not ready) endpoint stays in
        // BACKENDS so its established flows keep working, but gets no slot.
        let state_byte = if b.ready && !b.terminating {
            BACKEND_ACTIVE
        } else {
            BACKEND_TERMINATING
        };
        desired.push(((addr, port_to_raw(b.port)), state_byte));
    }
    desired.sort_unstable_by_key(|(k, _)| *k);
    if let Some(w) = desired.windows(2).find(|w| w[0].0 == w[1].0) {
        let (addr, port) = w[0].0;
        return Err(DatapathError::InvalidService(format!(
            "service {}:{}: backend {}:{} is listed twice",
            spec.vip,
            spec.port,
            std::net::Ipv4Addr::from(skiff_ebpf_common::raw_to_ip4(addr.v4_word())),
            skiff_ebpf_common::raw_to_port(port)
        )));
    }

    let existing = state.services.get(&key).copied();
    // Ids are taken from a copy, committed only when the plan succeeds.
    let mut new_ids = ids.clone();
    let service_id = match existing {
        Some(v) => v.service_id,
        None => new_ids
            .services
            .next(|id| state.service_ids.contains(&id))?,
    };
    let proto = spec.proto.number();

    // This service's backends now in the maps, by (addr, port).
    let current: BTreeMap<(Addr, u16), (u32, Backend)> = state
        .backends_of(service_id)
        .map(|(id, b)| ((b.addr, b.port), (id, *b)))
        .collect();

    let mut ops = Vec::with_capacity(desired.len() * 2 + 1);
    let mut active_ids = Vec::with_capacity(desired.len());
    for &((addr, port), state_byte) in &desired {
        let backend = Backend {
            addr,
            port,
            proto,
            state: state_byte,
            service_id,
        };
        let id = match current.get(&(addr, port)) {
            Some(&(id, old)) => {
                if old != backend {
                    ops.push(MapOp::PutBackend { id, backend });
                }
                id
            }
            None => {
                let id = new_ids
                    .backends
                    .next(|id| state.backends.contains_key(&id))?;
                ops.push(MapOp::PutBackend { id, backend });
                id
            }
        };
        if state_byte == BACKEND_ACTIVE {
            active_ids.push(id);
        }
    }

    // Slots: an active backend keeps the slot it has (fewer writes, and a reader racing with the
    // update never sees one backend twice for long); newcomers fill the holes left by backends
    // that stopped being active, then go at the end; remaining holes are closed by moving the
    // last slot into them.
    let old_count = existing.map(|v| v.backend_count).unwrap_or(0);
    let mut active_sorted = active_ids.clone();
    active_sorted.sort_unstable();
    let mut slots: Vec<Option<u32>> = state
        .slots_of(service_id)
        .filter(|(k, _)| k.slot < old_count)
        .map(|(_, id)| Some(*id).filter(|id| active_sorted.binary_search(id).is_ok()))
        .collect();
    let mut placed: Vec<u32> = slots.iter().flatten().copied().collect();
    placed.sort_unstable();
    let mut fresh = active_ids
        .iter()
        .copied()
        .filter(|id| placed.binary_search(id).is_err());
    for s in slots.iter_mut() {
        if s.is_none() {
            *s = fresh.next();
        }
    }
    slots.extend(fresh.map(Some));
    loop {
        while matches!(slots.last(), Some(None)) {
            slots.pop();
        }
        match slots.iter().position(|s| s.is_none()) {
            Some(hole) => {
                let last = slots.pop().flatten();
                slots[hole] = last;
            }
            None => break,
        }
    }
    let active_ids: Vec<u32> = slots.into_iter().flatten().collect();
    for (slot, &backend_id) in active_ids.iter().enumerate() {
        let key = BackendSlotKey {
            service_id,
            slot: slot as u32,
        };
        if state.slots.get(&key) != Some(&backend_id) {
            ops.push(MapOp::PutSlot { key, backend_id });
        }
    }

    let value = ServiceValue {
        service_id,
        backend_count: active_ids.len() as u32,
        flags: if spec.affinity_timeout.is_some() {
            SVC_F_AFFINITY
        } else {
            0
        } | if spec.external_traffic_local {
            SVC_F_ETP_LOCAL
        } else {
            0
        },
        _pad: 0,
        affinity_timeout_s: spec.affinity_timeout.unwrap_or(0),
    };
    if existing != Some(value) {
        ops.push(MapOp::PutService { key, value });
    }

    for (slot_key, _) in state
        .slots_of(service_id)
        .filter(|(k, _)| k.slot as usize >= active_ids.len())
    {
        ops.push(MapOp::DeleteSlot { key: *slot_key });
    }
    for (addr_port, (id, _)) in &current {
        if desired
            .binary_search_by_key(addr_port, |(k, _)| *k)
            .is_err()
        {
            ops.push(MapOp::DeleteBackend { id: *id });
            ops.push(MapOp::PurgeConntrack { backend_id: *id });
        }
    }
    *ids = new_ids;
    out.append(&mut ops);
    Ok(())
}

/// Operations that remove a service (no-op if it is not there).
pub fn plan_delete(key: &ServiceKey, state: &MapState) -> Vec<MapOp> {
    let Some(value) = state.services.get(key) else {
        return Vec::new();
    };
    let service_id = value.service_id;
    let mut ops = vec![MapOp::DeleteService { key: *key }];
    for (slot_key, _) in state.slots_of(service_id) {
        ops.push(MapOp::DeleteSlot { key: *slot_key });
    }
    for (id, _) in state.backends_of(service_id) {
        ops.push(MapOp::DeleteBackend { id });
        ops.push(MapOp::PurgeConntrack { backend_id: id });
    }
    ops
}

/// The phase an operation runs in when [`plan_sync`] groups a whole sync by kind. Each
/// service's own order (backends before the slots that name them, slots before the count that
/// exposes them, the count shrinking before the slots beyond it go, backends deleted last) holds
/// across the phases, and no key is both written and deleted in one plan (ids are never reused
/// within a plan; stale and desired services have different keys), so the grouped order is as
/// safe as the per-service one. It lets the datapath write each phase as batches.
fn phase(op: &MapOp) -> u8 {
    match op {
        MapOp::PutBackend { .. } => 0,
        MapOp::PutSlot { .. } => 1,
        MapOp::PutService { .. } | MapOp::DeleteService { .. } => 2,
        MapOp::DeleteSlot { .. } => 3,
        MapOp::DeleteBackend { .. } => 4,
        MapOp::PurgeConntrack { .. } => 5,
    }
}

/// Operations that make the maps hold exactly `desired` (services not in it are deleted),
/// grouped by kind (see [`phase`]). Every service is planned against `state` itself: services
/// do not share map entries, only the id counters, so no working copy of the maps is needed.
pub fn plan_sync(desired: &[ServiceSpec], state: &MapState) -> Result<Vec<MapOp>, DatapathError> {
    let mut keys = Vec::with_capacity(desired.len());
    for spec in desired {
        keys.push(service_key(spec)?);
    }
    keys.sort_unstable();
    if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
        let spec = desired
            .iter()
            .find(|s| service_key(s).ok() == Some(w[0]))
            .ok_or_else(|| DatapathError::InvalidService("a service is listed twice".into()))?;
        return Err(DatapathError::InvalidService(format!(
            "service {}:{}/{:?} is listed twice",
            spec.vip, spec.port, spec.proto
        )));
    }
    let mut ops = Vec::new();
    for key in state.services.keys() {
        if keys.binary_search(key).is_err() {
            ops.extend(plan_delete(key, state));
        }
    }
    let mut ids = IdAlloc::new(state);
    for spec in desired {
        plan_upsert_into(spec, state, &mut ids, &mut ops)?;
    }
    // Bucketed by phase (a stable, linear sort): within a phase, operations keep their
    // per-service order.
    let mut phases: [Vec<MapOp>; 6] = Default::default();
    for op in ops {
        phases[phase(&op) as usize].push(op);
    }
    Ok(phases.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn b(last: u8, port: u16, ready: bool, terminating: bool) -> BackendSpec {
        BackendSpec {
            ip: IpAddr::V4(Ipv4Addr::new(10, 244, 0, last)),
            port,
            ready,
            terminating,
        }
    }

    fn svc(backends: Vec<BackendSpec>) -> ServiceSpec {
        ServiceSpec {
            vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            port: 80,
            proto: Proto::Tcp,
            backends,
            affinity_timeout: None,
            external_traffic_local: false,
        }
    }

    fn applied(state: &MapState, ops: &[MapOp]) -> MapState {
        let mut s = state.clone();
        for op in ops {
            s.apply(op);
        }
        s
    }

    /// The active backends a datapath would pick from, as (addr last octet, port).
    fn active(state: &MapState, spec: &ServiceSpec) -> Vec<(u8, u16)> {
        let Ok(key) = service_key(spec) else {
            return vec![];
        };
        let Some(v) = state.services.get(&key) else {
            return vec![];
        };
        let mut out: Vec<(u8, u16)> = (0..v.backend_count)
            .map(|slot| {
                let id = state.slots[&BackendSlotKey {
                    service_id: v.service_id,
                    slot,
                }];
                let be = state.backends[&id];
                (
                    skiff_ebpf_common::raw_to_ip4(be.addr.v4_word())[3],
                    skiff_ebpf_common::raw_to_port(be.port),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn new_service_gets_backends_slots_then_service() {
        let spec = svc(vec![b(11, 8080, true, false), b(12, 8080, true, false)]);
        let ops = plan_upsert(&spec, &MapState::default()).expect("valid spec");
        let kinds: Vec<&str> = ops
            .iter()
            .map(|o| match o {
                MapOp::PutBackend { .. } => "backend",
                MapOp::PutSlot { .. } => "slot",
                MapOp::PutService { .. } => "service",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["backend", "backend", "slot", "slot", "service"]);
        let s = applied(&MapState::default(), &ops);
        assert_eq!(active(&s, &spec), vec![(11, 8080), (12, 8080)]);
    }

    #[test]
    fn same_spec_twice_is_a_no_op() {
        let spec = svc(vec![b(11, 8080, true, false), b(12, 8080, true, false)]);
        let s = applied(
            &MapState::default(),
            &plan_upsert(&spec, &MapState::default()).expect("valid"),
        );
        assert_eq!(plan_upsert(&spec, &s).expect("valid"), vec![]);
    }

    #[test]
    fn terminating_backend_keeps_its_entry_but_loses_its_slot() {
        let before = svc(vec![b(11, 80, true, false), b(12, 80, true, false)]);
        let s1 = applied(
            &MapState::default(),
            &plan_upsert(&before, &MapState::default()).expect("valid"),
        );
        let after = svc(vec![b(11, 80, true, false), b(12, 80, false, true)]);
        let ops = plan_upsert(&after, &s1).expect("valid");
        let s2 = applied(&s1, &ops);
        assert_eq!(active(&s2, &after), vec![(11, 80)]);
        assert_eq!(
            s2.backends.len(),
            2,
            "terminating backend stays for established flows"
        );
        assert!(
            !ops.iter()
                .any(|o| matches!(o, MapOp::PurgeConntrack { .. }))
        );
        // The count shrinks before the extra slot is deleted.
        let svc_pos = ops
            .iter()
            .position(|o| matches!(o, MapOp::PutService { .. }));
        let del_pos = ops
            .iter()
            .position(|o| matches!(o, MapOp::DeleteSlot { .. }));
        assert!(svc_pos < del_pos && del_pos.is_some());
    }

    #[test]
    fn active_backends_keep_their_slots() {
        let before = svc(vec![
            b(11, 80, true, false),
            b(12, 80, true, false),
            b(13, 80, true, false),
        ]);
        let s1 = applied(
            &MapState::default(),
            &plan_upsert(&before, &MapState::default()).expect("valid"),
        );
        // 11 leaves, 10 arrives (sorts first): only the freed slot changes.
        let after = svc(vec![
            b(10, 80, true, false),
            b(12, 80, true, false),
            b(13, 80, true, false),
        ]);
        let ops = plan_upsert(&after, &s1).expect("valid");
        let slot_writes = ops
            .iter()
            .filter(|o| matches!(o, MapOp::PutSlot { .. }))
            .count();
        assert_eq!(slot_writes, 1, "{ops:?}");
        let s2 = applied(&s1, &ops);
        assert_eq!(active(&s2, &after), vec![(10, 80), (12, 80), (13, 80)]);
        // Shrinking closes the hole with the last slot.
        let smaller = svc(vec![b(13, 80, true, false)]);
        let s3 = applied(&s2, &plan_upsert(&smaller, &s2).expect("valid"));
        assert_eq!(active(&s3, &smaller), vec![(13, 80)]);
        assert_eq!(s3.slots.len(), 1);
    }

    #[test]
    fn removed_backend_is_deleted_and_its_conntrack_purged() {
        let before = svc(vec![b(11, 53, true, false), b(12, 53, true, false)]);
        let s1 = applied(
            &MapState::default(),
            &plan_upsert(&before, &MapState::default()).expect("valid"),
        );
        let removed_id = s1
            .backends
            .iter()
            .find(|(_, be)| skiff_ebpf_common::raw_to_ip4(be.addr.v4_word())[3] == 12)
            .map(|(id, _)| *id)
            .expect("backend 12 present");
        let ops = plan_upsert(&svc(vec![b(11, 53, true, false)]), &s1).expect("valid");
        assert!(ops.contains(&MapOp::DeleteBackend { id: removed_id }));
        assert!(ops.contains(&MapOp::PurgeConntrack {
            backend_id: removed_id
        }));
        let s2 = applied(&s1, &ops);
        assert_eq!(s2.backends.len(), 1);
        assert_eq!(s2.slots.len(), 1);
    }

    #[test]
    fn ids_do_not_collide_across_services() {
        let a = svc(vec![b(11, 80, true, false)]);
        let mut c = svc(vec![b(11, 80, true, false), b(13, 80, true, false)]);
        c.vip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11));
        let ops = plan_sync(&[a.clone(), c.clone()], &MapState::default()).expect("valid");
        let s = applied(&MapState::default(), &ops);
        assert_eq!(s.services.len(), 2);
        assert_eq!(s.backends.len(), 3);
        let ids: BTreeSet<u32> = s.services.values().map(|v| v.service_id).collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(active(&s, &c), vec![(11, 80), (13, 80)]);
        // Syncing to only `c` deletes `a` and everything it owned.
        let s2 = applied(&s, &plan_sync(&[c.clone()], &s).expect("valid"));
        assert_eq!(s2.services.len(), 1);
        assert_eq!(s2.backends.len(), 2);
        assert_eq!(active(&s2, &c), vec![(11, 80), (13, 80)]);
    }

    #[test]
    fn delete_removes_everything_the_service_owned() {
        let spec = svc(vec![b(11, 80, true, false), b(12, 80, false, true)]);
        let s = applied(
            &MapState::default(),
            &plan_upsert(&spec, &MapState::default()).expect("valid"),
        );
        let s2 = applied(&s, &plan_delete(&service_key(&spec).expect("v4"), &s));
        assert_eq!(s2, MapState::default());
    }

    #[test]
    fn affinity_sets_flag_and_timeout() {
        let mut spec = svc(vec![b(11, 80, true, false)]);
        spec.affinity_timeout = Some(30);
        let ops = plan_upsert(&spec, &MapState::default()).expect("valid");
        let Some(MapOp::PutService { value, .. }) =
            ops.iter().find(|o| matches!(o, MapOp::PutService { .. }))
        else {
            panic!("no service op in {ops:?}");
        };
        assert_eq!(value.flags & SVC_F_AFFINITY, SVC_F_AFFINITY);
        assert_eq!(value.affinity_timeout_s, 30);
    }

    #[test]
    fn bad_input_is_rejected_before_any_op() {
        let mut v6 = svc(vec![b(11, 80, true, false)]);
        v6.vip = "fd00::1".parse().expect("literal");
        assert!(matches!(
            plan_upsert(&v6, &MapState::default()),
            Err(DatapathError::InvalidService(_))
        ));
        let dup = svc(vec![b(11, 80, true, false), b(11, 80, true, false)]);
        assert!(plan_upsert(&dup, &MapState::default()).is_err());
        let port0 = svc(vec![b(11, 0, true, false)]);
        assert!(plan_upsert(&port0, &MapState::default()).is_err());
        let mut aff0 = svc(vec![]);
        aff0.affinity_timeout = Some(0);
        assert!(plan_upsert(&aff0, &MapState::default()).is_err());
    }

    fn numbered(i: u8, backends: Vec<BackendSpec>) -> ServiceSpec {
        let mut s = svc(backends);
        s.vip = IpAddr::V4(Ipv4Addr::new(10, 96, 1, i));
        s
    }

    #[test]
    fn sync_groups_ops_by_kind_and_reuses_no_id_it_frees() {
        // Start: services 1..=3; then a sync drops 3, changes 2 and adds 4.
        let first: Vec<ServiceSpec> = (1..=3)
            .map(|i| {
                numbered(
                    i,
                    vec![b(10 + i, 80, true, false), b(20 + i, 80, true, false)],
                )
            })
            .collect();
        let s1 = applied(
            &MapState::default(),
            &plan_sync(&first, &MapState::default()).expect("valid"),
        );
        let second = vec![
            first[0].clone(),
            numbered(2, vec![b(12, 80, true, false), b(30, 80, true, false)]),
            numbered(4, vec![b(14, 80, true, false)]),
        ];
        let ops = plan_sync(&second, &s1).expect("valid");
        let phases: Vec<u8> = ops.iter().map(phase).collect();
        let mut sorted = phases.clone();
        sorted.sort();
        assert_eq!(phases, sorted, "grouped by kind: {ops:?}");
        // No key is written and deleted in the same plan.
        let put_ids: BTreeSet<u32> = ops
            .iter()
            .filter_map(|o| match o {
                MapOp::PutBackend { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        let del_ids: BTreeSet<u32> = ops
            .iter()
            .filter_map(|o| match o {
                MapOp::DeleteBackend { id } => Some(*id),
                _ => None,
            })
            .collect();
        assert!(put_ids.is_disjoint(&del_ids), "{put_ids:?} vs {del_ids:?}");
        let put_slots: BTreeSet<BackendSlotKey> = ops
            .iter()
            .filter_map(|o| match o {
                MapOp::PutSlot { key, .. } => Some(*key),
                _ => None,
            })
            .collect();
        assert!(
            ops.iter()
                .all(|o| !matches!(o, MapOp::DeleteSlot { key } if put_slots.contains(key)))
        );
        let s2 = applied(&s1, &ops);
        // The result is what planning service by service gives (the maps' meaning).
        for spec in &second {
            assert!(
                plan_upsert(spec, &s2).expect("valid").is_empty(),
                "{spec:?} already there"
            );
        }
        assert_eq!(s2.services.len(), 3);
        assert_eq!(s2.backends.len(), 5);
        assert_eq!(active(&s2, &second[1]), vec![(12, 80), (30, 80)]);
        let new_id = s2.services[&service_key(&second[2]).expect("v4")].service_id;
        let old_ids: BTreeSet<u32> = s1.services.values().map(|v| v.service_id).collect();
        assert!(
            !old_ids.contains(&new_id),
            "service 3's id is not reused in the same sync"
        );
        // And a sync to the same set is empty.
        assert!(plan_sync(&second, &s2).expect("valid").is_empty());
    }

    #[test]
    fn a_failed_plan_hands_out_no_ids() {
        let good = numbered(1, vec![b(11, 80, true, false)]);
        let bad = numbered(2, vec![b(12, 80, true, false), b(12, 80, true, false)]);
        assert!(plan_sync(&[good.clone(), bad], &MapState::default()).is_err());
        let ops = plan_sync(&[good], &MapState::default()).expect("valid");
        assert!(
            ops.contains(&MapOp::PutBackend {
                id: 1,
                backend: Backend {
                    addr: Addr::v4([10, 244, 0, 11]),
                    port: port_to_raw(80),
                    proto: PROTO_TCP,
                    state: BACKEND_ACTIVE,
                    service_id: 1,
                }
            }),
            "{ops:?}"
        );
    }

    #[test]
    fn bulk_apply_equals_one_by_one() {
        // A first sync big enough for the bulk path, then a second over it (replacing entries).
        let specs: Vec<ServiceSpec> = (0..300u32)
            .map(|i| {
                let mut s = svc((0..5)
                    .map(|k| b(k + 1, 8000 + i as u16, k != 4, k == 4))
                    .collect());
                s.vip = IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i));
                s
            })
            .collect();
        let ops = plan_sync(&specs, &MapState::default()).expect("valid");
        let one_by_one = applied(&MapState::default(), &ops);
        let mut bulk = MapState::default();
        for run in ops.chunk_by(|a, b| phase(a) == phase(b)) {
            bulk.apply_all(run);
        }
        assert_eq!(bulk, one_by_one);
        assert_eq!(
            bulk,
            MapState::from_maps(
                bulk.services.clone(),
                bulk.slots.clone(),
                bulk.backends.clone()
            ),
            "indexes right"
        );
        let mut changed = specs.clone();
        for s in changed.iter_mut() {
            s.backends[4].ready = true;
            s.backends[4].terminating = false;
        }
        let ops2 = plan_sync(&changed, &bulk).expect("valid");
        let want = applied(&bulk, &ops2);
        for run in ops2.chunk_by(|a, b| phase(a) == phase(b)) {
            bulk.apply_all(run);
        }
        assert_eq!(bulk, want);
        assert_eq!(
            bulk,
            MapState::from_maps(
                bulk.services.clone(),
                bulk.slots.clone(),
                bulk.backends.clone()
            )
        );
    }
}
