//! Runtime state of one backend: in-flight count, health, outlier ejection, draining, and the
//! active health-check task.
//!
//! Every change of a backend's availability (health state, ejection) bumps the load balancer's
//! change counter ([`Changes`]): the in-kernel L4 sync re-renders its table at once, and
//! requests that found only backends waiting for their first probe pick again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{HealthCheckConfig, HealthProbe, OutlierConfig};
use crate::health::{HealthState, HealthTracker, OutlierEvent, OutlierTracker};
use crate::metrics::BackendMetrics;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

/// Observed state of a backend, as reported to the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Backend name.
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// Passes active health checks (or has none).
    pub healthy: bool,
    /// Waits for its first passed health probe (not healthy yet, not failed either).
    #[serde(default)]
    pub pending: bool,
    /// Ejected by passive outlier detection right now.
    pub ejected: bool,
    /// Removed from the config; finishing its connections.
    pub draining: bool,
    /// In-flight requests or open connections.
    pub active: u64,
}

/// The counter a load balancer's backends bump whenever their availability changes.
pub(crate) type Changes = watch::Sender<u64>;

pub(crate) fn bump(changes: &Changes) {
    changes.send_modify(|v| *v = v.wrapping_add(1));
}

/// One backend.
#[derive(Debug)]
pub struct Backend {
    /// Name (instance name).
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// Metric handles.
    pub metrics: BackendMetrics,
    active: AtomicU64,
    /// Open connections the kernel forwards to it (in-kernel L4 path), from conntrack.
    kernel_active: AtomicU64,
    /// [`HealthState`] as a byte.
    health_state: AtomicU8,
    /// Whether the current checker's first probe has finished (true without a checker).
    first_probe_done: AtomicBool,
    draining: AtomicBool,
    ejected_until_ms: AtomicU64,
    failing: AtomicBool,
    health: Mutex<HealthTracker>,
    outlier: Mutex<OutlierTracker>,
    drain_tx: watch::Sender<bool>,
    checker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    changes: Changes,
}

/// Decrements the in-flight count when dropped.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.dec();
    }
}

/// [`ActiveGuard`] borrowing its backend (no reference count change).
#[derive(Debug)]
pub(crate) struct ActiveRef<'a>(&'a Backend);

impl Drop for ActiveRef<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.dec();
    }
}

impl Backend {
    /// A new backend in `state` ([`HealthState::Pending`] when a health check will probe it,
    /// else [`HealthState::Healthy`]); availability changes bump `changes`.
    pub(crate) fn new(
        name: String,
        addr: SocketAddr,
        metrics: BackendMetrics,
        state: HealthState,
        changes: Changes,
    ) -> Arc<Self> {
        metrics.healthy.set(i64::from(state.candidate()));
        Arc::new(Self {
            name,
            addr,
            metrics,
            active: AtomicU64::new(0),
            kernel_active: AtomicU64::new(0),
            health_state: AtomicU8::new(state.to_u8()),
            first_probe_done: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            ejected_until_ms: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            health: Mutex::new(HealthTracker::new(state, 1, 1)),
            outlier: Mutex::new(OutlierTracker::default()),
            drain_tx: watch::channel(false).0,
            checker: Mutex::new(None),
            changes,
        })
    }

    /// Whether it may receive new traffic.
    pub fn available(&self) -> bool {
        self.health_state().candidate()
            && !self.draining.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms()
    }

    /// Its active health state.
    pub fn health_state(&self) -> HealthState {
        HealthState::from_u8(self.health_state.load(Ordering::Relaxed))
    }

    /// Whether it is pending and its first probe has not finished yet: a request that finds
    /// no available backend waits for that probe rather than fail at once.
    pub(crate) fn awaiting_first_probe(&self) -> bool {
        self.health_state() == HealthState::Pending
            && !self.first_probe_done.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
    }

    /// How long its current ejection lasts still, if it is ejected.
    pub(crate) fn ejected_for(&self) -> Option<Duration> {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// In-flight requests or connections (relayed here or forwarded by the kernel).
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed) + self.kernel_active.load(Ordering::Relaxed)
    }

    /// Set the number of open connections the kernel forwards to this backend; returns the
    /// change from the previous figure.
    pub(crate) fn set_kernel_active(&self, n: u64) -> i64 {
        let old = self.kernel_active.swap(n, Ordering::Relaxed);
        n as i64 - old as i64
    }

    /// Count one in-flight request or connection until the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active.inc();
        ActiveGuard(Arc::clone(self))
    }

    /// Like [`Backend::begin`], for a caller that holds the backend for the guard's life.
    pub(crate) fn begin_ref(&self) -> ActiveRef<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active.inc();
        ActiveRef(self)
    }

    /// Record a request outcome for passive outlier detection.
    pub fn record(&self, success: bool, lb: &str, cfg: &OutlierConfig) {
        if success && !self.failing.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let mut o = self
            .outlier
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ev = o.record(
            success,
            now,
            cfg.consecutive_errors,
            Duration::from_millis(cfg.base_ejection_ms),
        );
        self.failing.store(!success, Ordering::Relaxed);
        if let OutlierEvent::Ejected(until) = ev {
            let ms = now_ms() + until.saturating_duration_since(now).as_millis() as u64;
            self.ejected_until_ms.store(ms, Ordering::Relaxed);
            bump(&self.changes);
            tracing::warn!(lb, backend = %self.name, addr = %self.addr,
                ejected_for_ms = ms - now_ms(), "backend ejected after consecutive errors");
        }
    }

    /// Mark as removed from the configuration: no new traffic; L4 connections get the drain
    /// signal.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain_tx.send_replace(true);
        self.stop_checker();
        bump(&self.changes);
    }

    /// Resolves once the backend is draining.
    pub async fn drained(&self) {
        let mut rx = self.drain_tx.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Observed state.
    pub fn status(&self) -> BackendStatus {
        BackendStatus {
            name: self.name.clone(),
            addr: self.addr,
            healthy: self.health_state().candidate(),
            pending: self.health_state() == HealthState::Pending,
            ejected: self.ejected_until_ms.load(Ordering::Relaxed) > now_ms(),
            draining: self.draining.load(Ordering::Relaxed),
            active: self.active(),
        }
    }

    fn set_health_state(&self, state: HealthState) {
        self.health_state.store(state.to_u8(), Ordering::Relaxed);
        self.metrics.healthy.set(i64::from(state.candidate()));
        bump(&self.changes);
    }

    /// (Re)start active health checking with `cfg`, keeping the backend's health state (a
    /// backend created pending stays out until a probe passes; the first probe runs at once).
    /// `None` stops probing and makes the backend healthy.
    pub(crate) fn start_checker(self: &Arc<Self>, lb: &str, cfg: Option<HealthCheckConfig>) {
        self.stop_checker();
        let Some(cfg) = cfg else {
            self.first_probe_done.store(true, Ordering::Relaxed);
            if self.health_state() != HealthState::Healthy {
                self.set_health_state(HealthState::Healthy);
            }
            return;
        };
        let tracker = HealthTracker::new(
            self.health_state(),
            cfg.healthy_threshold,
            cfg.unhealthy_threshold,
        );
        self.first_probe_done
            .store(tracker.state() != HealthState::Pending, Ordering::Relaxed);
        *self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tracker;
        let me = Arc::clone(self);
        let lb = lb.to_string();
        let handle = tokio::spawn(async move {
            let interval = Duration::from_millis(cfg.interval_ms);
            let timeout = Duration::from_millis(cfg.timeout_ms);
            loop {
                let timeout = me.tracker().probe_timeout(timeout);
                let ok = matches!(
                    tokio::time::timeout(timeout, probe(me.addr, &cfg.probe)).await,
                    Ok(Ok(()))
                );
                let (change, next) = {
                    let mut t = me.tracker();
                    let change = t.observe(ok);
                    (change, t.next_probe_in(interval))
                };
                if ok {
                    me.outlier
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .reset_backoff(Instant::now());
                }
                if let Some(state) = change {
                    me.set_health_state(state);
                    match state {
                        HealthState::Healthy => {
                            tracing::info!(lb, backend = %me.name, addr = %me.addr, "backend healthy");
                        }
                        _ => {
                            tracing::warn!(lb, backend = %me.name, addr = %me.addr, "backend unhealthy");
                        }
                    }
                }
                if !me.first_probe_done.swap(true, Ordering::Relaxed) && change.is_none() {
                    // Requests waiting for this first probe give up waiting.
                    bump(&me.changes);
                }
                tokio::time::sleep(next).await;
            }
        });
        *self
            .checker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, HealthTracker> {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stop_checker(&self) {
        if let Some(h) = self
            .checker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            h.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop_checker();
    }
}

/// One probe: TCP connect, or an HTTP/1.1 GET whose status must match.
pub async fn probe(addr: SocketAddr, probe: &HealthProbe) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let HealthProbe::Http {
        path,
        expect_status,
    } = probe
    else {
        return Ok(());
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: nimbus-lb-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    if status == Some(*expect_status) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "health check got {status:?}, want {expect_status}"
        )))
    }
}
