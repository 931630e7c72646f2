//! Draining load-balancer backends before they stop.
//!
//! Stopping or deleting an instance that some load balancer sends traffic to first takes it
//! out of rotation and only then stops it, so a replacement loses no request: the command
//! that asks for the stop records a [`Drain`] (the revision it happened at and the nodes that
//! serve those load balancers); the same command already removes the backend from those LBs'
//! assignments (a stopping instance is no backend) and wakes their nodes. Meanwhile the
//! instance's own node keeps it running (its assignment still says `running`). The leader
//! finishes the drain (`Command::FinishDrain`) once every one of those nodes has asked for its
//! assignments after that revision (it applied the change: agents reconcile their LBs before
//! they poll again), or it went down, or [`DRAIN_TIMEOUT_MS`] passed; then the node is told to
//! stop it. A drain belongs to one placement generation: a move or a new start ends it.

use std::collections::BTreeSet;

use nimbus_api::{DesiredState, Instance, InstanceState, NodeState};
use serde::{Deserialize, Serialize};

use crate::command::CommandEnvelope;
use crate::StateMachine;

/// Longest a stop waits for the LB nodes to take the backend out, ms.
pub const DRAIN_TIMEOUT_MS: u64 = 5_000;

/// A backend being taken out of its load balancers before it stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// The revision that took it out of rotation.
    pub since: u64,
    /// The placement generation it applies to.
    pub generation: u64,
    /// The nodes that served it (they must ack `since`).
    pub nodes: Vec<String>,
}

impl StateMachine {
    /// The nodes serving a load balancer that sends traffic to `inst` now (running, picked by
    /// a selector), ready ones only.
    pub(crate) fn lb_nodes_serving(&self, inst: &Instance) -> Vec<String> {
        if inst.status.state != InstanceState::Running || inst.status.ip.is_none() {
            return Vec::new();
        }
        let nodes: BTreeSet<&String> = self
            .loadbalancers
            .values()
            .filter(|lb| crate::index::lb_selects(lb, inst))
            .flat_map(|lb| lb.status.nodes.iter())
            .filter(|n| {
                self.nodes
                    .get(n.as_str())
                    .is_some_and(|n| n.state == NodeState::Ready)
            })
            .collect();
        nodes.into_iter().cloned().collect()
    }

    /// Records that `before` (the instance as it was before a stop or delete) must drain.
    pub(crate) fn begin_drain(&mut self, before: &Instance) {
        let nodes = self.lb_nodes_serving(before);
        if nodes.is_empty() {
            return;
        }
        let d = Drain {
            since: self.revision,
            generation: before.status.generation,
            nodes,
        };
        self.drains.insert(before.meta.id.clone(), d);
    }

    /// The drain of an instance, if one is in progress for its current placement.
    pub fn draining(&self, inst: &Instance) -> Option<&Drain> {
        self.drains
            .get(&inst.meta.id)
            .filter(|d| d.generation == inst.status.generation)
    }

    /// The desired state an instance's node is told: running while it drains.
    pub fn assigned_desired(&self, inst: &Instance) -> DesiredState {
        if self.draining(inst).is_some() {
            DesiredState::Running
        } else {
            inst.spec.desired
        }
    }

    /// Ends drains (decided by the leader): the instances' nodes may stop them now.
    pub(crate) fn finish_drains(&mut self, env: &CommandEnvelope, ids: &[String]) {
        for id in ids {
            if self.drains.remove(id).is_none() {
                continue;
            }
            let Some(i) = self.instances.get(id).cloned() else {
                continue;
            };
            if let Some(n) = &i.status.node {
                self.bump_assignments(n);
            }
            self.event(
                env,
                &i.meta.project,
                "instance",
                &i.meta.name,
                "Drained",
                "out of every load balancer's rotation".into(),
            );
        }
    }

    /// Forgets drains of instances that are gone or were placed anew.
    pub(crate) fn prune_drains(&mut self) {
        if self.drains.is_empty() {
            return;
        }
        let stale: Vec<String> = self
            .drains
            .iter()
            .filter(|(id, d)| {
                self.instances
                    .get(id.as_str())
                    .is_none_or(|i| i.status.generation != d.generation)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            self.drains.remove(&id);
        }
    }
}
