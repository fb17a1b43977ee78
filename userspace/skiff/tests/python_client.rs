//! The Python `kubernetes` client (what many users script with) against a real skiff server.

mod common;

use common::*;

#[test]
fn python_client_creates_lists_patches_and_watches() {
    let has_client = std::process::Command::new("python3")
        .args(["-c", "import kubernetes"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !require("python3 with the kubernetes package (pip install kubernetes)", has_client) {
        return;
    }
    let server = Server::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client_check.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .env("KUBECONFIG", server.kubeconfig())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python client checks failed:\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}
