//! NodePort through the XDP program on the node's uplink: a client in an "external" namespace
//! reaches node_ip:node_port, Maglev picks the backend, the packet is DNATed + SNATed, and the
//! reply is reverse-translated by tc on the backend's veth and sent back out of the uplink.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use skiff_datapath::lab::{
    self, Lab, Server, UPLINK_CLIENT, UPLINK_NODE, in_netns, require_privileges, tcp_ask, udp_ask,
};
use skiff_datapath::{BackendSpec, CtDirection, Proto, ServiceSpec, nodeport::maglev_table};
use skiff_ebpf_common::{MAGLEV_M, flow_hash, ip4_to_raw, port_to_raw};

const NODE_PORT: u16 = 30080;
const SNAT: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 2);

fn spec(lab: &Lab, backends: &[usize], proto: Proto) -> ServiceSpec {
    ServiceSpec {
        vip: IpAddr::V4(UPLINK_NODE),
        port: NODE_PORT,
        proto,
        backends: backends
            .iter()
            .map(|&i| BackendSpec {
                ip: IpAddr::V4(lab.pods[i].ip),
                port: 8080,
                ready: true,
                terminating: false,
            })
            .collect(),
        affinity_timeout: None,
        external_traffic_local: false,
    }
}

#[test]
fn nodeport_tcp_and_udp_via_xdp_with_maglev() {
    if !require_privileges("nodeport_tcp_and_udp_via_xdp_with_maglev") {
        return;
    }
    let mut lab = Lab::new("np", 3);
    let ext = lab.add_uplink();
    let mut dp = lab.datapath();
    lab.in_node(|| dp.attach_xdp("up0")).expect("attach xdp");
    dp.set_nodeport_snat(SNAT).expect("snat");
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    dp.upsert_nodeport(&spec(&lab, &[1, 2], Proto::Tcp))
        .expect("tcp nodeport");
    dp.upsert_nodeport(&spec(&lab, &[1, 2], Proto::Udp))
        .expect("udp nodeport");
    let front = SocketAddr::from((UPLINK_NODE, NODE_PORT));

    let tcp = in_netns(&ext, || {
        (0..60)
            .map(|_| tcp_ask(front).expect("tcp nodeport"))
            .collect::<Vec<_>>()
    });
    let mut counts = BTreeMap::new();
    for (who, peer) in tcp {
        assert_eq!(peer, front);
        *counts.entry(who).or_insert(0) += 1;
    }
    assert_eq!(
        counts.len(),
        2,
        "both backends answered through the node port: {counts:?}"
    );

    let udp = in_netns(&ext, || {
        (0..40)
            .map(|_| udp_ask(front).expect("udp nodeport"))
            .collect::<Vec<_>>()
    });
    for (_, from) in &udp {
        assert_eq!(*from, front, "replies come from node_ip:node_port");
    }

    // Maglev: the backend of a flow is table[flow_hash(5-tuple) % M], which the test computes
    // independently from the same table builder and hash.
    let backends = dp.dump_backends().expect("backends");
    let udp_ids: Vec<(u32, String)> = backends
        .iter()
        .filter(|b| b.proto == Proto::Udp)
        .map(|b| (b.id, format!("{}:{}", b.ip, b.port)))
        .collect();
    let table = maglev_table(&udp_ids, MAGLEV_M);
    let predicted_and_seen = in_netns(&ext, || {
        (0..20u16)
            .map(|i| {
                let port = 41000 + i;
                let u = UdpSocket::bind((UPLINK_CLIENT, port)).expect("bind");
                u.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                u.send_to(b"who", front).expect("send");
                let mut buf = [0u8; 64];
                let (n, _) = u.recv_from(&mut buf).expect("recv");
                let h = flow_hash(
                    ip4_to_raw(UPLINK_CLIENT.octets()),
                    ip4_to_raw(UPLINK_NODE.octets()),
                    port_to_raw(port),
                    port_to_raw(NODE_PORT),
                    17,
                );
                (
                    table[h as usize % MAGLEV_M],
                    String::from_utf8_lossy(&buf[..n]).to_string(),
                )
            })
            .collect::<Vec<_>>()
    });
    let mut seen_backends = BTreeMap::new();
    for (id, who) in predicted_and_seen {
        let expected = backends
            .iter()
            .find(|b| b.id == id)
            .map(|b| b.ip.to_string())
            .expect("id in table");
        assert_eq!(who, expected, "flow landed on its Maglev backend");
        *seen_backends.entry(who).or_insert(0) += 1;
    }
    assert_eq!(
        seen_backends.len(),
        2,
        "20 flows spread over both backends: {seen_backends:?}"
    );

    let ct = dp.dump_conntrack().expect("ct");
    assert!(
        ct.iter()
            .any(|e| e.direction == CtDirection::Reply && e.dst == IpAddr::V4(SNAT)),
        "SNAT reply entries"
    );
    let c = dp.counters().expect("counters");
    assert!(c["nodeport_dnat"] >= 120, "{c:?}");
    assert!(
        c["redirect_neigh"] > 0,
        "replies left through the uplink by fib lookup: {c:?}"
    );

    // Agent restart: an open NodePort connection survives the drop and the reload, and the
    // re-attach swaps the program inside the pinned XDP link instead of adding a second one.
    let ext2 = ext.clone();
    std::thread::scope(|scope| {
        let (to_client, from_test) = std::sync::mpsc::channel::<&str>();
        let (to_test, from_client) = std::sync::mpsc::channel::<String>();
        let client = scope.spawn(move || {
            lab::enter_netns(&ext2);
            let mut conn = lab::Conn::open(front).expect("open");
            to_test.send(conn.ask().expect("first ask")).expect("send");
            while let Ok(cmd) = from_test.recv() {
                if cmd == "stop" {
                    break;
                }
                to_test
                    .send(conn.ask().unwrap_or_else(|e| format!("error: {e}")))
                    .expect("send");
            }
        });
        let pinned = from_client.recv().expect("first answer");
        drop(dp);
        to_client.send("ask").expect("send");
        assert_eq!(
            from_client.recv().expect("answer"),
            pinned,
            "works with no agent"
        );
        let mut dp2 = lab.datapath();
        lab.in_node(|| dp2.attach_xdp("up0"))
            .expect("re-attach xdp");
        to_client.send("ask").expect("send");
        assert_eq!(
            from_client.recv().expect("answer"),
            pinned,
            "works after reload"
        );
        let xdp_pins = std::fs::read_dir(lab.pin_dir.join("links"))
            .expect("links")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("xdp-"))
            .count();
        assert_eq!(xdp_pins, 1);
        let (who, _) = in_netns(&ext, || {
            tcp_ask(front).expect("new connection after reload")
        });
        assert!(who == lab.pods[1].ip.to_string() || who == lab.pods[2].ip.to_string());
        to_client.send("stop").expect("send");
        client.join().expect("client");
    });
}

#[test]
fn nodeport_external_traffic_local_keeps_the_client_address() {
    if !require_privileges("nodeport_external_traffic_local_keeps_the_client_address") {
        return;
    }
    let mut lab = Lab::new("etp", 2);
    let ext = lab.add_uplink();
    let mut dp = lab.datapath();
    lab.in_node(|| dp.attach_xdp("up0")).expect("attach xdp");
    dp.set_nodeport_snat(SNAT).expect("snat");
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let mut local = spec(&lab, &[1], Proto::Tcp);
    local.external_traffic_local = true;
    dp.upsert_nodeport(&local).expect("etp=local nodeport");
    let mut cluster = spec(&lab, &[1], Proto::Tcp);
    cluster.port = NODE_PORT + 1;
    dp.upsert_nodeport(&cluster).expect("etp=cluster nodeport");
    let (seen_local, seen_cluster, who) = in_netns(&ext, || {
        (
            lab::tcp_ask_peer(SocketAddr::from((UPLINK_NODE, NODE_PORT))).expect("etp=local"),
            lab::tcp_ask_peer(SocketAddr::from((UPLINK_NODE, NODE_PORT + 1))).expect("etp=cluster"),
            tcp_ask(SocketAddr::from((UPLINK_NODE, NODE_PORT))).expect("etp=local again"),
        )
    });
    assert_eq!(
        seen_local,
        UPLINK_CLIENT.to_string(),
        "eTP=Local: the backend sees the client"
    );
    assert_eq!(
        seen_cluster,
        SNAT.to_string(),
        "eTP=Cluster: the backend sees the SNAT address"
    );
    assert_eq!(
        who.1,
        SocketAddr::from((UPLINK_NODE, NODE_PORT)),
        "the client sees node_ip:node_port"
    );
}

#[test]
fn nodeport_tc_fallback_without_xdp() {
    if !require_privileges("nodeport_tc_fallback_without_xdp") {
        return;
    }
    let mut lab = Lab::new("nptc", 3);
    let ext = lab.add_uplink();
    let mut dp = lab.datapath();
    // No XDP: from_pod on the uplink's tc ingress does the DNAT (no SNAT: the backend's reply
    // passes its own veth, where the same program reverses it).
    lab.in_node(|| dp.attach_tc("up0"))
        .expect("attach tc on the uplink");
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    dp.upsert_service(&spec(&lab, &[1, 2], Proto::Tcp))
        .expect("nodeport as a service");
    let front = SocketAddr::from((UPLINK_NODE, NODE_PORT));
    let answers = in_netns(&ext, || {
        (0..40)
            .map(|_| tcp_ask(front).expect("tcp via tc"))
            .collect::<Vec<_>>()
    });
    let mut counts = BTreeMap::new();
    for (who, peer) in answers {
        assert_eq!(peer, front);
        *counts.entry(who).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 2, "{counts:?}");
    let seen = in_netns(&ext, || lab::tcp_ask_peer(front).expect("peer"));
    assert_eq!(
        seen,
        UPLINK_CLIENT.to_string(),
        "the backend sees the client's address"
    );
    assert_eq!(
        dp.counters().expect("counters")["nodeport_dnat"],
        0,
        "XDP was not involved"
    );
}
