//! Errors of the VM driver.

use std::time::Duration;

use super::super::DriverError;

/// VM driver failures; converted into [`DriverError`] at the trait boundary.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Kernel, modules or initramfs inputs are missing or broken.
    #[error("guest kernel: {0}")]
    Kernel(String),
    /// QEMU failed; carries its own stderr.
    #[error("{0}")]
    Qemu(String),
    /// A QMP command failed; carries QEMU's error description.
    #[error("QMP: {0}")]
    Qmp(String),
    /// The guest agent answered with an error or the connection failed.
    #[error("guest agent: {0}")]
    Guest(String),
    /// The guest agent did not answer in time.
    #[error("guest agent did not answer within {0:?}")]
    GuestTimeout(Duration),
    /// An external tool failed (`mkfs.ext4`, `qemu-img`, `ip`, `cp`): its own words.
    #[error("{tool}: {message}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// What it said.
        message: String,
    },
    /// The requested disk cannot hold the image.
    #[error("disk of {requested} bytes is smaller than the image's base disk ({base} bytes)")]
    DiskTooSmall {
        /// Requested size.
        requested: u64,
        /// Size of the image's base disk.
        base: u64,
    },
    /// Invalid instance spec (user-data too large).
    #[error("{0}")]
    Invalid(String),
    /// Local I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<VmError> for DriverError {
    fn from(e: VmError) -> Self {
        match e {
            VmError::Kernel(m) => DriverError::Unavailable(format!("guest kernel: {m}")),
            VmError::Qemu(m) => DriverError::Runtime {
                tool: "qemu",
                message: m,
            },
            VmError::Qmp(m) => DriverError::Runtime {
                tool: "qemu",
                message: format!("QMP: {m}"),
            },
            VmError::Guest(m) => DriverError::Runtime {
                tool: "guest-agent",
                message: m,
            },
            VmError::GuestTimeout(d) => DriverError::Timeout(d),
            VmError::Tool { tool, message } => DriverError::Runtime { tool, message },
            e @ VmError::DiskTooSmall { .. } => DriverError::Runtime {
                tool: "vm-disk",
                message: e.to_string(),
            },
            VmError::Invalid(m) => DriverError::Runtime {
                tool: "vm",
                message: m,
            },
            VmError::Io { context, source } => DriverError::Io { context, source },
        }
    }
}
