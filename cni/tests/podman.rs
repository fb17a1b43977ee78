//! skiff-cni under a real consumer: podman 4.3 with its CNI backend (Debian's `podman`), runc,
//! and a busybox-static root filesystem (`--rootfs`, so no image or registry is involved).
//! podman runs inside a "node" network namespace the test creates (entered with setns), so the
//! plugin's node-side changes (host veths, routes, the gateway on lo, ip_forward) stay there.
//! Everything podman keeps (storage, runroot, configuration) lives in one temporary folder.

use std::{
    fs::File,
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use skiff_datapath::lab::ip;

const BIN: &str = env!("CARGO_BIN_EXE_skiff-cni");
const BUSYBOX: &str = "/bin/busybox";

/// podman, runc and busybox-static are needed; under CI=true their absence fails the test.
fn require_podman(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for (tool, arg) in [("podman", "--version"), ("runc", "--version"), ("ip", "-V")] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            missing.push(format!("{tool} (Debian package {tool})"));
        }
    }
    if !Path::new(BUSYBOX).exists() {
        missing.push("busybox-static at /bin/busybox".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: consumer tests must run, not skip)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {msg}");
    false
}

struct PodmanLab {
    dir: tempfile::TempDir,
    node: String,
    containers: Vec<String>,
}

impl PodmanLab {
    fn new(test: &str) -> PodmanLab {
        let node = format!("skp-{test}-{}-n", std::process::id());
        ip(&["netns", "add", &node]);
        let lab = PodmanLab {
            dir: tempfile::Builder::new()
                .prefix("skiff-podman")
                .tempdir()
                .expect("tempdir"),
            node,
            containers: Vec::new(),
        };
        let d = lab.dir.path();
        for sub in [
            "net.d",
            "bin",
            "storage",
            "run",
            "data",
            "rootfs/bin",
            "rootfs/www",
        ] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        std::fs::copy(BIN, d.join("bin/skiff-cni")).expect("installing skiff-cni");
        std::fs::copy(BUSYBOX, d.join("rootfs/bin/busybox")).expect("busybox");
        for tool in ["sh", "ip", "wget", "httpd", "cat", "sleep"] {
            std::os::unix::fs::symlink("busybox", d.join("rootfs/bin").join(tool))
                .expect("symlink");
        }
        std::fs::write(d.join("rootfs/www/index.html"), "skiff-pod-ok\n").expect("index");
        let p = |s: &str| d.join(s).display().to_string();
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\ntmp_dir = \"{}\"\n",
                p("bin"),
                p("net.d"),
                p("run/tmp")
            ),
        )
        .expect("containers.conf");
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                p("run/storage"),
                p("storage")
            ),
        )
        .expect("storage.conf");
        std::fs::write(
            d.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .expect("registries.conf");
        // What `skiff install-cni` / the agent writes, minus pinDir (no agent here).
        std::fs::write(
            d.join("net.d/skiff.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "skiff",
                "plugins": [{"type": "skiff-cni", "podCIDR": "10.244.9.0/24",
                             "dataDir": p("data"), "mtu": 1500}]
            })
            .to_string(),
        )
        .expect("conflist");
        lab
    }

    /// Runs podman in the node namespace (bounded by `timeout`).
    fn podman(&self, args: &[&str]) -> Output {
        let d = self.dir.path();
        let ns = File::open(format!("/run/netns/{}", self.node)).expect("node netns");
        let fd = ns.as_raw_fd();
        let mut cmd = Command::new("timeout");
        cmd.arg("120")
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"));
        // SAFETY: setns is async-signal-safe; `ns` stays open until output() returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().expect("running podman");
        drop(ns);
        out
    }

    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn rootfs(&self) -> String {
        self.dir.path().join("rootfs").display().to_string()
    }

    fn allocations(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path().join("data"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn node_veths(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.node, "-o", "link"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter(|n| n.starts_with("skf"))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
}

impl Drop for PodmanLab {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.podman(&["rm", "-f", "-t", "0", c]);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node])
            .output();
        // podman (cgroupfs manager) puts conmon in libpod_parent/conmon in every hierarchy;
        // rmdir removes only empty cgroups, so another podman user's cgroups stay.
        for root in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let parent = root.path().join("libpod_parent");
            let _ = std::fs::remove_dir(parent.join("conmon"));
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

#[test]
fn podman_runs_containers_on_skiff_cni() {
    if !require_podman("podman_runs_containers_on_skiff_cni") {
        return;
    }
    let mut lab = PodmanLab::new("run");
    let nets = lab.podman_ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    assert!(
        nets.contains("skiff skiff-cni"),
        "podman sees the conflist: {nets}"
    );

    // One container: podman calls VERSION and ADD; eth0 has the /32 the plugin allocated.
    let rootfs = lab.rootfs();
    let addr = lab.podman_ok(&[
        "run",
        "--rm",
        "--network",
        "skiff",
        "--rootfs",
        &rootfs,
        "/bin/ip",
        "-4",
        "addr",
        "show",
        "eth0",
    ]);
    assert!(
        addr.contains("inet 10.244.9.2/32"),
        "eth0 in the container: {addr}"
    );
    // --rm: podman called DEL, which freed the address and removed the host veth.
    assert!(lab.allocations().is_empty(), "DEL freed the address");
    assert!(lab.node_veths().is_empty(), "DEL removed the host veth");

    // Two containers talk over TCP through their veths: busybox httpd and wget.
    let name = format!("skp-srv-{}", std::process::id());
    lab.containers.push(name.clone());
    lab.podman_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "skiff",
        "--rootfs",
        &rootfs,
        "/bin/httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let ip = lab
        .podman_ok(&[
            "inspect",
            &name,
            "--format",
            "{{.NetworkSettings.Networks.skiff.IPAddress}}",
        ])
        .trim()
        .to_string();
    assert!(
        ip.starts_with("10.244.9."),
        "podman reports the plugin's address: {ip}"
    );
    assert_eq!(lab.allocations().len(), 1);
    assert_eq!(lab.node_veths().len(), 1);
    let url = format!("http://{ip}:8080/");
    // httpd may need a moment to listen: a few tries, bounded. (No wget -T: busybox 1.35's
    // wget segfaults with it; `timeout 120` bounds each call.)
    let mut body = String::new();
    for _ in 0..5 {
        let out = lab.podman(&[
            "run",
            "--rm",
            "--network",
            "skiff",
            "--rootfs",
            &rootfs,
            "/bin/wget",
            "-qO-",
            &url,
        ]);
        body = format!(
            "{:?} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if body.contains("skiff-pod-ok") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(
        body.contains("skiff-pod-ok"),
        "the client container fetched from the server container: {body:?}"
    );
    lab.podman_ok(&["rm", "-f", "-t", "0", &name]);
    lab.containers.clear();
    assert!(
        lab.allocations().is_empty(),
        "removing the server freed its address"
    );
    assert!(lab.node_veths().is_empty(), "and its host veth");
}
