//! Choosing the accelerator: KVM only where a real guest boots under it, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough (nested KVM may accept the VM and then fail minutes later
//! with an emulation failure), so `Accel::Auto` boots the real kernel and initramfs with
//! `-accel kvm` in probe mode and waits, with a deadline, for the init's marker on the serial
//! console. The verdict is cached in the state directory per kernel and QEMU.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::initramfs::PROBE_MARKER;
use super::VmError;

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM if a probe guest boots under it, else TCG.
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

impl Accel {
    /// `kvm` / `tcg` / `auto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    /// QEMU `-accel` and `-cpu` arguments for a resolved accelerator.
    pub fn qemu_args(self) -> Vec<String> {
        match self {
            Self::Kvm => vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()],
            // A bounded translation cache keeps QEMU's own memory within the cgroup limit.
            _ => vec![
                "-accel".into(),
                "tcg,thread=multi,tb-size=64".into(),
                "-cpu".into(),
                "max".into(),
            ],
        }
    }
}

/// How long the KVM probe guest may take to reach its marker.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(12);

/// Cached probe verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeResult {
    /// `kvm` or `tcg`.
    pub accel: Accel,
    /// Why (for logs and `nimbus node` output).
    pub reason: String,
    /// Cache key: kernel version, QEMU path and size.
    pub key: String,
}

/// Resolves `Auto` (probing once, cached in `cache_file`).
pub async fn resolve(
    cache_file: &Path,
    key: &str,
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
) -> Result<ProbeResult, VmError> {
    if let Ok(text) = std::fs::read_to_string(cache_file) {
        if let Ok(cached) = serde_json::from_str::<ProbeResult>(&text) {
            if cached.key == key {
                return Ok(cached);
            }
        }
    }
    let result = if Path::new("/dev/kvm").exists() {
        match probe_kvm(qemu, kernel, initrd).await {
            Ok(()) => ProbeResult {
                accel: Accel::Kvm,
                reason: "a probe guest booted under KVM".into(),
                key: key.into(),
            },
            Err(why) => ProbeResult {
                accel: Accel::Tcg,
                reason: format!("KVM probe failed: {why}"),
                key: key.into(),
            },
        }
    } else {
        ProbeResult {
            accel: Accel::Tcg,
            reason: "/dev/kvm does not exist".into(),
            key: key.into(),
        }
    };
    tracing::info!(accel = result.accel.as_str(), reason = %result.reason, "VM accelerator chosen");
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    std::fs::write(cache_file, text)
        .map_err(|e| VmError::io(format!("writing {}", cache_file.display()), e))?;
    Ok(result)
}

/// Boots the probe guest under KVM; `Err(reason)` unless the marker shows within the deadline.
async fn probe_kvm(qemu: &Path, kernel: &Path, initrd: &Path) -> Result<(), String> {
    let mut child = tokio::process::Command::new(qemu)
        .args([
            "-M", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 nimbus.probe=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let watch = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if seen
                        .windows(PROBE_MARKER.len())
                        .any(|w| w == PROBE_MARKER.as_bytes())
                    {
                        return true;
                    }
                    if seen.len() > (1 << 20) {
                        seen.drain(..seen.len() - 64);
                    }
                }
            }
        }
    };
    let outcome = tokio::time::timeout(PROBE_DEADLINE, watch).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err).await;
            Err(format!(
                "QEMU exited before the guest was up: {}",
                err.trim()
            ))
        }
        Err(_) => Err(format!("no guest userspace within {PROBE_DEADLINE:?}")),
    }
}
