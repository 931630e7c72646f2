//! Cluster identity: the internal CA, this server's certificate, join tokens, certificate
//! renewal and revocation.
//!
//! - **CA**: the first server creates it (ECDSA P-256, rcgen) in `<data-dir>/pki/ca.crt` and
//!   `ca.key.sealed` (0600: the key sealed under the cluster master key, AES-256-GCM with its
//!   own data key, re-sealed within a second when a rotation promotes a new master key) and
//!   records the certificate in the replicated state ([`nimbus_state::pki`]).
//! - **This server's certificate** (`nimbus://server/server-<id>`) is issued at start from a
//!   key that never leaves memory, lives `--cert-lifetime`, and is re-issued at 2/3 of its life
//!   into the [`CertStore`] both TLS sides read per handshake: no restart, no dropped
//!   connection.
//! - **Join tokens**: `POST /v1/join-tokens` (admin) returns a random 256-bit token once; the
//!   state keeps its SHA-256 and expiry. `POST /v1/pki/join` (no bearer) trades a token and a
//!   CSR for a certificate `nimbus://agent/<name>`; the redeem is a Raft command, so a token
//!   works once cluster-wide.
//! - **Renewal**: `POST /v1/pki/renew` with the current client certificate.
//! - **Revocation**: `POST /v1/pki/revoke/{name}` (admin) records in the state a holder (a
//!   node, or a server with `role=server`: every certificate it has or will get, for good) or
//!   one certificate (`serial=`: the holder may come back with a new one, e.g. a node joining
//!   again with a fresh token). Every handshake and every request checks the list, and the
//!   expiry (so an open keep-alive connection is cut off at its next request: `401
//!   certificate_revoked` / `certificate_expired`). Agents learn the server revocations with
//!   their assignments. A server refuses to revoke itself or the last server not revoked
//!   without `force=true`.
//!
//! | route | credential | what |
//! |---|---|---|
//! | `POST /v1/join-tokens` | admin | create a join token |
//! | `GET /v1/pki/ca` | admin | the CA certificate |
//! | `POST /v1/pki/join` | join token (body) | certificate for a new node |
//! | `POST /v1/pki/renew` | agent certificate | certificate for the same node |
//! | `POST /v1/pki/revoke/{name}` | admin | revoke a node's or server's certificates, or one |

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use nimbus_api::pki::{
    CreateJoinTokenRequest, IssuedCert, JoinToken, NodeJoinRequest, RenewRequest, RevokeQuery,
    RevokeRole,
};
use nimbus_api::{ApiError, ErrorCode};
use nimbus_pki::{Ca, CertStore, Identity, PeerCert, Revocation, Role};
use nimbus_state::pki::PkiCommand;
use nimbus_state::raft::RaftNode;
use nimbus_state::Command;

use crate::app::AppState;
use crate::error::{ApiJson, ApiQuery, HttpResult};
use crate::masterkey::MasterKeys;
use crate::StartError;

/// Directory (in the data dir) of the CA files.
pub const PKI_DIR: &str = "pki";
/// Longest join-token lifetime.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);

/// How the public API is served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP (`nimbus up`, `nimbus server --insecure`).
    #[default]
    Plain,
    /// TLS with a certificate of the internal CA.
    InternalCa,
    /// TLS with the operator's certificate and key (PEM files); the internal CA still
    /// identifies servers and agents.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
}

/// TLS settings of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// How the API is served.
    pub mode: TlsMode,
    /// Lifetime of the certificates the CA issues (servers' and agents').
    pub cert_lifetime: Duration,
    /// The CA (PEM) of the cluster this server joins (`--ca`, or pinned by
    /// `--ca-fingerprint`), needed until it holds the CA itself.
    pub cluster_ca: Option<String>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            mode: TlsMode::Plain,
            cert_lifetime: Duration::from_secs(86_400),
            cluster_ca: None,
        }
    }
}

/// The verified client certificate of a request's connection (set by [`crate::tls`]).
#[derive(Debug, Clone)]
pub struct PeerIdentity(pub PeerCert);

/// The revocation list in the replicated state (nothing is revoked until the store is
/// attached: the TLS configurations exist before the store opens).
#[derive(Default)]
pub struct StateRevocation(std::sync::OnceLock<RaftNode>);

impl StateRevocation {
    /// Reads the revocation list from `raft` from now on.
    pub fn attach(&self, raft: RaftNode) {
        let _ = self.0.set(raft);
    }
}

impl std::fmt::Debug for StateRevocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateRevocation")
    }
}

impl Revocation for StateRevocation {
    fn is_revoked(&self, peer: &PeerCert) -> bool {
        self.0.get().is_some_and(|r| {
            r.read(|s| {
                s.pki.is_revoked(
                    &peer.identity.name,
                    peer.identity.role == Role::Server,
                    &peer.serial,
                )
            })
        })
    }
}

/// This server's PKI material (all `None` in plain mode).
pub struct Pki {
    /// The CA (with its key).
    pub ca: Option<Ca>,
    /// This server's own cluster certificate.
    pub own: Option<Arc<CertStore>>,
    /// The public API's TLS configuration.
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS for calls to agents: presents `own`, accepts only agent certificates.
    pub agent_client_tls: Option<rustls::ClientConfig>,
    /// TLS for calls to other servers (Raft, forwarding, blobs, joins, the master key):
    /// presents `own`, accepts only server certificates of the CA.
    pub peer_client_tls: Option<rustls::ClientConfig>,
    /// The revocation list.
    pub revocation: Arc<StateRevocation>,
    /// Certificate lifetime.
    pub lifetime: Duration,
    /// Id of the master key the CA key file is sealed with.
    pub sealed_by: Option<String>,
    identity: Identity,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca", &self.ca)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Current Unix time in seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn write_private(path: &Path, data: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// AAD of the sealed CA key.
pub const CA_KEY_AAD: &[u8] = b"nimbus-ca-key";
/// The sealed CA key in `<data-dir>/pki`.
pub const CA_KEY_FILE: &str = "ca.key.sealed";

fn seal_ca_key(dir: &Path, ca: &Ca, keys: &MasterKeys) -> Result<String, String> {
    let master = keys
        .current()
        .ok_or("no master key to seal the CA key with")?;
    let sealed = master.seal(ca.key_pem().as_bytes(), CA_KEY_AAD);
    let json = serde_json::to_string(&sealed).map_err(|e| e.to_string())?;
    let path = dir.join(CA_KEY_FILE);
    write_private(&path, &json).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(sealed.key_id)
}

/// Loads `<data-dir>/pki/ca.crt` and the CA key sealed under the cluster master key
/// (`ca.key.sealed`, 0600), or creates the CA there; returns it with the id of the master key
/// that seals it now (re-sealed under the current key if an older one sealed it).
pub fn load_or_create_ca(
    data_dir: &Path,
    cluster: &str,
    keys: &MasterKeys,
) -> Result<(Ca, String), String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = data_dir.join(PKI_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let (crt, key) = (dir.join("ca.crt"), dir.join(CA_KEY_FILE));
    match (std::fs::read_to_string(&crt), std::fs::read_to_string(&key)) {
        (Ok(c), Ok(k)) => {
            let sealed: nimbus_seal::Sealed =
                serde_json::from_str(&k).map_err(|e| format!("reading {}: {e}", key.display()))?;
            let master = keys.get(&sealed.key_id).ok_or_else(|| {
                format!(
                    "{} is sealed by master key {}, which this server does not hold",
                    key.display(),
                    sealed.key_id
                )
            })?;
            let pem = master
                .open(&sealed, CA_KEY_AAD)
                .map_err(|e| format!("opening {}: {e}", key.display()))?;
            let pem = std::str::from_utf8(&pem).map_err(|e| e.to_string())?;
            let ca = Ca::from_pem(&c, pem)
                .map_err(|e| format!("loading the CA from {}: {e}", dir.display()))?;
            let current = keys.current().map(|k| k.key_id().to_owned());
            let id = if current.as_deref() == Some(sealed.key_id.as_str()) {
                sealed.key_id
            } else {
                seal_ca_key(&dir, &ca, keys)?
            };
            Ok((ca, id))
        }
        (Err(e), _) | (_, Err(e)) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("reading the CA in {}: {e}", dir.display()))
        }
        _ => {
            let ca = Ca::generate(cluster).map_err(|e| e.to_string())?;
            let id = store_new_ca(data_dir, &ca, keys)?;
            tracing::info!(fingerprint = %ca.fingerprint(), "created the cluster CA (key sealed)");
            Ok((ca, id))
        }
    }
}

/// Keeps `ca` as this server's CA in `<data-dir>/pki` (its key sealed under the current
/// master key); returns the id of that master key.
pub fn store_new_ca(data_dir: &Path, ca: &Ca, keys: &MasterKeys) -> Result<String, String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = data_dir.join(PKI_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let id = seal_ca_key(&dir, ca, keys)?;
    // The certificate last: its presence means the CA is installed.
    let crt = dir.join("ca.crt");
    write_private(&crt, ca.cert_pem()).map_err(|e| format!("writing {}: {e}", crt.display()))?;
    Ok(id)
}

/// Keeps the sealed CA key under the current master key: after a rotation promotes a new key
/// (the old one still opens until it is retired), the CA key is re-sealed within a second.
pub fn spawn_reseal(app: AppState) {
    let Some(mut sealed_by) = app.pki.sealed_by.clone() else {
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (Some(ca), Some(cur)) = (app.pki.ca.as_ref(), app.keys.current()) else {
                continue;
            };
            if app.raft.is_leader() {
                if let Err(e) = publish_ca(&app).await {
                    tracing::debug!("recording the sealed CA key: {}", e.message);
                }
            }
            if cur.key_id() == sealed_by {
                continue;
            }
            match seal_ca_key(&app.cfg.data_dir.join(PKI_DIR), ca, &app.keys) {
                Ok(id) => {
                    tracing::info!(key_id = %id, "re-sealed the CA key under the new master key");
                    sealed_by = id;
                }
                Err(e) => tracing::warn!("re-sealing the CA key: {e}"),
            }
        }
    });
}

fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split('/').next()?;
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

impl Pki {
    /// Plain mode: no TLS, nothing issued.
    pub fn plain() -> Self {
        Self {
            ca: None,
            own: None,
            server_tls: None,
            agent_client_tls: None,
            peer_client_tls: None,
            revocation: Arc::default(),
            lifetime: Duration::from_secs(86_400),
            sealed_by: None,
            identity: Identity::new(Role::Server, "server"),
            dns: Vec::new(),
            ips: Vec::new(),
        }
    }

    /// Sets up TLS per `settings`: the CA, this server's certificate, the configs.
    pub fn setup(
        settings: &TlsSettings,
        data_dir: &Path,
        node_id: u64,
        listen: std::net::SocketAddr,
        advertise_url: &str,
        keys: &MasterKeys,
    ) -> Result<Self, StartError> {
        let mut pki = Self::plain();
        if settings.mode == TlsMode::Plain {
            return Ok(pki);
        }
        let err = |m: String| StartError::DataDir {
            path: data_dir.display().to_string(),
            message: m,
        };
        // The first server creates the master key; a joining server received it (or the CA
        // files and the key) before ([`crate::peers::prepare_join`]).
        keys.create().map_err(err)?;
        let (ca, sealed_by) =
            load_or_create_ca(data_dir, &format!("{node_id:x}"), keys).map_err(err)?;
        pki.sealed_by = Some(sealed_by);
        pki.lifetime = settings.cert_lifetime;
        pki.identity = Identity::new(Role::Server, format!("server-{node_id:x}"));
        pki.dns = vec!["localhost".into(), crate::identity::hostname()];
        pki.ips = vec![IpAddr::from([127, 0, 0, 1])];
        if !listen.ip().is_unspecified() {
            pki.ips.push(listen.ip());
        }
        if let Some(h) = host_of(advertise_url) {
            match h.parse::<IpAddr>() {
                Ok(ip) => pki.ips.push(ip),
                Err(_) if !h.is_empty() => pki.dns.push(h.to_owned()),
                Err(_) => {}
            }
        }
        pki.ips.dedup();
        let (chain, key) = pki.issue_own(&ca).map_err(err)?;
        let own = Arc::new(CertStore::new(&chain, &key).map_err(|e| err(e.to_string()))?);
        let api = match &settings.mode {
            TlsMode::Files { cert, key } => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p)
                        .map_err(|e| err(format!("reading {}: {e}", p.display())))
                };
                Arc::new(
                    CertStore::new(&read(cert)?, &read(key)?)
                        .map_err(|e| err(format!("--tls-cert/--tls-key: {e}")))?,
                )
            }
            _ => own.clone(),
        };
        let roots = nimbus_pki::verify::roots(ca.cert_pem()).map_err(|e| err(e.to_string()))?;
        let revocation: Arc<dyn Revocation> = pki.revocation.clone();
        let verifier = nimbus_pki::ClusterClientVerifier::new(
            roots.clone(),
            vec![Role::Server, Role::Agent],
            revocation.clone(),
            false,
        )
        .map_err(|e| err(e.to_string()))?;
        pki.server_tls = Some(Arc::new(
            nimbus_pki::server_config(api, Some(Arc::new(verifier)))
                .map_err(|e| err(e.to_string()))?,
        ));
        let client = |role: Role| {
            nimbus_pki::client_config(
                Arc::new(nimbus_pki::ClusterServerVerifier::new(
                    roots.clone(),
                    vec![role],
                    revocation.clone(),
                )),
                Some(own.clone()),
            )
            .map_err(|e| err(e.to_string()))
        };
        pki.agent_client_tls = Some(client(Role::Agent)?);
        pki.peer_client_tls = Some(client(Role::Server)?);
        pki.own = Some(own);
        pki.ca = Some(ca);
        Ok(pki)
    }

    /// Issues this server a certificate over a fresh key: (chain PEM, key PEM).
    fn issue_own(&self, ca: &Ca) -> Result<(String, String), String> {
        let (key, csr) = nimbus_pki::new_key_and_csr(&self.identity).map_err(|e| e.to_string())?;
        let issued = ca
            .issue(&csr, &self.identity, self.lifetime, &self.dns, &self.ips)
            .map_err(|e| e.to_string())?;
        Ok((format!("{}{}", issued.cert_pem, ca.cert_pem()), key))
    }

    /// This server's certificate identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether the API is served over TLS.
    pub fn is_tls(&self) -> bool {
        self.server_tls.is_some()
    }
}

/// The host name as a certificate DNS name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |h| h.trim().to_ascii_lowercase())
}

/// Renews this server's certificate at 2/3 of its life, forever.
pub fn spawn_renewal(app: AppState) {
    let (Some(ca), Some(own)) = (app.pki.ca.as_ref(), app.pki.own.clone()) else {
        return;
    };
    let _ = ca;
    tokio::spawn(async move {
        loop {
            let due = own
                .current()
                .map_or(0, |c| nimbus_pki::renew_at(c.not_before, c.not_after));
            let wait = (due - unix_now()).max(1);
            tokio::time::sleep(Duration::from_secs(wait as u64)).await;
            let Some(ca) = app.pki.ca.as_ref() else {
                return;
            };
            match app
                .pki
                .issue_own(ca)
                .and_then(|(chain, key)| own.replace(&chain, &key).map_err(|e| e.to_string()))
            {
                Ok(()) => tracing::info!("renewed this server's certificate"),
                Err(e) => {
                    tracing::warn!("renewing this server's certificate: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

/// Records the CA certificate and its key, sealed under the current master key, in the
/// replicated state (once the store is writable), so that a joining server can take them
/// over; a sealing by another key is replaced (after a master-key rotation).
pub async fn publish_ca(app: &AppState) -> Result<(), ApiError> {
    let (Some(ca), Some(cur)) = (app.pki.ca.as_ref(), app.keys.current()) else {
        return Ok(());
    };
    if app.read(|s| s.pki.ca_cert_pem.is_none()) {
        app.propose(Command::Pki(PkiCommand::SetCa {
            cert_pem: ca.cert_pem().to_owned(),
        }))
        .await?;
    }
    if app.read(|s| {
        s.pki.ca_cert_pem.as_deref() != Some(ca.cert_pem())
            || s.pki
                .ca_key_sealed
                .as_ref()
                .is_some_and(|k| k.key_id == cur.key_id())
    }) {
        return Ok(());
    }
    let sealed = cur.seal(ca.key_pem().as_bytes(), CA_KEY_AAD);
    app.propose(Command::Pki(PkiCommand::SetCaKey { sealed }))
        .await
        .map(|_| ())
}

/// Installs the CA a joining server received from a member: the certificate and the key
/// sealed under the master key (which this server must hold: the key is opened to check).
pub fn install_ca(
    data_dir: &Path,
    cert_pem: &str,
    sealed: &nimbus_seal::Sealed,
    keys: &MasterKeys,
) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let master = keys.get(&sealed.key_id).ok_or_else(|| {
        format!(
            "the CA key is sealed by master key {}, which this server does not hold",
            sealed.key_id
        )
    })?;
    let pem = master
        .open(sealed, CA_KEY_AAD)
        .map_err(|e| format!("opening the CA key: {e}"))?;
    let pem = std::str::from_utf8(&pem).map_err(|e| e.to_string())?;
    Ca::from_pem(cert_pem, pem).map_err(|e| format!("the CA received: {e}"))?;
    let dir = data_dir.join(PKI_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let json = serde_json::to_string(sealed).map_err(|e| e.to_string())?;
    write_private(&dir.join(CA_KEY_FILE), &json).map_err(|e| e.to_string())?;
    // The certificate last: its presence means the CA is installed.
    write_private(&dir.join("ca.crt"), cert_pem).map_err(|e| e.to_string())
}

/// The OpenAPI description of these routes (merged into the API's).
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(create_join_token, ca_cert, join, renew, revoke),
    components(schemas(
        CreateJoinTokenRequest,
        JoinToken,
        NodeJoinRequest,
        RenewRequest,
        IssuedCert,
        RevokeRole
    ))
)]
pub struct PkiDoc;

/// The routes (behind `require_token`, which lets `/v1/pki/join` through; see
/// [`authorize`]).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/join-tokens", post(create_join_token))
        .route("/v1/pki/ca", get(ca_cert))
        .route(JOIN_PATH, post(join))
        .route("/v1/pki/renew", post(renew))
        .route("/v1/pki/revoke/{name}", post(revoke))
}

fn no_ca() -> ApiError {
    ApiError::new(
        ErrorCode::Conflict,
        "this server runs without TLS (--insecure or `nimbus up`): it has no cluster CA",
    )
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Create a one-time join token (admin).
#[utoipa::path(post, path = "/v1/join-tokens", request_body = CreateJoinTokenRequest, responses((status = 201, body = JoinToken), (status = 400, body = nimbus_api::ErrorBody), (status = 401, body = nimbus_api::ErrorBody), (status = 403, body = nimbus_api::ErrorBody), (status = 409, body = nimbus_api::ErrorBody)))]
async fn create_join_token(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<CreateJoinTokenRequest>,
) -> HttpResult<(StatusCode, Json<JoinToken>)> {
    let ca = app.pki.ca.as_ref().ok_or_else(no_ca)?;
    if req.ttl_seconds == 0 || req.ttl_seconds > MAX_JOIN_TOKEN_TTL.as_secs() {
        return Err(
            ApiError::invalid("ttl_seconds", "ttl_seconds must be 1 to 604800 (7 days)").into(),
        );
    }
    let token = crate::auth::generate_token();
    let now = unix_now();
    let expires_at = now + req.ttl_seconds as i64;
    app.propose(Command::Pki(PkiCommand::CreateJoinToken {
        hash: sha256_hex(&token),
        expires_at,
        now,
    }))
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(JoinToken {
            token,
            expires_at,
            ca_fingerprint: ca.fingerprint(),
        }),
    ))
}

/// The cluster CA certificate (PEM).
#[utoipa::path(get, path = "/v1/pki/ca", responses((status = 200, body = String, content_type = "application/x-pem-file"), (status = 401, body = nimbus_api::ErrorBody), (status = 409, body = nimbus_api::ErrorBody)))]
async fn ca_cert(
    State(app): State<AppState>,
) -> HttpResult<([(axum::http::HeaderName, &'static str); 1], String)> {
    let pem = app.pki.ca.as_ref().ok_or_else(no_ca)?.cert_pem().to_owned();
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        pem,
    ))
}

/// Issues `id` a certificate. A node's also names the node as a DNS name, so a stock scraper
/// (Prometheus with the cluster CA and `server_name: <node>`) can verify the agent's `/metrics`
/// endpoint; the cluster's own peers check the `nimbus://` URI instead.
fn issue(app: &AppState, csr: &str, id: &Identity) -> Result<IssuedCert, ApiError> {
    let ca = app.pki.ca.as_ref().ok_or_else(no_ca)?;
    let dns = if id.role == Role::Agent {
        vec![id.name.clone()]
    } else {
        Vec::new()
    };
    let issued = ca
        .issue(csr, id, app.pki.lifetime, &dns, &[])
        .map_err(|e| ApiError::invalid("csr", e.to_string()))?;
    Ok(IssuedCert {
        cert_pem: issued.cert_pem,
        ca_pem: ca.cert_pem().to_owned(),
        serial: issued.serial,
        not_after: issued.not_after,
    })
}

/// Trade a join token and a CSR for a node certificate (no bearer token).
#[utoipa::path(post, path = "/v1/pki/join", request_body = NodeJoinRequest, responses((status = 201, body = IssuedCert), (status = 400, body = nimbus_api::ErrorBody), (status = 401, body = nimbus_api::ErrorBody), (status = 403, body = nimbus_api::ErrorBody), (status = 404, body = nimbus_api::ErrorBody), (status = 409, body = nimbus_api::ErrorBody), (status = 413, body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody), (status = 503, body = nimbus_api::ErrorBody)))]
async fn join(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<NodeJoinRequest>,
) -> HttpResult<(StatusCode, Json<IssuedCert>)> {
    if app.pki.ca.is_none() {
        return Err(no_ca().into());
    }
    if !nimbus_pki::valid_name(&req.name) {
        return Err(
            ApiError::invalid("name", "use 1 to 63 lowercase letters, digits or '-'").into(),
        );
    }
    let id = Identity::new(Role::Agent, req.name.clone());
    // Check the CSR before using the token up.
    nimbus_pki::ca::check_csr(&req.csr).map_err(|e| ApiError::invalid("csr", e.to_string()))?;
    app.propose(Command::Pki(PkiCommand::RedeemJoinToken {
        hash: sha256_hex(&req.join_token),
        node: req.name.clone(),
        now: unix_now(),
    }))
    .await?;
    let cert = issue(&app, &req.csr, &id)?;
    tracing::info!(node = %req.name, serial = %cert.serial, "node joined with a join token");
    Ok((StatusCode::CREATED, Json(cert)))
}

/// A fresh certificate for the client certificate's identity.
#[utoipa::path(post, path = "/v1/pki/renew", request_body = RenewRequest, responses((status = 200, body = IssuedCert), (status = 400, body = nimbus_api::ErrorBody), (status = 401, body = nimbus_api::ErrorBody), (status = 409, body = nimbus_api::ErrorBody)))]
async fn renew(
    State(app): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    ApiJson(req): ApiJson<RenewRequest>,
) -> HttpResult<Json<IssuedCert>> {
    let Some(Extension(PeerIdentity(peer))) = peer else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "renewal needs the current client certificate",
        )
        .into());
    };
    Ok(Json(issue(&app, &req.csr, &peer.identity)?))
}

/// Revoke every certificate of a node or server (`role=server`), or one (`serial`) (admin).
#[utoipa::path(post, path = "/v1/pki/revoke/{name}", params(("name" = String, Path), RevokeQuery), responses((status = 204, description = "revoked (again: no change)"), (status = 400, body = nimbus_api::ErrorBody), (status = 401, body = nimbus_api::ErrorBody), (status = 403, body = nimbus_api::ErrorBody), (status = 404, description = "no server of that name (`role=server`): code `not_found`", body = nimbus_api::ErrorBody), (status = 409, description = "it is the answering server or the last server not revoked (use `force`), or this server runs without TLS", body = nimbus_api::ErrorBody), (status = 422, body = nimbus_api::ErrorBody)))]
async fn revoke(
    State(app): State<AppState>,
    UrlPath(name): UrlPath<String>,
    ApiQuery(q): ApiQuery<RevokeQuery>,
) -> HttpResult<StatusCode> {
    if !nimbus_pki::valid_name(&name) {
        return Err(
            ApiError::invalid("name", "use 1 to 63 lowercase letters, digits or '-'").into(),
        );
    }
    let serial = match &q.serial {
        Some(s) => Some(normalize_serial(s)?),
        None => None,
    };
    let server = q.role == RevokeRole::Server;
    if server {
        check_server_revocation(&app, &name, serial.as_deref(), q.force)?;
    }
    let now = unix_now();
    let cmd = match (serial.clone(), server) {
        (Some(serial), _) => PkiCommand::RevokeSerial {
            serial,
            holder: name.clone(),
            server,
            now,
        },
        (None, true) => PkiCommand::RevokeServer {
            name: name.clone(),
            now,
        },
        (None, false) => PkiCommand::Revoke {
            node: name.clone(),
            now,
        },
    };
    app.propose(Command::Pki(cmd)).await?;
    tracing::info!(holder = %name, server, serial = ?serial, "revoked certificates");
    Ok(StatusCode::NO_CONTENT)
}

/// A serial as the CA writes it (lowercase hex, even length: [`nimbus_pki::Issued::serial`]).
fn normalize_serial(s: &str) -> Result<String, ApiError> {
    let s = s
        .trim()
        .trim_start_matches("0x")
        .replace(':', "")
        .to_ascii_lowercase();
    if s.is_empty()
        || s.len() > 64
        || !s.len().is_multiple_of(2)
        || !s.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(ApiError::invalid(
            "serial",
            "a certificate serial is 2 to 64 hex digits (an even number), as issued",
        ));
    }
    Ok(s)
}

/// A server revocation must name a server of the cluster (a member, or one revoked before),
/// and may not take out the answering server or the last server not revoked unless forced.
fn check_server_revocation(
    app: &AppState,
    name: &str,
    serial: Option<&str>,
    force: bool,
) -> Result<(), ApiError> {
    let members: Vec<String> = app
        .raft
        .members()
        .iter()
        .map(|m| crate::peers::server_identity(m.id).name)
        .collect();
    let revoked = app.read(|s| s.pki.revoked_servers.clone());
    if !members.iter().any(|m| m == name) && !revoked.contains_key(name) {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("server {name:?} not found (`nimbus server list` shows the servers: server-<id in hex>)"),
        )
        .with_field("name"));
    }
    if force {
        return Ok(());
    }
    let own = app.pki.identity();
    let own_serial = app
        .pki
        .own
        .as_ref()
        .and_then(|o| o.current())
        .map(|c| c.serial);
    let is_own = match serial {
        None => own.role == Role::Server && own.name == name,
        Some(s) => own_serial.as_deref() == Some(s),
    };
    if is_own {
        return Err(ApiError::conflict(format!(
            "{name} is the server answering this request: revoking it cuts it off from the cluster; use --force (or ask another server)"
        )));
    }
    if serial.is_none()
        && !members
            .iter()
            .any(|m| m != name && !revoked.contains_key(m))
    {
        return Err(ApiError::conflict(format!(
            "{name} is the last server not revoked: the cluster would have none; use --force"
        )));
    }
    Ok(())
}

/// The route a node joins by (no bearer token: the join token is in the body).
pub const JOIN_PATH: &str = "/v1/pki/join";

/// The caller named by the request's verified client certificate (`None`: no certificate, the
/// bearer token decides): an agent certificate is its node ([`auth::Identity::Node`]), a server
/// certificate a server; a revoked certificate is refused on every request (so open keep-alive
/// connections are cut off at their next request).
///
/// [`auth::Identity::Node`]: crate::auth::Identity::Node
pub fn certificate_identity(
    app: &AppState,
    req: &Request,
) -> Option<Result<crate::auth::Identity, ApiError>> {
    let PeerIdentity(peer) = req.extensions().get::<PeerIdentity>()?;
    if let Some(why) = nimbus_pki::stale(peer, app.pki.revocation.as_ref(), unix_now()) {
        return Some(Err(stale_error(peer, why)));
    }
    Some(Ok(match peer.identity.role {
        Role::Agent => crate::auth::Identity::Node(peer.identity.name.clone()),
        Role::Server => crate::auth::Identity::Server,
    }))
}

/// The `401` of a request whose connection's certificate is no longer good.
pub fn stale_error(peer: &PeerCert, why: nimbus_pki::Stale) -> ApiError {
    match why {
        nimbus_pki::Stale::Expired => ApiError::new(
            ErrorCode::CertificateExpired,
            format!(
                "the certificate of {} (serial {}) expired; reconnect with a renewed one",
                peer.identity, peer.serial
            ),
        ),
        nimbus_pki::Stale::Revoked => ApiError::new(
            ErrorCode::CertificateRevoked,
            format!(
                "the certificate of {} (serial {}) is revoked",
                peer.identity, peer.serial
            ),
        ),
    }
}

/// Whether this is a certificate renewal (`POST /v1/pki/renew` with a client certificate): the
/// handler renews the certificate's own identity, whatever its role.
pub fn certificate_renewal(req: &Request) -> bool {
    req.uri().path() == "/v1/pki/renew"
        && req.method() == axum::http::Method::POST
        && req.extensions().get::<PeerIdentity>().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_urls() {
        assert_eq!(host_of("https://10.0.0.1:7443"), Some("10.0.0.1"));
        assert_eq!(host_of("https://srv.example:7443/x"), Some("srv.example"));
        assert_eq!(host_of("http://[::1]:7443"), Some("::1"));
        assert_eq!(host_of("srv"), Some("srv"));
    }

    #[test]
    fn openapi_documents_the_pki_routes() {
        use utoipa::OpenApi;
        let doc = PkiDoc::openapi();
        for p in [
            "/v1/join-tokens",
            "/v1/pki/join",
            "/v1/pki/renew",
            "/v1/pki/revoke/{name}",
            "/v1/pki/ca",
        ] {
            assert!(doc.paths.paths.contains_key(p), "{p}");
        }
        let json = serde_json::to_value(&doc).unwrap();
        let revoke = &json["paths"]["/v1/pki/revoke/{name}"]["post"];
        assert!(revoke["responses"]["404"].is_object(), "{revoke}");
        let params: Vec<&str> = revoke["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        for p in ["name", "role", "serial", "force"] {
            assert!(params.contains(&p), "{p} in {params:?}");
        }
    }

    #[test]
    fn serials_are_normalized_or_refused() {
        assert_eq!(normalize_serial("0A:bC").unwrap(), "0abc");
        for bad in ["", "abc", "zz", &"ab".repeat(33)] {
            assert!(normalize_serial(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ca_is_created_once_with_its_key_sealed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterKeys::load(dir.path(), None).unwrap();
        keys.create().unwrap();
        let (a, id) = load_or_create_ca(dir.path(), "c", &keys).unwrap();
        let (b, id2) = load_or_create_ca(dir.path(), "c", &keys).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(id, id2);
        let raw = std::fs::read_to_string(dir.path().join("pki").join(CA_KEY_FILE)).unwrap();
        let pem = a.key_pem();
        let body = pem.lines().nth(1).unwrap();
        assert!(
            !raw.contains(body) && !raw.contains("PRIVATE KEY"),
            "the key is sealed"
        );
        // Another cluster's master key cannot open it.
        let other = tempfile::tempdir().unwrap();
        let other_keys = MasterKeys::load(other.path(), None).unwrap();
        other_keys.create().unwrap();
        assert!(load_or_create_ca(dir.path(), "c", &other_keys).is_err());
        let mode = std::fs::metadata(dir.path().join("pki").join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(dir.path().join("pki"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
