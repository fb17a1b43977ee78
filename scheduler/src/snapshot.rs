//! The scheduler's view of the cluster: nodes with what is already bound to them, parsed once so
//! that scheduling a pod does no parsing of existing objects (kube-scheduler's cache + snapshot).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeSelector, Pod, PodAffinityTerm, PreferredSchedulingTerm, Taint,
    Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as metav1;
use skiff_api::selector::LabelSelector;

use crate::resources::{PodRequests, Resources, allowed_pods, pod_requests};

/// A label selector as the scheduler uses it: `None` selects nothing. Kubernetes'
/// `LabelSelectorAsSelector(nil)` is `labels.Nothing()`; a selector that does not parse is also
/// treated as selecting nothing (the apiserver refuses such pods, so it only guards the core).
pub type Selector = Option<LabelSelector>;

fn selector_matches(selector: &Selector, labels: &BTreeMap<String, String>) -> bool {
    selector.as_ref().is_some_and(|s| s.matches(labels))
}

fn parse_selector(
    sel: Option<&metav1::LabelSelector>,
    what: &str,
    problems: &mut Vec<String>,
) -> Selector {
    let sel = sel?;
    match LabelSelector::from_label_selector(sel) {
        Ok(s) => Some(s),
        Err(e) => {
            problems.push(format!("{what}: {e}"));
            None
        }
    }
}

/// A pod (anti-)affinity term, parsed (`framework.AffinityTerm`).
#[derive(Debug, Clone)]
pub struct AffinityTerm {
    pub selector: Selector,
    /// Namespaces named by the term, or the owning pod's own when the term names none and has no
    /// namespaceSelector.
    pub namespaces: Vec<String>,
    /// `None`: no namespaceSelector (or one that selects nothing). `Some(empty)`: all namespaces.
    pub namespace_selector: Selector,
    pub topology_key: String,
}

impl AffinityTerm {
    fn parse(
        term: &PodAffinityTerm,
        owner_namespace: &str,
        what: &str,
        problems: &mut Vec<String>,
    ) -> AffinityTerm {
        let named = term.namespaces.clone().unwrap_or_default();
        let namespaces = if named.is_empty() && term.namespace_selector.is_none() {
            vec![owner_namespace.to_string()]
        } else {
            named
        };
        // matchLabelKeys/mismatchLabelKeys are merged into labelSelector by the apiserver when
        // the pod is created (KEP-3633), so the scheduler reads labelSelector alone.
        AffinityTerm {
            selector: parse_selector(term.label_selector.as_ref(), what, problems),
            namespaces,
            namespace_selector: parse_selector(term.namespace_selector.as_ref(), what, problems),
            topology_key: term.topology_key.clone(),
        }
    }

    /// Whether `pod` is one of the pods this term selects (`AffinityTerm.Matches`).
    pub fn matches(&self, pod: &PodInfo, snapshot: &ClusterSnapshot) -> bool {
        let in_namespace = self.namespaces.contains(&pod.namespace)
            || self.namespace_selector.as_ref().is_some_and(|s| {
                s.is_empty() || s.matches(snapshot.namespace_labels(&pod.namespace))
            });
        in_namespace && selector_matches(&self.selector, &pod.labels)
    }
}

/// A preferred (weighted) pod (anti-)affinity term.
#[derive(Debug, Clone)]
pub struct WeightedAffinityTerm {
    pub term: AffinityTerm,
    pub weight: i64,
}

/// A topology spread constraint, parsed, with matchLabelKeys merged into its selector.
#[derive(Debug, Clone)]
pub struct SpreadConstraint {
    pub max_skew: i64,
    pub topology_key: String,
    pub selector: Selector,
    pub min_domains: Option<i64>,
    /// `DoNotSchedule` (a filter) when true, `ScheduleAnyway` (a score) when false.
    pub hard: bool,
    /// nodeAffinityPolicy: Honor (the default) counts only nodes the pod's nodeSelector and
    /// required node affinity accept.
    pub honor_node_affinity: bool,
    /// nodeTaintsPolicy: Ignore (the default) counts tainted nodes too.
    pub honor_node_taints: bool,
}

impl SpreadConstraint {
    fn parse(
        c: &TopologySpreadConstraint,
        pod_labels: &BTreeMap<String, String>,
        problems: &mut Vec<String>,
    ) -> SpreadConstraint {
        let what = format!("topologySpreadConstraints[{}]", c.topology_key);
        // matchLabelKeys: the scheduler adds `key in (pod's value)` for each key the pod carries.
        let selector = c.label_selector.as_ref().map(|sel| {
            let mut merged = sel.clone();
            for key in c.match_label_keys.iter().flatten() {
                if let Some(value) = pod_labels.get(key) {
                    merged.match_expressions.get_or_insert_with(Vec::new).push(
                        metav1::LabelSelectorRequirement {
                            key: key.clone(),
                            operator: "In".into(),
                            values: Some(vec![value.clone()]),
                        },
                    );
                }
            }
            merged
        });
        if c.max_skew < 1 {
            problems.push(format!(
                "{what}: maxSkew must be at least 1, not {}",
                c.max_skew
            ));
        }
        SpreadConstraint {
            max_skew: i64::from(c.max_skew),
            topology_key: c.topology_key.clone(),
            selector: parse_selector(selector.as_ref(), &what, problems),
            min_domains: c.min_domains.map(i64::from),
            hard: c.when_unsatisfiable != "ScheduleAnyway",
            honor_node_affinity: c.node_affinity_policy.as_deref() != Some("Ignore"),
            honor_node_taints: c.node_taints_policy.as_deref() == Some("Honor"),
        }
    }

    /// Whether the constraint counts `pod` (same namespace as the incoming pod, not terminating,
    /// selected: `countPodsMatchSelector`).
    pub fn counts(&self, pod: &PodInfo, namespace: &str) -> bool {
        !pod.terminating
            && pod.namespace == namespace
            && selector_matches(&self.selector, &pod.labels)
    }

    /// Whether the incoming pod itself matches the selector (its "self match").
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        selector_matches(&self.selector, labels)
    }
}

/// A host port a container asks for (NodePorts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub ip: String,
    pub protocol: String,
    pub port: i32,
}

impl HostPort {
    /// Two host ports conflict on the same protocol and port when either binds all addresses
    /// or both bind the same one.
    pub fn conflicts(&self, other: &HostPort) -> bool {
        let any = |ip: &str| ip.is_empty() || ip == "0.0.0.0" || ip == "::";
        self.port == other.port
            && self.protocol == other.protocol
            && (any(&self.ip) || any(&other.ip) || self.ip == other.ip)
    }
}

/// A pod, parsed for scheduling: both the incoming pod and the pods already bound to nodes.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// `spec.nodeName`, if the pod names its node.
    pub node_name: Option<String>,
    pub requests: PodRequests,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    pub tolerations: Vec<Toleration>,
    pub node_selector: BTreeMap<String, String>,
    pub required_node_affinity: Option<NodeSelector>,
    pub preferred_node_affinity: Vec<PreferredSchedulingTerm>,
    pub required_affinity: Vec<AffinityTerm>,
    pub required_anti_affinity: Vec<AffinityTerm>,
    pub preferred_affinity: Vec<WeightedAffinityTerm>,
    pub preferred_anti_affinity: Vec<WeightedAffinityTerm>,
    pub spread_constraints: Vec<SpreadConstraint>,
    pub host_ports: Vec<HostPort>,
    /// What could not be parsed (bad quantities or selectors). Such parts count as zero or select
    /// nothing; [`crate::Scheduler::schedule`] refuses an incoming pod that has any.
    pub problems: Vec<String>,
}

impl PodInfo {
    pub fn new(pod: &Pod) -> PodInfo {
        let meta = &pod.metadata;
        let namespace = meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let labels = meta.labels.clone().unwrap_or_default();
        let mut problems = Vec::new();
        let mut quantity_problems = Vec::new();
        let requests = pod_requests(pod, &mut quantity_problems);
        problems.extend(quantity_problems.iter().map(ToString::to_string));
        let spec = pod.spec.as_ref();
        let affinity = spec.and_then(|s| s.affinity.as_ref());
        let pod_affinity = affinity.and_then(|a| a.pod_affinity.as_ref());
        let pod_anti_affinity = affinity.and_then(|a| a.pod_anti_affinity.as_ref());
        let node_affinity = affinity.and_then(|a| a.node_affinity.as_ref());

        let required =
            |terms: Option<&Vec<PodAffinityTerm>>, what: &str, problems: &mut Vec<String>| {
                terms
                    .into_iter()
                    .flatten()
                    .map(|t| AffinityTerm::parse(t, &namespace, what, problems))
                    .collect::<Vec<_>>()
            };
        let preferred =
            |terms: Option<&Vec<k8s_openapi::api::core::v1::WeightedPodAffinityTerm>>,
             what: &str,
             problems: &mut Vec<String>| {
                terms
                    .into_iter()
                    .flatten()
                    .filter(|t| t.weight != 0)
                    .map(|t| WeightedAffinityTerm {
                        term: AffinityTerm::parse(&t.pod_affinity_term, &namespace, what, problems),
                        weight: i64::from(t.weight),
                    })
                    .collect::<Vec<_>>()
            };
        let required_affinity = required(
            pod_affinity.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
            "podAffinity",
            &mut problems,
        );
        let required_anti_affinity = required(
            pod_anti_affinity.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
            "podAntiAffinity",
            &mut problems,
        );
        let preferred_affinity = preferred(
            pod_affinity.and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
            "podAffinity",
            &mut problems,
        );
        let preferred_anti_affinity = preferred(
            pod_anti_affinity.and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
            "podAntiAffinity",
            &mut problems,
        );
        let spread_constraints = spec
            .and_then(|s| s.topology_spread_constraints.as_ref())
            .into_iter()
            .flatten()
            .map(|c| SpreadConstraint::parse(c, &labels, &mut problems))
            .collect();
        let host_ports = spec
            .into_iter()
            .flat_map(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
            })
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|p| p.host_port.is_some_and(|hp| hp > 0))
            .map(|p| HostPort {
                ip: p.host_ip.clone().unwrap_or_default(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                port: p.host_port.unwrap_or_default(),
            })
            .collect();
        PodInfo {
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            labels,
            node_name: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            requests,
            terminating: meta.deletion_timestamp.is_some(),
            tolerations: spec.and_then(|s| s.tolerations.clone()).unwrap_or_default(),
            node_selector: spec
                .and_then(|s| s.node_selector.clone())
                .unwrap_or_default(),
            required_node_affinity: node_affinity.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .clone()
            }),
            preferred_node_affinity: node_affinity
                .and_then(|a| {
                    a.preferred_during_scheduling_ignored_during_execution
                        .clone()
                })
                .unwrap_or_default(),
            required_affinity,
            required_anti_affinity,
            preferred_affinity,
            preferred_anti_affinity,
            spread_constraints,
            host_ports,
            problems,
            namespace,
        }
    }

    /// `namespace/name`, the key the snapshot finds a bound pod by.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the pod has any pod (anti-)affinity term that other pods' placement depends on.
    pub fn has_affinity(&self) -> bool {
        !self.required_affinity.is_empty()
            || !self.required_anti_affinity.is_empty()
            || !self.preferred_affinity.is_empty()
            || !self.preferred_anti_affinity.is_empty()
    }
}

/// A node with the pods bound to it and their summed requests (`framework.NodeInfo`).
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    pub allocatable: Resources,
    /// `status.allocatable["pods"]`.
    pub allowed_pods: i64,
    /// Sum of the real requests of the pods on the node.
    pub requested: Resources,
    /// Sums of the "non-zero" cpu and memory requests (defaults for missing requests).
    pub non_zero_milli_cpu: i64,
    pub non_zero_memory: i64,
    pub pods: Vec<PodInfo>,
    /// Indexes into `pods` of the pods with pod (anti-)affinity terms.
    pub pods_with_affinity: Vec<usize>,
    /// Indexes into `pods` of the pods with required anti-affinity terms.
    pub pods_with_required_anti_affinity: Vec<usize>,
    /// Bad quantities in the Node's allocatable (they count as zero, so nothing fits on it).
    pub problems: Vec<String>,
}

impl NodeInfo {
    pub fn new(node: &Node) -> NodeInfo {
        let mut quantity_problems = Vec::new();
        let empty = BTreeMap::new();
        let allocatable_map = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .unwrap_or(&empty);
        let allocatable = Resources::from_map(allocatable_map, &mut quantity_problems);
        let allowed_pods = allowed_pods(allocatable_map, &mut quantity_problems);
        let spec = node.spec.as_ref();
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: spec.and_then(|s| s.taints.clone()).unwrap_or_default(),
            unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
            allocatable,
            allowed_pods,
            requested: Resources::default(),
            non_zero_milli_cpu: 0,
            non_zero_memory: 0,
            pods: Vec::new(),
            pods_with_affinity: Vec::new(),
            pods_with_required_anti_affinity: Vec::new(),
            problems: quantity_problems.iter().map(ToString::to_string).collect(),
        }
    }

    fn add_pod(&mut self, pod: PodInfo) {
        self.requested.add(&pod.requests.requests);
        self.non_zero_milli_cpu = self
            .non_zero_milli_cpu
            .saturating_add(pod.requests.non_zero_milli_cpu);
        self.non_zero_memory = self
            .non_zero_memory
            .saturating_add(pod.requests.non_zero_memory);
        if pod.has_affinity() {
            self.pods_with_affinity.push(self.pods.len());
        }
        if !pod.required_anti_affinity.is_empty() {
            self.pods_with_required_anti_affinity.push(self.pods.len());
        }
        self.pods.push(pod);
    }

    fn remove_pod_at(&mut self, index: usize) -> PodInfo {
        let pod = self.pods.remove(index);
        self.requested.sub(&pod.requests.requests);
        self.non_zero_milli_cpu = self
            .non_zero_milli_cpu
            .saturating_sub(pod.requests.non_zero_milli_cpu);
        self.non_zero_memory = self
            .non_zero_memory
            .saturating_sub(pod.requests.non_zero_memory);
        self.reindex();
        pod
    }

    fn reindex(&mut self) {
        self.pods_with_affinity = (0..self.pods.len())
            .filter(|i| self.pods[*i].has_affinity())
            .collect();
        self.pods_with_required_anti_affinity = (0..self.pods.len())
            .filter(|i| !self.pods[*i].required_anti_affinity.is_empty())
            .collect();
    }

    /// All host ports in use on the node.
    pub fn used_ports(&self) -> impl Iterator<Item = &HostPort> {
        self.pods.iter().flat_map(|p| p.host_ports.iter())
    }
}

/// Why the snapshot refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("node {0:?} is not in the scheduler's snapshot: add the Node first (upsert_node)")]
    UnknownNode(String),
}

/// The scheduler's view of the cluster at one moment.
#[derive(Debug, Clone, Default)]
pub struct ClusterSnapshot {
    nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    namespace_labels: HashMap<String, BTreeMap<String, String>>,
    /// `namespace/name` of each bound pod -> index of its node.
    pod_nodes: HashMap<String, usize>,
    /// How many bound pods have pod (anti-)affinity terms, to skip that work when none do.
    pods_with_affinity: usize,
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl ClusterSnapshot {
    /// Builds the snapshot from Nodes and Pods. Pods count when they are bound (`spec.nodeName`
    /// names a node in `nodes`) and not finished (phase Succeeded/Failed frees their resources,
    /// as kube-scheduler's cache drops terminal pods); other pods are ignored. Pods may be
    /// given by reference, so a watch cache's shared pods need not be copied.
    pub fn new<'a>(nodes: &[Node], pods: impl IntoIterator<Item = &'a Pod>) -> ClusterSnapshot {
        let mut snapshot = ClusterSnapshot::default();
        for node in nodes {
            snapshot.upsert_node(node);
        }
        for pod in pods {
            if is_terminal(pod) {
                continue;
            }
            let info = PodInfo::new(pod);
            if let Some(node) = info.node_name.clone() {
                // A pod on a node the snapshot does not know is ignored (documented above); a
                // pod listed twice counts once, the last listing winning.
                let _ = snapshot.assume_info(info, &node);
            }
        }
        snapshot
    }

    /// Adds namespace labels, for pod affinity terms with a namespaceSelector. Namespaces not
    /// given have no labels (so only an empty namespaceSelector selects them).
    pub fn with_namespaces(mut self, namespaces: &[Namespace]) -> ClusterSnapshot {
        for ns in namespaces {
            if let Some(name) = ns.metadata.name.clone() {
                self.namespace_labels
                    .insert(name, ns.metadata.labels.clone().unwrap_or_default());
            }
        }
        self
    }

    pub fn namespace_labels(&self, namespace: &str) -> &BTreeMap<String, String> {
        self.namespace_labels.get(namespace).unwrap_or(&NO_LABELS)
    }

    /// Adds a Node or replaces it (keeping the pods bound to it).
    pub fn upsert_node(&mut self, node: &Node) {
        let mut info = NodeInfo::new(node);
        match self.index.get(&info.name) {
            Some(&i) => {
                let old = &mut self.nodes[i];
                info.requested = std::mem::take(&mut old.requested);
                info.non_zero_milli_cpu = old.non_zero_milli_cpu;
                info.non_zero_memory = old.non_zero_memory;
                info.pods = std::mem::take(&mut old.pods);
                info.reindex();
                *old = info;
            }
            None => {
                self.index.insert(info.name.clone(), self.nodes.len());
                self.nodes.push(info);
            }
        }
    }

    /// Removes a Node and forgets the pods bound to it. Returns whether it was there.
    pub fn remove_node(&mut self, name: &str) -> bool {
        let Some(i) = self.index.remove(name) else {
            return false;
        };
        let removed = self.nodes.remove(i);
        self.pods_with_affinity -= removed.pods.iter().filter(|p| p.has_affinity()).count();
        self.index = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        self.pod_nodes = self
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.pods.iter().map(move |p| (p.key(), i)))
            .collect();
        true
    }

    /// Accounts for `pod` bound to `node` (kube-scheduler's "assume"): its requests, labels,
    /// affinity and ports count from now on. Assuming a pod that is already in the snapshot moves
    /// it.
    pub fn assume(&mut self, pod: &Pod, node: &str) -> Result<(), SnapshotError> {
        self.assume_info(PodInfo::new(pod), node)
    }

    /// [`ClusterSnapshot::assume`] for a pod already parsed (as [`crate::Scheduler::schedule_info`]
    /// takes it), so a controller parses each pod once.
    pub fn assume_info(&mut self, mut info: PodInfo, node: &str) -> Result<(), SnapshotError> {
        if !self.index.contains_key(node) {
            return Err(SnapshotError::UnknownNode(node.to_string()));
        }
        info.node_name = Some(node.to_string());
        self.remove_pod(&info.namespace.clone(), &info.name.clone());
        self.add_pod_info(info, node)
    }

    fn add_pod_info(&mut self, info: PodInfo, node: &str) -> Result<(), SnapshotError> {
        let &i = self
            .index
            .get(node)
            .ok_or_else(|| SnapshotError::UnknownNode(node.to_string()))?;
        if info.has_affinity() {
            self.pods_with_affinity += 1;
        }
        self.pod_nodes.insert(info.key(), i);
        self.nodes[i].add_pod(info);
        Ok(())
    }

    /// Forgets a pod (deleted, finished, or an assumption that did not bind). Returns the node it
    /// was on.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Option<String> {
        let key = format!("{namespace}/{name}");
        let i = self.pod_nodes.remove(&key)?;
        let node = &mut self.nodes[i];
        let at = node
            .pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)?;
        let pod = node.remove_pod_at(at);
        if pod.has_affinity() {
            self.pods_with_affinity -= 1;
        }
        Some(node.name.clone())
    }

    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.index.get(name).map(|&i| &self.nodes[i])
    }

    /// Whether any bound pod has pod (anti-)affinity terms.
    pub fn any_pod_has_affinity(&self) -> bool {
        self.pods_with_affinity > 0
    }

    /// The number of pods bound to nodes in the snapshot.
    pub fn pod_count(&self) -> usize {
        self.pod_nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{HOSTNAME, labels, node, pod, term};

    fn two_nodes() -> Vec<Node> {
        vec![
            node("a").allocatable("4", "8Gi", 110).build(),
            node("b").allocatable("4", "8Gi", 110).build(),
        ]
    }

    #[test]
    fn new_counts_bound_running_pods_only() {
        let pods = vec![
            pod("d", "running")
                .request("1", "1Gi")
                .node_name("a")
                .build(),
            pod("d", "pending").request("1", "1Gi").build(),
            pod("d", "done")
                .request("1", "1Gi")
                .node_name("a")
                .phase("Succeeded")
                .build(),
            pod("d", "failed")
                .request("1", "1Gi")
                .node_name("a")
                .phase("Failed")
                .build(),
            pod("d", "elsewhere")
                .request("1", "1Gi")
                .node_name("gone")
                .build(),
        ];
        let s = ClusterSnapshot::new(&two_nodes(), &pods);
        assert_eq!(s.pod_count(), 1);
        let a = s.node("a").expect("a");
        assert_eq!((a.requested.milli_cpu, a.requested.memory), (1000, 1 << 30));
        assert_eq!(a.non_zero_milli_cpu, 1000);
        assert_eq!(s.node("b").map(|n| n.pods.len()), Some(0));
    }

    #[test]
    fn assume_moves_a_pod_already_present_and_tracks_affinity() {
        let mut s = ClusterSnapshot::new(&two_nodes(), &[]);
        let p = pod("d", "p")
            .label("app", "x")
            .request("1", "")
            .pod_anti_affinity(term(labels(&[("app", "x")]), HOSTNAME))
            .build();
        s.assume(&p, "a").expect("a exists");
        assert!(s.any_pod_has_affinity());
        s.assume(&p, "b").expect("b exists");
        assert_eq!(s.pod_count(), 1);
        assert_eq!(s.node("a").map(|n| n.requested.milli_cpu), Some(0));
        assert_eq!(
            s.node("b")
                .map(|n| n.pods_with_required_anti_affinity.len()),
            Some(1)
        );
        assert_eq!(s.remove_pod("d", "p"), Some("b".to_string()));
        assert!(!s.any_pod_has_affinity());
        assert_eq!(s.remove_pod("d", "p"), None);
        assert_eq!(
            s.assume(&p, "zzz"),
            Err(SnapshotError::UnknownNode("zzz".to_string()))
        );
        assert_eq!(s.pod_count(), 0, "a refused assume changes nothing");
    }

    #[test]
    fn upsert_node_keeps_its_pods_and_remove_node_forgets_them() {
        let mut s = ClusterSnapshot::new(
            &two_nodes(),
            &[pod("d", "p").request("1", "").node_name("a").build()],
        );
        s.upsert_node(
            &node("a")
                .allocatable("8", "8Gi", 110)
                .unschedulable()
                .build(),
        );
        let a = s.node("a").expect("a");
        assert!(a.unschedulable);
        assert_eq!(
            (a.allocatable.milli_cpu, a.requested.milli_cpu, a.pods.len()),
            (8000, 1000, 1)
        );
        assert!(s.remove_node("a"));
        assert!(!s.remove_node("a"));
        assert_eq!(s.pod_count(), 0);
        assert_eq!(s.nodes().len(), 1);
        // The index still finds the remaining node after the removal shifted it.
        assert!(s.node("b").is_some());
        s.assume(&pod("d", "q").build(), "b").expect("b exists");
        assert_eq!(s.remove_pod("d", "q"), Some("b".to_string()));
    }

    #[test]
    fn bad_quantities_are_reported_not_panicked_on() {
        let bad_node = node("n").allocatable("lots", "8Gi", 110).build();
        let info = NodeInfo::new(&bad_node);
        assert_eq!(
            info.allocatable.milli_cpu, 0,
            "a bad allocatable counts as zero"
        );
        assert_eq!(info.problems.len(), 1);
        let bad_pod = pod("d", "p").request("1", "8 GB").build();
        let p = PodInfo::new(&bad_pod);
        assert!(p.problems[0].contains("\"8 GB\""), "{:?}", p.problems);
    }
}
