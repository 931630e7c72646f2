//! Launch latency: API create -> container `running`, and create -> first HTTP answer from
//! the instance, against bare `runc run -d` of the same rootfs on a pre-made veth (and, when it
//! can run here, `podman run -d`).
//!
//! Every container runs busybox `httpd -f -p 80` serving a page with its own name. Reachability
//! is polled from the host as soon as the create call (or `runc run -d`) returns: a TCP connect
//! to port 80 with a 25 ms timeout and `GET / HTTP/1.0`, every millisecond until a `200` with
//! that page arrives. The bare-runc baseline's
//! network is the minimum a reachable container needs: a network namespace with one end of a
//! veth pair, addressed, the other end on the host with a /24 route, made before its launch is
//! timed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use nimbus_api::{CreateInstanceRequest, Event, InstanceState};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{workdir, Nimbus};
use crate::stats::{ms, ratio, Summary};

/// Options of `nimbus-bench launch`.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// The product binary.
    #[arg(long, default_value = "target/release/nimbus")]
    pub nimbus_bin: PathBuf,
    /// Measured launches per configuration.
    #[arg(long, default_value_t = 60)]
    pub runs: usize,
    /// Unmeasured launches before the measured ones, per configuration.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Skip podman even if it is installed.
    #[arg(long)]
    pub no_podman: bool,
    /// Update this markdown file's "## Launch latency" section.
    #[arg(long)]
    pub doc: Option<PathBuf>,
    /// The command line to quote in the document.
    #[arg(long, default_value = "scripts/bench-launch")]
    pub command: String,
}

/// The podman image name the benchmarks import the busybox rootfs as.
pub const PODMAN_IMAGE: &str = "localhost/nimbus-bench-busybox";
const RUNC_ROOT: &str = "/run/nimbus-bench/runc";

/// Whether a command is on PATH.
pub fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// The server every launched container runs (nimbus and bare runc alike): busybox httpd
/// serving a page that holds `token`, so that an answer is known to come from that container
/// (before its network exists, the host may route the address elsewhere, e.g. to a proxy on
/// the default route that answers any port 80).
fn httpd(token: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("mkdir -p /www && echo {token} > /www/index.html && exec httpd -f -p 80 -h /www"),
    ]
}

/// How long a launched container may take to answer HTTP before the launch counts as
/// unreachable (issue 14 saw 8.5 s on main).
const REACH_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `addr` from the host from now on: TCP connect (25 ms timeout) and `GET /`, every
/// millisecond, until a `200` answer whose page holds `token` arrives; returns when it did, or
/// `None` after `timeout`.
pub async fn first_http_answer(
    addr: SocketAddr,
    token: &str,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut s = tokio::time::timeout(
                Duration::from_millis(25),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .ok()?
            .ok()?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
            // HTTP/1.0: the server closes after the page.
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut answer))
                .await
                .ok()?
                .ok()?;
            let text = String::from_utf8_lossy(&answer);
            (text.starts_with("HTTP/1.") && text.contains(" 200 ") && text.contains(token))
                .then(Instant::now)
        };
        if let Some(t) = attempt.await {
            return Some(t);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Bare runc: one overlay-mounted bundle per container, config from `runc spec`, joined to a
/// network namespace with a static veth made before the launch.
struct BareRunc {
    dir: PathBuf,
    lower: PathBuf,
    template: serde_json::Value,
    /// Names `<prefix>r<i>` (namespace) and `<prefix>h<i>` (host end), addresses
    /// `10.<octet>.<i>.1` (host) and `.2` (container).
    prefix: String,
    octet: u8,
    started: Vec<(String, PathBuf)>,
    veths: Vec<usize>,
}

/// One bare-runc launch.
struct BareLaunch {
    /// Overlay mount + config.json + `runc run -d`.
    total: Duration,
    /// `runc run -d` alone.
    runc: Duration,
    /// From the start of `total` to the first HTTP answer.
    reachable: Option<Duration>,
}

impl BareRunc {
    fn new(dir: PathBuf, lower: PathBuf, prefix: String, octet: u8) -> anyhow::Result<Self> {
        let tmpl = dir.join("template");
        std::fs::create_dir_all(&tmpl)?;
        let st = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(&tmpl)
            .status()?;
        if !st.success() {
            bail!("runc spec failed");
        }
        let template = serde_json::from_slice(&std::fs::read(tmpl.join("config.json"))?)?;
        std::fs::create_dir_all(RUNC_ROOT)?;
        Ok(Self {
            dir,
            lower,
            template,
            prefix,
            octet,
            started: Vec::new(),
            veths: Vec::new(),
        })
    }

    fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, u8::try_from(i).unwrap_or(u8::MAX), 2)
    }

    /// Network namespace `<prefix>r<i>` with `eth0` at `10.<octet>.<i>.2/24`, its veth peer
    /// `<prefix>h<i>` on the host at `.1/24` (untimed: the static network of the baseline).
    fn make_veth(&mut self, i: usize) -> anyhow::Result<()> {
        if i > 250 {
            bail!("the bare-runc baseline has addresses for 251 containers");
        }
        let (ns, host) = (
            format!("{}r{i}", self.prefix),
            format!("{}h{i}", self.prefix),
        );
        let peer = format!("{}p{i}", self.prefix);
        let o = self.octet;
        ip(&["netns", "add", &ns])?;
        self.veths.push(i);
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &ns])?;
        ip(&["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.{o}.{i}.2/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["addr", "add", &format!("10.{o}.{i}.1/24"), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        Ok(())
    }

    async fn launch(&mut self, i: usize) -> anyhow::Result<BareLaunch> {
        self.make_veth(i)?;
        let id = format!("nbbench-runc-{}-{i}", std::process::id());
        let b = self.dir.join(format!("c{i}"));
        let (rootfs, upper, work) = (b.join("rootfs"), b.join("upper"), b.join("work"));
        for d in [&rootfs, &upper, &work] {
            std::fs::create_dir_all(d)?;
        }
        let t0 = Instant::now();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(opts.as_str()),
        )
        .with_context(|| format!("mount overlay {opts}"))?;
        let mut cfg = self.template.clone();
        cfg["root"] = json!({"path": "rootfs", "readonly": false});
        cfg["process"]["args"] = json!(httpd(&id));
        cfg["process"]["terminal"] = json!(false);
        cfg["hostname"] = json!(id);
        let netns = format!("/run/netns/{}r{i}", self.prefix);
        if let Some(nss) = cfg["linux"]["namespaces"].as_array_mut() {
            for ns in nss.iter_mut().filter(|n| n["type"] == "network") {
                ns["path"] = json!(netns);
            }
        }
        std::fs::write(b.join("config.json"), serde_json::to_vec(&cfg)?)?;
        let t1 = Instant::now();
        // Detached without a terminal, runc hands its stdio to the container: use files so
        // nothing waits on a pipe the container keeps open.
        let st = Command::new("runc")
            .args(["--root", RUNC_ROOT, "--log"])
            .arg(b.join("runc.log"))
            .args(["run", "-d", "--bundle"])
            .arg(&b)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(b.join("stderr"))?)
            .status()?;
        let t2 = Instant::now();
        self.started.push((id.clone(), b.clone()));
        if !st.success() {
            bail!(
                "runc run -d failed: {}",
                std::fs::read_to_string(b.join("stderr")).unwrap_or_default()
            );
        }
        let answered =
            first_http_answer(SocketAddr::from((self.addr(i), 80)), &id, REACH_TIMEOUT).await;
        Ok(BareLaunch {
            total: t2 - t0,
            runc: t2 - t1,
            reachable: answered.map(|t| t - t0),
        })
    }

    fn count_running(&self) -> usize {
        self.started
            .iter()
            .filter(|(id, _)| {
                Command::new("runc")
                    .args(["--root", RUNC_ROOT, "state", id])
                    .output()
                    .ok()
                    .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                    .is_some_and(|v| v["status"] == "running")
            })
            .count()
    }

    fn cleanup(&mut self) {
        for (id, b) in self.started.drain(..) {
            let _ = Command::new("runc")
                .args(["--root", RUNC_ROOT, "delete", "-f", &id])
                .stderr(Stdio::null())
                .status();
            let _ = nix::mount::umount2(&b.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
        }
        for i in self.veths.drain(..) {
            // Deleting the namespace deletes the veth pair with it; the host end too, in case.
            let _ = ip(&["netns", "del", &format!("{}r{i}", self.prefix)]);
            let _ = Command::new("ip")
                .args(["link", "del", &format!("{}h{i}", self.prefix)])
                .stderr(Stdio::null())
                .status();
        }
        // Both empty unless another benchmark run is using them.
        let _ = std::fs::remove_dir(RUNC_ROOT);
        let _ = std::fs::remove_dir(
            Path::new(RUNC_ROOT)
                .parent()
                .unwrap_or(Path::new(RUNC_ROOT)),
        );
    }
}

impl Drop for BareRunc {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// What podman did.
enum PodmanOutcome {
    Skipped(String),
    Ran {
        samples: Vec<Duration>,
        note: String,
    },
}

/// Whether this process has CAP_SYS_RESOURCE.
pub fn cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Runs podman with `args`.
pub fn podman(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new("podman")
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

/// `podman run -d` of `sleep 3600` in the benchmark image; returns its wall time.
pub fn podman_run(name: &str, ulimits: bool) -> anyhow::Result<Duration> {
    let mut args = vec!["run", "-d", "--network", "none", "--name", name];
    if ulimits {
        args.extend([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
        ]);
    }
    args.extend([PODMAN_IMAGE, "sleep", "3600"]);
    let t0 = Instant::now();
    let out = podman(&args)?;
    let dt = t0.elapsed();
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(dt)
}

/// Imports `lower` (a rootfs directory) as [`PODMAN_IMAGE`].
pub fn podman_import(lower: &Path) -> Result<(), String> {
    let import = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' -c . | podman import -q - {PODMAN_IMAGE}",
            lower.display()
        ))
        .output();
    match import {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "podman import failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("podman import: {e}")),
    }
}

fn run_podman(lower: &Path, warmup: usize, runs: usize) -> PodmanOutcome {
    if let Err(e) = podman_import(lower) {
        return PodmanOutcome::Skipped(e);
    }
    let prefix = format!("nbbench-podman-{}", std::process::id());
    let mut names = Vec::new();
    // Probe with podman's defaults first, to record whether they work here.
    let probe = format!("{prefix}-probe");
    names.push(probe.clone());
    let (ulimits, note) = match podman_run(&probe, false) {
        Ok(_) => (false, "podman defaults, `--network none`".to_string()),
        Err(e) => {
            let why = format!(
                "with podman's defaults `podman run -d` fails here: \"{e}\" (this sandbox {} \
                 CAP_SYS_RESOURCE, and podman asks runc to raise RLIMIT_NOFILE/RLIMIT_NPROC); \
                 measured with `--ulimit nofile=1024:1024 --ulimit nproc=4096:4096 --network none`",
                if cap_sys_resource() { "has" } else { "lacks" }
            );
            (true, why)
        }
    };
    let mut samples = Vec::new();
    let mut failure = None;
    for i in 0..warmup + runs {
        let name = format!("{prefix}-{i}");
        names.push(name.clone());
        match podman_run(&name, ulimits) {
            Ok(dt) if i >= warmup => samples.push(dt),
            Ok(_) => {}
            Err(e) => {
                failure = Some(format!("{note}; still fails: {e}"));
                break;
            }
        }
    }
    let mut rm = vec!["rm", "-f", "-t", "0"];
    rm.extend(names.iter().map(String::as_str));
    let _ = podman(&rm);
    let _ = podman(&["rmi", "-f", PODMAN_IMAGE]);
    match failure {
        Some(f) => PodmanOutcome::Skipped(f),
        None => PodmanOutcome::Ran { samples, note },
    }
}

/// The instance every benchmark launches: busybox `sleep 3600`, 16M, 0.05 cpus.
pub fn instance_request(name: &str) -> CreateInstanceRequest {
    CreateInstanceRequest {
        name: name.to_string(),
        image: "busybox".into(),
        command: vec!["sleep".into(), "3600".into()],
        memory: Some(json!("16M")),
        cpus: Some(0.05),
        ..Default::default()
    }
}

/// One nimbus launch, all from just before the create call.
struct NimbusLaunch {
    /// To the `Started` event.
    running: Duration,
    /// To the API's 201.
    api: Duration,
    /// To the first HTTP answer from the instance.
    reachable: Option<Duration>,
}

/// Launches instances on a running nimbus one at a time and times each: create -> `Started`
/// event (on an already open follow stream), create -> API 201 answer, and create -> first
/// HTTP answer from the instance's address (polled from the host once the 201 arrived).
struct NimbusLauncher {
    c: nimbus_client::Client,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
    seen: HashMap<String, Instant>,
    watcher: tokio::task::JoinHandle<()>,
    launched: usize,
}

impl NimbusLauncher {
    async fn new(n: &Nimbus) -> anyhow::Result<Self> {
        let c = n.client();
        let after = c
            .events(Some("default"), 0)
            .await?
            .last()
            .map_or(0, |e| e.seq);
        let mut stream = c.follow_events(Some("default"), after).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
        let watcher = tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                let now = Instant::now();
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if let Ok(e) = serde_json::from_slice::<Event>(&line) {
                        if e.kind == "instance" && e.reason == "Started" {
                            let _ = tx.send((e.name, now));
                        }
                    }
                }
            }
        });
        Ok(Self {
            c,
            rx,
            seen: HashMap::new(),
            watcher,
            launched: 0,
        })
    }

    /// Launches `bench-<i>` running busybox httpd.
    async fn launch(&mut self) -> anyhow::Result<NimbusLaunch> {
        let name = format!("bench-{}", self.launched);
        self.launched += 1;
        // Best-effort (no --cpus/--memory, the product's default for containers), as bare
        // runc's default spec has no limits either: a small CPU quota throttles the container's
        // init and httpd while they start (0.05 cpus is 5 ms per 100 ms period).
        let req = CreateInstanceRequest {
            command: httpd(&name),
            cpus: None,
            memory: None,
            ..instance_request(&name)
        };
        let t0 = Instant::now();
        let inst = self.c.create_instance(&req, None).await?;
        let api = t0.elapsed();
        let addr: Ipv4Addr = inst
            .status
            .ip
            .as_deref()
            .with_context(|| format!("{name}: the create answer has no address"))?
            .parse()
            .with_context(|| format!("{name}: address {:?}", inst.status.ip))?;
        let token = name.clone();
        let probe = tokio::spawn(async move {
            first_http_answer(SocketAddr::from((addr, 80)), &token, REACH_TIMEOUT).await
        });
        let deadline = t0 + Duration::from_secs(45);
        let t_run = loop {
            if let Some(t) = self.seen.remove(&name) {
                break t;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some((nm, t))) => {
                    self.seen.insert(nm, t);
                }
                Ok(None) => bail!("event stream ended"),
                Err(_) => {
                    probe.abort();
                    let i = self.c.get_instance(&name).await?;
                    bail!(
                        "{name} not running after 45 s: {:?} {}",
                        i.status.state,
                        i.status.message
                    );
                }
            }
        };
        let reachable = probe.await?.map(|t| t - t0);
        Ok(NimbusLaunch {
            running: t_run - t0,
            api,
            reachable,
        })
    }

    /// Double-checks through GET that every launched instance is running with a PID.
    async fn verify(self) -> anyhow::Result<()> {
        self.watcher.abort();
        for i in 0..self.launched {
            let inst = self.c.get_instance(&format!("bench-{i}")).await?;
            if inst.status.state != InstanceState::Running || inst.status.pid.is_none() {
                bail!(
                    "bench-{i} is {:?} (pid {:?}) after its Started event",
                    inst.status.state,
                    inst.status.pid
                );
            }
        }
        Ok(())
    }
}

/// Medians of the first and the last 10 samples (in launch order).
fn first_last(v: &[Duration]) -> (Duration, Duration) {
    let k = v.len().min(10);
    (Summary::of(&v[..k]).p50, Summary::of(&v[v.len() - k..]).p50)
}

fn line(label: &str, s: &Summary) -> String {
    format!(
        "{label}: n={} median={} ms p90={} ms p99={} ms min={} ms max={} ms",
        s.n,
        ms(s.p50),
        ms(s.p90),
        ms(s.p99),
        ms(s.min),
        ms(s.max)
    )
}

fn row(label: &str, s: &Summary, base: &Summary) -> String {
    format!(
        "| {label} | {} | {} | {} | {} | {} | {} | {:.2}x |",
        s.n,
        ms(s.p50),
        ms(s.p90),
        ms(s.p99),
        ms(s.min),
        ms(s.max),
        ratio(s.p50, base.p50)
    )
}

/// Everything one invocation measured.
struct Results {
    runc_total: Vec<Duration>,
    runc_only: Vec<Duration>,
    runc_reach: Vec<Duration>,
    runc_unreachable: usize,
    nim_run: Vec<Duration>,
    nim_api: Vec<Duration>,
    nim_reach: Vec<Duration>,
    nim_unreachable: usize,
}

/// Bare runc and nimbus alternate launch by launch, so both see the same machine load (this
/// machine is shared; a block of one then a block of the other would compare two loads).
async fn measure(
    opts: &LaunchArgs,
    bare: &mut BareRunc,
    nimbus: &Nimbus,
    out: &mut Results,
) -> anyhow::Result<()> {
    let mut launcher = NimbusLauncher::new(nimbus).await?;
    for i in 0..opts.warmup + opts.runs {
        let baseline = bare.launch(i).await?;
        let launch = launcher.launch().await?;
        if i < opts.warmup {
            continue;
        }
        out.runc_total.push(baseline.total);
        out.runc_only.push(baseline.runc);
        match baseline.reachable {
            Some(t) => out.runc_reach.push(t),
            None => out.runc_unreachable += 1,
        }
        out.nim_run.push(launch.running);
        out.nim_api.push(launch.api);
        match launch.reachable {
            Some(t) => out.nim_reach.push(t),
            None => out.nim_unreachable += 1,
        }
    }
    launcher.verify().await
}

/// Runs the launch benchmark.
pub async fn run(opts: &LaunchArgs) -> anyhow::Result<()> {
    let dir = workdir("nimbus-bench-launch-")?;
    let store = nimbus_image::ImageStore::open(&dir.path().join("images"))?;
    let img = store.build_busybox(Path::new("/bin/busybox"))?;
    let lower = store.unpacked_layer(&img.layers[0])?;

    let podman = if opts.no_podman {
        PodmanOutcome::Skipped("--no-podman given".into())
    } else if !have("podman") {
        PodmanOutcome::Skipped("podman is not installed".into())
    } else {
        eprintln!("podman: {} warm-up + {} launches", opts.warmup, opts.runs);
        run_podman(&lower, opts.warmup, opts.runs)
    };

    eprintln!(
        "bare runc and nimbus, alternating: {} warm-up + {} launches each",
        opts.warmup, opts.runs
    );
    let mut n = Nimbus::start(&opts.nimbus_bin, dir.path())?;
    let mut r = Results {
        runc_total: Vec::new(),
        runc_only: Vec::new(),
        runc_reach: Vec::new(),
        runc_unreachable: 0,
        nim_run: Vec::new(),
        nim_api: Vec::new(),
        nim_reach: Vec::new(),
        nim_unreachable: 0,
    };
    let (res, runc_running) = match BareRunc::new(
        dir.path().join("runc"),
        lower.clone(),
        n.slot.prefix(),
        n.slot.veth_octet(),
    ) {
        Ok(mut bare) => {
            let res = measure(opts, &mut bare, &n, &mut r).await;
            let running = bare.count_running();
            bare.cleanup();
            (res, running)
        }
        Err(e) => (Err(e), 0),
    };
    let cleanup = n.delete_all_instances().await;
    n.stop();
    res?;
    cleanup?;
    report(opts, &r, runc_running, &podman)
}

fn report(
    opts: &LaunchArgs,
    r: &Results,
    runc_running: usize,
    podman: &PodmanOutcome,
) -> anyhow::Result<()> {
    let runc_s = Summary::of(&r.runc_total);
    let runc_only_s = Summary::of(&r.runc_only);
    let runc_reach_s = Summary::of(&r.runc_reach);
    let nim_s = Summary::of(&r.nim_run);
    let api_s = Summary::of(&r.nim_api);
    let reach_s = Summary::of(&r.nim_reach);

    let run_ratio = ratio(nim_s.p50, runc_s.p50);
    let run_ok = run_ratio <= 1.5;
    // An unreachable launch counts as missing the target whatever the others did.
    let reach_ratio = ratio(reach_s.p99, nim_s.p99);
    let reach_ok = r.nim_unreachable == 0 && reach_ratio <= 1.2;
    let trend = format!(
        "median of the first / last 10 measured launches: bare runc {} / {} ms, nimbus {} / {} ms",
        ms(first_last(&r.runc_total).0),
        ms(first_last(&r.runc_total).1),
        ms(first_last(&r.nim_run).0),
        ms(first_last(&r.nim_run).1)
    );
    let total = opts.warmup + opts.runs;
    println!(
        "{} (running: {runc_running}/{total})",
        line(
            "launch bare-runc (overlay mount + config + runc run -d)",
            &runc_s
        )
    );
    println!(
        "{}",
        line("launch bare-runc (runc run -d alone)", &runc_only_s)
    );
    println!(
        "{} unreachable={}",
        line("launch bare-runc create->first HTTP answer", &runc_reach_s),
        r.runc_unreachable
    );
    let podman_s = match podman {
        PodmanOutcome::Ran { samples, note } => {
            let s = Summary::of(samples);
            println!(
                "{} ratio-to-runc={:.2} ({note})",
                line("launch podman run -d", &s),
                ratio(s.p50, runc_s.p50)
            );
            Some(s)
        }
        PodmanOutcome::Skipped(why) => {
            println!("launch podman: SKIPPED: {why}");
            None
        }
    };
    println!(
        "{}",
        line("launch nimbus create->201 (Raft commit)", &api_s)
    );
    println!(
        "{} ratio-to-runc={run_ratio:.2} target<=1.50 {}",
        line("launch nimbus create->Started event", &nim_s),
        if run_ok { "MET" } else { "MISSED" }
    );
    println!(
        "{} unreachable={} p99-ratio-to-running-p99={reach_ratio:.2} target<=1.20 {}",
        line("launch nimbus create->first HTTP answer", &reach_s),
        r.nim_unreachable,
        if reach_ok { "MET" } else { "MISSED" }
    );
    println!("launch trend: {trend}");

    let Some(doc) = &opts.doc else {
        return Ok(());
    };
    let mut b = String::new();
    let _ = writeln!(b, "- Machine: {}.", crate::doc::machine_note());
    let _ = writeln!(b, "- Build: {}.", crate::doc::build_note(&opts.nimbus_bin));
    let _ = writeln!(
        b,
        "- Workload: busybox `httpd -f -p 80` serving a page with the container's name, {} measured launches per configuration after {} \
         unmeasured warm-up launches, one at a time, bare runc and nimbus alternating launch \
         by launch (so both see the same load on this shared machine); containers stay running \
         until the end, then everything is deleted. p99 is nearest-rank (of 60 samples: the \
         largest).",
        opts.runs, opts.warmup
    );
    b.push_str(
        "- What is measured:\n  \
         - nimbus running: from just before `POST /v1/projects/default/instances` (image \
         busybox, best-effort: no CPU or memory limit, like bare runc's default spec) to the moment the client receives the instance's `Started` \
         event on an already open `GET /v1/events?follow=true` stream (committed through Raft \
         when the agent reports `running`). Each instance is re-checked afterwards with GET \
         (state running, pid set).\n  \
         - first HTTP answer: from the same start to the first `200` answer carrying the \
         container's own page, read from the instance's address, polled from the host from the moment the call returned (bare \
         runc: `runc run -d` returned): TCP connect with a 25 ms timeout and `GET / HTTP/1.0`, \
         retried every millisecond.\n  \
         - bare runc: overlay mount of the same unpacked busybox layer (fresh upper/work per \
         container) + writing `config.json` (default `runc spec`, the same httpd command, the \
         network namespace replaced by a pre-made one holding one end of a veth pair, addressed, \
         the other end on the host with its /24 route: made before the timed part) + `runc run \
         -d` until it exits.\n  \
         - podman: wall time of `podman run -d` of the same rootfs imported as an image.\n",
    );
    let _ = writeln!(
        b,
        "\n| configuration | n | median ms | p90 ms | p99 ms | min ms | max ms | median vs bare runc |"
    );
    let _ = writeln!(b, "|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        b,
        "{}",
        row(
            "bare runc (mount + config + `runc run -d`)",
            &runc_s,
            &runc_s
        )
    );
    let _ = writeln!(
        b,
        "{}",
        row("bare runc, `runc run -d` alone", &runc_only_s, &runc_s)
    );
    let _ = writeln!(
        b,
        "{}",
        row(
            "bare runc + static veth, create -> first HTTP answer",
            &runc_reach_s,
            &runc_s
        )
    );
    match podman_s {
        Some(s) => {
            let _ = writeln!(b, "{}", row("podman `run -d`", &s, &runc_s));
        }
        None => {
            let _ = writeln!(b, "| podman `run -d` | skipped | | | | | | |");
        }
    }
    let _ = writeln!(
        b,
        "{}",
        row("nimbus create -> 201 (committed)", &api_s, &runc_s)
    );
    let _ = writeln!(
        b,
        "{}",
        row("**nimbus create -> running**", &nim_s, &runc_s)
    );
    let _ = writeln!(
        b,
        "{}",
        row("**nimbus create -> first HTTP answer**", &reach_s, &runc_s)
    );
    let _ = writeln!(b);
    match podman {
        PodmanOutcome::Ran { note, .. } => {
            let _ = writeln!(b, "Podman: {note}.");
        }
        PodmanOutcome::Skipped(why) => {
            let _ = writeln!(b, "Podman skipped: {why}.");
        }
    }
    let _ = writeln!(
        b,
        "\nUnreachable within {} s: nimbus {}, bare runc {} (left out of the figures above).",
        REACH_TIMEOUT.as_secs(),
        r.nim_unreachable,
        r.runc_unreachable
    );
    let _ = writeln!(
        b,
        "\nAs containers accumulate ({} already running at the last launch), {trend}.",
        total - 1
    );
    let _ = writeln!(
        b,
        "\nTargets: create -> running median <= 1.5x bare runc: {run_ratio:.2}x, {}. Create -> \
         first HTTP answer p99 <= 1.2x create -> running p99: {reach_ratio:.2}x ({} / {} ms){}, {}.",
        crate::doc::verdict(run_ok),
        ms(reach_s.p99),
        ms(nim_s.p99),
        if r.nim_unreachable > 0 {
            format!(" with {} launches unreachable", r.nim_unreachable)
        } else {
            String::new()
        },
        crate::doc::verdict(reach_ok)
    );
    let date = crate::doc::today();
    let rows = [
        crate::doc::Row {
            metric: "Launch: create -> running, median (`bench-launch`)".into(),
            target: "<= 1.5x bare runc".into(),
            result: format!(
                "{} ms (bare runc {} ms), n={}",
                ms(nim_s.p50),
                ms(runc_s.p50),
                nim_s.n
            ),
            ratio: format!("{run_ratio:.2}x"),
            verdict: crate::doc::verdict(run_ok),
            date: date.clone(),
        },
        crate::doc::Row {
            metric: "Launch: create -> first HTTP answer, p99 (`bench-launch`)".into(),
            target: "<= 1.2x create -> running p99".into(),
            result: format!(
                "p99 {} ms, p50 {} ms, n={}; running p99 {} ms; bare runc + veth p99 {} ms{}",
                ms(reach_s.p99),
                ms(reach_s.p50),
                reach_s.n,
                ms(nim_s.p99),
                ms(runc_reach_s.p99),
                if r.nim_unreachable > 0 {
                    format!("; {} unreachable after 30 s", r.nim_unreachable)
                } else {
                    String::new()
                }
            ),
            ratio: format!("{reach_ratio:.2}x"),
            verdict: crate::doc::verdict(reach_ok),
            date,
        },
    ];
    crate::doc::record(&crate::doc::Record {
        doc,
        script: "bench-launch",
        heading: "## Launch latency",
        command: &opts.command,
        body: &b,
        rows: &rows,
    })
}
