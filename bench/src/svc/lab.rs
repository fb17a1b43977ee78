//! The benchmark's lab: skiff_datapath's netns lab (a node namespace, pod namespaces on veths,
//! an "external" namespace on the node's uplink), the server and client programs as child
//! processes inside it, and the installers for each path's rules.
//!
//! ```text
//!   ext (client for NodePort) --up0-- node --h0-- pod0 (client)
//!   10.244.250.2                       |  --h1-- pod1 (server) 10.244.1.11
//!                                      |  --hN-- podN (server)
//! ```
//! Everything (rules, maps, cgroup, processes) lives in or under namespaces this lab creates and
//! goes with it: the iptables/nftables rules are written into the node namespace only, and
//! deleting the namespace deletes them; the servers are stopped by PID on drop.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use skiff_datapath::lab::{Lab, UPLINK_CLIENT, UPLINK_NODE, ip, pod_ip};

use super::workload::Measurement;

/// Where skiff's NodePort SNAT puts the client address (as the datapath's own tests do).
pub const NODEPORT_SNAT: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 2);

/// Runs `program args` inside network namespace `netns` (through nsenter, which unlike
/// `ip netns exec` does not remount /sys), feeding `stdin`, bounded by `timeout`. Returns the
/// wall time from spawn to exit, which is what a proxy calling the tool pays.
pub fn run_in_netns(
    netns: &str,
    program: &str,
    args: &[&str],
    stdin: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} in {netns}"))?;
    let mut input = child.stdin.take().context("stdin")?;
    let data = stdin.as_bytes().to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut stderr = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} in {netns} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let elapsed = t.elapsed();
    let _ = writer.join();
    let err = reader.join().unwrap_or_default();
    if !status.success() {
        let excerpt: String = err.lines().take(5).collect::<Vec<_>>().join("; ");
        bail!("{program} {} in {netns} failed ({status}): {excerpt}", args.join(" "));
    }
    Ok(elapsed)
}

/// Output of a command in a namespace (for checks after an install).
pub fn output_in_netns(netns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} in {netns}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} in {netns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sysctl(netns: &str, kv: &[&str]) {
    let mut args = vec!["netns", "exec", netns, "sysctl", "-qw"];
    args.extend_from_slice(kv);
    ip(&args);
}

/// A server program running in a pod; stopped (by its PID) on drop.
struct ServerProc {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        // Closing stdin tells it to exit; kill by PID if it does not within a second.
        drop(self.stdin.take());
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(1) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct BenchLab {
    /// Declared before `lab` so the servers stop before their namespaces go.
    servers: Vec<ServerProc>,
    pub lab: Lab,
    pub ext: String,
    exe: PathBuf,
    /// CPUs for (clients, servers): every round trip then crosses CPUs the same way on every
    /// path. Unpinned, the scheduler sometimes puts both ends on one CPU (a ~6 us round trip on
    /// this VM) and sometimes not (~45 us: a cross-CPU wakeup), which swamps what is measured.
    pub pin: Option<(usize, usize)>,
}

impl BenchLab {
    /// A node with a client pod (pod0), `servers` server pods and an external client namespace.
    /// `exe` is this program (started again as `server` / `client`).
    pub fn new(name: &str, servers: usize, exe: &Path) -> BenchLab {
        let mut lab = Lab::new(name, 1 + servers);
        let ext = lab.add_uplink();
        // The external client reaches pod IPs through the node (the NodePort path's baseline).
        ip(&[
            "-n",
            &ext,
            "route",
            "add",
            "10.244.1.0/24",
            "via",
            &UPLINK_NODE.to_string(),
        ]);
        // Clients open tens of thousands of short connections: reuse TIME_WAIT ports (the
        // client closes first) and use the whole port range, in the client namespaces only.
        for ns in [lab.pods[0].netns.clone(), ext.clone()] {
            sysctl(
                &ns,
                &[
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.ipv4.ip_local_port_range=1024 65000",
                ],
            );
        }
        BenchLab {
            servers: Vec::new(),
            lab,
            ext,
            exe: exe.to_path_buf(),
            pin: None,
        }
    }

    pub fn client_netns(&self) -> &str {
        &self.lab.pods[0].netns
    }

    pub fn server_ips(&self) -> Vec<Ipv4Addr> {
        (1..self.lab.pods.len()).map(pod_ip).collect()
    }

    /// Starts the server program in every server pod, listening on `ports`.
    pub fn start_servers(&mut self, ports: &[u16], workers: usize) -> anyhow::Result<()> {
        let ports_arg = ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        for i in 1..self.lab.pods.len() {
            let pod = &self.lab.pods[i];
            let mut cmd = Command::new(&self.exe);
            if let Some((_, cpu)) = self.pin {
                cmd.arg("--cpu").arg(cpu.to_string());
            }
            let mut child = cmd
                .args(["server", "--netns", &pod.netns, "--ip"])
                .arg(pod.ip.to_string())
                .args(["--ports", &ports_arg, "--workers"])
                .arg(workers.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a server")?;
            let stdout = child.stdout.take().context("server stdout")?;
            let stdin = child.stdin.take();
            let proc = ServerProc { child, stdin };
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .context("server did not report ready within 10 s")?;
            if line.trim() != "ready" {
                bail!("server in {} failed to start: {line:?}", pod.netns);
            }
            self.servers.push(proc);
        }
        Ok(())
    }

    /// Runs the client program in `netns` (joining `cgroup` first if given) and returns what it
    /// measured.
    pub fn run_client(
        &self,
        netns: &str,
        cgroup: Option<&Path>,
        targets: &[SocketAddrV4],
        workloads: &[String],
        duration: Duration,
    ) -> anyhow::Result<Vec<Measurement>> {
        let targets_arg = targets
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(&self.exe);
        if let Some((cpu, _)) = self.pin {
            cmd.arg("--cpu").arg(cpu.to_string());
        }
        cmd.args(["client", "--netns", netns, "--targets", &targets_arg])
            .args(["--workloads", &workloads.join(",")])
            .arg("--duration-ms")
            .arg(duration.as_millis().to_string());
        if let Some(cg) = cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the client")?;
        let mut stdout = child.stdout.take().context("client stdout")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        // Each workload takes `duration` plus a warm-up and at most a few I/O timeouts.
        let limit = duration * (workloads.len() as u32 + 1) + Duration::from_secs(30);
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                bail!("client in {netns} did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = reader.join().unwrap_or_default();
        if !status.success() {
            bail!("client in {netns} failed ({status})");
        }
        serde_json::from_str(out.trim()).context("parsing the client's results")
    }
}

/// The node's address on the uplink (NodePort frontends live there).
pub fn node_ip() -> Ipv4Addr {
    UPLINK_NODE
}

pub fn external_client_ip() -> Ipv4Addr {
    UPLINK_CLIENT
}
