//! The storage seam: everything the engine remembers goes through [`Store`],
//! which is one small trait per concern (in the manner of libsignal's
//! stores), so a store implements each concern in its own place and a
//! reader sees at once which calls touch, say, the outbox.

use zeroize::Zeroizing;

use super::model::{
    Conversation, HeldMessage, Invitation, KeptRecord, KeyExchangeAttempt, Member, Message, OutboxItem,
};
use crate::handshake::AnsweredRequest;
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::time::Timestamp;

/// A storage failure. The engine rolls back, discards the input's outputs
/// and returns it to its caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not do what was asked (disk full, database locked, …).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data does not decode.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A read or write outside a transaction, or a second `begin`.
    #[error("storage misused: {0}")]
    Misuse(&'static str),
}

/// The transaction every input runs in, and the store's counter.
///
/// The engine opens one transaction per input (or per batch of inputs, for
/// group commit) and commits before any output of those inputs is released.
/// Reads see the transaction's own writes.
pub trait Transaction {
    /// Opens a transaction.
    fn begin(&mut self) -> Result<(), StoreError>;

    /// Makes the transaction's writes durable. If it fails, the engine calls
    /// [`Transaction::rollback`] next.
    fn commit(&mut self) -> Result<(), StoreError>;

    /// Discards the transaction's writes.
    fn rollback(&mut self);

    /// A counter that never repeats, for outbox order.
    fn next_seq(&mut self) -> Result<u64, StoreError>;
}

/// Conversations and group membership.
pub trait ConversationStore {
    /// One conversation.
    fn conversation(&self, id: &ConversationId) -> Result<Option<Conversation>, StoreError>;

    /// Every conversation, in ID order.
    fn conversations(&self) -> Result<Vec<Conversation>, StoreError>;

    /// Creates or replaces a conversation.
    fn put_conversation(&mut self, conversation: &Conversation) -> Result<(), StoreError>;

    /// Deletes a conversation with its messages and members.
    fn delete_conversation(&mut self, id: &ConversationId) -> Result<(), StoreError>;

    /// A group's members, in peer ID order.
    fn members(&self, id: &ConversationId) -> Result<Vec<Member>, StoreError>;

    /// Creates or replaces a member.
    fn put_member(&mut self, id: &ConversationId, member: &Member) -> Result<(), StoreError>;
}

/// Messages, sent and received, with their statuses.
pub trait MessageStore {
    /// One message.
    fn message(&self, id: &MessageId) -> Result<Option<Message>, StoreError>;

    /// A conversation's messages, in the order they were first stored.
    fn messages(&self, id: &ConversationId) -> Result<Vec<Message>, StoreError>;

    /// Up to `limit` of a conversation's messages, newest first, all stored
    /// before `before` (the last message of the previous page) if given.
    fn messages_page(
        &self,
        id: &ConversationId,
        before: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;

    /// Whether `sender` wrote any stored message of the conversation. A
    /// store on disk answers from its plain columns, without unsealing.
    fn has_message_from(&self, id: &ConversationId, sender: &PeerId) -> Result<bool, StoreError> {
        Ok(self.messages(id)?.iter().any(|m| m.sender == *sender))
    }

    /// Creates or replaces a message.
    fn put_message(&mut self, message: &Message) -> Result<(), StoreError>;

    /// Messages stored before `cutoff`, in the order they were first stored (for retention).
    fn messages_stored_before(&self, cutoff: Timestamp) -> Result<Vec<Message>, StoreError>;

    /// Deletes one message.
    fn delete_message(&mut self, id: &MessageId) -> Result<(), StoreError>;
}

/// Pairwise ratchet sessions, and when each peer was last heard from.
pub trait SessionStore {
    /// The sessions with a peer, as [`PairwiseSessions::to_bytes`](crate::PairwiseSessions::to_bytes).
    fn sessions(&self, peer: &PeerId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError>;

    /// Every peer with sessions, in peer ID order.
    fn session_peers(&self) -> Result<Vec<PeerId>, StoreError>;

    /// Creates or replaces the sessions with a peer.
    fn put_sessions(&mut self, peer: &PeerId, state: &[u8]) -> Result<(), StoreError>;

    /// Deletes the sessions and the answered request of a peer (a quiet
    /// stranger's, swept).
    fn delete_sessions(&mut self, peer: &PeerId) -> Result<(), StoreError>;

    /// When a key exchange or a message last came from `peer`. Kept after
    /// its sessions are swept, so that the peer's next message, under a
    /// session we no longer hold, may start a new one.
    fn last_heard(&self, peer: &PeerId) -> Result<Option<Timestamp>, StoreError>;

    /// Records that something came from `peer` at `at`. A store on disk may
    /// skip the write when its record is less than an hour older.
    fn note_heard(&mut self, peer: &PeerId, at: Timestamp) -> Result<(), StoreError>;

    /// Peers with sessions last heard from before `cutoff`, in peer ID order
    /// (a peer with sessions and no record of when counts as heard now).
    fn quiet_session_peers(&self, cutoff: Timestamp) -> Result<Vec<PeerId>, StoreError>;

    /// Keeps the `keep` most recently heard records of peers without
    /// sessions and forgets the rest; returns how many went.
    fn forget_quiet_peers(&mut self, keep: usize) -> Result<usize, StoreError>;
}

/// Key exchanges: those this node started and has not finished, and the
/// newest request answered per peer.
pub trait KeyExchangeStore {
    /// The newest key exchange request answered for a peer.
    fn answered_request(&self, peer: &PeerId) -> Result<Option<AnsweredRequest>, StoreError>;

    /// Records it.
    fn put_answered_request(&mut self, peer: &PeerId, answered: &AnsweredRequest) -> Result<(), StoreError>;

    /// Key exchanges this node started and has not finished, in peer order.
    fn key_exchanges(&self) -> Result<Vec<KeyExchangeAttempt>, StoreError>;

    /// The key exchange with one peer. A store on disk looks it up by peer
    /// rather than unsealing every row.
    fn key_exchange(&self, peer: &PeerId) -> Result<Option<KeyExchangeAttempt>, StoreError> {
        Ok(self.key_exchanges()?.into_iter().find(|a| a.peer == *peer))
    }

    /// The key exchanges whose deadline is at or before `now`, in peer order.
    fn key_exchanges_due(&self, now: Timestamp) -> Result<Vec<KeyExchangeAttempt>, StoreError> {
        Ok(self.key_exchanges()?.into_iter().filter(|a| a.deadline <= now).collect())
    }

    /// The earliest key exchange deadline. Asked after every transaction: a
    /// store on disk keeps deadlines where it can read them without
    /// unsealing.
    fn next_key_exchange_deadline(&self) -> Result<Option<Timestamp>, StoreError> {
        Ok(self.key_exchanges()?.into_iter().map(|a| a.deadline).min())
    }

    /// How many key exchanges are under way.
    fn key_exchange_count(&self) -> Result<usize, StoreError> {
        Ok(self.key_exchanges()?.len())
    }

    /// Creates or replaces one.
    fn put_key_exchange(&mut self, attempt: &KeyExchangeAttempt) -> Result<(), StoreError>;

    /// Removes one.
    fn delete_key_exchange(&mut self, peer: &PeerId) -> Result<(), StoreError>;

    /// The timestamp of the newest key exchange request this node made.
    fn last_request_at(&self) -> Result<Option<Timestamp>, StoreError>;

    /// Records it.
    fn set_last_request_at(&mut self, at: Timestamp) -> Result<(), StoreError>;
}

/// Group keys, and group messages held until their sender key arrives.
pub trait GroupStore {
    /// A group's keys, as [`GroupSession::to_bytes`](crate::GroupSession::to_bytes).
    fn group_keys(&self, id: &ConversationId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError>;

    /// Creates or replaces them.
    fn put_group_keys(&mut self, id: &ConversationId, state: &[u8]) -> Result<(), StoreError>;

    /// Deletes them (after leaving).
    fn delete_group_keys(&mut self, id: &ConversationId) -> Result<(), StoreError>;

    /// Group messages held for a missing sender key, in `seq` order.
    fn held_messages(&self, group: &ConversationId) -> Result<Vec<HeldMessage>, StoreError>;

    /// Every held message, in `seq` order (for expiry).
    fn all_held_messages(&self) -> Result<Vec<HeldMessage>, StoreError>;

    /// Holds one.
    fn put_held_message(&mut self, held: &HeldMessage) -> Result<(), StoreError>;

    /// Releases one.
    fn delete_held_message(&mut self, seq: u64) -> Result<(), StoreError>;

    /// How many messages, and envelope bytes, are held from `sender` (or
    /// from everyone). Asked for every message held: a store on disk
    /// counts in SQL rather than loading envelopes.
    fn held_usage(&self, sender: Option<&PeerId>) -> Result<(usize, usize), StoreError> {
        Ok(self
            .all_held_messages()?
            .iter()
            .filter(|h| sender.is_none_or(|s| h.sender == *s))
            .fold((0, 0), |(count, bytes), h| (count + 1, bytes + h.envelope.len())))
    }

    /// Whether this very envelope is already held for `group` from `sender`.
    fn is_held(&self, group: &ConversationId, sender: &PeerId, envelope: &[u8]) -> Result<bool, StoreError> {
        Ok(self.held_messages(group)?.iter().any(|h| h.sender == *sender && h.envelope == envelope))
    }

    /// Releases every message held since before `cutoff`; returns how many.
    fn delete_held_before(&mut self, cutoff: Timestamp) -> Result<usize, StoreError> {
        let old: Vec<u64> =
            self.all_held_messages()?.iter().filter(|h| h.received_at < cutoff).map(|h| h.seq).collect();
        for seq in &old {
            self.delete_held_message(*seq)?;
        }
        Ok(old.len())
    }
}

/// Group invitations waiting for the user's answer.
pub trait InvitationStore {
    /// Group invitations waiting for the user's answer, oldest first.
    fn invitations(&self) -> Result<Vec<Invitation>, StoreError>;

    /// The invitation to one group.
    fn invitation(&self, group: &ConversationId) -> Result<Option<Invitation>, StoreError> {
        Ok(self.invitations()?.into_iter().find(|i| i.group_id == *group))
    }

    /// How many invitations wait, from `admin` (or from everyone). Asked
    /// for every invitation a stranger sends: a store on disk counts in SQL.
    fn invitation_count(&self, admin: Option<&PeerId>) -> Result<usize, StoreError> {
        Ok(self.invitations()?.iter().filter(|i| admin.is_none_or(|a| i.admin == *a)).count())
    }

    /// The groups of the invitations that arrived before `cutoff`.
    fn invitations_received_before(&self, cutoff: Timestamp) -> Result<Vec<ConversationId>, StoreError> {
        Ok(self.invitations()?.into_iter().filter(|i| i.received_at < cutoff).map(|i| i.group_id).collect())
    }

    /// The group of the invitation that arrived first.
    fn oldest_invitation(&self) -> Result<Option<ConversationId>, StoreError> {
        Ok(self.invitations()?.first().map(|i| i.group_id))
    }

    /// Creates or replaces the invitation to `invitation.group_id`.
    fn put_invitation(&mut self, invitation: &Invitation) -> Result<(), StoreError>;

    /// Removes it.
    fn delete_invitation(&mut self, group: &ConversationId) -> Result<(), StoreError>;
}

/// The outbox: what waits to be sent, per peer, with its next attempt.
pub trait OutboxStore {
    /// The whole outbox, in `seq` order (for sweeps; the hot paths use the
    /// indexed calls below).
    fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError>;

    /// The items for one peer, in `seq` order.
    fn outbox_for(&self, peer: &PeerId) -> Result<Vec<OutboxItem>, StoreError>;

    /// The items for one peer that are not in flight, in `seq` order.
    fn outbox_waiting_for(&self, peer: &PeerId) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(self.outbox_for(peer)?.into_iter().filter(|i| !i.in_flight).collect())
    }

    /// The items for one peer that are not in flight and due at `now`, in
    /// `seq` order.
    fn outbox_due_for(&self, peer: &PeerId, now: Timestamp) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(self
            .outbox_for(peer)?
            .into_iter()
            .filter(|i| !i.in_flight && i.next_attempt_at.is_some_and(|at| at <= now))
            .collect())
    }

    /// How many items one peer has.
    fn outbox_len(&self, peer: &PeerId) -> Result<usize, StoreError> {
        Ok(self.outbox_for(peer)?.len())
    }

    /// One item.
    fn outbox_item(&self, seq: u64) -> Result<Option<OutboxItem>, StoreError>;

    /// The earliest `next_attempt_at` of an item not in flight.
    fn next_outbox_attempt(&self) -> Result<Option<Timestamp>, StoreError>;

    /// Peers with an item not in flight whose attempt is due at `now`, in order.
    fn peers_due(&self, now: Timestamp) -> Result<Vec<PeerId>, StoreError>;

    /// The encrypted envelope of one of our group messages, stored once for
    /// all its recipients' outbox items.
    fn group_envelope(&self, id: &MessageId) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores it.
    fn put_group_envelope(&mut self, id: &MessageId, envelope: &[u8]) -> Result<(), StoreError>;

    /// Creates or replaces an item.
    fn put_outbox_item(&mut self, item: &OutboxItem) -> Result<(), StoreError>;

    /// Removes an item.
    fn delete_outbox_item(&mut self, seq: u64) -> Result<(), StoreError>;
}

/// Peer records kept from relays, so a peer stays reachable while no relay
/// answers for it.
pub trait PeerRecordStore {
    /// Every kept peer record, in peer ID order.
    fn kept_records(&self) -> Result<Vec<KeptRecord>, StoreError>;

    /// Creates or replaces the kept record of `kept.peer`.
    fn put_kept_record(&mut self, kept: &KeptRecord) -> Result<(), StoreError>;

    /// How many records are kept.
    fn kept_record_count(&self) -> Result<usize, StoreError>;

    /// Forgets the records last seen before `cutoff`, and then all but the
    /// `keep` most recently seen; returns how many went.
    fn forget_kept_records(&mut self, cutoff: Timestamp, keep: usize) -> Result<usize, StoreError>;
}

/// When the retention sweep runs next.
pub trait RetentionStore {
    /// When the retention sweep runs next.
    fn retention_due(&self) -> Result<Option<Timestamp>, StoreError>;

    /// Records it.
    fn set_retention_due(&mut self, at: Timestamp) -> Result<(), StoreError>;
}

/// Synchronous, transactional storage for one node's engine: every concern
/// above. Implement the small traits; this one follows.
///
/// Secrets reach the store as bytes (sessions, group keys) or inside a
/// record (a pending key exchange in its [`KeyExchangeAttempt`], a queued
/// sender key in its [`OutboxItem`]); a store that writes to disk must seal
/// every one of them.
pub trait Store:
    Transaction
    + ConversationStore
    + MessageStore
    + SessionStore
    + KeyExchangeStore
    + GroupStore
    + InvitationStore
    + OutboxStore
    + PeerRecordStore
    + RetentionStore
{
}

impl<T> Store for T where
    T: Transaction
        + ConversationStore
        + MessageStore
        + SessionStore
        + KeyExchangeStore
        + GroupStore
        + InvitationStore
        + OutboxStore
        + PeerRecordStore
        + RetentionStore
{
}
