//! nimbus node networking: Linux bridges, veth pairs and container network namespaces, all
//! driven over netlink (rtnetlink); nothing shells out to `ip`.
//!
//! - [`Netlink`]: a netlink connection in the agent's own network namespace (bridges, links,
//!   counters).
//! - [`create_container_netns`] / [`delete_container_netns`]: a named network namespace per
//!   container (bind-mounted at `/run/netns/nimbus-<shortid>`, so it survives the agent and
//!   the container), joined to a bridge through a veth pair.
//!
//! # Tenant networks
//!
//! - **Model.** `Network { cidr, vni, subnets[{name, cidr, gateway}] }` and `SecurityGroup { rules }`
//!   are project-scoped resources in the replicated state, keyed `project/name`. A project's
//!   `default` network (the next free /24 of the cluster pool, `--network-pool`, default
//!   10.213.0.0/16) and `default` group are created by its first instance that uses them, so a plain
//!   `nimbus launch` works unchanged (eager creation would spend address space on every project).
//!   CIDRs are unique in the whole cluster, not only per project: every node routes to the
//!   networks it hosts through their gateways, so two tenants' equal CIDRs would collide in the
//!   host's routing table (a VRF per network would lift this; not built). Refused with a field:
//!   overlaps (409), a network smaller than /28 or a subnet smaller than /29, a subnet outside its
//!   network, overlapping subnets, bad rule ports/protocols, a rule naming a missing group (422),
//!   deleting a network with instances or a group in use (409); refused commands change nothing
//!   (unit tests compare the whole state).
//! - **IPAM** is a map per network (`address -> instance id`) in the state machine: an address is
//!   picked (lowest free of the subnet) when `CreateInstance` is applied and freed when the
//!   instance leaves the state, so it is never handed out twice and survives restarts and
//!   snapshots. The address stays with the instance when it is drained or fails over. MACs are
//!   derived from the instance id (`0a:` + FNV hash), so every node can program FDB entries
//!   without asking.
//! - **Security groups.** A new group has two rules: all ingress from its own members, all egress.
//!   Rules allow by direction, protocol (`tcp|udp|icmp|all`), port range, and peer CIDR or peer
//!   group (same project). Stateful: replies are always allowed.
//! - **Published ports** (`--publish 8080:80[/udp]`): a host port is published once per node; the
//!   scheduler skips nodes where it is taken and the create is refused with 409 (`publish`) if no
//!   node is left. Whether a host process already listens on the port is not checked.
//! - **Agent protocol.** `GET /v1/nodes/N/assignments?after=&net_after=&delta=true` long-polls
//!   both the node's assignments and its network-map revision, which moves only when its map can
//!   have changed (`crates/state/src/index.rs`). The answer carries the node's `NetworkMap` (the
//!   networks with instances on the node: subnets, VNI, the remote instances' IP/MAC and their
//!   node's underlay address; the groups of its instances and of their rules, with members'
//!   addresses; its instances' ports; its peers' underlay addresses), or, when the server sent
//!   the map at `net_after`, the delta from it (`nimbus_api::netmap_delta`).
//! - **Datapath per node** (converged by the agent's net loop at each new map and every 10 s, which
//!   also repairs what was changed behind its back; planners are pure and unit-tested, the
//!   executor applies only the differences, so re-applying a map is a no-op):
//!   - a bridge `<prefix>b<vni>` per network hosted on the node, with every subnet's gateway
//!     address, a fixed MAC (`02:6e:62` + VNI, the same on every node) and `nf_call_iptables` on
//!     (bridged IPv4 then passes the `inet` hooks, where the groups are enforced);
//!   - when the network has instances on other nodes, a VXLAN device `<prefix>v<vni>` (local =
//!     the node's underlay address, UDP 4789, no learning, ARP proxy) on the bridge, with one
//!     unicast FDB entry and one permanent neighbour entry per remote instance: no multicast, no
//!     flooding, ARP answered locally;
//!   - nftables table `inet <prefix>`: interval/concatenated sets keyed by the local instance's
//!     address (`in_any`, `in_icmp`, `in_ports`, `out_*`) hold the compiled rules (group peers
//!     expanded to members' /32s; nested CIDRs and overlapping port ranges reduced to a disjoint
//!     cover because nftables refuses overlapping elements); forwarding between two different
//!     network bridges is dropped (isolation), except DNAT'd traffic; `masquerade` for traffic from
//!     a hosted network leaving through a non-network interface; DNAT of published ports
//!     (`fib daddr type local`, prerouting and output) with hairpin masquerade; table
//!     `bridge <prefix>`: instance ports may send only from their own address (IPv4 and ARP) and no
//!     IPv6; VXLAN packets from and to other nodes' underlay addresses are not connection-tracked
//!     (`notrack` at raw priority in prerouting and output: the instances' connections inside them
//!     are tracked on the bridge, and tracking the outer UDP flow as well only cost two lookups per
//!     packet on each node). Rule changes only add and delete set elements; a table missing or with another layout
//!     is replaced whole in one atomic transaction; a node without instances has no tables.
//!   - Host traffic to instances (the host's own stack, e.g. `curl` to a container IP) is not
//!     filtered by the groups (it does not pass the forward hook), and neither is traffic from
//!     another node's underlay address (`nodes4`): the node's own traffic to an instance on another
//!     node is SNATed to its underlay address (`host_snat`, keyed by the remote instance), so the
//!     reply comes back to it and not to the remote node's copy of the gateway. Published ports
//!     bypass the ingress rules (the user asked for them).
//!   - Agents sharing one network namespace (tests) use distinct tables (`--nft-table`) and share
//!     bridges; a bridge that still has instance ports is never removed.
//! - **Counters.** Every 10 s, when they changed, the agent reports each instance's interface
//!   counters (from the host side of its veth/tap, turned into the instance's view); they are
//!   telemetry in the leader's memory, shown on the node resource (`interfaces`, `counters_at`).
//!
//! # Known gaps
//!
//! - network CIDRs are unique in the cluster (no overlapping tenants; a VRF per
//!   network would allow it); the node's own traffic to instances and published ports bypass the
//!   groups' ingress rules; a new instance may pass traffic unfiltered until its node has programmed
//!   the map that lists it (the map is usually in place before the container starts); IPv6 is
//!   dropped on instance ports (groups are IPv4 only); whether a host process already listens on a
//!   published port is not checked; a node's own stack reaches only the networks it hosts (it
//!   has no route to a network without instances on it); the underlay MTU is
//!   assumed to be 1500 (instances get 1450). Cross-host TCP over VXLAN stays below the 0.8x target
//!   against a plain veth pair in the netns harness (see docs/benchmarks.md "Tenant networks":
//!   every data packet and every ACK crosses two bridges with br_netfilter, the VXLAN encap and
//!   decap, the underlay bridge and four veth hops on the same two CPUs, where the baseline
//!   crosses one veth). `scripts/bench-net` measures each transfer's CPU cost too (CPU-seconds
//!   per GB: `/proc/stat` busy time minus other processes', per CPU, with the load), and paths
//!   with receive steered (RPS) so each CPU does one host's share: the VXLAN path costs 1.5-2x
//!   the veth pair's CPU per byte (1.6x on a quiet machine; 1.4x under heavy load, which
//!   slows the baseline more), throughput ratio x CPU-per-byte ratio stays within 0.86-1.14
//!   round by round (the harness is CPU-bound, so 0.8x would need at most 1.25x), and the
//!   sending host's share alone is 1.2-2x the baseline's busiest CPU per byte, so splitting the
//!   work over two machines gives an estimated 0.5-0.8x (0.81x on the quiet machine and 0.67x in a
//!   loaded run, both with the underlay bridge's netfilter off), not clearly above the target (an estimate;
//!   not measured on two machines). `NET_VARIANTS=1` adds attribution-only paths: with the
//!   bridges' netfilter off on both hosts (no security groups) VXLAN still costs about 1.2-1.5x
//!   the veth pair per byte (the path's structure), and the stateful groups (br_netfilter plus
//!   conntrack on both hosts) take another 15-35% of throughput. On this kernel stateful groups
//!   on bridged traffic need br_netfilter (no bridge-family conntrack, flowtables or tc ct
//!   actions); the remaining way to the target here would be an eBPF datapath that bypasses the
//!   bridges (not built).

pub mod dataplane;
mod link;
mod netns;
pub mod nft;
pub mod plan;
pub mod sg;
pub mod vip;

use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use link::{IfCounters, Netlink};
pub use netns::{
    create_container_netns, delete_container_netns, ensure_container_netns, in_netns, netns_path,
    NETNS_DIR,
};

/// Networking failures.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A netlink request failed; carries what the kernel said.
    #[error("netlink {op} failed: {source}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The kernel's answer.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Local I/O (opening the netlink socket, namespace files).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed (unshare, setns, mount).
    #[error("{context}: {source}")]
    Sys {
        /// What was being done.
        context: String,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// Invalid input (addresses, MAC, names).
    #[error("invalid {what}: {value:?}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// The offending value.
        value: String,
    },
    /// A link that must exist does not.
    #[error("link {0} does not exist")]
    NoSuchLink(String),
    /// `nft` refused a command; carries what it said.
    #[error("nft: {0}")]
    Nft(String),
}

impl NetError {
    pub(crate) fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let op = op.into();
        move |source| Self::Netlink {
            op,
            source: Box::new(source),
        }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    pub(crate) fn sys(context: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> Self {
        let context = context.into();
        move |source| Self::Sys { context, source }
    }
}

/// Maximum length of a Linux interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// The key naming instance `id`'s machine-wide network objects (namespace, host interface)
/// for an agent with runtime scope `scope`: the id itself without a scope, else a hash of
/// `scope/id`, so two agents holding the same instance id (an instance that moved between
/// them, or test agents sharing one machine) never touch each other's objects.
pub fn scoped_key(scope: Option<&str>, id: &str) -> String {
    match scope {
        None => id.to_owned(),
        Some(scope) => {
            use sha2::Digest as _;
            let h = sha2::Sha256::digest(format!("{scope}/{id}").as_bytes());
            hex::encode(&h[..16])
        }
    }
}

/// The first 12 hex characters of an instance id with dashes (and anything that is not an
/// ASCII alphanumeric) removed, lowercased. Used for interface and namespace names.
pub fn short_id(instance_id: &str) -> String {
    instance_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(12)
        .collect()
}

/// Host-side interface name of an instance: `prefix` + [`short_id`], truncated to 15 chars
/// (e.g. `("nv", "0f3c9e2a-1b2c-...")` -> `nv0f3c9e2a1b2c`).
pub fn host_ifname(prefix: &str, instance_id: &str) -> String {
    let mut name = format!("{prefix}{}", short_id(instance_id));
    name.truncate(IFNAME_MAX);
    name
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], NetError> {
    let invalid = || NetError::Invalid {
        what: "mac",
        value: mac.to_string(),
    };
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        let part = parts.next().ok_or_else(invalid)?;
        if part.len() != 2 {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if parts.next().is_some() {
        return Err(invalid());
    }
    Ok(out)
}

/// Parses an IPv4 address field.
pub fn parse_ipv4(what: &'static str, value: &str) -> Result<Ipv4Addr, NetError> {
    value.parse().map_err(|_| NetError::Invalid {
        what,
        value: value.to_string(),
    })
}

/// Validates an interface name (1..=15 chars, no `/`, whitespace or `:`).
pub fn check_ifname(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(NetError::Invalid {
            what: "interface name",
            value: name.to_string(),
        })
    }
}

/// Directory of the named network namespaces (`/run/netns`, as iproute2 uses).
pub fn netns_dir() -> PathBuf {
    PathBuf::from(NETNS_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifname_is_short_and_stable() {
        let id = "0f3c9e2a-1b2c-4d5e-8f90-123456789abc";
        assert_eq!(host_ifname("nv", id), "nv0f3c9e2a1b2c");
        assert!(host_ifname("nimbusveth", id).len() <= IFNAME_MAX);
        assert_eq!(host_ifname("nv", "AB-cd"), "nvabcd");
        check_ifname(&host_ifname("nv", id)).unwrap();
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02").unwrap(),
            [0x02, 0x42, 0xac, 0x11, 0x00, 0x02]
        );
        assert!(parse_mac("02:42:ac:11:00").is_err());
        assert!(parse_mac("02:42:ac:11:00:02:03").is_err());
        assert!(parse_mac("zz:42:ac:11:00:02").is_err());
        assert!(parse_mac("2:42:ac:11:00:02").is_err());
    }

    #[test]
    fn ifname_validation() {
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("sixteen_chars_xx").is_err());
        check_ifname("nimbus0").unwrap();
    }

    #[test]
    fn netns_path_uses_short_id() {
        let p = netns_path("0f3c9e2a-1b2c-4d5e-8f90-123456789abc");
        assert_eq!(p, PathBuf::from("/run/netns/nimbus-0f3c9e2a1b2c"));
    }
}
