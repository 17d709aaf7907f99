//! The relay's [`RelayStore`] on SQLite. The relay holds only end-to-end
//! ciphertext and public records, so nothing here is sealed again.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use p2pchat_protocol::relay::{MailboxEntry, PeerRecord, RelayStore, RelayStoreError};
use p2pchat_protocol::{PeerId, Timestamp};

use crate::schema::{relay_schema, Schema};
use crate::{configure, Durability, StorageError};

/// The relay's store: its mailbox and its peer directory.
pub struct SqliteRelayStore {
    conn: Connection,
    in_transaction: bool,
    checkpointer: crate::checkpoint::Checkpointer,
}

impl core::fmt::Debug for SqliteRelayStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SqliteRelayStore").finish_non_exhaustive()
    }
}

fn backend(e: rusqlite::Error) -> RelayStoreError {
    RelayStoreError::Unavailable(e.to_string())
}

fn ts(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

impl SqliteRelayStore {
    /// Opens (creating or upgrading) the relay database at `path`.
    pub fn open(path: &Path, durability: Durability) -> Result<Self, StorageError> {
        Self::open_with(path, durability, &relay_schema())
    }

    /// Opens with an explicit schema.
    pub fn open_with(path: &Path, durability: Durability, schema: &Schema) -> Result<Self, StorageError> {
        let mut conn = crate::open_private(path)?;
        schema.refuse_newer(&conn)?;
        configure(&conn, durability)?;
        schema.migrate(&mut conn)?;
        Ok(Self { conn, in_transaction: false, checkpointer: crate::checkpoint::Checkpointer::new(path) })
    }

    fn guard(&self) -> Result<(), RelayStoreError> {
        if self.in_transaction {
            Ok(())
        } else {
            Err(RelayStoreError::Misuse("read or write outside a transaction"))
        }
    }

    fn entries(&self, sql: &str, args: impl rusqlite::Params) -> Result<Vec<MailboxEntry>, RelayStoreError> {
        self.guard()?;
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend)?;
        let rows = stmt
            .query_map(args, |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (recipient, id, from, envelope, at) = row.map_err(backend)?;
            let parse =
                |s: &str| s.parse::<PeerId>().map_err(|_| RelayStoreError::Unavailable("corrupt peer ID".into()));
            out.push(MailboxEntry {
                id: id as u64,
                recipient: parse(&recipient)?,
                from: parse(&from)?,
                envelope,
                stored_at: Timestamp::from_millis(at.max(0) as u64),
            });
        }
        Ok(out)
    }

    fn execute(&mut self, sql: &str, args: impl rusqlite::Params) -> Result<usize, RelayStoreError> {
        self.guard()?;
        self.conn.prepare_cached(sql).and_then(|mut s| s.execute(args)).map_err(backend)
    }

    fn scalar(&self, sql: &str, args: impl rusqlite::Params) -> Result<Option<i64>, RelayStoreError> {
        self.guard()?;
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.query_row(args, |r| r.get::<_, Option<i64>>(0)).optional())
            .map(Option::flatten)
            .map_err(backend)
    }
}

const ENTRY_COLUMNS: &str = "recipient, id, sender, envelope, stored_at";

impl RelayStore for SqliteRelayStore {
    fn begin(&mut self) -> Result<(), RelayStoreError> {
        if self.in_transaction {
            return Err(RelayStoreError::Misuse("a transaction is already open"));
        }
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(backend)?;
        self.in_transaction = true;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), RelayStoreError> {
        self.guard()?;
        self.conn.execute_batch("COMMIT").map_err(backend)?;
        self.in_transaction = false;
        self.checkpointer.committed();
        Ok(())
    }

    fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.in_transaction = false;
    }

    fn mailbox(&self, peer: &PeerId) -> Result<Vec<MailboxEntry>, RelayStoreError> {
        let sql = format!("SELECT {ENTRY_COLUMNS} FROM relay_mailbox WHERE recipient = ?1 ORDER BY id");
        self.entries(&sql, [peer.to_string()])
    }

    fn mailbox_after(&self, peer: &PeerId, after: u64, limit: usize) -> Result<Vec<MailboxEntry>, RelayStoreError> {
        let sql =
            format!("SELECT {ENTRY_COLUMNS} FROM relay_mailbox WHERE recipient = ?1 AND id > ?2 ORDER BY id LIMIT ?3");
        self.entries(&sql, params![peer.to_string(), after as i64, limit.min(i64::MAX as usize) as i64])
    }

    fn record_count(&self) -> Result<usize, RelayStoreError> {
        Ok(self.scalar("SELECT COUNT(*) FROM relay_records", [])?.unwrap_or(0) as usize)
    }

    fn mailbox_usage(&self, peer: &PeerId) -> Result<(usize, usize), RelayStoreError> {
        self.guard()?;
        self.conn
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(envelope)), 0) FROM relay_mailbox WHERE recipient = ?1",
            )
            .and_then(|mut s| s.query_row([peer.to_string()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))))
            .map(|(c, b)| (c as usize, b as usize))
            .map_err(backend)
    }

    fn mailbox_total_bytes(&self) -> Result<usize, RelayStoreError> {
        Ok(self.scalar("SELECT COALESCE(SUM(LENGTH(envelope)), 0) FROM relay_mailbox", [])?.unwrap_or(0) as usize)
    }

    fn put_mailbox_entry(&mut self, e: &MailboxEntry) -> Result<(), RelayStoreError> {
        self.execute(
            "INSERT OR REPLACE INTO relay_mailbox (recipient, id, sender, envelope, stored_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![e.recipient.to_string(), e.id as i64, e.from.to_string(), e.envelope, ts(e.stored_at)],
        )
        .map(|_| ())
    }

    fn delete_mailbox_entry(&mut self, peer: &PeerId, id: u64) -> Result<(), RelayStoreError> {
        self.execute("DELETE FROM relay_mailbox WHERE recipient = ?1 AND id = ?2", params![peer.to_string(), id as i64])
            .map(|_| ())
    }

    fn delete_mailbox_before(&mut self, cutoff: Timestamp) -> Result<usize, RelayStoreError> {
        self.execute("DELETE FROM relay_mailbox WHERE stored_at < ?1", [ts(cutoff)])
    }

    fn oldest_mailbox_entry(&self) -> Result<Option<Timestamp>, RelayStoreError> {
        Ok(self
            .scalar("SELECT MIN(stored_at) FROM relay_mailbox", [])?
            .map(|t| Timestamp::from_millis(t.max(0) as u64)))
    }

    fn next_mailbox_id(&mut self) -> Result<u64, RelayStoreError> {
        let next = self.scalar("SELECT value FROM relay_meta WHERE name = 'next_mailbox_id'", [])?.unwrap_or(0) + 1;
        self.execute(
            "INSERT INTO relay_meta (name, value) VALUES ('next_mailbox_id', ?1) \
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            [next],
        )?;
        Ok(next as u64)
    }

    fn record(&self, peer: &PeerId) -> Result<Option<PeerRecord>, RelayStoreError> {
        self.guard()?;
        let bytes: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT record FROM relay_records WHERE peer_id = ?1")
            .and_then(|mut s| s.query_row([peer.to_string()], |r| r.get(0)).optional())
            .map_err(backend)?;
        bytes
            .map(|b| postcard::from_bytes(&b).map_err(|e| RelayStoreError::Unavailable(format!("corrupt record: {e}"))))
            .transpose()
    }

    fn put_record(&mut self, record: &PeerRecord) -> Result<(), RelayStoreError> {
        let bytes = postcard::to_allocvec(record).map_err(|e| RelayStoreError::Unavailable(e.to_string()))?;
        self.execute(
            "INSERT INTO relay_records (peer_id, record, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT(peer_id) DO UPDATE SET record = excluded.record, expires_at = excluded.expires_at",
            params![record.peer_id.to_string(), bytes, ts(record.expires_at)],
        )
        .map(|_| ())
    }

    fn delete_expired_records(&mut self, now: Timestamp) -> Result<usize, RelayStoreError> {
        self.execute("DELETE FROM relay_records WHERE expires_at <= ?1", [ts(now)])
    }

    fn next_record_expiry(&self) -> Result<Option<Timestamp>, RelayStoreError> {
        Ok(self
            .scalar("SELECT MIN(expires_at) FROM relay_records", [])?
            .map(|t| Timestamp::from_millis(t.max(0) as u64)))
    }
}
