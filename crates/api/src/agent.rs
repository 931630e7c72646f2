//! The protocol between the control plane and node agents.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Capacity, DesiredState, InstanceSpec, InstanceState, NodeCapabilities};

/// `POST /v1/nodes`: an agent registers (or re-registers) itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterNodeRequest {
    /// Node name (DNS label), stable across restarts.
    pub name: String,
    /// URL of the agent's own API.
    pub agent_url: String,
    /// Capacity.
    pub capacity: Capacity,
    /// Capabilities.
    pub capabilities: NodeCapabilities,
    /// Zone.
    #[serde(default)]
    pub zone: String,
    /// Labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Agent version.
    #[serde(default)]
    pub agent_version: String,
}

/// `POST /v1/nodes/{name}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// Whether the fields below carry a measurement (an agent that measures nothing sends
    /// `false` and the node keeps its last measurement).
    #[serde(default)]
    pub measured: bool,
    /// Measured CPU utilisation 0..1.
    #[serde(default)]
    pub cpu_utilisation: f64,
    /// Used memory bytes.
    #[serde(default)]
    pub memory_used_bytes: u64,
    /// Measured network utilisation 0..1 of `network_mbps`.
    #[serde(default)]
    pub network_utilisation: f64,
    /// Capacity of the measured interfaces, Mbit/s (0: unknown).
    #[serde(default)]
    pub network_mbps: u64,
}

/// Network settings for one instance's interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkAttachment {
    /// Bridge to attach to.
    pub bridge: String,
    /// IPv4 address.
    pub ip: String,
    /// Prefix length of the subnet.
    pub prefix_len: u8,
    /// Gateway (the bridge's address).
    pub gateway: String,
    /// MAC address.
    pub mac: String,
}

/// The image as an agent needs it to build a rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageRef {
    /// Image name.
    pub name: String,
    /// Digest.
    pub digest: String,
    /// Layer blob digests, bottom first.
    pub layers: Vec<String>,
    /// Default command.
    pub default_command: Vec<String>,
    /// Default env `K=V`.
    pub default_env: Vec<String>,
    /// Working dir.
    pub working_dir: String,
}

/// One instance assigned to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    /// Instance id (the runtime id on the node).
    pub id: String,
    /// Instance name.
    pub name: String,
    /// Project.
    pub project: String,
    /// Placement generation; the agent reports it back and refuses stale ones.
    pub generation: u64,
    /// Desired state.
    pub desired: DesiredState,
    /// Restart requests bump this; the agent restarts when it changes.
    pub restart_nonce: u64,
    /// The spec.
    pub spec: InstanceSpec,
    /// The image.
    pub image: ImageRef,
    /// Network.
    pub network: NetworkAttachment,
}

/// `GET /v1/nodes/{name}/assignments?after=REV&wait=SECS`: long-poll answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AssignmentsResponse {
    /// State revision these assignments reflect; pass it as `after` next time.
    pub revision: u64,
    /// Every instance assigned to the node (including ones to stop or delete).
    pub assignments: Vec<Assignment>,
    /// Load balancers the node serves, with backends resolved to instance IPs.
    #[serde(default)]
    pub loadbalancers: Vec<LbAssignment>,
}

/// A backend instance resolved to its address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LbResolvedBackend {
    /// Instance name.
    pub instance: String,
    /// Instance IPv4 address.
    pub ip: String,
    /// Weight.
    pub weight: u32,
}

/// A load balancer a node serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LbAssignment {
    /// LB id.
    pub id: String,
    /// Project.
    pub project: String,
    /// Name.
    pub name: String,
    /// Resource version.
    pub version: u64,
    /// The spec.
    pub spec: crate::lb::LoadBalancerSpec,
    /// Default backends, running instances only.
    pub backends: Vec<LbResolvedBackend>,
    /// Backends of each route, in route order.
    pub route_backends: Vec<Vec<LbResolvedBackend>>,
}

/// `POST /v1/nodes/{name}/lb-health`: backend health per LB id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct LbHealthReport {
    /// LB id -> its backends' health on this node.
    pub loadbalancers: std::collections::BTreeMap<String, Vec<crate::lb::LbBackendHealth>>,
}

/// The observed state of one instance on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceReport {
    /// Instance id.
    pub id: String,
    /// Generation of the assignment this report is about.
    pub generation: u64,
    /// Observed state.
    pub state: InstanceState,
    /// Main PID.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Exit code of the last run.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Reason.
    #[serde(default)]
    pub message: String,
    /// Restarts by policy.
    #[serde(default)]
    pub restart_count: u32,
    /// VM accelerator.
    #[serde(default)]
    pub accelerator: Option<String>,
    /// The instance is fully removed from the node (after a delete).
    #[serde(default)]
    pub deleted: bool,
}

/// `POST /v1/nodes/{name}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    /// Instances whose observed state changed (or all, on a full resync).
    pub instances: Vec<InstanceReport>,
}
