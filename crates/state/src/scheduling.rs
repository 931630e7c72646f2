//! Placement inside `apply`: choosing a node through the scheduler engine, assigning an
//! address, draining a node and moving instances (failover).

use nimbus_api::{ApiError, DesiredState, ErrorCode, Instance, InstanceState, InstanceType};

use crate::command::{CommandEnvelope, CommandOutput, CommandResult};
use crate::machine::touch;
use crate::StateMachine;

impl StateMachine {
    /// Runs the scheduler for `inst` against the current nodes: on the warm engine (see
    /// `engine.rs`), or on one built for this decision when the strategy is binpack or
    /// nodes must be left out for a published port.
    pub(crate) fn place(&self, inst: &Instance) -> Result<String, ApiError> {
        let policy = self.policy.scheduler.unwrap_or_default();
        if inst.spec.publish.is_empty() && policy.strategy == nimbus_scheduler::Strategy::Spread {
            return self.place_warm(inst, policy);
        }
        let mut nodes = crate::placement::nodes(self, Some(&inst.meta.id));
        let req = crate::placement::instance_request(inst)?;
        if !nodes.is_empty() {
            // Validated against every node: constraints are about the cluster, not about the
            // nodes a published port leaves.
            nimbus_scheduler::Cluster::new(&nodes, policy)
                .validate_request(&req)
                .map_err(|e| ApiError::invalid(e.field, e.message))?;
        }
        // A host port can be published once per node: such nodes do not fit.
        let mut port_taken = None;
        if !inst.spec.publish.is_empty() {
            nodes.retain(|n| match self.port_conflict(inst, &n.name) {
                Some(m) => {
                    port_taken.get_or_insert(m);
                    false
                }
                None => true,
            });
        }
        if nodes.is_empty() {
            if let Some(why) = port_taken {
                return Err(ApiError::conflict(why).with_field("publish"));
            }
        }
        let mut cluster = nimbus_scheduler::Cluster::new(&nodes, policy);
        if policy.strategy == nimbus_scheduler::Strategy::Spread {
            // Binpack weighs by the scarcest reserved resource instead (see the scheduler).
            cluster.set_weights(self.score_weights());
        }
        cluster
            .place(&req)
            .map(|idx| nodes[idx].name.clone())
            .map_err(|u| unschedulable(inst, &u, port_taken))
    }

    /// [`StateMachine::place`] on the warm engine. The instance's own reservation (when it is
    /// being moved) is left out for the decision and put back after it.
    fn place_warm(
        &self,
        inst: &Instance,
        policy: nimbus_scheduler::Policy,
    ) -> Result<String, ApiError> {
        let req = crate::placement::instance_request(inst)?;
        let mut slot = self.index.engine.lock();
        if self.nodes.changed() || self.instances.changed() {
            // This command already changed a node (a drain cordons before it moves instances)
            // or placed an instance: the engine catches up only after the command.
            *slot = None;
        }
        let engine = slot.get_or_insert_with(|| crate::engine::Engine::build(self, policy));
        if !engine.cluster.is_empty() {
            engine
                .cluster
                .validate_request(&req)
                .map_err(|e| ApiError::invalid(e.field, e.message))?;
        }
        engine.set_weights(self.score_weights());
        let own = engine.account(inst, false);
        let placed = engine.cluster.place(&req);
        if own {
            engine.account(inst, true);
        }
        placed
            .map(|i| engine.cluster.name(i).to_string())
            .map_err(|u| unschedulable(inst, &u, None))
    }

    pub(crate) fn assign(
        &self,
        env: &CommandEnvelope,
        inst: &mut Instance,
        node: &str,
    ) -> Result<(), ApiError> {
        if !self.nodes.contains_key(node) {
            return Err(ApiError::not_found("node", node));
        }
        // The address comes from the network's IPAM at creation and stays across moves.
        inst.status.node = Some(node.to_string());
        inst.status.generation += 1;
        inst.status.state = InstanceState::Scheduled;
        inst.status.message.clear();
        inst.status.pid = None;
        inst.meta.updated_at.clone_from(&env.time);
        Ok(())
    }

    pub(crate) fn drain(&mut self, env: &CommandEnvelope, name: &str) -> CommandResult {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found("node", name))?;
        if !node.cordoned {
            node.cordoned = true;
            touch(&mut node.meta, env);
            self.event(env, "", "node", name, "Cordoned", "draining".into());
        }
        let ids: Vec<String> = self
            .instances_on(name)
            .filter(|i| i.spec.desired != DesiredState::Deleted)
            .map(|i| i.meta.id.clone())
            .collect();
        let mut failed = 0;
        for id in &ids {
            if let Err(e) = self.reschedule(env, id, &format!("node {name} is draining")) {
                failed += 1;
                let i = &self.instances[id];
                let (p, n) = (i.meta.project.clone(), i.meta.name.clone());
                self.event(env, &p, "instance", &n, "DrainFailed", e.message);
            }
        }
        self.event(
            env,
            "",
            "node",
            name,
            "Drained",
            format!("{} moved, {failed} could not be placed", ids.len() - failed),
        );
        Ok(CommandOutput::Node(self.nodes[name].clone()))
    }

    /// Moves an instance to another node chosen by the scheduler. The old node loses the
    /// assignment (its agent removes the instance); the new placement gets a new generation.
    pub(crate) fn reschedule(
        &mut self,
        env: &CommandEnvelope,
        id: &str,
        why: &str,
    ) -> Result<String, ApiError> {
        let mut inst = self
            .instances
            .get(id)
            .ok_or_else(|| ApiError::not_found("instance", id))?
            .as_ref()
            .clone();
        let old = inst.status.node.clone().unwrap_or_default();
        let node = self.place(&inst)?;
        self.assign(env, &mut inst, &node)?;
        inst.status.exit_code = None;
        touch(&mut inst.meta, env);
        let (p, n) = (inst.meta.project.clone(), inst.meta.name.clone());
        self.instances
            .insert(id.to_string(), std::sync::Arc::new(inst));
        self.bump_assignments(&old);
        self.bump_assignments(&node);
        self.event(
            env,
            &p,
            "instance",
            &n,
            "Rescheduled",
            format!("moved from {old} to {node}: {why}"),
        );
        Ok(node)
    }

    pub(crate) fn schedule_pending(&mut self, env: &CommandEnvelope, id: &str) -> CommandResult {
        let inst = self
            .instances
            .get(id)
            .ok_or_else(|| ApiError::not_found("instance", id))?
            .as_ref()
            .clone();
        if inst.spec.desired == DesiredState::Deleted {
            return Ok(CommandOutput::Instance(Box::new(inst)));
        }
        let (node, preempted) = match self.place_or_preempt(env, &inst) {
            Ok(placed) => placed,
            // A VM that waited for an accelerator probe may have nothing left to wait for.
            Err(e) => return self.unplaceable_pending(env, id, e),
        };
        let mut inst = inst;
        self.assign(env, &mut inst, &node)?;
        touch(&mut inst.meta, env);
        let (p, n) = (inst.meta.project.clone(), inst.meta.name.clone());
        self.instances
            .insert(id.to_string(), std::sync::Arc::new(inst.clone()));
        self.bump_assignments(&node);
        self.event(
            env,
            &p,
            "instance",
            &n,
            "Scheduled",
            crate::preemption::scheduled_message(&node, &preempted),
        );
        Ok(CommandOutput::Instance(Box::new(inst)))
    }

    /// `start` on an instance without a node (preempted, or never placed): places it
    /// (preempting lower-priority instances if needed) and wants it running. On error nothing
    /// changed.
    pub(crate) fn start_unplaced(&mut self, env: &CommandEnvelope, id: &str) -> CommandResult {
        let mut inst = self
            .instances
            .get(id)
            .ok_or_else(|| ApiError::not_found("instance", id))?
            .as_ref()
            .clone();
        let (node, preempted) = self.place_or_preempt(env, &inst)?;
        inst.spec.desired = DesiredState::Running;
        self.assign(env, &mut inst, &node)?;
        inst.status.exit_code = None;
        touch(&mut inst.meta, env);
        let (p, n) = (inst.meta.project.clone(), inst.meta.name.clone());
        self.instances
            .insert(id.to_string(), std::sync::Arc::new(inst.clone()));
        self.bump_assignments(&node);
        self.event(env, &p, "instance", &n, "StartRequested", String::new());
        self.event(
            env,
            &p,
            "instance",
            &n,
            "Scheduled",
            crate::preemption::scheduled_message(&node, &preempted),
        );
        Ok(CommandOutput::Instance(Box::new(inst)))
    }
}

/// The error of a placement that found no node (`port_taken`: why nodes were left out for a
/// published port).
fn unschedulable(
    inst: &Instance,
    u: &nimbus_scheduler::Unschedulable,
    port_taken: Option<String>,
) -> ApiError {
    let mut msg = u.to_string();
    if inst.spec.instance_type == InstanceType::Vm
        && u.reasons.len() == 1
        && u.reasons
            .contains_key(&nimbus_scheduler::Reason::NoVmSupport)
    {
        msg = format!("no node can run VMs: {msg}");
    }
    if let Some(why) = port_taken {
        // The nodes left out for a published port matter as much as the rest.
        return ApiError::conflict(format!("{msg}; and {why}")).with_field("publish");
    }
    ApiError {
        code: ErrorCode::Unschedulable,
        message: msg,
        field: None,
    }
}
