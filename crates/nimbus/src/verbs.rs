//! Client verbs: each talks to the REST API through the typed client.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use nimbus_api::validate::format_size;
use nimbus_api::{CreateInstanceRequest, Instance, InstanceState, InstanceType, RestartPolicy};
use nimbus_client::Client;
use tabled::settings::Style;
use tabled::{Table, Tabled};

use crate::cli::{ImageCmd, LaunchArgs, NodeCmd, Output, ProjectCmd};

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_table<T: Tabled>(rows: Vec<T>) {
    let mut t = Table::new(rows);
    t.with(Style::blank());
    println!("{t}");
}

fn kv(items: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("invalid {what} {s:?}: use KEY=VALUE"))
        })
        .collect()
}

fn spinner(msg: String) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// Waits until `pred` holds for the instance (or it fails); returns the instance.
async fn wait_for(
    c: &Client,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&Instance) -> bool,
) -> Result<Instance> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let i = c.get_instance(name).await?;
        if pred(&i) {
            return Ok(i);
        }
        if i.status.state == InstanceState::Failed {
            bail!(
                "instance {name} failed: {}",
                if i.status.message.is_empty() {
                    "no reason given"
                } else {
                    &i.status.message
                }
            );
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "timed out waiting for instance {name} (state {})",
                i.status.state.as_str()
            );
        }
        tokio::time::sleep(poll_interval(deadline - timeout)).await;
    }
}

/// How long to wait between two reads of an instance being waited for since `since`: a
/// container is usually running within a few hundred milliseconds, so the first seconds are
/// read closely (a 50 ms interval alone added 25 ms to the average launch); a VM's boot takes
/// seconds, read more loosely.
fn poll_interval(since: tokio::time::Instant) -> Duration {
    match since.elapsed().as_secs() {
        0..2 => Duration::from_millis(10),
        2..10 => Duration::from_millis(50),
        _ => Duration::from_millis(250),
    }
}

/// `--secret NAME:/PATH` and `--secret-env NAME:VAR` as secret uses.
fn secret_uses(files: &[String], env: &[String]) -> Result<Vec<nimbus_api::secret::SecretUse>> {
    let split = |s: &String, flag: &str, what: &str| {
        s.split_once(':')
            .filter(|(n, r)| !n.is_empty() && !r.is_empty())
            .map(|(n, r)| (n.to_string(), r.to_string()))
            .ok_or_else(|| anyhow!("{flag} {s:?}: expected NAME:{what}"))
    };
    let mut uses = Vec::new();
    for f in files {
        let (secret, path) = split(f, "--secret", "/PATH")?;
        uses.push(nimbus_api::secret::SecretUse {
            secret,
            path: Some(path),
            env: None,
        });
    }
    for e in env {
        let (secret, var) = split(e, "--secret-env", "VAR")?;
        uses.push(nimbus_api::secret::SecretUse {
            secret,
            path: None,
            env: Some(var),
        });
    }
    Ok(uses)
}

/// `nimbus launch`.
pub async fn launch(c: &Client, a: LaunchArgs) -> Result<()> {
    let restart: RestartPolicy =
        serde_json::from_value(serde_json::Value::String(a.restart.clone())).map_err(|_| {
            anyhow!(
                "invalid restart policy {:?}: use never, on-failure or always",
                a.restart
            )
        })?;
    let user_data = match &a.user_data {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading user-data {}", p.display()))?,
        ),
        None => None,
    };
    let ssh_keys = a
        .ssh_key
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .with_context(|| format!("reading {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let req = CreateInstanceRequest {
        name: a.name.clone(),
        image: a.image.clone(),
        instance_type: if a.vm {
            InstanceType::Vm
        } else {
            InstanceType::Container
        },
        cpus: a.cpus,
        memory: a.memory.map(serde_json::Value::String),
        disk: a.disk.map(serde_json::Value::String),
        command: a.command,
        env: kv(&a.env, "--env")?,
        labels: kv(&a.labels, "--label")?,
        restart,
        pids_limit: None,
        user_data,
        ssh_keys,
        start: None,
        constraints: a.constraints.clone(),
        spread_group: a.spread_group.clone(),
        anti_affinity: a.anti_affinity,
        priority_class: a.priority.clone(),
        network: a.network.clone(),
        subnet: a.subnet.clone(),
        security_groups: a.security_groups.clone(),
        publish: a.publish.clone(),
        secrets: secret_uses(&a.secrets, &a.secret_env)?,
        volumes: crate::volume_cmd::volume_uses(&a.volumes)?,
    };
    let inst = c
        .create_instance(&req, a.idempotency_key.as_deref())
        .await?;
    if a.no_wait {
        println!("{} {}", inst.meta.name, inst.status.state.as_str());
        return Ok(());
    }
    let pb = spinner(format!("starting {}", a.name));
    let timeout = if a.vm {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(120)
    };
    let res = wait_for(c, &a.name, timeout, |i| {
        i.status.state == InstanceState::Running
            || (i.status.state == InstanceState::Stopped && i.status.exit_code.is_some())
    })
    .await;
    pb.finish_and_clear();
    let i = res?;
    println!(
        "{} {} on {} ip {}",
        i.meta.name,
        i.status.state.as_str(),
        i.status.node.as_deref().unwrap_or("-"),
        i.status.ip.as_deref().unwrap_or("-")
    );
    Ok(())
}

#[derive(Tabled)]
struct InstanceRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "TYPE")]
    ty: String,
    #[tabled(rename = "STATE")]
    state: String,
    #[tabled(rename = "NODE")]
    node: String,
    #[tabled(rename = "IP")]
    ip: String,
    #[tabled(rename = "CPUS")]
    cpus: String,
    #[tabled(rename = "MEMORY")]
    memory: String,
    #[tabled(rename = "IMAGE")]
    image: String,
}

/// `nimbus list`.
pub async fn list(c: &Client, o: Output) -> Result<()> {
    let v = c.list_instances().await?;
    if o == Output::Json {
        return print_json(&v.iter().map(Instance::summary).collect::<Vec<_>>());
    }
    print_table(
        v.iter()
            .map(|i| InstanceRow {
                name: i.meta.name.clone(),
                ty: i.spec.instance_type.as_str().into(),
                state: i.status.state.as_str().into(),
                node: i.status.node.clone().unwrap_or_else(|| "-".into()),
                ip: i.status.ip.clone().unwrap_or_else(|| "-".into()),
                cpus: cpus_text(i.spec.cpus),
                memory: memory_text(i.spec.memory_bytes),
                image: i.spec.image.clone(),
            })
            .collect(),
    );
    Ok(())
}

/// `nimbus show`.
pub async fn show(c: &Client, name: &str, o: Output) -> Result<()> {
    let i = c.get_instance(name).await?;
    if o == Output::Json {
        return print_json(&i);
    }
    let s = &i.status;
    let rows = [
        ("name", i.meta.name.clone()),
        ("project", i.meta.project.clone()),
        ("id", i.meta.id.clone()),
        ("type", i.spec.instance_type.as_str().into()),
        ("state", s.state.as_str().into()),
        ("desired", format!("{:?}", i.spec.desired).to_lowercase()),
        ("node", s.node.clone().unwrap_or_default()),
        ("ip", s.ip.clone().unwrap_or_default()),
        (
            "network",
            format!("{} (subnet {})", i.spec.network, i.spec.subnet),
        ),
        ("security groups", i.spec.security_groups.join(", ")),
        (
            "published",
            i.spec
                .publish
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("pid", s.pid.map(|p| p.to_string()).unwrap_or_default()),
        (
            "exit code",
            s.exit_code.map(|p| p.to_string()).unwrap_or_default(),
        ),
        ("message", s.message.clone()),
        ("image", i.spec.image.clone()),
        ("cpus", cpus_text(i.spec.cpus)),
        ("memory", memory_text(i.spec.memory_bytes)),
        ("disk", format_size(i.spec.disk_bytes)),
        (
            "restart policy",
            serde_json::to_value(i.spec.restart)?
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
        ("restarts", s.restart_count.to_string()),
        ("accelerator", s.accelerator.clone().unwrap_or_default()),
        ("command", i.spec.command.join(" ")),
        ("created", i.meta.created_at.clone()),
        ("version", i.meta.version.to_string()),
    ];
    for (k, v) in rows {
        if !v.is_empty() {
            println!("{:<15} {v}", format!("{k}:"));
        }
    }
    Ok(())
}

/// `nimbus logs`.
pub async fn logs(c: &Client, name: &str, follow: bool, tail: Option<u64>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if follow {
        let mut s = c.follow_logs(name, tail).await?;
        drop(out);
        while let Some(chunk) = s.next().await {
            let chunk = chunk.context("log stream interrupted")?;
            let mut o = std::io::stdout().lock();
            o.write_all(&chunk)?;
            o.flush()?;
        }
        return Ok(());
    }
    out.write_all(c.logs(name, tail).await?.as_bytes())?;
    Ok(())
}

/// `nimbus exec`: returns the command's exit code.
pub async fn exec(c: &Client, name: &str, command: Vec<String>) -> Result<i32> {
    let r = c.exec(name, command).await?;
    std::io::stdout().write_all(r.stdout.as_bytes())?;
    std::io::stderr().write_all(r.stderr.as_bytes())?;
    if r.truncated {
        eprintln!("warning: the output was truncated at the capture limit (4 MiB per stream)");
    }
    Ok(r.exit_code)
}

/// `stop`, `start`, `restart`.
pub async fn action(c: &Client, name: &str, action: &str) -> Result<()> {
    let before = c.instance_action(name, action).await?;
    let pb = spinner(format!("{action} {name}"));
    let res = if action == "stop" {
        wait_for(c, name, Duration::from_secs(60), |i| {
            matches!(i.status.state, InstanceState::Stopped)
        })
        .await
    } else {
        let old_pid = before.status.pid;
        wait_for(c, name, Duration::from_secs(300), move |i| {
            i.status.state == InstanceState::Running
                && (action != "restart" || i.status.pid != old_pid)
        })
        .await
    };
    pb.finish_and_clear();
    let i = res?;
    println!("{} {}", i.meta.name, i.status.state.as_str());
    Ok(())
}

/// `nimbus delete`.
pub async fn delete(c: &Client, name: &str, no_wait: bool) -> Result<()> {
    c.delete_instance(name).await?;
    if !no_wait {
        let pb = spinner(format!("deleting {name}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            match c.get_instance(name).await {
                Err(e)
                    if e.api()
                        .is_some_and(|a| a.code == nimbus_api::ErrorCode::NotFound) =>
                {
                    break
                }
                Err(e) => return Err(e.into()),
                Ok(_) if tokio::time::Instant::now() > deadline => {
                    bail!("timed out waiting for {name} to be deleted")
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        pb.finish_and_clear();
    }
    println!("{name} deleted");
    Ok(())
}

#[derive(Tabled)]
struct ImageRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "DIGEST")]
    digest: String,
    #[tabled(rename = "SIZE")]
    size: String,
    #[tabled(rename = "LAYERS")]
    layers: usize,
}

/// `nimbus image ...`.
pub async fn image(c: &Client, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Import { file, name } => {
            let pb = spinner(format!("importing {}", file.display()));
            let r = c.import_image(&file, name.as_deref()).await;
            pb.finish_and_clear();
            let img = r?;
            println!("imported {} {}", img.meta.name, img.digest);
        }
        ImageCmd::List(o) => {
            let v = c.list_images().await?;
            if o.output == Output::Json {
                return print_json(&v);
            }
            print_table(
                v.into_iter()
                    .map(|i| ImageRow {
                        name: i.meta.name,
                        digest: i.digest.chars().take(19).collect(),
                        size: format_size(i.size_bytes),
                        layers: i.layers.len(),
                    })
                    .collect(),
            );
        }
    }
    Ok(())
}

#[derive(Tabled)]
struct NodeRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "STATE")]
    state: String,
    #[tabled(rename = "CPUS")]
    cpus: String,
    #[tabled(rename = "MEMORY")]
    memory: String,
    #[tabled(rename = "VMS")]
    vms: String,
    #[tabled(rename = "UNDERLAY")]
    underlay: String,
    #[tabled(rename = "AGENT")]
    agent: String,
}

/// `nimbus node ...`.
pub async fn node(c: &Client, cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::List(o) => {
            let v = c.list_nodes().await?;
            if o.output == Output::Json {
                return print_json(&v);
            }
            print_table(
                v.into_iter()
                    .map(|n| NodeRow {
                        state: format!(
                            "{}{}",
                            serde_json::to_value(n.state)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            if n.cordoned { ",cordoned" } else { "" }
                        ),
                        cpus: format!("{}", n.capacity.cpu_millis as f64 / 1000.0),
                        memory: format_size(n.capacity.memory_bytes),
                        vms: n
                            .capabilities
                            .accelerator
                            .clone()
                            .unwrap_or_else(|| "no".into()),
                        name: n.meta.name,
                        underlay: n.underlay_ip,
                        agent: n.agent_url,
                    })
                    .collect(),
            );
        }
        NodeCmd::Cordon { name } => {
            c.cordon_node(&name, true).await?;
            println!("{name} cordoned");
        }
        NodeCmd::Remove { name, force } => {
            c.remove_node(&name, force).await?;
            println!("{name} removed");
        }
        NodeCmd::Drain { name } => {
            c.drain_node(&name).await?;
            let pb = spinner(format!("draining {name}"));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
            let mut left;
            loop {
                let mut all = Vec::new();
                for p in c.list_projects().await? {
                    all.extend(c.with_project(&p.meta.name).list_instances().await?);
                }
                left = all
                    .iter()
                    .filter(|i| i.status.node.as_deref() == Some(name.as_str()))
                    .count();
                let settling = all
                    .iter()
                    .any(|i| i.status.state == InstanceState::Scheduled);
                if (left == 0 && !settling) || tokio::time::Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            pb.finish_and_clear();
            if left > 0 {
                bail!(
                    "{left} instance(s) could not be moved off {name}; see `nimbus events --all`"
                );
            }
            println!("{name} drained");
        }
        NodeCmd::Uncordon { name } => {
            c.cordon_node(&name, false).await?;
            println!("{name} uncordoned");
        }
        NodeCmd::Revoke { name, serial } => {
            let q = nimbus_api::pki::RevokeQuery {
                serial: serial.clone(),
                ..Default::default()
            };
            c.revoke(&name, &q).await?;
            match serial {
                Some(s) => println!("certificate {s} of {name} revoked"),
                None => println!("{name} revoked: its certificates are refused from now on"),
            }
        }
    }
    Ok(())
}

#[derive(Tabled)]
struct ProjectRow {
    #[tabled(rename = "NAME")]
    name: String,
    #[tabled(rename = "CREATED")]
    created: String,
}

/// `nimbus project ...`.
pub async fn project(c: &Client, cmd: ProjectCmd) -> Result<()> {
    match cmd {
        ProjectCmd::Create { name } => {
            c.create_project(&name).await?;
            println!("project {name} created");
        }
        ProjectCmd::Delete { name } => {
            c.delete_project(&name).await?;
            println!("project {name} deleted");
        }
        ProjectCmd::List(o) => {
            let v = c.list_projects().await?;
            if o.output == Output::Json {
                return print_json(&v);
            }
            print_table(
                v.into_iter()
                    .map(|p| ProjectRow {
                        name: p.meta.name,
                        created: p.meta.created_at,
                    })
                    .collect(),
            );
        }
    }
    Ok(())
}

/// `nimbus events`.
pub async fn events(c: &Client, follow: bool, all: bool, o: Output) -> Result<()> {
    let project = if all { None } else { Some(c.project.as_str()) };
    if follow {
        let mut s = c.follow_events(project, 0).await?;
        while let Some(chunk) = s.next().await {
            let chunk = chunk.context("event stream interrupted")?;
            for line in String::from_utf8_lossy(&chunk).lines() {
                if o == Output::Json {
                    println!("{line}");
                } else if let Ok(e) = serde_json::from_str::<nimbus_api::Event>(line) {
                    println!(
                        "{} {:<8} {:<16} {:<16} {}",
                        e.time, e.kind, e.name, e.reason, e.message
                    );
                }
            }
        }
        return Ok(());
    }
    let v = c.events(project, 0).await?;
    if o == Output::Json {
        return print_json(&v);
    }
    for e in v {
        println!(
            "{} {:<8} {:<16} {:<16} {}",
            e.time, e.kind, e.name, e.reason, e.message
        );
    }
    Ok(())
}

/// Restores the terminal mode when dropped.
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter() -> Self {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return Self { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// The byte Ctrl-] sends.
const DETACH: u8 = 0x1d;

/// `nimbus console`: raw terminal to the VM's serial console until Ctrl-] or the stream ends.
pub async fn console(c: &Client, name: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = c.console(name).await?;
    eprintln!("Connected to the console of {name}; press Ctrl-] to detach.");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let raw = RawMode::enter();
    let to_vm = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if let Some(pos) = buf[..n].iter().position(|&b| b == DETACH) {
                wr.write_all(&buf[..pos]).await?;
                return Ok(());
            }
            wr.write_all(&buf[..n]).await?;
        }
    };
    let from_vm = async {
        let mut out = tokio::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            out.write_all(&buf[..n]).await?;
            out.flush().await?;
        }
    };
    tokio::select! {
        r = to_vm => r?,
        r = from_vm => r?,
    }
    drop(raw);
    eprintln!("\r\nDetached from {name}.");
    Ok(())
}

/// A reservation as shown: `best effort` when none was asked for.
fn cpus_text(cpus: f64) -> String {
    if cpus == 0.0 {
        "best effort".into()
    } else {
        cpus.to_string()
    }
}

/// A memory limit as shown: `best effort` when none was asked for.
fn memory_text(bytes: u64) -> String {
    if bytes == 0 {
        "best effort".into()
    } else {
        format_size(bytes)
    }
}
