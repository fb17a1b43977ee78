//! pods/log, pods/exec and pods/portforward: the apiserver finds the pod's node and proxies
//! the request to that node's agent (kubelet's paths: `/containerLogs/..`, `/exec/..`,
//! `/portForward/..`), as kube-apiserver's "upgrade-aware" proxy does:
//!
//! - a plain response (logs, errors) streams back as it comes (`kubectl logs -f`);
//! - an upgrade (websocket for exec, whatever protocol the agent agrees to) is relayed as two
//!   byte streams once both sides switched: the client's handshake goes to the agent unchanged,
//!   so its subprotocol choice and accept key come back to the client as the agent made them.
//!
//! The apiserver authenticates to agents with a short-lived client certificate its CA signs
//! (CN [`crate::tls::NODE_PROXY_CLIENT_CN`], clientAuth, re-issued every half hour), never with a
//! bearer token: a node that joined with a bootstrap token holds no apiserver credential, and a
//! certificate copied from a compromised node expires within the hour. Debt (for the security
//! issue): the agent's certificate is self-signed and not verified (signatures are checked, the
//! chain is not), so a node's address could be answered by an impostor, which would learn the
//! request (not a reusable credential).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, Method, Request, Response, header};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::State;
use crate::http::Resp;
use crate::objects::{decode_kv, key, store_error};
use skiff_api::registry;
use skiff_api::status::ApiError;

/// The port kubelets serve on, when a Node does not say.
const DEFAULT_AGENT_PORT: u16 = 10250;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Until the agent's response headers arrive (a log stream's headers come at once; the body
/// may then stream for as long as the client follows).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// `/api/v1/namespaces/{ns}/pods/{name}/{log|exec|attach|portforward}` -> (ns, name, sub).
pub fn pod_stream_path(path: &str) -> Option<(String, String, String)> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, sub @ ("log" | "exec" | "attach" | "portforward")] => {
            Some((ns.to_string(), name.to_string(), sub.to_string()))
        }
        _ => None,
    }
}

/// The container a request means: the one named, or the only one.
pub fn pick_container(pod: &Value, name: &str, requested: Option<&str>) -> Result<String, ApiError> {
    let names = |field: &str| -> Vec<String> {
        pod.pointer(&format!("/spec/{field}"))
            .and_then(Value::as_array)
            .map(|cs| cs.iter().filter_map(|c| c["name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    let containers = names("containers");
    let init = names("initContainers");
    let ephemeral = names("ephemeralContainers");
    match requested {
        Some(c) if containers.iter().chain(&init).chain(&ephemeral).any(|n| n == c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!("container {c} is not valid for pod {name}"))),
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => {
            let mut message = format!("a container name must be specified for pod {name}, choose one of: [{}]", containers.join(" "));
            if !init.is_empty() {
                message.push_str(&format!(" or one of the init containers: [{}]", init.join(" ")));
            }
            Err(ApiError::bad_request(message))
        }
    }
}

/// Where a Node's agent listens: its InternalIP (else ExternalIP) and its kubelet port.
pub fn agent_address(node: &Value) -> Option<SocketAddr> {
    let addresses = node.pointer("/status/addresses").and_then(Value::as_array)?;
    let ip: IpAddr = ["InternalIP", "ExternalIP"].iter().find_map(|want| {
        addresses.iter().find(|a| a["type"].as_str() == Some(want)).and_then(|a| a["address"].as_str()?.parse().ok())
    })?;
    let endpoint = node.pointer("/status/daemonEndpoints/kubeletEndpoint");
    // The Go field is `Port` (capitalized in JSON too); be lenient with `port`.
    let port = endpoint
        .and_then(|e| e.get("Port").or_else(|| e.get("port")))
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_AGENT_PORT);
    Some(SocketAddr::new(ip, port))
}

/// The agent's path and query for a pod subresource request.
pub fn agent_target(ns: &str, name: &str, sub: &str, container: Option<&str>, query: Option<&str>) -> String {
    let drop_keys: &[&str] = &["container", "insecureSkipTLSVerifyBackend"];
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !drop_keys.contains(&k.as_ref()) {
            q.append_pair(&k, &v);
        }
    }
    let q = q.finish();
    let enc = |s: &str| -> String { form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let path = match (sub, container) {
        ("log", Some(c)) => format!("/containerLogs/{}/{}/{}", enc(ns), enc(name), enc(c)),
        ("exec", Some(c)) => format!("/exec/{}/{}/{}", enc(ns), enc(name), enc(c)),
        _ => format!("/portForward/{}/{}", enc(ns), enc(name)),
    };
    if q.is_empty() { path } else { format!("{path}?{q}") }
}

fn query_get(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, v)| k == key && !v.is_empty())
        .map(|(_, v)| v.into_owned())
        .last()
}

/// Serves one pod subresource request by proxying it to the pod's agent.
pub async fn serve(state: &Arc<State>, parts: &mut Parts, ns: &str, name: &str, sub: &str) -> Result<Resp, ApiError> {
    match (sub, &parts.method) {
        ("log", &Method::GET) | ("exec" | "portforward", &Method::GET | &Method::POST) => {}
        ("attach", _) => {
            return Err(ApiError::bad_request(format!("pods/attach for {name:?}: attach is not supported by skiff agents yet")));
        }
        _ => return Err(ApiError::method_not_allowed(parts.method.as_str())),
    }
    let pods = registry::find("", "v1", "pods").ok_or_else(|| ApiError::internal("pods are not registered"))?;
    let kv = state.store.get(&key(pods, Some(ns), name)).await.map_err(store_error)?.ok_or_else(|| ApiError::not_found("pods", name))?;
    let pod = decode_kv(&kv)?;
    let query = parts.uri.query().map(str::to_string);
    let container = match sub {
        "portforward" => None,
        _ => Some(pick_container(&pod, name, query_get(query.as_deref(), "container").as_deref())?),
    };
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?;
    let nodes = registry::find("", "v1", "nodes").ok_or_else(|| ApiError::internal("nodes are not registered"))?;
    let node_kv = state.store.get(&key(nodes, None, node_name)).await.map_err(store_error)?.ok_or_else(|| ApiError::not_found("nodes", node_name))?;
    let node = decode_kv(&node_kv)?;
    let addr = agent_address(&node).ok_or_else(|| {
        ApiError::new(503, "ServiceUnavailable", format!("node {node_name} has no InternalIP or ExternalIP address to reach its agent on"))
    })?;
    let target = agent_target(ns, name, sub, container.as_deref(), query.as_deref());
    proxy(state, parts, addr, &target).await
}

/// Headers that belong to one hop (RFC 9110 7.6.1) or to our own authentication.
fn hop_by_hop(name: &HeaderName, upgrade: bool) -> bool {
    let always = [header::HOST, header::AUTHORIZATION, header::CONTENT_LENGTH, header::TRANSFER_ENCODING, header::TE, header::TRAILER, header::PROXY_AUTHORIZATION];
    if always.contains(name) || name.as_str() == "keep-alive" {
        return true;
    }
    // An upgrade must keep Connection and Upgrade: they are the handshake.
    !upgrade && (name == header::CONNECTION || name == header::UPGRADE)
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

fn bad_gateway(addr: SocketAddr, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(503, "ServiceUnavailable", format!("error dialing backend: the node agent at {addr}: {e}"))
}

async fn proxy(state: &Arc<State>, parts: &mut Parts, addr: SocketAddr, target: &str) -> Result<Resp, ApiError> {
    let upgrade = wants_upgrade(&parts.headers);
    let client_upgrade = if upgrade {
        Some(parts.extensions.remove::<hyper::upgrade::OnUpgrade>().ok_or_else(|| {
            ApiError::bad_request("this connection cannot be upgraded (HTTP/2?): connect with HTTP/1.1 for exec and port-forward")
        })?)
    } else {
        None
    };

    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| bad_gateway(addr, "connect timed out"))?
        .map_err(|e| bad_gateway(addr, e))?;
    let server_name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, tokio_rustls::TlsConnector::from(state.agent_tls.config()?).connect(server_name, tcp))
        .await
        .map_err(|_| bad_gateway(addr, "TLS handshake timed out"))?
        .map_err(|e| bad_gateway(addr, e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(tls))
        .await
        .map_err(|e| bad_gateway(addr, e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("agent connection ended: {e}");
        }
    });

    let mut req = Request::builder().method(parts.method.clone()).uri(target);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name, upgrade) {
            req = req.header(name, value);
        }
    }
    let req = req
        .header(header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| ApiError::internal(format!("building the agent request: {e}")))?;
    let mut resp = tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| bad_gateway(addr, "no response in time"))?
        .map_err(|e| bad_gateway(addr, e))?;

    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::internal("the node agent switched protocols on a request that asked for none"));
        };
        let agent_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (client, agent) = futures::join!(client_upgrade, agent_upgrade);
            match (client, agent) {
                (Ok(client), Ok(agent)) => {
                    let (mut c, mut a) = (TokioIo::new(client), TokioIo::new(agent));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut a).await {
                        tracing::debug!("relaying an upgraded pod stream ended: {e}");
                    }
                }
                (c, a) => tracing::debug!(client_ok = c.is_ok(), agent_ok = a.is_ok(), "a pod stream upgrade did not complete"),
            }
        });
        let mut out = Response::new(Body::empty());
        *out.status_mut() = resp.status();
        for (name, value) in resp.headers() {
            out.headers_mut().append(name, value.clone());
        }
        return Ok(out);
    }

    let (rparts, body) = resp.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = rparts.status;
    for (name, value) in &rparts.headers {
        if !hop_by_hop(name, false) {
            out.headers_mut().append(name, value.clone());
        }
    }
    Ok(out)
}

/// How long a node-proxy client certificate is valid; a new one is made at half its life.
const CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(3600);

/// The apiserver's TLS client side towards agents: its client certificate (see the module doc),
/// re-issued before it expires.
pub(crate) struct AgentClientTls {
    ca_key_pem: String,
    current: Mutex<Option<(Instant, Arc<rustls::ClientConfig>)>>,
}

impl AgentClientTls {
    pub fn new(ca_key_pem: String) -> Self {
        AgentClientTls { ca_key_pem, current: Mutex::new(None) }
    }

    pub fn config(&self) -> Result<Arc<rustls::ClientConfig>, ApiError> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((issued, config)) = current.as_ref()
            && issued.elapsed() < CLIENT_CERT_VALIDITY / 2
        {
            return Ok(config.clone());
        }
        let config = agent_tls(&self.ca_key_pem).map_err(|e| ApiError::internal(format!("making the node-proxy client certificate: {e:#}")))?;
        *current = Some((Instant::now(), config.clone()));
        Ok(config)
    }
}

/// TLS to agents with a fresh client certificate. Agents' certificates are self-signed, so the
/// chain is not verified (debt, see the module doc); the handshake signature still is, with
/// ring's algorithms.
fn agent_tls(ca_key_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use anyhow::Context as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert_pem, key_pem) = crate::tls::node_proxy_client_cert(ca_key_pem, CLIENT_CERT_VALIDITY)?;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("parsing the client certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("parsing the client key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(UnverifiedAgentCert(provider.clone()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .context("using the client certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct UnverifiedAgentCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for UnverifiedAgentCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stream_paths_are_recognized() {
        assert_eq!(
            pod_stream_path("/api/v1/namespaces/a/pods/p/log"),
            Some(("a".into(), "p".into(), "log".into()))
        );
        assert!(pod_stream_path("/api/v1/namespaces/a/pods/p/exec").is_some());
        assert!(pod_stream_path("/api/v1/namespaces/a/pods/p/status").is_none());
        assert!(pod_stream_path("/api/v1/namespaces/a/pods/p").is_none());
        assert!(pod_stream_path("/apis/apps/v1/namespaces/a/pods/p/log").is_none());
    }

    #[test]
    fn containers_are_picked_like_kubernetes() {
        let one = json!({"spec": {"containers": [{"name": "web"}]}});
        assert_eq!(pick_container(&one, "p", None).expect("only one"), "web");
        let e = pick_container(&one, "p", Some("nope")).expect_err("invalid");
        assert_eq!((e.code, e.message.as_str()), (400, "container nope is not valid for pod p"));
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}], "initContainers": [{"name": "i"}]}});
        let e = pick_container(&two, "p", None).expect_err("ambiguous");
        assert_eq!(e.code, 400);
        assert_eq!(e.message, "a container name must be specified for pod p, choose one of: [a b] or one of the init containers: [i]");
        assert_eq!(pick_container(&two, "p", Some("i")).expect("init"), "i");
    }

    #[test]
    fn agent_address_prefers_internal_ip_and_reads_port() {
        let node = json!({"status": {"addresses": [{"type": "Hostname", "address": "n1"}, {"type": "ExternalIP", "address": "1.2.3.4"}, {"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 12345}}}});
        assert_eq!(agent_address(&node), Some("127.0.0.1:12345".parse().expect("addr")));
        let no_port = json!({"status": {"addresses": [{"type": "ExternalIP", "address": "10.0.0.9"}]}});
        assert_eq!(agent_address(&no_port), Some("10.0.0.9:10250".parse().expect("addr")));
        assert_eq!(agent_address(&json!({"status": {"addresses": [{"type": "Hostname", "address": "n1"}]}})), None);
        assert_eq!(agent_address(&json!({})), None);
    }

    #[test]
    fn agent_targets_drop_the_container_parameter() {
        assert_eq!(
            agent_target("default", "p", "log", Some("c"), Some("container=c&follow=true&tailLines=1")),
            "/containerLogs/default/p/c?follow=true&tailLines=1"
        );
        assert_eq!(
            agent_target("default", "p", "exec", Some("c"), Some("command=sh&command=-c&command=exit+3&container=c&stdout=true")),
            "/exec/default/p/c?command=sh&command=-c&command=exit+3&stdout=true"
        );
        assert_eq!(agent_target("ns", "p", "portforward", None, Some("ports=80")), "/portForward/ns/p?ports=80");
        assert_eq!(agent_target("ns", "p", "log", Some("c"), None), "/containerLogs/ns/p/c");
    }
}
