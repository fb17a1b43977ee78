//! The benchmark run: for every scale, one fresh lab per datapath (plain, skiff, iptables-legacy,
//! iptables-nft, nftables), the Services installed (timed), the same client workloads from a pod
//! (ClusterIP) and from outside the node (NodePort); then the programming-time measurements.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use skiff_datapath::{BackendSpec, Datapath, MapState, Proto, ServiceSpec, plan};
use tracing::{info, warn};

use super::{
    kubeproxy,
    lab::{BenchLab, NODEPORT_SNAT, node_ip, output_in_netns, run_in_netns},
    model::{self, Endpoint, Protocol, ServiceSet},
    workload::{Measurement, Workload},
};

/// The datapaths a lab can be set up with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// No rules, no eBPF: pod to pod through the node's routing.
    Plain,
    Skiff,
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl Backend {
    pub const ALL: [Backend; 5] = [
        Backend::Plain,
        Backend::Skiff,
        Backend::IptablesLegacy,
        Backend::IptablesNft,
        Backend::Nftables,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Backend::Plain => "plain",
            Backend::Skiff => "skiff",
            Backend::IptablesLegacy => "iptables-legacy",
            Backend::IptablesNft => "iptables-nft",
            Backend::Nftables => "nftables",
        }
    }
    pub fn parse(s: &str) -> Result<Backend, String> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown datapath {s:?} (plain, skiff, iptables-legacy, iptables-nft, nftables)"
                )
            })
    }
    /// A short tag for namespace names.
    fn tag(self) -> &'static str {
        match self {
            Backend::Plain => "pl",
            Backend::Skiff => "sk",
            Backend::IptablesLegacy => "il",
            Backend::IptablesNft => "in",
            Backend::Nftables => "nf",
        }
    }
    fn restore_tool(self) -> Option<&'static str> {
        match self {
            Backend::IptablesLegacy => Some("iptables-legacy-restore"),
            Backend::IptablesNft => Some("iptables-nft-restore"),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub scales: Vec<usize>,
    pub duration: Duration,
    pub workloads: Vec<Workload>,
    pub backends: Vec<Backend>,
    pub servers: usize,
    pub probes: usize,
    pub endpoints_per_service: usize,
    /// Programming benchmark size (0 = skip): services, endpoints per service.
    pub program_services: usize,
    pub program_endpoints: usize,
    /// Profile crr under perf at this scale (None = no profiles).
    pub profile_scale: Option<usize>,
    pub install_timeout: Duration,
    /// Bound on each step of the programming benchmark.
    pub program_timeout: Duration,
    /// iptables-nft and nftables labs only up to this many Services (their install time grows
    /// much faster than the rule count; see the notes a run writes).
    pub nft_max_scale: usize,
    pub iptables_nft_max_scale: usize,
    /// Free-text notes for the record (e.g. measurements made outside the run).
    pub notes: Vec<String>,
    /// At the target scale, in skiff's lab: rounds of the CRR workload alternating skiff-direct
    /// and skiff-sock (0 = none), each round this long.
    pub interleave_rounds: usize,
    pub interleave_duration: Duration,
    /// CPUs for (clients, servers); None leaves placement to the scheduler.
    pub pin: Option<(usize, usize)>,
    pub command: String,
    pub exe: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub memory_mb: u64,
    pub load_before: String,
    pub tools: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathResult {
    pub scale: usize,
    /// e.g. `skiff-sock`, `iptables-nft`, `np-skiff-xdp`.
    pub path: String,
    /// `clusterip` (client in a pod) or `nodeport` (client outside the node).
    pub family: String,
    pub backend: Backend,
    /// Seconds to install this scale's Services on this datapath (None: nothing to install).
    pub install_s: Option<f64>,
    /// Endpoints per Service actually installed (skiff caps it where its maps are too small).
    pub endpoints_per_service: usize,
    pub note: Option<String>,
    pub error: Option<String>,
    pub measurements: Vec<Measurement>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgStep {
    /// `skiff`, `iptables-legacy`, `iptables-nft`, `nftables`.
    pub system: String,
    /// `full` (all Services into an empty datapath), `plan` (skiff's pure diff alone),
    /// `one-endpoint` (the incremental change), `one-endpoint-full-diff`, `one-endpoint-partial`
    /// (kube-proxy >= 1.28 partial restore), `one-endpoint-full-restore`.
    pub step: String,
    pub seconds: Option<f64>,
    pub detail: String,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Programming {
    pub services: usize,
    pub endpoints: usize,
    pub steps: Vec<ProgStep>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Profile {
    pub scale: usize,
    pub path: String,
    pub workload: String,
    /// `perf report --sort symbol` lines (top of the flat profile, whole machine).
    pub top: Vec<String>,
    pub error: Option<String>,
}

/// Paths of one lab measured in alternating short rounds (so machine noise, which drifts over
/// seconds here, hits them alike): the first series is the reference the others are divided by,
/// round by round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Interleaved {
    pub scale: usize,
    pub workload: String,
    pub round_s: f64,
    /// (path, its rate in each round); within a round the order rotates.
    pub series: Vec<(String, Vec<f64>)>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub command: String,
    pub date: String,
    pub machine: Machine,
    pub duration_s: f64,
    pub scales: Vec<usize>,
    pub workloads: Vec<String>,
    pub servers: usize,
    pub probes: usize,
    pub endpoints_per_service: usize,
    /// CPUs the client and server programs were pinned to.
    pub pin: Option<(usize, usize)>,
    pub paths: Vec<PathResult>,
    pub programming: Option<Programming>,
    pub profiles: Vec<Profile>,
    #[serde(default)]
    pub interleaved: Vec<Interleaved>,
    pub targets: Vec<super::report::Target>,
    pub notes: Vec<String>,
    pub program_timeout_s: f64,
    pub elapsed_s: f64,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|| format!("{cmd}: not found"))
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let memory_mb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    Machine {
        nproc: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpu,
        memory_mb,
        load_before: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        tools: vec![
            first_line("iptables-legacy", &["--version"]),
            first_line("iptables-nft", &["--version"]),
            first_line("nft", &["--version"]),
        ],
    }
}

fn to_proto(p: Protocol) -> Proto {
    match p {
        Protocol::Tcp => Proto::Tcp,
        Protocol::Udp => Proto::Udp,
    }
}

fn backends_of(eps: &[Endpoint]) -> Vec<BackendSpec> {
    eps.iter()
        .map(|e| BackendSpec {
            ip: IpAddr::V4(e.ip),
            port: e.port,
            ready: true,
            terminating: false,
        })
        .collect()
}

/// skiff's frontends for the set: the ClusterIPs, and the probes' NodePorts on the node IP.
pub fn skiff_specs(set: &ServiceSet) -> (Vec<ServiceSpec>, Vec<ServiceSpec>) {
    let cluster = set
        .ports
        .iter()
        .map(|p| ServiceSpec {
            vip: IpAddr::V4(p.vip),
            port: p.port,
            proto: to_proto(p.proto),
            backends: backends_of(&p.endpoints),
            affinity_timeout: None,
            external_traffic_local: false,
        })
        .collect();
    let nodeports = set
        .ports
        .iter()
        .filter_map(|p| {
            p.node_port.map(|np| ServiceSpec {
                vip: IpAddr::V4(node_ip()),
                port: np,
                proto: to_proto(p.proto),
                backends: backends_of(&p.endpoints),
                affinity_timeout: None,
                external_traffic_local: false,
            })
        })
        .collect();
    (cluster, nodeports)
}

/// The largest endpoints-per-service that fits skiff's BACKENDS map for `services` services
/// (NodePort frontends of the probes take some entries too).
fn skiff_capacity(services: usize, probes: usize, wanted: usize) -> usize {
    let max = skiff_ebpf_common::MAX_BACKENDS as usize;
    let reserve = probes * 4 * wanted + 64;
    if services * wanted + reserve <= max {
        wanted
    } else {
        ((max - reserve) / services).max(1)
    }
}

struct Installed {
    seconds: Option<f64>,
    dp: Option<Datapath>,
    cgroup: Option<PathBuf>,
    note: Option<String>,
}

fn install(
    bl: &mut BenchLab,
    backend: Backend,
    set: &ServiceSet,
    timeout: Duration,
) -> anyhow::Result<Installed> {
    let node = bl.lab.node.clone();
    match backend {
        Backend::Plain => Ok(Installed {
            seconds: None,
            dp: None,
            cgroup: None,
            note: None,
        }),
        Backend::Skiff => {
            let mut dp = bl.lab.datapath();
            bl.lab
                .in_node(|| dp.attach_xdp("up0"))
                .context("attaching XDP to the uplink")?;
            dp.set_nodeport_snat(NODEPORT_SNAT)?;
            let (cluster, nodeports) = skiff_specs(set);
            let t = Instant::now();
            dp.sync_services(&cluster).context("programming skiff's maps")?;
            for np in &nodeports {
                dp.upsert_nodeport(np).context("programming a NodePort")?;
            }
            let seconds = t.elapsed().as_secs_f64();
            let cg = bl.lab.cgroup();
            dp.attach_cgroup(&cg).context("attaching the socket layer")?;
            Ok(Installed {
                seconds: Some(seconds),
                dp: Some(dp),
                cgroup: Some(cg),
                note: None,
            })
        }
        Backend::IptablesLegacy | Backend::IptablesNft => {
            // One plain restore into the empty namespace: the kernel ends up with exactly the
            // rules kube-proxy's --noflush restores leave (see kubeproxy::iptables_fresh); the
            // --noflush timing is the programming benchmark's.
            let tool = backend.restore_tool().unwrap_or("iptables-restore");
            let rules = kubeproxy::iptables_fresh(set);
            let d = run_in_netns(&node, tool, &[], &rules, timeout)?;
            Ok(Installed {
                seconds: Some(d.as_secs_f64()),
                dp: None,
                cgroup: None,
                note: Some(format!("{} rule lines, one plain restore", rules.lines().count())),
            })
        }
        Backend::Nftables => {
            let rules = kubeproxy::nft_full(set);
            let d = run_in_netns(&node, "nft", &["-f", "/dev/stdin"], &rules, timeout)?;
            Ok(Installed {
                seconds: Some(d.as_secs_f64()),
                dp: None,
                cgroup: None,
                note: Some(format!("{} nft commands", rules.lines().count())),
            })
        }
    }
}

/// Runs `client` in `netns` under `perf record -a` and returns the top of the flat profile.
fn profile(
    bl: &BenchLab,
    netns: &str,
    cgroup: Option<&std::path::Path>,
    targets: &[SocketAddrV4],
    workload: &str,
    duration: Duration,
) -> anyhow::Result<Vec<String>> {
    let data = std::env::temp_dir().join(format!(
        "svcbench-perf-{}-{}.data",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    let secs = format!("{:.1}", duration.as_secs_f64() + 0.2);
    let mut perf = Command::new("perf")
        .args(["record", "-a", "-F", "999", "-o"])
        .arg(&data)
        .args(["--", "sleep", &secs])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf (apt-get install linux-perf)")?;
    let run = bl.run_client(netns, cgroup, targets, &[workload.to_string()], duration);
    let status = perf.wait()?;
    run?;
    if !status.success() {
        let _ = std::fs::remove_file(&data);
        bail!("perf record failed ({status})");
    }
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "symbol", "-i"])
        .arg(&data)
        .args(["--percent-limit", "1.5"])
        .output()
        .context("perf report")?;
    let _ = std::fs::remove_file(&data);
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(25)
        .map(|l| l.trim_end().to_string())
        .collect())
}

struct Target<'a> {
    path: &'static str,
    family: &'static str,
    netns: &'a str,
    cgroup: Option<&'a std::path::Path>,
    targets: Vec<SocketAddrV4>,
}

/// One lab for `backend` at `scale`: install, measure every path it carries, tear down.
fn measure_backend(
    opts: &Options,
    backend: Backend,
    scale: usize,
    record: &mut Record,
) -> anyhow::Result<()> {
    let mut bl = BenchLab::new(&format!("svb-{}", backend.tag()), opts.servers, &opts.exe);
    bl.pin = opts.pin;
    let real = model::real_endpoints(&bl.server_ips(), opts.endpoints_per_service);
    let mut per_service = opts.endpoints_per_service;
    let mut note = None;
    if backend == Backend::Skiff {
        per_service = skiff_capacity(scale, opts.probes, opts.endpoints_per_service);
        if per_service != opts.endpoints_per_service {
            note = Some(format!(
                "{scale} x {} endpoints exceed skiff's BACKENDS map ({} entries): installed {per_service} per Service",
                opts.endpoints_per_service,
                skiff_ebpf_common::MAX_BACKENDS
            ));
        }
    }
    let set = model::build(scale, per_service, opts.probes, &real)?;
    bl.start_servers(
        &model::server_ports(opts.servers, opts.endpoints_per_service),
        4,
    )?;
    let t = Instant::now();
    let installed = install(&mut bl, backend, &set, opts.install_timeout);
    info!(backend = backend.name(), scale, elapsed = ?t.elapsed(), ok = installed.is_ok(), "installed");
    let workloads: Vec<String> = opts.workloads.iter().map(|w| w.name()).collect();
    let client = bl.client_netns().to_string();
    let ext = bl.ext.clone();
    let direct: Vec<SocketAddrV4> = real.iter().map(|e| SocketAddrV4::new(e.ip, e.port)).collect();
    let vips = set.probe_frontends();
    let nodeports = set.probe_node_ports(node_ip());
    let installed = match installed {
        Ok(i) => i,
        Err(e) => {
            // Every path of this lab failed the same way: record it and carry on.
            for (path, family) in paths_of(backend) {
                record.paths.push(PathResult {
                    scale,
                    path: path.to_string(),
                    family: family.to_string(),
                    backend,
                    install_s: None,
                    endpoints_per_service: per_service,
                    note: note.clone(),
                    error: Some(format!("install: {e:#}")),
                    measurements: vec![],
                });
            }
            return Ok(());
        }
    };
    let cg = installed.cgroup.as_deref();
    let runs: Vec<Target> = match backend {
        Backend::Plain => vec![
            Target { path: "direct", family: "clusterip", netns: &client, cgroup: None, targets: direct.clone() },
            Target { path: "np-direct", family: "nodeport", netns: &ext, cgroup: None, targets: direct.clone() },
        ],
        Backend::Skiff => vec![
            Target { path: "skiff-direct", family: "clusterip", netns: &client, cgroup: None, targets: direct.clone() },
            Target { path: "skiff-sock", family: "clusterip", netns: &client, cgroup: cg, targets: vips.clone() },
            Target { path: "skiff-tc", family: "clusterip", netns: &client, cgroup: None, targets: vips.clone() },
            Target { path: "np-skiff-xdp", family: "nodeport", netns: &ext, cgroup: None, targets: nodeports.clone() },
        ],
        b => {
            let (cl, np) = match b {
                Backend::IptablesLegacy => ("iptables-legacy", "np-iptables-legacy"),
                Backend::IptablesNft => ("iptables-nft", "np-iptables-nft"),
                _ => ("nftables", "np-nftables"),
            };
            vec![
                Target { path: cl, family: "clusterip", netns: &client, cgroup: None, targets: vips.clone() },
                Target { path: np, family: "nodeport", netns: &ext, cgroup: None, targets: nodeports.clone() },
            ]
        }
    };
    let target_scale = if opts.scales.contains(&10_000) { Some(10_000) } else { opts.scales.iter().copied().max() };
    if backend == Backend::Skiff && opts.interleave_rounds > 0 && target_scale == Some(scale) {
        let wl = opts
            .workloads
            .iter()
            .find(|w| w.kind == super::workload::Kind::Crr && w.parallel > 1)
            .or_else(|| opts.workloads.iter().find(|w| w.kind == super::workload::Kind::Crr))
            .map(|w| w.name());
        if let Some(wl) = wl {
            // Not skiff-tc: its conntrack entries outlive the run, and a later connection to a
            // backend by pod IP that reuses a client port then gets its SYN-ACK reverse-NATed to
            // the VIP and times out (a datapath finding, see the notes); so the rounds run
            // before any tc-layer flow exists.
            let order = [("skiff-direct", None, &direct), ("skiff-sock", cg, &vips)];
            let mut series: Vec<(String, Vec<f64>)> = order.iter().map(|(p, _, _)| (p.to_string(), vec![])).collect();
            let mut errors = Vec::new();
            for round in 0..opts.interleave_rounds {
                for k in 0..order.len() {
                    let i = (k + round) % order.len();
                    let (path, cgroup, targets) = order[i];
                    match bl.run_client(&client, cgroup, targets, std::slice::from_ref(&wl), opts.interleave_duration) {
                        Ok(m) if m.first().is_some_and(|m| m.errors == 0 && m.rate > 0.0) => series[i].1.push(m[0].rate),
                        Ok(m) => {
                            series[i].1.push(m.first().map_or(0.0, |m| m.rate));
                            errors.push(format!("round {round} {path}: {:?}", m.first().and_then(|m| m.first_error.clone())));
                        }
                        Err(e) => {
                            series[i].1.push(0.0);
                            errors.push(format!("round {round} {path}: {e:#}"));
                        }
                    }
                }
            }
            info!(scale, ?series, "interleaved");
            record.interleaved.push(Interleaved { scale, workload: wl, round_s: opts.interleave_duration.as_secs_f64(), series, errors });
        }
    }
    for r in &runs {
        let t = Instant::now();
        let res = bl.run_client(r.netns, r.cgroup, &r.targets, &workloads, opts.duration);
        info!(path = r.path, scale, elapsed = ?t.elapsed(), "measured");
        let (measurements, error) = match res {
            Ok(m) => (m, None),
            Err(e) => (vec![], Some(format!("{e:#}"))),
        };
        record.paths.push(PathResult {
            scale,
            path: r.path.to_string(),
            family: r.family.to_string(),
            backend,
            install_s: installed.seconds,
            endpoints_per_service: per_service,
            note: installed.note.clone().into_iter().chain(note.clone()).reduce(|a, b| format!("{a}; {b}")),
            error,
            measurements,
        });
        if opts.profile_scale == Some(scale)
            && matches!(r.path, "direct" | "skiff-sock" | "skiff-tc" | "iptables-nft")
        {
            let wl = opts
                .workloads
                .iter()
                .find(|w| w.kind == super::workload::Kind::Crr && w.parallel > 1)
                .or_else(|| opts.workloads.first())
                .map(|w| w.name())
                .unwrap_or_else(|| "crr".into());
            let p = profile(&bl, r.netns, r.cgroup, &r.targets, &wl, opts.duration);
            record.profiles.push(match p {
                Ok(top) => Profile { scale, path: r.path.into(), workload: wl, top, error: None },
                Err(e) => Profile { scale, path: r.path.into(), workload: wl, top: vec![], error: Some(format!("{e:#}")) },
            });
        }
    }
    drop(installed.dp);
    Ok(())
}

fn paths_of(b: Backend) -> Vec<(&'static str, &'static str)> {
    match b {
        Backend::Plain => vec![("direct", "clusterip"), ("np-direct", "nodeport")],
        Backend::Skiff => vec![
            ("skiff-direct", "clusterip"),
            ("skiff-sock", "clusterip"),
            ("skiff-tc", "clusterip"),
            ("np-skiff-xdp", "nodeport"),
        ],
        Backend::IptablesLegacy => vec![("iptables-legacy", "clusterip"), ("np-iptables-legacy", "nodeport")],
        Backend::IptablesNft => vec![("iptables-nft", "clusterip"), ("np-iptables-nft", "nodeport")],
        Backend::Nftables => vec![("nftables", "clusterip"), ("np-nftables", "nodeport")],
    }
}

/// The one-endpoint steps on iptables: kube-proxy >= 1.28's partial restore, then (if the full
/// restore is known to finish in time) the full restore older kube-proxies and periodic resyncs
/// do.
#[allow(clippy::too_many_arguments)]
fn run_partial_and_full(
    steps: &mut Vec<ProgStep>,
    sys: &str,
    tool: &str,
    save: &str,
    ns: &str,
    partial: &str,
    full_changed: &str,
    new_ep: Endpoint,
    limit: Duration,
    full_in_time: bool,
) {
    let r = run_in_netns(ns, tool, &["--noflush"], partial, limit).and_then(|d| {
        let dump = output_in_netns(ns, save, &["-t", "nat"])?;
        if !dump.contains(&format!("--to-destination {new_ep}")) {
            bail!("the new endpoint's DNAT rule is missing after the partial restore");
        }
        Ok((d, format!("kube-proxy >= 1.28 partial restore (--noflush): {} lines (KUBE-SERVICES whole + the changed Service); verified", partial.lines().count())))
    });
    steps.push(step(sys, "one-endpoint-partial", r));
    if full_in_time {
        let r = run_in_netns(ns, tool, &["--noflush"], full_changed, limit)
            .map(|d| (d, format!("full --noflush restore with the change: {} lines", full_changed.lines().count())));
        steps.push(step(sys, "one-endpoint-full-restore", r));
    } else {
        steps.push(ProgStep {
            system: sys.into(),
            step: "one-endpoint-full-restore".into(),
            seconds: None,
            detail: String::new(),
            error: Some(format!("not run: the full --noflush restore did not finish within {limit:?}, and this is the same restore")),
        });
    }
}

fn step(system: &str, step: &str, r: anyhow::Result<(Duration, String)>) -> ProgStep {
    match r {
        Ok((d, detail)) => ProgStep {
            system: system.into(),
            step: step.into(),
            seconds: Some(d.as_secs_f64()),
            detail,
            error: None,
        },
        Err(e) => ProgStep {
            system: system.into(),
            step: step.into(),
            seconds: None,
            detail: String::new(),
            error: Some(format!("{e:#}")),
        },
    }
}

/// Programming time: `services` x `per_service` endpoints into an empty datapath, then one
/// endpoint replaced, on skiff's maps, iptables-restore (legacy, nft) and nft.
pub fn programming(opts: &Options) -> anyhow::Result<Programming> {
    let services = opts.program_services;
    let per = opts.program_endpoints;
    let real = model::real_endpoints(&[Ipv4Addr::new(10, 244, 1, 11)], per);
    let set = model::build(services, per, 1, &real)?;
    let target = services / 2 + 7;
    let new_ep = Endpoint {
        ip: Ipv4Addr::new(10, 250, 0, 7),
        port: 8080,
    };
    let (changed, pos) = set
        .with_endpoint_changed(target.min(services - 1), 3, new_ep)
        .context("choosing the endpoint to change")?;
    let mut steps = Vec::new();
    let mut lab = skiff_datapath::lab::Lab::new("svp", 0);

    // skiff: the maps of a freshly loaded datapath.
    {
        let (specs, _) = skiff_specs(&set);
        let (changed_specs, _) = skiff_specs(&changed);
        let t = Instant::now();
        let planned = plan::plan_sync(&specs, &MapState::default());
        let plan_d = t.elapsed();
        steps.push(step(
            "skiff",
            "plan",
            planned.map(|ops| (plan_d, format!("{} map operations planned (pure diff, no syscalls)", ops.len()))).map_err(Into::into),
        ));
        let mut dp = Datapath::load(&lab.pin_dir).context("loading the datapath")?;
        let t = Instant::now();
        let r = dp.sync_services(&specs);
        let d = t.elapsed();
        steps.push(step("skiff", "full", r.map(|ops| (d, format!("{} map operations", ops.len()))).map_err(Into::into)));
        let t = Instant::now();
        let r = dp.upsert_service(&changed_specs[pos]);
        let d = t.elapsed();
        let check = dp
            .dump_backends()
            .map(|b| b.iter().any(|b| b.ip == IpAddr::V4(new_ep.ip)))
            .unwrap_or(false);
        steps.push(step(
            "skiff",
            "one-endpoint",
            r.map_err(anyhow::Error::from).and_then(|ops| {
                if !check {
                    bail!("the new endpoint is not in BACKENDS after the update");
                }
                Ok((d, format!("upsert_service of the changed Service: {} map operations; new endpoint present", ops.len())))
            }),
        ));
        // The same change found by diffing the whole desired state (a relist / resync).
        let t = Instant::now();
        let r = dp.sync_services(&specs);
        let d = t.elapsed();
        steps.push(step(
            "skiff",
            "one-endpoint-full-diff",
            r.map(|ops| (d, format!("sync_services over all {services} Services back to the original: {} map operations", ops.len()))).map_err(Into::into),
        ));
    }

    let full = kubeproxy::iptables_full(&set);
    let full_changed = kubeproxy::iptables_full(&changed);
    let partial = kubeproxy::iptables_partial(&set, &changed, pos);
    let fresh = kubeproxy::iptables_fresh(&set);
    let limit = opts.program_timeout;
    for backend in [Backend::IptablesLegacy, Backend::IptablesNft] {
        let sys = backend.name();
        let tool = backend.restore_tool().unwrap_or("iptables-restore");
        let save = if backend == Backend::IptablesLegacy { "iptables-legacy-save" } else { "iptables-nft-save" };
        let verify = |ns: &str, d: Duration, what: String| -> anyhow::Result<(Duration, String)> {
            let dump = output_in_netns(ns, save, &["-t", "nat"])?;
            let dnat = dump.matches("-j DNAT").count();
            if dnat != set.endpoint_count() {
                bail!("{dnat} DNAT rules installed, expected {}", set.endpoint_count());
            }
            Ok((d, format!("{what}; {dnat} DNAT rules verified")))
        };
        let ns = lab.extra_netns(&sys[9..]);
        // kube-proxy's way: the jumps once, then `iptables-restore --noflush` of every chain.
        let r = run_in_netns(&ns, tool, &["--noflush"], &kubeproxy::iptables_base(), limit)
            .and_then(|_| run_in_netns(&ns, tool, &["--noflush"], &full, limit))
            .and_then(|d| verify(&ns, d, format!("--noflush, as kube-proxy: {} lines", full.lines().count())));
        let kube_proxy_way_ok = r.is_ok();
        steps.push(step(sys, "full", r));
        if !kube_proxy_way_ok {
            // The same rules loaded the fast way, so the incremental steps can still be timed.
            let ns2 = lab.extra_netns(&format!("{}-plain", &sys[9..]));
            let r = run_in_netns(&ns2, tool, &[], &fresh, limit)
                .and_then(|d| verify(&ns2, d, "one plain restore (no --noflush) into an empty namespace".into()));
            let ok = r.is_ok();
            steps.push(step(sys, "full-plain-restore", r));
            if !ok {
                continue;
            }
            run_partial_and_full(&mut steps, sys, tool, save, &ns2, &partial, &full_changed, new_ep, limit, false);
        } else {
            run_partial_and_full(&mut steps, sys, tool, save, &ns, &partial, &full_changed, new_ep, limit, true);
        }
    }

    {
        let ns = lab.extra_netns("nftables");
        let nft = kubeproxy::nft_full(&set);
        let r = run_in_netns(&ns, "nft", &["-f", "/dev/stdin"], &nft, opts.program_timeout.max(opts.install_timeout)).and_then(|d| {
            let map = output_in_netns(&ns, "nft", &["list", "map", "ip", "kube-proxy", "service-ips"])?;
            let n = map.matches("goto service-").count();
            if n != set.ports.len() {
                bail!("{n} service-ips elements, expected {}", set.ports.len());
            }
            Ok((d, format!("{} commands; {n} service-ips elements verified", nft.lines().count())))
        });
        let ok = r.is_ok();
        steps.push(step("nftables", "full", r));
        if ok {
            let delta = kubeproxy::nft_endpoint_change(&set, &changed, pos);
            let chain = kubeproxy::nft_service_chain(&changed.ports[pos]);
            let r = run_in_netns(&ns, "nft", &["-f", "/dev/stdin"], &delta, opts.program_timeout).and_then(|d| {
                let c = output_in_netns(&ns, "nft", &["list", "chain", "ip", "kube-proxy", &chain])?;
                let want = kubeproxy::nft_endpoint_chain(&changed.ports[pos], &new_ep);
                if !c.contains(&want) {
                    bail!("the service chain does not reach the new endpoint chain");
                }
                Ok((d, format!("incremental transaction: {} commands; verified", delta.lines().count())))
            });
            steps.push(step("nftables", "one-endpoint", r));
        }
    }
    let _ = &mut lab;
    Ok(Programming {
        services,
        endpoints: set.endpoint_count(),
        steps,
    })
}

pub fn run(opts: &Options) -> anyhow::Result<Record> {
    let started = Instant::now();
    let mut record = Record {
        command: opts.command.clone(),
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: machine(),
        duration_s: opts.duration.as_secs_f64(),
        scales: opts.scales.clone(),
        workloads: opts.workloads.iter().map(|w| w.name()).collect(),
        servers: opts.servers,
        probes: opts.probes,
        endpoints_per_service: opts.endpoints_per_service,
        pin: opts.pin,
        paths: vec![],
        programming: None,
        profiles: vec![],
        interleaved: vec![],
        targets: vec![],
        notes: opts.notes.clone(),
        program_timeout_s: opts.program_timeout.as_secs_f64(),
        elapsed_s: 0.0,
    };
    for &scale in &opts.scales {
        for &backend in &opts.backends {
            let cap = match backend {
                Backend::Nftables => Some(("--nft-max-scale", opts.nft_max_scale)),
                Backend::IptablesNft => Some(("--iptables-nft-max-scale", opts.iptables_nft_max_scale)),
                _ => None,
            };
            if let Some((flag, max)) = cap
                && scale > max
            {
                record.notes.push(format!(
                    "{} at {scale} Services: not run ({flag} {max}): programming it takes longer than this run's time bound allows; see its install time at the scales measured",
                    backend.name()
                ));
                continue;
            }
            info!(scale, backend = backend.name(), "lab");
            if let Err(e) = measure_backend(opts, backend, scale, &mut record) {
                warn!(scale, backend = backend.name(), error = %format!("{e:#}"), "lab failed");
                record.notes.push(format!("{} at {scale}: {e:#}", backend.name()));
            }
        }
    }
    if opts.program_services > 0 {
        info!(services = opts.program_services, "programming time");
        match programming(opts) {
            Ok(p) => record.programming = Some(p),
            Err(e) => record.notes.push(format!("programming benchmark: {e:#}")),
        }
    }
    record.targets = super::report::evaluate(&record);
    record.elapsed_s = started.elapsed().as_secs_f64();
    Ok(record)
}
