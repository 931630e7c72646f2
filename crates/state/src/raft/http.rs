//! The server side of the Raft RPCs (see [`super::network`] for the wire format).

use std::io::Cursor;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use openraft::error::{Fatal, InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::Snapshot;

use super::network::{
    FullSnapshotRequest, PATH_APPEND, PATH_CLIENT_WRITE, PATH_READ_INDEX, PATH_SNAPSHOT,
    PATH_SNAPSHOT_CHUNK, PATH_VOTE,
};
use super::node::RaftNode;
use super::node::WriteError;
use super::TypeConfig;
use crate::command::{CommandEnvelope, CommandResult};

/// Largest accepted RPC body (snapshots travel in one request).
const MAX_BODY: usize = 1 << 30;

/// The router serving `/raft/append`, `/raft/vote`, `/raft/snapshot`,
/// `/raft/snapshot-chunk`, and the forwarding endpoints `/raft/client-write` and
/// `/raft/read-index` for `node`. Every request must carry
/// `Authorization: Bearer <cluster secret>` (the servers' own secret, never the node token
/// agents hold); others get 401.
pub fn raft_router(node: RaftNode) -> Router {
    Router::new()
        .route(PATH_APPEND, post(append))
        .route(PATH_VOTE, post(vote))
        .route(PATH_SNAPSHOT, post(snapshot))
        .route(PATH_SNAPSHOT_CHUNK, post(snapshot_chunk))
        .route(PATH_CLIENT_WRITE, post(client_write))
        .route(PATH_READ_INDEX, post(read_index))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(node.clone(), require_secret))
        .with_state(node)
}

/// Checks the bearer token in constant time.
fn authorized(node: &RaftNode, headers: &HeaderMap) -> bool {
    // The scheme is case-insensitive (RFC 7235).
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
    else {
        return false;
    };
    let expected = node.cluster_secret().as_bytes();
    let got = token.as_bytes();
    if expected.len() != got.len() {
        return false;
    }
    expected
        .iter()
        .zip(got)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Refuses requests without the cluster secret before their body is read.
async fn require_secret(State(node): State<RaftNode>, req: Request, next: Next) -> Response {
    if authorized(&node, req.headers()) {
        next.run(req).await
    } else {
        tracing::warn!(path = %req.uri().path(), "raft rpc refused: missing or wrong cluster secret");
        (StatusCode::UNAUTHORIZED, "missing or wrong cluster secret").into_response()
    }
}

/// Refuses an append-entries request whose entries this server cannot decode (e.g. a leader
/// running a newer nimbus with commands this build does not know) with a clear 422 and an
/// error log, instead of accepting part of it; the leader keeps retrying (and logs the
/// answer) until this server is upgraded.
async fn append(State(node): State<RaftNode>, body: axum::body::Bytes) -> Response {
    let req: AppendEntriesRequest<TypeConfig> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!(
                "cannot decode log entries from the leader ({e}); the leader probably runs a newer nimbus with a log format this server does not understand (this server understands command format {}): upgrade this server",
                crate::command::COMMAND_FORMAT_VERSION
            );
            tracing::error!(node_id = node.node_id(), "{msg}");
            return (StatusCode::UNPROCESSABLE_ENTITY, msg).into_response();
        }
    };
    let res: Result<AppendEntriesResponse<u64>, RaftError<u64>> =
        node.raft().append_entries(req).await;
    Json(res).into_response()
}

async fn vote(State(node): State<RaftNode>, Json(req): Json<VoteRequest<u64>>) -> Response {
    let res: Result<VoteResponse<u64>, RaftError<u64>> = node.raft().vote(req).await;
    Json(res).into_response()
}

async fn snapshot(State(node): State<RaftNode>, Json(req): Json<FullSnapshotRequest>) -> Response {
    let snapshot = Snapshot::<TypeConfig> {
        meta: req.meta,
        snapshot: Box::new(Cursor::new(req.data.into_bytes())),
    };
    let res: Result<SnapshotResponse<u64>, Fatal<u64>> =
        node.raft().install_full_snapshot(req.vote, snapshot).await;
    Json(res).into_response()
}

async fn snapshot_chunk(
    State(node): State<RaftNode>,
    Json(req): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Response {
    let res: Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> =
        node.raft().install_snapshot(req).await;
    Json(res).into_response()
}

/// A write forwarded by a follower: the leader proposes the envelope as is (it may be a
/// group-committed batch) and answers `Result<CommandResult, WriteError>`.
async fn client_write(State(node): State<RaftNode>, Json(env): Json<CommandEnvelope>) -> Response {
    let res: Result<CommandResult, WriteError> = node.write(env).await;
    Json(res).into_response()
}

/// A follower's read-index request: answers `Result<u64, WriteError>`, the commit index
/// confirmed by a quorum.
async fn read_index(State(node): State<RaftNode>) -> Response {
    let res: Result<u64, WriteError> = node.read_index().await;
    Json(res).into_response()
}
