//! The JSON shapes of the API, as `docs/API.md` gives them: the
//! reference's field names, times in Unix seconds, `0` for a time not
//! reached yet (as the reference's `read_at` and `left_at`).

use p2pchat_protocol::engine::{ConversationKind, ConversationSummary, Event, Invitation, Member, Message};
use p2pchat_protocol::{PeerId, Timestamp};
use serde::{Deserialize, Serialize};

fn secs(t: Timestamp) -> u64 {
    t.as_secs()
}

fn secs_or_zero(t: Option<Timestamp>) -> u64 {
    t.map_or(0, secs)
}

/// `ChatMessage`.
#[derive(Clone, Debug, Serialize)]
pub struct MessageView {
    /// Its ID.
    pub message_id: String,
    /// Its conversation.
    pub conversation_id: String,
    /// Its author.
    pub sender_peer_id: String,
    /// The text.
    pub content: String,
    /// The author's clock when written.
    pub timestamp: u64,
    /// `created`, `sent`, `delivered`, `read` or `failed`.
    pub status: &'static str,
    /// When it reached `sent` (outgoing) or arrived (incoming); `0` not yet.
    pub sent_at: u64,
    /// When it reached `delivered`; `0` not yet.
    pub delivered_at: u64,
    /// When it reached `read`; `0` not yet.
    pub read_at: u64,
    /// Whether this node wrote it.
    pub is_outgoing: bool,
    /// Why it failed, for `failed` messages.
    pub failure_reason: Option<String>,
    /// Why a `sent` message still waits, when known.
    pub waiting_reason: Option<String>,
}

impl MessageView {
    /// The view of `m`, as node `me` sees it.
    pub fn new(m: &Message, me: &PeerId) -> Self {
        Self {
            message_id: m.id.to_string(),
            conversation_id: m.conversation_id.to_string(),
            sender_peer_id: m.sender.to_string(),
            content: m.content.clone(),
            timestamp: secs(m.timestamp),
            status: m.status.as_str(),
            sent_at: secs_or_zero(m.sent_at),
            delivered_at: secs_or_zero(m.delivered_at),
            read_at: secs_or_zero(m.read_at),
            is_outgoing: m.is_outgoing(me),
            failure_reason: m.failure_reason.clone(),
            waiting_reason: m.waiting_reason.clone(),
        }
    }
}

/// `ChatConversation`.
#[derive(Clone, Debug, Serialize)]
pub struct ConversationView {
    /// Its ID.
    pub conversation_id: String,
    /// `1on1` or `group`.
    pub conversation_type: &'static str,
    /// The other peer, for 1:1.
    pub peer_id: Option<String>,
    /// The name, for groups.
    pub group_name: Option<String>,
    /// The admin, for groups.
    pub admin_peer_id: Option<String>,
    /// When created or joined here.
    pub created_at: u64,
    /// When anything about it last changed.
    pub updated_at: u64,
    /// When its newest message was stored; `0` none yet.
    pub last_message_at: u64,
    /// Incoming messages not yet read.
    pub unread_count: u32,
    /// Whether this node has left the group.
    pub left: bool,
    /// Its newest message.
    pub last_message: Option<MessageView>,
}

impl ConversationView {
    /// The view of a conversation and its newest message.
    pub fn new(summary: &ConversationSummary, me: &PeerId) -> Self {
        let c = &summary.conversation;
        let (conversation_type, peer_id, group_name, admin_peer_id) = match &c.kind {
            ConversationKind::OneOnOne { peer } => ("1on1", Some(peer.to_string()), None, None),
            ConversationKind::Group { name, admin } => ("group", None, Some(name.clone()), Some(admin.to_string())),
        };
        Self {
            conversation_id: c.id.to_string(),
            conversation_type,
            peer_id,
            group_name,
            admin_peer_id,
            created_at: secs(c.created_at),
            updated_at: secs(c.updated_at),
            last_message_at: secs_or_zero(c.last_message_at),
            unread_count: c.unread_count,
            left: c.left,
            last_message: summary.last_message.as_ref().map(|m| MessageView::new(m, me)),
        }
    }
}

/// `ChatGroupMember`.
#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    /// The group.
    pub conversation_id: String,
    /// The member.
    pub peer_id: String,
    /// When it joined.
    pub joined_at: u64,
    /// Whether it is the admin.
    pub is_admin: bool,
    /// When it left; `0` still a member.
    pub left_at: u64,
}

impl MemberView {
    /// The view of one member of `group`.
    pub fn new(group: &str, m: &Member) -> Self {
        Self {
            conversation_id: group.to_owned(),
            peer_id: m.peer_id.to_string(),
            joined_at: secs(m.joined_at),
            is_admin: m.is_admin,
            left_at: secs_or_zero(m.left_at),
        }
    }
}

/// One entry of `GET /api/chat/invitations`.
#[derive(Clone, Debug, Serialize)]
pub struct InvitationView {
    /// The group.
    pub conversation_id: String,
    /// Its name.
    pub group_name: String,
    /// Its admin, who invited.
    pub invited_by: String,
    /// Every member the admin listed, this node and the admin included.
    pub members: Vec<String>,
    /// When the admin created the group.
    pub created_at: u64,
    /// When the invitation arrived.
    pub received_at: u64,
}

impl InvitationView {
    /// The view of a waiting invitation.
    pub fn new(invitation: &Invitation) -> Self {
        Self {
            conversation_id: invitation.group_id.to_string(),
            group_name: invitation.name.clone(),
            invited_by: invitation.admin.to_string(),
            members: invitation.members.iter().map(|m| m.peer_id.to_string()).collect(),
            created_at: secs(invitation.created_at),
            received_at: secs(invitation.received_at),
        }
    }
}

/// `POST /api/chat/conversations` and `POST /api/chat/key-exchange`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRequest {
    /// The peer.
    pub peer_id: String,
}

/// `POST .../messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// The text.
    pub content: String,
}

/// `POST /api/chat/groups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRequest {
    /// The name.
    pub group_name: String,
    /// The other members' peer IDs.
    pub members: Vec<String>,
}

/// A WebSocket event: `{"type": ..., "payload": ...}`.
#[derive(Debug, Serialize)]
pub struct EventView {
    /// The event type.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Its fields.
    pub payload: serde_json::Value,
}

impl EventView {
    /// The view of an event, as node `me` sees it.
    pub fn new(event: &Event, me: &PeerId) -> Self {
        use serde_json::json;
        let payload = match event {
            Event::ConversationCreated(c) => {
                let summary = ConversationSummary { conversation: c.clone(), last_message: None };
                json!(ConversationView::new(&summary, me))
            }
            Event::ConversationUpdated { conversation, members } => {
                let summary = ConversationSummary { conversation: conversation.clone(), last_message: None };
                let id = conversation.id.to_string();
                let mut value = json!(ConversationView::new(&summary, me));
                if let Some(object) = value.as_object_mut() {
                    object.insert(
                        "members".into(),
                        json!(members.iter().map(|m| MemberView::new(&id, m)).collect::<Vec<_>>()),
                    );
                }
                value
            }
            Event::ConversationsUpdated => json!({}),
            Event::MessageCreated(m) | Event::MessageReceived(m) | Event::MessageUpdated(m) => {
                json!(MessageView::new(m, me))
            }
            Event::MessageSent { message_id, conversation_id, timestamp }
            | Event::MessageDelivered { message_id, conversation_id, timestamp }
            | Event::MessageRead { message_id, conversation_id, timestamp } => json!({
                "message_id": message_id.to_string(),
                "conversation_id": conversation_id.to_string(),
                "timestamp": secs(*timestamp),
            }),
            Event::MessageFailed { message_id, conversation_id, failure_reason, timestamp } => json!({
                "message_id": message_id.to_string(),
                "conversation_id": conversation_id.to_string(),
                "failure_reason": failure_reason,
                "timestamp": secs(*timestamp),
            }),
            Event::GroupInvite { conversation_id, group_name, invited_by, pending } => json!({
                "conversation_id": conversation_id.to_string(),
                "group_name": group_name,
                "invited_by": invited_by.to_string(),
                "pending": pending,
            }),
            Event::KeyExchangeComplete { peer_id } => json!({ "peer_id": peer_id.to_string() }),
            Event::SecurityRejected { peer_id, reason } => json!({
                "peer_id": peer_id.to_string(),
                "reason": reason,
            }),
        };
        Self { kind: event.kind(), payload }
    }
}
