//! What goes into the engine and what comes out: the API's commands and
//! queries with their answers, the transport's inputs, and the transmits
//! the engine asks for.

use serde::{Deserialize, Serialize};

use super::{Conversation, EngineError, Invitation, KeptRecord, Member, Message};
use crate::ids::{ConversationId, MessageId, PeerId};

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
    /// A deadline from [`Engine::poll_timeout`](crate::engine::Engine::poll_timeout) passed.
    Timeout,
    /// Keep this peer record across restarts (the node's routing reads the
    /// kept records when it starts). One over [`MAX_KEPT_RECORD_BYTES`](crate::engine::MAX_KEPT_RECORD_BYTES) is
    /// not kept.
    KeepRecord(KeptRecord),
}

/// One unit of work in a batch ([`Engine::handle_batch`](crate::engine::Engine::handle_batch)).
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
    /// Neither the peer nor a relay took it, for now. It is tried again
    /// when the peer is reachable.
    Failed(SendFailure),
    /// A relay refused it for good (it is larger than the relay accepts):
    /// the message fails at once.
    Rejected(Refusal),
}

/// Why a transmit reached neither the peer nor a relay, for now. Shown to
/// the user as a message's waiting reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendFailure {
    /// No direct connection to the peer and no relay connected.
    #[error("no direct connection and no relay connected")]
    NoPath,
    /// The direct connection to the peer is full: the peer reads more
    /// slowly than this node sends.
    #[error("the peer reads more slowly than this node sends")]
    PeerSlow,
    /// No connection to the peer is open.
    #[error("no open connection to the peer")]
    NoConnection,
    /// Dialling the peer failed, for the reason given.
    #[error("{0}")]
    DialFailed(String),
    /// The connection to the peer closed before the peer acknowledged it.
    #[error("the connection to the peer closed")]
    ConnectionClosed,
    /// The peer refused our connection, being over the limit named.
    #[error("the peer refused our connection ({0})")]
    PeerRefused(String),
    /// The transport reports that the peer never acknowledged it.
    #[error("no acknowledgement from the peer")]
    Unacknowledged,
    /// The peer did not acknowledge it in time.
    #[error("no answer from the peer within {seconds} s")]
    PeerDidNotAnswer {
        /// How long we waited.
        seconds: u64,
    },
    /// The transport could not send it, in its words.
    #[error("sending failed: {0}")]
    Transport(String),
    /// A relay refused it, for now.
    #[error("{}", .0.as_str())]
    Relay(Refusal),
    /// The relay did not answer in time.
    #[error("the relay did not answer within {seconds} s")]
    RelayDidNotAnswer {
        /// How long we waited.
        seconds: u64,
    },
    /// The connection to the relay closed before it answered.
    #[error("the relay connection closed")]
    RelayClosed,
    /// The relay serving the peer cannot be reached, and why.
    #[error("cannot reach the peer's relay: {0}")]
    RelayUnreachable(String),
    /// The queue to the relay is full.
    #[error("the queue to the relay is full")]
    RelayQueueFull,
}

/// Why a relay refused to forward or hold an envelope. It travels in relay
/// frames (docs/PROTOCOL.md); the engine sees it in a transmit's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The recipient's mailbox is full (count or bytes). Try again later.
    Quota,
    /// The sender is over its rate limit. Try again later.
    Rate,
    /// The envelope is larger than the relay accepts. Permanent.
    TooLarge,
    /// The recipient is not connected and the envelope may not be held
    /// (a key exchange message). Try again when it is reachable.
    RecipientOffline,
    /// The sender has not registered. Register first.
    NotRegistered,
    /// The relay has no valid record of the recipient, so it holds no
    /// mailbox for it. Try again later (the peer may publish one).
    UnknownRecipient,
}

impl Refusal {
    /// Whether trying again can succeed.
    pub fn is_permanent(self) -> bool {
        matches!(self, Self::TooLarge)
    }

    /// The reason as shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quota => "the relay's mailbox for this peer is full",
            Self::Rate => "sending too fast for the relay's rate limit",
            Self::TooLarge => "the envelope is larger than the relay accepts",
            Self::RecipientOffline => "the peer is offline and this message cannot wait in a mailbox",
            Self::NotRegistered => "not registered with the relay",
            Self::UnknownRecipient => "the relay does not know this peer",
        }
    }
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
