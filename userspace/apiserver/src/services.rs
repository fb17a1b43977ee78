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

use serde_json::{Value, json};

use crate::State;
use crate::objects::{decode_kv, name_of, prefix, store_error};
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

fn same_object(a: &Value, b: &Value) -> bool {
    name_of(a) == name_of(b) && a.pointer("/metadata/namespace") == b.pointer("/metadata/namespace")
}

/// Fills `spec.clusterIP(s)` and node ports of `new` (a Service), checking requested values
/// against what other Services hold. `old` is the stored Service on update.
pub async fn allocate(state: &State, new: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    let info = registry::find("", "v1", "services")
        .ok_or_else(|| ApiError::internal("services are not registered"))?;
    let listed = state
        .store
        .list(&prefix(info, None))
        .await
        .map_err(store_error)?;
    let mut used_ips = HashSet::new();
    let mut used_ports = HashSet::new();
    for kv in &listed.items {
        let svc = decode_kv(kv)?;
        if same_object(&svc, new) {
            continue;
        }
        if let Some(ip) = svc
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
        {
            used_ips.insert(ip);
        }
        for p in svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(np) = p.get("nodePort").and_then(Value::as_i64) {
                used_ports.insert(np);
            }
        }
    }
    let name = name_of(new).to_string();
    let ty = new
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if new.get("spec").is_none_or(|s| !s.is_object()) {
        new["spec"] = json!({});
    }
    let spec = &mut new["spec"];
    let requested = spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let old_ip = old
        .and_then(|o| o.pointer("/spec/clusterIP"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();

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
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        let mut taken_here = HashSet::new();
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
    Ok(())
}
