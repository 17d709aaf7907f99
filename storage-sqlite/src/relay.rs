//! The relay's [`RelayStore`] on SQLite. The relay holds only end-to-end
//! ciphertext and public records, so nothing here is sealed again.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use p2pchat_protocol::relay::{MailboxEntry, PeerRecord, RelayStore, RelayStoreError, Source, Usage};
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
                    r.get::<_, Vec<u8>>(5)?,
                ))
            })
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (recipient, id, from, envelope, at, source) = row.map_err(backend)?;
            let parse =
                |s: &str| s.parse::<PeerId>().map_err(|_| RelayStoreError::Unavailable("corrupt peer ID".into()));
            out.push(MailboxEntry {
                id: id as u64,
                recipient: parse(&recipient)?,
                from: parse(&from)?,
                source: source_of(&source)?,
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

    /// Entries and bytes from a counter or aggregate row (none is zero).
    fn usage(&self, sql: &str, args: impl rusqlite::Params) -> Result<Usage, RelayStoreError> {
        self.guard()?;
        let row = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut s| {
                s.query_row(args, |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?))).optional()
            })
            .map_err(backend)?;
        let (count, bytes) = row.unwrap_or((None, None));
        let size = |v: Option<i64>| usize::try_from(v.unwrap_or(0).max(0)).unwrap_or(usize::MAX);
        Ok(Usage { count: size(count), bytes: size(bytes) })
    }

    fn scalar(&self, sql: &str, args: impl rusqlite::Params) -> Result<Option<i64>, RelayStoreError> {
        self.guard()?;
        crate::query_scalar(&self.conn, sql, args).map_err(backend)
    }
}

const ENTRY_COLUMNS: &str = "recipient, id, sender, envelope, stored_at, source";

fn source_of(bytes: &[u8]) -> Result<Source, RelayStoreError> {
    let bytes: [u8; 16] = bytes.try_into().map_err(|_| RelayStoreError::Unavailable("corrupt source".into()))?;
    Ok(Source(bytes))
}

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

    fn mailbox_usage(&self, peer: &PeerId) -> Result<Usage, RelayStoreError> {
        self.usage("SELECT entries, bytes FROM relay_mailbox_usage WHERE recipient = ?1", [peer.to_string()])
    }

    fn mailbox_usage_by_sender(&self, recipient: &PeerId, sender: &PeerId) -> Result<Usage, RelayStoreError> {
        // Bounded by the per-sender quota, on an index.
        self.usage(
            "SELECT COUNT(*), SUM(LENGTH(envelope)) FROM relay_mailbox WHERE recipient = ?1 AND sender = ?2",
            params![recipient.to_string(), sender.to_string()],
        )
    }

    fn mailbox_usage_by_source(&self, recipient: &PeerId, source: &Source) -> Result<Usage, RelayStoreError> {
        // Bounded by the per-source quota, on an index.
        self.usage(
            "SELECT COUNT(*), SUM(LENGTH(envelope)) FROM relay_mailbox WHERE recipient = ?1 AND source = ?2",
            params![recipient.to_string(), source.0.as_slice()],
        )
    }

    fn source_usage(&self, source: &Source) -> Result<Usage, RelayStoreError> {
        self.usage("SELECT entries, bytes FROM relay_source_usage WHERE source = ?1", [source.0.as_slice()])
    }

    fn mailbox_total(&self) -> Result<Usage, RelayStoreError> {
        self.usage("SELECT entries, bytes FROM relay_totals WHERE id = 0", [])
    }

    fn put_mailbox_entry(&mut self, e: &MailboxEntry) -> Result<(), RelayStoreError> {
        // A plain INSERT: the counters' triggers see every row once (an
        // entry ID is never reused).
        self.execute(
            "INSERT INTO relay_mailbox (recipient, id, sender, envelope, stored_at, source) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                e.recipient.to_string(),
                e.id as i64,
                e.from.to_string(),
                e.envelope,
                ts(e.stored_at),
                e.source.0.as_slice()
            ],
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

    fn put_record(&mut self, record: &PeerRecord, source: &Source, seen_at: Timestamp) -> Result<(), RelayStoreError> {
        let bytes = postcard::to_allocvec(record).map_err(|e| RelayStoreError::Unavailable(e.to_string()))?;
        // A replacement keeps the source that first published the record.
        self.execute(
            "INSERT INTO relay_records (peer_id, record, expires_at, source, last_seen) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT(peer_id) DO UPDATE SET record = excluded.record, expires_at = excluded.expires_at, \
             last_seen = excluded.last_seen",
            params![record.peer_id.to_string(), bytes, ts(record.expires_at), source.0.as_slice(), ts(seen_at)],
        )
        .map(|_| ())
    }

    fn touch_record(&mut self, peer: &PeerId, seen_at: Timestamp) -> Result<(), RelayStoreError> {
        self.execute(
            "UPDATE relay_records SET last_seen = ?2 WHERE peer_id = ?1",
            params![peer.to_string(), ts(seen_at)],
        )
        .map(|_| ())
    }

    fn records_from_source(&self, source: &Source) -> Result<usize, RelayStoreError> {
        let count = self.scalar("SELECT COUNT(*) FROM relay_records WHERE source = ?1", [source.0.as_slice()])?;
        Ok(usize::try_from(count.unwrap_or(0).max(0)).unwrap_or(usize::MAX))
    }

    fn idle_records(&self, seen_before: Timestamp, limit: usize) -> Result<Vec<PeerId>, RelayStoreError> {
        self.guard()?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT peer_id FROM relay_records r WHERE last_seen < ?1 \
                 AND NOT EXISTS (SELECT 1 FROM relay_mailbox_usage u WHERE u.recipient = r.peer_id) \
                 ORDER BY last_seen LIMIT ?2",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![ts(seen_before), limit.min(i64::MAX as usize) as i64], |r| r.get::<_, String>(0))
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let text = row.map_err(backend)?;
            out.push(text.parse().map_err(|_| RelayStoreError::Unavailable("corrupt peer ID".into()))?);
        }
        Ok(out)
    }

    fn delete_record(&mut self, peer: &PeerId) -> Result<(), RelayStoreError> {
        self.execute("DELETE FROM relay_records WHERE peer_id = ?1", [peer.to_string()]).map(|_| ())
    }

    fn delete_expired_records(&mut self, now: Timestamp, seen_before: Timestamp) -> Result<usize, RelayStoreError> {
        self.execute(
            "DELETE FROM relay_records WHERE expires_at <= ?1 AND last_seen < ?2",
            params![ts(now), ts(seen_before)],
        )
    }
}
