//! Choosing the accelerator: KVM only where a real guest boots under it, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough (nested KVM may accept the VM and then fail minutes later
//! with an emulation failure), so `Accel::Auto` boots the real kernel and initramfs with
//! `-accel kvm` in probe mode (`nimbus.probe=1`) and waits, with a deadline, for the init's
//! marker on the serial console.
//!
//! The verdict is cached host-wide, not per data dir: one small JSON file per cache key under
//! the cache directory (`NIMBUS_CACHE_DIR`, default `/var/cache/nimbus` as root), named by a hash
//! of the key and written atomically (temporary file, fsync, rename). The key names everything
//! the verdict depends on: the host kernel release, `/dev/kvm` being there, the guest kernel
//! version and the QEMU binary (its `--version`, path, size and mtime). Probes are serialised
//! host-wide by an `flock` on `vm-accel.lock` in that directory: agents starting together wait
//! for the first one's verdict instead of probing side by side.
//!
//! The probe's QEMU dies with its parent in every case, SIGKILL included: a dedicated thread
//! forks it with `PR_SET_PDEATHSIG = SIGKILL` and waits for it (the signal follows the *thread*
//! that forked, so that thread lives exactly as long as the child; a tokio blocking-pool thread
//! would exit when idle and kill the probe early). A probe left behind by an older nimbus on the
//! same state directory is found by [`stale_probes`] (its `-initrd` lies under this state
//! directory) and killed when the driver starts.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
/// The kernel command-line flag that puts the initramfs in probe mode.
pub const PROBE_FLAG: &str = "nimbus.probe=1";
/// Lock file serialising probes on one host (in the cache directory).
const LOCK_FILE: &str = "vm-accel.lock";

/// Cached probe verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeResult {
    /// `kvm` or `tcg`.
    pub accel: Accel,
    /// Why (for logs and `nimbus node` output).
    pub reason: String,
    /// Cache key (see the module docs).
    pub key: String,
}

/// The cache key of this host, guest kernel and QEMU binary.
pub fn probe_key(qemu: &Path, guest_kernel_version: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = std::process::Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    let (size, mtime) = std::fs::metadata(qemu).map_or((0, 0), |m| {
        use std::os::unix::fs::MetadataExt;
        (m.len(), m.mtime())
    });
    format!(
        "v2 host={} kvm={} guest={guest_kernel_version} qemu={version:?} {} {size} {mtime}",
        host.trim(),
        Path::new("/dev/kvm").exists(),
        qemu.display(),
    )
}

/// The cache file of `key` in `dir`.
fn cache_file(dir: &Path, key: &str) -> PathBuf {
    let h = Sha256::digest(key.as_bytes());
    dir.join(format!("vm-accel-{}.json", &hex::encode(h)[..16]))
}

/// The cached verdict for `key`, if any.
pub fn cached(dir: &Path, key: &str) -> Option<ProbeResult> {
    let text = std::fs::read_to_string(cache_file(dir, key)).ok()?;
    serde_json::from_str::<ProbeResult>(&text)
        .ok()
        .filter(|r| r.key == key)
}

/// Writes a verdict atomically (temporary file in the same directory, fsync, rename).
pub fn store(dir: &Path, result: &ProbeResult) -> Result<(), VmError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| VmError::io(format!("creating {}", dir.display()), e))?;
    let path = cache_file(dir, &result.key);
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let text = serde_json::to_string_pretty(result).unwrap_or_default();
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        VmError::io(format!("writing {}", path.display()), e)
    })
}

/// What to probe with.
#[derive(Debug, Clone)]
pub struct ProbeInputs {
    /// Host-wide cache directory.
    pub cache_dir: PathBuf,
    /// Cache key ([`probe_key`]).
    pub key: String,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (probe mode is a kernel command-line flag).
    pub initrd: PathBuf,
}

/// Resolves `Auto`: the cached verdict, else a probe (one per host at a time) whose verdict is
/// cached. A cache that cannot be written is logged, not fatal: the verdict still holds for
/// this process.
pub async fn resolve(inputs: ProbeInputs) -> Result<ProbeResult, VmError> {
    if let Some(hit) = cached(&inputs.cache_dir, &inputs.key) {
        return Ok(hit);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Not the blocking pool: this thread is the probe's parent for the parent-death signal and
    // must live until the probe is reaped.
    std::thread::Builder::new()
        .name("nimbus-kvm-probe".into())
        .spawn(move || {
            let _ = tx.send(resolve_blocking(&inputs));
        })
        .map_err(|e| VmError::io("starting the KVM probe thread", e))?;
    rx.await
        .map_err(|_| VmError::Qemu("the KVM probe thread ended without a verdict".into()))
}

fn resolve_blocking(inputs: &ProbeInputs) -> ProbeResult {
    let _lock = lock_host(&inputs.cache_dir);
    if let Some(hit) = cached(&inputs.cache_dir, &inputs.key) {
        return hit;
    }
    let (accel, reason) = if Path::new("/dev/kvm").exists() {
        match probe_kvm(&inputs.qemu, &inputs.kernel, &inputs.initrd, PROBE_DEADLINE) {
            Ok(()) => (Accel::Kvm, "a probe guest booted under KVM".to_owned()),
            Err(why) => (Accel::Tcg, format!("KVM probe failed: {why}")),
        }
    } else {
        (Accel::Tcg, "/dev/kvm does not exist".to_owned())
    };
    let result = ProbeResult {
        accel,
        reason,
        key: inputs.key.clone(),
    };
    tracing::info!(accel = result.accel.as_str(), reason = %result.reason, "VM accelerator chosen");
    if let Err(e) = store(&inputs.cache_dir, &result) {
        tracing::warn!("caching the VM accelerator verdict: {e}");
    }
    result
}

/// Holds the host-wide probe lock (blocking); `None` if the cache directory is unusable.
fn lock_host(dir: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let open = std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
    });
    match open {
        Ok(f) => match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive) {
            Ok(l) => Some(l),
            Err((_, e)) => {
                tracing::warn!("locking {}: {e}", dir.join(LOCK_FILE).display());
                None
            }
        },
        Err(e) => {
            tracing::warn!("VM accelerator cache {} unusable: {e}", dir.display());
            None
        }
    }
}

/// QEMU arguments of the probe guest.
fn probe_args(kernel: &Path, initrd: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "-M",
        "q35",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ]
    .map(str::to_owned)
    .to_vec();
    a.push("-kernel".into());
    a.push(kernel.to_string_lossy().into_owned());
    a.push("-initrd".into());
    a.push(initrd.to_string_lossy().into_owned());
    a.push("-append".into());
    a.push(format!("console=ttyS0 panic=-1 {PROBE_FLAG}"));
    a
}

/// In the forked child before exec: SIGKILL when the forking thread ends, and give up if the
/// parent is already gone (it may have died between fork and prctl).
fn die_with_parent(parent: nix::unistd::Pid) -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    if nix::unistd::getppid() != parent {
        // No allocation between fork and exec: a raw OS error.
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// Boots the probe guest under KVM; `Err(reason)` unless the marker shows within `deadline`.
/// Blocking: call it on a thread that lives until it returns (see the module docs).
fn probe_kvm(qemu: &Path, kernel: &Path, initrd: &Path, deadline: Duration) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    let mut cmd = std::process::Command::new(qemu);
    cmd.args(probe_args(kernel, initrd))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[allow(unsafe_code)]
    // SAFETY: the hook runs in the forked child before exec and only makes two
    // async-signal-safe syscalls (prctl, getppid); it allocates nothing on success.
    unsafe {
        cmd.pre_exec(move || die_with_parent(parent));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(stdout.is_some_and(watch_for_marker));
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr {
            let _ = s.take(64 << 10).read_to_string(&mut text);
        }
        text
    });
    let outcome = rx.recv_timeout(deadline);
    let _ = child.kill();
    let _ = child.wait();
    let err = err_reader.join().unwrap_or_default();
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => Err(format!(
            "QEMU exited before the guest was up: {}",
            err.trim()
        )),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("no guest userspace within {deadline:?}"))
        }
    }
}

/// Reads the serial console until the probe marker shows (`true`) or it ends (`false`).
fn watch_for_marker(mut out: impl Read) -> bool {
    let marker = PROBE_MARKER.as_bytes();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(marker.len()).any(|w| w == marker) {
                    return true;
                }
                if seen.len() > (1 << 20) {
                    seen.drain(..seen.len() - marker.len());
                }
            }
        }
    }
}

/// Whether `argv` is an accelerator probe whose initramfs lies under `initramfs_dir`.
pub fn is_probe_of(argv: &[&str], initramfs_dir: &Path) -> bool {
    let after = |flag: &str| {
        argv.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1])
            .unwrap_or_default()
    };
    let probe = after("-append").split_whitespace().any(|a| a == PROBE_FLAG);
    probe && Path::new(after("-initrd")).parent() == Some(initramfs_dir)
}

/// PIDs of accelerator probes of `initramfs_dir` that are not children of this process
/// (left by an earlier process on the same state directory).
pub fn stale_probes(initramfs_dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in proc.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline);
        if !text.contains(PROBE_FLAG) {
            continue;
        }
        let argv: Vec<&str> = text.split('\0').collect();
        if !is_probe_of(&argv, initramfs_dir) {
            continue;
        }
        let ppid = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok())
            });
        if ppid != Some(me) {
            out.push(pid);
        }
    }
    out
}

/// Kills the stale probes of `initramfs_dir` (see [`stale_probes`]); returns their PIDs.
pub fn kill_stale_probes(initramfs_dir: &Path) -> Vec<u32> {
    let pids = stale_probes(initramfs_dir);
    for &pid in &pids {
        tracing::warn!(
            pid,
            "killing a stale VM accelerator probe of an earlier run"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    pids
}

/// The host-wide cache directory: `NIMBUS_CACHE_DIR`, else `/var/cache/nimbus` as root, else
/// `$XDG_CACHE_HOME/nimbus` or `~/.cache/nimbus`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NIMBUS_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/nimbus");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map_or_else(|| PathBuf::from(".nimbus-cache"), |d| d.join("nimbus"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_probes_of_its_own_state_dir() {
        let dir = Path::new("/tmp/t1/data/agent/vms/initramfs");
        let argv = |initrd: &str, append: &str| -> Vec<String> {
            ["qemu", "-M", "q35", "-kernel", "/k/vmlinuz", "-initrd"]
                .iter()
                .map(|s| (*s).to_owned())
                .chain([initrd.to_owned(), "-append".into(), append.to_owned()])
                .collect()
        };
        let check =
            |v: Vec<String>| is_probe_of(&v.iter().map(String::as_str).collect::<Vec<_>>(), dir);
        let probe = "console=ttyS0 panic=-1 nimbus.probe=1";
        assert!(check(argv(
            "/tmp/t1/data/agent/vms/initramfs/i-6.1-ab.cpio",
            probe
        )));
        // Another data dir, even one whose path starts the same.
        assert!(!check(argv(
            "/tmp/t1/data2/agent/vms/initramfs/i.cpio",
            probe
        )));
        assert!(!check(argv(
            "/tmp/t1/data/agent/vms/initramfs-x/i.cpio",
            probe
        )));
        // A VM of this state dir, not a probe.
        assert!(!check(argv(
            "/tmp/t1/data/agent/vms/initramfs/i.cpio",
            "console=ttyS0 nimbus.ip=10.0.0.2/24"
        )));
        assert!(!check(argv(
            "/tmp/t1/data/agent/vms/initramfs/i.cpio",
            "nimbus.probe=10"
        )));
        assert!(!is_probe_of(&[], dir));
    }

    #[test]
    fn cache_roundtrip_is_keyed_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("nested/cache");
        assert!(cached(&cache, "k1").is_none());
        let r = ProbeResult {
            accel: Accel::Tcg,
            reason: "test".into(),
            key: "k1".into(),
        };
        store(&cache, &r).unwrap();
        assert_eq!(cached(&cache, "k1").unwrap().accel, Accel::Tcg);
        assert!(cached(&cache, "k2").is_none(), "another key misses");
        // Only the verdict file is left: no temporary files.
        let names: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(
            names[0].starts_with("vm-accel-")
                && Path::new(&names[0]).extension() == Some("json".as_ref())
        );
        // A file whose key differs (a hash collision, a hand edit) is not trusted.
        std::fs::write(
            cache_file(&cache, "k1"),
            r#"{"accel":"kvm","reason":"x","key":"other"}"#,
        )
        .unwrap();
        assert!(cached(&cache, "k1").is_none());
    }

    #[test]
    fn key_names_the_guest_kernel_and_qemu() {
        let k1 = probe_key(Path::new("/nonexistent/qemu"), "6.1.0-1-cloud-amd64");
        let k2 = probe_key(Path::new("/nonexistent/qemu"), "6.1.0-2-cloud-amd64");
        assert_ne!(k1, k2);
        assert!(k1.contains("6.1.0-1-cloud-amd64") && k1.contains("/nonexistent/qemu"));
        assert!(k1.contains("host="));
    }
}
