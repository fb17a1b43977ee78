//! Request bodies in Kubernetes' protobuf encoding (`application/vnd.kubernetes.protobuf`), which
//! kubectl 1.32 sends for `auth can-i` (SelfSubjectAccessReview) and `create configmap|secret`:
//! the 4-byte magic `k8s\0`, then a `runtime.Unknown` whose `typeMeta` names the kind and whose
//! `raw` is the object's message. The messages are k8s-pb's (prost, generated from Kubernetes'
//! own .proto files); what is written here by hand is only the mapping of the decoded message to
//! the JSON object the handlers take, because k8s-pb derives no serde and k8s-openapi has no
//! protobuf. Kinds not mapped are answered 415, which kubectl reports (it does not fall back to
//! JSON); responses stay JSON, which kubectl's Accept (`protobuf,application/json`) allows.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_pb::api::authorization::v1::SelfSubjectAccessReview;
use k8s_pb::api::core::v1::{ConfigMap, Secret};
use k8s_pb::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message as _;
use serde_json::{Map, Value, json};

use crate::status::ApiError;

pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

fn bad(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("the protobuf request body is not a valid {what}: {e}"))
}

/// A body as the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| ApiError::bad_request("the protobuf request body does not start with the k8s\\0 magic"))?;
    let unknown = Unknown::decode(envelope).map_err(|e| bad("runtime.Unknown", e))?;
    if unknown.content_encoding.as_deref().is_some_and(|e| !e.is_empty()) {
        return Err(ApiError::new(415, "UnsupportedMediaType", "protobuf bodies with a contentEncoding are not decoded; send application/json"));
    }
    let type_meta = unknown.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let raw = unknown.raw.unwrap_or_default();
    let mut obj = match (api_version.as_str(), kind.as_str()) {
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => {
            self_subject_access_review(SelfSubjectAccessReview::decode(raw.as_slice()).map_err(|e| bad(&kind, e))?)
        }
        ("v1", "ConfigMap") => config_map(ConfigMap::decode(raw.as_slice()).map_err(|e| bad(&kind, e))?),
        ("v1", "Secret") => secret(Secret::decode(raw.as_slice()).map_err(|e| bad(&kind, e))?),
        _ => {
            return Err(ApiError::new(415, "UnsupportedMediaType", format!(
                "the body of the request was in an unknown format: skiff decodes {MEDIA_TYPE} only for SelfSubjectAccessReview, ConfigMap and Secret (got {kind} {api_version}); send application/json or application/yaml"
            )));
        }
    };
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

fn set_str(out: &mut Map<String, Value>, key: &str, v: Option<String>) {
    if let Some(v) = v.filter(|v| !v.is_empty()) {
        out.insert(key.into(), json!(v));
    }
}

fn string_map(m: BTreeMap<String, String>) -> Value {
    Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
}

fn bytes_map(m: BTreeMap<String, Vec<u8>>) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(b64.encode(v)))).collect())
}

/// The metadata a client sets on a create (server-owned fields, like uid or
/// creationTimestamp, are the server's to set and are left out).
fn metadata(meta: Option<ObjectMeta>) -> Value {
    let meta = meta.unwrap_or_default();
    let mut out = Map::new();
    set_str(&mut out, "name", meta.name);
    set_str(&mut out, "generateName", meta.generate_name);
    set_str(&mut out, "namespace", meta.namespace);
    set_str(&mut out, "resourceVersion", meta.resource_version);
    set_str(&mut out, "uid", meta.uid);
    if !meta.labels.is_empty() {
        out.insert("labels".into(), string_map(meta.labels));
    }
    if !meta.annotations.is_empty() {
        out.insert("annotations".into(), string_map(meta.annotations));
    }
    if !meta.finalizers.is_empty() {
        out.insert("finalizers".into(), json!(meta.finalizers));
    }
    if !meta.owner_references.is_empty() {
        let refs: Vec<Value> = meta
            .owner_references
            .into_iter()
            .map(|r| {
                let mut o = Map::new();
                set_str(&mut o, "apiVersion", r.api_version);
                set_str(&mut o, "kind", r.kind);
                set_str(&mut o, "name", r.name);
                set_str(&mut o, "uid", r.uid);
                if let Some(c) = r.controller {
                    o.insert("controller".into(), json!(c));
                }
                if let Some(b) = r.block_owner_deletion {
                    o.insert("blockOwnerDeletion".into(), json!(b));
                }
                Value::Object(o)
            })
            .collect();
        out.insert("ownerReferences".into(), Value::Array(refs));
    }
    Value::Object(out)
}

fn self_subject_access_review(review: SelfSubjectAccessReview) -> Value {
    let spec = review.spec.unwrap_or_default();
    let mut out_spec = Map::new();
    if let Some(r) = spec.resource_attributes {
        let mut a = Map::new();
        for (key, v) in [
            ("namespace", r.namespace),
            ("verb", r.verb),
            ("group", r.group),
            ("version", r.version),
            ("resource", r.resource),
            ("subresource", r.subresource),
            ("name", r.name),
        ] {
            set_str(&mut a, key, v);
        }
        out_spec.insert("resourceAttributes".into(), Value::Object(a));
    }
    if let Some(n) = spec.non_resource_attributes {
        let mut a = Map::new();
        set_str(&mut a, "path", n.path);
        set_str(&mut a, "verb", n.verb);
        out_spec.insert("nonResourceAttributes".into(), Value::Object(a));
    }
    json!({"metadata": metadata(review.metadata), "spec": out_spec})
}

fn config_map(cm: ConfigMap) -> Value {
    let mut out = json!({"metadata": metadata(cm.metadata)});
    if !cm.data.is_empty() {
        out["data"] = string_map(cm.data);
    }
    if !cm.binary_data.is_empty() {
        out["binaryData"] = bytes_map(cm.binary_data);
    }
    if let Some(i) = cm.immutable {
        out["immutable"] = json!(i);
    }
    out
}

fn secret(s: Secret) -> Value {
    let mut out = json!({"metadata": metadata(s.metadata)});
    if !s.data.is_empty() {
        out["data"] = bytes_map(s.data);
    }
    if !s.string_data.is_empty() {
        out["stringData"] = string_map(s.string_data);
    }
    if let Some(t) = s.r#type.filter(|t| !t.is_empty()) {
        out["type"] = json!(t);
    }
    if let Some(i) = s.immutable {
        out["immutable"] = json!(i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The bytes kubectl 1.32 sent for `kubectl auth can-i create pods` and for
    /// `kubectl create configmap x --from-literal=a=b` (captured from the real binary).
    #[test]
    fn kubectls_own_bodies() {
        let ssar = hex("6b3873000a320a17617574686f72697a6174696f6e2e6b38732e696f2f7631121753656c665375626a656374416363657373526576696577123f0a100a0012001a0022002a0032003800420012210a1f0a0764656661756c7412066372656174651a0022002a04706f647332003a001a08080012001a0020001a002200");
        let v = decode(&ssar).unwrap();
        assert_eq!(v["kind"], "SelfSubjectAccessReview");
        assert_eq!(v["apiVersion"], "authorization.k8s.io/v1");
        assert_eq!(v["spec"]["resourceAttributes"], json!({"namespace": "default", "verb": "create", "resource": "pods"}));
        let cm = hex("6b3873000a0f0a0276311209436f6e6669674d6170121b0a110a017812001a0022002a0032003800420012060a01611201621a002200");
        let v = decode(&cm).unwrap();
        assert_eq!(v, json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}));
    }

    #[test]
    fn secrets_and_refusals() {
        let secret = Secret {
            metadata: Some(ObjectMeta { name: Some("s".into()), labels: [("a".into(), "b".into())].into(), ..Default::default() }),
            data: [("k".into(), vec![0u8, 255])].into(),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let wrap = |api_version: &str, kind: &str, raw: Vec<u8>| {
            let u = Unknown {
                type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta { api_version: Some(api_version.into()), kind: Some(kind.into()) }),
                raw: Some(raw),
                ..Default::default()
            };
            [MAGIC.to_vec(), u.encode_to_vec()].concat()
        };
        let v = decode(&wrap("v1", "Secret", secret.encode_to_vec())).unwrap();
        assert_eq!(v, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "labels": {"a": "b"}}, "data": {"k": "AP8="}, "type": "Opaque"}));
        assert_eq!(decode(&wrap("apps/v1", "Deployment", vec![])).unwrap_err().code, 415);
        assert_eq!(decode(b"{\"kind\": \"Pod\"}").unwrap_err().code, 400, "no magic");
        assert_eq!(decode(&[MAGIC, &[0xff, 0xff, 0xff]].concat()).unwrap_err().code, 400, "truncated envelope");
        assert_eq!(decode(&wrap("v1", "Secret", vec![0x0a, 0x05, 0x01])).unwrap_err().code, 400, "truncated message");
    }
}
