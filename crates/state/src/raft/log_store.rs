//! The Raft log on redb: entries, vote, committed and last purged log id.
//!
//! All mutations go through the writer thread of the `log_writer` module, which group-commits
//! them: one redb write transaction with immediate durability (fsync) per batch, after which
//! openraft is told the entries are flushed. Entries handed to `append` are readable from
//! memory right away, as openraft requires.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError};
use redb::ReadableTable;
use serde::Serialize;
use tokio::sync::oneshot;

use super::db::{self, DbError, LOGS, META, META_COMMITTED, META_LAST_PURGED, META_VOTE};
use super::log_writer::{self, CommittedSlot, Op, Pending};
use super::{Entry, LogId, StorageError, TypeConfig, Vote};

/// The Raft log store. Cheap to clone: clones share the database, the writer and the entries
/// not yet written.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<db::Db>,
    pending: Pending,
    committed: CommittedSlot,
    writer: mpsc::Sender<Op>,
    growth: Arc<super::growth::LogGrowth>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

fn io_err(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    e: &(impl std::error::Error + 'static),
) -> StorageError {
    StorageIOError::new(subject, verb, e).into()
}

fn writer_gone() -> std::io::Error {
    std::io::Error::other("raft log writer thread stopped")
}

impl LogStore {
    /// A log store over an open database (tables must exist: see `db::open`); starts its
    /// writer thread.
    pub(crate) fn new(
        db: Arc<db::Db>,
        growth: Arc<super::growth::LogGrowth>,
    ) -> std::io::Result<Self> {
        let pending = Pending::default();
        let committed = CommittedSlot::default();
        let writer = log_writer::spawn(db.clone(), pending.clone(), committed.clone())?;
        Ok(Self {
            db,
            pending,
            committed,
            writer,
            growth,
        })
    }

    /// A receiver whose `changed()` fails once the database file is closed.
    pub(crate) fn closed_signal(&self) -> tokio::sync::watch::Receiver<()> {
        self.db.closed_signal()
    }

    /// Queues `op` and waits for the writer to complete it.
    async fn submit(&self, op: impl FnOnce(log_writer::Done) -> Op) -> Result<(), std::io::Error> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(op(tx)).map_err(|_| writer_gone())?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(std::io::Error::other(msg)),
            Err(_) => Err(writer_gone()),
        }
    }

    fn read_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<Vec<Entry>, DbError> {
        // Pending first: an entry leaves `pending` only after it is committed to redb, so
        // reading in this order cannot miss it.
        let pending: Vec<Entry> = log_writer::lock(&self.pending)
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect();
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LOGS)?;
        let mut out = BTreeMap::new();
        for row in t.range::<u64>((start, end))? {
            let (k, v) = row?;
            let e: Entry = serde_json::from_slice(v.value()).map_err(|source| DbError::Decode {
                key: format!("log {}", k.value()),
                source,
            })?;
            out.insert(k.value(), e);
        }
        for e in pending {
            out.insert(e.log_id.index, e);
        }
        Ok(out.into_values().collect())
    }

    /// Like `read_range(start..end)`, but stops once the entries read add up to about
    /// `budget` bytes of JSON (always at least one entry if the range holds any). Returns a
    /// contiguous prefix of the range.
    fn read_range_limited(
        &self,
        start: u64,
        end: u64,
        budget: usize,
    ) -> Result<Vec<Entry>, DbError> {
        let pending: Vec<Entry> = log_writer::lock(&self.pending)
            .range(start..end)
            .map(|(_, e)| e.clone())
            .collect();
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LOGS)?;
        let mut out = BTreeMap::new();
        let mut used = 0usize;
        let mut full = false;
        for row in t.range::<u64>(start..end)? {
            let (k, v) = row?;
            let size = v.value().len();
            if !out.is_empty() && used + size > budget {
                full = true;
                break;
            }
            used += size;
            let e: Entry = serde_json::from_slice(v.value()).map_err(|source| DbError::Decode {
                key: format!("log {}", k.value()),
                source,
            })?;
            out.insert(k.value(), e);
        }
        let last_read = out.last_key_value().map(|(k, _)| *k);
        for e in pending {
            let i = e.log_id.index;
            if full {
                // Only entries also read from the database (being flushed right now).
                if last_read.is_some_and(|l| i <= l) {
                    out.insert(i, e);
                }
                continue;
            }
            if let Some(slot) = out.get_mut(&i) {
                *slot = e;
                continue;
            }
            let size = serde_json::to_vec(&e).map_or(0, |v| v.len());
            if !out.is_empty() && used + size > budget {
                break;
            }
            used += size;
            out.insert(i, e);
        }
        Ok(out.into_values().collect())
    }

    fn last_log_id(&self) -> Result<Option<LogId>, DbError> {
        let pending = log_writer::lock(&self.pending)
            .last_key_value()
            .map(|(_, e)| e.log_id);
        if pending.is_some() {
            return Ok(pending);
        }
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LOGS)?;
        let Some((k, v)) = t.last()? else {
            return Ok(None);
        };
        let e: Entry = serde_json::from_slice(v.value()).map_err(|source| DbError::Decode {
            key: format!("log {}", k.value()),
            source,
        })?;
        Ok(Some(e.log_id))
    }

    #[allow(clippy::result_large_err)] // openraft's error type
    fn encode(value: &impl Serialize) -> Result<Vec<u8>, StorageError> {
        serde_json::to_vec(value)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, &DbError::Encode(e)))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_range(range.start_bound().cloned(), range.end_bound().cloned())
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, &e))
    }

    /// What replication sends in one append-entries request: at most about
    /// [`MAX_APPEND_BYTES`] of entries. openraft 0.9 cancels an append-entries RPC after the
    /// heartbeat interval (200 ms) and would otherwise read and send up to
    /// `max_payload_entries` (300) entries at once; with group commit one entry can hold
    /// hundreds of commands, so a lagging follower would be sent megabytes it cannot take in
    /// within 200 ms, time out, be sent the same request again and never catch up (and a new
    /// leader that needs it for a quorum could not commit anything).
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_range_limited(start, end, MAX_APPEND_BYTES)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, &e))
    }
}

/// Largest JSON size of the entries replication reads for one append-entries request (at
/// least one entry is always sent). See `limited_get_log_entries`.
pub const MAX_APPEND_BYTES: usize = 256 * 1024;

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = || -> Result<_, DbError> {
            let last_purged: Option<LogId> = db::get_json(&self.db, META, META_LAST_PURGED)?;
            let last = self.last_log_id()?;
            Ok((last_purged, last))
        };
        let (last_purged_log_id, last) =
            read().map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
        let last_log_id = last.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let value = Self::encode(vote)?;
        self.submit(|done| Op::Meta {
            key: META_VOTE,
            value,
            done,
        })
        .await
        .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, &e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        db::get_json(&self.db, META, META_VOTE)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Read, &e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Losing the committed id is harmless (openraft then re-applies less at startup and
        // catches up once a leader commits), so it costs no transaction of its own: the
        // writer stores the latest value with its next batch, or when it stops.
        let value = Self::encode(&committed)?;
        *self
            .committed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(value);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let c: Option<Option<LogId>> = db::get_json(&self.db, META, META_COMMITTED)
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, &e))?;
        Ok(c.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut rows = Vec::with_capacity(entries.len());
        for e in &entries {
            rows.push((e.log_id, Self::encode(e)?));
        }
        self.growth
            .appended(rows.iter().map(|(_, r)| r.len() as u64).sum());
        {
            let mut p = log_writer::lock(&self.pending);
            for e in entries {
                p.insert(e.log_id.index, e);
            }
        }
        self.writer
            .send(Op::Append { rows, callback })
            .map_err(|_| io_err(ErrorSubject::Logs, ErrorVerb::Write, &writer_gone()))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating raft log");
        log_writer::lock(&self.pending).retain(|&i, _| i < log_id.index);
        self.submit(|done| Op::Truncate {
            index: log_id.index,
            done,
        })
        .await
        .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging raft log");
        self.submit(|done| Op::Purge { log_id, done })
            .await
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, &e))?;
        log_writer::lock(&self.pending).retain(|&i, _| i > log_id.index);
        Ok(())
    }
}
