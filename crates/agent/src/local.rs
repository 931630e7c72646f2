//! The agent's local state: what it has done for each instance, persisted so a restarted agent
//! re-attaches instead of restarting or duplicating instances.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nimbus_api::InstanceType;
use serde::{Deserialize, Serialize};

/// Per-instance local record.
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
        use std::io::Write as _;
        let io = |source| LocalStateError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&serde_json::to_vec_pretty(self).unwrap_or_default())
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}
