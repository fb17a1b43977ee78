//! Liveness, readiness and startup probes (exec, httpGet, tcpSocket) with kubelet's timing:
//! initialDelaySeconds, periodSeconds, timeoutSeconds, successThreshold, failureThreshold.
//!
//! The timing and threshold bookkeeping (`ProbeTracker`) is pure over the instants it is given;
//! `check` does the I/O of one probe.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::runtime::ContainerRuntime;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

/// Threshold bookkeeping of one probe of one container attempt.
#[derive(Clone, Debug)]
pub struct ProbeTracker {
    pub started: Instant,
    pub last_run: Option<Instant>,
    pub successes: i32,
    pub failures: i32,
    /// The probe's verdict: readiness starts false, liveness and startup start "not failed".
    pub passing: bool,
    /// For startup: once succeeded, never probed again.
    pub done: bool,
}

impl ProbeTracker {
    pub fn new(now: Instant) -> ProbeTracker {
        ProbeTracker { started: now, last_run: None, successes: 0, failures: 0, passing: false, done: false }
    }

    /// Whether the probe is due at `now`.
    pub fn due(&self, p: &Probe, now: Instant) -> bool {
        if self.done {
            return false;
        }
        let delay = Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        if now < self.started + delay {
            return false;
        }
        let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
        self.last_run.is_none_or(|t| now >= t + period)
    }

    /// Records one result and returns the new verdict.
    pub fn record(&mut self, p: &Probe, ok: bool, now: Instant) -> bool {
        self.last_run = Some(now);
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= p.success_threshold.unwrap_or(1).max(1) {
                self.passing = true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= p.failure_threshold.unwrap_or(3).max(1) {
                self.passing = false;
            }
        }
        self.passing
    }

    /// True once failures reached the threshold (liveness/startup: restart the container).
    pub fn failed(&self, p: &Probe) -> bool {
        self.failures >= p.failure_threshold.unwrap_or(3).max(1)
    }
}

/// Resolves a probe port (a number or a container port name).
pub fn resolve_port(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p > 0),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Runs one probe. `container_id` is the runtime's id (for exec), `pod_ip` the target of network
/// probes (the agent runs in the node's namespace, where pod IPs are routed).
pub async fn check(p: &Probe, c: &Container, pod_ip: &str, runtime: Arc<dyn ContainerRuntime>, container_id: &str) -> bool {
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(exec) = &p.exec {
        let argv = exec.command.clone().unwrap_or_default();
        if argv.is_empty() {
            return false;
        }
        let id = container_id.to_string();
        let job = tokio::task::spawn_blocking(move || runtime.exec_sync(&id, &argv, timeout).is_ok_and(|code| code == 0));
        return job.await.unwrap_or(false);
    }
    if let Some(tcp) = &p.tcp_socket {
        let Some(port) = resolve_port(c, &tcp.port) else { return false };
        let host = tcp.host.clone().unwrap_or_else(|| pod_ip.to_string());
        return matches!(tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), port))).await, Ok(Ok(_)));
    }
    if let Some(http) = &p.http_get {
        let Some(port) = resolve_port(c, &http.port) else { return false };
        let host = http.host.clone().unwrap_or_else(|| pod_ip.to_string());
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let headers: String = http
            .http_headers
            .iter()
            .flatten()
            .map(|h| format!("{}: {}\r\n", h.name, h.value))
            .collect();
        return tokio::time::timeout(timeout, http_status(&host, port, &path, &headers))
            .await
            .ok()
            .flatten()
            .is_some_and(|code| (200..400).contains(&code));
    }
    // grpc probes are not supported: report failure so the misconfiguration is visible.
    false
}

/// One HTTP/1.0 GET and its status code. Hand-written (a dozen lines) instead of a client
/// crate: a probe needs only the status line, and kubelet's prober is just as plain.
async fn http_status(host: &str, port: u16, path: &str, headers: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 64];
    let mut n = 0;
    while n < 16 {
        let m = s.read(&mut buf[n..]).await.ok()?;
        if m == 0 {
            break;
        }
        n += m;
    }
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(period: i32, failure: i32, success: i32, delay: i32) -> Probe {
        Probe {
            period_seconds: Some(period),
            failure_threshold: Some(failure),
            success_threshold: Some(success),
            initial_delay_seconds: Some(delay),
            ..Default::default()
        }
    }

    #[test]
    fn initial_delay_and_period() {
        let t0 = Instant::now();
        let p = probe(2, 3, 1, 5);
        let mut tr = ProbeTracker::new(t0);
        assert!(!tr.due(&p, t0 + Duration::from_secs(4)));
        assert!(tr.due(&p, t0 + Duration::from_secs(5)));
        tr.record(&p, true, t0 + Duration::from_secs(5));
        assert!(!tr.due(&p, t0 + Duration::from_secs(6)));
        assert!(tr.due(&p, t0 + Duration::from_secs(7)));
    }

    #[test]
    fn thresholds() {
        let t0 = Instant::now();
        let p = probe(1, 3, 2, 0);
        let mut tr = ProbeTracker::new(t0);
        assert!(!tr.record(&p, true, t0), "one success of two needed");
        assert!(tr.record(&p, true, t0));
        assert!(tr.record(&p, false, t0), "one failure of three: still passing");
        assert!(tr.record(&p, false, t0));
        assert!(!tr.failed(&p));
        assert!(!tr.record(&p, false, t0));
        assert!(tr.failed(&p));
    }

    #[test]
    fn ports_by_number_and_name() {
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}]})).unwrap();
        assert_eq!(resolve_port(&c, &IntOrString::Int(80)), Some(80));
        assert_eq!(resolve_port(&c, &IntOrString::String("http".into())), Some(8080));
        assert_eq!(resolve_port(&c, &IntOrString::String("nope".into())), None);
        assert_eq!(resolve_port(&c, &IntOrString::Int(70000)), None);
    }
}
