//! Black-box suite: the built skiff-cni binary, run as a container runtime runs it (CNI_*
//! variables, the network configuration on stdin) inside a "node" network namespace the test
//! creates, against pod namespaces the test creates. Real veths, real routes, real packets; the
//! datapath test loads the real eBPF datapath under a test pin directory.
//!
//! Safety: every namespace is named `skc-<test>-<pid>-...` and deleted on drop; the node
//! namespace has no interface out of the lab, so no packet leaves it.

use std::{
    collections::BTreeSet,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};
use skiff_datapath::lab::{Server, in_netns, require_privileges, tcp_ask};

const BIN: &str = env!("CARGO_BIN_EXE_skiff-cni");
const CIDR: &str = "10.244.1.0/24";
const GATEWAY: &str = "10.244.1.1";

struct Out {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} (stderr: {})",
                self.stdout, self.stderr
            )
        })
    }
    fn ok(&self) -> &Self {
        assert_eq!(
            self.status, 0,
            "skiff-cni failed: stdout {} stderr {}",
            self.stdout, self.stderr
        );
        self
    }
    /// A CNI error with `code`; returns its message.
    fn error(&self, code: u64) -> String {
        assert_ne!(self.status, 0, "expected a failure, got {}", self.stdout);
        let v = self.json();
        assert_eq!(v["code"], code, "error code: {v}");
        let msg = v["msg"].as_str().unwrap_or_default().to_string();
        assert!(!msg.is_empty(), "error has a message: {v}");
        assert!(v["cniVersion"].is_string(), "error names a cniVersion: {v}");
        msg
    }
}

/// Runs the plugin in `node` (None: in the test's own namespace, for calls that touch no
/// network) with exactly the CNI variables given.
fn run(node: Option<&str>, env: &[(&str, &str)], stdin: &str) -> Out {
    let mut cmd = Command::new(BIN);
    // Enter the node namespace with setns() alone, as an agent that setns()'d itself runs its
    // children: `ip netns exec` would also remount /sys and hide the bpffs at /sys/fs/bpf.
    let netns_file = node
        .map(|n| std::fs::File::open(format!("/run/netns/{n}")).expect("opening the node netns"));
    if let Some(f) = &netns_file {
        let fd = f.as_raw_fd();
        // SAFETY: setns is async-signal-safe; fd stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    for k in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied())
        .env("SKIFF_CNI_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning skiff-cni");
    // A plugin that refuses a huge stdin stops reading it: a broken pipe here is its answer.
    match child.stdin.take().expect("stdin").write_all(stdin.as_bytes()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => panic!("writing stdin: {e}"),
    }
    let out = child.wait_with_output().expect("waiting for skiff-cni");
    Out {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ip_json(args: &[&str]) -> Value {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip -j {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]))
}

fn ip(args: &[&str]) {
    skiff_datapath::lab::ip(args)
}

fn link_exists(netns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", netns, "link", "show", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Everything the plugin could change in a namespace, for "nothing changed" comparisons:
/// interfaces (name, MAC, MTU, peer), IPv4 addresses and IPv4 routes. Carrier state and IPv6
/// link-local addresses move by themselves after a veth appears, so they are left out.
fn snapshot(netns: &str) -> String {
    let links: Vec<String> = ip_json(&["-n", netns, "link"])
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            format!(
                "{} {} {} {}",
                l["ifname"], l["address"], l["mtu"], l["link_index"]
            )
        })
        .collect();
    let addrs: Vec<String> = ip_json(&["-4", "-n", netns, "addr"])
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| {
            let name = l["ifname"].to_string();
            l["addr_info"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |a| format!("{name} {}/{}", a["local"], a["prefixlen"]))
        })
        .collect();
    format!(
        "{links:?}\n{addrs:?}\n{}",
        ip_json(&["-4", "-n", netns, "route"])
    )
}

struct Lab {
    prefix: String,
    node: String,
    pods: Vec<String>,
    data: tempfile::TempDir,
    pin_dir: Option<PathBuf>,
    cidr: String,
    netns: Vec<String>,
}

impl Lab {
    fn new(test: &str, pods: usize) -> Lab {
        let prefix = format!("skc-{test}-{}", std::process::id());
        let node = format!("{prefix}-n");
        ip(&["netns", "add", &node]);
        let mut lab = Lab {
            node: node.clone(),
            pods: Vec::new(),
            data: tempfile::Builder::new()
                .prefix("skiff-cni-test")
                .tempdir()
                .expect("tempdir"),
            pin_dir: None,
            cidr: CIDR.to_string(),
            netns: vec![node],
            prefix,
        };
        for i in 0..pods {
            let p = format!("{}-p{i}", lab.prefix);
            ip(&["netns", "add", &p]);
            lab.netns.push(p.clone());
            lab.pods.push(p);
        }
        lab
    }

    fn data_dir(&self) -> PathBuf {
        self.data.path().join("ipam")
    }

    fn conf(&self, version: &str) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": "skiff",
            "type": "skiff-cni",
            "podCIDR": self.cidr,
            "dataDir": self.data_dir(),
            "mtu": 1450,
        });
        if let Some(p) = &self.pin_dir {
            c["pinDir"] = json!(p);
        }
        c
    }

    fn container(&self, i: usize) -> String {
        format!("{}-c{i}", self.prefix)
    }

    fn netns_path(&self, i: usize) -> String {
        format!("/run/netns/{}", self.pods[i])
    }

    fn call(&self, cmd: &str, i: usize, netns: Option<&str>, conf: &Value) -> Out {
        let id = self.container(i);
        let mut env = vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", id.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
            ),
        ];
        if let Some(n) = netns {
            env.push(("CNI_NETNS", n));
        }
        run(Some(&self.node), &env, &conf.to_string())
    }

    fn add(&self, i: usize, version: &str) -> Value {
        let out = self.call("ADD", i, Some(&self.netns_path(i)), &self.conf(version));
        out.ok().json()
    }

    fn del(&self, i: usize, version: &str) {
        self.call("DEL", i, Some(&self.netns_path(i)), &self.conf(version))
            .ok();
    }

    fn allocations(&self) -> BTreeSet<Ipv4Addr> {
        std::fs::read_dir(self.data_dir())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in self.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
        if let Some(p) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(p);
            if let Some(parent) = p.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

fn result_ip(r: &Value) -> Ipv4Addr {
    let a = r["ips"][0]["address"].as_str().expect("ips[0].address");
    a.strip_suffix("/32")
        .expect("a /32")
        .parse()
        .expect("an IPv4 address")
}

fn host_if_of(r: &Value) -> String {
    r["interfaces"][0]["name"]
        .as_str()
        .expect("interfaces[0].name")
        .to_string()
}

#[test]
fn version_answers_every_spec_version() {
    let all = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
    for v in all {
        let out = run(
            None,
            &[("CNI_COMMAND", "VERSION")],
            &json!({"cniVersion": v}).to_string(),
        );
        let r = out.ok().json();
        assert_eq!(r["cniVersion"], v);
        let got: Vec<&str> = r["supportedVersions"]
            .as_array()
            .expect("supportedVersions")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(got, all);
    }
    let r = run(None, &[("CNI_COMMAND", "VERSION")], "").ok().json();
    assert_eq!(r["cniVersion"], "1.1.0");
}

#[test]
fn add_check_del_del_in_each_version() {
    if !require_privileges("add_check_del_del_in_each_version") {
        return;
    }
    let lab = Lab::new("acdd", 1);
    for version in ["1.0.0", "1.1.0", "0.4.0"] {
        let r = lab.add(0, version);
        assert_eq!(r["cniVersion"], version);
        let host_if = host_if_of(&r);
        assert!(
            host_if.starts_with("skf") && host_if.len() == 11,
            "host veth name {host_if}"
        );
        assert_eq!(
            host_if,
            skiff_cni::host_veth_name(&lab.container(0), "eth0")
        );
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(r["interfaces"][1]["sandbox"], lab.netns_path(0));
        // Round robin: the first ADD gets .2, later ones the next free address after the last.
        let pod_ip = result_ip(&r);
        assert!(
            (2..=254).contains(&pod_ip.octets()[3]) && pod_ip.octets()[..3] == [10, 244, 1],
            "{pod_ip} is a pod address of {CIDR}"
        );
        if version == "1.0.0" {
            assert_eq!(r["ips"][0]["address"], "10.244.1.2/32");
        }
        let pod_ip_s = pod_ip.to_string();
        assert_eq!(r["ips"][0]["gateway"], GATEWAY);
        assert_eq!(r["ips"][0]["interface"], 1);
        let default = r["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .find(|x| x["dst"] == "0.0.0.0/0")
            .expect("a default route");
        assert_eq!(default["gw"], GATEWAY);
        match version {
            "1.1.0" => {
                assert_eq!(r["interfaces"][1]["mtu"], 1450);
                assert_eq!(
                    r["routes"][0],
                    json!({"dst": "10.244.1.1/32", "scope": 253})
                );
            }
            "1.0.0" => {
                assert!(r["interfaces"][1].get("mtu").is_none(), "1.0 has no mtu");
                assert!(r["ips"][0].get("version").is_none(), "1.0 has no version");
            }
            _ => assert_eq!(r["ips"][0]["version"], "4"),
        }

        // What ADD made, seen by iproute2.
        let pod = &lab.pods[0];
        let addrs = ip_json(&["-n", pod, "addr", "show", "eth0"]);
        let a = &addrs[0]["addr_info"];
        assert!(
            a.as_array()
                .expect("addr_info")
                .iter()
                .any(|x| x["local"] == pod_ip_s.as_str() && x["prefixlen"] == 32),
            "eth0 holds {pod_ip}/32: {addrs}"
        );
        assert_eq!(addrs[0]["mtu"], 1450);
        let routes = ip_json(&["-n", pod, "route"]);
        assert!(
            routes
                .as_array()
                .expect("routes")
                .iter()
                .any(|x| x["dst"] == "default" && x["gateway"] == GATEWAY && x["dev"] == "eth0"),
            "pod default route: {routes}"
        );
        assert!(
            routes
                .as_array()
                .expect("routes")
                .iter()
                .any(|x| x["dst"] == GATEWAY && x["scope"] == "link"),
            "pod gateway route: {routes}"
        );
        let node_routes = ip_json(&["-n", &lab.node, "route"]);
        assert!(
            node_routes
                .as_array()
                .expect("routes")
                .iter()
                .any(|x| x["dst"] == pod_ip_s.as_str() && x["dev"] == host_if),
            "node route to the pod: {node_routes}"
        );
        let lo = ip_json(&["-n", &lab.node, "addr", "show", "lo"]);
        assert!(
            lo.to_string().contains("\"local\":\"10.244.1.1\""),
            "gateway on lo: {lo}"
        );
        let fwd = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.node,
                "cat",
                "/proc/sys/net/ipv4/ip_forward",
            ])
            .output()
            .expect("sysctl");
        assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");

        // ADD again: the same address (idempotent).
        let again = lab.add(0, version);
        assert_eq!(result_ip(&again), result_ip(&r));
        assert_eq!(lab.allocations().len(), 1);

        // CHECK with the ADD result as prevResult.
        let mut conf = lab.conf(version);
        conf["prevResult"] = again.clone();
        let out = lab.call("CHECK", 0, Some(&lab.netns_path(0)), &conf);
        out.ok();
        assert!(
            out.stdout.trim().is_empty(),
            "CHECK prints nothing: {}",
            out.stdout
        );
        // CHECK notices a change made behind its back.
        ip(&["-n", pod, "route", "del", "default"]);
        let msg = lab
            .call("CHECK", 0, Some(&lab.netns_path(0)), &conf)
            .error(5);
        assert!(msg.contains("default via"), "{msg}");
        // A prevResult naming another address is refused.
        let mut wrong = conf.clone();
        wrong["prevResult"]["ips"][0]["address"] = json!("10.244.1.99/32");
        lab.call("CHECK", 0, Some(&lab.netns_path(0)), &wrong)
            .error(7);

        // DEL, DEL.
        lab.del(0, version);
        assert!(!link_exists(&lab.node, &host_if), "host veth deleted");
        assert!(!link_exists(pod, "eth0"), "pod eth0 deleted");
        assert!(lab.allocations().is_empty(), "address freed");
        lab.del(0, version);
        let conf = lab.conf(version);
        lab.call("CHECK", 0, Some(&lab.netns_path(0)), &conf)
            .error(3);
    }
}

#[test]
fn pods_reach_each_other_through_their_veths() {
    if !require_privileges("pods_reach_each_other_through_their_veths") {
        return;
    }
    let lab = Lab::new("reach", 2);
    let ip0 = result_ip(&lab.add(0, "1.1.0"));
    let ip1 = result_ip(&lab.add(1, "1.0.0"));
    assert_ne!(ip0, ip1);
    let _server = Server::start(&lab.pods[1], ip1, 9000);
    let answers = in_netns(&lab.pods[0], || {
        (0..3)
            .map(|_| tcp_ask(SocketAddr::from((ip1, 9000))).expect("pod0 -> pod1 over TCP"))
            .collect::<Vec<_>>()
    });
    for (who, peer) in answers {
        assert_eq!(who, ip1.to_string());
        assert_eq!(peer, SocketAddr::from((ip1, 9000)));
    }
    // After DEL of the server's pod, the address no longer answers.
    lab.del(1, "1.0.0");
    let gone = in_netns(&lab.pods[0], || tcp_ask(SocketAddr::from((ip1, 9000))));
    assert!(gone.is_err(), "a deleted pod is unreachable");
}

#[test]
fn datapath_registration_with_a_loaded_datapath() {
    if !require_privileges("datapath_registration_with_a_loaded_datapath") {
        return;
    }
    let mut lab = Lab::new("dp", 2);
    let pin = PathBuf::from(format!("/sys/fs/bpf/skiff-test/{}", lab.prefix));
    lab.pin_dir = Some(pin.clone());
    // ADD before the datapath is loaded: try again later, nothing allocated.
    let out = lab.call("ADD", 0, Some(&lab.netns_path(0)), &lab.conf("1.1.0"));
    let msg = out.error(11);
    assert!(msg.contains("programs/from_pod"), "{msg}");
    assert!(lab.allocations().is_empty());
    lab.call("STATUS", 0, None, &lab.conf("1.1.0")).error(50);

    // The agent's part: load the datapath (pins maps and from_pod), then go away.
    drop(skiff_datapath::Datapath::load(&pin).expect("loading the datapath"));
    lab.call("STATUS", 0, None, &lab.conf("1.1.0")).ok();

    let r0 = lab.add(0, "1.1.0");
    let r1 = lab.add(1, "1.1.0");
    for (i, r) in [&r0, &r1].into_iter().enumerate() {
        let ip = result_ip(r);
        let host_if = host_if_of(r);
        let ifindex = ip_json(&["-n", &lab.node, "link", "show", &host_if])[0]["ifindex"]
            .as_u64()
            .expect("ifindex") as u32;
        let ep = skiff_datapath::pod::endpoint(&pin, ip)
            .expect("reading ENDPOINTS")
            .expect("the pod is in ENDPOINTS");
        assert_eq!(ep.host_ifindex, ifindex);
        assert_eq!(
            skiff_cni::result::mac_string(&ep.host_mac),
            r["interfaces"][0]["mac"].as_str().expect("mac")
        );
        assert_eq!(
            skiff_cni::result::mac_string(&ep.pod_mac),
            r["interfaces"][1]["mac"].as_str().expect("mac")
        );
        assert_eq!(
            skiff_datapath::pod::pod_link_pins(&pin, &host_if),
            vec![pin.join("links").join(format!("tc-{host_if}-{ifindex}"))]
        );
        lab.call("CHECK", i, Some(&lab.netns_path(i)), &lab.conf("1.1.0"))
            .ok();
    }

    // Real packets through from_pod: same-node delivery by bpf_redirect_peer.
    let (ip0, ip1) = (result_ip(&r0), result_ip(&r1));
    let before = skiff_datapath::Datapath::open_pinned(&pin)
        .expect("pins")
        .counters()
        .expect("counters")["redirect_peer"];
    let _server = Server::start(&lab.pods[1], ip1, 8080);
    let who = in_netns(&lab.pods[0], || tcp_ask(SocketAddr::from((ip1, 8080))))
        .expect("pod0 -> pod1 through the datapath");
    assert_eq!(who.0, ip1.to_string());
    let after = skiff_datapath::Datapath::open_pinned(&pin)
        .expect("pins")
        .counters()
        .expect("counters")["redirect_peer"];
    assert!(
        after > before,
        "from_pod delivered with redirect_peer ({before} -> {after})"
    );

    // CHECK sees a missing endpoint.
    let host0 = host_if_of(&r0);
    skiff_datapath::detach_pod(&pin, &host0, ip0).expect("detach behind the plugin's back");
    lab.call("CHECK", 0, Some(&lab.netns_path(0)), &lab.conf("1.1.0"))
        .error(5);

    // DEL (netns gone) removes endpoint and link pins; a second DEL is fine.
    ip(&["netns", "del", &lab.pods[1]]);
    let host1 = host_if_of(&r1);
    for _ in 0..2 {
        lab.call(
            "DEL",
            1,
            Some("/run/netns/does-not-exist"),
            &lab.conf("1.1.0"),
        )
        .ok();
    }
    assert_eq!(
        skiff_datapath::pod::endpoint(&pin, ip1).expect("ENDPOINTS"),
        None
    );
    assert!(skiff_datapath::pod::pod_link_pins(&pin, &host1).is_empty());
    assert!(!lab.allocations().contains(&ip1));
}

#[test]
fn sixteen_concurrent_adds_get_sixteen_addresses() {
    if !require_privileges("sixteen_concurrent_adds_get_sixteen_addresses") {
        return;
    }
    let lab = Lab::new("conc", 16);
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let lab = &lab;
                s.spawn(move || lab.add(i, "1.1.0"))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let ips: BTreeSet<Ipv4Addr> = results.iter().map(result_ip).collect();
    assert_eq!(ips.len(), 16, "16 distinct addresses: {ips:?}");
    assert_eq!(lab.allocations(), ips);
    for ip in &ips {
        assert!(
            ip.octets()[3] >= 2 && ip.octets()[3] <= 254,
            "{ip}: not network, gateway or broadcast"
        );
    }
    let host_ifs: BTreeSet<String> = results.iter().map(host_if_of).collect();
    assert_eq!(host_ifs.len(), 16);
    for h in &host_ifs {
        assert!(link_exists(&lab.node, h), "{h} exists");
    }
    std::thread::scope(|s| {
        for i in 0..16 {
            let lab = &lab;
            s.spawn(move || lab.del(i, "1.1.0"));
        }
    });
    assert!(lab.allocations().is_empty());
    for h in &host_ifs {
        assert!(!link_exists(&lab.node, h), "{h} deleted");
    }
}

#[test]
fn ipam_exhaustion_is_an_error_that_changes_nothing() {
    if !require_privileges("ipam_exhaustion_is_an_error_that_changes_nothing") {
        return;
    }
    let mut lab = Lab::new("full", 6);
    lab.cidr = "10.244.1.0/29".to_string(); // .2 ..= .6
    for i in 0..5 {
        lab.add(i, "1.1.0");
    }
    let before_node = snapshot(&lab.node);
    let before_pod = snapshot(&lab.pods[5]);
    let msg = lab
        .call("ADD", 5, Some(&lab.netns_path(5)), &lab.conf("1.1.0"))
        .error(100);
    assert!(msg.contains("no free address"), "{msg}");
    assert_eq!(snapshot(&lab.node), before_node);
    assert_eq!(snapshot(&lab.pods[5]), before_pod);
    assert_eq!(lab.allocations().len(), 5);
    // Freeing one makes room again.
    lab.del(2, "1.1.0");
    assert_eq!(
        result_ip(&lab.add(5, "1.1.0")),
        Ipv4Addr::new(10, 244, 1, 4)
    );
}

#[test]
fn del_with_a_missing_or_empty_netns() {
    if !require_privileges("del_with_a_missing_or_empty_netns") {
        return;
    }
    let lab = Lab::new("delns", 3);
    let rs: Vec<Value> = (0..3).map(|i| lab.add(i, "1.1.0")).collect();
    for p in &lab.pods {
        ip(&["netns", "del", p]);
    }
    let netns_values: [Option<&str>; 3] = [Some("/run/netns/skc-gone"), Some(""), None];
    for (i, netns) in netns_values.into_iter().enumerate() {
        for _ in 0..2 {
            lab.call("DEL", i, netns, &lab.conf("1.1.0")).ok();
        }
        assert!(!link_exists(&lab.node, &host_if_of(&rs[i])));
    }
    assert!(lab.allocations().is_empty());
    // DEL of something never added is fine too.
    lab.call("DEL", 7, None, &lab.conf("1.0.0")).ok();
}

#[test]
fn gc_removes_attachments_not_listed() {
    if !require_privileges("gc_removes_attachments_not_listed") {
        return;
    }
    let lab = Lab::new("gc", 3);
    let rs: Vec<Value> = (0..3).map(|i| lab.add(i, "1.1.0")).collect();
    let mut conf = lab.conf("1.1.0");
    // Without the list nothing goes.
    lab.call("GC", 0, None, &conf).error(7);
    let mut old = lab.conf("1.0.0");
    old["cni.dev/valid-attachments"] = json!([]);
    lab.call("GC", 0, None, &old).error(1);
    assert_eq!(lab.allocations().len(), 3);

    conf["cni.dev/valid-attachments"] =
        json!([{"containerID": lab.container(0), "ifname": "eth0"}]);
    lab.call("GC", 0, None, &conf).ok();
    assert_eq!(
        lab.allocations(),
        BTreeSet::from([result_ip(&rs[0])]),
        "only the valid attachment keeps its address"
    );
    assert!(link_exists(&lab.node, &host_if_of(&rs[0])));
    for r in &rs[1..] {
        assert!(
            !link_exists(&lab.node, &host_if_of(r)),
            "GC deleted {}",
            host_if_of(r)
        );
    }
    lab.call("CHECK", 0, Some(&lab.netns_path(0)), &lab.conf("1.1.0"))
        .ok();
    // GC again is a no-op.
    lab.call("GC", 0, None, &conf).ok();
    assert_eq!(lab.allocations().len(), 1);
}

#[test]
fn status_reports_availability() {
    let data = tempfile::tempdir().expect("tmp");
    let conf = |data_dir: &Path, pin: Option<&Path>, v: &str| {
        let mut c = json!({"cniVersion": v, "name": "skiff", "type": "skiff-cni",
            "podCIDR": CIDR, "dataDir": data_dir});
        if let Some(p) = pin {
            c["pinDir"] = json!(p);
        }
        c.to_string()
    };
    let env = [("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")];
    let ok = run(None, &env, &conf(&data.path().join("d"), None, "1.1.0"));
    ok.ok();
    assert!(ok.stdout.trim().is_empty());
    // A dataDir that cannot exist (under a regular file).
    let file = data.path().join("file");
    std::fs::write(&file, b"x").expect("file");
    let msg = run(None, &env, &conf(&file.join("d"), None, "1.1.0")).error(50);
    assert!(msg.contains("dataDir"), "{msg}");
    // A pinDir without the datapath.
    let msg = run(
        None,
        &env,
        &conf(
            &data.path().join("d"),
            Some(&data.path().join("pins")),
            "1.1.0",
        ),
    )
    .error(50);
    assert!(msg.contains("from_pod"), "{msg}");
    // STATUS is 1.1.
    run(None, &env, &conf(&data.path().join("d"), None, "1.0.0")).error(1);
}

#[test]
fn bad_configurations_answer_errors_and_change_nothing() {
    if !require_privileges("bad_configurations_answer_errors_and_change_nothing") {
        return;
    }
    let lab = Lab::new("bad", 1);
    let good = lab.conf("1.1.0");
    let netns = lab.netns_path(0);
    let node_netns = format!("/run/netns/{}", lab.node);
    let not_netns = lab.data.path().join("plain-file");
    std::fs::write(&not_netns, b"x").expect("file");
    let not_netns = not_netns.to_string_lossy().into_owned();
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c.to_string()
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().expect("object").remove(k);
        c.to_string()
    };
    let id = lab.container(0);
    let base: Vec<(&str, &str)> = vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", &id),
        ("CNI_NETNS", &netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];
    let env_with = |k: &'static str, v: &'static str| {
        let mut e: Vec<(&str, &str)> = base.iter().copied().filter(|(x, _)| *x != k).collect();
        e.push((k, v));
        e
    };
    let env_without =
        |k: &str| -> Vec<(&str, &str)> { base.iter().copied().filter(|(x, _)| *x != k).collect() };
    let env_netns = |v: String| {
        let mut e: Vec<(String, String)> = base
            .iter()
            .filter(|(x, _)| *x != "CNI_NETNS")
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        e.push(("CNI_NETNS".into(), v));
        e
    };
    let good_s = good.to_string();
    // (what, environment, stdin, expected CNI error code)
    type Case<'a> = (&'a str, Vec<(String, String)>, String, u64);
    let cases: Vec<Case> = {
        let own = |e: Vec<(&str, &str)>| -> Vec<(String, String)> {
            e.into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        vec![
            (
                "malformed JSON",
                own(base.clone()),
                "{\"cniVersion\": \"1.1.0\",".into(),
                6,
            ),
            ("not an object", own(base.clone()), "[1,2,3]".into(), 6),
            ("empty stdin", own(base.clone()), String::new(), 6),
            (
                "binary garbage",
                own(base.clone()),
                "\u{0}\u{1}\u{fffd}".into(),
                6,
            ),
            (
                "wrong cniVersion",
                own(base.clone()),
                with("cniVersion", json!("0.2.0")),
                1,
            ),
            (
                "future cniVersion",
                own(base.clone()),
                with("cniVersion", json!("2.0.0")),
                1,
            ),
            (
                "missing cniVersion",
                own(base.clone()),
                without("cniVersion"),
                7,
            ),
            ("missing podCIDR", own(base.clone()), without("podCIDR"), 7),
            (
                "podCIDR not a network",
                own(base.clone()),
                with("podCIDR", json!("10.244.1.7/24")),
                7,
            ),
            (
                "podCIDR not a CIDR",
                own(base.clone()),
                with("podCIDR", json!("10.244.1.0")),
                7,
            ),
            (
                "podCIDR IPv6",
                own(base.clone()),
                with("podCIDR", json!("fd00::/64")),
                7,
            ),
            (
                "podCIDR a number",
                own(base.clone()),
                with("podCIDR", json!(24)),
                6,
            ),
            (
                "mtu out of range",
                own(base.clone()),
                with("mtu", json!(70000)),
                7,
            ),
            ("negative mtu", own(base.clone()), with("mtu", json!(-1)), 6),
            (
                "relative dataDir",
                own(base.clone()),
                with("dataDir", json!("ipam")),
                7,
            ),
            (
                "delegated ipam",
                own(base.clone()),
                with("ipam", json!({"type": "host-local"})),
                2,
            ),
            (
                "prevResult not an object",
                own(base.clone()),
                with("prevResult", json!(3)),
                6,
            ),
            (
                "bad CNI_ARGS pair",
                own(env_with("CNI_ARGS", "K8S_POD_NAME")),
                good_s.clone(),
                4,
            ),
            (
                "unknown CNI_ARGS key",
                own(env_with("CNI_ARGS", "FOO=bar")),
                good_s.clone(),
                4,
            ),
            (
                "unknown command",
                own(env_with("CNI_COMMAND", "FROB")),
                good_s.clone(),
                4,
            ),
            (
                "missing CNI_COMMAND",
                own(env_without("CNI_COMMAND")),
                good_s.clone(),
                4,
            ),
            (
                "missing CNI_CONTAINERID",
                own(env_without("CNI_CONTAINERID")),
                good_s.clone(),
                4,
            ),
            (
                "bad CNI_CONTAINERID",
                own(env_with("CNI_CONTAINERID", "../etc")),
                good_s.clone(),
                4,
            ),
            (
                "missing CNI_NETNS",
                own(env_without("CNI_NETNS")),
                good_s.clone(),
                4,
            ),
            (
                "missing CNI_IFNAME",
                own(env_without("CNI_IFNAME")),
                good_s.clone(),
                4,
            ),
            (
                "CNI_IFNAME too long",
                own(env_with("CNI_IFNAME", "a-very-long-ifname")),
                good_s.clone(),
                4,
            ),
            (
                "missing CNI_PATH",
                own(env_without("CNI_PATH")),
                good_s.clone(),
                4,
            ),
            (
                "CNI_NETNS missing file",
                env_netns("/run/netns/skc-nope".into()),
                good_s.clone(),
                4,
            ),
            (
                "CNI_NETNS not a netns",
                env_netns(not_netns.clone()),
                good_s.clone(),
                4,
            ),
            (
                "CNI_NETNS is the node's own",
                env_netns(node_netns.clone()),
                good_s.clone(),
                4,
            ),
            // Hostile input: namespaces of another kind, directories, devices; interface
            // names with '/', dots, NUL-free but odd; network names that climb; huge input.
            ("CNI_NETNS a pid namespace", env_netns("/proc/self/ns/pid".into()), good_s.clone(), 4),
            ("CNI_NETNS a directory", env_netns("/run/netns".into()), good_s.clone(), 4),
            ("CNI_NETNS /dev/null", env_netns("/dev/null".into()), good_s.clone(), 4),
            ("CNI_NETNS relative", env_netns("netns/../x".into()), good_s.clone(), 4),
            ("CNI_IFNAME with '/'", own(env_with("CNI_IFNAME", "eth/0")), good_s.clone(), 4),
            ("CNI_IFNAME ..", own(env_with("CNI_IFNAME", "..")), good_s.clone(), 4),
            ("CNI_IFNAME with ':'", own(env_with("CNI_IFNAME", "eth0:1")), good_s.clone(), 4),
            ("CNI_IFNAME with a space", own(env_with("CNI_IFNAME", "eth 0")), good_s.clone(), 4),
            ("CNI_IFNAME 16 bytes", own(env_with("CNI_IFNAME", "abcdefghijklmnop")), good_s.clone(), 4),
            ("CNI_CONTAINERID with '/'", own(env_with("CNI_CONTAINERID", "abc/../../x")), good_s.clone(), 4),
            ("CNI_ARGS empty key", own(env_with("CNI_ARGS", "=x;K8S_POD_NAME=web")), good_s.clone(), 4),
            ("CNI_ARGS bad IgnoreUnknown", own(env_with("CNI_ARGS", "IgnoreUnknown=maybe")), good_s.clone(), 4),
            ("CNI_ARGS separators only", own(env_with("CNI_ARGS", ";;=;;")), good_s.clone(), 4),
            (
                "network name climbing out of dataDir",
                own(base.clone()),
                {
                    let mut c = good.clone();
                    c.as_object_mut().expect("object").remove("dataDir");
                    c["name"] = json!("../../../tmp/skiff-cni-escape");
                    c.to_string()
                },
                7,
            ),
            ("network name with '/'", own(base.clone()), with("name", json!("a/b")), 7),
            ("17 MiB of stdin", own(base.clone()), " ".repeat(17 << 20), 6),
            (
                "17 MiB config",
                own(base.clone()),
                with("padding", json!("x".repeat(17 << 20))),
                6,
            ),
            ("nesting 100,000 deep", own(base.clone()), "[".repeat(100_000), 6),
            ("a type that is not a string", own(base.clone()), with("type", json!({"a": 1})), 6),
            ("a podCIDR of 1 MiB", own(base.clone()), with("podCIDR", json!("1".repeat(1 << 20))), 7),
        ]
    };
    let before_node = snapshot(&lab.node);
    let before_pod = snapshot(&lab.pods[0]);
    for (what, env, stdin, code) in &cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let out = run(Some(&lab.node), &env, stdin);
        assert_ne!(out.status, 0, "{what}: must fail, got {}", out.stdout);
        let v = out.json();
        assert_eq!(v["code"], *code, "{what}: {v}");
        assert!(
            v["msg"].as_str().is_some_and(|m| m.len() > 10),
            "{what}: a message a person can act on: {v}"
        );
        assert!(
            !out.stderr.contains("panicked"),
            "{what}: no panic: {}",
            out.stderr
        );
    }
    assert_eq!(snapshot(&lab.node), before_node, "the node is unchanged");
    assert_eq!(snapshot(&lab.pods[0]), before_pod, "the pod is unchanged");
    assert!(
        !lab.data_dir().exists(),
        "no IPAM state was written by a refused call"
    );
    assert!(
        !Path::new("/tmp/skiff-cni-escape").exists() && !Path::new("/var/lib/cni/skiff/..").join("../../tmp/skiff-cni-escape").exists(),
        "no state outside the data directory"
    );
    // The same call with the good configuration works.
    lab.add(0, "1.1.0");
}

#[test]
fn add_appends_to_a_previous_result() {
    if !require_privileges("add_appends_to_a_previous_result") {
        return;
    }
    let lab = Lab::new("chain", 1);
    let mut conf = lab.conf("1.0.0");
    conf["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "tap9", "mac": "02:00:00:00:00:09"}],
        "ips": [{"address": "192.168.50.2/24", "interface": 0}],
        "routes": [{"dst": "192.168.0.0/16"}],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]}
    });
    let r = lab
        .call("ADD", 0, Some(&lab.netns_path(0)), &conf)
        .ok()
        .json();
    let interfaces = r["interfaces"].as_array().expect("interfaces");
    assert_eq!(interfaces.len(), 3, "{r}");
    assert_eq!(
        interfaces[0]["name"], "tap9",
        "the previous interface stays first"
    );
    assert_eq!(interfaces[2]["name"], "eth0");
    let ips = r["ips"].as_array().expect("ips");
    assert_eq!(ips[0]["address"], "192.168.50.2/24");
    assert_eq!(
        ips[1]["interface"], 2,
        "our address points at our pod interface"
    );
    assert_eq!(r["routes"][0]["dst"], "192.168.0.0/16");
    assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
    // CHECK with this chained result as prevResult finds our address in it.
    let mut check = lab.conf("1.0.0");
    check["prevResult"] = r.clone();
    lab.call("CHECK", 0, Some(&lab.netns_path(0)), &check).ok();
    lab.del(0, "1.0.0");
}
