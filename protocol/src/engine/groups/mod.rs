//! Groups: creation, invites, leaves, Sender Keys over the pairwise
//! sessions, and group messages (held while their sender's key is missing).
//!
//! This module holds the group commands (create, send, invite, leave) and
//! the helpers the others share; `membership` handles rosters and leaves
//! that peers send, `invitations` the invitations waiting for the user's
//! answer (accepting and declining included), `messages` sender keys,
//! group messages and their expiry.

mod invitations;
mod membership;
mod messages;

use std::collections::BTreeSet;

use super::commands::check_content;
use super::{
    ControlPayload, Conversation, ConversationKind, Engine, EngineError, Event, Member, Message, MessageStatus,
    OutboxPayload, RequestError, Store, MAX_GROUP_NAME_LEN, MIN_GROUP_OTHERS,
};
use crate::group::{GroupSession, MAX_GROUP_MEMBERS};
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::time::Timestamp;
use crate::wire::{ChatContent, Envelope, EnvelopeBody, GroupControl, RosterEntry};

impl<S: Store> Engine<S> {
    fn load_group(&self, id: &ConversationId) -> Result<Option<GroupSession>, EngineError> {
        match self.store.group_keys(id)? {
            Some(bytes) => Ok(Some(GroupSession::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    fn save_group(&mut self, group: &GroupSession) -> Result<(), EngineError> {
        self.store.put_group_keys(&group.group_id(), &group.to_bytes())?;
        Ok(())
    }

    /// A group this node is in: its conversation, admin and keys.
    fn joined_group(&self, id: &ConversationId) -> Result<(Conversation, PeerId, GroupSession), EngineError> {
        let conversation = self.conversation(id)?;
        let ConversationKind::Group { admin, .. } = conversation.kind else {
            return Err(RequestError::NotAGroup(*id).into());
        };
        if conversation.left {
            return Err(RequestError::LeftGroup(*id).into());
        }
        let group = self.load_group(id)?.ok_or(RequestError::LeftGroup(*id))?;
        Ok((conversation, admin, group))
    }

    /// Current members (not left), this node included.
    fn current_members(&self, id: &ConversationId) -> Result<Vec<Member>, EngineError> {
        Ok(self.store.members(id)?.into_iter().filter(|m| m.left_at.is_none()).collect())
    }

    fn others(&self, id: &ConversationId) -> Result<Vec<PeerId>, EngineError> {
        let me = self.peer_id();
        Ok(self.current_members(id)?.into_iter().map(|m| m.peer_id).filter(|p| *p != me).collect())
    }

    fn enqueue_control(&mut self, now: Timestamp, peer: PeerId, control: &ControlPayload) -> Result<(), EngineError> {
        self.enqueue(now, peer, OutboxPayload::Control(control.clone()))
    }

    fn send_own_key(&mut self, now: Timestamp, group: &GroupSession, peer: PeerId) -> Result<(), EngineError> {
        self.enqueue_control(now, peer, &ControlPayload::SenderKey(group.distribution_for(&peer)))
    }

    fn invite_payload(&self, conversation: &Conversation, admin: PeerId) -> Result<ControlPayload, EngineError> {
        let ConversationKind::Group { name, .. } = &conversation.kind else {
            return Err(RequestError::NotAGroup(conversation.id).into());
        };
        Ok(ControlPayload::Group(GroupControl::Invite {
            group_id: conversation.id,
            name: name.clone(),
            admin,
            members: self
                .current_members(&conversation.id)?
                .into_iter()
                .map(|m| RosterEntry { peer_id: m.peer_id, epoch: m.epoch })
                .collect(),
            created_at: conversation.created_at,
        }))
    }

    fn members_changed(&mut self, now: Timestamp, id: &ConversationId) -> Result<(), EngineError> {
        let mut conversation = self.conversation(id)?;
        conversation.updated_at = now;
        self.store.put_conversation(&conversation)?;
        self.conversation_updated(conversation)
    }

    // ---- commands ------------------------------------------------------------

    pub(in crate::engine) fn create_group(
        &mut self,
        now: Timestamp,
        name: String,
        members: Vec<PeerId>,
    ) -> Result<Conversation, EngineError> {
        let name = name.trim().to_owned();
        if name.is_empty() {
            return Err(RequestError::EmptyGroupName.into());
        }
        if name.len() > MAX_GROUP_NAME_LEN {
            return Err(RequestError::GroupNameTooLong { len: name.len(), max: MAX_GROUP_NAME_LEN }.into());
        }
        let me = self.peer_id();
        let others: BTreeSet<PeerId> = members.into_iter().filter(|p| *p != me).collect();
        if others.len() < MIN_GROUP_OTHERS {
            return Err(RequestError::TooFewMembers { min: MIN_GROUP_OTHERS, got: others.len() }.into());
        }
        if others.len() + 1 > MAX_GROUP_MEMBERS {
            return Err(RequestError::TooManyMembers { max: MAX_GROUP_MEMBERS }.into());
        }
        let id = ConversationId::random_group(&mut self.rng);
        let conversation = Conversation::new(id, ConversationKind::Group { name, admin: me }, now, now);
        self.store.put_conversation(&conversation)?;
        for peer in core::iter::once(me).chain(others.iter().copied()) {
            let member = Member { peer_id: peer, joined_at: now, is_admin: peer == me, left_at: None, epoch: 1 };
            self.store.put_member(&id, &member)?;
        }
        let group = GroupSession::new(id, me, others.iter().copied(), &mut self.rng)?;
        self.save_group(&group)?;
        let invite = self.invite_payload(&conversation, me)?;
        for peer in others {
            self.enqueue_control(now, peer, &invite)?;
            self.send_own_key(now, &group, peer)?;
            self.pump(now, peer)?;
        }
        self.staged.events.push(Event::ConversationCreated(conversation.clone()));
        Ok(conversation)
    }

    pub(in crate::engine) fn send_group_message(
        &mut self,
        now: Timestamp,
        id: ConversationId,
        content: String,
    ) -> Result<Message, EngineError> {
        check_content(&content)?;
        let (conversation, _, mut group) = self.joined_group(&id)?;
        let recipients = self.others(&id)?;
        if recipients.is_empty() {
            return Err(RequestError::NoOtherMembers(id).into());
        }
        let message_id = MessageId::random(&mut self.rng);
        let plaintext = ChatContent { message_id, sent_at: now, content: content.clone() }.encode();
        let encrypted = group.encrypt(&plaintext)?;
        self.save_group(&group)?;
        let position = Some((encrypted.key_id, encrypted.message_number));
        let message = self.record_outgoing(now, conversation, message_id, content, &recipients, position)?;
        self.store.put_group_envelope(&message_id, &Envelope::new(EnvelopeBody::Group(encrypted)).encode())?;
        for peer in recipients {
            // Our key goes to a member lazily, before our first message to
            // it under that key, and again until the member acknowledges it.
            if group.awaits_confirmation(&peer) && !self.key_queued_for(&group, &peer)? {
                if let Err(e) = self.send_own_key(now, &group, peer) {
                    self.recipient_failed(now, &message_id, &peer, e)?;
                    continue;
                }
            }
            if let Err(e) = self.enqueue(now, peer, OutboxPayload::Group { message_id }) {
                self.recipient_failed(now, &message_id, &peer, e)?;
                continue;
            }
            self.pump(now, peer)?;
        }
        Ok(self.store.message(&message_id)?.unwrap_or(message))
    }

    pub(in crate::engine) fn invite(
        &mut self,
        now: Timestamp,
        id: ConversationId,
        peer: PeerId,
    ) -> Result<(), EngineError> {
        let me = self.peer_id();
        let (conversation, admin, mut group) = self.joined_group(&id)?;
        if admin != me {
            return Err(RequestError::NotAdmin { admin }.into());
        }
        if peer == me {
            return Err(RequestError::SelfConversation(peer).into());
        }
        let existing = self.others(&id)?;
        if existing.contains(&peer) {
            return Err(RequestError::AlreadyMember(peer).into());
        }
        if existing.len() + 2 > MAX_GROUP_MEMBERS {
            return Err(RequestError::TooManyMembers { max: MAX_GROUP_MEMBERS }.into());
        }
        let epoch = self
            .store
            .members(&id)?
            .iter()
            .map(|m| m.epoch)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or(RequestError::TooManyMembers { max: MAX_GROUP_MEMBERS })?;
        self.store.put_member(&id, &Member { peer_id: peer, joined_at: now, is_admin: false, left_at: None, epoch })?;
        group.add_member(peer)?;
        self.save_group(&group)?;
        let added = ControlPayload::Group(GroupControl::MemberAdded {
            group_id: id,
            member: RosterEntry { peer_id: peer, epoch },
        });
        for other in existing {
            self.enqueue_control(now, other, &added)?;
            self.pump(now, other)?;
        }
        let invite = self.invite_payload(&conversation, admin)?;
        self.enqueue_control(now, peer, &invite)?;
        self.send_own_key(now, &group, peer)?;
        self.pump(now, peer)?;
        self.members_changed(now, &id)
    }

    pub(in crate::engine) fn leave(&mut self, now: Timestamp, id: ConversationId) -> Result<(), EngineError> {
        let (mut conversation, _, _) = self.joined_group(&id)?;
        let me = self.peer_id();
        let mine = self.store.members(&id)?.into_iter().find(|m| m.peer_id == me);
        let epoch = mine.as_ref().map_or(0, |m| m.epoch);
        let leave = ControlPayload::Group(GroupControl::Leave { group_id: id, epoch });
        // Members refuse our messages once our leave reaches them, and our
        // keys go with it: what has not reached everyone by now never will.
        let mut undelivered = BTreeSet::new();
        for message in self.store.messages(&id)? {
            if message.is_outgoing(&me) && message.status < MessageStatus::Delivered {
                self.fail_message(
                    now,
                    &message.id,
                    "this node left the group before the message reached every member",
                )?;
                undelivered.insert(message.id);
            }
        }
        // Nor do our keys or key requests for the group matter any more.
        for item in self.store.outbox()? {
            let ours = match &item.payload {
                OutboxPayload::Group { message_id } | OutboxPayload::GroupCopy { message_id } => {
                    undelivered.contains(message_id)
                }
                OutboxPayload::Control(ControlPayload::SenderKey(d)) => d.group_id == id,
                OutboxPayload::Control(ControlPayload::SenderKeyRequest { group_id }) => *group_id == id,
                _ => false,
            };
            if ours {
                self.store.delete_outbox_item(item.seq)?;
            }
        }
        for peer in self.others(&id)? {
            // A leave always goes out, whatever else is queued for the peer.
            self.enqueue_unbounded(now, peer, OutboxPayload::Control(leave.clone()))?;
            self.pump(now, peer)?;
        }
        if let Some(mut member) = mine {
            member.left_at = Some(now);
            self.store.put_member(&id, &member)?;
        }
        conversation.left = true;
        conversation.updated_at = now;
        self.store.put_conversation(&conversation)?;
        // Our keys for the group go: nothing sent after we left is ours to read.
        self.store.delete_group_keys(&id)?;
        self.conversation_updated(conversation)
    }
}

/// A best-effort send: an outbox already full for that peer is not an error.
pub(super) fn ignore_full(result: Result<(), EngineError>) -> Result<(), EngineError> {
    match result {
        Err(EngineError::Request(RequestError::OutboxFull { .. })) => Ok(()),
        other => other,
    }
}
