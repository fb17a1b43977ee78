//! `skiff install-cni`: puts the skiff-cni plugin where container runtimes look for plugins
//! (`/opt/cni/bin`), and, when the node's pod CIDR is known, its conflist into `/etc/cni/net.d`.
//! The agent (re)writes the conflist itself once the Node has its podCIDR, so on an agent node
//! installing the binary is enough; `--pod-cidr` is for a node whose range is fixed up front, or
//! for a runtime that must find a conflist before the agent starts.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct InstallCniArgs {
    /// The skiff-cni binary to install (default: the one beside this skiff binary, else on PATH).
    #[arg(long)]
    source: Option<PathBuf>,
    #[arg(long, default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// Also write `<conf-dir>/10-skiff.conflist` for this pod range.
    #[arg(long)]
    pod_cidr: Option<ipnet::Ipv4Net>,
    /// With --pod-cidr: the node (for the default pin dir /sys/fs/bpf/skiff/<node>).
    #[arg(long, requires = "pod_cidr")]
    node_name: Option<String>,
    /// With --pod-cidr: the agent's data dir (IPAM state goes to <data-dir>/cni).
    #[arg(long, default_value = "/var/lib/skiff-agent")]
    data_dir: PathBuf,
    /// With --pod-cidr: no datapath registration (plain veth networking).
    #[arg(long)]
    no_datapath: bool,
}

fn find_source(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
        && dir.join("skiff-cni").is_file()
    {
        return Ok(dir.join("skiff-cni"));
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("skiff-cni").is_file() {
            return Ok(dir.join("skiff-cni"));
        }
    }
    bail!("no skiff-cni beside {} nor on PATH: give --source FILE", std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default())
}

/// Copies atomically (temporary file + rename): a runtime calling the plugin meanwhile runs
/// either the old binary or the new one, never half of one.
fn install_file(src: &Path, dest: &Path, mode: u32) -> Result<()> {
    let tmp = dest.with_extension("skiff-tmp");
    std::fs::copy(src, &tmp).with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

pub fn run(args: InstallCniArgs) -> Result<()> {
    let src = find_source(args.source)?;
    // A skiff-cni answers VERSION: check it is one before installing it.
    let out = std::process::Command::new(&src)
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", src.display()))?;
    let version: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("{} did not answer CNI VERSION with JSON: is it skiff-cni?", src.display()))?;
    if version["supportedVersions"].as_array().is_none_or(|v| v.is_empty()) {
        bail!("{} answered VERSION without supportedVersions", src.display());
    }
    std::fs::create_dir_all(&args.bin_dir).with_context(|| format!("creating {}", args.bin_dir.display()))?;
    let dest = args.bin_dir.join("skiff-cni");
    install_file(&src, &dest, 0o755)?;
    println!("installed {}", dest.display());
    if let Some(cidr) = args.pod_cidr {
        let node = match args.node_name {
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).context("reading the host name")?,
        };
        let mut cfg = skiff_agent::AgentConfig::new(&node, std::net::Ipv4Addr::UNSPECIFIED, args.data_dir);
        cfg.pin_dir = (!args.no_datapath).then(|| PathBuf::from("/sys/fs/bpf/skiff").join(&node));
        let list = skiff_agent::conflist(&cfg, &cidr);
        std::fs::create_dir_all(&args.conf_dir).with_context(|| format!("creating {}", args.conf_dir.display()))?;
        let path = args.conf_dir.join("10-skiff.conflist");
        let tmp = path.with_extension("skiff-tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    } else {
        println!("the agent writes {} once its Node has a podCIDR", args.conf_dir.join("10-skiff.conflist").display());
    }
    Ok(())
}
