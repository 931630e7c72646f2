//! The agent API over TLS 1.3. The listener's config asks for a client certificate of the
//! cluster CA with the `server` role (see `nimbus_pki::ClusterClientVerifier`) but lets a
//! client without one in (a Prometheus with the metrics token): a request carries
//! [`ServerPeer`] exactly when its connection presented a server certificate, and `http.rs`
//! lets only such requests past its routes other than `/metrics` and `/agent/healthz`. Any
//! other certificate fails the handshake.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Marks a request that came over a connection authenticated by a server certificate.
#[derive(Debug, Clone)]
pub struct ServerPeer(pub String);

/// Serves `router` on `listener` with `config` until the task is aborted.
pub fn serve(
    listener: TcpListener,
    router: Router,
    config: Arc<rustls::ServerConfig>,
) -> tokio::task::JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("agent API: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, "agent API: TLS handshake refused: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                // Verified by the handshake: only a server certificate gets this far.
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|d| nimbus_pki::PeerCert::from_der(d).ok())
                    .map(|p| ServerPeer(p.identity.name));
                let svc = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        if let Some(p) = &peer {
                            req.extensions_mut().insert(p.clone());
                        }
                        router.clone().oneshot(req)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades()
                    .await;
            });
        }
    })
}
