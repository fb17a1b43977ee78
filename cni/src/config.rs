//! What a CNI call brings: the environment (CNI_COMMAND, ...) and the network configuration on
//! stdin, decoded and validated before anything is changed.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::error::{CniError, CniResult, code};

/// The spec versions this plugin speaks (VERSION's `supportedVersions`).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version answered when the caller names none (VERSION without stdin).
pub const LATEST_VERSION: &str = "1.1.0";

/// Where IPAM state goes when the config names no `dataDir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/skiff";
pub const DEFAULT_MTU: u32 = 1500;

/// A spec version as (major, minor, patch), for comparisons.
pub fn version_tuple(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    if it.next().is_some() {
        return None;
    }
    Some(t)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> CniResult<Command> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::invalid_env(format!(
                    "unknown CNI_COMMAND {other:?}: expected ADD, DEL, CHECK, VERSION, STATUS or GC"
                )));
            }
        })
    }

    /// The first spec version that has this command.
    fn since(self) -> &'static str {
        match self {
            Command::Add | Command::Del | Command::Version => "0.3.1",
            Command::Check => "0.4.0",
            Command::Status | Command::Gc => "1.1.0",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// The CNI_* environment of one call.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Env {
    pub fn from_process() -> Env {
        // Not UTF-8: kept (lossily) so the value fails its own check with its name, instead of
        // reading as "not set".
        let get = |k: &str| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned());
        Env {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    pub fn command(&self) -> CniResult<Command> {
        match self.command.as_deref() {
            None | Some("") => Err(CniError::invalid_env(
                "CNI_COMMAND is not set: this is a CNI plugin, run by a container runtime (ADD, DEL, CHECK, VERSION, STATUS, GC)",
            )),
            Some(c) => Command::parse(c),
        }
    }

    fn required(&self, value: &Option<String>, name: &str, cmd: Command) -> CniResult<String> {
        match value.as_deref() {
            Some(v) if !v.is_empty() => Ok(v.to_string()),
            _ => Err(CniError::invalid_env(format!(
                "{name} is required for {} but is not set",
                cmd.name()
            ))),
        }
    }

    /// CNI_CONTAINERID, checked as the spec says (alphanumerics, then `_ . -`).
    pub fn container_id(&self, cmd: Command) -> CniResult<String> {
        let id = self.required(&self.container_id, "CNI_CONTAINERID", cmd)?;
        let mut chars = id.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !first_ok || !rest_ok || id.len() > 1024 {
            return Err(CniError::invalid_env(format!(
                "CNI_CONTAINERID {id:?} is invalid: it must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
            )));
        }
        Ok(id)
    }

    /// CNI_IFNAME, checked as Linux names interfaces (1-15 bytes, no '/', ':' or whitespace).
    pub fn ifname(&self, cmd: Command) -> CniResult<String> {
        let name = self.required(&self.ifname, "CNI_IFNAME", cmd)?;
        if !valid_ifname(&name) {
            return Err(CniError::invalid_env(format!(
                "CNI_IFNAME {name:?} is not a valid interface name (1-15 characters, no '/', ':', whitespace, not '.' or '..')"
            )));
        }
        Ok(name)
    }

    /// CNI_NETNS for ADD and CHECK (required).
    pub fn netns(&self, cmd: Command) -> CniResult<PathBuf> {
        Ok(PathBuf::from(self.required(
            &self.netns,
            "CNI_NETNS",
            cmd,
        )?))
    }

    /// CNI_NETNS for DEL: optional (the runtime may already have removed the namespace).
    pub fn netns_optional(&self) -> Option<PathBuf> {
        self.netns
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    }

    pub fn require_path(&self, cmd: Command) -> CniResult<()> {
        self.required(&self.path, "CNI_PATH", cmd).map(|_| ())
    }

    pub fn cni_args(&self) -> CniResult<CniArgs> {
        CniArgs::parse(self.args.as_deref().unwrap_or(""))
    }
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, as the CNI spec names networks; never `.` or `..`.
pub fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.len() <= 255
}

pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

/// CNI_ARGS: `KEY=VALUE;KEY=VALUE`. The keys container runtimes send are known; any other key is
/// refused unless `IgnoreUnknown` is true, as the reference plugins do, so that a typo in an
/// argument meant for this plugin is not silently dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub values: BTreeMap<String, String>,
}

const KNOWN_ARGS: [&str; 5] = [
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
];

impl CniArgs {
    pub fn parse(s: &str) -> CniResult<CniArgs> {
        let mut values = BTreeMap::new();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::invalid_env(format!(
                    "CNI_ARGS: {pair:?} is not KEY=VALUE (pairs are separated by ';')"
                )));
            };
            if k.is_empty() {
                return Err(CniError::invalid_env(format!(
                    "CNI_ARGS: {pair:?} has an empty key"
                )));
            }
            values.insert(k.to_string(), v.to_string());
        }
        let ignore_unknown = values
            .get("IgnoreUnknown")
            .map(|v| v.eq_ignore_ascii_case("true") || v == "1");
        if let Some(v) = values.get("IgnoreUnknown")
            && ignore_unknown != Some(true)
            && !v.eq_ignore_ascii_case("false")
            && v != "0"
        {
            return Err(CniError::invalid_env(format!(
                "CNI_ARGS: IgnoreUnknown={v:?} is not a boolean (true, false, 1, 0)"
            )));
        }
        if ignore_unknown != Some(true)
            && let Some(unknown) = values.keys().find(|k| !KNOWN_ARGS.contains(&k.as_str()))
        {
            return Err(CniError::invalid_env(format!(
                "CNI_ARGS: unknown argument {unknown:?} (known: {}; add IgnoreUnknown=1 to pass others)",
                KNOWN_ARGS.join(", ")
            )));
        }
        Ok(CniArgs { values })
    }
}

/// An attachment named in GC's `cni.dev/valid-attachments`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's network configuration, as received on stdin (one plugin of a conflist, with the
/// conflist's `cniVersion` and `name` injected by the runtime).
#[derive(Debug, Deserialize)]
struct RawConf {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    #[serde(rename = "pinDir")]
    pin_dir: Option<String>,
    #[serde(rename = "dataDir")]
    data_dir: Option<String>,
    mtu: Option<u32>,
    ipam: Option<serde_json::Value>,
    #[serde(rename = "prevResult")]
    prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// A validated network configuration.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub pod_cidr: Ipv4Net,
    /// The first address of podCIDR: the pods' gateway, on the node's `lo`.
    pub gateway: Ipv4Addr,
    pub pin_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub mtu: u32,
    pub prev_result: Option<serde_json::Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Reads only `cniVersion` (for VERSION, and for answering errors in the caller's version).
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_slice::<V>(stdin).ok()?.cni_version
}

/// Checks that `version` is one this plugin speaks and that it has `cmd`.
pub fn check_version(version: &str, cmd: Command) -> CniResult<()> {
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {version:?} is not supported: skiff-cni speaks {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let since = cmd.since();
    if version_tuple(version) < version_tuple(since) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{} needs cniVersion {since} or later; the configuration says {version}",
                cmd.name()
            ),
        ));
    }
    Ok(())
}

impl NetConf {
    /// Decodes and validates the configuration for `cmd`. Nothing is touched on the machine.
    pub fn parse(stdin: &[u8], cmd: Command) -> CniResult<NetConf> {
        if stdin.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(CniError::new(
                code::DECODE_FAILURE,
                "no network configuration on stdin: the runtime passes the plugin's JSON configuration there",
            ));
        }
        let value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "the network configuration on stdin is not JSON",
            )
            .with_details(e)
        })?;
        if !value.is_object() {
            return Err(CniError::new(
                code::DECODE_FAILURE,
                "the network configuration on stdin must be a JSON object",
            ));
        }
        let raw: RawConf = serde_json::from_value(value).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "the network configuration has a field of the wrong type",
            )
            .with_details(e)
        })?;
        let cni_version = raw.cni_version.ok_or_else(|| {
            CniError::invalid_config(format!(
                "cniVersion is missing from the network configuration (use one of {})",
                SUPPORTED_VERSIONS.join(", ")
            ))
        })?;
        check_version(&cni_version, cmd)?;
        let name = raw.name.filter(|n| !n.is_empty()).ok_or_else(|| {
            CniError::invalid_config("name is missing from the network configuration")
        })?;
        // The spec's network name (libcni checks the same): it names the default dataDir, so
        // it may not climb out of it.
        if !valid_network_name(&name) {
            return Err(CniError::invalid_config(format!(
                "network name {:?} is invalid: it must start with a letter or digit and hold only letters, digits, '_', '.' and '-' (at most 255)",
                name.chars().take(80).collect::<String>()
            )));
        }
        if let Some(t) = &raw.plugin_type
            && t.is_empty()
        {
            return Err(CniError::invalid_config("type is empty"));
        }
        if let Some(ipam) = &raw.ipam
            && !(ipam.is_null() || ipam.as_object().is_some_and(|o| o.is_empty()))
        {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                "ipam is not supported: skiff-cni allocates pod addresses from podCIDR itself; remove the ipam section",
            ));
        }
        let cidr_text = raw.pod_cidr.ok_or_else(|| {
            CniError::invalid_config(
                "podCIDR is missing: set it to the node's pod range, e.g. \"podCIDR\": \"10.244.1.0/24\"",
            )
        })?;
        let pod_cidr = parse_pod_cidr(&cidr_text)?;
        let gateway = first_host(pod_cidr);
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        if !(68..=65535).contains(&mtu) {
            return Err(CniError::invalid_config(format!(
                "mtu {mtu} is out of range (68..=65535)"
            )));
        }
        let data_dir = match raw.data_dir {
            Some(d) if d.is_empty() => {
                return Err(CniError::invalid_config("dataDir is empty"));
            }
            Some(d) => PathBuf::from(d),
            None => Path::new(DEFAULT_DATA_DIR).join(&name),
        };
        if !data_dir.is_absolute() {
            return Err(CniError::invalid_config(format!(
                "dataDir {} must be an absolute path",
                data_dir.display()
            )));
        }
        let pin_dir = match raw.pin_dir {
            None => None,
            Some(p) if p.is_empty() => None,
            Some(p) => {
                let p = PathBuf::from(p);
                if !p.is_absolute() {
                    return Err(CniError::invalid_config(format!(
                        "pinDir {} must be an absolute path (a directory on bpffs)",
                        p.display()
                    )));
                }
                Some(p)
            }
        };
        let prev_result = match raw.prev_result {
            None | Some(serde_json::Value::Null) => None,
            Some(v) if v.is_object() => Some(v),
            Some(_) => {
                return Err(CniError::new(
                    code::DECODE_FAILURE,
                    "prevResult must be a JSON object (a CNI result)",
                ));
            }
        };
        Ok(NetConf {
            cni_version,
            name,
            pod_cidr,
            gateway,
            pin_dir,
            data_dir,
            mtu,
            prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }
}

/// podCIDR must be an IPv4 network (no host bits) with room for a gateway and a pod.
pub fn parse_pod_cidr(text: &str) -> CniResult<Ipv4Net> {
    let net: Ipv4Net = text.parse().map_err(|_| {
        CniError::invalid_config(format!(
            "podCIDR {text:?} is not an IPv4 network in CIDR form (e.g. 10.244.1.0/24)"
        ))
    })?;
    if net.trunc() != net {
        return Err(CniError::invalid_config(format!(
            "podCIDR {text} is not a network address: its host bits are set (did you mean {}?)",
            net.trunc()
        )));
    }
    if net.prefix_len() > 30 {
        return Err(CniError::invalid_config(format!(
            "podCIDR {text} is too small: it needs room for the network, gateway, broadcast and a pod (/30 or larger)"
        )));
    }
    Ok(net)
}

/// The first usable address of a network (the gateway).
pub fn first_host(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"skiff","type":"skiff-cni","podCIDR":"10.244.1.0/24","dataDir":"/tmp/x"{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn parses_the_plan_config() {
        let c = NetConf::parse(
            &conf(r#","pinDir":"/sys/fs/bpf/skiff/n1","mtu":1400"#),
            Command::Add,
        )
        .expect("valid");
        assert_eq!(c.gateway, Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(c.mtu, 1400);
        assert_eq!(
            c.pin_dir.as_deref(),
            Some(Path::new("/sys/fs/bpf/skiff/n1"))
        );
    }

    #[test]
    fn rejects_bad_configs_with_spec_codes() {
        let cases: Vec<(&[u8], u32)> = vec![
            (b"{not json", code::DECODE_FAILURE),
            (b"", code::DECODE_FAILURE),
            (b"[1]", code::DECODE_FAILURE),
            (br#"{"cniVersion":"9.9.9","name":"x","podCIDR":"10.0.0.0/24"}"#, code::INCOMPATIBLE_VERSION),
            (br#"{"name":"x","podCIDR":"10.0.0.0/24"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"x"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"x","podCIDR":"10.0.0.5/24"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"x","podCIDR":"banana"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"x","podCIDR":"10.0.0.0/31"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"x","podCIDR":"10.0.0.0/24","mtu":"big"}"#, code::DECODE_FAILURE),
            (br#"{"cniVersion":"1.0.0","name":"x","podCIDR":"10.0.0.0/24","mtu":10}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"x","podCIDR":"10.0.0.0/24","dataDir":"rel"}"#, code::INVALID_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"x","podCIDR":"10.0.0.0/24","ipam":{"type":"host-local"}}"#, code::UNSUPPORTED_FIELD),
        ];
        for (input, want) in cases {
            let err = NetConf::parse(input, Command::Add).expect_err("must fail");
            assert_eq!(err.code, want, "{}: {err}", String::from_utf8_lossy(input));
            assert!(!err.msg.is_empty());
        }
    }

    #[test]
    fn commands_need_their_version() {
        let c = br#"{"cniVersion":"1.0.0","name":"x","podCIDR":"10.0.0.0/24"}"#;
        assert_eq!(
            NetConf::parse(c, Command::Gc).expect_err("GC is 1.1").code,
            code::INCOMPATIBLE_VERSION
        );
        assert!(NetConf::parse(c, Command::Check).is_ok());
        let c = br#"{"cniVersion":"0.3.1","name":"x","podCIDR":"10.0.0.0/24"}"#;
        assert!(NetConf::parse(c, Command::Check).is_err());
        assert!(NetConf::parse(c, Command::Add).is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Any bytes, and any JSON object built from the known field names with arbitrary
        /// values, decode to a config or an error with a message: never a panic.
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
                                        fields in proptest::collection::vec((0usize..10, ".{0,40}", proptest::prelude::any::<i64>(), 0u8..4), 0..8)) {
            for cmd in [Command::Add, Command::Del, Command::Check, Command::Gc, Command::Status] {
                if let Err(e) = NetConf::parse(&bytes, cmd) {
                    proptest::prop_assert!(!e.msg.is_empty());
                }
            }
            let names = ["cniVersion", "name", "type", "podCIDR", "pinDir", "dataDir", "mtu", "ipam", "prevResult", "cni.dev/valid-attachments"];
            let mut obj = serde_json::Map::new();
            for (i, text, n, kind) in fields {
                let v = match kind {
                    0 => serde_json::json!(text),
                    1 => serde_json::json!(n),
                    2 => serde_json::json!([text]),
                    _ => serde_json::json!({"type": text, "containerID": text, "ifname": text}),
                };
                obj.insert(names[i].to_string(), v);
            }
            let input = serde_json::Value::Object(obj).to_string();
            for cmd in [Command::Add, Command::Gc] {
                if let Err(e) = NetConf::parse(input.as_bytes(), cmd) {
                    proptest::prop_assert!(!e.msg.is_empty());
                }
            }
            let _ = CniArgs::parse(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn network_names_cannot_climb_out_of_the_data_dir() {
        for bad in ["../x", "..", ".", "a/b", "/abs", "-x", "a b", "a\0", &"n".repeat(256)] {
            let stdin = format!(
                r#"{{"cniVersion":"1.0.0","name":{},"type":"skiff-cni","podCIDR":"10.244.1.0/24"}}"#,
                serde_json::Value::from(bad)
            );
            let error = NetConf::parse(stdin.as_bytes(), Command::Add).expect_err(bad);
            assert_eq!(error.code, code::INVALID_CONFIG, "{bad}");
        }
        assert!(valid_network_name("skiff.net-1_a"));
    }

    #[test]
    fn cni_args() {
        assert!(CniArgs::parse("").is_ok());
        assert!(CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAME=web;FOO=bar").is_ok());
        assert!(CniArgs::parse("K8S_POD_NAME=web;K8S_POD_NAMESPACE=default").is_ok());
        assert_eq!(
            CniArgs::parse("FOO=bar").expect_err("unknown").code,
            code::INVALID_ENV
        );
        assert_eq!(
            CniArgs::parse("novalue").expect_err("malformed").code,
            code::INVALID_ENV
        );
        assert_eq!(
            CniArgs::parse("=x").expect_err("empty key").code,
            code::INVALID_ENV
        );
        assert!(CniArgs::parse("IgnoreUnknown=maybe").is_err());
    }

    #[test]
    fn env_validation() {
        let env = Env {
            container_id: Some("bad/id".into()),
            ifname: Some("this-name-is-way-too-long".into()),
            ..Env::default()
        };
        assert!(env.container_id(Command::Add).is_err());
        assert!(env.ifname(Command::Add).is_err());
        assert!(env.command().is_err());
        assert!(Command::parse("FROB").is_err());
    }
}
