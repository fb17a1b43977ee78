//! How `from_pod` attaches to an interface's tc ingress, by what the kernel offers:
//!
//! - TCX (kernel >= 6.6): a bpf_link, pinned under `<pin_dir>/links/` so it outlives the agent
//!   and is replaced atomically (see [`crate::Datapath::attach_tc`]).
//! - netlink cls_bpf (older kernels, e.g. Debian 12's 6.1): a tc filter on the `clsact` qdisc.
//!   It is no bpf_link and cannot be pinned, but it needs none: the filter holds the program and
//!   stays in the kernel without any process. skiff's filter is identified by a fixed
//!   [`NETLINK_PRIORITY`] and [`NETLINK_HANDLE`], so whoever attaches next (a restarted agent,
//!   skiff-cni from the pinned program) replaces the program inside that very filter (an
//!   RTM_NEWTFILTER without NLM_F_CREATE: cls_bpf swaps the program under RCU, no packet sees no
//!   filter) and a detach removes exactly that filter.
//!
//! The agent decides the mode when it loads the datapath ([`KernelFeatures::detect`], or forced
//! by `SKIFF_DATAPATH_FORCE_NETLINK_TC=1` / [`crate::LoadOptions`]) and records it for other
//! processes as the directory `<pin_dir>/tc-netlink` (bpffs holds no regular files): skiff-cni
//! attaches pods the way the agent does.

use std::path::{Path, PathBuf};

use aya::programs::{
    Link as _, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use tracing::{info, warn};

use crate::{DatapathError, io_err};

/// The tc filter priority of skiff's `from_pod` filter (a fixed, unusual value: tc filters of
/// different kinds cannot share a priority, and the kernel's automatic ones start at 49152).
pub const NETLINK_PRIORITY: u16 = 0x5c1f;
/// The handle of skiff's `from_pod` filter at [`NETLINK_PRIORITY`].
pub const NETLINK_HANDLE: u32 = 0x5c1f;

/// The environment variable that forces netlink attachment even where TCX exists (to test the
/// fallback on a new kernel).
pub const FORCE_NETLINK_ENV: &str = "SKIFF_DATAPATH_FORCE_NETLINK_TC";

/// How tc programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcAttachMode {
    /// TCX bpf_links, pinned.
    Tcx,
    /// netlink cls_bpf filters at skiff's priority and handle.
    Netlink,
}

/// What the running kernel offers the datapath. From the kernel version: these are the releases
/// that brought each (aya's own attach rules go by the same versions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    /// TCX tc attachment by bpf_link (6.6).
    pub tcx: bool,
    /// XDP attachment by bpf_link (5.9): pinned NodePort links.
    pub xdp_link: bool,
    /// cgroup attachment by bpf_link (5.7): pinned socket-LB links.
    pub cgroup_link: bool,
    /// `bpf_redirect_peer` (5.10): delivery into pod namespaces.
    pub redirect_peer: bool,
}

impl KernelFeatures {
    pub fn detect() -> KernelFeatures {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
        let current = aya::util::KernelVersion::current().ok().map(|v| v.code());
        let at_least = |major: u8, minor: u8| current.is_some_and(|c| c >= aya::util::KernelVersion::new(major, minor, 0).code());
        KernelFeatures { release, tcx: at_least(6, 6), xdp_link: at_least(5, 9), cgroup_link: at_least(5, 7), redirect_peer: at_least(5, 10) }
    }

    /// The tc mode to use: TCX where the kernel has it, unless netlink is forced.
    pub fn tc_mode(&self, force_netlink: bool) -> TcAttachMode {
        if force_netlink || !self.tcx { TcAttachMode::Netlink } else { TcAttachMode::Tcx }
    }

    /// Logs what is used and what falls back (or is missing with no fallback).
    pub fn report(&self, tc: TcAttachMode, forced: bool) {
        let tc_how = match (tc, forced) {
            (TcAttachMode::Tcx, _) => "TCX bpf_links (pinned)",
            (TcAttachMode::Netlink, true) => "netlink cls_bpf filters (forced by SKIFF_DATAPATH_FORCE_NETLINK_TC)",
            (TcAttachMode::Netlink, false) => "netlink cls_bpf filters (no TCX before 6.6)",
        };
        info!(kernel = %self.release, tcx = self.tcx, xdp_link = self.xdp_link, cgroup_link = self.cgroup_link, redirect_peer = self.redirect_peer, tc = tc_how, "kernel features");
        if tc == TcAttachMode::Netlink {
            info!(priority = NETLINK_PRIORITY, handle = format_args!("{NETLINK_HANDLE:#x}"), "tc fallback: from_pod runs as a cls_bpf filter on clsact ingress, replaced in place by priority/handle");
        }
        for (have, what) in [
            (self.xdp_link, "XDP bpf_links (>= 5.9): NodePort XDP cannot be attached"),
            (self.cgroup_link, "cgroup bpf_links (>= 5.7): socket LB cannot be attached"),
            (self.redirect_peer, "bpf_redirect_peer (>= 5.10): the programs will not load"),
        ] {
            if !have {
                warn!("this kernel lacks {what} (no fallback)");
            }
        }
    }
}

/// Whether [`LoadOptions`](crate::LoadOptions) from the environment force netlink.
pub fn force_netlink_from_env() -> bool {
    std::env::var(FORCE_NETLINK_ENV).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

fn marker(pin_dir: &Path) -> PathBuf {
    pin_dir.join("tc-netlink")
}

/// Records the mode for other processes (skiff-cni).
pub(crate) fn record_mode(pin_dir: &Path, mode: TcAttachMode) -> Result<(), DatapathError> {
    let m = marker(pin_dir);
    match mode {
        TcAttachMode::Netlink => std::fs::create_dir_all(&m).map_err(io_err(format!("creating {}", m.display()))),
        TcAttachMode::Tcx if m.exists() => std::fs::remove_dir(&m).map_err(io_err(format!("removing {}", m.display()))),
        TcAttachMode::Tcx => Ok(()),
    }
}

/// The mode the agent that loaded the datapath under `pin_dir` chose.
pub fn recorded_mode(pin_dir: &Path) -> TcAttachMode {
    if marker(pin_dir).is_dir() { TcAttachMode::Netlink } else { TcAttachMode::Tcx }
}

fn handle() -> TcHandle {
    TcHandle::from(NETLINK_HANDLE)
}

fn netlink_err(iface: &str, what: &str, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Pin { path: PathBuf::from(iface), message: format!("{what}: {e}") }
}

/// Attaches `prog` as skiff's cls_bpf filter on `iface`'s ingress (calling thread's netns),
/// replacing the program of the filter already there, else creating it (and the clsact qdisc).
/// The filter outlives this process.
pub(crate) fn attach_netlink(prog: &mut SchedClassifier, iface: &str) -> Result<(), DatapathError> {
    let existing = SchedClassifierLink::attached(iface, TcAttachType::Ingress, NETLINK_PRIORITY, handle(), None)
        .map_err(|e| netlink_err(iface, "finding the interface", e))?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => id,
        // No filter there yet (ENOENT without NLM_F_CREATE): make it, with clsact first.
        Err(replace_error) => {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(netlink_err(iface, "adding the clsact qdisc", e)),
            }
            let options = TcAttachOptions::Netlink(NlOptions { priority: NETLINK_PRIORITY, handle: handle(), ..Default::default() });
            prog.attach_with_options(iface, TcAttachType::Ingress, options).map_err(|e| {
                netlink_err(iface, "attaching the cls_bpf filter", format!("{e} (replacing in place failed too: {replace_error})"))
            })?
        }
    };
    // Dropping aya's link would delete the filter: it must stay after this process.
    let link = prog.take_link(id).map_err(|e| netlink_err(iface, "taking the link", e))?;
    std::mem::forget(link);
    Ok(())
}

/// Removes skiff's cls_bpf filter from `iface` (calling thread's netns). No interface or no
/// filter: nothing to do.
pub(crate) fn detach_netlink(iface: &str) -> Result<(), DatapathError> {
    let Ok(link) = SchedClassifierLink::attached(iface, TcAttachType::Ingress, NETLINK_PRIORITY, handle(), None) else {
        return Ok(());
    };
    match link.detach() {
        Ok(()) => Ok(()),
        Err(aya::programs::ProgramError::NetlinkError(e)) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::ENODEV)) => Ok(()),
        Err(e) => Err(netlink_err(iface, "removing the cls_bpf filter", e)),
    }
}
