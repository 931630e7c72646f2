//! The agent API over TLS 1.3. The listener's config asks for a client certificate of the
//! cluster CA with the `server` role (see `nimbus_pki::ClusterClientVerifier`) but lets a
//! client without one in (a Prometheus with the metrics token): a request carries
//! [`ServerPeer`] exactly when its connection presented a server certificate, and `http.rs`
//! lets only such requests past its routes other than `/metrics` and `/agent/healthz`. Any
//! other certificate fails the handshake. A request over a connection whose server certificate
//! expired or was revoked since the handshake (the agent learns the revoked server
//! certificates with its assignments) is refused with `401 certificate_expired` /
//! `certificate_revoked` and the connection closed.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Marks a request that came over a connection authenticated by a server certificate.
#[derive(Debug, Clone)]
pub struct ServerPeer(pub String);

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The `401` (closing the connection) of a request whose server certificate is no longer good.
fn stale_response(p: &nimbus_pki::PeerCert, why: nimbus_pki::Stale) -> axum::response::Response {
    use axum::response::IntoResponse;
    use nimbus_api::{ApiError, ErrorBody, ErrorCode};
    let (code, what) = match why {
        nimbus_pki::Stale::Expired => (ErrorCode::CertificateExpired, "expired"),
        nimbus_pki::Stale::Revoked => (ErrorCode::CertificateRevoked, "is revoked"),
    };
    let error = ApiError::new(
        code,
        format!(
            "the certificate of {} (serial {}) {what}",
            p.identity, p.serial
        ),
    );
    (
        axum::http::StatusCode::UNAUTHORIZED,
        [(axum::http::header::CONNECTION, "close")],
        axum::Json(ErrorBody { error }),
    )
        .into_response()
}

/// Serves `router` on `listener` with `config` until the task is aborted.
pub fn serve(
    listener: TcpListener,
    router: Router,
    config: Arc<rustls::ServerConfig>,
    revocation: Arc<dyn nimbus_pki::Revocation>,
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
            let revocation = revocation.clone();
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
                    .and_then(|d| nimbus_pki::PeerCert::from_der(d).ok());
                let svc = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        let mut refused = None;
                        if let Some(p) = &peer {
                            match nimbus_pki::stale(p, revocation.as_ref(), unix_now()) {
                                Some(why) => {
                                    tracing::info!(%addr, peer = %p.identity, ?why, "agent API: request on a verified connection refused");
                                    refused = Some(stale_response(p, why));
                                }
                                None => {
                                    req.extensions_mut()
                                        .insert(ServerPeer(p.identity.name.clone()));
                                }
                            }
                        }
                        let router = router.clone();
                        async move {
                            match refused {
                                Some(r) => Ok(r),
                                None => router.oneshot(req).await,
                            }
                        }
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
