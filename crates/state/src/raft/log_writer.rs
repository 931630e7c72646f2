//! The single writer thread of the Raft log: group commit.
//!
//! openraft 0.9 hands each client write to storage as its own `append` call, and `append` may
//! return before the entries are durable. So `append` only queues the entries (and keeps them
//! readable in memory); this thread drains everything queued, writes it in **one** redb write
//! transaction committed with immediate durability (one fsync), and then reports each batch as
//! flushed. Truncate, purge and vote go through the same queue so all log mutations stay in
//! order. The committed log id is not queued: the latest value waits in a slot and rides along
//! with the next transaction (or is written when the writer stops).
//!
//! Note: openraft 0.9's core waits for each `append` to be flushed before it handles the next
//! client write, so on the leader every client write still costs one fsync; batches form when
//! other operations (vote, truncate, follower appends) queue up meanwhile.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use openraft::storage::LogFlushed;
use redb::Durability;
use tokio::sync::oneshot;

use super::db::{self, DbError, LOGS, META, META_COMMITTED, META_LAST_PURGED};
use super::{Entry, LogId, TypeConfig};

/// Most operations folded into one transaction.
const MAX_BATCH: usize = 4096;

/// Entries handed to `append` but not yet written to redb, by index.
pub(crate) type Pending = Arc<Mutex<BTreeMap<u64, Entry>>>;

/// Locks the pending map, ignoring poisoning (plain data).
pub(crate) fn lock(p: &Pending) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
    p.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The latest committed log id (JSON) not yet written.
pub(crate) type CommittedSlot = Arc<Mutex<Option<Vec<u8>>>>;

/// Completion of a queued operation: `Err` carries the message of the storage error.
pub(crate) type Done = oneshot::Sender<Result<(), String>>;

/// A queued log mutation.
pub(crate) enum Op {
    /// Write entries (log id, JSON), then call the callback.
    Append {
        rows: Vec<(LogId, Vec<u8>)>,
        callback: LogFlushed<TypeConfig>,
    },
    /// Delete entries with index >= `index`.
    Truncate { index: u64, done: Done },
    /// Delete entries up to `log_id` and record it as last purged.
    Purge { log_id: LogId, done: Done },
    /// Store a metadata value durably, then report completion.
    Meta {
        key: &'static str,
        value: Vec<u8>,
        done: Done,
    },
}

/// Starts the writer thread. It stops when every sender is dropped.
pub(crate) fn spawn(
    db: Arc<db::Db>,
    pending: Pending,
    committed: CommittedSlot,
) -> std::io::Result<mpsc::Sender<Op>> {
    let (tx, rx) = mpsc::channel::<Op>();
    std::thread::Builder::new()
        .name("raft-log-writer".to_owned())
        .spawn(move || run(&db, &rx, &pending, &committed))?;
    Ok(tx)
}

fn take(slot: &CommittedSlot) -> Option<Vec<u8>> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

fn run(db: &db::Db, rx: &mpsc::Receiver<Op>, pending: &Pending, committed: &CommittedSlot) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let res = write(db, &batch, take(committed)).map_err(|e| e.to_string());
        if let Err(e) = &res {
            tracing::error!(error = %e, ops = batch.len(), "raft log write failed");
        } else {
            tracing::trace!(ops = batch.len(), "raft log batch written");
            // Written entries are readable from redb now; drop them from memory unless they
            // were replaced (truncated and re-appended) meanwhile.
            let mut p = lock(pending);
            for op in &batch {
                if let Op::Append { rows, .. } = op {
                    for (log_id, _) in rows {
                        if p.get(&log_id.index).is_some_and(|e| e.log_id == *log_id) {
                            p.remove(&log_id.index);
                        }
                    }
                }
            }
        }
        for op in batch {
            match op {
                Op::Append { callback, .. } => {
                    callback.log_io_completed(res.clone().map_err(std::io::Error::other));
                }
                Op::Truncate { done, .. } | Op::Purge { done, .. } | Op::Meta { done, .. } => {
                    let _ = done.send(res.clone());
                }
            }
        }
    }
    if let Some(c) = take(committed) {
        if let Err(e) = write(db, &[], Some(c)) {
            tracing::warn!(error = %e, "cannot save the committed log id at shutdown");
        }
    }
    tracing::debug!("raft log writer stopped");
}

/// Applies `batch` in order in one durable write transaction, plus the committed log id.
fn write(db: &db::Db, batch: &[Op], committed: Option<Vec<u8>>) -> Result<(), DbError> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate);
    {
        let mut logs = tx.open_table(LOGS)?;
        let mut meta = tx.open_table(META)?;
        if let Some(c) = committed {
            meta.insert(META_COMMITTED, c.as_slice())?;
        }
        for op in batch {
            match op {
                Op::Append { rows, .. } => {
                    for (log_id, bytes) in rows {
                        logs.insert(log_id.index, bytes.as_slice())?;
                    }
                }
                Op::Truncate { index, .. } => {
                    logs.retain_in(*index.., |_, _| false)?;
                }
                Op::Purge { log_id, .. } => {
                    let bytes = serde_json::to_vec(log_id).map_err(DbError::Encode)?;
                    meta.insert(META_LAST_PURGED, bytes.as_slice())?;
                    logs.retain_in(..=log_id.index, |_, _| false)?;
                }
                Op::Meta { key, value, .. } => {
                    meta.insert(*key, value.as_slice())?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}
