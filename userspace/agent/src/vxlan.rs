//! The VXLAN overlay (`skiff agent --network vxlan`), for nodes that do not share an L2 segment:
//! pod traffic to another node is carried in UDP between node IPs, so the network between the
//! nodes only has to route node addresses.
//!
//! The shape is flannel's `vxlan` backend (which Cilium's tunnel mode resembles), so an operator
//! recognises every piece with `ip -d link`, `ip route`, `ip neigh` and `bridge fdb`:
//! - one device [`VXLAN_DEVICE`] (VNI [`VXLAN_VNI`], UDP [`VXLAN_PORT`], `local` = the node IP,
//!   `dev` = the uplink, learning off, MTU = uplink MTU - [`VXLAN_OVERHEAD`]) whose MAC is
//!   [`vtep_mac`] of the node IP and whose address is the podCIDR's network address as /32
//!   ([`vtep_addr`], e.g. 10.244.1.0/32): node processes talking to remote pods use it as their
//!   source, and remote nodes route it back through the overlay with the rest of the podCIDR;
//! - for every other node: the route `<podCIDR> via <its vtep addr> dev skiff_vxlan onlink`
//!   (protocol [`network::SKIFF_ROUTE_PROTOCOL`], as native routes), a permanent neighbour `<its vtep addr>
//!   lladdr <its vtep mac>`, and an FDB entry `<its vtep mac> dst <its node IP>`.
//!
//! Nothing is learned from the wire (no multicast, no ARP across the overlay): every entry is
//! derived from the Node objects, and [`sync_overlay`] keeps the device's entries equal to them.
//! Neighbours and FDB entries are only ever read from and written to skiff's own device, so
//! the sync never touches anything else; deleting the device ([`remove_device`]) removes all of
//! it at once, which is what a switch back to native routing does.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};
use tracing::{debug, info, warn};

use crate::network::{self, NetworkError, NetworkMode, Nexthop};

/// The overlay device skiff makes (Cilium's is `cilium_vxlan`). No dot in it, unlike flannel's
/// `flannel.1`: the datapath pins the device's tc link as `links/tc-<device>-<ifindex>`, and
/// bpffs refuses names with dots (they are reserved for its own files).
pub const VXLAN_DEVICE: &str = "skiff_vxlan";
/// One overlay per cluster: every node uses the same VNI.
pub const VXLAN_VNI: u32 = 1;
/// The UDP port of the Linux kernel's historic default, which flannel and Cilium use (IANA's is
/// 4789): the same port as theirs, so firewalls opened for them pass skiff too.
pub const VXLAN_PORT: u16 = 8472;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const VXLAN_OVERHEAD: u32 = 50;

pub type Mac = [u8; 6];

/// A node's VTEP MAC, derived from its node IP: `0a:58:<the 4 bytes>` (locally administered,
/// unicast; the prefix Kubernetes network plugins use for IP-derived MACs). Deterministic, so
/// every node computes every other node's MAC without asking it.
pub fn vtep_mac(node_ip: Ipv4Addr) -> Mac {
    let o = node_ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// A node's overlay address: its podCIDR's network address (never given to a pod: IPAM starts
/// at .2, the gateway is .1).
pub fn vtep_addr(pod_cidr: &Ipv4Net) -> Ipv4Addr {
    pod_cidr.network()
}

pub fn format_mac(m: &Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The device this node should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub underlay_ifindex: u32,
    pub mtu: u32,
    pub mac: Mac,
    pub addr: Ipv4Addr,
}

/// The device for a node with `node_ip` on an uplink (`underlay_ifindex`, `uplink_mtu`) and the
/// pod CIDR `own_cidr`. Errors when the uplink's MTU leaves no room for the overlay.
pub fn device_spec(node_ip: Ipv4Addr, underlay_ifindex: u32, uplink_mtu: u32, own_cidr: &Ipv4Net) -> Result<DeviceSpec, NetworkError> {
    // 576 is the smallest datagram IPv4 hosts must accept; below it pods could not talk at all.
    if uplink_mtu < 576 + VXLAN_OVERHEAD {
        return Err(NetworkError::Invalid(format!("the uplink's MTU {uplink_mtu} is too small for VXLAN (needs >= {})", 576 + VXLAN_OVERHEAD)));
    }
    Ok(DeviceSpec {
        name: VXLAN_DEVICE.to_string(),
        vni: VXLAN_VNI,
        port: VXLAN_PORT,
        local: node_ip,
        underlay_ifindex,
        mtu: uplink_mtu - VXLAN_OVERHEAD,
        mac: vtep_mac(node_ip),
        addr: vtep_addr(own_cidr),
    })
}

/// Everything the overlay should hold for the other nodes: the pure, desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlay {
    /// `<podCIDR> via <vtep addr> dev skiff_vxlan onlink`.
    pub routes: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// Permanent neighbours on the device: vtep addr -> vtep MAC.
    pub neighbours: BTreeMap<Ipv4Addr, Mac>,
    /// FDB entries on the device: vtep MAC -> the node IP to send the UDP to.
    pub fdb: BTreeMap<Mac, Ipv4Addr>,
}

impl Overlay {
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// The overlay from the Node objects: every other node with a podCIDR and an InternalIP.
/// A node that claims this node's own IP, or whose IP or podCIDR another node already claimed
/// (by name order), is left out with a warning: its entries would clash.
pub fn overlay_from_nodes(nodes: &[k8s_openapi::api::core::v1::Node], own: &str, own_ip: Ipv4Addr, own_cidr: Option<&Ipv4Net>) -> Overlay {
    // Name order, so which of two clashing nodes wins does not depend on the list's order.
    let mut sorted: Vec<&k8s_openapi::api::core::v1::Node> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out = Overlay::default();
    for n in sorted {
        let name = n.metadata.name.as_deref().unwrap_or_default();
        let one = network::routes_from_nodes(std::slice::from_ref(n), own);
        let Some((cidr, ip)) = one.into_iter().next() else { continue };
        if ip == own_ip || own_cidr.is_some_and(|c| c.contains(&cidr.network()) || cidr.contains(&c.network())) {
            warn!(node = name, %ip, %cidr, "node clashes with this node's own IP or podCIDR: left out of the overlay");
            continue;
        }
        let (vtep, mac) = (vtep_addr(&cidr), vtep_mac(ip));
        if out.fdb.contains_key(&mac) || out.routes.keys().any(|c| c.contains(&cidr.network()) || cidr.contains(&c.network())) {
            warn!(node = name, %ip, %cidr, "node's IP or podCIDR is already another node's: left out of the overlay");
            continue;
        }
        out.routes.insert(cidr, vtep);
        out.neighbours.insert(vtep, mac);
        out.fdb.insert(mac, ip);
    }
    out
}

/// What to change to make `current` equal `desired`: entries to add or replace, keys to delete.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(current: &BTreeMap<K, V>, desired: &BTreeMap<K, V>) -> (Vec<(K, V)>, Vec<K>) {
    let upserts = desired.iter().filter(|(k, v)| current.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let deletes = current.keys().filter(|k| !desired.contains_key(*k)).cloned().collect();
    (upserts, deletes)
}

fn errno_is(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| c.get() == -errno))
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetworkError> {
    match handle.link().get().match_name(name.to_string()).execute().try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno_is(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The underlay: the ifindex and MTU of `name`, or (no name given) of the interface holding
/// `node_ip`.
async fn underlay(handle: &Handle, name: Option<&str>, node_ip: Ipv4Addr) -> Result<(u32, u32), NetworkError> {
    let link = match name {
        Some(name) => link_by_name(handle, name).await?.ok_or_else(|| NetworkError::Invalid(format!("the uplink {name} does not exist")))?,
        None => {
            let addrs: Vec<_> = handle.address().get().execute().try_collect().await?;
            let index = addrs
                .iter()
                .find(|a| a.attributes.iter().any(|x| matches!(x, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == node_ip)))
                .map(|a| a.header.index)
                .ok_or_else(|| NetworkError::Invalid(format!("no interface holds the node IP {node_ip}: give --uplink")))?;
            handle
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next()
                .await?
                .ok_or_else(|| NetworkError::Invalid(format!("interface {index} vanished")))?
        }
    };
    let mtu = link.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None }).unwrap_or(1500);
    Ok((link.header.index, mtu))
}

/// Agent start, before the datapath loads: in vxlan mode, makes the device (over `uplink`, or
/// the interface holding `node_ip`) and returns its MTU, the pods' MTU. Native mode: None.
pub async fn prepare(mode: NetworkMode, uplink: Option<&str>, node_ip: Ipv4Addr, own_cidr: &Ipv4Net) -> Result<Option<u32>, NetworkError> {
    if mode != NetworkMode::Vxlan {
        return Ok(None);
    }
    let handle = network::connect()?;
    let (index, mtu) = underlay(&handle, uplink, node_ip).await?;
    let spec = device_spec(node_ip, index, mtu, own_cidr)?;
    ensure_device(&spec).await?;
    Ok(Some(spec.mtu))
}

type SharedDatapath = std::sync::Arc<std::sync::Mutex<skiff_datapath::Datapath>>;

/// Agent start, once the datapath is loaded. vxlan: `from_pod` on the device's tc ingress, as
/// on the uplink's: replies from backends on other nodes arrive decapsulated there and need
/// their reverse NAT. native: an overlay left by an earlier vxlan run goes (tc link first, so
/// no pin outlives its device).
pub async fn finish(mode: NetworkMode, dp: Option<SharedDatapath>) -> Result<(), NetworkError> {
    let present = link_by_name(&network::connect()?, VXLAN_DEVICE).await?.is_some();
    if mode == NetworkMode::Native && !present {
        return Ok(());
    }
    if let Some(dp) = dp {
        tokio::task::spawn_blocking(move || -> Result<(), NetworkError> {
            let mut dp = dp.lock().map_err(|_| NetworkError::Invalid("the datapath lock is poisoned".into()))?;
            match mode {
                NetworkMode::Vxlan => dp.attach_tc(VXLAN_DEVICE).map_err(|e| NetworkError::Invalid(format!("attaching tc to {VXLAN_DEVICE}: {e}")))?,
                NetworkMode::Native => dp.detach_tc(VXLAN_DEVICE).map_err(|e| NetworkError::Invalid(format!("detaching tc from {VXLAN_DEVICE}: {e}")))?,
            }
            Ok(())
        })
        .await
        .map_err(|e| NetworkError::Invalid(format!("datapath task: {e}")))??;
        if mode == NetworkMode::Vxlan {
            info!(device = VXLAN_DEVICE, "tc from_pod attached to the overlay device (reverse NAT of replies from other nodes)");
        }
    }
    if mode == NetworkMode::Native {
        remove_device().await?;
    }
    Ok(())
}

/// Whether an existing device was made with `spec`'s tunnel parameters (those cannot be changed
/// in place; MTU, MAC and state can).
fn tunnel_matches(l: &LinkMessage, spec: &DeviceSpec) -> bool {
    let Some(data) = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| if let LinkInfo::Data(InfoData::Vxlan(d)) = i { Some(d) } else { None }),
        _ => None,
    }) else {
        return false;
    };
    let (mut id, mut local, mut link, mut port, mut learning) = (None, None, None, None, None);
    for a in data {
        match a {
            InfoVxlan::Id(v) => id = Some(*v),
            InfoVxlan::Local(v) => local = Some(*v),
            InfoVxlan::Link(v) => link = Some(*v),
            InfoVxlan::Port(v) => port = Some(*v),
            InfoVxlan::Learning(v) => learning = Some(*v),
            _ => {}
        }
    }
    id == Some(spec.vni) && local == Some(spec.local) && link == Some(spec.underlay_ifindex) && port == Some(spec.port) && learning == Some(false)
}

/// Makes the VXLAN device equal `spec` (creating it, or recreating it when its tunnel parameters
/// differ), up, with exactly the one address `spec.addr/32`. Returns its ifindex. Idempotent.
pub async fn ensure_device(spec: &DeviceSpec) -> Result<u32, NetworkError> {
    let handle = network::connect()?;
    let existing = link_by_name(&handle, &spec.name).await?;
    let index = match existing {
        Some(l) if tunnel_matches(&l, spec) => {
            let mac = l.attributes.iter().find_map(|a| if let LinkAttribute::Address(m) = a { Some(m.clone()) } else { None });
            if mac.as_deref() != Some(&spec.mac[..]) {
                // A MAC change needs the device down (vxlan has no live address change).
                handle.link().set(LinkUnspec::new_with_index(l.header.index).down().build()).execute().await?;
                handle.link().set(LinkUnspec::new_with_index(l.header.index).address(spec.mac.to_vec()).build()).execute().await?;
            }
            l.header.index
        }
        other => {
            if let Some(l) = other {
                info!(device = %spec.name, "the VXLAN device's tunnel parameters changed: recreating it");
                handle.link().del(l.header.index).execute().await?;
            }
            let msg = LinkVxlan::new(&spec.name, spec.vni)
                .dev(spec.underlay_ifindex)
                .port(spec.port)
                .local(spec.local)
                .learning(false)
                .mtu(spec.mtu)
                .address(spec.mac.to_vec())
                .build();
            handle.link().add(msg).execute().await?;
            link_by_name(&handle, &spec.name)
                .await?
                .ok_or_else(|| NetworkError::Invalid(format!("{} vanished right after it was made", spec.name)))?
                .header
                .index
        }
    };
    handle.link().set(LinkUnspec::new_with_index(index).mtu(spec.mtu).up().build()).execute().await?;
    handle.address().add(index, IpAddr::V4(spec.addr), 32).replace().execute().await?;
    // Any other address on it is from an earlier podCIDR: remove it (source selection would
    // otherwise pick it for traffic to remote pods).
    let addrs: Vec<_> = handle.address().get().set_link_index_filter(index).execute().try_collect().await?;
    for a in addrs {
        let v4 = a.attributes.iter().find_map(|x| if let AddressAttribute::Address(IpAddr::V4(ip)) = x { Some(*ip) } else { None });
        if let Some(ip) = v4
            && (ip != spec.addr || a.header.prefix_len != 32)
        {
            handle.address().del(a).execute().await?;
            debug!(%ip, "stale overlay address removed");
        }
    }
    info!(device = %spec.name, index, vni = spec.vni, port = spec.port, local = %spec.local, mtu = spec.mtu, mac = %format_mac(&spec.mac), addr = %spec.addr, "VXLAN device ready");
    Ok(index)
}

/// Deletes skiff's VXLAN device if there is one (its routes, neighbours and FDB entries go with
/// it). Returns whether there was one.
pub async fn remove_device() -> Result<bool, NetworkError> {
    let handle = network::connect()?;
    match link_by_name(&handle, VXLAN_DEVICE).await? {
        Some(l) => {
            handle.link().del(l.header.index).execute().await?;
            info!(device = VXLAN_DEVICE, "VXLAN device removed (native routing)");
            Ok(true)
        }
        None => Ok(false),
    }
}

fn neigh_dst(m: &NeighbourMessage) -> Option<Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // In an AF_BRIDGE (FDB) message the parser cannot know the address's family and keeps
        // the bytes: a VXLAN remote is 4 of them for IPv4.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from),
        _ => None,
    })
}

fn neigh_lladdr(m: &NeighbourMessage) -> Option<Mac> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => <Mac>::try_from(l.as_slice()).ok(),
        _ => None,
    })
}

/// Makes skiff's overlay equal `desired`: FDB and neighbours first (so a route never points at
/// an entry that is not there yet), then routes; deletions in the reverse order. Touches only
/// the entries of skiff's own device, and routes of protocol 200.
pub async fn sync_overlay(desired: &Overlay) -> Result<(), NetworkError> {
    let handle = network::connect()?;
    let Some(dev) = link_by_name(&handle, VXLAN_DEVICE).await? else {
        return Err(NetworkError::Invalid(format!("{VXLAN_DEVICE} is gone (deleted by hand?): restart the agent to recreate it")));
    };
    let index = dev.header.index;

    // Current FDB entries and neighbours of the device.
    let mut fdb_msgs: BTreeMap<Mac, (Ipv4Addr, NeighbourMessage)> = BTreeMap::new();
    let mut dump = handle.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
    while let Some(m) = dump.try_next().await? {
        if m.header.ifindex != index {
            continue;
        }
        if let (Some(mac), Some(dst)) = (neigh_lladdr(&m), neigh_dst(&m)) {
            fdb_msgs.insert(mac, (dst, m));
        }
    }
    let mut neigh_msgs: BTreeMap<Ipv4Addr, (Mac, NeighbourMessage)> = BTreeMap::new();
    let mut dump = handle.neighbours().get().set_address_family(AddressFamily::Inet).execute();
    while let Some(m) = dump.try_next().await? {
        if m.header.ifindex != index {
            continue;
        }
        if let Some(ip) = neigh_dst(&m) {
            // An entry without a MAC (e.g. FAILED) counts as wrong: it is replaced.
            neigh_msgs.insert(ip, (neigh_lladdr(&m).unwrap_or_default(), m));
        }
    }
    let fdb_now: BTreeMap<Mac, Ipv4Addr> = fdb_msgs.iter().map(|(k, (v, _))| (*k, *v)).collect();
    let neigh_now: BTreeMap<Ipv4Addr, Mac> = neigh_msgs.iter().map(|(k, (v, _))| (*k, *v)).collect();
    let (fdb_add, fdb_del) = diff(&fdb_now, &desired.fdb);
    let (neigh_add, neigh_del) = diff(&neigh_now, &desired.neighbours);

    for (mac, dst) in fdb_add {
        handle
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(IpAddr::V4(dst))
            .replace()
            .execute()
            .await?;
        debug!(mac = %format_mac(&mac), %dst, "fdb entry");
    }
    for (ip, mac) in neigh_add {
        handle.neighbours().add(index, IpAddr::V4(ip)).link_layer_address(&mac).state(NeighbourState::Permanent).replace().execute().await?;
        debug!(%ip, mac = %format_mac(&mac), "overlay neighbour");
    }

    let routes: BTreeMap<Ipv4Net, Nexthop> = desired.routes.iter().map(|(c, gw)| (*c, Nexthop { gateway: *gw, oif: Some(index), onlink: true })).collect();
    network::sync_skiff_routes(&handle, &routes).await?;

    for ip in neigh_del {
        if let Some((_, m)) = neigh_msgs.remove(&ip) {
            handle.neighbours().del(m).execute().await?;
            debug!(%ip, "overlay neighbour removed");
        }
    }
    for mac in fdb_del {
        if let Some((_, m)) = fdb_msgs.remove(&mac) {
            handle.neighbours().del(m).execute().await?;
            debug!(mac = %format_mac(&mac), "fdb entry removed");
        }
    }
    Ok(())
}

/// The device's packet counters (rx, tx), for tests and diagnostics.
pub async fn device_counters() -> Result<Option<(u64, u64)>, NetworkError> {
    let handle = network::connect()?;
    Ok(link_by_name(&handle, VXLAN_DEVICE).await?.and_then(|l| {
        l.attributes.iter().find_map(|a| if let LinkAttribute::Stats64(s) = a { Some((s.rx_packets, s.tx_packets)) } else { None })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>, ip: Option<&str>) -> k8s_openapi::api::core::v1::Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": ip.map(|ip| vec![serde_json::json!({"type": "InternalIP", "address": ip})]).unwrap_or_default()}
        }))
        .unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn mac_and_address_derive_from_node_ip_and_cidr() {
        assert_eq!(vtep_mac(Ipv4Addr::new(172, 20, 0, 11)), [0x0a, 0x58, 172, 20, 0, 11]);
        assert_eq!(format_mac(&vtep_mac(Ipv4Addr::new(10, 0, 0, 1))), "0a:58:0a:00:00:01");
        // Locally administered, unicast.
        assert_eq!(vtep_mac(Ipv4Addr::new(1, 2, 3, 4))[0] & 0b11, 0b10);
        assert_eq!(vtep_addr(&net("10.244.3.0/24")), Ipv4Addr::new(10, 244, 3, 0));
    }

    #[test]
    fn device_follows_uplink_mtu_and_refuses_a_tiny_one() {
        let d = device_spec(Ipv4Addr::new(172, 20, 0, 11), 2, 1500, &net("10.244.1.0/24")).unwrap();
        assert_eq!((d.name.as_str(), d.vni, d.port, d.mtu), ("skiff_vxlan", 1, 8472, 1450));
        assert_eq!(d.addr, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(d.mac, vtep_mac(Ipv4Addr::new(172, 20, 0, 11)));
        assert_eq!(device_spec(Ipv4Addr::new(172, 20, 0, 11), 2, 9000, &net("10.244.1.0/24")).unwrap().mtu, 8950);
        assert!(device_spec(Ipv4Addr::new(172, 20, 0, 11), 2, 600, &net("10.244.1.0/24")).is_err());
    }

    #[test]
    fn overlay_has_a_route_neighbour_and_fdb_entry_per_other_node() {
        let nodes = vec![
            node("a", Some("10.244.1.0/24"), Some("172.20.0.11")),
            node("b", Some("10.244.2.0/24"), Some("172.20.0.140")),
            node("c", Some("10.244.3.0/24"), Some("172.20.0.13")),
            node("d", None, Some("172.20.0.14")),
            node("e", Some("10.244.5.0/24"), None),
        ];
        let o = overlay_from_nodes(&nodes, "a", Ipv4Addr::new(172, 20, 0, 11), Some(&net("10.244.1.0/24")));
        assert_eq!(o.len(), 2);
        assert_eq!(o.routes[&net("10.244.2.0/24")], Ipv4Addr::new(10, 244, 2, 0));
        assert_eq!(o.routes[&net("10.244.3.0/24")], Ipv4Addr::new(10, 244, 3, 0));
        assert_eq!(o.neighbours[&Ipv4Addr::new(10, 244, 2, 0)], vtep_mac(Ipv4Addr::new(172, 20, 0, 140)));
        assert_eq!(o.fdb[&vtep_mac(Ipv4Addr::new(172, 20, 0, 140))], Ipv4Addr::new(172, 20, 0, 140));
        assert_eq!(o.fdb[&vtep_mac(Ipv4Addr::new(172, 20, 0, 13))], Ipv4Addr::new(172, 20, 0, 13));
        assert!(!o.routes.contains_key(&net("10.244.1.0/24")), "no entry for itself");
        // The same Nodes in another order give the same overlay.
        let mut rev = nodes.clone();
        rev.reverse();
        assert_eq!(overlay_from_nodes(&rev, "a", Ipv4Addr::new(172, 20, 0, 11), Some(&net("10.244.1.0/24"))), o);
    }

    #[test]
    fn clashing_nodes_are_left_out() {
        let nodes = vec![
            node("a", Some("10.244.1.0/24"), Some("172.20.0.11")),
            // Claims a's own IP.
            node("b", Some("10.244.2.0/24"), Some("172.20.0.11")),
            node("c", Some("10.244.3.0/24"), Some("172.20.0.13")),
            // Same node IP as c: c wins by name.
            node("d", Some("10.244.4.0/24"), Some("172.20.0.13")),
            // Overlaps c's podCIDR.
            node("e", Some("10.244.3.0/25"), Some("172.20.0.15")),
            // Overlaps a's own podCIDR.
            node("f", Some("10.244.0.0/16"), Some("172.20.0.16")),
        ];
        let o = overlay_from_nodes(&nodes, "a", Ipv4Addr::new(172, 20, 0, 11), Some(&net("10.244.1.0/24")));
        assert_eq!(o.routes.keys().collect::<Vec<_>>(), vec![&net("10.244.3.0/24")]);
        assert_eq!(o.fdb.len(), 1);
        assert_eq!(o.neighbours.len(), 1);
    }

    #[test]
    fn diff_adds_changes_and_removes() {
        let cur: BTreeMap<u8, u8> = [(1, 10), (2, 20), (3, 30)].into();
        let want: BTreeMap<u8, u8> = [(1, 10), (2, 21), (4, 40)].into();
        let (up, del) = diff(&cur, &want);
        assert_eq!(up, vec![(2, 21), (4, 40)]);
        assert_eq!(del, vec![3]);
        let (up, del) = diff(&want, &want);
        assert!(up.is_empty() && del.is_empty());
    }

    #[test]
    fn a_node_moving_changes_its_fdb_entry_and_mac() {
        let before = overlay_from_nodes(&[node("b", Some("10.244.2.0/24"), Some("172.20.0.12"))], "a", Ipv4Addr::new(172, 20, 0, 11), None);
        let after = overlay_from_nodes(&[node("b", Some("10.244.2.0/24"), Some("172.20.0.140"))], "a", Ipv4Addr::new(172, 20, 0, 11), None);
        let (up, del) = diff(&before.fdb, &after.fdb);
        assert_eq!(up, vec![(vtep_mac(Ipv4Addr::new(172, 20, 0, 140)), Ipv4Addr::new(172, 20, 0, 140))]);
        assert_eq!(del, vec![vtep_mac(Ipv4Addr::new(172, 20, 0, 12))]);
        let (up, _) = diff(&before.neighbours, &after.neighbours);
        assert_eq!(up, vec![(Ipv4Addr::new(10, 244, 2, 0), vtep_mac(Ipv4Addr::new(172, 20, 0, 140)))]);
        assert!(diff(&before.routes, &after.routes).0.is_empty(), "the route itself stays");
    }

    // ----- Real kernel: two namespaces made here, joined by a veth, an overlay between them. -----

    fn sh(args: &[&str]) -> String {
        let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect("run a tool");
        assert!(out.status.success(), "{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Deletes the namespaces by name when the test ends, however it ends.
    struct Netns(Vec<String>);
    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = std::process::Command::new("ip").args(["netns", "del", n]).output();
            }
        }
    }

    /// Runs `f` on a thread inside /run/netns/`ns`, on a runtime of its own.
    fn in_ns<T: Send + 'static>(ns: &str, f: impl std::future::Future<Output = T> + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: a valid netns fd, for this thread only.
            assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {path}");
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
        })
        .join()
        .expect("netns thread")
    }

    fn root_available() -> bool {
        // SAFETY: no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let ip = std::process::Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
        let bridge = std::process::Command::new("bridge").arg("-V").output().is_ok_and(|o| o.status.success());
        if root && ip && bridge {
            return true;
        }
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!ci, "CI=true and root/iproute2 is missing: the overlay netlink test must run in CI");
        eprintln!("skipping: needs root and iproute2 (ip, bridge)");
        false
    }

    #[test]
    fn overlay_in_real_namespaces_carries_tcp_and_follows_the_nodes() {
        if !root_available() {
            return;
        }
        let (a, b) = (format!("skvxt-{}-a", std::process::id()), format!("skvxt-{}-b", std::process::id()));
        let _guard = Netns(vec![a.clone(), b.clone()]);
        for ns in [&a, &b] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "-n", &a, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", &b]);
        for (ns, ip, pod) in [(&a, "172.31.254.1/24", "10.250.1.5/32"), (&b, "172.31.254.2/24", "10.250.2.5/32")] {
            sh(&["ip", "-n", ns, "addr", "add", ip, "dev", "up0"]);
            sh(&["ip", "-n", ns, "link", "set", "up0", "up"]);
            sh(&["ip", "-n", ns, "addr", "add", pod, "dev", "lo"]);
        }
        let ip_a = Ipv4Addr::new(172, 31, 254, 1);
        let ip_b = Ipv4Addr::new(172, 31, 254, 2);
        let nodes = vec![node("a", Some("10.250.1.0/24"), Some("172.31.254.1")), node("b", Some("10.250.2.0/24"), Some("172.31.254.2"))];
        // A native route of an earlier run (protocol 200) and someone else's route: the first
        // is replaced by the overlay's, the second left alone.
        sh(&["ip", "-n", &a, "route", "add", "10.250.2.0/24", "via", "172.31.254.2", "proto", "200"]);
        sh(&["ip", "-n", &a, "route", "add", "10.250.9.0/24", "via", "172.31.254.2", "proto", "static"]);
        for (ns, name, ip, cidr) in [(&a, "a", ip_a, "10.250.1.0/24"), (&b, "b", ip_b, "10.250.2.0/24")] {
            let nodes = nodes.clone();
            let cidr = net(cidr);
            let mtu = in_ns(ns, async move {
                let mtu = prepare(NetworkMode::Vxlan, Some("up0"), ip, &cidr).await.expect("prepare").expect("an MTU in vxlan mode");
                // Idempotent: a second start finds the device as it is (same ifindex), and one
                // whose tunnel parameters differ is made anew.
                assert_eq!(prepare(NetworkMode::Vxlan, None, ip, &cidr).await.expect("prepare again"), Some(mtu));
                let handle = network::connect().expect("netlink");
                let (up_index, up_mtu) = underlay(&handle, Some("up0"), ip).await.expect("underlay");
                let spec = device_spec(ip, up_index, up_mtu, &cidr).expect("spec");
                let first = ensure_device(&spec).await.expect("ensure");
                assert_eq!(ensure_device(&spec).await.expect("ensure again"), first);
                let moved = DeviceSpec { port: 4789, ..spec.clone() };
                let second = ensure_device(&moved).await.expect("ensure other port");
                assert_ne!(second, first, "recreated for another port");
                assert_ne!(ensure_device(&spec).await.expect("ensure back"), second);
                sync_overlay(&overlay_from_nodes(&nodes, name, ip, Some(&cidr))).await.expect("sync");
                mtu
            });
            assert_eq!(mtu, 1450);
        }
        let link = sh(&["ip", "-n", &a, "-d", "link", "show", VXLAN_DEVICE]);
        assert!(link.contains("vxlan id 1 ") && link.contains("local 172.31.254.1") && link.contains("dev up0") && link.contains("dstport 8472") && link.contains("nolearning"), "{link}");
        assert!(link.contains("mtu 1450") && link.contains("0a:58:ac:1f:fe:01") && link.contains(",UP"), "{link}");
        assert!(sh(&["ip", "-n", &a, "addr", "show", "dev", VXLAN_DEVICE]).contains("inet 10.250.1.0/32"));
        let routes = sh(&["ip", "-n", &a, "route"]);
        assert!(routes.contains("10.250.2.0/24 via 10.250.2.0 dev skiff_vxlan proto 200 onlink"), "{routes}");
        assert!(routes.contains("10.250.9.0/24 via 172.31.254.2 dev up0 proto static"), "others' routes stay: {routes}");
        let neigh = sh(&["ip", "-n", &a, "neigh", "show", "dev", VXLAN_DEVICE]);
        assert!(neigh.contains("10.250.2.0 lladdr 0a:58:ac:1f:fe:02 PERMANENT"), "{neigh}");
        let fdb = sh(&["bridge", "-n", &a, "fdb", "show", "dev", VXLAN_DEVICE]);
        assert!(fdb.contains("0a:58:ac:1f:fe:02 dst 172.31.254.2 self permanent"), "{fdb}");

        // Real traffic: a "pod" address in b answers a connection from a, through the overlay.
        let listener = in_ns(&b, async { std::net::TcpListener::bind("10.250.2.5:9999").expect("listen in b") });
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (mut c, peer) = listener.accept().expect("accept");
            c.write_all(peer.ip().to_string().as_bytes()).expect("write");
        });
        let (before, said) = in_ns(&a, async {
            let before = device_counters().await.expect("counters").expect("device");
            let mut s = std::net::TcpStream::connect_timeout(&"10.250.2.5:9999".parse().unwrap(), std::time::Duration::from_secs(3)).expect("connect across the overlay");
            let mut said = String::new();
            std::io::Read::read_to_string(&mut s, &mut said).expect("read");
            (before, said)
        });
        server.join().expect("server");
        assert_eq!(said, "10.250.1.0", "node processes speak from the overlay address");
        let after = in_ns(&a, async { device_counters().await.expect("counters").expect("device") });
        assert!(after.0 > before.0 && after.1 > before.1, "the device carried it: {before:?} -> {after:?}");

        // b moves to another IP: a's FDB entry and neighbour follow; then b leaves altogether.
        let moved = vec![node("b", Some("10.250.2.0/24"), Some("172.31.254.3"))];
        in_ns(&a, async move { sync_overlay(&overlay_from_nodes(&moved, "a", Ipv4Addr::new(172, 31, 254, 1), None)).await.expect("sync moved") });
        let fdb = sh(&["bridge", "-n", &a, "fdb", "show", "dev", VXLAN_DEVICE]);
        assert!(fdb.contains("0a:58:ac:1f:fe:03 dst 172.31.254.3") && !fdb.contains("0a:58:ac:1f:fe:02"), "{fdb}");
        assert!(sh(&["ip", "-n", &a, "neigh", "show", "dev", VXLAN_DEVICE]).contains("10.250.2.0 lladdr 0a:58:ac:1f:fe:03 PERMANENT"));
        in_ns(&a, async { sync_overlay(&Overlay::default()).await.expect("sync empty") });
        assert!(!sh(&["ip", "-n", &a, "route"]).contains("10.250.2.0/24"));
        assert!(sh(&["ip", "-n", &a, "neigh", "show", "dev", VXLAN_DEVICE]).trim().is_empty());
        assert!(!sh(&["bridge", "-n", &a, "fdb", "show", "dev", VXLAN_DEVICE]).contains("dst"));

        // Back to native: the device and everything on it goes; the other route stays.
        in_ns(&a, async { finish(NetworkMode::Native, None).await.expect("native finish") });
        assert!(!sh(&["ip", "-n", &a, "link"]).contains(VXLAN_DEVICE));
        assert!(sh(&["ip", "-n", &a, "route"]).contains("10.250.9.0/24"));
        assert!(!in_ns(&a, async { remove_device().await.expect("remove again") }), "nothing left to remove");
    }
}
