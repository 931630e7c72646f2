//! `nimbus volume create|list|show|delete|snapshot|resize|restore` and
//! `nimbus storage pool list|show`.

use anyhow::{anyhow, Result};
use clap::Subcommand;
use nimbus_api::validate::format_size;
use nimbus_api::volume::{CreateVolumeRequest, StoragePool, Volume, VolumeUse};
use nimbus_client::Client;
use tabled::settings::Style;
use tabled::{Table, Tabled};

use crate::cli::{Output, OutputArg};

/// `nimbus volume`.
#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (a record only: volumes are not attached to instances yet).
    Create {
        /// Name.
        name: String,
        /// Size, e.g. 10G (at most 16T).
        #[arg(long)]
        size: String,
        /// Storage pool (default `local`).
        #[arg(long)]
        pool: Option<String>,
        /// Encrypt at rest.
        #[arg(long)]
        encrypted: bool,
        /// Attachable to several VMs at once (raw block, VMs only).
        #[arg(long)]
        shared: bool,
    },
    /// List volumes.
    #[command(alias = "ls")]
    List(OutputArg),
    /// Show a volume.
    Show {
        /// Name.
        name: String,
        /// Output.
        #[command(flatten)]
        o: OutputArg,
    },
    /// Delete a volume attached to nothing.
    #[command(alias = "rm")]
    Delete {
        /// Name.
        name: String,
    },
    /// Record a snapshot of a volume.
    Snapshot {
        /// Volume.
        volume: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// Grow a volume (it never shrinks).
    Resize {
        /// Volume.
        volume: String,
        /// New size, e.g. 20G.
        size: String,
    },
    /// Roll a volume back to one of its snapshots.
    Restore {
        /// Volume.
        volume: String,
        /// Snapshot (`SNAP` or `VOLUME@SNAP`).
        snapshot: String,
    },
}

/// `nimbus storage`.
#[derive(Debug, Subcommand)]
pub enum StorageCmd {
    /// Storage pools.
    #[command(subcommand)]
    Pool(PoolCmd),
}

/// `nimbus storage pool`.
#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// List pools.
    #[command(alias = "ls")]
    List(OutputArg),
    /// Show a pool.
    Show {
        /// Name.
        name: String,
        /// Output.
        #[command(flatten)]
        o: OutputArg,
    },
}

#[derive(Tabled)]
struct Row {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "SIZE")]
    size: String,
    #[tabled(rename = "POOL")]
    pool: String,
    #[tabled(rename = "STATE")]
    state: String,
    #[tabled(rename = "FLAGS")]
    flags: String,
    #[tabled(rename = "SNAPSHOTS")]
    snapshots: String,
    #[tabled(rename = "ATTACHED TO")]
    attached: String,
}

fn table(v: Vec<Volume>) {
    let rows: Vec<Row> = v
        .into_iter()
        .map(|v| Row {
            name: v.meta.name,
            size: format_size(v.size_bytes),
            pool: v.pool,
            state: v.state.as_str().into(),
            flags: [(v.encrypted, "encrypted"), (v.shared, "shared")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, f)| *f)
                .collect::<Vec<_>>()
                .join(","),
            snapshots: v
                .snapshots
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            attached: v
                .attachments
                .iter()
                .map(|a| a.instance.as_str())
                .collect::<Vec<_>>()
                .join(","),
        })
        .collect();
    let mut t = Table::new(rows);
    t.with(Style::blank());
    println!("{t}");
}

#[derive(Tabled)]
struct PoolRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "DRIVER")]
    driver: String,
}

fn pool_table(v: Vec<StoragePool>) {
    let rows: Vec<PoolRow> = v
        .into_iter()
        .map(|p| PoolRow {
            name: p.meta.name,
            driver: p.driver.as_str().into(),
        })
        .collect();
    let mut t = Table::new(rows);
    t.with(Style::blank());
    println!("{t}");
}

fn print<T: serde::Serialize>(o: Output, v: T, table: impl FnOnce(T)) -> Result<()> {
    if o == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        table(v);
    }
    Ok(())
}

/// Parses `--volume NAME[:/PATH]` flags of `nimbus launch`.
pub fn volume_uses(flags: &[String]) -> Result<Vec<VolumeUse>> {
    flags
        .iter()
        .map(|f| {
            let (name, path) = match f.split_once(':') {
                Some((n, p)) => (n, Some(p)),
                None => (f.as_str(), None),
            };
            if name.is_empty() || path.is_some_and(str::is_empty) {
                return Err(anyhow!(
                    "--volume {f:?}: expected NAME:/PATH (or NAME for a VM's raw disk)"
                ));
            }
            Ok(VolumeUse {
                volume: name.into(),
                path: path.map(Into::into),
            })
        })
        .collect()
}

/// Runs a volume verb.
pub async fn run(c: &Client, cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            pool,
            encrypted,
            shared,
        } => {
            let v = c
                .create_volume(&CreateVolumeRequest {
                    name,
                    size: serde_json::Value::String(size),
                    pool,
                    encrypted,
                    shared,
                    labels: std::collections::BTreeMap::new(),
                })
                .await?;
            println!(
                "volume {} created ({} in pool {})",
                v.meta.name,
                format_size(v.size_bytes),
                v.pool
            );
        }
        VolumeCmd::List(o) => print(o.output, c.list_volumes().await?, table)?,
        VolumeCmd::Show { name, o } => {
            print(o.output, c.get_volume(&name).await?, |v| table(vec![v]))?;
        }
        VolumeCmd::Delete { name } => {
            c.delete_volume(&name).await?;
            println!("volume {name} deleted");
        }
        VolumeCmd::Snapshot { volume, snapshot } => {
            c.snapshot_volume(&volume, &snapshot).await?;
            println!("snapshot {volume}@{snapshot} taken");
        }
        VolumeCmd::Resize { volume, size } => {
            let v = c.resize_volume(&volume, &size).await?;
            println!("volume {volume} is {}", format_size(v.size_bytes));
        }
        VolumeCmd::Restore { volume, snapshot } => {
            let v = c.restore_volume(&volume, &snapshot).await?;
            println!(
                "volume {volume} restored from {snapshot} ({})",
                format_size(v.size_bytes)
            );
        }
    }
    Ok(())
}

/// Runs a storage verb.
pub async fn storage(c: &Client, cmd: &StorageCmd) -> Result<()> {
    match cmd {
        StorageCmd::Pool(PoolCmd::List(o)) => {
            print(o.output, c.list_storage_pools().await?, pool_table)
        }
        StorageCmd::Pool(PoolCmd::Show { name, o }) => {
            print(o.output, c.get_storage_pool(name).await?, |p| {
                pool_table(vec![p]);
            })
        }
    }
}
