//! Resource metrics: every [`INTERVAL`] the agent reads the CPU and memory use of each of its
//! pods' containers from their cgroups and stores them as `metrics.k8s.io/v1beta1` PodMetrics
//! (and the node's total as NodeMetrics) through the apiserver, where the HPA controller and
//! `kubectl top` read them, as metrics-server would serve them.
//!
//! Containers live in `<cgroup root>/skiff/<node>/pod<uid>/<uid>_<name>_<attempt>` (the pod's
//! cgroup parent from `pods::build_request`, the runtime's container id below it). CPU is the
//! rate of `cpuacct.usage` (cgroup v1, nanoseconds) or `cpu.stat usage_usec` (v2) between two
//! samples; memory is the working set (usage minus inactive file pages), as the kubelet reports.
//! A container needs two samples before it has a CPU rate, so its pod's first PodMetrics comes
//! one interval after it started. Each PodMetrics is owned by its Pod (ownerReference), so the
//! garbage collector removes it with the pod.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, warn};

/// How often samples are taken and posted (metrics-server's default resolution).
pub const INTERVAL: Duration = Duration::from_secs(15);
const FIELD_MANAGER: &str = "skiff-agent-metrics";

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "metrics.k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "metrics.k8s.io/v1beta1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The cgroup roots where a relative cgroup path may live, for one v1 controller (with its
/// mount names as Debian mounts them) and cgroup v2 (hybrid `unified`, or the root itself).
fn candidates(v1_controllers: &[&str], rel: &str) -> Vec<(PathBuf, bool)> {
    let mut out: Vec<(PathBuf, bool)> = v1_controllers
        .iter()
        .map(|c| (Path::new("/sys/fs/cgroup").join(c).join(rel), true))
        .collect();
    out.push((Path::new("/sys/fs/cgroup/unified").join(rel), false));
    out.push((Path::new("/sys/fs/cgroup").join(rel), false));
    out
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_field(path: &Path, field: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == field).then(|| v.trim().parse().ok())?
    })
}

/// Cumulative CPU time of a cgroup, nanoseconds.
fn cpu_nanos(rel: &str) -> Option<u64> {
    for (dir, v1) in candidates(&["cpu,cpuacct", "cpuacct", "cpuacct,cpu"], rel) {
        if v1 {
            if let Some(n) = read_u64(&dir.join("cpuacct.usage")) {
                return Some(n);
            }
        } else if let Some(us) = stat_field(&dir.join("cpu.stat"), "usage_usec") {
            return Some(us.saturating_mul(1000));
        }
    }
    None
}

/// Working set of a cgroup, bytes.
fn memory_working_set(rel: &str) -> Option<u64> {
    for (dir, v1) in candidates(&["memory"], rel) {
        if v1 {
            if let Some(usage) = read_u64(&dir.join("memory.usage_in_bytes")) {
                let inactive = stat_field(&dir.join("memory.stat"), "total_inactive_file").unwrap_or(0);
                return Some(usage.saturating_sub(inactive));
            }
        } else if let Some(usage) = read_u64(&dir.join("memory.current")) {
            let inactive = stat_field(&dir.join("memory.stat"), "inactive_file").unwrap_or(0);
            return Some(usage.saturating_sub(inactive));
        }
    }
    None
}

/// Container cgroup directory names under a pod's cgroup (any hierarchy that has them).
fn container_dirs(pod_rel: &str) -> Vec<String> {
    for (dir, _) in candidates(&["cpu,cpuacct", "cpuacct", "memory"], pod_rel) {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            let names: Vec<String> = rd
                .flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            if !names.is_empty() {
                return names;
            }
        }
    }
    Vec::new()
}

/// The Kubernetes container name of a container cgroup directory: the runtime's id, either the
/// agent's own `<uid>_<name>_<attempt>` or the runc adapter's `<uid[..8]>-<name>-<attempt>-<hash>`.
/// `names` are the pod's container names (a name may itself contain `-` or `_`, so each is tried).
fn container_name<'a>(dir: &str, uid: &str, names: &'a [String]) -> Option<&'a str> {
    let short: String = uid.chars().take(8).collect();
    names.iter().map(String::as_str).find(|name| {
        let agent_form = dir
            .strip_prefix(uid)
            .and_then(|r| r.strip_prefix('_'))
            .and_then(|r| r.strip_prefix(*name))
            .and_then(|r| r.strip_prefix('_'))
            .is_some_and(|attempt| !attempt.is_empty() && attempt.bytes().all(|b| b.is_ascii_digit()));
        let runc_form = dir
            .strip_prefix(short.as_str())
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_prefix(*name))
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split_once('-'))
            .is_some_and(|(attempt, hash)| {
                !attempt.is_empty()
                    && attempt.bytes().all(|b| b.is_ascii_digit())
                    && !hash.is_empty()
                    && hash.bytes().all(|b| b.is_ascii_hexdigit())
            });
        agent_form || runc_form
    })
}

/// The CPU rate in nanocores from two cumulative readings.
fn rate(previous: Option<&(Instant, u64)>, now: Instant, nanos: u64) -> Option<u64> {
    let (then, before) = previous?;
    let elapsed = now.checked_duration_since(*then)?.as_secs_f64();
    if elapsed <= 0.0 || nanos < *before {
        return None;
    }
    Some(((nanos - before) as f64 / elapsed) as u64)
}

fn rfc3339_now() -> String {
    let t = Timestamp::now();
    Timestamp::from_second(t.as_second()).unwrap_or(t).to_string()
}

/// Samples this node's pods every [`INTERVAL`] and posts their metrics until `shutdown` flips.
pub async fn metrics_loop(client: Client, node: String, mut shutdown: watch::Receiver<bool>) {
    let pods_api: Api<Pod> = Api::all(client.clone());
    let node_api: Api<DynamicObject> = Api::all_with(client.clone(), &resource("NodeMetrics", "nodes"));
    // Previous cumulative CPU reading per cgroup path.
    let mut last: HashMap<String, (Instant, u64)> = HashMap::new();
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let now = Instant::now();
        let window = format!("{}s", INTERVAL.as_secs());
        let timestamp = rfc3339_now();
        let pods = match pods_api
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
        {
            Ok(l) => l.items,
            Err(e) => {
                warn!("metrics: listing this node's pods failed: {e}");
                continue;
            }
        };
        let mut seen: HashMap<String, (Instant, u64)> = HashMap::new();
        for pod in &pods {
            let (Some(uid), Some(name), Some(ns)) = (
                pod.metadata.uid.as_deref(),
                pod.metadata.name.as_deref(),
                pod.metadata.namespace.as_deref(),
            ) else {
                continue;
            };
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let pod_rel = format!("skiff/{node}/pod{uid}");
            let names: Vec<String> = pod.spec.iter().flat_map(|s| s.containers.iter().map(|c| c.name.clone())).collect();
            let mut containers = Vec::new();
            let mut complete = true;
            for dir in container_dirs(&pod_rel) {
                let Some(cname) = container_name(&dir, uid, &names) else { continue };
                let rel = format!("{pod_rel}/{dir}");
                let Some(nanos) = cpu_nanos(&rel) else { continue };
                let cpu = rate(last.get(&rel), now, nanos);
                seen.insert(rel.clone(), (now, nanos));
                let Some(cpu) = cpu else {
                    complete = false;
                    continue;
                };
                let memory = memory_working_set(&rel).unwrap_or(0);
                containers.push(json!({
                    "name": cname,
                    "usage": {"cpu": format!("{cpu}n"), "memory": format!("{}Ki", memory / 1024)},
                }));
            }
            if containers.is_empty() || !complete {
                continue;
            }
            let obj = json!({
                "apiVersion": "metrics.k8s.io/v1beta1", "kind": "PodMetrics",
                "metadata": {
                    "name": name, "namespace": ns,
                    "labels": pod.metadata.labels.clone().unwrap_or_default(),
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}],
                },
                "timestamp": timestamp, "window": window, "containers": containers,
            });
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource("PodMetrics", "pods"));
            if let Err(e) = api
                .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj))
                .await
            {
                debug!(pod = %name, "metrics: posting PodMetrics failed: {e}");
            }
        }
        // The node: everything under its cgroup (its pods and its own host processes).
        let node_rel = format!("skiff/{node}");
        if let Some(nanos) = cpu_nanos(&node_rel) {
            let cpu = rate(last.get(&node_rel), now, nanos);
            seen.insert(node_rel.clone(), (now, nanos));
            if let Some(cpu) = cpu {
                let memory = memory_working_set(&node_rel).unwrap_or(0);
                let obj = json!({
                    "apiVersion": "metrics.k8s.io/v1beta1", "kind": "NodeMetrics",
                    "metadata": {"name": node},
                    "timestamp": timestamp, "window": window,
                    "usage": {"cpu": format!("{cpu}n"), "memory": format!("{}Ki", memory / 1024)},
                });
                if let Err(e) = node_api
                    .patch(&node, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj))
                    .await
                {
                    debug!("metrics: posting NodeMetrics failed: {e}");
                }
            }
        }
        // Readings of cgroups that are gone are dropped.
        last = seen;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn container_names_come_from_runtime_ids() {
        let names = vec!["web".to_string(), "side_car".to_string(), "web-x".to_string()];
        assert_eq!(container_name("u1_web_0", "u1", &names), Some("web"));
        assert_eq!(container_name("u1_side_car_12", "u1", &names), Some("side_car"));
        assert_eq!(container_name("u2_web_0", "u1", &names), None);
        assert_eq!(container_name("u1_web", "u1", &names), None);
        // The runc adapter's ids, as seen on a skiff up node.
        let uid = "41907d8c-4d1a-4294-a42b-188f9ba96f40";
        assert_eq!(container_name("41907d8c-web-0-2e092fa3", uid, &names), Some("web"));
        assert_eq!(container_name("41907d8c-web-x-3-2e092fa3", uid, &names), Some("web-x"));
        assert_eq!(container_name("41907d8c-other-0-2e092fa3", uid, &names), None);
        assert_eq!(container_name("deadbeef-web-0-2e092fa3", uid, &names), None);
    }

    #[test]
    fn cpu_rate_needs_two_increasing_readings() {
        let t0 = Instant::now();
        assert_eq!(rate(None, t0, 5), None);
        let t1 = t0 + Duration::from_secs(2);
        // 1 s of CPU over 2 s: half a core.
        assert_eq!(rate(Some(&(t0, 0)), t1, 1_000_000_000), Some(500_000_000));
        assert_eq!(rate(Some(&(t0, 10)), t1, 5), None, "a counter that went back");
    }

    #[test]
    fn stat_fields_parse() {
        let dir = std::env::temp_dir().join(format!("skiff-metrics-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cpu.stat");
        std::fs::write(&f, "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n").unwrap();
        assert_eq!(stat_field(&f, "usage_usec"), Some(1234));
        assert_eq!(stat_field(&f, "nope"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
