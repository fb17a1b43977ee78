//! skiff-apiserver: the Kubernetes-compatible HTTPS apiserver over a [`skiff_store::Store`].
//!
//! - [`run`] serves until a shutdown future completes (the `skiff` binary uses it);
//! - [`start`] serves in the background and hands back the address and credentials (tests);
//! - [`kubeconfig`] reads the admin kubeconfig the server wrote.
//!
//! Objects live in the store as JSON under `/registry/<group|core>/<plural>/[<namespace>/]<name>`;
//! `metadata.resourceVersion` is never stored, it is the key's `mod_revision`, set on the way out.

pub mod auth;
mod authz;
mod background;
mod csr;
mod escalation;
pub mod bootstrap_token;
mod http;
mod node_proxy;
mod objects;
// The protobuf body decoder is pure (bytes to JSON): it lives in skiff-api, where its fuzz target is.
pub use skiff_api::protobuf;
mod sa_token;
mod services;
mod tls;
mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use skiff_store::Store;
use tokio::sync::watch as tokio_watch;

pub use tls::{
    ADMIN_TOKEN, CA_CERT, CA_KEY, CONTROLLER_MANAGER_KUBECONFIG, CONTROLLER_MANAGER_USER, KUBECONFIG, NODE_PROXY_CLIENT_CN,
    SCHEDULER_KUBECONFIG, SCHEDULER_USER, client_cert,
};

/// How to run the apiserver.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Holds the store (SQLite), the CA, the serving certificate, the admin token and kubeconfig.
    pub data_dir: PathBuf,
    /// Where to serve HTTPS; port 0 picks a free port (see [`RunningServer::addr`]).
    pub bind: SocketAddr,
    pub store: StoreConfig,
    /// The range Service cluster IPs come from; its first address is the `kubernetes` Service's.
    pub service_cidr: ipnet::Ipv4Net,
    pub node_port_range: RangeInclusive<u16>,
    /// Extra names or addresses for the serving certificate.
    pub extra_sans: Vec<String>,
    /// How long the node client certificates the CSR signer issues are valid (a year; shorter
    /// in tests of the agent's rotation). A CSR's `expirationSeconds` can only shorten it.
    pub node_client_cert_validity: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// Embedded SQLite at `data_dir/store.db`.
    Sqlite,
    /// A real etcd cluster.
    Etcd { endpoints: Vec<String> },
}

impl ServerConfig {
    /// The defaults: 0.0.0.0:6443, SQLite, 10.96.0.0/12, node ports 30000-32767.
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            bind: SocketAddr::from(([0, 0, 0, 0], 6443)),
            store: StoreConfig::Sqlite,
            service_cidr: "10.96.0.0/12"
                .parse()
                .unwrap_or_else(|_| ipnet::Ipv4Net::default()),
            node_port_range: 30000..=32767,
            extra_sans: Vec::new(),
            node_client_cert_validity: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// A server started by [`start`]. Dropping it stops the server too.
pub struct RunningServer {
    /// The address it listens on (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// The CA certificate (PEM) that signed the serving certificate.
    pub ca_pem: String,
    /// The admin bearer token.
    pub admin_token: String,
    /// `https://127.0.0.1:PORT` (or the bind address when it is not unspecified).
    pub url: String,
    shutdown: tokio_watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    store: Arc<dyn Store>,
}

impl RunningServer {
    /// The server's own store handle (tests compact it to provoke 410 Expired).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Stops accepting, closes open connections and stops the background loops.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Shared state of one apiserver.
pub(crate) struct State {
    pub store: Arc<dyn Store>,
    pub admin_token: String,
    pub service_cidr: ipnet::Ipv4Net,
    pub node_port_range: RangeInclusive<u16>,
    /// Serializes Service IP/port allocation with the write that records it.
    pub service_lock: tokio::sync::Mutex<()>,
    /// Wakes the namespace finalizer and pod reaper loop.
    pub reaper_wake: tokio::sync::Notify,
    pub bookmark_interval: Duration,
    /// The client certificate node-proxy requests (logs, exec) present to agents.
    pub agent_tls: node_proxy::AgentClientTls,
    /// The CA's private key (PEM): it signs node client certificates (`csr`).
    pub ca_key_pem: String,
    /// Signs and checks service-account tokens (`sa_token`).
    pub sa_key: sa_token::SigningKey,
    /// The longest validity of a node client certificate (`csr`).
    pub node_client_cert_validity: Duration,
}

async fn open_store(
    config: &ServerConfig,
) -> Result<(Arc<dyn Store>, tokio::task::JoinHandle<()>)> {
    match &config.store {
        StoreConfig::Sqlite => {
            let path = config.data_dir.join("store.db");
            let store = skiff_store::sqlite::SqliteStore::open(&path)
                .await
                .with_context(|| format!("opening the SQLite store at {}", path.display()))?;
            let compactor = store.start_compaction(skiff_store::CompactionPolicy::default());
            Ok((Arc::new(store), compactor))
        }
        StoreConfig::Etcd { endpoints } => {
            let store = Arc::new(
                skiff_store::etcd::EtcdStore::connect(endpoints, "/skiff/")
                    .await
                    .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?,
            );
            let compactor = skiff_store::spawn_compactor(
                Arc::downgrade(&store),
                skiff_store::CompactionPolicy::default(),
            );
            Ok((store, compactor))
        }
    }
}

fn server_url(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("https://127.0.0.1:{}", addr.port())
    } else {
        format!("https://{addr}")
    }
}

/// Starts the apiserver in the background: credentials, store, bootstrap objects, listener.
pub async fn start(config: ServerConfig) -> Result<RunningServer> {
    let creds = tls::ensure(&config.data_dir, config.bind, &config.extra_sans)?;
    let tls_config = tls::rustls_config(&creds)?;
    let (store, compactor) = open_store(&config).await?;
    let store = skiff_store::encryption::encrypt_secrets(store, &config.data_dir)
        .await
        .context("encrypting Secrets at rest")?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("binding {}: is another server using it?", config.bind))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let url = server_url(addr);

    let state = Arc::new(State {
        store,
        admin_token: creds.admin_token.clone(),
        service_cidr: config.service_cidr,
        node_port_range: config.node_port_range.clone(),
        service_lock: tokio::sync::Mutex::new(()),
        reaper_wake: tokio::sync::Notify::new(),
        bookmark_interval: Duration::from_secs(15),
        agent_tls: node_proxy::AgentClientTls::new(creds.ca_key_pem.clone()),
        ca_key_pem: creds.ca_key_pem.clone(),
        sa_key: sa_token::SigningKey::ensure(&config.data_dir)?,
        node_client_cert_validity: config.node_client_cert_validity,
    });
    background::bootstrap(&state, addr)
        .await
        .context("creating the default namespaces and the kubernetes Service")?;
    authz::ensure_default_policy(&state)
        .await
        .context("creating the default RBAC policy")?;
    bootstrap_token::publish(&state, &bootstrap_token::advertise_url(addr), &creds.ca_pem)
        .await
        .context("publishing kube-public/cluster-info")?;
    tls::write_component_kubeconfigs(&config.data_dir, &url, &creds)?;
    // Written last, once the server can answer: its presence means "ready" to scripts.
    tls::write_kubeconfig(
        &config.data_dir,
        &tls::kubeconfig_text(&url, &creds.ca_pem, &creds.admin_token),
    )?;

    let (shutdown_tx, shutdown_rx) = tokio_watch::channel(false);
    let serve = tokio::spawn(http::serve(
        listener,
        tls_config,
        state.clone(),
        shutdown_rx,
    ));
    let store = state.store.clone();
    let reaper = tokio::spawn(background::reaper_loop(state));
    Ok(RunningServer {
        addr,
        ca_pem: creds.ca_pem,
        admin_token: creds.admin_token,
        url,
        shutdown: shutdown_tx,
        tasks: vec![serve, reaper, compactor],
        store,
    })
}

/// Runs the apiserver until `shutdown` completes.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let data_dir = config.data_dir.clone();
    let server = start(config).await?;
    tracing::info!(
        "listening on {} (kubeconfig: {})",
        server.url,
        data_dir.join(tls::KUBECONFIG).display()
    );
    shutdown.await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}

/// The admin kubeconfig the server wrote into `data_dir`.
pub fn kubeconfig(data_dir: &Path) -> Result<String> {
    component_kubeconfig(data_dir, tls::KUBECONFIG)
}

/// One of the kubeconfigs the server wrote into `data_dir` ([`KUBECONFIG`],
/// [`CONTROLLER_MANAGER_KUBECONFIG`], [`SCHEDULER_KUBECONFIG`]).
pub fn component_kubeconfig(data_dir: &Path, file: &str) -> Result<String> {
    let path = data_dir.join(file);
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: start the server once with --data-dir {} to create it",
            path.display(),
            data_dir.display()
        )
    })
}
