//! Image blobs across a server cluster.
//!
//! An image upload lands on one server; only its record goes through Raft. So that an agent
//! can pull the image's layers from whichever server it talks to (and so that the image
//! survives the loss of that server), every server replicates the blobs:
//!
//! - **On demand**: `GET /v1/images/blobs/{digest}` on a server that lacks the blob fetches
//!   it from the other members of the Raft membership (`?local=true`, so a peer never asks on
//!   in turn), verifies its sha256 digest while storing it (`ImageStore::put_blob`), then serves
//!   it.
//! - **In the background**: every server compares the layers of the images in the replicated
//!   state with its store every [`SYNC_INTERVAL`] and fetches the missing ones the same way.
//!
//! Concurrent requests for the same missing blob share one download.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::app::AppState;

/// How often a server looks for blobs of known images it does not hold.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// Timeout of connecting to a peer for a blob.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One download per digest at a time.
#[derive(Debug, Default)]
pub struct BlobFetches {
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl BlobFetches {
    fn lock_for(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(digest.to_owned())
            .or_default()
            .clone()
    }

    fn done(&self, digest: &str) {
        let mut map = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if map.get(digest).is_some_and(|l| Arc::strong_count(l) <= 1) {
            map.remove(digest);
        }
    }
}

/// Makes sure blob `digest` is in this server's store, fetching it from another member if
/// needed. Errors name every peer tried.
pub async fn ensure_local(app: &AppState, digest: &str) -> Result<(), String> {
    if app.images.has_blob(digest) {
        return Ok(());
    }
    let lock = app.blob_fetches.lock_for(digest);
    let result = {
        let _guard = lock.lock().await;
        if app.images.has_blob(digest) {
            Ok(())
        } else {
            fetch_from_peers(app, digest).await
        }
    };
    drop(lock);
    app.blob_fetches.done(digest);
    result
}

async fn fetch_from_peers(app: &AppState, digest: &str) -> Result<(), String> {
    let me = app.raft.node_id();
    let peers: Vec<String> = app
        .raft
        .members()
        .into_iter()
        .filter(|m| m.id != me)
        .map(|m| m.url)
        .collect();
    if peers.is_empty() {
        return Err("no other server to fetch it from".into());
    }
    let mut errors = Vec::new();
    for peer in peers {
        match fetch_from(app, &peer, digest).await {
            Ok(()) => {
                tracing::info!(digest, from = %peer, "fetched image blob from a peer server");
                return Ok(());
            }
            Err(e) => errors.push(format!("{peer}: {e}")),
        }
    }
    Err(errors.join("; "))
}

async fn fetch_from(app: &AppState, peer: &str, digest: &str) -> Result<(), String> {
    let url = format!(
        "{}/v1/images/blobs/{digest}?local=true",
        peer.trim_end_matches('/')
    );
    let resp = app
        .blob_http
        .get(&url)
        .bearer_auth(app.creds.cluster_secret.as_str())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let tmp_dir = app.cfg.data_dir.join("tmp");
    tokio::fs::create_dir_all(&tmp_dir)
        .await
        .map_err(|e| format!("creating {}: {e}", tmp_dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(|e| format!("temp file: {e}"))?;
    let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(|e| e.to_string())?);
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("reading the blob: {e}"))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| format!("writing the blob: {e}"))?;
    }
    file.flush().await.map_err(|e| e.to_string())?;
    drop(file);
    let store = app.images.clone();
    let digest = digest.to_owned();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(tmp.path()).map_err(|e| e.to_string())?;
        // Verifies the sha256 digest before the blob becomes visible.
        store.put_blob(f, &digest).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The background sync loop: fetches the layers of every image in the state that this server
/// lacks (see the module docs). Runs on every server of a cluster.
pub async fn sync_loop(app: AppState) {
    let mut warned: HashMap<String, String> = HashMap::new();
    loop {
        tokio::time::sleep(SYNC_INTERVAL).await;
        if app.raft.members().len() <= 1 {
            continue;
        }
        let mut wanted: Vec<String> = app.read(|s| {
            s.images
                .values()
                .flat_map(|i| i.layers.iter().cloned())
                .collect()
        });
        wanted.sort();
        wanted.dedup();
        for digest in wanted {
            if app.images.has_blob(&digest) {
                continue;
            }
            match ensure_local(&app, &digest).await {
                Ok(()) => {
                    warned.remove(&digest);
                }
                Err(e) => {
                    // Once per distinct failure, not every pass.
                    if warned.get(&digest) != Some(&e) {
                        tracing::warn!(digest, "cannot replicate image blob yet: {e}");
                        warned.insert(digest, e);
                    }
                }
            }
        }
    }
}

/// The HTTP client used for peer blob downloads (no overall timeout: layers can be large).
pub fn http_client(tls: Option<&rustls::ClientConfig>) -> reqwest::Client {
    crate::peers::client(
        tls,
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(Duration::from_secs(30)),
    )
    .unwrap_or_default()
}
