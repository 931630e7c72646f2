//! `nimbus-bench`: developer benchmark tool for nimbus (not part of the product).
//!
//! Subcommands measure launch latency (running and reachable) against bare runc (and podman),
//! control-plane write throughput against etcd, resident memory with many containers, and
//! placements through the API on hollow nodes; `record` files a shell-script benchmark's run.
//! The `scripts/bench-*` drivers build everything and call it; each run prints one summary line
//! per configuration and, given `--doc`, updates its rows of the headline table and its section
//! of `docs/benchmarks.md` and adds the run to `docs/bench-history/` (see [`doc`]).

mod doc;
mod harness;
mod launch;
mod memory;
mod scale;
mod schedapi;
mod stats;
mod writes;

use clap::{Parser, Subcommand};

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "nimbus-bench", about = "nimbus developer benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Benchmarks.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// API create -> running, vs bare `runc run -d` and `podman run -d`.
    Launch(launch::LaunchArgs),
    /// Committed creates through Raft via REST, vs etcd's v3 gateway.
    Writes(writes::WritesArgs),
    /// VmRSS of `nimbus up` and its shims with many running containers.
    Memory(memory::MemoryArgs),
    /// Instances placed per second through the API on hollow nodes (`nimbus agent --hollow`).
    SchedulerApi(schedapi::SchedApiArgs),
    /// The control plane with thousands of hollow nodes and up to 100,000 instances.
    Scale(scale::ScaleArgs),
    /// Records a run of a shell-script benchmark: headline rows, section, history entry.
    Record(doc::RecordArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Launch(a) => launch::run(&a).await,
        Cmd::Writes(a) => writes::run(&a).await,
        Cmd::Memory(a) => memory::run(&a).await,
        Cmd::SchedulerApi(a) => schedapi::run(&a).await,
        Cmd::Scale(a) => scale::run(&a).await,
        Cmd::Record(a) => doc::run_record(&a),
    }
}
