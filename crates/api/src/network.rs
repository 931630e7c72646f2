//! Tenant networking resources: networks (VPCs) with subnets, security groups with rules, and
//! published ports; and their request bodies.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Meta;

/// The network every project gets on first use (and the instance default).
pub const DEFAULT_NETWORK: &str = "default";
/// The security group every project gets on first use (and the instance default).
pub const DEFAULT_SECURITY_GROUP: &str = "default";

/// A subnet of a network: instances get their address from one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Subnet {
    /// Name, unique in the network.
    pub name: String,
    /// CIDR inside the network's CIDR.
    pub cidr: String,
    /// Gateway address (the first host); every node hosting the network carries it.
    pub gateway: String,
}

/// A project's private network (VPC), spanning all nodes over VXLAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    /// Metadata.
    #[serde(flatten)]
    pub meta: Meta,
    /// The network's CIDR; its subnets lie inside it.
    pub cidr: String,
    /// VXLAN network identifier (unique in the cluster).
    pub vni: u32,
    /// Subnets.
    pub subnets: Vec<Subnet>,
}

/// Transport protocol of a rule or a published port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (no ports).
    Icmp,
    /// Every protocol (no ports).
    All,
}

impl Protocol {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::All => "all",
        }
    }

    /// Whether rules of this protocol carry a port range.
    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp)
    }
}

/// Which traffic a rule admits.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic into members of the group.
    Ingress,
    /// Traffic out of members of the group.
    Egress,
}

impl Direction {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// One allow rule of a security group (everything not allowed is dropped; replies to allowed
/// traffic are always allowed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroupRule {
    /// Rule id (unique in the group).
    pub id: String,
    /// Ingress or egress.
    pub direction: Direction,
    /// Protocol.
    pub protocol: Protocol,
    /// First port (tcp/udp; 0 for the others).
    pub port_min: u16,
    /// Last port (tcp/udp; 0 for the others).
    pub port_max: u16,
    /// Peer network: the source for ingress, the destination for egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Peer security group (same project): its members' addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

impl SecurityGroupRule {
    /// `tcp 80-90`, `udp 53`, `icmp`, `all`.
    pub fn ports_text(&self) -> String {
        if !self.protocol.has_ports() {
            return self.protocol.as_str().to_string();
        }
        if self.port_min == self.port_max {
            format!("{} {}", self.protocol.as_str(), self.port_min)
        } else {
            format!(
                "{} {}-{}",
                self.protocol.as_str(),
                self.port_min,
                self.port_max
            )
        }
    }

    /// `10.0.0.0/8` or `group web`.
    pub fn peer_text(&self) -> String {
        match (&self.cidr, &self.group) {
            (Some(c), _) => c.clone(),
            (None, Some(g)) => format!("group {g}"),
            (None, None) => "-".into(),
        }
    }
}

/// A stateful firewall attached to instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecurityGroup {
    /// Metadata.
    #[serde(flatten)]
    pub meta: Meta,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Allow rules.
    pub rules: Vec<SecurityGroupRule>,
}

/// A node port forwarded to an instance port (DNAT on the instance's node).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
pub struct PublishedPort {
    /// Port on the node.
    pub host_port: u16,
    /// Port on the instance.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
}

impl std::fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port,
            self.port,
            self.protocol.as_str()
        )
    }
}

/// `POST /v1/projects/{project}/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateNetworkRequest {
    /// Name (DNS label, unique in the project).
    pub name: String,
    /// CIDR (default: the next free /24 of the cluster's network pool).
    #[serde(default)]
    pub cidr: Option<String>,
    /// Subnets (default: one subnet `default` covering the whole CIDR).
    #[serde(default)]
    pub subnets: Vec<SubnetRequest>,
}

/// A subnet in a [`CreateNetworkRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubnetRequest {
    /// Name (DNS label, unique in the network).
    pub name: String,
    /// CIDR inside the network's CIDR.
    pub cidr: String,
}

/// `POST /v1/projects/{project}/security-groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateSecurityGroupRequest {
    /// Name (DNS label, unique in the project).
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// `POST /v1/projects/{project}/security-groups/{name}/rules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct AddRuleRequest {
    /// `ingress` (default) or `egress`.
    #[serde(default)]
    pub direction: Option<String>,
    /// `tcp`, `udp`, `icmp` or `all`.
    pub protocol: String,
    /// Port or range for tcp/udp: `80`, `8000-8100` (default: all ports).
    #[serde(default)]
    pub ports: Option<String>,
    /// Peer CIDR (source of ingress, destination of egress); give this or `group`.
    #[serde(default)]
    pub cidr: Option<String>,
    /// Peer security group of the same project; give this or `cidr`.
    #[serde(default)]
    pub group: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// Traffic counters of one instance interface, as the instance sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct InterfaceCounters {
    /// Instance id.
    pub instance: String,
    /// Host-side interface (veth or tap).
    pub interface: String,
    /// Bytes the instance received.
    pub rx_bytes: u64,
    /// Bytes the instance sent.
    pub tx_bytes: u64,
    /// Packets the instance received.
    pub rx_packets: u64,
    /// Packets the instance sent.
    pub tx_packets: u64,
}

/// Name of a network's bridge on a node: `<prefix>b<vni>` (at most 15 characters for a
/// prefix of at most 6).
pub fn bridge_name(prefix: &str, vni: u32) -> String {
    format!("{prefix}b{vni}")
}

/// Name of a network's VXLAN device on a node: `<prefix>v<vni>`.
pub fn vxlan_name(prefix: &str, vni: u32) -> String {
    format!("{prefix}v{vni}")
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The MAC address of an instance, derived from its id (locally administered, unicast,
/// first octet `0a`), so every node computes the same one for its FDB entries.
pub fn instance_mac(id: &str) -> String {
    let b = fnv1a(id).to_be_bytes();
    format!(
        "0a:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

/// The MAC address of a network's bridge (its gateway), the same on every node:
/// `02:6e:62` + the VNI.
pub fn gateway_mac(vni: u32) -> String {
    let b = vni.to_be_bytes();
    format!("02:6e:62:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_macs() {
        assert_eq!(bridge_name("nimbus", 16_777_215), "nimbusb16777215");
        assert!(bridge_name("nimbus", 16_777_215).len() <= 15);
        assert_eq!(vxlan_name("nbt3", 100), "nbt3v100");
        let m = instance_mac("0f3c9e2a-1b2c-4d5e-8f90-123456789abc");
        assert_eq!(m.len(), 17);
        assert!(m.starts_with("0a:"));
        assert_eq!(m, instance_mac("0f3c9e2a-1b2c-4d5e-8f90-123456789abc"));
        assert_ne!(m, instance_mac("0f3c9e2a-1b2c-4d5e-8f90-123456789abd"));
        assert_eq!(gateway_mac(0x0001_0203), "02:6e:62:01:02:03");
    }
}
