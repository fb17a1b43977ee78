//! Helpers for the tests that compare skiff's strategic merge patch with the real one in kubectl.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The kubectl 1.32 binary: `SKIFF_KUBECTL`, else the version-specific binary these machines
/// install, else `kubectl.1.32` on PATH. (The `/usr/bin/kubectl` wrapper asks a server for its
/// version first, so it is not used.)
pub fn kubectl_1_32() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("SKIFF_KUBECTL") {
        return Some(path.into());
    }
    let installed = std::path::PathBuf::from("/usr/lib/google-cloud-sdk/bin/kubectl.1.32");
    if installed.is_file() {
        return Some(installed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("kubectl.1.32"))
            .find(|p| p.is_file())
    })
}

/// Kubernetes keeps `null` members inside list elements it appends; skiff drops them (they
/// mean "unset" either way). Compare without nulls.
pub fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// kubectl 1.32, or `None` after printing why the calling test skips; under CI=true a missing
/// kubectl is a failure instead.
pub fn kubectl_or_skip(test: &str) -> Option<PathBuf> {
    match kubectl_1_32() {
        Some(k) => Some(k),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "{test}: kubectl 1.32 not found: install it or set SKIFF_KUBECTL (CI=true forbids skipping)"
            )
        }
        None => {
            eprintln!("skipping {test}: kubectl 1.32 not found (set SKIFF_KUBECTL)");
            None
        }
    }
}

/// Runs `kubectl patch --local --type strategic` (k8s.io/apimachinery's strategicpatch with the
/// Go types' merge keys) on `original` written to `file`. `Err` holds kubectl's stderr.
pub fn kubectl_strategic_patch(
    kubectl: &Path,
    file: &Path,
    original: &Value,
    patch: &Value,
) -> Result<Value, String> {
    kubectl_patch(kubectl, file, "strategic", original, patch)
}

/// Runs `kubectl patch --local --type <patch_type>` (strategic, merge or json) on `original`
/// written to `file`. `Err` holds kubectl's stderr.
pub fn kubectl_patch(
    kubectl: &Path,
    file: &Path,
    patch_type: &str,
    original: &Value,
    patch: &Value,
) -> Result<Value, String> {
    std::fs::write(file, original.to_string())
        .map_err(|e| format!("write {}: {e}", file.display()))?;
    let home = file.parent().unwrap_or(Path::new("/tmp"));
    let output = std::process::Command::new(kubectl)
        .args(["patch", "--local", "--type", patch_type, "-o", "json", "-f"])
        .arg(file)
        .arg("-p")
        .arg(patch.to_string())
        .env("HOME", home)
        .env("KUBECONFIG", "/dev/null")
        .output()
        .map_err(|e| format!("run {}: {e}", kubectl.display()))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("kubectl printed no json: {e}"))
}
