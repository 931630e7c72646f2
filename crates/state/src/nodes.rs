//! Node lifecycle inside `apply`: agent registration (who may register what, and sane
//! registrations only), heartbeats (with measured utilisation), marking a node down (its
//! instances fail over through the scheduler) and removal.
//!
//! Registration rules ([`NodeRegistrar`]): a node's first registration (shared node token)
//! stores the hash of the credential the server issued; from then on only that credential
//! may re-register it. Hollow fleets register only nodes without a credential.

use nimbus_api::agent::RegisterNodeRequest;
use nimbus_api::{
    ApiError, DesiredState, ErrorCode, InstanceState, Node, NodeState, RestartPolicy,
};

use crate::command::{CommandEnvelope, CommandOutput, CommandResult, NodeRegistrar};
use crate::machine::{meta, touch, StateMachine};

/// Most CPUs a node may register (milli-CPUs).
pub const MAX_NODE_CPU_MILLIS: u64 = 4096 * 1000;
/// Most memory a node may register: 64 TiB.
pub const MAX_NODE_MEMORY_BYTES: u64 = 64 << 40;
/// Most disk a node may register: 1 EiB.
pub const MAX_NODE_DISK_BYTES: u64 = 1 << 60;

/// Checks what a registration says about the node itself (not how it relates to others).
pub fn validate_registration(req: &RegisterNodeRequest) -> Result<(), ApiError> {
    nimbus_api::validate::name("name", &req.name)?;
    let url_ok = ["http://", "https://"].iter().any(|scheme| {
        req.agent_url
            .get(..scheme.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
            && req.agent_url[scheme.len()..]
                .split(['/', '?', '#'])
                .next()
                .is_some_and(|host| !host.is_empty() && !host.contains(char::is_whitespace))
    });
    if !url_ok || req.agent_url.len() > 2048 {
        return Err(ApiError::invalid(
            "agent_url",
            format!("{:?} is not an http(s) URL", req.agent_url),
        ));
    }
    let c = &req.capacity;
    if c.cpu_millis == 0 || c.cpu_millis > MAX_NODE_CPU_MILLIS {
        return Err(ApiError::invalid(
            "capacity.cpu_millis",
            format!(
                "{} milli-CPUs is out of range (1 to {MAX_NODE_CPU_MILLIS})",
                c.cpu_millis
            ),
        ));
    }
    if c.memory_bytes == 0 || c.memory_bytes > MAX_NODE_MEMORY_BYTES {
        return Err(ApiError::invalid(
            "capacity.memory_bytes",
            format!(
                "{} bytes of memory is out of range (1 byte to 64 TiB)",
                c.memory_bytes
            ),
        ));
    }
    if c.disk_bytes > MAX_NODE_DISK_BYTES {
        return Err(ApiError::invalid(
            "capacity.disk_bytes",
            format!("{} bytes of disk is more than 1 EiB", c.disk_bytes),
        ));
    }
    if !req.underlay_ip.is_empty() && req.underlay_ip.parse::<std::net::Ipv4Addr>().is_err() {
        return Err(ApiError::invalid(
            "underlay_ip",
            format!("{:?} is not an IPv4 address", req.underlay_ip),
        ));
    }
    Ok(())
}

/// The host of an http(s) URL (lowercase, without the port).
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    host.to_ascii_lowercase()
}

impl StateMachine {
    /// Registers a node on behalf of `by` (see the module docs), after
    /// [`validate_registration`]; the underlay address must not be another machine's (another
    /// node with it must have its agent on the same host: several agents on one machine share
    /// its address).
    pub(crate) fn register_node_as(
        &mut self,
        env: &CommandEnvelope,
        req: &RegisterNodeRequest,
        by: &NodeRegistrar,
    ) -> CommandResult {
        validate_registration(req)?;
        if !req.underlay_ip.is_empty() {
            let host = url_host(&req.agent_url);
            if let Some(other) = self.nodes.values().find(|n| {
                n.meta.name != req.name
                    && n.underlay_ip == req.underlay_ip
                    && url_host(&n.agent_url) != host
            }) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "underlay address {} belongs to node {}",
                        req.underlay_ip, other.meta.name
                    ),
                )
                .with_field("underlay_ip"));
            }
        }
        let held = self.node_credentials.get(&req.name).cloned();
        match by {
            NodeRegistrar::NodeToken { credential_sha256 } => {
                if held.is_some() {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!(
                            "node {} is registered already; only its own agent (with the node credential it was issued) may register it again, or remove it with `nimbus node remove {}`",
                            req.name, req.name
                        ),
                    )
                    .with_field("name"));
                }
                self.node_credentials
                    .insert(req.name.clone(), credential_sha256.clone());
            }
            NodeRegistrar::Node { credential_sha256 } => {
                if held.as_deref() != Some(credential_sha256.as_str()) {
                    return Err(ApiError::new(
                        ErrorCode::Unauthorized,
                        format!(
                            "node {} was removed; its credential is no longer valid",
                            req.name
                        ),
                    ));
                }
            }
            NodeRegistrar::Certificate => {
                if self.pki.revoked.contains_key(&req.name) {
                    return Err(ApiError::new(
                        ErrorCode::Unauthorized,
                        format!("node {} was revoked", req.name),
                    ));
                }
            }
            NodeRegistrar::Fleet => {
                if held.is_some() {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!(
                            "node {} is a real node; a hollow fleet may not register it",
                            req.name
                        ),
                    )
                    .with_field("name"));
                }
            }
        }
        self.register_node(env, req)
    }

    /// Removes a node (see [`crate::Command::RemoveNode`]).
    pub(crate) fn remove_node(
        &mut self,
        env: &CommandEnvelope,
        name: &str,
        force: bool,
    ) -> CommandResult {
        if !self.nodes.contains_key(name) {
            return Err(ApiError::not_found("node", name));
        }
        let assigned = self.instances_on(name).count();
        if assigned > 0 && !force {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "node {name} has {assigned} instance(s) assigned; drain it first, or remove it with --force (its instances fail over like on a lost node)"
                ),
            ));
        }
        if assigned > 0 {
            // Fenced like a lost node: instances that restart move elsewhere; the others fail.
            self.mark_node_down(env, name, &format!("node {name} is being removed"))?;
            // The index catches up after the command: check where each one is now.
            let ids: Vec<String> = self.instances_on(name).map(|i| i.meta.id.clone()).collect();
            for id in ids {
                if self
                    .instances
                    .get(&id)
                    .and_then(|i| i.status.node.as_deref())
                    != Some(name)
                {
                    continue;
                }
                let i = self.instance_mut(&id).expect("listed above");
                i.status.node = None;
                i.status.pid = None;
                if i.status.state != InstanceState::Stopped {
                    i.status.state = InstanceState::Failed;
                }
                i.status.message = format!("node {name} was removed");
                touch(&mut i.meta, env);
            }
            self.bump_assignments(name);
        }
        self.nodes.remove(name);
        self.node_credentials.remove(name);
        self.event(env, "", "node", name, "Removed", String::new());
        Ok(CommandOutput::None)
    }

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
