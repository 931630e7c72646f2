//! Any server answers every API call: writes and linearizable reads that reach a follower are
//! served through the leader.
//!
//! - **Writes** are forwarded by the proposer (below the HTTP layer, so every handler works
//!   unchanged and group commit still packs concurrent writes into one entry): when
//!   `RaftNode::write` answers `ForwardToLeader`, the same envelope is sent to the leader's
//!   `POST /raft/client-write` (cluster secret), which proposes it and returns its result.
//!   Retries happen only when the write certainly did not reach a log (this node is not the
//!   leader, the leader is unknown, the leader could not be connected to, or the leader
//!   answered "not the leader"); a request that may have been delivered is never re-sent, its
//!   outcome is reported as unknown (503) and the client decides.
//! - **Linearizable reads** on a follower use the read-index protocol: ask the leader
//!   (`POST /raft/read-index`) for the commit index it has confirmed with a quorum, then wait
//!   until this server has applied it, then read locally.

use std::time::Duration;

use nimbus_state::raft::network::{PATH_CLIENT_WRITE, PATH_READ_INDEX};
use nimbus_state::raft::{RaftNode, WriteError};
use nimbus_state::{CommandEnvelope, CommandResult};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

/// How long a forwarded request keeps looking for a leader.
pub const FORWARD_DEADLINE: Duration = Duration::from_secs(10);

/// Per-request timeout of a forwarded call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between attempts while no leader is reachable.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Where the leader is.
enum Leader {
    Unknown,
    Local,
    Remote(String),
}

/// Why one forwarded call failed.
enum CallError {
    /// Certainly not delivered: safe to retry.
    NotSent(String),
    /// May have been delivered: the outcome is unknown.
    Unknown(String),
}

/// Forwards requests from a follower to the leader.
#[derive(Clone, Debug)]
pub struct Forwarder {
    raft: RaftNode,
    http: reqwest::Client,
    secret: String,
}

impl Forwarder {
    /// A forwarder for `raft`, authenticating with the cluster secret (and over TLS with
    /// `tls`, this server's certificate: see [`crate::peers`]).
    pub fn new(raft: RaftNode, secret: String, tls: Option<&rustls::ClientConfig>) -> Self {
        let http = crate::peers::client(
            tls,
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(1))
                .timeout(CALL_TIMEOUT),
        )
        .unwrap_or_default();
        Self { raft, http, secret }
    }

    /// Where the leader is, as this server knows it.
    fn leader(&self) -> Leader {
        match self.raft.leader() {
            None => Leader::Unknown,
            Some(id) if id == self.raft.node_id() => Leader::Local,
            Some(id) => self
                .raft
                .node_url(id)
                .map_or(Leader::Unknown, Leader::Remote),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        url: &str,
        path: &str,
        body: Option<&CommandEnvelope>,
    ) -> Result<Result<T, WriteError>, CallError> {
        let mut retried = false;
        let resp = loop {
            let mut rb = self
                .http
                .post(format!("{}{path}", url.trim_end_matches('/')))
                .bearer_auth(&self.secret);
            if let Some(b) = body {
                rb = rb.json(b);
            }
            let resp = rb.send().await.map_err(|e| {
                if e.is_connect() {
                    CallError::NotSent(format!("cannot connect to the leader at {url}"))
                } else {
                    CallError::Unknown(format!("the leader at {url} did not answer: {e}"))
                }
            })?;
            // A kept-alive connection that outlived this server's previous certificate is
            // refused before the router (nothing applied) and closed: a new one presents the
            // renewed certificate.
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED && !retried {
                retried = true;
                continue;
            }
            break resp;
        };
        if !resp.status().is_success() {
            return Err(CallError::Unknown(format!(
                "the leader at {url} answered HTTP {}",
                resp.status()
            )));
        }
        resp.json()
            .await
            .map_err(|e| CallError::Unknown(format!("reading the leader's answer: {e}")))
    }

    /// The leader's URL, `None` when this server leads; `Err` when no leader is known.
    pub fn leader_url(&self) -> Result<Option<String>, String> {
        match self.leader() {
            Leader::Local => Ok(None),
            Leader::Remote(url) => Ok(Some(url)),
            Leader::Unknown => Err("no leader is elected".into()),
        }
    }

    /// Sends an internal request (cluster secret) to the server at `url` and decodes its JSON
    /// answer (`None` for 204).
    pub async fn internal<B: serde::Serialize + Sync, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        url: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<R>, String> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", url.trim_end_matches('/')))
            .bearer_auth(&self.secret);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| format!("the leader at {url} did not answer: {e}"))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(format!(
                "the leader at {url} answered HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            ));
        }
        resp.json()
            .await
            .map(Some)
            .map_err(|e| format!("reading the leader's answer: {e}"))
    }

    /// Whether `token` is the cluster secret (constant time).
    pub fn is_cluster_secret(&self, token: &str) -> bool {
        crate::auth::constant_time_eq(token.as_bytes(), self.secret.as_bytes())
    }

    /// Writes `env` through the leader (locally if this server has become leader meanwhile).
    pub async fn write(&self, env: CommandEnvelope) -> Result<CommandResult, WriteError> {
        let deadline = Instant::now() + FORWARD_DEADLINE;
        let mut last = String::from("no leader is elected");
        loop {
            match self.leader() {
                Leader::Local => match self.raft.write(env.clone()).await {
                    Err(WriteError::ForwardToLeader { .. }) => {}
                    other => return other,
                },
                Leader::Remote(url) => {
                    match self
                        .call::<CommandResult>(&url, PATH_CLIENT_WRITE, Some(&env))
                        .await
                    {
                        Ok(Err(WriteError::ForwardToLeader { .. })) => {
                            last = format!("{url} is no longer the leader");
                        }
                        Ok(other) => return other,
                        Err(CallError::NotSent(m)) => last = m,
                        Err(CallError::Unknown(m)) => {
                            return Err(WriteError::Unavailable(format!(
                                "{m}; the outcome of the write is unknown"
                            )))
                        }
                    }
                }
                Leader::Unknown => {}
            }
            if Instant::now() > deadline {
                return Err(WriteError::Unavailable(format!(
                    "{last} (gave up after {FORWARD_DEADLINE:?})"
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Makes a following local read linearizable: locally on the leader, through the leader's
    /// read index on a follower.
    pub async fn barrier(&self) -> Result<(), WriteError> {
        let deadline = Instant::now() + FORWARD_DEADLINE;
        let mut last = String::from("no leader is elected");
        loop {
            match self.leader() {
                Leader::Local => match self.raft.linearizable_barrier().await {
                    Err(WriteError::ForwardToLeader { .. }) => {}
                    other => return other,
                },
                Leader::Remote(url) => match self.call::<u64>(&url, PATH_READ_INDEX, None).await {
                    Ok(Ok(index)) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        return self
                            .raft
                            .wait_applied(index, left.max(Duration::from_secs(1)))
                            .await;
                    }
                    Ok(Err(WriteError::ForwardToLeader { .. })) => {
                        last = format!("{url} is no longer the leader");
                    }
                    Ok(Err(e)) => return Err(e),
                    // A read index is safe to ask again.
                    Err(CallError::NotSent(m) | CallError::Unknown(m)) => last = m,
                },
                Leader::Unknown => {}
            }
            if Instant::now() > deadline {
                return Err(WriteError::Unavailable(format!(
                    "{last} (gave up after {FORWARD_DEADLINE:?})"
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}
