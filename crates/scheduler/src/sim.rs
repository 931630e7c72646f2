//! Seeded cluster and workload simulator, baseline algorithms and packing metrics.
//!
//! Everything here is pure and deterministic for a seed; timing is left to the caller (the
//! `simulate` example and the criterion bench wrap [`Simulation::decide`] with a clock).
//!
//! - [`generate_nodes`]: heterogeneous nodes (five shapes from 8 CPU / 32 GiB to 64 CPU / 256 GiB
//!   plus a high-memory shape), spread round-robin over zones, ~45% VM-capable, `disk`, `tier`
//!   and `gpu` labels, 1% cordoned, 0.5% not ready, random background load.
//! - [`generate_workload`]: a t-shirt size mix (nano 0.5 CPU / 512 MiB .. 2xl 16 CPU / 64 GiB),
//!   15% VMs, ~15% with constraints, 20% in spread groups of ~10 (a quarter of them hard
//!   anti-affinity), four priority levels, and exponential lifetimes sized so the live demand
//!   settles near a target fraction of the cluster's memory.
//! - [`Simulation`]: replays the workload (departures, then one decision per request) with one
//!   [`Algorithm`], and reports packing efficiency, stranded resources and zone balance.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use crate::rng::SplitMix64;
use crate::{Cluster, Constraint, InstanceRequest, Node, Policy, Resources, Strategy, Utilization};

const GIB: u64 = 1 << 30;

/// Node shapes: (cpu millis, memory GiB, disk GiB, network Mbit/s, weight, VM probability).
const SHAPES: [(u64, u64, u64, u64, f64, f64); 5] = [
    (8_000, 32, 500, 10_000, 0.30, 0.2),
    (16_000, 64, 1_000, 10_000, 0.35, 0.4),
    (32_000, 128, 2_000, 25_000, 0.20, 0.7),
    (64_000, 256, 4_000, 25_000, 0.10, 0.8),
    (16_000, 256, 1_000, 10_000, 0.05, 0.5),
];

/// Request sizes: (cpu millis, memory MiB, disk GiB, weight).
const SIZES: [(u64, u64, u64, f64); 6] = [
    (500, 512, 10, 0.25),
    (1_000, 2_048, 20, 0.30),
    (2_000, 4_096, 40, 0.20),
    (4_000, 16_384, 80, 0.13),
    (8_000, 32_768, 160, 0.09),
    (16_000, 65_536, 320, 0.03),
];

/// The smallest request of the mix (used for the stranded-resource metric).
pub const SMALLEST_REQUEST: Resources = Resources {
    cpu_millis: 500,
    memory_bytes: 512 << 20,
    disk_bytes: 10 * GIB,
};

/// Zone names `zone-a`, `zone-b`, ...
pub fn zone_name(z: usize) -> String {
    format!("zone-{}", (b'a' + (z % 26) as u8) as char)
}

/// Generates `n` heterogeneous nodes over `zones` zones.
pub fn generate_nodes(seed: u64, n: usize, zones: usize) -> Vec<Node> {
    let mut rng = SplitMix64::new(seed ^ 0x6e6f_6465);
    let weights: Vec<f64> = SHAPES.iter().map(|s| s.4).collect();
    (0..n)
        .map(|i| {
            let (cpu, mem, disk, net, _, vm_p) = SHAPES[rng.weighted(&weights)];
            let mut labels = BTreeMap::new();
            labels.insert(
                "disk".to_string(),
                if rng.chance(0.6) { "ssd" } else { "hdd" }.to_string(),
            );
            labels.insert(
                "tier".to_string(),
                if rng.chance(0.8) { "general" } else { "batch" }.to_string(),
            );
            if rng.chance(0.05) {
                labels.insert("gpu".to_string(), "true".to_string());
            }
            Node {
                name: format!("node-{i:05}"),
                ready: !rng.chance(0.005),
                cordoned: rng.chance(0.01),
                vm_capable: rng.chance(vm_p),
                container_capable: true,
                capacity: Resources {
                    cpu_millis: cpu,
                    memory_bytes: mem * GIB,
                    disk_bytes: disk * GIB,
                },
                zone: zone_name(i % zones.max(1)),
                labels,
                measured: Utilization {
                    cpu: rng.next_f64() * 0.1,
                    memory: rng.next_f64() * 0.05,
                    network: rng.next_f64() * 0.3,
                },
                network_mbps: net,
                ..Node::default()
            }
        })
        .collect()
}

/// One request of a workload with its lifetime, in arrivals.
#[derive(Debug, Clone, PartialEq)]
pub struct SimRequest {
    /// The request.
    pub request: InstanceRequest,
    /// It departs this many arrivals after it was placed.
    pub lifetime: u64,
}

/// Generates `count` mixed requests for `nodes`; lifetimes make the live memory demand settle
/// near `occupancy` of the cluster's memory (use `f64::INFINITY` for no departures).
pub fn generate_workload(
    seed: u64,
    count: usize,
    nodes: &[Node],
    zones: usize,
    occupancy: f64,
) -> Vec<SimRequest> {
    let mut rng = SplitMix64::new(seed ^ 0x776f_726b);
    let weights: Vec<f64> = SIZES.iter().map(|s| s.3).collect();
    let mean_mem: f64 = SIZES.iter().map(|s| s.1 as f64 * s.3).sum::<f64>()
        / weights.iter().sum::<f64>()
        * (1u64 << 20) as f64;
    let total_mem: f64 = nodes.iter().map(|n| n.capacity.memory_bytes as f64).sum();
    let mean_life = (occupancy * total_mem / mean_mem).max(1.0);
    let groups = (count / 50).max(1);
    (0..count)
        .map(|_| {
            let (cpu, mem, disk, _) = SIZES[rng.weighted(&weights)];
            let mut constraints = Vec::new();
            let c = rng.next_f64();
            if c < 0.10 {
                constraints.push(Constraint::eq("disk", "ssd"));
            } else if c < 0.13 && zones >= 2 {
                constraints.push(Constraint::one_of(
                    "zone",
                    &[zone_name(0).as_str(), zone_name(1).as_str()],
                ));
            } else if c < 0.15 {
                constraints.push(Constraint::ne("tier", "batch"));
            }
            let (spread_group, anti_affinity) = if rng.chance(0.2) {
                (Some(format!("svc-{}", rng.below(groups))), rng.chance(0.25))
            } else {
                (None, false)
            };
            let priority = match rng.next_f64() {
                x if x < 0.10 => -100,
                x if x < 0.90 => 0,
                x if x < 0.98 => 100,
                _ => 1000,
            };
            let lifetime = if mean_life.is_finite() {
                (-(1.0 - rng.next_f64()).ln() * mean_life).ceil() as u64
            } else {
                u64::MAX
            };
            SimRequest {
                request: InstanceRequest {
                    resources: Resources {
                        cpu_millis: cpu,
                        memory_bytes: mem << 20,
                        disk_bytes: disk * GIB,
                    },
                    vm: rng.chance(0.15),
                    network_mbps: 10 + rng.below(490) as u64,
                    constraints,
                    spread_group,
                    anti_affinity,
                    priority,
                },
                lifetime: lifetime.max(1),
            }
        })
        .collect()
}

/// A placement algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// The first feasible node in index order.
    FirstFit,
    /// A uniformly random feasible node (up to 64 random probes, then a scan from a random start).
    Random,
    /// The better-scored of two random feasible nodes.
    PowerOfTwo,
    /// The full engine: exact best node under the full filter and score, through the
    /// branch-and-bound index ([`Cluster::try_place`]).
    FullScore,
    /// The same decision by a linear scan that scores every node
    /// ([`Cluster::try_place_linear`]); the reference for `FullScore`.
    FullScan,
}

impl Algorithm {
    /// All algorithms, in report order.
    pub const ALL: [Self; 5] = [
        Self::FirstFit,
        Self::Random,
        Self::PowerOfTwo,
        Self::FullScore,
        Self::FullScan,
    ];

    /// Short name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::FirstFit => "first-fit",
            Self::Random => "random",
            Self::PowerOfTwo => "power-of-two",
            Self::FullScore => "full-score",
            Self::FullScan => "full-scan",
        }
    }
}

/// Results of a simulation run (the live set at the end of the run).
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Decisions that placed an instance.
    pub placed: usize,
    /// Decisions that found no node.
    pub failed: usize,
    /// Nodes hosting at least one instance.
    pub nodes_used: usize,
    /// Fewest nodes that could hold the live demand: per dimension, the largest schedulable nodes
    /// taken until their limits cover the demand; the worst dimension.
    pub lower_bound: usize,
    /// Free CPU on nodes where the smallest request no longer fits, as a fraction of used nodes'
    /// CPU limits.
    pub stranded_cpu: f64,
    /// Same for memory.
    pub stranded_memory: f64,
    /// Mean over spread groups with at least one member per zone available of (max − min)
    /// members per zone.
    pub group_zone_skew: f64,
    /// Highest minus lowest memory utilisation among zones (fraction).
    pub zone_util_gap: f64,
}

impl SimReport {
    /// `nodes_used / lower_bound`.
    pub fn efficiency(&self) -> f64 {
        self.nodes_used as f64 / self.lower_bound.max(1) as f64
    }
}

/// A replay of a workload against a cluster with one algorithm.
#[derive(Debug)]
pub struct Simulation {
    cluster: Cluster,
    workload: Vec<SimRequest>,
    algorithm: Algorithm,
    rng: SplitMix64,
    next: usize,
    live: BinaryHeap<Reverse<(u64, usize, usize)>>,
    placed: usize,
    failed: usize,
}

impl Simulation {
    /// A simulation of `workload` on `nodes` under `policy`; `seed` drives the random algorithms.
    pub fn new(
        nodes: &[Node],
        policy: Policy,
        workload: Vec<SimRequest>,
        algorithm: Algorithm,
        seed: u64,
    ) -> Self {
        Self {
            cluster: Cluster::new(nodes, policy),
            workload,
            algorithm,
            rng: SplitMix64::new(seed),
            next: 0,
            live: BinaryHeap::new(),
            placed: 0,
            failed: 0,
        }
    }

    /// The engine (its state after the decisions so far).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Requests not yet decided.
    pub fn remaining(&self) -> usize {
        self.workload.len() - self.next
    }

    /// Releases the instances whose lifetime ended before the next arrival.
    pub fn depart(&mut self) {
        let now = self.next as u64;
        while let Some(Reverse((t, r, node))) = self.live.peek().copied() {
            if t > now {
                break;
            }
            self.live.pop();
            self.cluster.release(node, &self.workload[r].request);
        }
    }

    /// Decides (and commits) the next request: `Some(Some(node))`, `Some(None)` when nothing
    /// fits, `None` when the workload is exhausted.
    pub fn decide(&mut self) -> Option<Option<usize>> {
        let r = self.next;
        let req = &self.workload.get(r)?.request;
        let choice = match self.algorithm {
            Algorithm::FullScore => self.cluster.try_place(req),
            Algorithm::FullScan => self.cluster.try_place_linear(req),
            Algorithm::FirstFit => first_fit(&mut self.cluster, req),
            Algorithm::Random => random_fit(&mut self.cluster, req, &mut self.rng, 1),
            Algorithm::PowerOfTwo => random_fit(&mut self.cluster, req, &mut self.rng, 2),
        };
        self.next += 1;
        if let Some(i) = choice {
            self.cluster.commit(i, req);
            let life = self.workload[r].lifetime;
            self.live
                .push(Reverse((self.next as u64 + life.min(u64::MAX / 4), r, i)));
            self.placed += 1;
        } else {
            self.failed += 1;
        }
        Some(choice)
    }

    /// Runs the rest of the workload.
    pub fn run(&mut self) {
        loop {
            self.depart();
            if self.decide().is_none() {
                break;
            }
        }
    }

    /// Metrics of the live set now.
    pub fn report(&self) -> SimReport {
        let c = &self.cluster;
        let n = c.len();
        let schedulable: Vec<usize> = (0..n).filter(|&i| c.is_schedulable(i)).collect();
        let mut demand = [0u128; 3];
        let mut used = 0;
        let (mut lim_used, mut stranded) = ([0u128; 2], [0u128; 2]);
        let small = SMALLEST_REQUEST.to_array();
        let zones = c.zones().len();
        let mut zone_mem = vec![(0u128, 0u128); zones];
        for i in 0..n {
            let a = c.allocated(i);
            let l = c.limits(i);
            for d in 0..3 {
                demand[d] += u128::from(a[d]);
            }
            let z = c.zone_index(i);
            zone_mem[z].0 += u128::from(a[1]);
            zone_mem[z].1 += u128::from(l[1]);
            if c.instance_count(i) > 0 {
                used += 1;
                let free = [0, 1, 2].map(|d| l[d].saturating_sub(a[d]));
                let exhausted = (0..3).any(|d| free[d] < small[d]);
                for d in 0..2 {
                    lim_used[d] += u128::from(l[d]);
                    if exhausted {
                        stranded[d] += u128::from(free[d]);
                    }
                }
            }
        }
        let mut lower_bound = 0;
        for d in 0..3 {
            let mut caps: Vec<u64> = schedulable.iter().map(|&i| c.limits(i)[d]).collect();
            caps.sort_unstable_by(|a, b| b.cmp(a));
            let mut acc = 0u128;
            let mut k = 0;
            while acc < demand[d] && k < caps.len() {
                acc += u128::from(caps[k]);
                k += 1;
            }
            lower_bound = lower_bound.max(k);
        }
        let skews: Vec<f64> = c
            .groups
            .iter()
            .filter(|g| g.zones.iter().sum::<u32>() as usize >= zones)
            .map(|g| {
                let max = g.zones.iter().max().copied().unwrap_or(0);
                let min = g.zones.iter().min().copied().unwrap_or(0);
                f64::from(max - min)
            })
            .collect();
        let utils: Vec<f64> = zone_mem
            .iter()
            .map(|&(a, l)| a as f64 / l.max(1) as f64)
            .collect();
        let frac = |s: u128, t: u128| s as f64 / t.max(1) as f64;
        SimReport {
            placed: self.placed,
            failed: self.failed,
            nodes_used: used,
            lower_bound,
            stranded_cpu: frac(stranded[0], lim_used[0]),
            stranded_memory: frac(stranded[1], lim_used[1]),
            group_zone_skew: if skews.is_empty() {
                0.0
            } else {
                skews.iter().sum::<f64>() / skews.len() as f64
            },
            zone_util_gap: utils.iter().copied().fold(f64::MIN, f64::max)
                - utils.iter().copied().fold(f64::MAX, f64::min),
        }
    }
}

fn first_fit(c: &mut Cluster, req: &InstanceRequest) -> Option<usize> {
    let p = c.prepare(req);
    (0..c.len()).find(|&i| c.fits_prepared(i, &p, req))
}

/// `k = 1`: random feasible node; `k = 2`: the better of two (by the policy's strategy).
fn random_fit(
    c: &mut Cluster,
    req: &InstanceRequest,
    rng: &mut SplitMix64,
    k: usize,
) -> Option<usize> {
    let p = c.prepare(req);
    let n = c.len();
    if n == 0 {
        return None;
    }
    let mut found: [usize; 2] = [usize::MAX; 2];
    let mut got = 0;
    for _ in 0..64 {
        let i = rng.below(n);
        if c.fits_prepared(i, &p, req) && (got == 0 || found[0] != i) {
            found[got] = i;
            got += 1;
            if got == k {
                break;
            }
        }
    }
    if got < k {
        let start = rng.below(n);
        for j in 0..n {
            let i = (start + j) % n;
            if c.fits_prepared(i, &p, req) && (got == 0 || found[0] != i) {
                found[got] = i;
                got += 1;
                if got == k {
                    break;
                }
            }
        }
    }
    match got {
        0 => None,
        1 => Some(found[0]),
        _ => {
            let (a, b) = (found[0], found[1]);
            let (sa, sb) = (c.score_prepared(a, &p), c.score_prepared(b, &p));
            let a_better = match c.policy().strategy {
                Strategy::Spread => sa <= sb,
                Strategy::Binpack => sa >= sb,
            };
            Some(if a_better { a } else { b })
        }
    }
}
