//! The L7 fast path: HTTP/1.1 requests without a body, served without hyper.
//!
//! A client connection of an HTTP(S) listener whose load balancer has no edge cache starts
//! here. Each request head is parsed with `httparse` straight from the connection's read
//! buffer, and the request head for the backend is written from it in one pass (hop-by-hop
//! fields and the names `Connection` lists dropped, `X-Forwarded-For`, `X-Forwarded-Proto` and
//! `X-Request-Id` set) without building a `HeaderMap`; the backend's response head is relayed
//! the same way ([`h1::parse_response_relay`]) and written to the client together with the
//! body bytes already read, in one write. Routing, balancing, sticky cookies, retries,
//! outlier detection, metrics and the error responses are the same as on the hyper path
//! ([`crate::http`]).
//!
//! A protocol upgrade (a `GET` with `Connection: upgrade` and `Upgrade`, e.g. WebSocket; not
//! h2c) is forwarded with those two fields; on `101 Switching Protocols` the head is relayed
//! and the client and backend connections are spliced both ways until either closes (any other
//! answer is an ordinary response).
//!
//! Anything else is handed to hyper for the rest of the connection, with the bytes read so
//! far replayed ([`Rewind`]): a request with a body (`Content-Length` other than 0 or
//! `Transfer-Encoding`), `Expect`, another `Upgrade`, HTTP/1.0, a request target that is not in origin
//! form, a missing or non-ASCII `Host`, a head hyper would refuse (malformed, too large: hyper
//! answers 400/431 as before), the HTTP/2 preface, and every request once the load balancer
//! has a cache (except upgrades). So every request is served as before, and the common one without hyper's
//! per-request work (its header maps, its header-read timer, its dispatcher).
//!
//! Timers: one per connection. It is armed once and re-armed only when it fires before the
//! deadline wanted now (the 30 s header-read timeout while waiting for a request head, the
//! response timeout while waiting for the backend), so a request costs a clock read, not a
//! timer registration.

use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use self::write::{finish_head, relay_body, reply, splice};
use crate::balancer::PickContext;
use crate::h1;
use crate::runtime::{Inner, Snapshot};
use crate::upstream::Upstreams;

#[cfg(test)]
mod props;
mod write;

/// How long a client may take to send a request head (and idle between requests): hyper's
/// `header_read_timeout` on the hyper path.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most header fields in a request head served here (more: hyper's turn).
const MAX_FIELDS: usize = 100;
/// Read buffer space made available before each read from the client.
const READ_CHUNK: usize = 4096;

/// A stream with bytes already read from it put back in front.
pub(crate) struct Rewind<S> {
    pre: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, whose next bytes read are `pre`.
    pub(crate) fn new(inner: S, pre: Bytes) -> Self {
        Self { pre, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One timer per connection, re-armed lazily (see the module doc).
struct Deadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: Instant,
    want: Instant,
}

impl Deadline {
    fn new(want: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(want.into())),
            armed: want,
            want,
        }
    }

    fn set(&mut self, want: Instant) {
        self.want = want;
        if want < self.armed {
            self.armed = want;
            self.sleep.as_mut().reset(want.into());
        }
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            std::task::ready!(self.sleep.as_mut().poll(cx));
            if Instant::now() >= self.want {
                return Poll::Ready(());
            }
            self.armed = self.want;
            self.sleep.as_mut().reset(self.want.into());
        }
    }
}

/// Connection state shared with the task that watches for shutdown.
#[derive(Default)]
struct Ctl {
    /// Waiting for a request head with nothing of it read yet.
    idle: AtomicBool,
    /// The listener stops: close after the response in progress.
    closing: AtomicBool,
}

/// What the client connection is, for the request heads sent to backends.
pub(crate) struct Client {
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// Its IP address as text (`X-Forwarded-For`).
    pub peer_ip: String,
    /// The connection came over TLS.
    pub tls: bool,
}

/// Serve a client connection on the fast path until it closes (`None`), or return it, with
/// the bytes read but not served put back, for hyper to serve the rest.
pub(crate) async fn serve<S>(
    inner: &Inner,
    io: S,
    client: &Client,
    ups: &Arc<Upstreams>,
    cancel: &CancellationToken,
    drain: Duration,
) -> Option<Rewind<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let ctl = Ctl::default();
    let mut conn = pin!(run(inner, io, client, ups, &ctl));
    tokio::select! {
        r = conn.as_mut() => r,
        () = cancel.cancelled() => {
            if ctl.idle.load(Ordering::Relaxed) {
                return None;
            }
            ctl.closing.store(true, Ordering::Relaxed);
            tokio::time::timeout(drain, conn).await.ok().flatten()
        }
    }
}

/// What the request head says, for the request loop.
struct Req {
    /// Bytes of the head in the read buffer.
    len: usize,
    head: bool,
    idempotent: bool,
    close: bool,
    /// A protocol upgrade is asked for.
    upgrade: bool,
    pool: usize,
    sticky: Option<usize>,
    hash_key: Option<Vec<u8>>,
}

enum Parsed {
    Partial,
    HandOff,
    Request(Req),
}

/// Per-connection buffers, reused from request to request.
struct Bufs {
    /// The request head for the backend.
    up: Vec<u8>,
    /// The response head (and first body bytes) for the client.
    out: Vec<u8>,
    /// This request's id.
    rid: Vec<u8>,
}

#[allow(clippy::too_many_lines)]
async fn run<S>(
    inner: &Inner,
    mut io: S,
    client: &Client,
    ups: &Arc<Upstreams>,
    ctl: &Ctl,
) -> Option<Rewind<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut bufs = Bufs {
        up: Vec::with_capacity(1024),
        out: Vec::with_capacity(1024),
        rid: Vec::with_capacity(64),
    };
    let mut snap: Arc<Snapshot> = inner.snap.load_full();
    let mut deadline = Deadline::new(Instant::now() + HEADER_READ_TIMEOUT);
    loop {
        // A request head.
        deadline.set(Instant::now() + HEADER_READ_TIMEOUT);
        let req = loop {
            if rbuf.is_empty() {
                ctl.idle.store(true, Ordering::Relaxed);
                if ctl.closing.load(Ordering::Relaxed) {
                    return None;
                }
            } else {
                ctl.idle.store(false, Ordering::Relaxed);
                // The current configuration, without touching the shared reference count
                // unless it changed.
                {
                    let current = inner.snap.load();
                    if !Arc::ptr_eq(&current, &snap) {
                        snap = arc_swap::Guard::into_inner(current);
                    }
                }
                match parse_request(&rbuf, &snap, client, &mut bufs) {
                    Parsed::Request(r) => break r,
                    Parsed::HandOff => return Some(Rewind::new(io, rbuf.freeze())),
                    Parsed::Partial => {}
                }
            }
            rbuf.reserve(READ_CHUNK);
            let read = poll_fn(|cx| {
                if let Poll::Ready(r) =
                    tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut rbuf)
                {
                    return Poll::Ready(Some(r));
                }
                deadline.poll_expired(cx).map(|()| None)
            })
            .await;
            match read {
                Some(Ok(n)) if n > 0 => {}
                // End of stream, error or header-read timeout: close.
                _ => return None,
            }
        };
        rbuf.advance(req.len);
        let done = exchange(
            inner,
            &snap,
            client,
            &mut io,
            ups,
            &req,
            &ctl.closing,
            &mut bufs,
            &mut deadline,
            &mut rbuf,
        )
        .await;
        if !done || req.close || ctl.closing.load(Ordering::Relaxed) {
            let _ = io.shutdown().await;
            return None;
        }
    }
}

/// Parse the request head at the start of `buf`; when it is one for the fast path, encode the
/// backend's request head into `bufs.up` and the request id into `bufs.rid`.
fn parse_request(buf: &[u8], snap: &Snapshot, client: &Client, bufs: &mut Bufs) -> Parsed {
    let max = snap.cfg.limits.max_header_bytes.max(8192);
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max => n,
        Ok(httparse::Status::Partial) if buf.len() <= max => return Parsed::Partial,
        _ => return Parsed::HandOff,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::HandOff;
    };
    if !target.starts_with('/') {
        return Parsed::HandOff;
    }
    let headers: &[httparse::Header<'_>] = req.headers;
    // First pass: what decides the request's handling.
    let mut host: Option<&str> = None;
    let mut close = false;
    let mut listed: [&[u8]; 8] = [&[]; 8];
    let mut n_listed = 0;
    let mut xff: Option<&[u8]> = None;
    let mut rid: Option<&[u8]> = None;
    let mut upgrade: Option<&[u8]> = None;
    let mut conn_upgrade = false;
    for h in headers {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            if host.is_none() {
                match std::str::from_utf8(h.value) {
                    Ok(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()) => {
                        host = Some(v);
                    }
                    _ => return Parsed::HandOff,
                }
            }
        } else if n.eq_ignore_ascii_case("content-length") {
            if h.value.trim_ascii() != b"0" {
                return Parsed::HandOff;
            }
        } else if n.eq_ignore_ascii_case("transfer-encoding") || n.eq_ignore_ascii_case("expect") {
            return Parsed::HandOff;
        } else if n.eq_ignore_ascii_case("upgrade") {
            if upgrade.is_some() {
                return Parsed::HandOff;
            }
            upgrade = Some(h.value);
        } else if n.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    conn_upgrade = true;
                } else if !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") {
                    if n_listed == listed.len() {
                        return Parsed::HandOff;
                    }
                    listed[n_listed] = t;
                    n_listed += 1;
                }
            }
        } else if n.eq_ignore_ascii_case("x-forwarded-for") {
            xff = xff.or(Some(h.value));
        } else if n.eq_ignore_ascii_case("x-request-id") {
            rid = rid.or(Some(h.value));
        }
    }
    let Some(host) = host else {
        return Parsed::HandOff;
    };
    // A protocol upgrade (WebSocket) is relayed here, then both connections are spliced; an
    // `Upgrade` that is not one (no `Connection: upgrade`, not a GET, h2c, whose settings
    // field is hop-by-hop) is hyper's, which ignores it.
    let upgrade = match upgrade {
        None => None,
        Some(v)
            if conn_upgrade && method == "GET" && !v.trim_ascii().eq_ignore_ascii_case(b"h2c") =>
        {
            Some(v)
        }
        Some(_) => return Parsed::HandOff,
    };
    if snap.cache.is_some() && upgrade.is_none() {
        return Parsed::HandOff;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let field = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let pool = if snap.cfg.routes.is_empty() {
        0
    } else {
        crate::routing::route(
            snap.cfg.routes.iter().map(|r| &r.matcher),
            Some(host),
            path,
            |n| field(n).map(str::to_owned),
        )
        .map_or(0, |i| snap.route_pools[i])
    };
    let p = snap.pools.get(pool);
    let sticky = match (snap.cfg.sticky_cookie.as_deref(), p) {
        (Some(name), Some(p)) => headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|s| s.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| p.sticky_ids.iter().position(|s| s == v))
            .filter(|&i| p.backends[i].available()),
        _ => None,
    };
    let hash_key = p
        .and_then(|p| p.hash_header.as_ref())
        .and_then(|h| {
            headers
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(h.as_str()))
        })
        .map(|f| f.value.to_vec());
    // The request id: the client's when sane, else a new one.
    bufs.rid.clear();
    match rid {
        Some(v) if !v.is_empty() && v.len() <= 128 && v.iter().all(u8::is_ascii_graphic) => {
            bufs.rid.extend_from_slice(v);
        }
        _ => new_request_id(&mut bufs.rid),
    }
    // The backend's request head.
    let up = &mut bufs.up;
    up.clear();
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    up.extend_from_slice(target.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    for h in headers {
        let n = h.name;
        let dropped = HOP_BY_HOP_AND_SET.iter().any(|d| n.eq_ignore_ascii_case(d))
            || listed[..n_listed]
                .iter()
                .any(|l| n.as_bytes().eq_ignore_ascii_case(l));
        if !dropped {
            up.extend_from_slice(n.as_bytes());
            up.extend_from_slice(b": ");
            up.extend_from_slice(h.value);
            up.extend_from_slice(b"\r\n");
        }
    }
    up.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = xff.filter(|v| std::str::from_utf8(v).is_ok()) {
        up.extend_from_slice(prev);
        up.extend_from_slice(b", ");
    }
    up.extend_from_slice(client.peer_ip.as_bytes());
    up.extend_from_slice(if client.tls {
        b"\r\nx-forwarded-proto: https\r\nx-request-id: "
    } else {
        b"\r\nx-forwarded-proto: http\r\nx-request-id: "
    });
    up.extend_from_slice(&bufs.rid);
    if let Some(v) = upgrade {
        up.extend_from_slice(b"\r\nconnection: upgrade\r\nupgrade: ");
        up.extend_from_slice(v);
    }
    up.extend_from_slice(b"\r\n\r\n");
    Parsed::Request(Req {
        len,
        head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
        ),
        close,
        upgrade: upgrade.is_some(),
        pool,
        sticky,
        hash_key,
    })
}

/// Request fields not passed on as they came: hop-by-hop ones and those the proxy sets.
const HOP_BY_HOP_AND_SET: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
];

fn new_request_id(out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    out.extend_from_slice(&buf);
}

/// One request to a backend and its response to the client. False: the client connection
/// must be closed (the response could not be completed).
#[allow(clippy::too_many_arguments, clippy::too_many_lines)]
async fn exchange<S>(
    inner: &Inner,
    snap: &Snapshot,
    client: &Client,
    io: &mut S,
    ups: &Arc<Upstreams>,
    req: &Req,
    closing: &AtomicBool,
    bufs: &mut Bufs,
    deadline: &mut Deadline,
    rbuf: &mut BytesMut,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The listener may stop while the backend answers: the response then ends the connection.
    let close = || req.close || closing.load(Ordering::Relaxed);
    let Some(pool) = snap.pools.get(req.pool) else {
        inner.none_backend.count_status(503);
        return reply(io, 503, "no backend pool".into(), &bufs.rid, close()).await;
    };
    let ctx = PickContext {
        client_ip: Some(client.peer.ip()),
        hash_key: req.hash_key.as_deref(),
    };
    let timeout = Duration::from_millis(snap.cfg.limits.response_timeout_ms);
    let connect_timeout = Duration::from_millis(snap.cfg.limits.connect_timeout_ms);
    let attempts = pool.backends.len().clamp(1, 3);
    let mut tried = [0usize; 3];
    let mut last_err = None;
    for attempt in 0..attempts {
        let idx = match req.sticky {
            Some(i) if attempt == 0 => Some(i),
            _ => {
                pool.pick_or_await_probe(&inner.changes, &ctx, &tried[..attempt])
                    .await
            }
        };
        let Some(idx) = idx else { break };
        tried[attempt] = idx;
        let backend = &pool.backends[idx];
        let guard = backend.begin_ref();
        let started = Instant::now();
        deadline.set(started + timeout);
        bufs.out.clear();
        let result = {
            let out = &mut bufs.out;
            let mut send = pin!(ups.send_head(backend.addr, &bufs.up, connect_timeout, |b| {
                h1::parse_response_relay(b, req.head, req.upgrade, out)
            }));
            poll_fn(|cx| {
                if let Poll::Ready(r) = send.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                deadline.poll_expired(cx).map(|()| None)
            })
            .await
        };
        let (conn, head) = match result {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                backend.record(false, &inner.name, &snap.cfg.outlier);
                if e.is_connect() || req.idempotent {
                    tracing::debug!(lb = %inner.name, backend = %backend.name, error = %e, "backend request failed, trying another");
                    last_err = Some(e.retry_reason(&backend.name));
                    continue;
                }
                inner.none_backend.count_status(502);
                let msg = format!("502 Bad Gateway: backend {} failed: {e}", backend.name);
                return reply(io, 502, msg, &bufs.rid, close()).await;
            }
            None => {
                backend.record(false, &inner.name, &snap.cfg.outlier);
                inner.none_backend.count_status(504);
                let msg = format!(
                    "504 Gateway Timeout: backend {} did not answer within {} ms",
                    backend.name, snap.cfg.limits.response_timeout_ms
                );
                return reply(io, 504, msg, &bufs.rid, close()).await;
            }
        };
        let status = head.status.as_u16();
        backend.record(!matches!(status, 502..=504), &inner.name, &snap.cfg.outlier);
        backend.metrics.count_status(status);
        backend
            .metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        let out = &mut bufs.out;
        if let Some(name) = snap.cfg.sticky_cookie.as_deref() {
            if req.sticky != Some(idx) {
                out.extend_from_slice(b"set-cookie: ");
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                out.extend_from_slice(pool.sticky_ids[idx].as_bytes());
                out.extend_from_slice(b"; Path=/; HttpOnly; SameSite=Lax\r\n");
            }
        }
        if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
            finish_head(out, &head, &bufs.rid, false);
            let (up, up_buf) = conn.into_parts();
            splice(io, up, up_buf, rbuf, out, &backend.metrics).await;
            drop(guard);
            return false;
        }
        let chunked = finish_head(out, &head, &bufs.rid, close());
        let mut body = ups.body(conn, head.framing, head.keep_alive);
        let ok = relay_body(
            io,
            &mut body,
            out,
            chunked,
            &backend.metrics.bytes_from_backend,
        )
        .await;
        drop(guard);
        return ok;
    }
    inner.none_backend.count_status(503);
    let msg = match last_err {
        Some(e) => format!(
            "503 Service Unavailable: all backends of load balancer {} failed (last: {e})",
            inner.name
        ),
        None => format!(
            "503 Service Unavailable: load balancer {} has no healthy backend",
            inner.name
        ),
    };
    reply(io, 503, msg, &bufs.rid, close()).await
}
