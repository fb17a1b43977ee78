//! Targets, the markdown table and the SVG charts for a [`Record`].

use std::{fmt::Write, path::Path};

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    run::{PathResult, Record},
    workload::Measurement,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub scale: usize,
    /// The measured ratio (or seconds, for the absolute target).
    pub measured: Option<f64>,
    pub threshold: String,
    /// None when it could not be measured (a path failed or was not run).
    pub met: Option<bool>,
    pub detail: String,
}

fn find<'a>(r: &'a Record, scale: usize, path: &str) -> Option<&'a PathResult> {
    r.paths
        .iter()
        .find(|p| p.scale == scale && p.path == path && p.error.is_none())
}

fn meas<'a>(r: &'a Record, scale: usize, path: &str, workload: &str) -> Option<&'a Measurement> {
    find(r, scale, path)?
        .measurements
        .iter()
        .find(|m| m.workload == workload && m.transactions > 0)
}

/// The scale targets are judged at: 10,000 if measured, else the largest measured.
pub fn target_scale(r: &Record) -> Option<usize> {
    if r.scales.contains(&10_000) {
        Some(10_000)
    } else {
        r.scales.iter().copied().max()
    }
}

/// The TCP_CRR workload targets use: the parallel one if run, else the single one.
fn crr_name(r: &Record) -> String {
    r.workloads
        .iter()
        .find(|w| w.starts_with("crr_x"))
        .or_else(|| r.workloads.iter().find(|w| *w == "crr"))
        .cloned()
        .unwrap_or_else(|| "crr".into())
}

fn best_direct<'a>(r: &'a Record, scale: usize, wl: &str, higher_is_better: bool, f: impl Fn(&Measurement) -> f64) -> Option<(f64, &'static str)> {
    let c: Vec<(f64, &'static str)> = ["direct", "skiff-direct"]
        .into_iter()
        .filter_map(|p| meas(r, scale, p, wl).map(|m| (f(m), p)))
        .filter(|(v, _)| *v > 0.0)
        .collect();
    c.into_iter().reduce(|a, b| {
        if (b.0 > a.0) == higher_is_better { b } else { a }
    })
}

fn step_seconds(r: &Record, system: &str, step: &str) -> Option<f64> {
    r.programming
        .as_ref()?
        .steps
        .iter()
        .find(|s| s.system == system && s.step == step)?
        .seconds
}

/// Judges the issue's targets against this run. Where a direct path is the reference, the faster
/// of `direct` (plain routing) and `skiff-direct` (pod IP over skiff's tc redirect) is used, so a
/// target is never met by comparing against the slower baseline.
pub fn evaluate(r: &Record) -> Vec<Target> {
    let mut out = Vec::new();
    let Some(scale) = target_scale(r) else {
        return out;
    };
    let crr = crr_name(r);
    for path in ["skiff-sock", "skiff-tc"] {
        let rate = meas(r, scale, path, &crr).map(|m| m.rate);
        let direct = best_direct(r, scale, &crr, true, |m| m.rate);
        let nft = meas(r, scale, "iptables-nft", &crr).map(|m| m.rate);
        out.push(ratio_target(
            format!("ClusterIP TCP_CRR ({crr}) through {path} >= 0.95x direct"),
            scale,
            rate.zip(direct.map(|d| d.0)).map(|(a, b)| a / b),
            ">= 0.95",
            |x| x >= 0.95,
            format!("{path} {} conn/s vs {} {} conn/s", fmt_opt(rate), direct.map(|d| d.1).unwrap_or("direct"), fmt_opt(direct.map(|d| d.0))),
        ));
        out.push(ratio_target(
            format!("ClusterIP TCP_CRR ({crr}) through {path} >= 2.5x iptables-nft"),
            scale,
            rate.zip(nft).map(|(a, b)| a / b),
            ">= 2.5",
            |x| x >= 2.5,
            format!("{path} {} conn/s vs iptables-nft {} conn/s", fmt_opt(rate), fmt_opt(nft)),
        ));
        let p99 = meas(r, scale, path, "rr").map(|m| m.p99_us);
        let dp99 = best_direct(r, scale, "rr", false, |m| m.p99_us);
        out.push(ratio_target(
            format!("TCP_RR p99 through {path} <= 1.1x direct"),
            scale,
            p99.zip(dp99.map(|d| d.0)).map(|(a, b)| a / b),
            "<= 1.1",
            |x| x <= 1.1,
            format!("{path} {} us vs {} {} us", fmt_opt(p99), dp99.map(|d| d.1).unwrap_or("direct"), fmt_opt(dp99.map(|d| d.0))),
        ));
        let g = meas(r, scale, path, "stream").map(|m| m.gbit_s);
        let dg = best_direct(r, scale, "stream", true, |m| m.gbit_s);
        out.push(ratio_target(
            format!("TCP_STREAM through {path} >= 0.95x direct"),
            scale,
            g.zip(dg.map(|d| d.0)).map(|(a, b)| a / b),
            ">= 0.95",
            |x| x >= 0.95,
            format!("{path} {} Gbit/s vs {} {} Gbit/s", fmt_opt(g), dg.map(|d| d.1).unwrap_or("direct"), fmt_opt(dg.map(|d| d.0))),
        ));
    }
    for iv in r.interleaved.iter().filter(|iv| iv.scale == scale) {
        let Some((reference, _)) = iv.series.first() else { continue };
        for (path, _) in iv.series.iter().skip(1) {
            let rs = interleaved_ratios(iv, path);
            let med = median(&rs);
            out.push(Target {
                name: format!("(interleaved, one lab) ClusterIP TCP_CRR ({}) through {path} >= 0.95x {reference}", iv.workload),
                scale,
                measured: med,
                threshold: "(reference) >= 0.95".into(),
                met: med.map(|m| m >= 0.95),
                detail: format!(
                    "median of {} per-round ratios ({}; {} rounds with an error left out), rounds of {:.1} s alternating {}",
                    rs.len(),
                    rs.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", "),
                    iv.series.first().map_or(0, |(_, v)| v.len()) - rs.len(),
                    iv.round_s,
                    iv.series.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>().join(" / ")
                ),
            });
        }
    }
    if let Some(p) = &r.programming {
        let skiff = step_seconds(r, "skiff", "one-endpoint");
        for sys in ["iptables-legacy", "iptables-nft"] {
            let full = step_seconds(r, sys, "one-endpoint-full-restore");
            // A full restore that did not finish within the bound is at least that slow.
            let timed_out = full.is_none()
                && p.steps.iter().any(|s| {
                    s.system == sys && s.step == "full" && s.error.as_deref().is_some_and(|e| e.contains("did not finish"))
                });
            let (value, shown) = match full {
                Some(f) => (Some(f), fmt_s(Some(f))),
                None if timed_out => (Some(r.program_timeout_s), format!("> {} (did not finish; the ratio is a lower bound)", fmt_s(Some(r.program_timeout_s)))),
                None => (None, "n/a".into()),
            };
            out.push(ratio_target(
                format!("one endpoint change: skiff >= 50x faster than a full {sys} restore"),
                p.services,
                value.zip(skiff).map(|(a, b)| a / b),
                ">= 50",
                |x| x >= 50.0,
                format!("skiff {} vs {sys}-restore --noflush {shown}", fmt_s(skiff)),
            ));
            let partial = step_seconds(r, sys, "one-endpoint-partial");
            out.push(Target {
                name: format!("(for reference) one endpoint change: skiff vs kube-proxy >= 1.28 partial {sys} restore"),
                scale: p.services,
                measured: partial.zip(skiff).map(|(a, b)| a / b),
                threshold: "(reference) >= 50".into(),
                met: partial.zip(skiff).map(|(a, b)| a / b >= 50.0),
                detail: format!("skiff {} vs partial restore {}", fmt_s(skiff), fmt_s(partial)),
            });
        }
        let full = step_seconds(r, "skiff", "full");
        out.push(Target {
            name: format!("{} Services ({} endpoints) programmed into skiff's maps < 100 ms", p.services, p.endpoints),
            scale: p.services,
            measured: full,
            threshold: "< 0.100 s".into(),
            met: full.map(|s| s < 0.1),
            detail: format!("{}; plan alone {}", fmt_s(full), fmt_s(step_seconds(r, "skiff", "plan"))),
        });
    }
    out
}

/// `path`'s rate over the reference's (the first series), round by round. Rounds where either
/// had an error (a lost SYN stalls a CRR client for a 1 s retransmit, which swamps a short round)
/// are left out; the report lists them.
pub fn interleaved_ratios(iv: &super::run::Interleaved, path: &str) -> Vec<f64> {
    let (Some((ref_name, reference)), Some((_, series))) = (iv.series.first(), iv.series.iter().find(|(p, _)| p == path)) else {
        return vec![];
    };
    let failed = |round: usize, p: &str| iv.errors.iter().any(|e| e.starts_with(&format!("round {round} {p}:")));
    reference
        .iter()
        .zip(series)
        .enumerate()
        .filter(|(i, (a, b))| **a > 0.0 && **b > 0.0 && !failed(*i, ref_name) && !failed(*i, path))
        .map(|(_, (a, b))| b / a)
        .collect()
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

fn ratio_target(name: String, scale: usize, measured: Option<f64>, threshold: &str, ok: impl Fn(f64) -> bool, detail: String) -> Target {
    Target {
        name,
        scale,
        measured,
        threshold: threshold.into(),
        met: measured.map(ok),
        detail,
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(fmt_num).unwrap_or_else(|| "n/a".into())
}

fn fmt_s(v: Option<f64>) -> String {
    match v {
        Some(s) if s < 1.0 => format!("{:.2} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
        None => "n/a".into(),
    }
}

/// An integer with thousands separators.
pub fn fmt_int(v: usize) -> String {
    fmt_num(v as f64).trim_end_matches(".00").to_string()
}

/// Thousands separators for rates; two decimals for small values.
pub fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let n = v.round() as i64;
        let s = n.abs().to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 { format!("-{out}") } else { out }
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

const CLUSTERIP_PATHS: [&str; 7] = [
    "direct",
    "skiff-direct",
    "skiff-sock",
    "skiff-tc",
    "iptables-legacy",
    "iptables-nft",
    "nftables",
];
const NODEPORT_PATHS: [&str; 5] = [
    "np-direct",
    "np-skiff-xdp",
    "np-iptables-legacy",
    "np-iptables-nft",
    "np-nftables",
];

#[derive(Clone, Copy)]
enum Metric {
    Rate,
    P99,
    Gbit,
}

impl Metric {
    fn of(self, m: &Measurement) -> f64 {
        match self {
            Metric::Rate => m.rate,
            Metric::P99 => m.p99_us,
            Metric::Gbit => m.gbit_s,
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Metric::Rate => "transactions/s",
            Metric::P99 => "p99 latency, us (lower is better)",
            Metric::Gbit => "Gbit/s",
        }
    }
}

fn metric_for(workload: &str) -> Metric {
    if workload == "stream" { Metric::Gbit } else { Metric::Rate }
}

fn title(workload: &str) -> String {
    let (base, par) = match workload.rsplit_once("_x") {
        Some((b, n)) => (b, format!(", {n} clients in parallel")),
        None => (workload, String::new()),
    };
    let name = match base {
        "crr" => "TCP_CRR (connect, 1 byte each way, close)",
        "rr" => "TCP_RR (1 byte each way on one connection)",
        "stream" => "TCP_STREAM (one connection, 128 KiB writes)",
        "udp_rr" => "UDP_RR (1 byte each way, connected socket)",
        other => other,
    };
    format!("{name}{par}")
}

fn family_table(r: &Record, s: &mut String, family: &str, paths: &[&str], direct: &str, iptables: &str) {
    let present: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| r.paths.iter().any(|x| x.path == *p))
        .collect();
    if present.is_empty() {
        return;
    }
    for wl in &r.workloads {
        let metric = metric_for(wl);
        let _ = writeln!(s, "\n### {family}: {}\n", title(wl));
        let unit = match metric {
            Metric::Gbit => "Gbit/s",
            _ => "per second; p50 / p99 us",
        };
        let _ = writeln!(
            s,
            "Each cell: {unit} (x {direct}, x {iptables}, same scale, same run).\n"
        );
        let _ = write!(s, "| path |");
        for sc in &r.scales {
            let _ = write!(s, " {} Services |", fmt_int(*sc));
        }
        let _ = write!(s, "\n|---|");
        for _ in &r.scales {
            let _ = write!(s, "---:|");
        }
        s.push('\n');
        for p in &present {
            let _ = write!(s, "| {p} |");
            for &sc in &r.scales {
                let cell = match (find(r, sc, p), r.paths.iter().find(|x| x.scale == sc && x.path == *p)) {
                    (_, None) => "-".to_string(),
                    (None, Some(x)) => format!("failed: {}", x.error.clone().unwrap_or_default().chars().take(80).collect::<String>()),
                    (Some(x), _) => match x.measurements.iter().find(|m| m.workload == *wl) {
                        None => "-".into(),
                        Some(m) if m.transactions == 0 => format!("no answer ({})", m.first_error.clone().unwrap_or_default()),
                        Some(m) => {
                            let v = metric.of(m);
                            let ratio = |other: &str| {
                                meas(r, sc, other, wl)
                                    .map(|o| metric.of(o))
                                    .filter(|o| *o > 0.0)
                                    .map(|o| format!("{:.2}", v / o))
                                    .unwrap_or_else(|| "-".into())
                            };
                            let lat = match metric {
                                Metric::Gbit => String::new(),
                                _ => format!(" ({} / {})", fmt_num(m.p50_us), fmt_num(m.p99_us)),
                            };
                            let err = if m.errors > 0 { format!(", {} errors", m.errors) } else { String::new() };
                            format!("{}{lat} x{} x{}{err}", fmt_num(v), ratio(direct), ratio(iptables))
                        }
                    },
                };
                let _ = write!(s, " {cell} |");
            }
            s.push('\n');
        }
    }
}

/// The markdown report.
pub fn markdown(r: &Record) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# Services: skiff's eBPF datapath against kube-proxy's iptables and nftables modes\n");
    let _ = writeln!(s, "Command: `{}`\n", r.command);
    let _ = writeln!(
        s,
        "Machine: nproc {}, {}, {} MB, kernel {}; {}; measured {} (load average before: {}); run took {:.0} s.\n",
        m.nproc, m.cpu, m.memory_mb, m.kernel, m.tools.join(", "), r.date, m.load_before, r.elapsed_s
    );
    let _ = writeln!(
        s,
        "Setup: one netns lab per datapath and scale (node namespace, client pod, {} server pods, an external client on the node's uplink), \
         built fresh, the Services installed before measuring. Each scale has that many Services with {} endpoints each; {} of them \
         (spread evenly, so iptables walks KUBE-SERVICES to a different depth for each) are the probes the clients connect to, with \
         real endpoints (the server pods' ports); every other endpoint is a valid, never-routed address. \
         Same client and server programs for every path (`svcbench client|server`), {} s per workload, warm-up excluded; {}. \
         Ratios compare paths measured in the same run at the same scale; absolute numbers on this shared 2-core VM are noisy, \
         the ratios are the result.\n",
        r.servers, r.endpoints_per_service, r.probes, r.duration_s,
        match r.pin {
            Some((c, sv)) => format!("clients pinned to CPU {c}, servers to CPU {sv}"),
            None => "no CPU pinning".into(),
        }
    );
    let _ = writeln!(s, "Paths: `direct` pod IP with no rules (node routing); `skiff-direct` pod IP over skiff's tc program \
        (bpf_redirect_peer); `skiff-sock` ClusterIP through skiff's cgroup connect4/sendmsg4 layer (client in the attached cgroup); \
        `skiff-tc` ClusterIP through skiff's tc layer (socket layer not attached for the client); `iptables-legacy` / `iptables-nft` \
        kube-proxy iptables-mode rules restored with iptables-legacy-restore / iptables-nft-restore; `nftables` kube-proxy \
        nftables-mode rules with nft -f. `np-*`: NodePort from a client outside the node: `np-direct` routed to the pod IP, \
        `np-skiff-xdp` skiff's XDP program on the uplink, `np-iptables-*` / `np-nftables` kube-proxy's NodePort rules. The \
        external client has transmit checksum offload off (what skiff's XDP needs, as from a real NIC), so TSO is off on that \
        side for every np- path.\n");

    if !r.targets.is_empty() {
        let _ = writeln!(s, "## Targets\n\n| target | at | measured | threshold | result | detail |\n|---|---:|---:|---|---|---|");
        for t in &r.targets {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                t.name,
                fmt_int(t.scale),
                t.measured.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into()),
                t.threshold,
                match t.met {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "not measured",
                },
                t.detail
            );
        }
    }

    for iv in &r.interleaved {
        let _ = writeln!(
            s,
            "\n## Interleaved rounds in skiff's lab ({} Services, {}, {:.1} s per round)\n\n\
             The paths above are measured one after the other, and `direct` in another lab; on this shared machine the rate of one \
             and the same path drifts by 15% or more between such runs (see `direct` across scales, which no rule affects). Here \
             skiff's paths in one lab take turns in short rounds (the order rotates each round), so drift hits them alike; the \
             ratio is taken per round against `{}` (pod IP over skiff's tc program, the same client and servers).\n",
            fmt_int(iv.scale),
            iv.workload,
            iv.round_s,
            iv.series.first().map(|(p, _)| p.as_str()).unwrap_or("?")
        );
        let _ = write!(s, "| path |");
        let rounds = iv.series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
        for i in 0..rounds {
            let _ = write!(s, " round {i} |");
        }
        let _ = writeln!(s, " median ratio |");
        let _ = writeln!(s, "|---|{}---:|", "---:|".repeat(rounds));
        for (path, v) in &iv.series {
            let _ = write!(s, "| {path} |");
            for x in v {
                let _ = write!(s, " {} |", fmt_num(*x));
            }
            let ratio = if Some(path) == iv.series.first().map(|(p, _)| p) { Some(1.0) } else { median(&interleaved_ratios(iv, path)) };
            let _ = writeln!(s, " {} |", ratio.map(|x| format!("x{x:.3}")).unwrap_or_else(|| "-".into()));
        }
        for e in &iv.errors {
            let _ = writeln!(s, "\n- {e}");
        }
    }

    let _ = writeln!(s, "\n## ClusterIP: client in a pod");
    family_table(r, &mut s, "ClusterIP", &CLUSTERIP_PATHS, "direct", "iptables-nft");
    let _ = writeln!(s, "\n## NodePort: client outside the node");
    family_table(r, &mut s, "NodePort", &NODEPORT_PATHS, "np-direct", "np-iptables-nft");

    let _ = writeln!(s, "\n## Install time of each scale (s: skiff map sync incl. NodePorts; one plain iptables-restore into the empty node netns; nft -f)\n");
    let _ = write!(s, "| datapath |");
    for sc in &r.scales {
        let _ = write!(s, " {} |", fmt_int(*sc));
    }
    let _ = write!(s, "\n|---|");
    for _ in &r.scales {
        let _ = write!(s, "---:|");
    }
    s.push('\n');
    for p in ["skiff-sock", "iptables-legacy", "iptables-nft", "nftables"] {
        let _ = write!(s, "| {} |", p.trim_end_matches("-sock"));
        for &sc in &r.scales {
            let x = r.paths.iter().find(|x| x.scale == sc && x.path == p);
            let cell = match x {
                None => "-".into(),
                Some(x) => match (x.install_s, &x.error) {
                    (Some(v), _) => format!("{v:.3}"),
                    (None, Some(e)) => format!("failed: {}", e.chars().take(60).collect::<String>()),
                    _ => "-".into(),
                },
            };
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }

    if let Some(p) = &r.programming {
        let _ = writeln!(
            s,
            "\n## Programming time: {} Services, {} endpoints, then one endpoint changed\n\n| system | step | time | detail |\n|---|---|---:|---|",
            fmt_int(p.services),
            fmt_int(p.endpoints)
        );
        for st in &p.steps {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                st.system,
                st.step,
                fmt_s(st.seconds),
                st.error.clone().map(|e| format!("failed: {e}")).unwrap_or_else(|| st.detail.clone())
            );
        }
    }

    let missed: Vec<&Target> = r.targets.iter().filter(|t| t.met == Some(false)).collect();
    if !r.profiles.is_empty() {
        let _ = writeln!(s, "\n## Profiles\n\n`perf record -a -F 999` over the whole machine during one extra run of the TCP_CRR workload; \
            flat profile by symbol (`perf report --no-children --sort symbol`, entries >= 1.5%). {} target(s) missed in this run; \
            these show where the time goes on each path.\n", missed.len());
        for pr in &r.profiles {
            let _ = writeln!(s, "### {} ({}, {} Services)\n", pr.path, pr.workload, fmt_int(pr.scale));
            match &pr.error {
                Some(e) => {
                    let _ = writeln!(s, "perf failed: {e}\n");
                }
                None => {
                    let _ = writeln!(s, "```\n{}\n```\n", pr.top.join("\n"));
                }
            }
        }
    }
    if !r.notes.is_empty() || r.paths.iter().any(|p| p.note.is_some()) {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &r.paths {
            if let Some(n) = &p.note
                && seen.insert((p.scale, p.backend.name(), n.clone()))
            {
                let _ = writeln!(s, "- {} at {} Services: {n}", p.backend.name(), fmt_int(p.scale));
            }
        }
    }
    s
}

fn color_of(path: &str) -> RGBColor {
    match path.trim_start_matches("np-") {
        "direct" => RGBColor(90, 90, 90),
        "skiff-direct" => RGBColor(150, 150, 150),
        "skiff-sock" => RGBColor(31, 119, 180),
        "skiff-tc" => RGBColor(100, 170, 230),
        "skiff-xdp" => RGBColor(31, 119, 180),
        "iptables-legacy" => RGBColor(214, 39, 40),
        "iptables-nft" => RGBColor(255, 127, 14),
        "nftables" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

/// One grouped bar chart: a group per scale, a bar per path.
fn chart(r: &Record, file: &Path, caption: &str, paths: &[&str], workload: &str, metric: Metric) -> anyhow::Result<()> {
    let present: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| r.scales.iter().any(|&sc| meas(r, sc, p, workload).is_some()))
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    let value = |sc: usize, p: &str| meas(r, sc, p, workload).map(|m| metric.of(m)).unwrap_or(0.0);
    let ymax = r
        .scales
        .iter()
        .flat_map(|&sc| present.iter().map(move |p| (sc, *p)))
        .map(|(sc, p)| value(sc, p))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let root = SVGBackend::new(file, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = r.scales.len() as f64;
    let mut c = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(10)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n, -ymax * 0.08..ymax * 1.12)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|_| String::new())
        .y_desc(metric.unit())
        .y_label_formatter(&|v| if *v < 0.0 { String::new() } else { fmt_num(*v) })
        .draw()?;
    let width = 0.8 / present.len() as f64;
    for (k, p) in present.iter().enumerate() {
        let color = color_of(p);
        let bars: Vec<Rectangle<(f64, f64)>> = r
            .scales
            .iter()
            .enumerate()
            .map(|(i, &sc)| {
                let x0 = i as f64 + 0.1 + k as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, value(sc, p))], color.filled())
            })
            .collect();
        c.draw_series(bars)?
            .label(*p)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    c.draw_series(r.scales.iter().enumerate().map(|(i, sc)| {
        Text::new(
            format!("{} Services", fmt_int(*sc)),
            (i as f64 + 0.4, -ymax * 0.03),
            ("sans-serif", 14),
        )
    }))?;
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes `<stem>.json`, `<stem>.md` and `<stem>-<family>-<workload>.svg` into `dir`. Returns the
/// files written.
pub fn write_all(r: &Record, dir: &Path, stem: &str) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    let json = dir.join(format!("{stem}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(r)? + "\n")?;
    files.push(json);
    let mut md = markdown(r);
    let mut charts = Vec::new();
    for (family, paths) in [("clusterip", &CLUSTERIP_PATHS[..]), ("nodeport", &NODEPORT_PATHS[..])] {
        for wl in &r.workloads {
            let mut metrics = vec![metric_for(wl)];
            if wl == "rr" {
                metrics.push(Metric::P99);
            }
            for metric in metrics {
                let suffix = if matches!(metric, Metric::P99) { "-p99" } else { "" };
                let name = format!("{stem}-{family}-{wl}{suffix}.svg");
                let file = dir.join(&name);
                let caption = format!("{family}: {} ({})", title(wl), metric.unit());
                chart(r, &file, &caption, paths, wl, metric)
                    .with_context(|| format!("drawing {name}"))?;
                if file.exists() {
                    charts.push(name);
                    files.push(file);
                }
            }
        }
    }
    if !charts.is_empty() {
        let _ = writeln!(md, "\n## Charts\n");
        for c in &charts {
            let _ = writeln!(md, "![{c}]({c})");
        }
    }
    let mdf = dir.join(format!("{stem}.md"));
    std::fs::write(&mdf, md)?;
    files.push(mdf);
    Ok(files)
}

#[cfg(test)]
mod interleave_tests {
    use super::*;
    use crate::svc::run::Interleaved;

    #[test]
    fn interleaved_ratios_are_per_round_and_skip_failed_rounds() {
        let iv = Interleaved {
            scale: 100,
            workload: "crr_x4".into(),
            round_s: 0.5,
            series: vec![("skiff-direct".into(), vec![100.0, 200.0, 50.0, 0.0]), ("skiff-sock".into(), vec![90.0, 220.0, 10.0, 80.0])],
            errors: vec!["round 2 skiff-sock: Some(\"connect: timed out\")".into()],
        };
        // Round 2 had an error, round 3's reference measured nothing: both left out.
        assert_eq!(interleaved_ratios(&iv, "skiff-sock"), vec![0.9, 1.1]);
        assert!(interleaved_ratios(&iv, "skiff-tc").is_empty());
        assert_eq!(median(&[0.9, 1.1]), Some(1.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }
}
