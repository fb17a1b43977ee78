//! Authorization, in Kubernetes' order: `system:masters` may do anything (the privileged group),
//! then the node authorizer (a node identity may read what a node needs and write only its own
//! Node and Lease, the status of pods bound to it, and events: Kubernetes' Node authorizer and
//! NodeRestriction admission in one), then RBAC (rbac.authorization.k8s.io/v1 Roles,
//! ClusterRoles and their bindings, read from the store on every request so a grant or a revoke
//! holds at once). Nothing allows: 403 with a `metav1.Status` worded as kube-apiserver words it.

use http::Method;
use serde_json::{Value, json};

use crate::State;
use crate::auth::{GROUP_MASTERS, UserInfo};
use crate::http::Query;
use crate::objects::{self, decode_kv, store_error};
use skiff_api::registry;
use skiff_api::status::ApiError;

/// What a request asks to do, as Kubernetes' `authorizer.Attributes`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributes {
    pub verb: String,
    pub resource_request: bool,
    pub api_group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The URL path (non-resource requests are authorized by it).
    pub path: String,
}

/// The attributes of a request, from its method, path and query (Kubernetes' RequestInfo).
pub fn attributes(method: &Method, path: &str, query: &Query) -> Attributes {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let non_resource = || Attributes {
        verb: method.as_str().to_ascii_lowercase(),
        path: path.to_string(),
        ..Default::default()
    };
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => return non_resource(),
    };
    let mut a = Attributes { resource_request: true, api_group: group.to_string(), path: path.to_string(), ..Default::default() };
    let mut parts: &[&str] = rest;
    if parts.first() == Some(&"namespaces") && parts.len() > 1 {
        a.namespace = parts[1].to_string();
        // `namespaces/<ns>` and its subresources are the Namespace itself.
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts = &parts[2..];
        }
    }
    a.resource = parts.first().map(|s| s.to_string()).unwrap_or_default();
    a.name = parts.get(1).map(|s| s.to_string()).unwrap_or_default();
    a.subresource = parts.get(2).map(|s| s.to_string()).unwrap_or_default();
    let watch = query.flag("watch");
    a.verb = match *method {
        Method::GET | Method::HEAD if watch => "watch",
        Method::GET | Method::HEAD if a.name.is_empty() => "list",
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if a.name.is_empty() => "deletecollection",
        Method::DELETE => "delete",
        _ => "",
    }
    .to_string();
    // exec/attach/port-forward open a session on the node whatever the method of the upgrade
    // (Kubernetes asks for `create` on websocket upgrades too).
    if a.resource == "pods" && matches!(a.subresource.as_str(), "exec" | "attach" | "portforward") {
        a.verb = "create".into();
    }
    a
}

fn contains(list: &Value, wanted: &str) -> bool {
    list.as_array().is_some_and(|l| l.iter().any(|v| v.as_str() == Some(wanted)))
}

fn contains_or_star(list: &Value, wanted: &str) -> bool {
    contains(list, wanted) || contains(list, "*")
}

/// Whether one PolicyRule allows the request (Kubernetes' `RuleAllows`).
pub fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    if !contains_or_star(&rule["verbs"], &a.verb) {
        return false;
    }
    if !a.resource_request {
        return rule["nonResourceURLs"].as_array().is_some_and(|urls| {
            urls.iter().filter_map(Value::as_str).any(|u| {
                u == "*" || u == a.path || (u.ends_with('*') && a.path.starts_with(&u[..u.len() - 1]))
            })
        });
    }
    if !contains_or_star(&rule["apiGroups"], &a.api_group) {
        return false;
    }
    let resource_ok = if a.subresource.is_empty() {
        contains_or_star(&rule["resources"], &a.resource)
    } else {
        let combined = format!("{}/{}", a.resource, a.subresource);
        contains(&rule["resources"], &combined)
            || contains(&rule["resources"], "*")
            || contains(&rule["resources"], &format!("*/{}", a.subresource))
    };
    if !resource_ok {
        return false;
    }
    match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => !a.name.is_empty() && names.iter().any(|n| n.as_str() == Some(a.name.as_str())),
        _ => true,
    }
}

/// Whether a binding's subject is this user (`binding_ns`: a RoleBinding's namespace, the
/// default for a ServiceAccount subject without one).
pub fn subject_matches(subject: &Value, user: &UserInfo, binding_ns: &str) -> bool {
    let name = subject["name"].as_str().unwrap_or("");
    match subject["kind"].as_str() {
        Some("User") => name == user.name,
        Some("Group") => user.in_group(name),
        Some("ServiceAccount") => {
            let ns = subject["namespace"].as_str().filter(|s| !s.is_empty()).unwrap_or(binding_ns);
            user.service_account() == Some((ns, name))
        }
        _ => false,
    }
}

pub(crate) async fn list(state: &State, plural: &str, ns: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let info = registry::find("rbac.authorization.k8s.io", "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("{plural} are not registered")))?;
    let listed = state.store.list(&objects::prefix(info, ns)).await.map_err(store_error)?;
    listed.items.iter().map(decode_kv).collect()
}

async fn get(state: &State, group: &str, plural: &str, ns: Option<&str>, name: &str) -> Result<Option<Value>, ApiError> {
    let info = registry::find(group, "v1", plural).ok_or_else(|| ApiError::internal(format!("{plural} are not registered")))?;
    match state.store.get(&objects::key(info, ns, name)).await.map_err(store_error)? {
        Some(kv) => Ok(Some(decode_kv(&kv)?)),
        None => Ok(None),
    }
}

/// The rules of a binding's roleRef (a missing role grants nothing, as in Kubernetes).
pub(crate) async fn role_rules(state: &State, binding: &Value, binding_ns: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let name = binding["roleRef"]["name"].as_str().unwrap_or("");
    let role = match binding["roleRef"]["kind"].as_str() {
        Some("ClusterRole") => get(state, "rbac.authorization.k8s.io", "clusterroles", None, name).await?,
        Some("Role") if binding_ns.is_some() => get(state, "rbac.authorization.k8s.io", "roles", binding_ns, name).await?,
        _ => None,
    };
    Ok(role.and_then(|r| r["rules"].as_array().cloned()).unwrap_or_default())
}

/// Whether RBAC allows the request.
pub async fn rbac_allows(state: &State, user: &UserInfo, a: &Attributes) -> Result<bool, ApiError> {
    for binding in list(state, "clusterrolebindings", None).await? {
        let subjects = binding["subjects"].as_array().cloned().unwrap_or_default();
        if !subjects.iter().any(|s| subject_matches(s, user, "")) {
            continue;
        }
        if role_rules(state, &binding, None).await?.iter().any(|r| rule_allows(r, a)) {
            return Ok(true);
        }
    }
    if a.resource_request && !a.namespace.is_empty() {
        for binding in list(state, "rolebindings", Some(&a.namespace)).await? {
            let subjects = binding["subjects"].as_array().cloned().unwrap_or_default();
            if !subjects.iter().any(|s| subject_matches(s, user, &a.namespace)) {
                continue;
            }
            if role_rules(state, &binding, Some(&a.namespace)).await?.iter().any(|r| rule_allows(r, a)) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The request body's `metadata.name` (a create names its object only there).
fn body_name(body: Option<&Value>) -> Option<&str> {
    body?.pointer("/metadata/name")?.as_str()
}

/// Whether a pod spec refers to a Secret or ConfigMap of this name (volumes, projected
/// sources, env, envFrom, imagePullSecrets): what a node may read for the pods it runs.
fn pod_references(pod: &Value, kind: &str, name: &str) -> bool {
    let spec = &pod["spec"];
    let is = |v: &Value| v.as_str() == Some(name);
    let volume_field = if kind == "secrets" { "secret" } else { "configMap" };
    let volume_name = if kind == "secrets" { "secretName" } else { "name" };
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().cloned().unwrap_or_default())
        .collect::<Vec<_>>();
    let env_key = if kind == "secrets" { "secretKeyRef" } else { "configMapKeyRef" };
    let env_from_key = if kind == "secrets" { "secretRef" } else { "configMapRef" };
    let in_volumes = spec["volumes"].as_array().is_some_and(|vols| {
        vols.iter().any(|v| {
            is(&v[volume_field][volume_name])
                || v["projected"]["sources"]
                    .as_array()
                    .is_some_and(|srcs| srcs.iter().any(|s| is(&s[volume_field]["name"])))
        })
    });
    let in_env = containers.iter().any(|c| {
        c["env"].as_array().is_some_and(|env| env.iter().any(|e| is(&e["valueFrom"][env_key]["name"])))
            || c["envFrom"].as_array().is_some_and(|env| env.iter().any(|e| is(&e[env_from_key]["name"])))
    });
    let in_pull = kind == "secrets"
        && spec["imagePullSecrets"].as_array().is_some_and(|l| l.iter().any(|s| is(&s["name"])));
    in_volumes || in_env || in_pull
}

async fn pod(state: &State, ns: &str, name: &str) -> Result<Option<Value>, ApiError> {
    get(state, "", "pods", Some(ns), name).await
}

fn bound_to(pod: &Value, node: &str) -> bool {
    pod.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node)
}

/// The node authorizer: Some(true) allows, None has no opinion (RBAC decides).
async fn node_allows(state: &State, node: &str, a: &Attributes, body: Option<&Value>) -> Result<Option<bool>, ApiError> {
    if !a.resource_request {
        return Ok(None);
    }
    let read = matches!(a.verb.as_str(), "get" | "list" | "watch");
    let own_name = |name: &str| name == node;
    let allow = match (a.api_group.as_str(), a.resource.as_str(), a.subresource.as_str()) {
        ("", "nodes", "") => {
            read || match a.verb.as_str() {
                "create" => body_name(body) == Some(node),
                "update" | "patch" => own_name(&a.name),
                _ => false,
            }
        }
        ("", "nodes", "status") => (read || matches!(a.verb.as_str(), "update" | "patch")) && own_name(&a.name),
        ("coordination.k8s.io", "leases", "") if a.namespace == "kube-node-lease" => match a.verb.as_str() {
            "get" | "list" | "watch" => true,
            "create" => body_name(body) == Some(node),
            "update" | "patch" | "delete" => own_name(&a.name),
            _ => false,
        },
        ("", "pods", "") => {
            read || (a.verb == "delete" && pod(state, &a.namespace, &a.name).await?.is_some_and(|p| bound_to(&p, node)))
        }
        ("", "pods", "status") => {
            (read || matches!(a.verb.as_str(), "update" | "patch"))
                && pod(state, &a.namespace, &a.name).await?.is_some_and(|p| bound_to(&p, node))
        }
        ("", "events", "") | ("events.k8s.io", "events", "") => {
            matches!(a.verb.as_str(), "create" | "update" | "patch") || read
        }
        ("", "services" | "endpoints" | "namespaces", "")
        | ("discovery.k8s.io", "endpointslices", "")
        | ("networking.k8s.io", "networkpolicies", "") => read,
        ("", kind @ ("secrets" | "configmaps"), "") => {
            a.verb == "get" && !a.name.is_empty() && {
                let info = registry::find("", "v1", "pods").ok_or_else(|| ApiError::internal("pods are not registered"))?;
                let listed = state.store.list(&objects::prefix(info, Some(&a.namespace))).await.map_err(store_error)?;
                listed
                    .items
                    .iter()
                    .filter_map(|kv| decode_kv(kv).ok())
                    .any(|p| bound_to(&p, node) && pod_references(&p, kind, &a.name))
            }
        }
        // The agent's metrics: its own NodeMetrics, PodMetrics of pods bound to it.
        ("metrics.k8s.io", "nodes", "") => read || own_name(&a.name) || body_name(body) == Some(node),
        ("metrics.k8s.io", "pods", "") => {
            read || {
                let name = if a.name.is_empty() { body_name(body).unwrap_or("") } else { a.name.as_str() };
                pod(state, &a.namespace, name).await?.is_some_and(|p| bound_to(&p, node))
            }
        }
        // A node renews its own client certificate (the signer checks the name).
        ("certificates.k8s.io", "certificatesigningrequests", "") => matches!(a.verb.as_str(), "create" | "get" | "list" | "watch"),
        // Service-account tokens for the pods it runs, bound to such a pod.
        ("", "serviceaccounts", "token") => {
            a.verb == "create" && {
                let bound = body.and_then(|b| b.pointer("/spec/boundObjectRef"));
                let pod_name = bound.filter(|r| r["kind"] == "Pod").and_then(|r| r["name"].as_str());
                match pod_name {
                    Some(p) => pod(state, &a.namespace, p).await?.is_some_and(|p| {
                        bound_to(&p, node)
                            && p.pointer("/spec/serviceAccountName").and_then(Value::as_str).unwrap_or("default") == a.name
                    }),
                    None => false,
                }
            }
        }
        _ => return Ok(None),
    };
    Ok(allow.then_some(true))
}

/// Whether a request is allowed; `body` is the decoded request body when the request has one
/// (a create names its object there).
pub async fn allowed(state: &State, user: &UserInfo, a: &Attributes, body: Option<&Value>) -> Result<bool, ApiError> {
    if user.in_group(GROUP_MASTERS) {
        return Ok(true);
    }
    if let Some(node) = user.node_name()
        && node_allows(state, node, a, body).await? == Some(true)
    {
        return Ok(true);
    }
    rbac_allows(state, user, a).await
}

/// Impersonation (`kubectl --as`, `--as-group`): with `Impersonate-User` (and optionally
/// `Impersonate-Group`, `Impersonate-Uid`) the request acts as that user, if the requester may
/// `impersonate` each of them (users, groups, serviceaccounts in the core group; uids in
/// authentication.k8s.io), as kube-apiserver's impersonation filter does. Without the headers
/// the requester is unchanged. `Impersonate-Extra-*` is refused rather than ignored.
pub async fn impersonate(state: &State, requester: UserInfo, headers: &http::HeaderMap) -> Result<UserInfo, ApiError> {
    let values = |name: &str| -> Vec<String> {
        headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).map(|v| v.trim().to_string()).collect()
    };
    let user = values("impersonate-user").into_iter().next();
    let groups = values("impersonate-group");
    let uid = values("impersonate-uid").into_iter().next();
    let extra = headers.keys().any(|k| k.as_str().starts_with("impersonate-extra-"));
    let Some(name) = user.filter(|u| !u.is_empty()) else {
        if !groups.is_empty() || uid.is_some() || extra {
            return Err(ApiError::bad_request("requested impersonation of groups, a uid or extras without impersonating a user"));
        }
        return Ok(requester);
    };
    if extra {
        return Err(ApiError::bad_request("Impersonate-Extra headers are not supported"));
    }
    let check = |resource: &str, group: &str, namespace: &str, target: &str| Attributes {
        verb: "impersonate".into(),
        resource_request: true,
        api_group: group.into(),
        resource: resource.into(),
        namespace: namespace.into(),
        name: target.into(),
        ..Default::default()
    };
    let mut wanted = vec![];
    let mut impersonated_groups: Vec<String> = groups.clone();
    match name.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) {
        Some((ns, sa)) => {
            wanted.push(check("serviceaccounts", "", ns, sa));
            if groups.is_empty() {
                impersonated_groups = vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")];
            }
        }
        None => wanted.push(check("users", "", "", &name)),
    }
    wanted.extend(groups.iter().map(|g| check("groups", "", "", g)));
    if let Some(u) = &uid {
        wanted.push(check("uids", "authentication.k8s.io", "", u));
    }
    for a in &wanted {
        if !allowed(state, &requester, a, None).await? {
            return Err(forbidden(&requester, a));
        }
    }
    let group_refs: Vec<&str> = impersonated_groups.iter().map(String::as_str).collect();
    let mut out = UserInfo::new(name, &group_refs);
    out.uid = uid.unwrap_or_default();
    Ok(out)
}

/// The 403 kube-apiserver sends, worded as its (kubectl prints the message).
pub fn forbidden(user: &UserInfo, a: &Attributes) -> ApiError {
    if !a.resource_request {
        return ApiError::forbidden(format!("forbidden: User \"{}\" cannot {} path \"{}\"", user.name, a.verb, a.path));
    }
    let resource = if a.subresource.is_empty() { a.resource.clone() } else { format!("{}/{}", a.resource, a.subresource) };
    let scope = if a.namespace.is_empty() { "at the cluster scope".to_string() } else { format!("in the namespace \"{}\"", a.namespace) };
    let what = if a.name.is_empty() { a.resource.clone() } else { format!("{} \"{}\"", a.resource, a.name) };
    let mut err = ApiError::forbidden(format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
        user.name, a.verb, a.api_group
    ));
    let mut details = json!({"kind": a.resource});
    if !a.name.is_empty() {
        details["name"] = json!(a.name);
    }
    if !a.api_group.is_empty() {
        details["group"] = json!(a.api_group);
    }
    err.details = Some(details);
    err
}

/// A SelfSubjectAccessReview (`kubectl auth can-i`): the request's own user asks whether it
/// may do what the spec describes.
pub async fn self_subject_access_review(state: &State, user: &UserInfo, body: &Value) -> Result<Value, ApiError> {
    let spec = &body["spec"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let a = if let Some(r) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        Attributes {
            verb: s(&r["verb"]),
            resource_request: true,
            api_group: s(&r["group"]),
            resource: s(&r["resource"]),
            subresource: s(&r["subresource"]),
            namespace: s(&r["namespace"]),
            name: s(&r["name"]),
            path: String::new(),
        }
    } else if let Some(n) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
        Attributes { verb: s(&n["verb"]), path: s(&n["path"]), ..Default::default() }
    } else {
        return Err(ApiError::bad_request("spec needs resourceAttributes or nonResourceAttributes"));
    };
    let allowed = allowed(state, user, &a, None).await?;
    let mut out = body.clone();
    out["apiVersion"] = json!("authorization.k8s.io/v1");
    out["kind"] = json!("SelfSubjectAccessReview");
    if !out["metadata"].is_object() {
        out["metadata"] = json!({});
    }
    // No reason on a denial, as kube-apiserver's RBAC gives none (kubectl prints "no").
    out["status"] = json!({"allowed": allowed});
    Ok(out)
}

/// The ClusterRoles and ClusterRoleBindings every cluster has (Kubernetes' bootstrap policy,
/// the part skiff's components need), created at start when missing.
pub fn default_policy() -> Vec<(&'static str, Value)> {
    let role = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
               "rules": rules})
    };
    let binding = |name: &str, role: &str, kind: &str, subject: &str| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}]})
    };
    let read = json!(["get", "list", "watch"]);
    let write = json!(["create", "update", "patch", "delete"]);
    vec![
        ("clusterroles", role("cluster-admin", json!([
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ]))),
        ("clusterrolebindings", binding("cluster-admin", "cluster-admin", "Group", GROUP_MASTERS)),
        ("clusterroles", role("system:discovery", json!([{"nonResourceURLs": [
            "/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/",
            "/healthz", "/livez", "/readyz"], "verbs": ["get"]}]))),
        ("clusterrolebindings", binding("system:discovery", "system:discovery", "Group", crate::auth::GROUP_AUTHENTICATED)),
        ("clusterroles", role("system:basic-user", json!([{"apiGroups": ["authorization.k8s.io"],
            "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]}]))),
        ("clusterrolebindings", binding("system:basic-user", "system:basic-user", "Group", crate::auth::GROUP_AUTHENTICATED)),
        // A joining node may only ask for its client certificate (kubeadm's kubelet-bootstrap).
        ("clusterroles", role("system:node-bootstrapper", json!([{"apiGroups": ["certificates.k8s.io"],
            "resources": ["certificatesigningrequests"], "verbs": ["create", "get", "list", "watch"]}]))),
        ("clusterrolebindings", binding("kubeadm:kubelet-bootstrap", "system:node-bootstrapper", "Group", crate::auth::GROUP_BOOTSTRAPPERS)),
        ("clusterroles", role("system:kube-scheduler", json!([
            {"apiGroups": [""], "resources": ["pods", "nodes", "namespaces", "services", "persistentvolumeclaims", "replicationcontrollers"], "verbs": read},
            {"apiGroups": ["apps"], "resources": ["replicasets", "statefulsets"], "verbs": read},
            {"apiGroups": [""], "resources": ["pods/binding", "bindings"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch", "update"]},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create", "get", "list", "watch", "update", "patch"]},
        ]))),
        ("clusterrolebindings", binding("system:kube-scheduler", "system:kube-scheduler", "User", "system:kube-scheduler")),
        // skiff's controllers run as one identity (Kubernetes splits them into per-controller
        // service accounts), so this is the union of what they do. The garbage collector watches
        // every kind and patches or deletes any object with owners (Kubernetes'
        // system:controller:generic-garbage-collector grants the same); the escalation check
        // (`escalation`) keeps those updates of RBAC objects to the owner fields. They create
        // only the kinds they make: pods, ReplicaSets, Jobs, EndpointSlices, Endpoints, Events and
        // their leader-election Lease.
        ("clusterroles", role("system:kube-controller-manager", json!([
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["get", "list", "watch", "patch", "update", "delete"]},
            {"apiGroups": [""], "resources": ["pods", "endpoints", "events"], "verbs": ["create"]},
            {"apiGroups": ["apps"], "resources": ["replicasets", "controllerrevisions"], "verbs": ["create"]},
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
        ]))),
        ("clusterrolebindings", binding("system:kube-controller-manager", "system:kube-controller-manager", "User", "system:kube-controller-manager")),
        // What Kubernetes calls `view`, for users an admin grants read access.
        ("clusterroles", role("view", json!([{"apiGroups": ["", "apps", "batch", "autoscaling", "discovery.k8s.io", "networking.k8s.io"],
            "resources": ["pods", "pods/log", "pods/status", "services", "endpoints", "configmaps", "events", "namespaces", "nodes",
                          "deployments", "replicasets", "daemonsets", "statefulsets", "jobs", "cronjobs",
                          "horizontalpodautoscalers", "endpointslices", "networkpolicies", "serviceaccounts", "resourcequotas"],
            "verbs": read}]))),
        ("clusterroles", role("edit", json!([{"apiGroups": ["", "apps", "batch", "autoscaling", "discovery.k8s.io", "networking.k8s.io"],
            "resources": ["pods", "pods/log", "pods/exec", "pods/status", "services", "endpoints", "configmaps", "secrets", "events",
                          "deployments", "deployments/scale", "replicasets", "daemonsets", "statefulsets", "jobs", "cronjobs",
                          "horizontalpodautoscalers", "endpointslices", "networkpolicies", "serviceaccounts"],
            "verbs": [read[0].clone(), read[1].clone(), read[2].clone(), write[0].clone(), write[1].clone(), write[2].clone(), write[3].clone(), "deletecollection"]}]))),
    ]
}

/// Creates the default policy objects that are missing (an admin's edits of existing ones stay).
pub(crate) async fn ensure_default_policy(state: &State) -> Result<(), ApiError> {
    for (plural, obj) in default_policy() {
        let info = registry::find("rbac.authorization.k8s.io", "v1", plural)
            .ok_or_else(|| ApiError::internal(format!("{plural} are not registered")))?;
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if state.store.get(&objects::key(info, None, &name)).await.map_err(store_error)?.is_some() {
            continue;
        }
        match objects::create_object(state, info, None, obj, false).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: Method, path: &str) -> Attributes {
        let (path, q) = path.split_once('?').unwrap_or((path, ""));
        attributes(&method, path, &Query::parse(Some(q)))
    }

    #[test]
    fn request_attributes() {
        let a = attrs(Method::PATCH, "/api/v1/namespaces/ns1/pods/p1/status");
        assert_eq!((a.verb.as_str(), a.api_group.as_str(), a.resource.as_str(), a.subresource.as_str(), a.namespace.as_str(), a.name.as_str()),
                   ("patch", "", "pods", "status", "ns1", "p1"));
        let a = attrs(Method::GET, "/apis/apps/v1/deployments?watch=true");
        assert_eq!((a.verb.as_str(), a.api_group.as_str(), a.resource.as_str(), a.namespace.as_str()), ("watch", "apps", "deployments", ""));
        let a = attrs(Method::GET, "/api/v1/namespaces/ns1");
        assert_eq!((a.verb.as_str(), a.resource.as_str(), a.name.as_str(), a.namespace.as_str()), ("get", "namespaces", "ns1", "ns1"));
        let a = attrs(Method::DELETE, "/api/v1/namespaces/ns1/configmaps");
        assert_eq!(a.verb, "deletecollection");
        let a = attrs(Method::GET, "/api/v1/namespaces/ns1/pods/p/exec?command=ls");
        assert_eq!((a.verb.as_str(), a.subresource.as_str()), ("create", "exec"));
        let a = attrs(Method::GET, "/apis/apps/v1");
        assert!(!a.resource_request);
        assert_eq!((a.verb.as_str(), a.path.as_str()), ("get", "/apis/apps/v1"));
    }

    #[test]
    fn rules() {
        let rule = json!({"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]});
        assert!(rule_allows(&rule, &attrs(Method::GET, "/api/v1/namespaces/a/pods/x")));
        assert!(rule_allows(&rule, &attrs(Method::GET, "/api/v1/namespaces/a/pods/x/log")));
        assert!(!rule_allows(&rule, &attrs(Method::GET, "/api/v1/namespaces/a/pods/x/status")), "a subresource needs its own entry");
        assert!(!rule_allows(&rule, &attrs(Method::DELETE, "/api/v1/namespaces/a/pods/x")));
        assert!(!rule_allows(&rule, &attrs(Method::GET, "/apis/apps/v1/namespaces/a/deployments")));
        let named = json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["one"], "verbs": ["get"]});
        assert!(rule_allows(&named, &attrs(Method::GET, "/api/v1/namespaces/a/configmaps/one")));
        assert!(!rule_allows(&named, &attrs(Method::GET, "/api/v1/namespaces/a/configmaps/two")));
        assert!(!rule_allows(&named, &attrs(Method::GET, "/api/v1/namespaces/a/configmaps")), "resourceNames never allow a list");
        let star = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]});
        assert!(rule_allows(&star, &attrs(Method::PUT, "/apis/apps/v1/namespaces/a/deployments/d/status")));
        assert!(!rule_allows(&star, &attrs(Method::PUT, "/apis/apps/v1/namespaces/a/deployments/d")));
        let urls = json!({"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]});
        assert!(rule_allows(&urls, &attrs(Method::GET, "/apis/apps/v1")));
        assert!(rule_allows(&urls, &attrs(Method::GET, "/version")));
        assert!(!rule_allows(&urls, &attrs(Method::GET, "/version/x")));
        assert!(!rule_allows(&urls, &attrs(Method::GET, "/api/v1/pods")), "a resource request is no URL");
    }

    #[test]
    fn subjects() {
        let sa = UserInfo::new("system:serviceaccount:ns1:robot", &["system:serviceaccounts"]);
        assert!(subject_matches(&json!({"kind": "ServiceAccount", "name": "robot"}), &sa, "ns1"));
        assert!(!subject_matches(&json!({"kind": "ServiceAccount", "name": "robot"}), &sa, "ns2"));
        assert!(subject_matches(&json!({"kind": "ServiceAccount", "name": "robot", "namespace": "ns1"}), &sa, ""));
        assert!(subject_matches(&json!({"kind": "Group", "name": "system:serviceaccounts"}), &sa, ""));
        assert!(!subject_matches(&json!({"kind": "User", "name": "robot"}), &sa, "ns1"));
        let alice = UserInfo::new("alice", &["dev"]);
        assert!(subject_matches(&json!({"kind": "User", "name": "alice"}), &alice, ""));
        assert!(subject_matches(&json!({"kind": "Group", "name": "dev"}), &alice, ""));
    }

    #[test]
    fn pod_references_secrets_and_configmaps() {
        let pod = json!({"spec": {
            "volumes": [{"name": "v", "secret": {"secretName": "s1"}},
                        {"name": "p", "projected": {"sources": [{"configMap": {"name": "c1"}}]}}],
            "imagePullSecrets": [{"name": "pull"}],
            "containers": [{"name": "c", "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": "s2", "key": "k"}}}],
                            "envFrom": [{"configMapRef": {"name": "c2"}}]}]}});
        for (kind, name) in [("secrets", "s1"), ("secrets", "s2"), ("secrets", "pull"), ("configmaps", "c1"), ("configmaps", "c2")] {
            assert!(pod_references(&pod, kind, name), "{kind}/{name}");
        }
        assert!(!pod_references(&pod, "secrets", "c1"));
        assert!(!pod_references(&pod, "configmaps", "s1"));
        assert!(!pod_references(&pod, "secrets", "other"));
    }
}
