//! Floating addresses (load-balancer VIPs): find the underlay interface, add and remove a /32
//! over netlink, and announce the address with gratuitous ARP on an `AF_PACKET` socket.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::AddressFamily;

use crate::link::errno_of;
use crate::{NetError, Netlink};

const EADDRNOTAVAIL: i32 = 99;

/// The interface carrying an address: index and MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iface {
    /// Link index.
    pub index: u32,
    /// Hardware address.
    pub mac: [u8; 6],
}

impl Netlink {
    async fn v4_addrs(&self, index: Option<u32>) -> Result<Vec<(u32, Ipv4Addr)>, NetError> {
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let mut s = req.execute();
        let mut out = Vec::new();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(NetError::netlink("list addresses"))?
        {
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                    out.push((m.header.index, *ip));
                }
            }
        }
        Ok(out)
    }

    /// The interface that carries `addr` (the node's underlay address), if any.
    pub async fn iface_with_address(&self, addr: Ipv4Addr) -> Result<Option<Iface>, NetError> {
        let Some((index, _)) = self
            .v4_addrs(None)
            .await?
            .into_iter()
            .find(|(_, a)| *a == addr)
        else {
            return Ok(None);
        };
        let mut s = self.handle.link().get().match_index(index).execute();
        let msg = s
            .try_next()
            .await
            .map_err(NetError::netlink(format!("get link {index}")))?;
        let mac = msg.and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(v) => <[u8; 6]>::try_from(v.as_slice()).ok(),
                _ => None,
            })
        });
        Ok(mac.map(|mac| Iface { index, mac }))
    }

    /// Whether link `index` carries `addr`.
    pub async fn has_address(&self, index: u32, addr: Ipv4Addr) -> Result<bool, NetError> {
        Ok(self
            .v4_addrs(Some(index))
            .await?
            .iter()
            .any(|(_, a)| *a == addr))
    }

    /// Removes `addr/prefix_len` from link `index`; an absent address is fine.
    pub async fn del_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix_len;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
        m.attributes
            .push(AddressAttribute::Address(IpAddr::V4(addr)));
        match self.handle.address().del(m).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(NetError::netlink(format!(
                "delete address {addr}/{prefix_len}"
            ))(e)),
        }
    }
}

/// Length of an Ethernet ARP frame (without padding or FCS).
pub const ARP_FRAME_LEN: usize = 42;
const ETH_P_ARP: u16 = 0x0806;

/// A gratuitous ARP request announcing that `ip` is at `mac`: broadcast, sender and target
/// protocol address both `ip`, target hardware address zero (what keepalived sends). Linux
/// neighbours update an existing entry from it at once (a gratuitous ARP bypasses
/// `locktime`), and switches learn the port.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let mut f = [0u8; ARP_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // f[32..38]: target hardware address, zero.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Sends one gratuitous ARP for `ip` out of interface `iface` (needs `CAP_NET_RAW`).
pub fn send_garp(iface: Iface, ip: Ipv4Addr) -> Result<(), NetError> {
    send_raw(iface.index, &garp_frame(iface.mac, ip))
        .map_err(NetError::io(format!("sending gratuitous ARP for {ip}")))
}

/// Sends one raw Ethernet frame (destination in its first 6 bytes) out of link `index` on an
/// `AF_PACKET` socket, closed afterwards.
#[allow(unsafe_code)]
fn send_raw(index: u32, frame: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let proto = ETH_P_ARP.to_be();
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is a plain C struct for which all-zero bytes are a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` is valid for `frame.len()` bytes and `sll` is a fully initialised
    // sockaddr_ll whose size is passed along; the descriptor is open (owned by `fd`).
    let n = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_layout() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let f = garp_frame(mac, Ipv4Addr::new(10, 250, 3, 100));
        let hex = f.iter().fold(String::new(), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        });
        assert_eq!(
            hex,
            concat!(
                "ffffffffffff",
                "021122334455",
                "0806",
                "0001",
                "0800",
                "06",
                "04",
                "0001",
                "021122334455",
                "0afa0364",
                "000000000000",
                "0afa0364"
            )
        );
    }
}
