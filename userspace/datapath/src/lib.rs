//! skiff-datapath: loads skiff's eBPF datapath (built from ebpf/programs by build.rs and carried
//! inside this crate), pins its maps and links on a bpffs, attaches it to cgroups, pod veths and
//! the node uplink, and programs Services, NodePorts and NetworkPolicy into its maps.
//!
//! Lifecycle: [`Datapath::load`] loads the object once (the verifier runs on every program).
//! Maps are pinned by name under the caller's directory (e.g. `/sys/fs/bpf/skiff/<node>`) and
//! reused on the next load, so restarting the agent never flushes live state (services,
//! conntrack, affinity, policy). Links are pinned under `<dir>/links/`, so programs stay
//! attached while no agent runs; attaching again over a pinned link attaches the new program
//! first and then releases the old one (XDP: the program is swapped inside the link).
//! [`Datapath::open_pinned`] opens the maps only (inspection tools).
//!
//! API:
//! - attach: [`Datapath::attach_cgroup`] (socket LB: connect4/sendmsg4/recvmsg4/getpeername4),
//!   [`Datapath::attach_tc`] (`from_pod`, tc ingress of a pod veth's host side: TCX, or a
//!   netlink cls_bpf filter on kernels without TCX, see [`tc_attach`]),
//!   [`Datapath::attach_xdp`] (`nodeport`, the uplink). Interfaces are resolved in the calling
//!   thread's network namespace.
//! - services: [`Datapath::upsert_service`], [`Datapath::delete_service`],
//!   [`Datapath::sync_services`] run the pure diff in [`plan`] against a cached view of the maps
//!   and apply only what differs; [`Datapath::upsert_nodeport`] also writes the Maglev table;
//!   [`Datapath::set_lb_mode`] chooses SNAT or DSR for NodePort traffic to other nodes.
//! - pods: [`Datapath::upsert_endpoint`] (for bpf_redirect_peer), [`Datapath::set_policy`];
//!   from another process (the CNI plugin): [`attach_pod`], [`detach_pod`] (see [`pod`]).
//! - seeing inside: [`Datapath::dump_services`], [`Datapath::dump_backends`],
//!   [`Datapath::dump_conntrack`], [`Datapath::counters`]; [`Datapath::gc_conntrack`].
//! - stale connected UDP sockets (cilium #12859): [`Datapath::destroy_stale_udp_sockets`], run
//!   in each namespace after backends go (see [`sockdiag`]).

mod batch;
pub mod lab;
pub mod nodeport;
pub mod plan;
pub mod pod;
pub mod policy;
pub mod sockdiag;
pub mod tc_attach;

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, include_bytes_aligned,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp,
        XdpMode,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use skiff_ebpf_common::{
    AffinityKey, AffinityValue, BACKEND_ACTIVE, Backend, BackendSlotKey, CT_F_HAIRPIN, CT_F_REPLY,
    CtKey, CtValue, EndpointValue, MaglevTable, NodeConfig, PROTO_UDP, ServiceKey, ServiceValue,
    SockRevKey, SockRevValue, counter, ip4_to_raw, map_names, program_names, raw_to_ip4,
    raw_to_port,
};
use tracing::{debug, info, warn};

pub use nodeport::LbMode;
pub use plan::{BackendSpec, MapOp, MapState, Proto, ServiceSpec};
pub use pod::{attach_pod, detach_pod};
pub use tc_attach::{FORCE_NETLINK_ENV, KernelFeatures, NETLINK_HANDLE, NETLINK_PRIORITY, TcAttachMode};

/// How [`Datapath::load_with`] loads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Attach tc programs through netlink cls_bpf even where the kernel has TCX.
    pub force_netlink_tc: bool,
}

impl LoadOptions {
    /// From the environment: `SKIFF_DATAPATH_FORCE_NETLINK_TC=1` forces netlink tc.
    pub fn from_env() -> LoadOptions {
        LoadOptions { force_netlink_tc: tc_attach::force_netlink_from_env() }
    }
}

/// The datapath object, built by build.rs from ebpf/programs.
static DATAPATH_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath"));

/// The raw eBPF object (for tools that want to inspect it).
pub fn object_bytes() -> &'static [u8] {
    DATAPATH_OBJECT
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "loading the eBPF object failed (is this root, with bpffs mounted and a kernel >= 5.10?): {0}"
    )]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: String,
        #[source]
        source: MapError,
    },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinning link at {path} failed: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not on a bpffs: mount one (mount -t bpf bpf /sys/fs/bpf) and pin under it")]
    NotBpffs(PathBuf),
    #[error("the eBPF object has no {0}: the build of ebpf/programs is out of date")]
    Missing(String),
    #[error("invalid service: {0}")]
    InvalidService(String),
    #[error(
        "no cgroup v2 mount found (looked at /sys/fs/cgroup and /sys/fs/cgroup/unified): mount cgroup2"
    )]
    NoCgroup2,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Io { what, source }
}

pub(crate) fn map_err(name: &str) -> impl FnOnce(MapError) -> DatapathError + '_ {
    move |source| DatapathError::Map {
        name: name.to_string(),
        source,
    }
}

fn prog_err(name: &str) -> impl FnOnce(ProgramError) -> DatapathError + '_ {
    move |source| DatapathError::Program {
        name: name.to_string(),
        source,
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn statfs_magic(path: &Path) -> Result<i64, DatapathError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        DatapathError::InvalidService(format!("path {} contains a NUL byte", path.display()))
    })?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(DatapathError::Io {
            what: format!("statfs {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// The cgroup v2 mount: /sys/fs/cgroup on a pure-v2 host, /sys/fs/cgroup/unified on a hybrid one.
pub fn cgroup2_root() -> Result<PathBuf, DatapathError> {
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let p = Path::new(candidate);
        if p.is_dir() && statfs_magic(p).ok() == Some(CGROUP2_SUPER_MAGIC) {
            return Ok(p.to_path_buf());
        }
    }
    Err(DatapathError::NoCgroup2)
}

/// How to reach a pod on this node (an ENDPOINTS entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// ifindex of the host side of the pod's veth, in the namespace the tc program runs in.
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
}

/// One service as `dump_services` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub service_id: u32,
    /// Active backends in slot order (the ones that get new flows).
    pub active_backends: Vec<u32>,
    pub affinity_timeout: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Active,
    Terminating,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub id: u32,
    pub service_id: u32,
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub state: BackendState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtDirection {
    /// Keyed by the client's tuple towards the VIP.
    Forward,
    /// Keyed by the backend's reply tuple.
    Reply,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackEntry {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: u8,
    pub direction: CtDirection,
    pub hairpin: bool,
    /// Direct server return (CT_F_DSR): a forward entry on the entry node whose replies leave
    /// from the backend's node, or the reply entry the backend's node made from the DSR option.
    pub dsr: bool,
    pub backend_id: u32,
    pub vip: IpAddr,
    pub vip_port: u16,
    pub last_seen_ns: u64,
}

/// A map address as an IpAddr: IPv4 for the IPv4-mapped form, IPv6 otherwise.
pub fn ip_of(addr: &skiff_ebpf_common::Addr) -> IpAddr {
    if addr.is_v4() {
        IpAddr::V4(Ipv4Addr::from(raw_to_ip4(addr.v4_word())))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(addr.to_bytes()))
    }
}

/// An IpAddr as a map address (IPv4 IPv4-mapped); the inverse of [`ip_of`].
pub fn addr_of_ip(ip: IpAddr) -> skiff_ebpf_common::Addr {
    match ip {
        IpAddr::V4(v) => addr_of(v),
        IpAddr::V6(v) => skiff_ebpf_common::Addr::from_bytes(v.octets()),
    }
}

pub(crate) fn addr_of(ip: Ipv4Addr) -> skiff_ebpf_common::Addr {
    skiff_ebpf_common::Addr::v4_raw(ip4_to_raw(ip.octets()))
}

/// Where the cgroup socket programs go.
const CGROUP_PROGRAMS: [&str; 4] = [
    program_names::CONNECT4,
    program_names::SENDMSG4,
    program_names::RECVMSG4,
    program_names::GETPEERNAME4,
];

/// The loaded datapath and its (pinned) maps.
pub struct Datapath {
    /// None when opened from pins only (`open_pinned`).
    ebpf: Option<Ebpf>,
    pin_dir: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, BackendSlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    sock_revnat: HashMap<MapData, SockRevKey, SockRevValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    endpoints: HashMap<MapData, skiff_ebpf_common::Addr, EndpointValue>,
    counters: PerCpuArray<MapData, u64>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    node_config: Array<MapData, NodeConfig>,
    policy: aya::maps::lpm_trie::LpmTrie<MapData, skiff_ebpf_common::PolicyKey, u8>,
    /// Batch handles on SERVICES, BACKEND_SLOTS and BACKENDS (see [`batch`]).
    services_batch: batch::BatchMap,
    slots_batch: batch::BatchMap,
    backends_batch: batch::BatchMap,
    /// The service maps as this handle last wrote or read them (see `refresh`).
    state: MapState,
    /// How `attach_tc` attaches (see [`tc_attach`]).
    tc_mode: TcAttachMode,
}

impl Datapath {
    /// Loads the datapath, pinning its maps under `pin_dir` (created if missing; must be on a
    /// bpffs) or reusing the maps already pinned there, and loads every program into the kernel
    /// (the verifier runs here).
    ///
    /// Options come from the environment ([`LoadOptions::from_env`]).
    pub fn load(pin_dir: &Path) -> Result<Datapath, DatapathError> {
        Self::load_with(pin_dir, &LoadOptions::from_env())
    }

    /// [`Datapath::load`] with explicit options. Detects the kernel's features, logs which are
    /// used and which fallbacks apply, and records the tc attach mode under `pin_dir` for
    /// skiff-cni.
    pub fn load_with(pin_dir: &Path, options: &LoadOptions) -> Result<Datapath, DatapathError> {
        let features = KernelFeatures::detect();
        let tc_mode = features.tc_mode(options.force_netlink_tc);
        features.report(tc_mode, options.force_netlink_tc && features.tcx);
        std::fs::create_dir_all(pin_dir).map_err(io_err(format!(
            "creating pin directory {}",
            pin_dir.display()
        )))?;
        if statfs_magic(pin_dir)? != BPF_FS_MAGIC {
            return Err(DatapathError::NotBpffs(pin_dir.to_path_buf()));
        }
        let links = pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(io_err(format!("creating {}", links.display())))?;
        let reused = map_names::ALL
            .iter()
            .filter(|n| pin_dir.join(n).exists())
            .count();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(DATAPATH_OBJECT)?;
        for name in CGROUP_PROGRAMS {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| DatapathError::Missing(format!("program {name}")))?
                .try_into()
                .map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
        }
        let tc: &mut SchedClassifier = ebpf
            .program_mut(program_names::FROM_POD)
            .ok_or_else(|| DatapathError::Missing(format!("program {}", program_names::FROM_POD)))?
            .try_into()
            .map_err(prog_err(program_names::FROM_POD))?;
        tc.load().map_err(prog_err(program_names::FROM_POD))?;
        // Pinned so that skiff-cni (another process) can attach it to new pod veths.
        pod::pin_from_pod(tc, pin_dir)?;
        tc_attach::record_mode(pin_dir, tc_mode)?;
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::NODEPORT)
            .ok_or_else(|| DatapathError::Missing(format!("program {}", program_names::NODEPORT)))?
            .try_into()
            .map_err(prog_err(program_names::NODEPORT))?;
        xdp.load().map_err(prog_err(program_names::NODEPORT))?;

        let dp = Self::assemble(Some(&mut ebpf), pin_dir)?;
        let dp = Datapath {
            ebpf: Some(ebpf),
            tc_mode,
            ..dp
        };
        info!(pin_dir = %pin_dir.display(), reused_maps = reused, tc = ?tc_mode, "datapath loaded");
        Ok(dp)
    }

    /// Opens the maps an agent pinned under `pin_dir`, read-write, without loading any program
    /// (for inspection tools such as `skiff datapath ...`). Attaching is not possible on such a
    /// handle; changing services through it is (the pinned maps are the live ones).
    pub fn open_pinned(pin_dir: &Path) -> Result<Datapath, DatapathError> {
        if statfs_magic(pin_dir)? != BPF_FS_MAGIC {
            return Err(DatapathError::NotBpffs(pin_dir.to_path_buf()));
        }
        Self::assemble(None, pin_dir)
    }

    /// Builds the typed map handles, from a freshly loaded object or from the pins.
    fn assemble(ebpf: Option<&mut Ebpf>, pin_dir: &Path) -> Result<Datapath, DatapathError> {
        let mut dp = Self::assemble_maps(ebpf, pin_dir)?;
        dp.refresh()?;
        Ok(dp)
    }

    fn assemble_maps(
        mut ebpf: Option<&mut Ebpf>,
        pin_dir: &Path,
    ) -> Result<Datapath, DatapathError> {
        let mut take = |name: &'static str| -> Result<aya::maps::Map, DatapathError> {
            match ebpf.as_deref_mut() {
                Some(e) => e
                    .take_map(name)
                    .ok_or_else(|| DatapathError::Missing(format!("map {name}"))),
                None => {
                    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
                    aya::maps::Map::from_map_data(data).map_err(map_err(name))
                }
            }
        };
        fn typed<T: TryFrom<aya::maps::Map, Error = MapError>>(
            map: aya::maps::Map,
            name: &'static str,
        ) -> Result<T, DatapathError> {
            T::try_from(map).map_err(map_err(name))
        }
        Ok(Datapath {
            services: typed(take(map_names::SERVICES)?, map_names::SERVICES)?,
            slots: typed(take(map_names::BACKEND_SLOTS)?, map_names::BACKEND_SLOTS)?,
            backends: typed(take(map_names::BACKENDS)?, map_names::BACKENDS)?,
            conntrack: typed(take(map_names::CONNTRACK)?, map_names::CONNTRACK)?,
            sock_revnat: typed(take(map_names::SOCK_REVNAT)?, map_names::SOCK_REVNAT)?,
            affinity: typed(take(map_names::AFFINITY)?, map_names::AFFINITY)?,
            endpoints: typed(take(map_names::ENDPOINTS)?, map_names::ENDPOINTS)?,
            counters: typed(take(map_names::COUNTERS)?, map_names::COUNTERS)?,
            maglev: typed(take(map_names::MAGLEV)?, map_names::MAGLEV)?,
            node_config: typed(take(map_names::NODE_CONFIG)?, map_names::NODE_CONFIG)?,
            policy: typed(take(map_names::POLICY)?, map_names::POLICY)?,
            services_batch: batch_map(pin_dir, map_names::SERVICES)?,
            slots_batch: batch_map(pin_dir, map_names::BACKEND_SLOTS)?,
            backends_batch: batch_map(pin_dir, map_names::BACKENDS)?,
            state: MapState::default(),
            tc_mode: tc_attach::recorded_mode(pin_dir),
            ebpf: None,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    /// Every program in the object and whether this handle loaded it (the verifier accepted
    /// it). Empty for a handle opened from pins only (`open_pinned`).
    pub fn programs_loaded(&self) -> Vec<(String, bool)> {
        self.ebpf
            .as_ref()
            .map(|e| {
                e.programs()
                    .map(|(name, p)| (name.to_string(), p.fd().is_ok()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Pins `link` at `path`, replacing (and thereby detaching) whatever link was pinned there
    /// before. The new link is attached before the old one goes, so there is no gap.
    fn pin_replacing(link: FdLink, path: &Path) -> Result<(), DatapathError> {
        let old = if path.exists() {
            match PinnedLink::from_pin(path) {
                Ok(p) => Some(
                    p.unpin()
                        .map_err(io_err(format!("unpinning {}", path.display())))?,
                ),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "removing unreadable link pin");
                    std::fs::remove_file(path)
                        .map_err(io_err(format!("removing {}", path.display())))?;
                    None
                }
            }
        } else {
            None
        };
        link.pin(path).map_err(|e| DatapathError::Pin {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        drop(old); // releases the previous attachment
        Ok(())
    }

    /// Attaches the socket-LB programs (connect4, sendmsg4, recvmsg4, getpeername4) to a cgroup
    /// v2 directory; sockets of processes in it and below get socket-level ClusterIP LB. The
    /// links are pinned, so they survive this process. Safe to call again (replaces).
    pub fn attach_cgroup(&mut self, cgroup_dir: &Path) -> Result<(), DatapathError> {
        if statfs_magic(cgroup_dir)? != CGROUP2_SUPER_MAGIC {
            return Err(DatapathError::Io {
                what: format!("{} is not a cgroup v2 directory", cgroup_dir.display()),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let tag = link_tag(cgroup_dir);
        for name in CGROUP_PROGRAMS {
            let dir = File::open(cgroup_dir)
                .map_err(io_err(format!("opening cgroup {}", cgroup_dir.display())))?;
            let p: &mut CgroupSockAddr = self
                .ebpf
                .as_mut()
                .ok_or_else(no_object)?
                .program_mut(name)
                .ok_or_else(|| DatapathError::Missing(format!("program {name}")))?
                .try_into()
                .map_err(prog_err(name))?;
            // Single = no flags: bpf_link_create on a cgroup rejects flags, and cgroup bpf_links
            // always coexist (multi) anyway. During a replace the old and new program are both
            // attached for a moment; the second sees an already-translated address: no-op.
            let id = p
                .attach(dir, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let link = p.take_link(id).map_err(prog_err(name))?;
            let fd_link: FdLink = link.try_into().map_err(|e| DatapathError::Pin {
                path: cgroup_dir.to_path_buf(),
                message: format!("cgroup link is not a bpf_link: {e}"),
            })?;
            Self::pin_replacing(
                fd_link,
                &self.pin_dir.join("links").join(format!("cg-{tag}-{name}")),
            )?;
        }
        debug!(cgroup = %cgroup_dir.display(), "socket LB attached");
        Ok(())
    }

    /// Detaches the socket-LB programs from a cgroup (removes their pinned links).
    pub fn detach_cgroup(&mut self, cgroup_dir: &Path) -> Result<(), DatapathError> {
        let tag = link_tag(cgroup_dir);
        for name in CGROUP_PROGRAMS {
            remove_link_pin(&self.pin_dir.join("links").join(format!("cg-{tag}-{name}")))?;
        }
        Ok(())
    }

    /// Attaches `from_pod` to the ingress of `iface` in the calling thread's network namespace.
    /// `iface` is the host side of a pod veth, or the node's uplink: there the program reverses
    /// the NAT of replies from backends on other nodes and applies ingress policy to traffic
    /// from outside.
    ///
    /// With TCX (kernel >= 6.6) the link is pinned as `links/tc-<iface>-<ifindex>`. Without
    /// (or forced, see [`LoadOptions`]) it is skiff's netlink cls_bpf filter
    /// ([`NETLINK_PRIORITY`]/[`NETLINK_HANDLE`]), whose program is replaced in place when one is
    /// there (see [`tc_attach`]). Either way whatever the other mode left on `iface` is removed
    /// once the new attachment is in place.
    pub fn attach_tc(&mut self, iface: &str) -> Result<(), DatapathError> {
        let ifindex = ifindex_of(iface)?;
        let name = program_names::FROM_POD;
        let tc_mode = self.tc_mode;
        let p: &mut SchedClassifier = self
            .ebpf
            .as_mut()
            .ok_or_else(no_object)?
            .program_mut(name)
            .ok_or_else(|| DatapathError::Missing(format!("program {name}")))?
            .try_into()
            .map_err(prog_err(name))?;
        if tc_mode == TcAttachMode::Netlink {
            tc_attach::attach_netlink(p, iface)?;
            remove_link_pin(&self.tc_link_path(iface, ifindex))?;
            debug!(iface, ifindex, "tc from_pod attached (netlink cls_bpf)");
            return Ok(());
        }
        let id = p
            .attach_with_options(iface, TcAttachType::Ingress, aya::programs::tc::TcAttachOptions::TcxOrder(Default::default()))
            .map_err(prog_err(name))?;
        let link = p.take_link(id).map_err(prog_err(name))?;
        let fd_link: FdLink = link.try_into().map_err(|e| DatapathError::Pin {
            path: PathBuf::from(iface),
            message: format!("tc link is not a TCX bpf_link (kernel < 6.6?): {e}"),
        })?;
        Self::pin_replacing(fd_link, &self.tc_link_path(iface, ifindex))?;
        tc_attach::detach_netlink(iface)?;
        debug!(iface, ifindex, "tc from_pod attached");
        Ok(())
    }

    /// Detaches `from_pod` from `iface` (in the calling thread's network namespace): its pinned
    /// TCX link and skiff's netlink filter, whichever is there.
    pub fn detach_tc(&mut self, iface: &str) -> Result<(), DatapathError> {
        let ifindex = ifindex_of(iface)?;
        remove_link_pin(&self.tc_link_path(iface, ifindex))?;
        tc_attach::detach_netlink(iface)
    }

    /// How this handle attaches tc programs.
    pub fn tc_mode(&self) -> TcAttachMode {
        self.tc_mode
    }

    /// Attaches the NodePort XDP program to `iface` (the node's uplink) in the calling thread's
    /// network namespace (native mode where the driver has it). Pinned as `links/xdp-<iface>-<ifindex>`.
    pub fn attach_xdp(&mut self, iface: &str) -> Result<(), DatapathError> {
        let ifindex = ifindex_of(iface)?;
        let name = program_names::NODEPORT;
        let p: &mut Xdp = self
            .ebpf
            .as_mut()
            .ok_or_else(no_object)?
            .program_mut(name)
            .ok_or_else(|| DatapathError::Missing(format!("program {name}")))?
            .try_into()
            .map_err(prog_err(name))?;
        let path = self
            .pin_dir
            .join("links")
            .join(format!("xdp-{iface}-{ifindex}"));
        // One XDP program per interface: over a link pinned by an earlier agent, swap the
        // program inside the link (bpf_link_update: no gap); the pin keeps pointing at it.
        if path.exists() {
            if let Ok(pinned) = PinnedLink::from_pin(&path)
                && let Ok(xdp_link) = aya::programs::xdp::XdpLink::try_from(FdLink::from(pinned))
                && let Ok(id) = p.attach_to_link(xdp_link)
            {
                // Drop our handle (a bpf_link fd): the pin holds the link.
                let link = p.take_link(id).map_err(prog_err(name))?;
                std::mem::drop(link);
                return Ok(());
            }
            remove_link_pin(&path)?;
        }
        let id = p
            .attach(iface, XdpMode::default())
            .map_err(prog_err(name))?;
        let link = p.take_link(id).map_err(prog_err(name))?;
        let fd_link: FdLink = link.try_into().map_err(|e| DatapathError::Pin {
            path: PathBuf::from(iface),
            message: format!("xdp link is not a bpf_link: {e}"),
        })?;
        Self::pin_replacing(fd_link, &path)?;
        Ok(())
    }

    fn tc_link_path(&self, iface: &str, ifindex: u32) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("tc-{iface}-{ifindex}"))
    }

    /// Registers a pod on this node for `bpf_redirect_peer` delivery.
    pub fn upsert_endpoint(
        &mut self,
        ip: Ipv4Addr,
        ep: &EndpointSpec,
    ) -> Result<(), DatapathError> {
        // Keep the policy isolation flags an earlier set_policy wrote.
        let flags = self
            .endpoints
            .get(&addr_of(ip), 0)
            .map(|v| v.flags)
            .unwrap_or(0);
        let v = EndpointValue {
            host_ifindex: ep.host_ifindex,
            flags,
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
        };
        self.endpoints
            .insert(addr_of(ip), v, 0)
            .map_err(map_err(map_names::ENDPOINTS))
    }

    pub fn delete_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        match self.endpoints.remove(&addr_of(ip)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::ENDPOINTS)(e)),
        }
    }

    /// What SERVICES, BACKEND_SLOTS and BACKENDS hold now.
    pub fn map_state(&self) -> Result<MapState, DatapathError> {
        let (mut services, mut slots, mut backends) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for kv in self.services.iter() {
            let (k, v) = kv.map_err(map_err(map_names::SERVICES))?;
            services.insert(k, v);
        }
        for kv in self.slots.iter() {
            let (k, v) = kv.map_err(map_err(map_names::BACKEND_SLOTS))?;
            slots.insert(k, v);
        }
        for kv in self.backends.iter() {
            let (k, v) = kv.map_err(map_err(map_names::BACKENDS))?;
            backends.insert(k, v);
        }
        Ok(MapState::from_maps(services, slots, backends))
    }

    /// Re-reads the service maps into the cached state the diff plans against. The cache is
    /// read at load and kept by `apply`; call this if another process (another handle on the
    /// same pins) changed the maps.
    pub fn refresh(&mut self) -> Result<(), DatapathError> {
        self.state = self.map_state()?;
        Ok(())
    }

    /// The cached view of the service maps (what the next diff plans against).
    pub fn cached_state(&self) -> &MapState {
        &self.state
    }

    /// Makes the maps hold `spec`, changing only what differs. Returns the operations applied.
    pub fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<Vec<MapOp>, DatapathError> {
        let ops = plan::plan_upsert(spec, &self.state)?;
        self.apply(&ops)?;
        Ok(ops)
    }

    /// Removes a service frontend and everything it owns (no-op if absent).
    pub fn delete_service(
        &mut self,
        vip: IpAddr,
        port: u16,
        proto: Proto,
    ) -> Result<Vec<MapOp>, DatapathError> {
        let key = plan::service_key(&ServiceSpec {
            vip,
            port,
            proto,
            backends: vec![],
            affinity_timeout: None,
            external_traffic_local: false,
        })?;
        let ops = plan::plan_delete(&key, &self.state);
        self.apply(&ops)?;
        Ok(ops)
    }

    /// Makes the maps hold exactly `desired` (deleting services not listed).
    pub fn sync_services(&mut self, desired: &[ServiceSpec]) -> Result<Vec<MapOp>, DatapathError> {
        let ops = plan::plan_sync(desired, &self.state)?;
        self.apply(&ops)?;
        Ok(ops)
    }

    /// Executes planned operations in order, keeping the cached state in step. On a failure the
    /// cache is re-read from the maps, so the next diff starts from the truth.
    ///
    /// A run of at least [`BATCH_MIN`] consecutive operations of one kind on one map is written
    /// with one batch command (the kernel writes a batch in array order, so the order holds);
    /// if the batch stops early, the rest of the run goes one key at a time, which reports the
    /// real error or gets past a key that is already gone.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), DatapathError> {
        let mut i = 0;
        while i < ops.len() {
            let kind = batch_kind(&ops[i]);
            let run = match kind {
                Some(k) => ops[i..]
                    .iter()
                    .take_while(|o| batch_kind(o) == Some(k))
                    .count(),
                None => 1,
            };
            let batched = if run >= BATCH_MIN {
                self.apply_batch(&ops[i..i + run])
            } else {
                0
            };
            self.state.apply_all(&ops[i..i + batched]);
            for op in &ops[i + batched..i + run] {
                if let Err(e) = self.apply_one(op) {
                    if let Err(re) = self.refresh() {
                        warn!(error = %re, "re-reading the service maps after a failed update failed");
                    }
                    return Err(e);
                }
                self.state.apply(op);
            }
            i += run;
        }
        Ok(())
    }

    /// Writes a run of one kind (see [`batch_kind`]) with batch commands; returns how many of
    /// its operations were written (all, or the prefix before the first failure).
    fn apply_batch(&mut self, run: &[MapOp]) -> usize {
        fn done(r: Result<(), batch::BatchError>, len: usize, what: &str) -> usize {
            match r {
                Ok(()) => len,
                Err(e) => {
                    debug!(map = what, done = e.done, of = len, error = %e.error,
                           "batch stopped early: the rest one key at a time");
                    e.done
                }
            }
        }
        let n = run.len();
        match &run[0] {
            MapOp::PutBackend { .. } => {
                let (keys, values): (Vec<u32>, Vec<Backend>) = run
                    .iter()
                    .filter_map(|o| match o {
                        MapOp::PutBackend { id, backend } => Some((*id, *backend)),
                        _ => None,
                    })
                    .unzip();
                done(self.backends_batch.update(&keys, &values), n, map_names::BACKENDS)
            }
            MapOp::PutSlot { .. } => {
                let (keys, values): (Vec<BackendSlotKey>, Vec<u32>) = run
                    .iter()
                    .filter_map(|o| match o {
                        MapOp::PutSlot { key, backend_id } => Some((*key, *backend_id)),
                        _ => None,
                    })
                    .unzip();
                done(self.slots_batch.update(&keys, &values), n, map_names::BACKEND_SLOTS)
            }
            MapOp::PutService { .. } => {
                let (keys, values): (Vec<ServiceKey>, Vec<ServiceValue>) = run
                    .iter()
                    .filter_map(|o| match o {
                        MapOp::PutService { key, value } => Some((*key, *value)),
                        _ => None,
                    })
                    .unzip();
                done(self.services_batch.update(&keys, &values), n, map_names::SERVICES)
            }
            MapOp::DeleteSlot { .. } => {
                let keys: Vec<BackendSlotKey> = run
                    .iter()
                    .filter_map(|o| match o {
                        MapOp::DeleteSlot { key } => Some(*key),
                        _ => None,
                    })
                    .collect();
                done(self.slots_batch.delete(&keys), n, map_names::BACKEND_SLOTS)
            }
            MapOp::DeleteService { .. } => {
                let keys: Vec<ServiceKey> = run
                    .iter()
                    .filter_map(|o| match o {
                        MapOp::DeleteService { key } => Some(*key),
                        _ => None,
                    })
                    .collect();
                done(self.services_batch.delete(&keys), n, map_names::SERVICES)
            }
            MapOp::DeleteBackend { .. } => {
                let keys: Vec<u32> = run
                    .iter()
                    .filter_map(|o| match o {
                        MapOp::DeleteBackend { id } => Some(*id),
                        _ => None,
                    })
                    .collect();
                done(self.backends_batch.delete(&keys), n, map_names::BACKENDS)
            }
            MapOp::PurgeConntrack { .. } => 0,
        }
    }

    fn apply_one(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        {
            let missing_ok = |r: Result<(), MapError>, name: &str| match r {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(name)(e)),
            };
            match op {
                MapOp::PutBackend { id, backend } => self
                    .backends
                    .insert(id, backend, 0)
                    .map_err(map_err(map_names::BACKENDS))?,
                MapOp::PutSlot { key, backend_id } => self
                    .slots
                    .insert(key, backend_id, 0)
                    .map_err(map_err(map_names::BACKEND_SLOTS))?,
                MapOp::PutService { key, value } => self
                    .services
                    .insert(key, value, 0)
                    .map_err(map_err(map_names::SERVICES))?,
                MapOp::DeleteSlot { key } => {
                    missing_ok(self.slots.remove(key), map_names::BACKEND_SLOTS)?
                }
                MapOp::DeleteService { key } => {
                    missing_ok(self.services.remove(key), map_names::SERVICES)?
                }
                MapOp::DeleteBackend { id } => {
                    missing_ok(self.backends.remove(id), map_names::BACKENDS)?
                }
                MapOp::PurgeConntrack { backend_id } => {
                    let n = self.purge_udp_conntrack(*backend_id)?;
                    debug!(backend_id, purged = n, "udp conntrack purged");
                }
            }
        }
        Ok(())
    }

    /// Deletes the UDP conntrack entries (both directions) and the affinity entries that point
    /// at `backend_id`. Returns how many conntrack entries went. TCP entries are left to the
    /// LRU: a TCP packet whose backend is gone finds no BACKENDS entry and is balanced again.
    pub fn purge_udp_conntrack(&mut self, backend_id: u32) -> Result<usize, DatapathError> {
        let mut doomed = Vec::new();
        for kv in self.conntrack.iter() {
            match kv {
                Ok((k, v)) if v.backend_id == backend_id && k.proto == PROTO_UDP => doomed.push(k),
                Ok(_) => {}
                // An LRU entry can vanish between get_next_key and lookup: not an error.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::CONNTRACK)(e)),
            }
        }
        for k in &doomed {
            match self.conntrack.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::CONNTRACK)(e)),
            }
        }
        let aff: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(|kv| kv.ok())
            .filter(|(_, v)| v.backend_id == backend_id)
            .map(|(k, _)| k)
            .collect();
        for k in &aff {
            let _ = self.affinity.remove(k);
        }
        Ok(doomed.len())
    }

    /// Conntrack garbage collection: deletes flows idle longer than the timeout of their
    /// protocol. A forward entry goes when it is idle; a reply entry goes when it is idle and
    /// its forward entry is gone or idle too (a one-way UDP stream keeps its reply entry). The
    /// LRU map already evicts under pressure; this keeps idle flows from holding backends.
    pub fn gc_conntrack(
        &mut self,
        udp_idle: std::time::Duration,
        tcp_idle: std::time::Duration,
    ) -> Result<GcStats, DatapathError> {
        let now = monotonic_ns()?;
        let idle = |k: &CtKey, v: &CtValue| {
            let limit = if k.proto == PROTO_UDP {
                udp_idle
            } else {
                tcp_idle
            };
            now.saturating_sub(v.last_seen_ns) > limit.as_nanos() as u64
        };
        let mut entries = std::collections::HashMap::new();
        for kv in self.conntrack.iter() {
            match kv {
                Ok((k, v)) => {
                    entries.insert(k, v);
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::CONNTRACK)(e)),
            }
        }
        let mut doomed = Vec::new();
        for (k, v) in &entries {
            if !idle(k, v) {
                continue;
            }
            if v.flags & CT_F_REPLY == 0 {
                doomed.push(*k);
                continue;
            }
            let forward = CtKey {
                src: v.client_addr,
                dst: v.orig_addr,
                sport: k.dport,
                dport: v.orig_port,
                proto: k.proto,
                _pad: [0; 3],
            };
            match entries.get(&forward) {
                Some(fv) if !idle(&forward, fv) => {}
                _ => doomed.push(*k),
            }
        }
        for k in &doomed {
            match self.conntrack.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::CONNTRACK)(e)),
            }
        }
        Ok(GcStats {
            scanned: entries.len(),
            deleted: doomed.len(),
        })
    }

    pub fn dump_services(&self) -> Result<Vec<ServiceEntry>, DatapathError> {
        let st = self.map_state()?;
        let mut out = Vec::new();
        for (k, v) in &st.services {
            let active_backends = (0..v.backend_count)
                .filter_map(|slot| {
                    st.slots
                        .get(&BackendSlotKey {
                            service_id: v.service_id,
                            slot,
                        })
                        .copied()
                })
                .collect();
            out.push(ServiceEntry {
                vip: ip_of(&k.addr),
                port: raw_to_port(k.port),
                proto: Proto::from_number(k.proto).unwrap_or(Proto::Tcp),
                service_id: v.service_id,
                active_backends,
                affinity_timeout: (v.flags & skiff_ebpf_common::SVC_F_AFFINITY != 0)
                    .then_some(v.affinity_timeout_s),
            });
        }
        Ok(out)
    }

    pub fn dump_backends(&self) -> Result<Vec<BackendEntry>, DatapathError> {
        let st = self.map_state()?;
        Ok(st
            .backends
            .iter()
            .map(|(id, b)| BackendEntry {
                id: *id,
                service_id: b.service_id,
                ip: ip_of(&b.addr),
                port: raw_to_port(b.port),
                proto: Proto::from_number(b.proto).unwrap_or(Proto::Tcp),
                state: if b.state == BACKEND_ACTIVE {
                    BackendState::Active
                } else {
                    BackendState::Terminating
                },
            })
            .collect())
    }

    pub fn dump_conntrack(&self) -> Result<Vec<ConntrackEntry>, DatapathError> {
        let mut out = Vec::new();
        for kv in self.conntrack.iter() {
            let (k, v) = match kv {
                Ok(kv) => kv,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(map_names::CONNTRACK)(e)),
            };
            out.push(ConntrackEntry {
                src: ip_of(&k.src),
                sport: raw_to_port(k.sport),
                dst: ip_of(&k.dst),
                dport: raw_to_port(k.dport),
                proto: k.proto,
                direction: if v.flags & CT_F_REPLY != 0 {
                    CtDirection::Reply
                } else {
                    CtDirection::Forward
                },
                hairpin: v.flags & CT_F_HAIRPIN != 0,
                dsr: v.flags & skiff_ebpf_common::CT_F_DSR != 0,
                backend_id: v.backend_id,
                vip: ip_of(&v.orig_addr),
                vip_port: raw_to_port(v.orig_port),
                last_seen_ns: v.last_seen_ns,
            });
        }
        Ok(out)
    }

    /// Per-CPU counters summed, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>, DatapathError> {
        let mut out = BTreeMap::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let values = match self.counters.get(&(i as u32), 0) {
                Ok(v) => v,
                // A COUNTERS map pinned by an older agent has fewer slots (see counter::COUNT):
                // its newer counters read as 0.
                Err(MapError::KeyNotFound | MapError::OutOfBounds { .. }) => {
                    out.insert(*name, 0);
                    continue;
                }
                Err(e) => return Err(map_err(map_names::COUNTERS)(e)),
            };
            out.insert(*name, values.iter().copied().sum());
        }
        Ok(out)
    }

    /// Number of socket reverse-NAT entries (for tests and stats).
    pub fn sock_revnat_len(&self) -> usize {
        self.sock_revnat.keys().filter(|k| k.is_ok()).count()
    }
}

/// What one conntrack GC pass did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcStats {
    pub scanned: usize,
    pub deleted: usize,
}

/// CLOCK_MONOTONIC in ns: the clock bpf_ktime_get_ns() reads.
/// Runs shorter than this go one key at a time (a batch's vectors cost more than they save).
const BATCH_MIN: usize = 4;

/// Which batchable kind an operation is (None: conntrack purges, which scan a map).
fn batch_kind(op: &MapOp) -> Option<u8> {
    match op {
        MapOp::PutBackend { .. } => Some(0),
        MapOp::PutSlot { .. } => Some(1),
        MapOp::PutService { .. } => Some(2),
        MapOp::DeleteSlot { .. } => Some(3),
        MapOp::DeleteService { .. } => Some(4),
        MapOp::DeleteBackend { .. } => Some(5),
        MapOp::PurgeConntrack { .. } => None,
    }
}

fn batch_map(pin_dir: &Path, name: &'static str) -> Result<batch::BatchMap, DatapathError> {
    batch::BatchMap::open(&pin_dir.join(name)).map_err(map_err(name))
}

fn monotonic_ns() -> Result<u64, DatapathError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(io_err("clock_gettime(CLOCK_MONOTONIC)")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

fn no_object() -> DatapathError {
    DatapathError::Missing(
        "loaded program (opened from pins only: use Datapath::load to attach)".into(),
    )
}

/// A file-name-safe tag for a cgroup path.
fn link_tag(path: &Path) -> String {
    path.to_string_lossy().trim_matches('/').replace('/', "_")
}

fn remove_link_pin(path: &Path) -> Result<(), DatapathError> {
    if !path.exists() {
        return Ok(());
    }
    let link = PinnedLink::from_pin(path).map_err(|source| DatapathError::Link {
        path: path.to_path_buf(),
        source,
    })?;
    let fd = link
        .unpin()
        .map_err(io_err(format!("unpinning {}", path.display())))?;
    drop(fd);
    Ok(())
}

fn ifindex_of(iface: &str) -> Result<u32, DatapathError> {
    let c = CString::new(iface).map_err(|_| {
        DatapathError::InvalidService(format!("interface name {iface:?} contains a NUL byte"))
    })?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(DatapathError::Io {
            what: format!("interface {iface} not found in this network namespace"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(idx)
}

#[cfg(test)]
mod addr_tests {
    use super::{addr_of_ip, ip_of};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    // IpAddr -> Addr -> IpAddr round-trips for both families, and IPv4 a.b.c.d never shares a
    // key with an IPv6 address that has the same low bytes or the old IPv4-in-w[0] layout.
    #[test]
    fn ip_addr_round_trips_and_families_do_not_collide() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));
        let v6_low = IpAddr::V6("::a60:1".parse::<Ipv6Addr>().unwrap());
        let v6_high = IpAddr::V6("a60:1::".parse::<Ipv6Addr>().unwrap());
        let v6 = IpAddr::V6("fd00::1".parse::<Ipv6Addr>().unwrap());
        for ip in [v4, v6_low, v6_high, v6] {
            assert_eq!(ip_of(&addr_of_ip(ip)), ip, "{ip}");
        }
        let a = addr_of_ip(v4);
        assert!(a.is_v4());
        assert_ne!(a, addr_of_ip(v6_low));
        assert_ne!(a, addr_of_ip(v6_high));
        assert_eq!(addr_of_ip(v6_high).w[0], a.v4_word(), "a60:1:: is the old IPv4 encoding");
        assert_eq!(ip_of(&a), IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)));
        assert_eq!(addr_of_ip(IpAddr::V6("::ffff:10.96.0.1".parse().unwrap())), a);
    }
}
