//! nimbus load-balancer data plane.
//!
//! A [`LoadBalancer`] serves one [`LbConfig`]: L7 HTTP/1.1 + HTTP/2 reverse proxy (optionally
//! over TLS 1.3), L4 TCP and UDP proxies, active health checks and passive outlier ejection, an
//! opt-in edge cache and Prometheus metrics. [`LoadBalancer::update`] swaps the configuration
//! atomically (arc-swap): established client connections stay open and pick up the new routes
//! and backends on their next request; removed backends drain.
//!
//! The pure parts ([`balancer`], [`routing`], [`health`], [`cache`]) are unit-tested alone; the
//! runtime is tested over real sockets in `tests/`.

pub mod backend;
pub mod balancer;
pub mod cache;
pub mod config;
mod conntrack;
mod fast;
mod h1;
pub mod health;
mod http;
mod kernel;
pub mod kernel_sync;
mod l4;
pub mod metrics;
pub mod routing;
mod runtime;
mod splice;
pub mod tls;
mod upstream;
pub mod workers;

pub use backend::BackendStatus;
pub use balancer::Algorithm;
pub use config::{
    BackendConfig, CacheConfig, HealthCheckConfig, HealthProbe, LbConfig, Limits, ListenerConfig,
    OutlierConfig, PoolConfig, Protocol, RouteConfig, TlsConfig,
};
pub use metrics::Metrics;
pub use routing::{HeaderMatch, RouteMatch};
pub use runtime::LoadBalancer;

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// The configuration cannot be served.
    #[error("invalid load balancer config: {0}")]
    Config(String),
    /// The TLS certificate or key is unusable.
    #[error("tls: {0}")]
    Tls(String),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}
