//! An in-memory [`RelayStore`] with transaction semantics, for tests and
//! the simulator.

use std::collections::BTreeMap;

use super::{MailboxEntry, PeerRecord, RelayStore, RelayStoreError};
use crate::ids::PeerId;
use crate::time::Timestamp;

#[derive(Clone, Default)]
struct Tables {
    mailbox: BTreeMap<(PeerId, u64), MailboxEntry>,
    records: BTreeMap<PeerId, PeerRecord>,
    next_id: u64,
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

    fn mailbox_usage(&self, peer: &PeerId) -> Result<(usize, usize), RelayStoreError> {
        let entries = self.read()?.mailbox.range((*peer, 0)..=(*peer, u64::MAX));
        Ok(entries.fold((0, 0), |(count, bytes), (_, e)| (count + 1, bytes + e.envelope.len())))
    }

    fn mailbox_total_bytes(&self) -> Result<usize, RelayStoreError> {
        Ok(self.read()?.mailbox.values().map(|e| e.envelope.len()).sum())
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
        Ok(self.read()?.records.get(peer).cloned())
    }

    fn put_record(&mut self, record: &PeerRecord) -> Result<(), RelayStoreError> {
        self.write()?.records.insert(record.peer_id, record.clone());
        Ok(())
    }

    fn delete_expired_records(&mut self, now: Timestamp) -> Result<usize, RelayStoreError> {
        let t = self.write()?;
        let before = t.records.len();
        t.records.retain(|_, r| r.expires_at > now);
        Ok(before - t.records.len())
    }

    fn next_record_expiry(&self) -> Result<Option<Timestamp>, RelayStoreError> {
        Ok(self.read()?.records.values().map(|r| r.expires_at).min())
    }
}
