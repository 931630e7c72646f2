//! Tenant networks inside `apply`: networks (VPCs) with subnets, address management (IPAM),
//! security groups and their rules, an instance's network attachment, and published-port
//! conflicts. Pure like the rest of the state machine: everything is decided from the state
//! and the command envelope.

use nimbus_api::cidr::Cidr;
use nimbus_api::validate::net as vnet;
use nimbus_api::{
    AddRuleRequest, ApiError, CreateNetworkRequest, CreateSecurityGroupRequest, Direction,
    ErrorCode, Instance, Meta, Network, Protocol, SecurityGroup, SecurityGroupRule, Subnet,
    DEFAULT_NETWORK, DEFAULT_SECURITY_GROUP,
};

use crate::command::{CommandEnvelope, CommandOutput, CommandResult};
use crate::machine::{meta, touch};
use crate::{network, StateMachine};

/// The map key of a project-scoped network or security group: `project/name`.
pub fn key(project: &str, name: &str) -> String {
    format!("{project}/{name}")
}

/// What creating an instance adds to the state besides the instance itself.
pub(crate) struct Attachment {
    /// The project's default network, created by this instance.
    network: Option<Network>,
    /// The project's default security group, created by this instance.
    group: Option<SecurityGroup>,
}

fn rule(
    id: &str,
    direction: Direction,
    cidr: Option<&str>,
    group: Option<&str>,
) -> SecurityGroupRule {
    SecurityGroupRule {
        id: id.to_string(),
        direction,
        protocol: Protocol::All,
        port_min: 0,
        port_max: 0,
        cidr: cidr.map(str::to_string),
        group: group.map(str::to_string),
        description: String::new(),
    }
}

fn same_rule(a: &SecurityGroupRule, b: &SecurityGroupRule) -> bool {
    a.direction == b.direction
        && a.protocol == b.protocol
        && a.port_min == b.port_min
        && a.port_max == b.port_max
        && a.cidr == b.cidr
        && a.group == b.group
}

fn next_rule_id(g: &SecurityGroup) -> String {
    let max = g
        .rules
        .iter()
        .filter_map(|r| r.id.strip_prefix('r')?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    format!("r{}", max + 1)
}

impl StateMachine {
    /// A network by project and name.
    pub fn network_by_name(&self, project: &str, name: &str) -> Option<&Network> {
        self.networks.get(&key(project, name))
    }

    /// A security group by project and name.
    pub fn security_group_by_name(&self, project: &str, name: &str) -> Option<&SecurityGroup> {
        self.security_groups.get(&key(project, name))
    }

    /// How many addresses are allocated in a network.
    pub fn allocations(&self, project: &str, network: &str) -> usize {
        self.network_ips(&key(project, network))
            .map_or(0, std::collections::BTreeSet::len)
    }

    fn overlapping(&self, c: Cidr) -> Option<&Network> {
        self.networks
            .values()
            .find(|n| Cidr::parse(&n.cidr).is_ok_and(|o| o.overlaps(c)))
    }

    fn free_cidr(&self) -> Option<Cidr> {
        let pool = Cidr::parse(&self.network.pool).ok()?;
        let len = network::DEFAULT_NETWORK_PREFIX.max(pool.prefix_len());
        pool.blocks(len).find(|b| self.overlapping(*b).is_none())
    }

    /// Builds a network without inserting it.
    fn new_network(
        &self,
        env: &CommandEnvelope,
        id: String,
        project: &str,
        req: &CreateNetworkRequest,
    ) -> Result<Network, ApiError> {
        let v = vnet::create_network(req)?;
        if self.networks.contains_key(&key(project, &req.name)) {
            return Err(ApiError::already_exists("network", &req.name));
        }
        let cidr = if let Some(c) = v.cidr {
            if let Some(o) = self.overlapping(c) {
                let msg = if o.meta.project == project {
                    format!("{c} overlaps network {:?} ({})", o.meta.name, o.cidr)
                } else {
                    format!(
                        "{c} overlaps a network of another project ({}); network CIDRs are unique in the cluster",
                        o.cidr
                    )
                };
                return Err(ApiError::conflict(msg).with_field("cidr"));
            }
            c
        } else {
            self.free_cidr().ok_or_else(|| {
                ApiError::conflict(format!(
                    "the network pool {} has no free /{} left; give a cidr",
                    self.network.pool,
                    network::DEFAULT_NETWORK_PREFIX
                ))
                .with_field("cidr")
            })?
        };
        let vni = self.next_vni.max(network::FIRST_VNI);
        if vni > network::MAX_VNI {
            return Err(ApiError::conflict("no VXLAN ids (VNIs) are left"));
        }
        let subnets = if v.subnets.is_empty() {
            vec![("default".to_string(), cidr)]
        } else {
            v.subnets
        };
        Ok(Network {
            meta: Meta {
                id,
                ..meta(env, &req.name, project)
            },
            cidr: cidr.to_string(),
            vni,
            subnets: subnets
                .into_iter()
                .map(|(name, c)| Subnet {
                    name,
                    cidr: c.to_string(),
                    gateway: c.gateway().to_string(),
                })
                .collect(),
        })
    }

    fn insert_network(&mut self, env: &CommandEnvelope, n: Network) {
        self.next_vni = n.vni + 1;
        let (p, name) = (n.meta.project.clone(), n.meta.name.clone());
        let msg = format!("{} (vni {})", n.cidr, n.vni);
        self.networks.insert(key(&p, &name), n);
        self.event(env, &p, "network", &name, "Created", msg);
    }

    fn new_group(env: &CommandEnvelope, id: String, project: &str, name: &str) -> SecurityGroup {
        SecurityGroup {
            meta: Meta {
                id,
                ..meta(env, name, project)
            },
            description: String::new(),
            rules: vec![
                rule("r1", Direction::Ingress, None, Some(name)),
                rule("r2", Direction::Egress, Some("0.0.0.0/0"), None),
            ],
        }
    }

    fn insert_group(&mut self, env: &CommandEnvelope, g: SecurityGroup) {
        let (p, name) = (g.meta.project.clone(), g.meta.name.clone());
        self.security_groups.insert(key(&p, &name), g);
        self.event(env, &p, "security_group", &name, "Created", String::new());
    }

    fn check_project(&self, project: &str) -> Result<(), ApiError> {
        if self.projects.contains_key(project) {
            Ok(())
        } else {
            Err(ApiError::not_found("project", project).with_field("project"))
        }
    }

    pub(crate) fn create_network(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        req: &CreateNetworkRequest,
    ) -> CommandResult {
        self.check_project(project)?;
        let n = self.new_network(env, env.new_id.clone(), project, req)?;
        self.insert_network(env, n.clone());
        Ok(CommandOutput::Network(Box::new(n)))
    }

    pub(crate) fn delete_network(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
    ) -> CommandResult {
        let k = key(project, name);
        if !self.networks.contains_key(&k) {
            return Err(ApiError::not_found("network", name));
        }
        let users: Vec<&str> = self
            .network_instances(&k)
            .map(|i| i.meta.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "network {name:?} still has {} instance(s) ({}); delete them first",
                users.len(),
                users.join(", ")
            )));
        }
        self.networks.remove(&k);
        self.event(env, project, "network", name, "Deleted", String::new());
        Ok(CommandOutput::None)
    }

    pub(crate) fn create_security_group(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        req: &CreateSecurityGroupRequest,
    ) -> CommandResult {
        self.check_project(project)?;
        nimbus_api::validate::name("name", &req.name)?;
        if req.description.len() > 255 {
            return Err(ApiError::invalid(
                "description",
                "description is at most 255 characters",
            ));
        }
        if self.security_groups.contains_key(&key(project, &req.name)) {
            return Err(ApiError::already_exists("security group", &req.name));
        }
        let mut g = Self::new_group(env, env.new_id.clone(), project, &req.name);
        g.description.clone_from(&req.description);
        self.insert_group(env, g.clone());
        Ok(CommandOutput::SecurityGroup(Box::new(g)))
    }

    pub(crate) fn delete_security_group(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
    ) -> CommandResult {
        let k = key(project, name);
        if !self.security_groups.contains_key(&k) {
            return Err(ApiError::not_found("security group", name));
        }
        let users: Vec<&str> = self
            .project_instances(project, None)
            .filter(|i| i.spec.security_groups.iter().any(|g| g == name))
            .map(|i| i.meta.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "security group {name:?} is used by {} instance(s) ({})",
                users.len(),
                users.join(", ")
            )));
        }
        if let Some(g) = self.security_groups.values().find(|g| {
            g.meta.project == project
                && g.meta.name != name
                && g.rules.iter().any(|r| r.group.as_deref() == Some(name))
        }) {
            return Err(ApiError::conflict(format!(
                "security group {name:?} is named by a rule of group {:?}",
                g.meta.name
            )));
        }
        self.security_groups.remove(&k);
        self.event(
            env,
            project,
            "security_group",
            name,
            "Deleted",
            String::new(),
        );
        Ok(CommandOutput::None)
    }

    pub(crate) fn add_rule(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        group: &str,
        req: &AddRuleRequest,
    ) -> CommandResult {
        let k = key(project, group);
        let Some(g) = self.security_groups.get(&k) else {
            return Err(ApiError::not_found("security group", group));
        };
        let mut r = vnet::rule(req)?;
        if let Some(peer) = &r.group {
            if !self.security_groups.contains_key(&key(project, peer)) {
                return Err(ApiError::invalid(
                    "group",
                    format!("security group {peer:?} not found in project {project:?}"),
                ));
            }
        }
        if let Some(same) = g.rules.iter().find(|o| same_rule(o, &r)) {
            return Err(ApiError::conflict(format!(
                "group {group:?} already has this rule ({})",
                same.id
            )));
        }
        if g.rules.len() >= vnet::MAX_RULES {
            return Err(ApiError::conflict(format!(
                "group {group:?} has {} rules, the most a group may have",
                vnet::MAX_RULES
            )));
        }
        r.id = next_rule_id(g);
        let msg = format!(
            "{} {} {} {}",
            r.id,
            r.direction.as_str(),
            r.ports_text(),
            r.peer_text()
        );
        let g = self.security_groups.get_mut(&k).expect("checked above");
        g.rules.push(r);
        touch(&mut g.meta, env);
        let out = g.clone();
        self.event(env, project, "security_group", group, "RuleAdded", msg);
        Ok(CommandOutput::SecurityGroup(Box::new(out)))
    }

    pub(crate) fn delete_rule(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        group: &str,
        rule_id: &str,
    ) -> CommandResult {
        let g = self
            .security_groups
            .get_mut(&key(project, group))
            .ok_or_else(|| ApiError::not_found("security group", group))?;
        let Some(pos) = g.rules.iter().position(|r| r.id == rule_id) else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("group {group:?} has no rule {rule_id:?}"),
            ));
        };
        g.rules.remove(pos);
        touch(&mut g.meta, env);
        let out = g.clone();
        self.event(
            env,
            project,
            "security_group",
            group,
            "RuleDeleted",
            rule_id.to_string(),
        );
        Ok(CommandOutput::SecurityGroup(Box::new(out)))
    }

    /// Resolves a new instance's network, subnet and security groups (planning the project's
    /// default network and group if they are used for the first time) and picks its address.
    /// Changes nothing: [`Self::commit_attachment`] applies the plan once placement succeeded.
    pub(crate) fn plan_attachment(
        &self,
        env: &CommandEnvelope,
        inst: &mut Instance,
    ) -> Result<Attachment, ApiError> {
        let project = inst.meta.project.clone();
        if inst.spec.network.is_empty() {
            inst.spec.network = DEFAULT_NETWORK.into();
        }
        let net_key = key(&project, &inst.spec.network);
        let (net, new_net) = match self.networks.get(&net_key) {
            Some(n) => (n.clone(), None),
            None if inst.spec.network == DEFAULT_NETWORK => {
                let req = CreateNetworkRequest {
                    name: DEFAULT_NETWORK.into(),
                    ..Default::default()
                };
                let n = self
                    .new_network(env, format!("{}-net", env.new_id), &project, &req)
                    .map_err(|e| ApiError {
                        message: format!("creating the default network: {}", e.message),
                        field: Some("network".into()),
                        ..e
                    })?;
                (n.clone(), Some(n))
            }
            None => {
                return Err(ApiError::invalid(
                    "network",
                    format!(
                        "network {:?} not found; see `nimbus network list`",
                        inst.spec.network
                    ),
                ))
            }
        };
        let subnet = if inst.spec.subnet.is_empty() {
            net.subnets.first()
        } else {
            net.subnets.iter().find(|s| s.name == inst.spec.subnet)
        }
        .ok_or_else(|| {
            ApiError::invalid(
                "subnet",
                format!(
                    "network {:?} has no subnet {:?}",
                    net.meta.name, inst.spec.subnet
                ),
            )
        })?;
        inst.spec.subnet.clone_from(&subnet.name);
        if inst.spec.security_groups.is_empty() {
            inst.spec.security_groups = vec![DEFAULT_SECURITY_GROUP.into()];
        }
        let mut new_group = None;
        for (i, g) in inst.spec.security_groups.iter().enumerate() {
            if self.security_groups.contains_key(&key(&project, g)) {
                continue;
            }
            if g == DEFAULT_SECURITY_GROUP {
                new_group = Some(Self::new_group(
                    env,
                    format!("{}-sg", env.new_id),
                    &project,
                    g,
                ));
                continue;
            }
            return Err(ApiError::invalid(
                format!("security_groups[{i}]"),
                format!("security group {g:?} not found; see `nimbus sg list`"),
            ));
        }
        let cidr = Cidr::parse(&subnet.cidr)
            .map_err(|e| ApiError::internal(format!("stored subnet: {e}")))?;
        let used = self.network_ips(&net_key);
        let ip = cidr
            .assignable()
            .find(|a| used.is_none_or(|m| !m.contains(&u32::from(*a))))
            .map(|a| a.to_string())
            .ok_or_else(|| {
                ApiError::conflict(format!(
                    "subnet {:?} ({}) of network {:?} has no free address",
                    subnet.name, subnet.cidr, net.meta.name
                ))
                .with_field("subnet")
            })?;
        inst.status.ip = Some(ip);
        Ok(Attachment {
            network: new_net,
            group: new_group,
        })
    }

    /// Applies an [`Attachment`] planned for an instance being inserted: the default network
    /// and group it creates. Its address is taken once the instance holds it (`Index::ips`).
    pub(crate) fn commit_attachment(&mut self, env: &CommandEnvelope, a: Attachment) {
        if let Some(n) = a.network {
            self.insert_network(env, n);
        }
        if let Some(g) = a.group {
            self.insert_group(env, g);
        }
    }

    /// Removes an instance from the state and frees its address.
    pub(crate) fn remove_instance(&mut self, id: &str) -> Option<Instance> {
        // Its address is free once it is gone (see `Index::ips`).
        let inst = std::sync::Arc::unwrap_or_clone(self.instances.remove(id)?);
        Some(inst)
    }

    /// Removes a project's networks and security groups (the project has no instances left).
    pub(crate) fn drop_project_networks(&mut self, project: &str) {
        let prefix = format!("{project}/");
        self.networks.retain(|k, _| !k.starts_with(&prefix));
        self.security_groups.retain(|k, _| !k.starts_with(&prefix));
    }

    /// Why `inst` cannot run on `node`: a host port it publishes is already published there
    /// by another instance.
    pub(crate) fn port_conflict(&self, inst: &Instance, node: &str) -> Option<String> {
        for p in &inst.spec.publish {
            let holder = self.instances_on(node).find(|o| {
                o.meta.id != inst.meta.id
                    && o.spec
                        .publish
                        .iter()
                        .any(|q| q.host_port == p.host_port && q.protocol == p.protocol)
            });
            if let Some(o) = holder {
                return Some(format!(
                    "host port {}/{} is already published on node {node} by instance {}/{}",
                    p.host_port,
                    p.protocol.as_str(),
                    o.meta.project,
                    o.meta.name
                ));
            }
        }
        None
    }
}
