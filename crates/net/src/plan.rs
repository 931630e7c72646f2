//! The node's L2/L3 datapath, planned purely: from the network map, the bridges (with the
//! subnets' gateway addresses and a fixed MAC), the VXLAN devices (unicast only: no learning,
//! ARP answered from the neighbour table) and their FDB and neighbour entries; compared with
//! what the kernel has, the list of netlink operations that converges it. Re-planning after
//! applying yields nothing (idempotence).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use nimbus_api::agent::NetworkMap;
use nimbus_api::cidr::Cidr;
use nimbus_api::{bridge_name, gateway_mac, vxlan_name};

use crate::parse_mac;

/// A unicast FDB entry on a VXLAN device: frames for `mac` go to `dst`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    /// VXLAN device.
    pub dev: String,
    /// Instance MAC.
    pub mac: [u8; 6],
    /// Remote underlay address.
    pub dst: Ipv4Addr,
}

/// A permanent neighbour entry on a VXLAN device (answers ARP for a remote instance).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neigh {
    /// VXLAN device.
    pub dev: String,
    /// Instance address.
    pub ip: Ipv4Addr,
    /// Instance MAC.
    pub mac: [u8; 6],
}

/// A bridge as wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeWant {
    /// Fixed MAC (the same on every node, so instances keep their gateway's ARP entry).
    pub mac: [u8; 6],
    /// Gateway addresses with their prefix lengths.
    pub addrs: BTreeSet<(Ipv4Addr, u8)>,
}

/// A VXLAN device as wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanWant {
    /// VNI.
    pub vni: u32,
    /// The bridge it is a port of.
    pub bridge: String,
    /// Local underlay address.
    pub local: Ipv4Addr,
    /// UDP port.
    pub port: u16,
}

/// The wanted L2/L3 datapath.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Want {
    /// Bridges by name.
    pub bridges: BTreeMap<String, BridgeWant>,
    /// VXLAN devices by name.
    pub vxlans: BTreeMap<String, VxlanWant>,
    /// FDB entries.
    pub fdb: BTreeSet<Fdb>,
    /// Neighbour entries.
    pub neigh: BTreeSet<Neigh>,
}

/// What a link is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A bridge.
    Bridge {
        /// `nf_call_iptables` (bridged IPv4 passes the inet hooks, where security groups are).
        nf_call_iptables: bool,
    },
    /// A VXLAN device.
    Vxlan {
        /// VNI.
        vni: u32,
        /// Local address.
        local: Option<Ipv4Addr>,
        /// UDP port.
        port: u16,
        /// Learning.
        learning: bool,
        /// ARP proxy.
        proxy: bool,
    },
    /// Anything else.
    Other,
}

/// A link as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// Name.
    pub name: String,
    /// Index.
    pub index: u32,
    /// Kind.
    pub kind: Kind,
    /// Index of its master (bridge), if enslaved.
    pub master: Option<u32>,
    /// MAC.
    pub mac: Vec<u8>,
    /// Administratively up.
    pub up: bool,
}

/// The kernel's datapath as far as the plan is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    /// Every link.
    pub links: Vec<LinkState>,
    /// IPv4 addresses per link name.
    pub addrs: BTreeMap<String, BTreeSet<(Ipv4Addr, u8)>>,
    /// Unicast FDB entries with a destination on VXLAN devices we own.
    pub fdb: BTreeSet<Fdb>,
    /// Permanent neighbour entries on VXLAN devices we own.
    pub neigh: BTreeSet<Neigh>,
}

/// One netlink operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a bridge.
    CreateBridge {
        /// Name.
        name: String,
    },
    /// Set a bridge's MAC, `nf_call_iptables` on, and bring it up.
    ConfigureBridge {
        /// Name.
        name: String,
        /// MAC.
        mac: [u8; 6],
    },
    /// Add an address.
    AddAddr {
        /// Link.
        link: String,
        /// Address.
        addr: Ipv4Addr,
        /// Prefix length.
        len: u8,
    },
    /// Remove an address.
    DelAddr {
        /// Link.
        link: String,
        /// Address.
        addr: Ipv4Addr,
        /// Prefix length.
        len: u8,
    },
    /// Create a VXLAN device (no learning, ARP proxy).
    CreateVxlan {
        /// Name.
        name: String,
        /// Spec.
        spec: VxlanWant,
    },
    /// Enslave a link to a bridge and bring it up.
    Attach {
        /// Link.
        link: String,
        /// Bridge.
        bridge: String,
    },
    /// Delete a link.
    DeleteLink {
        /// Name.
        name: String,
    },
    /// Add an FDB entry.
    FdbAdd(Fdb),
    /// Delete an FDB entry.
    FdbDel(Fdb),
    /// Add a neighbour entry.
    NeighAdd(Neigh),
    /// Delete a neighbour entry.
    NeighDel(Neigh),
}

/// Whether `name` is one of our bridges (`<prefix>b<digits>`) or VXLAN devices
/// (`<prefix>v<digits>`).
pub fn owned(prefix: &str, name: &str, kind: char) -> bool {
    name.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix(kind))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The wanted datapath for `map`.
pub fn want(map: &NetworkMap) -> Want {
    let mut w = Want::default();
    let local: Option<Ipv4Addr> = map.underlay_ip.parse().ok();
    for n in &map.networks {
        let br = bridge_name(&map.prefix, n.vni);
        let addrs = n
            .subnets
            .iter()
            .filter_map(|s| {
                let c = Cidr::parse(&s.cidr).ok()?;
                Some((s.gateway.parse().ok()?, c.prefix_len()))
            })
            .collect();
        let Ok(mac) = parse_mac(&gateway_mac(n.vni)) else {
            continue;
        };
        w.bridges.insert(br.clone(), BridgeWant { mac, addrs });
        let (Some(local), false) = (local, n.remote.is_empty()) else {
            continue;
        };
        let vx = vxlan_name(&map.prefix, n.vni);
        for r in &n.remote {
            let (Ok(mac), Ok(ip), Ok(dst)) = (
                parse_mac(&r.mac),
                r.ip.parse::<Ipv4Addr>(),
                r.underlay_ip.parse::<Ipv4Addr>(),
            ) else {
                continue;
            };
            w.fdb.insert(Fdb {
                dev: vx.clone(),
                mac,
                dst,
            });
            w.neigh.insert(Neigh {
                dev: vx.clone(),
                ip,
                mac,
            });
        }
        w.vxlans.insert(
            vx,
            VxlanWant {
                vni: n.vni,
                bridge: br,
                local,
                port: map.vxlan_port,
            },
        );
    }
    w
}

/// The operations that take `actual` to `want`. Only links named with `prefix` are touched;
/// a bridge that still has ports other than our VXLAN devices is not removed (another agent
/// sharing the namespace, or an instance the drivers have yet to clean up, still uses it).
pub fn plan(prefix: &str, want: &Want, actual: &Actual) -> Vec<Op> {
    let mut ops = Vec::new();
    let by_name: BTreeMap<&str, &LinkState> =
        actual.links.iter().map(|l| (l.name.as_str(), l)).collect();
    let name_of: BTreeMap<u32, &str> = actual
        .links
        .iter()
        .map(|l| (l.index, l.name.as_str()))
        .collect();
    let no_addrs = BTreeSet::new();
    for (name, b) in &want.bridges {
        let cur = by_name.get(name.as_str());
        match cur {
            None => ops.push(Op::CreateBridge { name: name.clone() }),
            Some(l) if !matches!(l.kind, Kind::Bridge { .. }) => {
                ops.push(Op::DeleteLink { name: name.clone() });
                ops.push(Op::CreateBridge { name: name.clone() });
            }
            _ => {}
        }
        let configured = cur.is_some_and(|l| {
            l.kind
                == Kind::Bridge {
                    nf_call_iptables: true,
                }
                && l.mac == b.mac
                && l.up
        });
        if !configured {
            ops.push(Op::ConfigureBridge {
                name: name.clone(),
                mac: b.mac,
            });
        }
        let have = actual.addrs.get(name).unwrap_or(&no_addrs);
        for &(addr, len) in b.addrs.difference(have) {
            ops.push(Op::AddAddr {
                link: name.clone(),
                addr,
                len,
            });
        }
        for &(addr, len) in have.difference(&b.addrs) {
            ops.push(Op::DelAddr {
                link: name.clone(),
                addr,
                len,
            });
        }
    }
    for (name, v) in &want.vxlans {
        let cur = by_name.get(name.as_str());
        let right = cur.is_some_and(|l| {
            l.kind
                == Kind::Vxlan {
                    vni: v.vni,
                    local: Some(v.local),
                    port: v.port,
                    learning: false,
                    proxy: true,
                }
        });
        if !right {
            if cur.is_some() {
                ops.push(Op::DeleteLink { name: name.clone() });
            }
            ops.push(Op::CreateVxlan {
                name: name.clone(),
                spec: v.clone(),
            });
        }
        let attached = right
            && cur.is_some_and(|l| {
                l.up && l.master.and_then(|m| name_of.get(&m).copied()) == Some(v.bridge.as_str())
            });
        if !attached {
            ops.push(Op::Attach {
                link: name.clone(),
                bridge: v.bridge.clone(),
            });
        }
    }
    // Entries on devices being recreated disappear with them; add them afresh.
    let recreated: BTreeSet<String> = ops
        .iter()
        .filter_map(|o| match o {
            Op::CreateVxlan { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    for f in actual.fdb.difference(&want.fdb) {
        if !recreated.contains(&f.dev) {
            ops.push(Op::FdbDel(f.clone()));
        }
    }
    for n in actual.neigh.difference(&want.neigh) {
        if !recreated.contains(&n.dev) {
            ops.push(Op::NeighDel(n.clone()));
        }
    }
    for f in &want.fdb {
        if recreated.contains(&f.dev) || !actual.fdb.contains(f) {
            ops.push(Op::FdbAdd(f.clone()));
        }
    }
    for n in &want.neigh {
        if recreated.contains(&n.dev) || !actual.neigh.contains(n) {
            ops.push(Op::NeighAdd(n.clone()));
        }
    }
    // Stale devices: VXLAN first (it is a bridge port), then bridges without other ports.
    for l in &actual.links {
        if owned(prefix, &l.name, 'v') && !want.vxlans.contains_key(&l.name) {
            ops.push(Op::DeleteLink {
                name: l.name.clone(),
            });
        }
    }
    for l in &actual.links {
        if !owned(prefix, &l.name, 'b') || want.bridges.contains_key(&l.name) {
            continue;
        }
        let busy = actual
            .links
            .iter()
            .any(|p| p.master == Some(l.index) && !owned(prefix, &p.name, 'v'));
        if !busy {
            ops.push(Op::DeleteLink {
                name: l.name.clone(),
            });
        }
    }
    ops
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
