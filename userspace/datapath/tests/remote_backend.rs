//! A Service backend on another node: the client's node DNATs on the pod veth and sends the
//! packet out by FIB lookup + bpf_redirect_neigh; the reply comes back on the node's uplink,
//! where the same `from_pod` program (attached to the uplink's ingress) reverses the NAT and
//! delivers to the client pod with bpf_redirect_peer.
//!
//! ```text
//!  A: <p>-node (the lab node, datapath)          B: <p>-nodeb (no datapath: plain routing)
//!  pod0 10.244.1.10 -- h0 [from_pod]              hb1 -- pod b1 10.244.2.10 (server)
//!                      ab0 10.244.251.1 [from_pod] --- ba0 10.244.251.2
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use skiff_datapath::lab::{Lab, Server, in_netns, ip, require_privileges, tcp_ask, udp_ask};
use skiff_datapath::{BackendSpec, Proto, ServiceSpec};

#[test]
fn clusterip_with_a_backend_on_another_node() {
    if !require_privileges("clusterip_with_a_backend_on_another_node") {
        return;
    }
    let mut lab = Lab::new("remote", 1);
    let node_a = lab.node.clone();
    let node_b = lab.extra_netns("nodeb");
    let pod_b = lab.extra_netns("b1");
    let backend = Ipv4Addr::new(10, 244, 2, 10);
    // Node B: one pod behind a gateway on lo, forwarding on.
    ip(&["-n", &node_b, "addr", "add", "10.244.2.1/32", "dev", "lo"]);
    ip(&[
        "netns",
        "exec",
        &node_b,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    ip(&[
        "-n", &node_b, "link", "add", "hb1", "type", "veth", "peer", "name", "eth0", "netns",
        &pod_b,
    ]);
    ip(&["-n", &node_b, "link", "set", "hb1", "up"]);
    ip(&[
        "-n",
        &node_b,
        "route",
        "add",
        "10.244.2.10/32",
        "dev",
        "hb1",
    ]);
    ip(&["-n", &pod_b, "link", "set", "eth0", "up"]);
    ip(&["-n", &pod_b, "addr", "add", "10.244.2.10/32", "dev", "eth0"]);
    ip(&[
        "-n",
        &pod_b,
        "route",
        "add",
        "10.244.2.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    ip(&[
        "-n",
        &pod_b,
        "route",
        "add",
        "default",
        "via",
        "10.244.2.1",
        "dev",
        "eth0",
    ]);
    // The link between the nodes and the pod-CIDR routes.
    ip(&[
        "-n", &node_a, "link", "add", "ab0", "type", "veth", "peer", "name", "ba0", "netns",
        &node_b,
    ]);
    ip(&[
        "-n",
        &node_a,
        "addr",
        "add",
        "10.244.251.1/24",
        "dev",
        "ab0",
    ]);
    ip(&[
        "-n",
        &node_b,
        "addr",
        "add",
        "10.244.251.2/24",
        "dev",
        "ba0",
    ]);
    ip(&["-n", &node_a, "link", "set", "ab0", "up"]);
    ip(&["-n", &node_b, "link", "set", "ba0", "up"]);
    ip(&[
        "-n",
        &node_a,
        "route",
        "add",
        "10.244.2.0/24",
        "via",
        "10.244.251.2",
    ]);
    ip(&[
        "-n",
        &node_b,
        "route",
        "add",
        "10.244.1.0/24",
        "via",
        "10.244.251.1",
    ]);

    let mut dp = lab.datapath();
    let _server = Server::start(&pod_b, backend, 8080);
    let vip = Ipv4Addr::new(10, 96, 3, 40);
    for proto in [Proto::Tcp, Proto::Udp] {
        dp.upsert_service(&ServiceSpec {
            vip: IpAddr::V4(vip),
            port: 80,
            proto,
            backends: vec![BackendSpec {
                ip: IpAddr::V4(backend),
                port: 8080,
                ready: true,
                terminating: false,
            }],
            affinity_timeout: None,
            external_traffic_local: false,
        })
        .expect("service");
    }
    let front = SocketAddr::from((vip, 80));
    let pod0 = lab.pods[0].netns.clone();

    // Without a program on the uplink the reply arrives from the backend's own address, not
    // the VIP the client asked (a connected or TCP client would drop it).
    let control = in_netns(&pod0, || udp_ask(front));
    assert!(
        !matches!(&control, Ok((_, from)) if *from == front),
        "no reverse NAT without the uplink hook: {control:?}"
    );

    lab.in_node(|| dp.attach_tc("ab0")).expect("attach uplink");
    let before = dp.counters().expect("counters");
    let (tcp, udp) = in_netns(&pod0, || {
        (
            tcp_ask(front).expect("tcp to remote backend"),
            udp_ask(front).expect("udp"),
        )
    });
    assert_eq!(tcp, (backend.to_string(), front));
    assert_eq!(udp, (backend.to_string(), front));
    let after = dp.counters().expect("counters");
    assert!(
        after["redirect_neigh"] > before["redirect_neigh"],
        "out to the other node by fib: {after:?}"
    );
    assert!(
        after["reverse_nat"] > before["reverse_nat"],
        "replies reversed on the uplink: {after:?}"
    );
    assert!(
        after["redirect_peer"] > before["redirect_peer"],
        "replies delivered straight into the pod: {after:?}"
    );
}
