//! The network changes, over rtnetlink (no `ip` commands): the veth pair, the pod's address and
//! routes, and the node's route and gateway. The plugin runs in the caller's (the node's)
//! network namespace; the pod side is configured from a thread that setns()'s into CNI_NETNS and
//! opens its own netlink socket there (setns affects only that thread), and each side runs a
//! small current-thread tokio runtime because rtnetlink is async.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, RawFd},
    os::unix::fs::MetadataExt,
    path::Path,
};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
    },
};

use crate::error::{CniError, CniResult, code};

/// A link as the plugin needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub mac: [u8; 6],
    pub up: bool,
    pub is_veth: bool,
    /// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
    pub peer_index: Option<u32>,
    pub mtu: Option<u32>,
}

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> CniError {
    let what = what.into();
    move |e| CniError::io(what, e)
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Runs `f` with a netlink handle bound to the calling thread's network namespace.
fn with_handle<T>(f: impl AsyncFnOnce(Handle) -> CniResult<T>) -> CniResult<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::io("starting the netlink runtime", e))?;
    rt.block_on(async {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| CniError::io("opening a netlink socket", e))?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

/// Runs `f` on a thread inside the network namespace `ns` (its own netlink socket opens there).
fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> CniResult<T> + Send) -> CniResult<T> {
    let fd = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: fd is an open namespace file (checked by open_netns); CLONE_NEWNET moves
            // only this thread, which ends when the closure returns.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(CniError::io(
                    "entering CNI_NETNS",
                    std::io::Error::last_os_error(),
                ));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(CniError::io("the netns thread failed", "it panicked")))
    })
}

/// Opens CNI_NETNS, checking that it is a network namespace and not the plugin's own one.
pub fn open_netns(path: &Path) -> CniResult<File> {
    let file = File::open(path).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            code::INVALID_ENV
        } else {
            code::IO_FAILURE
        };
        CniError::new(code, format!("cannot open CNI_NETNS {}", path.display())).with_details(e)
    })?;
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: ioctl on an open fd with no argument.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(CniError::invalid_env(format!(
            "CNI_NETNS {} is not a network namespace (expected e.g. /run/netns/<name> or /proc/<pid>/ns/net)",
            path.display()
        )));
    }
    let ours = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| CniError::io("reading this process's network namespace", e))?;
    let theirs = file
        .metadata()
        .map_err(|e| CniError::io(format!("stat {}", path.display()), e))?;
    if ours.dev() == theirs.dev() && ours.ino() == theirs.ino() {
        return Err(CniError::invalid_env(format!(
            "CNI_NETNS {} is the plugin's own network namespace (the node's): the pod needs its own",
            path.display()
        )));
    }
    Ok(file)
}

fn link_state(msg: &LinkMessage) -> LinkState {
    let mut st = LinkState {
        index: msg.header.index,
        mac: [0; 6],
        up: msg.header.flags.contains(LinkFlags::Up),
        is_veth: false,
        peer_index: None,
        mtu: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::Address(m) if m.len() == 6 => st.mac.copy_from_slice(m),
            LinkAttribute::Link(i) => st.peer_index = Some(*i),
            LinkAttribute::Mtu(m) => st.mtu = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                st.is_veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    st
}

async fn get_link(h: &Handle, name: &str) -> CniResult<Option<LinkState>> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(link_state(&m))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err(format!("looking up interface {name}"))(e)),
    }
}

async fn set_up(h: &Handle, index: u32, name: &str) -> CniResult<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl_err(format!("setting {name} up")))
}

async fn add_address(h: &Handle, index: u32, ip: Ipv4Addr, name: &str) -> CniResult<()> {
    match h.address().add(index, IpAddr::V4(ip), 32).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(nl_err(format!("adding {ip}/32 to {name}"))(e)),
    }
}

async fn has_address(h: &Handle, index: u32, ip: Ipv4Addr) -> CniResult<bool> {
    let mut s = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = s.try_next().await.map_err(nl_err("listing addresses"))? {
        if m.header.prefix_len == 32
            && m.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Address(IpAddr::V4(v)) | AddressAttribute::Local(IpAddr::V4(v)) if *v == ip)
            })
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A route of the main table, reduced to what the plugin compares.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    dst: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
    scope: RouteScope,
}

fn route_of(m: &RouteMessage) -> Option<Route> {
    let mut table = m.header.table as u32;
    let mut r = Route {
        dst: Ipv4Addr::UNSPECIFIED,
        prefix: m.header.destination_prefix_length,
        gateway: None,
        oif: None,
        scope: m.header.scope,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => r.dst = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    (table == 254).then_some(r)
}

async fn routes(h: &Handle) -> CniResult<Vec<Route>> {
    let mut s = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut out = Vec::new();
    while let Some(m) = s.try_next().await.map_err(nl_err("listing routes"))? {
        out.extend(route_of(&m));
    }
    Ok(out)
}

async fn replace_route(h: &Handle, msg: RouteMessage, what: &str) -> CniResult<()> {
    h.route()
        .add(msg)
        .replace()
        .execute()
        .await
        .map_err(nl_err(format!("adding route {what}")))
}

async fn delete_link(h: &Handle, name: &str) -> CniResult<bool> {
    let Some(l) = get_link(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(l.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl_err(format!("deleting interface {name}"))(e)),
    }
}

/// What [`setup`] made.
#[derive(Clone, Debug)]
pub struct Wired {
    pub host: LinkState,
    pub pod: LinkState,
}

/// Everything ADD changes in the network:
/// - node: a veth `host_if` (replacing a stale one of that name) whose peer is created directly in
///   `netns` as `pod_if`, up, `ip/32 dev host_if`, `gateway/32` on `lo`, ip_forward=1;
/// - pod: `lo` up, `pod_if` up with `ip/32`, `gateway dev pod_if scope link`,
///   `default via gateway dev pod_if`.
///
/// On an error after the veth exists, the veth is deleted again (which removes both ends and the
/// node route), so a failed ADD leaves no interface behind.
pub fn setup(
    host_if: &str,
    pod_if: &str,
    netns: &File,
    mtu: u32,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> CniResult<Wired> {
    with_handle(async |h| {
        if delete_link(&h, host_if).await? {
            tracing::info!(host_if, "replaced a stale host veth");
        }
        Ok(())
    })?;
    // With the stale host veth gone its peer is gone too, so an interface of that name still in
    // the pod's namespace belongs to someone else.
    if in_netns(netns, || with_handle(async |h| get_link(&h, pod_if).await))?.is_some() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_NETNS already has an interface named {pod_if} (not one skiff-cni made): choose another CNI_IFNAME"
            ),
        ));
    }
    let ns_fd: RawFd = netns.as_raw_fd();
    with_handle(async |h| {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(pod_if.to_string())
            .mtu(mtu)
            .setns_by_fd(ns_fd)
            .build();
        let msg = LinkVeth::new(host_if, pod_if)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        h.link()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err(format!("creating veth {host_if} <-> {pod_if}")))
    })?;
    let wired = configure(host_if, pod_if, netns, ip, gateway);
    if wired.is_err() {
        let _ = delete_host_veth(host_if);
    }
    wired
}

fn configure(
    host_if: &str,
    pod_if: &str,
    netns: &File,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> CniResult<Wired> {
    let pod = in_netns(netns, || {
        with_handle(async |h| {
            if let Some(lo) = get_link(&h, "lo").await?
                && !lo.up
            {
                set_up(&h, lo.index, "lo").await?;
            }
            let Some(l) = get_link(&h, pod_if).await? else {
                return Err(CniError::io(
                    format!("{pod_if} did not appear in CNI_NETNS"),
                    "the veth peer is missing",
                ));
            };
            set_up(&h, l.index, pod_if).await?;
            add_address(&h, l.index, ip, pod_if).await?;
            replace_route(
                &h,
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(gateway, 32)
                    .output_interface(l.index)
                    .scope(RouteScope::Link)
                    .build(),
                &format!("{gateway} dev {pod_if} scope link"),
            )
            .await?;
            replace_route(
                &h,
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .gateway(gateway)
                    .output_interface(l.index)
                    .build(),
                &format!("default via {gateway} dev {pod_if}"),
            )
            .await?;
            Ok(l)
        })
    })?;
    let host = with_handle(async |h| {
        let Some(l) = get_link(&h, host_if).await? else {
            return Err(CniError::io(
                format!("{host_if} vanished after its creation"),
                "deleted concurrently?",
            ));
        };
        set_up(&h, l.index, host_if).await?;
        replace_route(
            &h,
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .output_interface(l.index)
                .scope(RouteScope::Link)
                .build(),
            &format!("{ip}/32 dev {host_if}"),
        )
        .await?;
        let Some(lo) = get_link(&h, "lo").await? else {
            return Err(CniError::io("the node namespace has no lo", "missing"));
        };
        if !lo.up {
            set_up(&h, lo.index, "lo").await?;
        }
        if !has_address(&h, lo.index, gateway).await? {
            add_address(&h, lo.index, gateway, "lo").await?;
        }
        Ok(l)
    })?;
    enable_ip_forward()?;
    Ok(Wired { host, pod })
}

/// net.ipv4.ip_forward=1 in the calling thread's namespace (/proc/sys/net follows the opener).
fn enable_ip_forward() -> CniResult<()> {
    let path = "/proc/sys/net/ipv4/ip_forward";
    let now =
        std::fs::read_to_string(path).map_err(|e| CniError::io(format!("reading {path}"), e))?;
    if now.trim() != "1" {
        std::fs::write(path, "1").map_err(|e| CniError::io(format!("writing 1 to {path}"), e))?;
    }
    Ok(())
}

/// Deletes the host side of a pod veth (and with it the peer and the node route). Returns
/// whether it existed.
pub fn delete_host_veth(host_if: &str) -> CniResult<bool> {
    with_handle(async |h| delete_link(&h, host_if).await)
}

/// The host veth, if it exists (node namespace).
pub fn host_link(host_if: &str) -> CniResult<Option<LinkState>> {
    with_handle(async |h| get_link(&h, host_if).await)
}

/// CHECK: everything [`setup`] made is there. Returns a message naming the first thing missing.
pub fn check(
    host_if: &str,
    pod_if: &str,
    netns: &File,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> CniResult<LinkState> {
    let fail = |m: String| {
        CniError::io(
            format!("CHECK failed: {m}"),
            "run DEL and ADD again to repair",
        )
    };
    let host = with_handle(async |h| {
        let Some(l) = get_link(&h, host_if).await? else {
            return Err(fail(format!("host veth {host_if} does not exist")));
        };
        if !l.is_veth {
            return Err(fail(format!("{host_if} is not a veth")));
        }
        if !l.up {
            return Err(fail(format!("{host_if} is down")));
        }
        let rs = routes(&h).await?;
        if !rs
            .iter()
            .any(|r| r.dst == ip && r.prefix == 32 && r.oif == Some(l.index))
        {
            return Err(fail(format!("the node has no route {ip}/32 dev {host_if}")));
        }
        let lo = get_link(&h, "lo").await?;
        match lo {
            Some(lo) if has_address(&h, lo.index, gateway).await? => {}
            _ => {
                return Err(fail(format!(
                    "the gateway {gateway}/32 is not on the node's lo"
                )));
            }
        }
        Ok(l)
    })?;
    let pod = in_netns(netns, || {
        with_handle(async |h| {
            let Some(l) = get_link(&h, pod_if).await? else {
                return Err(fail(format!("{pod_if} does not exist in CNI_NETNS")));
            };
            if !l.up {
                return Err(fail(format!("{pod_if} is down")));
            }
            if !has_address(&h, l.index, ip).await? {
                return Err(fail(format!("{pod_if} does not hold {ip}/32")));
            }
            let rs = routes(&h).await?;
            if !rs.iter().any(|r| {
                r.dst == gateway
                    && r.prefix == 32
                    && r.oif == Some(l.index)
                    && r.scope == RouteScope::Link
            }) {
                return Err(fail(format!(
                    "the pod has no route {gateway} dev {pod_if} scope link"
                )));
            }
            if !rs
                .iter()
                .any(|r| r.prefix == 0 && r.gateway == Some(gateway) && r.oif == Some(l.index))
            {
                return Err(fail(format!(
                    "the pod has no route default via {gateway} dev {pod_if}"
                )));
            }
            Ok(l)
        })
    })?;
    if host.peer_index != Some(pod.index) || pod.peer_index != Some(host.index) {
        return Err(fail(format!(
            "{host_if} and {pod_if} in CNI_NETNS are not the two ends of one veth"
        )));
    }
    Ok(host)
}
