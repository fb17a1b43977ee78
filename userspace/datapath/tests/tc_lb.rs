//! Per-packet load balancing by the tc program on the pod veths, with clients that are NOT in
//! any cgroup carrying the socket-LB programs (so every Service packet is DNATed by tc).
mod lab;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use lab::{Lab, Server, in_netns, require_privileges, tcp_ask, udp_ask};
use skiff_datapath::{BackendSpec, CtDirection, Datapath, Proto, ServiceSpec};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn spec(lab: &Lab, backends: &[usize], port: u16, proto: Proto) -> ServiceSpec {
    ServiceSpec {
        vip: IpAddr::V4(VIP),
        port: 80,
        proto,
        backends: backends
            .iter()
            .map(|&i| BackendSpec { ip: IpAddr::V4(lab.pods[i].ip), port, ready: true, terminating: false })
            .collect(),
        affinity_timeout: None,
    }
}

fn tally(results: Vec<String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        *m.entry(r).or_insert(0) += 1;
    }
    m
}

#[test]
fn verifier_accepts_every_program() {
    if !require_privileges("verifier_accepts_every_program") {
        return;
    }
    let lab = Lab::new("load", 0);
    // Datapath::load loads every program, so the verifier has run on all of them.
    let dp = Datapath::load(&lab.pin_dir).expect("every program loads");
    for name in skiff_ebpf_common::map_names::ALL {
        assert!(lab.pin_dir.join(name).exists(), "map {name} pinned");
    }
    assert!(dp.counters().expect("counters").contains_key("packets"));
}

#[test]
fn clusterip_tcp_and_udp_via_tc() {
    if !require_privileges("clusterip_tcp_and_udp_via_tc") {
        return;
    }
    let lab = Lab::new("tc", 3);
    let mut dp = lab.datapath();
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    dp.upsert_service(&spec(&lab, &[1, 2], 8080, Proto::Tcp)).expect("tcp service");
    dp.upsert_service(&spec(&lab, &[1, 2], 8080, Proto::Udp)).expect("udp service");
    let vip = SocketAddr::from((VIP, 80));

    let tcp = in_netns(&lab.pods[0].netns, || {
        (0..100).map(|_| tcp_ask(vip).expect("tcp via VIP")).collect::<Vec<_>>()
    });
    for (_, peer) in &tcp {
        assert_eq!(*peer, vip, "the client sees the VIP, not the backend");
    }
    let counts = tally(tcp.into_iter().map(|(who, _)| who).collect());
    assert_eq!(counts.len(), 2, "both backends answered: {counts:?}");
    for b in [&lab.pods[1].ip, &lab.pods[2].ip] {
        assert!(counts.get(&b.to_string()).copied().unwrap_or(0) >= 10, "{b} got a fair share: {counts:?}");
    }

    let udp = in_netns(&lab.pods[0].netns, || {
        (0..100).map(|_| udp_ask(vip).expect("udp via VIP")).collect::<Vec<_>>()
    });
    for (_, from) in &udp {
        assert_eq!(*from, vip, "udp replies come back from the VIP (reverse NAT)");
    }
    let counts = tally(udp.into_iter().map(|(who, _)| who).collect());
    assert_eq!(counts.len(), 2, "both backends answered udp: {counts:?}");

    let ct = dp.dump_conntrack().expect("conntrack");
    let fwd = ct.iter().filter(|e| e.direction == CtDirection::Forward && e.vip == IpAddr::V4(VIP)).count();
    let rev = ct.iter().filter(|e| e.direction == CtDirection::Reply).count();
    assert!(fwd >= 100 && rev >= 100, "conntrack holds both directions: {fwd} forward, {rev} reply");
    let c = dp.counters().expect("counters");
    assert!(c["dnat"] >= 200 && c["reverse_nat"] >= 200, "counters: {c:?}");
    assert!(c["redirect_peer"] > 0, "same-node delivery used bpf_redirect_peer: {c:?}");
}
