//! skiff's eBPF datapath (kernel side). Built for bpfel-unknown-none by userspace/datapath's
//! build.rs; the maps' keys and values come from skiff-ebpf-common.
//!
//! Two layers of ClusterIP load balancing:
//! - socket level (cgroup v2 connect4/sendmsg4/recvmsg4/getpeername4): the VIP is replaced by a
//!   backend at connect()/sendmsg() time, so established flows pay no per-packet NAT; the VIP is
//!   remembered per socket cookie so getpeername()/recvmsg() show what the application asked for.
//! - packet level (`from_pod`, tc ingress on the host side of every pod veth, i.e. packets leaving
//!   a pod): what the socket layer did not translate (clients outside the cgroup) is DNATed with an
//!   LRU conntrack entry. The backend's replies leave the backend pod through its own veth, so they
//!   meet this same program on the backend's veth, where the reply entry reverses the NAT. A
//!   backend on another node replies through the node's uplink: the same program attached to
//!   the uplink's tc ingress reverses those replies (and DNATs external traffic to a service
//!   address without SNAT, the tc fallback for NodePort).
//!
//! Delivery: a destination that is a pod on this node (ENDPOINTS) gets `bpf_redirect_peer` to its
//! host-side veth (straight into the pod's namespace); anything else goes through `bpf_fib_lookup`
//! and `bpf_redirect_neigh`, and falls back to the stack (TC_ACT_OK) when the lookup fails.
#![no_std]
#![no_main]

use core::{mem, ptr};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
        bpf_fib_lookup, bpf_sock_addr, xdp_action,
    },
    helpers::generated as h,
    macros::{cgroup_sock_addr, classifier, map, xdp},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{SockAddrContext, TcContext, XdpContext},
};
use skiff_ebpf_common::*;

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
#[map]
static BACKEND_SLOTS: HashMap<BackendSlotKey, u32> = HashMap::pinned(MAX_BACKEND_SLOTS, 0);
#[map]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, 0);
#[map]
static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(MAX_CONNTRACK, 0);
#[map]
static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::pinned(MAX_SOCK_REVNAT, 0);
#[map]
static SOCK_FLOWS: LruHashMap<SockFlowKey, u32> = LruHashMap::pinned(MAX_SOCK_FLOWS, 0);
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);
#[map]
static ENDPOINTS: HashMap<Addr, EndpointValue> = HashMap::pinned(MAX_ENDPOINTS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);
#[map]
static MAGLEV: HashMap<u32, MaglevTable> = HashMap::pinned(MAX_MAGLEV_SERVICES, 0);
#[map]
static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);
#[map]
static POLICY: LpmTrie<PolicyKey, u8> = LpmTrie::pinned(MAX_POLICY_RULES, 0);
/// UDP flows NetworkPolicy already allowed, both directions (TCP uses the SYN flag instead).
#[map]
static POLICY_CT: LruHashMap<CtKey, u8> = LruHashMap::pinned(MAX_POLICY_CT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP_RAW: u16 = 0x0800u16.to_be();
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const AF_INET: u8 = 2;

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { h::bpf_ktime_get_ns() }
}

/// Picks a backend for a new flow: the affine one if ClientIP affinity holds and it is still
/// active, otherwise a random active slot (terminating backends have no slot).
#[inline(always)]
/// Makes sure the reply entry of an established forward flow points back at that flow's VIP.
/// A client that reuses a source port for another Service with the same backend rewrites the
/// shared reply tuple (backend -> client:port); when the older forward entry is used again
/// (the port reused once more for the first Service, within the LRU's memory), its replies
/// would be reverse-NATed to the wrong VIP and the client would drop them. One lookup per
/// forward packet on the tc/XDP path (the socket layer takes most flows off it).
#[inline(always)]
fn ensure_reply(rkey: &CtKey, fwd: &CtValue, now: u64) {
    let same = match unsafe { CONNTRACK.get(rkey) } {
        Some(r) => {
            r.orig_addr == fwd.orig_addr
                && r.orig_port == fwd.orig_port
                && r.client_addr == fwd.client_addr
        }
        None => false,
    };
    if !same {
        let rev = CtValue {
            flags: CT_F_REPLY | (fwd.flags & (CT_F_HAIRPIN | CT_F_SNAT)),
            last_seen_ns: now,
            ..*fwd
        };
        let _ = CONNTRACK.insert(rkey, &rev, 0);
    }
}

/// A flow that is no Service's (pod to pod by IP) whose reply tuple is still the reply entry of
/// an earlier Service flow: the client reused its source port for a direct connection to that
/// flow's backend. The old entry would reverse-NAT the new flow's replies to the VIP and the
/// client would drop them, so it goes. Checked on a TCP SYN (a new connection) and on every UDP
/// packet (no handshake says which is new). If the Service flow is still in use, its next
/// forward packet puts the entry back (`ensure_reply`).
///
/// Only for packets that a local pod sends from its own veth: the ENDPOINTS entry of the source
/// address names that veth's ifindex. The same program runs on the node uplink (and the VXLAN
/// device), where a translated NodePort SYN that XDP passed, or a DSR SYN from another node,
/// is a "non-Service SYN" whose reply entry was made a moment ago for exactly this flow:
/// dropping it there broke NodePort (77feeb1, reverted in 0fd613e). Why this check rather than
/// a second tc program for the uplink or a "who made it" flag in CtValue: ENDPOINTS already
/// holds the veth's ifindex (one lookup, done only once a stale-looking entry is found), nothing
/// changes in what userspace or skiff-cni attach, and the condition is the bug's own
/// precondition (the stale entry's destination is a local pod, whose packets enter here).
#[inline(always)]
fn forget_stale_reply(
    ctx: &TcContext,
    l4: usize,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
) -> Result<(), i64> {
    if proto == PROTO_TCP {
        let flags: u8 = ctx.load(l4 + 13)?;
        // SYN without ACK.
        if flags & 0x12 != 0x02 {
            return Ok(());
        }
    }
    let rkey = CtKey {
        src: Addr::v4_raw(daddr),
        dst: Addr::v4_raw(saddr),
        sport: dport,
        dport: sport,
        proto,
        _pad: [0; 3],
    };
    let stale = match unsafe { CONNTRACK.get(&rkey) } {
        Some(r) => r.flags & CT_F_REPLY != 0,
        None => false,
    };
    if !stale {
        return Ok(());
    }
    // SAFETY: the context's skb pointer is valid for this program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let from_own_veth = match unsafe { ENDPOINTS.get(&Addr::v4_raw(saddr)) } {
        Some(ep) => ep.host_ifindex == ifindex,
        None => false,
    };
    if from_own_veth {
        let _ = CONNTRACK.remove(&rkey);
        count(counter::STALE_REPLY_DROPPED);
    }
    Ok(())
}

/// The backend's node of a DSR flow: a packet from another node's NodePort (see
/// `push_dsr_option`) to a pod here, still with the client's source address, names the
/// service address it was sent to. Its reply entry (backend -> client) makes `from_pod` on the
/// pod's veth put that address back as the replies' source; they then go to the client by FIB
/// lookup, never through the entry node.
///
/// Only for a destination that is a pod on this node and a source that is not one: a local
/// pod must not make another pod's replies leave from an address of its choosing.
///
/// The option stays in the packet: the pod's kernel ignores an IP option type it does not
/// know (Linux rejects unknown options only on packets it builds itself) and TCP does not echo
/// it, the L4 checksum does not cover it, and stripping it would move the headers with
/// bpf_skb_adjust_room for nothing the pod needs. A raw socket in the pod can see it.
#[inline(always)]
fn accept_dsr(
    ctx: &TcContext,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    now: u64,
) -> Result<(), i64> {
    let opt_type: u8 = ctx.load(ETH_HLEN + 20)?;
    let opt_len: u8 = ctx.load(ETH_HLEN + 21)?;
    if opt_type != DSR_OPT_TYPE || opt_len as usize != DSR_OPT_LEN {
        return Ok(());
    }
    if unsafe { ENDPOINTS.get(&Addr::v4_raw(daddr)) }.is_none()
        || unsafe { ENDPOINTS.get(&Addr::v4_raw(saddr)) }.is_some()
    {
        return Ok(());
    }
    let vport: u16 = ctx.load(ETH_HLEN + 22)?;
    let vip: u32 = ctx.load(ETH_HLEN + 24)?;
    let rkey = CtKey {
        src: Addr::v4_raw(daddr),
        dst: Addr::v4_raw(saddr),
        sport: dport,
        dport: sport,
        proto,
        _pad: [0; 3],
    };
    // UDP brings the option on every datagram: write only what changed, else just refresh.
    if let Some(r) = CONNTRACK.get_ptr_mut(&rkey) {
        let rv = unsafe { *r };
        if rv.flags & CT_F_DSR != 0 && rv.orig_addr.v4_word() == vip && rv.orig_port == vport {
            unsafe { (*r).last_seen_ns = now };
            return Ok(());
        }
    }
    let rev = CtValue {
        // Backend ids are this node's own numbering of its Services' backends; the entry
        // node's id means nothing here, and the entry does not need one.
        backend_id: 0,
        flags: CT_F_REPLY | CT_F_DSR,
        orig_port: vport,
        orig_addr: Addr::v4_raw(vip),
        client_addr: Addr::v4_raw(saddr),
        last_seen_ns: now,
    };
    let _ = CONNTRACK.insert(&rkey, &rev, 0);
    count(counter::DSR_ACCEPT);
    Ok(())
}

fn select_backend(
    svc: &ServiceValue,
    aff_kind: u32,
    client: Addr,
    now: u64,
) -> Option<(u32, Backend)> {
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let aff_key = AffinityKey {
        service_id: svc.service_id,
        kind: aff_kind,
        client,
    };
    if affinity {
        if let Some(a) = AFFINITY.get_ptr_mut(&aff_key) {
            // SAFETY: pointer from a map lookup, valid for this program run.
            let a_val = unsafe { *a };
            let timeout = svc.affinity_timeout_s as u64 * 1_000_000_000;
            if now.wrapping_sub(a_val.last_used_ns) <= timeout {
                if let Some(b) = unsafe { BACKENDS.get(&a_val.backend_id) } {
                    if b.state == BACKEND_ACTIVE && b.service_id == svc.service_id {
                        unsafe { (*a).last_used_ns = now };
                        return Some((a_val.backend_id, *b));
                    }
                }
            }
        }
    }
    let n = svc.backend_count;
    if n == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let slot = unsafe { h::bpf_get_prandom_u32() } % n;
    let id = unsafe {
        *BACKEND_SLOTS.get(&BackendSlotKey {
            service_id: svc.service_id,
            slot,
        })?
    };
    let b = unsafe { *BACKENDS.get(&id)? };
    if affinity {
        let _ = AFFINITY.insert(
            &aff_key,
            &AffinityValue {
                backend_id: id,
                _pad: 0,
                last_used_ns: now,
            },
            0,
        );
    }
    Some((id, b))
}

// ---------------------------------------------------------------------------------------------
// Socket layer
// ---------------------------------------------------------------------------------------------

/// connect()/sendmsg(): VIP -> backend. Returns false when the service has no backend (the
/// syscall then fails with EPERM instead of sending into the void).
#[inline(always)]
fn sock_translate(ctx: &SockAddrContext) -> bool {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // Volatile reads: keep clang from merging adjacent u32 context fields into one u64 load,
    // which the verifier rejects.
    let (ip, port_raw, proto) = unsafe {
        (
            ptr::read_volatile(&(*sa).user_ip4),
            ptr::read_volatile(&(*sa).user_port),
            ptr::read_volatile(&(*sa).protocol),
        )
    };
    let proto = proto as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return true;
    }
    let port = port_raw as u16;
    let key = ServiceKey {
        addr: Addr::v4_raw(ip),
        port,
        proto,
        scope: SCOPE_INTERNAL,
    };
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
        return true;
    };
    let svc = *svc;
    // SAFETY: ctx pointer is the program's context, valid for these helpers.
    let netns = unsafe { h::bpf_get_netns_cookie(ctx.as_ptr()) };
    let client = Addr {
        w: [netns as u32, (netns >> 32) as u32, 0, 0],
    };
    // SAFETY: ctx pointer is the program's context, valid for this helper.
    let cookie = unsafe { h::bpf_get_socket_cookie(ctx.as_ptr()) };
    let flow_key = SockFlowKey {
        cookie,
        frontend: key,
        _pad: 0,
    };
    // UDP: a socket keeps sending to the backend it got first, while that backend exists.
    let mut pinned: Option<Backend> = None;
    if proto == PROTO_UDP {
        if let Some(id) = unsafe { SOCK_FLOWS.get(&flow_key) } {
            if let Some(b) = unsafe { BACKENDS.get(id) } {
                if b.service_id == svc.service_id {
                    pinned = Some(*b);
                }
            }
        }
    }
    let b = match pinned {
        Some(b) => b,
        None => {
            let Some((id, b)) = select_backend(&svc, AFF_KIND_NETNS_COOKIE, client, now_ns())
            else {
                count(counter::NO_BACKEND);
                return false;
            };
            if proto == PROTO_UDP {
                let _ = SOCK_FLOWS.insert(&flow_key, &id, 0);
            }
            b
        }
    };
    unsafe {
        ptr::write_volatile(&mut (*sa).user_ip4, b.addr.v4_word());
        ptr::write_volatile(&mut (*sa).user_port, b.port as u32);
    }
    let rk = SockRevKey {
        cookie,
        backend_addr: b.addr,
        backend_port: b.port,
        _pad: [0; 6],
    };
    let rv = SockRevValue {
        orig_addr: key.addr,
        orig_port: port,
        proto,
        _pad: 0,
        service_id: svc.service_id,
    };
    let _ = SOCK_REVNAT.insert(&rk, &rv, 0);
    count(counter::SOCK_XLATE);
    true
}

/// recvmsg()/getpeername(): backend -> the VIP the socket asked for.
#[inline(always)]
fn sock_reverse(ctx: &SockAddrContext) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (ip, port_raw) = unsafe {
        (
            ptr::read_volatile(&(*sa).user_ip4),
            ptr::read_volatile(&(*sa).user_port),
        )
    };
    let cookie = unsafe { h::bpf_get_socket_cookie(ctx.as_ptr()) };
    let rk = SockRevKey {
        cookie,
        backend_addr: Addr::v4_raw(ip),
        backend_port: port_raw as u16,
        _pad: [0; 6],
    };
    if let Some(v) = unsafe { SOCK_REVNAT.get(&rk) } {
        let (addr, port) = (v.orig_addr.v4_word(), v.orig_port);
        unsafe {
            ptr::write_volatile(&mut (*sa).user_ip4, addr);
            ptr::write_volatile(&mut (*sa).user_port, port as u32);
        }
        count(counter::SOCK_REVNAT);
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    if sock_translate(&ctx) { 1 } else { 0 }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    if sock_translate(&ctx) { 1 } else { 0 }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_reverse(&ctx);
    1
}

// ---------------------------------------------------------------------------------------------
// Packet layer
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn l4_csum_off(l4: usize, proto: u8) -> (usize, u64) {
    if proto == PROTO_TCP {
        (l4 + 16, 0)
    } else {
        (l4 + 6, BPF_F_MARK_MANGLED_0 as u64)
    }
}

/// Rewrites the IPv4 address at `ip_off` and fixes the IP and L4 (pseudo-header) checksums.
#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    ip_off: usize,
    l4: usize,
    proto: u8,
    old: u32,
    new: u32,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.store(ip_off, &new, 0)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)?;
    if proto == PROTO_TCP || proto == PROTO_UDP {
        let (off, extra) = l4_csum_off(l4, proto);
        ctx.l4_csum_replace(
            off,
            old as u64,
            new as u64,
            BPF_F_PSEUDO_HDR as u64 | extra | 4,
        )?;
    }
    Ok(())
}

/// Rewrites the L4 port at `port_off` and fixes the L4 checksum.
#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    port_off: usize,
    l4: usize,
    proto: u8,
    old: u16,
    new: u16,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.store(port_off, &new, 0)?;
    let (off, extra) = l4_csum_off(l4, proto);
    ctx.l4_csum_replace(off, old as u64, new as u64, extra | 2)?;
    Ok(())
}

/// Whether POLICY allows `endpoint` to talk to `peer` on (proto, port): any of the (proto,
/// port), (proto, any), (any, any) entries whose longest matching peer prefix says ALLOW.
#[inline(always)]
fn policy_allows(direction: u8, endpoint: u32, peer: u32, proto: u8, port: u16) -> bool {
    for (p, pt) in [(proto, port), (proto, 0), (0, 0)] {
        let key = LpmKey::new(
            POLICY_FIXED_BITS + 32,
            PolicyKey {
                direction,
                proto: p,
                port: pt,
                endpoint,
                peer,
            },
        );
        if let Some(v) = POLICY.get(&key) {
            if *v == POLICY_ALLOW {
                return true;
            }
        }
    }
    false
}

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(verdict) => verdict,
        Err(_) => {
            count(counter::ERRORS);
            TC_ACT_OK
        }
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, i64> {
    count(counter::PACKETS);
    let eth_proto: u16 = ctx.load(12)?;
    if eth_proto != ETH_P_IP_RAW {
        return Ok(TC_ACT_OK);
    }
    let vihl: u8 = ctx.load(ETH_HLEN)?;
    if vihl >> 4 != 4 {
        return Ok(TC_ACT_OK);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Ok(TC_ACT_OK);
    }
    let frag: u16 = ctx.load(ETH_HLEN + 6)?;
    let proto: u8 = ctx.load(ETH_HLEN + 9)?;
    let saddr: u32 = ctx.load(IP_SRC_OFF)?;
    let daddr: u32 = ctx.load(IP_DST_OFF)?;
    let l4 = ETH_HLEN + ihl;
    // Only unfragmented TCP/UDP is translated (a non-first fragment carries no ports).
    let nat_capable =
        (proto == PROTO_TCP || proto == PROTO_UDP) && (u16::from_be(frag) & 0x3fff) == 0;

    let mut final_dst = daddr;
    if nat_capable {
        let sport: u16 = ctx.load(l4)?;
        let dport: u16 = ctx.load(l4 + 2)?;
        let now = now_ns();
        let key = CtKey {
            src: Addr::v4_raw(saddr),
            dst: Addr::v4_raw(daddr),
            sport,
            dport,
            proto,
            _pad: [0; 3],
        };
        if ihl == 20 + DSR_OPT_LEN {
            accept_dsr(ctx, proto, saddr, daddr, sport, dport, now)?;
        }
        let mut handled = false;
        if let Some(ct) = CONNTRACK.get_ptr_mut(&key) {
            // SAFETY: pointer from a map lookup, valid for this program run.
            let ct_val = unsafe { *ct };
            unsafe { (*ct).last_seen_ns = now };
            let hairpin = ct_val.flags & CT_F_HAIRPIN != 0;
            let restore_client = ct_val.flags & (CT_F_HAIRPIN | CT_F_SNAT) != 0;
            if ct_val.flags & CT_F_REPLY != 0 {
                // Reply from a backend: source back to the VIP.
                rewrite_addr(ctx, IP_SRC_OFF, l4, proto, saddr, ct_val.orig_addr.v4_word())?;
                rewrite_port(ctx, l4, l4, proto, sport, ct_val.orig_port)?;
                if restore_client {
                    final_dst = ct_val.client_addr.v4_word();
                    rewrite_addr(ctx, IP_DST_OFF, l4, proto, daddr, final_dst)?;
                }
                count(counter::REVNAT);
                handled = true;
            } else if let Some(b) = unsafe { BACKENDS.get(&ct_val.backend_id) } {
                // Established flow: same backend, even if it is now terminating.
                let reply_dst = if hairpin { ip4_to_raw(HAIRPIN_SNAT_V4) } else { saddr };
                ensure_reply(
                    &CtKey {
                        src: b.addr,
                        dst: Addr::v4_raw(reply_dst),
                        sport: b.port,
                        dport: sport,
                        proto,
                        _pad: [0; 3],
                    },
                    &ct_val,
                    now,
                );
                final_dst = b.addr.v4_word();
                rewrite_addr(ctx, IP_DST_OFF, l4, proto, daddr, final_dst)?;
                rewrite_port(ctx, l4 + 2, l4, proto, dport, b.port)?;
                if hairpin {
                    rewrite_addr(
                        ctx,
                        IP_SRC_OFF,
                        l4,
                        proto,
                        saddr,
                        ip4_to_raw(HAIRPIN_SNAT_V4),
                    )?;
                }
                count(counter::DNAT);
                handled = true;
            } else {
                // Its backend is gone: forget the flow and pick again below.
                let _ = CONNTRACK.remove(&key);
            }
        }
        if !handled {
            let skey = ServiceKey {
                addr: Addr::v4_raw(daddr),
                port: dport,
                proto,
                scope: SCOPE_INTERNAL,
            };
            if let Some(svc) = unsafe { SERVICES.get(&skey) } {
                let svc = *svc;
                count(counter::SVC_HIT);
                let Some((id, b)) = select_backend(&svc, AFF_KIND_ADDR, Addr::v4_raw(saddr), now)
                else {
                    count(counter::NO_BACKEND);
                    return Ok(TC_ACT_SHOT);
                };
                let hairpin = b.addr.v4_word() == saddr;
                let new_src = if hairpin {
                    ip4_to_raw(HAIRPIN_SNAT_V4)
                } else {
                    saddr
                };
                let hp_flag = if hairpin { CT_F_HAIRPIN } else { 0 };
                let fwd = CtValue {
                    backend_id: id,
                    flags: CT_F_FORWARD | hp_flag,
                    orig_port: dport,
                    orig_addr: Addr::v4_raw(daddr),
                    client_addr: Addr::v4_raw(saddr),
                    last_seen_ns: now,
                };
                let rkey = CtKey {
                    src: b.addr,
                    dst: Addr::v4_raw(new_src),
                    sport: b.port,
                    dport: sport,
                    proto,
                    _pad: [0; 3],
                };
                let rev = CtValue {
                    flags: CT_F_REPLY | hp_flag,
                    ..fwd
                };
                let _ = CONNTRACK.insert(&rkey, &rev, 0);
                let _ = CONNTRACK.insert(&key, &fwd, 0);
                count(counter::CT_CREATE);
                final_dst = b.addr.v4_word();
                rewrite_addr(ctx, IP_DST_OFF, l4, proto, daddr, final_dst)?;
                rewrite_port(ctx, l4 + 2, l4, proto, dport, b.port)?;
                if hairpin {
                    rewrite_addr(ctx, IP_SRC_OFF, l4, proto, saddr, new_src)?;
                    count(counter::HAIRPIN);
                }
                count(counter::DNAT);
            } else {
                forget_stale_reply(ctx, l4, proto, saddr, daddr, sport, dport)?;
            }
        }
    }

    // NetworkPolicy, on the translated packet (policies name pods, not VIPs). Only new flows
    // are judged: a TCP SYN, or a UDP tuple not yet in POLICY_CT; replies and later packets of
    // an allowed flow pass. Egress is judged for the sending pod here; ingress for a receiving
    // pod on this node (a receiver on another node is judged by that node's from_pod... once a
    // to-pod hook exists: not yet). Other protocols are not policed.
    if nat_capable {
        let src_now: u32 = ctx.load(IP_SRC_OFF)?;
        let sport_now: u16 = ctx.load(l4)?;
        let dport_now: u16 = ctx.load(l4 + 2)?;
        let src_flags = unsafe { ENDPOINTS.get(&Addr::v4_raw(src_now)) }
            .map(|e| e.flags)
            .unwrap_or(0);
        let dst_flags = unsafe { ENDPOINTS.get(&Addr::v4_raw(final_dst)) }
            .map(|e| e.flags)
            .unwrap_or(0);
        let egress_iso = src_flags & EP_F_EGRESS_ISOLATED != 0;
        let ingress_iso = dst_flags & EP_F_INGRESS_ISOLATED != 0;
        if egress_iso || ingress_iso {
            let tuple = CtKey {
                src: Addr::v4_raw(src_now),
                dst: Addr::v4_raw(final_dst),
                sport: sport_now,
                dport: dport_now,
                proto,
                _pad: [0; 3],
            };
            let new_flow = if proto == PROTO_TCP {
                let tcp_flags: u8 = ctx.load(l4 + 13)?;
                tcp_flags & 0x12 == 0x02 // SYN without ACK
            } else {
                unsafe { POLICY_CT.get(&tuple) }.is_none()
            };
            if new_flow {
                if (egress_iso
                    && !policy_allows(POLICY_EGRESS, src_now, final_dst, proto, dport_now))
                    || (ingress_iso
                        && !policy_allows(POLICY_INGRESS, final_dst, src_now, proto, dport_now))
                {
                    count(counter::POLICY_DENIED);
                    return Ok(TC_ACT_SHOT);
                }
                if proto == PROTO_UDP {
                    let reply = CtKey {
                        src: tuple.dst,
                        dst: tuple.src,
                        sport: tuple.dport,
                        dport: tuple.sport,
                        proto,
                        _pad: [0; 3],
                    };
                    let _ = POLICY_CT.insert(&tuple, &1, 0);
                    let _ = POLICY_CT.insert(&reply, &1, 0);
                }
            }
        }
    }

    // Delivery.
    if let Some(ep) = unsafe { ENDPOINTS.get(&Addr::v4_raw(final_dst)) } {
        let ep = *ep;
        if ep.pod_mac != [0u8; 6] {
            ctx.store(0, &ep.pod_mac, 0)?;
            ctx.store(6, &ep.host_mac, 0)?;
        }
        count(counter::REDIRECT_PEER);
        // SAFETY: helper taking plain integers.
        return Ok(unsafe { h::bpf_redirect_peer(ep.host_ifindex, 0) } as i32);
    }
    let src_now: u32 = ctx.load(IP_SRC_OFF)?;
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of integers).
    let mut fib: bpf_fib_lookup = unsafe { mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    // tot_len stays 0: with it set, 64 KB GSO packets get FRAG_NEEDED (ebpf-here.md gotcha 3).
    fib.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    fib.__bindgen_anon_3.ipv4_src = src_now;
    fib.__bindgen_anon_4.ipv4_dst = final_dst;
    let rc = unsafe {
        h::bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // NO_NEIGH: a route exists but the next hop's MAC is not resolved yet. bpf_redirect_neigh
    // resolves it itself (the packet waits in the neighbour queue), so it goes the same way.
    // Left to the stack instead, a NodePort packet whose source XDP set to this node's own
    // address (SNAT) or a DSR packet would be dropped there as a martian, and nothing would
    // ever resolve the neighbour (found by the DSR lab test on a fresh segment).
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 || rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        count(counter::REDIRECT_NEIGH);
        return Ok(unsafe { h::bpf_redirect_neigh(fib.ifindex, ptr::null_mut(), 0, 0) } as i32);
    }
    count(counter::FIB_PASS);
    Ok(TC_ACT_OK)
}

// ---------------------------------------------------------------------------------------------
// Node uplink: NodePort with XDP
// ---------------------------------------------------------------------------------------------
//
// Client -> node_ip:node_port arrives on the uplink. The backend is chosen by Maglev over the
// flow's 5-tuple (every node computes the same table, so a flow lands on the same backend
// whichever node an external balancer sends it to), remembered in CONNTRACK, and the packet is
// DNATed to the backend and SNATed to NODE_CONFIG.nodeport_snat, then passed to the stack, which
// forwards it to the pod. The backend's reply leaves through its veth, where `from_pod` finds
// the reply entry (CT_F_SNAT) and restores node_ip:node_port -> client, then sends it out by
// FIB lookup. XDP has no checksum helpers: checksums are updated incrementally (RFC 1624),
// which is correct for packets with a complete checksum, as a NIC delivers them. (A veth whose
// sender offloads checksums delivers CHECKSUM_PARTIAL packets; the lab turns that off.)
//
// With NODE_F_LB_DSR (the agent's `--lb-mode dsr`) a flow to a backend on another node keeps
// the client's address and its opening packets carry the service address in an IPv4 option
// (`push_dsr_option`); the backend's node reads it (`accept_dsr` in from_pod on its uplink) and
// its from_pod on the pod's veth sends the replies to the client from the service address.

const XDP_PASS: u32 = xdp_action::XDP_PASS;
const XDP_DROP: u32 = xdp_action::XDP_DROP;

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn csum_fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624 incremental update for a 32-bit field (byte-order agnostic: the one's complement
/// sum is the same whichever order the words are read in, as long as it is consistent).
#[inline(always)]
fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let mut s = (!csum) as u32;
    s += (!old & 0xffff) + (!old >> 16);
    s += (new & 0xffff) + (new >> 16);
    !csum_fold(s)
}

#[inline(always)]
fn csum_replace2(csum: u16, old: u16, new: u16) -> u16 {
    let s = (!csum) as u32 + (!old) as u32 + new as u32;
    !csum_fold(s)
}

#[xdp]
pub fn nodeport(ctx: XdpContext) -> u32 {
    try_nodeport(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn try_nodeport(ctx: &XdpContext) -> Option<u32> {
    let eth_proto = unsafe { *ptr_at::<u16>(ctx, 12)? };
    if eth_proto != ETH_P_IP_RAW {
        return Some(XDP_PASS);
    }
    // Only option-less IPv4 headers: the fixed offsets keep the verifier simple.
    let vihl = unsafe { *ptr_at::<u8>(ctx, ETH_HLEN)? };
    if vihl != 0x45 {
        return Some(XDP_PASS);
    }
    let frag = unsafe { *ptr_at::<u16>(ctx, ETH_HLEN + 6)? };
    let proto = unsafe { *ptr_at::<u8>(ctx, ETH_HLEN + 9)? };
    if (proto != PROTO_TCP && proto != PROTO_UDP) || (u16::from_be(frag) & 0x3fff) != 0 {
        return Some(XDP_PASS);
    }
    let saddr_p = ptr_at::<u32>(ctx, IP_SRC_OFF)?;
    let daddr_p = ptr_at::<u32>(ctx, IP_DST_OFF)?;
    let ipcsum_p = ptr_at::<u16>(ctx, IP_CSUM_OFF)?;
    let l4 = ETH_HLEN + 20;
    let sport_p = ptr_at::<u16>(ctx, l4)?;
    let dport_p = ptr_at::<u16>(ctx, l4 + 2)?;
    let l4csum_p = if proto == PROTO_TCP {
        ptr_at::<u16>(ctx, l4 + 16)?
    } else {
        ptr_at::<u16>(ctx, l4 + 6)?
    };
    let (saddr, daddr, sport, dport) = unsafe { (*saddr_p, *daddr_p, *sport_p, *dport_p) };

    let node_cfg = NODE_CONFIG.get(0)?;
    let snat_cfg = node_cfg.nodeport_snat.v4_word();
    let dsr_mode = node_cfg.flags & NODE_F_LB_DSR != 0;
    // TCP: only the SYN carries the DSR option (the backend's node keeps what it says in its
    // conntrack), so full-size segments never grow past the MTU; UDP has no handshake to say
    // which datagram is first, so every one carries it.
    let tcp_syn = proto == PROTO_TCP && {
        let flags = unsafe { *ptr_at::<u8>(ctx, l4 + 13)? };
        flags & 0x12 == 0x02
    };
    let now = now_ns();
    let key = CtKey {
        src: Addr::v4_raw(saddr),
        dst: Addr::v4_raw(daddr),
        sport,
        dport,
        proto,
        _pad: [0; 3],
    };
    // (backend, source address after translation, whether the flow is DSR)
    let mut chosen: Option<(Backend, u32, bool)> = None;
    if let Some(ct) = CONNTRACK.get_ptr_mut(&key) {
        let ct_val = unsafe { *ct };
        if ct_val.flags & CT_F_FORWARD != 0 {
            if let Some(b) = unsafe { BACKENDS.get(&ct_val.backend_id) } {
                unsafe { (*ct).last_seen_ns = now };
                if ct_val.flags & CT_F_DSR != 0 {
                    // Its replies leave from the backend's node: no reply entry here.
                    chosen = Some((*b, saddr, true));
                } else {
                let src = if ct_val.flags & CT_F_SNAT != 0 {
                    snat_cfg
                } else {
                    saddr
                };
                ensure_reply(
                    &CtKey {
                        src: b.addr,
                        dst: Addr::v4_raw(src),
                        sport: b.port,
                        dport: sport,
                        proto,
                        _pad: [0; 3],
                    },
                    &ct_val,
                    now,
                );
                chosen = Some((*b, src, false));
                }
            }
        }
    }
    let (b, new_saddr, dsr) = match chosen {
        Some(c) => c,
        None => {
            let skey = ServiceKey {
                addr: Addr::v4_raw(daddr),
                port: dport,
                proto,
                scope: SCOPE_INTERNAL,
            };
            let svc = unsafe { *SERVICES.get(&skey)? };
            let table = MAGLEV.get_ptr(&svc.service_id)?;
            if svc.backend_count == 0 {
                count(counter::NO_BACKEND);
                return Some(XDP_DROP);
            }
            let idx = (flow_hash(saddr, daddr, sport, dport, proto) as usize) % MAGLEV_M;
            // LLVM turns `% M` into multiply-and-shift, whose range the verifier cannot follow,
            // and then drops the bounds check it can prove redundant; a volatile read hides the
            // value so the explicit check stays and bounds the map-value access.
            let idx = unsafe { ptr::read_volatile(&idx) };
            if idx >= MAGLEV_M {
                return None;
            }
            let id = unsafe { *(*table).ids.get(idx)? };
            let b = unsafe { *BACKENDS.get(&id)? };
            // externalTrafficPolicy=Local keeps the client's address (the backend is local, so
            // its reply still meets from_pod on this node); otherwise SNAT, which needs an
            // address configured.
            //
            // DSR mode keeps the client's address for every backend: one on this node replies
            // through from_pod on its veth here (as with eTP=Local), one on another node gets
            // the DSR option and replies from there.
            let keep_source = svc.flags & SVC_F_ETP_LOCAL != 0 || dsr_mode;
            if !keep_source && snat_cfg == 0 {
                return Some(XDP_PASS);
            }
            let dsr = dsr_mode && unsafe { ENDPOINTS.get(&b.addr) }.is_none();
            let (new_saddr, snat_flag) = if keep_source {
                (saddr, 0)
            } else {
                (snat_cfg, CT_F_SNAT)
            };
            let dsr_flag = if dsr { CT_F_DSR } else { 0 };
            let fwd = CtValue {
                backend_id: id,
                flags: CT_F_FORWARD | snat_flag | dsr_flag,
                orig_port: dport,
                orig_addr: Addr::v4_raw(daddr),
                client_addr: Addr::v4_raw(saddr),
                last_seen_ns: now,
            };
            let rkey = CtKey {
                src: b.addr,
                dst: Addr::v4_raw(new_saddr),
                sport: b.port,
                dport: sport,
                proto,
                _pad: [0; 3],
            };
            let rev = CtValue {
                flags: CT_F_REPLY | snat_flag,
                ..fwd
            };
            if !dsr {
                let _ = CONNTRACK.insert(&rkey, &rev, 0);
            }
            let _ = CONNTRACK.insert(&key, &fwd, 0);
            count(counter::CT_CREATE);
            (b, new_saddr, dsr)
        }
    };
    let new_daddr = b.addr.v4_word();
    unsafe {
        let mut ipc = *ipcsum_p;
        ipc = csum_replace4(ipc, daddr, new_daddr);
        if new_saddr != saddr {
            ipc = csum_replace4(ipc, saddr, new_saddr);
        }
        *ipcsum_p = ipc;
        let old_l4 = *l4csum_p;
        // UDP checksum 0 means "none": leave it.
        if !(proto == PROTO_UDP && old_l4 == 0) {
            let mut c = csum_replace4(old_l4, daddr, new_daddr);
            if new_saddr != saddr {
                c = csum_replace4(c, saddr, new_saddr);
            }
            c = csum_replace2(c, dport, b.port);
            if proto == PROTO_UDP && c == 0 {
                c = 0xffff;
            }
            *l4csum_p = c;
        }
        *daddr_p = new_daddr;
        *saddr_p = new_saddr;
        *dport_p = b.port;
    }
    count(counter::NODEPORT);
    if dsr && (tcp_syn || proto == PROTO_UDP) {
        if push_dsr_option(ctx, daddr, dport).is_none() {
            count(counter::DSR_NO_ROOM);
            return Some(XDP_DROP);
        }
        count(counter::DSR_FORWARD);
    }
    // Forwarding to the backend's node is left to tc on this uplink (FIB lookup +
    // bpf_redirect_neigh, the path SNAT mode's remote backends take): an XDP_TX/redirect here
    // would need an XDP program on the receiving veth's peer in the lab (ebpf-here.md gotcha 2).
    Some(XDP_PASS)
}

/// Inserts skiff's DSR option (DSR_OPT_TYPE: service address and port) after the IPv4 header
/// of an option-less packet: grows the packet at the front by DSR_OPT_LEN, moves the Ethernet
/// and IP headers there, sets IHL 7 and the new total length, and recomputes the IP header
/// checksum. The TCP/UDP checksum is untouched: its pseudo-header has the addresses, protocol
/// and L4 length, none of which an IP option changes. Every packet pointer taken before this
/// call is invalid after it (bpf_xdp_adjust_head moves data).
///
/// Why an IP option and not IPIP: no tunnel device exists here (no ipip module), so both ends
/// would be the programs' own work anyway, and the option is 8 bytes instead of 20, keeps the
/// packet an ordinary TCP/UDP packet to the backend that the backend's node routes, polices
/// and delivers as any other, and needs no decapsulation there (see `try_from_pod`).
#[inline(always)]
fn push_dsr_option(ctx: &XdpContext, vip: u32, vport: u16) -> Option<()> {
    // SAFETY: the program's own context; a negative delta adds headroom-backed bytes in front.
    if unsafe { h::bpf_xdp_adjust_head(ctx.ctx, -(DSR_OPT_LEN as i32)) } != 0 {
        return None;
    }
    let start = ctx.data();
    if start + ETH_HLEN + 20 + DSR_OPT_LEN > ctx.data_end() {
        return None;
    }
    // SAFETY: every access below is inside [start, start + 42), checked just above.
    unsafe {
        // Ethernet + IPv4 header (34 bytes) moved DSR_OPT_LEN towards the front, ascending:
        // each word is read before the move reaches it.
        let mut i = 0;
        while i < ETH_HLEN + 20 {
            let w = ptr::read_unaligned((start + DSR_OPT_LEN + i) as *const u16);
            ptr::write_unaligned((start + i) as *mut u16, w);
            i += 2;
        }
        let ip = start + ETH_HLEN;
        ptr::write((ip) as *mut u8, 0x45 + (DSR_OPT_LEN / 4) as u8);
        let tot = u16::from_be(ptr::read_unaligned((ip + 2) as *const u16));
        ptr::write_unaligned(
            (ip + 2) as *mut u16,
            tot.wrapping_add(DSR_OPT_LEN as u16).to_be(),
        );
        let opt = ip + 20;
        ptr::write(opt as *mut u8, DSR_OPT_TYPE);
        ptr::write((opt + 1) as *mut u8, DSR_OPT_LEN as u8);
        ptr::write_unaligned((opt + 2) as *mut u16, vport);
        ptr::write_unaligned((opt + 4) as *mut u32, vip);
        ptr::write_unaligned((ip + 10) as *mut u16, 0);
        let mut sum: u32 = 0;
        let mut j = 0;
        while j < 20 + DSR_OPT_LEN {
            sum += ptr::read_unaligned((ip + j) as *const u16) as u32;
            j += 2;
        }
        ptr::write_unaligned((ip + 10) as *mut u16, !csum_fold(sum));
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
