//! Decoding checks, field validation, defaulting and the metadata rules of create and update
//! (pure logic: no I/O, no clock other than the `now` passed in).

use serde_json::{Map, Value, json};

use crate::registry::ResourceInfo;
use crate::status::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

impl FieldValidation {
    /// Kubernetes' default when the parameter is absent is `Warn`.
    pub fn parse(s: Option<&str>) -> Result<FieldValidation, ApiError> {
        match s.unwrap_or("") {
            "" | "Warn" => Ok(FieldValidation::Warn),
            "Strict" => Ok(FieldValidation::Strict),
            "Ignore" => Ok(FieldValidation::Ignore),
            other => Err(ApiError::bad_request(format!(
                "fieldValidation {other:?} is not one of Strict, Warn, Ignore"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admitted {
    pub object: Value,
    pub warnings: Vec<String>,
}

/// Decodes the object through its real k8s-openapi type and serializes it back: what disappears
/// is a field the schema does not have (an unknown field), and a decode error is a wrong type.
/// Reusing the generated types keeps the check equal to the real schemas without a hand copy.
fn roundtrip(info: &ResourceInfo, v: &Value) -> Result<Value, String> {
    use k8s_openapi::api::*;
    macro_rules! rt {
        ($t:ty) => {{
            // serde_path_to_error names the field that failed (as Kubernetes' message does).
            let typed: $t = serde_path_to_error::deserialize(v.clone()).map_err(|e| {
                let path = e.path().to_string();
                if path.is_empty() || path == "." {
                    e.inner().to_string()
                } else {
                    format!("{path}: {}", e.inner())
                }
            })?;
            serde_json::to_value(&typed).map_err(|e| e.to_string())
        }};
    }
    match (info.group, info.kind) {
        ("", "Namespace") => rt!(core::v1::Namespace),
        ("", "Node") => rt!(core::v1::Node),
        ("", "Pod") => rt!(core::v1::Pod),
        ("", "Service") => rt!(core::v1::Service),
        ("", "Endpoints") => rt!(core::v1::Endpoints),
        ("", "ConfigMap") => rt!(core::v1::ConfigMap),
        ("", "Secret") => rt!(core::v1::Secret),
        ("", "Event") => rt!(core::v1::Event),
        ("", "ServiceAccount") => rt!(core::v1::ServiceAccount),
        ("", "ResourceQuota") => rt!(core::v1::ResourceQuota),
        ("apps", "Deployment") => rt!(apps::v1::Deployment),
        ("apps", "ReplicaSet") => rt!(apps::v1::ReplicaSet),
        ("apps", "DaemonSet") => rt!(apps::v1::DaemonSet),
        ("apps", "StatefulSet") => rt!(apps::v1::StatefulSet),
        ("batch", "Job") => rt!(batch::v1::Job),
        ("batch", "CronJob") => rt!(batch::v1::CronJob),
        ("autoscaling", "HorizontalPodAutoscaler") => rt!(autoscaling::v2::HorizontalPodAutoscaler),
        ("networking.k8s.io", "NetworkPolicy") => rt!(networking::v1::NetworkPolicy),
        ("coordination.k8s.io", "Lease") => rt!(coordination::v1::Lease),
        ("discovery.k8s.io", "EndpointSlice") => rt!(discovery::v1::EndpointSlice),
        ("rbac.authorization.k8s.io", "Role") => rt!(rbac::v1::Role),
        ("rbac.authorization.k8s.io", "ClusterRole") => rt!(rbac::v1::ClusterRole),
        ("rbac.authorization.k8s.io", "RoleBinding") => rt!(rbac::v1::RoleBinding),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => rt!(rbac::v1::ClusterRoleBinding),
        ("certificates.k8s.io", "CertificateSigningRequest") => rt!(certificates::v1::CertificateSigningRequest),
        ("autoscaling", "Scale") => rt!(autoscaling::v1::Scale),
        _ => Ok(v.clone()),
    }
}

/// Paths (as lists of keys/indexes) present and non-null in `input` but missing in `output`.
fn unknown_paths(
    input: &Value,
    output: &Value,
    path: &mut Vec<String>,
    out: &mut Vec<Vec<String>>,
) {
    match (input, output) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                if v.is_null() {
                    continue;
                }
                path.push(k.clone());
                match b.get(k) {
                    None => out.push(path.clone()),
                    Some(w) => unknown_paths(v, w, path, out),
                }
                path.pop();
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                path.push(format!("[{i}]"));
                unknown_paths(v, w, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn path_text(p: &[String]) -> String {
    let mut s = String::new();
    for part in p {
        if part.starts_with('[') {
            s.push_str(part);
        } else {
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(part);
        }
    }
    s
}

fn remove_path(v: &mut Value, p: &[String]) {
    let Some((last, parents)) = p.split_last() else {
        return;
    };
    let mut cur = v;
    for part in parents {
        cur = if let Some(i) = part.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            match i.parse::<usize>().ok().and_then(|i| cur.get_mut(i)) {
                Some(c) => c,
                None => return,
            }
        } else {
            match cur.get_mut(part.as_str()) {
                Some(c) => c,
                None => return,
            }
        };
    }
    if let Some(o) = cur.as_object_mut() {
        o.remove(last.as_str());
    }
}

/// Checks a decoded body against the resource: apiVersion/kind (inferred when absent, as for the
/// Python client), namespace, types and unknown fields (by `mode`; unknown fields are pruned
/// unless Strict rejects them, as Kubernetes does).
pub fn admit(
    info: &ResourceInfo,
    namespace: Option<&str>,
    body: Value,
    mode: FieldValidation,
) -> Result<Admitted, ApiError> {
    let mut obj = match body {
        Value::Object(m) => Value::Object(m),
        other => {
            return Err(ApiError::bad_request(format!(
                "the request body must be a JSON or YAML object, got {}",
                match other {
                    Value::Null => "null",
                    Value::Array(_) => "an array",
                    _ => "a scalar",
                }
            )));
        }
    };
    let api_version = info.api_version();
    match obj.get("apiVersion") {
        None | Some(Value::Null) => obj["apiVersion"] = json!(api_version),
        Some(Value::String(s)) if *s == api_version => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({}) does not match the expected API version ({api_version})",
                other.as_str().unwrap_or("not a string")
            )));
        }
    }
    match obj.get("kind") {
        None | Some(Value::Null) => obj["kind"] = json!(info.kind),
        Some(Value::String(s)) if s == info.kind => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({}) does not match the expected kind ({})",
                other.as_str().unwrap_or("not a string"),
                info.kind
            )));
        }
    }
    match obj.get("metadata") {
        None | Some(Value::Null) => obj["metadata"] = json!({}),
        Some(Value::Object(_)) => {}
        Some(_) => return Err(ApiError::bad_request("metadata must be an object")),
    }
    if info.namespaced {
        let ns = namespace.unwrap_or("");
        match obj["metadata"].get("namespace") {
            None | Some(Value::Null) => obj["metadata"]["namespace"] = json!(ns),
            Some(Value::String(s)) if s.is_empty() || s == ns => {
                obj["metadata"]["namespace"] = json!(ns)
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    let typed = roundtrip(info, &obj).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            info.kind, info.version, info.kind
        ))
    })?;
    let mut unknown = Vec::new();
    unknown_paths(&obj, &typed, &mut Vec::new(), &mut unknown);
    let mut warnings = Vec::new();
    if !unknown.is_empty() {
        let texts: Vec<String> = unknown
            .iter()
            .map(|p| format!("unknown field \"{}\"", path_text(p)))
            .collect();
        match mode {
            FieldValidation::Strict => {
                return Err(ApiError::bad_request(format!(
                    "strict decoding error: {}",
                    texts.join(", ")
                )));
            }
            FieldValidation::Warn => warnings = texts,
            FieldValidation::Ignore => {}
        }
        for p in &unknown {
            remove_path(&mut obj, p);
        }
    }
    Ok(Admitted {
        object: obj,
        warnings,
    })
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// Validates `metadata.name` the way Kubernetes does for the kind.
pub fn validate_name(info: &ResourceInfo, name: &str) -> Result<(), ApiError> {
    let label_kinds = ["Namespace", "Service"];
    let (ok, what) = if info.group == "rbac.authorization.k8s.io" {
        // RBAC names are path segments (`system:node`), as Kubernetes' ValidateRBACName.
        (
            !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '%']),
            "may not be '.' or '..' and may not contain '/' or '%'",
        )
    } else if label_kinds.contains(&info.kind) {
        (
            is_dns1123_label(name)
                && !name.starts_with(|c: char| c.is_ascii_digit() && info.kind == "Service"),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
        )
    } else {
        (
            is_dns1123_subdomain(name),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        )
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_for(
            info,
            name,
            &[(
                "metadata.name".to_string(),
                format!("Invalid value: \"{name}\": {what}"),
            )],
        ))
    }
}

fn set_default(m: &mut Map<String, Value>, key: &str, v: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), v);
    }
}

fn default_ports(ports: Option<&mut Value>) {
    if let Some(Value::Array(ports)) = ports {
        for p in ports {
            if let Some(p) = p.as_object_mut() {
                set_default(p, "protocol", json!("TCP"));
            }
        }
    }
}

fn default_pod_spec(spec: &mut Value, restart_default: bool) {
    let Some(m) = spec.as_object_mut() else {
        return;
    };
    if restart_default {
        set_default(m, "restartPolicy", json!("Always"));
    }
    set_default(m, "dnsPolicy", json!("ClusterFirst"));
    set_default(m, "schedulerName", json!("default-scheduler"));
    set_default(m, "terminationGracePeriodSeconds", json!(30));
    set_default(m, "securityContext", json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = m.get_mut(list) {
            for c in cs {
                let Some(c) = c.as_object_mut() else { continue };
                set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
                set_default(c, "terminationMessagePolicy", json!("File"));
                set_default(c, "resources", json!({}));
                let image = c.get("image").and_then(Value::as_str).unwrap_or("");
                let last = image.rsplit('/').next().unwrap_or("");
                let pull = if !last.contains(':') || last.ends_with(":latest") {
                    if image.contains('@') {
                        "IfNotPresent"
                    } else {
                        "Always"
                    }
                } else {
                    "IfNotPresent"
                };
                set_default(c, "imagePullPolicy", json!(pull));
                default_ports(c.get_mut("ports"));
            }
        }
    }
}

/// Kubernetes' DefaultTolerationSeconds admission plugin: a pod that does not tolerate the
/// node-lifecycle NoExecute taints `node.kubernetes.io/not-ready` and
/// `node.kubernetes.io/unreachable` gets a toleration of each for 300 s, so its pods leave a dead
/// node 5 minutes after it is tainted (and stay through shorter blips). A toleration with an
/// empty key (operator Exists) or an empty effect already covers the taint, as in Kubernetes.
fn default_toleration_seconds(spec: &mut serde_json::Map<String, Value>) {
    const KEYS: [&str; 2] = ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"];
    let covers = |t: &Value, key: &str| {
        let k = t.get("key").and_then(Value::as_str).unwrap_or("");
        let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
        (k.is_empty() || k == key) && (effect.is_empty() || effect == "NoExecute")
    };
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    if tolerations.is_null() {
        *tolerations = json!([]);
    }
    let Some(list) = tolerations.as_array_mut() else {
        return;
    };
    for key in KEYS {
        if !list.iter().any(|t| covers(t, key)) {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute",
                             "tolerationSeconds": 300}));
        }
    }
}

fn default_template(obj: &mut Value, restart_default: bool) {
    if let Some(spec) = obj.pointer_mut("/spec/template/spec") {
        default_pod_spec(spec, restart_default);
    }
}

/// Kubernetes' defaults for the fields kubectl users see (tier 1 item 13 of kubectl-wire.md).
pub fn apply_defaults(info: &ResourceInfo, obj: &mut Value) {
    match (info.group, info.kind) {
        ("", "Pod") => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec, true);
                if let Some(m) = spec.as_object_mut() {
                    set_default(m, "enableServiceLinks", json!(true));
                    default_toleration_seconds(m);
                }
            }
            if obj.pointer("/status/phase").is_none()
                && let Some(m) = obj.as_object_mut()
            {
                let status = m.entry("status").or_insert_with(|| json!({}));
                if let Some(s) = status.as_object_mut() {
                    s.insert("phase".into(), json!("Pending"));
                }
            }
        }
        ("", "Service") => {
            if let Some(m) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                set_default(m, "type", json!("ClusterIP"));
                set_default(m, "sessionAffinity", json!("None"));
                let ty = m
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if ty != "ExternalName" {
                    set_default(m, "internalTrafficPolicy", json!("Cluster"));
                    set_default(m, "ipFamilies", json!(["IPv4"]));
                    set_default(m, "ipFamilyPolicy", json!("SingleStack"));
                }
                if ty == "NodePort" || ty == "LoadBalancer" {
                    set_default(m, "externalTrafficPolicy", json!("Cluster"));
                }
                if let Some(Value::Array(ports)) = m.get_mut("ports") {
                    for p in ports {
                        if let Some(p) = p.as_object_mut() {
                            set_default(p, "protocol", json!("TCP"));
                            if let Some(port) = p.get("port").cloned() {
                                set_default(p, "targetPort", port);
                            }
                        }
                    }
                }
            }
        }
        ("", "Secret") => {
            if let Some(m) = obj.as_object_mut() {
                set_default(m, "type", json!("Opaque"));
                if let Some(Value::Object(string_data)) = m.remove("stringData") {
                    use base64::Engine as _;
                    let data = m.entry("data").or_insert_with(|| json!({}));
                    if data.is_null() {
                        *data = json!({});
                    }
                    if let Some(d) = data.as_object_mut() {
                        for (k, v) in string_data {
                            let text = v.as_str().unwrap_or_default();
                            d.insert(
                                k,
                                json!(base64::engine::general_purpose::STANDARD.encode(text)),
                            );
                        }
                    }
                }
            }
        }
        ("", "Namespace") => {
            // Kubernetes labels every namespace with its own name (for namespaceSelectors).
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if labels.is_null() {
                    *labels = json!({});
                }
                if let Some(l) = labels.as_object_mut()
                    && !name.is_empty()
                {
                    l.insert("kubernetes.io/metadata.name".into(), json!(name));
                }
            }
            if let Some(m) = obj.as_object_mut() {
                let spec = m.entry("spec").or_insert_with(|| json!({}));
                if let Some(s) = spec.as_object_mut() {
                    set_default(s, "finalizers", json!(["kubernetes"]));
                }
                let status = m.entry("status").or_insert_with(|| json!({}));
                if let Some(s) = status.as_object_mut() {
                    set_default(s, "phase", json!("Active"));
                }
            }
        }
        ("apps", "Deployment") => {
            if let Some(m) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                set_default(m, "replicas", json!(1));
                set_default(m, "revisionHistoryLimit", json!(10));
                set_default(m, "progressDeadlineSeconds", json!(600));
                set_default(
                    m,
                    "strategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
                );
                if let Some(s) = m.get_mut("strategy").and_then(Value::as_object_mut)
                    && s.get("type").and_then(Value::as_str) == Some("RollingUpdate")
                {
                    set_default(
                        s,
                        "rollingUpdate",
                        json!({"maxSurge": "25%", "maxUnavailable": "25%"}),
                    );
                }
            }
            default_template(obj, true);
        }
        ("apps", "ReplicaSet") | ("apps", "StatefulSet") => {
            if let Some(m) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                set_default(m, "replicas", json!(1));
            }
            default_template(obj, true);
        }
        ("apps", "DaemonSet") => {
            if let Some(m) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                set_default(m, "revisionHistoryLimit", json!(10));
                set_default(
                    m,
                    "updateStrategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
                );
            }
            default_template(obj, true);
        }
        ("batch", "Job") => {
            if let Some(m) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                set_default(m, "parallelism", json!(1));
                set_default(m, "completions", json!(1));
                set_default(m, "backoffLimit", json!(6));
                set_default(m, "completionMode", json!("NonIndexed"));
                set_default(m, "suspend", json!(false));
            }
            // A Job's template must name its restartPolicy (Never or OnFailure): no default.
            default_template(obj, false);
        }
        ("batch", "CronJob") => {
            if let Some(m) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                set_default(m, "concurrencyPolicy", json!("Allow"));
                set_default(m, "suspend", json!(false));
                set_default(m, "successfulJobsHistoryLimit", json!(3));
                set_default(m, "failedJobsHistoryLimit", json!(1));
            }
            if let Some(spec) = obj.pointer_mut("/spec/jobTemplate/spec/template/spec") {
                default_pod_spec(spec, false);
            }
        }
        _ => {}
    }
}

/// A Job without `manualSelector: true` gets the selector Kubernetes generates from its uid, and
/// its template the labels that selector matches (old and `batch.kubernetes.io/` spellings, as
/// 1.32 writes both), so that two Jobs can never select each other's pods.
fn generate_job_selector(obj: &mut Value) {
    if obj.pointer("/spec/manualSelector").and_then(Value::as_bool) == Some(true) {
        return;
    }
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.insert(
        "selector".into(),
        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
    );
    let Some(template) = spec.get_mut("template").and_then(Value::as_object_mut) else {
        return;
    };
    let meta = template.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let labels = meta.entry("labels").or_insert_with(|| json!({}));
    if labels.is_null() {
        *labels = json!({});
    }
    if let Some(l) = labels.as_object_mut() {
        l.insert("batch.kubernetes.io/controller-uid".into(), json!(uid));
        l.insert("batch.kubernetes.io/job-name".into(), json!(name));
        l.insert("controller-uid".into(), json!(uid));
        l.insert("job-name".into(), json!(name));
    }
}

/// Server-set metadata on create: uid, creationTimestamp, generation; name from generateName.
pub fn prepare_create(info: &ResourceInfo, obj: &mut Value, now: chrono::DateTime<chrono::Utc>) {
    apply_defaults(info, obj);
    // Kubernetes tracks generation only for objects with a spec (not ConfigMaps, Secrets, ...).
    let has_spec = obj.get("spec").is_some_and(|s| !s.is_null());
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if has_spec {
            m.insert("generation".into(), json!(1));
        }
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert(
            "creationTimestamp".into(),
            json!(now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
        m.remove("resourceVersion");
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        m.remove("selfLink");
    }
    if (info.group, info.kind) == ("batch", "Job") {
        generate_job_selector(obj);
    }
}

/// Update rules: identity metadata comes from `old`; the main resource cannot change status
/// (when there is a status subresource), the status subresource changes only status;
/// generation goes up when anything outside metadata and status changed.
pub fn prepare_update(
    info: &ResourceInfo,
    old: &Value,
    new: &mut Value,
    subresource: Option<&str>,
) -> Result<(), ApiError> {
    // A uid in the body is a precondition (as in Kubernetes): it must name the stored object.
    let old_uid = old
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("");
    if let Some(new_uid) = new.pointer("/metadata/uid").and_then(Value::as_str)
        && !new_uid.is_empty()
        && !old_uid.is_empty()
        && new_uid != old_uid
    {
        let name = old
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        return Err(ApiError::conflict(
            info.plural,
            name,
            &format!(
                "Precondition failed: UID in precondition: {new_uid}, UID in object meta: {old_uid}"
            ),
        ));
    }
    if subresource == Some("status") {
        let status = new.get("status").cloned();
        let mut merged = old.clone();
        if let Some(m) = merged.as_object_mut() {
            match status {
                Some(s) => m.insert("status".into(), s),
                None => m.remove("status"),
            };
        }
        *new = merged;
        return Ok(());
    }
    apply_defaults(info, new);
    for key in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        let value = old.get("metadata").and_then(|m| m.get(key)).cloned();
        if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            match value {
                Some(v) => m.insert(key.into(), v),
                None => m.remove(key),
            };
        }
    }
    if info.has_subresource("status")
        && let Some(m) = new.as_object_mut()
    {
        match old.get("status") {
            Some(s) => m.insert("status".into(), s.clone()),
            None => m.remove("status"),
        };
    }
    if new.get("spec").is_some() && old.get("spec") != new.get("spec") {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    Ok(())
}

/// Kubernetes' qualified name (label and annotation keys): `[prefix/]name`, prefix a DNS-1123
/// subdomain, name at most 63 characters of `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
/// Hand-written (a regex crate for three patterns is not worth the dependency).
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(is_dns1123_subdomain) && !name.is_empty() && is_label_value(name)
}

/// A label value: empty, or at most 63 characters of `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

const QUALIFIED_NAME_TEXT: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_TEXT: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
/// Kubernetes' limit on the total size of an object's annotations (keys plus values).
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// Labels and annotations of one ObjectMeta (`base` is its field path, e.g. `metadata`).
fn validate_object_meta(meta: Option<&Value>, base: &str, causes: &mut Vec<(String, String)>) {
    let Some(meta) = meta else { return };
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !is_qualified_name(k) {
                causes.push((
                    format!("{base}.labels"),
                    format!("Invalid value: \"{k}\": {QUALIFIED_NAME_TEXT}"),
                ));
            }
            let value = v.as_str().unwrap_or("");
            if !is_label_value(value) {
                causes.push((
                    format!("{base}.labels"),
                    format!("Invalid value: \"{value}\": {LABEL_VALUE_TEXT}"),
                ));
            }
        }
    }
    if let Some(annotations) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0usize;
        for (k, v) in annotations {
            total += k.len() + v.as_str().map_or(0, str::len);
            if !is_qualified_name(k) {
                causes.push((
                    format!("{base}.annotations"),
                    format!("Invalid value: \"{k}\": {QUALIFIED_NAME_TEXT}"),
                ));
            }
        }
        if total > ANNOTATIONS_MAX_BYTES {
            causes.push((
                format!("{base}.annotations"),
                format!("Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes"),
            ));
        }
    }
}

/// Kubernetes' IANA_SVC_NAME (a named port): at most 15 characters of `[a-z0-9-]`, at least
/// one letter, no leading, trailing or doubled hyphen.
fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// ConfigMap and Secret keys: `[-._a-zA-Z0-9]+`, at most 253 characters, not `.`/`..`-led.
fn is_config_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && k != "."
        && !k.starts_with("..")
}

/// Whether `schedule` is a standard 5-field cron expression (or a `@hourly`-style macro), as
/// robfig/cron's standard parser accepts for CronJobs. Hand-written: the cron crates on
/// crates.io parse 6- or 7-field (seconds) expressions, not Kubernetes' 5-field ones.
fn cron_schedule_error(schedule: &str) -> Option<String> {
    let s = schedule.trim();
    if s.starts_with("TZ=") || s.starts_with("CRON_TZ=") {
        return Some("cannot use TZ or CRON_TZ in schedule, use timeZone field instead".into());
    }
    if s.starts_with('@') {
        return match s {
            "@yearly" | "@annually" | "@monthly" | "@weekly" | "@daily" | "@midnight"
            | "@hourly" => None,
            _ if s.starts_with("@every ") => None,
            _ => Some(format!("unrecognized descriptor: {s}")),
        };
    }
    let fields: Vec<&str> = s.split_whitespace().collect();
    if fields.len() != 5 {
        return Some(format!(
            "expected exactly 5 fields, found {}: [{}]",
            fields.len(),
            fields.join(" ")
        ));
    }
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let bounds: [(u32, u32, &[&str], u32); 5] = [
        (0, 59, &[], 0),
        (0, 23, &[], 0),
        (1, 31, &[], 0),
        (1, 12, &MONTHS, 1),
        (0, 6, &DAYS, 0),
    ];
    for (field, (lo, hi, names, name_base)) in fields.iter().zip(bounds) {
        let value = |t: &str| -> Option<u32> {
            let lower = t.to_ascii_lowercase();
            names
                .iter()
                .position(|n| *n == lower)
                .map(|i| i as u32 + name_base)
                .or_else(|| t.parse().ok())
        };
        for part in field.split(',') {
            let (range, step) = match part.split_once('/') {
                Some((r, st)) => (r, Some(st)),
                None => (part, None),
            };
            if let Some(st) = step
                && st.parse::<u32>().map_or(true, |n| n == 0)
            {
                return Some(format!("failed to parse int from {st}"));
            }
            if range == "*" || range == "?" {
                continue;
            }
            let (a, b) = match range.split_once('-') {
                Some((a, b)) => (value(a), value(b)),
                None => (value(range), value(range)),
            };
            match (a, b) {
                (Some(a), Some(b)) if a >= lo && b <= hi && a <= b => {}
                (Some(_), Some(_)) => {
                    return Some(format!(
                        "end of range ({hi}) above maximum or below minimum ({lo}): {part}"
                    ));
                }
                _ => return Some(format!("failed to parse int from {range}")),
            }
        }
    }
    None
}

/// Kubernetes' "Unsupported value" text: `Unsupported value: "x": supported values: "a", "b"`.
fn unsupported(value: &str, allowed: &[&str]) -> String {
    let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "Unsupported value: \"{value}\": supported values: {}",
        list.join(", ")
    )
}

/// Field checks Kubernetes makes on the objects kubectl users write most (required fields, port
/// ranges, selectors that match their template). Returns 422 Invalid with one cause per problem.
pub fn validate(info: &ResourceInfo, obj: &Value) -> Result<(), ApiError> {
    let mut causes: Vec<(String, String)> = Vec::new();
    fn require(causes: &mut Vec<(String, String)>, ok: bool, field: &str, msg: &str) {
        if !ok {
            causes.push((field.to_string(), msg.to_string()));
        }
    }
    let str_at = |ptr: &str| obj.pointer(ptr).and_then(Value::as_str).unwrap_or("");
    let pod_spec = |spec: &Value, base: &str, causes: &mut Vec<(String, String)>| {
        for (field, allowed) in [
            ("restartPolicy", &["Always", "OnFailure", "Never"][..]),
            (
                "dnsPolicy",
                &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"][..],
            ),
        ] {
            if let Some(v) = spec.get(field).and_then(Value::as_str)
                && !allowed.contains(&v)
            {
                causes.push((format!("{base}.{field}"), unsupported(v, allowed)));
            }
        }
        let containers = spec.get("containers").and_then(Value::as_array);
        if containers.is_none_or(Vec::is_empty) {
            causes.push((format!("{base}.containers"), "Required value".into()));
        }
        // Container names are unique across containers and initContainers.
        let mut seen_names = std::collections::HashSet::new();
        for list in ["containers", "initContainers"] {
            for (i, c) in spec
                .get(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let name = c.get("name").and_then(Value::as_str).unwrap_or("");
                if !name.is_empty() && !seen_names.insert(name.to_string()) {
                    causes.push((
                        format!("{base}.{list}[{i}].name"),
                        format!("Duplicate value: \"{name}\""),
                    ));
                }
                if name.is_empty() {
                    causes.push((format!("{base}.{list}[{i}].name"), "Required value".into()));
                } else if !is_dns1123_label(name) {
                    causes.push((format!("{base}.{list}[{i}].name"), format!("Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character")));
                }
                if c.get("image")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .trim()
                    .is_empty()
                {
                    causes.push((format!("{base}.{list}[{i}].image"), "Required value".into()));
                }
                let pull_policies = ["Always", "IfNotPresent", "Never"];
                if let Some(v) = c.get("imagePullPolicy").and_then(Value::as_str)
                    && !pull_policies.contains(&v)
                {
                    causes.push((
                        format!("{base}.{list}[{i}].imagePullPolicy"),
                        unsupported(v, &pull_policies),
                    ));
                }
                for (j, p) in c
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let protocols = ["SCTP", "TCP", "UDP"];
                    if let Some(v) = p.get("protocol").and_then(Value::as_str)
                        && !protocols.contains(&v)
                    {
                        causes.push((
                            format!("{base}.{list}[{i}].ports[{j}].protocol"),
                            unsupported(v, &protocols),
                        ));
                    }
                    let port = p.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
                    if !(1..=65535).contains(&port) {
                        causes.push((
                            format!("{base}.{list}[{i}].ports[{j}].containerPort"),
                            format!(
                                "Invalid value: {port}: must be between 1 and 65535, inclusive"
                            ),
                        ));
                    }
                }
            }
        }
    };
    match (info.group, info.kind) {
        ("", "Pod") => match obj.get("spec") {
            Some(spec) => pod_spec(spec, "spec", &mut causes),
            None => require(&mut causes, false, "spec", "Required value"),
        },
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet") | ("batch", "Job") => {
            let selector = obj.pointer("/spec/selector");
            let labels = obj
                .pointer("/spec/template/metadata/labels")
                .and_then(Value::as_object);
            if info.group == "apps" {
                require(
                    &mut causes,
                    selector.is_some_and(|s| !s.is_null()),
                    "spec.selector",
                    "Required value",
                );
            }
            if let Some(sel) = obj.pointer("/spec/selector").filter(|s| !s.is_null()) {
                let empty = sel
                    .get("matchLabels")
                    .and_then(Value::as_object)
                    .is_none_or(Map::is_empty)
                    && sel
                        .get("matchExpressions")
                        .and_then(Value::as_array)
                        .is_none_or(Vec::is_empty);
                if empty && info.group == "apps" {
                    causes.push((
                        "spec.selector".into(),
                        format!(
                            "Invalid value: {sel}: empty selector is invalid for {}",
                            info.singular
                        ),
                    ));
                }
                for (i, e) in sel
                    .get("matchExpressions")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let op = e.get("operator").and_then(Value::as_str).unwrap_or("");
                    let n = e
                        .get("values")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                    let field = format!("spec.selector.matchExpressions[{i}]");
                    match op {
                        "In" | "NotIn" if n == 0 => causes.push((
                            format!("{field}.values"),
                            "Required value: must be specified when `operator` is 'In' or 'NotIn'".into(),
                        )),
                        "Exists" | "DoesNotExist" if n > 0 => causes.push((
                            format!("{field}.values"),
                            "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'".into(),
                        )),
                        "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                        other => causes.push((
                            format!("{field}.operator"),
                            unsupported(other, &["In", "NotIn", "Exists", "DoesNotExist"]),
                        )),
                    }
                    // An expression the template cannot satisfy is as wrong as a label mismatch.
                    let key = e.get("key").and_then(Value::as_str).unwrap_or("");
                    let label = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
                    let values: Vec<&str> = e
                        .get("values")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let satisfied = match op {
                        "In" => label.is_some_and(|l| values.contains(&l)),
                        "NotIn" => label.is_none_or(|l| !values.contains(&l)),
                        "Exists" => label.is_some(),
                        "DoesNotExist" => label.is_none(),
                        _ => true,
                    };
                    require(
                        &mut causes,
                        satisfied,
                        "spec.template.metadata.labels",
                        "Invalid value: `selector` does not match template `labels`",
                    );
                }
            }
            if info.kind == "Deployment" {
                let ty = str_at("/spec/strategy/type");
                match ty {
                    "Recreate" => {
                        if obj
                            .pointer("/spec/strategy/rollingUpdate")
                            .is_some_and(|r| !r.is_null())
                        {
                            causes.push((
                                "spec.strategy.rollingUpdate".into(),
                                "Forbidden: may not be specified when strategy `type` is 'Recreate'".into(),
                            ));
                        }
                    }
                    "RollingUpdate" | "" => {
                        let zero = |ptr: &str| match obj.pointer(ptr) {
                            Some(Value::Number(n)) => n.as_i64() == Some(0),
                            Some(Value::String(s)) => s == "0" || s == "0%",
                            _ => false,
                        };
                        if zero("/spec/strategy/rollingUpdate/maxSurge")
                            && zero("/spec/strategy/rollingUpdate/maxUnavailable")
                        {
                            causes.push((
                                "spec.strategy.rollingUpdate.maxUnavailable".into(),
                                "Invalid value: 0: may not be 0 when `maxSurge` is 0".into(),
                            ));
                        }
                    }
                    other => causes.push((
                        "spec.strategy.type".into(),
                        unsupported(other, &["Recreate", "RollingUpdate"]),
                    )),
                }
            }
            if let Some(Value::Object(match_labels)) = obj.pointer("/spec/selector/matchLabels") {
                let matches = match_labels
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
                require(
                    &mut causes,
                    matches,
                    "spec.template.metadata.labels",
                    "Invalid value: `selector` does not match template `labels`",
                );
            }
            validate_object_meta(
                obj.pointer("/spec/template/metadata"),
                "spec.template.metadata",
                &mut causes,
            );
            match obj.pointer("/spec/template/spec") {
                Some(spec) => pod_spec(spec, "spec.template.spec", &mut causes),
                None => causes.push(("spec.template.spec".into(), "Required value".into())),
            }
            if info.kind == "Job" {
                let policy = str_at("/spec/template/spec/restartPolicy");
                require(
                    &mut causes,
                    policy == "Never" || policy == "OnFailure",
                    "spec.template.spec.restartPolicy",
                    &format!(
                        "Unsupported value: \"{policy}\": supported values: \"OnFailure\", \"Never\""
                    ),
                );
            }
            if let Some(r) = obj.pointer("/spec/replicas").and_then(Value::as_i64) {
                require(
                    &mut causes,
                    r >= 0,
                    "spec.replicas",
                    "Invalid value: must be greater than or equal to 0",
                );
            }
        }
        ("", "Service") => {
            let ty = str_at("/spec/type");
            let ports = obj.pointer("/spec/ports").and_then(Value::as_array);
            let headless = str_at("/spec/clusterIP") == "None";
            if ty != "ExternalName" && !headless {
                require(
                    &mut causes,
                    ports.is_some_and(|p| !p.is_empty()),
                    "spec.ports",
                    "Required value",
                );
            }
            if ty == "ExternalName" {
                require(
                    &mut causes,
                    !str_at("/spec/externalName").is_empty(),
                    "spec.externalName",
                    "Required value",
                );
            }
            if !matches!(
                ty,
                "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
            ) {
                causes.push(("spec.type".into(), format!("Unsupported value: \"{ty}\": supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\"")));
            }
            if let Some(v) = obj.pointer("/spec/sessionAffinity").and_then(Value::as_str)
                && v != "None"
                && v != "ClientIP"
            {
                causes.push((
                    "spec.sessionAffinity".into(),
                    unsupported(v, &["ClientIP", "None"]),
                ));
            }
            let count = ports.map_or(0, Vec::len);
            let mut port_names = std::collections::HashSet::new();
            for (i, p) in ports.into_iter().flatten().enumerate() {
                let port_name = p.get("name").and_then(Value::as_str).unwrap_or("");
                if !port_name.is_empty() && !port_names.insert(port_name.to_string()) {
                    causes.push((
                        format!("spec.ports[{i}].name"),
                        format!("Duplicate value: \"{port_name}\""),
                    ));
                }
                let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                if !(1..=65535).contains(&port) {
                    causes.push((
                        format!("spec.ports[{i}].port"),
                        format!("Invalid value: {port}: must be between 1 and 65535, inclusive"),
                    ));
                }
                if count > 1
                    && p.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .is_empty()
                {
                    causes.push((format!("spec.ports[{i}].name"), "Required value".into()));
                }
                if !port_name.is_empty() && !is_dns1123_label(port_name) {
                    causes.push((
                        format!("spec.ports[{i}].name"),
                        format!("Invalid value: \"{port_name}\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"),
                    ));
                }
                match p.get("targetPort") {
                    Some(Value::Number(n)) => {
                        let n = n.as_i64().unwrap_or(0);
                        if !(1..=65535).contains(&n) {
                            causes.push((
                                format!("spec.ports[{i}].targetPort"),
                                format!("Invalid value: {n}: must be between 1 and 65535, inclusive"),
                            ));
                        }
                    }
                    Some(Value::String(name)) if !is_iana_svc_name(name) => causes.push((
                        format!("spec.ports[{i}].targetPort"),
                        format!("Invalid value: \"{name}\": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-), at least one letter, no two adjacent hyphens, at most 15 characters"),
                    )),
                    _ => {}
                }
                let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                if !matches!(proto, "TCP" | "UDP" | "SCTP") {
                    causes.push((format!("spec.ports[{i}].protocol"), format!("Unsupported value: \"{proto}\": supported values: \"SCTP\", \"TCP\", \"UDP\"")));
                }
            }
        }
        ("", "ConfigMap" | "Secret") => {
            // Kubernetes caps the data of one ConfigMap or Secret at 1 MiB.
            const MAX_DATA_BYTES: usize = 1024 * 1024;
            let size: usize = ["data", "binaryData"]
                .iter()
                .filter_map(|f| obj.get(*f).and_then(Value::as_object))
                .flat_map(|m| m.iter())
                .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                .sum();
            if size > MAX_DATA_BYTES {
                causes.push((
                    "data".into(),
                    format!("Too long: must have at most {MAX_DATA_BYTES} bytes"),
                ));
            }
            if info.kind == "Secret" {
                let required: &[&str] = match str_at("/type") {
                    "kubernetes.io/tls" => &["tls.crt", "tls.key"],
                    "kubernetes.io/dockerconfigjson" => &[".dockerconfigjson"],
                    "kubernetes.io/dockercfg" => &[".dockercfg"],
                    "kubernetes.io/ssh-auth" => &["ssh-privatekey"],
                    _ => &[],
                };
                for key in required {
                    if obj.pointer("/data").and_then(|d| d.get(*key)).is_none() {
                        causes.push((format!("data[{key}]"), "Required value".into()));
                    }
                }
            }
            let mut seen = std::collections::HashSet::new();
            for field in ["data", "binaryData"] {
                for k in obj
                    .get(field)
                    .and_then(Value::as_object)
                    .into_iter()
                    .flat_map(|m| m.keys())
                {
                    if !is_config_key(k) {
                        causes.push((format!("{field}[{k}]"), format!("Invalid value: \"{k}\": a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')")));
                    } else if !seen.insert(k.clone()) {
                        causes.push((
                            format!("{field}[{k}]"),
                            format!("Invalid value: \"{k}\": duplicate of key present in data"),
                        ));
                    }
                }
            }
        }
        ("batch", "CronJob") => {
            let schedule = str_at("/spec/schedule");
            if schedule.is_empty() {
                causes.push(("spec.schedule".into(), "Required value".into()));
            } else if let Some(why) = cron_schedule_error(schedule) {
                causes.push((
                    "spec.schedule".into(),
                    format!("Invalid value: \"{schedule}\": {why}"),
                ));
            }
            let policy = str_at("/spec/concurrencyPolicy");
            if !matches!(policy, "Allow" | "Forbid" | "Replace") {
                causes.push(("spec.concurrencyPolicy".into(), format!("Unsupported value: \"{policy}\": supported values: \"Allow\", \"Forbid\", \"Replace\"")));
            }
            match obj.pointer("/spec/jobTemplate/spec/template/spec") {
                Some(spec) => {
                    pod_spec(spec, "spec.jobTemplate.spec.template.spec", &mut causes);
                    let restart = spec
                        .get("restartPolicy")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if restart != "Never" && restart != "OnFailure" {
                        causes.push(("spec.jobTemplate.spec.template.spec.restartPolicy".into(), format!("Unsupported value: \"{restart}\": supported values: \"OnFailure\", \"Never\"")));
                    }
                }
                None => causes.push((
                    "spec.jobTemplate.spec.template.spec".into(),
                    "Required value".into(),
                )),
            }
        }
        _ => {}
    }
    validate_object_meta(obj.get("metadata"), "metadata", &mut causes);
    if causes.is_empty() {
        Ok(())
    } else {
        let name = str_at("/metadata/name");
        Err(ApiError::invalid_for(info, name, &causes))
    }
}

/// Fields Kubernetes refuses to change on update (422): workload selectors, a Job's template,
/// most of a Pod's spec, the data of an immutable ConfigMap or Secret.
pub fn validate_update(info: &ResourceInfo, old: &Value, new: &Value) -> Result<(), ApiError> {
    let name = new
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let immutable = |field: &str, ptr: &str| -> Result<(), ApiError> {
        let (a, b) = (old.pointer(ptr), new.pointer(ptr));
        if a.is_some() && a != b {
            let shown = b.map(Value::to_string).unwrap_or_else(|| "null".into());
            return Err(ApiError::invalid_for(
                info,
                name,
                &[(
                    field.to_string(),
                    format!("Invalid value: {shown}: field is immutable"),
                )],
            ));
        }
        Ok(())
    };
    match (info.group, info.kind) {
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet") => {
            immutable("spec.selector", "/spec/selector")?
        }
        ("batch", "Job") => {
            immutable("spec.selector", "/spec/selector")?;
            immutable("spec.completionMode", "/spec/completionMode")?;
        }
        ("", "ConfigMap" | "Secret") => {
            if old.get("immutable").and_then(Value::as_bool) == Some(true) {
                immutable("data", "/data")?;
                immutable("binaryData", "/binaryData")?;
                immutable("immutable", "/immutable")?;
            }
        }
        ("", "Pod") => {
            // Pod updates may change only images, activeDeadlineSeconds and added tolerations.
            let mut a = old.get("spec").cloned().unwrap_or(Value::Null);
            let mut b = new.get("spec").cloned().unwrap_or(Value::Null);
            for spec in [&mut a, &mut b] {
                if let Some(m) = spec.as_object_mut() {
                    m.remove("activeDeadlineSeconds");
                    m.remove("tolerations");
                    for list in ["containers", "initContainers"] {
                        if let Some(Value::Array(cs)) = m.get_mut(list) {
                            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                                c.remove("image");
                            }
                        }
                    }
                }
            }
            if a != b {
                return Err(ApiError::invalid(
                    info.kind,
                    name,
                    &[(
                        "spec".to_string(),
                        "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations)".to_string(),
                    )],
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry;

    #[test]
    fn unknown_fields_are_found_and_pruned() {
        let info = registry::find("apps", "v1", "deployments").expect("deployments");
        let body = json!({"metadata": {"name": "a"}, "spec": {"replicas": 1, "bogus": 1, "selector": {}, "template": {}}});
        let err =
            admit(info, Some("ns"), body.clone(), FieldValidation::Strict).expect_err("refused");
        assert_eq!(err.code, 400);
        assert!(
            err.message.contains("unknown field \"spec.bogus\""),
            "{}",
            err.message
        );
        let ok = admit(info, Some("ns"), body, FieldValidation::Warn).expect("warn admits");
        assert_eq!(
            ok.warnings,
            vec!["unknown field \"spec.bogus\"".to_string()]
        );
        assert!(ok.object.pointer("/spec/bogus").is_none());
        assert_eq!(ok.object["metadata"]["namespace"], "ns");
    }

    #[test]
    fn validation_finds_missing_and_out_of_range_fields() {
        let pods = registry::find("", "v1", "pods").expect("pods");
        let err = validate(
            pods,
            &json!({"metadata": {"name": "p"}, "spec": {"containers": []}}),
        )
        .expect_err("refused");
        assert_eq!(err.code, 422);
        assert!(
            err.message.contains("spec.containers: Required value"),
            "{}",
            err.message
        );
        let deploys = registry::find("apps", "v1", "deployments").expect("deployments");
        let good = json!({"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "a"}},
            "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        assert!(validate(deploys, &good).is_ok());
        let mut bad = good.clone();
        bad["spec"]["template"]["metadata"]["labels"]["app"] = json!("b");
        assert!(
            validate(deploys, &bad)
                .expect_err("refused")
                .message
                .contains("selector` does not match")
        );
        let services = registry::find("", "v1", "services").expect("services");
        let err = validate(services, &json!({"metadata": {"name": "s"}, "spec": {"type": "ClusterIP", "ports": [{"port": 70000}]}})).expect_err("refused");
        assert!(
            err.message.contains("spec.ports[0].port"),
            "{}",
            err.message
        );
        assert!(validate(services, &json!({"metadata": {"name": "s"}, "spec": {"type": "ClusterIP", "clusterIP": "None"}})).is_ok());
    }

    #[test]
    fn immutable_fields_stay_put() {
        let deploys = registry::find("apps", "v1", "deployments").expect("deployments");
        let old = json!({"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "a"}}, "replicas": 1}});
        let mut new = old.clone();
        new["spec"]["replicas"] = json!(3);
        assert!(validate_update(deploys, &old, &new).is_ok());
        new["spec"]["selector"]["matchLabels"]["app"] = json!("b");
        assert_eq!(
            validate_update(deploys, &old, &new)
                .expect_err("refused")
                .code,
            422
        );
        let pods = registry::find("", "v1", "pods").expect("pods");
        let old = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i:1"}]}});
        let mut new = old.clone();
        new["spec"]["containers"][0]["image"] = json!("i:2");
        assert!(validate_update(pods, &old, &new).is_ok());
        new["spec"]["containers"][0]["name"] = json!("other");
        assert!(
            validate_update(pods, &old, &new)
                .expect_err("refused")
                .message
                .contains("Forbidden")
        );
    }

    #[test]
    fn pods_get_default_toleration_seconds_unless_they_tolerate_already() {
        let pods = registry::find("", "v1", "pods").expect("pods");
        let tolerations = |spec_tolerations: Value| {
            let mut pod = json!({"metadata": {"name": "p"}, "spec": {
                "containers": [{"name": "c", "image": "i"}], "tolerations": spec_tolerations}});
            if pod["spec"]["tolerations"].is_null() {
                pod["spec"].as_object_mut().map(|m| m.remove("tolerations"));
            }
            apply_defaults(pods, &mut pod);
            pod["spec"]["tolerations"].clone()
        };
        let not_ready = json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                               "effect": "NoExecute", "tolerationSeconds": 300});
        let unreachable = json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                                 "effect": "NoExecute", "tolerationSeconds": 300});
        assert_eq!(tolerations(Value::Null), json!([not_ready, unreachable]));
        // A pod's own toleration of one taint is kept and not doubled; the other is added.
        let own = json!({"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                         "effect": "NoExecute", "tolerationSeconds": 2});
        assert_eq!(tolerations(json!([own])), json!([own, not_ready]));
        // Tolerating everything (empty key, Exists) covers both.
        let all = json!({"operator": "Exists"});
        assert_eq!(tolerations(json!([all])), json!([all]));
        // A NoSchedule toleration of the key does not cover the NoExecute taint.
        let no_schedule = json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                 "effect": "NoSchedule"});
        assert_eq!(
            tolerations(json!([no_schedule])),
            json!([no_schedule, not_ready, unreachable])
        );
        // Idempotent: defaulting again (an update) adds nothing.
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        apply_defaults(pods, &mut pod);
        let once = pod.clone();
        apply_defaults(pods, &mut pod);
        assert_eq!(pod, once);
        // Templates are not pods: a Deployment's template is left alone.
        let deploys = registry::find("apps", "v1", "deployments").expect("deployments");
        let mut d = json!({"metadata": {"name": "d"}, "spec": {"template": {"spec": {
            "containers": [{"name": "c", "image": "i"}]}}}});
        apply_defaults(deploys, &mut d);
        assert!(d.pointer("/spec/template/spec/tolerations").is_none());
    }

    #[test]
    fn wrong_types_are_bad_requests() {
        let info = registry::find("apps", "v1", "deployments").expect("deployments");
        let body = json!({"metadata": {"name": "a"}, "spec": {"replicas": "three"}});
        assert_eq!(
            admit(info, Some("ns"), body, FieldValidation::Ignore)
                .expect_err("refused")
                .code,
            400
        );
    }
}
