//! The Raft runtime of the replicated control plane: openraft wired to redb storage, the
//! in-memory [`StateMachine`](crate::StateMachine) and an HTTP transport.
//!
//! - [`log_store`]: the Raft log, vote and commit index in one redb file (`raft.redb`).
//! - [`sm_store`]: the applied state, snapshots (JSON, persisted in the same redb file).
//! - [`network`]: the client side of the Raft RPCs (reqwest, JSON, bearer token).
//! - [`http`]: the server side of the same RPCs, as an axum router.
//! - [`node`]: [`RaftNode`], the facade the server uses.

use std::io::Cursor;

use crate::command::{CommandEnvelope, CommandResult};

pub mod http;
pub mod log_store;
pub mod network;
pub mod node;
pub mod sm_store;

mod db;
mod log_writer;

pub use http::raft_router;
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
