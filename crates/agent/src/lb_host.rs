//! The load-balancer data plane on a node: runs one [`nimbus_lb::LoadBalancer`] per LB listener
//! from the node's LB assignments, and reports backend health back to the control plane.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

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

/// The LBs this node serves.
pub struct LbHost {
    metrics: Arc<Metrics>,
    bind: Vec<IpAddr>,
    running: tokio::sync::Mutex<HashMap<Key, Running>>,
}

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
            running: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The metrics registry (the agent serves it on `/metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Converge the running LBs to the assignments: start new listeners, hot-swap changed
    /// configs, stop removed ones. `kernel_l4`: the nftables table prefix under which eligible
    /// L4 listeners are forwarded in the kernel (`None`: no datapath on this node); in-kernel
    /// tables under it that belong to no running LB are deleted.
    pub async fn reconcile(&self, assigned: &[LbAssignment], kernel_l4: Option<&str>) {
        let mut want: HashMap<Key, LbConfig> = HashMap::new();
        for a in assigned {
            for (i, l) in a.spec.listeners.iter().enumerate() {
                want.insert(
                    (a.id.clone(), l.port, l.protocol == LbProtocol::Udp),
                    listener_config(a, i, &self.bind, kernel_l4),
                );
            }
        }
        let mut running = self.running.lock().await;
        let gone: Vec<Key> = running
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(r) = running.remove(&k) {
                r.lb.shutdown();
            }
        }
        for (k, cfg) in want {
            match running.get_mut(&k) {
                Some(r) if r.cfg == cfg => {}
                Some(r) => match r.lb.update(cfg.clone()).await {
                    Ok(()) => {
                        tracing::info!(lb = %cfg.name, "load balancer updated");
                        r.cfg = cfg;
                    }
                    Err(e) => tracing::error!(lb = %cfg.name, "load balancer update failed: {e}"),
                },
                None => match LoadBalancer::start(cfg.clone(), Arc::clone(&self.metrics)).await {
                    Ok(lb) => {
                        tracing::info!(lb = %cfg.name, addrs = ?lb.listen_addrs(), "load balancer started");
                        running.insert(k, Running { lb, cfg });
                    }
                    Err(e) => tracing::error!(lb = %cfg.name, "load balancer failed to start: {e}"),
                },
            }
        }
        if let Some(prefix) = kernel_l4 {
            let keep: Vec<String> = running
                .values()
                .filter_map(|r| r.lb.kernel_table().map(str::to_string))
                .collect();
            for t in nimbus_lb::kernel_sync::remove_stale_tables(prefix, &keep).await {
                tracing::info!(table = %t, "removed a stale in-kernel L4 table");
            }
        }
    }

    /// Backend health per LB id: a backend is healthy if every listener of the LB sees it
    /// healthy and not ejected.
    pub async fn health(&self) -> BTreeMap<String, Vec<LbBackendHealth>> {
        let running = self.running.lock().await;
        let mut out: BTreeMap<String, BTreeMap<String, LbBackendHealth>> = BTreeMap::new();
        for ((id, _, _), r) in running.iter() {
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
        for (_, r) in self.running.lock().await.drain() {
            r.lb.shutdown();
        }
    }
}
