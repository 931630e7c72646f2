//! Who a caller is ([`Identity`]) and what it may do ([`permits`]).
//!
//! Every route but `/healthz` needs a bearer token (the scheme is matched case-insensitively,
//! RFC 7235). A token names one of:
//!
//! | identity | credential | may |
//! |---|---|---|
//! | [`Identity::Admin`] | `admin.token` | everything |
//! | [`Identity::Server`] | the cluster secret (`cluster.secret`) | Raft RPCs, forwarded writes, `/raft/fleet/*`, cluster membership, blobs |
//! | [`Identity::Node`] | a node credential (issued at the node's first registration) | act for that node only: re-register, heartbeats, status, assignments, LB health, VIP leases; blobs |
//! | [`Identity::NodeToken`] | the shared `node.token` | register NEW nodes, the hollow-fleet routes, blobs |
//!
//! Servers keep the admin and node tokens only as SHA-256 hashes (`admin.token.sha256`,
//! `node.token.sha256`) and node credentials only as hashes in the replicated state; a
//! presented token is hashed and compared in constant time. The cluster secret is kept plain
//! by every server (each presents it to the others).
//!
//! The metrics token (`metrics.token`, kept as `metrics.token.sha256` like the others) is no
//! identity of this API: its hash goes to every agent in its registration answer, and only the
//! agents' `/metrics` accepts the token.
//!
//! A later transport identity (a client certificate) resolves to the same [`Identity`]s, so
//! [`permits`] stays the one place that decides.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use nimbus_api::{ApiError, ErrorCode};
use sha2::{Digest, Sha256};

use crate::app::AppState;
use crate::error::HttpError;

/// Prefix of node credentials: `nimbus-node.<node name>.<64 hex digits>`.
pub const NODE_CREDENTIAL_PREFIX: &str = "nimbus-node.";

/// Generates a random 256-bit token (hex).
pub fn generate_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// SHA-256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// SHA-256 of a token, hex (how node credentials are kept in the state).
pub fn token_hash_hex(token: &str) -> String {
    hex::encode(token_hash(token))
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh node credential for `node`: the secret to hand to the agent, and its hash (hex) to
/// keep in the state.
pub fn new_node_credential(node: &str) -> (String, String) {
    let secret = format!("{NODE_CREDENTIAL_PREFIX}{node}.{}", generate_token());
    let hash = token_hash_hex(&secret);
    (secret, hash)
}

/// The node a credential claims to be (not yet checked).
pub fn credential_node(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(NODE_CREDENTIAL_PREFIX)?;
    let (name, secret) = rest.rsplit_once('.')?;
    (!name.is_empty() && secret.len() == 64).then_some(name)
}

/// The token the servers present to the agent of a node (its agent API credential):
/// HMAC-SHA256 of the node's name and id under the cluster secret. Every server can compute it;
/// an agent learns only its own (in its registration answer); it changes when the node is
/// removed and registered again (a new id).
pub fn agent_api_token(cluster_secret: &str, node: &str, node_id: &str) -> String {
    let msg = format!("nimbus agent api\0{node}\0{node_id}");
    hex::encode(hmac_sha256(cluster_secret.as_bytes(), msg.as_bytes()))
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The bearer token of a request (`Authorization: Bearer T`, scheme in any case).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The credentials a server checks tokens against.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// SHA-256 of the admin token.
    pub admin_sha256: [u8; 32],
    /// SHA-256 of the shared node token.
    pub node_sha256: [u8; 32],
    /// The server-to-server cluster secret (plain: this server presents it to the others).
    pub cluster_secret: String,
    /// SHA-256 of the metrics token: no identity here (the servers serve no `/metrics`); handed
    /// to the agents in their registration answers, whose `/metrics` accepts the token.
    pub metrics_sha256: [u8; 32],
}

/// Who a caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The operator.
    Admin,
    /// Another server of the cluster.
    Server,
    /// The agent of one node (its own credential).
    Node(String),
    /// A holder of the shared node token: may only register new nodes and run hollow fleets.
    NodeToken,
}

/// Resolves a bearer token. `node_credential(name)` answers the stored credential hash (hex)
/// of a node, if it has one.
pub fn identify(
    creds: &Credentials,
    token: &str,
    node_credential: impl FnOnce(&str) -> Option<String>,
) -> Option<Identity> {
    let hash = token_hash(token);
    if constant_time_eq(&hash, &creds.admin_sha256) {
        return Some(Identity::Admin);
    }
    if constant_time_eq(token.as_bytes(), creds.cluster_secret.as_bytes()) {
        return Some(Identity::Server);
    }
    if constant_time_eq(&hash, &creds.node_sha256) {
        return Some(Identity::NodeToken);
    }
    let name = credential_node(token)?;
    let stored = node_credential(name)?;
    constant_time_eq(hex::encode(hash).as_bytes(), stored.as_bytes())
        .then(|| Identity::Node(name.to_owned()))
}

/// The node a node-scoped path acts for: `/v1/nodes/{name}/{action}` → `(name, action)`
/// (`action` empty for `/v1/nodes/{name}`).
fn node_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/v1/nodes/")?;
    Some(rest.split_once('/').unwrap_or((rest, "")))
}

/// Whether `who` may call `method path` (the one authorization decision of the public API;
/// handlers check only what depends on the body, e.g. the name a node registers).
pub fn permits(who: &Identity, method: &Method, path: &str) -> Result<(), ApiError> {
    let blob = *method == Method::GET && path.starts_with("/v1/images/blobs/");
    let ok = match who {
        Identity::Admin => true,
        Identity::Server => blob || path == "/v1/cluster",
        Identity::NodeToken => {
            blob || (*method == Method::POST && path == "/v1/nodes")
                || path.starts_with("/v1/fleet/")
        }
        Identity::Node(me) => {
            blob || (*method == Method::POST && path == "/v1/nodes")
                || node_path(path).is_some_and(|(name, action)| {
                    name == me
                        && match action {
                            "" | "assignments" => *method == Method::GET,
                            // The unsealed secrets of an instance placed on it.
                            a if a.starts_with("instances/") && a.ends_with("/secrets") => {
                                *method == Method::GET
                            }
                            "heartbeat" | "status" | "lb-health" | "vip-lease" => {
                                *method == Method::POST
                            }
                            _ => false,
                        }
                })
        }
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::Forbidden,
            match who {
                Identity::Node(me) => format!("the credential of node {me} may only act for that node"),
                Identity::NodeToken => "the node token may only register new nodes (and run hollow fleets); a registered node uses its own credential".to_owned(),
                _ => "this credential may not call this route".to_owned(),
            },
        ))
    }
}

impl AppState {
    /// Resolves the caller of a request (`None`: no or an unknown token).
    pub fn identify(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        let Some(token) = bearer(headers) else {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "missing bearer token (set NIMBUS_TOKEN)",
            ));
        };
        identify(&self.creds, token, |name| {
            self.read(|s| s.node_credentials.get(name).cloned())
        })
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "invalid bearer token"))
    }
}

/// The middleware: resolves the caller, checks [`permits`], and hands the [`Identity`] to the
/// handler as a request extension.
pub async fn require_token(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path == crate::identity::JOIN_PATH {
        // Joining needs no token: the one-time join token is in the body.
        return next.run(req).await;
    }
    // A verified client certificate (TLS) names the caller before any bearer token.
    let who = match crate::identity::certificate_identity(&app, &req)
        .unwrap_or_else(|| app.identify(req.headers()))
    {
        Ok(w) => w,
        Err(e) => return HttpError(e).into_response(),
    };
    if !crate::identity::certificate_renewal(&req) {
        if let Err(e) = permits(&who, req.method(), path) {
            return HttpError(e).into_response();
        }
    }
    req.extensions_mut().insert(who);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            admin_sha256: token_hash("admin"),
            node_sha256: token_hash("node"),
            cluster_secret: "cluster".into(),
            metrics_sha256: token_hash("metrics"),
        }
    }

    #[test]
    fn tokens_resolve_to_identities() {
        let c = creds();
        let (cred, hash) = new_node_credential("n1");
        let lookup = |n: &str| (n == "n1").then(|| hash.clone());
        assert_eq!(identify(&c, "admin", lookup), Some(Identity::Admin));
        assert_eq!(identify(&c, "cluster", lookup), Some(Identity::Server));
        assert_eq!(identify(&c, "node", lookup), Some(Identity::NodeToken));
        assert_eq!(
            identify(&c, &cred, lookup),
            Some(Identity::Node("n1".into()))
        );
        // The same secret presented for another node, a forged one, garbage.
        let other = cred.replace(".n1.", ".n2.");
        assert_eq!(identify(&c, &other, |_| Some(hash.clone())), None);
        let forged = format!("{NODE_CREDENTIAL_PREFIX}n1.{}", "0".repeat(64));
        assert_eq!(identify(&c, &forged, lookup), None);
        assert_eq!(identify(&c, "nope", lookup), None);
        // The metrics token opens only the agents' `/metrics`: no identity here.
        assert_eq!(identify(&c, "metrics", lookup), None);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer t", "bearer t", "BEARER  t"] {
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
            assert_eq!(bearer(&h), Some("t"), "{v}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            "Basic t".parse().unwrap(),
        );
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn node_credentials_act_only_for_their_node() {
        let me = Identity::Node("n1".into());
        assert!(permits(&me, &Method::POST, "/v1/nodes/n1/heartbeat").is_ok());
        assert!(permits(&me, &Method::GET, "/v1/nodes/n1/assignments").is_ok());
        assert!(permits(&me, &Method::POST, "/v1/nodes/n1/status").is_ok());
        assert!(permits(&me, &Method::GET, "/v1/nodes/n1/instances/i1/secrets").is_ok());
        assert!(permits(&me, &Method::GET, "/v1/nodes/n2/instances/i1/secrets").is_err());
        assert!(permits(
            &Identity::NodeToken,
            &Method::GET,
            "/v1/nodes/n1/instances/i1/secrets"
        )
        .is_err());
        assert!(permits(&me, &Method::POST, "/v1/nodes/n2/status").is_err());
        assert!(permits(&me, &Method::POST, "/v1/nodes/n2/heartbeat").is_err());
        assert!(permits(&me, &Method::POST, "/v1/nodes/n1/drain").is_err());
        assert!(permits(&me, &Method::PATCH, "/v1/nodes/n1").is_err());
        assert!(permits(&me, &Method::DELETE, "/v1/nodes/n1").is_err());
        assert!(permits(&me, &Method::POST, "/v1/fleet/register").is_err());
        assert!(permits(&me, &Method::GET, "/v1/projects").is_err());
    }

    #[test]
    fn the_node_token_registers_only() {
        let t = Identity::NodeToken;
        assert!(permits(&t, &Method::POST, "/v1/nodes").is_ok());
        assert!(permits(&t, &Method::POST, "/v1/fleet/heartbeats").is_ok());
        assert!(permits(&t, &Method::GET, "/v1/images/blobs/sha256:x").is_ok());
        assert!(permits(&t, &Method::POST, "/v1/nodes/n1/heartbeat").is_err());
        assert!(permits(&t, &Method::POST, "/v1/nodes/n1/status").is_err());
        assert!(permits(&t, &Method::GET, "/v1/nodes/n1/assignments").is_err());
        assert!(permits(&t, &Method::POST, "/v1/projects").is_err());
        assert!(permits(&Identity::Server, &Method::POST, "/v1/projects").is_err());
    }

    #[test]
    fn agent_api_tokens_differ_per_node_and_registration() {
        let a = agent_api_token("s", "n1", "id1");
        assert_eq!(a, agent_api_token("s", "n1", "id1"));
        assert_ne!(a, agent_api_token("s", "n2", "id1"));
        assert_ne!(a, agent_api_token("s", "n1", "id2"));
        assert_ne!(a, agent_api_token("t", "n1", "id1"));
        // RFC 4231 test case 2.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
