//! skiff-agent: the node agent. It registers its Node, heartbeats its Lease, sets up the node's
//! network (pod gateway, routes to other nodes' pods, the eBPF datapath, the CNI config), and
//! runs the pods bound to it through a container runtime, reporting their status.
//!
//! Shape: [`run`] starts independent loops that share nothing but the API client:
//! `node::heartbeat_loop` (Lease + conditions), a routes loop (Nodes -> netlink routes),
//! `pods::run` (a worker per pod). Each is level-triggered: it reads the API and makes the node
//! match, so a restarted agent simply picks up where the last one stopped; pods keep running
//! while no agent runs.

pub mod cri_adapter;
pub mod image_gc;
pub mod image_pull;
pub mod metrics;
pub mod network;
pub mod node;
pub mod pods;
pub mod runc_adapter;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod vxlan;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

pub use runtime::ContainerRuntime;

/// How the agent is set up (the `skiff agent` flags).
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    /// Agent state: pods (sandboxes, volumes, logs).
    pub data_dir: PathBuf,
    /// Where the node's datapath pins its maps and links; None runs without eBPF (pods still
    /// get their network from skiff-cni, Services are then not translated on this node).
    pub pin_dir: Option<PathBuf>,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub cni_conf_dir: PathBuf,
    /// The node's uplink (NodePort XDP, reverse NAT for replies from other nodes).
    pub uplink: Option<String>,
    /// Use this pod CIDR when the controller-manager assigns none (a cluster without node IPAM).
    pub pod_cidr: Option<Ipv4Net>,
    pub agent_port: u16,
    /// A bearer token the agent's HTTPS endpoint (logs, exec) accepts (see `server`).
    pub server_token: Option<String>,
    /// The cluster CA (PEM) the endpoint checks the apiserver's client certificate against.
    /// With neither this nor `server_token` the endpoint is not started.
    pub server_client_ca: Option<String>,
    pub cluster_domain: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub backoff_base: Duration,
    pub max_pods: u32,
    /// Lease renewal and Node status period (kubelet: 10 s, a quarter of the 40 s grace).
    pub heartbeat_interval: Duration,
    /// How pods reach other nodes: native routes or the VXLAN overlay.
    pub network: network::NetworkMode,
    /// Where the plain-HTTP Prometheus endpoint (`/metrics`) listens; None: `<node-ip>:10249`.
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// How NodePort / LoadBalancer / externalIPs traffic reaches a backend on another node:
    /// SNAT (default) or direct server return (`--lb-mode`, Cilium's `--bpf-lb-mode`).
    pub lb_mode: skiff_datapath::LbMode,
}

impl AgentConfig {
    pub fn new(node_name: &str, node_ip: Ipv4Addr, data_dir: PathBuf) -> AgentConfig {
        AgentConfig {
            node_name: node_name.to_string(),
            node_ip,
            data_dir,
            pin_dir: None,
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin")],
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            uplink: None,
            pod_cidr: None,
            agent_port: 10250,
            server_token: None,
            server_client_ca: None,
            cluster_domain: "cluster.local".into(),
            labels: Default::default(),
            backoff_base: Duration::from_secs(10),
            max_pods: 110,
            heartbeat_interval: Duration::from_secs(10),
            network: network::NetworkMode::Native,
            metrics_bind: None,
            lb_mode: skiff_datapath::LbMode::Snat,
        }
    }
}

/// The first host address of a pod CIDR: the pods' gateway on this node.
pub fn gateway_of(cidr: &Ipv4Net) -> Ipv4Addr {
    let n = u32::from(cidr.network());
    Ipv4Addr::from(n.saturating_add(1))
}

/// The conflist the agent installs for its node: skiff-cni over the node's pod CIDR.
pub fn conflist(cfg: &AgentConfig, pod_cidr: &Ipv4Net) -> serde_json::Value {
    let mut plugin = json!({
        "type": "skiff-cni",
        "podCIDR": pod_cidr.to_string(),
        "dataDir": cfg.data_dir.join("cni").display().to_string(),
        "mtu": 1500,
    });
    if let Some(pin) = &cfg.pin_dir {
        plugin["pinDir"] = json!(pin.display().to_string());
    }
    json!({"cniVersion": "1.1.0", "name": "skiff", "plugins": [plugin]})
}

/// Waits for the Node's spec.podCIDR (the controller-manager's node IPAM), or sets the
/// configured one when the Node has none.
async fn pod_cidr(client: &kube::Client, cfg: &AgentConfig, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<Ipv4Net> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut warned = false;
    loop {
        let node = nodes.get(&cfg.node_name).await?;
        if let Some(c) = node.spec.as_ref().and_then(|s| s.pod_cidr.clone()) {
            return c.parse().with_context(|| format!("the Node's podCIDR {c:?} is not an IPv4 network"));
        }
        if let Some(c) = cfg.pod_cidr {
            let patch = json!({"spec": {"podCIDR": c.to_string(), "podCIDRs": [c.to_string()]}});
            nodes.patch(&cfg.node_name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            return Ok(c);
        }
        if !warned {
            info!("waiting for the controller-manager to assign this node a podCIDR");
            warned = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => bail!("stopped while waiting for a podCIDR"),
        }
    }
}

/// Keeps the routes to other nodes' pods (or the overlay's entries) equal to the Nodes in the API.
async fn routes_loop(client: kube::Client, own: String, mode: network::NetworkMode, own_ip: Ipv4Addr, own_cidr: Ipv4Net, mut shutdown: watch::Receiver<bool>) {
    let nodes: Api<Node> = Api::all(client);
    let (store, writer) = reflector::store::<Node>();
    let changed = Arc::new(tokio::sync::Notify::new());
    let feeder = {
        let changed = changed.clone();
        tokio::spawn(async move {
            let stream = reflector(writer, watcher(nodes, watcher::Config::default())).default_backoff().touched_objects();
            let mut stream = std::pin::pin!(stream);
            while stream.next().await.is_some() {
                changed.notify_one();
            }
        })
    };
    let _feeder = pods::AbortOnDrop(feeder);
    tokio::select! {
        r = store.wait_until_ready() => if r.is_err() { return },
        _ = shutdown.changed() => return,
    }
    let mut last = None;
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        let all: Vec<Node> = store.state().iter().map(|n| (**n).clone()).collect();
        let desired = network::Desired::from_nodes(mode, &all, &own, own_ip, Some(&own_cidr));
        // Unchanged (a Node heartbeat, say): nothing to write, but still wait below; a bare
        // `continue` here spun this task at 100% of a core on every agent.
        if last.as_ref() != Some(&desired) {
            match desired.sync().await {
                Ok(()) => {
                    info!(routes = desired.len(), %mode, "routes to other nodes' pods in place");
                    last = Some(desired);
                }
                Err(e) => warn!("syncing routes ({mode}) failed: {e}"),
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = changed.notified() => {}
            _ = tick.tick() => last = None,
        }
    }
}

/// Runs the agent until `shutdown` flips. Pods keep running after it returns.
pub async fn run(
    client: kube::Client,
    cfg: AgentConfig,
    runtime: Arc<dyn ContainerRuntime>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let machine = node::Machine::probe(cfg.max_pods);
    let identity = node::NodeIdentity {
        name: cfg.node_name.clone(),
        ip: cfg.node_ip.into(),
        agent_port: cfg.agent_port,
        runtime_version: runtime.version(),
        labels: cfg.labels.clone(),
    };
    let mut node_obj = node::node_object(&identity, &machine, Timestamp::now());
    // A restarted agent finds its Node Ready with a podCIDR: it leaves the Ready condition alone
    // (posted again once the node is set up) rather than flapping it to False, which would make
    // the node lifecycle controller mark every pod here not Ready and pull them out of Services.
    let restarting = Api::<Node>::all(client.clone()).get_opt(&cfg.node_name).await.ok().flatten().is_some_and(|n| {
        n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_some()
            && n.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    });
    if let Some(st) = node_obj.status.as_mut() {
        st.conditions = (!restarting).then(|| node::ready_conditions(Timestamp::now(), false, "node network not ready: waiting for a podCIDR"));
    }
    let registered = node::register(&client, &node_obj).await.context("registering the Node")?;
    let cidr = pod_cidr(&client, &cfg, shutdown.clone()).await?;
    let gateway = gateway_of(&cidr);
    network::prepare_node(gateway).await.context("setting up the node network")?;
    // The VXLAN device exists before the datapath loads (tc attaches to it); its MTU is the pods'.
    let overlay_mtu = vxlan::prepare(cfg.network, cfg.uplink.as_deref(), cfg.node_ip, &cidr).await.context("setting up the VXLAN overlay")?;

    let datapath = match &cfg.pin_dir {
        Some(pin) => {
            let pin = pin.clone();
            let uplink = cfg.uplink.clone();
            let (node_ip, node_name, lb_mode) = (cfg.node_ip, cfg.node_name.clone(), cfg.lb_mode);
            let dp = tokio::task::spawn_blocking(move || -> anyhow::Result<skiff_datapath::Datapath> {
                let mut dp = skiff_datapath::Datapath::load(&pin).context("loading the eBPF datapath")?;
                if let Some(up) = &uplink {
                    dp.attach_tc(up).with_context(|| format!("attaching tc to the uplink {up}"))?;
                    dp.attach_xdp(up).with_context(|| format!("attaching XDP to the uplink {up}"))?;
                    // NodePort/LoadBalancer traffic is SNATed to the node's own address, so a
                    // backend on another node replies here (where the conntrack entry is). The
                    // translated packet never meets the stack's martian-source check: tc on the
                    // uplink delivers it by redirect (peer or neigh) before any routing.
                    dp.set_nodeport_snat(node_ip).context("setting the NodePort SNAT address")?;
                }
                // Written on every start (the pinned NODE_CONFIG outlives the agent), so the
                // flag always says what new flows get. DSR needs every node in this mode or at
                // least running this datapath: the backend's node is the one that reads the
                // option and answers the client.
                dp.set_lb_mode(lb_mode).context("setting the load-balancing mode")?;
                info!(lb_mode = %lb_mode, "NodePort to backends on other nodes");
                // Processes of the node itself (not in a pod) reach ClusterIPs through the
                // socket-LB programs on the node's host cgroup: tc sits only on pod veths and the
                // node has no route to the service range, so connect()/sendmsg() must translate.
                match skiff_datapath::cgroup2_root().map(|r| r.join("skiff").join(&node_name).join("host")) {
                    Ok(host_cg) => {
                        if let Err(e) = std::fs::create_dir_all(&host_cg).map_err(anyhow::Error::from).and_then(|()| Ok(dp.attach_cgroup(&host_cg)?)) {
                            warn!(cgroup = %host_cg.display(), "node processes get no ClusterIP (socket LB not attached): {e:#}");
                        } else {
                            info!(cgroup = %host_cg.display(), "socket LB attached for the node's host processes");
                        }
                    }
                    Err(e) => warn!("node processes get no ClusterIP: {e}"),
                }
                Ok(dp)
            })
            .await??;
            info!(pin_dir = %cfg.pin_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), "datapath loaded");
            Some(Arc::new(std::sync::Mutex::new(dp)))
        }
        None => None,
    };

    vxlan::finish(cfg.network, datapath.clone()).await.context("attaching the datapath to the overlay")?;

    std::fs::create_dir_all(&cfg.cni_conf_dir).with_context(|| format!("creating {}", cfg.cni_conf_dir.display()))?;
    let conf_path = cfg.cni_conf_dir.join("10-skiff.conflist");
    let tmp = conf_path.with_extension("tmp");
    let mut list = conflist(&cfg, &cidr);
    if let Some(sb) = runtime.sandbox() {
        // The runtime runs CNI itself (CRI): its libcni must read the results.
        list["cniVersion"] = json!(sb.cni_version());
    }
    if let Some(mtu) = overlay_mtu {
        list["plugins"][0]["mtu"] = json!(mtu);
    }
    std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?)?;
    std::fs::rename(&tmp, &conf_path)?;
    let cni = sandbox::CniNetwork::load(&cfg.cni_conf_dir, cfg.cni_bin_dirs.clone())?;

    let node_status = k8s_openapi::api::core::v1::NodeStatus {
        conditions: Some(node::ready_conditions(Timestamp::now(), true, "")),
        ..Default::default()
    };
    node::post_status(&client, &cfg.node_name, node_status).await?;
    info!(node = %cfg.node_name, pod_cidr = %cidr, "node ready");

    let agent_server = match (cfg.server_token.clone(), cfg.server_client_ca.clone()) {
        (None, None) => None,
        (token, client_ca) => {
            let scfg = server::ServerConfig {
                listen: std::net::SocketAddr::new(cfg.node_ip.into(), cfg.agent_port),
                token: token.unwrap_or_default(),
                client_ca,
                node_name: cfg.node_name.clone(),
                pods_dir: cfg.data_dir.join("pods"),
                cert_names: vec![cfg.node_ip.to_string(), cfg.node_name.clone()],
            };
            let (client, runtime, shutdown) = (client.clone(), runtime.clone(), shutdown.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = server::serve(scfg, client, runtime, shutdown).await {
                    warn!("agent endpoint (kubectl logs/exec) stopped: {e:#}");
                }
            }))
        }
    };
    if agent_server.is_none() {
        warn!("neither a server token nor the cluster CA given: the agent endpoint (kubectl logs/exec) is not started");
    }
    let ctx = Arc::new(pods::PodContext {
        client: client.clone(),
        runtime,
        cni,
        node_name: cfg.node_name.clone(),
        node_ip: cfg.node_ip.to_string(),
        pods_dir: cfg.data_dir.join("pods"),
        dns_server: Some(gateway.into()),
        cluster_domain: cfg.cluster_domain.clone(),
        backoff_base: cfg.backoff_base,
        resync: Duration::from_secs(1),
        cluster_ca: cfg.server_client_ca.clone(),
    });
    std::fs::create_dir_all(&ctx.pods_dir)?;
    let heartbeat = tokio::spawn(node::heartbeat_loop(client.clone(), registered, cfg.heartbeat_interval, cfg.heartbeat_interval, shutdown.clone()));
    let routes = tokio::spawn(routes_loop(client.clone(), cfg.node_name.clone(), cfg.network, cfg.node_ip, cidr, shutdown.clone()));
    let pods_dir = ctx.pods_dir.clone();
    tokio::spawn(image_gc::run(ctx.runtime.clone(), image_gc::ImageGcPolicy::from_env(), shutdown.clone()));
    let pods = tokio::spawn(pods::run(ctx, shutdown.clone()));
    tokio::spawn(metrics::metrics_loop(client.clone(), cfg.node_name.clone(), shutdown.clone()));
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // The service proxy: Services and EndpointSlices into this node's eBPF maps.
    let mut proxy_stats = Arc::new(skiff_proxy::ProxyStats::default());
    let proxy = datapath.clone().map(|dp| {
        let mut pcfg = skiff_proxy::ProxyConfig::new(cfg.node_name.clone(), vec![std::net::IpAddr::V4(cfg.node_ip)]);
        let dir = pods_dir.clone();
        pcfg.netns_lister = Some(Arc::new(move || pods::pod_netns_paths(&dir)));
        proxy_stats = pcfg.stats.clone();
        // NetworkPolicy into the same maps (POLICY trie, endpoint isolation flags).
        tokio::spawn(skiff_proxy::run_policy_sync(client.clone(), dp.clone(), skiff_proxy::PolicySyncConfig::new(cfg.node_name.clone()), stopped(shutdown.clone())));
        tokio::spawn(skiff_proxy::run(client.clone(), dp, pcfg, stopped(shutdown.clone())))
    });
    let metrics_listen = cfg.metrics_bind.unwrap_or(std::net::SocketAddr::new(cfg.node_ip.into(), 10249));
    let sandboxes_dir = pods_dir.clone();
    let agent_metrics: skiff_proxy::ExtraMetrics = Arc::new(move || {
        let n = std::fs::read_dir(&sandboxes_dir).map(|rd| rd.flatten().filter(|e| e.path().join("sandbox.json").is_file()).count()).unwrap_or(0);
        format!("# HELP skiff_agent_pods Pods with a sandbox on this node.\n# TYPE skiff_agent_pods gauge\nskiff_agent_pods {n}\n")
    });
    let metrics_server = skiff_proxy::serve_metrics(metrics_listen, datapath.clone(), proxy_stats, agent_metrics, stopped(shutdown.clone()));
    tokio::spawn(async move {
        if let Err(e) = metrics_server.await {
            warn!(listen = %metrics_listen, "metrics endpoint stopped: {e}");
        }
    });
    // Node-local cluster DNS on the pods' gateway address (pods' resolv.conf points here).
    let dns_listen = vec![std::net::SocketAddr::new(gateway.into(), 53)];
    let dns = tokio::spawn(skiff_dns::serve(client.clone(), dns_listen, cfg.cluster_domain.clone(), stopped(shutdown.clone())));
    let mut sd = shutdown.clone();
    let _ = sd.wait_for(|s| *s).await;
    let _ = heartbeat.await;
    let _ = routes.await;
    if let Some(s) = agent_server {
        let _ = s.await;
    }
    if let Some(p) = proxy {
        match p.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("service proxy stopped: {e}"),
            Err(e) => warn!("service proxy task: {e}"),
        }
    }
    if let Ok(Err(e)) = dns.await {
        warn!("cluster DNS stopped: {e:#}");
    }
    match pods.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("pod manager stopped: {e:#}"),
        Err(e) => warn!("pod manager task: {e}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_is_first_host() {
        assert_eq!(gateway_of(&"10.244.3.0/24".parse().unwrap()), Ipv4Addr::new(10, 244, 3, 1));
    }

    #[test]
    fn conflist_names_skiff_cni_and_pins() {
        let mut cfg = AgentConfig::new("n1", Ipv4Addr::new(172, 20, 0, 11), "/var/lib/skiff-agent".into());
        let c = conflist(&cfg, &"10.244.1.0/24".parse().unwrap());
        assert_eq!(c["plugins"][0]["type"], "skiff-cni");
        assert_eq!(c["plugins"][0]["podCIDR"], "10.244.1.0/24");
        assert!(c["plugins"][0].get("pinDir").is_none());
        cfg.pin_dir = Some("/sys/fs/bpf/skiff/n1".into());
        assert_eq!(conflist(&cfg, &"10.244.1.0/24".parse().unwrap())["plugins"][0]["pinDir"], "/sys/fs/bpf/skiff/n1");
    }
}
