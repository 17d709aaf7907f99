//! An in-memory [`Store`] for tests and the simulator, with the same
//! transaction semantics as a database: writes go to an overlay that a
//! commit applies and a rollback drops. It can be told to fail commits, to
//! test the engine's commit rule.

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use super::model::{
    Conversation, HeldMessage, Invitation, KeptRecord, KeyExchangeAttempt, Member, Message, OutboxItem,
};
use super::store::{
    ConversationStore, GroupStore, InvitationStore, KeyExchangeStore, MessageStore, OutboxStore, PeerRecordStore,
    RetentionStore, SessionStore, StoreError, Transaction,
};
use crate::handshake::AnsweredRequest;
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::time::Timestamp;

#[derive(Clone, Default)]
struct Tables {
    conversations: BTreeMap<ConversationId, Conversation>,
    members: BTreeMap<(ConversationId, PeerId), Member>,
    messages: BTreeMap<MessageId, Message>,
    /// Each message's insertion number: listings keep the order of arrival.
    message_order: BTreeMap<MessageId, u64>,
    next_message_order: u64,
    sessions: BTreeMap<PeerId, Zeroizing<Vec<u8>>>,
    answered: BTreeMap<PeerId, AnsweredRequest>,
    heard: BTreeMap<PeerId, Timestamp>,
    key_exchanges: BTreeMap<PeerId, KeyExchangeAttempt>,
    group_keys: BTreeMap<ConversationId, Zeroizing<Vec<u8>>>,
    outbox: BTreeMap<u64, OutboxItem>,
    group_envelopes: BTreeMap<MessageId, Vec<u8>>,
    held: BTreeMap<u64, HeldMessage>,
    invitations: BTreeMap<ConversationId, Invitation>,
    kept_records: BTreeMap<PeerId, KeptRecord>,
    next_seq: u64,
    retention_due: Option<Timestamp>,
    last_request_at: Option<Timestamp>,
}

/// The in-memory store.
#[derive(Default)]
pub struct MemoryStore {
    committed: Tables,
    /// The open transaction's view: a copy of the committed tables. Copying
    /// is simple and, at test and simulation sizes, cheap enough.
    working: Option<Tables>,
    fail_commits: u32,
    commits: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `count` commits fail (and roll back).
    pub fn fail_next_commits(&mut self, count: u32) {
        self.fail_commits = count;
    }

    /// How many commits succeeded.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// A copy of the committed state only: what survives a crash.
    pub fn crash_copy(&self) -> Self {
        Self { committed: self.committed.clone(), working: None, fail_commits: 0, commits: self.commits }
    }

    fn read(&self) -> Result<&Tables, StoreError> {
        self.working.as_ref().ok_or(StoreError::Misuse("read outside a transaction"))
    }

    fn write(&mut self) -> Result<&mut Tables, StoreError> {
        self.working.as_mut().ok_or(StoreError::Misuse("write outside a transaction"))
    }
}

impl Transaction for MemoryStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        if self.working.is_some() {
            return Err(StoreError::Misuse("a transaction is already open"));
        }
        self.working = Some(self.committed.clone());
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        let working = self.working.take().ok_or(StoreError::Misuse("commit outside a transaction"))?;
        if self.fail_commits > 0 {
            self.fail_commits -= 1;
            return Err(StoreError::Unavailable("injected commit failure".into()));
        }
        self.committed = working;
        self.commits += 1;
        Ok(())
    }

    fn rollback(&mut self) {
        self.working = None;
    }

    fn next_seq(&mut self) -> Result<u64, StoreError> {
        let t = self.write()?;
        t.next_seq += 1;
        Ok(t.next_seq)
    }
}

impl ConversationStore for MemoryStore {
    fn conversation(&self, id: &ConversationId) -> Result<Option<Conversation>, StoreError> {
        Ok(self.read()?.conversations.get(id).cloned())
    }

    fn conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        Ok(self.read()?.conversations.values().cloned().collect())
    }

    fn put_conversation(&mut self, conversation: &Conversation) -> Result<(), StoreError> {
        self.write()?.conversations.insert(conversation.id, conversation.clone());
        Ok(())
    }

    fn delete_conversation(&mut self, id: &ConversationId) -> Result<(), StoreError> {
        let t = self.write()?;
        t.conversations.remove(id);
        t.members.retain(|(c, _), _| c != id);
        t.messages.retain(|_, m| m.conversation_id != *id);
        let messages = &t.messages;
        t.group_envelopes.retain(|m, _| messages.contains_key(m));
        let messages = &t.messages;
        t.message_order.retain(|m, _| messages.contains_key(m));
        t.group_keys.remove(id);
        t.held.retain(|_, h| h.group_id != *id);
        Ok(())
    }

    fn members(&self, id: &ConversationId) -> Result<Vec<Member>, StoreError> {
        Ok(self.read()?.members.iter().filter(|((c, _), _)| c == id).map(|(_, m)| m.clone()).collect())
    }

    fn put_member(&mut self, id: &ConversationId, member: &Member) -> Result<(), StoreError> {
        self.write()?.members.insert((*id, member.peer_id), member.clone());
        Ok(())
    }
}

impl MessageStore for MemoryStore {
    fn message(&self, id: &MessageId) -> Result<Option<Message>, StoreError> {
        Ok(self.read()?.messages.get(id).cloned())
    }

    fn messages(&self, id: &ConversationId) -> Result<Vec<Message>, StoreError> {
        let t = self.read()?;
        let mut out: Vec<Message> = t.messages.values().filter(|m| m.conversation_id == *id).cloned().collect();
        out.sort_by_key(|m| t.message_order.get(&m.id).copied());
        Ok(out)
    }

    fn messages_page(
        &self,
        id: &ConversationId,
        before: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let t = self.read()?;
        let bound = match before {
            Some(b) => match (t.message_order.get(b), t.messages.get(b)) {
                (Some(&order), Some(m)) if m.conversation_id == *id => order,
                _ => return Ok(Vec::new()),
            },
            None => u64::MAX,
        };
        let mut page: Vec<(u64, &Message)> = t
            .messages
            .values()
            .filter(|m| m.conversation_id == *id)
            .filter_map(|m| t.message_order.get(&m.id).map(|&o| (o, m)))
            .filter(|(o, _)| *o < bound)
            .collect();
        page.sort_by_key(|(o, _)| core::cmp::Reverse(*o));
        Ok(page.into_iter().take(limit).map(|(_, m)| m.clone()).collect())
    }

    fn put_message(&mut self, message: &Message) -> Result<(), StoreError> {
        let t = self.write()?;
        if !t.message_order.contains_key(&message.id) {
            t.next_message_order += 1;
            t.message_order.insert(message.id, t.next_message_order);
        }
        t.messages.insert(message.id, message.clone());
        Ok(())
    }

    fn messages_stored_before(&self, cutoff: Timestamp) -> Result<Vec<Message>, StoreError> {
        let t = self.read()?;
        let mut out: Vec<Message> = t.messages.values().filter(|m| m.stored_at < cutoff).cloned().collect();
        out.sort_by_key(|m| t.message_order.get(&m.id).copied());
        Ok(out)
    }

    fn delete_message(&mut self, id: &MessageId) -> Result<(), StoreError> {
        let t = self.write()?;
        t.messages.remove(id);
        t.group_envelopes.remove(id);
        t.message_order.remove(id);
        Ok(())
    }
}

impl SessionStore for MemoryStore {
    fn sessions(&self, peer: &PeerId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        Ok(self.read()?.sessions.get(peer).cloned())
    }

    fn session_peers(&self) -> Result<Vec<PeerId>, StoreError> {
        Ok(self.read()?.sessions.keys().copied().collect())
    }

    fn put_sessions(&mut self, peer: &PeerId, state: &[u8]) -> Result<(), StoreError> {
        self.write()?.sessions.insert(*peer, Zeroizing::new(state.to_vec()));
        Ok(())
    }

    fn delete_sessions(&mut self, peer: &PeerId) -> Result<(), StoreError> {
        let t = self.write()?;
        t.sessions.remove(peer);
        t.answered.remove(peer);
        Ok(())
    }

    fn last_heard(&self, peer: &PeerId) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.read()?.heard.get(peer).copied())
    }

    fn note_heard(&mut self, peer: &PeerId, at: Timestamp) -> Result<(), StoreError> {
        let t = self.write()?;
        let entry = t.heard.entry(*peer).or_insert(at);
        *entry = (*entry).max(at);
        Ok(())
    }

    fn quiet_session_peers(&self, cutoff: Timestamp) -> Result<Vec<PeerId>, StoreError> {
        let t = self.read()?;
        Ok(t.sessions.keys().filter(|p| t.heard.get(p).is_some_and(|at| *at < cutoff)).copied().collect())
    }

    fn forget_quiet_peers(&mut self, keep: usize) -> Result<usize, StoreError> {
        let t = self.write()?;
        let mut quiet: Vec<(Timestamp, PeerId)> =
            t.heard.iter().filter(|(p, _)| !t.sessions.contains_key(*p)).map(|(p, at)| (*at, *p)).collect();
        quiet.sort_by(|a, b| b.cmp(a));
        let gone: Vec<PeerId> = quiet.iter().skip(keep).map(|(_, p)| *p).collect();
        for peer in &gone {
            t.heard.remove(peer);
        }
        Ok(gone.len())
    }
}

impl KeyExchangeStore for MemoryStore {
    fn answered_request(&self, peer: &PeerId) -> Result<Option<AnsweredRequest>, StoreError> {
        Ok(self.read()?.answered.get(peer).cloned())
    }

    fn put_answered_request(&mut self, peer: &PeerId, answered: &AnsweredRequest) -> Result<(), StoreError> {
        self.write()?.answered.insert(*peer, answered.clone());
        Ok(())
    }

    fn key_exchanges(&self) -> Result<Vec<KeyExchangeAttempt>, StoreError> {
        Ok(self.read()?.key_exchanges.values().cloned().collect())
    }

    fn put_key_exchange(&mut self, attempt: &KeyExchangeAttempt) -> Result<(), StoreError> {
        self.write()?.key_exchanges.insert(attempt.peer, attempt.clone());
        Ok(())
    }

    fn delete_key_exchange(&mut self, peer: &PeerId) -> Result<(), StoreError> {
        self.write()?.key_exchanges.remove(peer);
        Ok(())
    }

    fn last_request_at(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.read()?.last_request_at)
    }

    fn set_last_request_at(&mut self, at: Timestamp) -> Result<(), StoreError> {
        self.write()?.last_request_at = Some(at);
        Ok(())
    }
}

impl GroupStore for MemoryStore {
    fn group_keys(&self, id: &ConversationId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        Ok(self.read()?.group_keys.get(id).cloned())
    }

    fn put_group_keys(&mut self, id: &ConversationId, state: &[u8]) -> Result<(), StoreError> {
        self.write()?.group_keys.insert(*id, Zeroizing::new(state.to_vec()));
        Ok(())
    }

    fn delete_group_keys(&mut self, id: &ConversationId) -> Result<(), StoreError> {
        self.write()?.group_keys.remove(id);
        Ok(())
    }

    fn held_messages(&self, group: &ConversationId) -> Result<Vec<HeldMessage>, StoreError> {
        Ok(self.read()?.held.values().filter(|h| h.group_id == *group).cloned().collect())
    }

    fn all_held_messages(&self) -> Result<Vec<HeldMessage>, StoreError> {
        Ok(self.read()?.held.values().cloned().collect())
    }

    fn put_held_message(&mut self, held: &HeldMessage) -> Result<(), StoreError> {
        self.write()?.held.insert(held.seq, held.clone());
        Ok(())
    }

    fn delete_held_message(&mut self, seq: u64) -> Result<(), StoreError> {
        self.write()?.held.remove(&seq);
        Ok(())
    }
}

impl InvitationStore for MemoryStore {
    fn invitations(&self) -> Result<Vec<Invitation>, StoreError> {
        let mut all: Vec<Invitation> = self.read()?.invitations.values().cloned().collect();
        all.sort_by_key(|i| (i.received_at, i.group_id));
        Ok(all)
    }

    fn put_invitation(&mut self, invitation: &Invitation) -> Result<(), StoreError> {
        self.write()?.invitations.insert(invitation.group_id, invitation.clone());
        Ok(())
    }

    fn delete_invitation(&mut self, group: &ConversationId) -> Result<(), StoreError> {
        self.write()?.invitations.remove(group);
        Ok(())
    }
}

impl OutboxStore for MemoryStore {
    fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(self.read()?.outbox.values().cloned().collect())
    }

    fn outbox_for(&self, peer: &PeerId) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(self.read()?.outbox.values().filter(|i| i.peer == *peer).cloned().collect())
    }

    fn outbox_item(&self, seq: u64) -> Result<Option<OutboxItem>, StoreError> {
        Ok(self.read()?.outbox.get(&seq).cloned())
    }

    fn next_outbox_attempt(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.read()?.outbox.values().filter(|i| !i.in_flight).filter_map(|i| i.next_attempt_at).min())
    }

    fn peers_due(&self, now: Timestamp) -> Result<Vec<PeerId>, StoreError> {
        let due: std::collections::BTreeSet<PeerId> = self
            .read()?
            .outbox
            .values()
            .filter(|i| !i.in_flight && i.next_attempt_at.is_some_and(|at| at <= now))
            .map(|i| i.peer)
            .collect();
        Ok(due.into_iter().collect())
    }

    fn group_envelope(&self, id: &MessageId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read()?.group_envelopes.get(id).cloned())
    }

    fn put_group_envelope(&mut self, id: &MessageId, envelope: &[u8]) -> Result<(), StoreError> {
        self.write()?.group_envelopes.insert(*id, envelope.to_vec());
        Ok(())
    }

    fn put_outbox_item(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        self.write()?.outbox.insert(item.seq, item.clone());
        Ok(())
    }

    fn delete_outbox_item(&mut self, seq: u64) -> Result<(), StoreError> {
        self.write()?.outbox.remove(&seq);
        Ok(())
    }
}

impl PeerRecordStore for MemoryStore {
    fn kept_records(&self) -> Result<Vec<KeptRecord>, StoreError> {
        Ok(self.read()?.kept_records.values().cloned().collect())
    }

    fn put_kept_record(&mut self, kept: &KeptRecord) -> Result<(), StoreError> {
        self.write()?.kept_records.insert(kept.peer, kept.clone());
        Ok(())
    }

    fn kept_record_count(&self) -> Result<usize, StoreError> {
        Ok(self.read()?.kept_records.len())
    }

    fn forget_kept_records(&mut self, cutoff: Timestamp, keep: usize) -> Result<usize, StoreError> {
        let records = &mut self.write()?.kept_records;
        let before = records.len();
        records.retain(|_, k| k.seen_at >= cutoff);
        if records.len() > keep {
            // Newest first, ties by peer ID (as the SQL store orders them).
            let mut by_age: Vec<(Timestamp, PeerId)> = records.values().map(|k| (k.seen_at, k.peer)).collect();
            by_age.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for (_, peer) in by_age.split_off(keep) {
                records.remove(&peer);
            }
        }
        Ok(before - records.len())
    }
}

impl RetentionStore for MemoryStore {
    fn retention_due(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.read()?.retention_due)
    }

    fn set_retention_due(&mut self, at: Timestamp) -> Result<(), StoreError> {
        self.write()?.retention_due = Some(at);
        Ok(())
    }
}
