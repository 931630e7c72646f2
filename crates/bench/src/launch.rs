//! Launch latency: API create -> container process running, against bare `runc run -d` and
//! (when it can run here) `podman run -d` of the same rootfs.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use nimbus_api::{CreateInstanceRequest, Event, InstanceState};
use serde_json::json;

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

/// Bare runc: one overlay-mounted bundle per container, config from `runc spec`.
struct BareRunc {
    dir: PathBuf,
    lower: PathBuf,
    template: serde_json::Value,
    started: Vec<(String, PathBuf)>,
}

impl BareRunc {
    fn new(dir: PathBuf, lower: PathBuf) -> anyhow::Result<Self> {
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
            started: Vec::new(),
        })
    }

    /// Returns (overlay mount + config.json + `runc run -d`, `runc run -d` alone).
    fn launch(&mut self, i: usize) -> anyhow::Result<(Duration, Duration)> {
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
        cfg["process"]["args"] = json!(["sleep", "3600"]);
        cfg["process"]["terminal"] = json!(false);
        cfg["hostname"] = json!(id);
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
        Ok((t2 - t0, t2 - t1))
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

/// Launches instances on a running nimbus one at a time and times each: create -> `Started`
/// event (on an already open follow stream) and create -> API 201 answer.
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

    /// Launches `bench-<i>`; returns (create -> `Started` event, create -> 201).
    async fn launch(&mut self) -> anyhow::Result<(Duration, Duration)> {
        let name = format!("bench-{}", self.launched);
        self.launched += 1;
        let t0 = Instant::now();
        self.c
            .create_instance(&instance_request(&name), None)
            .await?;
        let t_api = t0.elapsed();
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
                    let i = self.c.get_instance(&name).await?;
                    bail!(
                        "{name} not running after 45 s: {:?} {}",
                        i.status.state,
                        i.status.message
                    );
                }
            }
        };
        Ok((t_run - t0, t_api))
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
        "{label}: n={} median={} ms p90={} ms min={} ms max={} ms",
        s.n,
        ms(s.p50),
        ms(s.p90),
        ms(s.min),
        ms(s.max)
    )
}

fn row(label: &str, s: &Summary, base: &Summary) -> String {
    format!(
        "| {label} | {} | {} | {} | {} | {} | {:.2}x |",
        s.n,
        ms(s.p50),
        ms(s.p90),
        ms(s.min),
        ms(s.max),
        ratio(s.p50, base.p50)
    )
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

    // Bare runc and nimbus alternate launch by launch, so both see the same machine load (this
    // machine is shared; a block of one then a block of the other would compare two loads).
    eprintln!(
        "bare runc and nimbus, alternating: {} warm-up + {} launches each",
        opts.warmup, opts.runs
    );
    let mut bare = BareRunc::new(dir.path().join("runc"), lower.clone())?;
    let mut n = Nimbus::start(&opts.nimbus_bin, dir.path())?;
    let (mut runc_total, mut runc_only) = (Vec::new(), Vec::new());
    let (mut nim_run, mut nim_api) = (Vec::new(), Vec::new());
    let res: anyhow::Result<()> = async {
        let mut launcher = NimbusLauncher::new(&n).await?;
        for i in 0..opts.warmup + opts.runs {
            let (t, r) = bare.launch(i)?;
            let (run, api) = launcher.launch().await?;
            if i >= opts.warmup {
                runc_total.push(t);
                runc_only.push(r);
                nim_run.push(run);
                nim_api.push(api);
            }
        }
        launcher.verify().await
    }
    .await;
    let runc_running = bare.count_running();
    bare.cleanup();
    let cleanup = n.delete_all_instances().await;
    n.stop();
    res?;
    cleanup?;
    let runc_s = Summary::of(&runc_total);
    let runc_only_s = Summary::of(&runc_only);
    let nim_s = Summary::of(&nim_run);
    let api_s = Summary::of(&nim_api);

    let r = ratio(nim_s.p50, runc_s.p50);
    let trend = format!(
        "median of the first / last 10 measured launches: bare runc {} / {} ms, nimbus {} / {} ms",
        ms(first_last(&runc_total).0),
        ms(first_last(&runc_total).1),
        ms(first_last(&nim_run).0),
        ms(first_last(&nim_run).1)
    );
    println!(
        "{} (running: {runc_running}/{})",
        line(
            "launch bare-runc (overlay mount + config + runc run -d)",
            &runc_s
        ),
        opts.warmup + opts.runs
    );
    println!(
        "{}",
        line("launch bare-runc (runc run -d alone)", &runc_only_s)
    );
    let podman_s = match &podman {
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
        "{} ratio-to-runc={r:.2} target<=1.50 {}",
        line("launch nimbus create->Started event", &nim_s),
        if r <= 1.5 { "MET" } else { "MISSED" }
    );
    println!("launch trend: {trend}");

    if let Some(doc) = &opts.doc {
        let mut b = String::new();
        let _ = writeln!(b, "- Command: `{}`", opts.command);
        let _ = writeln!(b, "- Date: {}", crate::doc::now());
        let _ = writeln!(b, "- Machine: {}.", crate::doc::machine_note());
        let _ = writeln!(b, "- Build: {}.", crate::doc::build_note(&opts.nimbus_bin));
        let _ = writeln!(
            b,
            "- Workload: busybox `sleep 3600`, {} measured launches per configuration after {} \
             unmeasured warm-up launches, one at a time, bare runc and nimbus alternating launch \
             by launch (so both see the same load on this shared machine); containers stay running \
             until the end, then everything is deleted.",
            opts.runs, opts.warmup
        );
        b.push_str(
            "- What is measured:\n  \
             - nimbus: from just before `POST /v1/projects/default/instances` (image busybox, 16M, \
             0.05 cpus) to the moment the client receives the instance's `Started` event on an \
             already open `GET /v1/events?follow=true` stream. That event is committed through Raft \
             when the agent reports the state `running` with the init PID, i.e. after `runc start` \
             returned and the report was fsynced. Each instance is re-checked afterwards with GET \
             (state running, pid set).\n  \
             - bare runc: overlay mount of the same unpacked busybox layer (fresh upper/work per \
             container) + writing `config.json` (default `runc spec`: new pid, net, ipc, uts, mount \
             namespaces; args `sleep 3600`, no terminal) + `runc run -d` until it exits (the \
             container process is started when it returns).\n  \
             - podman: wall time of `podman run -d` of the same rootfs imported as an image.\n",
        );
        let _ = writeln!(
            b,
            "\n| configuration | n | median ms | p90 ms | min ms | max ms | median vs bare runc |"
        );
        let _ = writeln!(b, "|---|---|---|---|---|---|---|");
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
        match (&podman, &podman_s) {
            (PodmanOutcome::Ran { .. }, Some(s)) => {
                let _ = writeln!(b, "{}", row("podman `run -d`", s, &runc_s));
            }
            _ => {
                let _ = writeln!(b, "| podman `run -d` | skipped | | | | | |");
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
        let _ = writeln!(b);
        match &podman {
            PodmanOutcome::Ran { note, .. } => {
                let _ = writeln!(b, "Podman: {note}.");
            }
            PodmanOutcome::Skipped(why) => {
                let _ = writeln!(b, "Podman skipped: {why}.");
            }
        }
        let _ = writeln!(
            b,
            "\nAs containers accumulate ({} already running at the last launch), {trend}.",
            opts.warmup + opts.runs - 1
        );
        let _ = writeln!(
            b,
            "\nTarget: nimbus median <= 1.5x bare runc. Result: {r:.2}x, **{}**.",
            if r <= 1.5 { "met" } else { "missed" }
        );
        crate::doc::update_section(doc, "## Launch latency", &b)?;
    }
    Ok(())
}
