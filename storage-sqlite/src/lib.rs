//! SQLite storage for p2pchat: the engine's [`Store`](p2pchat_protocol::engine::Store)
//! ([`SqliteStore`]) and the relay's
//! [`RelayStore`](p2pchat_protocol::relay::RelayStore) ([`SqliteRelayStore`]),
//! on bundled SQLite.
//!
//! - Every engine or relay call is one transaction (`BEGIN IMMEDIATE` …
//!   `COMMIT`); the engine releases nothing before the commit.
//! - Ratchet states, sender keys (with their skipped keys), pending key
//!   exchanges, outbox payloads, conversation records and message texts are
//!   sealed with XSalsa20-Poly1305 under a [`MasterKey`] derived from the
//!   node's identity key and held only in memory.
//! - Schemas are versioned with `PRAGMA user_version`; an older database is
//!   upgraded, a newer one refused.
//!
//! `docs/STORAGE.md` gives the schema and every deviation from the reference.
#![forbid(unsafe_code)]

mod checkpoint;
mod identity;
mod node;
mod relay;
mod schema;
mod seal;

use std::path::PathBuf;

pub use identity::{
    identity_is_wrapped, load_identity, load_identity_with, load_or_create_identity, load_or_create_identity_with,
    set_identity_passphrase, Passphrase, IDENTITY_FILE,
};
pub use node::SqliteStore;
pub use relay::SqliteRelayStore;
pub use schema::{node_schema, relay_schema, Migration, Schema};
pub use seal::{MasterKey, MASTER_KEY_INFO, MASTER_KEY_SALT};

/// How hard a commit tries to survive failures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// WAL with `synchronous=NORMAL`: a committed transaction survives the
    /// process crashing; the last ones may be lost if the machine loses
    /// power.
    #[default]
    Normal,
    /// WAL with `synchronous=FULL`: every commit is on disk before it
    /// returns, and survives power loss.
    Full,
}

/// Why storage could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer p2pchat.
    #[error("the {kind} database is at schema version {found}, newer than this p2pchat supports ({supported}); upgrade p2pchat or use another data directory")]
    NewerSchema {
        /// Which database.
        kind: &'static str,
        /// Its version.
        found: u32,
        /// The newest this build knows.
        supported: u32,
    },
    /// A migration failed; the database stays at the version before it.
    #[error("upgrading the {kind} database to version {to} ({name}) failed: {reason}")]
    Migration {
        /// Which database.
        kind: &'static str,
        /// The version it was going to.
        to: u32,
        /// The migration.
        name: &'static str,
        /// SQLite's error.
        reason: String,
    },
    /// Rows an older version left could not be brought up to date when
    /// the store opened (a sealed row that does not open, say).
    #[error("bringing the database's stored key exchanges up to date failed: {0}")]
    Backfill(String),
    /// The identity key is wrapped under a passphrase and none was given.
    #[error("identity key file {path} is protected by a passphrase: give it (p2pchat asks at a terminal, or reads it from --passphrase-fd)")]
    PassphraseNeeded {
        /// The file.
        path: PathBuf,
    },
    /// The passphrase does not open the identity key (or the file was
    /// altered).
    #[error("the passphrase does not open identity key file {path} (or the file was altered)")]
    WrongPassphrase {
        /// The file.
        path: PathBuf,
    },
    /// An empty passphrase was given.
    #[error("an empty passphrase protects nothing; give one, or remove the passphrase")]
    EmptyPassphrase,
    /// The database was sealed under another identity's key.
    #[error("the database was sealed under another identity's key: it belongs to a different identity file")]
    WrongKey,
    /// The identity key file is unusable.
    #[error("identity key file {path}: {problem}")]
    IdentityFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        problem: String,
    },
    /// A file operation failed.
    #[error("{path}: {reason}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
}

/// The one integer (or NULL) a query answers, or `None` for no row.
fn query_scalar(conn: &rusqlite::Connection, sql: &str, args: impl rusqlite::Params) -> rusqlite::Result<Option<i64>> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached(sql)
        .and_then(|mut s| s.query_row(args, |r| r.get::<_, Option<i64>>(0)).optional())
        .map(Option::flatten)
}

/// Opens `path`, creating it readable by its owner only (SQLite gives its
/// WAL and shared-memory files the same mode).
fn open_private(path: &std::path::Path) -> Result<rusqlite::Connection, StorageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| StorageError::Io { path: path.to_owned(), reason: e.to_string() };
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// The page size of new databases.
const PAGE_SIZE: u32 = 1024;

/// Settings of every connection: WAL, foreign keys, a busy timeout, and
/// the durability asked for.
fn configure(conn: &rusqlite::Connection, durability: Durability) -> Result<(), StorageError> {
    // Each commit appends the pages it touched to the WAL: small pages mean
    // fewer bytes per commit. Takes effect only on a new database.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Normal => "NORMAL",
            Durability::Full => "FULL",
        },
    )?;
    // Deleted and replaced rows are zeroed, not left in free pages: an old
    // sealed ratchet state must not outlive its replacement for anyone who
    // later gets the identity key. The WAL is truncated after checkpoints
    // for the same reason.
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
    // Checkpoints (copying the WAL into the database, with a sync) run on
    // their own thread (`checkpoint`); the writer's own, every 16 MiB of
    // WAL, finds most of it copied already.
    conn.pragma_update(None, "wal_autocheckpoint", 16 * 1024 * 1024 / PAGE_SIZE)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}
