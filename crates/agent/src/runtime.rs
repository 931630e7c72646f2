//! The agent runtime: register, heartbeat, watch assignments, converge, report.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nimbus_api::agent::{
    Assignment, InstanceReport, NetworkMap, RegisterNodeRequest, StatusReport,
};
use nimbus_api::{
    Capacity, DesiredState, InstanceState, InstanceType, NodeCapabilities, RestartPolicy,
};
use nimbus_image::ImageStore;
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::driver::{Driver, DriverError, RuntimeSpec, RuntimeState};
use crate::local::{LocalInstance, LocalState};
use crate::server_link::{LinkError, ServerLink};

/// Agent startup failures.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Local state.
    #[error("agent local state")]
    Local(#[from] crate::local::LocalStateError),
    /// Image store.
    #[error("image store")]
    Images(#[from] nimbus_image::ImageError),
    /// Control plane.
    #[error("registering with the control plane")]
    Link(#[from] LinkError),
    /// Agent API.
    #[error("agent API on {addr}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The node agent.
pub struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) link: ServerLink,
    pub(crate) drivers: HashMap<InstanceType, Arc<dyn Driver>>,
    pub(crate) images: Arc<ImageStore>,
    pub(crate) local: Mutex<LocalState>,
    /// Last report sent per instance (only changes are sent).
    pub(crate) reported: Mutex<HashMap<String, InstanceReport>>,
    /// Current assignments by id.
    pub(crate) assignments: Mutex<BTreeMap<String, Assignment>>,
    pub(crate) capabilities: Mutex<NodeCapabilities>,
    /// The registration as last sent (re-sent when capabilities change or the server forgets us).
    pub(crate) registration: Mutex<Option<RegisterNodeRequest>>,
    /// The load-balancer data plane of this node.
    pub(crate) lbs: Arc<crate::lb_host::LbHost>,
    /// Floating VIPs: targets and leases held.
    pub(crate) vips: crate::vip::VipState,
    /// The network map the datapath converges to.
    pub(crate) net_map: Mutex<Option<NetworkMap>>,
    /// The network map revision the datapath last converged to.
    pub(crate) net_applied: watch::Sender<u64>,
}

/// A handle to a running agent.
pub struct AgentHandle {
    /// The agent.
    pub agent: Arc<Agent>,
    /// Where its API listens.
    pub local_addr: std::net::SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl AgentHandle {
    /// Stops the agent's tasks (instances keep running).
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }

    /// Stops the agent's tasks, then removes its VIP addresses and releases their leases.
    pub async fn shutdown(self) {
        let agent = self.agent.clone();
        self.stop();
        agent.release_vips().await;
    }
}

fn node_capacity(data_dir: &std::path::Path) -> Capacity {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let disk = nix::sys::statvfs::statvfs(data_dir).map_or(0, |s| s.blocks() * s.fragment_size());
    Capacity {
        cpu_millis: cpus * 1000,
        memory_bytes: mem,
        disk_bytes: disk,
    }
}

impl Agent {
    /// Starts the agent: local state, API, registration, and the loops.
    pub async fn start(
        cfg: AgentConfig,
        drivers: Vec<Arc<dyn Driver>>,
        capabilities: NodeCapabilities,
    ) -> Result<AgentHandle, AgentError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| AgentError::Listen {
            addr: cfg.data_dir.display().to_string(),
            source,
        })?;
        let local = LocalState::load(&cfg.data_dir.join("instances.json"))?;
        let images = ImageStore::open(&cfg.image_dir)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: cfg.listen.to_string(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| AgentError::Listen {
            addr: cfg.listen.to_string(),
            source,
        })?;
        let agent = Arc::new(Self {
            link: ServerLink::new(cfg.servers.clone(), cfg.token.clone()),
            drivers: drivers
                .into_iter()
                .map(|d| (d.instance_type(), d))
                .collect(),
            images: Arc::new(images),
            local: Mutex::new(local),
            reported: Mutex::new(HashMap::new()),
            assignments: Mutex::new(BTreeMap::new()),
            capabilities: Mutex::new(capabilities),
            registration: Mutex::new(None),
            lbs: Arc::new(crate::lb_host::LbHost::new(
                Arc::new(nimbus_lb::Metrics::new()),
                Vec::new(),
            )),
            vips: crate::vip::VipState::default(),
            net_map: Mutex::new(None),
            net_applied: watch::channel(0).0,
            cfg,
        });
        let api = crate::http::router(agent.clone());
        let mut tasks = vec![tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, api).await {
                tracing::error!("agent API stopped: {e}");
            }
        })];
        let advertise = agent
            .cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{local_addr}"));
        let reg = RegisterNodeRequest {
            name: agent.cfg.name.clone(),
            agent_url: advertise,
            capacity: agent
                .cfg
                .capacity
                .unwrap_or_else(|| node_capacity(&agent.cfg.data_dir)),
            capabilities: agent.capabilities.lock().expect("caps lock").clone(),
            zone: agent.cfg.zone.clone(),
            labels: agent.cfg.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            underlay_ip: agent
                .cfg
                .underlay_ip
                .or_else(|| crate::netloop::detect_underlay(&agent.cfg.servers, agent.cfg.listen))
                .map(|a| a.to_string())
                .unwrap_or_default(),
        };
        crate::vip::remove_stale(&agent.cfg.data_dir).await;
        agent.register(&reg).await?;
        *agent.registration.lock().expect("registration lock") = Some(reg);
        let (tx, rx) = watch::channel(None);
        let (net_tx, net_rx) = watch::channel(0);
        tasks.push(tokio::spawn(agent.clone().heartbeat_loop()));
        tasks.push(tokio::spawn(agent.clone().watch_loop(tx, net_tx)));
        if !agent.cfg.hollow {
            // A hollow node has no datapath: hundreds of them share one network namespace.
            tasks.push(tokio::spawn(agent.clone().net_loop(net_rx)));
            tasks.push(tokio::spawn(agent.clone().vip_loop()));
        }
        tasks.push(tokio::spawn(agent.clone().reconcile_loop(rx)));
        tasks.push(tokio::spawn(agent.clone().lb_health_loop()));
        Ok(AgentHandle {
            agent,
            local_addr,
            tasks,
        })
    }

    async fn reconcile_loop(self: Arc<Self>, mut rx: watch::Receiver<Option<u64>>) {
        // Wait for the first assignment list before touching anything.
        while rx.borrow().is_none() {
            if rx.changed().await.is_err() {
                return;
            }
        }
        loop {
            self.reconcile_once().await;
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// One convergence pass over every assignment, plus garbage collection of instances this
    /// node no longer holds.
    pub async fn reconcile_once(self: &Arc<Self>) {
        let assignments: Vec<Assignment> = self
            .assignments
            .lock()
            .expect("assignments lock")
            .values()
            .cloned()
            .collect();
        let futs = assignments.iter().map(|a| self.converge(a));
        let reports: Vec<Option<InstanceReport>> = futures::future::join_all(futs).await;
        self.rotate_logs(&assignments).await;
        // Instances held locally but no longer assigned here: remove them.
        let assigned: std::collections::HashSet<&str> =
            assignments.iter().map(|a| a.id.as_str()).collect();
        for (ty, d) in &self.drivers {
            if let Ok(ids) = d.list().await {
                for id in ids.into_iter().filter(|id| !assigned.contains(id.as_str())) {
                    tracing::info!(instance = %id, "removing instance no longer assigned to this node");
                    if let Err(e) = d.delete(&id).await {
                        tracing::warn!(instance = %id, kind = ty.as_str(), "cleanup failed: {e}");
                    } else {
                        self.local.lock().expect("local lock").instances.remove(&id);
                    }
                }
            }
        }
        self.save_local();
        let changed: Vec<InstanceReport> = {
            let reported = self.reported.lock().expect("reported lock");
            reports
                .into_iter()
                .flatten()
                .filter(|r| reported.get(&r.id) != Some(r))
                .collect()
        };
        if changed.is_empty() {
            return;
        }
        match self
            .link
            .report(
                &self.cfg.name,
                &StatusReport {
                    instances: changed.clone(),
                    interfaces: Vec::new(),
                },
            )
            .await
        {
            Ok(()) => {
                let mut reported = self.reported.lock().expect("reported lock");
                for r in changed {
                    if r.deleted {
                        reported.remove(&r.id);
                    } else {
                        reported.insert(r.id.clone(), r);
                    }
                }
            }
            Err(e) => tracing::warn!("status report failed: {e}"),
        }
    }

    /// Rotates the console logs that outgrew [`crate::logs::MAX_LOG_BYTES`].
    async fn rotate_logs(&self, assignments: &[Assignment]) {
        for a in assignments {
            let Some(d) = self.drivers.get(&a.spec.instance_type) else {
                continue;
            };
            let log = d.log_path(&a.id);
            if !crate::logs::needs_rotation(&log, crate::logs::MAX_LOG_BYTES) {
                continue;
            }
            let name = a.name.clone();
            let res = tokio::task::spawn_blocking(move || {
                crate::logs::rotate(&log, crate::logs::MAX_LOG_BYTES)
            })
            .await;
            match res {
                Ok(Ok(true)) => tracing::info!(instance = %name, "console log rotated"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(instance = %name, "rotating the console log: {e}"),
                Err(e) => tracing::warn!(instance = %name, "rotating the console log: {e}"),
            }
        }
    }

    fn save_local(&self) {
        if let Err(e) = self.local.lock().expect("local lock").save() {
            tracing::error!("saving agent state: {e}");
        }
    }

    fn report(
        a: &Assignment,
        state: InstanceState,
        l: &LocalInstance,
        pid: Option<u32>,
        exit_code: Option<i32>,
        message: String,
    ) -> InstanceReport {
        InstanceReport {
            id: a.id.clone(),
            generation: a.generation,
            state,
            pid,
            exit_code,
            message,
            restart_count: l.restart_count,
            accelerator: None,
            deleted: false,
        }
    }

    /// Converges one instance and returns the report of its observed state.
    async fn converge(self: &Arc<Self>, a: &Assignment) -> Option<InstanceReport> {
        let ty = a.spec.instance_type;
        let Some(driver) = self.drivers.get(&ty).cloned() else {
            let l = LocalInstance::default();
            return Some(Self::report(
                a,
                InstanceState::Failed,
                &l,
                None,
                None,
                format!("this node has no {} driver", ty.as_str()),
            ));
        };
        let mut l = {
            let mut local = self.local.lock().expect("local lock");
            let e = local
                .instances
                .entry(a.id.clone())
                .or_insert_with(|| LocalInstance {
                    instance_type: ty,
                    generation: a.generation,
                    restart_nonce: a.restart_nonce,
                    ..LocalInstance::default()
                });
            if e.generation != a.generation {
                *e = LocalInstance {
                    instance_type: ty,
                    generation: a.generation,
                    restart_nonce: a.restart_nonce,
                    ..LocalInstance::default()
                };
            }
            e.clone()
        };
        let result = self.converge_with(&*driver, a, &mut l).await;
        let report = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(instance = %a.name, project = %a.project, "{e}");
                let msg = e.to_string();
                Self::report(a, InstanceState::Failed, &l, None, None, msg)
            }
        };
        {
            let mut local = self.local.lock().expect("local lock");
            if report.deleted {
                local.instances.remove(&a.id);
            } else {
                local.instances.insert(a.id.clone(), l);
            }
        }
        let mut report = report;
        if ty == InstanceType::Vm {
            report
                .accelerator
                .clone_from(&self.capabilities.lock().expect("caps lock").accelerator);
        }
        // A state transition is reported at once, without waiting for the rest of the pass.
        let transition = {
            let reported = self.reported.lock().expect("reported lock");
            reported
                .get(&report.id)
                .is_none_or(|r| r.state != report.state || r.pid != report.pid)
        };
        if transition
            && self
                .link
                .report(
                    &self.cfg.name,
                    &StatusReport {
                        instances: vec![report.clone()],
                        interfaces: Vec::new(),
                    },
                )
                .await
                .is_ok()
        {
            let mut reported = self.reported.lock().expect("reported lock");
            if report.deleted {
                reported.remove(&report.id);
            } else {
                reported.insert(report.id.clone(), report.clone());
            }
        }
        Some(report)
    }

    async fn converge_with(
        &self,
        d: &dyn Driver,
        a: &Assignment,
        l: &mut LocalInstance,
    ) -> Result<InstanceReport, DriverError> {
        let state = d.state(&a.id).await?;
        match a.desired {
            DesiredState::Deleted => {
                d.delete(&a.id).await?;
                let mut r = Self::report(a, InstanceState::Stopped, l, None, None, String::new());
                r.deleted = true;
                Ok(r)
            }
            DesiredState::Stopped => match state {
                RuntimeState::Running { .. } | RuntimeState::Starting { .. } => {
                    d.stop(&a.id, self.cfg.stop_grace).await?;
                    let code = match d.state(&a.id).await? {
                        RuntimeState::Exited { code } => code,
                        _ => None,
                    };
                    Ok(Self::report(
                        a,
                        InstanceState::Stopped,
                        l,
                        None,
                        code,
                        String::new(),
                    ))
                }
                RuntimeState::Absent => {
                    d.create(&self.runtime_spec(a).await?).await?;
                    Ok(Self::report(
                        a,
                        InstanceState::Stopped,
                        l,
                        None,
                        None,
                        String::new(),
                    ))
                }
                RuntimeState::Exited { code } => Ok(Self::report(
                    a,
                    InstanceState::Stopped,
                    l,
                    None,
                    code,
                    String::new(),
                )),
                RuntimeState::Created => Ok(Self::report(
                    a,
                    InstanceState::Stopped,
                    l,
                    None,
                    None,
                    String::new(),
                )),
            },
            DesiredState::Running => {
                let restart_requested = l.restart_nonce != a.restart_nonce;
                match state {
                    RuntimeState::Absent => {
                        let began = std::time::Instant::now();
                        let spec = self.runtime_spec(a).await?;
                        let spec_done = began.elapsed();
                        d.create(&spec).await?;
                        let created = began.elapsed();
                        let r = self.start_instance(d, a, l).await;
                        tracing::debug!(
                            instance = %a.name,
                            spec_ms = spec_done.as_secs_f64() * 1e3,
                            create_ms = created.saturating_sub(spec_done).as_secs_f64() * 1e3,
                            start_ms = began.elapsed().saturating_sub(created).as_secs_f64() * 1e3,
                            "launched"
                        );
                        r
                    }
                    RuntimeState::Created => self.start_instance(d, a, l).await,
                    RuntimeState::Running { pid } | RuntimeState::Starting { pid }
                        if restart_requested =>
                    {
                        tracing::info!(instance = %a.name, pid, "restarting on request");
                        d.stop(&a.id, self.cfg.stop_grace).await?;
                        self.start_instance(d, a, l).await
                    }
                    RuntimeState::Running { pid } => {
                        l.pid = Some(pid);
                        Ok(Self::report(
                            a,
                            InstanceState::Running,
                            l,
                            Some(pid),
                            None,
                            String::new(),
                        ))
                    }
                    RuntimeState::Starting { pid } => {
                        l.pid = Some(pid);
                        Ok(Self::report(
                            a,
                            InstanceState::Starting,
                            l,
                            Some(pid),
                            None,
                            String::new(),
                        ))
                    }
                    RuntimeState::Exited { .. } if restart_requested => {
                        self.start_instance(d, a, l).await
                    }
                    RuntimeState::Exited { code } => self.on_exit(d, a, l, code).await,
                }
            }
        }
    }

    async fn start_instance(
        &self,
        d: &dyn Driver,
        a: &Assignment,
        l: &mut LocalInstance,
    ) -> Result<InstanceReport, DriverError> {
        l.restart_nonce = a.restart_nonce;
        let pid = d.start(&a.id).await?;
        l.pid = Some(pid);
        l.handled_exit_pid = None;
        tracing::info!(instance = %a.name, project = %a.project, pid, "instance running");
        Ok(Self::report(
            a,
            InstanceState::Running,
            l,
            Some(pid),
            None,
            String::new(),
        ))
    }

    /// Applies the restart policy to an exited instance.
    async fn on_exit(
        &self,
        d: &dyn Driver,
        a: &Assignment,
        l: &mut LocalInstance,
        code: Option<i32>,
    ) -> Result<InstanceReport, DriverError> {
        let failed = code != Some(0);
        let restart = match a.spec.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        let first_sight = l.handled_exit_pid != l.pid || l.pid.is_none();
        if restart && first_sight {
            // Exponential backoff: 0, 0.2, 0.4, ... up to 10 s between restarts.
            let backoff =
                Duration::from_millis(100u64.saturating_mul(1u64 << l.restart_count.min(7)))
                    .min(Duration::from_secs(10));
            if l.restart_count > 0 {
                tokio::time::sleep(backoff).await;
            }
            l.restart_count += 1;
            tracing::info!(instance = %a.name, exit = ?code, restarts = l.restart_count, "restarting by policy");
            let mut r = self.start_instance(d, a, l).await?;
            r.exit_code = code;
            return Ok(r);
        }
        l.handled_exit_pid = l.pid;
        let state = if failed {
            InstanceState::Failed
        } else {
            InstanceState::Stopped
        };
        let msg = match code {
            Some(c) => format!("exited with code {c}"),
            None => "exited (code unknown)".into(),
        };
        Ok(Self::report(a, state, l, None, code, msg))
    }

    /// Builds the driver's spec: resolves image layers (pulling blobs if needed), command, env.
    async fn runtime_spec(&self, a: &Assignment) -> Result<RuntimeSpec, DriverError> {
        let mut layer_dirs = Vec::new();
        // A hollow node runs nothing: no layers to pull.
        let layers: &[String] = if self.cfg.hollow {
            &[]
        } else {
            &a.image.layers
        };
        for layer in layers {
            if !self.images.has_blob(layer) {
                let bytes =
                    self.link.blob(layer).await.map_err(|e| {
                        DriverError::Unavailable(format!("pulling layer {layer}: {e}"))
                    })?;
                let store = self.images.clone();
                let digest = layer.clone();
                tokio::task::spawn_blocking(move || store.put_blob(&bytes[..], &digest))
                    .await
                    .map_err(|e| DriverError::Unavailable(e.to_string()))?
                    .map_err(|e| DriverError::Unavailable(format!("storing layer: {e}")))?;
            }
            let store = self.images.clone();
            let digest = layer.clone();
            let dir: PathBuf = tokio::task::spawn_blocking(move || store.unpacked_layer(&digest))
                .await
                .map_err(|e| DriverError::Unavailable(e.to_string()))?
                .map_err(|e| DriverError::Unavailable(format!("unpacking layer {layer}: {e}")))?;
            layer_dirs.push(dir);
        }
        let command = if a.spec.command.is_empty() {
            a.image.default_command.clone()
        } else {
            a.spec.command.clone()
        };
        let mut env: BTreeMap<String, String> = a
            .image
            .default_env
            .iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        if !env.contains_key("PATH") {
            env.insert(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            );
        }
        env.insert("HOSTNAME".into(), a.name.clone());
        for (k, v) in &a.spec.env {
            env.insert(k.clone(), v.clone());
        }
        Ok(RuntimeSpec {
            id: a.id.clone(),
            name: a.name.clone(),
            image: a.image.clone(),
            layer_dirs,
            command,
            env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
            working_dir: if a.image.working_dir.is_empty() {
                "/".into()
            } else {
                a.image.working_dir.clone()
            },
            cpus: a.spec.cpus,
            memory_bytes: a.spec.memory_bytes,
            disk_bytes: a.spec.disk_bytes,
            pids_limit: a.spec.pids_limit,
            network: a.network.clone(),
            user_data: a.spec.user_data.clone(),
            ssh_keys: a.spec.ssh_keys.clone(),
        })
    }

    /// The driver and assignment of an instance held by this node.
    pub(crate) fn lookup(&self, id: &str) -> Option<(Arc<dyn Driver>, Assignment)> {
        let a = self
            .assignments
            .lock()
            .expect("assignments lock")
            .get(id)
            .cloned()?;
        let d = self.drivers.get(&a.spec.instance_type)?.clone();
        Some((d, a))
    }
}
