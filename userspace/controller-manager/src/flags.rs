//! Command-line flags for the binary (`#[command(flatten)]` them), named as kube-controller-manager
//! and kube-scheduler name theirs, and the leader-elected entry points they feed.

use std::future::Future;
use std::time::Duration;

use clap::{ArgAction, Args};

use crate::{ControllerOptions, LeaderElection, parse_duration, run_leader_elected};

/// Leader election flags (`skiff controller-manager`, `skiff scheduler`, `skiff server`).
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct LeaderElectionFlags {
    /// Run only while holding a Lease in kube-system, so several instances can run side by side
    /// with one acting (--leader-elect=false runs unconditionally: one instance per cluster).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub leader_elect: bool,
    /// How long standbys wait after the leader's last renewal before taking over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: Duration,
    /// How long the leader keeps acting without a successful renewal.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: Duration,
    /// How often to try to acquire or renew the Lease.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_retry_period: Duration,
}

impl LeaderElectionFlags {
    /// The election for the Lease `kube-system/<name>`, or None with --leader-elect=false.
    pub fn election(&self, lease_name: &str) -> Option<LeaderElection> {
        self.leader_elect.then(|| LeaderElection {
            lease_duration: self.leader_elect_lease_duration,
            renew_deadline: self.leader_elect_renew_deadline,
            retry_period: self.leader_elect_retry_period,
            ..LeaderElection::new("kube-system", lease_name)
        })
    }
}

/// Controller flags (`skiff controller-manager`, `skiff server`).
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ControllerFlags {
    /// The range every Node's spec.podCIDR is allocated from.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: ipnet::Ipv4Net,
    /// The prefix length of each Node's podCIDR.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// How long a Node may go without a heartbeat (Lease renewal or Ready heartbeat) before it
    /// is NotReady (Ready=Unknown) and tainted unreachable.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pub node_monitor_grace_period: Duration,
    /// The same for a Node that never posted a Ready condition.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub node_startup_grace_period: Duration,
    /// How often Node health is checked when nothing changes.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub node_monitor_period: Duration,
    /// Addresses for Services of type LoadBalancer, FIRST-LAST or a CIDR (e.g.
    /// 172.20.0.200-172.20.0.250); without it such Services stay pending, as without a cloud.
    #[arg(long)]
    pub loadbalancer_ip_pool: Option<crate::IpPool>,
    /// How often every HorizontalPodAutoscaler is evaluated.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub horizontal_pod_autoscaler_sync_period: Duration,
    /// How long an HPA remembers higher recommendations before it scales down (the scale-down
    /// stabilization window, unless the HPA's behavior sets its own).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub horizontal_pod_autoscaler_downscale_stabilization: Duration,
    #[command(flatten)]
    pub leader: LeaderElectionFlags,
}

impl ControllerFlags {
    pub fn options(&self) -> ControllerOptions {
        ControllerOptions {
            cluster_cidr: self.cluster_cidr,
            node_cidr_mask_size: self.node_cidr_mask_size,
            node_monitor_grace_period: self.node_monitor_grace_period,
            node_startup_grace_period: self.node_startup_grace_period,
            node_monitor_period: self.node_monitor_period,
            loadbalancer_ip_pool: self.loadbalancer_ip_pool,
            hpa_sync_period: self.horizontal_pod_autoscaler_sync_period,
            hpa_downscale_stabilization: self.horizontal_pod_autoscaler_downscale_stabilization,
        }
    }
}

/// The controllers as `skiff controller-manager` runs them: leader-elected through
/// `kube-system/skiff-controller-manager` unless --leader-elect=false.
pub async fn run_controller_manager(
    client: kube::Client,
    flags: &ControllerFlags,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let options = flags.options();
    match flags.leader.election("skiff-controller-manager") {
        None => crate::run_controllers_with(client, options, shutdown).await,
        Some(election) => {
            let c = client.clone();
            run_leader_elected(client, election, shutdown, move |stop| {
                crate::run_controllers_with(c.clone(), options.clone(), stop)
            })
            .await
        }
    }
}

/// The scheduler as `skiff scheduler` runs it: leader-elected through
/// `kube-system/skiff-scheduler` unless --leader-elect=false.
pub async fn run_scheduler_elected(
    client: kube::Client,
    flags: &LeaderElectionFlags,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    match flags.election("skiff-scheduler") {
        None => crate::run_scheduler(client, shutdown).await,
        Some(election) => {
            let c = client.clone();
            run_leader_elected(client, election, shutdown, move |stop| {
                crate::run_scheduler(c.clone(), stop)
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: ControllerFlags,
    }

    #[test]
    fn defaults_are_kubernetes_defaults() {
        let cli = Cli::try_parse_from(["x"]).expect("parses");
        assert_eq!(cli.flags.options(), ControllerOptions::default());
        let e = cli
            .flags
            .leader
            .election("skiff-controller-manager")
            .expect("on by default");
        assert_eq!(e.lease_duration, Duration::from_secs(15));
        assert_eq!(e.renew_deadline, Duration::from_secs(10));
        assert_eq!(e.retry_period, Duration::from_secs(2));
        assert_eq!(e.namespace, "kube-system");
    }

    #[test]
    fn flags_parse_and_bad_values_are_refused() {
        let cli = Cli::try_parse_from([
            "x",
            "--cluster-cidr",
            "10.200.0.0/16",
            "--node-cidr-mask-size",
            "26",
            "--node-monitor-grace-period",
            "3s",
            "--leader-elect=false",
        ])
        .expect("parses");
        assert_eq!(
            cli.flags.options().node_monitor_grace_period,
            Duration::from_secs(3)
        );
        assert_eq!(cli.flags.options().node_cidr_mask_size, 26);
        assert!(cli.flags.leader.election("x").is_none());
        assert!(Cli::try_parse_from(["x", "--cluster-cidr", "10.200.0.0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--node-monitor-grace-period", "soon"]).is_err());
    }
}
