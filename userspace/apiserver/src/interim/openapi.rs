//! The OpenAPI v3 documents kubectl needs for default `apply` validation (interim and minimal:
//! paths with a `patch` operation carrying `x-kubernetes-group-version-kind` and the
//! `fieldValidation` parameter, so kubectl leaves validation to the server).
//! TODO(skiff-api): `skiff_api::openapi` with the real schemas (for `kubectl explain`).

use serde_json::{Map, Value, json};

use super::registry;

fn schema_name(r: &registry::ResourceInfo) -> String {
    let group = match r.group {
        "" => "core".to_string(),
        g => g.split('.').next().unwrap_or(g).to_string(),
    };
    format!("io.k8s.api.{group}.{}.{}", r.version, r.kind)
}

pub fn v3_group_version(group: &str, version: &str) -> Option<Value> {
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
    let mut schemas = Map::new();
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
        schemas.insert(
            schema_name(r),
            json!({
                "type": "object",
                "x-kubernetes-group-version-kind": [gvk],
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

/// The `/openapi/v3` index; `hash_fn` hashes a group-version document for its `?hash=` URL.
pub fn v3_root(hash_fn: impl Fn(&Value) -> String) -> Value {
    let mut gvs = vec![("", "v1")];
    gvs.extend(registry::groups());
    let mut paths = Map::new();
    for (g, v) in gvs {
        let Some(doc) = v3_group_version(g, v) else { continue };
        let path = if g.is_empty() {
            format!("api/{v}")
        } else {
            format!("apis/{g}/{v}")
        };
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", hash_fn(&doc))}),
        );
    }
    json!({"paths": paths})
}
