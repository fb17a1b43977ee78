//! Running a private containerd (Debian 12's 1.6 package) for one node: its config, started in
//! the node's network namespace, images imported with `ctr`, and taken down again by the PIDs
//! it and its shims recorded. Used by `skiff up --runtime cri` and the CRI tests.
//!
//! Everything lives under one directory (root, state, sockets, runc's state): two nodes' daemons
//! on one machine share nothing but the kernel. The config is the one that works on these
//! machines (see the project's runtimes reference): overlayfs, runc with cgroupfs
//! (`SystemdCgroup = false`), the locally built pause image as `sandbox_image`, CNI from the
//! node's own folders, and `restrict_oom_score_adj` (no CAP_SYS_RESOURCE here: without it the
//! pause container cannot be given a negative oom_score_adj and RunPodSandbox fails).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pause image `scripts/build-pause-image.sh` builds.
pub const PAUSE_IMAGE: &str = "docker.io/skiff/pause:1.0";
/// containerd's namespace for CRI objects.
pub const CRI_NAMESPACE: &str = "k8s.io";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{what}: {source}")]
    Io { what: String, #[source] source: std::io::Error },
    #[error("containerd did not answer on {socket} within {secs} s (see {log})")]
    NotReady { socket: String, secs: u64, log: String },
    #[error("containerd exited: {0}")]
    Exited(String),
    #[error("ctr {args}: {message}")]
    Ctr { args: String, message: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerdError {
    let what = what.into();
    move |source| ContainerdError::Io { what, source }
}

/// Where one containerd keeps everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerdPaths {
    pub dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub sandbox_image: String,
}

impl ContainerdPaths {
    pub fn new(dir: &Path, cni_bin_dir: &Path, cni_conf_dir: &Path) -> ContainerdPaths {
        ContainerdPaths {
            dir: dir.to_path_buf(),
            cni_bin_dir: cni_bin_dir.to_path_buf(),
            cni_conf_dir: cni_conf_dir.to_path_buf(),
            sandbox_image: PAUSE_IMAGE.into(),
        }
    }
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
    /// `unix:///.../containerd.sock`, for `skiff agent --cri-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }
    /// runc's own state (default /run/containerd/runc, shared by every daemon): kept here.
    pub fn runc_root(&self) -> PathBuf {
        self.state().join("runc")
    }

    /// containerd's config.toml (version 2, as 1.6 reads it).
    pub fn config_toml(&self) -> String {
        let q = |p: &Path| toml_string(&p.display().to_string());
        format!(
            r#"# Written by skiff: a private containerd for one node (see skiff_runtime::cri::containerd).
version = 2
root = {root}
state = {state}
# Plugins that would reach outside this folder or are useless here.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {sandbox}
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = {runc_root}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {cni_bin}
    conf_dir = {cni_conf}
    max_conf_num = 1
"#,
            root = q(&self.root()),
            state = q(&self.state()),
            socket = q(&self.socket()),
            ttrpc = q(&self.dir.join("containerd.sock.ttrpc")),
            sandbox = toml_string(&self.sandbox_image),
            runc_root = q(&self.runc_root()),
            cni_bin = q(&self.cni_bin_dir),
            cni_conf = q(&self.cni_conf_dir),
        )
    }

    /// Writes the config and makes the folders containerd and its CNI config need.
    pub fn prepare(&self) -> Result<(), ContainerdError> {
        for d in [self.root(), self.state(), self.cni_conf_dir.clone(), self.cni_bin_dir.clone()] {
            std::fs::create_dir_all(&d).map_err(io(format!("creating {}", d.display())))?;
        }
        std::fs::write(self.config_file(), self.config_toml()).map_err(io(format!("writing {}", self.config_file().display())))
    }

    /// The PIDs of the shims this containerd started (one per sandbox), from their pid files.
    pub fn shim_pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let tasks = self.state().join("io.containerd.runtime.v2.task");
        for ns in read_dirs(&tasks) {
            for task in read_dirs(&ns) {
                if let Ok(s) = std::fs::read_to_string(task.join("shim.pid"))
                    && let Ok(pid) = s.trim().parse::<u32>()
                {
                    out.push(pid);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

fn read_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect()).unwrap_or_default()
}

/// A TOML basic string (quotes and backslashes escaped).
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Starts `containerd --config <dir>/config.toml`, in the network namespace `/run/netns/<netns>`
/// when given (so CNI's host-side veths and the pods' routes land in the node, not the machine),
/// logging to `<dir>/containerd.log`. `detach`: own session, so it outlives the caller.
pub fn spawn(paths: &ContainerdPaths, netns: Option<&str>, detach: bool) -> Result<Child, ContainerdError> {
    paths.prepare()?;
    let log = File::create(paths.log_file()).map_err(io(format!("creating {}", paths.log_file().display())))?;
    let err = log.try_clone().map_err(io("dup log"))?;
    let mut cmd = Command::new("containerd");
    cmd.arg("--config").arg(paths.config_file()).stdin(Stdio::null()).stdout(log).stderr(err);
    let ns_file = match netns {
        Some(n) => Some(File::open(Path::new("/run/netns").join(n)).map_err(io(format!("opening /run/netns/{n}")))?),
        None => None,
    };
    let ns_fd = ns_file.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: setns and setsid are async-signal-safe; the fd stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if detach {
                libc::setsid();
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(io("starting containerd (apt-get install containerd)"))?;
    drop(ns_file);
    Ok(child)
}

/// Waits until containerd's CRI plugin answers on its socket (or `pid` exits).
pub fn wait_ready(paths: &ContainerdPaths, pid: u32, timeout: Duration) -> Result<super::CriRuntime, ContainerdError> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        if !alive(pid) {
            return Err(ContainerdError::Exited(format!("see {}: {}", paths.log_file().display(), tail(&paths.log_file(), 5))));
        }
        if paths.socket().exists() {
            match super::CriRuntime::connect(&paths.endpoint()) {
                Ok(c) => return Ok(c),
                Err(e) => last = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(ContainerdError::NotReady {
        socket: paths.socket().display().to_string(),
        secs: timeout.as_secs(),
        log: format!("{}; last error: {last}", paths.log_file().display()),
    })
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `ctr -n k8s.io images import ARCHIVE` against this containerd (OCI or docker archives),
/// bounded to two minutes.
pub fn import_image(paths: &ContainerdPaths, archive: &Path) -> Result<(), ContainerdError> {
    let args = format!("images import {}", archive.display());
    let out = Command::new("timeout")
        .arg("120")
        .arg("ctr")
        .arg("--address")
        .arg(paths.socket())
        .args(["-n", CRI_NAMESPACE, "images", "import"])
        .arg(archive)
        .output()
        .map_err(io("running ctr (apt-get install containerd)"))?;
    if !out.status.success() {
        return Err(ContainerdError::Ctr { args, message: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_string() });
    }
    Ok(())
}

pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

/// Whether `pid` still runs `name` (a PID may be reused after the process is gone).
fn runs(pid: u32, name: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).next().is_some_and(|argv0| argv0.ends_with(name.as_bytes())))
}

/// SIGTERM, up to `grace`, then SIGKILL: for a PID this module's caller started.
fn stop_pid(pid: u32, grace: Duration) {
    // SAFETY: signalling a PID we started (checked by its command line first).
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let start = Instant::now();
    while alive(pid) && start.elapsed() < grace {
        // Reap it when it is our child; harmless otherwise.
        unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let start = Instant::now();
        while alive(pid) && start.elapsed() < Duration::from_secs(5) {
            unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stops the containerd at `pid` and then any shim it left (they outlive the daemon by design),
/// each by its recorded PID and only while it still runs containerd's binaries. Call after the
/// sandboxes were removed through CRI; this is the backstop.
pub fn stop(paths: &ContainerdPaths, pid: Option<u32>) {
    let shims = paths.shim_pids();
    if let Some(pid) = pid
        && runs(pid, "containerd")
    {
        stop_pid(pid, Duration::from_secs(10));
    }
    for shim in shims {
        if runs(shim, "containerd-shim-runc-v2") {
            stop_pid(shim, Duration::from_secs(5));
        }
    }
}

/// Removes everything under `paths.dir` after [`stop`]: lazy unmounts first (rootfs overlays,
/// sandbox shm), then the files.
pub fn remove_all(paths: &ContainerdPaths) {
    unmount_under(&paths.dir);
    let _ = std::fs::remove_dir_all(&paths.dir);
    // The shims' socket folder is fixed (its names hash the daemon's address); these go only
    // when empty, so a system containerd's live files are never touched.
    let _ = std::fs::remove_dir("/run/containerd/s");
    // `ctr tasks exec` keeps its fifos here (one folder per exec, removed when it ends).
    let _ = std::fs::remove_dir("/run/containerd/fifo");
    let _ = std::fs::remove_dir("/run/containerd");
}

/// Lazily unmounts anything still mounted under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Mounts under `dir` still present (for "left nothing behind" checks).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_everything_under_the_node_folder_and_restricts_oom_score_adj() {
        let p = ContainerdPaths::new(Path::new("/var/lib/n1/containerd"), Path::new("/opt/x/bin"), Path::new("/var/lib/n1/cni \"conf\""));
        let t = p.config_toml();
        assert!(t.contains("root = \"/var/lib/n1/containerd/root\""), "{t}");
        assert!(t.contains("address = \"/var/lib/n1/containerd/containerd.sock\""), "{t}");
        assert!(t.contains("restrict_oom_score_adj = true"));
        assert!(t.contains("SystemdCgroup = false"));
        assert!(t.contains("snapshotter = \"overlayfs\""));
        assert!(t.contains("sandbox_image = \"docker.io/skiff/pause:1.0\""));
        assert!(t.contains("bin_dir = \"/opt/x/bin\""));
        assert!(t.contains(r#"conf_dir = "/var/lib/n1/cni \"conf\"""#), "{t}");
        assert!(t.contains("Root = \"/var/lib/n1/containerd/state/runc\""));
        assert_eq!(p.endpoint(), "unix:///var/lib/n1/containerd/containerd.sock");
    }

    #[test]
    fn shim_pids_come_from_the_task_folders() {
        let d = tempfile::tempdir().expect("tmp");
        let p = ContainerdPaths::new(d.path(), Path::new("/b"), Path::new("/c"));
        assert!(p.shim_pids().is_empty());
        for (id, pid) in [("a", "11"), ("b", "12\n"), ("c", "x")] {
            let t = p.state().join("io.containerd.runtime.v2.task/k8s.io").join(id);
            std::fs::create_dir_all(&t).expect("mkdir");
            std::fs::write(t.join("shim.pid"), pid).expect("write");
        }
        assert_eq!(p.shim_pids(), vec![11, 12]);
    }
}
