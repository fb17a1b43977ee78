//! Real containers: runc, the skiff-echo image from scripts/build-image.sh, network namespaces made
//! here. Root and runc are required (CI=true fails without them; elsewhere the tests skip).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use skiff_runtime::{BindMount, ContainerConfig, ContainerState, ImageStore, PodRuntime, Resources, Runc, RuncOptions};

fn ready() -> bool {
    require("root", is_root())
        && require("runc", have("runc"))
        && require("ip (iproute2)", have("ip"))
        && require("busybox-static", Path::new("/bin/busybox").exists())
}

/// One echo image archive per test binary (the script is idempotent, but once is enough).
fn image_archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(echo_image)
}

/// A network namespace with an eth0 carrying `ip`; deleted on drop.
struct Netns {
    name: String,
    ip: String,
}

impl Netns {
    fn new(tag: &str, ip: &str) -> Netns {
        let name = format!("skiff-rt-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(std::process::Stdio::null()).status();
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        run(&["netns", "add", &name]);
        // From here on a failing step still deletes the namespace (Drop).
        let ns = Netns { name: name.clone(), ip: ip.to_string() };
        run(&["-n", &name, "link", "set", "lo", "up"]);
        // A veth pair inside the namespace (no dummy module on every kernel): eth0 carries the IP.
        run(&["-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
        run(&["-n", &name, "link", "set", "eth0p", "up"]);
        run(&["-n", &name, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        run(&["-n", &name, "link", "set", "eth0", "up"]);
        ns
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
    /// Runs `f` on a thread that entered this namespace (its sockets live there).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with an fd for a network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A runtime over a fresh state dir and image store, with the echo image imported. On drop every
/// container is removed and the test's cgroup parent deleted.
struct Fixture {
    _tmp: tempfile::TempDir,
    runc: Runc,
    state_dir: PathBuf,
    logs: PathBuf,
    cgroup_parent: String,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = ImageStore::open(tmp.path().join("images")).expect("store");
        store.import(image_archive()).expect("import echo image");
        let state_dir = tmp.path().join("state");
        let runc = Runc::new(runc_options(&state_dir), store).expect("runc");
        let logs = tmp.path().join("logs");
        Fixture { runc, state_dir, logs, _tmp: tmp, cgroup_parent: format!("/skiff-rt-test-{}-{tag}", std::process::id()) }
    }

    fn config(&self, name: &str, netns: &Netns) -> ContainerConfig {
        ContainerConfig {
            pod_uid: "0123456789abcdef".into(),
            pod_name: "echo-pod".into(),
            pod_namespace: "default".into(),
            name: name.into(),
            image: "skiff/echo:1.0".into(),
            netns: Some(netns.path()),
            hostname: "echo-pod".into(),
            log_path: self.logs.join(format!("{name}.log")),
            cgroup_parent: self.cgroup_parent.clone(),
            ..Default::default()
        }
    }

    fn run(&self, cfg: &ContainerConfig) -> String {
        let id = self.runc.create_container(cfg).expect("create");
        assert_eq!(self.runc.state(&id).expect("state"), ContainerState::Created);
        self.runc.start(&id).expect("start");
        id
    }

    fn wait_exit(&self, id: &str, timeout: Duration) -> ContainerState {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.runc.state(id).expect("state");
            if matches!(st, ContainerState::Exited { .. }) || Instant::now() > deadline {
                return st;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn runc_options(state_dir: &Path) -> RuncOptions {
    let mut o = RuncOptions::new(state_dir);
    // SKIFF_TEST_SHIM="target/debug/skiff runtime-shim" runs the same tests through the skiff
    // binary's hidden subcommand.
    match std::env::var("SKIFF_TEST_SHIM") {
        Ok(cmd) if !cmd.trim().is_empty() => {
            let mut words = cmd.split_whitespace();
            o.shim = PathBuf::from(words.next().unwrap_or_default());
            o.shim_args = words.map(Into::into).collect();
        }
        _ => {
            o.shim = PathBuf::from(env!("CARGO_BIN_EXE_skiff-shim"));
            o.shim_args.clear();
        }
    }
    o
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(list) = self.runc.list() {
            for c in list {
                let _ = self.runc.remove(&c.id);
            }
        }
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let Ok(entries) = std::fs::read_dir(root) else { continue };
            for e in entries.flatten() {
                let _ = std::fs::remove_dir(e.path().join(self.cgroup_parent.trim_start_matches('/')));
            }
            let _ = std::fs::remove_dir(Path::new(root).join(self.cgroup_parent.trim_start_matches('/')));
        }
    }
}

fn log_lines(path: &Path) -> Vec<(String, String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut p = l.splitn(4, ' ');
            let f = |x: Option<&str>| x.unwrap_or("").to_string();
            (f(p.next()), f(p.next()), f(p.next()), f(p.next()))
        })
        .collect()
}

fn connect_retry(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("connecting to {addr}: {e}"),
        }
    }
}

fn cgroup_file(parent: &str, id: &str, v1_controller: &str, v1_file: &str, v2_file: &str) -> String {
    let rel = format!("{}/{id}", parent.trim_start_matches('/'));
    let p = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        PathBuf::from(format!("/sys/fs/cgroup/{rel}/{v2_file}"))
    } else {
        PathBuf::from(format!("/sys/fs/cgroup/{v1_controller}/{rel}/{v1_file}"))
    };
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().to_string()
}

#[test]
fn echo_answers_in_the_pod_netns_and_logs_in_cri_format() {
    if !ready() {
        return;
    }
    let ns = Netns::new("echo", "10.244.9.5");
    let fx = Fixture::new("echo");
    let mut cfg = fx.config("echo", &ns);
    cfg.resources = Resources {
        memory_limit_bytes: Some(64 << 20),
        cpu_shares: Some(512),
        cpu_quota: Some(50_000),
        cpu_period: Some(100_000),
        pids_limit: Some(100),
    };
    cfg.oom_score_adj = Some(-999); // clamped: no CAP_SYS_RESOURCE
    let id = fx.run(&cfg);
    let ContainerState::Running { pid, .. } = fx.runc.state(&id).expect("state") else { panic!("not running") };
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    let addr: SocketAddr = format!("{}:9000", ns.ip).parse().expect("addr");
    let answer = ns.run(move || {
        let mut s = connect_retry(addr);
        s.write_all(b"hello\nagain\n").expect("write");
        let mut r = BufReader::new(s);
        let (mut a, mut b) = (String::new(), String::new());
        r.read_line(&mut a).expect("read");
        r.read_line(&mut b).expect("read");
        (a, b)
    });
    assert_eq!(answer.0, "echo-pod 10.244.9.5\n", "hostname and pod IP from inside the container");
    assert_eq!(answer.1, answer.0, "every line answered");
    let http: SocketAddr = format!("{}:8080", ns.ip).parse().expect("addr");
    let reply = ns.run(move || {
        let mut s = connect_retry(http);
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    });
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // Limits reached the cgroup (v1 files here, v2 on unified hosts).
    assert_eq!(cgroup_file(&fx.cgroup_parent, &id, "memory", "memory.limit_in_bytes", "memory.max"), (64u64 << 20).to_string());
    let quota = cgroup_file(&fx.cgroup_parent, &id, "cpu", "cpu.cfs_quota_us", "cpu.max");
    assert!(quota == "50000" || quota == "50000 100000", "{quota}");
    assert_eq!(cgroup_file(&fx.cgroup_parent, &id, "pids", "pids.max", "pids.max"), "100");
    let oom_adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).expect("oom_score_adj");
    assert!(oom_adj.trim().parse::<i32>().expect("int") >= 0, "clamped to >= 0: {oom_adj}");

    // skiff-echo's start-up line, in CRI format.
    let deadline = Instant::now() + Duration::from_secs(5);
    let lines = loop {
        let l = log_lines(&cfg.log_path);
        if !l.is_empty() || Instant::now() > deadline {
            break l;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (ts, stream, tag, msg) = lines.first().expect("a log line").clone();
    assert!(chrono::DateTime::parse_from_rfc3339(&ts).is_ok(), "RFC 3339 timestamp: {ts}");
    assert!(ts.ends_with('Z') && ts.contains('.'), "{ts}");
    assert_eq!((stream.as_str(), tag.as_str()), ("stderr", "F"));
    assert!(msg.starts_with("skiff-echo: http :8080, tcp :9000, udp :9001 answering echo-pod 10.244.9.5"), "{msg}");

    // stop: skiff-echo exits 0 on SIGTERM, promptly.
    let t = Instant::now();
    fx.runc.stop(&id, Duration::from_secs(10)).expect("stop");
    assert!(t.elapsed() < Duration::from_secs(3), "SIGTERM handled: {:?}", t.elapsed());
    match fx.runc.state(&id).expect("state") {
        ContainerState::Exited { exit_code, oom_killed, .. } => assert_eq!((exit_code, oom_killed), (0, false)),
        other => panic!("{other:?}"),
    }
    fx.runc.remove(&id).expect("remove");
    assert_eq!(fx.runc.state(&id).expect("state"), ContainerState::Unknown);
    assert!(!fx.state_dir.join("containers").join(&id).exists(), "bundle removed");
    assert!(cfg.log_path.exists(), "the log outlives the container");
}

#[test]
fn command_args_env_mounts_and_exit_code() {
    if !ready() {
        return;
    }
    let ns = Netns::new("cmd", "10.244.9.6");
    let fx = Fixture::new("cmd");
    let host = tempfile::tempdir().expect("host dir");
    std::fs::write(host.path().join("hello"), "from the host\n").expect("write");
    let rw = tempfile::tempdir().expect("rw dir");

    let mut cfg = fx.config("shell", &ns);
    cfg.command = vec!["/bin/sh".into(), "-c".into()];
    cfg.args = vec![
        "echo out:$FOO:$PATH; echo err >&2; cat /data/hello; (touch /data/x 2>/dev/null && echo writable) || echo read-only; \
         echo made > /rw/made; pwd; hostname; printf 'no newline'; exit 3"
            .into(),
    ];
    cfg.env = vec![("FOO".into(), "bar".into())];
    cfg.working_dir = Some("/tmp".into());
    cfg.mounts = vec![
        BindMount { host_path: host.path().into(), container_path: "/data".into(), read_only: true },
        BindMount { host_path: rw.path().into(), container_path: "/rw".into(), read_only: false },
    ];
    let id = fx.run(&cfg);
    match fx.wait_exit(&id, Duration::from_secs(10)) {
        ContainerState::Exited { exit_code, signal, oom_killed, .. } => assert_eq!((exit_code, signal, oom_killed), (3, None, false)),
        other => panic!("{other:?}"),
    }
    let lines = log_lines(&cfg.log_path);
    let stdout: Vec<&str> = lines.iter().filter(|l| l.1 == "stdout").map(|l| l.3.as_str()).collect();
    let stderr: Vec<&str> = lines.iter().filter(|l| l.1 == "stderr").map(|l| l.3.as_str()).collect();
    assert_eq!(
        stdout,
        vec![
            "out:bar:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "from the host",
            "read-only",
            "/tmp",
            "echo-pod",
            "no newline"
        ],
        "command replaced the entrypoint, env merged, ro bind visible, cwd and hostname set"
    );
    assert_eq!(stderr, vec!["err"]);
    assert!(lines.iter().all(|l| l.2 == "F"));
    assert_eq!(std::fs::read_to_string(rw.path().join("made")).expect("rw mount"), "made\n");
    assert!(!host.path().join("x").exists());

    // args alone keep the image's entrypoint: skiff-echo pause, which runs until stopped.
    let mut cfg = fx.config("pause", &ns);
    cfg.args = vec!["pause".into()];
    let id = fx.run(&cfg);
    std::thread::sleep(Duration::from_millis(300));
    assert!(matches!(fx.runc.state(&id).expect("state"), ContainerState::Running { .. }), "pause keeps running");
    fx.runc.stop(&id, Duration::from_secs(10)).expect("stop");
    assert!(matches!(fx.runc.state(&id).expect("state"), ContainerState::Exited { exit_code: 0, .. }));

    // Bad input is refused before anything is made.
    let mut bad = fx.config("bad", &ns);
    bad.mounts = vec![BindMount { host_path: "/nonexistent/skiff".into(), container_path: "/x".into(), read_only: true }];
    assert!(fx.runc.create_container(&bad).is_err());
    bad.mounts.clear();
    bad.image = "skiff/absent:1".into();
    assert!(fx.runc.create_container(&bad).is_err());
    assert_eq!(fx.runc.list().expect("list").len(), 2, "failed creates leave nothing");
}

#[test]
fn stop_honors_the_grace_period_then_kills() {
    if !ready() {
        return;
    }
    let ns = Netns::new("grace", "10.244.9.7");
    let fx = Fixture::new("grace");
    let mut cfg = fx.config("sleeper", &ns);
    // PID 1 without a SIGTERM handler: the kernel drops SIGTERM, so only SIGKILL ends it.
    cfg.command = vec!["/bin/sleep".into(), "300".into()];
    let id = fx.run(&cfg);
    let grace = Duration::from_millis(1500);
    let t = Instant::now();
    fx.runc.stop(&id, grace).expect("stop");
    let took = t.elapsed();
    assert!(took >= grace, "waited the grace period: {took:?}");
    assert!(took < grace + Duration::from_secs(3), "then killed: {took:?}");
    match fx.runc.state(&id).expect("state") {
        ContainerState::Exited { exit_code, signal, oom_killed, .. } => {
            assert_eq!((exit_code, signal, oom_killed), (137, Some(9), false))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn over_its_memory_limit_a_container_is_oom_killed() {
    if !ready() {
        return;
    }
    let ns = Netns::new("oom", "10.244.9.8");
    let fx = Fixture::new("oom");
    let mut cfg = fx.config("hog", &ns);
    // A shell variable that grows past the 16 MiB limit.
    cfg.command = vec!["/bin/sh".into(), "-c".into(), "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived".into()];
    cfg.resources.memory_limit_bytes = Some(16 << 20);
    let id = fx.run(&cfg);
    match fx.wait_exit(&id, Duration::from_secs(30)) {
        ContainerState::Exited { exit_code, oom_killed, .. } => {
            assert!(oom_killed, "reported OOM-killed (exit {exit_code})");
            assert_eq!(exit_code, 137);
        }
        other => panic!("{other:?}"),
    }
    assert!(!std::fs::read_to_string(&cfg.log_path).unwrap_or_default().contains("survived"));
}

#[test]
fn exec_with_pipes_and_with_a_tty() {
    if !ready() {
        return;
    }
    let ns = Netns::new("exec", "10.244.9.9");
    let fx = Fixture::new("exec");
    let mut cfg = fx.config("pause", &ns);
    cfg.args = vec!["pause".into()];
    cfg.env = vec![("FROM_SPEC".into(), "yes".into())];
    let id = fx.run(&cfg);

    let argv: Vec<String> =
        ["/bin/sh", "-c", "read line; echo got:$line:$FROM_SPEC; echo oops >&2; exit 7"].iter().map(|s| s.to_string()).collect();
    let mut p = fx.runc.exec(&id, &argv, false).expect("exec");
    p.child.stdin.take().expect("stdin").write_all(b"ping\n").expect("stdin");
    let mut out = String::new();
    p.child.stdout.take().expect("stdout").read_to_string(&mut out).expect("stdout");
    let mut err = String::new();
    p.child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert_eq!(p.wait().expect("wait"), 7, "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "got:ping:yes\n", "stdin reached it; the container's env applies");
    assert_eq!(err, "oops\n");

    // runc sizes the container's terminal from ours just after the process starts: give it a
    // moment before asking.
    let argv: Vec<String> = ["/bin/sh", "-c", "tty; sleep 0.5; stty size; exit 4"].iter().map(|s| s.to_string()).collect();
    let mut p = fx.runc.exec(&id, &argv, true).expect("exec tty");
    p.resize(100, 30).expect("resize");
    let mut pty = p.pty.take().expect("pty");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    // The pty's master reads EIO once every slave fd is closed (runc exec exited).
    while Instant::now() < deadline {
        match pty.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(p.wait().expect("wait"), 4);
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("/dev/pts/"), "a terminal inside: {out:?}");
    assert!(out.contains("30 100"), "the size set by resize reached it: {out:?}");
    fx.runc.stop(&id, Duration::from_secs(5)).expect("stop");
}

#[test]
fn a_new_runtime_over_the_state_dir_adopts_running_containers() {
    if !ready() {
        return;
    }
    let ns = Netns::new("adopt", "10.244.9.10");
    let fx = Fixture::new("adopt");
    let mut cfg = fx.config("long", &ns);
    cfg.command = vec!["/bin/sh".into(), "-c".into()];
    cfg.args = vec!["trap 'echo bye; exit 5' TERM; echo before; while true; do sleep 0.1; done".into()];
    cfg.labels.insert("io.kubernetes.pod.uid".into(), "0123456789abcdef".into());
    let id = fx.run(&cfg);
    let ContainerState::Running { pid, .. } = fx.runc.state(&id).expect("state") else { panic!("not running") };

    // An agent restart: a fresh Runc over the same dirs, nothing carried in memory.
    let store = ImageStore::open(fx.runc.images().dir()).expect("store");
    let again = Runc::new(runc_options(&fx.state_dir), store).expect("runc");
    let list = again.list().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, id);
    assert_eq!(list[0].config.name, "long");
    assert_eq!(list[0].config.labels.get("io.kubernetes.pod.uid").map(String::as_str), Some("0123456789abcdef"));
    assert!(again.images_in_use().expect("in use").contains(&list[0].image_digest));
    match again.state(&id).expect("state") {
        ContainerState::Running { pid: p, .. } => assert_eq!(p, pid),
        other => panic!("{other:?}"),
    }
    // The shim kept logging and still collects the exit code.
    again.stop(&id, Duration::from_secs(5)).expect("stop");
    match again.state(&id).expect("state") {
        ContainerState::Exited { exit_code, .. } => assert_eq!(exit_code, 5),
        other => panic!("{other:?}"),
    }
    let msgs: Vec<String> = log_lines(&cfg.log_path).into_iter().map(|l| l.3).collect();
    assert_eq!(msgs, vec!["before", "bye"]);
    again.remove(&id).expect("remove");
    assert!(fx.runc.list().expect("list").is_empty());
}
