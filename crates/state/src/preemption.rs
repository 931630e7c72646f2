//! Preemption inside `apply`: when an instance fits on no node, the scheduler's
//! [`plan_preemption`](nimbus_scheduler::plan_preemption) may name the smallest set of
//! lower-priority instances on one node whose eviction makes room. Executing the plan:
//!
//! 1. Everything that can fail is checked first (the plan exists, no published host port of
//!    the new instance is taken on the node), so a refused create still leaves the state
//!    unchanged.
//! 2. Each victim goes through the normal lifecycle: desired `stopped`, observed `stopped`, no
//!    node (its reservation is released at once; it keeps its network address), message and event
//!    `Preempted` ("preempted by default/web (priority 100 > 0) to make room on node n1").
//!    Its node's assignments no longer list it, so the agent stops and removes its container
//!    (like an instance moved away: fencing), and reports from it are ignored. Starting it
//!    again places it anew (`start` on an instance without a node).
//! 3. The new instance is assigned to the freed node, with a `Scheduled` event naming the
//!    victims.

use nimbus_api::{ApiError, DesiredState, ErrorCode, Instance, InstanceState};
use nimbus_scheduler::RunningInstance;

use crate::command::CommandEnvelope;
use crate::machine::touch;
use crate::StateMachine;

/// A preemption decided for one instance: the node it goes to and the ids of the victims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    /// The node that is freed.
    pub node: String,
    /// Instance ids to evict.
    pub victims: Vec<String>,
}

impl StateMachine {
    /// The instances the scheduler may evict on each node of `nodes` (same order): placed
    /// there and not being deleted.
    fn running_by_node(&self, nodes: &[nimbus_scheduler::Node]) -> Vec<Vec<RunningInstance>> {
        nodes
            .iter()
            .map(|n| {
                self.instances_on(&n.name)
                    .filter(|i| i.spec.desired != DesiredState::Deleted)
                    .map(|i| RunningInstance {
                        id: i.meta.id.clone(),
                        priority: i.spec.priority,
                        resources: crate::placement::resources(i),
                    })
                    .collect()
            })
            .collect()
    }

    /// Plans a preemption for `inst` (which fits nowhere as things are). `None` if no node
    /// can be freed by evicting only lower-priority instances. Nodes where one of its
    /// published host ports is taken are left out (even if the holder could be evicted: a
    /// port is not a resource the scheduler weighs). The instance keeps its network address
    /// (IPAM hands it out per network, not per node).
    pub(crate) fn plan_preemption_for(&self, inst: &Instance) -> Option<Preemption> {
        let mut nodes = crate::placement::nodes(self, Some(&inst.meta.id));
        if !inst.spec.publish.is_empty() {
            nodes.retain(|n| self.port_conflict(inst, &n.name).is_none());
        }
        let req = crate::placement::instance_request(inst).ok()?;
        let running = self.running_by_node(&nodes);
        if !running.iter().flatten().any(|r| r.priority < req.priority) {
            return None;
        }
        let policy = self.policy.scheduler.unwrap_or_default();
        let plan = nimbus_scheduler::plan_preemption(&nodes, &running, &req, &policy)?;
        if plan.victims.is_empty() {
            // It fits without eviction: not a preemption (the caller placed it already).
            return None;
        }
        let node = nodes[plan.node].name.clone();
        let victims: Vec<String> = plan
            .victims
            .iter()
            .map(|&v| running[plan.node][v].id.clone())
            .collect();
        Some(Preemption { node, victims })
    }

    /// Evicts the victims of `p` for `inst` (see the module docs). Infallible: call it only
    /// with a plan from [`StateMachine::plan_preemption_for`] on the current state.
    pub(crate) fn evict_for(&mut self, env: &CommandEnvelope, inst: &Instance, p: &Preemption) {
        let by = format!("{}/{}", inst.meta.project, inst.meta.name);
        for id in &p.victims {
            let Some(v) = self.instance_mut(id) else {
                continue;
            };
            let message = format!(
                "preempted by {by} (priority {} > {}) to make room on node {}",
                inst.spec.priority, v.spec.priority, p.node
            );
            v.spec.desired = DesiredState::Stopped;
            v.status.state = InstanceState::Stopped;
            v.status.node = None;
            v.status.pid = None;
            v.status.message.clone_from(&message);
            touch(&mut v.meta, env);
            let (project, name) = (v.meta.project.clone(), v.meta.name.clone());
            self.event(env, &project, "instance", &name, "Preempted", message);
        }
        self.bump_assignments(&p.node);
    }

    /// Places `inst`: through the scheduler, or, when it fits nowhere, by preempting
    /// lower-priority instances. Returns the node and the names of the evicted instances.
    /// On error nothing changed.
    pub(crate) fn place_or_preempt(
        &mut self,
        env: &CommandEnvelope,
        inst: &Instance,
    ) -> Result<(String, Vec<String>), ApiError> {
        match self.place(inst) {
            Ok(node) => Ok((node, Vec::new())),
            Err(e) if e.code == ErrorCode::Unschedulable => {
                let Some(p) = self.plan_preemption_for(inst) else {
                    return Err(e);
                };
                let names = p
                    .victims
                    .iter()
                    .filter_map(|id| self.instances.get(id))
                    .map(|v| format!("{}/{}", v.meta.project, v.meta.name))
                    .collect();
                self.evict_for(env, inst, &p);
                Ok((p.node, names))
            }
            Err(e) => Err(e),
        }
    }
}

/// The `Scheduled` event message of a placement, naming preempted instances if any.
pub(crate) fn scheduled_message(node: &str, preempted: &[String]) -> String {
    if preempted.is_empty() {
        format!("placed on node {node}")
    } else {
        format!(
            "placed on node {node} after preempting {}",
            preempted.join(", ")
        )
    }
}
