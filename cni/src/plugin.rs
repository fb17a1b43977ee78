//! The CNI commands. Each validates all of its input (environment and configuration) before it
//! changes anything, and holds the IPAM lock while it changes the node, so concurrent calls for
//! one node are serialized.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path, time::Duration};

use serde_json::{Value, json};
use skiff_datapath::{EndpointSpec, pod};

use crate::{
    config::{Command, Env, LATEST_VERSION, NetConf, SUPPORTED_VERSIONS, peek_version},
    error::{CniError, CniResult, code},
    host_veth_name,
    ipam::{Allocation, Ipam, Locked},
    netlink,
    result::{self, Attachment},
};

/// How long a call waits for another one holding the IPAM lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one CNI call. Ok(Some(json)) is printed on stdout; Ok(None) prints nothing (DEL, CHECK,
/// GC, STATUS succeed silently); Err is printed as a CNI error.
pub fn run(env: &Env, stdin: &[u8]) -> CniResult<Option<Value>> {
    let cmd = env.command()?;
    if cmd == Command::Version {
        return Ok(Some(version(stdin)));
    }
    env.require_path(cmd)?;
    match cmd {
        Command::Add => add(env, stdin).map(Some),
        Command::Del => del(env, stdin).map(|()| None),
        Command::Check => check(env, stdin).map(|()| None),
        Command::Gc => gc(env, stdin).map(|()| None),
        Command::Status => status(env, stdin).map(|()| None),
        Command::Version => Ok(Some(version(stdin))),
    }
}

/// The version to print an error in: the caller's when this plugin speaks it.
pub fn error_version(stdin: &[u8]) -> String {
    peek_version(stdin)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string())
}

fn version(stdin: &[u8]) -> Value {
    json!({
        "cniVersion": error_version(stdin),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// Fails early, before any change, when the datapath this config names is not there.
fn require_datapath(conf: &NetConf) -> CniResult<()> {
    if let Some(pin) = &conf.pin_dir {
        let prog = pod::from_pod_pin_path(pin);
        if !prog.exists() {
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "the skiff datapath is not loaded under pinDir {}: {} is missing (the agent pins it when it starts)",
                    pin.display(),
                    prog.display()
                ),
            ));
        }
    }
    Ok(())
}

fn lock(conf: &NetConf) -> CniResult<Locked> {
    Ipam::new(&conf.data_dir).lock(LOCK_TIMEOUT)
}

fn add(env: &Env, stdin: &[u8]) -> CniResult<Value> {
    let cmd = Command::Add;
    let container_id = env.container_id(cmd)?;
    let ifname = env.ifname(cmd)?;
    let netns_path = env.netns(cmd)?;
    env.cni_args()?;
    let conf = NetConf::parse(stdin, cmd)?;
    let netns = netlink::open_netns(&netns_path)?;
    require_datapath(&conf)?;

    let ipam = lock(&conf)?;
    let (alloc, fresh) = ipam.allocate(conf.pod_cidr, &container_id, &ifname)?;
    let host_if = host_veth_name(&container_id, &ifname);
    let done = wire(&conf, &host_if, &ifname, &netns, &alloc);
    let wired = match done {
        Ok(w) => w,
        Err(e) => {
            if fresh && let Err(re) = ipam.release_ip(alloc.ip) {
                tracing::warn!(error = %re, ip = %alloc.ip, "releasing the address of a failed ADD");
            }
            return Err(e);
        }
    };
    tracing::info!(%container_id, %ifname, ip = %alloc.ip, %host_if, "pod attached");
    let att = Attachment {
        host_if,
        host_mac: wired.host.mac,
        pod_if: ifname,
        pod_mac: wired.pod.mac,
        sandbox: netns_path.to_string_lossy().into_owned(),
        ip: alloc.ip,
        gateway: conf.gateway,
        mtu: conf.mtu,
    };
    Ok(result::add_result(
        &conf.cni_version,
        &att,
        conf.prev_result.as_ref(),
    ))
}

/// The veth and routes, then the datapath; undoes the veth when the datapath step fails.
fn wire(
    conf: &NetConf,
    host_if: &str,
    ifname: &str,
    netns: &std::fs::File,
    alloc: &Allocation,
) -> CniResult<netlink::Wired> {
    let wired = netlink::setup(host_if, ifname, netns, conf.mtu, alloc.ip, conf.gateway)?;
    if let Some(pin) = &conf.pin_dir {
        let spec = EndpointSpec {
            host_ifindex: wired.host.index,
            pod_mac: wired.pod.mac,
            host_mac: wired.host.mac,
        };
        if let Err(e) = skiff_datapath::attach_pod(pin, host_if, alloc.ip, &spec) {
            let _ = skiff_datapath::detach_pod(pin, host_if, alloc.ip);
            let _ = netlink::delete_host_veth(host_if);
            return Err(CniError::io(
                format!(
                    "registering the pod with the datapath under {}",
                    pin.display()
                ),
                e,
            ));
        }
    }
    Ok(wired)
}

/// Removes what ADD made for one attachment: datapath entry and link, host veth, address.
fn remove_attachment(pin_dir: Option<&Path>, host_if: &str, ip: Option<Ipv4Addr>) -> CniResult<()> {
    if let Some(pin) = pin_dir {
        // Without a known address only the link pins go: 0.0.0.0 is never an endpoint.
        skiff_datapath::detach_pod(pin, host_if, ip.unwrap_or(Ipv4Addr::UNSPECIFIED)).map_err(
            |e| {
                CniError::io(
                    format!("removing the pod from the datapath under {}", pin.display()),
                    e,
                )
            },
        )?;
    }
    netlink::delete_host_veth(host_if)?;
    Ok(())
}

fn del(env: &Env, stdin: &[u8]) -> CniResult<()> {
    let cmd = Command::Del;
    let container_id = env.container_id(cmd)?;
    let ifname = env.ifname(cmd)?;
    env.cni_args()?;
    let conf = NetConf::parse(stdin, cmd)?;
    // CNI_NETNS may be empty or gone: the host side is found by name, so it is not needed.
    let ipam = lock(&conf)?;
    let alloc = ipam.find(&container_id, &ifname)?;
    let host_if = host_veth_name(&container_id, &ifname);
    remove_attachment(
        conf.pin_dir.as_deref(),
        &host_if,
        alloc.as_ref().map(|a| a.ip),
    )?;
    if let Some(a) = &alloc {
        ipam.release_ip(a.ip)?;
    }
    tracing::info!(%container_id, %ifname, ip = ?alloc.map(|a| a.ip), "pod detached");
    Ok(())
}

fn check(env: &Env, stdin: &[u8]) -> CniResult<()> {
    let cmd = Command::Check;
    let container_id = env.container_id(cmd)?;
    let ifname = env.ifname(cmd)?;
    let netns_path = env.netns(cmd)?;
    env.cni_args()?;
    let conf = NetConf::parse(stdin, cmd)?;
    let netns = netlink::open_netns(&netns_path)?;
    let ipam = lock(&conf)?;
    let Some(alloc) = ipam.find(&container_id, &ifname)? else {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "CHECK: no address is allocated to container {container_id} interface {ifname}: was ADD run?"
            ),
        ));
    };
    if let Some(prev) = &conf.prev_result {
        let sandbox = netns_path.to_string_lossy();
        let want = format!("{}/32", alloc.ip);
        match result::address_for(prev, &ifname, &sandbox) {
            Some(a) if a == want => {}
            other => {
                return Err(CniError::invalid_config(format!(
                    "CHECK: prevResult gives {ifname} in {sandbox} {}, but skiff-cni allocated {want}",
                    other.unwrap_or_else(|| "no address".into())
                )));
            }
        }
    }
    let host_if = host_veth_name(&container_id, &ifname);
    let host = netlink::check(&host_if, &ifname, &netns, alloc.ip, conf.gateway)?;
    if let Some(pin) = &conf.pin_dir {
        let ep = pod::endpoint(pin, alloc.ip).map_err(|e| {
            CniError::io(
                format!("CHECK: reading the datapath under {}", pin.display()),
                e,
            )
        })?;
        match ep {
            Some(ep) if ep.host_ifindex == host.index && ep.host_mac == host.mac => {}
            Some(_) => {
                return Err(CniError::io(
                    format!(
                        "CHECK failed: the datapath's endpoint for {} points at another interface",
                        alloc.ip
                    ),
                    "run DEL and ADD again to repair",
                ));
            }
            None => {
                return Err(CniError::io(
                    format!(
                        "CHECK failed: the datapath has no endpoint for {}",
                        alloc.ip
                    ),
                    "run DEL and ADD again to repair",
                ));
            }
        }
        let want = pin
            .join("links")
            .join(format!("tc-{host_if}-{}", host.index));
        if !want.exists() {
            return Err(CniError::io(
                format!(
                    "CHECK failed: from_pod is not attached to {host_if} ({} is missing)",
                    want.display()
                ),
                "run DEL and ADD again to repair",
            ));
        }
    }
    Ok(())
}

fn gc(_env: &Env, stdin: &[u8]) -> CniResult<()> {
    let conf = NetConf::parse(stdin, Command::Gc)?;
    let Some(valid) = &conf.valid_attachments else {
        return Err(CniError::invalid_config(
            "GC needs cni.dev/valid-attachments (the attachments to keep); without it nothing is removed",
        ));
    };
    let keep: BTreeSet<(&str, &str)> = valid
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let ipam = lock(&conf)?;
    let mut removed = 0usize;
    for a in ipam.list()? {
        if keep.contains(&(a.container_id.as_str(), a.ifname.as_str())) {
            continue;
        }
        let host_if = host_veth_name(&a.container_id, &a.ifname);
        remove_attachment(conf.pin_dir.as_deref(), &host_if, Some(a.ip))?;
        ipam.release_ip(a.ip)?;
        removed += 1;
        tracing::info!(container_id = %a.container_id, ifname = %a.ifname, ip = %a.ip, "GC removed a stale attachment");
    }
    tracing::info!(removed, kept = keep.len(), "GC done");
    Ok(())
}

fn status(_env: &Env, stdin: &[u8]) -> CniResult<()> {
    let conf = NetConf::parse(stdin, Command::Status)?;
    let unavailable = |msg: String| CniError::new(code::PLUGIN_NOT_AVAILABLE, msg);
    std::fs::create_dir_all(&conf.data_dir).map_err(|e| {
        unavailable(format!(
            "dataDir {} cannot be created",
            conf.data_dir.display()
        ))
        .with_details(e)
    })?;
    let probe = conf
        .data_dir
        .join(format!(".status-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| {
        unavailable(format!(
            "dataDir {} is not writable",
            conf.data_dir.display()
        ))
        .with_details(e)
    })?;
    let _ = std::fs::remove_file(&probe);
    if let Some(pin) = &conf.pin_dir {
        let prog = pod::from_pod_pin_path(pin);
        if !prog.exists() {
            return Err(unavailable(format!(
                "the skiff datapath is not loaded: {} is missing (is the agent running with --pin-dir {}?)",
                prog.display(),
                pin.display()
            )));
        }
    }
    Ok(())
}
