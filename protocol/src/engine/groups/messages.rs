//! Sender keys and group messages: distributing and requesting keys,
//! opening a member's message, holding it while its sender's key is
//! missing, and expiring what is held.

use crate::engine::receiving::Handled;
use crate::engine::{
    ControlPayload, Conversation, Engine, EngineError, HeldMessage, OutboxPayload, Store, MAX_CONTENT_LEN,
};
use crate::group::GroupError;
use crate::ids::{ConversationId, PeerId};
use crate::skipped::SKIPPED_KEY_MAX_AGE_MS;
use crate::time::Timestamp;
use crate::wire::{ChatContent, Envelope, EnvelopeBody, GroupMessage, SenderKeyDistribution};

impl<S: Store> Engine<S> {
    pub(in crate::engine) fn on_distribution(
        &mut self,
        now: Timestamp,
        from: PeerId,
        distribution: &SenderKeyDistribution,
    ) -> Result<Handled, EngineError> {
        let Ok((_, _, mut group)) = self.joined_group(&distribution.group_id) else {
            // Usually a key that overtook its group's invite: not
            // acknowledged, so the sender sends it again later.
            self.remind_of_leave(now, from, distribution.group_id)?;
            return Ok(Handled::NotYet);
        };
        match group.accept_distribution(&from, distribution, now) {
            Ok(()) => {}
            // The admin's notice of this member may still be on its way.
            Err(GroupError::NotAMember { .. }) => return Ok(Handled::NotYet),
            Err(e) => {
                self.reject(from, &e.to_string());
                return Ok(Handled::Done);
            }
        }
        self.save_group(&group)?;
        self.release_held(now, &distribution.group_id)?;
        Ok(Handled::Done)
    }

    /// The peer acknowledged our sender key: it holds it.
    pub(in crate::engine) fn own_key_acknowledged(
        &mut self,
        peer: &PeerId,
        distribution: &SenderKeyDistribution,
    ) -> Result<(), EngineError> {
        if let Some(mut group) = self.load_group(&distribution.group_id)? {
            if group.own_key_id() == distribution.key_id {
                group.key_confirmed(peer);
                self.save_group(&group)?;
            }
        }
        Ok(())
    }

    pub(in crate::engine) fn on_key_request(
        &mut self,
        now: Timestamp,
        from: PeerId,
        id: ConversationId,
    ) -> Result<(), EngineError> {
        let Ok((_, _, group)) = self.joined_group(&id) else { return Ok(()) };
        if !self.others(&id)?.contains(&from) {
            self.reject(from, "sender key request from a peer that is not a member");
            return Ok(());
        }
        self.send_own_key(now, &group, from)?;
        // The member may hold our key only from a later position than some
        // of our messages it still lacks (copies of keys and messages cross
        // in flight): those go to it over the pairwise session.
        self.copy_unconfirmed(now, &id, Some(from))?;
        self.pump(now, from)
    }

    pub(in crate::engine) fn on_group_message(
        &mut self,
        now: Timestamp,
        from: PeerId,
        bytes: &[u8],
        message: GroupMessage,
    ) -> Result<(), EngineError> {
        if from != message.sender {
            self.reject(from, "group message whose sender is not the peer it came from");
            return Ok(());
        }
        if self.joined_group(&message.group_id).is_err() {
            // Not (or no longer) in the group, or its invite is still on the
            // way: nothing is held. The sender retransmits until confirmed,
            // and the copy after the invite decrypts.
            return self.remind_of_leave(now, from, message.group_id);
        }
        match self.open_group_message(now, &message)? {
            Err(GroupError::UnknownChain { .. }) => self.hold(now, from, bytes, &message),
            Err(e) => {
                self.reject(from, &e.to_string());
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Decrypts and stores a group message; the inner result is the
    /// cryptographic refusal, if any.
    fn open_group_message(
        &mut self,
        now: Timestamp,
        message: &GroupMessage,
    ) -> Result<Result<(), GroupError>, EngineError> {
        let Ok((conversation, _, mut group)) = self.joined_group(&message.group_id) else {
            return Ok(Err(GroupError::NotAMember { peer: self.peer_id() }));
        };
        let sender = message.sender;
        let plaintext = match group.decrypt(message, now) {
            Ok(plaintext) => plaintext,
            Err(GroupError::Duplicate { .. }) => {
                // A retransmission: confirm again if we stored it.
                let position = Some((message.key_id, message.message_number));
                let stored = self
                    .store
                    .messages(&message.group_id)?
                    .into_iter()
                    .find(|m| m.sender == sender && m.group_position == position);
                match stored {
                    Some(stored) => self.enqueue(now, sender, OutboxPayload::Delivered(vec![stored.id]))?,
                    // Our copy of the key starts after this position: we
                    // can never read it. Asking for the key makes the
                    // sender send it again where we can.
                    None => self.request_key(now, sender, message.group_id)?,
                }
                self.pump(now, sender)?;
                return Ok(Ok(()));
            }
            Err(e) => return Ok(Err(e)),
        };
        self.save_group(&group)?;
        let Ok(chat) = ChatContent::decode(&plaintext) else {
            self.reject(sender, "group message content does not decode");
            return Ok(Ok(()));
        };
        let position = Some((message.key_id, message.message_number));
        self.store_group_chat(now, conversation, sender, chat, position).map(Ok)
    }

    /// One of a member's group messages, sent to us alone over the pairwise
    /// session (see [`Engine::copy_unconfirmed`]).
    pub(in crate::engine) fn on_group_copy(
        &mut self,
        now: Timestamp,
        from: PeerId,
        group_id: ConversationId,
        position: (u32, u32),
        chat: ChatContent,
    ) -> Result<(), EngineError> {
        let Ok((conversation, _, _)) = self.joined_group(&group_id) else {
            // As for the group envelope: nothing is kept, the sender sends
            // it again until we confirm it.
            return self.remind_of_leave(now, from, group_id);
        };
        if !self.others(&group_id)?.contains(&from) {
            self.reject(from, "group message from a peer that is not a member");
            return Ok(());
        }
        // The copy names where the group envelope of the message stood,
        // so that the envelope's retransmissions (our copy of the key may
        // start after it) are recognised and confirmed, not taken for a
        // key we lack.
        self.store_group_chat(now, conversation, from, chat, Some(position))
    }

    /// Stores a member's group message, or confirms again one we hold: the
    /// group envelope and a pairwise copy of the same message can both
    /// arrive. `position` is where the envelope stood on the sender's
    /// chain, by which its retransmissions are recognised.
    fn store_group_chat(
        &mut self,
        now: Timestamp,
        conversation: Conversation,
        sender: PeerId,
        chat: ChatContent,
        position: Option<(u32, u32)>,
    ) -> Result<(), EngineError> {
        if let Some(mut stored) = self.store.message(&chat.message_id)? {
            if stored.sender != sender || stored.conversation_id != conversation.id || stored.content != chat.content {
                self.reject(sender, "group message reusing another message's ID");
                return Ok(());
            }
            if position.is_some() && stored.group_position != position {
                stored.group_position = position;
                self.store.put_message(&stored)?;
            }
            self.enqueue(now, sender, OutboxPayload::Delivered(vec![stored.id]))?;
            return self.pump(now, sender);
        }
        if chat.content.len() > MAX_CONTENT_LEN {
            self.reject(sender, "group message too large");
            return Ok(());
        }
        let stored = self.record_incoming(now, conversation, sender, chat, position)?;
        self.enqueue(now, sender, OutboxPayload::Delivered(vec![stored.id]))?;
        self.pump(now, sender)
    }

    fn hold(&mut self, now: Timestamp, from: PeerId, bytes: &[u8], message: &GroupMessage) -> Result<(), EngineError> {
        if self.store.is_held(&message.group_id, &message.sender, bytes)? {
            return Ok(()); // a retransmission of one already held
        }
        // Counted in the store, not by loading what is held: every held
        // message would otherwise cost a read of all the others.
        let (from_sender, sender_bytes) = self.store.held_usage(Some(&message.sender))?;
        let (all, all_bytes) = self.store.held_usage(None)?;
        let limits = &self.config;
        let over = bytes.len() > MAX_CONTENT_LEN + 1024
            || from_sender >= limits.held_max_per_sender
            || sender_bytes.saturating_add(bytes.len()) > limits.held_max_bytes_per_sender
            || all >= limits.held_max
            || all_bytes.saturating_add(bytes.len()) > limits.held_max_bytes;
        if over {
            self.reject(from, "too many group messages held for a missing sender key");
            return Ok(());
        }
        let seq = self.store.next_seq()?;
        let held = HeldMessage {
            seq,
            group_id: message.group_id,
            sender: message.sender,
            envelope: bytes.to_vec(),
            received_at: now,
        };
        self.store.put_held_message(&held)?;
        // Ask the sender for its key (one request queued at a time).
        self.request_key(now, message.sender, message.group_id)?;
        self.pump(now, message.sender)?;
        Ok(())
    }

    /// Asks a member for its sender key, unless a request is already queued.
    pub(super) fn request_key(
        &mut self,
        now: Timestamp,
        peer: PeerId,
        group_id: ConversationId,
    ) -> Result<(), EngineError> {
        let request = ControlPayload::SenderKeyRequest { group_id };
        let queued = self
            .store
            .outbox_for(&peer)?
            .iter()
            .any(|i| matches!(&i.payload, OutboxPayload::Control(queued) if *queued == request));
        if queued {
            return Ok(());
        }
        self.enqueue_control(now, peer, &request)
    }

    /// Retries the held messages of a group after a key or an invite arrived.
    pub(super) fn release_held(&mut self, now: Timestamp, id: &ConversationId) -> Result<(), EngineError> {
        for held in self.store.held_messages(id)? {
            let Ok(Envelope { body: EnvelopeBody::Group(message) }) = Envelope::decode(&held.envelope) else {
                self.store.delete_held_message(held.seq)?;
                continue;
            };
            match self.open_group_message(now, &message)? {
                Err(GroupError::UnknownChain { .. }) => {}
                Err(e) => {
                    self.store.delete_held_message(held.seq)?;
                    self.reject(held.sender, &e.to_string());
                }
                Ok(()) => self.store.delete_held_message(held.seq)?,
            }
        }
        Ok(())
    }

    /// Group part of the retention sweep: held messages past seven days, and
    /// skipped group keys past seven days.
    pub(in crate::engine) fn group_retention(&mut self, now: Timestamp) -> Result<(), EngineError> {
        let cutoff = Timestamp(now.as_millis().saturating_sub(SKIPPED_KEY_MAX_AGE_MS));
        self.store.delete_held_before(cutoff)?;
        // An invitation left unanswered for the message TTL is declined. At
        // most the waiting cap of them (100) expire per TTL: a flood evicts
        // its own invitations silently long before.
        let cutoff = Timestamp(now.as_millis().saturating_sub(self.config.message_ttl_ms));
        for id in self.store.invitations_received_before(cutoff)? {
            match self.store.invitation(&id) {
                Ok(Some(invitation)) => self.decline(now, &invitation)?,
                Ok(None) => {}
                // One unreadable row must not stop the sweep.
                Err(crate::engine::StoreError::Corrupt(_)) => self.store.delete_invitation(&id)?,
                Err(e) => return Err(e.into()),
            }
        }
        for conversation in self.store.conversations()? {
            // One unreadable row must not stop the sweep for the others.
            let Ok(Some(mut group)) = self.load_group(&conversation.id) else { continue };
            if group.expire_skipped_keys(now) > 0 {
                self.save_group(&group)?;
            }
        }
        Ok(())
    }
}
