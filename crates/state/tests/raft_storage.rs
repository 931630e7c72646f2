//! openraft's storage test suite against the redb log store and the state machine store.

use nimbus_state::raft::log_store::LogStore;
use nimbus_state::raft::node::open_storage;
use nimbus_state::raft::sm_store::StateMachineStore;
use nimbus_state::raft::TypeConfig;
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = open_storage(dir.path(), 0).expect("open storage");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("storage suite");
}
