//! skiff-dns: the cluster DNS server.
//!
//! It answers the names of the [Kubernetes DNS specification] from Services and EndpointSlices
//! that kube-rs reflectors keep (watched through the apiserver like any other client):
//!
//! - `<svc>.<ns>.svc.<domain>` A/AAAA: the ClusterIP(s). For a headless Service (clusterIP
//!   `None`): the ready endpoint addresses of its EndpointSlices (all of them with
//!   `publishNotReadyAddresses`).
//! - `<hostname>.<svc>.<ns>.svc.<domain>` A/AAAA for headless endpoints (StatefulSet pods:
//!   the EndpointSlice endpoint's `hostname`); endpoints without one are named by their dashed
//!   address (`10-244-1-5.<svc>...`, as CoreDNS does) so SRV targets always have a name.
//! - ExternalName Services: a CNAME to `externalName` (followed inside the zone when it points
//!   back into it).
//! - `_<port>._<proto>.<svc>.<ns>.svc.<domain>` SRV for named ports: the Service port with the
//!   Service name as target, or, headless, one record per endpoint with the endpoint's port and
//!   name; the targets' addresses go in the additional section.
//! - PTR for ClusterIPs (to the Service name) and headless endpoint addresses (to the endpoint
//!   name) under `in-addr.arpa` / `ip6.arpa`.
//! - `dns-version.<domain>` TXT `1.1.0`; the SOA at the apex.
//! - `<a-b-c-d>.<ns>.pod.<domain>` A (AAAA for dashed IPv6): the address the label spells, as
//!   CoreDNS's `pods insecure` (kubeadm's default Corefile) answers it.
//! - An unknown name inside the domain: NXDOMAIN with the SOA in the authority section (NODATA,
//!   that is NOERROR with the SOA, for names that exist with another type and for empty
//!   non-terminals such as `<ns>.svc.<domain>`). TTL 5 s everywhere, the SOA minimum included.
//! - Names outside the domain, and reverse names that are not ours: forwarded to the upstream
//!   servers when [`DnsConfig::upstream`] names some (hickory's `ForwardZoneHandler`), otherwise
//!   REFUSED (skiff's lab machines have no upstream to offer).
//!
//! Until both watch caches have had their first list, names inside the domain get SERVFAIL, so
//! a starting server never tells a client that an existing Service does not exist.
//!
//! # Where it runs: node-local DNS
//!
//! The node agent runs one server per node, inside the node's network namespace, bound on the
//! node's pod gateway address (the first address of the node's `podCIDR`, e.g. `10.244.1.1`,
//! which is on the node netns's `lo`, see `docs/nodes-plan.md`) port 53, UDP and TCP. Pods get
//! [`resolv_conf`] with that address as their nameserver. Every pod already routes to the
//! gateway, so DNS needs no Service VIP, no eBPF translation and no cross-node hop, and keeps
//! working while the datapath is being (re)programmed; each node's server watches the
//! apiserver itself, as each node's proxy does. This is the NodeLocal DNSCache shape without a
//! central CoreDNS behind it.
//!
//! [Kubernetes DNS specification]: https://github.com/kubernetes/dns/blob/master/docs/specification.md

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

mod server;
pub mod zone;

pub use server::{ClusterHandler, DEFAULT_TTL, DnsConfig, DnsError, DnsServer};
pub use zone::{Answer, ClusterZone, ZoneError, parse_domain, reverse_name};

/// The default cluster domain.
pub const DEFAULT_DOMAIN: &str = "cluster.local";

/// Serves cluster DNS for `domain` on every address of `listen` (UDP and TCP) until `shutdown`
/// completes, with no upstream (names outside `domain` are REFUSED). For an upstream or a port
/// chosen by the system, use [`DnsServer`].
pub async fn serve(
    client: kube::Client,
    listen: Vec<SocketAddr>,
    domain: String,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut config = DnsConfig::new(listen);
    config.domain = domain;
    DnsServer::bind(config).await?.run(client, shutdown).await
}

/// The resolv.conf kubelet writes for `dnsPolicy: ClusterFirst`: the namespace's search path,
/// the cluster nameserver, `ndots:5`.
pub fn resolv_conf(namespace: &str, nameserver: IpAddr, domain: &str) -> String {
    let domain = domain.trim().trim_end_matches('.');
    format!(
        "search {namespace}.svc.{domain} svc.{domain} {domain}\nnameserver {nameserver}\noptions ndots:5\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_is_kubelets_cluster_first() {
        let text = resolv_conf("web", "10.244.1.1".parse().expect("ip"), "cluster.local.");
        assert_eq!(
            text,
            "search web.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.244.1.1\n\
             options ndots:5\n"
        );
        let v6 = resolv_conf("default", "fd00::1".parse().expect("ip"), "example.test");
        assert!(v6.contains("nameserver fd00::1\n"), "{v6}");
    }
}
