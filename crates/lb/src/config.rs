//! Data-plane configuration of one load balancer.
//!
//! This is what the agent (or the `lb-proxy` bench binary) hands to [`crate::LoadBalancer`]: the
//! control-plane resource resolved to concrete backend addresses. It is plain data (serde), so a
//! static JSON file can drive the proxy. [`LbConfig::check`] refuses configurations the runtime
//! cannot serve (unknown pool in a route, bad pattern, bad TLS material).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::balancer::Algorithm;
use crate::routing::RouteMatch;
use crate::LbError;

/// Protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// L4 TCP proxy.
    Tcp,
    /// L4 UDP proxy (per-client sessions).
    Udp,
    /// L7 HTTP/1.1 and HTTP/2 (prior knowledge) reverse proxy.
    Http,
    /// L7 over TLS 1.3 (ALPN h2 and http/1.1).
    Https,
}

impl Protocol {
    /// Whether this listener is an L7 (HTTP) listener.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Https)
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Http => "http",
            Self::Https => "https",
        })
    }
}

/// One listening port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenerConfig {
    /// Protocol served on the port.
    pub protocol: Protocol,
    /// Port (0 picks a free one; tests use it).
    pub port: u16,
    /// Addresses to bind; empty means `0.0.0.0`.
    #[serde(default)]
    pub bind: Vec<IpAddr>,
}

impl ListenerConfig {
    /// The socket addresses this listener binds.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        if self.bind.is_empty() {
            vec![SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                self.port,
            )]
        } else {
            self.bind
                .iter()
                .map(|ip| SocketAddr::new(*ip, self.port))
                .collect()
        }
    }
}

/// One backend (an instance's address).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackendConfig {
    /// Name shown in metrics and status (the instance name).
    pub name: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative weight (used by `weighted`, `least_connections` and `consistent_hash`).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// A named set of backends with its balancing algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// Pool name; routes refer to it. The first pool is the default.
    pub name: String,
    /// Backends of the pool.
    pub backends: Vec<BackendConfig>,
    /// How a backend is chosen.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// For `consistent_hash`: hash this request header; `None` hashes the client address.
    #[serde(default)]
    pub hash_header: Option<String>,
}

/// A routing rule: requests matching `matcher` go to `pool`. Rules are tried in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// What to match.
    #[serde(flatten)]
    pub matcher: RouteMatch,
    /// Pool the request goes to.
    pub pool: String,
}

/// How a health check probes a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HealthProbe {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path` answers with `expect_status`.
    Http {
        /// Request path, e.g. `/healthz`.
        path: String,
        /// Expected status code.
        expect_status: u16,
    },
}

/// Active health checking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckConfig {
    /// The probe.
    pub probe: HealthProbe,
    /// Time between probes, milliseconds.
    pub interval_ms: u64,
    /// Probe timeout, milliseconds.
    pub timeout_ms: u64,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            probe: HealthProbe::Tcp,
            interval_ms: 2_000,
            timeout_ms: 1_000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// Passive outlier ejection: a backend with this many consecutive failed requests (connect
/// errors, timeouts, 502/503/504) is taken out of rotation for `base_ejection_ms` times the
/// number of times it has been ejected (capped at 10x).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutlierConfig {
    /// Consecutive errors that eject; 0 disables ejection.
    pub consecutive_errors: u32,
    /// Base ejection time, milliseconds.
    pub base_ejection_ms: u64,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            base_ejection_ms: 10_000,
        }
    }
}

/// The opt-in edge cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Memory bound for all stored responses (bodies and headers), bytes.
    pub max_bytes: usize,
    /// Largest single response stored, bytes.
    pub max_object_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_object_bytes: 1 << 20,
        }
    }
}

/// PEM certificate chain and private key for `https` listeners.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsConfig {
    /// Certificate chain, PEM (leaf first).
    pub cert_pem: String,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
    /// TLS 1.3 cipher suites offered, by IANA name (`TLS_AES_128_GCM_SHA256`,
    /// `TLS_AES_256_GCM_SHA384`, `TLS_CHACHA20_POLY1305_SHA256`); the client's preference picks
    /// among them. Empty: all three.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

/// Timeouts and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Backend connect timeout, milliseconds.
    pub connect_timeout_ms: u64,
    /// Time to wait for a backend's response headers, milliseconds.
    pub response_timeout_ms: u64,
    /// Largest request head (request line and headers) accepted, bytes; larger is 431.
    pub max_header_bytes: usize,
    /// How long connections to a removed backend (or a stopped listener) may finish, ms.
    pub drain_timeout_ms: u64,
    /// UDP session idle timeout, milliseconds.
    pub udp_idle_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 2_000,
            response_timeout_ms: 30_000,
            max_header_bytes: 16 * 1024,
            drain_timeout_ms: 30_000,
            udp_idle_timeout_ms: 30_000,
        }
    }
}

/// The whole data-plane configuration of one load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbConfig {
    /// LB name (metrics label).
    pub name: String,
    /// Listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Backend pools; the first is the default (and the only one L4 listeners use).
    pub pools: Vec<PoolConfig>,
    /// L7 routing rules, tried in order; no match goes to the default pool.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Active health check; `None` relies on passive outlier ejection only.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Passive outlier ejection.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Sticky sessions: the cookie that pins a client to a backend (L7 only).
    #[serde(default)]
    pub sticky_cookie: Option<String>,
    /// Edge cache (L7 only).
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// TLS material for `https` listeners.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Timeouts and limits.
    #[serde(default)]
    pub limits: Limits,
    /// Forward the L4 (TCP/UDP) listeners in the kernel (nftables DNAT, see the `kernel`
    /// module) when their features allow it, in an `ip` table named after this prefix; `None`
    /// relays every L4 connection in user space.
    #[serde(default)]
    pub kernel_l4: Option<String>,
}

impl LbConfig {
    /// A config with one listener and one round-robin pool; handy for tests and benches.
    pub fn simple(name: &str, listener: ListenerConfig, backends: Vec<SocketAddr>) -> Self {
        Self {
            name: name.to_string(),
            listeners: vec![listener],
            pools: vec![PoolConfig {
                name: "default".into(),
                backends: backends
                    .into_iter()
                    .enumerate()
                    .map(|(i, addr)| BackendConfig {
                        name: format!("b{i}"),
                        addr,
                        weight: 1,
                    })
                    .collect(),
                algorithm: Algorithm::RoundRobin,
                hash_header: None,
            }],
            routes: Vec::new(),
            health_check: None,
            outlier: OutlierConfig::default(),
            sticky_cookie: None,
            cache: None,
            tls: None,
            limits: Limits::default(),
            kernel_l4: None,
        }
    }

    /// Refuse a configuration the runtime cannot serve.
    pub fn check(&self) -> Result<(), LbError> {
        let bad = |m: String| Err(LbError::Config(m));
        if self.pools.is_empty() {
            return bad("at least one backend pool is required".into());
        }
        for (i, p) in self.pools.iter().enumerate() {
            if self.pools[..i].iter().any(|q| q.name == p.name) {
                return bad(format!("duplicate pool {:?}", p.name));
            }
            if p.backends
                .iter()
                .any(|b| b.weight == 0 || b.weight > 10_000)
            {
                return bad(format!(
                    "pool {:?}: backend weights must be 1..=10000",
                    p.name
                ));
            }
        }
        for r in &self.routes {
            if !self.pools.iter().any(|p| p.name == r.pool) {
                return bad(format!("route refers to unknown pool {:?}", r.pool));
            }
            r.matcher.check().map_err(LbError::Config)?;
        }
        let mut seen = std::collections::HashSet::new();
        for l in &self.listeners {
            let udp = l.protocol == Protocol::Udp;
            if l.port != 0 && !seen.insert((l.port, udp)) {
                return bad(format!("port {} is used twice", l.port));
            }
            if l.protocol == Protocol::Https && self.tls.is_none() {
                return bad("an https listener needs a TLS certificate and key".into());
            }
        }
        if let Some(h) = &self.health_check {
            if h.interval_ms == 0 || h.timeout_ms == 0 {
                return bad("health check interval and timeout must be positive".into());
            }
            if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
                return bad("health check thresholds must be at least 1".into());
            }
        }
        if let Some(tls) = &self.tls {
            crate::tls::server_config(tls)?;
        }
        if let Some(p) = &self.kernel_l4 {
            if p.is_empty()
                || p.len() > 40
                || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return bad(format!(
                    "kernel_l4 table prefix {p:?} must be 1-40 letters, digits or '_'"
                ));
            }
        }
        Ok(())
    }
}
