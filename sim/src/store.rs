//! The node's store in the simulator: the in-memory store, optionally with
//! a deliberately wrong behaviour planted, to prove the checker catches it.

use p2pchat_protocol::engine::{
    Conversation, ConversationStore, GroupStore, HeldMessage, Invitation, InvitationStore, KeptRecord,
    KeyExchangeAttempt, KeyExchangeStore, Member, MemoryStore, Message, MessageStatus, MessageStore, OutboxItem,
    OutboxStore, PeerRecordStore, RetentionStore, SessionStore, StoreError, Transaction,
};
use p2pchat_protocol::handshake::AnsweredRequest;
use p2pchat_protocol::{ConversationId, MessageId, PeerId, Timestamp};
use zeroize::Zeroizing;

/// A deliberately wrong behaviour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bug {
    /// None: the product as it is.
    #[default]
    None,
    /// A crashed node restarts from an older copy of its store, as if
    /// commits were not durable: ratchet steps are repeated.
    StaleRestart,
    /// The store drops incoming messages while the engine reports them.
    ForgetIncoming,
    /// The store writes our read messages back as merely delivered: a
    /// status that moves backwards.
    StatusRegress,
}

impl Bug {
    /// Parses a bug's name as the command line gives it.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Self::None),
            "stale-restart" => Some(Self::StaleRestart),
            "forget-incoming" => Some(Self::ForgetIncoming),
            "status-regress" => Some(Self::StatusRegress),
            _ => None,
        }
    }
}

/// The in-memory store with an optional planted bug.
pub(crate) struct SimStore {
    inner: MemoryStore,
    bug: Bug,
    me: PeerId,
}

impl SimStore {
    /// An empty store for node `me`.
    pub(crate) fn new(bug: Bug, me: PeerId) -> Self {
        Self { inner: MemoryStore::new(), bug, me }
    }

    /// The committed state only, as a crash leaves it.
    pub(crate) fn crash_copy(&self) -> Self {
        Self { inner: self.inner.crash_copy(), bug: self.bug, me: self.me }
    }
}

impl Transaction for SimStore {
    fn begin(&mut self) -> Result<(), StoreError> {
        self.inner.begin()
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.inner.commit()
    }

    fn rollback(&mut self) {
        self.inner.rollback()
    }

    fn next_seq(&mut self) -> Result<u64, StoreError> {
        self.inner.next_seq()
    }
}

impl ConversationStore for SimStore {
    fn conversation(&self, id: &ConversationId) -> Result<Option<Conversation>, StoreError> {
        self.inner.conversation(id)
    }

    fn conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        self.inner.conversations()
    }

    fn put_conversation(&mut self, conversation: &Conversation) -> Result<(), StoreError> {
        self.inner.put_conversation(conversation)
    }

    fn delete_conversation(&mut self, id: &ConversationId) -> Result<(), StoreError> {
        self.inner.delete_conversation(id)
    }

    fn members(&self, id: &ConversationId) -> Result<Vec<Member>, StoreError> {
        self.inner.members(id)
    }

    fn put_member(&mut self, id: &ConversationId, member: &Member) -> Result<(), StoreError> {
        self.inner.put_member(id, member)
    }
}

impl MessageStore for SimStore {
    fn message(&self, id: &MessageId) -> Result<Option<Message>, StoreError> {
        self.inner.message(id)
    }

    fn messages(&self, id: &ConversationId) -> Result<Vec<Message>, StoreError> {
        self.inner.messages(id)
    }

    fn messages_page(
        &self,
        id: &ConversationId,
        before: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.inner.messages_page(id, before, limit)
    }

    fn put_message(&mut self, message: &Message) -> Result<(), StoreError> {
        if self.bug == Bug::ForgetIncoming && message.sender != self.me && self.inner.message(&message.id)?.is_none() {
            return Ok(());
        }
        if self.bug == Bug::StatusRegress && message.sender == self.me && message.status == MessageStatus::Read {
            let mut regressed = message.clone();
            regressed.status = MessageStatus::Delivered;
            return self.inner.put_message(&regressed);
        }
        self.inner.put_message(message)
    }

    fn messages_stored_before(&self, cutoff: Timestamp) -> Result<Vec<Message>, StoreError> {
        self.inner.messages_stored_before(cutoff)
    }

    fn delete_message(&mut self, id: &MessageId) -> Result<(), StoreError> {
        self.inner.delete_message(id)
    }
}

impl SessionStore for SimStore {
    fn sessions(&self, peer: &PeerId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.inner.sessions(peer)
    }

    fn session_peers(&self) -> Result<Vec<PeerId>, StoreError> {
        self.inner.session_peers()
    }

    fn put_sessions(&mut self, peer: &PeerId, state: &[u8]) -> Result<(), StoreError> {
        self.inner.put_sessions(peer, state)
    }

    fn delete_sessions(&mut self, peer: &PeerId) -> Result<(), StoreError> {
        self.inner.delete_sessions(peer)
    }

    fn last_heard(&self, peer: &PeerId) -> Result<Option<Timestamp>, StoreError> {
        self.inner.last_heard(peer)
    }

    fn note_heard(&mut self, peer: &PeerId, at: Timestamp) -> Result<(), StoreError> {
        self.inner.note_heard(peer, at)
    }

    fn quiet_session_peers(&self, cutoff: Timestamp) -> Result<Vec<PeerId>, StoreError> {
        self.inner.quiet_session_peers(cutoff)
    }

    fn forget_quiet_peers(&mut self, keep: usize) -> Result<usize, StoreError> {
        self.inner.forget_quiet_peers(keep)
    }
}

impl KeyExchangeStore for SimStore {
    fn answered_request(&self, peer: &PeerId) -> Result<Option<AnsweredRequest>, StoreError> {
        self.inner.answered_request(peer)
    }

    fn put_answered_request(&mut self, peer: &PeerId, answered: &AnsweredRequest) -> Result<(), StoreError> {
        self.inner.put_answered_request(peer, answered)
    }

    fn key_exchanges(&self) -> Result<Vec<KeyExchangeAttempt>, StoreError> {
        self.inner.key_exchanges()
    }

    fn put_key_exchange(&mut self, attempt: &KeyExchangeAttempt) -> Result<(), StoreError> {
        self.inner.put_key_exchange(attempt)
    }

    fn delete_key_exchange(&mut self, peer: &PeerId) -> Result<(), StoreError> {
        self.inner.delete_key_exchange(peer)
    }

    fn last_request_at(&self) -> Result<Option<Timestamp>, StoreError> {
        self.inner.last_request_at()
    }

    fn set_last_request_at(&mut self, at: Timestamp) -> Result<(), StoreError> {
        self.inner.set_last_request_at(at)
    }
}

impl GroupStore for SimStore {
    fn group_keys(&self, id: &ConversationId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.inner.group_keys(id)
    }

    fn put_group_keys(&mut self, id: &ConversationId, state: &[u8]) -> Result<(), StoreError> {
        self.inner.put_group_keys(id, state)
    }

    fn delete_group_keys(&mut self, id: &ConversationId) -> Result<(), StoreError> {
        self.inner.delete_group_keys(id)
    }

    fn held_messages(&self, group: &ConversationId) -> Result<Vec<HeldMessage>, StoreError> {
        self.inner.held_messages(group)
    }

    fn all_held_messages(&self) -> Result<Vec<HeldMessage>, StoreError> {
        self.inner.all_held_messages()
    }

    fn put_held_message(&mut self, held: &HeldMessage) -> Result<(), StoreError> {
        self.inner.put_held_message(held)
    }

    fn delete_held_message(&mut self, seq: u64) -> Result<(), StoreError> {
        self.inner.delete_held_message(seq)
    }
}

impl InvitationStore for SimStore {
    fn invitations(&self) -> Result<Vec<Invitation>, StoreError> {
        self.inner.invitations()
    }

    fn put_invitation(&mut self, invitation: &Invitation) -> Result<(), StoreError> {
        self.inner.put_invitation(invitation)
    }

    fn delete_invitation(&mut self, group: &ConversationId) -> Result<(), StoreError> {
        self.inner.delete_invitation(group)
    }
}

impl OutboxStore for SimStore {
    fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        self.inner.outbox()
    }

    fn outbox_for(&self, peer: &PeerId) -> Result<Vec<OutboxItem>, StoreError> {
        self.inner.outbox_for(peer)
    }

    fn outbox_item(&self, seq: u64) -> Result<Option<OutboxItem>, StoreError> {
        self.inner.outbox_item(seq)
    }

    fn next_outbox_attempt(&self) -> Result<Option<Timestamp>, StoreError> {
        self.inner.next_outbox_attempt()
    }

    fn peers_due(&self, now: Timestamp) -> Result<Vec<PeerId>, StoreError> {
        self.inner.peers_due(now)
    }

    fn group_envelope(&self, id: &MessageId) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.group_envelope(id)
    }

    fn put_group_envelope(&mut self, id: &MessageId, envelope: &[u8]) -> Result<(), StoreError> {
        self.inner.put_group_envelope(id, envelope)
    }

    fn put_outbox_item(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        self.inner.put_outbox_item(item)
    }

    fn delete_outbox_item(&mut self, seq: u64) -> Result<(), StoreError> {
        self.inner.delete_outbox_item(seq)
    }
}

impl PeerRecordStore for SimStore {
    fn kept_records(&self) -> Result<Vec<KeptRecord>, StoreError> {
        self.inner.kept_records()
    }

    fn put_kept_record(&mut self, kept: &KeptRecord) -> Result<(), StoreError> {
        self.inner.put_kept_record(kept)
    }

    fn kept_record_count(&self) -> Result<usize, StoreError> {
        self.inner.kept_record_count()
    }

    fn forget_kept_records(&mut self, cutoff: Timestamp, keep: usize) -> Result<usize, StoreError> {
        self.inner.forget_kept_records(cutoff, keep)
    }
}

impl RetentionStore for SimStore {
    fn retention_due(&self) -> Result<Option<Timestamp>, StoreError> {
        self.inner.retention_due()
    }

    fn set_retention_due(&mut self, at: Timestamp) -> Result<(), StoreError> {
        self.inner.set_retention_due(at)
    }
}
