//! Branch-and-bound index over the nodes of each zone.
//!
//! Each (zone, node shape) class has a complete binary tree over its nodes (leaves in name
//! order); with more than `MAX_TREES` classes there is one tree per zone instead. Every tree node aggregates, over its
//! subtree: the largest free amount per resource, the smallest instance count, the OR of the
//! capability flags, the smallest name rank, and the extremes of the two score terms (current
//! weighted load `base`, and weight-scaled inverse limits `winv`). From these, a subtree gets a
//! lower bound of the key the engine minimises (spread: `min_base + want · min_winv`; binpack:
//! `−(max_base_nonempty + want · max_winv)`, empties after all used nodes by `want · min_winv`). The search visits the
//! child with the lower bound first and skips any subtree that cannot fit the request (some
//! resource's max free is too small, all counts at the limit, no node with the needed
//! capability) or whose bound cannot beat the best node found so far (ties by name rank).
//!
//! Bounds are computed with the same floating-point expression as the exact key over larger (or
//! smaller) operands, so rounding is monotone and the search returns exactly what the full linear
//! scan returns — a test checks this on simulated workloads. A commit refreshes one leaf and its
//! `O(log n)` ancestors.

use std::collections::{BTreeMap, HashMap};

use super::{Cluster, Hot, Prepared, CONTAINER, OK, VM};
use crate::constraint::ZONE_KEY;
use crate::{InstanceRequest, Strategy};

/// Above this many distinct (zone, shape) classes, the index uses one tree per zone.
const MAX_TREES: usize = 512;

/// Key offset that ranks empty nodes after every used node under binpack.
pub(super) const EMPTY_KEY: f64 = 1e12;

#[derive(Debug, Clone, Copy)]
pub(super) struct Agg {
    max_free: [i64; 3],
    min_base: f64,
    max_base_ne: f64,
    min_winv: [f64; 3],
    max_winv: [f64; 3],
    min_count: u32,
    min_rank: u32,
    flags_or: u8,
    /// Per dimension (cpu, memory) and bucket `b`: the largest `base` among used nodes whose free
    /// amount is at least `BUCKETS[d][b]`. Binpack's bound is otherwise loose, because the
    /// fullest nodes (highest `base`) are exactly the ones that no longer fit.
    max_base_fit: [[f64; NB]; 2],
}

const NB: usize = 8;
/// Free-amount thresholds: 250 milli-CPU × 2^b and 256 MiB × 2^b.
const BUCKETS: [[i64; NB]; 2] = {
    let mut t = [[0; NB]; 2];
    let mut b = 0;
    while b < NB {
        t[0][b] = 250 << b;
        t[1][b] = (256 << 20) << b;
        b += 1;
    }
    t
};

/// The largest bucket whose threshold is at most `want` (so a node that fits `want` is in it).
#[inline]
fn bucket(d: usize, want: i64) -> Option<usize> {
    (0..NB).rev().find(|&b| BUCKETS[d][b] <= want)
}

impl Agg {
    const NONE: Self = Self {
        max_free: [i64::MIN; 3],
        min_base: f64::INFINITY,
        max_base_ne: f64::NEG_INFINITY,
        min_winv: [f64::INFINITY; 3],
        max_winv: [f64::NEG_INFINITY; 3],
        min_count: u32::MAX,
        min_rank: u32::MAX,
        flags_or: 0,
        max_base_fit: [[f64::NEG_INFINITY; NB]; 2],
    };

    /// A leaf's aggregate; a node that is not ready or cordoned can take nothing and
    /// contributes nothing (otherwise, being empty, it would pull every spread search towards it).
    fn leaf(h: &Hot, rank: u32) -> Self {
        if h.flags & OK == 0 {
            return Self::NONE;
        }
        Self {
            max_free: h.free,
            min_base: h.base,
            max_base_ne: if h.empty { f64::NEG_INFINITY } else { h.base },
            min_winv: h.winv,
            max_winv: h.winv,
            min_count: h.count,
            min_rank: rank,
            flags_or: h.flags,
            max_base_fit: [0, 1].map(|d| {
                [0, 1, 2, 3, 4, 5, 6, 7].map(|b| {
                    if !h.empty && h.free[d] >= BUCKETS[d][b] {
                        h.base
                    } else {
                        f64::NEG_INFINITY
                    }
                })
            }),
        }
    }

    fn join(a: &Self, b: &Self) -> Self {
        Self {
            max_free: [0, 1, 2].map(|d| a.max_free[d].max(b.max_free[d])),
            min_base: a.min_base.min(b.min_base),
            max_base_ne: a.max_base_ne.max(b.max_base_ne),
            min_winv: [0, 1, 2].map(|d| a.min_winv[d].min(b.min_winv[d])),
            max_winv: [0, 1, 2].map(|d| a.max_winv[d].max(b.max_winv[d])),
            min_count: a.min_count.min(b.min_count),
            min_rank: a.min_rank.min(b.min_rank),
            flags_or: a.flags_or | b.flags_or,
            max_base_fit: [0, 1].map(|d| {
                [0, 1, 2, 3, 4, 5, 6, 7].map(|k| a.max_base_fit[d][k].max(b.max_base_fit[d][k]))
            }),
        }
    }
}

/// The tree of one zone.
#[derive(Debug, Clone)]
pub(super) struct ZoneTree {
    /// Node indices in leaf order.
    pub(super) leaves: Vec<u32>,
    /// All leaves share zone and labels: constraints are checked once, on the first leaf.
    uniform_labels: bool,
    size: usize,
    agg: Vec<Agg>,
}

impl ZoneTree {
    fn build(leaves: Vec<u32>, c: &Cluster) -> Self {
        let size = leaves.len().next_power_of_two().max(1);
        let mut agg = vec![Agg::NONE; 2 * size];
        for (j, &i) in leaves.iter().enumerate() {
            agg[size + j] = Agg::leaf(&c.hot[i as usize], c.rank[i as usize]);
        }
        for k in (1..size).rev() {
            agg[k] = Agg::join(&agg[2 * k], &agg[2 * k + 1]);
        }
        Self {
            leaves,
            uniform_labels: false,
            size,
            agg,
        }
    }

    fn update(&mut self, j: usize, a: Agg) {
        let mut k = self.size + j;
        self.agg[k] = a;
        while k > 1 {
            k /= 2;
            self.agg[k] = Agg::join(&self.agg[2 * k], &self.agg[2 * k + 1]);
        }
    }
}

/// The best node found so far: (key, rank, index).
#[derive(Clone, Copy)]
pub(super) struct Best {
    pub(super) key: f64,
    pub(super) rank: u32,
    pub(super) node: usize,
}

impl Best {
    pub(super) const NONE: Self = Self {
        key: f64::INFINITY,
        rank: u32::MAX,
        node: usize::MAX,
    };

    fn beats(&self, key: f64, rank: u32) -> bool {
        key < self.key || (key == self.key && rank < self.rank)
    }
}

struct Search<'a> {
    c: &'a Cluster,
    /// Buckets of the request's cpu and memory (binpack bound).
    buckets: [Option<usize>; 2],
    p: &'a Prepared,
    mask: Option<&'a [u64]>,
    exclude_members: bool,
    max: u32,
    binpack: bool,
    best: Best,
}

impl Search<'_> {
    #[inline]
    fn lb(&self, a: &Agg) -> f64 {
        let w = self.p.wantf;
        if self.binpack {
            let mut ub = a.max_base_ne;
            for d in 0..2 {
                if let Some(b) = self.buckets[d] {
                    ub = ub.min(a.max_base_fit[d][b]);
                }
            }
            if ub > f64::NEG_INFINITY {
                -(ub + w[0] * a.max_winv[0] + w[1] * a.max_winv[1] + w[2] * a.max_winv[2])
            } else {
                EMPTY_KEY + (w[0] * a.min_winv[0] + w[1] * a.min_winv[1] + w[2] * a.min_winv[2])
            }
        } else {
            a.min_base + w[0] * a.min_winv[0] + w[1] * a.min_winv[1] + w[2] * a.min_winv[2]
        }
    }

    #[inline]
    fn feasible(&self, a: &Agg) -> bool {
        let p = self.p;
        a.flags_or & p.need == p.need
            && a.min_count < self.max
            && a.max_free[0] >= p.want[0]
            && a.max_free[1] >= p.want[1]
            && a.max_free[2] >= p.want[2]
    }

    fn visit(&mut self, t: &ZoneTree, k: usize) {
        if k >= t.size {
            let i = t.leaves[k - t.size] as usize;
            if !self.leaf_ok(i) {
                return;
            }
            let key = self.c.node_key(&self.c.hot[i], self.p);
            let rank = self.c.rank[i];
            if self.best.beats(key, rank) {
                self.best = Best { key, rank, node: i };
            }
            return;
        }
        let (l, r) = (2 * k, 2 * k + 1);
        let (al, ar) = (&t.agg[l], &t.agg[r]);
        let bl = if self.feasible(al) {
            self.lb(al)
        } else {
            f64::NAN
        };
        let br = if self.feasible(ar) {
            self.lb(ar)
        } else {
            f64::NAN
        };
        let order = if br < bl || (bl.is_nan() && !br.is_nan()) {
            [(r, br), (l, bl)]
        } else {
            [(l, bl), (r, br)]
        };
        for (child, bound) in order {
            // NaN: infeasible. Skip a subtree that cannot beat the best (ties: by rank).
            if bound.is_nan()
                || bound > self.best.key
                || (bound == self.best.key && t.agg[child].min_rank > self.best.rank)
            {
                continue;
            }
            self.visit(t, child);
        }
    }

    #[inline]
    fn leaf_ok(&self, i: usize) -> bool {
        let h = &self.c.hot[i];
        let p = self.p;
        h.flags & p.need == p.need
            && h.count < self.max
            && h.free[0] >= p.want[0]
            && h.free[1] >= p.want[1]
            && h.free[2] >= p.want[2]
            && self.mask.is_none_or(|m| m[i / 64] & (1 << (i % 64)) != 0)
            && !(self.exclude_members && self.c.scratch[i] > 0)
    }
}

impl Cluster {
    pub(super) fn build_index(&mut self) {
        // One tree per class (zone, shape, capabilities, label set): inside a tree every leaf
        // has the same `winv`, so the bound is tight, and the same labels, so constraints are
        // checked once per tree. With too many classes, fall back to one tree per zone (still
        // exact, looser bounds, constraints checked per leaf).
        let mut label_ids: HashMap<&BTreeMap<String, String>, u32> = HashMap::new();
        let mut label_of = Vec::with_capacity(self.hot.len());
        for l in &self.labels {
            let next = label_ids.len() as u32;
            label_of.push(*label_ids.entry(l).or_insert(next));
        }
        let class = |c: &Self, i: usize| {
            (
                c.hot[i].zone,
                c.limit[i],
                c.net_cap[i],
                c.hot[i].flags & (VM | CONTAINER),
                label_of[i],
            )
        };
        let mut classes: Vec<_> = (0..self.hot.len()).map(|i| class(self, i)).collect();
        classes.sort_unstable();
        classes.dedup();
        let by_class = classes.len() <= MAX_TREES;
        let mut keyed: Vec<_> = (0..self.hot.len())
            .map(|i| {
                let k = if by_class {
                    class(self, i)
                } else {
                    (self.hot[i].zone, [0; 3], 0, 0, 0)
                };
                (k, self.rank[i], i as u32)
            })
            .collect();
        keyed.sort_unstable();
        let mut trees = Vec::new();
        let mut zone_trees: Vec<Vec<u32>> = vec![Vec::new(); self.zone_names.len()];
        let mut start = 0;
        while start < keyed.len() {
            let k = keyed[start].0;
            let end = start + keyed[start..].iter().take_while(|e| e.0 == k).count();
            // Leaves by limits then name, so identical nodes are neighbours in name order.
            let mut leaves: Vec<u32> = keyed[start..end].iter().map(|e| e.2).collect();
            leaves.sort_by_key(|&i| (self.limit[i as usize], self.rank[i as usize]));
            let t = trees.len() as u32;
            for (j, &i) in leaves.iter().enumerate() {
                self.leaf_pos[i as usize] = (t, j as u32);
            }
            zone_trees[k.0 as usize].push(t);
            let mut tree = ZoneTree::build(leaves, self);
            tree.uniform_labels = by_class;
            trees.push(tree);
            start = end;
        }
        self.trees = trees;
        self.zone_trees = zone_trees;
    }

    pub(super) fn update_index(&mut self, i: usize) {
        if self.trees.is_empty() {
            return;
        }
        let a = Agg::leaf(&self.hot[i], self.rank[i]);
        let (t, j) = self.leaf_pos[i];
        self.trees[t as usize].update(j as usize, a);
    }

    fn zone_allowed(&self, z: usize, req: &InstanceRequest) -> bool {
        req.constraints
            .iter()
            .filter(|c| c.key == ZONE_KEY)
            .all(|c| c.op.matches(Some(&self.zone_names[z])))
    }

    fn search_zone(
        &self,
        z: usize,
        p: &Prepared,
        req: &InstanceRequest,
        exclude: bool,
        best: Best,
    ) -> Best {
        let mask = if req.constraints.is_empty() {
            None
        } else {
            Some(self.masks[&req.constraints].as_slice())
        };
        let mut s = Search {
            c: self,
            buckets: [bucket(0, p.want[0]), bucket(1, p.want[1])],
            p,
            mask,
            exclude_members: exclude,
            max: self.policy.max_instances_per_node,
            binpack: self.policy.strategy == Strategy::Binpack,
            best,
        };
        for &t in &self.zone_trees[z] {
            let t = &self.trees[t as usize];
            s.mask = mask;
            if let (Some(m), true) = (mask, t.uniform_labels) {
                let i = t.leaves[0] as usize;
                if m[i / 64] & (1 << (i % 64)) == 0 {
                    continue;
                }
                s.mask = None;
            }
            if s.feasible(&t.agg[1]) {
                let b = s.lb(&t.agg[1]);
                if b < s.best.key || (b == s.best.key && t.agg[1].min_rank < s.best.rank) {
                    s.visit(t, 1);
                }
            }
        }
        s.best
    }

    /// The indexed search: same answer as the linear scan.
    pub(super) fn search(&mut self, p: &Prepared, req: &InstanceRequest) -> Option<usize> {
        let Some(g) = p.group else {
            let mut best = Best::NONE;
            for z in 0..self.zone_trees.len() {
                if self.zone_allowed(z, req) {
                    best = self.search_zone(z, p, req, false, best);
                }
            }
            return (best.node != usize::MAX).then_some(best.node);
        };
        // Spread group: lexicographic (members in zone, members on node, key, rank).
        let gi = g as usize;
        for (&i, &k) in &self.groups[gi].nodes {
            self.scratch[i as usize] = k;
        }
        let mut order = std::mem::take(&mut self.zone_order);
        order.clear();
        order.extend((0..self.zone_trees.len()).map(|z| (self.groups[gi].zones[z], z as u32)));
        order.sort_unstable();
        let mut result = None;
        let mut lo = 0;
        while lo < order.len() && result.is_none() {
            let zc = order[lo].0;
            let hi = lo + order[lo..].iter().take_while(|o| o.0 == zc).count();
            let tied = &order[lo..hi];
            let mut best = Best::NONE;
            for &(_, z) in tied {
                if self.zone_allowed(z as usize, req) {
                    best = self.search_zone(z as usize, p, req, true, best);
                }
            }
            if best.node != usize::MAX {
                result = Some(best.node);
            } else if !req.anti_affinity {
                // No non-member fits in these zones: the best member node (fewest members).
                let mut bm: Option<(u32, f64, u32, usize)> = None;
                for (&i, &k) in &self.groups[gi].nodes {
                    let i = i as usize;
                    let z = u32::from(self.hot[i].zone);
                    if !tied.iter().any(|t| t.1 == z) || !self.fits_prepared(i, p, req) {
                        continue;
                    }
                    let key = self.node_key(&self.hot[i], p);
                    let cand = (k, key, self.rank[i], i);
                    let better = bm.is_none_or(|b| (cand.0, cand.1, cand.2) < (b.0, b.1, b.2));
                    if better {
                        bm = Some(cand);
                    }
                }
                result = bm.map(|b| b.3);
            }
            lo = hi;
        }
        self.zone_order = order;
        for &i in self.groups[gi].nodes.keys() {
            self.scratch[i as usize] = 0;
        }
        result
    }
}
