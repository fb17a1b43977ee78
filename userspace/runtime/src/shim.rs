//! The per-container shim (`skiff-shim`, a binary of this crate; `Runc` spawns it).
//!
//! Why a shim process at all: runc in detached mode hands its own stdio to the container, and the
//! container's exit status can only be collected by its parent. If the agent were that parent, an
//! agent restart would lose both the log stream (a broken pipe kills chatty containers) and the
//! exit code. So, like containerd-shim and conmon, a small process per container that outlives the
//! agent:
//! 1. forks (the parent returns at once), starts a new session and becomes a child subreaper, so
//!    the container's init, orphaned when `runc create` exits, is reparented to it;
//! 2. runs `runc create` with the container's stdout/stderr as pipes it holds, and reports
//!    `ok <pid>` or `error <message>` on its own stdout, which the runtime waits for;
//! 3. copies both pipes into the CRI-format log file (`<RFC3339Nano> stdout|stderr F|P <line>`,
//!    kubelet's format, what `kubectl logs` reads);
//! 4. reaps the container, reads the memory cgroup's OOM-kill counter before anyone deletes the
//!    cgroup, and writes `exit.json` atomically (exit code, signal, oom_killed, finished_at).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the shim records when the container exits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRecord {
    /// The exit code as a shell reports it: 128+signal when killed by a signal.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    /// RFC 3339 with nanoseconds, UTC.
    pub finished_at: String,
}

#[derive(Debug, Default)]
pub struct ShimArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub runc: PathBuf,
    pub runc_root: PathBuf,
    pub log: PathBuf,
    pub exit_file: PathBuf,
    pub pid_file: PathBuf,
    /// The container's memory cgroup directory (v1 memory controller or v2 unified), for OOM.
    pub memory_cgroup: Option<PathBuf>,
}

impl ShimArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "--id".into(),
            self.id.clone().into(),
            "--bundle".into(),
            self.bundle.clone().into(),
            "--runc".into(),
            self.runc.clone().into(),
            "--runc-root".into(),
            self.runc_root.clone().into(),
            "--log".into(),
            self.log.clone().into(),
            "--exit-file".into(),
            self.exit_file.clone().into(),
            "--pid-file".into(),
            self.pid_file.clone().into(),
        ];
        if let Some(m) = &self.memory_cgroup {
            v.push("--memory-cgroup".into());
            v.push(m.clone().into());
        }
        v
    }

    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, String> {
        let mut a = ShimArgs::default();
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag:?} needs a value"))?;
            let p = PathBuf::from(&value);
            match flag.to_str() {
                Some("--id") => a.id = value.to_string_lossy().into_owned(),
                Some("--bundle") => a.bundle = p,
                Some("--runc") => a.runc = p,
                Some("--runc-root") => a.runc_root = p,
                Some("--log") => a.log = p,
                Some("--exit-file") => a.exit_file = p,
                Some("--pid-file") => a.pid_file = p,
                Some("--memory-cgroup") => a.memory_cgroup = Some(p),
                _ => return Err(format!("unknown flag {flag:?}")),
            }
        }
        if a.id.is_empty() || a.bundle.as_os_str().is_empty() || a.log.as_os_str().is_empty() {
            return Err("--id, --bundle and --log are required".into());
        }
        Ok(a)
    }
}

/// The shim's `main`. Must be called before the process starts any thread (it forks).
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let args = match ShimArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            println!("error {e}");
            return 2;
        }
    };
    // SAFETY: fork before any thread exists; the child continues as the shim, the parent exits
    // so the runtime's Command::output() returns once the child closes stdout.
    match unsafe { libc::fork() } {
        -1 => {
            println!("error fork: {}", io::Error::last_os_error());
            return 1;
        }
        0 => {}
        _ => return 0,
    }
    // SAFETY: plain syscalls on our own process.
    unsafe {
        libc::setsid();
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("skiff-shim {}: {e}", args.id);
            1
        }
    }
}

fn report(line: &str) {
    let mut out = io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Points our stdout at /dev/null: the runtime reads until EOF, so this releases it.
fn close_status_pipe() {
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1, which we own.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-int array; O_CLOEXEC so only the child we hand them to keeps them.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn run(args: &ShimArgs) -> Result<(), String> {
    let (out_r, out_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let (err_r, err_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let runc_log = args.bundle.join("runc.log");
    let child = Command::new(&args.runc)
        .arg("--root")
        .arg(&args.runc_root)
        .arg("--log")
        .arg(&runc_log)
        .arg("create")
        .arg("--bundle")
        .arg(&args.bundle)
        .arg("--pid-file")
        .arg(&args.pid_file)
        .arg(&args.id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            report(&format!("error running {}: {e}", args.runc.display()));
            return Err(e.to_string());
        }
    };
    // The Command (and with it our copies of the pipes' write ends) is gone: only runc, and after
    // it the container, hold them, so EOF on the read ends means the container closed its output.
    let status = child.wait().map_err(|e| format!("waiting for runc create: {e}"))?;
    if !status.success() {
        let mut msg = String::new();
        let mut err_file = File::from(err_r);
        let _ = set_nonblocking(&err_file);
        let _ = (&mut err_file).take(64 * 1024).read_to_string(&mut msg);
        let logged = fs::read_to_string(&runc_log).unwrap_or_default();
        let last = logged.lines().rev().find(|l| l.contains("error")).unwrap_or("").to_string();
        let why = if msg.trim().is_empty() { last } else { msg.trim().to_string() };
        report(&format!("error runc create: {status}: {}", why.replace('\n', " ")));
        return Err("runc create failed".into());
    }
    let pid: i32 = fs::read_to_string(&args.pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            report("error runc create wrote no pid file");
            "no pid file".to_string()
        })?;
    report(&format!("ok {pid}"));
    close_status_pipe();

    let log = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.log)
            .map_err(|e| format!("opening log {}: {e}", args.log.display()))?,
    ));
    let copiers = [(out_r, "stdout"), (err_r, "stderr")].map(|(fd, stream)| {
        let log = log.clone();
        std::thread::spawn(move || copy_cri(File::from(fd), stream, &log))
    });

    let wait_status = reap_until(pid);
    let oom_killed = args.memory_cgroup.as_deref().is_some_and(oom_kills_recorded);
    // Every process of the container's PID namespace dies with its init, so the pipes close soon;
    // bound the wait anyway (a process could have passed the fd to another namespace).
    let deadline = Instant::now() + Duration::from_secs(2);
    for c in copiers {
        while !c.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if c.is_finished() {
            let _ = c.join();
        }
    }
    let (exit_code, signal) = decode_wait_status(wait_status);
    let record = ExitRecord {
        exit_code,
        signal,
        oom_killed,
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    };
    let bytes = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
    let tmp = args.exit_file.with_extension("tmp");
    fs::write(&tmp, bytes).and_then(|_| fs::rename(&tmp, &args.exit_file)).map_err(|e| format!("writing exit file: {e}"))?;
    Ok(())
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reaps children (we are a subreaper: orphans of the container's runc processes land here) until
/// `pid` exits; returns its wait status.
fn reap_until(pid: i32) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: blocking waitpid for any child with a valid status pointer.
        let got = unsafe { libc::waitpid(-1, &mut status, 0) };
        if got == pid {
            return status;
        }
        if got == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // ECHILD: the container is not our child (should not happen); poll for it instead.
            for _ in 0..u32::MAX {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            return 255 << 8;
        }
    }
}

pub(crate) fn decode_wait_status(status: i32) -> (i32, Option<i32>) {
    if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status), None)
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        (128 + sig, Some(sig))
    } else {
        (255, None)
    }
}

/// Whether the kernel OOM-killed a process of this memory cgroup: `oom_kill` in v1's
/// memory.oom_control or v2's memory.events (kernels >= 4.13).
pub fn oom_kills_recorded(cgroup: &Path) -> bool {
    for file in ["memory.events", "memory.oom_control"] {
        if let Ok(text) = fs::read_to_string(cgroup.join(file)) {
            for line in text.lines() {
                if let Some(n) = line.strip_prefix("oom_kill ") {
                    return n.trim().parse::<u64>().unwrap_or(0) > 0;
                }
            }
        }
    }
    false
}

/// Longest line kept in one log record; longer lines become `P` (partial) records, as kubelet's
/// and containerd's loggers do.
const MAX_LOG_LINE: usize = 16 * 1024;

fn copy_cri(mut src: File, stream: &str, log: &Mutex<File>) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(i) = pending[start..].iter().position(|&b| b == b'\n') {
            push_record(&mut out, stream, "F", &pending[start..start + i]);
            start += i + 1;
        }
        pending.drain(..start);
        while pending.len() >= MAX_LOG_LINE {
            push_record(&mut out, stream, "P", &pending[..MAX_LOG_LINE]);
            pending.drain(..MAX_LOG_LINE);
        }
        write_records(log, &out);
    }
    if !pending.is_empty() {
        let mut out = Vec::new();
        push_record(&mut out, stream, "F", &pending);
        write_records(log, &out);
    }
}

fn push_record(out: &mut Vec<u8>, stream: &str, tag: &str, line: &[u8]) {
    let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    out.extend_from_slice(format!("{ts} {stream} {tag} ").as_bytes());
    out.extend_from_slice(line);
    out.push(b'\n');
}

fn write_records(log: &Mutex<File>, out: &[u8]) {
    if out.is_empty() {
        return;
    }
    if let Ok(mut f) = log.lock() {
        let _ = f.write_all(out);
    }
}
