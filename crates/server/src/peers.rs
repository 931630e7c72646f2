//! Server <-> server over mTLS: the HTTP clients servers call each other with, the gate that
//! keeps the server-to-server routes to server certificates, and how a new server joins a TLS
//! cluster.
//!
//! With TLS every call between servers (Raft RPCs, forwarded writes and read barriers, blob
//! replication, cluster info and join, the master-key routes) is TLS 1.3 in which the caller
//! presents its server certificate (`nimbus://server/server-<id>`) and accepts only a server
//! certificate of the cluster CA; the cluster secret is still sent as the bearer token. The
//! listener asks every client for a certificate (agents and operators use theirs, or none);
//! [`server_gate`] then lets a request to `/raft/*` or `/v1/cluster/join`, or one carrying the
//! cluster secret, through only on a connection with a valid, unrevoked server certificate.
//!
//! **Joining** (`--join URL`, no CA in the data dir yet; [`prepare_join`]): the new server
//! trusts the CA given with `--ca` or pinned by `--ca-fingerprint`, then
//! 1. sends a CSR for `server-<id>` with the cluster secret to `POST /raft/pki/join` (the only
//!    server-to-server route without a certificate; its key never leaves it);
//! 2. with that certificate, fetches the master key (`GET /raft/master-key`) unless it was
//!    given `--master-key-file`;
//! 3. fetches the CA certificate and its key sealed under the master key from the replicated
//!    state (`GET /raft/pki/ca`) and keeps them in `<data-dir>/pki`, so it can issue (and
//!    renew) certificates like every other server.
//!
//! | route | credential | what |
//! |---|---|---|
//! | `POST /raft/pki/join` | cluster secret | a server certificate for a CSR ([`ServerJoinRequest`]) |
//! | `GET /raft/pki/ca` | server certificate + cluster secret | [`CaTransfer`] |

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nimbus_api::pki::IssuedCert;
use nimbus_pki::{Identity, Revocation, Role};
use serde::{Deserialize, Serialize};

use crate::app::{AppState, ServerConfig};
use crate::identity::PeerIdentity;
use crate::masterkey::{KeyTransfer, MasterKeys, PATH_KEY};
use crate::StartError;

/// A new server trades the cluster secret and a CSR for a server certificate.
pub const PATH_JOIN: &str = "/raft/pki/join";
/// The CA certificate and its sealed key.
pub const PATH_CA: &str = "/raft/pki/ca";

/// `POST /raft/pki/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerJoinRequest {
    /// The server's node id (its certificate names `server-<id in hex>`).
    pub node_id: u64,
    /// PEM CSR over the server's own key.
    pub csr: String,
}

/// `GET /raft/pki/ca`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaTransfer {
    /// The CA certificate (PEM).
    pub cert_pem: String,
    /// The CA key (PEM) sealed under the cluster master key.
    pub key_sealed: nimbus_seal::Sealed,
}

/// The identity of server `node_id`'s certificate.
pub fn server_identity(node_id: u64) -> Identity {
    Identity::new(Role::Server, format!("server-{node_id:x}"))
}

/// A client builder for calls to other servers: over TLS it presents this server's
/// certificate and accepts only server certificates of the cluster CA.
pub fn client(
    tls: Option<&rustls::ClientConfig>,
    b: reqwest::ClientBuilder,
) -> Result<reqwest::Client, reqwest::Error> {
    match tls {
        Some(t) => b.use_preconfigured_tls(t.clone()).build(),
        None => b.build(),
    }
}

fn refuse(status: StatusCode, msg: &'static str) -> Response {
    (status, msg).into_response()
}

/// TLS mode: server-to-server routes, and any request carrying the cluster secret, need a
/// server certificate (see the module docs); `POST /raft/pki/join` needs only the secret.
pub async fn server_gate(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let secret =
        crate::auth::bearer(req.headers()).is_some_and(|t| app.forwarder.is_cluster_secret(t));
    let internal = path.starts_with("/raft/") || path == "/v1/cluster/join";
    if (internal || secret) && path != PATH_JOIN && path != crate::tlsboot::PATH_HELLO {
        match req.extensions().get::<PeerIdentity>() {
            Some(PeerIdentity(p))
                if p.identity.role == Role::Server && !app.pki.revocation.is_revoked(p) => {}
            Some(_) => {
                tracing::warn!(%path, "server-to-server route refused: not a server certificate");
                return refuse(
                    StatusCode::FORBIDDEN,
                    "server-to-server routes take only server certificates",
                );
            }
            None => {
                tracing::warn!(%path, "server-to-server route refused: no client certificate");
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "server-to-server routes need a server certificate (mTLS)",
                );
            }
        }
    }
    next.run(req).await
}

/// The join and CA routes (the gate and the cluster secret guard them).
pub fn router(app: AppState) -> Router {
    let ca =
        Router::new()
            .route(PATH_CA, get(give_ca))
            .layer(axum::middleware::from_fn_with_state(
                app.clone(),
                crate::beats::require_secret,
            ));
    Router::new()
        .route(PATH_JOIN, post(join))
        .merge(ca)
        .with_state(app)
}

async fn join(
    State(app): State<AppState>,
    headers: axum::http::HeaderMap,
    Json(req): Json<ServerJoinRequest>,
) -> Response {
    if !crate::auth::bearer(&headers).is_some_and(|t| app.forwarder.is_cluster_secret(t)) {
        return refuse(StatusCode::UNAUTHORIZED, "missing or wrong cluster secret");
    }
    let Some(ca) = app.pki.ca.as_ref() else {
        return refuse(StatusCode::CONFLICT, "this server runs without TLS");
    };
    let id = server_identity(req.node_id);
    match ca.issue(&req.csr, &id, app.pki.lifetime, &[], &[]) {
        Ok(issued) => {
            tracing::info!(server = %id, serial = %issued.serial, "issued a joining server its certificate");
            Json(IssuedCert {
                cert_pem: issued.cert_pem,
                ca_pem: ca.cert_pem().to_owned(),
                serial: issued.serial,
                not_after: issued.not_after,
            })
            .into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// The CA from the replicated state; while the state holds none (a cluster still forming
/// with `--bootstrap-expect`, see [`crate::tlsboot`]), this server's own CA, its key sealed
/// now under the current master key.
async fn give_ca(State(app): State<AppState>) -> Response {
    match app.read(|s| (s.pki.ca_cert_pem.clone(), s.pki.ca_key_sealed.clone())) {
        (Some(cert_pem), Some(key_sealed)) => Json(CaTransfer {
            cert_pem,
            key_sealed,
        })
        .into_response(),
        (state_ca, _) => match (app.pki.ca.as_ref(), app.keys.current()) {
            (Some(ca), Some(key)) if state_ca.is_none() && !app.raft.is_initialized().await => {
                Json(CaTransfer {
                    cert_pem: ca.cert_pem().to_owned(),
                    key_sealed: key.seal(ca.key_pem().as_bytes(), crate::identity::CA_KEY_AAD),
                })
                .into_response()
            }
            _ => refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the sealed CA key is not in the replicated state yet; retry",
            ),
        },
    }
}

/// Whether this server must take over the CA from the cluster before it starts: TLS, joining,
/// and no CA in its data dir yet.
pub fn must_prepare_join(cfg: &ServerConfig, join: &[String]) -> bool {
    cfg.tls.mode != crate::identity::TlsMode::Plain
        && !join.is_empty()
        && !cfg
            .data_dir
            .join(crate::identity::PKI_DIR)
            .join("ca.crt")
            .exists()
}

/// Takes over the cluster CA through one of `members` (see the module docs), retrying for up
/// to a minute.
pub async fn prepare_join(
    cfg: &ServerConfig,
    secret: &str,
    keys: &MasterKeys,
    members: &[String],
) -> Result<(), StartError> {
    let ca_pem = cfg.tls.cluster_ca.as_deref().ok_or_else(|| {
        StartError::Cluster(
            "joining a TLS cluster needs its CA: pass --ca FILE (a member's pki/ca.crt) or --ca-fingerprint SHA256".into(),
        )
    })?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut last = String::new();
        for m in members {
            match prepare_via(cfg, secret, keys, ca_pem, m).await {
                Ok(()) => {
                    tracing::info!(via = %m, "took over the cluster CA");
                    return Ok(());
                }
                Err(e) if e.contains("cluster secret") || e.contains("not the CA") => {
                    return Err(StartError::Cluster(e))
                }
                Err(e) => {
                    tracing::warn!("preparing to join via {m}: {e}");
                    last = e;
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(StartError::Cluster(format!(
                "could not join the TLS cluster: {last}"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn prepare_via(
    cfg: &ServerConfig,
    secret: &str,
    keys: &MasterKeys,
    ca_pem: &str,
    member: &str,
) -> Result<(), String> {
    use std::sync::Arc;
    let base = member.trim_end_matches('/');
    if !base.starts_with("https://") {
        return Err(format!(
            "{member}: a TLS server joins through an https:// URL"
        ));
    }
    let roots = nimbus_pki::verify::roots(ca_pem).map_err(|e| e.to_string())?;
    let verifier = Arc::new(nimbus_pki::ClusterServerVerifier::new(
        roots,
        vec![Role::Server],
        Arc::new(nimbus_pki::NoRevocation),
    ));
    let build = |certs| {
        let tls = nimbus_pki::client_config(verifier.clone(), certs).map_err(|e| e.to_string())?;
        client(
            Some(&tls),
            reqwest::Client::builder().timeout(Duration::from_secs(10)),
        )
        .map_err(|e| e.to_string())
    };
    // 1. A certificate for a CSR (the CA is verified before the secret is sent).
    let id = server_identity(cfg.node_id);
    let (key_pem, csr) = nimbus_pki::new_key_and_csr(&id).map_err(|e| e.to_string())?;
    let resp = build(None)?
        .post(format!("{base}{PATH_JOIN}"))
        .bearer_auth(secret)
        .json(&ServerJoinRequest {
            node_id: cfg.node_id,
            csr,
        })
        .send()
        .await
        .map_err(|e| format!("cannot reach {member}: {e:#}"))?;
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(format!(
            "{member} refused this server's cluster secret: every server must share the same cluster.secret (--cluster-secret-file)"
        ));
    }
    let issued: IssuedCert = ok_json(resp, member).await?;
    let store = nimbus_pki::CertStore::new(&format!("{}{ca_pem}", issued.cert_pem), &key_pem)
        .map_err(|e| e.to_string())?;
    let mtls = build(Some(Arc::new(store)))?;
    // 2. The master key.
    if !keys.present() {
        let resp = mtls
            .get(format!("{base}{PATH_KEY}"))
            .bearer_auth(secret)
            .send()
            .await
            .map_err(|e| format!("cannot reach {member}: {e:#}"))?;
        let t: KeyTransfer = ok_json(resp, member).await?;
        keys.install(t.key()?)?;
    }
    // 3. The CA and its sealed key.
    let resp = mtls
        .get(format!("{base}{PATH_CA}"))
        .bearer_auth(secret)
        .send()
        .await
        .map_err(|e| format!("cannot reach {member}: {e:#}"))?;
    let ca: CaTransfer = ok_json(resp, member).await?;
    let fp = |pem: &str| {
        nimbus_pki::certs_from_pem(pem)
            .ok()
            .and_then(|c| c.first().map(|d| nimbus_pki::fingerprint(d)))
    };
    if fp(&ca.cert_pem).is_none() || fp(&ca.cert_pem) != fp(ca_pem) {
        return Err(format!(
            "{member} handed over a CA that is not the CA this server trusts"
        ));
    }
    crate::identity::install_ca(&cfg.data_dir, &ca.cert_pem, &ca.key_sealed, keys)
}

async fn ok_json<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    member: &str,
) -> Result<T, String> {
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(format!(
            "{member} answered HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    resp.json()
        .await
        .map_err(|e| format!("reading the answer of {member}: {e}"))
}
