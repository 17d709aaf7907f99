//! Messages on SQLite: text sealed per row, status and timestamps plain so
//! that pages and sweeps never unseal.

use rusqlite::params;

use p2pchat_protocol::engine::{Message, MessageStore, StoreError};
use p2pchat_protocol::{ConversationId, MessageId, PeerId, Timestamp};

use super::{encode, label, ts, SqliteStore, NONCE_LEN};

const MESSAGE_COLUMNS: &str = "message_id, nonce, encrypted_content";

impl MessageStore for SqliteStore {
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

    fn has_message_from(&self, id: &ConversationId, sender: &PeerId) -> Result<bool, StoreError> {
        let sql = "SELECT EXISTS (SELECT 1 FROM chat_messages WHERE conversation_id = ?1 AND sender_peer_id = ?2)";
        Ok(self.scalar(sql, [id.to_string(), sender.to_string()])?.unwrap_or(0) != 0)
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
}
