//! `kubectl logs` and `kubectl exec` end to end: real kubectl 1.32 -> the in-process apiserver
//! (pods/log, pods/exec) -> the real agent endpoint (skiff_agent::server) of a "node" on
//! loopback. The node's runtime is a stand-in (the runc adapter is tested on its own): its
//! `exec` runs a real local process, and the container logs are CRI log files the test writes
//! where the agent's runtime writes them.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use skiff_agent::runtime::{ContainerKey, ContainerRequest, ContainerRuntime, ImageInfo, Observed, RuntimeError};

const NODE: &str = "fake-node";

/// Containers "exist" as the test says; exec runs the command on this host.
#[derive(Default)]
struct StandInRuntime {
    containers: Mutex<BTreeMap<String, Observed>>,
}

impl StandInRuntime {
    fn set(&self, id: &str, o: Observed) {
        self.containers.lock().expect("lock").insert(id.to_string(), o);
    }
}

fn running() -> Observed {
    Observed::Running { pid: 1, started_at: Timestamp::now() }
}

fn exited(code: i32) -> Observed {
    Observed::Exited { exit_code: code, oom_killed: false, started_at: None, finished_at: Timestamp::now() }
}

impl ContainerRuntime for StandInRuntime {
    fn version(&self) -> String {
        "stand-in://0".into()
    }
    fn image(&self, image: &str) -> Result<ImageInfo, RuntimeError> {
        Err(RuntimeError::ImageNotFound(image.into()))
    }
    fn run(&self, _req: &ContainerRequest) -> Result<(), RuntimeError> {
        Err(RuntimeError::Failed("the stand-in runtime runs no containers".into()))
    }
    fn observe(&self, id: &str) -> Result<Observed, RuntimeError> {
        Ok(self.containers.lock().expect("lock").get(id).cloned().unwrap_or(Observed::Absent))
    }
    fn stop(&self, _id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn remove(&self, _id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.containers.lock().expect("lock").keys().cloned().collect())
    }
    fn exec(&self, id: &str, argv: &[String], tty: bool) -> Result<std::process::Child, RuntimeError> {
        if !matches!(self.observe(id)?, Observed::Running { .. }) {
            return Err(RuntimeError::Failed(format!("{id} is not running")));
        }
        let (cmd, args) = argv.split_first().ok_or_else(|| RuntimeError::Failed("empty command".into()))?;
        let fail = |e: std::io::Error| RuntimeError::Failed(format!("starting {cmd}: {e}"));
        let mut command = Command::new(cmd);
        command.args(args);
        if !tty {
            return command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(fail);
        }
        // The ContainerRuntime contract for a tty: the Child's stdin and stdout are the pty master.
        let (master, slave) = open_pty().map_err(fail)?;
        command
            .stdin(Stdio::from(slave.try_clone().map_err(fail)?))
            .stdout(Stdio::from(slave.try_clone().map_err(fail)?))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the pty slave here.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(fail)?;
        // Our copies of the slave go with `command`, so the master reads EOF (EIO) when the process ends.
        drop(command);
        child.stdin = Some(std::process::ChildStdin::from(master.try_clone().map_err(fail)?));
        child.stdout = Some(std::process::ChildStdout::from(master));
        Ok(child)
    }
}

fn open_pty() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty with valid out pointers and no name, termios or size.
    if unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just opened here and belong to nobody else.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: fcntl on an fd we own; the child must not inherit the master.
    unsafe { libc::fcntl(m.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((m, s))
}

/// A CRI log line at `t`.
fn cri(t: &str, stream: &str, tag: &str, content: &str) -> String {
    format!("{t} {stream} {tag} {content}\n")
}

fn write_log(pods_dir: &Path, uid: &str, container: &str, attempt: u32, text: &str) -> PathBuf {
    let dir = pods_dir.join(uid).join("logs").join(container);
    std::fs::create_dir_all(&dir).expect("log dir");
    let path = dir.join(format!("{attempt}.log"));
    std::fs::write(&path, text).expect("write log");
    path
}

async fn create_pod(pods: &Api<Pod>, name: &str, containers: &[&str], node: Option<&str>) -> String {
    let cs: Vec<_> = containers.iter().map(|c| json!({"name": c, "image": "busybox"})).collect();
    let mut spec = json!({"containers": cs});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("pod");
    let created = pods.create(&PostParams::default(), &pod).await.expect("create pod");
    let uid = created.metadata.uid.expect("uid");
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running"}})))
        .await
        .expect("pod status");
    uid
}

struct Cluster {
    server: skiff_apiserver::RunningServer,
    kubeconfig: PathBuf,
    pods_dir: PathBuf,
    agent_port: u16,
    client: kube::Client,
    stop_agent: tokio::sync::watch::Sender<bool>,
    _tmp: tempfile::TempDir,
}

async fn cluster(runtime: Arc<dyn ContainerRuntime>) -> Cluster {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("apiserver");
    let mut config = skiff_apiserver::ServerConfig::new(data.clone());
    config.bind = "127.0.0.1:0".parse().expect("loopback");
    let server = skiff_apiserver::start(config).await.expect("apiserver starts");
    let kubeconfig = data.join(skiff_apiserver::KUBECONFIG);
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
    let kcfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.expect("kube config");
    let client = kube::Client::try_from(kcfg).expect("client");

    // The node: the real agent endpoint on a loopback port, with the admin token (as in `skiff up`).
    let pods_dir = tmp.path().join("agent").join("pods");
    std::fs::create_dir_all(&pods_dir).expect("pods dir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind agent");
    let agent_port = listener.local_addr().expect("addr").port();
    let (stop_agent, stop_rx) = tokio::sync::watch::channel(false);
    let scfg = skiff_agent::server::ServerConfig {
        listen: listener.local_addr().expect("addr"),
        token: server.admin_token.clone(),
        client_ca: Some(server.ca_pem.clone()),
        node_name: NODE.into(),
        pods_dir: pods_dir.clone(),
        cert_names: vec!["127.0.0.1".into()],
    };
    tokio::spawn(skiff_agent::server::serve_listener(listener, scfg, client.clone(), runtime, stop_rx));

    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": NODE}})).expect("node");
    nodes.create(&PostParams::default(), &node).await.expect("create node");
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": agent_port}},
    }});
    nodes.patch_status(NODE, &PatchParams::default(), &Patch::Merge(status)).await.expect("node status");
    Cluster { server, kubeconfig, pods_dir, agent_port, client, stop_agent, _tmp: tmp }
}

/// Runs blocking kubectl off the async workers (the servers run on them).
async fn kubectl(k: &Arc<Kubectl>, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let k = k.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let stdin = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        k.run_with_stdin(&a, stdin.as_deref())
    })
    .await
    .expect("kubectl task")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed ({}):\nstdout: {}\nstderr: {}", out.status, text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn failed(out: &std::process::Output, what: &str) -> String {
    assert!(!out.status.success(), "{what} should fail but printed: {}", text(&out.stdout));
    text(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_and_exec_reach_the_agent() {
    let Some(bin) = kubectl_path() else {
        require("kubectl 1.32", false);
        return;
    };
    let runtime = Arc::new(StandInRuntime::default());
    let c = cluster(runtime.clone()).await;
    let k = Arc::new(Kubectl::new(bin, &c.kubeconfig));
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let uid = create_pod(&pods, "one", &["main"], Some(NODE)).await;
    let two = create_pod(&pods, "two", &["a", "b"], Some(NODE)).await;
    create_pod(&pods, "floating", &["main"], None).await;

    // Attempt 0 crashed; attempt 1 runs. Its log has an old line, a partial line and two new ones.
    write_log(&c.pods_dir, &uid, "main", 0, &cri("2024-01-01T00:00:00.5Z", "stdout", "F", "from the first run"));
    runtime.set(&ContainerKey { pod_uid: uid.clone(), container: "main".into(), attempt: 0 }.id(), exited(1));
    let now = Timestamp::now();
    let recent = format!("{now}");
    let current = [
        cri("2024-01-01T00:01:00Z", "stdout", "F", "old line"),
        cri(&recent, "stderr", "P", "joined "),
        cri(&recent, "stderr", "F", "partial"),
        cri(&recent, "stdout", "F", "newest"),
    ]
    .concat();
    let log1 = write_log(&c.pods_dir, &uid, "main", 1, &current);
    let main1 = ContainerKey { pod_uid: uid.clone(), container: "main".into(), attempt: 1 }.id();
    runtime.set(&main1, running());
    write_log(&c.pods_dir, &two, "b", 0, &cri(&recent, "stdout", "F", "from b"));

    // logs, --previous, --tail, --timestamps, --since.
    let out = ok(&kubectl(&k, &["logs", "one"], None).await, "logs");
    assert_eq!(out, "old line\njoined partial\nnewest\n");
    let out = ok(&kubectl(&k, &["logs", "one", "--previous"], None).await, "logs --previous");
    assert_eq!(out, "from the first run\n");
    let out = ok(&kubectl(&k, &["logs", "one", "--tail=1"], None).await, "logs --tail=1");
    assert_eq!(out, "newest\n");
    let out = ok(&kubectl(&k, &["logs", "one", "--timestamps", "--tail=2"], None).await, "logs --timestamps");
    assert_eq!(out, format!("{now:.9} joined partial\n{now:.9} newest\n"));
    let out = ok(&kubectl(&k, &["logs", "one", "--since=1h"], None).await, "logs --since");
    assert_eq!(out, "joined partial\nnewest\n");
    let out = ok(&kubectl(&k, &["logs", "one", "--limit-bytes=5"], None).await, "logs --limit-bytes");
    assert_eq!(out, "old l");
    let out = ok(&kubectl(&k, &["logs", "two", "-c", "b"], None).await, "logs -c b");
    assert_eq!(out, "from b\n");

    // Errors, as Kubernetes words them.
    let err = failed(&kubectl(&k, &["logs", "one", "-c", "nope"], None).await, "logs -c nope");
    assert!(err.contains("container nope is not valid for pod one"), "{err}");
    let err = failed(&kubectl(&k, &["logs", "floating"], None).await, "logs of an unscheduled pod");
    assert!(err.contains("pod floating does not have a host assigned"), "{err}");
    let err = failed(&kubectl(&k, &["logs", "ghost"], None).await, "logs of a missing pod");
    assert!(err.contains("pods \"ghost\" not found"), "{err}");
    let err = failed(&kubectl(&k, &["get", "--raw", "/api/v1/namespaces/default/pods/two/log"], None).await, "raw log without container");
    assert!(err.contains("a container name must be specified for pod two, choose one of: [a b]"), "{err}");
    let err = failed(&kubectl(&k, &["logs", "two", "-c", "a"], None).await, "logs of a container that never started");
    assert!(err.contains("is waiting to start"), "{err}");
    let err = failed(&kubectl(&k, &["logs", "two", "-c", "b", "--previous"], None).await, "--previous without one");
    assert!(err.contains("previous terminated container \"b\" in pod \"two\" not found"), "{err}");

    // exec: streams relayed, the exit code becomes kubectl's.
    let out = kubectl(&k, &["exec", "one", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], None).await;
    assert_eq!(out.status.code(), Some(3), "stdout: {} stderr: {}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));
    let out = kubectl(&k, &["exec", "one", "--", "sh", "-c", "echo fine"], None).await;
    assert_eq!(ok(&out, "exec success"), "fine\n");
    let out = kubectl(&k, &["exec", "-i", "one", "--", "sh", "-c", "read first; echo got:$first; cat; echo done"], Some("hello\nworld\n")).await;
    assert_eq!(ok(&out, "exec -i"), "got:hello\nworld\ndone\n");
    // A larger stdin arrives whole (several websocket frames, then the v5 close of stdin).
    let big: String = (0..20000).map(|i| format!("line {i}\n")).collect();
    let out = kubectl(&k, &["exec", "-i", "one", "--", "wc", "-l"], Some(&big)).await;
    assert_eq!(ok(&out, "exec -i big").trim(), "20000");
    // exec -it: kubectl in a terminal (script(1) gives it one, sized 33x77): the process gets a
    // pty, kubectl's resize reaches it, and the exit code still comes back.
    if require("script (util-linux)", have("script")) {
        let inner = format!(
            "stty rows 33 cols 77; {} --kubeconfig {} --cache-dir {} exec -it one -- sh -c {}",
            k.bin.display(),
            c.kubeconfig.display(),
            k.home.path().join("cache").display(),
            "'tty; i=0; while [ $i -lt 50 ] && [ \"$(stty size)\" != \"33 77\" ]; do i=$((i+1)); sleep 0.1; done; echo size $(stty size); exit 4'",
        );
        let home = k.home.path().to_path_buf();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("script").args(["-qec", &inner, "/dev/null"]).env("HOME", home).stdin(Stdio::null()).output()
        })
        .await
        .expect("task")
        .expect("script");
        let printed = text(&out.stdout);
        assert_eq!(out.status.code(), Some(4), "{printed}\n{}", text(&out.stderr));
        assert!(printed.contains("/dev/pts/"), "the process has a terminal: {printed}");
        assert!(printed.contains("size 33 77"), "the resize reached the pty: {printed}");
    }
    // Much output (many frames through both proxies) arrives whole and in order.
    let out = kubectl(&k, &["exec", "one", "--", "seq", "1", "200000"], None).await;
    let printed = ok(&out, "exec seq");
    assert_eq!(printed.lines().count(), 200000);
    assert!(printed.lines().enumerate().all(|(i, l)| l == (i + 1).to_string()), "seq output out of order");
    let err = failed(&kubectl(&k, &["exec", "one", "-c", "nope", "--", "true"], None).await, "exec -c nope");
    assert!(err.contains("container nope is not valid for pod one"), "{err}");
    let err = failed(&kubectl(&k, &["exec", "two", "-c", "a", "--", "true"], None).await, "exec in a container that never started");
    assert!(err.contains("container a is not running"), "{err}");
    let err = failed(&kubectl(&k, &["exec", "floating", "--", "true"], None).await, "exec in an unscheduled pod");
    assert!(err.contains("pod floating does not have a host assigned"), "{err}");

    // The agent answers only its token: straight to it with another one is 401.
    let direct = |token: &str| {
        vec![
            "--server".to_string(),
            format!("https://127.0.0.1:{}", c.agent_port),
            "--insecure-skip-tls-verify".into(),
            "--token".into(),
            token.to_string(),
            "get".into(),
            "--raw".into(),
            "/containerLogs/default/one/main?tailLines=1".into(),
        ]
    };
    let empty_kubeconfig = c._tmp.path().join("empty.kubeconfig");
    std::fs::write(&empty_kubeconfig, "apiVersion: v1\nkind: Config\n").expect("write");
    let raw = Arc::new(Kubectl::new(k.bin.clone(), &empty_kubeconfig));
    let args = direct("wrong");
    let out = kubectl(&raw, &args.iter().map(String::as_str).collect::<Vec<_>>(), None).await;
    let err = failed(&out, "agent with a wrong token");
    assert!(err.contains("Unauthorized"), "{err}");
    let args = direct(&c.server.admin_token);
    let out = kubectl(&raw, &args.iter().map(String::as_str).collect::<Vec<_>>(), None).await;
    assert_eq!(ok(&out, "agent with its token"), "newest\n");

    // logs -f: the backlog, then a line written later, then the end when the attempt exits.
    let mut follow = k.command(&["logs", "-f", "one", "--tail=1"]);
    let mut child = follow.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("kubectl logs -f");
    let stdout = child.stdout.take().expect("stdout");
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(15), rx.recv()).await.expect("a followed line in time")
    }
    assert_eq!(next(&mut line_rx).await.as_deref(), Some("newest"));
    let mut f = std::fs::OpenOptions::new().append(true).open(&log1).expect("append");
    // Written in two pieces, as a runtime may flush half a line.
    let later = format!("{}", Timestamp::now());
    let line = cri(&later, "stdout", "F", "written later");
    f.write_all(&line.as_bytes()[..10]).expect("write");
    f.flush().expect("flush");
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.write_all(&line.as_bytes()[10..]).expect("write");
    assert_eq!(next(&mut line_rx).await.as_deref(), Some("written later"));
    // The container ends: the stream ends and kubectl exits 0 by itself.
    runtime.set(&main1, exited(0));
    assert_eq!(next(&mut line_rx).await, None, "the follow ends with the container");
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "kubectl logs -f did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "kubectl logs -f: {status}");

    // logs -f on a running container, stopped by the client: kubectl goes, nothing hangs.
    runtime.set(&main1, running());
    let mut child = k.command(&["logs", "-f", "one"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("kubectl logs -f");
    let mut reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let first = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        reader.read_line(&mut l).map(|_| l)
    })
    .await
    .expect("read task")
    .expect("first line");
    assert_eq!(first, "old line\n");
    child.kill().expect("kill kubectl");
    child.wait().expect("reap kubectl");
    // The agent still answers afterwards.
    let out = ok(&kubectl(&k, &["logs", "one", "--tail=1"], None).await, "logs after a killed follower");
    assert_eq!(out, "written later\n");

    let _ = c.stop_agent.send(true);
    c.server.stop().await;
}

fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().map(|o| o.status.success()).unwrap_or(false)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A network namespace for the pod (runc joins it); deleted by name on drop.
struct PodNetns(String);

impl PodNetns {
    fn new() -> PodNetns {
        let name = format!("skiff-le-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        let st = Command::new("ip").args(["netns", "add", &name]).status().expect("ip netns add");
        assert!(st.success(), "ip netns add {name}");
        let ns = PodNetns(name);
        let st = Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]).status().expect("ip link");
        assert!(st.success());
        ns
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Stops and removes the test's containers and its cgroup parent, whatever happened.
struct RuncCleanup {
    runtime: Arc<skiff_agent::runc_adapter::RuncRuntime>,
    cgroup_parent: String,
}

impl Drop for RuncCleanup {
    fn drop(&mut self) {
        if let Ok(ids) = self.runtime.list() {
            for id in ids {
                let _ = self.runtime.stop(&id, Duration::from_secs(1));
                let _ = self.runtime.remove(&id);
            }
        }
        let rel = self.cgroup_parent.trim_start_matches('/');
        let mut tops = vec![Path::new("/sys/fs/cgroup").join(rel)];
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            tops.extend(entries.flatten().map(|e| e.path().join(rel)));
        }
        for top in tops {
            remove_cgroup_tree(&top, 4);
        }
    }
}

/// Removes a cgroup directory and the (empty) ones below it, children first, `depth` levels down.
fn remove_cgroup_tree(dir: &Path, depth: u32) {
    if depth > 0
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path(), depth - 1);
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The same path against a real container: skiff's echo image run by runc through the agent's
/// runc adapter, its log written by skiff-shim, exec through `runc exec`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_and_exec_in_a_runc_container() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // skiff-shim is built beside the skiff binary (in whatever target dir cargo uses).
    if root {
        common::cluster::ensure_sibling_binaries();
    }
    let shim = Path::new(env!("CARGO_BIN_EXE_skiff")).with_file_name("skiff-shim");
    let ok_all = require("root", root)
        && require("runc", have("runc"))
        && require("ip (iproute2)", have("ip"))
        && require("busybox-static (for the echo image)", Path::new("/bin/busybox").exists())
        && require("skiff-shim beside the skiff binary (cargo build -p skiff-runtime)", shim.is_file());
    let bin = kubectl_path();
    if !ok_all || !require("kubectl 1.32", bin.is_some()) {
        return;
    }
    let bin = bin.expect("kubectl");

    // The echo image, imported into a fresh store.
    let archive = repo_root().join("target/images/skiff-echo-1.0.oci.tar");
    let st = Command::new("bash").arg(repo_root().join("scripts/build-image.sh")).arg(&archive).stdout(Stdio::null()).status().expect("build-image.sh");
    assert!(st.success(), "scripts/build-image.sh failed");
    let store_dir = tempfile::tempdir().expect("tmp");
    let images = store_dir.path().join("images");
    skiff_runtime::images::ImageStore::open(&images).expect("image store").import(&archive).expect("import the echo image");
    let rt = Arc::new(skiff_agent::runc_adapter::RuncRuntime::open(&store_dir.path().join("runc"), &images).expect("runc runtime"));
    let cleanup = RuncCleanup { runtime: rt.clone(), cgroup_parent: format!("/skiff-logs-exec-{}", std::process::id()) };
    let netns = PodNetns::new();

    let c = cluster(rt.clone()).await;
    let k = Arc::new(Kubectl::new(bin, &c.kubeconfig));
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let uid = create_pod(&pods, "web", &["echo"], Some(NODE)).await;
    let key = ContainerKey { pod_uid: uid.clone(), container: "echo".into(), attempt: 0 };
    let log_path = c.pods_dir.join(&uid).join("logs").join("echo").join("0.log");
    std::fs::create_dir_all(log_path.parent().expect("parent")).expect("log dir");
    let req = ContainerRequest {
        id: key.id(),
        image: "skiff/echo:1.0".into(),
        command: vec!["sh".into(), "-c".into(), "echo hello from runc; echo oops >&2; i=0; while [ $i -lt 600 ]; do i=$((i+1)); echo tick $i; sleep 0.2; done".into()],
        hostname: "web".into(),
        netns_path: netns.path(),
        cgroup_parent: format!("{}/pod{uid}", cleanup.cgroup_parent),
        log_path: log_path.clone(),
        ..Default::default()
    };
    let rt2 = rt.clone();
    tokio::task::spawn_blocking(move || rt2.run(&req)).await.expect("task").expect("runc runs the container");
    eventually("the container's first ticks in its log", Duration::from_secs(20), || {
        std::fs::read_to_string(&log_path).ok().filter(|t| t.contains("tick 2")).map(|_| ())
    });

    let out = ok(&kubectl(&k, &["logs", "web"], None).await, "logs");
    // stdout and stderr are two pipes: their relative order in the log is the shim's.
    let lines: Vec<&str> = out.lines().collect();
    // Within one stream the order holds: the first stdout line comes before the ticks.
    let pos = |l: &str| lines.iter().position(|x| *x == l);
    assert!(pos("hello from runc").is_some() && pos("hello from runc") < pos("tick 1"), "{out}");
    assert!(lines.contains(&"oops") && lines.contains(&"tick 1"), "{out}");
    let out = ok(&kubectl(&k, &["logs", "web", "--tail=1", "--timestamps"], None).await, "logs --tail=1");
    let (ts, line) = out.trim_end().split_once(' ').expect("timestamped line");
    assert!(ts.parse::<Timestamp>().is_ok() && line.starts_with("tick "), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");

    let out = kubectl(&k, &["exec", "web", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], None).await;
    assert_eq!(out.status.code(), Some(3), "stdout: {} stderr: {}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));
    // It runs inside the container: its hostname and its image's files.
    let out = ok(&kubectl(&k, &["exec", "web", "--", "sh", "-c", "hostname; test -x /skiff-echo || ls /"], None).await, "exec hostname");
    assert!(out.starts_with("web\n"), "{out}");
    let out = kubectl(&k, &["exec", "-i", "web", "--", "sh", "-c", "read x; echo got:$x"], Some("hi there\n")).await;
    assert_eq!(ok(&out, "exec -i"), "got:hi there\n");

    // logs -f follows the live container and ends when it stops.
    let mut child = k.command(&["logs", "-f", "web", "--tail=1"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("logs -f");
    let stdout = child.stdout.take().expect("stdout");
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut ticks = Vec::new();
    while ticks.len() < 3 {
        let l = tokio::time::timeout(Duration::from_secs(15), line_rx.recv()).await.expect("a followed line in time").expect("more lines");
        assert!(l.starts_with("tick "), "{l}");
        ticks.push(l);
    }
    let n = |l: &str| l.trim_start_matches("tick ").parse::<u32>().expect("tick number");
    assert!(n(&ticks[1]) == n(&ticks[0]) + 1 && n(&ticks[2]) == n(&ticks[1]) + 1, "consecutive live lines: {ticks:?}");
    let (rt2, id) = (rt.clone(), key.id());
    tokio::task::spawn_blocking(move || rt2.stop(&id, Duration::from_secs(1))).await.expect("task").expect("stop");
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while line_rx.recv().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "kubectl logs -f did not end after the container stopped");
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("task").expect("wait");
    assert!(status.success(), "kubectl logs -f: {status}");

    let _ = c.stop_agent.send(true);
    c.server.stop().await;
    drop(cleanup);
    drop(netns);
}
