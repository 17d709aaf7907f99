//! What the engine keeps: conversations, messages, group members, the
//! outbox, key exchanges under way. Stored through the
//! [`Store`](super::Store); the two records with typed states (a key
//! exchange attempt, a control payload) keep the layout they had at rest
//! before they were typed, and never print their secrets.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ids::{ConversationId, MessageId, PeerId};
use crate::time::Timestamp;
use crate::wire::{GroupControl, PairwisePayload, RosterEntry, SenderKeyDistribution};

/// A message's place in its lifecycle. The order of the variants is the
/// order of progress: a status never moves to a lower one, and `Failed` is
/// reached only from `Created` (or from `Sent` when the message expires).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MessageStatus {
    /// Encrypted (or waiting for a key exchange) and stored.
    Created,
    /// Held for later delivery: by a relay's mailbox, or in the local outbox
    /// under an established session.
    Sent,
    /// The recipient confirmed it end to end.
    Delivered,
    /// The recipient read it.
    Read,
    /// No way to deliver it was found; `failure_reason` says why.
    Failed,
}

impl MessageStatus {
    /// The name used by the API and the events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Read => "read",
            Self::Failed => "failed",
        }
    }
}

/// 1:1 or group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationKind {
    /// With one peer.
    OneOnOne {
        /// The other peer.
        peer: PeerId,
    },
    /// A group.
    Group {
        /// Its display name.
        name: String,
        /// Its creator, the only member who may invite.
        admin: PeerId,
    },
}

/// A conversation, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// Its ID, the same on every participant.
    pub id: ConversationId,
    /// 1:1 or group.
    pub kind: ConversationKind,
    /// When this node created or joined it.
    pub created_at: Timestamp,
    /// When anything about it last changed.
    pub updated_at: Timestamp,
    /// When its newest message was stored.
    pub last_message_at: Option<Timestamp>,
    /// Its newest message.
    pub last_message_id: Option<MessageId>,
    /// Incoming messages not yet marked read.
    pub unread_count: u32,
    /// Whether this node has left the group (a left group keeps its history).
    pub left: bool,
}

impl Conversation {
    /// A conversation with no messages yet, created (or joined) at
    /// `created_at` and last changed at `updated_at`.
    pub fn new(id: ConversationId, kind: ConversationKind, created_at: Timestamp, updated_at: Timestamp) -> Self {
        Self {
            id,
            kind,
            created_at,
            updated_at,
            last_message_at: None,
            last_message_id: None,
            unread_count: 0,
            left: false,
        }
    }
}

/// A group member, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member.
    pub peer_id: PeerId,
    /// When it joined (this node's clock).
    pub joined_at: Timestamp,
    /// Whether it is the admin.
    pub is_admin: bool,
    /// When it left, if it did.
    pub left_at: Option<Timestamp>,
    /// The join number the admin gave it (`0`: not known here).
    pub epoch: u64,
}

/// A stored message, incoming or outgoing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Its ID, chosen by its sender.
    pub id: MessageId,
    /// Its conversation.
    pub conversation_id: ConversationId,
    /// Who wrote it.
    pub sender: PeerId,
    /// The text.
    pub content: String,
    /// The sender's clock when it was written.
    pub timestamp: Timestamp,
    /// Where it is in its lifecycle.
    pub status: MessageStatus,
    /// When it reached `sent` (outgoing) or was received (incoming).
    pub sent_at: Option<Timestamp>,
    /// When it reached `delivered`.
    pub delivered_at: Option<Timestamp>,
    /// When it reached `read`.
    pub read_at: Option<Timestamp>,
    /// Why it failed.
    pub failure_reason: Option<String>,
    /// Why a `sent` message is still waiting (the peer is offline, the
    /// relay's mailbox is full, …), when a transport said so.
    pub waiting_reason: Option<String>,
    /// For outgoing messages: each recipient's own progress (one entry for
    /// 1:1). The message's status is the least advanced of them.
    pub recipients: Vec<(PeerId, MessageStatus)>,
    /// When it was stored here (this node's clock; retention counts from it).
    pub stored_at: Timestamp,
    /// For group messages: the sender key ID and message number it was
    /// encrypted under, to recognise a retransmitted copy.
    pub group_position: Option<(u32, u32)>,
}

impl Message {
    /// Whether this node wrote it.
    pub fn is_outgoing(&self, me: &PeerId) -> bool {
        self.sender == *me
    }
}

/// Something waiting to go to one peer over the pairwise session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxPayload {
    /// A 1:1 chat message.
    Chat(MessageId),
    /// A group message, already encrypted for the whole group (the envelope
    /// is stored once, under the message's ID).
    Group {
        /// The message.
        message_id: MessageId,
    },
    /// Delivery receipts.
    Delivered(Vec<MessageId>),
    /// Acknowledgements of tracked payloads (by the sender's outbox `seq`).
    Ack(Vec<u64>),
    /// Read receipts.
    Read {
        /// The messages.
        message_ids: Vec<MessageId>,
        /// When they were read.
        read_at: Timestamp,
    },
    /// Group control, a sender key or a key request, or a session
    /// confirmation. Holds a chain key when it is a sender key: the store
    /// seals it.
    Control(ControlPayload),
    /// One of our group messages for this one member, over the pairwise
    /// session (see [`PairwisePayload::GroupChat`](crate::wire::PairwisePayload::GroupChat)):
    /// built from the stored message when it is sent, so no plaintext
    /// waits in the outbox.
    GroupCopy {
        /// The message.
        message_id: MessageId,
    },
}

impl OutboxPayload {
    /// The chat message this item carries (1:1, group, or a group copy),
    /// which stays queued until the recipient's delivery receipt.
    pub fn message_id(&self) -> Option<MessageId> {
        match self {
            Self::Chat(id) | Self::Group { message_id: id } | Self::GroupCopy { message_id: id } => Some(*id),
            _ => None,
        }
    }
}

/// A control payload waiting in the outbox, decoded once when its item is
/// read. At rest it is its pairwise encoding
/// ([`PairwisePayload::encode`]), as it was before it had a type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlPayload {
    /// Our sender key for one member. The chain key in it is secret.
    SenderKey(SenderKeyDistribution),
    /// A request for a member's sender key.
    SenderKeyRequest {
        /// The group.
        group_id: ConversationId,
    },
    /// Group membership: an invite, a member added, a leave, a member left.
    Group(GroupControl),
    /// Tells the initiator of a key exchange that its session works; the one
    /// control payload that is not tracked (sent once, never acknowledged).
    SessionConfirm,
}

impl ControlPayload {
    /// The payload as it travels.
    pub fn to_pairwise(&self) -> PairwisePayload {
        match self {
            Self::SenderKey(d) => PairwisePayload::SenderKeyDistribution(d.clone()),
            Self::SenderKeyRequest { group_id } => PairwisePayload::SenderKeyRequest { group_id: *group_id },
            Self::Group(control) => PairwisePayload::GroupControl(control.clone()),
            Self::SessionConfirm => PairwisePayload::SessionConfirm,
        }
    }

    /// Whether it is sent tracked and kept until the peer acknowledges it.
    pub fn is_tracked(&self) -> bool {
        !matches!(self, Self::SessionConfirm)
    }
}

/// A pairwise payload that is not a control payload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a pairwise payload of this kind is not queued as control")]
pub struct NotControl;

impl TryFrom<PairwisePayload> for ControlPayload {
    type Error = NotControl;

    fn try_from(payload: PairwisePayload) -> Result<Self, NotControl> {
        match payload {
            PairwisePayload::SenderKeyDistribution(d) => Ok(Self::SenderKey(d)),
            PairwisePayload::SenderKeyRequest { group_id } => Ok(Self::SenderKeyRequest { group_id }),
            PairwisePayload::GroupControl(control) => Ok(Self::Group(control)),
            PairwisePayload::SessionConfirm => Ok(Self::SessionConfirm),
            _ => Err(NotControl),
        }
    }
}

impl Serialize for ControlPayload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The bytes of the untyped form, through the same serde path.
        let bytes: Zeroizing<Vec<u8>> = self.to_pairwise().encode();
        (*bytes).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ControlPayload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let bytes = Zeroizing::new(Vec::<u8>::deserialize(deserializer)?);
        let payload = PairwisePayload::decode(&bytes).map_err(D::Error::custom)?;
        Self::try_from(payload).map_err(D::Error::custom)
    }
}

/// One outbox entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxItem {
    /// Position in the outbox; items to one peer leave in this order.
    pub seq: u64,
    /// The recipient.
    pub peer: PeerId,
    /// What to send.
    pub payload: OutboxPayload,
    /// When it was queued (control items expire with the message TTL).
    pub queued_at: Timestamp,
    /// When to try again; `None` waits for the peer to become reachable.
    pub next_attempt_at: Option<Timestamp>,
    /// Whether a copy is out (sent and not yet confirmed).
    pub in_flight: bool,
    /// The sealed copy whose last transmit reached no one (no peer, no
    /// relay), sent again as it is rather than sealed again under a new
    /// message key (see [`SealedCopy`]).
    pub unsent_copy: Option<SealedCopy>,
}

/// A pairwise item as sealed for one attempt. A copy that reached no one is
/// sent again unchanged (for up to 6 days): sealing again would take a new
/// message key each time, and an item retried every 30 s for days would
/// move the sending chain thousands of keys past what the peer may skip,
/// losing the session. A copy that reached the peer or a relay is never sent again (its
/// key is spent at the peer, which could not open it twice).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCopy {
    /// The session it is sealed under: under any other it is sealed again.
    pub session: [u8; 16],
    /// When it was sealed: an old copy is sealed again, since the peer's
    /// key for it may have expired (skipped keys live 7 days).
    pub sealed_at: Timestamp,
    /// The envelope.
    pub envelope: Vec<u8>,
}

/// A key exchange this node started and has not completed.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "StoredAttempt")]
pub struct KeyExchangeAttempt {
    /// The peer.
    pub peer: PeerId,
    /// Where it stands.
    pub state: AttemptState,
    /// Attempts made so far (the first is 1).
    pub attempts: u32,
    /// When the current state ends: the lookup or the request times out,
    /// or the backoff is over and the next attempt starts.
    pub deadline: Timestamp,
}

/// Where a key exchange attempt stands.
#[derive(Clone, PartialEq, Eq)]
pub enum AttemptState {
    /// The peer is being looked up in the directory.
    LookingUp,
    /// Our request is out and we wait for the peer's ack. Holds the encoded
    /// [`PendingKeyExchange`](crate::handshake::PendingKeyExchange): an
    /// ephemeral secret, which a store on disk seals.
    AwaitingAck(Zeroizing<Vec<u8>>),
    /// The attempt failed; the next one starts at the deadline.
    BackingOff,
}

impl core::fmt::Debug for AttemptState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::LookingUp => f.write_str("LookingUp"),
            Self::AwaitingAck(_) => f.write_str("AwaitingAck(..)"),
            Self::BackingOff => f.write_str("BackingOff"),
        }
    }
}

/// A [`KeyExchangeAttempt`] as it is encoded at rest (docs/STORAGE.md): the
/// layout of the first schema, which the typed state maps onto one to one.
#[derive(Deserialize)]
struct StoredAttempt {
    peer: PeerId,
    pending: Option<Vec<u8>>,
    attempts: u32,
    deadline: Timestamp,
    backing_off: bool,
}

impl From<StoredAttempt> for KeyExchangeAttempt {
    fn from(stored: StoredAttempt) -> Self {
        let state = match (stored.backing_off, stored.pending) {
            (true, _) => AttemptState::BackingOff,
            (false, Some(pending)) => AttemptState::AwaitingAck(Zeroizing::new(pending)),
            (false, None) => AttemptState::LookingUp,
        };
        Self { peer: stored.peer, state, attempts: stored.attempts, deadline: stored.deadline }
    }
}

impl Serialize for KeyExchangeAttempt {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Borrowed, so the pending secret is never copied out of its
        // zeroizing buffer on the way to the store.
        #[derive(Serialize)]
        struct StoredAttemptRef<'a> {
            peer: &'a PeerId,
            pending: Option<&'a [u8]>,
            attempts: u32,
            deadline: Timestamp,
            backing_off: bool,
        }
        let (pending, backing_off) = match &self.state {
            AttemptState::LookingUp => (None, false),
            AttemptState::AwaitingAck(pending) => (Some(&pending[..]), false),
            AttemptState::BackingOff => (None, true),
        };
        let stored = StoredAttemptRef {
            peer: &self.peer,
            pending,
            attempts: self.attempts,
            deadline: self.deadline,
            backing_off,
        };
        stored.serialize(serializer)
    }
}

/// A group message that arrived before its sender's key, held until the key
/// comes (or for at most 7 days).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMessage {
    /// Position in the store; held messages are retried in this order.
    pub seq: u64,
    /// The group.
    pub group_id: ConversationId,
    /// Its sender.
    pub sender: PeerId,
    /// The encoded group envelope.
    pub envelope: Vec<u8>,
    /// When it arrived.
    pub received_at: Timestamp,
}

/// A group invitation waiting for the user's answer. An invitation from an
/// admin to whom the user has never written in a 1:1 conversation is not
/// joined on arrival: a stranger's group would otherwise put its roster,
/// its members' keys and their messages on the user's disk unasked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitation {
    /// The group.
    pub group_id: ConversationId,
    /// Its display name.
    pub name: String,
    /// Its admin, who sent the invitation.
    pub admin: PeerId,
    /// The roster the admin sent, this node included.
    pub members: Vec<RosterEntry>,
    /// When the admin created the group.
    pub created_at: Timestamp,
    /// When the invitation arrived (it expires with the message TTL).
    pub received_at: Timestamp,
}

impl Invitation {
    /// The join number the admin gave `peer`.
    pub fn epoch_of(&self, peer: &PeerId) -> Option<u64> {
        self.members.iter().find(|m| m.peer_id == *peer).map(|m| m.epoch)
    }
}

/// A peer's signed record as the node last saw it: kept so that a node that
/// restarts still reaches, through their relays' mailboxes, the peers it
/// reached before (a record expires in a day; a mailbox lives a week).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRecord {
    /// Whose record it is.
    pub peer: PeerId,
    /// When this node last learned it (the oldest are forgotten first).
    pub seen_at: Timestamp,
    /// The record as signed, postcard-encoded; the node checks its
    /// signature again when it loads it.
    pub record: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The at-rest layout of a key exchange attempt before its state was
    /// typed, written out independently of `StoredAttempt`.
    #[derive(Serialize)]
    struct FirstLayout {
        peer: PeerId,
        pending: Option<Vec<u8>>,
        attempts: u32,
        deadline: Timestamp,
        backing_off: bool,
    }

    #[test]
    fn a_typed_attempt_is_stored_as_before_and_reads_back() {
        let peer = PeerId([3; 20]);
        let cases = [
            (AttemptState::LookingUp, None, false),
            (AttemptState::AwaitingAck(Zeroizing::new(vec![9, 8, 7])), Some(vec![9, 8, 7]), false),
            (AttemptState::BackingOff, None, true),
        ];
        for (state, pending, backing_off) in cases {
            let attempt = KeyExchangeAttempt { peer, state, attempts: 2, deadline: Timestamp(77) };
            let old = FirstLayout { peer, pending, attempts: 2, deadline: Timestamp(77), backing_off };
            let bytes = postcard::to_stdvec(&attempt).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&old).unwrap(), "{:?} changed its stored form", attempt.state);
            assert_eq!(postcard::from_bytes::<KeyExchangeAttempt>(&bytes).unwrap(), attempt);
        }
    }

    #[test]
    fn an_attempt_never_prints_its_pending_secret() {
        let state = AttemptState::AwaitingAck(Zeroizing::new(vec![0xAB; 4]));
        let printed =
            format!("{:?}", KeyExchangeAttempt { peer: PeerId([1; 20]), state, attempts: 1, deadline: Timestamp(1) });
        assert!(printed.contains("AwaitingAck(..)") && !printed.contains("171"), "{printed}");
    }

    #[test]
    fn a_typed_control_payload_is_stored_as_its_pairwise_bytes_and_reads_back() {
        let group_id = ConversationId(crate::ids::Uuid([5; 16]));
        let distribution = SenderKeyDistribution {
            group_id,
            sender: PeerId([6; 20]),
            key_id: 3,
            message_number: 9,
            chain_key: [0x44; 32],
            signing_public: [0x55; 32],
        };
        let kinds = [
            ControlPayload::SenderKey(distribution),
            ControlPayload::SenderKeyRequest { group_id },
            ControlPayload::Group(GroupControl::Leave { group_id, epoch: 2 }),
            ControlPayload::SessionConfirm,
        ];
        for control in kinds {
            let untyped: Vec<u8> = control.to_pairwise().encode().to_vec();
            let bytes = postcard::to_stdvec(&OutboxPayload::Control(control.clone())).unwrap();
            // `Control` is variant 5 of `OutboxPayload`; then the bytes exactly as
            // the untyped `Control(Vec<u8>)` held them.
            let mut expected = vec![5];
            expected.extend(postcard::to_stdvec(&untyped).unwrap());
            assert_eq!(bytes, expected, "{control:?} changed its stored form");
            assert_eq!(postcard::from_bytes::<OutboxPayload>(&bytes).unwrap(), OutboxPayload::Control(control));
        }
        // A stored pairwise payload of another kind is not a control payload.
        let chat = PairwisePayload::Ack { ids: vec![1] }.encode().to_vec();
        assert!(postcard::from_bytes::<ControlPayload>(&postcard::to_stdvec(&chat).unwrap()).is_err());
    }
}
