#![allow(clippy::unwrap_used)]

use super::*;
use crate::testkit::{Cluster, deployment, labels, rollout_done, template, ts};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::{Int, String as Pct};

fn active_pods(c: &Cluster) -> Vec<&Pod> {
    c.pods
        .iter()
        .filter(|p| crate::pod_util::is_active(p))
        .collect()
}

fn ready_active(c: &Cluster) -> usize {
    active_pods(c)
        .into_iter()
        .filter(|p| crate::pod_util::is_ready(p))
        .count()
}

fn spec_sum(c: &Cluster) -> i32 {
    c.replica_sets.iter().map(rs_replicas).sum()
}

fn condition<'a>(d: &'a Deployment, type_: &str) -> Option<&'a DeploymentCondition> {
    d.status.as_ref().and_then(|s| get_condition(s, type_))
}

fn reason(d: &Deployment, type_: &str) -> Option<String> {
    condition(d, type_).and_then(|c| c.reason.clone())
}

/// Runs steps until `kubectl rollout status` would say done, calling `check` after every
/// controller pass. Panics after `max` steps.
fn converge(c: &mut Cluster, max: usize, mut check: impl FnMut(&Cluster)) -> usize {
    for n in 0..max {
        if rollout_done(c.deployment()).unwrap()
            && active_pods(c).len()
                == c.deployment().spec.as_ref().unwrap().replicas.unwrap() as usize
            && c.pods.len() == active_pods(c).len()
        {
            return n;
        }
        c.now += 1;
        c.reconcile_deployments();
        check(c);
        c.reconcile_replica_sets();
        check(c);
        c.kubelet();
        check(c);
        c.reconcile_replica_sets();
        check(c);
        c.reconcile_deployments();
        check(c);
    }
    panic!(
        "did not converge in {max} steps: status {:?}",
        c.deployment().status
    );
}

fn set_image(c: &mut Cluster, image: &str) {
    c.edit_deployment(|d| {
        d.spec.as_mut().unwrap().template = template(image);
    });
}

#[test]
fn fenceposts_round_surge_up_and_unavailable_down() {
    assert_eq!(
        resolve_fenceposts(&Pct("25%".into()), &Pct("25%".into()), 10),
        Ok((3, 2))
    );
    assert_eq!(
        resolve_fenceposts(&Pct("25%".into()), &Pct("25%".into()), 3),
        Ok((1, 0))
    );
    assert_eq!(resolve_fenceposts(&Int(1), &Int(0), 3), Ok((1, 0)));
    // Both round to zero: maxUnavailable becomes 1 so the rollout can proceed.
    assert_eq!(
        resolve_fenceposts(&Pct("0%".into()), &Pct("10%".into()), 5),
        Ok((0, 1))
    );
    assert!(resolve_fenceposts(&Pct("x%".into()), &Int(1), 5).is_err());
}

#[test]
fn both_fenceposts_zero_is_rejected_without_actions() {
    let mut d = deployment(3, "nginx:1.25", Int(0), Int(0));
    d.metadata.uid = Some("u".into());
    let err = reconcile(&d, &[], &[], ts(0)).unwrap_err();
    assert!(
        err.to_string().contains("maxSurge and maxUnavailable"),
        "{err}"
    );
}

#[test]
fn first_reconcile_creates_revision_one_replicaset_owned_by_the_deployment() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(3, "nginx:1.25", Int(1), Int(0)));
    let d = c.deployment().clone();
    let out = reconcile(&d, &[], &[], ts(c.now)).unwrap();
    let Some(Action::Create(Object::ReplicaSet(rs))) = out.actions.first() else {
        panic!("first action creates the replicaset: {:?}", out.actions);
    };
    let hash = pod_template_hash(&d.spec.as_ref().unwrap().template, None);
    assert_eq!(
        rs.metadata.name.as_deref(),
        Some(format!("web-{hash}").as_str())
    );
    assert_eq!(
        rs.metadata
            .labels
            .as_ref()
            .unwrap()
            .get(POD_TEMPLATE_HASH_LABEL),
        Some(&hash)
    );
    let spec = rs.spec.as_ref().unwrap();
    assert_eq!(
        spec.selector
            .match_labels
            .as_ref()
            .unwrap()
            .get(POD_TEMPLATE_HASH_LABEL),
        Some(&hash)
    );
    assert_eq!(
        spec.template
            .as_ref()
            .unwrap()
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap()
            .get(POD_TEMPLATE_HASH_LABEL),
        Some(&hash)
    );
    // maxSurge 1 with no pods yet: 3 replicas at once (3 <= 3 + 1).
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(annotation(&rs.metadata, REVISION_ANNOTATION), Some("1"));
    assert_eq!(
        annotation(&rs.metadata, DESIRED_REPLICAS_ANNOTATION),
        Some("3")
    );
    assert_eq!(annotation(&rs.metadata, MAX_REPLICAS_ANNOTATION), Some("4"));
    let owner = &rs.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.uid, d.metadata.uid.clone().unwrap());
    assert_eq!(
        (owner.controller, owner.block_owner_deletion),
        (Some(true), Some(true))
    );
    assert_eq!(owner.kind, "Deployment");
    // The deployment gets the revision annotation and a NewReplicaSetCreated condition.
    assert!(
        out.actions
            .iter()
            .any(|a| matches!(a, Action::Update(Object::Deployment(d))
        if annotation(&d.metadata, REVISION_ANNOTATION) == Some("1")))
    );
    let Some(Action::UpdateStatus(Object::Deployment(status))) = out.actions.last() else {
        panic!("last action is the status: {:?}", out.actions);
    };
    assert_eq!(reason(status, PROGRESSING).as_deref(), Some(NEW_RS_CREATED));
    assert_eq!(
        reason(status, AVAILABLE).as_deref(),
        Some(MIN_REPLICAS_UNAVAILABLE)
    );
    assert!(out.actions.iter().any(|a| matches!(a, Action::Event(e)
        if e.reason == "ScalingReplicaSet" && e.message == format!("Scaled up replica set web-{hash} from 0 to 3"))));
}

#[test]
fn rolling_update_surge_1_unavailable_0_stays_in_bounds_and_completes() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(3, "nginx:1.25", Int(1), Int(0)));
    converge(&mut c, 20, |_| {});
    assert_eq!(ready_active(&c), 3);

    set_image(&mut c, "nginx:1.26");
    let mut saw_surge = false;
    let steps = converge(&mut c, 40, |c| {
        let total = spec_sum(c);
        assert!(
            total <= 4,
            "replicaset sizes sum to {total} > replicas + maxSurge"
        );
        let active = active_pods(c).len();
        assert!(active <= 4, "{active} active pods > replicas + maxSurge");
        let ready = ready_active(c);
        assert!(
            ready >= 3,
            "only {ready} ready pods < replicas - maxUnavailable"
        );
        saw_surge |= active == 4;
    });
    assert!(saw_surge, "the rollout used its surge pod");
    assert!(
        steps >= 3,
        "one pod at a time takes several steps, took {steps}"
    );

    let d = c.deployment();
    let status = d.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, d.metadata.generation);
    assert_eq!(status.replicas, Some(3));
    assert_eq!(status.updated_replicas, Some(3));
    assert_eq!(status.ready_replicas, Some(3));
    assert_eq!(status.available_replicas, Some(3));
    assert_eq!(status.unavailable_replicas, Some(0));
    assert_eq!(reason(d, PROGRESSING).as_deref(), Some(NEW_RS_AVAILABLE));
    assert_eq!(condition(d, PROGRESSING).unwrap().status, "True");
    assert_eq!(
        reason(d, AVAILABLE).as_deref(),
        Some(MIN_REPLICAS_AVAILABLE)
    );
    assert_eq!(annotation(&d.metadata, REVISION_ANNOTATION), Some("2"));

    let old = c.rs_by_revision(1).unwrap();
    let new = c.rs_by_revision(2).unwrap();
    assert_eq!(rs_replicas(old), 0);
    assert_eq!(rs_replicas(new), 3);
    assert!(c.owned_pods(old).is_empty());
    for pod in c.owned_pods(new) {
        let image = pod.spec.as_ref().unwrap().containers[0].image.as_deref();
        assert_eq!(image, Some("nginx:1.26"));
    }
    // Another reconcile of a finished rollout changes nothing.
    let out = reconcile(c.deployment(), &c.replica_sets, &c.pods, ts(c.now + 5)).unwrap();
    assert_eq!(out.actions, vec![]);
}

#[test]
fn rolling_update_with_surge_0_never_exceeds_replicas() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(4, "nginx:1.25", Int(0), Int(1)));
    converge(&mut c, 20, |_| {});
    set_image(&mut c, "nginx:1.26");
    converge(&mut c, 60, |c| {
        assert!(spec_sum(c) <= 4);
        assert!(active_pods(c).len() <= 4);
        assert!(ready_active(c) >= 3, "maxUnavailable 1 of 4");
    });
    assert_eq!(
        c.deployment().status.as_ref().unwrap().updated_replicas,
        Some(4)
    );
}

#[test]
fn recreate_never_runs_old_and_new_pods_together() {
    let mut c = Cluster::new();
    let mut d = deployment(3, "nginx:1.25", Int(1), Int(0));
    d.spec.as_mut().unwrap().strategy = Some(k8s_openapi::api::apps::v1::DeploymentStrategy {
        type_: Some("Recreate".into()),
        rolling_update: None,
    });
    c.add_deployment(d);
    converge(&mut c, 20, |_| {});
    set_image(&mut c, "nginx:1.26");
    let mut saw_gap = false;
    converge(&mut c, 30, |c| {
        let images: BTreeSet<String> = c
            .pods
            .iter()
            .map(|p| {
                p.spec.as_ref().unwrap().containers[0]
                    .image
                    .clone()
                    .unwrap()
            })
            .collect();
        assert!(
            images.len() <= 1,
            "old and new pods overlap (terminating ones included): {images:?}"
        );
        saw_gap |= c.pods.is_empty();
    });
    assert!(saw_gap, "recreate goes through zero pods");
    assert_eq!(ready_active(&c), 3);
    assert_eq!(
        reason(c.deployment(), PROGRESSING).as_deref(),
        Some(NEW_RS_AVAILABLE)
    );
}

#[test]
fn rollback_reuses_the_old_replicaset_and_moves_its_revision_to_the_top() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(3, "nginx:1.25", Int(1), Int(0)));
    converge(&mut c, 20, |_| {});
    set_image(&mut c, "nginx:1.26");
    converge(&mut c, 40, |_| {});
    let first = c.rs_by_revision(1).unwrap().clone();

    // What `kubectl rollout undo` sends: revision 1's template without the hash label.
    let mut undo = first.spec.as_ref().unwrap().template.clone().unwrap();
    undo.metadata
        .as_mut()
        .unwrap()
        .labels
        .as_mut()
        .unwrap()
        .remove(POD_TEMPLATE_HASH_LABEL);
    c.edit_deployment(|d| d.spec.as_mut().unwrap().template = undo);
    converge(&mut c, 40, |c| {
        assert!(c.replica_sets.len() == 2, "no third replicaset")
    });

    let reused = c
        .replica_sets
        .iter()
        .find(|rs| rs.metadata.uid == first.metadata.uid)
        .unwrap();
    assert_eq!(revision(reused), 3);
    assert_eq!(
        annotation(&reused.metadata, REVISION_HISTORY_ANNOTATION),
        Some("1")
    );
    assert_eq!(rs_replicas(reused), 3);
    assert_eq!(rs_replicas(c.rs_by_revision(2).unwrap()), 0);
    assert_eq!(
        annotation(&c.deployment().metadata, REVISION_ANNOTATION),
        Some("3")
    );
    assert!(rollout_done(c.deployment()).unwrap());
    for pod in c.owned_pods(reused) {
        assert_eq!(
            pod.spec.as_ref().unwrap().containers[0].image.as_deref(),
            Some("nginx:1.25")
        );
    }
}

#[test]
fn revision_history_limit_deletes_the_oldest_empty_replicasets() {
    let mut c = Cluster::new();
    let mut d = deployment(2, "app:1", Int(1), Int(0));
    d.spec.as_mut().unwrap().revision_history_limit = Some(2);
    c.add_deployment(d);
    converge(&mut c, 20, |_| {});
    for version in 2..=5 {
        set_image(&mut c, &format!("app:{version}"));
        converge(&mut c, 40, |_| {});
        // Cleanup runs once the rollout is complete: one more pass.
        c.step();
    }
    let mut revisions: Vec<i64> = c.replica_sets.iter().map(revision).collect();
    revisions.sort();
    assert_eq!(revisions, vec![3, 4, 5], "new replicaset plus two old ones");
}

#[test]
fn history_cleanup_never_deletes_a_replicaset_with_pods() {
    let mut c = Cluster::new();
    let mut d = deployment(2, "app:1", Int(1), Int(0));
    d.spec.as_mut().unwrap().revision_history_limit = Some(0);
    c.add_deployment(d);
    converge(&mut c, 20, |_| {});
    set_image(&mut c, "app:2");
    // The toy apiserver refuses (panics) to delete a replicaset that still has replicas.
    converge(&mut c, 40, |c| assert!(ready_active(c) >= 2));
    c.step();
    assert_eq!(
        c.replica_sets.len(),
        1,
        "limit 0 keeps only the new replicaset"
    );
    assert_eq!(revision(&c.replica_sets[0]), 2);
}

#[test]
fn paused_deployment_scales_but_does_not_roll_and_resumes() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(3, "nginx:1.25", Int(1), Int(0)));
    converge(&mut c, 20, |_| {});
    c.edit_deployment(|d| d.spec.as_mut().unwrap().paused = Some(true));
    c.step();
    assert_eq!(reason(c.deployment(), PROGRESSING).as_deref(), Some(PAUSED));
    assert_eq!(
        condition(c.deployment(), PROGRESSING).unwrap().status,
        "Unknown"
    );

    set_image(&mut c, "nginx:1.26");
    c.edit_deployment(|d| d.spec.as_mut().unwrap().replicas = Some(5));
    for _ in 0..10 {
        c.step();
    }
    assert_eq!(c.replica_sets.len(), 1, "paused: no new replicaset");
    assert_eq!(
        rs_replicas(&c.replica_sets[0]),
        5,
        "paused: scaling still applies"
    );
    assert_eq!(ready_active(&c), 5);
    assert!(
        c.pods
            .iter()
            .all(|p| p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some("nginx:1.25"))
    );
    assert_eq!(
        c.deployment().status.as_ref().unwrap().observed_generation,
        c.deployment().metadata.generation
    );

    c.edit_deployment(|d| d.spec.as_mut().unwrap().paused = None);
    c.step();
    assert_eq!(c.replica_sets.len(), 2, "resumed: the rollout starts");
    converge(&mut c, 60, |c| assert!(spec_sum(c) <= 6));
    assert_eq!(
        c.deployment().status.as_ref().unwrap().updated_replicas,
        Some(5)
    );
    assert_eq!(
        reason(c.deployment(), PROGRESSING).as_deref(),
        Some(NEW_RS_AVAILABLE)
    );
}

#[test]
fn scale_3_to_10_to_2_converges() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(
        3,
        "nginx:1.25",
        Pct("25%".into()),
        Pct("25%".into()),
    ));
    converge(&mut c, 20, |_| {});
    for replicas in [10, 2] {
        c.edit_deployment(|d| d.spec.as_mut().unwrap().replicas = Some(replicas));
        converge(&mut c, 20, |_| {});
        assert_eq!(active_pods(&c).len(), replicas as usize);
        assert_eq!(ready_active(&c), replicas as usize);
        let status = c.deployment().status.clone().unwrap();
        assert_eq!(status.replicas, Some(replicas));
        assert_eq!(status.available_replicas, Some(replicas));
        assert_eq!(c.replica_sets.len(), 1);
        assert_eq!(
            annotation(&c.replica_sets[0].metadata, DESIRED_REPLICAS_ANNOTATION),
            Some(replicas.to_string().as_str())
        );
    }
}

#[test]
fn scaling_mid_rollout_is_proportional() {
    // Kubernetes' documented example: 10 replicas, maxSurge 3, maxUnavailable 2, mid-rollout
    // with 8 old and 5 new; scaling to 15 adds 3 to the old and 2 to the new replicaset.
    let mut d = deployment(15, "app:2", Int(3), Int(2));
    d.metadata.uid = Some("d-uid".into());
    d.metadata.generation = Some(3);
    d.status = Some(DeploymentStatus {
        replicas: Some(13),
        ..Default::default()
    });
    let rs = |name: &str, image: &str, replicas: i32, created: i64, rev: &str| {
        let t = template(image);
        let mut rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("{name}-uid")),
                labels: Some(labels(&[("app", "web")])),
                creation_timestamp: Some(time(ts(created))),
                owner_references: Some(vec![controller_owner_ref(Kind::Deployment, &d.metadata)]),
                ..Default::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(replicas),
                template: Some(t),
                ..Default::default()
            }),
            status: None,
        };
        set_annotation(&mut rs.metadata, DESIRED_REPLICAS_ANNOTATION, "10".into());
        set_annotation(&mut rs.metadata, MAX_REPLICAS_ANNOTATION, "13".into());
        set_annotation(&mut rs.metadata, REVISION_ANNOTATION, rev.into());
        rs
    };
    let old = rs("web-old", "app:1", 8, 100, "1");
    let new = rs("web-new", "app:2", 5, 200, "2");
    let out = reconcile(&d, &[old, new], &[], ts(300)).unwrap();
    let sizes: BTreeMap<String, i32> = out
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Update(Object::ReplicaSet(rs)) => {
                Some((name_of(&rs.metadata), rs_replicas(rs)))
            }
            _ => None,
        })
        .collect();
    assert_eq!(sizes.get("web-old"), Some(&11));
    assert_eq!(sizes.get("web-new"), Some(&7));
    for a in &out.actions {
        if let Action::Update(Object::ReplicaSet(rs)) = a {
            assert_eq!(
                annotation(&rs.metadata, DESIRED_REPLICAS_ANNOTATION),
                Some("15")
            );
            assert_eq!(
                annotation(&rs.metadata, MAX_REPLICAS_ANNOTATION),
                Some("18")
            );
        }
    }
}

#[test]
fn scale_during_a_rollout_converges_with_the_new_template() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(4, "app:1", Pct("25%".into()), Pct("25%".into())));
    converge(&mut c, 20, |_| {});
    set_image(&mut c, "app:2");
    c.step();
    c.edit_deployment(|d| d.spec.as_mut().unwrap().replicas = Some(8));
    converge(&mut c, 60, |c| assert!(spec_sum(c) <= 8 + 2));
    assert_eq!(ready_active(&c), 8);
    assert!(
        c.pods
            .iter()
            .all(|p| p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some("app:2"))
    );
}

#[test]
fn rollout_restart_annotation_creates_a_new_replicaset() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(2, "nginx:1.25", Int(1), Int(0)));
    converge(&mut c, 20, |_| {});
    let before: BTreeSet<String> = c.pods.iter().map(|p| name_of(&p.metadata)).collect();
    // What `kubectl rollout restart` patches in.
    c.edit_deployment(|d| {
        let meta = d.spec.as_mut().unwrap().template.metadata.as_mut().unwrap();
        meta.annotations = Some(labels(&[(
            "kubectl.kubernetes.io/restartedAt",
            "2026-11-22T23:00:00Z",
        )]));
    });
    converge(&mut c, 40, |_| {});
    assert_eq!(c.replica_sets.len(), 2);
    let after: BTreeSet<String> = c.pods.iter().map(|p| name_of(&p.metadata)).collect();
    assert!(before.is_disjoint(&after), "every pod was replaced");
    assert_eq!(
        annotation(&c.deployment().metadata, REVISION_ANNOTATION),
        Some("2")
    );
}

#[test]
fn progress_deadline_exceeded_when_new_pods_never_become_ready() {
    let mut c = Cluster::new();
    let mut d = deployment(2, "nginx:1.25", Int(1), Int(0));
    d.spec.as_mut().unwrap().progress_deadline_seconds = Some(30);
    c.add_deployment(d);
    converge(&mut c, 20, |_| {});
    c.pods_become_ready = false;
    set_image(&mut c, "nginx:broken");
    c.step();
    let progressing = reason(c.deployment(), PROGRESSING).unwrap();
    assert!(
        progressing == NEW_RS_CREATED || progressing == RS_UPDATED,
        "{progressing}"
    );
    let out = reconcile(c.deployment(), &c.replica_sets, &c.pods, ts(c.now)).unwrap();
    let requeue = out
        .requeue_after
        .expect("a progressing rollout asks to be requeued for its deadline");
    assert!(requeue > 0 && requeue <= 31, "requeue after {requeue}s");
    c.step();
    assert!(rollout_done(c.deployment()).is_ok(), "not yet timed out");
    c.now += 40;
    c.step();
    let d = c.deployment();
    assert_eq!(reason(d, PROGRESSING).as_deref(), Some(TIMED_OUT));
    assert_eq!(condition(d, PROGRESSING).unwrap().status, "False");
    assert!(rollout_done(d).is_err(), "kubectl rollout status fails");
    // The old pods keep serving: maxUnavailable 0.
    assert_eq!(ready_active(&c), 2);
}

#[test]
fn min_ready_seconds_delays_availability() {
    let mut c = Cluster::new();
    let mut d = deployment(2, "nginx:1.25", Int(1), Int(0));
    d.spec.as_mut().unwrap().min_ready_seconds = Some(10);
    c.add_deployment(d);
    for _ in 0..4 {
        c.step();
    }
    assert_eq!(ready_active(&c), 2);
    let status = c.deployment().status.clone().unwrap();
    assert_eq!(status.ready_replicas, Some(2));
    assert_eq!(
        status.available_replicas,
        Some(0),
        "ready for less than minReadySeconds"
    );
    assert!(!rollout_done(c.deployment()).unwrap());
    assert_eq!(
        c.replica_sets[0].spec.as_ref().unwrap().min_ready_seconds,
        Some(10)
    );
    c.now += 10;
    c.step();
    assert_eq!(
        c.deployment().status.as_ref().unwrap().available_replicas,
        Some(2)
    );
    assert!(rollout_done(c.deployment()).unwrap());
}

#[test]
fn orphan_replicaset_matching_the_selector_is_adopted() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(1, "nginx:1.25", Int(1), Int(0)));
    let d = c.deployment().clone();
    let orphan = ReplicaSet {
        metadata: ObjectMeta {
            name: Some("web-orphan".into()),
            namespace: Some("default".into()),
            uid: Some("orphan-uid".into()),
            labels: Some(labels(&[("app", "web")])),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(1),
            template: Some(template("nginx:1.25")),
            ..Default::default()
        }),
        status: None,
    };
    let other = ReplicaSet {
        metadata: ObjectMeta {
            name: Some("db".into()),
            namespace: Some("default".into()),
            uid: Some("db-uid".into()),
            labels: Some(labels(&[("app", "db")])),
            ..Default::default()
        },
        ..orphan.clone()
    };
    let out = reconcile(&d, &[orphan, other], &[], ts(c.now)).unwrap();
    let adopted: Vec<&ReplicaSet> = out
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Update(Object::ReplicaSet(rs)) if rs.metadata.owner_references.is_some() => {
                Some(&**rs)
            }
            _ => None,
        })
        .collect();
    assert_eq!(adopted.len(), 1);
    assert_eq!(adopted[0].metadata.name.as_deref(), Some("web-orphan"));
    // Its template equals the deployment's, so it is the new replicaset: no create.
    assert!(!out.actions.iter().any(|a| matches!(a, Action::Create(_))));
}

#[test]
fn hash_collision_bumps_collision_count_and_nothing_else() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(1, "nginx:1.25", Int(1), Int(0)));
    let d = c.deployment().clone();
    let hash = pod_template_hash(&d.spec.as_ref().unwrap().template, None);
    // Someone else's replicaset already has the name the new one would get.
    let squatter = ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("web-{hash}")),
            namespace: Some("default".into()),
            uid: Some("other".into()),
            labels: Some(labels(&[("app", "other")])),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            template: Some(template("busybox")),
            ..Default::default()
        }),
        status: None,
    };
    let out = reconcile(&d, &[squatter], &[], ts(c.now)).unwrap();
    assert_eq!(out.actions.len(), 1, "{:?}", out.actions);
    let Action::UpdateStatus(Object::Deployment(updated)) = &out.actions[0] else {
        panic!("{:?}", out.actions);
    };
    assert_eq!(updated.status.as_ref().unwrap().collision_count, Some(1));
    assert_ne!(
        pod_template_hash(&d.spec.as_ref().unwrap().template, Some(1)),
        hash
    );
}

#[test]
fn sub_second_now_does_not_make_the_status_churn_after_a_json_round_trip() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(2, "nginx:1.25", Int(1), Int(0)));
    converge(&mut c, 20, |_| {});
    set_image(&mut c, "nginx:1.26");
    let now = ts(c.now + 1)
        .checked_add(k8s_openapi::jiff::SignedDuration::from_millis(750))
        .unwrap();
    let out = reconcile(c.deployment(), &c.replica_sets, &c.pods, now).unwrap();
    let written = out
        .actions
        .iter()
        .find_map(|a| match a {
            Action::UpdateStatus(Object::Deployment(d)) => Some(d.clone()),
            _ => None,
        })
        .unwrap();
    // What the apiserver stores and the watch delivers back.
    let stored: Deployment =
        serde_json::from_value(serde_json::to_value(&*written).unwrap()).unwrap();
    assert_eq!(stored.status, written.status, "times are whole seconds");
}

/// Random rollouts: random sizes and fenceposts, template edits at random moments (also in the
/// middle of a rollout), pods that become ready at random times. After the first rollout the
/// surge and availability bounds must hold after every controller pass, and every run must end
/// fully rolled out to the last template with the history limit respected.
#[test]
fn random_rollouts_keep_bounds_and_converge() {
    for seed in 0..300u64 {
        let mut rng = crate::SeededSuffixes::new(seed);
        let mut pick = |n: u64| rng.next_u64() % n;
        let replicas = 1 + pick(6) as i32;
        let fencepost = |v: u64| match v % 4 {
            0 => Int(0),
            1 => Int(1),
            2 => Int(2),
            _ => Pct("25%".into()),
        };
        let (mut surge, unavailable) = (fencepost(pick(4)), fencepost(pick(4)));
        if is_zero(&surge) && is_zero(&unavailable) {
            surge = Int(1);
        }
        let (max_surge, max_unavailable) =
            resolve_fenceposts(&surge, &unavailable, replicas).unwrap();
        let max_unavailable = max_unavailable.min(replicas);
        let mut c = Cluster::new();
        c.names = crate::SeededSuffixes::new(seed + 1000);
        c.flaky_readiness = Some(crate::SeededSuffixes::new(seed + 2000));
        let mut d = deployment(replicas, "app:0", surge.clone(), unavailable.clone());
        d.spec.as_mut().unwrap().revision_history_limit = Some(2);
        c.add_deployment(d);
        converge(&mut c, 100, |_| {});

        let context = format!(
            "seed {seed}: {replicas} replicas, surge {surge:?}, unavailable {unavailable:?}"
        );
        let check = |c: &Cluster| {
            let total = spec_sum(c);
            assert!(
                total <= replicas + max_surge,
                "{context}: sizes sum to {total}"
            );
            let ready = ready_active(c) as i32;
            if ready < replicas - max_unavailable {
                for rs in &c.replica_sets {
                    eprintln!(
                        "rs {} rev {} spec {} status {:?}",
                        name_of(&rs.metadata),
                        revision(rs),
                        rs_replicas(rs),
                        rs.status
                    );
                }
                for p in &c.pods {
                    eprintln!(
                        "pod {} owner {} active {} ready {}",
                        name_of(&p.metadata),
                        controller_of(&p.metadata)
                            .map(|o| o.name.clone())
                            .unwrap_or_default(),
                        crate::pod_util::is_active(p),
                        crate::pod_util::is_ready(p)
                    );
                }
                for e in &c.events {
                    eprintln!("event {}", e.message);
                }
            }
            assert!(
                ready >= replicas - max_unavailable,
                "{context}: {ready} ready"
            );
        };
        let edits = 1 + pick(4);
        let mut version = 0;
        for _ in 0..edits {
            version += 1;
            set_image(&mut c, &format!("app:{version}"));
            for _ in 0..pick(6) {
                c.now += 1;
                c.reconcile_deployments();
                check(&c);
                c.reconcile_replica_sets();
                check(&c);
                c.kubelet();
                check(&c);
            }
        }
        converge(&mut c, 400, check);
        c.step();
        let image = format!("app:{version}");
        assert_eq!(ready_active(&c) as i32, replicas, "{context}");
        assert!(
            c.pods
                .iter()
                .all(|p| p.spec.as_ref().unwrap().containers[0].image.as_deref()
                    == Some(image.as_str())),
            "{context}: every pod runs the last template"
        );
        assert!(
            c.replica_sets.len() <= 3,
            "{context}: {} replicasets",
            c.replica_sets.len()
        );
        // Edits made before any reconcile saw them get no revision, so only relative order is
        // fixed: the replicaset of the last template has the highest revision, which the
        // deployment carries.
        let newest = c.replica_sets.iter().max_by_key(|rs| revision(rs)).unwrap();
        assert_eq!(rs_replicas(newest), replicas, "{context}");
        assert_eq!(
            annotation(&c.deployment().metadata, REVISION_ANNOTATION),
            Some(revision(newest).to_string().as_str()),
            "{context}"
        );
        assert!(revision(newest) >= 2, "{context}");
    }
}

/// Random user behaviour: template edits, scaling, pause and resume at random moments, pods
/// ready at random times. Whatever happened, once the user stops (and resumes) the deployment
/// must converge to exactly the requested replicas of the last template.
#[test]
fn random_edits_scaling_and_pauses_converge() {
    for seed in 0..300u64 {
        let mut rng = crate::SeededSuffixes::new(seed ^ 0x5eed);
        let mut pick = |n: u64| rng.next_u64() % n;
        let mut c = Cluster::new();
        c.names = crate::SeededSuffixes::new(seed + 7000);
        c.flaky_readiness = Some(crate::SeededSuffixes::new(seed + 9000));
        let surge = if pick(2) == 0 {
            Pct("25%".into())
        } else {
            Int(pick(3) as i32)
        };
        let unavailable = if is_zero(&surge) {
            Int(1 + pick(2) as i32)
        } else {
            Int(pick(3) as i32)
        };
        c.add_deployment(deployment(
            1 + pick(5) as i32,
            "app:0",
            surge.clone(),
            unavailable.clone(),
        ));
        let mut version = 0;
        for _ in 0..(3 + pick(8)) {
            match pick(4) {
                0 => {
                    version += 1;
                    set_image(&mut c, &format!("app:{version}"));
                }
                1 => {
                    let replicas = pick(9) as i32;
                    c.edit_deployment(|d| d.spec.as_mut().unwrap().replicas = Some(replicas));
                }
                2 => {
                    let paused = pick(2) == 0;
                    c.edit_deployment(|d| d.spec.as_mut().unwrap().paused = Some(paused));
                }
                _ => {}
            }
            for _ in 0..pick(4) {
                c.step();
            }
        }
        c.edit_deployment(|d| d.spec.as_mut().unwrap().paused = Some(false));
        let context = format!("seed {seed}: surge {surge:?}, unavailable {unavailable:?}");
        converge(&mut c, 400, |_| {});
        c.step();
        let replicas = c.deployment().spec.as_ref().unwrap().replicas.unwrap();
        let image = format!("app:{version}");
        assert_eq!(active_pods(&c).len() as i32, replicas, "{context}");
        assert_eq!(ready_active(&c) as i32, replicas, "{context}");
        assert!(
            c.pods
                .iter()
                .all(|p| p.spec.as_ref().unwrap().containers[0].image.as_deref()
                    == Some(image.as_str())),
            "{context}: every pod runs the last template"
        );
        let status = c.deployment().status.clone().unwrap();
        assert_eq!(status.updated_replicas, Some(replicas), "{context}");
        assert_eq!(status.available_replicas, Some(replicas), "{context}");
        if replicas > 0 {
            assert_eq!(
                reason(c.deployment(), PROGRESSING).as_deref(),
                Some(NEW_RS_AVAILABLE),
                "{context}"
            );
        }
        let old_sizes: i32 = c
            .replica_sets
            .iter()
            .filter(|rs| revision(rs) != c.replica_sets.iter().map(revision).max().unwrap())
            .map(rs_replicas)
            .sum();
        assert_eq!(old_sizes, 0, "{context}: old replicasets scaled to zero");
    }
}

/// Recreate under random edits and scaling: pods of two templates never coexist (terminating
/// ones included), and the deployment converges.
#[test]
fn random_recreate_never_overlaps_and_converges() {
    for seed in 0..150u64 {
        let mut rng = crate::SeededSuffixes::new(seed ^ 0xec);
        let mut pick = |n: u64| rng.next_u64() % n;
        let mut c = Cluster::new();
        c.names = crate::SeededSuffixes::new(seed + 3000);
        c.flaky_readiness = Some(crate::SeededSuffixes::new(seed + 4000));
        let mut d = deployment(1 + pick(5) as i32, "app:0", Int(1), Int(0));
        d.spec.as_mut().unwrap().strategy = Some(k8s_openapi::api::apps::v1::DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        c.add_deployment(d);
        let check = |c: &Cluster| {
            let images: BTreeSet<String> = c
                .pods
                .iter()
                .map(|p| {
                    p.spec.as_ref().unwrap().containers[0]
                        .image
                        .clone()
                        .unwrap()
                })
                .collect();
            assert!(images.len() <= 1, "seed {seed}: overlap {images:?}");
        };
        let mut version = 0;
        for _ in 0..(2 + pick(6)) {
            if pick(3) == 0 {
                let replicas = 1 + pick(6) as i32;
                c.edit_deployment(|d| d.spec.as_mut().unwrap().replicas = Some(replicas));
            } else {
                version += 1;
                set_image(&mut c, &format!("app:{version}"));
            }
            for _ in 0..pick(5) {
                c.now += 1;
                c.reconcile_deployments();
                check(&c);
                c.reconcile_replica_sets();
                check(&c);
                c.kubelet();
                check(&c);
            }
        }
        converge(&mut c, 300, check);
        let replicas = c.deployment().spec.as_ref().unwrap().replicas.unwrap() as usize;
        assert_eq!(ready_active(&c), replicas, "seed {seed}");
        let image = format!("app:{version}");
        assert!(c.pods.iter().all(
            |p| p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some(image.as_str())
        ));
    }
}

#[test]
fn change_cause_is_copied_to_the_replicaset_but_last_applied_is_not() {
    let mut c = Cluster::new();
    let mut d = deployment(1, "nginx:1.25", Int(1), Int(0));
    d.metadata.annotations = Some(labels(&[
        ("kubernetes.io/change-cause", "kubectl set image nginx:1.25"),
        ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
    ]));
    c.add_deployment(d);
    converge(&mut c, 20, |_| {});
    let rs = &c.replica_sets[0];
    assert_eq!(
        annotation(&rs.metadata, "kubernetes.io/change-cause"),
        Some("kubectl set image nginx:1.25"),
        "rollout history shows it"
    );
    assert_eq!(
        annotation(
            &rs.metadata,
            "kubectl.kubernetes.io/last-applied-configuration"
        ),
        None
    );
    // The deployment keeps its own annotations next to the revision.
    let d = c.deployment();
    assert_eq!(annotation(&d.metadata, REVISION_ANNOTATION), Some("1"));
    assert_eq!(
        annotation(
            &d.metadata,
            "kubectl.kubernetes.io/last-applied-configuration"
        ),
        Some("{}")
    );
}

#[test]
fn an_owned_replicaset_relabelled_out_of_the_selector_is_released() {
    let mut c = Cluster::new();
    c.add_deployment(deployment(1, "nginx:1.25", Int(1), Int(0)));
    converge(&mut c, 20, |_| {});
    let mut rs = c.replica_sets[0].clone();
    rs.metadata.labels = Some(labels(&[("app", "debug")]));
    let out = reconcile(c.deployment(), &[rs], &[], ts(c.now)).unwrap();
    let released = out
        .actions
        .iter()
        .find_map(|a| match a {
            Action::Update(Object::ReplicaSet(rs)) => Some(rs.clone()),
            _ => None,
        })
        .expect("an update releasing the replicaset");
    assert!(
        released
            .metadata
            .owner_references
            .as_ref()
            .unwrap()
            .is_empty()
    );
    // The new replicaset would take the released one's name: a hash collision, so the
    // collision count goes up and the next reconcile creates it under another name.
    let status = out
        .actions
        .iter()
        .find_map(|a| match a {
            Action::UpdateStatus(Object::Deployment(d)) => d.status.clone(),
            _ => None,
        })
        .unwrap();
    assert_eq!(status.collision_count, Some(1));
    assert!(!out.actions.iter().any(|a| matches!(a, Action::Create(_))));
}
