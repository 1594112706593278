//! openraft's storage conformance suite, run against our RocksDB log store and state machine.

use openraft::testing::{StoreBuilder, Suite};

use crate::log_store::LogStore;
use crate::state_machine::StateMachineStore;
use crate::store::DataDir;
use crate::types::{StorageError, TypeConfig};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(&dir.path().join("data"), 1, "suite").expect("open data dir");
        let log = LogStore::new(data.db.clone());
        let sm = StateMachineStore::new(data.db.clone(), data.snapshot_path())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn rocksdb_stores_pass_openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(RocksBuilder)
}
