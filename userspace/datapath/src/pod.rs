//! Registering pods with a datapath that another process loaded (the CNI plugin's side).
//!
//! The agent loads the datapath once ([`Datapath::load`]), which also pins the loaded `from_pod`
//! program at `<pin_dir>/programs/from_pod`. A CNI plugin is a short-lived process that must not
//! carry or load the eBPF object (the verifier would run on every pod start), so it attaches that
//! pinned program to a new veth and writes the pod's ENDPOINTS entry through the pinned maps:
//! [`attach_pod`] on CNI ADD, [`detach_pod`] on CNI DEL. Link pins use the same names as
//! [`Datapath::attach_tc`] (`<pin_dir>/links/tc-<iface>-<ifindex>`), so either side can replace
//! or remove what the other made. On kernels without TCX (the agent recorded netlink mode, see
//! [`crate::tc_attach`]) the pinned program becomes skiff's cls_bpf filter on the veth, by the
//! same fixed priority and handle the agent uses.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::programs::{SchedClassifier, TcAttachType, links::FdLink};
use skiff_ebpf_common::{map_names, program_names};
use tracing::debug;

use crate::{Datapath, DatapathError, EndpointSpec, addr_of, ifindex_of, io_err, prog_err};

/// Where the agent pins the loaded `from_pod` program under a datapath's pin directory.
pub fn from_pod_pin_path(pin_dir: &Path) -> PathBuf {
    pin_dir.join("programs").join(program_names::FROM_POD)
}

fn tc_link_path(pin_dir: &Path, iface: &str, ifindex: u32) -> PathBuf {
    pin_dir.join("links").join(format!("tc-{iface}-{ifindex}"))
}

/// Pins a loaded `from_pod` at `<pin_dir>/programs/from_pod`, replacing an older pin without a
/// moment where the path is missing (pin under a temporary name, then rename over the old one:
/// bpffs supports rename), so a concurrent CNI ADD always finds a program.
pub(crate) fn pin_from_pod(
    prog: &mut SchedClassifier,
    pin_dir: &Path,
) -> Result<(), DatapathError> {
    let dir = pin_dir.join("programs");
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let path = from_pod_pin_path(pin_dir);
    // bpffs refuses names with a '.', so the temporary name has none.
    let tmp = dir.join(format!(
        "{}_new_{}",
        program_names::FROM_POD,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_file(&tmp).map_err(io_err(format!("removing {}", tmp.display())))?;
    }
    prog.pin(&tmp).map_err(|e| DatapathError::Pin {
        path: tmp.clone(),
        message: match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    })?;
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(format!(
            "renaming {} to {}",
            tmp.display(),
            path.display()
        ))(e));
    }
    debug!(path = %path.display(), "from_pod pinned");
    Ok(())
}

/// Attaches the pinned `from_pod` program to `host_if`'s ingress, the host side of a pod's veth
/// in the calling thread's network namespace: with TCX, pinning the link under
/// `<pin_dir>/links/` (as [`Datapath::attach_tc`] names it, replacing an older link there); in
/// the netlink mode the agent recorded, as skiff's cls_bpf filter (replaced in place when one is
/// there; see [`crate::tc_attach`]). Then writes the pod's
/// ENDPOINTS entry (`pod_ip` -> host ifindex, pod MAC, host MAC). If writing the endpoint fails,
/// the link just made is removed again.
pub fn attach_pod(
    pin_dir: &Path,
    host_if: &str,
    pod_ip: Ipv4Addr,
    ep: &EndpointSpec,
) -> Result<(), DatapathError> {
    let prog_path = from_pod_pin_path(pin_dir);
    if !prog_path.exists() {
        return Err(DatapathError::Missing(format!(
            "pinned program {} (the agent pins it when it loads the datapath: is the agent running with this --pin-dir?)",
            prog_path.display()
        )));
    }
    let ifindex = ifindex_of(host_if)?;
    let name = program_names::FROM_POD;
    let mut prog = SchedClassifier::from_pin(&prog_path).map_err(prog_err(name))?;
    let link_path = tc_link_path(pin_dir, host_if, ifindex);
    if crate::tc_attach::recorded_mode(pin_dir) == crate::TcAttachMode::Netlink {
        crate::tc_attach::attach_netlink(&mut prog, host_if)?;
        crate::remove_link_pin(&link_path)?;
        if let Err(e) = write_endpoint(pin_dir, pod_ip, ep, None) {
            let _ = crate::tc_attach::detach_netlink(host_if);
            return Err(e);
        }
        debug!(host_if, ifindex, %pod_ip, "pod attached to the datapath (netlink cls_bpf)");
        return Ok(());
    }
    let id = match prog.attach_with_options(host_if, TcAttachType::Ingress, aya::programs::tc::TcAttachOptions::TcxOrder(Default::default())) {
        Ok(id) => id,
        // This very program is attached there already (TCX refuses a program twice on one
        // hook): when its link is the one pinned for this interface, the pod is attached.
        Err(aya::programs::ProgramError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::EEXIST) && link_path.exists() =>
        {
            return write_endpoint(pin_dir, pod_ip, ep, None);
        }
        Err(e) => return Err(prog_err(name)(e)),
    };
    let link = prog.take_link(id).map_err(prog_err(name))?;
    let fd_link: FdLink = link.try_into().map_err(|e| DatapathError::Pin {
        path: PathBuf::from(host_if),
        message: format!("tc link is not a TCX bpf_link (kernel < 6.6?): {e}"),
    })?;
    let links = pin_dir.join("links");
    std::fs::create_dir_all(&links).map_err(io_err(format!("creating {}", links.display())))?;
    Datapath::pin_replacing(fd_link, &link_path)?;
    write_endpoint(pin_dir, pod_ip, ep, Some(&link_path))?;
    debug!(host_if, ifindex, %pod_ip, "pod attached to the datapath");
    Ok(())
}

/// Writes the ENDPOINTS entry; on failure removes `undo_link` (the link just pinned).
fn write_endpoint(
    pin_dir: &Path,
    pod_ip: Ipv4Addr,
    ep: &EndpointSpec,
    undo_link: Option<&Path>,
) -> Result<(), DatapathError> {
    let written = Datapath::open_pinned(pin_dir).and_then(|mut dp| dp.upsert_endpoint(pod_ip, ep));
    if let Err(e) = written {
        if let Some(link) = undo_link {
            let _ = crate::remove_link_pin(link);
        }
        return Err(e);
    }
    Ok(())
}

/// Undoes [`attach_pod`]: removes every link pinned for `host_if_name` (whatever its ifindex
/// was: the interface may already be gone), skiff's netlink filter on it (if the interface is
/// still here in the calling thread's namespace) and the ENDPOINTS entry of `pod_ip`.
/// Idempotent, and a no-op when `pin_dir` does not exist (the datapath was torn down: nothing
/// left to remove).
pub fn detach_pod(
    pin_dir: &Path,
    host_if_name: &str,
    pod_ip: Ipv4Addr,
) -> Result<(), DatapathError> {
    if !pin_dir.exists() {
        return Ok(());
    }
    let links = pin_dir.join("links");
    if links.is_dir() {
        let prefix = format!("tc-{host_if_name}-");
        let entries =
            std::fs::read_dir(&links).map_err(io_err(format!("reading {}", links.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("reading {}", links.display())))?;
            let file = entry.file_name();
            let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
                continue;
            };
            if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                crate::remove_link_pin(&entry.path())?;
            }
        }
    }
    crate::tc_attach::detach_netlink(host_if_name)?;
    if pin_dir.join(map_names::ENDPOINTS).exists() {
        let mut dp = Datapath::open_pinned(pin_dir)?;
        // aya's HashMap::remove reports a missing key as the raw ENOENT of bpf_map_delete_elem
        // (not MapError::KeyNotFound), so absence is checked first: a second DEL is no error.
        if endpoint_of(&dp, pod_ip)?.is_some() {
            dp.delete_endpoint(pod_ip)?;
        }
    }
    debug!(host_if_name, %pod_ip, "pod detached from the datapath");
    Ok(())
}

/// The ENDPOINTS entry of `pod_ip` in the maps pinned under `pin_dir`, if any.
pub fn endpoint(pin_dir: &Path, pod_ip: Ipv4Addr) -> Result<Option<EndpointSpec>, DatapathError> {
    endpoint_of(&Datapath::open_pinned(pin_dir)?, pod_ip)
}

fn endpoint_of(dp: &Datapath, pod_ip: Ipv4Addr) -> Result<Option<EndpointSpec>, DatapathError> {
    match dp.endpoints.get(&addr_of(pod_ip), 0) {
        Ok(v) => Ok(Some(EndpointSpec {
            host_ifindex: v.host_ifindex,
            pod_mac: v.pod_mac,
            host_mac: v.host_mac,
        })),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(crate::map_err(map_names::ENDPOINTS)(e)),
    }
}

/// The links pinned for `host_if_name` (paths under `<pin_dir>/links/`).
pub fn pod_link_pins(pin_dir: &Path, host_if_name: &str) -> Vec<PathBuf> {
    let prefix = format!("tc-{host_if_name}-");
    let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|f| f.strip_prefix(&prefix))
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}
