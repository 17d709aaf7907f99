//! Pairwise sessions on SQLite, sealed per peer, and when each peer was last heard from.

use rusqlite::{params, OptionalExtension};
use zeroize::Zeroizing;

use p2pchat_protocol::engine::{SessionStore, StoreError};
use p2pchat_protocol::{PeerId, Timestamp};

use super::{backend, corrupt, label, ts, SqliteStore, NONCE_LEN};

impl SessionStore for SqliteStore {
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
}
