//! The Service benchmark harness at tiny scale (100 Services, ~1 s per path): it builds its labs,
//! every path answers every workload, and the record, markdown and charts come out well formed.
//! Needs root, netns, eBPF, iptables and nft: under CI=true a missing piece fails the test.

use std::{path::Path, process::Command};

fn privileged(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        missing.push("bpffs");
    }
    for tool in ["iptables-legacy-restore", "iptables-nft-restore", "nft", "nsenter", "ip"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            missing.push(tool);
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: this test must run, not skip)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {msg}");
    false
}

#[test]
fn tiny_run_produces_a_complete_record() {
    if !privileged("tiny_run_produces_a_complete_record") {
        return;
    }
    let out = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_svcbench"))
        .args(["run", "--scales", "100", "--duration-ms", "200"])
        // No interleaved rounds: thousands of extra pod-IP connections before the skiff-tc run
        // made its CRR lose an exchange once in two runs (reported to the datapath owner as a
        // suspected tc conntrack issue with reused client ports); this test is the harness's.
        .args(["--program-services", "100", "--no-profile", "--interleave-rounds", "0", "--stem", "tiny", "--out"])
        .arg(out.path())
        .spawn()
        .expect("running svcbench");
    let pid = child.id();
    let status = child.wait().expect("waiting for svcbench");
    assert!(status.success(), "svcbench failed: {status}");

    let json = std::fs::read_to_string(out.path().join("tiny.json")).expect("record");
    let r: serde_json::Value = serde_json::from_str(&json).expect("well-formed JSON");
    for key in ["command", "date", "machine", "paths", "programming", "targets"] {
        assert!(!r[key].is_null(), "record has {key}");
    }
    assert!(r["machine"]["nproc"].as_u64().unwrap_or(0) >= 1);
    assert!(!r["machine"]["kernel"].as_str().unwrap_or("").is_empty());

    let expected = [
        "direct", "np-direct", "skiff-direct", "skiff-sock", "skiff-tc", "np-skiff-xdp",
        "iptables-legacy", "np-iptables-legacy", "iptables-nft", "np-iptables-nft", "nftables",
        "np-nftables",
    ];
    let paths = r["paths"].as_array().expect("paths");
    for name in expected {
        let p = paths
            .iter()
            .find(|p| p["path"] == name)
            .unwrap_or_else(|| panic!("path {name} missing"));
        assert!(p["error"].is_null(), "{name}: {}", p["error"]);
        let ms = p["measurements"].as_array().expect("measurements");
        assert_eq!(ms.len(), 5, "{name}: every workload measured");
        for m in ms {
            let wl = m["workload"].as_str().unwrap_or("?");
            let ok = m["transactions"].as_u64().unwrap_or(0);
            let errors = m["errors"].as_u64().unwrap_or(u64::MAX);
            assert!(ok > 0, "{name} {wl}: no answer ({})", m["first_error"]);
            // A UDP reply may be lost now and then; TCP workloads must be clean.
            if wl == "udp_rr" {
                assert!(errors * 100 <= ok, "{name} {wl}: {errors} errors of {ok}");
            } else {
                assert_eq!(errors, 0, "{name} {wl}: {}", m["first_error"]);
            }
            if wl == "stream" {
                assert!(m["gbit_s"].as_f64().unwrap_or(0.0) > 0.0, "{name} stream");
            } else {
                assert!(m["p99_us"].as_f64().unwrap_or(0.0) >= m["p50_us"].as_f64().unwrap_or(1.0));
            }
        }
    }
    let steps = r["programming"]["steps"].as_array().expect("programming steps");
    for (system, step) in [
        ("skiff", "full"),
        ("skiff", "one-endpoint"),
        ("iptables-legacy", "full"),
        ("iptables-legacy", "one-endpoint-full-restore"),
        ("iptables-nft", "one-endpoint-partial"),
        ("nftables", "full"),
        ("nftables", "one-endpoint"),
    ] {
        let s = steps
            .iter()
            .find(|s| s["system"] == system && s["step"] == step)
            .unwrap_or_else(|| panic!("{system} {step} missing"));
        assert!(s["error"].is_null(), "{system} {step}: {}", s["error"]);
        assert!(s["seconds"].as_f64().unwrap_or(-1.0) > 0.0);
    }
    let targets = r["targets"].as_array().expect("targets");
    assert!(targets.len() >= 10, "every target judged");
    assert!(targets.iter().all(|t| t["met"].is_boolean()), "every target measured: {targets:?}");

    let md = std::fs::read_to_string(out.path().join("tiny.md")).expect("markdown");
    assert!(md.contains("## Targets") && md.contains("| skiff-sock |"));
    let svg = std::fs::read_to_string(out.path().join("tiny-clusterip-crr_x4.svg")).expect("chart");
    assert!(svg.starts_with("<svg") && svg.contains("skiff-sock"));

    // Nothing of the labs is left behind (lab names carry the harness's pid).
    let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns");
    let left = String::from_utf8_lossy(&netns.stdout);
    let tag = format!("-{pid}-");
    assert!(!left.lines().any(|l| l.contains(&tag)), "namespaces left: {left}");
    assert!(!Path::new(&format!("/sys/fs/bpf/skiff-test/sk-svb-sk-{pid}")).exists());
}
