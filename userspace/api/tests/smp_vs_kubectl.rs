//! Randomized differential test: skiff's strategic merge patch against the real one in kubectl
//! 1.32 (`kubectl patch --local`) on generated Deployments and generated patches of the shapes
//! kubectl apply/patch send: keyed lists (containers, env, container ports) with merges, new
//! elements, `$patch: delete` elements and `$setElementOrder`, the finalizers set with
//! `$deleteFromPrimitiveList`, labels with nulls. Deterministic: case N uses seed N, printed on
//! a disagreement.

mod common;

use serde_json::{Map, Value, json};
use skiff_api::patch::strategic_merge_patch;

/// SplitMix64: small, deterministic, good enough to pick test shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }

    /// A random subset of `pool` in random order.
    fn subset<T: Clone>(&mut self, pool: &[T]) -> Vec<T> {
        let mut picked: Vec<T> = pool.iter().filter(|_| self.chance(60)).cloned().collect();
        self.shuffle(&mut picked);
        picked
    }
}

const CONTAINERS: &[&str] = &["a", "b", "c", "d"];
const ENV: &[&str] = &["E1", "E2", "E3", "E4", "E5"];
const PORTS: &[u64] = &[80, 443, 8080];
const FINALIZERS: &[&str] = &["x.io/f1", "x.io/f2", "x.io/f3"];

fn original(rng: &mut Rng) -> Value {
    let containers: Vec<Value> = rng
        .subset(CONTAINERS)
        .into_iter()
        .map(|name| {
            let mut c = Map::new();
            c.insert("name".into(), json!(name));
            c.insert("image".into(), json!("img:0"));
            let env: Vec<Value> = rng
                .subset(ENV)
                .into_iter()
                .map(|e| json!({"name": e, "value": rng.below(10).to_string()}))
                .collect();
            if !env.is_empty() {
                c.insert("env".into(), Value::Array(env));
            }
            let ports: Vec<Value> = rng
                .subset(PORTS)
                .into_iter()
                .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
                .collect();
            if !ports.is_empty() {
                c.insert("ports".into(), Value::Array(ports));
            }
            Value::Object(c)
        })
        .collect();
    let mut metadata = json!({"name": "web", "labels": {"app": "web", "x": "1"}});
    let finalizers = rng.subset(FINALIZERS);
    if !finalizers.is_empty() {
        metadata["finalizers"] = json!(finalizers);
    }
    let strategy = match rng.below(3) {
        0 => json!({"type": "Recreate"}),
        1 => {
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}})
        }
        _ => Value::Null,
    };
    let mut deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": containers}}
        }
    });
    if !strategy.is_null() {
        deployment["spec"]["strategy"] = strategy;
    }
    deployment
}

/// A patch of a keyed list as kubectl would build it: returns the `$setElementOrder` list (if
/// any) and the patch list. Elements named in the order list appear in that order; deletions
/// name elements outside it. No `{"$patch": "replace"}` elements: Kubernetes then stores the
/// other elements verbatim, directives included, where skiff applies them (a deliberate
/// difference; patch_cases.rs covers replace).
fn keyed_list_patch(
    rng: &mut Rng,
    pool: &[Value],
    key: &str,
    mut element: impl FnMut(&mut Rng, &Value) -> Value,
) -> (Option<Vec<Value>>, Vec<Value>) {
    let order = rng.subset(pool);
    let mut items: Vec<Value> = Vec::new();
    for id in &order {
        if rng.chance(60) {
            items.push(element(rng, id));
        }
    }
    let use_order = rng.chance(50);
    if !use_order {
        rng.shuffle(&mut items);
    }
    for id in pool.iter().filter(|id| !order.contains(id)) {
        if rng.chance(30) {
            let at = rng.below(items.len() + 1);
            items.insert(at, json!({"$patch": "delete", key: id}));
        }
    }
    let order = use_order.then(|| order.iter().map(|id| json!({key: id})).collect());
    (order, items)
}

fn patch(rng: &mut Rng, original: &Value) -> Value {
    let stored: Vec<Value> = original["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(|cs| cs.iter().map(|c| c["name"].clone()).collect())
        .unwrap_or_default();
    let pool: Vec<Value> = CONTAINERS.iter().map(|n| json!(n)).collect();
    let env_pool: Vec<Value> = ENV.iter().map(|e| json!(e)).collect();
    let port_pool: Vec<Value> = PORTS.iter().map(|p| json!(p)).collect();
    let (order, containers) = keyed_list_patch(rng, &pool, "name", |rng, name| {
        let mut c = Map::new();
        c.insert("name".into(), name.clone());
        if rng.chance(50) {
            c.insert("image".into(), json!(format!("img:{}", rng.below(5))));
        }
        // Directives inside a brand-new element are not generated: Kubernetes copies a new
        // element verbatim (directives included) where skiff applies them; that difference is
        // deliberate and documented.
        let existing = stored.contains(name);
        if rng.chance(60) {
            let (env_order, env) = keyed_list_patch(rng, &env_pool, "name", |rng, e| {
                if rng.chance(20) {
                    json!({"name": e, "value": null, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
                } else {
                    json!({"name": e, "value": format!("v{}", rng.below(10))})
                }
            });
            let env_has_directive = env.iter().any(|e| e.get("$patch").is_some());
            if existing || (env_order.is_none() && !env_has_directive) {
                if let Some(env_order) = env_order {
                    c.insert("$setElementOrder/env".into(), Value::Array(env_order));
                }
                c.insert("env".into(), Value::Array(env));
            }
        }
        if rng.chance(40) {
            let (port_order, ports) = keyed_list_patch(
                rng,
                &port_pool,
                "containerPort",
                |rng, p| json!({"containerPort": p, "name": format!("p{}", rng.below(3))}),
            );
            let has_directive = ports.iter().any(|p| p.get("$patch").is_some());
            if existing || (port_order.is_none() && !has_directive) {
                if let Some(port_order) = port_order {
                    c.insert("$setElementOrder/ports".into(), Value::Array(port_order));
                }
                c.insert("ports".into(), Value::Array(ports));
            }
        }
        Value::Object(c)
    });
    let mut spec = Map::new();
    if let Some(order) = order {
        spec.insert("$setElementOrder/containers".into(), Value::Array(order));
    }
    if !containers.is_empty() || rng.chance(20) {
        spec.insert("containers".into(), Value::Array(containers));
    }

    let mut metadata = Map::new();
    metadata.insert(
        "labels".into(),
        json!({"x": if rng.chance(50) { Value::Null } else { json!("2") }, "y": "3"}),
    );
    if rng.chance(60) {
        let order = rng.subset(FINALIZERS);
        let added: Vec<&str> = order.iter().copied().filter(|_| rng.chance(50)).collect();
        let removed: Vec<&str> = FINALIZERS
            .iter()
            .copied()
            .filter(|f| !order.contains(f) && rng.chance(40))
            .collect();
        if rng.chance(50) {
            metadata.insert("$setElementOrder/finalizers".into(), json!(order));
        }
        if !added.is_empty() {
            metadata.insert("finalizers".into(), json!(added));
        }
        if !removed.is_empty() {
            metadata.insert("$deleteFromPrimitiveList/finalizers".into(), json!(removed));
        }
    }
    let mut patch = json!({"metadata": metadata, "spec": {"template": {"spec": spec}}});
    // What kubectl apply sends when the file switches the rollout strategy (the live object
    // always has one: the apiserver defaults it). Kubernetes would store `$retainKeys` itself
    // in a field that did not exist; skiff applies it (a deliberate difference).
    let has_strategy = original["spec"].get("strategy").is_some();
    match if has_strategy { rng.below(4) } else { 3 } {
        0 => {
            patch["spec"]["strategy"] =
                json!({"$retainKeys": ["type"], "rollingUpdate": null, "type": "Recreate"})
        }
        1 => {
            patch["spec"]["strategy"] = json!({
                "$retainKeys": ["rollingUpdate", "type"],
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": rng.below(3), "maxUnavailable": null}
            })
        }
        _ => {}
    }
    patch
}

#[test]
fn random_strategic_merge_patches_agree_with_kubectl() {
    let Some(kubectl) =
        common::kubectl_or_skip("random_strategic_merge_patches_agree_with_kubectl")
    else {
        return;
    };
    let cases: u64 = std::env::var("SKIFF_SMP_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(60);
    let dir = std::env::temp_dir().join(format!("skiff-smp-random-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("object.json");
    let (mut compared, mut kubectl_rejected) = (0, 0);
    let mut disagreements = Vec::new();
    for seed in 0..cases {
        let mut rng = Rng(seed);
        let original = original(&mut rng);
        let patch = patch(&mut rng, &original);
        let ours = strategic_merge_patch(&original, &patch);
        match common::kubectl_strategic_patch(&kubectl, &file, &original, &patch) {
            Ok(theirs) => {
                compared += 1;
                match ours {
                    Ok(ours) if common::without_nulls(&ours) == common::without_nulls(&theirs) => {}
                    Ok(ours) => disagreements.push(format!(
                        "seed {seed}\noriginal: {original}\npatch:    {patch}\nkubectl:  {}\nskiff:    {}",
                        common::without_nulls(&theirs),
                        common::without_nulls(&ours)
                    )),
                    Err(e) => disagreements.push(format!(
                        "seed {seed}: skiff rejects what kubectl accepts: {e}\noriginal: {original}\npatch:    {patch}"
                    )),
                }
            }
            Err(theirs) => {
                kubectl_rejected += 1;
                if let Ok(ours) = ours {
                    eprintln!(
                        "seed {seed}: kubectl rejects ({}), skiff accepts\noriginal: {original}\npatch:    {patch}\nskiff:    {ours}",
                        theirs.trim()
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "compared {compared} generated patches with kubectl ({kubectl_rejected} rejected by kubectl)"
    );
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n\n"));
    assert!(
        compared * 2 >= cases,
        "most generated patches should be valid ({compared} of {cases})"
    );
}
