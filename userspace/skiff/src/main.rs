//! `skiff`: the one binary. Each subcommand is a thin shell over a library crate.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

mod agent_cli;
mod datapath_cli;
mod demo;
mod encryption_cli;
mod image_cli;
mod install_cni;
mod token_cli;
mod up;

#[derive(Parser)]
#[command(name = "skiff", version, about = "A container orchestrator whose Services run in eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane in one process: apiserver, controllers and scheduler.
    Server {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        controllers: skiff_controller_manager::ControllerFlags,
    },
    /// Run the apiserver alone.
    Apiserver(ServerArgs),
    /// Run the controllers alone, against a server (leader-elected: several may run).
    ControllerManager {
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: PathBuf,
        #[command(flatten)]
        flags: skiff_controller_manager::ControllerFlags,
    },
    /// Run the scheduler alone, against a server (leader-elected: several may run).
    Scheduler {
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: PathBuf,
        #[command(flatten)]
        leader: skiff_controller_manager::LeaderElectionFlags,
    },
    /// Print the admin kubeconfig written by the server.
    Kubeconfig {
        #[arg(long, default_value = "/var/lib/skiff")]
        data_dir: PathBuf,
    },
    /// Print a node's eBPF maps (services, backends, conntrack, stats).
    Datapath {
        /// The bpffs directory the node's datapath pins its maps in.
        #[arg(long, default_value = "/sys/fs/bpf/skiff")]
        pin_dir: PathBuf,
        #[command(subcommand)]
        command: datapath_cli::DatapathCommand,
    },
    /// Program a Service read from the API into the eBPF datapath of a netns lab and send traffic
    /// through its ClusterIP (the demo `scripts/up.sh` runs).
    Demo(demo::DemoArgs),
    /// Manage the node's local image store: import, list, rm, gc.
    Image(image_cli::ImageArgs),
    /// (internal) The per-container shim that skiff-runtime's runc runtime spawns.
    #[command(hide = true)]
    RuntimeShim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Run a node agent: register the Node, run the pods bound to it, program its datapath.
    Agent(agent_cli::AgentArgs),
    /// Bring up a whole cluster on this machine: the server and N nodes (network namespaces).
    Up(up::UpArgs),
    /// Remove everything `skiff up` made.
    Down(up::DownArgs),
    /// Manage bootstrap tokens that let nodes join: create, list, delete.
    Token(token_cli::TokenArgs),
    /// Install skiff-cni into a CNI bin dir and its conflist into a CNI conf dir.
    InstallCni(install_cni::InstallCniArgs),
    /// Make a new encryption key for Secrets at rest and rewrite every Secret with it.
    RotateEncryptionKey(encryption_cli::RotateArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum StoreKind {
    Sqlite,
    Etcd,
}

#[derive(Args)]
struct ServerArgs {
    /// Where the store, the certificates and the admin kubeconfig live.
    #[arg(long, default_value = "/var/lib/skiff")]
    data_dir: PathBuf,
    /// Address and port to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:6443")]
    bind: SocketAddr,
    /// The store backend: embedded SQLite (one machine, no other process) or etcd.
    #[arg(long, value_enum, default_value = "sqlite")]
    store: StoreKind,
    /// etcd client URLs, comma separated (with --store etcd).
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The range Service cluster IPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: ipnet::Ipv4Net,
    /// The range Service node ports are allocated from, as FIRST-LAST.
    #[arg(long, default_value = "30000-32767")]
    service_node_port_range: String,
    /// Extra names or addresses for the serving certificate.
    #[arg(long, value_delimiter = ',')]
    tls_san: Vec<String>,
    /// How long the node client certificates the server signs are valid (agents rotate them at
    /// 70-90% of that); short values are for tests of the rotation.
    #[arg(long, default_value = "8760h", value_parser = skiff_controller_manager::parse_duration)]
    node_client_cert_validity: std::time::Duration,
}

fn parse_port_range(s: &str) -> Result<std::ops::RangeInclusive<u16>> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("port range {s:?} must look like 30000-32767"))?;
    let first: u16 = a.trim().parse().with_context(|| format!("bad first port in {s:?}"))?;
    let last: u16 = b.trim().parse().with_context(|| format!("bad last port in {s:?}"))?;
    if first == 0 || first > last {
        bail!("port range {s:?} must be FIRST-LAST with 0 < FIRST <= LAST");
    }
    Ok(first..=last)
}

fn server_config(args: ServerArgs) -> Result<skiff_apiserver::ServerConfig> {
    let mut config = skiff_apiserver::ServerConfig::new(args.data_dir);
    config.node_client_cert_validity = args.node_client_cert_validity;
    config.bind = args.bind;
    config.store = match args.store {
        StoreKind::Sqlite => skiff_apiserver::StoreConfig::Sqlite,
        StoreKind::Etcd => {
            if args.etcd_endpoints.is_empty() {
                bail!("--store etcd needs --etcd-endpoints http://HOST:2379[,...]");
            }
            skiff_apiserver::StoreConfig::Etcd { endpoints: args.etcd_endpoints }
        }
    };
    config.service_cidr = args.service_cidr;
    config.node_port_range = parse_port_range(&args.service_node_port_range)?;
    config.extra_sans = args.tls_san;
    Ok(config)
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// A kube-rs client from a kubeconfig file.
pub(crate) async fn kube_client(path: &std::path::Path) -> Result<kube::Client> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    client_from(&text).await
}

/// A kube-rs client from a server URL, a bearer token and (optionally) the server's CA.
pub(crate) async fn kube_client_for(url: &str, token: &str, ca_file: Option<&std::path::Path>) -> Result<kube::Client> {
    let uri: http::Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
    let mut config = kube::Config::new(uri);
    config.auth_info.token = Some(token.to_string().into());
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let certs = rustls_pemfile_certs(&pem)?;
        config.root_cert = Some(certs);
    }
    kube::Client::try_from(config).context("building the API client")
}

/// DER certificates from PEM text.
fn rustls_pemfile_certs(pem_text: &[u8]) -> Result<Vec<Vec<u8>>> {
    let certs: Vec<Vec<u8>> = pem::parse_many(pem_text)
        .context("the CA file is not PEM")?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect();
    if certs.is_empty() {
        bail!("the CA file holds no certificate");
    }
    Ok(certs)
}

/// A kube-rs client from kubeconfig text.
async fn client_from(kubeconfig_text: &str) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(kubeconfig_text).context("parsing the kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .context("loading the kubeconfig")?;
    kube::Client::try_from(config).context("building the API client")
}

/// The whole control plane in one process. The controllers and the scheduler are clients of the
/// apiserver like any other, never shortcuts into its store, each with its own identity (the
/// client certificates of `controller-manager.kubeconfig` and `scheduler.kubeconfig`), so RBAC's
/// default ClusterRoles bound what they may do; only the join token is made as the admin.
async fn run_server(config: skiff_apiserver::ServerConfig, flags: skiff_controller_manager::ControllerFlags) -> Result<()> {
    let data_dir = config.data_dir.clone();
    let server = skiff_apiserver::start(config).await?;
    tracing::info!("listening on {} (kubeconfig: {})", server.url, data_dir.join("admin.kubeconfig").display());
    let client = client_from(&skiff_apiserver::kubeconfig(&data_dir)?).await?;
    // As kubeadm init: a join token (24h) so the first nodes can join at once.
    let join = match token_cli::server_join_token(&client, std::time::Duration::from_secs(24 * 3600)).await {
        Ok(token) => token_cli::join_command(&skiff_apiserver::bootstrap_token::advertise_url(server.addr), &token, &server.ca_pem),
        Err(e) => Err(e),
    };
    match join {
        Ok(command) => println!("join nodes with (add --node-ip <the node's address>; more tokens: skiff token create --print-join-command):\n  {command}"),
        Err(e) => tracing::warn!("making a join token failed: {e:#}"),
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let controller_client = client_from(&skiff_apiserver::component_kubeconfig(&data_dir, skiff_apiserver::CONTROLLER_MANAGER_KUBECONFIG)?).await?;
    let scheduler_client = client_from(&skiff_apiserver::component_kubeconfig(&data_dir, skiff_apiserver::SCHEDULER_KUBECONFIG)?).await?;
    let (f, stop) = (flags.clone(), stopped(stop_rx.clone()));
    let controllers = tokio::spawn(async move { skiff_controller_manager::run_controller_manager(controller_client, &f, stop).await });
    let scheduler = tokio::spawn(async move {
        skiff_controller_manager::run_scheduler_elected(scheduler_client, &flags.leader, stopped(stop_rx)).await
    });
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    for (name, task) in [("controllers", controllers), ("scheduler", scheduler)] {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{name} stopped with an error: {e:#}"),
            Err(e) => tracing::warn!("{name} task failed: {e}"),
        }
    }
    server.stop().await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain: the message says what failed and what to do.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hickory_server=warn,hickory_proto=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Apiserver(args) => {
            let config = server_config(args)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(skiff_apiserver::run(config, shutdown_signal()))
        }
        Command::Server { server, controllers } => {
            let config = server_config(server)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(run_server(config, controllers))
        }
        Command::ControllerManager { kubeconfig, flags } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let client = client_from(&std::fs::read_to_string(&kubeconfig)
                    .with_context(|| format!("reading {}", kubeconfig.display()))?)
                .await?;
                skiff_controller_manager::run_controller_manager(client, &flags, shutdown_signal()).await
            })
        }
        Command::Scheduler { kubeconfig, leader } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let client = client_from(&std::fs::read_to_string(&kubeconfig)
                    .with_context(|| format!("reading {}", kubeconfig.display()))?)
                .await?;
                skiff_controller_manager::run_scheduler_elected(client, &leader, shutdown_signal()).await
            })
        }
        Command::Kubeconfig { data_dir } => {
            print!("{}", skiff_apiserver::kubeconfig(&data_dir)?);
            Ok(())
        }
        Command::Datapath { pin_dir, command } => datapath_cli::run(&pin_dir, command),
        Command::Demo(args) => demo::run(args),
        Command::Image(args) => image_cli::run(args),
        Command::RuntimeShim { args } => std::process::exit(skiff_runtime::shim::main(args)),
        Command::Agent(args) => agent_cli::run(args),
        Command::Up(args) => up::up(args),
        Command::Down(args) => up::down(args),
        Command::Token(args) => token_cli::run(args),
        Command::InstallCni(args) => install_cni::run(args),
        Command::RotateEncryptionKey(args) => encryption_cli::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_parses_and_rejects() {
        assert_eq!(parse_port_range("30000-32767").unwrap(), 30000..=32767);
        assert!(parse_port_range("32767-30000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("30000").is_err());
        assert!(parse_port_range("a-b").is_err());
    }
}
