//! Versioned migrations on `PRAGMA user_version`.

use rusqlite::Connection;

use crate::StorageError;

/// One step from version `n - 1` to `n` (its index in the list plus one).
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// What it does, for errors and logs.
    pub name: &'static str,
    /// The SQL, run in one transaction with the version bump.
    pub sql: &'static str,
}

/// The migrations of a database kind, oldest first.
#[derive(Clone, Debug)]
pub struct Schema {
    /// Which database: named in errors.
    pub kind: &'static str,
    /// The migrations; the schema version is their count.
    pub migrations: Vec<Migration>,
}

impl Schema {
    /// The version a fully migrated database has.
    pub fn version(&self) -> u32 {
        self.migrations.len() as u32
    }

    /// This schema with one more migration after its last (tests use it to
    /// exercise upgrades while only one real version exists).
    pub fn with(mut self, migration: Migration) -> Self {
        self.migrations.push(migration);
        self
    }

    /// Refuses a database written by a newer version, before anything
    /// (even the journal mode) is changed in it.
    pub(crate) fn refuse_newer(&self, conn: &Connection) -> Result<(), StorageError> {
        let found: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let supported = self.version();
        if found > supported {
            return Err(StorageError::NewerSchema { kind: self.kind, found, supported });
        }
        Ok(())
    }

    /// Brings `conn` to this schema's version, one transaction per step. The
    /// version is read inside each step's write transaction, so two
    /// processes opening at once do not both migrate.
    pub(crate) fn migrate(&self, conn: &mut Connection) -> Result<(), StorageError> {
        loop {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let found: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            let supported = self.version();
            if found > supported {
                return Err(StorageError::NewerSchema { kind: self.kind, found, supported });
            }
            let Some(migration) = self.migrations.get(found as usize) else { return Ok(()) };
            let to = found + 1;
            tx.execute_batch(migration.sql).map_err(|e| StorageError::Migration {
                kind: self.kind,
                to,
                name: migration.name,
                reason: e.to_string(),
            })?;
            tx.pragma_update(None, "user_version", to)?;
            tx.commit()?;
        }
    }
}

/// The node's database.
pub fn node_schema() -> Schema {
    Schema {
        kind: "node",
        migrations: vec![
            Migration { name: "initial node schema", sql: NODE_V1 },
            Migration { name: "key exchange deadlines and held-message counts in SQL", sql: NODE_V2 },
            Migration { name: "group invitations and when each peer was last heard from", sql: NODE_V3 },
            Migration { name: "the last record seen of each peer", sql: NODE_V4 },
        ],
    }
}

/// The relay's database.
pub fn relay_schema() -> Schema {
    Schema {
        kind: "relay",
        migrations: vec![
            Migration { name: "initial relay schema", sql: RELAY_V1 },
            Migration { name: "quotas per sender and source, counted usage, idle records", sql: RELAY_V2 },
        ],
    }
}

/// Version 4 of the node's schema: the last signed record seen of each
/// peer, sealed (it lists where the peer can be reached: metadata), with
/// the peer and when it was seen beside it to find and forget the oldest.
const NODE_V4: &str = "
CREATE TABLE chat_peer_records (
    peer_id TEXT PRIMARY KEY,
    seen_at INTEGER NOT NULL,
    sealed BLOB NOT NULL
);
CREATE INDEX chat_peer_records_by_age ON chat_peer_records(seen_at, peer_id);
";

/// Version 3 of the node's schema: group invitations waiting for the
/// user's answer, sealed (the group's name and roster), with the admin and
/// the arrival time beside them to count and evict without unsealing; and
/// when each peer was last heard from, to sweep quiet strangers' sessions
/// (the sessions already stored count as heard at the upgrade, the one
/// moment the database knows).
const NODE_V3: &str = "
CREATE TABLE chat_invitations (
    group_id TEXT PRIMARY KEY,
    admin_peer_id TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    sealed BLOB NOT NULL
);
CREATE INDEX chat_invitations_by_admin ON chat_invitations(admin_peer_id);
CREATE INDEX chat_invitations_by_age ON chat_invitations(received_at, group_id);
CREATE TABLE chat_peer_activity (
    peer_id TEXT PRIMARY KEY,
    last_heard_at INTEGER NOT NULL
);
CREATE INDEX chat_peer_activity_by_age ON chat_peer_activity(last_heard_at);
INSERT INTO chat_peer_activity (peer_id, last_heard_at)
    SELECT peer_id, CAST(strftime('%s', 'now') AS INTEGER) * 1000 FROM chat_ratchet_state;
";

/// Version 2 of the node's schema: each pending key exchange's deadline
/// beside its sealed row, so the next deadline (asked after every
/// transaction) is one indexed read instead of unsealing every row; and
/// indexes to count held messages per sender and sweep them by age. The
/// deadlines of rows version 1 left are filled when the store opens (they
/// need the key).
const NODE_V2: &str = "
ALTER TABLE chat_key_exchanges ADD COLUMN deadline INTEGER;
CREATE INDEX chat_key_exchanges_by_deadline ON chat_key_exchanges(deadline);
CREATE INDEX chat_held_by_sender ON chat_held_messages(sender_peer_id);
CREATE INDEX chat_held_by_age ON chat_held_messages(received_at);
";

/// Version 1 of the node's schema: the reference's tables where they fit
/// (see `docs/STORAGE.md` for each deviation), and the engine's own.
const NODE_V1: &str = "
CREATE TABLE chat_conversations (
    conversation_id TEXT PRIMARY KEY,
    conversation_type TEXT NOT NULL CHECK(conversation_type IN ('1on1', 'group')),
    peer_id TEXT,
    group_name TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_message_at INTEGER DEFAULT 0,
    unread_count INTEGER DEFAULT 0,
    sealed BLOB NOT NULL
);

CREATE TABLE chat_messages (
    seq INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL,
    sender_peer_id TEXT NOT NULL,
    encrypted_content BLOB NOT NULL,
    nonce BLOB NOT NULL,
    message_number INTEGER,
    timestamp INTEGER NOT NULL,
    status TEXT DEFAULT 'created',
    sent_at INTEGER DEFAULT 0,
    delivered_at INTEGER DEFAULT 0,
    read_at INTEGER DEFAULT 0,
    decrypted_content TEXT DEFAULT '',
    stored_at INTEGER NOT NULL,
    FOREIGN KEY (conversation_id) REFERENCES chat_conversations(conversation_id)
        ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED
);
-- Ends in `seq` (the rowid, kept by VACUUM since it is declared), which
-- orders a conversation's messages as stored.
CREATE INDEX chat_messages_by_conversation ON chat_messages(conversation_id);
CREATE INDEX chat_messages_by_age ON chat_messages(stored_at);

CREATE TABLE chat_group_members (
    conversation_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    is_admin INTEGER DEFAULT 0,
    left_at INTEGER DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    UNIQUE(conversation_id, peer_id)
);

CREATE TABLE chat_sender_keys (
    conversation_id TEXT PRIMARY KEY,
    encrypted_chain_key BLOB NOT NULL,
    nonce BLOB NOT NULL,
    signing_key BLOB,
    message_number INTEGER DEFAULT 0,
    updated_at INTEGER NOT NULL
);

CREATE TABLE chat_ratchet_state (
    peer_id TEXT PRIMARY KEY,
    encrypted_state BLOB NOT NULL,
    nonce BLOB NOT NULL,
    key_exchange_complete INTEGER DEFAULT 1
);

CREATE TABLE chat_answered_requests (
    peer_id TEXT PRIMARY KEY,
    sealed BLOB NOT NULL
);

CREATE TABLE chat_key_exchanges (
    peer_id TEXT PRIMARY KEY,
    sealed BLOB NOT NULL
);

CREATE TABLE chat_outbox (
    seq INTEGER PRIMARY KEY,
    peer_id TEXT NOT NULL,
    next_attempt_at INTEGER,
    in_flight INTEGER NOT NULL,
    sealed BLOB NOT NULL
);
CREATE INDEX chat_outbox_by_peer ON chat_outbox(peer_id, seq);
CREATE INDEX chat_outbox_due ON chat_outbox(in_flight, next_attempt_at);

CREATE TABLE chat_group_envelopes (
    message_id TEXT PRIMARY KEY,
    envelope BLOB NOT NULL
);

CREATE TABLE chat_held_messages (
    seq INTEGER PRIMARY KEY,
    group_id TEXT NOT NULL,
    sender_peer_id TEXT NOT NULL,
    envelope BLOB NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX chat_held_by_group ON chat_held_messages(group_id, seq);

CREATE TABLE chat_key_check (
    id INTEGER PRIMARY KEY,
    sealed BLOB NOT NULL
);

CREATE TABLE chat_meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Version 1 of the relay's schema.
const RELAY_V1: &str = "
CREATE TABLE relay_mailbox (
    recipient TEXT NOT NULL,
    id INTEGER NOT NULL,
    sender TEXT NOT NULL,
    envelope BLOB NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (recipient, id)
);
CREATE INDEX relay_mailbox_by_age ON relay_mailbox(stored_at);

CREATE TABLE relay_records (
    peer_id TEXT PRIMARY KEY,
    record BLOB NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX relay_records_by_expiry ON relay_records(expires_at);

CREATE TABLE relay_meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Version 2 of the relay's schema: where each deposit and record came from
/// (quotas per sender and per source), when each record's peer was last
/// seen (eviction of idle records), and usage kept in counters by triggers,
/// so a deposit never sums a mailbox. Entries and records from version 1
/// get the zero source.
const RELAY_V2: &str = "
ALTER TABLE relay_mailbox ADD COLUMN source BLOB NOT NULL DEFAULT x'00000000000000000000000000000000';
CREATE INDEX relay_mailbox_by_sender ON relay_mailbox(recipient, sender);
CREATE INDEX relay_mailbox_by_source ON relay_mailbox(recipient, source);

ALTER TABLE relay_records ADD COLUMN source BLOB NOT NULL DEFAULT x'00000000000000000000000000000000';
ALTER TABLE relay_records ADD COLUMN last_seen INTEGER NOT NULL DEFAULT 0;
CREATE INDEX relay_records_by_source ON relay_records(source);
CREATE INDEX relay_records_by_last_seen ON relay_records(last_seen);

CREATE TABLE relay_mailbox_usage (
    recipient TEXT PRIMARY KEY,
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE relay_source_usage (
    source BLOB PRIMARY KEY,
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE relay_totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT INTO relay_mailbox_usage (recipient, entries, bytes)
    SELECT recipient, COUNT(*), SUM(LENGTH(envelope)) FROM relay_mailbox GROUP BY recipient;
INSERT INTO relay_source_usage (source, entries, bytes)
    SELECT source, COUNT(*), SUM(LENGTH(envelope)) FROM relay_mailbox GROUP BY source;
INSERT INTO relay_totals (id, entries, bytes)
    SELECT 0, COUNT(*), COALESCE(SUM(LENGTH(envelope)), 0) FROM relay_mailbox;

CREATE TRIGGER relay_mailbox_added AFTER INSERT ON relay_mailbox BEGIN
    INSERT INTO relay_mailbox_usage (recipient, entries, bytes) VALUES (NEW.recipient, 1, LENGTH(NEW.envelope))
        ON CONFLICT(recipient) DO UPDATE SET entries = entries + 1, bytes = bytes + LENGTH(NEW.envelope);
    INSERT INTO relay_source_usage (source, entries, bytes) VALUES (NEW.source, 1, LENGTH(NEW.envelope))
        ON CONFLICT(source) DO UPDATE SET entries = entries + 1, bytes = bytes + LENGTH(NEW.envelope);
    UPDATE relay_totals SET entries = entries + 1, bytes = bytes + LENGTH(NEW.envelope);
END;
CREATE TRIGGER relay_mailbox_removed AFTER DELETE ON relay_mailbox BEGIN
    UPDATE relay_mailbox_usage SET entries = entries - 1, bytes = bytes - LENGTH(OLD.envelope)
        WHERE recipient = OLD.recipient;
    DELETE FROM relay_mailbox_usage WHERE recipient = OLD.recipient AND entries <= 0;
    UPDATE relay_source_usage SET entries = entries - 1, bytes = bytes - LENGTH(OLD.envelope)
        WHERE source = OLD.source;
    DELETE FROM relay_source_usage WHERE source = OLD.source AND entries <= 0;
    UPDATE relay_totals SET entries = entries - 1, bytes = bytes - LENGTH(OLD.envelope);
END;
";
