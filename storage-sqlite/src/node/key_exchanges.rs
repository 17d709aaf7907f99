//! Key exchanges on SQLite: the attempts under way, sealed, with their
//! deadlines plain; the newest answered request per peer.

use rusqlite::params;

use p2pchat_protocol::engine::{KeyExchangeAttempt, KeyExchangeStore, StoreError};
use p2pchat_protocol::handshake::AnsweredRequest;
use p2pchat_protocol::{PeerId, Timestamp};

use super::{encode, from_ts, label, ts, SqliteStore};

impl KeyExchangeStore for SqliteStore {
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

    fn put_key_exchange(&mut self, attempt: &KeyExchangeAttempt) -> Result<(), StoreError> {
        let key = attempt.peer.to_string();
        let sealed = self.key.seal(label::KEY_EXCHANGE, key.as_bytes(), &encode(attempt)?);
        self.execute(
            "INSERT INTO chat_key_exchanges (peer_id, sealed, deadline) VALUES (?1, ?2, ?3) \
             ON CONFLICT(peer_id) DO UPDATE SET sealed = excluded.sealed, deadline = excluded.deadline",
            params![key, sealed, ts(attempt.deadline)],
        )
    }

    fn delete_key_exchange(&mut self, peer: &PeerId) -> Result<(), StoreError> {
        self.execute("DELETE FROM chat_key_exchanges WHERE peer_id = ?1", [peer.to_string()])
    }

    fn last_request_at(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.meta("last_request_at")?.map(from_ts))
    }

    fn set_last_request_at(&mut self, at: Timestamp) -> Result<(), StoreError> {
        self.set_meta("last_request_at", ts(at))
    }
}
