//! `skiff up --nodes 3 --network vxlan`: the nodes sit on two L2 segments joined by a router
//! namespace that knows no pod range between them, so only the VXLAN overlay can carry pod
//! traffic across. Checked: each node's skiff_vxlan device, routes, neighbours and FDB entries
//! (one per other node); pods get the overlay's MTU; every pod reaches every other by pod IP;
//! a ClusterIP from a pod reaches backends on the other nodes (reverse NAT of the replies that
//! arrive decapsulated on skiff_vxlan); the overlay devices' packet counters and the UDP 8472
//! count on the nodes' uplinks rose by the traffic; `skiff down` removes everything.
//!
//! Traffic is sent only from inside pod namespaces of the lab, to lab addresses.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: vx}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: vx}
spec:
  replicas: 6
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        image: skiff/echo:1.0
        ports: [{name: http, containerPort: 8080}, {name: tcp, containerPort: 9000}]
        readinessProbe:
          httpGet: {path: /healthz, port: http}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: vx}
spec:
  selector: {app: echo}
  ports:
  - {name: tcp, port: 9000, targetPort: tcp}
"#;

/// `ip -n <netns> <args>` output; panics with stderr when it fails.
fn ip_in(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").arg("-n").arg(netns).args(args).output().expect("run ip");
    assert!(out.status.success(), "ip -n {netns} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// skiff_vxlan's (rx, tx) packets in a node.
fn vxlan_counters(netns: &str) -> (u64, u64) {
    let j: serde_json::Value = serde_json::from_str(&ip_in(netns, &["-s", "-j", "link", "show", "skiff_vxlan"])).expect("ip -j parses");
    let s = &j[0]["stats64"];
    (s["rx"]["packets"].as_u64().expect("rx packets"), s["tx"]["packets"].as_u64().expect("tx packets"))
}

/// What a capture on a node's eth0 saw.
#[derive(Debug, Default, Clone, Copy)]
struct Capture {
    /// UDP/8472 frames whose inner IPv4 packet is between two pod addresses (10.244/16).
    vxlan_pod_frames: u64,
    /// Frames that carry a pod-to-pod IPv4 packet unencapsulated (native routing would).
    native_pod_frames: u64,
}

const POD_NET: [u8; 2] = [10, 244];

fn is_pod(a: &[u8]) -> bool {
    a[..2] == POD_NET
}

/// Counts, until `stop`, the frames of eth0 in `netns` (both directions) through an AF_PACKET
/// socket. The socket may drop frames under load, so the counts are lower bounds.
fn capture(netns: PathBuf, stop: std::sync::Arc<std::sync::atomic::AtomicBool>, ready: std::sync::mpsc::Sender<()>) -> Capture {
    in_netns(&netns, || {
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket calls on a descriptor this function owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto as u16;
            sll.sll_ifindex = libc::if_nametoindex(c"eth0".as_ptr()) as i32;
            assert!(sll.sll_ifindex > 0, "eth0 in {}", netns.display());
            assert_eq!(libc::bind(fd, &sll as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32), 0, "bind");
            let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32);
            let rcvbuf: i32 = 8 << 20;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf as *const _ as *const libc::c_void, 4);
            let _ = ready.send(());
            let mut c = Capture::default();
            let mut buf = vec![0u8; 65536];
            // Bounded: the caller stops it; 10 minutes at most regardless.
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && std::time::Instant::now() < deadline {
                let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                if n < 34 {
                    continue;
                }
                let f = &buf[..n as usize];
                if f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 {
                    continue;
                }
                let ihl = ((f[14] & 0x0f) as usize) * 4;
                let (src, dst) = (&f[26..30], &f[30..34]);
                if is_pod(src) && is_pod(dst) {
                    c.native_pod_frames += 1;
                }
                // Outer UDP to 8472, then 8 bytes of VXLAN, an inner Ethernet and IPv4 header.
                let udp = 14 + ihl;
                if f[23] == 17 && f.len() >= udp + 8 + 8 + 14 + 20 && f[udp + 2..udp + 4] == 8472u16.to_be_bytes() {
                    let inner = udp + 8 + 8 + 14;
                    if is_pod(&f[inner + 12..inner + 16]) && is_pod(&f[inner + 16..inner + 20]) {
                        c.vxlan_pod_frames += 1;
                    }
                }
            }
            libc::close(fd);
            c
        }
    })
}

#[test]
fn vxlan_overlay_carries_pods_and_services_across_segments() {
    let Some(kubectl) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    if !require("root (skiff up creates namespaces and loads eBPF)", geteuid() == 0) || !require("runc", have("runc")) || !require("iproute2", have("ip")) {
        return;
    }
    ensure_sibling_binaries();
    let image = echo_image();
    let mut cluster = Cluster::up_with(3, &image, &["--network", "vxlan"]);
    let k = Kubectl::new(kubectl, &cluster.kubeconfig);
    let lab = cluster.lab();
    assert_eq!(lab.nodes.len(), 3);

    // The lab: node 2 is on the other segment; nobody has a native route to another podCIDR.
    let nodes = k.json(&["get", "nodes", "-o", "json"]);
    let cidr_of: BTreeMap<String, String> = nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["metadata"]["name"].as_str().unwrap().to_string(), n["spec"]["podCIDR"].as_str().unwrap_or_default().to_string()))
        .collect();
    assert_eq!(cidr_of.len(), 3, "{cidr_of:?}");
    assert!(lab.nodes[1].ip.rsplit('.').next().unwrap().parse::<u8>().unwrap() >= 128, "node 2 on the second segment: {}", lab.nodes[1].ip);
    assert!(lab.nodes[0].ip.rsplit('.').next().unwrap().parse::<u8>().unwrap() < 128, "node 1 on the first segment: {}", lab.nodes[0].ip);

    // Each node's overlay: the device, and per other node a route, a neighbour and an FDB entry.
    for n in &lab.nodes {
        let link = ip_in(&n.netns, &["-d", "link", "show", "skiff_vxlan"]);
        assert!(link.contains("vxlan id 1 ") && link.contains("dstport 8472") && link.contains(&format!("local {}", n.ip)), "{}: {link}", n.name);
        assert!(link.contains("nolearning") && link.contains("mtu 1450") && link.contains("dev eth0"), "{}: {link}", n.name);
        let ipb: Vec<u8> = n.ip.split('.').map(|o| o.parse().unwrap()).collect();
        let own_mac = format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", ipb[0], ipb[1], ipb[2], ipb[3]);
        assert!(link.contains(&own_mac), "{}: MAC {own_mac} derived from the node IP: {link}", n.name);
        let own_cidr = &cidr_of[&n.name];
        let own_vtep = own_cidr.replace("/24", "/32");
        assert!(ip_in(&n.netns, &["addr", "show", "dev", "skiff_vxlan"]).contains(&format!("inet {own_vtep}")), "{}: vtep address {own_vtep}", n.name);
        let routes = ip_in(&n.netns, &["route", "show", "proto", "200"]);
        let neigh = ip_in(&n.netns, &["neigh", "show", "dev", "skiff_vxlan"]);
        let fdb = Command::new("bridge").args(["-n", &n.netns, "fdb", "show", "dev", "skiff_vxlan"]).output().expect("run bridge");
        let fdb = String::from_utf8_lossy(&fdb.stdout).into_owned();
        for other in lab.nodes.iter().filter(|o| o.name != n.name) {
            let cidr = &cidr_of[&other.name];
            let vtep = cidr.trim_end_matches("/24");
            assert!(routes.lines().any(|l| l.starts_with(&format!("{cidr} via {vtep} dev skiff_vxlan")) && l.contains("onlink")), "{}: route to {cidr} over the overlay:\n{routes}", n.name);
            let ob: Vec<u8> = other.ip.split('.').map(|o| o.parse().unwrap()).collect();
            let mac = format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", ob[0], ob[1], ob[2], ob[3]);
            assert!(neigh.lines().any(|l| l.starts_with(&format!("{vtep} lladdr {mac}")) && l.contains("PERMANENT")), "{}: neighbour {vtep} {mac}:\n{neigh}", n.name);
            assert!(fdb.lines().any(|l| l.starts_with(&mac) && l.contains(&format!("dst {}", other.ip))), "{}: fdb {mac} dst {}:\n{fdb}", n.name, other.ip);
        }
        assert_eq!(routes.lines().count(), 2, "{}: exactly two skiff routes:\n{routes}", n.name);
        assert_eq!(neigh.lines().count(), 2, "{}: exactly two overlay neighbours:\n{neigh}", n.name);
        let conflist = std::fs::read_to_string(Path::new(&n.data_dir).join("cni-conf/10-skiff.conflist")).expect("conflist");
        assert!(conflist.contains("\"mtu\": 1450"), "{}: pods get the overlay MTU:\n{conflist}", n.name);
    }

    k.run_with_stdin(&["apply", "-f", "-"], Some(WORKLOAD));
    let pods = eventually("6 pods Running and Ready", Duration::from_secs(120), || {
        let pods = k.json(&["get", "pods", "-n", "vx", "-o", "json"]);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        let ready = items
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["conditions"].as_array().is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")))
            .count();
        (items.len() == 6 && ready == 6).then_some(items)
    });
    let mut targets = Vec::new();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for p in &pods {
        let node = p["spec"]["nodeName"].as_str().unwrap().to_string();
        *per_node.entry(node.clone()).or_default() += 1;
        targets.push((p["metadata"]["name"].as_str().unwrap().to_string(), p["status"]["podIP"].as_str().unwrap().to_string(), p["metadata"]["uid"].as_str().unwrap().to_string(), node));
    }
    assert_eq!(per_node.len(), 3, "pods on every node: {per_node:?}");
    let mtu = ip_in(&format!("skp-{}", targets[0].2), &["link", "show", "eth0"]);
    assert!(mtu.contains("mtu 1450"), "a pod's eth0 has the overlay MTU: {mtu}");

    let before: Vec<(u64, u64)> = lab.nodes.iter().map(|n| vxlan_counters(&n.netns)).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let captures: Vec<_> = lab
        .nodes
        .iter()
        .map(|n| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (ns, stop) = (PathBuf::from(format!("/run/netns/{}", n.netns)), stop.clone());
            let h = std::thread::spawn(move || capture(ns, stop, tx));
            rx.recv_timeout(Duration::from_secs(10)).expect("capture started");
            h
        })
        .collect();

    // Every pod reaches every other by pod IP, across nodes and segments.
    let mut crossings = 0u64;
    for (from, _, from_uid, from_node) in &targets {
        let netns = PathBuf::from(format!("/run/netns/skp-{from_uid}"));
        for (to, to_ip, _, to_node) in &targets {
            let dst: SocketAddr = format!("{to_ip}:9000").parse().unwrap();
            let answer = in_netns(&netns, || ask(dst)).unwrap_or_else(|e| panic!("{from} ({from_node}) -> {to} ({to_node}, {to_ip}): {e}\n{}", cluster.agent_logs()));
            assert!(answer.starts_with(to.as_str()) && answer.ends_with(to_ip.as_str()), "{from} -> {to}: answered {answer:?}");
            if from_node != to_node {
                crossings += 1;
            }
        }
    }
    assert_eq!(crossings, 24, "6 pods x 4 pods on other nodes");

    // The ClusterIP from a pod on node 1: every backend answers, 4 of them on other nodes.
    let cluster_ip = k.ok(&["get", "svc", "echo", "-n", "vx", "-o", "jsonpath={.spec.clusterIP}"]);
    let vip: SocketAddr = format!("{cluster_ip}:9000").parse().unwrap();
    let client = targets.iter().find(|t| t.3 == lab.nodes[0].name).expect("a pod on node 1");
    let client_ns = PathBuf::from(format!("/run/netns/skp-{}", client.2));
    let answered: BTreeSet<String> = eventually("every backend answers through the ClusterIP", Duration::from_secs(30), || {
        let seen: BTreeSet<String> = in_netns(&client_ns, || (0..60).filter_map(|_| ask(vip).ok()).collect());
        (seen.len() == 6).then_some(seen)
    });
    for (name, ip, _, _) in &targets {
        assert!(answered.contains(&format!("{name} {ip}")), "{name} answered through {vip}: {answered:?}");
    }

    // The API from a pod on the second segment, through kubernetes.default (via the router).
    let far = targets.iter().find(|t| t.3 == lab.nodes[1].name).expect("a pod on node 2");
    let far_ns = PathBuf::from(format!("/run/netns/skp-{}", far.2));
    let api: SocketAddr = "10.96.0.1:443".parse().unwrap();
    in_netns(&far_ns, || std::net::TcpStream::connect_timeout(&api, Duration::from_secs(3)))
        .unwrap_or_else(|e| panic!("a pod on the second segment reaches the apiserver: {e}"));

    // The traffic crossed as VXLAN: each node's device sent and received at least one packet per
    // connection it took part in (a TCP exchange is several); its eth0 carried pod packets inside
    // UDP/8472 and never a bare pod-to-pod packet.
    let after: Vec<(u64, u64)> = lab.nodes.iter().map(|n| vxlan_counters(&n.netns)).collect();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen: Vec<Capture> = captures.into_iter().map(|h| h.join().expect("capture thread")).collect();
    for (i, n) in lab.nodes.iter().enumerate() {
        let (rx, tx) = (after[i].0 - before[i].0, after[i].1 - before[i].1);
        // 2 pods x 4 remote peers, both directions: 16 connections touch each node.
        assert!(rx >= 16 && tx >= 16, "{}: skiff_vxlan rx +{rx} tx +{tx}", n.name);
        assert!(seen[i].vxlan_pod_frames >= 32, "{}: pod packets in UDP/8472 on eth0: {:?}", n.name, seen[i]);
        assert_eq!(seen[i].native_pod_frames, 0, "{}: no bare pod-to-pod packet on eth0: {:?}", n.name, seen[i]);
    }

    let text = cluster.down();
    assert!(text.contains("skiff is down"), "{text}");
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains("skt-node") && !netns.contains("skt-rt"), "node and router namespaces removed:\n{netns}");
    for (_, _, uid, _) in &targets {
        assert!(!netns.contains(uid.as_str()), "pod netns {uid} removed");
    }
    for l in ["skt-br", "skt-br2", "skt-ra", "skt-rb"] {
        assert!(!Path::new(&format!("/sys/class/net/{l}")).exists(), "{l} removed");
    }
    let routes = Command::new("ip").args(["route", "show"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("172.20.77.128/25"), "root route to the second segment removed");
}
