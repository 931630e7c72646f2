//! Commands: every mutation of the cluster state, as written to the Raft log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use nimbus_api::agent::{InstanceReport, RegisterNodeRequest};
use nimbus_api::lb::{LbBackendHealth, LoadBalancer, LoadBalancerSpec};
use nimbus_api::{
    AddRuleRequest, ApiError, CreateNetworkRequest, CreateSecurityGroupRequest, Image, Instance,
    InterfaceCounters, Network, Node, Project, SecurityGroup,
};

/// The version of the command encoding this build writes and understands.
pub const COMMAND_FORMAT_VERSION: u32 = 1;

/// A command with the context the proposer fixed, so that applying it is deterministic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    /// Encoding version; a state machine refuses versions it does not know.
    pub format: u32,
    /// Proposer's wall-clock time (RFC 3339), used for timestamps.
    pub time: String,
    /// Fresh UUID the proposer generated, used as the id of a created resource.
    pub new_id: String,
    /// The command.
    pub command: Command,
}

/// Who registers a node, which decides what it may register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeRegistrar {
    /// A holder of the shared node token: only a node that has no credential yet (a new
    /// name, a hollow node, or a node of an earlier build); the node gets this credential.
    NodeToken {
        /// SHA-256 (hex) of the credential the server issued.
        credential_sha256: String,
    },
    /// The node itself, with the credential the server checked against the state it read
    /// (re-checked here: a node removed meanwhile stays removed).
    Node {
        /// SHA-256 (hex) of the credential it presented.
        credential_sha256: String,
    },
    /// A hollow fleet (node token): only nodes without a credential.
    Fleet,
    /// The node itself, authenticated by a certificate of the cluster CA (checked at the TLS
    /// handshake): any node it names but a revoked one (see [`crate::pki`]).
    Certificate,
}

/// A typed mutation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// No-op (used to probe the write path).
    Noop,
    /// A PKI change (CA certificate, join tokens, revocations).
    Pki(crate::pki::PkiCommand),
    /// Several commands proposed together as one log entry (group commit): applied in order,
    /// each with its own envelope; each succeeds or fails on its own.
    Batch {
        /// The commands, in order.
        commands: Vec<CommandEnvelope>,
    },
    /// Set the cluster's network pool and datapath settings (only before any network exists).
    ConfigureNetwork {
        /// Pool network CIDRs are carved from (a /8 to a /24).
        pool: String,
        /// Datapath name prefix (bridges, VXLAN devices, the nftables table).
        #[serde(alias = "bridge")]
        prefix: String,
        /// MTU of instance interfaces (0: the default).
        #[serde(default)]
        mtu: u32,
        /// VXLAN UDP port (0: the default).
        #[serde(default)]
        vxlan_port: u16,
    },
    /// Create a project.
    CreateProject {
        /// Name.
        name: String,
        /// Description.
        description: String,
        /// Idempotency key.
        #[serde(default)]
        idempotency_key: Option<String>,
    },
    /// Delete an empty project.
    DeleteProject {
        /// Name.
        name: String,
    },
    /// Register or re-register a node (entries of older builds: no credential checks).
    RegisterNode(RegisterNodeRequest),
    /// Register or re-register a node on behalf of `by` (validated, see `nodes.rs`).
    RegisterNodeAs {
        /// The registration.
        node: RegisterNodeRequest,
        /// Who registers it.
        by: NodeRegistrar,
    },
    /// Remove a node: refused while instances are assigned to it unless `force`, which first
    /// fences it like a lost node (its instances fail over). Its credential dies with it.
    RemoveNode {
        /// Node.
        name: String,
        /// Remove it even with instances assigned.
        #[serde(default)]
        force: bool,
    },
    /// Record a heartbeat (and the node's measured utilisation, if it sent one). Written by
    /// older builds only: heartbeats are leader-held leases now (see `MarkNodeReady` and
    /// `UtilizationSnapshot`); kept so their log entries still apply.
    NodeHeartbeat {
        /// Node.
        name: String,
        /// Measured utilisation (absent in entries of older builds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        utilization: Option<nimbus_api::NodeUtilization>,
    },
    /// A down node's heartbeats resumed (decided by the leader, which holds the leases).
    MarkNodeReady {
        /// Node.
        name: String,
    },
    /// The nodes' measured utilisation as the leader last heard it, for the nodes whose
    /// measurement changed since the previous snapshot (at most one such entry per 30 s);
    /// placement and the adaptive weights read only these.
    UtilizationSnapshot {
        /// Node -> measurement.
        nodes: BTreeMap<String, nimbus_api::NodeUtilization>,
    },
    /// Load-balancer backends are out of rotation everywhere (decided by the leader, see
    /// `drain.rs`): their nodes may stop them now.
    FinishDrain {
        /// Instance ids.
        ids: Vec<String>,
    },
    /// Mark nodes down that missed heartbeats (decided by the leader's controller).
    MarkNodeDown {
        /// Node.
        name: String,
        /// Why.
        reason: String,
    },
    /// Cordon a node and move its instances elsewhere through the scheduler.
    DrainNode {
        /// Node.
        name: String,
    },
    /// Cordon or uncordon.
    SetNodeCordon {
        /// Node.
        name: String,
        /// Cordoned.
        cordoned: bool,
        /// Expected version.
        version: Option<u64>,
    },
    /// Record an imported image.
    PutImage(Image),
    /// Remove an image record.
    DeleteImage {
        /// Name.
        name: String,
    },
    /// Create an instance from a validated draft (`nimbus_api::validate::create_instance`);
    /// apply resolves the image, places it and gives it an address. Entries of older builds
    /// carry a whole instance, which reads as a draft.
    CreateInstance {
        /// The validated request.
        instance: Box<nimbus_api::InstanceDraft>,
        /// Idempotency key.
        idempotency_key: Option<String>,
    },
    /// Change an instance's desired state (start/stop/restart/delete).
    SetInstanceDesired {
        /// Project.
        project: String,
        /// Name.
        name: String,
        /// The action.
        action: InstanceAction,
        /// Expected version.
        version: Option<u64>,
    },
    /// Place an instance on a node (scheduler decision), or record why it cannot be placed.
    ScheduleInstance {
        /// Instance id.
        id: String,
        /// The chosen node, or `None` with a message.
        node: Option<String>,
        /// Reason when unschedulable.
        message: String,
    },
    /// Status reports from a node's agent.
    ReportStatus {
        /// Node.
        node: String,
        /// Reports.
        reports: Vec<InstanceReport>,
        /// Interface counters of the node's instances (empty: unchanged).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        interfaces: Vec<InterfaceCounters>,
    },
    /// Create a network (VPC) in a project.
    CreateNetwork {
        /// Project.
        project: String,
        /// The request (validated again by apply).
        request: CreateNetworkRequest,
    },
    /// Delete a network without instances.
    DeleteNetwork {
        /// Project.
        project: String,
        /// Name.
        name: String,
    },
    /// Create a security group (with the default rules: all ingress from its own members, all
    /// egress).
    CreateSecurityGroup {
        /// Project.
        project: String,
        /// The request.
        request: CreateSecurityGroupRequest,
    },
    /// Delete a security group no instance or rule uses.
    DeleteSecurityGroup {
        /// Project.
        project: String,
        /// Name.
        name: String,
    },
    /// Add a rule to a security group.
    AddSecurityGroupRule {
        /// Project.
        project: String,
        /// Group name.
        group: String,
        /// The rule (validated again by apply).
        request: AddRuleRequest,
    },
    /// Delete a rule from a security group.
    DeleteSecurityGroupRule {
        /// Project.
        project: String,
        /// Group name.
        group: String,
        /// Rule id.
        rule: String,
    },
    /// Create a load balancer (spec already validated).
    CreateLoadBalancer {
        /// Project.
        project: String,
        /// Name.
        name: String,
        /// Spec.
        spec: Box<LoadBalancerSpec>,
        /// Labels.
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    /// Replace a load balancer's spec (already validated).
    UpdateLoadBalancer {
        /// Project.
        project: String,
        /// Name.
        name: String,
        /// New spec.
        spec: Box<LoadBalancerSpec>,
        /// Expected version.
        version: Option<u64>,
    },
    /// Delete a load balancer.
    DeleteLoadBalancer {
        /// Project.
        project: String,
        /// Name.
        name: String,
    },
    /// Acquire, renew or release the floating-VIP lease of a load balancer for a node.
    VipLease {
        /// Node asking.
        node: String,
        /// LB project.
        project: String,
        /// LB name.
        name: String,
        /// The VIP the node acts on (must still be the LB's).
        vip: String,
        /// Give it up.
        #[serde(default)]
        release: bool,
    },
    /// Create a secret from a value the proposing server sealed.
    CreateSecret {
        /// Project.
        project: String,
        /// Name.
        name: String,
        /// The sealed value.
        sealed: nimbus_seal::Sealed,
        /// Labels.
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    /// Delete a secret nothing uses.
    DeleteSecret {
        /// Project.
        project: String,
        /// Name.
        name: String,
    },
    /// Master-key rotation: replace the sealed values of these secrets (by `project/name`)
    /// still wrapped by key `from` with the given ones, re-wrapped by key `to`.
    RewrapSecrets {
        /// Id of the old master key.
        from: String,
        /// Id of the new master key.
        to: String,
        /// `project/name` -> the value re-wrapped by the new key (same ciphertext).
        items: BTreeMap<String, nimbus_seal::Sealed>,
    },
    /// Create a volume from a validated request (`nimbus_api::volume::create_volume`).
    CreateVolume {
        /// Project.
        project: String,
        /// The validated request.
        volume: nimbus_api::volume::VolumeDraft,
    },
    /// Delete a volume attached to nothing.
    DeleteVolume {
        /// Project.
        project: String,
        /// Name.
        name: String,
    },
    /// Record a snapshot of a volume.
    SnapshotVolume {
        /// Project.
        project: String,
        /// Volume.
        name: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// Grow a volume.
    ResizeVolume {
        /// Project.
        project: String,
        /// Volume.
        name: String,
        /// New size in bytes (not below the current one).
        size_bytes: u64,
        /// Expected version.
        #[serde(default)]
        version: Option<u64>,
    },
    /// Roll a volume back to one of its own snapshots.
    RestoreVolume {
        /// Project.
        project: String,
        /// Volume.
        name: String,
        /// `SNAP` or `VOLUME@SNAP`.
        snapshot: String,
        /// Expected version.
        #[serde(default)]
        version: Option<u64>,
    },
    /// Backend health of the LBs a node serves, by LB id.
    ReportLbHealth {
        /// Node.
        node: String,
        /// LB id -> backends.
        reports: BTreeMap<String, Vec<LbBackendHealth>>,
    },
}

/// User actions on an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceAction {
    /// Start.
    Start,
    /// Stop.
    Stop,
    /// Restart.
    Restart,
    /// Delete.
    Delete,
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum CommandOutput {
    /// Nothing to return.
    None,
    /// A project.
    Project(Project),
    /// A node.
    Node(Node),
    /// An image.
    Image(Image),
    /// An instance.
    Instance(Box<Instance>),
    /// A load balancer.
    LoadBalancer(Box<LoadBalancer>),
    /// A network.
    Network(Box<Network>),
    /// A security group.
    SecurityGroup(Box<SecurityGroup>),
    /// A VIP lease decision.
    VipLease(nimbus_api::lb::VipLeaseResponse),
    /// A secret (metadata only).
    Secret(Box<nimbus_api::secret::Secret>),
    /// A volume.
    Volume(Box<nimbus_api::volume::Volume>),
    /// How many items a command changed.
    Count(u64),
    /// The results of a [`Command::Batch`], in order.
    Batch(Vec<CommandResult>),
}

/// The result of applying a command: the output, or the API error that refused it (the state
/// is unchanged in that case).
pub type CommandResult = Result<CommandOutput, ApiError>;
