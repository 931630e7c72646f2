//! Deleting conntrack entries by connection mark over ctnetlink: how the in-kernel L4 path
//! ends the flows of a backend whose drain timeout has passed (the next packet of such a flow
//! finds no NAT binding and is answered with a reset).

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE`.
const CT_DELETE: u16 = (1 << 8) | 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_MARK_MASK: u16 = 21;
/// No entry matched: nothing to delete.
const ENOENT: i32 = nix::errno::Errno::ENOENT as i32;

/// The request that deletes every entry with `entry.mark & mask == mark & mask`.
pub(crate) fn delete_request(mark: u32, mask: u32, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(36);
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    m.extend_from_slice(&CT_DELETE.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
                                              // nfgenmsg: family AF_UNSPEC with version 0 = every family; resource id 0.
    m.extend_from_slice(&[0, 0, 0, 0]);
    for (kind, value) in [(CTA_MARK, mark), (CTA_MARK_MASK, mask)] {
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&value.to_be_bytes());
    }
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
    m
}

/// The result carried by a netlink acknowledgement: `Ok` for success or nothing to delete.
pub(crate) fn parse_ack(buf: &[u8]) -> std::io::Result<()> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed netlink ack");
    let kind = u16::from_ne_bytes(
        buf.get(4..6)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    if kind != NLMSG_ERROR {
        return Err(bad());
    }
    let code = i32::from_ne_bytes(
        buf.get(16..20)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    match -code {
        0 | ENOENT => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// Delete the conntrack entries whose mark matches `mark` under `mask`, in this network
/// namespace (needs `CAP_NET_ADMIN`).
pub(crate) fn delete_by_mark(mark: u32, mask: u32) -> std::io::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    let msg = delete_request(mark, mask, 1);
    sendto(
        fd.as_raw_fd(),
        &msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = [0u8; 512];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    parse_ack(&buf[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = delete_request(0x4e12_3005, 0xffff_ffff, 7);
        assert_eq!(m.len(), 36);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 36);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), 0x0102);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 5);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        // CTA_MARK, big-endian value.
        assert_eq!(u16::from_ne_bytes(m[22..24].try_into().unwrap()), CTA_MARK);
        assert_eq!(&m[24..28], &0x4e12_3005u32.to_be_bytes());
        assert_eq!(
            u16::from_ne_bytes(m[30..32].try_into().unwrap()),
            CTA_MARK_MASK
        );
    }

    #[test]
    fn acks() {
        let ack = |code: i32| {
            let mut b = vec![0u8; 36];
            b[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b[16..20].copy_from_slice(&code.to_ne_bytes());
            b
        };
        assert!(parse_ack(&ack(0)).is_ok());
        assert!(parse_ack(&ack(-2)).is_ok(), "nothing matched");
        assert_eq!(parse_ack(&ack(-1)).unwrap_err().raw_os_error(), Some(1));
        assert!(parse_ack(&[0u8; 3]).is_err());
    }
}
