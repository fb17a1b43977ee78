//! Service-account tokens: JWTs the apiserver signs (ES256, a P-256 key pair kept in the data
//! dir as `sa.key`), made by the TokenRequest subresource (`serviceaccounts/<name>/token`) and
//! bound to a pod as Kubernetes' bound tokens are: the claims name the ServiceAccount and the pod
//! (with their uids), and a token whose ServiceAccount or pod is gone (or was replaced by one of
//! the same name) no longer authenticates.
//!
//! Authenticates as `system:serviceaccount:<ns>:<name>` in `system:serviceaccounts` and
//! `system:serviceaccounts:<ns>`, with the pod in the user's extra attributes.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::State;
use crate::auth::UserInfo;
use crate::objects::{self, decode_kv, store_error};
use skiff_api::registry;
use skiff_api::status::ApiError;

pub const KEY_FILE: &str = "sa.key";
/// The issuer and default audience, as a kubeadm cluster's.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// Kubernetes refuses shorter TokenRequests.
const MIN_EXPIRATION_SECONDS: i64 = 600;
const MAX_EXPIRATION_SECONDS: i64 = 48 * 3600;

/// The signing key and its public half.
pub struct SigningKey {
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
}

impl SigningKey {
    /// Loads `sa.key` from the data dir, making it on first start.
    pub fn ensure(data_dir: &Path) -> anyhow::Result<SigningKey> {
        let path = data_dir.join(KEY_FILE);
        let pem = if path.exists() {
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        } else {
            let key = rcgen::KeyPair::generate().context("generating the service-account signing key")?;
            crate::tls::write_private(&path, &key.serialize_pem())?;
            key.serialize_pem()
        };
        let key = rcgen::KeyPair::from_pem(&pem).with_context(|| format!("{} is not a PEM key", path.display()))?;
        Ok(SigningKey {
            encoding: jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes()).context("loading the service-account signing key")?,
            decoding: jsonwebtoken::DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).context("loading the service-account public key")?,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Ref {
    name: String,
    uid: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: Ref,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<Ref>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Claims {
    iss: String,
    sub: String,
    aud: Vec<String>,
    exp: i64,
    iat: i64,
    nbf: i64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaims,
}

fn user_of(claims: &Claims) -> UserInfo {
    let k = &claims.kubernetes;
    let ns_group = format!("system:serviceaccounts:{}", k.namespace);
    let mut user = UserInfo::new(claims.sub.clone(), &["system:serviceaccounts", &ns_group]);
    user.uid = k.serviceaccount.uid.clone();
    if let Some(pod) = &k.pod {
        user.extra.push(("authentication.kubernetes.io/pod-name".into(), vec![pod.name.clone()]));
        user.extra.push(("authentication.kubernetes.io/pod-uid".into(), vec![pod.uid.clone()]));
    }
    user
}

async fn get(state: &State, plural: &str, ns: &str, name: &str) -> Result<Option<Value>, ApiError> {
    let info = registry::find("", "v1", plural).ok_or_else(|| ApiError::internal(format!("{plural} are not registered")))?;
    match state.store.get(&objects::key(info, Some(ns), name)).await.map_err(store_error)? {
        Some(kv) => Ok(Some(decode_kv(&kv)?)),
        None => Ok(None),
    }
}

fn uid(obj: &Value) -> &str {
    obj.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or("")
}

/// Checks a bearer token that is not the admin's or a bootstrap token.
pub(crate) async fn authenticate(state: &State, token: &str) -> Option<UserInfo> {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_issuer(&[ISSUER]);
    validation.set_audience(&[ISSUER]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = match jsonwebtoken::decode::<Claims>(token, &state.sa_key.decoding, &validation) {
        Ok(data) => data.claims,
        Err(error) => {
            tracing::debug!(%error, "a bearer token is not a valid service-account token");
            return None;
        }
    };
    let k = &claims.kubernetes;
    if claims.sub != format!("system:serviceaccount:{}:{}", k.namespace, k.serviceaccount.name) {
        return None;
    }
    // Bound: the ServiceAccount and the pod must still be the ones the token was made for.
    match get(state, "serviceaccounts", &k.namespace, &k.serviceaccount.name).await {
        Ok(Some(sa)) if uid(&sa) == k.serviceaccount.uid => {}
        _ => {
            tracing::info!(sa = %claims.sub, "service-account token refused: its ServiceAccount is gone");
            return None;
        }
    }
    if let Some(pod) = &k.pod {
        match get(state, "pods", &k.namespace, &pod.name).await {
            Ok(Some(p)) if uid(&p) == pod.uid && p.pointer("/metadata/deletionTimestamp").is_none_or(Value::is_null) => {}
            _ => {
                tracing::info!(sa = %claims.sub, pod = %pod.name, "service-account token refused: its pod is gone");
                return None;
            }
        }
    }
    Some(user_of(&claims))
}

/// `POST .../serviceaccounts/<name>/token` (authentication.k8s.io/v1 TokenRequest).
pub(crate) async fn token_request(state: &State, ns: &str, name: &str, body: &Value) -> Result<Value, ApiError> {
    let sa = get(state, "serviceaccounts", ns, name).await?.ok_or_else(|| ApiError::not_found("serviceaccounts", name))?;
    let spec = &body["spec"];
    let audiences: Vec<String> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => vec![ISSUER.to_string()],
    };
    let expiration = spec["expirationSeconds"].as_i64().unwrap_or(DEFAULT_EXPIRATION_SECONDS);
    if expiration < MIN_EXPIRATION_SECONDS {
        return Err(ApiError::invalid("TokenRequest", name, &[(
            "spec.expirationSeconds".into(),
            format!("Invalid value: {expiration}: may not specify a duration less than 10 minutes"),
        )]));
    }
    let expiration = expiration.min(MAX_EXPIRATION_SECONDS);
    let pod = match spec.get("boundObjectRef").filter(|r| r.is_object()) {
        None => None,
        Some(r) if r["kind"] == "Pod" => {
            let pod_name = r["name"].as_str().unwrap_or("");
            let pod = get(state, "pods", ns, pod_name).await?.ok_or_else(|| ApiError::not_found("pods", pod_name))?;
            if let Some(want) = r["uid"].as_str().filter(|u| !u.is_empty())
                && want != uid(&pod)
            {
                return Err(ApiError::conflict("pods", pod_name, "the pod's uid is not boundObjectRef.uid"));
            }
            let sa_of_pod = pod.pointer("/spec/serviceAccountName").and_then(Value::as_str).unwrap_or("default");
            if sa_of_pod != name {
                return Err(ApiError::bad_request(format!("pod {pod_name:?} runs as service account {sa_of_pod:?}, not {name:?}")));
            }
            Some(Ref { name: pod_name.to_string(), uid: uid(&pod).to_string() })
        }
        Some(r) => return Err(ApiError::bad_request(format!("boundObjectRef.kind {} is not supported (only Pod)", r["kind"]))),
    };
    let now = objects::now();
    let claims = Claims {
        iss: ISSUER.into(),
        sub: format!("system:serviceaccount:{ns}:{name}"),
        aud: audiences.clone(),
        exp: now.timestamp() + expiration,
        iat: now.timestamp(),
        nbf: now.timestamp(),
        kubernetes: KubernetesClaims {
            namespace: ns.into(),
            serviceaccount: Ref { name: name.into(), uid: uid(&sa).to_string() },
            pod,
        },
    };
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), &claims, &state.sa_key.encoding)
        .map_err(|e| ApiError::internal(format!("signing the token failed: {e}")))?;
    let expires = now + chrono::Duration::seconds(expiration);
    Ok(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": objects::timestamp(now)},
        "spec": {"audiences": audiences, "expirationSeconds": expiration, "boundObjectRef": spec.get("boundObjectRef").cloned().unwrap_or(Value::Null)},
        "status": {"token": token, "expirationTimestamp": objects::timestamp(expires)},
    }))
}

/// The `default` ServiceAccount of a new namespace (what kube-controller-manager's
/// serviceaccounts controller makes), written with the namespace.
pub(crate) fn default_service_account(ns: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}})
}
