//! The node's credentials, kept in `<agent data dir>/node.credential` (JSON, mode 0600):
//!
//! - `credential`: the node's own bearer token towards the servers, issued at its first
//!   registration (made with the shared node token) and used for every later call; the node
//!   token is never used again by this node.
//! - `agent_api_token`: what the servers present to this agent's API (exec, logs, console,
//!   metrics) in plain HTTP; refreshed by every registration answer.
//! - `metrics_token_sha256`: the hash of the cluster's metrics token, which opens `/metrics`
//!   only; refreshed by every registration answer.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file name.
pub const CREDENTIAL_FILE: &str = "node.credential";

/// What the file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCredentials {
    /// The node's own credential.
    pub credential: String,
    /// The servers' credential towards this agent.
    #[serde(default)]
    pub agent_api_token: String,
    /// SHA-256 (hex) of the cluster's metrics token (empty: none known).
    #[serde(default)]
    pub metrics_token_sha256: String,
}

/// The path of the file in `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(CREDENTIAL_FILE)
}

/// Reads the saved credentials (`None` before the first registration).
pub fn load(data_dir: &Path) -> std::io::Result<Option<NodeCredentials>> {
    match std::fs::read(path(data_dir)) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path(data_dir).display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Saves the credentials (0600, written to a temporary file and renamed).
pub fn save(data_dir: &Path, c: &NodeCredentials) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dest = path(data_dir);
    let tmp = dest.with_extension("tmp");
    let body = serde_json::to_vec(c).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, &body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &dest)
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_credentials_are_private_and_load_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let c = NodeCredentials {
            credential: "nimbus-node.n1.x".into(),
            agent_api_token: "t".into(),
            metrics_token_sha256: "00".repeat(32),
        };
        save(dir.path(), &c).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(c));
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
