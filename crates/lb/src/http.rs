//! L7 reverse proxy: hyper server (HTTP/1.1 + HTTP/2) in front, keep-alive HTTP/1.1
//! connections to the backends behind, used from the client connection's task
//! ([`crate::upstream`]'s own HTTP/1.1 client).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::backend::ActiveGuard;
use crate::balancer::PickContext;
use crate::cache::{self, CachedResponse, Lookup};
use crate::config::Limits;
use crate::routing;
use crate::runtime::{Inner, Snapshot};
use crate::upstream::{UpBody, Upstreams};

/// A body that counts its data bytes and holds the backend's in-flight guard until it ends
/// (a response body also holds its backend connection: see [`UpBody`]).
pub(crate) struct Counted<B: Body> {
    inner: B,
    counter: Counter,
    _guard: Option<ActiveGuard>,
}

impl<B: Body> Counted<B> {
    fn new(inner: B, counter: Counter, guard: Option<ActiveGuard>) -> Self {
        Self {
            inner,
            counter,
            _guard: guard,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.counter.inc_by(d.len() as u64);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Body of requests sent to backends.
pub(crate) type ReqBody = Either<Counted<Incoming>, Full<Bytes>>;
/// Body of responses sent to clients.
pub(crate) type RespBody = Either<Counted<UpBody>, Full<Bytes>>;
/// The client-facing connection builder for these limits.
pub(crate) fn server_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes.max(8192) as u32);
    b
}

/// Serve one client connection until it closes; on listener stop, shut it down gracefully and
/// give it the drain timeout. Requests start on the fast path ([`crate::fast`]), which hands
/// the connection to hyper for what it does not serve.
pub(crate) async fn serve<S>(
    inner: Arc<Inner>,
    stream: S,
    peer: SocketAddr,
    tls: bool,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = Duration::from_millis(inner.snap.load().cfg.limits.drain_timeout_ms);
    // Its own token: waiting on the listener's would lock that token's waiter list, shared by
    // every connection of every worker, on each wake-up of this task.
    let cancel = cancel.child_token();
    let conns = inner.conns.clone();
    conns.inc();
    let ups = Upstreams::new();
    let client = crate::fast::Client {
        peer,
        peer_ip: peer.ip().to_string(),
        tls,
    };
    if let Some(rest) = crate::fast::serve(&inner, stream, &client, &ups, &cancel, drain).await {
        serve_hyper(&inner, rest, peer, tls, &ups, &cancel, drain).await;
    }
    ups.release();
    conns.dec();
}

/// Serve the rest of a client connection with hyper (HTTP/1.1 and HTTP/2).
async fn serve_hyper<S>(
    inner: &Arc<Inner>,
    stream: crate::fast::Rewind<S>,
    peer: SocketAddr,
    tls: bool,
    ups: &Arc<Upstreams>,
    cancel: &CancellationToken,
    drain: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = inner.snap.load().http.clone();
    let client = Arc::new(ClientConn {
        peer,
        tls,
        xff: HeaderValue::from_str(&peer.ip().to_string()).ok(),
        ups: Arc::clone(ups),
    });
    let svc_inner = Arc::clone(inner);
    let svc = hyper::service::service_fn(move |req| {
        let inner = Arc::clone(&svc_inner);
        let client = Arc::clone(&client);
        async move { Ok::<_, Infallible>(handle(&inner, &client, req).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        () = cancel.cancelled() => None,
    };
    match ended {
        Some(Err(e)) => {
            tracing::debug!(lb = %inner.name, %peer, error = %e, "client connection ended with an error");
        }
        Some(Ok(())) => {}
        None => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(drain, conn.as_mut()).await;
        }
    }
}

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names notes which hop-by-hop headers are present; most messages carry
    // none, or only `Connection: keep-alive` (nginx answers with it), so hashed removals of
    // absent names and parsing `close`/`keep-alive` tokens are skipped.
    let mut present = 0u16;
    for k in h.keys() {
        // Same order as HOP_BY_HOP; a string match is cheaper than 8 `HeaderName` compares.
        let i = match k.as_str() {
            "connection" => 0,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "proxy-authenticate" => 3,
            "te" => 4,
            "trailer" => 5,
            "transfer-encoding" => 6,
            "upgrade" => 7,
            _ => continue,
        };
        present |= 1 << i;
    }
    if present == 0 {
        return;
    }
    // HOP_BY_HOP[0] is Connection: the headers it names are hop-by-hop too.
    if present & 1 != 0 {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in &listed {
            h.remove(n);
        }
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Per client connection: who it is and its backend connections.
struct ClientConn {
    peer: SocketAddr,
    tls: bool,
    /// The client's address as an `X-Forwarded-For` value.
    xff: Option<HeaderValue>,
    ups: Arc<Upstreams>,
}

fn request_id(h: &HeaderMap) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    if let Some(v) = h.get(&X_REQUEST_ID) {
        if !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(u8::is_ascii_graphic) {
            return v.clone();
        }
    }
    let id: u128 = rand::random();
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

fn text(status: StatusCode, msg: String) -> Response<RespBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(msg + "\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(inner: &Inner, client: &ClientConn, req: Request<Incoming>) -> Response<RespBody> {
    let snap = inner.snap.load_full();
    let rid = request_id(req.headers());
    let mut resp = proxy(inner, &snap, req, client, &rid).await;
    resp.headers_mut().insert(X_REQUEST_ID.clone(), rid);
    resp
}

fn sticky_cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[allow(clippy::too_many_lines)]
async fn proxy(
    inner: &Inner,
    snap: &Snapshot,
    req: Request<Incoming>,
    client: &ClientConn,
    rid: &HeaderValue,
) -> Response<RespBody> {
    let (peer, tls) = (client.peer, client.tls);
    let (mut parts, body) = req.into_parts();
    // A `HeaderValue` clone shares the bytes (no copy).
    let host_value: Option<HeaderValue> = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let host: Option<&str> = host_value.as_ref().and_then(|h| h.to_str().ok());
    let pool_idx = if snap.cfg.routes.is_empty() {
        0
    } else {
        let headers = &parts.headers;
        routing::route(
            snap.cfg.routes.iter().map(|r| &r.matcher),
            host,
            parts.uri.path(),
            |n| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            },
        )
        .map_or(0, |i| snap.route_pools[i])
    };
    let Some(pool) = snap.pools.get(pool_idx) else {
        inner.none_backend.count_status(503);
        return text(StatusCode::SERVICE_UNAVAILABLE, "no backend pool".into());
    };
    let pq: PathAndQuery = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));

    // Edge cache lookup.
    let cache_ctx = snap
        .cache
        .as_ref()
        .filter(|_| cache::request_cacheable(&parts.method, &parts.headers))
        .map(|c| (c, cache::primary_key(host.unwrap_or(""), pq.as_str())));
    let client_headers = cache_ctx.as_ref().map(|_| parts.headers.clone());
    let mut stale = None;
    if let Some((store, key)) = &cache_ctx {
        let found = store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .lookup(key, &parts.headers, Instant::now());
        match found {
            Lookup::Fresh(e) => {
                inner.cache_metrics.hit.inc();
                return from_cache(inner, &e, &parts.method, &parts.headers, "HIT");
            }
            Lookup::Stale(e) => stale = Some(e),
            Lookup::Miss => {}
        }
    }

    // Request headers to the backend.
    strip_hop_by_hop(&mut parts.headers);
    let xff = match parts
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", peer.ip())).ok(),
        None => client.xff.clone(),
    };
    if let Some(v) = xff {
        parts.headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    parts.headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    parts.headers.insert(X_REQUEST_ID.clone(), rid.clone());
    if !parts.headers.contains_key(header::HOST) {
        if let Some(v) = &host_value {
            parts.headers.insert(header::HOST, v.clone());
        }
    }
    if let Some(e) = &stale {
        parts.headers.remove(header::IF_NONE_MATCH);
        parts.headers.remove(header::IF_MODIFIED_SINCE);
        if let Some(v) = e.headers.get(header::ETAG) {
            parts.headers.insert(header::IF_NONE_MATCH, v.clone());
        }
        if let Some(v) = e.headers.get(header::LAST_MODIFIED) {
            parts.headers.insert(header::IF_MODIFIED_SINCE, v.clone());
        }
    }

    let sticky_name = snap.cfg.sticky_cookie.as_deref();
    let sticky_idx = sticky_name
        .and_then(|c| sticky_cookie(&parts.headers, c))
        .and_then(|v| pool.sticky_ids.iter().position(|s| s == v))
        .filter(|&i| pool.backends[i].available());
    let hash_key: Option<Vec<u8>> = pool
        .hash_header
        .as_ref()
        .and_then(|h| parts.headers.get(h))
        .map(|v| v.as_bytes().to_vec());
    let ctx = PickContext {
        client_ip: Some(peer.ip()),
        hash_key: hash_key.as_deref(),
    };

    let bodyless = body.is_end_stream();
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let mut body = Some(body);
    let attempts = if bodyless {
        pool.backends.len().clamp(1, 3)
    } else {
        1
    };
    let timeout = Duration::from_millis(snap.cfg.limits.response_timeout_ms);
    let connect_timeout = Duration::from_millis(snap.cfg.limits.connect_timeout_ms);
    // At most 3 attempts: no allocation for the backends tried.
    let mut tried = [0usize; 3];
    let mut last_err = None;
    for attempt in 0..attempts {
        let idx = match sticky_idx {
            Some(i) if attempt == 0 => Some(i),
            _ => {
                pool.pick_or_await_probe(&inner.changes, &ctx, &tried[..attempt])
                    .await
            }
        };
        let Some(idx) = idx else { break };
        tried[attempt] = idx;
        let backend = &pool.backends[idx];
        let guard = backend.begin();
        // Origin-form request target.
        let mut up = http::uri::Parts::default();
        up.path_and_query = Some(pq.clone());
        let Ok(uri) = Uri::from_parts(up) else {
            inner.none_backend.count_status(400);
            return text(StatusCode::BAD_REQUEST, "invalid request target".into());
        };
        let b: ReqBody = match body.take() {
            Some(incoming) if !bodyless => Either::Left(Counted::new(
                incoming,
                backend.metrics.bytes_to_backend.clone(),
                None,
            )),
            _ => Either::Right(Full::new(Bytes::new())),
        };
        let mut breq = Request::new(b);
        *breq.method_mut() = parts.method.clone();
        *breq.uri_mut() = uri;
        *breq.version_mut() = Version::HTTP_11;
        *breq.headers_mut() = if attempt + 1 < attempts {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        if !breq.headers().contains_key(header::HOST) {
            // Neither a Host header nor an authority: name the backend, like a client would.
            if let Ok(v) = HeaderValue::from_str(&backend.addr.to_string()) {
                breq.headers_mut().insert(header::HOST, v);
            }
        }
        let started = Instant::now();
        let result = tokio::time::timeout(
            timeout,
            client.ups.send(backend.addr, breq, connect_timeout),
        )
        .await;
        let resp = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                backend.record(false, &inner.name, &snap.cfg.outlier);
                // A connect error never reached the backend; an idempotent request without a
                // body (e.g. on a pooled connection the backend just closed) is safe to resend.
                if e.is_connect() || (bodyless && idempotent) {
                    tracing::debug!(lb = %inner.name, backend = %backend.name, error = %e, "backend request failed, trying another");
                    last_err = Some(e.retry_reason(&backend.name));
                    continue;
                }
                inner.none_backend.count_status(502);
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("502 Bad Gateway: backend {} failed: {e}", backend.name),
                );
            }
            Err(_) => {
                backend.record(false, &inner.name, &snap.cfg.outlier);
                inner.none_backend.count_status(504);
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "504 Gateway Timeout: backend {} did not answer within {} ms",
                        backend.name, snap.cfg.limits.response_timeout_ms
                    ),
                );
            }
        };
        let status = resp.status();
        backend.record(
            !matches!(status.as_u16(), 502..=504),
            &inner.name,
            &snap.cfg.outlier,
        );
        backend.metrics.count_status(status.as_u16());
        backend
            .metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        // The upstream client has dropped the response's hop-by-hop fields.
        let (mut rparts, rbody) = resp.into_parts();
        if let Some(name) = sticky_name {
            if sticky_idx != Some(idx) {
                let c = format!(
                    "{name}={}; Path=/; HttpOnly; SameSite=Lax",
                    pool.sticky_ids[idx]
                );
                if let Ok(v) = HeaderValue::from_str(&c) {
                    rparts.headers.append(header::SET_COOKIE, v);
                }
            }
        }
        let rbody = Counted::new(
            rbody,
            backend.metrics.bytes_from_backend.clone(),
            Some(guard),
        );
        if let (Some((store, key)), Some(chdrs)) = (&cache_ctx, &client_headers) {
            return cache_fill(
                inner,
                store,
                key,
                chdrs,
                &parts.method,
                stale.as_deref(),
                rparts,
                rbody,
            )
            .await;
        }
        return Response::from_parts(rparts, Either::Left(rbody));
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
    text(StatusCode::SERVICE_UNAVAILABLE, msg)
}

#[allow(clippy::too_many_arguments)]
async fn cache_fill(
    inner: &Inner,
    store: &std::sync::Mutex<cache::CacheStore>,
    key: &str,
    client_headers: &HeaderMap,
    method: &Method,
    stale: Option<&CachedResponse>,
    rparts: http::response::Parts,
    rbody: Counted<UpBody>,
) -> Response<RespBody> {
    let lock = || {
        store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let now = Instant::now();
    if let Some(old) = stale {
        if rparts.status == StatusCode::NOT_MODIFIED {
            let fresh = lock().refresh(key, client_headers, old, &rparts.headers, now);
            inner.cache_metrics.revalidated.inc();
            if let Some(fresh) = fresh {
                return from_cache(inner, &fresh, method, client_headers, "REVALIDATED");
            }
        }
    }
    inner.cache_metrics.miss.inc();
    let max = lock().max_object();
    let len = rparts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let ttl = cache::storable_for(rparts.status, &rparts.headers, SystemTime::now());
    let mut resp_parts = rparts;
    resp_parts
        .headers
        .insert(X_CACHE.clone(), HeaderValue::from_static("MISS"));
    match (ttl, len) {
        (Some(ttl), Some(len)) if *method == Method::GET && len <= max => {
            let Ok(collected) = rbody.collect().await else {
                return text(
                    StatusCode::BAD_GATEWAY,
                    "502 Bad Gateway: backend response body failed".into(),
                );
            };
            let body = collected.to_bytes();
            let mut headers = resp_parts.headers.clone();
            headers.remove(&X_CACHE);
            lock().insert(
                key,
                client_headers,
                CachedResponse {
                    status: resp_parts.status,
                    headers,
                    body: body.clone(),
                    stored_at: now,
                    fresh_until: now + ttl,
                },
            );
            Response::from_parts(resp_parts, Either::Right(Full::new(body)))
        }
        _ => Response::from_parts(resp_parts, Either::Left(rbody)),
    }
}

fn from_cache(
    inner: &Inner,
    e: &CachedResponse,
    method: &Method,
    client: &HeaderMap,
    label: &'static str,
) -> Response<RespBody> {
    let mut headers = e.headers.clone();
    let age = e.stored_at.elapsed().as_secs();
    headers.insert(header::AGE, HeaderValue::from(age));
    headers.insert(X_CACHE.clone(), HeaderValue::from_static(label));
    let etag = e.headers.get(header::ETAG);
    let (status, body) = if cache::if_none_match(client, etag) {
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::CONTENT_TYPE);
        (StatusCode::NOT_MODIFIED, Bytes::new())
    } else if *method == Method::HEAD {
        (e.status, Bytes::new())
    } else {
        (e.status, e.body.clone())
    };
    if label == "HIT" {
        inner.cache_backend.count_status(status.as_u16());
    }
    let mut r = Response::new(Either::Right(Full::new(body)));
    *r.status_mut() = status;
    *r.headers_mut() = headers;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_lists_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("X-Custom, keep-alive"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-kept"]);
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before, "nothing to strip leaves the headers alone");
        // `Connection: keep-alive` (as nginx sends) with a Keep-Alive header, and `close`.
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn request_ids_are_kept_when_sane_else_generated_as_hex() {
        let mut h = HeaderMap::new();
        let id = request_id(&h);
        assert_eq!(id.len(), 32);
        assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(request_id(&h), id);
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(request_id(&h).len(), 32);
    }
}
