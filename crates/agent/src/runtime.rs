//! The agent: its state, startup (local records, API, registration) and the tasks it runs:
//! heartbeats and the assignment watch ([`crate::control`]), the convergence of instances
//! ([`crate::converge`], deciding with [`crate::decide`]), the datapath ([`crate::netloop`]),
//! VIPs and load-balancer health.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nimbus_api::agent::{Assignment, NetworkMap, RegisterNodeRequest};
use nimbus_api::{Capacity, InstanceType, NodeCapabilities};
use nimbus_image::ImageStore;
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::converge::Executor;
use crate::driver::{Driver, DriverError, RuntimeSpec, SecretMaterial};
use crate::local::LocalState;
use crate::netloop::Programmed;
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
    /// The saved node credentials cannot be read.
    #[error("node credentials in {path}")]
    Credentials {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
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
    /// Current assignments by id.
    pub(crate) assignments: Mutex<BTreeMap<String, Assignment>>,
    /// Whether `assignments` holds the control plane's answer yet (false from the start until
    /// the first poll answered).
    pub(crate) assignments_known: watch::Sender<bool>,
    pub(crate) capabilities: Mutex<NodeCapabilities>,
    /// The registration as last sent (re-sent when capabilities change or the server forgets us).
    pub(crate) registration: Mutex<Option<RegisterNodeRequest>>,
    /// The load-balancer data plane of this node.
    pub(crate) lbs: Arc<crate::lb_host::LbHost>,
    /// Floating VIPs: targets and leases held.
    pub(crate) vips: crate::vip::VipState,
    /// The network map the datapath converges to.
    pub(crate) net_map: Mutex<Option<NetworkMap>>,
    /// The ports of the node's own addresses its instances may reach (its LB listeners).
    pub(crate) lb_ports: Mutex<std::collections::BTreeSet<(nimbus_api::Protocol, u16)>>,
    /// What the datapath has programmed, after each successful pass of the net loop.
    pub(crate) datapath: watch::Sender<Programmed>,
    /// The executor of the decision core: workers, wake-ups, the report path.
    pub(crate) exec: Executor,
    /// The node's credentials (empty before its first registration): the API accepts only
    /// the servers' token from them.
    pub(crate) credentials: Mutex<crate::credential::NodeCredentials>,
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
        self.agent.exec.stop();
        for t in self.tasks {
            t.abort();
        }
        // What the saver had not written yet.
        if let Err(e) = self.agent.local.lock().expect("local lock").save() {
            tracing::error!("saving agent state: {e}");
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
        let credentials = crate::credential::load(&cfg.data_dir)
            .map_err(|source| AgentError::Credentials {
                path: crate::credential::path(&cfg.data_dir).display().to_string(),
                source,
            })?
            .unwrap_or_default();
        // A registered node uses its own credential; only a new one the node token.
        let token = if credentials.credential.is_empty() {
            cfg.token.clone()
        } else {
            credentials.credential.clone()
        };
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
            link: ServerLink::with_tls(cfg.servers.clone(), token, cfg.server_tls.clone()),
            credentials: Mutex::new(credentials),
            drivers: drivers
                .into_iter()
                .map(|d| (d.instance_type(), d))
                .collect(),
            images: Arc::new(images),
            local: Mutex::new(local),
            assignments: Mutex::new(BTreeMap::new()),
            assignments_known: watch::Sender::new(false),
            capabilities: Mutex::new(capabilities),
            registration: Mutex::new(None),
            lbs: Arc::new(crate::lb_host::LbHost::new(
                Arc::new(nimbus_lb::Metrics::new()),
                Vec::new(),
            )),
            vips: crate::vip::VipState::default(),
            net_map: Mutex::new(None),
            lb_ports: Mutex::default(),
            datapath: watch::channel(Programmed::default()).0,
            exec: Executor::new(),
            cfg,
        });
        let api = crate::http::router(agent.clone());
        let mut tasks = vec![if let Some(tls) = agent.cfg.api_tls.clone() {
            let revocation: Arc<dyn nimbus_pki::Revocation> = match agent.cfg.revocation.clone() {
                Some(r) => r,
                None => Arc::new(nimbus_pki::NoRevocation),
            };
            crate::tls::serve(listener, api, tls, revocation)
        } else {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, api).await {
                    tracing::error!("agent API stopped: {e}");
                }
            })
        }];
        let scheme = if agent.cfg.api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let advertise = agent
            .cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{local_addr}"));
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
        if let Some(reports) = agent.exec.take_report_rx() {
            tasks.push(tokio::spawn(agent.clone().report_loop(reports)));
        }
        tasks.push(tokio::spawn(agent.clone().save_loop()));
        tasks.push(tokio::spawn(agent.clone().reconcile_loop(rx)));
        tasks.push(tokio::spawn(agent.clone().lb_health_loop()));
        Ok(AgentHandle {
            agent,
            local_addr,
            tasks,
        })
    }

    /// Rotates the console logs that outgrew [`crate::logs::MAX_LOG_BYTES`].
    pub(crate) async fn rotate_logs(&self, assignments: &[Assignment]) {
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

    /// Builds the driver's spec: resolves image layers (pulling blobs if needed), command, env.
    pub(crate) async fn runtime_spec(&self, a: &Assignment) -> Result<RuntimeSpec, DriverError> {
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
        let secrets = self.secrets_of(a).await?;
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
            secrets,
        })
    }

    /// Fetches the instance's secrets from the control plane (never stored by the agent).
    async fn secrets_of(&self, a: &Assignment) -> Result<SecretMaterial, DriverError> {
        if a.spec.secrets.is_empty() || self.cfg.hollow {
            return Ok(SecretMaterial::default());
        }
        let got = self
            .link
            .instance_secrets(&self.cfg.name, &a.id)
            .await
            .map_err(|e| {
                DriverError::Unavailable(format!("fetching the instance's secrets: {e}"))
            })?;
        let mut out = SecretMaterial::default();
        for (path, data) in &got.files {
            let value = nimbus_api::secret::decode(data).map_err(|_| {
                DriverError::Unavailable(format!("the secret for {path} is not base64"))
            })?;
            out.files.push((path.clone(), value));
        }
        for (k, v) in &got.env {
            out.env
                .push((k.clone(), zeroize::Zeroizing::new(v.clone())));
        }
        Ok(out)
    }

    /// Waits, at most `limit`, until the first assignments since this agent started are
    /// known: a restarted agent's API listens before its first poll has answered, and the
    /// instances it runs would be "not found" meanwhile.
    pub(crate) async fn assignments_loaded(&self, limit: std::time::Duration) {
        let mut known = self.assignments_known.subscribe();
        let _ = tokio::time::timeout(limit, known.wait_for(|k| *k)).await;
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
