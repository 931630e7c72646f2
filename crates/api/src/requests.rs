//! Request bodies. Every body rejects unknown fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{InstanceType, RestartPolicy};

/// `POST /v1/projects`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectRequest {
    /// Name (DNS label).
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
}

/// `POST /v1/projects/{project}/instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateInstanceRequest {
    /// Name (DNS label, unique in the project).
    pub name: String,
    /// Image name or digest.
    pub image: String,
    /// `container` (default) or `vm`.
    #[serde(default, rename = "type")]
    pub instance_type: InstanceType,
    /// vCPUs, reserved on the node and the container's CPU limit. A container without it
    /// reserves no CPU and has no CPU limit (best effort: placed by measured use); a VM gets 1.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory: bytes as a number or a size string (`512M`, `1G`), reserved on the node and the
    /// container's memory limit. A container without it reserves none and has no limit beyond
    /// the node's (best effort); a VM gets 512M.
    #[serde(default)]
    pub memory: Option<serde_json::Value>,
    /// Disk: like memory. Default 1G (VMs: 2G).
    #[serde(default)]
    pub disk: Option<serde_json::Value>,
    /// Command (empty: image default).
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Restart policy (default `never`).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Process limit (default 1024).
    #[serde(default)]
    pub pids_limit: Option<u64>,
    /// VM user-data (first-boot script), at most 64 KiB.
    #[serde(default)]
    pub user_data: Option<String>,
    /// SSH public keys (VMs).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Create it stopped.
    #[serde(default)]
    pub start: Option<bool>,
    /// Placement constraints on node labels or zone: `disk=ssd`, `tier!=batch`, `zone in (a,b)`.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// Spread group: members go to the zone, then the node, with the fewest members.
    #[serde(default)]
    pub spread_group: Option<String>,
    /// With a spread group: never two members on one node.
    #[serde(default)]
    pub anti_affinity: bool,
    /// Priority class (`critical`, `high`, `normal`, `low`); default `normal`.
    #[serde(default)]
    pub priority_class: Option<String>,
    /// Network (default `default`, created on first use).
    #[serde(default)]
    pub network: Option<String>,
    /// Subnet of the network (default: its first subnet).
    #[serde(default)]
    pub subnet: Option<String>,
    /// Security groups (default `["default"]`, created on first use).
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// Node ports to forward to the instance: `HOSTPORT:PORT[/tcp|udp]`.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Secrets of the project to deliver: each as a read-only file (`path`) or an environment
    /// variable (`env`), for containers and VMs.
    #[serde(default)]
    pub secrets: Vec<crate::secret::SecretUse>,
    /// Volumes of the project to attach (refused until volumes have a data path).
    #[serde(default)]
    pub volumes: Vec<crate::volume::VolumeUse>,
}

/// A validated create: everything `apply` needs to make the instance (it resolves the image,
/// places it and gives it an address). Made by [`crate::validate::create_instance`] only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceDraft {
    /// Name.
    pub name: String,
    /// Project.
    pub project: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The spec: defaults filled in, priority resolved; `image` names the image (a name or a
    /// digest) and `image_digest` is empty until `apply` resolves it.
    pub spec: crate::InstanceSpec,
}

impl From<crate::Instance> for InstanceDraft {
    fn from(i: crate::Instance) -> Self {
        Self {
            name: i.meta.name,
            project: i.meta.project,
            labels: i.meta.labels,
            spec: i.spec,
        }
    }
}

/// `POST /v1/projects/{project}/instances/{name}/{action}` body (optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionRequest {
    /// Expected resource version (optimistic concurrency).
    #[serde(default)]
    pub version: Option<u64>,
}

/// `POST /v1/projects/{project}/instances/{name}/exec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Command and arguments.
    pub command: Vec<String>,
    /// Timeout in seconds (default 60).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Result of an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    /// Exit code of the command.
    pub exit_code: i32,
    /// Captured standard output (UTF-8, lossy).
    pub stdout: String,
    /// Captured standard error (UTF-8, lossy).
    pub stderr: String,
    /// Whether standard output or standard error was cut at the capture limit (4 MiB per
    /// stream for containers): what the command printed beyond it is lost.
    #[serde(default)]
    pub truncated: bool,
}

/// `PATCH /v1/nodes/{name}`: operator actions on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateNodeRequest {
    /// Cordon (true) or uncordon (false).
    #[serde(default)]
    pub cordoned: Option<bool>,
    /// Expected version.
    #[serde(default)]
    pub version: Option<u64>,
}

/// Health answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// Server version.
    pub version: String,
    /// Current Raft leader id, if known.
    pub leader: Option<u64>,
}
