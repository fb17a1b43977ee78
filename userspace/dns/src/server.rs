//! The I/O shell: kube-rs reflectors keep a [`ClusterZone`] current, hickory's UDP/TCP listeners
//! hand each request to [`ClusterHandler`], which answers from the zone, forwards, or refuses.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, Record};
use hickory_server::resolver::config::{NameServerConfig, ResolveHosts, ResolverOpts};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::{LookupOptions, MessageResponseBuilder, ZoneHandler};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Notify, watch};

use crate::zone::{ClusterZone, parse_domain};

/// Record TTL (seconds): short, so a changed Service is seen by clients within seconds.
pub const DEFAULT_TTL: u32 = 5;
/// Idle TCP connections are closed after this long.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How many times bind() retries a port-0 UDP port that TCP could not also take.
const BIND_ATTEMPTS: usize = 16;

/// Errors of setting the server up (bad configuration, sockets).
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Zone(#[from] crate::zone::ZoneError),
    #[error("no listen address given")]
    NoListenAddress,
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream resolver: {0}")]
    Upstream(String),
}

/// What the server serves.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Each address gets a UDP socket and a TCP listener on the same port. Port 0 picks a free
    /// port (the same for UDP and TCP); [`DnsServer::local_addrs`] tells which.
    pub listen: Vec<SocketAddr>,
    /// The cluster domain, `cluster.local` by default.
    pub domain: String,
    /// Record TTL in seconds.
    pub ttl: u32,
    /// Where names outside the cluster domain go (port included). Empty: they are REFUSED.
    pub upstream: Vec<SocketAddr>,
}

impl DnsConfig {
    pub fn new(listen: Vec<SocketAddr>) -> Self {
        Self {
            listen,
            domain: "cluster.local".to_string(),
            ttl: DEFAULT_TTL,
            upstream: Vec::new(),
        }
    }
}

/// A bound DNS server, not yet answering.
pub struct DnsServer {
    config: DnsConfig,
    domain: Name,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    upstream: Option<ForwardZoneHandler>,
}

impl DnsServer {
    /// Checks the configuration and binds every socket, so a bad address or a taken port is an
    /// error here rather than after the caller moved on.
    pub async fn bind(config: DnsConfig) -> Result<Self, DnsError> {
        let domain = parse_domain(&config.domain)?;
        if config.listen.is_empty() {
            return Err(DnsError::NoListenAddress);
        }
        let upstream = if config.upstream.is_empty() {
            None
        } else {
            Some(forwarder(&config.upstream)?)
        };
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for addr in &config.listen {
            let (u, t) = bind_pair(*addr).await?;
            udp.push(u);
            tcp.push(t);
        }
        Ok(Self {
            config,
            domain,
            udp,
            tcp,
            upstream,
        })
    }

    /// The bound addresses (UDP and TCP share each one).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp.iter().filter_map(|s| s.local_addr().ok()).collect()
    }

    /// Watches Services and EndpointSlices through `client` and answers queries until
    /// `shutdown` completes. Until the first full list of both kinds has arrived, names inside
    /// the cluster domain get SERVFAIL (clients retry) rather than a wrong NXDOMAIN.
    pub async fn run(
        self,
        client: kube::Client,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (zone_tx, zone_rx) = watch::channel::<Option<Arc<ClusterZone>>>(None);
        let changed = Arc::new(Notify::new());
        let services = reflect::<Service>(&client, changed.clone());
        let slices = reflect::<EndpointSlice>(&client, changed.clone());
        let mut tasks = vec![services.1, slices.1];
        tasks.push(tokio::spawn(rebuild_loop(
            self.domain.clone(),
            self.config.ttl,
            services.0,
            slices.0,
            changed,
            zone_tx,
        )));

        let handler = ClusterHandler {
            domain: self.domain.clone(),
            zone: zone_rx,
            upstream: self.upstream.map(Arc::new),
        };
        let mut server = hickory_server::Server::new(handler);
        for socket in self.udp {
            server.register_socket(socket);
        }
        for listener in self.tcp {
            server.register_listener(listener, TCP_IDLE, 64);
        }
        tracing::info!(
            domain = %self.domain,
            listen = ?self.config.listen,
            upstream = ?self.config.upstream,
            "cluster DNS serving"
        );

        let token = server.shutdown_token().clone();
        let result = tokio::select! {
            _ = shutdown => {
                token.cancel();
                server.block_until_done().await
            }
            r = server.block_until_done() => r,
        };
        for t in &tasks {
            t.abort();
        }
        result.map_err(|e| anyhow::anyhow!("DNS server stopped: {e}"))
    }
}

/// Binds UDP and TCP on one port; for port 0, retries until a UDP port is free for TCP too.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let err = |addr, source| DnsError::Bind { addr, source };
    let attempts = if addr.port() == 0 { BIND_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr).await.map_err(|e| err(addr, e))?;
        let bound = udp.local_addr().map_err(|e| err(addr, e))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(err(bound, e)),
        }
    }
    Err(last.unwrap_or(DnsError::NoListenAddress))
}

fn forwarder(upstream: &[SocketAddr]) -> Result<ForwardZoneHandler, DnsError> {
    let name_servers = upstream
        .iter()
        .map(|addr| {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            ns
        })
        .collect();
    let mut options = ResolverOpts::default();
    // This server is the pods' resolver: /etc/hosts of the node is not theirs.
    options.use_hosts_file = ResolveHosts::Never;
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    // Upstream answers are cached by the forwarder at most this long, so a changed upstream
    // record is seen soon (the upstream's own TTLs still bound it from below).
    options.positive_max_ttl = Some(Duration::from_secs(30));
    options.negative_max_ttl = Some(Duration::from_secs(5));
    let config = ForwardConfig {
        name_servers,
        options: Some(options),
    };
    ForwardZoneHandler::builder_tokio(config)
        .build()
        .map_err(DnsError::Upstream)
}

type Reflected<K> = (Store<K>, tokio::task::JoinHandle<()>);

fn reflect<K>(client: &kube::Client, changed: Arc<Notify>) -> Reflected<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let (reader, writer) = reflector::store::<K>();
    let kind = K::kind(&()).to_string();
    let task = tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                // The watcher retries with back-off; the zone keeps the last state meanwhile.
                Err(e) => tracing::warn!("watching {kind} failed (retrying): {e}"),
            }
        }
    });
    (reader, task)
}

/// Rebuilds the zone after each batch of watch events (a Notify permit coalesces a burst into
/// one rebuild) once both caches have had their initial list.
async fn rebuild_loop(
    domain: Name,
    ttl: u32,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    changed: Arc<Notify>,
    zone: watch::Sender<Option<Arc<ClusterZone>>>,
) {
    let _ = services.wait_until_ready().await;
    let _ = slices.wait_until_ready().await;
    // The serial only has to grow; seconds since the epoch start it above any earlier run's.
    let mut serial = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    loop {
        let svc_state = services.state();
        let slice_state = slices.state();
        let built = ClusterZone::build(
            &domain,
            ttl,
            serial,
            svc_state.iter().map(|s| s.as_ref()),
            slice_state.iter().map(|s| s.as_ref()),
        );
        for why in built.skipped() {
            tracing::debug!("cluster DNS skipped {why}");
        }
        if zone.send(Some(Arc::new(built))).is_err() {
            return; // the server is gone
        }
        serial = serial.wrapping_add(1);
        changed.notified().await;
    }
}

/// Answers names inside the cluster domain (and reverse names of cluster addresses) from the
/// current zone; forwards the rest to the upstream if there is one, else REFUSED.
pub struct ClusterHandler {
    domain: Name,
    zone: watch::Receiver<Option<Arc<ClusterZone>>>,
    upstream: Option<Arc<ForwardZoneHandler>>,
}

/// What goes back, before hickory encodes it.
struct Reply {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Reply {
    fn code(code: ResponseCode) -> Self {
        Self {
            code,
            authoritative: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

impl ClusterHandler {
    async fn resolve(&self, request: &Request) -> Reply {
        if request.metadata.op_code != OpCode::Query {
            return Reply::code(ResponseCode::NotImp);
        }
        let Ok(info) = request.request_info() else {
            // Not exactly one question.
            return Reply::code(ResponseCode::FormErr);
        };
        let query = info.query;
        let name: Name = query.name().into();
        if query.query_class() != DNSClass::IN {
            return Reply::code(ResponseCode::Refused);
        }
        let zone = self.zone.borrow().clone();
        if self.domain.zone_of(&name) {
            return match zone.and_then(|z| z.lookup(&name, query.query_type())) {
                Some(a) => Reply {
                    code: a.code,
                    authoritative: a.authoritative,
                    answers: a.answers,
                    authorities: a.authorities,
                    additionals: a.additionals,
                },
                // No complete view of the cluster yet.
                None => Reply::code(ResponseCode::ServFail),
            };
        }
        if let Some(a) = zone.and_then(|z| z.lookup(&name, query.query_type())) {
            return Reply {
                code: a.code,
                authoritative: a.authoritative,
                answers: a.answers,
                authorities: a.authorities,
                additionals: a.additionals,
            };
        }
        match &self.upstream {
            Some(upstream) => forward(upstream, query.name(), query.query_type()).await,
            None => Reply::code(ResponseCode::Refused),
        }
    }
}

async fn forward(
    upstream: &ForwardZoneHandler,
    name: &LowerName,
    qtype: hickory_server::proto::rr::RecordType,
) -> Reply {
    let flow = upstream
        .lookup(name, qtype, None, LookupOptions::default())
        .await;
    match flow.map_result() {
        Some(Ok(lookup)) => {
            let mut reply = Reply::code(ResponseCode::NoError);
            reply.answers = lookup.iter().cloned().collect();
            reply.additionals = lookup
                .additionals()
                .map(|a| a.cloned().collect())
                .unwrap_or_default();
            reply
        }
        Some(Err(e)) => {
            let code = if e.is_nx_domain() {
                ResponseCode::NXDomain
            } else if e.is_no_records_found() {
                ResponseCode::NoError
            } else {
                tracing::debug!("forwarding {name} {qtype} failed: {e}");
                ResponseCode::ServFail
            };
            let mut reply = Reply::code(code);
            reply.authorities = e.authorities().map(|a| a.to_vec()).unwrap_or_default();
            reply
        }
        None => Reply::code(ResponseCode::ServFail),
    }
}

#[async_trait::async_trait]
impl RequestHandler for ClusterHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        // EDNS as hickory's Catalog answers it: echo an OPT with our payload size.
        let response_edns = request.edns.as_ref().map(|req| {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().max(512));
            edns.set_version(0);
            edns
        });
        let reply = match request.edns.as_ref() {
            Some(req) if req.version() > 0 => Reply::code(ResponseCode::BADVERS),
            _ => self.resolve(request).await,
        };

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = reply.code;
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = self.upstream.is_some();
        let builder = MessageResponseBuilder::new(&request.queries, response_edns.as_ref());
        let response = builder.build(
            metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!("sending a DNS response failed: {e}");
                let mut failed = Metadata::response_from_request(&request.metadata);
                failed.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: failed,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
