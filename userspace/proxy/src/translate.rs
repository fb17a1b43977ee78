//! The pure core: one Service plus its EndpointSlices, seen from one node, translated into the
//! datapath's frontends (VIP x port x protocol, each a [`ServiceSpec`] with its backends).
//! No I/O, no clock: everything here is a function of its arguments.
//!
//! The rules are kube-proxy's, narrowed to what skiff's datapath models:
//! - headless (clusterIP None), ExternalName and not-yet-allocated (no clusterIP) Services get no
//!   frontends at all;
//! - every IPv4 clusterIP (`clusterIPs`, else `clusterIP`) x port is a ClusterIP frontend;
//! - NodePort/LoadBalancer ports with a nodePort get one frontend per node address;
//!   `externalIPs` and `status.loadBalancer.ingress[].ip` (unless ipMode is Proxy) get one per
//!   port: these "external" frontends also get a Maglev table for the XDP uplink program;
//! - backends of a port come from the slices' port with the same name and protocol (that is how
//!   kube-proxy resolves a named or numbered targetPort: the slice carries the resolved number);
//! - ready endpoints are active; terminating ones that still serve are kept as terminating (their
//!   flows live on, they get no new ones); the rest are dropped;
//! - internalTrafficPolicy=Local narrows ClusterIP frontends to this node's endpoints,
//!   externalTrafficPolicy=Local narrows the external ones (and keeps the client's address);
//! - sessionAffinity ClientIP applies to every frontend with its timeout (default 10800 s);
//! - TCP and UDP only: SCTP ports are skipped, and so is everything IPv6 (the datapath is IPv4).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use skiff_datapath::{BackendSpec, Proto, ServiceSpec};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// kube-proxy's (and the API's) default ClientIP affinity timeout.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API's upper bound for sessionAffinityConfig.clientIP.timeoutSeconds.
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// Where a frontend comes from. Every kind is the same SERVICES entry in the datapath; the
/// external kinds additionally get a Maglev table (written by `upsert_nodeport`) so the XDP
/// program on the node's uplink balances traffic arriving from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    /// NodePort, externalIPs and LoadBalancer ingress: reached from outside the cluster.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// The identity of a frontend in the datapath maps (the SERVICES key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{}:{}/{proto}", self.vip, self.port)
    }
}

/// One frontend to program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub spec: ServiceSpec,
}

impl Frontend {
    pub fn key(&self) -> FrontendKey {
        FrontendKey {
            vip: self.spec.vip,
            port: self.spec.port,
            proto: self.spec.proto,
        }
    }
}

/// Something of a Service the translation left out, and why (for logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    Headless,
    ExternalName,
    NoClusterIp,
    UnsupportedProtocol { port: String, protocol: String },
    InvalidPort { port: String, value: i64 },
    Ipv6 { what: &'static str, addr: String },
    BadAddress { what: &'static str, addr: String },
    HostnameIngress { hostname: String },
    ProxyModeIngress { ip: String },
    SliceAddressType { slice: String, address_type: String },
    DuplicateFrontend { key: FrontendKey },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Headless => write!(f, "headless service (clusterIP None): not proxied"),
            Skip::ExternalName => write!(f, "ExternalName service: not proxied"),
            Skip::NoClusterIp => write!(f, "no clusterIP allocated yet: not proxied"),
            Skip::UnsupportedProtocol { port, protocol } => {
                write!(
                    f,
                    "port {port}: protocol {protocol} is not supported (TCP/UDP only)"
                )
            }
            Skip::InvalidPort { port, value } => write!(f, "port {port}: {value} is not a port"),
            Skip::Ipv6 { what, addr } => {
                write!(
                    f,
                    "{what} {addr} is IPv6, which the datapath does not program yet"
                )
            }
            Skip::BadAddress { what, addr } => write!(f, "{what} {addr:?} is not an IP address"),
            Skip::HostnameIngress { hostname } => {
                write!(
                    f,
                    "load balancer ingress {hostname} has no IP: not programmed"
                )
            }
            Skip::ProxyModeIngress { ip } => write!(
                f,
                "load balancer ingress {ip} has ipMode Proxy: the load balancer delivers to nodes"
            ),
            Skip::SliceAddressType {
                slice,
                address_type,
            } => write!(
                f,
                "EndpointSlice {slice}: addressType {address_type} not supported"
            ),
            Skip::DuplicateFrontend { key } => {
                write!(
                    f,
                    "frontend {key} is listed twice in this service: kept the first"
                )
            }
        }
    }
}

/// What one Service translates to on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub frontends: Vec<Frontend>,
    pub skipped: Vec<Skip>,
}

/// The node the proxy runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Compared with endpoints' nodeName for the Local traffic policies.
    pub node_name: String,
    /// The addresses NodePort frontends listen on (the node's InternalIP(s)).
    pub node_ips: Vec<IpAddr>,
}

/// An endpoint's state as the datapath models it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum EpState {
    Active,
    Terminating,
}

/// Ready -> active; terminating and still serving -> terminating; anything else -> dropped.
/// Unknown conditions read as the API says consumers should: ready unset = ready, serving unset
/// = ready's value, terminating unset = not terminating.
fn endpoint_state(ep: &Endpoint) -> Option<EpState> {
    let c = ep.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    if terminating {
        serving.then_some(EpState::Terminating)
    } else {
        ready.then_some(EpState::Active)
    }
}

/// Ready and not terminating: an endpoint that gets new flows (and counts for health checks).
pub(crate) fn is_ready_endpoint(ep: &Endpoint) -> bool {
    endpoint_state(ep) == Some(EpState::Active)
}

fn protocol_of(p: Option<&str>) -> Result<Proto, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Proto::Tcp),
        "UDP" => Ok(Proto::Udp),
        other => Err(other.to_string()),
    }
}

fn port_number(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|p| *p != 0)
}

/// Parses an address the datapath can program: IPv4 only. IPv6 and garbage become skip notes.
fn v4(addr: &str, what: &'static str, skipped: &mut Vec<Skip>) -> Option<IpAddr> {
    match addr.trim().parse::<IpAddr>() {
        Ok(ip @ IpAddr::V4(_)) => Some(ip),
        Ok(IpAddr::V6(_)) => {
            skipped.push(Skip::Ipv6 {
                what,
                addr: addr.to_string(),
            });
            None
        }
        Err(_) => {
            skipped.push(Skip::BadAddress {
                what,
                addr: addr.to_string(),
            });
            None
        }
    }
}

/// One candidate backend of a service port, with where it runs.
#[derive(Clone, Debug)]
struct Candidate {
    ip: Ipv4Addr,
    port: u16,
    state: EpState,
    local: bool,
}

/// The backends of one service port across all slices: the slice port with the port's name and
/// protocol gives the number; an address listed twice (two slices during a migration) keeps its
/// best state.
fn candidates(
    port_name: &str,
    proto: Proto,
    slices: &[&EndpointSlice],
    node_name: &str,
) -> Vec<Candidate> {
    let mut best: BTreeMap<(Ipv4Addr, u16), Candidate> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(number) = slice.ports.iter().flatten().find_map(|p| {
            let same_name = p.name.as_deref().unwrap_or("") == port_name;
            let same_proto = protocol_of(p.protocol.as_deref()).ok() == Some(proto);
            if same_name && same_proto {
                p.port.and_then(port_number)
            } else {
                None
            }
        }) else {
            continue;
        };
        for ep in &slice.endpoints {
            let Some(state) = endpoint_state(ep) else {
                continue;
            };
            // kube-proxy uses the first address: the others are the same pod (API docs).
            let Some(ip) = ep
                .addresses
                .first()
                .and_then(|a| a.trim().parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let local = ep.node_name.as_deref() == Some(node_name);
            let c = Candidate {
                ip,
                port: number,
                state,
                local,
            };
            match best.get(&(ip, number)) {
                Some(old) if old.state <= state => {}
                _ => {
                    best.insert((ip, number), c);
                }
            }
        }
    }
    best.into_values().collect()
}

fn backends(cands: &[Candidate], local_only: bool) -> Vec<BackendSpec> {
    cands
        .iter()
        .filter(|c| !local_only || c.local)
        .map(|c| BackendSpec {
            ip: IpAddr::V4(c.ip),
            port: c.port,
            ready: c.state == EpState::Active,
            terminating: c.state == EpState::Terminating,
        })
        .collect()
}

fn affinity_timeout(service: &Service) -> Option<u32> {
    let spec = service.spec.as_ref()?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let t = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    Some(match t {
        // The API rejects anything outside 1..=86400; an object that slipped past gets the default.
        Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => t as u32,
        _ => DEFAULT_AFFINITY_TIMEOUT_S,
    })
}

fn port_label(p: &ServicePort) -> String {
    match p.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => p.port.to_string(),
    }
}

/// The slices of `service` among `slices` (by the service-name label, in the same namespace).
pub fn slices_of<'a>(service: &Service, slices: &'a [EndpointSlice]) -> Vec<&'a EndpointSlice> {
    let ns = service.metadata.namespace.as_deref();
    let name = service.metadata.name.as_deref();
    slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == ns
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == name
        })
        .collect()
}

/// Translates one Service and its EndpointSlices into this node's frontends.
pub fn translate(service: &Service, slices: &[&EndpointSlice], node: &NodeView) -> Translation {
    let mut out = Translation::default();
    let Some(spec) = service.spec.as_ref() else {
        out.skipped.push(Skip::NoClusterIp);
        return out;
    };
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if type_ == "ExternalName" {
        out.skipped.push(Skip::ExternalName);
        return out;
    }
    let mut cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    cluster_ips.retain(|ip| !ip.is_empty());
    if cluster_ips.contains(&"None") {
        out.skipped.push(Skip::Headless);
        return out;
    }
    if cluster_ips.is_empty() {
        out.skipped.push(Skip::NoClusterIp);
        return out;
    }
    for slice in slices {
        if slice.address_type != "IPv4" {
            out.skipped.push(Skip::SliceAddressType {
                slice: slice.metadata.name.clone().unwrap_or_default(),
                address_type: slice.address_type.clone(),
            });
        }
    }

    let skipped = &mut out.skipped;
    let vips: Vec<IpAddr> = cluster_ips
        .iter()
        .filter_map(|ip| v4(ip, "clusterIP", skipped))
        .collect();
    let node_ports_open = matches!(type_, "NodePort" | "LoadBalancer");
    let node_ips: Vec<IpAddr> = node
        .node_ips
        .iter()
        .copied()
        .filter(|ip| match ip {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => {
                skipped.push(Skip::Ipv6 {
                    what: "node address",
                    addr: v6.to_string(),
                });
                false
            }
        })
        .collect();
    let external_ips: Vec<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|ip| v4(ip, "externalIP", skipped))
        .collect();
    let mut lb_ips: Vec<IpAddr> = Vec::new();
    if type_ == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for ing in ingress.into_iter().flatten() {
            match ing.ip.as_deref().filter(|ip| !ip.is_empty()) {
                None => skipped.push(Skip::HostnameIngress {
                    hostname: ing.hostname.clone().unwrap_or_default(),
                }),
                Some(ip) if ing.ip_mode.as_deref() == Some("Proxy") => {
                    skipped.push(Skip::ProxyModeIngress { ip: ip.to_string() })
                }
                Some(ip) => lb_ips.extend(v4(ip, "load balancer ingress", skipped)),
            }
        }
    }
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity = affinity_timeout(service);

    let mut seen: BTreeMap<FrontendKey, ()> = BTreeMap::new();
    let mut push = |out: &mut Translation, kind: FrontendKind, spec: ServiceSpec| {
        let f = Frontend { kind, spec };
        let key = f.key();
        if seen.insert(key, ()).is_some() {
            out.skipped.push(Skip::DuplicateFrontend { key });
        } else {
            out.frontends.push(f);
        }
    };

    for p in spec.ports.iter().flatten() {
        let proto = match protocol_of(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(protocol) => {
                out.skipped.push(Skip::UnsupportedProtocol {
                    port: port_label(p),
                    protocol,
                });
                continue;
            }
        };
        let Some(port) = port_number(p.port) else {
            out.skipped.push(Skip::InvalidPort {
                port: port_label(p),
                value: p.port as i64,
            });
            continue;
        };
        let cands = candidates(
            p.name.as_deref().unwrap_or(""),
            proto,
            slices,
            &node.node_name,
        );
        let internal = backends(&cands, itp_local);
        let external = backends(&cands, etp_local);
        let make = |vip: IpAddr, port: u16, external_view: bool| ServiceSpec {
            vip,
            port,
            proto,
            backends: if external_view {
                external.clone()
            } else {
                internal.clone()
            },
            affinity_timeout: affinity,
            external_traffic_local: external_view && etp_local,
        };
        for vip in &vips {
            push(&mut out, FrontendKind::ClusterIp, make(*vip, port, false));
        }
        if node_ports_open && let Some(np) = p.node_port {
            match port_number(np) {
                Some(np) => {
                    for ip in &node_ips {
                        push(&mut out, FrontendKind::NodePort, make(*ip, np, true));
                    }
                }
                None => out.skipped.push(Skip::InvalidPort {
                    port: format!("{} (nodePort)", port_label(p)),
                    value: np as i64,
                }),
            }
        }
        for ip in &external_ips {
            push(&mut out, FrontendKind::ExternalIp, make(*ip, port, true));
        }
        for ip in &lb_ips {
            push(&mut out, FrontendKind::LoadBalancer, make(*ip, port, true));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> NodeView {
        NodeView {
            node_name: "node-a".into(),
            node_ips: vec!["192.168.1.10".parse().expect("literal")],
        }
    }

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": spec,
        }))
        .expect("service json")
    }

    fn slice(name: &str, ports: serde_json::Value, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .expect("slice json")
    }

    fn ep(
        ip: &str,
        node: &str,
        ready: bool,
        serving: bool,
        terminating: bool,
    ) -> serde_json::Value {
        json!({"addresses": [ip], "nodeName": node,
               "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }

    /// (ip, port, active) of a spec's backends.
    fn bk(spec: &ServiceSpec) -> Vec<(String, u16, bool)> {
        spec.backends
            .iter()
            .map(|b| (b.ip.to_string(), b.port, b.ready && !b.terminating))
            .collect()
    }

    fn find<'a>(
        t: &'a Translation,
        kind: FrontendKind,
        vip: &str,
        port: u16,
        proto: Proto,
    ) -> &'a Frontend {
        t.frontends
            .iter()
            .find(|f| {
                f.kind == kind
                    && f.spec.vip == ip(vip)
                    && f.spec.port == port
                    && f.spec.proto == proto
            })
            .unwrap_or_else(|| panic!("no {kind:?} {vip}:{port} in {:#?}", t.frontends))
    }

    fn web_slice() -> EndpointSlice {
        slice(
            "web-1",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                   {"name": "dns", "port": 5353, "protocol": "UDP"}]),
            json!([
                ep("10.244.1.10", "node-a", true, true, false),
                ep("10.244.2.10", "node-b", true, true, false)
            ]),
        )
    }

    #[test]
    fn every_cluster_ip_times_every_port_with_named_target_ports() {
        let svc = service(json!({
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "10.96.0.11"],
            "ports": [{"name": "http", "port": 80, "targetPort": "web"},
                      {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}],
        }));
        let s = web_slice();
        let t = translate(&svc, &[&s], &node());
        assert_eq!(t.frontends.len(), 4, "{t:#?}");
        for vip in ["10.96.0.10", "10.96.0.11"] {
            let http = find(&t, FrontendKind::ClusterIp, vip, 80, Proto::Tcp);
            assert_eq!(
                bk(&http.spec),
                [
                    ("10.244.1.10".into(), 8080, true),
                    ("10.244.2.10".into(), 8080, true)
                ]
            );
            let dns = find(&t, FrontendKind::ClusterIp, vip, 53, Proto::Udp);
            assert_eq!(dns.spec.backends[0].port, 5353);
            assert_eq!(dns.spec.affinity_timeout, None);
        }
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    }

    #[test]
    fn ports_match_by_name_and_protocol_not_by_number() {
        let svc = service(json!({
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "port": 80}, {"name": "metrics", "port": 9090}],
        }));
        // A slice port named "dns" (UDP) must not feed a TCP port; "metrics" has no slice port.
        let s = slice(
            "web-1",
            json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100, "protocol": "UDP"}]),
            json!([ep("10.244.1.10", "node-a", true, true, false)]),
        );
        let t = translate(&svc, &[&s], &node());
        assert_eq!(
            find(&t, FrontendKind::ClusterIp, "10.96.0.10", 80, Proto::Tcp)
                .spec
                .backends
                .len(),
            1
        );
        // The frontend exists (connects get refused, as kube-proxy rejects), with no backends.
        assert!(
            find(&t, FrontendKind::ClusterIp, "10.96.0.10", 9090, Proto::Tcp)
                .spec
                .backends
                .is_empty()
        );
    }

    #[test]
    fn unnamed_single_port_matches_an_unnamed_slice_port() {
        let svc = service(json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}));
        let s = slice(
            "web-1",
            json!([{"port": 8080}]),
            json!([ep("10.244.1.10", "node-a", true, true, false)]),
        );
        let t = translate(&svc, &[&s], &node());
        assert_eq!(
            bk(&find(&t, FrontendKind::ClusterIp, "10.96.0.10", 80, Proto::Tcp).spec),
            [("10.244.1.10".into(), 8080, true)]
        );
    }

    #[test]
    fn endpoint_conditions_ready_terminating_and_dropped() {
        let svc =
            service(json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}));
        let s = slice(
            "web-1",
            json!([{"name": "http", "port": 8080}]),
            json!([
                ep("10.244.1.10", "node-a", true, true, false),   // ready: active
                ep("10.244.1.11", "node-a", false, true, true),   // terminating, serving: kept
                ep("10.244.1.12", "node-a", false, false, true),  // terminating, not serving: dropped
                ep("10.244.1.13", "node-a", false, false, false), // not ready: dropped
                {"addresses": ["10.244.1.14"]},                   // no conditions: ready
                {"addresses": ["not-an-ip"]},                     // garbage: dropped
                {"addresses": []},                                // nothing: dropped
            ]),
        );
        let t = translate(&svc, &[&s], &node());
        let f = find(&t, FrontendKind::ClusterIp, "10.96.0.10", 80, Proto::Tcp);
        assert_eq!(
            bk(&f.spec),
            [
                ("10.244.1.10".into(), 8080, true),
                ("10.244.1.11".into(), 8080, false),
                ("10.244.1.14".into(), 8080, true),
            ]
        );
        let term = &f.spec.backends[1];
        assert!(term.terminating && !term.ready);
    }

    #[test]
    fn an_address_in_two_slices_keeps_its_best_state() {
        let svc =
            service(json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}));
        let a = slice(
            "web-a",
            json!([{"name": "http", "port": 8080}]),
            json!([ep("10.244.1.10", "node-a", false, true, true)]),
        );
        let b = slice(
            "web-b",
            json!([{"name": "http", "port": 8080}]),
            json!([ep("10.244.1.10", "node-a", true, true, false)]),
        );
        for order in [[&a, &b], [&b, &a]] {
            let t = translate(&svc, &order, &node());
            assert_eq!(
                bk(&find(&t, FrontendKind::ClusterIp, "10.96.0.10", 80, Proto::Tcp).spec),
                [("10.244.1.10".into(), 8080, true)]
            );
        }
    }

    #[test]
    fn session_affinity_client_ip_with_default_and_explicit_timeout() {
        let s = web_slice();
        let svc = service(
            json!({"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                                 "ports": [{"name": "http", "port": 80}]}),
        );
        let t = translate(&svc, &[&s], &node());
        assert_eq!(t.frontends[0].spec.affinity_timeout, Some(10_800));
        let svc = service(
            json!({"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                                 "ports": [{"name": "http", "port": 80}]}),
        );
        let t = translate(&svc, &[&s], &node());
        assert_eq!(t.frontends[0].spec.affinity_timeout, Some(60));
        let svc = service(json!({"clusterIP": "10.96.0.10", "sessionAffinity": "None",
                                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                                 "ports": [{"name": "http", "port": 80}]}));
        let t = translate(&svc, &[&s], &node());
        assert_eq!(t.frontends[0].spec.affinity_timeout, None);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_only_this_nodes_endpoints() {
        let s = web_slice();
        let svc = service(
            json!({"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
                                 "ports": [{"name": "http", "port": 80}]}),
        );
        let t = translate(&svc, &[&s], &node());
        let f = find(&t, FrontendKind::ClusterIp, "10.96.0.10", 80, Proto::Tcp);
        assert_eq!(bk(&f.spec), [("10.244.1.10".into(), 8080, true)]);
        assert!(!f.spec.external_traffic_local);
    }

    #[test]
    fn nodeport_on_every_node_address_and_external_traffic_policy_local() {
        let s = web_slice();
        let mut n = node();
        n.node_ips.push(ip("192.168.2.10"));
        let svc = service(json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                                 "externalTrafficPolicy": "Local",
                                 "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        let t = translate(&svc, &[&s], &n);
        // ClusterIP keeps every endpoint (eTP does not apply to it).
        let c = find(&t, FrontendKind::ClusterIp, "10.96.0.10", 80, Proto::Tcp);
        assert_eq!(c.spec.backends.len(), 2);
        assert!(!c.spec.external_traffic_local);
        for node_ip in ["192.168.1.10", "192.168.2.10"] {
            let np = find(&t, FrontendKind::NodePort, node_ip, 30080, Proto::Tcp);
            assert_eq!(bk(&np.spec), [("10.244.1.10".into(), 8080, true)]);
            assert!(
                np.spec.external_traffic_local,
                "eTP=Local keeps the client address"
            );
        }
        // Cluster policy: all endpoints, SNAT.
        let svc = service(json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                                 "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        let t = translate(&svc, &[&s], &n);
        let np = find(
            &t,
            FrontendKind::NodePort,
            "192.168.1.10",
            30080,
            Proto::Tcp,
        );
        assert_eq!(np.spec.backends.len(), 2);
        assert!(!np.spec.external_traffic_local);
        // A ClusterIP Service never opens its (stale) nodePort.
        let svc = service(json!({"type": "ClusterIP", "clusterIP": "10.96.0.10",
                                 "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        let t = translate(&svc, &[&s], &n);
        assert!(
            t.frontends
                .iter()
                .all(|f| f.kind == FrontendKind::ClusterIp)
        );
    }

    #[test]
    fn load_balancer_ingress_and_external_ips_are_external_frontends() {
        let s = web_slice();
        let mut svc = service(json!({"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                                     "externalIPs": ["203.0.113.7", "2001:db8::7"],
                                     "externalTrafficPolicy": "Local",
                                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}));
        svc.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [
            {"ip": "198.51.100.1"},
            {"ip": "198.51.100.2", "ipMode": "Proxy"},
            {"hostname": "lb.example"},
        ]}}))
        .expect("status json");
        let t = translate(&svc, &[&s], &node());
        let kinds: Vec<FrontendKind> = t.frontends.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [
                FrontendKind::ClusterIp,
                FrontendKind::NodePort,
                FrontendKind::ExternalIp,
                FrontendKind::LoadBalancer
            ]
        );
        let lb = find(
            &t,
            FrontendKind::LoadBalancer,
            "198.51.100.1",
            80,
            Proto::Tcp,
        );
        assert_eq!(lb.spec.backends.len(), 1, "eTP=Local: local endpoints only");
        assert!(lb.spec.external_traffic_local);
        let ext = find(&t, FrontendKind::ExternalIp, "203.0.113.7", 80, Proto::Tcp);
        assert_eq!(ext.spec.backends.len(), 1);
        assert!(t.skipped.contains(&Skip::ProxyModeIngress {
            ip: "198.51.100.2".into()
        }));
        assert!(t.skipped.contains(&Skip::HostnameIngress {
            hostname: "lb.example".into()
        }));
        assert!(t.skipped.iter().any(|s| matches!(
            s,
            Skip::Ipv6 {
                what: "externalIP",
                ..
            }
        )));
        assert!(FrontendKind::LoadBalancer.is_external() && !FrontendKind::ClusterIp.is_external());
    }

    #[test]
    fn external_ips_work_on_a_cluster_ip_service() {
        let s = web_slice();
        let svc = service(
            json!({"clusterIP": "10.96.0.10", "externalIPs": ["203.0.113.7"],
                                 "ports": [{"name": "http", "port": 80}]}),
        );
        let t = translate(&svc, &[&s], &node());
        let ext = find(&t, FrontendKind::ExternalIp, "203.0.113.7", 80, Proto::Tcp);
        assert_eq!(ext.spec.backends.len(), 2);
    }

    #[test]
    fn headless_external_name_and_unallocated_services_are_skipped() {
        let s = web_slice();
        for (spec, why) in [
            (
                json!({"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
                Skip::Headless,
            ),
            (
                json!({"type": "ExternalName", "externalName": "example.com"}),
                Skip::ExternalName,
            ),
            (
                json!({"ports": [{"name": "http", "port": 80}]}),
                Skip::NoClusterIp,
            ),
        ] {
            let t = translate(&service(spec), &[&s], &node());
            assert!(t.frontends.is_empty());
            assert_eq!(t.skipped, vec![why]);
        }
    }

    #[test]
    fn sctp_and_ipv6_are_skipped_with_a_reason() {
        let s = web_slice();
        let svc = service(json!({"clusterIPs": ["10.96.0.10", "fd00::10"],
                                 "ports": [{"name": "http", "port": 80},
                                           {"name": "sig", "port": 3868, "protocol": "SCTP"}]}));
        let t = translate(&svc, &[&s], &node());
        assert_eq!(t.frontends.len(), 1);
        assert!(t.skipped.contains(&Skip::UnsupportedProtocol {
            port: "sig".into(),
            protocol: "SCTP".into()
        }));
        assert!(t.skipped.iter().any(|s| matches!(
            s,
            Skip::Ipv6 {
                what: "clusterIP",
                ..
            }
        )));
        // An IPv6 slice contributes nothing (and says so).
        let mut v6 = web_slice();
        v6.address_type = "IPv6".into();
        v6.endpoints[0].addresses = vec!["fd00::1".into()];
        let t = translate(&svc, &[&v6], &node());
        assert!(t.frontends[0].spec.backends.is_empty());
        assert!(
            t.skipped
                .iter()
                .any(|s| matches!(s, Skip::SliceAddressType { .. }))
        );
    }

    #[test]
    fn selectorless_service_with_hand_made_slices() {
        // No selector: the proxy only ever looks at slices, so hand-made ones just work, and
        // slices of other services or namespaces are not picked up.
        let svc =
            service(json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}));
        let mine = web_slice();
        let mut other_ns = web_slice();
        other_ns.metadata.namespace = Some("kube-system".into());
        let mut other_svc = web_slice();
        other_svc
            .metadata
            .labels
            .get_or_insert_default()
            .insert(SERVICE_NAME_LABEL.into(), "api".into());
        let all = [mine, other_ns, other_svc];
        let picked = slices_of(&svc, &all);
        assert_eq!(picked.len(), 1);
        let t = translate(&svc, &picked, &node());
        assert_eq!(t.frontends[0].spec.backends.len(), 2);
    }

    #[test]
    fn bad_ports_are_skipped_not_programmed() {
        let s = web_slice();
        let svc = service(json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                                 "ports": [{"name": "http", "port": 70000, "nodePort": 30080},
                                           {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": -1}]}));
        let t = translate(&svc, &[&s], &node());
        assert_eq!(t.frontends.len(), 1, "{t:#?}");
        assert_eq!(t.frontends[0].spec.port, 53);
        assert_eq!(
            t.skipped
                .iter()
                .filter(|s| matches!(s, Skip::InvalidPort { .. }))
                .count(),
            2
        );
        // Slice port 0 gives no backends rather than a port-0 backend the datapath would refuse.
        let zero = slice(
            "web-0",
            json!([{"name": "dns", "port": 0, "protocol": "UDP"}]),
            json!([ep("10.244.1.10", "node-a", true, true, false)]),
        );
        let t = translate(&svc, &[&zero], &node());
        assert!(t.frontends[0].spec.backends.is_empty());
    }

    #[test]
    fn backends_come_out_sorted_so_equal_inputs_give_equal_specs() {
        let svc =
            service(json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}));
        let a = slice(
            "a",
            json!([{"name": "http", "port": 8080}]),
            json!([
                ep("10.244.1.12", "node-a", true, true, false),
                ep("10.244.1.10", "node-a", true, true, false)
            ]),
        );
        let b = slice(
            "b",
            json!([{"name": "http", "port": 8080}]),
            json!([ep("10.244.1.11", "node-a", true, true, false)]),
        );
        let t1 = translate(&svc, &[&a, &b], &node());
        let t2 = translate(&svc, &[&b, &a], &node());
        assert_eq!(t1, t2);
        let ips: Vec<String> = t1.frontends[0]
            .spec
            .backends
            .iter()
            .map(|b| b.ip.to_string())
            .collect();
        assert_eq!(ips, ["10.244.1.10", "10.244.1.11", "10.244.1.12"]);
    }
}
