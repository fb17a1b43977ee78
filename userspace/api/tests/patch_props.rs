//! Property tests: no patch engine and no selector parser panics on arbitrary input, and the
//! identity laws hold. These cover in the normal test run what the cargo-fuzz targets in
//! userspace/api/fuzz/ explore longer.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use skiff_api::patch::{json_merge_patch, json_patch, strategic_merge_patch};
use skiff_api::selector::{FieldSelector, LabelSelector};

/// Keys that steer the engines into every branch: directives, merge-keyed fields, merge keys.
const INTERESTING_KEYS: &[&str] = &[
    "$patch",
    "$retainKeys",
    "$setElementOrder/containers",
    "$setElementOrder/finalizers",
    "$setElementOrder/ports",
    "$setElementOrder/env",
    "$setElementOrder/",
    "$deleteFromPrimitiveList/finalizers",
    "$deleteFromPrimitiveList/args",
    "$ref",
    "$bogus",
    "metadata",
    "spec",
    "template",
    "containers",
    "initContainers",
    "env",
    "ports",
    "finalizers",
    "conditions",
    "volumes",
    "name",
    "containerPort",
    "port",
    "type",
    "uid",
    "value",
];

const INTERESTING_STRINGS: &[&str] = &["delete", "replace", "merge", "a", "b", "nginx", "80", ""];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(INTERESTING_KEYS).prop_map(str::to_string),
        1 => "[a-z$/]{0,6}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..100).prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        proptest::sample::select(INTERESTING_STRINGS).prop_map(|s| json!(s)),
        ".{0,8}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<String, Value>>())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Value> {
    prop::collection::vec((key(), json_value()), 0..8)
        .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<String, Value>>()))
}

fn pointer() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            key(),
            Just("-".to_string()),
            (0usize..4).prop_map(|i| i.to_string()),
            Just("~1".to_string())
        ],
        0..4,
    )
    .prop_map(|segs| segs.iter().map(|s| format!("/{s}")).collect())
}

fn json_patch_op() -> impl Strategy<Value = Value> {
    (
        proptest::sample::select(&["add", "remove", "replace", "move", "copy", "test", "nope"][..]),
        pointer(),
        pointer(),
        json_value(),
        any::<bool>(),
    )
        .prop_map(|(op, path, from, value, with_value)| {
            let mut m = Map::new();
            m.insert("op".into(), json!(op));
            m.insert("path".into(), json!(path));
            m.insert("from".into(), json!(from));
            if with_value {
                m.insert("value".into(), value);
            }
            Value::Object(m)
        })
}

proptest! {
    // 512 cases per property in the normal run; PROPTEST_CASES=N runs longer (a fuzzing stand-in
    // where cargo-fuzz's nightly build is too heavy).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512),
        .. ProptestConfig::default()
    })]

    #[test]
    fn strategic_merge_patch_never_panics(original in json_object(), patch in json_object()) {
        let before = original.clone();
        let _ = strategic_merge_patch(&original, &patch);
        prop_assert_eq!(original, before);
    }

    #[test]
    fn strategic_merge_patch_accepts_any_json(original in json_value(), patch in json_value()) {
        let _ = strategic_merge_patch(&original, &patch);
    }

    #[test]
    fn strategic_merge_patch_with_empty_map_is_identity(original in json_object()) {
        let got = strategic_merge_patch(&original, &json!({}));
        prop_assert_eq!(got, Ok(original));
    }

    #[test]
    fn strategic_merge_patch_result_holds_no_directives(original in json_object(), patch in json_object()) {
        // Whatever the patch, a successful merge never stores `$patch` / `$setElementOrder` /
        // `$retainKeys` / `$deleteFromPrimitiveList` keys that were not already stored.
        if let Ok(got) = strategic_merge_patch(&original, &patch) {
            prop_assert!(directive_count(&got) <= directive_count(&original), "{got}");
        }
    }

    #[test]
    fn merge_patch_never_panics(original in json_value(), patch in json_value()) {
        let _ = json_merge_patch(&original, &patch);
    }

    #[test]
    fn merge_patch_with_empty_object_is_identity(original in json_object()) {
        prop_assert_eq!(json_merge_patch(&original, &json!({})), Ok(original));
    }

    #[test]
    fn json_patch_never_panics(original in json_value(), ops in prop::collection::vec(json_patch_op(), 0..6)) {
        let before = original.clone();
        let _ = json_patch(&original, &Value::Array(ops));
        prop_assert_eq!(original, before);
    }

    #[test]
    fn json_patch_accepts_any_json(original in json_value(), patch in json_value()) {
        let _ = json_patch(&original, &patch);
    }

    #[test]
    fn json_patch_with_no_operations_is_identity(original in json_value()) {
        prop_assert_eq!(json_patch(&original, &json!([])), Ok(original));
    }

    #[test]
    fn label_selector_parser_never_panics(s in ".{0,40}") {
        let _ = LabelSelector::parse(&s);
    }

    #[test]
    fn label_selector_round_trips_through_display(s in "[a-c!=(), <>0-9]{0,24}|[a-z]{1,3}( in | notin |=|!=|==)[a-z(), ]{0,10}") {
        if let Ok(sel) = LabelSelector::parse(&s) {
            let shown = sel.to_string();
            let again = LabelSelector::parse(&shown);
            prop_assert_eq!(again.as_ref(), Ok(&sel), "{:?} displayed as {:?}", s, shown);
            // Matching is total: no label set panics.
            let labels: BTreeMap<String, String> = [("a", "b"), ("b", "1"), ("c", "")]
                .iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let _ = sel.matches(&labels);
        }
    }

    #[test]
    fn field_selector_parser_never_panics(s in ".{0,40}") {
        let _ = FieldSelector::parse(&s);
    }

    #[test]
    fn field_selector_round_trips_through_display(s in r"[a-c.=!,\\ ]{0,24}", obj in json_object()) {
        if let Ok(sel) = FieldSelector::parse(&s) {
            let shown = sel.to_string();
            let again = FieldSelector::parse(&shown);
            prop_assert_eq!(again.as_ref(), Ok(&sel), "{:?} displayed as {:?}", s, shown);
            let _ = sel.matches(&obj);
        }
    }
}

fn directive_count(v: &Value) -> usize {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let is_directive = k == "$patch"
                    || k == "$retainKeys"
                    || k.starts_with("$setElementOrder/")
                    || k.starts_with("$deleteFromPrimitiveList/");
                usize::from(is_directive) + directive_count(v)
            })
            .sum(),
        Value::Array(a) => a.iter().map(directive_count).sum(),
        _ => 0,
    }
}
