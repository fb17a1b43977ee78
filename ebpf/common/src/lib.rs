#![no_std]
//! Map keys and values shared by the eBPF programs (`ebpf/programs`) and the userspace loader
//! (`userspace/datapath`). Every type is `#[repr(C)]`, has no implicit padding (explicit `_pad`
//! fields, zeroed by whoever builds a key) and is `Copy`, so the kernel and userspace agree on
//! every byte and hash keys compare equal.
//!
//! Byte order: addresses and ports are stored exactly as they appear on the wire (network byte
//! order), read from the packet or from `bpf_sock_addr` as native integers. Userspace converts
//! with [`ip4_to_raw`]/[`raw_to_ip4`] and [`port_to_raw`]/[`raw_to_port`].
//!
//! IPv6 readiness: every address is an [`Addr`] of 16 bytes, always an IPv6 address: an IPv4
//! address is stored IPv4-mapped (`::ffff:a.b.c.d`, RFC 4291 2.5.5.2), so a 16-byte key names
//! one address of one family and an IPv6 program can share the maps. Build and read IPv4 only
//! through [`Addr::v4_raw`]/[`Addr::v4`] and [`Addr::v4_word`]/[`Addr::is_v4`]. `PolicyKey` and
//! [`flow_hash`] are IPv4 only (u32 words).

/// Map names, shared so userspace finds them by the same string the object declares.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const AFFINITY: &str = "AFFINITY";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const NODE_CONFIG: &str = "NODE_CONFIG";
    pub const POLICY: &str = "POLICY";
    pub const POLICY_CT: &str = "POLICY_CT";
    pub const SOCK_FLOWS: &str = "SOCK_FLOWS";
    pub const ALL: [&str; 13] = [
        SERVICES,
        BACKEND_SLOTS,
        BACKENDS,
        CONNTRACK,
        SOCK_REVNAT,
        AFFINITY,
        ENDPOINTS,
        COUNTERS,
        MAGLEV,
        NODE_CONFIG,
        POLICY,
        POLICY_CT,
        SOCK_FLOWS,
    ];
}

/// Program names (the function names in ebpf/programs).
pub mod program_names {
    pub const CONNECT4: &str = "sock_connect4";
    pub const SENDMSG4: &str = "sock_sendmsg4";
    pub const RECVMSG4: &str = "sock_recvmsg4";
    pub const GETPEERNAME4: &str = "sock_getpeername4";
    pub const FROM_POD: &str = "from_pod";
    pub const NODEPORT: &str = "nodeport";
}

/// Map sizes. Hash maps preallocate, so these are memory the node pays up front.
pub const MAX_SERVICES: u32 = 65_536;
/// 30,000 Services x 10 endpoints (the bench's largest sweep) with 75% headroom. Preallocated:
/// about 80 bytes an entry in the kernel (element header + 4-byte key + 24-byte value), so
/// ~42 MiB for BACKENDS and ~34 MiB for BACKEND_SLOTS per node.
pub const MAX_BACKENDS: u32 = 524_288;
/// One slot per Ready backend, so sized like BACKENDS.
pub const MAX_BACKEND_SLOTS: u32 = 524_288;
pub const MAX_CONNTRACK: u32 = 131_072;
pub const MAX_SOCK_REVNAT: u32 = 65_536;
pub const MAX_AFFINITY: u32 = 65_536;
pub const MAX_ENDPOINTS: u32 = 16_384;
/// Services with a Maglev table (NodePort / LoadBalancer frontends): each costs 4 KB.
pub const MAX_MAGLEV_SERVICES: u32 = 2_048;

/// Maglev lookup table size: a prime, > 100 x the backends of a service for < 1% reshuffle
/// when one changes (Cilium's rule), so good up to ~10 backends per external service; larger
/// tables are a map-format change (Cilium's default is 16381).
pub const MAGLEV_M: usize = 1021;

/// MAGLEV value: slot -> backend id, built by userspace from the service's active backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub ids: [u32; MAGLEV_M],
    pub _pad: u32,
}

/// The flow hash the NodePort program feeds to Maglev (murmur3 finaliser over the 5-tuple, raw
/// wire-order values). Shared so userspace and tests can predict a flow's slot.
#[inline(always)]
pub fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h =
        saddr ^ daddr.rotate_left(16) ^ (((sport as u32) << 16) | dport as u32) ^ proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// NODE_CONFIG[0]: per-node settings the programs read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Source address NodePort traffic is SNATed to before it reaches a backend. Replies come
    /// back through the pod's veth, where `from_pod` reverses the NAT before any routing, so the
    /// address need not be assigned to an interface (an assigned one would make the forwarded
    /// packet a martian on the uplink). Zero disables NodePort.
    pub nodeport_snat: Addr,
    /// NODE_F_* bits.
    pub flags: u32,
    pub _pad: u32,
}

/// NodeConfig.flags: NodePort / LoadBalancer / externalIPs traffic to a backend on another node
/// is sent there with the client's own source address and the service address in an IPv4
/// option ([`DSR_OPT_TYPE`]), and the backend's node answers the client directly (direct
/// server return, Cilium's `--bpf-lb-mode=dsr` with `dsr-dispatch=opt`). Clear: SNAT to
/// `nodeport_snat`, replies back through this node.
pub const NODE_F_LB_DSR: u32 = 1 << 0;

/// The IPv4 option type of skiff's DSR option: copied into fragments (0x80), class 0, number
/// 30, the value RFC 4727 sets aside for experiments, so it collides with no assigned option.
pub const DSR_OPT_TYPE: u8 = 0x9e;
/// Its length in bytes: type, length, the service port (2, wire order), the service IPv4
/// address (4). A multiple of 4, so it needs no padding and the IHL grows by exactly 2.
pub const DSR_OPT_LEN: usize = 8;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// The source address a hairpinned flow (a backend reaching itself through its own Service via
/// the tc layer) is SNATed to: without it the backend would receive a packet from its own address,
/// which the kernel drops as a martian. Link-local, never routed off the node (Cilium uses the
/// same idea with 169.254.42.1).
pub const HAIRPIN_SNAT_V4: [u8; 4] = [169, 254, 42, 1];

/// A 16-byte IPv6 address in network byte order (`w[0]` holds bytes 0-3). IPv4 is stored
/// IPv4-mapped: bytes 0-9 zero, bytes 10-11 0xff, the IPv4 address in bytes 12-15 (`w[3]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub w: [u32; 4],
}

/// `w[2]` of an IPv4-mapped address: bytes 8-11 are 00 00 ff ff on the wire.
pub const V4_MAPPED_W2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// The IPv4-mapped address of `raw` (the IPv4 address as read from a packet).
    pub const fn v4_raw(raw: u32) -> Self {
        Addr { w: [0, 0, V4_MAPPED_W2, raw] }
    }
    /// The IPv4 address (as read from a packet) of an IPv4-mapped address; meaningful only
    /// when [`Addr::is_v4`].
    pub const fn v4_word(&self) -> u32 {
        self.w[3]
    }
    /// Whether this is an IPv4-mapped address, i.e. an IPv4 address.
    pub const fn is_v4(&self) -> bool {
        self.w[0] == 0 && self.w[1] == 0 && self.w[2] == V4_MAPPED_W2
    }
    /// Bytes in network order, as `std::net::Ipv6Addr::from` takes them.
    pub const fn to_bytes(&self) -> [u8; 16] {
        let (a, b, c, d) = (
            self.w[0].to_ne_bytes(),
            self.w[1].to_ne_bytes(),
            self.w[2].to_ne_bytes(),
            self.w[3].to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3],
        ]
    }
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Addr {
            w: [
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            ],
        }
    }
    pub const fn v4(octets: [u8; 4]) -> Self {
        Addr::v4_raw(ip4_to_raw(octets))
    }
}

/// IPv4 octets -> the u32 the kernel sees when it reads the address from a packet.
pub const fn ip4_to_raw(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}
pub const fn raw_to_ip4(raw: u32) -> [u8; 4] {
    raw.to_ne_bytes()
}
/// Host-order port -> the u16 the kernel sees on the wire.
pub const fn port_to_raw(port: u16) -> u16 {
    port.to_be()
}
pub const fn raw_to_port(raw: u16) -> u16 {
    u16::from_be(raw)
}

/// Which kind of frontend a service key is: ClusterIP traffic from inside the cluster, or
/// external traffic (NodePort / LoadBalancer / externalIPs) whose eTP=Local view may differ.
pub const SCOPE_INTERNAL: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// SERVICES key: the frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// ServiceValue.flags bits.
pub const SVC_F_AFFINITY: u16 = 1 << 0;
pub const SVC_F_ETP_LOCAL: u16 = 1 << 1;
pub const SVC_F_ITP_LOCAL: u16 = 1 << 2;

/// SERVICES value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Identifies the service in BACKEND_SLOTS, AFFINITY and BACKENDS.service_id. Never 0.
    pub service_id: u32,
    /// Number of ACTIVE backends, in slots 0..backend_count. Terminating backends get no slot,
    /// so new flows never pick them; their established flows find them by id in BACKENDS.
    pub backend_count: u32,
    pub flags: u16,
    pub _pad: u16,
    /// ClientIP affinity timeout in seconds (used when SVC_F_AFFINITY is set).
    pub affinity_timeout_s: u32,
}

/// BACKEND_SLOTS key -> backend id (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub slot: u32,
}

pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;

/// BACKENDS value, keyed by backend id (u32, never 0). Backends are per service (the id is
/// owned by `service_id`), which keeps removal and the diff simple at the cost of one entry per
/// (service, endpoint) pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// BACKEND_ACTIVE or BACKEND_TERMINATING.
    pub state: u8,
    pub service_id: u32,
}

/// CONNTRACK key: a 5-tuple as seen on the wire at the tc hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// CtValue.flags bits.
/// Entry keyed by the client's original tuple (client -> VIP): DNAT to the backend.
pub const CT_F_FORWARD: u16 = 1 << 0;
/// Entry keyed by the backend's reply tuple (backend -> client): reverse NAT to the VIP.
pub const CT_F_REPLY: u16 = 1 << 1;
/// The flow is a hairpin (client == backend): source SNATed to HAIRPIN_SNAT_V4.
pub const CT_F_HAIRPIN: u16 = 1 << 2;
/// The flow's source was SNATed (NodePort): replies get their destination restored to
/// CtValue.client_addr (and their source to orig_addr:orig_port).
pub const CT_F_SNAT: u16 = 1 << 3;
/// Direct server return. On the entry node, a forward entry whose backend is on another node:
/// no reply entry here (the replies never come back), and the packets that open the flow
/// carry the DSR option. On the backend's node, the reply entry made from a DSR option:
/// replies get their source set to orig_addr:orig_port and go straight to the client.
pub const CT_F_DSR: u16 = 1 << 4;

/// CONNTRACK value (LRU hash: the kernel evicts the least recently used entry when full).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub backend_id: u32,
    pub flags: u16,
    /// Original frontend port (network byte order).
    pub orig_port: u16,
    /// Original frontend address (the VIP).
    pub orig_addr: Addr,
    /// For hairpin reply entries: the client's own address to restore as destination.
    pub client_addr: Addr,
    /// bpf_ktime_get_ns() of the last packet.
    pub last_seen_ns: u64,
}

/// SOCK_REVNAT key: a socket (by cookie) and the backend it was sent to. Keyed by backend too
/// because an unconnected UDP socket (sendmsg) may talk to several services at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevKey {
    pub cookie: u64,
    pub backend_addr: Addr,
    pub backend_port: u16,
    pub _pad: [u8; 6],
}

/// SOCK_FLOWS key: an unconnected UDP socket and the service frontend it sends to. The value
/// (u32) is the backend id its datagrams go to, so one socket's datagrams to one service stay
/// on one backend (what conntrack gives kube-proxy's UDP), instead of a new pick per sendmsg.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockFlowKey {
    pub cookie: u64,
    pub frontend: ServiceKey,
    pub _pad: u32,
}

pub const MAX_SOCK_FLOWS: u32 = 65_536;

/// SOCK_REVNAT value: what the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub orig_addr: Addr,
    pub orig_port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub service_id: u32,
}

/// AffinityKey.kind: who the client is.
/// The socket layer does not know the source address at connect(); it uses the netns cookie,
/// which identifies the pod (one pod = one netns = one client IP).
pub const AFF_KIND_NETNS_COOKIE: u32 = 1;
/// The tc layer uses the client's source address.
pub const AFF_KIND_ADDR: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    pub service_id: u32,
    pub kind: u32,
    /// An Addr for AFF_KIND_ADDR; for AFF_KIND_NETNS_COOKIE the cookie in w[0] (low) and w[1].
    pub client: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// ENDPOINTS value, keyed by the pod's Addr: how to deliver to a pod on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    /// ifindex of the host side of the pod's veth (bpf_redirect_peer target).
    pub host_ifindex: u32,
    pub flags: u32,
    /// The pod's MAC (destination of delivered frames).
    pub pod_mac: [u8; 6],
    /// The host-side veth's MAC (source of delivered frames).
    pub host_mac: [u8; 6],
}

/// EndpointValue.flags: NetworkPolicy isolation of a local pod. An isolated pod accepts (ingress)
/// or sends (egress) new flows only where POLICY allows them.
pub const EP_F_INGRESS_ISOLATED: u32 = 1 << 0;
pub const EP_F_EGRESS_ISOLATED: u32 = 1 << 1;

pub const MAX_POLICY_RULES: u32 = 65_536;
pub const MAX_POLICY_CT: u32 = 65_536;

pub const POLICY_INGRESS: u8 = 1;
pub const POLICY_EGRESS: u8 = 2;

/// POLICY (an LPM trie) key data. The trie matches bit by bit from the first field, so the
/// exact fields come first and the peer address last: the key's prefix length is
/// POLICY_FIXED_BITS + the peer CIDR's length. `proto` 0 / `port` 0 mean "any" (the program
/// looks up (proto, port), then (proto, 0), then (0, 0)). IPv4 only: IPv6 peers need a second
/// trie with a 128-bit tail.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// POLICY_INGRESS or POLICY_EGRESS
    pub direction: u8,
    pub proto: u8,
    /// Network byte order; the port on the policed pod's side for ingress, the remote port for egress.
    pub port: u16,
    /// The policed (local) pod.
    pub endpoint: u32,
    /// The peer, significant up to (prefix_len - POLICY_FIXED_BITS) bits.
    pub peer: u32,
}

pub const POLICY_FIXED_BITS: u32 = 64;

/// POLICY values: the longest matching prefix decides, so an ipBlock `except` is a DENY entry
/// longer than the ALLOW entry it carves out of.
pub const POLICY_ALLOW: u8 = 1;
pub const POLICY_DENY: u8 = 2;

/// Per-CPU counters (COUNTERS is a PerCpuArray<u64> indexed by these).
pub mod counter {
    pub const PACKETS: u32 = 0;
    pub const SVC_HIT: u32 = 1;
    pub const DNAT: u32 = 2;
    pub const REVNAT: u32 = 3;
    pub const CT_CREATE: u32 = 4;
    pub const NO_BACKEND: u32 = 5;
    pub const REDIRECT_PEER: u32 = 6;
    pub const REDIRECT_NEIGH: u32 = 7;
    pub const FIB_PASS: u32 = 8;
    pub const SOCK_XLATE: u32 = 9;
    pub const SOCK_REVNAT: u32 = 10;
    pub const HAIRPIN: u32 = 11;
    pub const ERRORS: u32 = 12;
    pub const NODEPORT: u32 = 13;
    pub const POLICY_DENIED: u32 = 14;
    /// A pod's direct flow (no Service) found the reply entry of an earlier Service flow from
    /// the same client port and removed it (see `forget_stale_reply` in ebpf/programs).
    pub const STALE_REPLY_DROPPED: u32 = 15;
    /// Entry node: a NodePort packet sent to a backend on another node with the DSR option.
    pub const DSR_FORWARD: u32 = 16;
    /// Backend's node: a DSR option read and its reply entry recorded.
    pub const DSR_ACCEPT: u32 = 17;
    /// Entry node: no room for the DSR option (bpf_xdp_adjust_head failed); packet dropped.
    pub const DSR_NO_ROOM: u32 = 18;
    /// Slots in COUNTERS. It was 16 before the DSR counters: a pinned map from an older agent
    /// keeps its 16 (maps are reused, never flushed), the programs' counts past it are lost
    /// and userspace reads them as 0 (see `Datapath::counters`) until the pins are renewed.
    pub const COUNT: u32 = 24;
    pub const NAMES: [&str; 19] = [
        "packets",
        "service_hit",
        "dnat",
        "reverse_nat",
        "conntrack_create",
        "no_backend",
        "redirect_peer",
        "redirect_neigh",
        "fib_pass_to_stack",
        "socket_translate",
        "socket_reverse",
        "hairpin",
        "errors",
        "nodeport_dnat",
        "policy_denied",
        "stale_reply_dropped",
        "dsr_forward",
        "dsr_accept",
        "dsr_no_room",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], Copy, made only of integers and integer arrays with
    // explicit padding fields, so any bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for SockFlowKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The layouts are the contract with the kernel side: a size change is a map format change
    // (pinned maps from an older agent would no longer load), so it must be deliberate.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<Addr>(), 16);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<BackendSlotKey>(), 8);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 48);
        assert_eq!(size_of::<SockRevKey>(), 32);
        assert_eq!(size_of::<SockFlowKey>(), 32);
        assert_eq!(size_of::<SockRevValue>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 24);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<EndpointValue>(), 20);
        assert_eq!(size_of::<MaglevTable>(), 4 * MAGLEV_M + 4);
        assert_eq!(size_of::<NodeConfig>(), 24);
        assert_eq!(size_of::<PolicyKey>() as u32 * 8, POLICY_FIXED_BITS + 32);
    }

    // IPv4 a.b.c.d and the IPv6 address a.b.c.d:: (its word in w[0], the rest zero: the old
    // IPv4 encoding) must be different keys, and the mapped form must be ::ffff:a.b.c.d.
    #[test]
    fn ipv4_is_mapped_and_distinct_from_ipv6() {
        let raw = ip4_to_raw([10, 96, 0, 1]);
        let v4 = Addr::v4_raw(raw);
        let v6_same_low = Addr { w: [raw, 0, 0, 0] };
        let v6_same_tail = Addr::from_bytes([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 96, 0, 1]);
        assert_eq!(v4.to_bytes(), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 1]);
        assert!(v4.is_v4() && !v6_same_low.is_v4() && !v6_same_tail.is_v4());
        assert_eq!(v4.v4_word(), raw);
        assert_ne!(v4, v6_same_low);
        assert_ne!(v4, v6_same_tail);
        assert_eq!(Addr::from_bytes(v4.to_bytes()), v4);
        let key = |addr| ServiceKey { addr, port: port_to_raw(80), proto: PROTO_TCP, scope: 0 };
        assert_ne!(key(v4), key(v6_same_low));
        assert_eq!(Addr::v4([10, 96, 0, 1]), v4);
    }

    #[test]
    fn byte_order_helpers_round_trip() {
        let raw = ip4_to_raw([10, 96, 0, 1]);
        assert_eq!(raw.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(raw_to_ip4(raw), [10, 96, 0, 1]);
        assert_eq!(port_to_raw(80).to_ne_bytes(), [0, 80]);
        assert_eq!(raw_to_port(port_to_raw(8080)), 8080);
    }
}
