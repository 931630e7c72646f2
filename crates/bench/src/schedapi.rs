//! `nimbus-bench scheduler-api`: placements per second through the real API on hollow nodes.
//!
//! Starts `nimbus server` (one server, no agent of its own) and one `nimbus agent --hollow
//! --hollow-count N` process (N hollow nodes: they register, heartbeat, long-poll their
//! assignments and report instances running without running anything), then creates a batch
//! of instances with `clients` concurrent API clients. An acknowledged create is a committed
//! placement: the scheduler runs inside the Raft state machine, so the 201 means the instance
//! has a node and an address. Reported:
//!
//! - **placed/s**: batch size ÷ time from the first request to the last acknowledgement, with
//!   the p50/p99 of one create;
//! - **all running**: time until every instance is reported `running` by its hollow node
//!   (assignment delivery, agent convergence and status reports included);
//! - **baseline** in the same invocation: the same number of `POST /v1/projects` (a write
//!   through the same Raft path that places nothing) with the same clients, and the ratio.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use nimbus_api::{CreateInstanceRequest, InstanceState};
use nimbus_client::Client;

use crate::harness::{free_port, wait_ready, workdir, KillOnDrop};
use crate::stats::{ms, Summary};

/// Options.
#[derive(Debug, Args)]
pub struct SchedApiArgs {
    /// The nimbus binary.
    #[arg(long, default_value = "target/release/nimbus")]
    pub nimbus_bin: PathBuf,
    /// Hollow nodes.
    #[arg(long, default_value_t = 100)]
    pub nodes: u32,
    /// Instances in the batch.
    #[arg(long, default_value_t = 1000)]
    pub instances: usize,
    /// Concurrent API clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
}

fn start_server(bin: &Path, dir: &Path) -> anyhow::Result<(KillOnDrop, String)> {
    let port = free_port()?;
    let mut child = Command::new(bin)
        .args(["server", "--data-dir"])
        .arg(dir.join("server"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--insecure")
        .args(["--net-prefix", "nbh", "--network-pool", "10.161.0.0/16"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("server.log"))?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    wait_ready(&mut child, "nimbus server", Duration::from_secs(120))?;
    Ok((KillOnDrop(child), format!("http://127.0.0.1:{port}")))
}

fn start_hollow(bin: &Path, dir: &Path, url: &str, nodes: u32) -> anyhow::Result<KillOnDrop> {
    let mut child = Command::new(bin)
        .args(["agent", "--hollow", "--name", "hollow", "--hollow-count"])
        .arg(nodes.to_string())
        .args(["--hollow-cpus", "8", "--hollow-memory", "32G"])
        .args(["--server", url, "--token-file"])
        .arg(dir.join("server").join("node.token"))
        .arg("--data-dir")
        .arg(dir.join("hollow"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("hollow.log"))?)
        .spawn()?;
    wait_ready(
        &mut child,
        "nimbus agent --hollow",
        Duration::from_secs(120),
    )?;
    Ok(KillOnDrop(child))
}

/// Runs `n` writes with `clients` concurrent tasks; returns the elapsed time and the latencies.
async fn batch<F, Fut>(
    n: usize,
    clients: usize,
    write: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (next, write) = (next.clone(), write.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, anyhow::Error>(lat);
                    }
                    let t = Instant::now();
                    write(i).await?;
                    lat.push(t.elapsed());
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((start.elapsed(), all))
}

/// Runs the benchmark and prints one line per measurement.
pub async fn run(a: &SchedApiArgs) -> anyhow::Result<()> {
    let dir = workdir("nimbus-bench-schedapi-")?;
    let (_server, url) = start_server(&a.nimbus_bin, dir.path())?;
    let token = std::fs::read_to_string(dir.path().join("server").join("admin.token"))?
        .trim()
        .to_owned();
    let c = Client::new(&url, &token, "default");
    let _hollow = start_hollow(&a.nimbus_bin, dir.path(), &url, a.nodes)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = c.list_nodes().await.map_or(0, |n| n.len());
        if ready == a.nodes as usize && c.list_images().await.is_ok_and(|i| !i.is_empty()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {} hollow nodes registered", a.nodes);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Baseline: the same number of writes that place nothing.
    let cb = c.clone();
    let (base_t, base_lat) = batch(a.instances, a.clients, move |i| {
        let c = cb.clone();
        async move {
            c.create_project(&format!("p{i}")).await?;
            Ok(())
        }
    })
    .await?;
    // A network large enough for the batch (a project's default network is a /24).
    c.create_network(&nimbus_api::network::CreateNetworkRequest {
        name: "bench".into(),
        cidr: Some("10.161.128.0/17".into()),
        ..Default::default()
    })
    .await?;
    let ci = c.clone();
    let t0 = Instant::now();
    let (place_t, place_lat) = batch(a.instances, a.clients, move |i| {
        let c = ci.clone();
        async move {
            let req = CreateInstanceRequest {
                name: format!("i{i}"),
                image: "busybox".into(),
                cpus: Some(0.1),
                memory: Some(serde_json::json!("64M")),
                network: Some("bench".into()),
                ..Default::default()
            };
            let inst = c.create_instance(&req, None).await?;
            anyhow::ensure!(inst.status.node.is_some(), "acknowledged without a node");
            Ok(())
        }
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let running_after = loop {
        let list = c.list_instances().await?;
        let running = list
            .iter()
            .filter(|i| i.status.state == InstanceState::Running)
            .count();
        if running == a.instances {
            break t0.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "only {running} of {} instances running after 300 s",
                a.instances
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let used: std::collections::BTreeSet<String> = c
        .list_instances()
        .await?
        .into_iter()
        .filter_map(|i| i.status.node)
        .collect();
    let rate = a.instances as f64 / place_t.as_secs_f64();
    let base = a.instances as f64 / base_t.as_secs_f64();
    let (p, b) = (Summary::of(&place_lat), Summary::of(&base_lat));
    println!(
        "nodes={} instances={} clients={} {rate:.0} placements/s (API acknowledgements) create_p50={}ms create_p99={}ms all_running_after={:.2}s nodes_used={}",
        a.nodes,
        a.instances,
        a.clients,
        ms(p.p50),
        ms(p.p99),
        running_after.as_secs_f64(),
        used.len()
    );
    println!(
        "baseline POST /v1/projects x{} clients={} {base:.0} writes/s p50={}ms p99={}ms; placements/s / baseline writes/s = {:.2}",
        a.instances,
        a.clients,
        ms(b.p50),
        ms(b.p99),
        rate / base
    );
    Ok(())
}
