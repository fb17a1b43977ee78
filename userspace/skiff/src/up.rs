//! `skiff up` / `skiff down`: a whole cluster on this machine.
//!
//! ```text
//!   root namespace                               node namespaces (<name>-node-<i>)
//!   skiff server  https://172.20.0.1:6443        eth0 172.20.0.1<i>/24   skiff agent (setns'd here)
//!   bridge <name>-br 172.20.0.1/24 --- veth ---  lo: 10.244.<k>.1 (pod gateway)
//!   blackhole 10.244.0.0/16, 10.96.0.0/12        pods: veth pairs, tc from_pod, routes to other nodes
//! ```
//! Safety: the node namespaces have no default route and the root namespace blackholes the
//! pod and service ranges, so a lab packet that is not translated never leaves the machine.
//!
//! The lab plumbing (bridge, veths, namespaces, blackhole routes) is a dozen iproute2 commands,
//! run as commands on purpose: a person can read them in `lab.json`'s order and redo or undo
//! any of them by hand. The agent's own runtime networking goes through netlink.
//! Everything made is recorded in `<data-dir>/lab.json` before it is made, so `skiff down`
//! removes exactly that, by name and by the PIDs started, even after a half-finished `up`.
//!
//! `--network vxlan` splits the lab in two L2 segments (see [`add_segment_b`]): odd nodes stay
//! on the bridge (as /25s), even nodes sit on a second bridge behind a router namespace, so
//! nodes on different segments reach each other's IPs only through the router, which knows no
//! pod range of the other segment's nodes: native routes could not even be installed, and pod
//! traffic between the segments crosses only as VXLAN between node IPs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/skiff-up";
const LAB_PREFIX: u8 = 24;
const POD_RANGE: &str = "10.244.0.0/16";
const SERVICE_RANGE: &str = "10.96.0.0/12";

#[derive(clap::Args, Clone)]
pub struct UpArgs {
    /// How many nodes (each a network namespace with its own agent).
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// Where the cluster keeps everything (server store, node state, logs, lab.json).
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The cluster's name: the prefix of every namespace, link and pin it makes (<= 8 chars).
    #[arg(long, default_value = "skiff")]
    pub name: String,
    /// The lab network's third octet: the bridge is 172.20.<N>.1/24.
    #[arg(long, default_value_t = 0)]
    pub lab_net: u8,
    /// OCI or docker archives to import into the nodes' image store.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// Seconds between container restarts, doubled per crash (kubelet: 10).
    #[arg(long, default_value_t = 10)]
    pub restart_backoff: u64,
    /// An extra flag for `skiff server`, e.g. --server-arg=--node-monitor-grace-period=10s.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// An extra flag for every `skiff agent`, e.g. --agent-arg=--heartbeat-interval=2s.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// When a cluster is already up in --data-dir, say so and succeed instead of failing.
    #[arg(long)]
    pub keep_existing: bool,
    /// The nodes' container runtime: runc (skiff's own), or cri: one private containerd per node
    /// (root, state and socket under the node's folder, running in the node's namespace) that
    /// the agent drives over CRI and that calls skiff-cni itself. Every --image goes into each
    /// node's containerd; one of them must be the pause image (scripts/build-pause-image.sh).
    #[arg(long, default_value = "runc", value_parser = ["runc", "cri"])]
    pub runtime: String,
    /// How pods reach other nodes (the agents' --network): native routes on one bridge, or
    /// vxlan, where the nodes are also split over two L2 segments joined by a router namespace,
    /// so only the overlay connects pods across them.
    #[arg(long, default_value = "native", value_parser = ["native", "vxlan"])]
    pub network: String,
    /// Addresses for Services of type LoadBalancer (FIRST-LAST or a CIDR), passed to the server
    /// as --loadbalancer-ip-pool; default 172.20.<lab-net>.200-172.20.<lab-net>.250 (on the lab
    /// network); `none` turns allocation off.
    #[arg(long)]
    pub loadbalancer_ip_pool: Option<String>,
    /// Also make an "external client": a namespace `<name>-client` on the lab bridge
    /// (172.20.<lab-net>.100, checksum offload off as behind a real NIC) with a route for the
    /// LoadBalancer pool via the first node, as a router in front of a bare-metal cluster has.
    #[arg(long)]
    pub external_client: bool,
    /// Instead of bringing a cluster up: restart the agent of this node of the cluster in
    /// --data-dir with the arguments it was first started with (stopping it first if it runs).
    #[arg(long, value_name = "NODE")]
    pub restart_agent: Option<String>,
}

#[derive(clap::Args, Clone)]
pub struct DownArgs {
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// What `up` made, written before each thing is made.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub bridge: String,
    pub bridge_ip: String,
    pub server_pid: Option<u32>,
    pub blackholes: Vec<String>,
    /// `<podCIDR> via <node IP>` routes in the root namespace (more specific than the
    /// blackhole): the machine plays the lab's router, so the server can answer pods.
    #[serde(default)]
    pub pod_routes: Vec<(String, String)>,
    pub nodes: Vec<NodeState>,
    pub kubeconfig: String,
    #[serde(default)]
    pub client: Option<ClientState>,
    /// `--network vxlan`: the second segment and its router.
    #[serde(default)]
    pub segment_b: Option<SegmentState>,
    /// The LoadBalancer pool given to the server (FIRST-LAST), if any.
    #[serde(default)]
    pub loadbalancer_ip_pool: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub veth: String,
    pub ip: String,
    pub data_dir: String,
    pub pin_dir: String,
    pub agent_pid: Option<u32>,
    /// `--runtime cri`: the node's containerd (its folder holds everything it made).
    #[serde(default)]
    pub containerd_pid: Option<u32>,
    #[serde(default)]
    pub containerd_dir: Option<String>,
    /// The `skiff` arguments the agent was started with (`--restart-agent` reuses them).
    #[serde(default)]
    pub agent_args: Vec<String>,
}

/// The second L2 segment of `--network vxlan` (see [`add_segment_b`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SegmentState {
    /// Its bridge (no address in the root namespace: the root reaches it through the router).
    pub bridge: String,
    /// The router namespace, with a leg on each bridge and forwarding on.
    pub router_netns: String,
    /// The root-namespace ends of the router's veths (bridge ports).
    pub router_veths: Vec<String>,
    /// The router's address on the first bridge and on this one.
    pub router_a: String,
    pub router_b: String,
    /// `(prefix, via)` routes added in the root namespace (the segment, via the router).
    pub root_routes: Vec<(String, String)>,
}

/// The external client namespace (`--external-client`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientState {
    pub netns: String,
    /// The root-namespace end of its veth (a port of the bridge).
    pub veth: String,
    pub ip: String,
    /// Routes in the client for the LoadBalancer pool: (prefix, via node IP).
    pub routes: Vec<(String, String)>,
}

fn save(dir: &Path, st: &LabState) -> Result<()> {
    let tmp = dir.join("lab.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)?;
    std::fs::rename(&tmp, dir.join("lab.json"))?;
    Ok(())
}

pub fn load(dir: &Path) -> Result<Option<LabState>> {
    match std::fs::read(dir.join("lab.json")) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).context("lab.json is unreadable")?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `ip` for cleanup: failures are expected (the thing is already gone) and ignored.
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

fn check_prerequisites() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("skiff up needs root (it creates network namespaces and loads eBPF programs)");
    }
    let mut missing = Vec::new();
    for tool in ["ip", "runc"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status().map(|s| !s.success()).unwrap_or(true) {
            missing.push(tool);
        }
    }
    if !missing.is_empty() {
        bail!("missing {}: run scripts/setup.sh (apt-get install iproute2 runc)", missing.join(", "));
    }
    if !Path::new("/sys/fs/bpf").is_dir() {
        bail!("no bpffs at /sys/fs/bpf: mount -t bpf bpf /sys/fs/bpf");
    }
    Ok(())
}

/// A sibling binary of this one (`skiff-cni` is built next to `skiff`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the skiff binary")?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!("{} not found next to {} (build it: cargo build --release -p skiff -p skiff-cni)", name, exe.display());
    }
    Ok(p)
}

/// Starts `skiff <args>` detached (own session, logs to `log`), returns its PID.
fn spawn_detached(args: &[String], log: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal's session so
    // it outlives `skiff up`.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting a skiff process")?;
    Ok(child.id())
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ready()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("timed out after {}s waiting for {what}", timeout.as_secs())
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

pub fn up(args: UpArgs) -> Result<()> {
    check_prerequisites()?;
    if args.nodes == 0 || args.nodes > 50 {
        bail!("--nodes must be between 1 and 50");
    }
    if args.name.is_empty() || args.name.len() > 8 || !args.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        bail!("--name must be 1-8 lowercase letters or digits (it prefixes interface names)");
    }
    let dir = &args.data_dir;
    if let Some(node) = &args.restart_agent {
        return restart_agent(dir, node);
    }
    let lb_pool = match args.loadbalancer_ip_pool.as_deref() {
        Some("none") => None,
        Some(p) => Some(p.to_string()),
        None => Some(format!("172.20.{n}.200-172.20.{n}.250", n = args.lab_net)),
    };
    if let Some(p) = &lb_pool {
        p.parse::<skiff_controller_manager::IpPool>().map_err(anyhow::Error::msg)?;
    }
    if let Some(st) = load(dir)? {
        if st.server_pid.is_some_and(alive) {
            if args.keep_existing {
                println!("skiff is already up in {} (export KUBECONFIG={})", dir.display(), st.kubeconfig);
                return Ok(());
            }
            bail!("a cluster is already up in {} (skiff down --data-dir {} first)", dir.display(), dir.display());
        }
        eprintln!("[up] removing what a previous `skiff up` left in {}", dir.display());
        down_state(dir, &st);
    }
    std::fs::create_dir_all(dir)?;
    let cni_bin = dir.join("cni-bin");
    std::fs::create_dir_all(&cni_bin)?;
    let plugin = sibling_binary("skiff-cni")?;
    std::fs::copy(&plugin, cni_bin.join("skiff-cni")).context("installing skiff-cni")?;
    let cri = args.runtime == "cri";
    if cri {
        prepare_cri(&cni_bin)?;
    }

    let bridge_ip = format!("172.20.{}.1", args.lab_net);
    let mut st = LabState { name: args.name.clone(), bridge: format!("{}-br", args.name), bridge_ip: bridge_ip.clone(), ..Default::default() };
    save(dir, &st)?;

    // The lab network and its guard rails.
    eprintln!("[up] lab network: bridge {} {bridge_ip}/{LAB_PREFIX}", st.bridge);
    ip(&["link", "add", &st.bridge, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{bridge_ip}/{LAB_PREFIX}"), "dev", &st.bridge])?;
    ip(&["link", "set", &st.bridge, "up"])?;
    for range in [POD_RANGE, SERVICE_RANGE] {
        st.blackholes.push(range.to_string());
        save(dir, &st)?;
        // `replace`: another lab (or an earlier run) may have added the same guard already.
        ip(&["route", "replace", "blackhole", range])?;
    }

    let vxlan = args.network == "vxlan";
    if vxlan {
        add_segment_b(dir, &mut st, args.lab_net)?;
    }

    // The images every node can run.
    let images = dir.join("images");
    for image in args.images.iter().filter(|_| !cri) {
        crate::agent_cli::import_image(&images, image)?;
    }

    // The server.
    let server_dir = dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    let _ = std::fs::remove_file(server_dir.join("admin.kubeconfig"));
    let mut server_args: Vec<String> = vec![
        "server".into(),
        "--data-dir".into(),
        server_dir.display().to_string(),
        "--bind".into(),
        format!("{bridge_ip}:6443"),
        "--tls-san".into(),
        bridge_ip.clone(),
    ];
    if let Some(p) = &lb_pool {
        server_args.extend(["--loadbalancer-ip-pool".to_string(), p.clone()]);
        st.loadbalancer_ip_pool = Some(p.clone());
    }
    server_args.extend(args.server_args.iter().cloned());
    let pid = spawn_detached(&server_args, &dir.join("server.log"))?;
    st.server_pid = Some(pid);
    st.kubeconfig = server_dir.join("admin.kubeconfig").display().to_string();
    save(dir, &st)?;
    eprintln!("[up] server pid {pid}, log {}", dir.join("server.log").display());
    let kubeconfig = PathBuf::from(&st.kubeconfig);
    wait_for("the server's kubeconfig", Duration::from_secs(60), || {
        if !alive(pid) {
            bail!("the server exited: see {}", dir.join("server.log").display());
        }
        Ok(kubeconfig.exists())
    })?;

    // The agents join as kubelets do with a bootstrap kubeconfig: its token only gets each node
    // its own client certificate (system:node:<name>, the node authorizer's identity), which
    // the agent keeps in its data dir and uses from then on.
    let bootstrap_kubeconfig = write_bootstrap_kubeconfig(&server_dir, &kubeconfig)?;

    // The nodes.
    for i in 1..=args.nodes {
        let node = NodeState {
            name: format!("{}-node-{i}", args.name),
            netns: format!("{}-node-{i}", args.name),
            veth: format!("{}-n{i}", args.name),
            ip: node_ip(args.lab_net, i, vxlan),
            data_dir: dir.join("nodes").join(format!("{}-node-{i}", args.name)).display().to_string(),
            pin_dir: format!("/sys/fs/bpf/skiff/{}-node-{i}", args.name),
            agent_pid: None,
            containerd_pid: None,
            containerd_dir: None,
            agent_args: Vec::new(),
        };
        st.nodes.push(node.clone());
        save(dir, &st)?;
        ip(&["netns", "add", &node.netns])?;
        ip(&["-n", &node.netns, "link", "set", "lo", "up"])?;
        ip(&["link", "add", &node.veth, "type", "veth", "peer", "name", "eth0", "netns", &node.netns])?;
        let (bridge, prefix, other_segment) = node_segment(&st, i);
        ip(&["link", "set", &node.veth, "master", &bridge])?;
        ip(&["link", "set", &node.veth, "up"])?;
        ip(&["-n", &node.netns, "addr", "add", &format!("{}/{prefix}", node.ip), "dev", "eth0"])?;
        ip(&["-n", &node.netns, "link", "set", "eth0", "up"])?;
        if let Some((net, via)) = other_segment {
            ip(&["-n", &node.netns, "route", "add", &net, "via", &via])?;
        }
        std::fs::create_dir_all(&node.data_dir)?;
        let cri_endpoint = if cri { Some(start_containerd(dir, &mut st, &cni_bin, &args.images)?) } else { None };
        let mut agent_args: Vec<String> = [
            "agent", "--kubeconfig", &bootstrap_kubeconfig, "--node-name", &node.name, "--node-ip", &node.ip,
            "--netns", &node.netns, "--data-dir", &node.data_dir, "--pin-dir", &node.pin_dir,
            "--cni-bin-dir", &cni_bin.display().to_string(),
            "--cni-conf-dir", &Path::new(&node.data_dir).join("cni-conf").display().to_string(),
            "--image-dir", &images.display().to_string(), "--uplink", "eth0",
            "--restart-backoff", &args.restart_backoff.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if vxlan {
            agent_args.extend(["--network".to_string(), "vxlan".to_string()]);
        }
        if let Some(ep) = &cri_endpoint {
            agent_args.extend(["--runtime".to_string(), "cri".to_string(), "--cri-endpoint".to_string(), ep.clone()]);
        }
        agent_args.extend(args.agent_args.iter().cloned());
        let pid = spawn_detached(&agent_args, &Path::new(&node.data_dir).join("agent.log"))?;
        if let Some(n) = st.nodes.last_mut() {
            n.agent_pid = Some(pid);
            n.agent_args = agent_args.clone();
        }
        save(dir, &st)?;
        eprintln!("[up] node {} ({}) agent pid {pid}", node.name, node.ip);
    }

    // Wait for every node to be Ready.
    let names: Vec<String> = st.nodes.iter().map(|n| n.name.clone()).collect();
    let rt = tokio::runtime::Runtime::new()?;
    let routes = rt.block_on(async {
        let client = crate::kube_client(&kubeconfig).await?;
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
        let start = Instant::now();
        loop {
            let list = nodes.list(&Default::default()).await?;
            let ready = names.iter().filter(|n| {
                list.items.iter().any(|x| {
                    x.metadata.name.as_deref() == Some(n.as_str())
                        && x.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
            }).count();
            if ready == names.len() {
                let routes: Vec<(String, String)> = list
                    .items
                    .iter()
                    .filter(|x| names.iter().any(|n| x.metadata.name.as_deref() == Some(n.as_str())))
                    .filter_map(|x| {
                        let cidr = x.spec.as_ref()?.pod_cidr.clone()?;
                        let ip = x.status.as_ref()?.addresses.as_ref()?.iter().find(|a| a.type_ == "InternalIP")?.address.clone();
                        Some((cidr, ip))
                    })
                    .collect();
                return Ok::<_, anyhow::Error>(routes);
            }
            for n in &st.nodes {
                if n.agent_pid.is_some_and(|p| !alive(p)) {
                    bail!("the agent of {} exited: see {}/agent.log", n.name, n.data_dir);
                }
            }
            if start.elapsed() > Duration::from_secs(120) {
                bail!("{ready} of {} nodes Ready after 120 s: see the agent logs under {}/nodes", names.len(), dir.display());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })?;
    // The pod ranges route to their nodes from here (the server answers pods that reach it
    // through the `kubernetes` Service); the blackhole keeps catching everything else.
    for (cidr, via) in routes {
        let via = route_pods_via_router(&st, &cidr, &via)?;
        st.pod_routes.push((cidr.clone(), via.clone()));
        save(dir, &st)?;
        ip(&["route", "replace", &cidr, "via", &via])?;
    }
    if args.external_client {
        add_external_client(dir, &mut st, args.lab_net, lb_pool.as_deref())?;
    }
    println!("skiff is up: {} nodes Ready.", args.nodes);
    println!("  export KUBECONFIG={}", st.kubeconfig);
    println!("  skiff down --data-dir {}   # removes everything it made", dir.display());
    Ok(())
}

pub fn down(args: DownArgs) -> Result<()> {
    check_prerequisites()?;
    let dir = &args.data_dir;
    let Some(st) = load(dir)? else {
        println!("nothing to take down in {}", dir.display());
        return Ok(());
    };
    let pod_netns = recorded_pod_netns(&st);
    down_state(dir, &st);
    let left = leftovers(&st, &pod_netns);
    if !left.is_empty() {
        bail!("could not remove: {}", left.join(", "));
    }
    println!("skiff is down: every namespace, link, route, pin, cgroup and process it made is gone.");
    Ok(())
}

/// Stops a process we started: SIGTERM, up to `grace`, then SIGKILL. Only if it is still a
/// skiff process (a PID can be reused after a reboot).
fn stop_pid(pid: u32, grace: Duration) {
    let is_ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(5).any(|w| w == b"skiff"));
    if !is_ours {
        return;
    }
    // SAFETY: signalling a PID we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let start = Instant::now();
    while alive(pid) && start.elapsed() < grace {
        // Reap it if it is our child (it is not, after setsid from an earlier `up`: then
        // kill(0) turns false once it exits).
        unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Removes what `st` records, in reverse order of creation. Best effort: every step runs even
/// when an earlier one failed; `leftovers` then says what is still there.
fn down_state(dir: &Path, st: &LabState) {
    if let Some(c) = &st.client {
        ip_quiet(&["netns", "del", &c.netns]);
        ip_quiet(&["link", "del", &c.veth]);
    }
    for n in &st.nodes {
        if let Some(pid) = n.agent_pid {
            stop_pid(pid, Duration::from_secs(10));
        }
    }
    for n in &st.nodes {
        crate::agent_cli::remove_node_pods(Path::new(&n.data_dir), &dir.join("images"));
        if let Some(cdir) = &n.containerd_dir {
            // After the pods: the daemon, then any shim it left, then its mounts and files.
            let paths = skiff_runtime::cri::containerd::ContainerdPaths::new(Path::new(cdir), &dir.join("cni-bin"), &Path::new(&n.data_dir).join("cni-conf"));
            skiff_runtime::cri::containerd::stop(&paths, n.containerd_pid);
            skiff_runtime::cri::containerd::remove_all(&paths);
        }
        let _ = std::fs::remove_dir_all(&n.pin_dir);
        remove_cgroups(&format!("skiff/{}", n.name));
        ip_quiet(&["netns", "del", &n.netns]);
        ip_quiet(&["link", "del", &n.veth]);
    }
    if let Some(seg) = &st.segment_b {
        for (net, via) in &seg.root_routes {
            ip_quiet(&["route", "del", net, "via", via]);
        }
        ip_quiet(&["netns", "del", &seg.router_netns]);
        for v in &seg.router_veths {
            ip_quiet(&["link", "del", v]);
        }
        ip_quiet(&["link", "del", &seg.bridge]);
    }
    let _ = std::fs::remove_dir("/sys/fs/bpf/skiff");
    if let Some(pid) = st.server_pid {
        stop_pid(pid, Duration::from_secs(10));
    }
    if !st.bridge.is_empty() {
        ip_quiet(&["link", "del", &st.bridge]);
    }
    for (cidr, via) in &st.pod_routes {
        ip_quiet(&["route", "del", cidr, "via", via]);
    }
    for range in &st.blackholes {
        ip_quiet(&["route", "del", "blackhole", range]);
    }
    unmount_under(dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// The pod network namespaces the lab's agents recorded (`<node>/pods/<uid>/sandbox.json`).
pub fn recorded_pod_netns(st: &LabState) -> Vec<String> {
    let mut out = Vec::new();
    for n in &st.nodes {
        let Ok(rd) = std::fs::read_dir(Path::new(&n.data_dir).join("pods")) else { continue };
        for e in rd.flatten() {
            if let Ok(b) = std::fs::read(e.path().join("sandbox.json"))
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
                && let Some(ns) = v["netns"].as_str()
            {
                out.push(ns.to_string());
            }
        }
    }
    out
}

/// Removes a cgroup subtree in every hierarchy, deepest first.
fn remove_cgroups(rel: &str) {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(rd.flatten().map(|e| e.path()));
    }
    for root in roots {
        let top = root.join(rel);
        if !top.is_dir() {
            continue;
        }
        let mut dirs = Vec::new();
        collect_dirs(&top, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = std::fs::remove_dir(&d);
        }
    }
    // The shared parent goes too once empty.
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            let _ = std::fs::remove_dir(e.path().join("skiff"));
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Lazily unmounts anything still mounted under `dir` (container root filesystems, netns files).
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p) {
            // SAFETY: valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// What of `st` is still on the machine (empty = clean).
pub fn leftovers(st: &LabState, pod_netns: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    let netns: String = Command::new("ip").args(["netns", "list"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for n in &st.nodes {
        if netns.lines().any(|l| l.split_whitespace().next() == Some(n.netns.as_str())) {
            left.push(format!("netns {}", n.netns));
        }
        if Path::new(&format!("/sys/class/net/{}", n.veth)).exists() {
            left.push(format!("link {}", n.veth));
        }
        if Path::new(&n.pin_dir).exists() {
            left.push(format!("pins {}", n.pin_dir));
        }
        if n.agent_pid.is_some_and(alive) {
            left.push(format!("agent pid {}", n.agent_pid.unwrap_or_default()));
        }
        if let Some(pid) = n.containerd_pid.filter(|p| alive(*p)) {
            left.push(format!("containerd pid {pid}"));
        }
        if let Some(d) = &n.containerd_dir {
            let mounts = skiff_runtime::cri::containerd::mounts_under(Path::new(d));
            if !mounts.is_empty() {
                left.push(format!("mounts {}", mounts.join(" ")));
            }
        }
    }
    for p in pod_netns {
        if netns.lines().any(|l| l.split_whitespace().next() == Some(p.as_str())) {
            left.push(format!("pod netns {p}"));
        }
    }
    if let Some(c) = &st.client {
        if netns.lines().any(|l| l.split_whitespace().next() == Some(c.netns.as_str())) {
            left.push(format!("netns {}", c.netns));
        }
        if Path::new(&format!("/sys/class/net/{}", c.veth)).exists() {
            left.push(format!("link {}", c.veth));
        }
    }
    if !st.bridge.is_empty() && Path::new(&format!("/sys/class/net/{}", st.bridge)).exists() {
        left.push(format!("bridge {}", st.bridge));
    }
    if let Some(seg) = &st.segment_b {
        if netns.lines().any(|l| l.split_whitespace().next() == Some(seg.router_netns.as_str())) {
            left.push(format!("netns {}", seg.router_netns));
        }
        for l in seg.router_veths.iter().chain([&seg.bridge]) {
            if Path::new(&format!("/sys/class/net/{l}")).exists() {
                left.push(format!("link {l}"));
            }
        }
        let routes = Command::new("ip").args(["route", "show"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        for (net, via) in &seg.root_routes {
            if routes.lines().any(|l| l.starts_with(&format!("{net} via {via} "))) {
                left.push(format!("route {net} via {via}"));
            }
        }
    }
    if st.server_pid.is_some_and(alive) {
        left.push(format!("server pid {}", st.server_pid.unwrap_or_default()));
    }
    let routes = Command::new("ip").args(["route", "show", "type", "blackhole"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for r in &st.blackholes {
        if routes.lines().any(|l| l.contains(r.as_str())) {
            left.push(format!("blackhole route {r}"));
        }
    }
    left
}

/// The client host of `--external-client`: a namespace on the lab bridge that is no node, the
/// stand-in for a machine outside the cluster. It reaches node IPs (NodePort) directly; the
/// LoadBalancer pool is routed via the first node, as a router in front of a bare-metal cluster
/// would route it (or BGP would announce it): the node's XDP program then answers for the
/// address, so no node needs to own it or answer ARP for it.
fn add_external_client(dir: &Path, st: &mut LabState, lab_net: u8, pool: Option<&str>) -> Result<()> {
    let Some(first_node) = st.nodes.first().map(|n| n.ip.clone()) else { bail!("no node to route the LoadBalancer pool to") };
    let mut c = ClientState {
        netns: format!("{}-client", st.name),
        veth: format!("{}-c", st.name),
        ip: format!("172.20.{lab_net}.100"),
        routes: Vec::new(),
    };
    if let Some(pool) = pool {
        let p: skiff_controller_manager::IpPool = pool.parse().map_err(anyhow::Error::msg)?;
        // The smallest set of prefixes covering exactly the pool.
        for net in ipnet::Ipv4Subnets::new(p.first(), p.last(), 0) {
            c.routes.push((net.to_string(), first_node.clone()));
        }
    }
    st.client = Some(c.clone());
    save(dir, st)?;
    eprintln!("[up] external client {} ({}), LoadBalancer pool via {first_node}", c.netns, c.ip);
    ip(&["netns", "add", &c.netns])?;
    ip(&["-n", &c.netns, "link", "set", "lo", "up"])?;
    ip(&["link", "add", &c.veth, "type", "veth", "peer", "name", "eth0", "netns", &c.netns])?;
    ip(&["link", "set", &c.veth, "master", &st.bridge])?;
    ip(&["link", "set", &c.veth, "up"])?;
    ip(&["-n", &c.netns, "addr", "add", &format!("{}/{LAB_PREFIX}", c.ip), "dev", "eth0"])?;
    ip(&["-n", &c.netns, "link", "set", "eth0", "up"])?;
    for (net, via) in &c.routes {
        ip(&["-n", &c.netns, "route", "add", net, "via", via])?;
    }
    // Complete checksums on what the client sends, as packets from a real NIC carry: XDP cannot
    // finish a CHECKSUM_PARTIAL packet from a veth whose sender offloads checksums.
    let ns_path = Path::new("/run/netns").join(&c.netns);
    let done = std::thread::spawn(move || -> Result<()> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
        // SAFETY: a valid namespace fd; affects only this short-lived thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("entering {}: {}", ns_path.display(), std::io::Error::last_os_error());
        }
        skiff_datapath::lab::set_tx_checksum("eth0", false);
        Ok(())
    })
    .join();
    match done {
        Ok(r) => r.context("turning checksum offload off in the client")?,
        Err(_) => bail!("turning checksum offload off in the client failed"),
    }
    Ok(())
}

/// `skiff up --restart-agent NODE`: stops the node's agent if it still runs (SIGTERM, then
/// SIGKILL after 10 s) and starts it again with the arguments recorded in lab.json, appending to
/// its log. The datapath's pins and the pods stay: the new agent adopts them.
fn restart_agent(dir: &Path, node: &str) -> Result<()> {
    let Some(mut st) = load(dir)? else { bail!("no cluster in {} (nothing recorded in lab.json)", dir.display()) };
    let Some(i) = st.nodes.iter().position(|n| n.name == node) else {
        let names: Vec<&str> = st.nodes.iter().map(|n| n.name.as_str()).collect();
        bail!("no node {node:?} in {} (nodes: {})", dir.display(), names.join(", "));
    };
    let n = st.nodes[i].clone();
    if n.agent_args.is_empty() {
        bail!("lab.json records no agent arguments for {node} (brought up by an older skiff): take it down and up again");
    }
    if let Some(pid) = n.agent_pid
        && alive(pid)
        && !is_zombie(pid)
    {
        stop_pid(pid, Duration::from_secs(10));
    }
    let log = Path::new(&n.data_dir).join("agent.log");
    let pid = spawn_detached_appending(&n.agent_args, &log)?;
    st.nodes[i].agent_pid = Some(pid);
    save(dir, &st)?;
    println!("restarted the agent of {node}: pid {pid}, log {}", log.display());
    Ok(())
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// As `spawn_detached`, appending to the log (a restarted agent keeps its predecessor's lines).
fn spawn_detached_appending(args: &[String], log: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe (see spawn_detached).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(cmd.spawn().context("starting the agent")?.id())
}

/// containerd's CRI plugin needs, besides skiff-cni, the reference `loopback` plugin in the same
/// bin_dir (it always brings up the sandbox's `lo` with it).
const LOOPBACK_PLUGIN: &str = "/usr/lib/cni/loopback";

fn prepare_cri(cni_bin: &Path) -> Result<()> {
    for tool in ["containerd", "ctr", "containerd-shim-runc-v2"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status().map(|s| !s.success()).unwrap_or(true) {
            bail!("--runtime cri needs {tool}: run scripts/setup.sh (apt-get install containerd)");
        }
    }
    if !Path::new(LOOPBACK_PLUGIN).is_file() {
        bail!("--runtime cri needs {LOOPBACK_PLUGIN}: apt-get install containernetworking-plugins");
    }
    std::fs::copy(LOOPBACK_PLUGIN, cni_bin.join("loopback")).context("installing the loopback CNI plugin")?;
    Ok(())
}

/// Starts the last node's containerd in its namespace (recorded before it starts), waits for its
/// CRI plugin, imports the images into it; returns its CRI endpoint.
fn start_containerd(dir: &Path, st: &mut LabState, cni_bin: &Path, images: &[PathBuf]) -> Result<String> {
    use skiff_runtime::cri::containerd;
    let node = st.nodes.last().cloned().context("no node to start containerd for")?;
    let paths = crate::agent_cli::node_containerd(Path::new(&node.data_dir), cni_bin);
    if let Some(n) = st.nodes.last_mut() {
        n.containerd_dir = Some(paths.dir.display().to_string());
    }
    save(dir, st)?;
    let child = containerd::spawn(&paths, Some(&node.netns), true).with_context(|| format!("starting containerd for {}", node.name))?;
    let pid = child.id();
    if let Some(n) = st.nodes.last_mut() {
        n.containerd_pid = Some(pid);
    }
    save(dir, st)?;
    let cri = containerd::wait_ready(&paths, pid, Duration::from_secs(60)).with_context(|| format!("containerd of {}", node.name))?;
    for image in images {
        containerd::import_image(&paths, image).with_context(|| format!("importing {} into the containerd of {}", image.display(), node.name))?;
    }
    if cri.image_status(containerd::PAUSE_IMAGE).ok().flatten().is_none() {
        bail!("the pause image {} is not among the --image archives: build it with scripts/build-pause-image.sh and pass it with --image", containerd::PAUSE_IMAGE);
    }
    eprintln!("[up] node {} containerd pid {pid}, {}", node.name, paths.endpoint());
    Ok(paths.endpoint())
}

/// A node's IP. Native: 172.20.<lab>.<10+i> on the one bridge. vxlan: odd nodes keep that
/// address on segment A (172.20.<lab>.0/25), even nodes get 172.20.<lab>.<138+i> on segment B
/// (172.20.<lab>.128/25); `--nodes` <= 50 keeps both clear of the routers (.126, .129).
fn node_ip(lab_net: u8, i: u32, vxlan: bool) -> String {
    if vxlan && i % 2 == 0 { format!("172.20.{lab_net}.{}", 138 + i) } else { format!("172.20.{lab_net}.{}", 10 + i) }
}

/// Where node `i` plugs in: its bridge, its address's prefix length, and (two segments) the
/// route to the other segment through the router on its own.
fn node_segment(st: &LabState, i: u32) -> (String, u8, Option<(String, String)>) {
    let Some(seg) = &st.segment_b else { return (st.bridge.clone(), LAB_PREFIX, None) };
    let lab = st.bridge_ip.rsplit_once('.').map(|(p, _)| p.to_string()).unwrap_or_default();
    if i % 2 == 0 {
        (seg.bridge.clone(), 25, Some((format!("{lab}.0/25"), seg.router_b.clone())))
    } else {
        (st.bridge.clone(), 25, Some((format!("{lab}.128/25"), seg.router_a.clone())))
    }
}

/// `--network vxlan`: the second L2 segment. Segment A is the existing bridge (the root keeps
/// 172.20.<lab>.1/24 on it, nodes there use /25s); segment B is bridge `<name>-br2` for
/// 172.20.<lab>.128/25, which the root does not touch. A router namespace `<name>-rt` joins
/// them (172.20.<lab>.126 on A, .129 on B, forwarding on); the root reaches B through it. The
/// router gets routes to segment B's pod ranges (so the server can answer pods there) once the
/// nodes have podCIDRs, never to A's: A's nodes have no route to them, so nothing but the
/// overlay carries pod traffic between the segments. No namespace here has a default route.
fn add_segment_b(dir: &Path, st: &mut LabState, lab_net: u8) -> Result<()> {
    let n = st.name.clone();
    let seg = SegmentState {
        bridge: format!("{n}-br2"),
        router_netns: format!("{n}-rt"),
        router_veths: vec![format!("{n}-ra"), format!("{n}-rb")],
        router_a: format!("172.20.{lab_net}.126"),
        router_b: format!("172.20.{lab_net}.129"),
        root_routes: vec![(format!("172.20.{lab_net}.128/25"), format!("172.20.{lab_net}.126"))],
    };
    st.segment_b = Some(seg.clone());
    save(dir, st)?;
    eprintln!("[up] second segment: bridge {} 172.20.{lab_net}.128/25, router {} ({} | {})", seg.bridge, seg.router_netns, seg.router_a, seg.router_b);
    ip(&["link", "add", &seg.bridge, "type", "bridge"])?;
    ip(&["link", "set", &seg.bridge, "up"])?;
    ip(&["netns", "add", &seg.router_netns])?;
    ip(&["-n", &seg.router_netns, "link", "set", "lo", "up"])?;
    for ((veth, bridge), (leg, addr)) in seg.router_veths.iter().zip([&st.bridge, &seg.bridge]).zip([("eth0", &seg.router_a), ("eth1", &seg.router_b)]) {
        ip(&["link", "add", veth, "type", "veth", "peer", "name", leg, "netns", &seg.router_netns])?;
        ip(&["link", "set", veth, "master", bridge])?;
        ip(&["link", "set", veth, "up"])?;
        ip(&["-n", &seg.router_netns, "addr", "add", &format!("{addr}/25"), "dev", leg])?;
        ip(&["-n", &seg.router_netns, "link", "set", leg, "up"])?;
    }
    // Forwarding in the router's namespace only (the root namespace does not forward).
    let ok = Command::new("ip").args(["netns", "exec", &seg.router_netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]).status().is_ok_and(|s| s.success());
    if !ok {
        bail!("enabling forwarding in {}", seg.router_netns);
    }
    for (net, via) in &seg.root_routes {
        ip(&["route", "replace", net, "via", via])?;
    }
    Ok(())
}

/// The root's route to a node's pods: straight to a node on segment A, through the router to
/// one on segment B (the router then routes the range to the node: recorded nowhere, it goes
/// with the router's namespace).
fn route_pods_via_router(st: &LabState, cidr: &str, node_ip: &str) -> Result<String> {
    let Some(seg) = &st.segment_b else { return Ok(node_ip.to_string()) };
    let on_b = node_ip.rsplit_once('.').and_then(|(_, h)| h.parse::<u8>().ok()).is_some_and(|h| h >= 128);
    if !on_b {
        return Ok(node_ip.to_string());
    }
    ip(&["-n", &seg.router_netns, "route", "replace", cidr, "via", node_ip])?;
    Ok(seg.router_a.clone())
}

/// Makes a bootstrap token (an hour: the agents use it within seconds) and writes
/// `<server dir>/bootstrap.kubeconfig` with it, the server's URL and its CA; returns its path.
fn write_bootstrap_kubeconfig(server_dir: &Path, admin_kubeconfig: &Path) -> Result<String> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(admin_kubeconfig).with_context(|| format!("reading {}", admin_kubeconfig.display()))?;
    let kc = kube::config::Kubeconfig::from_yaml(&text).context("parsing the admin kubeconfig")?;
    let server = kc.clusters.first().and_then(|c| c.cluster.as_ref()).and_then(|c| c.server.clone()).context("the admin kubeconfig names no server")?;
    let ca = crate::token_cli::kubeconfig_ca(&text)?;
    let rt = tokio::runtime::Runtime::new()?;
    let token = rt.block_on(async {
        let client = crate::kube_client(admin_kubeconfig).await?;
        crate::token_cli::create_token(&client, Duration::from_secs(3600), "skiff up: node TLS bootstrap").await
    })?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca);
    let out = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: skiff\n  cluster:\n    server: {server}\n    certificate-authority-data: {b64}\nusers:\n- name: bootstrap\n  user:\n    token: {token}\ncontexts:\n- name: bootstrap\n  context:\n    cluster: skiff\n    user: bootstrap\ncurrent-context: bootstrap\n"
    );
    let path = server_dir.join("bootstrap.kubeconfig");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        f.write_all(out.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path.display().to_string())
}
