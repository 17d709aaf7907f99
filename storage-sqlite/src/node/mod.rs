//! The engine's [`Store`](p2pchat_protocol::engine::Store) on SQLite.
//!
//! This module opens the file, holds the connection and the sealing helpers,
//! and runs transactions and the retention schedule; each other store trait
//! is implemented in the submodule named for its concern.

mod conversations;
mod groups;
mod invitations;
mod key_exchanges;
mod messages;
mod outbox;
mod peer_records;
mod sessions;

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use zeroize::Zeroizing;

use p2pchat_protocol::engine::{
    KeyExchangeAttempt, KeyExchangeStore, Message, RetentionStore, StoreError, Transaction,
};
use p2pchat_protocol::Timestamp;

use crate::schema::{node_schema, Schema};
use crate::seal::MasterKey;
use crate::{configure, Durability, StorageError};

/// Labels of the sealed columns: a sealed value opens only in its own
/// column and row.
mod label {
    pub(super) const CONVERSATION: &[u8] = b"conversation";
    pub(super) const MESSAGE: &[u8] = b"message";
    pub(super) const SESSIONS: &[u8] = b"sessions";
    pub(super) const GROUP_KEYS: &[u8] = b"group-keys";
    pub(super) const ANSWERED: &[u8] = b"answered-request";
    pub(super) const KEY_EXCHANGE: &[u8] = b"key-exchange";
    pub(super) const OUTBOX: &[u8] = b"outbox";
    pub(super) const KEY_CHECK: &[u8] = b"key-check";
    pub(super) const INVITATION: &[u8] = b"invitation";
    pub(super) const PEER_RECORD: &[u8] = b"peer-record";
}

const NONCE_LEN: usize = 24;

/// The node's store: one SQLite file, every secret and every message text
/// sealed under the master key.
pub struct SqliteStore {
    conn: Connection,
    key: MasterKey,
    /// The seed the master key came from, for test copies (`testkit` only).
    #[cfg(feature = "testkit")]
    seed: Option<p2pchat_protocol::keys::IdentitySeed>,
    /// Delete the file (and its WAL) on drop: temporary test stores only.
    #[cfg(feature = "testkit")]
    temporary: bool,
    path: PathBuf,
    durability: Durability,
    in_transaction: bool,
    fail_commits: u32,
    checkpointer: crate::checkpoint::Checkpointer,
}

impl core::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} does not open under this node's key, or does not decode"))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    postcard::to_allocvec(value).map(Zeroizing::new).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Milliseconds as SQLite's signed integer: "never" (`u64::MAX`, which the
/// engine saturates to) stays the largest value rather than wrapping.
fn ts(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

fn from_ts(v: i64) -> Timestamp {
    Timestamp::from_millis(v.max(0) as u64)
}

impl SqliteStore {
    /// Opens (creating or upgrading) the node database at `path`.
    pub fn open(path: &Path, key: MasterKey, durability: Durability) -> Result<Self, StorageError> {
        Self::open_with(path, key, durability, &node_schema())
    }

    /// Opens with an explicit schema (tests add a migration to exercise
    /// upgrades).
    pub fn open_with(
        path: &Path,
        key: MasterKey,
        durability: Durability,
        schema: &Schema,
    ) -> Result<Self, StorageError> {
        let mut conn = crate::open_private(path)?;
        schema.refuse_newer(&conn)?;
        configure(&conn, durability)?;
        schema.migrate(&mut conn)?;
        let mut store = Self {
            conn,
            key,
            #[cfg(feature = "testkit")]
            seed: None,
            #[cfg(feature = "testkit")]
            temporary: false,
            path: path.to_owned(),
            durability,
            in_transaction: false,
            fail_commits: 0,
            checkpointer: crate::checkpoint::Checkpointer::new(path),
        };
        store.check_key()?;
        store.fill_key_exchange_deadlines()?;
        Ok(store)
    }

    /// Gives the key exchanges a version 1 database left their deadline
    /// column (unsealing each once), so that the next deadline comes from
    /// SQL.
    fn fill_key_exchange_deadlines(&mut self) -> Result<(), StorageError> {
        let missing: i64 =
            self.conn.query_row("SELECT COUNT(*) FROM chat_key_exchanges WHERE deadline IS NULL", [], |r| r.get(0))?;
        if missing == 0 {
            return Ok(());
        }
        let fill = |store: &mut Self| -> Result<(), StoreError> {
            let attempts: Vec<KeyExchangeAttempt> = store.read_sealed_list(
                "SELECT peer_id, sealed FROM chat_key_exchanges WHERE deadline IS NULL ORDER BY peer_id",
                [],
                label::KEY_EXCHANGE,
                "a pending key exchange",
            )?;
            for attempt in attempts {
                store.put_key_exchange(&attempt)?;
            }
            Ok(())
        };
        self.begin().map_err(|e| StorageError::Backfill(e.to_string()))?;
        match fill(self).and_then(|()| self.commit()) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.rollback();
                Err(StorageError::Backfill(e.to_string()))
            }
        }
    }

    /// `PRAGMA integrity_check`: `"ok"`, or what SQLite found wrong.
    pub fn integrity_check(&self) -> Result<String, StorageError> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let rows: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(rows.join("\n"))
    }

    /// The schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<u32, StorageError> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Whether `table` has `column` (for migration tests and diagnostics).
    pub fn table_has_column(&self, table: &str, column: &str) -> Result<bool, StorageError> {
        let mut stmt = self.conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
        let names: Vec<String> = stmt.query_map([table], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(names.iter().any(|n| n == column))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the next `count` commits fail and roll back (for tests of the
    /// engine's commit rule).
    pub fn fail_next_commits(&mut self, count: u32) {
        self.fail_commits = count;
    }

    /// A copy of the committed state, in a new file beside this one, as a
    /// crash would leave it (for tests).
    pub fn crash_copy(&self, to: &Path, key: MasterKey) -> Result<Self, StorageError> {
        let _ = std::fs::remove_file(to);
        self.conn.execute("VACUUM INTO ?1", [to.to_string_lossy()])?;
        Self::open(to, key, self.durability)
    }

    /// Refuses a database sealed under another node's key. A new database
    /// gets a sealed marker at once, so even one with nothing else in it
    /// tells.
    fn check_key(&self) -> Result<(), StorageError> {
        let marker: Option<Vec<u8>> =
            self.conn.query_row("SELECT sealed FROM chat_key_check WHERE id = 1", [], |r| r.get(0)).optional()?;
        match marker {
            Some(sealed) => match self.key.open(label::KEY_CHECK, b"1", &sealed) {
                Some(plain) if plain.as_slice() == label::KEY_CHECK => Ok(()),
                _ => Err(StorageError::WrongKey),
            },
            None => {
                let sealed = self.key.seal(label::KEY_CHECK, b"1", label::KEY_CHECK);
                self.conn.execute("INSERT INTO chat_key_check (id, sealed) VALUES (1, ?1)", [sealed])?;
                Ok(())
            }
        }
    }

    fn open_value<T: serde::de::DeserializeOwned>(
        &self,
        label: &[u8],
        row: &[u8],
        sealed: &[u8],
        what: &str,
    ) -> Result<T, StoreError> {
        let plain = self.key.open(label, row, sealed).ok_or_else(|| corrupt(what))?;
        postcard::from_bytes(&plain).map_err(|_| corrupt(what))
    }

    fn guard(&self) -> Result<(), StoreError> {
        if self.in_transaction {
            Ok(())
        } else {
            Err(StoreError::Misuse("read or write outside a transaction"))
        }
    }

    fn meta(&self, name: &str) -> Result<Option<i64>, StoreError> {
        self.guard()?;
        self.conn
            .prepare_cached("SELECT value FROM chat_meta WHERE name = ?1")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
            .map_err(backend)
    }

    fn set_meta(&mut self, name: &str, value: i64) -> Result<(), StoreError> {
        self.guard()?;
        self.conn
            .prepare_cached("INSERT INTO chat_meta (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value")
            .and_then(|mut s| s.execute(params![name, value]))
            .map(|_| ())
            .map_err(backend)
    }

    fn read_messages(&self, sql: &str, args: impl rusqlite::Params) -> Result<Vec<Message>, StoreError> {
        self.guard()?;
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend)?;
        let rows = stmt
            .query_map(args, |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?)))
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, nonce, content) = row.map_err(backend)?;
            let mut sealed = nonce;
            sealed.extend_from_slice(&content);
            out.push(self.open_value(label::MESSAGE, id.as_bytes(), &sealed, "a stored message")?);
        }
        Ok(out)
    }

    fn read_sealed_list<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
        label: &[u8],
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        self.guard()?;
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend)?;
        let rows = stmt.query_map(args, |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))).map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (key, sealed) = row.map_err(backend)?;
            out.push(self.open_value(label, key.as_bytes(), &sealed, what)?);
        }
        Ok(out)
    }

    /// The first column of every row `sql` selects, as text (IDs, parsed by
    /// the caller).
    fn read_ids(&self, sql: &str, args: impl rusqlite::Params) -> Result<Vec<String>, StoreError> {
        self.guard()?;
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend)?;
        let rows = stmt.query_map(args, |r| r.get::<_, String>(0)).map_err(backend)?;
        rows.map(|row| row.map_err(backend)).collect()
    }

    fn scalar(&self, sql: &str, args: impl rusqlite::Params) -> Result<Option<i64>, StoreError> {
        self.guard()?;
        crate::query_scalar(&self.conn, sql, args).map_err(backend)
    }

    fn execute(&mut self, sql: &str, args: impl rusqlite::Params) -> Result<(), StoreError> {
        self.guard()?;
        self.conn.prepare_cached(sql).and_then(|mut s| s.execute(args)).map(|_| ()).map_err(backend)
    }
}

impl Transaction for SqliteStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        if self.in_transaction {
            return Err(StoreError::Misuse("a transaction is already open"));
        }
        // IMMEDIATE takes the write lock now, so a commit never fails for a
        // lock another connection took in between.
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(backend)?;
        self.in_transaction = true;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.guard()?;
        if self.fail_commits > 0 {
            self.fail_commits -= 1;
            return Err(StoreError::Unavailable("commit failed (injected)".into()));
        }
        self.conn.execute_batch("COMMIT").map_err(backend)?;
        self.in_transaction = false;
        self.checkpointer.committed();
        Ok(())
    }

    fn rollback(&mut self) {
        // SQLite may already have rolled back (some errors end the
        // transaction themselves); only an open one is rolled back here.
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.in_transaction = false;
    }

    fn next_seq(&mut self) -> Result<u64, StoreError> {
        let next = self.meta("next_seq")?.unwrap_or(0) + 1;
        self.set_meta("next_seq", next)?;
        Ok(next as u64)
    }
}

impl RetentionStore for SqliteStore {
    fn retention_due(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.meta("retention_due")?.map(from_ts))
    }

    fn set_retention_due(&mut self, at: Timestamp) -> Result<(), StoreError> {
        self.set_meta("retention_due", ts(at))
    }
}

#[cfg(feature = "testkit")]
mod testkit {
    //! The engine's scenario suite runs against this store: a fresh file
    //! per store, and crash copies made with `VACUUM INTO`.
    #![allow(clippy::expect_used, missing_docs)]

    use std::sync::atomic::{AtomicU64, Ordering};

    use p2pchat_protocol::keys::IdentitySeed;
    use p2pchat_protocol::testkit::TestStore;

    use super::SqliteStore;
    use crate::{Durability, MasterKey};

    static NEXT: AtomicU64 = AtomicU64::new(0);

    fn fresh_path() -> std::path::PathBuf {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("p2pchat-scenario-{}-{n}.sqlite3", std::process::id()))
    }

    impl SqliteStore {
        /// A store in a fresh temporary file, for tests.
        pub fn temporary(seed: [u8; 32]) -> Self {
            let path = fresh_path();
            let key = MasterKey::derive(&IdentitySeed::from_bytes(seed));
            let mut store = SqliteStore::open(&path, key, Durability::Normal).expect("a temporary database opens");
            store.seed = Some(IdentitySeed::from_bytes(seed));
            store.temporary = true;
            store
        }
    }

    impl Drop for SqliteStore {
        fn drop(&mut self) {
            if self.temporary {
                for suffix in ["", "-wal", "-shm"] {
                    let mut path = self.path.clone().into_os_string();
                    path.push(suffix);
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }

    impl TestStore for SqliteStore {
        fn crash_copy(&self) -> Self {
            let seed = self.seed.as_ref().map(|s| *s.as_bytes()).unwrap_or([7; 32]);
            let key = MasterKey::derive(&IdentitySeed::from_bytes(seed));
            let mut copy = SqliteStore::crash_copy(self, &fresh_path(), key).expect("a crash copy opens");
            copy.seed = Some(IdentitySeed::from_bytes(seed));
            copy.temporary = true;
            copy
        }

        fn fail_next_commits(&mut self, count: u32) {
            SqliteStore::fail_next_commits(self, count)
        }
    }
}
