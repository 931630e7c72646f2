//! The cluster's internal certificate authority and the TLS configurations built on it.
//!
//! Every certificate the CA issues names one identity: a role (`server` or `agent`) and a
//! name, carried as the URI subject-alternative name `nimbus://<role>/<name>`. Peers check the
//! chain against the cluster CA (not a host name: servers and agents are reached by address)
//! and then the role: the agent API accepts only `server` certificates, the Raft endpoint only
//! `server` certificates, the public API any valid certificate or a bearer token.
//!
//! - [`ca`]: CA creation, key + CSR generation, issuance from a CSR;
//! - [`peer`]: what a presented certificate says (identity, serial, validity);
//! - [`verify`]: rustls verifiers that check chain, role and a revocation list;
//! - [`revocation`]: revocation lists, and the per-request check of a verified connection;
//! - [`store`]: the hot-swappable leaf certificate both TLS sides resolve per handshake, and
//!   when to renew it;
//! - [`config`]: TLS 1.3-only rustls configs (AES-128-GCM first, ECDSA P-256 keys).

pub mod ca;
pub mod config;
pub mod peer;
pub mod revocation;
pub mod store;
pub mod verify;

pub use ca::{new_key_and_csr, Ca, Issued};
pub use config::{client_config, pinning_probe_config, server_config};
pub use peer::PeerCert;
pub use revocation::{stale, NoRevocation, Revocation, ServerRevocationList, Stale};
pub use store::{renew_at, CertStore};
pub use verify::{ClusterClientVerifier, ClusterServerVerifier};

/// What a certificate holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A control-plane server.
    Server,
    /// A node agent.
    Agent,
}

impl Role {
    /// The role's name in the URI SAN.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Agent => "agent",
        }
    }
}

/// A certificate holder: role and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Role.
    pub role: Role,
    /// Node or server name (a DNS label).
    pub name: String,
}

impl Identity {
    /// An identity.
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Self {
            role,
            name: name.into(),
        }
    }

    /// `nimbus://<role>/<name>`.
    pub fn uri(&self) -> String {
        format!("nimbus://{}/{}", self.role.as_str(), self.name)
    }

    /// Parses `nimbus://<role>/<name>`.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("nimbus://")?;
        let (role, name) = rest.split_once('/')?;
        let role = match role {
            "server" => Role::Server,
            "agent" => Role::Agent,
            _ => return None,
        };
        valid_name(name).then(|| Self::new(role, name))
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.role.as_str(), self.name)
    }
}

/// A name an identity may carry: 1 to 63 lowercase letters, digits or '-'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// PKI failures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Generating or signing failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM or DER input could not be read.
    #[error("{0}")]
    Parse(String),
    /// The CSR or identity is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Building a TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// SHA-256 fingerprint of a DER certificate, as `sha256:<hex>` (what users compare and pin).
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
}

/// The DER certificates in a PEM text, in order.
pub fn certs_from_pem(
    pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, PkiError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::Parse(format!("reading PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::Parse("no certificate in the PEM text".into()));
    }
    Ok(certs)
}

/// The private key in a PEM text.
pub fn key_from_pem(pem: &str) -> Result<rustls::pki_types::PrivateKeyDer<'static>, PkiError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| PkiError::Parse(format!("reading the PEM private key: {e}")))?
        .ok_or_else(|| PkiError::Parse("no private key in the PEM text".into()))
}

/// PEM of one DER certificate.
pub fn cert_pem(der: &[u8]) -> String {
    use std::fmt::Write;
    let b64 = base64_encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(chunk));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests;
