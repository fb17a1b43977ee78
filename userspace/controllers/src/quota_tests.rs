#![allow(clippy::unwrap_used)]

use super::*;
use k8s_openapi::api::core::v1::ResourceQuotaSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;

fn quota(name: &str, hard: &[(&str, &str)], used: Option<&[(&str, &str)]>) -> ResourceQuota {
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, Quantity> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect()
    };
    ResourceQuota {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("team".into()),
            ..Default::default()
        },
        spec: Some(ResourceQuotaSpec {
            hard: Some(map(hard)),
            ..Default::default()
        }),
        status: used.map(|u| ResourceQuotaStatus {
            hard: Some(map(hard)),
            used: Some(map(u)),
        }),
    }
}

fn pod_json(cpu: Option<&str>, memory_limit: Option<&str>, phase: &str) -> Value {
    let mut resources = json!({});
    if let Some(c) = cpu {
        resources["requests"] = json!({"cpu": c});
    }
    if let Some(m) = memory_limit {
        resources["limits"] = json!({"memory": m});
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "team"},
        "spec": {"containers": [{"name": "c", "image": "x", "resources": resources}]},
        "status": {"phase": phase}
    })
}

#[test]
fn usage_counts_compute_and_objects() {
    let u = object_usage("", "pods", &pod_json(Some("250m"), Some("1Gi"), "Running"));
    assert_eq!(u["pods"], 1);
    assert_eq!(u["requests.cpu"], 250);
    assert_eq!(u["cpu"], 250);
    assert_eq!(u["limits.memory"], 1 << 30);
    // Requests default to limits.
    assert_eq!(u["requests.memory"], 1 << 30);
    assert_eq!(u["count/pods"], 1);
    let done = object_usage("", "pods", &pod_json(Some("250m"), None, "Succeeded"));
    assert_eq!(done.get("pods"), None, "finished pods use nothing");
    assert_eq!(done["count/pods"], 1, "but still exist");
    let d = object_usage("apps", "deployments", &json!({}));
    assert_eq!(d, Usage::from([("count/deployments.apps".to_string(), 1)]));
    let s = object_usage("", "services", &json!({"spec": {"type": "NodePort"}}));
    assert_eq!((s["services"], s["services.nodeports"]), (1, 1));
}

#[test]
fn amounts_format_like_kubernetes_quantities() {
    assert_eq!(format_amount("requests.cpu", 1500), "1500m");
    assert_eq!(format_amount("cpu", 2000), "2");
    assert_eq!(format_amount("limits.memory", 1 << 30), "1Gi");
    assert_eq!(format_amount("memory", 1536 << 10), "1536Ki");
    assert_eq!(format_amount("memory", 1000), "1000");
    assert_eq!(format_amount("pods", 3), "3");
    assert_eq!(parse_amount("cpu", "0.5").unwrap(), 500);
    assert!(parse_amount("cpu", "lots").is_err());
}

#[test]
fn controller_writes_used_for_each_hard_resource() {
    let q = quota("compute", &[("pods", "10"), ("requests.cpu", "2")], None);
    let mut usage = Usage::new();
    add(
        &mut usage,
        &object_usage("", "pods", &pod_json(Some("500m"), None, "Running")),
    );
    add(
        &mut usage,
        &object_usage("", "pods", &pod_json(Some("700m"), None, "Running")),
    );
    let out = reconcile(&q, &usage);
    let Some(Action::UpdateStatus(Object::ResourceQuota(next))) = out.actions.first() else {
        panic!("status update expected: {out:?}");
    };
    let used = next.status.as_ref().unwrap().used.clone().unwrap();
    assert_eq!(used["pods"].0, "2");
    assert_eq!(used["requests.cpu"].0, "1200m");
    // Already up to date: nothing.
    assert!(reconcile(next, &usage).actions.is_empty());
}

#[test]
fn check_refuses_with_kubernetes_message_and_charges_otherwise() {
    let q = quota(
        "compute",
        &[("pods", "2"), ("requests.cpu", "1")],
        Some(&[("pods", "1"), ("requests.cpu", "600m")]),
    );
    let pod: Pod = serde_json::from_value(pod_json(Some("300m"), None, "Pending")).unwrap();
    let charged = check(std::slice::from_ref(&q), &pod_usage(&pod), Some(&pod)).unwrap();
    let used = charged[0].status.as_ref().unwrap().used.clone().unwrap();
    assert_eq!(
        (used["pods"].0.as_str(), used["requests.cpu"].0.as_str()),
        ("2", "900m")
    );

    let big: Pod = serde_json::from_value(pod_json(Some("500m"), None, "Pending")).unwrap();
    let err = check(std::slice::from_ref(&q), &pod_usage(&big), Some(&big)).unwrap_err();
    assert_eq!(
        err,
        "exceeded quota: compute, requested: requests.cpu=500m, used: requests.cpu=600m, limited: requests.cpu=1"
    );
    let full = quota(
        "compute",
        &[("pods", "2"), ("requests.cpu", "1")],
        Some(&[("pods", "2"), ("requests.cpu", "600m")]),
    );
    let err = check(&[full], &pod_usage(&big), Some(&big)).unwrap_err();
    assert_eq!(
        err,
        "exceeded quota: compute, requested: pods=1,requests.cpu=500m, used: pods=2,requests.cpu=600m, limited: pods=2,requests.cpu=1"
    );
}

#[test]
fn check_demands_requests_and_known_status() {
    let q = quota(
        "compute",
        &[("requests.cpu", "1")],
        Some(&[("requests.cpu", "0")]),
    );
    let bare: Pod = serde_json::from_value(pod_json(None, None, "Pending")).unwrap();
    assert_eq!(
        check(std::slice::from_ref(&q), &pod_usage(&bare), Some(&bare)).unwrap_err(),
        "failed quota: compute: must specify requests.cpu"
    );
    let fresh = quota("objects", &[("count/configmaps", "5")], None);
    let cm = object_usage("", "configmaps", &json!({}));
    assert_eq!(
        check(&[fresh], &cm, None).unwrap_err(),
        "status unknown for quota: objects, resources: count/configmaps"
    );
    // A quota that tracks none of it is not charged.
    assert!(check(&[q], &cm, None).unwrap().is_empty());
}

#[test]
fn lowering_used_is_detected_per_limited_resource() {
    let q = quota(
        "q",
        &[("pods", "2"), ("requests.cpu", "1")],
        Some(&[("pods", "2"), ("requests.cpu", "200m")]),
    );
    let usage = |pods: i64, cpu: i64| -> Usage {
        [("pods".to_string(), pods), ("requests.cpu".to_string(), cpu)]
            .into_iter()
            .collect()
    };
    assert!(!lowers_used(&q, &usage(2, 200)), "equal");
    assert!(!lowers_used(&q, &usage(3, 300)), "higher");
    assert!(lowers_used(&q, &usage(1, 200)), "one pod fewer");
    assert!(lowers_used(&q, &usage(2, 100)), "less cpu");
    // A resource the quota does not limit does not count; no status yet lowers nothing.
    let mut more = usage(2, 200);
    more.insert("services".into(), 0);
    assert!(!lowers_used(&q, &more));
    assert!(!lowers_used(&quota("new", &[("pods", "2")], None), &usage(0, 0)));
}
