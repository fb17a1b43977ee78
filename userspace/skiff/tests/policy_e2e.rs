//! NetworkPolicy on a `skiff up --nodes 2` cluster, enforced by the agents' eBPF datapath
//! (skiff-proxy's policy sync -> POLICY trie + isolation flags, checked in the tc programs):
//! a server pod on node 1 and clients in two namespaces on both nodes. A default-deny ingress
//! policy blocks every client (same node and across nodes); allow rules by podSelector,
//! namespaceSelector, ipBlock and a (named) port let exactly the selected clients in;
//! `skiff datapath policy` shows the isolation; deleting the policies restores access. The
//! agent's metrics endpoint answers with the datapath counters.
//!
//! Traffic is sent from inside the pods' own network namespaces, to pod addresses of the lab.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;

fn pods_yaml(node1: &str, node2: &str) -> String {
    let pod = |ns: &str, name: &str, app: &str, node: &str| {
        format!(
            r#"
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  containers:
  - name: echo
    image: skiff/echo:1.0
    ports: [{{name: http, containerPort: 8080}}, {{name: tcp, containerPort: 9000}}]
"#
        )
    };
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: pa, labels: {team: a}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: pb, labels: {team: b}}\n",
    );
    y += &pod("pa", "server", "server", node1);
    y += &pod("pa", "client", "client", node2);
    y += &pod("pa", "other", "other", node1);
    y += &pod("pb", "client", "client", node2);
    y
}

const DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: pa}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
"#;

fn allow(from_and_ports: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow, namespace: pa}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - {from_and_ports}\n"
    )
}

struct P {
    name: String,
    ip: String,
    netns: PathBuf,
}

/// Whether a TCP connection from `from` to `dst` is accepted (and the echo answers, for 9000).
fn reaches(from: &P, dst: SocketAddr) -> bool {
    in_netns(&from.netns, || {
        if dst.port() == 9000 {
            ask(dst).is_ok()
        } else {
            TcpStream::connect_timeout(&dst, Duration::from_secs(2)).is_ok()
        }
    })
}

fn http_get(dst: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn network_policy_is_enforced_on_two_nodes() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0) || !require("runc", have("runc")) || !require("iproute2", have("ip")) {
        return;
    }
    ensure_sibling_binaries();
    let image = echo_image();
    let mut cluster = Cluster::up(2, &image);
    let k = Kubectl::new(kubectl, &cluster.kubeconfig);
    let lab = cluster.lab();
    assert_eq!(lab.nodes.len(), 2);
    let (n1, n2) = (lab.nodes[0].clone(), lab.nodes[1].clone());

    k.run_with_stdin(&["apply", "-f", "-"], Some(&pods_yaml(&n1.name, &n2.name)));
    let pods = eventually("4 pods Running with IPs", Duration::from_secs(120), || {
        let mut out = Vec::new();
        for ns in ["pa", "pb"] {
            let list = k.json(&["get", "pods", "-n", ns]);
            for p in list["items"].as_array().cloned().unwrap_or_default() {
                if p["status"]["phase"] != "Running" || p["status"]["podIP"].as_str().is_none() {
                    return None;
                }
                out.push(P {
                    name: format!("{ns}/{}", p["metadata"]["name"].as_str().unwrap()),
                    ip: p["status"]["podIP"].as_str().unwrap().to_string(),
                    netns: PathBuf::from(format!("/run/netns/skp-{}", p["metadata"]["uid"].as_str().unwrap())),
                });
            }
        }
        (out.len() == 4).then_some(out)
    });
    let by = |n: &str| pods.iter().find(|p| p.name == n).unwrap_or_else(|| panic!("pod {n}"));
    let (server, client, other, bclient) = (by("pa/server"), by("pa/client"), by("pa/other"), by("pb/client"));
    let dst: SocketAddr = format!("{}:9000", server.ip).parse().unwrap();
    let http: SocketAddr = format!("{}:8080", server.ip).parse().unwrap();
    let clients = [client, other, bclient];

    // Expect exactly `allowed` of the clients to reach `to`, the others to be dropped.
    let expect = |step: &str, to: SocketAddr, allowed: &[&P]| {
        eventually(step, Duration::from_secs(40), || {
            let got: Vec<bool> = clients.iter().map(|c| reaches(c, to)).collect();
            let want: Vec<bool> = clients.iter().map(|c| allowed.iter().any(|a| a.name == c.name)).collect();
            if got == want {
                Some(())
            } else {
                eprintln!("{step}: reaches {to} = {:?}, want {:?}", got, want);
                None
            }
        })
    };

    expect("without policy every client reaches the server", dst, &clients);

    k.run_with_stdin(&["apply", "-f", "-"], Some(DENY));
    expect("default deny ingress: nobody reaches the server", dst, &[]);
    let policy_text = {
        let out = Command::new(env!("CARGO_BIN_EXE_skiff")).args(["datapath", "--pin-dir", &n1.pin_dir, "policy"]).output().expect("skiff datapath policy");
        assert!(out.status.success(), "skiff datapath policy: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let server_line = policy_text.lines().find(|l| l.starts_with(&format!("{} ", server.ip))).unwrap_or_else(|| panic!("server pod listed:\n{policy_text}"));
    assert!(server_line.contains("isolated"), "server isolated for ingress:\n{policy_text}");
    assert!(policy_text.contains("(no policy entries)"), "default deny has no allow entry:\n{policy_text}");

    // podSelector: the clients of namespace pa only (the one on the other node), port 9000.
    k.run_with_stdin(&["apply", "-f", "-"], Some(&allow("from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 9000}]")));
    expect("podSelector app=client lets pa/client in (across nodes), not pa/other nor pb/client", dst, &[client]);

    // namespaceSelector: every pod of namespace pb.
    k.run_with_stdin(&["apply", "-f", "-"], Some(&allow("from: [{namespaceSelector: {matchLabels: {team: b}}}]")));
    expect("namespaceSelector team=b lets pb/client in only", dst, &[bclient]);

    // ipBlock: pa/other's address (same node as the server), with an except carving out nothing of it.
    let block = format!("from: [{{ipBlock: {{cidr: {}/32}}}}]", other.ip);
    k.run_with_stdin(&["apply", "-f", "-"], Some(&allow(&block)));
    expect("ipBlock lets pa/other in only", dst, &[other]);
    let except = format!("from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [{}/32]}}}}]", other.ip);
    k.run_with_stdin(&["apply", "-f", "-"], Some(&allow(&except)));
    expect("ipBlock 10/8 except pa/other lets the two others in", dst, &[client, bclient]);

    // A port rule (named port of the server): everyone on http (8080), nobody on 9000.
    k.run_with_stdin(&["apply", "-f", "-"], Some(&allow("ports: [{port: http}]")));
    expect("port rule: http open to all", http, &clients);
    expect("port rule: 9000 still closed", dst, &[]);

    // Deleting the policies restores access.
    k.ok(&["delete", "networkpolicy", "-n", "pa", "deny", "allow"]);
    expect("no policy: every client reaches the server again", dst, &clients);
    let policy_text = String::from_utf8_lossy(&Command::new(env!("CARGO_BIN_EXE_skiff")).args(["datapath", "--pin-dir", &n1.pin_dir, "policy"]).output().unwrap().stdout).into_owned();
    assert!(policy_text.contains("(no policy entries)") && !policy_text.contains("isolated"), "nothing left:\n{policy_text}");

    // The agents' metrics endpoint, scraped from the node's namespace.
    for n in [&n1, &n2] {
        let url: SocketAddr = format!("{}:10249", n.ip).parse().unwrap();
        let text = in_netns(&PathBuf::from(format!("/run/netns/{}", n.netns)), || http_get(url, "/metrics")).unwrap_or_else(|e| panic!("metrics of {}: {e}", n.name));
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("skiff_datapath_events_total{")), "datapath counters on {}:\n{text}", n.name);
        if n.name == n1.name {
            let denied = text.lines().find(|l| l.starts_with("skiff_datapath_events_total{event=\"policy_denied\"} ")).unwrap_or_else(|| panic!("policy_denied counter:\n{text}"));
            assert!(!denied.ends_with(" 0"), "node 1 counted the policy drops: {denied}");
        }
        let pods_line = text.lines().find(|l| l.starts_with("skiff_agent_pods ")).unwrap_or_else(|| panic!("agent gauge:\n{text}"));
        assert_eq!(pods_line, "skiff_agent_pods 2", "2 pods on {}", n.name);
    }

    let text = cluster.down();
    assert!(text.contains("skiff is down"), "{text}");
}
