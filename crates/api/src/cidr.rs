//! IPv4 CIDR arithmetic shared by validation, the state machine (IPAM) and the datapath planner.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network `a.b.c.d/len` whose host bits are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: u32,
    len: u8,
}

/// Why a string is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not of the form `a.b.c.d/len`.
    #[error("{0:?} is not an IPv4 CIDR such as 10.0.0.0/16")]
    Syntax(String),
    /// Host bits are set (`10.0.0.5/24`).
    #[error("{given:?} has host bits set; did you mean {fixed}?")]
    HostBits {
        /// What was given.
        given: String,
        /// The network it probably meant.
        fixed: Cidr,
    },
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

impl Cidr {
    /// A CIDR from an address and a prefix length (host bits are cleared).
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        let len = len.min(32);
        Self {
            addr: u32::from(addr) & mask(len),
            len,
        }
    }

    /// A single address as a /32.
    pub fn host(addr: Ipv4Addr) -> Self {
        Self::new(addr, 32)
    }

    /// Parses `a.b.c.d/len` (a bare address is a /32) and refuses host bits.
    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let syntax = || CidrError::Syntax(s.to_string());
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, len.parse::<u8>().map_err(|_| syntax())?),
            None => (s, 32),
        };
        if len > 32 {
            return Err(syntax());
        }
        let ip: Ipv4Addr = ip.parse().map_err(|_| syntax())?;
        let c = Self::new(ip, len);
        if c.addr != u32::from(ip) {
            return Err(CidrError::HostBits {
                given: s.to_string(),
                fixed: c,
            });
        }
        Ok(c)
    }

    /// The network address.
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }

    /// The prefix length.
    pub fn prefix_len(self) -> u8 {
        self.len
    }

    /// Number of addresses (2^(32-len)).
    pub fn size(self) -> u64 {
        1u64 << (32 - u32::from(self.len))
    }

    /// The last address.
    pub fn last(self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr | !mask(self.len))
    }

    /// Whether `ip` is inside.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == self.addr
    }

    /// Whether `other` is entirely inside this network.
    pub fn contains_cidr(self, other: Self) -> bool {
        other.len >= self.len && self.contains(other.network())
    }

    /// Whether the two networks share an address (one contains the other).
    pub fn overlaps(self, other: Self) -> bool {
        self.contains_cidr(other) || other.contains_cidr(self)
    }

    /// The gateway of a subnet: its first host address.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr.wrapping_add(1))
    }

    /// The `n`-th address (0 = the network address), if inside.
    pub fn nth(self, n: u64) -> Option<Ipv4Addr> {
        (n < self.size()).then(|| Ipv4Addr::from(self.addr + n as u32))
    }

    /// Addresses instances may get: everything but the network address, the gateway (the
    /// first host) and the broadcast address.
    pub fn assignable(self) -> impl Iterator<Item = Ipv4Addr> {
        let size = self.size();
        (2..size.saturating_sub(1)).filter_map(move |n| self.nth(n))
    }

    /// The `/len` blocks inside this network, in order (empty if `len` is shorter).
    pub fn blocks(self, len: u8) -> impl Iterator<Item = Cidr> {
        let count = if len >= self.len && len <= 32 {
            1u64 << (len - self.len)
        } else {
            0
        };
        let step = 1u64 << (32 - u32::from(len.min(32)));
        (0..count).map(move |i| Cidr {
            addr: self.addr + (i * step) as u32,
            len,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_math() {
        let c = Cidr::parse("10.213.0.0/16").unwrap();
        assert_eq!(c.to_string(), "10.213.0.0/16");
        assert_eq!(c.size(), 65536);
        assert_eq!(c.gateway().to_string(), "10.213.0.1");
        assert_eq!(c.last().to_string(), "10.213.255.255");
        assert!(c.contains("10.213.7.9".parse().unwrap()));
        assert!(!c.contains("10.214.0.1".parse().unwrap()));
        let s = Cidr::parse("10.213.4.0/24").unwrap();
        assert!(c.contains_cidr(s) && !s.contains_cidr(c));
        assert!(c.overlaps(s) && s.overlaps(c));
        assert!(!s.overlaps(Cidr::parse("10.213.5.0/24").unwrap()));
        assert_eq!(Cidr::parse("10.0.0.7").unwrap().prefix_len(), 32);
        let blocks: Vec<String> = Cidr::parse("10.1.0.0/22")
            .unwrap()
            .blocks(24)
            .map(|b| b.to_string())
            .collect();
        assert_eq!(
            blocks,
            ["10.1.0.0/24", "10.1.1.0/24", "10.1.2.0/24", "10.1.3.0/24"]
        );
        let small = Cidr::parse("10.0.0.0/29").unwrap();
        let hosts: Vec<String> = small.assignable().map(|a| a.to_string()).collect();
        assert_eq!(hosts.len(), 5);
        assert_eq!(hosts[0], "10.0.0.2");
        assert_eq!(hosts[4], "10.0.0.6");
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().size(), 1 << 32);
    }

    #[test]
    fn errors() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "a.b.c.d/8",
            "10.0.0.0/x",
            "/8",
        ] {
            assert!(
                matches!(Cidr::parse(bad), Err(CidrError::Syntax(_))),
                "{bad}"
            );
        }
        let e = Cidr::parse("10.0.0.5/24").unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"10.0.0.5/24\" has host bits set; did you mean 10.0.0.0/24?"
        );
    }
}
