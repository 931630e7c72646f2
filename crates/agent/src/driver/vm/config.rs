//! Configuration of the VM driver and where its inputs are found on a node.

use std::path::{Path, PathBuf};

pub use super::accel::default_cache_dir;
use super::{Accel, DEFAULT_KERNEL_DIR};

/// Configuration of [`VmDriver`].
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Where the driver keeps its state (see the module docs).
    pub state_dir: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Directory with `vmlinuz` and `lib/modules/<version>/` (see `scripts/setup-vm`).
    pub kernel_dir: PathBuf,
    /// Accelerator policy.
    pub accel: Accel,
    /// The static `nimbus-guest-agent` binary.
    pub guest_agent: PathBuf,
    /// Cgroup parent: each QEMU runs in `/<cgroup_parent>/<id>`.
    pub cgroup_parent: String,
    /// Host-wide cache directory (the accelerator probe's verdict; see `accel`).
    pub cache_dir: PathBuf,
}

impl VmConfig {
    /// Defaults for a node: `qemu-system-x86_64` from `PATH`, the kernel dir from
    /// `NIMBUS_KERNEL_DIR` (default `/var/lib/nimbus/kernel`), accelerator from `NIMBUS_VM_ACCEL`
    /// (`auto`|`kvm`|`tcg`), the guest agent from [`default_guest_agent`], cgroup parent `nimbus`,
    /// the cache directory from [`default_cache_dir`] (`NIMBUS_CACHE_DIR`).
    pub fn from_env(state_dir: PathBuf) -> Self {
        let accel = match std::env::var("NIMBUS_VM_ACCEL").as_deref() {
            Ok("kvm") => Accel::Kvm,
            Ok("tcg") => Accel::Tcg,
            _ => Accel::Auto,
        };
        Self {
            state_dir,
            qemu: find_in_path("qemu-system-x86_64")
                .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64")),
            kernel_dir: default_kernel_dir(),
            accel,
            guest_agent: default_guest_agent(),
            cgroup_parent: "nimbus".into(),
            cache_dir: default_cache_dir(),
        }
    }
}

/// `NIMBUS_KERNEL_DIR`, else `/var/lib/nimbus/kernel`.
pub fn default_kernel_dir() -> PathBuf {
    std::env::var_os("NIMBUS_KERNEL_DIR")
        .map_or_else(|| PathBuf::from(DEFAULT_KERNEL_DIR), PathBuf::from)
}

/// Where the static guest agent is: `NIMBUS_GUEST_AGENT`, else `nimbus-guest-agent` next to the
/// running executable, else the workspace's static build
/// (`target/x86_64-unknown-linux-gnu/release/nimbus-guest-agent`, searched upwards from the
/// executable).
pub fn default_guest_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("NIMBUS_GUEST_AGENT") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent();
    // Beside the binary (an installed pair), but only a static build: in a cargo target dir
    // `target/debug/nimbus-guest-agent` is the ordinary dynamic build of the workspace.
    if let Some(d) = dir {
        let beside = d.join("nimbus-guest-agent");
        if beside.exists() && is_static_elf(&beside).unwrap_or(false) {
            return beside;
        }
    }
    while let Some(d) = dir {
        let built = d.join("x86_64-unknown-linux-gnu/release/nimbus-guest-agent");
        if built.exists() {
            return built;
        }
        dir = d.parent();
    }
    PathBuf::from("/usr/local/lib/nimbus/nimbus-guest-agent")
}

pub(super) fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Whether an ELF file is statically linked (no `PT_INTERP` program header).
pub(super) fn is_static_elf(path: &Path) -> Result<bool, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Err(format!("{} is not a 64-bit ELF file", path.display()));
    }
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap_or_default());
    let u16_at = |o: usize| u16::from_le_bytes(data[o..o + 2].try_into().unwrap_or_default());
    let (phoff, phentsize, phnum) = (
        u64_at(32) as usize,
        usize::from(u16_at(54)),
        usize::from(u16_at(56)),
    );
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > data.len() {
            break;
        }
        if u32::from_le_bytes(data[o..o + 4].try_into().unwrap_or_default()) == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}
