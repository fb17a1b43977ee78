//! The patch engines on realistic objects: the exact patches kubectl 1.32 sends
//! (reference/kubectl-wire.md sections 7, 10, 11, 18) and every strategic-merge rule.

use serde_json::{Value, json};
use skiff_api::patch::{PatchError, json_merge_patch, json_patch, strategic_merge_patch};

/// A Deployment as stored after a first `kubectl apply` (server defaults filled in).
fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "demo",
            "uid": "0b4c6f5e-1111-4222-8333-944445555666",
            "resourceVersion": "17",
            "generation": 1,
            "labels": {"app": "web"},
            "annotations": {
                "deployment.kubernetes.io/revision": "2",
                "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"apps/v1\"}\n"
            },
            "finalizers": ["example.com/keep"]
        },
        "spec": {
            "replicas": 2,
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}
            },
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "initContainers": [{"name": "init", "image": "busybox:1.36", "command": ["true"]}],
                    "containers": [
                        {
                            "name": "nginx",
                            "image": "nginx:1.25",
                            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                            "envFrom": [{"configMapRef": {"name": "cfg"}}],
                            "ports": [{"containerPort": 80, "protocol": "TCP"}],
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/data"},
                                {"name": "cache", "mountPath": "/cache"}
                            ]
                        },
                        {"name": "sidecar", "image": "busybox:1.36", "args": ["sleep", "3600"]}
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}],
                    "imagePullSecrets": [{"name": "regcred"}],
                    "hostAliases": [{"ip": "10.0.0.1", "hostnames": ["db"]}],
                    "tolerations": [
                        {"key": "a", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "b", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "topologySpreadConstraints": [
                        {"topologyKey": "zone", "maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}
                    ]
                }
            }
        },
        "status": {
            "observedGeneration": 1,
            "replicas": 2,
            "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
            ]
        }
    })
}

fn service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.20",
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}
            ]
        }
    })
}

fn smp(original: &Value, patch: Value) -> Value {
    match strategic_merge_patch(original, &patch) {
        Ok(v) => v,
        Err(e) => panic!("strategic merge patch failed: {e}"),
    }
}

fn at<'v>(v: &'v Value, pointer: &str) -> &'v Value {
    v.pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} missing in {v:#}"))
}

fn names(list: &Value, key: &str) -> Vec<Value> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|e| e[key].clone())
        .collect()
}

// ---- kubectl-wire.md section 7: the exact patches kubectl apply sent ----

const KUBECTL_APPLY_CONTAINERS_PATCH: &str = r#"{"spec":{"replicas":3,"template":{"spec":{"$setElementOrder/containers":[{"name":"nginx"}],"containers":[{"$setElementOrder/env":[{"name":"B"},{"name":"C"}],"env":[{"name":"C","value":"3"},{"$patch":"delete","name":"A"}],"image":"nginx:1.26","name":"nginx"},{"$patch":"delete","name":"sidecar"}]}}}}"#;

const KUBECTL_APPLY_STRATEGY_PATCH: &str =
    r#"{"spec":{"strategy":{"$retainKeys":["type"],"rollingUpdate":null,"type":"Recreate"}}}"#;

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("test json: {e}"))
}

#[test]
fn kubectl_apply_env_and_container_patch_gives_the_edited_object() {
    let original = deployment();
    let got = smp(&original, parse(KUBECTL_APPLY_CONTAINERS_PATCH));

    let mut expected = deployment();
    expected["spec"]["replicas"] = json!(3);
    let nginx = json!({
        "name": "nginx",
        "image": "nginx:1.26",
        "env": [{"name": "B", "value": "2"}, {"name": "C", "value": "3"}],
        "envFrom": [{"configMapRef": {"name": "cfg"}}],
        "ports": [{"containerPort": 80, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "data", "mountPath": "/data"},
            {"name": "cache", "mountPath": "/cache"}
        ]
    });
    expected["spec"]["template"]["spec"]["containers"] = json!([nginx]);
    assert_eq!(got, expected);
    assert_eq!(original, deployment(), "the original is never modified");
}

#[test]
fn kubectl_apply_strategy_retain_keys_patch_drops_rolling_update() {
    let got = smp(&deployment(), parse(KUBECTL_APPLY_STRATEGY_PATCH));
    assert_eq!(got["spec"]["strategy"], json!({"type": "Recreate"}));
    let mut rest = got.clone();
    rest["spec"]["strategy"] = deployment()["spec"]["strategy"].clone();
    assert_eq!(rest, deployment(), "nothing else changes");
}

#[test]
fn both_kubectl_patches_together() {
    let mut combined = parse(KUBECTL_APPLY_CONTAINERS_PATCH);
    combined["spec"]["strategy"] = parse(KUBECTL_APPLY_STRATEGY_PATCH)["spec"]["strategy"].clone();
    let got = smp(&deployment(), combined);
    assert_eq!(got["spec"]["strategy"], json!({"type": "Recreate"}));
    assert_eq!(
        names(at(&got, "/spec/template/spec/containers"), "name"),
        vec![json!("nginx")]
    );
    assert_eq!(
        names(at(&got, "/spec/template/spec/containers/0/env"), "name"),
        vec![json!("B"), json!("C")]
    );
}

#[test]
fn retain_keys_rejects_fields_outside_the_list() {
    let err = strategic_merge_patch(
        &deployment(),
        &json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}),
    )
    .expect_err("rollingUpdate not retained");
    assert!(err.to_string().contains("rollingUpdate"), "{err}");
    assert!(err.to_string().contains(".spec.strategy"), "{err}");
}

// ---- maps ----

#[test]
fn maps_merge_recursively_and_null_deletes_a_key() {
    let got = smp(
        &deployment(),
        json!({"metadata": {"labels": {"tier": "fe"}, "annotations": {"deployment.kubernetes.io/revision": null}}}),
    );
    assert_eq!(
        got["metadata"]["labels"],
        json!({"app": "web", "tier": "fe"})
    );
    assert_eq!(
        got["metadata"]["annotations"],
        json!({"kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"apps/v1\"}\n"})
    );
}

#[test]
fn null_for_a_missing_key_is_dropped_not_stored() {
    let got = smp(
        &service(),
        json!({"metadata": {"annotations": {"a": null, "b": "1"}}, "spec": {"externalName": null}}),
    );
    assert_eq!(got["metadata"]["annotations"], json!({"b": "1"}));
    assert!(got["spec"].get("externalName").is_none());
}

#[test]
fn patch_replace_on_a_map_replaces_it_whole() {
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"metadata": {"labels": {"$patch": "replace", "app": "web2"}}}}}),
    );
    assert_eq!(
        got["spec"]["template"]["metadata"]["labels"],
        json!({"app": "web2"})
    );
}

#[test]
fn patch_delete_on_a_map_deletes_it() {
    let got = smp(
        &deployment(),
        json!({"spec": {"strategy": {"$patch": "delete"}}}),
    );
    assert!(got["spec"].get("strategy").is_none(), "{:#}", got["spec"]);
    assert_eq!(got["spec"]["replicas"], json!(2));
}

#[test]
fn a_value_of_another_type_replaces() {
    let got = smp(
        &deployment(),
        json!({"spec": {"strategy": "oops", "replicas": {"a": 1}}}),
    );
    assert_eq!(got["spec"]["strategy"], json!("oops"));
    assert_eq!(got["spec"]["replicas"], json!({"a": 1}));
}

// ---- lists with a merge key ----

#[test]
fn containers_merge_by_name_and_keep_unpatched_fields() {
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "busybox:1.37"}]}}}}),
    );
    let containers = at(&got, "/spec/template/spec/containers");
    assert_eq!(
        names(containers, "name"),
        vec![json!("nginx"), json!("sidecar")]
    );
    assert_eq!(
        containers[1],
        json!({"name": "sidecar", "image": "busybox:1.37", "args": ["sleep", "3600"]})
    );
    assert_eq!(
        containers[0],
        deployment()["spec"]["template"]["spec"]["containers"][0]
    );
}

#[test]
fn kubectl_set_image_style_patch() {
    // `kubectl set image deploy/web nginx=nginx:1.27` sends this SMP.
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {"containers": [{"image": "nginx:1.27", "name": "nginx"}]}}}}),
    );
    assert_eq!(
        got["spec"]["template"]["spec"]["containers"][0]["image"],
        json!("nginx:1.27")
    );
    assert_eq!(
        got["spec"]["template"]["spec"]["containers"][1]["name"],
        json!("sidecar")
    );
}

#[test]
fn kubectl_rollout_restart_style_patch() {
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-22T23:00:00Z"}}}}}),
    );
    assert_eq!(
        got["spec"]["template"]["metadata"],
        json!({"labels": {"app": "web"}, "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-22T23:00:00Z"}})
    );
}

#[test]
fn delete_directive_removes_the_matching_element() {
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {
            "containers": [{"$patch": "delete", "name": "sidecar"}, {"$patch": "delete", "name": "not-there"}],
            "initContainers": [{"$patch": "delete", "name": "init"}]
        }}}}),
    );
    assert_eq!(
        names(at(&got, "/spec/template/spec/containers"), "name"),
        vec![json!("nginx")]
    );
    assert_eq!(got["spec"]["template"]["spec"]["initContainers"], json!([]));
}

#[test]
fn new_elements_are_added_and_set_element_order_places_them() {
    // As kubectl apply sends it: the new container is appended after nginx by $setElementOrder.
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "nginx"}, {"name": "sidecar"}, {"name": "metrics"}],
            "containers": [{"name": "metrics", "image": "prom/node-exporter"}]
        }}}}),
    );
    let containers = at(&got, "/spec/template/spec/containers");
    assert_eq!(
        names(containers, "name"),
        vec![json!("nginx"), json!("sidecar"), json!("metrics")]
    );
    assert_eq!(
        containers[2],
        json!({"name": "metrics", "image": "prom/node-exporter"})
    );
}

#[test]
fn without_set_element_order_new_elements_go_where_kubernetes_puts_them() {
    // Kubernetes' mergeSortedSlice: a patch element it cannot place against the stored list
    // comes before the stored elements; patched elements keep the patch's order.
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {"containers": [{"name": "metrics", "image": "m"}]}}}}),
    );
    assert_eq!(
        names(at(&got, "/spec/template/spec/containers"), "name"),
        vec![json!("metrics"), json!("nginx"), json!("sidecar")]
    );
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {"containers": [{"name": "nginx", "image": "n"}, {"name": "metrics", "image": "m"}]}}}}),
    );
    assert_eq!(
        names(at(&got, "/spec/template/spec/containers"), "name"),
        vec![json!("nginx"), json!("metrics"), json!("sidecar")]
    );
}

#[test]
fn set_element_order_reorders_and_interleaves_server_only_elements() {
    let original = json!({"spec": {"template": {"spec": {"containers": [{
        "name": "app",
        "env": [{"name": "A", "value": "1"}, {"name": "X", "value": "server"}, {"name": "B", "value": "2"}]
    }]}}}});
    // X is not named: it keeps its place between A and B, as in Kubernetes.
    let got = smp(
        &original,
        json!({"spec": {"template": {"spec": {"containers": [{
            "name": "app",
            "$setElementOrder/env": [{"name": "A"}, {"name": "B"}],
            "env": [{"name": "B", "value": "new"}]
        }]}}}}),
    );
    assert_eq!(
        at(&got, "/spec/template/spec/containers/0/env"),
        &json!([{"name": "A", "value": "1"}, {"name": "X", "value": "server"}, {"name": "B", "value": "new"}])
    );
    // Reversing the order moves the named elements; X was stored before B, so it stays before B
    // (Kubernetes' mergeSortedSlice).
    let got = smp(
        &original,
        json!({"spec": {"template": {"spec": {"containers": [{
            "name": "app",
            "$setElementOrder/env": [{"name": "B"}, {"name": "A"}]
        }]}}}}),
    );
    assert_eq!(
        names(at(&got, "/spec/template/spec/containers/0/env"), "name"),
        vec![json!("X"), json!("B"), json!("A")]
    );
}

#[test]
fn set_element_order_must_name_every_patched_element_in_order() {
    let err = strategic_merge_patch(
        &deployment(),
        &json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "nginx"}],
            "containers": [{"name": "metrics", "image": "m"}]
        }}}}),
    )
    .expect_err("metrics not in the order list");
    assert!(
        err.to_string().contains("$setElementOrder/containers"),
        "{err}"
    );
    let err = strategic_merge_patch(
        &deployment(),
        &json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "nginx"}, {"name": "sidecar"}],
            "containers": [{"name": "sidecar"}, {"name": "nginx"}]
        }}}}),
    )
    .expect_err("patch order contradicts the order list");
    assert!(matches!(err, PatchError::Strategic { .. }), "{err:?}");
}

#[test]
fn patch_replace_element_replaces_the_list() {
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {"containers": [{"$patch": "replace"}, {"name": "only", "image": "x"}]}}}}),
    );
    assert_eq!(
        got["spec"]["template"]["spec"]["containers"],
        json!([{"name": "only", "image": "x"}])
    );
}

#[test]
fn container_ports_merge_by_container_port() {
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {"containers": [{
            "name": "nginx",
            "$setElementOrder/ports": [{"containerPort": 80}, {"containerPort": 8443}],
            "ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 8443, "name": "https"}]
        }]}}}}),
    );
    assert_eq!(
        at(&got, "/spec/template/spec/containers/0/ports"),
        &json!([
            {"containerPort": 80, "protocol": "TCP", "name": "http"},
            {"containerPort": 8443, "name": "https"}
        ])
    );
}

#[test]
fn service_ports_merge_by_port() {
    let got = smp(
        &service(),
        json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}),
    );
    assert_eq!(
        got["spec"]["ports"],
        json!([
            {"name": "http", "port": 80, "targetPort": 9090, "protocol": "TCP"},
            {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}
        ])
    );
    let got = smp(
        &service(),
        json!({"spec": {"ports": [{"$patch": "delete", "port": 443}]}}),
    );
    assert_eq!(names(&got["spec"]["ports"], "name"), vec![json!("http")]);
    // The editing kubectl apply does when a port is removed and one added.
    let got = smp(
        &service(),
        json!({"spec": {
            "$setElementOrder/ports": [{"port": 80}, {"port": 9000}],
            "ports": [{"name": "metrics", "port": 9000, "targetPort": 9000}, {"$patch": "delete", "port": 443}]
        }}),
    );
    assert_eq!(
        names(&got["spec"]["ports"], "port"),
        vec![json!(80), json!(9000)]
    );
}

#[test]
fn env_volumes_mounts_and_other_keyed_lists() {
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {
            "containers": [{
                "name": "nginx",
                "env": [{"name": "A", "value": "10"}],
                "volumeMounts": [{"mountPath": "/cache", "readOnly": true}, {"$patch": "delete", "mountPath": "/data"}]
            }],
            "volumes": [{"name": "data", "emptyDir": null, "configMap": {"name": "cfg"}}],
            "imagePullSecrets": [{"name": "other"}],
            "hostAliases": [{"ip": "10.0.0.1", "hostnames": ["db", "db.local"]}],
            "topologySpreadConstraints": [{"topologyKey": "zone", "maxSkew": 2}]
        }}}}),
    );
    let spec = at(&got, "/spec/template/spec");
    let nginx = &spec["containers"][0];
    assert_eq!(
        nginx["env"],
        json!([{"name": "A", "value": "10"}, {"name": "B", "value": "2"}])
    );
    assert_eq!(
        nginx["volumeMounts"],
        json!([{"name": "cache", "mountPath": "/cache", "readOnly": true}])
    );
    assert_eq!(
        spec["volumes"],
        json!([{"name": "data", "configMap": {"name": "cfg"}}, {"name": "cache", "emptyDir": {}}])
    );
    assert_eq!(
        names(&spec["imagePullSecrets"], "name"),
        vec![json!("other"), json!("regcred")]
    );
    assert_eq!(
        spec["hostAliases"],
        json!([{"ip": "10.0.0.1", "hostnames": ["db", "db.local"]}])
    );
    assert_eq!(
        spec["topologySpreadConstraints"],
        json!([{"topologyKey": "zone", "maxSkew": 2, "whenUnsatisfiable": "DoNotSchedule"}])
    );
}

#[test]
fn status_conditions_merge_by_type() {
    let got = smp(
        &deployment(),
        json!({"status": {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}}),
    );
    assert_eq!(
        got["status"]["conditions"],
        json!([
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ])
    );
}

#[test]
fn owner_references_merge_by_uid() {
    let rs = json!({"metadata": {"name": "web-abc", "ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "u1", "controller": true}
    ]}});
    let got = smp(
        &rs,
        json!({"metadata": {"ownerReferences": [
            {"uid": "u1", "blockOwnerDeletion": true},
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "u2"}
        ]}}),
    );
    let refs = &got["metadata"]["ownerReferences"];
    assert_eq!(names(refs, "uid"), vec![json!("u1"), json!("u2")]);
    assert_eq!(refs[0]["blockOwnerDeletion"], json!(true));
    assert_eq!(refs[0]["controller"], json!(true));
}

// ---- lists without a merge key ----

#[test]
fn lists_without_a_merge_key_are_replaced_whole() {
    let got = smp(
        &deployment(),
        json!({"spec": {"template": {"spec": {
            "tolerations": [{"key": "c", "operator": "Exists"}],
            "containers": [{"name": "nginx", "envFrom": [{"secretRef": {"name": "s"}}]}, {"name": "sidecar", "args": ["sleep", "1"]}]
        }}}}),
    );
    let spec = at(&got, "/spec/template/spec");
    assert_eq!(
        spec["tolerations"],
        json!([{"key": "c", "operator": "Exists"}])
    );
    assert_eq!(
        spec["containers"][0]["envFrom"],
        json!([{"secretRef": {"name": "s"}}])
    );
    assert_eq!(spec["containers"][1]["args"], json!(["sleep", "1"]));
}

#[test]
fn delete_directive_in_a_list_without_merge_key_is_an_error() {
    let err = strategic_merge_patch(
        &deployment(),
        &json!({"spec": {"template": {"spec": {"tolerations": [{"$patch": "delete", "key": "a"}]}}}}),
    )
    .expect_err("tolerations have no merge key");
    assert!(
        err.to_string()
            .contains(".spec.template.spec.tolerations[0]"),
        "{err}"
    );
}

// ---- primitive lists ----

#[test]
fn finalizers_merge_as_a_set_and_delete_from_primitive_list_removes() {
    let got = smp(
        &deployment(),
        json!({"metadata": {
            "$setElementOrder/finalizers": ["example.com/keep", "example.com/new"],
            "finalizers": ["example.com/new"]
        }}),
    );
    assert_eq!(
        got["metadata"]["finalizers"],
        json!(["example.com/keep", "example.com/new"])
    );
    // A set union: values already present are not repeated.
    let again = smp(
        &got,
        json!({"metadata": {"finalizers": ["example.com/keep"]}}),
    );
    assert_eq!(
        again["metadata"]["finalizers"],
        json!(["example.com/keep", "example.com/new"])
    );

    let got = smp(
        &got,
        json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["example.com/keep", "absent"]}}),
    );
    assert_eq!(got["metadata"]["finalizers"], json!(["example.com/new"]));
}

// ---- errors ----

#[test]
fn unknown_directives_are_errors() {
    for patch in [
        json!({"spec": {"$frobnicate": 1}}),
        json!({"spec": {"strategy": {"$patch": "merge"}}}),
        json!({"spec": {"template": {"spec": {"containers": [{"$patch": "shuffle", "name": "nginx"}]}}}}),
    ] {
        let err = strategic_merge_patch(&deployment(), &patch).expect_err("unknown directive");
        assert!(
            err.to_string()
                .starts_with("strategic merge patch at .spec"),
            "{err}"
        );
    }
    let err = strategic_merge_patch(&deployment(), &json!({"spec": {"$frobnicate": 1}}))
        .expect_err("unknown");
    assert_eq!(
        err,
        PatchError::UnknownDirective {
            path: ".spec".into(),
            directive: "$frobnicate".into()
        }
    );
}

#[test]
fn malformed_keyed_lists_are_errors() {
    let cases = [
        json!({"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}}),
        json!({"spec": {"template": {"spec": {"containers": ["nginx"]}}}}),
        json!({"spec": {"template": {"spec": {"containers": [{"$patch": "delete"}]}}}}),
        json!({"spec": {"$setElementOrder/containers": "nginx"}}),
        json!({"spec": {"strategy": {"$retainKeys": "type"}}}),
        json!({"metadata": {"$deleteFromPrimitiveList/finalizers": "x"}}),
        json!({"metadata": {"finalizers": [{"a": 1}]}}),
    ];
    for patch in cases {
        let original = deployment();
        assert!(strategic_merge_patch(&original, &patch).is_err(), "{patch}");
        assert_eq!(original, deployment());
    }
    assert_eq!(
        strategic_merge_patch(&deployment(), &json!([1])),
        Err(PatchError::NotAnObject {
            what: "strategic merge patch",
            found: "an array"
        })
    );
}

#[test]
fn directives_in_new_fields_do_not_leak_into_the_object() {
    let got = smp(
        &service(),
        json!({"spec": {"template": {"spec": {"volumes": [
            {"name": "v", "emptyDir": {}},
            {"$patch": "delete", "name": "gone"}
        ]}}}}),
    );
    assert_eq!(
        got["spec"]["template"],
        json!({"spec": {"volumes": [{"name": "v", "emptyDir": {}}]}})
    );
}

// ---- merge patch (scale, label, annotate) ----

#[test]
fn merge_patch_scale_label_annotate() {
    let got = json_merge_patch(&deployment(), &json!({"spec": {"replicas": 5}})).expect("scale");
    assert_eq!(got["spec"]["replicas"], json!(5));
    let got = json_merge_patch(
        &got,
        &json!({"metadata": {"labels": {"tier": "fe"}, "annotations": {"deployment.kubernetes.io/revision": null}}}),
    )
    .expect("label + annotate");
    assert_eq!(
        got["metadata"]["labels"],
        json!({"app": "web", "tier": "fe"})
    );
    assert!(
        got["metadata"]["annotations"]
            .get("deployment.kubernetes.io/revision")
            .is_none()
    );
    // Merge patch replaces lists whole, unlike SMP.
    let got = json_merge_patch(
        &deployment(),
        &json!({"spec": {"template": {"spec": {"containers": [{"name": "nginx", "image": "nginx:1.27"}]}}}}),
    )
    .expect("list replace");
    assert_eq!(
        got["spec"]["template"]["spec"]["containers"],
        json!([{"name": "nginx", "image": "nginx:1.27"}])
    );
}

// ---- json patch (rollout undo) ----

#[test]
fn rollout_undo_json_patch_replaces_template_and_annotations() {
    let old_template = json!({
        "metadata": {"labels": {"app": "web"}},
        "spec": {"containers": [{"name": "nginx", "image": "nginx:1.24"}]}
    });
    let annotations = json!({
        "deployment.kubernetes.io/revision": "3",
        "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"apps/v1\"}\n"
    });
    let patch = json!([
        {"op": "replace", "path": "/spec/template", "value": old_template},
        {"op": "replace", "path": "/metadata/annotations", "value": annotations}
    ]);
    let got = json_patch(&deployment(), &patch).expect("undo applies");
    assert_eq!(got["spec"]["template"], old_template);
    assert_eq!(got["metadata"]["annotations"], annotations);
    let mut rest = got.clone();
    rest["spec"]["template"] = deployment()["spec"]["template"].clone();
    rest["metadata"]["annotations"] = deployment()["metadata"]["annotations"].clone();
    assert_eq!(rest, deployment());
}

#[test]
fn failing_json_patch_leaves_the_object_unchanged() {
    let original = deployment();
    let patch = json!([
        {"op": "replace", "path": "/spec/replicas", "value": 9},
        {"op": "remove", "path": "/metadata/labels/app"},
        {"op": "test", "path": "/spec/replicas", "value": 2}
    ]);
    let err = json_patch(&original, &patch).expect_err("test sees 9");
    assert_eq!(
        err.to_string(),
        "json patch operation 2 (test /spec/replicas): test failed: the value at the path differs from the expected value"
    );
    assert_eq!(original, deployment());

    let err = json_patch(
        &original,
        &json!([{"op": "replace", "path": "/spec/foo", "value": 1}]),
    )
    .expect_err("no such field");
    assert_eq!(
        err.to_string(),
        "json patch operation 0 (replace /spec/foo): path not found"
    );
    let err = json_patch(
        &original,
        &json!([{"op": "move", "from": "/spec/nope", "path": "/spec/x"}]),
    )
    .expect_err("no such from");
    assert!(
        err.to_string()
            .contains("from path \"/spec/nope\" not found"),
        "{err}"
    );
}

// ---- differential test against the real implementation ----

mod common;
use common::{kubectl_patch, kubectl_strategic_patch, without_nulls};

/// Every successful strategic merge patch above, run through `kubectl patch --local`, which
/// applies k8s.io/apimachinery's strategicpatch with the Go types' merge keys. Skipped (with a
/// message) when kubectl 1.32 is missing, except under CI=true where that is a failure.
#[test]
fn strategic_merge_patch_agrees_with_kubectl() {
    let Some(kubectl) = common::kubectl_or_skip("strategic_merge_patch_agrees_with_kubectl") else {
        return;
    };
    let env_original = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "e"},
        "spec": {"selector": {"matchLabels": {"app": "e"}}, "template": {"spec": {"containers": [{
        "name": "app",
        "env": [{"name": "A", "value": "1"}, {"name": "X", "value": "server"}, {"name": "B", "value": "2"}]
    }]}}}});
    let replica_set = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web-abc", "ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "u1", "controller": true}
    ]}});
    let containers = |list: Value| json!({"spec": {"template": {"spec": {"containers": list}}}});
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i"}], "schedulingGates": [{"name": "g1"}, {"name": "g2"}]},
        "status": {"podIPs": [{"ip": "10.0.0.5"}], "hostIPs": [{"ip": "192.168.1.1"}, {"ip": "192.168.1.2"}]}});
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
        "spec": {"podCIDRs": ["10.244.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}, {"type": "ExternalIP", "address": "1.2.3.4"}]}});
    let cases: Vec<(Value, Value)> = vec![
        (deployment(), parse(KUBECTL_APPLY_CONTAINERS_PATCH)),
        (deployment(), parse(KUBECTL_APPLY_STRATEGY_PATCH)),
        (
            deployment(),
            json!({"metadata": {"labels": {"tier": "fe"}, "annotations": {"deployment.kubernetes.io/revision": null}}}),
        ),
        (
            service(),
            json!({"metadata": {"annotations": {"a": null, "b": "1"}}, "spec": {"externalName": null}}),
        ),
        (
            deployment(),
            json!({"spec": {"template": {"metadata": {"labels": {"$patch": "replace", "app": "web2"}}}}}),
        ),
        (
            deployment(),
            containers(json!([{"name": "sidecar", "image": "busybox:1.37"}])),
        ),
        (
            deployment(),
            containers(json!([{"image": "nginx:1.27", "name": "nginx"}])),
        ),
        (
            deployment(),
            json!({"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-22T23:00:00Z"}}}}}),
        ),
        (
            deployment(),
            json!({"spec": {"template": {"spec": {
                "containers": [{"$patch": "delete", "name": "sidecar"}, {"$patch": "delete", "name": "not-there"}],
                "initContainers": [{"$patch": "delete", "name": "init"}]
            }}}}),
        ),
        (
            deployment(),
            json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "nginx"}, {"name": "sidecar"}, {"name": "metrics"}],
                "containers": [{"name": "metrics", "image": "prom/node-exporter"}]
            }}}}),
        ),
        (
            deployment(),
            containers(json!([{"name": "metrics", "image": "m"}])),
        ),
        (
            deployment(),
            containers(json!([{"name": "nginx", "image": "n"}, {"name": "metrics", "image": "m"}])),
        ),
        (
            deployment(),
            containers(
                json!([{"name": "metrics", "image": "m"}, {"name": "sidecar", "image": "s"}]),
            ),
        ),
        (
            env_original.clone(),
            containers(json!([{
                "name": "app", "$setElementOrder/env": [{"name": "A"}, {"name": "B"}], "env": [{"name": "B", "value": "new"}]
            }])),
        ),
        (
            env_original.clone(),
            containers(
                json!([{"name": "app", "$setElementOrder/env": [{"name": "B"}, {"name": "A"}]}]),
            ),
        ),
        (
            env_original.clone(),
            containers(
                json!([{"name": "app", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}, {"name": "A", "value": "5"}]}]),
            ),
        ),
        (
            env_original.clone(),
            containers(
                json!([{"name": "app", "env": [{"name": "Z", "value": "1"}, {"$patch": "delete", "name": "X"}]}]),
            ),
        ),
        (
            deployment(),
            containers(json!([{"$patch": "replace"}, {"name": "only", "image": "x"}])),
        ),
        (
            deployment(),
            containers(json!([{
                "name": "nginx",
                "$setElementOrder/ports": [{"containerPort": 80}, {"containerPort": 8443}],
                "ports": [{"containerPort": 80, "name": "http"}, {"containerPort": 8443, "name": "https"}]
            }])),
        ),
        (
            service(),
            json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}),
        ),
        (
            service(),
            json!({"spec": {"ports": [{"$patch": "delete", "port": 443}]}}),
        ),
        (
            service(),
            json!({"spec": {
                "$setElementOrder/ports": [{"port": 80}, {"port": 9000}],
                "ports": [{"name": "metrics", "port": 9000, "targetPort": 9000}, {"$patch": "delete", "port": 443}]
            }}),
        ),
        (
            deployment(),
            json!({"spec": {"template": {"spec": {
                "containers": [{
                    "name": "nginx",
                    "env": [{"name": "A", "value": "10"}],
                    "volumeMounts": [{"mountPath": "/cache", "readOnly": true}, {"$patch": "delete", "mountPath": "/data"}]
                }],
                "volumes": [{"name": "data", "emptyDir": null, "configMap": {"name": "cfg"}}],
                "imagePullSecrets": [{"name": "other"}],
                "hostAliases": [{"ip": "10.0.0.1", "hostnames": ["db", "db.local"]}],
                "topologySpreadConstraints": [{"topologyKey": "zone", "maxSkew": 2}]
            }}}}),
        ),
        (
            deployment(),
            json!({"status": {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}}),
        ),
        (
            replica_set,
            json!({"metadata": {"ownerReferences": [
                {"uid": "u1", "blockOwnerDeletion": true},
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "u2"}
            ]}}),
        ),
        (
            deployment(),
            json!({"spec": {"template": {"spec": {
                "tolerations": [{"key": "c", "operator": "Exists"}],
                "containers": [{"name": "nginx", "envFrom": [{"secretRef": {"name": "s"}}]}, {"name": "sidecar", "args": ["sleep", "1"]}]
            }}}}),
        ),
        (
            deployment(),
            json!({"metadata": {
                "$setElementOrder/finalizers": ["example.com/keep", "example.com/new"],
                "finalizers": ["example.com/new"]
            }}),
        ),
        (
            deployment(),
            json!({"metadata": {"finalizers": ["example.com/new"]}}),
        ),
        (
            deployment(),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["example.com/keep", "absent"]}}),
        ),
        (
            deployment(),
            json!({"spec": {"template": {"spec": {"volumes": null, "containers": [{"name": "nginx", "volumeMounts": null}]}}}}),
        ),
        (
            deployment(),
            json!({"spec": {"strategy": "oops-not-a-map-but-kubernetes-takes-it", "paused": true}}),
        ),
        (
            deployment(),
            json!({"spec": {"template": {"spec": {"volumes": [
                {"$retainKeys": ["configMap", "name"], "name": "data", "configMap": {"name": "cfg"}}
            ]}}}}),
        ),
        (
            pod.clone(),
            json!({"spec": {"schedulingGates": [{"$patch": "delete", "name": "g1"}, {"name": "g3"}]},
            "status": {"podIPs": [{"ip": "10.0.0.9"}], "hostIPs": [{"$patch": "delete", "ip": "192.168.1.1"}],
                "conditions": [{"type": "Ready", "status": "True"}]}}),
        ),
        (
            node.clone(),
            json!({"spec": {"podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "Hostname", "address": "n1.lab"}, {"$patch": "delete", "type": "ExternalIP"}]}}),
        ),
        (
            node,
            json!({"spec": {"$setElementOrder/podCIDRs": ["fd00::/64", "10.244.0.0/24"], "podCIDRs": ["fd00::/64"]}}),
        ),
        (
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}, "secrets": [{"name": "a"}, {"name": "b"}]}),
            json!({"secrets": [{"$patch": "delete", "name": "a"}, {"name": "c"}]}),
        ),
        (
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "s"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}], "ports": [{"port": 80}]}),
            json!({"endpoints": [{"addresses": ["10.0.0.2", "10.0.0.3"]}], "ports": [{"port": 81}]}),
        ),
    ];

    let dir = std::env::temp_dir().join(format!("skiff-smp-vs-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut disagreements = Vec::new();
    for (i, (original, patch)) in cases.iter().enumerate() {
        let file = dir.join(format!("case{i}.json"));
        let theirs = kubectl_strategic_patch(&kubectl, &file, original, patch)
            .unwrap_or_else(|e| panic!("kubectl rejected case {i}: {e}\npatch: {patch}"));
        let ours = strategic_merge_patch(original, patch).unwrap_or_else(|e| {
            panic!("skiff rejected case {i} that kubectl accepts: {e}\npatch: {patch}")
        });
        if without_nulls(&ours) != without_nulls(&theirs) {
            disagreements.push(format!(
                "case {i}\npatch:   {patch}\nkubectl: {}\nskiff:   {}",
                without_nulls(&theirs),
                without_nulls(&ours)
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n\n"));
}

/// Merge patches and JSON patches against kubectl's (evanphx/json-patch, as the apiserver uses).
#[test]
fn merge_and_json_patches_agree_with_kubectl() {
    let Some(kubectl) = common::kubectl_or_skip("merge_and_json_patches_agree_with_kubectl") else {
        return;
    };
    let cases: Vec<(&str, Value, Value)> = vec![
        ("merge", deployment(), json!({"spec": {"replicas": 5}})),
        (
            "merge",
            deployment(),
            json!({"metadata": {"labels": {"tier": "fe", "app": null}, "annotations": {"a": "b"}}}),
        ),
        (
            "merge",
            deployment(),
            json!({"spec": {"template": {"spec": {"containers": [{"name": "nginx", "image": "x"}]}}}}),
        ),
        (
            "merge",
            service(),
            json!({"spec": {"ports": null, "selector": {"app": "other", "extra": {"nested": null}}}}),
        ),
        (
            "json",
            deployment(),
            json!([
                {"op": "replace", "path": "/spec/template", "value": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "nginx", "image": "nginx:1.24"}]}}},
                {"op": "replace", "path": "/metadata/annotations", "value": {"deployment.kubernetes.io/revision": "3"}}
            ]),
        ),
        (
            "json",
            deployment(),
            json!([
                {"op": "add", "path": "/metadata/labels/tier", "value": "fe"},
                {"op": "remove", "path": "/spec/template/spec/containers/1"},
                {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "Z", "value": "26"}},
                {"op": "copy", "from": "/metadata/labels", "path": "/spec/template/metadata/labels"},
                {"op": "move", "from": "/spec/revisionHistoryLimit", "path": "/spec/minReadySeconds"},
                {"op": "test", "path": "/spec/replicas", "value": 2},
                {"op": "add", "path": "/metadata/labels/a~1b", "value": "escaped"}
            ]),
        ),
    ];
    let dir = std::env::temp_dir().join(format!("skiff-patch-vs-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (i, (patch_type, original, patch)) in cases.iter().enumerate() {
        let file = dir.join(format!("case{i}.json"));
        let theirs = kubectl_patch(&kubectl, &file, patch_type, original, patch)
            .unwrap_or_else(|e| panic!("kubectl rejected case {i}: {e}"));
        let ours = match *patch_type {
            "merge" => json_merge_patch(original, patch),
            _ => json_patch(original, patch),
        }
        .unwrap_or_else(|e| panic!("skiff rejected case {i}: {e}"));
        assert_eq!(ours, theirs, "case {i} ({patch_type}): {patch}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
