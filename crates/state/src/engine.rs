//! The placement engine kept warm between commands.
//!
//! Building a `nimbus_scheduler::Cluster` costs O(nodes) (every node's record, the zone
//! trees), which at 10,000 nodes dominated the cost of a create. So the state keeps one
//! built engine: it is built lazily at the first placement, kept in step with the
//! reservations as commands change instances ([`Engine::account`], from `index.rs`), and
//! dropped whenever a node changes (registration, readiness, cordon, capabilities, a
//! utilisation snapshot): nodes change rarely, instances often. A placement then costs the
//! engine's own decision (tens of µs at 10,000 nodes).
//!
//! Determinism: a maintained engine must place exactly like one built afresh from the same
//! state, or two replicas (one restarted from a snapshot) would disagree. Every per-node record
//! of the spread strategy is a pure function of the node's reservations and the weights, and
//! [`nimbus_scheduler::Cluster::reserve`] recomputes it from them, so this holds (tested by
//! `a_warm_engine_places_like_a_fresh_one`). Binpack retunes its weights on a commit count, a
//! history, so binpack placements (and placements that must leave out nodes, for published
//! ports) build an engine afresh instead.

use std::collections::HashMap;

use nimbus_api::{DesiredState, Instance};
use nimbus_scheduler::{Cluster, Policy, Weights};

use crate::StateMachine;

/// A built engine and where each node sits in it.
#[derive(Debug, Clone)]
pub struct Engine {
    pub(crate) cluster: Cluster,
    pos: HashMap<String, usize>,
    weights: Weights,
}

impl Engine {
    /// Builds the engine of the current nodes and reservations.
    pub(crate) fn build(sm: &StateMachine, policy: Policy) -> Self {
        let nodes = crate::placement::nodes(sm, None);
        let pos = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let weights = sm.score_weights();
        let mut cluster = Cluster::new(&nodes, policy);
        cluster.set_weights(weights);
        Self {
            cluster,
            pos,
            weights,
        }
    }

    /// Node `name`'s position.
    pub(crate) fn position(&self, name: &str) -> Option<usize> {
        self.pos.get(name).copied()
    }

    /// Uses `w` for scoring (O(nodes) only when it changed).
    pub(crate) fn set_weights(&mut self, w: Weights) {
        if w != self.weights {
            self.cluster.set_weights(w);
            self.weights = w;
        }
    }

    /// Adds or removes an instance's reservation and spread membership, as
    /// `placement::node_views` and `placement::nodes` count them. `false` when its node is
    /// unknown to the engine (which must then be rebuilt).
    pub(crate) fn account(&mut self, i: &Instance, add: bool) -> bool {
        let Some(node) = &i.status.node else {
            return true;
        };
        let Some(at) = self.position(node) else {
            return false;
        };
        self.cluster
            .reserve(at, crate::placement::resources(i), add);
        if i.spec.desired != DesiredState::Deleted {
            if let Some(g) = &i.spec.spread_group {
                self.cluster
                    .spread_member(at, &format!("{}/{g}", i.meta.project), add);
            }
        }
        true
    }
}

/// The engine slot of the derived indexes: empty until a placement builds it.
#[derive(Debug, Default)]
pub struct EngineSlot(std::sync::Mutex<Option<Engine>>);

impl Clone for EngineSlot {
    fn clone(&self) -> Self {
        Self(std::sync::Mutex::new(self.lock().clone()))
    }
}

impl EngineSlot {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Option<Engine>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl StateMachine {
    /// Forgets the warm engine (the next placement builds one).
    pub(crate) fn drop_engine(&self) {
        *self.index.engine.lock() = None;
    }

    /// The warm engine's per-node records equal those of an engine built afresh (tests).
    /// Exactly equal, floats included: replicas must place identically.
    #[cfg(test)]
    #[allow(clippy::float_cmp)]
    pub(crate) fn engine_matches_a_fresh_one(&self) -> bool {
        let policy = self.policy.scheduler.unwrap_or_default();
        let guard = self.index.engine.lock();
        let Some(warm) = guard.as_ref() else {
            return true;
        };
        let fresh = Engine::build(self, policy);
        (0..fresh.cluster.len()).all(|i| {
            fresh.cluster.allocated(i) == warm.cluster.allocated(i)
                && fresh.cluster.instance_count(i) == warm.cluster.instance_count(i)
                && fresh.cluster.load(i) == warm.cluster.load(i)
        }) && ["default/web"]
            .iter()
            .all(|g| fresh.cluster.group_zone_counts(g) == warm.cluster.group_zone_counts(g))
    }
}

#[cfg(test)]
mod tests {
    use crate::machine_tests::{instance, H};
    use crate::Command;

    fn placements(h: &mut H, prefix: &str, n: usize, fresh: bool) -> Vec<String> {
        (0..n)
            .map(|k| {
                let mut i = instance(&format!("{prefix}{k}"), (8 + (k as u64 % 5) * 8) << 20);
                i.spec.cpus = 0.1 * (1 + k % 3) as f64;
                if k % 4 == 0 {
                    i.spec.spread_group = Some("web".into());
                }
                if fresh {
                    h.sm.drop_engine();
                }
                let out = h
                    .run(Command::CreateInstance {
                        instance: Box::new(i.into()),
                        idempotency_key: None,
                    })
                    .expect("placed");
                crate::machine_tests::inst(out).status.node.expect("a node")
            })
            .collect()
    }

    #[test]
    fn a_warm_engine_places_like_a_fresh_one() {
        let setup = || {
            let mut h = H::new();
            for k in 0..7 {
                h.node(&format!("n{k}"), false);
            }
            h
        };
        let (mut warm, mut fresh) = (setup(), setup());
        let a = placements(&mut warm, "a", 60, false);
        let b = placements(&mut fresh, "a", 60, true);
        assert_eq!(a, b);
        // Deletes and moves keep it in step too.
        for h in [&mut warm, &mut fresh] {
            h.ok(Command::DrainNode { name: "n3".into() });
        }
        let a = placements(&mut warm, "b", 10, false);
        let b = placements(&mut fresh, "b", 10, true);
        assert_eq!(a, b);
        assert!(warm.sm.engine_matches_a_fresh_one());
    }
}
