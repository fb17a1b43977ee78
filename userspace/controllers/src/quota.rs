//! ResourceQuota: what objects use (Kubernetes' quota evaluators), the quota controller's
//! `status.used`, and the admission check that refuses a create exceeding a quota.
//!
//! Tracked resources: `pods`, `cpu`/`requests.cpu`, `memory`/`requests.memory`, `limits.cpu`,
//! `limits.memory` (pods that are not Succeeded/Failed), the legacy object counts (`services`,
//! `configmaps`, `secrets`, `resourcequotas`, `replicationcontrollers`,
//! `persistentvolumeclaims`), and `count/<resource>[.<group>]` for every resource. Values are
//! kept as integers: cpu in millicores, everything else in units (bytes, objects). Quota scopes
//! and scope selectors are not supported (a quota with them is ignored by the check).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, ResourceQuota, ResourceQuotaStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::Value;
use skiff_scheduler::quantity::ParsedQuantity;

use crate::{Action, Object, Outcome};

/// Usage of one object or a namespace: resource name -> amount (cpu in millicores).
pub type Usage = BTreeMap<String, i64>;

fn is_cpu(resource: &str) -> bool {
    matches!(resource, "cpu" | "requests.cpu" | "limits.cpu")
}

fn is_memory(resource: &str) -> bool {
    matches!(resource, "memory" | "requests.memory" | "limits.memory")
}

/// Parses a quota quantity into the integer units of [`Usage`].
pub fn parse_amount(resource: &str, q: &str) -> Result<i64, String> {
    let parsed = ParsedQuantity::parse(q).map_err(|e| e.to_string())?;
    Ok(if is_cpu(resource) {
        parsed.milli_value()
    } else {
        parsed.value()
    })
}

/// Formats an amount the way Kubernetes prints canonical quantities (`500m`, `2`, `1Gi`).
pub fn format_amount(resource: &str, value: i64) -> String {
    if is_cpu(resource) {
        return if value % 1000 == 0 {
            (value / 1000).to_string()
        } else {
            format!("{value}m")
        };
    }
    if is_memory(resource) && value != 0 {
        for (suffix, unit) in [
            ("Ei", 1i64 << 60),
            ("Pi", 1 << 50),
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ] {
            if value % unit == 0 {
                return format!("{}{suffix}", value / unit);
            }
        }
    }
    value.to_string()
}

/// Sum of containers' `field` (requests or limits) of `resource`, at least the largest init
/// container's (Kubernetes' pod resource rule, without overhead). None when a container does not
/// set it.
fn pod_amount(pod: &Pod, field: &str, resource: &str) -> (i64, bool) {
    let Some(spec) = pod.spec.as_ref() else {
        return (0, false);
    };
    let get = |c: &k8s_openapi::api::core::v1::Container| -> Option<i64> {
        let r = c.resources.as_ref()?;
        let map = if field == "requests" {
            // Kubernetes defaults requests to limits when only limits are set.
            r.requests
                .as_ref()
                .and_then(|m| m.get(resource))
                .or_else(|| r.limits.as_ref()?.get(resource))
        } else {
            r.limits.as_ref()?.get(resource)
        }?;
        parse_amount(resource, &map.0).ok()
    };
    let mut all_set = !spec.containers.is_empty();
    let mut sum = 0i64;
    for c in &spec.containers {
        match get(c) {
            Some(v) => sum = sum.saturating_add(v),
            None => all_set = false,
        }
    }
    let init_max = spec
        .init_containers
        .iter()
        .flatten()
        .filter_map(get)
        .max()
        .unwrap_or(0);
    (sum.max(init_max), all_set)
}

fn terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The compute usage of a pod (zero for a finished one).
pub fn pod_usage(pod: &Pod) -> Usage {
    let mut usage = Usage::new();
    if terminal(pod) {
        return usage;
    }
    usage.insert("pods".into(), 1);
    for resource in ["cpu", "memory"] {
        let (requests, _) = pod_amount(pod, "requests", resource);
        let (limits, _) = pod_amount(pod, "limits", resource);
        usage.insert(resource.into(), requests);
        usage.insert(format!("requests.{resource}"), requests);
        usage.insert(format!("limits.{resource}"), limits);
    }
    usage
}

/// What one stored object of `group`/`plural` counts against quotas.
pub fn object_usage(group: &str, plural: &str, obj: &Value) -> Usage {
    let mut usage = Usage::new();
    let count_key = if group.is_empty() {
        format!("count/{plural}")
    } else {
        format!("count/{plural}.{group}")
    };
    usage.insert(count_key, 1);
    if group.is_empty() {
        match plural {
            "pods" => {
                if let Ok(pod) = serde_json::from_value::<Pod>(obj.clone()) {
                    usage.extend(pod_usage(&pod));
                }
            }
            "services"
            | "configmaps"
            | "secrets"
            | "resourcequotas"
            | "replicationcontrollers"
            | "persistentvolumeclaims" => {
                usage.insert(plural.to_string(), 1);
            }
            _ => {}
        }
        if plural == "services" {
            match obj.pointer("/spec/type").and_then(Value::as_str) {
                Some("NodePort") => {
                    usage.insert("services.nodeports".into(), 1);
                }
                Some("LoadBalancer") => {
                    usage.insert("services.loadbalancers".into(), 1);
                    usage.insert("services.nodeports".into(), 1);
                }
                _ => {}
            }
        }
    }
    usage
}

/// Adds `b` into `a`.
pub fn add(a: &mut Usage, b: &Usage) {
    for (k, v) in b {
        *a.entry(k.clone()).or_insert(0) += v;
    }
}

fn hard_of(quota: &ResourceQuota) -> BTreeMap<String, Quantity> {
    quota
        .spec
        .as_ref()
        .and_then(|s| s.hard.clone())
        .unwrap_or_default()
}

/// (resource, requested, used, limit).
type Exceeded = (String, i64, i64, i64);

fn has_scopes(quota: &ResourceQuota) -> bool {
    quota.spec.as_ref().is_some_and(|s| {
        s.scopes.as_ref().is_some_and(|v| !v.is_empty()) || s.scope_selector.is_some()
    })
}

/// The quota controller: `status.hard` mirrors `spec.hard` and `status.used` is the namespace's
/// usage of each hard resource.
pub fn reconcile(quota: &ResourceQuota, namespace_usage: &Usage) -> Outcome {
    let hard = hard_of(quota);
    let used: BTreeMap<String, Quantity> = hard
        .keys()
        .map(|k| {
            let v = namespace_usage.get(k).copied().unwrap_or(0);
            (k.clone(), Quantity(format_amount(k, v)))
        })
        .collect();
    let status = ResourceQuotaStatus {
        hard: (!hard.is_empty()).then_some(hard),
        used: (!used.is_empty()).then_some(used),
    };
    let mut outcome = Outcome::default();
    if quota.status.as_ref() != Some(&status) {
        let mut next = quota.clone();
        next.status = Some(status);
        outcome
            .actions
            .push(Action::UpdateStatus(Object::ResourceQuota(Box::new(next))));
    }
    outcome
}

/// Whether `namespace_usage` is below what `quota`'s status says is used for any resource it
/// limits. Admission charges `status.used` before the object is created, so a usage computed
/// from watch caches that have not seen the new object yet is lower than the truth: lowering
/// `used` from it would let one more object in. The controller recounts from a fresh list first.
pub fn lowers_used(quota: &ResourceQuota, namespace_usage: &Usage) -> bool {
    let used = quota.status.as_ref().and_then(|s| s.used.as_ref());
    hard_of(quota).keys().any(|k| {
        let recorded = used
            .and_then(|u| u.get(k))
            .and_then(|q| parse_amount(k, &q.0).ok())
            .unwrap_or(0);
        namespace_usage.get(k).copied().unwrap_or(0) < recorded
    })
}

/// Admission: may an object using `requested` be created under `quotas` (the namespace's)?
/// `Ok` lists, per quota that tracks any of it, the quota with its `status.used` increased (the
/// caller writes these back, compare-and-swap, so two creates cannot both take the last unit);
/// `Err` is the message of Kubernetes' 403 (`exceeded quota: ...`, `status unknown for quota:
/// ...`, `failed quota: ...: must specify ...`).
pub fn check(
    quotas: &[ResourceQuota],
    requested: &Usage,
    pod: Option<&Pod>,
) -> Result<Vec<ResourceQuota>, String> {
    let mut charged = Vec::new();
    let mut sorted: Vec<&ResourceQuota> = quotas.iter().filter(|q| !has_scopes(q)).collect();
    sorted.sort_by_key(|q| q.metadata.name.clone());
    for quota in sorted {
        let name = quota.metadata.name.clone().unwrap_or_default();
        let hard = hard_of(quota);
        let tracked: Vec<&String> = hard
            .keys()
            .filter(|k| {
                requested.get(*k).copied().unwrap_or(0) != 0
                    || (pod.is_some()
                        && matches!(
                            k.as_str(),
                            "requests.cpu"
                                | "requests.memory"
                                | "limits.cpu"
                                | "limits.memory"
                                | "cpu"
                                | "memory"
                        ))
            })
            .collect();
        if tracked.is_empty() {
            continue;
        }
        if let Some(pod) = pod.filter(|p| !terminal(p)) {
            let mut unset: Vec<&str> = Vec::new();
            for key in [
                "limits.cpu",
                "limits.memory",
                "requests.cpu",
                "requests.memory",
                "cpu",
                "memory",
            ] {
                if !hard.contains_key(key) {
                    continue;
                }
                let (field, resource) = key.split_once('.').unwrap_or(("requests", key));
                if !pod_amount(pod, field, resource).1 {
                    unset.push(key);
                }
            }
            if !unset.is_empty() {
                return Err(format!(
                    "failed quota: {name}: must specify {}",
                    unset.join(",")
                ));
            }
        }
        let used_now = quota
            .status
            .as_ref()
            .and_then(|s| s.used.clone())
            .unwrap_or_default();
        let missing: Vec<&str> = tracked
            .iter()
            .filter(|k| !used_now.contains_key(k.as_str()))
            .map(|k| k.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "status unknown for quota: {name}, resources: {}",
                missing.join(",")
            ));
        }
        let mut new_used = used_now.clone();
        let mut exceeded: Vec<Exceeded> = Vec::new();
        for key in tracked {
            let want = requested.get(key).copied().unwrap_or(0);
            if want == 0 {
                continue;
            }
            let limit = parse_amount(key, &hard[key].0)
                .map_err(|e| format!("quota {name}: spec.hard[{key}]: {e}"))?;
            let used = used_now
                .get(key)
                .and_then(|q| parse_amount(key, &q.0).ok())
                .unwrap_or(0);
            if used.saturating_add(want) > limit {
                exceeded.push((key.clone(), want, used, limit));
            }
            new_used.insert(
                key.clone(),
                Quantity(format_amount(key, used.saturating_add(want))),
            );
        }
        if !exceeded.is_empty() {
            let list = |f: &dyn Fn(&Exceeded) -> i64| {
                exceeded
                    .iter()
                    .map(|e| format!("{}={}", e.0, format_amount(&e.0, f(e))))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            return Err(format!(
                "exceeded quota: {name}, requested: {}, used: {}, limited: {}",
                list(&|e| e.1),
                list(&|e| e.2),
                list(&|e| e.3)
            ));
        }
        if new_used != used_now {
            let mut next = quota.clone();
            next.status.get_or_insert_with(Default::default).used = Some(new_used);
            charged.push(next);
        }
    }
    Ok(charged)
}

#[cfg(test)]
#[path = "quota_tests.rs"]
mod tests;
