//! The bundle directory of a container: overlayfs root, generated `/etc` files, mount helpers.

use std::io::Write;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::{debug, warn};

use crate::driver::DriverError;

/// Writes `data` to `path` atomically (temporary file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), DriverError> {
    write_replace(path, data, true)
}

/// Replaces `path` with `data` atomically (temporary file + rename), optionally fsyncing the
/// data first. Without fsync the file is still never seen half-written by another process; only
/// a power loss can leave it empty. That is enough for the bundle's derived files (regenerated
/// from the assignment: the driver treats a bundle whose config does not parse as absent) and
/// for the shim's launch records (meaningless after a reboot), and it keeps fsyncs off the
/// launch path.
pub fn write_replace(path: &Path, data: &[u8], durable: bool) -> Result<(), DriverError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let ctx = || format!("writing {}", path.display());
    let mut f = std::fs::File::create(&tmp).map_err(DriverError::io(ctx()))?;
    f.write_all(data).map_err(DriverError::io(ctx()))?;
    if durable {
        f.sync_all().map_err(DriverError::io(ctx()))?;
    }
    std::fs::rename(&tmp, path).map_err(DriverError::io(ctx()))
}

/// Paths inside one container's bundle directory (`state_dir/<id>/`).
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory.
    pub dir: PathBuf,
}

impl Bundle {
    /// The bundle of `id` under `state_dir`.
    pub fn new(state_dir: &Path, id: &str) -> Self {
        Self {
            dir: state_dir.join(id),
        }
    }
    /// The overlay mount point (container root).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    /// Overlay upper dir: the container's writes, kept across stop/start.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    /// Overlay work dir.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// Empty lower dir for images without layers.
    pub fn empty_lower(&self) -> PathBuf {
        self.dir.join("lower-empty")
    }
    /// `config.json`.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// What the driver needs to rebuild the bundle's mounts and network.
    pub fn meta(&self) -> PathBuf {
        self.dir.join("nimbus.json")
    }
    /// Container stdout/stderr.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Exit status written by the shim.
    pub fn exit_json(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    /// Container init PID written by runc.
    pub fn init_pid(&self) -> PathBuf {
        self.dir.join("init.pid")
    }
    /// PID of the shim.
    pub fn shim_pid(&self) -> PathBuf {
        self.dir.join("shim.pid")
    }
    /// runc's own log (JSON lines) for `create`.
    pub fn runc_log(&self) -> PathBuf {
        self.dir.join("runc.log")
    }
    /// Written by the shim once runc created the container (its init waits to be started):
    /// the init PID.
    pub fn created(&self) -> PathBuf {
        self.dir.join("created")
    }
    /// Written once the container's network namespace is wired (veth, address, routes).
    pub fn net_ok(&self) -> PathBuf {
        self.dir.join("net.ok")
    }
    /// Written once the container's process was started (`runc start`): the init PID.
    pub fn started(&self) -> PathBuf {
        self.dir.join("started")
    }
    /// runc's error when it failed to create the container, written by the shim.
    pub fn start_error(&self) -> PathBuf {
        self.dir.join("start.err")
    }
    /// The shim's own diagnostics.
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
    /// `/etc/hosts` of the container.
    pub fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }
    /// `/etc/hostname` of the container.
    pub fn hostname(&self) -> PathBuf {
        self.dir.join("hostname")
    }
    /// `/etc/resolv.conf` of the container.
    pub fn resolv_conf(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }
}

/// Writes the container's `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` sources.
pub fn write_etc_files(bundle: &Bundle, name: &str, ip: &str) -> Result<(), DriverError> {
    let hosts =
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{name}\n");
    write_replace(&bundle.hosts(), hosts.as_bytes(), false)?;
    write_replace(&bundle.hostname(), format!("{name}\n").as_bytes(), false)?;
    let resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
    write_replace(&bundle.resolv_conf(), &resolv, false)
}

/// Unescapes the octal escapes (`\040`) of `/proc/self/mountinfo` fields.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points (as absolute paths) of this process's mount namespace.
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect()
}

/// Whether `path` is a mount point.
pub fn is_mount_point(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mount_points().iter().any(|m| m == &path)
}

/// Mounts the overlay root of a bundle (idempotent). `layer_dirs` are bottom first.
pub fn mount_overlay(bundle: &Bundle, layer_dirs: &[PathBuf]) -> Result<(), DriverError> {
    let rootfs = bundle.rootfs();
    for d in [rootfs.clone(), bundle.upper(), bundle.work()] {
        std::fs::create_dir_all(&d)
            .map_err(DriverError::io(format!("creating {}", d.display())))?;
    }
    if is_mount_point(&rootfs) {
        return Ok(());
    }
    let mut lowers: Vec<PathBuf> = layer_dirs.iter().rev().cloned().collect();
    if lowers.is_empty() {
        let empty = bundle.empty_lower();
        std::fs::create_dir_all(&empty)
            .map_err(DriverError::io(format!("creating {}", empty.display())))?;
        lowers.push(empty);
    }
    let mut lower = String::new();
    for (i, l) in lowers.iter().enumerate() {
        let s = l.to_str().unwrap_or_default();
        if s.is_empty() || s.contains([':', ',']) || !l.is_absolute() {
            return Err(DriverError::Io {
                context: "mounting the overlay root".into(),
                source: std::io::Error::other(format!(
                    "layer directory {} must be an absolute path without ':' or ','",
                    l.display()
                )),
            });
        }
        if i > 0 {
            lower.push(':');
        }
        lower.push_str(s);
    }
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        bundle.upper().display(),
        bundle.work().display()
    );
    mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| DriverError::Io {
        context: format!("mounting overlay on {} ({opts})", rootfs.display()),
        source: e.into(),
    })?;
    debug!(rootfs = %rootfs.display(), "mounted overlay");
    Ok(())
}

/// Unmounts everything mounted at or below `dir` (deepest first). No-op if nothing is.
pub fn unmount_all_under(dir: &Path) -> Result<(), DriverError> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut mounts: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&dir))
        .collect();
    // Deepest first; a path mounted several times appears several times.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        match umount2(&m, MntFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                warn!(mount = %m.display(), error = %e, "unmount failed, detaching");
                umount2(&m, MntFlags::MNT_DETACH).map_err(|e| DriverError::Io {
                    context: format!("unmounting {}", m.display()),
                    source: e.into(),
                })?;
            }
        }
    }
    if is_mount_point(&dir) || mount_points().iter().any(|m| m.starts_with(&dir)) {
        return Err(DriverError::Io {
            context: format!("unmounting under {}", dir.display()),
            source: std::io::Error::other("mounts remain"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")));
        assert!(!is_mount_point(Path::new("/nonexistent-nimbus-dir")));
    }

    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        write_atomic(&p, b"1").unwrap();
        write_atomic(&p, b"2").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
