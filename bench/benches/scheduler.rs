//! The scheduler's decision core: 1,000 pods scheduled one by one onto 100 nodes, each bound with
//! `assume()` before the next (as the scheduler loop does), starting from a copy of the empty
//! snapshot each run. The pods are a mix: 400 plain, 300 with requests, 150 with required
//! hostname anti-affinity (3 apps x 50), 150 with a DoNotSchedule zone spread (maxSkew 1) and
//! requests. Variants, measured in the same run:
//! - `default`: every default plugin (kube-scheduler 1.32's default profile, skiff's subset);
//! - `baseline/fit-only`: the same loop with only NodeResourcesFit (filter + LeastAllocated), the
//!   cost of the loop and the snapshot bookkeeping without the affinity/spread/taint plugins;
//! - `baseline/assume-only`: no scheduling at all, pods assumed round-robin: parsing the pods and
//!   the snapshot copy.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{Node, Pod};
use skiff_scheduler::fixtures::{HOSTNAME, ZONE, labels, node, pod, term};
use skiff_scheduler::plugins::NodeResourcesFit;
use skiff_scheduler::{ClusterSnapshot, PodInfo, Scheduler};

const NODES: usize = 100;

/// A named variant of the measured loop; returns how many pods it placed.
type Variant<'a> = (&'static str, Box<dyn Fn() -> usize + 'a>);
const PODS: usize = 1000;

fn nodes() -> Vec<Node> {
    (0..NODES)
        .map(|i| {
            node(&format!("node-{i:03}"))
                .zone(&format!("zone-{}", i % 5))
                .allocatable("32", "128Gi", 110)
                .build()
        })
        .collect()
}

fn pods() -> Vec<Pod> {
    (0..PODS)
        .map(|i| {
            let name = format!("pod-{i:04}");
            let base = pod("bench", &name).uid(&format!("uid-{i:04}"));
            match i % 20 {
                // 8 in 20 plain.
                0..=7 => base.label("app", "plain").build(),
                // 6 in 20 with requests.
                8..=13 => base
                    .label("app", "sized")
                    .request(["100m", "250m", "500m"][i % 3], ["128Mi", "256Mi", "1Gi"][i % 3])
                    .build(),
                // 3 in 20 with hostname anti-affinity within their app (3 apps of 50).
                14..=16 => {
                    let app = format!("solo-{}", i % 3);
                    base.label("app", &app)
                        .request("100m", "128Mi")
                        .pod_anti_affinity(term(labels(&[("app", &app)]), HOSTNAME))
                        .build()
                }
                // 3 in 20 spread over zones.
                _ => base
                    .label("app", "spread")
                    .request("200m", "256Mi")
                    .spread(1, ZONE, labels(&[("app", "spread")]), true)
                    .build(),
            }
        })
        .collect()
}

/// Schedules every pod in order onto a copy of `empty`, assuming each; returns how many were
/// placed.
fn run(scheduler: &Scheduler, empty: &ClusterSnapshot, pods: &[Pod]) -> usize {
    let mut snapshot = empty.clone();
    let mut placed = 0;
    for p in pods {
        let info = PodInfo::new(p);
        if let Ok(result) = scheduler.schedule_info(&info, &snapshot)
            && snapshot.assume_info(info, &result.node).is_ok()
        {
            placed += 1;
        }
    }
    black_box(snapshot.pod_count());
    placed
}

/// The assume-only baseline: round-robin placement, no filters or scores.
fn run_assume_only(empty: &ClusterSnapshot, pods: &[Pod]) -> usize {
    let mut snapshot = empty.clone();
    let names: Vec<String> = snapshot.nodes().iter().map(|n| n.name.clone()).collect();
    for (i, p) in pods.iter().enumerate() {
        let _ = snapshot.assume_info(PodInfo::new(p), &names[i % names.len()]);
    }
    black_box(snapshot.pod_count())
}

fn fit_only() -> Scheduler {
    Scheduler::new()
        .with_filter(Box::new(NodeResourcesFit))
        .with_score(Box::new(NodeResourcesFit), 1)
}

fn scheduler_benches(c: &mut Criterion) {
    let empty = ClusterSnapshot::new(&nodes(), &[]);
    let pods = pods();
    let default = Scheduler::default_plugins();
    let fit = fit_only();
    // Check once, outside the timing, that the workload schedules completely.
    assert_eq!(run(&default, &empty, &pods), PODS);
    assert_eq!(run(&fit, &empty, &pods), PODS);

    let mut group = c.benchmark_group("scheduler/1000-pods-100-nodes");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(PODS as u64));
    group.bench_function("default", |b| b.iter(|| run(&default, &empty, &pods)));
    group.bench_function("baseline/fit-only", |b| b.iter(|| run(&fit, &empty, &pods)));
    group.bench_function("baseline/assume-only", |b| b.iter(|| run_assume_only(&empty, &pods)));
    group.finish();
}

/// Pods per second for each variant and the ratio to the fit-only baseline, all measured in this
/// run: 7 rounds, the variants taking turns within each round so load from other processes hits
/// them alike; the median round counts.
fn ratios(_: &mut Criterion) {
    const ROUNDS: usize = 7;
    let empty = ClusterSnapshot::new(&nodes(), &[]);
    let pods = pods();
    let default = Scheduler::default_plugins();
    let fit = fit_only();
    let variants: [Variant<'_>; 3] = [
        ("default", Box::new(|| run(&default, &empty, &pods))),
        ("baseline/fit-only", Box::new(|| run(&fit, &empty, &pods))),
        ("baseline/assume-only", Box::new(|| run_assume_only(&empty, &pods))),
    ];
    let mut rounds: Vec<Vec<Duration>> = vec![Vec::with_capacity(ROUNDS); variants.len()];
    for _ in 0..ROUNDS {
        for (i, (_, variant)) in variants.iter().enumerate() {
            let started = Instant::now();
            black_box(variant());
            rounds[i].push(started.elapsed());
        }
    }
    let medians: Vec<Duration> = rounds
        .iter_mut()
        .map(|r| {
            r.sort();
            r[ROUNDS / 2]
        })
        .collect();
    let baseline = medians[1].as_secs_f64().max(f64::MIN_POSITIVE);
    println!("\nscheduler: {PODS} pods one by one onto {NODES} nodes, median of {ROUNDS} rounds:");
    for ((name, _), median) in variants.iter().zip(&medians) {
        let secs = median.as_secs_f64().max(f64::MIN_POSITIVE);
        println!(
            "  {name:<22} {median:>10.1?} per 1000 pods  {:>9.0} pods/s  {:.2}x fit-only time",
            PODS as f64 / secs,
            secs / baseline
        );
    }
}

criterion_group!(benches, scheduler_benches, ratios);
criterion_main!(benches);
