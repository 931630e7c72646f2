//! The redb file shared by the log store and the state machine store.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Log entries: index -> JSON of `Entry`.
pub(crate) const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_logs");
/// Raft metadata: key -> JSON value (see the `META_*` keys).
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// The current snapshot: `SNAP_META` -> JSON of `SnapshotMeta`, `SNAP_DATA` -> snapshot bytes.
pub(crate) const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");

/// The saved vote.
pub(crate) const META_VOTE: &str = "vote";
/// The saved committed log id.
pub(crate) const META_COMMITTED: &str = "committed";
/// The last purged log id.
pub(crate) const META_LAST_PURGED: &str = "last_purged";
/// The node id that created this file.
pub(crate) const META_NODE_ID: &str = "node_id";
/// Snapshot metadata key.
pub(crate) const SNAP_META: &str = "meta";
/// Snapshot data key.
pub(crate) const SNAP_DATA: &str = "data";

/// Errors of the redb layer, with serde errors folded in.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    #[error(transparent)]
    Redb(Box<redb::Error>),
    #[error("cannot decode stored value under {key} (corrupt, or written by a newer nimbus whose log format this server does not understand: upgrade this server)")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode value")]
    Encode(#[source] serde_json::Error),
    #[error("blocking storage task failed")]
    Join(#[source] tokio::task::JoinError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {
        $(impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                DbError::Redb(Box::new(e.into()))
            }
        })*
    };
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The open database. Dropping the last handle closes the file; `closed` is dropped right after
/// (fields drop in order), which is how shutdown learns the file can be reopened.
pub(crate) struct Db {
    db: Database,
    closed: tokio::sync::watch::Sender<()>,
}

impl Db {
    /// A receiver whose `changed()` fails once the database file is closed.
    pub(crate) fn closed_signal(&self) -> tokio::sync::watch::Receiver<()> {
        self.closed.subscribe()
    }
}

impl std::ops::Deref for Db {
    type Target = Database;

    fn deref(&self) -> &Database {
        &self.db
    }
}

/// redb's page cache (its default is 1 GiB).
const CACHE_BYTES: usize = 32 << 20;

/// Opens or creates `raft.redb` in `dir` and makes sure all tables exist.
pub(crate) fn open(path: &Path) -> Result<Arc<Db>, Box<redb::Error>> {
    open_inner(path).map_err(Box::new)
}

#[allow(clippy::result_large_err)] // boxed by the caller
fn open_inner(path: &Path) -> Result<Arc<Db>, redb::Error> {
    // redb caches up to 1 GiB by default; the log is append-mostly and read back only to
    // replicate, so a small cache keeps the server's memory proportional to its state.
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)?;
    let tx = db.begin_write()?;
    {
        tx.open_table(LOGS)?;
        tx.open_table(META)?;
        tx.open_table(SNAPSHOT)?;
    }
    tx.commit()?;
    let (closed, _) = tokio::sync::watch::channel(());
    Ok(Arc::new(Db { db, closed }))
}

/// Reads and decodes a JSON value from `table` (a `&str`-keyed table).
pub(crate) fn get_json<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
) -> Result<Option<T>, DbError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(table)?;
    let Some(v) = t.get(key)? else {
        return Ok(None);
    };
    serde_json::from_slice(v.value())
        .map(Some)
        .map_err(|source| DbError::Decode {
            key: key.to_owned(),
            source,
        })
}

/// Encodes `value` as JSON and stores it under `key` in `META`, with the given durability.
pub(crate) fn put_meta<T: Serialize>(
    db: &Database,
    key: &str,
    value: &T,
    durability: redb::Durability,
) -> Result<(), DbError> {
    let bytes = serde_json::to_vec(value).map_err(DbError::Encode)?;
    let mut tx = db.begin_write()?;
    tx.set_durability(durability);
    {
        let mut t = tx.open_table(META)?;
        t.insert(key, bytes.as_slice())?;
    }
    tx.commit()?;
    Ok(())
}

/// Runs a blocking storage closure on the blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, DbError>
where
    F: FnOnce() -> Result<T, DbError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(DbError::Join)?
}
