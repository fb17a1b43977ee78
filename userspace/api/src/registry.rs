//! The resources skiff serves: names, scope, short names, categories, subresources and verbs, and
//! the discovery documents (legacy and aggregated) built from them.

use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceInfo {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    pub subresources: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

impl ResourceInfo {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `DeploymentList`: the kind of a list response.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.contains(&sub)
    }
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

const ALL: &[&str] = &["all"];
const NONE: &[&str] = &[];

macro_rules! res {
    ($g:expr, $v:expr, $kind:expr, $plural:expr, $singular:expr, $ns:expr, $short:expr, $cat:expr, $sub:expr) => {
        ResourceInfo {
            group: $g,
            version: $v,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $ns,
            short_names: $short,
            categories: $cat,
            subresources: $sub,
            verbs: VERBS,
        }
    };
}

static RESOURCES: &[ResourceInfo] = &[
    res!(
        "",
        "v1",
        "Namespace",
        "namespaces",
        "namespace",
        false,
        &["ns"],
        NONE,
        &["status", "finalize"]
    ),
    res!(
        "",
        "v1",
        "Node",
        "nodes",
        "node",
        false,
        &["no"],
        NONE,
        &["status"]
    ),
    res!(
        "",
        "v1",
        "Pod",
        "pods",
        "pod",
        true,
        &["po"],
        ALL,
        &["status", "binding", "log", "exec", "attach", "portforward"]
    ),
    res!(
        "",
        "v1",
        "Service",
        "services",
        "service",
        true,
        &["svc"],
        ALL,
        &["status"]
    ),
    res!(
        "",
        "v1",
        "Endpoints",
        "endpoints",
        "endpoints",
        true,
        &["ep"],
        NONE,
        NONE
    ),
    res!(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        "configmap",
        true,
        &["cm"],
        NONE,
        NONE
    ),
    res!(
        "", "v1", "Secret", "secrets", "secret", true, NONE, NONE, NONE
    ),
    res!(
        "",
        "v1",
        "Event",
        "events",
        "event",
        true,
        &["ev"],
        NONE,
        NONE
    ),
    res!(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        true,
        &["sa"],
        NONE,
        &["token"]
    ),
    res!(
        "",
        "v1",
        "ResourceQuota",
        "resourcequotas",
        "resourcequota",
        true,
        &["quota"],
        NONE,
        &["status"]
    ),
    res!(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        "deployment",
        true,
        &["deploy"],
        ALL,
        &["status", "scale"]
    ),
    res!(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        true,
        &["rs"],
        ALL,
        &["status", "scale"]
    ),
    res!(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        "daemonset",
        true,
        &["ds"],
        ALL,
        &["status"]
    ),
    res!(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        "statefulset",
        true,
        &["sts"],
        ALL,
        &["status", "scale"]
    ),
    res!(
        "batch",
        "v1",
        "Job",
        "jobs",
        "job",
        true,
        NONE,
        ALL,
        &["status"]
    ),
    res!(
        "batch",
        "v1",
        "CronJob",
        "cronjobs",
        "cronjob",
        true,
        &["cj"],
        ALL,
        &["status"]
    ),
    res!(
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        &["hpa"],
        ALL,
        &["status"]
    ),
    res!(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        "networkpolicy",
        true,
        &["netpol"],
        NONE,
        NONE
    ),
    res!(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        "lease",
        true,
        NONE,
        NONE,
        NONE
    ),
    res!(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        "endpointslice",
        true,
        NONE,
        NONE,
        NONE
    ),
    // RBAC (rbac.authorization.k8s.io/v1), evaluated by the apiserver's authorizer.
    res!("rbac.authorization.k8s.io", "v1", "Role", "roles", "role", true, NONE, NONE, NONE),
    res!("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", "clusterrole", false, NONE, NONE, NONE),
    res!("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", "rolebinding", true, NONE, NONE, NONE),
    res!("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", "clusterrolebinding", false, NONE, NONE, NONE),
    // Node client certificates (kubeadm's TLS bootstrap): signed by the apiserver.
    res!("certificates.k8s.io", "v1", "CertificateSigningRequest", "certificatesigningrequests", "certificatesigningrequest", false, &["csr"], NONE, &["status", "approval"]),
    // `kubectl auth can-i`: created and answered, never stored.
    ResourceInfo {
        group: "authorization.k8s.io",
        version: "v1",
        kind: "SelfSubjectAccessReview",
        plural: "selfsubjectaccessreviews",
        singular: "selfsubjectaccessreview",
        namespaced: false,
        short_names: NONE,
        categories: NONE,
        subresources: NONE,
        verbs: &["create"],
    },
    // Resource metrics (what metrics-server serves, not in k8s-openapi): stored objects here,
    // written by the node agents every 15 s, read by the HPA controller and `kubectl top`.
    res!(
        "metrics.k8s.io",
        "v1beta1",
        "PodMetrics",
        "pods",
        "",
        true,
        NONE,
        NONE,
        NONE
    ),
    res!(
        "metrics.k8s.io",
        "v1beta1",
        "NodeMetrics",
        "nodes",
        "",
        false,
        NONE,
        NONE,
        NONE
    ),
];

pub fn all() -> &'static [ResourceInfo] {
    RESOURCES
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn find_kind(api_version: &str, kind: &str) -> Option<&'static ResourceInfo> {
    RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

/// Group names other than the core group, in first-seen order.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !out.iter().any(|(g, v)| *g == r.group && *v == r.version) {
            out.push((r.group, r.version));
        }
    }
    out
}

pub fn discovery_api_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})
}

pub fn discovery_api_group_list() -> Value {
    let groups: Vec<Value> = groups()
        .into_iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn legacy_resource_entries(r: &ResourceInfo) -> Vec<Value> {
    let mut out = vec![json!({
        "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind,
        "verbs": r.verbs, "shortNames": r.short_names, "categories": r.categories,
    })];
    for sub in r.subresources {
        let (kind, verbs, group, version): (&str, &[&str], Option<&str>, Option<&str>) = match *sub
        {
            "scale" => (
                "Scale",
                &["get", "patch", "update"],
                Some("autoscaling"),
                Some("v1"),
            ),
            "binding" => ("Binding", &["create"], None, None),
            "log" => ("Pod", &["get"], None, None),
            "exec" => ("PodExecOptions", &["create", "get"], None, None),
            "finalize" => (r.kind, &["update"], None, None),
            "attach" => ("PodAttachOptions", &["create", "get"], None, None),
            "portforward" => ("PodPortForwardOptions", &["create", "get"], None, None),
            _ => (r.kind, &["get", "patch", "update"], None, None),
        };
        let mut e = json!({"name": format!("{}/{}", r.plural, sub), "singularName": "", "namespaced": r.namespaced, "kind": kind, "verbs": verbs});
        if let (Some(g), Some(v)) = (group, version) {
            e["group"] = json!(g);
            e["version"] = json!(v);
        }
        out.push(e);
    }
    out
}

pub fn discovery_resource_list(group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(legacy_resource_entries)
        .collect();
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

/// The aggregated discovery document (`APIGroupDiscoveryList`) for `/api` (core) or `/apis`.
pub fn discovery_aggregated(core: bool, api_version: &str) -> Value {
    let gvs: Vec<(&str, &str)> = if core { vec![("", "v1")] } else { groups() };
    let items: Vec<Value> = gvs
        .into_iter()
        .map(|(g, v)| {
            let resources: Vec<Value> = RESOURCES
                .iter()
                .filter(|r| r.group == g && r.version == v)
                .map(|r| {
                    let subs: Vec<Value> = r
                        .subresources
                        .iter()
                        .map(|sub| {
                            let (gvk, verbs): (Value, &[&str]) = match *sub {
                                "scale" => (json!({"group": "autoscaling", "version": "v1", "kind": "Scale"}), &["get", "patch", "update"]),
                                "binding" => (json!({"group": "", "version": "v1", "kind": "Binding"}), &["create"]),
                                "log" => (json!({"group": "", "version": "v1", "kind": "Pod"}), &["get"]),
                                "exec" => (json!({"group": "", "version": "v1", "kind": "PodExecOptions"}), &["create", "get"]),
                                "finalize" => (json!({"group": "", "version": "v1", "kind": "Namespace"}), &["update"]),
                                "attach" => (json!({"group": "", "version": "v1", "kind": "PodAttachOptions"}), &["create", "get"]),
                                "portforward" => (json!({"group": "", "version": "v1", "kind": "PodPortForwardOptions"}), &["create", "get"]),
                                _ => (json!({"group": r.group, "version": r.version, "kind": r.kind}), &["get", "patch", "update"]),
                            };
                            json!({"subresource": sub, "responseKind": gvk, "verbs": verbs})
                        })
                        .collect();
                    json!({
                        "resource": r.plural, "singularResource": r.singular,
                        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                        "shortNames": r.short_names, "categories": r.categories, "verbs": r.verbs,
                        "subresources": subs,
                    })
                })
                .collect();
            json!({
                "metadata": {"name": g, "creationTimestamp": null},
                "versions": [{"version": v, "resources": resources, "freshness": "Current"}],
            })
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{api_version}"),
        "metadata": {},
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_by_path_and_by_kind_agree() {
        let deploy = find("apps", "v1", "deployments").expect("deployments served");
        assert_eq!(deploy.kind, "Deployment");
        assert!(deploy.namespaced && deploy.has_subresource("scale"));
        assert_eq!(find_kind("apps/v1", "Deployment"), Some(deploy));
        assert_eq!(
            find_kind("v1", "Namespace").map(|r| r.namespaced),
            Some(false)
        );
        assert!(find("", "v1", "deployments").is_none());
    }

    #[test]
    fn aggregated_discovery_carries_what_kubectl_uses() {
        let core = discovery_aggregated(true, "v2");
        assert_eq!(core["apiVersion"], "apidiscovery.k8s.io/v2");
        let pods = core["items"][0]["versions"][0]["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["resource"] == "pods"))
            .expect("pods listed")
            .clone();
        assert_eq!(pods["shortNames"], json!(["po"]));
        assert_eq!(pods["categories"], json!(["all"]));
        assert_eq!(pods["scope"], "Namespaced");
        let apps = discovery_aggregated(false, "v2beta1");
        assert_eq!(apps["apiVersion"], "apidiscovery.k8s.io/v2beta1");
        assert!(
            apps["items"]
                .as_array()
                .is_some_and(|gs| gs.iter().any(|g| g["metadata"]["name"] == "apps"))
        );
    }

    #[test]
    fn legacy_discovery_lists_subresources() {
        let list = discovery_resource_list("apps", "v1").expect("apps/v1");
        let names: Vec<&str> = list["resources"]
            .as_array()
            .map(|rs| rs.iter().filter_map(|r| r["name"].as_str()).collect())
            .unwrap_or_default();
        assert!(names.contains(&"deployments") && names.contains(&"deployments/scale"));
        assert!(discovery_resource_list("nope", "v1").is_none());
    }
}
