//! Test harness: starts real `nimbus up` processes in temporary data directories, on free
//! ports, with an isolated bridge and address pool per cloud, and can SIGKILL and restart them.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nimbus_client::Client;

pub mod history;
pub mod netns;
pub mod pcap;
pub mod tls;

/// Harness failures.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The binary did not start or did not print "ready".
    #[error("nimbus up did not become ready: {0}")]
    NotReady(String),
    /// I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Fails the test when a dependency is missing under `CI=true`; otherwise says whether the
/// dependency is present so a local run may skip with a message.
pub fn require(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "missing dependency in CI: {what}"
    );
    eprintln!("SKIPPED: missing dependency {what} (install with scripts/setup)");
    false
}

/// Whether a command is on PATH.
pub fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Removes what a cloud's agents left of the datapath with name prefix `prefix` in the
/// current network namespace: bridges `<prefix>b*`, VXLAN devices `<prefix>v*`, and the
/// nftables tables `<prefix>` and `<prefix>_*` of every family (agents sharing a namespace use
/// `inet`/`bridge` `<prefix>_<name>`; the in-kernel L4 path of load balancers `ip <prefix>_lb*`).
pub fn remove_datapath(prefix: &str) {
    let owned = |name: &str, k: char| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(k))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    };
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let names: Vec<String> = text
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect();
        for k in ['v', 'b'] {
            for n in names.iter().filter(|n| owned(n, k)) {
                let _ = Command::new("ip")
                    .args(["link", "del", n])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    if let Ok(out) = Command::new("nft").args(["list", "tables"]).output() {
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let mut w = l.split_whitespace().skip(1);
            if let (Some(family), Some(name)) = (w.next(), w.next()) {
                if name == prefix || name.starts_with(&format!("{prefix}_")) {
                    let _ = Command::new("nft")
                        .args(["delete", "table", family, name])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

/// A slot isolates concurrently running clouds: each gets its own datapath prefix and /16 pool.
struct Slot {
    index: u8,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

fn take_slot() -> Slot {
    let dir = Path::new("/tmp/nimbus-testkit");
    let _ = std::fs::create_dir_all(dir);
    loop {
        for index in 0..32u8 {
            let Ok(f) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("slot-{index}.lock")))
            else {
                continue;
            };
            if let Ok(lock) =
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            {
                return Slot { index, _lock: lock };
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes what an agent with runtime scope `scope` and data directory `agent_dir` left on
/// this machine once it is dead (killed on purpose, or a test failed halfway): the shims,
/// runc containers, named network namespaces and rootfs mounts of the containers in its local
/// state.
pub fn remove_agent_containers(scope: &str, agent_dir: &Path) {
    let runc_root = format!("/run/nimbus/{scope}/runc");
    let Ok(entries) = std::fs::read_dir(agent_dir.join("containers")) else {
        return;
    };
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if let Ok(out) = Command::new("pgrep")
            .args(["-f", &format!("shim run.*{id}")])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("runc")
            .args(["--root", &runc_root, "delete", "--force", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let ns = nimbus_net::netns_path(&nimbus_net::scoped_key(Some(scope), &id));
        let _ = nix::mount::umount2(&ns, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&ns);
        // The agent mounts each container's overlay rootfs inside its data directory; left
        // mounted, the test's temporary directory could not be removed.
        let _ = nix::mount::umount2(&e.path().join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// An extra `nimbus agent` process joined to a cloud (another node on this machine).
struct AgentProc {
    name: String,
    data_dir: PathBuf,
    /// Its `--runtime-scope`.
    scope: String,
    child: Option<Child>,
}

fn wait_ready(child: &mut Child, log: &Path, what: &str) -> Result<(), KitError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| KitError::NotReady("no stdout".into()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("ready") {
                let _ = tx.send(line);
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_ok() {
        return Ok(());
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(log).unwrap_or_default();
    Err(KitError::NotReady(format!(
        "{what}: {}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    )))
}

/// A running all-in-one cloud.
pub struct Cloud {
    /// The data directory.
    pub data_dir: PathBuf,
    /// API URL.
    pub url: String,
    /// Admin token.
    pub token: String,
    /// Datapath name prefix (bridges `<prefix>b<vni>`, nftables table `inet <prefix>`).
    pub bridge: String,
    /// Node address pool.
    pub pool: String,
    port: u16,
    child: Option<Child>,
    agents: Vec<AgentProc>,
    slot: Slot,
    _tmp: Option<tempfile::TempDir>,
    bin: PathBuf,
    env: Vec<(String, String)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(17443, |a| a.port())
}

impl Cloud {
    /// Starts `nimbus up` with the given binary in a new temporary data directory.
    pub fn start(bin: &Path) -> Result<Self, KitError> {
        Self::start_with_env(bin, &[])
    }

    /// Like [`Cloud::start`], with extra environment variables for the `nimbus up` process
    /// (also when it is restarted).
    pub fn start_with_env(bin: &Path, env: &[(&str, &str)]) -> Result<Self, KitError> {
        let tmp = tempfile::Builder::new().prefix("nimbus-test-").tempdir()?;
        let slot = take_slot();
        let mut c = Self {
            data_dir: tmp.path().join("data"),
            url: String::new(),
            token: String::new(),
            bridge: format!("nbt{}", slot.index),
            pool: format!("10.{}.0.0/16", 170 + u32::from(slot.index)),
            port: free_port(),
            child: None,
            agents: Vec::new(),
            slot,
            _tmp: Some(tmp),
            bin: bin.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        c.spawn()?;
        Ok(c)
    }

    /// The slot index (0..32) isolating this cloud.
    pub fn slot(&self) -> u8 {
        self.slot.index
    }

    fn spawn(&mut self) -> Result<(), KitError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))?;
        let mut child = Command::new(&self.bin)
            .args(["up", "--data-dir"])
            .arg(&self.data_dir)
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--net-prefix",
                &self.bridge,
                "--network-pool",
                &self.pool,
            ])
            .args(["--node-name", "node1"])
            .env("NIMBUS_LOG", "info,openraft=warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        wait_ready(
            &mut child,
            &self.data_dir.with_extension("log"),
            "nimbus up",
        )?;
        self.url = format!("http://127.0.0.1:{}", self.port);
        self.token = std::fs::read_to_string(self.data_dir.join("admin.token"))?
            .trim()
            .to_string();
        self.child = Some(child);
        Ok(())
    }

    /// Starts another node: a `nimbus agent` process named `name` joined to this cloud.
    pub fn add_agent(&mut self, name: &str) -> Result<(), KitError> {
        let data_dir = self.data_dir.with_file_name(format!("agent-{name}"));
        let scope: String = format!("c{}-{name}", self.slot())
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(32)
            .collect();
        self.agents.push(AgentProc {
            name: name.to_string(),
            data_dir,
            scope,
            child: None,
        });
        self.start_agent(name)
    }

    fn start_agent(&mut self, name: &str) -> Result<(), KitError> {
        let url = self.url.clone();
        let token_file = self.data_dir.join("node.token");
        let bin = self.bin.clone();
        let table = format!("{}_{name}", self.bridge);
        let a = self
            .agents
            .iter_mut()
            .find(|a| a.name == name)
            .ok_or_else(|| KitError::NotReady(format!("no agent {name}")))?;
        let scope = a.scope.clone();
        let log_path = a.data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = Command::new(bin)
            .args(["agent", "--server", &url, "--token-file"])
            .arg(&token_file)
            .args(["--name", name, "--data-dir"])
            .arg(&a.data_dir)
            .args(["--listen", "127.0.0.1:0"])
            // It shares this machine with the cloud's own agent: keep their containers apart.
            .args(["--runtime-scope", &scope])
            // Agents on one machine share its namespace: each needs its own nftables table.
            .args(["--nft-table", &table])
            .env("NIMBUS_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        wait_ready(&mut child, &log_path, &format!("agent {name}"))?;
        a.child = Some(child);
        Ok(())
    }

    /// SIGKILLs the agent process of node `name` (its instances keep running).
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(a) = self.agents.iter_mut().find(|a| a.name == name) {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts the agent of node `name` again on its data directory.
    pub fn restart_agent(&mut self, name: &str) -> Result<(), KitError> {
        self.kill_agent(name);
        self.start_agent(name)
    }

    /// PID of the nimbus process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A client for the default project.
    pub fn client(&self) -> Client {
        Client::new(&self.url, &self.token, "default")
    }

    /// A `nimbus` CLI command preconfigured for this cloud.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("NIMBUS_URL", &self.url)
            .env("NIMBUS_TOKEN", &self.token)
            .env_remove("NIMBUS_PROJECT");
        c
    }

    /// SIGKILLs the nimbus process (instances keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts nimbus again on the same data directory and port.
    pub fn restart(&mut self) -> Result<(), KitError> {
        self.kill9();
        self.spawn()
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    /// Deletes every instance through the API and waits until they are gone, then stops.
    pub fn shutdown(mut self) {
        self.cleanup();
    }

    fn cleanup(&mut self) {
        if self.child.is_some() {
            let token = self.token.clone();
            let url = self.url.clone();
            // Runs on its own thread: the caller may be inside a tokio runtime.
            let worker = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        let c = Client::new(url, token, "default");
                        let projects = c.list_projects().await.unwrap_or_default();
                        for p in projects {
                            let pc = c.with_project(&p.meta.name);
                            for i in pc.list_instances().await.unwrap_or_default() {
                                let _ = pc.delete_instance(&i.meta.name).await;
                            }
                        }
                        let deadline = Instant::now() + Duration::from_secs(60);
                        while Instant::now() < deadline {
                            let mut left = 0;
                            for p in c.list_projects().await.unwrap_or_default() {
                                left += c
                                    .with_project(&p.meta.name)
                                    .list_instances()
                                    .await
                                    .map_or(0, |v| v.len());
                            }
                            if left == 0 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    });
                }
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
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Remove what the agents had no time to remove.
        remove_datapath(&self.bridge);
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Polls `f` until it returns `Some` or the timeout passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        })
        .unwrap_or(false)
}

/// A plain HTTP/1.0 `GET /` to `ip:port`; the whole answer, or `None` if it could not be had.
pub fn http_get(ip: &str, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let addr = format!("{ip}:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
