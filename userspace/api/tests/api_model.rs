//! The API-model rules kubectl users rely on, through skiff-api's public functions only:
//! admission (decoding, unknown fields, names, defaults, validation), create/update metadata,
//! Status errors, discovery, Tables and OpenAPI documents.

use serde_json::{Value, json};
use skiff_api::admission::{self, FieldValidation};
use skiff_api::registry::{self, ResourceInfo};
use skiff_api::{openapi, status, table};

fn res(group: &str, version: &str, plural: &str) -> &'static ResourceInfo {
    registry::find(group, version, plural).unwrap_or_else(|| panic!("{plural} is served"))
}

fn t(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .expect("test timestamp")
        .with_timezone(&chrono::Utc)
}

/// What the apiserver does on POST: admit, name check, server fields and defaults, validation.
fn create(info: &ResourceInfo, ns: Option<&str>, body: Value) -> Result<Value, status::ApiError> {
    let mut obj = admission::admit(info, ns, body, FieldValidation::Strict)?.object;
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    admission::validate_name(info, &name)?;
    admission::prepare_create(info, &mut obj, t("2026-01-01T00:00:00Z"));
    admission::validate(info, &obj)?;
    Ok(obj)
}

fn deployment(selector: Value, labels: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [{"name": "nginx", "image": "nginx", "ports": [{"containerPort": 80}]}]}},
        },
    })
}

fn cause_fields(e: &status::ApiError) -> Vec<String> {
    e.details
        .as_ref()
        .and_then(|d| d["causes"].as_array())
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["field"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ---- admission: decoding and unknown fields ----

#[test]
fn unknown_field_is_400_under_strict_a_warning_under_warn_and_dropped_under_ignore() {
    let deploys = res("apps", "v1", "deployments");
    let mut body = deployment(json!({"app": "web"}), json!({"app": "web"}));
    body["spec"]["foo"] = json!(1);
    body["spec"]["template"]["spec"]["containers"][0]["bogus"] = json!("x");

    let err = admission::admit(
        deploys,
        Some("default"),
        body.clone(),
        FieldValidation::Strict,
    )
    .expect_err("strict rejects unknown fields");
    assert_eq!((err.code, err.reason.as_str()), (400, "BadRequest"));
    assert!(
        err.message.starts_with("strict decoding error: "),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("unknown field \"spec.foo\""),
        "{}",
        err.message
    );
    assert!(
        err.message
            .contains("unknown field \"spec.template.spec.containers[0].bogus\""),
        "{}",
        err.message
    );

    let warned = admission::admit(
        deploys,
        Some("default"),
        body.clone(),
        FieldValidation::Warn,
    )
    .expect("warn admits");
    assert_eq!(warned.warnings.len(), 2, "{:?}", warned.warnings);
    assert!(warned.object.pointer("/spec/foo").is_none());

    let ignored = admission::admit(deploys, Some("default"), body, FieldValidation::Ignore)
        .expect("ignore admits");
    assert!(ignored.warnings.is_empty());
    assert!(ignored.object.pointer("/spec/foo").is_none());
    assert!(
        ignored
            .object
            .pointer("/spec/template/spec/containers/0/bogus")
            .is_none()
    );
    // Known fields survive untouched.
    assert_eq!(
        ignored
            .object
            .pointer("/spec/template/spec/containers/0/image"),
        Some(&json!("nginx"))
    );
}

#[test]
fn field_validation_parameter_defaults_to_warn_and_rejects_other_words() {
    assert_eq!(
        FieldValidation::parse(None).ok(),
        Some(FieldValidation::Warn)
    );
    assert_eq!(
        FieldValidation::parse(Some("Strict")).ok(),
        Some(FieldValidation::Strict)
    );
    assert_eq!(
        FieldValidation::parse(Some("Ignore")).ok(),
        Some(FieldValidation::Ignore)
    );
    assert_eq!(
        FieldValidation::parse(Some("strictly"))
            .map_err(|e| e.code)
            .err(),
        Some(400)
    );
}

#[test]
fn a_wrong_type_is_a_400_naming_the_kind() {
    let deploys = res("apps", "v1", "deployments");
    let mut body = deployment(json!({"app": "web"}), json!({"app": "web"}));
    body["spec"]["replicas"] = json!("three");
    let err = admission::admit(deploys, Some("default"), body, FieldValidation::Strict)
        .expect_err("a string is not an int32");
    assert_eq!(err.code, 400);
    assert!(err.message.contains("Deployment"), "{}", err.message);
    assert!(
        err.message
            .contains("spec.replicas: invalid type: string \"three\""),
        "{}",
        err.message
    );
    // The path reaches into lists too.
    let mut body = deployment(json!({"app": "web"}), json!({"app": "web"}));
    body["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = json!("http");
    let err = admission::admit(deploys, Some("default"), body, FieldValidation::Strict)
        .expect_err("a string is not a port number");
    assert!(
        err.message
            .contains("spec.template.spec.containers[0].ports[0].containerPort"),
        "{}",
        err.message
    );
}

#[test]
fn a_python_client_body_without_api_version_or_kind_takes_them_from_the_url() {
    let cms = res("", "v1", "configmaps");
    let admitted = admission::admit(
        cms,
        Some("team"),
        json!({"metadata": {"name": "c"}, "data": {"k": "v"}}),
        FieldValidation::Strict,
    )
    .expect("admitted");
    assert_eq!(admitted.object["apiVersion"], "v1");
    assert_eq!(admitted.object["kind"], "ConfigMap");
    assert_eq!(admitted.object["metadata"]["namespace"], "team");
}

#[test]
fn a_mismatched_kind_api_version_or_namespace_is_a_400() {
    let cms = res("", "v1", "configmaps");
    for body in [
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "c"}}),
        json!({"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
        json!({"metadata": {"name": "c", "namespace": "other"}}),
        json!(["not", "an", "object"]),
    ] {
        let err = admission::admit(cms, Some("team"), body.clone(), FieldValidation::Strict)
            .expect_err("mismatch");
        assert_eq!(err.code, 400, "{body}: {}", err.message);
    }
}

// ---- names ----

#[test]
fn names_follow_dns1123_subdomain_or_label_rules_with_kubernetes_text() {
    let cms = res("", "v1", "configmaps");
    let namespaces = res("", "v1", "namespaces");
    let services = res("", "v1", "services");
    assert!(admission::validate_name(cms, "a.b-c").is_ok());
    let err = admission::validate_name(cms, "Bad_Name").expect_err("uppercase");
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert!(
        err.message.contains("a lowercase RFC 1123 subdomain"),
        "{}",
        err.message
    );
    assert_eq!(cause_fields(&err), vec!["metadata.name"]);
    // Namespaces and Services are labels: no dots.
    let err = admission::validate_name(namespaces, "a.b").expect_err("dot in a label");
    assert!(err.message.contains("RFC 1123 label"), "{}", err.message);
    assert!(admission::validate_name(services, "a.b").is_err());
    assert!(admission::validate_name(services, "web").is_ok());
    assert!(admission::validate_name(cms, &"a".repeat(254)).is_err());
    assert!(admission::validate_name(namespaces, &"a".repeat(64)).is_err());
    assert!(admission::validate_name(namespaces, &"a".repeat(63)).is_ok());
}

#[test]
fn label_keys_values_and_annotation_size_are_checked() {
    let cms = res("", "v1", "configmaps");
    let ok = create(
        cms,
        Some("default"),
        json!({"metadata": {"name": "c", "labels": {"app.kubernetes.io/name": "web", "tier": ""}}}),
    );
    assert!(ok.is_ok(), "{ok:?}");
    for labels in [
        json!({"bad key!": "x"}),
        json!({"app": "-starts-with-dash"}),
        json!({"app": "a".repeat(64)}),
        json!({"Not_A.Domain/x": "y"}),
    ] {
        let err = create(
            cms,
            Some("default"),
            json!({"metadata": {"name": "c", "labels": labels}}),
        )
        .expect_err("bad label");
        assert_eq!(err.code, 422, "{labels}");
        assert_eq!(cause_fields(&err), vec!["metadata.labels"], "{labels}");
    }
    let big = "x".repeat(300 * 1024);
    let err = create(
        cms,
        Some("default"),
        json!({"metadata": {"name": "c", "annotations": {"a": big}}}),
    )
    .expect_err("annotations over 256 KiB");
    assert!(err.message.contains("Too long"), "{}", err.message);
}

// ---- defaults per kind ----

#[test]
fn pod_defaults_match_kubernetes() {
    let pods = res("", "v1", "pods");
    let pod = create(
        pods,
        Some("default"),
        json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "nginx:latest", "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "nginx:1.27"},
            {"name": "c", "image": "registry.local:5000/app"}]}}),
    )
    .expect("valid pod");
    let spec = &pod["spec"];
    assert_eq!(spec["restartPolicy"], "Always");
    assert_eq!(spec["terminationGracePeriodSeconds"], 30);
    assert_eq!(spec["dnsPolicy"], "ClusterFirst");
    assert_eq!(spec["schedulerName"], "default-scheduler");
    assert_eq!(spec["containers"][0]["imagePullPolicy"], "Always");
    assert_eq!(spec["containers"][1]["imagePullPolicy"], "IfNotPresent");
    // A registry port is not a tag: no tag means :latest, so Always.
    assert_eq!(spec["containers"][2]["imagePullPolicy"], "Always");
    assert_eq!(spec["containers"][0]["ports"][0]["protocol"], "TCP");
    assert_eq!(pod["status"]["phase"], "Pending");
}

#[test]
fn pod_containers_must_exist_have_unique_names_and_images() {
    let pods = res("", "v1", "pods");
    let err = create(
        pods,
        Some("default"),
        json!({"metadata": {"name": "p"}, "spec": {"containers": []}}),
    )
    .expect_err("no containers");
    assert_eq!(cause_fields(&err), vec!["spec.containers"]);
    let err = create(
        pods,
        Some("default"),
        json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [{"name": "a", "image": "busybox"}],
            "containers": [{"name": "a", "image": "nginx"}, {"name": "b"}]}}),
    )
    .expect_err("duplicate name, missing image");
    let fields = cause_fields(&err);
    assert!(
        fields.contains(&"spec.containers[1].image".to_string()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.initContainers[0].name".to_string())
            || fields.contains(&"spec.containers[0].name".to_string()),
        "{fields:?}"
    );
    assert!(
        err.message.contains("Duplicate value: \"a\""),
        "{}",
        err.message
    );
    let causes = err
        .details
        .as_ref()
        .map(|d| d["causes"].clone())
        .unwrap_or_default();
    assert!(
        causes
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["reason"] == "FieldValueRequired")),
        "{causes}"
    );
}

#[test]
fn service_defaults_and_port_rules() {
    let services = res("", "v1", "services");
    let svc = create(
        services,
        Some("default"),
        json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
    )
    .expect("valid service");
    let spec = &svc["spec"];
    assert_eq!(spec["type"], "ClusterIP");
    assert_eq!(spec["sessionAffinity"], "None");
    assert_eq!(spec["internalTrafficPolicy"], "Cluster");
    assert_eq!(spec["ports"][0]["protocol"], "TCP");
    assert_eq!(spec["ports"][0]["targetPort"], 80);
    assert!(spec.get("externalTrafficPolicy").is_none());
    // Allocation is the apiserver's job: admission leaves clusterIP alone.
    assert!(spec.get("clusterIP").is_none());

    let np = create(
        services,
        Some("default"),
        json!({"metadata": {"name": "np"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "targetPort": 8080}]}}),
    )
    .expect("valid nodeport");
    assert_eq!(np["spec"]["externalTrafficPolicy"], "Cluster");
    assert_eq!(np["spec"]["ports"][0]["targetPort"], 8080);

    let err = create(
        services,
        Some("default"),
        json!({"metadata": {"name": "two"}, "spec": {"ports": [{"port": 80}, {"port": 443}]}}),
    )
    .expect_err("two unnamed ports");
    assert!(cause_fields(&err).contains(&"spec.ports[0].name".to_string()));
    let err = create(
        services,
        Some("default"),
        json!({"metadata": {"name": "dup"}, "spec": {"ports": [{"name": "h", "port": 80}, {"name": "h", "port": 443}]}}),
    )
    .expect_err("duplicate port names");
    assert_eq!(cause_fields(&err), vec!["spec.ports[1].name"]);
}

#[test]
fn deployment_defaults_and_selector_mismatch_is_422() {
    let deploys = res("apps", "v1", "deployments");
    let d = create(
        deploys,
        Some("default"),
        deployment(json!({"app": "web"}), json!({"app": "web"})),
    )
    .expect("valid deployment");
    let spec = &d["spec"];
    assert_eq!(spec["replicas"], 1);
    assert_eq!(spec["revisionHistoryLimit"], 10);
    assert_eq!(spec["progressDeadlineSeconds"], 600);
    assert_eq!(
        spec["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    );
    assert_eq!(spec["template"]["spec"]["restartPolicy"], "Always");
    assert_eq!(d["metadata"]["generation"], 1);

    let err = create(
        deploys,
        Some("default"),
        deployment(json!({"app": "web"}), json!({"app": "api"})),
    )
    .expect_err("selector does not match");
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert!(err.message.contains("selector"), "{}", err.message);
    assert_eq!(cause_fields(&err), vec!["spec.template.metadata.labels"]);

    let mut no_selector = deployment(json!({}), json!({"app": "web"}));
    no_selector["spec"]
        .as_object_mut()
        .map(|s| s.remove("selector"));
    let err = create(deploys, Some("default"), no_selector).expect_err("selector required");
    assert!(cause_fields(&err).contains(&"spec.selector".to_string()));
}

#[test]
fn job_defaults_and_generated_selector() {
    let jobs = res("batch", "v1", "jobs");
    let job = create(
        jobs,
        Some("default"),
        json!({"metadata": {"name": "pi"}, "spec": {"template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "pi", "image": "perl"}]}}}}),
    )
    .expect("valid job");
    let spec = &job["spec"];
    assert_eq!(spec["completions"], 1);
    assert_eq!(spec["parallelism"], 1);
    assert_eq!(spec["backoffLimit"], 6);
    assert_eq!(spec["completionMode"], "NonIndexed");
    assert_eq!(spec["suspend"], false);
    let uid = job["metadata"]["uid"].as_str().expect("uid");
    assert_eq!(
        spec["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
        uid
    );
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(labels["job-name"], "pi");
    assert_eq!(labels["batch.kubernetes.io/job-name"], "pi");
    assert_eq!(labels["controller-uid"], uid);

    let err = create(
        jobs,
        Some("default"),
        json!({"metadata": {"name": "pi"}, "spec": {"template": {"spec": {
            "containers": [{"name": "pi", "image": "perl"}]}}}}),
    )
    .expect_err("a job needs restartPolicy Never or OnFailure");
    assert_eq!(cause_fields(&err), vec!["spec.template.spec.restartPolicy"]);
}

#[test]
fn cronjob_defaults_and_schedule_must_be_five_field_cron() {
    let cronjobs = res("batch", "v1", "cronjobs");
    let body = |schedule: &str| {
        json!({"metadata": {"name": "tick"}, "spec": {"schedule": schedule, "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "OnFailure", "containers": [{"name": "t", "image": "busybox"}]}}}}}})
    };
    let cj = create(cronjobs, Some("default"), body("*/5 * * * *")).expect("valid cronjob");
    assert_eq!(cj["spec"]["concurrencyPolicy"], "Allow");
    assert_eq!(cj["spec"]["suspend"], false);
    assert_eq!(cj["spec"]["successfulJobsHistoryLimit"], 3);
    assert_eq!(cj["spec"]["failedJobsHistoryLimit"], 1);
    for good in ["0 0 * * MON-FRI", "@hourly", "15,45 1-5 1 JAN *"] {
        assert!(
            create(cronjobs, Some("default"), body(good)).is_ok(),
            "{good}"
        );
    }
    for bad in [
        "* * * *",
        "61 * * * *",
        "* * * * 8",
        "every minute please",
        "*/0 * * * *",
    ] {
        let err = create(cronjobs, Some("default"), body(bad)).expect_err(bad);
        assert_eq!(cause_fields(&err), vec!["spec.schedule"], "{bad}");
    }
}

#[test]
fn replicaset_and_daemonset_defaults() {
    let rs = create(
        res("apps", "v1", "replicasets"),
        Some("default"),
        deployment(json!({"app": "web"}), json!({"app": "web"})).tap_kind("ReplicaSet"),
    )
    .expect("valid replicaset");
    assert_eq!(rs["spec"]["replicas"], 1);
    let ds = create(
        res("apps", "v1", "daemonsets"),
        Some("default"),
        deployment(json!({"app": "web"}), json!({"app": "web"})).tap_kind("DaemonSet"),
    )
    .expect("valid daemonset");
    assert_eq!(ds["spec"]["revisionHistoryLimit"], 10);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(ds["spec"]["template"]["spec"]["dnsPolicy"], "ClusterFirst");
}

trait TapKind {
    fn tap_kind(self, kind: &str) -> Value;
}
impl TapKind for Value {
    fn tap_kind(mut self, kind: &str) -> Value {
        self["kind"] = json!(kind);
        self
    }
}

#[test]
fn secret_string_data_becomes_base64_data() {
    let secrets = res("", "v1", "secrets");
    let s = create(
        secrets,
        Some("default"),
        json!({"metadata": {"name": "s"}, "data": {"a": "eA=="}, "stringData": {"password": "hunter2"}}),
    )
    .expect("valid secret");
    assert_eq!(s["type"], "Opaque");
    assert_eq!(s["data"]["password"], "aHVudGVyMg==");
    assert_eq!(s["data"]["a"], "eA==");
    assert!(s.get("stringData").is_none());
}

#[test]
fn configmap_and_secret_keys_are_checked() {
    let cms = res("", "v1", "configmaps");
    assert!(
        create(
            cms,
            Some("default"),
            json!({"metadata": {"name": "c"}, "data": {"app.conf": "x", "KEY_1": "y"}})
        )
        .is_ok()
    );
    for key in ["a/b", "..x", "with space"] {
        let err = create(
            cms,
            Some("default"),
            json!({"metadata": {"name": "c"}, "data": {key: "x"}}),
        )
        .expect_err(key);
        assert_eq!(cause_fields(&err), vec![format!("data[{key}]")]);
    }
    let err = create(
        cms,
        Some("default"),
        json!({"metadata": {"name": "c"}, "data": {"k": "x"}, "binaryData": {"k": "eA=="}}),
    )
    .expect_err("key in data and binaryData");
    assert_eq!(err.code, 422);
}

#[test]
fn namespace_gets_finalizer_phase_and_name_label() {
    let ns = create(
        res("", "v1", "namespaces"),
        None,
        json!({"metadata": {"name": "team"}}),
    )
    .expect("valid namespace");
    assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
    assert_eq!(ns["status"]["phase"], "Active");
    assert_eq!(
        ns["metadata"]["labels"]["kubernetes.io/metadata.name"],
        "team"
    );
    assert!(ns["metadata"].get("namespace").is_none());
}

// ---- create and update metadata ----

#[test]
fn prepare_create_sets_server_fields_and_drops_client_ones() {
    let cms = res("", "v1", "configmaps");
    let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "c", "namespace": "default", "resourceVersion": "99", "deletionTimestamp": "2020-01-01T00:00:00Z"}});
    admission::prepare_create(cms, &mut obj, t("2026-03-04T05:06:07Z"));
    let meta = &obj["metadata"];
    assert_eq!(meta["creationTimestamp"], "2026-03-04T05:06:07Z");
    let uid = meta["uid"].as_str().expect("uid");
    assert_eq!(
        uuid::Uuid::parse_str(uid).map(|u| u.get_version_num()).ok(),
        Some(4)
    );
    assert!(meta.get("resourceVersion").is_none());
    assert!(meta.get("deletionTimestamp").is_none());
    // A ConfigMap has no spec, so no generation.
    assert!(meta.get("generation").is_none());
}

#[test]
fn prepare_update_keeps_identity_and_status_and_bumps_generation_on_spec_change() {
    let deploys = res("apps", "v1", "deployments");
    let mut old = create(
        deploys,
        Some("default"),
        deployment(json!({"app": "web"}), json!({"app": "web"})),
    )
    .expect("valid");
    old["status"] = json!({"replicas": 1});

    // Same spec, new label: generation stays, the client's status is ignored.
    let mut new = old.clone();
    new["metadata"]["labels"] = json!({"x": "y"});
    new["status"] = json!({"replicas": 42});
    new["metadata"]["creationTimestamp"] = json!("1999-01-01T00:00:00Z");
    admission::prepare_update(deploys, &old, &mut new, None).expect("update");
    assert_eq!(new["metadata"]["generation"], 1);
    assert_eq!(new["status"], json!({"replicas": 1}));
    assert_eq!(
        new["metadata"]["creationTimestamp"],
        old["metadata"]["creationTimestamp"]
    );

    // Spec change: generation + 1.
    let mut new = old.clone();
    new["spec"]["replicas"] = json!(3);
    admission::prepare_update(deploys, &old, &mut new, None).expect("update");
    assert_eq!(new["metadata"]["generation"], 2);

    // The status subresource writes only status.
    let mut new = old.clone();
    new["spec"]["replicas"] = json!(7);
    new["status"] = json!({"replicas": 5});
    admission::prepare_update(deploys, &old, &mut new, Some("status")).expect("status update");
    assert_eq!(new["spec"]["replicas"], 1);
    assert_eq!(new["status"], json!({"replicas": 5}));

    // A different uid is a failed precondition.
    let mut new = old.clone();
    new["metadata"]["uid"] = json!("00000000-0000-4000-8000-000000000000");
    let err = admission::prepare_update(deploys, &old, &mut new, None).expect_err("uid changed");
    assert_eq!(err.code, 409);
}

// ---- Status ----

#[test]
fn errors_serialize_as_metav1_status() {
    let s = status::ApiError::not_found("pods", "nope").to_status();
    assert_eq!(
        s,
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"nope\" not found","reason":"NotFound","details":{"name":"nope","kind":"pods"},"code":404})
    );
    let cases = [
        (
            status::ApiError::already_exists("pods", "a"),
            409,
            "AlreadyExists",
        ),
        (
            status::ApiError::conflict("pods", "a", "stale"),
            409,
            "Conflict",
        ),
        (status::ApiError::bad_request("x"), 400, "BadRequest"),
        (
            status::ApiError::unsupported_media_type("application/x"),
            415,
            "UnsupportedMediaType",
        ),
        (status::ApiError::expired("old"), 410, "Expired"),
        (
            status::ApiError::too_large(10),
            413,
            "RequestEntityTooLarge",
        ),
        (
            status::ApiError::method_not_allowed("PUT"),
            405,
            "MethodNotAllowed",
        ),
        (status::ApiError::forbidden("no"), 403, "Forbidden"),
        (status::ApiError::unauthorized(), 401, "Unauthorized"),
        (status::ApiError::internal("boom"), 500, "InternalError"),
    ];
    for (e, code, reason) in cases {
        let s = e.to_status();
        assert_eq!(s["code"], code, "{s}");
        assert_eq!(s["reason"], reason, "{s}");
        assert_eq!(s["kind"], "Status");
        assert_eq!(s["status"], "Failure");
    }
}

// ---- discovery ----

#[test]
fn discovery_carries_short_names_and_all_categories() {
    let mut short: Vec<String> = Vec::new();
    let mut in_all: Vec<String> = Vec::new();
    for (core, list) in [
        (true, registry::discovery_aggregated(true, "v2")),
        (false, registry::discovery_aggregated(false, "v2")),
    ] {
        assert_eq!(list["kind"], "APIGroupDiscoveryList", "core={core}");
        for group in list["items"].as_array().expect("items") {
            for version in group["versions"].as_array().expect("versions") {
                for r in version["resources"].as_array().expect("resources") {
                    let plural = r["resource"].as_str().unwrap_or("").to_string();
                    for s in r["shortNames"].as_array().into_iter().flatten() {
                        short.push(s.as_str().unwrap_or("").to_string());
                    }
                    if r["categories"]
                        .as_array()
                        .is_some_and(|c| c.contains(&json!("all")))
                    {
                        in_all.push(plural);
                    }
                }
            }
        }
    }
    for s in [
        "deploy", "po", "svc", "ns", "cm", "ds", "rs", "cj", "hpa", "netpol", "ep", "ev", "no",
    ] {
        assert!(
            short.contains(&s.to_string()),
            "short name {s} missing: {short:?}"
        );
    }
    for p in [
        "pods",
        "services",
        "deployments",
        "replicasets",
        "daemonsets",
        "statefulsets",
        "jobs",
        "cronjobs",
    ] {
        assert!(
            in_all.contains(&p.to_string()),
            "{p} not in category all: {in_all:?}"
        );
    }
    for p in ["configmaps", "secrets", "namespaces", "nodes", "events"] {
        assert!(
            !in_all.contains(&p.to_string()),
            "{p} must not be in category all"
        );
    }
    let legacy = registry::discovery_resource_list("apps", "v1").expect("apps/v1");
    let names: Vec<&str> = legacy["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        names.contains(&"deployments/scale") && names.contains(&"deployments/status"),
        "{names:?}"
    );
    assert!(registry::discovery_resource_list("nope", "v1").is_none());
}

// ---- tables ----

#[test]
fn service_table_shows_ports_like_kubectl() {
    let services = res("", "v1", "services");
    let svc = json!({"metadata": {"name": "web", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
                 "ports": [{"port": 80, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}]}});
    let np = json!({"metadata": {"name": "np", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.11",
                 "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}});
    let table = table::to_table(
        services,
        &[svc, np],
        table::IncludeObject::Object,
        "5",
        t("2026-01-01T00:03:02Z"),
    );
    let names: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "Name",
            "Type",
            "Cluster-IP",
            "External-IP",
            "Port(s)",
            "Age",
            "Selector"
        ]
    );
    assert_eq!(
        table["rows"][0]["cells"],
        json!([
            "web",
            "ClusterIP",
            "10.96.0.10",
            "<none>",
            "80/TCP,443/TCP",
            "3m2s",
            "app=web"
        ])
    );
    assert_eq!(table["rows"][1]["cells"][4], "80:30080/TCP");
    assert_eq!(table["rows"][1]["cells"][6], "<none>");
    // includeObject=Object returns the whole object.
    assert_eq!(
        table["rows"][0]["object"]["spec"]["clusterIP"],
        "10.96.0.10"
    );
}

#[test]
fn deployment_table_shows_ready_up_to_date_available_and_wide_columns() {
    let deploys = res("apps", "v1", "deployments");
    let mut d = deployment(json!({"app": "web"}), json!({"app": "web"}));
    d["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    d["spec"]["replicas"] = json!(3);
    d["status"] =
        json!({"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2});
    let table = table::to_table(
        deploys,
        &[d],
        table::IncludeObject::Metadata,
        "9",
        t("2026-01-01T05:00:00Z"),
    );
    assert_eq!(
        table["rows"][0]["cells"],
        json!(["web", "2/3", 3, 2, "5h", "nginx", "nginx", "app=web"])
    );
    assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    assert_eq!(table["rows"][0]["object"]["metadata"]["name"], "web");
    assert!(table["rows"][0]["object"].get("spec").is_none());
}

#[test]
fn every_served_kind_has_a_table_with_name_or_last_seen_first() {
    let now = t("2026-01-02T00:00:00Z");
    for info in registry::all() {
        let obj = json!({"metadata": {"name": "x", "namespace": "default", "creationTimestamp": "2026-01-01T00:00:00Z"}});
        let table = table::to_table(info, &[obj], table::IncludeObject::Metadata, "1", now);
        let cols = table["columnDefinitions"].as_array().expect("columns");
        let cells = table["rows"][0]["cells"].as_array().expect("cells");
        assert_eq!(
            cols.len(),
            cells.len(),
            "{}: one cell per column",
            info.kind
        );
        let first = cols[0]["name"].as_str().unwrap_or("");
        assert!(
            first == "Name" || first == "Last Seen",
            "{}: {first}",
            info.kind
        );
    }
}

// ---- OpenAPI ----

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_string());
                    }
                } else {
                    collect_refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}

#[test]
fn openapi_documents_reference_only_schemas_they_carry() {
    let root = openapi::v3_root(|doc| format!("{:x}", doc.to_string().len()));
    let paths = root["paths"].as_object().expect("paths");
    assert!(paths.contains_key("api/v1") && paths.contains_key("apis/apps/v1"));
    for (path, entry) in paths {
        let (group, version) = match path.split('/').collect::<Vec<_>>()[..] {
            ["api", v] => ("", v),
            ["apis", g, v] => (g, v),
            _ => panic!("unexpected path {path}"),
        };
        let url = entry["serverRelativeURL"].as_str().expect("url");
        assert!(
            url.starts_with(&format!("/openapi/v3/{path}?hash=")),
            "{url}"
        );
        let doc = openapi::v3_group_version(group, version).expect("document");
        // It must survive a trip through text, as kubectl reads it.
        let doc: Value = serde_json::from_str(&doc.to_string()).expect("document parses");
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(!refs.is_empty(), "{path}");
        for r in refs {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{path}: $ref {r} is not a components ref"));
            assert!(
                schemas.contains_key(name),
                "{path}: $ref to missing schema {name}"
            );
        }
    }
}

#[test]
fn openapi_apps_v1_has_the_real_deployment_schema() {
    let doc = openapi::v3_group_version("apps", "v1").expect("apps/v1");
    let schemas = &doc["components"]["schemas"];
    let d = &schemas["io.k8s.api.apps.v1.Deployment"];
    assert_eq!(
        d["x-kubernetes-group-version-kind"],
        json!([{"group": "apps", "version": "v1", "kind": "Deployment"}])
    );
    assert!(
        d["description"].as_str().is_some_and(|s| !s.is_empty()),
        "{d}"
    );
    assert!(
        schemas["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]["properties"]["labels"]
            .is_object()
    );
    let strategy = &schemas["io.k8s.api.apps.v1.DeploymentStrategy"]["properties"];
    assert!(strategy["type"]["description"].is_string(), "{strategy}");
    let core = openapi::v3_group_version("", "v1").expect("v1");
    assert!(
        core["components"]["schemas"]["io.k8s.api.core.v1.Pod"]["x-kubernetes-group-version-kind"]
            .is_array()
    );
    // Built once: two calls give the same document.
    assert_eq!(openapi::v3_group_version("apps", "v1"), Some(doc));
}

fn row(info: &ResourceInfo, obj: Value, now: &str) -> (Vec<String>, Value) {
    let table = table::to_table(info, &[obj], table::IncludeObject::Metadata, "1", t(now));
    let names = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| {
            let wide = if c["priority"] == 1 { "+" } else { "" };
            format!("{wide}{}", c["name"].as_str().unwrap_or(""))
        })
        .collect();
    (names, table["rows"][0]["cells"].clone())
}

#[test]
fn node_table_shows_roles_scheduling_and_wide_addresses() {
    let (cols, cells) = row(
        res("", "v1", "nodes"),
        json!({"metadata": {"name": "n1", "creationTimestamp": "2026-01-01T00:00:00Z",
                            "labels": {"node-role.kubernetes.io/control-plane": "", "node-role.kubernetes.io/worker": ""}},
               "spec": {"unschedulable": true},
               "status": {"conditions": [{"type": "Ready", "status": "True"}],
                          "addresses": [{"type": "InternalIP", "address": "10.0.0.2"}, {"type": "Hostname", "address": "n1"}],
                          "nodeInfo": {"kubeletVersion": "v1.32.0", "osImage": "Debian", "kernelVersion": "6.1", "containerRuntimeVersion": "runc://1.1"}}}),
        "2026-01-13T00:00:00Z",
    );
    assert_eq!(
        cols,
        [
            "Name",
            "Status",
            "Roles",
            "Age",
            "Version",
            "+Internal-IP",
            "+External-IP",
            "+OS-Image",
            "+Kernel-Version",
            "+Container-Runtime"
        ]
    );
    assert_eq!(
        cells,
        json!([
            "n1",
            "Ready,SchedulingDisabled",
            "control-plane,worker",
            "12d",
            "v1.32.0",
            "10.0.0.2",
            "<none>",
            "Debian",
            "6.1",
            "runc://1.1"
        ])
    );
}

#[test]
fn hpa_netpol_endpointslice_and_cronjob_tables() {
    let now = "2026-01-01T00:00:10Z";
    let created = json!({"name": "x", "creationTimestamp": "2026-01-01T00:00:00Z"});
    let (cols, cells) = row(
        res("autoscaling", "v2", "horizontalpodautoscalers"),
        json!({"metadata": created, "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "minReplicas": 1, "maxReplicas": 5,
               "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]},
               "status": {"currentReplicas": 2, "currentMetrics": [{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 40}}}]}}),
        now,
    );
    assert_eq!(
        cols,
        [
            "Name",
            "Reference",
            "Targets",
            "MinPods",
            "MaxPods",
            "Replicas",
            "Age"
        ]
    );
    assert_eq!(
        cells,
        json!(["x", "Deployment/web", "cpu: 40%/80%", "1", "5", "2", "10s"])
    );

    let (cols, cells) = row(
        res("networking.k8s.io", "v1", "networkpolicies"),
        json!({"metadata": created, "spec": {"podSelector": {"matchLabels": {"app": "db"},
               "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}}}),
        now,
    );
    assert_eq!(cols, ["Name", "Pod-Selector", "Age"]);
    assert_eq!(cells, json!(["x", "app=db,tier in (a,b)", "10s"]));

    let (_, cells) = row(
        res("discovery.k8s.io", "v1", "endpointslices"),
        json!({"metadata": created, "addressType": "IPv4", "ports": [{"port": 80}],
               "endpoints": [{"addresses": ["10.1.0.1"]}, {"addresses": ["10.1.0.2"]}, {"addresses": ["10.1.0.3"]}, {"addresses": ["10.1.0.4"]}]}),
        now,
    );
    assert_eq!(
        cells,
        json!([
            "x",
            "IPv4",
            "80",
            "10.1.0.1,10.1.0.2,10.1.0.3 + 1 more...",
            "10s"
        ])
    );

    let (cols, cells) = row(
        res("batch", "v1", "cronjobs"),
        json!({"metadata": created, "spec": {"schedule": "*/5 * * * *", "suspend": false,
               "jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "t", "image": "busybox"}]}}}}}}),
        now,
    );
    assert_eq!(
        cols,
        [
            "Name",
            "Schedule",
            "Timezone",
            "Suspend",
            "Active",
            "Last Schedule",
            "Age",
            "+Containers",
            "+Images",
            "+Selector"
        ]
    );
    assert_eq!(
        cells,
        json!([
            "x",
            "*/5 * * * *",
            "<none>",
            false,
            0,
            "<none>",
            "10s",
            "t",
            "busybox",
            "<none>"
        ])
    );
}

#[test]
fn deployment_strategy_and_selector_expressions_are_validated() {
    let deploys = res("apps", "v1", "deployments");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut d = deployment(json!({"app": "web"}), json!({"app": "web", "tier": "fe"}));
        f(&mut d);
        create(deploys, Some("default"), d)
    };
    // Recreate with a rollingUpdate block is refused; Recreate alone gets no rollingUpdate.
    let err = with(&|d| {
        d["spec"]["strategy"] = json!({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}})
    })
    .expect_err("recreate + rollingUpdate");
    assert_eq!(cause_fields(&err), vec!["spec.strategy.rollingUpdate"]);
    let ok = with(&|d| d["spec"]["strategy"] = json!({"type": "Recreate"})).expect("recreate");
    assert!(ok.pointer("/spec/strategy/rollingUpdate").is_none());
    let err = with(&|d| {
        d["spec"]["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}})
    })
    .expect_err("both zero");
    assert_eq!(
        cause_fields(&err),
        vec!["spec.strategy.rollingUpdate.maxUnavailable"]
    );
    let err =
        with(&|d| d["spec"]["strategy"] = json!({"type": "BlueGreen"})).expect_err("unknown type");
    assert!(
        err.message.contains("Unsupported value: \"BlueGreen\""),
        "{}",
        err.message
    );
    // Empty selectors and unsatisfiable expressions.
    let err = with(&|d| d["spec"]["selector"] = json!({})).expect_err("empty selector");
    assert!(
        err.message
            .contains("empty selector is invalid for deployment"),
        "{}",
        err.message
    );
    let ok = with(&|d| {
        d["spec"]["selector"]["matchExpressions"] =
            json!([{"key": "tier", "operator": "In", "values": ["fe", "be"]}])
    });
    assert!(ok.is_ok(), "{ok:?}");
    let err = with(&|d| {
        d["spec"]["selector"]["matchExpressions"] =
            json!([{"key": "tier", "operator": "NotIn", "values": ["fe"]}])
    })
    .expect_err("template excluded by its own selector");
    assert_eq!(cause_fields(&err), vec!["spec.template.metadata.labels"]);
    let err = with(&|d| {
        d["spec"]["selector"]["matchExpressions"] =
            json!([{"key": "tier", "operator": "In", "values": []}])
    })
    .expect_err("In without values");
    assert!(cause_fields(&err).contains(&"spec.selector.matchExpressions[0].values".to_string()));
}

#[test]
fn pod_enumerations_are_validated() {
    let pods = res("", "v1", "pods");
    let err = create(
        pods,
        Some("default"),
        json!({"metadata": {"name": "p"}, "spec": {"restartPolicy": "Sometimes", "dnsPolicy": "Google",
            "containers": [{"name": "a", "image": "nginx", "imagePullPolicy": "Maybe",
                            "ports": [{"containerPort": 80, "protocol": "ICMP"}]}]}}),
    )
    .expect_err("four bad enumerations");
    let mut fields = cause_fields(&err);
    fields.sort();
    assert_eq!(
        fields,
        [
            "spec.containers[0].imagePullPolicy",
            "spec.containers[0].ports[0].protocol",
            "spec.dnsPolicy",
            "spec.restartPolicy"
        ]
    );
    let causes = err
        .details
        .as_ref()
        .map(|d| d["causes"].clone())
        .unwrap_or_default();
    assert!(
        causes
            .as_array()
            .is_some_and(|cs| cs.iter().all(|c| c["reason"] == "FieldValueNotSupported")),
        "{causes}"
    );
}

#[test]
fn list_kind_and_success_status() {
    assert_eq!(
        res("apps", "v1", "deployments").list_kind(),
        "DeploymentList"
    );
    assert_eq!(res("apps", "v1", "deployments").api_version(), "apps/v1");
    assert_eq!(res("", "v1", "pods").api_version(), "v1");
    assert_eq!(
        status::success_status(Some(json!({"name": "a", "kind": "pods"}))),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": "a", "kind": "pods"}})
    );
    assert!(status::success_status(None).get("details").is_none());
}

#[test]
fn service_port_names_target_ports_and_affinity_are_validated() {
    let services = res("", "v1", "services");
    let svc = |ports: Value, affinity: &str| {
        create(
            services,
            Some("default"),
            json!({"metadata": {"name": "s"}, "spec": {"sessionAffinity": affinity, "ports": ports}}),
        )
    };
    assert!(
        svc(
            json!([{"name": "http", "port": 80, "targetPort": "web"}]),
            "ClientIP"
        )
        .is_ok()
    );
    for (ports, field) in [
        (json!([{"name": "Http", "port": 80}]), "spec.ports[0].name"),
        (
            json!([{"port": 80, "targetPort": 70000}]),
            "spec.ports[0].targetPort",
        ),
        (
            json!([{"port": 80, "targetPort": "way-too-long-port-name"}]),
            "spec.ports[0].targetPort",
        ),
        (
            json!([{"port": 80, "targetPort": "80"}]),
            "spec.ports[0].targetPort",
        ),
    ] {
        let err = svc(ports.clone(), "None").expect_err("invalid port");
        assert_eq!(cause_fields(&err), vec![field], "{ports}");
    }
    let err = svc(json!([{"port": 80}]), "Sticky").expect_err("bad affinity");
    assert_eq!(cause_fields(&err), vec!["spec.sessionAffinity"]);
}

#[test]
fn typed_secrets_need_their_keys_and_data_is_capped_at_1mib() {
    let secrets = res("", "v1", "secrets");
    let err = create(
        secrets,
        Some("default"),
        json!({"metadata": {"name": "t"}, "type": "kubernetes.io/tls", "stringData": {"tls.crt": "x"}}),
    )
    .expect_err("tls secret without a key");
    assert_eq!(cause_fields(&err), vec!["data[tls.key]"]);
    assert!(
        create(
            secrets,
            Some("default"),
            json!({"metadata": {"name": "t"}, "type": "kubernetes.io/tls", "stringData": {"tls.crt": "x", "tls.key": "y"}}),
        )
        .is_ok()
    );
    let big = "x".repeat(1024 * 1024 + 1);
    let err = create(
        res("", "v1", "configmaps"),
        Some("default"),
        json!({"metadata": {"name": "c"}, "data": {"k": big}}),
    )
    .expect_err("over 1 MiB");
    assert!(err.message.contains("Too long"), "{}", err.message);
    // Data that is not base64 is a decoding error naming the key.
    let err = admission::admit(
        secrets,
        Some("default"),
        json!({"metadata": {"name": "s"}, "data": {"a": "not base64!!"}}),
        FieldValidation::Strict,
    )
    .expect_err("bad base64");
    assert_eq!(err.code, 400);
    assert!(err.message.contains("data.a"), "{}", err.message);
}

#[test]
fn invalid_objects_of_named_groups_say_kind_dot_group_like_kubernetes() {
    let deploys = res("apps", "v1", "deployments");
    let err = create(
        deploys,
        Some("default"),
        deployment(json!({"app": "web"}), json!({"app": "api"})),
    )
    .expect_err("mismatch");
    assert!(
        err.message
            .starts_with("Deployment.apps \"web\" is invalid: "),
        "{}",
        err.message
    );
    let status = err.to_status();
    assert_eq!(status["details"]["group"], "apps");
    assert_eq!(status["details"]["kind"], "Deployment");
    assert_eq!(status["details"]["name"], "web");
    // The core group keeps the bare kind.
    let err = admission::validate_name(res("", "v1", "configmaps"), "Bad").expect_err("bad name");
    assert!(
        err.message.starts_with("ConfigMap \"Bad\" is invalid: "),
        "{}",
        err.message
    );
    assert!(err.to_status()["details"].get("group").is_none());
}

#[test]
fn pod_status_column_follows_kubectl() {
    let pods = res("", "v1", "pods");
    let status_of = |pod: Value| {
        let (_, cells) = row(pods, pod, "2026-01-01T00:00:10Z");
        cells[2].as_str().unwrap_or("").to_string()
    };
    let two = json!([{"name": "a"}, {"name": "b"}]);
    assert_eq!(
        status_of(json!({"metadata": {"name": "p"}, "spec": {"containers": two}})),
        "Pending"
    );
    assert_eq!(
        status_of(
            json!({"metadata": {"name": "p"}, "spec": {"initContainers": [{"name": "i"}, {"name": "j"}], "containers": two},
            "status": {"phase": "Pending", "initContainerStatuses": [
                {"state": {"terminated": {"exitCode": 0}}}, {"state": {"running": {}}}]}})
        ),
        "Init:1/2"
    );
    assert_eq!(
        status_of(
            json!({"metadata": {"name": "p"}, "spec": {"initContainers": [{"name": "i"}], "containers": two},
            "status": {"phase": "Pending", "initContainerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}})
        ),
        "Init:CrashLoopBackOff"
    );
    assert_eq!(
        status_of(
            json!({"metadata": {"name": "p"}, "spec": {"containers": two},
            "status": {"phase": "Running", "containerStatuses": [
                {"ready": false, "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
                {"ready": true, "state": {"running": {}}}]}})
        ),
        "CrashLoopBackOff"
    );
    assert_eq!(
        status_of(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 3}}}]}})
        ),
        "ExitCode:3"
    );
    assert_eq!(
        status_of(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Succeeded", "containerStatuses": [{"state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}})
        ),
        "Completed"
    );
    assert_eq!(
        status_of(
            json!({"metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:05Z"}, "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Running"}})
        ),
        "Terminating"
    );
}
