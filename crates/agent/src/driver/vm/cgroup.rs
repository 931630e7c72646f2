//! The QEMU process's cgroup: `/<parent>/<id>` in the cpu, memory and pids hierarchies
//! (cgroup v1 / hybrid), or the unified hierarchy on a pure v2 host.

use std::path::{Path, PathBuf};

use super::VmError;

const ROOT: &str = "/sys/fs/cgroup";

/// Limits for one VM's QEMU.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// CPU quota in CPUs (cfs quota / period).
    pub cpus: f64,
    /// Memory limit in bytes (guest RAM + QEMU overhead).
    pub memory_bytes: u64,
    /// Task limit (QEMU threads).
    pub pids: u64,
}

fn unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// Directories of the VM's cgroup, one per hierarchy.
pub fn dirs(parent: &str, id: &str) -> Vec<PathBuf> {
    let parent = parent.trim_matches('/');
    if unified() {
        vec![Path::new(ROOT).join(parent).join(id)]
    } else {
        ["cpu", "memory", "pids"]
            .iter()
            .map(|c| Path::new(ROOT).join(c).join(parent).join(id))
            .collect()
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), VmError> {
    let path = dir.join(file);
    std::fs::write(&path, value)
        .map_err(|e| VmError::io(format!("writing {value:?} to {}", path.display()), e))
}

/// Creates the cgroup and writes the limits; returns the `cgroup.procs` files to join.
pub fn setup(parent: &str, id: &str, limits: Limits) -> Result<Vec<PathBuf>, VmError> {
    let quota = ((limits.cpus.max(0.01)) * 100_000.0) as u64;
    let mut procs = Vec::new();
    for dir in dirs(parent, id) {
        std::fs::create_dir_all(&dir)
            .map_err(|e| VmError::io(format!("creating cgroup {}", dir.display()), e))?;
        if unified() {
            // Controllers must be enabled in the parents; best effort.
            let mut p = dir.parent();
            let mut chain = Vec::new();
            while let Some(d) = p.filter(|d| d.starts_with(ROOT) && *d != Path::new(ROOT)) {
                chain.push(d.to_path_buf());
                p = d.parent();
            }
            for d in std::iter::once(PathBuf::from(ROOT)).chain(chain.into_iter().rev()) {
                let _ = std::fs::write(d.join("cgroup.subtree_control"), "+cpu +memory +pids");
            }
            write(&dir, "cpu.max", &format!("{quota} 100000"))?;
            write(&dir, "memory.max", &limits.memory_bytes.to_string())?;
            write(&dir, "pids.max", &limits.pids.to_string())?;
        } else {
            let name = dir
                .strip_prefix(ROOT)
                .ok()
                .and_then(|p| p.iter().next())
                .map(|c| c.to_string_lossy().into_owned());
            match name.as_deref() {
                Some("cpu") => {
                    write(&dir, "cpu.cfs_period_us", "100000")?;
                    write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
                }
                Some("memory") => write(
                    &dir,
                    "memory.limit_in_bytes",
                    &limits.memory_bytes.to_string(),
                )?,
                Some("pids") => write(&dir, "pids.max", &limits.pids.to_string())?,
                _ => {}
            }
        }
        procs.push(dir.join("cgroup.procs"));
    }
    Ok(procs)
}

/// Removes the cgroup (the process must be gone). Retries for a moment: a QEMU that just
/// exited may still be a zombie (its parent is init), which keeps the cgroup busy.
pub fn remove(parent: &str, id: &str) {
    for dir in dirs(parent, id) {
        let mut tries = 0;
        while dir.exists() {
            match std::fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if tries < 60 => {
                    tracing::debug!(cgroup = %dir.display(), error = %e, "cgroup busy, retrying");
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "removing cgroup");
                    break;
                }
            }
        }
    }
}
