//! VM disks: an image becomes a base ext4 file once per image digest (layers flattened into a
//! temporary directory, then `mkfs.ext4 -d`; no mount needed), and each VM gets a qcow2
//! overlay on top of it, sized to the instance's disk. Many VMs share one base.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::VmError;

/// Block size of base filesystems (the guest agent relies on it to grow the root online).
pub const BLOCK_SIZE: u64 = 4096;

fn run(tool: &'static str, cmd: &mut Command) -> Result<String, VmError> {
    let out = cmd.output().map_err(|e| VmError::Tool {
        tool,
        message: e.to_string(),
    })?;
    if !out.status.success() {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if message.is_empty() {
            message = format!("exited with {}", out.status);
        }
        return Err(VmError::Tool { tool, message });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// File name of an image digest (`sha256:abc` -> `sha256_abc`).
pub fn digest_file_name(digest: &str) -> String {
    digest
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Merges layer directories (bottom first, overlayfs/OCI whiteouts) into `dest`.
///
/// Whiteouts: `.wh.NAME` files and 0:0 character devices delete `NAME` from the layers below;
/// `.wh..wh..opq` empties its directory first.
pub fn flatten_layers(layers: &[PathBuf], dest: &Path) -> Result<(), VmError> {
    std::fs::create_dir_all(dest)
        .map_err(|e| VmError::io(format!("creating {}", dest.display()), e))?;
    for layer in layers {
        // Opaque directories: clear what lower layers put there.
        for rel in find_whiteouts(layer)?.opaque {
            let target = dest.join(&rel);
            if target.is_dir() {
                let _ = std::fs::remove_dir_all(&target);
            }
        }
        let mut src = layer.clone().into_os_string();
        src.push("/.");
        run(
            "cp",
            Command::new("cp")
                .arg("-a")
                .arg("--remove-destination")
                .arg(&src)
                .arg(dest),
        )?;
        let wh = find_whiteouts(layer)?;
        for rel in wh.removed {
            let target = dest.join(&rel);
            let _ = std::fs::remove_dir_all(&target).or_else(|_| std::fs::remove_file(&target));
        }
        for rel in wh.markers {
            let _ = std::fs::remove_file(dest.join(rel));
        }
    }
    Ok(())
}

#[derive(Default)]
struct Whiteouts {
    /// Paths (relative) deleted by this layer.
    removed: Vec<PathBuf>,
    /// `.wh.*` marker files to drop after copying.
    markers: Vec<PathBuf>,
    /// Opaque directories.
    opaque: Vec<PathBuf>,
}

fn find_whiteouts(layer: &Path) -> Result<Whiteouts, VmError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Whiteouts::default();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = layer.join(&rel);
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| VmError::io(format!("reading {}", dir.display()), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = rel.join(&name);
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if name == ".wh..wh..opq" {
                out.opaque.push(rel.clone());
                out.markers.push(path);
            } else if let Some(hidden) = name.strip_prefix(".wh.") {
                out.removed.push(rel.join(hidden));
                out.markers.push(path);
            } else if meta.file_type().is_char_device() && meta.rdev() == 0 {
                out.removed.push(path);
            } else if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(out)
}

fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            total += meta.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE + 256;
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// The base ext4 disk of an image (built once, then reused); returns its path.
pub fn base_disk(images_dir: &Path, digest: &str, layers: &[PathBuf]) -> Result<PathBuf, VmError> {
    let path = images_dir.join(format!("{}.ext4", digest_file_name(digest)));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(images_dir)
        .map_err(|e| VmError::io(format!("creating {}", images_dir.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix("flatten-")
        .tempdir_in(images_dir)
        .map_err(|e| VmError::io("creating a temporary directory", e))?;
    let root = tmp.path().join("root");
    flatten_layers(layers, &root)?;
    for d in [".nimbus", "proc", "sys", "dev", "run", "tmp", "etc", "root"] {
        let _ = std::fs::create_dir_all(root.join(d));
    }
    // Room for the filesystem's own metadata and a little slack; the per-VM overlay is larger
    // and the guest grows the filesystem to fill it at boot.
    let size = (tree_size(&root) * 5 / 4 + (48 << 20)).div_ceil(1 << 20) << 20;
    let raw = tmp.path().join("disk.ext4");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(size))
        .map_err(|e| VmError::io(format!("creating {}", raw.display()), e))?;
    run(
        "mkfs.ext4",
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-b",
                &BLOCK_SIZE.to_string(),
                "-L",
                "nimbus-root",
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(&root)
            .arg(&raw),
    )?;
    std::fs::rename(&raw, &path)
        .map_err(|e| VmError::io(format!("renaming to {}", path.display()), e))?;
    tracing::info!(image = digest, path = %path.display(), size, "built base disk");
    Ok(path)
}

/// Creates the VM's qcow2 overlay on `base` with `size` bytes (0: the base's size). Fails if
/// `size` is smaller than the base.
pub fn create_overlay(base: &Path, overlay: &Path, size: u64) -> Result<(), VmError> {
    let base_size = std::fs::metadata(base)
        .map_err(|e| VmError::io(format!("reading {}", base.display()), e))?
        .len();
    if size != 0 && size < base_size {
        return Err(VmError::DiskTooSmall {
            requested: size,
            base: base_size,
        });
    }
    let size = if size == 0 { base_size } else { size };
    run(
        "qemu-img",
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(overlay)
            .arg(size.to_string()),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_applies_whiteouts() {
        let t = tempfile::tempdir().unwrap();
        let (l1, l2, out) = (
            t.path().join("l1"),
            t.path().join("l2"),
            t.path().join("out"),
        );
        std::fs::create_dir_all(l1.join("etc/d")).unwrap();
        std::fs::write(l1.join("etc/a"), "a").unwrap();
        std::fs::write(l1.join("etc/b"), "b").unwrap();
        std::fs::write(l1.join("etc/d/x"), "x").unwrap();
        std::fs::create_dir_all(l2.join("etc/d")).unwrap();
        std::fs::write(l2.join("etc/.wh.a"), "").unwrap();
        std::fs::write(l2.join("etc/d/.wh..wh..opq"), "").unwrap();
        std::fs::write(l2.join("etc/d/y"), "y").unwrap();
        std::fs::write(l2.join("etc/b"), "b2").unwrap();
        flatten_layers(&[l1, l2], &out).unwrap();
        assert!(!out.join("etc/a").exists());
        assert!(!out.join("etc/.wh.a").exists());
        assert_eq!(std::fs::read_to_string(out.join("etc/b")).unwrap(), "b2");
        assert!(!out.join("etc/d/x").exists());
        assert!(out.join("etc/d/y").exists());
        assert!(!out.join("etc/d/.wh..wh..opq").exists());
    }
}
