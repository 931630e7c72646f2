//! L4 proxies: TCP (bidirectional copy) and UDP (per-client sessions).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::balancer::PickContext;
use crate::runtime::Inner;

/// Proxy one TCP connection to a backend of the default pool.
pub(crate) async fn tcp_conn(
    inner: Arc<Inner>,
    client: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let snap = inner.snap.load_full();
    let Some(pool) = snap.pools.first() else {
        return;
    };
    let ctx = PickContext {
        client_ip: Some(peer.ip()),
        hash_key: None,
    };
    let connect_timeout = Duration::from_millis(snap.cfg.limits.connect_timeout_ms);
    let drain = Duration::from_millis(snap.cfg.limits.drain_timeout_ms);
    let mut tried = Vec::new();
    let (backend, upstream) = loop {
        let Some(idx) = pool.pick_or_await_probe(&inner.changes, &ctx, &tried).await else {
            tracing::debug!(lb = %inner.name, %peer, "no backend for TCP connection");
            inner.none_backend.count_status(503);
            return;
        };
        tried.push(idx);
        let b = Arc::clone(&pool.backends[idx]);
        if let Ok(Ok(s)) = tokio::time::timeout(connect_timeout, TcpStream::connect(b.addr)).await {
            b.record(true, &inner.name, &snap.cfg.outlier);
            break (b, s);
        }
        b.record(false, &inner.name, &snap.cfg.outlier);
        if tried.len() >= 3 {
            inner.none_backend.count_status(503);
            return;
        }
    };
    drop(snap);
    let _ = upstream.set_nodelay(true);
    let _guard = backend.begin();
    inner.conns.inc();
    let started = Instant::now();
    let copy = crate::splice::relay(
        &client,
        &upstream,
        &backend.metrics.bytes_to_backend,
        &backend.metrics.bytes_from_backend,
    );
    let drained = async {
        backend.drained().await;
        tokio::time::sleep(drain).await;
    };
    let stopped = async {
        cancel.cancelled().await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        r = copy => {
            if let Err(e) = r {
                tracing::debug!(lb = %inner.name, %peer, error = %e, "TCP relay ended with an error");
            }
        }
        () = drained => {
            tracing::info!(lb = %inner.name, backend = %backend.name, %peer, "closing drained TCP connection");
        }
        () = stopped => {}
    }
    backend.metrics.count_status(200);
    backend
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    inner.conns.dec();
}

struct Session {
    upstream: Arc<UdpSocket>,
    last_seen_ms: Arc<AtomicU64>,
    backend: Arc<Backend>,
}

/// Serve a UDP listener: each client address gets a connected upstream socket to one backend;
/// replies go back from the listener socket; idle sessions expire.
pub(crate) async fn udp_loop(inner: Arc<Inner>, sock: Arc<UdpSocket>, cancel: CancellationToken) {
    let sessions: Arc<Mutex<HashMap<SocketAddr, Session>>> = Arc::default();
    let epoch = Instant::now();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(lb = %inner.name, error = %e, "udp recv failed");
                    continue;
                }
            },
        };
        let now_ms = epoch.elapsed().as_millis() as u64;
        let existing = {
            let map = sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            map.get(&peer).and_then(|s| {
                (!s.backend.status().draining).then(|| {
                    s.last_seen_ms.store(now_ms, Ordering::Relaxed);
                    (Arc::clone(&s.upstream), Arc::clone(&s.backend))
                })
            })
        };
        let (upstream, backend) = match existing {
            Some(x) => x,
            None => match new_session(&inner, &sock, &sessions, peer, epoch, now_ms).await {
                Some(x) => x,
                None => continue,
            },
        };
        if upstream.send(&buf[..n]).await.is_ok() {
            backend.metrics.bytes_to_backend.inc_by(n as u64);
        }
    }
}

async fn new_session(
    inner: &Arc<Inner>,
    sock: &Arc<UdpSocket>,
    sessions: &Arc<Mutex<HashMap<SocketAddr, Session>>>,
    peer: SocketAddr,
    epoch: Instant,
    now_ms: u64,
) -> Option<(Arc<UdpSocket>, Arc<Backend>)> {
    let snap = inner.snap.load_full();
    let pool = snap.pools.first()?;
    let ctx = PickContext {
        client_ip: Some(peer.ip()),
        hash_key: None,
    };
    let backend = Arc::clone(&pool.backends[pool.pick(&ctx, &[])?]);
    let bind: SocketAddr = if backend.addr.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let up = UdpSocket::bind(bind).await.ok()?;
    up.connect(backend.addr).await.ok()?;
    let up = Arc::new(up);
    let last = Arc::new(AtomicU64::new(now_ms));
    sessions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(
            peer,
            Session {
                upstream: Arc::clone(&up),
                last_seen_ms: Arc::clone(&last),
                backend: Arc::clone(&backend),
            },
        );
    backend.metrics.count_status(200);
    let idle = Duration::from_millis(snap.cfg.limits.udp_idle_timeout_ms);
    let (up2, sock2, sessions2, b2) = (
        Arc::clone(&up),
        Arc::clone(sock),
        Arc::clone(sessions),
        Arc::clone(&backend),
    );
    let guard = backend.begin();
    tokio::spawn(async move {
        let _guard = guard;
        let mut buf = vec![0u8; 65_536];
        loop {
            let since = epoch.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
            let left = idle.saturating_sub(Duration::from_millis(since));
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, up2.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    b2.metrics.bytes_from_backend.inc_by(n as u64);
                    let _ = sock2.send_to(&buf[..n], peer).await;
                }
                Ok(Err(_)) => break,
                Err(_) => {}
            }
        }
        let mut map = sessions2
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map
            .get(&peer)
            .is_some_and(|s| Arc::ptr_eq(&s.upstream, &up2))
        {
            map.remove(&peer);
        }
    });
    Some((up, backend))
}
