//! The running load balancer: listeners, the swappable snapshot, backend lifecycle.
//!
//! Backends are kept by address across updates while their address stays in the
//! configuration under the same name (with their health state and in-flight count); a new one
//! starts pending when a health check will probe it (its first probe runs at once) and healthy
//! otherwise; a removed one drains (no new traffic, its L4 connections closed after the drain
//! timeout), also when a new backend took over its address. A request that finds no available
//! backend while one awaits its first probe waits for that probe (at most 300 ms) rather than
//! fail. [`LoadBalancer::update`] returns once the in-kernel L4 table, if any, reflects the
//! new configuration.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderName;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::{bump, Backend, BackendStatus, Changes};
use crate::balancer::{Balancer, Candidate, PickContext};
use crate::cache::CacheStore;
use crate::config::{CacheConfig, LbConfig, ListenerConfig, Protocol};
use crate::health::HealthState;
use crate::http as l7;
use crate::metrics::{BackendMetrics, CacheMetrics, Metrics};
use crate::{l4, LbError};

/// A pool compiled for serving.
pub(crate) struct Pool {
    pub backends: Vec<Arc<Backend>>,
    pub weights: Vec<u32>,
    pub balancer: Balancer,
    pub hash_header: Option<HeaderName>,
    /// Sticky-cookie value of each backend (a hash of its address, not the address).
    pub sticky_ids: Vec<String>,
}

impl Pool {
    /// Pick an available backend not in `exclude`.
    pub fn pick(&self, ctx: &PickContext<'_>, exclude: &[usize]) -> Option<usize> {
        // Small pools (the usual case) pick without allocating.
        const STACK: usize = 16;
        let cand = |(i, (b, w)): (usize, (&Arc<Backend>, &u32))| Candidate {
            available: !exclude.contains(&i) && b.available(),
            active: b.active(),
            weight: *w,
        };
        let all = self.backends.iter().zip(&self.weights).enumerate();
        if self.backends.len() <= STACK {
            let mut buf = [Candidate {
                available: false,
                active: 0,
                weight: 1,
            }; STACK];
            for (slot, c) in buf.iter_mut().zip(all.map(cand)) {
                *slot = c;
            }
            self.balancer.pick(&buf[..self.backends.len()], ctx)
        } else {
            let cands: Vec<Candidate> = all.map(cand).collect();
            self.balancer.pick(&cands, ctx)
        }
    }

    /// Like [`Pool::pick`]; when no backend is available but one waits for its first health
    /// probe (a load balancer or backend just added), waits for that probe (at most its
    /// timeout) instead of refusing the request.
    pub async fn pick_or_await_probe(
        &self,
        changes: &Changes,
        ctx: &PickContext<'_>,
        exclude: &[usize],
    ) -> Option<usize> {
        if let Some(i) = self.pick(ctx, exclude) {
            return Some(i);
        }
        // Boxed: the rare wait does not enlarge every request's future.
        Box::pin(self.await_probe(changes, ctx, exclude)).await
    }

    async fn await_probe(
        &self,
        changes: &Changes,
        ctx: &PickContext<'_>,
        exclude: &[usize],
    ) -> Option<usize> {
        let mut rx = changes.subscribe();
        let deadline = tokio::time::Instant::now() + FIRST_PROBE_WAIT;
        loop {
            // Checked after subscribing: a change in between is not missed.
            if let Some(i) = self.pick(ctx, exclude) {
                return Some(i);
            }
            let waiting = self
                .backends
                .iter()
                .enumerate()
                .any(|(i, b)| !exclude.contains(&i) && b.awaiting_first_probe());
            if !waiting {
                return None;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }
}

/// Longest wait of [`LoadBalancer::update`] for the in-kernel table to be re-rendered.
const KERNEL_APPLY_WAIT: Duration = Duration::from_secs(2);

/// Longest wait of a request for the first probe of a new backend (a first probe has at most
/// 250 ms, see [`crate::health::HealthTracker::probe_timeout`]).
const FIRST_PROBE_WAIT: Duration = Duration::from_millis(300);

/// Everything a request needs, swapped atomically on update.
pub(crate) struct Snapshot {
    pub cfg: LbConfig,
    pub pools: Vec<Pool>,
    /// Pool index of each route.
    pub route_pools: Vec<usize>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub cache: Option<Arc<Mutex<CacheStore>>>,
    pub http: auto::Builder<TokioExecutor>,
}

/// The backends of all pools: one per address in the configuration, and those removed that
/// finish their connections (an address may be in both when a new backend took it over).
#[derive(Default)]
struct Backends {
    live: HashMap<SocketAddr, Arc<Backend>>,
    draining: Vec<Arc<Backend>>,
}

impl Backends {
    fn all(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.live.values().chain(&self.draining)
    }
}

struct Listener {
    cfg: ListenerConfig,
    addrs: Vec<SocketAddr>,
    cancel: CancellationToken,
}

pub(crate) struct Inner {
    pub name: String,
    pub metrics: Arc<Metrics>,
    pub snap: ArcSwap<Snapshot>,
    pub conns: Gauge,
    pub cache_metrics: CacheMetrics,
    /// Requests answered by the cache.
    pub cache_backend: BackendMetrics,
    /// Requests no backend answered (503/504/502 made here).
    pub none_backend: BackendMetrics,
    backends: Mutex<Backends>,
    listeners: Mutex<Vec<Listener>>,
    cache: Mutex<Option<(CacheConfig, Arc<Mutex<CacheStore>>)>>,
    update_lock: tokio::sync::Mutex<()>,
    /// The in-kernel L4 table and the token that stops its sync (and deletes it).
    kernel: Option<(String, CancellationToken)>,
    /// Bumped when a new snapshot is published or a backend's availability changes.
    pub changes: Changes,
    /// The value of `changes` the in-kernel table was last rendered from.
    pub kernel_applied: watch::Sender<u64>,
}

impl Inner {
    /// The bound addresses of each listener (port 0 resolved).
    pub(crate) fn listen_addrs(&self) -> Vec<(Protocol, SocketAddr)> {
        lock(&self.listeners)
            .iter()
            .flat_map(|l| l.addrs.iter().map(|a| (l.cfg.protocol, *a)))
            .collect()
    }
}

/// A running load balancer. Dropping it does not stop it; call [`LoadBalancer::shutdown`].
#[derive(Clone)]
pub struct LoadBalancer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LoadBalancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadBalancer")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LoadBalancer {
    /// Check `cfg`, bind its listeners and start serving.
    pub async fn start(cfg: LbConfig, metrics: Arc<Metrics>) -> Result<Self, LbError> {
        cfg.check()?;
        let name = cfg.name.clone();
        let empty = Snapshot {
            cfg: LbConfig {
                listeners: Vec::new(),
                ..cfg.clone()
            },
            pools: Vec::new(),
            route_pools: Vec::new(),
            tls: None,
            cache: None,
            http: auto::Builder::new(TokioExecutor::new()),
        };
        let inner = Arc::new(Inner {
            conns: metrics.connections(&name),
            cache_metrics: metrics.cache(&name),
            cache_backend: metrics.backend(&name, "cache"),
            none_backend: metrics.backend(&name, "none"),
            name,
            metrics,
            snap: ArcSwap::from_pointee(empty),
            backends: Mutex::new(Backends::default()),
            listeners: Mutex::new(Vec::new()),
            cache: Mutex::new(None),
            update_lock: tokio::sync::Mutex::new(()),
            kernel: cfg.kernel_l4.as_deref().map(|prefix| {
                (
                    crate::kernel::table_name(prefix, &cfg.name),
                    CancellationToken::new(),
                )
            }),
            changes: Changes::new(0),
            kernel_applied: watch::Sender::new(0),
        });
        let lb = Self { inner };
        // The in-kernel sync runs first, so that `update` can wait for the table.
        if let Some((table, cancel)) = &lb.inner.kernel {
            tokio::spawn(crate::kernel_sync::run(
                Arc::downgrade(&lb.inner),
                table.clone(),
                cancel.clone(),
            ));
        }
        if let Err(e) = lb.update(cfg).await {
            if let Some((_, cancel)) = &lb.inner.kernel {
                cancel.cancel();
            }
            return Err(e);
        }
        Ok(lb)
    }

    /// The LB's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Apply a new configuration without dropping established connections. Listeners that did
    /// not change keep their sockets; removed backends stop getting new traffic and their L4
    /// connections are closed after the drain timeout.
    pub async fn update(&self, cfg: LbConfig) -> Result<(), LbError> {
        cfg.check()?;
        let _guard = self.inner.update_lock.lock().await;
        let inner = &self.inner;
        let old = inner.snap.load_full();
        let tls = match &cfg.tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
                t,
            )?)),
            None => None,
        };
        // Listeners: stop removed ones, bind new ones (before publishing anything). The kept
        // ones stay listed throughout (the in-kernel sync renders from the list).
        let new: Vec<ListenerConfig> = {
            let mut ls = lock(&inner.listeners);
            ls.retain(|l| {
                let keep = cfg.listeners.contains(&l.cfg);
                if !keep {
                    l.cancel.cancel();
                }
                keep
            });
            cfg.listeners
                .iter()
                .filter(|lc| !ls.iter().any(|l| &l.cfg == *lc))
                .cloned()
                .collect()
        };
        let mut bound = Vec::new();
        for lc in new {
            let socks = bind(&lc).await?;
            bound.push((lc, socks));
        }
        // Backends: one per address, kept (with its health state) while the address stays in
        // the config under the same name; a new one starts pending when a health check will
        // probe it (its first probe runs now), else healthy; missing ones drain.
        let health = crate::kernel::effective_health_check(&cfg);
        let health_changed = crate::kernel::effective_health_check(&old.cfg) != health;
        let initial = if health.is_some() {
            HealthState::Pending
        } else {
            HealthState::Healthy
        };
        let mut pools = Vec::new();
        {
            let mut set = lock(&inner.backends);
            let mut live: HashMap<SocketAddr, Arc<Backend>> = HashMap::new();
            for p in &cfg.pools {
                let mut backends = Vec::new();
                for bc in &p.backends {
                    let b = if let Some(b) = live.get(&bc.addr) {
                        Arc::clone(b)
                    } else {
                        let b = match set.live.get(&bc.addr) {
                            Some(b) if b.name == bc.name => {
                                if health_changed {
                                    b.start_checker(&inner.name, health.clone());
                                }
                                Arc::clone(b)
                            }
                            _ => {
                                let b = Backend::new(
                                    bc.name.clone(),
                                    bc.addr,
                                    inner.metrics.backend(&inner.name, &bc.name),
                                    initial,
                                    inner.changes.clone(),
                                );
                                b.start_checker(&inner.name, health.clone());
                                b
                            }
                        };
                        live.insert(bc.addr, Arc::clone(&b));
                        b
                    };
                    backends.push(b);
                }
                let keys: Vec<String> = p.backends.iter().map(|b| b.addr.to_string()).collect();
                let weights: Vec<u32> = p.backends.iter().map(|b| b.weight).collect();
                pools.push(Pool {
                    sticky_ids: keys
                        .iter()
                        .map(|k| format!("{:016x}", crate::balancer::hash64(k.as_bytes())))
                        .collect(),
                    balancer: Balancer::new(p.algorithm, &keys, &weights),
                    weights,
                    backends,
                    hash_header: p
                        .hash_header
                        .as_deref()
                        .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
                });
            }
            // Every backend not kept drains, also one whose address a new backend took.
            let drain = Duration::from_millis(cfg.limits.drain_timeout_ms);
            let old = std::mem::replace(&mut set.live, live);
            for (addr, b) in old {
                if set.live.get(&addr).is_some_and(|l| Arc::ptr_eq(l, &b)) {
                    continue;
                }
                tracing::info!(lb = %inner.name, backend = %b.name, %addr, "backend removed, draining");
                b.start_draining();
                set.draining.push(Arc::clone(&b));
                let weak = Arc::downgrade(&self.inner);
                tokio::spawn(async move {
                    tokio::time::sleep(drain).await;
                    if let Some(inner) = weak.upgrade() {
                        let mut set = lock(&inner.backends);
                        set.draining.retain(|x| !Arc::ptr_eq(x, &b));
                        if !set.all().any(|x| x.name == b.name) {
                            inner.metrics.remove_backend(&inner.name, &b.name);
                        }
                    }
                });
            }
        }
        let route_pools = cfg
            .routes
            .iter()
            .map(|r| cfg.pools.iter().position(|p| p.name == r.pool).unwrap_or(0))
            .collect();
        let cache = cfg.cache.as_ref().map(|cc| {
            let mut slot = lock(&inner.cache);
            match &*slot {
                Some((c, store)) if c == cc => Arc::clone(store),
                _ => {
                    let store = Arc::new(Mutex::new(CacheStore::new(
                        cc.max_bytes,
                        cc.max_object_bytes,
                    )));
                    *slot = Some((cc.clone(), Arc::clone(&store)));
                    store
                }
            }
        });
        let snap = Snapshot {
            http: l7::server_builder(&cfg.limits),
            cfg,
            pools,
            route_pools,
            tls,
            cache,
        };
        inner.snap.store(Arc::new(snap));
        // Start accepting on the new listeners only now that the snapshot is published.
        let mut ls = Vec::new();
        for (lc, socks) in bound {
            let cancel = CancellationToken::new();
            let mut addrs = Vec::new();
            for s in socks {
                match s {
                    Sock::Tcp(per_worker) => {
                        addrs.extend(per_worker.first().and_then(|t| t.local_addr().ok()));
                        for (t, h) in per_worker.into_iter().zip(crate::workers::handles()) {
                            let (inner, cancel, protocol) =
                                (Arc::clone(&self.inner), cancel.clone(), lc.protocol);
                            h.spawn(async move {
                                match TcpListener::from_std(t) {
                                    Ok(t) => accept_loop(inner, t, protocol, cancel).await,
                                    Err(e) => {
                                        tracing::error!(lb = %inner.name, error = %e, "listener setup failed");
                                    }
                                }
                            });
                        }
                    }
                    Sock::Udp(u) => {
                        addrs.extend(u.local_addr().ok());
                        tokio::spawn(l4::udp_loop(Arc::clone(&self.inner), u, cancel.clone()));
                    }
                }
            }
            tracing::info!(lb = %self.inner.name, protocol = %lc.protocol, ?addrs, "listening");
            ls.push(Listener {
                cfg: lc,
                addrs,
                cancel,
            });
        }
        lock(&self.inner.listeners).extend(ls);
        // The in-kernel sync renders the new snapshot and listeners now; wait for it, so that
        // when `update` returns a removed backend gets no new connection from the kernel
        // either (the control plane waits for that before it stops the backend).
        bump(&self.inner.changes);
        self.await_kernel().await;
        Ok(())
    }

    /// The bound addresses of each listener (port 0 resolved).
    pub fn listen_addrs(&self) -> Vec<(Protocol, SocketAddr)> {
        self.inner.listen_addrs()
    }

    /// Wait (at most [`KERNEL_APPLY_WAIT`]) until the in-kernel table, if any, reflects every
    /// change made so far.
    async fn await_kernel(&self) {
        let Some((table, cancel)) = &self.inner.kernel else {
            return;
        };
        if cancel.is_cancelled() {
            return;
        }
        let want = *self.inner.changes.borrow();
        let mut rx = self.inner.kernel_applied.subscribe();
        let applied = tokio::time::timeout(KERNEL_APPLY_WAIT, rx.wait_for(|a| *a >= want)).await;
        if applied.is_err() {
            tracing::warn!(lb = %self.inner.name, %table, "the in-kernel L4 table was not updated within {KERNEL_APPLY_WAIT:?}");
        }
    }

    /// The `ip` nftables table of the in-kernel L4 path, when enabled (it exists while an L4
    /// listener is eligible and `nft` works).
    pub fn kernel_table(&self) -> Option<&str> {
        self.inner.kernel.as_ref().map(|(t, _)| t.as_str())
    }

    /// The first bound address of a protocol.
    pub fn addr(&self, protocol: Protocol) -> Option<SocketAddr> {
        self.listen_addrs()
            .into_iter()
            .find(|(p, _)| *p == protocol)
            .map(|(_, a)| a)
    }

    /// State of every backend, including draining ones.
    pub fn backends(&self) -> Vec<BackendStatus> {
        let mut v: Vec<BackendStatus> = lock(&self.inner.backends)
            .all()
            .map(|b| b.status())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.addr.cmp(&b.addr)));
        v
    }

    /// Edge cache counters, when the cache is on.
    pub fn cache_stats(&self) -> Option<crate::cache::CacheStats> {
        self.inner
            .snap
            .load()
            .cache
            .as_ref()
            .map(|c| lock(c).stats())
    }

    /// Stop listening; connections get the drain timeout to finish; checkers stop.
    pub fn shutdown(&self) {
        if let Some((_, cancel)) = &self.inner.kernel {
            cancel.cancel();
        }
        for l in lock(&self.inner.listeners).drain(..) {
            l.cancel.cancel();
        }
        let set = std::mem::take(&mut *lock(&self.inner.backends));
        for b in set.live.into_values().chain(set.draining) {
            b.start_draining();
            self.inner.metrics.remove_backend(&self.inner.name, &b.name);
        }
        tracing::info!(lb = %self.inner.name, "load balancer stopped");
    }
}

enum Sock {
    /// One `SO_REUSEPORT` socket per worker thread.
    Tcp(Vec<std::net::TcpListener>),
    Udp(Arc<UdpSocket>),
}

async fn bind(lc: &ListenerConfig) -> Result<Vec<Sock>, LbError> {
    let mut out = Vec::new();
    for addr in lc.addrs() {
        let err = |source| LbError::Bind { addr, source };
        if lc.protocol == Protocol::Udp {
            out.push(Sock::Udp(Arc::new(
                UdpSocket::bind(addr).await.map_err(err)?,
            )));
        } else {
            let n = crate::workers::handles().len();
            out.push(Sock::Tcp(
                crate::workers::bind_reuseport(addr, n).map_err(err)?,
            ));
        }
    }
    Ok(out)
}

async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    protocol: Protocol,
    cancel: CancellationToken,
) {
    loop {
        let (sock, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(lb = %inner.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let inner = Arc::clone(&inner);
        let cancel = cancel.clone();
        match protocol {
            Protocol::Tcp => {
                tokio::spawn(l4::tcp_conn(inner, sock, peer, cancel));
            }
            Protocol::Http => {
                tokio::spawn(l7::serve(inner, sock, peer, false, cancel));
            }
            Protocol::Https => {
                tokio::spawn(async move {
                    let Some(acceptor) = inner.snap.load().tls.clone() else {
                        return;
                    };
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await
                    {
                        Ok(Ok(tls)) => l7::serve(inner, tls, peer, true, cancel).await,
                        Ok(Err(e)) => {
                            tracing::debug!(lb = %inner.name, %peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(lb = %inner.name, %peer, "TLS handshake timed out");
                        }
                    }
                });
            }
            Protocol::Udp => {}
        }
    }
}
