//! The README's first command ends with `skiff demo`: a Service applied with kubectl, its
//! ClusterIP programmed into the eBPF datapath of a netns lab, traffic answered by every backend.

mod common;

use common::*;

#[test]
fn demo_sends_service_traffic_through_ebpf() {
    let Some(bin) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    let root = unsafe_geteuid() == 0;
    if !require("root (the demo builds network namespaces and loads eBPF)", root) {
        return;
    }
    let server = Server::start(&[]);
    let k = Kubectl::new(bin, &server.kubeconfig());
    k.ok(&["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/demo.yaml")]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["demo", "--requests", "30", "--kubeconfig"])
        .arg(server.kubeconfig())
        .output()
        .expect("run skiff demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "skiff demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let cluster_ip = k.ok(&["get", "svc", "echo", "-n", "demo", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(stdout.contains(&format!("to {cluster_ip}:80")), "the demo used the apiserver's ClusterIP {cluster_ip}:\n{stdout}");
    let backends = stdout.lines().filter(|l| l.contains("answered by backend")).count();
    assert_eq!(backends, 3, "all three backends answered:\n{stdout}");
}

fn unsafe_geteuid() -> u32 {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() }
}
