//! Links in one network namespace over a rtnetlink connection.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use tracing::{debug, info};

use crate::{check_ifname, NetError};

pub(crate) const ENODEV: i32 = 19;
pub(crate) const EEXIST: i32 = 17;
pub(crate) const ESRCH: i32 = 3;

/// Interface traffic counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes transmitted.
    pub tx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets transmitted.
    pub tx_packets: u64,
}

/// A rtnetlink connection bound to the network namespace it was created in. Its connection task
/// runs on the tokio runtime it was created on; cloning shares it.
#[derive(Clone)]
pub struct Netlink {
    pub(crate) handle: rtnetlink::Handle,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

/// The negative errno carried by a netlink error answer, as a positive number.
pub(crate) fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace and spawns its
    /// connection task on the current tokio runtime (so it must be called inside one).
    #[allow(clippy::unused_async)]
    pub async fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(NetError::io("opening a netlink socket"))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Wraps an existing handle (e.g. one created inside another namespace).
    pub(crate) fn from_handle(handle: rtnetlink::Handle) -> Self {
        Self { handle }
    }

    async fn get_link(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        check_ifname(name)?;
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(msg) => Ok(msg),
            Err(e) if errno_of(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(NetError::Netlink {
                op: format!("get link {name}"),
                source: Box::new(e),
            }),
        }
    }

    /// Index of the link `name`, `None` if it does not exist.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetError> {
        Ok(self.get_link(name).await?.map(|m| m.header.index))
    }

    async fn require_index(&self, name: &str) -> Result<u32, NetError> {
        self.link_index(name)
            .await?
            .ok_or_else(|| NetError::NoSuchLink(name.to_string()))
    }

    /// Makes sure bridge `name` exists, carries `gateway/prefix_len` and is up; returns its
    /// index. Idempotent.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        gateway: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<u32, NetError> {
        if prefix_len > 32 {
            return Err(NetError::Invalid {
                what: "prefix length",
                value: prefix_len.to_string(),
            });
        }
        let index = if let Some(index) = self.link_index(name).await? {
            index
        } else {
            info!(bridge = name, "creating bridge");
            match self
                .handle
                .link()
                .add()
                .bridge(name.to_string())
                .execute()
                .await
            {
                Ok(()) => {}
                // Lost a race with a concurrent creator: fine.
                Err(e) if errno_of(&e) == Some(EEXIST) => {}
                Err(e) => return Err(NetError::netlink(format!("create bridge {name}"))(e)),
            }
            self.require_index(name).await?
        };
        self.add_address(index, IpAddr::V4(gateway), prefix_len)
            .await
            .map_err(|e| match e {
                NetError::Netlink { source, .. } => NetError::Netlink {
                    op: format!("add {gateway}/{prefix_len} to {name}"),
                    source,
                },
                other => other,
            })?;
        self.set_up_index(index, name).await?;
        Ok(index)
    }

    /// Adds an address to a link; an already present address is fine.
    pub async fn add_address(
        &self,
        index: u32,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        match self
            .handle
            .address()
            .add(index, addr, prefix_len)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(NetError::netlink(format!(
                "add address {addr}/{prefix_len}"
            ))(e)),
        }
    }

    /// Adds a default route via `gateway`; an existing default route is fine.
    pub(crate) async fn add_default_route(&self, gateway: Ipv4Addr) -> Result<(), NetError> {
        match self
            .handle
            .route()
            .add()
            .v4()
            .gateway(gateway)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(NetError::netlink(format!(
                "add default route via {gateway}"
            ))(e)),
        }
    }

    pub(crate) async fn set_up_index(&self, index: u32, name: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(NetError::netlink(format!("set {name} up")))
    }

    /// Sets the MTU of link `name`.
    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetError> {
        let index = self.require_index(name).await?;
        self.handle
            .link()
            .set(index)
            .mtu(mtu)
            .execute()
            .await
            .map_err(NetError::netlink(format!("set the MTU of {name} to {mtu}")))
    }

    /// Brings link `name` up.
    pub async fn set_up(&self, name: &str) -> Result<(), NetError> {
        let index = self.require_index(name).await?;
        self.set_up_index(index, name).await
    }

    /// Enslaves `ifname` to `bridge` and brings it up.
    pub async fn set_master_and_up(&self, ifname: &str, bridge: &str) -> Result<(), NetError> {
        let index = self.require_index(ifname).await?;
        let master = self.require_index(bridge).await?;
        self.handle
            .link()
            .set(index)
            .controller(master)
            .up()
            .execute()
            .await
            .map_err(NetError::netlink(format!("attach {ifname} to {bridge}")))
    }

    /// Points this namespace's neighbour entry for `ip` on link `dev` at `mac` (`STALE`: used at
    /// once, confirmed by the next exchange). Addresses are reused: an entry still naming the
    /// previous holder's MAC stays `REACHABLE` for up to 45 s, and the gratuitous ARP that would
    /// correct it can be dropped while a new link's carrier is still being processed.
    pub async fn point_neighbour(
        &self,
        dev: &str,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), NetError> {
        let index = self.require_index(dev).await?;
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_local_address(&mac)
            .state(netlink_packet_route::neighbour::NeighbourState::Stale)
            .replace()
            .execute()
            .await
            .map_err(NetError::netlink(format!(
                "point the neighbour {ip} on {dev} at its MAC"
            )))
    }

    /// Deletes link `name` (for a veth, both ends); no-op if absent.
    pub async fn delete_link(&self, name: &str) -> Result<(), NetError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(());
        };
        debug!(link = name, "deleting link");
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno_of(&e), Some(ENODEV | ESRCH)) => Ok(()),
            Err(e) => Err(NetError::netlink(format!("delete link {name}"))(e)),
        }
    }

    /// Traffic counters of link `name`, `None` if it does not exist.
    pub async fn counters(&self, name: &str) -> Result<Option<IfCounters>, NetError> {
        let Some(msg) = self.get_link(name).await? else {
            return Ok(None);
        };
        let mut out = IfCounters::default();
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Stats64(s) => {
                    return Ok(Some(IfCounters {
                        rx_bytes: s.rx_bytes,
                        tx_bytes: s.tx_bytes,
                        rx_packets: s.rx_packets,
                        tx_packets: s.tx_packets,
                    }));
                }
                LinkAttribute::Stats(s) => {
                    out = IfCounters {
                        rx_bytes: u64::from(s.rx_bytes),
                        tx_bytes: u64::from(s.tx_bytes),
                        rx_packets: u64::from(s.rx_packets),
                        tx_packets: u64::from(s.tx_packets),
                    };
                }
                _ => {}
            }
        }
        Ok(Some(out))
    }

    /// Creates a veth pair `name` <-> `peer` (both in this namespace).
    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetError> {
        check_ifname(name)?;
        check_ifname(peer)?;
        self.handle
            .link()
            .add()
            .veth(name.to_string(), peer.to_string())
            .execute()
            .await
            .map_err(NetError::netlink(format!("create veth {name}/{peer}")))
    }

    /// Creates a veth pair in one request: `host` here, enslaved to the bridge with index
    /// `master` and up; its peer named `peer` with MAC `mac` directly inside the network
    /// namespace open at `ns_fd` (down). Creating the peer in place avoids moving a device
    /// between namespaces, which waits for an RCU grace period.
    pub(crate) async fn add_veth_into_netns(
        &self,
        host: &str,
        master: u32,
        peer: &str,
        mac: [u8; 6],
        ns_fd: std::os::fd::RawFd,
    ) -> Result<(), NetError> {
        use netlink_packet_route::link::{InfoData, InfoVeth, LinkInfo};
        check_ifname(host)?;
        check_ifname(peer)?;
        // rtnetlink's `veth(a, b)` puts `a` in the peer message and `b` in the main one.
        let mut req = self
            .handle
            .link()
            .add()
            .veth(peer.to_string(), host.to_string());
        let msg = req.message_mut();
        msg.attributes.push(LinkAttribute::Controller(master));
        for attr in &mut msg.attributes {
            if let LinkAttribute::LinkInfo(infos) = attr {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) = info {
                        p.attributes.push(LinkAttribute::Address(mac.to_vec()));
                        p.attributes.push(LinkAttribute::NetNsFd(ns_fd));
                    }
                }
            }
        }
        req.execute()
            .await
            .map_err(NetError::netlink(format!("create veth {host}/{peer}")))
    }
}
