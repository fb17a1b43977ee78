#![allow(clippy::unwrap_used)]

use super::*;
use crate::SeededSuffixes;
use crate::testkit::{labels, ts};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, PodCondition, PodIP, PodSpec, PodStatus, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

fn service(ports: Vec<ServicePort>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some("svc-uid".into()),
            labels: Some(labels(&[("team", "blue")])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(labels(&[("app", "web")])),
            cluster_ip: Some("10.96.0.10".into()),
            ip_families: Some(vec!["IPv4".into()]),
            ports: Some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

fn http_port() -> ServicePort {
    ServicePort {
        name: Some("http".into()),
        port: 80,
        target_port: Some(IntOrString::String("http".into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// A running pod with a container port named "http" = `http_port`.
fn pod(name: &str, ip: &str, node: &str, ready: bool, http_port: Option<i32>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("{name}-uid")),
            labels: Some(labels(&[("app", "web")])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "web".into(),
                ports: http_port.map(|p| {
                    vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: p,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn node(name: &str, zone: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels(&[(ZONE_LABEL, zone)])),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Applies slice actions to a stored list the way the apiserver would; returns
/// (creates, updates, deletes).
fn apply(store: &mut Vec<EndpointSlice>, out: &Outcome) -> (usize, usize, usize) {
    let (mut c, mut u, mut d) = (0, 0, 0);
    for a in &out.actions {
        match a {
            Action::Create(Object::EndpointSlice(s)) => {
                let mut s = (**s).clone();
                assert!(!store.iter().any(|x| x.metadata.name == s.metadata.name));
                s.metadata.uid = Some(format!("slice-{}", store.len() + c + 100));
                store.push(s);
                c += 1;
            }
            Action::Update(Object::EndpointSlice(s)) => {
                let stored = store
                    .iter_mut()
                    .find(|x| x.metadata.name == s.metadata.name)
                    .unwrap();
                *stored = (**s).clone();
                u += 1;
            }
            Action::Delete {
                kind: Kind::EndpointSlice,
                name,
                uid,
                ..
            } => {
                let before = store.len();
                store.retain(|x| {
                    !(x.metadata.name.as_ref() == Some(name) && x.metadata.uid == *uid)
                });
                assert_eq!(store.len() + 1, before);
                d += 1;
            }
            other => panic!("unexpected action {other:?}"),
        }
    }
    for s in store.iter() {
        assert!(s.endpoints.len() <= MAX_ENDPOINTS_PER_SLICE);
    }
    (c, u, d)
}

fn all_endpoints(store: &[EndpointSlice]) -> BTreeMap<String, Endpoint> {
    let mut all = BTreeMap::new();
    for s in store {
        for e in &s.endpoints {
            assert!(
                all.insert(endpoint_id(e), e.clone()).is_none(),
                "endpoint in two slices"
            );
        }
    }
    all
}

fn conditions(e: &Endpoint) -> (bool, bool, bool) {
    let c = e.conditions.clone().unwrap();
    (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
}

#[test]
fn ready_not_ready_and_terminating_pods_get_the_right_conditions() {
    let svc = service(vec![http_port()]);
    let ready = pod("ready", "10.244.1.2", "n1", true, Some(8080));
    let not_ready = pod("not-ready", "10.244.1.3", "n2", false, Some(8080));
    let mut terminating = pod("terminating", "10.244.1.4", "n1", true, Some(8080));
    terminating.metadata.deletion_timestamp = Some(Time(ts(100)));
    let mut finished = pod("finished", "10.244.1.5", "n1", false, Some(8080));
    finished.spec.as_mut().unwrap().restart_policy = Some("Never".into());
    finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let mut no_ip = pod("no-ip", "", "n1", false, Some(8080));
    no_ip.status.as_mut().unwrap().pod_ips = None;
    let mut other = pod("other-app", "10.244.1.6", "n1", true, Some(8080));
    other.metadata.labels = Some(labels(&[("app", "db")]));
    let pods = [ready, not_ready, terminating, finished, no_ip, other];
    let nodes = [node("n1", "zone-a"), node("n2", "zone-b")];
    let out = reconcile(&svc, &pods, &nodes, &[], &mut SeededSuffixes::new(1)).unwrap();
    let mut store = Vec::new();
    assert_eq!(apply(&mut store, &out), (1, 0, 0));
    let slice = &store[0];
    assert_eq!(slice.address_type, "IPv4");
    assert!(slice.metadata.name.as_ref().unwrap().starts_with("web-"));
    let l = slice.metadata.labels.as_ref().unwrap();
    assert_eq!(l.get(SERVICE_NAME_LABEL).map(String::as_str), Some("web"));
    assert_eq!(
        l.get(MANAGED_BY_LABEL).map(String::as_str),
        Some(MANAGED_BY)
    );
    assert_eq!(l.get("team").map(String::as_str), Some("blue"));
    let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("Service", "svc-uid", Some(true))
    );
    let ports = slice.ports.clone().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(
        (
            ports[0].name.as_deref(),
            ports[0].port,
            ports[0].protocol.as_deref()
        ),
        (Some("http"), Some(8080), Some("TCP"))
    );

    let eps = all_endpoints(&store);
    assert_eq!(
        eps.keys().cloned().collect::<Vec<_>>(),
        vec!["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    );
    assert_eq!(conditions(&eps["10.244.1.2"]), (true, true, false));
    assert_eq!(conditions(&eps["10.244.1.3"]), (false, false, false));
    assert_eq!(
        conditions(&eps["10.244.1.4"]),
        (false, true, true),
        "terminating: serving but not ready"
    );
    let e = &eps["10.244.1.3"];
    assert_eq!(e.node_name.as_deref(), Some("n2"));
    assert_eq!(e.zone.as_deref(), Some("zone-b"));
    let target = e.target_ref.as_ref().unwrap();
    assert_eq!(
        (
            target.kind.as_deref(),
            target.name.as_deref(),
            target.uid.as_deref()
        ),
        (Some("Pod"), Some("not-ready"), Some("not-ready-uid"))
    );
}

#[test]
fn publish_not_ready_addresses_marks_everything_ready() {
    let mut svc = service(vec![http_port()]);
    svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
    let mut terminating = pod("t", "10.244.1.4", "n1", false, Some(8080));
    terminating.metadata.deletion_timestamp = Some(Time(ts(100)));
    let pods = [pod("a", "10.244.1.3", "n1", false, Some(8080)), terminating];
    let out = reconcile(&svc, &pods, &[], &[], &mut SeededSuffixes::new(1)).unwrap();
    let mut store = Vec::new();
    apply(&mut store, &out);
    let eps = all_endpoints(&store);
    assert_eq!(conditions(&eps["10.244.1.3"]), (true, true, false));
    assert_eq!(conditions(&eps["10.244.1.4"]), (true, true, true));
}

#[test]
fn named_target_ports_resolve_per_pod_and_split_slices() {
    let metrics = ServicePort {
        name: Some("metrics".into()),
        port: 9100,
        target_port: Some(IntOrString::Int(9100)),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let svc = service(vec![http_port(), metrics]);
    let pods = [
        pod("a", "10.244.1.2", "n1", true, Some(8080)),
        pod("b", "10.244.1.3", "n1", true, Some(8080)),
        pod("c", "10.244.1.4", "n1", true, Some(9090)),
        // No port named "http": only the numeric metrics port applies to it.
        pod("d", "10.244.1.5", "n1", true, None),
    ];
    let out = reconcile(&svc, &pods, &[], &[], &mut SeededSuffixes::new(1)).unwrap();
    let mut store = Vec::new();
    assert_eq!(apply(&mut store, &out), (3, 0, 0));
    let by_ports: BTreeMap<Vec<(String, i32)>, Vec<String>> = store
        .iter()
        .map(|s| {
            let ports = s
                .ports
                .iter()
                .flatten()
                .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
                .collect();
            let ips = s.endpoints.iter().map(endpoint_id).collect();
            (ports, ips)
        })
        .collect();
    let key = |v: &[(&str, i32)]| {
        v.iter()
            .map(|(n, p)| (n.to_string(), *p))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by_ports[&key(&[("http", 8080), ("metrics", 9100)])],
        vec!["10.244.1.2", "10.244.1.3"]
    );
    assert_eq!(
        by_ports[&key(&[("http", 9090), ("metrics", 9100)])],
        vec!["10.244.1.4"]
    );
    assert_eq!(by_ports[&key(&[("metrics", 9100)])], vec!["10.244.1.5"]);
}

fn many_pods(n: usize) -> Vec<Pod> {
    (0..n)
        .map(|i| {
            pod(
                &format!("p{i:03}"),
                &format!("10.244.{}.{}", i / 200, i % 200 + 2),
                "n1",
                true,
                Some(8080),
            )
        })
        .collect()
}

#[test]
fn more_than_100_endpoints_are_split_into_full_slices() {
    let svc = service(vec![http_port()]);
    let pods = many_pods(250);
    let out = reconcile(&svc, &pods, &[], &[], &mut SeededSuffixes::new(1)).unwrap();
    let mut store = Vec::new();
    assert_eq!(apply(&mut store, &out), (3, 0, 0));
    let mut sizes: Vec<usize> = store.iter().map(|s| s.endpoints.len()).collect();
    sizes.sort();
    assert_eq!(sizes, vec![50, 100, 100]);
    assert_eq!(all_endpoints(&store).len(), 250);
    // Reconciling again with nothing changed writes nothing.
    let again = reconcile(&svc, &pods, &[], &store, &mut SeededSuffixes::new(2)).unwrap();
    assert!(again.actions.is_empty(), "{:?}", again.actions);
}

#[test]
fn one_pod_change_touches_one_slice() {
    let svc = service(vec![http_port()]);
    let mut pods = many_pods(250);
    let mut store = Vec::new();
    apply(
        &mut store,
        &reconcile(&svc, &pods, &[], &[], &mut SeededSuffixes::new(1)).unwrap(),
    );
    let names: BTreeSet<_> = store.iter().map(|s| s.metadata.name.clone()).collect();

    // A new pod: goes into the slice with room, no new slice.
    pods.push(pod("new", "10.244.9.9", "n1", true, Some(8080)));
    let out = reconcile(&svc, &pods, &[], &store, &mut SeededSuffixes::new(2)).unwrap();
    assert_eq!(apply(&mut store, &out), (0, 1, 0));
    assert_eq!(all_endpoints(&store).len(), 251);

    // A pod goes not-ready: only its slice is rewritten, only its endpoint differs.
    let before = store.clone();
    let status = pods[7].status.as_mut().unwrap();
    status.conditions.as_mut().unwrap()[0].status = "False".into();
    let out = reconcile(&svc, &pods, &[], &store, &mut SeededSuffixes::new(3)).unwrap();
    assert_eq!(apply(&mut store, &out), (0, 1, 0));
    let changed: Vec<String> = all_endpoints(&store)
        .into_iter()
        .filter(|(ip, e)| all_endpoints(&before)[ip] != *e)
        .map(|(ip, _)| ip)
        .collect();
    assert_eq!(
        changed,
        vec!["10.244.0.9".to_string()],
        "pod p007's endpoint only"
    );

    // A pod goes away: one update, nothing recreated.
    pods.remove(3);
    let out = reconcile(&svc, &pods, &[], &store, &mut SeededSuffixes::new(4)).unwrap();
    assert_eq!(apply(&mut store, &out), (0, 1, 0));
    assert_eq!(all_endpoints(&store).len(), 250);
    let after: BTreeSet<_> = store.iter().map(|s| s.metadata.name.clone()).collect();
    assert_eq!(names, after, "the same slices, updated in place");
}

#[test]
fn no_endpoints_keeps_one_placeholder_and_pods_replace_it() {
    let svc = service(vec![http_port()]);
    let mut store = Vec::new();
    let out = reconcile(&svc, &[], &[], &store, &mut SeededSuffixes::new(1)).unwrap();
    assert_eq!(apply(&mut store, &out), (1, 0, 0));
    assert!(store[0].endpoints.is_empty());
    let again = reconcile(&svc, &[], &[], &store, &mut SeededSuffixes::new(2)).unwrap();
    assert!(again.actions.is_empty(), "the placeholder is stable");
    let pods = [pod("a", "10.244.1.2", "n1", true, Some(8080))];
    let out = reconcile(&svc, &pods, &[], &store, &mut SeededSuffixes::new(3)).unwrap();
    assert_eq!(apply(&mut store, &out), (1, 0, 1));
    assert_eq!(all_endpoints(&store).len(), 1);
    // Creates come before deletes: the endpoint is never missing from every slice.
    assert!(matches!(out.actions.first(), Some(Action::Create(_))));
}

#[test]
fn dual_stack_services_get_one_slice_per_family() {
    let mut svc = service(vec![http_port()]);
    svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
    let mut p = pod("a", "10.244.1.2", "n1", true, Some(8080));
    p.status.as_mut().unwrap().pod_ips = Some(vec![
        PodIP {
            ip: "10.244.1.2".into(),
        },
        PodIP {
            ip: "fd00:10:244::2".into(),
        },
    ]);
    let out = reconcile(&svc, &[p], &[], &[], &mut SeededSuffixes::new(1)).unwrap();
    let mut store = Vec::new();
    apply(&mut store, &out);
    let families: BTreeMap<String, String> = store
        .iter()
        .map(|s| (s.address_type.clone(), endpoint_id(&s.endpoints[0])))
        .collect();
    assert_eq!(families["IPv4"], "10.244.1.2");
    assert_eq!(families["IPv6"], "fd00:10:244::2");
}

#[test]
fn services_without_selector_and_foreign_slices_are_left_alone() {
    let mut svc = service(vec![http_port()]);
    svc.spec.as_mut().unwrap().selector = None;
    let pods = [pod("a", "10.244.1.2", "n1", true, Some(8080))];
    let mut foreign = EndpointSlice {
        metadata: ObjectMeta {
            name: Some("web-manual".into()),
            namespace: Some("default".into()),
            labels: Some(labels(&[
                (SERVICE_NAME_LABEL, "web"),
                (MANAGED_BY_LABEL, "someone-else"),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: vec![],
        ports: None,
    };
    let out = reconcile(
        &svc,
        &pods,
        &[],
        std::slice::from_ref(&foreign),
        &mut SeededSuffixes::new(1),
    )
    .unwrap();
    assert!(out.actions.is_empty());
    assert!(endpoints(&svc, &pods, None).unwrap().actions.is_empty());
    // With a selector, a slice managed by another controller is still not ours to touch.
    let svc = service(vec![http_port()]);
    foreign.endpoints = vec![pod_to_endpoint(
        &svc,
        &pods[0],
        "10.9.9.9".into(),
        &BTreeMap::new(),
    )];
    let out = reconcile(&svc, &pods, &[], &[foreign], &mut SeededSuffixes::new(1)).unwrap();
    assert!(
        out.actions.iter().all(|a| matches!(a, Action::Create(_))),
        "{:?}",
        out.actions
    );
}

#[test]
fn endpoints_v1_splits_ready_and_not_ready_and_drops_terminating() {
    let svc = service(vec![http_port()]);
    let mut terminating = pod("t", "10.244.1.9", "n1", true, Some(8080));
    terminating.metadata.deletion_timestamp = Some(Time(ts(5)));
    let pods = [
        pod("b", "10.244.1.3", "n1", true, Some(8080)),
        pod("a", "10.244.1.2", "n2", true, Some(8080)),
        pod("c", "10.244.1.4", "n1", false, Some(8080)),
        pod("other-port", "10.244.1.5", "n1", true, Some(9090)),
        terminating,
    ];
    let out = endpoints(&svc, &pods, None).unwrap();
    let Some(Action::Create(Object::Endpoints(ep))) = out.actions.first() else {
        panic!("{:?}", out.actions);
    };
    assert_eq!(ep.metadata.name.as_deref(), Some("web"));
    let subsets = ep.subsets.clone().unwrap();
    assert_eq!(subsets.len(), 2, "one subset per resolved port list");
    let main = subsets
        .iter()
        .find(|s| s.ports.as_ref().unwrap()[0].port == 8080)
        .unwrap();
    let ips = |v: &Option<Vec<EndpointAddress>>| {
        v.iter().flatten().map(|a| a.ip.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ips(&main.addresses), vec!["10.244.1.2", "10.244.1.3"]);
    assert_eq!(ips(&main.not_ready_addresses), vec!["10.244.1.4"]);
    assert_eq!(
        main.ports.as_ref().unwrap()[0].name.as_deref(),
        Some("http")
    );
    let a = &main.addresses.as_ref().unwrap()[0];
    assert_eq!(a.node_name.as_deref(), Some("n2"));
    assert_eq!(a.target_ref.as_ref().unwrap().name.as_deref(), Some("a"));
    // Unchanged -> no write; a readiness change -> one update.
    let stored = (**ep).clone();
    assert!(
        endpoints(&svc, &pods, Some(&stored))
            .unwrap()
            .actions
            .is_empty()
    );
    let mut changed = pods.clone();
    changed[2]
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "True".into();
    let out = endpoints(&svc, &changed, Some(&stored)).unwrap();
    let Some(Action::Update(Object::Endpoints(updated))) = out.actions.first() else {
        panic!("{:?}", out.actions);
    };
    let main = updated
        .subsets
        .as_ref()
        .unwrap()
        .iter()
        .find(|s| s.ports.as_ref().unwrap()[0].port == 8080)
        .unwrap();
    assert_eq!(
        ips(&main.addresses),
        vec!["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    );
    assert!(main.not_ready_addresses.is_none());
}

#[test]
fn slices_of_a_deleted_namesake_service_are_not_rewritten() {
    let svc = service(vec![http_port()]);
    let pods = [pod("a", "10.244.1.2", "n1", true, Some(8080))];
    let mut store = Vec::new();
    apply(
        &mut store,
        &reconcile(&svc, &pods, &[], &[], &mut SeededSuffixes::new(1)).unwrap(),
    );
    // The Service is deleted and recreated: same name, new uid.
    let mut recreated = svc.clone();
    recreated.metadata.uid = Some("svc-uid-2".into());
    let out = reconcile(&recreated, &pods, &[], &store, &mut SeededSuffixes::new(2)).unwrap();
    assert_eq!(out.actions.len(), 1);
    let Action::Create(Object::EndpointSlice(s)) = &out.actions[0] else {
        panic!("{:?}", out.actions);
    };
    assert_eq!(
        s.metadata.owner_references.as_ref().unwrap()[0].uid,
        "svc-uid-2"
    );
}

#[test]
fn selects_matches_pods_of_the_service_namespace_only() {
    let svc = service(vec![http_port()]);
    let mut p = pod("a", "10.244.1.2", "n1", true, Some(8080));
    assert!(selects(&svc, &p));
    p.metadata.namespace = Some("other".into());
    assert!(!selects(&svc, &p));
    let mut no_selector = svc.clone();
    no_selector.spec.as_mut().unwrap().selector = None;
    assert!(!selects(
        &no_selector,
        &pod("b", "10.244.1.3", "n1", true, None)
    ));
}

/// Random pod churn (pods added, removed, readiness flipped, terminating) over a few hundred
/// pods: after every reconcile the slices hold exactly the desired endpoints once each, no
/// slice exceeds 100, and the writes stay proportional to what changed.
#[test]
fn random_pod_churn_keeps_slices_exact_and_writes_small() {
    for seed in 0..60u64 {
        let mut rng = SeededSuffixes::new(seed);
        let mut pick = |n: u64| rng.next_u64() % n;
        let svc = service(vec![http_port()]);
        let mut next = 0usize;
        let mut new_pod = |ready: bool| {
            next += 1;
            pod(
                &format!("p{next:04}"),
                &format!("10.{}.{}.{}", next / 65536, (next / 256) % 256, next % 256),
                "n1",
                ready,
                Some(8080),
            )
        };
        let mut pods: Vec<Pod> = (0..pick(300)).map(|i| new_pod(i % 3 != 0)).collect();
        let mut store = Vec::new();
        let mut names = SeededSuffixes::new(seed + 99);
        for round in 0..15 {
            let changes = 1 + pick(5) as usize;
            for _ in 0..changes {
                match pick(4) {
                    0 => pods.push(new_pod(pick(2) == 0)),
                    1 if !pods.is_empty() => {
                        let i = pick(pods.len() as u64) as usize;
                        pods.remove(i);
                    }
                    2 if !pods.is_empty() => {
                        let i = pick(pods.len() as u64) as usize;
                        let c = &mut pods[i]
                            .status
                            .as_mut()
                            .unwrap()
                            .conditions
                            .as_mut()
                            .unwrap()[0];
                        c.status = if c.status == "True" { "False" } else { "True" }.into();
                    }
                    _ if !pods.is_empty() => {
                        let i = pick(pods.len() as u64) as usize;
                        pods[i].metadata.deletion_timestamp = Some(Time(ts(1)));
                    }
                    _ => {}
                }
            }
            let out = reconcile(&svc, &pods, &[], &store, &mut names).unwrap();
            let (created, updated, deleted) = apply(&mut store, &out);
            let context = format!("seed {seed} round {round}");
            if round > 0 {
                assert!(
                    updated <= changes,
                    "{context}: {updated} updates for {changes} changes"
                );
                assert!(
                    created <= 1 && deleted <= changes,
                    "{context}: {created} creates, {deleted} deletes"
                );
            }
            let got = all_endpoints(&store);
            let want: BTreeMap<String, Endpoint> = pods
                .iter()
                .map(|p| {
                    let ip = p.status.as_ref().unwrap().pod_ip.clone().unwrap();
                    (ip.clone(), pod_to_endpoint(&svc, p, ip, &BTreeMap::new()))
                })
                .collect();
            assert_eq!(got, want, "{context}");
            if pods.is_empty() {
                assert_eq!(store.len(), 1, "{context}: one placeholder");
            } else {
                let minimum = pods.len().div_ceil(MAX_ENDPOINTS_PER_SLICE);
                assert!(
                    store.len() <= minimum + changes,
                    "{context}: {} slices for {} pods",
                    store.len(),
                    pods.len()
                );
            }
        }
    }
}
