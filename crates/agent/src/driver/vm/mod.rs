//! The VM driver: one QEMU process per instance, driven over QMP, booting Debian's cloud kernel
//! with nimbus's own initramfs and the instance's image as an ext4 disk.
//!
//! A VM is `Starting` while QEMU boots and `Running` once its guest agent answered (see
//! `ready`). A VM whose command is its image's default (no command given: the agent resolves
//! the default) runs that command as a service whose exit is logged and leaves the VM up until
//! it is stopped; an explicit command is the main service: its exit powers the VM off and is the
//! instance's exit code, like a container's main process. (A command given explicitly but
//! equal to the image's default counts as the default.)
//!
//! The accelerator verdict (`Accel::Auto`) is cached host-wide, outside the state directory
//! (see `accel`).
//!
//! Layout under the state directory:
//! ```text
//! initramfs/initramfs-<kver>-<hash>.cpio   base initramfs (busybox, modules, guest agent, /init)
//! images/<digest>.ext4            base disk per image digest (shared, read-only backing file)
//! vms/<id>/spec.json              the instance (its presence means "created")
//! vms/<id>/disk.qcow2             the instance's overlay disk
//! vms/<id>/initrd.img             base initramfs + per-VM config archive (no secret values)
//! vms/<id>/secrets/               tmpfs with the secrets, sent to the guest agent at each boot
//! vms/<id>/{qmp,ga,console}.sock  QMP, guest agent, interactive serial console
//! vms/<id>/console.log            serial console log (the instance log)
//! vms/<id>/qemu.pid, qemu.stderr  the QEMU process
//! vms/<id>/status, exit_code      exit status from the guest / recorded at stop
//! vms/<id>/ready                  the QEMU PID whose guest agent answered
//! ```
//! Secrets reach the guest over the guest agent's virtio-serial port, never the disk (see
//! `secrets`). Every method rebuilds what it needs from these files, so a new driver on the same state
//! directory re-attaches to running VMs (same QEMU PID) instead of restarting them.

mod accel;
mod cgroup;
mod config;
mod disk;
mod error;
mod guest;
mod initramfs;
mod net;
mod process;
mod qmp;
mod ready;
mod secrets;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nimbus_api::agent::NetworkAttachment;
use nimbus_api::{ExecResponse, InstanceType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use accel::{Accel, ProbeResult, PROBE_DEADLINE, PROBE_FLAG};
pub use config::{default_cache_dir, default_guest_agent, default_kernel_dir, VmConfig};
use config::{find_in_path, is_static_elf};
pub use error::VmError;
pub use initramfs::{Cpio, PROBE_MARKER};

use super::{Driver, DriverError, RuntimeSpec, RuntimeState, RuntimeStats};
use process::VmPaths;

/// Static busybox put into the initramfs (package busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";
/// Default kernel directory (overridden by `NIMBUS_KERNEL_DIR`).
pub const DEFAULT_KERNEL_DIR: &str = "/var/lib/nimbus/kernel";
/// Largest accepted user-data script.
pub const MAX_USER_DATA: usize = 64 * 1024;
/// Memory QEMU may use beyond guest RAM (device model, TCG translation cache).
pub const QEMU_OVERHEAD_BYTES: u64 = 320 << 20;
/// How long QEMU may take to bring its QMP socket up.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(20);

/// The instance as persisted in `spec.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmSpec {
    id: String,
    name: String,
    image_digest: String,
    command: Vec<String>,
    env: Vec<String>,
    working_dir: String,
    cpus: f64,
    memory_bytes: u64,
    disk_bytes: u64,
    pids_limit: u64,
    network: NetworkAttachment,
    user_data: Option<String>,
    ssh_keys: Vec<String>,
    /// The command is the image's default (none was given): a service, not the main one.
    #[serde(default)]
    command_is_image_default: bool,
    /// Secrets are delivered at each boot (their values live only on the `secrets` tmpfs).
    #[serde(default)]
    has_secrets: bool,
}

/// The cached base initramfs for this configuration.
fn base_initramfs(config: &VmConfig) -> Result<PathBuf, VmError> {
    initramfs::base_initramfs(
        &config.state_dir.join("initramfs"),
        &initramfs::InitramfsInputs {
            kernel_dir: &config.kernel_dir,
            busybox: Path::new(BUSYBOX),
            guest_agent: &config.guest_agent,
        },
    )
}

/// Writes `initrd.img` = base initramfs + this VM's config archive.
fn write_initrd(config: &VmConfig, spec: &VmSpec, paths: &VmPaths) -> Result<(), VmError> {
    let base = base_initramfs(config)?;
    let mut bytes =
        std::fs::read(&base).map_err(|e| VmError::io(format!("reading {}", base.display()), e))?;
    // The guest agent runs `command` as the main service (its exit powers the VM off) and
    // `service` as a plain one (its exit is logged).
    let (command, service): (&[String], &[String]) = if spec.command_is_image_default {
        (&[], &spec.command)
    } else {
        (&spec.command, &[])
    };
    let config = json!({
        "hostname": spec.name,
        "command": command,
        "service": service,
        "env": spec.env,
        "working_dir": spec.working_dir,
        "user_data": spec.user_data,
        "ssh_keys": spec.ssh_keys,
        "secrets": spec.has_secrets,
    });
    bytes.extend_from_slice(&initramfs::config_archive(config.to_string().as_bytes()));
    let tmp = paths.initrd().with_extension("tmp");
    std::fs::write(&tmp, &bytes)
        .map_err(|e| VmError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, paths.initrd()).map_err(|e| VmError::io("renaming initrd", e))
}

/// Guest-side resource use reported by the guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestStats {
    /// Busy CPU time of all vCPUs, nanoseconds.
    pub cpu_nanos: u64,
    /// Memory in use (total - available), bytes.
    pub memory_bytes: u64,
    /// Guest RAM, bytes.
    pub memory_total: u64,
}

/// The QEMU/KVM driver. See the module docs.
pub struct VmDriver {
    config: VmConfig,
    accel: tokio::sync::OnceCell<ProbeResult>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    waiters: ready::Waiters,
}

impl VmDriver {
    /// A driver on `config.state_dir` (created if missing). Running VMs from an earlier driver
    /// are re-attached on use; only accelerator probes an earlier process left running on this
    /// state directory are killed (see `accel`).
    pub fn new(config: VmConfig) -> Result<Self, DriverError> {
        for d in ["vms", "images", "initramfs"] {
            let p = config.state_dir.join(d);
            std::fs::create_dir_all(&p)
                .map_err(DriverError::io(format!("creating {}", p.display())))?;
        }
        let initramfs = config.state_dir.join("initramfs");
        accel::kill_stale_probes(&initramfs);
        if let Ok(canonical) = initramfs.canonicalize() {
            if canonical != initramfs {
                accel::kill_stale_probes(&canonical);
            }
        }
        Ok(Self {
            config,
            accel: tokio::sync::OnceCell::new(),
            locks: Mutex::new(HashMap::new()),
            waiters: ready::Waiters::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    fn paths(&self, id: &str) -> VmPaths {
        VmPaths::new(self.config.state_dir.join("vms").join(id))
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(self.locks.lock().unwrap().entry(id.to_owned()).or_default())
    }

    /// Why VMs cannot run on this node, or `Ok(())`: QEMU, qemu-img, mkfs.ext4, the kernel and
    /// its modules, a static busybox and a static guest agent must be present.
    pub fn capability(&self) -> Result<(), String> {
        let c = &self.config;
        if !c.qemu.is_file() && find_in_path(&c.qemu.to_string_lossy()).is_none() {
            return Err(format!(
                "QEMU not found at {} (run scripts/setup-vm)",
                c.qemu.display()
            ));
        }
        for tool in ["qemu-img", "mkfs.ext4"] {
            if find_in_path(tool).is_none()
                && !Path::new("/usr/sbin").join(tool).exists()
                && !Path::new("/sbin").join(tool).exists()
            {
                return Err(format!("{tool} not found (run scripts/setup-vm)"));
            }
        }
        let vmlinuz = c.kernel_dir.join("vmlinuz");
        if !vmlinuz.is_file() {
            return Err(format!(
                "guest kernel {} not found (run scripts/setup-vm)",
                vmlinuz.display()
            ));
        }
        initramfs::kernel_version(&c.kernel_dir).map_err(|e| e.to_string())?;
        for (what, path) in [
            ("busybox", Path::new(BUSYBOX)),
            ("guest agent", c.guest_agent.as_path()),
        ] {
            match is_static_elf(path) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(format!(
                        "{what} {} is not statically linked",
                        path.display()
                    ))
                }
                Err(e) => return Err(format!("{what}: {e}")),
            }
        }
        Ok(())
    }

    /// The accelerator if it is known without probing: configured (`kvm`, `tcg`), or the
    /// host-wide cached verdict of `auto`. `None` means [`VmDriver::accelerator`] will probe.
    pub fn known_accelerator(&self) -> Option<ProbeResult> {
        if let Some(r) = self.accel.get() {
            return Some(r.clone());
        }
        match self.config.accel {
            Accel::Auto => {
                let version = initramfs::kernel_version(&self.config.kernel_dir).ok()?;
                let key = accel::probe_key(&self.config.qemu, &version);
                accel::cached(&self.config.cache_dir, &key)
            }
            forced => Some(Self::configured(forced)),
        }
    }

    fn configured(accel: Accel) -> ProbeResult {
        ProbeResult {
            accel,
            reason: "configured".into(),
            key: String::new(),
        }
    }

    async fn probe(&self) -> Result<&ProbeResult, VmError> {
        self.accel
            .get_or_try_init(|| async {
                if self.config.accel != Accel::Auto {
                    return Ok(Self::configured(self.config.accel));
                }
                let version = initramfs::kernel_version(&self.config.kernel_dir)?;
                let qemu = self.config.qemu.clone();
                let key = tokio::task::spawn_blocking(move || accel::probe_key(&qemu, &version))
                    .await
                    .map_err(|e| VmError::Kernel(e.to_string()))?;
                if let Some(hit) = accel::cached(&self.config.cache_dir, &key) {
                    return Ok(hit);
                }
                let initrd = {
                    let cfg = self.config.clone();
                    tokio::task::spawn_blocking(move || base_initramfs(&cfg))
                        .await
                        .map_err(|e| VmError::Kernel(e.to_string()))??
                };
                accel::resolve(accel::ProbeInputs {
                    cache_dir: self.config.cache_dir.clone(),
                    key,
                    qemu: self.config.qemu.clone(),
                    kernel: self.config.kernel_dir.join("vmlinuz"),
                    initrd,
                })
                .await
            })
            .await
    }

    /// The accelerator VMs use on this node, `"kvm"` or `"tcg"` (probing once under
    /// [`Accel::Auto`]; the verdict is cached host-wide).
    pub async fn accelerator(&self) -> Result<&'static str, DriverError> {
        Ok(self.probe().await?.accel.as_str())
    }

    /// Why the accelerator was chosen.
    pub async fn accelerator_reason(&self) -> Result<String, DriverError> {
        Ok(self.probe().await?.reason.clone())
    }

    /// The VM's interactive serial console (a unix stream socket; `nimbus console` attaches
    /// to it). Everything the guest prints also goes to [`Driver::log_path`].
    pub fn console_socket(&self, id: &str) -> PathBuf {
        self.paths(id).console_sock()
    }

    /// The VM's QMP socket.
    pub fn qmp_socket(&self, id: &str) -> PathBuf {
        self.paths(id).qmp()
    }

    async fn qmp(&self, id: &str) -> Result<qmp::Qmp, DriverError> {
        let paths = self.paths(id);
        if !paths.spec().exists() {
            return Err(DriverError::NotFound(id.into()));
        }
        if process::running_pid(&paths).is_none() {
            return Err(DriverError::NotRunning(id.into()));
        }
        Ok(qmp::Qmp::connect(&paths.qmp()).await?)
    }

    /// Pauses the VM's vCPUs (QMP `stop`).
    pub async fn pause(&self, id: &str) -> Result<(), DriverError> {
        self.qmp(id).await?.execute("stop", None).await?;
        Ok(())
    }

    /// Resumes a paused VM (QMP `cont`).
    pub async fn resume(&self, id: &str) -> Result<(), DriverError> {
        self.qmp(id).await?.execute("cont", None).await?;
        Ok(())
    }

    /// Presses the ACPI power button (QMP `system_powerdown`); the guest agent powers off.
    pub async fn acpi_powerdown(&self, id: &str) -> Result<(), DriverError> {
        self.qmp(id)
            .await?
            .execute("system_powerdown", None)
            .await?;
        Ok(())
    }

    /// QEMU's run state (`running`, `paused`, ...; QMP `query-status`).
    pub async fn run_state(&self, id: &str) -> Result<String, DriverError> {
        Ok(self.qmp(id).await?.status().await?)
    }

    /// Host thread ids of the vCPUs (QMP `query-cpus-fast`).
    pub async fn vcpu_threads(&self, id: &str) -> Result<Vec<u32>, DriverError> {
        Ok(self.qmp(id).await?.vcpu_threads().await?)
    }

    /// Waits until the guest agent answers and has the VM's secrets.
    pub async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<(), DriverError> {
        let paths = self.paths(id);
        let Some(pid) = process::running_pid(&paths) else {
            return Err(DriverError::NotRunning(id.into()));
        };
        let deadline = Instant::now() + timeout;
        guest::wait_ready(&paths.guest_agent(), timeout).await?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        ready::confirm(&paths, pid, left).await?;
        Ok(())
    }

    /// Guest CPU and memory use as the guest sees it (from the guest agent).
    pub async fn guest_stats(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<GuestStats, DriverError> {
        let paths = self.paths(id);
        if process::running_pid(&paths).is_none() {
            return Err(DriverError::NotRunning(id.into()));
        }
        let v = guest::request(&paths.guest_agent(), json!({"op": "stats"}), timeout).await?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Ok(GuestStats {
            cpu_nanos: n("cpu_nanos"),
            memory_bytes: n("memory_bytes"),
            memory_total: n("memory_total"),
        })
    }

    fn load_spec(&self, id: &str) -> Result<VmSpec, DriverError> {
        let path = self.paths(id).spec();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DriverError::NotFound(id.into()))
            }
            Err(e) => return Err(DriverError::io(format!("reading {}", path.display()))(e)),
        };
        serde_json::from_str(&text).map_err(|e| DriverError::Io {
            context: format!("parsing {}", path.display()),
            source: std::io::Error::other(e),
        })
    }

    fn tap_name(id: &str) -> String {
        net::tap_name(id)
    }

    fn qemu_args(&self, spec: &VmSpec, paths: &VmPaths, accel: Accel) -> Vec<String> {
        let p = |p: PathBuf| p.to_string_lossy().into_owned();
        let vcpus = (spec.cpus.ceil() as u64).max(1);
        let mem_mb = (spec.memory_bytes >> 20).max(128);
        let mut append = String::from("console=ttyS0 panic=-1 loglevel=4 mitigations=off");
        let net = &spec.network;
        if !net.ip.is_empty() {
            let _ = write!(append, " nimbus.ip={}/{}", net.ip, net.prefix_len);
            if !net.gateway.is_empty() {
                let _ = write!(append, " nimbus.gw={}", net.gateway);
            }
            if net.mtu > 0 {
                let _ = write!(append, " nimbus.mtu={}", net.mtu);
            }
        }
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("nimbus-{},debug-threads=on", spec.id),
            "-M".into(),
            "q35".into(),
        ];
        a.extend(accel.qemu_args());
        a.extend(
            [
                "-smp",
                &vcpus.to_string(),
                "-m",
                &format!("{mem_mb}M"),
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
                "-kernel",
                &p(self.config.kernel_dir.join("vmlinuz")),
                "-initrd",
                &p(paths.initrd()),
                "-append",
                &append,
                "-drive",
                &format!(
                    "file={},if=none,id=d0,format=qcow2,discard=unmap",
                    p(paths.disk())
                ),
                "-device",
                "virtio-blk-pci,drive=d0",
                "-chardev",
                &format!(
                    "socket,id=con,path={},server=on,wait=off,logfile={},logappend=on",
                    p(paths.console_sock()),
                    p(paths.console_log())
                ),
                "-serial",
                "chardev:con",
                "-device",
                "virtio-serial-pci,id=vs0",
                "-chardev",
                &format!(
                    "socket,id=ga,path={},server=on,wait=off",
                    p(paths.guest_agent())
                ),
                "-device",
                "virtserialport,bus=vs0.0,chardev=ga,name=org.nimbus.agent.0",
                "-chardev",
                &format!("file,id=st,path={}", p(paths.status())),
                "-device",
                "virtserialport,bus=vs0.0,chardev=st,name=org.nimbus.status.0",
                "-qmp",
                &format!("unix:{},server=on,wait=off", p(paths.qmp())),
            ]
            .map(str::to_owned),
        );
        if net.bridge.is_empty() {
            a.extend(["-nic".to_owned(), "none".to_owned()]);
        } else {
            a.push("-netdev".into());
            a.push(format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                Self::tap_name(&spec.id)
            ));
            a.push("-device".into());
            let mut dev = String::from("virtio-net-pci,netdev=n0");
            if !net.mac.is_empty() {
                let _ = write!(dev, ",mac={}", net.mac);
            }
            a.push(dev);
        }
        a
    }

    async fn start_locked(&self, id: &str) -> Result<u32, DriverError> {
        let paths = self.paths(id);
        let spec = self.load_spec(id)?;
        if let Some(pid) = process::running_pid(&paths) {
            return Ok(pid);
        }
        if spec.has_secrets && !secrets::present(&paths) {
            return Err(DriverError::Unavailable(format!(
                "the secrets of VM {id} are not on this node (it is created again)"
            )));
        }
        self.capability().map_err(DriverError::Unavailable)?;
        let accel = self.probe().await?.accel;
        {
            let (spec, paths, config) = (spec.clone(), paths.clone(), self.config.clone());
            tokio::task::spawn_blocking(move || write_initrd(&config, &spec, &paths))
                .await
                .map_err(|e| DriverError::Runtime {
                    tool: "vm",
                    message: e.to_string(),
                })??;
        }
        let net = &spec.network;
        if !net.bridge.is_empty() {
            net::ensure_bridge(&net.bridge, &net.gateway, net.prefix_len).await?;
        }
        let limits = cgroup::Limits {
            // The vCPUs plus half a CPU for QEMU's own threads (main loop, I/O).
            cpus: spec.cpus.max(0.1) + 0.5,
            memory_bytes: ((spec.memory_bytes >> 20).max(128) << 20) + QEMU_OVERHEAD_BYTES,
            pids: spec.pids_limit.max(256),
        };
        let procs = cgroup::setup(&self.config.cgroup_parent, id, limits)?;
        for f in [paths.status(), paths.exit_code()] {
            let _ = std::fs::remove_file(f);
        }
        ready::clear(&paths);
        let args = self.qemu_args(&spec, &paths, accel);
        let started = Instant::now();
        let pid = process::launch(&self.config.qemu, &args, &procs, &paths, LAUNCH_TIMEOUT).await?;
        if !net.bridge.is_empty() {
            if let Err(e) = net::attach_tap(&Self::tap_name(id), net).await {
                process::kill_hard(pid);
                return Err(e.into());
            }
        }
        tracing::info!(id, pid, accel = accel.as_str(), elapsed = ?started.elapsed(), "VM started");
        self.waiters.watch(id, &paths, pid);
        Ok(pid)
    }

    async fn stop_locked(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        let paths = self.paths(id);
        if !paths.spec().exists() {
            return Err(DriverError::NotFound(id.into()));
        }
        let Some(pid) = process::running_pid(&paths) else {
            return Ok(());
        };
        let deadline = Instant::now() + grace;
        let left = || deadline.saturating_duration_since(Instant::now());
        // 1. Ask the guest agent (sync, unmount, power off).
        let asked = guest::request(
            &paths.guest_agent(),
            json!({"op": "shutdown"}),
            left().min(Duration::from_secs(2)),
        )
        .await;
        let mut graceful = asked.is_ok() && process::wait_exit(pid, &paths, left() / 2).await;
        // 2. ACPI power button.
        if !graceful {
            if let Ok(mut q) = qmp::Qmp::connect(&paths.qmp()).await {
                let _ = q.execute("system_powerdown", None).await;
            }
            graceful = process::wait_exit(pid, &paths, left()).await;
        }
        if !graceful {
            tracing::warn!(
                id,
                pid,
                ?grace,
                "VM did not power off in time; stopping QEMU"
            );
            // 3. quit, 4. SIGKILL.
            if let Ok(mut q) = qmp::Qmp::connect(&paths.qmp()).await {
                let _ = q.execute("quit", None).await;
            }
            if !process::wait_exit(pid, &paths, Duration::from_secs(3)).await {
                process::kill_hard(pid);
                process::wait_exit(pid, &paths, Duration::from_secs(5)).await;
            }
        }
        // A stop we asked for: its outcome is the exit code, not what the main service said
        // while being terminated.
        let _ = std::fs::remove_file(paths.status());
        let _ = std::fs::write(paths.exit_code(), if graceful { "0" } else { "137" });
        Ok(())
    }

    fn exit_code(paths: &VmPaths) -> Option<i32> {
        let status = std::fs::read_to_string(paths.status()).unwrap_or_default();
        let from_guest = status
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("event").and_then(Value::as_str) == Some("exit"))
            .filter_map(|v| v.get("code").and_then(Value::as_i64))
            .next_back();
        from_guest.map(|c| c as i32).or_else(|| {
            std::fs::read_to_string(paths.exit_code())
                .ok()
                .and_then(|s| s.trim().parse().ok())
        })
    }
}

#[async_trait]
impl Driver for VmDriver {
    fn instance_type(&self) -> InstanceType {
        InstanceType::Vm
    }

    fn host_interface(&self, id: &str) -> Option<String> {
        Some(Self::tap_name(id))
    }

    async fn create(&self, spec: &RuntimeSpec) -> Result<(), DriverError> {
        let lock = self.lock(&spec.id);
        let _guard = lock.lock().await;
        let paths = self.paths(&spec.id);
        if paths.spec().exists() {
            // After a host reboot the secrets tmpfs is gone: put the fresh values back.
            if !spec.secrets.is_empty() && !secrets::present(&paths) {
                secrets::store(&paths, &spec.secrets)?;
            }
            return Ok(());
        }
        if spec
            .user_data
            .as_ref()
            .is_some_and(|u| u.len() > MAX_USER_DATA)
        {
            return Err(VmError::Invalid(format!(
                "user-data is larger than {MAX_USER_DATA} bytes"
            ))
            .into());
        }
        self.capability().map_err(DriverError::Unavailable)?;
        std::fs::create_dir_all(&paths.dir)
            .map_err(DriverError::io(format!("creating {}", paths.dir.display())))?;
        let images = self.config.state_dir.join("images");
        let digest = if spec.image.digest.is_empty() {
            format!("name-{}", spec.image.name)
        } else {
            spec.image.digest.clone()
        };
        let (layers, disk, size) = (spec.layer_dirs.clone(), paths.disk(), spec.disk_bytes);
        let d2 = digest.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<(), VmError> {
            let base = disk::base_disk(&images, &d2, &layers)?;
            let _ = std::fs::remove_file(&disk);
            disk::create_overlay(&base, &disk, size)
        })
        .await
        .map_err(|e| DriverError::Runtime {
            tool: "vm",
            message: e.to_string(),
        })?;
        let result = result.map_err(DriverError::from).and_then(|()| {
            if spec.secrets.is_empty() {
                Ok(())
            } else {
                secrets::store(&paths, &spec.secrets)
            }
        });
        if let Err(e) = result {
            if secrets::unmount(&paths).is_ok() {
                let _ = std::fs::remove_dir_all(&paths.dir);
            }
            return Err(e);
        }
        let vm = VmSpec {
            id: spec.id.clone(),
            name: spec.name.clone(),
            image_digest: digest,
            command: spec.command.clone(),
            env: spec.env.clone(),
            working_dir: spec.working_dir.clone(),
            cpus: spec.cpus,
            memory_bytes: spec.memory_bytes,
            disk_bytes: spec.disk_bytes,
            pids_limit: spec.pids_limit,
            network: spec.network.clone(),
            user_data: spec.user_data.clone(),
            ssh_keys: spec.ssh_keys.clone(),
            command_is_image_default: spec.command == spec.image.default_command,
            has_secrets: !spec.secrets.is_empty(),
        };
        let text = serde_json::to_string_pretty(&vm).unwrap_or_default();
        let tmp = paths.spec().with_extension("tmp");
        std::fs::write(&tmp, text)
            .map_err(DriverError::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, paths.spec()).map_err(DriverError::io("renaming spec.json"))?;
        tracing::info!(id = %spec.id, "VM created");
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<u32, DriverError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        self.start_locked(id).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        self.stop_locked(id, grace).await
    }

    async fn state(&self, id: &str) -> Result<RuntimeState, DriverError> {
        let paths = self.paths(id);
        if !paths.spec().exists() {
            return Ok(RuntimeState::Absent);
        }
        if let Some(pid) = process::running_pid(&paths) {
            if ready::is_ready(&paths, pid) {
                return Ok(RuntimeState::Running { pid });
            }
            // Booting (or re-attached before the answer was recorded): wait for the answer.
            self.waiters.watch(id, &paths, pid);
            return Ok(RuntimeState::Starting { pid });
        }
        if self.load_spec(id).is_ok_and(|s| s.has_secrets) && !secrets::present(&paths) {
            // The secrets tmpfs is gone (host reboot): create it again to fetch them.
            return Ok(RuntimeState::Absent);
        }
        if !paths.pidfile().exists() {
            return Ok(RuntimeState::Created);
        }
        Ok(RuntimeState::Exited {
            code: Self::exit_code(&paths),
        })
    }

    async fn exec(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecResponse, DriverError> {
        let paths = self.paths(id);
        if !paths.spec().exists() {
            return Err(DriverError::NotFound(id.into()));
        }
        let Some(pid) = process::running_pid(&paths) else {
            return Err(DriverError::NotRunning(id.into()));
        };
        let deadline = Instant::now() + timeout;
        ready::confirm(&paths, pid, timeout).await?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let req = json!({"op": "exec", "argv": command, "timeout_ms": left.as_millis() as u64});
        match guest::request(&paths.guest_agent(), req, left + Duration::from_secs(5)).await {
            Ok(v) => Ok(ExecResponse {
                exit_code: v.get("exit_code").and_then(Value::as_i64).unwrap_or(-1) as i32,
                stdout: v
                    .get("stdout")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                stderr: v
                    .get("stderr")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                truncated: v.get("truncated").and_then(Value::as_bool).unwrap_or(false),
            }),
            Err(VmError::Guest(m)) if m.starts_with("timeout") => {
                Err(DriverError::Timeout(timeout))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.paths(id).console_log()
    }

    fn console_socket(&self, id: &str) -> Option<PathBuf> {
        Some(self.paths(id).console_sock())
    }

    async fn stats(&self, id: &str) -> Result<RuntimeStats, DriverError> {
        let paths = self.paths(id);
        if !paths.spec().exists() {
            return Err(DriverError::NotFound(id.into()));
        }
        let Some(pid) = process::running_pid(&paths) else {
            return Ok(RuntimeStats::default());
        };
        let (cpu_nanos, memory_bytes) = process::usage(pid);
        Ok(RuntimeStats {
            cpu_nanos,
            memory_bytes,
        })
    }

    async fn delete(&self, id: &str) -> Result<(), DriverError> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let paths = self.paths(id);
        if let Some(pid) = process::running_pid(&paths) {
            if let Ok(mut q) = qmp::Qmp::connect(&paths.qmp()).await {
                let _ = q.execute("quit", None).await;
            }
            if !process::wait_exit(pid, &paths, Duration::from_secs(3)).await {
                process::kill_hard(pid);
                process::wait_exit(pid, &paths, Duration::from_secs(5)).await;
            }
        }
        net::delete_link(&Self::tap_name(id)).await?;
        let (parent, cg_id) = (self.config.cgroup_parent.clone(), id.to_owned());
        let _ = tokio::task::spawn_blocking(move || cgroup::remove(&parent, &cg_id)).await;
        secrets::unmount(&paths)?;
        if paths.dir.exists() {
            if paths.sock_dir() != paths.dir {
                let _ = std::fs::remove_dir_all(paths.sock_dir());
            }
            std::fs::remove_dir_all(&paths.dir)
                .map_err(DriverError::io(format!("removing {}", paths.dir.display())))?;
        }
        self.locks.lock().unwrap().remove(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>, DriverError> {
        let dir = self.config.state_dir.join("vms");
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map_err(DriverError::io(format!("reading {}", dir.display())))?
            .flatten()
            .filter(|e| e.path().join("spec.json").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        Ok(ids)
    }
}
