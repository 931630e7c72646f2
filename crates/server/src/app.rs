//! Shared server state and the write path: HTTP -> typed command -> Raft log -> result.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nimbus_api::{ApiError, ErrorCode};
use nimbus_image::ImageStore;
use nimbus_state::raft::RaftNode;
use nimbus_state::{Command, CommandOutput, StateMachine};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: std::net::SocketAddr,
    /// URL other members and agents reach this server at.
    pub advertise_url: String,
    /// Raft node id.
    pub node_id: u64,
    /// A node is marked down after this long without a heartbeat.
    pub heartbeat_grace: Duration,
    /// Maximum JSON request body.
    pub body_limit: usize,
    /// Pool network CIDRs are carved from, set when the cluster is created.
    pub network_pool: String,
    /// Datapath name prefix (bridges, VXLAN devices, nftables table), set when the cluster is
    /// created.
    pub net_prefix: String,
    /// The cluster master key to install when the data dir has none (`--master-key-file`).
    pub master_key_file: Option<PathBuf>,
    /// TLS of the API and the cluster's certificates.
    pub tls: crate::identity::TlsSettings,
}

/// Everything handlers need.
#[derive(Clone)]
pub struct AppState {
    /// Settings.
    pub cfg: Arc<ServerConfig>,
    /// The Raft node.
    pub raft: RaftNode,
    /// Image store.
    pub images: Arc<ImageStore>,
    /// What bearer tokens are checked against (see [`crate::auth`]).
    pub creds: Arc<crate::auth::Credentials>,
    /// HTTP client for calls to agents.
    pub http: reqwest::Client,
    /// HTTP client for calls to other servers (cluster info, joins, proxied membership
    /// changes; see [`crate::peers`]).
    pub peer_http: reqwest::Client,
    /// Group-committing write path.
    pub proposer: crate::proposer::Proposer,
    /// Forwards writes and read barriers from a follower to the leader.
    pub forwarder: crate::forward::Forwarder,
    /// Cluster identity and membership settings of this server.
    pub cluster: Arc<crate::cluster::ClusterState>,
    /// HTTP client for image blob downloads from peer servers.
    pub blob_http: reqwest::Client,
    /// Blob downloads from peers in progress (one per digest).
    pub blob_fetches: Arc<crate::blobs::BlobFetches>,
    /// Node leases and telemetry (meaningful on the leader only).
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// The network map last sent to each node (for deltas).
    pub net_maps: Arc<crate::beats::SentMaps>,
    /// The cluster master key (and, during a rotation, the other key).
    pub keys: Arc<crate::masterkey::MasterKeys>,
    /// When this leader first saw each load-balancer drain (its timeout clock).
    pub drain_clock: Arc<std::sync::Mutex<std::collections::HashMap<String, tokio::time::Instant>>>,
    /// The cluster CA, this server's certificate, the revocation list.
    pub pki: Arc<crate::identity::Pki>,
}

pub use crate::proposer::now;

impl AppState {
    /// Proposes a command through Raft and returns its output or the error that refused it.
    pub async fn propose(&self, command: Command) -> Result<CommandOutput, ApiError> {
        self.proposer.propose(command).await
    }

    /// Reads the applied state.
    pub fn read<R>(&self, f: impl FnOnce(&StateMachine) -> R) -> R {
        self.raft.read(f)
    }

    /// Waits until a linearizable read is possible: the leader confirmed its leadership with
    /// a quorum and this server (leader or follower) has applied everything committed before.
    pub async fn barrier(&self) -> Result<(), ApiError> {
        self.forwarder.barrier().await.map_err(|e| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("cannot serve a linearizable read: {e}"),
            )
        })
    }
}
