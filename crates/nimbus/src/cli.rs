//! Command-line definitions (clap).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// nimbus: a self-hosted cloud in one binary.
#[derive(Debug, Parser)]
#[command(name = "nimbus", version, about, propagate_version = true)]
pub struct Cli {
    /// API URL (default: the local `nimbus up`).
    #[arg(long, global = true, env = "NIMBUS_URL")]
    pub url: Option<String>,
    /// Bearer token (default: the local `nimbus up`'s admin token).
    #[arg(long, global = true, env = "NIMBUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Project.
    #[arg(long, global = true, env = "NIMBUS_PROJECT", default_value = "default")]
    pub project: String,
    /// The cluster CA certificate (PEM) to trust for an https:// URL (default: the CA pinned
    /// on first use, see `~/.config/nimbus/known_cas`).
    #[arg(long, global = true, env = "NIMBUS_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Command.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format of read verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// A readable table.
    #[default]
    Table,
    /// JSON.
    Json,
}

/// `-o json`.
#[derive(Debug, Args, Clone, Copy)]
pub struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start an all-in-one cloud on this machine (server + agent, embedded store).
    Up(UpArgs),
    /// Run a control-plane server.
    Server(ServerArgs),
    /// Run a node agent.
    Agent(AgentArgs),
    /// Create and start an instance.
    Launch(LaunchArgs),
    /// List instances.
    #[command(alias = "ls")]
    List(OutputArg),
    /// Show one instance.
    Show {
        /// Instance name.
        name: String,
        /// Output.
        #[command(flatten)]
        o: OutputArg,
    },
    /// Print an instance's log (container output or VM console).
    Logs {
        /// Instance name.
        name: String,
        /// Keep following.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<u64>,
    },
    /// Run a command inside an instance; exits with its exit code.
    Exec {
        /// Instance name.
        name: String,
        /// Command and arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Attach to a VM's serial console (Ctrl-] detaches).
    Console {
        /// Instance name.
        name: String,
    },
    /// Stop an instance.
    Stop {
        /// Instance name.
        name: String,
    },
    /// Start a stopped instance.
    Start {
        /// Instance name.
        name: String,
    },
    /// Restart an instance.
    Restart {
        /// Instance name.
        name: String,
    },
    /// Delete an instance and everything it has on its node.
    #[command(alias = "rm")]
    Delete {
        /// Instance name.
        name: String,
        /// Return without waiting for the node to finish.
        #[arg(long)]
        no_wait: bool,
    },
    /// Images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Projects.
    #[command(subcommand)]
    Project(ProjectCmd),
    /// Load balancers.
    #[command(subcommand)]
    Lb(crate::lb_cmd::LbCmd),
    /// Networks (VPCs).
    #[command(subcommand, alias = "net")]
    Network(crate::net_cmd::NetworkCmd),
    /// Security groups.
    #[command(subcommand, name = "sg", alias = "security-group")]
    Sg(crate::net_cmd::SgCmd),
    /// Secrets (sealed values for instances and load balancers).
    #[command(subcommand)]
    Secret(crate::secret_cmd::SecretCmd),
    /// Persistent volumes.
    #[command(subcommand, alias = "vol")]
    Volume(crate::volume_cmd::VolumeCmd),
    /// Storage pools.
    #[command(subcommand)]
    Storage(crate::volume_cmd::StorageCmd),
    /// The server cluster as a whole.
    #[command(subcommand)]
    Cluster(crate::secret_cmd::ClusterCmd),
    /// Cluster events.
    Events {
        /// Keep following.
        #[arg(short, long)]
        follow: bool,
        /// All projects' and cluster events.
        #[arg(long)]
        all: bool,
        /// Output.
        #[command(flatten)]
        o: OutputArg,
    },
    /// Internal: the per-container shim.
    #[command(hide = true)]
    Shim {
        /// Shim arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// `nimbus up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Data directory.
    #[arg(long, env = "NIMBUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// API listen address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Agent API listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub agent_listen: SocketAddr,
    /// Node name (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Pool network CIDRs are carved from (/8 to /24; set when the cluster is created).
    #[arg(long, alias = "node-pool", default_value = "10.213.0.0/16")]
    pub network_pool: String,
    /// Prefix of the datapath's names: bridges `<prefix>b<vni>`, VXLAN `<prefix>v<vni>`, the
    /// nftables table `inet <prefix>` (1-6 letters/digits; set when the cluster is created).
    #[arg(long, alias = "bridge", default_value = "nimbus")]
    pub net_prefix: String,
    /// The cluster master key (32 bytes, mode 0600) to install when the data dir has none;
    /// by default the first server creates `<data-dir>/master.key` and others get it from a
    /// member.
    #[arg(long, value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Log as JSON.
    #[arg(long)]
    pub log_json: bool,
}

/// `nimbus server`: run a control-plane server, or manage the server cluster
/// (`nimbus server list|join|remove`).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    /// Cluster membership verbs (without one, run a server).
    #[command(subcommand)]
    pub cmd: Option<ServerCmd>,
    /// Data directory.
    #[arg(long, env = "NIMBUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// API listen address.
    #[arg(long, default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// URL other members and agents reach this server at.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Pool network CIDRs are carved from (/8 to /24; set when the cluster is created).
    #[arg(long, alias = "node-pool", default_value = "10.213.0.0/16")]
    pub network_pool: String,
    /// Prefix of the datapath's names: bridges `<prefix>b<vni>`, VXLAN `<prefix>v<vni>`, the
    /// nftables table `inet <prefix>` (1-6 letters/digits; set when the cluster is created).
    #[arg(long, alias = "bridge", default_value = "nimbus")]
    pub net_prefix: String,
    /// The cluster master key (32 bytes, mode 0600) to install when the data dir has none;
    /// by default the first server creates `<data-dir>/master.key` and others get it from a
    /// member.
    #[arg(long, value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Form a new cluster once this many servers (this one included) see each other; give
    /// the others with --peers or --join.
    #[arg(long, value_name = "N")]
    pub bootstrap_expect: Option<usize>,
    /// Other servers' URLs (comma-separated or repeated), for --bootstrap-expect.
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    pub peers: Vec<String>,
    /// Join an existing cluster through this member (repeatable; any member works). A TLS
    /// server also needs the cluster's CA: --ca FILE or --ca-fingerprint.
    #[arg(long, value_name = "URL")]
    pub join: Vec<String>,
    /// The cluster's node token (agents register new nodes with it); every server needs the
    /// same one. Only its SHA-256 is kept in the data dir.
    #[arg(long, value_name = "FILE")]
    pub node_token_file: Option<PathBuf>,
    /// The cluster's admin token, so clients can use any server. Only its SHA-256 is kept in
    /// the data dir.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The cluster's metrics token, with which a Prometheus scrapes the agents' `/metrics`
    /// (every server needs the same one; default: `<data-dir>/metrics.token`, created on first
    /// start). Only its SHA-256 is kept in the data dir and handed to the agents.
    #[arg(long, value_name = "FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// The servers' shared secret (Raft, forwarded writes, joins; never given to agents):
    /// every server of a cluster needs the same one, e.g. the `cluster.secret` of the first
    /// server, or 64 random hex digits. Copied into the data dir (0600). Required to form or
    /// join a cluster with other servers.
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Seconds without a heartbeat before a node is marked down.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub heartbeat_grace: u64,
    /// Serve the API, and talk to the other servers, in plain HTTP (no TLS, no certificates).
    #[arg(long)]
    pub insecure: bool,
    /// With --join and no --ca: the expected SHA-256 fingerprint of the cluster CA
    /// (`sha256:...`, printed by the first server); the new server takes the CA over.
    #[arg(long, value_name = "SHA256")]
    pub ca_fingerprint: Option<String>,
    /// Serve the API with this certificate chain (PEM) instead of one of the internal CA.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Lifetime of the certificates the internal CA issues to servers and agents (renewed
    /// at 2/3 of it), e.g. 24h, 30m, 30s.
    #[arg(long, default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub cert_lifetime: std::time::Duration,
    /// Log as JSON.
    #[arg(long)]
    pub log_json: bool,
}

/// `nimbus server list|join|remove` (via the API of any server).
#[derive(Debug, Subcommand)]
pub enum ServerCmd {
    /// List the servers of the cluster, their role and the leader.
    #[command(alias = "ls")]
    List(OutputArg),
    /// Add the running server at URL to the cluster (learner, then voter).
    Join {
        /// The new server's URL (its own id: an argument named `url` would be the global
        /// `--url`, the server the request goes to).
        #[arg(id = "new_server_url", value_name = "URL")]
        url: String,
    },
    /// Remove a server (by id or URL); the last voter cannot be removed.
    Remove {
        /// Node id or URL.
        server: String,
    },
    /// Revoke a server's certificates: all of them for good (it cannot come back under its
    /// id), or only the one of --serial. Servers and agents refuse them within a second.
    Revoke {
        /// The server's name, `server-<id in hex>` (the NAME column of `nimbus server list`).
        name: String,
        /// Revoke only the certificate with this serial (hex).
        #[arg(long)]
        serial: Option<String>,
        /// Also when it is the server answering, or the last server not revoked.
        #[arg(long)]
        force: bool,
    },
    /// One-time tokens new agents join with (`nimbus agent --join-token`).
    #[command(subcommand)]
    JoinToken(JoinTokenCmd),
}

/// `nimbus server join-token ...`.
#[derive(Debug, Subcommand)]
pub enum JoinTokenCmd {
    /// Create a one-time join token (printed once; servers keep only its hash).
    Create {
        /// How long it stays valid, e.g. 1h, 30m.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: std::time::Duration,
    },
}

/// `nimbus agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Control-plane server URL (repeat for several).
    #[arg(long = "server", required = true)]
    pub servers: Vec<String>,
    /// LEGACY (kept for one release): authenticate with the cluster's shared node token from
    /// this file (the server's `<data-dir>/node.token`) instead of a node certificate.
    #[arg(
        long,
        alias = "node-token-file",
        env = "NIMBUS_NODE_TOKEN_FILE",
        conflicts_with = "join_token"
    )]
    pub token_file: Option<PathBuf>,
    /// Join the cluster with this one-time token (`nimbus server join-token create`): the
    /// agent makes its key, gets a certificate of the cluster CA and authenticates with it
    /// (mTLS) from then on; later starts reuse `<data-dir>/pki`.
    #[arg(long, env = "NIMBUS_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// With --join-token and no --ca: the expected SHA-256 fingerprint of the cluster CA
    /// (`sha256:...`, printed by `nimbus server` and `join-token create`).
    #[arg(long)]
    pub ca_fingerprint: Option<String>,
    /// File holding a token that may scrape this agent's `/metrics` (besides the servers).
    #[arg(long, value_name = "FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// Node name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Data directory.
    #[arg(long, default_value = "/var/lib/nimbus-agent")]
    pub data_dir: PathBuf,
    /// Agent API listen address.
    #[arg(long, default_value = "0.0.0.0:7444")]
    pub listen: SocketAddr,
    /// URL the control plane reaches this agent at.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Zone.
    #[arg(long, default_value = "")]
    pub zone: String,
    /// Node label K=V (placement constraints match on these).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// This node's underlay address, where other nodes' VXLAN tunnels end (default: the
    /// listen address, else the source address towards the server).
    #[arg(long)]
    pub underlay_ip: Option<std::net::Ipv4Addr>,
    /// The nftables table this agent owns (default: the cluster's datapath prefix); only
    /// needed when several agents share one network namespace.
    #[arg(long)]
    pub nft_table: Option<String>,
    /// Log as JSON.
    #[arg(long)]
    pub log_json: bool,
    /// Only when several agents run on one machine (tests): keeps this agent's containers
    /// (cgroups, runc state, network namespace names) apart from the others'.
    #[arg(long, value_parser = parse_scope)]
    pub runtime_scope: Option<String>,
    /// TEST MODE (like kubemark): a hollow node registers, heartbeats and reports its
    /// instances as running without running anything. Never use it for real nodes.
    #[arg(long)]
    pub hollow: bool,
    /// With --hollow: run this many hollow nodes in this process, named NAME-0, NAME-1, ...
    #[arg(long, default_value_t = 1, requires = "hollow")]
    pub hollow_count: u32,
    /// With --hollow: the CPUs each hollow node registers (default: this machine's).
    #[arg(long, requires = "hollow")]
    pub hollow_cpus: Option<u32>,
    /// With --hollow: the memory each hollow node registers, e.g. 32G (default: this
    /// machine's).
    #[arg(long, requires = "hollow")]
    pub hollow_memory: Option<String>,
}

/// `30s`, `5m`, `24h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 30s, 5m, 24h, 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid duration unit {unit:?}: use s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} must be positive and reasonable"))
}

fn parse_scope(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Ok(s.to_owned())
    } else {
        Err("use 1 to 32 letters, digits or '-'".into())
    }
}

/// `nimbus launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Image name.
    pub image: String,
    /// Instance name.
    pub name: String,
    /// vCPUs reserved and the CPU limit (a container without it is best effort: no
    /// reservation, no limit; a VM gets 1).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory reserved and the memory limit, e.g. 512M (a container without it is best
    /// effort: no reservation, no limit beyond the node's; a VM gets 512M).
    #[arg(long)]
    pub memory: Option<String>,
    /// Disk (e.g. 2G).
    #[arg(long)]
    pub disk: Option<String>,
    /// Restart policy: never, on-failure, always.
    #[arg(long, default_value = "never")]
    pub restart: String,
    /// Environment K=V.
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// Label K=V.
    #[arg(long = "label", short = 'l')]
    pub labels: Vec<String>,
    /// Run as a virtual machine.
    #[arg(long)]
    pub vm: bool,
    /// First-boot script (VMs).
    #[arg(long)]
    pub user_data: Option<PathBuf>,
    /// SSH public key file (VMs).
    #[arg(long)]
    pub ssh_key: Vec<PathBuf>,
    /// Idempotency key (a retried launch with the same key creates nothing new).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Return as soon as the instance is accepted.
    #[arg(long)]
    pub no_wait: bool,
    /// Placement constraint on node labels or zone (`disk=ssd`, `tier!=batch`, `zone in (a,b)`).
    #[arg(long = "constraint")]
    pub constraints: Vec<String>,
    /// Spread group: members spread across zones and nodes.
    #[arg(long)]
    pub spread_group: Option<String>,
    /// With --spread-group: never two members on one node.
    #[arg(long)]
    pub anti_affinity: bool,
    /// Priority class: critical, high, normal (default), low.
    #[arg(long)]
    pub priority: Option<String>,
    /// Network (default `default`).
    #[arg(long)]
    pub network: Option<String>,
    /// Subnet of the network (default: its first).
    #[arg(long)]
    pub subnet: Option<String>,
    /// Security group (repeatable; default `default`).
    #[arg(long = "sg", value_name = "NAME")]
    pub security_groups: Vec<String>,
    /// Forward a node port to the instance: HOSTPORT:PORT[/tcp|udp] (repeatable).
    #[arg(long = "publish", short = 'p', value_name = "HOSTPORT:PORT[/PROTO]")]
    pub publish: Vec<String>,
    /// Mount a secret of the project as a read-only file (repeatable).
    #[arg(long = "secret", value_name = "NAME:/PATH")]
    pub secrets: Vec<String>,
    /// Set an environment variable from a secret of the project (repeatable).
    #[arg(long = "secret-env", value_name = "NAME:VAR")]
    pub secret_env: Vec<String>,
    /// Attach a volume of the project: NAME:/PATH, or NAME for a VM's raw disk (repeatable;
    /// refused until volumes have a data path).
    #[arg(long = "volume", value_name = "NAME:/PATH")]
    pub volumes: Vec<String>,
    /// Command and arguments (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `nimbus image`.
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Import an OCI image-layout or `docker save` tarball.
    Import {
        /// Tarball.
        file: PathBuf,
        /// Name (default: from the tarball).
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    List(OutputArg),
}

/// `nimbus node`.
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    List(OutputArg),
    /// Stop placing new instances on a node.
    Cordon {
        /// Node.
        name: String,
    },
    /// Allow placements again.
    Uncordon {
        /// Node.
        name: String,
    },
    /// Cordon a node and move its instances to other nodes.
    Drain {
        /// Node.
        name: String,
    },
    /// Remove a node (admin): its credential stops working at once; to come back its agent
    /// registers anew with the node token. Refused while instances are assigned to it.
    #[command(alias = "rm")]
    Remove {
        /// Node.
        name: String,
        /// Remove it even with instances assigned: it is fenced like a lost node first
        /// (instances that restart move to other nodes, the others fail).
        #[arg(long)]
        force: bool,
    },
    /// Revoke every certificate of a node for good (the name cannot join again), or only the
    /// one of --serial (the node may join again with a fresh join token): refused at its next
    /// handshake or request, on every server within a second.
    Revoke {
        /// Node.
        name: String,
        /// Revoke only the certificate with this serial (hex, as the agent logs it).
        #[arg(long)]
        serial: Option<String>,
    },
}

/// `nimbus project`.
#[derive(Debug, Subcommand)]
pub enum ProjectCmd {
    /// Create a project.
    Create {
        /// Name.
        name: String,
    },
    /// List projects.
    List(OutputArg),
    /// Delete an empty project.
    Delete {
        /// Name.
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "0s", "1w", "h", "-5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
    #[test]
    fn server_join_sends_to_the_url_not_to_the_new_server() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from([
            "nimbus",
            "--url",
            "https://member:7443",
            "server",
            "join",
            "https://new:7443",
        ])
        .unwrap();
        assert_eq!(cli.url.as_deref(), Some("https://member:7443"));
        let super::Command::Server(super::ServerArgs {
            cmd: Some(super::ServerCmd::Join { url }),
            ..
        }) = cli.command
        else {
            panic!("not server join");
        };
        assert_eq!(url, "https://new:7443");
    }
}
