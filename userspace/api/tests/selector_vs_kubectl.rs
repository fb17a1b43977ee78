//! Differential test: skiff's label selector parser accepts exactly the strings Kubernetes'
//! `labels.Parse` accepts, as kubectl 1.32 runs it in `kubectl set selector --local`.
//! Deterministic generated strings (seed = case number) plus hand-picked tricky ones.

mod common;

use std::path::Path;

use skiff_api::selector::LabelSelector;

/// Whether kubectl's parser accepts `selector`. `set selector` parses with `labels.Parse` and
/// then refuses, for a Service, what is not a plain `key=value` list: those refusals still mean
/// the string parsed.
fn kubectl_parses(kubectl: &Path, service: &Path, selector: &str) -> bool {
    let output = std::process::Command::new(kubectl)
        .args(["set", "selector", "--local", "-o", "json", "-f"])
        .arg(service)
        .arg("--")
        .arg(selector)
        .env("HOME", service.parent().unwrap_or(Path::new("/tmp")))
        .env("KUBECONFIG", "/dev/null")
        .output()
        .expect("run kubectl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success()
        || stderr.contains("not supported on this object")
        || stderr.contains("isn't supported in label selectors")
        || stderr.contains("is not a valid label selector operator")
    {
        true
    } else if stderr.contains("couldn't parse the selector string") {
        false
    } else {
        panic!("unexpected kubectl answer for {selector:?}: {stderr}");
    }
}

const TOKENS: &[&str] = &[
    "a",
    "b",
    "x1",
    "app",
    "in",
    "notin",
    "(",
    ")",
    ",",
    "=",
    "==",
    "!=",
    "!",
    " ",
    ">",
    "<",
    "5",
    "-",
    "A/b",
    "k8s.io/x",
    "_",
    ".",
    "a.b",
    "tier in (fe, be)",
];

fn generated(seed: u64) -> String {
    // SplitMix64, as in smp_vs_kubectl.rs.
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let count = 1 + (next() % 6) as usize;
    (0..count)
        .map(|_| TOKENS[(next() % TOKENS.len() as u64) as usize])
        .collect()
}

#[test]
fn label_selector_parser_accepts_what_kubernetes_accepts() {
    let Some(kubectl) =
        common::kubectl_or_skip("label_selector_parser_accepts_what_kubernetes_accepts")
    else {
        return;
    };
    let dir =
        std::env::temp_dir().join(format!("skiff-selector-vs-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let service = dir.join("svc.json");
    std::fs::write(
        &service,
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"s"},"spec":{"selector":{"app":"web"},"ports":[{"port":80}]}}"#,
    )
    .expect("write service");

    let cases: u64 = std::env::var("SKIFF_SELECTOR_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(80);
    let mut inputs: Vec<String> = [
        "a=b",
        "a==b",
        "a!=b",
        "a",
        "!a",
        "a in (x,y)",
        "a notin (x)",
        "a in ()",
        "a in (,)",
        "a in (x,)",
        "a=",
        "!a=b",
        "a,,b",
        "a=b=c",
        "a in (",
        "=b",
        "x>1",
        "x<1",
        "x>a",
        "A.b/c=d",
        "a/b/c=d",
        "k8s.io/app=web",
        "a=b,",
        ",a",
        "a in (b c)",
        "a=-b",
        "a=b-",
        "a b",
        "in=x",
        "notin in (a)",
        "a in(x)",
        "a=(",
        "  a  =  b  ",
        "a!b",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    inputs.extend((0..cases).map(generated));
    inputs.retain(|s| !s.trim().is_empty());

    let mut disagreements = Vec::new();
    for input in &inputs {
        let theirs = kubectl_parses(&kubectl, &service, input);
        let ours = LabelSelector::parse(input);
        if theirs != ours.is_ok() {
            disagreements.push(format!(
                "{input:?}: kubectl accepts={theirs}, skiff={ours:?}"
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}
