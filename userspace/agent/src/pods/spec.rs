//! From a pod's spec to what the runtime runs: environment (env, envFrom, field and key
//! references), volumes made on the node (emptyDir, configMap, secret, hostPath, projected,
//! downwardAPI), mounts, limits. The resolution is pure over the ConfigMaps and Secrets it is
//! given (`Sources`); `materialize_volumes` writes files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret, Volume};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::runtime::{ContainerRequest, ImageInfo, Mount};

/// The ConfigMaps and Secrets of the pod's namespace that its spec refers to, by name.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("configmap {0:?} not found")]
    ConfigMapMissing(String),
    #[error("secret {0:?} not found")]
    SecretMissing(String),
    #[error("key {key:?} not found in {kind} {name:?}")]
    KeyMissing { kind: &'static str, name: String, key: String },
    #[error("unsupported field reference {0:?}")]
    FieldRef(String),
    #[error("volume {0:?}: {1}")]
    Volume(String, String),
    #[error("bad quantity {0:?}")]
    Quantity(String),
}

/// Names of the ConfigMaps and Secrets the pod refers to (to fetch before `resolve_env`).
pub fn referenced_sources(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let mut cms = Vec::new();
    let mut secrets = Vec::new();
    let Some(spec) = pod.spec.as_ref() else { return (cms, secrets) };
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        for e in c.env.iter().flatten() {
            if let Some(vf) = &e.value_from {
                if let Some(r) = &vf.config_map_key_ref { cms.push(r.name.clone()); }
                if let Some(r) = &vf.secret_key_ref { secrets.push(r.name.clone()); }
            }
        }
        for ef in c.env_from.iter().flatten() {
            if let Some(r) = &ef.config_map_ref { cms.push(r.name.clone()); }
            if let Some(r) = &ef.secret_ref { secrets.push(r.name.clone()); }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map { cms.push(cm.name.clone()); }
        if let Some(s) = &v.secret { secrets.extend(s.secret_name.clone()); }
        for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &src.config_map { cms.push(cm.name.clone()); }
            if let Some(s) = &src.secret { secrets.push(s.name.clone()); }
        }
    }
    cms.sort();
    cms.dedup();
    secrets.sort();
    secrets.dedup();
    (cms, secrets)
}

fn cm_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm.data.clone().unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
    for (k, v) in cm.binary_data.clone().unwrap_or_default() {
        out.insert(k, v.0);
    }
    out
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s.data.clone().unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    for (k, v) in s.string_data.clone().unwrap_or_default() {
        out.insert(k, v.into_bytes());
    }
    out
}

/// The value of a `fieldRef` (the downward API).
pub fn field_value(pod: &Pod, path: &str, pod_ip: &str, host_ip: &str) -> Result<String, SpecError> {
    let m = &pod.metadata;
    let spec = pod.spec.clone().unwrap_or_default();
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.node_name.unwrap_or_default(),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        p => {
            if let Some(key) = p.strip_prefix("metadata.labels['").and_then(|r| r.strip_suffix("']")) {
                m.labels.clone().unwrap_or_default().get(key).cloned().unwrap_or_default()
            } else if let Some(key) = p.strip_prefix("metadata.annotations['").and_then(|r| r.strip_suffix("']")) {
                m.annotations.clone().unwrap_or_default().get(key).cloned().unwrap_or_default()
            } else {
                return Err(SpecError::FieldRef(p.to_string()));
            }
        }
    })
}

/// Expands `$(VAR)` references against the variables defined so far (Kubernetes' rule:
/// `$$(VAR)` escapes, an unknown reference stays as written).
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment, in Kubernetes' order: image env, then envFrom, then env.
pub fn resolve_env(pod: &Pod, c: &Container, image: &ImageInfo, src: &Sources, pod_ip: &str, host_ip: &str) -> Result<Vec<(String, String)>, SpecError> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut set = |vars: &mut BTreeMap<String, String>, k: String, v: String| {
        if !vars.contains_key(&k) {
            order.push(k.clone());
        }
        vars.insert(k, v);
    };
    for (k, v) in &image.env {
        set(&mut vars, k.clone(), v.clone());
    }
    for ef in c.env_from.iter().flatten() {
        let prefix = ef.prefix.clone().unwrap_or_default();
        if let Some(r) = &ef.config_map_ref {
            match src.config_maps.get(&r.name) {
                Some(cm) => {
                    for (k, v) in cm_data(cm) {
                        set(&mut vars, format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(SpecError::ConfigMapMissing(r.name.clone())),
            }
        }
        if let Some(r) = &ef.secret_ref {
            match src.secrets.get(&r.name) {
                Some(s) => {
                    for (k, v) in secret_data(s) {
                        set(&mut vars, format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(SpecError::SecretMissing(r.name.clone())),
            }
        }
    }
    for EnvVar { name, value, value_from } in c.env.iter().flatten() {
        let v = if let Some(v) = value {
            expand(v, &vars)
        } else if let Some(vf) = value_from {
            if let Some(f) = &vf.field_ref {
                field_value(pod, &f.field_path, pod_ip, host_ip)?
            } else if let Some(r) = &vf.config_map_key_ref {
                match src.config_maps.get(&r.name).map(cm_data) {
                    Some(d) => match d.get(&r.key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if r.optional == Some(true) => continue,
                        None => return Err(SpecError::KeyMissing { kind: "configmap", name: r.name.clone(), key: r.key.clone() }),
                    },
                    None if r.optional == Some(true) => continue,
                    None => return Err(SpecError::ConfigMapMissing(r.name.clone())),
                }
            } else if let Some(r) = &vf.secret_key_ref {
                match src.secrets.get(&r.name).map(secret_data) {
                    Some(d) => match d.get(&r.key) {
                        Some(v) => String::from_utf8_lossy(v).into_owned(),
                        None if r.optional == Some(true) => continue,
                        None => return Err(SpecError::KeyMissing { kind: "secret", name: r.name.clone(), key: r.key.clone() }),
                    },
                    None if r.optional == Some(true) => continue,
                    None => return Err(SpecError::SecretMissing(r.name.clone())),
                }
            } else if let Some(r) = &vf.resource_field_ref {
                resource_field(c, &r.resource)
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        set(&mut vars, name.clone(), v);
    }
    Ok(order.into_iter().map(|k| {
        let v = vars.get(&k).cloned().unwrap_or_default();
        (k, v)
    }).collect())
}

fn resource_field(c: &Container, resource: &str) -> String {
    let r = c.resources.clone().unwrap_or_default();
    let (map, key) = match resource.split_once('.') {
        Some(("limits", k)) => (r.limits, k),
        Some(("requests", k)) => (r.requests, k),
        _ => return String::new(),
    };
    let q = map.unwrap_or_default().get(key).cloned();
    match (key, q) {
        ("cpu", Some(q)) => parse_cpu_millis(&q).map(|m| m.div_ceil(1000).to_string()).unwrap_or_default(),
        ("memory", Some(q)) => parse_bytes(&q).map(|b| b.to_string()).unwrap_or_default(),
        (_, Some(q)) => q.0,
        _ => String::new(),
    }
}

/// `500m` -> 500, `2` -> 2000, `0.5` -> 500.
pub fn parse_cpu_millis(q: &Quantity) -> Option<u64> {
    let s = q.0.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m.parse().ok();
    }
    let f: f64 = s.parse().ok()?;
    (f >= 0.0 && f.is_finite()).then(|| (f * 1000.0).round() as u64)
}

/// `64Mi` -> 67108864, `1G` -> 1e9, `128974848` -> itself, `129e6` -> 129000000.
pub fn parse_bytes(q: &Quantity) -> Option<u64> {
    let s = q.0.trim();
    let units: [(&str, u64); 12] = [
        ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40), ("Pi", 1 << 50), ("Ei", 1 << 60),
        ("k", 1_000), ("M", 1_000_000), ("G", 1_000_000_000), ("T", 1_000_000_000_000), ("P", 1_000_000_000_000_000), ("E", 1_000_000_000_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = s.strip_suffix(suffix) {
            let f: f64 = n.parse().ok()?;
            return (f >= 0.0 && f.is_finite()).then(|| (f * mult as f64) as u64);
        }
    }
    if let Some(m) = s.strip_suffix('m') {
        let f: f64 = m.parse().ok()?;
        return (f >= 0.0).then(|| (f / 1000.0) as u64);
    }
    let f: f64 = s.parse().ok()?;
    (f >= 0.0 && f.is_finite()).then(|| f as u64)
}

/// Kubernetes' command/args against the image's entrypoint/cmd.
pub fn argv(c: &Container, image: &ImageInfo, env: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    let x = |v: &Vec<String>| v.iter().map(|s| expand(s, &vars)).collect::<Vec<_>>();
    match (&c.command, &c.args) {
        (Some(cmd), Some(args)) => (x(cmd), x(args)),
        (Some(cmd), None) => (x(cmd), vec![]),
        (None, Some(args)) => (image.entrypoint.clone(), x(args)),
        (None, None) => (image.entrypoint.clone(), image.cmd.clone()),
    }
}

/// Where a pod's volume `name` lives on the node (for the kinds the agent makes).
pub fn volume_dir(pod_dir: &Path, name: &str) -> PathBuf {
    pod_dir.join("volumes").join(name)
}

fn safe_relative(p: &str) -> bool {
    !p.is_empty() && !p.starts_with('/') && Path::new(p).components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

fn write_file(dir: &Path, rel: &str, data: &[u8], mode: u32, vol: &str) -> Result<(), SpecError> {
    use std::os::unix::fs::PermissionsExt;
    if !safe_relative(rel) {
        return Err(SpecError::Volume(vol.into(), format!("path {rel:?} must be relative without '..'")));
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| SpecError::Volume(vol.into(), e.to_string()))?;
    }
    // Write then rename, so a container reading the file never sees half of it.
    let tmp = path.with_extension("skiff-tmp");
    std::fs::write(&tmp, data).map_err(|e| SpecError::Volume(vol.into(), e.to_string()))?;
    let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o777));
    std::fs::rename(&tmp, &path).map_err(|e| SpecError::Volume(vol.into(), e.to_string()))
}

fn project(dir: &Path, vol: &str, data: BTreeMap<String, Vec<u8>>, items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>, mode: u32) -> Result<(), SpecError> {
    match items {
        Some(items) => {
            for it in items {
                let Some(v) = data.get(&it.key) else {
                    return Err(SpecError::Volume(vol.into(), format!("key {:?} not found", it.key)));
                };
                write_file(dir, &it.path, v, it.mode.map(|m| m as u32).unwrap_or(mode), vol)?;
            }
        }
        None => {
            for (k, v) in &data {
                write_file(dir, k, v, mode, vol)?;
            }
        }
    }
    Ok(())
}

/// Makes (or refreshes) the pod's volumes on the node; returns the host path of each by name.
pub fn materialize_volumes(pod: &Pod, pod_dir: &Path, src: &Sources, pod_ip: &str, host_ip: &str) -> Result<BTreeMap<String, PathBuf>, SpecError> {
    let mut out = BTreeMap::new();
    for v in pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default() {
        let Volume { name, .. } = &v;
        let err = |m: String| SpecError::Volume(name.clone(), m);
        if let Some(hp) = &v.host_path {
            let p = PathBuf::from(&hp.path);
            match hp.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => std::fs::create_dir_all(&p).map_err(|e| err(e.to_string()))?,
                "Directory" if !p.is_dir() => return Err(err(format!("{} is not a directory", hp.path))),
                "File" if !p.is_file() => return Err(err(format!("{} is not a file", hp.path))),
                "FileOrCreate" if !p.exists() => {
                    std::fs::write(&p, b"").map_err(|e| err(e.to_string()))?;
                }
                _ => {}
            }
            out.insert(name.clone(), p);
            continue;
        }
        let dir = volume_dir(pod_dir, name);
        std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
        if v.empty_dir.is_some() {
            // Nothing to write: an empty directory that lives as long as the pod.
        } else if let Some(cm) = &v.config_map {
            match src.config_maps.get(&cm.name) {
                Some(c) => project(&dir, name, cm_data(c), cm.items.as_ref(), cm.default_mode.unwrap_or(0o644) as u32)?,
                None if cm.optional == Some(true) => {}
                None => return Err(SpecError::ConfigMapMissing(cm.name.clone())),
            }
        } else if let Some(s) = &v.secret {
            let sname = s.secret_name.clone().unwrap_or_default();
            match src.secrets.get(&sname) {
                Some(sec) => project(&dir, name, secret_data(sec), s.items.as_ref(), s.default_mode.unwrap_or(0o644) as u32)?,
                None if s.optional == Some(true) => {}
                None => return Err(SpecError::SecretMissing(sname)),
            }
        } else if let Some(d) = &v.downward_api {
            for it in d.items.iter().flatten() {
                if let Some(f) = &it.field_ref {
                    let val = field_value(pod, &f.field_path, pod_ip, host_ip)?;
                    write_file(&dir, &it.path, val.as_bytes(), it.mode.unwrap_or(0o644) as u32, name)?;
                }
            }
        } else if let Some(p) = &v.projected {
            let mode = p.default_mode.unwrap_or(0o644) as u32;
            for s in p.sources.iter().flatten() {
                if let Some(cm) = &s.config_map {
                    match src.config_maps.get(&cm.name) {
                        Some(c) => project(&dir, name, cm_data(c), cm.items.as_ref(), mode)?,
                        None if cm.optional == Some(true) => {}
                        None => return Err(SpecError::ConfigMapMissing(cm.name.clone())),
                    }
                }
                if let Some(sec) = &s.secret {
                    match src.secrets.get(&sec.name) {
                        Some(x) => project(&dir, name, secret_data(x), sec.items.as_ref(), mode)?,
                        None if sec.optional == Some(true) => {}
                        None => return Err(SpecError::SecretMissing(sec.name.clone())),
                    }
                }
                if let Some(d) = &s.downward_api {
                    for it in d.items.iter().flatten() {
                        if let Some(f) = &it.field_ref {
                            let val = field_value(pod, &f.field_path, pod_ip, host_ip)?;
                            write_file(&dir, &it.path, val.as_bytes(), mode, name)?;
                        }
                    }
                }
                // serviceAccountToken sources need the TokenRequest API (issue 8): left empty.
            }
        } else {
            return Err(err("unsupported volume type (skiff supports emptyDir, configMap, secret, hostPath, downwardAPI, projected)".into()));
        }
        out.insert(name.clone(), dir);
    }
    Ok(out)
}

/// The container's mounts: its volumeMounts resolved against the pod's volumes, plus the
/// pod's /etc/hosts, /etc/hostname and /etc/resolv.conf (as kubelet mounts them).
pub fn mounts(c: &Container, volumes: &BTreeMap<String, PathBuf>, pod_dir: &Path) -> Result<Vec<Mount>, SpecError> {
    let mut out = Vec::new();
    for vm in c.volume_mounts.iter().flatten() {
        let host = volumes.get(&vm.name).ok_or_else(|| SpecError::Volume(vm.name.clone(), "no such volume in the pod".into()))?;
        let host_path = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) if safe_relative(sub) => host.join(sub),
            Some(sub) => return Err(SpecError::Volume(vm.name.clone(), format!("subPath {sub:?} must be relative without '..'"))),
            None => host.clone(),
        };
        out.push(Mount { host_path, container_path: vm.mount_path.clone(), read_only: vm.read_only.unwrap_or(false) });
    }
    for f in ["hosts", "hostname", "resolv.conf"] {
        if !out.iter().any(|m| m.container_path == format!("/etc/{f}")) {
            out.push(Mount { host_path: pod_dir.join(f), container_path: format!("/etc/{f}"), read_only: false });
        }
    }
    Ok(out)
}

/// /etc/hosts as kubelet writes it.
pub fn hosts_file(hostname: &str, pod_ip: &str) -> String {
    format!(
        "# Kubernetes-managed hosts file (skiff).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{pod_ip}\t{hostname}\n"
    )
}

/// Fills the resource fields of a request from the container's limits and requests.
pub fn apply_resources(req: &mut ContainerRequest, c: &Container) -> Result<(), SpecError> {
    let r = c.resources.clone().unwrap_or_default();
    let limits = r.limits.unwrap_or_default();
    let requests = r.requests.unwrap_or_default();
    if let Some(q) = limits.get("memory") {
        req.memory_limit_bytes = Some(parse_bytes(q).ok_or_else(|| SpecError::Quantity(q.0.clone()))?);
    }
    if let Some(q) = limits.get("cpu") {
        req.cpu_limit_millis = Some(parse_cpu_millis(q).ok_or_else(|| SpecError::Quantity(q.0.clone()))?);
    }
    if let Some(q) = requests.get("cpu").or(limits.get("cpu")) {
        req.cpu_request_millis = Some(parse_cpu_millis(q).ok_or_else(|| SpecError::Quantity(q.0.clone()))?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes(&Quantity("64Mi".into())), Some(64 << 20));
        assert_eq!(parse_bytes(&Quantity("1G".into())), Some(1_000_000_000));
        assert_eq!(parse_bytes(&Quantity("129e6".into())), Some(129_000_000));
        assert_eq!(parse_bytes(&Quantity("12345".into())), Some(12345));
        assert_eq!(parse_bytes(&Quantity("lots".into())), None);
        assert_eq!(parse_bytes(&Quantity("-1Mi".into())), None);
        assert_eq!(parse_cpu_millis(&Quantity("250m".into())), Some(250));
        assert_eq!(parse_cpu_millis(&Quantity("1.5".into())), Some(1500));
        assert_eq!(parse_cpu_millis(&Quantity("x".into())), None);
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let vars = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("cost $5 $(A", &vars), "cost $5 $(A");
    }

    #[test]
    fn env_order_sources_and_errors() {
        let p = pod(json!({"metadata": {"name": "p", "namespace": "d", "uid": "u"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
                "env": [{"name": "A", "value": "a"}, {"name": "B", "value": "$(A)-b"},
                        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]}}));
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        let image = ImageInfo { env: vec![("PATH".into(), "/bin".into())], ..Default::default() };
        let mut src = Sources::default();
        assert_eq!(resolve_env(&p, &c, &image, &src, "10.0.0.1", "h").unwrap_err(), SpecError::ConfigMapMissing("cm".into()));
        src.config_maps.insert("cm".into(), serde_json::from_value(json!({"data": {"x": "1"}})).unwrap());
        assert!(matches!(resolve_env(&p, &c, &image, &src, "10.0.0.1", "h"), Err(SpecError::SecretMissing(_))));
        src.secrets.insert("s".into(), serde_json::from_value(json!({"data": {"k": "c2VjcmV0"}})).unwrap());
        let env = resolve_env(&p, &c, &image, &src, "10.0.0.1", "h").unwrap();
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["PATH", "CM_x", "A", "B", "IP", "NODE", "S"]);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("B"), "a-b");
        assert_eq!(get("IP"), "10.0.0.1");
        assert_eq!(get("NODE"), "n1");
        assert_eq!(get("S"), "secret");
    }

    #[test]
    fn command_and_args_semantics() {
        let image = ImageInfo { entrypoint: vec!["/e".into()], cmd: vec!["c".into()], ..Default::default() };
        let mut c = Container { name: "c".into(), ..Default::default() };
        assert_eq!(argv(&c, &image, &[]), (vec!["/e".to_string()], vec!["c".to_string()]));
        c.args = Some(vec!["a".into()]);
        assert_eq!(argv(&c, &image, &[]), (vec!["/e".to_string()], vec!["a".to_string()]));
        c.command = Some(vec!["/x".into()]);
        c.args = None;
        assert_eq!(argv(&c, &image, &[]), (vec!["/x".to_string()], vec![]));
    }

    #[test]
    fn volumes_are_written_and_traversal_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = pod(json!({"metadata": {"name": "p", "namespace": "d", "uid": "u"},
            "spec": {"containers": [{"name": "c", "image": "i", "volumeMounts": [{"name": "cfg", "mountPath": "/cfg", "readOnly": true}, {"name": "scratch", "mountPath": "/tmp/s"}]}],
                     "volumes": [{"name": "cfg", "configMap": {"name": "cm"}}, {"name": "scratch", "emptyDir": {}},
                                 {"name": "meta", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}}]}}));
        let mut src = Sources::default();
        src.config_maps.insert("cm".into(), serde_json::from_value(json!({"data": {"app.conf": "x=1"}})).unwrap());
        let vols = materialize_volumes(&p, dir.path(), &src, "10.0.0.1", "h").unwrap();
        assert_eq!(std::fs::read_to_string(vols["cfg"].join("app.conf")).unwrap(), "x=1");
        assert!(vols["scratch"].is_dir());
        assert_eq!(std::fs::read_to_string(vols["meta"].join("name")).unwrap(), "p");
        let m = mounts(&p.spec.as_ref().unwrap().containers[0], &vols, dir.path()).unwrap();
        assert!(m.iter().any(|m| m.container_path == "/cfg" && m.read_only));
        assert!(m.iter().any(|m| m.container_path == "/etc/resolv.conf"));

        let bad = pod(json!({"metadata": {"name": "p", "uid": "u"}, "spec": {"containers": [],
            "volumes": [{"name": "cfg", "configMap": {"name": "cm", "items": [{"key": "app.conf", "path": "../../etc/passwd"}]}}]}}));
        let e = materialize_volumes(&bad, dir.path(), &src, "", "").unwrap_err().to_string();
        assert!(e.contains("must be relative"), "{e}");
    }
}
