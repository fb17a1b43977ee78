//! The proxy for real: an in-process skiff-apiserver, a netns lab with the real eBPF datapath,
//! a Service + hand-made EndpointSlice created through the API. Checks that the proxy programs
//! them (maps and real traffic, ClusterIP through tc and NodePort through XDP), follows a
//! scale-down (one endpoint removed, one terminating: its open connection lives on, it gets no
//! new ones), restarts over the same pins without touching anything but the diff (an open TCP
//! connection survives), and removes everything when the Service is deleted.
//!
//! Needs root, bpffs, BTF and iproute2: skipped with a reason outside CI, fails with CI=true.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use skiff_datapath::lab::{
    self, Lab, Server, UPLINK_NODE, in_netns, require_privileges, tcp_ask, udp_ask,
};
use skiff_datapath::{BackendState, Datapath, Proto};
use skiff_proxy::{ProxyConfig, ProxyStats, metrics_text};

const NODE: &str = "node-a";
const SNAT: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 2);
const WAIT: Duration = Duration::from_secs(20);

async fn apiserver() -> (Client, skiff_apiserver::RunningServer, tempfile::TempDir) {
    let data = tempfile::tempdir().expect("temp data dir");
    let mut config = skiff_apiserver::ServerConfig::new(data.path().to_path_buf());
    config.bind = "127.0.0.1:0".parse().expect("loopback address");
    let server = skiff_apiserver::start(config)
        .await
        .expect("apiserver starts");
    let text = skiff_apiserver::kubeconfig(data.path()).expect("kubeconfig written");
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kube config");
    (Client::try_from(config).expect("kube client"), server, data)
}

/// A running proxy and the way to stop it.
struct RunningProxy {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), skiff_proxy::ProxyError>>,
    stats: Arc<ProxyStats>,
}

impl RunningProxy {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("proxy stops in time")
            .expect("proxy task did not panic");
        r.expect("proxy returned Ok on shutdown");
    }
}

fn start_proxy(client: &Client, dp: &Arc<Mutex<Datapath>>, netns: Vec<PathBuf>) -> RunningProxy {
    let mut config = ProxyConfig::new(NODE, vec![IpAddr::V4(UPLINK_NODE)]);
    config.netns_lister = Some(Arc::new(move || netns.clone()));
    config.conntrack_gc_interval = Duration::from_secs(1);
    let stats = config.stats.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = rx.await;
    };
    let task = tokio::spawn(skiff_proxy::run(
        client.clone(),
        dp.clone(),
        config,
        shutdown,
    ));
    RunningProxy {
        stop: Some(tx),
        task,
        stats,
    }
}

/// Polls `f` every 100 ms until it returns Some, for at most WAIT.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for<F: Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The (ip -> state) of the backends of frontend vip:port/proto, and its active count.
fn backends_of(
    dp: &Mutex<Datapath>,
    vip: IpAddr,
    port: u16,
    proto: Proto,
) -> Option<(BTreeMap<String, BackendState>, usize)> {
    let dp = dp.lock().unwrap_or_else(|e| e.into_inner());
    let svc = dp
        .dump_services()
        .expect("dump services")
        .into_iter()
        .find(|s| s.vip == vip && s.port == port && s.proto == proto)?;
    let backends = dp
        .dump_backends()
        .expect("dump backends")
        .into_iter()
        .filter(|b| b.service_id == svc.service_id)
        .map(|b| (b.ip.to_string(), b.state))
        .collect();
    Some((backends, svc.active_backends.len()))
}

fn endpoint(ip: Ipv4Addr, ready: bool, terminating: bool) -> serde_json::Value {
    json!({"addresses": [ip.to_string()], "nodeName": NODE,
           "conditions": {"ready": ready, "serving": true, "terminating": terminating}})
}

fn slice_ports() -> serde_json::Value {
    json!([{"name": "tcp", "port": 8080, "protocol": "TCP"},
           {"name": "udp", "port": 8080, "protocol": "UDP"}])
}

fn who_answers_tcp(client_netns: &str, dst: SocketAddr, n: usize) -> BTreeSet<String> {
    tokio::task::block_in_place(|| {
        in_netns(client_netns, || {
            (0..n)
                .map(|_| tcp_ask(dst).expect("tcp through the service").0)
                .collect()
        })
    })
}

fn who_answers_udp(client_netns: &str, dst: SocketAddr, n: usize) -> BTreeSet<String> {
    tokio::task::block_in_place(|| {
        in_netns(client_netns, || {
            (0..n)
                .map(|_| udp_ask(dst).expect("udp through the service").0)
                .collect()
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_programs_follows_restarts_and_removes_a_service() {
    if !require_privileges("proxy_programs_follows_restarts_and_removes_a_service") {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "skiff_proxy=debug".into()),
        )
        .with_test_writer()
        .try_init();

    // Pod 0 is the client; pods 1..=4 serve TCP and UDP on 8080.
    let mut lab = Lab::new("proxy", 5);
    let ext = lab.add_uplink();
    let ip_of = |i: usize| lab.pods[i].ip;
    let _servers: Vec<Server> = (1..=4)
        .map(|i| Server::start(&lab.pods[i].netns, lab.pods[i].ip, 8080))
        .collect();
    let load = |lab: &Lab| {
        let mut dp = lab.datapath();
        lab.in_node(|| dp.attach_xdp("up0")).expect("attach xdp");
        dp.set_nodeport_snat(SNAT).expect("nodeport snat");
        Arc::new(Mutex::new(dp))
    };
    let dp = load(&lab);
    let client_netns = lab.pods[0].netns.clone();
    let sweep = vec![PathBuf::from(format!("/run/netns/{client_netns}"))];

    let (client, _server, _data) = apiserver().await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");

    let others: Vec<String> = Api::<Service>::all(client.clone())
        .list(&Default::default())
        .await
        .expect("list services")
        .items
        .into_iter()
        .map(|s| s.metadata.name.unwrap_or_default())
        .collect();
    assert_eq!(
        others,
        ["kubernetes"],
        "the apiserver's own Service is the only other one"
    );
    // No selector: the EndpointSlice is made by hand, as for an external backend set.
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"type": "NodePort", "ports": [
            {"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080},
            {"name": "udp", "port": 80, "protocol": "UDP", "targetPort": 8080}]},
    }))
    .expect("service json");
    let svc = services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let spec = svc.spec.as_ref().expect("spec");
    let vip: IpAddr = spec
        .cluster_ip
        .as_deref()
        .expect("clusterIP allocated")
        .parse()
        .expect("clusterIP parses");
    let node_ports: Vec<u16> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| p.node_port.expect("nodePort allocated") as u16)
        .collect();
    let (node_port, udp_node_port) = (node_ports[0], node_ports[1]);
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-manual", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": slice_ports(),
        "endpoints": [endpoint(ip_of(1), true, false), endpoint(ip_of(2), true, false),
                      endpoint(ip_of(3), true, false)],
    }))
    .expect("slice json");
    slices
        .create(&PostParams::default(), &slice)
        .await
        .expect("create slice");

    // 1. The proxy programs the Service: maps and traffic.
    let proxy = start_proxy(&client, &dp, sweep.clone());
    let (backends, active) = eventually("the service in the maps", || {
        backends_of(&dp, vip, 80, Proto::Tcp).filter(|(b, _)| b.len() == 3)
    })
    .await;
    assert_eq!(active, 3);
    assert!(backends.values().all(|s| *s == BackendState::Active));
    for (port, proto) in [
        (80, Proto::Udp),
        (node_port, Proto::Tcp),
        (udp_node_port, Proto::Udp),
    ] {
        let front = if port == 80 {
            vip
        } else {
            IpAddr::V4(UPLINK_NODE)
        };
        let (b, active) = eventually("the other frontends", || {
            backends_of(&dp, front, port, proto)
        })
        .await;
        assert_eq!((b.len(), active), (3, 3), "{front}:{port}/{proto:?}");
    }
    let vip_addr = SocketAddr::new(vip, 80);
    let three: BTreeSet<String> = (1..=3).map(|i| ip_of(i).to_string()).collect();
    assert_eq!(
        who_answers_tcp(&client_netns, vip_addr, 60),
        three,
        "tcp via ClusterIP"
    );
    assert_eq!(
        who_answers_udp(&client_netns, vip_addr, 60),
        three,
        "udp via ClusterIP"
    );
    let np_addr = SocketAddr::from((UPLINK_NODE, node_port));
    assert!(
        who_answers_tcp(&ext, np_addr, 30).is_subset(&three),
        "tcp via NodePort (XDP)"
    );
    // The apiserver's own `kubernetes` Service (one port, no slices here) is programmed too.
    let metrics = metrics_text(&dp, &proxy.stats);
    assert!(
        metrics.contains("skiff_proxy_services_programmed 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("skiff_proxy_frontends_programmed 5\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("skiff_datapath_events_total{event=\"dnat\"}"),
        "{metrics}"
    );

    // 2. Scale down: the backend of an open connection becomes terminating, another goes.
    let mut conn = tokio::task::block_in_place(|| {
        in_netns(&client_netns, || {
            lab::Conn::open(vip_addr).expect("open a connection")
        })
    });
    let ask = |conn: &mut lab::Conn| {
        tokio::task::block_in_place(|| in_netns(&client_netns, || conn.ask()))
    };
    let kept = ask(&mut conn).expect("first answer");
    let idx = |ip: &str| {
        (1..=3)
            .find(|i| ip_of(*i).to_string() == ip)
            .expect("a backend")
    };
    let term = idx(&kept);
    let others: Vec<usize> = (1..=3).filter(|i| *i != term).collect();
    let (removed, survivor) = (others[0], others[1]);
    let scaled = json!({"endpoints": [endpoint(ip_of(term), false, true),
                                      endpoint(ip_of(survivor), true, false)]});
    slices
        .patch("web-manual", &PatchParams::default(), &Patch::Merge(scaled))
        .await
        .expect("scale the slice down");
    let (backends, active) = eventually("the scale-down in the maps", || {
        backends_of(&dp, vip, 80, Proto::Tcp).filter(|(b, _)| b.len() == 2)
    })
    .await;
    assert_eq!(active, 1);
    assert_eq!(
        backends.get(&ip_of(term).to_string()),
        Some(&BackendState::Terminating)
    );
    assert_eq!(
        backends.get(&ip_of(survivor).to_string()),
        Some(&BackendState::Active)
    );
    assert!(!backends.contains_key(&ip_of(removed).to_string()));
    let only_survivor = BTreeSet::from([ip_of(survivor).to_string()]);
    assert_eq!(
        who_answers_tcp(&client_netns, vip_addr, 20),
        only_survivor,
        "new flows"
    );
    assert_eq!(
        who_answers_udp(&client_netns, vip_addr, 20),
        only_survivor,
        "new udp flows"
    );
    assert_eq!(
        ask(&mut conn).expect("open flow to the terminating backend"),
        kept
    );
    let ops_before_restart = proxy.stats.snapshot().ops_applied;
    assert!(ops_before_restart > 0);

    // 3. Restart over the same pins. While no proxy runs, pod 4 joins: the restarted proxy
    //    applies exactly that (backend + slot + service count, per frontend) and nothing else.
    proxy.stop().await;
    let dp_before = {
        let d = dp.lock().unwrap_or_else(|e| e.into_inner());
        (
            d.dump_services().expect("services"),
            d.dump_backends().expect("backends"),
        )
    };
    drop(dp);
    let grown = json!({"endpoints": [endpoint(ip_of(term), false, true),
                                     endpoint(ip_of(survivor), true, false),
                                     endpoint(ip_of(4), true, false)]});
    slices
        .patch("web-manual", &PatchParams::default(), &Patch::Merge(grown))
        .await
        .expect("grow the slice");
    let dp = load(&lab);
    {
        let d = dp.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(
            (
                d.dump_services().expect("services"),
                d.dump_backends().expect("backends")
            ),
            dp_before,
            "reloading the datapath kept every map entry"
        );
    }
    assert_eq!(
        ask(&mut conn).expect("open flow across the datapath reload"),
        kept
    );
    let proxy = start_proxy(&client, &dp, sweep.clone());
    let stats = proxy.stats.clone();
    eventually("the restarted proxy's startup sync", || {
        stats.snapshot().synced.then_some(())
    })
    .await;
    let s = stats.snapshot();
    // 4 frontends (ClusterIP + NodePort, TCP + UDP) x (PutBackend, PutSlot, PutService).
    assert_eq!(
        s.startup_sync_ops, 12,
        "only the diff is applied at startup: {s:?}"
    );
    let (backends, active) = backends_of(&dp, vip, 80, Proto::Tcp).expect("service kept");
    assert_eq!((backends.len(), active), (3, 2));
    assert_eq!(
        ask(&mut conn).expect("open flow across the proxy restart"),
        kept
    );
    let two = BTreeSet::from([ip_of(survivor).to_string(), ip_of(4).to_string()]);
    assert_eq!(who_answers_tcp(&client_netns, vip_addr, 40), two);

    // 4. Delete the Service: every frontend and backend of it leaves the maps.
    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete service");
    let dpc = dp.clone();
    wait_for("the service to leave the maps", || {
        let dp = dpc.clone();
        async move {
            let d = dp.lock().unwrap_or_else(|e| e.into_inner());
            let left: Vec<_> = d.dump_services().expect("services");
            left.len() == 1
                && left[0].vip != vip
                && left[0].port == 443
                && d.dump_backends().expect("backends").is_empty()
        }
    })
    .await;
    assert!(tokio::task::block_in_place(|| in_netns(&client_netns, || tcp_ask(vip_addr))).is_err());
    let s = stats.snapshot();
    assert_eq!((s.services_programmed, s.frontends_programmed), (1, 1));
    assert!(
        s.conntrack_gc_runs >= 1 || {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            stats.snapshot().conntrack_gc_runs >= 1
        }
    );
    proxy.stop().await;
    drop(conn);
}
