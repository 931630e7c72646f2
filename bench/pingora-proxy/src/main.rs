//! Benchmark-only HTTP/1.1 reverse proxy on Cloudflare's pingora, configured like the other
//! proxies in `scripts/bench-lb` (nginx, `haproxy`, `nimbus-lb-proxy`): N worker threads,
//! keep-alive pooled upstream connections to one backend, and `X-Forwarded-For`,
//! `X-Forwarded-Proto` and `X-Request-Id` (request and response) added to every request.
//!
//! It exists only to measure pingora against nimbus's hyper-based L7 proxy (issue 7); it is
//! outside the cargo workspace so the product build and CI never compile it.
//!
//! Usage: `nimbus-bench-pingora-proxy --listen 127.0.0.1:18186 --backend 127.0.0.1:18180
//!         [--workers N] [--no-work-stealing]`

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{http_proxy_service, ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::Result;

/// The proxy: every request goes to the one backend.
struct Proxy {
    backend: SocketAddr,
}

/// Per-request state: the request id echoed on the response.
#[derive(Default)]
struct Ctx {
    request_id: String,
}

/// The incoming `X-Request-Id` if it is sane (like nimbus: 1..=128 visible ASCII bytes), else
/// a fresh random 128-bit id in hex.
fn request_id(req: &RequestHeader) -> String {
    if let Some(v) = req.headers.get("x-request-id") {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(u8::is_ascii_graphic) {
            return String::from_utf8_lossy(b).into_owned();
        }
    }
    format!("{:032x}", rand::random::<u128>())
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // Plain HTTP to the backend; pingora pools the connection for reuse after the response.
        Ok(Box::new(HttpPeer::new(self.backend, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let xff = match req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        req.insert_header("X-Forwarded-For", xff)?;
        req.insert_header("X-Forwarded-Proto", "http")?;
        ctx.request_id = request_id(req);
        req.insert_header("X-Request-Id", ctx.request_id.as_str())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        resp.insert_header("X-Request-Id", ctx.request_id.as_str())?;
        Ok(())
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: nimbus-bench-pingora-proxy --listen ADDR --backend ADDR [--workers N] [--no-work-stealing]"
    );
    std::process::exit(2)
}

fn main() {
    let mut listen: Option<String> = None;
    let mut backend: Option<SocketAddr> = None;
    let mut workers = 2usize;
    let mut work_stealing = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next(),
            "--backend" => backend = args.next().and_then(|v| v.parse().ok()),
            "--workers" => {
                workers = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| usage());
            }
            "--no-work-stealing" => work_stealing = false,
            _ => usage(),
        }
    }
    let (Some(listen), Some(backend)) = (listen, backend) else {
        usage()
    };

    let conf = ServerConf {
        // Pingora gives each service its own runtime with this many threads.
        threads: workers,
        // Default true: one work-stealing tokio runtime; false: N single-threaded runtimes.
        work_stealing,
        // Idle keep-alive upstream connections kept (nginx/HAProxy benches keep 256).
        upstream_keepalive_pool_size: 256,
        // The bench stops proxies with SIGTERM: exit promptly instead of the 5 min default.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: format!("/tmp/nimbus-bench-pingora-{}.pid", std::process::id()),
        upgrade_sock: format!("/tmp/nimbus-bench-pingora-{}.sock", std::process::id()),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = http_proxy_service(&server.configuration, Proxy { backend });
    svc.add_tcp(&listen);
    server.add_service(svc);
    server.run_forever();
}
