//! Secrets of a VM, kept off the host disk.
//!
//! `create` puts them on a tmpfs at `vms/<id>/secrets/` (one file, 0600, already in the form
//! of the guest agent's `secrets` request). After every boot, once the guest agent answers,
//! the driver sends that request over the virtio-serial port before it reports the VM running
//! (see `ready`); the guest, told by its config that secrets are coming, waits for them before
//! user-data and the command start. Neither the initramfs nor `spec.json` carries a value.
//! After a host reboot the tmpfs is gone: `state()` reads absent, the agent creates the
//! instance again and `create` puts freshly fetched secrets back.

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::Serialize;
use zeroize::Zeroizing;

use super::guest;
use super::process::VmPaths;
use super::VmError;
use crate::driver::{DriverError, SecretMaterial};

/// The tmpfs of a VM's secrets.
fn dir(paths: &VmPaths) -> PathBuf {
    paths.dir.join("secrets")
}

/// The stored `secrets` request.
fn file(paths: &VmPaths) -> PathBuf {
    dir(paths).join("request.json")
}

/// Whether the VM's secrets are on this node (its tmpfs survived since `create`).
pub fn present(paths: &VmPaths) -> bool {
    file(paths).is_file()
}

#[derive(Serialize)]
struct Request<'a> {
    op: &'static str,
    files: Vec<SecretFile<'a>>,
    env: Vec<SecretVar<'a>>,
}

#[derive(Serialize)]
struct SecretFile<'a> {
    path: &'a str,
    /// Base64.
    data: &'a str,
}

#[derive(Serialize)]
struct SecretVar<'a> {
    name: &'a str,
    value: &'a str,
}

fn is_mount_point(dir: &Path) -> bool {
    let (Ok(d), Some(Ok(p))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) else {
        return false;
    };
    d.dev() != p.dev()
}

fn mount_tmpfs(dir: &Path) -> Result<(), DriverError> {
    std::fs::create_dir_all(dir).map_err(DriverError::io(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(DriverError::io(format!("chmod {}", dir.display())))?;
    if is_mount_point(dir) {
        return Ok(());
    }
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700,size=16m"),
    )
    .map_err(|e| DriverError::Io {
        context: format!("mounting a tmpfs for secrets on {}", dir.display()),
        source: e.into(),
    })
}

/// Puts the VM's secrets on its tmpfs (mounted if needed).
pub fn store(paths: &VmPaths, secrets: &SecretMaterial) -> Result<(), DriverError> {
    let dir = dir(paths);
    mount_tmpfs(&dir)?;
    let encoded: Vec<Zeroizing<String>> = secrets
        .files
        .iter()
        .map(|(_, v)| Zeroizing::new(nimbus_api::secret::encode(v)))
        .collect();
    let req = Request {
        op: "secrets",
        files: secrets
            .files
            .iter()
            .zip(&encoded)
            .map(|((path, _), data)| SecretFile {
                path,
                data: data.as_str(),
            })
            .collect(),
        env: secrets
            .env
            .iter()
            .map(|(name, value)| SecretVar {
                name,
                value: value.as_str(),
            })
            .collect(),
    };
    let json = Zeroizing::new(serde_json::to_vec(&req).map_err(|e| DriverError::Io {
        context: "serializing the VM's secrets".into(),
        source: e.into(),
    })?);
    let path = file(paths);
    let ctx = || format!("writing {}", path.display());
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(DriverError::io(ctx()))?;
    f.write_all(&json).map_err(DriverError::io(ctx()))
}

/// Sends the stored secrets to the guest agent (`Ok(false)`: the VM has none on this node).
pub async fn deliver(paths: &VmPaths, timeout: Duration) -> Result<bool, VmError> {
    let path = file(paths);
    let stored = match std::fs::read(&path) {
        Ok(b) => Zeroizing::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(VmError::io(format!("reading {}", path.display()), e)),
    };
    // `{"op":..}` becomes `{"id":N,"op":..}\n`, built in place (no copy left unzeroed).
    let id = guest::next_id();
    let head = format!("{{\"id\":{id},");
    let mut line = Zeroizing::new(Vec::with_capacity(head.len() + stored.len() + 1));
    line.extend_from_slice(head.as_bytes());
    line.extend_from_slice(stored.get(1..).unwrap_or_default());
    line.push(b'\n');
    guest::exchange(&paths.guest_agent(), id, &line, timeout).await?;
    Ok(true)
}

/// Unmounts the VM's secrets tmpfs (before its directory is removed). No-op without one.
pub fn unmount(paths: &VmPaths) -> Result<(), DriverError> {
    let dir = dir(paths);
    for _ in 0..8 {
        if !is_mount_point(&dir) {
            return Ok(());
        }
        if let Err(e) = umount2(&dir, MntFlags::empty()) {
            tracing::warn!(mount = %dir.display(), error = %e, "unmount failed, detaching");
            umount2(&dir, MntFlags::MNT_DETACH).map_err(|e| DriverError::Io {
                context: format!("unmounting {}", dir.display()),
                source: e.into(),
            })?;
        }
    }
    Err(DriverError::Io {
        context: format!("unmounting {}", dir.display()),
        source: std::io::Error::other("still mounted"),
    })
}
