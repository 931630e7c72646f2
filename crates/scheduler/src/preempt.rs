//! Priority classes and preemption planning.
//!
//! ## Algorithm of [`plan_preemption`]
//! For every node that passes the non-capacity filters (ready, not cordoned, instance type,
//! constraints, anti-affinity), the deficit is what the request lacks after reserve and overcommit:
//! `deficit_d = allocated_d + want_d − limit_d` per resource, plus `count + 1 − max_instances`
//! instances. Candidates are the node's instances with a priority strictly below the request's.
//! 1. **Exact search for small sets.** For `k = 1, 2, 3` (starting at the instance-count
//!    deficit), all `k`-subsets of the first [`EXACT_CANDIDATES`] candidates (lowest priority first)
//!    are tried; the first `k` with a covering subset wins, and among those subsets the one with the
//!    lowest total priority, then the fewest resources (Σ victim / limit over cpu, memory, disk).
//! 2. **Greedy beyond.** If no set of at most 3 covers the deficit, victims are added greedily by
//!    the largest normalised contribution to what is still missing (ties: lower priority), then
//!    any victim whose removal keeps the deficit covered is dropped again (highest priority first).
//!
//! The plan chooses the node whose set is smallest: fewest victims, then lowest total priority,
//! then least resources, then node name. A node that fits without eviction yields an empty plan.
//! Minimality is exact whenever a set of at most 3 victims exists, which is the common case; the
//! greedy fallback bounds the work at `O(candidates²)` per node.

use std::collections::BTreeMap;

use crate::{Cluster, InstanceRequest, Node, Policy, PolicyError, Reason, Resources};

/// Candidates (lowest priority first) considered by the exact search per node.
pub const EXACT_CANDIDATES: usize = 40;

/// Named priority classes with their values. Defaults: `critical` 1000, `high` 100,
/// `normal` 0, `low` -100.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityClasses {
    classes: BTreeMap<String, i32>,
}

impl Default for PriorityClasses {
    fn default() -> Self {
        Self {
            classes: [
                ("critical", 1000),
                ("high", 100),
                ("normal", 0),
                ("low", -100),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        }
    }
}

impl PriorityClasses {
    /// No classes at all.
    pub fn empty() -> Self {
        Self {
            classes: BTreeMap::new(),
        }
    }

    /// Adds or replaces a class.
    pub fn insert(&mut self, name: &str, value: i32) {
        self.classes.insert(name.to_string(), value);
    }

    /// The value of class `name`; an unknown class is a [`PolicyError`] on `priority_class`.
    pub fn resolve(&self, name: &str) -> Result<i32, PolicyError> {
        self.classes.get(name).copied().ok_or_else(|| {
            let known: Vec<&str> = self.classes.keys().map(String::as_str).collect();
            PolicyError::new(
                "priority_class",
                format!(
                    "unknown priority class {name:?} (known: {})",
                    known.join(", ")
                ),
            )
        })
    }
}

/// An instance running on a node, as preemption sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunningInstance {
    /// Instance id.
    pub id: String,
    /// Priority value.
    pub priority: i32,
    /// Resources it reserves.
    pub resources: Resources,
}

/// Evict `victims` (indices into the node's instance list) from node `node` to fit the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreemptionPlan {
    /// Index of the node in `nodes`.
    pub node: usize,
    /// Indices into `instances[node]`, ascending.
    pub victims: Vec<usize>,
}

struct NodeCtx<'a> {
    deficit: [i128; 3],
    count_deficit: usize,
    limit: [u64; 3],
    cands: Vec<(usize, &'a RunningInstance)>,
}

impl NodeCtx<'_> {
    fn covers(&self, set: &[usize]) -> bool {
        if set.len() < self.count_deficit {
            return false;
        }
        let mut freed = [0i128; 3];
        for &c in set {
            let r = self.cands[c].1.resources.to_array();
            for d in 0..3 {
                freed[d] += i128::from(r[d]);
            }
        }
        (0..3).all(|d| freed[d] >= self.deficit[d])
    }

    fn size(&self, set: &[usize]) -> f64 {
        set.iter()
            .map(|&c| {
                let r = self.cands[c].1.resources.to_array();
                (0..3)
                    .map(|d| {
                        if self.limit[d] == 0 {
                            0.0
                        } else {
                            r[d] as f64 / self.limit[d] as f64
                        }
                    })
                    .sum::<f64>()
            })
            .sum()
    }

    fn key(&self, set: &[usize]) -> (usize, i64, f64) {
        let prio = set
            .iter()
            .map(|&c| i64::from(self.cands[c].1.priority))
            .sum();
        (set.len(), prio, self.size(set))
    }
}

fn better(a: (usize, i64, f64), b: (usize, i64, f64)) -> bool {
    a.0.cmp(&b.0)
        .then(a.1.cmp(&b.1))
        .then(a.2.total_cmp(&b.2))
        .is_lt()
}

type Key = (usize, i64, f64);

fn exact(ctx: &NodeCtx, k: usize) -> Option<Vec<usize>> {
    fn rec(
        ctx: &NodeCtx,
        k: usize,
        start: usize,
        cur: &mut Vec<usize>,
        best: &mut Option<(Vec<usize>, Key)>,
    ) {
        if cur.len() == k {
            if ctx.covers(cur) {
                let key = ctx.key(cur);
                if best.as_ref().is_none_or(|(_, bk)| better(key, *bk)) {
                    *best = Some((cur.clone(), key));
                }
            }
            return;
        }
        let n = ctx.cands.len().min(EXACT_CANDIDATES);
        for c in start..n {
            cur.push(c);
            rec(ctx, k, c + 1, cur, best);
            cur.pop();
        }
    }
    let mut best = None;
    rec(ctx, k, 0, &mut Vec::with_capacity(k), &mut best);
    best.map(|(s, _)| s)
}

fn greedy(ctx: &NodeCtx) -> Option<Vec<usize>> {
    let mut chosen: Vec<usize> = Vec::new();
    let mut missing = ctx.deficit;
    while !ctx.covers(&chosen) {
        let mut best: Option<(usize, f64, i32)> = None;
        for c in 0..ctx.cands.len() {
            if chosen.contains(&c) {
                continue;
            }
            let r = ctx.cands[c].1.resources.to_array();
            let gain: f64 = (0..3)
                .map(|d| {
                    let m = missing[d].max(0);
                    let g = m.min(i128::from(r[d]));
                    if ctx.limit[d] == 0 {
                        0.0
                    } else {
                        g as f64 / ctx.limit[d] as f64
                    }
                })
                .sum();
            let p = ctx.cands[c].1.priority;
            if best.is_none_or(|(_, bg, bp)| gain > bg || (gain == bg && p < bp)) {
                best = Some((c, gain, p));
            }
        }
        let (c, _, _) = best?;
        chosen.push(c);
        let r = ctx.cands[c].1.resources.to_array();
        for d in 0..3 {
            missing[d] -= i128::from(r[d]);
        }
    }
    // Drop redundant victims, highest priority first.
    chosen.sort_by_key(|&c| std::cmp::Reverse(ctx.cands[c].1.priority));
    let mut i = 0;
    while i < chosen.len() {
        let mut without = chosen.clone();
        without.remove(i);
        if ctx.covers(&without) {
            chosen = without;
        } else {
            i += 1;
        }
    }
    Some(chosen)
}

/// Plans the eviction of the smallest set of lower-priority instances on one node so that `req`
/// fits (see the module docs for the algorithm). `instances[i]` lists the instances on
/// `nodes[i]`; a shorter `instances` means no instances on the remaining nodes. Returns `None` if
/// no node can be freed enough by evicting only lower-priority instances.
pub fn plan_preemption(
    nodes: &[Node],
    instances: &[Vec<RunningInstance>],
    req: &InstanceRequest,
    policy: &Policy,
) -> Option<PreemptionPlan> {
    let cluster = Cluster::new(nodes, *policy);
    let none: Vec<RunningInstance> = Vec::new();
    let mut best: Option<(PreemptionPlan, (usize, i64, f64), &str)> = None;
    for i in 0..nodes.len() {
        match cluster.reason(i, req) {
            None => {
                let plan = PreemptionPlan {
                    node: i,
                    victims: Vec::new(),
                };
                let key = (0, 0, 0.0);
                if best.as_ref().is_none_or(|(_, bk, bn)| {
                    better(key, *bk) || (key == *bk && nodes[i].name.as_str() < *bn)
                }) {
                    best = Some((plan, key, &nodes[i].name));
                }
                continue;
            }
            Some(
                Reason::TooManyInstances
                | Reason::InsufficientCpu
                | Reason::InsufficientMemory
                | Reason::InsufficientDisk,
            ) => {}
            Some(_) => continue,
        }
        let limit = cluster.limits(i);
        let alloc = cluster.allocated(i);
        let want = req.resources.to_array();
        let deficit =
            [0, 1, 2].map(|d| i128::from(alloc[d]) + i128::from(want[d]) - i128::from(limit[d]));
        let count_deficit = (i64::from(cluster.instance_count(i)) + 1
            - i64::from(policy.max_instances_per_node))
        .max(0) as usize;
        let list = instances.get(i).unwrap_or(&none);
        let mut cands: Vec<(usize, &RunningInstance)> = list
            .iter()
            .enumerate()
            .filter(|(_, r)| r.priority < req.priority)
            .collect();
        cands.sort_by(|a, b| {
            a.1.priority
                .cmp(&b.1.priority)
                .then(b.1.resources.memory_bytes.cmp(&a.1.resources.memory_bytes))
                .then(b.1.resources.cpu_millis.cmp(&a.1.resources.cpu_millis))
                .then(a.0.cmp(&b.0))
        });
        let ctx = NodeCtx {
            deficit,
            count_deficit,
            limit,
            cands,
        };
        let all: Vec<usize> = (0..ctx.cands.len()).collect();
        if !ctx.covers(&all) {
            continue;
        }
        let mut set = None;
        for k in count_deficit.max(1)..=3.min(ctx.cands.len()) {
            if let Some(s) = exact(&ctx, k) {
                set = Some(s);
                break;
            }
        }
        let Some(set) = set.or_else(|| greedy(&ctx)) else {
            continue;
        };
        let key = ctx.key(&set);
        if best.as_ref().is_none_or(|(_, bk, bn)| {
            better(key, *bk) || (!better(*bk, key) && nodes[i].name.as_str() < *bn)
        }) {
            let mut victims: Vec<usize> = set.iter().map(|&c| ctx.cands[c].0).collect();
            victims.sort_unstable();
            best = Some((PreemptionPlan { node: i, victims }, key, &nodes[i].name));
        }
    }
    best.map(|(p, _, _)| p)
}
