#![allow(clippy::unwrap_used)]

use super::*;
use crate::hash::SAFE_ALPHABET;
use crate::testkit::{labels, template, ts};
use crate::{SeededSuffixes, is_controlled_by};
use k8s_openapi::api::apps::v1::ReplicaSetSpec;
use k8s_openapi::api::core::v1::{ContainerStatus, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector as MetaSelector, Time};

const NOW: i64 = 1_700_000_000;

fn rs(replicas: i32) -> ReplicaSet {
    let mut t = template("nginx:1.25");
    t.metadata.as_mut().unwrap().labels = Some(labels(&[("app", "web"), ("tier", "fe")]));
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some("web-7d4b9".into()),
            namespace: Some("default".into()),
            uid: Some("rs-uid".into()),
            generation: Some(2),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            selector: MetaSelector {
                match_labels: Some(labels(&[("app", "web")])),
                match_expressions: None,
            },
            template: Some(t),
            min_ready_seconds: None,
        }),
        status: None,
    }
}

/// A pod owned by `rs()`: `node` empty = unscheduled; `ready_since` None = not ready.
fn pod(name: &str, node: &str, phase: &str, ready_since: Option<i64>, created: i64) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("{name}-uid")),
            labels: Some(labels(&[("app", "web"), ("tier", "fe")])),
            creation_timestamp: Some(Time(ts(created))),
            owner_references: Some(vec![controller_owner_ref(
                Kind::ReplicaSet,
                &rs(0).metadata,
            )]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: (!node.is_empty()).then(|| node.to_string()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready_since.is_some() {
                    "True"
                } else {
                    "False"
                }
                .into(),
                last_transition_time: Some(Time(ts(ready_since.unwrap_or(created)))),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn with_restarts(mut p: Pod, restarts: i32) -> Pod {
    p.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
        name: "web".into(),
        restart_count: restarts,
        ..Default::default()
    }]);
    p
}

fn created(out: &Outcome) -> Vec<&Pod> {
    out.actions
        .iter()
        .filter_map(|a| match a {
            Action::Create(Object::Pod(p)) => Some(&**p),
            _ => None,
        })
        .collect()
}

fn deleted(out: &Outcome) -> Vec<String> {
    out.actions
        .iter()
        .filter_map(|a| match a {
            Action::Delete {
                kind: Kind::Pod,
                name,
                ..
            } => Some(name.clone()),
            _ => None,
        })
        .collect()
}

fn status(out: &Outcome) -> Option<ReplicaSetStatus> {
    out.actions.iter().find_map(|a| match a {
        Action::UpdateStatus(Object::ReplicaSet(rs)) => rs.status.clone(),
        _ => None,
    })
}

#[test]
fn creates_missing_pods_from_the_template_with_generated_names() {
    let rs = rs(3);
    let out = reconcile(&rs, &[], &mut SeededSuffixes::new(7), ts(NOW)).unwrap();
    let pods = created(&out);
    assert_eq!(pods.len(), 3);
    let names: BTreeSet<String> = pods.iter().map(|p| name_of(&p.metadata)).collect();
    assert_eq!(names.len(), 3, "names are distinct");
    for p in &pods {
        let name = name_of(&p.metadata);
        let suffix = name.strip_prefix("web-7d4b9-").unwrap();
        assert_eq!(suffix.len(), 5);
        assert!(suffix.chars().all(|c| SAFE_ALPHABET.contains(c)), "{name}");
        assert_eq!(p.metadata.generate_name.as_deref(), Some("web-7d4b9-"));
        assert_eq!(
            p.metadata.labels,
            Some(labels(&[("app", "web"), ("tier", "fe")]))
        );
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ReplicaSet", "rs-uid")
        );
        assert_eq!(owner.controller, Some(true));
        assert_eq!(p.spec, template("nginx:1.25").spec);
    }
    let events = out
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Event(e) if e.reason == "SuccessfulCreate"))
        .count();
    assert_eq!(events, 3);
    // Same seed, same names: the randomness is the caller's.
    let again = reconcile(&rs, &[], &mut SeededSuffixes::new(7), ts(NOW)).unwrap();
    assert_eq!(out, again);
    let other = reconcile(&rs, &[], &mut SeededSuffixes::new(8), ts(NOW)).unwrap();
    assert_ne!(created(&other)[0].metadata.name, pods[0].metadata.name);
    // Status: nothing observed yet, generation observed.
    let s = status(&out).unwrap();
    assert_eq!((s.replicas, s.observed_generation), (0, Some(2)));
}

#[test]
fn a_generated_name_never_reuses_an_existing_one() {
    let rs = rs(2);
    let mut seed = SeededSuffixes::new(1);
    let first = seed.clone().suffix();
    let existing = pod(
        &format!("web-7d4b9-{first}"),
        "n",
        "Running",
        Some(NOW - 100),
        NOW - 100,
    );
    let out = reconcile(&rs, &[existing], &mut seed, ts(NOW)).unwrap();
    let pods = created(&out);
    assert_eq!(pods.len(), 1);
    assert_ne!(name_of(&pods[0].metadata), format!("web-7d4b9-{first}"));
}

#[test]
fn scale_down_deletes_pods_in_kubernetes_rank_order() {
    let old = NOW - 1000;
    // Expected deletion order, first to last; the last one survives.
    let ordered = vec![
        pod("unscheduled", "", "Pending", None, old),
        pod("pending", "n1", "Pending", None, old),
        pod("unknown", "n2", "Unknown", None, old),
        pod("running-not-ready", "n3", "Running", None, old),
        with_restarts(pod("ready-restarting", "n4", "Running", Some(old), old), 5),
        pod("ready-newer", "n5", "Running", Some(old), old + 10),
        pod("ready-older", "n6", "Running", Some(old), old),
    ];
    // Shuffle deterministically so the order is the ranking's, not the input's.
    let mut input = ordered.clone();
    input.reverse();
    input.swap(1, 4);
    let expected: Vec<String> = ordered.iter().map(|p| name_of(&p.metadata)).collect();
    for n in 1..ordered.len() {
        let got: Vec<String> = pods_to_delete(&input, n)
            .into_iter()
            .map(|p| name_of(&p.metadata))
            .collect();
        assert_eq!(got, expected[..n].to_vec(), "deleting {n}");
    }
    // Through reconcile: 7 pods, 4 wanted -> the three lowest-ranked go.
    let out = reconcile(&rs(4), &input, &mut SeededSuffixes::new(0), ts(NOW)).unwrap();
    assert_eq!(deleted(&out), expected[..3].to_vec());
    assert!(created(&out).is_empty());
    for a in &out.actions {
        if let Action::Delete { uid, name, .. } = a {
            assert_eq!(
                uid.as_deref(),
                Some(format!("{name}-uid").as_str()),
                "uid precondition"
            );
        }
    }
}

#[test]
fn ready_for_less_time_and_doubled_up_pods_go_first() {
    let old = NOW - 1000;
    let recently_ready = pod("recent", "n1", "Running", Some(NOW - 5), old);
    let long_ready = pod("long", "n2", "Running", Some(old), old);
    let pair = [long_ready, recently_ready];
    let got = pods_to_delete(&pair, 1);
    assert_eq!(name_of(&got[0].metadata), "recent");
    // Two identical pods, one sharing its node with a third: the doubled-up one goes first.
    let a = pod("alone", "n1", "Running", Some(old), old);
    let b = pod("shared-1", "n2", "Running", Some(old), old);
    let c = pod("shared-2", "n2", "Running", Some(old), old);
    let got: Vec<String> = pods_to_delete(&[a, b, c], 2)
        .into_iter()
        .map(|p| name_of(&p.metadata))
        .collect();
    assert!(!got.contains(&"alone".to_string()), "{got:?}");
}

#[test]
fn terminating_pods_are_neither_counted_nor_deleted() {
    let mut dying = pod("dying", "n1", "Running", Some(NOW - 50), NOW - 100);
    dying.metadata.deletion_timestamp = Some(Time(ts(NOW - 1)));
    let alive = pod("alive", "n2", "Running", Some(NOW - 50), NOW - 100);
    let out = reconcile(
        &rs(2),
        &[dying.clone(), alive.clone()],
        &mut SeededSuffixes::new(0),
        ts(NOW),
    )
    .unwrap();
    assert_eq!(created(&out).len(), 1, "the terminating pod is replaced");
    assert!(deleted(&out).is_empty());
    assert_eq!(status(&out).unwrap().replicas, 1);
    let out = reconcile(
        &rs(0),
        &[dying, alive],
        &mut SeededSuffixes::new(0),
        ts(NOW),
    )
    .unwrap();
    assert_eq!(
        deleted(&out),
        vec!["alive".to_string()],
        "only the live pod is deleted"
    );
}

#[test]
fn adopts_matching_orphans_and_releases_pods_that_stopped_matching() {
    let owned = pod("owned", "n1", "Running", Some(NOW - 50), NOW - 100);
    let mut orphan = pod("orphan", "n1", "Running", Some(NOW - 50), NOW - 100);
    orphan.metadata.owner_references = None;
    let mut relabelled = pod("relabelled", "n1", "Running", Some(NOW - 50), NOW - 100);
    relabelled.metadata.labels = Some(labels(&[("app", "debug")]));
    let mut foreign = pod("foreign", "n1", "Running", Some(NOW - 50), NOW - 100);
    foreign.metadata.owner_references.as_mut().unwrap()[0].uid = "someone-else".into();
    let mut other_ns = orphan.clone();
    other_ns.metadata.name = Some("elsewhere".into());
    other_ns.metadata.namespace = Some("other".into());
    let pods = [owned, orphan, relabelled, foreign, other_ns];
    let out = reconcile(&rs(2), &pods, &mut SeededSuffixes::new(0), ts(NOW)).unwrap();
    let updates: BTreeMap<String, &Pod> = out
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Update(Object::Pod(p)) => Some((name_of(&p.metadata), &**p)),
            _ => None,
        })
        .collect();
    assert_eq!(
        updates.keys().cloned().collect::<Vec<_>>(),
        vec!["orphan", "relabelled"]
    );
    assert!(is_controlled_by(&updates["orphan"].metadata, "rs-uid"));
    assert!(
        updates["relabelled"]
            .metadata
            .owner_references
            .as_ref()
            .unwrap()
            .is_empty()
    );
    assert!(
        created(&out).is_empty() && deleted(&out).is_empty(),
        "owned + adopted = 2"
    );
    assert_eq!(status(&out).unwrap().replicas, 2);
}

#[test]
fn status_counts_fully_labeled_ready_and_available_with_min_ready_seconds() {
    let mut rs = rs(4);
    rs.spec.as_mut().unwrap().min_ready_seconds = Some(30);
    let available = pod("available", "n1", "Running", Some(NOW - 60), NOW - 100);
    let warming = pod("warming", "n1", "Running", Some(NOW - 10), NOW - 100);
    let starting = pod("starting", "n1", "Running", None, NOW - 100);
    let mut partly_labelled = pod("partly", "n1", "Running", None, NOW - 100);
    partly_labelled.metadata.labels = Some(labels(&[("app", "web")]));
    let pods = [available, warming, starting, partly_labelled];
    let out = reconcile(&rs, &pods, &mut SeededSuffixes::new(0), ts(NOW)).unwrap();
    let s = status(&out).unwrap();
    assert_eq!(s.replicas, 4);
    assert_eq!(s.fully_labeled_replicas, Some(3));
    assert_eq!(s.ready_replicas, Some(2));
    assert_eq!(s.available_replicas, Some(1));
    assert_eq!(s.observed_generation, Some(2));
    assert_eq!(
        out.requeue_after,
        Some(20),
        "warming becomes available in 20s"
    );
    // Observed status equal to the computed one: no write.
    let mut settled = rs.clone();
    settled.status = Some(s);
    let out = reconcile(&settled, &pods, &mut SeededSuffixes::new(0), ts(NOW)).unwrap();
    assert!(out.actions.is_empty(), "{:?}", out.actions);
}

#[test]
fn a_replicaset_being_deleted_creates_nothing() {
    let mut rs = rs(3);
    rs.metadata.deletion_timestamp = Some(Time(ts(NOW)));
    let out = reconcile(&rs, &[], &mut SeededSuffixes::new(0), ts(NOW)).unwrap();
    assert!(created(&out).is_empty());
}

#[test]
fn creates_are_bounded_by_the_burst_limit() {
    let out = reconcile(&rs(700), &[], &mut SeededSuffixes::new(0), ts(NOW)).unwrap();
    assert_eq!(created(&out).len(), BURST_REPLICAS);
}

#[test]
fn an_empty_selector_is_an_error_not_a_mass_adoption() {
    let mut rs = rs(1);
    rs.spec.as_mut().unwrap().selector = MetaSelector::default();
    let err = reconcile(&rs, &[], &mut SeededSuffixes::new(0), ts(NOW)).unwrap_err();
    assert!(err.to_string().contains("selector"), "{err}");
}
