//! Group keys on SQLite, sealed per group, and the group messages held for a missing sender key.

use rusqlite::{params, OptionalExtension};
use zeroize::Zeroizing;

use p2pchat_protocol::engine::{GroupStore, HeldMessage, StoreError};
use p2pchat_protocol::{ConversationId, PeerId, Timestamp};

use super::{backend, corrupt, from_ts, label, ts, SqliteStore, NONCE_LEN};

impl GroupStore for SqliteStore {
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
}

impl SqliteStore {
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
