//! Service cluster IP and node port allocation.
//!
//! Allocations are computed from the stored Services at allocation time, under a lock that is
//! held until the write recording them lands. Nothing else is stored, so a restart needs no
//! extra state and deleting a Service (or changing its type) releases what it held. The cost is
//! a list of all Services per Service write, and the lock is per apiserver: two apiservers on
//! one etcd could hand out the same address (Kubernetes keeps an allocation bitmap object for
//! that; when skiff runs several apiservers this needs the same).

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::objects::{name_of, prefix, store_error};
use skiff_api::registry::{self, ResourceInfo};
use skiff_api::status::ApiError;

pub fn is_service(info: &ResourceInfo) -> bool {
    info.group.is_empty() && info.kind == "Service"
}

/// The address of the `kubernetes` Service: the first host of the range.
pub fn first_ip(cidr: &ipnet::Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()).saturating_add(1))
}

fn invalid(name: &str, field: &str, message: String) -> ApiError {
    ApiError::invalid("Service", name, &[(field.to_string(), message)])
}

/// What allocation reads of a stored Service; serde skips the rest without building it. The
/// leaves stay JSON values, read as leniently as a full decode would be (a field of an
/// unexpected type is ignored, not an error).
#[derive(Deserialize)]
struct AllocatedFields {
    metadata: Option<AllocatedMeta>,
    spec: Option<AllocatedSpec>,
}

#[derive(Deserialize)]
struct AllocatedMeta {
    name: Option<Value>,
    namespace: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AllocatedSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<Value>,
    ports: Option<Vec<Value>>,
    health_check_node_port: Option<Value>,
}

/// The cluster IPs and node ports (health-check ports included) every Service but `new` holds.
async fn used_by_others(
    state: &State,
    new: &Value,
) -> Result<(HashSet<Ipv4Addr>, HashSet<i64>), ApiError> {
    let info = registry::find("", "v1", "services")
        .ok_or_else(|| ApiError::internal("services are not registered"))?;
    let listed = state
        .store
        .list(&prefix(info, None))
        .await
        .map_err(store_error)?;
    let mut used_ips = HashSet::new();
    let mut used_ports = HashSet::new();
    let this = (
        new.pointer("/metadata/name"),
        new.pointer("/metadata/namespace"),
    );
    for kv in &listed.items {
        // Only the fields allocation reads: a full decode of every Service on each Service
        // write was most of a create's time at 5,000 Services.
        let svc: AllocatedFields = serde_json::from_slice(&kv.value).map_err(|e| {
            ApiError::internal(format!(
                "stored object {} is not a valid Service: {e}",
                kv.key
            ))
        })?;
        let meta = svc.metadata.as_ref();
        if (
            meta.and_then(|m| m.name.as_ref()),
            meta.and_then(|m| m.namespace.as_ref()),
        ) == this
        {
            continue;
        }
        let Some(spec) = svc.spec else { continue };
        if let Some(ip) = spec
            .cluster_ip
            .as_ref()
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        {
            used_ips.insert(ip);
        }
        for p in spec.ports.iter().flatten() {
            if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
                used_ports.insert(np);
            }
        }
        // Health-check node ports come from the same range: no nodePort may take one.
        if let Some(hc) = spec
            .health_check_node_port
            .as_ref()
            .and_then(Value::as_i64)
            .filter(|p| *p != 0)
        {
            used_ports.insert(hc);
        }
    }
    Ok((used_ips, used_ports))
}

/// Fills `spec.clusterIP(s)` and node ports of `new` (a Service), checking requested values
/// against what other Services hold. `old` is the stored Service on update.
pub async fn allocate(state: &State, new: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    let name = name_of(new).to_string();
    let ty = new
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if new.get("spec").is_none_or(|s| !s.is_object()) {
        new["spec"] = json!({});
    }
    let requested = new
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let old_ip = old
        .and_then(|o| o.pointer("/spec/clusterIP"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    // A ClusterIP Service keeping its address (the common update), a headless or an
    // ExternalName one takes nothing from the ranges, so the other Services need not be read:
    // listing them all is the cost of a Service write, held under the allocation lock.
    let takes_from_ranges = match ty.as_str() {
        "ExternalName" => false,
        "ClusterIP" => old_ip.is_empty() && requested != "None",
        _ => true,
    };
    let (used_ips, used_ports) = if takes_from_ranges {
        used_by_others(state, new).await?
    } else {
        (HashSet::new(), HashSet::new())
    };
    let spec = &mut new["spec"];

    if ty == "ExternalName" {
        if let Some(m) = spec.as_object_mut() {
            m.remove("clusterIP");
            m.remove("clusterIPs");
        }
    } else if !old_ip.is_empty() {
        if !requested.is_empty() && requested != old_ip {
            return Err(invalid(
                &name,
                "spec.clusterIPs[0]",
                format!("Invalid value: \"{requested}\": may not change once set"),
            ));
        }
        spec["clusterIP"] = json!(old_ip);
        spec["clusterIPs"] = json!([old_ip]);
    } else if requested == "None" {
        spec["clusterIPs"] = json!(["None"]);
    } else {
        let cidr = state.service_cidr;
        let ip = if requested.is_empty() {
            let first = u32::from(first_ip(&cidr));
            let last = u32::from(cidr.broadcast());
            // The first host belongs to the `kubernetes` Service; hand out the rest in order.
            (first.saturating_add(1)..last)
                .map(Ipv4Addr::from)
                .find(|ip| !used_ips.contains(ip))
                .ok_or_else(|| {
                    invalid(
                        &name,
                        "spec.clusterIPs",
                        format!(
                            "Internal error: failed to allocate a serviceIP: range {cidr} is full"
                        ),
                    )
                })?
        } else {
            let ip: Ipv4Addr = requested.parse().map_err(|_| {
                invalid(&name, "spec.clusterIPs[0]", format!("Invalid value: \"{requested}\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff) or None"))
            })?;
            if !cidr.contains(&ip) || ip == cidr.network() || ip == cidr.broadcast() {
                return Err(invalid(
                    &name,
                    "spec.clusterIPs",
                    format!(
                        "Invalid value: []string{{\"{requested}\"}}: failed to allocate IP {requested}: provided IP is not in the valid range. The range of valid IPs is {cidr}"
                    ),
                ));
            }
            if used_ips.contains(&ip) {
                return Err(invalid(
                    &name,
                    "spec.clusterIPs",
                    format!(
                        "Invalid value: []string{{\"{requested}\"}}: failed to allocate IP {requested}: provided IP is already allocated"
                    ),
                ));
            }
            ip
        };
        spec["clusterIP"] = json!(ip.to_string());
        spec["clusterIPs"] = json!([ip.to_string()]);
    }

    let wants_node_ports = ty == "NodePort" || ty == "LoadBalancer";
    let old_ports: Vec<Value> = old
        .and_then(|o| o.pointer("/spec/ports"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let range = state.node_port_range.clone();
    // This Service's own health-check port is not free for its node ports either.
    let mut taken_here: HashSet<i64> = old
        .and_then(|o| o.pointer("/spec/healthCheckNodePort"))
        .and_then(Value::as_i64)
        .filter(|p| *p != 0)
        .into_iter()
        .collect();
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for (i, p) in ports.iter_mut().enumerate() {
            let Some(m) = p.as_object_mut() else { continue };
            if !wants_node_ports {
                m.remove("nodePort");
                continue;
            }
            let old_np = old_ports
                .iter()
                .find(|o| o.get("port") == m.get("port") && o.get("protocol") == m.get("protocol"))
                .and_then(|o| o.get("nodePort"))
                .and_then(Value::as_i64);
            let np = match m
                .get("nodePort")
                .and_then(Value::as_i64)
                .filter(|n| *n != 0)
            {
                Some(np) => {
                    if !old_ports
                        .iter()
                        .any(|o| o.get("nodePort").and_then(Value::as_i64) == Some(np))
                    {
                        let field = format!("spec.ports[{i}].nodePort");
                        if np < i64::from(*range.start()) || np > i64::from(*range.end()) {
                            return Err(invalid(
                                &name,
                                &field,
                                format!(
                                    "Invalid value: {np}: provided port is not in the valid range. The range of valid ports is {}-{}",
                                    range.start(),
                                    range.end()
                                ),
                            ));
                        }
                        if used_ports.contains(&np) || taken_here.contains(&np) {
                            return Err(invalid(
                                &name,
                                &field,
                                format!("Invalid value: {np}: provided port is already allocated"),
                            ));
                        }
                    }
                    np
                }
                None => match old_np.filter(|np| !taken_here.contains(np)) {
                    Some(np) => np,
                    None => (i64::from(*range.start())..=i64::from(*range.end()))
                        .find(|np| !used_ports.contains(np) && !taken_here.contains(np))
                        .ok_or_else(|| {
                            invalid(
                                &name,
                                &format!("spec.ports[{i}].nodePort"),
                                "Internal error: failed to allocate a nodePort: range is full"
                                    .into(),
                            )
                        })?,
                },
            };
            taken_here.insert(np);
            m.insert("nodePort".into(), json!(np));
        }
    }
    let old_spec = old.and_then(|o| o.get("spec"));
    let old_hc = old_spec.and_then(|o| port_field(o, "healthCheckNodePort"));
    let node_ports_here: HashSet<i64> = taken_here
        .into_iter()
        .filter(|p| Some(*p) != old_hc)
        .collect();
    health_check_node_port(&name, spec, old_spec, &used_ports, &node_ports_here, &range)
}

fn port_field(spec: &Value, field: &str) -> Option<i64> {
    spec.get(field).and_then(Value::as_i64).filter(|p| *p != 0)
}

/// `spec.healthCheckNodePort`, as the Kubernetes apiserver does it: only a LoadBalancer Service
/// with externalTrafficPolicy=Local has one (Kubernetes allocates none for a NodePort Service,
/// and kube-proxy serves only what is allocated). A user-given port is kept when it is in the
/// node-port range and free; otherwise one is allocated from the range. It cannot change while
/// the Service keeps needing it, and it is dropped (so released: allocations are computed from
/// the stored Services) when the type or the policy changes. `used` holds every other Service's
/// node ports and health-check ports, `taken_here` this Service's node ports.
fn health_check_node_port(
    name: &str,
    spec: &mut Value,
    old_spec: Option<&Value>,
    used: &HashSet<i64>,
    taken_here: &HashSet<i64>,
    range: &std::ops::RangeInclusive<u16>,
) -> Result<(), ApiError> {
    const FIELD: &str = "spec.healthCheckNodePort";
    let str_of = |s: &Value, f: &str| s.get(f).and_then(Value::as_str).map(str::to_string);
    let needs = |s: &Value| {
        str_of(s, "type").as_deref() == Some("LoadBalancer")
            && str_of(s, "externalTrafficPolicy").as_deref() == Some("Local")
    };
    let requested = port_field(spec, "healthCheckNodePort");
    let old_port = old_spec
        .filter(|o| needs(o))
        .and_then(|o| port_field(o, "healthCheckNodePort"));
    if !needs(spec) {
        match requested {
            // Left over from before a type or policy change (a merge patch keeps it): dropped,
            // which releases it, as Kubernetes clears type-dependent fields the user did not set.
            Some(p) if old_spec.and_then(|o| port_field(o, "healthCheckNodePort")) == Some(p) => {}
            Some(p) => {
                return Err(invalid(
                    name,
                    FIELD,
                    format!(
                        "Invalid value: {p}: may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"
                    ),
                ));
            }
            None => {}
        }
        if let Some(m) = spec.as_object_mut() {
            m.remove("healthCheckNodePort");
        }
        return Ok(());
    }
    let port = match (old_port, requested) {
        (Some(old), None) => old,
        (Some(old), Some(new)) if old == new => old,
        (Some(_), Some(new)) => {
            return Err(invalid(
                name,
                FIELD,
                format!(
                    "Invalid value: {new}: cannot change healthCheckNodePort on loadBalancer service with externalTraffic=Local during update"
                ),
            ));
        }
        (None, Some(p)) => {
            if p < i64::from(*range.start()) || p > i64::from(*range.end()) {
                return Err(invalid(
                    name,
                    FIELD,
                    format!(
                        "Invalid value: {p}: provided port is not in the valid range. The range of valid ports is {}-{}",
                        range.start(),
                        range.end()
                    ),
                ));
            }
            if used.contains(&p) || taken_here.contains(&p) {
                return Err(invalid(
                    name,
                    FIELD,
                    format!("Invalid value: {p}: provided port is already allocated"),
                ));
            }
            p
        }
        (None, None) => (i64::from(*range.start())..=i64::from(*range.end()))
            .find(|p| !used.contains(p) && !taken_here.contains(p))
            .ok_or_else(|| {
                invalid(
                    name,
                    FIELD,
                    "Internal error: failed to allocate a healthCheckNodePort: range is full"
                        .into(),
                )
            })?,
    };
    spec["healthCheckNodePort"] = json!(port);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: std::ops::RangeInclusive<u16> = 30000..=30010;

    fn lb_local() -> Value {
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80, "nodePort": 30000}]})
    }

    fn hc(spec: &Value) -> Option<i64> {
        spec.get("healthCheckNodePort").and_then(Value::as_i64)
    }

    fn message(e: &ApiError) -> String {
        format!("{e:?}")
    }

    #[test]
    fn lb_with_local_policy_gets_a_free_port_from_the_range() {
        let mut spec = lb_local();
        let used: HashSet<i64> = [30001, 30002].into();
        let here: HashSet<i64> = [30000].into();
        health_check_node_port("web", &mut spec, None, &used, &here, &RANGE).expect("allocates");
        assert_eq!(
            hc(&spec),
            Some(30003),
            "skips other Services' ports and its own nodePort"
        );
    }

    #[test]
    fn cluster_policy_and_other_types_get_none() {
        for spec in [
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Cluster"}),
            json!({"type": "NodePort", "externalTrafficPolicy": "Local"}),
            json!({"type": "ClusterIP"}),
        ] {
            let mut s = spec.clone();
            health_check_node_port(
                "web",
                &mut s,
                None,
                &HashSet::new(),
                &HashSet::new(),
                &RANGE,
            )
            .expect("valid");
            assert_eq!(hc(&s), None, "{spec}");
        }
        // Asking for one where none applies is refused, and the spec is unchanged.
        let mut s = json!({"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30005});
        let before = s.clone();
        let e = health_check_node_port(
            "web",
            &mut s,
            None,
            &HashSet::new(),
            &HashSet::new(),
            &RANGE,
        )
        .expect_err("not a LoadBalancer");
        assert!(message(&e).contains("may only be set when"), "{e:?}");
        assert_eq!(s, before);
    }

    #[test]
    fn a_user_given_port_is_kept_when_free_and_refused_when_taken_or_out_of_range() {
        let mut s = lb_local();
        s["healthCheckNodePort"] = json!(30007);
        health_check_node_port(
            "web",
            &mut s,
            None,
            &HashSet::new(),
            &HashSet::new(),
            &RANGE,
        )
        .expect("free");
        assert_eq!(hc(&s), Some(30007));

        let used: HashSet<i64> = [30007].into();
        let mut taken = lb_local();
        taken["healthCheckNodePort"] = json!(30007);
        let e = health_check_node_port("web", &mut taken, None, &used, &HashSet::new(), &RANGE)
            .expect_err("taken by another Service");
        assert_eq!(e.code, 422);
        assert!(
            message(&e).contains("provided port is already allocated"),
            "{e:?}"
        );

        let mut own = lb_local();
        own["healthCheckNodePort"] = json!(30000);
        let here: HashSet<i64> = [30000].into();
        assert!(
            health_check_node_port("web", &mut own, None, &HashSet::new(), &here, &RANGE).is_err(),
            "its own nodePort cannot double as the health port"
        );

        let mut out = lb_local();
        out["healthCheckNodePort"] = json!(29999);
        let e = health_check_node_port(
            "web",
            &mut out,
            None,
            &HashSet::new(),
            &HashSet::new(),
            &RANGE,
        )
        .expect_err("out of range");
        assert!(message(&e).contains("not in the valid range"), "{e:?}");
    }

    #[test]
    fn updates_keep_the_port_refuse_a_change_and_release_it_on_type_or_policy_change() {
        let mut old = lb_local();
        old["healthCheckNodePort"] = json!(30004);
        // An update that does not mention it keeps it.
        let mut s = lb_local();
        health_check_node_port(
            "web",
            &mut s,
            Some(&old),
            &HashSet::new(),
            &HashSet::new(),
            &RANGE,
        )
        .expect("kept");
        assert_eq!(hc(&s), Some(30004));
        // A different one is refused.
        let mut s = lb_local();
        s["healthCheckNodePort"] = json!(30006);
        let e = health_check_node_port(
            "web",
            &mut s,
            Some(&old),
            &HashSet::new(),
            &HashSet::new(),
            &RANGE,
        )
        .expect_err("immutable");
        assert!(
            message(&e).contains("cannot change healthCheckNodePort"),
            "{e:?}"
        );
        // Type -> NodePort through a merge patch (the old port still in the spec): dropped.
        let mut s = old.clone();
        s["type"] = json!("NodePort");
        health_check_node_port(
            "web",
            &mut s,
            Some(&old),
            &HashSet::new(),
            &HashSet::new(),
            &RANGE,
        )
        .expect("released");
        assert_eq!(hc(&s), None);
        // Policy -> Cluster: dropped too.
        let mut s = old.clone();
        s["externalTrafficPolicy"] = json!("Cluster");
        health_check_node_port(
            "web",
            &mut s,
            Some(&old),
            &HashSet::new(),
            &HashSet::new(),
            &RANGE,
        )
        .expect("released");
        assert_eq!(hc(&s), None);
        // Back to Local later: a port again (the released one is free).
        let cluster = s.clone();
        let mut s = lb_local();
        health_check_node_port(
            "web",
            &mut s,
            Some(&cluster),
            &HashSet::new(),
            &[30000].into(),
            &RANGE,
        )
        .expect("allocated anew");
        assert_eq!(hc(&s), Some(30001));
    }
}
