//! The engine's whole scenario suite, against SQLite files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use p2pchat_storage_sqlite::SqliteStore;

fn store() -> SqliteStore {
    SqliteStore::temporary([7; 32])
}

p2pchat_protocol::scenario_tests!(crate::store);
