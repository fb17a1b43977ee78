//! EndpointSlice and Endpoints controllers for Services with a selector (Kubernetes'
//! `pkg/controller/endpointslice` and `pkg/controller/endpoint`). Services without a selector are
//! left alone: their endpoints belong to whoever manages them.
//!
//! EndpointSlices: one set of slices per (address family, resolved port list) — pods whose named
//! target ports resolve differently land in different slices, as in Kubernetes — at most
//! [`MAX_ENDPOINTS_PER_SLICE`] endpoints each. Existing slices are updated in place: an endpoint
//! that did not change stays where it is, new endpoints fill slices that are being rewritten
//! anyway, then slices with room, and only then new slices; a one-pod change touches one slice.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, Node, ObjectReference,
    Pod, Service, ServicePort,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use skiff_api::selector::LabelSelector;

use crate::pod_util::{is_ready, is_terminating, phase};
use crate::{
    Action, Kind, Object, Outcome, ReconcileError, SuffixSource, controller_owner_ref, labels_of,
    name_of, namespace_of,
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.skiff.io";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const OVER_CAPACITY_ANNOTATION: &str = "endpoints.kubernetes.io/over-capacity";
/// Kubernetes' default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
/// Kubernetes truncates v1 Endpoints beyond this many addresses.
pub const MAX_ENDPOINTS_ADDRESSES: usize = 1000;

/// The selector of a Service that has one (a missing or empty selector means "not ours").
fn service_selector(svc: &Service) -> Result<Option<LabelSelector>, ReconcileError> {
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return Ok(None);
    };
    if selector.is_empty() {
        return Ok(None);
    }
    LabelSelector::from_match_labels(selector)
        .map(Some)
        .map_err(|e| ReconcileError::InvalidSelector {
            object: format!(
                "Service {}/{}",
                namespace_of(&svc.metadata),
                name_of(&svc.metadata)
            ),
            reason: e.to_string(),
        })
}

fn is_headless(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

fn publish_not_ready(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false)
}

/// The Service's address families as EndpointSlice `addressType`s (`IPv4`, `IPv6`).
fn address_families(svc: &Service) -> Vec<String> {
    let spec = svc.spec.as_ref();
    if let Some(families) = spec.and_then(|s| s.ip_families.as_ref())
        && !families.is_empty()
    {
        return families.clone();
    }
    match spec.and_then(|s| s.cluster_ip.as_deref()) {
        Some(ip) if ip.contains(':') => vec!["IPv6".into()],
        _ => vec!["IPv4".into()],
    }
}

fn family_of(ip: &str) -> &'static str {
    if ip.contains(':') { "IPv6" } else { "IPv4" }
}

fn pod_ip(pod: &Pod, family: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.clone())
        .chain(status.pod_ip.clone())
        .find(|ip| !ip.is_empty() && family_of(ip) == family)
}

/// Kubernetes' `ShouldPodBeInEndpoints`.
fn should_be_in_endpoints(pod: &Pod, include_terminating: bool) -> bool {
    let has_ip = pod.status.as_ref().is_some_and(|s| {
        s.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
            || s.pod_ips.as_ref().is_some_and(|v| !v.is_empty())
    });
    if !has_ip || (!include_terminating && is_terminating(pod)) {
        return false;
    }
    let restart_policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always");
    match restart_policy {
        "Never" => !matches!(phase(pod), "Failed" | "Succeeded"),
        "OnFailure" => phase(pod) != "Succeeded",
        _ => true,
    }
}

/// Kubernetes' `podutil.FindPort`: the container port a Service port's targetPort means for
/// this pod (named ports resolve per pod; protocols must match).
pub fn resolve_target_port(pod: &Pod, port: &ServicePort) -> Option<i32> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => {
            if let Ok(number) = name.parse::<i32>() {
                return Some(number);
            }
            pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports.iter().flatten().find_map(|cp| {
                    (cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.as_deref().unwrap_or("TCP") == protocol)
                        .then_some(cp.container_port)
                })
            })
        }
    }
}

fn endpoint_ports(svc: &Service, pod: &Pod) -> Vec<EndpointPort> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|sp| {
            resolve_target_port(pod, sp).map(|port| EndpointPort {
                name: Some(sp.name.clone().unwrap_or_default()),
                port: Some(port),
                protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                app_protocol: sp.app_protocol.clone(),
            })
        })
        .collect()
}

fn pod_reference(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    }
}

fn pod_hostname(svc: &Service, pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let hostname = spec.hostname.clone().filter(|h| !h.is_empty())?;
    (spec.subdomain.as_deref() == svc.metadata.name.as_deref()).then_some(hostname)
}

/// Kubernetes' `podToEndpoint`.
fn pod_to_endpoint(
    svc: &Service,
    pod: &Pod,
    ip: String,
    zones: &BTreeMap<String, String>,
) -> Endpoint {
    let publish = publish_not_ready(svc);
    let terminating = is_terminating(pod);
    let serving = publish || is_ready(pod);
    // A terminating pod is never "ready" (it must get no new connections) unless the Service
    // publishes not-ready addresses; it stays "serving" while its readiness probe passes.
    let ready = serving && (!terminating || publish);
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    Endpoint {
        addresses: vec![ip],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        hostname: pod_hostname(svc, pod),
        zone: node_name.as_ref().and_then(|n| zones.get(n).cloned()),
        node_name,
        target_ref: Some(pod_reference(pod)),
        deprecated_topology: None,
        hints: None,
    }
}

/// An EndpointPort as an ordered key: (name, port, protocol, appProtocol).
type PortKey = (String, i32, String, Option<String>);

/// Ready and not-ready addresses of one v1 Endpoints subset.
type ReadyAndNotReady = (Vec<EndpointAddress>, Vec<EndpointAddress>);

/// Which set of slices an endpoint belongs to: address type and port list.
type SliceKey = (String, Vec<PortKey>);

fn port_key(p: &EndpointPort) -> PortKey {
    (
        p.name.clone().unwrap_or_default(),
        p.port.unwrap_or(0),
        p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        p.app_protocol.clone(),
    )
}

fn port_from_key(k: &PortKey) -> EndpointPort {
    EndpointPort {
        name: Some(k.0.clone()),
        port: Some(k.1),
        protocol: Some(k.2.clone()),
        app_protocol: k.3.clone(),
    }
}

fn slice_key(slice: &EndpointSlice) -> SliceKey {
    (
        slice.address_type.clone(),
        slice.ports.iter().flatten().map(port_key).collect(),
    )
}

fn endpoint_id(ep: &Endpoint) -> String {
    ep.addresses.first().cloned().unwrap_or_default()
}

fn slice_labels(svc: &Service) -> BTreeMap<String, String> {
    let mut labels = labels_of(&svc.metadata);
    // Labels the controller owns win over the Service's own.
    labels.retain(|k, _| k != SERVICE_NAME_LABEL && k != MANAGED_BY_LABEL && k != HEADLESS_LABEL);
    labels.insert(SERVICE_NAME_LABEL.into(), name_of(&svc.metadata));
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    if is_headless(svc) {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    }
    labels
}

/// Whether a slice is one this controller manages for this Service: our labels, and owned by
/// this very Service (a slice left by a deleted namesake is the garbage collector's, not ours to
/// rewrite).
pub fn is_managed_slice(svc: &Service, slice: &EndpointSlice) -> bool {
    let labels = slice.metadata.labels.as_ref();
    let owned = match svc.metadata.uid.as_deref() {
        Some(uid) => slice
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.uid == uid),
        None => true,
    };
    owned
        && namespace_of(&slice.metadata) == namespace_of(&svc.metadata)
        && labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) == svc.metadata.name.as_ref()
        && labels
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .map(String::as_str)
            == Some(MANAGED_BY)
}

/// Whether the Service (with a selector) selects this pod: the shell maps pod events to the
/// Services to reconcile with it.
pub fn selects(svc: &Service, pod: &Pod) -> bool {
    namespace_of(&svc.metadata) == namespace_of(&pod.metadata)
        && matches!(service_selector(svc), Ok(Some(sel)) if sel.matches(&labels_of(&pod.metadata)))
}

/// The endpoints the Service should have, grouped by slice key.
fn desired_endpoints(
    svc: &Service,
    selector: &LabelSelector,
    pods: &[Pod],
    nodes: &[Node],
) -> BTreeMap<SliceKey, Vec<Endpoint>> {
    let zones: BTreeMap<String, String> = nodes
        .iter()
        .filter_map(|n| {
            let zone = n.metadata.labels.as_ref()?.get(ZONE_LABEL)?;
            Some((name_of(&n.metadata), zone.clone()))
        })
        .collect();
    let namespace = namespace_of(&svc.metadata);
    let mut pods: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            namespace_of(&p.metadata) == namespace
                && selector.matches(&labels_of(&p.metadata))
                && should_be_in_endpoints(p, true)
        })
        .collect();
    pods.sort_by_key(|p| name_of(&p.metadata));
    let mut desired: BTreeMap<SliceKey, Vec<Endpoint>> = BTreeMap::new();
    for family in address_families(svc) {
        for pod in &pods {
            let Some(ip) = pod_ip(pod, &family) else {
                continue;
            };
            let key = (
                family.clone(),
                endpoint_ports(svc, pod).iter().map(port_key).collect(),
            );
            desired
                .entry(key)
                .or_default()
                .push(pod_to_endpoint(svc, pod, ip, &zones));
        }
    }
    desired
}

struct WorkingSlice {
    /// Index into `existing`, or None for a slice this reconcile creates.
    existing: Option<usize>,
    slice: EndpointSlice,
    changed: bool,
}

/// Reconciles the EndpointSlices of one Service. `existing` may hold any slices (those not
/// managed by this controller for this Service are ignored); `nodes` give endpoint zones;
/// `names` supplies the random suffixes of new slice names (`<service>-<5 chars>`).
pub fn reconcile(
    svc: &Service,
    pods: &[Pod],
    nodes: &[Node],
    existing: &[EndpointSlice],
    names: &mut dyn SuffixSource,
) -> Result<Outcome, ReconcileError> {
    let Some(selector) = service_selector(svc)? else {
        return Ok(Outcome::default());
    };
    if svc.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the slices with the Service (they are owned by it).
        return Ok(Outcome::default());
    }
    let svc_name = name_of(&svc.metadata);
    let namespace = namespace_of(&svc.metadata);
    let labels = slice_labels(svc);
    let owner = controller_owner_ref(Kind::Service, &svc.metadata);
    let desired = desired_endpoints(svc, &selector, pods, nodes);

    let managed: Vec<usize> = (0..existing.len())
        .filter(|i| is_managed_slice(svc, &existing[*i]))
        .collect();
    let mut taken: BTreeSet<String> = existing.iter().map(|s| name_of(&s.metadata)).collect();
    let mut new_slice = |key: &SliceKey, names: &mut dyn SuffixSource| {
        let name = loop {
            let candidate = format!("{svc_name}-{}", names.suffix());
            if taken.insert(candidate.clone()) {
                break candidate;
            }
        };
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name),
                generate_name: Some(format!("{svc_name}-")),
                namespace: Some(namespace.clone()),
                labels: Some(labels.clone()),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            address_type: key.0.clone(),
            endpoints: Vec::new(),
            ports: Some(key.1.iter().map(port_from_key).collect()),
        }
    };

    let mut working: Vec<WorkingSlice> = Vec::new();
    let mut keep: BTreeSet<usize> = BTreeSet::new();

    if desired.values().all(Vec::is_empty) {
        // No endpoints at all: Kubernetes keeps exactly one empty placeholder slice so that
        // clients see the Service has been processed.
        let family = address_families(svc)
            .into_iter()
            .next()
            .unwrap_or_else(|| "IPv4".into());
        let placeholder = managed.iter().copied().find(|i| {
            existing[*i].endpoints.is_empty()
                && existing[*i].address_type == family
                && existing[*i].ports.as_ref().is_none_or(Vec::is_empty)
        });
        match placeholder {
            Some(i) => {
                keep.insert(i);
                working.push(WorkingSlice {
                    existing: Some(i),
                    slice: existing[i].clone(),
                    changed: false,
                });
            }
            None => {
                let mut slice = new_slice(&(family, Vec::new()), names);
                slice.ports = None;
                working.push(WorkingSlice {
                    existing: None,
                    slice,
                    changed: true,
                });
            }
        }
    }

    for (key, endpoints) in &desired {
        if endpoints.is_empty() {
            continue;
        }
        let mut remaining: BTreeMap<String, &Endpoint> =
            endpoints.iter().map(|e| (endpoint_id(e), e)).collect();
        let first_of_key = working.len();
        // 1. Existing slices of this key: keep unchanged endpoints, replace changed ones, drop
        //    gone ones.
        for &i in managed.iter().filter(|i| slice_key(&existing[**i]) == *key) {
            let old = &existing[i];
            let mut slice = old.clone();
            slice.endpoints = old
                .endpoints
                .iter()
                .filter_map(|ep| remaining.remove(&endpoint_id(ep)).cloned())
                .collect();
            let changed = slice.endpoints != old.endpoints;
            keep.insert(i);
            working.push(WorkingSlice {
                existing: Some(i),
                slice,
                changed,
            });
        }
        // 2. New endpoints: into slices being rewritten anyway, then slices with room, then
        //    new slices.
        let mut to_place: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| remaining.contains_key(&endpoint_id(e)))
            .collect();
        for pass_changed in [true, false] {
            for ws in working[first_of_key..].iter_mut() {
                if ws.changed != pass_changed {
                    continue;
                }
                while ws.slice.endpoints.len() < MAX_ENDPOINTS_PER_SLICE && !to_place.is_empty() {
                    ws.slice.endpoints.push(to_place.remove(0).clone());
                    ws.changed = true;
                }
            }
        }
        for chunk in to_place.chunks(MAX_ENDPOINTS_PER_SLICE) {
            let mut slice = new_slice(key, names);
            slice.endpoints = chunk.iter().map(|e| (*e).clone()).collect();
            working.push(WorkingSlice {
                existing: None,
                slice,
                changed: true,
            });
        }
    }

    let mut outcome = Outcome::default();
    let mut updates = Vec::new();
    let mut deletes = Vec::new();
    for ws in working {
        match ws.existing {
            None => outcome
                .actions
                .push(Action::Create(Object::EndpointSlice(Box::new(ws.slice)))),
            Some(i) if ws.slice.endpoints.is_empty() && !desired.values().all(Vec::is_empty) => {
                // Emptied by this change: delete rather than keep an empty slice around.
                keep.remove(&i);
            }
            Some(_) => {
                let mut slice = ws.slice;
                let labels_changed = slice.metadata.labels.as_ref() != Some(&labels);
                if labels_changed {
                    slice.metadata.labels = Some(labels.clone());
                }
                if ws.changed || labels_changed {
                    updates.push(Action::Update(Object::EndpointSlice(Box::new(slice))));
                }
            }
        }
    }
    for &i in &managed {
        if !keep.contains(&i) {
            deletes.push(Action::Delete {
                kind: Kind::EndpointSlice,
                namespace: namespace.clone(),
                name: name_of(&existing[i].metadata),
                uid: existing[i].metadata.uid.clone(),
            });
        }
    }
    // Creates and updates before deletes, so an endpoint moving between slices is never
    // missing from all of them.
    outcome.actions.extend(updates);
    outcome.actions.extend(deletes);
    Ok(outcome)
}

/// The v1 Endpoints of one Service (Kubernetes' endpoints controller): ready pods in
/// `addresses`, not-ready ones in `notReadyAddresses`, terminating pods left out unless the
/// Service publishes not-ready addresses, subsets grouped by resolved port list. `existing` is
/// the Endpoints object of the same name, if any.
pub fn endpoints(
    svc: &Service,
    pods: &[Pod],
    existing: Option<&Endpoints>,
) -> Result<Outcome, ReconcileError> {
    let Some(selector) = service_selector(svc)? else {
        return Ok(Outcome::default());
    };
    if svc.metadata.deletion_timestamp.is_some() {
        return Ok(Outcome::default());
    }
    let namespace = namespace_of(&svc.metadata);
    let publish = publish_not_ready(svc);
    let family = address_families(svc)
        .into_iter()
        .next()
        .unwrap_or_else(|| "IPv4".into());
    let mut pods: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            namespace_of(&p.metadata) == namespace
                && selector.matches(&labels_of(&p.metadata))
                && should_be_in_endpoints(p, publish)
        })
        .collect();
    pods.sort_by_key(|p| name_of(&p.metadata));

    // Port list -> (ready, not ready) addresses, like RepackSubsets.
    let mut subsets: BTreeMap<Vec<PortKey>, ReadyAndNotReady> = BTreeMap::new();
    let has_ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|p| !p.is_empty());
    let mut total = 0;
    let mut truncated = false;
    for pod in pods {
        let Some(ip) = pod_ip(pod, &family) else {
            continue;
        };
        let ports: Vec<PortKey> = endpoint_ports(svc, pod).iter().map(port_key).collect();
        if has_ports && ports.is_empty() {
            // No Service port resolves for this pod: it cannot receive traffic.
            continue;
        }
        if total >= MAX_ENDPOINTS_ADDRESSES {
            truncated = true;
            break;
        }
        total += 1;
        let address = EndpointAddress {
            ip,
            hostname: pod_hostname(svc, pod),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(pod_reference(pod)),
        };
        let entry = subsets.entry(ports).or_default();
        if publish || is_ready(pod) {
            entry.0.push(address);
        } else {
            entry.1.push(address);
        }
    }
    let by_ip = |a: &EndpointAddress, b: &EndpointAddress| a.ip.cmp(&b.ip);
    let subsets: Vec<EndpointSubset> = subsets
        .into_iter()
        .map(|(ports, (mut ready, mut not_ready))| {
            ready.sort_by(by_ip);
            not_ready.sort_by(by_ip);
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: (!ports.is_empty()).then(|| {
                    ports
                        .into_iter()
                        .map(|(name, port, protocol, app_protocol)| CorePort {
                            app_protocol,
                            name: (!name.is_empty()).then_some(name),
                            port,
                            protocol: Some(protocol),
                        })
                        .collect()
                }),
            }
        })
        .collect();

    let mut labels = labels_of(&svc.metadata);
    if is_headless(svc) {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    } else {
        labels.remove(HEADLESS_LABEL);
    }
    let desired_subsets = (!subsets.is_empty()).then_some(subsets);
    let mut outcome = Outcome::default();
    match existing {
        Some(current) => {
            let mut updated = current.clone();
            updated.subsets = desired_subsets;
            updated.metadata.labels = (!labels.is_empty()).then_some(labels);
            let annotations = updated
                .metadata
                .annotations
                .get_or_insert_with(BTreeMap::new);
            if truncated {
                annotations.insert(OVER_CAPACITY_ANNOTATION.into(), "truncated".into());
            } else {
                annotations.remove(OVER_CAPACITY_ANNOTATION);
            }
            if annotations.is_empty() {
                updated.metadata.annotations = None;
            }
            let normalize = |e: &Endpoints| {
                let mut e = e.clone();
                if e.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(BTreeMap::is_empty)
                {
                    e.metadata.annotations = None;
                }
                if e.metadata.labels.as_ref().is_some_and(BTreeMap::is_empty) {
                    e.metadata.labels = None;
                }
                e
            };
            if normalize(&updated) != normalize(current) {
                outcome
                    .actions
                    .push(Action::Update(Object::Endpoints(Box::new(updated))));
            }
        }
        None => {
            let endpoints = Endpoints {
                metadata: ObjectMeta {
                    name: svc.metadata.name.clone(),
                    namespace: Some(namespace),
                    labels: (!labels.is_empty()).then_some(labels),
                    annotations: truncated.then(|| {
                        BTreeMap::from([(
                            OVER_CAPACITY_ANNOTATION.to_string(),
                            "truncated".to_string(),
                        )])
                    }),
                    ..Default::default()
                },
                subsets: desired_subsets,
            };
            outcome
                .actions
                .push(Action::Create(Object::Endpoints(Box::new(endpoints))));
        }
    }
    Ok(outcome)
}

#[cfg(test)]
#[path = "endpointslice_tests.rs"]
mod tests;
