//! The client side of the Raft RPCs: JSON over HTTP(S) with reqwest, authenticated with the
//! cluster secret as a bearer token.
//!
//! | RPC | request | response |
//! |---|---|---|
//! | `POST {addr}/raft/append` | `AppendEntriesRequest` | `Result<AppendEntriesResponse, RaftError>` |
//! | `POST {addr}/raft/vote` | `VoteRequest` | `Result<VoteResponse, RaftError>` |
//! | `POST {addr}/raft/snapshot` | [`FullSnapshotRequest`] | `Result<SnapshotResponse, Fatal>` |
//! | `POST {addr}/raft/snapshot-chunk` | `InstallSnapshotRequest` | `Result<InstallSnapshotResponse, RaftError<InstallSnapshotError>>` |
//!
//! A peer that cannot be connected to, or that answers with a non-success HTTP status, is
//! reported to openraft as `Unreachable` (openraft then backs off); other transport failures are
//! `Network` errors.

use std::future::Future;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, Snapshot};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{SnapshotMeta, TypeConfig, Vote};

/// Path of the append-entries RPC.
pub const PATH_APPEND: &str = "/raft/append";
/// Path of the vote RPC.
pub const PATH_VOTE: &str = "/raft/vote";
/// Path of the full-snapshot RPC.
pub const PATH_SNAPSHOT: &str = "/raft/snapshot";
/// Path of a write forwarded to the leader (body: `CommandEnvelope`; answer:
/// `Result<CommandResult, WriteError>`).
pub const PATH_CLIENT_WRITE: &str = "/raft/client-write";
/// Path of the read-index request a follower sends the leader (answer: `Result<u64, WriteError>`).
pub const PATH_READ_INDEX: &str = "/raft/read-index";
/// Path of the chunked install-snapshot RPC.
pub const PATH_SNAPSHOT_CHUNK: &str = "/raft/snapshot-chunk";

/// The body of `POST /raft/snapshot`: a whole snapshot in one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FullSnapshotRequest {
    /// The leader's vote.
    pub vote: Vote,
    /// Snapshot metadata.
    pub meta: SnapshotMeta,
    /// Snapshot data (the JSON document the state machine store produces).
    pub data: String,
}

/// Why an RPC failed at the transport level.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The request could not be sent or the response not read.
    #[error("raft rpc to {url} failed")]
    Http {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The peer answered with a non-success status.
    #[error("raft rpc to {url} returned HTTP {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The snapshot data is not the UTF-8 JSON this store writes.
    #[error("snapshot data is not UTF-8")]
    SnapshotNotUtf8,
}

impl TransportError {
    /// Whether openraft should treat the peer as unreachable (and back off) rather than retry.
    fn is_unreachable(&self) -> bool {
        match self {
            TransportError::Http { source, .. } => source.is_connect() || source.is_timeout(),
            TransportError::Status { .. } | TransportError::SnapshotNotUtf8 => true,
        }
    }
}

/// Creates [`HttpNetwork`] clients; one per target node.
#[derive(Clone, Debug)]
pub struct HttpNetworkFactory {
    client: reqwest::Client,
    secret: String,
}

impl HttpNetworkFactory {
    /// A factory authenticating with `cluster_secret`.
    pub fn new(cluster_secret: impl Into<String>) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot build tuned HTTP client for raft; using defaults");
                reqwest::Client::new()
            });
        Self::with_client(client, cluster_secret)
    }

    /// A factory using a caller-built client (e.g. one trusting a private CA).
    pub fn with_client(client: reqwest::Client, cluster_secret: impl Into<String>) -> Self {
        Self {
            client,
            secret: cluster_secret.into(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for HttpNetworkFactory {
    type Network = HttpNetwork;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        HttpNetwork {
            client: self.client.clone(),
            secret: self.secret.clone(),
            target,
            base: node.addr.trim_end_matches('/').to_owned(),
        }
    }
}

/// An RPC client to one peer.
#[derive(Clone, Debug)]
pub struct HttpNetwork {
    client: reqwest::Client,
    secret: String,
    target: u64,
    base: String,
}

impl HttpNetwork {
    async fn post<Req, Resp>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, TransportError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let url = format!("{}{path}", self.base);
        let http = |source| TransportError::Http {
            url: url.clone(),
            source,
        };
        let resp = self
            .client
            .post(&url)
            .bearer_auth(&self.secret)
            .timeout(timeout)
            .json(req)
            .send()
            .await
            .map_err(http)?;
        let status = resp.status();
        if !status.is_success() {
            let mut body = resp.text().await.unwrap_or_default();
            body.truncate(200);
            return Err(TransportError::Status {
                url,
                status: status.as_u16(),
                body,
            });
        }
        resp.json().await.map_err(http)
    }

    fn rpc_error<E: std::error::Error>(&self, e: &TransportError) -> RPCError<u64, BasicNode, E> {
        tracing::debug!(target_node = self.target, error = %e, "raft rpc failed");
        if e.is_unreachable() {
            RPCError::Unreachable(Unreachable::new(e))
        } else {
            RPCError::Network(NetworkError::new(e))
        }
    }

    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<u64, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let res: Result<Resp, E> = self
            .post(path, req, timeout)
            .await
            .map_err(|e| self.rpc_error(&e))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for HttpNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(PATH_APPEND, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(PATH_SNAPSHOT_CHUNK, &rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(PATH_VOTE, &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let data = String::from_utf8(snapshot.snapshot.into_inner()).map_err(|_| {
            StreamingError::Unreachable(Unreachable::new(&TransportError::SnapshotNotUtf8))
        })?;
        let req = FullSnapshotRequest {
            vote,
            meta: snapshot.meta,
            data,
        };
        tracing::info!(target_node = self.target, snapshot = %req.meta, "sending raft snapshot");
        let send = self.post::<_, Result<SnapshotResponse<u64>, Fatal<u64>>>(
            PATH_SNAPSHOT,
            &req,
            option.hard_ttl(),
        );
        let res = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = send => res,
        };
        match res {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(fatal)) => Err(StreamingError::RemoteError(RemoteError::new(
                self.target,
                fatal,
            ))),
            Err(e) => {
                tracing::debug!(target_node = self.target, error = %e, "raft snapshot rpc failed");
                if e.is_unreachable() {
                    Err(StreamingError::Unreachable(Unreachable::new(&e)))
                } else {
                    Err(StreamingError::Network(NetworkError::new(&e)))
                }
            }
        }
    }
}
