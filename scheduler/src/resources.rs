//! Resource amounts and a pod's effective requests, computed as Kubernetes'
//! `component-helpers/resource.PodRequests` does.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::quantity::{ParsedQuantity, QuantityError};

/// The default cpu request (millicores) that scoring assumes for a container without one
/// (kube-scheduler's `DefaultMilliCPURequest`), so that best-effort pods still spread.
pub const DEFAULT_MILLI_CPU_REQUEST: i64 = 100;
/// The default memory request (bytes) that scoring assumes (`DefaultMemoryRequest`, 200 MiB).
pub const DEFAULT_MEMORY_REQUEST: i64 = 200 * 1024 * 1024;

/// Amounts of resources: cpu in millicores, the rest in units (bytes or counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub ephemeral_storage: i64,
    /// Extended and other resources (`nvidia.com/gpu`, `hugepages-2Mi`, ...), by name. Never
    /// holds zero entries created by arithmetic that did not need them.
    pub scalar: BTreeMap<String, i64>,
}

impl Resources {
    /// Reads a `requests`/`allocatable` map. `pods` is not a resource a container requests: it is
    /// read separately by [`allowed_pods`]. Bad quantities are collected in `problems` and count
    /// as zero.
    pub fn from_map(
        map: &BTreeMap<String, Quantity>,
        problems: &mut Vec<QuantityError>,
    ) -> Resources {
        let mut out = Resources::default();
        for (name, quantity) in map {
            let parsed = match ParsedQuantity::parse(&quantity.0) {
                Ok(parsed) => parsed,
                Err(e) => {
                    problems.push(QuantityError {
                        input: e.input,
                        reason: format!("{} (resource {name})", e.reason),
                    });
                    continue;
                }
            };
            match name.as_str() {
                "cpu" => out.milli_cpu = parsed.milli_value(),
                "memory" => out.memory = parsed.value(),
                "ephemeral-storage" => out.ephemeral_storage = parsed.value(),
                "pods" => {}
                other => {
                    out.scalar.insert(other.to_string(), parsed.value());
                }
            }
        }
        out
    }

    pub fn add(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.saturating_add(other.milli_cpu);
        self.memory = self.memory.saturating_add(other.memory);
        self.ephemeral_storage = self
            .ephemeral_storage
            .saturating_add(other.ephemeral_storage);
        for (name, value) in &other.scalar {
            let entry = self.scalar.entry(name.clone()).or_insert(0);
            *entry = entry.saturating_add(*value);
        }
    }

    pub fn sub(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.saturating_sub(other.milli_cpu);
        self.memory = self.memory.saturating_sub(other.memory);
        self.ephemeral_storage = self
            .ephemeral_storage
            .saturating_sub(other.ephemeral_storage);
        for (name, value) in &other.scalar {
            let entry = self.scalar.entry(name.clone()).or_insert(0);
            *entry = entry.saturating_sub(*value);
        }
    }

    /// Per-resource maximum.
    pub fn max_with(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.max(other.milli_cpu);
        self.memory = self.memory.max(other.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(other.ephemeral_storage);
        for (name, value) in &other.scalar {
            let entry = self.scalar.entry(name.clone()).or_insert(0);
            *entry = (*entry).max(*value);
        }
    }

    /// True when nothing is requested (kube-scheduler then checks only the pod count).
    pub fn is_zero(&self) -> bool {
        self.milli_cpu == 0
            && self.memory == 0
            && self.ephemeral_storage == 0
            && self.scalar.values().all(|v| *v == 0)
    }
}

/// `status.allocatable["pods"]` of a node (0 when missing, as Kubernetes reads it).
pub fn allowed_pods(
    allocatable: &BTreeMap<String, Quantity>,
    problems: &mut Vec<QuantityError>,
) -> i64 {
    match allocatable.get("pods") {
        None => 0,
        Some(q) => match ParsedQuantity::parse(&q.0) {
            Ok(parsed) => parsed.value(),
            Err(e) => {
                problems.push(e);
                0
            }
        },
    }
}

/// A pod's requests as the scheduler accounts them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRequests {
    /// What NodeResourcesFit's filter and BalancedAllocation use: the real requests.
    pub requests: Resources,
    /// cpu (millicores) with [`DEFAULT_MILLI_CPU_REQUEST`] for each container that has no cpu
    /// request: what LeastAllocated scores (kube-scheduler's "non-zero" requests).
    pub non_zero_milli_cpu: i64,
    /// memory with [`DEFAULT_MEMORY_REQUEST`] for each container without a memory request.
    pub non_zero_memory: i64,
}

fn container_requests(
    container: &Container,
    problems: &mut Vec<QuantityError>,
) -> (Resources, i64, i64) {
    let map = container
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref());
    let requests = map
        .map(|m| Resources::from_map(m, problems))
        .unwrap_or_default();
    // Kubernetes substitutes the default only when the key is missing, not when it is zero.
    let has = |key: &str| map.is_some_and(|m| m.contains_key(key));
    let cpu = if has("cpu") {
        requests.milli_cpu
    } else {
        DEFAULT_MILLI_CPU_REQUEST
    };
    let memory = if has("memory") {
        requests.memory
    } else {
        DEFAULT_MEMORY_REQUEST
    };
    (requests, cpu, memory)
}

/// The pod's effective requests: `max(sum of containers (+ sidecars), max over init containers
/// (each plus the sidecars started before it)) + overhead`, as `resource.PodRequests` computes.
/// Bad quantities are collected in `problems` and count as zero.
pub fn pod_requests(pod: &Pod, problems: &mut Vec<QuantityError>) -> PodRequests {
    let Some(spec) = pod.spec.as_ref() else {
        return PodRequests::default();
    };
    let mut sum = Resources::default();
    let (mut sum_cpu, mut sum_memory) = (0i64, 0i64);
    for container in &spec.containers {
        let (r, cpu, memory) = container_requests(container, problems);
        sum.add(&r);
        sum_cpu = sum_cpu.saturating_add(cpu);
        sum_memory = sum_memory.saturating_add(memory);
    }
    // Sidecars (init containers with restartPolicy Always) keep running: they add to the sum and
    // to every init container that starts after them.
    let mut sidecars = Resources::default();
    let (mut sidecars_cpu, mut sidecars_memory) = (0i64, 0i64);
    let mut init_max = Resources::default();
    let (mut init_max_cpu, mut init_max_memory) = (0i64, 0i64);
    for container in spec.init_containers.iter().flatten() {
        let (mut r, mut cpu, mut memory) = container_requests(container, problems);
        if container.restart_policy.as_deref() == Some("Always") {
            sum.add(&r);
            sum_cpu = sum_cpu.saturating_add(cpu);
            sum_memory = sum_memory.saturating_add(memory);
            sidecars.add(&r);
            sidecars_cpu = sidecars_cpu.saturating_add(cpu);
            sidecars_memory = sidecars_memory.saturating_add(memory);
            r = sidecars.clone();
            cpu = sidecars_cpu;
            memory = sidecars_memory;
        } else {
            r.add(&sidecars);
            cpu = cpu.saturating_add(sidecars_cpu);
            memory = memory.saturating_add(sidecars_memory);
        }
        init_max.max_with(&r);
        init_max_cpu = init_max_cpu.max(cpu);
        init_max_memory = init_max_memory.max(memory);
    }
    sum.max_with(&init_max);
    sum_cpu = sum_cpu.max(init_max_cpu);
    sum_memory = sum_memory.max(init_max_memory);
    if let Some(overhead) = spec.overhead.as_ref() {
        let overhead = Resources::from_map(overhead, problems);
        sum.add(&overhead);
        sum_cpu = sum_cpu.saturating_add(overhead.milli_cpu);
        sum_memory = sum_memory.saturating_add(overhead.memory);
    }
    sum.scalar.retain(|_, v| *v != 0);
    PodRequests {
        requests: sum,
        non_zero_milli_cpu: sum_cpu,
        non_zero_memory: sum_memory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};

    fn container(name: &str, requests: &[(&str, &str)]) -> Container {
        Container {
            name: name.to_string(),
            resources: (!requests.is_empty()).then(|| ResourceRequirements {
                requests: Some(
                    requests
                        .iter()
                        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(containers: Vec<Container>, init: Vec<Container>, overhead: &[(&str, &str)]) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers,
                init_containers: (!init.is_empty()).then_some(init),
                overhead: (!overhead.is_empty()).then(|| {
                    overhead
                        .iter()
                        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                        .collect()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn sums_containers_and_takes_max_of_init_containers_plus_overhead() {
        let p = pod(
            vec![
                container("a", &[("cpu", "100m"), ("memory", "100Mi")]),
                container("b", &[("cpu", "200m"), ("memory", "50Mi")]),
            ],
            vec![
                container("init1", &[("cpu", "500m"), ("memory", "10Mi")]),
                container("init2", &[("cpu", "100m"), ("memory", "300Mi")]),
            ],
            &[("cpu", "10m"), ("memory", "1Mi")],
        );
        let mut problems = Vec::new();
        let r = pod_requests(&p, &mut problems);
        assert!(problems.is_empty());
        // cpu: max(300, 500) + 10; memory: max(150Mi, 300Mi) + 1Mi.
        assert_eq!(r.requests.milli_cpu, 510);
        assert_eq!(r.requests.memory, 301 * 1024 * 1024);
        assert_eq!(r.non_zero_milli_cpu, 510);
    }

    #[test]
    fn sidecars_add_to_the_sum_and_to_later_init_containers() {
        let mut sidecar = container("proxy", &[("cpu", "200m")]);
        sidecar.restart_policy = Some("Always".into());
        let p = pod(
            vec![container("app", &[("cpu", "100m")])],
            vec![
                container("before", &[("cpu", "250m")]),
                sidecar,
                container("after", &[("cpu", "150m")]),
            ],
            &[],
        );
        let r = pod_requests(&p, &mut Vec::new());
        // sum = 100 + 200 = 300; init: max(250, 200, 150 + 200 = 350) = 350.
        assert_eq!(r.requests.milli_cpu, 350);
    }

    #[test]
    fn non_zero_defaults_apply_only_to_missing_requests() {
        let p = pod(
            vec![
                container("none", &[]),
                container("zero-cpu", &[("cpu", "0"), ("memory", "1Gi")]),
            ],
            vec![],
            &[],
        );
        let r = pod_requests(&p, &mut Vec::new());
        assert!(r.requests.milli_cpu == 0 && r.requests.memory == 1 << 30);
        assert_eq!(r.non_zero_milli_cpu, DEFAULT_MILLI_CPU_REQUEST);
        assert_eq!(r.non_zero_memory, DEFAULT_MEMORY_REQUEST + (1 << 30));
    }

    #[test]
    fn extended_resources_and_bad_quantities() {
        let p = pod(
            vec![container(
                "gpu",
                &[("nvidia.com/gpu", "2"), ("cpu", "lots")],
            )],
            vec![],
            &[],
        );
        let mut problems = Vec::new();
        let r = pod_requests(&p, &mut problems);
        assert_eq!(r.requests.scalar.get("nvidia.com/gpu"), Some(&2));
        assert_eq!(r.requests.milli_cpu, 0);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].to_string().contains("resource cpu"),
            "{}",
            problems[0]
        );
    }
}
