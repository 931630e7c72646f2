//! Cluster network settings: the pool network CIDRs are carved from, the datapath name prefix,
//! the instance MTU and the VXLAN port.

use nimbus_api::cidr::Cidr;
use nimbus_api::ApiError;

/// The default pool network CIDRs are carved from.
pub const DEFAULT_POOL: &str = "10.213.0.0/16";
/// The default datapath name prefix (bridges `nimbusb<vni>`, VXLAN `nimbusv<vni>`, nftables
/// table `inet nimbus`).
pub const DEFAULT_PREFIX: &str = "nimbus";
/// Longest datapath prefix: `<prefix>b<vni>` must fit in 15 characters with an 8-digit VNI.
pub const MAX_PREFIX_LEN: usize = 6;
/// Default MTU of instance interfaces: a 1500-byte underlay minus the 50 bytes of VXLAN.
pub const DEFAULT_MTU: u32 = 1450;
/// Default VXLAN UDP port (IANA).
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
/// Prefix length of a network created without a CIDR.
pub const DEFAULT_NETWORK_PREFIX: u8 = 24;
/// First VNI handed out.
pub const FIRST_VNI: u32 = 100;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Checks a network pool: an IPv4 CIDR from /8 to /24.
pub fn validate_pool(pool: &str) -> Result<Cidr, ApiError> {
    match Cidr::parse(pool) {
        Ok(c) if (8..=24).contains(&c.prefix_len()) => Ok(c),
        Ok(c) => Err(ApiError::invalid(
            "pool",
            format!("network pool {c} must be between a /8 and a /24"),
        )),
        Err(e) => Err(ApiError::invalid("pool", format!("network pool: {e}"))),
    }
}

/// Checks a datapath prefix: 1-6 lowercase letters or digits, starting with a letter.
pub fn validate_prefix(prefix: &str) -> Result<(), ApiError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.as_bytes()[0].is_ascii_lowercase()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "prefix",
            format!(
                "datapath prefix {prefix:?} must be 1-{MAX_PREFIX_LEN} lowercase letters or digits, starting with a letter"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_validation() {
        assert!(validate_pool(DEFAULT_POOL).is_ok());
        assert!(validate_pool("10.0.0.0/8").is_ok());
        assert!(validate_pool("10.0.0.0/25").is_err());
        assert!(validate_pool("10.0.0.1/16").is_err());
        assert!(validate_prefix(DEFAULT_PREFIX).is_ok());
        assert!(validate_prefix("nbt31").is_ok());
        for bad in ["", "toolong7", "1ab", "a-b", "AB"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }
}
