//! TLS termination: a rustls server config (TLS 1.3 only, ALPN h2 and http/1.1, optionally
//! fewer cipher suites) from PEM.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::LbError;

fn bad(m: impl Into<String>) -> LbError {
    LbError::Tls(m.into())
}

/// Parse a PEM certificate chain.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, LbError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate found in the certificate PEM"));
    }
    Ok(certs)
}

/// Parse a PEM private key.
pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, LbError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| bad(format!("private key PEM: {e}")))?
        .ok_or_else(|| bad("no private key found in the key PEM"))
}

/// Build the server config; refuses a key that does not match the certificate.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, LbError> {
    let certs = parse_certs(&tls.cert_pem)?;
    let key = parse_key(&tls.key_pem)?;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = cipher_suites(&tls.cipher_suites)?;
    let provider = Arc::new(provider);
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(format!("private key: {e}")))?;
    let certified = rustls::sign::CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .map_err(|_| bad("the private key does not match the certificate"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
    cfg.cert_resolver = Arc::new(Single(Arc::new(certified)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The TLS 1.3 suites named (IANA names, in order); all of them when `names` is empty.
fn cipher_suites(names: &[String]) -> Result<Vec<rustls::SupportedCipherSuite>, LbError> {
    use rustls::crypto::ring::cipher_suite as cs;
    let all = [
        ("TLS_AES_256_GCM_SHA384", cs::TLS13_AES_256_GCM_SHA384),
        ("TLS_AES_128_GCM_SHA256", cs::TLS13_AES_128_GCM_SHA256),
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ];
    if names.is_empty() {
        return Ok(all.iter().map(|(_, s)| *s).collect());
    }
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let Some((_, s)) = all.iter().find(|(name, _)| name == n) else {
            return Err(bad(format!(
                "unknown TLS 1.3 cipher suite {n:?} (known: TLS_AES_128_GCM_SHA256, \
                 TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256)"
            )));
        };
        if out.contains(s) {
            return Err(bad(format!("cipher suite {n:?} is listed twice")));
        }
        out.push(*s);
    }
    Ok(out)
}

#[derive(Debug)]
struct Single(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Single {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}
