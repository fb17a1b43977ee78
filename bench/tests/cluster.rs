//! `svcbench cluster` at tiny size: a 2-node `skiff up` cluster (debug binaries), one scale
//! 2 -> 3 and one apply of a 3-replica Deployment, each measured until the new endpoints answer
//! through the ClusterIP; the record and markdown come out complete and the lab is gone after.
//! Needs root, runc, kubectl 1.32 and eBPF: under CI=true a missing piece fails the test. It
//! takes the e2e cluster lock, so it waits for other engineers' `skiff up` tests.

use std::path::{Path, PathBuf};
use std::process::Command;

fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn kubectl() -> Option<PathBuf> {
    ["/usr/lib/google-cloud-sdk/bin/kubectl.1.32", "/usr/local/bin/kubectl.1.32", "/usr/bin/kubectl.1.32"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn ready(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        missing.push("bpffs");
    }
    for tool in ["runc", "ip", "nsenter"] {
        if !have(tool) {
            missing.push(tool);
        }
    }
    if kubectl().is_none() {
        missing.push("kubectl 1.32");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: this test must run, not skip)");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// skiff, skiff-cni and skiff-shim beside svcbench (`cargo test --workspace` builds them; a lone
/// `cargo test -p skiff-bench` does not).
fn skiff_binaries() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_svcbench")).parent().expect("bin dir").to_path_buf();
    if !["skiff", "skiff-cni", "skiff-shim"].iter().all(|b| dir.join(b).is_file()) {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--bins", "-p", "skiff", "-p", "skiff-cni", "-p", "skiff-runtime"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().expect("cargo build").success(), "building skiff, skiff-cni, skiff-shim");
    }
    dir.join("skiff")
}

fn echo_image() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = root.join("target/images/skiff-echo-1.0.oci.tar");
    let status = Command::new("bash").arg(root.join("scripts/build-image.sh")).arg(&out).status().expect("build-image.sh");
    assert!(status.success(), "scripts/build-image.sh failed");
    out
}

#[test]
fn tiny_cluster_run_times_scale_and_apply() {
    if !ready("tiny_cluster_run_times_scale_and_apply") {
        return;
    }
    let skiff = skiff_binaries();
    let image = echo_image();
    let out = tempfile::tempdir().expect("tempdir");
    let status = Command::new(env!("CARGO_BIN_EXE_svcbench"))
        .args(["cluster", "--nodes", "2", "--scale-trials", "1", "--scale-from", "2"])
        .args(["--apply-trials", "1", "--apply-replicas", "3", "--trial-timeout-s", "120", "--stem", "tiny"])
        .arg("--skiff")
        .arg(&skiff)
        .arg("--image")
        .arg(&image)
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("running svcbench cluster");
    assert!(status.success(), "svcbench cluster failed: {status}");

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("tiny.json")).expect("record")).expect("JSON");
    for key in ["command", "date", "machine", "skiff_binary", "cluster", "scenarios"] {
        assert!(!r[key].is_null(), "record has {key}");
    }
    assert!(r["skiff_binary"].as_str().unwrap_or("").contains("debug build"), "{}", r["skiff_binary"]);
    assert!(r["up_s"].as_f64().unwrap_or(0.0) > 0.0, "skiff up was timed");
    let scenarios = r["scenarios"].as_array().expect("scenarios");
    for (name, before, after) in [("scale", 2, 3), ("apply", 0, 3)] {
        let sc = scenarios.iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("scenario {name}"));
        assert_eq!((sc["replicas_before"].as_u64(), sc["replicas_after"].as_u64()), (Some(before), Some(after)));
        let trials = sc["trials"].as_array().expect("trials");
        assert_eq!(trials.len(), 1, "{name}: one trial");
        let t = &trials[0];
        assert!(t["error"].is_null(), "{name}: {}", t["error"]);
        let at = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("{name}: {k} missing: {t}"));
        // Causality on one clock: skiff programs only ready endpoints, so nothing new answers
        // before the API saw it Ready, and kubectl's write came first.
        assert!(at("kubectl_returned_s") > 0.0);
        assert!(at("pods_ready_s") > 0.0 && at("endpoints_ready_s") > 0.0);
        assert!(at("answering_s") >= at("pods_ready_s"), "{name}: answered before Ready: {t}");
        assert!(t["answered"].as_u64().unwrap_or(0) >= (after - before), "{name}: every new pod answered: {t}");
        let stats = sc["stats"].as_array().expect("stats");
        assert!(stats.iter().any(|s| s["metric"].as_str().unwrap_or("").starts_with("datapath lag")), "{name}: lag");
    }
    let md = std::fs::read_to_string(out.path().join("tiny.md")).expect("markdown");
    assert!(md.contains("## scale: 2 -> 3 replicas") && md.contains("## apply: 0 -> 3 replicas"), "{md}");

    // The lab is gone: no namespace of ours, no pins.
    let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns");
    let left = String::from_utf8_lossy(&netns.stdout);
    assert!(!left.lines().any(|l| l.starts_with("skbench-")), "namespaces left: {left}");
    assert!(!Path::new("/sys/fs/bpf/skiff/skbench-node-1").exists(), "pins left");
}
