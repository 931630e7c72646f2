//! The indexed placement engine.
//!
//! A [`Cluster`] is built once from a snapshot. Each node gets a 64-byte hot record (free vector
//! after reserve and overcommit, current weighted load, weight-scaled inverse capacities, instance
//! count, capability flags, zone) so a decision is one linear scan with three integer compares and
//! three multiply-adds per node, no allocation and no string handling. Label constraints are
//! resolved once per distinct constraint set into a cached bitmap; spread groups keep per-zone
//! counts and a small member list. Building the [`Unschedulable`] detail happens only on failure.
//!
//! ## Objective
//! For node `i` and dimension `d` in (cpu, memory, network), the current load is
//! `load_d = max(reserved_d / limit_d, measured_d)`, where `limit_d = (capacity_d − reserve_d) ×
//! overcommit_d` (network: capacity in Mbit/s, no overcommit). The score after placement is
//! `Σ_d w_d · (load_d + want_d / limit_d)`: minimised by `spread`, maximised by `binpack`.
//! Spread-group members first minimise (members in the zone, members on the node).
//!
//! **Binpack is a dominant-resource best fit.** It packs reservations, so its load ignores the
//! measured background (`load_d = reserved_d / limit_d`), and its weights are not the policy's
//! but follow the cluster-wide reserved pressure `p_d = Σ reserved_d / Σ limit_d` over the
//! schedulable nodes: `w_d ∝ p_d^4`, so the dimension that runs out first decides which node is
//! fullest (with the default CPU overcommit of 4 that is memory). They are set when the
//! snapshot is built and recomputed every 1,024 commits (a weight change re-keys every node,
//! O(nodes)). On the benchmark workload (churn, 10,000 nodes) this uses 1.03x the lower bound
//! of nodes instead of 1.085x with the policy weights and measured loads (docs/benchmarks.md).

use std::collections::{BTreeMap, HashMap};

use crate::constraint::ZONE_KEY;
use crate::{
    Constraint, InstanceRequest, Node, Policy, Reason, Resources, Strategy, Unschedulable, Weights,
};

mod index;

/// Binpack: exponent of the dominant-resource weights (`w_d ∝ p_d^4`).
const DOMINANT_EXPONENT: i32 = 4;
/// Binpack: commits between two recomputations of the dominant-resource weights.
const RETUNE_EVERY: u64 = 1024;

const OK: u8 = 1;
const VM: u8 = 2;
const CONTAINER: u8 = 4;

/// Hot per-node record, one cache line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(align(64))]
struct Hot {
    free: [i64; 3],
    base: f64,
    winv: [f64; 3],
    count: u32,
    flags: u8,
    empty: bool,
    zone: u16,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Group {
    /// Members per zone.
    pub(crate) zones: Vec<u32>,
    /// Members per node (node index -> count).
    pub(crate) nodes: BTreeMap<u32, u32>,
}

/// A prepared cluster snapshot that places requests and tracks allocations incrementally.
#[derive(Debug, Clone)]
pub struct Cluster {
    policy: Policy,
    weights: [f64; 3],
    hot: Vec<Hot>,
    names: Vec<String>,
    rank: Vec<u32>,
    pub(crate) zone_names: Vec<String>,
    labels: Vec<BTreeMap<String, String>>,
    ready: Vec<bool>,
    cordoned: Vec<bool>,
    limit: Vec<[u64; 3]>,
    alloc: Vec<[u64; 3]>,
    net_cap: Vec<u64>,
    net_alloc: Vec<u64>,
    measured: Vec<[f64; 3]>,
    pub(crate) group_ids: HashMap<String, u32>,
    pub(crate) groups: Vec<Group>,
    masks: HashMap<Vec<Constraint>, Vec<u64>>,
    scratch: Vec<u32>,
    trees: Vec<index::ZoneTree>,
    zone_trees: Vec<Vec<u32>>,
    leaf_pos: Vec<(u32, u32)>,
    zone_order: Vec<(u32, u32)>,
    /// Binpack: dominant-resource best fit (see the module docs).
    dominant: bool,
    commits: u64,
}

/// Index of a request's spread group, resolved once per decision.
#[derive(Clone, Copy)]
pub(crate) struct Prepared {
    pub(crate) want: [i64; 3],
    pub(crate) wantf: [f64; 3],
    pub(crate) need: u8,
    pub(crate) group: Option<u32>,
}

fn limit(cap: u64, reserve: u64, ratio: f64) -> u64 {
    (cap.saturating_sub(reserve) as f64 * ratio).floor() as u64
}

fn inv(x: u64) -> f64 {
    if x == 0 {
        0.0
    } else {
        1.0 / x as f64
    }
}

impl Cluster {
    /// Builds the engine from a snapshot. Node indices follow `nodes`.
    pub fn new(nodes: &[Node], policy: Policy) -> Self {
        let n = nodes.len();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|&a, &b| nodes[a as usize].name.cmp(&nodes[b as usize].name));
        let mut rank = vec![0; n];
        for (r, &i) in order.iter().enumerate() {
            rank[i as usize] = r as u32;
        }
        let mut zone_names: Vec<String> = Vec::new();
        let mut zone_idx: HashMap<&str, u16> = HashMap::new();
        let ratios = [
            policy.cpu_overcommit,
            policy.memory_overcommit,
            policy.disk_overcommit,
        ];
        let reserve = policy.host_reserve.to_array();
        let mut c = Self {
            policy,
            weights: policy.weights.to_array(),
            hot: Vec::with_capacity(n),
            names: Vec::with_capacity(n),
            rank,
            zone_names: Vec::new(),
            labels: Vec::with_capacity(n),
            ready: Vec::with_capacity(n),
            cordoned: Vec::with_capacity(n),
            limit: Vec::with_capacity(n),
            alloc: Vec::with_capacity(n),
            net_cap: Vec::with_capacity(n),
            net_alloc: Vec::with_capacity(n),
            measured: Vec::with_capacity(n),
            group_ids: HashMap::new(),
            groups: Vec::new(),
            masks: HashMap::new(),
            scratch: vec![0; n],
            trees: Vec::new(),
            zone_trees: Vec::new(),
            leaf_pos: vec![(0, 0); n],
            zone_order: Vec::new(),
            dominant: policy.strategy == Strategy::Binpack,
            commits: 0,
        };
        for node in nodes {
            let z = *zone_idx.entry(node.zone.as_str()).or_insert_with(|| {
                zone_names.push(node.zone.clone());
                (zone_names.len() - 1) as u16
            });
            let cap = node.capacity.to_array();
            let lim = [0, 1, 2].map(|d| limit(cap[d], reserve[d], ratios[d]));
            let mut flags = 0;
            if node.ready && !node.cordoned {
                flags |= OK;
            }
            if node.vm_capable {
                flags |= VM;
            }
            if node.container_capable {
                flags |= CONTAINER;
            }
            c.hot.push(Hot {
                flags,
                zone: z,
                count: node.instance_count,
                ..Hot::default()
            });
            c.names.push(node.name.clone());
            c.labels.push(node.labels.clone());
            c.ready.push(node.ready);
            c.cordoned.push(node.cordoned);
            c.limit.push(lim);
            c.alloc.push(node.allocated.to_array());
            c.net_cap.push(node.network_mbps);
            c.net_alloc.push(node.network_allocated_mbps);
            c.measured.push([
                node.measured.cpu,
                node.measured.memory,
                node.measured.network,
            ]);
        }
        c.zone_names = zone_names;
        for (i, node) in nodes.iter().enumerate() {
            for (g, &k) in &node.groups {
                if k > 0 {
                    let gid = c.group_id(g);
                    let zone = c.hot[i].zone as usize;
                    let grp = &mut c.groups[gid as usize];
                    grp.zones[zone] += k;
                    *grp.nodes.entry(i as u32).or_default() += k;
                }
            }
        }
        for i in 0..n {
            c.refresh(i);
        }
        c.build_index();
        if c.dominant {
            c.retune();
        }
        c
    }

    /// Binpack: sets the weights from the cluster-wide reserved pressure `p_d = Σ reserved_d /
    /// Σ limit_d` over schedulable nodes, `w_d ∝ p_d^DOMINANT_EXPONENT` (the scarcest dimension
    /// dominates), when one moved by more than 0.02. No reservations at all: the policy's
    /// weights. O(nodes) when the weights change.
    fn retune(&mut self) {
        let mut a = [0f64; 3];
        let mut l = [0f64; 3];
        for i in 0..self.hot.len() {
            if self.hot[i].flags & OK == 0 {
                continue;
            }
            for d in 0..2 {
                a[d] += self.alloc[i][d] as f64;
                l[d] += self.limit[i][d] as f64;
            }
            a[2] += self.net_alloc[i] as f64;
            l[2] += self.net_cap[i] as f64;
        }
        let w = [0, 1, 2].map(|d| {
            if l[d] > 0.0 {
                (a[d] / l[d]).powi(DOMINANT_EXPONENT)
            } else {
                0.0
            }
        });
        let sum: f64 = w.iter().sum();
        let w = if sum > 0.0 {
            w.map(|x| x / sum)
        } else {
            self.policy.weights.to_array()
        };
        if (0..3).any(|d| (w[d] - self.weights[d]).abs() > 0.02) {
            self.set_weights(Weights {
                cpu: w[0],
                memory: w[1],
                network: w[2],
            });
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.hot.len()
    }

    /// True if there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.hot.is_empty()
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Name of node `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Zone of node `i`.
    pub fn zone(&self, i: usize) -> &str {
        &self.zone_names[self.hot[i].zone as usize]
    }

    /// The distinct zones, in first-seen order.
    pub fn zones(&self) -> &[String] {
        &self.zone_names
    }

    /// Index of node `i`'s zone in [`Cluster::zones`].
    pub fn zone_index(&self, i: usize) -> usize {
        self.hot[i].zone as usize
    }

    /// Whether node `i` is ready and not cordoned.
    pub fn is_schedulable(&self, i: usize) -> bool {
        self.hot[i].flags & OK != 0
    }

    /// Labels of node `i`.
    pub fn labels(&self, i: usize) -> &BTreeMap<String, String> {
        &self.labels[i]
    }

    /// Allocation limits of node `i` after reserve and overcommit: `[cpu, memory, disk]`.
    pub fn limits(&self, i: usize) -> [u64; 3] {
        self.limit[i]
    }

    /// Current allocations of node `i`: `[cpu, memory, disk]`.
    pub fn allocated(&self, i: usize) -> [u64; 3] {
        self.alloc[i]
    }

    /// Instances on node `i`.
    pub fn instance_count(&self, i: usize) -> u32 {
        self.hot[i].count
    }

    /// Current load of node `i` per dimension `[cpu, memory, network]`:
    /// `max(reserved / limit, measured)`.
    pub fn load(&self, i: usize) -> [f64; 3] {
        let a = self.alloc[i];
        let l = self.limit[i];
        let m = self.measured[i];
        let r = [
            a[0] as f64 * inv(l[0]),
            a[1] as f64 * inv(l[1]),
            self.net_alloc[i] as f64 * inv(self.net_cap[i]),
        ];
        [0, 1, 2].map(|d| r[d].max(m[d]))
    }

    /// The score weights in force.
    pub fn weights(&self) -> Weights {
        Weights {
            cpu: self.weights[0],
            memory: self.weights[1],
            network: self.weights[2],
        }
    }

    /// Replaces the score weights (e.g. from [`crate::AdaptiveWeights::update`]); O(nodes).
    pub fn set_weights(&mut self, w: Weights) {
        self.weights = w.to_array();
        for i in 0..self.hot.len() {
            self.refresh(i);
        }
    }

    /// Sets the measured utilisation of node `i`.
    pub fn set_measured(&mut self, i: usize, m: crate::Utilization) {
        self.measured[i] = [m.cpu, m.memory, m.network];
        self.refresh(i);
    }

    /// Cluster-wide pressure: mean load per dimension over ready, uncordoned nodes.
    pub fn pressure(&self) -> crate::Pressure {
        let mut sum = [0.0; 3];
        let mut k = 0usize;
        for i in 0..self.hot.len() {
            if self.hot[i].flags & OK != 0 {
                let l = self.load(i);
                for d in 0..3 {
                    sum[d] += l[d];
                }
                k += 1;
            }
        }
        let k = k.max(1) as f64;
        crate::Pressure {
            cpu: sum[0] / k,
            memory: sum[1] / k,
            network: sum[2] / k,
        }
    }

    fn refresh(&mut self, i: usize) {
        let l = self.limit[i];
        let a = self.alloc[i];
        // Binpack packs reservations: measured background load does not count.
        let load = if self.dominant {
            [
                a[0] as f64 * inv(l[0]),
                a[1] as f64 * inv(l[1]),
                self.net_alloc[i] as f64 * inv(self.net_cap[i]),
            ]
        } else {
            self.load(i)
        };
        let w = self.weights;
        let h = &mut self.hot[i];
        for d in 0..3 {
            h.free[d] = l[d] as i64 - a[d] as i64;
        }
        h.base = w[0] * load[0] + w[1] * load[1] + w[2] * load[2];
        h.winv = [
            w[0] * inv(l[0]),
            w[1] * inv(l[1]),
            w[2] * inv(self.net_cap[i]),
        ];
        h.empty = h.count == 0 && a == [0, 0, 0];
        self.update_index(i);
    }

    pub(crate) fn group_id(&mut self, name: &str) -> u32 {
        if let Some(&g) = self.group_ids.get(name) {
            return g;
        }
        let g = self.groups.len() as u32;
        self.groups.push(Group {
            zones: vec![0; self.zone_names.len()],
            nodes: BTreeMap::new(),
        });
        self.group_ids.insert(name.to_string(), g);
        g
    }

    pub(crate) fn prepare(&mut self, req: &InstanceRequest) -> Prepared {
        let r = req.resources.to_array();
        let mut want = [0i64; 3];
        for d in 0..3 {
            want[d] = i64::try_from(r[d]).unwrap_or(i64::MAX);
        }
        let need = OK | if req.vm { VM } else { CONTAINER };
        let group = req.spread_group.as_deref().map(|g| self.group_id(g));
        if !req.constraints.is_empty() && !self.masks.contains_key(&req.constraints) {
            let mut m = vec![0u64; self.hot.len().div_ceil(64)];
            for i in 0..self.hot.len() {
                if self.constraint_reason(i, &req.constraints).is_none() {
                    m[i / 64] |= 1 << (i % 64);
                }
            }
            self.masks.insert(req.constraints.clone(), m);
        }
        Prepared {
            want,
            wantf: [r[0] as f64, r[1] as f64, req.network_mbps as f64],
            need,
            group,
        }
    }

    fn constraint_reason(&self, i: usize, cs: &[Constraint]) -> Option<Reason> {
        let zone = &self.zone_names[self.hot[i].zone as usize];
        let mut label_fail = false;
        for c in cs {
            if c.key == ZONE_KEY {
                if !c.op.matches(Some(zone)) {
                    return Some(Reason::ZoneMismatch);
                }
            } else if !c.op.matches(self.labels[i].get(&c.key).map(String::as_str)) {
                label_fail = true;
            }
        }
        label_fail.then_some(Reason::ConstraintMismatch)
    }

    /// The first reason node `i` cannot take `req` now, if any (the slow, explaining path; it
    /// agrees with the scan in [`Cluster::place`]).
    pub fn reason(&self, i: usize, req: &InstanceRequest) -> Option<Reason> {
        let h = &self.hot[i];
        let r = req.resources.to_array();
        if !self.ready[i] {
            return Some(Reason::NotReady);
        }
        if self.cordoned[i] {
            return Some(Reason::Cordoned);
        }
        if req.vm && h.flags & VM == 0 {
            return Some(Reason::NoVmSupport);
        }
        if !req.vm && h.flags & CONTAINER == 0 {
            return Some(Reason::NoContainerSupport);
        }
        if let Some(reason) = self.constraint_reason(i, &req.constraints) {
            return Some(reason);
        }
        if req.anti_affinity {
            if let Some(g) = req
                .spread_group
                .as_ref()
                .and_then(|g| self.group_ids.get(g))
            {
                if self.groups[*g as usize].nodes.contains_key(&(i as u32)) {
                    return Some(Reason::AntiAffinity);
                }
            }
        }
        if h.count >= self.policy.max_instances_per_node {
            return Some(Reason::TooManyInstances);
        }
        let reasons = [
            Reason::InsufficientCpu,
            Reason::InsufficientMemory,
            Reason::InsufficientDisk,
        ];
        for d in 0..3 {
            if i128::from(h.free[d]) < i128::from(r[d]) {
                return Some(reasons[d]);
            }
        }
        None
    }

    /// Whether node `i` can take `req` now (same answer as `reason(i, req).is_none()`, fast).
    pub(crate) fn fits_prepared(&self, i: usize, p: &Prepared, req: &InstanceRequest) -> bool {
        let h = &self.hot[i];
        if h.flags & p.need != p.need
            || h.count >= self.policy.max_instances_per_node
            || h.free[0] < p.want[0]
            || h.free[1] < p.want[1]
            || h.free[2] < p.want[2]
        {
            return false;
        }
        if !req.constraints.is_empty() {
            let m = &self.masks[&req.constraints];
            if m[i / 64] & (1 << (i % 64)) == 0 {
                return false;
            }
        }
        if req.anti_affinity {
            if let Some(g) = p.group {
                if self.groups[g as usize].nodes.contains_key(&(i as u32)) {
                    return false;
                }
            }
        }
        true
    }

    /// The score of node `i` for a prepared request (utilisation after placement).
    pub(crate) fn score_prepared(&self, i: usize, p: &Prepared) -> f64 {
        let h = &self.hot[i];
        h.base + p.wantf[0] * h.winv[0] + p.wantf[1] * h.winv[1] + p.wantf[2] * h.winv[2]
    }

    /// The weighted post-placement utilisation of node `i` for `req` (lower is emptier).
    pub fn score(&mut self, i: usize, req: &InstanceRequest) -> f64 {
        let p = self.prepare(req);
        self.score_prepared(i, &p)
    }

    /// Whether node `i` can take `req` now.
    pub fn fits(&mut self, i: usize, req: &InstanceRequest) -> bool {
        let p = self.prepare(req);
        self.fits_prepared(i, &p, req)
    }

    /// Chooses a node for `req` without committing it; returns its index. Ties break by name.
    /// On failure, builds the per-reason detail.
    pub fn place(&mut self, req: &InstanceRequest) -> Result<usize, Unschedulable> {
        self.try_place(req).ok_or_else(|| self.unschedulable(req))
    }

    /// Like [`Cluster::place`] but without building the failure detail (the hot path).
    pub fn try_place(&mut self, req: &InstanceRequest) -> Option<usize> {
        let p = self.prepare(req);
        self.search(&p, req)
    }

    /// The reference implementation of [`Cluster::try_place`]: a linear scan that filters and
    /// scores every node. Same answer, `O(nodes)` per decision (kept for tests and benchmarks).
    pub fn try_place_linear(&mut self, req: &InstanceRequest) -> Option<usize> {
        let p = self.prepare(req);
        if p.group.is_none() && req.constraints.is_empty() {
            self.scan_plain(&p)
        } else {
            self.scan_general(&p, req)
        }
    }

    /// Chooses a node for `req` and commits the allocation to it.
    pub fn place_and_commit(&mut self, req: &InstanceRequest) -> Result<usize, Unschedulable> {
        let i = self.place(req)?;
        self.commit(i, req);
        Ok(i)
    }

    /// Key to minimise. Spread: the score. Binpack: minus the score for used nodes; empty nodes
    /// come after every used node, ordered by the request's share of their capacity alone (the
    /// largest node first, whatever its measured background load).
    #[inline]
    fn node_key(&self, h: &Hot, p: &Prepared) -> f64 {
        let w = p.wantf;
        match self.policy.strategy {
            Strategy::Spread => h.base + w[0] * h.winv[0] + w[1] * h.winv[1] + w[2] * h.winv[2],
            Strategy::Binpack if h.empty => {
                index::EMPTY_KEY + (w[0] * h.winv[0] + w[1] * h.winv[1] + w[2] * h.winv[2])
            }
            Strategy::Binpack => -(h.base + w[0] * h.winv[0] + w[1] * h.winv[1] + w[2] * h.winv[2]),
        }
    }

    fn scan_plain(&self, p: &Prepared) -> Option<usize> {
        let max = self.policy.max_instances_per_node;
        let mut best = usize::MAX;
        let mut best_k = f64::INFINITY;
        for (i, h) in self.hot.iter().enumerate() {
            if h.flags & p.need != p.need
                || h.count >= max
                || h.free[0] < p.want[0]
                || h.free[1] < p.want[1]
                || h.free[2] < p.want[2]
            {
                continue;
            }
            let k = self.node_key(h, p);
            if k < best_k || (k == best_k && self.rank[i] < self.rank[best]) {
                best = i;
                best_k = k;
            }
        }
        (best != usize::MAX).then_some(best)
    }

    fn scan_general(&mut self, p: &Prepared, req: &InstanceRequest) -> Option<usize> {
        let empty_mask = Vec::new();
        let mask = if req.constraints.is_empty() {
            &empty_mask
        } else {
            &self.masks[&req.constraints]
        };
        let group = p.group.map(|g| &self.groups[g as usize]);
        if let Some(g) = group {
            for (&i, &k) in &g.nodes {
                self.scratch[i as usize] = k;
            }
        }
        let max = self.policy.max_instances_per_node;
        let mut best = usize::MAX;
        let mut best_k = (u32::MAX, u32::MAX, f64::INFINITY);
        for (i, h) in self.hot.iter().enumerate() {
            if h.flags & p.need != p.need
                || h.count >= max
                || h.free[0] < p.want[0]
                || h.free[1] < p.want[1]
                || h.free[2] < p.want[2]
                || (!mask.is_empty() && mask[i / 64] & (1 << (i % 64)) == 0)
            {
                continue;
            }
            let (zc, nc) = match group {
                Some(g) => (g.zones[h.zone as usize], self.scratch[i]),
                None => (0, 0),
            };
            if nc > 0 && req.anti_affinity {
                continue;
            }
            let k = (zc, nc, self.node_key(h, p));
            let ord =
                k.0.cmp(&best_k.0)
                    .then(k.1.cmp(&best_k.1))
                    .then(k.2.total_cmp(&best_k.2));
            if ord.is_lt() || (ord.is_eq() && self.rank[i] < self.rank[best]) {
                best = i;
                best_k = k;
            }
        }
        if let Some(g) = group {
            for &i in g.nodes.keys() {
                self.scratch[i as usize] = 0;
            }
        }
        (best != usize::MAX).then_some(best)
    }

    /// Builds the failure detail (slow path: runs every filter on every node).
    pub fn unschedulable(&self, req: &InstanceRequest) -> Unschedulable {
        let mut reasons = BTreeMap::new();
        let mut per_node = Vec::new();
        for i in 0..self.hot.len() {
            if let Some(r) = self.reason(i, req) {
                *reasons.entry(r).or_insert(0) += 1;
                per_node.push((self.names[i].clone(), r));
            }
        }
        Unschedulable {
            total: self.hot.len(),
            reasons,
            per_node,
        }
    }

    fn apply(&mut self, i: usize, req: &InstanceRequest, sign: i8) {
        let r = req.resources.to_array();
        for (d, &want) in r.iter().enumerate() {
            self.alloc[i][d] = if sign > 0 {
                self.alloc[i][d].saturating_add(want)
            } else {
                self.alloc[i][d].saturating_sub(want)
            };
        }
        if sign > 0 {
            self.net_alloc[i] = self.net_alloc[i].saturating_add(req.network_mbps);
            self.hot[i].count += 1;
        } else {
            self.net_alloc[i] = self.net_alloc[i].saturating_sub(req.network_mbps);
            self.hot[i].count = self.hot[i].count.saturating_sub(1);
        }
        if let Some(g) = &req.spread_group {
            let gid = self.group_id(g);
            self.group_member(gid, i, sign);
        }
        self.refresh(i);
        self.commits += 1;
        if self.dominant && self.commits.is_multiple_of(RETUNE_EVERY) {
            self.retune();
        }
    }

    pub(crate) fn group_member(&mut self, gid: u32, i: usize, sign: i8) {
        let zone = self.hot[i].zone as usize;
        let grp = &mut self.groups[gid as usize];
        if sign > 0 {
            grp.zones[zone] += 1;
            *grp.nodes.entry(i as u32).or_default() += 1;
        } else {
            grp.zones[zone] = grp.zones[zone].saturating_sub(1);
            if let Some(k) = grp.nodes.get_mut(&(i as u32)) {
                *k -= 1;
                if *k == 0 {
                    grp.nodes.remove(&(i as u32));
                }
            }
        }
    }

    /// Records `req` as placed on node `i` (allocations, count, spread group), in O(1).
    pub fn commit(&mut self, i: usize, req: &InstanceRequest) {
        self.apply(i, req, 1);
    }

    /// Removes a previously committed `req` from node `i` (instance stopped or moved).
    pub fn release(&mut self, i: usize, req: &InstanceRequest) {
        self.apply(i, req, -1);
    }

    /// Adds (`add`) or removes the reservation of one instance on node `i` (its resources and
    /// its count), without touching spread groups: for a caller that keeps the engine in step
    /// with a changing state. Unlike [`Cluster::commit`] it never retunes binpack weights, so
    /// a maintained engine stays equal to one built afresh from the same nodes (spread).
    pub fn reserve(&mut self, i: usize, r: Resources, add: bool) {
        let r = r.to_array();
        for (d, &want) in r.iter().enumerate() {
            self.alloc[i][d] = if add {
                self.alloc[i][d].saturating_add(want)
            } else {
                self.alloc[i][d].saturating_sub(want)
            };
        }
        if add {
            self.hot[i].count += 1;
        } else {
            self.hot[i].count = self.hot[i].count.saturating_sub(1);
        }
        self.refresh(i);
    }

    /// Adds (`add`) or removes a member of spread group `group` on node `i`.
    pub fn spread_member(&mut self, i: usize, group: &str, add: bool) {
        let gid = self.group_id(group);
        self.group_member(gid, i, if add { 1 } else { -1 });
    }

    /// Cordons or uncordons node `i` (drain = cordon, then move its instances elsewhere).
    pub fn set_cordoned(&mut self, i: usize, cordoned: bool) {
        self.cordoned[i] = cordoned;
        if self.ready[i] && !cordoned {
            self.hot[i].flags |= OK;
        } else {
            self.hot[i].flags &= !OK;
        }
        self.update_index(i);
    }

    /// Members of spread group `group` per zone, as `(zone, count)`.
    pub fn group_zone_counts(&self, group: &str) -> Vec<(&str, u32)> {
        match self.group_ids.get(group) {
            None => self.zone_names.iter().map(|z| (z.as_str(), 0)).collect(),
            Some(&g) => self
                .zone_names
                .iter()
                .zip(&self.groups[g as usize].zones)
                .map(|(z, &k)| (z.as_str(), k))
                .collect(),
        }
    }

    /// Whether any node has a label with key `key`.
    pub fn has_label_key(&self, key: &str) -> bool {
        self.labels.iter().any(|l| l.contains_key(key))
    }

    /// Whether any node is in zone `zone`.
    pub fn has_zone(&self, zone: &str) -> bool {
        self.zone_names.iter().any(|z| z == zone)
    }

    /// Whether node `i` satisfies all `constraints` (labels and zone), ignoring capacity.
    pub fn matches(&self, i: usize, constraints: &[Constraint]) -> bool {
        self.constraint_reason(i, constraints).is_none()
    }
}
