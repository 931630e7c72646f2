//! The `nimbus` binary: wires subcommands to the crates.

mod cli;
mod cluster_cmd;
mod daemon;
mod hollow;
mod lb_cmd;
mod lb_route;
mod net_cmd;
mod secret_cmd;
mod tls_cmd;
mod verbs;
mod volume_cmd;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use nimbus_client::{Client, ClientError};

use crate::cli::{Cli, Command};

async fn client(cli: &Cli) -> Result<Client> {
    let url = cli
        .url
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:7443".into());
    let token = if let Some(t) = &cli.token {
        t.clone()
    } else {
        let dir = std::env::var_os("NIMBUS_DATA_DIR")
            .map_or_else(daemon::default_data_dir, std::path::PathBuf::from);
        let path = dir.join("admin.token");
        std::fs::read_to_string(&path)
            .with_context(|| {
                format!(
                    "no token: set NIMBUS_TOKEN or run `nimbus up` (reading {})",
                    path.display()
                )
            })?
            .trim()
            .to_string()
    };
    let tls = tls_cmd::cli_tls(&url, cli.ca.as_deref()).await?;
    let c = Client::new(url, token, cli.project.clone());
    Ok(match tls {
        Some(t) => c.with_tls(t),
        None => c,
    })
}

async fn run(cli: Cli) -> Result<i32> {
    if let Command::Server(cli::ServerArgs { cmd: Some(cmd), .. }) = &cli.command {
        return cluster_cmd::run(&client(&cli).await?, cmd)
            .await
            .map(|()| 0);
    }
    let code = match cli.command {
        Command::Up(a) => daemon::up(a).await.map(|()| 0)?,
        Command::Server(a) => daemon::server(a, cli.ca.clone()).await.map(|()| 0)?,
        Command::Agent(a) => daemon::agent(a, cli.ca.clone()).await.map(|()| 0)?,
        Command::Shim { .. } => unreachable!("handled before the runtime starts"),
        ref other => {
            let c = client(&cli).await?;
            match other {
                Command::Launch(_) => {
                    let Command::Launch(a) = cli.command else {
                        unreachable!()
                    };
                    verbs::launch(&c, a).await?;
                }
                Command::List(o) => verbs::list(&c, o.output).await?,
                Command::Show { name, o } => verbs::show(&c, name, o.output).await?,
                Command::Logs { name, follow, tail } => {
                    verbs::logs(&c, name, *follow, *tail).await?;
                }
                Command::Exec { name, command } => {
                    return verbs::exec(&c, name, command.clone()).await
                }
                Command::Console { name } => verbs::console(&c, name).await?,
                Command::Stop { name } => verbs::action(&c, name, "stop").await?,
                Command::Start { name } => verbs::action(&c, name, "start").await?,
                Command::Restart { name } => verbs::action(&c, name, "restart").await?,
                Command::Delete { name, no_wait } => verbs::delete(&c, name, *no_wait).await?,
                Command::Image(_) => {
                    let Command::Image(cmd) = cli.command else {
                        unreachable!()
                    };
                    verbs::image(&c, cmd).await?;
                }
                Command::Node(_) => {
                    let Command::Node(cmd) = cli.command else {
                        unreachable!()
                    };
                    verbs::node(&c, cmd).await?;
                }
                Command::Project(_) => {
                    let Command::Project(cmd) = cli.command else {
                        unreachable!()
                    };
                    verbs::project(&c, cmd).await?;
                }
                Command::Lb(_) => {
                    let Command::Lb(cmd) = cli.command else {
                        unreachable!()
                    };
                    lb_cmd::run(&c, cmd).await?;
                }
                Command::Network(_) => {
                    let Command::Network(cmd) = cli.command else {
                        unreachable!()
                    };
                    net_cmd::network(&c, cmd).await?;
                }
                Command::Sg(_) => {
                    let Command::Sg(cmd) = cli.command else {
                        unreachable!()
                    };
                    net_cmd::sg(&c, cmd).await?;
                }
                Command::Secret(_) => {
                    let Command::Secret(cmd) = cli.command else {
                        unreachable!()
                    };
                    secret_cmd::run(&c, cmd).await?;
                }
                Command::Cluster(cmd) => secret_cmd::cluster(&c, cmd).await?,
                Command::Volume(_) => {
                    let Command::Volume(cmd) = cli.command else {
                        unreachable!()
                    };
                    volume_cmd::run(&c, cmd).await?;
                }
                Command::Storage(cmd) => volume_cmd::storage(&c, cmd).await?,
                Command::Events { follow, all, o } => {
                    verbs::events(&c, *follow, *all, o.output).await?;
                }
                Command::Up(_) | Command::Server(_) | Command::Agent(_) | Command::Shim { .. } => {
                    unreachable!()
                }
            }
            0
        }
    };
    Ok(code)
}

fn describe(e: &anyhow::Error) -> String {
    if let Some(ClientError::Api(api)) = e.downcast_ref::<ClientError>() {
        return match &api.field {
            Some(f) => format!("{} (field {f}, {})", api.message, api.code.as_str()),
            None => format!("{} ({})", api.message, api.code.as_str()),
        };
    }
    // The chain, printed once.
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !parts.iter().any(|p| p.contains(&c)) {
            parts.push(c);
        }
    }
    parts.join(": ")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("shim") {
        let code = nimbus_agent::driver::container::shim::main(args[2..].to_vec());
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(1)
        }
    }
}
