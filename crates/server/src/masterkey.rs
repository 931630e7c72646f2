//! The cluster master key on this server, its distribution to joining servers, and its
//! rotation.
//!
//! The key lives in `<data-dir>/master.key` (32 bytes, 0600) and never in the replicated
//! state. The first server creates it (`nimbus up`, or the leader of a new cluster); a server
//! without one gets it from a member over the internal routes (`/raft/master-key*`,
//! authenticated like the Raft RPCs: the cluster secret, and with TLS a server certificate
//! over mTLS, see [`crate::peers`]) or from `--master-key-file`.
//!
//! Rotation (`POST /v1/cluster/master-key/rotate`, admin): the new key is staged on every
//! member (`master.key.next`: it opens but does not seal yet), every sealed item is re-wrapped
//! by a `RewrapSecrets` Raft command (data keys only; ciphertexts stay), the new key is
//! promoted on every member (it seals; the old one, kept as `master.key.old`, still opens),
//! items sealed meanwhile with the old key are re-wrapped again, and only then is the old key
//! retired everywhere.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use nimbus_api::{ApiError, ErrorCode};
use nimbus_seal::{Keyring, MasterKey, Sealed};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::app::AppState;

/// `GET` the key (a server without one fetches it from a member).
pub const PATH_KEY: &str = "/raft/master-key";
/// `POST` a new key to stage (rotation, step 1).
pub const PATH_STAGE: &str = "/raft/master-key/stage";
/// `POST` the staged key's id to make it current (rotation, step 3).
pub const PATH_PROMOTE: &str = "/raft/master-key/promote";
/// `POST` to forget every key but the current one (rotation, last step).
pub const PATH_RETIRE: &str = "/raft/master-key/retire";

/// This server's master keys.
#[derive(Debug)]
pub struct MasterKeys {
    dir: PathBuf,
    ring: RwLock<Option<Keyring>>,
}

/// A key on the wire between servers (internal routes only).
#[derive(Serialize, Deserialize)]
pub struct KeyTransfer {
    /// Its id.
    pub key_id: String,
    /// The 32 key bytes, base64.
    pub key: String,
}

impl KeyTransfer {
    fn of(key: &MasterKey) -> Self {
        Self {
            key_id: key.key_id().to_string(),
            key: base64::engine::general_purpose::STANDARD.encode(key.to_bytes().as_slice()),
        }
    }

    pub(crate) fn key(&self) -> Result<MasterKey, String> {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(self.key.as_bytes())
                .map_err(|_| "the key is not base64".to_string())?,
        );
        let key = MasterKey::from_bytes(&bytes).map_err(|e| e.to_string())?;
        if key.key_id() != self.key_id {
            return Err("the key does not match its id".into());
        }
        Ok(key)
    }
}

impl Drop for KeyTransfer {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

/// What a rotation did.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RotateResponse {
    /// The retired key.
    pub old_key_id: String,
    /// The new key.
    pub new_key_id: String,
    /// Sealed items re-wrapped.
    pub rewrapped: u64,
    /// Servers that hold the new key.
    pub servers: usize,
}

fn read_optional(path: &Path) -> Result<Option<MasterKey>, String> {
    if path.exists() {
        MasterKey::from_file(path)
            .map(Some)
            .map_err(|e| e.to_string())
    } else {
        Ok(None)
    }
}

impl MasterKeys {
    /// Loads `<dir>/master.key` (and a rotation's leftovers). With `given`
    /// (`--master-key-file`), installs that key when the data dir has none, and refuses a
    /// different one.
    pub fn load(dir: &Path, given: Option<&Path>) -> Result<Self, String> {
        let path = dir.join("master.key");
        let mut current = read_optional(&path)?;
        if let Some(g) = given {
            let key = MasterKey::from_file(g).map_err(|e| e.to_string())?;
            match &current {
                Some(c) if c.key_id() != key.key_id() => {
                    return Err(format!(
                        "{} holds master key {} but --master-key-file {} is key {}",
                        path.display(),
                        c.key_id(),
                        g.display(),
                        key.key_id()
                    ))
                }
                Some(_) => {}
                None => {
                    key.write_new(&path).map_err(|e| e.to_string())?;
                    current = Some(key);
                }
            }
        }
        let ring = match current {
            Some(c) => {
                let mut ring = Keyring::new(c);
                for extra in ["master.key.old", "master.key.next"] {
                    if let Some(k) = read_optional(&dir.join(extra))? {
                        let cur = ring.current().clone();
                        ring.rotate_to(k);
                        ring.rotate_to(cur);
                    }
                }
                Some(ring)
            }
            None => None,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            ring: RwLock::new(ring),
        })
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, Option<Keyring>> {
        self.ring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ring_mut(&self) -> std::sync::RwLockWriteGuard<'_, Option<Keyring>> {
        self.ring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this server holds a key.
    pub fn present(&self) -> bool {
        self.ring().is_some()
    }

    /// The current key.
    pub fn current(&self) -> Option<MasterKey> {
        self.ring().as_ref().map(|r| r.current().clone())
    }

    /// A key this server holds, by id.
    pub fn get(&self, key_id: &str) -> Option<MasterKey> {
        self.ring().as_ref().and_then(|r| r.get(key_id).cloned())
    }

    /// Creates the key file (a new cluster) unless a key is held.
    pub fn create(&self) -> Result<(), String> {
        let mut ring = self.ring_mut();
        if ring.is_none() {
            let key = MasterKey::load_or_create(&self.dir.join("master.key"))
                .map_err(|e| e.to_string())?;
            tracing::info!(key_id = key.key_id(), "master key ready");
            *ring = Some(Keyring::new(key));
        }
        Ok(())
    }

    /// Installs a key received from a member, unless one is held.
    pub fn install(&self, key: MasterKey) -> Result<(), String> {
        let mut ring = self.ring_mut();
        if ring.is_none() {
            let path = self.dir.join("master.key");
            if !path.exists() {
                key.write_new(&path).map_err(|e| e.to_string())?;
            }
            tracing::info!(key_id = key.key_id(), "master key received from a member");
            *ring = Some(Keyring::new(key));
        }
        Ok(())
    }

    fn none() -> ApiError {
        ApiError::new(
            ErrorCode::Unavailable,
            "this server does not hold the cluster master key yet; retry, or start it with --master-key-file",
        )
    }

    /// Seals with the current key.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, ApiError> {
        self.ring()
            .as_ref()
            .map(|r| r.seal(plaintext, aad))
            .ok_or_else(Self::none)
    }

    /// Opens with the key the item names. The error never contains the value.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        let ring = self.ring();
        let ring = ring.as_ref().ok_or_else(Self::none)?;
        ring.open(sealed, aad).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("cannot open a sealed secret on this server: {e}"),
            )
        })
    }

    /// Stages `key` (rotation): it opens, the current key still seals.
    pub fn stage(&self, key: MasterKey) -> Result<(), String> {
        let mut guard = self.ring_mut();
        let ring = guard.as_mut().ok_or("no master key to rotate")?;
        if ring.get(key.key_id()).is_some() {
            return Ok(());
        }
        key.replace_file(&self.dir.join("master.key.next"))
            .map_err(|e| e.to_string())?;
        let cur = ring.current().clone();
        ring.rotate_to(key);
        ring.rotate_to(cur);
        Ok(())
    }

    /// Makes the staged key `key_id` current; the old one still opens (`master.key.old`).
    pub fn promote(&self, key_id: &str) -> Result<(), String> {
        let mut guard = self.ring_mut();
        let ring = guard.as_mut().ok_or("no master key")?;
        if ring.current().key_id() == key_id {
            return Ok(());
        }
        let key = ring
            .get(key_id)
            .cloned()
            .ok_or_else(|| format!("key {key_id} was not staged on this server"))?;
        let old = ring.current().clone();
        old.replace_file(&self.dir.join("master.key.old"))
            .map_err(|e| e.to_string())?;
        key.replace_file(&self.dir.join("master.key"))
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(self.dir.join("master.key.next"));
        ring.rotate_to(key);
        tracing::info!(key_id, "master key rotated");
        Ok(())
    }

    /// Forgets every key but the current one.
    pub fn retire(&self) {
        if let Some(ring) = self.ring_mut().as_mut() {
            ring.retire_previous();
        }
        let _ = std::fs::remove_file(self.dir.join("master.key.old"));
        let _ = std::fs::remove_file(self.dir.join("master.key.next"));
    }
}

/// The internal routes (cluster secret).
pub fn internal_router(app: AppState) -> Router {
    Router::new()
        .route(PATH_KEY, get(give_key))
        .route(PATH_STAGE, post(stage_key))
        .route(PATH_PROMOTE, post(promote_key))
        .route(PATH_RETIRE, post(retire_keys))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::beats::require_secret,
        ))
        .with_state(app)
}

async fn give_key(State(app): State<AppState>) -> Response {
    match app.keys.current() {
        Some(k) => Json(KeyTransfer::of(&k)).into_response(),
        None => (StatusCode::NOT_FOUND, "no master key on this server").into_response(),
    }
}

async fn stage_key(State(app): State<AppState>, Json(t): Json<KeyTransfer>) -> Response {
    match t.key().and_then(|k| app.keys.stage(k)) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::CONFLICT, e).into_response(),
    }
}

#[derive(Deserialize, Serialize)]
struct Promote {
    key_id: String,
}

async fn promote_key(State(app): State<AppState>, Json(p): Json<Promote>) -> Response {
    match app.keys.promote(&p.key_id) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::CONFLICT, e).into_response(),
    }
}

async fn retire_keys(State(app): State<AppState>) -> Response {
    app.keys.retire();
    StatusCode::NO_CONTENT.into_response()
}

/// Until this server holds the master key: fetch it from a member; the leader of a cluster
/// that has sealed nothing yet creates it.
pub async fn obtain(app: AppState) {
    loop {
        if app.keys.present() {
            return;
        }
        let me = app.raft.node_id();
        for m in app.raft.members().iter().filter(|m| m.id != me) {
            let got: Result<Option<KeyTransfer>, String> = app
                .forwarder
                .internal::<(), KeyTransfer>(reqwest::Method::GET, &m.url, PATH_KEY, None)
                .await;
            if let Ok(Some(t)) = got {
                match t.key().and_then(|k| app.keys.install(k)) {
                    Ok(()) => return,
                    Err(e) => tracing::warn!("master key from {}: {e}", m.url),
                }
            }
        }
        if app.raft.is_leader() && app.read(|s| s.secrets.is_empty()) {
            match app.keys.create() {
                Ok(()) => return,
                Err(e) => tracing::warn!("creating the master key: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn unavailable(m: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, m)
}

/// Sends `body` to `path` on every other member; fails on the first that refuses.
async fn on_members<B: Serialize + Sync>(
    app: &AppState,
    path: &str,
    body: &B,
) -> Result<usize, ApiError> {
    let me = app.raft.node_id();
    let members = app.raft.members();
    for m in members.iter().filter(|m| m.id != me) {
        app.forwarder
            .internal::<B, serde_json::Value>(reqwest::Method::POST, &m.url, path, Some(body))
            .await
            .map_err(|e| unavailable(format!("server {} ({}): {e}", m.id, m.url)))?;
    }
    Ok(members.len())
}

/// Re-wraps every sealed item not yet wrapped by `new` with the key it names; returns how many.
async fn rewrap_all(app: &AppState, new: &MasterKey) -> Result<u64, ApiError> {
    let mut total = 0;
    for _ in 0..10 {
        let pending: Vec<(String, Sealed)> = app.read(|s| {
            s.secrets
                .iter()
                .filter(|(_, v)| v.sealed.key_id != new.key_id())
                .map(|(k, v)| (k.clone(), v.sealed.clone()))
                .collect()
        });
        if pending.is_empty() {
            return Ok(total);
        }
        let mut by_key: std::collections::BTreeMap<String, std::collections::BTreeMap<_, _>> =
            std::collections::BTreeMap::new();
        for (k, sealed) in pending {
            let old = app.keys.get(&sealed.key_id).ok_or_else(|| {
                ApiError::internal(format!(
                    "secret {k} is sealed under key {} which this server does not hold",
                    sealed.key_id
                ))
            })?;
            let moved = sealed
                .rewrap(&old, new)
                .map_err(|e| ApiError::internal(format!("re-wrapping secret {k}: {e}")))?;
            by_key.entry(sealed.key_id).or_default().insert(k, moved);
        }
        for (from, items) in by_key {
            let out = app
                .propose(nimbus_state::Command::RewrapSecrets {
                    from,
                    to: new.key_id().to_string(),
                    items,
                })
                .await?;
            if let nimbus_state::CommandOutput::Count(n) = out {
                total += n;
            }
        }
    }
    Err(unavailable(
        "secrets kept changing during the rotation; run it again",
    ))
}

/// Rotates the master key (see the module docs).
pub async fn rotate(app: &AppState) -> Result<RotateResponse, ApiError> {
    let old = app.keys.current().ok_or_else(MasterKeys::none)?;
    let new = MasterKey::generate();
    let transfer = KeyTransfer::of(&new);
    app.keys.stage(new.clone()).map_err(ApiError::internal)?;
    let servers = on_members(app, PATH_STAGE, &transfer).await?;
    let mut rewrapped = rewrap_all(app, &new).await?;
    app.keys.promote(new.key_id()).map_err(ApiError::internal)?;
    on_members(
        app,
        PATH_PROMOTE,
        &Promote {
            key_id: new.key_id().to_string(),
        },
    )
    .await?;
    // Items a member sealed with the old key before it promoted the new one.
    rewrapped += rewrap_all(app, &new).await?;
    app.keys.retire();
    on_members(app, PATH_RETIRE, &serde_json::json!({})).await?;
    Ok(RotateResponse {
        old_key_id: old.key_id().to_string(),
        new_key_id: new.key_id().to_string(),
        rewrapped,
        servers,
    })
}
