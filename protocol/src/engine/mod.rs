//! The chat engine: one deterministic state machine per node, between the
//! API (commands), the transport (bytes, reachability, send results), the
//! clock (timeouts) and the store.
//!
//! # Driving rule
//!
//! Call [`Engine::command`] or [`Engine::handle`] with the current time;
//! then drain [`Engine::poll_transmit`], [`Engine::poll_lookup`] and
//! [`Engine::poll_event`] until each returns `None`; then arm a timer for
//! [`Engine::poll_timeout`] and call `handle(now, Input::Timeout)` when it
//! fires. Nothing an input causes is visible before the store transaction
//! for that input has committed; if the commit fails, the input returns the
//! error and its outputs are discarded, so no byte leaves whose ratchet step
//! was not saved.
//!
//! It covers 1:1 conversations (key exchange with lookup, timeout and
//! retries), groups (Sender Keys distributed over the pairwise sessions,
//! admin invites, leaves with key rotation, messages held until their
//! sender's key arrives), the message lifecycle, delivery and read receipts,
//! the outbox, and retention.

mod events;
mod groups;
mod memory;
mod model;
mod store;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand_core::CryptoRngCore;

pub use events::Event;
pub use memory::MemoryStore;
pub use model::{
    Conversation, ConversationKind, HeldMessage, Invitation, KeptRecord, KeyExchangeAttempt, Member, Message,
    MessageStatus, OutboxItem, OutboxPayload, SealedCopy,
};
pub use store::{
    ConversationStore, GroupStore, InvitationStore, KeyExchangeStore, MessageStore, OutboxStore, PeerRecordStore,
    RetentionStore, SessionStore, Store, StoreError, Transaction,
};

use crate::group::GroupError;
use crate::handshake::{self, CrossedRequests, PendingKeyExchange, Response};
use crate::identity::IdentityKeyPair;
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::session::PairwiseSessions;
use crate::state::StateError;
use crate::time::Timestamp;
use crate::wire::{
    ChatContent, Envelope, EnvelopeBody, KeyExchangeAck, KeyExchangeRequest, PairwisePayload, RatchetMessage,
};

/// The fewest members a group may be created with besides its creator.
pub const MIN_GROUP_OTHERS: usize = 2;

/// The longest group name, in bytes of UTF-8: a name travels in every
/// invite, to every member.
pub const MAX_GROUP_NAME_LEN: usize = 256;

/// The most group messages held per sender while its key is missing.
pub const MAX_HELD_PER_SENDER: usize = 200;

/// The most envelope bytes held per sender while its key is missing.
pub const MAX_HELD_BYTES_PER_SENDER: usize = 4 * 1024 * 1024;

/// The most group messages held from everyone together: members are
/// chosen by a group's admin, and an admin can invent a thousand.
pub const MAX_HELD: usize = 5_000;

/// The most envelope bytes held from everyone together.
pub const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;

/// The most key exchanges under way that no message of the user waits for
/// (sender keys, receipts and requests to group members met only through a
/// group): beyond it, such items wait and try again later, so a roster of
/// invented members cannot keep the node exchanging keys with all of them.
pub const MAX_BACKGROUND_KEY_EXCHANGES: usize = 64;

/// The most group invitations waiting for the user's answer: beyond it,
/// the oldest is declined to make room.
pub const MAX_INVITATIONS: usize = 100;

/// The most waiting group invitations from one admin: beyond it, its new
/// invitations are declined at once.
pub const MAX_INVITATIONS_PER_ADMIN: usize = 5;

/// The most records kept of when peers whose sessions were swept were last
/// heard from (about 60 bytes each on disk): beyond it, the oldest go, and
/// such a peer's next message under its old session is refused.
pub const MAX_QUIET_PEERS: usize = 10_000;

/// The most peer records kept across restarts ([`Input::KeepRecord`]);
/// beyond it the least recently seen go.
pub const MAX_KEPT_RECORDS: usize = 4_096;
/// The largest record kept, encoded; a larger one (a record may list 32
/// addresses of 256 bytes) is used but not kept. With the count above this
/// bounds the kept records at 8 MiB.
pub const MAX_KEPT_RECORD_BYTES: usize = 2_048;
/// How long a record not seen again is kept: long past a relay mailbox's
/// week, so someone away for weeks is still reached where they were.
pub const KEPT_RECORD_LIFETIME_MS: u64 = 30 * DAY_MS;

/// The most message IDs (or acknowledged IDs) one receipt is taken to name;
/// the rest are ignored, so one envelope cannot cost unbounded work.
pub const MAX_IDS_PER_PAYLOAD: usize = 1_000;

/// Whether a pairwise payload was dealt with, or must wait for state that
/// has not arrived yet (and so is not acknowledged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handled {
    Done,
    NotYet,
}

/// The largest message content, in bytes.
pub const MAX_CONTENT_LEN: usize = 64 * 1024;

/// Tunables; the defaults are the reference's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Send attempts after the first before a message fails (`invoice_max_retries`).
    pub max_retries: u32,
    /// The first retry's backoff; it doubles each time (`invoice_retry_backoff_ms`).
    pub retry_backoff_ms: u64,
    /// How long to wait for a key exchange ack.
    pub key_exchange_timeout_ms: u64,
    /// How long messages are kept (`chat_message_ttl_days`).
    pub message_ttl_ms: u64,
    /// How long to wait for a delivery confirmation before sending again.
    pub confirmation_timeout_ms: u64,
    /// How often the retention sweep runs.
    pub retention_interval_ms: u64,
    /// The most items queued for one peer.
    pub max_outbox_per_peer: usize,
    /// Once the key exchange retries are spent, how often to try again
    /// while receipts, keys or group notices still wait for the peer.
    pub session_retry_ms: u64,
    /// Most group messages held per sender while its key is missing.
    pub held_max_per_sender: usize,
    /// Most envelope bytes held per sender.
    pub held_max_bytes_per_sender: usize,
    /// Most group messages held from everyone together.
    pub held_max: usize,
    /// Most envelope bytes held from everyone together.
    pub held_max_bytes: usize,
    /// Most key exchanges under way before those that no message of the
    /// user waits for are put off (see [`MAX_BACKGROUND_KEY_EXCHANGES`]).
    pub max_background_key_exchanges: usize,
    /// Most group invitations waiting for the user's answer.
    pub max_invitations: usize,
    /// Most waiting group invitations from one admin.
    pub max_invitations_per_admin: usize,
}

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// A copy held in a relay's mailbox is sent again, if no receipt came,
/// after this many confirmation timeouts (5 minutes by default) or three
/// times the item's age, whichever is longer, up to [`HELD_RETRY_MAX_MS`]:
/// a safety net against a relay that lost it, spaced out so a peer away
/// for a week finds about nine copies in its mailbox (at 0, 5, 20 and
/// 80 minutes, 5 and 21 hours, then every two days), not thousands.
const HELD_RETRY_FACTOR: u64 = 10;
/// How long a pairwise copy that reached no one is sent again as it is
/// ([`SealedCopy`]): within the 7 days a peer keeps the key of a message it
/// skipped. Beyond it the item is sealed again, abandoning the old copy's
/// key, which the receiver must then skip: every item that keeps failing
/// abandons one key per 6 days, so a receiver (which skips up to 1,000 at a
/// time) loses the session only if more than 1,000 items to it fail for
/// over 6 days, or 500 for over 12 (as when the relays refuse all but the
/// first 100 of a sender's messages to someone away that long).
const UNSENT_COPY_REUSE_MS: u64 = 6 * DAY_MS;
/// How the wait before another copy grows with the item's age.
const HELD_RETRY_AGE_FACTOR: u64 = 3;
/// The longest wait between copies of a message held by a relay.
const HELD_RETRY_MAX_MS: u64 = 2 * DAY_MS;

impl EngineConfig {
    /// Zero intervals would make deadlines that never move forward, and a
    /// huge retry count would overflow: clamp them.
    fn sanitized(self) -> Self {
        Self {
            max_retries: self.max_retries.min(64),
            retry_backoff_ms: self.retry_backoff_ms.max(1),
            key_exchange_timeout_ms: self.key_exchange_timeout_ms.max(1),
            message_ttl_ms: self.message_ttl_ms.max(1),
            confirmation_timeout_ms: self.confirmation_timeout_ms.max(1),
            retention_interval_ms: self.retention_interval_ms.max(1),
            max_outbox_per_peer: self.max_outbox_per_peer.max(1),
            session_retry_ms: self.session_retry_ms.max(1),
            held_max_per_sender: self.held_max_per_sender,
            held_max_bytes_per_sender: self.held_max_bytes_per_sender,
            held_max: self.held_max,
            held_max_bytes: self.held_max_bytes,
            max_background_key_exchanges: self.max_background_key_exchanges,
            max_invitations: self.max_invitations.max(1),
            max_invitations_per_admin: self.max_invitations_per_admin,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_retries: 3,
            retry_backoff_ms: 2_000,
            key_exchange_timeout_ms: 10_000,
            message_ttl_ms: 30 * DAY_MS,
            confirmation_timeout_ms: 30_000,
            retention_interval_ms: DAY_MS,
            max_outbox_per_peer: 10_000,
            session_retry_ms: 5 * 60 * 1000,
            held_max_per_sender: MAX_HELD_PER_SENDER,
            held_max_bytes_per_sender: MAX_HELD_BYTES_PER_SENDER,
            held_max: MAX_HELD,
            held_max_bytes: MAX_HELD_BYTES,
            max_background_key_exchanges: MAX_BACKGROUND_KEY_EXCHANGES,
            max_invitations: MAX_INVITATIONS,
            max_invitations_per_admin: MAX_INVITATIONS_PER_ADMIN,
        }
    }
}

/// A request from the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Open (or find) the 1:1 conversation with a peer.
    CreateConversation {
        /// The peer.
        peer: PeerId,
    },
    /// Send a message in a 1:1 conversation.
    SendMessage {
        /// The conversation.
        conversation: ConversationId,
        /// The text.
        content: String,
    },
    /// Mark one incoming message read (and tell its sender).
    MarkMessageRead {
        /// The message.
        message: MessageId,
    },
    /// Mark every incoming message of a conversation read.
    MarkConversationRead {
        /// The conversation.
        conversation: ConversationId,
    },
    /// Delete a conversation and its messages.
    DeleteConversation {
        /// The conversation.
        conversation: ConversationId,
    },
    /// Send a failed message again, as a copy under a new ID.
    RetryMessage {
        /// The failed message.
        message: MessageId,
    },
    /// Start a fresh key exchange with a peer (replacing a broken session).
    InitiateKeyExchange {
        /// The peer.
        peer: PeerId,
    },
    /// Create a group with this node as admin.
    CreateGroup {
        /// Its display name.
        name: String,
        /// The other members (at least two).
        members: Vec<PeerId>,
    },
    /// Send a message to a group.
    SendGroupMessage {
        /// The group.
        group: ConversationId,
        /// The text.
        content: String,
    },
    /// Add a member (admin only).
    Invite {
        /// The group.
        group: ConversationId,
        /// The new member.
        peer: PeerId,
    },
    /// Leave a group.
    Leave {
        /// The group.
        group: ConversationId,
    },
    /// Join a group whose invitation waits for the user's answer.
    AcceptInvitation {
        /// The group.
        group: ConversationId,
    },
    /// Decline a waiting invitation: the admin is told, and nothing of the
    /// group is kept.
    DeclineInvitation {
        /// The group.
        group: ConversationId,
    },
}

/// What a command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// A conversation (created or found).
    Conversation(Conversation),
    /// A message (sent or retried).
    Message(Message),
    /// Nothing to return.
    Done,
}

/// A read for the API: answered from committed state, changing nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// Every conversation, most recently active first.
    Conversations,
    /// One conversation.
    Conversation(ConversationId),
    /// A page of a conversation's messages, newest first, older than
    /// `before` (a message of that conversation) if given.
    Messages {
        /// The conversation.
        conversation: ConversationId,
        /// Where the previous page ended.
        before: Option<MessageId>,
        /// At most this many (capped at [`MAX_PAGE`]).
        limit: usize,
    },
    /// One message.
    Message(MessageId),
    /// A group's members, including those who left.
    Members(ConversationId),
    /// Unread incoming messages over all conversations.
    UnreadTotal,
    /// Group invitations waiting for the user's answer, oldest first.
    Invitations,
}

/// The most messages one [`Query::Messages`] returns.
pub const MAX_PAGE: usize = 500;

/// A conversation with its newest message, as lists show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConversationSummary {
    /// The conversation.
    pub conversation: Conversation,
    /// Its newest message, if any.
    pub last_message: Option<Message>,
}

/// What a query found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Conversations.
    Conversations(Vec<ConversationSummary>),
    /// One conversation.
    Conversation(ConversationSummary),
    /// A page of messages, newest first.
    Messages {
        /// The page.
        messages: Vec<Message>,
        /// Whether older messages follow the page's last.
        more: bool,
    },
    /// One message.
    Message(Message),
    /// Group members.
    Members(Vec<Member>),
    /// A count.
    Unread(u64),
    /// Waiting group invitations.
    Invitations(Vec<Invitation>),
}

/// An input from the transport, the directory or the clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Bytes from a peer (whose ID the transport authenticated, or the relay vouched for).
    Received {
        /// The sender.
        from: PeerId,
        /// The envelope.
        bytes: Vec<u8>,
    },
    /// A path to the peer opened.
    PeerReachable(PeerId),
    /// The path to the peer closed.
    PeerUnreachable(PeerId),
    /// The directory knows how to reach the peer (answers a lookup).
    PeerRecord(PeerId),
    /// The directory does not know the peer (answers a lookup).
    LookupFailed(PeerId),
    /// What became of a transmit.
    TransmitResult {
        /// The transmit.
        id: TransmitId,
        /// Its fate.
        outcome: TransmitOutcome,
    },
    /// A deadline from [`Engine::poll_timeout`] passed.
    Timeout,
    /// Keep this peer record across restarts (the node's routing reads the
    /// kept records when it starts). One over [`MAX_KEPT_RECORD_BYTES`] is
    /// not kept.
    KeepRecord(KeptRecord),
}

/// One unit of work in a batch ([`Engine::handle_batch`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// A command, whose outcome the batch returns.
    Command(Command),
    /// An input.
    Input(Input),
}

/// Why a batch failed: nothing of it took effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {error}", match step { Some(i) => format!("step {i} of the batch failed"), None => "the batch's commit failed".into() })]
pub struct BatchError {
    /// The step that failed (the steps before it succeeded, and may be run
    /// again as a batch), or `None` if the work succeeded and the commit
    /// failed.
    pub step: Option<usize>,
    /// What went wrong.
    pub error: EngineError,
}

/// Identifies a transmit, for its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransmitId(pub u64);

/// What happened to a transmit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransmitOutcome {
    /// It reached the peer's node (the transport acknowledged it).
    Delivered,
    /// A relay accepted it into its mailbox for the offline peer.
    HeldByRelay,
    /// Neither the peer nor a relay took it, for now (the peer is offline,
    /// the relay's mailbox is full, the sender is over the relay's rate).
    /// It is tried again when the peer is reachable.
    Failed(String),
    /// Refused for good (the envelope is larger than the relay accepts):
    /// the message fails at once.
    Rejected(String),
}

/// Bytes to send to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// For the result.
    pub id: TransmitId,
    /// The recipient.
    pub peer: PeerId,
    /// The envelope.
    pub bytes: Vec<u8>,
    /// Whether a relay may hold it in a mailbox (never for key exchange).
    pub mailbox_allowed: bool,
}

/// Why a command or input failed. State is as it was before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The store failed; nothing was changed or sent.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored cryptographic state does not restore.
    #[error("stored state is unusable: {0}")]
    State(#[from] StateError),
    /// No such conversation.
    #[error("no conversation {0}")]
    UnknownConversation(ConversationId),
    /// No such message.
    #[error("no message {0}")]
    UnknownMessage(MessageId),
    /// Message content is empty.
    #[error("message content is empty")]
    EmptyContent,
    /// Message content is too long.
    #[error("message content is {len} bytes; the limit is {max}")]
    ContentTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command needs a 1:1 conversation.
    #[error("conversation {0} is not a 1:1 conversation")]
    NotOneOnOne(ConversationId),
    /// A node cannot converse with itself.
    #[error("a conversation needs another peer; {0} is this node")]
    SelfConversation(PeerId),
    /// Too much is already queued for the peer.
    #[error("the outbox for {peer} is full ({max} items); wait for the peer to come online")]
    OutboxFull {
        /// The peer.
        peer: PeerId,
        /// The limit.
        max: usize,
    },
    /// The command needs a group.
    #[error("conversation {0} is not a group")]
    NotAGroup(ConversationId),
    /// A group needs a name.
    #[error("a group needs a name")]
    EmptyGroupName,
    /// A group name over [`MAX_GROUP_NAME_LEN`].
    #[error("a group name may be at most {max} bytes long; this one is {len}")]
    GroupNameTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Too few members to create a group.
    #[error("a group needs at least {min} members besides its creator; {got} given")]
    TooFewMembers {
        /// The minimum.
        min: usize,
        /// How many distinct others were given.
        got: usize,
    },
    /// Too many members.
    #[error("a group has at most {max} members")]
    TooManyMembers {
        /// The limit.
        max: usize,
    },
    /// Only the admin may invite.
    #[error("only the group's admin ({admin}) may invite")]
    NotAdmin {
        /// The admin.
        admin: PeerId,
    },
    /// The peer is already a member.
    #[error("{0} is already a member of this group")]
    AlreadyMember(PeerId),
    /// Every other member has left: a message would reach no one.
    #[error("group {0} has no other members; invite someone before sending")]
    NoOtherMembers(ConversationId),
    /// This node has left the group.
    #[error("this node has left group {0}")]
    LeftGroup(ConversationId),
    /// No invitation to the group waits for an answer.
    #[error("no invitation to group {0} is waiting for an answer (it was answered, declined or expired)")]
    NoInvitation(ConversationId),
    /// The group's key state is unusable.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// The relay refused the envelope for good.
    #[error("refused by the relay: {0}")]
    Rejected(String),
    /// Only failed outgoing messages can be retried.
    #[error("message {id} is {status} and cannot be retried; only failed outgoing messages can")]
    NotRetryable {
        /// The message.
        id: MessageId,
        /// Its status.
        status: &'static str,
    },
}

/// Where a transmit's payload came from, to settle its result.
#[derive(Clone, Debug)]
struct InFlight {
    peer: PeerId,
    outbox_seq: Option<u64>,
    /// The pairwise copy sent, kept for the item if it reaches no one.
    copy: Option<SealedCopy>,
}

/// Outputs of the input being handled, released only after its commit.
#[derive(Default)]
struct Staged {
    transmits: Vec<Transmit>,
    lookups: Vec<PeerId>,
    events: Vec<Event>,
    in_flight: Vec<(TransmitId, InFlight)>,
    /// Transmits whose result this input settled.
    settled: Vec<TransmitId>,
    /// Peers whose outbox is sent once the transaction's work is done (with
    /// the latest time they were marked at): a batch of receipts or
    /// messages for one peer then leaves as few envelopes as possible,
    /// under one load and save of its sessions.
    to_pump: BTreeMap<PeerId, Timestamp>,
    /// Peers this input started a replacement key exchange with.
    rekeyed: Vec<(PeerId, Timestamp)>,
    /// When this input started one with a peer whose quiet session was swept.
    swept_rekey: Option<Timestamp>,
}

/// How soon a peer whose session we do not hold may make us start a new
/// key exchange again (see [`Engine::replace_unknown_session`]).
const REKEY_INTERVAL_MS: u64 = 60_000;

/// How soon a message under a swept session may start another re-key
/// (with any such peer: see [`Engine::replace_unknown_session`]).
const SWEPT_REKEY_INTERVAL_MS: u64 = 10_000;

/// One node's chat engine over a store `S`.
pub struct Engine<S: Store> {
    identity: IdentityKeyPair,
    store: S,
    config: EngineConfig,
    rng: Box<dyn CryptoRngCore + Send>,
    in_flight: BTreeMap<TransmitId, InFlight>,
    next_transmit: u64,
    next_deadline: Option<Timestamp>,
    staged: Staged,
    transmits: VecDeque<Transmit>,
    lookups: VecDeque<PeerId>,
    events: VecDeque<Event>,
    /// When each peer last made us replace its session: at most one such
    /// key exchange per [`REKEY_INTERVAL_MS`]. Kept in memory only: after
    /// a restart a peer gets one more.
    rekeyed: BTreeMap<PeerId, Timestamp>,
    /// When a peer whose quiet session was swept last made us re-key (in
    /// memory, like `rekeyed`).
    last_swept_rekey: Option<Timestamp>,
}

impl<S: Store> core::fmt::Debug for Engine<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Engine").field("peer_id", &self.identity.peer_id()).finish_non_exhaustive()
    }
}

impl<S: Store> Engine<S> {
    /// An engine over `store`. `rng` must be freshly seeded on every start
    /// (from the OS in the node, from the run's seed and the restart count
    /// in the simulator): a restarted engine that replayed its randomness
    /// would reuse ephemeral keys.
    pub fn new(
        identity: IdentityKeyPair,
        store: S,
        config: EngineConfig,
        rng: impl CryptoRngCore + Send + 'static,
        now: Timestamp,
    ) -> Result<Self, EngineError> {
        // Transmit IDs start at a random point, so a result that a previous
        // run's transmit gets after a restart cannot settle a new one.
        let mut rng: Box<dyn CryptoRngCore + Send> = Box::new(rng);
        let next_transmit = rng.next_u64() >> 1;
        let mut engine = Self {
            identity,
            store,
            rng,
            config: config.sanitized(),
            in_flight: BTreeMap::new(),
            next_transmit,
            next_deadline: None,
            staged: Staged::default(),
            transmits: VecDeque::new(),
            lookups: VecDeque::new(),
            events: VecDeque::new(),
            rekeyed: BTreeMap::new(),
            last_swept_rekey: None,
        };
        engine.transact(|e| {
            // Copies that were in flight when the node stopped are unknown:
            // send them again.
            for mut item in e.store.outbox()? {
                if item.in_flight {
                    item.in_flight = false;
                    item.next_attempt_at = Some(now);
                    e.store.put_outbox_item(&item)?;
                }
            }
            if e.store.retention_due()?.is_none() {
                e.store.set_retention_due(now.saturating_add_millis(e.config.retention_interval_ms))?;
            }
            Ok(())
        })?;
        Ok(engine)
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.identity.peer_id()
    }

    /// The store, for reads outside the engine (the API lists messages).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, mutably (for read transactions by the driver).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// The next transmit, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next peer to look up in the directory, if any.
    pub fn poll_lookup(&mut self) -> Option<PeerId> {
        self.lookups.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call `handle(now, Input::Timeout)` next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_deadline
    }

    /// Runs a command.
    pub fn command(&mut self, now: Timestamp, command: Command) -> Result<CommandOutcome, EngineError> {
        self.transact(|e| e.run_command(now, command))
    }

    /// Answers a read in a transaction of its own, which is rolled back:
    /// nothing changes and nothing is released.
    pub fn query(&mut self, query: Query) -> Result<Answer, EngineError> {
        self.store.begin()?;
        let answer = self.answer(query);
        self.store.rollback();
        answer
    }

    fn answer(&self, query: Query) -> Result<Answer, EngineError> {
        let summary = |conversation: Conversation| -> Result<ConversationSummary, EngineError> {
            let last_message = match &conversation.last_message_id {
                Some(id) => self.store.message(id)?,
                None => None,
            };
            Ok(ConversationSummary { conversation, last_message })
        };
        Ok(match query {
            Query::Conversations => {
                let mut all = self.store.conversations()?;
                all.sort_by(|a, b| {
                    let active = |c: &Conversation| c.last_message_at.unwrap_or(c.created_at).max(c.updated_at);
                    active(b).cmp(&active(a)).then_with(|| a.id.cmp(&b.id))
                });
                Answer::Conversations(all.into_iter().map(summary).collect::<Result<_, _>>()?)
            }
            Query::Conversation(id) => Answer::Conversation(summary(self.conversation(&id)?)?),
            Query::Messages { conversation, before, limit } => {
                self.conversation(&conversation)?;
                if let Some(before) = &before {
                    // A cursor from another conversation (or a deleted
                    // message) is a client's mistake, not an empty page.
                    match self.store.message(before)? {
                        Some(m) if m.conversation_id == conversation => {}
                        _ => return Err(EngineError::UnknownMessage(*before)),
                    }
                }
                let limit = limit.clamp(1, MAX_PAGE);
                // One more than asked tells whether another page follows.
                let mut messages = self.store.messages_page(&conversation, before.as_ref(), limit + 1)?;
                let more = messages.len() > limit;
                messages.truncate(limit);
                Answer::Messages { messages, more }
            }
            Query::Message(id) => Answer::Message(self.store.message(&id)?.ok_or(EngineError::UnknownMessage(id))?),
            Query::Members(id) => {
                let conversation = self.conversation(&id)?;
                if !matches!(conversation.kind, ConversationKind::Group { .. }) {
                    return Err(EngineError::NotAGroup(id));
                }
                Answer::Members(self.store.members(&id)?)
            }
            Query::UnreadTotal => {
                Answer::Unread(self.store.conversations()?.iter().map(|c| u64::from(c.unread_count)).sum())
            }
            Query::Invitations => Answer::Invitations(self.store.invitations()?),
        })
    }

    /// Handles an input.
    pub fn handle(&mut self, now: Timestamp, input: Input) -> Result<(), EngineError> {
        self.transact(|e| e.run_input(now, input))
    }

    /// Handles several commands and inputs, in order, in one store
    /// transaction (group commit): all of them take effect, or, if one fails
    /// or the commit fails, none does (and the caller may try them one by
    /// one). Returns each command's outcome, in order.
    pub fn handle_batch(
        &mut self,
        now: Timestamp,
        steps: impl IntoIterator<Item = Step>,
    ) -> Result<Vec<CommandOutcome>, BatchError> {
        let mut failed_at = None;
        self.transact(|e| {
            let mut outcomes = Vec::new();
            for (index, step) in steps.into_iter().enumerate() {
                failed_at = Some(index);
                match step {
                    Step::Command(command) => outcomes.push(e.run_command(now, command)?),
                    Step::Input(input) => e.run_input(now, input)?,
                }
            }
            failed_at = None;
            Ok(outcomes)
        })
        .map_err(|error| BatchError { step: failed_at, error })
    }

    /// One transaction: everything `f` stages is released only if the
    /// store commits.
    fn transact<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, EngineError>) -> Result<T, EngineError> {
        self.staged = Staged::default();
        self.store.begin()?;
        let result = f(self).and_then(|value| {
            self.pump_marked()?;
            Ok((value, self.compute_deadline()?))
        });
        match result {
            Ok((value, deadline)) => match self.store.commit() {
                Ok(()) => {
                    let staged = core::mem::take(&mut self.staged);
                    self.transmits.extend(staged.transmits);
                    self.lookups.extend(staged.lookups);
                    self.events.extend(staged.events);
                    self.in_flight.extend(staged.in_flight);
                    for id in staged.settled {
                        self.in_flight.remove(&id);
                    }
                    for (peer, at) in staged.rekeyed {
                        self.rekeyed.retain(|_, t| at.millis_since(*t) < REKEY_INTERVAL_MS);
                        self.rekeyed.insert(peer, at);
                    }
                    if staged.swept_rekey.is_some() {
                        self.last_swept_rekey = staged.swept_rekey;
                    }
                    self.next_deadline = deadline;
                    Ok(value)
                }
                Err(e) => {
                    // A failed COMMIT may leave the transaction open.
                    self.store.rollback();
                    self.staged = Staged::default();
                    Err(e.into())
                }
            },
            Err(e) => {
                self.store.rollback();
                self.staged = Staged::default();
                Err(e)
            }
        }
    }

    fn compute_deadline(&self) -> Result<Option<Timestamp>, EngineError> {
        let exchanges = self.store.next_key_exchange_deadline()?;
        Ok(exchanges.into_iter().chain(self.store.next_outbox_attempt()?).chain(self.store.retention_due()?).min())
    }

    fn run_command(&mut self, now: Timestamp, command: Command) -> Result<CommandOutcome, EngineError> {
        match command {
            Command::CreateConversation { peer } => {
                self.create_conversation(now, peer).map(CommandOutcome::Conversation)
            }
            Command::SendMessage { conversation, content } => {
                self.send_message(now, conversation, content).map(CommandOutcome::Message)
            }
            Command::MarkMessageRead { message } => {
                self.mark_read(now, &[message])?;
                Ok(CommandOutcome::Done)
            }
            Command::MarkConversationRead { conversation } => {
                self.conversation(&conversation)?;
                let me = self.peer_id();
                let unread: Vec<MessageId> = self
                    .store
                    .messages(&conversation)?
                    .into_iter()
                    .filter(|m| !m.is_outgoing(&me) && m.read_at.is_none())
                    .map(|m| m.id)
                    .collect();
                self.mark_read(now, &unread)?;
                Ok(CommandOutcome::Done)
            }
            Command::DeleteConversation { conversation } => {
                let existing = self.conversation(&conversation)?;
                if matches!(existing.kind, ConversationKind::Group { .. }) && !existing.left {
                    // The others must stop waiting for us and rotate.
                    self.leave(now, conversation)?;
                }
                let ids: BTreeSet<MessageId> = self.store.messages(&conversation)?.iter().map(|m| m.id).collect();
                for item in self.store.outbox()? {
                    if let Some(id) = item.payload.message_id() {
                        if ids.contains(&id) {
                            self.store.delete_outbox_item(item.seq)?;
                        }
                    }
                }
                self.store.delete_conversation(&conversation)?;
                self.staged.events.push(Event::ConversationsUpdated);
                Ok(CommandOutcome::Done)
            }
            Command::RetryMessage { message } => {
                let old = self.store.message(&message)?.ok_or(EngineError::UnknownMessage(message))?;
                if old.status != MessageStatus::Failed || !old.is_outgoing(&self.peer_id()) {
                    return Err(EngineError::NotRetryable { id: message, status: old.status.as_str() });
                }
                // The copy goes the way its conversation's messages go.
                let retried = match self.conversation(&old.conversation_id)?.kind {
                    ConversationKind::OneOnOne { .. } => self.send_message(now, old.conversation_id, old.content),
                    ConversationKind::Group { .. } => self.send_group_message(now, old.conversation_id, old.content),
                };
                retried.map(CommandOutcome::Message)
            }
            Command::CreateGroup { name, members } => {
                self.create_group(now, name, members).map(CommandOutcome::Conversation)
            }
            Command::SendGroupMessage { group, content } => {
                self.send_group_message(now, group, content).map(CommandOutcome::Message)
            }
            Command::Invite { group, peer } => {
                self.invite(now, group, peer)?;
                Ok(CommandOutcome::Done)
            }
            Command::Leave { group } => {
                self.leave(now, group)?;
                Ok(CommandOutcome::Done)
            }
            Command::AcceptInvitation { group } => {
                Ok(CommandOutcome::Conversation(self.accept_invitation(now, group)?))
            }
            Command::DeclineInvitation { group } => {
                self.decline_invitation(now, group)?;
                Ok(CommandOutcome::Done)
            }
            Command::InitiateKeyExchange { peer } => {
                if peer == self.peer_id() {
                    return Err(EngineError::SelfConversation(peer));
                }
                if self.store.key_exchange(&peer)?.is_none() {
                    self.start_key_exchange(now, peer, 1)?;
                }
                Ok(CommandOutcome::Done)
            }
        }
    }

    fn run_input(&mut self, now: Timestamp, input: Input) -> Result<(), EngineError> {
        match input {
            Input::Received { from, bytes } => self.receive(now, from, &bytes),
            Input::PeerReachable(peer) => {
                let attempt = self.store.key_exchange(&peer)?;
                // A reachable peer is worth trying at once, unless a request
                // is already out.
                if let Some(attempt) = attempt.filter(|a| a.backing_off) {
                    self.start_key_exchange(now, peer, attempt.attempts.saturating_add(1))?;
                }
                for mut item in self.store.outbox_waiting_for(&peer)? {
                    item.next_attempt_at = Some(now);
                    self.store.put_outbox_item(&item)?;
                }
                self.pump(now, peer)
            }
            Input::PeerUnreachable(_) => Ok(()),
            Input::PeerRecord(peer) => {
                let attempt = self.store.key_exchange(&peer)?;
                match attempt {
                    Some(attempt) if attempt.pending.is_none() && !attempt.backing_off => {
                        self.send_key_exchange_request(now, attempt)
                    }
                    _ => Ok(()),
                }
            }
            Input::LookupFailed(peer) => {
                let attempt = self.store.key_exchange(&peer)?;
                match attempt {
                    Some(attempt) if attempt.pending.is_none() && !attempt.backing_off => {
                        self.key_exchange_failed(now, attempt, "peer is unknown to the directory")
                    }
                    _ => Ok(()),
                }
            }
            Input::TransmitResult { id, outcome } => self.transmit_result(now, id, outcome),
            Input::Timeout => self.timeout(now),
            Input::KeepRecord(kept) => {
                if kept.record.len() > MAX_KEPT_RECORD_BYTES {
                    return Ok(());
                }
                self.store.put_kept_record(&kept)?;
                if self.store.kept_record_count()? > MAX_KEPT_RECORDS {
                    self.store.forget_kept_records(Timestamp(0), MAX_KEPT_RECORDS)?;
                }
                Ok(())
            }
        }
    }

    // ---- conversations and messages --------------------------------------

    fn conversation(&self, id: &ConversationId) -> Result<Conversation, EngineError> {
        self.store.conversation(id)?.ok_or(EngineError::UnknownConversation(*id))
    }

    fn create_conversation(&mut self, now: Timestamp, peer: PeerId) -> Result<Conversation, EngineError> {
        if peer == self.peer_id() {
            return Err(EngineError::SelfConversation(peer));
        }
        let id = ConversationId::for_peers(&self.peer_id(), &peer);
        if let Some(existing) = self.store.conversation(&id)? {
            // Group IDs are version 4 UUIDs and 1:1 IDs version 8, so this
            // holds; a store that says otherwise is corrupt.
            if existing.kind != (ConversationKind::OneOnOne { peer }) {
                return Err(EngineError::NotOneOnOne(id));
            }
            return Ok(existing);
        }
        let conversation = Conversation {
            id,
            kind: ConversationKind::OneOnOne { peer },
            created_at: now,
            updated_at: now,
            last_message_at: None,
            last_message_id: None,
            unread_count: 0,
            left: false,
        };
        self.store.put_conversation(&conversation)?;
        self.staged.events.push(Event::ConversationCreated(conversation.clone()));
        Ok(conversation)
    }

    fn send_message(&mut self, now: Timestamp, id: ConversationId, content: String) -> Result<Message, EngineError> {
        check_content(&content)?;
        let conversation = self.conversation(&id)?;
        let ConversationKind::OneOnOne { peer } = conversation.kind else {
            return Err(EngineError::NotOneOnOne(id));
        };
        let message_id = MessageId::random(&mut self.rng);
        let message = self.record_outgoing(now, conversation, message_id, content, &[peer], None)?;
        self.enqueue(now, peer, OutboxPayload::Chat(message.id))?;
        self.pump(now, peer)?;
        Ok(self.store.message(&message.id)?.unwrap_or(message))
    }

    /// Stores a message a peer wrote, counts it unread, and emits the events.
    pub(super) fn record_incoming(
        &mut self,
        now: Timestamp,
        mut conversation: Conversation,
        sender: PeerId,
        chat: ChatContent,
        group_position: Option<(u32, u32)>,
    ) -> Result<Message, EngineError> {
        let message = Message {
            id: chat.message_id,
            conversation_id: conversation.id,
            sender,
            content: chat.content,
            timestamp: chat.sent_at,
            status: MessageStatus::Delivered,
            sent_at: Some(chat.sent_at),
            delivered_at: Some(now),
            read_at: None,
            failure_reason: None,
            waiting_reason: None,
            recipients: Vec::new(),
            stored_at: now,
            group_position,
        };
        self.store.put_message(&message)?;
        conversation.unread_count = conversation.unread_count.saturating_add(1);
        conversation.last_message_at = Some(now);
        conversation.last_message_id = Some(message.id);
        conversation.updated_at = now;
        self.store.put_conversation(&conversation)?;
        self.staged.events.push(Event::MessageReceived(message.clone()));
        self.conversation_updated(conversation)?;
        Ok(message)
    }

    /// Stores a message this node wrote, updates its conversation and emits
    /// the events for both.
    pub(super) fn record_outgoing(
        &mut self,
        now: Timestamp,
        mut conversation: Conversation,
        id: MessageId,
        content: String,
        recipients: &[PeerId],
        group_position: Option<(u32, u32)>,
    ) -> Result<Message, EngineError> {
        let message = Message {
            id,
            conversation_id: conversation.id,
            sender: self.peer_id(),
            content,
            timestamp: now,
            status: MessageStatus::Created,
            sent_at: None,
            delivered_at: None,
            read_at: None,
            failure_reason: None,
            waiting_reason: None,
            recipients: recipients.iter().map(|p| (*p, MessageStatus::Created)).collect(),
            stored_at: now,
            group_position,
        };
        self.store.put_message(&message)?;
        conversation.last_message_at = Some(now);
        conversation.last_message_id = Some(id);
        conversation.updated_at = now;
        self.store.put_conversation(&conversation)?;
        self.staged.events.push(Event::MessageCreated(message.clone()));
        self.conversation_updated(conversation)?;
        Ok(message)
    }

    fn conversation_updated(&mut self, conversation: Conversation) -> Result<(), EngineError> {
        let members = match conversation.kind {
            ConversationKind::Group { .. } => self.store.members(&conversation.id)?,
            ConversationKind::OneOnOne { .. } => Vec::new(),
        };
        self.staged.events.push(Event::ConversationUpdated { conversation, members });
        Ok(())
    }

    fn mark_read(&mut self, now: Timestamp, ids: &[MessageId]) -> Result<(), EngineError> {
        let me = self.peer_id();
        let mut by_sender: BTreeMap<PeerId, Vec<MessageId>> = BTreeMap::new();
        let mut touched: BTreeMap<ConversationId, u32> = BTreeMap::new();
        for id in ids {
            let mut message = self.store.message(id)?.ok_or(EngineError::UnknownMessage(*id))?;
            if message.is_outgoing(&me) || message.read_at.is_some() {
                continue;
            }
            message.read_at = Some(now);
            message.status = MessageStatus::Read;
            self.store.put_message(&message)?;
            by_sender.entry(message.sender).or_default().push(message.id);
            *touched.entry(message.conversation_id).or_default() += 1;
        }
        for (conversation_id, count) in touched {
            let mut conversation = self.conversation(&conversation_id)?;
            conversation.unread_count = conversation.unread_count.saturating_sub(count);
            conversation.updated_at = now;
            self.store.put_conversation(&conversation)?;
            self.conversation_updated(conversation)?;
        }
        for (sender, message_ids) in by_sender {
            for chunk in message_ids.chunks(MAX_IDS_PER_PAYLOAD) {
                self.enqueue(now, sender, OutboxPayload::Read { message_ids: chunk.to_vec(), read_at: now })?;
            }
            self.pump(now, sender)?;
        }
        Ok(())
    }

    /// Moves an outgoing message's progress for one recipient forward (never
    /// back), and the message's own status to the least advanced recipient's.
    fn advance(
        &mut self,
        now: Timestamp,
        id: &MessageId,
        recipient: &PeerId,
        to: MessageStatus,
    ) -> Result<(), EngineError> {
        let Some(mut message) = self.store.message(id)? else { return Ok(()) };
        let Some(entry) = message.recipients.iter_mut().find(|(p, _)| p == recipient) else { return Ok(()) };
        if entry.1 == MessageStatus::Failed || entry.1 >= to {
            return Ok(());
        }
        entry.1 = to;
        self.settle_status(now, message)
    }

    /// No longer waits for `recipient` (it left the group): the message's
    /// status is settled by the others.
    pub(super) fn drop_recipient(
        &mut self,
        now: Timestamp,
        id: &MessageId,
        recipient: &PeerId,
        if_none_left: &str,
    ) -> Result<(), EngineError> {
        let Some(mut message) = self.store.message(id)? else { return Ok(()) };
        let before = message.recipients.len();
        message.recipients.retain(|(p, _)| p != recipient);
        if message.recipients.len() == before {
            return Ok(());
        }
        if message.recipients.is_empty() && message.status < MessageStatus::Delivered {
            // Nobody is left to deliver it to.
            self.store.put_message(&message)?;
            return self.fail_message(now, id, if_none_left);
        }
        self.settle_status(now, message)
    }

    /// A group message could not be queued for one recipient: the others
    /// carry on, and the message records why that one was skipped.
    pub(super) fn recipient_failed(
        &mut self,
        now: Timestamp,
        id: &MessageId,
        recipient: &PeerId,
        error: EngineError,
    ) -> Result<(), EngineError> {
        if !matches!(error, EngineError::OutboxFull { .. } | EngineError::Rejected(_)) {
            return Err(error);
        }
        let reason = format!("not sent to {recipient}: {error}");
        if let Some(mut message) = self.store.message(id)? {
            message.failure_reason = Some(reason.clone());
            self.store.put_message(&message)?;
        }
        self.drop_recipient(now, id, recipient, &reason)
    }

    /// Stores the message with its status moved up to the least advanced of
    /// its recipients (delivered when there are none left to wait for),
    /// never down, and never out of `failed`, with the events on the way.
    fn settle_status(&mut self, now: Timestamp, mut message: Message) -> Result<(), EngineError> {
        let overall = message.recipients.iter().map(|(_, s)| *s).min().unwrap_or(MessageStatus::Delivered);
        if message.status == MessageStatus::Failed || overall <= message.status {
            self.store.put_message(&message)?;
            return Ok(());
        }
        let id = message.id;
        let from = message.status;
        message.status = overall;
        let conversation_id = message.conversation_id;
        // Every state passed on the way gets its time: read implies delivered.
        if overall >= MessageStatus::Sent && message.sent_at.is_none() {
            message.sent_at = Some(now);
            if from < MessageStatus::Sent && overall == MessageStatus::Sent {
                self.staged.events.push(Event::MessageSent { message_id: id, conversation_id, timestamp: now });
            }
        }
        if overall >= MessageStatus::Delivered {
            message.waiting_reason = None;
        }
        if overall >= MessageStatus::Delivered && message.delivered_at.is_none() {
            message.delivered_at = Some(now);
            self.staged.events.push(Event::MessageDelivered { message_id: id, conversation_id, timestamp: now });
        }
        if overall == MessageStatus::Read && message.read_at.is_none() {
            message.read_at = Some(now);
            self.staged.events.push(Event::MessageRead { message_id: id, conversation_id, timestamp: now });
        }
        self.store.put_message(&message)?;
        Ok(())
    }

    pub(super) fn fail_message(&mut self, now: Timestamp, id: &MessageId, reason: &str) -> Result<(), EngineError> {
        let Some(mut message) = self.store.message(id)? else { return Ok(()) };
        if message.status >= MessageStatus::Delivered && message.status != MessageStatus::Failed {
            return Ok(());
        }
        if message.status == MessageStatus::Failed {
            return Ok(());
        }
        message.status = MessageStatus::Failed;
        message.failure_reason = Some(reason.to_owned());
        for entry in &mut message.recipients {
            if entry.1 < MessageStatus::Delivered {
                entry.1 = MessageStatus::Failed;
            }
        }
        self.store.put_message(&message)?;
        self.staged.events.push(Event::MessageFailed {
            message_id: *id,
            conversation_id: message.conversation_id,
            failure_reason: reason.to_owned(),
            timestamp: now,
        });
        Ok(())
    }

    // ---- the outbox --------------------------------------------------------

    /// Queues something for `peer`, within the per-peer limit.
    fn enqueue(&mut self, now: Timestamp, peer: PeerId, payload: OutboxPayload) -> Result<(), EngineError> {
        // Receipts and acks still waiting to go out absorb new ones.
        let mergeable = matches!(payload, OutboxPayload::Delivered(_) | OutboxPayload::Ack(_));
        let waiting = if mergeable { self.store.outbox_waiting_for(&peer)? } else { Vec::new() };
        for mut item in waiting {
            match (&mut item.payload, &payload) {
                (OutboxPayload::Delivered(ids), OutboxPayload::Delivered(more)) if ids.len() < MAX_IDS_PER_PAYLOAD => {
                    ids.extend(more.iter().filter(|m| !ids.contains(m)).copied().collect::<Vec<_>>());
                }
                (OutboxPayload::Ack(ids), OutboxPayload::Ack(more)) if ids.len() < MAX_IDS_PER_PAYLOAD => {
                    ids.extend(more.iter().filter(|m| !ids.contains(m)).copied().collect::<Vec<_>>());
                }
                _ => continue,
            }
            // The payload grew: a copy sealed before would leave the new IDs out.
            item.unsent_copy = None;
            item.next_attempt_at = Some(now);
            self.store.put_outbox_item(&item)?;
            return Ok(());
        }
        if self.store.outbox_len(&peer)? >= self.config.max_outbox_per_peer {
            return Err(EngineError::OutboxFull { peer, max: self.config.max_outbox_per_peer });
        }
        self.enqueue_unbounded(now, peer, payload)
    }

    fn enqueue_ack(&mut self, now: Timestamp, peer: PeerId, id: u64) -> Result<(), EngineError> {
        self.enqueue(now, peer, OutboxPayload::Ack(vec![id]))
    }

    /// Queues regardless of the limit: for what must always go out (a leave).
    pub(super) fn enqueue_unbounded(
        &mut self,
        now: Timestamp,
        peer: PeerId,
        payload: OutboxPayload,
    ) -> Result<(), EngineError> {
        let seq = self.store.next_seq()?;
        let item = OutboxItem {
            seq,
            peer,
            payload,
            queued_at: now,
            next_attempt_at: Some(now),
            in_flight: false,
            unsent_copy: None,
        };
        self.store.put_outbox_item(&item)?;
        Ok(())
    }

    fn load_sessions(&self, peer: &PeerId) -> Result<Option<PairwiseSessions>, EngineError> {
        match self.store.sessions(peer)? {
            Some(bytes) => Ok(Some(PairwiseSessions::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Marks `peer`'s outbox to be sent when the transaction's work is done
    /// (see [`Staged::to_pump`]).
    fn pump(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        let at = self.staged.to_pump.entry(peer).or_insert(now);
        *at = (*at).max(now);
        Ok(())
    }

    /// Sends the outboxes marked by [`Engine::pump`].
    fn pump_marked(&mut self) -> Result<(), EngineError> {
        while let Some((peer, now)) = self.staged.to_pump.pop_first() {
            self.pump_now(now, peer)?;
        }
        Ok(())
    }

    /// Sends whatever is due for `peer`, in order, or starts a key exchange
    /// if there is no session yet.
    fn pump_now(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        let due = self.store.outbox_due_for(&peer, now)?;
        if due.is_empty() {
            return Ok(());
        }
        let mut sessions = self.load_sessions(&peer)?;
        let mut needs_session = false;
        let mut chat_waits = false;
        // In queue order, so a sender key leaves before the group messages
        // it opens.
        for mut item in due {
            let bytes = if let OutboxPayload::Group { message_id } = &item.payload {
                // Already encrypted for the whole group: no pairwise session needed.
                let Some(envelope) = self.store.group_envelope(message_id)? else {
                    self.store.delete_outbox_item(item.seq)?; // its message is gone
                    continue;
                };
                envelope
            } else {
                let Some(sessions) = sessions.as_mut() else {
                    needs_session = true;
                    // Only a chat message the user sent to this peer: group
                    // copies are made for every waiting member at once
                    // (a roster may be invented), so they wait within the
                    // background cap like sender keys.
                    chat_waits |= matches!(item.payload, OutboxPayload::Chat(_));
                    item.next_attempt_at = None; // `release_waiting` sends it
                    self.store.put_outbox_item(&item)?;
                    continue;
                };
                let Some(payload) = self.payload_for(&item)? else {
                    self.store.delete_outbox_item(item.seq)?;
                    continue;
                };
                let session = sessions.current().id().0;
                let reusable = item
                    .unsent_copy
                    .take()
                    .filter(|copy| copy.session == session && now.millis_since(copy.sealed_at) < UNSENT_COPY_REUSE_MS);
                let copy = match reusable {
                    Some(copy) => copy,
                    None => match sessions.encrypt(&payload.encode(), &mut self.rng) {
                        Ok(message) => SealedCopy {
                            session,
                            sealed_at: now,
                            envelope: Envelope::new(EnvelopeBody::Ratchet(message)).encode(),
                        },
                        Err(_) => {
                            // An exhausted chain or a broken peer key: wait
                            // for a fresh session.
                            needs_session = true;
                            item.next_attempt_at = None;
                            self.store.put_outbox_item(&item)?;
                            continue;
                        }
                    },
                };
                item.in_flight = true;
                item.next_attempt_at = None;
                self.store.put_outbox_item(&item)?;
                self.transmit_copy(peer, copy, item.seq);
                continue;
            };
            item.in_flight = true;
            item.next_attempt_at = None;
            self.store.put_outbox_item(&item)?;
            self.transmit_bytes(peer, bytes, true, Some(item.seq));
        }
        if let Some(sessions) = &sessions {
            self.store.put_sessions(&peer, &sessions.to_bytes())?;
        }
        if needs_session {
            let attempt = self.store.key_exchange(&peer)?;
            // A new message deserves its own round of retries, not the slow
            // background ones left over from earlier failures.
            let spent = attempt.as_ref().is_some_and(|a| a.backing_off && a.attempts >= self.config.max_retries);
            let crowded = || -> Result<bool, EngineError> {
                Ok(self.store.key_exchange_count()? >= self.config.max_background_key_exchanges)
            };
            if attempt.is_none() && !chat_waits && crowded()? {
                // Nothing the user wrote waits for this peer: its items try
                // again later rather than add to the exchanges under way.
                let later = now.saturating_add_millis(self.config.confirmation_timeout_ms);
                for mut item in self.store.outbox_waiting_for(&peer)? {
                    if item.next_attempt_at.is_none() {
                        item.next_attempt_at = Some(later);
                        self.store.put_outbox_item(&item)?;
                    }
                }
            } else if attempt.is_none() || (chat_waits && spent) {
                self.start_key_exchange(now, peer, 1)?;
            }
        }
        Ok(())
    }

    fn payload_for(&self, item: &OutboxItem) -> Result<Option<PairwisePayload>, EngineError> {
        Ok(match &item.payload {
            OutboxPayload::Chat(id) => match self.store.message(id)? {
                Some(m) if m.status != MessageStatus::Failed => Some(PairwisePayload::Chat(ChatContent {
                    message_id: m.id,
                    sent_at: m.timestamp,
                    content: m.content,
                })),
                _ => None,
            },
            OutboxPayload::Delivered(ids) => Some(PairwisePayload::DeliveryReceipt { message_ids: ids.clone() }),
            OutboxPayload::Ack(ids) => Some(PairwisePayload::Ack { ids: ids.clone() }),
            OutboxPayload::Read { message_ids, read_at } => Some(tracked(
                item.seq,
                PairwisePayload::ReadReceipt { message_ids: message_ids.clone(), read_at: *read_at },
            )),
            OutboxPayload::Control(bytes) => match PairwisePayload::decode(bytes).ok() {
                Some(PairwisePayload::SessionConfirm) => Some(PairwisePayload::SessionConfirm),
                Some(payload) => Some(tracked(item.seq, payload)),
                None => None,
            },
            OutboxPayload::GroupCopy { message_id } => match self.store.message(message_id)? {
                Some(m) if m.status != MessageStatus::Failed => {
                    let (key_id, message_number) = m.group_position.unwrap_or_default();
                    Some(PairwisePayload::GroupChat {
                        group_id: m.conversation_id,
                        key_id,
                        message_number,
                        content: ChatContent { message_id: m.id, sent_at: m.timestamp, content: m.content },
                    })
                }
                _ => None,
            },
            OutboxPayload::Group { .. } => None,
        })
    }

    fn transmit(&mut self, peer: PeerId, body: EnvelopeBody, mailbox_allowed: bool, outbox_seq: Option<u64>) {
        self.transmit_bytes(peer, Envelope::new(body).encode(), mailbox_allowed, outbox_seq);
    }

    fn transmit_bytes(&mut self, peer: PeerId, bytes: Vec<u8>, mailbox_allowed: bool, outbox_seq: Option<u64>) {
        self.next_transmit += 1;
        let id = TransmitId(self.next_transmit);
        self.staged.transmits.push(Transmit { id, peer, bytes, mailbox_allowed });
        self.staged.in_flight.push((id, InFlight { peer, outbox_seq, copy: None }));
    }

    /// Sends outbox item `seq`'s pairwise copy, remembering it in case it
    /// reaches no one.
    fn transmit_copy(&mut self, peer: PeerId, copy: SealedCopy, seq: u64) {
        self.next_transmit += 1;
        let id = TransmitId(self.next_transmit);
        let transmit = Transmit { id, peer, bytes: copy.envelope.clone(), mailbox_allowed: true };
        self.staged.transmits.push(transmit);
        self.staged.in_flight.push((id, InFlight { peer, outbox_seq: Some(seq), copy: Some(copy) }));
    }

    fn transmit_result(&mut self, now: Timestamp, id: TransmitId, outcome: TransmitOutcome) -> Result<(), EngineError> {
        let Some(flight) = self.in_flight.get(&id).cloned() else { return Ok(()) };
        self.staged.settled.push(id);
        let Some(seq) = flight.outbox_seq else { return Ok(()) };
        let Some(mut item) = self.store.outbox_item(seq)? else { return Ok(()) };
        item.in_flight = false;
        // Only a copy that reached no one may go again as it is.
        item.unsent_copy = match outcome {
            TransmitOutcome::Failed(_) => flight.copy,
            _ => None,
        };
        if let TransmitOutcome::Rejected(reason) = &outcome {
            self.store.delete_outbox_item(seq)?;
            return match &item.payload {
                OutboxPayload::Chat(id) => self.fail_message(now, id, reason),
                OutboxPayload::Group { message_id } | OutboxPayload::GroupCopy { message_id } => {
                    self.recipient_failed(now, message_id, &flight.peer, EngineError::Rejected(reason.clone()))
                }
                _ => Ok(()),
            };
        }
        if is_tracked(&item.payload) {
            // Kept until the peer acknowledges it; sent again if it does not.
            item.next_attempt_at = Some(self.retry_at(now, item.queued_at, &outcome));
            self.store.put_outbox_item(&item)?;
            return Ok(());
        }
        let Some(message_id) = item.payload.message_id() else {
            // Delivery receipts, acks and session confirmations: done once a
            // peer or relay has them, and dropped if the transmit failed.
            // Either way a lost one is repaired by the other side, which
            // sends its message or tracked payload again until answered (and
            // a session confirmation's work is done by any later message).
            self.store.delete_outbox_item(seq)?;
            return Ok(());
        };
        // A chat message stays queued until its delivery confirmation.
        item.next_attempt_at = Some(self.retry_at(now, item.queued_at, &outcome));
        match outcome {
            TransmitOutcome::Delivered => {}
            TransmitOutcome::HeldByRelay | TransmitOutcome::Failed(_) | TransmitOutcome::Rejected(_) => {
                // Held by the relay, or in our outbox under an established
                // session: either way it is `sent`. Why it waits is
                // recorded for the user.
                self.advance(now, &message_id, &flight.peer, MessageStatus::Sent)?;
                let waiting = match &outcome {
                    TransmitOutcome::Failed(reason) => Some(reason.clone()),
                    _ => None,
                };
                if let Some(mut message) = self.store.message(&message_id)? {
                    if message.status == MessageStatus::Sent && message.waiting_reason != waiting {
                        message.waiting_reason = waiting;
                        self.store.put_message(&message)?;
                        self.staged.events.push(Event::MessageUpdated(message));
                    }
                }
            }
        }
        self.store.put_outbox_item(&item)?;
        Ok(())
    }

    /// When an item that needs the peer's confirmation goes again. Every
    /// such item has a time: one parked until "the peer shows up" would
    /// wait for ever if its only sign of life (a receipt, an ack) was lost.
    fn retry_at(&self, now: Timestamp, queued_at: Timestamp, outcome: &TransmitOutcome) -> Timestamp {
        let wait = match outcome {
            // The relay's mailbox delivers it when the peer returns; a copy
            // now and then covers a lost receipt without filling the mailbox.
            TransmitOutcome::HeldByRelay => {
                let base = self.config.confirmation_timeout_ms.saturating_mul(HELD_RETRY_FACTOR);
                let by_age = now.millis_since(queued_at).saturating_mul(HELD_RETRY_AGE_FACTOR);
                base.max(by_age).min(HELD_RETRY_MAX_MS.max(base))
            }
            TransmitOutcome::Delivered | TransmitOutcome::Failed(_) | TransmitOutcome::Rejected(_) => {
                self.config.confirmation_timeout_ms
            }
        };
        now.saturating_add_millis(wait)
    }

    fn timeout(&mut self, now: Timestamp) -> Result<(), EngineError> {
        for attempt in self.store.key_exchanges_due(now)? {
            if attempt.backing_off {
                self.start_key_exchange(now, attempt.peer, attempt.attempts.saturating_add(1))?;
            } else {
                let reason =
                    format!("key exchange timed out after {} seconds", self.config.key_exchange_timeout_ms / 1000);
                self.key_exchange_failed(now, attempt, &reason)?;
            }
        }
        for peer in self.store.peers_due(now)? {
            match self.pump_now(now, peer) {
                // One unreadable sessions row parks that peer's items (its
                // deadline must not stay in the past) and spares the others.
                Err(EngineError::State(e)) => {
                    for mut item in self.store.outbox_waiting_for(&peer)? {
                        item.next_attempt_at = None;
                        self.store.put_outbox_item(&item)?;
                    }
                    self.reject(peer, &format!("stored session is unusable: {e}"));
                }
                other => other?,
            }
        }
        if self.store.retention_due()?.is_some_and(|due| due <= now) {
            self.retention(now)?;
            self.store.set_retention_due(now.saturating_add_millis(self.config.retention_interval_ms))?;
        }
        Ok(())
    }

    /// Deletes messages past their TTL (failing those still undelivered
    /// first), skipped keys past seven days and peer records not seen for
    /// [`KEPT_RECORD_LIFETIME_MS`].
    fn retention(&mut self, now: Timestamp) -> Result<(), EngineError> {
        let cutoff = Timestamp(now.as_millis().saturating_sub(self.config.message_ttl_ms));
        let me = self.peer_id();
        let expired = self.store.messages_stored_before(cutoff)?;
        let expired_ids: BTreeSet<MessageId> = expired.iter().map(|m| m.id).collect();
        let mut touched = BTreeSet::new();
        for message in &expired {
            if message.is_outgoing(&me) && matches!(message.status, MessageStatus::Created | MessageStatus::Sent) {
                self.fail_message(now, &message.id, "expired undelivered")?;
            }
            self.store.delete_message(&message.id)?;
            touched.insert(message.conversation_id);
        }
        // Keep the unread count and last message true to what is left.
        for id in touched {
            let Some(mut conversation) = self.store.conversation(&id)? else { continue };
            let left = self.store.messages(&id)?;
            conversation.unread_count = left
                .iter()
                .filter(|m| !m.is_outgoing(&me) && m.read_at.is_none())
                .count()
                .try_into()
                .unwrap_or(u32::MAX);
            conversation.last_message_id = left.last().map(|m| m.id);
            conversation.last_message_at = left.last().map(|m| m.stored_at);
            self.store.put_conversation(&conversation)?;
        }
        for item in self.store.outbox()? {
            if item.payload.message_id().is_some_and(|id| expired_ids.contains(&id)) {
                self.store.delete_outbox_item(item.seq)?;
            }
        }
        for item in self.store.outbox()? {
            let control = item.payload.message_id().is_none();
            if control && item.queued_at < cutoff {
                self.store.delete_outbox_item(item.seq)?;
            }
        }
        self.sweep_quiet_sessions(cutoff)?;
        let records_cutoff = Timestamp(now.as_millis().saturating_sub(KEPT_RECORD_LIFETIME_MS));
        self.store.forget_kept_records(records_cutoff, MAX_KEPT_RECORDS)?;
        for peer in self.store.session_peers()? {
            // One unreadable row must not stop the sweep for everyone else.
            let Ok(Some(mut sessions)) = self.load_sessions(&peer) else { continue };
            if sessions.expire_skipped_keys(now) > 0 {
                self.store.put_sessions(&peer, &sessions.to_bytes())?;
            }
        }
        self.group_retention(now)
    }

    /// Deletes the sessions of peers not heard from since `cutoff` that
    /// nothing of the user's needs: no 1:1 conversation, no shared group, no
    /// waiting invitation, nothing queued, no key exchange under way. A
    /// stranger's key exchange costs it nothing but leaves us a session
    /// (with up to thousands of skipped keys); this is how those go. The
    /// record of when the peer was last heard from stays (up to
    /// [`MAX_QUIET_PEERS`]), so a message it sends later, under the session
    /// we dropped, starts a new key exchange rather than being lost.
    fn sweep_quiet_sessions(&mut self, cutoff: Timestamp) -> Result<(), EngineError> {
        let quiet = self.store.quiet_session_peers(cutoff)?;
        if !quiet.is_empty() {
            let needed = self.peers_we_talk_to()?;
            for peer in quiet {
                let in_use = needed.contains(&peer)
                    || self.store.invitation_count(Some(&peer))? > 0
                    || self.store.outbox_len(&peer)? > 0
                    || self.store.key_exchange(&peer)?.is_some();
                if !in_use {
                    self.store.delete_sessions(&peer)?;
                }
            }
        }
        self.store.forget_quiet_peers(MAX_QUIET_PEERS)?;
        Ok(())
    }

    /// The peers of our 1:1 conversations and the members of the groups we
    /// are in.
    fn peers_we_talk_to(&self) -> Result<BTreeSet<PeerId>, EngineError> {
        let mut peers = BTreeSet::new();
        for conversation in self.store.conversations()? {
            match conversation.kind {
                ConversationKind::OneOnOne { peer } => {
                    peers.insert(peer);
                }
                ConversationKind::Group { .. } if !conversation.left => {
                    let members = self.store.members(&conversation.id)?;
                    peers.extend(members.into_iter().filter(|m| m.left_at.is_none()).map(|m| m.peer_id));
                }
                ConversationKind::Group { .. } => {}
            }
        }
        Ok(peers)
    }

    // ---- key exchange --------------------------------------------------------

    /// Starts attempt number `attempts` with `peer`: a directory lookup first.
    /// The peer encrypts under a session we never completed (our ack or its
    /// request was lost, and our attempt gave up): without a new key
    /// exchange it would retransmit into the void for ever. Ours replaces
    /// its session, and its queued messages follow under the new one.
    ///
    /// Only for a peer we already talk to (a 1:1 conversation, or a member
    /// of a group we are in) or once held a session with (swept as quiet),
    /// and at most once a minute per peer. `peer` may
    /// be whatever a relay wrote on its frame, and identities cost nothing:
    /// anyone else would make us look up, and dial, whatever ID and record
    /// they chose.
    fn replace_unknown_session(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        let recently = self.rekeyed.get(&peer).is_some_and(|t| now.millis_since(*t) < REKEY_INTERVAL_MS)
            || self.staged.rekeyed.iter().any(|(p, _)| *p == peer);
        if recently || self.store.key_exchange(&peer)?.is_some() {
            return Ok(());
        }
        let mut attempts = 1;
        if !self.talks_to(&peer)? {
            // A peer whose quiet session we swept may write again. A relay
            // can name any of them, so these re-keys are few: one attempt
            // each (the peer's retransmission asks again), at most one
            // every SWEPT_REKEY_INTERVAL_MS in all, and only while the
            // background exchanges leave room.
            let swept = self.store.sessions(&peer)?.is_none() && self.store.last_heard(&peer)?.is_some();
            let too_soon = self.last_swept_rekey.is_some_and(|t| now.millis_since(t) < SWEPT_REKEY_INTERVAL_MS)
                || self.staged.swept_rekey.is_some();
            if !swept || too_soon || self.store.key_exchange_count()? >= self.config.max_background_key_exchanges {
                return Ok(());
            }
            self.staged.swept_rekey = Some(now);
            attempts = self.config.max_retries.saturating_add(1);
        }
        self.staged.rekeyed.push((peer, now));
        self.start_key_exchange(now, peer, attempts)
    }

    /// Whether we have a 1:1 conversation with `peer`, or share a group
    /// with it.
    fn talks_to(&self, peer: &PeerId) -> Result<bool, EngineError> {
        if self.store.conversation(&ConversationId::for_peers(&self.peer_id(), peer))?.is_some() {
            return Ok(true);
        }
        Ok(self.peers_we_talk_to()?.contains(peer))
    }

    fn start_key_exchange(&mut self, now: Timestamp, peer: PeerId, attempts: u32) -> Result<(), EngineError> {
        let attempt = KeyExchangeAttempt {
            peer,
            pending: None,
            attempts,
            deadline: now.saturating_add_millis(self.config.key_exchange_timeout_ms),
            backing_off: false,
        };
        self.store.put_key_exchange(&attempt)?;
        self.staged.lookups.push(peer);
        Ok(())
    }

    fn send_key_exchange_request(
        &mut self,
        now: Timestamp,
        mut attempt: KeyExchangeAttempt,
    ) -> Result<(), EngineError> {
        // Request timestamps strictly increase, even within one millisecond
        // or after the clock steps back a little, so a responder's freshness
        // mark never refuses a genuine new request as a replay. A mark
        // further ahead than any responder accepts came from a clock that
        // was wrong then: kept, it would make every request stale until
        // real time caught up with it, so it starts again from now.
        let at = match self.store.last_request_at()? {
            // Strictly within the skew: one past it would be stale.
            Some(last) if last >= now && last.millis_since(now) < handshake::MAX_REQUEST_CLOCK_SKEW_MS => {
                last.saturating_add_millis(1)
            }
            _ => now,
        };
        self.store.set_last_request_at(at)?;
        let (pending, request) = handshake::initiate(&self.identity, attempt.peer, at, &mut self.rng);
        attempt.pending = Some(pending.to_bytes().to_vec());
        attempt.deadline = now.saturating_add_millis(self.config.key_exchange_timeout_ms);
        self.store.put_key_exchange(&attempt)?;
        self.transmit(attempt.peer, EnvelopeBody::KeyExchangeRequest(request), false, None);
        Ok(())
    }

    fn key_exchange_failed(
        &mut self,
        now: Timestamp,
        mut attempt: KeyExchangeAttempt,
        reason: &str,
    ) -> Result<(), EngineError> {
        if attempt.attempts > self.config.max_retries {
            // Out of retries: chat messages waiting for this peer fail
            // (unless a session exists after all, e.g. a re-key failed);
            // receipts and control stay queued for a later session.
            self.store.delete_key_exchange(&attempt.peer)?;
            if self.store.sessions(&attempt.peer)?.is_some() {
                return Ok(());
            }
            for item in self.store.outbox_for(&attempt.peer)? {
                if let OutboxPayload::Chat(id) = &item.payload {
                    let waiting = self.store.message(id)?.is_some_and(|m| m.status == MessageStatus::Created);
                    if waiting {
                        self.fail_message(now, id, reason)?;
                        self.store.delete_outbox_item(item.seq)?;
                    }
                }
            }
            // What is still queued (receipts, sender keys, group notices)
            // must reach the peer one day. A peer behind a relay never shows
            // up as directly reachable, so try again now and then rather
            // than wait for that; each try is one more spent retry.
            if self.store.outbox_for(&attempt.peer)?.is_empty() {
                return Ok(());
            }
            let later = now.saturating_add_millis(self.config.session_retry_ms);
            let me = self.peer_id();
            if self.store.conversation(&ConversationId::for_peers(&me, &attempt.peer))?.is_none() {
                // A peer met only through a group (its roster is the admin's
                // word): no row waits for it, so its tries hold no place
                // among the exchanges under way; its items try again later,
                // within the background cap.
                for mut item in self.store.outbox_waiting_for(&attempt.peer)? {
                    item.next_attempt_at = Some(item.next_attempt_at.map_or(later, |t| t.max(later)));
                    self.store.put_outbox_item(&item)?;
                }
                return Ok(());
            }
            attempt.pending = None;
            attempt.backing_off = true;
            attempt.attempts = self.config.max_retries;
            attempt.deadline = later;
            self.store.put_key_exchange(&attempt)?;
            return Ok(());
        }
        let backoff = self.config.retry_backoff_ms.saturating_mul(1 << (attempt.attempts - 1).min(16));
        let jitter = self.rng.next_u64() % (self.config.retry_backoff_ms / 4).max(1);
        attempt.pending = None;
        attempt.backing_off = true;
        attempt.deadline = now.saturating_add_millis(backoff.saturating_add(jitter));
        self.store.put_key_exchange(&attempt)?;
        Ok(())
    }

    fn install_session(&mut self, now: Timestamp, peer: PeerId, session: crate::Session) -> Result<(), EngineError> {
        // Whichever side started it, a session now exists: our own attempt,
        // if any is still looking up or backing off, has nothing left to do.
        self.store.delete_key_exchange(&peer)?;
        let sessions = match self.load_sessions(&peer)? {
            Some(mut sessions) => match sessions.install(session) {
                Ok(()) => sessions,
                Err(e) => {
                    self.reject(peer, &e.to_string());
                    return Ok(());
                }
            },
            None => PairwiseSessions::new(session),
        };
        self.store.put_sessions(&peer, &sessions.to_bytes())?;
        self.store.note_heard(&peer, now)?;
        self.staged.events.push(Event::KeyExchangeComplete { peer_id: peer });
        self.release_waiting(now, peer)
    }

    fn on_request(&mut self, now: Timestamp, from: PeerId, request: &KeyExchangeRequest) -> Result<(), EngineError> {
        // The request is checked before it may cancel anything of ours: a
        // stale, replayed or forged request must not end our own attempt,
        // or the messages waiting for it would wait with nothing to wake them.
        let answered = self.store.answered_request(&from)?;
        let response = match handshake::respond(&self.identity, &from, request, answered.as_ref(), now, &mut self.rng) {
            Ok(response) => response,
            Err(e) => {
                self.reject(from, &e.to_string());
                return Ok(());
            }
        };
        let ours = self.store.key_exchange(&from)?.filter(|a| a.pending.is_some());
        if ours.is_some() && CrossedRequests::resolve(&self.peer_id(), &from) == CrossedRequests::KeepOurs {
            return Ok(());
        }
        match response {
            // Only the ack is sent again: a repeat starts nothing new, so it
            // cancels nothing of ours either.
            Response::Repeat(ack) => self.transmit(from, EnvelopeBody::KeyExchangeAck(ack), false, None),
            Response::New(accepted) => {
                if let Some(ours) = ours {
                    self.store.delete_key_exchange(&ours.peer)?;
                }
                let accepted = *accepted;
                self.store.put_answered_request(&from, &accepted.answered)?;
                // The ack goes out before anything encrypted under the session.
                self.transmit(from, EnvelopeBody::KeyExchangeAck(accepted.ack), false, None);
                self.install_session(now, from, accepted.session)?;
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, now: Timestamp, from: PeerId, ack: &KeyExchangeAck) -> Result<(), EngineError> {
        let attempt = self.store.key_exchange(&from)?;
        let Some(bytes) = attempt.as_ref().and_then(|a| a.pending.as_ref()) else {
            // No request of ours is waiting: a duplicate, or the loser of a crossing.
            return Ok(());
        };
        let pending = PendingKeyExchange::from_bytes(bytes)?;
        match pending.complete(ack) {
            Ok(session) => {
                self.enqueue(now, from, OutboxPayload::Control(PairwisePayload::SessionConfirm.encode().to_vec()))?;
                self.install_session(now, from, session)
            }
            Err(refused) => {
                self.reject(from, &refused.error.to_string());
                Ok(())
            }
        }
    }

    /// After a session appears, everything waiting for it goes out now.
    fn release_waiting(&mut self, now: Timestamp, peer: PeerId) -> Result<(), EngineError> {
        for mut item in self.store.outbox_waiting_for(&peer)? {
            item.next_attempt_at = Some(now);
            self.store.put_outbox_item(&item)?;
        }
        self.pump(now, peer)
    }

    fn reject(&mut self, peer: PeerId, reason: &str) {
        self.staged.events.push(Event::SecurityRejected { peer_id: peer, reason: reason.to_owned() });
    }

    // ---- receiving -----------------------------------------------------------

    fn receive(&mut self, now: Timestamp, from: PeerId, bytes: &[u8]) -> Result<(), EngineError> {
        match self.receive_envelope(now, from, bytes) {
            // What this peer's input wanted queued back to it does not fit:
            // it is dropped (the peer retransmits), the rest stands.
            Err(EngineError::OutboxFull { peer, .. }) => {
                self.reject(peer, "outbox for this peer is full; its input was only partly answered");
                Ok(())
            }
            other => other,
        }
    }

    fn receive_envelope(&mut self, now: Timestamp, from: PeerId, bytes: &[u8]) -> Result<(), EngineError> {
        let envelope = match Envelope::decode(bytes) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.reject(from, &e.to_string());
                return Ok(());
            }
        };
        match envelope.body {
            EnvelopeBody::KeyExchangeRequest(request) => self.on_request(now, from, &request),
            EnvelopeBody::KeyExchangeAck(ack) => self.on_ack(now, from, &ack),
            EnvelopeBody::Ratchet(message) => self.on_ratchet(now, from, &message),
            EnvelopeBody::Group(message) => self.on_group_message(now, from, bytes, message),
        }
    }

    fn on_ratchet(&mut self, now: Timestamp, from: PeerId, message: &RatchetMessage) -> Result<(), EngineError> {
        let Some(mut sessions) = self.load_sessions(&from)? else {
            self.reject(from, "message under a session this node does not hold");
            return self.replace_unknown_session(now, from);
        };
        let plaintext = match sessions.decrypt(message, now) {
            Ok(plaintext) => plaintext,
            // The same ciphertext again: a replay, a relay redelivering
            // its mailbox after a lost acknowledgement, or a sender's copy
            // that arrived although its transmit failed, sent again as it
            // was. It was handled once; this copy is refused, visibly, and
            // changes nothing.
            Err(e @ crate::DecryptionError::Duplicate { .. }) => {
                self.reject(from, &e.to_string());
                return Ok(());
            }
            Err(e @ crate::DecryptionError::UnknownSession) => {
                self.reject(from, &e.to_string());
                return self.replace_unknown_session(now, from);
            }
            Err(e) => {
                self.reject(from, &e.to_string());
                return Ok(());
            }
        };
        self.store.put_sessions(&from, &sessions.to_bytes())?;
        self.store.note_heard(&from, now)?;
        let payload = match PairwisePayload::decode(&plaintext) {
            Ok(payload) => payload,
            Err(e) => {
                self.reject(from, &e.to_string());
                return Ok(());
            }
        };
        self.on_payload(now, from, payload)?;
        // A message from the peer proves a path: what was parked waiting for
        // one (refused by a relay, or sent while the peer was offline) goes now.
        for mut item in self.store.outbox_waiting_for(&from)?.into_iter().filter(|i| i.next_attempt_at.is_none()) {
            item.next_attempt_at = Some(now);
            self.store.put_outbox_item(&item)?;
        }
        self.pump(now, from)
    }

    fn on_payload(&mut self, now: Timestamp, from: PeerId, payload: PairwisePayload) -> Result<Handled, EngineError> {
        match payload {
            PairwisePayload::Chat(chat) => self.on_chat(now, from, chat)?,
            PairwisePayload::Tracked { id, payload } => {
                // Handling is idempotent, so a repeat (our ack was lost) does
                // no harm; every handled copy is acknowledged. A payload that
                // cannot be handled yet (a key before its group's invite) is
                // not, so its sender sends it again later.
                if self.on_payload(now, from, *payload)? == Handled::Done {
                    self.enqueue_ack(now, from, id)?;
                }
            }
            PairwisePayload::Ack { ids } => {
                let ids: BTreeSet<u64> = ids.into_iter().take(MAX_IDS_PER_PAYLOAD).collect();
                for item in self.store.outbox_for(&from)? {
                    if !ids.contains(&item.seq) || !is_tracked(&item.payload) {
                        continue;
                    }
                    self.store.delete_outbox_item(item.seq)?;
                    if let OutboxPayload::Control(bytes) = &item.payload {
                        if let Ok(PairwisePayload::SenderKeyDistribution(d)) = PairwisePayload::decode(bytes) {
                            self.own_key_acknowledged(&from, &d)?;
                        }
                    }
                }
            }
            PairwisePayload::DeliveryReceipt { message_ids } => {
                let ids: BTreeSet<MessageId> = message_ids.into_iter().take(MAX_IDS_PER_PAYLOAD).collect();
                self.confirmed(now, from, &ids, MessageStatus::Delivered)?;
            }
            PairwisePayload::ReadReceipt { message_ids, .. } => {
                let ids: BTreeSet<MessageId> = message_ids.into_iter().take(MAX_IDS_PER_PAYLOAD).collect();
                self.confirmed(now, from, &ids, MessageStatus::Read)?;
            }
            PairwisePayload::SessionConfirm => {}
            PairwisePayload::SenderKeyDistribution(distribution) => {
                return self.on_distribution(now, from, &distribution);
            }
            PairwisePayload::SenderKeyRequest { group_id } => self.on_key_request(now, from, group_id)?,
            PairwisePayload::GroupControl(control) => return self.on_group_control(now, from, control),
            PairwisePayload::GroupChat { group_id, key_id, message_number, content } => {
                self.on_group_copy(now, from, group_id, (key_id, message_number), content)?
            }
        }
        Ok(Handled::Done)
    }

    fn on_chat(&mut self, now: Timestamp, from: PeerId, chat: ChatContent) -> Result<(), EngineError> {
        let message_id = chat.message_id;
        let conversation_id = ConversationId::for_peers(&self.peer_id(), &from);
        let known = self.store.message(&chat.message_id)?;
        if known.is_none() {
            if chat.content.len() > MAX_CONTENT_LEN {
                self.reject(from, "message content over the 64 KiB limit");
                return Ok(());
            }
            let conversation = match self.store.conversation(&conversation_id)? {
                Some(c) if c.kind == (ConversationKind::OneOnOne { peer: from }) => c,
                Some(_) => {
                    self.reject(from, "1:1 message for a conversation that is not a 1:1 with this peer");
                    return Ok(());
                }
                None => self.create_conversation(now, from)?,
            };
            self.record_incoming(now, conversation, from, chat, None)?;
        } else if known.is_some_and(|m| m.sender != from) {
            self.reject(from, "message ID already used by another sender");
            return Ok(());
        }
        // Confirm every copy, so a lost confirmation is repaired by the
        // sender's retransmission.
        self.enqueue(now, from, OutboxPayload::Delivered(vec![message_id]))
    }

    /// A delivery or read receipt from `from` for some of our messages.
    fn confirmed(
        &mut self,
        now: Timestamp,
        from: PeerId,
        ids: &BTreeSet<MessageId>,
        status: MessageStatus,
    ) -> Result<(), EngineError> {
        let me = self.peer_id();
        let mut settled = BTreeSet::new();
        for id in ids {
            let Some(message) = self.store.message(id)? else { continue };
            if !message.is_outgoing(&me) || !message.recipients.iter().any(|(p, _)| *p == from) {
                self.reject(from, "receipt for a message that was not sent to this peer");
                continue;
            }
            // A receipt does not show the member holds our current sender
            // key: it may confirm a copy sealed under an older one, or one
            // sent over the pairwise session. Only its ack of the key does.
            self.advance(now, id, &from, status)?;
            settled.insert(*id);
        }
        if settled.is_empty() {
            return Ok(());
        }
        // One pass over the peer's outbox for the whole receipt.
        for item in self.store.outbox_for(&from)? {
            let confirmed = item.payload.message_id().is_some_and(|m| settled.contains(&m));
            if item.peer == from && confirmed {
                self.store.delete_outbox_item(item.seq)?;
            }
        }
        Ok(())
    }
}

/// Whether an outbox item is sent as [`PairwisePayload::Tracked`] and kept
/// until acknowledged: group control, sender keys and read receipts.
fn is_tracked(payload: &OutboxPayload) -> bool {
    match payload {
        OutboxPayload::Read { .. } => true,
        OutboxPayload::Control(bytes) => !matches!(PairwisePayload::decode(bytes), Ok(PairwisePayload::SessionConfirm)),
        _ => false,
    }
}

fn tracked(id: u64, payload: PairwisePayload) -> PairwisePayload {
    PairwisePayload::Tracked { id, payload: Box::new(payload) }
}

/// Refuses empty content and content over [`MAX_CONTENT_LEN`].
pub(super) fn check_content(content: &str) -> Result<(), EngineError> {
    if content.is_empty() {
        return Err(EngineError::EmptyContent);
    }
    if content.len() > MAX_CONTENT_LEN {
        return Err(EngineError::ContentTooLarge { len: content.len(), max: MAX_CONTENT_LEN });
    }
    Ok(())
}
