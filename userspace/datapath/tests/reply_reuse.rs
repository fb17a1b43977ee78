//! A client that reuses one source port for two Services sharing a backend (as busy clients and
//! benchmarks do): the shared reply tuple (backend -> client:port) must follow whichever flow
//! uses it, or the first Service's replies come back from the second Service's VIP and the
//! client drops them (found by bench/svcbench: lost SYN-ACKs, 5 s connect timeouts).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

use skiff_datapath::lab::{Lab, Server, in_netns, require_privileges};
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
// Known bug, not fixed: dropping the stale reply entry on the direct flow's SYN in from_pod
// (tried in 77feeb1, reverted) also dropped the reply entry XDP had just made for a NodePort
// flow, because from_pod runs on the uplink too (after XDP passes the translated SYN), and broke
// NodePort in services_e2e. A fix needs to tell pod veths from the uplink (a second tc program
// or an interface check). Run with `cargo test -p skiff-datapath --test reply_reuse -- --ignored`.
#[test]
#[ignore = "known bug: a direct flow reusing a Service flow's client port gets its replies reverse-NATed"]
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
}
