//! Join tokens and certificates of the cluster's internal CA (see `nimbus_pki`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/join-tokens` (admin).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateJoinTokenRequest {
    /// Lifetime in seconds (1 s to 7 days).
    pub ttl_seconds: u64,
}

/// A created join token: shown once, stored by the servers only as its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    /// The token (`nimbus agent --join-token`).
    pub token: String,
    /// Expiry (Unix seconds).
    pub expires_at: i64,
    /// Fingerprint of the cluster CA, for `nimbus agent --ca-fingerprint`.
    pub ca_fingerprint: String,
}

/// `POST /v1/pki/join`: a node trades a one-time join token and a CSR for a certificate.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeJoinRequest {
    /// The join token.
    pub join_token: String,
    /// The node's name (the certificate's identity).
    pub name: String,
    /// PEM certificate signing request over the node's own key.
    pub csr: String,
}

/// `POST /v1/pki/renew` (client certificate): a fresh certificate for the same identity.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RenewRequest {
    /// PEM certificate signing request over a new key.
    pub csr: String,
}

/// A certificate the cluster CA issued.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IssuedCert {
    /// The leaf certificate (PEM).
    pub cert_pem: String,
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
    /// Serial (hex).
    pub serial: String,
    /// Expiry (Unix seconds).
    pub not_after: i64,
}
