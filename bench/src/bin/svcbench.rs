//! svcbench: skiff's Service datapath against kube-proxy's iptables / nftables modes and the
//! direct pod path, in one run on one netns lab (see bench/results/service.md).
//!
//! ```text
//! sudo cargo run -p skiff-bench --release --bin svcbench -- run            # the full run (~10 min)
//! sudo cargo run -p skiff-bench --release --bin svcbench -- run --quick    # scales 1 and 10,000, < 2 min
//! sudo ./target/release/svcbench cluster                                   # e2e on a skiff up cluster
//! ```
//! `server` and `client` are the programs the harness starts inside the lab's namespaces.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use skiff_bench::svc::{
    self, report,
    run::{Backend, Options},
    workload::Workload,
};

#[derive(Parser)]
#[command(name = "svcbench", about = "Service datapath benchmark: skiff vs kube-proxy vs direct")]
struct Cli {
    /// (internal) Pin this process to a CPU before anything else.
    #[arg(long, global = true, hide = true)]
    cpu: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the labs, measure every path at every scale, write the results.
    Run(RunArgs),
    /// End-to-end timings on a `skiff up` cluster: `kubectl scale` 3 -> 4 until the new endpoint
    /// answers through the ClusterIP, and `kubectl apply` of a 100-replica Deployment until every
    /// endpoint answers (bench/results/cluster.md).
    Cluster(ClusterArgs),
    /// Render the markdown and charts again from a run's JSON record (targets re-judged).
    Report {
        #[arg(long)]
        json: PathBuf,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        #[arg(long, default_value = "service")]
        stem: String,
        /// A note to add to the record (repeatable).
        #[arg(long)]
        note: Vec<String>,
    },
    /// Print the kube-proxy-shaped rules the harness installs (to inspect or load by hand).
    Rules {
        #[arg(long, default_value_t = 100)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// `iptables` (iptables-restore --noflush input), `iptables-base`, `nft` (nft -f input).
        #[arg(long, default_value = "iptables", value_parser = ["iptables", "iptables-base", "nft"])]
        format: String,
    },
    /// (internal) The server program, inside a pod namespace.
    #[command(hide = true)]
    Server {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        ip: Ipv4Addr,
        #[arg(long, value_delimiter = ',', required = true)]
        ports: Vec<u16>,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
    /// (internal) The client program: runs workloads, prints JSON.
    #[command(hide = true)]
    Client {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<SocketAddrV4>,
        #[arg(long, value_delimiter = ',', required = true)]
        workloads: Vec<String>,
        #[arg(long)]
        duration_ms: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A short run (< 2 min): scales 1 and 10,000, 0.6 s per workload, no profiles, nftables
    /// only at scale 1, programming time at 1,000 Services.
    #[arg(long)]
    quick: bool,
    /// Numbers of Services to sweep.
    #[arg(long, value_delimiter = ',')]
    scales: Option<Vec<usize>>,
    /// Milliseconds per workload per path.
    #[arg(long)]
    duration_ms: Option<u64>,
    #[arg(long, value_delimiter = ',', default_value = "crr,crr_x4,rr,stream,udp_rr")]
    workloads: Vec<String>,
    /// Datapaths to set up (each gets its own lab).
    #[arg(long, value_delimiter = ',', default_value = "plain,skiff,iptables-legacy,iptables-nft,nftables")]
    datapaths: Vec<String>,
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// Services the clients aim at, spread over the installed set.
    #[arg(long, default_value_t = 16)]
    probes: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Services in the programming-time benchmark (0 skips it; default 10,000, 1,000 with --quick).
    #[arg(long)]
    program_services: Option<usize>,
    #[arg(long, default_value_t = 10)]
    program_endpoints: usize,
    /// Where the client and server programs run: `split` pins clients to CPU 0 and servers to
    /// CPU 1 (reproducible cross-CPU round trips), `none` leaves it to the scheduler.
    #[arg(long, default_value = "split", value_parser = ["split", "none"])]
    pin: String,
    /// Skip the perf profiles.
    #[arg(long)]
    no_profile: bool,
    /// Seconds any one rule install may take before it counts as failed.
    #[arg(long, default_value_t = 300)]
    install_timeout_s: u64,
    /// Seconds each programming-benchmark step may take (kube-proxy's iptables-nft --noflush
    /// restore of 10,000 x 10 takes minutes on iptables 1.8.9: it is reported as not finished).
    #[arg(long, default_value_t = 60)]
    program_timeout_s: u64,
    /// Run nftables labs only up to this many Services (default 10,000; 1,000 with --quick).
    #[arg(long)]
    nft_max_scale: Option<usize>,
    /// Run iptables-nft labs only up to this many Services.
    #[arg(long, default_value_t = 10_000)]
    iptables_nft_max_scale: usize,
    /// Rounds of the CRR workload alternating skiff-direct and skiff-sock in skiff's
    /// lab at the target scale (default 6; 2 with --quick; 0 = none).
    #[arg(long)]
    interleave_rounds: Option<usize>,
    /// Milliseconds per interleaved round.
    #[arg(long, default_value_t = 700)]
    interleave_ms: u64,
    /// A note to carry into the record (repeatable).
    #[arg(long)]
    note: Vec<String>,
    /// Where the JSON, markdown and SVG files go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// File name stem of the outputs.
    #[arg(long, default_value = "service")]
    stem: String,
}

#[derive(clap::Args)]
struct ClusterArgs {
    /// The skiff binary (`skiff up` takes skiff-cni and skiff-shim from beside it); default: the
    /// one beside this program (target/release/skiff for a release svcbench).
    #[arg(long)]
    skiff: Option<PathBuf>,
    /// kubectl; default: kubectl.1.32 where the e2e tests find it, else `kubectl` on PATH.
    #[arg(long)]
    kubectl: Option<PathBuf>,
    /// The skiff-echo image archive (scripts/build-image.sh writes it).
    #[arg(long, default_value = "target/images/skiff-echo-1.0.oci.tar")]
    image: PathBuf,
    /// Use the running `skiff up` cluster in this data dir instead of bringing one up (no lock
    /// taken; the benchmark's namespace is deleted at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    #[arg(long, default_value_t = 5)]
    scale_trials: usize,
    /// Replicas before each scale-up (one more after it).
    #[arg(long, default_value_t = 3)]
    scale_from: u32,
    #[arg(long, default_value_t = 3)]
    apply_trials: usize,
    #[arg(long, default_value_t = 100)]
    apply_replicas: u32,
    /// Seconds any one trial (or wait between trials) may take.
    #[arg(long, default_value_t = 300)]
    trial_timeout_s: u64,
    #[arg(long, default_value_t = 2)]
    poll_threads: usize,
    /// Milliseconds each client thread pauses between two requests.
    #[arg(long, default_value_t = 2)]
    poll_interval_ms: u64,
    #[arg(long)]
    note: Vec<String>,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[arg(long, default_value = "cluster")]
    stem: String,
}

fn default_kubectl() -> PathBuf {
    ["/usr/lib/google-cloud-sdk/bin/kubectl.1.32", "/usr/local/bin/kubectl.1.32", "/usr/bin/kubectl.1.32"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("kubectl"))
}

fn cluster(a: ClusterArgs) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("svcbench cluster needs root (skiff up makes namespaces and loads eBPF)");
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let skiff = match a.skiff {
        Some(p) => p,
        None => exe.parent().context("this program's directory")?.join("skiff"),
    };
    if !skiff.is_file() {
        bail!("{} not found: build it (cargo build --release -p skiff -p skiff-cni -p skiff-runtime) or pass --skiff", skiff.display());
    }
    if a.data_dir.is_none() && !a.image.is_file() {
        bail!("{} not found: run scripts/build-image.sh {}", a.image.display(), a.image.display());
    }
    if a.nodes == 0 || a.nodes > 10 {
        bail!("--nodes: between 1 and 10");
    }
    if a.scale_from == 0 || a.scale_from > 50 || a.apply_replicas == 0 || a.apply_replicas > 300 {
        bail!("--scale-from: 1..=50, --apply-replicas: 1..=300");
    }
    if a.poll_threads == 0 || a.poll_threads > 16 || a.poll_interval_ms > 1000 {
        bail!("--poll-threads: 1..=16, --poll-interval-ms: 0..=1000");
    }
    let opts = skiff_bench::cluster::Options {
        skiff,
        kubectl: a.kubectl.unwrap_or_else(default_kubectl),
        image: a.image,
        existing: a.data_dir,
        nodes: a.nodes,
        scale_trials: a.scale_trials,
        scale_from: a.scale_from,
        apply_trials: a.apply_trials,
        apply_replicas: a.apply_replicas,
        trial_timeout: Duration::from_secs(a.trial_timeout_s.clamp(10, 3600)),
        poll_threads: a.poll_threads,
        poll_interval: Duration::from_millis(a.poll_interval_ms),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        notes: a.note,
    };
    let record = skiff_bench::cluster::run(&opts)?;
    for sc in &record.scenarios {
        for st in &sc.stats {
            println!("{:<6} {:<50} n={} median {:.3} p90 {:.3}", sc.name, st.metric, st.n, st.median, st.p90);
        }
    }
    for f in skiff_bench::cluster::write_all(&record, &a.out, &a.stem)? {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn preflight() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (netns, eBPF, iptables)".to_string());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        missing.push("a bpffs at /sys/fs/bpf".into());
    }
    for tool in ["ip", "nsenter", "iptables-legacy-restore", "iptables-nft-restore", "nft"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            missing.push(format!("`{tool}` (scripts/setup.sh installs iptables, nftables, iproute2)"));
        }
    }
    if !missing.is_empty() {
        bail!("svcbench needs: {}", missing.join(", "));
    }
    Ok(())
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    preflight()?;
    let scales = a
        .scales
        .unwrap_or_else(|| if a.quick { vec![1, 10_000] } else { vec![1, 1_000, 10_000, 30_000] });
    if scales.is_empty() || scales.iter().any(|&s| s == 0 || s > svc::model::MAX_SERVICES) {
        bail!("--scales: each between 1 and {}", svc::model::MAX_SERVICES);
    }
    let duration = Duration::from_millis(a.duration_ms.unwrap_or(if a.quick { 600 } else { 1500 }));
    if duration < Duration::from_millis(100) || duration > Duration::from_secs(60) {
        bail!("--duration-ms: between 100 and 60000");
    }
    let workloads = a
        .workloads
        .iter()
        .map(|w| Workload::parse(w).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let backends = a
        .datapaths
        .iter()
        .map(|d| Backend::parse(d).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.servers == 0 || a.servers > 8 {
        bail!("--servers: between 1 and 8");
    }
    if a.probes == 0 || a.probes > 1000 {
        bail!("--probes: between 1 and 1000");
    }
    if a.endpoints == 0 || a.endpoints > 64 {
        bail!("--endpoints: between 1 and 64");
    }
    let profile_scale = if a.no_profile || a.quick {
        None
    } else if scales.contains(&10_000) {
        Some(10_000)
    } else {
        scales.iter().copied().max()
    };
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let pin = (a.pin == "split" && nproc >= 2).then_some((0, 1));
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let opts = Options {
        scales,
        duration,
        workloads,
        backends,
        servers: a.servers,
        probes: a.probes,
        endpoints_per_service: a.endpoints,
        program_services: a.program_services.unwrap_or(if a.quick { 1_000 } else { 10_000 }),
        program_endpoints: a.program_endpoints,
        profile_scale,
        install_timeout: Duration::from_secs(a.install_timeout_s),
        program_timeout: Duration::from_secs(a.program_timeout_s.max(1)),
        nft_max_scale: a.nft_max_scale.unwrap_or(if a.quick { 1_000 } else { 10_000 }),
        iptables_nft_max_scale: a.iptables_nft_max_scale,
        notes: a.note.clone(),
        interleave_rounds: a.interleave_rounds.unwrap_or(if a.quick { 2 } else { 6 }).min(50),
        interleave_duration: Duration::from_millis(a.interleave_ms.clamp(100, 10_000)),
        pin,
        command,
        exe: std::env::current_exe().context("locating this program")?,
    };
    let record = svc::run::run(&opts)?;
    let files = report::write_all(&record, &a.out, &a.stem)?;
    for t in &record.targets {
        println!(
            "{:<90} {:>9} {}",
            t.name,
            t.measured.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into()),
            match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            }
        );
    }
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,aya=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    if let Some(cpu) = cli.cpu {
        svc::pin_to_cpu(cpu)?;
    }
    match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Cluster(a) => cluster(a),
        Cmd::Report { json, out, stem, note } => {
            let text = std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
            let mut record: svc::run::Record = serde_json::from_str(&text).context("parsing the record")?;
            record.notes.extend(note);
            record.targets = report::evaluate(&record);
            for f in report::write_all(&record, &out, &stem)? {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        Cmd::Rules { services, endpoints, format } => {
            let real = svc::model::real_endpoints(&[Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 12)], endpoints);
            let set = svc::model::build(services, endpoints, 16, &real)?;
            let text = match format.as_str() {
                "iptables" => svc::kubeproxy::iptables_full(&set),
                "iptables-base" => svc::kubeproxy::iptables_base(),
                _ => svc::kubeproxy::nft_full(&set),
            };
            print!("{text}");
            Ok(())
        }
        Cmd::Server { netns, ip, ports, workers, max_seconds } => {
            if workers == 0 || workers > 64 {
                bail!("--workers: between 1 and 64");
            }
            svc::server_main(&netns, ip, &ports, workers, Duration::from_secs(max_seconds.min(24 * 3600)))
        }
        Cmd::Client { netns, cgroup, targets, workloads, duration_ms } => {
            let wl = workloads
                .iter()
                .map(|w| Workload::parse(w).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<Vec<_>>>()?;
            svc::client_main(&netns, cgroup.as_deref(), &targets, &wl, Duration::from_millis(duration_ms.min(120_000)))
        }
    }
}
