//! A `skiff up` cluster for end-to-end tests, and ways to send traffic from inside its pods.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn geteuid() -> u32 {
    unsafe extern "C" {
        pub fn geteuid() -> u32;
    }
    // SAFETY: no preconditions.
    unsafe { geteuid() }
}

pub fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// The echo image archive, built once by the project's script.
pub fn echo_image() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("target/images/skiff-echo-1.0.oci.tar");
    let status = Command::new("bash").arg(root.join("scripts/build-image.sh")).arg(&out).status().expect("run build-image.sh");
    assert!(status.success(), "scripts/build-image.sh failed");
    out
}

/// `skiff up` installs skiff-cni and runs skiff-shim from beside the skiff binary: build them
/// when this test runs alone (`cargo test --workspace` builds them anyway).
pub fn ensure_sibling_binaries() {
    let dir = Path::new(env!("CARGO_BIN_EXE_skiff")).parent().expect("bin dir").to_path_buf();
    if dir.join("skiff-cni").is_file() && dir.join("skiff-shim").is_file() {
        return;
    }
    let release = dir.ends_with("release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--bins", "-p", "skiff-cni", "-p", "skiff-runtime"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building skiff-cni and skiff-shim failed");
}

/// The parts of lab.json the tests read.
#[derive(serde::Deserialize, Clone, Debug)]
pub struct Lab {
    pub nodes: Vec<LabNode>,
    pub kubeconfig: String,
}

#[derive(serde::Deserialize, Clone, Debug)]
pub struct LabNode {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub data_dir: String,
    pub pin_dir: String,
    pub agent_pid: Option<u32>,
}

/// A `skiff up` cluster, taken down (and checked clean) on drop.
pub struct Cluster {
    /// Held while the cluster exists: clusters on one machine share the root namespace's
    /// blackhole and pod routes, so test processes take turns (the lock goes with the process).
    _turn: std::fs::File,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    downed: bool,
}

impl Cluster {
    pub fn up(nodes: u32, image: &Path) -> Cluster {
        Cluster::up_with(nodes, image, &[])
    }

    /// `skiff up` with extra flags (e.g. `--server-arg=...`).
    pub fn up_with(nodes: u32, image: &Path, extra: &[&str]) -> Cluster {
        let turn = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open("/run/lock/skiff-e2e-cluster.lock").expect("lock file");
        // SAFETY: flock on a file we opened; blocks until another test's cluster is down.
        unsafe {
            unsafe extern "C" {
                fn flock(fd: i32, op: i32) -> i32;
            }
            assert_eq!(flock(turn.as_raw_fd(), 2), 0, "flock");
        }
        let dir = tempfile::Builder::new().prefix("skiff-up-test").tempdir().expect("tempdir");
        let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["up", "--nodes", &nodes.to_string(), "--name", "skt", "--lab-net", "77", "--restart-backoff", "1", "--data-dir"])
            .arg(dir.path())
            .arg("--image")
            .arg(image)
            .args(extra)
            .output()
            .expect("run skiff up");
        let c = Cluster { _turn: turn, kubeconfig: dir.path().join("server/admin.kubeconfig"), dir, downed: false };
        assert!(
            out.status.success(),
            "skiff up failed:\n{}\n{}\nserver log:\n{}\nagent logs:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(c.dir.path().join("server.log")).unwrap_or_default(),
            c.agent_logs()
        );
        c
    }

    /// What `skiff up` recorded (lab.json).
    pub fn lab(&self) -> Lab {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("lab.json")).expect("lab.json")).expect("lab.json parses")
    }

    pub fn agent_logs(&self) -> String {
        let mut s = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path().join("nodes")) {
            for e in rd.flatten() {
                let log = std::fs::read_to_string(e.path().join("agent.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                s.push_str(&format!("--- {}\n{}\n", e.path().display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
            }
        }
        s
    }

    pub fn down(&mut self) -> String {
        self.downed = true;
        let out = Command::new(env!("CARGO_BIN_EXE_skiff")).args(["down", "--data-dir"]).arg(self.dir.path()).output().expect("run skiff down");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "skiff down failed:\n{text}");
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.downed {
            let _ = Command::new(env!("CARGO_BIN_EXE_skiff")).args(["down", "--data-dir"]).arg(self.dir.path()).output();
        }
    }
}

/// Runs `f` on a thread inside the network namespace at `netns`.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(netns).expect("open netns");
            // SAFETY: a valid netns fd, for this thread only.
            assert_eq!(unsafe { libc_setns(file.as_raw_fd(), 0x4000_0000) }, 0, "setns {}", netns.display());
            f()
        })
        .join()
        .expect("netns thread")
    })
}

unsafe fn libc_setns(fd: i32, nstype: i32) -> i32 {
    unsafe extern "C" {
        fn setns(fd: i32, nstype: i32) -> i32;
    }
    unsafe { setns(fd, nstype) }
}

/// One line from the echo server's TCP port: `<hostname> <pod-ip>`.
pub fn ask(dst: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}


/// The echo workload most e2e tests start from: namespace `e2e`, a Deployment `echo` of
/// `replicas` (HTTP :8080 with a readiness probe, TCP :9000) and a ClusterIP Service `echo` on
/// port 9000.
pub fn echo_workload(replicas: u32) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: e2e}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: e2e}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      containers:
      - name: echo
        image: skiff/echo:1.0
        ports: [{{name: http, containerPort: 8080}}, {{name: tcp, containerPort: 9000}}]
        readinessProbe:
          httpGet: {{path: /healthz, port: http}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: e2e}}
spec:
  selector: {{app: echo}}
  ports:
  - {{name: tcp, port: 9000, targetPort: tcp}}
"#
    )
}

/// A `skiff server` whose data directory is `data_dir` itself (for example a small filesystem a
/// fault test mounted), not a fresh temporary one. Its log goes beside it (`<data_dir>.log`),
/// outside that filesystem. Lives here, a child module of the harness, because it fills in the
/// harness's private fields.
pub fn server_in(data_dir: &Path, extra_args: &[&str]) -> super::Server {
    let mut server = super::Server {
        child: None,
        data_dir: data_dir.to_path_buf(),
        port: super::free_port(),
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        _tmp: None,
    };
    server.spawn();
    server
}
