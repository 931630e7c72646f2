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
    /// The node's underlay address (VXLAN tunnel endpoint); empty: not networked.
    #[serde(default)]
    pub underlay_ip: String,
}

/// The answer to `POST /v1/nodes`: the node, and the credentials of its agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisteredNode {
    /// The node.
    #[serde(flatten)]
    pub node: crate::Node,
    /// The node's own credential, issued at its first registration and shown only then: the
    /// agent keeps it (0600) and uses it for every later call instead of the node token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The bearer token the servers present to this node's agent API (exec, logs, console,
    /// metrics); the agent accepts no other server credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_api_token: Option<String>,
    /// SHA-256 (hex) of the cluster's metrics token: the agent's `/metrics` also answers a
    /// bearer token with this hash (a Prometheus scraping without a server certificate); the
    /// token opens nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token_sha256: Option<String>,
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
    /// MTU of the instance's interface (0: leave the default).
    #[serde(default)]
    pub mtu: u32,
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
    /// What the node's datapath must look like (networks, tunnels, security groups, NAT):
    /// the whole map, when asked for (`net_after`) and no delta is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkMap>,
    /// The changes since the map the agent holds (`net_after` and `delta=true`), instead of
    /// the whole map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_delta: Option<crate::netmap_delta::NetworkMapDelta>,
    /// The server certificates the node's API must refuse (its servers' whole list; a
    /// revocation wakes every node's poll).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_servers: Option<crate::pki::ServerRevocations>,
}

/// The datapath a node must converge to: the networks with instances on it, the remote
/// endpoints of those networks, the security groups that apply, and its instances' ports.
/// Built by the control plane from the replicated state; agents long-poll it with
/// `net_after=` the revision they hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct NetworkMap {
    /// State revision at which this node's map last changed.
    pub revision: u64,
    /// Name prefix of the node's datapath objects; also the nftables table (`inet <prefix>`).
    pub prefix: String,
    /// MTU of instance interfaces (underlay MTU minus the VXLAN overhead).
    pub mtu: u32,
    /// UDP port of the VXLAN tunnels.
    pub vxlan_port: u16,
    /// This node's underlay address.
    pub underlay_ip: String,
    /// Networks with at least one instance on this node.
    pub networks: Vec<NetworkPlan>,
    /// Security groups of this node's instances and the groups their rules name.
    pub security_groups: Vec<GroupPlan>,
    /// This node's instances.
    pub instances: Vec<InstancePlan>,
    /// The underlay addresses of the peers: the other nodes hosting instances of this node's
    /// networks (their own traffic, like this node's, is not subject to the security groups).
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// One network as a node's datapath needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkPlan {
    /// Network id.
    pub id: String,
    /// Project.
    pub project: String,
    /// Name.
    pub name: String,
    /// VXLAN id.
    pub vni: u32,
    /// The network's CIDR.
    pub cidr: String,
    /// Subnets: (CIDR, gateway) pairs the node's bridge serves.
    pub subnets: Vec<SubnetPlan>,
    /// Instances of this network on other nodes (unicast FDB and neighbour entries).
    pub remote: Vec<RemoteEndpoint>,
}

/// A subnet's gateway on the node's bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubnetPlan {
    /// CIDR.
    pub cidr: String,
    /// Gateway address.
    pub gateway: String,
}

/// An instance on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RemoteEndpoint {
    /// Private address.
    pub ip: String,
    /// MAC address.
    pub mac: String,
    /// The underlay address of its node.
    pub underlay_ip: String,
}

/// A security group as a node needs it: its rules and its members' addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GroupPlan {
    /// `project/name`: how instances and rules refer to it here.
    pub key: String,
    /// Rules (a rule's `group` is the peer's `project/name` key).
    pub rules: Vec<crate::SecurityGroupRule>,
    /// Private addresses of every member, cluster-wide.
    pub members: Vec<String>,
}

/// One of the node's instances as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstancePlan {
    /// Instance id.
    pub id: String,
    /// Container or VM (decides the host interface name).
    #[serde(rename = "type")]
    pub instance_type: crate::InstanceType,
    /// Network id.
    pub network: String,
    /// Private address.
    pub ip: String,
    /// MAC address.
    pub mac: String,
    /// Security group keys (`project/name`).
    pub groups: Vec<String>,
    /// Published ports.
    pub publish: Vec<crate::PublishedPort>,
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
    /// Traffic counters of the instances' interfaces (sent periodically).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<crate::InterfaceCounters>,
}

/// The label that marks the nodes of one fleet of hollow nodes (`nimbus agent --hollow`),
/// which talk to the control plane through the `/v1/fleet/...` routes: one connection and a
/// few requests for all of them instead of a long-poll per node.
pub const FLEET_LABEL: &str = "nimbus.fleet";

/// `POST /v1/fleet/register`: registers (or re-registers) many nodes at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct FleetRegisterRequest {
    /// The nodes (at most 10,000 per request; mind the 1 MiB body limit).
    pub nodes: Vec<RegisterNodeRequest>,
}

/// The answer to a fleet registration: the nodes that were refused, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct FleetRegisterResponse {
    /// Node name -> the error that refused it.
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, crate::ApiError>,
}

/// `POST /v1/fleet/heartbeats`: renews the leases of many nodes (they measure nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct FleetHeartbeatRequest {
    /// Node names.
    pub nodes: Vec<String>,
}

/// `GET /v1/fleet/{fleet}/watch?since=REV`: the assignments (without network maps) of the
/// fleet's nodes whose assignments changed after revision `since` (all of them for 0); blocks
/// until one did or the wait ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct FleetWatchResponse {
    /// The state revision the answer reflects; pass it as `since` next time.
    pub revision: u64,
    /// Node name -> its assignments.
    pub nodes: std::collections::BTreeMap<String, AssignmentsResponse>,
}

/// `POST /v1/fleet/status`: status reports of many nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct FleetStatusRequest {
    /// Node name -> reports of its instances whose observed state changed.
    pub nodes: std::collections::BTreeMap<String, Vec<InstanceReport>>,
}
