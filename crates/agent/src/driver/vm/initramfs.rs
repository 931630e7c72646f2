//! The guest initramfs, written in Rust as a newc cpio archive.
//!
//! It holds a static busybox, the virtio modules (resolved in dependency order from the
//! kernel's `modules.dep`, decompressed if needed), the nimbus guest agent and an `/init`
//! script that loads the modules, configures `eth0` from the kernel command line, mounts the
//! root disk and `switch_root`s into it with the guest agent as PID 1. The base archive is
//! cached per (kernel version, busybox, guest agent, init script); each VM gets a copy with its
//! own `nimbus/config.json` appended as a second cpio archive (the kernel unpacks both).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::VmError;

/// Modules the guest needs, in the order they are asked for (dependencies come first).
pub const REQUIRED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "ext4",
];
/// Modules loaded when the kernel has them (ACPI power button events).
pub const OPTIONAL_MODULES: &[&str] = &["button", "evdev"];
/// What `/init` prints when booted with `nimbus.probe=1` (acceleration probe, benchmarks).
pub const PROBE_MARKER: &str = "NIMBUS-PROBE-OK";

/// The `/init` script of the initramfs.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "nimbus-init: insmod $m failed"; done
ip=; gw=; mtu=; probe=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    nimbus.ip=*) ip="${arg#nimbus.ip=}" ;;
    nimbus.gw=*) gw="${arg#nimbus.gw=}" ;;
    nimbus.mtu=*) mtu="${arg#nimbus.mtu=}" ;;
    nimbus.probe=1) probe=1 ;;
  esac
done
if [ -n "$probe" ]; then
  echo "NIMBUS-PROBE-OK"
  poweroff -f
fi
ip link set lo up
if [ -n "$ip" ]; then
  [ -n "$mtu" ] && ip link set eth0 mtu "$mtu"
  ip link set eth0 up
  ip addr add "$ip" dev eth0
  [ -n "$gw" ] && ip route add default via "$gw"
fi
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done
if ! mount -t ext4 /dev/vda /newroot; then
  echo "nimbus-init: cannot mount the root disk /dev/vda"
  poweroff -f
fi
mkdir -p /newroot/.nimbus /newroot/proc /newroot/sys /newroot/dev /newroot/run /newroot/tmp /newroot/etc
cp /nimbus/guest-agent /newroot/.nimbus/guest-agent
cp /bin/busybox /newroot/.nimbus/busybox
[ -f /nimbus/config.json ] && cp /nimbus/config.json /newroot/.nimbus/config.json
umount /proc /sys /dev
echo "nimbus-init: switching to the root disk"
exec switch_root /newroot /.nimbus/guest-agent
echo "nimbus-init: switch_root failed"
poweroff -f
"#;

/// A newc ("070701") cpio archive writer.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.header(name, 0o040_755, 0, (0, 0));
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.header(name, 0o100_000 | mode, data.len(), (0, 0));
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.header(name, 0o020_600, 0, (major, minor));
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        self.buf
    }
}

/// The kernel version: the single directory under `KERNEL_DIR/lib/modules`.
pub fn kernel_version(kernel_dir: &Path) -> Result<String, VmError> {
    let dir = kernel_dir.join("lib/modules");
    let mut versions: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| VmError::Kernel(format!("{}: {e}", dir.display())))?
        .flatten()
        .filter(|e| e.path().join("modules.dep").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    versions.pop().ok_or_else(|| {
        VmError::Kernel(format!(
            "no modules.dep under {} (run scripts/setup-vm)",
            dir.display()
        ))
    })
}

fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

fn visit(
    m: &str,
    deps: &BTreeMap<String, (String, Vec<String>)>,
    soft: &BTreeMap<String, Vec<String>>,
    seen: &mut HashSet<String>,
    out: &mut Vec<String>,
) {
    if !seen.insert(m.to_owned()) {
        return;
    }
    let Some((path, hard)) = deps.get(m) else {
        return;
    };
    for d in soft.get(m).into_iter().flatten().chain(hard) {
        visit(d, deps, soft, seen, out);
    }
    out.push(path.clone());
}

/// Resolves `wanted` modules to their files, dependencies first, from `modules.dep`
/// (plus `softdep ... pre:` lines). Built-in modules are skipped; a missing required module is
/// an error.
pub fn resolve_modules(
    moddir: &Path,
    required: &[&str],
    optional: &[&str],
) -> Result<Vec<String>, VmError> {
    let dep = std::fs::read_to_string(moddir.join("modules.dep"))
        .map_err(|e| VmError::Kernel(format!("{}/modules.dep: {e}", moddir.display())))?;
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let list = rest.split_whitespace().map(module_name).collect();
        deps.insert(module_name(path), (path.to_owned(), list));
    }
    let builtin: HashSet<String> = std::fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut soft: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in std::fs::read_to_string(moddir.join("modules.softdep"))
        .unwrap_or_default()
        .lines()
    {
        let mut words = line.split_whitespace();
        if words.next() != Some("softdep") {
            continue;
        }
        let Some(m) = words.next() else { continue };
        let mut pre = false;
        for w in words {
            match w {
                "pre:" => pre = true,
                "post:" => pre = false,
                other if pre => soft
                    .entry(module_name(m))
                    .or_default()
                    .push(module_name(other)),
                _ => {}
            }
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for m in required {
        if !deps.contains_key(*m) && !builtin.contains(*m) {
            return Err(VmError::Kernel(format!(
                "kernel module {m} is neither in modules.dep nor built in"
            )));
        }
        visit(m, &deps, &soft, &mut seen, &mut out);
    }
    for m in optional {
        visit(m, &deps, &soft, &mut seen, &mut out);
    }
    Ok(out)
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz` (busybox insmod loads
/// plain ELF only).
fn read_module(path: &Path) -> Result<Vec<u8>, VmError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).map_err(|e| VmError::Kernel(format!("{name}: {e}"))),
        Some(tool) => {
            let out = std::process::Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .map_err(|e| VmError::Kernel(format!("{tool} -dc {name}: {e}")))?;
            if !out.status.success() {
                return Err(VmError::Kernel(format!(
                    "{tool} -dc {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Ok(out.stdout)
        }
    }
}

/// Reads a binary for the initramfs without its debug info when `strip` is available (the
/// release guest agent carries ~6 MB of it; every byte is unpacked by the guest at boot).
fn read_stripped(path: &Path) -> Result<Vec<u8>, VmError> {
    let raw = std::fs::read(path)
        .map_err(|e| VmError::Kernel(format!("guest agent {}: {e}", path.display())))?;
    let Ok(tmp) = tempfile::NamedTempFile::new() else {
        return Ok(raw);
    };
    let stripped = std::process::Command::new("strip")
        .arg("-o")
        .arg(tmp.path())
        .arg(path)
        .output()
        .is_ok_and(|o| o.status.success());
    if stripped {
        if let Ok(bytes) = std::fs::read(tmp.path()) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    Ok(raw)
}

/// Inputs of the base initramfs.
pub struct InitramfsInputs<'a> {
    /// Directory with `vmlinuz` and `lib/modules/<version>`.
    pub kernel_dir: &'a Path,
    /// Static busybox.
    pub busybox: &'a Path,
    /// Static guest agent.
    pub guest_agent: &'a Path,
}

/// Builds (or reuses) the cached base initramfs under `cache_dir`; returns its path.
pub fn base_initramfs(cache_dir: &Path, inputs: &InitramfsInputs<'_>) -> Result<PathBuf, VmError> {
    let version = kernel_version(inputs.kernel_dir)?;
    let busybox = std::fs::read(inputs.busybox)
        .map_err(|e| VmError::Kernel(format!("{}: {e}", inputs.busybox.display())))?;
    let agent = read_stripped(inputs.guest_agent)?;
    let mut h = Sha256::new();
    h.update(version.as_bytes());
    h.update(&busybox);
    h.update(&agent);
    h.update(INIT_SCRIPT.as_bytes());
    let key = hex::encode(&h.finalize()[..8]);
    let path = cache_dir.join(format!("initramfs-{version}-{key}.cpio"));
    if path.exists() {
        return Ok(path);
    }
    let moddir = inputs.kernel_dir.join("lib/modules").join(&version);
    let modules = resolve_modules(&moddir, REQUIRED_MODULES, OPTIONAL_MODULES)?;
    let mut cpio = Cpio::new();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "newroot",
        "lib",
        "lib/modules",
        "nimbus",
        "etc",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
    ] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.char_dev("dev/null", 1, 3);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
    cpio.file("nimbus/guest-agent", 0o755, &agent);
    let mut order = String::new();
    for m in &modules {
        let data = read_module(&moddir.join(m))?;
        let name = format!("{}.ko", module_name(m));
        cpio.file(&format!("lib/modules/{name}"), 0o644, &data);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("modules.order", 0o644, order.as_bytes());
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| VmError::io(format!("creating {}", cache_dir.display()), e))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, cpio.finish())
        .map_err(|e| VmError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| VmError::io(format!("renaming {}", tmp.display()), e))?;
    tracing::info!(path = %path.display(), modules = modules.len(), "built guest initramfs");
    Ok(path)
}

/// A second archive with the per-VM config, to append to the base initramfs.
pub fn config_archive(config_json: &[u8]) -> Vec<u8> {
    let mut cpio = Cpio::new();
    cpio.dir("nimbus");
    cpio.file("nimbus/config.json", 0o600, config_json);
    cpio.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut c = Cpio::new();
        c.file("a", 0o644, b"xyz");
        let bytes = c.finish();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(bytes.len() % 4, 0);
        // header(110) + "a\0" padded to 112, data 3 padded to 4, trailer header 110 + 11 -> 124
        assert_eq!(bytes.len(), 112 + 4 + 124);
    }

    #[test]
    fn resolves_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/a/virtio_net.ko.xz: kernel/net_failover.ko kernel/failover.ko kernel/virtio.ko\n\
             kernel/net_failover.ko: kernel/failover.ko\nkernel/failover.ko:\nkernel/virtio.ko:\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        let got = resolve_modules(dir.path(), &["virtio_net", "ext4"], &["evdev"]).unwrap();
        let pos = |m: &str| got.iter().position(|p| p.ends_with(m)).unwrap();
        assert!(pos("kernel/failover.ko") < pos("net_failover.ko"));
        assert!(pos("net_failover.ko") < pos("virtio_net.ko.xz"));
        assert!(pos("virtio.ko") < pos("virtio_net.ko.xz"));
        assert!(resolve_modules(dir.path(), &["nope"], &[]).is_err());
    }
}
