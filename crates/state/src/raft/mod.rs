//! The Raft runtime of the replicated control plane: openraft wired to redb storage, the
//! in-memory [`StateMachine`](crate::StateMachine) and an HTTP transport.
//!
//! - [`log_store`]: the Raft log, vote and commit index in one redb file (`raft.redb`).
//! - [`sm_store`]: the applied state, snapshots (JSON, persisted in the same redb file).
//! - [`network`]: the client side of the Raft RPCs (reqwest, JSON, bearer token).
//! - [`http`]: the server side of the same RPCs, as an axum router.
//! - [`node`]: [`RaftNode`], the facade the server uses.
//!
//! # Durability and recovery
//!
//! Log entries are fsynced (redb, immediate durability) before openraft counts them; the
//! state machine lives in memory and is persisted only as snapshots, after which the log is
//! purged: every `RaftConfig::snapshot_every` entries, and by the log's bytes and age since
//! the last snapshot ([`growth`]), so restart time does not grow with uptime. On restart the state
//! is restored from the last snapshot and openraft re-applies the committed log after it.
//! openraft 0.9 waits for each leader-side append to be flushed before it takes the next
//! client write, so a leader pays one fsync per write (followers get batches per RPC).
//!
//! # Use from the server
//!
//! ```ignore
//! let raft = RaftNode::open(RaftConfig { node_id: 1, data_dir, advertise_url, cluster_secret,
//!     snapshot_every: 5000 }).await?;
//! let app = api_router.merge(nimbus_state::raft::raft_router(raft.clone())); // /raft/*
//! raft.bootstrap_single().await?;                 // single server: idempotent across restarts
//! match raft.write(envelope).await {              // Ok(CommandResult) once applied
//!     Err(WriteError::ForwardToLeader { leader_url, .. }) => { /* redirect or proxy */ }
//!     other => { /* ... */ }
//! }
//! raft.linearizable_barrier().await?;            // then:
//! let n = raft.read(|s| s.instances.len());      // reads see the applied state
//! let mut applied = raft.applied_watch();        // wakes long-polls after each apply
//! raft.shutdown().await;                          // the data dir can be reopened afterwards
//! ```

use std::io::Cursor;

use crate::command::{CommandEnvelope, CommandResult};

pub mod http;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod node;
pub mod sm_store;
pub mod wakeups;

mod db;
pub mod growth;
mod log_writer;

pub use http::raft_router;
pub use membership::Member;
pub use node::{InitError, OpenError, RaftConfig, RaftNode, WriteError};

openraft::declare_raft_types!(
    /// The openraft type configuration of nimbus: commands in, command results out.
    pub TypeConfig:
        D = CommandEnvelope,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft log entry of nimbus.
pub type Entry = openraft::Entry<TypeConfig>;
/// A Raft log id (term, leader, index).
pub type LogId = openraft::LogId<u64>;
/// A Raft vote.
pub type Vote = openraft::Vote<u64>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<u64, openraft::BasicNode>;
/// A membership config as stored with its log id.
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
/// A storage error as openraft expects it.
pub type StorageError = openraft::StorageError<u64>;
