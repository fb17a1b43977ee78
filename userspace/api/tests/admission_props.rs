//! Outside input never panics the API model: arbitrary JSON bodies, and valid objects with
//! arbitrary values spliced in at the fields validation and tables read, go through admission,
//! defaulting, validation, update preparation and Table rendering for every served kind.

use proptest::prelude::*;
use serde_json::{Value, json};
use skiff_api::admission::{self, FieldValidation};
use skiff_api::{registry, table};

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-zA-Z0-9:/._ *@-]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Pointers to the fields admission and tables look at, where a wrong shape could hurt.
const PLACES: &[&str] = &[
    "/metadata/name",
    "/metadata/labels",
    "/metadata/annotations",
    "/metadata/creationTimestamp",
    "/spec",
    "/spec/replicas",
    "/spec/selector",
    "/spec/selector/matchExpressions",
    "/spec/strategy",
    "/spec/schedule",
    "/spec/ports",
    "/spec/template",
    "/spec/template/spec/containers",
    "/spec/jobTemplate",
    "/status",
    "/data",
    "/stringData",
];

fn splice(base: &Value, place: &str, v: Value) -> Value {
    let mut out = base.clone();
    let (parent, key) = place.rsplit_once('/').unwrap_or(("", place));
    if let Some(Value::Object(m)) = out.pointer_mut(parent) {
        m.insert(key.to_string(), v);
    }
    out
}

fn exercise(body: Value) {
    let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .expect("fixed time")
        .with_timezone(&chrono::Utc);
    for info in registry::all() {
        let ns = info.namespaced.then_some("default");
        for mode in [FieldValidation::Strict, FieldValidation::Warn] {
            let Ok(admitted) = admission::admit(info, ns, body.clone(), mode) else {
                continue;
            };
            let mut obj = admitted.object;
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let _ = admission::validate_name(info, &name);
            admission::prepare_create(info, &mut obj, now);
            let _ = admission::validate(info, &obj);
            let mut updated = body.clone();
            let _ = admission::prepare_update(info, &obj, &mut updated, None);
            let _ = admission::prepare_update(info, &obj, &mut updated, Some("status"));
            let _ = admission::validate_update(info, &obj, &updated);
        }
        let _ = table::to_table(
            info,
            std::slice::from_ref(&body),
            table::IncludeObject::Object,
            "1",
            now,
        );
    }
}

fn base_object() -> Value {
    json!({
        "metadata": {"name": "web", "labels": {"app": "web"}, "creationTimestamp": "2025-12-31T00:00:00Z"},
        "spec": {
            "replicas": 2,
            "schedule": "*/5 * * * *",
            "selector": {"matchLabels": {"app": "web"}},
            "ports": [{"port": 80, "nodePort": 30080}],
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "nginx"}]}},
            "jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "nginx"}]}}}},
        },
        "status": {"replicas": 1},
        "data": {"k": "dg=="},
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bodies_never_panic(body in any_json()) {
        exercise(body);
    }

    #[test]
    fn valid_objects_with_an_arbitrary_field_never_panic(
        place in prop::sample::select(PLACES),
        value in any_json(),
    ) {
        exercise(splice(&base_object(), place, value));
    }
}
