//! `meta.k8s.io/v1` Table output for `kubectl get`, with the columns kubectl users know.

use serde_json::{Value, json};

use crate::registry::ResourceInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> IncludeObject {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Kubernetes' `duration.HumanDuration`, which kubectl users read in the AGE column.
pub fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        let s = secs % 60;
        if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{s}s")
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        let mm = m % 60;
        if mm == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{mm}m")
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        let hh = h % 24;
        if hh == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{hh}h")
        }
    } else if h < 24 * 365 * 2 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

fn age(obj: &Value, now: chrono::DateTime<chrono::Utc>) -> String {
    obj.pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| human_duration((now - t.with_timezone(&chrono::Utc)).num_seconds()))
        .unwrap_or_else(|| "<unknown>".to_string())
}

fn s<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn i(obj: &Value, ptr: &str) -> i64 {
    obj.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(v: &str) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v.into()
    }
}

fn selector_text(map: Option<&Value>) -> String {
    match map.and_then(Value::as_object) {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(","),
        _ => "<none>".into(),
    }
}

type Column = (&'static str, &'static str, i64);

/// `name1,name2` / `image1,image2` of the containers of the pod spec at `ptr`, as the
/// CONTAINERS and IMAGES columns show them.
fn containers_field(obj: &Value, ptr: &str, field: &str) -> String {
    obj.pointer(ptr)
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| s(c, field).to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// A `metav1.LabelSelector` as kubectl prints it (`app=web,tier in (a,b)`), `<none>` if empty.
fn label_selector_text(sel: Option<&Value>) -> String {
    let Some(sel) = sel else {
        return "<none>".into();
    };
    let mut parts: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = s(e, "/key");
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(match s(e, "/operator") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other}"),
        });
    }
    if parts.is_empty() {
        "<none>".into()
    } else {
        parts.join(",")
    }
}

/// The ROLES column: `node-role.kubernetes.io/<role>` labels (and `kubernetes.io/role`).
fn node_roles(obj: &Value) -> String {
    let mut roles: Vec<String> = Vec::new();
    for (k, v) in obj
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
            if !role.is_empty() {
                roles.push(role.to_string());
            }
        } else if k == "kubernetes.io/role"
            && let Some(role) = v.as_str()
            && !role.is_empty()
        {
            roles.push(role.to_string());
        }
    }
    roles.sort();
    roles.dedup();
    if roles.is_empty() {
        "<none>".into()
    } else {
        roles.join(",")
    }
}

fn node_address(obj: &Value, ty: &str) -> String {
    obj.pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|x| s(x, "/type") == ty))
        .map(|x| s(x, "/address").to_string())
        .unwrap_or_else(|| "<none>".into())
}

fn columns(info: &ResourceInfo) -> Vec<Column> {
    match (info.group, info.kind) {
        ("", "Pod") => vec![
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        ("", "Service") => vec![
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            ("Age", "string", 0),
            ("Selector", "string", 1),
        ],
        ("", "Namespace") => vec![
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Age", "string", 0),
        ],
        ("", "Node") => vec![
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        ("", "ServiceAccount") => vec![
            ("Name", "string", 0),
            ("Secrets", "string", 0),
            ("Age", "string", 0),
        ],
        ("autoscaling", "HorizontalPodAutoscaler") => vec![
            ("Name", "string", 0),
            ("Reference", "string", 0),
            ("Targets", "string", 0),
            ("MinPods", "string", 0),
            ("MaxPods", "string", 0),
            ("Replicas", "string", 0),
            ("Age", "string", 0),
        ],
        ("networking.k8s.io", "NetworkPolicy") => vec![
            ("Name", "string", 0),
            ("Pod-Selector", "string", 0),
            ("Age", "string", 0),
        ],
        ("discovery.k8s.io", "EndpointSlice") => vec![
            ("Name", "string", 0),
            ("AddressType", "string", 0),
            ("Ports", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        ("", "ConfigMap") => vec![
            ("Name", "string", 0),
            ("Data", "integer", 0),
            ("Age", "string", 0),
        ],
        ("", "Secret") => vec![
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Data", "integer", 0),
            ("Age", "string", 0),
        ],
        ("apps", "Deployment") => vec![
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("apps", "ReplicaSet") => vec![
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("batch", "Job") => vec![
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Completions", "string", 0),
            ("Duration", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("batch", "CronJob") => vec![
            ("Name", "string", 0),
            ("Schedule", "string", 0),
            ("Timezone", "string", 0),
            ("Suspend", "boolean", 0),
            ("Active", "integer", 0),
            ("Last Schedule", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("apps", "DaemonSet") => vec![
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Node Selector", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        ("apps", "StatefulSet") => vec![
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
        ],
        ("", "Event") => vec![
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        ("", "Endpoints") => vec![
            ("Name", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        ("coordination.k8s.io", "Lease") => vec![
            ("Name", "string", 0),
            ("Holder", "string", 0),
            ("Age", "string", 0),
        ],
        _ => vec![("Name", "string", 0), ("Age", "string", 0)],
    }
}

/// The TARGETS column of an HPA: `cpu: 40%/80%` per resource metric (`<unknown>` before the
/// first measurement).
fn hpa_targets(obj: &Value) -> String {
    let current = obj
        .pointer("/status/currentMetrics")
        .and_then(Value::as_array);
    let mut out = Vec::new();
    for (idx, m) in obj
        .pointer("/spec/metrics")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if s(m, "/type") != "Resource" {
            out.push("<unknown>/<unknown>".to_string());
            continue;
        }
        let resource = s(m, "/resource/name");
        let target = match m
            .pointer("/resource/target/averageUtilization")
            .and_then(Value::as_i64)
        {
            Some(p) => format!("{p}%"),
            None => or_none(s(m, "/resource/target/averageValue")),
        };
        let now = current
            .and_then(|c| c.get(idx))
            .and_then(|c| {
                c.pointer("/resource/current/averageUtilization")
                    .and_then(Value::as_i64)
                    .map(|p| format!("{p}%"))
                    .or_else(|| {
                        c.pointer("/resource/current/averageValue")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
            })
            .unwrap_or_else(|| "<unknown>".into());
        out.push(format!("{resource}: {now}/{target}"));
    }
    if out.is_empty() {
        "<none>".into()
    } else {
        out.join(", ")
    }
}

fn since(obj: &Value, ptr: &str, now: chrono::DateTime<chrono::Utc>) -> String {
    obj.pointer(ptr)
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| human_duration((now - t.with_timezone(&chrono::Utc)).num_seconds()))
        .unwrap_or_else(|| "<none>".to_string())
}

/// kubectl's pod STATUS: the pod's reason or phase, overridden by init containers still at
/// work (`Init:1/2`, `Init:CrashLoopBackOff`), then by the last container that is waiting or
/// terminated (`CrashLoopBackOff`, `Completed`, `ExitCode:1`), then by `Terminating`.
fn pod_status(obj: &Value) -> String {
    let mut reason = match s(obj, "/status/reason") {
        "" => match s(obj, "/status/phase") {
            "" => "Pending".to_string(),
            phase => phase.to_string(),
        },
        r => r.to_string(),
    };
    let exit_text = |c: &Value, prefix: &str| -> Option<String> {
        let t = c.pointer("/state/terminated")?;
        Some(match s(t, "/reason") {
            "" => match t.get("signal").and_then(Value::as_i64).filter(|n| *n != 0) {
                Some(sig) => format!("{prefix}Signal:{sig}"),
                None => format!("{prefix}ExitCode:{}", i(t, "/exitCode")),
            },
            r => format!("{prefix}{r}"),
        })
    };
    let inits = obj
        .pointer("/status/initContainerStatuses")
        .and_then(Value::as_array);
    let init_total = obj
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let mut initializing = false;
    for (n, c) in inits.into_iter().flatten().enumerate() {
        if c.pointer("/state/terminated").is_some() && i(c, "/state/terminated/exitCode") == 0 {
            continue;
        }
        initializing = true;
        reason = if let Some(text) = exit_text(c, "Init:") {
            text
        } else {
            match s(c, "/state/waiting/reason") {
                "" | "PodInitializing" => format!("Init:{n}/{init_total}"),
                w => format!("Init:{w}"),
            }
        };
        break;
    }
    if !initializing {
        let mut running_and_ready = false;
        let statuses = obj
            .pointer("/status/containerStatuses")
            .and_then(Value::as_array);
        // kubectl walks the containers from the last one, so the first container's state wins.
        for c in statuses.into_iter().flatten().rev() {
            let waiting = s(c, "/state/waiting/reason");
            if !waiting.is_empty() {
                reason = waiting.to_string();
            } else if let Some(text) = exit_text(c, "") {
                reason = text;
            } else if c.pointer("/state/running").is_some()
                && c.get("ready").and_then(Value::as_bool) == Some(true)
            {
                running_and_ready = true;
            }
        }
        // A pod whose restarted container is running again is Running, not Completed.
        if reason == "Completed" && running_and_ready {
            reason = "Running".into();
        }
    }
    if obj
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        return if s(obj, "/status/reason") == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    reason
}

fn cells(info: &ResourceInfo, obj: &Value, now: chrono::DateTime<chrono::Utc>) -> Vec<Value> {
    let name = json!(s(obj, "/metadata/name"));
    let age = json!(age(obj, now));
    match (info.group, info.kind) {
        ("", "Pod") => {
            let total = obj
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array);
            let ready = statuses.map_or(0, |cs| {
                cs.iter()
                    .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                    .count()
            });
            let restarts: i64 =
                statuses.map_or(0, |cs| cs.iter().map(|c| i(c, "/restartCount")).sum());
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(obj)),
                json!(restarts.to_string()),
                age,
                json!(or_none(s(obj, "/status/podIP"))),
                json!(or_none(s(obj, "/spec/nodeName"))),
                json!(or_none(s(obj, "/status/nominatedNodeName"))),
                json!("<none>"),
            ]
        }
        ("", "Service") => {
            let ty = s(obj, "/spec/type");
            let ports: Vec<String> = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                            let port = i(p, "/port");
                            match p.get("nodePort").and_then(Value::as_i64) {
                                Some(np) => format!("{port}:{np}/{proto}"),
                                None => format!("{port}/{proto}"),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let external = match ty {
                "ExternalName" => s(obj, "/spec/externalName").to_string(),
                "LoadBalancer" => {
                    let ips: Vec<String> = obj
                        .pointer("/status/loadBalancer/ingress")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().map(|x| s(x, "/ip").to_string()).collect())
                        .unwrap_or_default();
                    if ips.is_empty() {
                        "<pending>".into()
                    } else {
                        ips.join(",")
                    }
                }
                _ => "<none>".into(),
            };
            vec![
                name,
                json!(ty),
                json!(or_none(s(obj, "/spec/clusterIP"))),
                json!(external),
                json!(if ports.is_empty() {
                    "<none>".to_string()
                } else {
                    ports.join(",")
                }),
                age,
                json!(selector_text(obj.pointer("/spec/selector"))),
            ]
        }
        ("", "Namespace") => vec![name, json!(s(obj, "/status/phase")), age],
        ("", "Node") => {
            let ready = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| s(c, "/type") == "Ready"))
                .map(|c| s(c, "/status") == "True");
            let mut status = match ready {
                Some(true) => "Ready",
                Some(false) => "NotReady",
                None => "Unknown",
            }
            .to_string();
            if obj.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            vec![
                name,
                json!(status),
                json!(node_roles(obj)),
                age,
                json!(s(obj, "/status/nodeInfo/kubeletVersion")),
                json!(node_address(obj, "InternalIP")),
                json!(node_address(obj, "ExternalIP")),
                json!(or_none(s(obj, "/status/nodeInfo/osImage"))),
                json!(or_none(s(obj, "/status/nodeInfo/kernelVersion"))),
                json!(or_none(s(obj, "/status/nodeInfo/containerRuntimeVersion"))),
            ]
        }
        ("", "ConfigMap") => {
            let n = obj
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len())
                + obj
                    .get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len());
            vec![name, json!(n), age]
        }
        ("", "Secret") => {
            let n = obj
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
            vec![name, json!(s(obj, "/type")), json!(n), age]
        }
        ("apps", "Deployment") => {
            let containers = obj
                .pointer("/spec/template/spec/containers")
                .and_then(Value::as_array);
            let join = |field: &str| {
                containers
                    .map(|cs| {
                        cs.iter()
                            .map(|c| s(c, field).to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default()
            };
            let sel = obj.pointer("/spec/selector/matchLabels");
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(obj, "/status/readyReplicas"),
                    i(obj, "/spec/replicas")
                )),
                json!(i(obj, "/status/updatedReplicas")),
                json!(i(obj, "/status/availableReplicas")),
                age,
                json!(join("/name")),
                json!(join("/image")),
                json!(selector_text(sel)),
            ]
        }
        ("apps", "ReplicaSet") => vec![
            name,
            json!(i(obj, "/spec/replicas")),
            json!(i(obj, "/status/replicas")),
            json!(i(obj, "/status/readyReplicas")),
            age,
            json!(containers_field(
                obj,
                "/spec/template/spec/containers",
                "/name"
            )),
            json!(containers_field(
                obj,
                "/spec/template/spec/containers",
                "/image"
            )),
            json!(label_selector_text(obj.pointer("/spec/selector"))),
        ],
        ("batch", "Job") => {
            let conditions = obj.pointer("/status/conditions").and_then(Value::as_array);
            let has = |ty: &str| {
                conditions.is_some_and(|cs| {
                    cs.iter()
                        .any(|c| s(c, "/type") == ty && s(c, "/status") == "True")
                })
            };
            let status = if has("Complete") {
                "Complete"
            } else if has("Failed") {
                "Failed"
            } else if obj.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true) {
                "Suspended"
            } else {
                "Running"
            };
            let duration = match (
                obj.pointer("/status/startTime")
                    .and_then(Value::as_str)
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
                obj.pointer("/status/completionTime")
                    .and_then(Value::as_str)
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
            ) {
                (Some(start), Some(end)) => human_duration((end - start).num_seconds()),
                (Some(start), None) => {
                    human_duration((now - start.with_timezone(&chrono::Utc)).num_seconds())
                }
                _ => String::new(),
            };
            let containers = obj
                .pointer("/spec/template/spec/containers")
                .and_then(Value::as_array);
            let join = |field: &str| {
                containers
                    .map(|cs| {
                        cs.iter()
                            .map(|c| s(c, field).to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default()
            };
            vec![
                name,
                json!(status),
                json!(format!(
                    "{}/{}",
                    i(obj, "/status/succeeded"),
                    obj.pointer("/spec/completions")
                        .and_then(Value::as_i64)
                        .unwrap_or(1)
                )),
                json!(duration),
                age,
                json!(join("/name")),
                json!(join("/image")),
                json!(label_selector_text(obj.pointer("/spec/selector"))),
            ]
        }
        ("batch", "CronJob") => vec![
            name,
            json!(s(obj, "/spec/schedule")),
            json!(or_none(s(obj, "/spec/timeZone"))),
            json!(
                obj.pointer("/spec/suspend")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
            ),
            json!(
                obj.pointer("/status/active")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
            ),
            json!(since(obj, "/status/lastScheduleTime", now)),
            age,
            json!(containers_field(
                obj,
                "/spec/jobTemplate/spec/template/spec/containers",
                "/name"
            )),
            json!(containers_field(
                obj,
                "/spec/jobTemplate/spec/template/spec/containers",
                "/image"
            )),
            json!(label_selector_text(
                obj.pointer("/spec/jobTemplate/spec/selector")
            )),
        ],
        ("apps", "DaemonSet") => vec![
            name,
            json!(i(obj, "/status/desiredNumberScheduled")),
            json!(i(obj, "/status/currentNumberScheduled")),
            json!(i(obj, "/status/numberReady")),
            json!(i(obj, "/status/updatedNumberScheduled")),
            json!(i(obj, "/status/numberAvailable")),
            json!(selector_text(
                obj.pointer("/spec/template/spec/nodeSelector")
            )),
            age,
            json!(containers_field(
                obj,
                "/spec/template/spec/containers",
                "/name"
            )),
            json!(containers_field(
                obj,
                "/spec/template/spec/containers",
                "/image"
            )),
            json!(label_selector_text(obj.pointer("/spec/selector"))),
        ],
        ("apps", "StatefulSet") => vec![
            name,
            json!(format!(
                "{}/{}",
                i(obj, "/status/readyReplicas"),
                i(obj, "/spec/replicas")
            )),
            age,
            json!(containers_field(
                obj,
                "/spec/template/spec/containers",
                "/name"
            )),
            json!(containers_field(
                obj,
                "/spec/template/spec/containers",
                "/image"
            )),
        ],
        ("", "Event") => {
            let last = [
                "/lastTimestamp",
                "/eventTime",
                "/metadata/creationTimestamp",
            ]
            .into_iter()
            .find(|p| obj.pointer(p).and_then(Value::as_str).is_some())
            .map(|p| since(obj, p, now))
            .unwrap_or_else(|| "<unknown>".into());
            let kind = s(obj, "/involvedObject/kind").to_ascii_lowercase();
            vec![
                json!(last),
                json!(s(obj, "/type")),
                json!(s(obj, "/reason")),
                json!(format!("{kind}/{}", s(obj, "/involvedObject/name"))),
                json!(s(obj, "/message")),
            ]
        }
        ("", "Endpoints") => {
            let mut eps = Vec::new();
            for subset in obj
                .get("subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let ports: Vec<i64> = subset
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|p| i(p, "/port"))
                    .collect();
                for a in subset
                    .get("addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let ip = s(a, "/ip");
                    if ports.is_empty() {
                        eps.push(ip.to_string());
                    }
                    for p in &ports {
                        eps.push(format!("{ip}:{p}"));
                    }
                }
            }
            vec![
                name,
                json!(if eps.is_empty() {
                    "<none>".to_string()
                } else {
                    eps.join(",")
                }),
                age,
            ]
        }
        ("coordination.k8s.io", "Lease") => vec![name, json!(s(obj, "/spec/holderIdentity")), age],
        ("", "ServiceAccount") => vec![
            name,
            json!(
                obj.get("secrets")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)
                    .to_string()
            ),
            age,
        ],
        ("autoscaling", "HorizontalPodAutoscaler") => {
            let reference = format!(
                "{}/{}",
                s(obj, "/spec/scaleTargetRef/kind"),
                s(obj, "/spec/scaleTargetRef/name")
            );
            let min = obj
                .pointer("/spec/minReplicas")
                .and_then(Value::as_i64)
                .map_or("<unset>".to_string(), |n| n.to_string());
            vec![
                name,
                json!(reference),
                json!(hpa_targets(obj)),
                json!(min),
                json!(i(obj, "/spec/maxReplicas").to_string()),
                json!(i(obj, "/status/currentReplicas").to_string()),
                age,
            ]
        }
        ("networking.k8s.io", "NetworkPolicy") => vec![
            name,
            json!(label_selector_text(obj.pointer("/spec/podSelector"))),
            age,
        ],
        ("discovery.k8s.io", "EndpointSlice") => {
            let ports: Vec<String> = obj
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("port").and_then(Value::as_i64))
                .map(|p| p.to_string())
                .collect();
            let addresses: Vec<String> = obj
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| {
                    e.get("addresses")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                })
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            // kubectl shows at most three endpoints and "+ N more...".
            let shown = if addresses.len() > 3 {
                format!(
                    "{} + {} more...",
                    addresses[..3].join(","),
                    addresses.len() - 3
                )
            } else if addresses.is_empty() {
                "<unset>".to_string()
            } else {
                addresses.join(",")
            };
            vec![
                name,
                json!(s(obj, "/addressType")),
                json!(if ports.is_empty() {
                    "<unset>".to_string()
                } else {
                    ports.join(",")
                }),
                json!(shown),
                age,
            ]
        }
        _ => vec![name, age],
    }
}

fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

pub fn to_table(
    info: &ResourceInfo,
    objects: &[Value],
    include: IncludeObject,
    resource_version: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Value {
    let defs: Vec<Value> = columns(info)
        .into_iter()
        .map(|(name, ty, priority)| {
            json!({
                "name": name, "type": ty, "format": if name == "Name" { "name" } else { "" },
                "description": "", "priority": priority,
            })
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(info, o, now)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial_metadata(o),
                IncludeObject::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 3 + 60 * 5), "3h5m");
        assert_eq!(human_duration(86400 * 3), "3d");
        assert_eq!(human_duration(-5), "0s");
    }

    #[test]
    fn pod_rows_show_ready_status_restarts_and_wide_columns() {
        let info = registry::find("", "v1", "pods").expect("pods");
        let pod = json!({
            "metadata": {"name": "web-1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "10.1.0.5", "containerStatuses": [
                {"ready": true, "restartCount": 2, "state": {"running": {}}},
                {"ready": false, "restartCount": 1, "state": {"running": {}}}]},
        });
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:30Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        let t = to_table(info, &[pod], IncludeObject::Metadata, "7", now);
        assert_eq!(t["kind"], "Table");
        assert_eq!(t["metadata"]["resourceVersion"], "7");
        let cells = &t["rows"][0]["cells"];
        assert_eq!(
            cells,
            &json!([
                "web-1", "1/2", "Running", "3", "30s", "10.1.0.5", "n1", "<none>", "<none>"
            ])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let wide: Vec<bool> = t["columnDefinitions"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| c["priority"].as_i64() == Some(1))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            wide,
            vec![false, false, false, false, false, true, true, true, true]
        );
    }
}
