//! skiff-cni under containerd's CRI plugin as a real consumer, driven by skiff's own CRI client:
//! containerd 1.6 (Debian's package) alone, no agent, runs in a "node" network namespace the test
//! makes, with skiff-cni as its only CNI plugin. RunPodSandbox gets an address from skiff-cni's
//! IPAM and the pod answers TCP from the node; containers show their exit codes, OOM kills,
//! CRI-format logs, ExecSync and stop-with-grace; RemovePodSandbox (which calls DEL twice, the
//! second time with an empty netns) leaves no IPAM allocation, veth or netns behind.
//!
//! Traffic goes only to the pod address inside the namespaces made here. Everything is under a
//! temporary folder and removed, with the node netns and the test's cgroups, on the way out.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_runtime::cri::containerd::{self, ContainerdPaths};
use skiff_runtime::cri::proto;
use skiff_runtime::cri::status::CriContainerState;
use skiff_runtime::cri::CriRuntime;

const POD_CIDR: &str = "10.244.201.0/24";
/// containerd's CRI plugin always brings up the sandbox's `lo` with the reference `loopback`
/// plugin, from the same bin_dir as the network's plugins.
const LOOPBACK: &str = "/usr/lib/cni/loopback";

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// root, containerd, ctr, runc and iproute2 are needed; under CI=true their absence fails.
fn require(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for (tool, pkg) in [("containerd", "containerd"), ("ctr", "containerd"), ("containerd-shim-runc-v2", "containerd"), ("runc", "runc"), ("ip", "iproute2"), ("busybox", "busybox-static")] {
        if !have(tool) {
            missing.push(format!("{tool} (apt-get install {pkg})"));
        }
    }
    if !Path::new(LOOPBACK).is_file() {
        missing.push(format!("{LOOPBACK} (apt-get install containernetworking-plugins)"));
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: this test must run, not skip)");
    }
    eprintln!("SKIPPED {msg}");
    false
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The skiff-cni binary of this workspace (built when this test runs alone).
fn skiff_cni() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf();
    let bin = dir.join("skiff-cni");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "skiff-cni", "--bin", "skiff-cni"]).current_dir(repo_root());
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("cargo build -p skiff-cni");
    assert!(st.success() && bin.is_file(), "building skiff-cni failed ({})", bin.display());
    bin
}

fn build_image(script: &str, out: &Path) {
    let st = Command::new("bash").arg(repo_root().join("scripts").join(script)).arg(out).status().expect("run image script");
    assert!(st.success(), "scripts/{script} failed");
}

fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {}s waiting for {what}", timeout.as_secs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `f` on a thread inside `/run/netns/<name>`.
fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(Path::new("/run/netns").join(name)).expect("open netns");
            // SAFETY: a valid netns fd, for this thread only.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {name}");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn ask(dst: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// The lab: node netns + containerd + folders. Drop takes everything down, even after a panic.
struct Lab {
    dir: tempfile::TempDir,
    node: String,
    paths: ContainerdPaths,
    child: Option<std::process::Child>,
    cri: Option<CriRuntime>,
    cgroup: String,
    /// Sandbox netns files seen (removed on the way out should containerd fail to).
    netns_seen: Vec<PathBuf>,
}

impl Lab {
    fn cni_data(&self) -> PathBuf {
        self.dir.path().join("cni-data")
    }

    fn allocations(&self) -> Vec<String> {
        std::fs::read_dir(self.cni_data())
            .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().map(String::from)).filter(|n| n.parse::<Ipv4Addr>().is_ok()).collect())
            .unwrap_or_default()
    }

    fn node_veths(&self) -> Vec<String> {
        let out = Command::new("ip").args(["-n", &self.node, "-o", "link"]).output().expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter(|n| n.starts_with("skf"))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    fn cri(&self) -> &CriRuntime {
        self.cri.as_ref().expect("cri client")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(cri) = &self.cri
            && let Ok(sbs) = cri.list_pod_sandboxes(&BTreeMap::new())
        {
            for sb in sbs {
                let _ = cri.stop_pod_sandbox(&sb.id);
                let _ = cri.remove_pod_sandbox(&sb.id);
            }
        }
        self.cri = None;
        let pid = self.child.as_ref().map(|c| c.id());
        containerd::stop(&self.paths, pid);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        containerd::remove_all(&self.paths);
        for ns in &self.netns_seen {
            containerd::unmount_under(ns);
            let _ = std::fs::remove_file(ns);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.node]).status();
        remove_cgroup_tree(&self.cgroup);
    }
}

/// Removes `/<rel>` in every cgroup hierarchy, deepest first.
fn remove_cgroup_tree(rel: &str) {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(rd.flatten().map(|e| e.path()));
    }
    for root in roots {
        let top = root.join(rel);
        let mut dirs = vec![];
        collect(&top, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn collect(d: &Path, out: &mut Vec<PathBuf>) {
    if !d.is_dir() {
        return;
    }
    out.push(d.to_path_buf());
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect(&e.path(), out);
        }
    }
}

fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    for root in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        collect(&root.path().join(rel), &mut out);
    }
    out
}

fn container_config(name: &str, command: &[&str], memory: Option<i64>) -> proto::ContainerConfig {
    proto::ContainerConfig {
        metadata: Some(proto::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(proto::ImageSpec { image: "docker.io/skiff/echo:1.0".into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        labels: [("skiff.test/container".to_string(), name.to_string())].into_iter().collect(),
        linux: Some(proto::LinuxContainerConfig {
            resources: Some(proto::LinuxContainerResources { memory_limit_in_bytes: memory.unwrap_or(0), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn wait_exited(cri: &CriRuntime, id: &str, timeout: Duration) -> skiff_runtime::cri::ContainerSummary {
    eventually(&format!("container {id} exited"), timeout, || {
        cri.container_status(id).ok().flatten().filter(|s| s.state == CriContainerState::Exited)
    })
}

#[test]
fn containerd_runs_a_pod_on_skiff_cni_and_removes_it_cleanly() {
    if !require("containerd_runs_a_pod_on_skiff_cni_and_removes_it_cleanly") {
        return;
    }
    let cni_bin = skiff_cni();
    let images = repo_root().join("target/images");
    let pause = images.join("skiff-pause-1.0.oci.tar");
    let echo = images.join("skiff-echo-1.0.oci.tar");
    build_image("build-pause-image.sh", &pause);
    build_image("build-image.sh", &echo);

    let dir = tempfile::Builder::new().prefix("skiff-containerd").tempdir().expect("tempdir");
    let node = format!("skcd-{}", std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &node]).status().expect("ip").success(), "ip netns add {node}");
    let _ = Command::new("ip").args(["-n", &node, "link", "set", "lo", "up"]).status();
    let paths = ContainerdPaths::new(&dir.path().join("containerd"), &dir.path().join("cni-bin"), &dir.path().join("cni-conf"));
    let mut lab = Lab { paths, node: node.clone(), child: None, cri: None, cgroup: format!("skiff-cri-test-{}", std::process::id()), netns_seen: vec![], dir };
    lab.paths.prepare().expect("containerd folders");
    std::fs::copy(&cni_bin, lab.paths.cni_bin_dir.join("skiff-cni")).expect("install skiff-cni");
    std::fs::copy(LOOPBACK, lab.paths.cni_bin_dir.join("loopback")).expect("install loopback");
    // What the agent writes for a CRI node (`skiff_agent::conflist`), minus pinDir: no datapath
    // here. containerd 1.6's libcni reads results up to CNI 1.0.0, so the list says 1.0.0.
    let conflist = serde_json::json!({"cniVersion": "1.0.0", "name": "skiff", "plugins": [
        {"type": "skiff-cni", "podCIDR": POD_CIDR, "dataDir": lab.cni_data().display().to_string(), "mtu": 1500}]});
    std::fs::write(lab.paths.cni_conf_dir.join("10-skiff.conflist"), conflist.to_string()).expect("conflist");

    let child = containerd::spawn(&lab.paths, Some(&node), false).expect("start containerd");
    let pid = child.id();
    lab.child = Some(child);
    lab.cri = Some(containerd::wait_ready(&lab.paths, pid, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}")));
    let v = lab.cri().version().expect("Version");
    assert_eq!(v.runtime_name, "containerd");
    assert_eq!(v.runtime_api_version, "v1");
    for archive in [&pause, &echo] {
        containerd::import_image(&lab.paths, archive).unwrap_or_else(|e| panic!("{e}"));
    }
    eventually("containerd's CNI network ready (the conflist loaded)", Duration::from_secs(30), || lab.cri().network_ready().ok().filter(|r| *r));
    let img = lab.cri().image_status("docker.io/skiff/echo:1.0").expect("ImageStatus").expect("the echo image is in containerd");
    assert_eq!(img.entrypoint, vec!["/usr/local/bin/skiff-echo"], "the image config comes through: {img:?}");
    assert!(lab.cri().image_status("docker.io/skiff/absent:9").expect("ImageStatus").is_none());

    // RunPodSandbox: netns + CNI ADD by containerd, with skiff-cni.
    let logs = lab.dir.path().join("pod/logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let labels: BTreeMap<String, String> = [("io.kubernetes.pod.uid".to_string(), "uid-1".to_string())].into_iter().collect();
    let sandbox_config = proto::PodSandboxConfig {
        metadata: Some(proto::PodSandboxMetadata { name: "web".into(), uid: "uid-1".into(), namespace: "default".into(), attempt: 0 }),
        hostname: "web".into(),
        log_directory: logs.display().to_string(),
        labels: labels.clone().into_iter().collect(),
        linux: Some(proto::LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}/poduid-1", lab.cgroup),
            security_context: Some(proto::LinuxSandboxSecurityContext {
                namespace_options: Some(proto::NamespaceOption { network: proto::NamespaceMode::Pod as i32, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sb = lab.cri().run_pod_sandbox(sandbox_config.clone()).unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", std::fs::read_to_string(lab.paths.log_file()).unwrap_or_default()));
    let st = lab.cri().pod_sandbox_status(&sb).expect("PodSandboxStatus").expect("the sandbox exists");
    assert!(st.ready, "the sandbox is ready: {st:?}");
    let ip: Ipv4Addr = st.ip.as_deref().expect("the sandbox got an IP").parse().expect("an IPv4 address");
    let cidr: ipnet::Ipv4Net = POD_CIDR.parse().expect("cidr");
    assert!(cidr.contains(&ip) && ip != cidr.network(), "{ip} comes from skiff-cni's podCIDR {POD_CIDR}");
    let netns = st.netns_path.clone().expect("the sandbox's netns path");
    lab.netns_seen.push(netns.clone());
    assert!(netns.exists(), "{} exists", netns.display());
    assert_eq!(lab.allocations(), vec![ip.to_string()], "one IPAM allocation, for the pod");
    assert_eq!(lab.node_veths().len(), 1, "one host veth in the node netns: {:?}", lab.node_veths());
    let listed = lab.cri().list_pod_sandboxes(&labels).expect("ListPodSandbox");
    assert_eq!(listed.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), vec![sb.clone()], "found again by its labels");

    // A server container in it, reachable from the node at the pod's address.
    let web = lab.cri().create_container(&sb, container_config("echo", &[], None), sandbox_config.clone()).expect("CreateContainer");
    lab.cri().start_container(&web).expect("StartContainer");
    let s = lab.cri().container_status(&web).expect("status").expect("exists");
    assert_eq!(s.state, CriContainerState::Running, "{s:?}");
    assert!(s.pid.is_some_and(|p| p > 1), "the running container's pid: {s:?}");
    let dst = SocketAddr::from((ip, 9000));
    let answer = eventually("the pod answers on its skiff-cni address", Duration::from_secs(20), || in_netns(&node, || ask(dst).ok()));
    assert!(answer.starts_with("web ") && answer.ends_with(&ip.to_string()), "answered {answer:?}");
    let found = lab.cri().list_containers(&[("skiff.test/container".to_string(), "echo".to_string())].into_iter().collect()).expect("ListContainers");
    assert_eq!(found.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), vec![web.clone()]);

    // ExecSync: output and exit code.
    let out = lab.cri().exec_sync(&web, &["sh".into(), "-c".into(), "echo hi; echo oops >&2; exit 4".into()], Duration::from_secs(10)).expect("ExecSync");
    assert_eq!((out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code), (&b"hi\n"[..], &b"oops\n"[..], 4));

    // Stop with grace: skiff-echo exits 0 on SIGTERM at once.
    let t = Instant::now();
    lab.cri().stop_container(&web, Duration::from_secs(20)).expect("StopContainer");
    let s = wait_exited(lab.cri(), &web, Duration::from_secs(5));
    assert_eq!(s.exit_code, 0, "SIGTERM ends skiff-echo cleanly: {s:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "no need for the whole grace period: {:?}", t.elapsed());

    // One that ignores SIGTERM waits the grace period, then SIGKILL (137).
    let stubborn = lab.cri().create_container(&sb, container_config("stubborn", &["sh", "-c", "trap '' TERM; echo ready; while true; do sleep 1; done"], None), sandbox_config.clone()).expect("create");
    lab.cri().start_container(&stubborn).expect("start");
    eventually("stubborn logged ready", Duration::from_secs(10), || std::fs::read_to_string(logs.join("stubborn/0.log")).ok().filter(|l| l.contains("ready")));
    let t = Instant::now();
    lab.cri().stop_container(&stubborn, Duration::from_secs(2)).expect("StopContainer");
    let s = wait_exited(lab.cri(), &stubborn, Duration::from_secs(10));
    assert!(t.elapsed() >= Duration::from_secs(2), "the grace period was given: {:?}", t.elapsed());
    assert_eq!(s.exit_code, 137, "SIGKILL after the grace: {s:?}");

    // Exit code and CRI-format logs at log_directory/log_path.
    let failing = lab.cri().create_container(&sb, container_config("failing", &["sh", "-c", "echo to-out; echo to-err >&2; exit 3"], None), sandbox_config.clone()).expect("create");
    lab.cri().start_container(&failing).expect("start");
    let s = wait_exited(lab.cri(), &failing, Duration::from_secs(15));
    assert_eq!((s.exit_code, s.reason.as_str()), (3, "Error"), "{s:?}");
    // Both times are set; containerd stamps started_at after the start returns, so a container
    // this quick can look finished before it started.
    assert!(s.started_at > 0 && s.finished_at > 0, "{s:?}");
    assert_eq!(Path::new(&s.log_path), logs.join("failing/0.log"));
    let log = std::fs::read_to_string(logs.join("failing/0.log")).expect("the container's log");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.iter().any(|l| l.ends_with(" stdout F to-out")) && lines.iter().any(|l| l.ends_with(" stderr F to-err")), "CRI log format: {log}");
    assert!(lines.iter().all(|l| l.split(' ').next().is_some_and(|t| t.contains('T') && t.ends_with('Z') || t.contains('+'))), "RFC 3339 timestamps: {log}");

    // Over its memory limit: OOMKilled.
    let hog = lab.cri().create_container(&sb, container_config("hog", &["sh", "-c", "x=a; while true; do x=$x$x; done"], Some(24 << 20)), sandbox_config.clone()).expect("create");
    lab.cri().start_container(&hog).expect("start");
    let s = wait_exited(lab.cri(), &hog, Duration::from_secs(30));
    assert!(s.oom_killed(), "reason OOMKilled: {s:?}");
    assert_eq!(s.exit_code, 137, "{s:?}");

    // Removal: containers, then the sandbox (StopPodSandbox: CNI DEL; RemovePodSandbox: DEL again
    // with an empty netns). Nothing of the pod stays.
    for id in [&web, &stubborn, &failing, &hog] {
        lab.cri().remove_container(id).expect("RemoveContainer");
        assert!(lab.cri().container_status(id).expect("status").is_none(), "{id} is gone");
    }
    lab.cri().remove_container(&web).expect("removing twice is no error");
    lab.cri().stop_pod_sandbox(&sb).expect("StopPodSandbox");
    lab.cri().remove_pod_sandbox(&sb).expect("RemovePodSandbox");
    lab.cri().remove_pod_sandbox(&sb).expect("removing twice is no error");
    assert!(lab.cri().pod_sandbox_status(&sb).expect("status").is_none(), "the sandbox is gone");
    assert!(lab.allocations().is_empty(), "no IPAM allocation left: {:?}", lab.allocations());
    assert!(lab.node_veths().is_empty(), "no host veth left: {:?}", lab.node_veths());
    assert!(!netns.exists(), "the sandbox netns {} is gone", netns.display());
    let pod_root = lab.dir.path().join("containerd");
    let left: Vec<String> = containerd::mounts_under(&pod_root).into_iter().filter(|m| m.contains(&sb) || m.contains(&web)).collect();
    assert!(left.is_empty(), "no mount of the pod left: {left:?}");
    // The pod-level cgroup stays after RemovePodSandbox (as kubelet knows): its children go.
    let cg = cgroup_dirs(&format!("{}/poduid-1", lab.cgroup));
    assert!(cg.iter().all(|d| d.ends_with("poduid-1")), "only the pod-level cgroup stays: {cg:?}");

    // The client's errors are clear, and unknown ids change nothing.
    let e = lab.cri().start_container("no-such-container").expect_err("unknown id");
    assert!(e.is_not_found() || e.to_string().contains("no-such-container"), "{e}");
    assert!(CriRuntime::connect("unix:///nonexistent/containerd.sock").is_err());
    assert!(CriRuntime::connect("tcp://127.0.0.1:1").is_err());
}
