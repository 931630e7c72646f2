//! The QEMU process: command line, detached launch into its cgroup, liveness, exit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::VmError;

/// Files of one VM under `STATE/vms/<id>/`.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// The VM's directory.
    pub dir: PathBuf,
}

impl VmPaths {
    /// Paths of the VM in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
    /// Where the unix sockets live: the VM's directory, or, when that path is too long for a
    /// socket address (108 bytes), `/run/nimbus/vm-<hash of the directory>` (deterministic, so
    /// a new driver finds them again).
    pub fn sock_dir(&self) -> PathBuf {
        const MAX_SOCK_PATH: usize = 100;
        if self.dir.as_os_str().len() + "/console.sock".len() < MAX_SOCK_PATH {
            return self.dir.clone();
        }
        let h = <sha2::Sha256 as sha2::Digest>::digest(self.dir.as_os_str().as_encoded_bytes());
        PathBuf::from("/run/nimbus").join(format!("vm-{}", &hex::encode(h)[..16]))
    }
    /// Persisted spec (its presence means "created").
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    /// qcow2 overlay.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// Per-VM initramfs (base + config).
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
    /// QMP socket.
    pub fn qmp(&self) -> PathBuf {
        self.sock_dir().join("qmp.sock")
    }
    /// Guest agent socket.
    pub fn guest_agent(&self) -> PathBuf {
        self.sock_dir().join("ga.sock")
    }
    /// Interactive serial console socket.
    pub fn console_sock(&self) -> PathBuf {
        self.sock_dir().join("console.sock")
    }
    /// Serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Exit status written by the guest agent through its status port.
    pub fn status(&self) -> PathBuf {
        self.dir.join("status")
    }
    /// Exit code recorded by the driver when it stopped the VM.
    pub fn exit_code(&self) -> PathBuf {
        self.dir.join("exit_code")
    }
    /// The QEMU PID whose guest agent answered (see `ready`).
    pub fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }
    /// QEMU's PID.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// QEMU's stderr.
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("qemu.stderr")
    }
}

/// PID of the VM's QEMU if it is alive (checked against its command line, so a reused PID is
/// not mistaken for it).
pub fn running_pid(paths: &VmPaths) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(paths.pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    alive(pid, paths).then_some(pid)
}

fn alive(pid: u32, paths: &VmPaths) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // State is the field after the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("X");
    if state == "Z" || state == "X" {
        return false;
    }
    // While the wrapper shell execs QEMU, the command line can read as empty for a moment:
    // that is not a dead process. Only a different, readable command line (a reused PID) is.
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return true;
    };
    if cmdline.is_empty() {
        return true;
    }
    let qmp = paths.qmp();
    let needle = qmp.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
}

/// Waits until the process is gone; `false` on timeout.
pub async fn wait_exit(pid: u32, paths: &VmPaths, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid, paths) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILLs the process.
pub fn kill_hard(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// The wrapper that joins the cgroup, records its PID and execs QEMU (`$0` is QEMU).
const WRAPPER: &str = r#"exec 2>"$NIMBUS_STDERR" </dev/null >/dev/null
for f in $NIMBUS_CGROUP_PROCS; do echo $$ > "$f" || exit 97; done
echo $$ > "$NIMBUS_PIDFILE"
exec "$0" "$@""#;

/// Launches QEMU detached (own session via `setsid -f`, so it outlives the agent) inside its
/// cgroup, then waits until its QMP socket answers. A QEMU that dies fails with its own
/// stderr text.
pub async fn launch(
    qemu: &Path,
    args: &[String],
    cgroup_procs: &[PathBuf],
    paths: &VmPaths,
    timeout: Duration,
) -> Result<u32, VmError> {
    let sock_dir = paths.sock_dir();
    std::fs::create_dir_all(&sock_dir)
        .map_err(|e| VmError::io(format!("creating {}", sock_dir.display()), e))?;
    for p in [
        paths.pidfile(),
        paths.stderr(),
        paths.qmp(),
        paths.guest_agent(),
        paths.console_sock(),
    ] {
        let _ = std::fs::remove_file(p);
    }
    let procs: Vec<String> = cgroup_procs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let status = tokio::process::Command::new("setsid")
        .arg("-f")
        .args(["sh", "-c", WRAPPER])
        .arg(qemu)
        .args(args)
        .env("NIMBUS_STDERR", paths.stderr())
        .env("NIMBUS_PIDFILE", paths.pidfile())
        .env("NIMBUS_CGROUP_PROCS", procs.join(" "))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .map_err(|e| VmError::Qemu(format!("starting setsid: {e}")))?;
    if !status.status.success() {
        return Err(VmError::Qemu(
            String::from_utf8_lossy(&status.stderr).trim().to_owned(),
        ));
    }
    let deadline = Instant::now() + timeout;
    let stderr_text = || {
        std::fs::read_to_string(paths.stderr())
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    // The PID first (written by the wrapper before exec).
    let pid = loop {
        if let Some(pid) = std::fs::read_to_string(paths.pidfile())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            break pid;
        }
        let err = stderr_text();
        if !err.is_empty() || Instant::now() >= deadline {
            return Err(VmError::Qemu(if err.is_empty() {
                "QEMU did not start".into()
            } else {
                err
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    loop {
        if !alive(pid, paths) {
            // Give the dying process a moment to flush stderr.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let err = stderr_text();
            return Err(VmError::Qemu(if err.is_empty() {
                format!("QEMU (pid {pid}) exited at start")
            } else {
                err
            }));
        }
        if paths.qmp().exists() {
            if let Ok(mut q) = super::qmp::Qmp::connect(&paths.qmp()).await {
                if q.status().await.is_ok() {
                    return Ok(pid);
                }
            }
        }
        if Instant::now() >= deadline {
            kill_hard(pid);
            return Err(VmError::Qemu(format!(
                "QMP did not come up within {timeout:?}: {}",
                stderr_text()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU time (ns) and resident memory (bytes) of a process.
pub fn usage(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // After the command: state(0) ... utime(11) stime(12), in clock ticks (USER_HZ = 100).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let cpu = (ticks(11) + ticks(12)) * 10_000_000;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    (cpu, rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_dirs_get_short_socket_paths() {
        let short = VmPaths::new(PathBuf::from("/var/lib/nimbus/vms/abc"));
        assert_eq!(
            short.qmp(),
            PathBuf::from("/var/lib/nimbus/vms/abc/qmp.sock")
        );
        let long = VmPaths::new(PathBuf::from(format!(
            "/tmp/{}/vms/0f3c9e2a-1b2c-4d5e-8f90-123456789abc",
            "x".repeat(80)
        )));
        assert!(long
            .console_sock()
            .to_string_lossy()
            .starts_with("/run/nimbus/vm-"));
        assert!(long.console_sock().as_os_str().len() < 108);
        assert_eq!(
            long.qmp(),
            VmPaths::new(long.dir.clone()).qmp(),
            "deterministic"
        );
    }
}
