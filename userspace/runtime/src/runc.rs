//! Containers as OCI bundles run by the runc CLI.
//!
//! State dir layout (default `/run/skiff/runc`, caller-chosen):
//! - `runc/`: runc's own `--root`;
//! - `containers/<id>/`: the bundle (`config.json`, `rootfs/` = an overlay of the image rootfs with
//!   `upper/` and `work/`, or a copy when overlay is refused), `meta.json` (what was asked),
//!   `started` (start time), `exit.json` (written by the shim), `shim.log`.
//!
//! A `Runc` keeps no state in memory: a new one over the same dir (an agent restart) sees every
//! container through `list` and `state`, and the per-container shim keeps logging and records the
//! exit meanwhile (see `shim.rs`).

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder,
    MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};
use serde::{Deserialize, Serialize};

use crate::images::{ImageConfig, ImageStore};
use crate::shim::{ExitRecord, ShimArgs};
use crate::{ImageError, RuntimeError};

pub type ContainerId = String;

/// A bind mount into the container (volumes, /etc/hosts, /etc/resolv.conf, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    pub read_only: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub memory_limit_bytes: Option<i64>,
    /// cgroup v1 cpu.shares (Kubernetes: milliCPU * 1024 / 1000, min 2); runc maps it to v2 weight.
    pub cpu_shares: Option<u64>,
    /// CFS quota and period in microseconds (Kubernetes: limit milliCPU * period / 1000).
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub pids_limit: Option<i64>,
}

/// What the agent asks for. `command`/`args` follow Kubernetes: `command` replaces the image's
/// entrypoint, `args` its cmd.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerConfig {
    pub pod_uid: String,
    pub pod_name: String,
    pub pod_namespace: String,
    /// The container's name in the pod spec.
    pub name: String,
    /// Restart count, so the agent can tell attempts apart after a restart.
    pub attempt: u32,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// Added to (and overriding) the image's env, in order.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// The pod's network namespace (`/run/netns/<name>`); None: a new, empty one.
    pub netns: Option<PathBuf>,
    /// The UTS hostname (the pod name, as kubelet sets it).
    pub hostname: String,
    pub mounts: Vec<BindMount>,
    pub resources: Resources,
    /// The CRI-format log file the shim appends to (the agent owns it: `remove` leaves it).
    pub log_path: PathBuf,
    /// cgroupfs parent, e.g. `/skiff/pod<uid>`; the container's cgroup is `<parent>/<id>`.
    pub cgroup_parent: String,
    /// Clamped to >= this process's own value (no CAP_SYS_RESOURCE to lower it).
    pub oom_score_adj: Option<i32>,
    /// Overrides the image's USER.
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    Running { pid: i32, started_at: Option<String> },
    Exited { exit_code: i32, signal: Option<i32>, oom_killed: bool, started_at: Option<String>, finished_at: String },
    /// Not known here, or runc lost it.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: ContainerId,
    pub config: ContainerConfig,
    /// The manifest digest of the image the container runs.
    pub image_digest: String,
    pub created_at: String,
}

/// A process started by `exec`: pipes on `child` (stdin, stdout, stderr) without a tty; with one,
/// `pty` is the terminal's master side (read and write it) and `child`'s stdio is the terminal.
pub struct ExecProcess {
    pub child: Child,
    pub pty: Option<File>,
}

impl ExecProcess {
    /// Waits for the process; its exit code (128+signal if killed).
    pub fn wait(&mut self) -> io::Result<i32> {
        let status = self.child.wait()?;
        Ok(status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        }))
    }

    /// Sets the terminal size (no-op without a tty).
    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        let Some(pty) = &self.pty else { return Ok(()) };
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ on a pty master we own, with a valid winsize.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The runtime interface the agent drives. Blocking: call from `spawn_blocking`.
pub trait PodRuntime: Send + Sync {
    fn create_container(&self, config: &ContainerConfig) -> Result<ContainerId, RuntimeError>;
    fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// Sends the stop signal (the image's STOPSIGNAL, else SIGTERM), waits up to `grace`, then
    /// SIGKILL; returns once the container has exited.
    fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
    fn state(&self, id: &str) -> Result<ContainerState, RuntimeError>;
    /// Kills if needed and removes the container and its bundle (not its log file).
    fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    fn exec(&self, id: &str, argv: &[String], tty: bool) -> Result<ExecProcess, RuntimeError>;
    fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError>;
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    id: String,
    config: ContainerConfig,
    image_digest: String,
    created_at: String,
    rootfs_overlay: bool,
    stop_signal: String,
    cgroups_path: String,
}

#[derive(Clone, Debug)]
pub struct RuncOptions {
    pub state_dir: PathBuf,
    /// The runc binary (default: `runc` on PATH).
    pub runc: PathBuf,
    /// The shim command and the arguments that come before the shim's own (see `default_shim`).
    pub shim: PathBuf,
    pub shim_args: Vec<std::ffi::OsString>,
}

impl RuncOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let (shim, shim_args) = default_shim();
        RuncOptions { state_dir: state_dir.into(), runc: PathBuf::from("runc"), shim, shim_args }
    }
}

/// The shim to spawn: `skiff-shim` next to the running binary (cargo's target/debug/, or an
/// install dir); else, when the running binary is `skiff`, its hidden `runtime-shim` subcommand
/// (one binary to install); else `skiff-shim` on PATH.
pub fn default_shim() -> (PathBuf, Vec<std::ffi::OsString>) {
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join("skiff-shim");
            if p.is_file() {
                return (p, Vec::new());
            }
        }
        if exe.file_name().is_some_and(|n| n == "skiff") {
            return (exe, vec!["runtime-shim".into()]);
        }
    }
    (PathBuf::from("skiff-shim"), Vec::new())
}

pub struct Runc {
    opts: RuncOptions,
    images: ImageStore,
}

const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> RuntimeError {
    let context = context.into();
    move |source| RuntimeError::Io { context, source }
}

fn valid_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if ok { Ok(()) } else { Err(RuntimeError::InvalidConfig(format!("container id {id:?}"))) }
}

/// Kubernetes' rule: command replaces the entrypoint, args replace cmd; args alone keep the
/// entrypoint; neither: entrypoint + cmd.
pub fn effective_argv(image: &ImageConfig, command: &[String], args: &[String]) -> Vec<String> {
    match (command.is_empty(), args.is_empty()) {
        (false, _) => command.iter().chain(args).cloned().collect(),
        (true, false) => image.entrypoint.iter().chain(args).cloned().collect(),
        (true, true) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
    }
}

/// Image env, then container env; a later KEY replaces an earlier one in place.
pub fn merged_env(image: &[String], container: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: &str| match out.iter_mut().find(|(ek, _)| ek == k) {
        Some(e) => e.1 = v.to_string(),
        None => out.push((k.to_string(), v.to_string())),
    };
    for e in image {
        let (k, v) = e.split_once('=').unwrap_or((e, ""));
        put(k, v);
    }
    for (k, v) in container {
        put(k, v);
    }
    if !out.iter().any(|(k, _)| k == "PATH") {
        out.insert(0, ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()));
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Resolves an image USER (`uid`, `uid:gid`, `name`, `name:group`) against the rootfs's
/// /etc/passwd and /etc/group.
pub fn resolve_user(rootfs: &Path, user: Option<&str>) -> Result<(u32, u32), RuntimeError> {
    let Some(user) = user.filter(|u| !u.is_empty()) else { return Ok((0, 0)) };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = fs::read_to_string(rootfs.join(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name) && f.len() > 3).then(|| (f[2].parse().ok(), f[3].parse().ok()))
                .and_then(|(a, b)| Some((a?, b.unwrap_or(0))))
        })
    };
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(uid) => (uid, lookup_uid_gid(rootfs, uid).unwrap_or(0)),
        Err(_) => lookup("etc/passwd", u).ok_or_else(|| RuntimeError::InvalidConfig(format!("user {u:?} not in the image's /etc/passwd")))?,
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("etc/group", g).map(|(gid, _)| gid).ok_or_else(|| RuntimeError::InvalidConfig(format!("group {g:?} not in the image's /etc/group")))?,
        };
    }
    Ok((uid, gid))
}

fn lookup_uid_gid(rootfs: &Path, uid: u32) -> Option<u32> {
    let text = fs::read_to_string(rootfs.join("etc/passwd")).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[3].parse().ok()).flatten()
    })
}

fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim().trim_start_matches("SIG").to_ascii_uppercase();
    Some(match n.as_str() {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "WINCH" => libc::SIGWINCH,
        "STOP" => libc::SIGSTOP,
        other => other.parse().ok()?,
    })
}

fn is_cgroup_v2_unified() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

fn memory_cgroup_dir(cgroups_path: &str) -> PathBuf {
    let rel = cgroups_path.trim_start_matches('/');
    if is_cgroup_v2_unified() {
        Path::new("/sys/fs/cgroup").join(rel)
    } else {
        Path::new("/sys/fs/cgroup/memory").join(rel)
    }
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn current_nofile_hard() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    r.rlim_max
}

fn own_oom_score_adj() -> i32 {
    fs::read_to_string("/proc/self/oom_score_adj").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn mount_overlay(lower: &Path, upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let opts = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"));
    let (src, tgt, fstype, data) = (c(b"overlay")?, c(target.as_os_str().as_bytes())?, c(b"overlay")?, c(opts.as_bytes())?);
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fstype.as_ptr(), 0, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unmount(target: &Path) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    if let Ok(t) = CString::new(target.as_os_str().as_bytes()) {
        // SAFETY: valid C string. MNT_DETACH: a process still holding it cannot block removal.
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

fn is_mountpoint(p: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = p.to_string_lossy();
    text.lines().any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

impl Runc {
    pub fn new(opts: RuncOptions, images: ImageStore) -> Result<Self, RuntimeError> {
        for sub in ["runc", "containers"] {
            let p = opts.state_dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
        }
        Ok(Runc { opts, images })
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.opts.state_dir.join("containers").join(id)
    }

    fn runc(&self) -> Command {
        let mut c = Command::new(&self.opts.runc);
        c.arg("--root").arg(self.opts.state_dir.join("runc"));
        c
    }

    fn runc_run(&self, args: &[&str]) -> Result<String, RuntimeError> {
        let out = self
            .runc()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running {}", self.opts.runc.display())))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(RuntimeError::Runc { command: args.join(" "), message: String::from_utf8_lossy(&out.stderr).trim().to_string() })
        }
    }

    fn meta(&self, id: &str) -> Result<Meta, RuntimeError> {
        valid_id(id)?;
        let p = self.dir(id).join("meta.json");
        let bytes = fs::read(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound { RuntimeError::NotFound(id.to_string()) } else { io_err(format!("reading {}", p.display()))(e) }
        })?;
        serde_json::from_slice(&bytes).map_err(|e| RuntimeError::InvalidConfig(format!("{}: {e}", p.display())))
    }

    /// Manifest digests of the images existing containers run (for `ImageStore::gc`).
    pub fn images_in_use(&self) -> Result<HashSet<String>, RuntimeError> {
        Ok(self.list()?.into_iter().map(|c| c.image_digest).collect())
    }

    fn build_spec(&self, id: &str, cfg: &ContainerConfig, image: &ImageConfig, rootfs: &Path) -> Result<(Spec, String, String), RuntimeError> {
        let bad = |e: oci_spec::OciSpecError| RuntimeError::InvalidConfig(e.to_string());
        let argv = effective_argv(image, &cfg.command, &cfg.args);
        if argv.is_empty() {
            return Err(RuntimeError::InvalidConfig(format!("container {:?}: no command, and the image has no entrypoint or cmd", cfg.name)));
        }
        let (mut uid, mut gid) = resolve_user(rootfs, image.user.as_deref())?;
        if let Some(u) = cfg.run_as_user {
            uid = u;
            gid = lookup_uid_gid(rootfs, u).unwrap_or(gid);
        }
        if let Some(g) = cfg.run_as_group {
            gid = g;
        }
        let cwd = cfg.working_dir.clone().or_else(|| image.working_dir.clone()).unwrap_or_else(|| "/".into());
        if !cwd.starts_with('/') {
            return Err(RuntimeError::InvalidConfig(format!("working dir {cwd:?} is not absolute")));
        }
        let caps: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
        let capabilities = LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .build()
            .map_err(bad)?;
        // No CAP_SYS_RESOURCE here (and commonly in nested containers): never ask for more than
        // the current hard limit, or runc's setrlimit fails the container.
        let nofile = current_nofile_hard().min(1_048_576);
        let requested_oom = cfg.oom_score_adj.unwrap_or(0);
        let oom = requested_oom.max(0).max(own_oom_score_adj()).min(1000);
        if oom != requested_oom && cfg.oom_score_adj.is_some() {
            tracing::info!(id, requested = requested_oom, used = oom, "oom_score_adj clamped: lowering it needs CAP_SYS_RESOURCE");
        }
        let process = ProcessBuilder::default()
            .terminal(false)
            .user(UserBuilder::default().uid(uid).gid(gid).build().map_err(bad)?)
            .args(argv)
            .env(merged_env(&image.env, &cfg.env))
            .cwd(cwd)
            .capabilities(capabilities)
            .rlimits(vec![PosixRlimitBuilder::default().typ(PosixRlimitType::RlimitNofile).hard(nofile).soft(nofile).build().map_err(bad)?])
            .no_new_privileges(false)
            .oom_score_adj(oom)
            .build()
            .map_err(bad)?;

        // proc, /dev tmpfs (runc adds the standard device nodes), devpts, shm, mqueue, sysfs (ro),
        // cgroup (ro).
        let mut mounts = oci_spec::runtime::get_default_mounts();
        for m in &cfg.mounts {
            if !m.container_path.is_absolute() {
                return Err(RuntimeError::InvalidConfig(format!("mount target {} is not absolute", m.container_path.display())));
            }
            if !m.host_path.exists() {
                return Err(RuntimeError::InvalidConfig(format!("mount source {} does not exist", m.host_path.display())));
            }
            let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
            options.push(if m.read_only { "ro" } else { "rw" }.to_string());
            mounts.push(
                MountBuilder::default()
                    .destination(&m.container_path)
                    .typ("bind")
                    .source(&m.host_path)
                    .options(options)
                    .build()
                    .map_err(bad)?,
            );
        }

        let mut namespaces = Vec::new();
        for typ in [LinuxNamespaceType::Pid, LinuxNamespaceType::Ipc, LinuxNamespaceType::Uts, LinuxNamespaceType::Mount] {
            namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build().map_err(bad)?);
        }
        let mut net = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
        if let Some(p) = &cfg.netns {
            if !p.exists() {
                return Err(RuntimeError::InvalidConfig(format!("network namespace {} does not exist", p.display())));
            }
            net = net.path(p);
        }
        namespaces.push(net.build().map_err(bad)?);

        let r = &cfg.resources;
        let mut memory = LinuxMemoryBuilder::default();
        if let Some(limit) = r.memory_limit_bytes {
            // swap = limit: no swap beyond memory, as kubelet sets it.
            memory = memory.limit(limit).swap(limit);
        }
        let mut cpu = LinuxCpuBuilder::default();
        if let Some(s) = r.cpu_shares {
            cpu = cpu.shares(s);
        }
        if let Some(q) = r.cpu_quota {
            cpu = cpu.quota(q);
        }
        if let Some(p) = r.cpu_period {
            cpu = cpu.period(p);
        }
        let mut resources = LinuxResourcesBuilder::default()
            .devices(vec![LinuxDeviceCgroupBuilder::default().allow(false).access("rwm").build().map_err(bad)?])
            .memory(memory.build().map_err(bad)?)
            .cpu(cpu.build().map_err(bad)?);
        if let Some(p) = r.pids_limit {
            resources = resources.pids(LinuxPidsBuilder::default().limit(p).build().map_err(bad)?);
        }
        let parent = if cfg.cgroup_parent.is_empty() { "/skiff".to_string() } else { cfg.cgroup_parent.clone() };
        if !parent.starts_with('/') || parent.contains("..") {
            return Err(RuntimeError::InvalidConfig(format!("cgroup parent {parent:?} must be an absolute cgroupfs path")));
        }
        let cgroups_path = format!("{}/{id}", parent.trim_end_matches('/'));
        let linux = LinuxBuilder::default()
            .namespaces(namespaces)
            .resources(resources.build().map_err(bad)?)
            .cgroups_path(PathBuf::from(&cgroups_path))
            .masked_paths(oci_spec::runtime::get_default_maskedpaths())
            .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
            .build()
            .map_err(bad)?;
        let mut spec = Spec::default();
        spec.set_process(Some(process))
            .set_root(Some(RootBuilder::default().path("rootfs").readonly(false).build().map_err(bad)?))
            .set_hostname(Some(if cfg.hostname.is_empty() { id.to_string() } else { cfg.hostname.clone() }))
            .set_mounts(Some(mounts))
            .set_linux(Some(linux));
        let stop_signal = image.stop_signal.clone().unwrap_or_else(|| "SIGTERM".into());
        Ok((spec, cgroups_path, stop_signal))
    }

    fn cleanup_failed_create(&self, id: &str) {
        let _ = self.runc_run(&["delete", "--force", id]);
        let dir = self.dir(id);
        unmount(&dir.join("rootfs"));
        let _ = fs::remove_dir_all(&dir);
    }

    fn create_inner(&self, id: &str, cfg: &ContainerConfig) -> Result<(), RuntimeError> {
        let image = self.images.resolve(&cfg.image)?;
        let dir = self.dir(id);
        let rootfs = dir.join("rootfs");
        let upper = dir.join("upper");
        let work = dir.join("work");
        for d in [&rootfs, &upper, &work] {
            fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        let (spec, cgroups_path, stop_signal) = self.build_spec(id, cfg, &image.config, &image.rootfs)?;
        let overlay = match mount_overlay(&image.rootfs, &upper, &work, &rootfs) {
            Ok(()) => true,
            Err(e) => {
                // e.g. a state dir on overlayfs or a filesystem without d_type: copy instead.
                tracing::warn!(id, error = %e, "overlay mount refused; copying the image rootfs");
                let st = Command::new("cp")
                    .arg("-a")
                    .arg(format!("{}/.", image.rootfs.display()))
                    .arg(&rootfs)
                    .status()
                    .map_err(io_err("running cp -a"))?;
                if !st.success() {
                    return Err(RuntimeError::Io { context: "copying the image rootfs".into(), source: io::Error::other(format!("cp -a: {st}")) });
                }
                false
            }
        };
        spec.save(dir.join("config.json")).map_err(|e| RuntimeError::InvalidConfig(format!("writing config.json: {e}")))?;
        let meta = Meta {
            id: id.to_string(),
            config: cfg.clone(),
            image_digest: image.manifest_digest.clone(),
            created_at: now_rfc3339(),
            rootfs_overlay: overlay,
            stop_signal,
            cgroups_path: cgroups_path.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&meta).map_err(|e| RuntimeError::InvalidConfig(e.to_string()))?;
        fs::write(dir.join("meta.json"), bytes).map_err(io_err("writing meta.json"))?;
        if let Some(parent) = cfg.log_path.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
        }

        let shim_args = ShimArgs {
            id: id.to_string(),
            bundle: dir.clone(),
            runc: self.opts.runc.clone(),
            runc_root: self.opts.state_dir.join("runc"),
            log: cfg.log_path.clone(),
            exit_file: dir.join("exit.json"),
            pid_file: dir.join("pid"),
            memory_cgroup: Some(memory_cgroup_dir(&cgroups_path)),
        };
        let shim_log = File::create(dir.join("shim.log")).map_err(io_err("creating shim.log"))?;
        let out = Command::new(&self.opts.shim)
            .args(&self.opts.shim_args)
            .args(shim_args.to_args())
            .stdin(Stdio::null())
            .stderr(Stdio::from(shim_log))
            .output()
            .map_err(io_err(format!("running the shim {}", self.opts.shim.display())))?;
        let status_line = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
        if status_line.starts_with("ok ") {
            Ok(())
        } else {
            let shim_err = fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
            Err(RuntimeError::Runc {
                command: "create".into(),
                message: format!("{} {}", status_line.trim_start_matches("error "), shim_err.trim()).trim().to_string(),
            })
        }
    }

    fn exit_record(&self, id: &str) -> Option<ExitRecord> {
        let bytes = fs::read(self.dir(id).join("exit.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn started_at(&self, id: &str) -> Option<String> {
        fs::read_to_string(self.dir(id).join("started")).ok().map(|s| s.trim().to_string())
    }

    fn wait_exited(&self, id: &str, timeout: Duration) -> Result<bool, RuntimeError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.state(id)? {
                ContainerState::Exited { .. } | ContainerState::Unknown => return Ok(true),
                _ if Instant::now() >= deadline => return Ok(false),
                _ => std::thread::sleep(Duration::from_millis(25)),
            }
        }
    }

    fn kill(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        match self.runc_run(&["kill", id, &signal.to_string()]) {
            Ok(_) => Ok(()),
            // Already gone: nothing to signal.
            Err(RuntimeError::Runc { message, .. }) if message.contains("not running") || message.contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[derive(Deserialize)]
struct RuncState {
    status: String,
    #[serde(default)]
    pid: i32,
}

impl PodRuntime for Runc {
    fn create_container(&self, cfg: &ContainerConfig) -> Result<ContainerId, RuntimeError> {
        if cfg.name.is_empty() || cfg.image.is_empty() {
            return Err(RuntimeError::InvalidConfig("container name and image are required".into()));
        }
        if cfg.log_path.as_os_str().is_empty() {
            return Err(RuntimeError::InvalidConfig("log_path is required".into()));
        }
        // Unique and readable: <pod uid prefix>-<name>-<attempt>-<random>.
        let uid: String = cfg.pod_uid.chars().filter(|c| c.is_ascii_alphanumeric()).take(8).collect();
        let name: String = cfg.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).take(40).collect();
        let rand = {
            let mut b = [0u8; 4];
            File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).map_err(io_err("reading /dev/urandom"))?;
            crate::digest::hex(&b)
        };
        let id = format!("{}{}-{}-{rand}", if uid.is_empty() { String::new() } else { format!("{uid}-") }, name, cfg.attempt);
        valid_id(&id)?;
        match self.create_inner(&id, cfg) {
            Ok(()) => Ok(id),
            Err(e) => {
                self.cleanup_failed_create(&id);
                Err(e)
            }
        }
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.meta(id)?;
        let _ = fs::write(self.dir(id).join("started"), now_rfc3339());
        self.runc_run(&["start", id]).map(|_| ())
    }

    fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let meta = self.meta(id)?;
        match self.state(id)? {
            ContainerState::Exited { .. } | ContainerState::Unknown => return Ok(()),
            ContainerState::Created => {
                self.kill(id, libc::SIGKILL)?;
            }
            ContainerState::Running { .. } => {
                let sig = signal_number(&meta.stop_signal).unwrap_or(libc::SIGTERM);
                self.kill(id, sig)?;
                if self.wait_exited(id, grace)? {
                    return Ok(());
                }
                self.kill(id, libc::SIGKILL)?;
            }
        }
        if self.wait_exited(id, Duration::from_secs(10))? {
            Ok(())
        } else {
            Err(RuntimeError::Runc { command: format!("kill {id} KILL"), message: "the container did not exit within 10s of SIGKILL".into() })
        }
    }

    fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let meta = match self.meta(id) {
            Ok(m) => m,
            Err(RuntimeError::NotFound(_)) => return Ok(ContainerState::Unknown),
            Err(e) => return Err(e),
        };
        let exited = |r: ExitRecord, started_at| ContainerState::Exited {
            exit_code: r.exit_code,
            signal: r.signal,
            oom_killed: r.oom_killed,
            started_at,
            finished_at: r.finished_at,
        };
        if let Some(r) = self.exit_record(id) {
            return Ok(exited(r, self.started_at(id)));
        }
        let st: RuncState = match self.runc_run(&["state", id]) {
            Ok(json) => serde_json::from_str(&json).map_err(|e| RuntimeError::Runc { command: "state".into(), message: e.to_string() })?,
            Err(_) => return Ok(ContainerState::Unknown),
        };
        match st.status.as_str() {
            "created" => Ok(ContainerState::Created),
            "running" | "paused" | "pausing" => Ok(ContainerState::Running { pid: st.pid, started_at: self.started_at(id) }),
            _ => {
                // Stopped: the shim writes exit.json right after reaping; give it a moment.
                for _ in 0..100 {
                    if let Some(r) = self.exit_record(id) {
                        return Ok(exited(r, self.started_at(id)));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                // The shim is gone (killed with the agent's cgroup, say): the code is lost.
                Ok(ContainerState::Exited {
                    exit_code: 255,
                    signal: None,
                    oom_killed: crate::shim::oom_kills_recorded(&memory_cgroup_dir(&meta.cgroups_path)),
                    started_at: self.started_at(id),
                    finished_at: now_rfc3339(),
                })
            }
        }
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        valid_id(id)?;
        let dir = self.dir(id);
        if !dir.exists() {
            return Ok(());
        }
        // Let the shim record the exit before the bundle goes, so it never writes into a
        // directory being removed.
        if matches!(self.state(id)?, ContainerState::Running { .. } | ContainerState::Created) {
            self.kill(id, libc::SIGKILL)?;
            let _ = self.wait_exited(id, Duration::from_secs(10))?;
        }
        match self.runc_run(&["delete", "--force", id]) {
            Ok(_) => {}
            Err(RuntimeError::Runc { message, .. }) if message.contains("does not exist") || message.contains("not exist") => {}
            Err(e) => return Err(e),
        }
        let rootfs = dir.join("rootfs");
        if is_mountpoint(&rootfs) {
            unmount(&rootfs);
        }
        fs::remove_dir_all(&dir).map_err(io_err(format!("removing {}", dir.display())))
    }

    fn exec(&self, id: &str, argv: &[String], tty: bool) -> Result<ExecProcess, RuntimeError> {
        self.meta(id)?;
        if argv.is_empty() {
            return Err(RuntimeError::InvalidConfig("exec needs a command".into()));
        }
        let mut cmd = self.runc();
        cmd.arg("exec");
        if tty {
            cmd.arg("--tty");
        }
        // No "--": runc would run it as the command; runc stops parsing flags at the id.
        cmd.arg(id).args(argv);
        if !tty {
            let child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(io_err("running runc exec"))?;
            return Ok(ExecProcess { child, pty: None });
        }
        // runc exec --tty in the foreground wants its own stdin to be a terminal (it proxies it to
        // the container's pty): give it the slave side of a pty we own, as its controlling tty.
        let (master, slave) = open_pty()?;
        let slave_fd = slave.as_raw_fd();
        let out = slave.try_clone().map_err(io_err("dup pty"))?;
        let err = slave.try_clone().map_err(io_err("dup pty"))?;
        cmd.stdin(Stdio::from(slave)).stdout(Stdio::from(out)).stderr(Stdio::from(err));
        // SAFETY: setsid and TIOCSCTTY are async-signal-safe; fd 0 is the slave after dup2.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                let _ = slave_fd;
                if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io_err("running runc exec --tty"))?;
        Ok(ExecProcess { child, pty: Some(File::from(master)) })
    }

    fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let dir = self.opts.state_dir.join("containers");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))?.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Ok(m) = self.meta(&id) {
                out.push(ContainerInfo { id: m.id, config: m.config, image_digest: m.image_digest, created_at: m.created_at });
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }
}

fn open_pty() -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty with valid out pointers and no name/termios/winsize.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    if rc != 0 {
        return Err(io_err("openpty")(io::Error::last_os_error()));
    }
    // SAFETY: both fds were just opened and are owned by nobody else.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: FD_CLOEXEC on the master, so exec'd children do not keep it.
    unsafe { libc::fcntl(m.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((m, s))
}

impl From<ImageError> for RuntimeError {
    fn from(e: ImageError) -> Self {
        RuntimeError::Image(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn kubernetes_command_and_args() {
        let img = ImageConfig { entrypoint: s(&["/ep"]), cmd: s(&["c1", "c2"]), ..Default::default() };
        assert_eq!(effective_argv(&img, &[], &[]), s(&["/ep", "c1", "c2"]));
        assert_eq!(effective_argv(&img, &[], &s(&["a"])), s(&["/ep", "a"]));
        assert_eq!(effective_argv(&img, &s(&["/cmd"]), &[]), s(&["/cmd"]));
        assert_eq!(effective_argv(&img, &s(&["/cmd"]), &s(&["a"])), s(&["/cmd", "a"]));
    }

    #[test]
    fn env_merge_overrides_in_place() {
        let env = merged_env(&s(&["PATH=/bin", "A=1", "B=2"]), &[("A".into(), "x".into()), ("C".into(), "3".into())]);
        assert_eq!(env, s(&["PATH=/bin", "A=x", "B=2", "C=3"]));
        assert!(merged_env(&[], &[])[0].starts_with("PATH="));
    }

    #[test]
    fn users_resolve_against_the_image() {
        let d = tempfile::tempdir().expect("tmp");
        fs::create_dir(d.path().join("etc")).expect("etc");
        fs::write(d.path().join("etc/passwd"), "root:x:0:0::/:/bin/sh\nweb:x:33:44::/:/bin/sh\n").expect("passwd");
        fs::write(d.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").expect("group");
        assert_eq!(resolve_user(d.path(), None).expect("none"), (0, 0));
        assert_eq!(resolve_user(d.path(), Some("web")).expect("web"), (33, 44));
        assert_eq!(resolve_user(d.path(), Some("33")).expect("33"), (33, 44));
        assert_eq!(resolve_user(d.path(), Some("web:staff")).expect("web:staff"), (33, 50));
        assert_eq!(resolve_user(d.path(), Some("1000:1000")).expect("numeric"), (1000, 1000));
        assert!(resolve_user(d.path(), Some("nobody")).is_err());
    }

    #[test]
    fn signals_by_name() {
        assert_eq!(signal_number("SIGTERM"), Some(libc::SIGTERM));
        assert_eq!(signal_number("quit"), Some(libc::SIGQUIT));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGBOGUS"), None);
    }
}
