//! A cloud of one `nimbus server` over TLS (its internal CA) and agents that join it with join
//! tokens and then authenticate with their certificates (mTLS) on this machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_client::Client;

use crate::{
    free_port, remove_agent_containers, remove_datapath, take_slot, wait_ready, AgentProc,
    KitError, Slot,
};

/// A TLS 1.3 client config trusting only the CA of `ca_pem` for server certificates,
/// presenting `client` (chain PEM, key PEM) if given.
pub fn client_config(ca_pem: &str, client: Option<(&str, &str)>) -> rustls::ClientConfig {
    let roots = nimbus_pki::verify::roots(ca_pem).expect("CA");
    let v = nimbus_pki::ClusterServerVerifier::new(
        roots,
        vec![nimbus_pki::Role::Server],
        Arc::new(nimbus_pki::NoRevocation),
    );
    let certs =
        client.map(|(c, k)| Arc::new(nimbus_pki::CertStore::new(c, k).expect("client cert")));
    nimbus_pki::client_config(Arc::new(v), certs).expect("TLS config")
}

/// A running TLS server and its joined agents.
pub struct TlsCloud {
    /// The server's data directory.
    pub data_dir: PathBuf,
    /// API URL (`https://127.0.0.1:PORT`).
    pub url: String,
    /// Admin token.
    pub token: String,
    /// The cluster CA certificate (`<data-dir>/pki/ca.crt`).
    pub ca_file: PathBuf,
    /// Datapath name prefix.
    pub bridge: String,
    port: u16,
    server: Option<Child>,
    agents: Vec<AgentProc>,
    slot: Slot,
    _tmp: tempfile::TempDir,
    bin: PathBuf,
    extra: Vec<String>,
}

impl TlsCloud {
    /// Starts `nimbus server` (TLS with its own CA) with `extra` arguments (e.g.
    /// `--cert-lifetime 30s`).
    pub fn start(bin: &Path, extra: &[&str]) -> Result<Self, KitError> {
        let tmp = tempfile::Builder::new().prefix("nimbus-tls-").tempdir()?;
        let slot = take_slot();
        let data_dir = tmp.path().join("server");
        let mut c = Self {
            ca_file: data_dir.join("pki").join("ca.crt"),
            data_dir,
            url: String::new(),
            token: String::new(),
            bridge: format!("nbt{}", slot.index),
            port: free_port(),
            server: None,
            agents: Vec::new(),
            slot,
            _tmp: tmp,
            bin: bin.to_path_buf(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        c.spawn_server()?;
        Ok(c)
    }

    fn spawn_server(&mut self) -> Result<(), KitError> {
        let log_path = self.data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = Command::new(&self.bin)
            .args(["server", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--net-prefix", &self.bridge])
            .args([
                "--network-pool",
                &format!("10.{}.0.0/16", 170 + u32::from(self.slot.index)),
            ])
            .args(&self.extra)
            .env("NIMBUS_LOG", "info,openraft=warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        wait_ready(&mut child, &log_path, "nimbus server")?;
        self.url = format!("https://127.0.0.1:{}", self.port);
        self.token = std::fs::read_to_string(self.data_dir.join("admin.token"))?
            .trim()
            .to_string();
        self.server = Some(child);
        Ok(())
    }

    /// The slot index (0..32) isolating this cloud.
    pub fn slot(&self) -> u8 {
        self.slot.index
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca_file).unwrap_or_default()
    }

    /// A TLS 1.3 client config trusting only the cluster CA for server certificates,
    /// presenting `client` (chain PEM, key PEM) if given.
    pub fn tls_config(&self, client: Option<(&str, &str)>) -> rustls::ClientConfig {
        client_config(&self.ca_pem(), client)
    }

    /// An admin client (TLS, the CA pinned).
    pub fn client(&self) -> Client {
        Client::new(&self.url, &self.token, "default").with_tls(self.tls_config(None))
    }

    /// The `nimbus` CLI for this cloud (`NIMBUS_CA` set to the CA file).
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("NIMBUS_URL", &self.url)
            .env("NIMBUS_TOKEN", &self.token)
            .env("NIMBUS_CA", &self.ca_file)
            .env_remove("NIMBUS_PROJECT")
            .stdin(Stdio::null());
        c
    }

    /// A fresh join token (`nimbus server join-token create --ttl TTL`).
    pub fn join_token(&self, ttl: &str) -> Result<String, KitError> {
        let out = self
            .cli()
            .args(["server", "join-token", "create", "--ttl", ttl])
            .output()?;
        if !out.status.success() {
            return Err(KitError::NotReady(format!(
                "join-token create: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The data directory of agent `name`.
    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.data_dir.with_file_name(format!("agent-{name}"))
    }

    fn scope(&self, name: &str) -> String {
        format!("t{}-{name}", self.slot())
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(32)
            .collect()
    }

    fn agent_command(&self, name: &str, join_token: Option<&str>) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(["agent", "--server", &self.url, "--name", name, "--data-dir"])
            .arg(self.agent_dir(name))
            .arg("--ca")
            .arg(&self.ca_file)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--runtime-scope",
                &self.scope(name),
            ])
            // Agents on one machine share its namespace: each needs its own nftables table.
            .args(["--nft-table", &format!("{}_{name}", self.bridge)])
            .env("NIMBUS_LOG", "info")
            .stdin(Stdio::null());
        if let Some(t) = join_token {
            c.args(["--join-token", t]);
        }
        c
    }

    /// Starts agent `name` joining with `join_token` (or, without it, with the certificate
    /// it already has); returns once it is ready.
    pub fn join_agent(&mut self, name: &str, join_token: Option<&str>) -> Result<(), KitError> {
        self.kill_agent(name);
        let log_path = self.agent_dir(name).with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let scope = self.scope(name);
        let mut child = self
            .agent_command(name, join_token)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let ready = wait_ready(&mut child, &log_path, &format!("agent {name}"));
        let data_dir = self.agent_dir(name);
        match self.agents.iter_mut().find(|a| a.name == name) {
            Some(a) => a.child = ready.is_ok().then_some(child),
            None => self.agents.push(AgentProc {
                name: name.to_owned(),
                data_dir,
                scope,
                child: ready.is_ok().then_some(child),
            }),
        }
        ready
    }

    /// SIGKILLs agent `name` (its instances keep running).
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(a) = self.agents.iter_mut().find(|a| a.name == name) {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Runs an agent that is expected to fail at start (a bad join token): its output.
    pub fn failing_agent(&self, name: &str, join_token: &str) -> Result<Output, KitError> {
        let mut child = self
            .agent_command(name, Some(join_token))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(child.wait_with_output()?);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        Err(KitError::NotReady(format!(
            "agent {name} did not fail within 30 s"
        )))
    }

    /// The agent's log so far.
    pub fn agent_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.agent_dir(name).with_extension("log")).unwrap_or_default()
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    fn cleanup(&mut self) {
        if self.server.is_some() {
            let c = self.client();
            let worker = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    for i in c.list_instances().await.unwrap_or_default() {
                        let _ = c.delete_instance(&i.meta.name).await;
                    }
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while Instant::now() < deadline
                        && !c.list_instances().await.map_or(true, |v| v.is_empty())
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            });
            let _ = worker.join();
        }
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            remove_agent_containers(&a.scope, &a.data_dir);
        }
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_datapath(&self.bridge);
    }
}

impl Drop for TlsCloud {
    fn drop(&mut self) {
        self.cleanup();
    }
}
