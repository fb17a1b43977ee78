//! 10,000 Services with 100,000 endpoints programmed into the maps, answering with real packets,
//! and an incremental change touching only what changed.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Instant,
};

use skiff_datapath::lab::{Lab, Server, in_netns, require_privileges, tcp_ask};
use skiff_datapath::{BackendSpec, Datapath, MapOp, Proto, ServiceSpec};

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 256) as u8, (i % 256) as u8)
}

/// Two real, ready endpoints (pod1, pod2) and eight that are not ready (programmed, no new flows).
fn service(lab: &Lab, i: usize) -> ServiceSpec {
    let mut backends: Vec<BackendSpec> = [1, 2]
        .iter()
        .map(|&p| BackendSpec {
            ip: IpAddr::V4(lab.pods[p].ip),
            port: 8080,
            ready: true,
            terminating: false,
        })
        .collect();
    for k in 0..ENDPOINTS_PER_SERVICE - 2 {
        backends.push(BackendSpec {
            ip: IpAddr::V4(Ipv4Addr::new(10, 244, 2, 1 + k as u8)),
            port: 9000 + (i % 1000) as u16,
            ready: false,
            terminating: false,
        });
    }
    ServiceSpec {
        vip: IpAddr::V4(vip(i)),
        port: 80,
        proto: Proto::Tcp,
        backends,
        affinity_timeout: None,
        external_traffic_local: false,
    }
}

#[test]
fn ten_thousand_services_with_a_hundred_thousand_endpoints() {
    if !require_privileges("ten_thousand_services_with_a_hundred_thousand_endpoints") {
        return;
    }
    let lab = Lab::new("scale", 3);
    let mut dp = lab.datapath();
    let _s1 = Server::start(&lab.pods[1].netns, lab.pods[1].ip, 8080);
    let _s2 = Server::start(&lab.pods[2].netns, lab.pods[2].ip, 8080);
    let specs: Vec<ServiceSpec> = (0..SERVICES).map(|i| service(&lab, i)).collect();

    // The pure plan alone (what the full sync below spends before its first syscall).
    let t = Instant::now();
    let planned = skiff_datapath::plan::plan_sync(&specs, dp.cached_state()).expect("plan");
    let plan_only = t.elapsed();
    let t = Instant::now();
    let ops = dp.sync_services(&specs).expect("programming 10k services");
    let full = t.elapsed();
    assert_eq!(planned, ops, "the sync applied what was planned");
    eprintln!("plan alone: {} operations in {plan_only:?}", planned.len());
    let st = dp.map_state().expect("state");
    assert_eq!(st.services.len(), SERVICES);
    assert_eq!(st.backends.len(), SERVICES * ENDPOINTS_PER_SERVICE);
    assert_eq!(
        st.slots.len(),
        SERVICES * 2,
        "only ready endpoints have slots"
    );
    assert_eq!(&st, dp.cached_state(), "the cache matches the kernel maps");
    eprintln!(
        "programmed {SERVICES} services / {} endpoints: {} map operations in {full:?}",
        st.backends.len(),
        ops.len()
    );

    // Services spread over the whole table answer.
    let sample: Vec<usize> = (0..20).map(|k| k * (SERVICES / 20) + k).collect();
    let answers = in_netns(&lab.pods[0].netns, || {
        sample
            .iter()
            .map(|&i| tcp_ask(SocketAddr::from((vip(i), 80))).expect("service answers"))
            .collect::<Vec<_>>()
    });
    for (who, peer) in &answers {
        assert!(who == &lab.pods[1].ip.to_string() || who == &lab.pods[2].ip.to_string());
        assert_eq!(peer.port(), 80);
    }

    // One endpoint of one service becomes ready: a handful of operations, not a resync.
    let mut changed = specs[4242].clone();
    changed.backends[2].ready = true;
    let t = Instant::now();
    let ops = dp.upsert_service(&changed).expect("incremental update");
    let incremental = t.elapsed();
    eprintln!("incremental update: {ops:?} in {incremental:?}");
    assert_eq!(
        ops.len(),
        3,
        "backend state, one new slot, the count: {ops:?}"
    );
    assert!(matches!(ops[0], MapOp::PutBackend { .. }));
    // The same desired set again changes nothing.
    let mut again = specs.clone();
    again[4242] = changed;
    assert!(dp.sync_services(&again).expect("resync").is_empty());

    // A restarted agent plans against the same maps and finds nothing to do.
    drop(dp);
    let mut dp2 = Datapath::load(&lab.pin_dir).expect("reload");
    assert!(
        dp2.sync_services(&again)
            .expect("resync after restart")
            .is_empty()
    );
}

/// The bench's programming-time shape (svcbench `programming`): 10,000 Services x 10 endpoints,
/// every one ready (so 100,000 slots too), into freshly loaded maps. Prints the pure plan and
/// the whole sync so a run can be compared with bench/results; asserts only what must hold (the
/// maps are the plan), since a time bound would flake on a shared machine.
#[test]
fn programming_time_ten_thousand_services_all_ready() {
    if !require_privileges("programming_time_ten_thousand_services_all_ready") {
        return;
    }
    let lab = Lab::new("scaleprog", 0);
    let mut dp = lab.datapath();
    let specs: Vec<ServiceSpec> = (0..SERVICES)
        .map(|i| ServiceSpec {
            vip: IpAddr::V4(vip(i)),
            port: 80,
            proto: Proto::Tcp,
            backends: (0..ENDPOINTS_PER_SERVICE)
                .map(|k| BackendSpec {
                    ip: IpAddr::V4(Ipv4Addr::new(10, 244, (k + 1) as u8, (i % 250) as u8 + 1)),
                    port: 8080 + (i / 250) as u16,
                    ready: true,
                    terminating: false,
                })
                .collect(),
            affinity_timeout: None,
            external_traffic_local: false,
        })
        .collect();
    let (t, c) = (Instant::now(), thread_cpu());
    let planned = skiff_datapath::plan::plan_sync(&specs, dp.cached_state()).expect("plan");
    let (plan_only, plan_cpu) = (t.elapsed(), thread_cpu() - c);
    let (t, c) = (Instant::now(), thread_cpu());
    let ops = dp.sync_services(&specs).expect("programming");
    let (full, full_cpu) = (t.elapsed(), thread_cpu() - c);
    assert_eq!(planned, ops);
    let st = dp.map_state().expect("state");
    assert_eq!(st.services.len(), SERVICES);
    assert_eq!(st.backends.len(), SERVICES * ENDPOINTS_PER_SERVICE);
    assert_eq!(st.slots.len(), SERVICES * ENDPOINTS_PER_SERVICE);
    assert_eq!(&st, dp.cached_state(), "the cache matches the kernel maps");
    eprintln!(
        "all-ready: {} operations; plan alone {plan_only:?} (cpu {plan_cpu:?}); sync_services (plan + writes) {full:?} (cpu {full_cpu:?})",
        ops.len()
    );
}

/// This thread's CPU time, user and kernel (its syscalls' work included): on a machine shared
/// with other builds, wall time mostly measures the others.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
