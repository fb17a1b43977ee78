//! Garbage-collector decisions (Kubernetes' `pkg/controller/garbagecollector`): given every
//! object that can own or be owned, decide which dependents to delete, which ownerReferences to
//! drop and which deletion finalizers to remove, for the three propagation policies:
//!
//! - Background: the owner is gone from the store; its dependents are deleted afterwards.
//! - Foreground: the owner stays, with `deletionTimestamp` and the `foregroundDeletion`
//!   finalizer, until every dependent that blocks it (`blockOwnerDeletion: true`) is gone; its
//!   dependents are deleted (in foreground themselves when they have dependents).
//! - Orphan: the owner stays with the `orphan` finalizer until its dependents no longer
//!   reference it; they are not deleted.
//!
//! The input must hold every object of every kind that can be an owner: an owner missing from
//! it is taken as deleted. Kubernetes confirms an owner's absence with a live GET before
//! deleting a dependent, and the shell must do the same before applying [`GcAction::Delete`]
//! (an informer that has not synced yet would otherwise delete healthy objects).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
pub const ORPHAN_FINALIZER: &str = "orphan";

/// `propagationPolicy` of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

/// Identity of an object for the garbage collector.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GcRef {
    pub api_version: String,
    pub kind: String,
    /// None for cluster-scoped objects.
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
}

/// What the garbage collector needs to know about one object.
#[derive(Debug, Clone, PartialEq)]
pub struct GcObject {
    pub reference: GcRef,
    pub owner_references: Vec<OwnerReference>,
    pub deleting: bool,
    pub finalizers: Vec<String>,
}

impl GcObject {
    /// From an object's metadata; None when it has no uid or name (not stored yet).
    pub fn from_meta(api_version: &str, kind: &str, meta: &ObjectMeta) -> Option<GcObject> {
        Some(GcObject {
            reference: GcRef {
                api_version: api_version.to_string(),
                kind: kind.to_string(),
                namespace: meta.namespace.clone(),
                name: meta.name.clone()?,
                uid: meta.uid.clone()?,
            },
            owner_references: meta.owner_references.clone().unwrap_or_default(),
            deleting: meta.deletion_timestamp.is_some(),
            finalizers: meta.finalizers.clone().unwrap_or_default(),
        })
    }

    fn has_finalizer(&self, finalizer: &str) -> bool {
        self.finalizers.iter().any(|f| f == finalizer)
    }
}

/// One garbage-collector write.
#[derive(Debug, Clone, PartialEq)]
pub enum GcAction {
    /// Delete `target` (with its uid as precondition) using `propagation`.
    Delete {
        target: GcRef,
        propagation: Propagation,
    },
    /// Remove the ownerReferences with these uids from `target` (a patch).
    RemoveOwnerReferences {
        target: GcRef,
        owner_uids: Vec<String>,
    },
    /// Remove a deletion finalizer from `target`, letting its deletion finish.
    RemoveFinalizer { target: GcRef, finalizer: String },
}

/// The state of one ownerReference, as Kubernetes' `classifyReferences` sees it.
enum OwnerState {
    /// The owner exists and is not waiting for its dependents.
    Solid,
    /// The owner does not exist (or exists with another uid or in another namespace).
    Dangling,
    /// The owner is being deleted in the foreground.
    WaitingForDependents,
}

/// Decides every garbage-collection write for the current state. Level-triggered: applying the
/// actions and calling again converges; an empty result means nothing is left to collect.
pub fn collect(objects: &[GcObject]) -> Vec<GcAction> {
    let by_uid: BTreeMap<&str, &GcObject> = objects
        .iter()
        .map(|o| (o.reference.uid.as_str(), o))
        .collect();
    // Dependents of each owner uid: (dependent, its reference to the owner).
    let mut dependents: BTreeMap<&str, Vec<(&GcObject, &OwnerReference)>> = BTreeMap::new();
    for o in objects {
        for r in &o.owner_references {
            dependents.entry(r.uid.as_str()).or_default().push((o, r));
        }
    }
    let owner_state = |dependent: &GcObject, r: &OwnerReference| -> OwnerState {
        match by_uid.get(r.uid.as_str()) {
            Some(owner)
                if owner.reference.kind == r.kind
                    && owner.reference.name == r.name
                    && (owner.reference.namespace.is_none()
                        || owner.reference.namespace == dependent.reference.namespace) =>
            {
                if owner.deleting && owner.has_finalizer(FOREGROUND_FINALIZER) {
                    OwnerState::WaitingForDependents
                } else {
                    OwnerState::Solid
                }
            }
            _ => OwnerState::Dangling,
        }
    };

    let mut actions = Vec::new();
    let mut deleted: BTreeSet<&str> = BTreeSet::new();

    // Owners being deleted with a deletion finalizer.
    for owner in objects.iter().filter(|o| o.deleting) {
        let uid = owner.reference.uid.as_str();
        let deps = dependents.get(uid).map(Vec::as_slice).unwrap_or_default();
        if owner.has_finalizer(ORPHAN_FINALIZER) {
            for (dep, _) in deps {
                actions.push(GcAction::RemoveOwnerReferences {
                    target: dep.reference.clone(),
                    owner_uids: vec![uid.to_string()],
                });
            }
            actions.push(GcAction::RemoveFinalizer {
                target: owner.reference.clone(),
                finalizer: ORPHAN_FINALIZER.into(),
            });
        } else if owner.has_finalizer(FOREGROUND_FINALIZER) {
            let blocking = deps
                .iter()
                .filter(|(_, r)| r.block_owner_deletion == Some(true))
                .count();
            if blocking == 0 {
                actions.push(GcAction::RemoveFinalizer {
                    target: owner.reference.clone(),
                    finalizer: FOREGROUND_FINALIZER.into(),
                });
            }
        }
    }

    // Dependents whose owners are gone or waiting for them (Kubernetes' attemptToDeleteItem).
    for item in objects {
        if item.owner_references.is_empty() || item.deleting {
            continue;
        }
        let mut solid = 0;
        let mut dangling = Vec::new();
        let mut waiting = Vec::new();
        for r in &item.owner_references {
            match owner_state(item, r) {
                OwnerState::Solid => solid += 1,
                OwnerState::Dangling => dangling.push(r.uid.clone()),
                OwnerState::WaitingForDependents => waiting.push(r.uid.clone()),
            }
        }
        if solid > 0 {
            // Still owned: just drop the references to owners that are gone or going.
            let mut stale: Vec<String> = dangling.into_iter().chain(waiting).collect();
            if !stale.is_empty() {
                stale.sort();
                actions.push(GcAction::RemoveOwnerReferences {
                    target: item.reference.clone(),
                    owner_uids: stale,
                });
            }
            continue;
        }
        let has_dependents = dependents
            .get(item.reference.uid.as_str())
            .is_some_and(|d| !d.is_empty());
        let propagation = if !waiting.is_empty() && has_dependents {
            // An owner waits for us: delete our own dependents first, in the foreground.
            Propagation::Foreground
        } else if item.has_finalizer(ORPHAN_FINALIZER) {
            Propagation::Orphan
        } else if item.has_finalizer(FOREGROUND_FINALIZER) {
            Propagation::Foreground
        } else {
            Propagation::Background
        };
        if deleted.insert(item.reference.uid.as_str()) {
            actions.push(GcAction::Delete {
                target: item.reference.clone(),
                propagation,
            });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn obj(kind: &str, name: &str, owners: &[(&str, &str, bool)]) -> GcObject {
        GcObject {
            reference: GcRef {
                api_version: "v1".into(),
                kind: kind.into(),
                namespace: Some("default".into()),
                name: name.into(),
                uid: format!("{name}-uid"),
            },
            owner_references: owners
                .iter()
                .map(|(kind, name, block)| OwnerReference {
                    api_version: "v1".into(),
                    kind: kind.to_string(),
                    name: name.to_string(),
                    uid: format!("{name}-uid"),
                    controller: Some(true),
                    block_owner_deletion: Some(*block),
                })
                .collect(),
            deleting: false,
            finalizers: vec![],
        }
    }

    fn deleting(mut o: GcObject, finalizer: Option<&str>) -> GcObject {
        o.deleting = true;
        o.finalizers = finalizer.into_iter().map(String::from).collect();
        o
    }

    /// A Deployment -> ReplicaSet -> 2 Pods chain, plus an unrelated pod.
    fn chain() -> Vec<GcObject> {
        vec![
            obj("Deployment", "web", &[]),
            obj("ReplicaSet", "web-1", &[("Deployment", "web", true)]),
            obj("Pod", "web-1-a", &[("ReplicaSet", "web-1", true)]),
            obj("Pod", "web-1-b", &[("ReplicaSet", "web-1", true)]),
            obj("Pod", "lonely", &[]),
        ]
    }

    fn deletes(actions: &[GcAction]) -> Vec<(String, Propagation)> {
        actions
            .iter()
            .filter_map(|a| match a {
                GcAction::Delete {
                    target,
                    propagation,
                } => Some((target.name.clone(), *propagation)),
                _ => None,
            })
            .collect()
    }

    /// Applies actions like the apiserver: background deletes remove at once, foreground and
    /// orphan deletes add their finalizer; an object with no finalizers left while deleting goes.
    fn apply(objects: &mut Vec<GcObject>, actions: &[GcAction]) {
        for a in actions {
            match a {
                GcAction::Delete {
                    target,
                    propagation,
                } => {
                    let o = objects.iter_mut().find(|o| o.reference == *target).unwrap();
                    o.deleting = true;
                    match propagation {
                        Propagation::Background => {}
                        Propagation::Foreground => o.finalizers.push(FOREGROUND_FINALIZER.into()),
                        Propagation::Orphan => o.finalizers.push(ORPHAN_FINALIZER.into()),
                    }
                }
                GcAction::RemoveOwnerReferences { target, owner_uids } => {
                    let o = objects.iter_mut().find(|o| o.reference == *target).unwrap();
                    o.owner_references.retain(|r| !owner_uids.contains(&r.uid));
                }
                GcAction::RemoveFinalizer { target, finalizer } => {
                    let o = objects.iter_mut().find(|o| o.reference == *target).unwrap();
                    o.finalizers.retain(|f| f != finalizer);
                }
            }
        }
        objects.retain(|o| !(o.deleting && o.finalizers.is_empty()));
    }

    fn run_to_fixpoint(objects: &mut Vec<GcObject>) {
        for _ in 0..20 {
            let actions = collect(objects);
            if actions.is_empty() {
                return;
            }
            apply(objects, &actions);
        }
        panic!("garbage collection did not settle: {objects:?}");
    }

    fn names(objects: &[GcObject]) -> Vec<String> {
        objects.iter().map(|o| o.reference.name.clone()).collect()
    }

    #[test]
    fn nothing_to_do_when_every_owner_exists() {
        assert!(collect(&chain()).is_empty());
    }

    #[test]
    fn background_deletion_removes_the_whole_chain_after_the_owner() {
        let mut objects = chain();
        objects.remove(0); // the Deployment is gone (background: no finalizer)
        let first = collect(&objects);
        assert_eq!(
            deletes(&first),
            vec![("web-1".to_string(), Propagation::Background)]
        );
        run_to_fixpoint(&mut objects);
        assert_eq!(names(&objects), vec!["lonely"]);
    }

    #[test]
    fn foreground_deletion_keeps_the_owner_until_blocking_dependents_are_gone() {
        let mut objects = chain();
        objects[0] = deleting(objects[0].clone(), Some(FOREGROUND_FINALIZER));
        let first = collect(&objects);
        // The ReplicaSet has pods of its own, so it is deleted in the foreground too.
        assert_eq!(
            deletes(&first),
            vec![("web-1".to_string(), Propagation::Foreground)]
        );
        assert!(
            !first
                .iter()
                .any(|a| matches!(a, GcAction::RemoveFinalizer { .. }))
        );
        apply(&mut objects, &first);
        assert!(names(&objects).contains(&"web".to_string()), "owner waits");
        // Pods go next, then the ReplicaSet's finalizer, then the Deployment's.
        let second = collect(&objects);
        let mut pods = deletes(&second);
        pods.sort();
        assert_eq!(
            pods,
            vec![
                ("web-1-a".to_string(), Propagation::Background),
                ("web-1-b".to_string(), Propagation::Background)
            ]
        );
        run_to_fixpoint(&mut objects);
        assert_eq!(names(&objects), vec!["lonely"]);
    }

    #[test]
    fn orphan_deletion_keeps_dependents_and_drops_their_references() {
        let mut objects = chain();
        objects[0] = deleting(objects[0].clone(), Some(ORPHAN_FINALIZER));
        let actions = collect(&objects);
        assert!(deletes(&actions).is_empty());
        assert_eq!(
            actions.first(),
            Some(&GcAction::RemoveOwnerReferences {
                target: objects[1].reference.clone(),
                owner_uids: vec!["web-uid".into()],
            })
        );
        run_to_fixpoint(&mut objects);
        assert_eq!(
            names(&objects),
            vec!["web-1", "web-1-a", "web-1-b", "lonely"]
        );
        assert!(objects[0].owner_references.is_empty());
        assert_eq!(
            objects[1].owner_references.len(),
            1,
            "the pods keep their ReplicaSet"
        );
    }

    #[test]
    fn a_dependent_with_another_live_owner_only_loses_the_dead_reference() {
        let mut objects = vec![
            obj("ConfigMap", "keeper", &[]),
            obj(
                "Pod",
                "shared",
                &[("ConfigMap", "keeper", false), ("ConfigMap", "gone", false)],
            ),
        ];
        let actions = collect(&objects);
        assert_eq!(
            actions,
            vec![GcAction::RemoveOwnerReferences {
                target: objects[1].reference.clone(),
                owner_uids: vec!["gone-uid".into()],
            }]
        );
        run_to_fixpoint(&mut objects);
        assert_eq!(names(&objects), vec!["keeper", "shared"]);
    }

    #[test]
    fn an_owner_reference_with_a_reused_name_but_another_uid_is_dangling() {
        let mut recreated = obj("ReplicaSet", "web-1", &[]);
        recreated.reference.uid = "new-uid".into();
        let objects = vec![
            recreated,
            obj("Pod", "web-1-a", &[("ReplicaSet", "web-1", true)]),
        ];
        assert_eq!(
            deletes(&collect(&objects)),
            vec![("web-1-a".to_string(), Propagation::Background)]
        );
    }

    #[test]
    fn an_owner_in_another_namespace_does_not_count() {
        let mut owner = obj("ConfigMap", "cm", &[]);
        owner.reference.namespace = Some("other".into());
        let objects = vec![owner, obj("Pod", "p", &[("ConfigMap", "cm", false)])];
        assert_eq!(
            deletes(&collect(&objects)),
            vec![("p".to_string(), Propagation::Background)]
        );
        // A cluster-scoped owner (a Node) may own namespaced objects.
        let mut node = obj("Node", "n1", &[]);
        node.reference.namespace = None;
        let objects = vec![node, obj("Pod", "p", &[("Node", "n1", false)])];
        assert!(collect(&objects).is_empty());
    }

    #[test]
    fn from_meta_requires_a_stored_object() {
        let meta = ObjectMeta {
            name: Some("x".into()),
            ..Default::default()
        };
        assert!(GcObject::from_meta("v1", "Pod", &meta).is_none());
    }
}
