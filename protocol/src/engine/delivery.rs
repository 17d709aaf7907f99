//! Delivery: what a transmit's result means for its outbox item (confirmed,
//! held by a relay, tried again later, failed), and the message statuses
//! that follow, per recipient and overall.

use std::collections::BTreeSet;

use super::outbox::is_tracked;
use super::{
    Conversation, Engine, EngineError, Event, Message, MessageStatus, OutboxPayload, RequestError, Store, TransmitId,
    TransmitOutcome, DAY_MS,
};
use crate::ids::{MessageId, PeerId};
use crate::time::Timestamp;

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
pub(super) const UNSENT_COPY_REUSE_MS: u64 = 6 * DAY_MS;

/// How the wait before another copy grows with the item's age.
const HELD_RETRY_AGE_FACTOR: u64 = 3;

/// The longest wait between copies of a message held by a relay.
const HELD_RETRY_MAX_MS: u64 = 2 * DAY_MS;

impl<S: Store> Engine<S> {
    pub(super) fn transmit_result(
        &mut self,
        now: Timestamp,
        id: TransmitId,
        outcome: TransmitOutcome,
    ) -> Result<(), EngineError> {
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
                OutboxPayload::Chat(id) => self.fail_message(now, id, reason.as_str()),
                OutboxPayload::Group { message_id } | OutboxPayload::GroupCopy { message_id } => {
                    let why = format!("refused by the relay: {}", reason.as_str());
                    self.recipient_lost(now, message_id, &flight.peer, &why)
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
                    TransmitOutcome::Failed(reason) => Some(reason.to_string()),
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

    /// A delivery or read receipt from `from` for some of our messages.
    pub(super) fn confirmed(
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
        if !matches!(error, EngineError::Request(RequestError::OutboxFull { .. })) {
            return Err(error);
        }
        self.recipient_lost(now, id, recipient, &error)
    }

    /// Records that a group message will not reach `recipient`, and why,
    /// and settles its status without it.
    fn recipient_lost(
        &mut self,
        now: Timestamp,
        id: &MessageId,
        recipient: &PeerId,
        why: &dyn core::fmt::Display,
    ) -> Result<(), EngineError> {
        let reason = format!("not sent to {recipient}: {why}");
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
}
