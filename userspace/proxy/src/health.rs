//! Health-check node ports, as kube-proxy serves them: a Service with `spec.healthCheckNodePort`
//! (the apiserver sets one on a LoadBalancer Service with externalTrafficPolicy=Local) gets an
//! HTTP server on that port of this node's addresses. It answers 200 while this node has a ready
//! local endpoint of the Service and 503 otherwise, so an external load balancer sends traffic
//! only to nodes that can keep the client's source address and still answer.
//!
//! The body is kube-proxy's:
//! `{"service":{"namespace":"ns","name":"web"},"localEndpoints":1,"serviceProxyHealthy":true}`.
//!
//! [`health_check`] is pure (a Service and its slices -> what to serve); [`HealthServer`] keeps
//! one listener per port and node address, opening and closing them as the set changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::ledger::ServiceRef;
use crate::translate::is_ready_endpoint;

/// What one health-check port answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub service: ServiceRef,
    /// Ready (not terminating) endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// The health check `service` wants on the node `node_name`, if it has a health-check node port.
/// Local endpoints are counted once per address (a pod serving two Service ports is one
/// endpoint), ready and not terminating only, as kube-proxy leaves terminating ones out.
pub fn health_check(
    service: &Service,
    slices: &[&EndpointSlice],
    node_name: &str,
) -> Option<HealthCheck> {
    let spec = service.spec.as_ref()?;
    let port = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)?;
    let service = ServiceRef::new(
        service.metadata.namespace.clone()?,
        service.metadata.name.clone()?,
    );
    let mut local: BTreeSet<&str> = BTreeSet::new();
    for slice in slices {
        for ep in &slice.endpoints {
            if ep.node_name.as_deref() != Some(node_name) || !is_ready_endpoint(ep) {
                continue;
            }
            if let Some(addr) = ep.addresses.first() {
                local.insert(addr.as_str());
            }
        }
    }
    Some(HealthCheck {
        port,
        service,
        local_endpoints: local.len(),
    })
}

/// The kube-proxy response for one health check: (status, JSON body).
pub fn response(check: &HealthCheck) -> (StatusCode, String) {
    let body = serde_json::json!({
        "service": {"namespace": check.service.namespace, "name": check.service.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let status = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body.to_string())
}

type Checks = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

#[derive(Clone)]
struct PortState {
    checks: Checks,
    port: u16,
}

async fn answer(State(st): State<PortState>) -> impl IntoResponse {
    let check = st
        .checks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&st.port)
        .cloned();
    match check {
        Some(c) => {
            let (status, body) = response(&c);
            (
                status,
                [
                    (header::CONTENT_TYPE, "application/json".to_string()),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
                    (
                        header::HeaderName::from_static("x-load-balancing-endpoint-weight"),
                        c.local_endpoints.to_string(),
                    ),
                ],
                body,
            )
                .into_response()
        }
        // The port is being closed: say so rather than claim health.
        None => (StatusCode::SERVICE_UNAVAILABLE, "no such health check\n").into_response(),
    }
}

/// Listeners for the health-check ports of this node.
pub struct HealthServer {
    addrs: Vec<IpAddr>,
    checks: Checks,
    /// port -> the server tasks of its listeners (one per node address).
    listeners: BTreeMap<u16, Vec<JoinHandle<()>>>,
}

impl HealthServer {
    /// Serves on `addrs` (the node's addresses). With none, health checks are computed but not
    /// served (warned once per port).
    pub fn new(addrs: Vec<IpAddr>) -> HealthServer {
        HealthServer {
            addrs,
            checks: Arc::default(),
            listeners: BTreeMap::new(),
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Makes the served set equal to `wanted` (Services in order; a port two Services claim goes
    /// to the first, which the apiserver's allocator never lets happen). Must run inside a tokio
    /// runtime. A port that cannot be bound is warned about and tried again on the next call.
    pub fn set<'a>(&mut self, wanted: impl IntoIterator<Item = &'a HealthCheck>) {
        let mut next: BTreeMap<u16, HealthCheck> = BTreeMap::new();
        for c in wanted {
            if let Some(first) = next.get(&c.port) {
                warn!(port = c.port, service = %c.service, owner = %first.service,
                      "health-check node port claimed by two Services: serving the first");
                continue;
            }
            next.insert(c.port, c.clone());
        }
        *self.checks.lock().unwrap_or_else(|e| e.into_inner()) = next.clone();
        let gone: Vec<u16> = self
            .listeners
            .keys()
            .filter(|p| !next.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            for task in self.listeners.remove(&port).into_iter().flatten() {
                task.abort();
            }
            info!(port, "health-check node port closed");
        }
        for (port, check) in &next {
            if self.listeners.contains_key(port) {
                continue;
            }
            if self.addrs.is_empty() {
                warn!(port, service = %check.service,
                      "no node address to serve the health-check node port on");
                continue;
            }
            match self.listen(*port) {
                Ok(tasks) => {
                    info!(port, service = %check.service, "health-check node port serving");
                    self.listeners.insert(*port, tasks);
                }
                Err(e) => warn!(port, service = %check.service, error = %e,
                                "cannot open the health-check node port (retried on the next change)"),
            }
        }
    }

    fn listen(&self, port: u16) -> std::io::Result<Vec<JoinHandle<()>>> {
        // Bind every address first, so a failure leaves nothing half open.
        let mut bound = Vec::new();
        for ip in &self.addrs {
            let l = std::net::TcpListener::bind(SocketAddr::new(*ip, port))?;
            l.set_nonblocking(true)?;
            bound.push(l);
        }
        let mut tasks = Vec::new();
        for l in bound {
            let listener = tokio::net::TcpListener::from_std(l)?;
            let app = Router::new().fallback(answer).with_state(PortState {
                checks: self.checks.clone(),
                port,
            });
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(port, error = %e, "health-check server stopped");
                }
            }));
        }
        Ok(tasks)
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        for task in self.listeners.values().flatten() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(hc: Option<i32>) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": hc},
        }))
        .expect("service")
    }

    fn slice(endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .expect("slice")
    }

    #[test]
    fn counts_ready_local_endpoints_once_each() {
        let s = slice(serde_json::json!([
            {"addresses": ["10.244.1.5"], "nodeName": "node-a", "conditions": {"ready": true}},
            {"addresses": ["10.244.1.6"], "nodeName": "node-a", "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.1.7"], "nodeName": "node-a", "conditions": {"ready": false}},
            {"addresses": ["10.244.2.5"], "nodeName": "node-b", "conditions": {"ready": true}},
        ]));
        // The same pod listed again (a second slice during a migration) is one endpoint.
        let again = slice(serde_json::json!([
            {"addresses": ["10.244.1.5"], "nodeName": "node-a", "conditions": {"ready": true}},
        ]));
        let svc = service(Some(31000));
        let a = health_check(&svc, &[&s, &again], "node-a").expect("has a port");
        assert_eq!(a.port, 31000);
        assert_eq!(a.service, ServiceRef::new("shop", "web"));
        assert_eq!(a.local_endpoints, 1);
        let c = health_check(&svc, &[&s], "node-c").expect("has a port");
        assert_eq!(c.local_endpoints, 0);
        assert!(health_check(&service(None), &[&s], "node-a").is_none());
        assert!(health_check(&service(Some(0)), &[&s], "node-a").is_none());
    }

    #[test]
    fn response_is_kube_proxys() {
        let mut c = HealthCheck {
            port: 31000,
            service: ServiceRef::new("shop", "web"),
            local_endpoints: 2,
        };
        let (status, body) = response(&c);
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        c.local_endpoints = 0;
        assert_eq!(response(&c).0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn server_opens_answers_and_closes_ports() {
        // Loopback only; a port the kernel picked, so parallel tests do not collide.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = free.local_addr().expect("addr").port();
        drop(free);
        let mut server = HealthServer::new(vec!["127.0.0.1".parse().expect("literal")]);
        let mut check = HealthCheck {
            port,
            service: ServiceRef::new("shop", "web"),
            local_endpoints: 1,
        };
        server.set([&check]);
        assert_eq!(server.ports(), vec![port]);
        let get = || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<String, std::io::Error>(out)
        };
        let ok = get().await.expect("answers");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains(r#""localEndpoints":1"#), "{ok}");
        check.local_endpoints = 0;
        server.set([&check]);
        let down = get().await.expect("answers");
        assert!(down.starts_with("HTTP/1.1 503"), "{down}");
        server.set([]);
        assert!(server.ports().is_empty());
        // The aborted server task drops its listener: connections are refused soon after.
        let mut refused = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                refused = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(refused, "port {port} still open after the check went away");
    }
}
