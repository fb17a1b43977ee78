//! A client that reuses one source port for two Services sharing a backend (as busy clients and
//! benchmarks do): the shared reply tuple (backend -> client:port) must follow whichever flow
//! uses it, or the first Service's replies come back from the second Service's VIP and the
//! client drops them (found by bench/svcbench: lost SYN-ACKs, 5 s connect timeouts).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use skiff_datapath::lab::{Lab, Server, UPLINK_NODE, in_netns, require_privileges, tcp_ask, udp_ask};
use skiff_datapath::{BackendSpec, Proto, ServiceSpec};

/// One request from `src_port`, closed with RST (linger 0) so the port is free at once.
fn ask_from(src: Ipv4Addr, src_port: u16, dst: SocketAddr) -> std::io::Result<String> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddrV4::new(src, src_port).into())?;
    sock.connect_timeout(&dst.into(), Duration::from_secs(2))?;
    sock.set_linger(Some(Duration::ZERO))?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"hi\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

#[test]
fn reused_client_port_across_services_with_a_shared_backend() {
    if !require_privileges("reused_client_port_across_services_with_a_shared_backend") {
        return;
    }
    let lab = Lab::new("reuse", 2);
    let backend = &lab.pods[0];
    let client = &lab.pods[1];
    let _server = Server::start(&backend.netns, backend.ip, 8080);
    let mut dp = lab.datapath();
    let vips = [Ipv4Addr::new(10, 96, 0, 51), Ipv4Addr::new(10, 96, 0, 52)];
    for vip in vips {
        dp.upsert_service(&ServiceSpec {
            vip: IpAddr::V4(vip),
            port: 80,
            proto: Proto::Tcp,
            backends: vec![BackendSpec { ip: IpAddr::V4(backend.ip), port: 8080, ready: true, terminating: false }],
            affinity_timeout: None,
            external_traffic_local: false,
        })
        .expect("service");
    }
    let (a, b) = (SocketAddr::new(IpAddr::V4(vips[0]), 80), SocketAddr::new(IpAddr::V4(vips[1]), 80));
    let answers: Vec<std::io::Result<String>> =
        in_netns(&client.netns, || [a, b, a, b, a].into_iter().map(|dst| ask_from(client.ip, 40123, dst)).collect());
    for (i, r) in answers.iter().enumerate() {
        let r = r.as_ref().unwrap_or_else(|e| panic!("request {i} from port 40123 failed: {e}"));
        assert_eq!(r, &backend.ip.to_string(), "request {i} answered by the backend");
    }
}

/// The same port reused for a direct connection to the backend's pod IP after a Service flow
/// (found by bench/svcbench's interleaved rounds: direct connects timed out after tc-layer
/// rounds). The Service flow's reply entry (backend -> client:port) must not reverse-NAT the
/// direct flow's replies to the VIP, and the Service must still work after it.
// 77feeb1 dropped the stale entry in from_pod on any non-Service SYN and broke NodePort (from_pod
// also runs on the uplink, after XDP passes a translated SYN whose reply entry it had just made);
// from_pod now drops it only for a packet from the local pod's own veth. The NodePort side of
// that is checked by nodeport_xdp.rs and services_e2e.
#[test]
fn reused_client_port_from_a_service_to_the_backend_directly() {
    if !require_privileges("reused_client_port_from_a_service_to_the_backend_directly") {
        return;
    }
    let lab = Lab::new("reusd", 2);
    let backend = &lab.pods[0];
    let client = &lab.pods[1];
    let _server = Server::start(&backend.netns, backend.ip, 8080);
    let mut dp = lab.datapath();
    let vip = Ipv4Addr::new(10, 96, 0, 53);
    dp.upsert_service(&ServiceSpec {
        vip: IpAddr::V4(vip),
        port: 80,
        proto: Proto::Tcp,
        backends: vec![BackendSpec { ip: IpAddr::V4(backend.ip), port: 8080, ready: true, terminating: false }],
        affinity_timeout: None,
        external_traffic_local: false,
    })
    .expect("service");
    let service = SocketAddr::new(IpAddr::V4(vip), 80);
    let direct = SocketAddr::new(IpAddr::V4(backend.ip), 8080);
    let answers: Vec<std::io::Result<String>> = in_netns(&client.netns, || {
        [service, direct, service, direct].into_iter().map(|dst| ask_from(client.ip, 40124, dst)).collect()
    });
    for (i, r) in answers.iter().enumerate() {
        let r = r.as_ref().unwrap_or_else(|e| panic!("request {i} from port 40124 failed: {e}"));
        assert_eq!(r, &backend.ip.to_string(), "request {i} answered by the backend");
    }
    let c = dp.counters().expect("counters");
    assert!(c["stale_reply_dropped"] >= 2, "each direct SYN dropped the Service flow's reply entry: {c:?}");
}

/// The breakage 77feeb1 caused, at the datapath level: with from_pod on the uplink as well as
/// XDP (as the agent attaches them), the translated NodePort SYN that XDP passes meets from_pod
/// there as a non-Service SYN whose reply entry XDP has just made; that entry must stay, or the
/// backend's reply is not reverse-translated and the client never gets an answer.
#[test]
fn nodeport_through_xdp_and_tc_on_the_uplink_keeps_its_reply_entry() {
    if !require_privileges("nodeport_through_xdp_and_tc_on_the_uplink_keeps_its_reply_entry") {
        return;
    }
    let mut lab = Lab::new("reunp", 1);
    let ext = lab.add_uplink();
    let backend = lab.pods[0].ip;
    let _server = Server::start(&lab.pods[0].netns, backend, 8080);
    let mut dp = lab.datapath();
    lab.in_node(|| dp.attach_tc("up0")).expect("tc on the uplink");
    lab.in_node(|| dp.attach_xdp("up0")).expect("xdp on the uplink");
    dp.set_nodeport_snat(Ipv4Addr::new(169, 254, 42, 2)).expect("snat");
    for proto in [Proto::Tcp, Proto::Udp] {
        dp.upsert_nodeport(&ServiceSpec {
            vip: IpAddr::V4(UPLINK_NODE),
            port: 30081,
            proto,
            backends: vec![BackendSpec { ip: IpAddr::V4(backend), port: 8080, ready: true, terminating: false }],
            affinity_timeout: None,
            external_traffic_local: false,
        })
        .expect("nodeport");
    }
    let front = SocketAddr::new(IpAddr::V4(UPLINK_NODE), 30081);
    let (tcp, udp) = in_netns(&ext, || {
        (
            (0..5).map(|_| tcp_ask(front)).collect::<Vec<_>>(),
            (0..5).map(|_| udp_ask(front)).collect::<Vec<_>>(),
        )
    });
    for r in tcp.iter().chain(udp.iter()) {
        let (who, from) = r.as_ref().expect("answered through the node port");
        assert_eq!((who.as_str(), *from), (backend.to_string().as_str(), front));
    }
    let c = dp.counters().expect("counters");
    assert_eq!(c["stale_reply_dropped"], 0, "nothing dropped on the uplink: {c:?}");
}
