//! Node-local address management: each node's bridge serves one /24 out of a /16 pool, and each
//! instance gets the lowest free host address of its node's /24.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use nimbus_api::ApiError;

/// The default pool node subnets are carved from.
pub const DEFAULT_POOL: &str = "10.213.0.0/16";
/// The default node-local bridge.
pub const DEFAULT_BRIDGE: &str = "nimbus0";
/// Prefix length of a node subnet.
pub const NODE_PREFIX: u8 = 24;
/// Node subnet indices handed out: `10.213.1.0/24` ..= `10.213.240.0/24` (higher ones are left
/// for tests and future pools).
const MAX_NODE_INDEX: u8 = 240;

/// Checks a node pool: an IPv4 /16.
pub fn validate_pool(pool: &str) -> Result<(), ApiError> {
    match parse_cidr(pool) {
        Some((ip, 16)) if ip.octets()[2] == 0 && ip.octets()[3] == 0 => Ok(()),
        _ => Err(ApiError::invalid(
            "pool",
            format!("node pool {pool:?} must be an IPv4 /16 such as 10.213.0.0/16"),
        )),
    }
}

/// Checks a bridge name (Linux interface name rules).
pub fn validate_bridge(name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::invalid(
            "bridge",
            format!("bridge name {name:?} must be 1-15 letters, digits, '-' or '_'"),
        ));
    }
    Ok(())
}

/// The first free node subnet of `pool` given the ones in use.
pub fn free_node_subnet(pool: &str, used: &BTreeSet<String>) -> Option<String> {
    let [a, b, _, _] = parse_cidr(pool)?.0.octets();
    (1..=MAX_NODE_INDEX)
        .map(|i| format!("{a}.{b}.{i}.0/{NODE_PREFIX}"))
        .find(|s| !used.contains(s))
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(cidr: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = cidr.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some((ip, len))
}

/// The gateway of a subnet: its first host address.
pub fn gateway(cidr: &str) -> Option<Ipv4Addr> {
    let (ip, _) = parse_cidr(cidr)?;
    Some(Ipv4Addr::from(u32::from(ip) + 1))
}

/// The lowest free host address in `cidr` (skipping network, gateway and broadcast).
pub fn free_ip(cidr: &str, used: &BTreeSet<String>) -> Option<String> {
    let (ip, len) = parse_cidr(cidr)?;
    let base = u32::from(ip);
    let size = 1u32.checked_shl(32 - u32::from(len)).unwrap_or(0);
    (2..size.saturating_sub(1))
        .map(|h| Ipv4Addr::from(base + h).to_string())
        .find(|a| !used.contains(a))
}

/// A locally administered MAC derived from the IPv4 address.
pub fn mac_for(ip: &str) -> String {
    let o = ip
        .parse::<Ipv4Addr>()
        .map(|a| a.octets())
        .unwrap_or_default();
    format!("02:6e:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_and_ips() {
        let mut used = BTreeSet::new();
        assert_eq!(
            free_node_subnet(DEFAULT_POOL, &used).unwrap(),
            "10.213.1.0/24"
        );
        used.insert("10.213.1.0/24".to_string());
        assert_eq!(
            free_node_subnet(DEFAULT_POOL, &used).unwrap(),
            "10.213.2.0/24"
        );
        let mut ips = BTreeSet::new();
        assert_eq!(free_ip("10.213.1.0/24", &ips).unwrap(), "10.213.1.2");
        ips.insert("10.213.1.2".to_string());
        assert_eq!(free_ip("10.213.1.0/24", &ips).unwrap(), "10.213.1.3");
        for h in 2..255 {
            ips.insert(format!("10.213.1.{h}"));
        }
        assert!(free_ip("10.213.1.0/24", &ips).is_none());
        assert_eq!(gateway("10.213.1.0/24").unwrap().to_string(), "10.213.1.1");
        assert_eq!(mac_for("10.213.1.2"), "02:6e:0a:d5:01:02");
    }
}
