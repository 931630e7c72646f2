//! `nimbus-bench scale`: the control plane at fleet scale, on this machine.
//!
//! For each node count: one `nimbus server` (the server of `nimbus up`, single voter, without
//! its local agent) and hollow-node fleets (`nimbus agent --hollow --hollow-count K`, several
//! processes of at most `--per-process` nodes, each one connection over the batched fleet
//! protocol). Measured, in order:
//!
//! - **ready**: from starting the fleets to every node registered and ready;
//! - **idle**: over `--idle-secs` with nothing to do, Raft commits per second (the applied
//!   index, `GET /v1/cluster`) and the server's CPU (user+system time from `/proc`, % of one
//!   core), with every node heartbeating every 2 s;
//! - **creates**: `--instances` creates from `--clients` concurrent API clients, spread over
//!   projects (a project's default network is a /24), best-effort containers; creates/s and
//!   p50/p99 per phase of 25 %, while a sampler reads a 500-item list page and single
//!   instances once a second (p50/p99);
//! - **idle at that state**, again;
//! - **memory**: the server's RSS before and after the creates, and bytes per instance;
//! - **open files** of the server at the end;
//! - **restart**: SIGKILL the server, start it again on the same data, time until it prints
//!   ready and answers a linearizable read;
//! - **nodes wrongly marked down**: `marking node down` lines in the server's log (nothing
//!   fails in this benchmark, so every one is wrong), restart included.
//!
//! The baseline is the same measurement at `--baseline-nodes` (100): creates/s at scale
//! is reported as a ratio of it. `--smoke`: a few nodes and instances, to prove it runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nimbus_api::{CreateInstanceRequest, NodeState};
use nimbus_client::Client;

use crate::harness::{free_port, wait_ready, workdir, KillOnDrop};
use crate::stats::{ms, Summary};

/// Options.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The nimbus binary.
    #[arg(long, default_value = "target/release/nimbus")]
    pub nimbus_bin: PathBuf,
    /// Node counts to measure, comma-separated (the baseline is added).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    pub nodes: Vec<u32>,
    /// The baseline node count.
    #[arg(long, default_value_t = 100)]
    pub baseline_nodes: u32,
    /// Instances created at the largest node count.
    #[arg(long, default_value_t = 100_000)]
    pub instances: usize,
    /// Instances created at the other node counts (and the baseline).
    #[arg(long, default_value_t = 5_000)]
    pub instances_small: usize,
    /// Concurrent API clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Hollow nodes per agent process.
    #[arg(long, default_value_t = 2_500)]
    pub per_process: u32,
    /// Seconds of each idle measurement.
    #[arg(long, default_value_t = 20)]
    pub idle_secs: u64,
    /// A few nodes and instances, to check the benchmark works (CI).
    #[arg(long)]
    pub smoke: bool,
    /// Rewrite this document's "## Scale" section.
    #[arg(long)]
    pub doc: Option<PathBuf>,
    /// The command line to record in the document.
    #[arg(long, default_value = "scripts/bench-scale")]
    pub command: String,
}

struct Server {
    proc: Option<KillOnDrop>,
    url: String,
    port: u16,
    dir: PathBuf,
}

impl Server {
    fn spawn(bin: &Path, dir: &Path, port: u16) -> anyhow::Result<KillOnDrop> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))?;
        let mut child = Command::new(bin)
            .args(["server", "--data-dir"])
            .arg(dir.join("server"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--insecure")
            // Room for 65,536 project networks of a /24.
            .args(["--net-prefix", "nbscl", "--network-pool", "10.0.0.0/8"])
            .env("NIMBUS_LOG", "info,openraft=warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        wait_ready(&mut child, "nimbus server", Duration::from_secs(600))?;
        Ok(KillOnDrop(child))
    }

    fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        let port = free_port()?;
        Ok(Self {
            proc: Some(Self::spawn(bin, dir, port)?),
            url: format!("http://127.0.0.1:{port}"),
            port,
            dir: dir.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, |p| p.0.id())
    }

    fn token(&self) -> anyhow::Result<String> {
        Ok(
            std::fs::read_to_string(self.dir.join("server").join("admin.token"))?
                .trim()
                .to_owned(),
        )
    }

    /// SIGKILL, then start again on the same data; the time until it is ready and answers.
    async fn restart(&mut self, bin: &Path, c: &Client) -> anyhow::Result<Duration> {
        drop(self.proc.take());
        let t = Instant::now();
        self.proc = Some(Self::spawn(bin, &self.dir, self.port)?);
        c.list_nodes().await?;
        Ok(t.elapsed())
    }

    fn marked_down(&self) -> usize {
        std::fs::read_to_string(self.dir.join("server.log"))
            .unwrap_or_default()
            .matches("marking node down")
            .count()
    }
}

/// CPU time (user + system) of a process, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based) of the whole line: 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_bytes(pid: u32) -> u64 {
    crate::harness::rss_kib(pid).map_or(0, |(rss, _)| rss * 1024)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Commits per second and server CPU (% of a core) over `secs` of rest.
async fn idle(c: &Client, pid: u32, secs: u64) -> anyhow::Result<(f64, f64)> {
    let i0 = c.cluster_info().await?.applied_index;
    let c0 = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let i1 = c.cluster_info().await?.applied_index;
    let c1 = cpu_secs(pid);
    Ok((
        (i1 - i0) as f64 / secs as f64,
        (c1 - c0) / secs as f64 * 100.0,
    ))
}

/// One node count's results.
#[derive(Debug, Clone, Default)]
pub struct Row {
    nodes: u32,
    ready: Duration,
    idle_commits: f64,
    idle_cpu: f64,
    instances: usize,
    /// (from, to, creates/s, p50, p99) per phase.
    phases: Vec<(usize, usize, f64, Duration, Duration)>,
    creates_per_s: f64,
    create: Option<Summary>,
    list: Option<Summary>,
    get: Option<Summary>,
    idle_full_commits: f64,
    idle_full_cpu: f64,
    rss_empty: u64,
    rss_full: u64,
    open_files: usize,
    restart: Duration,
    marked_down: usize,
}

fn fleet_sizes(nodes: u32, per: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut left = nodes;
    while left > 0 {
        let k = left.min(per.max(1));
        out.push(k);
        left -= k;
    }
    out
}

async fn measure(args: &ScaleArgs, nodes: u32, instances: usize) -> anyhow::Result<Row> {
    let dir = workdir("nimbus-bench-scale-")?;
    let mut server = Server::start(&args.nimbus_bin, dir.path())?;
    let api = Client::new(&server.url, &server.token()?, "default");
    let started = Instant::now();
    let mut fleets = Vec::new();
    for (k, n) in fleet_sizes(nodes, args.per_process).into_iter().enumerate() {
        let mut child = Command::new(&args.nimbus_bin)
            .args([
                "agent",
                "--hollow",
                "--name",
                &format!("h{k}"),
                "--hollow-count",
            ])
            .arg(n.to_string())
            .args(["--hollow-cpus", "64", "--hollow-memory", "256G"])
            .args(["--server", &server.url, "--token-file"])
            .arg(dir.path().join("server").join("node.token"))
            .arg("--data-dir")
            .arg(dir.path().join(format!("hollow{k}")))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(
                dir.path().join(format!("hollow{k}.log")),
            )?)
            .spawn()?;
        wait_ready(
            &mut child,
            "nimbus agent --hollow",
            Duration::from_secs(600),
        )?;
        fleets.push(KillOnDrop(child));
    }
    loop {
        let all = api.list_nodes().await?;
        let ready = all.iter().filter(|n| n.state == NodeState::Ready).count();
        if ready == nodes as usize && api.list_images().await.is_ok_and(|i| !i.is_empty()) {
            break;
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("only {ready} of {nodes} hollow nodes ready after 900 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut row = Row {
        nodes,
        ready: started.elapsed(),
        instances,
        ..Row::default()
    };
    (row.idle_commits, row.idle_cpu) = idle(&api, server.pid(), args.idle_secs).await?;
    row.rss_empty = rss_bytes(server.pid());
    // A project per 200 instances: each gets its default /24 network.
    let projects = instances.div_ceil(200).max(1);
    for p in 0..projects {
        api.create_project(&format!("p{p}")).await?;
    }
    let done = Arc::new(AtomicUsize::new(0));
    let sampling = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let sampler = {
        let (api, done, sampling) = (api.clone(), done.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut tick = 0usize;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tick += 1;
                let n = done.load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
                let t = Instant::now();
                let ok = api
                    .list_page::<nimbus_api::Instance>("/v1/projects/p0/instances?limit=500")
                    .await
                    .is_ok();
                if ok {
                    sampling.lock().expect("samples").0.push(t.elapsed());
                }
                // Some instance already created.
                let k = (tick * 7919) % n;
                let t = Instant::now();
                if api
                    .with_project(format!("p{}", k % projects))
                    .get_instance(&format!("i{k}"))
                    .await
                    .is_ok()
                {
                    sampling.lock().expect("samples").1.push(t.elapsed());
                }
            }
        })
    };
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(instances)));
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| {
            let (api, next, done, lat) =
                (api.clone(), next.clone(), done.clone(), latencies.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= instances {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let req = CreateInstanceRequest {
                        name: format!("i{i}"),
                        image: "busybox".into(),
                        command: vec!["sleep".into(), "3600".into()],
                        ..Default::default()
                    };
                    let p = api.with_project(format!("p{}", i % projects));
                    let t = Instant::now();
                    let mut tries = 0;
                    loop {
                        match p.create_instance(&req, Some(&format!("k{i}"))).await {
                            Ok(_) => break,
                            // Honest back-pressure: retry after a pause.
                            Err(nimbus_client::ClientError::Api(e))
                                if e.code == nimbus_api::ErrorCode::Unavailable && tries < 20 =>
                            {
                                tries += 1;
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    let elapsed = t.elapsed();
                    lat.lock()
                        .expect("latencies")
                        .push((Instant::now(), elapsed));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let total = t0.elapsed();
    sampler.abort();
    row.creates_per_s = instances as f64 / total.as_secs_f64();
    let mut lat = std::mem::take(&mut *latencies.lock().expect("latencies"));
    lat.sort_by_key(|(at, _)| *at);
    row.create = Some(Summary::of(
        &lat.iter().map(|(_, d)| *d).collect::<Vec<_>>(),
    ));
    for q in 0..4 {
        let (from, to) = (instances * q / 4, instances * (q + 1) / 4);
        if to <= from {
            continue;
        }
        let part = &lat[from..to];
        let span = part.last().map_or(t0, |l| l.0) - if from == 0 { t0 } else { lat[from - 1].0 };
        let s = Summary::of(&part.iter().map(|(_, d)| *d).collect::<Vec<_>>());
        row.phases.push((
            from,
            to,
            (to - from) as f64 / span.as_secs_f64(),
            s.p50,
            s.p99,
        ));
    }
    let (lists, gets) = std::mem::take(&mut *sampling.lock().expect("samples"));
    row.list = (!lists.is_empty()).then(|| Summary::of(&lists));
    row.get = (!gets.is_empty()).then(|| Summary::of(&gets));
    row.rss_full = rss_bytes(server.pid());
    row.open_files = open_files(server.pid());
    (row.idle_full_commits, row.idle_full_cpu) = idle(&api, server.pid(), args.idle_secs).await?;
    row.restart = server.restart(&args.nimbus_bin, &api).await?;
    // Give the restarted server a full lease period: nobody may be marked down.
    tokio::time::sleep(Duration::from_secs(12)).await;
    row.marked_down = server.marked_down();
    drop(fleets);
    drop(server);
    Ok(row)
}

fn print(row: &Row) {
    let opt = |s: &Option<Summary>| {
        s.map_or_else(|| "-".into(), |s| format!("{}/{}", ms(s.p50), ms(s.p99)))
    };
    println!(
        "nodes={} ready={:.1}s idle: {:.1} commits/s {:.1}% cpu; creates={} {:.0}/s create p50/p99={}ms list(500) p50/p99={}ms get p50/p99={}ms; idle at {}: {:.1} commits/s {:.1}% cpu; rss {:.0}->{:.0} MiB = {:.0} B/instance; open files {}; restart {:.2}s; marked down {}",
        row.nodes,
        row.ready.as_secs_f64(),
        row.idle_commits,
        row.idle_cpu,
        row.instances,
        row.creates_per_s,
        opt(&row.create),
        opt(&row.list),
        opt(&row.get),
        row.instances,
        row.idle_full_commits,
        row.idle_full_cpu,
        row.rss_empty as f64 / 1_048_576.0,
        row.rss_full as f64 / 1_048_576.0,
        per_instance(row),
        row.open_files,
        row.restart.as_secs_f64(),
        row.marked_down
    );
    for (from, to, rate, p50, p99) in &row.phases {
        println!(
            "  creates {from}..{to}: {rate:.0}/s p50 {}ms p99 {}ms",
            ms(*p50),
            ms(*p99)
        );
    }
}

fn per_instance(row: &Row) -> f64 {
    (row.rss_full as f64 - row.rss_empty as f64) / row.instances.max(1) as f64
}

/// Runs the benchmark.
pub async fn run(a: &ScaleArgs) -> anyhow::Result<()> {
    let (counts, big, small, baseline) = if a.smoke {
        (vec![40], 300, 300, 10)
    } else {
        (
            a.nodes.clone(),
            a.instances,
            a.instances_small,
            a.baseline_nodes,
        )
    };
    let base = measure(a, baseline, small).await?;
    print(&base);
    let largest = counts.iter().copied().max().unwrap_or(0);
    let mut rows = vec![base.clone()];
    for n in counts {
        let row = measure(a, n, if n == largest { big } else { small }).await?;
        print(&row);
        println!(
            "  creates/s vs {} nodes: {:.2}x",
            base.nodes,
            row.creates_per_s / base.creates_per_s
        );
        rows.push(row);
    }
    if let Some(doc) = a.doc.as_ref().filter(|_| !a.smoke) {
        crate::doc::record(&crate::doc::Record {
            doc,
            script: "bench-scale",
            heading: "## Scale",
            command: &a.command,
            body: &section(a, &rows),
            rows: &headline(&rows),
        })?;
    }
    Ok(())
}

/// The headline rows: the issue-14 targets at the largest fleet.
fn headline(rows: &[Row]) -> Vec<crate::doc::Row> {
    let (Some(base), Some(top)) = (rows.first(), rows.last()) else {
        return Vec::new();
    };
    let date = crate::doc::today();
    let at = format!("{} nodes, {} instances", top.nodes, top.instances);
    let p99 = |s: &Option<Summary>| s.map_or(f64::INFINITY, |s| s.p99.as_secs_f64() * 1000.0);
    let (create, list, get) = (p99(&top.create), p99(&top.list), p99(&top.get));
    let per_instance = per_instance(top);
    let ratio = top.creates_per_s / base.creates_per_s;
    let row =
        |metric: &str, target: &str, result: String, ratio: String, met: bool| crate::doc::Row {
            metric: format!("Scale: {metric} (`bench-scale`)"),
            target: target.into(),
            result,
            ratio,
            verdict: crate::doc::verdict(met),
            date: date.clone(),
        };
    vec![
        row(
            "API p99 at the largest fleet, create / 500-item list page / get",
            "<= 1 s each",
            format!("{create:.0} / {list:.0} / {get:.0} ms at {at}"),
            String::new(),
            create <= 1000.0 && list <= 1000.0 && get <= 1000.0,
        ),
        row(
            "idle server at the largest fleet, CPU and Raft commits/s",
            "< 25 % of a core, < 50 commits/s",
            format!(
                "{:.1} %, {:.1} commits/s at {} nodes",
                top.idle_cpu, top.idle_commits, top.nodes
            ),
            String::new(),
            top.idle_cpu < 25.0 && top.idle_commits < 50.0,
        ),
        row(
            "creates/s at the largest fleet vs the baseline fleet, 32 clients",
            ">= 0.5x",
            format!(
                "{:.0}/s ({} nodes: {:.0}/s)",
                top.creates_per_s, base.nodes, base.creates_per_s
            ),
            format!("{ratio:.2}x"),
            ratio >= 0.5,
        ),
        row(
            "server RSS per instance",
            "<= 2 KiB",
            format!("{per_instance:.0} B at {at}"),
            String::new(),
            per_instance <= 2048.0,
        ),
        row(
            "server restart to ready with that state",
            "< 10 s",
            format!("{:.2} s at {at}", top.restart.as_secs_f64()),
            String::new(),
            top.restart < Duration::from_secs(10),
        ),
        row(
            "nodes wrongly marked down",
            "0",
            rows.iter()
                .map(|r| format!("{} at {} nodes", r.marked_down, r.nodes))
                .collect::<Vec<_>>()
                .join(", "),
            String::new(),
            rows.iter().all(|r| r.marked_down == 0),
        ),
    ]
}

fn section(a: &ScaleArgs, rows: &[Row]) -> String {
    let base = &rows[0];
    let opt = |s: &Option<Summary>| {
        s.map_or_else(|| "-".into(), |s| format!("{} / {}", ms(s.p50), ms(s.p99)))
    };
    let mut t = format!(
        "- Machine: {}\n- Build: {}\n- Workload: one `nimbus server` (single voter, no local agent) and hollow-node fleets of at most {} nodes per process (`nimbus agent --hollow`, batched fleet protocol, heartbeats every 2 s); {} concurrent API clients create best-effort busybox containers spread over projects of 200; a sampler reads a 500-item list page and one instance per second during the creates. Restart: SIGKILL, then the same data.\n\n",
        crate::doc::machine_note(),
        crate::doc::build_note(&a.nimbus_bin),
        a.per_process,
        a.clients,
    );
    t.push_str("| nodes | ready s | idle commits/s | idle CPU % | instances | creates/s (vs baseline) | create p50 / p99 ms | list 500 p50 / p99 ms | get p50 / p99 ms | idle at that state: commits/s, CPU % | RSS empty -> full MiB | B / instance | open files | restart s | wrongly down |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {:.1} | {:.1} | {:.1} | {} | {:.0} ({:.2}x) | {} | {} | {} | {:.1}, {:.1} | {:.0} -> {:.0} | {:.0} | {} | {:.2} | {} |",
            r.nodes,
            r.ready.as_secs_f64(),
            r.idle_commits,
            r.idle_cpu,
            r.instances,
            r.creates_per_s,
            r.creates_per_s / base.creates_per_s,
            opt(&r.create),
            opt(&r.list),
            opt(&r.get),
            r.idle_full_commits,
            r.idle_full_cpu,
            r.rss_empty as f64 / 1_048_576.0,
            r.rss_full as f64 / 1_048_576.0,
            per_instance(r),
            r.open_files,
            r.restart.as_secs_f64(),
            r.marked_down
        );
    }
    if let Some(big) = rows.iter().max_by_key(|r| r.instances) {
        t.push_str("\nCreates by phase at the largest run:\n\n| instances | creates/s | p50 ms | p99 ms |\n|---|---|---|---|\n");
        for (from, to, rate, p50, p99) in &big.phases {
            let _ = writeln!(
                t,
                "| {from}..{to} | {rate:.0} | {} | {} |",
                ms(*p50),
                ms(*p99)
            );
        }
    }
    t
}
