//! Pod sandboxes: a network namespace per pod, networked by the CNI plugins of the node's
//! conflist (skiff-cni), the way a container runtime's CNI integration (libcni) calls them.
//!
//! The namespace is made as `ip netns add` makes one (a bind mount of a fresh netns at
//! /run/netns/NAME), by hand because no maintained crate does only this; CNI plugins are run
//! as the spec says (environment + config on stdin, result on stdout), also by hand: the libcni
//! algorithm is a loop over the conflist's plugins passing `prevResult` along.

use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("network namespace {name}: {what}: {source}")]
    Netns { name: String, what: &'static str, #[source] source: std::io::Error },
    #[error("reading the CNI config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("CNI plugin {plugin} {command} failed: {message}")]
    Plugin { plugin: String, command: &'static str, message: String },
    #[error("the CNI result has no IPv4 address: {0}")]
    NoAddress(String),
}

pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates `/run/netns/<name>` holding a new network namespace (idempotent: an existing one is
/// kept). Its `lo` is brought up by the CNI plugin.
pub fn create_netns(name: &str) -> Result<PathBuf, SandboxError> {
    let err = |what: &'static str| move |source| SandboxError::Netns { name: name.to_string(), what, source };
    let path = netns_path(name);
    std::fs::create_dir_all(NETNS_DIR).map_err(err("creating /run/netns"))?;
    if path.exists() && is_nsfs(&path) {
        return Ok(path);
    }
    std::fs::File::create(&path).map_err(err("creating the mount point"))?;
    let target = path.clone();
    // unshare() changes the calling thread's namespace: do it on a thread of its own that then
    // ends, so no agent thread ever leaves the node's namespace.
    let result = std::thread::spawn(move || -> std::io::Result<()> {
        // SAFETY: plain syscalls on this thread only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let src = CString::new(format!("/proc/self/task/{}/ns/net", unsafe { libc::gettid() })).expect("no NUL");
        let dst = CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: valid C strings; a bind mount of our own namespace file.
        if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&path);
        return Err(err("creating")(e));
    }
    Ok(path)
}

/// Unmounts and removes `/run/netns/<name>` (no error when it is already gone).
pub fn delete_netns(name: &str) -> Result<(), SandboxError> {
    let path = netns_path(name);
    if !path.exists() {
        return Ok(());
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| SandboxError::Netns {
        name: name.into(),
        what: "path",
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: valid C string. MNT_DETACH: a process still inside keeps the namespace alive.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SandboxError::Netns { name: name.into(), what: "removing", source }),
    }
}

fn is_nsfs(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC }
}

/// A conflist and where its plugins live.
#[derive(Clone, Debug)]
pub struct CniNetwork {
    pub conflist: Value,
    pub bin_dirs: Vec<PathBuf>,
}

/// Who the sandbox is for (CNI_CONTAINERID and CNI_ARGS).
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

impl CniNetwork {
    /// Loads `<conf_dir>/*.conflist`, first in lexical order (libcni's rule).
    pub fn load(conf_dir: &Path, bin_dirs: Vec<PathBuf>) -> Result<CniNetwork, SandboxError> {
        let cfg = |message: String| SandboxError::Config { path: conf_dir.to_path_buf(), message };
        let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
            .map_err(|e| cfg(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
            .collect();
        files.sort();
        let path = files.first().ok_or_else(|| cfg("no .conflist file".into()))?;
        let text = std::fs::read_to_string(path).map_err(|e| cfg(e.to_string()))?;
        let conflist: Value = serde_json::from_str(&text).map_err(|e| cfg(format!("{}: {e}", path.display())))?;
        if !conflist["plugins"].is_array() {
            return Err(cfg(format!("{}: no plugins list", path.display())));
        }
        Ok(CniNetwork { conflist, bin_dirs })
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"].as_array().cloned().unwrap_or_default()
    }

    /// ADD through every plugin in order; returns the final result.
    pub fn add(&self, a: &Attachment) -> Result<Value, SandboxError> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            prev = Some(self.exec(&plugin, "ADD", a, prev.as_ref())?);
        }
        prev.ok_or_else(|| SandboxError::NoAddress("no plugins ran".into()))
    }

    /// DEL through every plugin in reverse order. Errors are collected, not stopped at: every
    /// plugin gets its chance to clean up.
    pub fn del(&self, a: &Attachment) -> Result<(), SandboxError> {
        let mut first_err = None;
        for plugin in self.plugins().iter().rev() {
            if let Err(e) = self.exec(plugin, "DEL", a, None) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn exec(&self, plugin: &Value, command: &'static str, a: &Attachment, prev: Option<&Value>) -> Result<Value, SandboxError> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let fail = |message: String| SandboxError::Plugin { plugin: kind.clone(), command, message };
        if kind.is_empty() || kind.contains('/') {
            return Err(fail("the plugin has no valid type".into()));
        }
        let bin = self
            .bin_dirs
            .iter()
            .map(|d| d.join(&kind))
            .find(|p| p.is_file())
            .ok_or_else(|| fail(format!("not found in {:?}", self.bin_dirs)))?;
        let mut conf = plugin.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let path_env = self.bin_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":");
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            a.pod_namespace, a.pod_name, a.container_id, a.pod_uid
        );
        let mut child = Command::new(&bin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", &a.ifname)
            .env("CNI_ARGS", args)
            .env("CNI_PATH", path_env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("starting {}: {e}", bin.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(conf.to_string().as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let msg = serde_json::from_str::<Value>(&stdout)
                .ok()
                .map(|v| format!("{} ({})", v["msg"].as_str().unwrap_or("error"), v["details"].as_str().unwrap_or("")))
                .unwrap_or_else(|| format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)));
            return Err(fail(msg));
        }
        if command == "DEL" || stdout.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&stdout).map_err(|e| fail(format!("unreadable result: {e}")))
    }
}

/// The first IPv4 address of a CNI result, without its prefix length.
pub fn result_ipv4(result: &Value) -> Result<std::net::Ipv4Addr, SandboxError> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .next()
        .ok_or_else(|| SandboxError::NoAddress(result.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_address_is_read_without_prefix() {
        let r = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.244.1.7/32", "interface": 1}]});
        assert_eq!(result_ipv4(&r).unwrap(), std::net::Ipv4Addr::new(10, 244, 1, 7));
        assert!(result_ipv4(&json!({"ips": []})).is_err());
        assert!(result_ipv4(&json!({"ips": [{"address": "fd00::1/64"}]})).is_err());
    }

    #[test]
    fn conflist_is_required_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        assert!(CniNetwork::load(dir.path(), vec![]).is_err());
        std::fs::write(dir.path().join("10-x.conflist"), "{\"name\":\"x\"}").unwrap();
        assert!(CniNetwork::load(dir.path(), vec![]).is_err());
        std::fs::write(dir.path().join("05-y.conflist"), "{\"cniVersion\":\"1.1.0\",\"name\":\"y\",\"plugins\":[{\"type\":\"skiff-cni\"}]}").unwrap();
        let n = CniNetwork::load(dir.path(), vec![]).unwrap();
        assert_eq!(n.conflist["name"], "y");
    }

    #[test]
    fn missing_plugin_binary_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let n = CniNetwork { conflist: json!({"cniVersion": "1.1.0", "name": "y", "plugins": [{"type": "nope"}]}), bin_dirs: vec![dir.path().into()] };
        let a = Attachment { container_id: "c".into(), netns: "/run/netns/x".into(), ifname: "eth0".into(), pod_namespace: "d".into(), pod_name: "p".into(), pod_uid: "u".into() };
        let e = n.add(&a).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("not found"), "{e}");
    }
}
