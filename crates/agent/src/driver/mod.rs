//! The seam between the node agent and a hypervisor: one [`Driver`] per instance type.
//!
//! Every driver (container on runc, VM on QEMU) passes the same conformance suite in
//! `driver::conformance`. Drivers own their on-disk state under their state directory and must
//! be able to re-attach to running instances after the agent restarts: all methods take the
//! instance id and rebuild what they need from disk.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use nimbus_api::agent::{ImageRef, NetworkAttachment};
use nimbus_api::{ExecResponse, InstanceType};

/// Everything a driver needs to create an instance.
#[derive(Debug, Clone)]
pub struct RuntimeSpec {
    /// Instance id: the runtime id on the node (container id, VM id).
    pub id: String,
    /// Instance name (hostname).
    pub name: String,
    /// Image.
    pub image: ImageRef,
    /// Unpacked image layer directories, bottom first (from the image store).
    pub layer_dirs: Vec<PathBuf>,
    /// Command (already resolved against the image default; may be empty for VMs).
    pub command: Vec<String>,
    /// Environment `K=V`, image defaults merged with the user's.
    pub env: Vec<String>,
    /// Working directory.
    pub working_dir: String,
    /// vCPUs.
    pub cpus: f64,
    /// Memory limit.
    pub memory_bytes: u64,
    /// Disk size.
    pub disk_bytes: u64,
    /// Process limit.
    pub pids_limit: u64,
    /// Network attachment.
    pub network: NetworkAttachment,
    /// VM user-data.
    pub user_data: Option<String>,
    /// VM SSH keys.
    pub ssh_keys: Vec<String>,
    /// Secret files and variables, in memory only.
    pub secrets: SecretMaterial,
}

/// The unsealed secrets of one instance, as the control plane delivered them for its start.
/// Held in memory only (zeroed on drop); a driver writes them only to tmpfs. `Debug` shows
/// paths and names, never values.
#[derive(Clone, Default)]
pub struct SecretMaterial {
    /// Read-only files: path inside the instance -> value.
    pub files: Vec<(String, zeroize::Zeroizing<Vec<u8>>)>,
    /// Environment variables: name -> value.
    pub env: Vec<(String, zeroize::Zeroizing<String>)>,
}

impl SecretMaterial {
    /// Whether there is nothing to deliver.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.env.is_empty()
    }
}

impl std::fmt::Debug for SecretMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretMaterial")
            .field(
                "files",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

/// Observed runtime state of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeState {
    /// Created (resources exist) but not started.
    Created,
    /// The main process runs but the instance does not serve yet (a VM whose guest agent has
    /// not answered): reported as `starting`, stopped and restarted like a running one.
    Starting {
        /// PID of the main process (QEMU).
        pid: u32,
    },
    /// Main process running.
    Running {
        /// PID of the main process (container init, QEMU).
        pid: u32,
    },
    /// Main process exited.
    Exited {
        /// Exit code (128+signal for signals); `None` if it could not be recovered.
        code: Option<i32>,
    },
    /// Nothing of it exists on this node.
    Absent,
}

/// Resource usage of one instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Cumulative CPU time in nanoseconds.
    pub cpu_nanos: u64,
    /// Current memory use in bytes.
    pub memory_bytes: u64,
}

/// Driver failures.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The instance does not exist on this node.
    #[error("instance {0} not found on this node")]
    NotFound(String),
    /// The instance is not running (exec, stop).
    #[error("instance {0} is not running")]
    NotRunning(String),
    /// The runtime binary failed; `message` carries its own words (stderr).
    #[error("{tool} failed: {message}")]
    Runtime {
        /// Which tool (`runc`, `qemu`).
        tool: &'static str,
        /// What it said.
        message: String,
    },
    /// The driver cannot work on this node (missing binary, kernel).
    #[error("driver unavailable: {0}")]
    Unavailable(String),
    /// Timed out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Local I/O.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl DriverError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// A hypervisor driver.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Which instance type this driver runs.
    fn instance_type(&self) -> InstanceType;

    /// Creates the instance's resources (rootfs or disk, network attachment, runtime bundle)
    /// without starting it. Idempotent: creating an existing instance is a no-op.
    async fn create(&self, spec: &RuntimeSpec) -> Result<(), DriverError>;

    /// Starts (or restarts after an exit) the main process. Returns its PID.
    async fn start(&self, id: &str) -> Result<u32, DriverError>;

    /// Stops the main process: graceful signal / ACPI powerdown, then a hard kill after
    /// `grace`. Stopping a stopped instance is a no-op.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError>;

    /// Observed state.
    async fn state(&self, id: &str) -> Result<RuntimeState, DriverError>;

    /// Runs a command inside the running instance and returns its output and exit code.
    async fn exec(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecResponse, DriverError>;

    /// Path of the instance's log (container stdout/stderr, VM serial console).
    fn log_path(&self, id: &str) -> PathBuf;

    /// Resource usage.
    async fn stats(&self, id: &str) -> Result<RuntimeStats, DriverError>;

    /// Removes everything of the instance: processes, mounts, cgroups, interfaces, files.
    /// Deleting an absent instance is a no-op.
    async fn delete(&self, id: &str) -> Result<(), DriverError>;

    /// The host-side network interface of the instance (veth or tap), whose counters are the
    /// instance's traffic and which the datapath's anti-spoofing rules name.
    fn host_interface(&self, id: &str) -> Option<String> {
        let _ = id;
        None
    }

    /// The unix socket of the instance's interactive console (VM serial console), if it has one.
    fn console_socket(&self, id: &str) -> Option<PathBuf> {
        let _ = id;
        None
    }

    /// Ids of all instances this driver has state for on this node (for re-attach and GC).
    async fn list(&self) -> Result<Vec<String>, DriverError>;
}

pub mod conformance;
pub mod container;
pub mod hollow;
pub mod vm;
