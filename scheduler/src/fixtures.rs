//! Builders for Nodes and Pods as the scheduler reads them: for unit and scenario tests, the
//! benchmark, and kwok-style simulated nodes in the control loops' tests. They build real
//! k8s-openapi objects, so what is tested is exactly what the apiserver will hand over.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Container, ContainerPort, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, NodeSpec, NodeStatus, Pod, PodAffinity, PodAffinityTerm, PodAntiAffinity,
    PodSpec, PodStatus, PreferredSchedulingTerm, ResourceRequirements, Taint, Toleration,
    TopologySpreadConstraint, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};

pub const HOSTNAME: &str = "kubernetes.io/hostname";
pub const ZONE: &str = "topology.kubernetes.io/zone";

/// A Node builder; `node(name)` carries `kubernetes.io/hostname=name` as a kubelet sets it.
pub struct NodeBuilder(Node);

pub fn node(name: &str) -> NodeBuilder {
    NodeBuilder(Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(HOSTNAME.to_string(), name.to_string())])),
            ..Default::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus::default()),
    })
}

impl NodeBuilder {
    pub fn label(mut self, key: &str, value: &str) -> NodeBuilder {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_string(), value.to_string());
        self
    }

    pub fn zone(self, zone: &str) -> NodeBuilder {
        self.label(ZONE, zone)
    }

    /// Sets `status.allocatable` cpu, memory and pods.
    pub fn allocatable(mut self, cpu: &str, memory: &str, pods: i64) -> NodeBuilder {
        let alloc = self
            .0
            .status
            .get_or_insert_with(Default::default)
            .allocatable
            .get_or_insert_with(BTreeMap::new);
        alloc.insert("cpu".into(), Quantity(cpu.into()));
        alloc.insert("memory".into(), Quantity(memory.into()));
        alloc.insert("pods".into(), Quantity(pods.to_string()));
        self
    }

    pub fn allocatable_resource(mut self, name: &str, value: &str) -> NodeBuilder {
        self.0
            .status
            .get_or_insert_with(Default::default)
            .allocatable
            .get_or_insert_with(BTreeMap::new)
            .insert(name.into(), Quantity(value.into()));
        self
    }

    pub fn taint(mut self, key: &str, value: &str, effect: &str) -> NodeBuilder {
        self.0
            .spec
            .get_or_insert_with(Default::default)
            .taints
            .get_or_insert_with(Vec::new)
            .push(Taint {
                key: key.into(),
                value: (!value.is_empty()).then(|| value.to_string()),
                effect: effect.into(),
                time_added: None,
            });
        self
    }

    pub fn unschedulable(mut self) -> NodeBuilder {
        self.0
            .spec
            .get_or_insert_with(Default::default)
            .unschedulable = Some(true);
        self
    }

    pub fn build(self) -> Node {
        self.0
    }
}

/// A label selector with `matchLabels` only.
pub fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        match_expressions: None,
    }
}

/// A pod (anti-)affinity term selecting `selector` in the pod's own namespace.
pub fn term(selector: LabelSelector, topology_key: &str) -> PodAffinityTerm {
    PodAffinityTerm {
        label_selector: Some(selector),
        topology_key: topology_key.into(),
        ..Default::default()
    }
}

/// A node selector requirement (`In`, `NotIn`, `Exists`, `DoesNotExist`, `Gt`, `Lt`).
pub fn requirement(key: &str, operator: &str, values: &[&str]) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: (!values.is_empty()).then(|| values.iter().map(ToString::to_string).collect()),
    }
}

/// A Pod builder with one container `main`.
pub struct PodBuilder(Pod);

pub fn pod(namespace: &str, name: &str) -> PodBuilder {
    PodBuilder(Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                image: Some("registry.local/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    })
}

impl PodBuilder {
    fn spec(&mut self) -> &mut PodSpec {
        self.0.spec.get_or_insert_with(Default::default)
    }

    fn affinity(&mut self) -> &mut Affinity {
        self.spec().affinity.get_or_insert_with(Default::default)
    }

    pub fn uid(mut self, uid: &str) -> PodBuilder {
        self.0.metadata.uid = Some(uid.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> PodBuilder {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_string(), value.to_string());
        self
    }

    /// Sets the `main` container's cpu and memory requests (empty string: leave out).
    pub fn request(self, cpu: &str, memory: &str) -> PodBuilder {
        let mut pairs = Vec::new();
        if !cpu.is_empty() {
            pairs.push(("cpu", cpu));
        }
        if !memory.is_empty() {
            pairs.push(("memory", memory));
        }
        self.requests(&pairs)
    }

    /// Adds requests to the `main` container.
    pub fn requests(mut self, pairs: &[(&str, &str)]) -> PodBuilder {
        let spec = self.spec();
        if spec.containers.is_empty() {
            spec.containers.push(Container {
                name: "main".into(),
                ..Default::default()
            });
        }
        let requests = spec.containers[0]
            .resources
            .get_or_insert_with(ResourceRequirements::default)
            .requests
            .get_or_insert_with(BTreeMap::new);
        for (k, v) in pairs {
            requests.insert(k.to_string(), Quantity(v.to_string()));
        }
        self
    }

    pub fn node_name(mut self, node: &str) -> PodBuilder {
        self.spec().node_name = Some(node.into());
        self
    }

    pub fn node_selector(mut self, key: &str, value: &str) -> PodBuilder {
        self.spec()
            .node_selector
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn toleration(
        mut self,
        key: &str,
        operator: &str,
        value: &str,
        effect: &str,
    ) -> PodBuilder {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        self.spec()
            .tolerations
            .get_or_insert_with(Vec::new)
            .push(Toleration {
                key: some(key),
                operator: some(operator),
                value: some(value),
                effect: some(effect),
                toleration_seconds: None,
            });
        self
    }

    /// Adds a required node affinity term (terms are ORed, requirements inside one ANDed).
    pub fn required_node_term(
        mut self,
        expressions: Vec<NodeSelectorRequirement>,
        fields: Vec<NodeSelectorRequirement>,
    ) -> PodBuilder {
        let node_affinity = self
            .affinity()
            .node_affinity
            .get_or_insert_with(NodeAffinity::default);
        node_affinity
            .required_during_scheduling_ignored_during_execution
            .get_or_insert_with(|| NodeSelector {
                node_selector_terms: Vec::new(),
            })
            .node_selector_terms
            .push(NodeSelectorTerm {
                match_expressions: (!expressions.is_empty()).then_some(expressions),
                match_fields: (!fields.is_empty()).then_some(fields),
            });
        self
    }

    pub fn preferred_node_term(
        mut self,
        weight: i32,
        expressions: Vec<NodeSelectorRequirement>,
    ) -> PodBuilder {
        self.affinity()
            .node_affinity
            .get_or_insert_with(NodeAffinity::default)
            .preferred_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(PreferredSchedulingTerm {
                weight,
                preference: NodeSelectorTerm {
                    match_expressions: Some(expressions),
                    match_fields: None,
                },
            });
        self
    }

    pub fn pod_affinity(mut self, term: PodAffinityTerm) -> PodBuilder {
        self.affinity()
            .pod_affinity
            .get_or_insert_with(PodAffinity::default)
            .required_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(term);
        self
    }

    pub fn pod_anti_affinity(mut self, term: PodAffinityTerm) -> PodBuilder {
        self.affinity()
            .pod_anti_affinity
            .get_or_insert_with(PodAntiAffinity::default)
            .required_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(term);
        self
    }

    pub fn preferred_pod_affinity(mut self, weight: i32, term: PodAffinityTerm) -> PodBuilder {
        self.affinity()
            .pod_affinity
            .get_or_insert_with(PodAffinity::default)
            .preferred_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(WeightedPodAffinityTerm {
                weight,
                pod_affinity_term: term,
            });
        self
    }

    pub fn preferred_pod_anti_affinity(mut self, weight: i32, term: PodAffinityTerm) -> PodBuilder {
        self.affinity()
            .pod_anti_affinity
            .get_or_insert_with(PodAntiAffinity::default)
            .preferred_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(WeightedPodAffinityTerm {
                weight,
                pod_affinity_term: term,
            });
        self
    }

    /// Adds a topology spread constraint (`DoNotSchedule` when `hard`, else `ScheduleAnyway`).
    pub fn spread(
        mut self,
        max_skew: i32,
        topology_key: &str,
        selector: LabelSelector,
        hard: bool,
    ) -> PodBuilder {
        self.spec()
            .topology_spread_constraints
            .get_or_insert_with(Vec::new)
            .push(TopologySpreadConstraint {
                max_skew,
                topology_key: topology_key.into(),
                label_selector: Some(selector),
                when_unsatisfiable: if hard {
                    "DoNotSchedule"
                } else {
                    "ScheduleAnyway"
                }
                .into(),
                ..Default::default()
            });
        self
    }

    /// Adds a full topology spread constraint as written.
    pub fn spread_constraint(mut self, constraint: TopologySpreadConstraint) -> PodBuilder {
        self.spec()
            .topology_spread_constraints
            .get_or_insert_with(Vec::new)
            .push(constraint);
        self
    }

    pub fn host_port(mut self, port: i32) -> PodBuilder {
        let spec = self.spec();
        if let Some(c) = spec.containers.first_mut() {
            c.ports.get_or_insert_with(Vec::new).push(ContainerPort {
                container_port: port,
                host_port: Some(port),
                protocol: Some("TCP".into()),
                ..Default::default()
            });
        }
        self
    }

    /// Marks the pod as being deleted (`metadata.deletionTimestamp`).
    pub fn terminating(mut self) -> PodBuilder {
        self.0.metadata.deletion_timestamp = Some(Time(Default::default()));
        self
    }

    pub fn phase(mut self, phase: &str) -> PodBuilder {
        self.0.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        self
    }

    pub fn build(self) -> Pod {
        self.0
    }
}
