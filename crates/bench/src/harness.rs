//! Starts and stops the processes under test (`nimbus up`, a single-member etcd) and removes
//! exactly what they created.
//!
//! Other clouds (tests, other benchmark runs, other people's `nimbus up`) run on the same machine
//! at the same time, so a benchmark cloud owns a [`Slot`]: a file lock under
//! `/tmp/nimbus-bench` that gives it a datapath prefix `nbb<N>` (bridges `nbb<N>b<vni>`, VXLAN
//! `nbb<N>v<vni>`, nftables tables `nbb<N>`/`nbb<N>_*`), a node pool `10.<150+N>.0.0/16` and, for
//! the bare-runc baseline, the names `nbb<N>r*`/`nbb<N>h*` and addresses `10.<140+N>.0.0/16`.
//! Cleanup removes only those names and the containers listed in the run's own data directory.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nimbus_client::Client;

/// Slots (concurrent benchmark clouds on one machine).
const SLOTS: u8 = 10;

/// A benchmark run's claim on a datapath prefix and address ranges, held until dropped.
pub struct Slot {
    index: u8,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Slot {
    /// Takes a free slot (waits while all are taken) and removes what a crashed earlier run in
    /// it left behind, saying so on stderr.
    pub fn take() -> anyhow::Result<Self> {
        let dir = Path::new("/tmp/nimbus-bench");
        std::fs::create_dir_all(dir)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            for index in 0..SLOTS {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join(format!("slot-{index}.lock")))?;
                if let Ok(lock) =
                    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                {
                    let slot = Self { index, _lock: lock };
                    let left = slot.owned_items();
                    if !left.is_empty() {
                        eprintln!(
                            "bench: removing leftovers of an earlier run in slot {index}: {}",
                            left.join(", ")
                        );
                        slot.remove_owned();
                    }
                    return Ok(slot);
                }
            }
            if Instant::now() > deadline {
                bail!("all {SLOTS} benchmark slots stayed taken for 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The datapath prefix of `nimbus up --net-prefix` (`nbb<N>`).
    pub fn prefix(&self) -> String {
        format!("nbb{}", self.index)
    }

    /// The node address pool of `nimbus up --network-pool`.
    pub fn pool(&self) -> String {
        format!("10.{}.0.0/16", 150 + u32::from(self.index))
    }

    /// Second octet of the bare-runc baseline's addresses (`10.<octet>.<i>.0/24` per container).
    pub fn veth_octet(&self) -> u8 {
        140 + self.index
    }

    /// Links, network namespaces and nftables tables carrying this slot's names.
    pub fn owned_items(&self) -> Vec<String> {
        let prefix = self.prefix();
        let mut out = Vec::new();
        let ours = |name: &str| {
            name.strip_prefix(&prefix).is_some_and(|rest| {
                rest.is_empty()
                    || rest.starts_with('_')
                    || rest
                        .strip_prefix(['b', 'v', 'r', 'h'])
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            })
        };
        let text = |args: &[&str]| {
            Command::new(args[0])
                .args(&args[1..])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for l in text(&["ip", "-o", "link", "show"]).lines() {
            if let Some(name) = l.split(": ").nth(1).and_then(|n| n.split('@').next()) {
                if ours(name) {
                    out.push(format!("link {name}"));
                }
            }
        }
        for e in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if ours(&name) {
                out.push(format!("netns {name}"));
            }
        }
        for l in text(&["nft", "list", "tables"]).lines() {
            let mut w = l.split_whitespace().skip(1);
            if let (Some(family), Some(name)) = (w.next(), w.next()) {
                if ours(name) {
                    out.push(format!("nft table {family} {name}"));
                }
            }
        }
        out
    }

    /// Removes this slot's links, network namespaces and nftables tables.
    pub fn remove_owned(&self) {
        for item in self.owned_items() {
            let w: Vec<&str> = item.split(' ').collect();
            let args: Vec<&str> = match w.as_slice() {
                ["link", name] => vec!["ip", "link", "del", name],
                ["netns", name] => vec!["ip", "netns", "del", name],
                ["nft", "table", family, name] => vec!["nft", "delete", "table", family, name],
                _ => continue,
            };
            let _ = Command::new(args[0])
                .args(&args[1..])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A temporary working directory under `$TMPDIR`, else `/var/tmp` (on the same disk as the
/// product's data, not tmpfs).
pub fn workdir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let base = std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    Ok(tempfile::Builder::new().prefix(prefix).tempdir_in(base)?)
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to `timeout` for a line containing "ready" on the child's (piped) stdout.
pub fn wait_ready(child: &mut Child, what: &str, timeout: Duration) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let out = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(timeout)
        .map_err(|_| anyhow::anyhow!("{what} did not print ready within {timeout:?}"))
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

/// Whether a process's command line, working directory or root lies under `dir`.
fn process_uses(pid: u32, dir: &Path) -> bool {
    let dir_s = dir.to_string_lossy();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains(dir_s.as_ref())
        || ["cwd", "root"].iter().any(|l| {
            std::fs::read_link(format!("/proc/{pid}/{l}")).is_ok_and(|p| p.starts_with(dir))
        })
}

/// Removes what a stopped `nimbus up` with data directory `data_dir` left of its containers
/// and processes (a clean run leaves nothing: instances are deleted before the stop), and says
/// what it found on stderr: anything found is a product leak worth reporting.
pub fn remove_leftovers(data_dir: &Path) {
    let me = std::process::id();
    let procs = pids_matching(|_| true)
        .into_iter()
        .filter(|p| *p != me && process_uses(*p, data_dir))
        .collect::<Vec<_>>();
    for pid in &procs {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        eprintln!("bench: leftover process {pid} of the stopped nimbus: {cmd}");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let containers = data_dir.join("agent").join("containers");
    for e in std::fs::read_dir(&containers)
        .into_iter()
        .flatten()
        .flatten()
    {
        let id = e.file_name().to_string_lossy().into_owned();
        eprintln!("bench: leftover container {id} of the stopped nimbus");
        let _ = Command::new("runc")
            .args(["--root", "/run/nimbus/runc", "delete", "--force", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let ns = nimbus_net::netns_path(&id);
        let _ = nix::mount::umount2(&ns, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&ns);
    }
    for m in mounts_under(data_dir).into_iter().rev() {
        eprintln!(
            "bench: leftover mount {} of the stopped nimbus",
            m.display()
        );
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Mount points under `dir`, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect()
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
    /// The names and addresses this cloud owns.
    pub slot: Slot,
    log: PathBuf,
}

impl Nimbus {
    /// Starts `bin up` with its data directory in `dir` and waits for the "ready" line.
    pub fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let slot = Slot::take()?;
        let data_dir = dir.join("nimbus-data");
        let log = dir.join("nimbus.log");
        let port = free_port()?;
        let mut child = Command::new(bin)
            .args(["up", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--net-prefix", &slot.prefix()])
            .args(["--network-pool", &slot.pool()])
            .args(["--node-name", "bench1"])
            // No KVM probe: its QEMU would run next to the measured work (and KVM is not usable
            // on the development machine); these benchmarks run no VMs.
            .env("NIMBUS_VM_ACCEL", "tcg")
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
            slot,
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

    /// SIGTERMs nimbus, waits, and removes what it left: its datapath (the agent does not
    /// remove bridges and tables on exit) and, after a failed run, its containers.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
            remove_leftovers(&self.data_dir);
            self.slot.remove_owned();
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

/// A lone `nimbus server` (no agent), in plain HTTP (`--insecure`) or over TLS with its
/// internal CA: the TLS-vs-plain comparisons.
pub struct ApiServer {
    child: Option<Child>,
    /// API base URL (`http://` or `https://`).
    pub url: String,
    /// Admin token.
    pub token: String,
    /// The cluster CA certificate (PEM), over TLS.
    pub ca_pem: Option<String>,
    log: PathBuf,
}

impl ApiServer {
    /// Starts `bin server` with its data directory `dir/<name>`.
    pub fn start(bin: &Path, dir: &Path, name: &str, tls: bool) -> anyhow::Result<Self> {
        Self::start_with(bin, dir, name, tls, &[])
    }

    /// Like [`ApiServer::start`] with `extra` arguments (e.g. `--join URL`).
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        name: &str,
        tls: bool,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let data_dir = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["server", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--net-prefix", "nbtls", "--network-pool", "10.162.0.0/16"])
            .env("NIMBUS_LOG", "info,openraft=warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        if !tls {
            cmd.arg("--insecure");
        }
        cmd.args(extra);
        let mut child = cmd
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
            url: format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" }),
            token: String::new(),
            ca_pem: None,
            log,
        };
        if rx.recv_timeout(Duration::from_secs(100)).is_err() {
            let t = tail(&me.log, 20);
            me.stop();
            bail!("nimbus server did not print ready:\n{t}");
        }
        // A server given `--admin-token-file` keeps only the token's hash.
        me.token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if tls {
            me.ca_pem = Some(std::fs::read_to_string(data_dir.join("pki/ca.crt"))?);
        }
        Ok(me)
    }

    /// The TLS 1.3 client config trusting the cluster CA (AES-128-GCM first).
    pub fn tls_config(&self) -> anyhow::Result<Option<rustls::ClientConfig>> {
        let Some(pem) = &self.ca_pem else {
            return Ok(None);
        };
        let roots = nimbus_pki::verify::roots(pem)?;
        let v = nimbus_pki::ClusterServerVerifier::new(
            roots,
            vec![nimbus_pki::Role::Server],
            std::sync::Arc::new(nimbus_pki::NoRevocation),
        );
        Ok(Some(nimbus_pki::client_config(
            std::sync::Arc::new(v),
            None,
        )?))
    }

    /// SIGKILLs the server (it holds nothing worth a clean stop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
