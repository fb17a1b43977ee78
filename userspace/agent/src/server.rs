//! The agent's HTTPS endpoint (kubelet's port 10250 shape), reached by the apiserver's
//! pods/log and pods/exec proxy:
//!
//! - `GET /containerLogs/{ns}/{pod}/{container}?follow=&previous=&tailLines=&timestamps=&sinceSeconds=&sinceTime=&limitBytes=`:
//!   text/plain decoded from the CRI log files `<pods-dir>/<uid>/logs/<container>/<attempt>.log`
//!   (the highest attempt is the current container, the one before it `previous`); with
//!   `follow` the body streams new lines until the client goes or the attempt ends.
//! - `GET|POST /exec/{ns}/{pod}/{container}?command=..&command=..&stdin=&stdout=&stderr=&tty=`:
//!   a websocket (`v5.channel.k8s.io` or `v4.channel.k8s.io`) relaying the process started by
//!   [`ContainerRuntime::exec`], ending with its status on channel 3 (see [`exec`]).
//! - `/healthz`: "ok".
//!
//! Every request must come from the apiserver: a TLS client certificate signed by the cluster CA
//! (`ServerConfig::client_ca`, the CA the agent pinned when it joined) with the common name
//! [`APISERVER_CLIENT_CN`] and clientAuth usage (the apiserver's node proxy makes a short-lived
//! one), or `Authorization: Bearer <token>` with the token the agent was configured with (tests,
//! tools talking to the agent directly); anything else is 401. The serving certificate is
//! self-signed, made at start (debt: the apiserver does not verify it; a per-node serving
//! certificate signed by the cluster CA belongs to the security issue).
//! Errors are `metav1.Status` JSON, as kubelet answers.

pub mod cri_log;
pub mod exec;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{debug, info, warn};

use crate::runtime::{ContainerKey, ContainerRuntime, Observed};
use cri_log::{CriDecoder, LogFilter, LogOptions};

/// How often a followed log is read again, and how often the container is looked at.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
const FOLLOW_OBSERVE: Duration = Duration::from_secs(1);
/// A followed log stream ends after this long even if the client stays (kubelet's default
/// streaming-connection-idle-timeout).
const MAX_FOLLOW: Duration = Duration::from_secs(4 * 3600);
/// API look-ups of the pod must not hang a request.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// How the endpoint is set up.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// A bearer token requests may carry instead of the apiserver's client certificate; empty:
    /// none is accepted.
    pub token: String,
    /// The cluster CA (PEM): client certificates it signed for [`APISERVER_CLIENT_CN`] are the
    /// apiserver. None: only the bearer token is accepted.
    pub client_ca: Option<String>,
    /// Only pods bound to this node are served.
    pub node_name: String,
    /// `<data-dir>/pods`.
    pub pods_dir: PathBuf,
    /// Names and addresses for the self-signed certificate.
    pub cert_names: Vec<String>,
}

type Body = BoxBody<Bytes, std::io::Error>;

/// The common name of the apiserver's node-proxy client certificate (the apiserver's
/// `NODE_PROXY_CLIENT_CN`; the agent does not depend on the apiserver crate).
pub const APISERVER_CLIENT_CN: &str = "skiff-apiserver-node-proxy";

struct Shared {
    cfg: ServerConfig,
    client: kube::Client,
    runtime: Arc<dyn ContainerRuntime>,
}

/// A self-signed serving certificate for `names` (debt: not signed by the cluster CA). With
/// `client_ca`, clients may present a certificate it signed (verified by webpki: chain, validity,
/// clientAuth usage); clients without one still connect and must then show the bearer token.
pub fn self_signed_tls(names: &[String], client_ca: Option<&str>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let names = if names.is_empty() { vec!["localhost".to_string()] } else { names.to_vec() };
    let ck = rcgen::generate_simple_self_signed(names).context("making the agent's self-signed certificate")?;
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?;
    let builder = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(ca.context("parsing the cluster CA")?).context("adding the cluster CA")?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(vec![cert], key).context("using the agent's certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The bearer token of a kubeconfig's current user (`token`, else `tokenFile`): what
/// `skiff agent --kubeconfig` passes as [`crate::AgentConfig::server_token`], since the
/// apiserver proxies with the token `skiff up` gives the agents (debt: the admin token).
pub fn kubeconfig_token(text: &str) -> Option<String> {
    use secrecy::ExposeSecret as _;
    let kc = kube::config::Kubeconfig::from_yaml(text).ok()?;
    let context_name = kc.current_context.clone().or_else(|| kc.contexts.first().map(|c| c.name.clone()))?;
    let user = kc.contexts.iter().find(|c| c.name == context_name)?.context.as_ref()?.user.clone()?;
    let auth = kc.auth_infos.iter().find(|a| a.name == user)?.auth_info.as_ref()?;
    if let Some(t) = &auth.token {
        return Some(t.expose_secret().trim().to_string()).filter(|t| !t.is_empty());
    }
    let file = auth.token_file.as_ref()?;
    std::fs::read_to_string(file).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// Binds `cfg.listen` and serves until `shutdown` flips.
pub async fn serve(
    cfg: ServerConfig,
    client: kube::Client,
    runtime: Arc<dyn ContainerRuntime>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the agent endpoint {}", cfg.listen))?;
    info!(listen = %cfg.listen, "agent endpoint (logs, exec) listening");
    serve_listener(listener, cfg, client, runtime, shutdown).await
}

/// Serves on a bound listener (tests bind port 0 first to learn the port).
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    cfg: ServerConfig,
    client: kube::Client,
    runtime: Arc<dyn ContainerRuntime>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let tls = self_signed_tls(&cfg.cert_names, cfg.client_ca.as_deref())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let shared = Arc::new(Shared { cfg, client, runtime });
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let acceptor = acceptor.clone();
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => { debug!(%peer, "agent endpoint: TLS handshake failed: {e}"); return; }
                            Err(_) => return,
                        };
                        // A client certificate here passed the verifier (only when a CA is set).
                        let apiserver = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).is_some_and(|c| is_apiserver_cert(c));
                        let svc = hyper::service::service_fn(move |req| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(handle(shared, req, apiserver).await) }
                        });
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .with_upgrades()
                            .await
                        {
                            debug!(%peer, "agent endpoint connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!("agent endpoint: accepting failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
    Ok(())
}

/// An error answered as a `metav1.Status`.
#[derive(Debug)]
struct Failure {
    code: u16,
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Failure {
        Failure { code, reason, message: message.into() }
    }
    fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(400, "BadRequest", message)
    }
    fn not_found(message: impl Into<String>) -> Failure {
        Failure::new(404, "NotFound", message)
    }
    fn internal(message: impl Into<String>) -> Failure {
        Failure::new(500, "InternalError", message)
    }
    fn response(&self) -> Response<Body> {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code});
        let mut resp = Response::new(full(status.to_string()));
        *resp.status_mut() = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Whether a verified client certificate is the apiserver's (its CN), not another one the
/// cluster CA signed.
fn is_apiserver_cert(der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let cns: Vec<&str> = cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).collect();
    cns == [APISERVER_CLIENT_CN]
}

fn authorized(expected: &str, headers: &HeaderMap) -> bool {
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return false;
    };
    // Constant-time compare: the token is a cluster credential.
    let (a, b) = (token.as_bytes(), expected.as_bytes());
    !b.is_empty() && a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>, apiserver: bool) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resp = match route(&shared, req, apiserver).await {
        Ok(r) => r,
        Err(f) => f.response(),
    };
    debug!(%method, %path, status = resp.status().as_u16(), "agent endpoint request");
    resp
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>, apiserver: bool) -> Result<Response<Body>, Failure> {
    if req.uri().path() == "/healthz" {
        return Ok(Response::new(full("ok")));
    }
    if !apiserver && !authorized(&shared.cfg.token, req.headers()) {
        return Err(Failure::new(401, "Unauthorized", "Unauthorized"));
    }
    if req.uri().query().is_some_and(|q| q.len() > MAX_QUERY_BYTES) {
        return Err(Failure::new(
            414,
            "RequestURITooLong",
            format!("the query string is longer than the limit of {MAX_QUERY_BYTES} bytes"),
        ));
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if let [kind @ ("containerLogs" | "exec"), ns, pod, container] = segments.as_slice() {
        check_names(kind, ns, pod, container)?;
    }
    match (segments.as_slice(), req.method()) {
        (["containerLogs", ns, pod, container], &Method::GET) => {
            let pairs = query_pairs(req.uri().query());
            let opts = LogOptions::from_query(&pairs, Timestamp::now()).map_err(|e| Failure::bad_request(e.0))?;
            container_logs(shared, ns, pod, container, opts).await
        }
        (["exec", ns, pod, container], &Method::GET | &Method::POST) => {
            let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
            exec(shared, req, &ns, &pod, &container).await
        }
        (["containerLogs", ..] | ["exec", ..], _) => Err(Failure::new(405, "MethodNotAllowed", format!("{} is not allowed here", req.method()))),
        (["attach", ..] | ["portForward", ..] | ["run", ..], _) => {
            Err(Failure::bad_request("attach, port-forward and run are not served by skiff agents yet"))
        }
        _ => Err(Failure::not_found(format!("the agent serves no {path}"))),
    }
}

/// The longest query string read: kubectl sends a few hundred bytes; a long `exec` command line
/// still fits. (hyper itself answers 414 without a body past 64 KiB, http's URI limit.)
pub const MAX_QUERY_BYTES: usize = 32 * 1024;

/// RFC 1123 label: what namespace and container names are (and so never `.`, `..`, `/`, `%`).
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: what pod names are.
fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// The names in a logs/exec path are checked before they reach the API or a file path: a name
/// no pod, namespace or container can have is refused as such.
fn check_names(kind: &str, ns: &str, pod: &str, container: &str) -> Result<(), Failure> {
    let show = |s: &str| -> String { s.chars().take(80).collect() };
    if !is_dns1123_label(ns) {
        return Err(Failure::bad_request(format!("{kind}: namespace {:?} is not a valid namespace name (RFC 1123 label)", show(ns))));
    }
    if !is_dns1123_subdomain(pod) {
        return Err(Failure::bad_request(format!("{kind}: pod {:?} is not a valid pod name (RFC 1123 subdomain)", show(pod))));
    }
    if !is_dns1123_label(container) {
        return Err(Failure::bad_request(format!("{kind}: container {:?} is not a valid container name (RFC 1123 label)", show(container))));
    }
    Ok(())
}

/// The pod, if it is bound to this node.
async fn find_pod(shared: &Shared, ns: &str, name: &str) -> Result<Pod, Failure> {
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), ns);
    let pod = tokio::time::timeout(API_TIMEOUT, api.get_opt(name))
        .await
        .map_err(|_| Failure::internal("looking up the pod timed out"))?
        .map_err(|e| Failure::internal(format!("looking up the pod: {e}")))?;
    match pod {
        Some(p) if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(shared.cfg.node_name.as_str()) => Ok(p),
        _ => Err(Failure::not_found(format!("pod {ns}/{name} is not running on node {}", shared.cfg.node_name))),
    }
}

fn has_container(pod: &Pod, container: &str) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().chain(s.init_containers.iter().flatten()).any(|c| c.name == container)
    })
}

/// The attempts with a log file, ascending.
fn log_attempts(dir: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

async fn container_logs(shared: &Arc<Shared>, ns: &str, name: &str, container: &str, opts: LogOptions) -> Result<Response<Body>, Failure> {
    let pod = find_pod(shared, ns, name).await?;
    if !has_container(&pod, container) {
        return Err(Failure::bad_request(format!("container {container} is not valid for pod {name}")));
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let dir = shared.cfg.pods_dir.join(&uid).join("logs").join(container);
    let attempts = log_attempts(&dir);
    let attempt = if opts.previous {
        match attempts.len() {
            n if n >= 2 => attempts[n - 2],
            _ => return Err(Failure::bad_request(format!("previous terminated container \"{container}\" in pod \"{name}\" not found"))),
        }
    } else {
        match attempts.last() {
            Some(a) => *a,
            None => return Err(Failure::bad_request(format!("container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"))),
        }
    };
    let path = dir.join(format!("{attempt}.log"));
    let file = tokio::fs::File::open(&path).await.map_err(|e| Failure::internal(format!("opening the log {}: {e}", path.display())))?;
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let key = ContainerKey { pod_uid: uid, container: container.to_string(), attempt };
    let follow = opts.follow && !opts.previous;
    let runtime = shared.runtime.clone();
    tokio::spawn(async move {
        if let Err(e) = stream_log(file, path.clone(), dir, key, opts, follow, runtime, tx).await {
            debug!(log = %path.display(), "log stream ended: {e}");
        }
    });
    let body = StreamBody::new(tokio_stream_from(rx).map(|b| Ok::<_, std::io::Error>(Frame::data(b))));
    let mut resp = Response::new(http_body_util::BodyExt::boxed(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(resp)
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Whether following should stop: the attempt's container is no longer running (or a newer
/// attempt has begun).
async fn attempt_over(runtime: &Arc<dyn ContainerRuntime>, dir: &Path, key: &ContainerKey) -> bool {
    if log_attempts(dir).last().is_some_and(|a| *a > key.attempt) {
        return true;
    }
    let rt = runtime.clone();
    let id = key.id();
    match tokio::task::spawn_blocking(move || rt.observe(&id)).await {
        Ok(Ok(Observed::Running { .. } | Observed::Created)) => false,
        Ok(Ok(_)) => true,
        // The runtime could not say: keep following (the client can stop it).
        Ok(Err(_)) | Err(_) => false,
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_log(
    mut file: tokio::fs::File,
    path: PathBuf,
    dir: PathBuf,
    key: ContainerKey,
    opts: LogOptions,
    follow: bool,
    runtime: Arc<dyn ContainerRuntime>,
    tx: mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    let mut dec = CriDecoder::new();
    let mut filter = LogFilter::new(opts);
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Vec::new();
    let mut out = Vec::new();
    let closed = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away");

    // What the file holds now (tailLines applies to it).
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        dec.push(&buf[..n], &mut lines);
        for l in lines.drain(..) {
            filter.backlog(l, &mut out);
        }
        if !out.is_empty() {
            tx.send(Bytes::from(std::mem::take(&mut out))).await.map_err(|_| closed())?;
        }
        if filter.done() {
            return Ok(());
        }
    }
    if !follow {
        dec.finish(&mut lines);
    }
    for l in lines.drain(..) {
        filter.backlog(l, &mut out);
    }
    filter.end_backlog(&mut out);
    if !out.is_empty() {
        tx.send(Bytes::from(std::mem::take(&mut out))).await.map_err(|_| closed())?;
    }
    if !follow || filter.done() {
        return Ok(());
    }

    // Following: new bytes as they are written, until the attempt ends or the client goes.
    let started = Instant::now();
    let mut last_observe = Instant::now();
    let mut pos = file.stream_position().await?;
    while started.elapsed() < MAX_FOLLOW {
        let mut got = false;
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got = true;
            pos += n as u64;
            dec.push(&buf[..n], &mut lines);
        }
        for l in lines.drain(..) {
            filter.live(&l, &mut out);
        }
        if !out.is_empty() {
            tx.send(Bytes::from(std::mem::take(&mut out))).await.map_err(|_| closed())?;
        }
        if filter.done() {
            return Ok(());
        }
        // A file replaced under us (truncated or rotated) starts over from its beginning.
        if let Ok(meta) = tokio::fs::metadata(&path).await
            && meta.len() < pos
        {
            file = tokio::fs::File::open(&path).await?;
            pos = 0;
            continue;
        }
        if !got && last_observe.elapsed() >= FOLLOW_OBSERVE {
            last_observe = Instant::now();
            if attempt_over(&runtime, &dir, &key).await {
                // The writer is gone: what is left in the file is the end of it.
                loop {
                    let n = file.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    dec.push(&buf[..n], &mut lines);
                }
                dec.finish(&mut lines);
                for l in lines.drain(..) {
                    filter.live(&l, &mut out);
                }
                if !out.is_empty() {
                    tx.send(Bytes::from(std::mem::take(&mut out))).await.map_err(|_| closed())?;
                }
                return Ok(());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = tx.closed() => return Err(closed()),
        }
    }
    Ok(())
}

/// The container id of the latest attempt of `container` in the pod, when it runs.
async fn running_container(shared: &Shared, uid: &str, container: &str) -> Result<String, Failure> {
    let rt = shared.runtime.clone();
    let (uid, container) = (uid.to_string(), container.to_string());
    tokio::task::spawn_blocking(move || -> Result<String, Failure> {
        let ids = rt.list().map_err(|e| Failure::internal(format!("listing containers: {e}")))?;
        let latest = ids
            .iter()
            .filter_map(|id| ContainerKey::parse(id))
            .filter(|k| k.pod_uid == uid && k.container == container)
            .max_by_key(|k| k.attempt)
            .ok_or_else(|| Failure::bad_request(format!("container {container} is not running (it has not started)")))?;
        match rt.observe(&latest.id()).map_err(|e| Failure::internal(format!("looking at the container: {e}")))? {
            Observed::Running { .. } => Ok(latest.id()),
            _ => Err(Failure::bad_request(format!("container {container} is not running"))),
        }
    })
    .await
    .map_err(|e| Failure::internal(e.to_string()))?
}

fn header_values<'a>(headers: &'a HeaderMap, name: &str) -> impl Iterator<Item = &'a str> {
    headers.get_all(name).iter().filter_map(|v| v.to_str().ok())
}

async fn exec(shared: &Arc<Shared>, mut req: Request<Incoming>, ns: &str, name: &str, container: &str) -> Result<Response<Body>, Failure> {
    let pairs = query_pairs(req.uri().query());
    let argv: Vec<String> = pairs.iter().filter(|(k, _)| k == "command").map(|(_, v)| v.clone()).collect();
    let flag = |k: &str| pairs.iter().rev().find(|(key, _)| key == k).is_some_and(|(_, v)| v == "true" || v == "1");
    let streams = exec::Streams { stdin: flag("stdin"), stdout: flag("stdout"), stderr: flag("stderr"), tty: flag("tty") };
    if argv.is_empty() {
        return Err(Failure::bad_request("you must specify at least one command for the container"));
    }
    if !(streams.stdin || streams.stdout || streams.stderr) {
        return Err(Failure::bad_request("you must specify at least one of stdin, stdout, stderr"));
    }
    let pod = find_pod(shared, ns, name).await?;
    if !has_container(&pod, container) {
        return Err(Failure::bad_request(format!("container {container} is not valid for pod {name}")));
    }
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let id = running_container(shared, &uid, container).await?;

    let headers = req.headers();
    let is_websocket = header_values(headers, "upgrade").any(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_websocket {
        return Err(Failure::bad_request(
            "skiff agents stream exec over websocket (v5.channel.k8s.io, v4.channel.k8s.io), not SPDY: use kubectl 1.30 or newer",
        ));
    }
    let protocol = exec::negotiate(header_values(headers, "sec-websocket-protocol")).ok_or_else(|| {
        Failure::bad_request("no supported websocket subprotocol: the agent speaks v5.channel.k8s.io and v4.channel.k8s.io")
    })?;
    let key = headers
        .get("sec-websocket-key")
        .ok_or_else(|| Failure::bad_request("the websocket request has no Sec-WebSocket-Key"))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);

    let rt = shared.runtime.clone();
    let (id2, argv2, tty) = (id.clone(), argv.clone(), streams.tty);
    let child = tokio::task::spawn_blocking(move || rt.exec(&id2, &argv2, tty))
        .await
        .map_err(|e| Failure::internal(e.to_string()))?
        .map_err(|e| Failure::internal(format!("starting {argv:?} in container {container}: {e}")))?;
    info!(container = %id, ?argv, tty = streams.tty, "exec");

    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                exec::run_session(ws, protocol, child, argv, streams).await;
            }
            Err(e) => {
                warn!("exec: the websocket upgrade failed: {e}");
                let mut child = child;
                let _ = child.kill();
                let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol.name()));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_names_must_be_names() {
        assert!(check_names("exec", "default", "web-1.a", "c").is_ok());
        for (ns, pod, container) in [
            ("..", "p", "c"),
            ("default", "..", "c"),
            ("default", ".", "c"),
            ("default", "p", ".."),
            ("default", "a..b", "c"),
            ("default", "%2e%2e", "c"),
            ("default", "p", "c%2f"),
            ("Default", "p", "c"),
            ("default", "p", "-c"),
            ("default", &"p".repeat(254), "c"),
            ("default", "p", &"c".repeat(64)),
            ("default", "p\0", "c"),
        ] {
            let error = check_names("exec", ns, pod, container).expect_err(pod);
            assert_eq!(error.code, 400);
        }
    }

    #[test]
    fn bearer_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert!(!authorized("secret", &h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer secret"));
        assert!(authorized("secret", &h));
        assert!(!authorized("secreT", &h));
        assert!(!authorized("", &h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic secret"));
        assert!(!authorized("secret", &h));
    }

    #[test]
    fn attempts_come_from_log_file_names() {
        let d = tempfile::tempdir().expect("tmp");
        for f in ["0.log", "2.log", "10.log", "x.log", "3.txt"] {
            std::fs::write(d.path().join(f), "").expect("write");
        }
        assert_eq!(log_attempts(d.path()), vec![0, 2, 10]);
        assert!(log_attempts(&d.path().join("missing")).is_empty());
    }

    #[test]
    fn token_comes_from_the_current_context_user() {
        let kc = "apiVersion: v1\nkind: Config\ncurrent-context: b\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'}}]\n\
contexts: [{name: a, context: {cluster: c, user: ua}}, {name: b, context: {cluster: c, user: ub}}]\n\
users: [{name: ua, user: {token: wrong}}, {name: ub, user: {token: ' right '}}]\n";
        assert_eq!(kubeconfig_token(kc).as_deref(), Some("right"));
        assert_eq!(kubeconfig_token("not: [yaml"), None);
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("token");
        std::fs::write(&f, "from-file\n").expect("write");
        let kc = format!("apiVersion: v1\nkind: Config\ncontexts: [{{name: a, context: {{cluster: c, user: u}}}}]\nusers: [{{name: u, user: {{tokenFile: {}}}}}]\n", f.display());
        assert_eq!(kubeconfig_token(&kc).as_deref(), Some("from-file"));
    }

    #[test]
    fn self_signed_certificate_builds() {
        assert!(self_signed_tls(&["127.0.0.1".into(), "node-1".into()], None).is_ok());
        assert!(self_signed_tls(&["127.0.0.1".into()], Some("not a certificate")).is_err());
    }

    fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        (p.self_signed(&key).expect("ca"), key)
    }

    fn client_cert(ca: &(rcgen::Certificate, rcgen::KeyPair), cn: &str, eku: rcgen::ExtendedKeyUsagePurpose) -> (rustls::pki_types::CertificateDer<'static>, rustls::pki_types::PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &ca.0, &ca.1).expect("sign");
        (cert.der().clone(), rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
    }

    /// A TLS handshake against the agent's server config; Some(is the apiserver) when it succeeded.
    async fn handshake(server: Arc<rustls::ServerConfig>, client: Option<(rustls::pki_types::CertificateDer<'static>, rustls::pki_types::PrivateKeyDer<'static>)>) -> Option<bool> {
        #[derive(Debug)]
        struct AnyServer;
        impl rustls::client::danger::ServerCertVerifier for AnyServer {
            fn verify_server_cert(&self, _: &rustls::pki_types::CertificateDer<'_>, _: &[rustls::pki_types::CertificateDer<'_>], _: &rustls::pki_types::ServerName<'_>, _: &[u8], _: rustls::pki_types::UnixTime) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(&self, _: &[u8], _: &rustls::pki_types::CertificateDer<'_>, _: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(&self, _: &[u8], _: &rustls::pki_types::CertificateDer<'_>, _: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer));
        let config = match client {
            Some((c, k)) => builder.with_client_auth_cert(vec![c], k).expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let (client, server) = tokio::join!(
            async move {
                // TLS 1.3: the server judges the client certificate after the client finished;
                // a read surfaces its verdict.
                let mut s = connector.connect(name, a).await.ok()?;
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                s.write_all(b"x").await.ok()?;
                let mut buf = [0u8; 1];
                s.read(&mut buf).await.ok()
            },
            async move {
                let mut s = acceptor.accept(b).await.ok()?;
                let apiserver = s.get_ref().1.peer_certificates().and_then(|c| c.first()).is_some_and(|c| is_apiserver_cert(c));
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut buf = [0u8; 1];
                s.read_exact(&mut buf).await.ok()?;
                s.write_all(b"y").await.ok()?;
                Some(apiserver)
            }
        );
        client.and(server)
    }

    #[tokio::test]
    async fn only_the_apiserver_certificate_from_the_cluster_ca_counts() {
        let cluster = ca("skiff-ca");
        let other = ca("skiff-ca");
        let server = self_signed_tls(&["127.0.0.1".into()], Some(&cluster.0.pem())).expect("tls");
        let client_auth = rcgen::ExtendedKeyUsagePurpose::ClientAuth;
        assert_eq!(handshake(server.clone(), Some(client_cert(&cluster, APISERVER_CLIENT_CN, client_auth.clone()))).await, Some(true));
        // Another name from the same CA connects but is not the apiserver (it needs the token).
        assert_eq!(handshake(server.clone(), Some(client_cert(&cluster, "system:node:n1", client_auth.clone()))).await, Some(false));
        // No certificate: connects, bearer token needed.
        assert_eq!(handshake(server.clone(), None).await, Some(false));
        // Another CA's certificate with the right name, or a serving-only certificate: refused.
        assert_eq!(handshake(server.clone(), Some(client_cert(&other, APISERVER_CLIENT_CN, client_auth))).await, None);
        assert_eq!(handshake(server.clone(), Some(client_cert(&cluster, APISERVER_CLIENT_CN, rcgen::ExtendedKeyUsagePurpose::ServerAuth))).await, None);
        // Without a cluster CA, no certificate makes the apiserver.
        let plain = self_signed_tls(&["127.0.0.1".into()], None).expect("tls");
        assert_eq!(handshake(plain, None).await, Some(false));
    }
}
