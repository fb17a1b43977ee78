//! Start-up objects and the background loop that finishes asynchronous deletions.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::State;
use crate::objects::{self, WriteFail, decode_kv, name_of, prefix, ready_to_remove, store_error};
use crate::services;
use skiff_api::registry;
use skiff_api::status::ApiError;

/// Creates the standard namespaces and the `default/kubernetes` Service when missing, and points
/// that Service at this apiserver (its EndpointSlice and Endpoints) when it serves on a
/// specific, non-loopback address: pods reach the API through `kubernetes.default` as in
/// Kubernetes, where the apiserver's advertise address is the Service's endpoint.
pub async fn bootstrap(state: &State, addr: std::net::SocketAddr) -> Result<(), ApiError> {
    let port = addr.port();
    let ns_info = registry::find("", "v1", "namespaces")
        .ok_or_else(|| ApiError::internal("namespaces are not registered"))?;
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        if state
            .store
            .get(&objects::key(ns_info, None, ns))
            .await
            .map_err(store_error)?
            .is_none()
        {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            match objects::create_object(state, ns_info, None, obj, false).await {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
        // Also for a data dir from before ServiceAccounts came with their namespace.
        objects::ensure_default_service_account(state, ns).await?;
    }
    let svc_info = registry::find("", "v1", "services")
        .ok_or_else(|| ApiError::internal("services are not registered"))?;
    if state
        .store
        .get(&objects::key(svc_info, Some("default"), "kubernetes"))
        .await
        .map_err(store_error)?
        .is_none()
    {
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": services::first_ip(&state.service_cidr).to_string(),
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}],
            },
        });
        match objects::create_object(state, svc_info, Some("default"), svc, false).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let ip = addr.ip();
    if !ip.is_unspecified() && !ip.is_loopback() && ip.is_ipv4() {
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes",
                                    "endpointslice.kubernetes.io/managed-by": "skiff-apiserver"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        });
        let endpoints = json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "subsets": [{"addresses": [{"ip": ip.to_string()}], "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}],
        });
        for (group, version, resource, obj) in [("discovery.k8s.io", "v1", "endpointslices", slice), ("", "v1", "endpoints", endpoints)] {
            let info = registry::find(group, version, resource)
                .ok_or_else(|| ApiError::internal(format!("{resource} are not registered")))?;
            let key = objects::key(info, Some("default"), "kubernetes");
            // A restart on another address replaces what an earlier start wrote.
            if let Some(kv) = state.store.get(&key).await.map_err(store_error)? {
                let _ = state.store.delete(&key, Some(kv.mod_revision)).await;
            }
            match objects::create_object(state, info, Some("default"), obj, false).await {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// How long a Terminating namespace is left alone before it is emptied (see `reap_once`).
const NAMESPACE_SETTLE_SECONDS: i64 = 5;

/// One pass: empties terminating namespaces and removes them when empty, and removes objects
/// whose deletion is due (pods whose grace period ended: until the node agent exists nothing
/// else confirms a bound pod stopped).
async fn reap_once(state: &State) -> Result<(), ApiError> {
    let now = objects::now();
    for info in registry::all() {
        let listed = state
            .store
            .list(&prefix(info, None))
            .await
            .map_err(store_error)?;
        for kv in &listed.items {
            // Only objects marked for deletion can be due; skip decoding the rest.
            if !contains(&kv.value, b"deletionTimestamp") {
                continue;
            }
            let obj = decode_kv(kv)?;
            if ready_to_remove(info, &obj, now)
                && !(info.kind == "Namespace" && info.group.is_empty())
            {
                match state.store.delete(&kv.key, Some(kv.mod_revision)).await {
                    Ok(_)
                    | Err(
                        skiff_store::StoreError::Conflict { .. }
                        | skiff_store::StoreError::NotFound(_),
                    ) => {}
                    Err(e) => return Err(store_error(e)),
                }
            }
        }
    }
    let ns_info = registry::find("", "v1", "namespaces")
        .ok_or_else(|| ApiError::internal("namespaces are not registered"))?;
    let listed = state
        .store
        .list(&prefix(ns_info, None))
        .await
        .map_err(store_error)?;
    for kv in &listed.items {
        let ns_obj = decode_kv(kv)?;
        if ns_obj
            .pointer("/metadata/deletionTimestamp")
            .is_none_or(Value::is_null)
        {
            continue;
        }
        // `kubectl delete -f` deletes a namespace and then, one request each, the objects in it:
        // emptying the namespace at once would turn those later requests into 404s and the
        // command into a failure. Like Kubernetes' namespace controller, start a moment later.
        let marked = ns_obj
            .pointer("/metadata/deletionTimestamp")
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        if marked.is_some_and(|t| {
            now.signed_duration_since(t) < chrono::Duration::seconds(NAMESPACE_SETTLE_SECONDS)
        }) {
            continue;
        }
        let ns = name_of(&ns_obj).to_string();
        let mut remaining = 0usize;
        for info in registry::all().iter().filter(|r| r.namespaced) {
            let items = state
                .store
                .list(&prefix(info, Some(&ns)))
                .await
                .map_err(store_error)?;
            for item in &items.items {
                remaining += 1;
                let obj = decode_kv(item)?;
                if obj
                    .pointer("/metadata/deletionTimestamp")
                    .is_some_and(|v| !v.is_null())
                {
                    continue;
                }
                match objects::delete_object(
                    state,
                    info,
                    Some(&ns),
                    name_of(&obj),
                    None,
                    None,
                    false,
                )
                .await
                {
                    Ok(_) => {}
                    Err(e) if e.code == 404 || e.code == 409 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if remaining > 0 {
            continue;
        }
        // Empty: drop the `kubernetes` finalizer, which removes the namespace when nothing
        // else holds it.
        let mut updated = ns_obj.clone();
        if let Some(list) = updated
            .pointer_mut("/spec/finalizers")
            .and_then(Value::as_array_mut)
        {
            list.retain(|f| f.as_str() != Some("kubernetes"));
        }
        match objects::write_update(state, ns_info, &kv.key, kv, updated, false).await {
            Ok(_) | Err(WriteFail::Conflict) => {}
            Err(WriteFail::Api(e)) if e.code == 404 => {}
            Err(WriteFail::Api(e)) => return Err(e),
        }
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub async fn reaper_loop(state: Arc<State>) {
    loop {
        if let Err(error) = reap_once(&state).await {
            tracing::warn!(%error, "finishing deletions failed; retrying");
        }
        tokio::select! {
            _ = state.reaper_wake.notified() => {
                // Let a burst of deletions land before scanning again.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
