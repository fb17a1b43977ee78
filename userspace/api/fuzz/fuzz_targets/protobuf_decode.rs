#![no_main]
//! The apiserver's decoder for protobuf request bodies (`application/vnd.kubernetes.protobuf`,
//! what kubectl 1.32 sends for `auth can-i` and `create configmap|secret`). Two ways in, picked
//! by the first byte: the bytes as the whole body (magic and envelope included), or the bytes as
//! the `raw` message inside a well-formed envelope naming one of the decoded kinds, so the
//! fuzzer reaches the per-kind mapping without first having to find the envelope. Nothing may
//! panic; a decoded body must be a JSON object carrying the envelope's apiVersion and kind, and
//! must serialize back.

use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use skiff_api::protobuf;

const KINDS: [(&str, &str); 4] = [
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("apps/v1", "Deployment"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (body, expected) = if selector & 0x80 == 0 {
        (rest.to_vec(), None)
    } else {
        let (api_version, kind) = KINDS[usize::from(selector % 4)];
        let envelope = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(rest.to_vec()),
            content_encoding: None,
            content_type: None,
        };
        let mut body = b"k8s\0".to_vec();
        body.extend(envelope.encode_to_vec());
        (body, Some((api_version, kind)))
    };
    let Ok(object) = protobuf::decode(&body) else {
        return;
    };
    assert!(object.is_object(), "a decoded body is not an object: {object}");
    if let Some((api_version, kind)) = expected {
        assert_eq!(object["apiVersion"], api_version);
        assert_eq!(object["kind"], kind);
    }
    serde_json::to_vec(&object).expect("a decoded body serializes");
});
