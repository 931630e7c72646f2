//! Host side of a VM's network over netlink (`nimbus_net`): the bridge, and the tap QEMU
//! creates (`-netdev tap,ifname=...`), enslaved to the bridge once QEMU is up.

use std::net::Ipv4Addr;

use super::VmError;

fn net_err(e: &nimbus_net::NetError) -> VmError {
    VmError::Tool {
        tool: "netlink",
        message: e.to_string(),
    }
}

/// Host interface name of a VM's tap.
pub fn tap_name(id: &str) -> String {
    nimbus_net::host_ifname("nt", id)
}

/// Creates the bridge with `gateway/prefix` if needed and brings it up.
pub async fn ensure_bridge(name: &str, gateway: &str, prefix: u8) -> Result<(), VmError> {
    let nl = nimbus_net::Netlink::connect()
        .await
        .map_err(|e| net_err(&e))?;
    let gw: Ipv4Addr = gateway
        .parse()
        .map_err(|_| VmError::Invalid(format!("invalid gateway address {gateway:?}")))?;
    nl.ensure_bridge(name, gw, prefix)
        .await
        .map_err(|e| net_err(&e))?;
    Ok(())
}

/// Sets the MTU of `ifname` (if `mtu` is not 0), enslaves it to `bridge` and brings it up.
pub async fn set_master_and_up(ifname: &str, bridge: &str, mtu: u32) -> Result<(), VmError> {
    let nl = nimbus_net::Netlink::connect()
        .await
        .map_err(|e| net_err(&e))?;
    if mtu > 0 {
        nl.set_mtu(ifname, mtu).await.map_err(|e| net_err(&e))?;
    }
    nl.set_master_and_up(ifname, bridge)
        .await
        .map_err(|e| net_err(&e))
}

/// Deletes a link if it exists.
pub async fn delete_link(name: &str) -> Result<(), VmError> {
    let nl = nimbus_net::Netlink::connect()
        .await
        .map_err(|e| net_err(&e))?;
    nl.delete_link(name).await.map_err(|e| net_err(&e))
}
