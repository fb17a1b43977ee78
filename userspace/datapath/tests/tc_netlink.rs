//! The tc fallback for kernels without TCX (Debian 12's 6.1), forced on this kernel: `from_pod`
//! as skiff's netlink cls_bpf filter (fixed priority/handle) on every pod veth, real packets
//! through it (pod to pod, a ClusterIP over TCP and UDP), the filters outliving the process that
//! made them, a reload replacing the program inside each filter without losing a request or an
//! open connection, skiff-cni's side (attach_pod from the pinned program, detach_pod), and
//! detach_tc removing exactly skiff's filter.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use skiff_datapath::lab::{Conn, Lab, Server, enter_netns, in_netns, require_privileges, tcp_ask, udp_ask};
use skiff_datapath::{
    BackendSpec, EndpointSpec, LoadOptions, NETLINK_HANDLE, NETLINK_PRIORITY, Proto, ServiceSpec, TcAttachMode,
    attach_pod, detach_pod,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

fn netlink() -> LoadOptions {
    LoadOptions { force_netlink_tc: true }
}

/// The ingress tc filters on `iface` in the lab's node namespace, one string per filter.
fn filters(lab: &Lab, iface: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.node, "tc", "filter", "show", "dev", iface, "ingress"])
        .output()
        .expect("tc filter show");
    assert!(out.status.success(), "tc filter show: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(" handle ")).map(str::to_string).collect()
}

/// The program id of skiff's filter on `iface`, checking it is the only filter there and is
/// skiff's (priority, handle, direct-action from_pod).
fn skiff_filter(lab: &Lab, iface: &str) -> u32 {
    let f = filters(lab, iface);
    assert_eq!(f.len(), 1, "exactly one filter on {iface}: {f:?}");
    let line = &f[0];
    assert!(line.contains(&format!("pref {NETLINK_PRIORITY} ")), "skiff's priority on {iface}: {line}");
    assert!(line.contains(&format!("handle {NETLINK_HANDLE:#x} ")), "skiff's handle on {iface}: {line}");
    assert!(line.contains("from_pod") && line.contains("direct-action"), "from_pod in direct-action mode: {line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "id").unwrap_or_else(|| panic!("a program id in {line}"));
    words[at + 1].parse().unwrap_or_else(|_| panic!("a numeric program id in {line}"))
}

fn tc_link_pins(lab: &Lab) -> Vec<String> {
    std::fs::read_dir(lab.pin_dir.join("links"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("tc-")).collect())
        .unwrap_or_default()
}

fn service(lab: &Lab, proto: Proto) -> ServiceSpec {
    ServiceSpec {
        vip: IpAddr::V4(VIP),
        port: 80,
        proto,
        backends: [1, 2]
            .iter()
            .map(|&i| BackendSpec { ip: IpAddr::V4(lab.pods[i].ip), port: 8080, ready: true, terminating: false })
            .collect(),
        affinity_timeout: None,
        external_traffic_local: false,
    }
}

#[test]
fn netlink_tc_carries_pod_and_service_traffic_and_reloads_in_place() {
    if !require_privileges("netlink_tc_carries_pod_and_service_traffic_and_reloads_in_place") {
        return;
    }
    let mut lab = Lab::new("nltc", 3);
    let mut dp = lab.datapath_with(&netlink());
    assert_eq!(dp.tc_mode(), TcAttachMode::Netlink);
    assert!(lab.pin_dir.join("tc-netlink").is_dir(), "the mode is recorded for skiff-cni");
    assert!(tc_link_pins(&lab).is_empty(), "netlink attachments pin no links: {:?}", tc_link_pins(&lab));
    let first_ids: Vec<u32> = lab.pods.iter().map(|p| skiff_filter(&lab, &p.host_if)).collect();
    assert_eq!(first_ids.iter().collect::<BTreeSet<_>>().len(), 1, "one program on every veth: {first_ids:?}");

    // Socket LB sits on a cgroup this process is not in: every Service packet is tc's.
    let cg = lab.cgroup();
    dp.attach_cgroup(&cg).expect("socket LB elsewhere");
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    dp.upsert_service(&service(&lab, Proto::Tcp)).expect("tcp service");
    dp.upsert_service(&service(&lab, Proto::Udp)).expect("udp service");
    let vip = SocketAddr::from((VIP, 80));
    let before = dp.counters().expect("counters");

    // Pod to pod, then the ClusterIP over TCP and UDP.
    let direct = SocketAddr::from((lab.pods[1].ip, 8080));
    let (who, _) = in_netns(&lab.pods[0].netns, || tcp_ask(direct)).expect("pod 0 -> pod 1");
    assert_eq!(who, lab.pods[1].ip.to_string());
    let tcp: Vec<(String, SocketAddr)> = in_netns(&lab.pods[0].netns, || (0..60).map(|_| tcp_ask(vip).expect("tcp via VIP")).collect());
    let udp: Vec<(String, SocketAddr)> = in_netns(&lab.pods[0].netns, || (0..60).map(|_| udp_ask(vip).expect("udp via VIP")).collect());
    for (name, answers) in [("tcp", &tcp), ("udp", &udp)] {
        assert!(answers.iter().all(|(_, from)| *from == vip), "{name}: the client sees the VIP");
        let backends: BTreeSet<&str> = answers.iter().map(|(who, _)| who.as_str()).collect();
        let want: BTreeSet<String> = [1, 2].iter().map(|&i| lab.pods[i].ip.to_string()).collect();
        assert_eq!(backends, want.iter().map(String::as_str).collect(), "{name}: both backends answered");
    }
    let after = dp.counters().expect("counters");
    assert!(after["dnat"] >= before["dnat"] + 120, "tc translated every Service request: {before:?} -> {after:?}");
    assert!(after["reverse_nat"] >= before["reverse_nat"] + 120, "and every reply: {after:?}");

    // The filters hold the program: dropping every handle of this process changes nothing.
    let mut conn = in_netns(&lab.pods[0].netns, || Conn::open(vip)).expect("a long-lived connection");
    let first = conn.ask().expect("first answer");
    drop(dp);
    assert_eq!(conn.ask().expect("the connection after the loader went"), first);
    in_netns(&lab.pods[0].netns, || tcp_ask(vip)).expect("new connections after the loader went");

    // Reloads (an agent restart) replace the program inside each filter while clients keep
    // asking: no request fails, the open connection survives, one filter per veth remains.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, ok, failed, netns) = (stop.clone(), ok.clone(), failed.clone(), lab.pods[0].netns.clone());
        std::thread::spawn(move || {
            enter_netns(&netns);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match tcp_ask(vip).and_then(|_| udp_ask(vip)) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let mut ids = first_ids.clone();
    for _ in 0..3 {
        let dp = lab.datapath_with(&netlink());
        let now: Vec<u32> = lab.pods.iter().map(|p| skiff_filter(&lab, &p.host_if)).collect();
        assert!(now.iter().zip(&ids).all(|(n, o)| n != o), "the program inside each filter was replaced: {ids:?} -> {now:?}");
        ids = now;
        drop(dp);
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    client.join().expect("client thread");
    assert!(ok.load(Ordering::Relaxed) >= 5, "the client kept asking ({} answers)", ok.load(Ordering::Relaxed));
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed across reloads");
    assert_eq!(conn.ask().expect("the connection across reloads"), first);
    assert!(tc_link_pins(&lab).is_empty());

    // skiff-cni's side: from the pinned program, in the mode the agent recorded.
    let mut dp = lab.datapath_with(&netlink());
    let p2 = lab.pods[2].clone_spec();
    lab.in_node(|| dp.detach_tc(&p2.0)).expect("detach_tc");
    assert!(filters(&lab, &p2.0).is_empty(), "detach_tc removed skiff's filter: {:?}", filters(&lab, &p2.0));
    in_netns(&lab.pods[0].netns, || tcp_ask(SocketAddr::from((p2.1, 8080)))).expect("plain routing still reaches pod 2 without tc");
    lab.in_node(|| attach_pod(&lab.pin_dir, &p2.0, p2.1, &p2.2)).expect("attach_pod");
    let pinned_id = skiff_filter(&lab, &p2.0);
    assert_eq!(pinned_id, skiff_filter(&lab, &lab.pods[0].host_if), "skiff-cni attached the agent's pinned program");
    lab.in_node(|| attach_pod(&lab.pin_dir, &p2.0, p2.1, &p2.2)).expect("attach_pod again replaces in place");
    assert_eq!(skiff_filter(&lab, &p2.0), pinned_id);
    let before = dp.counters().expect("counters")["packets"];
    let (who, _) = in_netns(&lab.pods[2].netns, || tcp_ask(SocketAddr::from((lab.pods[1].ip, 8080)))).expect("pod 2 -> pod 1 through the CNI-attached filter");
    assert_eq!(who, lab.pods[1].ip.to_string());
    assert!(dp.counters().expect("counters")["packets"] > before, "pod 2's packets went through from_pod");
    assert!(tc_link_pins(&lab).is_empty());
    lab.in_node(|| detach_pod(&lab.pin_dir, &p2.0, p2.1)).expect("detach_pod");
    assert!(filters(&lab, &p2.0).is_empty(), "detach_pod removed the filter");
    assert_eq!(skiff_datapath::pod::endpoint(&lab.pin_dir, p2.1).expect("endpoint"), None);
    lab.in_node(|| detach_pod(&lab.pin_dir, &p2.0, p2.1)).expect("a second detach_pod is a no-op");

    // Back to TCX on this kernel: the netlink filters go once the TCX links are in place.
    let tcx = lab.datapath_with(&LoadOptions { force_netlink_tc: false });
    assert_eq!(tcx.tc_mode(), TcAttachMode::Tcx);
    assert!(!lab.pin_dir.join("tc-netlink").exists(), "the recorded mode follows the agent");
    for p in &lab.pods {
        assert!(filters(&lab, &p.host_if).is_empty(), "no netlink filter left on {}: {:?}", p.host_if, filters(&lab, &p.host_if));
    }
    assert_eq!(tc_link_pins(&lab).len(), lab.pods.len(), "TCX links pinned instead");
    assert_eq!(conn.ask().expect("the connection across the switch to TCX"), first);
}

trait CloneSpec {
    fn clone_spec(&self) -> (String, Ipv4Addr, EndpointSpec);
}

impl CloneSpec for skiff_datapath::lab::Pod {
    fn clone_spec(&self) -> (String, Ipv4Addr, EndpointSpec) {
        (self.host_if.clone(), self.ip, EndpointSpec { host_ifindex: self.host_ifindex, pod_mac: self.pod_mac, host_mac: self.host_mac })
    }
}

#[test]
fn kernel_features_are_detected() {
    let f = skiff_datapath::KernelFeatures::detect();
    assert!(!f.release.is_empty());
    // These tests run on >= 6.6 kernels; the version rule is what a 6.1 guest falls back by.
    let major: u32 = f.release.split('.').next().and_then(|m| m.parse().ok()).expect("major version");
    let minor: u32 = f.release.split('.').nth(1).and_then(|m| m.parse().ok()).expect("minor version");
    assert_eq!(f.tcx, (major, minor) >= (6, 6), "{f:?}");
    assert_eq!(f.tc_mode(false), if f.tcx { TcAttachMode::Tcx } else { TcAttachMode::Netlink });
    assert_eq!(f.tc_mode(true), TcAttachMode::Netlink);
    let mut old = f.clone();
    old.tcx = false;
    assert_eq!(old.tc_mode(false), TcAttachMode::Netlink, "a 6.1 kernel falls back to netlink");
}
