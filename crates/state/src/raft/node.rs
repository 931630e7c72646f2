//! [`RaftNode`]: the facade the server uses to open, bootstrap, write to and read from the
//! replicated state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, Fatal, ForwardToLeader, InitializeError, RaftError};
use openraft::{BasicNode, Raft, ServerState, SnapshotPolicy};
use redb::Durability;
use tokio::sync::watch;

use super::db::{self, META, META_COMMITTED, META_LAST_PURGED, META_NODE_ID, META_VOTE};
use super::log_store::LogStore;
use super::network::HttpNetworkFactory;
use super::sm_store::{self, Applied, SharedState, StateMachineStore};
use super::{LogId, TypeConfig, Vote};
use crate::command::{CommandEnvelope, CommandResult};
use crate::machine::StateMachine;

/// The file name of the Raft database inside the data dir.
pub const DB_FILE: &str = "raft.redb";

/// How long [`RaftNode::write`] and [`RaftNode::linearizable_barrier`] wait before giving up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`RaftNode::bootstrap_single`] waits for the node to become leader.
pub const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`RaftNode::shutdown`] waits for storage tasks to release the database.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Heartbeat interval (ms). Also the timeout of one append-entries RPC.
pub const HEARTBEAT_MS: u64 = 200;
/// Election timeout range (ms).
pub const ELECTION_TIMEOUT_MS: (u64, u64) = (600, 1200);

/// How to open a Raft node.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This node's Raft id; stable for the life of the data dir.
    pub node_id: u64,
    /// Directory holding `raft.redb` (created if missing).
    pub data_dir: PathBuf,
    /// The base URL peers reach this server at, e.g. `http://127.0.0.1:7443`.
    pub advertise_url: String,
    /// The shared secret peers authenticate Raft RPCs with.
    pub cluster_secret: String,
    /// Take a snapshot (and compact the log) every this many log entries; 0 disables
    /// automatic snapshots.
    pub snapshot_every: u64,
}

impl RaftConfig {
    /// The openraft configuration derived from this config: timing for servers on one LAN,
    /// snapshots every `snapshot_every` entries, keeping half that (at most 1000) entries
    /// of log behind a snapshot for slow followers.
    pub fn openraft_config(&self) -> openraft::Config {
        openraft::Config {
            cluster_name: "nimbus".to_owned(),
            heartbeat_interval: HEARTBEAT_MS,
            election_timeout_min: ELECTION_TIMEOUT_MS.0,
            election_timeout_max: ELECTION_TIMEOUT_MS.1,
            install_snapshot_timeout: 60_000,
            snapshot_policy: if self.snapshot_every == 0 {
                SnapshotPolicy::Never
            } else {
                SnapshotPolicy::LogsSinceLast(self.snapshot_every)
            },
            max_in_snapshot_log_to_keep: (self.snapshot_every / 2).min(1000),
            ..openraft::Config::default()
        }
    }
}

/// Why a node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data dir could not be created.
    #[error("cannot create data dir {path}")]
    DataDir {
        /// The dir.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The database file could not be opened (not a redb file, corrupt, or in use).
    #[error(
        "cannot open Raft database {path} (corrupt, not a redb file, or in use by another process)"
    )]
    Database {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored value could not be read or decoded.
    #[error("Raft database {path} is corrupt: cannot read {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What could not be read.
        what: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stored snapshot could not be decoded.
    #[error("the snapshot stored in {path} cannot be decoded (corrupt, or written by an incompatible version)")]
    Snapshot {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The data dir belongs to another node.
    #[error("Raft database {path} belongs to node {found}, not node {expected}")]
    NodeIdMismatch {
        /// The file.
        path: PathBuf,
        /// The id stored in the file.
        found: u64,
        /// The configured id.
        expected: u64,
    },
    /// The log writer thread could not be started.
    #[error("cannot start the Raft log writer thread")]
    Writer(#[source] std::io::Error),
    /// The openraft configuration is invalid.
    #[error("invalid Raft configuration")]
    Config(#[source] Box<openraft::ConfigError>),
    /// openraft failed to start (usually a storage error while reading the log).
    #[error("cannot start Raft")]
    Start(#[source] Box<Fatal<u64>>),
}

/// Why a write (or barrier) did not go through. Serializable: a server forwarding a write to
/// the leader gets it back over `/raft/client-write`.
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum WriteError {
    /// This node is not the leader; send the request to the leader (if known).
    #[error("not the Raft leader (leader: {})", leader_url.as_deref().unwrap_or("unknown"))]
    ForwardToLeader {
        /// The leader's id, if known.
        leader_id: Option<u64>,
        /// The leader's base URL, if known.
        leader_url: Option<String>,
    },
    /// The cluster cannot serve the request right now (no quorum, shutting down).
    #[error("Raft unavailable: {0}")]
    Unavailable(String),
    /// The request did not complete in time; a write may or may not have been committed.
    #[error("Raft request timed out after {0:?}; the outcome is unknown")]
    Timeout(Duration),
    /// Raft hit an unrecoverable error (storage failure, panic).
    #[error("Raft failed: {0}")]
    Fatal(String),
    /// The request is refused (e.g. removing the last voter).
    #[error("{0}")]
    Refused(String),
}

/// Why initialization failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The membership does not contain this node.
    #[error("this node is not in the initial membership: {0}")]
    NotInMembers(String),
    /// No leader was elected in time after initialization.
    #[error("no Raft leader elected within {0:?}")]
    NoLeader(Duration),
    /// Raft failed.
    #[error("Raft failed: {0}")]
    Fatal(String),
}

fn fatal_to_write(f: &Fatal<u64>) -> WriteError {
    match f {
        Fatal::Stopped => WriteError::Unavailable("Raft is shut down".to_owned()),
        other => WriteError::Fatal(other.to_string()),
    }
}

/// Opens (or creates) the Raft storage in `data_dir` for node `node_id`: the log store and the
/// state machine store restored from the last snapshot.
pub fn open_storage(
    data_dir: &Path,
    node_id: u64,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    std::fs::create_dir_all(data_dir).map_err(|source| OpenError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let path = data_dir.join(DB_FILE);
    let db = db::open(&path).map_err(|source| OpenError::Database {
        path: path.clone(),
        source,
    })?;
    let corrupt = |what: &'static str| {
        let path = path.clone();
        move |e: db::DbError| OpenError::Corrupt {
            path,
            what,
            source: Box::new(e),
        }
    };

    match db::get_json::<u64>(&db, META, META_NODE_ID).map_err(corrupt("node id"))? {
        Some(found) if found != node_id => {
            return Err(OpenError::NodeIdMismatch {
                path,
                found,
                expected: node_id,
            });
        }
        Some(_) => {}
        None => db::put_meta(&db, META_NODE_ID, &node_id, Durability::Immediate)
            .map_err(corrupt("node id"))?,
    }
    db::get_json::<Vote>(&db, META, META_VOTE).map_err(corrupt("vote"))?;
    db::get_json::<Option<LogId>>(&db, META, META_COMMITTED)
        .map_err(corrupt("committed log id"))?;
    db::get_json::<LogId>(&db, META, META_LAST_PURGED).map_err(corrupt("last purged log id"))?;

    let applied = match sm_store::load_snapshot(&db).map_err(corrupt("snapshot"))? {
        None => Applied::default(),
        Some((meta, data)) => {
            let mut applied =
                sm_store::decode_snapshot(&data).map_err(|source| OpenError::Snapshot {
                    path: path.clone(),
                    source,
                })?;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership;
            tracing::info!(
                last_applied = ?applied.last_applied,
                revision = applied.state.revision,
                "restored state machine from snapshot"
            );
            applied
        }
    };
    let growth = Arc::new(super::growth::LogGrowth::default());
    let log = LogStore::new(db.clone(), growth.clone()).map_err(OpenError::Writer)?;
    Ok((log, StateMachineStore::new(db, applied, growth)))
}

struct Inner {
    id: u64,
    raft: Raft<TypeConfig>,
    shared: SharedState,
    applied_rx: watch::Receiver<u64>,
    wakeups: Arc<super::wakeups::Wakeups>,
    /// Triggers snapshots by log size and age (see `growth.rs`).
    snapshot_policy: tokio::task::JoinHandle<()>,
    secret: String,
    advertise_url: String,
    /// Fails `changed()` once every storage task has let go of the database after shutdown.
    db_closed: watch::Receiver<()>,
}

/// A running Raft node: the openraft instance, its storage and the applied state. Cheap to
/// clone.
#[derive(Clone)]
pub struct RaftNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.inner.id)
            .field("advertise_url", &self.inner.advertise_url)
            .finish_non_exhaustive()
    }
}

impl RaftNode {
    /// Opens or creates the storage in `cfg.data_dir`, restores the last snapshot and starts
    /// openraft with the timing of [`RaftConfig::openraft_config`].
    pub async fn open(cfg: RaftConfig) -> Result<Self, OpenError> {
        let raft_cfg = cfg.openraft_config();
        Self::open_with(cfg, raft_cfg).await
    }

    /// Like [`RaftNode::open`] with an explicit openraft configuration (tests, tuning).
    pub async fn open_with(cfg: RaftConfig, raft_cfg: openraft::Config) -> Result<Self, OpenError> {
        Self::open_with_client(cfg, raft_cfg, None).await
    }

    /// Like [`RaftNode::open_with`], sending the Raft RPCs with `client` (e.g. one speaking
    /// mTLS with this server's certificate) instead of a plain HTTP client.
    pub async fn open_with_client(
        cfg: RaftConfig,
        raft_cfg: openraft::Config,
        client: Option<reqwest::Client>,
    ) -> Result<Self, OpenError> {
        let raft_cfg = Arc::new(
            raft_cfg
                .validate()
                .map_err(|e| OpenError::Config(Box::new(e)))?,
        );
        let (log, sm) = open_storage(&cfg.data_dir, cfg.node_id)?;
        let db_closed = log.closed_signal();
        let shared = sm.shared();
        let applied_rx = sm.applied_watch();
        let wakeups = sm.wakeups();
        let growth = sm.growth();
        let network = match client {
            Some(c) => HttpNetworkFactory::with_client(c, cfg.cluster_secret.clone()),
            None => HttpNetworkFactory::new(cfg.cluster_secret.clone()),
        };
        let raft = Raft::new(cfg.node_id, raft_cfg, network, log, sm)
            .await
            .map_err(|e| OpenError::Start(Box::new(e)))?;
        tracing::info!(node_id = cfg.node_id, data_dir = %cfg.data_dir.display(), "raft node started");
        let policy = tokio::spawn(snapshot_policy(raft.clone(), growth));
        Ok(Self {
            inner: Arc::new(Inner {
                id: cfg.node_id,
                raft,
                shared,
                applied_rx,
                wakeups,
                snapshot_policy: policy,
                secret: cfg.cluster_secret,
                advertise_url: cfg.advertise_url,
                db_closed,
            }),
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.id
    }

    /// This node's advertised base URL.
    pub fn advertise_url(&self) -> &str {
        &self.inner.advertise_url
    }

    pub(crate) fn cluster_secret(&self) -> &str {
        &self.inner.secret
    }

    /// The underlying openraft instance.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.inner.raft
    }

    /// Initializes a one-voter cluster of this node unless already initialized (idempotent
    /// across restarts), then waits until a leader is known.
    pub async fn bootstrap_single(&self) -> Result<(), InitError> {
        let initialized = self
            .raft()
            .is_initialized()
            .await
            .map_err(|e| InitError::Fatal(e.to_string()))?;
        if !initialized {
            let members = BTreeMap::from([(
                self.inner.id,
                BasicNode::new(self.inner.advertise_url.clone()),
            )]);
            self.initialize(members).await?;
        }
        self.wait_for_leader(BOOTSTRAP_TIMEOUT).await.map(|_| ())
    }

    /// Initializes the cluster with `members` as voters. Succeeds if the node is already
    /// initialized. Does not wait for an election.
    pub async fn initialize(&self, members: BTreeMap<u64, BasicNode>) -> Result<(), InitError> {
        match self.raft().initialize(members).await {
            Ok(()) => {
                tracing::info!(node_id = self.inner.id, "raft cluster initialized");
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotInMembers(e))) => {
                Err(InitError::NotInMembers(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(InitError::Fatal(f.to_string())),
        }
    }

    /// Adds node `id` at `url` as a learner and waits until it has caught up with the log.
    /// Must be called on the leader.
    pub async fn add_learner(&self, id: u64, url: impl Into<String>) -> Result<(), WriteError> {
        let res = self
            .raft()
            .add_learner(id, BasicNode::new(url.into()), true)
            .await;
        self.membership_result(res)
    }

    /// Changes the set of voters to `voters` (joint consensus; nodes must be learners first).
    /// Removed voters stay learners. Must be called on the leader.
    pub async fn change_voters(&self, voters: BTreeSet<u64>) -> Result<(), WriteError> {
        let res = self.raft().change_membership(voters, true).await;
        self.membership_result(res)
    }

    pub(crate) fn membership_result<T>(
        &self,
        res: Result<T, RaftError<u64, ClientWriteError<u64, BasicNode>>>,
    ) -> Result<(), WriteError> {
        match res {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(self.forward_error(&f))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(WriteError::Unavailable(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(fatal_to_write(&f)),
        }
    }

    /// Waits until some node is known as leader and returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, InitError> {
        let m = self
            .raft()
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|e| match e {
                openraft::metrics::WaitError::Timeout(..) => InitError::NoLeader(timeout),
                other @ openraft::metrics::WaitError::ShuttingDown => {
                    InitError::Fatal(other.to_string())
                }
            })?;
        m.current_leader.ok_or(InitError::NoLeader(timeout))
    }

    /// Proposes `env` and waits until it is committed and applied; returns what applying it
    /// produced (which may itself be an API error refusing the command).
    pub async fn write(&self, env: CommandEnvelope) -> Result<CommandResult, WriteError> {
        self.write_indexed(env).await.map(|(_, r)| r)
    }

    /// Like [`RaftNode::write`], also returning the log index the command was applied at.
    pub async fn write_indexed(
        &self,
        env: CommandEnvelope,
    ) -> Result<(u64, CommandResult), WriteError> {
        let res = tokio::time::timeout(REQUEST_TIMEOUT, self.raft().client_write(env))
            .await
            .map_err(|_| WriteError::Timeout(REQUEST_TIMEOUT))?;
        match res {
            Ok(resp) => Ok((resp.log_id.index, resp.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(self.forward_error(&f))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(WriteError::Fatal(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(fatal_to_write(&f)),
        }
    }

    /// Waits until this node is confirmed leader by a quorum and has applied everything
    /// acknowledged before the call, so a following [`RaftNode::read`] is linearizable (see
    /// [`RaftNode::read_index`] for why this is not openraft's `ensure_linearizable`).
    pub async fn linearizable_barrier(&self) -> Result<(), WriteError> {
        let started = tokio::time::Instant::now();
        let index = self.read_index().await?;
        let left = REQUEST_TIMEOUT.saturating_sub(started.elapsed());
        self.wait_applied(index, left).await
    }

    pub(crate) fn forward_error(&self, f: &ForwardToLeader<u64, BasicNode>) -> WriteError {
        let leader_url = f
            .leader_node
            .as_ref()
            .map(|n| n.addr.clone())
            .or_else(|| f.leader_id.and_then(|id| self.node_url(id)));
        WriteError::ForwardToLeader {
            leader_id: f.leader_id,
            leader_url,
        }
    }

    /// The base URL of node `id` according to the current membership.
    pub fn node_url(&self, id: u64) -> Option<String> {
        let m = self.raft().metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Runs `f` on the local applied state. Not linearizable by itself: see
    /// [`RaftNode::linearizable_barrier`]. Do not block or await inside `f` (it holds a lock
    /// that applying entries needs).
    pub fn read<R>(&self, f: impl FnOnce(&StateMachine) -> R) -> R {
        f(&sm_store::read_lock(&self.inner.shared).state)
    }

    /// A receiver of the last applied Raft log index (including blank and membership entries,
    /// so it can be ahead of `StateMachine::revision`). Changes after every applied batch.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.inner.applied_rx.clone()
    }

    /// Per-node wake-ups: changes when a node's assignments or network map may have changed.
    pub fn wakeups(&self) -> &super::wakeups::Wakeups {
        &self.inner.wakeups
    }

    /// The last applied Raft log index.
    pub fn applied_index(&self) -> u64 {
        *self.inner.applied_rx.borrow()
    }

    /// The current leader's id, if known.
    pub fn leader(&self) -> Option<u64> {
        self.raft().metrics().borrow().current_leader
    }

    /// Whether this node is the leader.
    pub fn is_leader(&self) -> bool {
        let m = self.raft().metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.inner.id)
    }

    /// Stops openraft and waits (up to [`SHUTDOWN_TIMEOUT`]) until its storage tasks have
    /// closed the database, so the data dir can be reopened right away.
    pub async fn shutdown(&self) {
        self.inner.snapshot_policy.abort();
        if let Err(e) = self.raft().shutdown().await {
            tracing::warn!(error = %e, "raft shutdown did not complete cleanly");
        }
        let mut closed = self.inner.db_closed.clone();
        let wait = async move { while closed.changed().await.is_ok() {} };
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, wait).await.is_err() {
            tracing::warn!("raft storage still in use after shutdown");
            return;
        }
        tracing::info!(node_id = self.inner.id, "raft node stopped");
    }
}

/// Asks openraft for a snapshot whenever the log's growth says one is due.
async fn snapshot_policy(raft: Raft<TypeConfig>, growth: Arc<super::growth::LogGrowth>) {
    let mut tick = tokio::time::interval(super::growth::CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if growth.due() {
            if let Err(e) = raft.trigger().snapshot().await {
                tracing::debug!("cannot trigger a snapshot: {e}");
                return;
            }
            // Building it resets the growth; do not ask again meanwhile (nor for long, should
            // the build fail).
            for _ in 0..15 {
                tick.tick().await;
                if !growth.due() {
                    break;
                }
            }
        }
    }
}
