//! cgroup v1 (hybrid) accounting and cleanup of container cgroups.

use std::path::{Path, PathBuf};

use crate::driver::{DriverError, RuntimeStats};

/// Mount point of the cgroup hierarchies.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Directory of a container's cgroup in one controller hierarchy.
pub fn dir(controller: &str, parent: &str, id: &str) -> PathBuf {
    Path::new(CGROUP_ROOT)
        .join(controller)
        .join(parent)
        .join(id)
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// CPU time (`cpuacct.usage`) and memory use (`memory.usage_in_bytes`); zero when the cgroup
/// is gone (container not running). Falls back to cgroup v2 files when v1 ones are absent.
pub fn stats(parent: &str, id: &str) -> RuntimeStats {
    let cpu_nanos = read_u64(&dir("cpuacct", parent, id).join("cpuacct.usage"))
        .or_else(|| read_u64(&dir("cpu,cpuacct", parent, id).join("cpuacct.usage")))
        .or_else(|| {
            let text = std::fs::read_to_string(dir("unified", parent, id).join("cpu.stat")).ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|us| us * 1000)
        })
        .unwrap_or(0);
    let memory_bytes = read_u64(&dir("memory", parent, id).join("memory.usage_in_bytes"))
        .or_else(|| read_u64(&dir("unified", parent, id).join("memory.current")))
        .unwrap_or(0);
    RuntimeStats {
        cpu_nanos,
        memory_bytes,
    }
}

/// Existing cgroup directories of a container, in every hierarchy.
pub fn existing(parent: &str, id: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path().join(parent).join(id))
        .filter(|p| p.is_dir())
        .collect()
}

/// Removes the container's cgroups left behind (runc normally removes them).
pub fn remove(parent: &str, id: &str) -> Result<(), DriverError> {
    for d in existing(parent, id) {
        match std::fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DriverError::Io {
                    context: format!("removing cgroup {}", d.display()),
                    source: e,
                })
            }
        }
    }
    Ok(())
}
