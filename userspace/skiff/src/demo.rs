//! `skiff demo`: Service traffic through the eBPF datapath, for a Service read from the API.
//!
//! Until nodes run pods (issue 5), the Service's backends are stand-in pods: network namespaces of
//! a lab built by `skiff_datapath::lab` (a node namespace holding the pods' veths, no interface
//! out of the lab), each running a small echo server on the Service's target port. The datapath is
//! the real one: the tc program on every pod veth DNATs the ClusterIP the apiserver allocated to a
//! backend and reverses the NAT on the replies; no iptables rule is involved.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use skiff_datapath::lab::{Lab, Server, in_netns, require_privileges, tcp_ask};
use skiff_datapath::{BackendSpec, Proto, ServiceSpec};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The kubeconfig of the server to read the Service from.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long, default_value = "demo")]
    namespace: String,
    #[arg(long, default_value = "echo")]
    service: String,
    /// How many requests the client pod sends through the ClusterIP.
    #[arg(long, default_value_t = 30)]
    requests: usize,
}

/// What the demo needs from the Service and its Deployment.
#[derive(Debug, PartialEq)]
struct Frontend {
    cluster_ip: Ipv4Addr,
    port: u16,
    target_port: u16,
    replicas: usize,
}

async fn read_frontend(args: &DemoArgs) -> Result<Frontend> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let services: Api<Service> = Api::namespaced(client.clone(), &args.namespace);
    let svc = services
        .get(&args.service)
        .await
        .with_context(|| format!("reading Service {}/{} (apply examples/demo.yaml first)", args.namespace, args.service))?;
    let deployments: Api<Deployment> = Api::namespaced(client, &args.namespace);
    let deployments = deployments.list(&Default::default()).await?.items;
    frontend_of(&svc, &deployments)
}

/// The Service's ClusterIP and first TCP port, its target port resolved against the container
/// ports of the Deployment its selector picks, and that Deployment's replica count.
fn frontend_of(svc: &Service, deployments: &[Deployment]) -> Result<Frontend> {
    let spec = svc.spec.as_ref().context("the Service has no spec")?;
    let cluster_ip: Ipv4Addr = spec
        .cluster_ip
        .as_deref()
        .context("the Service has no clusterIP")?
        .parse()
        .context("the Service's clusterIP is not an IPv4 address (headless?)")?;
    let port = spec
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .context("the Service has no TCP port")?;
    let selector = spec.selector.clone().unwrap_or_default();
    let deployment = deployments.iter().find(|d| {
        let labels = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    });
    let target_port = match &port.target_port {
        None => port.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => deployment
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port)
            })
            .with_context(|| format!("no container port named {name:?} in the Deployment the Service selects"))?,
    };
    let replicas = deployment.and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas).unwrap_or(1);
    Ok(Frontend {
        cluster_ip,
        port: u16::try_from(port.port).context("service port out of range")?,
        target_port: u16::try_from(target_port).context("target port out of range")?,
        replicas: usize::try_from(replicas).unwrap_or(1).clamp(1, 8),
    })
}

pub fn run(args: DemoArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let frontend = runtime.block_on(read_frontend(&args))?;
    if !require_privileges("skiff demo") {
        bail!("skiff demo needs root, bpffs, BTF and iproute2 (see the message above)");
    }
    println!(
        "Service {}/{}: ClusterIP {}:{} -> target port {} on {} backends",
        args.namespace, args.service, frontend.cluster_ip, frontend.port, frontend.target_port, frontend.replicas
    );

    // Pods 0..replicas are the backends, the last one is the client.
    let lab = Lab::new("demo", frontend.replicas + 1);
    let client = &lab.pods[frontend.replicas];
    let _servers: Vec<Server> = lab.pods[..frontend.replicas]
        .iter()
        .map(|p| Server::start(&p.netns, p.ip, frontend.target_port))
        .collect();
    let mut datapath = lab.datapath();
    datapath.upsert_service(&ServiceSpec {
        vip: IpAddr::V4(frontend.cluster_ip),
        port: frontend.port,
        proto: Proto::Tcp,
        backends: lab.pods[..frontend.replicas]
            .iter()
            .map(|p| BackendSpec { ip: IpAddr::V4(p.ip), port: frontend.target_port, ready: true, terminating: false })
            .collect(),
        affinity_timeout: None,
        external_traffic_local: false,
    })?;

    let vip = SocketAddr::new(IpAddr::V4(frontend.cluster_ip), frontend.port);
    let answers: Vec<std::io::Result<(String, SocketAddr)>> =
        in_netns(&client.netns, || (0..args.requests).map(|_| tcp_ask(vip)).collect());
    let mut by_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for answer in answers {
        match answer {
            // The client saw the ClusterIP as its peer; the answer names the backend pod.
            Ok((backend, peer)) if peer == vip => *by_backend.entry(backend).or_default() += 1,
            _ => failed += 1,
        }
    }
    println!("\n{} requests from pod {} to {vip}:", args.requests, client.ip);
    for (backend, n) in &by_backend {
        println!("  answered by backend {backend:<15} {n:>4}  {}", "#".repeat(*n));
    }
    println!("\nThe node's datapath maps (skiff datapath services):");
    print!(
        "{}",
        crate::datapath_cli::format_services(&datapath.dump_services()?, &datapath.dump_backends()?)
    );
    let conntrack = datapath.dump_conntrack()?.len();
    println!("conntrack entries made by the tc program: {conntrack}");
    if failed > 0 || by_backend.len() < frontend.replicas.min(2) {
        bail!("{failed} of {} requests failed or traffic reached too few backends: {by_backend:?}", args.requests);
    }
    println!("\nService traffic flowed through eBPF: every request was DNATed by the tc program, with no iptables rule.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(target: Option<IntOrString>) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "echo", "namespace": "demo"},
            "spec": {"clusterIP": "10.96.0.42", "selector": {"app": "echo"},
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": target}]}
        }))
        .expect("service")
    }

    fn deployment() -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "echo"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "echo"}},
                     "template": {"metadata": {"labels": {"app": "echo"}},
                                  "spec": {"containers": [{"name": "echo", "ports": [{"name": "http", "containerPort": 8080}]}]}}}
        }))
        .expect("deployment")
    }

    #[test]
    fn named_target_port_resolves_through_the_selected_deployment() {
        let f = frontend_of(&service(Some(IntOrString::String("http".into()))), &[deployment()]).expect("frontend");
        assert_eq!(f, Frontend { cluster_ip: Ipv4Addr::new(10, 96, 0, 42), port: 80, target_port: 8080, replicas: 3 });
    }

    #[test]
    fn numeric_and_missing_target_ports() {
        assert_eq!(frontend_of(&service(Some(IntOrString::Int(9000))), &[]).expect("f").target_port, 9000);
        assert_eq!(frontend_of(&service(None), &[]).expect("f").target_port, 80);
        assert!(frontend_of(&service(Some(IntOrString::String("nope".into()))), &[deployment()]).is_err());
    }
}
