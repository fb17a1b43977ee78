//! `skiff demo`: Service traffic through the eBPF datapath of a `skiff up` cluster.
//!
//! It reads a Service and the pods its selector picks from the API, enters the network
//! namespace of one of those pods (a real pod on one of the lab's nodes), sends HTTP requests to
//! the Service's ClusterIP, and prints which pod answered each, followed by the client node's
//! service maps and the datapath's counters. The ClusterIP exists in no routing table and no
//! iptables rule: the tc program on the pod's veth translates it to a backend.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The `skiff up` data directory (its lab.json names the kubeconfig and the nodes).
    #[arg(long, default_value = crate::up::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    #[arg(long, default_value = "demo")]
    namespace: String,
    #[arg(long, default_value = "echo")]
    service: String,
    /// How many requests the client pod sends through the ClusterIP.
    #[arg(long, default_value_t = 30)]
    requests: usize,
}

/// The Service's ClusterIP and first TCP port.
pub fn frontend_of(svc: &Service) -> Result<SocketAddr> {
    let spec = svc.spec.as_ref().context("the Service has no spec")?;
    let ip: IpAddr = spec
        .cluster_ip
        .as_deref()
        .context("the Service has no clusterIP")?
        .parse()
        .context("the Service's clusterIP is not an address (headless?)")?;
    let port = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .context("the Service has no TCP port")?;
    Ok(SocketAddr::new(ip, u16::try_from(port.port).context("service port out of range")?))
}

/// One HTTP/1.0 GET; the last line of the body (the echo server answers `<hostname> <pod-ip>`).
fn http_get(dst: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {dst}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.take(64 * 1024).read_to_string(&mut out)?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.lines().last().unwrap_or_default().trim().to_string())
}

/// Runs `f` on a thread of its own inside the network namespace at `netns`.
fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: a valid namespace fd; only this thread changes namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("entering {}: {}", netns.display(), std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
    })
}

pub fn run(args: DemoArgs) -> Result<()> {
    let Some(lab) = crate::up::load(&args.data_dir)? else {
        bail!("no cluster in {} (run skiff up first)", args.data_dir.display());
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let (vip, pods) = runtime.block_on(async {
        let client = crate::kube_client(Path::new(&lab.kubeconfig)).await?;
        let svc = Api::<Service>::namespaced(client.clone(), &args.namespace)
            .get(&args.service)
            .await
            .with_context(|| format!("reading Service {}/{} (apply examples/demo.yaml first)", args.namespace, args.service))?;
        let vip = frontend_of(&svc)?;
        let selector = svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
        let labels = selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let pods = Api::<Pod>::namespaced(client, &args.namespace).list(&kube::api::ListParams::default().labels(&labels)).await?.items;
        Ok::<_, anyhow::Error>((vip, pods))
    })?;
    let running: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
        .collect();
    let Some(client_pod) = running.first() else {
        bail!("no Running pod behind {}/{} yet (kubectl get pods -n {})", args.namespace, args.service, args.namespace);
    };
    let client_name = client_pod.metadata.name.clone().unwrap_or_default();
    let client_node = client_pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
    let netns = PathBuf::from(format!("/run/netns/skp-{}", client_pod.metadata.uid.clone().unwrap_or_default()));
    let pin_dir = lab.nodes.iter().find(|n| n.name == client_node).map(|n| PathBuf::from(&n.pin_dir));
    let before = pin_dir.as_ref().and_then(|p| skiff_datapath::Datapath::open_pinned(p).ok()).and_then(|d| d.counters().ok());

    println!("{} requests from pod {client_name} (on {client_node}) to Service {}/{} at {vip}:", args.requests, args.namespace, args.service);
    let answers = in_netns(&netns, || (0..args.requests).map(|_| http_get(vip)).collect::<Vec<_>>())?;
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for a in answers {
        match a {
            Ok(line) if !line.is_empty() => *by_pod.entry(line).or_default() += 1,
            _ => failed += 1,
        }
    }
    for (who, n) in &by_pod {
        let node = pods
            .iter()
            .find(|p| who.starts_with(p.metadata.name.as_deref().unwrap_or("?")))
            .and_then(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
            .unwrap_or_default();
        println!("  answered by {who:<40} on {node:<14} {n:>4}  {}", "#".repeat(*n));
    }
    if let Some(pin) = &pin_dir {
        let dp = skiff_datapath::Datapath::open_pinned(pin).with_context(|| format!("opening {}", pin.display()))?;
        println!("\nThe datapath of {client_node} (skiff datapath --pin-dir {} services):", pin.display());
        print!("{}", crate::datapath_cli::format_services(&dp.dump_services()?, &dp.dump_backends()?));
        if let (Some(before), Ok(after)) = (before, dp.counters()) {
            let moved: Vec<String> = after
                .iter()
                .filter_map(|(k, v)| {
                    let d = v.saturating_sub(*before.get(k).unwrap_or(&0));
                    (d > 0).then(|| format!("{k} +{d}"))
                })
                .collect();
            println!("datapath counters during the demo: {}", moved.join(", "));
        }
    }
    let backends = running.len();
    if failed > 0 || by_pod.len() < backends.min(2) {
        bail!("{failed} of {} requests failed, or traffic reached {} of {backends} pods: {by_pod:?}", args.requests, by_pod.len());
    }
    println!("\nService traffic flowed through eBPF: each connection to {vip} was translated to a pod by skiff's tc program, with no iptables rule.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_is_cluster_ip_and_first_tcp_port() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "spec": {"clusterIP": "10.96.0.42", "ports": [{"port": 53, "protocol": "UDP"}, {"port": 80}]}
        }))
        .unwrap();
        assert_eq!(frontend_of(&svc).unwrap(), "10.96.0.42:80".parse().unwrap());
        let headless: Service = serde_json::from_value(serde_json::json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}})).unwrap();
        assert!(frontend_of(&headless).is_err());
        let udp_only: Service = serde_json::from_value(serde_json::json!({"spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 53, "protocol": "UDP"}]}})).unwrap();
        assert!(frontend_of(&udp_only).is_err());
    }
}
