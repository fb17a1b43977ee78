//! What each Service owns in the maps and what was last written for it. Pure bookkeeping: it
//! turns "service S now wants frontends D" into the frontend upserts and deletes that differ from
//! what was applied, and settles two Services claiming one frontend (the same externalIP:port,
//! say): the first claimant keeps it, the other waits and is re-planned when it is released.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::translate::{Frontend, FrontendKey};

/// namespace/name of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ServiceRef {
        ServiceRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The frontend changes for one service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserts: Vec<Frontend>,
    /// What to remove, as it was applied (None: its state in the maps is unknown after a failed
    /// write; delete it as an external frontend, which also covers its Maglev table).
    pub deletes: Vec<(FrontendKey, Option<Frontend>)>,
    /// Frontends another service owns: (frontend, its owner).
    pub conflicts: Vec<(FrontendKey, ServiceRef)>,
    /// Services that were waiting for a frontend this plan released: plan them again.
    pub released_to: BTreeSet<ServiceRef>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Per service: its frontends as applied (None = unknown after a failed write).
    applied: BTreeMap<ServiceRef, BTreeMap<FrontendKey, Option<Frontend>>>,
    owner: BTreeMap<FrontendKey, ServiceRef>,
    waiting: BTreeMap<FrontendKey, BTreeSet<ServiceRef>>,
}

impl Ledger {
    /// Plans `svc` wanting `desired` (empty when the Service is gone), claiming and releasing
    /// frontends. The caller applies the changes and reports back with [`Ledger::applied_ok`],
    /// [`Ledger::upsert_failed`], [`Ledger::deleted`] or [`Ledger::delete_failed`].
    pub fn plan(&mut self, svc: &ServiceRef, desired: Vec<Frontend>) -> Changes {
        let mut changes = Changes::default();
        // Stop waiting for anything; re-register below for what is still contested.
        for waiters in self.waiting.values_mut() {
            waiters.remove(svc);
        }
        self.waiting.retain(|_, w| !w.is_empty());

        let mut wanted: BTreeMap<FrontendKey, Frontend> = BTreeMap::new();
        for f in desired {
            let key = f.key();
            match self.owner.get(&key) {
                Some(o) if o != svc => {
                    changes.conflicts.push((key, o.clone()));
                    self.waiting.entry(key).or_default().insert(svc.clone());
                }
                _ => {
                    wanted.insert(key, f);
                }
            }
        }
        let applied = self.applied.entry(svc.clone()).or_default();
        for (key, was) in applied.iter() {
            if !wanted.contains_key(key) {
                changes.deletes.push((*key, was.clone()));
            }
        }
        for (key, f) in &wanted {
            if applied.get(key) != Some(&Some(f.clone())) {
                changes.upserts.push(f.clone());
            }
        }
        // Claims follow what is wanted now; a released frontend goes to its waiters.
        let released: Vec<FrontendKey> = self
            .owner
            .iter()
            .filter(|(k, o)| *o == svc && !wanted.contains_key(k))
            .map(|(k, _)| *k)
            .collect();
        for key in released {
            self.owner.remove(&key);
            if let Some(w) = self.waiting.get(&key) {
                changes.released_to.extend(w.iter().cloned());
            }
        }
        for key in wanted.keys() {
            self.owner.insert(*key, svc.clone());
        }
        changes
    }

    /// `f` is in the maps as planned.
    pub fn applied_ok(&mut self, svc: &ServiceRef, f: Frontend) {
        self.applied
            .entry(svc.clone())
            .or_default()
            .insert(f.key(), Some(f));
    }

    /// Writing `key` failed: its state in the maps is unknown until the next plan rewrites it.
    pub fn upsert_failed(&mut self, svc: &ServiceRef, key: FrontendKey) {
        self.applied
            .entry(svc.clone())
            .or_default()
            .insert(key, None);
    }

    /// `key` is gone from the maps.
    pub fn deleted(&mut self, svc: &ServiceRef, key: FrontendKey) {
        if let Some(m) = self.applied.get_mut(svc) {
            m.remove(&key);
            if m.is_empty() {
                self.applied.remove(svc);
            }
        }
    }

    /// Deleting `key` failed: keep it so the next plan deletes it again.
    pub fn delete_failed(&mut self, svc: &ServiceRef, key: FrontendKey) {
        self.upsert_failed(svc, key);
    }

    /// Drops the empty entry of a service that owns nothing any more.
    pub fn forget_if_empty(&mut self, svc: &ServiceRef) {
        if self.applied.get(svc).is_some_and(|m| m.is_empty()) {
            self.applied.remove(svc);
        }
    }

    /// Services with anything applied (or pending deletion).
    pub fn services(&self) -> impl Iterator<Item = &ServiceRef> {
        self.applied.keys()
    }

    /// Services with at least one frontend in the maps, and the number of those frontends.
    pub fn programmed(&self) -> (usize, usize) {
        let mut services = 0;
        let mut frontends = 0;
        for m in self.applied.values() {
            let n = m.values().filter(|f| f.is_some()).count();
            if n > 0 {
                services += 1;
                frontends += n;
            }
        }
        (services, frontends)
    }

    /// Every frontend the ledger believes is in the maps (for the startup sync).
    pub fn all_applied(&self) -> impl Iterator<Item = &Frontend> {
        self.applied.values().flat_map(|m| m.values().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::FrontendKind;
    use skiff_datapath::{BackendSpec, Proto, ServiceSpec};
    use std::net::IpAddr;

    fn fe(vip: &str, port: u16, backends: &[&str]) -> Frontend {
        Frontend {
            kind: FrontendKind::ClusterIp,
            spec: ServiceSpec {
                vip: vip.parse().expect("literal"),
                port,
                proto: Proto::Tcp,
                backends: backends
                    .iter()
                    .map(|b| BackendSpec {
                        ip: b.parse::<IpAddr>().expect("literal"),
                        port: 8080,
                        ready: true,
                        terminating: false,
                    })
                    .collect(),
                affinity_timeout: None,
                external_traffic_local: false,
            },
        }
    }

    fn apply_all(l: &mut Ledger, svc: &ServiceRef, c: &Changes) {
        for f in &c.upserts {
            l.applied_ok(svc, f.clone());
        }
        for (k, _) in &c.deletes {
            l.deleted(svc, *k);
        }
    }

    #[test]
    fn only_changed_frontends_are_planned() {
        let mut l = Ledger::default();
        let s = ServiceRef::new("default", "web");
        let c = l.plan(
            &s,
            vec![
                fe("10.96.0.10", 80, &["10.244.1.10"]),
                fe("10.96.0.10", 443, &[]),
            ],
        );
        assert_eq!(c.upserts.len(), 2);
        apply_all(&mut l, &s, &c);
        // Same input: nothing to do.
        assert!(
            l.plan(
                &s,
                vec![
                    fe("10.96.0.10", 80, &["10.244.1.10"]),
                    fe("10.96.0.10", 443, &[])
                ]
            )
            .is_empty()
        );
        // One backend changes on port 80, port 443 goes away.
        let c = l.plan(&s, vec![fe("10.96.0.10", 80, &["10.244.1.11"])]);
        assert_eq!(c.upserts, vec![fe("10.96.0.10", 80, &["10.244.1.11"])]);
        assert_eq!(c.deletes.len(), 1);
        assert_eq!(c.deletes[0].0.port, 443);
        apply_all(&mut l, &s, &c);
        assert_eq!(l.programmed(), (1, 1));
        // The service goes: everything it owned is deleted and it is forgotten.
        let c = l.plan(&s, vec![]);
        assert_eq!(c.deletes.len(), 1);
        apply_all(&mut l, &s, &c);
        l.forget_if_empty(&s);
        assert_eq!(l.services().count(), 0);
    }

    #[test]
    fn failed_writes_are_retried_by_the_next_plan() {
        let mut l = Ledger::default();
        let s = ServiceRef::new("default", "web");
        let f = fe("10.96.0.10", 80, &["10.244.1.10"]);
        let c = l.plan(&s, vec![f.clone()]);
        l.upsert_failed(&s, c.upserts[0].key());
        assert_eq!(l.plan(&s, vec![f.clone()]).upserts, vec![f.clone()]);
        assert_eq!(l.programmed(), (0, 0));
        // A failed delete is deleted again, and an unknown state deletes as "None".
        let c = l.plan(&s, vec![]);
        assert_eq!(c.deletes, vec![(f.key(), None)]);
        l.delete_failed(&s, f.key());
        assert_eq!(l.plan(&s, vec![]).deletes.len(), 1);
    }

    #[test]
    fn first_claimant_keeps_a_contested_frontend_and_the_waiter_gets_it_later() {
        let mut l = Ledger::default();
        let a = ServiceRef::new("default", "a");
        let b = ServiceRef::new("default", "b");
        let ca = l.plan(&a, vec![fe("203.0.113.7", 80, &["10.244.1.10"])]);
        apply_all(&mut l, &a, &ca);
        let cb = l.plan(&b, vec![fe("203.0.113.7", 80, &["10.244.1.20"])]);
        assert!(cb.upserts.is_empty());
        assert_eq!(
            cb.conflicts,
            vec![(fe("203.0.113.7", 80, &[]).key(), a.clone())]
        );
        // a drops it: b is named as the one to plan again, and then gets it.
        let ca = l.plan(&a, vec![]);
        assert_eq!(ca.released_to, BTreeSet::from([b.clone()]));
        apply_all(&mut l, &a, &ca);
        let cb = l.plan(&b, vec![fe("203.0.113.7", 80, &["10.244.1.20"])]);
        assert_eq!(cb.upserts.len(), 1);
        assert!(cb.conflicts.is_empty());
    }
}
