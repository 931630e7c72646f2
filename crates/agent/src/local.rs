//! The agent's local state: what it has done for each instance, persisted so a restarted agent
//! re-attaches instead of restarting or duplicating instances.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nimbus_api::{DesiredState, InstanceType};
use serde::{Deserialize, Serialize};

/// Per-instance local record: what the agent has done for an instance and what it still owes
/// it (a pending restart, a retry after a failure). [`crate::decide`] reads and rewrites it;
/// it is persisted so a restarted agent neither repeats nor forgets any of it (a backoff
/// continues where it was, a user restart is not done twice).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalInstance {
    /// Instance type (which driver owns it).
    pub instance_type: InstanceType,
    /// Assignment generation last acted on.
    pub generation: u64,
    /// Restart nonce last acted on.
    pub restart_nonce: u64,
    /// Restarts performed by the restart policy.
    pub restart_count: u32,
    /// The exit the policy last handled (pid of the run that exited), so one exit causes one
    /// restart.
    #[serde(default)]
    pub handled_exit_pid: Option<u32>,
    /// PID of the current run.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The desired state the record was last acted on for (a change resets the backoff).
    #[serde(default)]
    pub desired: Option<DesiredState>,
    /// Consecutive failures (failed steps, and runs that exited before
    /// [`crate::decide::BACKOFF_RESET_MS`]): the exponent of the backoff.
    #[serde(default)]
    pub failures: u32,
    /// The next attempt (restart, retry of a failed step) is due at this time (unix ms);
    /// `None`: none is due.
    #[serde(default)]
    pub not_before_ms: Option<u64>,
    /// Why the last step failed (the runtime's words); cleared by a successful start.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the current run was started (unix ms), to tell a crash loop from a long run.
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// A user restart is under way: stop the running process, then start it.
    #[serde(default)]
    pub pending_restart: bool,
    /// Exit code of the last run the restart policy restarted (reported while the next one
    /// runs).
    #[serde(default)]
    pub last_exit_code: Option<i32>,
}

/// All local records, saved atomically as JSON.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LocalState {
    /// Instances by id.
    pub instances: BTreeMap<String, LocalInstance>,
    #[serde(skip)]
    path: PathBuf,
}

/// Local state failures.
#[derive(Debug, thiserror::Error)]
pub enum LocalStateError {
    /// Read or write failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path} is corrupt: {message}")]
    Corrupt {
        /// File.
        path: String,
        /// Why.
        message: String,
    },
}

impl LocalState {
    /// Loads `path` (empty state if missing).
    pub fn load(path: &Path) -> Result<Self, LocalStateError> {
        let io = |source| LocalStateError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(path) {
            Ok(b) => {
                let mut s: Self =
                    serde_json::from_slice(&b).map_err(|e| LocalStateError::Corrupt {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?;
                s.path = path.to_path_buf();
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                instances: BTreeMap::new(),
                path: path.to_path_buf(),
            }),
            Err(e) => Err(io(e)),
        }
    }

    /// Saves atomically (write, fsync, rename).
    pub fn save(&self) -> Result<(), LocalStateError> {
        Self::write(&self.path, &self.encode())
    }

    /// Where the state is saved.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file contents [`LocalState::save`] writes (to write them outside a lock).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Writes encoded state to `path` atomically (write, fsync, rename).
    pub fn write(path: &Path, data: &[u8]) -> Result<(), LocalStateError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let io = |source| LocalStateError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(data).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_an_older_agent_load_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instances.json");
        std::fs::write(
            &path,
            r#"{"instances":{"a":{"instance_type":"container","generation":3,"restart_nonce":1,"restart_count":2,"handled_exit_pid":7,"pid":7}}}"#,
        )
        .unwrap();
        let mut s = LocalState::load(&path).unwrap();
        let a = s.instances.get("a").cloned().unwrap();
        assert_eq!((a.generation, a.restart_count, a.pid), (3, 2, Some(7)));
        assert_eq!(
            (a.failures, a.not_before_ms, a.pending_restart),
            (0, None, false)
        );
        s.instances.get_mut("a").unwrap().not_before_ms = Some(1234);
        s.instances.get_mut("a").unwrap().last_error = Some("runc failed".into());
        s.save().unwrap();
        let again = LocalState::load(&path).unwrap();
        assert_eq!(again.instances, s.instances);
    }
}
