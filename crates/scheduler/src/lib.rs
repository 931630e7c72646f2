//! Pure placement engine: given a snapshot of the cluster and a request, choose a node or say
//! exactly why none fits. No I/O, no clock, no hidden randomness: the same input always gives the
//! same output (the simulator takes an explicit seed).
//!
//! Layers:
//! - [`place`], [`filter`], [`score`]: the original one-shot API over [`NodeView`] / [`Request`]
//!   (kept source-compatible for the state machine).
//! - [`Cluster`]: the indexed engine. Built once from a snapshot of [`Node`]s, it places
//!   [`InstanceRequest`]s in a tight scan over precomputed per-node free vectors, returns node
//!   indices (no allocation, no `String` clones on success), and commits allocations
//!   incrementally ([`Cluster::commit`], [`Cluster::place_batch`]).
//! - [`constraint`]: label/zone constraints (`disk=ssd`, `tier!=batch`, `zone in (a,b)`).
//! - [`adaptive`]: weights that follow cluster-wide pressure with hysteresis.
//! - [`preempt`]: priority classes and the minimal-victim preemption planner.
//! - [`validate`]: typed validation errors naming the offending field.
//! - [`sim`]: a seeded cluster/workload simulator and baseline algorithms for benchmarks.

// Index loops over the three resource dimensions read better than zipped iterators, short math
// names mirror the documented formulas, and exact float comparison is intended where ties are
// broken deterministically.
#![allow(
    clippy::needless_range_loop,
    clippy::many_single_char_names,
    clippy::float_cmp
)]

pub mod adaptive;
mod batch;
mod cluster;
pub mod constraint;
pub mod preempt;
pub mod rng;
pub mod sim;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use adaptive::{AdaptiveConfig, AdaptiveWeights, Pressure};
pub use batch::BatchError;
pub use cluster::Cluster;
pub use constraint::{Constraint, ConstraintOp};
pub use preempt::{plan_preemption, PreemptionPlan, PriorityClasses, RunningInstance};
pub use validate::PolicyError;

/// A node as the scheduler sees it (the original, minimal view; see [`Node`] for the full one).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Heartbeating and healthy.
    pub ready: bool,
    /// Excluded from new placements.
    pub cordoned: bool,
    /// Can run VMs.
    pub vm_capable: bool,
    /// Can run containers.
    pub container_capable: bool,
    /// Capacity: milli-CPUs, memory bytes, disk bytes.
    pub capacity: Resources,
    /// Sum of the requests of instances placed on it.
    pub allocated: Resources,
    /// Instances placed on it.
    pub instance_count: u32,
}

impl Default for NodeView {
    /// A ready, uncordoned, container-capable node with no capacity.
    fn default() -> Self {
        Self {
            name: String::new(),
            ready: true,
            cordoned: false,
            vm_capable: false,
            container_capable: true,
            capacity: Resources::default(),
            allocated: Resources::default(),
            instance_count: 0,
        }
    }
}

/// A node in a cluster snapshot: everything in [`NodeView`] plus zone, labels, measured
/// utilisation, network capacity and the spread groups already on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// Heartbeating and healthy.
    pub ready: bool,
    /// Excluded from new placements (cordoned or draining).
    pub cordoned: bool,
    /// Can run VMs.
    pub vm_capable: bool,
    /// Can run containers.
    pub container_capable: bool,
    /// Capacity: milli-CPUs, memory bytes, disk bytes.
    pub capacity: Resources,
    /// Sum of the requests of instances placed on it.
    pub allocated: Resources,
    /// Instances placed on it.
    pub instance_count: u32,
    /// Failure domain (empty: none).
    pub zone: String,
    /// Node labels, matched by [`Constraint`]s.
    pub labels: BTreeMap<String, String>,
    /// Measured utilisation (fractions of physical capacity, 0..1).
    pub measured: Utilization,
    /// Network capacity in Mbit/s (0: unknown; the network term then uses `measured.network`).
    pub network_mbps: u64,
    /// Network bandwidth reserved by instances on it, Mbit/s.
    pub network_allocated_mbps: u64,
    /// Spread-group members already on the node: group name -> count.
    pub groups: BTreeMap<String, u32>,
}

impl Default for Node {
    /// A ready, uncordoned, container-capable node with no capacity.
    fn default() -> Self {
        Self::from(&NodeView::default())
    }
}

impl From<&NodeView> for Node {
    fn from(v: &NodeView) -> Self {
        Self {
            name: v.name.clone(),
            ready: v.ready,
            cordoned: v.cordoned,
            vm_capable: v.vm_capable,
            container_capable: v.container_capable,
            capacity: v.capacity,
            allocated: v.allocated,
            instance_count: v.instance_count,
            zone: String::new(),
            labels: BTreeMap::new(),
            measured: Utilization::default(),
            network_mbps: 0,
            network_allocated_mbps: 0,
            groups: BTreeMap::new(),
        }
    }
}

/// Measured utilisation per dimension, as fractions of physical capacity (0..1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Utilization {
    /// CPU busy fraction.
    pub cpu: f64,
    /// Memory used fraction.
    pub memory: f64,
    /// Network bandwidth used fraction.
    pub network: f64,
}

/// A resource vector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Milli-CPUs.
    pub cpu_millis: u64,
    /// Memory bytes.
    pub memory_bytes: u64,
    /// Disk bytes.
    pub disk_bytes: u64,
}

impl Resources {
    /// The vector as `[cpu, memory, disk]`.
    pub fn to_array(self) -> [u64; 3] {
        [self.cpu_millis, self.memory_bytes, self.disk_bytes]
    }

    /// Component-wise saturating sum.
    #[must_use]
    pub fn saturating_add(self, o: Self) -> Self {
        Self {
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(o.memory_bytes),
            disk_bytes: self.disk_bytes.saturating_add(o.disk_bytes),
        }
    }
}

/// What is being placed (the original, minimal request; see [`InstanceRequest`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// Resources requested.
    pub resources: Resources,
    /// Needs VM support.
    pub vm: bool,
}

/// A full placement request: resources, instance type, constraints, spread group, priority.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceRequest {
    /// Resources requested.
    pub resources: Resources,
    /// Instance type: `true` for a VM (needs VM support), `false` for a container.
    pub vm: bool,
    /// Expected network bandwidth, Mbit/s (scored, not filtered).
    pub network_mbps: u64,
    /// Label and zone constraints; all must hold.
    pub constraints: Vec<Constraint>,
    /// Spread group. Members of a group are spread softly: a new member goes to the zone with the
    /// fewest members of the group, then to the node with the fewest, and only then by score.
    pub spread_group: Option<String>,
    /// Hard anti-affinity: never share a node with another member of `spread_group`.
    pub anti_affinity: bool,
    /// Priority value (resolve a class name with [`PriorityClasses::resolve`]); higher may preempt
    /// lower through [`plan_preemption`].
    pub priority: i32,
}

impl From<&Request> for InstanceRequest {
    fn from(r: &Request) -> Self {
        Self {
            resources: r.resources,
            vm: r.vm,
            ..Self::default()
        }
    }
}

/// Score weights of the objective `cpu·u_cpu + memory·u_mem + network·u_net`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Weights {
    /// CPU weight. Default 0.4.
    pub cpu: f64,
    /// Memory weight. Default 0.4.
    pub memory: f64,
    /// Network weight. Default 0.2.
    pub network: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            cpu: 0.4,
            memory: 0.4,
            network: 0.2,
        }
    }
}

impl Weights {
    /// The weights as `[cpu, memory, network]`.
    pub fn to_array(self) -> [f64; 3] {
        [self.cpu, self.memory, self.network]
    }

    /// The weights scaled to sum to 1 (unchanged if they sum to 0).
    #[must_use]
    pub fn normalized(self) -> Self {
        let s = self.cpu + self.memory + self.network;
        if s > 0.0 {
            Self {
                cpu: self.cpu / s,
                memory: self.memory / s,
                network: self.network / s,
            }
        } else {
            self
        }
    }
}

/// Overcommit ratios, limits, host reserve and scoring weights.
///
/// Defaults: CPU overcommit 4.0, memory 1.0 (none), disk 2.0 (thin overlay and qcow2 disks),
/// 250 instances per node, spread, no host reserve, weights cpu 0.4 / memory 0.4 / network 0.2.
/// Check a policy with [`Policy::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// CPU overcommit (requests may sum to `ratio × (capacity − reserve)`). Default 4.0.
    pub cpu_overcommit: f64,
    /// Memory overcommit. Default 1.0 (none).
    pub memory_overcommit: f64,
    /// Disk overcommit. Default 2.0 (overlay and qcow2 disks are thin).
    pub disk_overcommit: f64,
    /// Max instances per node. Default 250 (one /24 per node).
    pub max_instances_per_node: u32,
    /// Strategy.
    pub strategy: Strategy,
    /// Capacity held back on every node for the host (agent, kernel, page cache). Default none;
    /// a typical production value is 500 milli-CPUs and 1 GiB.
    #[serde(default)]
    pub host_reserve: Resources,
    /// Score weights. Default cpu 0.4, memory 0.4, network 0.2.
    #[serde(default)]
    pub weights: Weights,
    /// The adaptive-weight control law (used by [`AdaptiveWeights`]).
    #[serde(default)]
    pub adaptive: AdaptiveConfig,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            disk_overcommit: 2.0,
            max_instances_per_node: 250,
            strategy: Strategy::Spread,
            host_reserve: Resources::default(),
            weights: Weights::default(),
            adaptive: AdaptiveConfig::default(),
        }
    }
}

/// Spread (least loaded first) or bin-pack (most loaded first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Minimise the post-placement utilisation.
    #[default]
    Spread,
    /// Maximise it among the nodes that fit; never open an empty node while a used one fits, and
    /// open the largest empty node first.
    Binpack,
}

/// Why a node was filtered out. Filters run in this order; a node is counted under the first that
/// fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Not ready.
    NotReady,
    /// Cordoned.
    Cordoned,
    /// No VM support.
    NoVmSupport,
    /// No container support.
    NoContainerSupport,
    /// Zone not allowed by a `zone` constraint.
    ZoneMismatch,
    /// A label constraint does not hold.
    ConstraintMismatch,
    /// Already hosts a member of the request's hard anti-affinity group.
    AntiAffinity,
    /// Too many instances.
    TooManyInstances,
    /// Not enough CPU.
    InsufficientCpu,
    /// Not enough memory.
    InsufficientMemory,
    /// Not enough disk.
    InsufficientDisk,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotReady => "not ready",
            Self::Cordoned => "cordoned",
            Self::NoVmSupport => "no VM support",
            Self::NoContainerSupport => "no container support",
            Self::ZoneMismatch => "zone mismatch",
            Self::ConstraintMismatch => "constraint mismatch",
            Self::AntiAffinity => "anti-affinity",
            Self::TooManyInstances => "too many instances",
            Self::InsufficientCpu => "insufficient cpu",
            Self::InsufficientMemory => "insufficient memory",
            Self::InsufficientDisk => "insufficient disk",
        })
    }
}

/// No node fits; counts per reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    /// Nodes considered.
    pub total: usize,
    /// Nodes rejected, by first failing reason.
    pub reasons: BTreeMap<Reason, usize>,
    /// Per-node reason, for the detailed message.
    pub per_node: Vec<(String, Reason)>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total == 0 {
            return f.write_str("0 of 0 nodes fit: no nodes are registered");
        }
        let mut counts: Vec<_> = self.reasons.iter().collect();
        counts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
        write!(f, "0 of {} nodes fit: {}", self.total, parts.join(", "))?;
        if self.per_node.len() <= 16 {
            let detail: Vec<String> = self
                .per_node
                .iter()
                .map(|(n, r)| format!("{n}: {r}"))
                .collect();
            write!(f, " ({})", detail.join("; "))?;
        }
        Ok(())
    }
}

impl std::error::Error for Unschedulable {}

/// The first reason `node` cannot take `req`, if any.
pub fn filter(node: &NodeView, req: &Request, policy: &Policy) -> Option<Reason> {
    let c = Cluster::new(&[Node::from(node)], *policy);
    c.reason(0, &InstanceRequest::from(req))
}

/// The legacy, unweighted score: the mean of the CPU and memory fractions of raw capacity after
/// placement (0..1+), ignoring overcommit, reserve and measured load. [`place`] and the engine use
/// the weighted objective of [`Cluster::score`] instead.
pub fn score(node: &NodeView, req: &Request) -> f64 {
    let frac = |used: u64, want: u64, cap: u64| {
        if cap == 0 {
            1.0
        } else {
            (used + want) as f64 / cap as f64
        }
    };
    let cpu = frac(
        node.allocated.cpu_millis,
        req.resources.cpu_millis,
        node.capacity.cpu_millis,
    );
    let mem = frac(
        node.allocated.memory_bytes,
        req.resources.memory_bytes,
        node.capacity.memory_bytes,
    );
    0.5 * cpu + 0.5 * mem
}

/// Chooses a node for `req` with the full filter and scoring of [`Cluster::place`]. Ties break
/// by node name, so the result is deterministic.
pub fn place<'a>(
    nodes: &'a [NodeView],
    req: &Request,
    policy: &Policy,
) -> Result<&'a NodeView, Unschedulable> {
    let full: Vec<Node> = nodes.iter().map(Node::from).collect();
    let mut c = Cluster::new(&full, *policy);
    c.place(&InstanceRequest::from(req)).map(|i| &nodes[i])
}

#[cfg(test)]
mod tests;
