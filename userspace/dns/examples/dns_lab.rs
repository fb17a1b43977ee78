//! A manual check with any DNS client: an in-process apiserver with a few sample Services and
//! skiff-dns in front of it on loopback, for a bounded time.
//!
//! `cargo run -p skiff-dns --example dns_lab -- 127.0.0.1:5353 60` then e.g.
//! `dig @127.0.0.1 -p 5353 web.default.svc.cluster.local` or `dig ... +tcp`.

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:5353").parse()?;
    let seconds: u64 = args.next().as_deref().unwrap_or("60").parse()?;
    if !listen.ip().is_loopback() {
        anyhow::bail!("the lab listens on loopback only");
    }

    let data = tempfile::tempdir()?;
    let mut config = skiff_apiserver::ServerConfig::new(data.path().to_path_buf());
    config.bind = "127.0.0.1:0".parse()?;
    let _server = skiff_apiserver::start(config).await?;
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&skiff_apiserver::kubeconfig(data.path())?)?;
    let client = Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?,
    )?;

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    for body in [
        json!({"metadata": {"name": "web", "namespace": "default"},
               "spec": {"ports": [{"name": "http", "port": 80}]}}),
        json!({"metadata": {"name": "db", "namespace": "default"},
               "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
        json!({"metadata": {"name": "ext", "namespace": "default"},
               "spec": {"type": "ExternalName", "externalName": "db.example.com"}}),
    ] {
        services
            .create(&PostParams::default(), &serde_json::from_value(body)?)
            .await?;
    }
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    slices
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "db-1", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "db"}},
                "addressType": "IPv4",
                "ports": [{"name": "pg", "port": 15432}],
                "endpoints": [{"addresses": ["10.244.1.5"], "hostname": "db-0"},
                              {"addresses": ["10.244.2.6"], "hostname": "db-1"}],
            }))?,
        )
        .await?;

    println!("serving cluster.local on {listen} (UDP+TCP) for {seconds} s");
    skiff_dns::serve(
        client,
        vec![listen],
        "cluster.local".to_string(),
        tokio::time::sleep(Duration::from_secs(seconds)),
    )
    .await
}
