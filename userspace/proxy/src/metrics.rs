//! The proxy's statistics and the Prometheus text for the agent's metrics endpoint.
//!
//! The text is written by hand in the Prometheus exposition format 0.0.4: every value is read
//! at scrape time from the datapath or from atomics, the names are fixed, and the one label
//! value (a counter name) is a compile-time constant, so there is nothing to escape. A metrics
//! crate would add a registry to fill on every scrape, and prometheus-client writes OpenMetrics
//! (terminated by `# EOF`), which the agent could not concatenate with its own sections.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use skiff_datapath::Datapath;

/// Live counters of one proxy, shared with whoever serves metrics (cheap to read at any time).
#[derive(Debug, Default)]
pub struct ProxyStats {
    services_programmed: AtomicU64,
    frontends_programmed: AtomicU64,
    /// Nanoseconds the last reconcile (a batch of changes, or the startup sync) took.
    last_sync_ns: AtomicU64,
    startup_sync_ns: AtomicU64,
    startup_sync_ops: AtomicU64,
    /// 1 once the startup sync against the pinned maps is done.
    synced: AtomicU64,
    ops_applied: AtomicU64,
    syncs: AtomicU64,
    sync_errors: AtomicU64,
    udp_sockets_destroyed: AtomicU64,
    conntrack_gc_runs: AtomicU64,
    conntrack_gc_deleted: AtomicU64,
}

/// A plain copy of [`ProxyStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub services_programmed: u64,
    pub frontends_programmed: u64,
    pub last_sync_ns: u64,
    pub startup_sync_ns: u64,
    /// Map operations the startup sync applied (0 when the pinned maps already matched).
    pub startup_sync_ops: u64,
    pub synced: bool,
    /// Map operations applied since start (the startup sync included).
    pub ops_applied: u64,
    pub syncs: u64,
    pub sync_errors: u64,
    pub udp_sockets_destroyed: u64,
    pub conntrack_gc_runs: u64,
    pub conntrack_gc_deleted: u64,
}

impl ProxyStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            services_programmed: g(&self.services_programmed),
            frontends_programmed: g(&self.frontends_programmed),
            last_sync_ns: g(&self.last_sync_ns),
            startup_sync_ns: g(&self.startup_sync_ns),
            startup_sync_ops: g(&self.startup_sync_ops),
            synced: g(&self.synced) != 0,
            ops_applied: g(&self.ops_applied),
            syncs: g(&self.syncs),
            sync_errors: g(&self.sync_errors),
            udp_sockets_destroyed: g(&self.udp_sockets_destroyed),
            conntrack_gc_runs: g(&self.conntrack_gc_runs),
            conntrack_gc_deleted: g(&self.conntrack_gc_deleted),
        }
    }

    pub(crate) fn set_programmed(&self, services: usize, frontends: usize) {
        self.services_programmed
            .store(services as u64, Ordering::Relaxed);
        self.frontends_programmed
            .store(frontends as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_sync(&self, elapsed: std::time::Duration, ops: usize, errors: usize) {
        self.last_sync_ns
            .store(elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.ops_applied.fetch_add(ops as u64, Ordering::Relaxed);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_errors.fetch_add(errors as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_startup(&self, elapsed: std::time::Duration, ops: usize) {
        self.startup_sync_ns
            .store(elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.startup_sync_ops.store(ops as u64, Ordering::Relaxed);
        self.synced.store(1, Ordering::Relaxed);
    }

    pub(crate) fn add_udp_destroyed(&self, n: usize) {
        self.udp_sockets_destroyed
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_gc(&self, deleted: usize) {
        self.conntrack_gc_runs.fetch_add(1, Ordering::Relaxed);
        self.conntrack_gc_deleted
            .fetch_add(deleted as u64, Ordering::Relaxed);
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// The proxy's statistics as Prometheus text (exposition format 0.0.4).
pub fn stats_text(s: &StatsSnapshot) -> String {
    let mut out = String::new();
    let secs = |ns: u64| ns as f64 / 1e9;
    metric(
        &mut out,
        "skiff_proxy_services_programmed",
        "gauge",
        "Services with at least one frontend in the datapath maps.",
        s.services_programmed,
    );
    metric(
        &mut out,
        "skiff_proxy_frontends_programmed",
        "gauge",
        "Frontends (address x port x protocol) in the datapath maps.",
        s.frontends_programmed,
    );
    metric(
        &mut out,
        "skiff_proxy_last_sync_duration_seconds",
        "gauge",
        "How long the last reconcile of changed services took.",
        secs(s.last_sync_ns),
    );
    metric(
        &mut out,
        "skiff_proxy_startup_sync_duration_seconds",
        "gauge",
        "How long the startup sync against the pinned maps took.",
        secs(s.startup_sync_ns),
    );
    metric(
        &mut out,
        "skiff_proxy_startup_sync_ops",
        "gauge",
        "Map operations the startup sync applied (0: the pinned maps already matched).",
        s.startup_sync_ops,
    );
    metric(
        &mut out,
        "skiff_proxy_synced",
        "gauge",
        "1 once the startup sync is done.",
        s.synced as u8,
    );
    metric(
        &mut out,
        "skiff_proxy_map_ops_total",
        "counter",
        "Datapath map operations applied.",
        s.ops_applied,
    );
    metric(
        &mut out,
        "skiff_proxy_syncs_total",
        "counter",
        "Reconciles of changed services.",
        s.syncs,
    );
    metric(
        &mut out,
        "skiff_proxy_sync_errors_total",
        "counter",
        "Frontend writes or deletes that failed (retried).",
        s.sync_errors,
    );
    metric(
        &mut out,
        "skiff_proxy_udp_sockets_destroyed_total",
        "counter",
        "Connected UDP sockets destroyed because their backend went away.",
        s.udp_sockets_destroyed,
    );
    metric(
        &mut out,
        "skiff_proxy_conntrack_gc_runs_total",
        "counter",
        "Conntrack garbage collection passes.",
        s.conntrack_gc_runs,
    );
    metric(
        &mut out,
        "skiff_proxy_conntrack_gc_deleted_total",
        "counter",
        "Idle conntrack entries deleted by garbage collection.",
        s.conntrack_gc_deleted,
    );
    out
}

/// The datapath's per-CPU counters (summed) as Prometheus text.
pub fn counters_text(counters: &std::collections::BTreeMap<&'static str, u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP skiff_datapath_events_total eBPF datapath events by kind (summed over CPUs)."
    );
    let _ = writeln!(out, "# TYPE skiff_datapath_events_total counter");
    for (name, v) in counters {
        let _ = writeln!(out, "skiff_datapath_events_total{{event=\"{name}\"}} {v}");
    }
    out
}

/// Everything the agent's metrics endpoint needs from the proxy: the datapath's counters and
/// the proxy's statistics, in the Prometheus text format. A datapath read error becomes a
/// `skiff_datapath_counters_error 1` line rather than a failed scrape.
pub fn metrics_text(datapath: &Mutex<Datapath>, stats: &ProxyStats) -> String {
    let counters = {
        let dp = datapath.lock().unwrap_or_else(|e| e.into_inner());
        dp.counters()
    };
    let mut out = match counters {
        Ok(c) => counters_text(&c),
        Err(e) => {
            tracing::warn!(error = %e, "reading datapath counters for metrics failed");
            "# HELP skiff_datapath_counters_error 1 when the datapath counters could not be read.\n\
             # TYPE skiff_datapath_counters_error gauge\nskiff_datapath_counters_error 1\n"
                .to_string()
        }
    };
    out.push_str(&stats_text(&stats.snapshot()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_text_is_prometheus_exposition_format() {
        let stats = ProxyStats::default();
        stats.set_programmed(3, 7);
        stats.record_sync(std::time::Duration::from_millis(1500), 12, 1);
        stats.record_startup(std::time::Duration::from_millis(20), 0);
        let text = stats_text(&stats.snapshot());
        assert!(text.contains("skiff_proxy_services_programmed 3\n"));
        assert!(text.contains("skiff_proxy_frontends_programmed 7\n"));
        assert!(text.contains("skiff_proxy_last_sync_duration_seconds 1.5\n"));
        assert!(text.contains("skiff_proxy_map_ops_total 12\n"));
        assert!(text.contains("skiff_proxy_sync_errors_total 1\n"));
        assert!(text.contains("skiff_proxy_synced 1\n"));
        // Every sample line is preceded by its HELP and TYPE, and names are valid.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.split_once(' ').expect("name value");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            value.parse::<f64>().expect("numeric value");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
    }

    #[test]
    fn counters_text_has_one_labelled_sample_per_counter() {
        let c = std::collections::BTreeMap::from([("dnat", 5u64), ("packets", 9)]);
        let text = counters_text(&c);
        assert!(text.contains("skiff_datapath_events_total{event=\"dnat\"} 5\n"));
        assert!(text.contains("skiff_datapath_events_total{event=\"packets\"} 9\n"));
        assert_eq!(text.matches("# TYPE").count(), 1);
    }
}
