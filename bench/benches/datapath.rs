//! The agent's hot datapath paths in userspace (no syscalls: skiff-datapath's public planner
//! and Maglev builder), on the 10,000 Services x 10 endpoints:
//! - `endpoint-diff/one-endpoint`: one EndpointSlice change (one endpoint replaced) turned into
//!   map operations by `plan_upsert` against the maps of 10,000 Services, what the proxy does
//!   per EndpointSlice event;
//! - `endpoint-diff/resync-10k`: the same change found by `plan_sync` over all 10,000 desired
//!   Services (a relist);
//! - `endpoint-diff/full-10k`: `plan_sync` of all 10,000 Services into empty maps (the planning
//!   share of a fresh node's first sync; svcbench times the map writes on top);
//! - `maglev/N`: `maglev_table` over N backends at the kernel table size (MAGLEV_M = 1021),
//!   rebuilt per NodePort Service whose endpoints change.
//!
//! After criterion, a ratio pass runs the variants in turns (7 rounds, median) so the ratios come
//! from one stretch of machine time: `cargo bench -p skiff-bench --bench datapath`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use skiff_datapath::nodeport::maglev_table;
use skiff_datapath::plan::{MapState, plan_sync, plan_upsert};
use skiff_datapath::{BackendSpec, Proto, ServiceSpec};
use skiff_ebpf_common::MAGLEV_M;

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;

fn services() -> Vec<ServiceSpec> {
    (0..SERVICES)
        .map(|i| {
            let i = i as u32;
            ServiceSpec {
                // 10.96.0.0/12 holds them all: 10.96.0.1 + i.
                vip: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i)),
                port: 80,
                proto: Proto::Tcp,
                backends: (0..ENDPOINTS as u32)
                    .map(|e| BackendSpec {
                        ip: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i * ENDPOINTS as u32 + e)),
                        port: 8080,
                        ready: true,
                        terminating: false,
                    })
                    .collect(),
                affinity_timeout: None,
                external_traffic_local: false,
            }
        })
        .collect()
}

/// The maps after a full sync of `specs` (built through the planner, as the kernel would hold).
fn state_of(specs: &[ServiceSpec]) -> MapState {
    let mut st = MapState::default();
    for op in plan_sync(specs, &st).expect("valid specs") {
        st.apply(&op);
    }
    st
}

fn changed(specs: &[ServiceSpec]) -> (Vec<ServiceSpec>, usize) {
    let mut out = specs.to_vec();
    let pos = SERVICES / 2 + 7;
    out[pos].backends[3].ip = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 7));
    (out, pos)
}

fn backends(n: usize) -> Vec<(u32, String)> {
    (0..n).map(|i| (i as u32 + 1, format!("10.244.{}.{}:8080", i / 250, i % 250 + 1))).collect()
}

type Variant<'a> = (&'static str, Box<dyn Fn() -> usize + 'a>);

fn bench(c: &mut Criterion) {
    let specs = services();
    let state = state_of(&specs);
    let (desired, pos) = changed(&specs);
    // Checked once outside the timing: the one-endpoint plan touches that Service only, and the
    // resync finds the same change.
    let one = plan_upsert(&desired[pos], &state).expect("plan");
    let resync = plan_sync(&desired, &state).expect("plan");
    assert!(!one.is_empty() && one.len() < 10, "one endpoint change: {one:?}");
    assert_eq!(one.len(), resync.len(), "resync plans the same change: {resync:?}");
    assert!(plan_sync(&specs, &state).expect("plan").is_empty(), "no change, no operations");
    let b10 = backends(10);
    let b100 = backends(100);
    let b1000 = backends(1000);
    assert!(maglev_table(&b10, MAGLEV_M).iter().all(|&id| id >= 1 && id <= 10));

    let variants: Vec<Variant> = vec![
        ("endpoint-diff/one-endpoint", Box::new(|| plan_upsert(black_box(&desired[pos]), black_box(&state)).map_or(0, |o| o.len()))),
        ("endpoint-diff/resync-10k", Box::new(|| plan_sync(black_box(&desired), black_box(&state)).map_or(0, |o| o.len()))),
        ("endpoint-diff/full-10k", Box::new(|| plan_sync(black_box(&specs), black_box(&MapState::default())).map_or(0, |o| o.len()))),
        ("maglev/10", Box::new(|| maglev_table(black_box(&b10), MAGLEV_M).len())),
        ("maglev/100", Box::new(|| maglev_table(black_box(&b100), MAGLEV_M).len())),
        ("maglev/1000", Box::new(|| maglev_table(black_box(&b1000), MAGLEV_M).len())),
    ];

    let mut g = c.benchmark_group("datapath");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for (name, f) in &variants {
        g.throughput(Throughput::Elements(1));
        g.bench_function(*name, |b| b.iter(|| black_box(f())));
    }
    g.finish();

    // The ratio pass: the variants take turns, so machine noise hits them alike.
    let rounds = 7;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, (_, f)) in variants.iter().enumerate() {
            // Enough iterations for ~50 ms per variant and round.
            let t = Instant::now();
            black_box(f());
            let once = t.elapsed().as_secs_f64().max(1e-7);
            let iters = ((0.05 / once) as usize).clamp(1, 100_000);
            let t = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            times[i].push(t.elapsed().as_secs_f64() / iters as f64);
        }
    }
    println!("\nratio pass ({rounds} rounds, median per call):");
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let meds: Vec<f64> = times.iter_mut().map(med).collect();
    for (i, (name, _)) in variants.iter().enumerate() {
        println!("  {name:<28} {:>12.3} us  ({:.0}x one-endpoint)", meds[i] * 1e6, meds[i] / meds[0]);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
