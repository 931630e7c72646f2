//! The in-kernel L4 fast path: TCP and UDP listeners forwarded by nftables DNAT, planned purely.
//!
//! A user-space relay adds a second TCP connection per client; on this project's machines it
//! reaches about half of a direct connection's throughput whatever the relay does (see
//! docs/benchmarks.md). Real L4 balancers (IPVS, kube-proxy's nftables mode) let the kernel
//! forward instead, and so does nimbus where a listener's features allow it: the first packet of
//! a connection passes a `nat` chain that picks a backend (`numgen inc` over ranges sized by the
//! weights, which gives round robin or weighted round robin; for `ip_hash` and `consistent_hash`
//! a `jhash` of the client address over [`BUCKETS`] buckets, each given to a backend by
//! weighted rendezvous hashing, so a backend leaving or returning moves only its own buckets'
//! clients) and DNATs it; conntrack keeps every
//! established flow on its backend, so configuration changes and health flips never break one.
//! Traffic DNATed here towards another host is masqueraded so that replies come back through this
//! node. Per-backend counters (new connections, IP bytes each way) live in the table; open
//! connections are counted from the conntrack table.
//!
//! The user-space listener stays bound: it reserves the port and serves whatever the rules do
//! not take (clients on 127.0.0.1 when the backends are remote, everything while no backend is
//! available or the table is absent).
//!
//! This module only decides: eligibility, the table's text, and parsers for what `nft` and
//! `/proc/net/nf_conntrack` report. [`crate::kernel_sync`] applies it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, SocketAddrV4};

use crate::balancer::Algorithm;
use crate::config::{HealthCheckConfig, LbConfig, Protocol};

/// Top byte of every connection mark nimbus's L4 tables set ('N').
const MARK_TAG: u32 = 0x4e00_0000;
/// The bits of a mark that identify one table (tag and table id); the low 12 bits are the slot.
pub(crate) const MARK_TABLE_MASK: u32 = 0xffff_f000;
/// Most backends one table can address (12-bit slot).
pub(crate) const MAX_SLOTS: u16 = 4096;
/// Buckets of the client-address hash (`ip_hash`, `consistent_hash`).
pub(crate) const BUCKETS: u32 = 256;
/// Seed of the client-address hash (fixed, so a table replaced keeps every client's bucket).
const HASH_SEED: u32 = 0x4e69_6d62;

/// One backend as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelBackend {
    /// Stable slot of this backend in the table (names its chain, counters and mark).
    pub slot: u16,
    /// Where to forward.
    pub addr: SocketAddrV4,
    /// Relative share of new connections (1 for round robin).
    pub weight: u32,
    /// Whether it takes new connections (healthy, not ejected, not draining).
    pub available: bool,
}

/// Everything the table is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelPlan {
    /// `ip` table name.
    pub table: String,
    /// Bound L4 listeners (the address may be `0.0.0.0`).
    pub listeners: Vec<(Protocol, SocketAddrV4)>,
    /// Backends of the default pool in configuration order.
    pub backends: Vec<KernelBackend>,
    /// Pick by the client's address (`ip_hash`, `consistent_hash`) instead of in turn.
    pub by_client: bool,
}

/// Why a configuration stays on the user-space proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Ineligible {
    /// The algorithm needs per-connection state the kernel path does not keep.
    #[error("algorithm {0:?} needs the user-space proxy")]
    Algorithm(Algorithm),
    /// IPv6 listener or backend (the table is IPv4).
    #[error("IPv6 listeners and backends use the user-space proxy")]
    Ipv6,
    /// Loopback and non-loopback backends mixed (their clients need different rules).
    #[error("backends mix loopback and other addresses")]
    MixedLoopback,
    /// More backends than slots.
    #[error("more than {MAX_SLOTS} backends")]
    TooManyBackends,
}

/// The table name of one load balancer: `<prefix>_lb<hash>` (so that cleaning up a datapath
/// prefix removes it too).
pub(crate) fn table_name(prefix: &str, lb_name: &str) -> String {
    format!(
        "{prefix}_lb{:08x}",
        crate::balancer::hash64(lb_name.as_bytes()) as u32
    )
}

/// The connection mark of `slot` in `table`: tag, 12 bits of the table name's hash, slot.
pub(crate) fn mark(table: &str, slot: u16) -> u32 {
    let id = (crate::balancer::hash64(table.as_bytes()) as u32) & 0xfff;
    MARK_TAG | (id << 12) | u32::from(slot & 0xfff)
}

/// Whether the L4 listeners of `cfg` may be forwarded by the kernel. `Ok(false)`: there is no
/// L4 listener.
pub(crate) fn eligible(cfg: &LbConfig) -> Result<bool, Ineligible> {
    if !cfg.listeners.iter().any(|l| !l.protocol.is_http()) {
        return Ok(false);
    }
    let Some(pool) = cfg.pools.first() else {
        return Ok(false);
    };
    if pool.algorithm == Algorithm::LeastConnections {
        return Err(Ineligible::Algorithm(pool.algorithm));
    }
    if pool.backends.len() > usize::from(MAX_SLOTS) {
        return Err(Ineligible::TooManyBackends);
    }
    let l4 = cfg.listeners.iter().filter(|l| !l.protocol.is_http());
    if l4
        .flat_map(crate::config::ListenerConfig::addrs)
        .any(|a| a.is_ipv6())
        || pool.backends.iter().any(|b| b.addr.is_ipv6())
    {
        return Err(Ineligible::Ipv6);
    }
    let lo = pool
        .backends
        .iter()
        .filter(|b| b.addr.ip().is_loopback())
        .count();
    if lo != 0 && lo != pool.backends.len() {
        return Err(Ineligible::MixedLoopback);
    }
    Ok(true)
}

/// The active health check the backends of `cfg` get: the configured one or, when the kernel
/// forwards the LB's TCP listeners (it reports no connect failures, so passive outlier
/// ejection cannot see a dead backend), an implicit TCP connect check with the default
/// interval and thresholds. Not for UDP: a TCP probe says nothing about a UDP service.
pub(crate) fn effective_health_check(cfg: &LbConfig) -> Option<HealthCheckConfig> {
    if cfg.health_check.is_some() {
        return cfg.health_check.clone();
    }
    let tcp_only = cfg.listeners.iter().any(|l| l.protocol == Protocol::Tcp)
        && !cfg.listeners.iter().any(|l| l.protocol == Protocol::Udp);
    (cfg.kernel_l4.is_some() && tcp_only && eligible(cfg) == Ok(true))
        .then(HealthCheckConfig::default)
}

/// The weight a backend gets under `algorithm`.
pub(crate) fn weight(algorithm: Algorithm, configured: u32) -> u32 {
    if matches!(algorithm, Algorithm::Weighted | Algorithm::ConsistentHash) {
        configured.max(1)
    } else {
        1
    }
}

/// Only the IPv4 addresses of `addrs`.
pub(crate) fn v4(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddrV4> {
    addrs
        .into_iter()
        .filter_map(|a| match a {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        })
        .collect()
}

fn proto(p: Protocol) -> &'static str {
    if p == Protocol::Udp {
        "udp"
    } else {
        "tcp"
    }
}

impl KernelPlan {
    /// The mark of `slot` in this table.
    pub fn mark(&self, slot: u16) -> u32 {
        mark(&self.table, slot)
    }

    /// Whether every backend is a loopback address (then only local clients are forwarded).
    fn loopback_backends(&self) -> bool {
        self.backends.iter().any(|b| b.addr.ip().is_loopback())
    }

    /// The rules that send a listener's new connections to `pick`: (prerouting, output).
    fn entry_rules(&self) -> (Vec<String>, Vec<String>) {
        let lo_backends = self.loopback_backends();
        let (mut pre, mut out) = (Vec::new(), Vec::new());
        for (p, a) in &self.listeners {
            let m = format!("meta l4proto {} th dport {} jump pick", proto(*p), a.port());
            if a.ip().is_unspecified() {
                if lo_backends {
                    out.push(format!("fib daddr type local {m}"));
                } else {
                    pre.push(format!("fib daddr type local {m}"));
                    out.push(format!("ip daddr != 127.0.0.0/8 fib daddr type local {m}"));
                }
            } else {
                let lo_addr = a.ip().is_loopback();
                if !lo_backends && !lo_addr {
                    pre.push(format!("ip daddr {} {m}", a.ip()));
                }
                // A loopback client DNATed to a remote backend would need route_localnet; the
                // user-space listener serves it instead.
                if lo_backends || !lo_addr {
                    out.push(format!("ip daddr {} {m}", a.ip()));
                }
            }
        }
        (pre, out)
    }

    /// The nftables script that replaces the table whole, in one transaction.
    pub fn script(&self) -> String {
        let t = &self.table;
        let base = self.mark(0);
        let mut s = format!("table ip {t} {{ }}\ndelete table ip {t}\ntable ip {t} {{\n");
        for b in &self.backends {
            for c in ["n", "tx", "rx"] {
                let _ = writeln!(s, "  counter {c}{} {{ }}", b.slot);
            }
        }
        let (pre, out) = self.entry_rules();
        let chain = |s: &mut String, name: &str, head: &str, rules: &[String]| {
            let _ = writeln!(s, "  chain {name} {{");
            if !head.is_empty() {
                let _ = writeln!(s, "    {head}");
            }
            for r in rules {
                let _ = writeln!(s, "    {r}");
            }
            s.push_str("  }\n");
        };
        chain(
            &mut s,
            "pre",
            "type nat hook prerouting priority dstnat; policy accept;",
            &pre,
        );
        chain(
            &mut s,
            "out",
            "type nat hook output priority -100; policy accept;",
            &out,
        );
        let pick = if self.by_client {
            self.pick_by_client()
        } else {
            self.pick_in_turn()
        };
        chain(&mut s, "pick", "", &pick);
        for b in &self.backends {
            let rule = format!(
                "meta l4proto {{ tcp, udp }} ct mark set {:#010x} counter name \"n{}\" dnat ip to {}",
                self.mark(b.slot),
                b.slot,
                b.addr
            );
            chain(&mut s, &format!("b{}", b.slot), "", &[rule]);
        }
        chain(
            &mut s,
            "post",
            "type nat hook postrouting priority srcnat; policy accept;",
            &[format!(
                "ct mark & {MARK_TABLE_MASK:#010x} == {base:#010x} oifname != \"lo\" masquerade"
            )],
        );
        let mut acct = vec![format!(
            "ct mark & {MARK_TABLE_MASK:#010x} != {base:#010x} return"
        )];
        if !self.backends.is_empty() {
            for (dir, c) in [("original", "tx"), ("reply", "rx")] {
                let elems: Vec<String> = self
                    .backends
                    .iter()
                    .map(|b| format!("{:#010x} : \"{c}{}\"", self.mark(b.slot), b.slot))
                    .collect();
                acct.push(format!(
                    "ct direction {dir} counter name ct mark map {{ {} }}",
                    elems.join(", ")
                ));
            }
        }
        chain(
            &mut s,
            "acct",
            "type filter hook postrouting priority filter; policy accept;",
            &acct,
        );
        s.push_str("}\n");
        s
    }
}

impl KernelPlan {
    /// `numgen inc` over one range per available backend, as wide as its weight.
    fn pick_in_turn(&self) -> Vec<String> {
        let mut ranges = Vec::new();
        let mut next: u64 = 0;
        for b in self.backends.iter().filter(|b| b.available) {
            let w = u64::from(b.weight.max(1));
            ranges.push(if w == 1 {
                format!("{next} : jump b{}", b.slot)
            } else {
                format!("{next}-{} : jump b{}", next + w - 1, b.slot)
            });
            next += w;
        }
        if ranges.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "numgen inc mod {next} vmap {{ {} }}",
            ranges.join(", ")
        )]
    }

    /// `jhash` of the client address over [`BUCKETS`] buckets, runs of buckets of one backend
    /// merged into ranges.
    fn pick_by_client(&self) -> Vec<String> {
        let owners = self.bucket_owners();
        let mut ranges = Vec::new();
        let mut start = 0;
        for k in 1..=owners.len() {
            if k == owners.len() || owners[k] != owners[start] {
                if let Some(slot) = owners[start] {
                    ranges.push(if k - start == 1 {
                        format!("{start} : jump b{slot}")
                    } else {
                        format!("{start}-{} : jump b{slot}", k - 1)
                    });
                }
                start = k;
            }
        }
        if ranges.is_empty() {
            return Vec::new();
        }
        vec![format!(
            "jhash ip saddr mod {BUCKETS} seed {HASH_SEED:#010x} vmap {{ {} }}",
            ranges.join(", ")
        )]
    }

    /// The slot of the backend each bucket's clients go to (`None`: no backend available).
    /// Weighted rendezvous hashing: bucket `k` goes to the available backend with the highest
    /// `-weight / ln(u)`, `u` uniform in (0, 1) from the bucket and the backend's address, so
    /// shares follow the weights and a change of one backend moves only buckets it gains or
    /// loses.
    pub(crate) fn bucket_owners(&self) -> Vec<Option<u16>> {
        let keys: Vec<(u64, &KernelBackend)> = self
            .backends
            .iter()
            .filter(|b| b.available)
            .map(|b| (crate::balancer::hash64(b.addr.to_string().as_bytes()), b))
            .collect();
        (0..BUCKETS)
            .map(|k| {
                let kh = crate::balancer::hash64(&k.to_le_bytes());
                keys.iter()
                    .map(|(key, b)| {
                        let h = crate::balancer::hash64(&(kh ^ key).to_le_bytes());
                        // (0, 1]: 53 random bits, never 0.
                        let u = ((h >> 11) + 1) as f64 / (1u64 << 53) as f64;
                        let score = if u >= 1.0 {
                            f64::INFINITY
                        } else {
                            -f64::from(b.weight.max(1)) / u.ln()
                        };
                        (score, b.slot)
                    })
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, slot)| slot)
            })
            .collect()
    }
}

/// Counters of one slot read back from the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SlotCounters {
    /// New connections (flows) sent to the backend.
    pub connections: u64,
    /// IP bytes client -> backend.
    pub bytes_to: u64,
    /// IP bytes backend -> client.
    pub bytes_from: u64,
}

/// Parse `nft -j list counters table ip <table>` into counters per slot.
pub(crate) fn parse_counters(json: &str) -> Result<BTreeMap<u16, SlotCounters>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .ok_or("no nftables array")?;
    let mut out: BTreeMap<u16, SlotCounters> = BTreeMap::new();
    for c in items.iter().filter_map(|i| i.get("counter")) {
        let name = c.get("name").and_then(|n| n.as_str()).unwrap_or_default();
        let (kind, slot) = if let Some(s) = name.strip_prefix("tx") {
            (1, s)
        } else if let Some(s) = name.strip_prefix("rx") {
            (2, s)
        } else if let Some(s) = name.strip_prefix('n') {
            (0, s)
        } else {
            continue;
        };
        let Ok(slot) = slot.parse::<u16>() else {
            continue;
        };
        let e = out.entry(slot).or_default();
        let field = if kind == 0 { "packets" } else { "bytes" };
        let v = c
            .get(field)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        match kind {
            0 => e.connections = v,
            1 => e.bytes_to = v,
            _ => e.bytes_from = v,
        }
    }
    Ok(out)
}

/// Count the open connections of each slot of the table whose marks start at `base` in the
/// text of `/proc/net/nf_conntrack` (TCP: established only; UDP: every flow).
pub(crate) fn count_conntrack(text: &str, base: u32) -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(mark) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mark="))
            .and_then(|m| m.parse::<u32>().ok())
        else {
            continue;
        };
        if mark & MARK_TABLE_MASK != base & MARK_TABLE_MASK {
            continue;
        }
        let mut w = line.split_whitespace();
        let proto = w.nth(2).unwrap_or_default();
        let open = match proto {
            "tcp" => w.nth(2) == Some("ESTABLISHED"),
            "udp" => true,
            _ => false,
        };
        if open {
            *out.entry((mark & 0xfff) as u16).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
#[path = "kernel_tests.rs"]
mod tests;
