//! The load-balancer data plane on a node: runs one [`nimbus_lb::LoadBalancer`] per LB listener
//! from the node's LB assignments, and reports backend health back to the control plane.
//!
//! Each reconcile hot-swaps the configs that changed: a backend that stays keeps its state, a
//! new one is probed at once and enters the rotation on its first passed probe (at once without
//! a health check), a removed one drains. A listener that fails to start or update (a port
//! still held, say) is retried in the background (250 ms, doubling to 5 s) until it works or
//! the assignment changes, not only at the next assignment change.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use nimbus_api::agent::{LbAssignment, LbResolvedBackend};
use nimbus_api::lb::{LbBackendHealth, LbProtocol};
use nimbus_lb::{
    Algorithm, BackendConfig, CacheConfig, HeaderMatch, HealthCheckConfig, HealthProbe, LbConfig,
    Limits, ListenerConfig, LoadBalancer, Metrics, OutlierConfig, PoolConfig, Protocol,
    RouteConfig, RouteMatch, TlsConfig,
};

/// Key of one running data-plane instance: LB id, port, and whether it is UDP.
type Key = (String, u32, bool);

struct Running {
    lb: LoadBalancer,
    cfg: LbConfig,
}

/// What the host serves and what it was last asked to serve.
#[derive(Default)]
struct Served {
    running: HashMap<Key, Running>,
    want: HashMap<Key, LbConfig>,
    kernel_l4: Option<String>,
    /// The prefix whose stale in-kernel tables were last removed.
    swept: Option<String>,
    /// A retry task is converging `want` (some listener failed).
    retrying: bool,
}

/// The LBs this node serves.
pub struct LbHost {
    metrics: Arc<Metrics>,
    bind: Vec<IpAddr>,
    served: tokio::sync::Mutex<Served>,
}

/// First and longest delay between retries of a listener that failed to start or update.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

fn protocol(p: LbProtocol) -> Protocol {
    match p {
        LbProtocol::Tcp => Protocol::Tcp,
        LbProtocol::Udp => Protocol::Udp,
        LbProtocol::Http => Protocol::Http,
        LbProtocol::Https => Protocol::Https,
    }
}

fn pool(name: &str, backends: &[LbResolvedBackend], port: u16, a: &LbAssignment) -> PoolConfig {
    PoolConfig {
        name: name.to_string(),
        backends: backends
            .iter()
            .filter_map(|b| {
                Some(BackendConfig {
                    name: b.instance.clone(),
                    addr: SocketAddr::new(b.ip.parse().ok()?, port),
                    weight: b.weight.max(1),
                })
            })
            .collect(),
        algorithm: Algorithm::parse(&a.spec.algorithm).unwrap_or_default(),
        hash_header: a.spec.hash_header.clone(),
    }
}

/// The data-plane config of one listener of an assigned LB; `kernel_l4` is the table prefix of
/// the in-kernel L4 path (`None`: L4 relayed in user space).
pub fn listener_config(
    a: &LbAssignment,
    idx: usize,
    bind: &[IpAddr],
    kernel_l4: Option<&str>,
) -> LbConfig {
    let l = a.spec.listeners[idx];
    let target = l.target_port.unwrap_or(l.port) as u16;
    let mut pools = vec![pool("default", &a.backends, target, a)];
    let mut routes = Vec::new();
    for (i, r) in a.spec.routes.iter().enumerate() {
        let name = format!("route{i}");
        let empty = Vec::new();
        pools.push(pool(
            &name,
            a.route_backends.get(i).unwrap_or(&empty),
            target,
            a,
        ));
        routes.push(RouteConfig {
            matcher: RouteMatch {
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                header: r.header.as_deref().and_then(|h| {
                    h.split_once('=').map(|(n, v)| HeaderMatch {
                        name: n.to_ascii_lowercase(),
                        value: v.to_string(),
                    })
                }),
            },
            pool: name,
        });
    }
    let l7 = matches!(l.protocol, LbProtocol::Http | LbProtocol::Https);
    LbConfig {
        name: format!("{}/{}:{}", a.project, a.name, l.port),
        listeners: vec![ListenerConfig {
            protocol: protocol(l.protocol),
            port: l.port as u16,
            bind: bind.to_vec(),
        }],
        pools,
        routes: if l7 { routes } else { Vec::new() },
        health_check: a.spec.health_check.as_ref().map(|h| HealthCheckConfig {
            probe: if h.kind == "http" {
                HealthProbe::Http {
                    path: h.path.clone().unwrap_or_else(|| "/".into()),
                    expect_status: h.expect_status,
                }
            } else {
                HealthProbe::Tcp
            },
            interval_ms: h.interval_ms,
            timeout_ms: h.timeout_ms,
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
        }),
        outlier: OutlierConfig::default(),
        sticky_cookie: if l7 {
            a.spec.sticky_cookie.clone()
        } else {
            None
        },
        cache: (l7 && a.spec.cache).then(CacheConfig::default),
        tls: (l.protocol == LbProtocol::Https)
            .then_some(a.spec.tls.as_ref())
            .flatten()
            .map(|t| TlsConfig {
                cert_pem: t.cert_pem.clone(),
                key_pem: t.key_pem.clone(),
                cipher_suites: Vec::new(),
            }),
        limits: Limits::default(),
        kernel_l4: kernel_l4.map(str::to_string),
    }
}

impl LbHost {
    /// A host exporting into `metrics`, binding listeners on `bind` (empty: all addresses).
    pub fn new(metrics: Arc<Metrics>, bind: Vec<IpAddr>) -> Self {
        Self {
            metrics,
            bind,
            served: tokio::sync::Mutex::new(Served::default()),
        }
    }

    /// The metrics registry (the agent serves it on `/metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Converge the running LBs to the assignments: start new listeners, hot-swap changed
    /// configs, stop removed ones. `kernel_l4`: the nftables table prefix under which eligible
    /// L4 listeners are forwarded in the kernel (`None`: no datapath on this node); in-kernel
    /// tables under it that belong to no running LB are deleted (on the first reconcile and
    /// whenever an LB stopped). What fails is retried in the background.
    pub async fn reconcile(self: &Arc<Self>, assigned: &[LbAssignment], kernel_l4: Option<&str>) {
        let mut want: HashMap<Key, LbConfig> = HashMap::new();
        for a in assigned {
            for (i, l) in a.spec.listeners.iter().enumerate() {
                want.insert(
                    (a.id.clone(), l.port, l.protocol == LbProtocol::Udp),
                    listener_config(a, i, &self.bind, kernel_l4),
                );
            }
        }
        let mut served = self.served.lock().await;
        served.want = want;
        served.kernel_l4 = kernel_l4.map(str::to_string);
        if self.converge(&mut served).await && !served.retrying {
            served.retrying = true;
            tokio::spawn(Arc::clone(self).retry());
        }
    }

    /// Converge until nothing fails, backing off.
    async fn retry(self: Arc<Self>) {
        let mut delay = RETRY_FIRST;
        loop {
            tokio::time::sleep(delay).await;
            let mut served = self.served.lock().await;
            if !self.converge(&mut served).await {
                served.retrying = false;
                return;
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// One pass towards `served.want`; true if some listener failed.
    async fn converge(&self, served: &mut Served) -> bool {
        let gone: Vec<Key> = served
            .running
            .keys()
            .filter(|k| !served.want.contains_key(*k))
            .cloned()
            .collect();
        let stopped = !gone.is_empty();
        for k in gone {
            if let Some(r) = served.running.remove(&k) {
                r.lb.shutdown();
            }
        }
        let mut failed = false;
        for (k, cfg) in &served.want {
            match served.running.get_mut(k) {
                Some(r) if &r.cfg == cfg => {}
                Some(r) => match r.lb.update(cfg.clone()).await {
                    Ok(()) => {
                        tracing::info!(lb = %cfg.name, "load balancer updated");
                        r.cfg = cfg.clone();
                    }
                    Err(e) => {
                        failed = true;
                        tracing::error!(lb = %cfg.name, "load balancer update failed: {e}");
                    }
                },
                None => match LoadBalancer::start(cfg.clone(), Arc::clone(&self.metrics)).await {
                    Ok(lb) => {
                        tracing::info!(lb = %cfg.name, addrs = ?lb.listen_addrs(), "load balancer started");
                        served.running.insert(
                            k.clone(),
                            Running {
                                lb,
                                cfg: cfg.clone(),
                            },
                        );
                    }
                    Err(e) => {
                        failed = true;
                        tracing::error!(lb = %cfg.name, "load balancer failed to start: {e}");
                    }
                },
            }
        }
        if let Some(prefix) = served.kernel_l4.clone() {
            if stopped || served.swept.as_deref() != Some(prefix.as_str()) {
                let keep: Vec<String> = served
                    .running
                    .values()
                    .filter_map(|r| r.lb.kernel_table().map(str::to_string))
                    .collect();
                for t in nimbus_lb::kernel_sync::remove_stale_tables(&prefix, &keep).await {
                    tracing::info!(table = %t, "removed a stale in-kernel L4 table");
                }
                served.swept = Some(prefix);
            }
        }
        failed
    }

    /// Backend health per LB id: a backend is healthy if every listener of the LB sees it
    /// healthy and not ejected.
    pub async fn health(&self) -> BTreeMap<String, Vec<LbBackendHealth>> {
        let served = self.served.lock().await;
        let mut out: BTreeMap<String, BTreeMap<String, LbBackendHealth>> = BTreeMap::new();
        for ((id, _, _), r) in &served.running {
            let entry = out.entry(id.clone()).or_default();
            for b in r.lb.backends().into_iter().filter(|b| !b.draining) {
                let ok = b.healthy && !b.ejected;
                entry
                    .entry(b.name.clone())
                    .and_modify(|h| h.healthy &= ok)
                    .or_insert(LbBackendHealth {
                        instance: b.name,
                        address: b.addr.to_string(),
                        healthy: ok,
                        node: String::new(),
                    });
            }
        }
        out.into_iter()
            .map(|(id, m)| (id, m.into_values().collect()))
            .collect()
    }

    /// Stop every LB.
    pub async fn shutdown(&self) {
        for (_, r) in self.served.lock().await.running.drain() {
            r.lb.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use nimbus_api::lb::{LbBackends, LbListener, LoadBalancerSpec};

    use super::*;

    fn assignment(port: u16) -> LbAssignment {
        LbAssignment {
            id: "lb-1".into(),
            project: "default".into(),
            name: "web".into(),
            version: 1,
            spec: LoadBalancerSpec {
                listeners: vec![LbListener {
                    port: u32::from(port),
                    protocol: LbProtocol::Http,
                    target_port: Some(9),
                }],
                backends: LbBackends::default(),
                algorithm: "round_robin".into(),
                hash_header: None,
                health_check: None,
                routes: Vec::new(),
                sticky_cookie: None,
                tls: None,
                cache: false,
                vip: None,
                vip_nodes: Vec::new(),
                nodes: Vec::new(),
                replicas: None,
            },
            backends: vec![LbResolvedBackend {
                instance: "i1".into(),
                ip: "127.0.0.1".into(),
                weight: 1,
            }],
            route_backends: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_listener_that_cannot_bind_is_retried_until_it_can() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        // Held without SO_REUSEPORT: the LB's listener cannot bind next to it.
        let holder = std::net::TcpListener::bind((lo, 0)).unwrap();
        let port = holder.local_addr().unwrap().port();
        let host = Arc::new(LbHost::new(Arc::new(Metrics::new()), vec![lo]));
        host.reconcile(&[assignment(port)], None).await;
        assert!(host.health().await.is_empty(), "started on a taken port");
        drop(holder);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while host.health().await.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the listener was not retried"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(tokio::net::TcpStream::connect((lo, port)).await.is_ok());
        assert!(!host.served.lock().await.retrying, "the retry ended");
        // Removing the assignment stops it.
        host.reconcile(&[], None).await;
        assert!(host.health().await.is_empty());
        host.shutdown().await;
    }
}
