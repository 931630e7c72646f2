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

/// `POST /v1/pki/revoke/{name}` query: what to revoke of the holder `name`.
///
/// - By name (no `serial`): every certificate of the holder, for good; a node of that name
///   cannot join again, a server of that id cannot come back (a new data dir gets a new id).
/// - By `serial`: that one certificate; the holder's other certificates keep working and a
///   node may join again under its name with a fresh join token (a stolen key, a decommissioned
///   machine whose node comes back).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RevokeQuery {
    /// `node` (default) or `server` (a server's name is `server-<id in hex>`, as `nimbus
    /// server list` shows).
    #[serde(default)]
    pub role: RevokeRole,
    /// Revoke only the certificate with this serial (hex, as issued).
    #[serde(default)]
    pub serial: Option<String>,
    /// Allow revoking the answering server itself, or the last server not revoked.
    #[serde(default)]
    pub force: bool,
}

/// Whose certificate a revocation names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RevokeRole {
    /// An agent's node.
    #[default]
    Node,
    /// A server.
    Server,
}

/// The server revocations an agent refuses on its API (sent with its assignments; see
/// `nimbus_state::pki`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServerRevocations {
    /// Revoked server names (every certificate of each).
    #[serde(default)]
    pub names: Vec<String>,
    /// Serials (hex) of revoked server certificates.
    #[serde(default)]
    pub serials: Vec<String>,
}
