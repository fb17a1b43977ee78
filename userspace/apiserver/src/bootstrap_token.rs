//! Bootstrap tokens, as kubeadm makes them: a node joins with `<id>.<secret>` (6 and 16 characters
//! of `[a-z0-9]`), stored as a Secret `kube-system/bootstrap-token-<id>` of type
//! `bootstrap.kubernetes.io/token` with `token-id`, `token-secret`, an optional RFC 3339
//! `expiration` and `usage-bootstrap-authentication: "true"`.
//!
//! Discovery, as kubeadm's: `kube-public/cluster-info` (a ConfigMap whose `kubeconfig` names the
//! server and carries the CA) is readable without credentials, so a joining node can fetch the CA
//! over an unverified connection and pin it by the hash it was given (the SHA-256 of the CA's
//! SubjectPublicKeyInfo) before sending its token anywhere.
//!
//! A valid token authenticates as `system:bootstrap:<id>` in the groups `system:bootstrappers`
//! and `system:bootstrappers:skiff:default-node-token`. RBAC lets that identity do one thing:
//! ask for a node client certificate (`csr`), which the agent then uses for everything; an
//! expired token therefore no longer matters to a node that joined.
//!
//! The agent endpoint (kubectl logs/exec) never sees a token of the apiserver: the apiserver
//! presents a short-lived client certificate from its CA (`node_proxy`), which an agent checks
//! against the CA it pinned while joining.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::State;
use crate::auth::UserInfo;
use crate::objects::{self, decode_kv, store_error};
use skiff_api::registry;
use skiff_api::status::ApiError;

pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
pub const SECRET_PREFIX: &str = "bootstrap-token-";
pub const CLUSTER_INFO_NAMESPACE: &str = "kube-public";
pub const CLUSTER_INFO_NAME: &str = "cluster-info";
/// The group kubeadm gives its default node token; the identity's groups say what it is.
pub const DEFAULT_GROUP: &str = "system:bootstrappers:skiff:default-node-token";

/// The identity a valid bootstrap token authenticates as (`system:bootstrap:<id>`).
pub fn user(token_id: &str) -> UserInfo {
    UserInfo::new(format!("system:bootstrap:{token_id}"), &[crate::auth::GROUP_BOOTSTRAPPERS, DEFAULT_GROUP])
}

/// `<id>.<secret>` split, when it has kubeadm's shape.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (ok(id, 6) && ok(secret, 16)).then_some((id, secret))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a stored bootstrap token Secret does not authenticate `secret` at `now` (None: it does).
pub fn refusal(obj: &Value, id: &str, secret: &str, now: DateTime<Utc>) -> Option<&'static str> {
    use base64::Engine as _;
    if obj["type"].as_str() != Some(SECRET_TYPE) {
        return Some("the Secret is not of type bootstrap.kubernetes.io/token");
    }
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        return Some("the token is being deleted");
    }
    let field = |k: &str| -> Option<String> {
        let b = obj["data"][k].as_str()?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
        String::from_utf8(raw).ok()
    };
    if field("token-id").as_deref() != Some(id) {
        return Some("token-id does not match the Secret's name");
    }
    match field("token-secret") {
        Some(s) if constant_time_eq(s.as_bytes(), secret.as_bytes()) => {}
        _ => return Some("wrong token secret"),
    }
    if field("usage-bootstrap-authentication").as_deref() != Some("true") {
        return Some("the token is not for authentication (usage-bootstrap-authentication)");
    }
    if let Some(exp) = field("expiration") {
        match DateTime::parse_from_rfc3339(&exp) {
            Ok(t) if t.with_timezone(&Utc) > now => {}
            Ok(_) => return Some("the token expired"),
            Err(_) => return Some("the token's expiration is not RFC 3339"),
        }
    }
    None
}

/// Checks a bearer token that has the bootstrap shape against its Secret in the store.
pub(crate) async fn authenticate(state: &State, token: &str) -> Option<UserInfo> {
    let (id, secret) = parse_token(token)?;
    let info = registry::find("", "v1", "secrets")?;
    let key = objects::key(info, Some("kube-system"), &format!("{SECRET_PREFIX}{id}"));
    let kv = match state.store.get(&key).await {
        Ok(Some(kv)) => kv,
        Ok(None) => return None,
        Err(error) => {
            tracing::warn!(%error, "reading a bootstrap token failed");
            return None;
        }
    };
    let obj = decode_kv(&kv).ok()?;
    match refusal(&obj, id, secret, objects::now()) {
        None => Some(user(id)),
        Some(why) => {
            tracing::info!(token_id = id, why, "bootstrap token refused");
            None
        }
    }
}

/// Requests anyone may make without credentials: reading the discovery ConfigMap.
pub fn is_public(method: &http::Method, path: &str) -> bool {
    (method == http::Method::GET || method == http::Method::HEAD)
        && path == format!("/api/v1/namespaces/{CLUSTER_INFO_NAMESPACE}/configmaps/{CLUSTER_INFO_NAME}")
}

/// The URL nodes should join at: `https://<bind address>`, or, when bound to every address, the
/// first non-loopback IPv4 address of this host (kubeadm's advertise address), else loopback.
pub fn advertise_url(addr: std::net::SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        if_addrs::get_if_addrs()
            .ok()
            .and_then(|ifaces| ifaces.into_iter().find(|i| !i.is_loopback() && i.ip().is_ipv4()).map(|i| i.ip()))
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
    } else {
        addr.ip()
    };
    format!("https://{}", std::net::SocketAddr::new(ip, addr.port()))
}

/// The kubeconfig `cluster-info` carries: the server and its CA, no user.
pub fn cluster_info_kubeconfig(server_url: &str, ca_pem: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    server: {server_url}\n    certificate-authority-data: {ca}\ncontexts: []\nusers: []\ncurrent-context: \"\"\npreferences: {{}}\n"
    )
}

/// Writes (or rewrites) a ConfigMap the apiserver owns.
async fn put_configmap(state: &State, ns: &str, name: &str, data: Value) -> Result<(), ApiError> {
    let info = registry::find("", "v1", "configmaps").ok_or_else(|| ApiError::internal("configmaps are not registered"))?;
    let key = objects::key(info, Some(ns), name);
    if let Some(kv) = state.store.get(&key).await.map_err(store_error)? {
        let current = decode_kv(&kv)?;
        if current["data"] == data {
            return Ok(());
        }
        // Replaced whole: nobody else writes these, and a restart with a new CA or address must win.
        let _ = state.store.delete(&key, Some(kv.mod_revision)).await;
    }
    let obj = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}, "data": data});
    match objects::create_object(state, info, Some(ns), obj, false).await {
        Ok(_) => Ok(()),
        Err(e) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Publishes `kube-public/cluster-info` at start.
pub(crate) async fn publish(state: &State, server_url: &str, ca_pem: &str) -> Result<(), ApiError> {
    put_configmap(state, CLUSTER_INFO_NAMESPACE, CLUSTER_INFO_NAME, json!({"kubeconfig": cluster_info_kubeconfig(server_url, ca_pem)})).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn secret(id: &str, secret: &str, expiration: Option<&str>, auth: &str) -> Value {
        let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut data = json!({"token-id": b(id), "token-secret": b(secret), "usage-bootstrap-authentication": b(auth)});
        if let Some(e) = expiration {
            data["expiration"] = json!(b(e));
        }
        json!({"type": SECRET_TYPE, "metadata": {"name": format!("bootstrap-token-{id}")}, "data": data})
    }

    #[test]
    fn token_shape() {
        assert_eq!(parse_token("abcdef.0123456789abcdef"), Some(("abcdef", "0123456789abcdef")));
        for bad in ["abcdef0123456789abcdef", "ABCDEF.0123456789abcdef", "abcde.0123456789abcdef", "abcdef.0123456789abcde", "abcdef.0123456789abcdef.x", ""] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn refusals() {
        let now = DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let (id, s) = ("abcdef", "0123456789abcdef");
        assert_eq!(refusal(&secret(id, s, Some("2030-01-02T00:00:00Z"), "true"), id, s, now), None);
        assert_eq!(refusal(&secret(id, s, None, "true"), id, s, now), None);
        assert_eq!(refusal(&secret(id, s, Some("2029-12-31T23:59:59Z"), "true"), id, s, now), Some("the token expired"));
        assert_eq!(refusal(&secret(id, s, None, "true"), id, "0123456789abcdee", now), Some("wrong token secret"));
        assert!(refusal(&secret(id, s, None, "false"), id, s, now).is_some());
        assert!(refusal(&secret(id, s, Some("tomorrow"), "true"), id, s, now).is_some());
        let mut wrong_type = secret(id, s, None, "true");
        wrong_type["type"] = json!("Opaque");
        assert!(refusal(&wrong_type, id, s, now).is_some());
        assert!(refusal(&secret("zzzzzz", s, None, "true"), id, s, now).is_some());
    }

    #[test]
    fn only_cluster_info_is_public() {
        assert!(is_public(&http::Method::GET, "/api/v1/namespaces/kube-public/configmaps/cluster-info"));
        assert!(!is_public(&http::Method::PUT, "/api/v1/namespaces/kube-public/configmaps/cluster-info"));
        assert!(!is_public(&http::Method::GET, "/api/v1/namespaces/kube-public/configmaps"));
        assert!(!is_public(&http::Method::GET, "/api/v1/namespaces/kube-system/configmaps/cluster-info"));
    }
}
