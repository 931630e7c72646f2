//! The leaf certificate a process presents, swapped in place when renewed: every new
//! handshake (either side) picks the current one; open connections keep theirs.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::{PeerCert, PkiError};

/// The current certificate and key.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    peer: Option<PeerCert>,
}

fn load(chain_pem: &str, key_pem: &str) -> Result<Loaded, PkiError> {
    let chain = crate::certs_from_pem(chain_pem)?;
    let peer = PeerCert::from_der(&chain[0]).ok();
    let key = crate::key_from_pem(key_pem)?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(Loaded {
        key: Arc::new(CertifiedKey::new(chain, signer)),
        peer,
    })
}

impl CertStore {
    /// A store presenting `chain_pem` (leaf first, then the CA) with `key_pem`.
    pub fn new(chain_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        Ok(Self {
            current: ArcSwap::from_pointee(load(chain_pem, key_pem)?),
        })
    }

    /// Replaces the certificate for new handshakes.
    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        self.current.store(Arc::new(load(chain_pem, key_pem)?));
        Ok(())
    }

    /// What the current certificate says (`None`: not a nimbus identity, e.g. an operator's
    /// certificate for the public API).
    pub fn current(&self) -> Option<PeerCert> {
        self.current.load().peer.clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// When to renew a certificate valid from `not_before` to `not_after` (Unix seconds): at 2/3
/// of its life.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) * 2 / 3
}
