//! RBAC privilege-escalation prevention, as kube-apiserver's RBAC storage does it: a Role or
//! ClusterRole may be written only by someone who already holds every permission in it (or may
//! `escalate` that role), and a RoleBinding or ClusterRoleBinding only by someone who holds the
//! permissions of the role it references (or may `bind` that role). Without this, anyone allowed
//! to write RBAC objects (and the garbage collector's `update` on everything) could grant
//! themselves cluster-admin.
//!
//! An update that changes none of what grants (a role's `rules`, a binding's `roleRef` and
//! `subjects`) is not checked: the garbage collector's ownerReferences and finalizers edits
//! (Kubernetes' `IsOnlyMutatingGCFields`), labels and annotations grant nothing.

use serde_json::{Value, json};

use crate::State;
use crate::auth::{GROUP_MASTERS, UserInfo};
use crate::authz::{self, Attributes};
use skiff_api::status::ApiError;

const GROUP: &str = "rbac.authorization.k8s.io";

/// One permission: a verb on one resource (or URL) of one group, maybe of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Atom {
    Resource { verb: String, group: String, resource: String, name: Option<String> },
    Url { verb: String, url: String },
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|l| l.iter().filter_map(Value::as_str).map(str::to_string).collect()).unwrap_or_default()
}

/// A PolicyRule broken into single permissions (Kubernetes' `BreakdownRule`).
fn breakdown(rule: &Value) -> Vec<Atom> {
    let mut out = Vec::new();
    let verbs = strings(&rule["verbs"]);
    let names = strings(&rule["resourceNames"]);
    for verb in &verbs {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                if names.is_empty() {
                    out.push(Atom::Resource { verb: verb.clone(), group: group.clone(), resource: resource.clone(), name: None });
                }
                for name in &names {
                    out.push(Atom::Resource { verb: verb.clone(), group: group.clone(), resource: resource.clone(), name: Some(name.clone()) });
                }
            }
        }
        for url in strings(&rule["nonResourceURLs"]) {
            out.push(Atom::Url { verb: verb.clone(), url });
        }
    }
    out
}

fn has(list: &[String], wanted: &str) -> bool {
    list.iter().any(|v| v == wanted || v == "*")
}

/// Whether a held rule covers one permission (Kubernetes' `ruleCovers`: a wildcard covers only
/// what it names, a held `*` is needed to grant `*`).
fn covers(owner: &Value, atom: &Atom) -> bool {
    let verbs = strings(&owner["verbs"]);
    match atom {
        Atom::Url { verb, url } => {
            has(&verbs, verb)
                && strings(&owner["nonResourceURLs"]).iter().any(|u| {
                    u == "*" || u == url || (u.ends_with('*') && url.starts_with(&u[..u.len() - 1]))
                })
        }
        Atom::Resource { verb, group, resource, name } => {
            let resources = strings(&owner["resources"]);
            let resource_ok = resources.iter().any(|r| {
                r == "*"
                    || r == resource
                    || resource.split_once('/').is_some_and(|(base, sub)| r == &format!("*/{sub}") || r == &format!("{base}/*"))
            });
            let names = strings(&owner["resourceNames"]);
            let name_ok = names.is_empty() || name.as_ref().is_some_and(|n| names.contains(n));
            has(&verbs, verb) && has(&strings(&owner["apiGroups"]), group) && resource_ok && name_ok
        }
    }
}

/// The RBAC rules the user holds in `namespace` ("" for cluster-wide only).
async fn held_rules(state: &State, user: &UserInfo, namespace: &str) -> Result<Vec<Value>, ApiError> {
    let mut rules = Vec::new();
    for binding in authz::list(state, "clusterrolebindings", None).await? {
        if binding["subjects"].as_array().is_some_and(|s| s.iter().any(|s| authz::subject_matches(s, user, ""))) {
            rules.extend(authz::role_rules(state, &binding, None).await?);
        }
    }
    if !namespace.is_empty() {
        for binding in authz::list(state, "rolebindings", Some(namespace)).await? {
            if binding["subjects"].as_array().is_some_and(|s| s.iter().any(|s| authz::subject_matches(s, user, namespace))) {
                rules.extend(authz::role_rules(state, &binding, Some(namespace)).await?);
            }
        }
    }
    Ok(rules)
}

/// The permissions of `rules` that `held` does not cover.
fn missing(held: &[Value], rules: &[Value]) -> Vec<Atom> {
    let mut out: Vec<Atom> = Vec::new();
    for atom in rules.iter().flat_map(breakdown) {
        if !held.iter().any(|h| covers(h, &atom)) && !out.contains(&atom) {
            out.push(atom);
        }
    }
    out
}

/// Kubernetes' wording of what is missing, one `{...}` per permission.
fn describe(atoms: &[Atom]) -> String {
    atoms
        .iter()
        .map(|a| match a {
            Atom::Resource { verb, group, resource, name } => {
                let names = name.as_ref().map(|n| format!(", ResourceNames:[\"{n}\"]")).unwrap_or_default();
                format!("{{APIGroups:[\"{group}\"], Resources:[\"{resource}\"]{names}, Verbs:[\"{verb}\"]}}")
            }
            Atom::Url { verb, url } => format!("{{NonResourceURLs:[\"{url}\"], Verbs:[\"{verb}\"]}}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn refused(user: &UserInfo, plural: &str, name: &str, atoms: &[Atom], namespace: &str) -> ApiError {
    let groups = user.groups.iter().map(|g| format!("{g:?}")).collect::<Vec<_>>().join(" ");
    let scope = if namespace.is_empty() { String::new() } else { format!(" in the namespace \"{namespace}\"") };
    let mut err = ApiError::forbidden(format!(
        "{plural}.{GROUP} \"{name}\" is forbidden: user \"{}\" (groups=[{groups}]) is attempting to grant RBAC permissions not currently held{scope}:\n{}",
        user.name,
        describe(atoms)
    ));
    err.details = Some(json!({"name": name, "group": GROUP, "kind": plural}));
    err
}

/// Whether RBAC lets the user do `verb` (escalate, bind) on a role.
async fn may(state: &State, user: &UserInfo, verb: &str, plural: &str, namespace: &str, name: &str) -> Result<bool, ApiError> {
    let a = Attributes {
        verb: verb.into(),
        resource_request: true,
        api_group: GROUP.into(),
        resource: plural.into(),
        namespace: namespace.into(),
        name: name.into(),
        ..Default::default()
    };
    authz::allowed(state, user, &a, None).await
}

/// The check before `new` (of `plural`, in `namespace` or "" when cluster-scoped) is stored;
/// `old` is the stored object on an update. Other kinds pass.
pub async fn confirm(
    state: &State,
    user: Option<&UserInfo>,
    plural: &str,
    namespace: &str,
    new: &Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let granting: &[&str] = match plural {
        "roles" | "clusterroles" => &["rules"],
        "rolebindings" | "clusterrolebindings" => &["roleRef", "subjects"],
        _ => return Ok(()),
    };
    // Objects the server writes for itself (the default policy) have no user.
    let Some(user) = user else { return Ok(()) };
    if user.in_group(GROUP_MASTERS) {
        return Ok(());
    }
    if let Some(old) = old
        && granting.iter().all(|f| old[*f] == new[*f])
    {
        return Ok(());
    }
    let name = new.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    match plural {
        "roles" | "clusterroles" => {
            if may(state, user, "escalate", plural, namespace, name).await? {
                return Ok(());
            }
            let rules = new["rules"].as_array().cloned().unwrap_or_default();
            let gaps = missing(&held_rules(state, user, namespace).await?, &rules);
            if gaps.is_empty() { Ok(()) } else { Err(refused(user, plural, name, &gaps, namespace)) }
        }
        _ => {
            let role_kind = new.pointer("/roleRef/kind").and_then(Value::as_str).unwrap_or("");
            let role_name = new.pointer("/roleRef/name").and_then(Value::as_str).unwrap_or("");
            let role_plural = if role_kind == "ClusterRole" { "clusterroles" } else { "roles" };
            if may(state, user, "bind", role_plural, namespace, role_name).await? {
                return Ok(());
            }
            let binding_ns = (!namespace.is_empty()).then_some(namespace);
            let rules = authz::role_rules(state, new, binding_ns).await?;
            let gaps = missing(&held_rules(state, user, namespace).await?, &rules);
            if gaps.is_empty() { Ok(()) } else { Err(refused(user, plural, name, &gaps, namespace)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage() {
        let held = vec![
            json!({"apiGroups": [""], "resources": ["pods", "configmaps"], "verbs": ["get", "list"]}),
            json!({"apiGroups": ["apps"], "resources": ["*"], "verbs": ["*"]}),
            json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["one"], "verbs": ["get"]}),
            json!({"apiGroups": [""], "resources": ["*/status"], "verbs": ["get"]}),
            json!({"nonResourceURLs": ["/metrics*"], "verbs": ["get"]}),
        ];
        let ok = |rule: Value| missing(&held, &[rule]).is_empty();
        assert!(ok(json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]})));
        assert!(ok(json!({"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale"], "verbs": ["delete", "patch"]})));
        assert!(ok(json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["one"], "verbs": ["get"]})));
        assert!(ok(json!({"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get"]})));
        assert!(ok(json!({"nonResourceURLs": ["/metrics/x"], "verbs": ["get"]})));
        assert!(!ok(json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]})));
        assert!(!ok(json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})), "a named grant does not cover all names");
        assert!(!ok(json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["two"], "verbs": ["get"]})));
        assert!(!ok(json!({"apiGroups": [""], "resources": ["*"], "verbs": ["get"]})), "a * is granted only by a held *");
        assert!(!ok(json!({"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get"]})));
        assert!(!ok(json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]})));
        assert!(!ok(json!({"nonResourceURLs": ["/healthz"], "verbs": ["get"]})));
        let gaps = missing(&held, &[json!({"apiGroups": [""], "resources": ["pods", "secrets"], "verbs": ["get", "delete"]})]);
        assert_eq!(gaps.len(), 3, "{gaps:?}");
        assert_eq!(
            describe(&gaps[..1]),
            "{APIGroups:[\"\"], Resources:[\"secrets\"], Verbs:[\"get\"]}"
        );
    }
}
