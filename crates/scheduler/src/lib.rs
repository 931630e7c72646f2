//! Pure placement engine: given a snapshot of the cluster and a request, choose a node or say
//! exactly why none fits. No I/O; deterministic for the same input.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A node as the scheduler sees it.
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

/// What is being placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Resources requested.
    pub resources: Resources,
    /// Needs VM support.
    pub vm: bool,
}

/// Overcommit ratios and limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// CPU overcommit (requests may sum to `ratio × capacity`). Default 4.0.
    pub cpu_overcommit: f64,
    /// Memory overcommit. Default 1.0 (none).
    pub memory_overcommit: f64,
    /// Disk overcommit. Default 2.0 (overlay and qcow2 disks are thin).
    pub disk_overcommit: f64,
    /// Max instances per node. Default 250 (one /24 per node).
    pub max_instances_per_node: u32,
    /// Strategy.
    pub strategy: Strategy,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            disk_overcommit: 2.0,
            max_instances_per_node: 250,
            strategy: Strategy::Spread,
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
    /// Maximise it among the nodes that fit.
    Binpack,
}

/// Why a node was filtered out.
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

fn fits(have: u64, used: u64, want: u64, ratio: f64) -> bool {
    (used + want) as f64 <= have as f64 * ratio
}

/// The first reason `node` cannot take `req`, if any.
pub fn filter(node: &NodeView, req: &Request, policy: &Policy) -> Option<Reason> {
    let r = &req.resources;
    if !node.ready {
        Some(Reason::NotReady)
    } else if node.cordoned {
        Some(Reason::Cordoned)
    } else if req.vm && !node.vm_capable {
        Some(Reason::NoVmSupport)
    } else if !req.vm && !node.container_capable {
        Some(Reason::NoContainerSupport)
    } else if node.instance_count >= policy.max_instances_per_node {
        Some(Reason::TooManyInstances)
    } else if !fits(
        node.capacity.cpu_millis,
        node.allocated.cpu_millis,
        r.cpu_millis,
        policy.cpu_overcommit,
    ) {
        Some(Reason::InsufficientCpu)
    } else if !fits(
        node.capacity.memory_bytes,
        node.allocated.memory_bytes,
        r.memory_bytes,
        policy.memory_overcommit,
    ) {
        Some(Reason::InsufficientMemory)
    } else if !fits(
        node.capacity.disk_bytes,
        node.allocated.disk_bytes,
        r.disk_bytes,
        policy.disk_overcommit,
    ) {
        Some(Reason::InsufficientDisk)
    } else {
        None
    }
}

/// Utilisation after placement: the mean of the CPU and memory fractions (0..1+).
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

/// Chooses a node for `req`. Ties break by node name, so the result is deterministic.
pub fn place<'a>(
    nodes: &'a [NodeView],
    req: &Request,
    policy: &Policy,
) -> Result<&'a NodeView, Unschedulable> {
    let mut best: Option<(&NodeView, f64)> = None;
    let mut reasons = BTreeMap::new();
    let mut per_node = Vec::new();
    for n in nodes {
        if let Some(r) = filter(n, req, policy) {
            *reasons.entry(r).or_insert(0) += 1;
            per_node.push((n.name.clone(), r));
            continue;
        }
        let s = score(n, req);
        let better = match best {
            None => true,
            Some((b, bs)) => match policy.strategy {
                Strategy::Spread => s.total_cmp(&bs).then_with(|| n.name.cmp(&b.name)).is_lt(),
                Strategy::Binpack => bs.total_cmp(&s).then_with(|| n.name.cmp(&b.name)).is_lt(),
            },
        };
        if better {
            best = Some((n, s));
        }
    }
    best.map(|(n, _)| n).ok_or(Unschedulable {
        total: nodes.len(),
        reasons,
        per_node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: u64, mem: u64) -> NodeView {
        NodeView {
            name: name.into(),
            ready: true,
            cordoned: false,
            vm_capable: false,
            container_capable: true,
            capacity: Resources {
                cpu_millis: cpu,
                memory_bytes: mem,
                disk_bytes: 1 << 40,
            },
            allocated: Resources::default(),
            instance_count: 0,
        }
    }

    fn req(cpu: u64, mem: u64) -> Request {
        Request {
            resources: Resources {
                cpu_millis: cpu,
                memory_bytes: mem,
                disk_bytes: 1,
            },
            vm: false,
        }
    }

    #[test]
    fn spread_prefers_least_loaded_and_binpack_the_most() {
        let mut a = node("a", 4000, 8 << 30);
        a.allocated.memory_bytes = 4 << 30;
        let b = node("b", 4000, 8 << 30);
        let nodes = vec![a, b];
        assert_eq!(
            place(&nodes, &req(1000, 1 << 30), &Policy::default())
                .unwrap()
                .name,
            "b"
        );
        let bp = Policy {
            strategy: Strategy::Binpack,
            ..Policy::default()
        };
        assert_eq!(place(&nodes, &req(1000, 1 << 30), &bp).unwrap().name, "a");
    }

    #[test]
    fn unschedulable_counts_reasons() {
        let mut c = node("c", 4000, 1 << 30);
        c.cordoned = true;
        let mut d = node("d", 4000, 1 << 30);
        d.ready = false;
        let nodes = vec![node("a", 4000, 1 << 30), node("b", 4000, 1 << 30), c, d];
        let e = place(&nodes, &req(1000, 2 << 30), &Policy::default()).unwrap_err();
        assert_eq!(e.reasons[&Reason::InsufficientMemory], 2);
        assert_eq!(e.reasons[&Reason::Cordoned], 1);
        let msg = e.to_string();
        assert!(
            msg.starts_with("0 of 4 nodes fit: 2 insufficient memory, 1 not ready, 1 cordoned"),
            "{msg}"
        );
        let vm = Request {
            vm: true,
            ..req(1, 1)
        };
        let e = place(&nodes[..2], &vm, &Policy::default()).unwrap_err();
        assert_eq!(e.reasons[&Reason::NoVmSupport], 2);
    }

    #[test]
    fn cpu_overcommit() {
        let n = vec![node("a", 1000, 8 << 30)];
        assert!(place(&n, &req(4000, 1), &Policy::default()).is_ok());
        assert!(place(&n, &req(4001, 1), &Policy::default()).is_err());
    }
}
