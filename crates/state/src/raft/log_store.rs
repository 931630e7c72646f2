//! The Raft log on redb: entries, vote, committed and last purged log id.
//!
//! Every append is one redb write transaction committed with immediate durability (fsync)
//! before openraft is told the entries are flushed. openraft hands over all entries that
//! accumulated while the previous append was in flight, so concurrent client writes share one
//! fsync (group commit).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError};
use redb::{Durability, ReadableTable};

use super::db::{self, DbError, LOGS, META, META_COMMITTED, META_LAST_PURGED, META_VOTE};
use super::{Entry, LogId, StorageError, TypeConfig, Vote};

/// The Raft log store. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<db::Db>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: &DbError) -> StorageError {
    StorageIOError::new(subject, verb, e).into()
}

impl LogStore {
    /// A log store over an open database (tables must exist: see `db::open`).
    pub(crate) fn new(db: Arc<db::Db>) -> Self {
        Self { db }
    }

    /// A receiver whose `changed()` fails once the database file is closed.
    pub(crate) fn closed_signal(&self) -> tokio::sync::watch::Receiver<()> {
        self.db.closed_signal()
    }

    fn read_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<Vec<Entry>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LOGS)?;
        let mut out = Vec::new();
        for row in t.range::<u64>((start, end))? {
            let (k, v) = row?;
            let e: Entry = serde_json::from_slice(v.value()).map_err(|source| DbError::Decode {
                key: format!("log {}", k.value()),
                source,
            })?;
            out.push(e);
        }
        Ok(out)
    }

    fn last_entry(&self) -> Result<Option<Entry>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LOGS)?;
        let Some((k, v)) = t.last()? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|source| DbError::Decode {
                key: format!("log {}", k.value()),
                source,
            })
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
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = || -> Result<_, DbError> {
            let last_purged: Option<LogId> = db::get_json(&self.db, META, META_LAST_PURGED)?;
            let last = self.last_entry()?.map(|e| e.log_id);
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
        let db = self.db.clone();
        let vote = *vote;
        db::blocking(move || db::put_meta(&db, META_VOTE, &vote, Durability::Immediate))
            .await
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, &e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        db::get_json(&self.db, META, META_VOTE)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Read, &e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Losing the committed id is harmless (openraft then just re-applies less at startup),
        // so it rides along with the next durable commit instead of costing its own fsync.
        // Off the async worker: a concurrent snapshot write would make `begin_write` block.
        let db = self.db.clone();
        db::blocking(move || db::put_meta(&db, META_COMMITTED, &committed, Durability::None))
            .await
            .map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Write, &e))
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
        let mut rows = Vec::new();
        for e in entries {
            let bytes = serde_json::to_vec(&e).map_err(|err| {
                io_err(ErrorSubject::Logs, ErrorVerb::Write, &DbError::Encode(err))
            })?;
            rows.push((e.log_id.index, bytes));
        }
        let n = rows.len();
        let db = self.db.clone();
        let res = db::blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate);
            {
                let mut t = tx.open_table(LOGS)?;
                for (index, bytes) in &rows {
                    t.insert(*index, bytes.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await;
        match res {
            Ok(()) => {
                tracing::trace!(entries = n, "raft log appended");
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "raft log append failed");
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_err(ErrorSubject::Logs, ErrorVerb::Write, &e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating raft log");
        let db = self.db.clone();
        db::blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate);
            {
                let mut t = tx.open_table(LOGS)?;
                t.retain_in(log_id.index.., |_, _| false)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging raft log");
        let db = self.db.clone();
        db::blocking(move || {
            let bytes = serde_json::to_vec(&log_id).map_err(DbError::Encode)?;
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate);
            {
                let mut m = tx.open_table(META)?;
                m.insert(META_LAST_PURGED, bytes.as_slice())?;
                let mut t = tx.open_table(LOGS)?;
                t.retain_in(..=log_id.index, |_, _| false)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }
}
