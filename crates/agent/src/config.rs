//! Agent settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name (DNS label), stable across restarts.
    pub name: String,
    /// Control-plane URLs (any server; the agent fails over between them).
    pub servers: Vec<String>,
    /// The shared node token: used only to register this node the first time (afterwards the
    /// node's own credential, see [`crate::credential`]).
    pub token: String,
    /// A token Prometheus may scrape `/metrics` with, besides the servers and the cluster's
    /// metrics token (whose hash comes with the registration answer).
    pub metrics_token: Option<String>,
    /// Agent data directory (local state, drivers' state).
    pub data_dir: PathBuf,
    /// Image store directory (shared with the server under `nimbus up`).
    pub image_dir: PathBuf,
    /// Address of the agent's own API.
    pub listen: SocketAddr,
    /// URL the control plane reaches the agent API at (default `http://<listen>`).
    pub advertise_url: Option<String>,
    /// Zone.
    pub zone: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Heartbeat period.
    pub heartbeat_every: Duration,
    /// Grace period of a stop before the hard kill.
    pub stop_grace: Duration,
    /// Hollow node (`nimbus agent --hollow`, a test mode): image layers are not pulled and no
    /// utilisation is measured; pair it with the hollow driver.
    pub hollow: bool,
    /// The capacity to register instead of the machine's (hollow nodes).
    pub capacity: Option<nimbus_api::Capacity>,
    /// The node's underlay address (VXLAN endpoint); `None`: the source address towards the
    /// first server.
    pub underlay_ip: Option<std::net::Ipv4Addr>,
    /// The nftables table the agent owns (default: the cluster's datapath prefix). Agents
    /// sharing a network namespace (tests) need distinct tables.
    pub nft_table: Option<String>,
    /// TLS to the servers with this node's client certificate (joined with a join token);
    /// `None`: the node token over whatever the URLs say.
    pub server_tls: Option<rustls::ClientConfig>,
    /// TLS of the agent's own API: exec, logs and console need a server certificate of the
    /// cluster CA, `/metrics` takes one or the metrics token; `None`: plain HTTP with the
    /// servers' bearer credential.
    pub api_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// The server certificates `api_tls` and `server_tls` refuse, kept current from the
    /// revocations that come with the assignments.
    pub revocation: Option<std::sync::Arc<nimbus_pki::ServerRevocationList>>,
}
