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
        ("", "ResourceQuota") => add!(core::v1::ResourceQuota),
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
        ("rbac.authorization.k8s.io", "Role") => add!(rbac::v1::Role),
        ("rbac.authorization.k8s.io", "ClusterRole") => add!(rbac::v1::ClusterRole),
        ("rbac.authorization.k8s.io", "RoleBinding") => add!(rbac::v1::RoleBinding),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => add!(rbac::v1::ClusterRoleBinding),
        ("certificates.k8s.io", "CertificateSigningRequest") => add!(certificates::v1::CertificateSigningRequest),
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
    // List responses (below) reference ListMeta, which no served kind's schema pulls in.
    generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta>();
    let mut schemas = generator.take_definitions(true);
    for r in resources {
        let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind});
        let list_gvk = json!({"group": r.group, "version": r.version, "kind": r.list_kind()});
        let collection = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", r.plural)
        } else {
            format!("{prefix}/{}", r.plural)
        };
        let item = format!("{collection}/{{name}}");
        let reference = json!({"$ref": format!("#/components/schemas/{}", schema_name(r))});
        let list_name = format!("{}List", schema_name(r));
        let list_reference = json!({"$ref": format!("#/components/schemas/{list_name}")});
        // One operation as Kubernetes describes it. Write operations carry the `fieldValidation`
        // parameter: kubectl looks for it on `patch` to decide that the server validates. No
        // operation has a `requestBody` (see the module comment).
        let op = |action: &str, id: &str, gvk: &Value, response: &Value, writes: bool| {
            let mut parameters = vec![json!(
                {"name": "pretty", "in": "query", "schema": {"type": "string", "uniqueItems": true}}
            )];
            if writes {
                for name in ["dryRun", "fieldManager", "fieldValidation"] {
                    parameters.push(json!(
                        {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}}
                    ));
                }
            }
            json!({
                "operationId": format!("{id}{}", r.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": parameters,
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": response}}}},
            })
        };
        // Path-level parameters, as Kubernetes' documents declare them.
        let mut path_parameters = vec![];
        if r.namespaced {
            path_parameters.push(json!({"name": "namespace", "in": "path", "required": true,
                "description": "object name and auth scope, such as for teams and projects",
                "schema": {"type": "string", "uniqueItems": true}}));
        }
        let mut item_parameters = path_parameters.clone();
        item_parameters.push(json!({"name": "name", "in": "path", "required": true,
            "description": format!("name of the {}", r.kind),
            "schema": {"type": "string", "uniqueItems": true}}));
        paths.insert(
            collection,
            json!({
                "get": op("list", "list", &list_gvk, &list_reference, false),
                "post": op("post", "create", &gvk, &reference, true),
                "delete": op("deletecollection", "deletecollection", &gvk, &reference, true),
                "parameters": path_parameters,
            }),
        );
        paths.insert(
            item,
            json!({
                "get": op("get", "read", &gvk, &reference, false),
                "put": op("put", "replace", &gvk, &reference, true),
                "patch": op("patch", "patch", &gvk, &reference, true),
                "delete": op("delete", "delete", &gvk, &reference, true),
                "parameters": item_parameters,
            }),
        );
        let schema = schemas
            .entry(schema_name(r))
            .or_insert_with(|| json!({"type": "object"}));
        if let Some(m) = schema.as_object_mut() {
            m.insert("x-kubernetes-group-version-kind".into(), json!([gvk]));
        }
        // k8s-openapi has no schema for list kinds; this is the shape Kubernetes publishes.
        schemas.insert(
            list_name,
            json!({
                "description": format!("{} is a list of {}.", r.list_kind(), r.kind),
                "type": "object",
                "required": ["items"],
                "properties": {
                    "apiVersion": {"description": "APIVersion defines the versioned schema of this representation of an object.", "type": "string"},
                    "items": {"description": format!("items is the list of {}.", r.kind), "type": "array", "items": reference},
                    "kind": {"description": "Kind is a string value representing the REST resource this object represents.", "type": "string"},
                    "metadata": {"description": "Standard list metadata.", "allOf": [{"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"}]},
                },
                "x-kubernetes-group-version-kind": [list_gvk],
            }),
        );
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
/// ten-line hash is preferred over a new crypto dependency.
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
    fn collections_have_list_create_and_deletecollection_with_list_schemas() {
        let doc = v3_group_version("apps", "v1").expect("apps/v1");
        let collection = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments"];
        assert_eq!(collection["get"]["x-kubernetes-action"], "list");
        assert_eq!(
            collection["get"]["x-kubernetes-group-version-kind"]["kind"],
            "DeploymentList"
        );
        assert_eq!(collection["post"]["x-kubernetes-action"], "post");
        assert_eq!(
            collection["delete"]["x-kubernetes-action"],
            "deletecollection"
        );
        assert_eq!(collection["parameters"][0]["name"], "namespace");
        let list = &doc["components"]["schemas"]["io.k8s.api.apps.v1.DeploymentList"];
        assert_eq!(
            list["properties"]["items"]["items"]["$ref"],
            "#/components/schemas/io.k8s.api.apps.v1.Deployment"
        );
        assert!(
            doc["components"]["schemas"]["io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"]
                .is_object()
        );
        // Cluster-scoped kinds have no namespace segment or parameter.
        let core = v3_group_version("", "v1").expect("v1");
        let namespaces = &core["paths"]["/api/v1/namespaces"];
        assert_eq!(
            namespaces["post"]["x-kubernetes-group-version-kind"]["kind"],
            "Namespace"
        );
        assert_eq!(namespaces["parameters"], json!([]));
        assert_eq!(
            core["paths"]["/api/v1/nodes/{name}"]["parameters"][0]["name"],
            "name"
        );
        // Every operationId is unique within a document, as OpenAPI requires.
        for doc in documents().values() {
            let mut ids = std::collections::BTreeSet::new();
            for path in doc["paths"]
                .as_object()
                .into_iter()
                .flat_map(|p| p.values())
            {
                for op in path.as_object().into_iter().flat_map(|o| o.values()) {
                    if let Some(id) = op["operationId"].as_str() {
                        assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_ref_points_at_a_schema_in_the_same_document() {
        fn walk(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|c| walk(c, out));
                }
                Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
                _ => {}
            }
        }
        for ((group, version), doc) in documents() {
            let mut refs = vec![];
            walk(doc, &mut refs);
            assert!(!refs.is_empty(), "{group}/{version} has no $ref at all");
            for r in refs {
                let name = r
                    .strip_prefix("#/components/schemas/")
                    .unwrap_or_else(|| panic!("{group}/{version}: foreign $ref {r}"));
                assert!(
                    doc["components"]["schemas"][name].is_object(),
                    "{group}/{version}: $ref to missing schema {name}"
                );
            }
        }
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
