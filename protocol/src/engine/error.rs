//! Why a command or input failed: the caller's mistakes, each saying what
//! to change, apart from failures inside the node (the store, corrupt
//! state), which the caller can only report.

use super::StoreError;
use crate::group::GroupError;
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::state::StateError;

/// Why a command or input failed. State is as it was before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be done as asked; the error says what to change.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Something inside the node failed; nothing was changed or sent.
    #[error(transparent)]
    Internal(#[from] InternalError),
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        Self::Internal(InternalError::Store(e))
    }
}

impl From<StateError> for EngineError {
    fn from(e: StateError) -> Self {
        Self::Internal(InternalError::State(e))
    }
}

impl From<GroupError> for EngineError {
    fn from(e: GroupError) -> Self {
        Self::Internal(InternalError::Group(e))
    }
}

/// A failure inside the node: not the caller's doing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InternalError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored cryptographic state does not restore.
    #[error("stored state is unusable: {0}")]
    State(#[from] StateError),
    /// The group's key state is unusable.
    #[error(transparent)]
    Group(#[from] GroupError),
}

/// A request that cannot be done as asked: an unknown ID, content out of
/// bounds, a rule of groups, a full outbox. The API answers each with a
/// status and code of its own (4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
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
    /// A group name over [`MAX_GROUP_NAME_LEN`](crate::engine::MAX_GROUP_NAME_LEN).
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
    /// Only failed outgoing messages can be retried.
    #[error("message {id} is {status} and cannot be retried; only failed outgoing messages can")]
    NotRetryable {
        /// The message.
        id: MessageId,
        /// Its status.
        status: &'static str,
    },
}
