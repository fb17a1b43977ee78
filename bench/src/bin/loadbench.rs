//! loadbench: the API under load on a real `skiff server` (see bench/results/load.md).
//!
//! ```text
//! sudo ./target/release/loadbench run                                       # 100 nodes, 10,000 pods, 5,000 Services, agent at 10,000
//! sudo ./target/release/loadbench run --nodes 5 --pods 200 --services 50 --agent-services 100 --out /tmp/x
//! ```
//! `agent-memory` is the process the run starts to measure the agent's proxy + DNS memory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use skiff_bench::load::{self, Options, StoreKind};

#[derive(Parser)]
#[command(name = "loadbench", about = "The API under load: simulated nodes, pods, Services and watches on a real skiff server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a server, load it, measure, write <out>/<stem>.json and .md (after every phase too,
    /// marked incomplete until the run ends).
    Run(RunArgs),
    /// (internal) The agent's proxy + DNS as one node, reporting JSON lines until stdin closes.
    #[command(hide = true)]
    AgentMemory {
        #[arg(long)]
        admin_kubeconfig: PathBuf,
        #[arg(long)]
        ca_key: PathBuf,
        #[arg(long)]
        pin_dir: PathBuf,
        #[arg(long)]
        node_name: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The skiff binary (default: `skiff` beside this binary).
    #[arg(long)]
    skiff: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "sqlite")]
    store: StoreKind,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 5_000)]
    services: usize,
    /// Services in the cluster when the agent's memory is measured (0: skip; needs root and
    /// bpffs for the real datapath).
    #[arg(long, default_value_t = 10_000)]
    agent_services: usize,
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    /// Requests in flight at once in the write phases.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    #[arg(long, default_value_t = 3)]
    cluster_watchers: usize,
    /// Samples of each read.
    #[arg(long, default_value_t = 40)]
    samples: usize,
    #[arg(long, default_value_t = 1_000)]
    updates: usize,
    #[arg(long, default_value_t = 1_000)]
    deletes: usize,
    #[arg(long, default_value_t = 500)]
    page_limit: usize,
    /// Lease renewal and Node status interval of each node, seconds.
    #[arg(long, default_value_t = 10.0)]
    heartbeat: f64,
    /// Upper bound for each phase, seconds.
    #[arg(long, default_value_t = 900)]
    phase_timeout: u64,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[arg(long, default_value = "load")]
    stem: String,
    /// A note for the record (repeatable).
    #[arg(long)]
    note: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.cmd {
        Cmd::AgentMemory { admin_kubeconfig, ca_key, pin_dir, node_name } => {
            runtime.block_on(load::agent_memory_child(&admin_kubeconfig, &ca_key, &pin_dir, &node_name))
        }
        Cmd::Run(a) => {
            let me = std::env::current_exe().context("this binary's path")?;
            let skiff = a.skiff.unwrap_or_else(|| me.with_file_name("skiff"));
            let opts = Options {
                skiff,
                agent_exe: me,
                store: a.store,
                nodes: a.nodes,
                pods: a.pods,
                services: a.services,
                agent_services: a.agent_services,
                namespaces: a.namespaces,
                writers: a.writers,
                cluster_watchers: a.cluster_watchers,
                samples: a.samples,
                updates: a.updates,
                deletes: a.deletes,
                page_limit: a.page_limit,
                heartbeat: Duration::from_secs_f64(a.heartbeat),
                phase_timeout: Duration::from_secs(a.phase_timeout),
                command: std::iter::once("loadbench".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" "),
                notes: a.note,
                out_dir: a.out.clone(),
                stem: a.stem.clone(),
            };
            // The record is rewritten after every phase; a run that fails leaves it marked
            // incomplete, with the failure.
            let rec = runtime.block_on(load::run(&opts))?;
            eprintln!(
                "[loadbench] wrote {}/{}.json and .md ({:.0} s; checks {})",
                a.out.display(),
                a.stem,
                rec.elapsed_s,
                if rec.checks.ok { "passed".to_string() } else { format!("FAILED: {}", rec.checks.problems.join("; ")) }
            );
            if !rec.checks.ok {
                std::process::exit(2);
            }
            Ok(())
        }
    }
}
