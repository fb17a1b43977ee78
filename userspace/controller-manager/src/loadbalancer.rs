//! LoadBalancer IP allocation from a configured pool (`--loadbalancer-ip-pool`), so Services of
//! type LoadBalancer work without a cloud: what MetalLB's or kube-vip's controllers do, minus the
//! announcing (the lab routes the pool to a node; on bare metal a router or BGP does).
//!
//! - [`plan`] is the pure allocator: Services in, status writes out. The allocation lives only in
//!   the Services' `status.loadBalancer.ingress` (no other state), so a restarted or newly elected
//!   controller rebuilds it from the API and never hands out an address twice.
//! - [`loadbalancer_loop`] is the shell: a Service watch cache, a pass on every change, status
//!   merge patches (`ingress: [{ip, ipMode: VIP}]`) and Events.
//!
//! Rules (kube's service controller + MetalLB's): a Service takes part when `spec.type` is
//! LoadBalancer and it names no `spec.loadBalancerClass` (those belong to another
//! implementation). Older Services are served first (creationTimestamp, then namespace/name),
//! and a Service keeps the pool address it holds. `spec.loadBalancerIP` is honoured when it is in
//! the pool and free; otherwise the Service gets no address and an Event says why. Deleting a
//! Service frees its address (nothing else holds it); changing its type away from LoadBalancer
//! clears its status, which frees the address too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use serde_json::json;
use skiff_controllers::{EventRecord, EventType};
use tokio::sync::Notify;

use crate::controllers::post_event;

const COMPONENT: &str = "loadbalancer-ip-controller";
/// How long an address this controller wrote counts as held while the watch cache does not show
/// the write yet (then the cache is trusted again).
const ASSUME_FOR: Duration = Duration::from_secs(30);

/// An inclusive range of IPv4 addresses: `FIRST-LAST` or a CIDR (`a.b.c.d/n`, every address of
/// it for /31 and /32, otherwise without the network and broadcast addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPool {
    first: Ipv4Addr,
    last: Ipv4Addr,
}

impl IpPool {
    pub fn new(first: Ipv4Addr, last: Ipv4Addr) -> Result<IpPool, String> {
        if u32::from(first) > u32::from(last) {
            return Err(format!(
                "the pool {first}-{last} is empty: the first address is after the last"
            ));
        }
        Ok(IpPool { first, last })
    }

    pub fn first(&self) -> Ipv4Addr {
        self.first
    }

    pub fn last(&self) -> Ipv4Addr {
        self.last
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(ip))
    }

    /// How many addresses the pool holds.
    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.last) - u32::from(self.first)) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    fn iter(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }
}

impl FromStr for IpPool {
    type Err = String;

    fn from_str(s: &str) -> Result<IpPool, String> {
        let s = s.trim();
        let bad = |why: &str| {
            format!(
                "--loadbalancer-ip-pool {s:?}: {why} (write FIRST-LAST, e.g. 172.20.0.200-172.20.0.250, or a CIDR)"
            )
        };
        if let Some((a, b)) = s.split_once('-') {
            let first: Ipv4Addr = a
                .trim()
                .parse()
                .map_err(|_| bad("the first address is not IPv4"))?;
            let last: Ipv4Addr = b
                .trim()
                .parse()
                .map_err(|_| bad("the last address is not IPv4"))?;
            return IpPool::new(first, last).map_err(|e| bad(&e));
        }
        let net: ipnet::Ipv4Net = s.parse().map_err(|_| bad("not a range or a CIDR"))?;
        if net.prefix_len() >= 31 {
            return IpPool::new(net.network(), net.broadcast()).map_err(|e| bad(&e));
        }
        let first = Ipv4Addr::from(u32::from(net.network()) + 1);
        let last = Ipv4Addr::from(u32::from(net.broadcast()) - 1);
        IpPool::new(first, last).map_err(|e| bad(&e))
    }
}

/// What the allocator needs to know of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbService {
    pub namespace: String,
    pub name: String,
    /// Orders who is served first (RFC 3339 sorts as text); empty sorts first.
    pub created: String,
    /// Type LoadBalancer without a loadBalancerClass.
    pub wants_ip: bool,
    /// A loadBalancerClass names another implementation: never touched.
    pub foreign: bool,
    /// `spec.loadBalancerIP` (deprecated in Kubernetes, still honoured by most pools).
    pub requested: Option<String>,
    /// `status.loadBalancer.ingress[*].ip` now.
    pub ingress: Vec<String>,
}

impl LbService {
    pub fn from_service(svc: &Service) -> LbService {
        let spec = svc.spec.as_ref();
        let ty = spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP");
        let foreign = spec
            .and_then(|s| s.load_balancer_class.as_deref())
            .is_some_and(|c| !c.is_empty());
        LbService {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
            created: svc
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            wants_ip: ty == "LoadBalancer" && !foreign,
            foreign,
            requested: spec
                .and_then(|s| s.load_balancer_ip.clone())
                .filter(|ip| !ip.trim().is_empty()),
            ingress: svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .map(|ing| ing.iter().filter_map(|i| i.ip.clone()).collect())
                .unwrap_or_default(),
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One write the allocator wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbAction {
    /// Set `status.loadBalancer.ingress` to this one address (ipMode VIP).
    Assign {
        namespace: String,
        name: String,
        ip: Ipv4Addr,
    },
    /// Clear `status.loadBalancer` (the type is no longer LoadBalancer, or its address is not
    /// ours to keep).
    Clear { namespace: String, name: String },
    /// No address can be given: say why (an Event), once per reason.
    Pending {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// Decides every Service's address from the pool and what they hold now. Deterministic: the same
/// input gives the same output, whatever order the Services come in.
pub fn plan(pool: &IpPool, services: &[LbService]) -> Vec<LbAction> {
    let mut order: Vec<&LbService> = services.iter().collect();
    order.sort_by(|a, b| {
        (a.created.as_str(), &a.namespace, &a.name).cmp(&(
            b.created.as_str(),
            &b.namespace,
            &b.name,
        ))
    });
    let mut actions = Vec::new();
    let mut taken: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut needs: Vec<&LbService> = Vec::new();
    let parse = |s: &str| s.trim().parse::<Ipv4Addr>().ok();

    // Holders keep what they hold, oldest first (a duplicate goes to the younger one's re-plan).
    for svc in &order {
        if !svc.wants_ip {
            continue;
        }
        let held: Vec<Ipv4Addr> = svc
            .ingress
            .iter()
            .filter_map(|s| parse(s))
            .filter(|ip| pool.contains(*ip))
            .collect();
        let requested = svc.requested.as_deref().map(parse);
        let keep = match (held.as_slice(), requested) {
            ([ip], None) => Some(*ip),
            ([ip], Some(Some(r))) if r == *ip => Some(*ip),
            _ => None,
        };
        match keep {
            Some(ip) if svc.ingress.len() == 1 && taken.insert(ip) => {}
            _ => needs.push(svc),
        }
    }
    // Services asking for a particular address before those taking any, each group oldest first.
    needs.sort_by_key(|s| s.requested.is_none());
    let mut free = pool
        .iter()
        .filter(|ip| !taken.contains(ip))
        .collect::<Vec<_>>()
        .into_iter();
    for svc in needs {
        let (namespace, name) = (svc.namespace.clone(), svc.name.clone());
        let chosen = match svc.requested.as_deref() {
            Some(r) => match parse(r) {
                None => Err(format!("spec.loadBalancerIP {r:?} is not an IPv4 address")),
                Some(ip) if !pool.contains(ip) => Err(format!(
                    "spec.loadBalancerIP {ip} is outside the pool {}-{}",
                    pool.first, pool.last
                )),
                Some(ip) if taken.contains(&ip) => Err(format!(
                    "spec.loadBalancerIP {ip} is already in use by another Service"
                )),
                Some(ip) => Ok(ip),
            },
            None => loop {
                match free.next() {
                    Some(ip) if taken.contains(&ip) => continue,
                    Some(ip) => break Ok(ip),
                    None => {
                        break Err(format!(
                            "no free address left in the pool {}-{}",
                            pool.first, pool.last
                        ));
                    }
                }
            },
        };
        match chosen {
            Ok(ip) => {
                taken.insert(ip);
                actions.push(LbAction::Assign {
                    namespace,
                    name,
                    ip,
                });
            }
            Err(reason) => {
                if !svc.ingress.is_empty() {
                    actions.push(LbAction::Clear {
                        namespace: namespace.clone(),
                        name: name.clone(),
                    });
                }
                actions.push(LbAction::Pending {
                    namespace,
                    name,
                    reason,
                });
            }
        }
    }
    // Services that no longer want an address give back any of the pool's they still show.
    for svc in &order {
        if svc.wants_ip || svc.foreign {
            continue;
        }
        if svc
            .ingress
            .iter()
            .filter_map(|s| parse(s))
            .any(|ip| pool.contains(ip))
        {
            actions.push(LbAction::Clear {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            });
        }
    }
    actions
}

/// What this controller wrote and the cache may not show yet: key -> (ingress, when written).
type Assumed = BTreeMap<String, (Vec<String>, tokio::time::Instant)>;

/// Runs the allocator over the Service cache until aborted: a pass on every Service change (and
/// every 30 s), writes through the status subresource.
pub(crate) async fn loadbalancer_loop(
    client: Client,
    services: Store<Service>,
    pool: IpPool,
    wake: Arc<Notify>,
) {
    tracing::info!(first = %pool.first, last = %pool.last, "LoadBalancer IP allocation from the pool");
    let mut assumed: Assumed = BTreeMap::new();
    // The last Pending reason reported per Service, so an Event is posted once per reason.
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let now = tokio::time::Instant::now();
        let mut view: Vec<LbService> = services
            .state()
            .iter()
            .map(|s| LbService::from_service(s))
            .collect();
        let present: BTreeSet<String> = view.iter().map(|s| s.key()).collect();
        assumed.retain(|k, (_, at)| present.contains(k) && now.duration_since(*at) < ASSUME_FOR);
        reported.retain(|k, _| present.contains(k));
        for svc in &mut view {
            if let Some((ingress, _)) = assumed.get(&svc.key()) {
                if *ingress == svc.ingress {
                    assumed.remove(&svc.key());
                } else {
                    svc.ingress = ingress.clone();
                }
            }
        }
        for action in plan(&pool, &view) {
            apply(&client, &services, action, &mut assumed, &mut reported).await;
        }
        tokio::select! {
            _ = wake.notified() => tokio::time::sleep(Duration::from_millis(20)).await,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

async fn apply(
    client: &Client,
    services: &Store<Service>,
    action: LbAction,
    assumed: &mut Assumed,
    reported: &mut BTreeMap<String, String>,
) {
    let (namespace, name) = match &action {
        LbAction::Assign {
            namespace, name, ..
        }
        | LbAction::Clear { namespace, name }
        | LbAction::Pending {
            namespace, name, ..
        } => (namespace.clone(), name.clone()),
    };
    let key = format!("{namespace}/{name}");
    let api: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let (patch, ingress, reason, message) = match &action {
        LbAction::Assign { ip, .. } => (
            json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]}}}),
            vec![ip.to_string()],
            "IPAllocated",
            format!("Assigned IP {ip} from the LoadBalancer pool"),
        ),
        LbAction::Clear { .. } => (
            json!({"status": {"loadBalancer": {"ingress": null}}}),
            vec![],
            "IPReleased",
            "Released its LoadBalancer IP".to_string(),
        ),
        LbAction::Pending { reason, .. } => {
            if reported.get(&key) != Some(reason) {
                reported.insert(key.clone(), reason.clone());
                tracing::warn!(service = %key, "{reason}");
                event(
                    client,
                    services,
                    &namespace,
                    &name,
                    EventType::Warning,
                    "AllocationFailed",
                    reason,
                )
                .await;
            }
            return;
        }
    };
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            tracing::info!(service = %key, ingress = ?ingress, "{message}");
            assumed.insert(key.clone(), (ingress, tokio::time::Instant::now()));
            reported.remove(&key);
            event(
                client,
                services,
                &namespace,
                &name,
                EventType::Normal,
                reason,
                &message,
            )
            .await;
        }
        // Gone meanwhile, or a stale view: the next pass (woken by the watch) decides again.
        Err(e) => tracing::warn!(service = %key, "writing status.loadBalancer failed: {e}"),
    }
}

async fn event(
    client: &Client,
    services: &Store<Service>,
    namespace: &str,
    name: &str,
    event_type: EventType,
    reason: &str,
    message: &str,
) {
    let uid = services
        .state()
        .iter()
        .find(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata.name.as_deref() == Some(name)
        })
        .and_then(|s| s.metadata.uid.clone());
    let record = EventRecord {
        involved: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(namespace.to_string()),
            name: Some(name.to_string()),
            uid,
            ..Default::default()
        },
        event_type,
        reason: reason.to_string(),
        message: message.to_string(),
    };
    if let Err(e) = post_event(client, COMPONENT, &record).await {
        tracing::debug!("posting an Event failed: {e}");
    }
}

/// The addresses as the allocator reads them from a status.
#[cfg(test)]
fn ingress_ips(svc: &Service) -> Vec<std::net::IpAddr> {
    LbService::from_service(svc)
        .ingress
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> IpPool {
        "172.20.0.200-172.20.0.202".parse().expect("pool")
    }

    fn lb(name: &str, created: &str) -> LbService {
        LbService {
            namespace: "ns".into(),
            name: name.into(),
            created: created.into(),
            wants_ip: true,
            foreign: false,
            requested: None,
            ingress: vec![],
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(172, 20, 0, last)
    }

    fn assigned(actions: &[LbAction]) -> BTreeMap<String, Ipv4Addr> {
        actions
            .iter()
            .filter_map(|a| match a {
                LbAction::Assign { name, ip, .. } => Some((name.clone(), *ip)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pools_parse_as_ranges_and_cidrs_and_bad_ones_are_refused() {
        let p: IpPool = "172.20.5.200-172.20.5.250".parse().expect("range");
        assert_eq!(
            (p.first(), p.last(), p.len()),
            (
                Ipv4Addr::new(172, 20, 5, 200),
                Ipv4Addr::new(172, 20, 5, 250),
                51
            )
        );
        assert!(
            p.contains(Ipv4Addr::new(172, 20, 5, 250))
                && !p.contains(Ipv4Addr::new(172, 20, 5, 251))
        );
        let c: IpPool = "10.0.0.0/30".parse().expect("cidr");
        assert_eq!(
            (c.first(), c.last()),
            (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2))
        );
        let one: IpPool = "10.0.0.7/32".parse().expect("/32");
        assert_eq!(one.len(), 1);
        for bad in [
            "",
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-",
            "a-b",
            "10.0.0.0/33",
            "fd00::1-fd00::2",
            "10.0.0.1",
        ] {
            let e = bad.parse::<IpPool>().expect_err(bad);
            assert!(e.contains("--loadbalancer-ip-pool"), "{bad}: {e}");
        }
    }

    #[test]
    fn new_services_get_the_lowest_free_addresses_oldest_first() {
        let svcs = vec![
            lb("b", "2024-01-02T00:00:00Z"),
            lb("a", "2024-01-03T00:00:00Z"),
            lb("c", "2024-01-01T00:00:00Z"),
        ];
        let got = assigned(&plan(&pool(), &svcs));
        assert_eq!(got["c"], ip(200));
        assert_eq!(got["b"], ip(201));
        assert_eq!(got["a"], ip(202));
        // Input order does not matter.
        let mut rev = svcs.clone();
        rev.reverse();
        assert_eq!(plan(&pool(), &svcs), plan(&pool(), &rev));
    }

    #[test]
    fn holders_keep_their_address_and_a_settled_state_plans_nothing() {
        let mut a = lb("a", "1");
        a.ingress = vec!["172.20.0.201".into()];
        let b = lb("b", "2");
        let actions = plan(&pool(), &[a.clone(), b]);
        assert_eq!(
            assigned(&actions).get("a"),
            None,
            "a keeps .201 without a write"
        );
        assert_eq!(
            assigned(&actions)["b"],
            ip(200),
            "b gets the lowest free one, not a's"
        );
        let mut b = lb("b", "2");
        b.ingress = vec!["172.20.0.200".into()];
        assert!(
            plan(&pool(), &[a, b]).is_empty(),
            "nothing to do once every Service holds its own"
        );
    }

    #[test]
    fn requested_address_is_honoured_when_free_and_refused_otherwise() {
        let mut a = lb("a", "1");
        a.requested = Some("172.20.0.202".into());
        let b = lb("b", "2");
        let got = assigned(&plan(&pool(), &[b.clone(), a.clone()]));
        assert_eq!(got["a"], ip(202));
        assert_eq!(got["b"], ip(200));

        // Taken by an older holder: the younger requester gets nothing, and says why.
        let mut holder = lb("holder", "0");
        holder.ingress = vec!["172.20.0.202".into()];
        let actions = plan(&pool(), &[holder, a.clone()]);
        assert!(!assigned(&actions).contains_key("a"));
        assert!(actions.iter().any(|x| matches!(x, LbAction::Pending { name, reason, .. } if name == "a" && reason.contains("in use"))));

        // Outside the pool, or not an address.
        for (req, why) in [("10.1.1.1", "outside the pool"), ("banana", "not an IPv4")] {
            let mut x = lb("x", "1");
            x.requested = Some(req.into());
            let actions = plan(&pool(), &[x]);
            assert!(assigned(&actions).is_empty());
            assert!(
                actions
                    .iter()
                    .any(|a| matches!(a, LbAction::Pending { reason, .. } if reason.contains(why))),
                "{req}: {actions:?}"
            );
        }

        // Changing spec.loadBalancerIP moves the Service to the new address.
        let mut moved = lb("m", "1");
        moved.ingress = vec!["172.20.0.200".into()];
        moved.requested = Some("172.20.0.201".into());
        assert_eq!(assigned(&plan(&pool(), &[moved]))["m"], ip(201));
    }

    #[test]
    fn exhausted_pool_leaves_the_youngest_pending() {
        let svcs: Vec<LbService> = (0..4)
            .map(|i| lb(&format!("s{i}"), &i.to_string()))
            .collect();
        let actions = plan(&pool(), &svcs);
        assert_eq!(assigned(&actions).len(), 3);
        assert!(actions.iter().any(|a| matches!(a, LbAction::Pending { name, reason, .. } if name == "s3" && reason.contains("no free address"))));
    }

    #[test]
    fn type_change_and_delete_release_the_address() {
        let mut was_lb = lb("a", "1");
        was_lb.wants_ip = false;
        was_lb.ingress = vec!["172.20.0.200".into()];
        let newcomer = lb("b", "2");
        let actions = plan(&pool(), &[was_lb, newcomer.clone()]);
        assert!(actions.contains(&LbAction::Clear {
            namespace: "ns".into(),
            name: "a".into()
        }));
        assert_eq!(
            assigned(&actions)["b"],
            ip(200),
            "the released address is free again in the same pass"
        );

        // A deleted Service is simply absent: its address is free.
        assert_eq!(assigned(&plan(&pool(), &[newcomer]))["b"], ip(200));

        // Another implementation's Service (loadBalancerClass) is never touched.
        let mut foreign = lb("f", "1");
        foreign.wants_ip = false;
        foreign.foreign = true;
        foreign.ingress = vec!["172.20.0.200".into()];
        assert!(plan(&pool(), &[foreign]).is_empty());
    }

    #[test]
    fn duplicates_and_foreign_addresses_are_repaired() {
        let mut a = lb("a", "1");
        a.ingress = vec!["172.20.0.200".into()];
        let mut b = lb("b", "2");
        b.ingress = vec!["172.20.0.200".into()];
        let mut c = lb("c", "3");
        c.ingress = vec!["192.0.2.9".into()];
        let got = assigned(&plan(&pool(), &[a, b, c]));
        assert!(
            !got.contains_key("a"),
            "the older keeps the duplicate address"
        );
        assert_eq!(got["b"], ip(201));
        assert_eq!(
            got["c"],
            ip(202),
            "an address from outside the pool is replaced"
        );
    }

    #[test]
    fn from_service_reads_type_class_request_and_status() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "prod", "creationTimestamp": "2024-05-01T10:00:00Z"},
            "spec": {"type": "LoadBalancer", "loadBalancerIP": "172.20.0.201", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "172.20.0.201", "ipMode": "VIP"}]}}
        }))
        .expect("service");
        let v = LbService::from_service(&svc);
        assert!(v.wants_ip && !v.foreign);
        assert_eq!(v.requested.as_deref(), Some("172.20.0.201"));
        assert_eq!(v.ingress, vec!["172.20.0.201".to_string()]);
        assert_eq!(ingress_ips(&svc), vec![std::net::IpAddr::V4(ip(201))]);
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "x", "namespace": "prod"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "example.com/other"}
        }))
        .expect("service");
        let v = LbService::from_service(&svc);
        assert!(!v.wants_ip && v.foreign);
        let svc: Service = serde_json::from_value(
            json!({"metadata": {"name": "y"}, "spec": {"type": "NodePort"}}),
        )
        .expect("service");
        assert!(!LbService::from_service(&svc).wants_ip);
    }
}

#[cfg(test)]
mod flag_tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: crate::ControllerFlags,
    }

    #[test]
    fn the_pool_flag_reaches_the_options_and_bad_pools_are_refused() {
        let cli = Cli::try_parse_from(["x", "--loadbalancer-ip-pool", "172.20.3.200-172.20.3.250"])
            .expect("parses");
        let pool = cli.flags.options().loadbalancer_ip_pool.expect("pool set");
        assert_eq!(pool.len(), 51);
        assert!(
            Cli::try_parse_from(["x"])
                .expect("parses")
                .flags
                .options()
                .loadbalancer_ip_pool
                .is_none()
        );
        assert!(
            Cli::try_parse_from(["x", "--loadbalancer-ip-pool", "172.20.3.250-172.20.3.200"])
                .is_err()
        );
    }
}
