//! VM creates while a node is still probing its VM accelerator.
//!
//! A node reports `vms: false` until its accelerator probe ends (seconds to a minute after it
//! started), with `vm_probe_pending` set meanwhile. A VM create that cannot be placed, but would
//! be were the probing nodes VM-capable, is accepted: the instance is created `pending` without
//! a node, with a message and a `WaitingForVmProbe` event naming the nodes it waits for. The
//! leader's `retry_pending` controller proposes `ScheduleInstance` for it every 500 ms; it is
//! placed as soon as a node re-registers with `vms: true`.
//!
//! It does not wait forever: once no ready node is probing any more and it still cannot be
//! placed (the probe ended without VM support, the probing node went down or was cordoned, or
//! the room went to other instances meanwhile), `ScheduleInstance` marks it `failed` with the
//! scheduler's reason plus the nodes' own `vm_unavailable_reason` (event `FailedScheduling`).
//! `nimbus launch` reports that failure; `start` places it anew, `delete` removes it.

use std::fmt::Write as _;

use nimbus_api::{ApiError, ErrorCode, Instance, InstanceState, InstanceType, NodeState};

use crate::command::{CommandEnvelope, CommandOutput, CommandResult};
use crate::machine::touch;
use crate::StateMachine;

/// At most this many nodes are named in a message.
const NAMED_NODES: usize = 3;

/// `a, b, c and 4 more`.
fn name_list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(NAMED_NODES)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMED_NODES {
        let _ = write!(s, " and {} more", names.len() - NAMED_NODES);
    }
    s
}

impl StateMachine {
    /// Ready, uncordoned nodes still probing their VM accelerator.
    fn probing_nodes(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| {
                n.capabilities.vm_probe_pending
                    && !n.capabilities.vms
                    && n.state == NodeState::Ready
                    && !n.cordoned
            })
            .map(|n| n.meta.name.clone())
            .collect()
    }

    /// Whether the VM `inst` would be placed if the nodes in `probing` were VM-capable.
    fn fits_once_probed(&self, inst: &Instance, probing: &[String]) -> bool {
        if inst.spec.instance_type != InstanceType::Vm || probing.is_empty() {
            return false;
        }
        let Ok(req) = crate::placement::instance_request(inst) else {
            return false;
        };
        let mut nodes = crate::placement::nodes(self, Some(&inst.meta.id));
        for n in &mut nodes {
            if probing.contains(&n.name) {
                n.vm_capable = true;
            }
        }
        if !inst.spec.publish.is_empty() {
            nodes.retain(|n| self.port_conflict(inst, &n.name).is_none());
        }
        let policy = self.policy.scheduler.unwrap_or_default();
        nimbus_scheduler::Cluster::new(&nodes, policy)
            .place(&req)
            .is_ok()
    }

    /// Placement at create time: `Ok(Some((node, preempted)))` when placed, `Ok(None)` when the
    /// VM waits for a probing node (`inst` is then `pending` with the reason, for the caller's
    /// `WaitingForVmProbe` event), else the placement error (nothing changed).
    pub(crate) fn place_or_await_vm_probe(
        &mut self,
        env: &CommandEnvelope,
        inst: &mut Instance,
    ) -> Result<Option<(String, Vec<String>)>, ApiError> {
        match self.place_or_preempt(env, inst) {
            Ok(placed) => Ok(Some(placed)),
            Err(e) if e.code == ErrorCode::Unschedulable => {
                let probing = self.probing_nodes();
                if !self.fits_once_probed(inst, &probing) {
                    return Err(e);
                }
                inst.status.state = InstanceState::Pending;
                inst.status.node = None;
                inst.status.message = format!(
                    "waiting for node {} to finish probing its VM accelerator",
                    name_list(&probing)
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `ScheduleInstance` could not place the unplaced instance `id` (error `e`). A pending VM
    /// that no probing node can help any more becomes `failed` with the reason (`Ok`); anything
    /// else keeps waiting (`Err(e)`, nothing changed).
    pub(crate) fn unplaceable_pending(
        &mut self,
        env: &CommandEnvelope,
        id: &str,
        e: ApiError,
    ) -> CommandResult {
        let Some(inst) = self.instances.get(id) else {
            return Err(e);
        };
        let waiting = inst.spec.instance_type == InstanceType::Vm
            && inst.status.state == InstanceState::Pending
            && inst.status.node.is_none();
        if !waiting || self.fits_once_probed(inst, &self.probing_nodes()) {
            return Err(e);
        }
        let unavailable: Vec<String> = self
            .nodes
            .values()
            .filter(|n| !n.capabilities.vms)
            .filter_map(|n| {
                let why = n.capabilities.vm_unavailable_reason.as_deref()?;
                Some(format!("{}: {why}", n.meta.name))
            })
            .take(NAMED_NODES)
            .collect();
        let mut message = e.message;
        if !unavailable.is_empty() {
            message = format!("{message}; VMs unavailable on {}", unavailable.join("; "));
        }
        let Some(inst) = self.instance_mut(id) else {
            return Err(ApiError::not_found("instance", id));
        };
        inst.status.state = InstanceState::Failed;
        inst.status.message.clone_from(&message);
        touch(&mut inst.meta, env);
        let out = inst.clone();
        let (p, n) = (out.meta.project.clone(), out.meta.name.clone());
        self.event(env, &p, "instance", &n, "FailedScheduling", message);
        Ok(CommandOutput::Instance(Box::new(out)))
    }
}
