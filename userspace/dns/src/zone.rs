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
