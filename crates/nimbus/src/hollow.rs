//! `nimbus agent --hollow`: hollow nodes for scale tests (like Kubernetes' kubemark), run as one
//! fleet per process over the batched fleet protocol (`nimbus_agent::fleet`): they register,
//! heartbeat and report their instances as running, and run nothing. Never the default; it
//! says so in its log.

use std::sync::Arc;

use anyhow::{Context, Result};
use nimbus_agent::fleet::HollowFleet;
use nimbus_agent::server_link::ServerLink;
use nimbus_api::agent::RegisterNodeRequest;
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
    let capacity = capacity.unwrap_or_else(|| Capacity {
        cpu_millis: std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64
            * 1000,
        memory_bytes: machine_memory(),
        disk_bytes: 1 << 40,
    });
    let caps = NodeCapabilities {
        containers: true,
        vms: false,
        vm_unavailable_reason: Some("hollow node".into()),
        ..NodeCapabilities::default()
    };
    let nodes: Vec<RegisterNodeRequest> = (0..args.hollow_count)
        .map(|k| RegisterNodeRequest {
            name: if args.hollow_count == 1 {
                base.clone()
            } else {
                format!("{base}-{k}")
            },
            // Nothing listens: the control plane knows hollow nodes by their fleet label.
            agent_url: "http://127.0.0.1:1".into(),
            capacity,
            capabilities: caps.clone(),
            zone: args.zone.clone(),
            labels: labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            underlay_ip: String::new(),
        })
        .collect();
    let link = ServerLink::new(args.servers.clone(), token);
    let fleet = Arc::new(HollowFleet::new(link, &base, nodes));
    fleet
        .register()
        .await
        .context("registering the hollow nodes")?;
    tracing::warn!(
        nodes = args.hollow_count,
        "HOLLOW test mode: these nodes run no workloads (nimbus agent --hollow)"
    );
    println!(
        "nimbus agent ready: {} hollow node(s) (test mode, no workloads)",
        args.hollow_count
    );
    tokio::select! {
        () = fleet.run() => {}
        () = crate::daemon::wait_for_signal() => {}
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
