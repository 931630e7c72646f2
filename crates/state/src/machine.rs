//! The pure state machine: all cluster state, and the deterministic `apply` of commands.
//!
//! `apply` reads nothing but the state, the log index and the command envelope (which carries
//! the proposer's time and a fresh id), so every replica computes the same result. Placement
//! runs inside `apply` through the pure scheduler, so concurrent creates can never double-book
//! a node.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use nimbus_api::agent::InstanceReport;
use nimbus_api::{
    ApiError, DesiredState, ErrorCode, Event, Image, Instance, InstanceDraft, InstanceState,
    InstanceType, Meta, Network, Node, NodeState, Project, SecurityGroup,
};

use crate::command::{
    Command, CommandEnvelope, CommandOutput, CommandResult, InstanceAction, COMMAND_FORMAT_VERSION,
};
use crate::network;
use crate::tracked::Tracked;

/// How many events are kept.
pub const EVENT_HISTORY: usize = 10_000;
/// How many idempotency keys are remembered (a retry must come within this many keyed creates).
pub const IDEMPOTENCY_KEYS: usize = 10_000;

/// All replicated state, serialized whole as the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateData {
    /// Last applied log index (the state revision).
    pub revision: u64,
    /// Projects by name.
    pub projects: BTreeMap<String, Project>,
    /// Nodes by name.
    pub nodes: Tracked<String, Node>,
    /// Images by name.
    pub images: BTreeMap<String, Image>,
    /// Instances by id.
    pub instances: Tracked<String, std::sync::Arc<Instance>>,
    /// Idempotency keys: `project/key` -> instance id (`project:key` -> project name); the
    /// last [`IDEMPOTENCY_KEYS`] are kept.
    pub idempotency: BTreeMap<String, String>,
    /// The keys of `idempotency`, oldest first.
    #[serde(default)]
    pub idempotency_order: VecDeque<String>,
    /// Recent events (bounded to [`EVENT_HISTORY`]).
    pub events: VecDeque<Event>,
    /// Next event sequence number.
    pub next_event_seq: u64,
    /// Scheduling policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Node address pool and bridge.
    #[serde(default)]
    pub network: NetworkSettings,
    /// Per node: the revision at which its assignments last changed (agents long-poll on it).
    #[serde(default)]
    pub assignment_revisions: BTreeMap<String, u64>,
    /// Load balancers by `project/name`.
    #[serde(default)]
    pub loadbalancers: Tracked<String, nimbus_api::lb::LoadBalancer>,
    /// The adaptive score weights (see `utilization.rs`), once a node reported utilisation.
    #[serde(default)]
    pub adaptive: Option<crate::utilization::AdaptiveState>,
    /// Networks by `project/name`.
    #[serde(default)]
    pub networks: Tracked<String, Network>,
    /// Security groups by `project/name`.
    #[serde(default)]
    pub security_groups: Tracked<String, SecurityGroup>,
    /// The next VXLAN id to hand out.
    #[serde(default)]
    pub next_vni: u32,
    /// Per node: the revision at which its own part of its network map (its instances, its
    /// address, the datapath settings) last changed.
    #[serde(default)]
    pub network_revisions: BTreeMap<String, u64>,
    /// Per network (`project/name`): the revision at which its members or settings changed.
    #[serde(default)]
    pub net_revisions: BTreeMap<String, u64>,
    /// Per security group (`project/name`): the revision at which its rules or members changed.
    #[serde(default)]
    pub group_revisions: BTreeMap<String, u64>,
    /// Per load balancer (`project/name`): the revision at which what its nodes serve changed
    /// (spec, placement, backends).
    #[serde(default)]
    pub lb_revisions: BTreeMap<String, u64>,
    /// Load-balancer backends being taken out of rotation before they stop, by instance id.
    #[serde(default)]
    pub drains: BTreeMap<String, crate::drain::Drain>,
    /// Secrets by `project/name`, sealed.
    #[serde(default)]
    pub secrets: BTreeMap<String, crate::secrets::StoredSecret>,
    /// Per node: SHA-256 (hex) of its credential (issued at its first registration; hollow
    /// nodes and nodes of earlier builds have none).
    #[serde(default)]
    pub node_credentials: BTreeMap<String, String>,
    /// The cluster PKI: CA certificate, join tokens, revoked holders.
    #[serde(default)]
    pub pki: crate::pki::PkiState,
    /// Volumes by `project/name`.
    #[serde(default)]
    pub volumes: BTreeMap<String, nimbus_api::volume::Volume>,
    /// Storage pools by name (the built-in `local` is not stored unless changed).
    #[serde(default)]
    pub storage_pools: BTreeMap<String, nimbus_api::volume::StoragePool>,
}

/// The replicated state ([`StateData`], which it dereferences to) with its derived indexes,
/// rebuilt when it is loaded and kept current by `apply` (see `index.rs`).
#[derive(Debug, Clone, Default)]
pub struct StateMachine {
    pub(crate) data: StateData,
    pub(crate) index: crate::index::Index,
    /// Nodes whose assignment or network revision moved since [`StateMachine::take_woken`].
    woken: BTreeSet<String>,
}

impl std::ops::Deref for StateMachine {
    type Target = StateData;
    fn deref(&self) -> &StateData {
        &self.data
    }
}

impl std::ops::DerefMut for StateMachine {
    fn deref_mut(&mut self) -> &mut StateData {
        &mut self.data
    }
}

impl PartialEq for StateMachine {
    fn eq(&self, other: &Self) -> bool {
        self.data == other.data
    }
}

impl Serialize for StateMachine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.data.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StateMachine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::from(StateData::deserialize(d)?))
    }
}

impl From<StateData> for StateMachine {
    fn from(data: StateData) -> Self {
        let mut sm = Self {
            data,
            index: crate::index::Index::default(),
            woken: BTreeSet::new(),
        };
        sm.rebuild_index();
        sm
    }
}

/// The wake-up key of a revocation of server certificates (every node's poll waits on it).
const PKI_WAKE_KEY: &str = "pki";

/// The kinds of change revisions, each with its wake-up key (`n/NODE` for a node's own
/// assignments and map, `net/KEY`, `g/KEY`, `lb/KEY`).
#[derive(Debug, Clone, Copy)]
enum Revisions {
    Assignments,
    NodeMap,
    Network,
    Group,
    Lb,
}

impl Revisions {
    fn wake_key(self, key: &str) -> String {
        match self {
            Self::Assignments | Self::NodeMap => format!("n/{key}"),
            Self::Network => format!("net/{key}"),
            Self::Group => format!("g/{key}"),
            Self::Lb => format!("lb/{key}"),
        }
    }
}

/// The scheduling policy kept in the state (so every replica places identically).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    /// The policy.
    pub scheduler: Option<SchedulerPolicy>,
}

/// Cluster network settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSettings {
    /// Pool network CIDRs (a /24 each by default) are carved from.
    pub pool: String,
    /// Datapath name prefix: bridges `<prefix>b<vni>`, VXLAN devices `<prefix>v<vni>`, the
    /// nftables table `inet <prefix>`.
    #[serde(alias = "bridge")]
    pub prefix: String,
    /// MTU of instance interfaces.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// VXLAN UDP port.
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
}

fn default_mtu() -> u32 {
    network::DEFAULT_MTU
}

fn default_vxlan_port() -> u16 {
    network::DEFAULT_VXLAN_PORT
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            pool: network::DEFAULT_POOL.into(),
            prefix: network::DEFAULT_PREFIX.into(),
            mtu: network::DEFAULT_MTU,
            vxlan_port: network::DEFAULT_VXLAN_PORT,
        }
    }
}

/// Serializable mirror of [`nimbus_scheduler::Policy`].
pub type SchedulerPolicy = nimbus_scheduler::Policy;

pub(crate) fn meta(env: &CommandEnvelope, name: &str, project: &str) -> Meta {
    Meta {
        id: env.new_id.clone(),
        name: name.to_string(),
        project: project.to_string(),
        version: 1,
        created_at: env.time.clone(),
        updated_at: env.time.clone(),
        labels: BTreeMap::new(),
    }
}

pub(crate) fn touch(m: &mut Meta, env: &CommandEnvelope) {
    m.version += 1;
    m.updated_at.clone_from(&env.time);
}

pub(crate) fn check_version(m: &Meta, expected: Option<u64>) -> Result<(), ApiError> {
    match expected {
        Some(v) if v != m.version => Err(ApiError {
            code: ErrorCode::VersionConflict,
            message: format!(
                "{} has version {}, not {v}; re-read it and retry",
                m.name, m.version
            ),
            field: Some("version".into()),
        }),
        _ => Ok(()),
    }
}

impl StateMachine {
    /// Applies one command at log index `index`. Pure: the result depends only on the state,
    /// the index and the envelope. On error the state is unchanged (except `revision`).
    pub fn apply(&mut self, index: u64, env: &CommandEnvelope) -> CommandResult {
        self.revision = index;
        if env.format > COMMAND_FORMAT_VERSION {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!(
                    "log entry uses command format {} but this server understands up to {COMMAND_FORMAT_VERSION}; upgrade this server",
                    env.format
                ),
            ));
        }
        let result = self.apply_command(index, env);
        if result.is_ok() {
            self.place_lbs();
        }
        if !matches!(env.command, Command::Batch { .. }) {
            self.prune_drains();
            self.settle();
        }
        result
    }

    /// Nodes whose assignments or network map changed since the last call (the runtime wakes
    /// their agents' long-polls).
    pub fn take_woken(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.woken)
    }

    fn apply_command(&mut self, index: u64, env: &CommandEnvelope) -> CommandResult {
        match &env.command {
            Command::Noop => Ok(CommandOutput::None),
            Command::Pki(c) => {
                self.data.pki.apply(c)?;
                if c.concerns_agents() {
                    self.data.pki.server_revocations_revision = self.revision;
                    self.woken.insert(PKI_WAKE_KEY.to_string());
                }
                Ok(CommandOutput::None)
            }
            Command::Batch { commands: envs } => Ok(CommandOutput::Batch(
                envs.iter()
                    .map(|e| {
                        if matches!(e.command, Command::Batch { .. }) {
                            Err(ApiError::internal("nested command batches are not allowed"))
                        } else {
                            self.apply(index, e)
                        }
                    })
                    .collect(),
            )),
            Command::ConfigureNetwork {
                pool,
                prefix,
                mtu,
                vxlan_port,
            } => {
                let want = NetworkSettings {
                    pool: pool.clone(),
                    prefix: prefix.clone(),
                    mtu: if *mtu == 0 {
                        network::DEFAULT_MTU
                    } else {
                        *mtu
                    },
                    vxlan_port: if *vxlan_port == 0 {
                        network::DEFAULT_VXLAN_PORT
                    } else {
                        *vxlan_port
                    },
                };
                if self.network == want {
                    return Ok(CommandOutput::None);
                }
                network::validate_pool(pool)?;
                network::validate_prefix(prefix)?;
                if !(576..=9000).contains(&want.mtu) {
                    return Err(ApiError::invalid("mtu", "mtu must be between 576 and 9000"));
                }
                if !self.networks.is_empty() {
                    return Err(ApiError::conflict(
                        "the network settings cannot change once networks exist",
                    ));
                }
                self.network = want;
                self.bump_all_networks();
                Ok(CommandOutput::None)
            }
            Command::CreateProject {
                name,
                description,
                idempotency_key,
            } => self.create_project(env, name, description, idempotency_key.as_deref()),
            Command::DeleteProject { name } => self.delete_project(env, name),
            Command::RegisterNode(req) => self.register_node(env, req),
            Command::RegisterNodeAs { node, by } => self.register_node_as(env, node, by),
            Command::RemoveNode { name, force } => self.remove_node(env, name, *force),
            Command::NodeHeartbeat { name, utilization } => self.heartbeat(env, name, *utilization),
            Command::MarkNodeReady { name } => self.mark_node_ready(env, name),
            Command::FinishDrain { ids } => {
                self.finish_drains(env, ids);
                Ok(CommandOutput::None)
            }
            Command::UtilizationSnapshot { nodes } => {
                self.utilization_snapshot(env, nodes);
                Ok(CommandOutput::None)
            }
            Command::MarkNodeDown { name, reason } => self.mark_node_down(env, name, reason),
            Command::DrainNode { name } => self.drain(env, name),
            Command::SetNodeCordon {
                name,
                cordoned,
                version,
            } => {
                let node = self
                    .nodes
                    .get_mut(name)
                    .ok_or_else(|| ApiError::not_found("node", name))?;
                check_version(&node.meta, *version)?;
                if node.cordoned != *cordoned {
                    node.cordoned = *cordoned;
                    touch(&mut node.meta, env);
                    let what = if *cordoned { "Cordoned" } else { "Uncordoned" };
                    self.event(env, "", "node", name, what, String::new());
                }
                Ok(CommandOutput::Node(self.nodes[name].clone()))
            }
            Command::PutImage(image) => {
                let mut image = image.clone();
                if let Some(old) = self.images.get(&image.meta.name) {
                    if old.digest == image.digest {
                        return Ok(CommandOutput::Image(old.clone()));
                    }
                    image.meta.id.clone_from(&old.meta.id);
                    image.meta.created_at.clone_from(&old.meta.created_at);
                    image.meta.version = old.meta.version + 1;
                } else {
                    image.meta = Meta {
                        labels: image.meta.labels.clone(),
                        ..meta(env, &image.meta.name, "")
                    };
                }
                image.meta.updated_at.clone_from(&env.time);
                self.event(
                    env,
                    "",
                    "image",
                    &image.meta.name,
                    "Imported",
                    image.digest.clone(),
                );
                self.images.insert(image.meta.name.clone(), image.clone());
                Ok(CommandOutput::Image(image))
            }
            Command::DeleteImage { name } => {
                let img = self
                    .images
                    .get(name)
                    .ok_or_else(|| ApiError::not_found("image", name))?;
                if let Some(i) = self
                    .instances
                    .values()
                    .find(|i| i.spec.image_digest == img.digest)
                {
                    return Err(ApiError::conflict(format!(
                        "image {name:?} is used by instance {}/{}",
                        i.meta.project, i.meta.name
                    )));
                }
                self.images.remove(name);
                self.event(env, "", "image", name, "Deleted", String::new());
                Ok(CommandOutput::None)
            }
            Command::CreateInstance {
                instance,
                idempotency_key,
            } => self.create_instance(env, instance, idempotency_key.as_deref()),
            Command::SetInstanceDesired {
                project,
                name,
                action,
                version,
            } => self.set_desired(env, project, name, *action, *version),
            Command::ScheduleInstance { id, .. } => self.schedule_pending(env, id),
            Command::ReportStatus {
                node,
                reports,
                interfaces,
            } => {
                for r in reports {
                    self.apply_report(env, node, r);
                }
                if !interfaces.is_empty() {
                    if let Some(n) = self.nodes.get_mut(node) {
                        n.interfaces.clone_from(interfaces);
                        n.counters_at = Some(env.time.clone());
                    }
                }
                Ok(CommandOutput::None)
            }
            Command::CreateLoadBalancer {
                project,
                name,
                spec,
                labels,
            } => self.create_lb(env, project, name, spec, labels),
            Command::UpdateLoadBalancer {
                project,
                name,
                spec,
                version,
            } => self.update_lb(env, project, name, spec, *version),
            Command::DeleteLoadBalancer { project, name } => self.delete_lb(env, project, name),
            Command::VipLease {
                node,
                project,
                name,
                vip,
                release,
            } => self.vip_lease(env, node, project, name, vip, *release),
            Command::ReportLbHealth { node, reports } => {
                self.report_lb_health(node, reports);
                Ok(CommandOutput::None)
            }
            Command::CreateNetwork { project, request } => {
                self.create_network(env, project, request)
            }
            Command::DeleteNetwork { project, name } => self.delete_network(env, project, name),
            Command::CreateSecurityGroup { project, request } => {
                self.create_security_group(env, project, request)
            }
            Command::DeleteSecurityGroup { project, name } => {
                self.delete_security_group(env, project, name)
            }
            Command::AddSecurityGroupRule {
                project,
                group,
                request,
            } => self.add_rule(env, project, group, request),
            Command::DeleteSecurityGroupRule {
                project,
                group,
                rule,
            } => self.delete_rule(env, project, group, rule),
            Command::CreateSecret {
                project,
                name,
                sealed,
                labels,
            } => self.create_secret(env, project, name, sealed, labels),
            Command::DeleteSecret { project, name } => self.delete_secret(env, project, name),
            Command::RewrapSecrets { from, to, items } => self.rewrap_secrets(env, from, to, items),
            Command::CreateVolume { project, volume } => self.create_volume(env, project, volume),
            Command::DeleteVolume { project, name } => self.delete_volume(env, project, name),
            Command::SnapshotVolume {
                project,
                name,
                snapshot,
            } => self.snapshot_volume(env, project, name, snapshot),
            Command::ResizeVolume {
                project,
                name,
                size_bytes,
                version,
            } => self.resize_volume(env, project, name, *size_bytes, *version),
            Command::RestoreVolume {
                project,
                name,
                snapshot,
                version,
            } => self.restore_volume(env, project, name, snapshot, *version),
        }
    }

    /// Records a change at this revision in `map` under `key` and the wake-up key `wake`.
    fn bump(&mut self, which: Revisions, key: &str) {
        let rev = self.revision;
        let map = match which {
            Revisions::Assignments => &mut self.data.assignment_revisions,
            Revisions::NodeMap => &mut self.data.network_revisions,
            Revisions::Network => &mut self.data.net_revisions,
            Revisions::Group => &mut self.data.group_revisions,
            Revisions::Lb => &mut self.data.lb_revisions,
        };
        match map.get_mut(key) {
            Some(r) => *r = rev,
            None => {
                map.insert(key.to_string(), rev);
            }
        }
        let wake = which.wake_key(key);
        if !self.woken.contains(&wake) {
            self.woken.insert(wake);
        }
    }

    /// Records that the assignments of `node` changed at this revision.
    pub(crate) fn bump_assignments(&mut self, node: &str) {
        self.bump(Revisions::Assignments, node);
    }

    /// Records that `node`'s own part of its network map changed at this revision.
    pub(crate) fn bump_network_of(&mut self, node: &str) {
        self.bump(Revisions::NodeMap, node);
    }

    /// Records that a network's part of its hosts' maps changed at this revision.
    pub(crate) fn bump_net(&mut self, net: &str) {
        self.bump(Revisions::Network, net);
    }

    /// Records that a group's part of its viewers' maps changed at this revision.
    pub(crate) fn bump_group(&mut self, group: &str) {
        self.bump(Revisions::Group, group);
    }

    /// Records that what a load balancer's nodes serve changed at this revision.
    pub(crate) fn bump_lb(&mut self, lb: &str) {
        self.bump(Revisions::Lb, lb);
    }

    /// The revision at which `node`'s network map last changed: the latest of its own part's,
    /// its networks' and the groups it shows (so a change to a network costs one update, not
    /// one per node hosting it). Monotonic: a node stops hosting a network or showing a group
    /// only through a change to its own part.
    pub fn network_revision(&self, node: &str) -> u64 {
        let (nets, groups) = self.map_keys(node);
        let own = self.network_revisions.get(node).copied().unwrap_or(0);
        nets.iter()
            .filter_map(|n| self.net_revisions.get(n))
            .chain(groups.iter().filter_map(|g| self.group_revisions.get(g)))
            .copied()
            .fold(own, u64::max)
    }

    /// The revision at which `node`'s assignments last changed: the latest of its own, the last
    /// revocation of server certificates (sent with them) and those of the load balancers it
    /// serves.
    pub fn assignment_revision(&self, node: &str) -> u64 {
        let own = self
            .assignment_revisions
            .get(node)
            .copied()
            .unwrap_or(0)
            .max(self.pki.server_revocations_revision);
        self.lbs_served_by(node)
            .filter_map(|k| self.lb_revisions.get(k))
            .copied()
            .fold(own, u64::max)
    }

    /// Keys of the load balancers `node` serves.
    pub fn lbs_served_by<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.loadbalancers
            .iter()
            .filter(move |(_, lb)| lb.status.nodes.iter().any(|n| n == node))
            .map(|(k, _)| k)
    }

    /// The wake-up keys a long-poll of `node` waits on: its own, the revocations of server
    /// certificates, its networks', the groups it shows, the load balancers it serves (see
    /// `raft/wakeups.rs`).
    pub fn wake_keys(&self, node: &str) -> Vec<String> {
        let (nets, groups) = self.map_keys(node);
        let mut keys = vec![Revisions::Assignments.wake_key(node), PKI_WAKE_KEY.into()];
        keys.extend(nets.iter().map(|n| Revisions::Network.wake_key(n)));
        keys.extend(groups.iter().map(|g| Revisions::Group.wake_key(g)));
        keys.extend(self.lbs_served_by(node).map(|k| Revisions::Lb.wake_key(k)));
        keys
    }

    /// Remembers an idempotency key, forgetting the oldest beyond [`IDEMPOTENCY_KEYS`].
    fn remember_key(&mut self, key: String, value: String) {
        if self.idempotency.insert(key.clone(), value).is_none() {
            self.idempotency_order.push_back(key);
        }
        while self.idempotency_order.len() > IDEMPOTENCY_KEYS {
            if let Some(old) = self.idempotency_order.pop_front() {
                self.idempotency.remove(&old);
            }
        }
    }

    pub(crate) fn event(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        kind: &str,
        name: &str,
        reason: &str,
        message: String,
    ) {
        self.next_event_seq += 1;
        let seq = self.next_event_seq;
        self.events.push_back(Event {
            seq,
            time: env.time.clone(),
            project: project.to_string(),
            kind: kind.to_string(),
            name: name.to_string(),
            reason: reason.to_string(),
            message,
        });
        while self.events.len() > EVENT_HISTORY {
            self.events.pop_front();
        }
    }

    fn create_project(
        &mut self,
        env: &CommandEnvelope,
        name: &str,
        description: &str,
        key: Option<&str>,
    ) -> CommandResult {
        nimbus_api::validate::name("name", name)?;
        if let Some(key) = key {
            if let Some(existing) = self.idempotency.get(&format!("project:{key}")) {
                if existing == name {
                    if let Some(p) = self.projects.get(name) {
                        return Ok(CommandOutput::Project(p.clone()));
                    }
                }
                return Err(ApiError::conflict(format!(
                    "idempotency key {key:?} was already used to create project {existing:?}"
                )));
            }
        }
        if self.projects.contains_key(name) {
            return Err(ApiError::already_exists("project", name));
        }
        let p = Project {
            meta: meta(env, name, name),
            description: description.to_string(),
        };
        if let Some(key) = key {
            self.remember_key(format!("project:{key}"), name.to_string());
        }
        self.projects.insert(name.to_string(), p.clone());
        self.event(env, name, "project", name, "Created", String::new());
        Ok(CommandOutput::Project(p))
    }

    fn delete_project(&mut self, env: &CommandEnvelope, name: &str) -> CommandResult {
        if !self.projects.contains_key(name) {
            return Err(ApiError::not_found("project", name));
        }
        if name == "default" {
            return Err(ApiError::conflict("the default project cannot be deleted"));
        }
        let n = self.project_instance_count(name);
        if n > 0 {
            return Err(ApiError::conflict(format!(
                "project {name:?} still has {n} instance(s); delete them first"
            )));
        }
        if self.loadbalancers.values().any(|l| l.meta.project == name) {
            return Err(ApiError::conflict(format!(
                "project {name:?} still has load balancers; delete them first"
            )));
        }
        if self.project_volumes(name, None).next().is_some() {
            return Err(ApiError::conflict(format!(
                "project {name:?} still has volumes; delete them first"
            )));
        }
        self.projects.remove(name);
        self.drop_project_networks(name);
        self.event(env, name, "project", name, "Deleted", String::new());
        Ok(CommandOutput::None)
    }

    fn create_instance(
        &mut self,
        env: &CommandEnvelope,
        draft: &InstanceDraft,
        key: Option<&str>,
    ) -> CommandResult {
        let project = draft.project.clone();
        let name = draft.name.clone();
        if !self.projects.contains_key(&project) {
            return Err(ApiError::not_found("project", &project).with_field("project"));
        }
        if let Some(key) = key {
            if let Some(id) = self.idempotency.get(&format!("{project}/{key}")) {
                if let Some(i) = self.instances.get(id) {
                    if i.meta.name == name {
                        return Ok(CommandOutput::Instance(Box::new((**i).clone())));
                    }
                    return Err(ApiError::conflict(format!(
                        "idempotency key {key:?} was already used to create instance {:?}",
                        i.meta.name
                    )));
                }
            }
        }
        nimbus_api::validate::name("name", &name)?;
        if self.instance_by_name(&project, &name).is_some() {
            return Err(ApiError::already_exists("instance", &name));
        }
        let mut spec = draft.spec.clone();
        self.check_secrets_exist(
            &project,
            spec.secrets
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("secrets[{i}].secret"), u.secret.as_str())),
        )?;
        self.check_volume_uses(&project, &spec)?;
        let image = self.resolve_image(&spec)?;
        spec.image.clone_from(&image.meta.name);
        spec.image_digest.clone_from(&image.digest);
        if spec.instance_type == InstanceType::Vm && spec.disk_bytes < image.size_bytes {
            return Err(ApiError::invalid(
                "disk",
                format!(
                    "disk {} is smaller than image {} ({})",
                    nimbus_api::validate::format_size(spec.disk_bytes),
                    image.meta.name,
                    nimbus_api::validate::format_size(image.size_bytes)
                ),
            ));
        }
        let mut inst = Instance {
            meta: Meta {
                labels: draft.labels.clone(),
                ..meta(env, &name, &project)
            },
            spec,
            status: nimbus_api::InstanceStatus::default(),
        };
        let attachment = self.plan_attachment(env, &mut inst)?;
        // `None`: a VM waiting, pending, for a node still probing its accelerator (vm_probe.rs).
        let placed = self.place_or_await_vm_probe(env, &mut inst)?;
        if let Some((node, _)) = &placed {
            self.assign(env, &mut inst, node)?;
        }
        let id = inst.meta.id.clone();
        if let Some(key) = key {
            self.remember_key(format!("{project}/{key}"), id.clone());
        }
        self.commit_attachment(env, attachment);
        self.instances.insert(id, std::sync::Arc::new(inst.clone()));
        let (reason, message) = match &placed {
            Some((node, preempted)) => {
                self.bump_assignments(node);
                (
                    "Scheduled",
                    crate::preemption::scheduled_message(node, preempted),
                )
            }
            None => ("WaitingForVmProbe", inst.status.message.clone()),
        };
        self.event(
            env,
            &project,
            "instance",
            &name,
            "Created",
            format!(
                "{} from image {}",
                inst.spec.instance_type.as_str(),
                inst.spec.image
            ),
        );
        self.event(env, &project, "instance", &name, reason, message);
        Ok(CommandOutput::Instance(Box::new(inst)))
    }

    /// The image a new instance names: by name, else by digest (entries of older builds carry
    /// the digest already resolved).
    fn resolve_image(&self, spec: &nimbus_api::InstanceSpec) -> Result<&Image, ApiError> {
        let by_digest = |d: &str| self.images.values().find(|i| i.digest == d);
        let found = if spec.image_digest.is_empty() {
            self.images
                .get(&spec.image)
                .or_else(|| by_digest(&spec.image))
        } else {
            by_digest(&spec.image_digest)
        };
        found.ok_or_else(|| {
            ApiError::invalid(
                "image",
                format!("image {:?} not found; see `nimbus image list`", spec.image),
            )
        })
    }

    fn set_desired(
        &mut self,
        env: &CommandEnvelope,
        project: &str,
        name: &str,
        action: InstanceAction,
        version: Option<u64>,
    ) -> CommandResult {
        let id = self
            .instance_by_name(project, name)
            .map(|i| i.meta.id.clone())
            .ok_or_else(|| ApiError::not_found("instance", name))?;
        let node_down = {
            let i = &self.instances[&id];
            check_version(&i.meta, version)?;
            i.status
                .node
                .as_ref()
                .is_none_or(|n| self.nodes.get(n).is_none_or(|n| n.state == NodeState::Down))
        };
        {
            let i = &self.instances[&id];
            if action == InstanceAction::Start
                && i.status.node.is_none()
                && i.spec.desired != DesiredState::Deleted
            {
                // Never placed, or preempted: starting it places it anew.
                return self.start_unplaced(env, &id);
            }
        }
        let before = self.instances[&id].clone();
        let i = self.instance_mut(&id).expect("found above");
        if i.spec.desired == DesiredState::Deleted {
            return Err(ApiError::not_found("instance", name));
        }
        let reason = match action {
            InstanceAction::Start => {
                i.spec.desired = DesiredState::Running;
                if matches!(
                    i.status.state,
                    InstanceState::Stopped | InstanceState::Failed | InstanceState::Stopping
                ) {
                    // The nonce tells the agent to start it even if its policy would not.
                    i.spec.restart_nonce += 1;
                    i.status.state = InstanceState::Starting;
                    i.status.message.clear();
                }
                "StartRequested"
            }
            InstanceAction::Stop => {
                i.spec.desired = DesiredState::Stopped;
                if matches!(
                    i.status.state,
                    InstanceState::Running | InstanceState::Starting | InstanceState::Scheduled
                ) {
                    i.status.state = InstanceState::Stopping;
                }
                "StopRequested"
            }
            InstanceAction::Restart => {
                i.spec.desired = DesiredState::Running;
                i.spec.restart_nonce += 1;
                if matches!(
                    i.status.state,
                    InstanceState::Stopped | InstanceState::Failed
                ) {
                    i.status.state = InstanceState::Starting;
                }
                "RestartRequested"
            }
            InstanceAction::Delete => {
                i.spec.desired = DesiredState::Deleted;
                i.status.state = InstanceState::Deleting;
                "DeleteRequested"
            }
        };
        touch(&mut i.meta, env);
        let out = i.clone();
        if let Some(n) = &out.status.node {
            self.bump_assignments(n);
        }
        match action {
            InstanceAction::Stop | InstanceAction::Delete if !node_down => {
                self.begin_drain(&before);
            }
            InstanceAction::Start => {
                self.drains.remove(&id);
            }
            _ => {}
        }
        self.event(env, project, "instance", name, reason, String::new());
        if action == InstanceAction::Delete && node_down {
            // Nothing runs it (never placed, or its node is gone): remove it now.
            self.remove_instance(&id);
            self.event(
                env,
                project,
                "instance",
                name,
                "Deleted",
                "no live node held it".into(),
            );
        }
        Ok(CommandOutput::Instance(Box::new(out)))
    }

    fn apply_report(&mut self, env: &CommandEnvelope, node: &str, r: &InstanceReport) {
        let Some(i) = self.instances.get(&r.id) else {
            return;
        };
        // Fencing: only the node holding the current generation may report.
        if i.status.node.as_deref() != Some(node) || i.status.generation != r.generation {
            return;
        }
        let (project, name) = (i.meta.project.clone(), i.meta.name.clone());
        if r.deleted {
            if i.spec.desired == DesiredState::Deleted {
                self.remove_instance(&r.id);
                self.bump_assignments(node);
                self.event(env, &project, "instance", &name, "Deleted", String::new());
            }
            return;
        }
        let before = i.status.clone();
        // While a delete is pending, the observed state stays `deleting`; while a stop drains
        // the backend out of its load balancers, `stopping`.
        let draining = self
            .drains
            .get(&r.id)
            .is_some_and(|d| d.generation == r.generation);
        let i = self.instance_mut(&r.id).expect("found above");
        if i.spec.desired != DesiredState::Deleted && !draining {
            i.status.state = r.state;
        }
        i.status.pid = r.pid;
        i.status.exit_code = r.exit_code;
        i.status.message.clone_from(&r.message);
        i.status.restart_count = r.restart_count;
        if r.accelerator.is_some() {
            i.status.accelerator.clone_from(&r.accelerator);
        }
        if r.state == InstanceState::Running
            && (before.state != InstanceState::Running || before.pid != r.pid)
        {
            i.status.started_at = Some(env.time.clone());
        }
        if i.status == before {
            return;
        }
        touch(&mut i.meta, env);
        if before.state != i.status.state || before.pid != i.status.pid {
            let reason = match i.status.state {
                InstanceState::Running if before.restart_count != r.restart_count => "Restarted",
                InstanceState::Running => "Started",
                InstanceState::Stopped => "Stopped",
                InstanceState::Failed => "Failed",
                InstanceState::Starting => "Starting",
                InstanceState::Stopping => "Stopping",
                other => other.as_str(),
            };
            let mut msg = r.message.clone();
            if let Some(code) = r.exit_code {
                if matches!(
                    i.status.state,
                    InstanceState::Stopped | InstanceState::Failed
                ) {
                    msg = if msg.is_empty() {
                        format!("exit code {code}")
                    } else {
                        format!("{msg} (exit code {code})")
                    };
                }
            }
            self.event(env, &project, "instance", &name, reason, msg);
        }
    }
}
