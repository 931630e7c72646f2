//! `nimbus server list|join|remove|revoke`: control-plane cluster membership (and server
//! certificates) through the API.

use anyhow::{Context, Result};
use nimbus_client::{Client, ClusterInfo};

use crate::cli::{Output, ServerCmd};

fn print(info: &ClusterInfo, output: Output) -> Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
    println!(
        "cluster {}",
        info.cluster_id.as_deref().unwrap_or("(not formed yet)")
    );
    println!(
        "{:<18} {:<20} {:<8} {:<7} URL",
        "ID", "NAME", "ROLE", "LEADER"
    );
    for m in &info.members {
        println!(
            "{:<18} {:<20} {:<8} {:<7} {}",
            m.id,
            format!("server-{:x}", m.id),
            if m.voter { "voter" } else { "learner" },
            if m.leader { "*" } else { "" },
            m.url
        );
    }
    if info.members.is_empty() {
        println!(
            "(no members: the server at {} has not joined a cluster yet)",
            info.url
        );
    }
    Ok(())
}

/// Runs one membership verb.
pub async fn run(c: &Client, cmd: &ServerCmd) -> Result<()> {
    match cmd {
        ServerCmd::List(o) => print(&c.cluster_info().await?, o.output),
        ServerCmd::Join { url } => {
            let info = c.cluster_add_server(url).await?;
            println!("server at {url} added");
            print(&info, Output::Table)
        }
        ServerCmd::Remove { server } => {
            let id = if let Ok(id) = server.parse::<u64>() {
                id
            } else {
                let info = c.cluster_info().await?;
                let want = server.trim_end_matches('/');
                info.members
                    .iter()
                    .find(|m| m.url.trim_end_matches('/') == want)
                    .map(|m| m.id)
                    .with_context(|| format!("no server {server} in the cluster"))?
            };
            let info = c.cluster_remove_server(id).await?;
            println!("server {id} removed");
            print(&info, Output::Table)
        }
        ServerCmd::Revoke {
            name,
            serial,
            force,
        } => {
            let q = nimbus_api::pki::RevokeQuery {
                role: nimbus_api::pki::RevokeRole::Server,
                serial: serial.clone(),
                force: *force,
            };
            c.revoke(name, &q).await?;
            match serial {
                Some(s) => println!("certificate {s} of {name} revoked"),
                None => println!("{name} revoked: its certificates are refused from now on"),
            }
            Ok(())
        }
        ServerCmd::JoinToken(crate::cli::JoinTokenCmd::Create { ttl }) => {
            let t = c.create_join_token(ttl.as_secs()).await?;
            println!("{}", t.token);
            eprintln!(
                "join token valid once for {} s (until Unix time {}); cluster CA {}\n  nimbus agent --server {} --join-token TOKEN --ca-fingerprint {}",
                t.expires_at - nimbus_server::identity::unix_now(),
                t.expires_at,
                t.ca_fingerprint,
                c.base_url(),
                t.ca_fingerprint
            );
            Ok(())
        }
    }
}
