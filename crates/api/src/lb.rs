//! Load balancers: the resource, its request bodies and their validation.
//!
//! Validation of every LB input lives here (next to `validate.rs`, which covers the other
//! resources): listeners, algorithm, backends, health check, routes and TLS material (the key
//! must match the certificate, which must be valid now).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ApiError, Meta};

/// Listener protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LbProtocol {
    /// L4 TCP.
    Tcp,
    /// L4 UDP.
    Udp,
    /// L7 HTTP/1.1 and HTTP/2.
    Http,
    /// L7 over TLS 1.3.
    Https,
}

impl LbProtocol {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// A listening port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbListener {
    /// Port (1-65535).
    pub port: u32,
    /// Protocol.
    pub protocol: LbProtocol,
    /// Port on the backends (default: the same as `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// An explicitly named backend instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbInstanceRef {
    /// Instance name.
    pub name: String,
    /// Weight (1-10000, default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Which instances are the backends: exactly one selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbBackends {
    /// Instances with this label, `key=value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Instances of this group (their spread group, until scaling groups exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Explicit instances with weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<LbInstanceRef>,
}

/// Active health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbHealthCheck {
    /// `tcp` (connect) or `http` (GET `path`, expect `expect_status`).
    pub kind: String,
    /// HTTP path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Expected HTTP status (default 200).
    #[serde(default = "ok_status")]
    pub expect_status: u16,
    /// Probe interval, ms (default 2000).
    #[serde(default = "interval")]
    pub interval_ms: u64,
    /// Probe timeout, ms (default 1000).
    #[serde(default = "timeout")]
    pub timeout_ms: u64,
    /// Successes to become healthy (default 2).
    #[serde(default = "two")]
    pub healthy_threshold: u32,
    /// Failures to become unhealthy (default 3).
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
}

fn ok_status() -> u16 {
    200
}
fn interval() -> u64 {
    2000
}
fn timeout() -> u64 {
    1000
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}

impl Default for LbHealthCheck {
    fn default() -> Self {
        Self {
            kind: "tcp".into(),
            path: None,
            expect_status: 200,
            interval_ms: 2000,
            timeout_ms: 1000,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// An L7 routing rule: matching requests go to `backends` instead of the LB's backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbRoute {
    /// Host, exact or `*.suffix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix starting with `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Header equality, `Name=value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Backends for matching requests.
    pub backends: LbBackends,
}

/// TLS certificate chain and key (PEM) for `https` listeners.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbTls {
    /// Certificate chain, PEM, leaf first.
    pub cert_pem: String,
    /// Private key, PEM, inline. Accepted for compatibility: the server stores it as the
    /// secret `<lb>-tls-key` and the load balancer then names that secret in `key_secret`. Only
    /// the nodes serving the load balancer see it again (in their assignments).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_pem: String,
    /// Name of the secret (in the load balancer's project) that holds the private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<String>,
}

impl std::fmt::Debug for LbTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbTls").finish_non_exhaustive()
    }
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoadBalancerSpec {
    /// Listeners.
    pub listeners: Vec<LbListener>,
    /// Default backends.
    pub backends: LbBackends,
    /// `round_robin`, `least_connections`, `ip_hash`, `consistent_hash`, `weighted`.
    pub algorithm: String,
    /// For `consistent_hash`: the request header to hash (default: the client address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// Active health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<LbHealthCheck>,
    /// L7 routing rules, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<LbRoute>,
    /// Sticky-session cookie name (L7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
    /// TLS for `https` listeners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<LbTls>,
    /// Edge cache for GET/HEAD.
    #[serde(default)]
    pub cache: bool,
    /// Floating virtual IPv4 address: one node at a time (the holder of a lease in the
    /// control plane) carries it on its underlay interface and announces it with gratuitous
    /// ARP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    /// Nodes that may hold the VIP (empty: every node serving the LB).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vip_nodes: Vec<String>,
    /// Nodes the LB may be placed on (empty: any ready, uncordoned node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// How many nodes serve the LB (`None` with no `nodes`: every ready node; `None` with
    /// `nodes`: every ready, uncordoned one of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
}

/// A backend's health as reported by a node running the LB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LbBackendHealth {
    /// Instance name.
    pub instance: String,
    /// `ip:port` the LB connects to.
    pub address: String,
    /// Passes health checks and is not ejected.
    pub healthy: bool,
    /// Node that reported it.
    pub node: String,
}

/// What the platform observed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoadBalancerStatus {
    /// Nodes serving the LB.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Backend health, as last reported.
    #[serde(default)]
    pub backends: Vec<LbBackendHealth>,
    /// The VIP lease, once a node acquired it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<VipLease>,
}

/// Who holds an LB's floating VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VipLease {
    /// The address.
    pub address: String,
    /// Node holding it (`None`: released).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Log time (RFC 3339) the lease was last acquired or renewed.
    pub renewed_at: String,
    /// Log time (RFC 3339) after which another node may take it.
    pub expires_at: String,
}

/// How long a VIP lease lasts after its last renewal, ms (log time).
pub const VIP_LEASE_TTL_MS: u64 = 1_500;
/// How often the holder renews its VIP lease, ms (two renewals may fail before it fences).
pub const VIP_RENEW_MS: u64 = 500;
/// How often the nodes that do not hold a VIP ask for its lease, ms (answered without a Raft
/// write while another node's lease lives).
pub const VIP_ACQUIRE_MS: u64 = 250;

/// `POST /v1/nodes/{name}/vip-lease`: acquire, renew or release the VIP lease of an LB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VipLeaseRequest {
    /// LB project.
    pub project: String,
    /// LB name.
    pub name: String,
    /// The VIP the agent acts on (must be the LB's current VIP).
    pub vip: String,
    /// Give the lease up (only its holder can).
    #[serde(default)]
    pub release: bool,
}

/// The answer to a [`VipLeaseRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VipLeaseResponse {
    /// Whether the asking node holds the lease now.
    pub held: bool,
    /// The lease as it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<VipLease>,
    /// Lease duration after the renewal, ms (the holder drops the address before it ends).
    pub ttl_ms: u64,
}

/// A load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoadBalancer {
    /// Metadata.
    #[serde(flatten)]
    pub meta: Meta,
    /// Desired.
    pub spec: LoadBalancerSpec,
    /// Observed.
    #[serde(default)]
    pub status: LoadBalancerStatus,
}

/// `POST /v1/projects/{project}/loadbalancers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLoadBalancerRequest {
    /// Name (DNS label).
    pub name: String,
    /// Spec.
    pub spec: LoadBalancerSpecRequest,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The spec as sent (algorithm optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerSpecRequest {
    /// Listeners (at least one).
    #[serde(default)]
    pub listeners: Vec<LbListener>,
    /// Default backends.
    #[serde(default)]
    pub backends: LbBackends,
    /// Algorithm (default `round_robin`).
    #[serde(default)]
    pub algorithm: Option<String>,
    /// Hash header for `consistent_hash`.
    #[serde(default)]
    pub hash_header: Option<String>,
    /// Health check.
    #[serde(default)]
    pub health_check: Option<LbHealthCheck>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<LbRoute>,
    /// Sticky cookie.
    #[serde(default)]
    pub sticky_cookie: Option<String>,
    /// TLS.
    #[serde(default)]
    pub tls: Option<LbTls>,
    /// Edge cache.
    #[serde(default)]
    pub cache: bool,
    /// Floating VIP (IPv4).
    #[serde(default)]
    pub vip: Option<String>,
    /// Nodes that may hold the VIP (empty: any node serving the LB).
    #[serde(default)]
    pub vip_nodes: Vec<String>,
    /// Nodes the LB may be placed on (empty: any).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Number of serving nodes (default: all eligible).
    #[serde(default)]
    pub replicas: Option<u32>,
}

/// `PATCH /v1/projects/{project}/loadbalancers/{name}`: replaces the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateLoadBalancerRequest {
    /// New spec.
    pub spec: LoadBalancerSpecRequest,
    /// Expected version.
    #[serde(default)]
    pub version: Option<u64>,
}

/// The algorithms accepted.
pub const ALGORITHMS: [&str; 5] = [
    "round_robin",
    "least_connections",
    "ip_hash",
    "consistent_hash",
    "weighted",
];

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(field, msg)
}

/// Validate a spec request and fill defaults.
pub fn validate_spec(req: &LoadBalancerSpecRequest) -> Result<LoadBalancerSpec, ApiError> {
    if req.listeners.is_empty() {
        return Err(invalid("listeners", "at least one listener is required"));
    }
    for (i, l) in req.listeners.iter().enumerate() {
        if l.port == 0 || l.port > 65_535 {
            return Err(invalid(
                format!("listeners[{i}].port"),
                format!("port {} out of range 1-65535", l.port),
            ));
        }
        if let Some(t) = l.target_port {
            if t == 0 || t > 65_535 {
                return Err(invalid(
                    format!("listeners[{i}].target_port"),
                    format!("target port {t} out of range 1-65535"),
                ));
            }
        }
        let udp = l.protocol == LbProtocol::Udp;
        if req.listeners[..i]
            .iter()
            .any(|o| o.port == l.port && (o.protocol == LbProtocol::Udp) == udp)
        {
            return Err(invalid(
                format!("listeners[{i}].port"),
                format!("port {} is listed twice", l.port),
            ));
        }
    }
    let algorithm = req
        .algorithm
        .clone()
        .unwrap_or_else(|| "round_robin".into());
    if !ALGORITHMS.contains(&algorithm.as_str()) {
        return Err(invalid(
            "algorithm",
            format!(
                "unknown algorithm {algorithm:?}: use one of {}",
                ALGORITHMS.join(", ")
            ),
        ));
    }
    if let Some(h) = &req.hash_header {
        if algorithm != "consistent_hash" {
            return Err(invalid(
                "hash_header",
                "hash_header only applies to algorithm consistent_hash",
            ));
        }
        header_name("hash_header", h)?;
    }
    backends("backends", &req.backends)?;
    if let Some(h) = &req.health_check {
        health_check(h)?;
    }
    let l7 = req
        .listeners
        .iter()
        .any(|l| matches!(l.protocol, LbProtocol::Http | LbProtocol::Https));
    for (i, r) in req.routes.iter().enumerate() {
        route(&format!("routes[{i}]"), r)?;
    }
    if !l7 && (!req.routes.is_empty() || req.cache || req.sticky_cookie.is_some()) {
        return Err(invalid(
            "listeners",
            "routes, cache and sticky sessions need an http or https listener",
        ));
    }
    if let Some(c) = &req.sticky_cookie {
        if c.is_empty()
            || !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid(
                "sticky_cookie",
                format!("invalid cookie name {c:?}"),
            ));
        }
    }
    let https = req
        .listeners
        .iter()
        .any(|l| l.protocol == LbProtocol::Https);
    match (&req.tls, https) {
        (None, true) => {
            return Err(invalid(
                "tls",
                "an https listener needs a certificate and key (--tls-cert, --tls-key)",
            ))
        }
        (Some(_), false) => {
            return Err(invalid(
                "tls",
                "a certificate is only used by https listeners",
            ))
        }
        (Some(t), true) => match (&t.key_secret, t.key_pem.is_empty()) {
            (Some(_), false) | (None, true) => {
                return Err(invalid(
                    "tls",
                    "give the private key either inline (key_pem) or as a secret (key_secret)",
                ))
            }
            // The server checks the secret's key against the certificate (it can open it).
            (Some(s), true) => {
                crate::validate::name("tls.key_secret", s)?;
                crate::lb_tls::check_cert(&t.cert_pem)?;
            }
            (None, false) => crate::lb_tls::check(&t.cert_pem, &t.key_pem)?,
        },
        (None, false) => {}
    }
    Ok(LoadBalancerSpec {
        listeners: req.listeners.clone(),
        backends: req.backends.clone(),
        algorithm,
        hash_header: req.hash_header.clone(),
        health_check: req.health_check.clone(),
        routes: req.routes.clone(),
        sticky_cookie: req.sticky_cookie.clone(),
        tls: req.tls.clone(),
        cache: req.cache,
        vip: req.vip.as_deref().map(vip).transpose()?,
        vip_nodes: vip_nodes(req)?,
        nodes: crate::lb_place::nodes(req)?,
        replicas: crate::lb_place::replicas(req)?,
    })
}

/// Validate a VIP: a unicast IPv4 address (not unspecified, loopback, multicast or
/// broadcast); returns its canonical form.
pub fn vip(v: &str) -> Result<String, ApiError> {
    let a: std::net::Ipv4Addr = v.parse().map_err(|_| {
        invalid(
            "vip",
            format!("invalid VIP {v:?}: expected an IPv4 address such as 192.168.1.50"),
        )
    })?;
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
        return Err(invalid(
            "vip",
            format!("VIP {a} is not a unicast address a node can carry"),
        ));
    }
    Ok(a.to_string())
}

fn vip_nodes(req: &LoadBalancerSpecRequest) -> Result<Vec<String>, ApiError> {
    if !req.vip_nodes.is_empty() && req.vip.is_none() {
        return Err(invalid("vip_nodes", "vip_nodes needs a vip"));
    }
    for (i, n) in req.vip_nodes.iter().enumerate() {
        crate::validate::name(&format!("vip_nodes[{i}]"), n)?;
        if req.vip_nodes[..i].contains(n) {
            return Err(invalid(
                format!("vip_nodes[{i}]"),
                format!("node {n:?} is listed twice"),
            ));
        }
    }
    Ok(req.vip_nodes.clone())
}

fn header_name(field: &str, h: &str) -> Result<(), ApiError> {
    if h.is_empty()
        || !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return Err(invalid(field, format!("invalid header name {h:?}")));
    }
    Ok(())
}

/// Validate a backend selector: exactly one of label, group, instances.
pub fn backends(field: &str, b: &LbBackends) -> Result<(), ApiError> {
    let n = usize::from(b.label.is_some())
        + usize::from(b.group.is_some())
        + usize::from(!b.instances.is_empty());
    if n != 1 {
        return Err(invalid(
            field,
            "give exactly one of a backend label (K=V), a backend group or backend instances",
        ));
    }
    if let Some(l) = &b.label {
        let Some((k, v)) = l.split_once('=') else {
            return Err(invalid(
                format!("{field}.label"),
                format!("invalid label selector {l:?}: expected KEY=VALUE"),
            ));
        };
        crate::validate::label(k, v).map_err(|e| invalid(format!("{field}.label"), e.message))?;
    }
    if let Some(g) = &b.group {
        crate::validate::name(&format!("{field}.group"), g)?;
    }
    for (i, r) in b.instances.iter().enumerate() {
        crate::validate::name(&format!("{field}.instances[{i}].name"), &r.name)?;
        if r.weight == 0 || r.weight > 10_000 {
            return Err(invalid(
                format!("{field}.instances[{i}].weight"),
                format!("weight {} out of range 1-10000", r.weight),
            ));
        }
    }
    Ok(())
}

fn health_check(h: &LbHealthCheck) -> Result<(), ApiError> {
    match h.kind.as_str() {
        "tcp" => {}
        "http" => {
            let p = h.path.as_deref().unwrap_or("/");
            if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(invalid(
                    "health_check.path",
                    format!("invalid health check path {p:?}"),
                ));
            }
            if !(100..=599).contains(&h.expect_status) {
                return Err(invalid(
                    "health_check.expect_status",
                    format!("status {} out of range 100-599", h.expect_status),
                ));
            }
        }
        k => {
            return Err(invalid(
                "health_check.kind",
                format!("unknown health check {k:?}: use tcp or http"),
            ))
        }
    }
    if !(50..=300_000).contains(&h.interval_ms) {
        return Err(invalid(
            "health_check.interval_ms",
            "interval must be 50 ms to 300 s",
        ));
    }
    if h.timeout_ms == 0 || h.timeout_ms > h.interval_ms.max(1000) * 10 {
        return Err(invalid("health_check.timeout_ms", "timeout out of range"));
    }
    for (f, v) in [
        ("healthy_threshold", h.healthy_threshold),
        ("unhealthy_threshold", h.unhealthy_threshold),
    ] {
        if !(1..=100).contains(&v) {
            return Err(invalid(
                format!("health_check.{f}"),
                format!("{f} must be 1-100"),
            ));
        }
    }
    Ok(())
}

fn route(field: &str, r: &LbRoute) -> Result<(), ApiError> {
    if r.host.is_none() && r.path_prefix.is_none() && r.header.is_none() {
        return Err(invalid(
            field,
            "a route needs a host, path prefix or header",
        ));
    }
    if let Some(h) = &r.host {
        let name = h.strip_prefix("*.").unwrap_or(h);
        let ok = h.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(invalid(
                format!("{field}.host"),
                format!("invalid host pattern {h:?}: a host name, optionally starting with '*.'"),
            ));
        }
    }
    if let Some(p) = &r.path_prefix {
        if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(invalid(
                format!("{field}.path_prefix"),
                format!("invalid path prefix {p:?}: must start with '/' and contain no spaces"),
            ));
        }
    }
    if let Some(h) = &r.header {
        let Some((n, v)) = h.split_once('=') else {
            return Err(invalid(
                format!("{field}.header"),
                format!("invalid header rule {h:?}: expected Name=value"),
            ));
        };
        header_name(&format!("{field}.header"), n)?;
        if v.bytes().any(|b| b < 0x20 && b != b'\t') {
            return Err(invalid(format!("{field}.header"), "invalid header value"));
        }
    }
    backends(&format!("{field}.backends"), &r.backends)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid request: one HTTP listener on port 80 in front of group `web`.
    pub(crate) fn base() -> LoadBalancerSpecRequest {
        LoadBalancerSpecRequest {
            listeners: vec![LbListener {
                port: 80,
                protocol: LbProtocol::Http,
                target_port: None,
            }],
            backends: LbBackends {
                group: Some("web".into()),
                ..LbBackends::default()
            },
            ..LoadBalancerSpecRequest::default()
        }
    }

    /// The field named by the error `r` is rejected with.
    pub(crate) fn field(r: &LoadBalancerSpecRequest) -> String {
        validate_spec(r).unwrap_err().field.unwrap_or_default()
    }

    #[test]
    fn vip_validation() {
        let mut r = base();
        r.vip = Some("10.0.0.50".into());
        r.vip_nodes = vec!["n1".into(), "n2".into()];
        let s = validate_spec(&r).unwrap();
        assert_eq!(s.vip.as_deref(), Some("10.0.0.50"));
        assert_eq!(s.vip_nodes, ["n1", "n2"]);
        for bad in [
            "",
            "10.0.0",
            "::1",
            "fe80::1",
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
        ] {
            let mut r = base();
            r.vip = Some(bad.into());
            assert_eq!(field(&r), "vip", "{bad}");
        }
        let mut r = base();
        r.vip_nodes = vec!["n1".into()];
        assert_eq!(field(&r), "vip_nodes");
        let mut r = base();
        r.vip = Some("10.0.0.50".into());
        r.vip_nodes = vec!["n1".into(), "n1".into()];
        assert_eq!(field(&r), "vip_nodes[1]");
        r.vip_nodes = vec!["Bad Name".into()];
        assert_eq!(field(&r), "vip_nodes[0]");
    }

    #[test]
    fn defaults_and_bad_inputs() {
        let s = validate_spec(&base()).unwrap();
        assert_eq!(s.algorithm, "round_robin");
        let mut r = base();
        r.algorithm = Some("random".into());
        assert_eq!(field(&r), "algorithm");
        let mut r = base();
        r.listeners[0].port = 70_000;
        assert_eq!(field(&r), "listeners[0].port");
        let mut r = base();
        r.listeners[0].port = 0;
        assert_eq!(field(&r), "listeners[0].port");
        let mut r = base();
        r.listeners.push(r.listeners[0]);
        assert_eq!(field(&r), "listeners[1].port");
        let mut r = base();
        r.listeners = vec![];
        assert_eq!(field(&r), "listeners");
        let mut r = base();
        r.backends.label = Some("a=b".into());
        assert_eq!(field(&r), "backends");
        let mut r = base();
        r.backends = LbBackends {
            label: Some("nolabel".into()),
            ..LbBackends::default()
        };
        assert_eq!(field(&r), "backends.label");
        let mut r = base();
        r.routes.push(LbRoute {
            host: Some("a..b".into()),
            path_prefix: None,
            header: None,
            backends: base().backends,
        });
        assert_eq!(field(&r), "routes[0].host");
        r.routes[0].host = None;
        r.routes[0].path_prefix = Some("api".into());
        assert_eq!(field(&r), "routes[0].path_prefix");
        let mut r = base();
        r.health_check = Some(LbHealthCheck {
            kind: "icmp".into(),
            ..LbHealthCheck::default()
        });
        assert_eq!(field(&r), "health_check.kind");
        let mut r = base();
        r.listeners[0].protocol = LbProtocol::Https;
        assert_eq!(field(&r), "tls");
        let mut r = base();
        r.listeners[0].protocol = LbProtocol::Tcp;
        r.cache = true;
        assert_eq!(field(&r), "listeners");
    }
}
