//! What the engine tells the API: the reference's WebSocket events, and
//! the engine's own additions.

use super::model::{Conversation, Member, Message};
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::time::Timestamp;

/// An event for the API layer. `kind()` is its WebSocket `type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `chat.conversation.created`
    ConversationCreated(Conversation),
    /// `chat.conversation.updated`; for groups, with the member list.
    ConversationUpdated {
        /// The conversation as it is now.
        conversation: Conversation,
        /// Group members (empty for 1:1).
        members: Vec<Member>,
    },
    /// `chat.conversations.updated`: the list changed (e.g. a deletion).
    ConversationsUpdated,
    /// `chat.message.created`: an outgoing message was stored.
    MessageCreated(Message),
    /// `chat.message.received`: an incoming message was stored.
    MessageReceived(Message),
    /// `chat.message.sent`
    MessageSent {
        /// The message.
        message_id: MessageId,
        /// Its conversation.
        conversation_id: ConversationId,
        /// When it reached `sent`.
        timestamp: Timestamp,
    },
    /// `chat.message.updated` (beyond the reference): a `sent` message's
    /// `waiting_reason` changed (e.g. the relay's mailbox is full).
    MessageUpdated(Message),
    /// `chat.message.delivered`
    MessageDelivered {
        /// The message.
        message_id: MessageId,
        /// Its conversation.
        conversation_id: ConversationId,
        /// When it reached `delivered`.
        timestamp: Timestamp,
    },
    /// `chat.message.read`
    MessageRead {
        /// The message.
        message_id: MessageId,
        /// Its conversation.
        conversation_id: ConversationId,
        /// When it reached `read`.
        timestamp: Timestamp,
    },
    /// `chat.message.failed`
    MessageFailed {
        /// The message.
        message_id: MessageId,
        /// Its conversation.
        conversation_id: ConversationId,
        /// Why.
        failure_reason: String,
        /// When it failed.
        timestamp: Timestamp,
    },
    /// `chat.group.invite`: this node was added to a group, or (`pending`)
    /// an invitation waits for the user to accept or decline it.
    GroupInvite {
        /// The group.
        conversation_id: ConversationId,
        /// Its name.
        group_name: String,
        /// The admin who invited.
        invited_by: PeerId,
        /// Whether the invitation waits for the user's answer (the node
        /// has not joined); `false` once it has joined.
        pending: bool,
    },
    /// `chat.key_exchange.complete`
    KeyExchangeComplete {
        /// The peer.
        peer_id: PeerId,
    },
    /// `chat.security.rejected`: hostile or broken input was refused.
    SecurityRejected {
        /// Who sent it.
        peer_id: PeerId,
        /// What was wrong.
        reason: String,
    },
}

impl Event {
    /// The WebSocket event type.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ConversationCreated(_) => "chat.conversation.created",
            Self::ConversationUpdated { .. } => "chat.conversation.updated",
            Self::ConversationsUpdated => "chat.conversations.updated",
            Self::MessageCreated(_) => "chat.message.created",
            Self::MessageReceived(_) => "chat.message.received",
            Self::MessageSent { .. } => "chat.message.sent",
            Self::MessageUpdated(_) => "chat.message.updated",
            Self::MessageDelivered { .. } => "chat.message.delivered",
            Self::MessageRead { .. } => "chat.message.read",
            Self::MessageFailed { .. } => "chat.message.failed",
            Self::GroupInvite { .. } => "chat.group.invite",
            Self::KeyExchangeComplete { .. } => "chat.key_exchange.complete",
            Self::SecurityRejected { .. } => "chat.security.rejected",
        }
    }
}
