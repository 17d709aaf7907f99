//! The engine's [`Store`] on SQLite.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use zeroize::Zeroizing;

use p2pchat_protocol::engine::{
    Conversation, ConversationKind, HeldMessage, Invitation, KeptRecord, KeyExchangeAttempt, Member, Message,
    OutboxItem, OutboxPayload, Store, StoreError,
};
use p2pchat_protocol::handshake::AnsweredRequest;
use p2pchat_protocol::{ConversationId, MessageId, PeerId, Timestamp};

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

/// An outbox item as rows written before schema version 4 hold it: without
/// the unsent copy, which such a row never has.
#[derive(serde::Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct OutboxItemV3 {
    seq: u64,
    peer: PeerId,
    payload: OutboxPayload,
    queued_at: Timestamp,
    next_attempt_at: Option<Timestamp>,
    in_flight: bool,
}

/// Decodes an outbox item in today's form, or in the form rows written
/// before version 4 have (postcard is not self-describing, so a field added
/// at the end makes the old form one field short).
fn decode_outbox_item(plain: &[u8]) -> Option<OutboxItem> {
    if let Ok(item) = postcard::from_bytes::<OutboxItem>(plain) {
        return Some(item);
    }
    let old: OutboxItemV3 = postcard::from_bytes(plain).ok()?;
    Some(OutboxItem {
        seq: old.seq,
        peer: old.peer,
        payload: old.payload,
        queued_at: old.queued_at,
        next_attempt_at: old.next_attempt_at,
        in_flight: old.in_flight,
        unsent_copy: None,
    })
}

fn outbox_row(item: &OutboxItem) -> String {
    item.seq.to_string()
}

const MESSAGE_COLUMNS: &str = "message_id, nonce, encrypted_content";

impl Store for SqliteStore {
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

    fn conversation(&self, id: &ConversationId) -> Result<Option<Conversation>, StoreError> {
        let sql = "SELECT conversation_id, sealed FROM chat_conversations WHERE conversation_id = ?1";
        Ok(self.read_sealed_list(sql, [id.to_string()], label::CONVERSATION, "a stored conversation")?.pop())
    }

    fn conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        let sql = "SELECT conversation_id, sealed FROM chat_conversations ORDER BY conversation_id";
        self.read_sealed_list(sql, [], label::CONVERSATION, "a stored conversation")
    }

    fn put_conversation(&mut self, c: &Conversation) -> Result<(), StoreError> {
        let id = c.id.to_string();
        let sealed = self.key.seal(label::CONVERSATION, id.as_bytes(), &encode(c)?);
        let (kind, peer) = match &c.kind {
            ConversationKind::OneOnOne { peer } => ("1on1", Some(peer.to_string())),
            ConversationKind::Group { .. } => ("group", None),
        };
        let last = c.last_message_at.map_or(0, ts);
        self.execute(
            "INSERT INTO chat_conversations (conversation_id, conversation_type, peer_id, group_name, created_at, \
             updated_at, last_message_at, unread_count, sealed) VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6, ?7, ?8) \
             ON CONFLICT(conversation_id) DO UPDATE SET conversation_type = excluded.conversation_type, \
             peer_id = excluded.peer_id, created_at = excluded.created_at, updated_at = excluded.updated_at, \
             last_message_at = excluded.last_message_at, unread_count = excluded.unread_count, sealed = excluded.sealed",
            params![id, kind, peer, ts(c.created_at), ts(c.updated_at), last, c.unread_count, sealed],
        )
    }

    fn delete_conversation(&mut self, id: &ConversationId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.execute(
            "DELETE FROM chat_group_envelopes WHERE message_id IN \
             (SELECT message_id FROM chat_messages WHERE conversation_id = ?1)",
            [&id],
        )?;
        self.execute("DELETE FROM chat_messages WHERE conversation_id = ?1", [&id])?;
        self.execute("DELETE FROM chat_group_members WHERE conversation_id = ?1", [&id])?;
        self.execute("DELETE FROM chat_held_messages WHERE group_id = ?1", [&id])?;
        self.execute("DELETE FROM chat_sender_keys WHERE conversation_id = ?1", [&id])?;
        self.execute("DELETE FROM chat_conversations WHERE conversation_id = ?1", [&id])
    }

    fn members(&self, id: &ConversationId) -> Result<Vec<Member>, StoreError> {
        self.guard()?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT peer_id, joined_at, is_admin, left_at, epoch FROM chat_group_members \
                 WHERE conversation_id = ?1 ORDER BY peer_id",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map([id.to_string()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (peer, joined, admin, left, epoch) = row.map_err(backend)?;
            let peer_id: PeerId = peer.parse().map_err(|_| corrupt("a member's peer ID"))?;
            out.push(Member {
                peer_id,
                joined_at: from_ts(joined),
                is_admin: admin,
                left_at: (left > 0).then(|| from_ts(left)),
                epoch: epoch.max(0) as u64,
            });
        }
        Ok(out)
    }

    fn put_member(&mut self, id: &ConversationId, m: &Member) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO chat_group_members (conversation_id, peer_id, joined_at, is_admin, left_at, epoch) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(conversation_id, peer_id) DO UPDATE SET \
             joined_at = excluded.joined_at, is_admin = excluded.is_admin, left_at = excluded.left_at, epoch = excluded.epoch",
            params![
                id.to_string(),
                m.peer_id.to_string(),
                ts(m.joined_at),
                m.is_admin,
                m.left_at.map_or(0, ts),
                m.epoch as i64
            ],
        )
    }

    fn message(&self, id: &MessageId) -> Result<Option<Message>, StoreError> {
        let sql = "SELECT message_id, nonce, encrypted_content FROM chat_messages WHERE message_id = ?1";
        Ok(self.read_messages(sql, [id.to_string()])?.pop())
    }

    fn messages(&self, id: &ConversationId) -> Result<Vec<Message>, StoreError> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE conversation_id = ?1 ORDER BY seq");
        self.read_messages(&sql, [id.to_string()])
    }

    fn messages_page(
        &self,
        id: &ConversationId,
        before: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let limit = limit.min(i64::MAX as usize) as i64;
        match before {
            None => {
                let sql = format!(
                    "SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE conversation_id = ?1 ORDER BY seq DESC LIMIT ?2"
                );
                self.read_messages(&sql, params![id.to_string(), limit])
            }
            Some(before) => {
                let sql = format!(
                    "SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE conversation_id = ?1 AND seq < \
                     (SELECT seq FROM chat_messages WHERE message_id = ?2 AND conversation_id = ?1) \
                     ORDER BY seq DESC LIMIT ?3"
                );
                self.read_messages(&sql, params![id.to_string(), before.to_string(), limit])
            }
        }
    }

    fn put_message(&mut self, m: &Message) -> Result<(), StoreError> {
        let id = m.id.to_string();
        let sealed = self.key.seal(label::MESSAGE, id.as_bytes(), &encode(m)?);
        let (nonce, content) = sealed.split_at(NONCE_LEN);
        // An update keeps the row, and so its `seq`: the message's place in
        // its conversation.
        self.execute(
            "INSERT INTO chat_messages (message_id, conversation_id, sender_peer_id, encrypted_content, nonce, \
             message_number, timestamp, status, sent_at, delivered_at, read_at, decrypted_content, stored_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, '', ?12) \
             ON CONFLICT(message_id) DO UPDATE SET conversation_id = excluded.conversation_id, \
             sender_peer_id = excluded.sender_peer_id, encrypted_content = excluded.encrypted_content, \
             nonce = excluded.nonce, message_number = excluded.message_number, timestamp = excluded.timestamp, \
             status = excluded.status, sent_at = excluded.sent_at, delivered_at = excluded.delivered_at, \
             read_at = excluded.read_at, stored_at = excluded.stored_at",
            params![
                id,
                m.conversation_id.to_string(),
                m.sender.to_string(),
                content,
                nonce,
                m.group_position.map(|(_, n)| i64::from(n)),
                ts(m.timestamp),
                m.status.as_str(),
                m.sent_at.map_or(0, ts),
                m.delivered_at.map_or(0, ts),
                m.read_at.map_or(0, ts),
                ts(m.stored_at),
            ],
        )
    }

    fn messages_stored_before(&self, cutoff: Timestamp) -> Result<Vec<Message>, StoreError> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE stored_at < ?1 ORDER BY seq");
        self.read_messages(&sql, [ts(cutoff)])
    }

    fn delete_message(&mut self, id: &MessageId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.execute("DELETE FROM chat_group_envelopes WHERE message_id = ?1", [&id])?;
        self.execute("DELETE FROM chat_messages WHERE message_id = ?1", [&id])
    }

    fn sessions(&self, peer: &PeerId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.guard()?;
        let key = peer.to_string();
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT nonce, encrypted_state FROM chat_ratchet_state WHERE peer_id = ?1")
            .and_then(|mut s| s.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(backend)?;
        let Some((mut sealed, state)) = row else { return Ok(None) };
        sealed.extend_from_slice(&state);
        self.key.open(label::SESSIONS, key.as_bytes(), &sealed).map(Some).ok_or_else(|| corrupt("a ratchet state"))
    }

    fn session_peers(&self) -> Result<Vec<PeerId>, StoreError> {
        let ids = self.read_ids("SELECT peer_id FROM chat_ratchet_state ORDER BY peer_id", [])?;
        ids.iter().map(|id| id.parse().map_err(|_| corrupt("a ratchet state's peer ID"))).collect()
    }

    fn put_sessions(&mut self, peer: &PeerId, state: &[u8]) -> Result<(), StoreError> {
        let key = peer.to_string();
        let sealed = self.key.seal(label::SESSIONS, key.as_bytes(), state);
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.execute(
            "INSERT INTO chat_ratchet_state (peer_id, encrypted_state, nonce) VALUES (?1, ?2, ?3) \
             ON CONFLICT(peer_id) DO UPDATE SET encrypted_state = excluded.encrypted_state, nonce = excluded.nonce",
            params![key, body, nonce],
        )
    }

    fn delete_sessions(&mut self, peer: &PeerId) -> Result<(), StoreError> {
        let key = peer.to_string();
        self.execute("DELETE FROM chat_ratchet_state WHERE peer_id = ?1", [&key])?;
        self.execute("DELETE FROM chat_answered_requests WHERE peer_id = ?1", [&key])
    }

    fn last_heard(&self, peer: &PeerId) -> Result<Option<Timestamp>, StoreError> {
        let sql = "SELECT last_heard_at FROM chat_peer_activity WHERE peer_id = ?1";
        Ok(self.scalar(sql, [peer.to_string()])?.map(|t| Timestamp(t.max(0) as u64)))
    }

    fn note_heard(&mut self, peer: &PeerId, at: Timestamp) -> Result<(), StoreError> {
        // At most one write an hour per peer: this runs for every message.
        self.execute(
            "INSERT INTO chat_peer_activity (peer_id, last_heard_at) VALUES (?1, ?2) \
             ON CONFLICT(peer_id) DO UPDATE SET last_heard_at = excluded.last_heard_at \
             WHERE excluded.last_heard_at >= chat_peer_activity.last_heard_at + 3600000",
            params![peer.to_string(), ts(at)],
        )
    }

    fn quiet_session_peers(&self, cutoff: Timestamp) -> Result<Vec<PeerId>, StoreError> {
        let ids = self.read_ids(
            "SELECT r.peer_id FROM chat_ratchet_state r JOIN chat_peer_activity a ON a.peer_id = r.peer_id \
             WHERE a.last_heard_at < ?1 ORDER BY r.peer_id",
            [ts(cutoff)],
        )?;
        ids.iter().map(|id| id.parse().map_err(|_| corrupt("a quiet peer's ID"))).collect()
    }

    fn forget_quiet_peers(&mut self, keep: usize) -> Result<usize, StoreError> {
        self.guard()?;
        self.conn
            .prepare_cached(
                "DELETE FROM chat_peer_activity WHERE peer_id IN (SELECT a.peer_id FROM chat_peer_activity a \
                 WHERE NOT EXISTS (SELECT 1 FROM chat_ratchet_state r WHERE r.peer_id = a.peer_id) \
                 ORDER BY a.last_heard_at DESC, a.peer_id LIMIT -1 OFFSET ?1)",
            )
            .and_then(|mut s| s.execute([i64::try_from(keep).unwrap_or(i64::MAX)]))
            .map_err(backend)
    }

    fn answered_request(&self, peer: &PeerId) -> Result<Option<AnsweredRequest>, StoreError> {
        let sql = "SELECT peer_id, sealed FROM chat_answered_requests WHERE peer_id = ?1";
        Ok(self.read_sealed_list(sql, [peer.to_string()], label::ANSWERED, "an answered key exchange")?.pop())
    }

    fn put_answered_request(&mut self, peer: &PeerId, answered: &AnsweredRequest) -> Result<(), StoreError> {
        let key = peer.to_string();
        let sealed = self.key.seal(label::ANSWERED, key.as_bytes(), &encode(answered)?);
        self.execute(
            "INSERT INTO chat_answered_requests (peer_id, sealed) VALUES (?1, ?2) \
             ON CONFLICT(peer_id) DO UPDATE SET sealed = excluded.sealed",
            params![key, sealed],
        )
    }

    fn key_exchanges(&self) -> Result<Vec<KeyExchangeAttempt>, StoreError> {
        let sql = "SELECT peer_id, sealed FROM chat_key_exchanges ORDER BY peer_id";
        self.read_sealed_list(sql, [], label::KEY_EXCHANGE, "a pending key exchange")
    }

    fn put_key_exchange(&mut self, attempt: &KeyExchangeAttempt) -> Result<(), StoreError> {
        let key = attempt.peer.to_string();
        let sealed = self.key.seal(label::KEY_EXCHANGE, key.as_bytes(), &encode(attempt)?);
        self.execute(
            "INSERT INTO chat_key_exchanges (peer_id, sealed, deadline) VALUES (?1, ?2, ?3) \
             ON CONFLICT(peer_id) DO UPDATE SET sealed = excluded.sealed, deadline = excluded.deadline",
            params![key, sealed, ts(attempt.deadline)],
        )
    }

    fn key_exchange(&self, peer: &PeerId) -> Result<Option<KeyExchangeAttempt>, StoreError> {
        let sql = "SELECT peer_id, sealed FROM chat_key_exchanges WHERE peer_id = ?1";
        Ok(self.read_sealed_list(sql, [peer.to_string()], label::KEY_EXCHANGE, "a pending key exchange")?.pop())
    }

    fn key_exchanges_due(&self, now: Timestamp) -> Result<Vec<KeyExchangeAttempt>, StoreError> {
        let sql = "SELECT peer_id, sealed FROM chat_key_exchanges WHERE deadline <= ?1 ORDER BY peer_id";
        self.read_sealed_list(sql, [ts(now)], label::KEY_EXCHANGE, "a pending key exchange")
    }

    fn next_key_exchange_deadline(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.scalar("SELECT MIN(deadline) FROM chat_key_exchanges", [])?.map(|t| Timestamp(t.max(0) as u64)))
    }

    fn key_exchange_count(&self) -> Result<usize, StoreError> {
        Ok(self.scalar("SELECT COUNT(*) FROM chat_key_exchanges", [])?.unwrap_or(0).max(0) as usize)
    }

    fn delete_key_exchange(&mut self, peer: &PeerId) -> Result<(), StoreError> {
        self.execute("DELETE FROM chat_key_exchanges WHERE peer_id = ?1", [peer.to_string()])
    }

    fn group_keys(&self, id: &ConversationId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.guard()?;
        let key = id.to_string();
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT nonce, encrypted_chain_key FROM chat_sender_keys WHERE conversation_id = ?1")
            .and_then(|mut s| s.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(backend)?;
        let Some((mut sealed, body)) = row else { return Ok(None) };
        sealed.extend_from_slice(&body);
        self.key
            .open(label::GROUP_KEYS, key.as_bytes(), &sealed)
            .map(Some)
            .ok_or_else(|| corrupt("a group's sender keys"))
    }

    fn put_group_keys(&mut self, id: &ConversationId, state: &[u8]) -> Result<(), StoreError> {
        let key = id.to_string();
        let sealed = self.key.seal(label::GROUP_KEYS, key.as_bytes(), state);
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.execute(
            "INSERT INTO chat_sender_keys (conversation_id, encrypted_chain_key, nonce, updated_at) \
             VALUES (?1, ?2, ?3, 0) ON CONFLICT(conversation_id) DO UPDATE SET \
             encrypted_chain_key = excluded.encrypted_chain_key, nonce = excluded.nonce",
            params![key, body, nonce],
        )
    }

    fn delete_group_keys(&mut self, id: &ConversationId) -> Result<(), StoreError> {
        self.execute("DELETE FROM chat_sender_keys WHERE conversation_id = ?1", [id.to_string()])
    }

    fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        let sql = "SELECT seq, sealed FROM chat_outbox ORDER BY seq";
        self.read_outbox(sql, [])
    }

    fn outbox_for(&self, peer: &PeerId) -> Result<Vec<OutboxItem>, StoreError> {
        let sql = "SELECT seq, sealed FROM chat_outbox WHERE peer_id = ?1 ORDER BY seq";
        self.read_outbox(sql, [peer.to_string()])
    }

    fn outbox_waiting_for(&self, peer: &PeerId) -> Result<Vec<OutboxItem>, StoreError> {
        let sql = "SELECT seq, sealed FROM chat_outbox WHERE peer_id = ?1 AND in_flight = 0 ORDER BY seq";
        self.read_outbox(sql, [peer.to_string()])
    }

    fn outbox_due_for(&self, peer: &PeerId, now: Timestamp) -> Result<Vec<OutboxItem>, StoreError> {
        let sql = "SELECT seq, sealed FROM chat_outbox \
                   WHERE peer_id = ?1 AND in_flight = 0 AND next_attempt_at <= ?2 ORDER BY seq";
        self.read_outbox(sql, rusqlite::params![peer.to_string(), ts(now)])
    }

    fn outbox_len(&self, peer: &PeerId) -> Result<usize, StoreError> {
        self.guard()?;
        let count: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM chat_outbox WHERE peer_id = ?1")
            .and_then(|mut s| s.query_row([peer.to_string()], |r| r.get(0)))
            .map_err(backend)?;
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    fn outbox_item(&self, seq: u64) -> Result<Option<OutboxItem>, StoreError> {
        let sql = "SELECT seq, sealed FROM chat_outbox WHERE seq = ?1";
        Ok(self.read_outbox(sql, [seq as i64])?.pop())
    }

    fn next_outbox_attempt(&self) -> Result<Option<Timestamp>, StoreError> {
        self.guard()?;
        let at: Option<i64> = self
            .conn
            .prepare_cached("SELECT MIN(next_attempt_at) FROM chat_outbox WHERE in_flight = 0")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(backend)?;
        Ok(at.map(from_ts))
    }

    fn peers_due(&self, now: Timestamp) -> Result<Vec<PeerId>, StoreError> {
        let ids = self.read_ids(
            "SELECT DISTINCT peer_id FROM chat_outbox WHERE in_flight = 0 AND next_attempt_at <= ?1 ORDER BY peer_id",
            [ts(now)],
        )?;
        ids.iter().map(|id| id.parse().map_err(|_| corrupt("an outbox item's peer ID"))).collect()
    }

    fn group_envelope(&self, id: &MessageId) -> Result<Option<Vec<u8>>, StoreError> {
        self.guard()?;
        self.conn
            .prepare_cached("SELECT envelope FROM chat_group_envelopes WHERE message_id = ?1")
            .and_then(|mut s| s.query_row([id.to_string()], |r| r.get(0)).optional())
            .map_err(backend)
    }

    fn put_group_envelope(&mut self, id: &MessageId, envelope: &[u8]) -> Result<(), StoreError> {
        // Already end-to-end encrypted for the group: stored as it is.
        self.execute(
            "INSERT INTO chat_group_envelopes (message_id, envelope) VALUES (?1, ?2) \
             ON CONFLICT(message_id) DO UPDATE SET envelope = excluded.envelope",
            params![id.to_string(), envelope],
        )
    }

    fn put_outbox_item(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        let row = outbox_row(item);
        let sealed = self.key.seal(label::OUTBOX, row.as_bytes(), &encode(item)?);
        self.execute(
            "INSERT INTO chat_outbox (seq, peer_id, next_attempt_at, in_flight, sealed) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT(seq) DO UPDATE SET peer_id = excluded.peer_id, next_attempt_at = excluded.next_attempt_at, \
             in_flight = excluded.in_flight, sealed = excluded.sealed",
            params![item.seq as i64, item.peer.to_string(), item.next_attempt_at.map(ts), item.in_flight, sealed],
        )
    }

    fn delete_outbox_item(&mut self, seq: u64) -> Result<(), StoreError> {
        self.execute("DELETE FROM chat_outbox WHERE seq = ?1", [seq as i64])
    }

    fn held_messages(&self, group: &ConversationId) -> Result<Vec<HeldMessage>, StoreError> {
        self.read_held(
            "SELECT seq, group_id, sender_peer_id, envelope, received_at FROM chat_held_messages \
             WHERE group_id = ?1 ORDER BY seq",
            [group.to_string()],
        )
    }

    fn all_held_messages(&self) -> Result<Vec<HeldMessage>, StoreError> {
        self.read_held(
            "SELECT seq, group_id, sender_peer_id, envelope, received_at FROM chat_held_messages ORDER BY seq",
            [],
        )
    }

    fn held_usage(&self, sender: Option<&PeerId>) -> Result<(usize, usize), StoreError> {
        self.guard()?;
        // Two statements, so that one sender's count uses its index.
        let row = |r: &rusqlite::Row<'_>| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?));
        let counted = match sender {
            Some(peer) => self
                .conn
                .prepare_cached(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(envelope)), 0) FROM chat_held_messages \
                     WHERE sender_peer_id = ?1",
                )
                .and_then(|mut s| s.query_row([peer.to_string()], row)),
            None => self
                .conn
                .prepare_cached("SELECT COUNT(*), COALESCE(SUM(LENGTH(envelope)), 0) FROM chat_held_messages")
                .and_then(|mut s| s.query_row([], row)),
        };
        counted.map(|(count, bytes)| (count.max(0) as usize, bytes.max(0) as usize)).map_err(backend)
    }

    fn is_held(&self, group: &ConversationId, sender: &PeerId, envelope: &[u8]) -> Result<bool, StoreError> {
        let sql = "SELECT 1 FROM chat_held_messages WHERE group_id = ?1 AND sender_peer_id = ?2 AND envelope = ?3";
        Ok(self.scalar(sql, params![group.to_string(), sender.to_string(), envelope])?.is_some())
    }

    fn delete_held_before(&mut self, cutoff: Timestamp) -> Result<usize, StoreError> {
        self.guard()?;
        self.conn
            .prepare_cached("DELETE FROM chat_held_messages WHERE received_at < ?1")
            .and_then(|mut s| s.execute([ts(cutoff)]))
            .map_err(backend)
    }

    fn put_held_message(&mut self, held: &HeldMessage) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO chat_held_messages (seq, group_id, sender_peer_id, envelope, received_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(seq) DO UPDATE SET group_id = excluded.group_id, \
             sender_peer_id = excluded.sender_peer_id, envelope = excluded.envelope, received_at = excluded.received_at",
            params![
                held.seq as i64,
                held.group_id.to_string(),
                held.sender.to_string(),
                held.envelope,
                ts(held.received_at)
            ],
        )
    }

    fn delete_held_message(&mut self, seq: u64) -> Result<(), StoreError> {
        self.execute("DELETE FROM chat_held_messages WHERE seq = ?1", [seq as i64])
    }

    fn invitations(&self) -> Result<Vec<Invitation>, StoreError> {
        let sql = "SELECT group_id, sealed FROM chat_invitations ORDER BY received_at, group_id";
        self.read_sealed_list(sql, [], label::INVITATION, "a group invitation")
    }

    fn invitation(&self, group: &ConversationId) -> Result<Option<Invitation>, StoreError> {
        let sql = "SELECT group_id, sealed FROM chat_invitations WHERE group_id = ?1";
        Ok(self.read_sealed_list(sql, [group.to_string()], label::INVITATION, "a group invitation")?.pop())
    }

    fn invitation_count(&self, admin: Option<&PeerId>) -> Result<usize, StoreError> {
        let count = match admin {
            Some(admin) => {
                self.scalar("SELECT COUNT(*) FROM chat_invitations WHERE admin_peer_id = ?1", [admin.to_string()])?
            }
            None => self.scalar("SELECT COUNT(*) FROM chat_invitations", [])?,
        };
        Ok(count.unwrap_or(0).max(0) as usize)
    }

    fn invitations_received_before(&self, cutoff: Timestamp) -> Result<Vec<ConversationId>, StoreError> {
        let ids = self.read_ids(
            "SELECT group_id FROM chat_invitations WHERE received_at < ?1 ORDER BY received_at, group_id",
            [ts(cutoff)],
        )?;
        // An unreadable ID is skipped: one bad row must not stop the sweep.
        Ok(ids.iter().filter_map(|id| id.parse().ok()).collect())
    }

    fn has_message_from(&self, id: &ConversationId, sender: &PeerId) -> Result<bool, StoreError> {
        let sql = "SELECT EXISTS (SELECT 1 FROM chat_messages WHERE conversation_id = ?1 AND sender_peer_id = ?2)";
        Ok(self.scalar(sql, [id.to_string(), sender.to_string()])?.unwrap_or(0) != 0)
    }

    fn oldest_invitation(&self) -> Result<Option<ConversationId>, StoreError> {
        self.guard()?;
        let oldest: Option<String> = self
            .conn
            .prepare_cached("SELECT group_id FROM chat_invitations ORDER BY received_at, group_id LIMIT 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .map_err(backend)?;
        oldest.map(|id| id.parse().map_err(|_| corrupt("a group invitation's ID"))).transpose()
    }

    fn put_invitation(&mut self, invitation: &Invitation) -> Result<(), StoreError> {
        let id = invitation.group_id.to_string();
        let sealed = self.key.seal(label::INVITATION, id.as_bytes(), &encode(invitation)?);
        self.execute(
            "INSERT INTO chat_invitations (group_id, admin_peer_id, received_at, sealed) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT(group_id) DO UPDATE SET admin_peer_id = excluded.admin_peer_id, \
             received_at = excluded.received_at, sealed = excluded.sealed",
            params![id, invitation.admin.to_string(), ts(invitation.received_at), sealed],
        )
    }

    fn delete_invitation(&mut self, group: &ConversationId) -> Result<(), StoreError> {
        self.execute("DELETE FROM chat_invitations WHERE group_id = ?1", [group.to_string()])
    }

    fn kept_records(&self) -> Result<Vec<KeptRecord>, StoreError> {
        let sql = "SELECT peer_id, sealed FROM chat_peer_records ORDER BY peer_id";
        self.read_sealed_list(sql, [], label::PEER_RECORD, "a kept peer record")
    }

    fn put_kept_record(&mut self, kept: &KeptRecord) -> Result<(), StoreError> {
        let peer = kept.peer.to_string();
        let sealed = self.key.seal(label::PEER_RECORD, peer.as_bytes(), &encode(kept)?);
        self.execute(
            "INSERT INTO chat_peer_records (peer_id, seen_at, sealed) VALUES (?1, ?2, ?3) \
             ON CONFLICT(peer_id) DO UPDATE SET seen_at = excluded.seen_at, sealed = excluded.sealed",
            params![peer, ts(kept.seen_at), sealed],
        )
    }

    fn kept_record_count(&self) -> Result<usize, StoreError> {
        Ok(self.scalar("SELECT COUNT(*) FROM chat_peer_records", [])?.unwrap_or(0).max(0) as usize)
    }

    fn forget_kept_records(&mut self, cutoff: Timestamp, keep: usize) -> Result<usize, StoreError> {
        self.guard()?;
        let old = self
            .conn
            .prepare_cached("DELETE FROM chat_peer_records WHERE seen_at < ?1")
            .and_then(|mut s| s.execute([ts(cutoff)]))
            .map_err(backend)?;
        let beyond = self
            .conn
            .prepare_cached(
                "DELETE FROM chat_peer_records WHERE peer_id IN (SELECT peer_id FROM chat_peer_records \
                 ORDER BY seen_at DESC, peer_id LIMIT -1 OFFSET ?1)",
            )
            .and_then(|mut s| s.execute([i64::try_from(keep).unwrap_or(i64::MAX)]))
            .map_err(backend)?;
        Ok(old + beyond)
    }

    fn next_seq(&mut self) -> Result<u64, StoreError> {
        let next = self.meta("next_seq")?.unwrap_or(0) + 1;
        self.set_meta("next_seq", next)?;
        Ok(next as u64)
    }

    fn last_request_at(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.meta("last_request_at")?.map(from_ts))
    }

    fn set_last_request_at(&mut self, at: Timestamp) -> Result<(), StoreError> {
        self.set_meta("last_request_at", ts(at))
    }

    fn retention_due(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.meta("retention_due")?.map(from_ts))
    }

    fn set_retention_due(&mut self, at: Timestamp) -> Result<(), StoreError> {
        self.set_meta("retention_due", ts(at))
    }
}

impl SqliteStore {
    fn read_outbox(&self, sql: &str, args: impl rusqlite::Params) -> Result<Vec<OutboxItem>, StoreError> {
        self.guard()?;
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend)?;
        let rows = stmt.query_map(args, |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))).map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, sealed) = row.map_err(backend)?;
            let plain = self.key.open(label::OUTBOX, seq.to_string().as_bytes(), &sealed);
            let plain = plain.ok_or_else(|| corrupt("an outbox item"))?;
            out.push(decode_outbox_item(&plain).ok_or_else(|| corrupt("an outbox item"))?);
        }
        Ok(out)
    }

    fn read_held(&self, sql: &str, args: impl rusqlite::Params) -> Result<Vec<HeldMessage>, StoreError> {
        self.guard()?;
        let mut stmt = self.conn.prepare_cached(sql).map_err(backend)?;
        let rows = stmt
            .query_map(args, |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, group, sender, envelope, at) = row.map_err(backend)?;
            out.push(HeldMessage {
                seq: seq as u64,
                group_id: group.parse().map_err(|_| corrupt("a held message's group ID"))?,
                sender: sender.parse().map_err(|_| corrupt("a held message's sender"))?,
                envelope,
                received_at: from_ts(at),
            });
        }
        Ok(out)
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

#[cfg(test)]
mod outbox_format_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use p2pchat_protocol::engine::SealedCopy;

    #[test]
    fn an_outbox_item_written_before_version_4_still_decodes_and_todays_round_trips() {
        let old = OutboxItemV3 {
            seq: 9,
            peer: PeerId([5; 20]),
            payload: OutboxPayload::Ack(vec![1, 2]),
            queued_at: Timestamp(10),
            next_attempt_at: Some(Timestamp(20)),
            in_flight: true,
        };
        let item = decode_outbox_item(&postcard::to_stdvec(&old).unwrap()).unwrap();
        assert_eq!((item.seq, item.peer, item.in_flight, item.unsent_copy), (9, PeerId([5; 20]), true, None));
        assert_eq!(item.payload, OutboxPayload::Ack(vec![1, 2]));
        let copy = SealedCopy { session: [7; 16], sealed_at: Timestamp(30), envelope: vec![1, 2, 3] };
        let today = OutboxItem { unsent_copy: Some(copy), ..item };
        assert_eq!(decode_outbox_item(&postcard::to_stdvec(&today).unwrap()), Some(today));
        assert_eq!(decode_outbox_item(&[0xff]), None, "garbage is refused");
    }
}
