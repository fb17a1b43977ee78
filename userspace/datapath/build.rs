//! Builds the eBPF programs (ebpf/programs) with nightly for bpfel-unknown-none and leaves the
//! object at $OUT_DIR/datapath, where src/lib.rs embeds it with include_bytes_aligned!, so the
//! workspace's normal `cargo build` produces one binary that carries the datapath.
//!
//! Hand-written rather than aya-build: aya-build 0.2.0 would add a dependency that must be pinned
//! (0.2.1 wants Rust 1.98) and it cannot say what exactly is missing on this toolchain.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const HOW_TO_FIX: &str = "run scripts/setup.sh as root (it installs the nightly toolchain, \
    `rustup component add rust-src --toolchain nightly` and \
    `cargo install bpf-linker --version 0.10.3 --locked`)";

fn fail(what: &str) -> ! {
    // A panic in build.rs prints the message and stops the build: the clearest way to say it.
    panic!("\n\nskiff-datapath: cannot build the eBPF programs: {what}\nto fix: {HOW_TO_FIX}\n\n");
}

/// Runs a command without the variables the outer cargo sets for its own rustc, which would
/// otherwise leak into the nested nightly build (wrong compiler, wrong flags).
fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "CARGO",
        "CARGO_MANIFEST_DIR",
        "CARGO_PKG_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "TARGET",
        "HOST",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
    ] {
        cmd.env_remove(var);
    }
    // Any CARGO_CFG_*/CARGO_FEATURE_* describe the host build, not the eBPF one.
    for (k, _) in env::vars() {
        if k.starts_with("CARGO_CFG_") || k.starts_with("CARGO_FEATURE_") || k.starts_with("DEP_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn check_toolchain() {
    let nightly = clean_command("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    match nightly {
        Ok(o) if o.status.success() => {}
        Ok(_) => {
            fail("the nightly Rust toolchain is not installed (rustup toolchain install nightly)")
        }
        Err(e) => fail(&format!("rustup not found ({e})")),
    }
    let src = clean_command("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output();
    match src {
        Ok(o)
            if String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src")) => {}
        _ => fail(
            "the rust-src component of nightly is missing (rustup component add rust-src --toolchain nightly)",
        ),
    }
    match clean_command("bpf-linker").arg("--version").output() {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("0.10.3") => {}
        Ok(o) => fail(&format!(
            "bpf-linker 0.10.3 is required (it loads nightly's own LLVM), found `{}`",
            String::from_utf8_lossy(&o.stdout).trim()
        )),
        Err(_) => {
            fail("bpf-linker is not on PATH (cargo install bpf-linker --version 0.10.3 --locked)")
        }
    }
}

fn rerun_if_changed_dir(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name == "target" {
                continue;
            }
            if path.is_dir() {
                rerun_if_changed_dir(&path);
            } else {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ebpf_root = manifest_dir.join("../../ebpf");
    let programs = ebpf_root.join("programs");
    rerun_if_changed_dir(&programs);
    rerun_if_changed_dir(&ebpf_root.join("common"));
    println!("cargo:rerun-if-env-changed=PATH");

    check_toolchain();

    // A target dir of its own: the outer cargo holds the workspace target dir's lock. It sits
    // at the root of the workspace's target dir (the ancestor holding cargo's CACHEDIR.TAG) so
    // check/test/release builds share one eBPF build instead of ~35 s each; OUT_DIR otherwise.
    let target_dir = out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(|t| t.join("skiff-ebpf"))
        .unwrap_or_else(|| out_dir.join("ebpf-target"));
    let status = clean_command("cargo")
        .current_dir(&programs)
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!(
            "`cargo +nightly build` of ebpf/programs failed ({s}); see the compiler output above. If the \
             error comes from bpf-linker or LLVM, the nightly may have moved to an LLVM that \
             bpf-linker 0.10.3 cannot read"
        )),
        Err(e) => fail(&format!("cannot run cargo +nightly: {e}")),
    }
    let object = target_dir.join("bpfel-unknown-none/release/datapath");
    if let Err(e) = std::fs::copy(&object, out_dir.join("datapath")) {
        fail(&format!(
            "the build did not produce {}: {e}",
            object.display()
        ));
    }
}
