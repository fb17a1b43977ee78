//! The agent's metrics endpoint: plain HTTP `GET /metrics` with the Prometheus text of
//! [`crate::metrics_text`] (datapath per-CPU counters and the proxy's stats) followed by
//! whatever the agent adds (its own gauges). Plain HTTP on its own port, as kube-proxy's
//! 10249: the agent's 10250 endpoint is HTTPS with bearer auth for logs/exec.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use skiff_datapath::Datapath;

use crate::ProxyStats;

/// Extra Prometheus text appended to every scrape (must be whole exposition-format lines).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct State {
    datapath: Option<Arc<Mutex<Datapath>>>,
    stats: Arc<ProxyStats>,
    extra: ExtraMetrics,
}

async fn metrics(axum::extract::State(st): axum::extract::State<State>) -> impl IntoResponse {
    // metrics_text locks the datapath and walks per-CPU maps: off the async workers.
    let text = tokio::task::spawn_blocking(move || {
        let mut out = match &st.datapath {
            Some(dp) => crate::metrics_text(dp, &st.stats),
            None => crate::metrics::stats_text(&st.stats.snapshot()),
        };
        out.push_str(&(st.extra)());
        out
    })
    .await;
    match text {
        Ok(t) => (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], t).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics task failed: {e}\n")).into_response(),
    }
}

/// Serves `GET /metrics` (and `/healthz`) on `listen` until `shutdown` completes.
pub async fn serve_metrics(
    listen: SocketAddr,
    datapath: Option<Arc<Mutex<Datapath>>>,
    stats: Arc<ProxyStats>,
    extra: ExtraMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(State { datapath, stats, extra });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "metrics endpoint listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_the_proxy_stats_and_the_extra_text_over_http() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let extra: ExtraMetrics = Arc::new(|| "skiff_agent_pods 3\n".to_string());
        let server = tokio::spawn(serve_metrics(addr, None, Arc::new(ProxyStats::default()), extra, async {
            let _ = rx.await;
        }));
        let mut body = String::new();
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
                s.read_to_string(&mut body).await.unwrap();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("text/plain; version=0.0.4"), "{body}");
        assert!(body.contains("skiff_agent_pods 3\n"), "{body}");
        assert!(body.contains("skiff_proxy_"), "the proxy's stats are there: {body}");
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    }
}
