//! skiff-proxy: the node agent's service proxy. It watches Services and EndpointSlices through
//! kube-rs reflectors and keeps this node's eBPF service maps (skiff-datapath) equal to them,
//! changing only what changed.
//!
//! - [`translate`] is the pure core: a Service + its EndpointSlices + this node -> frontends
//!   (datapath `ServiceSpec`s), with kube-proxy's rules (see its module docs).
//! - [`ledger`] is the pure bookkeeping of what each Service owns and what was applied.
//! - [`run`] is the shell: reflectors in, per-service recompute on every change, the datapath's
//!   plan-based upsert/delete out; one `sync_services` against the pinned maps at startup (an
//!   agent restart reprograms nothing that still matches and drops no flow); the stale-UDP-socket
//!   sweep after backends go; periodic conntrack GC.
//! - [`health`] serves the health-check node ports of eTP=Local LoadBalancer Services, as
//!   kube-proxy does (200 with local endpoints, 503 without).
//! - [`metrics_text`] renders the datapath counters and the proxy's [`ProxyStats`] as
//!   Prometheus text for the agent's metrics endpoint.

mod apply;
pub mod health;
pub mod ledger;
pub mod metrics;
pub mod metrics_server;
pub mod policy_sync;
mod shell;
pub mod translate;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use health::{HealthCheck, HealthServer, health_check};
pub use ledger::ServiceRef;
pub use metrics::{ProxyStats, StatsSnapshot, metrics_text};
pub use metrics_server::{ExtraMetrics, serve_metrics};
pub use policy_sync::{PolicySyncConfig, run_policy_sync};
pub use shell::run;
pub use translate::{Frontend, FrontendKey, FrontendKind, NodeView, Skip, Translation, translate};

/// Lists the network namespaces (paths such as `/run/netns/<pod>` or `/proc/<pid>/ns/net`)
/// whose connected UDP sockets are swept after backends are removed. The agent knows its pods;
/// include the node's own namespace (host-network pods, the agent itself) if it matters.
pub type NetnsLister = Arc<dyn Fn() -> Vec<PathBuf> + Send + Sync>;

/// How the proxy runs on one node.
#[derive(Clone)]
pub struct ProxyConfig {
    /// This node's name (endpoints' nodeName for the Local traffic policies).
    pub node_name: String,
    /// Addresses NodePort frontends are programmed on (the node's InternalIP(s)). Empty: no
    /// NodePort frontends (ClusterIP, externalIPs and LoadBalancer IPs still are).
    pub node_ips: Vec<IpAddr>,
    /// How often conntrack GC runs.
    pub conntrack_gc_interval: Duration,
    /// UDP flows idle this long are collected (nf_conntrack's udp_timeout_stream is 120 s).
    pub udp_idle_timeout: Duration,
    /// TCP flows idle this long are collected. The tc conntrack does not follow TCP state, so a
    /// closed flow lingers until then; 3 h outlasts Linux's default 2 h keepalive interval, so
    /// an idle connection kept alive is never collected.
    pub tcp_idle_timeout: Duration,
    /// Changes arriving within this window are applied together.
    pub batch_delay: Duration,
    /// Services whose writes failed are tried again after this long.
    pub retry_interval: Duration,
    /// Where to sweep stale connected UDP sockets after backends are removed (None: no sweep).
    pub netns_lister: Option<NetnsLister>,
    /// Statistics, shared with the metrics endpoint.
    pub stats: Arc<ProxyStats>,
}

impl ProxyConfig {
    pub fn new(node_name: impl Into<String>, node_ips: Vec<IpAddr>) -> ProxyConfig {
        ProxyConfig {
            node_name: node_name.into(),
            node_ips,
            conntrack_gc_interval: Duration::from_secs(30),
            udp_idle_timeout: Duration::from_secs(120),
            tcp_idle_timeout: Duration::from_secs(3 * 3600),
            batch_delay: Duration::from_millis(10),
            retry_interval: Duration::from_secs(5),
            netns_lister: None,
            stats: Arc::new(ProxyStats::default()),
        }
    }
}

impl ProxyConfig {
    /// Checks what `run` relies on; `run` calls it first, so a bad config changes nothing.
    pub fn validate(&self) -> Result<(), ProxyError> {
        if self.node_name.trim().is_empty() {
            return Err(ProxyError::Config(
                "node_name is empty: the proxy needs this node's name for the Local traffic \
                 policies"
                    .into(),
            ));
        }
        for (name, d) in [
            ("conntrack_gc_interval", self.conntrack_gc_interval),
            ("retry_interval", self.retry_interval),
            ("udp_idle_timeout", self.udp_idle_timeout),
            ("tcp_idle_timeout", self.tcp_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(ProxyError::Config(format!(
                    "{name} is zero: give it a positive duration"
                )));
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("node_name", &self.node_name)
            .field("node_ips", &self.node_ips)
            .field("conntrack_gc_interval", &self.conntrack_gc_interval)
            .field("udp_idle_timeout", &self.udp_idle_timeout)
            .field("tcp_idle_timeout", &self.tcp_idle_timeout)
            .field("batch_delay", &self.batch_delay)
            .field("retry_interval", &self.retry_interval)
            .field("netns_lister", &self.netns_lister.is_some())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy config: {0}")]
    Config(String),
    #[error("a datapath task of the proxy failed: {0}")]
    Task(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        let ok = ProxyConfig::new("node-a", vec![]);
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.node_name = " ".into();
        assert!(matches!(c.validate(), Err(ProxyError::Config(m)) if m.contains("node_name")));
        let mut c = ok.clone();
        c.conntrack_gc_interval = Duration::ZERO;
        assert!(
            matches!(c.validate(), Err(ProxyError::Config(m)) if m.contains("conntrack_gc_interval"))
        );
        let mut c = ok;
        c.tcp_idle_timeout = Duration::ZERO;
        assert!(c.validate().is_err());
    }
}
