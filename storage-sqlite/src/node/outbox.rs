//! The outbox on SQLite: items sealed per row, with peer, attempt time and
//! flight plain for the hot paths; rows of older schemas still decode. A
//! control payload is decoded when its row is read, so a change to the
//! pairwise encoding that old rows would fail needs a migration of them.

use rusqlite::{params, OptionalExtension};

use p2pchat_protocol::engine::{OutboxItem, OutboxPayload, OutboxStore, StoreError};
use p2pchat_protocol::{MessageId, PeerId, Timestamp};

use super::{backend, corrupt, encode, from_ts, label, ts, SqliteStore};

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

impl OutboxStore for SqliteStore {
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
