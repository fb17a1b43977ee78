//! skiff-bench: benchmarks whose results live in bench/results/.
//!
//! - `svc`: the Service datapath benchmark behind the `svcbench` binary (skiff's eBPF socket, tc
//!   and XDP layers against kube-proxy-shaped iptables-legacy, iptables-nft and nftables rules and
//!   the direct pod path, on one netns lab, in one run).
//! - `cluster`: end-to-end timings on a `skiff up` cluster (`svcbench cluster`): kubectl scale /
//!   apply until the new endpoints answer through the Service, against the API's own Ready times.
//! - `load`: the API under load behind the `loadbench` binary (simulated nodes, pods, Services,
//!   watches on a real `skiff server`; the agent's proxy + DNS memory with many Services).

pub mod cluster;
pub mod load;
pub mod svc;
