//! The node's own network plumbing, in the namespace the agent runs in: the pod gateway
//! address, forwarding, and how pods reach other nodes' pod CIDRs: native routing (routes via
//! the other nodes' IPs, for nodes on one L2 segment) or the VXLAN overlay (`crate::vxlan`, for
//! nodes that only reach each other through routers). Through rtnetlink; routes skiff owns carry
//! their own protocol number, so a sync removes only what skiff added.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};
use tracing::{debug, info};

/// The protocol number on the routes skiff adds (`ip route` shows `proto 200`).
pub const SKIFF_ROUTE_PROTOCOL: u8 = 200;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("{what}: {source}")]
    Io { what: String, #[source] source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

/// How pods reach other nodes (`skiff agent --network`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// Routes `<podCIDR> via <node IP>`: the nodes must share an L2 segment (or a router that
    /// knows the pod ranges).
    #[default]
    Native,
    /// The VXLAN overlay (`crate::vxlan`): the nodes only need to reach each other's IPs.
    Vxlan,
}

impl std::str::FromStr for NetworkMode {
    type Err = NetworkError;
    fn from_str(s: &str) -> Result<NetworkMode, NetworkError> {
        match s {
            "native" => Ok(NetworkMode::Native),
            "vxlan" => Ok(NetworkMode::Vxlan),
            other => Err(NetworkError::Invalid(format!("unknown network mode {other:?} (native or vxlan)"))),
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkMode::Native => "native",
            NetworkMode::Vxlan => "vxlan",
        })
    }
}

/// What the routes loop keeps in place, per mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Desired {
    Native(RouteTable),
    Vxlan(crate::vxlan::Overlay),
}

impl Desired {
    /// The Nodes' desired state for `mode`. `own_ip`/`own_cidr` keep clashing Nodes out of the
    /// overlay.
    pub fn from_nodes(mode: NetworkMode, nodes: &[k8s_openapi::api::core::v1::Node], own: &str, own_ip: Ipv4Addr, own_cidr: Option<&Ipv4Net>) -> Desired {
        match mode {
            NetworkMode::Native => Desired::Native(routes_from_nodes(nodes, own)),
            NetworkMode::Vxlan => Desired::Vxlan(crate::vxlan::overlay_from_nodes(nodes, own, own_ip, own_cidr)),
        }
    }

    /// How many other nodes it reaches.
    pub fn len(&self) -> usize {
        match self {
            Desired::Native(r) => r.len(),
            Desired::Vxlan(o) => o.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub async fn sync(&self) -> Result<(), NetworkError> {
        match self {
            Desired::Native(r) => sync_routes(r).await,
            Desired::Vxlan(o) => crate::vxlan::sync_overlay(o).await,
        }
    }
}

pub(crate) fn connect() -> Result<Handle, NetworkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetworkError::Io { what: "opening a netlink socket".into(), source })?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn ifindex(handle: &Handle, name: &str) -> Result<u32, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await? {
        Some(l) => Ok(l.header.index),
        None => Err(NetworkError::Io { what: format!("interface {name}"), source: std::io::Error::from(std::io::ErrorKind::NotFound) }),
    }
}

/// `lo` up with the pod gateway on it (/32), and IPv4 forwarding on. Idempotent.
pub async fn prepare_node(gateway: Ipv4Addr) -> Result<(), NetworkError> {
    let handle = connect()?;
    let lo = ifindex(&handle, "lo").await?;
    handle.link().set(rtnetlink::LinkUnspec::new_with_index(lo).up().build()).execute().await?;
    match handle.address().add(lo, IpAddr::V4(gateway), 32).replace().execute().await {
        Ok(()) => {}
        Err(e) => return Err(e.into()),
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|source| NetworkError::Io { what: "enabling net.ipv4.ip_forward".into(), source })?;
    info!(%gateway, "node network ready: pod gateway on lo, forwarding on");
    Ok(())
}

/// The desired routes: every other node's pod CIDR via its InternalIP.
pub type RouteTable = BTreeMap<Ipv4Net, Ipv4Addr>;

fn route_dst(m: &RouteMessage) -> Option<Ipv4Net> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Ipv4Net::new(*ip, m.header.destination_prefix_length).ok(),
        _ => None,
    })
}

fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_gw(m: &RouteMessage) -> Option<Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

/// Where a skiff route sends its traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nexthop {
    pub gateway: Ipv4Addr,
    /// The output device; None: wherever the gateway is reachable (native routes).
    pub oif: Option<u32>,
    /// `onlink`: the gateway is on the device even though no prefix of the device covers it
    /// (the VXLAN overlay's remote VTEP addresses).
    pub onlink: bool,
}

/// Makes skiff's routes equal `desired`: adds or replaces what differs, deletes skiff routes no
/// longer wanted, and leaves every other route alone.
pub async fn sync_routes(desired: &RouteTable) -> Result<(), NetworkError> {
    let handle = connect()?;
    let desired = desired.iter().map(|(dst, gw)| (*dst, Nexthop { gateway: *gw, oif: None, onlink: false })).collect();
    sync_skiff_routes(&handle, &desired).await
}

/// The routes of protocol 200 equal `desired`, in either mode: a route of the other mode to the
/// same podCIDR is replaced in place (the kernel keys routes by destination), and one to a
/// podCIDR no longer wanted is deleted.
pub(crate) async fn sync_skiff_routes(handle: &Handle, desired: &BTreeMap<Ipv4Net, Nexthop>) -> Result<(), NetworkError> {
    let mut current: BTreeMap<Ipv4Net, (Ipv4Addr, Option<u32>, RouteMessage)> = BTreeMap::new();
    let mut routes = handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(m) = routes.try_next().await? {
        if m.header.protocol != RouteProtocol::Other(SKIFF_ROUTE_PROTOCOL) {
            continue;
        }
        if let (Some(dst), Some(gw)) = (route_dst(&m), route_gw(&m)) {
            current.insert(dst, (gw, route_oif(&m), m));
        }
    }
    for (dst, hop) in desired {
        let same = current.get(dst).is_some_and(|(g, oif, _)| *g == hop.gateway && (hop.oif.is_none() || hop.oif == *oif));
        if same {
            continue;
        }
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .gateway(hop.gateway)
            .protocol(RouteProtocol::Other(SKIFF_ROUTE_PROTOCOL));
        if let Some(oif) = hop.oif {
            b = b.output_interface(oif);
        }
        if hop.onlink {
            b = b.onlink();
        }
        handle.route().add(b.build()).replace().execute().await?;
        debug!(%dst, gw = %hop.gateway, oif = ?hop.oif, "route to a node's pods");
    }
    for (dst, (_, _, msg)) in current {
        if !desired.contains_key(&dst) {
            handle.route().del(msg).execute().await?;
            debug!(%dst, "route removed");
        }
    }
    Ok(())
}

/// Other nodes' pod CIDRs and InternalIPs, from the Node objects.
pub fn routes_from_nodes(nodes: &[k8s_openapi::api::core::v1::Node], own: &str) -> RouteTable {
    let mut out = RouteTable::new();
    for n in nodes {
        if n.metadata.name.as_deref() == Some(own) {
            continue;
        }
        let Some(cidr) = n.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()).and_then(|c| c.parse::<Ipv4Net>().ok()) else { continue };
        let Some(ip) = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .and_then(|a| a.address.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        out.insert(cidr, ip);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_skip_self_and_incomplete_nodes() {
        let n = |name: &str, cidr: Option<&str>, ip: Option<&str>| -> k8s_openapi::api::core::v1::Node {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"podCIDR": cidr},
                "status": {"addresses": ip.map(|ip| vec![serde_json::json!({"type": "InternalIP", "address": ip})]).unwrap_or_default()}
            })).unwrap()
        };
        let nodes = vec![
            n("a", Some("10.244.1.0/24"), Some("172.20.0.11")),
            n("b", Some("10.244.2.0/24"), Some("172.20.0.12")),
            n("c", None, Some("172.20.0.13")),
            n("d", Some("10.244.4.0/24"), None),
            n("e", Some("garbage"), Some("172.20.0.15")),
        ];
        let r = routes_from_nodes(&nodes, "a");
        assert_eq!(r.len(), 1);
        assert_eq!(r[&"10.244.2.0/24".parse::<Ipv4Net>().unwrap()], Ipv4Addr::new(172, 20, 0, 12));
    }

    #[test]
    fn mode_parses_and_prints() {
        assert_eq!("native".parse::<NetworkMode>().unwrap(), NetworkMode::Native);
        assert_eq!("vxlan".parse::<NetworkMode>().unwrap(), NetworkMode::Vxlan);
        assert!("geneve".parse::<NetworkMode>().is_err());
        assert_eq!(NetworkMode::Vxlan.to_string(), "vxlan");
        assert_eq!(NetworkMode::default(), NetworkMode::Native);
    }
}
