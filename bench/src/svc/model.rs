//! The set of Services a benchmark run installs: pure data, the same for every path.
//!
//! Every Service has `endpoints_per_service` ready endpoints. Most Services are filler: their
//! endpoints are valid addresses in 10.240.0.0/12 that nothing in the lab routes to, so they
//! cost exactly what a real endpoint costs in the rules and maps but never see traffic. A few
//! "probe" Services, spread evenly over the set (so the iptables KUBE-SERVICES chain is walked to
//! a different depth for each, as for a random Service in a real cluster), have real endpoints:
//! the server pods' ports. Probes also carry a UDP port and a NodePort for TCP and UDP.

use std::net::{Ipv4Addr, SocketAddrV4};

pub const NAMESPACE: &str = "bench";
/// The lab's pod CIDR (kube-proxy's --cluster-cidr: traffic from outside it is masqueraded).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The service CIDR the VIPs come from.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const SERVICE_PORT: u16 = 80;
pub const FIRST_NODE_PORT: u16 = 30000;
/// The first port the server pods listen on (endpoint k of a probe is server k % N, port
/// SERVER_BASE_PORT + k / N).
pub const SERVER_BASE_PORT: u16 = 8000;
/// The most Services a run can hold: VIPs are 10.96.0.1 + i inside SERVICE_CIDR (a /16).
pub const MAX_SERVICES: usize = 65_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As kube-proxy writes it (lower case) in chain names and matches.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// One Service port (kube-proxy's unit: a ServicePortName plus a protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The Service's index in the set (0-based); VIPs and names derive from it.
    pub index: usize,
    pub name: String,
    /// The port's name ("tcp" or "udp" here).
    pub port_name: String,
    pub proto: Protocol,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// kube-proxy's ServicePortName.String(): "namespace/name:port".
    pub fn service_port_name(&self) -> String {
        format!("{NAMESPACE}/{}:{}", self.name, self.port_name)
    }
}

/// The installed Services and which of them the clients aim at.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    /// Every service port, in index order; a probe's UDP port follows its TCP port.
    pub ports: Vec<ServicePort>,
    /// Indexes (into `ports`) of the probes' TCP ports.
    pub probe_tcp: Vec<usize>,
    /// Indexes (into `ports`) of the probes' UDP ports.
    pub probe_udp: Vec<usize>,
    pub services: usize,
    pub endpoints_per_service: usize,
}

pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// A filler endpoint: unique per (service, k), inside 10.240.0.0/12, never routed in the lab.
pub fn fake_endpoint(service: usize, k: usize, per_service: usize) -> Endpoint {
    let n = (service * per_service + k + 1) as u32;
    Endpoint {
        ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 0, 0)) + n),
        port: 8080,
    }
}

/// The real endpoints behind every probe: `count` (server, port) pairs round-robin over the
/// server pods' IPs.
pub fn real_endpoints(servers: &[Ipv4Addr], count: usize) -> Vec<Endpoint> {
    (0..count)
        .map(|k| Endpoint {
            ip: servers[k % servers.len()],
            port: SERVER_BASE_PORT + (k / servers.len()) as u16,
        })
        .collect()
}

/// The ports each server pod listens on for `count` real endpoints over `servers` pods.
pub fn server_ports(servers: usize, count: usize) -> Vec<u16> {
    let per = count.div_ceil(servers.max(1));
    (0..per as u16).map(|p| SERVER_BASE_PORT + p).collect()
}

/// Which service indexes are probes: `probes` of them spread evenly over `services`.
pub fn probe_indexes(services: usize, probes: usize) -> Vec<usize> {
    let probes = probes.min(services).max(1);
    (0..probes)
        .map(|k| (k * services) / probes + (services / probes) / 2)
        .map(|i| i.min(services - 1))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("services must be between 1 and {MAX_SERVICES} (got {0})")]
    Services(usize),
    #[error("endpoints per service must be between 1 and 100 (got {0})")]
    Endpoints(usize),
    #[error("at least one server pod and one probe are needed")]
    NoServers,
}

/// Builds the set: `services` Services with `per_service` endpoints each; `probes` of them use
/// `real` as their endpoints (cycled to `per_service`).
pub fn build(
    services: usize,
    per_service: usize,
    probes: usize,
    real: &[Endpoint],
) -> Result<ServiceSet, ModelError> {
    if services == 0 || services > MAX_SERVICES {
        return Err(ModelError::Services(services));
    }
    if per_service == 0 || per_service > 100 {
        return Err(ModelError::Endpoints(per_service));
    }
    if real.is_empty() || probes == 0 {
        return Err(ModelError::NoServers);
    }
    let probe_idx = probe_indexes(services, probes);
    let mut ports = Vec::with_capacity(services + probe_idx.len());
    let (mut probe_tcp, mut probe_udp) = (Vec::new(), Vec::new());
    for i in 0..services {
        let probe = probe_idx.iter().position(|&p| p == i);
        let endpoints: Vec<Endpoint> = match probe {
            Some(_) => (0..per_service).map(|k| real[k % real.len()]).collect(),
            None => (0..per_service)
                .map(|k| fake_endpoint(i, k, per_service))
                .collect(),
        };
        let name = format!("svc-{i}");
        let node_port = probe.map(|k| FIRST_NODE_PORT + k as u16);
        if probe.is_some() {
            probe_tcp.push(ports.len());
        }
        ports.push(ServicePort {
            index: i,
            name: name.clone(),
            port_name: "tcp".into(),
            proto: Protocol::Tcp,
            vip: vip(i),
            port: SERVICE_PORT,
            node_port,
            endpoints: endpoints.clone(),
        });
        if probe.is_some() {
            probe_udp.push(ports.len());
            ports.push(ServicePort {
                index: i,
                name,
                port_name: "udp".into(),
                proto: Protocol::Udp,
                vip: vip(i),
                port: SERVICE_PORT,
                node_port,
                endpoints,
            });
        }
    }
    Ok(ServiceSet {
        ports,
        probe_tcp,
        probe_udp,
        services,
        endpoints_per_service: per_service,
    })
}

impl ServiceSet {
    /// The ClusterIP frontends the clients aim at (TCP and UDP share them: VIP:80).
    pub fn probe_frontends(&self) -> Vec<SocketAddrV4> {
        self.probe_tcp
            .iter()
            .map(|&i| SocketAddrV4::new(self.ports[i].vip, self.ports[i].port))
            .collect()
    }

    /// The NodePort frontends on `node_ip`.
    pub fn probe_node_ports(&self, node_ip: Ipv4Addr) -> Vec<SocketAddrV4> {
        self.probe_tcp
            .iter()
            .filter_map(|&i| self.ports[i].node_port)
            .map(|p| SocketAddrV4::new(node_ip, p))
            .collect()
    }

    /// Every endpoint in the set, counted per service port.
    pub fn endpoint_count(&self) -> usize {
        self.ports.iter().map(|p| p.endpoints.len()).sum()
    }

    /// A copy with endpoint `k` of the TCP port of service `index` replaced by `new`: the "one
    /// endpoint change" of the programming benchmark. Returns the port's position too.
    pub fn with_endpoint_changed(
        &self,
        index: usize,
        k: usize,
        new: Endpoint,
    ) -> Option<(ServiceSet, usize)> {
        let pos = self
            .ports
            .iter()
            .position(|p| p.index == index && p.proto == Protocol::Tcp)?;
        let mut set = self.clone();
        let slot = set.ports[pos].endpoints.get_mut(k)?;
        *slot = new;
        Some((set, pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real() -> Vec<Endpoint> {
        real_endpoints(&[Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 12)], 10)
    }

    #[test]
    fn probes_spread_and_carry_udp_and_node_ports() {
        let set = build(1000, 10, 4, &real()).expect("set");
        assert_eq!(set.probe_tcp.len(), 4);
        assert_eq!(set.ports.len(), 1004);
        let idx: Vec<usize> = set.probe_tcp.iter().map(|&p| set.ports[p].index).collect();
        assert_eq!(idx, vec![125, 375, 625, 875]);
        for (&t, &u) in set.probe_tcp.iter().zip(&set.probe_udp) {
            assert_eq!(set.ports[t].vip, set.ports[u].vip);
            assert_eq!(set.ports[u].proto, Protocol::Udp);
            assert!(set.ports[t].node_port.is_some());
            assert!(set.ports[t].endpoints.iter().all(|e| e.ip.octets()[1] == 244));
        }
        let filler = &set.ports[0];
        assert_eq!(filler.endpoints.len(), 10);
        assert!(filler.endpoints.iter().all(|e| e.ip.octets()[1] == 240));
        assert_eq!(set.endpoint_count(), 1004 * 10);
    }

    #[test]
    fn one_service_is_a_probe() {
        let set = build(1, 10, 16, &real()).expect("set");
        assert_eq!(set.probe_tcp, vec![0]);
        assert_eq!(set.probe_frontends().len(), 1);
    }

    #[test]
    fn fake_endpoints_are_unique_and_vips_stay_in_the_service_cidr() {
        let mut seen = std::collections::HashSet::new();
        for s in 0..3000 {
            for k in 0..10 {
                assert!(seen.insert(fake_endpoint(s, k, 10)));
            }
        }
        assert_eq!(vip(MAX_SERVICES - 1).octets()[..2], [10, 96]);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(build(0, 10, 1, &real()).is_err());
        assert!(build(MAX_SERVICES + 1, 10, 1, &real()).is_err());
        assert!(build(10, 0, 1, &real()).is_err());
        assert!(build(10, 10, 1, &[]).is_err());
    }

    #[test]
    fn endpoint_change_touches_one_endpoint() {
        let set = build(100, 10, 4, &real()).expect("set");
        let new = Endpoint {
            ip: Ipv4Addr::new(10, 241, 0, 1),
            port: 8080,
        };
        let (changed, pos) = set.with_endpoint_changed(42, 3, new).expect("change");
        let diff: Vec<usize> = (0..set.ports.len())
            .filter(|&i| set.ports[i] != changed.ports[i])
            .collect();
        assert_eq!(diff, vec![pos]);
        assert_eq!(changed.ports[pos].endpoints[3], new);
    }
}
