//! NetworkPolicy verdicts in the tc program, with real packets: allow/deny by peer block,
//! protocol and port, ipBlock except, egress isolation, replies of allowed UDP flows, and
//! Service traffic judged after translation (policies name pods, not VIPs).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use skiff_datapath::lab::{Lab, Server, in_netns, require_privileges, tcp_ask, udp_ask};
use skiff_datapath::{
    BackendSpec, Proto, ServiceSpec,
    policy::{PolicyAllow, PolicyDirection},
};

fn block(ip: Ipv4Addr, len: u8) -> PolicyAllow {
    PolicyAllow {
        peer: ip,
        prefix_len: len,
        except: vec![],
        proto: None,
        port: None,
    }
}

#[test]
fn network_policy_allow_and_deny() {
    if !require_privileges("network_policy_allow_and_deny") {
        return;
    }
    let lab = Lab::new("pol", 3);
    let mut dp = lab.datapath();
    let (p0, p1, p2) = (lab.pods[0].ip, lab.pods[1].ip, lab.pods[2].ip);
    let _s1 = Server::start(&lab.pods[1].netns, p1, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, p2, 8080);
    let to_p1 = SocketAddr::from((p1, 8080));
    let vip = Ipv4Addr::new(10, 96, 2, 30);
    dp.upsert_service(&ServiceSpec {
        vip: IpAddr::V4(vip),
        port: 80,
        proto: Proto::Tcp,
        backends: vec![BackendSpec {
            ip: IpAddr::V4(p1),
            port: 8080,
            ready: true,
            terminating: false,
        }],
        affinity_timeout: None,
        external_traffic_local: false,
    })
    .expect("service");
    let via_vip = SocketAddr::from((vip, 80));

    // pod1: ingress isolated, TCP 8080 from pod0 only.
    let mut from_p0_tcp = block(p0, 32);
    from_p0_tcp.proto = Some(Proto::Tcp);
    from_p0_tcp.port = Some(8080);
    dp.set_policy(p1, PolicyDirection::Ingress, true, &[from_p0_tcp.clone()])
        .expect("policy");
    in_netns(&lab.pods[0].netns, || {
        assert_eq!(
            tcp_ask(to_p1).expect("pod0 -> pod1 allowed").0,
            p1.to_string()
        );
        assert_eq!(
            tcp_ask(via_vip).expect("pod0 -> VIP -> pod1 allowed").0,
            p1.to_string()
        );
        assert!(udp_ask(to_p1).is_err(), "udp is not in the allowed ports");
    });
    in_netns(&lab.pods[2].netns, || {
        assert!(tcp_ask(to_p1).is_err(), "pod2 -> pod1 denied");
        assert!(
            tcp_ask(via_vip).is_err(),
            "pod2 -> VIP -> pod1 denied after translation"
        );
    });
    let denied = dp.counters().expect("counters")["policy_denied"];
    assert!(denied >= 3, "drops were policy verdicts: {denied}");

    // Add UDP from the pod /24 except pod2: pod0's UDP works (and its replies come back),
    // pod2's does not.
    let mut udp_block = block(Ipv4Addr::new(10, 244, 1, 0), 24);
    udp_block.proto = Some(Proto::Udp);
    udp_block.port = Some(8080);
    udp_block.except = vec![(p2, 32)];
    dp.set_policy(
        p1,
        PolicyDirection::Ingress,
        true,
        &[from_p0_tcp, udp_block],
    )
    .expect("policy");
    in_netns(&lab.pods[0].netns, || {
        assert_eq!(udp_ask(to_p1).expect("pod0 udp allowed").0, p1.to_string());
    });
    in_netns(&lab.pods[2].netns, || {
        assert!(udp_ask(to_p1).is_err(), "pod2 is the except block")
    });

    // pod0: egress isolated, may only reach pod1.
    dp.set_policy(p0, PolicyDirection::Egress, true, &[block(p1, 32)])
        .expect("egress policy");
    in_netns(&lab.pods[0].netns, || {
        assert!(tcp_ask(to_p1).is_ok(), "egress to pod1 allowed");
        assert!(
            tcp_ask(SocketAddr::from((p2, 8080))).is_err(),
            "egress to pod2 denied"
        );
    });

    // Lifting isolation opens everything again.
    dp.set_policy(p1, PolicyDirection::Ingress, false, &[])
        .expect("policy off");
    in_netns(&lab.pods[2].netns, || {
        assert!(
            tcp_ask(to_p1).is_ok(),
            "pod2 -> pod1 after isolation lifted"
        )
    });
    // Bad input changes nothing and says why.
    let err = dp
        .set_policy(
            Ipv4Addr::new(10, 9, 9, 9),
            PolicyDirection::Ingress,
            true,
            &[],
        )
        .expect_err("unknown pod");
    assert!(err.to_string().contains("upsert_endpoint"), "{err}");
}
