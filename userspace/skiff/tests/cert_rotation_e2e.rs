//! Node client certificate rotation while the agent runs, as kubelet's: a `skiff up` node
//! whose server signs node certificates for 40 s only. The agent must replace its certificate
//! (a CSR with its current identity) at 70-90% of the lifetime, over and over, without
//! restarting, and keep working once its first certificate has expired: its Lease is renewed
//! and a pod created after that expiry runs (its status is written with the new certificate).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

/// (serial, notBefore, notAfter) of the node's current client certificate.
fn node_cert(data_dir: &str) -> Option<(String, i64, i64)> {
    let pem = std::fs::read_to_string(Path::new(data_dir).join("pki/node-client.crt")).ok()?;
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = p.parse_x509().ok()?;
    let v = cert.validity();
    Some((cert.raw_serial_as_string(), v.not_before.timestamp(), v.not_after.timestamp()))
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn the_agent_rotates_its_client_certificate_and_keeps_working() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0) || !require("runc", have("runc")) || !require("iproute2", have("ip")) {
        return;
    }
    ensure_sibling_binaries();
    let image = echo_image();
    let mut cluster = Cluster::up_with(1, &image, &["--server-arg=--node-client-cert-validity=40s", "--agent-arg=--heartbeat-interval=2s"]);
    let k = Kubectl::new(kubectl, &cluster.kubeconfig);
    let node = cluster.lab().nodes[0].clone();
    let pid = node.agent_pid.expect("skiff up recorded the agent's pid");

    let first = node_cert(&node.data_dir).expect("the joined node has a client certificate");
    assert!(first.2 - first.1 <= 60, "the server signed for 40 s (+ a few backdated): {first:?}");
    // Two rotations in a row: the first by the certificate the join made, the next by the
    // first rotated one (the loop goes on).
    let mut seen = vec![first.clone()];
    for n in 1..=2 {
        let last = seen.last().cloned().unwrap();
        let next = eventually(&format!("rotation {n} of the node's certificate"), Duration::from_secs(60), || {
            node_cert(&node.data_dir).filter(|c| c.0 != last.0)
        });
        let now = chrono::Utc::now().timestamp();
        assert!(now < last.2, "rotated before the old certificate expired: now {now}, old {last:?}, new {next:?}");
        assert!(next.2 > last.2, "the new certificate outlives the old: {last:?} -> {next:?}");
        seen.push(next);
    }
    assert!(alive(pid), "the agent (pid {pid}) kept running: it was not restarted to rotate");
    assert_eq!(cluster.lab().nodes[0].agent_pid, Some(pid));

    // Past the first certificate's end, the agent still reaches the API.
    while chrono::Utc::now().timestamp() < first.2 + 3 {
        std::thread::sleep(Duration::from_millis(500));
    }
    let since = chrono::Utc::now();
    let lease_renewed = eventually("the node's Lease renewed after its first certificate expired", Duration::from_secs(30), || {
        let lease = k.json(&["get", "lease", "-n", "kube-node-lease", &node.name]);
        let renew = lease["spec"]["renewTime"].as_str()?.parse::<chrono::DateTime<chrono::Utc>>().ok()?;
        (renew > since).then_some(renew)
    });
    assert!(lease_renewed.timestamp() > first.2);
    k.run_with_stdin(&["apply", "-f", "-"], Some(&echo_workload(1)));
    let started = Instant::now();
    eventually("the pod created after the expiry is Running and Ready", Duration::from_secs(90), || {
        let pods = k.json(&["get", "pods", "-n", "e2e"]);
        let ready = pods["items"].as_array()?.iter().any(|p| {
            p["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        });
        ready.then_some(())
    });
    eprintln!("pod Ready {:?} after apply", started.elapsed());
    // The rotations were CSRs of the node itself (not of the bootstrap token).
    let csrs = k.json(&["get", "csr"]);
    let by_node = csrs["items"]
        .as_array()
        .map(|l| l.iter().filter(|c| c["spec"]["username"] == format!("system:node:{}", node.name)).count())
        .unwrap_or(0);
    assert!(by_node >= 2, "at least two CSRs posted as the node: {csrs}");
    let log = std::fs::read_to_string(Path::new(&node.data_dir).join("agent.log")).unwrap_or_default();
    assert!(log.contains("rotated the node's client certificate"), "the agent logs its rotations:\n{}", cluster.agent_logs());
    assert!(alive(pid), "the agent is still the one that started");
    cluster.down();
}
