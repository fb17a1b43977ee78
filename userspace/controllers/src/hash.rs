//! The `pod-template-hash` of a Deployment's pod template.
//!
//! Kubernetes (`controller.ComputeHash`) feeds FNV-32a with a Go `spew` dump of the template
//! struct, appends the collision count as 8 little-endian bytes, and encodes the decimal string of
//! the 32-bit sum with `rand.SafeEncodeString` (each byte of the decimal string -> one character of
//! the "safe" alphabet, which has no vowels so names never spell words). The spew dump is a Go
//! implementation detail that cannot be reproduced outside Go, so skiff hashes a *canonical JSON*
//! form of the template instead: the k8s-openapi serialization (fixed field order, sorted maps)
//! with empty lists and maps removed (Kubernetes' semantic equality treats empty and absent alike).
//! Everything after that — FNV-32a, the collision bytes, the safe encoding — is as Kubernetes
//! does, so hashes look like Kubernetes ones (`7d4b9c6f8`) and are stable across skiff versions as
//! long as k8s-openapi serializes the template the same way. The hash names ReplicaSets but is
//! never used to decide template equality: that is [`templates_equal`], as Kubernetes'
//! `EqualIgnoreHash` is.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::Value;

/// Kubernetes' `rand` alphabet: digits and consonants, no vowels, no confusable characters.
pub const SAFE_ALPHABET: &str = "bcdfghjklmnpqrstvwxz2456789";

/// The label carrying the template hash on ReplicaSets and their pods.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// FNV-1a, 32 bits. Hand-written: it is five lines and the `fnv` crate only offers the 64-bit
/// hasher.
pub fn fnv32a(data: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in data {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// `rand.SafeEncodeString`: each byte maps to `SAFE_ALPHABET[byte % 27]`.
pub fn safe_encode(s: &str) -> String {
    let alphabet = SAFE_ALPHABET.as_bytes();
    s.bytes()
        .map(|b| alphabet[usize::from(b) % alphabet.len()] as char)
        .collect()
}

/// The template's canonical JSON (see the module docs), without the pod-template-hash label.
pub fn canonical_template(template: &PodTemplateSpec) -> Value {
    let mut template = template.clone();
    if let Some(metadata) = template.metadata.as_mut()
        && let Some(labels) = metadata.labels.as_mut()
    {
        labels.remove(POD_TEMPLATE_HASH_LABEL);
    }
    // Serializing a k8s-openapi struct cannot fail (no non-string map keys).
    let mut value = serde_json::to_value(&template).unwrap_or(Value::Null);
    prune_empty(&mut value);
    value
}

fn prune_empty(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for v in map.values_mut() {
                prune_empty(v);
            }
            map.retain(|_, v| !is_empty(v));
        }
        Value::Array(items) => {
            for v in items.iter_mut() {
                prune_empty(v);
            }
        }
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Kubernetes' `EqualIgnoreHash`: templates equal apart from the pod-template-hash label.
pub fn templates_equal(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    canonical_template(a) == canonical_template(b)
}

/// The pod-template-hash for a template and the Deployment's `status.collisionCount`.
pub fn pod_template_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let bytes = serde_json::to_vec(&canonical_template(template)).unwrap_or_default();
    let mut data = bytes;
    if let Some(count) = collision_count {
        let mut collision = [0u8; 8];
        collision[..4].copy_from_slice(&(count as u32).to_le_bytes());
        data.extend_from_slice(&collision);
    }
    safe_encode(&fnv32a(&data).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "web".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn fnv32a_matches_reference_vectors() {
        // Published FNV-1a 32-bit test vectors.
        assert_eq!(fnv32a(b""), 0x811c9dc5);
        assert_eq!(fnv32a(b"a"), 0xe40c292c);
        assert_eq!(fnv32a(b"foobar"), 0xbf9cf968);
    }

    #[test]
    fn safe_encode_maps_bytes_like_kubernetes() {
        // '0' is byte 48, 48 % 27 = 21 -> '4'; '1' = 49 -> 22 -> '5'.
        assert_eq!(safe_encode("01"), "45");
        assert!(
            safe_encode("4294967295")
                .chars()
                .all(|c| SAFE_ALPHABET.contains(c))
        );
    }

    #[test]
    fn hash_is_stable_ignores_hash_label_and_changes_with_template_and_collisions() {
        let a = template("nginx:1.25");
        let mut labelled = a.clone();
        labelled
            .metadata
            .as_mut()
            .and_then(|m| m.labels.as_mut())
            .map(|l| l.insert(POD_TEMPLATE_HASH_LABEL.into(), "xyz".into()));
        assert_eq!(
            pod_template_hash(&a, None),
            pod_template_hash(&labelled, None)
        );
        assert!(templates_equal(&a, &labelled));
        let b = template("nginx:1.26");
        assert_ne!(pod_template_hash(&a, None), pod_template_hash(&b, None));
        assert!(!templates_equal(&a, &b));
        assert_ne!(pod_template_hash(&a, None), pod_template_hash(&a, Some(1)));
        // Empty lists are the same as absent ones.
        let mut empty_env = a.clone();
        if let Some(spec) = empty_env.spec.as_mut() {
            spec.containers[0].env = Some(vec![]);
        }
        assert!(templates_equal(&a, &empty_env));
        let hash = pod_template_hash(&a, None);
        assert!(!hash.is_empty() && hash.len() <= 10);
    }
}
