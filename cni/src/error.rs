//! CNI errors: the spec's error codes and the JSON the plugin prints for them.

use serde::Serialize;

/// The error codes of the CNI spec ("Error" section), the ones this plugin answers with.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (netlink, files, bpffs).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (stdin is not the JSON it should be).
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network config (a field with a value that cannot work).
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (a transient condition: here, the IPAM lock stayed held).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available (cannot serve ADDs now).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin's network is not available (e.g. its address pool is exhausted).
    pub const NETWORK_NOT_AVAILABLE: u32 = 51;
    /// Plugin-specific (>= 100): no free address left in podCIDR.
    pub const IPAM_EXHAUSTED: u32 = 100;
}

/// A CNI error result: `{"cniVersion", "code", "msg", "details"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl std::fmt::Display) -> CniError {
        self.details = details.to_string();
        self
    }

    pub fn io(msg: impl Into<String>, err: impl std::fmt::Display) -> CniError {
        CniError::new(code::IO_FAILURE, msg).with_details(err)
    }

    pub fn invalid_env(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_ENV, msg)
    }

    pub fn invalid_config(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_CONFIG, msg)
    }

    /// The JSON object printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = serde_json::Value::String(self.details.clone());
        }
        v
    }
}

pub type CniResult<T> = Result<T, CniError>;
