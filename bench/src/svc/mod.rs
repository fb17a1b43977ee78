//! The Service datapath benchmark (issue 6): skiff's eBPF datapath (socket layer, tc layer, XDP
//! NodePort) against kube-proxy-shaped iptables (legacy and nft backends) and nftables rules and
//! against the direct pod path, on one lab, in one run, with the same client and server programs.
//!
//! - [`model`]: the Services a run installs (pure).
//! - [`kubeproxy`]: kube-proxy's iptables-restore and nft input for them (pure).
//! - [`workload`]: the server and client programs (TCP_CRR, TCP_RR, TCP_STREAM, UDP_RR).
//! - [`lab`]: the netns lab, child processes, installers.
//! - [`run`]: the sweep and the programming-time measurements, producing a [`run::Record`].
//! - [`report`]: targets, the markdown table and the SVG charts.

pub mod kubeproxy;
pub mod lab;
pub mod model;
pub mod report;
pub mod run;
pub mod workload;

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Moves the calling thread into network namespace `netns` (threads spawned afterwards follow).
pub fn enter_netns(netns: &str) -> anyhow::Result<()> {
    let f = File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening network namespace {netns}"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns {netns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves this process into cgroup v2 directory `dir`.
pub fn join_cgroup(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining cgroup {}", dir.display()))
}

/// Pins this process (and the threads it starts afterwards) to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `server` role: serve until stdin closes (the harness holds it) or `max` passes.
pub fn server_main(
    netns: &str,
    ip: Ipv4Addr,
    ports: &[u16],
    workers: usize,
    max: Duration,
) -> anyhow::Result<()> {
    enter_netns(netns)?;
    let stop = Arc::new(AtomicBool::new(false));
    workload::serve(ip, ports, workers, stop).context("binding the server sockets")?;
    println!("ready");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(max);
    Ok(())
}

/// The `client` role: run the workloads one after the other and print their results as JSON.
pub fn client_main(
    netns: &str,
    cgroup: Option<&Path>,
    targets: &[SocketAddrV4],
    workloads: &[workload::Workload],
    duration: Duration,
) -> anyhow::Result<()> {
    if let Some(cg) = cgroup {
        join_cgroup(cg)?;
    }
    enter_netns(netns)?;
    // Warm-up, not recorded: neighbour entries, conntrack and map entries for every target.
    let warm = workload::Workload {
        kind: workload::Kind::Crr,
        parallel: 1,
    };
    let t = Instant::now();
    let _ = workload::run(warm, targets, Duration::from_millis(200));
    tracing::debug!(elapsed = ?t.elapsed(), "warm-up");
    let results: Vec<workload::Measurement> = workloads
        .iter()
        .map(|w| workload::run(*w, targets, duration))
        .collect();
    println!("{}", serde_json::to_string(&results)?);
    Ok(())
}
