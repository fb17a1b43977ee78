//! NetworkPolicy on a node: reflectors for NetworkPolicies, Pods and Namespaces feed one pure
//! translation ([`desired_policies`]: networking.k8s.io/v1 -> per local pod, per direction,
//! isolated or not and the allowed (peer block, proto, port) list), and the shell
//! ([`run_policy_sync`]) keeps the datapath's POLICY trie and isolation flags equal to it.
//!
//! Semantics (the API's, as kube-proxy-free datapaths implement them):
//! - a pod is isolated for a direction when some policy of its namespace selects it
//!   (`podSelector`) with that direction in `policyTypes` (absent: Ingress, plus Egress when the
//!   policy has egress rules); an isolated pod gets only the union of the rules' allows;
//! - a rule's peers: none = every address; `podSelector` alone = pods of the policy's
//!   namespace; `namespaceSelector` alone = every pod of the matching namespaces; both = the
//!   matching pods in the matching namespaces; `ipBlock` = the CIDR minus `except`. Pods are
//!   resolved cluster-wide to their pod IPs (/32), so pods on other nodes count too;
//! - ports: none = every port and protocol; `protocol` defaults to TCP; `endPort` expands to
//!   each port of the range (the trie has no port ranges; ranges wider than
//!   [`MAX_PORT_RANGE`] are refused: fail closed); a named port resolves against the policed
//!   pod's container ports for ingress and against each peer pod's for egress (an ipBlock or
//!   "everything" egress peer with a named port means the cluster's pods in that block that
//!   name the port).
//!
//! What cannot be expressed (SCTP, IPv6 blocks, a malformed CIDR) allows nothing and is logged:
//! a policy never opens more than it says.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;
use kube::core::{Selector, SelectorExt};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use skiff_datapath::policy::{PolicyAllow, PolicyDirection};
use skiff_datapath::{Datapath, Proto};

/// The widest `port..endPort` range expanded into trie entries (one per port).
pub const MAX_PORT_RANGE: u32 = 1024;

/// What one local pod gets: `None` = not isolated in that direction (everything allowed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    pub ingress: Option<Vec<PolicyAllow>>,
    pub egress: Option<Vec<PolicyAllow>>,
}

/// A pod as the translation sees it.
#[derive(Clone, Debug)]
struct PodView<'a> {
    namespace: &'a str,
    labels: BTreeMap<String, String>,
    ip: Ipv4Addr,
    node: Option<&'a str>,
    /// container port name -> (protocol, port)
    named_ports: BTreeMap<String, (Option<Proto>, u16)>,
}

fn pod_view(p: &Pod) -> Option<PodView<'_>> {
    let spec = p.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = p.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
        return None;
    }
    let ip: Ipv4Addr = status.pod_ip.as_deref()?.parse().ok()?;
    let mut named_ports = BTreeMap::new();
    for c in &spec.containers {
        for port in c.ports.iter().flatten() {
            if let (Some(name), Ok(num)) = (&port.name, u16::try_from(port.container_port)) {
                named_ports
                    .entry(name.clone())
                    .or_insert((proto_of(port.protocol.as_deref()), num));
            }
        }
    }
    Some(PodView {
        namespace: p.metadata.namespace.as_deref().unwrap_or("default"),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ip,
        node: spec.node_name.as_deref(),
        named_ports,
    })
}

/// `None` for a protocol the datapath cannot police (SCTP, unknown).
fn proto_of(p: Option<&str>) -> Option<Proto> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        _ => None,
    }
}

fn selector(s: &LabelSelector) -> Result<Selector, String> {
    Selector::try_from(s.clone()).map_err(|e| format!("bad label selector: {e}"))
}

/// One port clause of a rule, after parsing.
#[derive(Clone, Debug)]
enum PortSpec {
    /// No `ports`: every protocol and port.
    Any,
    /// A protocol without a port: every port of it.
    AllOf(Proto),
    /// port..=end
    Range(Proto, u16, u16),
    Named(Proto, String),
}

fn port_specs(ports: Option<&Vec<NetworkPolicyPort>>, warn: &mut Vec<String>) -> Vec<PortSpec> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return vec![PortSpec::Any];
    };
    let mut out = Vec::new();
    for p in ports {
        let Some(proto) = proto_of(p.protocol.as_deref()) else {
            warn.push(format!(
                "protocol {:?} is not policed here: that port allows nothing",
                p.protocol
            ));
            continue;
        };
        match &p.port {
            None => out.push(PortSpec::AllOf(proto)),
            Some(IntOrString::String(name)) => out.push(PortSpec::Named(proto, name.clone())),
            Some(IntOrString::Int(n)) => {
                let Ok(start) = u16::try_from(*n).map_err(|_| ()).and_then(|s| if s == 0 { Err(()) } else { Ok(s) }) else {
                    warn.push(format!("port {n} is not a port: it allows nothing"));
                    continue;
                };
                let end = match p.end_port {
                    None => start,
                    Some(e) => match u16::try_from(e) {
                        Ok(e) if e >= start && u32::from(e - start) < MAX_PORT_RANGE => e,
                        _ => {
                            warn.push(format!(
                                "port range {start}-{e} is not a range of at most {MAX_PORT_RANGE} ports: it allows nothing"
                            ));
                            continue;
                        }
                    },
                };
                out.push(PortSpec::Range(proto, start, end));
            }
        }
    }
    out
}

/// A rule's peer, resolved.
#[derive(Clone, Debug)]
enum Peer {
    Block(Ipv4Addr, u8, Vec<(Ipv4Addr, u8)>),
    /// Indexes into the pod list.
    Pods(Vec<usize>),
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?} is not an IPv4 CIDR"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{s:?} has a bad prefix length"))?;
    Ok((ip, len))
}

fn masked(ip: Ipv4Addr, len: u8) -> u32 {
    if len == 0 { 0 } else { u32::from(ip) & (u32::MAX << (32 - u32::from(len))) }
}

fn in_block(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    masked(ip, len) == masked(net, len)
}

struct World<'a> {
    pods: Vec<PodView<'a>>,
    ns_labels: BTreeMap<&'a str, BTreeMap<String, String>>,
}

impl World<'_> {
    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut l = self.ns_labels.get(ns).cloned().unwrap_or_default();
        // The apiserver sets it on every namespace; a namespace the cache has not seen yet has it too.
        l.entry("kubernetes.io/metadata.name".into()).or_insert_with(|| ns.to_string());
        l
    }

    fn peers(&self, policy_ns: &str, peers: Option<&Vec<NetworkPolicyPeer>>) -> Result<Vec<Peer>, String> {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else {
            return Ok(vec![Peer::Block(Ipv4Addr::UNSPECIFIED, 0, vec![])]);
        };
        let mut out = Vec::new();
        for peer in peers {
            if let Some(b) = &peer.ip_block {
                let (net, len) = parse_cidr(&b.cidr)?;
                let mut except = Vec::new();
                for e in b.except.iter().flatten() {
                    let (ex, ex_len) = parse_cidr(e)?;
                    if ex_len <= len || !in_block(ex, net, len) {
                        return Err(format!("except {e} is not inside {}", b.cidr));
                    }
                    except.push((Ipv4Addr::from(masked(ex, ex_len)), ex_len));
                }
                out.push(Peer::Block(Ipv4Addr::from(masked(net, len)), len, except));
                continue;
            }
            let pod_sel = peer.pod_selector.as_ref().map(selector).transpose()?;
            let ns_sel = peer.namespace_selector.as_ref().map(selector).transpose()?;
            if pod_sel.is_none() && ns_sel.is_none() {
                return Err("a peer with neither ipBlock, podSelector nor namespaceSelector".into());
            }
            let matched = self
                .pods
                .iter()
                .enumerate()
                .filter(|(_, p)| match &ns_sel {
                    None => p.namespace == policy_ns,
                    Some(s) => s.matches(&self.namespace_labels(p.namespace)),
                })
                .filter(|(_, p)| pod_sel.as_ref().is_none_or(|s| s.matches(&p.labels)))
                .map(|(i, _)| i)
                .collect();
            out.push(Peer::Pods(matched));
        }
        Ok(out)
    }
}

type AllowKey = (u32, u8, Vec<(u32, u8)>, u8, u16);

fn allow_key(a: &PolicyAllow) -> AllowKey {
    (
        u32::from(a.peer),
        a.prefix_len,
        a.except.iter().map(|(ip, l)| (u32::from(*ip), *l)).collect(),
        a.proto.map(|p| p.number()).unwrap_or(0),
        a.port.unwrap_or(0),
    )
}

fn allow(peer: Ipv4Addr, len: u8, except: &[(Ipv4Addr, u8)], proto: Option<Proto>, port: Option<u16>) -> PolicyAllow {
    PolicyAllow { peer, prefix_len: len, except: except.to_vec(), proto, port }
}

/// The allows one rule gives `target` (an index into the pods) in `direction`.
fn rule_allows(
    world: &World<'_>,
    target: &PodView<'_>,
    direction: PolicyDirection,
    peers: &[Peer],
    ports: &[PortSpec],
    out: &mut BTreeMap<AllowKey, PolicyAllow>,
) {
    let mut push = |a: PolicyAllow| {
        out.insert(allow_key(&a), a);
    };
    for peer in peers {
        // (peer block, except) pairs this peer stands for, for port specs that do not depend
        // on the peer.
        let blocks: Vec<(Ipv4Addr, u8, Vec<(Ipv4Addr, u8)>)> = match peer {
            Peer::Block(n, l, e) => vec![(*n, *l, e.clone())],
            Peer::Pods(ix) => ix.iter().map(|i| (world.pods[*i].ip, 32, vec![])).collect(),
        };
        for spec in ports {
            match spec {
                PortSpec::Any => blocks.iter().for_each(|(n, l, e)| push(allow(*n, *l, e, None, None))),
                PortSpec::AllOf(p) => blocks.iter().for_each(|(n, l, e)| push(allow(*n, *l, e, Some(*p), None))),
                PortSpec::Range(p, a, b) => {
                    for port in *a..=*b {
                        blocks.iter().for_each(|(n, l, e)| push(allow(*n, *l, e, Some(*p), Some(port))));
                    }
                }
                PortSpec::Named(p, name) => match direction {
                    // Ingress: the policed pod's own port of that name.
                    PolicyDirection::Ingress => {
                        if let Some((pp, num)) = target.named_ports.get(name)
                            && pp.unwrap_or(Proto::Tcp) == *p
                        {
                            blocks.iter().for_each(|(n, l, e)| push(allow(*n, *l, e, Some(*p), Some(*num))));
                        }
                    }
                    // Egress: each destination pod's port of that name.
                    PolicyDirection::Egress => {
                        let candidates: Vec<&PodView<'_>> = match peer {
                            Peer::Pods(ix) => ix.iter().map(|i| &world.pods[*i]).collect(),
                            Peer::Block(n, l, e) => world
                                .pods
                                .iter()
                                .filter(|q| in_block(q.ip, *n, *l) && !e.iter().any(|(x, xl)| in_block(q.ip, *x, *xl)))
                                .collect(),
                        };
                        for q in candidates {
                            if let Some((pp, num)) = q.named_ports.get(name)
                                && pp.unwrap_or(Proto::Tcp) == *p
                            {
                                push(allow(q.ip, 32, &[], Some(*p), Some(*num)));
                            }
                        }
                    }
                },
            }
        }
    }
}

fn policy_types(p: &NetworkPolicy) -> (bool, bool) {
    let spec = p.spec.as_ref();
    match spec.and_then(|s| s.policy_types.as_ref()).filter(|t| !t.is_empty()) {
        Some(t) => (t.iter().any(|t| t == "Ingress"), t.iter().any(|t| t == "Egress")),
        None => (true, spec.and_then(|s| s.egress.as_ref()).is_some_and(|e| !e.is_empty())),
    }
}

/// What the NetworkPolicies say for every pod of `node` that has a pod IP: the pure core.
/// Returns the per-pod policy and warnings about what could not be expressed.
pub fn desired_policies(
    node: &str,
    pods: &[Pod],
    namespaces: &[Namespace],
    policies: &[NetworkPolicy],
) -> (BTreeMap<Ipv4Addr, PodPolicy>, Vec<String>) {
    let world = World {
        pods: pods.iter().filter_map(pod_view).collect(),
        ns_labels: namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.clone().unwrap_or_default())))
            .collect(),
    };
    let mut warnings = Vec::new();
    let mut out = BTreeMap::new();
    // Parse each policy once: (namespace, selector, ingress?, egress?, rules).
    struct Parsed<'a> {
        ns: &'a str,
        select: Selector,
        ingress: Option<Vec<(Vec<Peer>, Vec<PortSpec>)>>,
        egress: Option<Vec<(Vec<Peer>, Vec<PortSpec>)>>,
    }
    let mut parsed = Vec::new();
    for p in policies {
        let name = format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or("default"),
            p.metadata.name.as_deref().unwrap_or("?")
        );
        let ns = p.metadata.namespace.as_deref().unwrap_or("default");
        let Some(spec) = p.spec.as_ref() else { continue };
        let select = match selector(&spec.pod_selector.clone().unwrap_or_default()) {
            Ok(s) => s,
            Err(e) => {
                // Selects nothing we can know: isolate nobody rather than guess.
                warnings.push(format!("NetworkPolicy {name}: podSelector: {e}"));
                continue;
            }
        };
        let (ing, eg) = policy_types(p);
        let mut rules = |dir: &str, list: Vec<(Option<&Vec<NetworkPolicyPeer>>, Option<&Vec<NetworkPolicyPort>>)>| {
            let mut rs = Vec::new();
            for (peers, ports) in list {
                let mut w = Vec::new();
                let ports = port_specs(ports, &mut w);
                warnings.extend(w.into_iter().map(|m| format!("NetworkPolicy {name} {dir}: {m}")));
                match world.peers(ns, peers) {
                    Ok(peers) => rs.push((peers, ports)),
                    // The rule allows nothing; the pod stays isolated by the policy.
                    Err(e) => warnings.push(format!("NetworkPolicy {name} {dir}: {e}: the rule allows nothing")),
                }
            }
            rs
        };
        let ingress = ing.then(|| rules("ingress", spec.ingress.iter().flatten().map(|r| (r.from.as_ref(), r.ports.as_ref())).collect()));
        let egress = eg.then(|| rules("egress", spec.egress.iter().flatten().map(|r| (r.to.as_ref(), r.ports.as_ref())).collect()));
        parsed.push(Parsed { ns, select, ingress, egress });
    }
    for target in world.pods.iter().filter(|p| p.node == Some(node)) {
        let mut pp = PodPolicy::default();
        let mut ingress: Option<BTreeMap<AllowKey, PolicyAllow>> = None;
        let mut egress: Option<BTreeMap<AllowKey, PolicyAllow>> = None;
        for p in parsed.iter().filter(|p| p.ns == target.namespace && p.select.matches(&target.labels)) {
            if let Some(rules) = &p.ingress {
                let acc = ingress.get_or_insert_with(BTreeMap::new);
                for (peers, ports) in rules {
                    rule_allows(&world, target, PolicyDirection::Ingress, peers, ports, acc);
                }
            }
            if let Some(rules) = &p.egress {
                let acc = egress.get_or_insert_with(BTreeMap::new);
                for (peers, ports) in rules {
                    rule_allows(&world, target, PolicyDirection::Egress, peers, ports, acc);
                }
            }
        }
        pp.ingress = ingress.map(|m| m.into_values().collect());
        pp.egress = egress.map(|m| m.into_values().collect());
        out.insert(target.ip, pp);
    }
    (out, warnings)
}

/// How the policy sync runs.
#[derive(Clone, Debug)]
pub struct PolicySyncConfig {
    pub node_name: String,
    /// Changes arriving within this window are applied together.
    pub batch_delay: Duration,
    /// Everything is recomputed and unapplied pods retried this often (a pod whose datapath
    /// endpoint was not registered yet, say).
    pub resync: Duration,
}

impl PolicySyncConfig {
    pub fn new(node_name: impl Into<String>) -> PolicySyncConfig {
        PolicySyncConfig { node_name: node_name.into(), batch_delay: Duration::from_millis(50), resync: Duration::from_secs(2) }
    }
}

/// Writes `desired` into the datapath: pods whose policy differs from `applied` are rewritten,
/// pods no longer desired lose their entries (and isolation, if still registered), and POLICY
/// entries of endpoints nobody wants (left by an earlier agent) are removed. Returns how many
/// pods could not be written (their endpoint is not registered yet, usually).
pub fn apply_policies(
    dp: &mut Datapath,
    desired: &BTreeMap<Ipv4Addr, PodPolicy>,
    applied: &mut BTreeMap<Ipv4Addr, PodPolicy>,
) -> usize {
    let mut failed = 0;
    let dumped = dp.dump_policy();
    if let Err(e) = &dumped {
        tracing::warn!(error = %e, "reading the POLICY map failed");
    }
    let flags = dumped.as_ref().map(|(_, iso)| iso.clone()).unwrap_or_default();
    for (ip, want) in desired {
        // The flags live in the endpoint entry, which the CNI recreates for a new pod (an IP
        // reused by another pod with the same policy): check them, not only our memory.
        let flags_match = flags.get(ip) == Some(&(want.ingress.is_some(), want.egress.is_some()));
        if applied.get(ip) == Some(want) && flags_match {
            continue;
        }
        let mut ok = true;
        for (dir, rules) in [(PolicyDirection::Ingress, &want.ingress), (PolicyDirection::Egress, &want.egress)] {
            let empty = Vec::new();
            if let Err(e) = dp.set_policy(*ip, dir, rules.is_some(), rules.as_ref().unwrap_or(&empty)) {
                tracing::debug!(pod = %ip, error = %e, "network policy not written yet");
                ok = false;
            }
        }
        if ok {
            applied.insert(*ip, want.clone());
        } else {
            applied.remove(ip);
            failed += 1;
        }
    }
    let gone: Vec<Ipv4Addr> = applied.keys().filter(|ip| !desired.contains_key(ip)).copied().collect();
    for ip in gone {
        applied.remove(&ip);
    }
    // Entries and isolation flags of endpoints that no desired pod owns.
    match dumped {
        Ok((entries, isolation)) => {
            let stale: BTreeSet<Ipv4Addr> = entries.iter().map(|e| e.endpoint).filter(|ip| !desired.contains_key(ip)).collect();
            for ip in stale {
                let _ = dp.clear_policy(ip);
            }
            for (ip, (i, e)) in isolation {
                if (i || e) && !desired.contains_key(&ip) {
                    for dir in [PolicyDirection::Ingress, PolicyDirection::Egress] {
                        let _ = dp.set_policy(ip, dir, false, &[]);
                    }
                }
            }
        }
        Err(_) => {}
    }
    failed
}

/// Keeps this node's POLICY trie and isolation flags equal to the cluster's NetworkPolicies
/// until `shutdown` completes.
pub async fn run_policy_sync(
    client: kube::Client,
    datapath: Arc<Mutex<Datapath>>,
    cfg: PolicySyncConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let (pol_store, pol_writer) = reflector::store::<NetworkPolicy>();
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let changed = Arc::new(tokio::sync::Notify::new());
    let feed = |stream: futures::stream::BoxStream<'static, ()>| {
        let changed = changed.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            while stream.next().await.is_some() {
                changed.notify_one();
            }
        })
    };
    let cfgw = watcher::Config::default();
    let tasks = [
        feed(reflector(pol_writer, watcher(Api::<NetworkPolicy>::all(client.clone()), cfgw.clone())).default_backoff().touched_objects().map(|_| ()).boxed()),
        feed(reflector(pod_writer, watcher(Api::<Pod>::all(client.clone()), cfgw.clone())).default_backoff().touched_objects().map(|_| ()).boxed()),
        feed(reflector(ns_writer, watcher(Api::<Namespace>::all(client.clone()), cfgw)).default_backoff().touched_objects().map(|_| ()).boxed()),
    ];
    let work = async {
        let ready = async {
            let _ = pol_store.wait_until_ready().await;
            let _ = pod_store.wait_until_ready().await;
            let _ = ns_store.wait_until_ready().await;
        };
        ready.await;
        tracing::info!(node = %cfg.node_name, "network policy sync started");
        let applied = Arc::new(Mutex::new(BTreeMap::new()));
        let mut last_warnings = Vec::new();
        loop {
            let pols: Vec<NetworkPolicy> = pol_store.state().iter().map(|p| (**p).clone()).collect();
            let pods: Vec<Pod> = pod_store.state().iter().map(|p| (**p).clone()).collect();
            let nss: Vec<Namespace> = ns_store.state().iter().map(|p| (**p).clone()).collect();
            let (desired, warnings) = desired_policies(&cfg.node_name, &pods, &nss, &pols);
            if warnings != last_warnings {
                for w in &warnings {
                    tracing::warn!("{w}");
                }
                last_warnings = warnings;
            }
            let (dp, applied) = (datapath.clone(), applied.clone());
            let pods_n = desired.len();
            let res = tokio::task::spawn_blocking(move || {
                let mut dp = dp.lock().unwrap_or_else(|e| e.into_inner());
                let mut applied = applied.lock().unwrap_or_else(|e| e.into_inner());
                apply_policies(&mut dp, &desired, &mut applied)
            })
            .await;
            match res {
                Ok(0) => tracing::debug!(pods = pods_n, policies = pols.len(), "network policy in place"),
                Ok(n) => tracing::debug!(unwritten = n, "some pods' network policy is not written yet; retrying"),
                Err(e) => tracing::warn!("network policy apply task: {e}"),
            }
            tokio::select! {
                _ = changed.notified() => tokio::time::sleep(cfg.batch_delay).await,
                _ = tokio::time::sleep(cfg.resync) => {}
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = shutdown => {}
    }
    for t in tasks {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i",
                "ports": [{"name": "http", "containerPort": 8080}, {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .unwrap()
    }

    fn ns(name: &str, labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    fn np(ns: &str, spec: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": ns}, "spec": spec})).unwrap()
    }

    fn world() -> (Vec<Pod>, Vec<Namespace>) {
        (
            vec![
                pod("a", "server", "n1", "10.244.1.10", json!({"app": "server"})),
                pod("a", "client", "n2", "10.244.2.10", json!({"app": "client"})),
                pod("a", "other", "n2", "10.244.2.11", json!({"app": "other"})),
                pod("b", "client", "n1", "10.244.1.20", json!({"app": "client"})),
            ],
            vec![ns("a", json!({"team": "x"})), ns("b", json!({"team": "y"}))],
        )
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn peers(allows: &[PolicyAllow]) -> BTreeSet<(Ipv4Addr, u8, Option<u16>)> {
        allows.iter().map(|a| (a.peer, a.prefix_len, a.port)).collect()
    }

    #[test]
    fn no_policy_isolates_nobody_and_only_local_pods_are_listed() {
        let (pods, nss) = world();
        let (d, w) = desired_policies("n1", &pods, &nss, &[]);
        assert!(w.is_empty());
        assert_eq!(d.keys().copied().collect::<Vec<_>>(), vec![ip("10.244.1.10"), ip("10.244.1.20")]);
        assert!(d.values().all(|p| *p == PodPolicy::default()));
    }

    #[test]
    fn default_deny_ingress_isolates_selected_pods_with_no_allows() {
        let (pods, nss) = world();
        let pol = np("a", json!({"podSelector": {}, "policyTypes": ["Ingress"]}));
        let (d, _) = desired_policies("n1", &pods, &nss, &[pol]);
        assert_eq!(d[&ip("10.244.1.10")].ingress, Some(vec![]));
        assert_eq!(d[&ip("10.244.1.10")].egress, None);
        // Namespace b's pod is not selected by a policy of namespace a.
        assert_eq!(d[&ip("10.244.1.20")], PodPolicy::default());
    }

    #[test]
    fn pod_selector_peers_resolve_to_pod_ips_cluster_wide_in_the_policy_namespace() {
        let (pods, nss) = world();
        let pol = np("a", json!({"podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}));
        let (d, _) = desired_policies("n1", &pods, &nss, &[pol]);
        let ing = d[&ip("10.244.1.10")].ingress.clone().unwrap();
        // a/client on the other node, not b/client, not a/other.
        assert_eq!(peers(&ing), BTreeSet::from([(ip("10.244.2.10"), 32, None)]));
        assert_eq!(ing[0].proto, None);
    }

    #[test]
    fn namespace_selector_and_both_selectors() {
        let (pods, nss) = world();
        let only_ns = np("a", json!({"podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}]}]}));
        let (d, _) = desired_policies("n1", &pods, &nss, &[only_ns]);
        assert_eq!(peers(d[&ip("10.244.1.10")].ingress.as_ref().unwrap()), BTreeSet::from([(ip("10.244.1.20"), 32, None)]));
        let both = np("a", json!({"podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["a", "b"]}]},
                                   "podSelector": {"matchLabels": {"app": "client"}}}]}]}));
        let (d, _) = desired_policies("n1", &pods, &nss, &[both]);
        assert_eq!(
            peers(d[&ip("10.244.1.10")].ingress.as_ref().unwrap()),
            BTreeSet::from([(ip("10.244.1.20"), 32, None), (ip("10.244.2.10"), 32, None)])
        );
    }

    #[test]
    fn ip_block_with_except_ports_end_port_and_named_ports() {
        let (pods, nss) = world();
        let pol = np("a", json!({"podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.2.0/24", "except": ["10.244.2.11/32"]}}],
                         "ports": [{"port": 9000}, {"port": 7000, "endPort": 7002}, {"port": "http"}, {"port": "dns", "protocol": "UDP"}, {"port": "http", "protocol": "UDP"}]}]}));
        let (d, w) = desired_policies("n1", &pods, &nss, &[pol]);
        assert!(w.is_empty(), "{w:?}");
        let ing = d[&ip("10.244.1.10")].ingress.clone().unwrap();
        let ports: BTreeSet<(Option<Proto>, Option<u16>)> = ing.iter().map(|a| (a.proto, a.port)).collect();
        assert_eq!(
            ports,
            BTreeSet::from([
                (Some(Proto::Tcp), Some(9000)),
                (Some(Proto::Tcp), Some(7000)),
                (Some(Proto::Tcp), Some(7001)),
                (Some(Proto::Tcp), Some(7002)),
                (Some(Proto::Tcp), Some(8080)),
                (Some(Proto::Udp), Some(5353)),
            ])
        );
        assert!(ing.iter().all(|a| a.peer == ip("10.244.2.0") && a.prefix_len == 24 && a.except == vec![(ip("10.244.2.11"), 32)]));
        // And the datapath takes them (except inside the block, ports non-zero).
        skiff_datapath::policy::policy_entries(ip("10.244.1.10"), PolicyDirection::Ingress, &ing).expect("valid entries");
    }

    #[test]
    fn egress_default_and_named_ports_resolve_against_the_peer() {
        let (pods, nss) = world();
        // No policyTypes: egress rules present make it an egress policy too.
        let pol = np("b", json!({"podSelector": {},
            "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "server"}}}], "ports": [{"port": "http"}]}]}));
        let (d, _) = desired_policies("n1", &pods, &nss, &[pol]);
        let p = &d[&ip("10.244.1.20")];
        assert_eq!(p.ingress, Some(vec![]), "no ingress rules: ingress isolated with nothing allowed");
        assert_eq!(peers(p.egress.as_ref().unwrap()), BTreeSet::from([(ip("10.244.1.10"), 32, Some(8080))]));
    }

    #[test]
    fn rules_or_together_and_empty_from_means_everyone() {
        let (pods, nss) = world();
        let deny = np("a", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}));
        let open = np("a", json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{}]}));
        let (d, _) = desired_policies("n1", &pods, &nss, &[deny, open]);
        let p = &d[&ip("10.244.1.10")];
        assert_eq!(peers(p.ingress.as_ref().unwrap()), BTreeSet::from([(Ipv4Addr::UNSPECIFIED, 0, None)]));
        assert_eq!(p.egress, Some(vec![]));
    }

    #[test]
    fn what_cannot_be_expressed_allows_nothing_and_warns() {
        let (pods, nss) = world();
        let pol = np("a", json!({"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}}]},
                        {"ports": [{"port": 1, "endPort": 65535}, {"port": 80, "protocol": "SCTP"}]},
                        {"from": [{"ipBlock": {"cidr": "fd00::/8"}}]}]}));
        let (d, w) = desired_policies("n1", &pods, &nss, &[pol]);
        assert_eq!(w.len(), 4, "{w:?}");
        assert_eq!(d[&ip("10.244.1.10")].ingress, Some(vec![]));
    }

    #[test]
    fn pods_without_ip_host_network_or_finished_are_not_peers() {
        let (mut pods, nss) = world();
        pods[1].status.as_mut().unwrap().phase = Some("Succeeded".into());
        pods[2].spec.as_mut().unwrap().host_network = Some(true);
        let pol = np("a", json!({"podSelector": {"matchLabels": {"app": "server"}},
            "ingress": [{"from": [{"podSelector": {}}]}]}));
        let (d, _) = desired_policies("n1", &pods, &nss, &[pol]);
        assert_eq!(peers(d[&ip("10.244.1.10")].ingress.as_ref().unwrap()), BTreeSet::from([(ip("10.244.1.10"), 32, None)]));
    }
}
