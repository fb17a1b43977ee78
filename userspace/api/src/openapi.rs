//! The OpenAPI v3 documents kubectl needs:
//! - default `apply` validation: paths with a `patch` operation carrying
//!   `x-kubernetes-group-version-kind` and the `fieldValidation` parameter, so kubectl leaves
//!   validation to the server;
//! - `kubectl explain`: the real schemas, generated from k8s-openapi's schemars impls.
//!
//! The `patch` operations deliberately have no `requestBody`: kubectl then computes apply patches
//! from its built-in types (with merge keys) rather than from these schemas, which carry no
//! `x-kubernetes-patch-merge-key` extensions.

use serde_json::{Map, Value, json};

use crate::registry;

fn schema_name(r: &registry::ResourceInfo) -> String {
    let group = match r.group {
        "" => "core".to_string(),
        g => g.split('.').next().unwrap_or(g).to_string(),
    };
    format!("io.k8s.api.{group}.{}.{}", r.version, r.kind)
}

/// Adds the schema of a served kind (and everything it references) to the generator.
fn add_schema(generator: &mut k8s_openapi::schemars::SchemaGenerator, group: &str, kind: &str) {
    use k8s_openapi::api::*;
    macro_rules! add {
        ($t:ty) => {{
            generator.subschema_for::<$t>();
        }};
    }
    match (group, kind) {
        ("", "Namespace") => add!(core::v1::Namespace),
        ("", "Node") => add!(core::v1::Node),
        ("", "Pod") => add!(core::v1::Pod),
        ("", "Service") => add!(core::v1::Service),
        ("", "Endpoints") => add!(core::v1::Endpoints),
        ("", "ConfigMap") => add!(core::v1::ConfigMap),
        ("", "Secret") => add!(core::v1::Secret),
        ("", "Event") => add!(core::v1::Event),
        ("", "ServiceAccount") => add!(core::v1::ServiceAccount),
        ("apps", "Deployment") => add!(apps::v1::Deployment),
        ("apps", "ReplicaSet") => add!(apps::v1::ReplicaSet),
        ("apps", "DaemonSet") => add!(apps::v1::DaemonSet),
        ("apps", "StatefulSet") => add!(apps::v1::StatefulSet),
        ("batch", "Job") => add!(batch::v1::Job),
        ("batch", "CronJob") => add!(batch::v1::CronJob),
        ("autoscaling", "HorizontalPodAutoscaler") => {
            add!(autoscaling::v2::HorizontalPodAutoscaler)
        }
        ("networking.k8s.io", "NetworkPolicy") => add!(networking::v1::NetworkPolicy),
        ("coordination.k8s.io", "Lease") => add!(coordination::v1::Lease),
        ("discovery.k8s.io", "EndpointSlice") => add!(discovery::v1::EndpointSlice),
        _ => {}
    }
}

/// Every group-version document, built once (schema generation walks thousands of types).
fn documents() -> &'static std::collections::BTreeMap<(String, String), Value> {
    static DOCS: std::sync::OnceLock<std::collections::BTreeMap<(String, String), Value>> =
        std::sync::OnceLock::new();
    DOCS.get_or_init(|| {
        let mut gvs = vec![("", "v1")];
        gvs.extend(registry::groups());
        gvs.into_iter()
            .filter_map(|(g, v)| {
                build_group_version(g, v).map(|doc| ((g.to_string(), v.to_string()), doc))
            })
            .collect()
    })
}

pub fn v3_group_version(group: &str, version: &str) -> Option<Value> {
    documents()
        .get(&(group.to_string(), version.to_string()))
        .cloned()
}

fn build_group_version(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<&registry::ResourceInfo> = registry::all()
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let mut paths = Map::new();
    let mut generator =
        k8s_openapi::schemars::generate::SchemaSettings::openapi3().into_generator();
    for r in &resources {
        add_schema(&mut generator, r.group, r.kind);
    }
    let mut schemas = generator.take_definitions(true);
    for r in resources {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let item = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        let reference = json!({"$ref": format!("#/components/schemas/{}", schema_name(r))});
        let op = |action: &str| {
            json!({
                "operationId": format!("{action}{}", r.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [
                    {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                ],
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}},
            })
        };
        paths.insert(
            item,
            json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}),
        );
        let schema = schemas
            .entry(schema_name(r))
            .or_insert_with(|| json!({"type": "object"}));
        if let Some(m) = schema.as_object_mut() {
            m.insert("x-kubernetes-group-version-kind".into(), json!([gvk]));
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// A group-version document serialized once, with its digest.
struct Serialized {
    bytes: Vec<u8>,
    hash: String,
}

/// Every group-version document serialized (keyed like [`documents`]), and the `/openapi/v3` index.
type SerializedDocs = (
    std::collections::BTreeMap<(String, String), Serialized>,
    Value,
);

/// The serialized documents and the `/openapi/v3` index, built once: kubectl fetches the index
/// and a group-version document on every `apply`/`explain`, and these documents are megabytes,
/// so serializing, cloning and hashing them per request would dominate those requests.
fn serialized() -> &'static SerializedDocs {
    static SERIALIZED: std::sync::OnceLock<SerializedDocs> = std::sync::OnceLock::new();
    SERIALIZED.get_or_init(|| {
        let docs = documents()
            .iter()
            .map(|(key, doc)| {
                // Serializing a `Value` we built ourselves cannot fail (string keys only).
                let bytes = serde_json::to_vec(doc).unwrap_or_default();
                let hash = document_hash(&bytes);
                (key.clone(), Serialized { bytes, hash })
            })
            .collect::<std::collections::BTreeMap<_, _>>();
        let root = v3_root(|doc| document_hash(&serde_json::to_vec(doc).unwrap_or_default()));
        (docs, root)
    })
}

/// A stable hex digest for the `?hash=` URLs and ETags: 64-bit FNV-1a, upper-case hex. It only
/// has to change when a document changes (caches key on it), not resist attackers, so a
/// ten-line hash is preferred over a new crypto dependency. Same digest the apiserver's
/// `hash_value` computes over `serde_json::to_vec` of a document, so switching keeps URLs stable.
pub fn document_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

/// The serialized JSON of a group-version document (`("", "v1")` for `/openapi/v3/api/v1`) and
/// its hash, computed once per process; `None` for a group-version that is not served.
pub fn v3_group_version_bytes(group: &str, version: &str) -> Option<(&'static [u8], &'static str)> {
    serialized()
        .0
        .get(&(group.to_string(), version.to_string()))
        .map(|s| (s.bytes.as_slice(), s.hash.as_str()))
}

/// The `/openapi/v3` index with every URL's `?hash=` set to [`document_hash`] of the document,
/// computed once per process.
pub fn v3_root_cached() -> &'static Value {
    &serialized().1
}

/// The `/openapi/v3` index; `hash_fn` hashes a group-version document for its `?hash=` URL.
pub fn v3_root(hash_fn: impl Fn(&Value) -> String) -> Value {
    let mut gvs = vec![("", "v1")];
    gvs.extend(registry::groups());
    let mut paths = Map::new();
    for (g, v) in gvs {
        let Some(doc) = documents().get(&(g.to_string(), v.to_string())) else {
            continue;
        };
        let path = if g.is_empty() {
            format!("api/{v}")
        } else {
            format!("apis/{g}/{v}")
        };
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", hash_fn(doc))}),
        );
    }
    json!({"paths": paths})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_version_documents_carry_schemas_and_patch_operations() {
        let doc = v3_group_version("apps", "v1").expect("apps/v1");
        let strategy = &doc["components"]["schemas"]["io.k8s.api.apps.v1.DeploymentStrategy"];
        assert!(
            strategy["properties"]["rollingUpdate"].is_object(),
            "{strategy}"
        );
        let deployment = &doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            deployment["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        let patch =
            &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        assert!(
            patch["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == "fieldValidation"))
        );
        assert!(v3_group_version("nope", "v1").is_none());
    }

    #[test]
    fn cached_bytes_are_the_document_and_the_root_links_them_by_their_hash() {
        let (bytes, hash) = v3_group_version_bytes("apps", "v1").expect("apps/v1 is served");
        let parsed: Value = serde_json::from_slice(bytes).expect("cached bytes are JSON");
        assert_eq!(Some(parsed), v3_group_version("apps", "v1"));
        assert_eq!(hash, document_hash(bytes));
        // A second call hands out the very same cached buffer, not a fresh serialization.
        let (again, _) = v3_group_version_bytes("apps", "v1").expect("apps/v1 is served");
        assert!(std::ptr::eq(bytes, again));
        let (core, core_hash) = v3_group_version_bytes("", "v1").expect("core v1 is served");
        assert_ne!(core_hash, hash, "different documents must not share a hash");
        assert!(!core.is_empty());
        let root = v3_root_cached();
        assert_eq!(
            root["paths"]["apis/apps/v1"]["serverRelativeURL"],
            format!("/openapi/v3/apis/apps/v1?hash={hash}").as_str()
        );
        assert_eq!(
            root["paths"]["api/v1"]["serverRelativeURL"],
            format!("/openapi/v3/api/v1?hash={core_hash}").as_str()
        );
        assert!(v3_group_version_bytes("nope", "v1").is_none());
    }

    #[test]
    fn document_hash_is_fnv1a_64_in_upper_hex() {
        // FNV-1a 64 test vectors (Fowler/Noll/Vo reference): "" and "a".
        assert_eq!(document_hash(b""), "CBF29CE484222325");
        assert_eq!(document_hash(b"a"), "AF63DC4C8601EC8C");
    }

    #[test]
    fn the_root_points_at_every_group_version_by_hash() {
        let root = v3_root(|_| "H".to_string());
        assert_eq!(
            root["paths"]["api/v1"]["serverRelativeURL"],
            "/openapi/v3/api/v1?hash=H"
        );
        assert!(root["paths"]["apis/apps/v1"].is_object());
    }
}
