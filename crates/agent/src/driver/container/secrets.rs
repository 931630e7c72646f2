//! Secrets of a container, kept off the disk: a tmpfs at `<bundle>/secrets/` holds the secret
//! files (bind-mounted read-only at their paths in the container) and the OCI `config.json`
//! itself (it carries the secret environment variables), which `<bundle>/config.json` then
//! links to. After a reboot the tmpfs is gone, the link dangles, the bundle reads as
//! incomplete and the agent creates the container again with freshly fetched secrets.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use oci_spec::runtime::{MountBuilder, Spec};

use super::rootfs::{self, Bundle};
use crate::driver::{DriverError, SecretMaterial};

/// The tmpfs of a bundle that holds its secrets.
pub fn dir(bundle: &Bundle) -> PathBuf {
    bundle.dir.join("secrets")
}

/// Whether the bundle keeps its config on a secrets tmpfs.
pub fn mounted(bundle: &Bundle) -> bool {
    rootfs::is_mount_point(&dir(bundle))
}

fn mount_tmpfs(dir: &Path) -> Result<(), DriverError> {
    std::fs::create_dir_all(dir).map_err(DriverError::io(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(DriverError::io(format!("chmod {}", dir.display())))?;
    if rootfs::is_mount_point(dir) {
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

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), DriverError> {
    let ctx = || format!("writing {}", path.display());
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(DriverError::io(ctx()))?;
    f.write_all(data).map_err(DriverError::io(ctx()))
}

/// Puts the secrets on the bundle's tmpfs and into `oci` (read-only bind mounts, environment).
/// Returns whether the bundle has secrets (then [`save_config`] keeps the config on the tmpfs).
pub fn prepare(
    bundle: &Bundle,
    secrets: &SecretMaterial,
    oci: &mut Spec,
) -> Result<bool, DriverError> {
    if secrets.is_empty() {
        return Ok(false);
    }
    let dir = dir(bundle);
    mount_tmpfs(&dir)?;
    let mut mounts = oci.mounts().clone().unwrap_or_default();
    for (i, (path, value)) in secrets.files.iter().enumerate() {
        let source = dir.join(format!("file-{i}"));
        write_file(&source, value, 0o444)?;
        mounts.push(
            MountBuilder::default()
                .destination(path)
                .typ("bind")
                .source(&source)
                .options(
                    ["rbind", "ro", "nosuid", "nodev", "noexec", "rprivate"]
                        .map(String::from)
                        .to_vec(),
                )
                .build()
                .map_err(|e| DriverError::Runtime {
                    tool: "oci-spec",
                    message: e.to_string(),
                })?,
        );
    }
    oci.set_mounts(Some(mounts));
    if !secrets.env.is_empty() {
        let mut process = oci.process().clone().unwrap_or_default();
        let mut env = process.env().clone().unwrap_or_default();
        for (k, v) in &secrets.env {
            env.retain(|e| e.split_once('=').is_none_or(|(n, _)| n != k));
            env.push(format!("{k}={}", v.as_str()));
        }
        process.set_env(Some(env));
        oci.set_process(Some(process));
    }
    Ok(true)
}

/// Writes the bundle's `config.json`: in place, or (with secrets) on the tmpfs with
/// `config.json` a link to it.
pub fn save_config(bundle: &Bundle, oci: &Spec, on_tmpfs: bool) -> Result<(), DriverError> {
    let link = bundle.config();
    if !on_tmpfs {
        if link.is_symlink() {
            let _ = std::fs::remove_file(&link);
        }
        return super::spec::save(oci, &link);
    }
    let json = zeroize::Zeroizing::new(serde_json::to_vec(oci).map_err(|e| DriverError::Io {
        context: "serializing the OCI config".into(),
        source: e.into(),
    })?);
    let target = dir(bundle).join("config.json");
    write_file(&target, &json, 0o600)?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("secrets/config.json", &link)
        .map_err(DriverError::io(format!("linking {}", link.display())))
}

/// Where exec writes its process file (it carries the environment): the tmpfs when there is one.
pub fn scratch_dir(bundle: &Bundle) -> PathBuf {
    if mounted(bundle) {
        dir(bundle)
    } else {
        bundle.dir.clone()
    }
}
