//! Resources as stored in the replicated state and returned by the API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Metadata every project-scoped resource carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Meta {
    /// Unique id (UUID v4).
    pub id: String,
    /// Name, unique within its kind and project (DNS label).
    pub name: String,
    /// Owning project (empty for cluster-scoped resources such as nodes).
    #[serde(default)]
    pub project: String,
    /// Incremented on every change; send it back for optimistic concurrency.
    pub version: u64,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// Last change, RFC 3339.
    pub updated_at: String,
    /// User labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A tenant: the unit of isolation, quota and billing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Project {
    /// Metadata.
    #[serde(flatten)]
    pub meta: Meta,
    /// Free-form description.
    #[serde(default)]
    pub description: String,
}

/// A node's health as seen by the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Heartbeating.
    #[default]
    Ready,
    /// Missed heartbeats for longer than the grace period.
    Down,
}

/// Resources of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct Capacity {
    /// Logical CPUs (in milli-CPUs: 1000 = one CPU).
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Disk in bytes.
    pub disk_bytes: u64,
}

/// What a node can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct NodeCapabilities {
    /// Runs containers.
    pub containers: bool,
    /// Runs VMs.
    pub vms: bool,
    /// VM accelerator in use (`kvm` or `tcg`), if VMs are supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// Why VMs are not supported, if they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_unavailable_reason: Option<String>,
    /// The node is still probing its VM accelerator: `vms` may turn true. VM creates that only
    /// lack a VM-capable node wait for it (`pending`) instead of being refused.
    #[serde(default)]
    pub vm_probe_pending: bool,
}

/// A machine running `nimbus agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    /// Metadata (project is empty).
    #[serde(flatten)]
    pub meta: Meta,
    /// Address other components reach the agent's API at (`http://host:port`).
    pub agent_url: String,
    /// Total capacity.
    pub capacity: Capacity,
    /// Capabilities.
    pub capabilities: NodeCapabilities,
    /// Health.
    pub state: NodeState,
    /// Cordoned nodes get no new instances.
    #[serde(default)]
    pub cordoned: bool,
    /// Zone label (failure domain).
    #[serde(default)]
    pub zone: String,
    /// Last heartbeat, RFC 3339.
    pub last_heartbeat: String,
    /// Agent version.
    #[serde(default)]
    pub agent_version: String,
    /// The node's address on the underlay network (VXLAN tunnels between nodes end here).
    #[serde(default)]
    pub underlay_ip: String,
    /// Traffic counters of the instances' interfaces, as last reported by the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<crate::InterfaceCounters>,
    /// When the counters were reported, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters_at: Option<String>,
    /// Utilisation measured by the agent, from its last heartbeat that carried a measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<NodeUtilization>,
}

/// Node utilisation measured by its agent (from `/proc` and the interface counters), in per
/// mille of the node's capacity. The scheduler uses it as a floor of each node's load and to
/// compute cluster-wide pressure for the adaptive weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeUtilization {
    /// CPU busy time, per mille of all CPUs.
    pub cpu_permille: u32,
    /// Memory in use (total minus available), per mille of total memory.
    pub memory_permille: u32,
    /// Network throughput (receive + transmit), per mille of `network_mbps`.
    pub network_permille: u32,
    /// Capacity of the measured interfaces, Mbit/s (0: unknown).
    pub network_mbps: u64,
}

/// An image: a content-addressed OCI image stored by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// Metadata; images are cluster-wide, so the project is empty.
    #[serde(flatten)]
    pub meta: Meta,
    /// `sha256:...` digest of the image manifest (or of the config for docker-save images).
    pub digest: String,
    /// Layer digests, bottom first (`sha256:...` of the uncompressed or compressed blob as stored).
    pub layers: Vec<String>,
    /// Total size of the layers in bytes.
    pub size_bytes: u64,
    /// Default command from the image config (`Entrypoint` + `Cmd`).
    #[serde(default)]
    pub default_command: Vec<String>,
    /// Default environment from the image config.
    #[serde(default)]
    pub default_env: Vec<String>,
    /// Default working directory.
    #[serde(default)]
    pub working_dir: String,
}

/// Container or VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum InstanceType {
    /// A runc container.
    #[default]
    Container,
    /// A QEMU virtual machine.
    Vm,
}

impl InstanceType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Container => "container",
            Self::Vm => "vm",
        }
    }
}

/// What to do when an instance's main process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it stopped.
    #[default]
    Never,
    /// Restart when it exits non-zero.
    OnFailure,
    /// Restart whenever it exits.
    Always,
}

/// The state the user wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// Running.
    #[default]
    Running,
    /// Stopped (resources kept).
    Stopped,
    /// Being deleted.
    Deleted,
}

/// Lifecycle state observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Accepted, waiting for placement.
    #[default]
    Pending,
    /// Placed on a node, the node has not picked it up yet.
    Scheduled,
    /// The node is creating or starting it.
    Starting,
    /// The main process is running.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped (by request or after exit with no restart).
    Stopped,
    /// Failed to start, or the node was lost.
    Failed,
    /// Being deleted.
    Deleting,
}

impl InstanceState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Deleting => "deleting",
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceSpec {
    /// Container or VM.
    #[serde(rename = "type")]
    pub instance_type: InstanceType,
    /// Image name.
    pub image: String,
    /// Image digest resolved at creation.
    pub image_digest: String,
    /// Virtual CPUs (may be fractional for containers: 0.5).
    pub cpus: f64,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Root disk size in bytes (VMs; containers: informational).
    pub disk_bytes: u64,
    /// Command to run (empty: image default).
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment `K=V`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Process limit (containers).
    pub pids_limit: u64,
    /// First-boot script and metadata (VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// SSH public keys for the guest (VMs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// Desired state.
    pub desired: DesiredState,
    /// Bumped by each restart request; agents restart the instance when it changes.
    #[serde(default)]
    pub restart_nonce: u64,
    /// Placement constraints (`key=value`, `key!=value`, `key in (a,b)`; `zone` is the zone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// Spread group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_group: Option<String>,
    /// Hard anti-affinity within the spread group.
    #[serde(default)]
    pub anti_affinity: bool,
    /// Priority class name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class: Option<String>,
    /// Resolved priority value.
    #[serde(default)]
    pub priority: i32,
    /// Network (name, in the project).
    #[serde(default = "default_network")]
    pub network: String,
    /// Subnet of the network the address comes from.
    #[serde(default)]
    pub subnet: String,
    /// Security groups (names, in the project).
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// Node ports forwarded to the instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<crate::PublishedPort>,
    /// Secrets delivered to the instance as files or environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::secret::SecretUse>,
    /// Volumes attached to the instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volume::VolumeUse>,
}

fn default_network() -> String {
    crate::DEFAULT_NETWORK.to_string()
}

/// What the platform observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct InstanceStatus {
    /// Lifecycle state.
    pub state: InstanceState,
    /// Node it is placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Private IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Main process PID on the node (container init or QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Exit code of the last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Human-readable reason for the current state (failures, scheduling).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Restarts performed by the restart policy.
    #[serde(default)]
    pub restart_count: u32,
    /// Assignment generation: bumped each time the instance is (re)placed.
    #[serde(default)]
    pub generation: u64,
    /// VM accelerator used (`kvm` or `tcg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// When it last started running, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
}

/// A cloud server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Instance {
    /// Metadata.
    #[serde(flatten)]
    pub meta: Meta,
    /// Desired.
    pub spec: InstanceSpec,
    /// Observed.
    pub status: InstanceStatus,
}

/// A flattened view used by `list -o json`: the fields users script against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceSummary {
    /// Name.
    pub name: String,
    /// Id.
    pub id: String,
    /// Project.
    pub project: String,
    /// `container` or `vm`.
    #[serde(rename = "type")]
    pub instance_type: InstanceType,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Node, if placed.
    pub node: Option<String>,
    /// IPv4 address, if any.
    pub ip: Option<String>,
    /// vCPUs.
    pub cpus: f64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Image name.
    pub image: String,
    /// Resource version.
    pub version: u64,
}

impl Instance {
    /// The summary view.
    pub fn summary(&self) -> InstanceSummary {
        InstanceSummary {
            name: self.meta.name.clone(),
            id: self.meta.id.clone(),
            project: self.meta.project.clone(),
            instance_type: self.spec.instance_type,
            state: self.status.state,
            node: self.status.node.clone(),
            ip: self.status.ip.clone(),
            cpus: self.spec.cpus,
            memory_bytes: self.spec.memory_bytes,
            image: self.spec.image.clone(),
            version: self.meta.version,
        }
    }
}

/// An event: something that happened, in commit order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Monotonic sequence number.
    pub seq: u64,
    /// RFC 3339 time.
    pub time: String,
    /// Project ("" for cluster events).
    pub project: String,
    /// Resource kind (`instance`, `node`, ...).
    pub kind: String,
    /// Resource name.
    pub name: String,
    /// Short reason (`Scheduled`, `Started`, `Exited`, ...).
    pub reason: String,
    /// Detail.
    pub message: String,
}
