//! skiff-dns against a real in-process skiff-apiserver: Services and EndpointSlices created
//! through kube-rs, answers read over real UDP and TCP sockets on loopback.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_server::proto::op::{Message, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use skiff_dns::{DnsConfig, DnsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;

const REPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a change in the API may take to show in answers (the brief: a second or two).
const PROPAGATION: Duration = Duration::from_secs(2);

struct Apiserver {
    client: Client,
    _server: skiff_apiserver::RunningServer,
    _data: tempfile::TempDir,
}

async fn apiserver() -> Apiserver {
    let data = tempfile::tempdir().expect("temp data dir");
    let mut config = skiff_apiserver::ServerConfig::new(data.path().to_path_buf());
    config.bind = "127.0.0.1:0".parse().expect("loopback address");
    let server = skiff_apiserver::start(config)
        .await
        .expect("apiserver starts");
    let text = skiff_apiserver::kubeconfig(data.path()).expect("kubeconfig written");
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kube config");
    let client = Client::try_from(config).expect("kube client");
    Apiserver {
        client,
        _server: server,
        _data: data,
    }
}

/// A running DNS server; dropping it shuts it down.
struct Dns {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Dns {
    async fn start(client: &Client, domain: &str, upstream: Vec<SocketAddr>) -> Dns {
        let mut config = DnsConfig::new(vec!["127.0.0.1:0".parse().expect("addr")]);
        config.domain = domain.to_string();
        config.upstream = upstream;
        let server = DnsServer::bind(config).await.expect("DNS server binds");
        let addr = server.local_addrs()[0];
        assert_ne!(addr.port(), 0);
        let (stop, stopped) = oneshot::channel::<()>();
        let client = client.clone();
        let task = tokio::spawn(async move {
            server
                .run(client, async {
                    let _ = stopped.await;
                })
                .await
        });
        Dns {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("DNS server stops within 5 s")
            .expect("DNS task joined")
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn query_bytes(name: &str, qtype: RecordType) -> (u16, Vec<u8>) {
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_str(name).expect("name"), qtype));
    (msg.metadata.id, msg.to_vec().expect("encode query"))
}

async fn udp_exchange(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("client socket");
    socket.send_to(bytes, server).await.expect("send");
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(REPLY_TIMEOUT, socket.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

async fn udp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let (id, bytes) = query_bytes(name, qtype);
    let reply = udp_exchange(server, &bytes)
        .await
        .unwrap_or_else(|| panic!("no UDP reply for {name} {qtype}"));
    let msg = Message::from_vec(&reply).expect("reply decodes");
    assert_eq!(msg.metadata.id, id);
    msg
}

async fn tcp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let (id, bytes) = query_bytes(name, qtype);
    let exchange = async {
        let mut stream = TcpStream::connect(server).await.expect("tcp connect");
        let len = u16::try_from(bytes.len()).expect("short query");
        stream.write_all(&len.to_be_bytes()).await.expect("write");
        stream.write_all(&bytes).await.expect("write");
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.expect("reply length");
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await.expect("reply");
        reply
    };
    let reply = tokio::time::timeout(REPLY_TIMEOUT, exchange)
        .await
        .expect("TCP reply in time");
    let msg = Message::from_vec(&reply).expect("reply decodes");
    assert_eq!(msg.metadata.id, id);
    msg
}

fn answers(msg: &Message, rtype: RecordType) -> Vec<String> {
    let mut v: Vec<String> = msg
        .answers
        .iter()
        .filter(|r| r.record_type() == rtype)
        .map(|r| r.data.to_string())
        .collect();
    v.sort();
    v
}

/// Polls (bounded by `within`) until `check` holds for the UDP answer; returns how long it took.
async fn eventually(
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    within: Duration,
    check: impl Fn(&Message) -> bool,
) -> Duration {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < within {
        let msg = udp(server, name, qtype).await;
        if check(&msg) {
            return start.elapsed();
        }
        last = Some(msg);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} {qtype}: condition not met within {within:?}; last answer {last:?}");
}

async fn create_service(client: &Client, body: serde_json::Value) -> Service {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(body).expect("service json");
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service")
}

fn db_slice(endpoints: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "db-abcde", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .expect("slice json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_the_api_and_follows_changes() {
    let api = apiserver().await;
    let client = api.client.clone();

    let web = create_service(
        &client,
        json!({"metadata": {"name": "web", "namespace": "default"},
               "spec": {"selector": {"app": "web"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    )
    .await;
    let web_ip = web
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .expect("apiserver allocated a cluster IP");
    create_service(
        &client,
        json!({"metadata": {"name": "db", "namespace": "default"},
               "spec": {"clusterIP": "None",
                        "ports": [{"name": "pg", "port": 5432, "targetPort": 15432}]}}),
    )
    .await;
    create_service(
        &client,
        json!({"metadata": {"name": "ext", "namespace": "default"},
               "spec": {"type": "ExternalName", "externalName": "db.example.com"}}),
    )
    .await;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    slices
        .create(
            &PostParams::default(),
            &db_slice(json!([
                {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.6"], "hostname": "db-1", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.9"], "hostname": "db-2", "conditions": {"ready": false}},
            ])),
        )
        .await
        .expect("create slice");

    let dns = Dns::start(&client, "cluster.local", Vec::new()).await;
    let s = dns.addr;

    // The first answer waits for the initial lists (SERVFAIL before, never a false NXDOMAIN).
    eventually(s, "web.default.svc.cluster.local.", RecordType::A, Duration::from_secs(10), |m| {
        m.metadata.response_code == ResponseCode::NoError
    })
    .await;

    // ClusterIP Service over UDP and TCP, authoritative, TTL 5.
    for msg in [
        udp(s, "web.default.svc.cluster.local.", RecordType::A).await,
        tcp(s, "web.default.svc.cluster.local.", RecordType::A).await,
    ] {
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert!(msg.metadata.authoritative);
        assert_eq!(answers(&msg, RecordType::A), vec![web_ip.clone()]);
        assert!(msg.answers.iter().all(|r| r.ttl == 5));
    }
    // The apiserver's own Service.
    let k = udp(s, "kubernetes.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(answers(&k, RecordType::A).len(), 1, "{k:?}");

    // Headless: the ready endpoints; per-hostname names.
    let db = udp(s, "db.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(answers(&db, RecordType::A), vec!["10.244.1.5", "10.244.2.6"]);
    let db0 = udp(s, "db-0.db.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(answers(&db0, RecordType::A), vec!["10.244.1.5"]);
    let db2 = udp(s, "db-2.db.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(db2.metadata.response_code, ResponseCode::NXDomain, "unready endpoint");

    // SRV: Service port for ClusterIP; endpoint port and names for headless, with glue.
    let srv = udp(s, "_http._tcp.web.default.svc.cluster.local.", RecordType::SRV).await;
    assert_eq!(
        answers(&srv, RecordType::SRV),
        vec!["0 100 80 web.default.svc.cluster.local."]
    );
    let srv = tcp(s, "_pg._tcp.db.default.svc.cluster.local.", RecordType::SRV).await;
    assert_eq!(
        answers(&srv, RecordType::SRV),
        vec![
            "0 50 15432 db-0.db.default.svc.cluster.local.",
            "0 50 15432 db-1.db.default.svc.cluster.local.",
        ]
    );
    assert_eq!(srv.additionals.len(), 2, "glue A records: {srv:?}");

    // ExternalName: CNAME.
    let ext = udp(s, "ext.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(answers(&ext, RecordType::CNAME), vec!["db.example.com."]);

    // PTR of the ClusterIP.
    let ip: std::net::IpAddr = web_ip.parse().expect("cluster IP parses");
    let reverse = skiff_dns::reverse_name(ip).to_string();
    let ptr = udp(s, &reverse, RecordType::PTR).await;
    assert_eq!(
        answers(&ptr, RecordType::PTR),
        vec!["web.default.svc.cluster.local."]
    );

    // Unknown name in the domain: NXDOMAIN + SOA; outside: REFUSED (no upstream).
    let nx = udp(s, "nope.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.metadata.authoritative);
    assert_eq!(nx.authorities.len(), 1);
    assert!(matches!(nx.authorities[0].data, RData::SOA(_)), "{nx:?}");
    let out = udp(s, "example.com.", RecordType::A).await;
    assert_eq!(out.metadata.response_code, ResponseCode::Refused);
    let out = tcp(s, "example.com.", RecordType::A).await;
    assert_eq!(out.metadata.response_code, ResponseCode::Refused);

    // Changes: ExternalName retargeted, an endpoint becomes ready, a Service deleted.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services
        .patch(
            "ext",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"externalName": "other.example.org"}})),
        )
        .await
        .expect("patch ExternalName");
    let took = eventually(s, "ext.default.svc.cluster.local.", RecordType::CNAME, PROPAGATION, |m| {
        answers(m, RecordType::CNAME) == vec!["other.example.org."]
    })
    .await;
    eprintln!("ExternalName change visible after {took:?}");

    slices
        .patch(
            "db-abcde",
            &PatchParams::default(),
            &Patch::Merge(json!({"endpoints": [
                {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.6"], "hostname": "db-1", "conditions": {"ready": true}},
                {"addresses": ["10.244.2.9"], "hostname": "db-2", "conditions": {"ready": true}},
            ]})),
        )
        .await
        .expect("patch slice");
    let took = eventually(s, "db.default.svc.cluster.local.", RecordType::A, PROPAGATION, |m| {
        answers(m, RecordType::A) == vec!["10.244.1.5", "10.244.2.6", "10.244.2.9"]
    })
    .await;
    eprintln!("EndpointSlice change visible after {took:?}");

    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete web");
    let took = eventually(s, "web.default.svc.cluster.local.", RecordType::A, PROPAGATION, |m| {
        m.metadata.response_code == ResponseCode::NXDomain
    })
    .await;
    eprintln!("Service deletion visible after {took:?}");
    let ptr = udp(s, &reverse, RecordType::PTR).await;
    assert_eq!(ptr.metadata.response_code, ResponseCode::Refused, "PTR gone: {ptr:?}");

    dns.shutdown().await.expect("DNS server returns Ok on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_get_errors_or_silence_and_the_server_goes_on() {
    let api = apiserver().await;
    let dns = Dns::start(&api.client, "cluster.local", Vec::new()).await;
    let s = dns.addr;
    eventually(s, "kubernetes.default.svc.cluster.local.", RecordType::A, Duration::from_secs(10), |m| {
        m.metadata.response_code == ResponseCode::NoError
    })
    .await;

    // Two questions in one message: FORMERR.
    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_str("a.cluster.local.").expect("n"), RecordType::A));
    msg.add_query(Query::query(Name::from_str("b.cluster.local.").expect("n"), RecordType::A));
    let reply = udp_exchange(s, &msg.to_vec().expect("encode")).await.expect("a reply");
    let reply = Message::from_vec(&reply).expect("decodes");
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    // A header that promises a question it does not carry: FORMERR with the same id.
    let header_only = [0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    let reply = udp_exchange(s, &header_only).await.expect("a reply");
    let reply = Message::from_vec(&reply).expect("decodes");
    assert_eq!(reply.metadata.id, 0x1234);
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

    // Garbage of every length up to 300 bytes (deterministic, xorshift), over UDP; and a few
    // over TCP, including lengths that lie. Some get FORMERR, some silence: none may stop it.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("socket");
    for len in 0..300usize {
        let junk: Vec<u8> = (0..len).map(|_| next()).collect();
        client.send_to(&junk, s).await.expect("send junk");
    }
    for lie in [0u16, 1, 2, 500, 65535] {
        if let Ok(mut stream) = TcpStream::connect(s).await {
            let junk: Vec<u8> = (0..40).map(|_| next()).collect();
            let _ = stream.write_all(&lie.to_be_bytes()).await;
            let _ = stream.write_all(&junk).await;
            let _ = stream.shutdown().await;
        }
    }

    // Still answering, both transports.
    let ok = udp(s, "kubernetes.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(ok.metadata.response_code, ResponseCode::NoError);
    let ok = tcp(s, "kubernetes.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(ok.metadata.response_code, ResponseCode::NoError);
    // Another class than IN is refused; any type for an existing name is NODATA, not an error.
    let mut chaos = Message::query();
    chaos.add_query({
        let mut q = Query::query(Name::from_str("version.bind.").expect("n"), RecordType::TXT);
        q.set_query_class(hickory_server::proto::rr::DNSClass::CH);
        q
    });
    let reply = udp_exchange(s, &chaos.to_vec().expect("encode")).await.expect("reply");
    let reply = Message::from_vec(&reply).expect("decodes");
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    let nodata = udp(s, "kubernetes.default.svc.cluster.local.", RecordType::from(65280)).await;
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());

    dns.shutdown().await.expect("clean shutdown");
}

/// The optional upstream: a second skiff-dns for another domain stands in for the node's
/// upstream resolver (both on loopback), so forwarding is tested without any outside network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_domain_go_to_the_upstream_when_one_is_configured() {
    let api = apiserver().await;
    create_service(
        &api.client,
        json!({"metadata": {"name": "far", "namespace": "default"},
               "spec": {"ports": [{"port": 80}]}}),
    )
    .await;
    let upstream = Dns::start(&api.client, "upstream.test", Vec::new()).await;
    let dns = Dns::start(&api.client, "cluster.local", vec![upstream.addr]).await;
    let s = dns.addr;
    eventually(s, "far.default.svc.cluster.local.", RecordType::A, Duration::from_secs(10), |m| {
        m.metadata.response_code == ResponseCode::NoError
    })
    .await;
    let local = udp(s, "far.default.svc.cluster.local.", RecordType::A).await;
    let far_ip = answers(&local, RecordType::A);
    assert_eq!(far_ip.len(), 1);

    let forwarded = eventually(s, "far.default.svc.upstream.test.", RecordType::A, Duration::from_secs(10), |m| {
        m.metadata.response_code == ResponseCode::NoError
    })
    .await;
    eprintln!("forwarded answer after {forwarded:?}");
    let msg = udp(s, "far.default.svc.upstream.test.", RecordType::A).await;
    assert_eq!(answers(&msg, RecordType::A), far_ip);
    assert!(!msg.metadata.authoritative, "forwarded answers are not ours");
    assert!(msg.metadata.recursion_available);
    let msg = tcp(s, "far.default.svc.upstream.test.", RecordType::A).await;
    assert_eq!(answers(&msg, RecordType::A), far_ip);
    // The upstream's NXDOMAIN comes through.
    let nx = udp(s, "gone.default.svc.upstream.test.", RecordType::A).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain, "{nx:?}");
    // What the upstream refuses is a failure here, not a crash.
    let refused = udp(s, "example.com.", RecordType::A).await;
    assert_ne!(refused.metadata.response_code, ResponseCode::NoError);

    dns.shutdown().await.expect("clean shutdown");
    upstream.shutdown().await.expect("clean shutdown");
}

/// 60 endpoints do not fit 512 bytes: UDP without EDNS says TC (so the client retries over
/// TCP), TCP and UDP with a large EDNS buffer carry them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_truncate_over_plain_udp_and_come_whole_over_tcp_and_edns() {
    let api = apiserver().await;
    create_service(
        &api.client,
        json!({"metadata": {"name": "db", "namespace": "default"},
               "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
    )
    .await;
    let endpoints: Vec<serde_json::Value> = (0..60)
        .map(|i| json!({"addresses": [format!("10.244.7.{}", i + 2)]}))
        .collect();
    let slices: Api<EndpointSlice> = Api::namespaced(api.client.clone(), "default");
    slices
        .create(&PostParams::default(), &db_slice(json!(endpoints)))
        .await
        .expect("create slice");
    let dns = Dns::start(&api.client, "cluster.local", Vec::new()).await;
    let s = dns.addr;
    let name = "db.default.svc.cluster.local.";
    eventually(s, name, RecordType::A, Duration::from_secs(10), |m| {
        m.metadata.truncation || !m.answers.is_empty()
    })
    .await;

    let plain = udp(s, name, RecordType::A).await;
    assert!(plain.metadata.truncation, "TC expected: {} answers", plain.answers.len());
    assert!(plain.answers.len() < 60);
    let whole = tcp(s, name, RecordType::A).await;
    assert!(!whole.metadata.truncation);
    assert_eq!(answers(&whole, RecordType::A).len(), 60);

    let mut msg = Message::query();
    msg.add_query(Query::query(Name::from_str(name).expect("name"), RecordType::A));
    let mut edns = hickory_server::proto::op::Edns::new();
    edns.set_max_payload(4096);
    msg.edns = Some(edns);
    let reply = udp_exchange(s, &msg.to_vec().expect("encode")).await.expect("reply");
    let reply = Message::from_vec(&reply).expect("decodes");
    assert!(!reply.metadata.truncation);
    assert_eq!(answers(&reply, RecordType::A).len(), 60);
    assert!(reply.edns.is_some(), "EDNS answered with EDNS");

    dns.shutdown().await.expect("clean shutdown");
}
