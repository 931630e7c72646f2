//! Serving the API over TLS 1.3: a rustls handshake per connection, then HTTP/1.1 (with
//! upgrades) into the router, each request carrying the peer address and, if the client
//! presented a verified certificate, its [`PeerIdentity`]. Such a request is refused before
//! the router (`401 certificate_expired` / `certificate_revoked`, and the connection closed)
//! once the certificate expired or was revoked since the handshake: a kept-alive connection
//! does not outlive its certificate.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::identity::PeerIdentity;

/// How long a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closed connection still reads (and drops) what the client sends.
const LINGER: Duration = Duration::from_secs(2);

/// A connection that closes lingering: once dropped, its socket keeps reading and discarding
/// for up to [`LINGER`] before it closes. A request refused before its body was read (`401`,
/// `403`, `413`) ends the connection while the client may still be sending the body; closing
/// the socket at once with those bytes unread makes the kernel answer with a reset, which can
/// destroy the response on its way to the client.
struct Lingering(Option<tokio::net::TcpStream>);

impl Lingering {
    fn tcp(&mut self) -> Pin<&mut tokio::net::TcpStream> {
        Pin::new(self.0.as_mut().expect("the stream until drop"))
    }
}

impl tokio::io::AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut().tcp().poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().tcp().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().tcp().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.get_mut().tcp().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut tcp) = self.0.take() else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tcp.shutdown().await;
            let mut sink = [0u8; 16 << 10];
            let _ = tokio::time::timeout(LINGER, async {
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

/// Serves `router` on `listener` with `config` until the task is aborted.
pub fn serve(
    listener: TcpListener,
    router: Router,
    config: Arc<rustls::ServerConfig>,
    revocation: Arc<dyn nimbus_pki::Revocation>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { accept(&listener, router, config, revocation).await })
}

/// Serves `router` on `listener` with `config` until `stop` fires (or is dropped); the task
/// then hands the listener back (connections already accepted run on). Nothing is revoked
/// yet while it serves (the TLS bootstrap's provisional CA).
pub fn serve_until(
    listener: TcpListener,
    router: Router,
    config: Arc<rustls::ServerConfig>,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<TcpListener> {
    tokio::spawn(async move {
        tokio::select! {
            () = accept(&listener, router, config, Arc::new(nimbus_pki::NoRevocation)) => {}
            _ = stop => {}
        }
        listener
    })
}

async fn accept(
    listener: &TcpListener,
    router: Router,
    config: Arc<rustls::ServerConfig>,
    revocation: Arc<dyn nimbus_pki::Revocation>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(
            acceptor.clone(),
            tcp,
            addr,
            router.clone(),
            revocation.clone(),
        ));
    }
}

/// The error response that also ends the connection.
fn refused_response(e: nimbus_api::ApiError) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut r = crate::error::HttpError(e).into_response();
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    r
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    router: Router,
    revocation: Arc<dyn nimbus_pki::Revocation>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(Lingering(Some(tcp))))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%addr, "TLS handshake refused: {e}");
            return;
        }
        Err(_) => return,
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|d| nimbus_pki::PeerCert::from_der(d).ok())
        .map(PeerIdentity);
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(addr));
        let mut refused = None;
        if let Some(p) = &peer {
            let now = crate::identity::unix_now();
            if let Some(why) = nimbus_pki::stale(&p.0, revocation.as_ref(), now) {
                tracing::info!(%addr, peer = %p.0.identity, ?why, "request on a verified connection refused");
                refused = Some(refused_response(crate::identity::stale_error(&p.0, why)));
            }
            req.extensions_mut().insert(p.clone());
        }
        let router = router.clone();
        async move {
            match refused {
                Some(r) => Ok(r),
                None => router.oneshot(req).await,
            }
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), svc)
        .with_upgrades()
        .await
    {
        tracing::debug!(%addr, "TLS connection ended: {e}");
    }
}
