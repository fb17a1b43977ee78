//! NodePort with direct server return (`LbMode::Dsr`) to a backend on another node, with real
//! packets between namespaces on one L2 segment:
//!
//! ```text
//!  client <p>-wire ns: br0                       entry node A (<pa>-node, no pods)
//!  eth0 10.244.250.2 --+-- br0 --+-- up0 10.244.250.1 [XDP nodeport + tc from_pod], 10.244.1.0/24 via .3
//!                                +-- up0 10.244.250.3 [XDP nodeport + tc from_pod]
//!                                    backend node B (<pb>-node): h0 [tc from_pod] -- pod 10.244.1.10
//! ```
//!
//! The client reaches A's node port. In SNAT mode (checked first, as the control) B's pod sees
//! A's address and its replies go back through A, which reverses the NAT. In DSR mode A's XDP
//! program DNATs to the pod, keeps the client's address and adds the DSR option; B's tc on the
//! uplink records the service address, the pod sees the client's own address, and the pod's
//! replies leave B with the node port's address as source straight to the client: A reverses
//! nothing and holds no reply entry. The client has no route to the pod range, so an answer
//! it accepts can only be one sourced from A's node port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use skiff_datapath::lab::{
    Lab, Server, UPLINK_CLIENT, UPLINK_NODE, in_netns, ip, plug_into_wire, require_privileges,
    tcp_ask, tcp_ask_peer, udp_ask, udp_ask_peer,
};
use skiff_datapath::{BackendSpec, CtDirection, Datapath, LbMode, Proto, ServiceSpec};

const NODE_PORT: u16 = 30090;
const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 244, 250, 3);

fn nodeport(backend: Ipv4Addr, proto: Proto) -> ServiceSpec {
    ServiceSpec {
        vip: IpAddr::V4(UPLINK_NODE),
        port: NODE_PORT,
        proto,
        backends: vec![BackendSpec { ip: IpAddr::V4(backend), port: 8080, ready: true, terminating: false }],
        affinity_timeout: None,
        external_traffic_local: false,
    }
}

fn counter(dp: &Datapath, name: &str) -> u64 {
    dp.counters().expect("counters")[name]
}

#[test]
fn nodeport_dsr_to_a_backend_on_another_node() {
    if !require_privileges("nodeport_dsr_to_a_backend_on_another_node") {
        return;
    }
    let mut lab_a = Lab::new("dsra", 0);
    let lab_b = Lab::new("dsrb", 1);
    let wire = lab_a.add_wire();
    let client = lab_a.extra_netns("client");
    plug_into_wire(&wire, &client, "eth0", UPLINK_CLIENT, "wc");
    plug_into_wire(&wire, &lab_a.node, "up0", UPLINK_NODE, "wa");
    plug_into_wire(&wire, &lab_b.node, "up0", NODE_B, "wb");
    // A reaches B's pods through B (as skiff's agents route other nodes' podCIDRs).
    ip(&["-n", &lab_a.node, "route", "add", "10.244.1.0/24", "via", &NODE_B.to_string()]);
    let pod = lab_b.pods[0].ip;
    let _server = Server::start(&lab_b.pods[0].netns, pod, 8080);

    // Both nodes as the agent sets them up: tc and XDP on the uplink, SNAT to the node's IP.
    let mut dp_a = lab_a.datapath();
    let mut dp_b = lab_b.datapath();
    lab_a.in_node(|| {
        dp_a.attach_tc("up0").expect("tc on A's uplink");
        dp_a.attach_xdp("up0").expect("xdp on A's uplink");
    });
    lab_b.in_node(|| {
        dp_b.attach_tc("up0").expect("tc on B's uplink");
        dp_b.attach_xdp("up0").expect("xdp on B's uplink");
    });
    dp_a.set_nodeport_snat(UPLINK_NODE).expect("snat A");
    dp_b.set_nodeport_snat(NODE_B).expect("snat B");
    for proto in [Proto::Tcp, Proto::Udp] {
        dp_a.upsert_nodeport(&nodeport(pod, proto)).expect("nodeport on A");
    }
    let front = SocketAddr::from((UPLINK_NODE, NODE_PORT));
    assert_eq!(dp_a.lb_mode().expect("mode"), LbMode::Snat, "SNAT is the default");

    // Control: SNAT mode. The pod sees A, and A reverses the replies.
    let revnat_a = counter(&dp_a, "reverse_nat");
    let (tcp_peer, udp_peer) = in_netns(&client, || (tcp_ask_peer(front), udp_ask_peer(front)));
    let (tcp_peer, udp_peer) = match (tcp_peer, udp_peer) {
        (Ok(t), Ok(u)) => (t, u),
        (t, u) => panic!(
            "SNAT mode: tcp {t:?}, udp {u:?}; A {:?} {:?}; B {:?} {:?}",
            dp_a.counters(),
            dp_a.dump_conntrack(),
            dp_b.counters(),
            dp_b.dump_conntrack()
        ),
    };
    assert_eq!(tcp_peer, UPLINK_NODE.to_string(), "SNAT: the pod sees the entry node");
    assert_eq!(udp_peer, (UPLINK_NODE.to_string(), front));
    assert!(counter(&dp_a, "reverse_nat") > revnat_a, "SNAT: replies come back through A");

    // DSR.
    dp_a.set_lb_mode(LbMode::Dsr).expect("dsr on A");
    dp_b.set_lb_mode(LbMode::Dsr).expect("dsr on B");
    assert_eq!(dp_a.lb_mode().expect("mode"), LbMode::Dsr);
    let revnat_a = counter(&dp_a, "reverse_nat");
    let revnat_b = counter(&dp_b, "reverse_nat");
    let forward_a = counter(&dp_a, "dsr_forward");
    let accept_b = counter(&dp_b, "dsr_accept");
    let (tcp, tcp_peers, udp, udp_peers) = in_netns(&client, || {
        (
            (0..5).map(|_| tcp_ask(front)).collect::<Vec<_>>(),
            (0..3).map(|_| tcp_ask_peer(front)).collect::<Vec<_>>(),
            (0..5).map(|_| udp_ask(front)).collect::<Vec<_>>(),
            (0..3).map(|_| udp_ask_peer(front)).collect::<Vec<_>>(),
        )
    });
    for (i, r) in tcp.into_iter().enumerate() {
        let (who, peer) = r.unwrap_or_else(|e| panic!("DSR TCP request {i}: {e}"));
        assert_eq!((who, peer), (pod.to_string(), front), "TCP answered by the pod, from the node port");
    }
    for r in tcp_peers {
        assert_eq!(r.expect("DSR TCP peer"), UPLINK_CLIENT.to_string(), "the pod sees the client's own address");
    }
    for (i, r) in udp.into_iter().enumerate() {
        let (who, from) = r.unwrap_or_else(|e| panic!("DSR UDP request {i}: {e}"));
        assert_eq!((who, from), (pod.to_string(), front), "UDP answered by the pod, from the node port");
    }
    for r in udp_peers {
        assert_eq!(r.expect("DSR UDP peer"), (UPLINK_CLIENT.to_string(), front));
    }

    // A sent every flow's first packets with the option and saw none of the replies: it
    // reversed nothing and holds no reply entry towards the client; B did the reverse NAT.
    assert_eq!(counter(&dp_a, "reverse_nat"), revnat_a, "A reversed no DSR reply");
    // 8 TCP SYNs (retransmits add more) and 8 UDP datagrams carried the option.
    assert!(counter(&dp_a, "dsr_forward") >= forward_a + 16, "{:?}", dp_a.counters());
    assert!(counter(&dp_b, "dsr_accept") >= accept_b + 16, "{:?}", dp_b.counters());
    assert!(counter(&dp_b, "reverse_nat") > revnat_b, "B sourced the replies from the node port");
    assert_eq!(counter(&dp_a, "dsr_no_room"), 0);
    let ct_a = dp_a.dump_conntrack().expect("A's conntrack");
    let dsr_flows = ct_a.iter().filter(|e| e.direction == CtDirection::Forward && e.dsr).count();
    assert!(dsr_flows >= 16, "A keeps a DSR forward entry per flow: {ct_a:?}");
    assert!(
        !ct_a.iter().any(|e| e.direction == CtDirection::Reply && e.dst == IpAddr::V4(UPLINK_CLIENT)),
        "A has no reply entry towards the client in DSR mode: {ct_a:?}"
    );
    let ct_b = dp_b.dump_conntrack().expect("B's conntrack");
    assert!(
        ct_b.iter().any(|e| e.direction == CtDirection::Reply
            && e.dsr
            && e.src == IpAddr::V4(pod)
            && e.dst == IpAddr::V4(UPLINK_CLIENT)
            && e.vip == IpAddr::V4(UPLINK_NODE)
            && e.vip_port == NODE_PORT),
        "B's DSR reply entry names the node port: {ct_b:?}"
    );

    // Back to SNAT: new flows are SNATed again (the mode is per new flow).
    dp_a.set_lb_mode(LbMode::Snat).expect("snat again");
    let peer = in_netns(&client, || tcp_ask_peer(front).expect("tcp after switching back"));
    assert_eq!(peer, UPLINK_NODE.to_string());
}
