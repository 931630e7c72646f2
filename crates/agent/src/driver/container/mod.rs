//! The container driver: runc with an OCI bundle on overlayfs, one shim process per container.
//!
//! Each container lives in `state_dir/<id>/` (the bundle): `config.json`, the overlay
//! (`rootfs/` mounted from the image layers + `upper/` + `work/`), `console.log`, the files
//! the shim writes (`shim.pid`, `created`, `start.err`, `exit.json`), `net.ok` and `started`.
//! Its network namespace is `/run/netns/nimbus-<shortid>` (see `nimbus_net`), its cgroup
//! `/<cgroup_parent>/<id>`. Every method rebuilds what it needs from disk and `runc state`, so
//! a new driver on the same `state_dir` re-attaches to running containers (their shims keep
//! running).
//!
//! A launch is split like OCI's: `create` does everything up to running the process (rootfs,
//! the network namespace wired while `runc create` runs through the shim: namespaces, cgroup,
//! mounts, seccomp), so it overlaps with the node's datapath programming the container's
//! network; `start` is then a `runc start` (a few milliseconds) plus a gratuitous ARP for the
//! address.

mod cgroup;
mod rootfs;
mod runc;
mod secrets;
pub mod shim;
mod spec;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nimbus_api::agent::NetworkAttachment;
use nimbus_api::{ExecResponse, InstanceType};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;
use tracing::{debug, info, warn};

use self::rootfs::Bundle;
use self::runc::{Runc, RuncState};
pub use self::runc::{DEFAULT_RUNC_ROOT, EXEC_OUTPUT_LIMIT};
use self::shim::{ExitRecord, ShimArgs};
use super::{Driver, DriverError, RuntimeSpec, RuntimeState, RuntimeStats};

/// How long `create` waits for runc to create the container.
const START_TIMEOUT: Duration = Duration::from_mins(1);
/// How long to wait for a container to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(15);
/// Poll interval while waiting on the shim / runc.
const POLL: Duration = Duration::from_millis(25);
/// Poll period while waiting for a container to be created (a cheap file read).
const START_POLL: Duration = Duration::from_millis(3);
/// Longest wait on the shim's notification pipe before the start files are checked again.
const NOTIFY_WAIT: Duration = Duration::from_millis(100);

/// Configuration of the container driver.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// Where bundles live: `state_dir/<id>/`.
    pub state_dir: PathBuf,
    /// The runc binary.
    pub runc: PathBuf,
    /// Argv prefix that starts the shim, e.g. `[current_exe, "shim"]`.
    pub shim: Vec<String>,
    /// Parent cgroup of all containers (`/<cgroup_parent>/<id>`), e.g. `nimbus`.
    pub cgroup_parent: String,
    /// runc's state root (default [`DEFAULT_RUNC_ROOT`]).
    pub runc_root: PathBuf,
    /// Keeps the machine-wide names of this driver's containers (network namespace name,
    /// veth names) apart from another driver's on the same machine: `None` (one agent per
    /// machine) names them after the instance id; `Some(scope)` after a hash of scope and id.
    /// See [`ContainerConfig::scoped`].
    pub net_scope: Option<String>,
}

impl ContainerConfig {
    /// Defaults for the running agent: `runc` resolved from `PATH`, the shim as
    /// `[current_exe, "shim"]`, cgroup parent `nimbus`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Result<Self, DriverError> {
        let runc = find_in_path("runc")
            .ok_or_else(|| DriverError::Unavailable("runc not found in PATH".into()))?;
        let exe = std::env::current_exe().map_err(DriverError::io("locating the agent binary"))?;
        Ok(Self {
            state_dir: state_dir.into(),
            runc,
            shim: vec![exe.display().to_string(), "shim".into()],
            cgroup_parent: "nimbus".into(),
            runc_root: PathBuf::from(DEFAULT_RUNC_ROOT),
            net_scope: None,
        })
    }

    /// This configuration for one of several agents on the same machine (tests, hollow
    /// clusters): containers get the cgroup parent `nimbus-<scope>`, the runc root
    /// `/run/nimbus/<scope>/runc` and scoped network namespace names, so two agents holding
    /// the same instance id (an instance that moved between them) never touch each other's
    /// container. `scope` must be a short name (letters, digits, `-`).
    #[must_use]
    pub fn scoped(mut self, scope: &str) -> Self {
        self.cgroup_parent = format!("nimbus-{scope}");
        self.runc_root = PathBuf::from("/run/nimbus").join(scope).join("runc");
        self.net_scope = Some(scope.to_owned());
        self
    }

    /// The key naming instance `id`'s machine-wide network objects (see `net_scope`).
    pub fn net_key(&self, id: &str) -> String {
        nimbus_net::scoped_key(self.net_scope.as_deref(), id)
    }
}

/// Looks `name` up in `PATH` (plus `/usr/sbin` and `/sbin`, where runc often lives).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What the driver keeps about a container besides `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    name: String,
    layer_dirs: Vec<PathBuf>,
    network: NetworkAttachment,
}

/// Sequence number of exec scratch files.
static EXEC_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The runc container driver.
#[derive(Debug)]
pub struct ContainerDriver {
    cfg: ContainerConfig,
    runc: Runc,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[allow(clippy::needless_pass_by_value)] // used as `map_err(net_err)`
fn net_err(e: nimbus_net::NetError) -> DriverError {
    use std::fmt::Write as _;
    let mut message = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let _ = write!(message, ": {s}");
        src = s.source();
    }
    DriverError::Runtime {
        tool: "netlink",
        message,
    }
}

fn valid_id(id: &str) -> Result<(), DriverError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(DriverError::NotFound(format!(
            "invalid container id {id:?}"
        )))
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn process_alive(pid: u32) -> bool {
    // A zombie (state Z) is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

impl ContainerDriver {
    /// A driver over `cfg.state_dir` (created if missing). Containers already there are
    /// re-attached lazily: every call reads their state from disk and runc.
    pub fn new(cfg: ContainerConfig) -> Result<Self, DriverError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(DriverError::io(format!(
            "creating {}",
            cfg.state_dir.display()
        )))?;
        if cfg.shim.is_empty() {
            return Err(DriverError::Unavailable("empty shim command".into()));
        }
        let runc = Runc {
            bin: cfg.runc.clone(),
            root: cfg.runc_root.clone(),
        };
        Ok(Self {
            cfg,
            runc,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ContainerConfig {
        &self.cfg
    }

    fn bundle(&self, id: &str) -> Bundle {
        Bundle::new(&self.cfg.state_dir, id)
    }

    async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.locks.lock().expect("lock map poisoned");
            locks.entry(id.to_string()).or_default().clone()
        };
        m.lock_owned().await
    }

    fn read_meta(&self, id: &str) -> Result<Meta, DriverError> {
        let path = self.bundle(id).meta();
        let data = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DriverError::NotFound(id.to_string())
            } else {
                DriverError::Io {
                    context: format!("reading {}", path.display()),
                    source: e,
                }
            }
        })?;
        serde_json::from_slice(&data).map_err(|e| DriverError::Io {
            context: format!("parsing {}", path.display()),
            source: e.into(),
        })
    }

    fn exit_record(&self, id: &str) -> Option<ExitRecord> {
        let data = std::fs::read(self.bundle(id).exit_json()).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Exit code of the last run, waiting briefly for the shim to record it.
    async fn exit_code(&self, id: &str) -> Option<i32> {
        let bundle = self.bundle(id);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(r) = self.exit_record(id) {
                return r.code;
            }
            let shim_alive = read_pid(&bundle.shim_pid()).is_some_and(process_alive);
            if !shim_alive || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn state_inner(&self, id: &str) -> Result<RuntimeState, DriverError> {
        let bundle = self.bundle(id);
        if !bundle.dir.is_dir() {
            return Ok(RuntimeState::Absent);
        }
        // Fast path without spawning runc: the shim recorded the init PID and no exit yet, and
        // that PID is alive inside this container's cgroup (so a reused PID cannot fool it).
        if !bundle.exit_json().exists() {
            if let Some(pid) = read_pid(&bundle.started()) {
                if init_alive_in_cgroup(pid, &self.cfg.cgroup_parent, id) {
                    return Ok(RuntimeState::Running { pid });
                }
            } else if let Some(pid) = read_pid(&bundle.created()) {
                // Created and not started yet: its init still waits in `runc init`.
                if init_alive_in_cgroup(pid, &self.cfg.cgroup_parent, id) {
                    return Ok(if waiting_to_start(pid) {
                        RuntimeState::Created
                    } else {
                        RuntimeState::Running { pid }
                    });
                }
            }
        }
        match self.runc.state(id).await? {
            Some(RuncState { status, pid }) if status == "running" || status == "paused" => {
                Ok(RuntimeState::Running { pid: pid as u32 })
            }
            Some(RuncState { status, .. }) if status == "created" => Ok(RuntimeState::Created),
            Some(_) => Ok(RuntimeState::Exited {
                code: self.exit_code(id).await,
            }),
            None if !self.bundle_complete(id) => {
                // Interrupted create, or files emptied by a power loss: create it again.
                Ok(RuntimeState::Absent)
            }
            None => {
                if bundle.exit_json().exists() || bundle.started().exists() {
                    Ok(RuntimeState::Exited {
                        code: self.exit_code(id).await,
                    })
                } else {
                    Ok(RuntimeState::Created)
                }
            }
        }
    }

    /// Whether the bundle's metadata and OCI config are present and parse (they are written
    /// without fsync; see [`rootfs::write_replace`]).
    fn bundle_complete(&self, id: &str) -> bool {
        let config = std::fs::read(self.bundle(id).config()).ok();
        self.read_meta(id).is_ok()
            && config.is_some_and(|c| serde_json::from_slice::<serde_json::Value>(&c).is_ok())
    }

    /// Makes sure the overlay is mounted and the network namespace is wired (after a reboot or
    /// a partial cleanup). Idempotent.
    async fn ensure_resources(&self, id: &str, meta: &Meta) -> Result<PathBuf, DriverError> {
        let bundle = self.bundle(id);
        rootfs::mount_overlay(&bundle, &meta.layer_dirs)?;
        self.wire_network(id, meta).await
    }

    /// Wires the container's network namespace (veth on its bridge, address, routes) and
    /// records that it did (`net.ok`, checked before a start).
    async fn wire_network(&self, id: &str, meta: &Meta) -> Result<PathBuf, DriverError> {
        let nl = nimbus_net::Netlink::connect().await.map_err(net_err)?;
        let path = nimbus_net::create_container_netns(&nl, &self.cfg.net_key(id), &meta.network)
            .await
            .map_err(net_err)?;
        rootfs::write_replace(&self.bundle(id).net_ok(), b"", false)?;
        Ok(path)
    }

    async fn create_inner(&self, spec: &RuntimeSpec) -> Result<(), DriverError> {
        let bundle = self.bundle(&spec.id);
        std::fs::create_dir_all(&bundle.dir).map_err(DriverError::io(format!(
            "creating {}",
            bundle.dir.display()
        )))?;
        let meta = Meta {
            name: spec.name.clone(),
            layer_dirs: spec.layer_dirs.clone(),
            network: spec.network.clone(),
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| DriverError::Io {
            context: "serializing container metadata".into(),
            source: e.into(),
        })?;
        rootfs::write_replace(&bundle.meta(), &json, false)?;
        rootfs::write_etc_files(&bundle, &spec.name, &spec.network.ip)?;
        let t = Instant::now();
        rootfs::mount_overlay(&bundle, &meta.layer_dirs)?;
        let _ = std::fs::remove_file(bundle.net_ok());
        let netns = nimbus_net::ensure_container_netns(&self.cfg.net_key(&spec.id))
            .await
            .map_err(net_err)?;
        let paths = spec::BundlePaths {
            rootfs: bundle.rootfs(),
            netns,
            hosts: bundle.hosts(),
            hostname: bundle.hostname(),
            resolv_conf: bundle.resolv_conf(),
        };
        let mut oci = spec::build(spec, &paths, &self.cfg.cgroup_parent)?;
        let on_tmpfs = secrets::prepare(&bundle, &spec.secrets, &mut oci)?;
        // config.json last: its presence marks a complete bundle (`net.ok` a wired network).
        secrets::save_config(&bundle, &oci, on_tmpfs)?;
        // Everything up to running the process happens here, while the node's datapath is
        // programmed: `start` is then a `runc start`. runc joins the namespace while it is
        // being wired: the process runs only after both.
        let (wired, created) = tokio::join!(
            self.wire_network(&spec.id, &meta),
            self.create_in_runc(&spec.id)
        );
        debug!(container = %spec.id, elapsed_ms = t.elapsed().as_secs_f64() * 1e3, "network wired and container created");
        wired.and(created).map(|_| ())
    }

    /// Starts the detached shim stage (`nimbus shim run ...`) directly: one exec. The shim
    /// makes itself a session leader and child subreaper; a task of ours reaps it when it exits
    /// while we live, and init (or our subreaper) does if we die first.
    fn spawn_shim(
        &self,
        id: &str,
    ) -> Result<
        (
            tokio::sync::oneshot::Receiver<std::process::ExitStatus>,
            Option<tokio::process::ChildStdout>,
        ),
        DriverError,
    > {
        let bundle = self.bundle(id);
        let args = ShimArgs {
            runc: self.cfg.runc.clone(),
            root: self.runc.root.clone(),
            bundle: bundle.dir.clone(),
            id: id.to_string(),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(bundle.shim_log())
            .map_err(DriverError::io(format!(
                "opening {}",
                bundle.shim_log().display()
            )))?;
        let mut child = tokio::process::Command::new(&self.cfg.shim[0])
            .args(&self.cfg.shim[1..])
            .arg("run")
            .args(args.to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .current_dir("/")
            .spawn()
            .map_err(|e| {
                DriverError::Unavailable(format!("cannot start the shim {:?}: {e}", self.cfg.shim))
            })?;
        let stdout = child.stdout.take();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                let _ = tx.send(status);
            }
        });
        Ok((rx, stdout))
    }

    async fn start_inner(&self, id: &str) -> Result<u32, DriverError> {
        let bundle = self.bundle(id);
        if !bundle.config().exists() {
            return Err(DriverError::NotFound(id.to_string()));
        }
        // The launch path: `create` left the container created, its init waiting and its shim
        // alive (the shim records the init's exit before it ends), with no runc call to ask.
        if let Some(pid) = read_pid(&bundle.created()) {
            if !bundle.started().exists()
                && !bundle.exit_json().exists()
                && waiting_to_start(pid)
                && self.shim_alive(id)
            {
                return self.run_created(id, pid).await;
            }
        }
        match self.state_inner(id).await? {
            RuntimeState::Running { pid } | RuntimeState::Starting { pid } => return Ok(pid),
            RuntimeState::Absent => return Err(DriverError::NotFound(id.to_string())),
            RuntimeState::Created | RuntimeState::Exited { .. } => {}
        }
        // Created before a reboot, or exited: create it in runc again, then start it.
        let meta = self.read_meta(id)?;
        self.runc.delete_force(id).await?;
        self.wait_shim_gone(id, Duration::from_secs(5)).await;
        self.ensure_resources(id, &meta).await?;
        let pid = self.create_in_runc(id).await?;
        self.run_created(id, pid).await
    }

    /// Whether the shim of `id` is alive.
    fn shim_alive(&self, id: &str) -> bool {
        read_pid(&self.bundle(id).shim_pid()).is_some_and(|pid| {
            process_alive(pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(id))
        })
    }

    /// Starts the process of a created container whose init is `pid` (`runc start`), and
    /// announces its address meanwhile.
    async fn run_created(&self, id: &str, pid: u32) -> Result<u32, DriverError> {
        let meta = self.read_meta(id)?;
        if !self.bundle(id).net_ok().exists() {
            // The create was interrupted while the network was being wired.
            self.wire_network(id, &meta).await?;
        }
        // Announced meanwhile (a thread in the namespace: no need to wait for it).
        tokio::spawn(announce(self.cfg.net_key(id), meta.network));
        self.runc.start(id).await?;
        rootfs::write_replace(
            &self.bundle(id).started(),
            pid.to_string().as_bytes(),
            false,
        )?;
        info!(container = id, pid, "container started");
        Ok(pid)
    }

    /// Creates the container in runc through a new shim (`runc create`: namespaces, cgroup,
    /// mounts; its init then waits to be started). Returns the init PID.
    async fn create_in_runc(&self, id: &str) -> Result<u32, DriverError> {
        let bundle = self.bundle(id);
        for f in [
            bundle.exit_json(),
            bundle.init_pid(),
            bundle.created(),
            bundle.started(),
            bundle.start_error(),
            bundle.shim_pid(),
        ] {
            let _ = std::fs::remove_file(f);
        }
        // The shim writes a line on its stdout (our pipe) once `created` or `start.err` is on
        // disk: wait on the pipe instead of polling; poll the files after EOF.
        let (mut shim_exit, mut notify) = self.spawn_shim(id)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(pid) = read_pid(&bundle.created()) {
                debug!(container = id, pid, "container created");
                return Ok(pid);
            }
            if let Ok(msg) = std::fs::read_to_string(bundle.start_error()) {
                return Err(DriverError::Runtime {
                    tool: "runc",
                    message: msg.trim().to_string(),
                });
            }
            let shim_dead = shim_exit.try_recv().is_ok()
                || read_pid(&bundle.shim_pid()).is_some_and(|pid| !process_alive(pid));
            if shim_dead && !bundle.created().exists() && !bundle.start_error().exists() {
                let log = std::fs::read_to_string(bundle.shim_log()).unwrap_or_default();
                return Err(DriverError::Runtime {
                    tool: "nimbus-shim",
                    message: format!("shim exited without creating the container: {}", log.trim()),
                });
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout(START_TIMEOUT));
            }
            if let Some(out) = notify.as_mut() {
                let mut buf = [0u8; 64];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(NOTIFY_WAIT, out.read(&mut buf)).await
                {
                    notify = None;
                }
            } else {
                tokio::time::sleep(START_POLL).await;
            }
        }
    }

    /// Waits until the shim of `id` has exited (it writes `exit.json` first); SIGKILLs it
    /// after `timeout`.
    async fn wait_shim_gone(&self, id: &str, timeout: Duration) {
        let Some(pid) = read_pid(&self.bundle(id).shim_pid()) else {
            return;
        };
        let is_shim = || {
            process_alive(pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(id))
        };
        let deadline = Instant::now() + timeout;
        while is_shim() {
            if Instant::now() >= deadline {
                warn!(container = id, pid, "shim did not exit, killing it");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls until the container is no longer running or `timeout` passes; true if it stopped.
    async fn wait_not_running(&self, id: &str, timeout: Duration) -> Result<bool, DriverError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !matches!(
                self.runc.state(id).await?,
                Some(RuncState { ref status, .. }) if status == "running" || status == "paused" || status == "created"
            ) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(POLL * 2).await;
        }
    }

    async fn stop_inner(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        match self.state_inner(id).await? {
            RuntimeState::Running { .. } => {}
            RuntimeState::Created if self.runc.knows(id) => {}
            _ => return Ok(()),
        }
        info!(container = id, ?grace, "stopping container");
        self.runc.kill(id, "TERM").await?;
        if !self.wait_not_running(id, grace).await? {
            warn!(container = id, "grace period over, killing");
            self.runc.kill(id, "KILL").await?;
            if !self.wait_not_running(id, KILL_TIMEOUT).await? {
                return Err(DriverError::Timeout(KILL_TIMEOUT));
            }
        }
        // Let the shim record the exit status before anyone reads the state.
        self.wait_shim_gone(id, Duration::from_secs(5)).await;
        Ok(())
    }

    async fn exec_inner(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecResponse, DriverError> {
        if !matches!(self.state_inner(id).await?, RuntimeState::Running { .. }) {
            return Err(DriverError::NotRunning(id.to_string()));
        }
        let bundle = self.bundle(id);
        let oci = oci_spec::runtime::Spec::load(bundle.config()).map_err(|e| DriverError::Io {
            context: format!("reading {}", bundle.config().display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut process = oci.process().clone().unwrap_or_default();
        process.set_args(Some(command.to_vec()));
        process.set_terminal(Some(false));
        let seq = EXEC_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scratch =
            secrets::scratch_dir(&bundle).join(format!("exec-{}-{seq}", std::process::id()));
        let process_json = scratch.with_extension("json");
        let data = serde_json::to_vec(&process).map_err(|e| DriverError::Io {
            context: "serializing the exec process".into(),
            source: e.into(),
        })?;
        rootfs::write_atomic(&process_json, &data)?;
        let result = self.runc.exec(id, &process_json, &scratch, timeout).await;
        let _ = std::fs::remove_file(&process_json);
        if result.is_err()
            && !matches!(self.state_inner(id).await, Ok(RuntimeState::Running { .. }))
        {
            return Err(DriverError::NotRunning(id.to_string()));
        }
        result
    }

    async fn delete_inner(&self, id: &str) -> Result<(), DriverError> {
        let bundle = self.bundle(id);
        if bundle.dir.exists() || self.runc.knows(id) {
            info!(container = id, "deleting container");
        }
        self.runc.kill(id, "KILL").await?;
        self.wait_not_running(id, KILL_TIMEOUT).await?;
        self.runc.delete_force(id).await?;
        self.wait_shim_gone(id, Duration::from_secs(5)).await;
        if bundle.dir.exists() {
            rootfs::unmount_all_under(&bundle.dir)?;
        }
        let nl = nimbus_net::Netlink::connect().await.map_err(net_err)?;
        nimbus_net::delete_container_netns(&nl, &self.cfg.net_key(id))
            .await
            .map_err(net_err)?;
        cgroup::remove(&self.cfg.cgroup_parent, id)?;
        match std::fs::remove_dir_all(&bundle.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::Io {
                context: format!("removing {}", bundle.dir.display()),
                source: e,
            }),
        }
    }
}

#[async_trait]
impl Driver for ContainerDriver {
    fn instance_type(&self) -> InstanceType {
        InstanceType::Container
    }

    fn host_interface(&self, id: &str) -> Option<String> {
        Some(nimbus_net::host_ifname("nv", &self.cfg.net_key(id)))
    }

    async fn create(&self, spec: &RuntimeSpec) -> Result<(), DriverError> {
        valid_id(&spec.id)?;
        let _guard = self.lock(&spec.id).await;
        if self.bundle(&spec.id).config().exists() {
            return Ok(());
        }
        info!(container = %spec.id, "creating container");
        if let Err(e) = self.create_inner(spec).await {
            warn!(container = %spec.id, error = %e, "create failed, cleaning up");
            if let Err(e2) = self.delete_inner(&spec.id).await {
                warn!(container = %spec.id, error = %e2, "cleanup after failed create failed");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<u32, DriverError> {
        valid_id(id)?;
        let _guard = self.lock(id).await;
        self.start_inner(id).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        valid_id(id)?;
        let _guard = self.lock(id).await;
        self.stop_inner(id, grace).await
    }

    async fn state(&self, id: &str) -> Result<RuntimeState, DriverError> {
        if valid_id(id).is_err() {
            return Ok(RuntimeState::Absent);
        }
        self.state_inner(id).await
    }

    async fn exec(
        &self,
        id: &str,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecResponse, DriverError> {
        valid_id(id)?;
        if command.is_empty() {
            return Err(DriverError::Runtime {
                tool: "runc",
                message: "empty command".into(),
            });
        }
        self.exec_inner(id, command, timeout).await
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.bundle(id).console_log()
    }

    async fn stats(&self, id: &str) -> Result<RuntimeStats, DriverError> {
        valid_id(id)?;
        if !self.bundle(id).dir.is_dir() {
            return Err(DriverError::NotFound(id.to_string()));
        }
        Ok(cgroup::stats(&self.cfg.cgroup_parent, id))
    }

    async fn delete(&self, id: &str) -> Result<(), DriverError> {
        valid_id(id)?;
        let _guard = self.lock(id).await;
        self.delete_inner(id).await
    }

    async fn list(&self) -> Result<Vec<String>, DriverError> {
        let mut ids = Vec::new();
        let entries = std::fs::read_dir(&self.cfg.state_dir).map_err(DriverError::io(format!(
            "listing {}",
            self.cfg.state_dir.display()
        )))?;
        for entry in entries {
            let entry = entry.map_err(DriverError::io("listing containers"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && entry.file_type().is_ok_and(|t| t.is_dir()) {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// Gratuitous ARPs after a start, as delays from the first one: a new link's carrier is
/// processed by the kernel's link watcher up to a second late, and a frame sent before that is
/// dropped.
const GARP_AT_MS: [u64; 3] = [0, 250, 1_000];

/// Tells the container's neighbours its address is at its MAC. Addresses are reused: a
/// neighbour that talked to the previous holder keeps that MAC for up to 45 s unless told. The
/// host's own entry on the bridge is set directly (the LB and health checks run there); the
/// other instances on the bridge learn it from gratuitous ARPs sent from the container's `eth0`
/// (in the namespace of `net_key`). Best effort: a failure is logged.
async fn announce(net_key: String, att: NetworkAttachment) {
    let (Ok(ip), Ok(mac)) = (
        nimbus_net::parse_ipv4("ip", &att.ip),
        nimbus_net::parse_mac(&att.mac),
    ) else {
        return;
    };
    if !att.bridge.is_empty() {
        let pointed = match nimbus_net::Netlink::connect().await {
            Ok(nl) => nl.point_neighbour(&att.bridge, ip, mac).await,
            Err(e) => Err(e),
        };
        if let Err(e) = pointed {
            warn!("announcing {ip} to the host: {e}");
        }
    }
    let path = nimbus_net::netns_path(&net_key);
    let mut last = 0;
    for at in GARP_AT_MS {
        tokio::time::sleep(Duration::from_millis(at - last)).await;
        last = at;
        let sent = nimbus_net::in_netns(&path, move |nl| async move {
            let index = nl
                .link_index("eth0")
                .await?
                .ok_or_else(|| nimbus_net::NetError::NoSuchLink("eth0".into()))?;
            nimbus_net::vip::send_garp(nimbus_net::vip::Iface { index, mac }, ip)
        })
        .await;
        if let Err(e) = sent {
            // Deleted meanwhile, or no network: nothing more to announce.
            debug!(netns = %path.display(), "announcing {ip}: {e}");
            return;
        }
    }
}

/// Whether `pid` is a created container's init still waiting to be started: `runc init`
/// names itself `runc:[2:INIT]` and blocks until `runc start`, then executes the container's
/// process (which renames it).
fn waiting_to_start(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim_end() == "runc:[2:INIT]")
}

/// Whether `pid` is a live (non-zombie) process in container `id`'s cgroup
/// (`/<parent>/<id>`).
fn init_alive_in_cgroup(pid: u32, parent: &str, id: &str) -> bool {
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        })
        .unwrap_or(false);
    alive
        && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|c| c.lines().any(|l| l.ends_with(&format!("/{parent}/{id}"))))
}
