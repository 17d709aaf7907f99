//! An in-memory [`RelayStore`] with transaction semantics, for tests and
//! the simulator. It is the reference model, so it counts usage by walking
//! its maps; the SQLite store keeps the same figures in counters.

use std::collections::BTreeMap;

use super::{MailboxEntry, PeerRecord, RelayStore, RelayStoreError, Source, Usage};
use crate::ids::PeerId;
use crate::time::Timestamp;

#[derive(Clone, Default)]
struct Tables {
    mailbox: BTreeMap<(PeerId, u64), MailboxEntry>,
    /// Each record, where it was published from, and when its peer was
    /// last seen.
    records: BTreeMap<PeerId, (PeerRecord, Source, Timestamp)>,
    next_id: u64,
}

fn usage<'a>(entries: impl Iterator<Item = &'a MailboxEntry>) -> Usage {
    entries.fold(Usage::default(), |u, e| Usage { count: u.count + 1, bytes: u.bytes + e.envelope.len() })
}

/// The in-memory relay store.
#[derive(Default)]
pub struct MemoryRelayStore {
    committed: Tables,
    working: Option<Tables>,
}

impl MemoryRelayStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The committed state only, as a crash would leave it.
    pub fn crash_copy(&self) -> Self {
        Self { committed: self.committed.clone(), working: None }
    }

    fn read(&self) -> Result<&Tables, RelayStoreError> {
        self.working.as_ref().ok_or(RelayStoreError::Misuse("read outside a transaction"))
    }

    fn write(&mut self) -> Result<&mut Tables, RelayStoreError> {
        self.working.as_mut().ok_or(RelayStoreError::Misuse("write outside a transaction"))
    }
}

impl RelayStore for MemoryRelayStore {
    fn begin(&mut self) -> Result<(), RelayStoreError> {
        if self.working.is_some() {
            return Err(RelayStoreError::Misuse("a transaction is already open"));
        }
        self.working = Some(self.committed.clone());
        Ok(())
    }

    fn commit(&mut self) -> Result<(), RelayStoreError> {
        self.committed = self.working.take().ok_or(RelayStoreError::Misuse("commit outside a transaction"))?;
        Ok(())
    }

    fn rollback(&mut self) {
        self.working = None;
    }

    fn mailbox(&self, peer: &PeerId) -> Result<Vec<MailboxEntry>, RelayStoreError> {
        Ok(self.read()?.mailbox.range((*peer, 0)..=(*peer, u64::MAX)).map(|(_, e)| e.clone()).collect())
    }

    fn mailbox_after(&self, peer: &PeerId, after: u64, limit: usize) -> Result<Vec<MailboxEntry>, RelayStoreError> {
        let from = after.saturating_add(1);
        let entries = self.read()?.mailbox.range((*peer, from)..=(*peer, u64::MAX));
        Ok(entries.take(limit).map(|(_, e)| e.clone()).collect())
    }

    fn record_count(&self) -> Result<usize, RelayStoreError> {
        Ok(self.read()?.records.len())
    }

    fn mailbox_usage(&self, peer: &PeerId) -> Result<Usage, RelayStoreError> {
        Ok(usage(self.read()?.mailbox.range((*peer, 0)..=(*peer, u64::MAX)).map(|(_, e)| e)))
    }

    fn mailbox_usage_by_sender(&self, recipient: &PeerId, sender: &PeerId) -> Result<Usage, RelayStoreError> {
        let entries = self.read()?.mailbox.range((*recipient, 0)..=(*recipient, u64::MAX));
        Ok(usage(entries.map(|(_, e)| e).filter(|e| e.from == *sender)))
    }

    fn mailbox_usage_by_source(&self, recipient: &PeerId, source: &Source) -> Result<Usage, RelayStoreError> {
        let entries = self.read()?.mailbox.range((*recipient, 0)..=(*recipient, u64::MAX));
        Ok(usage(entries.map(|(_, e)| e).filter(|e| e.source == *source)))
    }

    fn source_usage(&self, source: &Source) -> Result<Usage, RelayStoreError> {
        Ok(usage(self.read()?.mailbox.values().filter(|e| e.source == *source)))
    }

    fn mailbox_total(&self) -> Result<Usage, RelayStoreError> {
        Ok(usage(self.read()?.mailbox.values()))
    }

    fn put_mailbox_entry(&mut self, entry: &MailboxEntry) -> Result<(), RelayStoreError> {
        self.write()?.mailbox.insert((entry.recipient, entry.id), entry.clone());
        Ok(())
    }

    fn delete_mailbox_entry(&mut self, peer: &PeerId, id: u64) -> Result<(), RelayStoreError> {
        self.write()?.mailbox.remove(&(*peer, id));
        Ok(())
    }

    fn delete_mailbox_before(&mut self, cutoff: Timestamp) -> Result<usize, RelayStoreError> {
        let t = self.write()?;
        let before = t.mailbox.len();
        t.mailbox.retain(|_, e| e.stored_at >= cutoff);
        Ok(before - t.mailbox.len())
    }

    fn oldest_mailbox_entry(&self) -> Result<Option<Timestamp>, RelayStoreError> {
        Ok(self.read()?.mailbox.values().map(|e| e.stored_at).min())
    }

    fn next_mailbox_id(&mut self) -> Result<u64, RelayStoreError> {
        let t = self.write()?;
        t.next_id += 1;
        Ok(t.next_id)
    }

    fn record(&self, peer: &PeerId) -> Result<Option<PeerRecord>, RelayStoreError> {
        Ok(self.read()?.records.get(peer).map(|(r, _, _)| r.clone()))
    }

    fn put_record(&mut self, record: &PeerRecord, source: &Source, seen_at: Timestamp) -> Result<(), RelayStoreError> {
        let t = self.write()?;
        // A replacement keeps the source that first published the peer's record.
        let source = t.records.get(&record.peer_id).map_or(*source, |(_, s, _)| *s);
        t.records.insert(record.peer_id, (record.clone(), source, seen_at));
        Ok(())
    }

    fn touch_record(&mut self, peer: &PeerId, seen_at: Timestamp) -> Result<(), RelayStoreError> {
        if let Some((_, _, seen)) = self.write()?.records.get_mut(peer) {
            *seen = seen_at;
        }
        Ok(())
    }

    fn records_from_source(&self, source: &Source) -> Result<usize, RelayStoreError> {
        Ok(self.read()?.records.values().filter(|(_, s, _)| s == source).count())
    }

    fn idle_records(&self, seen_before: Timestamp, limit: usize) -> Result<Vec<PeerId>, RelayStoreError> {
        let t = self.read()?;
        let mut idle: Vec<(Timestamp, PeerId)> = t
            .records
            .iter()
            .filter(|(peer, (_, _, seen))| {
                *seen < seen_before && t.mailbox.range((**peer, 0)..=(**peer, u64::MAX)).next().is_none()
            })
            .map(|(peer, (_, _, seen))| (*seen, *peer))
            .collect();
        idle.sort();
        Ok(idle.into_iter().take(limit).map(|(_, p)| p).collect())
    }

    fn delete_record(&mut self, peer: &PeerId) -> Result<(), RelayStoreError> {
        self.write()?.records.remove(peer);
        Ok(())
    }

    fn delete_expired_records(&mut self, now: Timestamp, seen_before: Timestamp) -> Result<usize, RelayStoreError> {
        let t = self.write()?;
        let before = t.records.len();
        t.records.retain(|_, (r, _, seen)| r.expires_at > now || *seen >= seen_before);
        Ok(before - t.records.len())
    }
}
