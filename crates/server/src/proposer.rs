//! Group commit in front of Raft. openraft 0.9 fsyncs each leader append before it takes the
//! next client write, so one write per log entry would cost one fsync each. The proposer keeps
//! one Raft write in flight; requests that arrive meanwhile are packed into one
//! `Command::Batch` log entry (up to [`MAX_BATCH`]), so concurrent writers share an fsync and a
//! lone writer pays no extra latency.
//!
//! If a `Command::Batch` entry could not be encoded (checked once at start by
//! [`batching_supported`]), every command becomes its own log entry instead, with up to
//! [`MAX_IN_FLIGHT`] writes in flight at once (openraft pipelines them).
//!
//! On a follower the proposer forwards each (batched) entry to the leader through
//! [`Forwarder`](crate::forward::Forwarder) instead of failing with "not the leader".

use nimbus_api::{ApiError, ErrorCode};
use nimbus_state::raft::WriteError;

use crate::forward::Forwarder;
use nimbus_state::{Command, CommandEnvelope, CommandOutput, COMMAND_FORMAT_VERSION};
use tokio::sync::{mpsc, oneshot};

/// Most commands packed into one log entry.
pub const MAX_BATCH: usize = 512;

/// Batches in flight at once. With more than one, a batch overlaps the previous one's fsync
/// (the log writer packs appends that arrive meanwhile into its next transaction), but each
/// batch is smaller; 2 showed no clear gain over 1 on the shared benchmark machine, so one.
pub const MAX_BATCHES_IN_FLIGHT: usize = 1;

/// Longest a write waits for room in a full queue before it is refused.
pub const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most single-command writes in flight when batching is unavailable.
pub const MAX_IN_FLIGHT: usize = 256;

/// Whether a `Command::Batch` entry can be encoded (see the module docs).
pub fn batching_supported() -> bool {
    serde_json::to_vec(&envelope(Command::Batch {
        commands: vec![envelope(Command::Noop)],
    }))
    .is_ok()
}

type Reply = oneshot::Sender<Result<CommandOutput, ApiError>>;

/// Handle to the proposer task.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<(CommandEnvelope, Reply)>,
}

/// RFC 3339 now.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn envelope(command: Command) -> CommandEnvelope {
    CommandEnvelope {
        format: COMMAND_FORMAT_VERSION,
        time: now(),
        new_id: uuid::Uuid::new_v4().to_string(),
        command,
    }
}

fn write_error(e: WriteError) -> ApiError {
    match e {
        WriteError::ForwardToLeader { leader_url, .. } => ApiError::new(
            ErrorCode::Unavailable,
            match leader_url {
                Some(u) => format!("this server is not the leader; the leader is at {u}"),
                None => "no leader is elected yet; retry shortly".to_string(),
            },
        ),
        e => ApiError::new(
            ErrorCode::Unavailable,
            format!("the write could not be committed: {e}"),
        ),
    }
}

impl Proposer {
    /// Starts the proposer task writing through `raft` (which forwards to the leader).
    pub fn spawn(raft: Forwarder) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(raft, rx));
        Self { tx }
    }

    /// Proposes a command and waits for its result. While the write queue stays full for
    /// [`QUEUE_WAIT`] the write is refused as `unavailable` (the client retries) instead of
    /// waiting without bound.
    pub async fn propose(&self, command: Command) -> Result<CommandOutput, ApiError> {
        let (reply, wait) = oneshot::channel();
        match tokio::time::timeout(QUEUE_WAIT, self.tx.send((envelope(command), reply))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "the server is shutting down",
                ))
            }
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the control plane is overloaded ({} writes queued for {}s); retry later",
                        self.tx.max_capacity(),
                        QUEUE_WAIT.as_secs()
                    ),
                ))
            }
        }
        wait.await
            .map_err(|_| ApiError::new(ErrorCode::Unavailable, "the server is shutting down"))?
    }
}

async fn run_singles(raft: Forwarder, mut rx: mpsc::Receiver<(CommandEnvelope, Reply)>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    while let Some((env, reply)) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            let result = match raft.write(env).await {
                Ok(r) => r,
                Err(e) => Err(write_error(e)),
            };
            let _ = reply.send(result);
            drop(permit);
        });
    }
}

async fn run(raft: Forwarder, mut rx: mpsc::Receiver<(CommandEnvelope, Reply)>) {
    if !batching_supported() {
        tracing::warn!(
            "Command::Batch cannot be encoded: group commit disabled, one log entry per write"
        );
        return run_singles(raft, rx).await;
    }
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    loop {
        // Take a slot first: while every slot is busy, requests keep queueing and the next
        // batch gets all of them.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write_batch(&raft, batch).await;
            drop(permit);
        });
    }
}

/// Writes one batch (a lone command as itself) and answers each request.
async fn write_batch(raft: &Forwarder, mut batch: Vec<(CommandEnvelope, Reply)>) {
    if batch.len() == 1 {
        let (env, reply) = batch.pop().expect("one item");
        let result = match raft.write(env).await {
            Ok(r) => r,
            Err(e) => Err(write_error(e)),
        };
        let _ = reply.send(result);
        return;
    }
    let (envs, replies): (Vec<CommandEnvelope>, Vec<Reply>) = batch.into_iter().unzip();
    match raft
        .write(envelope(Command::Batch { commands: envs }))
        .await
    {
        Ok(Ok(CommandOutput::Batch(results))) if results.len() == replies.len() => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Ok(Ok(other)) => {
            for reply in replies {
                let _ = reply.send(Err(ApiError::internal(format!(
                    "unexpected batch output {other:?}"
                ))));
            }
        }
        Ok(Err(e)) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            let e = write_error(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
