//! `skiff datapath ...`: a node's eBPF maps in a form a person reads, as `cilium bpf lb list` does.
//! The formatting is pure (tested below); the only I/O is opening the pinned maps.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use skiff_datapath::policy::{PolicyDirection, PolicyEntry};
use skiff_datapath::{BackendEntry, BackendState, ConntrackEntry, CtDirection, Datapath, ServiceEntry};

#[derive(Subcommand)]
pub enum DatapathCommand {
    /// Services (frontends) and the backends that get new flows.
    Services,
    /// Every backend with its state (active or terminating).
    Backends,
    /// The conntrack table of the per-packet (tc) layer.
    Conntrack,
    /// NetworkPolicy: each local pod's isolation and the (peer, port) entries it allows.
    Policy,
    /// Per-CPU counters, summed.
    Stats,
}

pub fn run(pin_dir: &Path, command: DatapathCommand) -> Result<()> {
    if !pin_dir.exists() {
        bail!(
            "no datapath is pinned at {}: start an agent (or pass --pin-dir where it pins)",
            pin_dir.display()
        );
    }
    // Read-only: the maps from their pins, no program loaded or attached.
    let datapath = Datapath::open_pinned(pin_dir)
        .with_context(|| format!("opening the datapath pinned at {}", pin_dir.display()))?;
    let text = match command {
        DatapathCommand::Services => format_services(
            &datapath.dump_services()?,
            &datapath.dump_backends()?,
        ),
        DatapathCommand::Backends => format_backends(&datapath.dump_backends()?),
        DatapathCommand::Conntrack => format_conntrack(&datapath.dump_conntrack()?),
        DatapathCommand::Policy => {
            let (entries, isolation) = datapath.dump_policy()?;
            format_policy(&entries, &isolation)
        }
        DatapathCommand::Stats => format_stats(datapath.lb_mode()?, &datapath.counters()?),
    };
    print!("{text}");
    Ok(())
}

fn proto_name(proto: u8) -> String {
    match proto {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => format!("proto-{n}"),
    }
}

fn state_name(state: BackendState) -> &'static str {
    match state {
        BackendState::Active => "active",
        BackendState::Terminating => "terminating",
    }
}

pub fn format_services(services: &[ServiceEntry], backends: &[BackendEntry]) -> String {
    let by_id: BTreeMap<u32, &BackendEntry> = backends.iter().map(|b| (b.id, b)).collect();
    let mut rows = vec![[
        "SERVICE ADDRESS".to_string(),
        "BACKEND ADDRESS (ID)".to_string(),
        "STATE".to_string(),
        "AFFINITY".to_string(),
    ]];
    let mut sorted: Vec<&ServiceEntry> = services.iter().collect();
    sorted.sort_by_key(|s| (s.vip, s.port, s.proto.number()));
    for svc in sorted {
        let frontend = format!("{}:{}/{}", svc.vip, svc.port, proto_name(svc.proto.number()));
        let affinity = svc.affinity_timeout.map(|t| format!("ClientIP {t}s")).unwrap_or_else(|| "-".into());
        // Terminating backends stay in BACKENDS (established flows) but are not in the slots.
        let mut members: Vec<&BackendEntry> = by_id.values().copied().filter(|b| b.service_id == svc.service_id).collect();
        members.sort_by_key(|b| (b.ip, b.port));
        if members.is_empty() {
            rows.push([frontend, "(no backends)".into(), "-".into(), affinity]);
            continue;
        }
        for (i, b) in members.iter().enumerate() {
            let first = i == 0;
            rows.push([
                if first { frontend.clone() } else { String::new() },
                format!("{}:{} ({})", b.ip, b.port, b.id),
                state_name(b.state).into(),
                if first { affinity.clone() } else { String::new() },
            ]);
        }
    }
    table(&rows)
}

pub fn format_backends(backends: &[BackendEntry]) -> String {
    let mut rows = vec![["ID".to_string(), "ADDRESS".into(), "SERVICE ID".into(), "STATE".into()]];
    let mut sorted: Vec<&BackendEntry> = backends.iter().collect();
    sorted.sort_by_key(|b| b.id);
    for b in sorted {
        rows.push([
            b.id.to_string(),
            format!("{}:{}/{}", b.ip, b.port, proto_name(b.proto.number())),
            b.service_id.to_string(),
            state_name(b.state).into(),
        ]);
    }
    table(&rows)
}

pub fn format_conntrack(entries: &[ConntrackEntry]) -> String {
    let mut rows = vec![[
        "PROTO".to_string(),
        "SOURCE".into(),
        "DESTINATION".into(),
        "DIRECTION".into(),
        "SERVICE".into(),
        "BACKEND ID".into(),
    ]];
    for e in entries {
        let direction = match (e.direction, e.hairpin, e.dsr) {
            (CtDirection::Forward, _, true) => "forward dsr",
            (CtDirection::Forward, false, false) => "forward",
            (CtDirection::Forward, true, false) => "forward hairpin",
            (CtDirection::Reply, _, true) => "reply dsr",
            (CtDirection::Reply, false, false) => "reply",
            (CtDirection::Reply, true, false) => "reply hairpin",
        };
        rows.push([
            proto_name(e.proto),
            format!("{}:{}", e.src, e.sport),
            format!("{}:{}", e.dst, e.dport),
            direction.into(),
            format!("{}:{}", e.vip, e.vip_port),
            e.backend_id.to_string(),
        ]);
    }
    table(&rows)
}

/// Pods whose policy isolates a direction, then every POLICY entry. A pod isolated for a
/// direction with no entry for it gets no new flow in that direction (default deny).
pub fn format_policy(entries: &[PolicyEntry], isolation: &BTreeMap<std::net::Ipv4Addr, (bool, bool)>) -> String {
    let yes_no = |b: bool| if b { "isolated" } else { "-" };
    let mut pods = vec![["POD".to_string(), "INGRESS".into(), "EGRESS".into(), "ALLOW ENTRIES".into()]];
    for (ip, (i, e)) in isolation {
        let n = entries.iter().filter(|x| x.endpoint == *ip && x.allow).count();
        pods.push([ip.to_string(), yes_no(*i).into(), yes_no(*e).into(), n.to_string()]);
    }
    let mut rows = vec![["POD".to_string(), "DIRECTION".into(), "PEER".into(), "PORT".into(), "VERDICT".into()]];
    for e in entries {
        let port = match (e.proto, e.port) {
            (0, _) => "any".to_string(),
            (p, 0) => format!("any/{}", proto_name(p)),
            (p, n) => format!("{n}/{}", proto_name(p)),
        };
        rows.push([
            e.endpoint.to_string(),
            match e.direction {
                PolicyDirection::Ingress => "ingress (from)".into(),
                PolicyDirection::Egress => "egress (to)".into(),
            },
            format!("{}/{}", e.peer, e.prefix_len),
            port,
            if e.allow { "allow" } else { "deny (except)" }.into(),
        ]);
    }
    let mut out = table(&pods);
    out.push('\n');
    if entries.is_empty() {
        out.push_str("(no policy entries)\n");
    } else {
        out.push_str(&table(&rows));
    }
    out
}

/// The load-balancing mode (the agent's --lb-mode, read from the pinned NODE_CONFIG), then the
/// counters.
pub fn format_stats(lb_mode: skiff_datapath::LbMode, counters: &BTreeMap<&'static str, u64>) -> String {
    let mut rows = vec![["COUNTER".to_string(), "VALUE".into()]];
    rows.push(["lb_mode (NodePort to other nodes)".into(), lb_mode.to_string()]);
    for (name, value) in counters {
        rows.push([name.to_string(), value.to_string()]);
    }
    table(&rows)
}

/// Left-aligned columns separated by three spaces, as kubectl prints.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{:width$}   ", cell, width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_datapath::Proto;
    use std::net::{IpAddr, Ipv4Addr};

    fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn backend(id: u32, service_id: u32, last: u8, state: BackendState) -> BackendEntry {
        BackendEntry { id, service_id, ip: ip(10, 244, 1, last), port: 8080, proto: Proto::Tcp, state }
    }

    #[test]
    fn services_list_each_frontend_with_its_backends_and_states() {
        let services = vec![
            ServiceEntry { vip: ip(10, 96, 0, 20), port: 53, proto: Proto::Udp, service_id: 2, active_backends: vec![], affinity_timeout: None },
            ServiceEntry { vip: ip(10, 96, 0, 10), port: 80, proto: Proto::Tcp, service_id: 1, active_backends: vec![1], affinity_timeout: Some(10800) },
        ];
        let backends = vec![backend(2, 1, 3, BackendState::Terminating), backend(1, 1, 2, BackendState::Active)];
        let text = format_services(&services, &backends);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SERVICE ADDRESS"));
        assert!(lines[1].starts_with("10.96.0.10:80/TCP") && lines[1].contains("10.244.1.2:8080 (1)") && lines[1].contains("active") && lines[1].contains("ClientIP 10800s"), "{text}");
        assert!(lines[2].trim_start().starts_with("10.244.1.3:8080 (2)") && lines[2].contains("terminating"), "{text}");
        assert!(lines[3].starts_with("10.96.0.20:53/UDP") && lines[3].contains("(no backends)"), "{text}");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn policy_lists_isolation_and_entries_readably() {
        let pod = Ipv4Addr::new(10, 244, 1, 5);
        let entries = vec![
            PolicyEntry { endpoint: pod, direction: PolicyDirection::Ingress, peer: Ipv4Addr::new(10, 244, 2, 0), prefix_len: 24, proto: 6, port: 9000, allow: true },
            PolicyEntry { endpoint: pod, direction: PolicyDirection::Ingress, peer: Ipv4Addr::new(10, 244, 2, 7), prefix_len: 32, proto: 6, port: 9000, allow: false },
            PolicyEntry { endpoint: pod, direction: PolicyDirection::Egress, peer: Ipv4Addr::UNSPECIFIED, prefix_len: 0, proto: 0, port: 0, allow: true },
        ];
        let iso = BTreeMap::from([(pod, (true, false)), (Ipv4Addr::new(10, 244, 1, 6), (false, false))]);
        let text = format_policy(&entries, &iso);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("10.244.1.5") && lines[1].contains("isolated") && lines[1].ends_with('2'), "{text}");
        assert!(lines[2].starts_with("10.244.1.6") && !lines[2].contains("isolated"), "{text}");
        assert!(text.contains("10.244.2.0/24") && text.contains("9000/TCP") && text.contains("deny (except)"), "{text}");
        assert!(text.lines().any(|l| l.contains("egress (to)") && l.contains("0.0.0.0/0") && l.contains("any")), "{text}");
        assert!(format_policy(&[], &BTreeMap::new()).contains("(no policy entries)"));
    }

    #[test]
    fn stats_say_the_lb_mode_first() {
        let counters = BTreeMap::from([("dsr_forward", 3u64), ("packets", 10)]);
        let text = format_stats(skiff_datapath::LbMode::Dsr, &counters);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("lb_mode") && lines[1].ends_with("dsr"), "{text}");
        assert!(lines[2].starts_with("dsr_forward") && lines[2].ends_with('3'), "{text}");
        assert!(format_stats(skiff_datapath::LbMode::Snat, &counters).lines().nth(1).is_some_and(|l| l.ends_with("snat")));
    }

    #[test]
    fn columns_line_up() {
        let text = format_backends(&[backend(1, 1, 2, BackendState::Active), backend(12, 3, 200, BackendState::Active)]);
        let lines: Vec<&str> = text.lines().collect();
        let col = lines[0].find("ADDRESS").expect("header");
        assert_eq!(lines[1].find("10.244"), Some(col));
        assert_eq!(lines[2].find("10.244"), Some(col));
    }
}
