//! Shared harness for the end-to-end tests: start the real `skiff` binary, drive it with real
//! kubectl, and stop it by the PID we started.
#![allow(dead_code)]

pub mod cluster;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Whether a missing prerequisite must fail the test (CI) or may skip it (a developer's machine).
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Returns false (and prints why) when the test should be skipped; panics in CI.
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("CI=true and {what} is missing: this test must run in CI");
    }
    eprintln!("skipping: {what} is missing (outside CI this test may skip)");
    false
}

/// The real kubectl 1.32 binary (not the version-picking wrapper).
pub fn kubectl_path() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from("/usr/lib/google-cloud-sdk/bin/kubectl.1.32"),
        PathBuf::from("/usr/local/bin/kubectl.1.32"),
        PathBuf::from("/usr/bin/kubectl.1.32"),
    ];
    candidates.into_iter().find(|p| p.exists())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A `skiff server` process on loopback with its own data directory.
pub struct Server {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub port: u16,
    pub extra_args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start(extra_args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("data");
        let mut server = Server {
            child: None,
            data_dir,
            port: free_port(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            _tmp: Some(tmp),
        };
        server.spawn();
        server
    }

    /// (Re)starts the process on the same data directory and port.
    pub fn spawn(&mut self) {
        // A restart rewrites the kubeconfig once it listens: wait for the new one, not the old.
        let _ = std::fs::remove_file(self.kubeconfig());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("server log file");
        let child = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .arg("server")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--bind")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn skiff server");
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join("admin.kubeconfig")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("skiff server exited early with {status}:\n{}", self.log());
                }
            }
            if self.kubeconfig().exists()
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("skiff server did not become ready in 60 s:\n{}", self.log());
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the PID we spawned and still own (not yet reaped).
            unsafe { libc_kill(child.id() as i32, 15) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Real kubectl with a fresh HOME and discovery cache, pointed at one server.
pub struct Kubectl {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    pub home: tempfile::TempDir,
}

impl Kubectl {
    pub fn new(bin: PathBuf, kubeconfig: &Path) -> Kubectl {
        Kubectl { bin, kubeconfig: kubeconfig.to_path_buf(), home: tempfile::tempdir().expect("home") }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("HOME", self.home.path())
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.home.path().join("cache"))
            .args(args);
        cmd
    }

    pub fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut cmd = self.command(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubectl");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("kubectl output")
    }

    /// Runs kubectl and returns stdout; panics with both streams when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run_with_stdin(args, None);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "kubectl {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
        stdout
    }

    /// Runs kubectl expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run_with_stdin(args, None);
        assert!(!out.status.success(), "kubectl {args:?} should have failed but printed:\n{}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["-o", "json"]);
        let text = self.ok(&full);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("kubectl {args:?} -o json gave bad JSON ({e}):\n{text}"))
    }
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

