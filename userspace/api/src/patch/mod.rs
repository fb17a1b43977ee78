//! The three patch engines the apiserver applies to stored objects, all pure functions over
//! `serde_json::Value` with no I/O:
//!
//! - [`json_merge_patch`]: RFC 7386 (`application/merge-patch+json`), used by `kubectl scale`,
//!   `label`, `annotate`, `patch --type merge`.
//! - [`json_patch`]: RFC 6902 (`application/json-patch+json`), used by `kubectl rollout undo` and
//!   `patch --type json`.
//! - [`strategic_merge_patch`]: Kubernetes strategic merge patch
//!   (`application/strategic-merge-patch+json`), used by client-side `kubectl apply`, `set image`,
//!   `rollout restart`, `edit` and the Python client's dict patches. See [`strategic`] for the rules.
//!
//! Every engine takes the original by reference and returns a new value: a patch that fails leaves
//! the caller's object untouched, so the apiserver can answer 422 and change nothing.

mod strategic;

pub use strategic::strategic_merge_patch;

use serde::Deserialize as _;
use serde_json::Value;

/// Kubernetes refuses JSON patches longer than this (apiserver `maxJSONPatchOperations`); so do
/// we, so that one request cannot make the server loop for long.
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// Why a patch could not be applied. Messages say what failed and where, so the apiserver can put
/// them straight into a 422 `metav1.Status`.
///
/// JSON patch operations are numbered from 0, like the indexes of the patch array.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PatchError {
    /// The patch (or the object being patched) is not the JSON type the engine needs.
    #[error("{what} must be a JSON object, got {found}")]
    NotAnObject {
        what: &'static str,
        found: &'static str,
    },

    /// A JSON patch body that is not an array.
    #[error(
        "json patch must be a JSON array of operations like [{{\"op\":\"replace\",\"path\":\"/spec/replicas\",\"value\":3}}], got {found}"
    )]
    JsonPatchNotAnArray { found: &'static str },

    /// A JSON patch longer than [`MAX_JSON_PATCH_OPERATIONS`].
    #[error(
        "json patch has {count} operations, more than the limit of {max}: split it into smaller patches"
    )]
    JsonPatchTooLong { count: usize, max: usize },

    /// One operation of a JSON patch is malformed (unknown `op`, missing `path` or `value`, bad pointer).
    #[error("json patch operation {index} is malformed: {reason}")]
    JsonPatchMalformed { index: usize, reason: String },

    /// One operation of a JSON patch could not be applied; nothing was changed.
    #[error("json patch operation {index} ({op} {path}): {reason}")]
    JsonPatchFailed {
        index: usize,
        op: &'static str,
        path: String,
        reason: String,
    },

    /// A strategic merge patch that is not well formed at `path` (for example an element of a
    /// merging list without its merge key).
    #[error("strategic merge patch at {path}: {reason}")]
    Strategic { path: String, reason: String },

    /// A `$`-key in a strategic merge patch that is not one of the directives Kubernetes defines.
    #[error(
        "strategic merge patch at {path}: unknown directive {directive:?} (known: $patch, $retainKeys, $setElementOrder/<field>, $deleteFromPrimitiveList/<field>)"
    )]
    UnknownDirective { path: String, directive: String },
}

/// The patch flavours of `PATCH` requests, chosen by the request's `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PatchType {
    /// RFC 6902, `application/json-patch+json`.
    Json,
    /// RFC 7386, `application/merge-patch+json`.
    Merge,
    /// Kubernetes strategic merge patch, `application/strategic-merge-patch+json`.
    Strategic,
    /// Server-side apply, `application/apply-patch+yaml` (not applied by this module).
    Apply,
}

impl PatchType {
    /// Every patch type, for `Accept-Patch` headers and discovery.
    pub const ALL: [PatchType; 4] = [
        PatchType::Json,
        PatchType::Merge,
        PatchType::Strategic,
        PatchType::Apply,
    ];

    /// The patch type named by a request `Content-Type`; parameters after `;` (such as
    /// `charset=utf-8`) and letter case are ignored. `None` means 415 Unsupported Media Type.
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        let essence = ct.split(';').next().unwrap_or("").trim();
        PatchType::ALL
            .into_iter()
            .find(|t| t.content_type().eq_ignore_ascii_case(essence))
    }

    /// The media type of this patch type.
    pub fn content_type(self) -> &'static str {
        match self {
            PatchType::Json => "application/json-patch+json",
            PatchType::Merge => "application/merge-patch+json",
            PatchType::Strategic => "application/strategic-merge-patch+json",
            PatchType::Apply => "application/apply-patch+yaml",
        }
    }
}

/// The JSON type of a value, for error messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// RFC 7386 JSON merge patch: objects merge recursively, `null` deletes a key, anything else
/// (arrays included) replaces. The patch must be an object: RFC 7386 would let a non-object
/// replace the whole document, but for an API object that is never meant and would only fail
/// later with a confusing decode error.
pub fn json_merge_patch(original: &Value, patch: &Value) -> Result<Value, PatchError> {
    if !patch.is_object() {
        return Err(PatchError::NotAnObject {
            what: "merge patch",
            found: json_kind(patch),
        });
    }
    let mut doc = original.clone();
    // The json-patch crate implements RFC 7386 exactly (the same crate kube-rs uses).
    json_patch::merge(&mut doc, patch);
    Ok(doc)
}

/// RFC 6902 JSON patch: `add`, `remove`, `replace`, `move`, `copy`, `test`, applied in order.
/// If any operation fails the error names it and the original is unchanged (the operations run
/// on a copy).
pub fn json_patch(original: &Value, patch: &Value) -> Result<Value, PatchError> {
    let Value::Array(ops) = patch else {
        return Err(PatchError::JsonPatchNotAnArray {
            found: json_kind(patch),
        });
    };
    if ops.len() > MAX_JSON_PATCH_OPERATIONS {
        return Err(PatchError::JsonPatchTooLong {
            count: ops.len(),
            max: MAX_JSON_PATCH_OPERATIONS,
        });
    }
    // Decode operation by operation so that a malformed one is reported by its index.
    let mut parsed = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        let operation = json_patch::PatchOperation::deserialize(op).map_err(|e| {
            PatchError::JsonPatchMalformed {
                index,
                reason: e.to_string(),
            }
        })?;
        parsed.push(operation);
    }
    let mut doc = original.clone();
    // `patch_unsafe` skips the crate's undo log: we work on a copy, so a failure simply drops it.
    json_patch::patch_unsafe(&mut doc, &parsed).map_err(|e| {
        let op = parsed.get(e.operation);
        PatchError::JsonPatchFailed {
            index: e.operation,
            op: op.map(op_name).unwrap_or("operation"),
            path: e.path.to_string(),
            reason: failure_reason(&e.kind, op),
        }
    })?;
    Ok(doc)
}

fn op_name(op: &json_patch::PatchOperation) -> &'static str {
    use json_patch::PatchOperation as Op;
    match op {
        Op::Add(_) => "add",
        Op::Remove(_) => "remove",
        Op::Replace(_) => "replace",
        Op::Move(_) => "move",
        Op::Copy(_) => "copy",
        Op::Test(_) => "test",
    }
}

fn failure_reason(
    kind: &json_patch::PatchErrorKind,
    op: Option<&json_patch::PatchOperation>,
) -> String {
    use json_patch::{PatchErrorKind as K, PatchOperation as Op};
    match kind {
        K::TestFailed => "test failed: the value at the path differs from the expected value".into(),
        K::InvalidFromPointer => {
            let from = match op {
                Some(Op::Move(m)) => m.from.to_string(),
                Some(Op::Copy(c)) => c.from.to_string(),
                _ => String::new(),
            };
            format!("from path {from:?} not found")
        }
        K::InvalidPointer => match op {
            Some(Op::Add(_)) | Some(Op::Move(_)) | Some(Op::Copy(_)) => {
                "path not found: its parent must exist and an array index must be at most the array length".into()
            }
            _ => "path not found".into(),
        },
        K::CannotMoveInsideItself => "cannot move a value inside itself".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types_map_to_patch_types_ignoring_parameters_and_case() {
        assert_eq!(
            PatchType::from_content_type("application/json-patch+json"),
            Some(PatchType::Json)
        );
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(
            PatchType::from_content_type("Application/Strategic-Merge-Patch+JSON"),
            Some(PatchType::Strategic)
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml;charset=utf-8"),
            Some(PatchType::Apply)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
        assert_eq!(PatchType::from_content_type(""), None);
        for t in PatchType::ALL {
            assert_eq!(PatchType::from_content_type(t.content_type()), Some(t));
        }
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let original = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        let patch = json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": null, "y": 1}});
        let got = json_merge_patch(&original, &patch).expect("valid merge patch");
        assert_eq!(
            got,
            json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"y": 1}})
        );
    }

    #[test]
    fn merge_patch_must_be_an_object() {
        let err = json_merge_patch(&json!({"a": 1}), &json!([1])).expect_err("array patch");
        assert_eq!(
            err.to_string(),
            "merge patch must be a JSON object, got an array"
        );
    }

    #[test]
    fn json_patch_applies_all_six_operations() {
        let original = json!({"a": 1, "b": {"c": [1, 2]}});
        let patch = json!([
            {"op": "test", "path": "/a", "value": 1},
            {"op": "add", "path": "/b/c/-", "value": 3},
            {"op": "replace", "path": "/a", "value": 2},
            {"op": "copy", "from": "/b/c", "path": "/d"},
            {"op": "move", "from": "/d/0", "path": "/e"},
            {"op": "remove", "path": "/b/c/1"}
        ]);
        let got = json_patch(&original, &patch).expect("valid json patch");
        assert_eq!(
            got,
            json!({"a": 2, "b": {"c": [1, 3]}, "d": [2, 3], "e": 1})
        );
    }

    #[test]
    fn json_patch_failure_names_the_operation_and_changes_nothing() {
        let original = json!({"spec": {"replicas": 1}});
        let patch = json!([
            {"op": "replace", "path": "/spec/replicas", "value": 2},
            {"op": "add", "path": "/metadata/labels", "value": {}},
            {"op": "replace", "path": "/spec/foo", "value": 1}
        ]);
        let err = json_patch(&original, &patch).expect_err("missing parent");
        assert_eq!(
            err,
            PatchError::JsonPatchFailed {
                index: 1,
                op: "add",
                path: "/metadata/labels".into(),
                reason: "path not found: its parent must exist and an array index must be at most the array length".into(),
            }
        );
        let err = json_patch(
            &original,
            &json!([{"op": "replace", "path": "/spec/foo", "value": 1}]),
        )
        .expect_err("missing path");
        assert_eq!(
            err.to_string(),
            "json patch operation 0 (replace /spec/foo): path not found"
        );
        assert_eq!(original, json!({"spec": {"replicas": 1}}));
    }

    #[test]
    fn json_patch_rejects_malformed_operations_by_index() {
        let original = json!({});
        let err = json_patch(
            &original,
            &json!([{"op": "test", "path": "", "value": {}}, {"op": "frobnicate", "path": "/a"}]),
        )
        .expect_err("unknown op");
        match err {
            PatchError::JsonPatchMalformed { index, reason } => {
                assert_eq!(index, 1);
                assert!(reason.contains("frobnicate"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let err =
            json_patch(&original, &json!([{"op": "add", "path": "/a"}])).expect_err("no value");
        assert!(err.to_string().contains("value"), "{err}");
        let err = json_patch(&original, &json!({"op": "add"})).expect_err("not an array");
        assert!(matches!(
            err,
            PatchError::JsonPatchNotAnArray { found: "an object" }
        ));
    }

    #[test]
    fn json_patch_test_failure_is_reported() {
        let err = json_patch(
            &json!({"a": 1}),
            &json!([{"op": "test", "path": "/a", "value": 2}]),
        )
        .expect_err("test mismatch");
        assert!(
            err.to_string()
                .starts_with("json patch operation 0 (test /a): test failed"),
            "{err}"
        );
    }

    #[test]
    fn json_patch_length_is_bounded() {
        let ops: Vec<Value> = (0..=MAX_JSON_PATCH_OPERATIONS)
            .map(|_| json!({"op": "test", "path": "", "value": {}}))
            .collect();
        let err = json_patch(&json!({}), &Value::Array(ops)).expect_err("too long");
        assert!(matches!(err, PatchError::JsonPatchTooLong { .. }));
    }
}
