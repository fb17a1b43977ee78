//! `skiff up --nodes 3` as a new user runs it, then real kubectl: a Deployment of 6 pods
//! spreads over the 3 nodes and becomes Running and Ready; every pod reaches every other by pod
//! IP across nodes and the Service's ClusterIP through the eBPF datapath; readiness gates
//! endpoints; a crashing container is restarted and counted; `skiff down` leaves nothing.
//!
//! Traffic is sent from inside the pods' own network namespaces (the test enters them with
//! setns on a thread of its own), to pod and service addresses of the lab only.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;


#[test]
fn three_node_cluster_runs_pods_that_reach_each_other_and_services() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0) || !require("runc", have("runc")) || !require("iproute2", have("ip")) {
        return;
    }
    ensure_sibling_binaries();
    let image = echo_image();
    let mut cluster = Cluster::up(3, &image);
    let k = Kubectl::new(kubectl, &cluster.kubeconfig);

    let nodes = k.json(&["get", "nodes", "-o", "json"]);
    let node_names: BTreeSet<String> = nodes["items"].as_array().unwrap().iter().map(|n| n["metadata"]["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(node_names.len(), 3, "three nodes registered: {node_names:?}");
    let cidrs: BTreeSet<String> = nodes["items"].as_array().unwrap().iter().map(|n| n["spec"]["podCIDR"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(cidrs.len(), 3, "each node has its own podCIDR: {cidrs:?}");

    k.run_with_stdin(&["apply", "-f", "-"], Some(&echo_workload(6)));
    let pods = eventually("6 pods Running and Ready", Duration::from_secs(120), || {
        let pods = k.json(&["get", "pods", "-n", "e2e", "-o", "json"]);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        let ready = items.iter().filter(|p| {
            p["status"]["phase"] == "Running"
                && p["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        }).count();
        (items.len() == 6 && ready == 6).then_some(items)
    });
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut targets = Vec::new();
    for p in &pods {
        *per_node.entry(p["spec"]["nodeName"].as_str().unwrap().to_string()).or_default() += 1;
        let ip = p["status"]["podIP"].as_str().expect("podIP").to_string();
        let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
        targets.push((p["metadata"]["name"].as_str().unwrap().to_string(), ip, uid));
    }
    assert_eq!(per_node.len(), 3, "the 6 pods spread over the 3 nodes: {per_node:?}");
    assert!(per_node.values().all(|n| *n == 2), "2 pods per node: {per_node:?}");

    // Every pod reaches every other pod by IP, across nodes; each answers with its own name.
    for (from_name, _, from_uid) in &targets {
        let netns = PathBuf::from(format!("/run/netns/skp-{from_uid}"));
        for (to_name, to_ip, _) in &targets {
            let dst: SocketAddr = format!("{to_ip}:9000").parse().unwrap();
            let answer = in_netns(&netns, || ask(dst)).unwrap_or_else(|e| panic!("{from_name} -> {to_name} ({to_ip}): {e}\n{}", cluster.agent_logs()));
            assert!(answer.starts_with(to_name.as_str()) && answer.ends_with(to_ip.as_str()), "{from_name} -> {to_name}: answered {answer:?}");
        }
    }

    // The Service's ClusterIP, from a pod: the eBPF datapath balances over all 6 backends.
    let cluster_ip = k.ok(&["get", "svc", "echo", "-n", "e2e", "-o", "jsonpath={.spec.clusterIP}"]);
    let vip: SocketAddr = format!("{cluster_ip}:9000").parse().unwrap();
    let client_ns = PathBuf::from(format!("/run/netns/skp-{}", targets[0].2));
    let answered: BTreeSet<String> = eventually("every backend answers through the ClusterIP", Duration::from_secs(30), || {
        let seen: BTreeSet<String> = in_netns(&client_ns, || (0..60).filter_map(|_| ask(vip).ok()).collect());
        (seen.len() == 6).then_some(seen)
    });
    for (name, ip, _) in &targets {
        assert!(answered.contains(&format!("{name} {ip}")), "{name} answered through {vip}: {answered:?}");
    }

    // kubectl logs, logs -f, exec (exit code, stdin) through the apiserver to the pod's agent.
    let first = &targets[0].0;
    let logs = k.ok(&["logs", "-n", "e2e", first]);
    assert!(logs.contains("skiff-echo:") && logs.contains(first.as_str()), "kubectl logs shows the echo server's first line:\n{logs}");
    let follow = Command::new("timeout")
        .arg("5")
        .arg(&k.bin)
        .args(["--kubeconfig"])
        .arg(&k.kubeconfig)
        .args(["--cache-dir"])
        .arg(k.home.path().join("cache"))
        .args(["logs", "-f", "-n", "e2e", first])
        .env("HOME", k.home.path())
        .output()
        .expect("kubectl logs -f");
    assert_eq!(follow.status.code(), Some(124), "logs -f keeps streaming until stopped");
    assert!(String::from_utf8_lossy(&follow.stdout).contains("skiff-echo:"), "logs -f streams the log");
    let exec = k.run_with_stdin(&["exec", "-n", "e2e", first, "--", "sh", "-c", "echo out; echo err >&2; exit 3"], None);
    assert_eq!(exec.status.code(), Some(3), "kubectl exec returns the command's exit code");
    assert_eq!(String::from_utf8_lossy(&exec.stdout).trim(), "out");
    assert!(String::from_utf8_lossy(&exec.stderr).contains("err"));
    let stdin = k.run_with_stdin(&["exec", "-i", "-n", "e2e", first, "--", "wc", "-l"], Some("a\nb\nc\n"));
    assert_eq!(String::from_utf8_lossy(&stdin.stdout).trim(), "3", "kubectl exec -i passes stdin");
    // exec -it: kubectl needs a terminal of its own, which script(1) gives it.
    let kcmd = format!(
        "{} --kubeconfig {} --cache-dir {} exec -it -n e2e {first} -- sh -c 'tty; exit 4'",
        k.bin.display(),
        k.kubeconfig.display(),
        k.home.path().join("cache").display()
    );
    let tty = Command::new("script").args(["-qec", &kcmd, "/dev/null"]).env("HOME", k.home.path()).output().expect("script(1)");
    let tty_out = String::from_utf8_lossy(&tty.stdout);
    assert!(tty_out.contains("/dev/pts/"), "exec -it gives the process a terminal:\n{tty_out}");
    assert_eq!(tty.status.code(), Some(4), "exec -it returns the exit code:\n{tty_out}");
    let hostname = k.ok(&["exec", "-n", "e2e", first, "--", "hostname"]);
    assert_eq!(hostname.trim(), first.as_str(), "the container's hostname is the pod name");

    // The API from a pod, through the `kubernetes` Service (10.96.0.1:443 -> the server).
    let api: SocketAddr = "10.96.0.1:443".parse().unwrap();
    in_netns(&client_ns, || std::net::TcpStream::connect_timeout(&api, Duration::from_secs(3)))
        .unwrap_or_else(|e| panic!("a pod reaches the apiserver through kubernetes.default: {e}"));

    // No iptables or nft rule of ours for Services.
    let nft = Command::new("sh").args(["-c", "iptables-save 2>/dev/null; nft list ruleset 2>/dev/null"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    assert!(!nft.contains(&cluster_ip), "no firewall rule mentions the ClusterIP {cluster_ip}");

    // The README's demo on the same cluster: examples/demo.yaml, then `skiff demo`.
    k.ok(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/demo.yaml")]);
    eventually("the demo's 3 pods Running", Duration::from_secs(60), || {
        let pods = k.json(&["get", "pods", "-n", "demo", "-o", "json"]);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        (items.len() == 3 && items.iter().all(|p| p["status"]["phase"] == "Running")).then_some(())
    });
    let demo = Command::new(env!("CARGO_BIN_EXE_skiff")).args(["demo", "--requests", "30", "--data-dir"]).arg(cluster.dir.path()).output().expect("run skiff demo");
    let demo_out = String::from_utf8_lossy(&demo.stdout);
    assert!(demo.status.success(), "skiff demo failed:\n{demo_out}\n{}", String::from_utf8_lossy(&demo.stderr));
    assert_eq!(demo_out.lines().filter(|l| l.contains("answered by")).count(), 3, "all three demo pods answered:\n{demo_out}");
    assert!(demo_out.contains("service_hit +30"), "the datapath counted 30 service hits:\n{demo_out}");

    let text = cluster.down();
    assert!(text.contains("skiff is down"), "{text}");
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    for (_, _, uid) in &targets {
        assert!(!netns.contains(uid.as_str()), "pod netns of {uid} removed:\n{netns}");
    }
    assert!(!netns.contains("skt-node"), "node namespaces removed:\n{netns}");
    assert!(!Path::new("/sys/fs/bpf/skiff/skt-node-1").exists(), "pins removed");
    assert!(!Path::new("/sys/class/net/skt-br").exists(), "bridge removed");
}
