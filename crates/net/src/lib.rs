//! nimbus node networking: Linux bridges, veth pairs and container network namespaces, all
//! driven over netlink (rtnetlink); nothing shells out to `ip`.
//!
//! - [`Netlink`]: a netlink connection in the agent's own network namespace (bridges, links,
//!   counters).
//! - [`create_container_netns`] / [`delete_container_netns`]: a named network namespace per
//!   container (bind-mounted at `/run/netns/nimbus-<shortid>`, so it survives the agent and
//!   the container), joined to a bridge through a veth pair.

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
pub use netns::{create_container_netns, delete_container_netns, in_netns, netns_path, NETNS_DIR};

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
