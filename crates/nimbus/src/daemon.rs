//! The long-running roles: `up` (server + agent), `server`, `agent`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nimbus_agent::driver::container::{ContainerConfig, ContainerDriver};
use nimbus_agent::driver::vm::{VmConfig, VmDriver};
use nimbus_agent::driver::Driver;
use nimbus_agent::{Agent, AgentConfig};
use nimbus_api::NodeCapabilities;
use nimbus_server::{Server, ServerConfig};

use crate::cli::{AgentArgs, ServerArgs, UpArgs};

/// The default data directory: `/var/lib/nimbus` as root, else `~/.local/share/nimbus`.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/lib/nimbus")
    } else {
        std::env::var_os("HOME").map_or_else(
            || PathBuf::from(".nimbus"),
            |h| PathBuf::from(h).join(".local/share/nimbus"),
        )
    }
}

pub(crate) fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIMBUS_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,netlink_packet_route=error")
    });
    // netlink-packet-route warns about every IPv6 attribute newer than itself on each link
    // dump (the datapath loop dumps links every 10 s); that is noise, also under NIMBUS_LOG.
    let filter = match "netlink_packet_route=error".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

pub(crate) fn hostname() -> String {
    let raw = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "node".into());
    let mut s: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s = s.trim_matches('-').chars().take(63).collect();
    if s.is_empty() || !s.as_bytes()[0].is_ascii_lowercase() {
        s = format!("node-{s}").chars().take(63).collect();
    }
    s
}

/// The node's drivers, its capabilities now, and the VM driver if its accelerator must still be
/// probed (after registration; see [`probe_vms`]). A configured accelerator or a verdict cached
/// on this host makes the node VM-capable from its first registration.
fn drivers(
    agent_dir: &Path,
    scope: Option<&str>,
) -> (
    Vec<Arc<dyn Driver>>,
    NodeCapabilities,
    Option<Arc<VmDriver>>,
) {
    let mut drivers: Vec<Arc<dyn Driver>> = Vec::new();
    let mut caps = NodeCapabilities::default();
    let containers = ContainerConfig::new(agent_dir.join("containers"))
        .map(|c| match scope {
            Some(s) => c.scoped(s),
            None => c,
        })
        .and_then(ContainerDriver::new);
    match containers {
        Ok(d) => {
            drivers.push(Arc::new(d));
            caps.containers = true;
        }
        Err(e) => tracing::warn!("container driver unavailable: {e}"),
    }
    let vm = match VmDriver::new(VmConfig::from_env(agent_dir.join("vms"))) {
        Ok(d) => match d.capability() {
            Ok(()) => {
                let d = Arc::new(d);
                drivers.push(d.clone());
                if let Some(known) = d.known_accelerator() {
                    tracing::info!(
                        accelerator = known.accel.as_str(),
                        "VMs available: {}",
                        known.reason
                    );
                    caps.vms = true;
                    caps.accelerator = Some(known.accel.as_str().to_owned());
                    None
                } else {
                    caps.vm_unavailable_reason = Some("probing the VM accelerator".into());
                    caps.vm_probe_pending = true;
                    Some(d)
                }
            }
            Err(reason) => {
                tracing::warn!("VMs unavailable on this node: {reason}");
                caps.vm_unavailable_reason = Some(reason);
                None
            }
        },
        Err(e) => {
            tracing::warn!("VM driver unavailable: {e}");
            caps.vm_unavailable_reason = Some(e.to_string());
            None
        }
    };
    (drivers, caps, vm)
}

/// Runs the VM accelerator probe (KVM only if a guest really boots under it, else TCG) and then
/// tells the control plane whether the node can run VMs (VM creates waiting for the probe are
/// placed, or fail with the reason).
fn probe_vms(agent: Arc<Agent>, vm: Arc<VmDriver>, mut caps: NodeCapabilities) {
    tokio::spawn(async move {
        caps.vm_probe_pending = false;
        match vm.accelerator().await {
            Ok(accel) => {
                let why = vm.accelerator_reason().await.unwrap_or_default();
                tracing::info!(accelerator = accel, "VMs available: {why}");
                caps.vms = true;
                caps.accelerator = Some(accel.to_string());
                caps.vm_unavailable_reason = None;
            }
            Err(e) => {
                tracing::warn!("VMs unavailable: {e}");
                caps.vm_unavailable_reason = Some(e.to_string());
            }
        }
        let mut delay = std::time::Duration::from_millis(200);
        loop {
            match agent.set_capabilities(caps.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!("reporting VM capability failed, retrying: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    });
}

pub(crate) async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
    }
}

/// Makes the agent's data dir private (0700): it and the drivers' directories in it, and its
/// files (local records, the node credential) 0600. What runs inside instances keeps the
/// modes of its image.
fn private_agent_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    nimbus_server::restrict_tree(dir, 2, 1)
        .with_context(|| format!("restricting {} to its owner", dir.display()))
}

/// `nimbus up`.
pub async fn up(args: UpArgs) -> Result<()> {
    init_logging(args.log_json);
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let server = Server::start(ServerConfig {
        data_dir: data_dir.clone(),
        listen: args.listen,
        advertise_url: String::new(),
        node_id: 1,
        heartbeat_grace: Duration::from_secs(10),
        body_limit: 1 << 20,
        network_pool: args.network_pool,
        net_prefix: args.net_prefix,
        master_key_file: args.master_key_file,
        tls: nimbus_server::identity::TlsSettings::default(),
    })
    .await
    .with_context(|| format!("starting the control plane in {}", data_dir.display()))?;
    let url = format!("http://{}", server.local_addr);
    let agent_dir = data_dir.join("agent");
    // The node token is read only to register this node the first time (it then has its own
    // credential in the agent dir).
    let node_token = std::fs::read_to_string(data_dir.join("node.token"))
        .map(|t| t.trim().to_owned())
        .unwrap_or_default();
    let metrics_token = nimbus_server::load_or_create_token(&data_dir.join("metrics.token"))
        .context("creating the metrics token")?;
    let (drivers, caps, vm) = drivers(&agent_dir, None);
    private_agent_dir(&agent_dir)?;
    let agent = Agent::start(
        AgentConfig {
            name: args.node_name.unwrap_or_else(hostname),
            servers: vec![url.clone()],
            token: node_token,
            metrics_token: Some(metrics_token),
            data_dir: agent_dir,
            image_dir: data_dir.join("images"),
            listen: args.agent_listen,
            advertise_url: None,
            zone: String::new(),
            labels: std::collections::BTreeMap::new(),
            heartbeat_every: Duration::from_secs(2),
            stop_grace: Duration::from_secs(10),
            hollow: false,
            capacity: None,
            underlay_ip: None,
            nft_table: None,
            server_tls: None,
            api_tls: None,
            revocation: None,
        },
        drivers,
        caps.clone(),
    )
    .await
    .context("starting the node agent")?;
    if let Some(vm) = vm {
        probe_vms(agent.agent.clone(), vm, caps);
    }
    println!(
        "nimbus is ready at {url} (data {}, token {}, metrics token {})",
        data_dir.display(),
        data_dir.join("admin.token").display(),
        data_dir.join("metrics.token").display()
    );
    wait_for_signal().await;
    tracing::info!("shutting down; instances keep running");
    agent.shutdown().await;
    server.shutdown().await;
    Ok(())
}

fn read_secret(src: &Path) -> Result<String> {
    let token = std::fs::read_to_string(src)
        .with_context(|| format!("reading {}", src.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(!token.is_empty(), "{} is empty", src.display());
    Ok(token)
}

/// Keeps the SHA-256 of a shared token in the data dir (`<dest>.sha256`; refusing to replace a
/// different one); a plain copy an earlier build left at `dest` is removed.
fn install_token_hash(src: &Path, dest: &Path) -> Result<()> {
    let token = read_secret(src)?;
    let hash = nimbus_server::auth::token_hash_hex(&token);
    let hash_path = nimbus_server::token_hash_path(dest);
    match std::fs::read_to_string(&hash_path) {
        Ok(cur) if cur.trim() == hash => {}
        Ok(_) => anyhow::bail!(
            "{} holds the hash of a different token than {}",
            hash_path.display(),
            src.display()
        ),
        Err(_) => nimbus_server::write_private(&hash_path, format!("{hash}\n").as_bytes())
            .with_context(|| format!("writing {}", hash_path.display()))?,
    }
    if std::fs::read_to_string(dest).is_ok_and(|cur| cur.trim() == token) {
        std::fs::remove_file(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    Ok(())
}

/// Copies the cluster secret into the data dir (0600; refusing to replace a different one).
fn install_secret(src: &Path, dest: &Path) -> Result<()> {
    let secret = read_secret(src)?;
    anyhow::ensure!(
        secret.len() >= 32,
        "{}: a cluster secret needs at least 32 characters (e.g. 64 random hex digits)",
        src.display()
    );
    match std::fs::read_to_string(dest) {
        Ok(cur) if cur.trim() == secret => Ok(()),
        Ok(_) => anyhow::bail!(
            "{} already holds a different cluster secret than {}",
            dest.display(),
            src.display()
        ),
        Err(_) => nimbus_server::write_private(dest, format!("{secret}\n").as_bytes())
            .with_context(|| format!("writing {}", dest.display())),
    }
}

/// `nimbus server`.
pub async fn server(args: ServerArgs, ca: Option<PathBuf>) -> Result<()> {
    init_logging(args.log_json);
    let mut tls = tls_settings(&args)?;
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    if tls.mode != nimbus_server::identity::TlsMode::Plain
        && !args.join.is_empty()
        && !data_dir.join("pki/ca.crt").exists()
    {
        tls.cluster_ca =
            Some(cluster_ca(&args.join, ca.as_deref(), args.ca_fingerprint.as_deref()).await?);
    }
    nimbus_server::check_data_dir(&data_dir)
        .with_context(|| format!("starting the control plane in {}", data_dir.display()))?;
    if let Some(f) = &args.node_token_file {
        install_token_hash(f, &data_dir.join("node.token"))?;
    }
    if let Some(f) = &args.admin_token_file {
        install_token_hash(f, &data_dir.join("admin.token"))?;
    }
    if let Some(f) = &args.metrics_token_file {
        install_token_hash(f, &data_dir.join("metrics.token"))?;
    }
    if let Some(f) = &args.cluster_secret_file {
        install_secret(f, &data_dir.join(nimbus_server::CLUSTER_SECRET_FILE))?;
    }
    let node_id = nimbus_server::cluster::load_or_create_node_id(&data_dir)?;
    let opts = nimbus_server::ClusterOptions {
        bootstrap_expect: args.bootstrap_expect,
        peers: args.peers,
        join: args.join,
    };
    let waiting = opts.bootstrap_expect.is_some_and(|n| n > 1);
    let server = Server::start_with(
        ServerConfig {
            data_dir: data_dir.clone(),
            listen: args.listen,
            advertise_url: args.advertise.unwrap_or_default(),
            node_id,
            heartbeat_grace: Duration::from_secs(args.heartbeat_grace),
            body_limit: 1 << 20,
            network_pool: args.network_pool,
            net_prefix: args.net_prefix,
            master_key_file: args.master_key_file,
            tls,
        },
        opts,
    )
    .await
    .with_context(|| format!("starting the control plane in {}", data_dir.display()))?;
    let scheme = if server.app.pki.is_tls() {
        "https"
    } else {
        "http"
    };
    let node_token = args
        .node_token_file
        .clone()
        .unwrap_or_else(|| data_dir.join("node.token"));
    println!(
        "nimbus server {node_id} ready at {scheme}://{}{} (node token in {}, cluster secret in {})",
        server.local_addr,
        if waiting { ", forming the cluster" } else { "" },
        node_token.display(),
        data_dir.join(nimbus_server::CLUSTER_SECRET_FILE).display()
    );
    if let Some(ca) = &server.app.pki.ca {
        println!(
            "cluster CA {} (certificate in {})",
            ca.fingerprint(),
            data_dir.join("pki/ca.crt").display()
        );
    }
    wait_for_signal().await;
    server.shutdown().await;
    Ok(())
}

/// The CA of the TLS cluster a new server joins: `--ca`, or the CA a member presents if its
/// fingerprint is `--ca-fingerprint`.
async fn cluster_ca(
    join: &[String],
    ca: Option<&Path>,
    fingerprint: Option<&str>,
) -> Result<String> {
    if let Some(ca) = ca {
        return std::fs::read_to_string(ca)
            .with_context(|| format!("reading --ca {}", ca.display()));
    }
    let mut last = None;
    for url in join {
        match crate::tls_cmd::probe_ca(url).await {
            Ok((pem, fp)) => {
                return match fingerprint {
                    Some(want) if want.trim().eq_ignore_ascii_case(&fp) => Ok(pem),
                    Some(want) => anyhow::bail!("the cluster CA of {url} has fingerprint {fp}, not {want}: refusing to join"),
                    None => anyhow::bail!(
                        "the cluster CA of {url} is unknown; its fingerprint is {fp}. Pass --ca FILE or --ca-fingerprint {fp} after checking it"
                    ),
                }
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no --join URL")))
        .context("fetching the cluster CA to join (or pass --ca FILE)")
}

/// `--insecure`, `--tls-cert/--tls-key`, `--cert-lifetime` as server TLS settings.
fn tls_settings(args: &ServerArgs) -> Result<nimbus_server::identity::TlsSettings> {
    use nimbus_server::identity::{TlsMode, TlsSettings};
    let mode = match (&args.tls_cert, &args.tls_key) {
        _ if args.insecure => TlsMode::Plain,
        (Some(cert), Some(key)) => TlsMode::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, None) => TlsMode::InternalCa,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    Ok(TlsSettings {
        mode,
        cert_lifetime: args.cert_lifetime,
        cluster_ca: None,
    })
}

/// `nimbus agent`.
pub async fn agent(args: AgentArgs, ca: Option<PathBuf>) -> Result<()> {
    init_logging(args.log_json);
    let name = args.name.clone().unwrap_or_else(hostname);
    let node_tls = if args.token_file.is_some() || args.hollow {
        None
    } else {
        crate::tls_cmd::node_tls(
            &args.data_dir,
            &name,
            &args.servers,
            args.join_token.as_deref(),
            ca.as_deref(),
            args.ca_fingerprint.as_deref(),
        )
        .await?
    };
    let token = match &args.token_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the node token from {}", f.display()))?
            .trim()
            .to_string(),
        None if node_tls.is_some() => String::new(),
        None => anyhow::bail!(
            "no credential: pass --join-token (from `nimbus server join-token create`), or the legacy --node-token-file"
        ),
    };
    let metrics_token = args
        .metrics_token_file
        .as_deref()
        .map(read_secret)
        .transpose()?;
    let mut labels = std::collections::BTreeMap::new();
    for kv in &args.labels {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("invalid --label {kv:?}: use KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    if args.hollow {
        return crate::hollow::run(args, token, labels).await;
    }
    let (drivers, caps, vm) = drivers(&args.data_dir, args.runtime_scope.as_deref());
    private_agent_dir(&args.data_dir)?;
    if let Some(t) = &node_tls {
        t.spawn_renewal(args.servers.clone());
    }
    let agent = Agent::start(
        AgentConfig {
            name,
            servers: args.servers,
            token,
            metrics_token,
            image_dir: args.data_dir.join("images"),
            data_dir: args.data_dir,
            listen: args.listen,
            advertise_url: args.advertise,
            zone: args.zone,
            labels,
            heartbeat_every: Duration::from_secs(2),
            stop_grace: Duration::from_secs(10),
            hollow: false,
            capacity: None,
            underlay_ip: args.underlay_ip,
            nft_table: args.nft_table,
            server_tls: node_tls.as_ref().map(|t| t.server_tls.clone()),
            api_tls: node_tls.as_ref().map(|t| t.api_tls.clone()),
            revocation: node_tls.as_ref().map(|t| t.revocation.clone()),
        },
        drivers,
        caps.clone(),
    )
    .await
    .context("starting the node agent")?;
    if let Some(vm) = vm {
        probe_vms(agent.agent.clone(), vm, caps);
    }
    println!("nimbus agent ready (API at {})", agent.local_addr);
    wait_for_signal().await;
    agent.shutdown().await;
    Ok(())
}
