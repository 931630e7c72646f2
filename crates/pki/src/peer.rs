//! What a presented certificate says: its identity, serial and validity.

use crate::{Identity, PkiError};

/// A parsed peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Identity from the `nimbus://` URI SAN.
    pub identity: Identity,
    /// Serial number (hex, as [`crate::Issued::serial`]).
    pub serial: String,
    /// Not valid before (Unix seconds).
    pub not_before: i64,
    /// Not valid after (Unix seconds).
    pub not_after: i64,
}

impl PeerCert {
    /// Parses a DER certificate; one without a `nimbus://` identity is refused.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| PkiError::Parse(format!("reading the certificate: {e}")))?;
        let mut identity = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let GeneralName::URI(u) = n {
                    if let Some(id) = Identity::from_uri(u) {
                        identity = Some(id);
                    }
                }
            }
        }
        let identity = identity.ok_or_else(|| {
            PkiError::Invalid(
                "the certificate names no nimbus identity (nimbus://ROLE/NAME)".into(),
            )
        })?;
        Ok(Self {
            identity,
            serial: hex::encode(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}
