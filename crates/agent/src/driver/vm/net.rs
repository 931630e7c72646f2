//! Host side of a VM's network over netlink (`nimbus_net`): the bridge, and the tap QEMU
//! creates (`-netdev tap,ifname=...`), enslaved to the bridge once QEMU is up.

use std::net::Ipv4Addr;

use nimbus_api::agent::NetworkAttachment;

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

/// Sets the MTU of `ifname` (if `mtu` is not 0), enslaves it to the attachment's bridge and
/// brings it up; the host's neighbour entry for the VM's address then names the VM's MAC
/// (addresses are reused; see `nimbus_net::Netlink::point_neighbour`).
pub async fn attach_tap(ifname: &str, net: &NetworkAttachment) -> Result<(), VmError> {
    let nl = nimbus_net::Netlink::connect()
        .await
        .map_err(|e| net_err(&e))?;
    if net.mtu > 0 {
        nl.set_mtu(ifname, net.mtu).await.map_err(|e| net_err(&e))?;
    }
    nl.set_master_and_up(ifname, &net.bridge)
        .await
        .map_err(|e| net_err(&e))?;
    // Without a MAC of ours, QEMU picked one: nothing to point at.
    match (
        nimbus_net::parse_ipv4("ip", &net.ip),
        nimbus_net::parse_mac(&net.mac),
    ) {
        (Ok(ip), Ok(mac)) => nl
            .point_neighbour(&net.bridge, ip, mac)
            .await
            .map_err(|e| net_err(&e)),
        _ => Ok(()),
    }
}

/// Deletes a link if it exists.
pub async fn delete_link(name: &str) -> Result<(), VmError> {
    let nl = nimbus_net::Netlink::connect()
        .await
        .map_err(|e| net_err(&e))?;
    nl.delete_link(name).await.map_err(|e| net_err(&e))
}
