//! skiff-cni: the CNI plugin (spec 1.0.0 and 1.1.0; VERSION also lists 0.3.1 and 0.4.0) that
//! wires a pod to its node: a veth pair with a deterministic host name, the pod's /32 address
//! and routes through the gateway on the node's `lo`, host-local IPAM from the node's podCIDR,
//! and (with `pinDir`) registration with skiff's eBPF datapath. The binary is `src/main.rs`;
//! this library holds the pieces so the agent can reuse the config and naming.
//!
//! Network configuration (one plugin of a conflist):
//! `{"cniVersion":"1.1.0","name":"skiff","type":"skiff-cni","podCIDR":"10.244.1.0/24",
//!   "pinDir":"/sys/fs/bpf/skiff/node-1","dataDir":"/var/lib/cni/skiff/node-1","mtu":1500}`

pub mod config;
pub mod error;
pub mod ipam;
pub mod netlink;
pub mod plugin;
pub mod result;

use sha2::{Digest, Sha256};

/// The host side of a pod's veth: `skf` + the first 8 hex digits of SHA-256 of
/// `<containerId>/<ifname>` (11 characters, within IFNAMSIZ; '/' appears in neither part).
/// Deterministic, so DEL finds it without any state.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    format!(
        "skf{:02x}{:02x}{:02x}{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_veth_names_are_stable_and_short() {
        let a = super::host_veth_name("abc", "eth0");
        assert_eq!(a, super::host_veth_name("abc", "eth0"));
        assert_ne!(a, super::host_veth_name("abc", "eth1"));
        assert_eq!(a.len(), 11);
        assert!(a.starts_with("skf"));
        assert!(a[3..].bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
