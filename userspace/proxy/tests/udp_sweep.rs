//! The proxy's stale-UDP-socket sweep (cilium #12859) end to end: connected UDP sockets in a pod,
//! translated by the socket layer, point at a backend; the backend leaves the EndpointSlice
//! through the API; the proxy removes it from the maps and then, through the agent's netns
//! hook, destroys exactly the sockets that pointed at it (the others keep working).
//!
//! Socket LB needs this process in the lab's cgroup (cgroup v2 moves whole processes), so this
//! lives in its own test binary. Needs root, bpffs, BTF, cgroup2 and iproute2: skipped with a
//! reason outside CI, fails with CI=true.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use skiff_datapath::lab::{Lab, Server, in_netns, require_privileges};
use skiff_datapath::{BackendState, Proto};
use skiff_proxy::ProxyConfig;

const NODE: &str = "node-a";
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

fn endpoint(ip: std::net::Ipv4Addr) -> serde_json::Value {
    json!({"addresses": [ip.to_string()], "nodeName": NODE, "conditions": {"ready": true}})
}

fn ask(u: &UdpSocket) -> std::io::Result<String> {
    u.send(b"who")?;
    let mut buf = [0u8; 64];
    let n = u.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_destroys_connected_udp_sockets_to_removed_backends() {
    if !require_privileges("proxy_destroys_connected_udp_sockets_to_removed_backends") {
        return;
    }
    let mut lab = Lab::new("pxudp", 3);
    let dp = lab.datapath();
    let cg = lab.cgroup();
    let dp = Arc::new(Mutex::new(dp));
    dp.lock()
        .unwrap_or_else(|e| e.into_inner())
        .attach_cgroup(&cg)
        .expect("attach socket LB");
    lab.enter_cgroup(&cg);
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    let pod0 = lab.pods[0].netns.clone();

    let (client, _server, _data) = apiserver().await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns"},
        "spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 8080}]},
    }))
    .expect("service json");
    let svc = services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let vip: IpAddr = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("clusterIP")
        .parse()
        .expect("clusterIP parses");
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "dns-manual", "labels": {"kubernetes.io/service-name": "dns"}},
        "addressType": "IPv4",
        "ports": [{"name": "dns", "port": 8080, "protocol": "UDP"}],
        "endpoints": [endpoint(lab.pods[1].ip), endpoint(lab.pods[2].ip)],
    }))
    .expect("slice json");
    slices
        .create(&PostParams::default(), &slice)
        .await
        .expect("create slice");

    let mut config = ProxyConfig::new(NODE, vec![]);
    let sweep = vec![PathBuf::from(format!("/run/netns/{pod0}"))];
    let lister_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let calls = lister_calls.clone();
    config.netns_lister = Some(Arc::new(move || {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        sweep.clone()
    }));
    let stats = config.stats.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(skiff_proxy::run(
        client.clone(),
        dp.clone(),
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    let active = |n: usize| {
        let dp = dp.clone();
        move || {
            let d = dp.lock().unwrap_or_else(|e| e.into_inner());
            let s = d
                .dump_services()
                .expect("services")
                .into_iter()
                .find(|s| s.vip == vip && s.port == 53 && s.proto == Proto::Udp)?;
            (s.active_backends.len() == n).then_some(s.service_id)
        }
    };
    let service_id = eventually("two backends programmed", active(2)).await;

    let vip_addr = SocketAddr::new(vip, 53);
    let (socks, first) = tokio::task::block_in_place(|| {
        in_netns(&pod0, || {
            let socks: Vec<UdpSocket> = (0..16)
                .map(|_| {
                    let u = UdpSocket::bind("0.0.0.0:0").expect("bind");
                    u.set_read_timeout(Some(Duration::from_secs(2)))
                        .expect("timeout");
                    u.connect(vip_addr).expect("connect");
                    u
                })
                .collect();
            let first: Vec<String> = socks.iter().map(|u| ask(u).expect("udp")).collect();
            (socks, first)
        })
    });
    let gone = lab.pods[1].ip.to_string();
    let kept = lab.pods[2].ip.to_string();
    let on_gone = first.iter().filter(|w| **w == gone).count();
    assert!(on_gone > 0 && on_gone < 16, "sockets spread: {first:?}");

    // Pod 1 leaves the slice (its server keeps running: a stale socket would still be answered).
    slices
        .patch(
            "dns-manual",
            &PatchParams::default(),
            &Patch::Merge(json!({"endpoints": [endpoint(lab.pods[2].ip)]})),
        )
        .await
        .expect("remove a backend");
    eventually("one backend left", active(1)).await;
    eventually("the sweep", || {
        (stats.snapshot().udp_sockets_destroyed == on_gone as u64).then_some(())
    })
    .await;
    assert!(lister_calls.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    {
        let d = dp.lock().unwrap_or_else(|e| e.into_inner());
        let b: Vec<_> = d
            .dump_backends()
            .expect("backends")
            .into_iter()
            .filter(|b| b.service_id == service_id)
            .map(|b| (b.ip.to_string(), b.state))
            .collect();
        assert_eq!(b, [(kept.clone(), BackendState::Active)]);
    }
    let after: Vec<std::io::Result<String>> =
        tokio::task::block_in_place(|| in_netns(&pod0, || socks.iter().map(ask).collect()));
    for (before, now) in first.iter().zip(&after) {
        if *before == gone {
            assert!(
                now.is_err(),
                "a socket to the removed backend was destroyed: {now:?}"
            );
        } else {
            assert_eq!(
                now.as_deref().ok(),
                Some(kept.as_str()),
                "live sockets untouched"
            );
        }
    }

    let _ = stop.send(());
    tokio::time::timeout(WAIT, task)
        .await
        .expect("proxy stops in time")
        .expect("proxy task did not panic")
        .expect("proxy returned Ok");
    drop(socks);
}
