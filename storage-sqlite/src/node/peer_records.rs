//! Peer records kept from relays, on SQLite, sealed per peer.

use rusqlite::params;

use p2pchat_protocol::engine::{KeptRecord, PeerRecordStore, StoreError};
use p2pchat_protocol::Timestamp;

use super::{backend, encode, label, ts, SqliteStore};

impl PeerRecordStore for SqliteStore {
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
}
