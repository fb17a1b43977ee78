//! Socket-level load balancing: the cgroup v2 connect4/sendmsg4/recvmsg4/getpeername4 programs.
//! A socket belongs to the cgroup of the process that creates it and cgroup v2 moves whole
//! processes, so these tests move this test binary's process into the lab's cgroup (and back on
//! drop); they run one at a time (SERIAL) and live in their own test binary.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::Mutex,
    time::Duration,
};

use skiff_datapath::lab::{Lab, Server, in_netns, require_privileges, tcp_ask, udp_ask};
use skiff_datapath::{BackendSpec, Proto, ServiceSpec};

static SERIAL: Mutex<()> = Mutex::new(());
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 20);

fn spec(lab: &Lab, backends: &[usize], proto: Proto, affinity: Option<u32>) -> ServiceSpec {
    ServiceSpec {
        vip: IpAddr::V4(VIP),
        port: 80,
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
        affinity_timeout: affinity,
        external_traffic_local: false,
    }
}

fn tally(results: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        *m.entry(r).or_insert(0) += 1;
    }
    m
}

#[test]
fn clusterip_tcp_and_udp_via_socket_layer() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_privileges("clusterip_tcp_and_udp_via_socket_layer") {
        return;
    }
    let mut lab = Lab::new("sock", 3);
    let mut dp = lab.datapath();
    let cg = lab.cgroup();
    dp.attach_cgroup(&cg).expect("attach socket LB");
    lab.enter_cgroup(&cg);
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    dp.upsert_service(&spec(&lab, &[1, 2], Proto::Tcp, None))
        .expect("tcp");
    dp.upsert_service(&spec(&lab, &[1, 2], Proto::Udp, None))
        .expect("udp");
    let vip = SocketAddr::from((VIP, 80));

    let (tcp, udp, connected_udp) = in_netns(&lab.pods[0].netns, || {
        let tcp: Vec<_> = (0..100)
            .map(|_| tcp_ask(vip).expect("tcp via VIP"))
            .collect();
        // Unconnected UDP: sendmsg4 translates, recvmsg4 shows the VIP as the source.
        let udp: Vec<_> = (0..100)
            .map(|_| udp_ask(vip).expect("udp via VIP"))
            .collect();
        // One unconnected socket, many datagrams: they all go to one backend.
        let one = UdpSocket::bind("0.0.0.0:0").expect("bind");
        one.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut sticky = std::collections::BTreeSet::new();
        for _ in 0..30 {
            one.send_to(b"who", vip).expect("send");
            let mut buf = [0u8; 64];
            let (n, from) = one.recv_from(&mut buf).expect("recv");
            assert_eq!(from, vip);
            sticky.insert(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        assert_eq!(
            sticky.len(),
            1,
            "one socket's datagrams stay on one backend: {sticky:?}"
        );
        // Connected UDP: connect4 translates, getpeername4 shows the VIP.
        let u = UdpSocket::bind("0.0.0.0:0").expect("bind");
        u.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        u.connect(vip).expect("connect");
        u.send(b"who").expect("send");
        let mut buf = [0u8; 64];
        let n = u.recv(&mut buf).expect("recv");
        (
            tcp,
            udp,
            (
                u.peer_addr().expect("peer"),
                String::from_utf8_lossy(&buf[..n]).to_string(),
            ),
        )
    });
    for (_, peer) in &tcp {
        assert_eq!(*peer, vip, "getpeername returns the VIP");
    }
    let counts = tally(tcp.into_iter().map(|(w, _)| w));
    assert_eq!(counts.len(), 2, "both backends answered tcp: {counts:?}");
    for (_, from) in &udp {
        assert_eq!(*from, vip, "recvfrom returns the VIP");
    }
    assert_eq!(
        tally(udp.into_iter().map(|(w, _)| w)).len(),
        2,
        "both backends answered udp"
    );
    assert_eq!(
        connected_udp.0, vip,
        "connected udp: getpeername returns the VIP"
    );
    assert!(
        connected_udp.1 == lab.pods[1].ip.to_string()
            || connected_udp.1 == lab.pods[2].ip.to_string()
    );

    // The socket layer did the work: tc saw backend addresses, so it created no conntrack entry.
    assert!(
        !dp.dump_conntrack()
            .expect("ct")
            .iter()
            .any(|e| e.vip == IpAddr::V4(VIP)),
        "no per-packet NAT for socket-translated flows"
    );
    let c = dp.counters().expect("counters");
    assert!(
        c["socket_translate"] >= 201 && c["socket_reverse"] >= 201,
        "{c:?}"
    );
    assert_eq!(c["dnat"], 0, "{c:?}");

    // No agent: the pinned cgroup links keep translating. Then a reload replaces them in place.
    drop(dp);
    let (who, peer) = in_netns(&lab.pods[0].netns, || {
        tcp_ask(vip).expect("tcp with no agent")
    });
    assert_eq!(peer, vip);
    assert!(who == lab.pods[1].ip.to_string() || who == lab.pods[2].ip.to_string());
    let mut dp = lab.datapath();
    dp.attach_cgroup(&cg).expect("re-attach socket LB");
    let answers = in_netns(&lab.pods[0].netns, || {
        (0..20)
            .map(|_| tcp_ask(vip).expect("tcp after reload").0)
            .collect::<Vec<_>>()
    });
    assert_eq!(tally(answers).len(), 2);
    let links = std::fs::read_dir(lab.pin_dir.join("links"))
        .expect("links dir")
        .count();
    assert_eq!(
        links,
        3 + 4,
        "one pinned link per veth and per socket hook, none left over"
    );
}

#[test]
fn socket_layer_affinity_and_ready_only() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_privileges("socket_layer_affinity_and_ready_only") {
        return;
    }
    let mut lab = Lab::new("sockaff", 4);
    let mut dp = lab.datapath();
    let cg = lab.cgroup();
    dp.attach_cgroup(&cg).expect("attach socket LB");
    lab.enter_cgroup(&cg);
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    let _s3 = Server::start(&lab.pods[3].netns, lab.pods[3].ip, 8080);
    let vip = SocketAddr::from((VIP, 80));

    dp.upsert_service(&spec(&lab, &[1, 2, 3], Proto::Tcp, Some(60)))
        .expect("tcp");
    let answers = in_netns(&lab.pods[0].netns, || {
        (0..40)
            .map(|_| tcp_ask(vip).expect("tcp").0)
            .collect::<Vec<_>>()
    });
    assert_eq!(
        tally(answers).len(),
        1,
        "affinity: one backend for this client"
    );

    // Only Ready endpoints get new flows: pod1 not ready, pod2 terminating.
    let mut s = spec(&lab, &[1, 2, 3], Proto::Tcp, None);
    s.backends[0].ready = false;
    s.backends[1].ready = false;
    s.backends[1].terminating = true;
    dp.upsert_service(&s).expect("tcp");
    let answers = in_netns(&lab.pods[0].netns, || {
        (0..40)
            .map(|_| tcp_ask(vip).expect("tcp").0)
            .collect::<Vec<_>>()
    });
    assert_eq!(
        tally(answers).keys().cloned().collect::<Vec<_>>(),
        vec![lab.pods[3].ip.to_string()]
    );

    // No ready endpoint at all: connect() fails at once instead of hanging.
    s.backends[2].ready = false;
    dp.upsert_service(&s).expect("tcp");
    let r = in_netns(&lab.pods[0].netns, || tcp_ask(vip));
    assert!(
        r.is_err(),
        "connect to a service without endpoints fails: {r:?}"
    );
}

/// cilium #12859: a connected UDP socket is translated once, at connect(); when its backend is
/// removed it would keep sending to it. The sweep destroys exactly those sockets (the app sees
/// an error and reconnects to a live backend) and leaves other sockets alone.
#[test]
fn connected_udp_socket_to_a_removed_backend_is_destroyed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_privileges("connected_udp_socket_to_a_removed_backend_is_destroyed") {
        return;
    }
    let mut lab = Lab::new("sockudp", 3);
    let mut dp = lab.datapath();
    let cg = lab.cgroup();
    dp.attach_cgroup(&cg).expect("attach socket LB");
    lab.enter_cgroup(&cg);
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    dp.upsert_service(&spec(&lab, &[1, 2], Proto::Udp, None))
        .expect("udp");
    let vip = SocketAddr::from((VIP, 80));
    let ask = |u: &UdpSocket| -> std::io::Result<String> {
        u.send(b"who")?;
        let mut buf = [0u8; 64];
        let n = u.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).to_string())
    };
    let connect = || {
        let u = UdpSocket::bind("0.0.0.0:0").expect("bind");
        u.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        u.connect(vip).expect("connect");
        u
    };
    let pod0 = lab.pods[0].netns.clone();
    // Sockets live in the client's namespace; open them there and keep them across steps.
    let (socks, first) = in_netns(&pod0, || {
        let socks: Vec<UdpSocket> = (0..16).map(|_| connect()).collect();
        let first: Vec<String> = socks.iter().map(|u| ask(u).expect("udp")).collect();
        (socks, first)
    });
    // A socket not translated by the socket layer (straight to pod 1): must survive the sweep.
    let direct = in_netns(&pod0, || {
        let u = UdpSocket::bind("0.0.0.0:0").expect("bind");
        u.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        u.connect(SocketAddr::from((lab.pods[1].ip, 8080)))
            .expect("connect direct");
        u
    });
    let gone = lab.pods[1].ip.to_string();
    let kept = lab.pods[2].ip.to_string();
    let on_gone = first.iter().filter(|w| **w == gone).count();
    assert!(
        on_gone > 0 && on_gone < 16,
        "16 sockets spread over both backends: {first:?}"
    );

    // Pod 1 leaves the service (its server keeps running, so a stale socket would still get
    // answers from it: that is the bug this guards against).
    dp.upsert_service(&spec(&lab, &[2], Proto::Udp, None))
        .expect("remove backend");
    let stale_before = in_netns(&pod0, || {
        socks
            .iter()
            .filter(|u| ask(u).map(|w| w == gone).unwrap_or(false))
            .count()
    });
    assert_eq!(
        stale_before, on_gone,
        "without the sweep, connected sockets keep talking to the removed backend"
    );
    let destroyed = in_netns(&pod0, || dp.destroy_stale_udp_sockets().expect("sweep"));
    assert_eq!(
        destroyed, on_gone,
        "exactly the stale sockets are destroyed"
    );
    let after: Vec<std::io::Result<String>> = in_netns(&pod0, || socks.iter().map(ask).collect());
    for (before, now) in first.iter().zip(&after) {
        if *before == gone {
            assert!(now.is_err(), "a destroyed socket reports an error: {now:?}");
        } else {
            assert_eq!(
                now.as_deref().ok(),
                Some(kept.as_str()),
                "live sockets untouched"
            );
        }
    }
    // The application reconnects and lands on a live backend; the direct socket still works.
    let (again, direct_answer) = in_netns(&pod0, || {
        let again: Vec<String> = (0..8).map(|_| ask(&connect()).expect("udp")).collect();
        (again, ask(&direct).expect("direct socket untouched"))
    });
    assert!(again.iter().all(|w| *w == kept), "{again:?}");
    assert_eq!(direct_answer, gone);
    assert_eq!(
        in_netns(&pod0, || dp.destroy_stale_udp_sockets().expect("sweep")),
        0,
        "a second sweep finds nothing"
    );
}

/// Hairpin on the socket layer: a backend reaching its own service through the VIP gets a
/// connection to itself (connect() is rewritten to its own address, no NAT on the wire), and
/// getpeername still shows the VIP.
#[test]
fn hairpin_via_socket_layer() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require_privileges("hairpin_via_socket_layer") {
        return;
    }
    let mut lab = Lab::new("sockhp", 2);
    let mut dp = lab.datapath();
    let cg = lab.cgroup();
    dp.attach_cgroup(&cg).expect("attach socket LB");
    lab.enter_cgroup(&cg);
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    dp.upsert_service(&spec(&lab, &[1], Proto::Tcp, None))
        .expect("tcp");
    dp.upsert_service(&spec(&lab, &[1], Proto::Udp, None))
        .expect("udp");
    let vip = SocketAddr::from((VIP, 80));
    let (tcp, udp) = in_netns(&lab.pods[1].netns, || {
        let tcp: Vec<_> = (0..10)
            .map(|_| tcp_ask(vip).expect("hairpin tcp"))
            .collect();
        let udp: Vec<_> = (0..10)
            .map(|_| udp_ask(vip).expect("hairpin udp"))
            .collect();
        (tcp, udp)
    });
    let me = lab.pods[1].ip.to_string();
    for (who, peer) in tcp.iter().chain(udp.iter()) {
        assert_eq!(*who, me, "the backend reached itself");
        assert_eq!(*peer, vip, "and sees the VIP as its peer");
    }
    let c = dp.counters().expect("counters");
    assert!(c["socket_translate"] >= 20, "{c:?}");
    assert_eq!(c["dnat"], 0, "no per-packet NAT for socket hairpin: {c:?}");
}
