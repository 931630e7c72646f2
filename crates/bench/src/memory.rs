//! Resident memory of `nimbus up` with many running containers, and of the per-container
//! `nimbus shim` processes; podman's per-container `conmon` as the baseline.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use nimbus_api::InstanceState;

use crate::harness::{pids_matching, pss_kib, rss_kib, workdir, Nimbus};
use crate::launch::{have, instance_request, podman, podman_import, podman_run, PODMAN_IMAGE};

/// Options of `nimbus-bench memory`.
#[derive(Debug, clap::Args)]
pub struct MemoryArgs {
    /// The product binary.
    #[arg(long, default_value = "target/release/nimbus")]
    pub nimbus_bin: PathBuf,
    /// Running containers.
    #[arg(long, default_value_t = 100)]
    pub containers: usize,
    /// Podman containers for the conmon baseline (0: skip).
    #[arg(long, default_value_t = 20)]
    pub podman_containers: usize,
    /// Seconds to let things settle before reading memory.
    #[arg(long, default_value_t = 10)]
    pub settle: u64,
    /// Update this markdown file's "## Resident memory" section.
    #[arg(long)]
    pub doc: Option<PathBuf>,
    /// The command line to quote in the document.
    #[arg(long, default_value = "scripts/bench-memory")]
    pub command: String,
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn median(v: &[u64]) -> u64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

/// Per-process figures of a group of helper processes.
struct Group {
    count: usize,
    rss_median: u64,
    rss_total: u64,
    pss_total: u64,
}

fn group(pids: &[u32]) -> Group {
    let rss: Vec<u64> = pids
        .iter()
        .filter_map(|p| rss_kib(*p))
        .map(|r| r.0)
        .collect();
    Group {
        count: rss.len(),
        rss_median: median(&rss),
        rss_total: rss.iter().sum(),
        pss_total: pids.iter().filter_map(|p| pss_kib(*p)).sum(),
    }
}

struct NimbusMem {
    idle: (u64, u64),
    loaded: (u64, u64),
    shims: Group,
    running: usize,
}

async fn run_nimbus(opts: &MemoryArgs, dir: &Path) -> anyhow::Result<NimbusMem> {
    let mut n = Nimbus::start(&opts.nimbus_bin, dir)?;
    let res = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = rss_kib(n.pid()).unwrap_or_default();
        let c = n.client();
        let names: Vec<String> = (0..opts.containers).map(|i| format!("mem-{i}")).collect();
        for chunk in names.chunks(8) {
            let results = futures::future::join_all(
                chunk
                    .iter()
                    .map(|nm| async { c.create_instance(&instance_request(nm), None).await }),
            )
            .await;
            for r in results {
                r?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(280);
        let running = loop {
            let list = c.list_instances().await?;
            let running = list
                .iter()
                .filter(|i| i.status.state == InstanceState::Running)
                .count();
            if let Some(f) = list
                .iter()
                .find(|i| i.status.state == InstanceState::Failed)
            {
                bail!("{} failed: {}", f.meta.name, f.status.message);
            }
            if running == opts.containers {
                break running;
            }
            if Instant::now() > deadline {
                bail!("only {running}/{} running after 280 s", opts.containers);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        eprintln!("{running} containers running; settling {} s", opts.settle);
        tokio::time::sleep(Duration::from_secs(opts.settle)).await;
        let loaded = rss_kib(n.pid()).unwrap_or_default();
        let data = n.data_dir.display().to_string();
        let shims = group(&pids_matching(|args| {
            args.get(1).is_some_and(|a| a == "shim") && args.iter().any(|x| x.contains(&data))
        }));
        anyhow::Ok(NimbusMem {
            idle,
            loaded,
            shims,
            running,
        })
    }
    .await;
    let cleanup = n.delete_all_instances().await;
    n.stop();
    let r = res?;
    cleanup?;
    Ok(r)
}

/// Starts `count` podman containers and measures their conmon processes.
fn run_podman(lower: &Path, count: usize) -> Result<Group, String> {
    podman_import(lower)?;
    let prefix = format!("nbbench-mem-{}", std::process::id());
    let mut names = Vec::new();
    let mut ulimits = false;
    let mut err = None;
    for i in 0..count {
        let name = format!("{prefix}-{i}");
        names.push(name.clone());
        let mut r = podman_run(&name, ulimits);
        if r.is_err() && i == 0 && !ulimits {
            // Same workaround as the launch benchmark (no CAP_SYS_RESOURCE here).
            let _ = podman(&["rm", "-f", "-t", "0", &name]);
            ulimits = true;
            r = podman_run(&name, true);
        }
        if let Err(e) = r {
            err = Some(e.to_string());
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let pids: Vec<u32> = names
        .iter()
        .filter_map(|n| {
            podman(&["inspect", "--format", "{{.State.ConmonPid}}", n])
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        })
        .collect();
    let g = group(&pids);
    let mut rm = vec!["rm", "-f", "-t", "0"];
    rm.extend(names.iter().map(String::as_str));
    let _ = podman(&rm);
    let _ = podman(&["rmi", "-f", PODMAN_IMAGE]);
    match err {
        Some(e) => Err(e),
        None => Ok(g),
    }
}

/// Runs the memory benchmark.
pub async fn run(opts: &MemoryArgs) -> anyhow::Result<()> {
    let dir = workdir("nimbus-bench-memory-")?;
    let podman_res = if opts.podman_containers == 0 {
        Err("--podman-containers 0".to_string())
    } else if !have("podman") {
        Err("podman is not installed".to_string())
    } else {
        let store = nimbus_image::ImageStore::open(&dir.path().join("images"))?;
        let img = store.build_busybox(Path::new("/bin/busybox"))?;
        let lower = store.unpacked_layer(&img.layers[0])?;
        eprintln!("podman: {} containers", opts.podman_containers);
        run_podman(&lower, opts.podman_containers)
    };
    eprintln!("nimbus: {} containers", opts.containers);
    let m = run_nimbus(opts, dir.path()).await?;

    let target_ok = m.loaded.0 < 60 * 1024;
    match &podman_res {
        Ok(g) => println!(
            "memory podman conmon (baseline): {} processes, median VmRSS {} MiB each, total VmRSS {} MiB, total PSS {} MiB",
            g.count,
            mib(g.rss_median),
            mib(g.rss_total),
            mib(g.pss_total)
        ),
        Err(e) => println!("memory podman conmon: SKIPPED: {e}"),
    }
    println!(
        "memory nimbus up: idle VmRSS {} MiB; with {} running containers VmRSS {} MiB (peak VmHWM {} MiB) target<60 MiB {}",
        mib(m.idle.0),
        m.running,
        mib(m.loaded.0),
        mib(m.loaded.1),
        if target_ok { "MET" } else { "MISSED" }
    );
    println!(
        "memory nimbus shims: {} processes, median VmRSS {} MiB each, total VmRSS {} MiB, total PSS {} MiB",
        m.shims.count,
        mib(m.shims.rss_median),
        mib(m.shims.rss_total),
        mib(m.shims.pss_total)
    );

    if let Some(doc) = &opts.doc {
        let mut b = String::new();
        let _ = writeln!(b, "- Machine: {}.", crate::doc::machine_note());
        let _ = writeln!(b, "- Build: {}.", crate::doc::build_note(&opts.nimbus_bin));
        let _ = writeln!(
            b,
            "- What is measured: `VmRSS` from `/proc/PID/status` of the `nimbus up` process (server, \
             Raft, REST API and node agent in one process) {} s after {} busybox `sleep 3600` \
             instances (16M, 0.05 cpus) reported `running`, and 3 s after start with no instance \
             (idle). Each container also has its own `nimbus shim` process (holds the container's \
             stdio and reaps it); those are reported separately, with VmRSS per process and the sum \
             of PSS (`/proc/PID/smaps_rollup`), which splits pages shared between the shims (the \
             same executable) fairly. VmRSS summed over shims would count shared pages once per \
             shim. The baseline is podman's per-container monitor `conmon` ({} containers of the \
             same rootfs).",
            opts.settle, opts.containers, opts.podman_containers
        );
        let _ = writeln!(
            b,
            "\n| process | count | VmRSS each (median) MiB | VmRSS total MiB | PSS total MiB |"
        );
        let _ = writeln!(b, "|---|---|---|---|---|");
        let _ = writeln!(
            b,
            "| `nimbus up`, idle | 1 | {} | {} | |",
            mib(m.idle.0),
            mib(m.idle.0)
        );
        let _ = writeln!(
            b,
            "| **`nimbus up`, {} containers running** | 1 | {} | {} | |",
            m.running,
            mib(m.loaded.0),
            mib(m.loaded.0)
        );
        let _ = writeln!(
            b,
            "| `nimbus shim` (one per container) | {} | {} | {} | {} |",
            m.shims.count,
            mib(m.shims.rss_median),
            mib(m.shims.rss_total),
            mib(m.shims.pss_total)
        );
        match &podman_res {
            Ok(g) => {
                let _ = writeln!(
                    b,
                    "| podman `conmon` (one per container, baseline) | {} | {} | {} | {} |",
                    g.count,
                    mib(g.rss_median),
                    mib(g.rss_total),
                    mib(g.pss_total)
                );
                let _ = writeln!(
                    b,
                    "\nPer-container helper, nimbus shim / podman conmon (median VmRSS): {:.2}x.",
                    m.shims.rss_median as f64 / g.rss_median.max(1) as f64
                );
            }
            Err(e) => {
                let _ = writeln!(b, "| podman `conmon` | skipped: {e} | | | |");
            }
        }
        let _ = writeln!(
            b,
            "\nPeak VmHWM of `nimbus up` during the run: {} MiB. Target: `nimbus up` VmRSS < 60 MiB \
             with {} containers: **{}** ({} MiB).",
            mib(m.loaded.1),
            m.running,
            if target_ok { "met" } else { "missed" },
            mib(m.loaded.0)
        );
        let date = crate::doc::today();
        let mut rows = vec![crate::doc::Row {
            metric: "Resident memory: `nimbus up` VmRSS with 100 containers (`bench-memory`)"
                .into(),
            target: "< 60 MiB".into(),
            result: format!(
                "{} MiB with {} containers (idle {} MiB)",
                mib(m.loaded.0),
                m.running,
                mib(m.idle.0)
            ),
            ratio: String::new(),
            verdict: crate::doc::verdict(target_ok),
            date: date.clone(),
        }];
        if let Ok(g) = &podman_res {
            rows.push(crate::doc::Row {
                metric: "Resident memory: per-container helper, `nimbus shim` vs podman `conmon` (`bench-memory`)".into(),
                target: "none (reported)".into(),
                result: format!(
                    "{} MiB VmRSS median (conmon {} MiB)",
                    mib(m.shims.rss_median),
                    mib(g.rss_median)
                ),
                ratio: format!(
                    "{:.2}x conmon",
                    m.shims.rss_median as f64 / g.rss_median.max(1) as f64
                ),
                verdict: "reported".into(),
                date,
            });
        }
        crate::doc::record(&crate::doc::Record {
            doc,
            script: "bench-memory",
            heading: "## Resident memory",
            command: &opts.command,
            body: &b,
            rows: &rows,
        })?;
    }
    Ok(())
}
