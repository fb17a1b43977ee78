//! The pure core: from a snapshot of Services and EndpointSlices to DNS answers.
//!
//! [`ClusterZone::build`] turns the objects into an index of records by owner name (the
//! Kubernetes DNS specification's records, see the crate docs); [`ClusterZone::lookup`] answers
//! one question from it. No I/O and no clock here: the SOA serial is passed in.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The schema version the Kubernetes DNS specification asks `dns-version.<zone>` to carry.
const DNS_SCHEMA_VERSION: &str = "1.1.0";
/// How many CNAMEs inside the zone one answer follows (ExternalName -> ExternalName -> ...).
const MAX_CNAME_CHAIN: usize = 8;

/// A bad cluster domain.
#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("cluster domain {domain:?} is not a domain name: {reason}")]
    BadDomain { domain: String, reason: String },
}

/// The answer to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub code: ResponseCode,
    /// Set for names inside the cluster domain and the reverse names we hold.
    pub authoritative: bool,
    pub answers: Vec<Record>,
    /// The SOA on NXDOMAIN and NODATA, so resolvers cache the negative answer for the TTL.
    pub authorities: Vec<Record>,
    /// Addresses of SRV targets.
    pub additionals: Vec<Record>,
}

/// All records of the cluster at one moment.
#[derive(Debug, Clone)]
pub struct ClusterZone {
    domain: Name,
    soa: Record,
    records: HashMap<Name, Vec<Record>>,
    /// Owner names and every ancestor of one inside the domain (empty non-terminals such as
    /// `<ns>.svc.<domain>` or `_tcp.<svc>...`): those answer NODATA, not NXDOMAIN.
    existing: HashSet<Name>,
    skipped: Vec<String>,
}

/// Parses a cluster domain (`cluster.local`, with or without the trailing dot) into the
/// lowercase FQDN the zone uses. The root is refused: it would make every name a cluster name.
pub fn parse_domain(domain: &str) -> Result<Name, ZoneError> {
    let bad = |reason: &str| ZoneError::BadDomain {
        domain: domain.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = domain.trim();
    if trimmed.is_empty() || trimmed == "." {
        return Err(bad("empty or root"));
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| bad(&e.to_string()))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

impl ClusterZone {
    /// Builds the zone for `domain` (as from [`parse_domain`]) from the objects. Objects that
    /// cannot become records (a name that is no DNS name, an address that does not parse) are
    /// left out and listed in [`ClusterZone::skipped`]; they never fail the build.
    pub fn build<'a>(
        domain: &Name,
        ttl: u32,
        serial: u32,
        services: impl IntoIterator<Item = &'a Service>,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Self {
        let domain = {
            let mut d = domain.to_lowercase();
            d.set_fqdn(true);
            d
        };
        let soa = soa_record(&domain, ttl, serial);
        let mut b = Builder {
            ttl,
            records: HashMap::new(),
            seen: HashSet::new(),
            skipped: Vec::new(),
        };
        b.add(soa.clone());
        if let Ok(version_name) = Name::from_ascii("dns-version").and_then(|n| n.append_domain(&domain)) {
            b.add(Record::from_rdata(
                version_name,
                ttl,
                RData::TXT(TXT::new(vec![DNS_SCHEMA_VERSION.to_string()])),
            ));
        }

        // Slices grouped by (namespace, service name): only headless Services read them.
        let mut slices_of: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
        for slice in slices {
            let ns = slice.metadata.namespace.clone().unwrap_or_default();
            let Some(svc) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            slices_of.entry((ns, svc.clone())).or_default().push(slice);
        }

        for svc in services {
            let (Some(ns), Some(name)) = (
                svc.metadata.namespace.as_deref(),
                svc.metadata.name.as_deref(),
            ) else {
                continue;
            };
            let owner = match service_name(name, ns, &domain) {
                Ok(n) => n,
                Err(e) => {
                    b.skipped.push(format!("Service {ns}/{name}: {e}"));
                    continue;
                }
            };
            let slices = slices_of
                .get(&(ns.to_string(), name.to_string()))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            b.service(svc, ns, name, &owner, slices);
        }

        let mut existing = HashSet::new();
        for owner in b.records.keys() {
            let mut n = owner.clone();
            // Bounded by the label count: base_name drops one label each turn.
            for _ in 0..=u8::MAX {
                if !domain.zone_of(&n) || !existing.insert(n.clone()) || n == domain {
                    break;
                }
                n = n.base_name();
            }
        }
        Self {
            domain,
            soa,
            records: b.records,
            existing,
            skipped: b.skipped,
        }
    }

    /// The cluster domain (lowercase FQDN).
    pub fn domain(&self) -> &Name {
        &self.domain
    }

    /// Why objects were left out of the zone (for the shell to log).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Whether `name` is the cluster domain or below it.
    pub fn contains(&self, name: &Name) -> bool {
        self.domain.zone_of(name)
    }

    /// Answers `qtype` for `name`. `None`: the name is not ours (outside the cluster domain and
    /// no reverse record of ours), to be forwarded or refused by the caller.
    pub fn lookup(&self, name: &Name, qtype: RecordType) -> Option<Answer> {
        let mut name = name.to_lowercase();
        name.set_fqdn(true);
        if !self.contains(&name) {
            // Reverse names (PTR) of ClusterIPs and endpoints: answered when we hold them,
            // otherwise they fall through (CoreDNS's `fallthrough in-addr.arpa ip6.arpa`).
            let matching = self.matching(&name, qtype);
            if matching.is_empty() {
                return None;
            }
            return Some(Answer {
                code: ResponseCode::NoError,
                authoritative: true,
                answers: matching,
                authorities: Vec::new(),
                additionals: Vec::new(),
            });
        }

        if let Some(answer) = self.pod_lookup(&name, qtype) {
            return Some(answer);
        }

        let mut answers = Vec::new();
        let mut current = name.clone();
        for _ in 0..MAX_CNAME_CHAIN {
            let matching = self.matching(&current, qtype);
            if !matching.is_empty() {
                answers.extend(matching);
                break;
            }
            // An alias answers every type but CNAME itself (already matched above).
            let cname = self.records.get(&current).and_then(|rs| {
                rs.iter().find_map(|r| match &r.data {
                    RData::CNAME(target) => Some((r.clone(), target.0.clone())),
                    _ => None,
                })
            });
            match cname {
                Some((record, target)) => {
                    answers.push(record);
                    let mut target = target.to_lowercase();
                    target.set_fqdn(true);
                    if !self.contains(&target) {
                        // Outside the zone: the client's resolver follows it.
                        break;
                    }
                    current = target;
                }
                None => break,
            }
        }

        if !answers.is_empty() {
            let additionals = self.additionals_for(&answers);
            return Some(Answer {
                code: ResponseCode::NoError,
                authoritative: true,
                answers,
                authorities: Vec::new(),
                additionals,
            });
        }
        let code = if self.existing.contains(&name) {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
        Some(Answer {
            code,
            authoritative: true,
            answers: Vec::new(),
            authorities: vec![self.soa.clone()],
            additionals: Vec::new(),
        })
    }

    /// `<a-b-c-d>.<ns>.pod.<domain>` answers the address its first label spells, for any
    /// namespace, as CoreDNS's `pods insecure` (kubeadm's default) does; `pod.<domain>` and
    /// `<ns>.pod.<domain>` are empty non-terminals. `None` for other names.
    fn pod_lookup(&self, name: &Name, qtype: RecordType) -> Option<Answer> {
        let pod_zone = Name::from_ascii("pod")
            .and_then(|p| p.append_domain(&self.domain))
            .ok()?;
        if !pod_zone.zone_of(name) {
            return None;
        }
        let depth = name.num_labels().saturating_sub(pod_zone.num_labels());
        let nodata = || Answer {
            code: ResponseCode::NoError,
            authoritative: true,
            answers: Vec::new(),
            authorities: vec![self.soa.clone()],
            additionals: Vec::new(),
        };
        let nxdomain = || Answer {
            code: ResponseCode::NXDomain,
            ..nodata()
        };
        match depth {
            0 | 1 => return Some(nodata()),
            2 => {}
            _ => return Some(nxdomain()),
        }
        let label = name.iter().next()?;
        let Some(ip) = std::str::from_utf8(label).ok().and_then(undashed) else {
            return Some(nxdomain());
        };
        let rtype = match ip {
            IpAddr::V4(_) => RecordType::A,
            IpAddr::V6(_) => RecordType::AAAA,
        };
        if qtype != rtype && qtype != RecordType::ANY {
            return Some(nodata());
        }
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        let ttl = self.soa.ttl;
        Some(Answer {
            code: ResponseCode::NoError,
            authoritative: true,
            answers: vec![Record::from_rdata(name.clone(), ttl, rdata)],
            authorities: Vec::new(),
            additionals: Vec::new(),
        })
    }

    fn matching(&self, name: &Name, qtype: RecordType) -> Vec<Record> {
        self.records
            .get(name)
            .map(|rs| {
                rs.iter()
                    .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A/AAAA of the SRV targets in `answers`, as CoreDNS adds them.
    fn additionals_for(&self, answers: &[Record]) -> Vec<Record> {
        let mut out: Vec<Record> = Vec::new();
        for r in answers {
            let RData::SRV(srv) = &r.data else { continue };
            let target = srv.target.to_lowercase();
            for rec in self.records.get(&target).into_iter().flatten() {
                let is_address = matches!(rec.record_type(), RecordType::A | RecordType::AAAA);
                if is_address && !out.contains(rec) {
                    out.push(rec.clone());
                }
            }
        }
        out
    }
}

struct Builder {
    ttl: u32,
    records: HashMap<Name, Vec<Record>>,
    seen: HashSet<(Name, RData)>,
    skipped: Vec<String>,
}

/// An SRV set is built before it is emitted so each target's weight is its share of 100.
type SrvSets = HashMap<Name, Vec<(u16, Name)>>;

impl Builder {
    fn add(&mut self, record: Record) {
        let key = (record.name.clone(), record.data.clone());
        if self.seen.insert(key) {
            self.records
                .entry(record.name.clone())
                .or_default()
                .push(record);
        }
    }

    fn address(&mut self, owner: &Name, ip: IpAddr) {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        self.add(Record::from_rdata(owner.clone(), self.ttl, rdata));
    }

    fn pointer(&mut self, ip: IpAddr, target: &Name) {
        let reverse = reverse_name(ip);
        self.add(Record::from_rdata(
            reverse,
            self.ttl,
            RData::PTR(PTR(target.clone())),
        ));
    }

    fn emit_srv(&mut self, sets: SrvSets) {
        for (owner, targets) in sets {
            let count = u16::try_from(targets.len()).unwrap_or(u16::MAX).max(1);
            let weight = (100 / count).max(1);
            for (port, target) in targets {
                self.add(Record::from_rdata(
                    owner.clone(),
                    self.ttl,
                    RData::SRV(SRV::new(0, weight, port, target)),
                ));
            }
        }
    }

    fn service(
        &mut self,
        svc: &Service,
        ns: &str,
        name: &str,
        owner: &Name,
        slices: &[&EndpointSlice],
    ) {
        let Some(spec) = svc.spec.as_ref() else { return };
        if spec.type_.as_deref() == Some("ExternalName") {
            let Some(external) = spec.external_name.as_deref() else {
                self.skipped
                    .push(format!("Service {ns}/{name}: ExternalName without externalName"));
                return;
            };
            match Name::from_ascii(external) {
                Ok(mut target) => {
                    target.set_fqdn(true);
                    self.add(Record::from_rdata(
                        owner.clone(),
                        self.ttl,
                        RData::CNAME(CNAME(target)),
                    ));
                }
                Err(e) => self.skipped.push(format!(
                    "Service {ns}/{name}: externalName {external:?}: {e}"
                )),
            }
            return;
        }

        let cluster_ips: Vec<&str> = match spec.cluster_ips.as_deref() {
            Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            _ => spec.cluster_ip.as_deref().into_iter().collect(),
        };
        let headless = cluster_ips.contains(&"None");
        if headless {
            self.headless(spec.publish_not_ready_addresses == Some(true), ns, name, owner, slices);
            return;
        }

        let mut any_ip = false;
        for ip in cluster_ips {
            if ip.is_empty() {
                continue; // not allocated yet
            }
            match ip.parse::<IpAddr>() {
                Ok(ip) => {
                    any_ip = true;
                    self.address(owner, ip);
                    self.pointer(ip, owner);
                }
                Err(_) => self
                    .skipped
                    .push(format!("Service {ns}/{name}: clusterIP {ip:?} is no IP address")),
            }
        }
        if !any_ip {
            return;
        }
        let mut sets = SrvSets::new();
        for port in spec.ports.iter().flatten() {
            let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) else {
                continue; // the specification gives SRV records to named ports only
            };
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            match srv_name(port_name, protocol, owner) {
                Ok(srv) => sets.entry(srv).or_default().push((number, owner.clone())),
                Err(e) => self
                    .skipped
                    .push(format!("Service {ns}/{name}: port {port_name:?}: {e}")),
            }
        }
        self.emit_srv(sets);
    }

    fn headless(
        &mut self,
        publish_not_ready: bool,
        ns: &str,
        name: &str,
        owner: &Name,
        slices: &[&EndpointSlice],
    ) {
        let mut sets = SrvSets::new();
        for slice in slices {
            if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
                continue; // FQDN slices carry no addresses for A/AAAA
            }
            for endpoint in &slice.endpoints {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    // The API: "nil should be interpreted as ready".
                    .unwrap_or(true);
                if !ready && !publish_not_ready {
                    continue;
                }
                // The addresses of one endpoint are fungible (API docs): the first stands for it.
                let Some(raw) = endpoint.addresses.first() else {
                    continue;
                };
                let Ok(ip) = raw.parse::<IpAddr>() else {
                    self.skipped.push(format!(
                        "EndpointSlice {ns}/{}: address {raw:?} is no IP address",
                        slice.metadata.name.as_deref().unwrap_or("")
                    ));
                    continue;
                };
                self.address(owner, ip);
                // Endpoints without a hostname get the dashed address as their label, as
                // CoreDNS names them, so SRV targets always have a name.
                let label = endpoint
                    .hostname
                    .clone()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| dashed(ip));
                let ep_name = match Name::from_ascii(&label).and_then(|l| l.append_domain(owner)) {
                    Ok(n) => n.to_lowercase(),
                    Err(e) => {
                        self.skipped.push(format!(
                            "Service {ns}/{name}: endpoint name {label:?}: {e}"
                        ));
                        continue;
                    }
                };
                self.address(&ep_name, ip);
                self.pointer(ip, &ep_name);
                for port in slice.ports.iter().flatten() {
                    let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) else {
                        continue;
                    };
                    let Some(number) = port.port.and_then(|p| u16::try_from(p).ok()) else {
                        continue;
                    };
                    let protocol = port.protocol.as_deref().unwrap_or("TCP");
                    match srv_name(port_name, protocol, owner) {
                        Ok(srv) => sets.entry(srv).or_default().push((number, ep_name.clone())),
                        Err(e) => self
                            .skipped
                            .push(format!("Service {ns}/{name}: port {port_name:?}: {e}")),
                    }
                }
            }
        }
        for targets in sets.values_mut() {
            targets.sort();
            targets.dedup();
        }
        self.emit_srv(sets);
    }
}

/// `<svc>.<ns>.svc.<domain>`
fn service_name(name: &str, ns: &str, domain: &Name) -> Result<Name, String> {
    Name::from_labels([name.as_bytes(), ns.as_bytes(), b"svc"])
        .and_then(|n| n.append_domain(domain))
        .map(|n| n.to_lowercase())
        .map_err(|e| e.to_string())
}

/// `_<port>._<proto>.<owner>`
fn srv_name(port: &str, protocol: &str, owner: &Name) -> Result<Name, String> {
    let port_label = format!("_{}", port.to_ascii_lowercase());
    let proto_label = format!("_{}", protocol.to_ascii_lowercase());
    Name::from_labels([port_label.as_bytes(), proto_label.as_bytes()])
        .and_then(|n| n.append_domain(owner))
        .map_err(|e| e.to_string())
}

/// `10.96.0.1` -> `1.0.96.10.in-addr.arpa.`; IPv6 by nibbles under `ip6.arpa.`.
pub fn reverse_name(ip: IpAddr) -> Name {
    // hickory's From<IpAddr> for Name builds exactly these names.
    Name::from(ip).to_lowercase()
}

fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

/// The inverse of [`dashed`]: `10-244-1-5` -> 10.244.1.5, `fd00--1` -> fd00::1.
fn undashed(label: &str) -> Option<IpAddr> {
    if let Ok(v4) = label.replace('-', ".").parse::<std::net::Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<std::net::Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

fn soa_record(domain: &Name, ttl: u32, serial: u32) -> Record {
    let mname = Name::from_ascii("ns.dns")
        .and_then(|n| n.append_domain(domain))
        .unwrap_or_else(|_| domain.clone());
    let rname = Name::from_ascii("hostmaster")
        .and_then(|n| n.append_domain(domain))
        .unwrap_or_else(|_| domain.clone());
    // refresh/retry/expire as CoreDNS's kubernetes plugin; minimum = TTL so negative answers
    // are cached no longer than positive ones.
    Record::from_rdata(
        domain.clone(),
        ttl,
        RData::SOA(SOA::new(mname, rname, serial, 7200, 1800, 86400, ttl)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::str::FromStr;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service json")
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("slice json")
    }

    fn name(s: &str) -> Name {
        Name::from_str(s).expect("name")
    }

    fn fixture() -> ClusterZone {
        let services = vec![
            svc(json!({"metadata": {"name": "web", "namespace": "prod"},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::a"],
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                   {"name": "dns", "port": 53, "protocol": "UDP"},
                                   {"port": 9000}]}})),
            svc(json!({"metadata": {"name": "db", "namespace": "prod"},
                "spec": {"clusterIP": "None",
                         "ports": [{"name": "pg", "port": 5432}]}})),
            svc(json!({"metadata": {"name": "ext", "namespace": "prod"},
                "spec": {"type": "ExternalName", "externalName": "db.example.com"}})),
            svc(json!({"metadata": {"name": "alias", "namespace": "prod"},
                "spec": {"type": "ExternalName",
                         "externalName": "web.prod.svc.cluster.local"}})),
            svc(json!({"metadata": {"name": "pending", "namespace": "prod"},
                "spec": {"clusterIP": ""}})),
            svc(json!({"metadata": {"name": "Bad_Name!", "namespace": "prod"},
                "spec": {"type": "ExternalName", "externalName": "a..b"}})),
        ];
        let slices = vec![
            slice(json!({"metadata": {"name": "db-abc", "namespace": "prod",
                          "labels": {"kubernetes.io/service-name": "db"}},
                "addressType": "IPv4",
                "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["10.244.1.5"], "hostname": "db-0",
                     "conditions": {"ready": true}},
                    {"addresses": ["10.244.2.6"], "hostname": "db-1"},
                    {"addresses": ["10.244.2.7"], "conditions": {"ready": true}},
                    {"addresses": ["10.244.2.8"], "hostname": "db-3",
                     "conditions": {"ready": false}},
                    {"addresses": ["not-an-ip"]},
                ]})),
            // A slice of the same name in another namespace must not leak in.
            slice(json!({"metadata": {"name": "db-x", "namespace": "other",
                          "labels": {"kubernetes.io/service-name": "db"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.244.9.9"]}]})),
            // Slices of a ClusterIP Service do not change its answer.
            slice(json!({"metadata": {"name": "web-1", "namespace": "prod",
                          "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.244.3.3"]}]})),
        ];
        ClusterZone::build(&name("cluster.local."), 5, 42, &services, &slices)
    }

    fn rdatas(a: &Answer) -> Vec<String> {
        let mut v: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    }

    fn lookup(z: &ClusterZone, n: &str, t: RecordType) -> Answer {
        z.lookup(&name(n), t).expect("inside the zone")
    }

    #[test]
    fn cluster_ip_service_answers_a_and_aaaa() {
        let z = fixture();
        let a = lookup(&z, "web.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(a.code, ResponseCode::NoError);
        assert!(a.authoritative);
        assert_eq!(rdatas(&a), vec!["10.96.0.10"]);
        assert_eq!(a.answers[0].ttl, 5);
        let aaaa = lookup(&z, "web.prod.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(rdatas(&aaaa), vec!["fd00::a"]);
        // Case-insensitive.
        let upper = lookup(&z, "WEB.Prod.SVC.cluster.LOCAL.", RecordType::A);
        assert_eq!(rdatas(&upper), vec!["10.96.0.10"]);
    }

    #[test]
    fn headless_service_answers_ready_endpoints_and_hostnames() {
        let z = fixture();
        let a = lookup(&z, "db.prod.svc.cluster.local.", RecordType::A);
        // db-1 has no conditions (nil = ready); db-3 is not ready; the bad address is skipped.
        assert_eq!(rdatas(&a), vec!["10.244.1.5", "10.244.2.6", "10.244.2.7"]);
        let host = lookup(&z, "db-0.db.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(rdatas(&host), vec!["10.244.1.5"]);
        let dashed = lookup(&z, "10-244-2-7.db.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(rdatas(&dashed), vec!["10.244.2.7"]);
        let not_ready = lookup(&z, "db-3.db.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(not_ready.code, ResponseCode::NXDomain);
        assert!(z.skipped().iter().any(|s| s.contains("not-an-ip")), "{:?}", z.skipped());
    }

    #[test]
    fn publish_not_ready_addresses_includes_unready_endpoints() {
        let services = [svc(json!({"metadata": {"name": "db", "namespace": "prod"},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": true}}))];
        let slices = [slice(json!({"metadata": {"name": "db-a", "namespace": "prod",
                "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.2.8"], "conditions": {"ready": false}}]}))];
        let z = ClusterZone::build(&name("cluster.local."), 5, 1, &services, &slices);
        let a = lookup(&z, "db.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(rdatas(&a), vec!["10.244.2.8"]);
    }

    #[test]
    fn external_name_is_a_cname_followed_inside_the_zone() {
        let z = fixture();
        let a = lookup(&z, "ext.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(a.code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(a.answers[0].data.to_string(), "db.example.com.");
        let alias = lookup(&z, "alias.prod.svc.cluster.local.", RecordType::A);
        let types: Vec<_> = alias.answers.iter().map(|r| r.record_type()).collect();
        assert_eq!(types, vec![RecordType::CNAME, RecordType::A]);
        assert_eq!(alias.answers[1].data.to_string(), "10.96.0.10");
        let cname = lookup(&z, "alias.prod.svc.cluster.local.", RecordType::CNAME);
        assert_eq!(cname.answers.len(), 1);
    }

    #[test]
    fn srv_for_named_ports_only_with_service_or_endpoint_targets() {
        let z = fixture();
        let http = lookup(&z, "_http._tcp.web.prod.svc.cluster.local.", RecordType::SRV);
        assert_eq!(rdatas(&http), vec!["0 100 80 web.prod.svc.cluster.local."]);
        assert!(http.additionals.iter().any(|r| r.data.to_string() == "10.96.0.10"));
        let dns = lookup(&z, "_dns._udp.web.prod.svc.cluster.local.", RecordType::SRV);
        assert_eq!(rdatas(&dns), vec!["0 100 53 web.prod.svc.cluster.local."]);
        // The protocol is part of the name.
        let wrong = lookup(&z, "_dns._tcp.web.prod.svc.cluster.local.", RecordType::SRV);
        assert_eq!(wrong.code, ResponseCode::NXDomain);
        // Headless: one per ready endpoint, the endpoint port, weights share 100.
        let pg = lookup(&z, "_pg._tcp.db.prod.svc.cluster.local.", RecordType::SRV);
        assert_eq!(
            rdatas(&pg),
            vec![
                "0 33 15432 10-244-2-7.db.prod.svc.cluster.local.",
                "0 33 15432 db-0.db.prod.svc.cluster.local.",
                "0 33 15432 db-1.db.prod.svc.cluster.local.",
            ]
        );
        assert_eq!(pg.additionals.len(), 3, "{:?}", pg.additionals);
        // `_tcp.<svc>` is an empty non-terminal.
        let ent = lookup(&z, "_tcp.web.prod.svc.cluster.local.", RecordType::SRV);
        assert_eq!(ent.code, ResponseCode::NoError);
        assert!(ent.answers.is_empty());
    }

    #[test]
    fn ptr_for_cluster_ips_and_headless_endpoints() {
        let z = fixture();
        let ptr = z
            .lookup(&name("10.0.96.10.in-addr.arpa."), RecordType::PTR)
            .expect("ours");
        assert_eq!(rdatas(&ptr), vec!["web.prod.svc.cluster.local."]);
        let v6 = reverse_name("fd00::a".parse().expect("ip"));
        let ptr6 = z.lookup(&v6, RecordType::PTR).expect("ours");
        assert_eq!(rdatas(&ptr6), vec!["web.prod.svc.cluster.local."]);
        let ep = z
            .lookup(&name("5.1.244.10.in-addr.arpa."), RecordType::PTR)
            .expect("ours");
        assert_eq!(rdatas(&ep), vec!["db-0.db.prod.svc.cluster.local."]);
        // Unknown reverse names are not ours: forwarded or refused by the caller.
        assert!(z.lookup(&name("1.2.3.4.in-addr.arpa."), RecordType::PTR).is_none());
    }

    #[test]
    fn unknown_names_get_nxdomain_with_soa_and_known_names_nodata() {
        let z = fixture();
        let nx = lookup(&z, "nope.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(nx.code, ResponseCode::NXDomain);
        assert!(nx.answers.is_empty());
        assert_eq!(nx.authorities.len(), 1);
        assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);
        assert_eq!(nx.authorities[0].name, name("cluster.local."));
        let RData::SOA(soa) = &nx.authorities[0].data else {
            panic!("SOA expected");
        };
        assert_eq!(soa.serial, 42);
        assert_eq!(soa.minimum, 5);
        // A ClusterIP service with no allocated IP yet has no records.
        let pending = lookup(&z, "pending.prod.svc.cluster.local.", RecordType::A);
        assert_eq!(pending.code, ResponseCode::NXDomain);
        // Exists, other type: NODATA.
        let mx = lookup(&z, "web.prod.svc.cluster.local.", RecordType::MX);
        assert_eq!(mx.code, ResponseCode::NoError);
        assert!(mx.answers.is_empty());
        assert_eq!(mx.authorities[0].record_type(), RecordType::SOA);
        // Empty non-terminals: namespace and svc labels.
        for ent in ["prod.svc.cluster.local.", "svc.cluster.local."] {
            let a = lookup(&z, ent, RecordType::A);
            assert_eq!(a.code, ResponseCode::NoError, "{ent}");
        }
        let other_ns = lookup(&z, "web.staging.svc.cluster.local.", RecordType::A);
        assert_eq!(other_ns.code, ResponseCode::NXDomain);
        // The apex answers its SOA; dns-version its TXT.
        let apex = lookup(&z, "cluster.local.", RecordType::SOA);
        assert_eq!(apex.answers.len(), 1);
        let version = lookup(&z, "dns-version.cluster.local.", RecordType::TXT);
        assert_eq!(rdatas(&version), vec!["1.1.0"]);
    }

    #[test]
    fn names_outside_the_domain_are_not_ours() {
        let z = fixture();
        assert!(z.lookup(&name("example.com."), RecordType::A).is_none());
        assert!(z.lookup(&name("local."), RecordType::A).is_none());
        assert!(z.lookup(&Name::root(), RecordType::NS).is_none());
        // A suffix that only looks similar is not inside the domain.
        assert!(z.lookup(&name("web.prod.svc.xcluster.local."), RecordType::A).is_none());
    }

    #[test]
    fn other_domains_and_non_fqdn_queries() {
        let services = [svc(json!({"metadata": {"name": "web", "namespace": "prod"},
            "spec": {"clusterIP": "10.96.0.10"}}))];
        let domain = parse_domain("Example.Test").expect("domain");
        assert_eq!(domain, name("example.test."));
        let z = ClusterZone::build(&domain, 5, 1, &services, &[]);
        let a = z
            .lookup(&name("web.prod.svc.example.test"), RecordType::A)
            .expect("ours");
        assert_eq!(rdatas(&a), vec!["10.96.0.10"]);
        assert!(z.lookup(&name("web.prod.svc.cluster.local."), RecordType::A).is_none());
    }

    #[test]
    fn pod_names_answer_the_address_they_spell() {
        let z = fixture();
        let a = lookup(&z, "10-244-1-7.prod.pod.cluster.local.", RecordType::A);
        assert_eq!(rdatas(&a), vec!["10.244.1.7"]);
        let v6 = lookup(&z, "fd00--7.any.pod.cluster.local.", RecordType::AAAA);
        assert_eq!(rdatas(&v6), vec!["fd00::7"]);
        let wrong_type = lookup(&z, "10-244-1-7.prod.pod.cluster.local.", RecordType::AAAA);
        assert_eq!(wrong_type.code, ResponseCode::NoError);
        assert!(wrong_type.answers.is_empty());
        for bad in ["10-244-1.prod.pod.cluster.local.", "web.prod.pod.cluster.local.",
                    "a.10-244-1-7.prod.pod.cluster.local.", "999-1-1-1.prod.pod.cluster.local."] {
            assert_eq!(lookup(&z, bad, RecordType::A).code, ResponseCode::NXDomain, "{bad}");
        }
        for ent in ["pod.cluster.local.", "prod.pod.cluster.local."] {
            assert_eq!(lookup(&z, ent, RecordType::A).code, ResponseCode::NoError, "{ent}");
        }
    }

    #[test]
    fn bad_domains_are_refused() {
        for bad in ["", ".", "   ", "a..b"] {
            assert!(parse_domain(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cname_loops_are_bounded() {
        let services = [
            svc(json!({"metadata": {"name": "a", "namespace": "x"},
                "spec": {"type": "ExternalName", "externalName": "b.x.svc.cluster.local"}})),
            svc(json!({"metadata": {"name": "b", "namespace": "x"},
                "spec": {"type": "ExternalName", "externalName": "a.x.svc.cluster.local"}})),
        ];
        let z = ClusterZone::build(&name("cluster.local."), 5, 1, &services, &[]);
        let a = lookup(&z, "a.x.svc.cluster.local.", RecordType::A);
        assert_eq!(a.code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), MAX_CNAME_CHAIN);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any question (arbitrary label bytes, any type) gets an answer or None, never a panic.
        #[test]
        fn any_question_is_answered_without_panic(
            labels in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..20), 0..12),
            suffix in proptest::bool::ANY,
            qtype in proptest::num::u16::ANY,
        ) {
            let z = fixture();
            let mut all: Vec<Vec<u8>> = labels;
            if suffix {
                all.extend([b"svc".to_vec(), b"cluster".to_vec(), b"local".to_vec()]);
            }
            if let Ok(n) = Name::from_labels(all.iter().map(|l| l.as_slice())) {
                let answer = z.lookup(&n, RecordType::from(qtype));
                if z.contains(&n) {
                    proptest::prop_assert!(answer.is_some());
                }
            }
        }

        /// Arbitrary strings in the objects never panic the build.
        #[test]
        fn any_object_strings_build_without_panic(
            svc_name in ".{0,70}", ns in ".{0,70}", ip in ".{0,40}", ext in ".{0,300}",
            host in ".{0,70}", port_name in ".{0,20}",
        ) {
            let services = [
                svc(json!({"metadata": {"name": svc_name, "namespace": ns},
                    "spec": {"clusterIP": ip, "ports": [{"name": port_name, "port": 80}]}})),
                svc(json!({"metadata": {"name": svc_name, "namespace": ns},
                    "spec": {"type": "ExternalName", "externalName": ext}})),
                svc(json!({"metadata": {"name": "h", "namespace": ns},
                    "spec": {"clusterIP": "None"}})),
            ];
            let slices = [slice(json!({"metadata": {"name": "s", "namespace": ns,
                    "labels": {"kubernetes.io/service-name": "h"}},
                "addressType": "IPv4",
                "ports": [{"name": port_name, "port": 80}],
                "endpoints": [{"addresses": [ip], "hostname": host}]}))];
            let z = ClusterZone::build(&name("cluster.local."), 5, 1, &services, &slices);
            let _ = z.lookup(&name("h.x.svc.cluster.local."), RecordType::A);
        }
    }
}
