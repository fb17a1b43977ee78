//! Kubernetes strategic merge patch (SMP), hand-written: no Rust crate implements it (kube-rs
//! only sends SMPs, it never applies one). The behaviour follows
//! `k8s.io/apimachinery/pkg/util/strategicpatch` as used by the apiserver
//! (`MergeParallelList` and `IgnoreUnmatchedNulls` both on), with the rules kubectl relies on
//! (reference/kubectl-wire.md section 7):
//!
//! - Maps merge recursively; a `null` value deletes the key (and is dropped where nothing exists).
//! - A list whose field has a merge key (table [`MERGE_KEYS_BY_FIELD`]) merges element by element,
//!   matched by that key: existing elements merge recursively, new ones are added, an element
//!   `{"$patch": "delete", "<key>": ...}` removes the matching element, and an element
//!   `{"$patch": "replace"}` makes the list exactly the patch's other elements.
//! - `metadata.finalizers` is a list of primitives that merges as a set union.
//! - Every other list is replaced whole.
//! - `$setElementOrder/<field>: [...]` fixes the order of the merged list `<field>`.
//! - `$retainKeys: [...]` keeps only the listed keys of the map (the patch may set only those).
//! - `$patch: replace` in a map replaces the map with the rest of the patch map;
//!   `$patch: delete` in a map deletes the map (Kubernetes leaves an empty map `{}` in that
//!   field; skiff removes the field, which decodes the same for every built-in type).
//! - `$deleteFromPrimitiveList/<field>: [...]` removes those values from the primitive list.
//! - Any other `$`-key is an error (except `$ref` and `$schema`, which are ordinary JSON-schema
//!   field names in CustomResourceDefinitions).
//!
//! Order of merged lists, as Kubernetes computes it: elements named in the patch come in the
//! patch's order; elements only on the server keep their relative order and are interleaved by
//! their position in the stored list (an element that was before a patched element in the stored
//! list stays before it). `$setElementOrder` orders the elements it names the same way and wins
//! over the patch order. A consequence Kubernetes users know: adding an element with a plain
//! patch (no `$setElementOrder`) puts it before the stored elements it cannot be placed against;
//! `kubectl apply` always sends `$setElementOrder`, so applied lists keep the file's order.
//!
//! Results are checked against kubectl 1.32's own implementation (`kubectl patch --local`) in
//! tests/patch_cases.rs and tests/smp_vs_kubectl.rs. Where skiff differs on purpose:
//! - `$patch: delete` on a map removes the field (Kubernetes leaves `{}`);
//! - directives inside new elements, new fields and replaced lists are applied (against nothing)
//!   and nulls there are dropped; Kubernetes stores some of them verbatim (a `$patch: delete`
//!   element in a replaced env list would become an env var);
//! - unknown `$`-keys are an error (Kubernetes keeps them as fields);
//! - empty lists Kubernetes rejects with "no elements in any of the given slices" are accepted.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::{PatchError, json_kind};

const PATCH_DIRECTIVE: &str = "$patch";
const RETAIN_KEYS_DIRECTIVE: &str = "$retainKeys";
const SET_ELEMENT_ORDER_PREFIX: &str = "$setElementOrder/";
const DELETE_FROM_PRIMITIVE_LIST_PREFIX: &str = "$deleteFromPrimitiveList/";

/// `$`-keys that are ordinary fields, not directives (JSONSchemaProps in CRDs).
const DOLLAR_FIELDS: &[&str] = &["$ref", "$schema"];

/// Lists that merge by a key, by field name: Kubernetes reads this from the Go struct tags
/// (`patchStrategy:"merge" patchMergeKey:"..."`) of the built-in types; skiff stores JSON, so the
/// fields kubectl and the clients patch are listed here. `ports` is not in the table because its
/// key depends on where it is (see [`list_strategy`]).
pub const MERGE_KEYS_BY_FIELD: &[(&str, &str)] = &[
    ("containers", "name"),
    ("initContainers", "name"),
    ("ephemeralContainers", "name"),
    ("volumes", "name"),
    ("imagePullSecrets", "name"),
    ("env", "name"),
    ("hostAliases", "ip"),
    ("volumeMounts", "mountPath"),
    ("volumeDevices", "devicePath"),
    ("topologySpreadConstraints", "topologyKey"),
    ("ownerReferences", "uid"),
    ("conditions", "type"),
    // Further merge keys of the Pod types skiff serves, so that kubectl apply's deletions in
    // them work (a `$patch: delete` element in a replaced list is an error).
    ("resourceClaims", "name"),
    ("schedulingGates", "name"),
    ("resourceClaimStatuses", "name"),
    ("podIPs", "ip"),
    ("hostIPs", "ip"),
];

/// Fields holding container specs: their `ports` merge by `containerPort`.
const CONTAINER_LIST_FIELDS: &[&str] = &["containers", "initContainers", "ephemeralContainers"];

/// How a list field merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListStrategy {
    /// The patch's list replaces the stored one (Kubernetes' default for lists).
    Replace,
    /// Elements are objects matched by this key.
    MergeByKey(&'static str),
    /// Elements are primitives merged as a set union (`metadata.finalizers`).
    MergePrimitives,
}

/// The strategy of list `field` inside the map at `parent`.
fn list_strategy(parent: &Path<'_>, field: &str) -> ListStrategy {
    match field {
        // Container ports merge by containerPort, Service spec.ports by port; every other
        // `ports` (EndpointSlice, NetworkPolicy rules, Endpoints subsets) is atomic in
        // Kubernetes, so merging those by `port` would silently keep ports a user removed.
        "ports" => {
            if parent
                .nearest_field()
                .is_some_and(|f| CONTAINER_LIST_FIELDS.contains(&f))
            {
                ListStrategy::MergeByKey("containerPort")
            } else if parent.is_top_level_field("spec") {
                ListStrategy::MergeByKey("port")
            } else {
                ListStrategy::Replace
            }
        }
        "finalizers" if parent.nearest_field() == Some("metadata") => ListStrategy::MergePrimitives,
        // Names other kinds reuse with other meanings (EndpointSlice `addresses` are strings),
        // so these apply only where Kubernetes declares them.
        "addresses" if parent.is_top_level_field("status") => ListStrategy::MergeByKey("type"), // Node
        "podCIDRs" if parent.is_top_level_field("spec") => ListStrategy::MergePrimitives, // Node
        "secrets" if parent.is_root() => ListStrategy::MergeByKey("name"), // ServiceAccount
        _ => MERGE_KEYS_BY_FIELD
            .iter()
            .find(|(name, _)| *name == field)
            .map_or(ListStrategy::Replace, |(_, key)| {
                ListStrategy::MergeByKey(key)
            }),
    }
}

/// Applies a Kubernetes strategic merge patch to `original`. Both must be JSON objects.
pub fn strategic_merge_patch(original: &Value, patch: &Value) -> Result<Value, PatchError> {
    let Value::Object(original) = original else {
        return Err(PatchError::NotAnObject {
            what: "the object being patched",
            found: json_kind(original),
        });
    };
    let Value::Object(patch) = patch else {
        return Err(PatchError::NotAnObject {
            what: "strategic merge patch",
            found: json_kind(patch),
        });
    };
    let root = Path::root();
    // A top-level `$patch: delete` empties the object, as in Kubernetes.
    let merged = merge_map(original.clone(), patch, &root)?.unwrap_or_default();
    Ok(Value::Object(merged))
}

/// Where in the document the merge is, as a stack-allocated chain (no allocation per level):
/// used for merge-key lookups that depend on the parent field and for error messages.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Root,
    Field(&'a str),
    Index(usize),
}

#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    seg: Seg<'a>,
}

impl<'a> Path<'a> {
    fn root() -> Path<'static> {
        Path {
            parent: None,
            seg: Seg::Root,
        }
    }

    fn field<'b>(&'b self, name: &'b str) -> Path<'b> {
        Path {
            parent: Some(self),
            seg: Seg::Field(name),
        }
    }

    fn index<'b>(&'b self, index: usize) -> Path<'b> {
        Path {
            parent: Some(self),
            seg: Seg::Index(index),
        }
    }

    /// The field this map belongs to, skipping list indexes (`containers` for
    /// `spec.containers[0]`).
    fn nearest_field(&self) -> Option<&'a str> {
        match self.seg {
            Seg::Field(f) => Some(f),
            Seg::Index(_) => self.parent.and_then(|p| p.nearest_field()),
            Seg::Root => None,
        }
    }

    /// True for the object's root map.
    fn is_root(&self) -> bool {
        matches!(self.seg, Seg::Root)
    }

    /// True for the map at `.<name>` directly under the object's root.
    fn is_top_level_field(&self, name: &str) -> bool {
        matches!(self.seg, Seg::Field(f) if f == name)
            && self.parent.is_some_and(|p| matches!(p.seg, Seg::Root))
    }

    fn render(&self) -> String {
        let mut segs = Vec::new();
        let mut cur = Some(self);
        while let Some(p) = cur {
            segs.push(p.seg);
            cur = p.parent;
        }
        let mut out = String::new();
        for seg in segs.iter().rev() {
            match seg {
                Seg::Root => {}
                Seg::Field(f) => {
                    out.push('.');
                    out.push_str(f);
                }
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        if out.is_empty() {
            "the top level".to_string()
        } else {
            out
        }
    }
}

fn invalid(path: &Path<'_>, reason: impl Into<String>) -> PatchError {
    PatchError::Strategic {
        path: path.render(),
        reason: reason.into(),
    }
}

fn is_directive(key: &str) -> bool {
    key.starts_with('$') && !DOLLAR_FIELDS.contains(&key)
}

fn is_known_directive(key: &str) -> bool {
    key == PATCH_DIRECTIVE
        || key == RETAIN_KEYS_DIRECTIVE
        || key.starts_with(SET_ELEMENT_ORDER_PREFIX)
        || key.starts_with(DELETE_FROM_PRIMITIVE_LIST_PREFIX)
}

/// The hashable identity of a merge-key value or a primitive list element, so that matching
/// stays linear in the list sizes (Kubernetes scans lists quadratically; a large list in one
/// request should not cost seconds). Go decodes every JSON number as float64, so `80` and `80.0`
/// are the same key there; numbers are compared as f64 here too.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum IdKey {
    Null,
    Bool(bool),
    Number(u64),
    String(String),
    /// Objects and arrays (never sensible keys, but they must not break anything).
    Composite(String),
}

fn id_key(v: &Value) -> IdKey {
    match v {
        Value::Null => IdKey::Null,
        Value::Bool(b) => IdKey::Bool(*b),
        Value::Number(n) => match n.as_f64() {
            // `+ 0.0` turns -0.0 into 0.0, which Go's == also treats as equal.
            Some(f) => IdKey::Number((f + 0.0).to_bits()),
            None => IdKey::Composite(n.to_string()),
        },
        Value::String(s) => IdKey::String(s.clone()),
        composite => IdKey::Composite(composite.to_string()),
    }
}

fn same_id(a: &Value, b: &Value) -> bool {
    id_key(a) == id_key(b)
}

/// Where each identity first appears in `ids` (`None`: an element without identity, which
/// takes a position but matches nothing).
fn first_positions<'v>(ids: impl IntoIterator<Item = Option<&'v Value>>) -> HashMap<IdKey, usize> {
    let mut index = HashMap::new();
    for (i, id) in ids.into_iter().enumerate() {
        if let Some(id) = id {
            index.entry(id_key(id)).or_insert(i);
        }
    }
    index
}

/// Merges `patch` into `original`. `None` means the patch deletes this map (`$patch: delete`).
fn merge_map(
    mut original: Map<String, Value>,
    patch: &Map<String, Value>,
    path: &Path<'_>,
) -> Result<Option<Map<String, Value>>, PatchError> {
    if let Some(directive) = patch.get(PATCH_DIRECTIVE) {
        return match directive.as_str() {
            Some("replace") => {
                let rest: Map<String, Value> = patch
                    .iter()
                    .filter(|(k, _)| *k != PATCH_DIRECTIVE)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                // Merging into nothing applies the rest's own directives and drops its nulls.
                merge_map(Map::new(), &rest, path)
            }
            Some("delete") => Ok(None),
            _ => Err(invalid(
                path,
                format!("unknown $patch value {directive} in a map: use \"replace\" or \"delete\""),
            )),
        };
    }

    if let Some(unknown) = patch
        .keys()
        .find(|k| is_directive(k) && !is_known_directive(k))
    {
        return Err(PatchError::UnknownDirective {
            path: path.render(),
            directive: unknown.clone(),
        });
    }

    if let Some(retain) = patch.get(RETAIN_KEYS_DIRECTIVE) {
        apply_retain_keys(&mut original, retain, patch, path)?;
    }

    // Lists named by `$setElementOrder/<field>` are merged and ordered here; the main loop
    // below skips them.
    let mut ordered_fields: Vec<&str> = Vec::new();
    for (key, order) in patch {
        if let Some(field) = key.strip_prefix(SET_ELEMENT_ORDER_PREFIX)
            && merge_with_element_order(&mut original, patch, field, order, path)?
        {
            ordered_fields.push(field);
        }
    }

    for (key, values) in patch {
        if let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST_PREFIX) {
            delete_from_primitive_list(&mut original, field, values, path)?;
        }
    }

    for (key, patch_value) in patch {
        if is_directive(key) || ordered_fields.contains(&key.as_str()) {
            continue;
        }
        if patch_value.is_null() {
            original.remove(key);
            continue;
        }
        let child = path.field(key);
        let stored = original.get_mut(key).map(std::mem::take);
        let merged = match (stored, patch_value) {
            (Some(Value::Object(o)), Value::Object(p)) => {
                merge_map(o, p, &child)?.map(Value::Object)
            }
            (Some(Value::Array(o)), Value::Array(p)) => Some(Value::Array(merge_list(
                o,
                p,
                list_strategy(path, key),
                &child,
            )?)),
            // Absent or of another type: the patch value is taken, with its directives applied
            // against nothing (so none leak into the stored object) and its nulls dropped.
            (_, p) => fresh_value(p, list_strategy(path, key), &child)?,
        };
        match merged {
            Some(v) => {
                original.insert(key.clone(), v);
            }
            None => {
                original.remove(key);
            }
        }
    }
    Ok(Some(original))
}

/// A patch value for a field that does not exist yet.
fn fresh_value(
    patch_value: &Value,
    strategy: ListStrategy,
    path: &Path<'_>,
) -> Result<Option<Value>, PatchError> {
    Ok(match patch_value {
        Value::Object(p) => merge_map(Map::new(), p, path)?.map(Value::Object),
        Value::Array(p) => Some(Value::Array(merge_list(Vec::new(), p, strategy, path)?)),
        Value::Null => None,
        scalar => Some(scalar.clone()),
    })
}

/// `$retainKeys`: the map keeps only the listed keys; the patch may set no other key.
fn apply_retain_keys(
    original: &mut Map<String, Value>,
    retain: &Value,
    patch: &Map<String, Value>,
    path: &Path<'_>,
) -> Result<(), PatchError> {
    let Value::Array(list) = retain else {
        return Err(invalid(
            path,
            format!(
                "$retainKeys must be a list of field names, got {}",
                json_kind(retain)
            ),
        ));
    };
    let mut keep: Vec<&str> = Vec::with_capacity(list.len());
    for v in list {
        match v.as_str() {
            Some(s) => keep.push(s),
            None => {
                return Err(invalid(
                    path,
                    format!(
                        "$retainKeys must hold field names (strings), found {}",
                        json_kind(v)
                    ),
                ));
            }
        }
    }
    if let Some((extra, _)) = patch
        .iter()
        .find(|(k, v)| !v.is_null() && !is_directive(k) && !keep.contains(&k.as_str()))
    {
        return Err(invalid(
            path,
            format!("field {extra:?} is set in the patch but not listed in $retainKeys {keep:?}"),
        ));
    }
    original.retain(|k, _| keep.contains(&k.as_str()));
    Ok(())
}

/// `$deleteFromPrimitiveList/<field>`: removes the listed values from the stored list.
fn delete_from_primitive_list(
    original: &mut Map<String, Value>,
    field: &str,
    values: &Value,
    path: &Path<'_>,
) -> Result<(), PatchError> {
    if field.is_empty() {
        return Err(invalid(
            path,
            "$deleteFromPrimitiveList/ needs a field name after the slash",
        ));
    }
    let Value::Array(to_delete) = values else {
        return Err(invalid(
            &path.field(field),
            format!(
                "$deleteFromPrimitiveList/{field} must be a list of values, got {}",
                json_kind(values)
            ),
        ));
    };
    if let Some(Value::Array(stored)) = original.get_mut(field) {
        let to_delete: HashSet<IdKey> = to_delete.iter().map(id_key).collect();
        stored.retain(|v| !to_delete.contains(&id_key(v)));
    }
    Ok(())
}

/// The identity of a list element: its merge key's value, or the element itself for primitives.
fn identity(element: &Value, strategy: ListStrategy) -> Option<&Value> {
    match strategy {
        ListStrategy::MergeByKey(key) => element.as_object().and_then(|m| m.get(key)),
        _ => Some(element),
    }
}

/// Handles `$setElementOrder/<field>`. Returns whether the field was merged here (so the main
/// loop must skip it).
fn merge_with_element_order(
    original: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    field: &str,
    order: &Value,
    path: &Path<'_>,
) -> Result<bool, PatchError> {
    if field.is_empty() {
        return Err(invalid(
            path,
            "$setElementOrder/ needs a field name after the slash",
        ));
    }
    let child = path.field(field);
    let Value::Array(order) = order else {
        return Err(invalid(
            &child,
            format!(
                "$setElementOrder/{field} must be a list, got {}",
                json_kind(order)
            ),
        ));
    };
    let strategy = list_strategy(path, field);
    if strategy == ListStrategy::Replace {
        // A replaced list takes the patch's order; there is nothing to reorder.
        return Ok(false);
    }
    let patch_list = match patch.get(field) {
        None => None,
        // The main loop deletes the list; ordering it is moot.
        Some(Value::Null) => return Ok(false),
        Some(Value::Array(p)) => Some(p),
        Some(other) => {
            return Err(invalid(
                &child,
                format!(
                    "must be a list when $setElementOrder/{field} is given, got {}",
                    json_kind(other)
                ),
            ));
        }
    };

    let mut order_ids: Vec<&Value> = Vec::with_capacity(order.len());
    for (i, element) in order.iter().enumerate() {
        match (strategy, element) {
            (ListStrategy::MergeByKey(key), Value::Object(m)) => match m.get(key) {
                Some(id) => order_ids.push(id),
                None => {
                    return Err(invalid(
                        &child,
                        format!("$setElementOrder/{field} element {i} has no merge key {key:?}"),
                    ));
                }
            },
            (ListStrategy::MergeByKey(key), other) => {
                return Err(invalid(
                    &child,
                    format!(
                        "$setElementOrder/{field} element {i} must be an object holding {key:?}, got {}",
                        json_kind(other)
                    ),
                ));
            }
            (_, Value::Object(_) | Value::Array(_)) => {
                return Err(invalid(
                    &child,
                    format!("$setElementOrder/{field} element {i} must be a plain value"),
                ));
            }
            (_, primitive) => order_ids.push(primitive),
        }
    }

    if let Some(patch_list) = patch_list {
        check_patch_follows_order(patch_list, &order_ids, strategy, field, &child)?;
    }

    let stored = match original.get_mut(field) {
        Some(Value::Array(stored)) => Some(std::mem::take(stored)),
        _ => None,
    };
    let stored_ids: Vec<Option<Value>> = stored
        .as_ref()
        .map(|s| s.iter().map(|e| identity(e, strategy).cloned()).collect())
        .unwrap_or_default();
    let (merged, server_ids) = match (stored, patch_list) {
        (None, None) => return Ok(false),
        (Some(stored), None) => (stored, stored_ids),
        (None, Some(p)) => (merge_list(Vec::new(), p, strategy, &child)?, stored_ids),
        (Some(stored), Some(p)) => {
            let merged = merge_list(stored, p, strategy, &child)?;
            let server_ids = match strategy {
                ListStrategy::MergeByKey(key) => go_aliased_stored_order(stored_ids, p, key),
                _ => stored_ids,
            };
            (merged, server_ids)
        }
    };
    let server_ids: Vec<Option<&Value>> = server_ids.iter().map(Option::as_ref).collect();
    let ordered = normalize_order(merged, &order_ids, &server_ids, strategy);
    original.insert(field.to_string(), Value::Array(ordered));
    Ok(true)
}

/// The stored order Kubernetes uses for `$setElementOrder`, including a Go slice aliasing effect
/// that decides where server-only elements go. Kubernetes reads that order from the stored list
/// *after* mergeSlice has edited its backing array in place: each `$patch: delete` shifts the
/// later elements left (`append(s[:k], s[k+1:]...)`), and each new element is then appended
/// into a slot freed that way, until the list is back to its stored length (the apiserver's
/// lists have capacity == length, so a further append reallocates and is not seen). Reproduced
/// so that a patch that deletes and adds elements next to server-only ones orders the list
/// exactly as Kubernetes does (checked against kubectl in tests/smp_vs_kubectl.rs).
fn go_aliased_stored_order(
    stored_ids: Vec<Option<Value>>,
    patch_list: &[Value],
    key: &str,
) -> Vec<Option<Value>> {
    let stored_len = stored_ids.len();
    let mut backing = stored_ids;
    let mut len = stored_len;
    let matches = |slot: &Option<Value>, id: &Value| slot.as_ref().is_some_and(|s| same_id(s, id));
    let directive = |e: &Value| {
        e.get(PATCH_DIRECTIVE)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    for element in patch_list {
        if directive(element).as_deref() != Some("delete") {
            continue;
        }
        let Some(id) = element.get(key) else { continue };
        while let Some(k) = backing[..len].iter().position(|slot| matches(slot, id)) {
            // Go's `copy` semantics: later elements move left by one; the slot past the new
            // length keeps whatever it held.
            for i in k..len - 1 {
                backing[i] = backing[i + 1].clone();
            }
            len -= 1;
        }
    }
    if patch_list
        .iter()
        .any(|e| directive(e).as_deref() == Some("replace"))
    {
        // The patch's elements become a new list; only the deletions touched the stored one.
        return backing;
    }
    for element in patch_list.iter().filter(|e| directive(e).is_none()) {
        let Some(id) = element.get(key) else { continue };
        if backing[..len].iter().any(|slot| matches(slot, id)) {
            continue;
        }
        if len == stored_len {
            break;
        }
        backing[len] = Some(id.clone());
        len += 1;
    }
    backing
}

/// The patch list's elements must appear in `$setElementOrder` and in the same relative order
/// (Kubernetes `validatePatchWithSetOrderList`); deletions are ignored.
fn check_patch_follows_order(
    patch_list: &[Value],
    order_ids: &[&Value],
    strategy: ListStrategy,
    field: &str,
    path: &Path<'_>,
) -> Result<(), PatchError> {
    // One walk over both lists, as Kubernetes does: each patch element must be found further on
    // in the order list than the previous one.
    let mut order = order_ids.iter();
    for element in patch_list {
        if element
            .as_object()
            .is_some_and(|m| m.contains_key(PATCH_DIRECTIVE))
        {
            continue;
        }
        let Some(id) = identity(element, strategy) else {
            // Reported with a better message by the merge itself.
            continue;
        };
        let wanted = id_key(id);
        if !order.any(|o| id_key(o) == wanted) {
            return Err(invalid(
                path,
                format!(
                    "element {id} of the patch list is missing from $setElementOrder/{field} or out of its order"
                ),
            ));
        }
    }
    Ok(())
}

/// Merges a stored list with a patch list under `strategy`.
fn merge_list(
    original: Vec<Value>,
    patch: &[Value],
    strategy: ListStrategy,
    path: &Path<'_>,
) -> Result<Vec<Value>, PatchError> {
    match strategy {
        ListStrategy::Replace => replace_list(patch, path),
        ListStrategy::MergePrimitives => merge_primitive_list(original, patch, path),
        ListStrategy::MergeByKey(key) => merge_keyed_list(original, patch, key, path),
    }
}

/// A list without a merge key: the patch's list is the result. A `{"$patch": "replace"}`
/// marker element is dropped (it asks for what happens anyway); other `$patch` elements cannot
/// apply. Object elements are new values, so their own directives are applied against nothing
/// and their nulls dropped, as for any new field (none may reach the stored object).
fn replace_list(patch: &[Value], path: &Path<'_>) -> Result<Vec<Value>, PatchError> {
    let mut out = Vec::with_capacity(patch.len());
    for (i, element) in patch.iter().enumerate() {
        let element_path = path.index(i);
        match element {
            Value::Object(m) => {
                if let Some(directive) = m.get(PATCH_DIRECTIVE) {
                    if directive.as_str() == Some("replace") && m.len() == 1 {
                        continue;
                    }
                    return Err(invalid(
                        &element_path,
                        format!(
                            "$patch {directive} needs a list with a merge key; this list is replaced whole, so send the complete list instead"
                        ),
                    ));
                }
                if let Some(fresh) = merge_map(Map::new(), m, &element_path)? {
                    out.push(Value::Object(fresh));
                }
            }
            Value::Array(inner) => out.push(Value::Array(replace_list(inner, &element_path)?)),
            other => out.push(other.clone()),
        }
    }
    Ok(out)
}

/// A primitive list with merge strategy (`metadata.finalizers`): set union.
fn merge_primitive_list(
    mut original: Vec<Value>,
    patch: &[Value],
    path: &Path<'_>,
) -> Result<Vec<Value>, PatchError> {
    if let Some(i) = patch.iter().position(|v| v.is_object() || v.is_array()) {
        return Err(invalid(
            &path.index(i),
            "this list holds plain values (strings), not objects or lists",
        ));
    }
    let server_order = original.clone();
    let mut present: HashSet<IdKey> = original.iter().map(id_key).collect();
    for value in patch {
        if present.insert(id_key(value)) {
            original.push(value.clone());
        }
    }
    let patch_ids: Vec<&Value> = patch.iter().collect();
    let server_ids: Vec<Option<&Value>> = server_order.iter().map(Some).collect();
    Ok(normalize_order(
        original,
        &patch_ids,
        &server_ids,
        ListStrategy::MergePrimitives,
    ))
}

/// A list of objects merged by `key`.
fn merge_keyed_list(
    mut original: Vec<Value>,
    patch: &[Value],
    key: &'static str,
    path: &Path<'_>,
) -> Result<Vec<Value>, PatchError> {
    if let Some(i) = original.iter().position(|v| !v.is_object()) {
        return Err(invalid(
            path,
            format!(
                "stored element {i} is not an object, so the list cannot merge by {key:?}; replace the whole list with a merge or json patch"
            ),
        ));
    }

    // First the special elements: deletions and the replace marker.
    let mut replace = false;
    let mut to_delete: HashSet<IdKey> = HashSet::new();
    let mut elements: Vec<(usize, &Map<String, Value>)> = Vec::with_capacity(patch.len());
    for (i, element) in patch.iter().enumerate() {
        let Value::Object(m) = element else {
            return Err(invalid(
                &path.index(i),
                format!(
                    "this list merges by {key:?}, so each element must be an object, got {}",
                    json_kind(element)
                ),
            ));
        };
        let Some(directive) = m.get(PATCH_DIRECTIVE) else {
            elements.push((i, m));
            continue;
        };
        match directive.as_str() {
            Some("delete") => {
                let Some(id) = m.get(key) else {
                    return Err(invalid(
                        &path.index(i),
                        format!(
                            "a $patch: delete element needs the merge key {key:?} to say which element to delete"
                        ),
                    ));
                };
                to_delete.insert(id_key(id));
            }
            Some("replace") => replace = true,
            Some("merge") => {
                return Err(invalid(
                    &path.index(i),
                    "$patch: merge is not supported in lists",
                ));
            }
            _ => {
                return Err(invalid(
                    &path.index(i),
                    format!(
                        "unknown $patch value {directive} in a list: use \"delete\" or \"replace\""
                    ),
                ));
            }
        }
    }

    if !to_delete.is_empty() {
        original.retain(|o| {
            !identity(o, ListStrategy::MergeByKey(key))
                .is_some_and(|id| to_delete.contains(&id_key(id)))
        });
    }

    if replace {
        // The list becomes exactly the patch's ordinary elements, in the patch's order.
        let mut out = Vec::with_capacity(elements.len());
        for (i, m) in elements {
            if let Some(m) = merge_map(Map::new(), m, &path.index(i))? {
                out.push(Value::Object(m));
            }
        }
        return Ok(out);
    }

    let strategy = ListStrategy::MergeByKey(key);
    let server_order: Vec<Value> = original
        .iter()
        .filter_map(|o| identity(o, strategy))
        .cloned()
        .collect();
    let mut stored_at = first_positions(server_order.iter().map(Some));
    let mut patch_ids: Vec<&Value> = Vec::with_capacity(elements.len());
    for (i, m) in elements {
        let element_path = path.index(i);
        let Some(id) = m.get(key) else {
            return Err(invalid(
                &element_path,
                format!("element has no merge key {key:?}; add it so the element can be matched"),
            ));
        };
        patch_ids.push(id);
        match stored_at.get(&id_key(id)).copied() {
            Some(pos) => {
                let stored = match original.get_mut(pos) {
                    Some(Value::Object(o)) => std::mem::take(o),
                    _ => Map::new(),
                };
                // `None` (delete) cannot come from an element without `$patch`; a Null
                // placeholder keeps the positions in `stored_at` valid and is dropped below.
                original[pos] =
                    merge_map(stored, m, &element_path)?.map_or(Value::Null, Value::Object);
            }
            None => {
                if let Some(fresh) = merge_map(Map::new(), m, &element_path)? {
                    stored_at.insert(id_key(id), original.len());
                    original.push(Value::Object(fresh));
                }
            }
        }
    }
    // Every stored element is an object (checked above), so Null is only a placeholder.
    original.retain(|v| !v.is_null());
    let server_ids: Vec<Option<&Value>> = server_order.iter().map(Some).collect();
    Ok(normalize_order(original, &patch_ids, &server_ids, strategy))
}

/// Kubernetes `normalizeElementOrder`: elements named in `patch_order` are sorted by it, the
/// others ("server-only") by `server_order`, then the two runs are interleaved by
/// [`merge_sorted`].
fn normalize_order(
    merged: Vec<Value>,
    patch_order: &[&Value],
    server_order: &[Option<&Value>],
    strategy: ListStrategy,
) -> Vec<Value> {
    let patch_index = first_positions(patch_order.iter().copied().map(Some));
    let server_index = first_positions(server_order.iter().copied());
    let mut patch_items: Vec<Ranked> = Vec::new();
    let mut server_only: Vec<Ranked> = Vec::new();
    for element in merged {
        let id = identity(&element, strategy).map(id_key);
        let in_server = id.as_ref().and_then(|id| server_index.get(id).copied());
        match id.as_ref().and_then(|id| patch_index.get(id).copied()) {
            Some(in_patch) => patch_items.push(Ranked {
                order: Some(in_patch),
                in_server,
                element,
            }),
            None => server_only.push(Ranked {
                order: in_server,
                in_server,
                element,
            }),
        }
    }
    // Stable sorts; an element not found sorts last and keeps its place among such elements.
    patch_items.sort_by_key(|r| r.order.unwrap_or(usize::MAX));
    server_only.sort_by_key(|r| r.order.unwrap_or(usize::MAX));
    merge_sorted(server_only, patch_items)
}

/// A list element with its sort position and its position in the stored list.
struct Ranked {
    order: Option<usize>,
    in_server: Option<usize>,
    element: Value,
}

/// Kubernetes `mergeSortedSlice`: walks both runs, taking the server-only element first only
/// when both elements are in the stored list and the server-only one came first there.
fn merge_sorted(server_only: Vec<Ranked>, patch_items: Vec<Ranked>) -> Vec<Value> {
    let mut out = Vec::with_capacity(server_only.len() + patch_items.len());
    let mut left = server_only.into_iter().peekable();
    let mut right = patch_items.into_iter().peekable();
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(l), Some(r)) => match (l.in_server, r.in_server) {
                (Some(li), Some(ri)) => li < ri,
                _ => false,
            },
        };
        let next = if take_left { left.next() } else { right.next() };
        if let Some(r) = next {
            out.push(r.element);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(original: Value, patch: Value) -> Value {
        strategic_merge_patch(&original, &patch).expect("patch applies")
    }

    #[test]
    fn maps_merge_recursively_and_null_deletes() {
        let got = smp(
            json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"replicas": 1}}),
            json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"paused": true, "gone": null}}),
        );
        assert_eq!(
            got,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"replicas": 1, "paused": true}})
        );
    }

    #[test]
    fn strategy_table_depends_on_field_and_place() {
        let root = Path::root();
        let spec = root.field("spec");
        assert_eq!(
            list_strategy(&spec, "ports"),
            ListStrategy::MergeByKey("port")
        );
        let containers = spec.field("containers");
        let c0 = containers.index(0);
        assert_eq!(
            list_strategy(&c0, "ports"),
            ListStrategy::MergeByKey("containerPort")
        );
        let ingress = spec.field("ingress");
        let rule = ingress.index(0);
        assert_eq!(list_strategy(&rule, "ports"), ListStrategy::Replace);
        assert_eq!(list_strategy(&c0, "env"), ListStrategy::MergeByKey("name"));
        assert_eq!(list_strategy(&c0, "envFrom"), ListStrategy::Replace);
        assert_eq!(list_strategy(&spec, "tolerations"), ListStrategy::Replace);
        let meta = root.field("metadata");
        assert_eq!(
            list_strategy(&meta, "finalizers"),
            ListStrategy::MergePrimitives
        );
        assert_eq!(list_strategy(&spec, "finalizers"), ListStrategy::Replace);
        assert_eq!(
            list_strategy(&meta, "ownerReferences"),
            ListStrategy::MergeByKey("uid")
        );
    }

    #[test]
    fn error_paths_name_the_place() {
        let err = strategic_merge_patch(
            &json!({"spec": {"containers": [{"name": "a"}]}}),
            &json!({"spec": {"containers": [{"name": "a"}, {"image": "x"}]}}),
        )
        .expect_err("missing merge key");
        assert_eq!(
            err.to_string(),
            "strategic merge patch at .spec.containers[1]: element has no merge key \"name\"; add it so the element can be matched"
        );
    }

    #[test]
    fn normalize_order_interleaves_server_only_elements_by_stored_position() {
        let (a, x, b, n) = (json!("a"), json!("x"), json!("b"), json!("new"));
        let server = [Some(&a), Some(&x), Some(&b)];
        let merged = vec![a.clone(), x.clone(), b.clone(), n.clone()];
        // Patch names b then a (and new): x stays before b because it was stored before b, and
        // "new", unknown to the stored list, is placed before what it cannot be compared with.
        let got = normalize_order(
            merged.clone(),
            &[&b, &a, &n],
            &server,
            ListStrategy::MergePrimitives,
        );
        assert_eq!(got, vec![x.clone(), b.clone(), a.clone(), n.clone()]);
        let got = normalize_order(
            merged,
            &[&n, &a, &b],
            &server,
            ListStrategy::MergePrimitives,
        );
        assert_eq!(got, vec![n.clone(), a.clone(), x.clone(), b.clone()]);
    }

    #[test]
    fn big_lists_merge_in_linear_time() {
        let n = 20_000;
        let stored: Vec<Value> = (0..n)
            .map(|i| json!({"name": format!("V{i}"), "value": "old"}))
            .collect();
        let patch: Vec<Value> = (0..n)
            .rev()
            .map(|i| json!({"name": format!("V{i}"), "value": "new"}))
            .collect();
        let started = std::time::Instant::now();
        let got = smp(json!({"env": stored}), json!({"env": patch}));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        let env = got["env"].as_array().expect("list");
        assert_eq!(env.len(), n);
        assert_eq!(
            env[0],
            json!({"name": format!("V{}", n - 1), "value": "new"})
        );
    }

    #[test]
    fn numbers_compare_like_go_float64() {
        assert!(same_id(&json!(80), &json!(80.0)));
        assert!(!same_id(&json!(80), &json!("80")));
    }
}
