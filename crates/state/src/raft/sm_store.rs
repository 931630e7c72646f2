//! The state machine side of openraft: the in-memory [`StateMachine`] behind a lock that the
//! server reads directly, plus snapshots persisted in the redb file.
//!
//! The state machine itself is not persisted on every apply: on restart it is restored from the
//! last snapshot and openraft re-applies the committed log after it.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, StorageIOError,
};
use redb::{Database, Durability, ReadableTable};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::db::{self, DbError, SNAPSHOT, SNAP_DATA, SNAP_META};
use super::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::command::{CommandOutput, CommandResult};
use crate::machine::StateMachine;

/// The applied state: the state machine and the Raft bookkeeping that goes with it. Kept under
/// one lock so a snapshot always sees a consistent triple.
#[derive(Debug, Default)]
pub struct Applied {
    /// The replicated state.
    pub state: StateMachine,
    /// The last log id applied to `state`.
    pub last_applied: Option<LogId>,
    /// The last membership config applied.
    pub membership: StoredMembership,
}

/// The applied state shared between openraft and readers.
pub type SharedState = Arc<RwLock<Applied>>;

/// Version of the snapshot encoding this build writes and reads. Snapshots written before it
/// existed carry no `format` and are version 1.
pub const SNAPSHOT_FORMAT: u32 = 1;

fn format_v1() -> u32 {
    1
}

/// Snapshot payload as written (borrowing the state).
#[derive(Serialize)]
struct SnapshotOut<'a> {
    format: u32,
    last_applied: &'a Option<LogId>,
    membership: &'a StoredMembership,
    state: &'a crate::StateData,
}

/// Snapshot payload as read.
#[derive(Deserialize)]
struct SnapshotIn {
    #[serde(default = "format_v1")]
    format: u32,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: StateMachine,
}

/// Decodes snapshot data (JSON of the state machine, last applied log id and membership).
pub(crate) fn decode_snapshot(data: &[u8]) -> Result<Applied, serde_json::Error> {
    let s: SnapshotIn = serde_json::from_slice(data)?;
    if s.format > SNAPSHOT_FORMAT {
        return Err(serde::de::Error::custom(format!(
            "snapshot format {} is newer than this server understands ({SNAPSHOT_FORMAT}); upgrade this server",
            s.format
        )));
    }
    Ok(Applied {
        state: s.state,
        last_applied: s.last_applied,
        membership: s.membership,
    })
}

/// Takes the read lock, ignoring poisoning (the state is plain data).
pub(crate) fn read_lock(s: &RwLock<Applied>) -> RwLockReadGuard<'_, Applied> {
    s.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock(s: &RwLock<Applied>) -> RwLockWriteGuard<'_, Applied> {
    s.write().unwrap_or_else(PoisonError::into_inner)
}

fn snap_err(e: &DbError) -> StorageError {
    StorageIOError::new(ErrorSubject::Snapshot(None), ErrorVerb::Write, e).into()
}

/// Writes a snapshot into the redb file unless a newer one is already there.
fn persist_snapshot(db: &Database, meta: &SnapshotMeta, data: &[u8]) -> Result<bool, DbError> {
    let meta_bytes = serde_json::to_vec(meta).map_err(DbError::Encode)?;
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate);
    {
        let mut t = tx.open_table(SNAPSHOT)?;
        if let Some(cur) = t.get(SNAP_META)? {
            if let Ok(cur) = serde_json::from_slice::<SnapshotMeta>(cur.value()) {
                if cur.last_log_id > meta.last_log_id {
                    return Ok(false);
                }
            }
        }
        t.insert(SNAP_META, meta_bytes.as_slice())?;
        t.insert(SNAP_DATA, data)?;
    }
    tx.commit()?;
    Ok(true)
}

/// Reads the stored snapshot, if any.
pub(crate) fn load_snapshot(db: &Database) -> Result<Option<(SnapshotMeta, Vec<u8>)>, DbError> {
    let Some(meta) = db::get_json::<SnapshotMeta>(db, SNAPSHOT, SNAP_META)? else {
        return Ok(None);
    };
    let tx = db.begin_read()?;
    let t = tx.open_table(SNAPSHOT)?;
    let data = t
        .get(SNAP_DATA)?
        .map(|v| v.value().to_vec())
        .unwrap_or_default();
    Ok(Some((meta, data)))
}

/// The openraft state machine store.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<db::Db>,
    shared: SharedState,
    applied_tx: watch::Sender<u64>,
    snapshot_seq: Arc<AtomicU64>,
    wakeups: Arc<super::wakeups::Wakeups>,
    growth: Arc<super::growth::LogGrowth>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore").finish_non_exhaustive()
    }
}

impl StateMachineStore {
    /// A store starting from `applied` (restored from the stored snapshot, or empty).
    pub(crate) fn new(
        db: Arc<db::Db>,
        applied: Applied,
        growth: Arc<super::growth::LogGrowth>,
    ) -> Self {
        let index = applied.last_applied.map_or(0, |l| l.index);
        let (applied_tx, _) = watch::channel(index);
        Self {
            db,
            shared: Arc::new(RwLock::new(applied)),
            applied_tx,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
            wakeups: Arc::default(),
            growth,
        }
    }

    /// The log's growth since the last snapshot.
    pub fn growth(&self) -> Arc<super::growth::LogGrowth> {
        self.growth.clone()
    }

    /// The per-node wake-ups of long-polls.
    pub fn wakeups(&self) -> Arc<super::wakeups::Wakeups> {
        self.wakeups.clone()
    }

    /// The shared applied state.
    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    /// A receiver of the last applied log index, updated after every applied batch and snapshot
    /// install.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn publish(&self, index: u64) {
        self.applied_tx.send_if_modified(|cur| {
            if *cur == index {
                false
            } else {
                *cur = index;
                true
            }
        });
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let db = self.db.clone();
        let shared = self.shared.clone();
        // Encoded under the read lock, straight from the live state: copying the state first
        // would leave a copy's worth of freed small allocations in the heap after every
        // snapshot. Applying waits meanwhile (a fraction of a second at 100,000 instances).
        let (meta, data) = db::blocking(move || {
            let g = read_lock(&shared);
            let snapshot_id = match g.last_applied {
                Some(l) => format!(
                    "{}-{}-{}-{seq}",
                    l.leader_id.term, l.leader_id.node_id, l.index
                ),
                None => format!("0-0-0-{seq}"),
            };
            let meta = SnapshotMeta {
                last_log_id: g.last_applied,
                last_membership: g.membership.clone(),
                snapshot_id,
            };
            let out = SnapshotOut {
                format: SNAPSHOT_FORMAT,
                last_applied: &meta.last_log_id,
                membership: &meta.last_membership,
                state: &g.state.data,
            };
            let data = serde_json::to_vec(&out).map_err(DbError::Encode)?;
            drop(g);
            persist_snapshot(&db, &meta, &data)?;
            Ok((meta, data))
        })
        .await
        .map_err(|e| snap_err(&e))?;
        self.growth.snapshotted();
        tracing::info!(snapshot = %meta, bytes = data.len(), "built raft snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let g = read_lock(&self.shared);
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let (last, woken) = {
            let mut g = write_lock(&self.shared);
            for entry in entries {
                let index = entry.log_id.index;
                g.last_applied = Some(entry.log_id);
                let res = match entry.payload {
                    EntryPayload::Blank => Ok(CommandOutput::None),
                    EntryPayload::Normal(env) => g.state.apply(index, &env),
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembership::new(Some(entry.log_id), m);
                        Ok(CommandOutput::None)
                    }
                };
                results.push(res);
            }
            (g.last_applied, g.state.take_woken())
        };
        if let Some(last) = last {
            if !woken.is_empty() {
                self.wakeups.notify(Some(woken));
            }
            self.publish(last.index);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        tracing::info!(snapshot = %meta, "installing raft snapshot");
        let data = snapshot.into_inner();
        let db = self.db.clone();
        let m = meta.clone();
        let applied = db::blocking(move || {
            let applied = decode_snapshot(&data).map_err(|source| DbError::Decode {
                key: format!("snapshot {}", m.snapshot_id),
                source,
            })?;
            persist_snapshot(&db, &m, &data)?;
            Ok(applied)
        })
        .await
        .map_err(|e| {
            StorageError::from(StorageIOError::new(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                &e,
            ))
        })?;
        if applied.last_applied != meta.last_log_id {
            tracing::warn!(
                snapshot = %meta,
                "snapshot data's last applied log id differs from its metadata; using the metadata"
            );
        }
        {
            let mut g = write_lock(&self.shared);
            g.state = applied.state;
            g.last_applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
        }
        let index = meta.last_log_id.map_or(0, |l| l.index);
        self.wakeups.notify(None);
        self.publish(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let db = self.db.clone();
        let snap = db::blocking(move || load_snapshot(&db))
            .await
            .map_err(|e| {
                StorageError::from(StorageIOError::new(
                    ErrorSubject::Snapshot(None),
                    ErrorVerb::Read,
                    &e,
                ))
            })?;
        Ok(snap.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(format: Option<u32>) -> Vec<u8> {
        let state = StateMachine::default();
        let membership = StoredMembership::default();
        let mut v = serde_json::to_value(SnapshotOut {
            format: SNAPSHOT_FORMAT,
            last_applied: &None,
            membership: &membership,
            state: &state,
        })
        .unwrap();
        match format {
            Some(f) => v["format"] = f.into(),
            None => {
                v.as_object_mut().unwrap().remove("format");
            }
        }
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn snapshots_carry_a_format_and_newer_ones_are_refused() {
        assert!(decode_snapshot(&encoded(Some(SNAPSHOT_FORMAT))).is_ok());
        // Written before the format field existed.
        assert!(decode_snapshot(&encoded(None)).is_ok());
        let err = decode_snapshot(&encoded(Some(SNAPSHOT_FORMAT + 1)))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("upgrade this server"), "{err}");
    }
}
