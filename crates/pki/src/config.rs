//! TLS 1.3-only rustls configurations (ring, AES-128-GCM preferred).

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, Error, ServerConfig, SignatureScheme};

use crate::{CertStore, PkiError};

/// ring with TLS 1.3 suites only, AES-128-GCM first.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// A server config presenting `certs`' current certificate; `client_auth` verifies client
/// certificates (none: no client certificates asked).
pub fn server_config(
    certs: Arc<CertStore>,
    client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<ServerConfig, PkiError> {
    let b = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let b = match client_auth {
        Some(v) => b.with_client_cert_verifier(v),
        None => b.with_no_client_auth(),
    };
    let mut cfg = b.with_cert_resolver(certs);
    // No resumption: a resumed session skips the client-certificate check, and every
    // handshake must consult the current revocation list.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A client config verifying servers with `verifier`, presenting `certs` if given.
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    certs: Option<Arc<CertStore>>,
) -> Result<ClientConfig, PkiError> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match certs {
        Some(c) => b.with_client_cert_resolver(c),
        None => b.with_no_client_auth(),
    })
}

/// Records the chain a server presents and refuses the handshake: how a client learns an
/// unknown CA to show its fingerprint (trust on first use) without sending anything.
#[derive(Debug, Default)]
pub struct ChainProbe {
    /// The chain the server presented (leaf first).
    pub chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for ChainProbe {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if let Ok(mut c) = self.chain.lock() {
            c.clear();
            c.push(end_entity.clone().into_owned());
            c.extend(intermediates.iter().map(|i| i.clone().into_owned()));
        }
        Err(Error::General("chain recorded".into()))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("probe only".into()))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("probe only".into()))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config whose handshakes only record the server's chain in `probe`.
pub fn pinning_probe_config(probe: Arc<ChainProbe>) -> Result<ClientConfig, PkiError> {
    client_config(probe, None)
}
