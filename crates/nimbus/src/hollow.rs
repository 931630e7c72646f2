//! `nimbus agent --hollow`: hollow nodes for scale tests (like Kubernetes' kubemark). Each
//! registers with the control plane, heartbeats and reports its instances as running through
//! the real agent runtime, with the in-memory `HollowDriver` instead of runc or QEMU, no image
//! pulls and no utilisation measurement. Never the default; it says so in its log.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nimbus_agent::driver::hollow::HollowDriver;
use nimbus_agent::driver::Driver;
use nimbus_agent::{Agent, AgentConfig};
use nimbus_api::{Capacity, NodeCapabilities};

use crate::cli::AgentArgs;

/// Runs `args.hollow_count` hollow nodes in this process until a signal arrives.
pub async fn run(
    args: AgentArgs,
    token: String,
    labels: std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let base = args.name.clone().unwrap_or_else(crate::daemon::hostname);
    let capacity = if args.hollow_cpus.is_none() && args.hollow_memory.is_none() {
        None
    } else {
        let cpus = args.hollow_cpus.map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64,
            u64::from,
        );
        let memory = match &args.hollow_memory {
            Some(m) => nimbus_api::validate::parse_size("--hollow-memory", m)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?,
            None => machine_memory(),
        };
        Some(Capacity {
            cpu_millis: cpus * 1000,
            memory_bytes: memory,
            disk_bytes: 1 << 40,
        })
    };
    let caps = NodeCapabilities {
        containers: true,
        vms: false,
        vm_unavailable_reason: Some("hollow node".into()),
        ..NodeCapabilities::default()
    };
    let mut handles = Vec::new();
    for k in 0..args.hollow_count {
        let name = if args.hollow_count == 1 {
            base.clone()
        } else {
            format!("{base}-{k}")
        };
        let listen = if args.hollow_count == 1 {
            args.listen
        } else {
            std::net::SocketAddr::new(args.listen.ip(), 0)
        };
        let driver: Arc<dyn Driver> = Arc::new(HollowDriver::new());
        let data_dir = args.data_dir.join(&name);
        let handle = Agent::start(
            AgentConfig {
                name: name.clone(),
                servers: args.servers.clone(),
                token: token.clone(),
                image_dir: data_dir.join("images"),
                data_dir,
                listen,
                advertise_url: None,
                zone: args.zone.clone(),
                labels: labels.clone(),
                heartbeat_every: Duration::from_secs(2),
                stop_grace: Duration::from_secs(1),
                hollow: true,
                capacity,
                underlay_ip: Some(std::net::Ipv4Addr::LOCALHOST),
                nft_table: None,
            },
            vec![driver],
            caps.clone(),
        )
        .await
        .with_context(|| format!("starting hollow node {name}"))?;
        handles.push(handle);
    }
    tracing::warn!(
        nodes = handles.len(),
        "HOLLOW test mode: these nodes run no workloads (nimbus agent --hollow)"
    );
    println!(
        "nimbus agent ready: {} hollow node(s) (test mode, no workloads)",
        handles.len()
    );
    crate::daemon::wait_for_signal().await;
    for h in handles {
        h.stop();
    }
    Ok(())
}

/// This machine's memory (MemTotal), bytes.
fn machine_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| nimbus_agent::usage::parse_meminfo(&t))
        .map_or(0, |(total, _)| total)
}
