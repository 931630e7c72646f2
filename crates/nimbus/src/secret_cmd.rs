//! `nimbus secret create|list|show|delete` and `nimbus cluster rotate-master-key`. No verb
//! ever prints a secret's value.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use nimbus_client::Client;
use tabled::settings::Style;
use tabled::{Table, Tabled};
use zeroize::Zeroizing;

use crate::cli::{Output, OutputArg};

/// `nimbus secret`.
#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Create a secret (sealed by the servers under the cluster master key; at most 64 KiB).
    Create {
        /// Name.
        name: String,
        /// Read the value from this file (`-`: standard input).
        #[arg(long, value_name = "FILE", conflicts_with = "from_literal")]
        from_file: Option<PathBuf>,
        /// The value itself (visible in the shell history and `ps`: prefer --from-file).
        #[arg(long, value_name = "VALUE")]
        from_literal: Option<String>,
    },
    /// List secrets (never their values).
    #[command(alias = "ls")]
    List(OutputArg),
    /// Show a secret's metadata (never its value).
    Show {
        /// Name.
        name: String,
        /// Output.
        #[command(flatten)]
        o: OutputArg,
    },
    /// Delete a secret no instance or load balancer uses.
    #[command(alias = "rm")]
    Delete {
        /// Name.
        name: String,
    },
}

/// `nimbus cluster`.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Re-wrap every sealed secret under a new cluster master key, given to every server; the
    /// old key is then forgotten.
    RotateMasterKey,
}

#[derive(Tabled)]
struct Row {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "SIZE")]
    size: u64,
    #[tabled(rename = "KEY")]
    key: String,
    #[tabled(rename = "CREATED")]
    created: String,
}

fn table(v: Vec<nimbus_api::secret::Secret>) {
    let rows: Vec<Row> = v
        .into_iter()
        .map(|s| Row {
            name: s.meta.name,
            size: s.size_bytes,
            key: s.key_id,
            created: s.meta.created_at,
        })
        .collect();
    let mut t = Table::new(rows);
    t.with(Style::blank());
    println!("{t}");
}

/// Runs a secret verb.
pub async fn run(c: &Client, cmd: SecretCmd) -> Result<()> {
    match cmd {
        SecretCmd::Create {
            name,
            from_file,
            from_literal,
        } => {
            let value = match (from_file, from_literal) {
                (Some(f), None) if f.as_os_str() == "-" => {
                    let mut v = Zeroizing::new(Vec::new());
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)
                        .context("reading the value from standard input")?;
                    v
                }
                (Some(f), None) => Zeroizing::new(
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?,
                ),
                (None, Some(v)) => Zeroizing::new(v.into_bytes()),
                _ => bail!("give the value with --from-file FILE or --from-literal VALUE"),
            };
            let s = c.create_secret(&name, &value).await?;
            println!("secret {} created ({} bytes)", s.meta.name, s.size_bytes);
        }
        SecretCmd::List(o) => {
            let v = c.list_secrets().await?;
            if o.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                table(v);
            }
        }
        SecretCmd::Show { name, o } => {
            let s = c.get_secret(&name).await?;
            if o.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                table(vec![s]);
            }
        }
        SecretCmd::Delete { name } => {
            c.delete_secret(&name).await?;
            println!("secret {name} deleted");
        }
    }
    Ok(())
}

/// Runs a cluster verb.
pub async fn cluster(c: &Client, cmd: &ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::RotateMasterKey => {
            let r = c
                .with_timeout(std::time::Duration::from_secs(300))
                .rotate_master_key()
                .await?;
            println!(
                "master key rotated: {} -> {} ({} secrets re-wrapped, {} servers)",
                r["old_key_id"].as_str().unwrap_or("?"),
                r["new_key_id"].as_str().unwrap_or("?"),
                r["rewrapped"],
                r["servers"]
            );
        }
    }
    Ok(())
}
