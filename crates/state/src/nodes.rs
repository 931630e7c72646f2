//! Node lifecycle inside `apply`: agent registration, heartbeats (with measured
//! utilisation) and marking a node down (its instances fail over through the scheduler).

use nimbus_api::{ApiError, DesiredState, InstanceState, Node, NodeState, RestartPolicy};

use crate::command::{CommandEnvelope, CommandOutput, CommandResult};
use crate::machine::{meta, touch, StateMachine};

impl StateMachine {
    pub(crate) fn register_node(
        &mut self,
        env: &CommandEnvelope,
        req: &nimbus_api::agent::RegisterNodeRequest,
    ) -> CommandResult {
        nimbus_api::validate::name("name", &req.name)?;
        if !req.underlay_ip.is_empty() && req.underlay_ip.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(ApiError::invalid(
                "underlay_ip",
                format!("{:?} is not an IPv4 address", req.underlay_ip),
            ));
        }
        let existed = self.nodes.get(&req.name).cloned();
        let mut node = Node {
            meta: meta(env, &req.name, ""),
            agent_url: req.agent_url.clone(),
            capacity: req.capacity,
            capabilities: req.capabilities.clone(),
            state: NodeState::Ready,
            cordoned: false,
            zone: req.zone.clone(),
            last_heartbeat: env.time.clone(),
            agent_version: req.agent_version.clone(),
            underlay_ip: req.underlay_ip.clone(),
            interfaces: Vec::new(),
            counters_at: None,
            utilization: None,
        };
        node.meta.labels.clone_from(&req.labels);
        let message = if let Some(old) = existed {
            node.interfaces = old.interfaces;
            node.counters_at = old.counters_at;
            node.meta.id = old.meta.id;
            node.meta.created_at = old.meta.created_at;
            node.meta.version = old.meta.version + 1;
            node.cordoned = old.cordoned;
            node.utilization = old.utilization;
            format!("agent at {} re-registered", req.agent_url)
        } else {
            format!("agent at {}", req.agent_url)
        };
        self.event(env, "", "node", &req.name, "Registered", message);
        self.nodes.insert(req.name.clone(), node.clone());
        Ok(CommandOutput::Node(node))
    }

    pub(crate) fn heartbeat(
        &mut self,
        env: &CommandEnvelope,
        name: &str,
        utilization: Option<nimbus_api::NodeUtilization>,
    ) -> CommandResult {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found("node", name))?;
        node.last_heartbeat.clone_from(&env.time);
        if utilization.is_some() {
            node.utilization = utilization;
            self.adapt_weights(env);
        }
        let node = self.nodes.get_mut(name).expect("found above");
        if node.state == NodeState::Down {
            node.state = NodeState::Ready;
            touch(&mut node.meta, env);
            self.event(env, "", "node", name, "Ready", "heartbeats resumed".into());
        }
        Ok(CommandOutput::None)
    }

    pub(crate) fn mark_node_ready(&mut self, env: &CommandEnvelope, name: &str) -> CommandResult {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found("node", name))?;
        node.last_heartbeat.clone_from(&env.time);
        if node.state == NodeState::Down {
            node.state = NodeState::Ready;
            touch(&mut node.meta, env);
            self.event(env, "", "node", name, "Ready", "heartbeats resumed".into());
        }
        Ok(CommandOutput::None)
    }

    /// Records the leader's utilisation snapshot (unknown nodes are skipped: they may have
    /// been removed since) and steps the adaptive weights once.
    pub(crate) fn utilization_snapshot(
        &mut self,
        env: &CommandEnvelope,
        nodes: &std::collections::BTreeMap<String, nimbus_api::NodeUtilization>,
    ) {
        let mut any = false;
        for (name, u) in nodes {
            if let Some(n) = self.nodes.get_mut(name) {
                n.utilization = Some(*u);
                any = true;
            }
        }
        if any {
            self.adapt_weights(env);
        }
    }

    pub(crate) fn mark_node_down(
        &mut self,
        env: &CommandEnvelope,
        name: &str,
        reason: &str,
    ) -> CommandResult {
        let node = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found("node", name))?;
        if node.state == NodeState::Down {
            return Ok(CommandOutput::None);
        }
        node.state = NodeState::Down;
        touch(&mut node.meta, env);
        self.event(env, "", "node", name, "Down", reason.to_string());
        let ids: Vec<String> = self.instances_on(name).map(|i| i.meta.id.clone()).collect();
        for id in ids {
            let i = &self.instances[&id];
            if i.spec.restart == RestartPolicy::Always && i.spec.desired == DesiredState::Running {
                let (p, n) = (i.meta.project.clone(), i.meta.name.clone());
                // Fail over: place it on a healthy node; the down node loses the assignment
                // and its agent removes the instance if it ever comes back (fencing by generation).
                match self.reschedule(env, &id, &format!("node {name} is down")) {
                    Ok(_) => continue,
                    Err(e) => self.event(env, &p, "instance", &n, "FailoverFailed", e.message),
                }
            }
            let i = self.instance_mut(&id).expect("listed above");
            if matches!(
                i.status.state,
                InstanceState::Running | InstanceState::Starting | InstanceState::Scheduled
            ) {
                i.status.state = InstanceState::Failed;
                i.status.message = format!("node {name} is down");
                touch(&mut i.meta, env);
                let (p, n) = (i.meta.project.clone(), i.meta.name.clone());
                self.event(
                    env,
                    &p,
                    "instance",
                    &n,
                    "NodeDown",
                    format!("node {name} is down"),
                );
            }
        }
        Ok(CommandOutput::None)
    }
}
