//! The HTTPS listener, authentication and routing of Kubernetes REST paths.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::State;
use crate::objects;
use skiff_api::openapi;
use skiff_api::registry::{self, ResourceInfo};
use skiff_api::status::ApiError;

/// Request bodies larger than this are refused with 413 (Kubernetes' own limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

pub type Resp = Response<Body>;

pub async fn serve(
    listener: tokio::net::TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    state: Arc<State>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config);
    // Connections live in this set: when serving stops, dropping it ends them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let acceptor = acceptor.clone();
                    let state = state.clone();
                    connections.spawn(async move {
                        let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "tls handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        // The client certificate (if any) was verified against the cluster CA
                        // in the handshake; who it names holds for every request on it.
                        let cert_user: Option<Arc<crate::auth::UserInfo>> = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|der| crate::auth::user_from_certificate(der.as_ref()))
                            .map(Arc::new);
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let state = state.clone();
                            let cert_user = cert_user.clone();
                            async move { Ok::<_, Infallible>(handle(state, req, cert_user.as_deref()).await) }
                        });
                        if let Err(error) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(%peer, %error, "connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

/// The query string, with empty values treated as absent (`?&labelSelector=` is common).
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(q: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

/// Everything a handler needs from one request.
pub struct Ctx {
    pub method: Method,
    pub query: Query,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Who sent it (None only on the public paths).
    pub user: Option<crate::auth::UserInfo>,
}

impl Ctx {
    pub fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn wants_table(&self) -> bool {
        self.header(header::ACCEPT)
            .split(',')
            .next()
            .is_some_and(|first| first.contains("as=Table"))
    }

    pub fn dry_run(&self) -> Result<bool, ApiError> {
        match self.query.get("dryRun") {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "dryRun {other:?} is not supported; the only value is All"
            ))),
        }
    }

    /// The request body decoded from JSON (also when no Content-Type is sent) or YAML.
    pub fn decode_body(&self) -> Result<Value, ApiError> {
        let ct = self.header(header::CONTENT_TYPE);
        decode(ct, &self.body)
    }
}

pub fn media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

pub fn decode(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    match media_type(content_type).as_str() {
        "" | "application/json" | "*/*" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
        "application/yaml"
        | "application/x-yaml"
        | "text/yaml"
        | "application/apply-patch+yaml" => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}"))),
        crate::protobuf::MEDIA_TYPE => crate::protobuf::decode(body),
        _ => Err(ApiError::unsupported_media_type(content_type)),
    }
}

pub fn json_response(code: u16, value: &Value, warnings: &[String]) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        let text = format!("299 - \"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

pub fn error_response(err: &ApiError) -> Resp {
    json_response(err.code, &err.to_status(), &[])
}

async fn handle(state: Arc<State>, req: Request<Incoming>, cert_user: Option<&crate::auth::UserInfo>) -> Resp {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match handle_inner(state, req, cert_user).await {
        Ok(resp) => resp,
        Err(err) => error_response(&err),
    };
    let status = resp.status().as_u16();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if status >= 500 {
        tracing::warn!(%method, %path, status, elapsed_ms, "request failed in the server");
    } else {
        tracing::debug!(%method, %path, status, elapsed_ms, "request");
    }
    resp
}

async fn read_body(body: Incoming, headers: &HeaderMap) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError::too_large(MAX_BODY_BYTES));
    }
    match http_body_util::Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::too_large(MAX_BODY_BYTES))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body failed: {e}"
        ))),
    }
}

async fn handle_inner(state: Arc<State>, req: Request<Incoming>, cert_user: Option<&crate::auth::UserInfo>) -> Result<Resp, ApiError> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = Query::parse(parts.uri.query());

    // Health and version are public, as in Kubernetes (system:public-info-viewer).
    match path.as_str() {
        "/healthz" | "/livez" | "/readyz" => {
            let mut resp = Response::new(Body::from("ok"));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return Ok(resp);
        }
        "/version" => return Ok(json_response(200, &version(), &[])),
        _ => {}
    }
    // Discovery (kube-public/cluster-info) is readable anonymously, as kubeadm's is; everything
    // else needs a known identity (see `auth`).
    let user = match crate::auth::authenticate(&state, &parts.headers, cert_user).await {
        crate::auth::Outcome::User(user) => Some(user),
        crate::auth::Outcome::Anonymous if crate::bootstrap_token::is_public(&parts.method, &path) => None,
        crate::auth::Outcome::Anonymous | crate::auth::Outcome::Refused => return Err(ApiError::unauthorized()),
    };
    let user = match user {
        Some(u) => Some(crate::authz::impersonate(&state, u, &parts.headers).await?),
        None => None,
    };
    // Logs, exec and port-forward go to the pod's node agent, before any body is read (an
    // upgrade keeps its connection).
    let attributes = crate::authz::attributes(&parts.method, &path, &query);
    if let Some((ns, name, sub)) = crate::node_proxy::pod_stream_path(&path) {
        authorize(&state, user.as_ref(), &attributes, None).await?;
        return crate::node_proxy::serve(&state, &mut parts, &ns, &name, &sub).await;
    }
    let body = if matches!(
        parts.method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        read_body(body, &parts.headers).await?
    } else {
        Bytes::new()
    };
    let ctx = Ctx {
        method: parts.method,
        query,
        headers: parts.headers,
        body,
        user: user.clone(),
    };
    // A create names its object only in the body, which the node authorizer needs; a body that
    // does not decode is refused later by the handler with its own error.
    let decoded = (ctx.method == Method::POST && !ctx.body.is_empty()).then(|| ctx.decode_body().ok()).flatten();
    authorize(&state, ctx.user.as_ref(), &attributes, decoded.as_ref()).await?;
    // SelfSubjectAccessReviews are answered, never stored.
    if attributes.api_group == "authorization.k8s.io" && attributes.resource == "selfsubjectaccessreviews" {
        let (Some(user), Some(body)) = (ctx.user.as_ref(), decoded.as_ref()) else {
            return Err(match ctx.method {
                Method::POST => ctx.decode_body().err().unwrap_or_else(|| ApiError::bad_request("a SelfSubjectAccessReview needs a JSON, YAML or protobuf body")),
                _ => ApiError::method_not_allowed(ctx.method.as_str()),
            });
        };
        let review = crate::authz::self_subject_access_review(&state, user, body).await?;
        return Ok(json_response(201, &review, &[]));
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["api"] => {
            only_get(&ctx)?;
            Ok(discovery_root(&ctx, true))
        }
        ["apis"] => {
            only_get(&ctx)?;
            Ok(discovery_root(&ctx, false))
        }
        ["api", "v1"] => {
            only_get(&ctx)?;
            resource_list("", "v1")
        }
        ["apis", group] => {
            only_get(&ctx)?;
            let versions: Vec<&str> = registry::groups()
                .into_iter()
                .filter(|(g, _)| g == group)
                .map(|(_, v)| v)
                .collect();
            let Some(preferred) = versions.first() else {
                return Err(not_found_path(&path));
            };
            let gvs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                .collect();
            Ok(json_response(
                200,
                &json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": gvs,
                        "preferredVersion": {"groupVersion": format!("{group}/{preferred}"), "version": preferred}}),
                &[],
            ))
        }
        ["apis", group, version] => {
            only_get(&ctx)?;
            resource_list(group, version)
        }
        ["openapi", "v3"] => {
            only_get(&ctx)?;
            Ok(json_response(200, openapi::v3_root_cached(), &[]))
        }
        ["openapi", "v3", "api", version] => openapi_doc(&ctx, "", version),
        ["openapi", "v3", "apis", group, version] => openapi_doc(&ctx, group, version),
        ["api", "v1", rest @ ..] => {
            let target = resolve("", "v1", rest).ok_or_else(|| not_found_path(&path))?;
            objects::dispatch(&state, &ctx, target).await
        }
        ["apis", group, version, rest @ ..] => {
            let target = resolve(group, version, rest).ok_or_else(|| not_found_path(&path))?;
            objects::dispatch(&state, &ctx, target).await
        }
        _ => Err(not_found_path(&path)),
    }
}

/// 403 unless the user may do what the request asks (anonymous requests reach here only on the
/// public paths, which need no authorization).
async fn authorize(
    state: &State,
    user: Option<&crate::auth::UserInfo>,
    attributes: &crate::authz::Attributes,
    body: Option<&Value>,
) -> Result<(), ApiError> {
    let Some(user) = user else { return Ok(()) };
    if crate::authz::allowed(state, user, attributes, body).await? {
        Ok(())
    } else {
        tracing::debug!(user = %user.name, verb = %attributes.verb, resource = %attributes.resource, path = %attributes.path, "forbidden");
        Err(crate::authz::forbidden(user, attributes))
    }
}

fn only_get(ctx: &Ctx) -> Result<(), ApiError> {
    if ctx.method == Method::GET || ctx.method == Method::HEAD {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(ctx.method.as_str()))
    }
}

fn not_found_path(path: &str) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("the server could not find the requested resource ({path})"),
    )
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-skiff",
        "gitCommit": env!("CARGO_PKG_VERSION"),
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
    })
}

/// The aggregated discovery version the Accept header asks for first, if any.
fn aggregated_version(accept: &str) -> Option<&'static str> {
    for range in accept.split(',') {
        if !range.contains("as=APIGroupDiscoveryList") {
            continue;
        }
        let params: Vec<&str> = range.split(';').map(str::trim).collect();
        if params.contains(&"v=v2") {
            return Some("v2");
        }
        if params.contains(&"v=v2beta1") {
            return Some("v2beta1");
        }
    }
    None
}

fn discovery_root(ctx: &Ctx, core: bool) -> Resp {
    match aggregated_version(ctx.header(header::ACCEPT)) {
        Some(v) => {
            let doc = registry::discovery_aggregated(core, v);
            let mut resp = json_response(200, &doc, &[]);
            let ct =
                format!("application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList");
            if let Ok(ct) = HeaderValue::from_str(&ct) {
                resp.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            resp.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("Accept"));
            resp
        }
        None if core => json_response(200, &registry::discovery_api_versions(), &[]),
        None => json_response(200, &registry::discovery_api_group_list(), &[]),
    }
}

fn resource_list(group: &str, version: &str) -> Result<Resp, ApiError> {
    registry::discovery_resource_list(group, version)
        .map(|doc| json_response(200, &doc, &[]))
        .ok_or_else(|| {
            let gv = if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            };
            ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource (group version {gv})"),
            )
        })
}

/// A stable hash of a document, for `?hash=` URLs and ETags (FNV-1a over its JSON text: stable
/// across processes, unlike the std hasher's random keys).
fn openapi_doc(ctx: &Ctx, group: &str, version: &str) -> Result<Resp, ApiError> {
    only_get(ctx)?;
    // The documents are generated and serialized once per process (skiff_api::openapi): a
    // request copies no JSON tree, and the hash in the index's URLs is the ETag.
    let (bytes, hash) = openapi::v3_group_version_bytes(group, version)
        .ok_or_else(|| not_found_path(&format!("/openapi/v3/{group}/{version}")))?;
    let etag = format!("\"{hash}\"");
    let mut resp = Response::new(Body::from(bytes));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if ctx.query.get("hash").is_some() {
            "public, immutable"
        } else {
            "no-cache, private"
        }),
    );
    Ok(resp)
}

/// What a REST path names below `/api/v1` or `/apis/{g}/{v}`.
#[derive(Debug, Clone)]
pub struct Target {
    pub info: &'static ResourceInfo,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

pub fn resolve(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    // Kubernetes' path segment rule for names and namespaces: never "." or "..", never a '%'
    // (no escaped '/' or dot reaches a store key); such a path names nothing.
    if rest.iter().any(|s| matches!(*s, "." | "..") || s.contains('%')) {
        return None;
    }
    let namespaced_plural = |p: &str| registry::find(group, version, p).filter(|r| r.namespaced);
    let target = |info, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        Some(Target {
            info,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            sub: sub.map(str::to_string),
        })
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced_plural(plural).is_some() => {
            let info = namespaced_plural(plural)?;
            match tail {
                [] => target(info, Some(ns), None, None),
                [name] => target(info, Some(ns), Some(name), None),
                [name, sub] => target(info, Some(ns), Some(name), Some(sub)),
                _ => None,
            }
        }
        [plural, tail @ ..] => {
            let info = registry::find(group, version, plural)?;
            match tail {
                // A namespaced plural without a namespace is the all-namespaces collection.
                [] => target(info, None, None, None),
                [name] if !info.namespaced => target(info, None, Some(name), None),
                [name, sub] if !info.namespaced => target(info, None, Some(name), Some(sub)),
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_to_targets() {
        let t = resolve("", "v1", &["namespaces", "a", "pods", "p", "status"]).expect("pod status");
        assert_eq!(
            (
                t.info.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.sub.as_deref()
            ),
            ("pods", Some("a"), Some("p"), Some("status"))
        );
        let t = resolve("", "v1", &["namespaces", "a"]).expect("namespace item");
        assert_eq!(
            (t.info.plural, t.name.as_deref()),
            ("namespaces", Some("a"))
        );
        let t = resolve("", "v1", &["namespaces", "a", "finalize"]).expect("namespace finalize");
        assert_eq!(t.sub.as_deref(), Some("finalize"));
        let t = resolve("", "v1", &["pods"]).expect("all pods");
        assert!(t.namespace.is_none() && t.name.is_none());
        assert!(resolve("", "v1", &["pods", "x"]).is_none());
        assert!(resolve("", "v1", &["nope"]).is_none());
    }

    #[test]
    fn aggregated_discovery_version_follows_accept() {
        let both = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(both), Some("v2"));
        assert_eq!(
            aggregated_version(
                "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
            ),
            Some("v2beta1")
        );
        assert_eq!(aggregated_version("application/json"), None);
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::decode;
    use skiff_api::{admission, registry};

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            "[a-zA-Z0-9:./-]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            let keys = prop_oneof![
                Just("metadata".to_string()),
                Just("spec".to_string()),
                Just("status".to_string()),
                Just("name".to_string()),
                Just("apiVersion".to_string()),
                Just("kind".to_string()),
                Just("containers".to_string()),
                Just("ports".to_string()),
                "[a-z]{1,8}",
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(keys, inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Request bodies come from anyone: decoding never panics, whatever the bytes.
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            for ct in ["", "application/json", "application/yaml", "application/vnd.kubernetes.protobuf"] {
                let _ = decode(ct, &bytes);
            }
        }

        /// Admission of any JSON shape for any served kind answers Ok or a 4xx, never panics.
        #[test]
        fn admitting_any_json_never_panics(body in json_value()) {
            for info in registry::all() {
                for mode in [admission::FieldValidation::Strict, admission::FieldValidation::Ignore] {
                    match admission::admit(info, Some("default"), body.clone(), mode) {
                        Ok(mut admitted) => {
                            admission::prepare_create(info, &mut admitted.object, chrono::Utc::now());
                            let old = admitted.object.clone();
                            let _ = admission::prepare_update(info, &old, &mut admitted.object, None);
                        }
                        Err(e) => prop_assert!((400..500).contains(&e.code), "{e}"),
                    }
                }
            }
        }
    }
}
