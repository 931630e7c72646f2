//! Starts and stops the processes under test: `nimbus up` and a single-member etcd.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nimbus_client::Client;

/// Bridge used by the benchmark clouds (distinct from the testkit's `nbt*` and the default).
pub const BRIDGE: &str = "nbbench0";
/// Node address pool used by the benchmark clouds.
pub const POOL: &str = "10.160.0.0/16";

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A temporary working directory on the same disk as the product's data (not tmpfs).
pub fn workdir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")?)
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn terminate(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `nimbus up`.
pub struct Nimbus {
    child: Option<Child>,
    /// API base URL.
    pub url: String,
    /// Admin token.
    pub token: String,
    /// Data directory.
    pub data_dir: PathBuf,
    log: PathBuf,
}

impl Nimbus {
    /// Starts `bin up` with its data directory in `dir` and waits for the "ready" line.
    pub fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let data_dir = dir.join("nimbus-data");
        let log = dir.join("nimbus.log");
        let port = free_port()?;
        let mut child = Command::new(bin)
            .args(["up", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--bridge",
                BRIDGE,
                "--node-pool",
                POOL,
                "--node-name",
                "bench1",
            ])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("ready") {
                    let _ = tx.send(());
                }
            }
        });
        let mut me = Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            data_dir,
            log,
        };
        if rx.recv_timeout(Duration::from_secs(100)).is_err() {
            let t = tail(&me.log, 20);
            me.stop();
            bail!("nimbus up did not print ready:\n{t}");
        }
        me.token = std::fs::read_to_string(me.data_dir.join("admin.token"))?
            .trim()
            .to_string();
        Ok(me)
    }

    /// PID of the `nimbus up` process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A client of the default project.
    pub fn client(&self) -> Client {
        Client::new(&self.url, &self.token, "default")
    }

    /// Deletes every instance of the default project and waits until they are gone.
    pub async fn delete_all_instances(&self) -> anyhow::Result<()> {
        let c = self.client();
        let names: Vec<String> = c
            .list_instances()
            .await?
            .into_iter()
            .map(|i| i.meta.name)
            .collect();
        futures::future::join_all(names.iter().map(|n| c.delete_instance(n))).await;
        let deadline = Instant::now() + Duration::from_secs(200);
        loop {
            let left = c.list_instances().await?.len();
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{left} instances still present after 200 s");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// SIGTERMs nimbus, waits, and removes the bridge it created.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
            let _ = Command::new("ip")
                .args(["link", "del", BRIDGE])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Nimbus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running single-member etcd.
pub struct Etcd {
    child: Option<Child>,
    /// Client URL.
    pub url: String,
}

impl Etcd {
    /// Starts `etcd` with its data directory in `dir` and waits until it answers.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = dir.join("etcd.log");
        let child = Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("etcd-data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("bench={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        let mut me = Self {
            child: Some(child),
            url,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = http
                .get(format!("{}/health", me.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(me);
            }
            if Instant::now() > deadline {
                me.stop();
                bail!("etcd did not become healthy:\n{}", tail(&log, 20));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops etcd.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `VmRSS` and `VmHWM` of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Proportional set size of a process in KiB (shared pages divided among sharers).
pub fn pss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
}

/// PIDs whose command line (NUL-separated args) satisfies `pred`.
pub fn pids_matching(pred: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.is_empty() && pred(&args) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}
