//! Per-packet load balancing by the tc program on the pod veths, with clients that are NOT in
//! any cgroup carrying the socket-LB programs (so every Service packet is DNATed by tc).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use skiff_datapath::lab::{self, Lab, Server, in_netns, require_privileges, tcp_ask, udp_ask};
use skiff_datapath::{BackendSpec, CtDirection, Datapath, Proto, ServiceSpec};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn spec(lab: &Lab, backends: &[usize], port: u16, proto: Proto) -> ServiceSpec {
    ServiceSpec {
        vip: IpAddr::V4(VIP),
        port: 80,
        proto,
        backends: backends
            .iter()
            .map(|&i| BackendSpec {
                ip: IpAddr::V4(lab.pods[i].ip),
                port,
                ready: true,
                terminating: false,
            })
            .collect(),
        affinity_timeout: None,
        external_traffic_local: false,
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
    // ... and "every" means every program the object holds, not only those the loader names.
    let programs = dp.programs_loaded();
    let names: std::collections::BTreeSet<&str> =
        programs.iter().map(|(n, _)| n.as_str()).collect();
    let expected: std::collections::BTreeSet<&str> = [
        skiff_ebpf_common::program_names::CONNECT4,
        skiff_ebpf_common::program_names::SENDMSG4,
        skiff_ebpf_common::program_names::RECVMSG4,
        skiff_ebpf_common::program_names::GETPEERNAME4,
        skiff_ebpf_common::program_names::FROM_POD,
        skiff_ebpf_common::program_names::NODEPORT,
    ]
    .into();
    assert_eq!(names, expected, "the object's programs: {programs:?}");
    for (name, loaded) in &programs {
        assert!(
            loaded,
            "program {name} is in the object but was not loaded (verified)"
        );
    }
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
    let mut lab = Lab::new("tc", 3);
    let mut dp = lab.datapath();
    // Socket LB is attached to a cgroup this process is NOT in: it must not see these clients.
    let cg = lab.cgroup();
    dp.attach_cgroup(&cg).expect("attach socket LB elsewhere");
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    dp.upsert_service(&spec(&lab, &[1, 2], 8080, Proto::Tcp))
        .expect("tcp service");
    dp.upsert_service(&spec(&lab, &[1, 2], 8080, Proto::Udp))
        .expect("udp service");
    let vip = SocketAddr::from((VIP, 80));

    let tcp = in_netns(&lab.pods[0].netns, || {
        (0..100)
            .map(|_| tcp_ask(vip).expect("tcp via VIP"))
            .collect::<Vec<_>>()
    });
    for (_, peer) in &tcp {
        assert_eq!(*peer, vip, "the client sees the VIP, not the backend");
    }
    let counts = tally(tcp.into_iter().map(|(who, _)| who).collect());
    assert_eq!(counts.len(), 2, "both backends answered: {counts:?}");
    for b in [&lab.pods[1].ip, &lab.pods[2].ip] {
        assert!(
            counts.get(&b.to_string()).copied().unwrap_or(0) >= 10,
            "{b} got a fair share: {counts:?}"
        );
    }

    let udp = in_netns(&lab.pods[0].netns, || {
        (0..100)
            .map(|_| udp_ask(vip).expect("udp via VIP"))
            .collect::<Vec<_>>()
    });
    for (_, from) in &udp {
        assert_eq!(
            *from, vip,
            "udp replies come back from the VIP (reverse NAT)"
        );
    }
    let counts = tally(udp.into_iter().map(|(who, _)| who).collect());
    assert_eq!(counts.len(), 2, "both backends answered udp: {counts:?}");

    let ct = dp.dump_conntrack().expect("conntrack");
    let fwd = ct
        .iter()
        .filter(|e| e.direction == CtDirection::Forward && e.vip == IpAddr::V4(VIP))
        .count();
    let rev = ct
        .iter()
        .filter(|e| e.direction == CtDirection::Reply)
        .count();
    assert!(
        fwd >= 100 && rev >= 100,
        "conntrack holds both directions: {fwd} forward, {rev} reply"
    );
    let c = dp.counters().expect("counters");
    assert!(
        c["dnat"] >= 200 && c["reverse_nat"] >= 200,
        "counters: {c:?}"
    );
    assert!(
        c["redirect_peer"] > 0,
        "same-node delivery used bpf_redirect_peer: {c:?}"
    );
    assert_eq!(
        c["socket_translate"], 0,
        "clients outside the cgroup are not socket-translated: {c:?}"
    );
}

fn backend_id_of(dp: &Datapath, ip: Ipv4Addr, proto: Proto) -> u32 {
    dp.dump_backends()
        .expect("backends")
        .iter()
        .find(|b| b.ip == IpAddr::V4(ip) && b.proto == proto)
        .map(|b| b.id)
        .expect("backend present")
}

#[test]
fn client_ip_affinity_via_tc() {
    if !require_privileges("client_ip_affinity_via_tc") {
        return;
    }
    let lab = Lab::new("aff", 3);
    let mut dp = lab.datapath();
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    let mut s = spec(&lab, &[1, 2], 8080, Proto::Tcp);
    s.affinity_timeout = Some(60);
    dp.upsert_service(&s).expect("service");
    let vip = SocketAddr::from((VIP, 80));
    let answers = in_netns(&lab.pods[0].netns, || {
        (0..40)
            .map(|_| tcp_ask(vip).expect("tcp").0)
            .collect::<Vec<_>>()
    });
    let counts = tally(answers);
    assert_eq!(
        counts.len(),
        1,
        "ClientIP affinity keeps one client on one backend: {counts:?}"
    );
    // Dropping affinity spreads the same client again.
    s.affinity_timeout = None;
    dp.upsert_service(&s).expect("service");
    let answers = in_netns(&lab.pods[0].netns, || {
        (0..60)
            .map(|_| tcp_ask(vip).expect("tcp").0)
            .collect::<Vec<_>>()
    });
    assert_eq!(
        tally(answers).len(),
        2,
        "without affinity both backends answer"
    );
}

#[test]
fn terminating_backend_keeps_established_flows_and_gets_no_new_ones() {
    if !require_privileges("terminating_backend_keeps_established_flows_and_gets_no_new_ones") {
        return;
    }
    let lab = Lab::new("term", 3);
    let mut dp = lab.datapath();
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    let mut s = spec(&lab, &[1, 2], 8080, Proto::Tcp);
    dp.upsert_service(&s).expect("service");
    let vip = SocketAddr::from((VIP, 80));
    let pod0 = lab.pods[0].netns.clone();
    std::thread::scope(|scope| {
        let (to_client, from_test) = std::sync::mpsc::channel::<&str>();
        let (to_test, from_client) = std::sync::mpsc::channel::<String>();
        let client = scope.spawn(move || {
            lab::enter_netns(&pod0);
            let mut conn = lab::Conn::open(vip).expect("open");
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
        let (term_idx, other_idx) = if pinned == lab.pods[1].ip.to_string() {
            (1, 2)
        } else {
            (2, 1)
        };
        // The backend the open connection uses starts terminating.
        for b in &mut s.backends {
            if b.ip == IpAddr::V4(lab.pods[term_idx].ip) {
                b.ready = false;
                b.terminating = true;
            }
        }
        dp.upsert_service(&s).expect("service update");
        for _ in 0..5 {
            to_client.send("ask").expect("send");
            assert_eq!(
                from_client.recv().expect("answer"),
                pinned,
                "established flow keeps its terminating backend"
            );
        }
        let fresh = in_netns(&lab.pods[0].netns, || {
            (0..40)
                .map(|_| tcp_ask(vip).expect("tcp").0)
                .collect::<Vec<_>>()
        });
        let counts = tally(fresh);
        assert_eq!(
            counts.keys().cloned().collect::<Vec<_>>(),
            vec![lab.pods[other_idx].ip.to_string()],
            "new flows only go to the ready backend"
        );
        to_client.send("stop").expect("send");
        client.join().expect("client");
    });
}

#[test]
fn udp_conntrack_purged_when_backend_removed() {
    if !require_privileges("udp_conntrack_purged_when_backend_removed") {
        return;
    }
    let lab = Lab::new("purge", 3);
    let mut dp = lab.datapath();
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 5353);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 5353);
    dp.upsert_service(&spec(&lab, &[1, 2], 5353, Proto::Udp))
        .expect("service");
    let vip = SocketAddr::from((VIP, 80));
    // One socket with a fixed source port: every datagram is the same 5-tuple (like a resolver).
    let pod0 = lab.pods[0].netns.clone();
    let sock = in_netns(&pod0, || {
        let u = std::net::UdpSocket::bind((lab.pods[0].ip, 40000)).expect("bind");
        u.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        u
    });
    let ask = |u: &std::net::UdpSocket| {
        u.send_to(b"who", vip).expect("send");
        let mut buf = [0u8; 64];
        let (n, from) = u.recv_from(&mut buf).expect("recv");
        assert_eq!(from, vip);
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let first = ask(&sock);
    for _ in 0..5 {
        assert_eq!(ask(&sock), first, "one 5-tuple, one backend");
    }
    let gone = if first == lab.pods[1].ip.to_string() {
        1
    } else {
        2
    };
    let stays = 3 - gone;
    let gone_id = backend_id_of(&dp, lab.pods[gone].ip, Proto::Udp);
    let before = dp
        .dump_conntrack()
        .expect("ct")
        .iter()
        .filter(|e| e.backend_id == gone_id)
        .count();
    assert_eq!(before, 2, "forward and reply entries point at the backend");
    dp.upsert_service(&spec(&lab, &[stays], 5353, Proto::Udp))
        .expect("remove backend");
    let after = dp
        .dump_conntrack()
        .expect("ct")
        .iter()
        .filter(|e| e.backend_id == gone_id)
        .count();
    assert_eq!(
        after, 0,
        "removing the backend purged its UDP conntrack entries"
    );
    assert_eq!(
        ask(&sock),
        lab.pods[stays].ip.to_string(),
        "the same 5-tuple now reaches the remaining backend"
    );
}

#[test]
fn hairpin_backend_reaches_itself_through_the_vip() {
    if !require_privileges("hairpin_backend_reaches_itself_through_the_vip") {
        return;
    }
    let lab = Lab::new("hairpin", 2);
    let mut dp = lab.datapath();
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    dp.upsert_service(&spec(&lab, &[1], 8080, Proto::Tcp))
        .expect("tcp");
    dp.upsert_service(&spec(&lab, &[1], 8080, Proto::Udp))
        .expect("udp");
    let vip = SocketAddr::from((VIP, 80));
    let (tcp, udp) = in_netns(&lab.pods[1].netns, || {
        (
            tcp_ask(vip).expect("hairpin tcp"),
            udp_ask(vip).expect("hairpin udp"),
        )
    });
    assert_eq!(tcp, (lab.pods[1].ip.to_string(), vip));
    assert_eq!(udp, (lab.pods[1].ip.to_string(), vip));
    let c = dp.counters().expect("counters");
    assert!(c["hairpin"] >= 2, "both flows were hairpinned: {c:?}");
    assert!(dp.dump_conntrack().expect("ct").iter().any(|e| e.hairpin));
}

#[test]
fn restart_keeps_open_connections_and_services() {
    if !require_privileges("restart_keeps_open_connections_and_services") {
        return;
    }
    let lab = Lab::new("restart", 3);
    let mut dp = lab.datapath();
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    let s = spec(&lab, &[1, 2], 8080, Proto::Tcp);
    dp.upsert_service(&s).expect("service");
    let vip = SocketAddr::from((VIP, 80));
    let pod0 = lab.pods[0].netns.clone();
    let services_before = dp.dump_services().expect("dump");
    std::thread::scope(|scope| {
        let (to_client, from_test) = std::sync::mpsc::channel::<&str>();
        let (to_test, from_client) = std::sync::mpsc::channel::<String>();
        let client = scope.spawn(move || {
            lab::enter_netns(&pod0);
            let mut conn = lab::Conn::open(vip).expect("open");
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
        // The agent goes away: programs stay attached through their pinned links.
        drop(dp);
        to_client.send("ask").expect("send");
        assert_eq!(
            from_client.recv().expect("answer"),
            pinned,
            "connection works with no agent"
        );
        // The agent comes back: maps come from the pins, links are replaced in place.
        let dp2 = lab.datapath();
        to_client.send("ask").expect("send");
        assert_eq!(
            from_client.recv().expect("answer"),
            pinned,
            "connection works after reload"
        );
        assert_eq!(
            dp2.dump_services().expect("dump"),
            services_before,
            "services survived the restart"
        );
        assert!(
            dp2.dump_conntrack()
                .expect("ct")
                .iter()
                .any(|e| e.vip == IpAddr::V4(VIP)),
            "conntrack survived the restart"
        );
        // Reloading the same spec changes nothing.
        let mut dp2 = dp2;
        assert_eq!(dp2.upsert_service(&s).expect("upsert"), vec![]);
        to_client.send("stop").expect("send");
        client.join().expect("client");
    });
}

#[test]
fn pod_to_pod_delivery_peer_and_fib_fallback() {
    if !require_privileges("pod_to_pod_delivery_peer_and_fib_fallback") {
        return;
    }
    let lab = Lab::new("deliver", 3);
    let mut dp = lab.datapath();
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    // pod2 is not registered: delivery goes through bpf_fib_lookup + bpf_redirect_neigh.
    dp.delete_endpoint(lab.pods[2].ip).expect("delete endpoint");
    let before = dp.counters().expect("counters");
    let (a, b) = in_netns(&lab.pods[0].netns, || {
        (
            tcp_ask(SocketAddr::from((lab.pods[1].ip, 8080))).expect("to pod1"),
            tcp_ask(SocketAddr::from((lab.pods[2].ip, 8080))).expect("to pod2"),
        )
    });
    assert_eq!(a.0, lab.pods[1].ip.to_string());
    assert_eq!(b.0, lab.pods[2].ip.to_string());
    let after = dp.counters().expect("counters");
    assert!(
        after["redirect_peer"] > before["redirect_peer"],
        "{after:?}"
    );
    assert!(
        after["redirect_neigh"] > before["redirect_neigh"],
        "{after:?}"
    );
}

#[test]
fn conntrack_gc_removes_idle_flows_only() {
    if !require_privileges("conntrack_gc_removes_idle_flows_only") {
        return;
    }
    let lab = Lab::new("gc", 2);
    let mut dp = lab.datapath();
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    dp.upsert_service(&spec(&lab, &[1], 8080, Proto::Udp))
        .expect("udp");
    let vip = SocketAddr::from((VIP, 80));
    in_netns(&lab.pods[0].netns, || {
        for _ in 0..10 {
            udp_ask(vip).expect("udp");
        }
    });
    let n = dp.dump_conntrack().expect("ct").len();
    assert_eq!(n, 20, "10 flows, two entries each");
    let long = std::time::Duration::from_secs(3600);
    let kept = dp.gc_conntrack(long, long).expect("gc");
    assert_eq!(kept.deleted, 0, "fresh flows stay");
    std::thread::sleep(std::time::Duration::from_millis(50));
    let short = std::time::Duration::from_millis(10);
    let gone = dp.gc_conntrack(short, long).expect("gc");
    assert_eq!(
        (gone.scanned, gone.deleted),
        (20, 20),
        "idle udp flows go, both directions"
    );
    assert!(dp.dump_conntrack().expect("ct").is_empty());
    // The service still works: a new flow gets new entries.
    in_netns(&lab.pods[0].netns, || udp_ask(vip).expect("udp after gc"));
    assert_eq!(dp.dump_conntrack().expect("ct").len(), 2);
}

#[test]
fn open_pinned_sees_the_live_maps_without_loading_programs() {
    if !require_privileges("open_pinned_sees_the_live_maps_without_loading_programs") {
        return;
    }
    let lab = Lab::new("pins", 2);
    let mut dp = lab.datapath();
    dp.upsert_service(&spec(&lab, &[1], 8080, Proto::Tcp))
        .expect("tcp");
    let mut view = Datapath::open_pinned(&lab.pin_dir).expect("open pins");
    assert_eq!(
        view.dump_services().expect("dump"),
        dp.dump_services().expect("dump")
    );
    let err = lab
        .in_node(|| view.attach_tc("h0"))
        .expect_err("a pins-only handle cannot attach");
    assert!(err.to_string().contains("opened from pins only"), "{err}");
    // Writes through the view land in the live maps.
    view.delete_service(IpAddr::V4(VIP), 80, Proto::Tcp)
        .expect("delete");
    assert!(dp.dump_services().expect("dump").is_empty());
    assert!(
        Datapath::open_pinned(std::path::Path::new("/tmp")).is_err(),
        "not a bpffs"
    );
}
