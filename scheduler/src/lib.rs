//! skiff-scheduler: the scheduler's decision core, a filter/score framework with no I/O.
//!
//! The controller that watches the apiserver builds a [`ClusterSnapshot`] from the Nodes and the
//! bound Pods, asks [`Scheduler::schedule`] where each pending Pod should go, binds it, and calls
//! [`ClusterSnapshot::assume`] so the next decision sees it (as kube-scheduler's cache does).
//! A pod that fits nowhere gets [`ScheduleError::Unschedulable`] whose message is the text
//! kube-scheduler puts in the PodScheduled=False condition and the FailedScheduling event.
//!
//! Plugins (kube-scheduler 1.32 names, order and weights, see [`Scheduler::default_plugins`]):
//! NodeUnschedulable, NodeName, TaintToleration, NodeAffinity, NodePorts, NodeResourcesFit,
//! PodTopologySpread, InterPodAffinity filter; TaintToleration, NodeAffinity, NodeResourcesFit
//! (LeastAllocated), PodTopologySpread, InterPodAffinity, NodeResourcesBalancedAllocation score.
//!
//! Not implemented (kube-scheduler has them): preemption (the message leaves out its
//! "preemption: ..." part), the volume plugins (VolumeBinding, VolumeZone, NodeVolumeLimits,
//! VolumeRestrictions), ImageLocality, dynamic resource allocation, pod-level resources, scoring
//! strategies other than LeastAllocated, the system default topology spreading (it needs the
//! pod's Services and ReplicaSets), and percentageOfNodesToScore (every feasible node is scored).
//!
//! ```
//! use skiff_scheduler::{ClusterSnapshot, Scheduler, fixtures::{node, pod}};
//! let nodes = [node("n1").allocatable("4", "8Gi", 110).build()];
//! let mut snapshot = ClusterSnapshot::new(&nodes, &[]);
//! let web = pod("default", "web").request("500m", "1Gi").build();
//! let result = Scheduler::default_plugins().schedule(&web, &snapshot).expect("fits");
//! snapshot.assume(&web, &result.node).expect("known node");
//! assert_eq!(result.node, "n1");
//! ```

pub mod fixtures;
mod framework;
pub mod plugins;
pub mod quantity;
pub mod queue;
pub mod resources;
mod snapshot;

pub use framework::{
    FilterPlugin, MAX_NODE_SCORE, NodeFilter, NodeScore, ScheduleError, ScheduleResult, Scheduler,
    ScorePlugin, Unschedulable, WeightedScorePlugin,
};
pub use snapshot::{
    AffinityTerm, ClusterSnapshot, HostPort, NodeInfo, PodInfo, Selector, SnapshotError,
    SpreadConstraint, WeightedAffinityTerm,
};
