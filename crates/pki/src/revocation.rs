//! Revocation lists, and the check a verified connection passes on every request: a kept-alive
//! connection outlives the handshake that verified it, so a certificate revoked or expired
//! since then is refused at the connection's next request.

use std::collections::BTreeSet;
use std::sync::RwLock;

use crate::{PeerCert, Role};

/// The revocation list a verifier consults on every handshake (and the servers and agents on
/// every request, see [`stale`]).
pub trait Revocation: Send + Sync + std::fmt::Debug {
    /// Whether `peer` (its serial or its holder) is revoked.
    fn is_revoked(&self, peer: &PeerCert) -> bool;
}

/// Nothing is revoked.
#[derive(Debug, Default)]
pub struct NoRevocation;

impl Revocation for NoRevocation {
    fn is_revoked(&self, _: &PeerCert) -> bool {
        false
    }
}

/// Revoked server names and certificate serials, replaced as a whole: what an agent learns
/// from its servers (with its assignments) and refuses on its API and its server link.
#[derive(Debug, Default)]
pub struct ServerRevocationList(RwLock<(BTreeSet<String>, BTreeSet<String>)>);

impl ServerRevocationList {
    /// Replaces the list: every certificate of the servers `names`, and those of `serials`.
    pub fn set(
        &self,
        names: impl IntoIterator<Item = String>,
        serials: impl IntoIterator<Item = String>,
    ) {
        let new = (names.into_iter().collect(), serials.into_iter().collect());
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = new;
    }
}

impl Revocation for ServerRevocationList {
    fn is_revoked(&self, peer: &PeerCert) -> bool {
        let l = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        l.1.contains(&peer.serial)
            || (peer.identity.role == Role::Server && l.0.contains(&peer.identity.name))
    }
}

/// Why a connection verified at its handshake may no longer be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// The certificate expired since.
    Expired,
    /// The certificate was revoked since.
    Revoked,
}

/// Whether `peer`'s certificate is still good at `now` (Unix seconds).
pub fn stale(peer: &PeerCert, revocation: &dyn Revocation, now: i64) -> Option<Stale> {
    if peer.not_after <= now {
        Some(Stale::Expired)
    } else if revocation.is_revoked(peer) {
        Some(Stale::Revoked)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    fn peer(role: Role, name: &str, serial: &str, not_after: i64) -> PeerCert {
        PeerCert {
            identity: Identity::new(role, name),
            serial: serial.into(),
            not_before: 0,
            not_after,
        }
    }

    #[test]
    fn a_server_list_refuses_names_of_servers_and_serials() {
        let l = ServerRevocationList::default();
        let s1 = peer(Role::Server, "server-1", "aa", 100);
        assert_eq!(stale(&s1, &l, 10), None);
        assert_eq!(stale(&s1, &l, 100), Some(Stale::Expired));
        l.set(["server-1".to_string()], ["bb".to_string()]);
        assert_eq!(stale(&s1, &l, 10), Some(Stale::Revoked));
        assert!(!l.is_revoked(&peer(Role::Agent, "server-1", "aa", 100)));
        assert!(l.is_revoked(&peer(Role::Server, "server-2", "bb", 100)));
        l.set([], []);
        assert_eq!(stale(&s1, &l, 10), None);
    }
}
