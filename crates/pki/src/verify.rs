//! rustls verifiers for the cluster: the chain must lead to the cluster CA, the leaf must name
//! a nimbus identity of an accepted role, and neither its serial nor its holder may be
//! revoked. Host names are not checked: the identity is the URI SAN, not an address.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};

use crate::{PeerCert, Revocation, Role};

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Checks identity, role and revocation of an already chain-verified leaf.
fn check_identity(
    end_entity: &CertificateDer<'_>,
    roles: &[Role],
    revocation: &dyn Revocation,
) -> Result<PeerCert, Error> {
    let peer = PeerCert::from_der(end_entity).map_err(|e| {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    })?;
    if !roles.contains(&peer.identity.role) {
        return Err(Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
    }
    if revocation.is_revoked(&peer) {
        return Err(Error::InvalidCertificate(CertificateError::Revoked));
    }
    Ok(peer)
}

/// Client side: verifies the server's certificate against the cluster CA and a role.
#[derive(Debug)]
pub struct ClusterServerVerifier {
    roots: Arc<RootCertStore>,
    roles: Vec<Role>,
    revocation: Arc<dyn Revocation>,
    fallback: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl ClusterServerVerifier {
    /// Accepts leaves of the CA in `roots` whose role is one of `roles`.
    pub fn new(
        roots: Arc<RootCertStore>,
        roles: Vec<Role>,
        revocation: Arc<dyn Revocation>,
    ) -> Self {
        Self {
            roots,
            roles,
            revocation,
            fallback: None,
        }
    }

    /// Also accepts a leaf without a nimbus identity (an operator's `--tls-cert`) if it
    /// chains to `roots` and names the host (standard WebPKI rules).
    pub fn with_host_name_fallback(mut self) -> Result<Self, crate::PkiError> {
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| crate::PkiError::Invalid(format!("server verifier: {e}")))?;
        self.fallback = Some(v);
        Ok(self)
    }
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if let Some(f) = &self.fallback {
            if PeerCert::from_der(end_entity).is_err() {
                return f.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                );
            }
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        check_identity(end_entity, &self.roles, self.revocation.as_ref())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Server side: verifies client certificates against the cluster CA, a role and the
/// revocation list; optional (bearer tokens still work) or mandatory.
#[derive(Debug)]
pub struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    roles: Vec<Role>,
    revocation: Arc<dyn Revocation>,
}

impl ClusterClientVerifier {
    /// Accepts client certificates of the CA in `roots` whose role is one of `roles`; with
    /// `mandatory` false a client may present none.
    pub fn new(
        roots: Arc<RootCertStore>,
        roles: Vec<Role>,
        revocation: Arc<dyn Revocation>,
        mandatory: bool,
    ) -> Result<Self, crate::PkiError> {
        let b = WebPkiClientVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        );
        let b = if mandatory {
            b
        } else {
            b.allow_unauthenticated()
        };
        let inner = b
            .build()
            .map_err(|e| crate::PkiError::Invalid(format!("client verifier: {e}")))?;
        Ok(Self {
            inner,
            roles,
            revocation,
        })
    }
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.roles, self.revocation.as_ref())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A root store holding the CA certificate(s) of `ca_pem`.
pub fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, crate::PkiError> {
    let mut store = RootCertStore::empty();
    for c in crate::certs_from_pem(ca_pem)? {
        store.add(c)?;
    }
    Ok(Arc::new(store))
}
