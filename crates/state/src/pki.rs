//! The cluster's PKI records: the CA certificate every server verifies with, one-time join
//! tokens (stored as SHA-256 hashes, expiring) and the revocations: of holders by name (nodes
//! and servers, every certificate they hold or will hold) and of single certificates by serial
//! (the holder may come back with a new one). Times come in
//! the commands (the proposer's clock), so `apply` stays deterministic. The CA private key is
//! here only sealed under the cluster master key (which never enters the state), so every
//! server holding the master key can issue certificates (see `nimbus_server::identity`).

use std::collections::BTreeMap;

use nimbus_api::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};

/// How many unexpired join tokens may exist at once.
pub const MAX_JOIN_TOKENS: usize = 1000;

/// Replicated PKI state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PkiState {
    /// The cluster CA certificate (PEM), once created.
    #[serde(default)]
    pub ca_cert_pem: Option<String>,
    /// The CA private key (PEM) sealed under the cluster master key.
    #[serde(default)]
    pub ca_key_sealed: Option<nimbus_seal::Sealed>,
    /// Join tokens by SHA-256 hash (hex): expiry (Unix seconds).
    #[serde(default)]
    pub join_tokens: BTreeMap<String, i64>,
    /// Revoked holders (node names): when (Unix seconds). Their certificates are refused.
    #[serde(default)]
    pub revoked: BTreeMap<String, i64>,
    /// Revoked servers (`server-<id>`): when (Unix seconds).
    #[serde(default)]
    pub revoked_servers: BTreeMap<String, i64>,
    /// Revoked certificates by serial (hex).
    #[serde(default)]
    pub revoked_serials: BTreeMap<String, RevokedSerial>,
    /// State revision of the last revocation that concerns servers (agents refuse revoked
    /// server certificates: it wakes their assignment polls).
    #[serde(default)]
    pub server_revocations_revision: u64,
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedSerial {
    /// Its holder's name.
    pub holder: String,
    /// Whether the holder is a server (else a node).
    pub server: bool,
    /// When (Unix seconds).
    pub at: i64,
}

/// A PKI mutation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "pki_op", rename_all = "snake_case")]
pub enum PkiCommand {
    /// Record the cluster CA certificate (once; the same certificate again is a no-op).
    SetCa {
        /// PEM.
        cert_pem: String,
    },
    /// Record the CA key sealed under the current master key (replacing an earlier sealing:
    /// a master-key rotation re-seals it). Refused before the CA certificate is recorded.
    SetCaKey {
        /// The sealed PEM.
        sealed: nimbus_seal::Sealed,
    },
    /// Add a join token.
    CreateJoinToken {
        /// SHA-256 of the token (hex).
        hash: String,
        /// Expiry (Unix seconds).
        expires_at: i64,
        /// The proposer's time (Unix seconds); expired tokens are dropped.
        now: i64,
    },
    /// Use a join token up (it exists, has not expired, and `node` is not revoked).
    RedeemJoinToken {
        /// SHA-256 of the token (hex).
        hash: String,
        /// The joining node's name.
        node: String,
        /// The proposer's time (Unix seconds).
        now: i64,
    },
    /// Revoke every certificate of `node`.
    Revoke {
        /// Node name.
        node: String,
        /// The proposer's time (Unix seconds).
        now: i64,
    },
    /// Revoke every certificate of server `name` (`server-<id>`).
    RevokeServer {
        /// Server name.
        name: String,
        /// The proposer's time (Unix seconds).
        now: i64,
    },
    /// Revoke the one certificate `serial` of `holder`.
    RevokeSerial {
        /// Serial (lowercase hex).
        serial: String,
        /// The holder's name.
        holder: String,
        /// Whether the holder is a server.
        server: bool,
        /// The proposer's time (Unix seconds).
        now: i64,
    },
}

impl PkiCommand {
    /// Whether agents must learn of this command (it revokes server certificates).
    pub fn concerns_agents(&self) -> bool {
        matches!(
            self,
            Self::RevokeServer { .. } | Self::RevokeSerial { server: true, .. }
        )
    }
}

impl PkiState {
    /// Applies a PKI command; on error nothing changed.
    pub fn apply(&mut self, cmd: &PkiCommand) -> Result<(), ApiError> {
        match cmd {
            PkiCommand::SetCa { cert_pem } => match &self.ca_cert_pem {
                Some(cur) if cur == cert_pem => Ok(()),
                Some(_) => Err(ApiError::new(
                    ErrorCode::Conflict,
                    "the cluster already has a different CA",
                )),
                None => {
                    self.ca_cert_pem = Some(cert_pem.clone());
                    Ok(())
                }
            },
            PkiCommand::SetCaKey { sealed } => {
                if self.ca_cert_pem.is_none() {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        "the cluster has no CA certificate yet",
                    ));
                }
                self.ca_key_sealed = Some(sealed.clone());
                Ok(())
            }
            PkiCommand::CreateJoinToken {
                hash,
                expires_at,
                now,
            } => {
                self.join_tokens.retain(|_, exp| *exp > *now);
                if self.join_tokens.len() >= MAX_JOIN_TOKENS {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!(
                            "{MAX_JOIN_TOKENS} join tokens are pending; wait for some to expire"
                        ),
                    ));
                }
                self.join_tokens.insert(hash.clone(), *expires_at);
                Ok(())
            }
            PkiCommand::RedeemJoinToken { hash, node, now } => {
                let refused =
                    |m: &str| ApiError::new(ErrorCode::Unauthorized, m).with_field("join_token");
                match self.join_tokens.get(hash) {
                    None => Err(refused(
                        "unknown join token (already used, or never created); create one with `nimbus server join-token create`",
                    )),
                    Some(exp) if *exp <= *now => {
                        self.join_tokens.remove(hash);
                        Err(refused("the join token has expired; create a new one"))
                    }
                    Some(_) if self.revoked.contains_key(node) => Err(ApiError::new(
                        ErrorCode::Forbidden,
                        format!("node {node} was revoked; join under another name"),
                    )
                    .with_field("name")),
                    Some(_) => {
                        self.join_tokens.remove(hash);
                        Ok(())
                    }
                }
            }
            PkiCommand::Revoke { node, now } => {
                self.revoked.entry(node.clone()).or_insert(*now);
                Ok(())
            }
            PkiCommand::RevokeServer { name, now } => {
                self.revoked_servers.entry(name.clone()).or_insert(*now);
                Ok(())
            }
            PkiCommand::RevokeSerial {
                serial,
                holder,
                server,
                now,
            } => {
                self.revoked_serials
                    .entry(serial.clone())
                    .or_insert_with(|| RevokedSerial {
                        holder: holder.clone(),
                        server: *server,
                        at: *now,
                    });
                Ok(())
            }
        }
    }

    /// Whether the certificate `serial` of `name` (a server if `server`, else a node) is
    /// revoked.
    pub fn is_revoked(&self, name: &str, server: bool, serial: &str) -> bool {
        let holders = if server {
            &self.revoked_servers
        } else {
            &self.revoked
        };
        holders.contains_key(name) || self.revoked_serials.contains_key(serial)
    }

    /// What agents must refuse.
    pub fn server_revocations(&self) -> nimbus_api::pki::ServerRevocations {
        nimbus_api::pki::ServerRevocations {
            names: self.revoked_servers.keys().cloned().collect(),
            serials: self
                .revoked_serials
                .iter()
                .filter(|(_, r)| r.server)
                .map(|(s, _)| s.clone())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(s: &mut PkiState, hash: &str, exp: i64, now: i64) {
        s.apply(&PkiCommand::CreateJoinToken {
            hash: hash.into(),
            expires_at: exp,
            now,
        })
        .unwrap();
    }

    fn redeem(s: &mut PkiState, hash: &str, node: &str, now: i64) -> Result<(), ApiError> {
        s.apply(&PkiCommand::RedeemJoinToken {
            hash: hash.into(),
            node: node.into(),
            now,
        })
    }

    #[test]
    fn join_token_is_one_time() {
        let mut s = PkiState::default();
        create(&mut s, "h", 100, 0);
        redeem(&mut s, "h", "n1", 10).unwrap();
        let before = s.clone();
        let e = redeem(&mut s, "h", "n2", 11).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert_eq!(s, before);
    }

    #[test]
    fn expired_join_token_is_refused() {
        let mut s = PkiState::default();
        create(&mut s, "h", 100, 0);
        let e = redeem(&mut s, "h", "n1", 100).unwrap_err();
        assert!(e.message.contains("expired"), "{}", e.message);
        assert!(s.join_tokens.is_empty());
    }

    #[test]
    fn revoked_node_cannot_rejoin_and_keeps_the_token() {
        let mut s = PkiState::default();
        s.apply(&PkiCommand::Revoke {
            node: "n1".into(),
            now: 5,
        })
        .unwrap();
        create(&mut s, "h", 100, 0);
        assert_eq!(
            redeem(&mut s, "h", "n1", 10).unwrap_err().code,
            ErrorCode::Forbidden
        );
        redeem(&mut s, "h", "n2", 10).unwrap();
    }

    #[test]
    fn revocations_by_name_are_per_role_and_by_serial_per_certificate() {
        let mut s = PkiState::default();
        s.apply(&PkiCommand::RevokeServer {
            name: "server-1".into(),
            now: 5,
        })
        .unwrap();
        s.apply(&PkiCommand::RevokeSerial {
            serial: "0abc".into(),
            holder: "n1".into(),
            server: false,
            now: 6,
        })
        .unwrap();
        assert!(s.is_revoked("server-1", true, "01"));
        assert!(
            !s.is_revoked("server-1", false, "01"),
            "a node of that name"
        );
        assert!(s.is_revoked("n1", false, "0abc"));
        assert!(!s.is_revoked("n1", false, "0abd"), "n1's next certificate");
        // A serial revocation leaves the name admissible.
        create(&mut s, "h", 100, 0);
        redeem(&mut s, "h", "n1", 10).unwrap();
        assert_eq!(
            s.server_revocations(),
            nimbus_api::pki::ServerRevocations {
                names: vec!["server-1".into()],
                serials: vec![],
            }
        );
    }

    #[test]
    fn ca_is_set_once() {
        let mut s = PkiState::default();
        let set = |p: &str| PkiCommand::SetCa { cert_pem: p.into() };
        s.apply(&set("a")).unwrap();
        s.apply(&set("a")).unwrap();
        assert_eq!(s.apply(&set("b")).unwrap_err().code, ErrorCode::Conflict);
        assert_eq!(s.ca_cert_pem.as_deref(), Some("a"));
    }

    #[test]
    fn the_sealed_ca_key_follows_the_ca_and_is_replaced_by_a_resealing() {
        let mut s = PkiState::default();
        let sealed = |id: &str| nimbus_seal::Sealed {
            key_id: id.into(),
            wrapped_data_key: vec![1],
            nonce: vec![2],
            ciphertext: vec![3],
        };
        let set_key = |id: &str| PkiCommand::SetCaKey { sealed: sealed(id) };
        assert_eq!(
            s.apply(&set_key("k1")).unwrap_err().code,
            ErrorCode::Conflict
        );
        s.apply(&PkiCommand::SetCa {
            cert_pem: "a".into(),
        })
        .unwrap();
        s.apply(&set_key("k1")).unwrap();
        s.apply(&set_key("k2")).unwrap();
        assert_eq!(s.ca_key_sealed, Some(sealed("k2")));
        let json = serde_json::to_string(&crate::Command::Pki(set_key("k3"))).unwrap();
        assert_eq!(
            serde_json::from_str::<crate::Command>(&json).unwrap(),
            crate::Command::Pki(set_key("k3"))
        );
    }

    #[test]
    fn command_round_trips_through_the_log_encoding() {
        let c = crate::Command::Pki(PkiCommand::Revoke {
            node: "n1".into(),
            now: 5,
        });
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<crate::Command>(&json).unwrap(), c);
    }

    #[test]
    fn expired_tokens_are_pruned_on_create() {
        let mut s = PkiState::default();
        create(&mut s, "old", 10, 0);
        create(&mut s, "new", 100, 50);
        assert_eq!(s.join_tokens.keys().collect::<Vec<_>>(), vec!["new"]);
    }
}
