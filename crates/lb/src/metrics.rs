//! Prometheus metrics of the data plane, per load balancer and backend.
//!
//! One [`Metrics`] is shared by every LB of a process (the agent exports it on its `/metrics`).
//! The hot path touches only pre-resolved handles ([`BackendMetrics`]), i.e. atomics.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    lb: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    lb: String,
    backend: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    lb: String,
    backend: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LbLabels {
    lb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    lb: String,
    result: String,
}

type HistFamily = Family<BackendLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The registry and metric families of the data plane.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    active: Family<BackendLabels, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    latency: HistFamily,
    healthy: Family<BackendLabels, Gauge>,
    connections: Family<LbLabels, Gauge>,
    cache: Family<CacheLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The status classes counted.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Pre-resolved handles for one backend of one LB.
#[derive(Clone, Debug)]
pub struct BackendMetrics {
    /// Requests by status class (index = class - 1).
    pub requests: [Counter; 5],
    /// In-flight requests (L7) or open connections (L4).
    pub active: Gauge,
    /// Bytes sent to the backend.
    pub bytes_to_backend: Counter,
    /// Bytes received from the backend.
    pub bytes_from_backend: Counter,
    /// Time to response headers (L7) or connection duration (L4), seconds.
    pub latency: Histogram,
    /// 1 when healthy, 0 when not.
    pub healthy: Gauge,
}

impl BackendMetrics {
    /// Count a response status.
    pub fn count_status(&self, status: u16) {
        let i = (usize::from(status / 100)).clamp(1, 5) - 1;
        self.requests[i].inc();
    }
}

/// Cache counters of one LB.
#[derive(Clone, Debug)]
pub struct CacheMetrics {
    /// Served from the cache without contacting a backend.
    pub hit: Counter,
    /// Not in the cache (or not cacheable).
    pub miss: Counter,
    /// Stale entry confirmed by the backend with a 304.
    pub revalidated: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nimbus_lb");
        let requests = Family::<RequestLabels, Counter>::default();
        let active = Family::<BackendLabels, Gauge>::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let latency: HistFamily = Family::new_with_constructor(latency_histogram);
        let healthy = Family::<BackendLabels, Gauge>::default();
        let connections = Family::<LbLabels, Gauge>::default();
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests (L7) or connections (L4) by backend and status class",
            requests.clone(),
        );
        registry.register(
            "backend_active",
            "In-flight requests (L7) or open connections (L4) per backend",
            active.clone(),
        );
        registry.register("bytes", "Bytes to and from each backend", bytes.clone());
        registry.register(
            "latency_seconds",
            "Time to backend response headers (L7) or connection lifetime (L4)",
            latency.clone(),
        );
        registry.register(
            "backend_healthy",
            "1 if the backend passes its health checks and is not ejected",
            healthy.clone(),
        );
        registry.register(
            "client_connections",
            "Open client connections per load balancer",
            connections.clone(),
        );
        registry.register(
            "cache_requests",
            "Edge cache lookups by result (hit, miss, revalidated)",
            cache.clone(),
        );
        Self {
            registry,
            requests,
            active,
            bytes,
            latency,
            healthy,
            connections,
            cache,
        }
    }

    /// Handles for one backend (`backend` is its name; "cache" and "none" are used for cache
    /// hits and for requests no backend answered).
    pub fn backend(&self, lb: &str, backend: &str) -> BackendMetrics {
        let bl = BackendLabels {
            lb: lb.into(),
            backend: backend.into(),
        };
        let req = |class: &str| {
            self.requests
                .get_or_create(&RequestLabels {
                    lb: lb.into(),
                    backend: backend.into(),
                    class: class.into(),
                })
                .clone()
        };
        let bytes = |direction: &str| {
            self.bytes
                .get_or_create(&BytesLabels {
                    lb: lb.into(),
                    backend: backend.into(),
                    direction: direction.into(),
                })
                .clone()
        };
        BackendMetrics {
            requests: CLASSES.map(req),
            active: self.active.get_or_create(&bl).clone(),
            bytes_to_backend: bytes("to_backend"),
            bytes_from_backend: bytes("from_backend"),
            latency: self.latency.get_or_create(&bl).clone(),
            healthy: self.healthy.get_or_create(&bl).clone(),
        }
    }

    /// Drop a removed backend's series.
    pub fn remove_backend(&self, lb: &str, backend: &str) {
        let bl = BackendLabels {
            lb: lb.into(),
            backend: backend.into(),
        };
        for class in CLASSES {
            self.requests.remove(&RequestLabels {
                lb: lb.into(),
                backend: backend.into(),
                class: class.into(),
            });
        }
        for direction in ["to_backend", "from_backend"] {
            self.bytes.remove(&BytesLabels {
                lb: lb.into(),
                backend: backend.into(),
                direction: direction.into(),
            });
        }
        self.active.remove(&bl);
        self.latency.remove(&bl);
        self.healthy.remove(&bl);
    }

    /// Open client connections gauge of an LB.
    pub fn connections(&self, lb: &str) -> Gauge {
        self.connections
            .get_or_create(&LbLabels { lb: lb.into() })
            .clone()
    }

    /// Cache counters of an LB.
    pub fn cache(&self, lb: &str) -> CacheMetrics {
        let c = |result: &str| {
            self.cache
                .get_or_create(&CacheLabels {
                    lb: lb.into(),
                    result: result.into(),
                })
                .clone()
        };
        CacheMetrics {
            hit: c("hit"),
            miss: c("miss"),
            revalidated: c("revalidated"),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A shareable handle.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_appear_and_disappear() {
        let m = Metrics::new();
        let b = m.backend("web", "i-1");
        b.count_status(200);
        b.count_status(503);
        b.healthy.set(1);
        m.cache("web").hit.inc();
        let text = m.encode();
        assert!(
            text.contains("nimbus_lb_requests_total{lb=\"web\",backend=\"i-1\",class=\"2xx\"} 1")
        );
        assert!(
            text.contains("nimbus_lb_requests_total{lb=\"web\",backend=\"i-1\",class=\"5xx\"} 1")
        );
        assert!(text.contains("nimbus_lb_backend_healthy{lb=\"web\",backend=\"i-1\"} 1"));
        assert!(text.contains("nimbus_lb_cache_requests_total{lb=\"web\",result=\"hit\"} 1"));
        m.remove_backend("web", "i-1");
        assert!(!m.encode().contains("backend=\"i-1\""));
    }
}
