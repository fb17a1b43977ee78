//! A lab of network namespaces for datapath tests and demos with real packets.
//!
//! This is a test and demo helper, not agent code: it panics (with the failing command and its
//! error) when the machine cannot build the lab, because its callers are tests and `skiff demo`,
//! where stopping with that message is the right outcome. Call [`require_privileges`] first.
//!
//! Topology (all names carry the test name and the pid, so parallel tests never collide):
//! ```text
//!   <p>-p0 (pod)            <p>-node                       <p>-p1 (pod)
//!   eth0 10.244.1.10/32 --- h0   [tc from_pod ingress]  h1 --- eth0 10.244.1.11/32
//!   default via 10.244.1.1       lo: 10.244.1.1/32 (the pods' gateway), ip_forward=1
//! ```
//! The host sides of the pod veths live in a "node" namespace, so nothing is attached in the root
//! namespace. TCX attachment resolves the interface in the *calling thread's* namespace, so the
//! tests attach from a thread that has setns()'d into the node namespace ([`Lab::in_node`]).
//! Safety: the node namespace has no interface leading out of the lab, so no lab packet (pods
//! 10.244.1.0/24, VIPs 10.96.0.0/16) can leave the machine; no route in the root namespace is
//! touched. The Drop guard deletes by name everything the lab created.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{Datapath, EndpointSpec};

/// Checks what real-packet tests need. Under CI=true a missing piece fails the test; otherwise
/// the test is skipped with a printed reason (returns false).
pub fn require_privileges(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        missing.push("bpffs at /sys/fs/bpf".to_string());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF (eBPF support)".to_string());
    }
    if Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        missing.push("iproute2 (`ip`) for network namespaces".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: real-packet tests must run, not skip)");
    }
    // Straight to the stderr handle: libtest captures eprintln!, and a skip must be visible.
    let _ = writeln!(std::io::stderr(), "SKIPPED {msg}");
    false
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread that has joined network namespace `netns`.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(netns);
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

/// Moves the calling thread into `netns` (setns affects only this thread).
pub fn enter_netns(netns: &str) {
    let f = File::open(format!("/run/netns/{netns}")).expect("opening netns");
    // SAFETY: a valid netns fd; CLONE_NEWNET only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {netns}: {}", std::io::Error::last_os_error());
}

pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
    pub host_ifindex: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
}

pub struct Lab {
    pub prefix: String,
    pub node: String,
    pub pods: Vec<Pod>,
    pub pin_dir: PathBuf,
    netns: Vec<String>,
    cgroups: Vec<PathBuf>,
    original_cgroup: Option<PathBuf>,
}

pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const UPLINK_NODE: Ipv4Addr = Ipv4Addr::new(10, 244, 250, 1);
pub const UPLINK_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 250, 2);

/// Turns transmit checksum offload on or off (ETHTOOL_STXCSUM through SIOCETHTOOL) in the
/// calling thread's namespace. Hand-written: the `ethtool` tool is not installed here and this
/// is one ioctl.
pub fn set_tx_checksum(iface: &str, on: bool) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct Ifreq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: on as u32,
    };
    let mut ifr = Ifreq {
        name: [0; 16],
        data: &mut value,
        _pad: [0; 16],
    };
    ifr.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: plain socket + ioctl with properly laid out arguments that outlive the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::ioctl(fd, SIOCETHTOOL, &mut ifr);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(rc, 0, "ETHTOOL_STXCSUM on {iface}: {err}");
    }
}

/// Plugs namespace `netns` into the bridge of `wire` (see [`Lab::add_wire`]): a veth `ifname`
/// in `netns` with `addr`/24, up, its peer `port` a port of `br0`. Transmit checksum offload
/// is off on `ifname`, so what it sends carries complete checksums as a real NIC's packets do
/// (XDP on the receiving side cannot fix up CHECKSUM_PARTIAL ones). `port` must be unique in
/// the wire (at most 15 bytes).
pub fn plug_into_wire(wire: &str, netns: &str, ifname: &str, addr: Ipv4Addr, port: &str) {
    ip(&[
        "-n", netns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", wire,
    ]);
    ip(&["-n", wire, "link", "set", port, "master", "br0"]);
    ip(&["-n", wire, "link", "set", port, "up"]);
    ip(&["-n", netns, "addr", "add", &format!("{addr}/24"), "dev", ifname]);
    ip(&["-n", netns, "link", "set", ifname, "up"]);
    in_netns(netns, || set_tx_checksum(ifname, false));
}

pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 10 + i as u8)
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Lab {
    /// Creates the node namespace and `pods` pod namespaces wired to it.
    pub fn new(test: &str, pods: usize) -> Lab {
        let prefix = format!("sk-{test}-{}", std::process::id());
        let node = format!("{prefix}-node");
        let mut lab = Lab {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/skiff-test/{prefix}")),
            prefix: prefix.clone(),
            node: node.clone(),
            pods: Vec::new(),
            netns: Vec::new(),
            cgroups: Vec::new(),
            original_cgroup: None,
        };
        ip(&["netns", "add", &node]);
        lab.netns.push(node.clone());
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{GATEWAY}/32"),
            "dev",
            "lo",
        ]);
        ip(&[
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        for i in 0..pods {
            lab.add_pod(i);
        }
        lab
    }

    fn add_pod(&mut self, i: usize) {
        let netns = format!("{}-p{i}", self.prefix);
        ip(&["netns", "add", &netns]);
        self.netns.push(netns.clone());
        let host_if = format!("h{i}");
        let pod_mac = [0x02, 0, 0, 0x02, 0, i as u8];
        let host_mac = [0x02, 0, 0, 0x01, 0, i as u8];
        let node = self.node.clone();
        ip(&[
            "-n",
            &node,
            "link",
            "add",
            &host_if,
            "address",
            &mac_str(&host_mac),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            &mac_str(&pod_mac),
            "netns",
            &netns,
        ]);
        ip(&["-n", &node, "link", "set", &host_if, "up"]);
        let pip = pod_ip(i);
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            &format!("{pip}/32"),
            "dev",
            &host_if,
        ]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pip}/32"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            &format!("{GATEWAY}"),
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &format!("{GATEWAY}"),
            "dev",
            "eth0",
        ]);
        let host_ifindex = in_netns(&node, || {
            let c = std::ffi::CString::new(host_if.clone()).expect("no NUL");
            // SAFETY: valid C string.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        });
        assert_ne!(host_ifindex, 0, "ifindex of {host_if}");
        self.pods.push(Pod {
            netns,
            ip: pip,
            host_if,
            host_ifindex,
            pod_mac,
            host_mac,
        });
    }

    /// Adds an "external" namespace `<p>-ext` wired to the node by the veth `up0` (the node's
    /// uplink, UPLINK_NODE/24) <-> `eth0` (the client, UPLINK_CLIENT/24). The client's transmit
    /// checksum offload is turned off so its packets carry complete checksums, as packets from a
    /// real NIC do (XDP cannot fix up CHECKSUM_PARTIAL packets). Returns the netns name.
    pub fn add_uplink(&mut self) -> String {
        let ext = format!("{}-ext", self.prefix);
        ip(&["netns", "add", &ext]);
        self.netns.push(ext.clone());
        let node = self.node.clone();
        ip(&[
            "-n", &node, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns",
            &ext,
        ]);
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{UPLINK_NODE}/24"),
            "dev",
            "up0",
        ]);
        ip(&["-n", &node, "link", "set", "up0", "up"]);
        ip(&["-n", &ext, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ext,
            "addr",
            "add",
            &format!("{UPLINK_CLIENT}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ext, "link", "set", "eth0", "up"]);
        in_netns(&ext, || set_tx_checksum("eth0", false));
        ext
    }

    /// Creates namespace `<prefix>-wire` holding a bridge `br0`: one L2 segment several
    /// namespaces (a client, nodes of different labs) plug into with [`plug_into_wire`], as
    /// the nodes of `skiff up` share the lab bridge. Deleted with the lab. Returns its name.
    pub fn add_wire(&mut self) -> String {
        let wire = self.extra_netns("wire");
        ip(&["-n", &wire, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &wire, "link", "set", "br0", "up"]);
        wire
    }

    /// Creates an extra namespace `<prefix>-<suffix>` that the lab deletes on drop.
    pub fn extra_netns(&mut self, suffix: &str) -> String {
        let name = format!("{}-{suffix}", self.prefix);
        ip(&["netns", "add", &name]);
        self.netns.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// Loads (or reloads from the pins) the datapath, attaches from_pod to every pod veth and
    /// registers every pod as a local endpoint.
    pub fn datapath(&self) -> Datapath {
        self.datapath_with(&crate::LoadOptions::from_env())
    }

    /// [`Lab::datapath`] with explicit load options (e.g. netlink tc forced).
    pub fn datapath_with(&self, options: &crate::LoadOptions) -> Datapath {
        let mut dp = Datapath::load_with(&self.pin_dir, options).expect("loading the datapath");
        self.in_node(|| {
            for p in &self.pods {
                dp.attach_tc(&p.host_if).expect("attaching tc");
            }
        });
        for p in &self.pods {
            dp.upsert_endpoint(
                p.ip,
                &EndpointSpec {
                    host_ifindex: p.host_ifindex,
                    pod_mac: p.pod_mac,
                    host_mac: p.host_mac,
                },
            )
            .expect("endpoint");
        }
        dp
    }

    pub fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.node, f)
    }

    /// Creates a cgroup v2 directory for this test (removed on drop).
    pub fn cgroup(&mut self) -> PathBuf {
        let root = crate::cgroup2_root().expect("cgroup2 mount");
        let dir = root.join(&self.prefix);
        std::fs::create_dir_all(&dir).expect("creating cgroup");
        self.cgroups.push(dir.clone());
        dir
    }

    /// Moves this whole test process into `cgroup` (moved back on drop).
    pub fn enter_cgroup(&mut self, cgroup: &Path) {
        if self.original_cgroup.is_none() {
            let own =
                std::fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup");
            let rel = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("/")
                .to_string();
            let root = crate::cgroup2_root().expect("cgroup2 mount");
            self.original_cgroup = Some(root.join(rel.trim_start_matches('/')));
        }
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .expect("joining cgroup");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(orig) = &self.original_cgroup {
            let _ = std::fs::write(orig.join("cgroup.procs"), std::process::id().to_string());
        }
        for c in self.cgroups.iter().rev() {
            let _ = std::fs::remove_dir(c);
        }
        for n in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        // The shared parent goes too once no other lab uses it (remove_dir refuses a non-empty
        // directory, so a concurrent lab keeps its pins).
        if let Some(parent) = self.pin_dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// A TCP and UDP server in a pod that answers every line / datagram with its own IP.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(netns: &str, ip: Ipv4Addr, port: u16) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        {
            let (stop, netns, tx) = (stop.clone(), netns.to_string(), tx.clone());
            threads.push(std::thread::spawn(move || {
                enter_netns(&netns);
                let l = TcpListener::bind(SocketAddrV4::new(ip, port)).expect("bind tcp");
                l.set_nonblocking(true).expect("nonblocking");
                tx.send(()).expect("ready");
                let mut conns: Vec<JoinHandle<()>> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) if conns.len() < 2000 => {
                            let stop = stop.clone();
                            conns.push(std::thread::spawn(move || serve_tcp(s, ip, stop)));
                        }
                        Ok(_) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                    conns.retain(|h| !h.is_finished());
                }
                for c in conns {
                    let _ = c.join();
                }
            }));
        }
        {
            let (stop, netns) = (stop.clone(), netns.to_string());
            threads.push(std::thread::spawn(move || {
                enter_netns(&netns);
                let u = UdpSocket::bind(SocketAddrV4::new(ip, port)).expect("bind udp");
                u.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                tx.send(()).expect("ready");
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = u.recv_from(&mut buf) {
                        // "peer" asks which client address the server sees, as over TCP.
                        let answer = if &buf[..n] == b"peer" {
                            from.ip().to_string()
                        } else {
                            ip.to_string()
                        };
                        let _ = u.send_to(answer.as_bytes(), from);
                    }
                }
            }));
        }
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("server ready");
        }
        Server { stop, threads }
    }
}

fn serve_tcp(s: TcpStream, ip: Ipv4Addr, stop: Arc<AtomicBool>) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                // "peer" asks who the server sees as the client (source-IP preservation tests).
                let answer = if line.trim() == "peer" {
                    w.peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default()
                } else {
                    ip.to_string()
                };
                if w.write_all(format!("{answer}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP request: connect, send a line, read who answered. Returns (answering IP, peer_addr).
pub fn tcp_ask(dst: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = s.peer_addr()?;
    let mut w = s.try_clone()?;
    w.write_all(b"who\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok((line.trim().to_string(), peer))
}

/// Asks a server which client address it sees.
pub fn tcp_ask_peer(dst: SocketAddr) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut w = s.try_clone()?;
    w.write_all(b"peer\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// One UDP request from a fresh unconnected socket: returns (answering IP, reply source).
pub fn udp_ask(dst: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let u = UdpSocket::bind("0.0.0.0:0")?;
    u.set_read_timeout(Some(Duration::from_secs(2)))?;
    u.send_to(b"who", dst)?;
    let mut buf = [0u8; 64];
    let (n, from) = u.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).to_string(), from))
}

/// Asks a UDP server which client address it sees, from a fresh unconnected socket: returns
/// (the address the server saw, the reply's source).
pub fn udp_ask_peer(dst: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let u = UdpSocket::bind("0.0.0.0:0")?;
    u.set_read_timeout(Some(Duration::from_secs(2)))?;
    u.send_to(b"peer", dst)?;
    let mut buf = [0u8; 64];
    let (n, from) = u.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).to_string(), from))
}

/// A persistent TCP connection for tests that keep a flow open across changes.
pub struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(dst: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Conn {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }
    pub fn ask(&mut self) -> std::io::Result<String> {
        self.w.write_all(b"who\n")?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(line.trim().to_string())
    }
}
