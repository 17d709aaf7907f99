//! Conversations and group members on SQLite: their names and kinds
//! sealed, their IDs plain for lookups.

use rusqlite::params;

use p2pchat_protocol::engine::{Conversation, ConversationKind, ConversationStore, Member, StoreError};
use p2pchat_protocol::{ConversationId, PeerId};

use super::{backend, corrupt, encode, from_ts, label, ts, SqliteStore};

impl ConversationStore for SqliteStore {
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
}
