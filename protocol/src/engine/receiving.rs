//! Receiving: an envelope from a peer, opened by its session, and each
//! pairwise payload in it (chat, receipts, acknowledgements, group control,
//! sender keys) handed to the code that owns it.

use std::collections::BTreeSet;

use super::outbox::is_tracked;
use super::{
    ControlPayload, Conversation, ConversationKind, Engine, EngineError, Event, Message, MessageStatus, OutboxPayload,
    RequestError, Store, MAX_CONTENT_LEN, MAX_IDS_PER_PAYLOAD,
};
use crate::ids::{ConversationId, MessageId, PeerId};
use crate::time::Timestamp;
use crate::wire::{ChatContent, Envelope, EnvelopeBody, PairwisePayload, RatchetMessage};

/// Whether a pairwise payload was dealt with, or must wait for state that
/// has not arrived yet (and so is not acknowledged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Handled {
    Done,
    NotYet,
}

impl<S: Store> Engine<S> {
    pub(super) fn receive(&mut self, now: Timestamp, from: PeerId, bytes: &[u8]) -> Result<(), EngineError> {
        match self.receive_envelope(now, from, bytes) {
            // What this peer's input wanted queued back to it does not fit:
            // it is dropped (the peer retransmits), the rest stands.
            Err(EngineError::Request(RequestError::OutboxFull { peer, .. })) => {
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
                    if let OutboxPayload::Control(ControlPayload::SenderKey(d)) = &item.payload {
                        self.own_key_acknowledged(&from, d)?;
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

    pub(super) fn reject(&mut self, peer: PeerId, reason: &str) {
        self.staged.events.push(Event::SecurityRejected { peer_id: peer, reason: reason.to_owned() });
    }
}
