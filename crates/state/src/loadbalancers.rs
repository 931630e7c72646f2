//! Load balancers in the state machine: create/update/delete with cluster-wide port conflicts,
//! backend resolution (label, group, explicit instances -> instance IPs), and health reports.
//!
//! The nodes serving an LB are in its `status.nodes` (see [`crate::lb_place`]: every ready
//! node unless the spec restricts them). An LB change bumps the assignment revision of every
//! node; so does any instance change while LBs exist, because backend sets follow instance IPs
//! and states.

use std::collections::BTreeMap;

use nimbus_api::agent::{LbAssignment, LbResolvedBackend};
use nimbus_api::lb::{LbBackendHealth, LbBackends, LbProtocol, LoadBalancer, LoadBalancerSpec};
use nimbus_api::{ApiError, ErrorCode, InstanceState, Meta, NodeState};

use crate::command::{CommandEnvelope, CommandOutput, CommandResult};
use crate::machine::{touch, StateMachine};

fn key(project: &str, name: &str) -> String {
    format!("{project}/{name}")
}

impl StateMachine {
    /// Finds a load balancer.
    pub fn loadbalancer(&self, project: &str, name: &str) -> Option<&LoadBalancer> {
        self.loadbalancers.get(&key(project, name))
    }

    /// Bump every node's network revision (the cluster's datapath settings changed).
    pub(crate) fn bump_all_networks(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            self.bump_network_of(&n);
        }
    }

    fn check_lb(&self, project: &str, name: &str, spec: &LoadBalancerSpec) -> Result<(), ApiError> {
        if let Some(s) = spec.tls.as_ref().and_then(|t| t.key_secret.as_deref()) {
            self.check_secrets_exist(project, [("tls.key_secret".to_string(), s)])?;
        }
        // Ports are cluster-wide: every node listens for every LB.
        for other in self.loadbalancers.values() {
            if other.meta.project == project && other.meta.name == name {
                continue;
            }
            for (i, l) in spec.listeners.iter().enumerate() {
                let udp = l.protocol == LbProtocol::Udp;
                if other
                    .spec
                    .listeners
                    .iter()
                    .any(|o| o.port == l.port && (o.protocol == LbProtocol::Udp) == udp)
                {
                    return Err(ApiError::conflict(format!(
                        "port {}/{} is already used by load balancer {}/{}",
                        l.port,
                        if udp { "udp" } else { "tcp" },
                        other.meta.project,
                        other.meta.name
                    ))
                    .with_field(format!("listeners[{i}].port")));
                }
            }
        }
        if let Some(vip) = &spec.vip {
            if let Some(other) = self.loadbalancers.values().find(|o| {
                !(o.meta.project == project && o.meta.name == name)
                    && o.spec.vip.as_deref() == Some(vip)
            }) {
                return Err(ApiError::conflict(format!(
                    "VIP {vip} is already used by load balancer {}/{}",
                    other.meta.project, other.meta.name
                ))
                .with_field("vip"));
            }
            if let Some(n) = self.nodes.values().find(|n| &n.underlay_ip == vip) {
                return Err(ApiError::conflict(format!(
                    "VIP {vip} is the underlay address of node {}",
                    n.meta.name
                ))
                .with_field("vip"));
            }
        }
        let check = |field: &str, b: &LbBackends| -> Result<(), ApiError> {
            if let Some(g) = &b.group {
                let exists = self
                    .project_instances(project, None)
                    .any(|i| i.spec.spread_group.as_deref() == Some(g));
                if !exists {
                    return Err(ApiError::invalid(
                        format!("{field}.group"),
                        format!("backend group {g:?} does not exist in project {project:?}"),
                    ));
                }
            }
            for (i, r) in b.instances.iter().enumerate() {
                if self.instance_by_name(project, &r.name).is_none() {
                    return Err(ApiError::invalid(
                        format!("{field}.instances[{i}].name"),
                        format!(
                            "instance {:?} does not exist in project {project:?}",
                            r.name
                        ),
                    ));
                }
            }
            Ok(())
        };
        if let Some((i, n)) = spec
            .nodes
            .iter()
            .enumerate()
            .find(|(_, n)| !self.nodes.contains_key(*n))
        {
            return Err(ApiError::invalid(
                format!("nodes[{i}]"),
                format!("node {n:?} does not exist"),
            ));
        }
        check("backends", &spec.backends)?;
        for (i, r) in spec.routes.iter().enumerate() {
            check(&format!("routes[{i}].backends"), &r.backends)?;
        }
        Ok(())
    }

    pub(crate) fn create_lb(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
        spec: &LoadBalancerSpec,
        labels: &BTreeMap<String, String>,
    ) -> CommandResult {
        nimbus_api::validate::name("name", name)?;
        if !self.projects.contains_key(project) {
            return Err(ApiError::not_found("project", project).with_field("project"));
        }
        if self.loadbalancers.contains_key(&key(project, name)) {
            return Err(ApiError::already_exists("load balancer", name));
        }
        self.check_lb(project, name, spec)?;
        let lb = LoadBalancer {
            meta: Meta {
                id: env.new_id.clone(),
                name: name.to_string(),
                project: project.to_string(),
                version: 1,
                created_at: env.time.clone(),
                updated_at: env.time.clone(),
                labels: labels.clone(),
            },
            spec: spec.clone(),
            status: nimbus_api::lb::LoadBalancerStatus::default(),
        };
        self.loadbalancers.insert(key(project, name), lb);
        self.place_lbs();
        let lb = self.loadbalancers[&key(project, name)].clone();
        self.event(env, project, "loadbalancer", name, "Created", String::new());
        Ok(CommandOutput::LoadBalancer(Box::new(lb)))
    }

    pub(crate) fn update_lb(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
        spec: &LoadBalancerSpec,
        version: Option<u64>,
    ) -> CommandResult {
        let Some(cur) = self.loadbalancers.get(&key(project, name)) else {
            return Err(ApiError::not_found("load balancer", name));
        };
        if let Some(v) = version {
            if v != cur.meta.version {
                return Err(ApiError {
                    code: ErrorCode::VersionConflict,
                    message: format!(
                        "{name} has version {}, not {v}; re-read it and retry",
                        cur.meta.version
                    ),
                    field: Some("version".into()),
                });
            }
        }
        self.check_lb(project, name, spec)?;
        let lb = self
            .loadbalancers
            .get_mut(&key(project, name))
            .expect("checked above");
        if lb.spec.vip != spec.vip {
            // A new (or no) address: the old lease is void; agents drop the old address.
            lb.status.vip = None;
        }
        lb.spec = spec.clone();
        touch(&mut lb.meta, env);
        self.place_lbs();
        let lb = self.loadbalancers[&key(project, name)].clone();
        self.event(env, project, "loadbalancer", name, "Updated", String::new());
        Ok(CommandOutput::LoadBalancer(Box::new(lb)))
    }

    pub(crate) fn delete_lb(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
    ) -> CommandResult {
        if self.loadbalancers.remove(&key(project, name)).is_none() {
            return Err(ApiError::not_found("load balancer", name));
        }
        self.event(env, project, "loadbalancer", name, "Deleted", String::new());
        Ok(CommandOutput::None)
    }

    /// Record a node's backend health for its LBs (by LB id); reports for unknown LBs are
    /// ignored (the LB was deleted meanwhile).
    pub(crate) fn report_lb_health(
        &mut self,
        node: &str,
        reports: &BTreeMap<String, Vec<LbBackendHealth>>,
    ) {
        for lb in self.loadbalancers.values_mut() {
            let Some(r) = reports.get(&lb.meta.id) else {
                continue;
            };
            lb.status.backends.retain(|b| b.node != node);
            lb.status.backends.extend(r.iter().map(|b| LbBackendHealth {
                node: node.to_string(),
                ..b.clone()
            }));
            lb.status.backends.sort_by(|a, b| {
                (a.instance.as_str(), a.node.as_str()).cmp(&(b.instance.as_str(), b.node.as_str()))
            });
        }
    }

    /// Running instances a selector picks, with their IPs and weights.
    pub fn resolve_backends(&self, project: &str, b: &LbBackends) -> Vec<LbResolvedBackend> {
        let running = |i: &nimbus_api::Instance| i.status.state == InstanceState::Running;
        let mut out: Vec<LbResolvedBackend> = Vec::new();
        let mut push = |i: &nimbus_api::Instance, weight: u32| {
            if let Some(ip) = &i.status.ip {
                out.push(LbResolvedBackend {
                    instance: i.meta.name.clone(),
                    ip: ip.clone(),
                    weight,
                });
            }
        };
        if let Some(sel) = &b.label {
            let (k, v) = sel.split_once('=').unwrap_or((sel, ""));
            for i in self
                .project_instances(project, None)
                .filter(|&i| running(i))
            {
                if i.meta.labels.get(k).map(String::as_str) == Some(v) {
                    push(i, 1);
                }
            }
        } else if let Some(g) = &b.group {
            for i in self
                .project_instances(project, None)
                .filter(|&i| running(i))
            {
                if i.spec.spread_group.as_deref() == Some(g.as_str()) {
                    push(i, 1);
                }
            }
        } else {
            for r in &b.instances {
                if let Some(i) = self
                    .instance_by_name(project, &r.name)
                    .filter(|&i| running(i))
                {
                    push(i, r.weight);
                }
            }
        }
        out.sort_by(|a, b| a.instance.cmp(&b.instance));
        out
    }

    /// What a node must serve: the LBs placed on it, with resolved backends (empty if the
    /// node is not ready).
    pub fn lb_assignments(&self, node: &str) -> Vec<LbAssignment> {
        if !self
            .nodes
            .get(node)
            .is_some_and(|n| n.state == NodeState::Ready)
        {
            return Vec::new();
        }
        self.loadbalancers
            .values()
            .filter(|lb| lb.status.nodes.iter().any(|n| n == node))
            .map(|lb| LbAssignment {
                id: lb.meta.id.clone(),
                project: lb.meta.project.clone(),
                name: lb.meta.name.clone(),
                version: lb.meta.version,
                backends: self.resolve_backends(&lb.meta.project, &lb.spec.backends),
                route_backends: lb
                    .spec
                    .routes
                    .iter()
                    .map(|r| self.resolve_backends(&lb.meta.project, &r.backends))
                    .collect(),
                spec: lb.spec.clone(),
            })
            .collect()
    }
}
