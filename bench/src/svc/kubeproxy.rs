//! kube-proxy's rules for a [`ServiceSet`], written the way kube-proxy writes them, so the
//! iptables and nftables paths cost what they cost in a real cluster. Pure text generation.
//!
//! iptables mode (pkg/proxy/iptables, v1.28+): `KUBE-SERVICES` holds one rule per service port
//! (linear: a new connection walks it), jumping to `KUBE-SVC-<hash>`, which picks an endpoint
//! with `-m statistic --mode random --probability 1/(n-i)` rules and jumps to `KUBE-SEP-<hash>`
//! doing the DNAT; `KUBE-MARK-MASQ` / `KUBE-POSTROUTING` masquerade off-cluster sources and
//! NodePort traffic; the NodePort rule is the last one of KUBE-SERVICES. Chain hashes are
//! kube-proxy's: base32(sha256(servicePortName + protocol [+ endpoint]))[:16]. Above 1,000
//! endpoints kube-proxy's "large cluster mode" drops the comments on the per-endpoint rules;
//! so does this. Restores use `--noflush` with the KUBE-* chains declared, as kube-proxy does.
//!
//! nftables mode (pkg/proxy/nftables, v1.31+): table `ip kube-proxy`, a verdict map
//! `service-ips` (daddr . proto . dport -> goto service chain), `service-nodeports`, per-service
//! chains ending in `numgen random mod N vmap { i : goto endpoint-chain }`, per-endpoint chains
//! doing `dnat to`, the masquerading chains, and the filter-forward checks.

use std::fmt::Write;

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use super::model::{CLUSTER_CIDR, Endpoint, SERVICE_CIDR, ServicePort, ServiceSet};

/// kube-proxy's largeClusterEndpointsThreshold.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

fn b32_sha256(s: &str) -> String {
    BASE32.encode(&Sha256::digest(s.as_bytes()))
}

/// portProtoHash: the hash part of KUBE-SVC-, KUBE-EXT-, KUBE-FW- chain names.
fn port_proto_hash(sp: &ServicePort) -> String {
    let mut h = b32_sha256(&format!("{}{}", sp.service_port_name(), sp.proto.as_str()));
    h.truncate(16);
    h
}

pub fn svc_chain(sp: &ServicePort) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(sp))
}

pub fn ext_chain(sp: &ServicePort) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(sp))
}

/// servicePortEndpointChainName.
pub fn sep_chain(sp: &ServicePort, ep: &Endpoint) -> String {
    let mut h = b32_sha256(&format!(
        "{}{}{}",
        sp.service_port_name(),
        sp.proto.as_str(),
        ep
    ));
    h.truncate(16);
    format!("KUBE-SEP-{h}")
}

/// The rules kube-proxy installs once with `iptables -I` (jumps from the built-in chains);
/// restore with `--noflush` before [`iptables_full`].
pub fn iptables_base() -> String {
    let mut s = String::new();
    s.push_str("*filter\n");
    for c in [
        "KUBE-PROXY-FIREWALL",
        "KUBE-NODEPORTS",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-SERVICES",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    s.push_str(concat!(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "COMMIT\n",
        "*nat\n",
        ":KUBE-SERVICES - [0:0]\n",
        ":KUBE-POSTROUTING - [0:0]\n",
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        "COMMIT\n",
    ));
    s
}

fn comment(text: &str) -> String {
    if text.contains(' ') {
        format!("-m comment --comment \"{text}\"")
    } else {
        format!("-m comment --comment {text}")
    }
}

struct IptWriter {
    large: bool,
}

impl IptWriter {
    /// `-m comment` on per-endpoint rules, unless in large cluster mode.
    fn ep_comment(&self, text: &str) -> String {
        if self.large {
            String::new()
        } else {
            format!("{} ", comment(text))
        }
    }

    fn declare_service_chains(&self, s: &mut String, sp: &ServicePort) {
        let _ = writeln!(s, ":{} - [0:0]", svc_chain(sp));
        if sp.node_port.is_some() {
            let _ = writeln!(s, ":{} - [0:0]", ext_chain(sp));
        }
        for ep in &sp.endpoints {
            let _ = writeln!(s, ":{} - [0:0]", sep_chain(sp, ep));
        }
    }

    /// The KUBE-SERVICES and KUBE-NODEPORTS rules of one service port.
    fn entry_rules(&self, s: &mut String, sp: &ServicePort) {
        let spn = sp.service_port_name();
        let p = sp.proto.as_str();
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES {} -m {p} -p {p} -d {} --dport {} -j {}",
            comment(&format!("{spn} cluster IP")),
            sp.vip,
            sp.port,
            svc_chain(sp)
        );
        if let Some(np) = sp.node_port {
            let _ = writeln!(
                s,
                "-A KUBE-NODEPORTS {} -m {p} -p {p} --dport {np} -j {}",
                comment(&spn),
                ext_chain(sp)
            );
        }
    }

    /// The KUBE-SVC, KUBE-EXT and KUBE-SEP chains' rules of one service port.
    fn chain_rules(&self, s: &mut String, sp: &ServicePort) {
        let spn = sp.service_port_name();
        let p = sp.proto.as_str();
        let svc = svc_chain(sp);
        let _ = writeln!(
            s,
            "-A {svc} {} -m {p} -p {p} -d {} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            comment(&format!("{spn} cluster IP")),
            sp.vip,
            sp.port
        );
        if sp.node_port.is_some() {
            let ext = ext_chain(sp);
            let _ = writeln!(
                s,
                "-A {ext} {} -j KUBE-MARK-MASQ",
                comment(&format!("masquerade traffic for {spn} external destinations"))
            );
            let _ = writeln!(s, "-A {ext} -j {svc}");
        }
        let n = sp.endpoints.len();
        for (i, ep) in sp.endpoints.iter().enumerate() {
            let c = self.ep_comment(&format!("{spn} -> {ep}"));
            if i + 1 < n {
                let _ = writeln!(
                    s,
                    "-A {svc} {c}-m statistic --mode random --probability {:.10} -j {}",
                    1.0 / (n - i) as f64,
                    sep_chain(sp, ep)
                );
            } else {
                let _ = writeln!(s, "-A {svc} {c}-j {}", sep_chain(sp, ep));
            }
        }
        for ep in &sp.endpoints {
            let sep = sep_chain(sp, ep);
            let c = self.ep_comment(&spn);
            let _ = writeln!(s, "-A {sep} {c}-s {} -j KUBE-MARK-MASQ", ep.ip);
            let _ = writeln!(s, "-A {sep} {c}-m {p} -p {p} -j DNAT --to-destination {ep}");
        }
    }

    fn filter_table(&self, s: &mut String) {
        s.push_str(concat!(
            "*filter\n",
            ":KUBE-NODEPORTS - [0:0]\n",
            ":KUBE-SERVICES - [0:0]\n",
            ":KUBE-EXTERNAL-SERVICES - [0:0]\n",
            ":KUBE-FORWARD - [0:0]\n",
            ":KUBE-PROXY-FIREWALL - [0:0]\n",
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
            "COMMIT\n",
        ));
    }

    fn nat_head(&self, s: &mut String) {
        s.push_str(concat!(
            "*nat\n",
            ":KUBE-NODEPORTS - [0:0]\n",
            ":KUBE-SERVICES - [0:0]\n",
            ":KUBE-MARK-MASQ - [0:0]\n",
            ":KUBE-POSTROUTING - [0:0]\n",
        ));
    }

    fn nat_fixed_rules(&self, s: &mut String) {
        s.push_str(concat!(
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
        ));
    }

    fn nat_tail(&self, s: &mut String) {
        s.push_str(concat!(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
            "COMMIT\n",
        ));
    }
}

fn writer(set: &ServiceSet) -> IptWriter {
    IptWriter {
        large: set.endpoint_count() > LARGE_CLUSTER_ENDPOINTS,
    }
}

/// A full sync: every KUBE-* chain of the filter and nat tables (for `iptables-restore --noflush`).
pub fn iptables_full(set: &ServiceSet) -> String {
    let w = writer(set);
    let mut s = String::with_capacity(set.endpoint_count() * 300 + 4096);
    w.filter_table(&mut s);
    w.nat_head(&mut s);
    for sp in &set.ports {
        w.declare_service_chains(&mut s, sp);
    }
    w.nat_fixed_rules(&mut s);
    for sp in &set.ports {
        w.entry_rules(&mut s, sp);
        w.chain_rules(&mut s, sp);
    }
    w.nat_tail(&mut s);
    s
}

/// The same kernel ruleset as [`iptables_base`] followed by [`iptables_full`], as one input for
/// a plain `iptables-restore` (no `--noflush`) into a namespace with no rules yet. kube-proxy
/// restores with `--noflush`, which iptables-nft 1.8.9 handles in time that grows much faster
/// than the rule count (minutes at 10,000 Services x 10 endpoints); the lab loads the datapath
/// this way and the programming benchmark times kube-proxy's way.
pub fn iptables_fresh(set: &ServiceSet) -> String {
    let (base, full) = (iptables_base(), iptables_full(set));
    let mut out = String::with_capacity(base.len() + full.len());
    for table in ["filter", "nat"] {
        let mut declared = std::collections::HashSet::new();
        let (mut decls, mut rules) = (String::new(), String::new());
        for text in [&full, &base] {
            let mut inside = false;
            for l in text.lines() {
                if let Some(t) = l.strip_prefix('*') {
                    inside = t == table;
                    continue;
                }
                if !inside || l == "COMMIT" {
                    continue;
                }
                if l.starts_with(':') {
                    let name = l.split(' ').next().unwrap_or(l).to_string();
                    if declared.insert(name) {
                        decls.push_str(l);
                        decls.push('\n');
                    }
                } else {
                    rules.push_str(l);
                    rules.push('\n');
                }
            }
        }
        let _ = write!(out, "*{table}\n{decls}{rules}COMMIT\n");
    }
    out
}

/// kube-proxy's partial sync (MinimizeIPTablesRestore, GA in 1.28) after the service port at
/// `changed` (in `new`) changed from `old`: the whole KUBE-SERVICES / KUBE-NODEPORTS chains are
/// rewritten (they are always), the changed service's chains are rewritten, and endpoint
/// chains that went away are deleted with -X.
pub fn iptables_partial(old: &ServiceSet, new: &ServiceSet, changed: usize) -> String {
    let w = writer(new);
    let mut s = String::with_capacity(new.ports.len() * 200 + 8192);
    w.filter_table(&mut s);
    w.nat_head(&mut s);
    let sp = &new.ports[changed];
    w.declare_service_chains(&mut s, sp);
    // Stale endpoint chains are declared too (which flushes them; -X needs an empty chain),
    // as kube-proxy does.
    let kept: Vec<String> = sp.endpoints.iter().map(|e| sep_chain(sp, e)).collect();
    let oldp = &old.ports[changed];
    let stale: Vec<String> = oldp
        .endpoints
        .iter()
        .map(|e| sep_chain(oldp, e))
        .filter(|c| !kept.contains(c))
        .collect();
    for c in &stale {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    w.nat_fixed_rules(&mut s);
    for (i, p) in new.ports.iter().enumerate() {
        w.entry_rules(&mut s, p);
        if i == changed {
            w.chain_rules(&mut s, p);
        }
    }
    for c in &stale {
        let _ = writeln!(s, "-X {c}");
    }
    w.nat_tail(&mut s);
    s
}

/// hashAndTruncate from kube-proxy's nftables proxier: "<8 chars of base32(sha256)>-<name>".
fn nft_base(name: &str) -> String {
    let h = b32_sha256(name);
    format!("{}-{name}", &h[..8])
}

pub fn nft_service_chain(sp: &ServicePort) -> String {
    format!(
        "service-{}",
        nft_base(&format!(
            "{}/{}/{}/{}",
            super::model::NAMESPACE,
            sp.name,
            sp.proto.as_str(),
            sp.port_name
        ))
    )
}

pub fn nft_external_chain(sp: &ServicePort) -> String {
    format!(
        "external-{}",
        nft_base(&format!(
            "{}/{}/{}/{}",
            super::model::NAMESPACE,
            sp.name,
            sp.proto.as_str(),
            sp.port_name
        ))
    )
}

pub fn nft_endpoint_chain(sp: &ServicePort, ep: &Endpoint) -> String {
    format!(
        "endpoint-{}",
        nft_base(&format!(
            "{}/{}/{}/{}__{}/{}",
            super::model::NAMESPACE,
            sp.name,
            sp.proto.as_str(),
            sp.port_name,
            ep.ip,
            ep.port
        ))
    )
}

const T: &str = "ip kube-proxy";

fn nft_service_rules(s: &mut String, sp: &ServicePort) {
    let chain = nft_service_chain(sp);
    let p = sp.proto.as_str();
    let _ = writeln!(
        s,
        "add rule {T} {chain} ip daddr {} {p} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        sp.vip, sp.port
    );
    let arms: Vec<String> = sp
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", nft_endpoint_chain(sp, ep)))
        .collect();
    let _ = writeln!(
        s,
        "add rule {T} {chain} numgen random mod {} vmap {{ {} }}",
        sp.endpoints.len(),
        arms.join(" , ")
    );
}

fn nft_endpoint(s: &mut String, sp: &ServicePort, ep: &Endpoint) {
    let chain = nft_endpoint_chain(sp, ep);
    let _ = writeln!(s, "add chain {T} {chain}");
    let _ = writeln!(
        s,
        "add rule {T} {chain} ip saddr {} jump mark-for-masquerade",
        ep.ip
    );
    let _ = writeln!(
        s,
        "add rule {T} {chain} meta l4proto {} dnat to {ep}",
        sp.proto.as_str()
    );
}

/// kube-proxy nftables mode's first full sync into an empty namespace (`nft -f`).
pub fn nft_full(set: &ServiceSet) -> String {
    let mut s = String::with_capacity(set.endpoint_count() * 400 + 8192);
    s.push_str(&format!(
        concat!(
            "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n",
            "add chain {t} mark-for-masquerade\n",
            "add rule {t} mark-for-masquerade mark set mark or 0x4000\n",
            "add chain {t} masquerading\n",
            "add rule {t} masquerading mark and 0x4000 == 0 return\n",
            "add rule {t} masquerading mark set mark xor 0x4000\n",
            "add rule {t} masquerading masquerade fully-random\n",
            "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n",
            "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n",
            "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n",
            "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n",
            "add chain {t} service-endpoints-check\n",
            "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n",
            "add chain {t} cluster-ips-check\n",
            "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n",
            "add rule {t} cluster-ips-check ip daddr {{ {cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\"\n",
            "add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}\n",
            "add rule {t} filter-forward ct state new jump service-endpoints-check\n",
            "add rule {t} filter-forward ct state new jump cluster-ips-check\n",
            "add chain {t} filter-input {{ type filter hook input priority -110 ; }}\n",
            "add rule {t} filter-input ct state new jump service-endpoints-check\n",
            "add chain {t} services\n",
            "add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n",
            "add rule {t} nat-prerouting jump services\n",
            "add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n",
            "add rule {t} nat-output jump services\n",
            "add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n",
            "add rule {t} nat-postrouting jump masquerading\n",
            "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n",
            "add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n",
        ),
        t = T,
        cidr = SERVICE_CIDR
    ));
    for sp in &set.ports {
        let chain = nft_service_chain(sp);
        for ep in &sp.endpoints {
            nft_endpoint(&mut s, sp, ep);
        }
        let _ = writeln!(s, "add chain {T} {chain}");
        nft_service_rules(&mut s, sp);
        let p = sp.proto.as_str();
        if let Some(np) = sp.node_port {
            let ext = nft_external_chain(sp);
            let _ = writeln!(s, "add chain {T} {ext}");
            let _ = writeln!(s, "add rule {T} {ext} jump mark-for-masquerade");
            let _ = writeln!(s, "add rule {T} {ext} goto {chain}");
            let _ = writeln!(
                s,
                "add element {T} service-nodeports {{ {p} . {np} : goto {ext} }}"
            );
        }
        let _ = writeln!(s, "add element {T} cluster-ips {{ {} }}", sp.vip);
        let _ = writeln!(
            s,
            "add element {T} service-ips {{ {} . {p} . {} : goto {chain} }}",
            sp.vip, sp.port
        );
    }
    s
}

/// The transaction kube-proxy's nftables mode sends when the endpoints of the service port at
/// `changed` change from `old` to `new`: new endpoint chains, the service chain rewritten,
/// stale endpoint chains flushed and deleted.
pub fn nft_endpoint_change(old: &ServiceSet, new: &ServiceSet, changed: usize) -> String {
    let (o, n) = (&old.ports[changed], &new.ports[changed]);
    let mut s = String::new();
    for ep in n.endpoints.iter().filter(|e| !o.endpoints.contains(e)) {
        nft_endpoint(&mut s, n, ep);
    }
    let chain = nft_service_chain(n);
    let _ = writeln!(s, "flush chain {T} {chain}");
    nft_service_rules(&mut s, n);
    for ep in o.endpoints.iter().filter(|e| !n.endpoints.contains(e)) {
        let c = nft_endpoint_chain(o, ep);
        let _ = writeln!(s, "flush chain {T} {c}");
        let _ = writeln!(s, "delete chain {T} {c}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::model::{self, Protocol};
    use super::*;
    use std::net::Ipv4Addr;

    fn port(ns_name: &str, port_name: &str, eps: &[(Ipv4Addr, u16)]) -> ServicePort {
        ServicePort {
            index: 0,
            name: ns_name.into(),
            port_name: port_name.into(),
            proto: Protocol::Tcp,
            vip: Ipv4Addr::new(172, 30, 0, 41),
            port: 80,
            node_port: None,
            endpoints: eps
                .iter()
                .map(|&(ip, port)| Endpoint { ip, port })
                .collect(),
        }
    }

    /// The chain names in kube-proxy's own tests (pkg/proxy/iptables/proxier_test.go) use
    /// namespace "ns1"; ours uses "bench", so this checks the hash through a port whose
    /// ServicePortName renders the same.
    #[test]
    fn chain_hashes_match_kube_proxy() {
        let h = |s: &str| b32_sha256(s)[..16].to_string();
        assert_eq!(h("ns1/svc1:p80tcp"), "XPGD46QRK7WJZT7O");
        assert_eq!(h("ns1/svc1:p80tcp10.180.0.1:80"), "SXIVWICOYRO3J4NJ");
        assert_eq!(h("ns1/svc1:p80tcp10.180.0.2:80"), "LXVODXWDISEETFEF");
        let sp = port("svc1", "p80", &[(Ipv4Addr::new(10, 180, 0, 1), 80)]);
        assert_eq!(sp.service_port_name(), "bench/svc1:p80");
        assert_eq!(svc_chain(&sp), format!("KUBE-SVC-{}", h("bench/svc1:p80tcp")));
    }

    #[test]
    fn small_cluster_rules_have_kube_proxy_shape() {
        let sp = port(
            "svc1",
            "p80",
            &[
                (Ipv4Addr::new(10, 180, 0, 1), 80),
                (Ipv4Addr::new(10, 180, 0, 2), 80),
            ],
        );
        let set = ServiceSet {
            ports: vec![sp.clone()],
            probe_tcp: vec![0],
            probe_udp: vec![],
            services: 1,
            endpoints_per_service: 2,
        };
        let text = iptables_full(&set);
        let svc = svc_chain(&sp);
        let sep1 = sep_chain(&sp, &sp.endpoints[0]);
        assert!(text.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"bench/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j {svc}\n"
        )));
        assert!(text.contains(&format!(
            "-A {svc} -m comment --comment \"bench/svc1:p80 -> 10.180.0.1:80\" -m statistic --mode random --probability 0.5000000000 -j {sep1}\n"
        )));
        assert!(text.contains(&format!(
            "-A {sep1} -m comment --comment bench/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80\n"
        )));
        assert!(text.ends_with("-j KUBE-NODEPORTS\nCOMMIT\n"));
    }

    fn real() -> Vec<Endpoint> {
        model::real_endpoints(&[Ipv4Addr::new(10, 244, 1, 11)], 10)
    }

    #[test]
    fn large_cluster_mode_drops_endpoint_comments_and_counts_add_up() {
        let set = model::build(200, 10, 2, &real()).expect("set");
        let text = iptables_full(&set);
        let dnat = text.matches("-j DNAT").count();
        assert_eq!(dnat, set.endpoint_count());
        assert_eq!(text.matches("-m statistic").count(), set.ports.len() * 9);
        assert!(!text.contains("\" -> "), "no per-endpoint comments above 1000 endpoints");
        // Every chain a rule jumps to or appends to is declared.
        let declared: std::collections::HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for l in text.lines().filter(|l| l.starts_with("-A ")) {
            let chain = l.split(' ').nth(1).expect("chain");
            assert!(declared.contains(chain), "{chain} undeclared");
            if let Some(target) = l.split(" -j ").nth(1) {
                let target = target.split(' ').next().expect("target");
                if target.starts_with("KUBE-") {
                    assert!(declared.contains(target), "{target} undeclared");
                }
            }
        }
    }

    #[test]
    fn fresh_input_holds_base_and_full_rules() {
        let set = model::build(30, 10, 2, &real()).expect("set");
        let fresh = iptables_fresh(&set);
        let (base, full) = (iptables_base(), iptables_full(&set));
        let rules = |t: &str| t.lines().filter(|l| l.starts_with("-A ")).count();
        assert_eq!(rules(&fresh), rules(&base) + rules(&full));
        assert_eq!(fresh.matches("COMMIT").count(), 2);
        assert_eq!(fresh.matches(":KUBE-SERVICES - [0:0]").count(), 2, "once per table");
    }

    #[test]
    fn partial_sync_rewrites_entries_and_one_service() {
        let set = model::build(50, 10, 2, &real()).expect("set");
        let new_ep = Endpoint {
            ip: Ipv4Addr::new(10, 241, 0, 9),
            port: 8080,
        };
        let (changed, pos) = set.with_endpoint_changed(7, 4, new_ep).expect("change");
        let text = iptables_partial(&set, &changed, pos);
        assert_eq!(text.matches("-A KUBE-SERVICES ").count(), set.ports.len() + 1);
        assert_eq!(text.matches("-j DNAT").count(), 10);
        assert!(text.contains("--to-destination 10.241.0.9:8080"));
        let old_sep = sep_chain(&set.ports[pos], &set.ports[pos].endpoints[4]);
        assert!(text.contains(&format!("-X {old_sep}\n")));
        assert!(text.contains(&format!(":{old_sep} - [0:0]\n")), "flushed before -X");
    }

    #[test]
    fn nft_shapes() {
        let set = model::build(20, 10, 2, &real()).expect("set");
        let text = nft_full(&set);
        assert_eq!(text.matches(" dnat to ").count(), set.endpoint_count());
        assert_eq!(text.matches("add element ip kube-proxy service-ips").count(), set.ports.len());
        assert_eq!(text.matches("add element ip kube-proxy service-nodeports").count(), 4);
        assert!(text.contains("numgen random mod 10 vmap { 0 : goto endpoint-"));
        let sp = &set.ports[0];
        assert!(nft_service_chain(sp).starts_with("service-"));
        assert!(nft_service_chain(sp).ends_with("-bench/svc-0/tcp/tcp"));
        assert!(nft_endpoint_chain(sp, &sp.endpoints[0]).ends_with("__10.240.0.1/8080"));

        let new_ep = Endpoint {
            ip: Ipv4Addr::new(10, 241, 0, 9),
            port: 8080,
        };
        let (changed, pos) = set.with_endpoint_changed(3, 0, new_ep).expect("change");
        let delta = nft_endpoint_change(&set, &changed, pos);
        assert_eq!(delta.matches("add chain").count(), 1);
        assert_eq!(delta.matches("delete chain").count(), 1);
        assert!(delta.contains("dnat to 10.241.0.9:8080"));
    }
}
